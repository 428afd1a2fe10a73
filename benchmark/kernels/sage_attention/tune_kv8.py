"""Tuning sweep for the 8-bit KV cache kernels (``decode_kv8``, ``extend_kv8``).

Times each kernel at a few serving shapes for every configuration of its module
constants (keys per step, rows per program, warps, stages, the PTX INT8 -> fp16
conversion), through ``bench_sage_attention.py``'s measurement functions, so the
figures are comparable with its ``sage_kv8_*`` rows. Prints one line per
(configuration, shape); the chosen constants are the modules' defaults.

    python tune_kv8.py                 # H200: ~2 min
"""

from __future__ import annotations

import argparse
import sys
from unittest import mock

import bench_sage_attention as bench

from sglang.srt.layers.attention.sage_attention import decode_kv8, extend_kv8

DECODE_SHAPES = [(1, 131072), (8, 32768), (64, 32768)]  # (batch, KV length)
EXTEND_SHAPES = [(0, 8192), (7424, 768)]  # (cached prefix, chunk): 0% and 90% at 8K
DECODE_CONFIGS = {  # name -> (BLOCK_N, NUM_STAGES, NUM_WARPS, PTX conversion)
    f"n{n}_s{s}_w{w}{'' if fast else '_cvt'}": (n, s, w, fast)
    for n, s, w, fast in [
        (64, 3, 4, True),
        (128, 3, 4, True),
        (128, 3, 4, False),
        (256, 2, 4, True),
        (256, 3, 4, True),
        (256, 2, 8, True),
    ]
}
EXTEND_CONFIGS = {  # name -> (BLOCK_M, BLOCK_N, NUM_WARPS, NUM_STAGES, PTX conversion)
    f"m{m}_n{n}_w{w}_s{s}{'' if fast else '_cvt'}": (m, n, w, s, fast)
    for m, n, w, s, fast in [
        (128, 64, 8, 2, True),
        (64, 128, 4, 2, True),
        (64, 128, 4, 3, True),
        (64, 128, 4, 2, False),
        (64, 256, 4, 2, True),
        (32, 128, 4, 2, True),
        (64, 128, 8, 2, True),
        (128, 128, 4, 2, True),
    ]
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", nargs="+", default=["decode", "extend"])
    args = parser.parse_args()
    opts = argparse.Namespace(
        q_heads=32, kv_heads=8, tokens=32768, warmup_ms=50, rep_ms=200, impls=[]
    )
    print(f"{'kernel':8} {'config':18} {'shape':>14} {'ms':>8} {'TOPS':>7} {'GB/s':>7} {'cos':>9}")
    if "decode" in args.kernels:
        opts.impls = ["sage_kv8_decode_splits64"]
        for name, (n, s, w, fast) in DECODE_CONFIGS.items():
            patches = dict(BLOCK_N=n, NUM_STAGES=s, NUM_WARPS=w, fast_int8_cvt=lambda f=fast: f)
            with mock.patch.multiple(decode_kv8, **patches):
                for batch, kv_len in DECODE_SHAPES:
                    (row,) = bench.bench_decode(opts, batch, kv_len)
                    print(f"decode   {name:18} {f'b{batch} kv{kv_len}':>14} {row.ms:8.3f}"
                          f" {'':>7} {row.gbps:7.0f} {row.cos:9.6f}", flush=True)  # fmt: skip
    if "extend" in args.kernels:
        opts.impls = ["sage_kv8_kernel_only"]
        for name, (m, n, w, s, fast) in EXTEND_CONFIGS.items():
            patches = dict(
                BLOCK_M=m, BLOCK_N=n, NUM_WARPS=w, NUM_STAGES=s, fast_int8_cvt=lambda f=fast: f
            )
            with mock.patch.multiple(extend_kv8, **patches):
                for prefix, chunk in EXTEND_SHAPES:
                    (row,) = bench.bench_prefill(opts, "extend", 128, prefix, chunk, True)
                    print(f"extend   {name:18} {f'{prefix}+{chunk}':>14} {row.ms:8.3f}"
                          f" {row.tops:7.1f} {'':>7} {row.cos:9.6f}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
