"""The kernels compile for Hopper (sm_90) without a GPU, and use its tensor-core path.

The CPU interpreter runs kernel *semantics*; it does not run Triton's compiler,
so a kernel can pass every CPU test and still fail to compile on a GPU (a
non-constexpr global, a dot shape wgmma rejects). Here every launch that
``sage_extend_attention`` makes is captured on the CPU and compiled ahead of
time down to a cubin (Triton ships ptxas) for Hopper (sm_90, TMA + wgmma) and
for Ampere and Ada (sm_80, sm_89: plain loads + mma.sync).
Under ``TRITON_INTERPRET=1`` (the CPU test command) kernels are interpreter
objects that cannot be compiled, so this module then re-runs itself in a child
process without the variable.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import tempfile
from unittest import mock

import pytest
import torch
import triton
from sage_attention_inputs import ExtendCase, make_extend_inputs
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction, native_specialize_impl

from sglang.srt.layers.attention.sage_attention import extend_attention, sage_extend_attention

HOPPER = GPUTarget("cuda", 90, 32)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
compiled_kernels = pytest.mark.skipif(
    INTERPRET,
    reason="ahead-of-time compile for sm_80/89/90: needs the compiler, which TRITON_INTERPRET=1 "
    "replaces; test_compile_suite_without_interpreter runs it in a child process",
)


only_interpreted = pytest.mark.skipif(
    not INTERPRET,
    reason="without TRITON_INTERPRET=1 the compile tests run in this process directly",
)


def run_compile_tests_in_child(test_file: str, keyword: str | None = None) -> None:
    """Run ``test_file``'s tests (those matching ``keyword``) in a child pytest without
    TRITON_INTERPRET, so its kernels are the compiler's objects; fail with its output."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "pytest", test_file, "-q", "-p", "no:cacheprovider"]
    result = subprocess.run(
        command + (["-k", keyword] if keyword else []),
        env=env,
        capture_output=True,
        text=True,
        cwd=os.path.dirname(test_file),
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


@only_interpreted
def test_compile_suite_without_interpreter():
    run_compile_tests_in_child(__file__)


def captured_launches(launch) -> list[tuple[JITFunction, dict, dict]]:
    """Run ``launch`` with kernel launches recorded instead of executed."""
    calls = []

    def record(self, *args, grid, warmup, **kwargs):
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        bound = dict(zip(self.arg_names, args, strict=False), **kwargs)
        calls.append((self, bound, options))

    with mock.patch.object(JITFunction, "run", record):
        launch()
    return calls


def compile_for(fn: JITFunction, bound: dict, options: dict, target=HOPPER):
    """Compile as a real launch would: the same specialisation of arguments (16-byte
    divisibility of pointers and ints, ints equal to 1 as constants)."""
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(fn.params):
        value = bound[param.name]
        if param.is_constexpr:
            kind, key = "constexpr", None
        else:
            kind, key = native_specialize_impl(BaseBackend, value, False, True, True)
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[(index,)] = value
        elif isinstance(key, str):
            attrs[(index,)] = BaseBackend.parse_attr(key)
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=target, options=options)


# (arch, use_tma): Hopper runs the TMA path; Ampere and Ada the plain-load path
# of the same kernel (pv="fp8" needs sm_89+, so sm_80 compiles fp16 P·V only).
TARGETS = {90: True, 89: False, 80: False}
# The MMA operand types P·V must compile to (INT8 P·V: the same s8 MMA as Q·Kᵀ, so
# the check is that it is there at all; the P·V count is checked below).
PV_PTX_TYPES = {"fp16": ".f16.f16", "fp8": ".e4m3.e4m3", "int8": ".s8.s8"}
CONFIGS = [
    (arch, dtype, head_dim, causal, pv, False)
    for arch in TARGETS
    for dtype in (torch.bfloat16, torch.float16)
    for head_dim in (64, 128)
    for causal in (True, False)
    for pv in ("fp16", "fp8", "int8")
    if not (arch < 89 and pv == "fp8")
] + [  # the Hadamard Q/K rotation: one variant per arch and head dim
    (arch, torch.bfloat16, head_dim, True, "fp16", True)
    for arch in TARGETS
    for head_dim in (64, 128)
]


