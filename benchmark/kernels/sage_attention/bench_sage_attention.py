"""sage_attn kernel benchmark, side by side with FA4, cuDNN, SGLang's Triton kernels.

FA4 (SGLang's vendored FlashAttention-4 CuTe kernels, what ``--attention-backend fa4``
runs and sage_attn's base on Hopper) is the baseline the tables' ratios use. One
process, the same inputs for every implementation, medians of
``triton.testing.do_bench`` after warm-up; inputs are larger than L2 (decode
rotates through several KV sets). TOPS count only visible (query, key) pairs:
4 * H * D * pairs, pairs = Lq*Lk (full) or the bottom-right causal triangle.

Suites (``--suites``):
- dense:  prefill without cached prefix, L = 1K..32K, hd 64/128, causal and not;
          sage fp16/fp8/int8 P·V (the op: Gluon kernel on Hopper; kernel-only; and the op
          forced onto the portable Triton kernel, ``*_triton``), ``fa4`` over the paged
          cache, SDPA flash/cuDNN, SGLang's Triton extend kernel, sageattention 1.0.6,
          FlashInfer.
- extend: prefill over a paged, scrambled cache with 0/50/90% of each request cached.
- decode: batch 1..64 x KV 1K..128K, ``fa4_decode``, SGLang's Triton split-KV decode and
          the 8-bit cache's decode over the same slots, GB/s against the card's measured
          copy bandwidth.
- sweep:  sage kernel-only time for each tile config of ``--tiles`` (tuning),
          including the plain-load (non-TMA) path Ampere and Ada run.

    python bench_sage_attention.py --quick            # ~2 min: hd128 8K dense
    python bench_sage_attention.py --out results/     # everything, JSON + CSV
    python bench_sage_attention.py --plot results/bench_sage_attention.json
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import functools
import itertools
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from unittest import mock

import torch
import triton

MAX_ROWS_CHECKED = 256  # rows of the fp32 reference slice per shape


@dataclass
class Row:
    suite: str
    impl: str
    batch: int
    q_heads: int
    kv_heads: int
    head_dim: int
    q_len: int  # new tokens per request (1 for decode)
    kv_len: int  # keys per request (cached + new)
    causal: bool
    ms: float
    tops: float  # dense/extend; 0 for decode
    gbps: float  # decode: KV bytes read per second; 0 otherwise
    cos: float
    rel_l1: float
    note: str = ""


def visible_pairs(q_len: int, kv_len: int, causal: bool) -> int:
    if not causal:
        return q_len * kv_len
    return q_len * (kv_len - q_len) + q_len * (q_len + 1) // 2


def wanted(args, impl: str) -> bool:
    """``--impls`` selects implementations by shell pattern (every one by default)."""
    return any(fnmatch.fnmatchcase(impl, pattern) for pattern in args.impls)


def median_ms(fn, args) -> float:
    return triton.testing.do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms, return_mode="median")


# ---------------------------------------------------------------- inputs


def page_slots(batch, length, page_size, device, first_page=1, shuffle=True):
    """Slots of ``batch`` requests of ``length`` tokens, each in its own pages of
    ``page_size`` with token i at offset i % page_size (as SGLang's paged allocator
    places them), pages numbered from ``first_page`` (SGLang leaves page 0 unused) and
    shuffled across the requests as a server's pages end up after churn, unless not
    ``shuffle``: (slots [batch, length] int64, page table [batch, pages] int32)."""
    pages_per_req = -(-length // page_size)
    count = batch * pages_per_req
    order = torch.randperm(count, device=device) if shuffle else torch.arange(count, device=device)
    page_table = (order + first_page).view(batch, pages_per_req)
    in_page = torch.arange(page_size, device=device)
    slots = (page_table[:, :, None] * page_size + in_page).view(batch, -1)[:, :length]
    return slots, page_table.to(torch.int32)


def paged_batch(batch, prefix_len, chunk_len, q_heads, kv_heads, head_dim, dtype, page=64):
    """A batch of equal requests: ``prefix_len`` cached keys in scrambled pages + a chunk."""
    dev = "cuda"
    num_pages = batch * -(-prefix_len // page) + 1
    slots, _ = page_slots(batch, prefix_len, page, dev)
    tokens = batch * chunk_len

    def randn(*shape):
        return torch.randn(*shape, dtype=dtype, device=dev)

    def indptr(n):
        return torch.arange(batch + 1, dtype=torch.int32, device=dev) * n

    q = randn(tokens, q_heads, head_dim)
    return dict(
        q_extend=q,
        k_extend=randn(tokens, kv_heads, head_dim),
        v_extend=randn(tokens, kv_heads, head_dim),
        o_extend=torch.empty_like(q),
        k_buffer=randn(num_pages * page, kv_heads, head_dim),
        v_buffer=randn(num_pages * page, kv_heads, head_dim),
        qo_indptr=indptr(chunk_len),
        kv_indptr=indptr(prefix_len),
        kv_indices=slots.reshape(-1),
        max_len_extend=chunk_len,
    )


def gathered_kv(inputs, b, prefix_len, chunk_len):
    """Request b's keys and values in order (prefix then chunk), [L, Hkv, D]."""
    slots = inputs["kv_indices"][b * prefix_len : (b + 1) * prefix_len]
    rows = slice(b * chunk_len, (b + 1) * chunk_len)
    k = torch.cat([inputs["k_buffer"][slots], inputs["k_extend"][rows]])
    v = torch.cat([inputs["v_buffer"][slots], inputs["v_extend"][rows]])
    return k, v


