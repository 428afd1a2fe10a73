"""The base backend's side of an extend batch: its index metadata, and its kernel on the
requests below the crossover.

A request's route depends on its own chunk alone, so one extend batch can hold requests
for both kernels. The 8-bit side reads each request's cached prefix through the batch's
extend indices in SGLang's calling convention (``qo_indptr``, ``kv_indptr``,
``kv_indices``): the Triton base has built them already; for any other base they are
packed once per batch by SGLang's own ``KVIndexTranslator.pack_read_stream``, as the
Triton backend packs them. The short requests run on the base's own extend kernel,
through a small adapter per base family, since a backend's ``forward_extend`` serves a
whole batch:

- ``fa3``/``fa4`` (``FlashAttentionBackend``): its ``flash_attn_with_kvcache`` on the
  requests' rows of its own page table;
- ``triton``, and every other base: SGLang's Triton extend kernel on the requests' slots
  (for bases without an adapter this is slower than the base; the start-up log says so).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglang.srt.layers.attention.sage_attention.request_split import RequestSubset


@dataclass
class ExtendIndices:
    """Every request's chunk rows and cached-prefix slots in SGLang's extend convention."""

    qo_indptr: torch.Tensor  # [B + 1] int32
    kv_indptr: torch.Tensor  # [B + 1] int32, over kv_indices
    kv_indices: torch.Tensor  # [sum prefix] int64: prefix slots, request after request


def _is_triton(base) -> bool:
    from sglang.srt.layers.attention.triton_backend import TritonAttnBackend

    return isinstance(base, TritonAttnBackend)


def _is_flash_attention(base) -> bool:
    # Imported by name only when the base is one: the module needs sgl-kernel.
    return type(base).__name__ == "FlashAttentionBackend"


def host_lens(forward_batch) -> tuple[list[int], list[int]]:
    """(new-chunk lengths, cached-prefix lengths) of an extend batch's requests."""
    extend_lens = forward_batch.extend_seq_lens_cpu
    prefix_lens = forward_batch.extend_prefix_lens_cpu
    if extend_lens is None or prefix_lens is None:
        # SGLang's GPU-only extend path: read the lengths back, as Triton's backend does.
        extend_lens = forward_batch.extend_seq_lens.tolist()
        prefix_lens = forward_batch.extend_prefix_lens.tolist()
    return list(extend_lens), list(prefix_lens)


def extend_indices(base, forward_batch, kv_index_translator, prefix_lens: list[int]):
    """The batch's extend indices (``prefix_lens`` from ``host_lens``): the Triton base's
    own, else packed here once."""
    if _is_triton(base):
        metadata = base.forward_metadata
        return ExtendIndices(metadata.qo_indptr, metadata.kv_indptr, metadata.kv_indices)
    batch_size = len(prefix_lens)
    device = forward_batch.extend_seq_lens.device
    qo_indptr = torch.zeros(batch_size + 1, dtype=torch.int32, device=device)
    qo_indptr[1:] = torch.cumsum(forward_batch.extend_seq_lens[:batch_size], dim=0)
    kv_indptr = torch.zeros(batch_size + 1, dtype=torch.int32, device=device)
    prefix_lens_dev = forward_batch.extend_prefix_lens[:batch_size]
    kv_indptr[1:] = torch.cumsum(prefix_lens_dev, dim=0)
    kv_indices = torch.empty(sum(prefix_lens), dtype=torch.int64, device=device)
    kv_index_translator.pack_read_stream(
        forward_batch.kv_loc_plan,
        req_pool_indices=forward_batch.req_pool_indices,
        seq_lens=prefix_lens_dev,
        indptr=kv_indptr,
        out=kv_indices,
    )
    return ExtendIndices(qo_indptr, kv_indptr, kv_indices)


class TritonKernelOnSubset:
    """SGLang's Triton extend kernel on some requests of a batch (bf16 cache)."""

    name = "SGLang's Triton extend kernel"

    def __init__(self, page_size: int):
        from sglang.kernels.ops.attention.extend_attention import extend_attention_fwd

        self.page_size = page_size
        # Kept out of torch.compile's trace, as the Triton backend keeps it.
        self.extend_attention_fwd = torch.compiler.disable(extend_attention_fwd)

    def plan(self, subset: RequestSubset) -> RequestSubset:
        return subset

    def run(self, plan: RequestSubset, layer, q, k, v, o, k_buffer, v_buffer) -> None:
        """q/o [rows, Hq, D]; k/v [rows, Hkv, D]: the requests' rows of the layer call."""
        self.extend_attention_fwd(
            q,
            k.contiguous(),
            v.contiguous(),
            o,
            k_buffer,
            v_buffer,
            plan.qo_indptr,
            plan.kv_indptr,
            plan.kv_indices,
            None,  # custom_mask
            True,  # causal
            None,  # mask_indptr
            plan.max_extend_len,
            1.0,  # k_scale
            1.0,  # v_scale
            layer.scaling,
            page_size=self.page_size,
            extend_seq_lens_cpu=plan.extend_lens,
        )


@dataclass
class FlashSubsetPlan:
    page_table: torch.Tensor  # the requests' rows of the base's page table
    cache_seqlens: torch.Tensor  # [n] int32: prefix + chunk
    cu_seqlens_q: torch.Tensor  # [n + 1] int32
    max_seqlen_q: int


class FlashAttentionOnSubset:
    """``FlashAttentionBackend`` (fa3/fa4)'s kernel on some requests, over its own
    metadata of the batch (the rows of its page table and sequence lengths)."""

    name = "the base's FlashAttention kernel"

    def __init__(self, base):
        self.base = base

    def plan(self, subset: RequestSubset) -> FlashSubsetPlan:
        metadata = self.base.forward_metadata
        return FlashSubsetPlan(
            page_table=metadata.page_table[subset.requests],
            cache_seqlens=metadata.cache_seqlens_int32[subset.requests],
            cu_seqlens_q=subset.qo_indptr,
            max_seqlen_q=subset.max_extend_len,
        )

    def run(self, plan: FlashSubsetPlan, layer, q, k, v, o, k_buffer, v_buffer) -> None:
        # The base's module attribute, looked up per call: the function its own
        # forward_extend calls (fa3 and fa4 dispatch on ``ver``).
        from sglang.srt.layers.attention import flashattention_backend

        key_cache, value_cache = self.base.get_paged_mha_kv_cache(layer)
        flashattention_backend.flash_attn_with_kvcache(
            q=q,
            k_cache=key_cache,
            v_cache=value_cache,
            page_table=plan.page_table,
            cache_seqlens=plan.cache_seqlens,
            cu_seqlens_q=plan.cu_seqlens_q,
            max_seqlen_q=plan.max_seqlen_q,
            softmax_scale=layer.scaling,
            causal=True,
            num_splits=self.base.num_splits,
            ver=self.base.fa_impl_ver,
            out=o,
        )


def subset_kernel_for(base, page_size: int):
    """The adapter that runs ``base``'s extend kernel on a subset of a batch's requests."""
    if _is_flash_attention(base):
        return FlashAttentionOnSubset(base)
    return TritonKernelOnSubset(page_size)
