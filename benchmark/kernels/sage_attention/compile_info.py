"""What Triton makes of the 8-bit cache's decode kernel, without a GPU.

Captures the ``_kv8_decode_stage1`` launch that ``sage_decode_kv8`` makes at given
tile constants, compiles it for a CUDA target (default sm_90, the H200) with the
compile tests' helpers, and prints what decides its speed but no timing
shows: shared memory, how many buffers the software pipeliner gives each gathered
tile (one means the copy for step i+1 waits for step i's compute), the
``async_wait`` depths, and registers / spill bytes from ``ptxas -v``. Needs the
test dependencies and Triton's bundled ptxas, not the interpreter (RESULTS.md,
round 6, tuning logs 18-19):

    python compile_info.py --configs 128,3,4 128,5,4 64,5,4,1   # BLOCK_N,stages,warps[,rows]

(``rows`` 1: ``CVT_IN_ROWS``, V converted in its loaded rows.)
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget

from sglang.srt.layers.attention.sage_attention import decode_kv8
from sglang.srt.layers.attention.sage_attention.kv8_cache import allocate_kv8_cache

# The launch capture and ahead-of-time compile of the compile tests, so this compiles
# exactly what ``sage_decode_kv8`` launches, specialised as a real launch is.
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "test/srt"))
from test_sage_attention_compile import captured_launches, compile_for  # noqa: E402


def compile_decode(block_n, stages, warps, cvt_in_rows=False, group=4, head_dim=128, arch=90):
    """The stage-1 kernel as ``sage_decode_kv8`` launches it with these constants (32K
    keys per request, 8 KV heads; the shapes only set specialisations)."""
    batch, num_kv_heads, splits, keys = 2, 8, 4, 32768
    cache = allocate_kv8_cache(batch * keys, num_kv_heads, head_dim, head_dim, "cpu")
    q = torch.zeros(batch, num_kv_heads * group, head_dim, dtype=torch.bfloat16)
    logits = torch.zeros(batch, q.shape[1], splits, head_dim)
    constants = dict(BLOCK_N=block_n, NUM_STAGES=stages, NUM_WARPS=warps, CVT_IN_ROWS=cvt_in_rows)

    def launch():
        decode_kv8.sage_decode_kv8(
            q, torch.zeros_like(q), cache, torch.tensor([0, keys, 2 * keys], dtype=torch.int32),
            torch.arange(batch * keys), logits, logits[..., 0].clone(),
            torch.full((batch,), splits, dtype=torch.int32), splits,
        )  # fmt: skip

    with mock.patch.multiple(decode_kv8, **constants):
        launches = captured_launches(launch)
    fn, bound, options = next(c for c in launches if c[0].__name__ == "_kv8_decode_stage1")
    return compile_for(fn, bound, options, target=GPUTarget("cuda", arch, 32))


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
