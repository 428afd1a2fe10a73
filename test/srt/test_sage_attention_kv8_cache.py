"""kv8_cache.py: the 8-bit KV-cache format and its write kernel, against the torch twin.

Thresholds: the kernel writes the twin's bytes (an INT8 value at a rounding tie may
land one step away, the GPU's fast division permitting; scales to fp32 rounding);
a round trip reconstructs each key and value to within half an INT8 step of its
own row's scale. Every page size stores the same bytes per token: the page layout
only moves them.
"""

from __future__ import annotations

import pytest
import torch
from sage_attention_inputs import DEVICE, HAS_GPU, requires_kernels

from sglang.srt.layers.attention.sage_attention.kv8_cache import (
    allocate_kv8_cache,
    dequantize_kv8,
    kv8_bytes_per_token_head,
    kv8_token_rows,
    reconstruct_keys,
    set_kv8_token_rows,
    tma_can_read,
    write_kv8,
    write_kv8_ref,
)
from sglang.srt.layers.attention.sage_attention.rotation import hadamard_matrix


def _batch(num_tokens, num_kv_heads, head_dim, num_slots, seed=0, k_bias=0.0):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen)
    k += k_bias * torch.randn(num_kv_heads, head_dim, generator=gen)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen)
    loc = torch.randperm(num_slots - 1, generator=gen)[:num_tokens] + 1  # scrambled, slot 0 unused
    return k.half().to(DEVICE), v.half().to(DEVICE), loc.to(DEVICE)


def _cache(num_slots, num_kv_heads, head_dim, k, rotated, page_size=1):
    mean = k.float().mean(0)  # a calibration mean; any fixed vector is valid
    if rotated:
        mean = mean @ hadamard_matrix(head_dim, device=mean.device)
    return allocate_kv8_cache(
        num_slots, num_kv_heads, head_dim, head_dim, DEVICE, k_mean=mean, rotated=rotated,
        page_size=page_size,
    )  # fmt: skip


def test_bytes_per_token_head_are_about_half_of_bf16():
    assert kv8_bytes_per_token_head(128, 128) == 264  # 2.06 D against bf16's 4 D
    assert kv8_bytes_per_token_head(64, 64) == 136  # 2.13 D


def test_page_layout_shapes_and_bad_page_sizes():
    cache = allocate_kv8_cache(100, 2, 128, 64, "cpu", page_size=16)
    assert cache.page_size == 16 and cache.num_slots == 112  # whole pages
    assert tuple(cache.k_int8.shape) == (7, 2, 16, 128)
    assert tuple(cache.v_int8.shape) == (7, 2, 64, 16)  # V transposed within its page
    assert tuple(cache.k_scale.shape) == tuple(cache.v_scale.shape) == (7, 2, 16)
    for bad in (0, 3, 48, 512):
        with pytest.raises(ValueError, match="powers of two"):
            allocate_kv8_cache(100, 2, 128, 64, "cpu", page_size=bad)


def test_tma_reads_only_layers_its_int32_coordinates_reach():
    """Past 2^31 rows (here Vᵀ's: 16 per slot at 8 KV heads, hd128, pages of 64) the
    whole-page reads fall back to plain loads, which address in int64."""
    cpu = torch.device("cpu")
    assert tma_can_read(allocate_kv8_cache(2**27 - 64, 8, 128, 128, "meta", page_size=64), cpu)
    assert not tma_can_read(allocate_kv8_cache(2**27, 8, 128, 128, "meta", page_size=64), cpu)


@pytest.mark.parametrize("page_size", [1, 4, 64])
def test_token_rows_round_trip_through_pages(page_size):
    """The torch accessors are each other's inverse and place a token at its page's
    offset: V's channel d of slot s is byte (d, s % P) of page s // P."""
    cache = allocate_kv8_cache(300, 3, 64, 32, "cpu", page_size=page_size)
    slots = torch.randperm(300)[:50]
    rows = (
        torch.randint(-127, 128, (50, 3, 64), dtype=torch.int8),
        torch.rand(50, 3),
        torch.randint(-127, 128, (50, 3, 32), dtype=torch.int8),
        torch.rand(50, 3),
    )
    set_kv8_token_rows(cache, slots, rows)
    for got, want in zip(kv8_token_rows(cache, slots), rows, strict=True):
        assert torch.equal(got, want)
    s = int(slots[7])
    page, offset = divmod(s, page_size)
    assert torch.equal(cache.v_int8[page, 2, :, offset], rows[2][7, 2])
    assert torch.equal(cache.k_int8[page, 1, offset], rows[0][7, 1])


