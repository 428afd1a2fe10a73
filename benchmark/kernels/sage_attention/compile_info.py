"""What Triton makes of the 8-bit cache's decode kernel, without a GPU.

Compiles ``decode_kv8._kv8_decode_stage1`` for a CUDA target (default sm_90, the
H200) at given tile constants and prints what decides its speed but no timing
shows: shared memory, how many buffers the software pipeliner gives each gathered
tile (one means the copy for step i+1 waits for step i's compute), the
``async_wait`` depths, and registers / spill bytes from ``ptxas -v``. Needs only
Triton and its bundled ptxas (RESULTS.md, round 6, tuning log 18):

    python compile_info.py --configs 128,3,4 128,5,4 64,5,4,1   # BLOCK_N,stages,warps[,rows]

(``rows`` 1: ``CVT_IN_ROWS``, V converted in its loaded rows.)
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sglang.srt.layers.attention.sage_attention import decode_kv8

POINTERS = {
    "q": "*bf16",
    "k_int8": "*i8",
    "k_scale": "*fp32",
    "v_int8": "*i8",
    "v_scale": "*fp32",
    "kv_indptr": "*i32",
    "kv_indices": "*i64",
    "num_kv_splits": "*i32",
    "attn_logits": "*fp32",
    "attn_lse": "*fp32",
}


def compile_decode(block_n, stages, warps, cvt_in_rows=False, group=4, head_dim=128, arch=90):
    """The stage-1 kernel as ``sage_decode_kv8`` launches it for these constants."""
    kernel = decode_kv8._kv8_decode_stage1
    constants = dict(
        KV_GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        HEAD_DIM_V=head_dim, BLOCK_N=block_n, MIN_BLOCK_KV=32, ROTATE=False,
        NUM_STAGES=stages, FAST_CVT=True, CVT_IN_ROWS=cvt_in_rows,
    )  # fmt: skip
    names = kernel.arg_names
    signature = {
        name: POINTERS.get(name)
        or ("constexpr" if name in constants else "fp32" if name == "qk_scale_log2" else "i32")
        for name in names
    }
    # As at run time: pointers and strides 16-divisible (Triton specialises on it).
    aligned = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(names)
        if name in POINTERS or name.startswith("stride")
    }
    source = ASTSource(
        kernel,
        signature,
        constexprs={(names.index(k),): v for k, v in constants.items()},
        attrs=aligned,
    )
    return triton.compile(
        source,
        target=GPUTarget("cuda", arch, 32),
        options=dict(num_warps=warps, num_stages=stages),
    )


def registers(compiled, arch=90) -> tuple[int, int]:
    """(registers per thread, spill-store bytes) from the bundled ptxas -v."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(compiled.asm["ptx"])
        ptx.flush()
        log = subprocess.run(
            [ptxas, "-v", f"-arch=sm_{arch}a", ptx.name, "-o", os.devnull],
            capture_output=True,
            text=True,
        ).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    return int(regs.group(1)) if regs else -1, int(spills.group(1)) if spills else 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--configs", nargs="+", default=["128,3,4,0", "128,5,4,0", "128,3,4,1", "128,5,4,1"]
    )
    parser.add_argument("--arch", type=int, default=90)
    args = parser.parse_args()
    print("BLOCK_N stages warps rows  smem_B  buffers/tile  async_wait  regs  spill_B")
    for config in args.configs:
        block_n, stages, warps, rows = (list(map(int, config.split(","))) + [0])[:4]
        compiled = compile_decode(block_n, stages, warps, bool(rows), arch=args.arch)
        ir = compiled.asm["ttgir"]
        # Pipelined tiles are allocated [buffers, ...] before the loop.
        allocs = re.findall(r"local_alloc : \(\) -> !ttg.memdesc<(\d+)x", ir)
        buffers = ",".join(map(str, sorted({int(n) for n in allocs})))
        waits = re.findall(r"async_wait[^{]*\{num = (\d+)", ir)
        regs, spill = registers(compiled, args.arch)
        print(f"{block_n:7} {stages:6} {warps:5} {rows:4} {compiled.metadata.shared:7} "
              f"{buffers:>13} {','.join(waits):>11} {regs:5} {spill:8}")  # fmt: skip


if __name__ == "__main__":
    main()
