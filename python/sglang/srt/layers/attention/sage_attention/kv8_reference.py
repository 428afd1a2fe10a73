"""Pure-torch twins of the 8-bit KV cache's attention kernels (``extend_kv8.py``,
``decode_kv8.py``, and ``kv8_flash.py``'s FlashAttention call): the tests' references,
never imported by a kernel module.

Both start from ``kv8_scores_ref`` (the kernels' INT8 Q against the dequantized
cache); the softmax is exact in fp64, except where INT8 P·V is asked for, whose
per-tile P rounding (``int8_pv_softmax_ref``) is part of the result and is replayed
tile by tile (and, for decode, split by split). Tile sizes are read from the kernel
modules at call time, so a test that patches them patches the twin too.
"""

from __future__ import annotations

import math

import torch
import triton

from sglang.kernels.ops.attention.decode_attention import _MIN_BLOCK_KV
from sglang.srt.layers.attention.sage_attention import decode_kv8, extend_kv8
from sglang.srt.layers.attention.sage_attention.kv8_cache import (
    KV8Cache,
    dequantize_kv8,
    kv8_read_plan,
    kv8_token_rows,
)
from sglang.srt.layers.attention.sage_attention.reference import (
    quantize_int8_blocks,
    visible_keys,
)
from sglang.srt.layers.attention.sage_attention.rotation import hadamard_matrix


def sage_extend_attention_kv8_ref(
    q_extend: torch.Tensor,
    o_extend: torch.Tensor,
    cache: KV8Cache,
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    max_len_extend: int,
    sm_scale: float | None = None,
    causal: bool = True,
    pv_int8: bool = False,
    block_n: int | None = None,
) -> None:
    """Twin: the kernel's INT8 Q (rotated when the cache is) and the dequantized cache,
    with an exact softmax in fp64 (the kernel adds only exp2/fp16-P rounding). With
    ``pv_int8``, P·V as the kernel's INT8 path does it, tile by tile
    (``int8_pv_softmax_ref``), since its P rounding is not rounding error to a twin:
    tiles of ``block_n`` keys (default: the Triton kernel's, ``kv8_read_plan``; the
    Gluon kernel's are ``hopper_kv8.STEP_N``)."""
    del max_len_extend
    if block_n is None:
        block_n = kv8_read_plan(cache, q_extend.device, extend_kv8.BLOCK_N, extend_kv8.USE_TMA)[2]
    qo, kv = qo_indptr.tolist(), kv_indptr.tolist()
    for b in range(len(qo) - 1):
        rows = slice(qo[b], qo[b + 1])
        num_queries, kv_len = qo[b + 1] - qo[b], kv[b + 1] - kv[b]
        if num_queries == 0:
            continue
        slots = kv_indices[kv[b] : kv[b + 1]]
        s = kv8_scores_ref(q_extend[rows], cache, slots, sm_scale)
        visible = visible_keys(num_queries, kv_len, kv_len - num_queries, causal, s.device)
        s = s.masked_fill(~visible, float("-inf"))
        group = s.shape[0] // cache.num_kv_heads
        if pv_int8:
            _, _, v_int8, v_scale = kv8_token_rows(cache, slots)
            out, _ = int8_pv_softmax_ref(
                s,
                values=per_query_head(v_int8, group),
                value_scales=per_query_head(v_scale, group),
                block_n=block_n,
            )
        else:
            values = per_query_head(dequantize_kv8(cache, slots)[1], group)
            out = (s * math.log(2.0)).softmax(-1) @ values
        o_extend[rows] = out.transpose(0, 1).to(o_extend.dtype)


def per_query_head(token_rows: torch.Tensor, group: int) -> torch.Tensor:
    """``[K, Hkv, ...]`` per-token cache rows -> ``[Hq, K, ...]`` fp64, each KV head's
    rows repeated for the ``group`` query heads that read them."""
    return token_rows.double().transpose(0, 1).repeat_interleave(group, 0)


def kv8_scores_ref(
    q_rows: torch.Tensor, cache: KV8Cache, slots: torch.Tensor, sm_scale: float | None = None
) -> torch.Tensor:
    """Scores ``[Hq, E, K]`` in log2 units of query rows ``q_rows [E, Hq, D]`` against
    the cached keys at ``slots``, as both kv8 kernels compute them: INT8 Q per row
    (``sm_scale * log2 e`` folded in, rotated first when the cache holds rotated K)
    times the dequantized keys. Both twins start here."""
    head_dim = q_rows.shape[-1]
    group = q_rows.shape[1] // cache.num_kv_heads
    qk_scale = (head_dim**-0.5 if sm_scale is None else sm_scale) * math.log2(math.e)
    q = q_rows.float().transpose(0, 1)  # [Hq, E, D]
    if cache.rotated:
        q, qk_scale = q @ hadamard_matrix(head_dim, device=q.device), qk_scale / head_dim
    q_int, q_scale = quantize_int8_blocks(q * qk_scale, 1)
    keys = per_query_head(dequantize_kv8(cache, slots)[0], group)
    return (q_int * q_scale.double()) @ keys.transpose(1, 2)


