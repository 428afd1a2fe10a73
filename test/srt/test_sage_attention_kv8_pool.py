"""kv8_pool.py: sage_attn's 8-bit cache as an SGLang token-to-KV pool.

The pool must hold exactly the bytes the memory planner is told (``kv8_cell_bytes``),
write through the one write kernel of ``kv8_cache.py`` (bytes equal to its twin,
inputs untouched), report int8 storage so no bf16 fast path picks it up, and keep
retraction's CPU copy whole (the scales travel with the INT8 rows).
"""

from __future__ import annotations

import logging

import pytest
import torch
from sage_attention_inputs import DEVICE, requires_kernels

from sglang.srt.layers.attention.sage_attention.kv8_cache import (
    allocate_kv8_cache,
    set_kv8_token_rows,
    write_kv8_ref,
)
from sglang.srt.layers.attention.sage_attention.kv8_pool import (
    SageKV8TokenToKVPool,
    kv8_cell_bytes,
)
from sglang.srt.layers.radix_attention import RadixAttention

SLOTS, HEADS, HEAD_DIM, LAYERS = 40, 2, 64, 3


def make_pool(monkeypatch, rotation="auto", head_dim=HEAD_DIM, page_size=1):
    monkeypatch.setenv("SGLANG_SAGE_ATTN_QK_ROTATION", rotation)
    return SageKV8TokenToKVPool(
        size=SLOTS, page_size=page_size, dtype=torch.float16, head_num=HEADS, head_dim=head_dim,
        layer_num=LAYERS, device=DEVICE, enable_memory_saver=False, enable_alt_stream=False,
    )  # fmt: skip


