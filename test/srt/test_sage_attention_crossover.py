"""The crossover table (``crossover.py``): the rule that reads measurements, and the
table agreeing with the committed measurements it cites."""

from __future__ import annotations

import json
import pathlib

import pytest

from sglang.srt.layers.attention.sage_attention.crossover import (
    MEASURED,
    MEASURED_KV8,
    MIN_GAIN,
    decide,
    measured_crossover,
    measured_kv8_crossover,
)

RESULTS = pathlib.Path(__file__).resolve().parents[2] / "benchmark" / "sage_attention" / "results"


def _rows(gains: dict[int, list[float]]) -> list[dict]:
    """Rows of one (base, head dim): chunk length -> the gains over its prefixes."""
    return [
        dict(chunk_len=n, prefix_len=i, base_ms=gain, sage_ms=1.0)
        for n, per_prefix in gains.items()
        for i, gain in enumerate(per_prefix)
    ]


@pytest.mark.parametrize(
    "gains, want",
    [
        ({1024: [0.6, 0.5], 2048: [1.1, 1.06], 4096: [1.3, 1.2]}, 2048),
        # A win at one prefix but not the other is no win for that chunk length.
        ({1024: [0.6, 0.5], 2048: [1.1, 0.9], 4096: [1.3, 1.2]}, 4096),
        # The rule is "from here on": a loss at a longer chunk moves the crossover past it.
        ({1024: [1.2, 1.2], 2048: [1.0, 1.0], 4096: [1.3, 1.2]}, 4096),
        ({1024: [0.6], 2048: [0.9], 4096: [1.04]}, None),  # under MIN_GAIN: never
        ({1024: [MIN_GAIN]}, 1024),
    ],
)
def test_decide(gains, want):
    assert decide(_rows(gains)) == want


def test_unmeasured_and_never_say_why():
    value, why = measured_crossover("sm75", 128, "triton")
    assert value is None and "no measured crossover for sm75" in why


def _committed() -> dict[tuple[str, int, str], int | None]:
    decided = {}
    for path in sorted(RESULTS.glob("*_crossover.json")):
        result = json.loads(path.read_text())
        for key, value in result["decisions"].items():
            base, head_dim = key.split("/")
            decided[(result["arch"], int(head_dim), base)] = value
            # The file's decision is what the rule makes of its rows.
            rows = [r for r in result["rows"] if f"{r['base']}/{r['head_dim']}" == key]
            assert decide(rows) == value, (path.name, key)
    return decided


def test_table_matches_the_committed_measurements():
    committed = _committed()
    assert set(MEASURED) == set(committed)
    for key, entry in MEASURED.items():
        assert entry.min_extend_len == committed[key], key
        assert (RESULTS / entry.source.split()[0]).exists(), entry.source


KERNEL_RESULTS = RESULTS.parents[1] / "kernels" / "sage_attention" / "results"


def _kv8_rows(path: pathlib.Path) -> dict[int, list[dict]]:
    """head dim -> ``decide`` rows of the 8-bit cache's two extend routes, as a server
    runs them (chunk write included): the 8-bit kernel (``sage_kv8``) against
    FlashAttention over the unpacked cache (``sage_kv8_flash``), from a kernel
    benchmark JSON."""
    timed = {}
    for r in json.loads(path.read_text())["rows"]:
        if r["suite"] == "extend" and r["causal"] and r["impl"] in ("sage_kv8", "sage_kv8_flash"):
            timed[(r["head_dim"], r["q_len"], r["kv_len"], r["impl"])] = r["ms"]
    rows: dict[int, list[dict]] = {}
    for (head_dim, q_len, kv_len, impl), ms in timed.items():
        if impl == "sage_kv8" and (head_dim, q_len, kv_len, "sage_kv8_flash") in timed:
            rows.setdefault(head_dim, []).append(
                dict(
                    chunk_len=q_len,
                    prefix_len=kv_len - q_len,
                    sage_ms=ms,
                    base_ms=timed[(head_dim, q_len, kv_len, "sage_kv8_flash")],
                )
            )
    return rows


def test_kv8_table_matches_the_committed_kernel_measurements():
    for (arch, head_dim), entry in MEASURED_KV8.items():
        path = KERNEL_RESULTS / pathlib.Path(entry.source.split()[0]).name
        rows = _kv8_rows(path)[head_dim]
        assert arch == "sm90" and len(rows) >= 6, (path.name, rows)
        assert decide(rows) == entry.min_extend_len, (path.name, rows)


def test_kv8_unmeasured_and_never_say_why():
    value, why = measured_kv8_crossover("sm90", 128, "FlashAttention-4")
    assert value is None and "never beat it on sm90" in why
    value, why = measured_kv8_crossover("sm100", 128, "FlashAttention-4")
    assert value is None and "not measured" in why
