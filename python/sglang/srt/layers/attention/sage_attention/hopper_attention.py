"""sage_attn's Hopper (sm_90) attention kernel: FA3-style warp specialisation in Gluon.

Same inputs and the same quantized arithmetic as ``sage_attention_from_packed``
(``extend_attention.py``): one CTA per (128-query-row block, query head, request)
over the packed K/V of ``layout.py`` (``hopper_kv8.py`` reads the 8-bit cache's pages
with the same design). Inside a CTA:

- a 1-warp producer partition issues TMA loads of the CTA's two 64-row Q tiles
  (once) and of the request's K/V tiles into a ``STAGES``-deep shared-memory ring
  (``k_ready`` / ``v_ready`` / ``kv_empty`` mbarriers);
- two consumer warpgroups (the default partition and one worker) each own 64 of
  the 128 query rows and run the online softmax with wgmma: INT8 Q·Kᵀ -> int32,
  then FP16, FP8 or INT8 P·V into an fp32 accumulator (INT8: each tile's int32 P·V
  scaled in after its wgmma).

Q is quantized once per call by ``_quantize_q_kernel`` (plain Triton, the plain
kernel's prologue arithmetic) into a head-major ``[Hq, N, D]`` int8 buffer so a
head's rows are contiguous for TMA. A Q box may run into the next request's (or
head's) rows: those rows are computed but never stored (masked pointer stores).

Configs (measured on an H200 with the standalone probe ``gluon_probe.py``, since
deleted, in the kernel-v2 round: benchmark/kernels/sage_attention/RESULTS.md, "H200,
kernel v2", tuning log 7): FP8 P·V: ``wg2_simple``; FP16 P·V: ``wg2_overlap``
(S_{j+1} and P_j·V_j issued before the softmax of tile j+1). See ``HOPPER_CONFIGS``.

Triton 3.6 pitfalls kept from the probe: partition argument tuples are written
inline (a tuple bound to a name first turns constexpr members into tensors), and
``warpgroup_mma_wait`` cannot take an 8-bit register operand as a dependency.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

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
from sglang.srt.layers.attention.sage_attention.quantize import quantized_q_block

try:  # Gluon (triton >= 3.5); absent or different elsewhere.
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

    _GLUON_IMPORT_ERROR: Exception | None = None
except ImportError as exc:  # pragma: no cover - depends on the installed triton
    _GLUON_IMPORT_ERROR = exc

HOPPER_HEAD_DIMS = (64, 128)
# Query rows per consumer warpgroup (one wgmma M=64 tile) and per CTA (two warpgroups).
WG_M = 64
NUM_CONSUMERS = 2
BLOCK_M = WG_M * NUM_CONSUMERS


def hopper_kernel_available() -> bool:
    """The installed triton has the Gluon Hopper API this module is written against."""
    return _GLUON_IMPORT_ERROR is None


def gluon_import_error() -> str | None:
    """Why the Gluon Hopper API did not import (None when it did)."""
    return None if _GLUON_IMPORT_ERROR is None else repr(_GLUON_IMPORT_ERROR)


def hopper_kernel_supports(head_dim: int, head_dim_v: int) -> bool:
    """Head dims this kernel is built for: 64 or 128, equal for Q·Kᵀ and P·V."""
    return head_dim == head_dim_v and head_dim in HOPPER_HEAD_DIMS


@dataclass(frozen=True)
class HopperConfig:
    stages: int  # depth of the K/V shared-memory ring
    overlap: bool  # issue S_{j+1} = Q·K_{j+1}ᵀ and O += P_j·V_j before softmax(S_{j+1})
    pingpong: bool  # the two consumer warpgroups take turns issuing wgmmas (FA3)
    # FP8 P·V: add each tile's P·V into the fp32 accumulator (the plain kernel's
    # max_num_imprecise_acc=BLOCK_N) instead of accumulating in the wgmma's
    # reduced-precision accumulator.
    pv_promote: bool = False
    consumer_regs: int = 240  # setmaxnreg per consumer thread
    producer_regs: int = 24


# Measured in the product path (H200, hd128, 4 x 8K, 32/8 heads, Q pre-pass included;
# test_sage_attention_hopper.py --bench), TOPS full / causal, plain Triton kernel 611-620 / 559-584:
# FP8 P·V wg2_simple 682-689 / 643 (1.12-1.15x plain); with pv_promote 632-635 / 591-594
# (1.03-1.06x, bitwise equal to the plain kernel). Without promotion the output differs
# from the plain kernel by rel-L1 1.9e-3 at 8K keys (the wgmma's fp8 accumulator keeps
# fewer than 23 mantissa bits; the gap grows with the key count).
# FP16 P·V wg2_overlap 690-708 / 624-632; wg2_pingpong_s3 687-701 / 618-625 (a tie; the
# overlap needs 115 KB of shared memory instead of 164 KB).
HOPPER_CONFIGS = {
    PV.FP8: HopperConfig(stages=2, overlap=False, pingpong=False),
    PV.FP16: HopperConfig(stages=2, overlap=True, pingpong=False),
    # INT8 P·V: each tile's int32 P·V is scaled into the fp32 accumulator after its
    # wgmma, so the overlapped schedule (which accumulates inside the wgmma) does not apply.
    PV.INT8: HopperConfig(stages=2, overlap=False, pingpong=False),
}

# The same numbers as kernel constants (kernels only read constexpr globals).
_WG_M = tl.constexpr(WG_M)
_NUM_CONSUMERS = tl.constexpr(NUM_CONSUMERS)
_BLOCK_M = tl.constexpr(BLOCK_M)


@triton.jit(do_not_specialize=["num_tokens"])
def _quantize_q_kernel(
    q_extend,
    q_int8,
    q_scale,
    qk_scale_log2,
    num_tokens,
    stride_q_tok,
    stride_q_head,
    HEAD_DIM: tl.constexpr,
    BLOCK: tl.constexpr,
    ROTATE: tl.constexpr,
):
    """INT8 Q with sm_scale*log2(e) folded in, one scale per row: the plain kernel's
    prologue, written head-major (``q_int8 [Hq, N, D]``, ``q_scale [Hq, N]``)."""
    head = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs_m < num_tokens
    offs_d = tl.arange(0, HEAD_DIM)
    q_i8, scale = quantized_q_block(
        q_extend, first_token=0, row_token=offs_m.to(tl.int64), row_valid=valid, row_head=head,
        stride_q_tok=stride_q_tok, stride_q_head=stride_q_head, qk_scale_log2=qk_scale_log2,
        HEAD_DIM=HEAD_DIM, ROTATE=ROTATE,
    )  # fmt: skip
    out_rows = head.to(tl.int64) * num_tokens + offs_m
    tl.store(q_int8 + out_rows[:, None] * HEAD_DIM + offs_d[None, :], q_i8, mask=valid[:, None])
    tl.store(q_scale + out_rows, scale, mask=valid)


if hopper_kernel_available():
    # FP8 P·V: P comes out of exp2 scaled into e4m3's range; the factor cancels in 1/l.
    _LOG2_FP8_MAX = gl.constexpr(math.log2(FP8_E4M3_MAX))
    # INT8 P·V: P scaled to 127 against its tile's own row max (the plain kernel's _attn_tiles).
    _LOG2_INT8_MAX = gl.constexpr(math.log2(INT8_MAX))
    _INV_INT8_MAX = gl.constexpr(1.0 / INT8_MAX)
    _ROUND_MAGIC = gl.constexpr(ROUND_MAGIC)
    _ROUND_MAGIC_BITS = gl.constexpr(ROUND_MAGIC_BITS)
    # Finite start for the running max (a fully masked tile gives p = 0, alpha = 1).
    _M_INIT = gl.constexpr(-1.0e30)

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
        k_row,
        v_row,
        v_col,
        n_tiles,
        BLOCK_N: gl.constexpr,
        STAGES: gl.constexpr,
        V_TOKEN_MAJOR: gl.constexpr,
    ):
        """TMA loads: the CTA's Q tiles once, then K/V tile j (the packed rows from
        ``k_row`` / ``v_row``, ``v_col``) into ring slot j % STAGES."""
        mbarrier.expect(q_bar, _NUM_CONSUMERS * q_desc.block_type.nbytes)
        for w in gl.static_range(_NUM_CONSUMERS):
            tma.async_copy_global_to_shared(q_desc, [q_row + w * _WG_M, 0], q_bar, q_smem.index(w))
        for j in range(n_tiles):
            slot = j % STAGES
            phase = (j // STAGES) & 1
            # A fresh mbarrier reads as "phase 1 complete": the first pass over the ring
            # does not wait.
            mbarrier.wait(kv_empty.index(slot), phase ^ 1)
            mbarrier.expect(k_ready.index(slot), k_desc.block_type.nbytes)
            mbarrier.expect(v_ready.index(slot), v_desc.block_type.nbytes)
            k_coords = [k_row + j * BLOCK_N, 0]
            if V_TOKEN_MAJOR:  # [Hkv*Dv, T]: columns of this head's Dv rows
                v_coords = [v_row, v_col + j * BLOCK_N]
            else:
                v_coords = [k_row + j * BLOCK_N, 0]
            tma.async_copy_global_to_shared(
                k_desc, k_coords, k_ready.index(slot), k_smem.index(slot)
            )
            tma.async_copy_global_to_shared(
                v_desc, v_coords, v_ready.index(slot), v_smem.index(slot)
            )

    @gluon.jit
    def _softmax_tile(
        s_int,
        row_scale,
        m,
        l,
        masked,
        key0,
        q_pos,
        prefix_len,
        kv_len,
        BLOCK_N: gl.constexpr,
        s_layout: gl.constexpr,
        CAUSAL: gl.constexpr,
        PV_MODE: gl.constexpr,
    ):
        """One online-softmax step, the plain kernel's arithmetic.

        Returns (p, m, l, alpha, beta): INT8 P·V's p is the tile's int8 P (0..127)
        and beta the factor that takes its int32 P·V to the running max; beta is 1
        for the other modes, whose p is already relative to the running max."""
        if PV_MODE == "fp16":
            s = s_int.to(gl.float32)
        else:
            # Exact int32 -> fp32 through ROUND_MAGIC (|s| <= 128*127*127 < 2^22), no
            # cvt: +1-4% with 8-bit P·V, -5% with the fp16 schedule (H200, tuning log 9).
            s = (s_int + _ROUND_MAGIC_BITS).to(gl.float32, bitcast=True) - _ROUND_MAGIC
        if masked:  # tiles crossing kv end or the causal diagonal
            keys = key0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            visible = gl.expand_dims(keys < kv_len, 0)
            if CAUSAL:  # bottom-right: chunk row i sees keys <= prefix_len + i
                visible = visible & (
                    gl.expand_dims(keys, 0) <= gl.expand_dims(q_pos + prefix_len, 1)
                )
            s = gl.where(visible, s, float("-inf"))
        m_tile = gl.max(s, 1) * row_scale
        m_new = gl.maximum(m, m_tile)
        alpha = gl.exp2(m - m_new)
        if PV_MODE == "int8":
            m_ref = gl.maximum(m_tile, _M_INIT)
            p = gl.exp2(
                s * gl.expand_dims(row_scale, 1) - gl.expand_dims(m_ref - _LOG2_INT8_MAX, 1)
            )
            beta = gl.exp2(m_ref - m_new) * _INV_INT8_MAX
            l = l * alpha + gl.sum(p, 1) * beta
            # Rounded through ROUND_MAGIC (layout.py): P is the low byte of p + 1.5*2^23.
            p = (p + _ROUND_MAGIC).to(gl.int32, bitcast=True).to(gl.int8)
        else:
            if PV_MODE == "fp8":
                bias = m_new - _LOG2_FP8_MAX
            else:
                bias = m_new
            p = gl.exp2(s * gl.expand_dims(row_scale, 1) - gl.expand_dims(bias, 1))
            l = l * alpha + gl.sum(p, 1)
            beta = gl.full_like(alpha, 1.0)
        return p, m_new, l, alpha, beta

    @gluon.jit
    def _pv_mma(p_op, v_tile, o, pv_zero, PV_MODE: gl.constexpr, PV_PROMOTE: gl.constexpr):
        """Async O += P·V (INT8: a fresh int32 P·V from ``pv_zero``). 8-bit V tiles are
        [Dv, BLOCK_N] (K-major), viewed as [BLOCK_N, Dv]."""
        if PV_MODE == "int8":
            tok = warpgroup_mma(p_op, v_tile.permute((1, 0)), pv_zero, use_acc=False, is_async=True)
        elif PV_MODE == "fp8":
            if PV_PROMOTE:
                tok = warpgroup_mma(
                    p_op,
                    v_tile.permute((1, 0)),
                    o,
                    is_async=True,
                    max_num_imprecise_acc=v_tile.shape[1],
                )
            else:
                tok = warpgroup_mma(p_op, v_tile.permute((1, 0)), o, is_async=True)
        else:
            tok = warpgroup_mma(p_op, v_tile, o, is_async=True)
        return tok

    @gluon.jit
    def _pv_wait(o_tok, p_op, PV_MODE: gl.constexpr):
        """Wait for _pv_mma. P stays a dependency for FP16 only: triton 3.6 rejects 8-bit
        wait dependencies ("Unexpected bitwidth in WGMMAWaitGroupOp: 8")."""
        if PV_MODE != "fp16":
            o = warpgroup_mma_wait(0, deps=(o_tok,))
        else:
            o, p_op = warpgroup_mma_wait(0, deps=(o_tok, p_op))
        return o

    @gluon.jit
    def _consumer(
        q_smem,
        k_smem,
        v_smem,
        q_bar,
        k_ready,
        v_ready,
        kv_empty,
        turn_bars,
        q_scale_rows,
        k_scale_tiles,
        v_scale_channels,
        o_rows,
        stride_o_tok,
        block_row,
        extend_len,
        prefix_len,
        kv_len,
        n_tiles,
        first_masked_tile,
        WG: gl.constexpr,
        HEAD_DIM_V: gl.constexpr,
        BLOCK_N: gl.constexpr,
        STAGES: gl.constexpr,
        CAUSAL: gl.constexpr,
        PV_MODE: gl.constexpr,
        OVERLAP: gl.constexpr,
        PINGPONG: gl.constexpr,
        PV_PROMOTE: gl.constexpr,
    ):
        """One warpgroup: 64 query rows (chunk rows ``block_row + WG*64 + [0, 64)``).
        ``k_scale_tiles`` holds one K scale per tile, ``v_scale_channels`` V's
        per-channel scales."""
        INT32_PV: gl.constexpr = PV_MODE == "int8"
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 32]
        )
        if PV_MODE != "fp16":
            o_layout: gl.constexpr = gl.NVMMADistributedLayout(
                version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM_V, 32]
            )
            if INT32_PV:
                p_dtype: gl.constexpr = gl.int8
            else:
                p_dtype: gl.constexpr = gl.float8e4nv
            p_layout: gl.constexpr = gl.DotOperandLayout(
                operand_index=0, parent=o_layout, k_width=4
            )
        else:
            o_layout: gl.constexpr = gl.NVMMADistributedLayout(
                version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM_V, 16]
            )
            p_dtype: gl.constexpr = gl.float16
            p_layout: gl.constexpr = gl.DotOperandLayout(
                operand_index=0, parent=o_layout, k_width=2
            )
        row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
        o_row_layout: gl.constexpr = gl.SliceLayout(1, o_layout)

        # Chunk-local query positions of this warpgroup's rows; rows past the chunk get
        # scale 1 (finite garbage, never stored).
        q_pos = block_row + WG * _WG_M + gl.arange(0, _WG_M, layout=row_layout)
        q_scale = gl.load(q_scale_rows + q_pos, mask=q_pos < extend_len, other=1.0)
        s_zero = gl.zeros([_WG_M, BLOCK_N], gl.int32, s_layout)
        o = gl.zeros([_WG_M, HEAD_DIM_V], gl.float32, o_layout)
        pv_zero = gl.zeros([_WG_M, HEAD_DIM_V], gl.int32, o_layout)  # INT8 P·V's fresh accumulator
        m = gl.full([_WG_M], _M_INIT, gl.float32, row_layout)
        l = gl.zeros([_WG_M], gl.float32, row_layout)
        q = q_smem.index(WG)
        mbarrier.wait(q_bar, 0)
        if PINGPONG:
            # WG 0 issues first: WG 1 pre-arrives on WG 0's turn barrier.
            if WG == 1:
                mbarrier.arrive(turn_bars.index(0), count=1)

        if OVERLAP:
            # Prologue: S_0 and its softmax.
            mbarrier.wait(k_ready.index(0), 0)
            if PINGPONG:
                mbarrier.wait(turn_bars.index(WG), 0)
            s_tok = warpgroup_mma(
                q, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True
            )
            if PINGPONG:
                mbarrier.arrive(turn_bars.index(1 - WG), count=1)
            s = warpgroup_mma_wait(0, deps=(s_tok,))
            p, m, l, alpha, beta = _softmax_tile(
                s,
                q_scale * gl.load(k_scale_tiles),
                m,
                l,
                first_masked_tile <= 0,
                0,
                q_pos,
                prefix_len,
                kv_len,
                BLOCK_N,
                s_layout,
                CAUSAL,
                PV_MODE,
            )
            p_op = gl.convert_layout(p.to(p_dtype), p_layout)
            for j in range(1, n_tiles):
                slot = j % STAGES
                phase = (j // STAGES) & 1
                prev = (j - 1) % STAGES
                prev_phase = ((j - 1) // STAGES) & 1
                k_tile_scale = gl.load(k_scale_tiles + j)
                mbarrier.wait(k_ready.index(slot), phase)
                mbarrier.wait(v_ready.index(prev), prev_phase)
                if PINGPONG:
                    mbarrier.wait(turn_bars.index(WG), j & 1)
                s_tok = warpgroup_mma(
                    q, k_smem.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True
                )
                o_tok = _pv_mma(p_op, v_smem.index(prev), o, pv_zero, PV_MODE, PV_PROMOTE)
                if PINGPONG:
                    mbarrier.arrive(turn_bars.index(1 - WG), count=1)
                s = warpgroup_mma_wait(1, deps=(s_tok,))
                p, m, l, alpha, beta = _softmax_tile(
                    s,
                    q_scale * k_tile_scale,
                    m,
                    l,
                    j >= first_masked_tile,
                    j * BLOCK_N,
                    q_pos,
                    prefix_len,
                    kv_len,
                    BLOCK_N,
                    s_layout,
                    CAUSAL,
                    PV_MODE,
                )
                o = _pv_wait(o_tok, p_op, PV_MODE)
                mbarrier.arrive(kv_empty.index(prev), count=1)
                o = o * gl.expand_dims(gl.convert_layout(alpha, o_row_layout), 1)
                p_op = gl.convert_layout(p.to(p_dtype), p_layout)
            # The last P·V.
            last = (n_tiles - 1) % STAGES
            last_phase = ((n_tiles - 1) // STAGES) & 1
            mbarrier.wait(v_ready.index(last), last_phase)
            o_tok = _pv_mma(p_op, v_smem.index(last), o, pv_zero, PV_MODE, PV_PROMOTE)
            o = _pv_wait(o_tok, p_op, PV_MODE)
            mbarrier.arrive(kv_empty.index(last), count=1)
        else:
            for j in range(n_tiles):
                slot = j % STAGES
                phase = (j // STAGES) & 1
                row_scale = q_scale * gl.load(k_scale_tiles + j)
                mbarrier.wait(k_ready.index(slot), phase)
                if PINGPONG:
                    mbarrier.wait(turn_bars.index(WG), (2 * j) & 1)
                s_tok = warpgroup_mma(
                    q, k_smem.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True
                )
                if PINGPONG:
                    mbarrier.arrive(turn_bars.index(1 - WG), count=1)
                s = warpgroup_mma_wait(0, deps=(s_tok,))
                p, m, l, alpha, beta = _softmax_tile(
                    s,
                    row_scale,
                    m,
                    l,
                    j >= first_masked_tile,
                    j * BLOCK_N,
                    q_pos,
                    prefix_len,
                    kv_len,
                    BLOCK_N,
                    s_layout,
                    CAUSAL,
                    PV_MODE,
                )
                alpha_o = gl.expand_dims(gl.convert_layout(alpha, o_row_layout), 1)
                if not INT32_PV:
                    o = o * alpha_o
                p_op = gl.convert_layout(p.to(p_dtype), p_layout)
                mbarrier.wait(v_ready.index(slot), phase)
                if PINGPONG:
                    mbarrier.wait(turn_bars.index(WG), (2 * j + 1) & 1)
                o_tok = _pv_mma(p_op, v_smem.index(slot), o, pv_zero, PV_MODE, PV_PROMOTE)
                if PINGPONG:
                    mbarrier.arrive(turn_bars.index(1 - WG), count=1)
                if INT32_PV:
                    pv_int = _pv_wait(o_tok, p_op, PV_MODE)
                    beta_o = gl.expand_dims(gl.convert_layout(beta, o_row_layout), 1)
                    # |int32 P·V| < 2^22: back to fp32 through ROUND_MAGIC, no cvt.
                    pv_tile = (pv_int + _ROUND_MAGIC_BITS).to(gl.float32, bitcast=True)
                    o = o * alpha_o + (pv_tile - _ROUND_MAGIC) * beta_o
                else:
                    o = _pv_wait(o_tok, p_op, PV_MODE)
                mbarrier.arrive(kv_empty.index(slot), count=1)

        # Epilogue: 1/l (0 for rows that saw no key), per-channel V scale, masked stores
        # of the chunk's rows only (a TMA store could spill into the next request).
        l_o = gl.convert_layout(l, o_row_layout)
        inv_l = 1.0 / gl.where(l_o == 0.0, 1.0, l_o)
        channels = gl.arange(0, HEAD_DIM_V, layout=gl.SliceLayout(0, o_layout))
        channel_scale = gl.load(v_scale_channels + channels)
        out = o * gl.expand_dims(inv_l, 1) * gl.expand_dims(channel_scale, 0)
        out_pos = block_row + WG * _WG_M + gl.arange(0, _WG_M, layout=o_row_layout)
        offsets = gl.expand_dims(out_pos.to(gl.int64) * stride_o_tok, 1) + gl.expand_dims(
            channels, 0
        )
        gl.store(
            o_rows + offsets,
            out.to(o_rows.dtype.element_ty),
            mask=gl.expand_dims(out_pos < extend_len, 1),
        )

    @gluon.jit
    def ring_buffers(desc, depth: gl.constexpr):
        """``depth`` shared-memory buffers of one of ``desc``'s TMA boxes each."""
        return gl.allocate_shared_memory(desc.dtype, [depth] + desc.block_type.shape, desc.layout)

    @gluon.jit
    def stage_barriers(STAGES: gl.constexpr, RELEASES: gl.constexpr):
        """The load ring's mbarriers, initialised (the caller fences): Q's, then per
        stage K ready, V ready (one TMA arrival each) and empty (``RELEASES`` consumer
        arrivals)."""
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(kv_empty.index(i), count=RELEASES)
        return q_bar, k_ready, v_ready, kv_empty

    @gluon.jit
    def query_block(extend_len, CAUSAL: gl.constexpr):
        """(has_block, block_row): whether this program has a 128-row block of its
        request's chunk (the grid, from max_len_extend, bounds the blocks computed,
        whatever the chunk) and the block's first chunk row. Causal: the blocks nearest
        the diagonal see the most keys, so they are launched first."""
        num_m_blocks = gl.minimum(gl.cdiv(extend_len, _BLOCK_M), gl.num_programs(0))
        if CAUSAL:
            block_m = num_m_blocks - 1 - gl.program_id(0)
        else:
            block_m = gl.program_id(0)
        return gl.program_id(0) < num_m_blocks, (block_m * _BLOCK_M).to(gl.int32)

    @gluon.jit
    def key_steps(prefix_len, kv_len, block_row, STEP: gl.constexpr, CAUSAL: gl.constexpr):
        """(steps, first masked step) of a 128-row block over its keys in steps of
        STEP: causal blocks stop at their last row's diagonal (bottom-right: chunk row i
        sees keys <= prefix_len + i), and steps wholly left of the first row's diagonal
        need no mask. At least one step: the chunk is not empty."""
        if CAUSAL:
            free_hi = (prefix_len + block_row + 1) // STEP * STEP
            hi = gl.minimum(kv_len, prefix_len + block_row + _BLOCK_M)
        else:
            free_hi = kv_len // STEP * STEP
            hi = kv_len
        return gl.cdiv(hi, STEP).to(gl.int32), (free_hi // STEP).to(gl.int32)

    # Sizes are not specialised on (a value of 1 or divisibility by 16 would otherwise
    # compile a new variant per batch shape); they only enter scalar index math.
    @gluon.jit(do_not_specialize=["num_tokens", "num_rows", "num_kv_heads", "kv_group"])
    def _sage_hopper_kernel(
        q_desc,
        k_desc,
        v_desc,
        q_scale,
        k_scale,
        v_scale,
        o_extend,
        qo_indptr,
        kv_indptr,
        stride_o_tok,
        stride_o_head,
        num_tokens,
        num_rows,
        num_kv_heads,
        kv_group,
        HEAD_DIM: gl.constexpr,
        HEAD_DIM_V: gl.constexpr,
        BLOCK_N: gl.constexpr,
        CAUSAL: gl.constexpr,
        PV_MODE: gl.constexpr,
        STAGES: gl.constexpr,
        OVERLAP: gl.constexpr,
        PINGPONG: gl.constexpr,
        PV_PROMOTE: gl.constexpr,
        CONSUMER_REGS: gl.constexpr,
        PRODUCER_REGS: gl.constexpr,
    ):
        """One CTA per (128-row block, query head, request) over the bf16 cache's
        pre-pass output: ``kv_indptr`` is each request's cached prefix and the K/V
        descriptors address ``layout.py``'s rows."""
        q_head = gl.program_id(1)
        b = gl.program_id(2)
        _, prefix_len, extend_start, extend_len = request_bounds(qo_indptr, kv_indptr, b)
        has_block, block_row = query_block(extend_len, CAUSAL)
        if not has_block:  # before any barrier or partition exists
            return
        kv_len = prefix_len + extend_len
        kv_head = q_head // kv_group
        n_tiles, first_masked_tile = key_steps(prefix_len, kv_len, block_row, BLOCK_N, CAUSAL)

        # Row coordinates of the 2-D views the TMA descriptors were built on.
        q_row = (q_head.to(gl.int64) * num_tokens + extend_start + block_row).to(gl.int32)
        q_scale_rows = q_scale + q_head.to(gl.int64) * num_tokens + extend_start
        seg_start = segment_start(qo_indptr, kv_indptr, b, BLOCK_N)
        k_row = (kv_head.to(gl.int64) * num_rows + seg_start).to(gl.int32)
        # FP8 V is [Hkv * Dv, T]: the head picks the rows, the segment the columns.
        v_row = (kv_head * HEAD_DIM_V).to(gl.int32)
        v_col = seg_start.to(gl.int32)
        k_scale_tiles = (
            k_scale + kv_head.to(gl.int64) * (num_rows // BLOCK_N) + seg_start // BLOCK_N
        )
        v_scale_channels = v_scale + (b * num_kv_heads + kv_head).to(gl.int64) * HEAD_DIM_V
        o_rows = o_extend + extend_start * stride_o_tok + q_head.to(gl.int64) * stride_o_head

        q_smem = gl.allocate_shared_memory(
            q_desc.dtype, [_NUM_CONSUMERS, _WG_M, HEAD_DIM], q_desc.layout
        )
        k_smem = ring_buffers(k_desc, STAGES)
        v_smem = ring_buffers(v_desc, STAGES)
        # Both warpgroups release a stage.
        q_bar, k_ready, v_ready, kv_empty = stage_barriers(STAGES, _NUM_CONSUMERS)
        turn_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(turn_bars.index(i), count=1)
        fence_async_shared()

        # Argument tuples inline (see the module docstring).
        gl.warp_specialize(
            [
                (
                    _consumer,
                    (
                        q_smem,
                        k_smem,
                        v_smem,
                        q_bar,
                        k_ready,
                        v_ready,
                        kv_empty,
                        turn_bars,
                        q_scale_rows,
                        k_scale_tiles,
                        v_scale_channels,
                        o_rows,
                        stride_o_tok,
                        block_row,
                        extend_len.to(gl.int32),
                        prefix_len.to(gl.int32),
                        kv_len.to(gl.int32),
                        n_tiles,
                        first_masked_tile,
                        0,
                        HEAD_DIM_V,
                        BLOCK_N,
                        STAGES,
                        CAUSAL,
                        PV_MODE,
                        OVERLAP,
                        PINGPONG,
                        PV_PROMOTE,
                    ),
                ),
                (
                    _consumer,
                    (
                        q_smem,
                        k_smem,
                        v_smem,
                        q_bar,
                        k_ready,
                        v_ready,
                        kv_empty,
                        turn_bars,
                        q_scale_rows,
                        k_scale_tiles,
                        v_scale_channels,
                        o_rows,
                        stride_o_tok,
                        block_row,
                        extend_len.to(gl.int32),
                        prefix_len.to(gl.int32),
                        kv_len.to(gl.int32),
                        n_tiles,
                        first_masked_tile,
                        1,
                        HEAD_DIM_V,
                        BLOCK_N,
                        STAGES,
                        CAUSAL,
                        PV_MODE,
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
                        k_row,
                        v_row,
                        v_col,
                        n_tiles,
                        BLOCK_N,
                        STAGES,
                        PV_MODE != "fp16",
                    ),
                ),
            ],
            [4, 1],
            [CONSUMER_REGS, PRODUCER_REGS],
        )


def shared_descriptor(t: torch.Tensor, block: list[int]):
    """A TMA descriptor on ``t`` with boxes of ``block``, in wgmma's shared layout."""
    gl_dtype = {
        torch.int8: gl.int8, torch.float16: gl.float16, torch.float8_e4m3fn: gl.float8e4nv,
        torch.float32: gl.float32,
    }[t.dtype]  # fmt: skip
    layout = gl.NVMMASharedLayout.get_default_for(block, gl_dtype)
    return TensorDescriptor.from_tensor(t, block, layout)


def q_descriptor(q_int8: torch.Tensor):
    """Q on its head-major ``[Hq * N, D]`` view, one warpgroup's rows per box."""
    num_q_heads, num_tokens, head_dim = q_int8.shape
    return shared_descriptor(q_int8.view(num_q_heads * num_tokens, head_dim), [WG_M, head_dim])


def _descriptors(q_int8: torch.Tensor, packed: PackedKV):
    """Host TMA descriptors: Q, and K and V on the packed layout's tile views
    (``PackedKV.tile_views``)."""
    (k_view, k_tile), (v_view, v_tile) = packed.tile_views(KV_BLOCK)
    return (
        q_descriptor(q_int8),
        shared_descriptor(k_view, k_tile),
        shared_descriptor(v_view, v_tile),
    )


def quantized_q(q_extend: torch.Tensor, sm_scale: float, rotate: bool):
    """INT8 Q, head-major ``[Hq, N, D]``, and its row scales ``[Hq, N]``."""
    num_tokens, num_q_heads, head_dim = q_extend.shape
    q_int8 = torch.empty(
        (num_q_heads, num_tokens, head_dim), dtype=torch.int8, device=q_extend.device
    )
    q_scale = torch.empty((num_q_heads, num_tokens), dtype=torch.float32, device=q_extend.device)
    quant_rows = 64
    _quantize_q_kernel[(triton.cdiv(num_tokens, quant_rows), num_q_heads)](
        q_extend,
        q_int8,
        q_scale,
        qk_scale_log2=sm_scale * math.log2(math.e),
        num_tokens=num_tokens,
        stride_q_tok=q_extend.stride(0),
        stride_q_head=q_extend.stride(1),
        HEAD_DIM=head_dim,
        BLOCK=quant_rows,
        ROTATE=rotate,
        num_warps=4,
    )
    return q_int8, q_scale


def sage_attention_from_packed_hopper(
    q_extend: torch.Tensor,
    o_extend: torch.Tensor,
    packed: PackedKV,
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    max_len_extend: int,
    sm_scale: float,
    causal: bool,
    config: HopperConfig | None = None,
) -> None:
    """``sage_attention_from_packed`` on Hopper: same arguments, same semantics.

    q_extend [N, Hq, D] fp16/bf16 (last dim contiguous), o_extend [N, Hq, Dv];
    ``packed`` from ``quantize_kv``. D == Dv in {64, 128} (``hopper_kernel_supports``).
    ``config`` defaults to ``HOPPER_CONFIGS[packed.pv]``. No host sync; graph-capturable.
    """
    if not hopper_kernel_available():
        raise RuntimeError(f"sage_attn: Gluon is unavailable ({_GLUON_IMPORT_ERROR})")
    num_tokens, num_q_heads, head_dim = q_extend.shape
    num_kv_heads, num_rows = packed.k_int8.shape[0], packed.k_int8.shape[1]
    head_dim_v = o_extend.shape[2]
    if not hopper_kernel_supports(head_dim, head_dim_v):
        raise ValueError(f"sage_attn: Hopper kernel has no (qk={head_dim}, v={head_dim_v}) variant")
    if num_tokens == 0 or max_len_extend == 0:
        return
    config = config or HOPPER_CONFIGS[packed.pv]
    if config.overlap and packed.pv is PV.INT8:
        raise ValueError("sage_attn: INT8 P·V has no overlapped Hopper schedule")
    batch_size = qo_indptr.shape[0] - 1
    q_int8, q_scale = quantized_q(q_extend, sm_scale, packed.rotated)
    q_desc, k_desc, v_desc = _descriptors(q_int8, packed)
    grid = (triton.cdiv(max_len_extend, BLOCK_M), num_q_heads, batch_size)
    _sage_hopper_kernel[grid](
        q_desc,
        k_desc,
        v_desc,
        q_scale,
        packed.k_scale,
        packed.v_scale,
        o_extend,
        qo_indptr,
        kv_indptr,
        stride_o_tok=o_extend.stride(0),
        stride_o_head=o_extend.stride(1),
        num_tokens=num_tokens,
        num_rows=num_rows,
        num_kv_heads=num_kv_heads,
        kv_group=num_q_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        HEAD_DIM_V=head_dim_v,
        BLOCK_N=KV_BLOCK,
        CAUSAL=causal,
        PV_MODE=packed.pv.value,
        STAGES=config.stages,
        OVERLAP=config.overlap,
        PINGPONG=config.pingpong,
        PV_PROMOTE=config.pv_promote,
        CONSUMER_REGS=config.consumer_regs,
        PRODUCER_REGS=config.producer_regs,
        num_warps=4,  # the default partition (consumer warpgroup 0)
    )
