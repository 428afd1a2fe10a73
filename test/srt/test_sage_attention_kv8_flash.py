"""kv8_flash.py: prefill on the 8-bit cache through FlashAttention over unpacked rows.

Thresholds (cosine similarity of the worst request and head / relative L1 of the whole
output), against the exact fp32 op on the original, unquantized K/V, with
``dense_attention_ref`` (fp64) standing in for FlashAttention on the CPU: the same bars
as the 8-bit extend kernel (``test_sage_attention_extend_kv8.py``: cos >= 0.9995,
rel-L1 <= 0.03; shared large Q/K channels >= 0.997 plain), since only the cache's own
rounding is left. On a GPU with FlashAttention the real kernel must agree with the
twin to cos >= 0.99999, rel-L1 <= 5e-3 (bf16/fp16 rounding of the unpacked rows and of P).
"""

from __future__ import annotations

import pytest
import torch
from sage_attention_inputs import DEVICE, HAS_GPU, ExtendCase, make_kv8_inputs, requires_kernels
from test_sage_attention_extend_kv8 import CASES, OUTLIER_CASES, VS_EXACT, VS_EXACT_QK_CHANNELS

from sglang.srt.layers.attention.sage_attention import kv8_flash
from sglang.srt.layers.attention.sage_attention.base_backend import flash_version_here
from sglang.srt.layers.attention.sage_attention.kv8_cache import dequantize_kv8
from sglang.srt.layers.attention.sage_attention.kv8_reference import (
    dense_attention_ref,
    sage_extend_attention_kv8_ref,
)
from sglang.srt.layers.attention.sage_attention.reference import attention_error
from sglang.srt.layers.attention.sage_attention.request_split import budget_groups

VS_FLASH_TWIN = (0.99999, 5e-3)


FLASH_HERE = flash_version_here(DEVICE)[0]


def run(batch: dict, attention=dense_attention_ref, workspace=None) -> torch.Tensor:
    out = torch.full_like(batch["o_extend"], float("nan"))
    kv_lens = batch["kv_indptr"].diff()
    kv8_flash.flash_prefill_kv8(
        batch["q_extend"], out, batch["cache"],
        qo_indptr=batch["qo_indptr"], kv_indptr=batch["kv_indptr"],
        kv_indices=batch["kv_indices"], max_len_extend=batch["max_len_extend"],
        max_len_kv=int(kv_lens.max()), sm_scale=batch["q_extend"].shape[-1] ** -0.5,
        attention=attention, workspace=workspace,
    )  # fmt: skip
    return out


# The interpreter converts fp32 to bf16 wrongly (../shared/notes/triton-interpreter.md):
# bf16 outputs are checked on the GPU.
DTYPES = [torch.float16] + [torch.bfloat16] * HAS_GPU


@pytest.mark.skipif(**requires_kernels)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rotated", [False, True], ids=["plain", "rotated"])
@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_unpack_is_the_twins_dequantized_rows_and_nothing_else(page_size, rotated, dtype):
    case = ExtendCase("pages", (100, 0, 64), (40, 64, 1), 8, 2, page_size=page_size)
    batch = make_kv8_inputs(case, rotated)
    cache, slots = batch["cache"], batch["kv_indices"]
    before = [t.clone() for t in (cache.k_int8, cache.k_scale, cache.v_int8, cache.v_scale)]
    rows = slots.shape[0]
    k_out = torch.full((rows + 5, 2, 64), 7.0, dtype=dtype, device=slots.device)
    v_out = torch.full_like(k_out, 7.0)
    kv8_flash.unpack_kv8(cache, slots, k_out, v_out)
    k_want, v_want = dequantize_kv8(cache, slots)
    assert torch.equal(k_out[:rows], k_want.to(dtype))
    assert torch.equal(v_out[:rows], v_want.to(dtype))
    assert (k_out[rows:] == 7).all() and (v_out[rows:] == 7).all(), "wrote past its rows"
    after = (cache.k_int8, cache.k_scale, cache.v_int8, cache.v_scale)
    for old, new in zip(before, after, strict=True):
        torch.testing.assert_close(new, old, rtol=0, atol=0, equal_nan=True)


def test_unpack_refuses_outputs_that_do_not_fit():
    from sglang.srt.layers.attention.sage_attention.kv8_cache import allocate_kv8_cache

    cache = allocate_kv8_cache(16, 2, 64, 64, "cpu")
    slots = torch.arange(8)
    ok = torch.empty(8, 2, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="fewer than 8 rows"):
        kv8_flash.unpack_kv8(cache, slots, ok[:4], ok[:4])
    with pytest.raises(ValueError, match="heads/dims"):
        kv8_flash.unpack_kv8(cache, slots, torch.empty(8, 1, 64), ok)


