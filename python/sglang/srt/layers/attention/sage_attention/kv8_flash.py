"""Prefill on the 8-bit KV cache through FlashAttention, where that is faster than
sage_attn's 8-bit extend kernel.

The 8-bit cache pays in capacity (1.94x the tokens) and in decode, which reads half
the bytes. Its extend kernel (``extend_kv8.py``) does not pay on Hopper yet: 0.45-0.47x
FA4 at 8K and 32K chunks, dense and over a 90%-cached prefix (H100,
``benchmark/kernels/sage_attention/results/h100_kv8_pvint8.json``), so turning the
cache on made prefill slower than fa4's. Where a FlashAttention kernel loads, a chunk
therefore runs as:

1. ``unpack_kv8``: one Triton kernel reads each request's slots (prefix and the new
   chunk, already written) from the pages and writes their K and V rows, dequantized
   to the model dtype, into a dense workspace ``[tokens, Hkv, D]``. It moves
   ``D + Dv + 8`` bytes in and ``2 (D + Dv)`` out per token and KV head: about 1% of
   the attention time of an 8K chunk over a 32K sequence at hd128;
2. one FlashAttention varlen call (``flash_attn_varlen_func``, bottom-right causal,
   one split: deterministic, and a request's rows do not depend on its neighbours)
   with ``cu_seqlens_k`` over the workspace.

Numerics: FlashAttention sees exactly the values the cache holds, rounded to the
model dtype (K smoothed, and rotated when the cache is, so Q is rotated to match);
the 8-bit kernel also quantizes Q and P, so this path is the closer of the two to
the fp32 attention over the cache.

Memory: the workspace holds at most ``budget_tokens`` rows (the server's context
length or 32K, whichever is more; the start-up log states the bytes), one buffer for
all layers of a batch; requests are grouped so that each group's sequences fit, and a
request is never split.

Which kernel: ``base_backend.flash_version_here`` (FA3 from sgl-kernel on sm90, else
FA4's CuTe kernels on sm90/sm100), chosen once at start-up. Its pure-torch twins are
``kv8_cache.dequantize_kv8`` (the unpack) and ``kv8_reference.dense_attention_ref``
(the FlashAttention call).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sglang.srt.layers.attention.sage_attention.kv8_cache import KV8Cache, load_kv8_tile
from sglang.srt.layers.attention.sage_attention.rotation import hadamard_matrix

# Tokens per unpack program: enough rows per KV head for coalesced stores.
UNPACK_BLOCK = 64
# Chunks shorter than this stay on the 8-bit extend kernel: the route moves D + Dv + 8
# bytes in and 2 (D + Dv) out per sequence token and KV head, then FlashAttention reads
# 2 (D + Dv) again, ~5x the 8-bit kernel's D + Dv + 8. Counting those bytes at 3 TB/s
# against each kernel's measured rate (H100, hd128: 8-bit 245 TOPS, FA4 over unpacked
# rows 580), the two cost the same at ~90-token chunks over a long prefix; decode rows
# of mixed batches (one token over the whole context) are the extreme. Measured on the
# H100 (RESULTS.md round 12): 64-token chunks over 4K run 2.3x faster on the 8-bit
# kernel, 256-token chunks over 2K 1.8x faster on the route; 128 lies between, itself
# not measured.
MIN_FLASH_CHUNK = 128
# The workspace holds at least this many tokens (so short-context servers still batch
# many requests into one call).
MIN_BUDGET_TOKENS = 32768

# q, k, v, o [rows, heads, dim], cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
# max_seqlen_k, sm_scale -> writes o: a dense varlen attention, bottom-right causal.
DenseAttention = Callable[..., None]


@triton.jit
def _unpack_kv8_kernel(
    k_int8,
    k_scale,
    v_int8,
    v_scale,
    slots,
    k_out,
    v_out,
    num_slots,
    num_kv_heads,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    kv_head = tl.program_id(1)
    pos = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = pos < num_slots
    key, key_scale, value, value_scale = load_kv8_tile(
        k_int8, k_scale, v_int8, v_scale, slots, pos, valid, kv_head, num_kv_heads,
        HEAD_DIM, HEAD_DIM_V, PAGE_SIZE,
    )  # fmt: skip
    row = pos * num_kv_heads + kv_head
    key = key.to(tl.float32) * key_scale[:, None]
    value = value.to(tl.float32) * value_scale[:, None]
    tl.store(
        k_out + row[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :],
        key.to(k_out.dtype.element_ty),
        mask=valid[:, None],
    )
    tl.store(
        v_out + row[:, None] * HEAD_DIM_V + tl.arange(0, HEAD_DIM_V)[None, :],
        value.to(v_out.dtype.element_ty),
        mask=valid[:, None],
    )


def unpack_kv8(
    cache: KV8Cache, slots: torch.Tensor, k_out: torch.Tensor, v_out: torch.Tensor
) -> None:
    """Write the dequantized K [N, Hkv, D] and V [N, Hkv, Dv] of ``slots [N]`` into the
    first N rows of ``k_out``/``v_out`` (contiguous, the model dtype); K stays in the
    cache's own space (smoothed, rotated when stored so). Twin: ``dequantize_kv8``."""
    num_slots = slots.shape[0]
    heads, dim, dim_v = cache.num_kv_heads, cache.head_dim, cache.head_dim_v
    if k_out.shape[1:] != (heads, dim) or v_out.shape[1:] != (heads, dim_v):
        raise ValueError("sage_attn: unpack_kv8 outputs do not match the cache's heads/dims")
    if min(k_out.shape[0], v_out.shape[0]) < num_slots:
        raise ValueError(f"sage_attn: unpack_kv8 outputs hold fewer than {num_slots} rows")
    if not (k_out.is_contiguous() and v_out.is_contiguous()):
        raise ValueError("sage_attn: unpack_kv8 writes contiguous outputs")
    if num_slots == 0:
        return
    grid = (triton.cdiv(num_slots, UNPACK_BLOCK), heads)
    _unpack_kv8_kernel[grid](
        cache.k_int8, cache.k_scale, cache.v_int8, cache.v_scale, slots, k_out, v_out,
        num_slots, heads,
        HEAD_DIM=dim, HEAD_DIM_V=dim_v, PAGE_SIZE=cache.page_size, BLOCK=UNPACK_BLOCK,
    )  # fmt: skip


