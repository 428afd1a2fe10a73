"""sage_attn's Hopper kernel (Gluon, warp-specialised) against the plain-Triton kernel.

CPU (CI): every launch of ``sage_attention_from_packed_hopper`` compiles for sm_90
and uses wgmma + TMA. Gluon does not run in the interpreter, so under
``TRITON_INTERPRET=1`` this module re-runs itself in a child process without it
(as ``test_sage_attention_compile.py`` does, whose helpers it reuses).

GPU: on the same ``quantize_kv`` output, the Hopper kernel matches the plain
kernel (TMA config) to summation order (cos >= 0.99999, rel-L1 <= 2e-3) and the
exact fp32 op to ``VS_EXACT``; every row is finite (unused cache slots and the
output start as NaN), results are bitwise deterministic, inputs are untouched.

Timing (GPU): ``python test/srt/test_sage_attention_hopper.py --bench``.
"""

from __future__ import annotations

import sys
from unittest import mock

import pytest
import test_sage_attention_compile as compile_helpers
import torch
from sage_attention_inputs import HAS_GPU, ExtendCase, make_extend_inputs, run_op
from test_sage_attention_compile import (
    captured_launches,
    compile_for,
    compiled_kernels,
    only_interpreted,
    run_compile_tests_in_child,
)
from test_sage_attention_extend import GPU_CASES, OUTLIER_CASES, SMALL_CASES, VS_EXACT, VS_TWIN

from sglang.srt.layers.attention.sage_attention import hopper_attention
from sglang.srt.layers.attention.sage_attention.extend_attention import (
    TileConfig,
    sage_attention_from_packed,
)
from sglang.srt.layers.attention.sage_attention.hopper_attention import (
    hopper_kernel_available,
    hopper_kernel_supports,
    sage_attention_from_packed_hopper,
)
from sglang.srt.layers.attention.sage_attention.layout import PV
from sglang.srt.layers.attention.sage_attention.quantize import quantize_kv
from sglang.srt.layers.attention.sage_attention.reference import (
    attention_error,
    sage_extend_attention_ref,
)

IS_HOPPER = HAS_GPU and torch.cuda.get_device_capability()[0] == 9
needs_gluon = pytest.mark.skipif(not hopper_kernel_available(), reason="no Gluon in this triton")
needs_hopper = pytest.mark.skipif(not IS_HOPPER, reason="needs an sm_90 GPU")
# The plain kernel's Hopper configuration (TMA tiles), the one the dispatch falls back to.
PLAIN_TMA = TileConfig(block_m=64, block_n=128, num_warps=4, num_stages=2, use_tma=True)


@only_interpreted
def test_compile_suite_without_interpreter():
    run_compile_tests_in_child(__file__, keyword="compile")


def test_supported_head_dims():
    assert hopper_kernel_supports(64, 64) and hopper_kernel_supports(128, 128)
    assert not hopper_kernel_supports(128, 64)
    assert not hopper_kernel_supports(96, 96) and not hopper_kernel_supports(256, 256)


def _pack(inputs: dict, pv: PV, rotate: bool = False):
    return quantize_kv(
        inputs["k_extend"],
        inputs["v_extend"],
        inputs["k_buffer"],
        inputs["v_buffer"],
        inputs["qo_indptr"],
        inputs["kv_indptr"],
        inputs["kv_indices"],
        pv=pv,
        rotate=rotate,
    )


def _attend(kernel, inputs: dict, packed, causal: bool, **kwargs) -> torch.Tensor:
    """Run a from-packed kernel on a fresh copy of the (NaN-filled) output."""
    out = inputs["o_extend"].clone()
    kernel(
        inputs["q_extend"],
        out,
        packed,
        inputs["qo_indptr"],
        inputs["kv_indptr"],
        inputs["max_len_extend"],
        sm_scale=inputs["q_extend"].shape[-1] ** -0.5,
        causal=causal,
        **kwargs,
    )
    return out


COMPILE_CONFIGS = [
    (dtype, head_dim, causal, pv, False)
    for dtype in (torch.bfloat16, torch.float16)
    for head_dim in (64, 128)
    for causal in (True, False)
    for pv in PV
] + [(torch.bfloat16, head_dim, True, PV.FP16, True) for head_dim in (64, 128)]  # Q/K rotation


