"""Decode over sage_attn's 8-bit KV cache (``kv8_cache.py``): split-KV, GQA-grouped.

Stage 1 (this module): one program per (request, KV head, split) takes the query
heads of that KV head together (padded to 16 rows, the smallest tensor-core tile)
and runs an exp2 online softmax over its split of the request's slots, reading
INT8 K and V through ``kv_indices`` with their per-token scales. The query rows
are quantized to INT8 once per program (one scale per head, as the extend
kernels do), so Q·Kᵀ is an INT8 tensor-core product on K as stored: K is never
converted. P·V is FP16 on the exact INT8 V with V's row scales folded into P
(``kv8_pv``). q·k_mean, the same for every key, is left out: softmax does not see
it. Stage 2 is SGLang's own split reduction (``_decode_softmax_reducev_fwd``), so
the split contract is SGLang's Triton decode's: ``num_kv_splits [B]`` chosen by
the caller (fixed per captured batch size under CUDA graphs), splits of
``ceil(ceil(L / splits) / 32) * 32`` keys, partial outputs normalised per split
and their log-sum-exp in natural log. No host sync, fixed grid.

Decode reads 2.06·D bytes per token and head against bf16's 4·D, so it is bound by
how many gathered rows are in flight: ``BLOCK_N`` keys per step, ``NUM_STAGES``
steps prefetched.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from sglang.kernels.ops.attention.decode_attention import (
    _MIN_BLOCK_KV,
    _decode_softmax_reducev_fwd,
)
from sglang.srt.layers.attention.sage_attention.extend_kv8 import sage_extend_attention_kv8_ref
from sglang.srt.layers.attention.sage_attention.kv8_cache import KV8Cache, load_kv8_tile
from sglang.srt.layers.attention.sage_attention.kv8_tiles import (
    fast_int8_cvt,
    kv8_scores,
    kv8_softmax_step,
)
from sglang.srt.layers.attention.sage_attention.quantize import quantized_q_block

_LN2 = tl.constexpr(math.log(2.0))
# The smallest tensor-core tile's rows: query rows per program.
MIN_ROWS = 16
# Tile constants, tuned on the H200 with benchmark/kernels/sage_attention/tune_kv8.py
# (RESULTS.md). A program reads up to MAX_HEADS_PER_PROGRAM KV heads side by side;
# each step reads KEY_HEADS_PER_STEP (key, KV head) rows, i.e. KEY_HEADS_PER_STEP //
# heads keys; NUM_STAGES steps in flight.
MAX_HEADS_PER_PROGRAM = 4
KEY_HEADS_PER_STEP = 128
NUM_STAGES = 3
NUM_WARPS = 4
MAXNREG = None


def kv_heads_per_program(group: int, num_kv_heads: int, head_dim: int) -> int:
    """KV heads one program reads side by side: doubled while their query rows still
    fit MIN_ROWS and they divide the KV heads. Fills the 16-row tile that GQA groups
    of 1-8 leave mostly empty, so each step's softmax serves up to 4x the bytes."""
    heads = 1
    while (
        2 * heads <= MAX_HEADS_PER_PROGRAM
        and 2 * heads * group <= MIN_ROWS
        and num_kv_heads % (2 * heads) == 0
        and 2 * heads * head_dim <= 512
    ):
        heads *= 2
    return heads


