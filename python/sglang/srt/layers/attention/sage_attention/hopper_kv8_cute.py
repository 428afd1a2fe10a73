"""``hopper_kv8.py``'s kernel written again in CuTe DSL: issue 23's language route.

Same pages, arithmetic and twin as the Gluon kernel (INT8 Q·Kᵀ with per-key K scales,
INT8 P·V with V's per-key scales folded into P, P per row to 127 over a 128-key step:
``sage_extend_attention_kv8_ref(pv_int8=True, block_n=STEP_N)``), with what Gluon
could not express:

- each consumer warpgroup (64 query rows) runs on its own: its warps release a stage
  with one arrive each, no barrier across both warpgroups;
- ``pingpong`` (default): the warpgroups take turns at the tensor cores, one wgmma
  batch each, through a named barrier per warpgroup, so one's softmax runs under the
  other's products (FA3's schedule);
- P goes to shared memory (one 2-byte store per pair of scores) and the P·V wgmmas
  read it there (no shuffle from the accumulator's register layout to the operand's).

Measured against the Gluon kernel and FA4 in one run (H100, GQA 32/8, causal; RESULTS.md
round 14): hd128 1.04-1.10x the Gluon kernel from 8K keys (0.86-0.95x FA4), slower at
1K-2K chunks and at hd64. It is not dispatched: the server's Hopper prefill over the
8-bit cache stays the FlashAttention route (``kv8_flash``), which is faster than both.
It needs the CuTe DSL (nvidia-cutlass-dsl, which FA4 brings); the first call of each
variant compiles for a few seconds.
"""

from __future__ import annotations

from types import SimpleNamespace

import cutlass
import cutlass.cute as cute
import cutlass.pipeline as pipeline
import cutlass.utils.hopper_helpers as sm90_utils
import torch
import triton
from cuda.bindings import driver
from cutlass import Float32, Int8, Int32, const_expr
from cutlass._mlir.extras import types as T
from cutlass._mlir_helpers.arith import bitcast
from cutlass.cute.nvgpu import cpasync, warpgroup
from cutlass.cute.runtime import from_dlpack
from cutlass.utils import LayoutEnum

from sglang.srt.layers.attention.sage_attention.hopper_attention import quantized_q
from sglang.srt.layers.attention.sage_attention.hopper_kv8 import (
    BLOCK_M,
    STEP_N,
    SUB_N,
    _cache_refusal,
)
from sglang.srt.layers.attention.sage_attention.kv8_cache import KV8Cache, kv8_tile_views
from sglang.srt.layers.attention.sage_attention.layout import (
    INT8_MAX,
    ROUND_MAGIC,
    ROUND_MAGIC_BITS,
)

WG_M = 64  # query rows per consumer warpgroup
M_INIT = -1.0e30  # finite start for the running max (a fully masked step: p = 0)
PRODUCER_REGS = 24  # setmaxnreg of the TMA warpgroup
CONSUMER_REGS = 240


def _f32_bits(x):
    """The bits of int32 ``x`` read as fp32 (``ROUND_MAGIC``'s conversions)."""
    return Float32(bitcast(Int32(x).ir_value(), T.f32()))


def _i32_bits(x):
    """The bits of fp32 ``x`` read as int32."""
    return Int32(bitcast(Float32(x).ir_value(), T.i32()))


def _smem_layout(dtype, shape, stages=None):
    """K-major (second mode contiguous) swizzled layout of ``shape``, ``stages`` deep."""
    atom = warpgroup.make_smem_layout_atom(
        sm90_utils.get_smem_layout_atom(LayoutEnum.ROW_MAJOR, dtype, shape[1]), dtype
    )
    if stages is None:
        return cute.tile_to_shape(atom, shape, order=(0, 1))
    return cute.tile_to_shape(atom, (*shape, stages), order=(0, 1, 2))


@cute.jit
def _quad_max(x):
    x = cute.arch.fmax(x, cute.arch.shuffle_sync_bfly(x, offset=1))
    return cute.arch.fmax(x, cute.arch.shuffle_sync_bfly(x, offset=2))


@cute.jit
def _quad_sum(x):
    x = x + cute.arch.shuffle_sync_bfly(x, offset=1)
    return x + cute.arch.shuffle_sync_bfly(x, offset=2)


