"""sage_extend_attention against its fp32 twin and its quantization twin.

Thresholds (cosine similarity / relative L1 of the whole output):
- pv="fp16" vs exact fp32: random inputs cos >= 0.9999, rel-L1 <= 0.02; outlier
  inputs (10-sigma per-channel K bias with 8x Q channels; a large attention-sink
  key) cos >= 0.999, rel-L1 <= 0.05. Measured on the CPU interpreter: random
  0.99995 / 0.010, outliers >= 0.9996 / <= 0.026.
- pv="fp8" vs exact fp32: random cos >= 0.999, rel-L1 <= 0.05; outliers
  cos >= 0.998, rel-L1 <= 0.06. Why that loose: e4m3 keeps 3 mantissa bits, so P
  and V each carry up to 2^-4 relative rounding (mean ~1.6%); measured random
  0.99939 / 0.035, outliers >= 0.99914 / <= 0.040 (SageAttention2's own sm90
  kernel: 0.9993 / 0.037 on random inputs).
- pv="int8" vs exact fp32: random cos >= 0.9995, rel-L1 <= 0.03; outliers
  cos >= 0.999, rel-L1 <= 0.05. P is scaled to 127 by its row's max within each
  key tile, so the large probabilities keep 7 bits (e4m3: 4); the torch twin at
  2K keys: random 0.99980 / 0.020, K bias 0.99931 / 0.041, sink 0.99981 / 0.019.
- vs the quantization twin (same arithmetic in torch): cos >= 0.99999,
  rel-L1 <= 2e-3 -- only summation order and exp2 rounding may differ.
The small cases run on the GPU when there is one, else on the CPU interpreter
(fp16: bf16 is broken there); the realistic cases need a GPU and add bf16.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
import triton
import triton.language as tl
from sage_attention_inputs import (
    DEVICE,
    HAS_GPU,
    ExtendCase,
    make_extend_inputs,
    requires_kernels,
    run_op,
)

from sglang.srt.layers.attention.sage_attention import extend_attention, sage_extend_attention
from sglang.srt.layers.attention.sage_attention.extend_attention import (
    SUPPORTED_PV,
    sage_attention_from_packed,
    tile_config,
)
from sglang.srt.layers.attention.sage_attention.layout import (
    PV,
    PackedKV,
    allocate_packed_kv,
    packed_len,
)
from sglang.srt.layers.attention.sage_attention.quantize import quantize_kv
from sglang.srt.layers.attention.sage_attention.reference import (
    attention_error,
    sage_extend_attention_quant_ref,
    sage_extend_attention_ref,
)

# (cos of the worst request and head, max rel-L1) against the exact fp32 op, by P·V
# precision and input kind. A one-token chunk rests a cosine on one row: fp16 0.99988.
VS_EXACT = {
    ("fp16", "randn"): (0.9998, 0.02),
    ("fp16", "outlier"): (0.999, 0.05),
    ("fp8", "randn"): (0.998, 0.05),
    ("fp8", "outlier"): (0.998, 0.06),
    ("int8", "randn"): (0.9995, 0.03),
    ("int8", "outlier"): (0.999, 0.05),
}
VS_TWIN = (0.99999, 2e-3)

SMALL_CASES = [
    ExtendCase("ragged_gqa4", (0, 70, 5), (33, 1, 90), num_q_heads=8, num_kv_heads=2),
    ExtendCase("no_prefix_two_q_blocks", (0,), (150,)),
    ExtendCase("prefix_off_tile_paged", (77,), (50,), page_size=16),
    ExtendCase("long_prefix_one_token_mqa8", (300,), (1,), num_q_heads=8, num_kv_heads=1),
    ExtendCase("zero_length_chunks", (10, 20, 0), (0, 16, 5)),
    ExtendCase("hd128_gqa8", (40,), (70,), num_q_heads=8, num_kv_heads=1, head_dim=128),
    ExtendCase("hd128_v64", (20,), (30,), head_dim=128, head_dim_v=64),
    ExtendCase("paged_ragged", (33, 64), (31, 17), num_kv_heads=2, page_size=16),
]
OUTLIER_CASES = [
    ExtendCase(
        f"{values}_hd{d}",
        (100, 37),
        (60, 150),
        num_q_heads=8,
        num_kv_heads=2,
        head_dim=d,
        values=values,
    )
    for values in ("k_bias", "sink")
    for d in (64, 128)
]
GPU_CASES = [
    ExtendCase("prefill_2k", (0,), (2048,), num_q_heads=32, num_kv_heads=8, head_dim=128),
    ExtendCase(
        "chunked_prefill_paged",
        (3000, 1000),
        (1024, 500),
        num_q_heads=32,
        num_kv_heads=8,
        head_dim=128,
        page_size=16,
    ),
    ExtendCase(
        "long_prefix_short_chunks",
        (8000, 4097),
        (1, 7),
        num_q_heads=32,
        num_kv_heads=8,
        head_dim=128,
        page_size=64,
    ),
    ExtendCase(
        "hd64_ragged", (0, 513, 2000), (1000, 129, 64), num_q_heads=16, num_kv_heads=2, head_dim=64
    ),
    ExtendCase("mha_hd128", (1024,), (1024,), num_q_heads=8, num_kv_heads=8, head_dim=128),
    ExtendCase(
        "k_bias_hd128",
        (1500,),
        (700,),
        num_q_heads=32,
        num_kv_heads=8,
        head_dim=128,
        values="k_bias",
    ),
    ExtendCase(
        "sink_hd128", (1500,), (700,), num_q_heads=32, num_kv_heads=8, head_dim=128, values="sink"
    ),
]


def _ids(cases):
    return [c.name for c in cases]


def check_against_twins(
    case: ExtendCase, causal: bool, pv: str, dtype=torch.float16, device=DEVICE, rotate_qk=False
):
    inputs = make_extend_inputs(case, dtype=dtype, device=device)
    out = run_op(sage_extend_attention, inputs, causal=causal, pv=pv, rotate_qk=rotate_qk)
    rows = slice(0, inputs["q_extend"].shape[0])
    assert torch.isfinite(out[rows]).all(), "an output row was left unwritten or is not finite"

    exact = run_op(sage_extend_attention_ref, inputs, causal=causal)
    twin = run_op(
        sage_extend_attention_quant_ref, inputs, causal=causal, pv=pv, rotate_qk=rotate_qk
    )
    min_cos, max_l1 = VS_EXACT[(pv, "randn" if case.values == "randn" else "outlier")]
    cos, rel_l1 = attention_error(out, exact, request_rows=inputs["qo_indptr"])
    assert cos >= min_cos and rel_l1 <= max_l1, f"vs fp32: cos {cos:.6f}, rel-L1 {rel_l1:.4f}"
    twin_cos, twin_l1 = attention_error(out, twin)
    assert twin_cos >= VS_TWIN[0] and twin_l1 <= VS_TWIN[1], (
        f"vs quantization twin: cos {twin_cos:.7f}, rel-L1 {twin_l1:.2e}"
    )
    # Collected by the GPU run script (pytest -s) for the per-group worst case.
    tag = f"{case.name}{'_rotated' if rotate_qk else ''} causal={causal} pv={pv} {dtype}"
    print(f"\nACCURACY {tag} cos={cos:.6f} rel_l1={rel_l1:.4f}")
    return cos, rel_l1


@pytest.mark.skipif(**requires_kernels)
@pytest.mark.parametrize("pv", SUPPORTED_PV)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", SMALL_CASES, ids=_ids(SMALL_CASES))
def test_small_batches(case, causal, pv):
    check_against_twins(case, causal, pv)


@pytest.mark.skipif(**requires_kernels)
@pytest.mark.parametrize("pv", SUPPORTED_PV)
@pytest.mark.parametrize("case", OUTLIER_CASES, ids=_ids(OUTLIER_CASES))
def test_outlier_inputs(case, pv):
    check_against_twins(case, causal=True, pv=pv)


ROTATION_CASES = [
    SMALL_CASES[0],
    SMALL_CASES[2],
    OUTLIER_CASES[0],
    OUTLIER_CASES[-1],
    ExtendCase(
        "qk_channels_hd128", (100,), (60,), num_q_heads=8, num_kv_heads=2, head_dim=128,
        values="qk_channels",
    ),
]  # fmt: skip


@pytest.mark.skipif(**requires_kernels)
@pytest.mark.parametrize("pv", ["fp16", "fp8"])
@pytest.mark.parametrize("case", ROTATION_CASES, ids=_ids(ROTATION_CASES))
def test_rotated_qk(case, pv):
    """The Hadamard rotation of Q and K (``rotate_qk``): same bars, same twin agreement."""
    check_against_twins(case, causal=True, pv=pv, rotate_qk=True)


@pytest.mark.skipif(**requires_kernels)
def test_rotation_is_what_handles_shared_qk_channels():
    """Large channels in both Q and K survive smoothing (they are not a K offset) and
    coarsen the INT8 Q·Kᵀ; rotating Q and K spreads them over every channel."""
    inputs = make_extend_inputs(ROTATION_CASES[-1])
    exact = run_op(sage_extend_attention_ref, inputs)
    errors = {
        rotate: attention_error(run_op(sage_extend_attention, inputs, rotate_qk=rotate), exact)
        for rotate in (False, True)
    }
    assert errors[True][0] >= 0.9995 and errors[True][1] <= 0.02, errors
    assert errors[False][1] > 2 * errors[True][1], errors


@pytest.mark.skipif(**requires_kernels)
def test_smoothing_is_what_handles_k_outliers():
    """The same kernel without the K mean subtraction falls below the outlier bar."""
    case = OUTLIER_CASES[0]
    inputs = make_extend_inputs(case)
    exact = run_op(sage_extend_attention_ref, inputs)
    errors = {}
    for smooth in (True, False):
        packed = quantize_kv(
            inputs["k_extend"],
            inputs["v_extend"],
            inputs["k_buffer"],
            inputs["v_buffer"],
            inputs["qo_indptr"],
            inputs["kv_indptr"],
            inputs["kv_indices"],
            pv=PV.FP16,
            smooth_k=smooth,
        )
        out = inputs["o_extend"].clone()
        sage_attention_from_packed(
            inputs["q_extend"],
            out,
            packed,
            inputs["qo_indptr"],
            inputs["kv_indptr"],
            inputs["max_len_extend"],
            sm_scale=case.head_dim**-0.5,
            causal=True,
            config=tile_config(case.head_dim, True, PV.FP16, out.device),
        )
        errors[smooth] = attention_error(out, exact)
    assert errors[True][0] >= 0.999, errors
    assert errors[False][0] < 0.999, errors
    assert errors[False][1] > 2 * errors[True][1], errors


@pytest.mark.skipif(**requires_kernels)
@pytest.mark.parametrize("pv", SUPPORTED_PV)
def test_bitwise_deterministic_and_inputs_untouched(pv):
    inputs = make_extend_inputs(SMALL_CASES[0])
    before = {k: v.clone() for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    first = run_op(sage_extend_attention, inputs, pv=pv)
    second = run_op(sage_extend_attention, inputs, pv=pv)
    assert torch.equal(first, second)
    for name, tensor in before.items():
        # Bytes, not values: the unused cache slots hold NaN, and NaN != NaN.
        assert torch.equal(tensor.view(torch.uint8), inputs[name].view(torch.uint8)), name


def _slice_request(inputs, b):
    """Request b of a batch as a batch of its own (same cache, same slots)."""
    qo, kv = inputs["qo_indptr"].tolist(), inputs["kv_indptr"].tolist()
    rows = slice(qo[b], qo[b + 1])
    device = inputs["q_extend"].device
    return dict(
        inputs,
        q_extend=inputs["q_extend"][rows],
        k_extend=inputs["k_extend"][rows],
        v_extend=inputs["v_extend"][rows],
        o_extend=inputs["o_extend"][rows],
        qo_indptr=torch.tensor([0, qo[b + 1] - qo[b]], dtype=torch.int32, device=device),
        kv_indptr=torch.tensor([0, kv[b + 1] - kv[b]], dtype=torch.int32, device=device),
        kv_indices=inputs["kv_indices"][kv[b] : kv[b + 1]],
    )


@pytest.mark.skipif(**requires_kernels)
@pytest.mark.parametrize("pv", SUPPORTED_PV)
def test_request_output_is_independent_of_its_batch(pv):
    """Bitwise: the same request alone or beside others of other lengths (smoothing and
    scales are per request; the pre-pass reduction order is fixed)."""
    inputs = make_extend_inputs(ExtendCase("mixed", (40, 300, 7), (30, 65, 129), num_kv_heads=2))
    together = run_op(sage_extend_attention, inputs, pv=pv)
    for b, rows in enumerate([slice(0, 30), slice(30, 95), slice(95, 224)]):
        alone = run_op(sage_extend_attention, _slice_request(inputs, b), pv=pv)
        assert torch.equal(alone, together[rows]), f"request {b}"


@pytest.mark.skipif(**requires_kernels)
def test_head_shards_match_the_whole_layer():
    """Bitwise: what one tensor-parallel rank computes on its share of the heads
    (here half the query heads and their KV heads) equals those heads of the full run."""
    inputs = make_extend_inputs(ExtendCase("tp", (90,), (70,), num_q_heads=8, num_kv_heads=4))
    full = run_op(sage_extend_attention, inputs)
    for rank in range(2):
        q_heads, kv_heads = slice(4 * rank, 4 * rank + 4), slice(2 * rank, 2 * rank + 2)
        shard = dict(inputs)
        for name in ("q_extend", "o_extend"):
            shard[name] = inputs[name][:, q_heads].contiguous()
        for name in ("k_extend", "v_extend", "k_buffer", "v_buffer"):
            shard[name] = inputs[name][:, kv_heads].contiguous()
        assert torch.equal(run_op(sage_extend_attention, shard), full[:, q_heads]), rank


@pytest.mark.skipif(**requires_kernels)
def test_empty_batch_launches_nothing(monkeypatch):
    """Zero new tokens (max_len_extend == 0): no kernel runs, so nothing is read or written."""
    launched = []
    monkeypatch.setattr(
        extend_attention, "quantize_kv", lambda *a, **k: launched.append("quantize_kv")
    )
    monkeypatch.setattr(
        extend_attention, "sage_attention_from_packed", lambda *a, **k: launched.append("attn")
    )
    inputs = make_extend_inputs(ExtendCase("empty", (5, 0), (0, 0)))
    sage_extend_attention(**inputs)
    assert launched == []


@pytest.mark.skipif(**requires_kernels)
def test_rows_past_max_len_extend_are_left_as_they_were():
    """The documented contract: max_len_extend sizes the grid; a chunk longer than it
    gets its first max_len_extend rows (rounded up to the query block: 64 rows for
    the Triton kernel, 128 for the Hopper one) computed and the rest untouched."""
    inputs = make_extend_inputs(ExtendCase("short_grid", (20,), (300,)))
    inputs["max_len_extend"] = 128
    out = run_op(sage_extend_attention, inputs)
    exact = run_op(sage_extend_attention_ref, inputs)
    assert attention_error(out[:128], exact[:128])[0] >= VS_EXACT[("fp16", "randn")][0]
    assert torch.isnan(out[128:]).all(), "rows past max_len_extend were written"


@pytest.mark.skipif(**requires_kernels)
@pytest.mark.parametrize("pv", SUPPORTED_PV)
def test_tma_and_plain_load_paths_agree(pv, monkeypatch):
    """Hopper reads tiles through tensor descriptors, Ampere/Ada through pointers:
    the same kernel, the same numbers (bitwise on the interpreter)."""
    inputs = make_extend_inputs(SMALL_CASES[0])
    outs = []
    shipped = extend_attention.tile_config
    for use_tma in (True, False):
        monkeypatch.setattr(
            extend_attention,
            "tile_config",
            lambda *a, tma=use_tma: dataclasses.replace(shipped(*a), use_tma=tma),
        )
        outs.append(run_op(sage_extend_attention, inputs, pv=pv, kernel="triton"))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.skipif(**requires_kernels)
@pytest.mark.parametrize("pv", list(PV), ids=[p.value for p in PV])
def test_workspace_reused_across_calls_gives_the_same_bits(pv):
    inputs = make_extend_inputs(SMALL_CASES[0])
    fresh = run_op(sage_extend_attention, inputs, pv=pv.value)
    num_rows = packed_len(inputs["kv_indices"].shape[0], inputs["k_extend"].shape[0], 3)
    workspace = allocate_packed_kv(
        num_rows + 256, 4, num_kv_heads=2, head_dim=64, head_dim_v=64, pv=pv,
        device=inputs["q_extend"].device,
    )  # fmt: skip
    for _ in range(2):  # the second call finds the first one's bytes in the buffers
        reused = run_op(sage_extend_attention, inputs, pv=pv.value, workspace=workspace)
        assert torch.equal(fresh, reused)


@pytest.mark.skipif(**requires_kernels)
def test_large_finite_q_and_k_stay_finite():
    """Keys near fp16's range (raw q·k ~1e6): smoothing removes the K offset exactly
    (it adds q·m to every key of a row) and Q is quantized in fp32, so the output
    matches the fp32 op with no inf/NaN. (Scaling Q up instead would make softmax
    an argmax, where any 8-bit rounding may flip the winner: ill-conditioned, not
    an overflow question.)"""
    inputs = make_extend_inputs(ExtendCase("big_qk", (50,), (40,), values="big_qk"))
    out = run_op(sage_extend_attention, inputs)
    exact = run_op(sage_extend_attention_ref, inputs)
    assert torch.isfinite(exact).all() and torch.isfinite(out).all()
    cos, _ = attention_error(out, exact)
    assert cos >= VS_EXACT[("fp16", "outlier")][0], cos


def test_twin_keeps_bf16_values_beyond_fp16_range():
    """CPU twin of the GPU test below: the quantized arithmetic with bf16 V near 5e5
    stays finite and accurate (V is scaled by a power of two before the fp16 cast)."""
    inputs = make_extend_inputs(
        ExtendCase("big_v", (60,), (40,), values="big_v"), dtype=torch.bfloat16, device="cpu"
    )
    exact = run_op(sage_extend_attention_ref, inputs)
    twin = run_op(sage_extend_attention_quant_ref, inputs)
    assert torch.isfinite(exact).all() and torch.isfinite(twin).all()
    assert attention_error(twin, exact)[0] >= VS_EXACT[("fp16", "randn")][0]


@pytest.mark.skipif(
    not HAS_GPU, reason="bf16 kernels need a GPU (the interpreter's bf16 is broken)"
)
@pytest.mark.parametrize("pv", SUPPORTED_PV)
def test_gpu_bf16_values_beyond_fp16_range(pv):
    inputs = make_extend_inputs(
        ExtendCase("big_v", (700,), (300,), num_q_heads=8, num_kv_heads=2, head_dim=128,
                   values="big_v"),
        dtype=torch.bfloat16, device="cuda",
    )  # fmt: skip
    out = run_op(sage_extend_attention, inputs, pv=pv)
    exact = run_op(sage_extend_attention_ref, inputs)
    assert torch.isfinite(out).all(), "non-finite output for finite bf16 values"
    min_cos, max_l1 = VS_EXACT[(pv, "randn")]
    cos, rel_l1 = attention_error(out, exact)
    assert cos >= min_cos and rel_l1 <= max_l1, (cos, rel_l1)


BAD_INPUTS = [
    (
        "head_dim",
        lambda a: a.update(
            q_extend=a["q_extend"][..., :48],
            k_extend=a["k_extend"][..., :48],
            k_buffer=a["k_buffer"][..., :48],
        ),
        "head dims",
    ),
    (
        "dtype_fp32",
        lambda a: a.update(
            {
                k: a[k].float()
                for k in ("q_extend", "k_extend", "v_extend", "o_extend", "k_buffer", "v_buffer")
            }
        ),
        "dtype",
    ),
    (
        "fp8_kv_cache",
        lambda a: a.update(k_buffer=a["k_buffer"].to(torch.float8_e4m3fn)),
        "fp8/fp4 KV",
    ),
    ("pv_mode", lambda a: a.update(pv="int4"), "pv must be one of"),
    (
        "heads_not_multiple",
        lambda a: a.update(q_extend=a["q_extend"][:, :3], o_extend=a["o_extend"][:, :3]),
        "not a multiple",
    ),
    ("o_shape", lambda a: a.update(o_extend=a["o_extend"][:-1]), "o_extend has shape"),
    ("indptr_dtype", lambda a: a.update(qo_indptr=a["qo_indptr"].float()), "qo_indptr must be"),
    ("indptr_length", lambda a: a.update(kv_indptr=a["kv_indptr"][:-1]), "batch + 1"),
    ("max_len_negative", lambda a: a.update(max_len_extend=-1), "max_len_extend"),
    ("rank", lambda a: a.update(k_buffer=a["k_buffer"][0]), "[tokens, heads, dim]"),
]


@pytest.mark.parametrize(
    "mutate,message", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS]
)
def test_bad_input_raises_value_error(mutate, message):
    args = make_extend_inputs(ExtendCase("bad", (8,), (16,), num_kv_heads=2), device="cpu")
    mutate(args)
    with pytest.raises(ValueError, match="sage_attn: .*" + re.escape(message)):
        sage_extend_attention(**args)


@pytest.mark.skipif(not HAS_GPU, reason="realistic shapes and bf16 need a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("pv", SUPPORTED_PV)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", GPU_CASES, ids=_ids(GPU_CASES))
def test_gpu_realistic(case, causal, pv, dtype):
    check_against_twins(case, causal, pv, dtype=dtype, device="cuda")


@triton.jit
def _offsets_probe(out_k, out_v, kv_head, tok, num_rows, V_TOKEN_MAJOR: tl.constexpr):
    k_offsets, v_offsets = extend_attention.packed_tile_offsets(
        kv_head, tok, num_rows, 128, 128, 16, V_TOKEN_MAJOR
    )
    tl.store(out_k + tl.arange(0, 16)[:, None] * 128 + tl.arange(0, 128)[None, :], k_offsets)
    # Branches, not a tuple picked by a conditional: triton 3.6 does not fold the latter
    # into constexprs.
    if V_TOKEN_MAJOR:
        v_rows = tl.arange(0, 128)[:, None] * 16 + tl.arange(0, 16)[None, :]
    else:
        v_rows = tl.arange(0, 16)[:, None] * 128 + tl.arange(0, 128)[None, :]
    tl.store(out_v + v_rows, v_offsets)


@pytest.mark.skipif(**requires_kernels)
@pytest.mark.parametrize("v_token_major", [True, False])
def test_plain_load_offsets_do_not_wrap_past_two_to_the_31(v_token_major):
    """The plain-load (Ampere/Ada) path's addresses at 8 KV heads, hd128 and 2.2M packed
    rows per head, where Hkv * T * D passes 2^31: int64, equal to Python's integers."""
    kv_head, num_rows, tok = 7, 2_200_000, 2_200_000 - 16
    out_k = torch.empty(16, 128, dtype=torch.int64, device=DEVICE)
    out_v = torch.empty(2048, dtype=torch.int64, device=DEVICE)
    _offsets_probe[(1,)](out_k, out_v, kv_head, tok, num_rows, V_TOKEN_MAJOR=v_token_major)
    n, d = torch.arange(16)[:, None], torch.arange(128)[None, :]
    row = kv_head * num_rows + tok
    assert torch.equal(out_k.cpu(), (row + n) * 128 + d)
    if v_token_major:  # [Dv, N] of [Hkv * Dv, T]
        want_v = (kv_head * 128 + d.T) * num_rows + tok + n.T
    else:
        want_v = (row + n) * 128 + d
    assert torch.equal(out_v.cpu().view(want_v.shape), want_v)
    assert want_v.max() > 2**31  # the case is past the wrap


def test_tma_views_refuse_what_int32_coordinates_cannot_reach():
    packed = PackedKV(
        k_int8=torch.empty(8, 2**28, 128, dtype=torch.int8, device="meta"),
        k_scale=torch.empty(8, 2**21, device="meta"),
        v=torch.empty(8, 2**28, 128, dtype=torch.float16, device="meta"),
        v_scale=torch.empty(1, 8, 128, device="meta"),
        pv=PV.FP16,
    )
    with pytest.raises(ValueError, match="int32 coordinates"):
        packed.tile_views(128)
