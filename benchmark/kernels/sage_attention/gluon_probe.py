"""Probe: an FA3-style 8-bit SageAttention forward kernel for Hopper, in Gluon (triton 3.6).

Standalone (torch + triton only). Not a product kernel: dense, per-(batch*head) contiguous rows,
no paging / GQA, head dim 128. The product kernel grown from it is
python/sglang/srt/layers/attention/sage_attention/hopper_attention.py; this file stays as the
reproducer of RESULTS.md's tuning-log entry 7 and of the variants the product does not ship
(one consumer warpgroup, three stages, ping-pong).

    S = int8(Q) . int8(K)^T -> int32 (wgmma); p = exp2(s_int * (q_scale * k_scale) - m)
    O = P . V: P fp16 with V fp16 [N, D], or P fp8 e4m3 (scaled into [0, 448]) with V fp8
        stored d-major [D, N] so that both wgmma operands are K-major

q_scale (one per query row) already holds sm_scale * log2(e); k_scale is one per 128-key tile;
the fp8 V has one scale per channel, applied to O at the end.

Design (FA3-like): one producer warp issues TMA loads of Q (once) and of K/V tiles into a
STAGES-deep shared-memory ring (k_ready / v_ready / kv_empty mbarriers); NUM_WG consumer
warpgroups (the default partition plus NUM_WG-1 worker partitions) each own 64 query rows of a
64*NUM_WG-row CTA tile and run the online softmax. OVERLAP=1: each consumer issues
S_{j+1} = Q K_{j+1}^T and O += P_j V_j (async wgmma) before the softmax of S_{j+1}, so the tensor
core works during the softmax (intra-warpgroup overlap). PINGPONG=1 (NUM_WG=2): the consumers
take turns issuing their wgmmas (an mbarrier token passed back and forth), as FA3 does.

GPU machine:      python3 benchmark/kernels/sage_attention/gluon_probe.py [--quick] [--only S ..]
sm_90, no GPU:    python3 benchmark/kernels/sage_attention/gluon_probe.py --compile-only

Seen on an H200 (torch 2.11, triton 3.6, one run, ~75 s; kernel only, pre-quantised inputs;
H=32, D=128, Z = 32768 // N; every config cos >= 0.9992 vs fp32 on plain and K-bias inputs):
  wg2_simple fp8 P.V    8K: 784 TOPS (1.22x cuDNN), causal 780 (1.42x)
                        32K: 804 (1.30x), causal 808 (1.36x)
  wg2_overlap fp16 P.V  8K: 712 (1.11x), causal 667 (1.22x); 32K: 731 (1.18x), causal 668 (1.12x)
  Intra-WG overlap helps fp16 P.V (636 -> 712) but not fp8 P.V (784 -> 714); one consumer WG:
  500-620; fp8 "promote" (max_num_imprecise_acc=128) costs ~40% for no measurable accuracy.
  The torch quantisation here is unfused (4.7 / 6.5 ms at 8K), so "+quant" ratios are pessimistic.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from functools import partial

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

LOG2_448 = gl.constexpr(
    8.80
)  # a bit below log2(448) = 8.8074 so exp2(.) never leaves the e4m3 range


# ------------------------------------------------------------------------------------------------
# Partitions
# ------------------------------------------------------------------------------------------------
@gluon.jit
def _producer(
    q_desc,
    k_desc,
    v_desc,
    q_smem,
    k_smem,
    v_smem,
    q_bar,
    k_ready,
    v_ready,
    kv_empty,
    q_row,
    kv_row,
    v_row,
    n_tiles,
    BN: gl.constexpr,
    NUM_WG: gl.constexpr,
    STAGES: gl.constexpr,
    FP8_PV: gl.constexpr,
):
    # Q: NUM_WG tiles of WG_M rows, one barrier for all of them.
    q_bytes: gl.constexpr = NUM_WG * q_desc.block_type.nbytes
    mbarrier.expect(q_bar, q_bytes)
    for w in gl.static_range(NUM_WG):
        tma.async_copy_global_to_shared(q_desc, [q_row + w * 64, 0], q_bar, q_smem.index(w))
    for j in range(n_tiles):
        st = j % STAGES
        ph = (j // STAGES) & 1
        # mbarriers start "phase 1 complete": the first wait on an untouched slot passes at once.
        mbarrier.wait(kv_empty.index(st), ph ^ 1)
        mbarrier.expect(k_ready.index(st), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(
            k_desc, [kv_row + j * BN, 0], k_ready.index(st), k_smem.index(st)
        )
        mbarrier.expect(v_ready.index(st), v_desc.block_type.nbytes)
        if FP8_PV:
            tma.async_copy_global_to_shared(
                v_desc, [v_row, j * BN], v_ready.index(st), v_smem.index(st)
            )
        else:
            tma.async_copy_global_to_shared(
                v_desc, [kv_row + j * BN, 0], v_ready.index(st), v_smem.index(st)
            )


@gluon.jit
def _softmax_tile(
    s,
    c,
    m,
    l,
    j,
    diag_tile,
    row_ids,
    BN: gl.constexpr,
    s_layout: gl.constexpr,
    CAUSAL: gl.constexpr,
    FP8_PV: gl.constexpr,
):
    """Online-softmax step on an int32 score tile. Returns (p fp32, new m, new l, alpha)."""
    if FP8_PV:
        bias: gl.constexpr = LOG2_448
    else:
        bias: gl.constexpr = 0.0
    if CAUSAL:
        if j >= diag_tile:
            # Masked keys get s = -2^30 (an int select, so the code below is shared): exp2 of
            # -2^30 * c - m is 0 as long as c > ~1e-7 (true unless a query row is ~all zero).
            cols = j * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, s_layout))
            keep = gl.expand_dims(cols, 0) <= gl.expand_dims(row_ids, 1)
            s = gl.where(keep, s, -(1 << 30))
    # c > 0, so max(s * c) = max(s) * c: an integer row max, then one FMA per score inside exp2.
    m_new = gl.maximum(m, gl.max(s, 1).to(gl.float32) * c)
    p = gl.exp2(s.to(gl.float32) * gl.expand_dims(c, 1) - gl.expand_dims(m_new - bias, 1))
    alpha = gl.exp2(m - m_new)
    l = l * alpha + gl.sum(p, 1)
    return p, m_new, l, alpha


@gluon.jit
def _pv_mma(p_op, v_tile, o, FP8_PV: gl.constexpr, PV_PROMOTE: gl.constexpr):
    """Async O += P . V. fp8: V tile is [D, BN] (K-major), viewed as [BN, D]."""
    if FP8_PV:
        if PV_PROMOTE > 0:
            tok = warpgroup_mma(
                p_op, v_tile.permute((1, 0)), o, is_async=True, max_num_imprecise_acc=PV_PROMOTE
            )
        else:
            tok = warpgroup_mma(p_op, v_tile.permute((1, 0)), o, is_async=True)
    else:
        tok = warpgroup_mma(p_op, v_tile, o, is_async=True)
    return tok


@gluon.jit
def _pv_wait(o_tok, p_op, FP8_PV: gl.constexpr):
    """Wait for O += P.V. P (a register operand) is kept alive as a dependency for fp16 only:
    triton 3.6's warpgroup_mma_wait lowering rejects 8-bit dependencies ("Unexpected bitwidth in
    WGMMAWaitGroupOp: 8"); for fp8, ptxas' wgmma pipeline analysis must keep P's registers."""
    if FP8_PV:
        o = warpgroup_mma_wait(0, deps=(o_tok,))
    else:
        o, p_op = warpgroup_mma_wait(0, deps=(o_tok, p_op))
    return o