@pytest.mark.parametrize("page_size", [1, 16])
def test_pool_holds_the_bytes_the_planner_counts(monkeypatch, page_size):
    pool = make_pool(monkeypatch, page_size=page_size)
    k_bytes, v_bytes = pool.get_kv_size_bytes()
    k_mean_bytes = LAYERS * HEADS * HEAD_DIM * 4
    per_token = kv8_cell_bytes(LAYERS, HEADS, HEAD_DIM, HEAD_DIM)
    assert per_token == LAYERS * HEADS * (2 * HEAD_DIM + 8)
    # Slot 0's page pads the pool, as SGLang's bf16 pool is padded; whole pages.
    padded_slots = -(-(SLOTS + page_size) // page_size) * page_size
    assert k_bytes + v_bytes - k_mean_bytes == padded_slots * per_token
    assert pool.kv8_cache(0).page_size == page_size
    # bf16 at hd128 holds 512 B per token and head; this pool 264 (1.94x the tokens).
    assert 512 / kv8_cell_bytes(1, 1, 128, 128) == pytest.approx(1.939, abs=1e-3)


def test_pool_reports_int8_storage_and_follows_the_rotation_setting(monkeypatch):
    pool = make_pool(monkeypatch)
    assert pool.dtype == torch.int8 and pool.store_dtype == torch.int8
    assert pool.model_dtype == torch.float16
    assert pool.rotated  # "auto" rotates head dim 64
    assert pool.get_key_buffer(0).dtype == torch.int8  # never viewed as the model dtype
    assert not make_pool(monkeypatch, rotation="none").rotated
    assert not make_pool(monkeypatch, head_dim=128).rotated
    # Smoothing: calibrated at start-up unless the setting says zeros.
    assert pool.needs_calibration
    monkeypatch.setenv("SGLANG_SAGE_ATTN_KV_SMOOTHING", "none")
    assert not make_pool(monkeypatch).needs_calibration


def test_pool_refuses_page_sizes_the_format_cannot_hold(monkeypatch):
    with pytest.raises(ValueError, match="powers of two"):
        make_pool(monkeypatch, page_size=48)


def test_value_buffer_view_has_the_value_head_dim_last(monkeypatch):
    """SGLang's Triton backend sizes its decode scratch from the value buffer's last dim."""
    pool = make_pool(monkeypatch, page_size=16)
    assert pool.get_value_buffer(0).shape[-1] == HEAD_DIM
    assert pool.get_value_buffer(0).data_ptr() == pool.kv8_cache(0).v_int8.data_ptr()


@pytest.mark.skipif(**requires_kernels)
@pytest.mark.parametrize("page_size", [1, 16])
def test_set_kv_buffer_writes_the_twins_bytes_and_leaves_inputs_alone(monkeypatch, page_size):
    pool = make_pool(monkeypatch, page_size=page_size)
    layer = RadixAttention(4, HEAD_DIM, HEAD_DIM**-0.5, HEADS, layer_id=1)
    pool.k_mean[1].copy_(torch.randn(HEADS, HEAD_DIM))
    loc = torch.tensor([5, 17, 3, 39], device=DEVICE)
    k = torch.randn(4, HEADS * HEAD_DIM, dtype=torch.float16, device=DEVICE)
    v = torch.randn(4, HEADS * HEAD_DIM, dtype=torch.float16, device=DEVICE)
    k_before, v_before = k.clone(), v.clone()
    pool.set_kv_buffer(layer, loc, k, v)
    assert torch.equal(k, k_before) and torch.equal(v, v_before)

    twin = allocate_kv8_cache(SLOTS + page_size, HEADS, HEAD_DIM, HEAD_DIM, DEVICE,
                              k_mean=pool.k_mean[1].clone(), rotated=True,
                              page_size=page_size)  # fmt: skip
    write_kv8_ref(twin, loc, k.view(4, HEADS, HEAD_DIM), v.view(4, HEADS, HEAD_DIM))
    cache = pool.kv8_cache(1)
    for got, want in ((cache.k_int8, twin.k_int8), (cache.v_int8, twin.v_int8)):
        assert (got.int() - want.int()).abs().max() <= 1  # fp32 division order
    torch.testing.assert_close(cache.k_scale, twin.k_scale)
    torch.testing.assert_close(cache.v_scale, twin.v_scale)
    assert pool.kv8_cache(0).k_scale.abs().sum() == 0  # other layers untouched
    with pytest.raises(ValueError, match="unscaled"):
        pool.set_kv_buffer(layer, loc, k, v, k_scale=2.0)


@pytest.mark.skipif(**requires_kernels)
@pytest.mark.parametrize("page_size", [1, 16])
def test_retraction_cpu_copy_restores_rows_and_scales(monkeypatch, page_size):
    pool = make_pool(monkeypatch, page_size=page_size)
    layer = RadixAttention(4, HEAD_DIM, HEAD_DIM**-0.5, HEADS, layer_id=2)
    loc = torch.arange(6, 30, device=DEVICE)  # across a page boundary at 16
    k = torch.randn(24, HEADS, HEAD_DIM, dtype=torch.float16, device=DEVICE)
    pool.set_kv_buffer(layer, loc, k, k * 3)
    saved = pool.get_cpu_copy(loc)
    cache = pool.kv8_cache(2)
    before = [t.clone() for t in (cache.k_int8, cache.v_int8, cache.k_scale, cache.v_scale)]
    set_kv8_token_rows(cache, loc, [torch.zeros_like(rows) for rows in saved[2]])
    assert not cache.k_scale.any()
    pool.load_cpu_copy(saved, loc)
    after = (cache.k_int8, cache.v_int8, cache.k_scale, cache.v_scale)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


@pytest.mark.parametrize(
    "page_size, says",
    [(64, "pages of 64 tokens (decode reads whole pages)"), (1, "--page-size 64 reads whole")],
)
def test_start_up_log_names_the_page_size_and_how_decode_reads(
    monkeypatch, caplog, page_size, says
):
    with caplog.at_level(logging.INFO, logger=SageKV8TokenToKVPool.__module__):
        make_pool(monkeypatch, page_size=page_size)
    assert says in caplog.text, caplog.text


@pytest.mark.skipif(**requires_kernels)
def test_slots_from_sglangs_paged_allocator_are_read_whole_by_decode(monkeypatch):
    """The whole-page decode relies on SGLang's paged allocator putting a request's
    token i at offset i % page_size (its own debug check): after a shuffled free list,
    two extends and a decode step, every slot obeys it and the decode over them
    matches its twin."""
    from sglang.srt.layers.attention.sage_attention.decode_kv8 import (
        how_decode_reads,
        sage_decode_kv8,
    )
    from sglang.srt.layers.attention.sage_attention.kv8_reference import sage_decode_kv8_ref
    from sglang.srt.layers.attention.sage_attention.reference import attention_error
    from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator

    page_size, lens = 16, [(5, 30), (16, 1), (37, 20)]  # (first chunk, second chunk)
    pool = SageKV8TokenToKVPool(
        size=page_size * 24, page_size=page_size, dtype=torch.float16, head_num=HEADS,
        head_dim=HEAD_DIM, layer_num=1, device=DEVICE, enable_memory_saver=False,
        enable_alt_stream=False,
    )  # fmt: skip
    allocator = PagedTokenToKVPoolAllocator(
        size=page_size * 24, page_size=page_size, dtype=torch.float16, device=DEVICE,
        kvcache=pool, need_sort=False,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    allocator.free_pages = allocator.free_pages[torch.randperm(24, generator=gen).to(DEVICE)]
    slots = [torch.zeros(0, dtype=torch.int64, device=DEVICE) for _ in lens]

    def tensor(values):
        return torch.tensor(values, dtype=torch.int64, device=DEVICE)

    for chunk in range(2):
        prefix = [len(s) for s in slots]
        seq = [p + n[chunk] for p, n in zip(prefix, lens, strict=True)]
        last = [int(s[-1]) if len(s) else -1 for s in slots]
        new = allocator.alloc_extend(
            tensor(prefix), tensor(prefix).cpu(), tensor(seq), tensor(seq).cpu(),
            tensor(last), sum(seq) - sum(prefix),
        )  # fmt: skip
        slots = list(map(torch.cat, zip(slots, new.split([n[chunk] for n in lens]), strict=True)))
    seq = tensor([len(s) + 1 for s in slots])
    new = allocator.alloc_decode(seq, seq.cpu(), tensor([int(s[-1]) for s in slots]))
    slots = [torch.cat([s, new[b : b + 1]]) for b, s in enumerate(slots)]
    for s in slots:
        assert torch.equal(s % page_size, torch.arange(len(s), device=DEVICE) % page_size)

    every_slot = torch.cat(slots)
    layer = RadixAttention(4, HEAD_DIM, HEAD_DIM**-0.5, HEADS, layer_id=0)
    k = torch.randn(len(every_slot), HEADS * HEAD_DIM, generator=gen).half().to(DEVICE)
    pool.set_kv_buffer(layer, every_slot, k, torch.randn_like(k))
    cache = pool.kv8_cache(0)
    assert how_decode_reads(cache, torch.device(DEVICE))[0]
    indptr = torch.tensor([0, *seq.cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    q = torch.randn(len(lens), 4, HEAD_DIM, generator=gen).half().to(DEVICE)
    out, twin = torch.empty_like(q), torch.empty_like(q)
    logits = torch.empty(len(lens), 4, 2, HEAD_DIM, device=DEVICE)
    lse = torch.empty(len(lens), 4, 2, device=DEVICE)
    splits = torch.full((len(lens),), 2, dtype=torch.int32, device=DEVICE)
    sage_decode_kv8(q, out, cache, indptr, every_slot, logits, lse, splits, 2)
    sage_decode_kv8_ref(q, twin, cache, indptr, every_slot)
    assert attention_error(out, twin)[0] >= 0.99999
