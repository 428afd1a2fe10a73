"""kv8_pool.py: sage_attn's 8-bit cache as an SGLang token-to-KV pool.

The pool must hold exactly the bytes the memory planner is told (``kv8_cell_bytes``),
write through the one write kernel of ``kv8_cache.py`` (bytes equal to its twin,
inputs untouched), report int8 storage so no bf16 fast path picks it up, and keep
retraction's CPU copy whole (the scales travel with the INT8 rows).
"""

from __future__ import annotations

import pytest
import torch
from sage_attention_inputs import DEVICE, requires_kernels

from sglang.srt.layers.attention.sage_attention.kv8_cache import allocate_kv8_cache, write_kv8_ref
from sglang.srt.layers.attention.sage_attention.kv8_pool import (
    SageKV8TokenToKVPool,
    kv8_cell_bytes,
)
from sglang.srt.layers.radix_attention import RadixAttention

SLOTS, HEADS, HEAD_DIM, LAYERS = 40, 2, 64, 3


def make_pool(monkeypatch, rotation="auto", head_dim=HEAD_DIM):
    monkeypatch.setenv("SGLANG_SAGE_ATTN_QK_ROTATION", rotation)
    return SageKV8TokenToKVPool(
        size=SLOTS, page_size=1, dtype=torch.float16, head_num=HEADS, head_dim=head_dim,
        layer_num=LAYERS, device=DEVICE, enable_memory_saver=False, enable_alt_stream=False,
    )  # fmt: skip


def test_pool_holds_the_bytes_the_planner_counts(monkeypatch):
    pool = make_pool(monkeypatch)
    k_bytes, v_bytes = pool.get_kv_size_bytes()
    k_mean_bytes = LAYERS * HEADS * HEAD_DIM * 4
    per_token = kv8_cell_bytes(LAYERS, HEADS, HEAD_DIM, HEAD_DIM)
    assert per_token == LAYERS * HEADS * (2 * HEAD_DIM + 8)
    # Slot 0's page pads the pool, as SGLang's bf16 pool is padded.
    assert k_bytes + v_bytes - k_mean_bytes == (SLOTS + 1) * per_token
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


@pytest.mark.skipif(**requires_kernels)
def test_set_kv_buffer_writes_the_twins_bytes_and_leaves_inputs_alone(monkeypatch):
    pool = make_pool(monkeypatch)
    layer = RadixAttention(4, HEAD_DIM, HEAD_DIM**-0.5, HEADS, layer_id=1)
    pool.k_mean[1].copy_(torch.randn(HEADS, HEAD_DIM))
    loc = torch.tensor([5, 17, 3, 39], device=DEVICE)
    k = torch.randn(4, HEADS * HEAD_DIM, dtype=torch.float16, device=DEVICE)
    v = torch.randn(4, HEADS * HEAD_DIM, dtype=torch.float16, device=DEVICE)
    k_before, v_before = k.clone(), v.clone()
    pool.set_kv_buffer(layer, loc, k, v)
    assert torch.equal(k, k_before) and torch.equal(v, v_before)

    twin = allocate_kv8_cache(SLOTS + 1, HEADS, HEAD_DIM, HEAD_DIM, DEVICE,
                              k_mean=pool.k_mean[1].clone(), rotated=True)  # fmt: skip
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
def test_retraction_cpu_copy_restores_rows_and_scales(monkeypatch):
    pool = make_pool(monkeypatch)
    layer = RadixAttention(4, HEAD_DIM, HEAD_DIM**-0.5, HEADS, layer_id=2)
    loc = torch.arange(6, 12, device=DEVICE)
    k = torch.randn(6, HEADS, HEAD_DIM, dtype=torch.float16, device=DEVICE)
    pool.set_kv_buffer(layer, loc, k, k * 3)
    saved = pool.get_cpu_copy(loc)
    before = [t.clone() for t in (pool.k_buffer[2], pool.v_buffer[2], pool.k_scale_buffer[2])]
    for buffer in (pool.k_buffer, pool.v_buffer, pool.k_scale_buffer, pool.v_scale_buffer):
        buffer[2][loc] = 0
    pool.load_cpu_copy(saved, loc)
    after = (pool.k_buffer[2], pool.v_buffer[2], pool.k_scale_buffer[2])
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