@gluon.jit
def _consumer(
    o_desc,
    qscale_ptr,
    kscale_ptr,
    vscale_ptr,
    q_smem,
    k_smem,
    v_smem,
    o_smem,
    q_bar,
    k_ready,
    v_ready,
    kv_empty,
    turn_bars,
    q_row,
    q_pos,
    kscale_base,
    zh,
    n_tiles,
    diag_tile,
    WG: gl.constexpr,
    NUM_WG: gl.constexpr,
    D: gl.constexpr,
    BN: gl.constexpr,
    STAGES: gl.constexpr,
    CAUSAL: gl.constexpr,
    FP8_PV: gl.constexpr,
    OVERLAP: gl.constexpr,
    PINGPONG: gl.constexpr,
    PV_PROMOTE: gl.constexpr,
):
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 32]
    )
    if FP8_PV:
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 32]
        )
        p_dtype: gl.constexpr = gl.float8e4nv
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
    else:
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16]
        )
        p_dtype: gl.constexpr = gl.float16
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    orow_layout: gl.constexpr = gl.SliceLayout(1, o_layout)

    my_row = q_row + WG * 64
    rows_local = gl.arange(0, 64, layout=row_layout)
    qs = gl.load(qscale_ptr + my_row + rows_local)
    row_pos = rows_local + (q_pos + WG * 64)  # head-local query position (causal mask)
    s_zero = gl.zeros([64, BN], gl.int32, s_layout)
    o = gl.zeros([64, D], gl.float32, o_layout)
    m = gl.full([64], -1.0e30, gl.float32, row_layout)
    l = gl.zeros([64], gl.float32, row_layout)
    q = q_smem.index(WG)
    mbarrier.wait(q_bar, 0)
    if PINGPONG:
        # WG 0 goes first: it waits on phase 0 of its own turn barrier, which WG 1 pre-arrives.
        if WG == 1:
            mbarrier.arrive(turn_bars.index(0), count=1)

    if OVERLAP:
        # ---- prologue: S_0 and its softmax
        mbarrier.wait(k_ready.index(0), 0)
        if PINGPONG:
            mbarrier.wait(turn_bars.index(WG), 0)
        s_tok = warpgroup_mma(
            q, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True
        )
        if PINGPONG:
            mbarrier.arrive(turn_bars.index(1 - WG), count=1)
        s = warpgroup_mma_wait(0, deps=(s_tok,))
        c = qs * gl.load(kscale_ptr + kscale_base)
        p, m, l, alpha = _softmax_tile(
            s, c, m, l, 0, diag_tile, row_pos, BN, s_layout, CAUSAL, FP8_PV
        )
        p_op = gl.convert_layout(p.to(p_dtype), p_layout)
        for j in range(1, n_tiles):
            st = j % STAGES
            ph = (j // STAGES) & 1
            pst = (j - 1) % STAGES
            pph = ((j - 1) // STAGES) & 1
            ks = gl.load(kscale_ptr + kscale_base + j)
            mbarrier.wait(k_ready.index(st), ph)
            mbarrier.wait(v_ready.index(pst), pph)
            if PINGPONG:
                mbarrier.wait(turn_bars.index(WG), j & 1)
            s_tok = warpgroup_mma(
                q, k_smem.index(st).permute((1, 0)), s_zero, use_acc=False, is_async=True
            )
            o_tok = _pv_mma(p_op, v_smem.index(pst), o, FP8_PV, PV_PROMOTE)
            if PINGPONG:
                mbarrier.arrive(turn_bars.index(1 - WG), count=1)
            s = warpgroup_mma_wait(1, deps=(s_tok,))
            c = qs * ks
            p, m, l, alpha = _softmax_tile(
                s, c, m, l, j, diag_tile, row_pos, BN, s_layout, CAUSAL, FP8_PV
            )
            o = _pv_wait(o_tok, p_op, FP8_PV)
            mbarrier.arrive(kv_empty.index(pst), count=1)
            o = o * gl.expand_dims(gl.convert_layout(alpha, orow_layout), 1)
            p_op = gl.convert_layout(p.to(p_dtype), p_layout)
        # ---- epilogue: the last P.V
        lst = (n_tiles - 1) % STAGES
        lph = ((n_tiles - 1) // STAGES) & 1
        mbarrier.wait(v_ready.index(lst), lph)
        o_tok = _pv_mma(p_op, v_smem.index(lst), o, FP8_PV, PV_PROMOTE)
        o = _pv_wait(o_tok, p_op, FP8_PV)
        mbarrier.arrive(kv_empty.index(lst), count=1)
    else:
        for j in range(n_tiles):
            st = j % STAGES
            ph = (j // STAGES) & 1
            ks = gl.load(kscale_ptr + kscale_base + j)
            mbarrier.wait(k_ready.index(st), ph)
            if PINGPONG:
                mbarrier.wait(turn_bars.index(WG), (2 * j) & 1)
            s_tok = warpgroup_mma(
                q, k_smem.index(st).permute((1, 0)), s_zero, use_acc=False, is_async=True
            )
            if PINGPONG:
                mbarrier.arrive(turn_bars.index(1 - WG), count=1)
            s = warpgroup_mma_wait(0, deps=(s_tok,))
            c = qs * ks
            p, m, l, alpha = _softmax_tile(
                s, c, m, l, j, diag_tile, row_pos, BN, s_layout, CAUSAL, FP8_PV
            )
            o = o * gl.expand_dims(gl.convert_layout(alpha, orow_layout), 1)
            p_op = gl.convert_layout(p.to(p_dtype), p_layout)
            mbarrier.wait(v_ready.index(st), ph)
            if PINGPONG:
                mbarrier.wait(turn_bars.index(WG), (2 * j + 1) & 1)
            o_tok = _pv_mma(p_op, v_smem.index(st), o, FP8_PV, PV_PROMOTE)
            if PINGPONG:
                mbarrier.arrive(turn_bars.index(1 - WG), count=1)
            o = _pv_wait(o_tok, p_op, FP8_PV)
            mbarrier.arrive(kv_empty.index(st), count=1)

    # ---- epilogue: normalise, per-channel V scale, bf16, TMA store
    inv_l = 1.0 / gl.convert_layout(l, orow_layout)
    o = o * gl.expand_dims(inv_l, 1)
    if FP8_PV:
        vs = gl.load(vscale_ptr + zh * D + gl.arange(0, D, layout=gl.SliceLayout(0, o_layout)))
        o = o * gl.expand_dims(vs, 0)
    out = o_smem.index(WG)
    out.store(o.to(gl.bfloat16))
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [my_row, 0], out)
    tma.store_wait(0)


@gluon.jit
def _consumer_worker(
    o_desc,
    qscale_ptr,
    kscale_ptr,
    vscale_ptr,
    q_smem,
    k_smem,
    v_smem,
    o_smem,
    q_bar,
    k_ready,
    v_ready,
    kv_empty,
    turn_bars,
    q_row,
    q_pos,
    kscale_base,
    zh,
    n_tiles,
    diag_tile,
    NUM_WG: gl.constexpr,
    D: gl.constexpr,
    BN: gl.constexpr,
    STAGES: gl.constexpr,
    CAUSAL: gl.constexpr,
    FP8_PV: gl.constexpr,
    OVERLAP: gl.constexpr,
    PINGPONG: gl.constexpr,
    PV_PROMOTE: gl.constexpr,
):
    _consumer(
        o_desc,
        qscale_ptr,
        kscale_ptr,
        vscale_ptr,
        q_smem,
        k_smem,
        v_smem,
        o_smem,
        q_bar,
        k_ready,
        v_ready,
        kv_empty,
        turn_bars,
        q_row,
        q_pos,
        kscale_base,
        zh,
        n_tiles,
        diag_tile,
        1,
        NUM_WG,
        D,
        BN,
        STAGES,
        CAUSAL,
        FP8_PV,
        OVERLAP,
        PINGPONG,
        PV_PROMOTE,
    )


@gluon.jit
def sage_fa3_kernel(
    q_desc,
    k_desc,
    v_desc,
    o_desc,
    qscale_ptr,
    kscale_ptr,
    vscale_ptr,
    N,
    D: gl.constexpr,
    BN: gl.constexpr,
    NUM_WG: gl.constexpr,
    STAGES: gl.constexpr,
    CAUSAL: gl.constexpr,
    FP8_PV: gl.constexpr,
    OVERLAP: gl.constexpr,
    PINGPONG: gl.constexpr,
    PV_PROMOTE: gl.constexpr,
    CONSUMER_REGS: gl.constexpr,
    PRODUCER_REGS: gl.constexpr,
):
    BM: gl.constexpr = 64 * NUM_WG
    n_mblocks = gl.num_programs(0)
    pid_m = gl.program_id(0)
    if CAUSAL:
        pid_m = n_mblocks - 1 - pid_m  # heaviest blocks first
    zh = gl.program_id(1)
    head_row = zh * N
    q_row = head_row + pid_m * BM
    if CAUSAL:
        n_tiles = gl.cdiv((pid_m + 1) * BM, BN)
        diag_tile = (pid_m * BM) // BN
    else:
        n_tiles = N // BN
        diag_tile = n_tiles
    kscale_base = zh * (N // BN)
    v_row = zh * D

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [NUM_WG, 64, D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(
        k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout
    )
    v_smem = gl.allocate_shared_memory(
        v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout
    )
    o_smem = gl.allocate_shared_memory(o_desc.dtype, [NUM_WG, 64, D], o_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(kv_empty.index(i), count=NUM_WG)
    for i in gl.static_range(2):
        mbarrier.init(turn_bars.index(i), count=1)
    fence_async_shared()

    # The argument tuples must be written inline: a tuple assigned to a variable first turns its
    # constexpr members into int32 tensors (triton 3.6).
    if NUM_WG == 2:
        gl.warp_specialize(
            [
                (
                    _consumer,
                    (
                        o_desc,
                        qscale_ptr,
                        kscale_ptr,
                        vscale_ptr,
                        q_smem,
                        k_smem,
                        v_smem,
                        o_smem,
                        q_bar,
                        k_ready,
                        v_ready,
                        kv_empty,
                        turn_bars,
                        q_row,
                        pid_m * BM,
                        kscale_base,
                        zh,
                        n_tiles,
                        diag_tile,
                        0,
                        NUM_WG,
                        D,
                        BN,
                        STAGES,
                        CAUSAL,
                        FP8_PV,
                        OVERLAP,
                        PINGPONG,
                        PV_PROMOTE,
                    ),
                ),
                (
                    _consumer_worker,
                    (
                        o_desc,
                        qscale_ptr,
                        kscale_ptr,
                        vscale_ptr,
                        q_smem,
                        k_smem,
                        v_smem,
                        o_smem,
                        q_bar,
                        k_ready,
                        v_ready,
                        kv_empty,
                        turn_bars,
                        q_row,
                        pid_m * BM,
                        kscale_base,
                        zh,
                        n_tiles,
                        diag_tile,
                        NUM_WG,
                        D,
                        BN,
                        STAGES,
                        CAUSAL,
                        FP8_PV,
                        OVERLAP,
                        PINGPONG,
                        PV_PROMOTE,
                    ),
                ),
                (
                    _producer,
                    (
                        q_desc,
                        k_desc,
                        v_desc,
                        q_smem,
                        k_smem,
                        v_smem,
                        q_bar,
                        k_ready,
                        v_ready,
                        kv_empty,
                        q_row,
                        head_row,
                        v_row,
                        n_tiles,
                        BN,
                        NUM_WG,
                        STAGES,
                        FP8_PV,
                    ),
                ),
            ],
            [4, 1],
            [CONSUMER_REGS, PRODUCER_REGS],
        )
    else:
        gl.warp_specialize(
            [
                (
                    _consumer,
                    (
                        o_desc,
                        qscale_ptr,
                        kscale_ptr,
                        vscale_ptr,
                        q_smem,
                        k_smem,
                        v_smem,
                        o_smem,
                        q_bar,
                        k_ready,
                        v_ready,
                        kv_empty,
                        turn_bars,
                        q_row,
                        pid_m * BM,
                        kscale_base,
                        zh,
                        n_tiles,
                        diag_tile,
                        0,
                        NUM_WG,
                        D,
                        BN,
                        STAGES,
                        CAUSAL,
                        FP8_PV,
                        OVERLAP,
                        PINGPONG,
                        PV_PROMOTE,
                    ),
                ),
                (
                    _producer,
                    (
                        q_desc,
                        k_desc,
                        v_desc,
                        q_smem,
                        k_smem,
                        v_smem,
                        q_bar,
                        k_ready,
                        v_ready,
                        kv_empty,
                        q_row,
                        head_row,
                        v_row,
                        n_tiles,
                        BN,
                        NUM_WG,
                        STAGES,
                        FP8_PV,
                    ),
                ),
            ],
            [1],
            [PRODUCER_REGS],
        )


# ------------------------------------------------------------------------------------------------
# Host side
# ------------------------------------------------------------------------------------------------
# name -> kernel constexprs (BN = 128 everywhere; STAGES = K/V ring depth)
BASE = dict(D=128, BN=128, PV_PROMOTE=0, CONSUMER_REGS=240, PRODUCER_REGS=24)
VARIANTS = {
    "wg1_simple": dict(NUM_WG=1, STAGES=2, OVERLAP=0, PINGPONG=0),
    "wg1_overlap": dict(NUM_WG=1, STAGES=2, OVERLAP=1, PINGPONG=0),
    "wg2_simple": dict(NUM_WG=2, STAGES=2, OVERLAP=0, PINGPONG=0),
    "wg2_overlap": dict(NUM_WG=2, STAGES=2, OVERLAP=1, PINGPONG=0),
    "wg2_overlap_s3": dict(NUM_WG=2, STAGES=3, OVERLAP=1, PINGPONG=0),
    "wg2_pingpong": dict(NUM_WG=2, STAGES=2, OVERLAP=1, PINGPONG=1),
    "wg2_simple_s3": dict(NUM_WG=2, STAGES=3, OVERLAP=0, PINGPONG=0),
    "wg2_simple_pingpong": dict(NUM_WG=2, STAGES=2, OVERLAP=0, PINGPONG=1),
    "wg2_pingpong_s3": dict(NUM_WG=2, STAGES=3, OVERLAP=1, PINGPONG=1),
}


def kernel_constexprs(variant: str, causal: bool, fp8_pv: bool, promote: bool = False) -> dict:
    cfg = dict(BASE, **VARIANTS[variant], CAUSAL=int(causal), FP8_PV=int(fp8_pv))
    if promote and fp8_pv:
        cfg["PV_PROMOTE"] = cfg["BN"]  # fp8 P.V: add each tile's product into the fp32 accumulator
    return cfg


def make_descs(q8, k8, v, o, cfg, n):
    """Host TensorDescriptors. q8/k8: int8 [R, D]; v: fp16 [R, D] or fp8 [ZH*D, N]; o: bf16."""
    d, bn = cfg["D"], cfg["BN"]
    i8, f16, f8, bf16 = gl.int8, gl.float16, gl.float8e4nv, gl.bfloat16
    q_desc = TensorDescriptor.from_tensor(
        q8, [64, d], gl.NVMMASharedLayout.get_default_for([64, d], i8)
    )
    k_desc = TensorDescriptor.from_tensor(
        k8, [bn, d], gl.NVMMASharedLayout.get_default_for([bn, d], i8)
    )
    if cfg["FP8_PV"]:
        v_desc = TensorDescriptor.from_tensor(
            v, [d, bn], gl.NVMMASharedLayout.get_default_for([d, bn], f8)
        )
    else:
        v_desc = TensorDescriptor.from_tensor(
            v, [bn, d], gl.NVMMASharedLayout.get_default_for([bn, d], f16)
        )
    o_desc = TensorDescriptor.from_tensor(
        o, [64, d], gl.NVMMASharedLayout.get_default_for([64, d], bf16)
    )
    return q_desc, k_desc, v_desc, o_desc


def num_warps_for(cfg):
    return 4  # the default partition (consumer warpgroup 0); workers are added by warp_specialize


def grid_for(cfg, zh, n):
    return (n // (64 * cfg["NUM_WG"]), zh)


def launch(cfg, q8, k8, v, o, qs, ks, vs, zh, n):
    descs = make_descs(q8, k8, v, o, cfg, n)
    return sage_fa3_kernel[grid_for(cfg, zh, n)](
        *descs, qs, ks, vs, n, **cfg, num_warps=num_warps_for(cfg)
    )


# ---------------------------------------------------------------- compile-only (no GPU)
class _FakeTensor:
    """Just enough of a tensor for Triton's argument specialisation and TensorDescriptor."""

    def __init__(self, dtype: str, shape):
        self.dtype, self.shape = dtype, list(shape)

    def data_ptr(self):
        return 1 << 20

    def stride(self):
        return [self.shape[1], 1]


def compile_only(configs, arch=90):
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    zh, n, d = 2, 1024, 128
    r = zh * n
    rows = []
    for name, causal, fp8, promote in configs:
        cfg = kernel_constexprs(name, causal, fp8, promote)
        label = config_label(name, causal, fp8, promote)
        t0 = time.time()
        try:
            q8, k8 = _FakeTensor("int8", (r, d)), _FakeTensor("int8", (r, d))
            v = _FakeTensor("float8_e4m3fn", (zh * d, n)) if fp8 else _FakeTensor("float16", (r, d))
            o = _FakeTensor("bfloat16", (r, d))
            f32 = _FakeTensor("float32", (r,))
            descs = make_descs(q8, k8, v, o, cfg, n)
            bound = dict(
                zip(["q_desc", "k_desc", "v_desc", "o_desc"], descs, strict=True),
                qscale_ptr=f32,
                kscale_ptr=f32,
                vscale_ptr=f32,
                N=n,
                **cfg,
            )
            fn = sage_fa3_kernel
            signature, constexprs, attrs = {}, {}, {}
            for i, p in enumerate(fn.params):
                val = bound[p.name]
                if p.is_constexpr:
                    signature[p.name] = "constexpr"
                    constexprs[(i,)] = val
                    continue
                kind, key = native_specialize_impl(BaseBackend, val, False, True, True)
                signature[p.name] = kind
                if isinstance(key, str):
                    attrs[(i,)] = BaseBackend.parse_attr(key)
            src = GluonASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
            k = triton.compile(
                src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps_for(cfg))
            )
            ptx = k.asm["ptx"]
            res = _resource_usage(k.asm["cubin"], ptx)
            info = dict(
                res,
                smem_meta=k.metadata.shared,
                wgmma=ptx.count("wgmma.mma_async"),
                setmaxnreg=ptx.count("setmaxnreg"),
            )
            rows.append((label, "OK", info, time.time() - t0))
            print(
                f"{label:40s} OK  regs={info.get('regs')} smem={k.metadata.shared} "
                f"wgmma_ptx={info['wgmma']} "
                f"setmaxnreg={info['setmaxnreg']} stack={info.get('stack')} {info.get('warn', '')} "
                f"({time.time() - t0:.1f}s)",
                flush=True,
            )
        except Exception as e:  # noqa: BLE001
            if "-v" in sys.argv or "--verbose" in sys.argv:
                traceback.print_exc()
            rows.append(
                (label, "FAIL", str(e).splitlines()[-1] if str(e) else repr(e), time.time() - t0)
            )
            print(f"{label:40s} FAIL {type(e).__name__}: {str(e)[-3000:]}", flush=True)
    return rows


def _resource_usage(cubin: bytes, ptx: str) -> dict:
    """Registers / stack from cuobjdump and ptxas warnings (e.g. serialised wgmma), with the
    tools shipped in the triton wheel."""
    import os
    import re
    import subprocess
    import tempfile

    from triton import knobs

    out = {}
    tool_dir = os.path.dirname(knobs.nvidia.ptxas.path)
    with tempfile.TemporaryDirectory() as tmp:
        cubin_path = os.path.join(tmp, "k.cubin")
        with open(cubin_path, "wb") as f:
            f.write(cubin)
        try:
            txt = subprocess.run(
                [os.path.join(tool_dir, "cuobjdump"), "-res-usage", cubin_path],
                capture_output=True,
                text=True,
            ).stdout
            m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", txt)
            if m:
                out.update(regs=int(m.group(1)), stack=int(m.group(2)), static_smem=int(m.group(3)))
        except OSError:
            pass
        ptx_path = os.path.join(tmp, "k.ptx")
        with open(ptx_path, "w") as f:
            f.write(ptx)
        try:
            r = subprocess.run(
                [
                    knobs.nvidia.ptxas.path,
                    "-v",
                    "--gpu-name",
                    "sm_90a",
                    ptx_path,
                    "-o",
                    os.path.join(tmp, "k2.cubin"),
                ],
                capture_output=True,
                text=True,
            )
            warns = [
                ln.split("warning :")[-1].strip() for ln in r.stderr.splitlines() if "warning" in ln
            ]
            if warns:
                out["warn"] = "PTXAS-WARN: " + " | ".join(sorted(set(warns)))[:300]
        except OSError:
            pass
    return out


def config_label(name, causal, fp8, promote=False):
    mask = "causal" if causal else "full"
    pv = ("fp8" if fp8 else "fp16") + "PV" + ("+promote" if promote else "")
    return f"{name}/{mask}/{pv}"


def all_configs():
    out = []
    for name in VARIANTS:
        for causal in (False, True):
            for fp8 in (False, True):
                out.append((name, causal, fp8, False))
    for name in ("wg2_overlap",):
        for causal in (False, True):
            out.append((name, causal, True, True))
    return out


# ---------------------------------------------------------------- GPU run
def quantize(q, k, v, bn=128, fp8_pv=False):
    """Sage-style quantisation in torch. q, k, v: bf16 [Z, H, N, D].
    Q: int8 per row, scale * sm_scale * log2(e); K: smoothed (minus the per-head channel mean),
    int8 per 128-key tile; V: fp16 [R, D], or fp8 e4m3 per-channel scale, d-major [Z*H*D, N]."""
    import torch

    z, h, n, d = q.shape
    qf = q.float()
    qa = qf.abs().amax(-1, keepdim=True).clamp_min(1e-6) / 127.0
    q8 = (qf / qa).round().to(torch.int8).reshape(-1, d)
    qs = (qa * (d**-0.5) * 1.4426950408889634).reshape(-1).contiguous()
    kf = k.float()
    kf = kf - kf.mean(dim=2, keepdim=True)
    kt = kf.reshape(z, h, n // bn, bn, d)
    ka = kt.abs().amax(dim=(-1, -2), keepdim=True).clamp_min(1e-6) / 127.0
    k8 = (kt / ka).round().to(torch.int8).reshape(-1, d)
    ks = ka.reshape(-1).contiguous()
    if fp8_pv:
        vf = v.float()
        va = vf.abs().amax(dim=2, keepdim=True).clamp_min(1e-6) / 448.0  # [z, h, 1, d]
        v8 = (vf / va).to(torch.float8_e4m3fn).transpose(2, 3).contiguous().reshape(z * h * d, n)
        vs = va.reshape(-1).contiguous()
        return q8, qs, k8, ks, v8, vs
    return q8, qs, k8, ks, v.to(torch.float16).reshape(-1, d), qs  # vs unused for fp16


def reference(q, k, v, heads, rows, causal):
    """fp32 softmax(QK^T/sqrt(d)) V for the given (z, h) heads and query rows."""
    import torch

    outs = []
    d = q.shape[-1]
    for z, h in heads:
        qf, kf, vf = q[z, h, rows].float(), k[z, h].float(), v[z, h].float()
        s = (qf @ kf.T) * d**-0.5
        if causal:
            keep = torch.arange(kf.shape[0], device=q.device)[None, :] <= rows[:, None]
            s = s.masked_fill(~keep, float("-inf"))
        outs.append(torch.softmax(s, -1) @ vf)
    return torch.stack(outs)


def run_gpu(args):
    import faulthandler

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev = "cuda"
    print(
        f"torch {torch.__version__}  triton {triton.__version__}  {torch.cuda.get_device_name()}",
        flush=True,
    )
    torch.manual_seed(0)
    h, d = 32, 128
    seqs = [8192] if args.quick else [8192, 32768]
    configs = [
        c for c in all_configs() if not args.only or any(o in config_label(*c) for o in args.only)
    ]
    table = []
    t_start = time.time()
    for n in seqs:
        z = max(1, 32768 // n)
        zh, r = z * h, z * h * n
        q = torch.randn(z, h, n, d, device=dev, dtype=torch.bfloat16)
        k = torch.randn_like(q)
        v = torch.randn_like(q)
        kb = (k.float() + 4.0 * torch.randn(1, h, 1, d, device=dev)).to(
            torch.bfloat16
        )  # K per-channel bias
        heads = [(0, 0), (z - 1, h - 1)]
        rows = torch.cat(
            [torch.arange(0, 256, device=dev), torch.randint(256, n, (256,), device=dev).sort()[0]]
        )
        flops_full = 4 * z * h * n * n * d
        # cuDNN baseline
        base = {}
        for causal in (False, True):
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                ms = triton.testing.do_bench(
                    partial(F.scaled_dot_product_attention, q, k, v, is_causal=causal),
                    warmup=25,
                    rep=100,
                    return_mode="median",
                )
            base[causal] = ms
            fl = flops_full / (2 if causal else 1)
            print(
                f"N={n} Z={z} cuDNN SDPA bf16 {'causal' if causal else 'full  '}: {ms:.3f} ms "
                f"{fl / ms / 1e9:.0f} TFLOPS",
                flush=True,
            )
        quant = {}
        for fp8 in (False, True):
            ms = triton.testing.do_bench(
                partial(quantize, q, k, v, fp8_pv=fp8), warmup=5, rep=30, return_mode="median"
            )
            quant[fp8] = ms
            print(
                f"N={n} quantisation (torch, {'fp8' if fp8 else 'fp16'} V): {ms:.3f} ms", flush=True
            )
        inputs = {
            fp8: {"plain": quantize(q, k, v, fp8_pv=fp8), "kbias": quantize(q, kb, v, fp8_pv=fp8)}
            for fp8 in (False, True)
        }
        refs = {
            (causal, var): reference(q, kk, v, heads, rows, causal)
            for causal in (False, True)
            for var, kk in (("plain", k), ("kbias", kb))
        }
        o = torch.empty(r, d, device=dev, dtype=torch.bfloat16)
        for name, causal, fp8, promote in configs:
            label = config_label(name, causal, fp8, promote)
            cfg = kernel_constexprs(name, causal, fp8, promote)
            faulthandler.dump_traceback_later(
                90, exit=True
            )  # a hung kernel (mbarrier deadlock) ends the run
            try:
                accs = []
                for var in ("plain", "kbias"):
                    q8, qs, k8, ks, vv, vs = inputs[fp8][var]
                    o.fill_(float("nan"))
                    launch(cfg, q8, k8, vv, o, qs, ks, vs, zh, n)
                    torch.cuda.synchronize()
                    out = torch.stack(
                        [o.view(z, h, n, d)[zz, hh, rows].float() for zz, hh in heads]
                    )
                    ref = refs[(causal, var)]
                    cos = F.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item()
                    rl1 = ((out - ref).abs().sum() / ref.abs().sum()).item()
                    nan = bool(torch.isnan(out).any().item())
                    accs.append((var, cos, rl1, nan))
                ok = all(c >= 0.999 and not nn for _, c, _, nn in accs)
                acc_txt = " ".join(
                    f"{var}: cos={c:.5f} relL1={e:.4f}{' NaN!' if nn else ''}"
                    for var, c, e, nn in accs
                )
                q8, qs, k8, ks, vv, vs = inputs[fp8]["plain"]
                descs = make_descs(q8, k8, vv, o, cfg, n)
                grid = grid_for(cfg, zh, n)

                fn = partial(
                    sage_fa3_kernel[grid],
                    *descs,
                    qs,
                    ks,
                    vs,
                    n,
                    **cfg,
                    num_warps=num_warps_for(cfg),
                )
                ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
                fl = flops_full / (2 if causal else 1)
                tops = fl / ms / 1e9
                ratio = base[causal] / ms
                ratio_q = base[causal] / (ms + quant[fp8])
                status = "ok" if ok else "FAIL"
                print(
                    f"N={n} {label:34s} {status:4s} {ms:.3f} ms {tops:5.0f} TOPS  "
                    f"x{ratio:.2f} cuDNN "
                    f"(x{ratio_q:.2f} with quant)  {acc_txt}",
                    flush=True,
                )
                table.append((n, label, status, tops, ratio, ratio_q, accs[0][1], accs[1][1]))
            except Exception as e:  # noqa: BLE001
                msg = str(e).strip().splitlines()
                print(
                    f"N={n} {label:34s} ERROR {type(e).__name__}: {msg[-1] if msg else ''}",
                    flush=True,
                )
                if args.verbose:
                    traceback.print_exc()
                table.append((n, label, "ERROR", 0.0, 0.0, 0.0, float("nan"), float("nan")))
            finally:
                faulthandler.cancel_dump_traceback_later()
        q = k = v = kb = inputs = refs = o = None  # free before the next sequence length
        torch.cuda.empty_cache()
    print(
        f"\n== summary ({time.time() - t_start:.0f} s); TOPS kernel only, "
        "ratios vs cuDNN bf16 on the same shapes =="
    )
    print(
        f"{'N':>6} {'config':34s} {'stat':5s} {'TOPS':>5} {'xcuDNN':>7} {'+quant':>7} "
        f"{'cos':>8} {'cos_kb':>8}"
    )
    for n, label, st, tops, ra, rq, c1, c2 in table:
        print(f"{n:6d} {label:34s} {st:5s} {tops:5.0f} {ra:7.2f} {rq:7.2f} {c1:8.5f} {c2:8.5f}")


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--compile-only", action="store_true", help="compile every config for sm_90, no GPU needed"
    )
    ap.add_argument("--quick", action="store_true", help="N=8192 only")
    ap.add_argument("--only", nargs="*", help="substrings of config labels to run")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    if args.compile_only:
        configs = [
            c
            for c in all_configs()
            if not args.only or any(o in config_label(*c) for o in args.only)
        ]
        rows = compile_only(configs)
        print(f"\n{sum(r[1] == 'OK' for r in rows)}/{len(rows)} configs compile for sm_90")
        return 0 if all(r[1] == "OK" for r in rows) else 1
    run_gpu(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