@pytest.mark.skipif(**requires_kernels)
@pytest.mark.parametrize("rotated", [False, True], ids=["plain", "rotated"])
@pytest.mark.parametrize("case", CASES + OUTLIER_CASES, ids=[c.name for c in CASES + OUTLIER_CASES])
def test_flash_route_matches_the_exact_op(case, rotated):
    batch = make_kv8_inputs(case, rotated)
    q_before = batch["q_extend"].clone()
    out = run(batch)
    assert torch.equal(batch["q_extend"], q_before), "q was modified"
    assert torch.isfinite(out).all(), "a row was left unwritten or is not finite"
    cos, rel_l1 = attention_error(out, batch["exact"], request_rows=batch["qo_indptr"])
    print(f"\nACCURACY kv8_flash_{case.name} rotated={rotated} cos={cos:.6f} rel_l1={rel_l1:.4f}")
    min_cos, max_l1 = VS_EXACT_QK_CHANNELS[rotated] if case.values == "qk_channels" else VS_EXACT
    assert cos >= min_cos and rel_l1 <= max_l1, f"vs fp32: {cos:.6f} / {rel_l1:.4f}"


@pytest.mark.skipif(**requires_kernels)
@pytest.mark.parametrize("case", OUTLIER_CASES, ids=[c.name for c in OUTLIER_CASES])
def test_flash_route_is_no_further_from_fp32_than_the_8bit_kernel(case):
    """It reads the same cache without quantizing Q or P: never the worse of the two."""
    batch = make_kv8_inputs(case)
    int8 = torch.empty_like(batch["o_extend"])
    sage_extend_attention_kv8_ref(
        batch["q_extend"], int8, batch["cache"], batch["qo_indptr"], batch["kv_indptr"],
        batch["kv_indices"], batch["max_len_extend"],
    )  # fmt: skip
    rows = batch["qo_indptr"]
    flash_err = attention_error(run(batch), batch["exact"], request_rows=rows)
    int8_err = attention_error(int8, batch["exact"], request_rows=rows)
    assert flash_err[0] >= int8_err[0] - 1e-6 and flash_err[1] <= int8_err[1] + 1e-6


@pytest.mark.skipif(**requires_kernels)
def test_a_workspace_that_fits_is_reused_and_a_small_one_replaced():
    case = ExtendCase("two", (30, 10), (20, 5), 8, 2, page_size=16)
    batch = make_kv8_inputs(case)
    first = run(batch)
    big = kv8_flash.workspace_for(None, 1000, batch["q_extend"], batch["cache"])
    assert torch.equal(run(batch, workspace=big), first)
    used = kv8_flash.flash_prefill_kv8(
        batch["q_extend"], torch.empty_like(first), batch["cache"],
        qo_indptr=batch["qo_indptr"], kv_indptr=batch["kv_indptr"],
        kv_indices=batch["kv_indices"], max_len_extend=20, max_len_kv=50,
        sm_scale=64**-0.5, attention=dense_attention_ref, workspace=big,
    )  # fmt: skip
    assert used is big
    small = kv8_flash.workspace_for(None, 3, batch["q_extend"], batch["cache"])
    assert not small.fits(65, batch["q_extend"], batch["cache"])
    assert torch.equal(run(batch, workspace=small), first)


def test_budget_groups_never_split_a_request():
    lens = [10, 30, 5, 40, 1]
    assert budget_groups([0, 1, 2, 3, 4], lens, 45) == [[0, 1, 2], [3, 4]]
    assert budget_groups([1, 3], lens, 70) == [[1, 3]]
    assert budget_groups([], lens, 45) == []
    with pytest.raises(ValueError, match="exceeds the 35-token workspace"):
        budget_groups([3], lens, 35)
    assert kv8_flash.budget_tokens(4096) == kv8_flash.MIN_BUDGET_TOKENS
    assert kv8_flash.budget_tokens(131072) == 131072


@pytest.mark.skipif(FLASH_HERE is None, reason="needs a GPU where FlashAttention-3/4 loads")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES[:5] + OUTLIER_CASES[:2], ids=lambda c: c.name)
def test_real_flash_attention_matches_the_twin(case, dtype):
    batch = make_kv8_inputs(case)
    batch["q_extend"] = batch["q_extend"].to(dtype)
    batch["o_extend"] = batch["o_extend"].to(dtype)
    got = run(batch, attention=kv8_flash.flash_attention(FLASH_HERE))
    want = run(batch)
    assert torch.isfinite(got).all()
    cos, rel_l1 = attention_error(got, want, request_rows=batch["qo_indptr"])
    assert cos >= VS_FLASH_TWIN[0] and rel_l1 <= VS_FLASH_TWIN[1], (cos, rel_l1)
    assert torch.equal(got, run(batch, attention=kv8_flash.flash_attention(FLASH_HERE)))