def int8_pv_softmax_ref(
    s: torch.Tensor, values: torch.Tensor, value_scales: torch.Tensor, block_n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Twin of the exp2 online softmax with INT8 P·V (``kv8_tiles.kv8_pv``, PV_INT8)
    over key tiles of ``block_n``, as the kernel walks them: scores ``s [H, E, K]`` in
    log2 units (-inf masked), INT8 ``values [H, K, Dv]`` (as floats) with one scale
    per key ``value_scales [H, K]``. Returns the normalised output ``[H, E, Dv]`` and
    its log2-sum-exp2 ``[H, E]`` (what split-KV decode merges by)."""
    heads, rows, num_keys = s.shape
    m = torch.full((heads, rows, 1), extend_kv8._M_INIT.value, dtype=s.dtype, device=s.device)
    row_sum = torch.zeros_like(m)
    acc = torch.zeros(heads, rows, values.shape[-1], dtype=s.dtype, device=s.device)
    for lo in range(0, num_keys, block_n):
        tile = slice(lo, lo + block_n)
        m_new = torch.maximum(m, s[..., tile].amax(-1, keepdim=True))
        p, alpha = torch.exp2(s[..., tile] - m_new), torch.exp2(m - m_new)
        row_sum = row_sum * alpha + p.sum(-1, keepdim=True)
        tile_scale = value_scales[:, tile].amax(-1, keepdim=True).clamp_min(1e-30)  # [H, 1]
        p_v = p * (value_scales[:, tile] / tile_scale)[:, None, :]
        row_max = p_v.amax(-1, keepdim=True).clamp_min(1e-30)
        p_int8 = torch.floor(p_v * (127.0 / row_max) + 0.5)
        product = p_int8 @ values[:, tile]
        acc = acc * alpha + product * row_max * (tile_scale[:, None] / 127.0)
        m = m_new
    out = acc / torch.where(row_sum == 0, 1.0, row_sum)
    return out, (m + torch.log2(row_sum))[..., 0]


def sage_decode_kv8_ref(
    q: torch.Tensor,
    o: torch.Tensor,
    cache: KV8Cache,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    sm_scale: float | None = None,
    pv_int8: bool = False,
    num_kv_splits: torch.Tensor | None = None,
) -> None:
    """Twin: a decode step is an extend of one-token chunks (bottom-right causal lets
    each see its whole sequence), so the extend twin's INT8 Q and exact fp64 softmax
    over the dequantized cache serve both. With ``pv_int8`` the result depends on where
    tiles start, so the kernel's splits (``num_kv_splits``) are replayed: each split's
    tiles through ``int8_pv_softmax_ref``, merged by their log-sum-exp as stage 2 does."""
    batch = q.shape[0]
    qo_indptr = torch.arange(batch + 1, dtype=kv_indptr.dtype, device=q.device)
    if not pv_int8:
        sage_extend_attention_kv8_ref(
            q, o, cache, qo_indptr, kv_indptr, kv_indices, max_len_extend=1, sm_scale=sm_scale,
        )  # fmt: skip
        return
    group = q.shape[1] // cache.num_kv_heads
    whole_pages, _, block_n = kv8_read_plan(cache, q.device, decode_kv8.BLOCK_N, decode_kv8.USE_TMA)
    kv, splits_of = kv_indptr.tolist(), num_kv_splits.tolist()
    for b in range(batch):
        kv_len = kv[b + 1] - kv[b]
        slots = kv_indices[kv[b] : kv[b + 1]]
        scores = kv8_scores_ref(q[b : b + 1], cache, slots, sm_scale)[:, 0]  # [Hq, K]
        _, _, v_int8, v_scale = kv8_token_rows(cache, slots)
        value_int8, value_scale = per_query_head(v_int8, group), per_query_head(v_scale, group)
        per_split = triton.cdiv(triton.cdiv(kv_len, splits_of[b]), _MIN_BLOCK_KV) * _MIN_BLOCK_KV
        outs, lses = [], []
        for lo in range(0, kv_len, per_split):
            hi = min(lo + per_split, kv_len)
            first = (lo // block_n) * block_n if whole_pages else lo
            keys = torch.arange(first, hi, device=q.device)
            inside = keys >= lo  # a whole-page split's first tile starts below lo
            split_scores = scores[:, first:hi].masked_fill(~inside, float("-inf"))
            out, lse = int8_pv_softmax_ref(
                split_scores[:, None, :],
                values=value_int8[:, first:hi],
                value_scales=value_scale[:, first:hi] * inside,
                block_n=block_n,
            )
            outs.append(out[:, 0])
            lses.append(lse[:, 0])
        lse = torch.stack(lses)  # [splits, Hq]
        weights = (lse - lse.amax(0)).exp2()
        merged = (weights[..., None] * torch.stack(outs)).sum(0) / weights.sum(0)[:, None]
        o[b] = merged.to(o.dtype)


def dense_attention_ref(
    q, k, v, o, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, sm_scale
) -> None:
    """Twin of ``kv8_flash``'s FlashAttention call (a ``DenseAttention``): request b's
    query rows ``cu_seqlens_q[b]:[b+1]`` of ``q [N, Hq, D]`` against its key rows
    ``cu_seqlens_k[b]:[b+1]`` of ``k``/``v [M, Hkv, D(v)]``, bottom-right causal, exact
    softmax in fp64; writes ``o [N, Hq, Dv]``."""
    del max_seqlen_q, max_seqlen_k
    qo, kv = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    group = q.shape[1] // k.shape[1]
    for b in range(len(qo) - 1):
        num_queries, kv_len = qo[b + 1] - qo[b], kv[b + 1] - kv[b]
        if num_queries == 0:
            continue
        queries = q[qo[b] : qo[b + 1]].double().transpose(0, 1)  # [Hq, E, D]
        keys = per_query_head(k[kv[b] : kv[b + 1]], group)
        values = per_query_head(v[kv[b] : kv[b + 1]], group)
        s = (queries @ keys.transpose(1, 2)) * sm_scale
        visible = visible_keys(num_queries, kv_len, kv_len - num_queries, True, s.device)
        s = s.masked_fill(~visible, float("-inf"))
        o[qo[b] : qo[b + 1]] = (s.softmax(-1) @ values).transpose(0, 1).to(o.dtype)
