"""Per-call K/V pre-pass of sage_attn: smoothing, INT8 K, FP16/FP8 V, packed per request.

The attention kernel never touches the paged cache: this pre-pass gathers each
request's keys (cached prefix through ``kv_indices``, then the new chunk) once,
subtracts the request's K mean (smoothing), quantizes K to INT8 with one scale
per ``K_QUANT_BLOCK`` keys, converts V, and writes everything into dense
per-request segments. Two launches, both with a fixed grid (no host sync):

1. ``_kv_stats_kernel``: per (request, KV head, split) partial K sums and V |max|
   (``NUM_SPLITS`` programs per request and head, each taking every 16th block).
2. ``_kv_pack_kernel``: reduces the partials in a fixed order (deterministic),
   then quantizes and stores.

Packed layout: request b owns rows ``[start_b, start_b + kv_len_b)`` of the
packed buffers, with ``start_b = K_QUANT_BLOCK * ((kv_indptr[b] + qo_indptr[b])
// K_QUANT_BLOCK + b)`` -- block aligned, so a scale block never straddles two
requests, and computable in-kernel from the index pointers alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

K_QUANT_BLOCK = 64  # keys per INT8 K scale (SageAttention1's granularity)
INT8_MAX = 127.0
FP8_E4M3_MAX = 448.0
# Guards a scale against an all-zero block; far below any real activation.
SCALE_EPS = 1e-12
# The same numbers as kernel constants (Triton only reads constexpr globals).
_INT8_MAX = tl.constexpr(INT8_MAX)
_FP8_E4M3_MAX = tl.constexpr(FP8_E4M3_MAX)
_SCALE_EPS = tl.constexpr(SCALE_EPS)
# Programs per (request, KV head) in the pre-pass. A constant, so the order in
# which a request's K mean is summed -- hence every bit of its output -- does not
# depend on its batch neighbours or on how many KV heads a TP rank holds.
NUM_SPLITS = 16


@dataclass
class PackedKV:
    """What the attention kernel reads; built once per call by ``quantize_kv``."""

    k_int8: torch.Tensor  # [Hkv, T_pad, D] int8, smoothed keys
    k_scale: torch.Tensor  # [Hkv, T_pad // K_QUANT_BLOCK] fp32
    # pv="fp16": [Hkv, T_pad, Dv] fp16.  pv="fp8": [Hkv, Dv, T_pad] e4m3, i.e.
    # token-contiguous ("K-major"), the operand layout Hopper's fp8 MMA wants.
    v: torch.Tensor
    v_scale: torch.Tensor | None  # pv="fp8": [B, Hkv, Dv] fp32, else None


def packed_len(num_prefix_slots: int, num_extend_tokens: int, batch_size: int) -> int:
    """Rows of the packed buffers: enough for every request's aligned segment."""
    total = num_prefix_slots + num_extend_tokens
    return K_QUANT_BLOCK * (total // K_QUANT_BLOCK + batch_size)


@triton.jit
def request_bounds(qo_indptr, kv_indptr, b):
    """Request b's cached prefix (start in kv_indices, length) and chunk (start row, length)."""
    prefix_start = tl.load(kv_indptr + b).to(tl.int64)
    prefix_len = tl.load(kv_indptr + b + 1).to(tl.int64) - prefix_start
    extend_start = tl.load(qo_indptr + b).to(tl.int64)
    extend_len = tl.load(qo_indptr + b + 1).to(tl.int64) - extend_start
    return prefix_start, prefix_len, extend_start, extend_len


@triton.jit
def packed_start(qo_indptr, kv_indptr, b, K_QUANT_BLOCK: tl.constexpr):
    start = tl.load(kv_indptr + b).to(tl.int64) + tl.load(qo_indptr + b).to(tl.int64)
    return K_QUANT_BLOCK * (start // K_QUANT_BLOCK + b)


@triton.jit
def _load_request_rows(
    cache,
    extend,
    kv_indices,
    head,
    pos,
    offs_d,
    prefix_start,
    prefix_len,
    extend_start,
    kv_len,
    stride_cache_tok,
    stride_cache_head,
    stride_ext_tok,
    stride_ext_head,
):
    """Rows ``pos`` of one request's key (or value) sequence, in fp32; 0 past its end."""
    in_prefix = pos < prefix_len
    in_extend = (pos >= prefix_len) & (pos < kv_len)
    slot = tl.load(kv_indices + prefix_start + pos, mask=in_prefix, other=0).to(tl.int64)
    cached = tl.load(
        cache + slot[:, None] * stride_cache_tok + head * stride_cache_head + offs_d[None, :],
        mask=in_prefix[:, None],
        other=0.0,
    )
    fresh = tl.load(
        extend
        + (extend_start + pos - prefix_len)[:, None] * stride_ext_tok
        + head * stride_ext_head
        + offs_d[None, :],
        mask=in_extend[:, None],
        other=0.0,
    )
    return tl.where(in_prefix[:, None], cached.to(tl.float32), fresh.to(tl.float32))


@triton.jit
def _kv_stats_kernel(
    k_buffer,
    v_buffer,
    k_extend,
    v_extend,
    qo_indptr,
    kv_indptr,
    kv_indices,
    k_sum_partial,  # [B, Hkv, SPLITS, D] fp32
    v_amax_partial,  # [B, Hkv, SPLITS, Dv] fp32
    stride_kbuf_tok,
    stride_kbuf_head,
    stride_vbuf_tok,
    stride_vbuf_head,
    stride_kext_tok,
    stride_kext_head,
    stride_vext_tok,
    stride_vext_head,
    num_kv_heads,
    SPLITS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK: tl.constexpr,
    NEED_V_AMAX: tl.constexpr,
):
    b = tl.program_id(0)
    head = tl.program_id(1)
    split = tl.program_id(2)
    prefix_start, prefix_len, extend_start, extend_len = request_bounds(qo_indptr, kv_indptr, b)
    kv_len = prefix_len + extend_len
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    k_sum = tl.zeros([HEAD_DIM], dtype=tl.float32)
    v_amax = tl.zeros([HEAD_DIM_V], dtype=tl.float32)
    for block in range(split, tl.cdiv(kv_len, BLOCK), SPLITS):
        pos = block * BLOCK + tl.arange(0, BLOCK)
        k = _load_request_rows(
            k_buffer,
            k_extend,
            kv_indices,
            head,
            pos,
            offs_d,
            prefix_start,
            prefix_len,
            extend_start,
            kv_len,
            stride_kbuf_tok,
            stride_kbuf_head,
            stride_kext_tok,
            stride_kext_head,
        )
        k_sum += tl.sum(k, axis=0)
        if NEED_V_AMAX:
            v = _load_request_rows(
                v_buffer,
                v_extend,
                kv_indices,
                head,
                pos,
                offs_dv,
                prefix_start,
                prefix_len,
                extend_start,
                kv_len,
                stride_vbuf_tok,
                stride_vbuf_head,
                stride_vext_tok,
                stride_vext_head,
            )
            v_amax = tl.maximum(v_amax, tl.max(tl.abs(v), axis=0))
    row = (b * num_kv_heads + head) * SPLITS + split
    tl.store(k_sum_partial + row * HEAD_DIM + offs_d, k_sum)
    if NEED_V_AMAX:
        tl.store(v_amax_partial + row * HEAD_DIM_V + offs_dv, v_amax)


@triton.jit
def _kv_pack_kernel(
    k_buffer,
    v_buffer,
    k_extend,
    v_extend,
    qo_indptr,
    kv_indptr,
    kv_indices,
    k_sum_partial,
    v_amax_partial,
    k_int8,  # [Hkv, T_pad, D]
    k_scale,  # [Hkv, T_pad // BLOCK]
    v_packed,  # fp16 [Hkv, T_pad, Dv] or fp8 [Hkv, Dv, T_pad]
    v_scale,  # [B, Hkv, Dv] (fp8 only)
    stride_kbuf_tok,
    stride_kbuf_head,
    stride_vbuf_tok,
    stride_vbuf_head,
    stride_kext_tok,
    stride_kext_head,
    stride_vext_tok,
    stride_vext_head,
    stride_k8_head,
    stride_ks_head,
    stride_vp_head,
    stride_vp_tok,
    stride_vp_dim,
    num_kv_heads,
    SPLITS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK: tl.constexpr,
    PV_FP8: tl.constexpr,
    SMOOTH_K: tl.constexpr,
):
    b = tl.program_id(0)
    head = tl.program_id(1)
    split = tl.program_id(2)
    prefix_start, prefix_len, extend_start, extend_len = request_bounds(qo_indptr, kv_indptr, b)
    kv_len = prefix_len + extend_len
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    offs_split = tl.arange(0, SPLITS)

    # Same reduction order in every program: the mean is bitwise reproducible.
    part_rows = (b * num_kv_heads + head) * SPLITS + offs_split
    k_sum = tl.sum(tl.load(k_sum_partial + part_rows[:, None] * HEAD_DIM + offs_d[None, :]), 0)
    k_mean = k_sum / tl.maximum(kv_len, 1).to(tl.float32)
    if not SMOOTH_K:
        k_mean = tl.zeros([HEAD_DIM], dtype=tl.float32)
    if PV_FP8:
        v_amax = tl.max(
            tl.load(v_amax_partial + part_rows[:, None] * HEAD_DIM_V + offs_dv[None, :]), 0
        )
        v_channel_scale = tl.maximum(v_amax, _SCALE_EPS) / _FP8_E4M3_MAX
        if split == 0:
            tl.store(v_scale + (b * num_kv_heads + head) * HEAD_DIM_V + offs_dv, v_channel_scale)

    seg_start = packed_start(qo_indptr, kv_indptr, b, BLOCK)
    k8_base = k_int8 + head.to(tl.int64) * stride_k8_head
    vp_base = v_packed + head.to(tl.int64) * stride_vp_head
    for block in range(split, tl.cdiv(kv_len, BLOCK), SPLITS):
        pos = block * BLOCK + tl.arange(0, BLOCK)
        valid = pos < kv_len
        k = _load_request_rows(
            k_buffer,
            k_extend,
            kv_indices,
            head,
            pos,
            offs_d,
            prefix_start,
            prefix_len,
            extend_start,
            kv_len,
            stride_kbuf_tok,
            stride_kbuf_head,
            stride_kext_tok,
            stride_kext_head,
        )
        k = tl.where(valid[:, None], k - k_mean[None, :], 0.0)
        block_scale = tl.maximum(tl.max(tl.abs(k)), _SCALE_EPS) / _INT8_MAX
        k_q = k / block_scale
        # Round half away from zero (the cast truncates); the torch twin does the same.
        k_q = (k_q + tl.where(k_q >= 0, 0.5, -0.5)).to(tl.int8)
        rows = seg_start + pos
        tl.store(k8_base + rows[:, None] * HEAD_DIM + offs_d[None, :], k_q, mask=valid[:, None])
        tl.store(k_scale + head * stride_ks_head + seg_start // BLOCK + block, block_scale)

        v = _load_request_rows(
            v_buffer,
            v_extend,
            kv_indices,
            head,
            pos,
            offs_dv,
            prefix_start,
            prefix_len,
            extend_start,
            kv_len,
            stride_vbuf_tok,
            stride_vbuf_head,
            stride_vext_tok,
            stride_vext_head,
        )
        if PV_FP8:
            v_out = (v / v_channel_scale[None, :]).to(tl.float8e4nv)
        else:
            v_out = v.to(tl.float16)
        tl.store(
            vp_base + rows[:, None] * stride_vp_tok + offs_dv[None, :] * stride_vp_dim,
            v_out,
            mask=valid[:, None],
        )


def quantize_kv(
    k_extend: torch.Tensor,
    v_extend: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    pv_fp8: bool,
    smooth_k: bool = True,
) -> PackedKV:
    """Smooth, quantize and pack every request's keys and values (inputs are only read).

    ``smooth_k=False`` skips the mean subtraction; it exists so a test can show
    what smoothing buys on outlier keys.
    """
    batch_size = qo_indptr.shape[0] - 1
    num_kv_heads, head_dim = k_extend.shape[1], k_extend.shape[2]
    head_dim_v = v_extend.shape[2]
    device = k_extend.device
    t_pad = packed_len(kv_indices.shape[0], k_extend.shape[0], batch_size)
    splits = NUM_SPLITS

    k_int8 = torch.empty((num_kv_heads, t_pad, head_dim), dtype=torch.int8, device=device)
    k_scale = torch.empty(
        (num_kv_heads, t_pad // K_QUANT_BLOCK), dtype=torch.float32, device=device
    )
    if pv_fp8:
        v_packed = torch.empty(
            (num_kv_heads, head_dim_v, t_pad), dtype=torch.float8_e4m3fn, device=device
        )
        v_stride_tok, v_stride_dim = v_packed.stride(2), v_packed.stride(1)
        v_scale = torch.empty(
            (batch_size, num_kv_heads, head_dim_v), dtype=torch.float32, device=device
        )
    else:
        v_packed = torch.empty(
            (num_kv_heads, t_pad, head_dim_v), dtype=torch.float16, device=device
        )
        v_stride_tok, v_stride_dim = v_packed.stride(1), v_packed.stride(2)
        v_scale = None
    k_sum_partial = torch.empty(
        (batch_size, num_kv_heads, splits, head_dim), dtype=torch.float32, device=device
    )
    v_amax_partial = torch.empty(
        (batch_size, num_kv_heads, splits, head_dim_v), dtype=torch.float32, device=device
    )

    grid = (batch_size, num_kv_heads, splits)
    source_strides = (
        k_buffer.stride(0),
        k_buffer.stride(1),
        v_buffer.stride(0),
        v_buffer.stride(1),
        k_extend.stride(0),
        k_extend.stride(1),
        v_extend.stride(0),
        v_extend.stride(1),
    )
    _kv_stats_kernel[grid](
        k_buffer,
        v_buffer,
        k_extend,
        v_extend,
        qo_indptr,
        kv_indptr,
        kv_indices,
        k_sum_partial,
        v_amax_partial,
        *source_strides,
        num_kv_heads,
        SPLITS=splits,
        HEAD_DIM=head_dim,
        HEAD_DIM_V=head_dim_v,
        BLOCK=K_QUANT_BLOCK,
        NEED_V_AMAX=pv_fp8,
    )
    _kv_pack_kernel[grid](
        k_buffer,
        v_buffer,
        k_extend,
        v_extend,
        qo_indptr,
        kv_indptr,
        kv_indices,
        k_sum_partial,
        v_amax_partial,
        k_int8,
        k_scale,
        v_packed,
        v_scale if pv_fp8 else k_scale,  # unused when not PV_FP8
        *source_strides,
        k_int8.stride(0),
        k_scale.stride(0),
        v_packed.stride(0),
        v_stride_tok,
        v_stride_dim,
        num_kv_heads,
        SPLITS=splits,
        HEAD_DIM=head_dim,
        HEAD_DIM_V=head_dim_v,
        BLOCK=K_QUANT_BLOCK,
        PV_FP8=pv_fp8,
        SMOOTH_K=smooth_k,
    )
    return PackedKV(k_int8=k_int8, k_scale=k_scale, v=v_packed, v_scale=v_scale)