def rotated_queries(q: torch.Tensor, cache: KV8Cache) -> torch.Tensor:
    """Q in the space of the cache's keys: ``q H / D`` when K is stored rotated by the
    unnormalised Hadamard matrix ``H`` (``H Hᵀ = D I``, so scores are unchanged)."""
    if not cache.rotated:
        return q
    hadamard = hadamard_matrix(cache.head_dim, device=q.device)
    return ((q.float() @ hadamard) / cache.head_dim).to(q.dtype)


@dataclass
class Workspace:
    """The dense K/V rows one group of requests is unpacked into."""

    k: torch.Tensor  # [rows, Hkv, D], the model dtype
    v: torch.Tensor  # [rows, Hkv, Dv]

    def fits(self, rows: int, like: torch.Tensor, cache: KV8Cache) -> bool:
        return (
            self.k.shape[0] >= rows
            and self.k.dtype == like.dtype
            and self.k.device == like.device
            and self.k.shape[1:] == (cache.num_kv_heads, cache.head_dim)
            and self.v.shape[1:] == (cache.num_kv_heads, cache.head_dim_v)
        )


def workspace_for(
    workspace: Workspace | None, rows: int, like: torch.Tensor, cache: KV8Cache
) -> Workspace:
    """``workspace`` when it holds ``rows`` rows (one allocation serves every layer of
    a batch), else a new one."""
    if workspace is not None and workspace.fits(rows, like, cache):
        return workspace
    shape = (rows, cache.num_kv_heads)
    return Workspace(
        k=torch.empty((*shape, cache.head_dim), dtype=like.dtype, device=like.device),
        v=torch.empty((*shape, cache.head_dim_v), dtype=like.dtype, device=like.device),
    )


def workspace_bytes(rows: int, num_kv_heads: int, head_dim: int, head_dim_v: int, dtype) -> int:
    return rows * num_kv_heads * (head_dim + head_dim_v) * dtype.itemsize


def budget_tokens(context_len: int) -> int:
    """Rows the workspace may hold: a whole request of the server's longest context."""
    return max(int(context_len), MIN_BUDGET_TOKENS)


def flash_prefill_kv8(
    q_extend: torch.Tensor,
    o_extend: torch.Tensor,
    cache: KV8Cache,
    *,
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    max_len_extend: int,
    max_len_kv: int,
    sm_scale: float,
    attention: DenseAttention,
    workspace: Workspace | None = None,
) -> Workspace:
    """``sage_extend_attention_kv8``'s semantics (request b's keys: the slots
    ``kv_indices[kv_indptr[b]:kv_indptr[b+1]]``, chunk already written, bottom-right
    causal) through ``attention`` over the unpacked rows. Returns the workspace used,
    for the caller to hand to the next layer."""
    cache.check_queries(q_extend, o_extend)
    num_rows = kv_indices.shape[0]
    workspace = workspace_for(workspace, num_rows, q_extend, cache)
    unpack_kv8(cache, kv_indices, workspace.k, workspace.v)
    attention(
        rotated_queries(q_extend, cache),
        workspace.k[:num_rows],
        workspace.v[:num_rows],
        o_extend,
        cu_seqlens_q=qo_indptr,
        cu_seqlens_k=kv_indptr,
        max_seqlen_q=max_len_extend,
        max_seqlen_k=max_len_kv,
        sm_scale=sm_scale,
    )
    return workspace


def _sglang_flash(
    q, k, v, o, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, sm_scale, ver
) -> None:
    from sglang.kernels.ops.attention.flash_attention import flash_attn_varlen_func

    # FlashAttention takes int32 offsets; SGLang's extend metadata may be int64.
    cu_seqlens_q, cu_seqlens_k = (t.to(torch.int32) for t in (cu_seqlens_q, cu_seqlens_k))
    result = flash_attn_varlen_func(
        q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, softmax_scale=sm_scale,
        causal=True, num_splits=1, ver=ver, out=o,
    )  # fmt: skip
    if result is not None and result.data_ptr() != o.data_ptr():
        o.copy_(result)


def flash_attention(ver: int) -> DenseAttention:
    """SGLang's FlashAttention ``ver`` (3 or 4) as a ``DenseAttention``."""
    return functools.partial(_sglang_flash, ver=ver)