@compiled_kernels
@pytest.mark.parametrize(
    "arch,dtype,head_dim,causal,pv,rotate",
    CONFIGS,
    ids=[
        f"sm{a}-{str(d)[6:]}-hd{h}-{'causal' if c else 'full'}-{p}{'-rotated' if r else ''}"
        for a, d, h, c, p, r in CONFIGS
    ],
)
def test_every_launch_compiles(arch, dtype, head_dim, causal, pv, rotate, monkeypatch):
    shipped = extend_attention.tile_config
    monkeypatch.setattr(
        extend_attention,
        "tile_config",
        lambda *args: dataclasses.replace(shipped(*args), use_tma=TARGETS[arch]),
    )
    case = ExtendCase("compile", (70,), (40,), num_q_heads=8, num_kv_heads=2, head_dim=head_dim)
    inputs = make_extend_inputs(case, dtype=dtype, device="cpu")
    launches = captured_launches(
        lambda: sage_extend_attention(**inputs, causal=causal, pv=pv, rotate_qk=rotate)
    )
    assert [fn.__name__ for fn, _, _ in launches] == [
        "_kv_stats_kernel",
        "_kv_pack_kernel",
        "_sage_extend_kernel",
    ]
    for fn, bound, options in launches:
        kernel = compile_for(fn, bound, options, target=GPUTarget("cuda", arch, 32))
        assert kernel.asm["cubin"], fn.__name__
        if fn.__name__ != "_sage_extend_kernel":
            continue
        ptx = kernel.asm["ptx"]
        pv_type = PV_PTX_TYPES[pv]
        if arch == 90:
            # Both products on Hopper's warpgroup MMA: INT8 Q·Kᵀ, FP16/FP8/INT8 P·V,
            # with K and V tiles through the tensor-memory accelerator.
            assert "wgmma.mma_async.sync.aligned" in ptx and ".s8.s8" in ptx
            assert pv_type in ptx, f"P·V is not a {pv_type} wgmma"
            assert "cp.async.bulk.tensor" in ptx, "K/V tiles are not TMA loads"
        else:
            assert "mma.sync.aligned" in ptx and ".s8.s8" in ptx
            assert pv_type in ptx, f"P·V is not a {pv_type} mma"
            assert "cp.async.bulk.tensor" not in ptx
        if pv == "int8":  # P·V is an MMA too, and of no other type than Q·Kᵀ's
            assert ".e4m3.e4m3" not in ptx and ".f16.f16" not in ptx
        assert kernel.metadata.shared <= 227 * 1024


# The 8-bit KV cache's write, decode (with SGLang's split reduction) and extend kernels,
# for every architecture: hd 64/128, GQA 1 and 8, plain and rotated K, at page size 1;
# and the whole-page decode (TMA on sm_90, plain loads below) at page sizes 16 and 64.
KV8_CONFIGS = [
    (arch, head_dim, group, rotated, 1)
    for arch in TARGETS
    for head_dim in (64, 128)
    for group in (1, 8)
    for rotated in (False, True)
] + [
    (arch, head_dim, group, rotated, page_size)
    for arch in TARGETS
    for head_dim, group, rotated, page_size in ((128, 8, False, 64), (64, 1, True, 16))
]