class KV8CuteKernel:
    def __init__(self, head_dim, head_dim_v, page_size, causal, stages=2, pingpong=True):
        self.head_dim = head_dim
        self.head_dim_v = head_dim_v
        self.page_size = page_size
        self.causal = causal
        self.stages = stages
        # The two warpgroups take turns at the tensor cores, one wgmma batch each (a
        # named barrier per warpgroup; the turn passes right after an issue), so one's
        # softmax runs under the other's products.
        self.pingpong = pingpong

    @cute.jit
    def __call__(
        self,
        mQ: cute.Tensor,  # [Hq * N, D] int8
        mK: cute.Tensor,  # [pages * Hkv * P, D] int8
        mVt: cute.Tensor,  # [pages * Hkv * Dv, P] int8
        mKs: cute.Tensor,  # [pages * Hkv * P] fp32
        mVs: cute.Tensor,  # [pages * Hkv * P] fp32
        mQs: cute.Tensor,  # [Hq * N] fp32
        mO: cute.Tensor,  # [N, Hq, Dv]
        mQoIndptr: cute.Tensor,
        mKvIndptr: cute.Tensor,
        mKvIndices: cute.Tensor,
        num_tokens: Int32,
        num_kv_heads: Int32,
        kv_group: Int32,
        grid_m: Int32,
        num_q_heads: Int32,
        batch: Int32,
        stream,
    ):
        D, DV, S = self.head_dim, self.head_dim_v, self.stages
        sQ_layout = _smem_layout(Int8, (BLOCK_M, D))
        sK_layout = _smem_layout(Int8, (SUB_N, D), 2 * S)
        sVt_layout = _smem_layout(Int8, (DV, SUB_N), 2 * S)
        sP_layout = _smem_layout(Int8, (BLOCK_M, SUB_N), 2)
        sScale_layout = cute.make_layout((SUB_N, 2 * S))
        g2s = cpasync.CopyBulkTensorTileG2SOp()
        tma_q, mQ_t = cpasync.make_tiled_tma_atom(g2s, mQ, sQ_layout, (BLOCK_M, D))
        tma_k, mK_t = cpasync.make_tiled_tma_atom(
            g2s, mK, cute.select(sK_layout, mode=[0, 1]), (SUB_N, D)
        )
        tma_v, mVt_t = cpasync.make_tiled_tma_atom(
            g2s, mVt, cute.select(sVt_layout, mode=[0, 1]), (DV, SUB_N)
        )
        tma_ks, mKs_t = cpasync.make_tiled_tma_atom(
            g2s, mKs, cute.select(sScale_layout, mode=[0]), (SUB_N,)
        )
        tma_vs, mVs_t = cpasync.make_tiled_tma_atom(
            g2s, mVs, cute.select(sScale_layout, mode=[0]), (SUB_N,)
        )
        k_mode = warpgroup.OperandMajorMode.K
        tiled_mma_qk = sm90_utils.make_trivial_tiled_mma(
            Int8, Int8, k_mode, k_mode, Int32, (BLOCK_M // WG_M, 1, 1), (WG_M, SUB_N)
        )
        tiled_mma_pv = sm90_utils.make_trivial_tiled_mma(
            Int8, Int8, k_mode, k_mode, Int32, (BLOCK_M // WG_M, 1, 1), (WG_M, DV)
        )

        @cute.struct
        class Storage:
            mbar_q: cute.struct.MemRange[cutlass.Int64, 1]
            mbar_k: cute.struct.MemRange[cutlass.Int64, 2 * S]
            mbar_v: cute.struct.MemRange[cutlass.Int64, 2 * S]
            sK_scale: cute.struct.Align[cute.struct.MemRange[Float32, SUB_N * 2 * S], 128]
            sV_scale: cute.struct.Align[cute.struct.MemRange[Float32, SUB_N * 2 * S], 128]
            sQ: cute.struct.Align[cute.struct.MemRange[Int8, cute.cosize(sQ_layout)], 1024]
            sK: cute.struct.Align[cute.struct.MemRange[Int8, cute.cosize(sK_layout)], 1024]
            sVt: cute.struct.Align[cute.struct.MemRange[Int8, cute.cosize(sVt_layout)], 1024]
            sP: cute.struct.Align[cute.struct.MemRange[Int8, cute.cosize(sP_layout)], 1024]

        self.kernel(
            tma_q,
            mQ_t,
            tma_k,
            mK_t,
            tma_v,
            mVt_t,
            tma_ks,
            mKs_t,
            tma_vs,
            mVs_t,
            mQs,
            mO,
            mQoIndptr,
            mKvIndptr,
            mKvIndices,
            num_tokens,
            num_kv_heads,
            kv_group,
            sQ_layout,
            sK_layout,
            sVt_layout,
            sP_layout,
            sScale_layout,
            tiled_mma_qk,
            tiled_mma_pv,
            Storage,
        ).launch(
            grid=[grid_m, num_q_heads, batch],
            block=[3 * 128, 1, 1],
            smem=Storage.size_in_bytes(),
            stream=stream,
        )

    @cute.kernel
    def kernel(
        self,
        tma_q: cute.CopyAtom,
        mQ_t: cute.Tensor,
        tma_k: cute.CopyAtom,
        mK_t: cute.Tensor,
        tma_v: cute.CopyAtom,
        mVt_t: cute.Tensor,
        tma_ks: cute.CopyAtom,
        mKs_t: cute.Tensor,
        tma_vs: cute.CopyAtom,
        mVs_t: cute.Tensor,
        mQs: cute.Tensor,
        mO: cute.Tensor,
        mQoIndptr: cute.Tensor,
        mKvIndptr: cute.Tensor,
        mKvIndices: cute.Tensor,
        num_tokens: Int32,
        num_kv_heads: Int32,
        kv_group: Int32,
        sQ_layout: cute.ComposedLayout,
        sK_layout: cute.ComposedLayout,
        sVt_layout: cute.ComposedLayout,
        sP_layout: cute.ComposedLayout,
        sScale_layout: cute.Layout,
        tiled_mma_qk: cute.TiledMma,
        tiled_mma_pv: cute.TiledMma,
        Storage: cutlass.Constexpr,
    ):
        D, DV, S = self.head_dim, self.head_dim_v, self.stages
        warp_idx = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        tidx, _, _ = cute.arch.thread_idx()
        bm, q_head, b = cute.arch.block_idx()
        grid_m, _, _ = cute.arch.grid_dim()

        kv_start = Int32(mKvIndptr[b])
        kv_len = Int32(mKvIndptr[b + 1]) - kv_start
        extend_start = Int32(mQoIndptr[b])
        extend_len = Int32(mQoIndptr[b + 1]) - extend_start
        num_m_blocks = cutlass.min((extend_len + BLOCK_M - 1) // BLOCK_M, Int32(grid_m))
        if bm < num_m_blocks:
            block_m = bm
            if const_expr(self.causal):
                block_m = num_m_blocks - 1 - bm
            block_row = block_m * BLOCK_M
            prefix_len = kv_len - extend_len
            if const_expr(self.causal):
                free_hi = (prefix_len + block_row + 1) // STEP_N * STEP_N
                hi = cutlass.min(kv_len, prefix_len + block_row + BLOCK_M)
            else:
                free_hi = kv_len // STEP_N * STEP_N
                hi = kv_len
            n_steps = (hi + STEP_N - 1) // STEP_N
            first_masked = free_hi // STEP_N
            kv_head = q_head // kv_group

            if warp_idx == 0:
                for atom in (tma_q, tma_k, tma_v, tma_ks, tma_vs):
                    cpasync.prefetch_descriptor(atom)

            smem = cutlass.utils.SmemAllocator()
            storage = smem.allocate(Storage)
            mbar_q = storage.mbar_q.data_ptr()
            consumer_warps = pipeline.CooperativeGroup(pipeline.Agent.Thread, 8)
            one = pipeline.CooperativeGroup(pipeline.Agent.Thread, 1)
            k_bytes = SUB_N * D + 2 * SUB_N * 4
            pipeline_k = pipeline.PipelineTmaAsync.create(
                barrier_storage=storage.mbar_k.data_ptr(),
                num_stages=S,
                producer_group=one,
                consumer_group=consumer_warps,
                tx_count=2 * k_bytes,
                defer_sync=True,
            )
            pipeline_v = pipeline.PipelineTmaAsync.create(
                barrier_storage=storage.mbar_v.data_ptr(),
                num_stages=S,
                producer_group=one,
                consumer_group=consumer_warps,
                tx_count=2 * SUB_N * DV,
                defer_sync=True,
            )
            if warp_idx == 0:
                cute.arch.mbarrier_init(mbar_q, 1)
            cute.arch.mbarrier_init_fence()
            cute.arch.barrier()

            sQ = storage.sQ.get_tensor(sQ_layout.outer, swizzle=sQ_layout.inner)
            sK = storage.sK.get_tensor(sK_layout.outer, swizzle=sK_layout.inner)
            sVt = storage.sVt.get_tensor(sVt_layout.outer, swizzle=sVt_layout.inner)
            sP = storage.sP.get_tensor(sP_layout.outer, swizzle=sP_layout.inner)
            sKs = storage.sK_scale.get_tensor(sScale_layout)
            sVs = storage.sV_scale.get_tensor(sScale_layout)

            if warp_idx < 4:
                cute.arch.setmaxregister_decrease(PRODUCER_REGS)
                if warp_idx == 0:
                    self.produce(
                        tma_q, mQ_t, tma_k, mK_t, tma_v, mVt_t, tma_ks, mKs_t, tma_vs, mVs_t,
                        sQ, sK, sVt, sKs, sVs, mbar_q, pipeline_k, pipeline_v, mKvIndices,
                        q_head * num_tokens + extend_start + block_row, n_steps,
                        (kv_len + SUB_N - 1) // SUB_N - 1, kv_start, kv_head, num_kv_heads,
                    )  # fmt: skip
            else:
                cute.arch.setmaxregister_increase(CONSUMER_REGS)
                self.consume(
                    tiled_mma_qk, tiled_mma_pv, sQ, sK, sVt, sP, sKs, sVs, mbar_q,
                    pipeline_k, pipeline_v, mQs, mO, tidx - 128,
                    q_head, q_head * num_tokens + extend_start, extend_start, block_row,
                    extend_len, prefix_len, kv_len, n_steps, first_masked,
                )  # fmt: skip

    @cute.jit
    def produce(
        self, tma_q, mQ_t, tma_k, mK_t, tma_v, mVt_t, tma_ks, mKs_t, tma_vs, mVs_t,
        sQ, sK, sVt, sKs, sVs, mbar_q, pipeline_k, pipeline_v, mKvIndices,
        q_row, n_steps, last_run, kv_start, kv_head, num_kv_heads,
    ):  # fmt: skip
        D, DV, S, P = self.head_dim, self.head_dim_v, self.stages, self.page_size
        cta = cute.make_layout(1)
        gQ = cute.local_tile(cute.domain_offset((q_row, 0), mQ_t), (BLOCK_M, D), (0, 0))
        tQsQ, tQgQ = cpasync.tma_partition(
            tma_q, 0, cta, cute.group_modes(sQ, 0, 2), cute.group_modes(gQ, 0, 2)
        )
        gK = cute.local_tile(mK_t, (SUB_N, D), (None, 0))
        tKsK, tKgK = cpasync.tma_partition(
            tma_k, 0, cta, cute.group_modes(sK, 0, 2), cute.group_modes(gK, 0, 2)
        )
        gVt = cute.local_tile(mVt_t, (DV, SUB_N), (None, None))
        tVsV, tVgV = cpasync.tma_partition(
            tma_v, 0, cta, cute.group_modes(sVt, 0, 2), cute.group_modes(gVt, 0, 2)
        )
        gKs = cute.local_tile(mKs_t, (SUB_N,), (None,))
        tKSs, tKSg = cpasync.tma_partition(
            tma_ks, 0, cta, cute.group_modes(sKs, 0, 1), cute.group_modes(gKs, 0, 1)
        )
        gVs = cute.local_tile(mVs_t, (SUB_N,), (None,))
        tVSs, tVSg = cpasync.tma_partition(
            tma_vs, 0, cta, cute.group_modes(sVs, 0, 1), cute.group_modes(gVs, 0, 1)
        )

        with cute.arch.elect_one():
            cute.arch.mbarrier_arrive_and_expect_tx(mbar_q, BLOCK_M * D)
        cute.copy(tma_q, tQgQ, tQsQ, tma_bar_ptr=mbar_q)

        state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, S)
        for j in cutlass.range(n_steps, unroll=1):
            # A run's first key row in the flat K view (kv8_cache.kv8_row); past the
            # sequence's last run, that run again (the consumer masks it).
            slot_a = Int32(mKvIndices[kv_start + cutlass.min(2 * j, last_run) * SUB_N])
            slot_b = Int32(mKvIndices[kv_start + cutlass.min(2 * j + 1, last_run) * SUB_N])
            row_a = (slot_a // P * num_kv_heads + kv_head) * P + slot_a % P
            row_b = (slot_b // P * num_kv_heads + kv_head) * P + slot_b % P
            pipeline_k.producer_acquire(state)
            k_bar = pipeline_k.producer_get_barrier(state)
            for r in cutlass.range_constexpr(2):
                row = row_a if const_expr(r == 0) else row_b
                buf = 2 * state.index + r
                cute.copy(tma_k, tKgK[None, row // SUB_N], tKsK[None, buf], tma_bar_ptr=k_bar)
                cute.copy(tma_ks, tKSg[None, row // SUB_N], tKSs[None, buf], tma_bar_ptr=k_bar)
                cute.copy(tma_vs, tVSg[None, row // SUB_N], tVSs[None, buf], tma_bar_ptr=k_bar)
            pipeline_v.producer_acquire(state)
            v_bar = pipeline_v.producer_get_barrier(state)
            for r in cutlass.range_constexpr(2):
                row = row_a if const_expr(r == 0) else row_b
                buf = 2 * state.index + r
                # Vᵀ of the run: its (page, head)'s channel rows, its columns in the page.
                cute.copy(
                    tma_v,
                    tVgV[None, row // P, row % P // SUB_N],
                    tVsV[None, buf],
                    tma_bar_ptr=v_bar,
                )
            state.advance()

    @cute.jit
    def consume(
        self, tiled_mma_qk, tiled_mma_pv, sQ, sK, sVt, sP, sKs, sVs, mbar_q,
        pipeline_k, pipeline_v, mQs, mO, ctid, q_head, q_scale_start, extend_start,
        block_row, extend_len, prefix_len, kv_len, n_steps, first_masked,
    ):  # fmt: skip
        DV, S = self.head_dim_v, self.stages
        wg = cute.arch.make_warp_uniform(ctid // 128)
        wg_slice = cute.make_layout(BLOCK_M // WG_M, stride=128)(wg)
        thr_qk = tiled_mma_qk.get_slice(ctid)
        thr_pv = tiled_mma_pv.get_slice(ctid)
        wg_qk = tiled_mma_qk.get_slice(wg_slice)
        wg_pv = tiled_mma_pv.get_slice(wg_slice)
        tSrQ = wg_qk.make_fragment_A(wg_qk.partition_A(sQ))
        tSrK = wg_qk.make_fragment_B(wg_qk.partition_B(sK))
        tOrP = wg_pv.make_fragment_A(wg_pv.partition_A(sP))
        tOrV = wg_pv.make_fragment_B(wg_pv.partition_B(sVt))
        tPsP = thr_qk.partition_C(sP)
        tScS = thr_qk.partition_C(cute.make_identity_tensor((BLOCK_M, SUB_N)))
        tOcO = thr_pv.partition_C(cute.make_identity_tensor((BLOCK_M, DV)))
        acc_o = cute.make_rmem_tensor(thr_pv.partition_shape_C((BLOCK_M, DV)), Float32)
        acc_o.fill(0.0)
        n_o = cute.size(acc_o)

        # The thread's two rows: element i's row is tScS[i][0] (i = 0: first, 2: second).
        q_pos = cute.make_rmem_tensor((2,), Int32)
        q_scale = cute.make_rmem_tensor((2,), Float32)
        m = cute.make_rmem_tensor((2,), Float32)
        l = cute.make_rmem_tensor((2,), Float32)
        for r in cutlass.range_constexpr(2):
            q_pos[r] = block_row + tScS[2 * r][0]
            q_scale[r] = Float32(1.0)
            if q_pos[r] < extend_len:
                q_scale[r] = mQs[q_scale_start + q_pos[r]]
            m[r] = Float32(M_INIT)
            l[r] = Float32(0.0)

        cute.arch.mbarrier_wait(mbar_q, 0)
        if const_expr(self.pingpong):
            if wg == 0:  # warpgroup 0 has the first turn
                cute.arch.barrier_arrive(barrier_id=1, number_of_threads=256)
        state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, S)
        ops = SimpleNamespace(
            tiled_mma_qk=tiled_mma_qk,
            tiled_mma_pv=tiled_mma_pv,
            tSrQ=tSrQ,
            tSrK=tSrK,
            tOrP=tOrP,
            tOrV=tOrV,
            tPsP=tPsP,
            tScS=tScS,
            sKs=sKs,
            sVs=sVs,
            pipeline_k=pipeline_k,
            pipeline_v=pipeline_v,
            acc_o=acc_o,
            m=m,
            l=l,
            q_pos=q_pos,
            q_scale=q_scale,
            prefix_len=prefix_len,
            kv_len=kv_len,
            wg=wg,
        )
        # Steps left of the first row's diagonal and inside kv_len need no mask: their
        # own loop, so the mask's selects run only where they matter.
        first_free_end = cutlass.min(first_masked, n_steps)
        for j in cutlass.range(first_free_end, unroll=1):
            state = self.step(j, False, ops, state)
        for j in cutlass.range(first_free_end, n_steps, unroll=1):
            state = self.step(j, True, ops, state)

        if const_expr(self.pingpong):
            if wg == 0:  # warpgroup 1's last pass: no barrier left half-arrived at exit
                cute.arch.barrier(barrier_id=1, number_of_threads=256)

        # Epilogue: 1/l (0 for rows that saw no key), stores of the chunk's rows only.
        inv_l = cute.make_rmem_tensor((2,), Float32)
        for h in cutlass.range_constexpr(2):
            total = _quad_sum(l[h])
            inv_l[h] = Float32(0.0)
            if total > 0.0:
                inv_l[h] = 1.0 / total
        for i in cutlass.range_constexpr(n_o):
            h = (i >> 1) & 1
            if q_pos[h] < extend_len:
                mO[extend_start + q_pos[h], q_head, tOcO[i][1]] = (acc_o[i] * inv_l[h]).to(
                    mO.element_type
                )

    @cute.jit
    def take_turn(self, wg):
        """Wait for this warpgroup's turn at the tensor cores (``pingpong``)."""
        if const_expr(self.pingpong):
            cute.arch.barrier(barrier_id=1 + wg, number_of_threads=256)

    @cute.jit
    def pass_turn(self, wg):
        """Hand the turn to the other warpgroup, right after an issue: each barrier
        then has at most one pass pending, never two in one generation."""
        if const_expr(self.pingpong):
            cute.arch.barrier_arrive(barrier_id=2 - wg, number_of_threads=256)

    @cute.jit
    def issue_scores(self, tiled_mma_qk, tSrQ, tSrK, buf, acc_s):
        """Start both runs' Q·Kᵀ (int32, async) from stage buffers ``buf``, ``buf + 1``."""
        mma = cute.make_mma_atom(tiled_mma_qk.op)  # fresh: its accumulate flag changes
        warpgroup.fence()
        for r in cutlass.range_constexpr(2):
            mma.set(warpgroup.Field.ACCUMULATE, False)
            for k in cutlass.range_constexpr(cute.size(tSrQ.shape[2])):
                cute.gemm(
                    mma, acc_s[r], tSrQ[None, None, k], tSrK[None, None, k, buf + r], acc_s[r]
                )
                mma.set(warpgroup.Field.ACCUMULATE, True)
        warpgroup.commit_group()

    @cute.jit
    def issue_pv(self, tiled_mma_pv, tOrP, tOrV, buf, acc_pv):
        """Start P·V (int32, async) over both runs: P from shared memory, Vᵀ from
        stage buffers ``buf``, ``buf + 1``."""
        mma = cute.make_mma_atom(tiled_mma_pv.op)
        warpgroup.fence()
        mma.set(warpgroup.Field.ACCUMULATE, False)
        for r in cutlass.range_constexpr(2):
            for k in cutlass.range_constexpr(cute.size(tOrP.shape[2])):
                cute.gemm(
                    mma, acc_pv, tOrP[None, None, k, r], tOrV[None, None, k, buf + r],
                    acc_pv,
                )  # fmt: skip
                mma.set(warpgroup.Field.ACCUMULATE, True)
        warpgroup.commit_group()

    @cute.jit
    def softmax(self, j, masked: cutlass.Constexpr, acc_s, buf, ops: SimpleNamespace, alpha, beta):
        """Step ``j``'s online softmax over its finished scores ``acc_s``, kv8_pv's INT8
        arithmetic: the running max and sum move on, P (V's per-key scales folded in,
        each row's largest 127) goes to ``tPsP[..., r]``; ``alpha`` / ``beta``
        get the factors on the running output and on this step's int32 P·V. Scales are
        read from shared memory where used (registers are short).
        ``masked`` (constexpr): the step crosses kv_len or the diagonal; thread
        element i is key (i // 4) * 2 + i % 2 of the thread's 32 and row (i // 2) % 2."""
        s_shape = ops.tScS.shape
        n_s = cute.size(s_shape)
        key0 = j * STEP_N
        # V's scales: the pair's largest (0 past kv_len: those slots may hold anything).
        tile_scale = Float32(1.0e-30)
        for r in cutlass.range_constexpr(2):
            for i in cutlass.range_constexpr(0, n_s, 4):
                for c in cutlass.range_constexpr(2):
                    vs = ops.sVs[ops.tScS[i][1] + c, buf + r]
                    if const_expr(masked):
                        if key0 + r * SUB_N + ops.tScS[i][1] + c >= ops.kv_len:
                            vs = Float32(0.0)
                    tile_scale = cute.arch.fmax(tile_scale, vs)
        tile_scale = _quad_max(tile_scale)
        inv_tile = cute.arch.rcp_approx(tile_scale)

        # Scores in fp32 with the key scales: the int32 bits + ROUND_MAGIC_BITS read as
        # ROUND_MAGIC + s, one FMA per score.
        scores = cute.make_rmem_tensor((2, n_s), Float32)
        for r in cutlass.range_constexpr(2):
            for i in cutlass.range_constexpr(n_s):
                ks = ops.sKs[ops.tScS[i][1], buf + r]
                scores[r, i] = _f32_bits(acc_s[r][i] + ROUND_MAGIC_BITS) * ks + ks * -ROUND_MAGIC
        if const_expr(masked):
            for r in cutlass.range_constexpr(2):
                for i in cutlass.range_constexpr(n_s):
                    key = key0 + r * SUB_N + ops.tScS[i][1]
                    hidden = key >= ops.kv_len
                    if const_expr(self.causal):  # bottom-right: row i sees keys <= prefix + i
                        hidden = hidden | (key > ops.prefix_len + ops.q_pos[(i >> 1) & 1])
                    if hidden:
                        scores[r, i] = -Float32.inf
        row_max = cute.make_rmem_tensor((2,), Float32)
        row_max[0] = -Float32.inf
        row_max[1] = -Float32.inf
        for r in cutlass.range_constexpr(2):
            for i in cutlass.range_constexpr(n_s):
                row_max[(i >> 1) & 1] = cute.arch.fmax(row_max[(i >> 1) & 1], scores[r, i])
        p_max = cute.make_rmem_tensor((2,), Float32)
        for h in cutlass.range_constexpr(2):
            m_new = cute.arch.fmax(ops.m[h], _quad_max(row_max[h]) * ops.q_scale[h])
            alpha[h] = cute.arch.exp2(ops.m[h] - m_new)
            ops.l[h] = ops.l[h] * alpha[h]
            ops.m[h] = m_new
            p_max[h] = Float32(1.0e-30)
        for r in cutlass.range_constexpr(2):
            for i in cutlass.range_constexpr(n_s):
                h = (i >> 1) & 1
                p = cute.arch.exp2(scores[r, i] * ops.q_scale[h] - ops.m[h])
                ops.l[h] = ops.l[h] + p
                vs = ops.sVs[ops.tScS[i][1], buf + r]
                if const_expr(masked):
                    if key0 + r * SUB_N + ops.tScS[i][1] >= ops.kv_len:
                        vs = Float32(0.0)
                p = p * (vs * inv_tile)
                scores[r, i] = p
                p_max[h] = cute.arch.fmax(p_max[h], p)
        to_int8 = cute.make_rmem_tensor((2,), Float32)
        for h in cutlass.range_constexpr(2):
            p_max[h] = _quad_max(p_max[h])
            to_int8[h] = INT8_MAX * cute.arch.rcp_approx(p_max[h])
            beta[h] = p_max[h] * tile_scale * (1.0 / INT8_MAX)
        # P as int8 into shared memory (each warp writes and later reads its own rows).
        for r in cutlass.range_constexpr(2):
            p_int8 = cute.make_rmem_tensor(s_shape, Int8)
            for i in cutlass.range_constexpr(n_s):
                p_int8[i] = Int8(_i32_bits(scores[r, i] * to_int8[(i >> 1) & 1] + ROUND_MAGIC))
            cute.autovec_copy(p_int8, ops.tPsP[None, None, None, r])
        cute.arch.fence_view_async_shared()
        cute.arch.sync_warp()

    @cute.jit
    def update_output(self, acc_o, acc_pv, alpha, beta):
        """o * alpha + P·V * beta as two FMAs (the int32 bits trick of the scores)."""
        for i in cutlass.range_constexpr(cute.size(acc_o)):
            h = (i >> 1) & 1
            acc_o[i] = _f32_bits(acc_pv[i] + ROUND_MAGIC_BITS) * beta[h] + (
                acc_o[i] * alpha[h] - ROUND_MAGIC * beta[h]
            )

    @cute.jit
    def step(self, j, masked: cutlass.Constexpr, ops: SimpleNamespace, state):
        """One 128-key step: Q·Kᵀ, the softmax, P·V, the output update, each product
        waited for. (FA3's overlap, step j's softmax under step j-1's P·V, was tried:
        the int32 P·V accumulator beside the fp32 output and the scores passes 240
        registers, and the spills made it 33% slower: RESULTS.md round 14.)"""
        buf = 2 * state.index
        acc_s = [cute.make_rmem_tensor(ops.tScS.shape, Int32) for _ in range(2)]
        acc_pv = cute.make_rmem_tensor(ops.acc_o.shape, Int32)
        alpha = cute.make_rmem_tensor((2,), Float32)
        beta = cute.make_rmem_tensor((2,), Float32)
        ops.pipeline_k.consumer_wait(state)
        self.take_turn(ops.wg)
        self.issue_scores(ops.tiled_mma_qk, ops.tSrQ, ops.tSrK, buf, acc_s)
        self.pass_turn(ops.wg)
        warpgroup.wait_group(0)
        self.softmax(j, masked, acc_s, buf, ops, alpha, beta)
        ops.pipeline_k.consumer_release(state)
        ops.pipeline_v.consumer_wait(state)
        self.take_turn(ops.wg)
        self.issue_pv(ops.tiled_mma_pv, ops.tOrP, ops.tOrV, buf, acc_pv)
        self.pass_turn(ops.wg)
        warpgroup.wait_group(0)
        ops.pipeline_v.consumer_release(state)
        self.update_output(ops.acc_o, acc_pv, alpha, beta)
        state.advance()
        return state


# --- host side -------------------------------------------------------------------------

_COMPILED: dict = {}


def _cute(t: torch.Tensor, leading_dim: int):
    """``t`` for the compiled kernel, its sizes and strides dynamic (one compile serves
    every batch shape)."""
    return from_dlpack(t, assumed_align=16 if t.dim() > 1 else 4).mark_layout_dynamic(
        leading_dim=leading_dim
    )


def _refusal(cache: KV8Cache, device: torch.device) -> str | None:
    """Why the kernel cannot run here over ``cache`` (None when it can): an sm_90 GPU,
    and a cache ``hopper_kv8``'s kernel reads (the same pages and variants)."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9:
        return "the CuTe DSL 8-bit kernel runs on sm_90 only"
    return _cache_refusal(cache, device)


def hopper_kv8_cute_supports(cache: KV8Cache, device: torch.device) -> bool:
    """Whether ``sage_extend_kv8_cute`` runs here over ``cache``."""
    return _refusal(cache, device) is None


def sage_extend_kv8_cute(
    q_extend: torch.Tensor,
    o_extend: torch.Tensor,
    cache: KV8Cache,
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    max_len_extend: int,
    sm_scale: float,
    causal: bool,
    stages: int = 2,
    pingpong: bool = True,
) -> None:
    """``hopper_kv8.sage_extend_kv8_hopper``'s contract and refusals, in CuTe DSL (the
    module docstring). No host sync; the first call per variant compiles."""
    device = q_extend.device
    refusal = _refusal(cache, device)
    if refusal is not None:
        raise ValueError(f"sage_attn: {refusal}")
    num_tokens, num_q_heads, head_dim = q_extend.shape
    cache.check_queries(q_extend, o_extend)
    if o_extend.numel() >= 2**31:  # the kernel indexes Q, its scales and O in int32
        raise ValueError("sage_attn: the CuTe DSL 8-bit kernel takes < 2^31 output elements")
    if num_tokens == 0 or max_len_extend == 0:
        return
    q_int8, q_scale = quantized_q(q_extend, sm_scale, cache.rotated)
    # TMA's views of K rows and Vᵀ rows, as kv8_cache defines them (the boxes are the
    # kernel's own); the scales are read flat, a 64-key run per box.
    (k_rows, _), (vt_rows, _) = kv8_tile_views(cache, SUB_N)
    args = [
        _cute(q_int8.view(-1, head_dim), 1),
        _cute(k_rows, 1),
        _cute(vt_rows, 1),
        _cute(cache.k_scale.view(-1), 0),
        _cute(cache.v_scale.view(-1), 0),
        _cute(q_scale.view(-1), 0),
        _cute(o_extend, 2),
        _cute(qo_indptr, 0),
        _cute(kv_indptr, 0),
        _cute(kv_indices, 0),
    ]
    sizes = [
        Int32(n)
        for n in (
            num_tokens,
            cache.num_kv_heads,
            num_q_heads // cache.num_kv_heads,
            triton.cdiv(max_len_extend, BLOCK_M),
            num_q_heads,
            qo_indptr.shape[0] - 1,
        )
    ]
    stream = driver.CUstream(torch.cuda.current_stream(device).cuda_stream)
    variant = (head_dim, cache.head_dim_v, cache.page_size, causal, stages, pingpong,
               o_extend.dtype, qo_indptr.dtype, kv_indptr.dtype, kv_indices.dtype)  # fmt: skip
    compiled = _COMPILED.get(variant)
    if compiled is None:
        kernel = KV8CuteKernel(
            head_dim, cache.head_dim_v, cache.page_size, causal, stages, pingpong
        )
        compiled = _COMPILED[variant] = cute.compile(kernel, *args, *sizes, stream)
    compiled(*args, *sizes, stream)