@compiled_kernels
@needs_gluon
@pytest.mark.parametrize(
    "dtype,head_dim,causal,pv,rotate",
    COMPILE_CONFIGS,
    ids=[
        f"compile-{str(d)[6:]}-hd{h}-{'causal' if c else 'full'}-{p.value}"
        + ("-rotated" if r else "")
        for d, h, c, p, r in COMPILE_CONFIGS
    ],
)
def test_every_hopper_launch_compiles(dtype, head_dim, causal, pv, rotate):
    from triton.experimental.gluon._runtime import GluonASTSource

    case = ExtendCase("compile", (70,), (40,), num_q_heads=8, num_kv_heads=2, head_dim=head_dim)
    inputs = make_extend_inputs(case, dtype=dtype, device="cpu")
    # quantize_kv's launches are recorded, not run: only shapes and dtypes matter here.
    launches = captured_launches(
        lambda: _attend(
            sage_attention_from_packed_hopper, inputs, _pack(inputs, pv, rotate), causal
        )
    )
    names = [fn.__name__ for fn, _, _ in launches]
    assert names[-2:] == ["_quantize_q_kernel", "_sage_hopper_kernel"], names
    for fn, bound, options in launches[-2:]:
        if fn.__name__ == "_sage_hopper_kernel":
            with mock.patch.object(compile_helpers, "ASTSource", GluonASTSource):
                kernel = compile_for(fn, bound, options)
        else:
            kernel = compile_for(fn, bound, options)
        assert kernel.asm["cubin"], fn.__name__
    ptx = kernel.asm["ptx"]
    pv_type = {PV.FP16: ".f16.f16", PV.FP8: ".e4m3.e4m3", PV.INT8: ".s8.s8"}[pv]
    assert "wgmma.mma_async.sync.aligned" in ptx and ".s8.s8" in ptx
    assert pv_type in ptx, f"P·V is not a {pv_type} wgmma"
    assert "cp.async.bulk.tensor" in ptx, "tiles are not TMA loads"
    assert "setmaxnreg" in ptx, "no register reallocation between partitions"
    if pv is PV.INT8:  # P·V is a wgmma too, and of no other type than Q·Kᵀ's
        assert ".e4m3.e4m3" not in ptx and ".f16.f16" not in ptx
    assert kernel.metadata.shared <= 227 * 1024


def _cases(cases):
    return [c for c in cases if hopper_kernel_supports(c.head_dim, c.head_dim_v or c.head_dim)]


ALL_GPU_CASES = _cases(SMALL_CASES) + _cases(OUTLIER_CASES) + _cases(GPU_CASES)