@compiled_kernels
@pytest.mark.parametrize(
    "arch,head_dim,group,rotated,page_size",
    KV8_CONFIGS,
    ids=[f"sm{a}-hd{h}-gqa{g}{'-rotated' if r else ''}-page{p}" for a, h, g, r, p in KV8_CONFIGS],
)
def test_kv8_cache_launches_compile(arch, head_dim, group, rotated, page_size, monkeypatch):
    from sglang.srt.layers.attention.sage_attention import decode_kv8, extend_kv8
    from sglang.srt.layers.attention.sage_attention.decode_kv8 import sage_decode_kv8
    from sglang.srt.layers.attention.sage_attention.extend_kv8 import sage_extend_attention_kv8
    from sglang.srt.layers.attention.sage_attention.kv8_cache import (
        allocate_kv8_cache,
        write_kv8,
    )

    # TMA where the target has it, as kv8_cache.kv8_read_plan picks on a GPU.
    monkeypatch.setattr(decode_kv8, "USE_TMA", arch >= 90)
    monkeypatch.setattr(extend_kv8, "USE_TMA", arch >= 90)
    batch, num_kv_heads, splits = 2, 2, 4
    cache = allocate_kv8_cache(
        64, num_kv_heads, head_dim, head_dim, "cpu", rotated=rotated, page_size=page_size
    )
    kv = torch.zeros(8, num_kv_heads, head_dim, dtype=torch.bfloat16)
    q = torch.zeros(batch, num_kv_heads * group, head_dim, dtype=torch.bfloat16)
    logits = torch.zeros(batch, q.shape[1], splits, head_dim)

    def launch():
        write_kv8(cache, torch.arange(8), kv, kv)
        sage_decode_kv8(
            q, torch.zeros_like(q), cache, torch.tensor([0, 3, 8], dtype=torch.int32),
            torch.arange(8), logits, logits[..., 0].clone(),
            torch.full((batch,), splits, dtype=torch.int32), splits,
        )  # fmt: skip
        sage_extend_attention_kv8(
            kv.repeat_interleave(group, 1), torch.zeros_like(kv.repeat_interleave(group, 1)),
            cache, torch.tensor([0, 3, 8], dtype=torch.int32),
            torch.tensor([0, 5, 12], dtype=torch.int32), torch.arange(12), 5,
        )  # fmt: skip

    launches = captured_launches(launch)
    names = [fn.__name__ for fn, _, _ in launches]
    assert names == [
        "_kv8_write_kernel",
        "_kv8_decode_stage1",
        "_fwd_kernel_stage2",
        "_sage_extend_kv8_kernel",
    ], names
    for fn, bound, options in launches:
        kernel = compile_for(fn, bound, options, target=GPUTarget("cuda", arch, 32))
        assert kernel.asm["cubin"], fn.__name__
        assert kernel.metadata.shared <= 227 * 1024
        if fn.__name__ in ("_kv8_decode_stage1", "_sage_extend_kv8_kernel"):
            # Whole pages by TMA exactly where meant.
            uses_tma = "cp.async.bulk.tensor" in kernel.asm["ptx"]
            assert uses_tma == (page_size >= 16 and arch >= 90), (arch, page_size)


@compiled_kernels
@pytest.mark.parametrize("arch", [80, 90], ids=["sm80", "sm90"])
def test_int8_pv_kernels_run_both_products_on_int8_tensor_cores(arch, monkeypatch):
    """With ``pv_int8`` the 8-bit cache's extend and decode kernels have no fp16 MMA
    left: P·V reads the stored V as INT8 (on sm_90 extend's is a K-major wgmma operand,
    as the page stores it)."""
    from sglang.srt.layers.attention.sage_attention import decode_kv8, extend_kv8
    from sglang.srt.layers.attention.sage_attention.kv8_cache import allocate_kv8_cache

    monkeypatch.setattr(extend_kv8, "USE_TMA", arch >= 90)
    monkeypatch.setattr(decode_kv8, "USE_TMA", arch >= 90)
    cache = allocate_kv8_cache(128, 2, 128, 128, "cpu", page_size=64)
    q = torch.zeros(8, 8, 128, dtype=torch.bfloat16)
    kv_indptr = torch.tensor([0, 5, 12], dtype=torch.int32)
    splits = 4
    logits = torch.zeros(2, 8, splits, 128)

    def launch(pv_int8):
        extend_kv8.sage_extend_attention_kv8(
            q, torch.zeros_like(q), cache, torch.tensor([0, 3, 8], dtype=torch.int32),
            kv_indptr, torch.arange(12), 5, pv_int8=pv_int8,
        )  # fmt: skip
        decode_kv8.sage_decode_kv8(
            q[:2], torch.zeros_like(q[:2]), cache, kv_indptr, torch.arange(12), logits,
            logits[..., 0].clone(), torch.full((2,), splits, dtype=torch.int32), splits,
            pv_int8=pv_int8,
        )  # fmt: skip

    for pv_int8 in (False, True):
        for fn, bound, options in captured_launches(lambda pv_int8=pv_int8: launch(pv_int8)):
            if fn.__name__ not in ("_sage_extend_kv8_kernel", "_kv8_decode_stage1"):
                continue
            ptx = compile_for(fn, bound, options, target=GPUTarget("cuda", arch, 32)).asm["ptx"]
            products = set(re.findall(r"(?:wgmma\.mma_async|mma\.sync)\S*", ptx))
            if pv_int8:
                assert products and all(".s8" in p for p in products), (fn.__name__, products)
            else:  # the FP16 P·V is there
                assert any(".f16" in p for p in products), (fn.__name__, products)