@pytest.mark.skipif(**requires_kernels)
@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("rotated", [False, True], ids=["plain", "rotated"])
@pytest.mark.parametrize("num_kv_heads, head_dim", [(1, 64), (2, 128), (8, 64)])
def test_write_matches_twin_and_touches_only_its_slots(num_kv_heads, head_dim, rotated, page_size):
    k, v, loc = _batch(77, num_kv_heads, head_dim, num_slots=200, k_bias=5.0)
    got = _cache(200, num_kv_heads, head_dim, k, rotated, page_size)
    want = _cache(200, num_kv_heads, head_dim, k, rotated, page_size)
    k_before, v_before = k.clone(), v.clone()
    write_kv8(got, loc, k, v)
    write_kv8_ref(want, loc, k, v)
    assert torch.equal(k, k_before) and torch.equal(v, v_before), "inputs were modified"

    for name in ("k_int8", "v_int8"):
        diff = (getattr(got, name).int() - getattr(want, name).int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3, name
    for name in ("k_scale", "v_scale"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-5, atol=0)
    untouched = torch.ones(got.num_slots, dtype=torch.bool, device=DEVICE)
    untouched[loc] = False
    other_slots = untouched.nonzero()[:, 0]
    assert not any(rows.any() for rows in kv8_token_rows(got, other_slots))
    # The same tokens at page size 1 are the same bytes.
    flat = _cache(200, num_kv_heads, head_dim, k, rotated)
    write_kv8_ref(flat, loc, k, v)
    for paged, token_major in zip(
        kv8_token_rows(want, loc), kv8_token_rows(flat, loc), strict=True
    ):
        assert torch.equal(paged, token_major)


@pytest.mark.skipif(**requires_kernels)
@pytest.mark.parametrize("rotated", [False, True], ids=["plain", "rotated"])
def test_round_trip_is_within_half_a_step(rotated):
    k, v, loc = _batch(64, 2, 128, num_slots=100, k_bias=10.0)
    cache = _cache(100, 2, 128, k, rotated)
    write_kv8(cache, loc, k, v)
    _, v_back = dequantize_kv8(cache, loc)
    k_back = reconstruct_keys(cache, loc)
    # Half a step of each row's own scale (the rotation spreads a step over D channels:
    # its error is orthogonal, the same in norm, so the bound holds per row in L2).
    _, k_scale, _, v_scale = kv8_token_rows(cache, loc)
    k_step, v_step = k_scale[..., None], v_scale[..., None]
    k_err = (k_back - k.float()).norm(dim=-1, keepdim=True)
    assert (k_err <= 0.5 * k_step * 128**0.5 * 1.0001).all()
    assert ((v_back - v.float()).abs() <= 0.5 * v_step * 1.0001).all()


@pytest.mark.skipif(**requires_kernels)
def test_smoothing_keeps_keys_with_a_channel_bias():
    """A 10-sigma per-channel offset: with its mean subtracted the keys keep their
    detail; without, every key's scale is set by the offset."""
    k, v, loc = _batch(64, 2, 128, num_slots=100, k_bias=10.0)
    errors = {}
    for smooth in (True, False):
        cache = _cache(100, 2, 128, k, rotated=False)
        if not smooth:
            cache.k_mean.zero_()
        write_kv8(cache, loc, k, v)
        errors[smooth] = (reconstruct_keys(cache, loc) - k.float()).abs().mean().item()
    assert errors[False] > 4 * errors[True], errors


@pytest.mark.skipif(**requires_kernels)
def test_empty_write_launches_nothing_and_bad_input_raises():
    cache = allocate_kv8_cache(10, 1, 64, 64, DEVICE)
    empty = torch.zeros(0, 1, 64, dtype=torch.float16, device=DEVICE)
    write_kv8(cache, torch.zeros(0, dtype=torch.int64, device=DEVICE), empty, empty)
    assert not cache.k_scale.any()
    with pytest.raises(ValueError, match="do not match"):
        write_kv8(cache, torch.zeros(2, dtype=torch.int64, device=DEVICE), empty, empty)
    with pytest.raises(ValueError, match="k_mean"):
        allocate_kv8_cache(10, 1, 64, 64, DEVICE, k_mean=torch.zeros(2, 64))


@pytest.mark.skipif(not HAS_GPU, reason="a cache of more than 2^31 elements needs a GPU")
@pytest.mark.parametrize("page_size", [1, 64])
def test_slot_ids_beyond_two_to_the_31_elements(page_size):
    num_slots = 2**31 // 64 + 1024  # one KV head of 64: the last slots sit past 2^31 bytes
    cache = allocate_kv8_cache(num_slots, 1, 64, 64, "cuda", page_size=page_size)
    k = torch.randn(4, 1, 64, dtype=torch.float16, device="cuda")
    loc = torch.tensor([1, num_slots - 3, num_slots - 2, num_slots - 1], device="cuda")
    write_kv8(cache, loc, k, k)
    want = allocate_kv8_cache(8, 1, 64, 64, "cuda")
    write_kv8_ref(want, torch.arange(4, device="cuda"), k, k)
    for got, twin in zip(
        kv8_token_rows(cache, loc), kv8_token_rows(want, torch.arange(4)), strict=True
    ):
        assert torch.equal(got, twin)
