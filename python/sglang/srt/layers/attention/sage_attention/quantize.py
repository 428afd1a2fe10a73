"""Per-call K/V pre-pass of sage_attn: smoothing, INT8 K, FP16/FP8 V, packed per request.

The attention kernel never touches the paged cache: this pre-pass gathers each
request's keys (cached prefix through ``kv_indices``, then the new chunk) once,
subtracts the request's K mean (smoothing), quantizes K to INT8 with one scale
per ``KV_BLOCK`` keys, scales and converts V, and writes everything into the
packed layout of ``layout.py``. Two launches, both with a fixed grid (no host sync):

1. ``_kv_stats_kernel``: per (request, KV head, split) partial K means and V |max|
   (``NUM_SPLITS`` programs per request and head, each taking every 16th block).
2. ``_kv_pack_kernel``: reduces the partials in a fixed order (deterministic),
   then quantizes and stores whole blocks (zeros past the request's end).

Overflow: the K mean is summed from ``k / kv_len`` and V gets a per-channel
scale, so any finite fp16/bf16 input stays finite (bf16 V beyond fp16's range is
scaled by a power of two before the fp16 cast, and the kernel scales it back).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglang.srt.layers.attention.sage_attention.layout import (
    FP8_E4M3_MAX,
    FP16_V_LIMIT,
    INT8_MAX,
    KV_BLOCK,
    PV,
    SCALE_EPS,
    PackedKV,
    allocate_packed_kv,
    packed_len,
    request_bounds,
    segment_start,
)
from sglang.srt.layers.attention.sage_attention.rotation import hadamard_tile, rotate_rows

# The same numbers as kernel constants (Triton only reads constexpr globals).
_INT8_MAX = tl.constexpr(INT8_MAX)
_FP8_E4M3_MAX = tl.constexpr(FP8_E4M3_MAX)
_FP16_V_LIMIT = tl.constexpr(FP16_V_LIMIT)
_SCALE_EPS = tl.constexpr(SCALE_EPS)
# Programs per (request, KV head) in the pre-pass. A constant, so the order in
# which a request's K mean is summed -- hence every bit of its output -- does not
# depend on its batch neighbours or on how many KV heads a TP rank holds.
NUM_SPLITS = 16


@triton.jit
def quantize_q_rows(q, qk_scale_log2):
    """Query rows -> (INT8 rows, one fp32 scale per row), ``sm_scale * log2(e)`` folded
    in so scores feed exp2 directly. One scale per row costs the same as one per
    block here and keeps a large Q channel from coarsening the other rows. Both
    attention kernels quantize Q through this; round half away from zero."""
    q = q.to(tl.float32) * qk_scale_log2
    scale = tl.maximum(tl.max(tl.abs(q), 1), _SCALE_EPS) / _INT8_MAX
    q = q / scale[:, None]
    return (q + tl.where(q >= 0, 0.5, -0.5)).to(tl.int8), scale


@triton.jit
def quantized_q_block(
    q,
    first_token,
    row_token,
    row_valid,
    row_head,
    stride_q_tok,
    stride_q_head,
    qk_scale_log2,
    HEAD_DIM: tl.constexpr,
    ROTATE: tl.constexpr,
):
    """Query rows ``q[first_token + row_token[r], row_head[r]]`` of a [tokens, heads,
    D] tensor as INT8 rows and per-row scales (rows not ``row_valid`` read as 0),
    rotated first when K was (``rotation.py``): the prologue of every attention
    kernel. ``row_head`` may be one head for all rows."""
    offsets = (first_token + row_token) * stride_q_tok + row_head * stride_q_head
    rows = tl.load(
        q + offsets[:, None] + tl.arange(0, HEAD_DIM)[None, :],
        mask=row_valid[:, None],
        other=0.0,
    )
    if ROTATE:  # (q H)·(k H) = D q·k
        rows = rotate_rows(rows, hadamard_tile(HEAD_DIM, q.dtype.element_ty))
        return quantize_q_rows(rows, qk_scale_log2 / HEAD_DIM)
    return quantize_q_rows(rows, qk_scale_log2)


@triton.jit
def query_block(extend_len, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """(whether this program has a block of the request's chunk, which block it takes).
    The grid (from ``max_len_extend``) bounds the blocks computed, whatever the chunk;
    causal blocks run longest-first (the ones nearest the diagonal see the most keys)."""
    num_m_blocks = tl.minimum(tl.cdiv(extend_len, BLOCK_M), tl.num_programs(0))
    block_m = num_m_blocks - 1 - tl.program_id(0) if CAUSAL else tl.program_id(0)
    return tl.program_id(0) < num_m_blocks, block_m


@triton.jit
def block_key_bounds(
    prefix_len, kv_len, block_m, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr
):
    """(free_hi, hi) for a query block: keys [0, free_hi) need no mask (wholly left of
    the block's first row's bottom-right diagonal, or before kv end), [0, hi) are seen."""
    if CAUSAL:
        free_hi = (prefix_len + block_m * BLOCK_M + 1) // BLOCK_N * BLOCK_N
        hi = tl.minimum(kv_len, prefix_len + (block_m + 1) * BLOCK_M)
    else:
        free_hi = kv_len // BLOCK_N * BLOCK_N
        hi = kv_len
    return free_hi, hi


@triton.jit
def _load_rows(source, rows, head, offs_d, mask, stride_tok, stride_head):
    """Rows ``rows`` of one head of a [tokens, heads, dim] tensor, in fp32; 0 where masked."""
    ptrs = source + rows[:, None] * stride_tok + head * stride_head + offs_d[None, :]
    return tl.load(ptrs, mask=mask[:, None], other=0.0).to(tl.float32)


@triton.jit
def _load_request_kv(
    k_buffer,
    v_buffer,
    k_extend,
    v_extend,
    kv_indices,
    head,
    pos,
    prefix_start,
    prefix_len,
    extend_start,
    kv_len,
    stride_kbuf_tok,
    stride_kbuf_head,
    stride_vbuf_tok,
    stride_vbuf_head,
    stride_kext_tok,
    stride_kext_head,
    stride_vext_tok,
    stride_vext_head,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
):
    """Keys and values at positions ``pos`` of one request (cached prefix through
    ``kv_indices``, then its chunk), in fp32; 0 past its end."""
    in_prefix = pos < prefix_len
    in_extend = (pos >= prefix_len) & (pos < kv_len)
    slot = tl.load(kv_indices + prefix_start + pos, mask=in_prefix, other=0).to(tl.int64)
    row = extend_start + pos - prefix_len
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    k = tl.where(
        in_prefix[:, None],
        _load_rows(k_buffer, slot, head, offs_d, in_prefix, stride_kbuf_tok, stride_kbuf_head),
        _load_rows(k_extend, row, head, offs_d, in_extend, stride_kext_tok, stride_kext_head),
    )
    v = tl.where(
        in_prefix[:, None],
        _load_rows(v_buffer, slot, head, offs_dv, in_prefix, stride_vbuf_tok, stride_vbuf_head),
        _load_rows(v_extend, row, head, offs_dv, in_extend, stride_vext_tok, stride_vext_head),
    )
    return k, v


@triton.jit
def _kv_stats_kernel(
    k_buffer,
    v_buffer,
    k_extend,
    v_extend,
    qo_indptr,
    kv_indptr,
    kv_indices,
    k_mean_partial,  # [B, Hkv, SPLITS, D] fp32
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
    ROTATE: tl.constexpr,
):
    b = tl.program_id(0)
    head = tl.program_id(1)
    split = tl.program_id(2)
    prefix_start, prefix_len, extend_start, extend_len = request_bounds(qo_indptr, kv_indptr, b)
    kv_len = prefix_len + extend_len
    # Summing k / kv_len (not k) keeps the mean finite for any finite key.
    inv_len = 1.0 / tl.maximum(kv_len, 1).to(tl.float32)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    k_mean = tl.zeros([HEAD_DIM], dtype=tl.float32)
    v_amax = tl.zeros([HEAD_DIM_V], dtype=tl.float32)
    if ROTATE:
        hadamard = hadamard_tile(HEAD_DIM, k_buffer.dtype.element_ty)
    for block in range(split, tl.cdiv(kv_len, BLOCK), SPLITS):
        pos = block * BLOCK + tl.arange(0, BLOCK)
        k, v = _load_request_kv(
            k_buffer,
            v_buffer,
            k_extend,
            v_extend,
            kv_indices,
            head,
            pos,
            prefix_start,
            prefix_len,
            extend_start,
            kv_len,
            stride_kbuf_tok,
            stride_kbuf_head,
            stride_vbuf_tok,
            stride_vbuf_head,
            stride_kext_tok,
            stride_kext_head,
            stride_vext_tok,
            stride_vext_head,
            HEAD_DIM=HEAD_DIM,
            HEAD_DIM_V=HEAD_DIM_V,
        )
        if ROTATE:  # the mean of the rotated keys is the rotated mean
            k = rotate_rows(k, hadamard)
        k_mean += tl.sum(k * inv_len, axis=0)
        v_amax = tl.maximum(v_amax, tl.max(tl.abs(v), axis=0))
    row = (b * num_kv_heads + head) * SPLITS + split
    tl.store(k_mean_partial + row * HEAD_DIM + offs_d, k_mean)
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
    k_mean_partial,
    v_amax_partial,
    k_int8,  # [Hkv, T, D]
    k_scale,  # [Hkv, T // BLOCK]
    v_packed,  # fp16 [Hkv, T, Dv] or 8-bit [Hkv, Dv, T]
    v_scale,  # [B, Hkv, Dv]
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
    PV_MODE: tl.constexpr,
    SMOOTH_K: tl.constexpr,
    ROTATE: tl.constexpr,
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
    k_mean = tl.sum(tl.load(k_mean_partial + part_rows[:, None] * HEAD_DIM + offs_d[None, :]), 0)
    if not SMOOTH_K:
        k_mean = tl.zeros([HEAD_DIM], dtype=tl.float32)
    v_amax = tl.max(tl.load(v_amax_partial + part_rows[:, None] * HEAD_DIM_V + offs_dv[None, :]), 0)
    if PV_MODE == "fp8":
        v_channel_scale = tl.maximum(v_amax, _SCALE_EPS) / _FP8_E4M3_MAX
    elif PV_MODE == "int8":
        v_channel_scale = tl.maximum(v_amax, _SCALE_EPS) / _INT8_MAX
    else:
        # A power of two (exact), 1 unless the channel would overflow fp16.
        v_channel_scale = tl.math.exp2(
            tl.maximum(tl.ceil(tl.log2(tl.maximum(v_amax, _SCALE_EPS) / _FP16_V_LIMIT)), 0.0)
        )
    if split == 0:
        tl.store(v_scale + (b * num_kv_heads + head) * HEAD_DIM_V + offs_dv, v_channel_scale)

    seg_start = segment_start(qo_indptr, kv_indptr, b, BLOCK)
    k8_base = k_int8 + head.to(tl.int64) * stride_k8_head
    vp_base = v_packed + head.to(tl.int64) * stride_vp_head
    if ROTATE:
        hadamard = hadamard_tile(HEAD_DIM, k_buffer.dtype.element_ty)
    for block in range(split, tl.cdiv(kv_len, BLOCK), SPLITS):
        pos = block * BLOCK + tl.arange(0, BLOCK)
        valid = pos < kv_len
        k, v = _load_request_kv(
            k_buffer,
            v_buffer,
            k_extend,
            v_extend,
            kv_indices,
            head,
            pos,
            prefix_start,
            prefix_len,
            extend_start,
            kv_len,
            stride_kbuf_tok,
            stride_kbuf_head,
            stride_vbuf_tok,
            stride_vbuf_head,
            stride_kext_tok,
            stride_kext_head,
            stride_vext_tok,
            stride_vext_head,
            HEAD_DIM=HEAD_DIM,
            HEAD_DIM_V=HEAD_DIM_V,
        )
        if ROTATE:
            k = rotate_rows(k, hadamard)
        k = tl.where(valid[:, None], k - k_mean[None, :], 0.0)
        block_scale = tl.maximum(tl.max(tl.abs(k)), _SCALE_EPS) / _INT8_MAX
        k_q = k / block_scale
        # Round half away from zero (the cast truncates); the torch twin does the same.
        k_q = (k_q + tl.where(k_q >= 0, 0.5, -0.5)).to(tl.int8)
        # Whole blocks, zeros past the end: the attention kernel reads unmasked tiles.
        rows = seg_start + pos
        tl.store(k8_base + rows[:, None] * HEAD_DIM + offs_d[None, :], k_q)
        tl.store(k_scale + head * stride_ks_head + seg_start // BLOCK + block, block_scale)

        v_out = v / v_channel_scale[None, :]
        if PV_MODE == "int8":
            v_out = v_out + tl.where(v_out >= 0, 0.5, -0.5)  # round half away, as K
        v_out = v_out.to(v_packed.dtype.element_ty)
        # int64: token-major V is [Dv, T] per head, Dv * T passes 2^31 from ~17M rows.
        v_offsets = rows[:, None] * stride_vp_tok + offs_dv.to(tl.int64)[None, :] * stride_vp_dim
        tl.store(vp_base + v_offsets, v_out)


def quantize_kv(
    k_extend: torch.Tensor,
    v_extend: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    pv: PV,
    smooth_k: bool = True,
    workspace: PackedKV | None = None,
    rotate: bool = False,
) -> PackedKV:
    """Smooth, quantize and pack every request's keys and values (inputs are only read).

    Writes into ``workspace`` when given (it must be in ``pv``'s layout and large
    enough: ``packed_len`` rows, batch size scales), else into new buffers.
    ``smooth_k=False`` skips the mean subtraction; it exists so a test can show
    what smoothing buys on outlier keys. ``rotate``: rotate K by the Hadamard
    matrix first (``rotation.py``); the result says so (``PackedKV.rotated``).
    """
    batch_size = qo_indptr.shape[0] - 1
    num_kv_heads, head_dim = k_extend.shape[1], k_extend.shape[2]
    head_dim_v = v_extend.shape[2]
    device = k_extend.device
    num_rows = packed_len(kv_indices.shape[0], k_extend.shape[0], batch_size)
    if workspace is None:
        packed = allocate_packed_kv(
            num_rows=num_rows,
            batch_size=batch_size,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            head_dim_v=head_dim_v,
            pv=pv,
            device=device,
        )
    elif not workspace.matches(num_rows, batch_size, num_kv_heads, head_dim, head_dim_v, pv):
        raise ValueError(
            f"sage_attn: workspace ({workspace.pv.value}, {workspace.num_rows} rows) "
            f"does not fit this call ({pv.value}, {num_rows} rows, batch {batch_size})"
        )
    else:
        packed = workspace
    splits = NUM_SPLITS
    k_mean_partial = torch.empty(
        (batch_size, num_kv_heads, splits, head_dim), dtype=torch.float32, device=device
    )
    v_amax_partial = torch.empty(
        (batch_size, num_kv_heads, splits, head_dim_v), dtype=torch.float32, device=device
    )

    grid = (batch_size, num_kv_heads, splits)
    source_strides = dict(
        stride_kbuf_tok=k_buffer.stride(0),
        stride_kbuf_head=k_buffer.stride(1),
        stride_vbuf_tok=v_buffer.stride(0),
        stride_vbuf_head=v_buffer.stride(1),
        stride_kext_tok=k_extend.stride(0),
        stride_kext_head=k_extend.stride(1),
        stride_vext_tok=v_extend.stride(0),
        stride_vext_head=v_extend.stride(1),
    )
    sources = dict(
        k_buffer=k_buffer,
        v_buffer=v_buffer,
        k_extend=k_extend,
        v_extend=v_extend,
        qo_indptr=qo_indptr,
        kv_indptr=kv_indptr,
        kv_indices=kv_indices,
    )
    shapes = dict(
        num_kv_heads=num_kv_heads,
        SPLITS=splits,
        HEAD_DIM=head_dim,
        HEAD_DIM_V=head_dim_v,
        BLOCK=KV_BLOCK,
        ROTATE=rotate,
    )
    _kv_stats_kernel[grid](
        **sources,
        k_mean_partial=k_mean_partial,
        v_amax_partial=v_amax_partial,
        **source_strides,
        **shapes,
    )
    v_stride_head, v_stride_tok, v_stride_dim = packed.v_strides()
    _kv_pack_kernel[grid](
        **sources,
        k_mean_partial=k_mean_partial,
        v_amax_partial=v_amax_partial,
        k_int8=packed.k_int8,
        k_scale=packed.k_scale,
        v_packed=packed.v,
        v_scale=packed.v_scale,
        **source_strides,
        stride_k8_head=packed.k_int8.stride(0),
        stride_ks_head=packed.k_scale.stride(0),
        stride_vp_head=v_stride_head,
        stride_vp_tok=v_stride_tok,
        stride_vp_dim=v_stride_dim,
        **shapes,
        PV_MODE=pv.value,
        SMOOTH_K=smooth_k,
    )
    packed.rotated = rotate
    return packed
