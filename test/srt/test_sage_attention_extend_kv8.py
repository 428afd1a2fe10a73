"""extend_kv8.py: prefill / chunked prefill over the 8-bit KV cache.

Thresholds (cosine similarity / relative L1 of the whole output):
- vs the exact fp32 op on the original, unquantized K/V: cos >= 0.9995, rel-L1 <= 0.03
  on random inputs and on outliers (10-sigma per-channel K bias with 8x Q channels; an
  attention sink), with the keys' mean as the smoothing vector. Four large channels
  shared by Q and K ("qk_channels", which smoothing cannot remove): cos >= 0.999
  plain, >= 0.9995 with the Hadamard rotation. Measured on the CPU interpreter:
  random >= 0.99993 / <= 0.012; K bias 0.99962 / 0.025 plain, 0.99989 / 0.014
  rotated; sink >= 0.99995 / <= 0.010; qk_channels 0.99916 / 0.017 plain, 0.99985 /
  0.0094 rotated.
- vs the twin (the kernel's INT8 Q and the dequantized cache, exact softmax): cos >=
  0.99999, rel-L1 <= 2e-3 (only exp2 and fp16-P rounding differ).
"""

from __future__ import annotations

import pytest
import torch
from sage_attention_inputs import (
    HAS_GPU,
    ExtendCase,
    huge_kv8_cache,
    make_kv8_inputs,
    requires_kernels,
)

from sglang.srt.layers.attention.sage_attention import extend_kv8
from sglang.srt.layers.attention.sage_attention.extend_kv8 import sage_extend_attention_kv8
from sglang.srt.layers.attention.sage_attention.kv8_cache import kv8_read_plan
from sglang.srt.layers.attention.sage_attention.kv8_reference import (
    sage_extend_attention_kv8_ref,
)
from sglang.srt.layers.attention.sage_attention.reference import attention_error

# (cos of the worst request and head, rel-L1) against fp32. Large channels shared by Q
# and K survive smoothing: 0.9975 unrotated, 0.9992 rotated (test_rotation's case).
VS_EXACT = (0.9995, 0.03)
VS_EXACT_QK_CHANNELS = {False: (0.997, 0.03), True: (0.999, 0.03)}
VS_TWIN = (0.99999, 2e-3)
# INT8 P·V on outlier inputs: the prefill issue's bar (FP16 P·V: 0.99953 / 0.027 on
# k_bias_hd128, INT8: 0.99939 / 0.030).
VS_EXACT_INT8_PV_OUTLIER = (0.999, 0.04)

CASES = [
    ExtendCase("ragged_gqa4", (0, 70, 5), (33, 1, 90), num_q_heads=8, num_kv_heads=2),
    ExtendCase("prefix_off_tile_paged", (77,), (50,), page_size=16),
    ExtendCase("zero_length_chunks", (10, 20, 0), (0, 16, 5)),
    ExtendCase("hd128_gqa8", (200,), (70,), num_q_heads=8, num_kv_heads=1, head_dim=128),
    ExtendCase("mha_two_q_blocks", (130,), (150,), num_q_heads=2, num_kv_heads=2),
    # A group that is not a power of two (padded rows), and an MQA group that needs
    # 128-row programs (one token each).
    ExtendCase("gqa3", (40, 0), (70, 20), num_q_heads=6, num_kv_heads=2),
    ExtendCase("mqa66", (30,), (20,), num_q_heads=66, num_kv_heads=1),
    # Page-major caches: chunks that start mid-page, fill one, and span several.
    ExtendCase("pages64", (100, 0, 64), (40, 64, 1), 8, 2, page_size=64),
    ExtendCase("pages128_hd128", (130,), (90,), 8, 1, head_dim=128, page_size=128),
]
OUTLIER_CASES = [
    ExtendCase(f"{values}_hd{d}", (100, 37), (60, 150), 8, 2, head_dim=d, values=values)
    for values in ("k_bias", "sink", "qk_channels")
    for d in (64, 128)
]


def _inputs(batch: dict) -> list[torch.Tensor]:
    cache = batch["cache"]
    return [batch[name] for name in ("q_extend", "qo_indptr", "kv_indptr", "kv_indices")] + [
        cache.k_int8,
        cache.k_scale,
        cache.v_int8,
        cache.v_scale,
        cache.k_mean,
    ]


def run(batch: dict, causal: bool = True, pv_int8: bool | None = None) -> torch.Tensor:
    """The Triton kernel ("gluon" would run the Hopper kernel, whose tests are
    test_sage_attention_hopper_kv8.py's)."""
    out = batch["o_extend"].clone()
    sage_extend_attention_kv8(
        batch["q_extend"], out, batch["cache"], batch["qo_indptr"], batch["kv_indptr"],
        batch["kv_indices"], batch["max_len_extend"], causal=causal, pv_int8=pv_int8,
        kernel="triton",
    )  # fmt: skip
    return out


