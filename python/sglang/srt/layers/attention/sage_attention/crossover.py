"""The crossover: how long a request's new chunk must be to run on the 8-bit kernel,
measured against the base backend for each GPU architecture and head dim.

Below it the base backend (``base_backend.py``) serves the request, so sage_attn is
never slower than that backend where the table has a measurement, and where the 8-bit
kernel never won it is not used at all. The figures come from

    python benchmark/sage_attention/crossover.py --bases fa4 triton --head-dims 64 128

which times one 8B-shaped attention layer call (32 query / 8 KV heads) through each
backend as a server runs it (SGLang's pools, the backend's own ``forward_extend``,
prefix re-quantization included) for one request per chunk length over a fresh and a
75%-cached prefix, and writes ``benchmark/sage_attention/results/<device>_crossover.json``.
``decide`` turns those rows into the entries below; a CPU test checks that they agree
with the committed files.
"""

from __future__ import annotations

from dataclasses import dataclass

# The 8-bit path must be this much faster than the base at a chunk length (and at every
# longer one, over every measured prefix) to take those requests: run-to-run noise of
# a layer timing on one card is a few percent, and "never slower" is the promise.
MIN_GAIN = 1.05


@dataclass(frozen=True)
class Crossover:
    min_extend_len: int | None  # None: the 8-bit kernel never won by MIN_GAIN
    source: str  # the committed measurement


_H100 = "h100_crossover.json (H100, 2026-12-05)"
# (architecture, head dim, base backend) -> measured crossover. On the H100 against fa4
# (SGLang's page size 1): at head dim 128 the 8-bit path is 1.19-1.24x from 16K-token
# chunks and 1.01x (fresh) / 1.20x (75% cached) at 8K; at head dim 64 at most 1.04x.
# Against Triton at head dim 64, 1.3-3.8x from 4K. Triton at head dim 128: not measured.
MEASURED: dict[tuple[str, int, str], Crossover] = {
    ("sm90", 128, "fa4"): Crossover(16384, _H100),
    ("sm90", 64, "fa4"): Crossover(None, _H100),
    ("sm90", 64, "triton"): Crossover(4096, _H100),
}


# The 8-bit KV cache (``kv8_flash.py``): (architecture, head dim) -> from which chunk
# length sage_attn's 8-bit extend kernel beats FlashAttention over the unpacked cache.
# Measured on the H100 as a server runs both (chunk write included, pages of 64):
# ``sage_kv8`` against ``sage_kv8_flash`` (FA4), 2K-32K chunks, dense and 90% cached:
# 0.41-0.54x at hd128, 0.31-0.52x at hd64. From
#   python benchmark/kernels/sage_attention/bench_sage_attention.py --suites extend \
#       --head-dims 128 64 --extend-lens 2048 8192 32768 --cached-fractions 0.0 0.9 \
#       --causal causal --kv8-page-size 64 --impls fa4 sage_kv8 sage_kv8_flash
_H100_KV8 = "benchmark/kernels/sage_attention/results/h100_kv8_flash_extend.json (H100, 2026-12-06)"
MEASURED_KV8: dict[tuple[str, int], Crossover] = {
    ("sm90", 128): Crossover(None, _H100_KV8),
    ("sm90", 64): Crossover(None, _H100_KV8),
}


def decide(rows: list[dict]) -> int | None:
    """The shortest chunk length from which every measured row (``chunk_len``,
    ``prefix_len``, ``sage_ms``, ``base_ms``) with a chunk at least that long has
    ``base_ms / sage_ms >= MIN_GAIN``; None if there is none."""
    lengths = sorted({row["chunk_len"] for row in rows})
    best = None
    for length in reversed(lengths):
        longer = [row for row in rows if row["chunk_len"] >= length]
        if all(row["base_ms"] / row["sage_ms"] >= MIN_GAIN for row in longer):
            best = length
        else:
            break
    return best


def arch_of(device) -> str:
    """``sm90`` for an H100/H200, ``cpu`` without a GPU."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


def measured_crossover(arch: str, head_dim: int, base: str) -> tuple[int | None, str]:
    """(crossover or None, why) for a model of ``head_dim`` served on ``arch`` with ``base``."""
    entry = MEASURED.get((arch, head_dim, base))
    if entry is None:
        return None, (
            f"no measured crossover for {arch}, head dim {head_dim}, base {base} "
            "(benchmark/sage_attention/crossover.py measures one; "
            "SGLANG_SAGE_ATTN_MIN_EXTEND_LEN sets one)"
        )
    if entry.min_extend_len is None:
        return None, (
            f"the 8-bit kernel never beat {base} by {MIN_GAIN}x on {arch} at head dim "
            f"{head_dim} ({entry.source})"
        )
    return entry.min_extend_len, f"measured against {base} on {arch} ({entry.source})"


def measured_kv8_crossover(arch: str, head_dim: int, flash: str) -> tuple[int | None, str]:
    """(shortest chunk on the 8-bit cache's extend kernel or None, why), where
    ``flash`` (FlashAttention over the unpacked cache) serves the other chunks.
    Unmeasured: FlashAttention serves the chunks, as the base does for the bf16 cache."""
    entry = MEASURED_KV8.get((arch, head_dim))
    if entry is None:
        return None, (
            f"{flash} over the unpacked 8-bit cache: the 8-bit extend kernel is not "
            f"measured against it on {arch} at head dim {head_dim}"
        )
    if entry.min_extend_len is None:
        return None, (
            f"{flash} over the unpacked 8-bit cache: the 8-bit extend kernel never beat "
            f"it on {arch} at head dim {head_dim} ({entry.source})"
        )
    return entry.min_extend_len, (
        f"measured against FlashAttention over the unpacked cache on {arch} ({entry.source})"
    )
