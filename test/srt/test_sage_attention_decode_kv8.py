"""decode_kv8.py: one decode step over the 8-bit KV cache.

Thresholds (cosine similarity / relative L1 of the whole output):
- vs the exact fp32 op on the original, unquantized K/V (``sage_extend_attention_ref``
  with one-token chunks): cos >= 0.9995, rel-L1 <= 0.03 on random inputs and on
  outliers (10-sigma per-channel K bias with 8x Q channels; an attention sink), with
  the K mean as smoothing vector. Measured on the H200 (INT8 query rows, plain and
  rotated K): random >= 0.99994 / <= 0.0103, K bias >= 0.99957 / <= 0.0284 (hd128
  unrotated; >= 0.99988 rotated), sink >= 0.99993 / <= 0.0117. Without the smoothing
  vector the K-bias case falls below 0.999 (test below).
- vs the twin (the extend twin with one-token chunks: the kernel's INT8 query rows,
  exact softmax over the dequantized cache): cos >= 0.99999, rel-L1 <= 2e-3 (left:
  exp2 and the fp16 P of P·V).
"""

from __future__ import annotations

import pytest
import torch
from sage_attention_inputs import (
    DEVICE,
    HAS_GPU,
    ExtendCase,
    huge_kv8_cache,
    make_kv8_inputs,
    requires_kernels,
)

from sglang.srt.layers.attention.sage_attention import decode_kv8
from sglang.srt.layers.attention.sage_attention.decode_kv8 import sage_decode_kv8
from sglang.srt.layers.attention.sage_attention.kv8_reference import sage_decode_kv8_ref
from sglang.srt.layers.attention.sage_attention.reference import attention_error

# Where the whole-page reads go through TMA: sm_90+, or the interpreter's emulation.
HAS_GPU_TMA = not HAS_GPU or torch.cuda.get_device_capability()[0] >= 9
# (cos of the worst request and head, rel-L1) against fp32. In decode that cosine rests
# on one output row: the outlier inputs (10-sigma K bias, sinks) reach 0.9986-0.9992.
VS_EXACT = (0.9995, 0.03)
VS_EXACT_OUTLIER = (0.998, 0.03)
VS_TWIN = (0.99999, 2e-3)
MAX_SPLITS = 4

CASES = [
    ExtendCase("mha_scrambled", (300, 77, 1000), (1, 1, 1), num_q_heads=2, num_kv_heads=2),
    ExtendCase("gqa4_paged", (129, 64, 33), (1, 1, 1), num_q_heads=8, num_kv_heads=2, page_size=16),
    ExtendCase("gqa8_hd128", (500, 1), (1, 1), num_q_heads=8, num_kv_heads=1, head_dim=128),
    ExtendCase("one_key", (0, 5), (1, 1), num_q_heads=4, num_kv_heads=1),
    ExtendCase("gqa3", (90, 17), (1, 1), num_q_heads=6, num_kv_heads=2),
    # Whole pages: a full page, one short of it, one past it, several pages.
    ExtendCase("page64_edges", (62, 63, 64, 199), (1,) * 4, 8, 2, page_size=64),
    ExtendCase("page128_hd128", (127, 300), (1, 1), 8, 1, head_dim=128, page_size=128),
    ExtendCase("page256", (255, 40), (1, 1), 4, 2, page_size=256),
    ExtendCase("page4_gathered", (30, 9), (1, 1), 4, 2, page_size=4),
]
OUTLIER_CASES = [
    ExtendCase(f"{values}_hd{d}", (400, 90), (1, 1), 8, 2, head_dim=d, values=values)
    for values in ("k_bias", "sink")
    for d in (64, 128)
] + [ExtendCase("k_bias_page64", (400, 90), (1, 1), 8, 2, values="k_bias", page_size=64)]


def decode_batch(case: ExtendCase, rotated: bool = False, smooth: bool = True):
    """The case's requests (one-token chunks) as a decode step over an 8-bit cache."""
    assert set(case.extend_lens) == {1}
    batch = make_kv8_inputs(case, rotated, smooth)
    names = ("q_extend", "cache", "kv_indptr", "kv_indices", "exact")
    return tuple(batch[name] for name in names)


def default_splits(batch: int) -> list[int]:
    return [1 + b % MAX_SPLITS for b in range(batch)]


def run_decode(q, cache, indptr, indices, splits=None, pv_int8=None):
    batch, num_heads = q.shape[:2]
    splits = splits or default_splits(batch)
    shape = (batch, num_heads, cache.head_dim_v)
    out = torch.full(shape, float("nan"), dtype=q.dtype, device=DEVICE)
    logits = torch.empty(batch, num_heads, MAX_SPLITS, cache.head_dim_v, device=DEVICE)
    lse = torch.empty(batch, num_heads, MAX_SPLITS, device=DEVICE)
    num_splits = torch.tensor(splits, dtype=torch.int32, device=DEVICE)
    sage_decode_kv8(
        q, out, cache, indptr, indices, logits, lse, num_splits, MAX_SPLITS, pv_int8=pv_int8
    )
    return out