@pytest.mark.skipif(**requires_kernels)
@pytest.mark.parametrize("rotated", [False, True], ids=["plain", "rotated"])
@pytest.mark.parametrize("case", CASES + OUTLIER_CASES, ids=[c.name for c in CASES + OUTLIER_CASES])
def test_extend_matches_exact_op_and_twin(case, rotated):
    batch = make_kv8_inputs(case, rotated)
    watched = _inputs(batch)
    before = [t.clone() for t in watched]
    out = run(batch)
    again = run(batch)
    twin = batch["o_extend"].clone()
    sage_extend_attention_kv8_ref(
        batch["q_extend"], twin, batch["cache"], batch["qo_indptr"], batch["kv_indptr"],
        batch["kv_indices"], batch["max_len_extend"],
    )  # fmt: skip
    assert torch.isfinite(out).all(), "a row was left unwritten or is not finite"
    assert torch.equal(out, again), "not bitwise deterministic"
    for old, new in zip(before, watched, strict=True):  # NaN-poisoned slots included
        torch.testing.assert_close(new, old, rtol=0, atol=0, equal_nan=True)
    cos, rel_l1 = attention_error(out, batch["exact"], request_rows=batch["qo_indptr"])
    print(f"\nACCURACY kv8_extend_{case.name} rotated={rotated} cos={cos:.6f} rel_l1={rel_l1:.4f}")
    min_cos, max_l1 = VS_EXACT_QK_CHANNELS[rotated] if case.values == "qk_channels" else VS_EXACT
    assert cos >= min_cos and rel_l1 <= max_l1, f"vs fp32: {cos:.6f} / {rel_l1:.4f}"
    twin_cos, twin_l1 = attention_error(out, twin)
    assert twin_cos >= VS_TWIN[0] and twin_l1 <= VS_TWIN[1], (twin_cos, twin_l1)


# INT8 P·V on a few shapes of each kind (pages, GQA, every outlier kind at hd128).
PV_INT8_CASES = [CASES[0], CASES[3], CASES[7]] + OUTLIER_CASES[1::2]


@pytest.mark.skipif(**requires_kernels)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", PV_INT8_CASES, ids=[c.name for c in PV_INT8_CASES])
def test_int8_pv_matches_its_twin_and_the_fp32_bars(case, causal):
    """INT8 P·V (P per row and tile) meets the bars FP16 P·V meets, and its twin."""
    batch = make_kv8_inputs(case)
    out = run(batch, causal, pv_int8=True)
    assert torch.equal(out, run(batch, causal, pv_int8=True)), "not bitwise deterministic"
    twin = batch["o_extend"].clone()
    sage_extend_attention_kv8_ref(
        batch["q_extend"], twin, batch["cache"], batch["qo_indptr"], batch["kv_indptr"],
        batch["kv_indices"], batch["max_len_extend"], causal=causal, pv_int8=True,
    )  # fmt: skip
    twin_cos, twin_l1 = attention_error(out, twin)
    assert twin_cos >= VS_TWIN[0] and twin_l1 <= VS_TWIN[1], (twin_cos, twin_l1)
    if causal:  # the fp32 reference of make_kv8_inputs is causal
        cos, rel_l1 = attention_error(out, batch["exact"], request_rows=batch["qo_indptr"])
        print(f"\nACCURACY kv8_extend_pv_int8_{case.name} cos={cos:.6f} rel_l1={rel_l1:.4f}")
        min_cos, max_l1 = {"randn": VS_EXACT, "qk_channels": VS_EXACT_QK_CHANNELS[False]}.get(
            case.values, VS_EXACT_INT8_PV_OUTLIER
        )
        assert cos >= min_cos and rel_l1 <= max_l1, f"vs fp32: {cos:.6f} / {rel_l1:.4f}"


@pytest.mark.skipif(**requires_kernels)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_whole_pages_read_the_same_through_tma_and_plain_loads(monkeypatch, causal):
    """Key tiles of one page each (page 64 here), through TMA boxes or plain loads:
    the same output, bit for bit; and the page size decides which reads run."""
    batch = make_kv8_inputs(next(c for c in CASES if c.name == "pages64"))
    cache, device = batch["cache"], batch["q_extend"].device
    whole_pages, tma, keys_per_step = kv8_read_plan(cache, device, extend_kv8.BLOCK_N, True)
    assert whole_pages and keys_per_step == 64 and (tma or HAS_GPU)  # TMA: sm_90+ or the CPU
    outputs = {}
    for use_tma in (True, False):
        monkeypatch.setattr(extend_kv8, "USE_TMA", use_tma)
        outputs[use_tma] = run(batch, causal)
    assert torch.isfinite(outputs[True]).all()
    assert torch.equal(outputs[True], outputs[False])


@pytest.mark.skipif(**requires_kernels)
def test_smoothing_is_what_handles_k_outliers():
    errors = {
        smooth: attention_error(*(lambda b: (run(b), b["exact"]))(
            make_kv8_inputs(OUTLIER_CASES[0], smooth=smooth)
        ))
        for smooth in (True, False)
    }  # fmt: skip
    assert errors[True][0] >= VS_EXACT[0], errors
    assert errors[False][0] < 0.999 and errors[False][1] > 3 * errors[True][1], errors


@pytest.mark.skipif(not HAS_GPU, reason="a cache of more than 2^31 elements needs a GPU")
def test_slots_beyond_two_to_the_31_elements():
    cache, slots, indptr = huge_kv8_cache(length=300)
    chunk = torch.randn(300, 4, 64, dtype=torch.float16, device="cuda")
    got, want = torch.empty_like(chunk), torch.empty_like(chunk)
    sage_extend_attention_kv8(chunk, got, cache, indptr, indptr, slots, 300)
    sage_extend_attention_kv8_ref(chunk, want, cache, indptr, indptr, slots, 300)
    assert attention_error(got, want)[0] >= VS_TWIN[0]


def test_groups_beyond_the_tile_are_refused():
    from sglang.srt.layers.attention.sage_attention.kv8_cache import allocate_kv8_cache

    cache = allocate_kv8_cache(8, 1, 64, 64, "cpu")
    q = torch.zeros(2, 130, 64, dtype=torch.float16)
    indptr = torch.tensor([0, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match="130 query heads per KV head"):
        sage_extend_attention_kv8(q, torch.empty_like(q), cache, indptr, indptr, torch.arange(2), 2)
