"""sage_attn extend attention: INT8 Q·Kᵀ, FP16 or FP8 P·V, over SGLang's paged KV cache.

``sage_extend_attention`` mirrors SGLang's ``extend_attention_fwd``: request b
attends to its cached prefix (slots ``kv_indices[kv_indptr[b]:kv_indptr[b+1]]``)
followed by its new chunk (rows ``qo_indptr[b]:qo_indptr[b+1]`` of the dense
``k_extend`` / ``v_extend``). With ``causal``, chunk token i sees the whole prefix
and chunk tokens <= i (bottom-right alignment, right for radix hits and chunked
prefill).

Per call: ``quantize_kv`` packs smoothed INT8 K (one scale per 64 keys) and
FP16/FP8 V once; then one program per (query block, query head, request)
quantizes its Q block once (``sm_scale * log2(e)`` folded in, one scale per
query row) and runs an online softmax in exp2 over the packed keys. No host
synchronisation and no data-dependent shapes: the grid comes from
``max_len_extend`` and tensor shapes, so it can be graph-captured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sglang.srt.layers.attention.sage_attention.quantize import (
    _FP8_E4M3_MAX,
    _INT8_MAX,
    _SCALE_EPS,
    K_QUANT_BLOCK,
    PackedKV,
    packed_start,
    quantize_kv,
    request_bounds,
)

SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
SUPPORTED_PV = ("fp16", "fp8")
_INDEX_DTYPES = (torch.int32, torch.int64)
# Finite start for the running max: a fully masked tile then gives p = 0 and
# alpha = 1 instead of exp2(-inf - -inf) = NaN.
_M_INIT = tl.constexpr(-1.0e30)


@dataclass(frozen=True)
class TileConfig:
    block_m: int  # query rows per program
    block_n: int  # keys per inner step (a multiple of K_QUANT_BLOCK)
    num_warps: int
    num_stages: int


def tile_config(head_dim: int, causal: bool, pv: str, device: torch.device) -> TileConfig:
    """Tile shape per (head dim, causal, P·V precision, arch); the twin reads the same.

    From the H100 sweep (benchmark/kernels/sage_attention/RESULTS.md): 64 query
    rows x 128 keys with one warpgroup won for every head dim, mask and P·V
    precision -- half the registers of a 128-row tile, so two programs share an
    SM and one's softmax hides behind the other's MMAs.
    """
    del head_dim, causal, pv, device  # one shape measured best on sm_90 for all of them
    return TileConfig(block_m=64, block_n=128, num_warps=4, num_stages=2)


@triton.jit
def _attn_tiles(
    acc,
    l_i,
    m_i,
    q_int8,
    q_scale,
    k_base,
    k_scale_base,
    v_base,
    stride_k_tok,
    stride_v_tok,
    stride_v_dim,
    offs_m,
    prefix_len,
    kv_len,
    lo,
    hi,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_N: tl.constexpr,
    K_QUANT_BLOCK: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    PV_FP8: tl.constexpr,
):
    """Online softmax over keys [lo, hi); MASKED tiles check kv end and the causal edge."""
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_kv = offs_n < kv_len
        k_ptrs = k_base + offs_n[None, :] * stride_k_tok + offs_d[:, None]
        v_ptrs = v_base + offs_n[:, None] * stride_v_tok + offs_dv[None, :] * stride_v_dim
        if MASKED:
            k_t = tl.load(k_ptrs, mask=in_kv[None, :], other=0)
            v = tl.load(v_ptrs, mask=in_kv[:, None], other=0.0)
            k_scale = tl.load(k_scale_base + offs_n // K_QUANT_BLOCK, mask=in_kv, other=0.0)
        else:
            k_t = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
            k_scale = tl.load(k_scale_base + offs_n // K_QUANT_BLOCK)
        # Column (K) scales now; the row (Q) scale rides in the exp2 argument's FMA.
        s = tl.dot(q_int8, k_t).to(tl.float32) * k_scale[None, :]
        if MASKED:
            visible = in_kv[None, :]
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= prefix_len + offs_m[:, None])
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * q_scale)
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s * q_scale[:, None] - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if PV_FP8:
            # P <= 1: scale to e4m3's full range; undone with V's scale at the end.
            acc += tl.dot((p * _FP8_E4M3_MAX).to(tl.float8e4nv), v)
        else:
            acc += tl.dot(p.to(tl.float16), v)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _sage_extend_kernel(
    q_extend,
    o_extend,
    k_int8,
    k_scale,
    v_packed,
    v_scale,
    qo_indptr,
    kv_indptr,
    qk_scale_log2,
    stride_q_tok,
    stride_q_head,
    stride_o_tok,
    stride_o_head,
    stride_k8_head,
    stride_k8_tok,
    stride_ks_head,
    stride_vp_head,
    stride_vp_tok,
    stride_vp_dim,
    num_kv_heads,
    KV_GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    K_QUANT_BLOCK: tl.constexpr,
    CAUSAL: tl.constexpr,
    PV_FP8: tl.constexpr,
):
    block_m = tl.program_id(0)
    q_head = tl.program_id(1)
    b = tl.program_id(2)
    _, prefix_len, extend_start, extend_len = request_bounds(qo_indptr, kv_indptr, b)
    if block_m * BLOCK_M >= extend_len:
        return
    kv_len = prefix_len + extend_len
    kv_head = q_head // KV_GROUP

    # Quantize this Q block once, INT8 with sm_scale*log2(e) folded in and one
    # scale per query row: as cheap as one per block here, and it keeps large
    # Q channels from coarsening every other row of the block.
    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = offs_m < extend_len
    offs_d = tl.arange(0, HEAD_DIM)
    q_rows = (extend_start + offs_m)[:, None] * stride_q_tok + q_head * stride_q_head
    q = tl.load(q_extend + q_rows + offs_d[None, :], mask=row_valid[:, None], other=0.0)
    q = q.to(tl.float32) * qk_scale_log2
    q_scale = tl.maximum(tl.max(tl.abs(q), 1), _SCALE_EPS) / _INT8_MAX
    q = q / q_scale[:, None]
    q_int8 = (q + tl.where(q >= 0, 0.5, -0.5)).to(tl.int8)

    seg_start = packed_start(qo_indptr, kv_indptr, b, K_QUANT_BLOCK)
    k_base = k_int8 + kv_head.to(tl.int64) * stride_k8_head + seg_start * stride_k8_tok
    k_scale_base = k_scale + kv_head * stride_ks_head + seg_start // K_QUANT_BLOCK
    v_base = v_packed + kv_head.to(tl.int64) * stride_vp_head + seg_start * stride_vp_tok

    acc = tl.zeros([BLOCK_M, HEAD_DIM_V], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], _M_INIT, dtype=tl.float32)
    if CAUSAL:
        # Tiles wholly left of this block's first row's diagonal need no mask.
        free_hi = (prefix_len + block_m * BLOCK_M + 1) // BLOCK_N * BLOCK_N
        hi = tl.minimum(kv_len, prefix_len + (block_m + 1) * BLOCK_M)
    else:
        free_hi = kv_len // BLOCK_N * BLOCK_N
        hi = kv_len
    acc, l_i, m_i = _attn_tiles(
        acc,
        l_i,
        m_i,
        q_int8,
        q_scale,
        k_base,
        k_scale_base,
        v_base,
        stride_k8_tok,
        stride_vp_tok,
        stride_vp_dim,
        offs_m,
        prefix_len,
        kv_len,
        0,
        free_hi,
        HEAD_DIM,
        HEAD_DIM_V,
        BLOCK_N,
        K_QUANT_BLOCK,
        False,
        CAUSAL,
        PV_FP8,
    )
    acc, l_i, m_i = _attn_tiles(
        acc,
        l_i,
        m_i,
        q_int8,
        q_scale,
        k_base,
        k_scale_base,
        v_base,
        stride_k8_tok,
        stride_vp_tok,
        stride_vp_dim,
        offs_m,
        prefix_len,
        kv_len,
        free_hi,
        hi,
        HEAD_DIM,
        HEAD_DIM_V,
        BLOCK_N,
        K_QUANT_BLOCK,
        True,
        CAUSAL,
        PV_FP8,
    )

    offs_dv = tl.arange(0, HEAD_DIM_V)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if PV_FP8:
        channel_scale = tl.load(v_scale + (b * num_kv_heads + kv_head) * HEAD_DIM_V + offs_dv)
        out = out * (channel_scale / _FP8_E4M3_MAX)[None, :]
    o_rows = (extend_start + offs_m)[:, None] * stride_o_tok + q_head * stride_o_head
    tl.store(
        o_extend + o_rows + offs_dv[None, :],
        out.to(o_extend.dtype.element_ty),
        mask=row_valid[:, None],
    )


def _check_inputs(
    q_extend,
    k_extend,
    v_extend,
    o_extend,
    k_buffer,
    v_buffer,
    qo_indptr,
    kv_indptr,
    kv_indices,
    max_len_extend,
    pv,
):
    """Shape/dtype/device checks only: nothing here reads device memory."""
    if pv not in SUPPORTED_PV:
        raise ValueError(f"sage_attn: pv must be one of {SUPPORTED_PV}, got {pv!r}")
    if q_extend.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"sage_attn: q_extend dtype {q_extend.dtype} is not supported; "
            f"supported: {SUPPORTED_DTYPES}"
        )
    for name, t in (
        ("k_extend", k_extend),
        ("v_extend", v_extend),
        ("o_extend", o_extend),
        ("k_buffer", k_buffer),
        ("v_buffer", v_buffer),
    ):
        if t.dtype != q_extend.dtype:
            raise ValueError(
                f"sage_attn: {name} dtype {t.dtype} differs from q_extend dtype "
                f"{q_extend.dtype}; fp8/fp4 KV caches are not supported by this kernel"
            )
        if t.dim() != 3:
            raise ValueError(
                f"sage_attn: {name} must be [tokens, heads, dim], got {tuple(t.shape)}"
            )
        if t.device != q_extend.device:
            raise ValueError(f"sage_attn: {name} is on {t.device}, q_extend on {q_extend.device}")
        if t.stride(-1) != 1:
            raise ValueError(f"sage_attn: {name} needs a contiguous last dimension")
    if q_extend.stride(-1) != 1:
        raise ValueError("sage_attn: q_extend needs a contiguous last dimension")
    num_tokens, num_q_heads, head_dim = q_extend.shape
    num_kv_heads, head_dim_v = v_extend.shape[1], v_extend.shape[2]
    if head_dim not in SUPPORTED_HEAD_DIMS or head_dim_v not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"sage_attn: head dims (qk={head_dim}, v={head_dim_v}) are not supported; "
            f"supported: {SUPPORTED_HEAD_DIMS}"
        )
    expected = {
        "k_extend": (k_extend.shape, (num_tokens, num_kv_heads, head_dim)),
        "v_extend": (v_extend.shape, (num_tokens, num_kv_heads, head_dim_v)),
        "o_extend": (o_extend.shape, (num_tokens, num_q_heads, head_dim_v)),
        "k_buffer": (k_buffer.shape[1:], (num_kv_heads, head_dim)),
        "v_buffer": (v_buffer.shape[1:], (num_kv_heads, head_dim_v)),
    }
    for name, (got, want) in expected.items():
        if tuple(got) != tuple(want):
            raise ValueError(f"sage_attn: {name} has shape {tuple(got)}, expected {want}")
    if k_buffer.shape[0] != v_buffer.shape[0]:
        raise ValueError("sage_attn: k_buffer and v_buffer have different slot counts")
    if num_q_heads % num_kv_heads != 0:
        raise ValueError(
            f"sage_attn: {num_q_heads} query heads are not a multiple of {num_kv_heads} KV heads"
        )
    for name, t in (("qo_indptr", qo_indptr), ("kv_indptr", kv_indptr), ("kv_indices", kv_indices)):
        if t.dim() != 1 or t.dtype not in _INDEX_DTYPES:
            raise ValueError(
                f"sage_attn: {name} must be a 1-D int32/int64 tensor, got "
                f"{t.dtype} of shape {tuple(t.shape)}"
            )
        if t.device != q_extend.device:
            raise ValueError(f"sage_attn: {name} is on {t.device}, q_extend on {q_extend.device}")
    if qo_indptr.shape != kv_indptr.shape or qo_indptr.shape[0] < 2:
        raise ValueError(
            f"sage_attn: qo_indptr {tuple(qo_indptr.shape)} and kv_indptr "
            f"{tuple(kv_indptr.shape)} must both be [batch + 1] with batch >= 1"
        )
    if not isinstance(max_len_extend, int) or max_len_extend < 0:
        raise ValueError(f"sage_attn: max_len_extend must be an int >= 0, got {max_len_extend!r}")
    if (
        pv == "fp8"
        and q_extend.is_cuda
        and torch.cuda.get_device_capability(q_extend.device) < (8, 9)
    ):
        raise ValueError(
            "sage_attn: pv='fp8' needs an FP8 tensor core (sm_89 or newer); use pv='fp16'"
        )


def sage_attention_from_packed(
    q_extend: torch.Tensor,
    o_extend: torch.Tensor,
    packed: PackedKV,
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    max_len_extend: int,
    sm_scale: float,
    causal: bool,
    config: TileConfig,
) -> None:
    """The attention kernel alone, on a ``quantize_kv`` result (the benchmark times it apart)."""
    batch_size = qo_indptr.shape[0] - 1
    num_q_heads, head_dim = q_extend.shape[1], q_extend.shape[2]
    num_kv_heads, head_dim_v = packed.k_int8.shape[0], o_extend.shape[2]
    pv_fp8 = packed.v_scale is not None
    if pv_fp8:
        v_stride_tok, v_stride_dim = packed.v.stride(2), packed.v.stride(1)
    else:
        v_stride_tok, v_stride_dim = packed.v.stride(1), packed.v.stride(2)
    grid = (triton.cdiv(max_len_extend, config.block_m), num_q_heads, batch_size)
    _sage_extend_kernel[grid](
        q_extend,
        o_extend,
        packed.k_int8,
        packed.k_scale,
        packed.v,
        packed.v_scale if pv_fp8 else packed.k_scale,  # unused when not PV_FP8
        qo_indptr,
        kv_indptr,
        sm_scale * math.log2(math.e),
        q_extend.stride(0),
        q_extend.stride(1),
        o_extend.stride(0),
        o_extend.stride(1),
        packed.k_int8.stride(0),
        packed.k_int8.stride(1),
        packed.k_scale.stride(0),
        packed.v.stride(0),
        v_stride_tok,
        v_stride_dim,
        num_kv_heads,
        KV_GROUP=num_q_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        HEAD_DIM_V=head_dim_v,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        K_QUANT_BLOCK=K_QUANT_BLOCK,
        CAUSAL=causal,
        PV_FP8=pv_fp8,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )


def sage_extend_attention(
    q_extend: torch.Tensor,
    k_extend: torch.Tensor,
    v_extend: torch.Tensor,
    o_extend: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    max_len_extend: int,
    sm_scale: float | None = None,
    causal: bool = True,
    pv: str = "fp16",
) -> None:
    """8-bit SageAttention over a paged KV cache; writes ``o_extend`` in place.

    q_extend [N, Hq, D], k_extend [N, Hkv, D], v_extend [N, Hkv, Dv],
    o_extend [N, Hq, Dv], k_buffer [S, Hkv, D], v_buffer [S, Hkv, Dv];
    qo_indptr, kv_indptr [B+1]; kv_indices: token-slot ids of the cached
    prefixes. ``max_len_extend`` must be >= every chunk length (it sizes the
    grid). D, Dv in {64, 128}; fp16 or bf16. ``pv``: "fp16" or "fp8" (e4m3 P·V).
    """
    _check_inputs(
        q_extend,
        k_extend,
        v_extend,
        o_extend,
        k_buffer,
        v_buffer,
        qo_indptr,
        kv_indptr,
        kv_indices,
        max_len_extend,
        pv,
    )
    if q_extend.shape[0] == 0 or max_len_extend == 0:
        return
    head_dim = q_extend.shape[2]
    if sm_scale is None:
        sm_scale = head_dim**-0.5
    config = tile_config(head_dim, causal, pv, q_extend.device)
    packed = quantize_kv(
        k_extend,
        v_extend,
        k_buffer,
        v_buffer,
        qo_indptr,
        kv_indptr,
        kv_indices,
        pv_fp8=pv == "fp8",
    )
    sage_attention_from_packed(
        q_extend,
        o_extend,
        packed,
        qo_indptr,
        kv_indptr,
        max_len_extend,
        sm_scale,
        causal,
        config,
    )