def check(case, rotated=False, pv_int8=False):
    q, cache, indptr, indices, exact = decode_batch(case, rotated)
    out = run_decode(q, cache, indptr, indices, pv_int8=pv_int8)
    twin = torch.empty_like(out)
    splits = torch.tensor(default_splits(len(q)), dtype=torch.int32)
    sage_decode_kv8_ref(q, twin, cache, indptr, indices, pv_int8=pv_int8, num_kv_splits=splits)
    assert torch.isfinite(out).all()
    cos, rel_l1 = attention_error(out, exact, request_rows=indptr.new_tensor(range(len(q) + 1)))
    min_cos, max_l1 = VS_EXACT if case.values == "randn" else VS_EXACT_OUTLIER
    assert cos >= min_cos and rel_l1 <= max_l1, f"vs fp32: {cos:.6f} / {rel_l1:.4f}"
    twin_cos, twin_l1 = attention_error(out, twin)
    assert twin_cos >= VS_TWIN[0] and twin_l1 <= VS_TWIN[1], (twin_cos, twin_l1)
    tag = f"{case.name}{'_pv_int8' if pv_int8 else ''} rotated={rotated}"
    print(f"\nACCURACY kv8_decode_{tag} cos={cos:.6f} rel_l1={rel_l1:.4f}")


@pytest.mark.skipif(**requires_kernels)
@pytest.mark.parametrize("rotated", [False, True], ids=["plain", "rotated"])
@pytest.mark.parametrize("case", CASES + OUTLIER_CASES, ids=[c.name for c in CASES + OUTLIER_CASES])
def test_decode_matches_exact_op_and_twin(case, rotated):
    check(case, rotated)


# INT8 P·V: several splits, whole pages at 64/128, token by token, both outlier kinds.
PV_INT8_CASES = [CASES[0], CASES[5], CASES[6], CASES[8], OUTLIER_CASES[3], OUTLIER_CASES[4]]


@pytest.mark.skipif(**requires_kernels)
@pytest.mark.parametrize("case", PV_INT8_CASES, ids=[c.name for c in PV_INT8_CASES])
def test_int8_pv_decode_matches_its_twin_and_the_fp32_bars(case):
    check(case, pv_int8=True)


@pytest.mark.skipif(**requires_kernels)
def test_smoothing_is_what_handles_k_outliers():
    case = OUTLIER_CASES[0]
    errors = {}
    for smooth in (True, False):
        q, cache, indptr, indices, exact = decode_batch(case, smooth=smooth)
        errors[smooth] = attention_error(run_decode(q, cache, indptr, indices), exact)
    assert errors[True][0] >= VS_EXACT_OUTLIER[0], errors
    assert errors[False][0] < VS_EXACT_OUTLIER[0] and errors[False][1] > 3 * errors[True][1], errors


@pytest.mark.skipif(**requires_kernels)
@pytest.mark.parametrize("case", [CASES[0], CASES[5]], ids=lambda c: c.name)
def test_split_count_changes_only_rounding_and_runs_are_bitwise_repeatable(case):
    q, cache, indptr, indices, _ = decode_batch(case)
    batch = q.shape[0]
    before = (q.clone(), cache.k_int8.clone(), cache.v_int8.clone(), indices.clone())
    one = run_decode(q, cache, indptr, indices, splits=[1] * batch)
    four = run_decode(q, cache, indptr, indices, splits=[4] * batch)
    again = run_decode(q, cache, indptr, indices, splits=[4] * batch)
    assert torch.equal(four, again)
    cos, rel_l1 = attention_error(four, one)
    assert cos >= 0.999999 and rel_l1 <= 1e-3
    after = (q, cache.k_int8, cache.v_int8, indices)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)), "inputs modified"


@pytest.mark.skipif(**requires_kernels)
def test_whole_pages_read_the_same_through_tma_and_plain_loads(monkeypatch):
    """From page size 16 the kernel reads whole pages; TMA boxes carry the bytes of a
    page's tokens outside the split too, which the scores mask: the same output."""
    case = next(c for c in CASES if c.name == "page64_edges")
    q, cache, indptr, indices, _ = decode_batch(case)
    assert decode_kv8.how_decode_reads(cache, q.device) == (True, HAS_GPU_TMA)
    outputs = {}
    for use_tma in (True, False):
        monkeypatch.setattr(decode_kv8, "USE_TMA", use_tma)
        assert decode_kv8.how_decode_reads(cache, q.device)[1] == (use_tma and HAS_GPU_TMA)
        outputs[use_tma] = run_decode(q, cache, indptr, indices)
    assert torch.equal(outputs[True], outputs[False])
    small = next(c for c in CASES if c.name == "page4_gathered")
    assert decode_kv8.how_decode_reads(decode_batch(small)[1], q.device) == (False, False)


@pytest.mark.skipif(not HAS_GPU, reason="the PTX conversion runs on a GPU only")
@pytest.mark.parametrize("case", [CASES[1], OUTLIER_CASES[-1]], ids=lambda c: c.name)
def test_where_v_is_converted_changes_only_rounding(case, monkeypatch):
    """CVT_IN_ROWS (V converted in its loaded rows, transposed as fp16) against the
    conversion in P·V's operand layout: the same products, another layout."""
    q, cache, indptr, indices, _ = decode_batch(case)
    outputs = {}
    for in_rows in (True, False):
        monkeypatch.setattr(decode_kv8, "CVT_IN_ROWS", in_rows)
        outputs[in_rows] = run_decode(q, cache, indptr, indices)
    cos, rel_l1 = attention_error(outputs[True], outputs[False])
    assert cos >= 0.999999 and rel_l1 <= 1e-3, (cos, rel_l1)


@pytest.mark.skipif(not HAS_GPU, reason="a cache of more than 2^31 elements needs a GPU")
@pytest.mark.parametrize("page_size", [1, 64])
def test_slots_beyond_two_to_the_31_elements(page_size):
    cache, slots, indptr = huge_kv8_cache(page_size=page_size)
    q = torch.randn(1, 4, 64, dtype=torch.float16, device="cuda")
    out = run_decode(q, cache, indptr, slots, splits=[3])
    twin = torch.empty_like(out)
    sage_decode_kv8_ref(q, twin, cache, indptr, slots)
    assert attention_error(out, twin)[0] >= VS_TWIN[0]