def reference_rows(inputs, prefix_len, chunk_len, causal):
    """fp32 attention for the last rows of request 0's chunk, every head: (rows, out)."""
    rows = min(MAX_ROWS_CHECKED, chunk_len)
    q = inputs["q_extend"][chunk_len - rows : chunk_len].float()
    k, v = (t.float() for t in gathered_kv(inputs, 0, prefix_len, chunk_len))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[2])
    if causal:
        query_pos = prefix_len + torch.arange(chunk_len - rows, chunk_len, device="cuda")
        visible = torch.arange(k.shape[0], device="cuda")[None, :] <= query_pos[:, None]
        scores = scores.masked_fill(~visible, float("-inf"))
    return slice(chunk_len - rows, chunk_len), torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


# ---------------------------------------------------------------- implementations


def pack(inputs, pv: str):
    """The sage pre-pass alone (quantized, packed K/V) for kernel-only timings."""
    from sglang.srt.layers.attention.sage_attention.layout import PV
    from sglang.srt.layers.attention.sage_attention.quantize import quantize_kv

    names = ("k_extend", "v_extend", "k_buffer", "v_buffer", "qo_indptr", "kv_indptr", "kv_indices")
    return quantize_kv(*(inputs[n] for n in names), pv=PV(pv))


def kv8_cache_for(inputs, batch, page_size):
    """The 8-bit KV cache the kv8 rows read: each request's sequence (prefix, then
    chunk) in its own pages of ``page_size`` tokens, the pages shuffled across the pool
    as a server's end up. The prefix is quantized into the cache once, outside the
    timing (a serving cache holds it already). Returns (cache, the chunk's slots, every
    request's whole-sequence slots, their indptr)."""
    from sglang.srt.layers.attention.sage_attention.kv8_cache import (
        allocate_kv8_cache,
        write_kv8,
    )

    q = inputs["q_extend"]
    k_buffer, v_buffer = inputs["k_buffer"], inputs["v_buffer"]
    _, kv_heads, head_dim = inputs["k_extend"].shape
    chunk_len, prefix = inputs["max_len_extend"], inputs["kv_indices"]
    prefix_len = prefix.shape[0] // batch
    seq_slots, page_table = page_slots(batch, prefix_len + chunk_len, page_size, q.device)
    cache = allocate_kv8_cache(
        (page_table.numel() + 1) * page_size, kv_heads, head_dim, head_dim, q.device,
        k_mean=k_buffer[:4096].float().mean(0), page_size=page_size,
    )  # fmt: skip
    write_kv8(cache, seq_slots[:, :prefix_len].reshape(-1), k_buffer[prefix], v_buffer[prefix])
    chunk_slots = seq_slots[:, prefix_len:].reshape(-1)
    assert chunk_slots.shape[0] == inputs["k_extend"].shape[0]
    return cache, chunk_slots, seq_slots.reshape(-1), inputs["kv_indptr"] + inputs["qo_indptr"]


def sage_kv8(inputs, batch, causal, page_size, pv_int8=None, kernel="auto"):
    """The 8-bit KV cache's extend kernel: (write the chunk + extend over the cache,
    extend only); ``pv_int8`` picks the Triton kernel's P·V (None: the kernel's
    default), ``kernel`` as ``SGLANG_SAGE_ATTN_KERNEL`` ("gluon": the Hopper kernel).
    With "gluon", (None, None) where the call did not reach the Gluon kernel (off
    Hopper, pages under 64): a row named for it must have run it."""
    from sglang.srt.layers.attention.sage_attention import extend_kv8
    from sglang.srt.layers.attention.sage_attention.extend_kv8 import sage_extend_attention_kv8
    from sglang.srt.layers.attention.sage_attention.kv8_cache import write_kv8

    q, o = inputs["q_extend"], inputs["o_extend"]
    cache, chunk_slots, kv_indices, kv_indptr = kv8_cache_for(inputs, batch, page_size)

    def extend():
        sage_extend_attention_kv8(
            q, o, cache, inputs["qo_indptr"], kv_indptr, kv_indices, inputs["max_len_extend"],
            sm_scale=q.shape[-1] ** -0.5, causal=causal, pv_int8=pv_int8, kernel=kernel,
        )  # fmt: skip
        return o

    def write_and_extend():
        write_kv8(cache, chunk_slots, inputs["k_extend"], inputs["v_extend"])
        return extend()

    # The chunk's slots hold it before "extend only" is timed; the call also shows
    # which kernel the dispatch took.
    gluon_calls = mock.Mock(wraps=extend_kv8.sage_extend_kv8_hopper)
    with mock.patch.object(extend_kv8, "sage_extend_kv8_hopper", gluon_calls):
        write_and_extend()
    if kernel == "gluon" and not gluon_calls.called:
        return None, None
    return write_and_extend, extend


CUTE_SCHEDULES = {"": {}, "_no_pingpong": dict(pingpong=False)}


def sage_kv8_cute(inputs, batch, causal, page_size):
    """The CuTe DSL version of the Gluon 8-bit kernel (``hopper_kv8_cute.py``): a row
    name -> extend-only run per ``CUTE_SCHEDULES`` entry, all over one written cache;
    none off Hopper, for a cache it refuses, or without the CuTe DSL."""
    from sglang.srt.layers.attention.sage_attention.kv8_cache import write_kv8

    try:
        from sglang.srt.layers.attention.sage_attention.hopper_kv8_cute import (
            hopper_kv8_cute_supports,
            sage_extend_kv8_cute,
        )
    except ImportError:
        return {}
    q, o = inputs["q_extend"], inputs["o_extend"]
    cache, chunk_slots, kv_indices, kv_indptr = kv8_cache_for(inputs, batch, page_size)
    if not hopper_kv8_cute_supports(cache, q.device):
        return {}
    write_kv8(cache, chunk_slots, inputs["k_extend"], inputs["v_extend"])

    def extend_with(schedule):
        def extend():
            sage_extend_kv8_cute(
                q, o, cache, inputs["qo_indptr"], kv_indptr, kv_indices,
                inputs["max_len_extend"], sm_scale=q.shape[-1] ** -0.5, causal=causal,
                **schedule,
            )  # fmt: skip
            return o

        return extend

    return {
        f"sage_kv8_cute{suffix}_kernel_only": extend_with(schedule)
        for suffix, schedule in CUTE_SCHEDULES.items()
    }


