"""Decode over sage_attn's 8-bit KV cache (``kv8_cache.py``): split-KV, GQA-grouped.

Stage 1 (this module): one program per (request, KV head, split) takes the query
heads of that KV head together (padded to 16 rows, the smallest tensor-core tile)
and runs an exp2 online softmax over its split of the request's slots, reading
INT8 K and V with their per-token scales through ``load_kv8_keys``: at page sizes
>= 16 whole pages (per step, one page's K block, its transposed V block and their
scales, each contiguous, found from the page's first slot in ``kv_indices``, by TMA
on sm_90+); below, token by token through ``kv_indices``. The query rows
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
how many gathered rows are in flight (``BLOCK_N`` keys per step, ``NUM_STAGES``
steps prefetched, programs per SM) and by the work per step, most of it turning the
token-major INT8 V into P·V's fp16 operand. Its pure-torch twin is
``kv8_reference.sage_decode_kv8_ref``.
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
from sglang.srt.layers.attention.sage_attention.kv8_cache import (
    KV8Cache,
    kv8_page_sources,
    kv8_read_plan,
    load_kv8_keys,
)
from sglang.srt.layers.attention.sage_attention.kv8_tiles import (
    MAX_GROUP,
    fast_int8_cvt,
    kv8_scores,
    kv8_softmax_step,
)
from sglang.srt.layers.attention.sage_attention.quantize import quantized_q_block

_LN2 = tl.constexpr(math.log(2.0))
# Keys per inner step, steps in flight, warps, where V becomes fp16. Tuned on the H200
# with benchmark/kernels/sage_attention/tune_kv8.py (RESULTS.md, rounds 4 and 6): 128
# keys per step; V converted in its loaded rows (CVT_IN_ROWS, kv8_tiles.int8_to_fp16:
# ~150 registers instead of 255, no byte-wise gather of V); 5 stages, the fewest that give
# each gathered tile two buffers in Triton 3.6 (3-4 give one: the compile tests'
# ``-k compile_info`` report). Together 1.2-1.3x faster at batch 1-64 when a
# request's slots are contiguous, 0.86-0.91x when every key sits in a random slot;
# 8 warps or 64 keys per step run slower.
BLOCK_N = 128
NUM_STAGES = 5
NUM_WARPS = 4
CVT_IN_ROWS = True
# Whole pages through TMA descriptors where the device has TMA (sm_90+; the CPU
# interpreter emulates them), else plain loads. Neither is measured yet (RESULTS.md
# round 8): tune_kv8.py sweeps both.
USE_TMA = True
# P·V in INT8 (kv8_tiles.kv8_pv), which leaves V unconverted on the load path; off until
# tune_kv8.py / the kernel benchmark time it (accuracy: RESULTS.md round 9).
PV_INT8 = False


@triton.jit
def _kv8_decode_stage1(
    q,
    k_int8,
    k_scale,
    v_int8,
    v_scale,
    k_page_src,  # kv8_page_sources: TMA descriptors or the buffers
    v_page_src,
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
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    WHOLE_PAGES: tl.constexpr,
    USE_TMA: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MIN_BLOCK_KV: tl.constexpr,
    ROTATE: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    FAST_CVT: tl.constexpr,
    CVT_IN_ROWS: tl.constexpr,
    PV_INT8: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    kv_start = tl.load(kv_indptr + b).to(tl.int64)
    kv_len = tl.load(kv_indptr + b + 1).to(tl.int64) - kv_start
    splits = tl.load(num_kv_splits + b)
    per_split = tl.cdiv(tl.cdiv(kv_len, splits), MIN_BLOCK_KV) * MIN_BLOCK_KV
    lo = per_split * split
    hi = tl.minimum(lo + per_split, kv_len)
    if lo >= hi:
        return

    # Rows: the query heads of this KV head, all of request b's one token.
    rows = tl.arange(0, BLOCK_H)
    row_valid = rows < KV_GROUP
    heads = kv_head * KV_GROUP + rows
    offs_dv = tl.arange(0, HEAD_DIM_V)
    q_int8, q_scale = quantized_q_block(
        q, first_token=b.to(tl.int64), row_token=tl.zeros([BLOCK_H], dtype=tl.int64),
        row_valid=row_valid, row_head=heads, stride_q_tok=stride_q_tok,
        stride_q_head=stride_q_head, qk_scale_log2=qk_scale_log2, HEAD_DIM=HEAD_DIM,
        ROTATE=ROTATE,
    )  # fmt: skip

    m_i = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM_V], dtype=tl.float32)
    # Whole pages: tiles start at multiples of BLOCK_N (which divides the page size), so
    # a tile is one page's contiguous run; a split's first tile is masked below lo.
    first = (lo // BLOCK_N) * BLOCK_N if WHOLE_PAGES else lo
    for start in tl.range(first, hi, BLOCK_N, num_stages=NUM_STAGES):
        pos = start + tl.arange(0, BLOCK_N)
        valid = (pos >= lo) & (pos < hi)
        key, key_scale, value, value_scale = load_kv8_keys(
            k_int8, k_scale, v_int8, v_scale, k_page_src, v_page_src, kv_indices + kv_start,
            start, valid, kv_head, num_kv_heads, HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V,
            PAGE_SIZE=PAGE_SIZE, BLOCK_N=BLOCK_N, WHOLE_PAGES=WHOLE_PAGES, USE_TMA=USE_TMA,
        )  # fmt: skip
        s = kv8_scores(q_int8, q_scale, key, key_scale)
        s = tl.where(valid[None, :], s, float("-inf"))
        acc, l_i, m_i = kv8_softmax_step(
            acc, l_i, m_i, s, value, value_scale, FAST_CVT, CVT_IN_ROWS, PV_INT8
        )

    out_rows = b.to(tl.int64) * stride_logits_b + heads.to(tl.int64) * stride_logits_h
    out_rows += split * stride_logits_s
    tl.store(
        attn_logits + out_rows[:, None] + offs_dv[None, :],
        acc / l_i[:, None],
        mask=row_valid[:, None],
    )
    # SGLang's stage 2 merges in natural log: lse = ln(l) + m·ln 2 (m is in log2 units).
    lse = (m_i + tl.math.log2(l_i)) * _LN2
    tl.store(attn_lse + out_rows // HEAD_DIM_V, lse, mask=row_valid)


def how_decode_reads(cache: KV8Cache, device: torch.device) -> tuple[bool, bool]:
    """(whole pages, through TMA): how ``sage_decode_kv8`` reads this cache here."""
    return kv8_read_plan(cache, device, BLOCK_N, USE_TMA)[:2]


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
    pv_int8: bool | None = None,
) -> None:
    """One decode step over the 8-bit cache; writes ``o [B, Hq, Dv]`` in place.

    q [B, Hq, D] fp16/bf16; request b's keys are slots
    ``kv_indices[kv_indptr[b]:kv_indptr[b+1]]`` (its new token already written by
    ``write_kv8``). ``attn_logits [>=B, Hq, max_kv_splits, Dv]`` and ``attn_lse [>=B, Hq,
    max_kv_splits]`` fp32 are scratch (SGLang's Triton backend allocates the same; its
    first B rows are used);
    ``num_kv_splits [B]`` int32, each in [1, max_kv_splits]. ``pv_int8``: P·V in INT8 or
    FP16 (None: the module's ``PV_INT8``).
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
    if group > MAX_GROUP:
        raise ValueError(
            f"sage_attn: {group} query heads per KV head; the 8-bit cache's decode kernel "
            f"takes at most {MAX_GROUP}"
        )
    sm_scale = head_dim**-0.5 if sm_scale is None else sm_scale
    whole_pages, use_tma, block_n = kv8_read_plan(cache, q.device, BLOCK_N, USE_TMA)
    k_page_src, v_page_src = kv8_page_sources(cache, block_n, use_tma)
    _kv8_decode_stage1[(batch, cache.num_kv_heads, max_kv_splits)](
        q,
        cache.k_int8,
        cache.k_scale,
        cache.v_int8,
        cache.v_scale,
        k_page_src,
        v_page_src,
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
        BLOCK_H=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        HEAD_DIM_V=cache.head_dim_v,
        PAGE_SIZE=cache.page_size,
        WHOLE_PAGES=whole_pages,
        USE_TMA=use_tma,
        BLOCK_N=block_n,
        MIN_BLOCK_KV=_MIN_BLOCK_KV,
        ROTATE=cache.rotated,
        NUM_STAGES=NUM_STAGES,
        FAST_CVT=fast_int8_cvt(),
        CVT_IN_ROWS=CVT_IN_ROWS,
        PV_INT8=PV_INT8 if pv_int8 is None else pv_int8,
        num_warps=NUM_WARPS,
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
