"""quantize_kv (the per-call K/V pre-pass) against its torch twin, quantize_kv_ref."""

from __future__ import annotations

import pytest
import torch
from sage_attention_inputs import ExtendCase, make_extend_inputs, requires_kernels

from sglang.srt.layers.attention.sage_attention.quantize import (
    K_QUANT_BLOCK,
    packed_len,
    quantize_kv,
)
from sglang.srt.layers.attention.sage_attention.reference import quantize_kv_ref

CASES = [
    ExtendCase("ragged_paged", (0, 70, 130), (33, 1, 90), num_kv_heads=2, page_size=16),
    ExtendCase("hd128_v64", (65,), (64,), head_dim=128, head_dim_v=64),
]
PACK_ARGS = ("k_extend", "v_extend", "k_buffer", "v_buffer", "qo_indptr", "kv_indptr", "kv_indices")


def owned_rows(inputs) -> torch.Tensor:
    """[T_pad] bool: the packed rows some request owns (the rest are never read)."""
    qo, kv = inputs["qo_indptr"].tolist(), inputs["kv_indptr"].tolist()
    owned = torch.zeros(
        packed_len(inputs["kv_indices"].shape[0], inputs["k_extend"].shape[0], len(qo) - 1),
        dtype=torch.bool,
    )
    for b in range(len(qo) - 1):
        start = K_QUANT_BLOCK * ((kv[b] + qo[b]) // K_QUANT_BLOCK + b)
        length = (kv[b + 1] - kv[b]) + (qo[b + 1] - qo[b])
        assert not owned[start : start + length].any(), "request segments overlap"
        owned[start : start + length] = True
    return owned


@pytest.mark.skipif(**requires_kernels)
@pytest.mark.parametrize("smooth_k", [True, False], ids=["smooth", "raw"])
@pytest.mark.parametrize("pv_fp8", [False, True], ids=["v_fp16", "v_fp8"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_packed_kv_matches_twin(case, pv_fp8, smooth_k):
    inputs = make_extend_inputs(case)
    args = [inputs[name] for name in PACK_ARGS]
    got = quantize_kv(*args, pv_fp8=pv_fp8, smooth_k=smooth_k)
    want = quantize_kv_ref(*args, pv_fp8=pv_fp8, smooth_k=smooth_k)
    rows = owned_rows(inputs).to(got.k_int8.device)

    k_diff = (got.k_int8[:, rows].int() - want.k_int8[:, rows].int()).abs()
    # The kernel's mean is a different fp32 sum than torch's: a value at a
    # rounding tie may land one step away, nothing more.
    assert k_diff.max() <= 1 and (k_diff > 0).float().mean() < 1e-3
    blocks = rows.view(-1, K_QUANT_BLOCK).any(dim=1)
    torch.testing.assert_close(got.k_scale[:, blocks], want.k_scale[:, blocks], rtol=1e-5, atol=0)
    if pv_fp8:
        torch.testing.assert_close(got.v_scale, want.v_scale, rtol=1e-6, atol=0)
        got_v, want_v = got.v[:, :, rows].float(), want.v[:, :, rows].float()
        # The GPU's fast fp32 division may put v / scale on the other side of
        # an e4m3 rounding boundary: a rare value lands one e4m3 step away.
        magnitude = torch.maximum(got_v.abs(), want_v.abs()).clamp_min(2.0**-6)  # subnormal floor
        step = torch.exp2(torch.floor(torch.log2(magnitude)) - 3)
        off = got_v != want_v
        assert ((got_v - want_v).abs()[off] <= step[off]).all()
        assert off.float().mean() < 1e-3
    else:
        got_v, want_v = got.v[:, rows].float(), want.v[:, rows].float()
        torch.testing.assert_close(got_v, want_v, rtol=0, atol=0)