# The 8-bit cache decode kernel's compile report: what decides its speed and no timing
# shows (shared memory, how many buffers the software pipeliner gives each gathered tile,
# the async_wait depths, registers and spill bytes from ptxas -v; RESULTS.md round 6,
# tuning logs 18-19). A report, not a check of the shipped code, so it runs only when
# asked, without the interpreter (BLOCK_N,stages,warps[,rows]; rows 1: CVT_IN_ROWS):
#   SAGE_ATTN_COMPILE_INFO="128,3,4 128,5,4,1" python -m pytest \
#       test/srt/test_sage_attention_compile.py -k compile_info -s -q
# SAGE_ATTN_COMPILE_INFO_ARCH picks the target (default 90, the H100/H200).
COMPILE_INFO = os.environ.get("SAGE_ATTN_COMPILE_INFO", "").split()


def _ptxas_registers(ptx: str, arch: int) -> tuple[int, int]:
    """(registers per thread, spill-store bytes) from Triton's bundled ptxas -v."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as source:
        source.write(ptx)
        source.flush()
        log = subprocess.run(
            [ptxas, "-v", f"-arch=sm_{arch}a", source.name, "-o", os.devnull],
            capture_output=True,
            text=True,
        ).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    return int(regs.group(1)) if regs else -1, int(spills.group(1)) if spills else 0


@compiled_kernels
@pytest.mark.skipif(
    not COMPILE_INFO,
    reason="a tuning report, not a check: set SAGE_ATTN_COMPILE_INFO (see above) to print it",
)
def test_kv8_decode_compile_info():
    from sglang.srt.layers.attention.sage_attention import decode_kv8
    from sglang.srt.layers.attention.sage_attention.kv8_cache import allocate_kv8_cache

    arch = int(os.environ.get("SAGE_ATTN_COMPILE_INFO_ARCH", "90"))
    # The stage-1 kernel as sage_decode_kv8 launches it: 32K keys per request, 8 KV
    # heads, GQA 4, hd128 (the shapes only set specialisations).
    batch, num_kv_heads, splits, keys, head_dim = 2, 8, 4, 32768, 128
    cache = allocate_kv8_cache(batch * keys, num_kv_heads, head_dim, head_dim, "cpu")
    q = torch.zeros(batch, num_kv_heads * 4, head_dim, dtype=torch.bfloat16)
    logits = torch.zeros(batch, q.shape[1], splits, head_dim)

    def launch():
        decode_kv8.sage_decode_kv8(
            q, torch.zeros_like(q), cache, torch.tensor([0, keys, 2 * keys], dtype=torch.int32),
            torch.arange(batch * keys), logits, logits[..., 0].clone(),
            torch.full((batch,), splits, dtype=torch.int32), splits,
        )  # fmt: skip

    print(f"\nsm_{arch} BLOCK_N stages warps rows  smem_B  buffers/tile  async_wait  regs spill_B")
    for config in COMPILE_INFO:
        block_n, stages, warps, rows = (list(map(int, config.split(","))) + [0])[:4]
        constants = dict(
            BLOCK_N=block_n, NUM_STAGES=stages, NUM_WARPS=warps, CVT_IN_ROWS=bool(rows)
        )
        with mock.patch.multiple(decode_kv8, **constants):
            launches = captured_launches(launch)
        fn, bound, options = next(c for c in launches if c[0].__name__ == "_kv8_decode_stage1")
        compiled = compile_for(fn, bound, options, target=GPUTarget("cuda", arch, 32))
        ir = compiled.asm["ttgir"]
        # Pipelined tiles are allocated [buffers, ...] before the loop.
        allocs = re.findall(r"local_alloc : \(\) -> !ttg.memdesc<(\d+)x", ir)
        buffers = ",".join(map(str, sorted({int(n) for n in allocs})))
        waits = ",".join(re.findall(r"async_wait[^{]*\{num = (\d+)", ir))
        regs, spill = _ptxas_registers(compiled.asm["ptx"], arch)
        print(f"{block_n:13} {stages:6} {warps:5} {rows:4} {compiled.metadata.shared:7} "
              f"{buffers:>13} {waits:>11} {regs:5} {spill:7}")  # fmt: skip
        assert regs > 0, f"ptxas reported no register count for {config}"
