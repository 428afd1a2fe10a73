"""Extend (prefill, radix hits, chunked prefill) over sage_attn's 8-bit KV cache.

``sage_extend_attention_kv8`` has ``sage_extend_attention``'s semantics, but every
key and value comes from the 8-bit cache (``kv8_cache.py``): request b's keys are
the slots ``kv_indices[kv_indptr[b]:kv_indptr[b+1]]`` -- its cached prefix, then
its new chunk, which the caller has already written with ``write_kv8`` (as SGLang
writes the chunk into its pool before attention). With ``causal``, chunk token i
sees the prefix and chunk tokens <= i (bottom-right). Nothing is re-quantized or
packed per call: the prefix is read as it is stored.

One program per (query block, KV head, request) takes the query heads of that KV
head together: its ``BLOCK_M`` rows are ``BLOCK_M / GROUP_ROWS`` chunk tokens times
``GROUP_ROWS`` (the GQA group, padded to a power of two) heads, so each gathered
K/V tile, and the conversion of its INT8 V, serves every head of the group (at 64
rows that is no fewer gathers per KV head than one program per query head: the
tuned tile, measured in RESULTS.md round 4, not the packing, made it fast). Q is
quantized once per block to INT8 (per row, ``sm_scale * log2(e)`` folded in;
rotated first when the cache holds rotated K), then an exp2 online softmax runs
over key tiles (``load_kv8_keys``: from page size 16 a tile is one page's run of
``min(P, 128)`` keys, by TMA on sm_90+; below, keys gathered one by one through
``kv_indices``):
INT8 Q·Kᵀ with one K scale per key (``kv8_scores``), FP16 P·V on the exact INT8 V
with V's row scales folded into P (``kv8_pv``). No host sync; the grid comes from
``max_len_extend``. Its pure-torch twin is ``kv8_reference.sage_extend_attention_kv8_ref``.

With ``kernel="gluon"`` on Hopper (pages of >= 64 tokens, hd 64/128) the call goes to
the warp-specialised Gluon kernel instead (``hopper_kv8.sage_extend_kv8_hopper``:
TMA page by page, wgmma, INT8 P·V; twin: the same function with ``pv_int8=True`` and
``block_n=hopper_kv8.STEP_N``). It runs 1.2-1.9x
this kernel from 256-token chunks, 1.06x (hd128) and 1.46x (hd64) at 128 (H100,
RESULTS.md round 13; at 64 tokens round 12's version ran 0.57x, not re-measured), and
the server sends this cache's kernel only chunks under 128 tokens where a
FlashAttention kernel loads, so "auto" keeps this one.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from sglang.srt.layers.attention.sage_attention.hopper_kv8 import (
    hopper_kv8_supports,
    sage_extend_kv8_hopper,
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
from sglang.srt.layers.attention.sage_attention.quantize import (
    block_key_bounds,
    quantized_q_block,
    query_block,
)

# Keys per inner step; (token, head) rows per program (more for a group larger than
# this); warps; steps in flight. Tuned on the H200 with
# benchmark/kernels/sage_attention/tune_kv8.py (RESULTS.md): 64 rows x 128 keys on 4
# warps ran 1.6x faster than 128 x 64 on 8 and 1.8x faster than 64 x 64.
BLOCK_N = 128
BLOCK_M = 64
NUM_WARPS = 4
NUM_STAGES = 2
# From page size 16, key tiles are min(page size, BLOCK_N) tokens of one page, read
# through TMA on sm_90+ (kv8_cache.kv8_read_plan); not yet measured (RESULTS.md round 8).
USE_TMA = True
# P·V in INT8 (kv8_tiles.kv8_pv: P per row and tile against the stored INT8 V) instead
# of FP16 on V converted: as accurate on the CPU run (RESULTS.md round 9), not yet timed
# on a GPU, so off by default until a benchmark row says it wins.
PV_INT8 = False
_M_INIT = tl.constexpr(-1.0e30)


@triton.jit
def _kv8_tiles(
    acc,
    l_i,
    m_i,
    q_int8,
    q_scale,
    k_int8,
    k_scale,
    v_int8,
    v_scale,
    k_page_src,
    v_page_src,
    kv_indices,
    kv_start,
    kv_head,
    num_kv_heads,
    row_token,
    prefix_len,
    kv_len,
    lo,
    hi,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WHOLE_PAGES: tl.constexpr,
    USE_TMA: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    FAST_CVT: tl.constexpr,
    PV_INT8: tl.constexpr,
):
    """Online softmax over keys [lo, hi) (both multiples of BLOCK_N but hi's last
    tile, so whole-page tiles start on a page's BLOCK_N-aligned slot); MASKED tiles
    check kv end and the causal edge (row r is chunk token ``row_token[r]``)."""
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        in_range = pos < kv_len
        key, key_scale, value, value_scale = load_kv8_keys(
            k_int8, k_scale, v_int8, v_scale, k_page_src, v_page_src, kv_indices + kv_start,
            start, in_range, kv_head, num_kv_heads, HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V,
            PAGE_SIZE=PAGE_SIZE, BLOCK_N=BLOCK_N, WHOLE_PAGES=WHOLE_PAGES, USE_TMA=USE_TMA,
        )  # fmt: skip
        s = kv8_scores(q_int8, q_scale, key, key_scale)
        if MASKED:
            visible = in_range[None, :]
            if CAUSAL:
                visible = visible & (pos[None, :] <= prefix_len + row_token[:, None])
            s = tl.where(visible, s, float("-inf"))
        acc, l_i, m_i = kv8_softmax_step(
            acc, l_i, m_i, s, value, value_scale, FAST_CVT, PV_INT8=PV_INT8
        )
    return acc, l_i, m_i


@triton.jit
def _sage_extend_kv8_kernel(
    q_extend,
    o_extend,
    k_int8,
    k_scale,
    v_int8,
    v_scale,
    k_page_src,  # kv8_page_sources: TMA descriptors or the buffers
    v_page_src,
    qo_indptr,
    kv_indptr,
    kv_indices,
    qk_scale_log2,
    stride_q_tok,
    stride_q_head,
    stride_o_tok,
    stride_o_head,
    num_kv_heads,
    KV_GROUP: tl.constexpr,
    GROUP_ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WHOLE_PAGES: tl.constexpr,
    USE_TMA: tl.constexpr,
    CAUSAL: tl.constexpr,
    ROTATE: tl.constexpr,
    FAST_CVT: tl.constexpr,
    PV_INT8: tl.constexpr,
):
    BLOCK_T: tl.constexpr = BLOCK_M // GROUP_ROWS  # chunk tokens per program
    kv_head = tl.program_id(1)
    b = tl.program_id(2)
    extend_start = tl.load(qo_indptr + b).to(tl.int64)
    extend_len = tl.load(qo_indptr + b + 1).to(tl.int64) - extend_start
    kv_start = tl.load(kv_indptr + b).to(tl.int64)
    kv_len = tl.load(kv_indptr + b + 1).to(tl.int64) - kv_start
    prefix_len = kv_len - extend_len
    in_grid, block_t = query_block(extend_len, BLOCK_T, CAUSAL)
    if not in_grid:
        return

    # Row r: token r // GROUP_ROWS of the block, head r % GROUP_ROWS of the group.
    rows = tl.arange(0, BLOCK_M)
    row_token = block_t * BLOCK_T + rows // GROUP_ROWS
    row_head = kv_head * KV_GROUP + rows % GROUP_ROWS
    row_valid = (row_token < extend_len) & (rows % GROUP_ROWS < KV_GROUP)
    q_int8, q_scale = quantized_q_block(
        q_extend, first_token=extend_start, row_token=row_token, row_valid=row_valid,
        row_head=row_head, stride_q_tok=stride_q_tok, stride_q_head=stride_q_head,
        qk_scale_log2=qk_scale_log2, HEAD_DIM=HEAD_DIM, ROTATE=ROTATE,
    )  # fmt: skip

    acc = tl.zeros([BLOCK_M, HEAD_DIM_V], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], _M_INIT, dtype=tl.float32)
    free_hi, hi = block_key_bounds(prefix_len, kv_len, block_t, BLOCK_T, BLOCK_N, CAUSAL)
    # Two calls of one loop: unmasked tiles, then those crossing kv end or the diagonal.
    acc, l_i, m_i = _kv8_tiles(
        acc, l_i, m_i, q_int8, q_scale,
        k_int8=k_int8, k_scale=k_scale, v_int8=v_int8, v_scale=v_scale, k_page_src=k_page_src,
        v_page_src=v_page_src, kv_indices=kv_indices,
        kv_start=kv_start, kv_head=kv_head, num_kv_heads=num_kv_heads, row_token=row_token,
        prefix_len=prefix_len, kv_len=kv_len, lo=0, hi=free_hi,
        HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V, PAGE_SIZE=PAGE_SIZE, BLOCK_N=BLOCK_N,
        WHOLE_PAGES=WHOLE_PAGES, USE_TMA=USE_TMA, MASKED=False, CAUSAL=CAUSAL, FAST_CVT=FAST_CVT,
        PV_INT8=PV_INT8,
    )  # fmt: skip
    acc, l_i, m_i = _kv8_tiles(
        acc, l_i, m_i, q_int8, q_scale,
        k_int8=k_int8, k_scale=k_scale, v_int8=v_int8, v_scale=v_scale, k_page_src=k_page_src,
        v_page_src=v_page_src, kv_indices=kv_indices,
        kv_start=kv_start, kv_head=kv_head, num_kv_heads=num_kv_heads, row_token=row_token,
        prefix_len=prefix_len, kv_len=kv_len, lo=free_hi, hi=hi,
        HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V, PAGE_SIZE=PAGE_SIZE, BLOCK_N=BLOCK_N,
        WHOLE_PAGES=WHOLE_PAGES, USE_TMA=USE_TMA, MASKED=True, CAUSAL=CAUSAL, FAST_CVT=FAST_CVT,
        PV_INT8=PV_INT8,
    )  # fmt: skip

    offs_dv = tl.arange(0, HEAD_DIM_V)
    out = acc * (1.0 / tl.where(l_i == 0.0, 1.0, l_i))[:, None]
    o_rows = (extend_start + row_token) * stride_o_tok + row_head * stride_o_head
    tl.store(
        o_extend + o_rows[:, None] + offs_dv[None, :],
        out.to(o_extend.dtype.element_ty),
        mask=row_valid[:, None],
    )


def sage_extend_attention_kv8(
    q_extend: torch.Tensor,
    o_extend: torch.Tensor,
    cache: KV8Cache,
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    max_len_extend: int,
    sm_scale: float | None = None,
    causal: bool = True,
    pv_int8: bool | None = None,
    kernel: str = "auto",
) -> None:
    """8-bit attention of a chunk over the 8-bit cache; writes ``o_extend [N, Hq, Dv]``.

    q_extend [N, Hq, D] fp16/bf16; ``kv_indptr``/``kv_indices`` list each request's
    whole sequence (prefix, then chunk, the chunk already in the cache), so
    ``kv_len_b >= extend_len_b``. ``max_len_extend`` (a host int) sizes the grid.
    ``pv_int8``: the Triton kernel's P·V, INT8 or FP16 (None: the module's ``PV_INT8``).
    ``kernel``: "gluon" runs the Gluon kernel where ``hopper_kv8_supports`` (its P·V is
    INT8; an explicit ``pv_int8=False`` keeps the Triton kernel); "auto" and "triton"
    this one (the module docstring says why).
    """
    num_tokens, num_q_heads, head_dim = q_extend.shape
    cache.check_queries(q_extend, o_extend)
    if q_extend.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"sage_attn: q_extend dtype {q_extend.dtype} is not supported")
    if num_tokens == 0 or max_len_extend == 0:
        return
    batch = qo_indptr.shape[0] - 1
    sm_scale = head_dim**-0.5 if sm_scale is None else sm_scale
    if kernel == "gluon" and pv_int8 is not False and hopper_kv8_supports(cache, q_extend.device):
        sage_extend_kv8_hopper(
            q_extend, o_extend, cache, qo_indptr=qo_indptr, kv_indptr=kv_indptr,
            kv_indices=kv_indices, max_len_extend=max_len_extend, sm_scale=sm_scale,
            causal=causal,
        )  # fmt: skip
        return
    group = num_q_heads // cache.num_kv_heads
    group_rows = triton.next_power_of_2(group)
    # A program's rows hold at least one token's whole group (MQA-style models with up
    # to 128 query heads per KV head on a rank get 128-row programs).
    block_m = max(BLOCK_M, group_rows)
    if block_m > MAX_GROUP:
        raise ValueError(
            f"sage_attn: {group} query heads per KV head; the 8-bit cache's extend kernel "
            f"takes at most {MAX_GROUP}"
        )
    grid = (triton.cdiv(max_len_extend, block_m // group_rows), cache.num_kv_heads, batch)
    whole_pages, use_tma, block_n = kv8_read_plan(cache, q_extend.device, BLOCK_N, USE_TMA)
    k_page_src, v_page_src = kv8_page_sources(cache, block_n, use_tma)
    _sage_extend_kv8_kernel[grid](
        q_extend,
        o_extend,
        cache.k_int8,
        cache.k_scale,
        cache.v_int8,
        cache.v_scale,
        k_page_src,
        v_page_src,
        qo_indptr,
        kv_indptr,
        kv_indices,
        qk_scale_log2=sm_scale * math.log2(math.e),
        stride_q_tok=q_extend.stride(0),
        stride_q_head=q_extend.stride(1),
        stride_o_tok=o_extend.stride(0),
        stride_o_head=o_extend.stride(1),
        num_kv_heads=cache.num_kv_heads,
        KV_GROUP=group,
        GROUP_ROWS=group_rows,
        HEAD_DIM=head_dim,
        HEAD_DIM_V=cache.head_dim_v,
        PAGE_SIZE=cache.page_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        WHOLE_PAGES=whole_pages,
        USE_TMA=use_tma,
        CAUSAL=causal,
        ROTATE=cache.rotated,
        FAST_CVT=fast_int8_cvt(),
        PV_INT8=PV_INT8 if pv_int8 is None else pv_int8,
        num_warps=NUM_WARPS,
        num_stages=NUM_STAGES,
    )
