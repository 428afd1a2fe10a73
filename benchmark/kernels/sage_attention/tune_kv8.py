"""Tuning sweep for the 8-bit KV cache kernels (``decode_kv8``, ``extend_kv8``).

Times each kernel at a few serving shapes for every configuration of its module
constants (keys per step, rows per program, warps, stages, the PTX INT8 -> fp16
conversion and, in decode, where V is converted), through
``bench_sage_attention.py``'s measurement functions, so the figures are comparable
with its ``sage_kv8_*`` rows. Prints one line per
(configuration, shape); the chosen constants are the modules' defaults.

    python tune_kv8.py                 # H200: ~2 min
"""

from __future__ import annotations

import argparse
import itertools
import sys
from unittest import mock

import bench_sage_attention as bench

from sglang.srt.layers.attention.sage_attention import decode_kv8, extend_kv8

DECODE_SHAPES = [(1, 131072), (8, 32768), (32, 32768), (64, 32768)]  # (batch, KV length)
EXTEND_SHAPES = [(0, 8192), (7424, 768)]  # (cached prefix, chunk): 0% and 90% at 8K
DECODE_CONFIGS = {  # name -> (BLOCK_N, NUM_STAGES, NUM_WARPS, CVT_IN_ROWS, USE_TMA)
    # Triton 3.6 gives this loop one buffer per gathered tile at 3-4 stages (the copy
    # for step i+1 waits for step i's compute) and two from 5 on (the compile report:
    # test_sage_attention_compile.py -k compile_info).
    # BLOCK_N caps the keys per step; whole pages take min(page size, BLOCK_N), through
    # TMA or plain loads (USE_TMA; page size 1 gathers either way).
    f"n{n}_s{s}_w{w}{'_rows' if rows else ''}{'' if tma else '_notma'}": (n, s, w, rows, tma)
    for n, s, w, rows, tma in [
        (128, 3, 4, False, True),
        (128, 3, 4, True, True),
        (128, 5, 4, True, True),
        (128, 5, 4, False, True),
        (128, 5, 4, True, False),
        (64, 3, 4, True, True),
        (64, 5, 4, True, True),
        (64, 8, 4, True, True),
        (32, 5, 4, True, True),
        (128, 3, 8, True, True),
    ]
}
EXTEND_CONFIGS = {  # name -> (BLOCK_M, BLOCK_N, NUM_WARPS, NUM_STAGES, PTX conversion)
    f"m{m}_n{n}_w{w}_s{s}{'' if fast else '_cvt'}": (m, n, w, s, fast)
    for m, n, w, s, fast in [
        (64, 128, 4, 2, True),
        (64, 128, 4, 5, True),
        (64, 128, 8, 5, True),
        (128, 64, 8, 5, True),
        (64, 64, 4, 5, True),
        (128, 64, 8, 2, True),
    ]
}


def report(kernel: str, config: str, shape: str, row, slots: str = "") -> None:
    """One line of the sweep's table."""
    tops = f"{row.tops:7.1f}" if row.tops else " " * 7
    gbps = f"{row.gbps:7.0f}" if row.gbps else " " * 7
    print(f"{kernel:8} {config:18} {shape:>14} {row.ms:8.3f} {tops} {gbps} {row.cos:9.6f} {slots}",
          flush=True)  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", nargs="+", default=["decode", "extend"])
    parser.add_argument(
        "--decode-slots", nargs="+", default=["contiguous", "random"],
        help="slot orders to decode over (bench_sage_attention.py --decode-slots)",
    )  # fmt: skip
    parser.add_argument(
        "--decode-page-sizes", type=int, nargs="+", default=[1, 64],
        help="page sizes of both caches to decode over (1: every key in its own slot)",
    )  # fmt: skip
    parser.add_argument("--extend-configs", nargs="+", help="names from EXTEND_CONFIGS; all")
    args = parser.parse_args()
    opts = argparse.Namespace(
        q_heads=32, kv_heads=8, tokens=32768, warmup_ms=50, rep_ms=200, impls=[],
        decode_page_size=1, kv8_page_size=64,
    )  # fmt: skip
    header = ("kernel", "config", "shape", "ms", "TOPS", "GB/s", "cos", "slots")
    print("{:8} {:18} {:>14} {:>8} {:>7} {:>7} {:>9} {}".format(*header))
    if "decode" in args.kernels:
        for order, page_size in itertools.product(args.decode_slots, args.decode_page_sizes):
            opts.decode_slots, opts.decode_page_size = order, page_size
            order = f"{order} p{page_size}"
            # SGLang's Triton decode on the bf16 cache at split caps 16 and 64 (the baselines),
            # then each kv8 configuration at cap 64 (sage_attn's).
            opts.impls = ["sglang_triton_decode", "sglang_triton_decode_splits64"]
            for batch, kv_len in DECODE_SHAPES:
                for row in bench.bench_decode(opts, batch, kv_len):
                    cap = "cap64" if row.impl.endswith("splits64") else "cap16"
                    report("bf16", cap, f"b{batch} kv{kv_len}", row, order)
            opts.impls = ["sage_kv8_decode_splits64"]
            for name, (n, s, w, rows, tma) in DECODE_CONFIGS.items():
                patches = dict(BLOCK_N=n, NUM_STAGES=s, NUM_WARPS=w, CVT_IN_ROWS=rows, USE_TMA=tma)
                with mock.patch.multiple(decode_kv8, **patches):
                    for batch, kv_len in DECODE_SHAPES:
                        (row,) = bench.bench_decode(opts, batch, kv_len)
                        report("decode", name, f"b{batch} kv{kv_len}", row, order)
    if "extend" in args.kernels:
        opts.impls = ["sage_kv8_kernel_only"]
        for name, (m, n, w, s, fast) in EXTEND_CONFIGS.items():
            if args.extend_configs and name not in args.extend_configs:
                continue
            patches = dict(
                BLOCK_M=m, BLOCK_N=n, NUM_WARPS=w, NUM_STAGES=s, fast_int8_cvt=lambda f=fast: f
            )
            with mock.patch.multiple(extend_kv8, **patches):
                for prefix, chunk in EXTEND_SHAPES:
                    (row,) = bench.bench_prefill(opts, "extend", 128, prefix, chunk, True)
                    report("extend", name, f"{prefix}+{chunk}", row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