def sage_kv8_flash(inputs, batch, causal, page_size):
    """What the 8-bit cache's server runs where FlashAttention loads (``kv8_flash.py``):
    write the chunk, unpack the requests' rows, FlashAttention over them. None where no
    FlashAttention loads, or not causal (the server's extends are)."""
    from sglang.srt.layers.attention.sage_attention import kv8_flash
    from sglang.srt.layers.attention.sage_attention.base_backend import flash_version_here
    from sglang.srt.layers.attention.sage_attention.kv8_cache import write_kv8

    q, o = inputs["q_extend"], inputs["o_extend"]
    ver, _ = flash_version_here(q.device)
    if ver is None or not causal:
        return None
    cache, chunk_slots, kv_indices, kv_indptr = kv8_cache_for(inputs, batch, page_size)
    attention = kv8_flash.flash_attention(ver)
    workspace = kv8_flash.workspace_for(None, kv_indices.shape[0], q, cache)
    max_len_kv = kv_indices.shape[0] // batch

    def run():
        write_kv8(cache, chunk_slots, inputs["k_extend"], inputs["v_extend"])
        kv8_flash.flash_prefill_kv8(
            q, o, cache, qo_indptr=inputs["qo_indptr"], kv_indptr=kv_indptr,
            kv_indices=kv_indices, max_len_extend=inputs["max_len_extend"],
            max_len_kv=max_len_kv, sm_scale=q.shape[-1] ** -0.5, attention=attention,
            workspace=workspace,
        )  # fmt: skip
        return o

    return run


def prefill_impls(
    inputs, batch, prefix_len, chunk_len, causal, with_baselines=True, kv8_page_size=64
):
    """name -> callable returning the output [tokens, Hq, D]."""
    from sglang.kernels.ops.attention.extend_attention import extend_attention_fwd
    from sglang.srt.layers.attention.sage_attention import sage_extend_attention
    from sglang.srt.layers.attention.sage_attention.extend_attention import (
        SUPPORTED_PV,
        sage_attention_from_packed,
        tile_config,
        use_hopper_kernel,
    )
    from sglang.srt.layers.attention.sage_attention.hopper_attention import (
        sage_attention_from_packed_hopper,
    )

    q, o = inputs["q_extend"], inputs["o_extend"]
    q_heads, head_dim = q.shape[1], q.shape[2]
    kv_len = prefix_len + chunk_len

    def sage(pv, kernel="auto", rotate_qk=False):
        def run():
            sage_extend_attention(
                **inputs, causal=causal, pv=pv, kernel=kernel, rotate_qk=rotate_qk
            )
            return o

        return run

    def sage_kernel_only(pv):
        """The attention kernel the op dispatches to (Gluon on Hopper), pre-pass excluded."""
        packed = pack(inputs, pv)
        if use_hopper_kernel("auto", head_dim, o.shape[2], q.device):

            def run():
                sage_attention_from_packed_hopper(
                    q, o, packed, inputs["qo_indptr"], inputs["kv_indptr"], chunk_len,
                    sm_scale=head_dim**-0.5, causal=causal,
                )  # fmt: skip
                return o

            return run
        config = tile_config(head_dim, causal, packed.pv, q.device)

        def run():
            sage_attention_from_packed(
                q, o, packed, inputs["qo_indptr"], inputs["kv_indptr"], chunk_len,
                sm_scale=head_dim**-0.5, causal=causal, config=config,
            )  # fmt: skip
            return o

        return run

    impls = {}
    for pv in SUPPORTED_PV:
        impls[f"sage_{pv}"] = sage(pv)
        impls[f"sage_{pv}_kernel_only"] = sage_kernel_only(pv)
        impls[f"sage_{pv}_triton"] = sage(pv, kernel="triton")
    impls["sage_fp16_rotated"] = sage("fp16", rotate_qk=True)  # the Q/K rotation's cost
    impls["sage_kv8"], impls["sage_kv8_kernel_only"] = sage_kv8(
        inputs, batch, causal, kv8_page_size
    )
    # The warp-specialised Gluon kernel over the same pages, where it runs (Hopper).
    gluon, gluon_only = sage_kv8(inputs, batch, causal, kv8_page_size, kernel="gluon")
    if gluon is not None:
        impls["sage_kv8_gluon"], impls["sage_kv8_gluon_kernel_only"] = gluon, gluon_only
    # The CuTe DSL kernel and its schedules (the language-route comparison).
    impls.update(sage_kv8_cute(inputs, batch, causal, kv8_page_size))
    impls["sage_kv8_pvint8"], impls["sage_kv8_pvint8_kernel_only"] = sage_kv8(
        inputs, batch, causal, kv8_page_size, pv_int8=True, kernel="triton"
    )
    kv8_flash = sage_kv8_flash(inputs, batch, causal, kv8_page_size) if q.is_cuda else None
    if kv8_flash is not None:
        impls["sage_kv8_flash"] = kv8_flash
    if not with_baselines:
        return impls

    def sglang_triton():
        extend_attention_fwd(
            q,
            inputs["k_extend"],
            inputs["v_extend"],
            o,
            inputs["k_buffer"],
            inputs["v_buffer"],
            inputs["qo_indptr"],
            inputs["kv_indptr"],
            inputs["kv_indices"],
            None,
            causal,
            None,
            chunk_len,
            1.0,
            1.0,
        )
        return o

    impls["sglang_triton"] = sglang_triton
    fa4 = fa4_paged_prefill(inputs, batch, prefix_len, chunk_len, causal)
    if fa4 is not None:
        impls["fa4"] = fa4

    # Dense baselines see contiguous K/V (gathered once, outside the timing): the
    # ideal a paged kernel is measured against.
    ks, vs = zip(
        *(gathered_kv(inputs, b, prefix_len, chunk_len) for b in range(batch)), strict=True
    )
    k_bhld = torch.stack(ks).transpose(1, 2)
    v_bhld = torch.stack(vs).transpose(1, 2)
    q_bhld = q.view(batch, chunk_len, q_heads, head_dim).transpose(1, 2)
    group = q_heads // k_bhld.shape[1]

    def sdpa(backend):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.nn.attention.bias import causal_lower_right
        from torch.nn.functional import scaled_dot_product_attention

        if group > 1 and backend == SDPBackend.FLASH_ATTENTION:
            k_, v_ = k_bhld.repeat_interleave(group, 1), v_bhld.repeat_interleave(group, 1)
        else:
            k_, v_ = k_bhld, v_bhld
        kwargs = dict(enable_gqa=group > 1 and backend != SDPBackend.FLASH_ATTENTION)
        if causal and prefix_len:
            kwargs["attn_mask"] = causal_lower_right(chunk_len, kv_len)
        else:
            kwargs["is_causal"] = causal

        def run():
            with sdpa_kernel(backend):
                out = scaled_dot_product_attention(q_bhld, k_, v_, **kwargs)
            return out.transpose(1, 2).reshape(q.shape)

        return run

    from torch.nn.attention import SDPBackend

    impls["sdpa_cudnn"] = sdpa(SDPBackend.CUDNN_ATTENTION)
    impls["sdpa_flash"] = sdpa(SDPBackend.FLASH_ATTENTION)

    if prefix_len == 0 and chunk_len % 64 == 0:
        try:
            from sageattention import sageattn  # 1.0.6 (PyPI); q_len == kv_len only

            def sageattention_106():
                out = sageattn(q_bhld, k_bhld, v_bhld, tensor_layout="HND", is_causal=causal)
                return out.transpose(1, 2).reshape(q.shape)

            impls["sageattention_1.0.6"] = sageattention_106
        except ImportError:
            pass
    try:
        import flashinfer

        def flashinfer_prefill():
            out = flashinfer.single_prefill_with_kv_cache(
                q[:chunk_len], ks[0], vs[0], causal=causal
            )
            return out  # request 0 only: compared on its rows, timed per request

        impls["flashinfer_per_request"] = flashinfer_prefill
    except ImportError:
        pass
    return impls


