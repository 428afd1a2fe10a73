"""sage_attn extend attention: INT8 Q·Kᵀ, FP16/FP8/INT8 P·V, over SGLang's paged KV cache.

``sage_extend_attention`` mirrors SGLang's ``extend_attention_fwd``: request b
attends to its cached prefix (slots ``kv_indices[kv_indptr[b]:kv_indptr[b+1]]``)
followed by its new chunk (rows ``qo_indptr[b]:qo_indptr[b+1]`` of the dense
``k_extend`` / ``v_extend``). With ``causal``, chunk token i sees the whole prefix
and chunk tokens <= i (bottom-right alignment, right for radix hits and chunked
prefill).

Per call: ``quantize_kv`` packs smoothed INT8 K (one scale per ``KV_BLOCK`` keys)
and FP16/FP8/INT8 V once (layout in ``layout.py``); then one program per (query
block, query head, request) quantizes its Q block once (``sm_scale * log2(e)``
folded in, one scale per query row) and runs an online softmax in exp2 over the
packed keys. A key tile is one K-scale block, so a score is dequantized by its
row's scale times its tile's scale inside the exp2 argument's FMA. On Hopper the
K and V tiles are TMA loads (tensor descriptors); on Ampere and Ada, plain loads
of the same layout. No host synchronisation and no data-dependent shapes: the
grid comes from ``max_len_extend`` and tensor shapes, so it can be graph-captured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from sglang.srt.layers.attention.sage_attention.hopper_attention import (
    hopper_kernel_available,
    hopper_kernel_supports,
    sage_attention_from_packed_hopper,
)
from sglang.srt.layers.attention.sage_attention.layout import (
    FP8_E4M3_MAX,
    INT8_MAX,
    KV_BLOCK,
    PV,
    ROUND_MAGIC,
    ROUND_MAGIC_BITS,
    PackedKV,
    request_bounds,
    segment_start,
)
from sglang.srt.layers.attention.sage_attention.quantize import (
    block_key_bounds,
    quantize_kv,
    quantized_q_block,
    query_block,
)
from sglang.srt.layers.attention.sage_attention.settings import (
    SUPPORTED_KERNELS,
    SUPPORTED_PV,
    fp8_mma_supported,
)

SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.int32, torch.int64)
# FP8 P·V: P comes out of exp2 already scaled to e4m3's range (2^(x + log2 448));
# the softmax denominator carries the same factor, so it cancels for free.
_LOG2_FP8_MAX = tl.constexpr(math.log2(FP8_E4M3_MAX))
# INT8 P·V: the same trick against the tile's own row max (see _attn_tiles).
_LOG2_INT8_MAX = tl.constexpr(math.log2(INT8_MAX))
_INV_INT8_MAX = tl.constexpr(1.0 / INT8_MAX)
_ROUND_MAGIC = tl.constexpr(ROUND_MAGIC)
_ROUND_MAGIC_BITS = tl.constexpr(ROUND_MAGIC_BITS)
# Finite start for the running max: a fully masked tile then gives p = 0 and
# alpha = 1 instead of exp2(-inf - -inf) = NaN.
_M_INIT = tl.constexpr(-1.0e30)


@dataclass(frozen=True)
class TileConfig:
    block_m: int  # query rows per program
    block_n: int  # keys per inner step: always the packed layout's KV_BLOCK
    num_warps: int
    num_stages: int
    use_tma: bool  # K/V tiles through tensor descriptors (Hopper's TMA)


# (block_m, num_warps, num_stages) per (head dim, P·V) from the H200 sweep of this
# kernel (benchmark/kernels/sage_attention/RESULTS.md, tuning log 5): one
# warpgroup per program so two programs share an SM; FP8 P·V wants a third
# pipeline stage at hd128 and 128 query rows at hd64.
_TILES = {
    (128, PV.FP16): (64, 4, 2),
    (128, PV.FP8): (64, 4, 3),
    (64, PV.FP16): (64, 4, 3),
    (64, PV.FP8): (128, 4, 2),
    # INT8 P·V reads the same 8-bit token-major V as FP8: FP8's shapes until swept.
    (128, PV.INT8): (64, 4, 3),
    (64, PV.INT8): (128, 4, 2),
}


def tile_config(head_dim: int, causal: bool, pv: PV, device: torch.device) -> TileConfig:
    """Tile shape per (head dim, P·V precision, arch); the twin reads the same.

    Causal and non-causal preferred the same shapes. TMA on sm_90+ and in the CPU
    interpreter (which emulates descriptors); plain loads on Ampere and Ada.
    """
    del causal  # the same shape won with and without the mask
    block_m, num_warps, num_stages = _TILES[(head_dim, PV(pv))]
    use_tma = device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= 9
    return TileConfig(block_m, KV_BLOCK, num_warps, num_stages, use_tma=use_tma)


@triton.jit
def _load_kv_tile(
    k_src,
    v_src,
    kv_head,
    tok,
    num_rows,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_N: tl.constexpr,
    V_TOKEN_MAJOR: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    """Keys ``tok .. tok + BLOCK_N`` of one KV head's packed slice.

    Returns K [BLOCK_N, D] int8 and V: FP16 [BLOCK_N, Dv]; 8-bit [Dv, BLOCK_N]
    (token-contiguous). ``k_src``/``v_src`` are tensor descriptors with USE_TMA,
    else base pointers of the same buffers.
    """
    # Row of the [Hkv * T, D] view. TMA coordinates are int32 (PackedKV.tile_views
    # bounds the views); pointer offsets are int64, since Hkv * T * D passes 2^31 from
    # ~2.1M packed rows at 8 KV heads, hd128.
    row = kv_head.to(tl.int64) * num_rows + tok
    if USE_TMA:
        k = k_src.load([row.to(tl.int32), 0])
        if V_TOKEN_MAJOR:
            v = v_src.load([(kv_head * HEAD_DIM_V).to(tl.int32), tok.to(tl.int32)])
        else:
            v = v_src.load([row.to(tl.int32), 0])
    else:
        k_offsets, v_offsets = packed_tile_offsets(
            kv_head, tok, num_rows, HEAD_DIM, HEAD_DIM_V, BLOCK_N, V_TOKEN_MAJOR
        )
        k = tl.load(k_src + k_offsets)
        v = tl.load(v_src + v_offsets)
    return k, v


@triton.jit
def packed_tile_offsets(
    kv_head,
    tok,
    num_rows,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_N: tl.constexpr,
    V_TOKEN_MAJOR: tl.constexpr,
):
    """int64 element offsets of keys ``tok .. tok + BLOCK_N`` of one KV head in the
    packed K ``[Hkv, T, D]`` ([N, D]) and V ([Dv, N] of ``[Hkv, Dv, T]`` when
    V_TOKEN_MAJOR, else [N, Dv] of ``[Hkv, T, Dv]``): the plain-load path's addresses."""
    row = kv_head.to(tl.int64) * num_rows + tok
    offs_n = tl.arange(0, BLOCK_N)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    k_offsets = (row + offs_n)[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    if V_TOKEN_MAJOR:
        v_rows = kv_head.to(tl.int64) * HEAD_DIM_V + offs_dv
        v_offsets = v_rows[:, None] * num_rows + (tok + offs_n)[None, :]
    else:
        v_offsets = (row + offs_n)[:, None] * HEAD_DIM_V + offs_dv[None, :]
    return k_offsets, v_offsets


@triton.jit
def _int_to_float(x):
    """Exact int32 -> fp32 for |x| < 2^22 (every INT8 product of <= 128 terms here:
    128 * 127 * 127 < 2^21) with two full-rate adds instead of a quarter-rate cvt."""
    return (x + _ROUND_MAGIC_BITS).to(tl.float32, bitcast=True) - _ROUND_MAGIC


@triton.jit
def _attn_tiles(
    acc,
    l_i,
    m_i,
    q_int8,
    q_scale,
    k_src,
    v_src,
    k_scale_row,
    kv_head,
    seg_start,
    num_rows,
    offs_m,
    prefix_len,
    kv_len,
    lo,
    hi,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    PV_MODE: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    """Online softmax over keys [lo, hi); MASKED tiles check kv end and the causal edge."""
    for start_n in range(lo, hi, BLOCK_N):
        k, v = _load_kv_tile(
            k_src,
            v_src,
            kv_head,
            seg_start + start_n,
            num_rows,
            HEAD_DIM=HEAD_DIM,
            HEAD_DIM_V=HEAD_DIM_V,
            BLOCK_N=BLOCK_N,
            V_TOKEN_MAJOR=PV_MODE != "fp16",
            USE_TMA=USE_TMA,
        )
        # One dequantization factor per row: its Q scale times this tile's K scale.
        row_scale = q_scale * tl.load(k_scale_row + start_n // BLOCK_N)
        # The plain cvt here: the ROUND_MAGIC conversion measured 2-4% slower in this
        # kernel on the H200 (RESULTS.md, tuning log 9); INT8 P·V's P·V still uses it.
        s = tl.dot(q_int8, tl.trans(k)).to(tl.float32)
        if MASKED:
            offs_n = start_n + tl.arange(0, BLOCK_N)
            visible = (offs_n < kv_len)[None, :]
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= prefix_len + offs_m[:, None])
            s = tl.where(visible, s, float("-inf"))
        m_tile = tl.max(s, 1) * row_scale
        m_new = tl.maximum(m_i, m_tile)
        alpha = tl.math.exp2(m_i - m_new)
        if PV_MODE == "int8":
            # P scaled to 127 by its row's max in this tile (so the largest
            # probabilities keep 7 bits); beta = exp2(m_tile - m_new) / 127 brings the
            # tile's int32 P·V and its row sums to the running max. Both conversions
            # go through ROUND_MAGIC (layout.py): P is the low byte of p + 1.5*2^23,
            # and the int32 P·V (|.| <= 128*127*127 < 2^22) comes back the same way.
            m_ref = tl.maximum(m_tile, _M_INIT)
            p = tl.math.exp2(s * row_scale[:, None] - (m_ref - _LOG2_INT8_MAX)[:, None])
            beta = tl.math.exp2(m_ref - m_new) * _INV_INT8_MAX
            l_i = l_i * alpha + tl.sum(p, 1) * beta
            p_int8 = (p + _ROUND_MAGIC).to(tl.int32, bitcast=True).to(tl.int8)
            pv_tile = _int_to_float(tl.dot(p_int8, tl.trans(v)))
            acc = acc * alpha[:, None] + pv_tile * beta[:, None]
        else:
            bias = m_new - _LOG2_FP8_MAX if PV_MODE == "fp8" else m_new
            p = tl.math.exp2(s * row_scale[:, None] - bias[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            if PV_MODE == "fp8":
                # Promote the fp8 MMA's partial sums into fp32 once per tile (the
                # wgmma accumulator is not full fp32), as SageAttention2 does.
                acc = tl.dot(p.to(tl.float8e4nv), tl.trans(v), acc, max_num_imprecise_acc=BLOCK_N)
            else:
                acc = tl.dot(p.to(tl.float16), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _sage_extend_kernel(
    q_extend,
    o_extend,
    k_src,
    v_src,
    k_scale,
    v_scale,
    qo_indptr,
    kv_indptr,
    qk_scale_log2,
    stride_q_tok,
    stride_q_head,
    stride_o_tok,
    stride_o_head,
    num_rows,
    num_kv_heads,
    KV_GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    PV_MODE: tl.constexpr,
    USE_TMA: tl.constexpr,
    ROTATE: tl.constexpr,
):
    q_head = tl.program_id(1)
    b = tl.program_id(2)
    _, prefix_len, extend_start, extend_len = request_bounds(qo_indptr, kv_indptr, b)
    in_grid, block_m = query_block(extend_len, BLOCK_M, CAUSAL)
    if not in_grid:
        return
    kv_len = prefix_len + extend_len
    kv_head = q_head // KV_GROUP

    # Quantize this Q block once, INT8 with sm_scale*log2(e) folded in and one
    # scale per query row: as cheap as one per block here, and it keeps large
    # Q channels from coarsening every other row of the block.
    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = offs_m < extend_len
    q_int8, q_scale = quantized_q_block(
        q_extend, first_token=extend_start, row_token=offs_m, row_valid=row_valid,
        row_head=q_head, stride_q_tok=stride_q_tok, stride_q_head=stride_q_head,
        qk_scale_log2=qk_scale_log2, HEAD_DIM=HEAD_DIM, ROTATE=ROTATE,
    )  # fmt: skip

    seg_start = segment_start(qo_indptr, kv_indptr, b, BLOCK_N)
    k_scale_row = k_scale + kv_head.to(tl.int64) * (num_rows // BLOCK_N) + seg_start // BLOCK_N

    acc = tl.zeros([BLOCK_M, HEAD_DIM_V], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], _M_INIT, dtype=tl.float32)
    free_hi, hi = block_key_bounds(prefix_len, kv_len, block_m, BLOCK_M, BLOCK_N, CAUSAL)
    # Two calls of one loop: unmasked tiles, then those crossing kv end or the diagonal.
    acc, l_i, m_i = _attn_tiles(
        acc,
        l_i,
        m_i,
        q_int8,
        q_scale,
        k_src,
        v_src,
        k_scale_row,
        kv_head.to(tl.int64),
        seg_start,
        num_rows,
        offs_m,
        prefix_len,
        kv_len,
        0,
        free_hi,
        HEAD_DIM=HEAD_DIM,
        HEAD_DIM_V=HEAD_DIM_V,
        BLOCK_N=BLOCK_N,
        MASKED=False,
        CAUSAL=CAUSAL,
        PV_MODE=PV_MODE,
        USE_TMA=USE_TMA,
    )
    acc, l_i, m_i = _attn_tiles(
        acc,
        l_i,
        m_i,
        q_int8,
        q_scale,
        k_src,
        v_src,
        k_scale_row,
        kv_head.to(tl.int64),
        seg_start,
        num_rows,
        offs_m,
        prefix_len,
        kv_len,
        free_hi,
        hi,
        HEAD_DIM=HEAD_DIM,
        HEAD_DIM_V=HEAD_DIM_V,
        BLOCK_N=BLOCK_N,
        MASKED=True,
        CAUSAL=CAUSAL,
        PV_MODE=PV_MODE,
        USE_TMA=USE_TMA,
    )

    offs_dv = tl.arange(0, HEAD_DIM_V)
    channel_scale = tl.load(v_scale + (b * num_kv_heads + kv_head) * HEAD_DIM_V + offs_dv)
    out = acc * (1.0 / tl.where(l_i == 0.0, 1.0, l_i))[:, None] * channel_scale[None, :]
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
    kernel,
):
    """Shape/dtype/device checks only: nothing here reads device memory."""
    if pv not in SUPPORTED_PV:
        raise ValueError(f"sage_attn: pv must be one of {SUPPORTED_PV}, got {pv!r}")
    if kernel not in SUPPORTED_KERNELS:
        raise ValueError(f"sage_attn: kernel must be one of {SUPPORTED_KERNELS}, got {kernel!r}")
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
    if pv == PV.FP8.value and not fp8_mma_supported(q_extend.device):
        raise ValueError(
            "sage_attn: pv='fp8' needs an FP8 tensor core (sm_89 or newer); use pv='fp16'"
        )


def _kv_sources(packed: PackedKV, config: TileConfig):
    """The K and V operands of the attention kernel: descriptors (TMA) or the buffers."""
    if not config.use_tma:
        return packed.k_int8, packed.v
    (k_view, k_tile), (v_view, v_tile) = packed.tile_views(config.block_n)
    k_src = TensorDescriptor.from_tensor(k_view, k_tile)
    return k_src, TensorDescriptor.from_tensor(v_view, v_tile)


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
    num_kv_heads, num_rows = packed.k_int8.shape[0], packed.k_int8.shape[1]
    k_src, v_src = _kv_sources(packed, config)
    grid = (triton.cdiv(max_len_extend, config.block_m), num_q_heads, batch_size)
    _sage_extend_kernel[grid](
        q_extend,
        o_extend,
        k_src,
        v_src,
        packed.k_scale,
        packed.v_scale,
        qo_indptr,
        kv_indptr,
        qk_scale_log2=sm_scale * math.log2(math.e),
        stride_q_tok=q_extend.stride(0),
        stride_q_head=q_extend.stride(1),
        stride_o_tok=o_extend.stride(0),
        stride_o_head=o_extend.stride(1),
        num_rows=num_rows,
        num_kv_heads=num_kv_heads,
        KV_GROUP=num_q_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        HEAD_DIM_V=o_extend.shape[2],
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        CAUSAL=causal,
        PV_MODE=packed.pv.value,
        USE_TMA=config.use_tma,
        ROTATE=packed.rotated,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )


# Head dims "auto" runs on the Gluon kernel. It has hd64 too, but on the H200 that
# measured 3-7% slower than the Triton kernel (RESULTS.md, H200 final run), so
# hd64 stays on Triton; at hd128 Gluon is 1.10-1.20x the Triton kernel.
HOPPER_AUTO_HEAD_DIMS = (128,)


def hopper_kernel_wanted(kernel: str, head_dim: int, head_dim_v: int, device) -> bool:
    """Whether ``kernel`` picks the Gluon Hopper kernel (warp-specialised, sm_90 only)
    for these head dims on ``device``, whether or not Gluon imported: "auto" at
    ``HOPPER_AUTO_HEAD_DIMS``, "gluon" at every head dim it has."""
    return (
        (kernel == "gluon" or (kernel == "auto" and head_dim in HOPPER_AUTO_HEAD_DIMS))
        and device.type == "cuda"
        and torch.cuda.get_device_capability(device)[0] == 9
        and hopper_kernel_supports(head_dim, head_dim_v)
    )


def use_hopper_kernel(kernel: str, head_dim: int, head_dim_v: int, device) -> bool:
    """Whether a call runs the Gluon Hopper kernel: wanted, and Gluon imported (where it
    did not, the backend's start-up log says why and that Triton runs instead)."""
    return hopper_kernel_wanted(kernel, head_dim, head_dim_v, device) and hopper_kernel_available()


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
    workspace: PackedKV | None = None,
    kernel: str = "auto",
    rotate_qk: bool = False,
) -> None:
    """8-bit SageAttention over a paged KV cache; writes ``o_extend`` in place.

    q_extend [N, Hq, D], k_extend [N, Hkv, D], v_extend [N, Hkv, Dv],
    o_extend [N, Hq, Dv], k_buffer [S, Hkv, D], v_buffer [S, Hkv, Dv];
    qo_indptr, kv_indptr [B+1]; kv_indices: token-slot ids of the cached
    prefixes. D, Dv in {64, 128}; fp16 or bf16. ``pv``: "fp16", "fp8" (e4m3 P and V,
    sm_89+) or "int8" (INT8 P scaled per key tile, INT8 V per channel).

    ``max_len_extend`` sizes the grid and must be >= every chunk length: a
    chunk's query rows from ``max_len_extend`` (rounded up to the 64-row query
    block) on are not computed, their ``o_extend`` rows left as they were.
    It is a host int, so no device value is read. ``workspace``: a ``PackedKV``
    (``layout.allocate_packed_kv``) to pack into instead of allocating one, so a
    caller can reuse one buffer across layers. ``kernel``: "auto" (the Gluon
    kernel on Hopper, D == Dv; else Triton) or "triton". ``rotate_qk``: rotate Q
    and K by a Hadamard matrix before their INT8 quantization (``rotation.py``;
    attention is unchanged, outlier channels quantize better).
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
        kernel,
    )
    if q_extend.shape[0] == 0 or max_len_extend == 0:
        return
    mode = PV(pv)
    head_dim = q_extend.shape[2]
    if sm_scale is None:
        sm_scale = head_dim**-0.5
    packed = quantize_kv(
        k_extend,
        v_extend,
        k_buffer,
        v_buffer,
        qo_indptr,
        kv_indptr,
        kv_indices,
        pv=mode,
        workspace=workspace,
        rotate=rotate_qk,
    )
    if use_hopper_kernel(kernel, head_dim, o_extend.shape[2], q_extend.device):
        sage_attention_from_packed_hopper(
            q_extend,
            o_extend,
            packed,
            qo_indptr,
            kv_indptr,
            max_len_extend,
            sm_scale=sm_scale,
            causal=causal,
        )
        return
    sage_attention_from_packed(
        q_extend,
        o_extend,
        packed,
        qo_indptr,
        kv_indptr,
        max_len_extend,
        sm_scale=sm_scale,
        causal=causal,
        config=tile_config(head_dim, causal, mode, q_extend.device),
    )
