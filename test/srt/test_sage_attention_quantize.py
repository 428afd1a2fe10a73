"""quantize_kv (the per-call K/V pre-pass) against its torch twin, quantize_kv_ref."""

from __future__ import annotations

import pytest
import torch
from sage_attention_inputs import ExtendCase, make_extend_inputs, requires_kernels

from sglang.srt.layers.attention.sage_attention.layout import (
    KV_BLOCK,
    PV,
    allocate_packed_kv,
    packed_len,
    segment_starts,
)
from sglang.srt.layers.attention.sage_attention.quantize import quantize_kv
from sglang.srt.layers.attention.sage_attention.reference import quantize_kv_ref

CASES = [
    ExtendCase("ragged_paged", (0, 70, 130), (33, 1, 90), num_kv_heads=2, page_size=16),
    ExtendCase("hd128_v64", (65,), (64,), head_dim=128, head_dim_v=64),
]
PACK_ARGS = ("k_extend", "v_extend", "k_buffer", "v_buffer", "qo_indptr", "kv_indptr", "kv_indices")


def owned_rows(inputs) -> torch.Tensor:
    """[T_pad] bool: the packed rows some request owns, rounded up to whole blocks
    (the kernel reads whole tiles; the rest are never read)."""
    qo, kv = inputs["qo_indptr"].tolist(), inputs["kv_indptr"].tolist()
    owned = torch.zeros(
        packed_len(inputs["kv_indices"].shape[0], inputs["k_extend"].shape[0], len(qo) - 1),
        dtype=torch.bool,
    )
    for b, start in enumerate(segment_starts(inputs["qo_indptr"], inputs["kv_indptr"])):
        assert start % KV_BLOCK == 0
        length = (kv[b + 1] - kv[b]) + (qo[b + 1] - qo[b])
        length = -(-length // KV_BLOCK) * KV_BLOCK
        assert not owned[start : start + length].any(), "request segments overlap"
        owned[start : start + length] = True
    return owned


@pytest.mark.skipif(**requires_kernels)
@pytest.mark.parametrize(
    "smooth_k, rotate",
    [(True, False), (False, False), (True, True)],
    ids=["smooth", "raw", "rotated"],
)
@pytest.mark.parametrize("pv", list(PV), ids=[f"v_{p.value}" for p in PV])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_packed_kv_matches_twin(case, pv, smooth_k, rotate):
    inputs = make_extend_inputs(case)
    args = [inputs[name] for name in PACK_ARGS]
    got = quantize_kv(*args, pv=pv, smooth_k=smooth_k, rotate=rotate)
    want = quantize_kv_ref(*args, pv=pv, smooth_k=smooth_k, rotate=rotate)
    assert got.rotated == want.rotated == rotate
    rows = owned_rows(inputs).to(got.k_int8.device)

    k_diff = (got.k_int8[:, rows].int() - want.k_int8[:, rows].int()).abs()
    # The kernel's mean is a different fp32 sum than torch's: a value at a
    # rounding tie may land one step away, nothing more.
    assert k_diff.max() <= 1 and (k_diff > 0).float().mean() < 1e-3
    blocks = rows.view(-1, KV_BLOCK).any(dim=1)
    torch.testing.assert_close(got.k_scale[:, blocks], want.k_scale[:, blocks], rtol=1e-5, atol=0)
    torch.testing.assert_close(got.v_scale, want.v_scale, rtol=1e-6, atol=0)
    if pv is PV.FP8:
        got_v, want_v = got.v[:, :, rows].float(), want.v[:, :, rows].float()
        # The GPU's fast fp32 division may put v / scale on the other side of
        # an e4m3 rounding boundary: a rare value lands one e4m3 step away.
        magnitude = torch.maximum(got_v.abs(), want_v.abs()).clamp_min(2.0**-6)  # subnormal floor
        step = torch.exp2(torch.floor(torch.log2(magnitude)) - 3)
        off = got_v != want_v
        assert ((got_v - want_v).abs()[off] <= step[off]).all()
        assert off.float().mean() < 1e-3
    elif pv is PV.INT8:
        got_v, want_v = got.v[:, :, rows].int(), want.v[:, :, rows].int()
        # As for K: a value at a rounding tie may land one step away.
        v_diff = (got_v - want_v).abs()
        assert v_diff.max() <= 1 and (v_diff > 0).float().mean() < 1e-3
    else:
        got_v, want_v = got.v[:, rows].float(), want.v[:, rows].float()
        torch.testing.assert_close(got_v, want_v, rtol=0, atol=0)


@pytest.mark.skipif(**requires_kernels)
def test_padding_rows_of_a_segment_are_zero():
    """The attention kernel reads whole tiles without masks: the rows between a
    request's last key and its block boundary must hold zeros, not old bytes."""
    inputs = make_extend_inputs(CASES[0])
    args = [inputs[name] for name in PACK_ARGS]
    num_rows = packed_len(inputs["kv_indices"].shape[0], inputs["k_extend"].shape[0], 3)
    workspace = allocate_packed_kv(
        num_rows, 3, num_kv_heads=2, head_dim=64, head_dim_v=64, pv=PV.FP16,
        device=inputs["k_extend"].device,
    )  # fmt: skip
    workspace.k_int8.fill_(-1)
    workspace.v.fill_(float("nan"))
    packed = quantize_kv(*args, pv=PV.FP16, workspace=workspace)
    assert packed is workspace
    rows = owned_rows(inputs).to(packed.k_int8.device)
    qo, kv = inputs["qo_indptr"].tolist(), inputs["kv_indptr"].tolist()
    for b, start in enumerate(segment_starts(inputs["qo_indptr"], inputs["kv_indptr"])):
        end = start + (kv[b + 1] - kv[b]) + (qo[b + 1] - qo[b])
        rows[start:end] = False  # keep only the padding rows of each segment
    assert rows.any()
    assert (packed.k_int8[:, rows] == 0).all() and (packed.v[:, rows] == 0).all()


@pytest.mark.skipif(**requires_kernels)
def test_workspace_that_does_not_fit_is_refused():
    inputs = make_extend_inputs(CASES[0])
    args = [inputs[name] for name in PACK_ARGS]
    small = allocate_packed_kv(
        KV_BLOCK, 3, num_kv_heads=2, head_dim=64, head_dim_v=64, pv=PV.FP16, device="cpu"
    )
    with pytest.raises(ValueError, match="does not fit"):
        quantize_kv(*args, pv=PV.FP16, workspace=small)


@pytest.mark.skipif(**requires_kernels)
def test_values_beyond_fp16_range_are_scaled_not_overflowed():
    """bf16 V can exceed fp16's 65504: the FP16 P·V path stores V / 2^k with the
    power of two in v_scale, so the packed values stay finite and exact."""
    case = ExtendCase("big_v", (40,), (30,), num_kv_heads=2)
    inputs = make_extend_inputs(case, dtype=torch.bfloat16)
    for name in ("v_extend", "v_buffer"):
        inputs[name] = inputs[name].clone()
        inputs[name][..., :3] *= 5e5  # three channels near 5e5, the rest ~N(0, 1)
    args = [inputs[name] for name in PACK_ARGS]
    got = quantize_kv(*args, pv=PV.FP16)
    want = quantize_kv_ref(*args, pv=PV.FP16)
    rows = owned_rows(inputs).to(got.v.device)
    assert torch.isfinite(got.v[:, rows]).all()
    torch.testing.assert_close(got.v_scale, want.v_scale, rtol=0, atol=0)
    assert (got.v_scale[..., :3] > 1).all() and (got.v_scale[..., 3:] == 1).all()
    torch.testing.assert_close(got.v[:, rows].float(), want.v[:, rows].float(), rtol=0, atol=0)