@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["q_bf16", "q_fp16"])
@pytest.mark.parametrize("pv", list(PV), ids=[f"pv_{p.value}" for p in PV])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", ALL_GPU_CASES, ids=[c.name for c in ALL_GPU_CASES])
def test_matches_plain_kernel_and_fp32(case, causal, pv, dtype):
    inputs = make_extend_inputs(case, dtype=dtype, device="cuda")
    before = {k: v.clone() for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    packed = _pack(inputs, pv)
    packed_before = [t.clone() for t in (packed.k_int8, packed.k_scale, packed.v, packed.v_scale)]

    out = _attend(sage_attention_from_packed_hopper, inputs, packed, causal)
    again = _attend(sage_attention_from_packed_hopper, inputs, packed, causal)
    plain = _attend(sage_attention_from_packed, inputs, packed, causal, config=PLAIN_TMA)
    exact = run_op(sage_extend_attention_ref, inputs, causal=causal)

    assert torch.isfinite(out).all(), "an output row was left unwritten or is not finite"
    assert torch.equal(out, again), "not bitwise deterministic"
    cos, rel_l1 = attention_error(out, plain)
    exact_cos, exact_l1 = attention_error(out, exact)
    # Collected by the GPU run (pytest -s): vs plain, then vs fp32.
    tag = f"{case.name} causal={causal} pv={pv.value} {dtype}"
    print(f"\nHOPPER {tag} {cos:.7f} {rel_l1:.2e} {exact_cos:.6f} {exact_l1:.4f}")
    assert cos >= VS_TWIN[0] and rel_l1 <= VS_TWIN[1], (
        f"vs plain: cos {cos:.7f} rel-L1 {rel_l1:.2e}"
    )
    min_cos, max_l1 = VS_EXACT[(pv.value, "randn" if case.values == "randn" else "outlier")]
    assert exact_cos >= min_cos and exact_l1 <= max_l1, (
        f"vs fp32: cos {exact_cos:.6f}, rel-L1 {exact_l1:.4f}"
    )
    for name, tensor in before.items():
        # Bytes, not values: the unused cache slots hold NaN, and NaN != NaN.
        assert torch.equal(tensor.view(torch.uint8), inputs[name].view(torch.uint8)), name
    for old, new in zip(
        packed_before, (packed.k_int8, packed.k_scale, packed.v, packed.v_scale), strict=True
    ):
        assert torch.equal(old.view(torch.uint8), new.view(torch.uint8)), "packed K/V changed"


@needs_hopper
def test_rows_past_max_len_extend_are_left_as_they_were():
    """max_len_extend sizes the grid (128-row blocks here): later rows stay NaN."""
    inputs = make_extend_inputs(ExtendCase("short_grid", (20,), (300,)), device="cuda")
    inputs["max_len_extend"] = 128
    out = _attend(sage_attention_from_packed_hopper, inputs, _pack(inputs, PV.FP16), True)
    assert torch.isfinite(out[:128]).all()
    assert torch.isnan(out[128:]).all(), "rows past max_len_extend were written"


@needs_hopper
@pytest.mark.parametrize("pv", list(PV), ids=[f"pv_{p.value}" for p in PV])
def test_cuda_graph_replay_gives_the_same_bits(pv):
    inputs = make_extend_inputs(SMALL_CASES[0], device="cuda")
    packed = _pack(inputs, pv)
    eager = _attend(sage_attention_from_packed_hopper, inputs, packed, True)  # also compiles
    out = inputs["o_extend"].clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sage_attention_from_packed_hopper(
            inputs["q_extend"], out, packed, inputs["qo_indptr"], inputs["kv_indptr"],
            inputs["max_len_extend"], sm_scale=64**-0.5, causal=True,
        )  # fmt: skip
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


def test_unsupported_head_dims_raise():
    case = ExtendCase("v64", (20,), (30,), head_dim=128, head_dim_v=64)
    inputs = make_extend_inputs(case, device="cpu")
    packed = mock.Mock(k_int8=torch.empty(4, 128, 128, dtype=torch.int8), pv=PV.FP16)
    with pytest.raises((ValueError, RuntimeError), match="sage_attn"):
        _attend(sage_attention_from_packed_hopper, inputs, packed, True)


# ----------------------------------------------------------------------------- timing
def bench() -> None:
    """Hopper kernel vs the plain kernel (TMA config): hd128, 4 x 8K tokens, 32/8 heads."""
    import triton

    torch.manual_seed(0)
    batch, seq, hq, hkv, d = 4, 8192, 32, 8, 128
    n = batch * seq
    dev = "cuda"
    q = torch.randn(n, hq, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(n, hkv, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn(n, hkv, d, device=dev, dtype=torch.bfloat16)
    indptr = torch.arange(0, n + 1, seq, device=dev, dtype=torch.int32)
    zeros = torch.zeros(batch + 1, device=dev, dtype=torch.int32)
    empty_cache = torch.zeros(1, hkv, d, device=dev, dtype=torch.bfloat16)
    no_slots = torch.zeros(0, device=dev, dtype=torch.int64)
    variants = {
        PV.FP8: {
            "simple": hopper_attention.HopperConfig(2, False, False),
            "simple+promote": hopper_attention.HopperConfig(2, False, False, pv_promote=True),
        },
        PV.INT8: {"simple": hopper_attention.HopperConfig(2, False, False)},
        PV.FP16: {
            "overlap": hopper_attention.HopperConfig(2, True, False),
            "pingpong_s3": hopper_attention.HopperConfig(3, True, True),
        },
    }
    rows = []
    for pv in PV:
        packed = quantize_kv(k, v, empty_cache, empty_cache, indptr, zeros, no_slots, pv=pv)
        for causal in (False, True):
            flops = 4 * batch * hq * seq * seq * d / (2 if causal else 1)
            out = torch.empty(n, hq, d, device=dev, dtype=torch.bfloat16)
            args = (q, out, packed, indptr, zeros, seq, d**-0.5, causal)

            def run_plain(args=args):
                sage_attention_from_packed(*args, config=PLAIN_TMA)

            run_plain()
            ref = out.clone()
            plain_ms = triton.testing.do_bench(run_plain, warmup=10, rep=50)
            rows.append((pv.value, causal, "plain(tma)", plain_ms, flops, 1.0, 0.0))
            for name, config in variants[pv].items():

                def run_hopper(args=args, config=config):
                    sage_attention_from_packed_hopper(*args, config=config)

                run_hopper()
                cos, rel_l1 = attention_error(out, ref)
                ms = triton.testing.do_bench(run_hopper, warmup=10, rep=50)
                rows.append((pv.value, causal, name, ms, flops, cos, rel_l1))
                print(rows[-1], flush=True)
    print("\npv    mask    kernel            ms      TOPS  x_plain  cos_vs_plain  relL1")
    plain_ms = {}
    for pv, causal, name, ms, flops, cos, rel_l1 in rows:
        if name.startswith("plain"):
            plain_ms[(pv, causal)] = ms
        speedup = plain_ms[(pv, causal)] / ms
        mask = "causal" if causal else "full"
        print(
            f"{pv:5s} {mask:7s} {name:15s} {ms:7.3f} {flops / ms / 1e9:6.0f} {speedup:7.2f}"
            f"  {cos:.7f}  {rel_l1:.2e}"
        )


if __name__ == "__main__" and "--bench" in sys.argv:
    bench()