def fa4_kernel():
    """SGLang's vendored FlashAttention-4 (``--attention-backend fa4``'s kernel), or None
    with the reason printed where its CuTe DSL is not installed."""
    try:
        from sglang.kernels.ops.attention.flash_attention_v4 import (
            flash_attn_with_kvcache,
            is_flash_attention_v4_available,
        )
    except ImportError as exc:
        print(f"  fa4: not available ({exc})")
        return None
    if not is_flash_attention_v4_available():
        print("  fa4: not available (FlashAttention-4's CuTe DSL does not import)")
        return None
    return flash_attn_with_kvcache


def fa4_paged_prefill(inputs, batch, prefix_len, chunk_len, causal, page=64):
    """What the fa4 backend runs for an extend: FA4 over the paged cache holding each
    request's prefix (the same scrambled pages) and, after it, its chunk (written once,
    outside the timing: the backend writes it before attending)."""
    kernel = fa4_kernel()
    if kernel is None or chunk_len % page:
        return None
    q, o = inputs["q_extend"], inputs["o_extend"]
    num_prefix_slots = inputs["k_buffer"].shape[0]
    kv_heads, head_dim = inputs["k_buffer"].shape[1:]

    def paged(buffer, extend):
        return torch.cat([buffer, extend]).view(-1, page, kv_heads, head_dim)

    k_cache, v_cache = (
        paged(inputs["k_buffer"], inputs["k_extend"]),
        paged(inputs["v_buffer"], inputs["v_extend"]),
    )
    rows = []
    for b in range(batch):
        prefix = inputs["kv_indices"][b * prefix_len : (b + 1) * prefix_len : page] // page
        chunk = num_prefix_slots + b * chunk_len + torch.arange(0, chunk_len, page, device="cuda")
        rows.append(torch.cat([prefix, chunk // page]))
    page_table = torch.stack(rows).to(torch.int32)
    cache_seqlens = torch.full((batch,), prefix_len + chunk_len, dtype=torch.int32, device="cuda")

    def run():
        kernel(
            q, k_cache, v_cache, page_table=page_table, cache_seqlens=cache_seqlens,
            cu_seqlens_q=inputs["qo_indptr"], max_seqlen_q=chunk_len,
            softmax_scale=head_dim**-0.5, causal=causal, out=o,
        )  # fmt: skip
        return o

    return run


def bench_prefill(args, suite, head_dim, prefix_len, chunk_len, causal) -> list[Row]:
    kv_len = prefix_len + chunk_len
    batch = max(1, args.tokens // kv_len)
    inputs = paged_batch(
        batch, prefix_len, chunk_len, args.q_heads, args.kv_heads, head_dim, torch.bfloat16
    )
    rows, ref = reference_rows(inputs, prefix_len, chunk_len, causal)
    pairs = visible_pairs(chunk_len, kv_len, causal)
    out = []
    impls = prefill_impls(
        inputs, batch, prefix_len, chunk_len, causal, kv8_page_size=args.kv8_page_size
    )
    for name, run in impls.items():
        if not wanted(args, name):
            continue
        try:
            result = run()
            cos, rel_l1 = attention_error(result[rows], ref)
            ms = median_ms(run, args)
        except Exception as exc:  # a baseline that cannot run this shape is reported, not fatal
            print(f"  {name}: skipped ({type(exc).__name__}: {str(exc)[:100]})")
            continue
        reqs = 1 if name == "flashinfer_per_request" else batch
        tops = 4 * args.q_heads * head_dim * pairs * reqs / (ms * 1e-3) / 1e12
        out.append(
            Row(
                suite,
                name,
                reqs,
                args.q_heads,
                args.kv_heads,
                head_dim,
                chunk_len,
                kv_len,
                causal,
                ms,
                tops,
                0.0,
                cos,
                rel_l1,
            )
        )
    return out


def copy_bandwidth_gbps() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def bench_decode(args, batch, kv_len, head_dim=128) -> list[Row]:
    """FA4's decode over the bf16 cache (``fa4_decode``: what a Hopper server decodes
    with, and sage_attn on its fa4 base), SGLang's Triton decode at its split cap (16
    here, as its backend) and a raised one (64), and the 8-bit cache's decode
    (``sage_kv8_decode``) at both caps, all reading the same slots, in pages of
    ``--decode-page-size`` tokens (both caches: the bf16 pool as SGLang pages it, the
    8-bit one in its page-major format). GB/s count the bytes each cache actually holds
    for the keys read."""
    from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd
    from sglang.kernels.ops.attention.metadata import get_num_kv_splits_triton
    from sglang.srt.layers.attention.sage_attention.decode_kv8 import (
        how_decode_reads,
        sage_decode_kv8,
    )
    from sglang.srt.layers.attention.sage_attention.kv8_cache import (
        allocate_kv8_cache,
        kv8_bytes_per_token_head,
        write_kv8,
    )

    q_heads, kv_heads = args.q_heads, args.kv_heads
    bf16_bytes = batch * kv_len * kv_heads * head_dim * 2 * 2
    kv8_bytes = batch * kv_len * kv_heads * kv8_bytes_per_token_head(head_dim, head_dim)
    copies = max(1, math.ceil(256e6 / bf16_bytes))  # rotate past the 50 MB L2
    page_size = args.decode_page_size
    pages_per_req = math.ceil(kv_len / page_size)
    num_pages = copies * batch * pages_per_req + 1  # page 0 unused, as in SGLang
    num_slots = num_pages * page_size
    pool = torch.randn(num_slots, 2, kv_heads, head_dim, dtype=torch.bfloat16, device="cuda")
    k_buffer, v_buffer = pool[:, 0], pool[:, 1]
    cache = allocate_kv8_cache(
        num_slots, kv_heads, head_dim, head_dim, "cuda",
        k_mean=k_buffer[: min(num_slots, 4096)].float().mean(0), page_size=page_size,
    )  # fmt: skip
    all_slots = torch.arange(num_slots, device="cuda")
    for chunk in all_slots.split(1 << 20):
        write_kv8(cache, chunk, k_buffer[chunk], v_buffer[chunk])
    # random: every page in its own place, as a server's pages end up after churn (at
    # page size 1, every key: the worst case for a gather); contiguous: each request's
    # pages in order, as a fresh server allocates them.
    shuffle = getattr(args, "decode_slots", "random") == "random"
    page_tables, index_sets = [], []
    for c in range(copies):
        slots, page_table = page_slots(
            batch, kv_len, page_size, "cuda", first_page=1 + c * batch * pages_per_req,
            shuffle=shuffle,
        )  # fmt: skip
        page_tables.append(page_table)
        index_sets.append(slots.reshape(-1))
    q = torch.randn(batch, q_heads, head_dim, dtype=torch.bfloat16, device="cuda")
    o = torch.empty_like(q)
    kv_indptr = torch.arange(0, batch + 1, dtype=torch.int32, device="cuda") * kv_len
    seq_lens = torch.full((batch,), kv_len, dtype=torch.int32, device="cuda")
    slots = index_sets[0][:kv_len]  # request 0's exact output, for the error columns
    k0 = k_buffer[slots].float().repeat_interleave(q_heads // kv_heads, 1)
    v0 = v_buffer[slots].float().repeat_interleave(q_heads // kv_heads, 1)
    probs = (torch.einsum("hd,khd->hk", q[0].float(), k0) * head_dim**-0.5).softmax(-1)
    ref = torch.einsum("hk,khd->hd", probs, v0)

    def splits_for(max_splits):
        num_kv_splits = torch.empty(batch, dtype=torch.int32, device="cuda")
        get_num_kv_splits_triton[(1,)](
            num_kv_splits, seq_lens, batch, 1, q_heads, kv_heads, max_splits,
            torch.cuda.get_device_properties(0).multi_processor_count, MAX_NUM_SEQ=256,
        )  # fmt: skip
        logits = torch.empty(batch, q_heads, max_splits, head_dim, device="cuda")
        lse = torch.empty(batch, q_heads, max_splits, device="cuda")
        return num_kv_splits, logits, lse

    def bf16(kv_indices, max_splits, splits):
        num_kv_splits, logits, lse = splits
        decode_attention_fwd(
            q, k_buffer, v_buffer, o, kv_indptr, kv_indices, logits, lse, num_kv_splits,
            max_splits, head_dim**-0.5, 1.0, 1.0,
        )  # fmt: skip
        return o

    def fa4_decode_over_the_same_slots():
        """FA4 through the same page table (SGLang's fa4 backend at that --page-size):
        request b's row is its pages. Its cache is one tensor each for K and V, as
        SGLang's pool holds a layer (the same values)."""
        fa4 = fa4_kernel()
        if fa4 is None:
            return None
        tables = {s.data_ptr(): t for s, t in zip(index_sets, page_tables, strict=True)}
        k_pages, v_pages = (
            b.contiguous().view(num_pages, page_size, kv_heads, head_dim)
            for b in (k_buffer, v_buffer)
        )
        cu_seqlens_q = torch.arange(batch + 1, dtype=torch.int32, device="cuda")

        def run(kv_indices, max_splits, splits):
            fa4(
                q, k_pages, v_pages, page_table=tables[kv_indices.data_ptr()],
                cache_seqlens=seq_lens, cu_seqlens_q=cu_seqlens_q, max_seqlen_q=1,
                softmax_scale=head_dim**-0.5, causal=True, out=o,
            )  # fmt: skip
            return o

        return run

    def kv8(kv_indices, max_splits, splits, pv_int8=None):
        num_kv_splits, logits, lse = splits
        sage_decode_kv8(
            q, o, cache, kv_indptr, kv_indices, logits, lse, num_kv_splits, max_splits,
            sm_scale=head_dim**-0.5, pv_int8=pv_int8,
        )  # fmt: skip
        return o

    # The path the sage rows measured, in the JSON (a row must not claim whole pages
    # through TMA that the kernel did not take).
    whole_pages, tma = how_decode_reads(cache, q.device)
    kv8_path = f"page {page_size}: " + (
        ("whole pages through TMA" if tma else "whole pages, plain loads")
        if whole_pages
        else "token by token"
    )
    rows = []
    impls = [
        ("sglang_triton_decode", bf16, 16, bf16_bytes),
        ("sglang_triton_decode_splits64", bf16, 64, bf16_bytes),
        ("sage_kv8_decode", kv8, 16, kv8_bytes),
        ("sage_kv8_decode_splits64", kv8, 64, kv8_bytes),
        # Higher caps than the backend's default (SGLANG_SAGE_ATTN_DECODE_MAX_SPLITS=64):
        # more programs for one long request on 132 SMs (issue 22's batch-1 lever).
        ("sage_kv8_decode_splits128", kv8, 128, kv8_bytes),
        ("sage_kv8_decode_splits256", kv8, 256, kv8_bytes),
        # INT8 P·V (kv8_tiles.kv8_pv): no V conversion on the load path.
        ("sage_kv8_decode_pvint8", functools.partial(kv8, pv_int8=True), 16, kv8_bytes),
    ]
    fa4_decode = fa4_decode_over_the_same_slots() if wanted(args, "fa4_decode") else None
    if fa4_decode is not None:
        impls.insert(0, ("fa4_decode", fa4_decode, 16, bf16_bytes))
    for name, run, max_splits, nbytes in impls:
        if not wanted(args, name):
            continue
        splits = splits_for(max_splits)
        step = functools.partial(run, max_splits=max_splits, splits=splits)
        turn = itertools.cycle(index_sets)
        ms = median_ms(lambda step=step, turn=turn: step(next(turn)), args)
        cos, rel_l1 = attention_error(step(index_sets[0])[0], ref)
        rows.append(
            Row(
                "decode",
                name,
                batch,
                q_heads,
                kv_heads,
                head_dim,
                1,
                kv_len,
                False,
                ms,
                0.0,
                nbytes / (ms * 1e-3) / 1e9,
                cos,
                rel_l1,
                kv8_path if name.startswith("sage_kv8") else "",
            )  # fmt: skip
        )
    return rows


def bench_sweep(args, head_dim, causal, pv, tiles) -> list[Row]:
    from sglang.srt.layers.attention.sage_attention.extend_attention import (
        TileConfig,
        sage_attention_from_packed,
    )
    from sglang.srt.layers.attention.sage_attention.layout import KV_BLOCK

    seq_len = args.sweep_len
    batch = max(1, args.tokens // seq_len)
    inputs = paged_batch(batch, 0, seq_len, args.q_heads, args.kv_heads, head_dim, torch.bfloat16)
    rows, ref = reference_rows(inputs, 0, seq_len, causal)
    packed = pack(inputs, pv)
    pairs = visible_pairs(seq_len, seq_len, causal)
    out = []
    for tile in tiles:
        # block_m, warps, stages[, tma]; keys per tile are the packed layout's block.
        block_m, warps, stages, *tma = tile
        config = TileConfig(block_m, KV_BLOCK, warps, stages, use_tma=bool(tma[0]) if tma else True)

        def run(config=config):
            sage_attention_from_packed(
                inputs["q_extend"],
                inputs["o_extend"],
                packed,
                inputs["qo_indptr"],
                inputs["kv_indptr"],
                seq_len,
                sm_scale=head_dim**-0.5,
                causal=causal,
                config=config,
            )
            return inputs["o_extend"]

        try:
            cos, rel_l1 = attention_error(run()[rows], ref)
            ms = median_ms(run, args)
        except Exception as exc:
            print(f"  tile {tile}: failed ({type(exc).__name__}: {str(exc)[:100]})")
            continue
        tops = 4 * args.q_heads * head_dim * pairs * batch / (ms * 1e-3) / 1e12
        out.append(
            Row(
                "sweep",
                f"sage_{pv}_kernel_only",
                batch,
                args.q_heads,
                args.kv_heads,
                head_dim,
                seq_len,
                seq_len,
                causal,
                ms,
                tops,
                0.0,
                cos,
                rel_l1,
                note="tile=" + ",".join(map(str, tile)),
            )
        )
    return out


def attention_error(out, ref):
    from sglang.srt.layers.attention.sage_attention.reference import attention_error as err

    return err(out.float(), ref)


# ---------------------------------------------------------------- driver


def plan(args):
    """(description, thunk) for every measurement, in order."""
    jobs = []
    if "dense" in args.suites:
        for hd, length, causal in itertools.product(args.head_dims, args.seq_lens, args.causal):
            jobs.append(
                (
                    f"dense hd{hd} L={length} causal={causal}",
                    lambda hd=hd, n=length, c=causal: bench_prefill(args, "dense", hd, 0, n, c),
                )
            )
    if "extend" in args.suites:
        for hd, total, frac in itertools.product(
            args.head_dims, args.extend_lens, args.cached_fractions
        ):
            prefix = int(total * frac) // 64 * 64
            jobs.append(
                (
                    f"extend hd{hd} total={total} cached={frac:.0%}",
                    lambda hd=hd, p=prefix, n=total - prefix: bench_prefill(
                        args, "extend", hd, p, n, True
                    ),
                )
            )
    if "decode" in args.suites:
        for hd, batch, kv_len in itertools.product(
            args.head_dims, args.decode_batches, args.decode_lens
        ):
            if batch * kv_len <= args.decode_max_tokens:
                jobs.append(
                    (
                        f"decode hd{hd} bs={batch} kv={kv_len}",
                        lambda hd=hd, b=batch, n=kv_len: bench_decode(args, b, n, hd),
                    )
                )
    if "sweep" in args.suites:
        from sglang.srt.layers.attention.sage_attention.extend_attention import SUPPORTED_PV

        tiles = [tuple(int(x) for x in t.split(",")) for t in args.tiles]
        for hd, causal, pv in itertools.product(args.head_dims, (False, True), SUPPORTED_PV):
            jobs.append(
                (
                    f"sweep hd{hd} causal={causal} pv={pv}",
                    lambda hd=hd, c=causal, pv=pv: bench_sweep(args, hd, c, pv, tiles),
                )
            )
    return jobs


def print_table(rows: list[Row]) -> None:
    head = (
        "suite",
        "impl",
        "hd",
        "Lq",
        "Lk",
        "causal",
        "bs",
        "ms",
        "TOPS",
        "GB/s",
        "cos",
        "relL1",
        "note",
    )
    print("{:7} {:42} {:>4} {:>6} {:>6} {:>6} {:>4} {:>9} {:>7} {:>7} {:>9} {:>7} {}".format(*head))
    for r in rows:
        print(
            f"{r.suite:7} {r.impl:42} {r.head_dim:>4} {r.q_len:>6} {r.kv_len:>6} {r.causal!s:>6} "
            f"{r.batch:>4} {r.ms:9.3f} {r.tops:7.1f} {r.gbps:7.0f} {r.cos:9.6f} {r.rel_l1:7.4f} "
            f"{r.note}"
        )


def plot(json_path: str) -> None:
    """PNG plots next to the JSON (runs anywhere: matplotlib only, no GPU)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [Row(**r) for r in json.load(open(json_path))["rows"]]
    out_dir = os.path.dirname(os.path.abspath(json_path))
    stem = os.path.splitext(os.path.basename(json_path))[0]
    dense = [r for r in rows if r.suite == "dense"]
    for hd in sorted({r.head_dim for r in dense}):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
        for ax, causal in zip(axes, (False, True), strict=True):
            sel = [r for r in dense if r.head_dim == hd and r.causal == causal]
            for impl in sorted({r.impl for r in sel}):
                pts = sorted((r.q_len, r.tops) for r in sel if r.impl == impl)
                style = "-" if impl.startswith("sage_") else "--"
                ax.plot(*zip(*pts, strict=True), style, marker="o", label=impl)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("sequence length")
            ax.set_title(f"hd{hd} {'causal' if causal else 'non-causal'}")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("TOPS (visible pairs)")
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, f"{stem}_dense_hd{hd}.png"), dpi=110)
    extend = [r for r in rows if r.suite == "extend"]
    if extend:
        fig, ax = plt.subplots(figsize=(12, 4.5))
        keys = sorted({(r.kv_len, r.kv_len - r.q_len) for r in extend})
        impls = sorted({r.impl for r in extend})
        width = 0.8 / len(impls)
        for i, impl in enumerate(impls):
            vals = [
                next(
                    (
                        r.tops
                        for r in extend
                        if r.impl == impl and (r.kv_len, r.kv_len - r.q_len) == k
                    ),
                    0,
                )
                for k in keys
            ]
            ax.bar([j + i * width for j in range(len(keys))], vals, width, label=impl)
        ax.set_xticks([j + 0.4 for j in range(len(keys))])
        ax.set_xticklabels([f"L={t}\ncached {c / t:.0%}" for t, c in keys])
        ax.set_ylabel("TOPS (visible pairs)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, f"{stem}_extend.png"), dpi=110)
    decode = [r for r in rows if r.suite == "decode"]
    if decode:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for batch in sorted({r.batch for r in decode}):
            pts = sorted((r.kv_len, r.gbps) for r in decode if r.batch == batch)
            ax.plot(*zip(*pts, strict=True), marker="o", label=f"batch {batch}")
        copy_bw = json.load(open(json_path)).get("copy_gbps")
        if copy_bw:
            ax.axhline(copy_bw, color="k", ls=":", label="device copy")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("KV length")
        ax.set_ylabel("GB/s (KV read)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, f"{stem}_decode.png"), dpi=110)


def markdown_tables(json_path: str) -> str:
    """RESULTS.md-style tables of a run: TOPS per implementation, ratios to FA4 (SGLang's
    fastest Hopper backend; cuDNN where the run has no FA4 rows)."""
    rows = [Row(**r) for r in json.load(open(json_path))["rows"]]
    out = []
    for suite in ("dense", "extend", "sweep"):
        sel = [r for r in rows if r.suite == suite]
        if not sel:
            continue
        impls = list(dict.fromkeys(r.impl for r in sel))
        keyed = {}
        for r in sel:
            key = (r.head_dim, r.causal, r.kv_len, r.q_len, r.note if suite == "sweep" else "")
            keyed.setdefault(key, {})[r.impl] = r.tops
        # P·V modes of this run, from its whole-op rows ("sage_fp16", "sage_int8", ...).
        whole_op = [i for i in impls if i.startswith("sage_") and i.count("_") == 1]
        modes = [i.removeprefix("sage_") for i in whole_op]
        modes = modes or list(dict.fromkeys(r.impl.split("_")[1] for r in sel))
        cols = impls if suite != "sweep" else [f"sage_{pv}_kernel_only" for pv in modes]
        baseline = "fa4" if "fa4" in impls else "sdpa_cudnn"
        ratio = suite != "sweep" and baseline in impls
        head = ["hd", "causal", "Lk", "Lq", "tile"][: 5 if suite == "sweep" else 4] + cols
        head += [f"{pv}/{baseline}" for pv in modes] if ratio else []
        out += [
            f"#### {suite} (TOPS)",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
        ]
        for key in sorted(keyed):
            vals = keyed[key]
            cells = [str(key[0]), "yes" if key[1] else "no", str(key[2]), str(key[3])]
            cells += [key[4].removeprefix("tile=")] if suite == "sweep" else []
            cells += [f"{vals[c]:.0f}" if c in vals else "-" for c in cols]
            if ratio and baseline in vals:
                cells += [f"{vals.get(f'sage_{pv}', 0) / vals[baseline]:.2f}x" for pv in modes]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    decode = [r for r in rows if r.suite == "decode"]
    if decode:
        # One row per shape: each implementation's time, GB/s (bytes its cache holds
        # for the keys read) and share of the copy rate; speed-ups against the first
        # implementation (FA4 on the bf16 cache where the run has it).
        copy = json.load(open(json_path)).get("copy_gbps", 0)
        impls = list(dict.fromkeys(r.impl.split()[0] for r in decode))
        keyed = {}
        for r in decode:
            keyed.setdefault((r.head_dim, r.batch, r.kv_len), {})[r.impl.split()[0]] = r
        head = ["hd", "batch", "KV len", *impls, *(f"{i} speed-up" for i in impls[1:])]
        out += [
            f"#### decode: ms (GB/s, share of the {copy:.0f} GB/s copy rate)",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
        ]
        for (head_dim, batch, kv_len), vals in sorted(keyed.items()):
            cells = [str(head_dim), str(batch), str(kv_len)]
            cells += [
                f"{vals[i].ms:.3f} ({vals[i].gbps:.0f}, {vals[i].gbps / copy:.0%})"
                if i in vals
                else "-"
                for i in impls
            ]
            base = vals.get(impls[0])
            cells += [
                f"{base.ms / vals[i].ms:.2f}x" if base and i in vals else "-" for i in impls[1:]
            ]
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="hd128, 8K, dense only")
    parser.add_argument("--suites", nargs="+", default=["dense", "extend", "decode"])
    parser.add_argument(
        "--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768]
    )
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument(
        "--causal",
        type=lambda s: s == "causal",
        nargs="+",
        default=[False, True],
        metavar="{causal,full}",
        help="dense: the masks to run (default both)",
    )
    parser.add_argument("--extend-lens", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--cached-fractions", type=float, nargs="+", default=[0.0, 0.5, 0.9])
    parser.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--decode-lens", type=int, nargs="+", default=[1024, 8192, 32768, 131072])
    parser.add_argument("--decode-max-tokens", type=int, default=2**21)
    parser.add_argument(
        "--decode-slots",
        choices=["random", "contiguous"],
        default="random",
        help="decode: each page drawn at random, or each request's pages in order",
    )
    parser.add_argument(
        "--kv8-page-size",
        type=int,
        default=64,
        help="prefill: tokens per page of the 8-bit cache (sage_kv8 rows)",
    )
    parser.add_argument(
        "--decode-page-size",
        type=int,
        default=64,
        help="decode: tokens per page of both caches (1: every key in its own slot)",
    )
    parser.add_argument(
        "--tiles",
        nargs="+",
        default=["64,4,2", "64,4,3", "128,8,2", "64,4,2,0"],
        help="sweep: block_m,num_warps,num_stages[,tma 0/1] (keys per tile: the packed block)",
    )
    parser.add_argument("--sweep-len", type=int, default=8192)
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32768, help="batch = tokens // kv_len")
    parser.add_argument(
        "--impls",
        nargs="+",
        default=["*"],
        help="shell patterns of the implementations to run, e.g. 'sage_fp16*' sdpa_cudnn",
    )
    parser.add_argument("--warmup-ms", type=int, default=100)
    parser.add_argument("--rep-ms", type=int, default=400)
    parser.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    parser.add_argument(
        "--plot", metavar="JSON", help="only draw PNGs and tables of an earlier run"
    )
    args = parser.parse_args()
    if args.plot:
        plot(args.plot)
        print(markdown_tables(args.plot))
        return
    if args.quick:
        args.suites, args.seq_lens, args.head_dims = ["dense"], [8192], [128]
    os.makedirs(args.out, exist_ok=True)

    from tqdm import tqdm

    props = torch.cuda.get_device_properties(0)
    meta = dict(
        device=props.name,
        torch=torch.__version__,
        triton=triton.__version__,
        sms=props.multi_processor_count,
    )
    if "decode" in args.suites:
        meta["copy_gbps"] = copy_bandwidth_gbps()
    rows: list[Row] = []
    jobs = plan(args)
    json_path = os.path.join(args.out, "bench_sage_attention.json")
    for desc, job in tqdm(jobs, desc="bench", unit="shape"):
        tqdm.write(desc)
        rows += job()
        torch.cuda.empty_cache()
        # Written after every shape, so a run cut short keeps what it measured.
        with open(json_path, "w") as f:
            json.dump(dict(meta, rows=[asdict(r) for r in rows]), f, indent=1)
    with open(os.path.join(args.out, "bench_sage_attention.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[fl.name for fl in fields(Row)])
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    print(json.dumps(meta))
    print_table(rows)


if __name__ == "__main__":
    main()
