"""sage_attn's Hopper (sm_90) kernel over the 8-bit cache's pages, in Gluon.

``hopper_attention.py``'s design (a TMA producer warp, two consumer warpgroups of 64
query rows each, wgmma) over ``kv8_cache.py``'s pages as stored, with that cache's
arithmetic: INT8 Q·Kᵀ with one scale per key, INT8 P·V on the stored Vᵀ with V's
per-key scales folded into P, P per query row to 127 (``kv8_tiles.kv8_pv`` with
PV_INT8). Its twin is ``kv8_reference.sage_extend_attention_kv8_ref(pv_int8=True,
block_n=STEP_N)``.

Why a kernel of its own (RESULTS.md, round 13). Per-key scales put a softmax step's
extra work on the key axis, which the wgmma fragment spreads thin: a thread holds 2
query rows and 16 keys of a 64-key tile. Round 12's version (the packed kernel's
consumer, one page per step) ran ~29 SASS instructions per score element and 0.55x
FA4 (H100, hd128). What this one does instead, each measured against the step before
it on one H100 (4 x 8K, hd128, causal):

- a page pair per softmax step (``STEP_N`` = 128 keys, two ``SUB_N`` = 64-key wgmmas
  per product): the per-step work (the int32 P·V brought into the fp32 output, now
  two FMAs per element; the scales' reductions) is paid once per 128 keys: ~19
  instructions per score element, 7.6 -> 7.0 ms;
- the scales arrive by TMA with their page (no layout conversion through shared
  memory and its barriers), and one consumer partition of both warpgroups (8 warps)
  replaces one per warpgroup: one copy of the loop in the instruction cache (the two
  copies stalled on instruction fetch, 3.0 cycles per issued instruction): 7.0 ->
  5.4 ms (the same with two partitions: 7.3 ms);
- step j+1's Q·Kᵀ is issued right after step j's P·V, so it runs under the stage
  release and the output update (``KV8HopperConfig.overlap``): 5.4 -> 5.1 ms.

The partition releases a stage with one arrive after a barrier of its 256 threads,
so both warpgroups run in lockstep; that barrier is now the largest stall (1.5 of
~5 cycles per issued instruction) with the tensor pipe 23% busy. Without it (the
CuTe DSL version, ``hopper_kv8_cute.py``: a release per warp, then FA3's ping-pong)
the kernel is 0.97-1.03x, then 1.04-1.10x this one from 8K keys: the bound is the
issue rate of ~19 instructions per score (RESULTS.md, round 14).

A step's second 64-key run is past the sequence when its run count is odd: the
producer then reads the sequence's last run again and the consumer masks every key of
it (V's scales past kv_len read 0), so the twin's tiles of 128 keys are what the kernel
computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from sglang.srt.layers.attention.sage_attention.hopper_attention import (
    BLOCK_M,
    gluon_import_error,
    hopper_kernel_available,
    hopper_kernel_supports,
    quantized_q,
    shared_descriptor,
)
from sglang.srt.layers.attention.sage_attention.kv8_cache import (
    KV8Cache,
    kv8_row,
    kv8_scale_views,
    kv8_tile_views,
    kv8_vt_coords,
    tma_can_read,
)
from sglang.srt.layers.attention.sage_attention.layout import (
    INT8_MAX,
    ROUND_MAGIC,
    ROUND_MAGIC_BITS,
    request_bounds,
)

if hopper_kernel_available():
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

    from sglang.srt.layers.attention.sage_attention.hopper_attention import (
        key_steps,
        query_block,
        ring_buffers,
        stage_barriers,
    )

# Keys per wgmma (one page of 64, or half of a larger page) and per softmax step.
SUB_N = 64
STEP_N = 2 * SUB_N
KV8_MIN_PAGE = SUB_N


@dataclass(frozen=True)
class KV8HopperConfig:
    # Page pairs in flight in the shared-memory ring (3: 1-3% slower than 2, H100,
    # measured before the overlap).
    stages: int = 2
    # Issue step j+1's Q·Kᵀ right after step j's P·V, so it runs under the release
    # and the output update (5% faster, H100; issued after the release instead: 1%).
    overlap: bool = True
    producer_regs: int = 24  # setmaxnreg of the TMA warp


KV8_HOPPER_CONFIG = KV8HopperConfig()


def _cache_refusal(cache: KV8Cache, device: torch.device) -> str | None:
    """Why the kernel cannot read this cache (None when it can): head dims 64/128 (K
    and V alike), pages of at least ``KV8_MIN_PAGE`` tokens, every row within TMA's
    int32 coordinates (``kv8_cache.tma_can_read``)."""
    if not hopper_kernel_supports(cache.head_dim, cache.head_dim_v):
        return f"the Hopper kernel has no (qk={cache.head_dim}, v={cache.head_dim_v}) variant"
    if cache.page_size < KV8_MIN_PAGE:
        return f"the Hopper kernel reads pages of >= {KV8_MIN_PAGE} tokens"
    if not tma_can_read(cache, device):
        return "the cache's rows pass TMA's int32 coordinates"
    return None


def hopper_kv8_supports(cache: KV8Cache, device: torch.device) -> bool:
    """Whether ``sage_extend_kv8_hopper`` can read this cache here: Gluon, an sm_90 GPU
    and a cache it reads (``_cache_refusal``)."""
    return (
        hopper_kernel_available()
        and device.type == "cuda"
        and torch.cuda.get_device_capability(device)[0] == 9
        and _cache_refusal(cache, device) is None
    )


if hopper_kernel_available():
    _BLOCK_M = gl.constexpr(BLOCK_M)
    _SUB_N = gl.constexpr(SUB_N)
    _STEP_N = gl.constexpr(STEP_N)
    _INT8_MAX = gl.constexpr(INT8_MAX)
    _INV_INT8_MAX = gl.constexpr(1.0 / INT8_MAX)
    _ROUND_MAGIC = gl.constexpr(ROUND_MAGIC)
    _ROUND_MAGIC_BITS = gl.constexpr(ROUND_MAGIC_BITS)
    # Finite start for the running max (a fully masked step gives p = 0, alpha = 1).
    _M_INIT = gl.constexpr(-1.0e30)

    @gluon.jit
    def _page_row(kv_slots, run, last_run, kv_head, num_kv_heads, PAGE_SIZE: gl.constexpr):
        """``kv8_row`` of the first key of the sequence's 64-key run ``run`` (clamped to
        its last run, ``last_run``: past it every key is masked)."""
        slot = gl.load(kv_slots + gl.minimum(run, last_run) * _SUB_N)
        return kv8_row(slot, kv_head, num_kv_heads, PAGE_SIZE)

    @gluon.jit
    def _load_run(
        k_desc, v_desc, ks_desc, vs_desc, row, k_bar, v_bar, buf, k_smem, v_smem, ks_smem,
        vs_smem, HEAD_DIM_V: gl.constexpr, PAGE_SIZE: gl.constexpr,
    ):  # fmt: skip
        """TMA of one 64-key run starting at ``row`` into buffer ``buf``: its K rows and
        both scale rows on ``k_bar`` (the softmax needs them all), its Vᵀ columns on
        ``v_bar``."""
        vt_row, vt_col = kv8_vt_coords(row, HEAD_DIM_V, PAGE_SIZE)
        scale_row = (row // _SUB_N).to(gl.int32)
        tma.async_copy_global_to_shared(k_desc, [row.to(gl.int32), 0], k_bar, k_smem.index(buf))
        tma.async_copy_global_to_shared(ks_desc, [scale_row, 0], k_bar, ks_smem.index(buf))
        tma.async_copy_global_to_shared(vs_desc, [scale_row, 0], k_bar, vs_smem.index(buf))
        tma.async_copy_global_to_shared(v_desc, [vt_row, vt_col], v_bar, v_smem.index(buf))

    @gluon.jit
    def _kv8_producer(
        q_desc,
        k_desc,
        v_desc,
        ks_desc,
        vs_desc,
        q_smem,
        k_smem,
        v_smem,
        ks_smem,
        vs_smem,
        q_bar,
        k_ready,
        v_ready,
        kv_empty,
        q_row,
        n_steps,
        last_run,
        kv_slots,
        kv_head,
        num_kv_heads,
        STAGES: gl.constexpr,
        HEAD_DIM_V: gl.constexpr,
        PAGE_SIZE: gl.constexpr,
    ):
        """TMA loads: the CTA's Q tile once, then step j's two 64-key runs into ring slot
        j % STAGES (buffers 2 * slot and 2 * slot + 1)."""
        mbarrier.expect(q_bar, q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [q_row, 0], q_bar, q_smem)
        k_bytes: gl.constexpr = (
            k_desc.block_type.nbytes + ks_desc.block_type.nbytes + vs_desc.block_type.nbytes
        )
        for j in range(n_steps):
            slot = j % STAGES
            phase = (j // STAGES) & 1
            # Slot ids before the wait: their load latency hides behind it.
            row_a = _page_row(kv_slots, 2 * j, last_run, kv_head, num_kv_heads, PAGE_SIZE)
            row_b = _page_row(kv_slots, 2 * j + 1, last_run, kv_head, num_kv_heads, PAGE_SIZE)
            # A fresh mbarrier reads as "phase 1 complete": the first pass does not wait.
            mbarrier.wait(kv_empty.index(slot), phase ^ 1)
            mbarrier.expect(k_ready.index(slot), 2 * k_bytes)
            mbarrier.expect(v_ready.index(slot), 2 * v_desc.block_type.nbytes)
            _load_run(
                k_desc, v_desc, ks_desc, vs_desc, row_a, k_ready.index(slot),
                v_ready.index(slot), 2 * slot, k_smem, v_smem, ks_smem, vs_smem, HEAD_DIM_V,
                PAGE_SIZE,
            )  # fmt: skip
            _load_run(
                k_desc, v_desc, ks_desc, vs_desc, row_b, k_ready.index(slot),
                v_ready.index(slot), 2 * slot + 1, k_smem, v_smem, ks_smem, vs_smem,
                HEAD_DIM_V, PAGE_SIZE,
            )  # fmt: skip

    @gluon.jit
    def _issue_scores(q, k_smem, k_ready, step, s_zero, STAGES: gl.constexpr):
        """Wait for step ``step``'s keys and start its two Q·Kᵀ wgmmas (async)."""
        slot = step % STAGES
        mbarrier.wait(k_ready.index(slot), (step // STAGES) & 1)
        s_a = warpgroup_mma(
            q, k_smem.index(2 * slot).permute((1, 0)), s_zero, use_acc=False, is_async=True
        )
        s_b = warpgroup_mma(
            q, k_smem.index(2 * slot + 1).permute((1, 0)), s_zero, use_acc=False, is_async=True
        )
        return s_a, s_b

    @gluon.jit
    def _run_scales(ks_smem, vs_smem, buf, masked, key0, kv_len, key_layout: gl.constexpr):
        """A run's per-key K and V scales from shared memory, in the scores' key layout;
        in masked steps V's are 0 past ``kv_len`` (those slots may hold anything)."""
        key_scale = ks_smem.index(buf).reshape([_SUB_N]).load(key_layout)
        value_scale = vs_smem.index(buf).reshape([_SUB_N]).load(key_layout)
        if masked:
            keys = key0 + gl.arange(0, _SUB_N, layout=key_layout)
            value_scale = gl.where(keys < kv_len, value_scale, 0.0)
        return key_scale, value_scale

    @gluon.jit
    def _scores(
        s_int, key_scale, masked, key0, q_pos, prefix_len, kv_len, s_layout: gl.constexpr,
        CAUSAL: gl.constexpr,
    ):  # fmt: skip
        """A run's int32 Q·Kᵀ in fp32 with its key scales (row scales come later), -inf
        where masked. |s| <= 128*127*127 < 2^22, so s's bits + ROUND_MAGIC_BITS read as
        ROUND_MAGIC + s: one FMA per score, (ROUND_MAGIC + s) * k - ROUND_MAGIC * k,
        off by at most ~1 unit of s (the products' rounding; INT8 Q and K's own
        rounding puts several units of noise on s)."""
        s_magic = (s_int + _ROUND_MAGIC_BITS).to(gl.float32, bitcast=True)
        s = s_magic * gl.expand_dims(key_scale, 0) + gl.expand_dims(key_scale * -_ROUND_MAGIC, 0)
        if masked:  # steps crossing kv end or the causal diagonal
            keys = key0 + gl.arange(0, _SUB_N, layout=gl.SliceLayout(0, s_layout))
            visible = gl.expand_dims(keys < kv_len, 0)
            if CAUSAL:  # bottom-right: chunk row i sees keys <= prefix_len + i
                visible = visible & (
                    gl.expand_dims(keys, 0) <= gl.expand_dims(q_pos + prefix_len, 1)
                )
            s = gl.where(visible, s, float("-inf"))
        return s

    @gluon.jit
    def _int8_p(p, to_int8):
        """round(p * to_int8) as int8 (0..127): the low byte of p * to_int8 + ROUND_MAGIC."""
        p_magic = p * gl.expand_dims(to_int8, 1) + _ROUND_MAGIC
        return p_magic.to(gl.int32, bitcast=True).to(gl.int8)

    @gluon.jit
    def _softmax_step(s_a, s_b, q_scale, value_scale_a, value_scale_b, m, l):
        """One online-softmax step over a page pair's scores (``_scores``), kv8_pv's
        INT8 arithmetic. Returns (P_a, P_b, m, l, alpha, beta): int8 P of each run
        (each row's largest over the pair is 127), the running max and sum, the factor
        on the running output and the one on this step's int32 P·V."""
        m_new = gl.maximum(m, gl.maximum(gl.max(s_a, 1), gl.max(s_b, 1)) * q_scale)
        alpha = gl.exp2(m - m_new)
        q_col = gl.expand_dims(q_scale, 1)
        m_col = gl.expand_dims(m_new, 1)
        p_a = gl.exp2(s_a * q_col - m_col)
        p_b = gl.exp2(s_b * q_col - m_col)
        l = l * alpha + gl.sum(p_a, 1) + gl.sum(p_b, 1)
        # V's per-key scales into P against the pair's largest (masked keys read 0).
        tile_scale = gl.maximum(
            gl.maximum(gl.max(value_scale_a, 0), gl.max(value_scale_b, 0)), 1.0e-30
        )
        inv_tile = 1.0 / tile_scale
        p_a = p_a * gl.expand_dims(value_scale_a * inv_tile, 0)
        p_b = p_b * gl.expand_dims(value_scale_b * inv_tile, 0)
        row_max = gl.maximum(gl.maximum(gl.max(p_a, 1), gl.max(p_b, 1)), 1.0e-30)
        to_int8 = _INT8_MAX / row_max
        beta = row_max * (tile_scale * _INV_INT8_MAX)
        return _int8_p(p_a, to_int8), _int8_p(p_b, to_int8), m_new, l, alpha, beta

    @gluon.jit
    def _kv8_consumer(
        q_smem,
        k_smem,
        v_smem,
        ks_smem,
        vs_smem,
        q_bar,
        k_ready,
        v_ready,
        kv_empty,
        q_scale_rows,
        o_rows,
        stride_o_tok,
        block_row,
        extend_len,
        prefix_len,
        kv_len,
        n_steps,
        first_masked_step,
        HEAD_DIM_V: gl.constexpr,
        STAGES: gl.constexpr,
        CAUSAL: gl.constexpr,
        OVERLAP: gl.constexpr,
    ):
        """The block's 128 query rows: both warpgroups in one partition of 8 warps, so
        one copy of this loop sits in the instruction cache (each wgmma is issued per
        warpgroup; a stage's release waits for both, the module docstring says what
        that costs)."""
        warps: gl.constexpr = gl.num_warps()
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[warps, 1], instr_shape=[16, _SUB_N, 32]
        )
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[warps, 1], instr_shape=[16, HEAD_DIM_V, 32]
        )
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
        row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
        key_layout: gl.constexpr = gl.SliceLayout(0, s_layout)
        o_row_layout: gl.constexpr = gl.SliceLayout(1, o_layout)

        # Chunk-local query positions; rows past the chunk get scale 1 (finite garbage,
        # never stored).
        q_pos = block_row + gl.arange(0, _BLOCK_M, layout=row_layout)
        q_scale = gl.load(q_scale_rows + q_pos, mask=q_pos < extend_len, other=1.0)
        s_zero = gl.zeros([_BLOCK_M, _SUB_N], gl.int32, s_layout)
        pv_zero = gl.zeros([_BLOCK_M, HEAD_DIM_V], gl.int32, o_layout)
        o = gl.zeros([_BLOCK_M, HEAD_DIM_V], gl.float32, o_layout)
        m = gl.full([_BLOCK_M], _M_INIT, gl.float32, row_layout)
        l = gl.zeros([_BLOCK_M], gl.float32, row_layout)
        mbarrier.wait(q_bar, 0)
        if OVERLAP:  # step 0's scores before the loop; each step issues the next one's
            s_a, s_b = _issue_scores(q_smem, k_smem, k_ready, 0, s_zero, STAGES)
        for j in range(n_steps):
            slot = j % STAGES
            phase = (j // STAGES) & 1
            masked = j >= first_masked_step
            key0 = j * _STEP_N
            if not OVERLAP:
                s_a, s_b = _issue_scores(q_smem, k_smem, k_ready, j, s_zero, STAGES)
            # The scales load while the wgmmas run.
            key_scale_a, value_scale_a = _run_scales(
                ks_smem, vs_smem, 2 * slot, masked, key0, kv_len, key_layout
            )
            key_scale_b, value_scale_b = _run_scales(
                ks_smem, vs_smem, 2 * slot + 1, masked, key0 + _SUB_N, kv_len, key_layout
            )
            s_a, s_b = warpgroup_mma_wait(0, deps=(s_a, s_b))
            s_a = _scores(
                s_a, key_scale_a, masked, key0, q_pos, prefix_len, kv_len, s_layout, CAUSAL
            )
            s_b = _scores(
                s_b, key_scale_b, masked, key0 + _SUB_N, q_pos, prefix_len, kv_len, s_layout,
                CAUSAL,
            )  # fmt: skip
            p_a, p_b, m, l, alpha, beta = _softmax_step(
                s_a, s_b, q_scale, value_scale_a, value_scale_b, m, l
            )
            p_a = gl.convert_layout(p_a, p_layout)
            p_b = gl.convert_layout(p_b, p_layout)

            # 8-bit V tiles are [Dv, SUB_N] (K-major), viewed as [SUB_N, Dv].
            mbarrier.wait(v_ready.index(slot), phase)
            pv = warpgroup_mma(
                p_a, v_smem.index(2 * slot).permute((1, 0)), pv_zero, use_acc=False, is_async=True
            )
            pv = warpgroup_mma(p_b, v_smem.index(2 * slot + 1).permute((1, 0)), pv, is_async=True)
            if OVERLAP:
                # The next step's scores run behind this step's P·V, under the release
                # and the output update. The last step re-reads its own keys: a result
                # nobody uses, and no load is left to overwrite them.
                s_a, s_b = _issue_scores(
                    q_smem, k_smem, k_ready, gl.minimum(j + 1, n_steps - 1), s_zero, STAGES
                )
                # All but the two newest groups (those scores): P·V is done. (triton 3.6
                # rejects 8-bit wait dependencies: P is not one.)
                pv = warpgroup_mma_wait(2, deps=(pv,))
            else:
                pv = warpgroup_mma_wait(0, deps=(pv,))
            mbarrier.arrive(kv_empty.index(slot), count=1)
            alpha_o = gl.expand_dims(gl.convert_layout(alpha, o_row_layout), 1)
            beta_o = gl.expand_dims(gl.convert_layout(beta, o_row_layout), 1)
            # o * alpha + (bits - ROUND_MAGIC) * beta as two FMAs: |int32 P·V| <=
            # 128*127*127 < 2^22, so its bits + ROUND_MAGIC_BITS read as ROUND_MAGIC + P·V.
            pv_magic = (pv + _ROUND_MAGIC_BITS).to(gl.float32, bitcast=True)
            o = pv_magic * beta_o + (o * alpha_o - _ROUND_MAGIC * beta_o)

        if OVERLAP:  # the unused scores still read shared memory
            s_a, s_b = warpgroup_mma_wait(0, deps=(s_a, s_b))

        # Epilogue: 1/l (0 for rows that saw no key), masked stores of the chunk's rows
        # only (a TMA store could spill into the next request).
        l_o = gl.convert_layout(l, o_row_layout)
        out = o * gl.expand_dims(1.0 / gl.where(l_o == 0.0, 1.0, l_o), 1)
        channels = gl.arange(0, HEAD_DIM_V, layout=gl.SliceLayout(0, o_layout))
        out_pos = block_row + gl.arange(0, _BLOCK_M, layout=o_row_layout)
        offsets = gl.expand_dims(out_pos.to(gl.int64) * stride_o_tok, 1) + gl.expand_dims(
            channels, 0
        )
        gl.store(
            o_rows + offsets,
            out.to(o_rows.dtype.element_ty),
            mask=gl.expand_dims(out_pos < extend_len, 1),
        )

    # Sizes are not specialised on (a new variant per batch shape otherwise).
    @gluon.jit(do_not_specialize=["num_tokens", "num_kv_heads", "kv_group"])
    def _sage_hopper_kv8_kernel(
        q_desc,
        k_desc,
        v_desc,
        ks_desc,
        vs_desc,
        q_scale,
        o_extend,
        qo_indptr,
        kv_indptr,
        kv_indices,
        stride_o_tok,
        stride_o_head,
        num_tokens,
        num_kv_heads,
        kv_group,
        HEAD_DIM_V: gl.constexpr,
        CAUSAL: gl.constexpr,
        STAGES: gl.constexpr,
        OVERLAP: gl.constexpr,
        PRODUCER_REGS: gl.constexpr,
        PAGE_SIZE: gl.constexpr,
    ):
        """One CTA per (128-row block, query head, request). ``kv_indptr`` /
        ``kv_indices`` list each request's whole sequence, the chunk included."""
        q_head = gl.program_id(1)
        b = gl.program_id(2)
        kv_start, kv_len, extend_start, extend_len = request_bounds(qo_indptr, kv_indptr, b)
        has_block, block_row = query_block(extend_len, CAUSAL)
        if not has_block:  # before any barrier or partition exists
            return
        prefix_len = kv_len - extend_len
        n_steps, first_masked_step = key_steps(prefix_len, kv_len, block_row, _STEP_N, CAUSAL)
        last_run = (gl.cdiv(kv_len, _SUB_N) - 1).to(gl.int32)  # the sequence's last run
        kv_head = q_head // kv_group
        q_row = (q_head.to(gl.int64) * num_tokens + extend_start + block_row).to(gl.int32)
        q_scale_rows = q_scale + q_head.to(gl.int64) * num_tokens + extend_start
        o_rows = o_extend + extend_start * stride_o_tok + q_head.to(gl.int64) * stride_o_head

        q_smem = gl.allocate_shared_memory(q_desc.dtype, q_desc.block_type.shape, q_desc.layout)
        # Two 64-key runs per stage.
        k_smem = ring_buffers(k_desc, 2 * STAGES)
        v_smem = ring_buffers(v_desc, 2 * STAGES)
        ks_smem = ring_buffers(ks_desc, 2 * STAGES)
        vs_smem = ring_buffers(vs_desc, 2 * STAGES)
        q_bar, k_ready, v_ready, kv_empty = stage_barriers(STAGES, 1)  # one consumer partition
        fence_async_shared()

        # Argument tuples inline (hopper_attention's docstring says why).
        gl.warp_specialize(
            [
                (
                    _kv8_consumer,
                    (
                        q_smem,
                        k_smem,
                        v_smem,
                        ks_smem,
                        vs_smem,
                        q_bar,
                        k_ready,
                        v_ready,
                        kv_empty,
                        q_scale_rows,
                        o_rows,
                        stride_o_tok,
                        block_row,
                        extend_len.to(gl.int32),
                        prefix_len.to(gl.int32),
                        kv_len.to(gl.int32),
                        n_steps,
                        first_masked_step,
                        HEAD_DIM_V,
                        STAGES,
                        CAUSAL,
                        OVERLAP,
                    ),
                ),
                (
                    _kv8_producer,
                    (
                        q_desc,
                        k_desc,
                        v_desc,
                        ks_desc,
                        vs_desc,
                        q_smem,
                        k_smem,
                        v_smem,
                        ks_smem,
                        vs_smem,
                        q_bar,
                        k_ready,
                        v_ready,
                        kv_empty,
                        q_row,
                        n_steps,
                        last_run,
                        kv_indices + kv_start,
                        kv_head,
                        num_kv_heads,
                        STAGES,
                        HEAD_DIM_V,
                        PAGE_SIZE,
                    ),
                ),
            ],
            [1],
            [PRODUCER_REGS],
        )


def sage_extend_kv8_hopper(
    q_extend: torch.Tensor,
    o_extend: torch.Tensor,
    cache: KV8Cache,
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    max_len_extend: int,
    sm_scale: float,
    causal: bool,
    config: KV8HopperConfig = KV8_HOPPER_CONFIG,
) -> None:
    """``extend_kv8.sage_extend_attention_kv8`` on Hopper, over the cache's pages as
    stored: same arguments and semantics (``kv_indptr`` / ``kv_indices``: each
    request's whole sequence, the chunk already written); INT8 P·V (the module
    docstring). Callers check ``hopper_kv8_supports``. No host sync; graph-capturable."""
    if not hopper_kernel_available():
        raise RuntimeError(f"sage_attn: Gluon is unavailable ({gluon_import_error()})")
    num_tokens, num_q_heads, head_dim = q_extend.shape
    cache.check_queries(q_extend, o_extend)
    refusal = _cache_refusal(cache, q_extend.device)
    if refusal is not None:
        raise ValueError(f"sage_attn: {refusal}")
    if config.overlap and config.stages < 2:
        raise ValueError("sage_attn: the overlapped schedule waits for the next stage first")
    if num_tokens == 0 or max_len_extend == 0:
        return
    q_int8, q_scale = quantized_q(q_extend, sm_scale, cache.rotated)
    q_desc = shared_descriptor(q_int8.view(-1, head_dim), [BLOCK_M, head_dim])
    k_desc, v_desc = (shared_descriptor(view, box) for view, box in kv8_tile_views(cache, SUB_N))
    ks_desc, vs_desc = (shared_descriptor(view, box) for view, box in kv8_scale_views(cache, SUB_N))
    grid = (triton.cdiv(max_len_extend, BLOCK_M), num_q_heads, qo_indptr.shape[0] - 1)
    _sage_hopper_kv8_kernel[grid](
        q_desc,
        k_desc,
        v_desc,
        ks_desc,
        vs_desc,
        q_scale,
        o_extend,
        qo_indptr,
        kv_indptr,
        kv_indices,
        stride_o_tok=o_extend.stride(0),
        stride_o_head=o_extend.stride(1),
        num_tokens=num_tokens,
        num_kv_heads=cache.num_kv_heads,
        kv_group=num_q_heads // cache.num_kv_heads,
        HEAD_DIM_V=cache.head_dim_v,
        CAUSAL=causal,
        STAGES=config.stages,
        OVERLAP=config.overlap,
        PRODUCER_REGS=config.producer_regs,
        PAGE_SIZE=cache.page_size,
        num_warps=8,  # the default partition: both consumer warpgroups
    )
