"""The sage_attn plugin as users meet it: installed with ``pip install .``, found by
SGLang's entry-point loader in a fresh process, offered by all three backend flags.

The fresh-process tests exercise the *installed* copy (that is where SGLang's
loader finds the entry point), so they first check it is the checkout's code.
"""

from __future__ import annotations

import importlib.metadata
import pathlib
import re
import subprocess
import sys

import pytest

from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES
from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
from sglang.srt.layers.attention.sage_attention import plugin

CHECKOUT = pathlib.Path(__file__).resolve().parents[2]
PACKAGE_FILES = sorted(
    (CHECKOUT / "python").glob("sglang/srt/layers/attention/sage_attention*/**/*.py")
) + [CHECKOUT / "python/sglang/srt/layers/attention/sage_attention_backend.py"]
BACKEND_FLAGS = ("--attention-backend", "--prefill-attention-backend", "--decode-attention-backend")
TINY_MODEL = CHECKOUT / "examples" / "tiny-granite"


def fresh_python(code: str) -> str:
    """Run ``code`` in a new interpreter (no conftest path tricks) and return stdout."""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def installed_plugin():
    names = [ep.name for ep in importlib.metadata.entry_points(group="sglang.srt.plugins")]
    if plugin.BACKEND_NAME not in names:
        pytest.fail("the sage_attn entry point is not installed: run `pip install .`")
    installed_root = pathlib.Path(
        fresh_python(
            "import sglang.srt.layers.attention.sage_attention_backend as m; print(m.__file__)"
        ).strip()
    ).parents[4]
    stale = [
        str(path.relative_to(CHECKOUT))
        for path in PACKAGE_FILES
        if not (installed_root / path.relative_to(CHECKOUT / "python")).is_file()
        or (installed_root / path.relative_to(CHECKOUT / "python")).read_bytes()
        != path.read_bytes()
    ]
    if stale:
        pytest.fail(f"installed copy differs from the checkout ({stale}): run `pip install .`")


def test_register_is_idempotent():
    plugin.register()
    plugin.register()
    assert ATTENTION_BACKEND_CHOICES.count("sage_attn") == 1
    assert ATTENTION_BACKENDS["sage_attn"] is plugin.create_sage_attn_backend


def test_launch_server_help_offers_sage_attn_for_every_backend_flag(installed_plugin):
    help_text = subprocess.run(
        [sys.executable, "-m", "sglang.launch_server", "--help"],
        capture_output=True, text=True, cwd="/", timeout=600,
    ).stdout  # fmt: skip
    for flag in BACKEND_FLAGS:
        choices = re.search(re.escape(flag) + r" \{([^}]*)\}", help_text)
        assert choices, f"{flag} not in launch_server --help"
        assert "sage_attn" in choices.group(1).split(","), flag


def test_server_args_accept_it_and_the_factory_builds_the_backend(installed_plugin):
    out = fresh_python(
        f"""
import torch
from sglang.srt.plugins import load_plugins
load_plugins()  # what launch_server and every scheduler process do
from sglang.srt.server_args import ServerArgs
for flags in (dict(attention_backend="sage_attn"),
              dict(prefill_attention_backend="sage_attn", decode_attention_backend="triton"),
              dict(prefill_attention_backend="triton", decode_attention_backend="sage_attn")):
    args = ServerArgs(model_path="{TINY_MODEL}", load_format="dummy", device="cpu", **flags)
    print("server_args", args.attention_backend, args.prefill_attention_backend,
          args.decode_attention_backend)

from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
from sglang.test.kits.attention_unittest.attention_methods import dense_attention as kit
case = kit.make_dense_input_config_cases("sage_attn")[0]
class T:
    def skipTest(self, reason): raise SystemExit("skipped: " + reason)
device = "cuda" if torch.cuda.is_available() else "cpu"
with torch.no_grad():
    fixture = kit.build_dense_attention_fixture(T(), case, head_dim=64, device=device)
print("factory", type(ATTENTION_BACKENDS["sage_attn"](fixture.runner)).__name__)
"""
    )
    assert out.count("server_args") == 3, out
    assert "factory SageAttentionBackend" in out, out
