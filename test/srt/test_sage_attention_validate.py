"""CPU smoke test of the model-level validation harness, so it cannot rot.

benchmark/sage_attention/validate.py runs through its command line (never imported):
``--quick --cpu --tiny-random-model``, a random byte model (head dim 64, 2 layers) where
every backend (triton, the sage modes, the KV caches, fp32) prefills in chunks over
SGLang's pools and decodes a few tokens, and the report is rendered.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

VALIDATE = pathlib.Path(__file__).resolve().parents[2] / "benchmark/sage_attention/validate.py"


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU interpreter smoke test")
def test_validate_quick_runs_end_to_end(tmp_path):
    command = [sys.executable, str(VALIDATE), "--quick", "--cpu", "--tiny-random-model"]
    result = subprocess.run(
        [*command, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=1200,
        # README's command as written: --cpu alone must switch the interpreter on.
        env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "validation.json").read_text())
    assert report["quick"] and report["checkpoint"] == "tiny random (seed 0)"
    backends = {r["backend"] for r in report["perplexity"]}
    # Every SGLang stack: the P·V modes, the rotation, the 8-bit KV cache, and
    # SGLang's fp8_e4m3 cache under its Triton backend.
    sage_modes = {"sage_fp16", "sage_fp8", "sage_int8", "sage_fp16_rot", "sage_kv8"}
    assert backends == {"fp32", "triton", "triton_fp8", *sage_modes}
    # A random model over 256 bytes: perplexity near 256, never below 1.
    assert all(1.0 < r["ppl"] < 1000 for r in report["perplexity"])
    assert all(report["determinism"].values())
    assert {r["backend"] for r in report["drift"]} == {"triton", "triton_fp8", *sage_modes}
    markdown = (tmp_path / "validation.md").read_text()
    assert "### Needle retrieval" in markdown
    # A quick report says first that its figures are not accuracy results.
    assert markdown.startswith("**Quick run (--quick)**") and result.stdout.count("Quick run") == 1