@triton.jit
def _spread_over_heads(q_int8, row_kv_head, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """INT8 query rows [M, D] -> [M, HEADS * D] with row m in its head's D columns
    and zeros elsewhere, so one product with side-by-side K heads [N, HEADS * D]
    gives each row the scores against its own head only."""
    if HEADS == 1:
        return q_int8
    rows: tl.constexpr = q_int8.shape[0]
    wide = tl.reshape(
        tl.broadcast_to(q_int8[:, None, :], (rows, HEADS, HEAD_DIM)), (rows, HEADS * HEAD_DIM)
    )
    col_head = tl.arange(0, HEADS * HEAD_DIM) // HEAD_DIM
    return tl.where(col_head[None, :] == row_kv_head[:, None], wide, 0).to(tl.int8)


@triton.jit
def _kv8_decode_stage1(
    q,
    k_int8,
    k_scale,
    v_int8,
    v_scale,
    kv_indptr,
    kv_indices,
    num_kv_splits,
    attn_logits,  # [B, Hq, MAX_SPLITS, Dv] fp32
    attn_lse,  # [B, Hq, MAX_SPLITS] fp32
    qk_scale_log2,
    stride_q_tok,
    stride_q_head,
    stride_logits_b,
    stride_logits_h,
    stride_logits_s,
    num_kv_heads,
    KV_GROUP: tl.constexpr,
    HEADS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MIN_BLOCK_KV: tl.constexpr,
    ROTATE: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    FAST_CVT: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1) * HEADS  # the first of this program's KV heads
    split = tl.program_id(2)
    kv_start = tl.load(kv_indptr + b).to(tl.int64)
    kv_len = tl.load(kv_indptr + b + 1).to(tl.int64) - kv_start
    splits = tl.load(num_kv_splits + b)
    per_split = tl.cdiv(tl.cdiv(kv_len, splits), MIN_BLOCK_KV) * MIN_BLOCK_KV
    lo = per_split * split
    hi = tl.minimum(lo + per_split, kv_len)
    if lo >= hi:
        return

    # Rows: the query heads of this program's KV heads (consecutive), all of request
    # b's one token; row_kv_head: which of the program's KV heads a row reads.
    rows = tl.arange(0, BLOCK_H)
    row_valid = rows < KV_GROUP * HEADS
    heads = kv_head * KV_GROUP + rows
    row_kv_head = tl.where(row_valid, rows // KV_GROUP, 0)
    q_int8, q_scale = quantized_q_block(
        q, first_token=b.to(tl.int64), row_token=tl.zeros([BLOCK_H], dtype=tl.int64),
        row_valid=row_valid, row_head=heads, stride_q_tok=stride_q_tok,
        stride_q_head=stride_q_head, qk_scale_log2=qk_scale_log2, HEAD_DIM=HEAD_DIM,
        ROTATE=ROTATE,
    )  # fmt: skip
    q_int8 = _spread_over_heads(q_int8, row_kv_head, HEADS=HEADS, HEAD_DIM=HEAD_DIM)

    m_i = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    # Every row's product with all HEADS value heads; only its own head's block is kept.
    acc = tl.zeros([BLOCK_H, HEADS * HEAD_DIM_V], dtype=tl.float32)
    for start in tl.range(lo, hi, BLOCK_N, num_stages=NUM_STAGES):
        pos = start + tl.arange(0, BLOCK_N)
        valid = pos < hi
        key, key_scale, value, value_scale = load_kv8_tile(
            k_int8, k_scale, v_int8, v_scale, kv_indices + kv_start, pos, valid, kv_head,
            num_kv_heads, HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V, row_kv_head=row_kv_head,
            HEADS=HEADS,
        )  # fmt: skip
        s = kv8_scores(q_int8, q_scale, key, key_scale)
        s = tl.where(valid[None, :], s, float("-inf"))
        acc, l_i, m_i = kv8_softmax_step(acc, l_i, m_i, s, value, value_scale, FAST_CVT)

    out_rows = b.to(tl.int64) * stride_logits_b + heads.to(tl.int64) * stride_logits_h
    out_rows += split * stride_logits_s
    cols = tl.arange(0, HEADS * HEAD_DIM_V)
    own_head = (cols // HEAD_DIM_V)[None, :] == row_kv_head[:, None]
    tl.store(
        attn_logits + out_rows[:, None] + (cols % HEAD_DIM_V)[None, :],
        acc / l_i[:, None],
        mask=row_valid[:, None] & own_head,
    )
    # SGLang's stage 2 merges in natural log: lse = ln(l) + m·ln 2 (m is in log2 units).
    lse = (m_i + tl.math.log2(l_i)) * _LN2
    tl.store(attn_lse + out_rows // HEAD_DIM_V, lse, mask=row_valid)


def sage_decode_kv8(
    q: torch.Tensor,
    o: torch.Tensor,
    cache: KV8Cache,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    attn_logits: torch.Tensor,
    attn_lse: torch.Tensor,
    num_kv_splits: torch.Tensor,
    max_kv_splits: int,
    sm_scale: float | None = None,
) -> None:
    """One decode step over the 8-bit cache; writes ``o [B, Hq, Dv]`` in place.

    q [B, Hq, D] fp16/bf16; request b's keys are slots
    ``kv_indices[kv_indptr[b]:kv_indptr[b+1]]`` (its new token already written by
    ``write_kv8``). ``attn_logits [>=B, Hq, max_kv_splits, Dv]`` and ``attn_lse [>=B, Hq,
    max_kv_splits]`` fp32 are scratch (SGLang's Triton backend allocates the same; its
    first B rows are used);
    ``num_kv_splits [B]`` int32, each in [1, max_kv_splits] (SGLang's choice for one
    program per KV head; with h KV heads per program, h times as many are run, up to
    ``max_kv_splits``, so the grid keeps SGLang's size).
    """
    batch, num_q_heads, head_dim = q.shape
    cache.check_queries(q, o)
    # CUDA-graph runners hand in scratch sized for their largest batch: use its rows.
    if attn_logits.shape[0] < batch or tuple(attn_logits.shape[1:]) != (
        num_q_heads,
        max_kv_splits,
        cache.head_dim_v,
    ):
        raise ValueError(f"sage_attn: attn_logits has shape {tuple(attn_logits.shape)}")
    attn_logits, attn_lse = attn_logits[:batch], attn_lse[:batch]
    # Stage 2 finds a split's log-sum-exp at its partial output's offset / Dv.
    if tuple(attn_lse.shape) != tuple(attn_logits.shape[:3]) or not (
        attn_logits.is_contiguous() and attn_lse.is_contiguous()
    ):
        raise ValueError("sage_attn: attn_logits/attn_lse must be contiguous [B, Hq, splits(, Dv)]")
    if batch == 0:
        return
    group = num_q_heads // cache.num_kv_heads
    heads = kv_heads_per_program(group, cache.num_kv_heads, head_dim)
    if heads > 1:  # a new tensor: the caller's (SGLang's metadata) stays as it was
        num_kv_splits = torch.clamp(num_kv_splits * heads, max=max_kv_splits)
    sm_scale = head_dim**-0.5 if sm_scale is None else sm_scale
    _kv8_decode_stage1[(batch, cache.num_kv_heads // heads, max_kv_splits)](
        q,
        cache.k_int8,
        cache.k_scale,
        cache.v_int8,
        cache.v_scale,
        kv_indptr,
        kv_indices,
        num_kv_splits,
        attn_logits,
        attn_lse,
        qk_scale_log2=sm_scale * math.log2(math.e),
        stride_q_tok=q.stride(0),
        stride_q_head=q.stride(1),
        stride_logits_b=attn_logits.stride(0),
        stride_logits_h=attn_logits.stride(1),
        stride_logits_s=attn_logits.stride(2),
        num_kv_heads=cache.num_kv_heads,
        KV_GROUP=group,
        HEADS=heads,
        BLOCK_H=max(MIN_ROWS, triton.next_power_of_2(group * heads)),
        HEAD_DIM=head_dim,
        HEAD_DIM_V=cache.head_dim_v,
        BLOCK_N=max(16, KEY_HEADS_PER_STEP // heads),
        MIN_BLOCK_KV=_MIN_BLOCK_KV,
        ROTATE=cache.rotated,
        NUM_STAGES=NUM_STAGES,
        FAST_CVT=fast_int8_cvt(),
        num_warps=NUM_WARPS,
        **({"maxnreg": MAXNREG} if MAXNREG else {}),
    )
    # SGLang's stage 2 (v_scale 1.0: the per-token V scales are already in).
    _decode_softmax_reducev_fwd(
        attn_logits,
        attn_lse,
        q,
        o,
        1.0,
        attn_logits,  # only its last dim (Dv) is read
        kv_indptr,
        num_kv_splits,
        max_kv_splits,
    )


def sage_decode_kv8_ref(
    q: torch.Tensor,
    o: torch.Tensor,
    cache: KV8Cache,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    sm_scale: float | None = None,
) -> None:
    """Twin: a decode step is an extend of one-token chunks (bottom-right causal lets
    each see its whole sequence), so the extend twin's INT8 Q and exact fp64 softmax
    over the dequantized cache serve both."""
    batch = q.shape[0]
    qo_indptr = torch.arange(batch + 1, dtype=kv_indptr.dtype, device=q.device)
    sage_extend_attention_kv8_ref(
        q, o, cache, qo_indptr, kv_indptr, kv_indices, max_len_extend=1, sm_scale=sm_scale,
    )  # fmt: skip
