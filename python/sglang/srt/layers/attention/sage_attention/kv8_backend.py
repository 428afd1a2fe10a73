"""SageKV8AttentionBackend: sage_attn on its own 8-bit KV cache.

With ``SGLANG_SAGE_ATTN_KV_CACHE=int8`` the server builds the 8-bit pool
(``kv8_pool.py``) and the plugin's factory this class. No other kernel reads that
cache, so nothing is delegated: every extend runs ``sage_extend_attention_kv8`` over
each request's whole sequence in the cache and every decode step (eager or in a CUDA
graph) ``sage_decode_kv8`` with the Triton base's split metadata and scratch. What
those kernels do not compute is refused at start-up: before the pool is built
(``kv8_hooks.kv8_refusals``) and here, per layer
(``refuse_layers_the_kv8_cache_cannot_serve``). Planning, the base's hooks and the
path log are the bf16-cache backend's (``SageAttentionBackend``).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from sglang.srt.layers.attention.sage_attention import extend_kv8
from sglang.srt.layers.attention.sage_attention.decode_kv8 import (
    how_decode_reads,
    sage_decode_kv8,
)
from sglang.srt.layers.attention.sage_attention.extend_kv8 import sage_extend_attention_kv8
from sglang.srt.layers.attention.sage_attention.kv8_pool import SageKV8TokenToKVPool
from sglang.srt.layers.attention.sage_attention.kv8_tiles import MAX_GROUP
from sglang.srt.layers.attention.sage_attention.settings import KV_CACHE_ENV
from sglang.srt.layers.attention.sage_attention_backend import (
    SageAttentionBackend,
    is_power_of_two,
    layer_delegate_reason,
    unsupported_layer_reason,
)
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

logger = logging.getLogger(__name__)


@dataclass
class KV8Indices:
    """An extend batch's slots as the 8-bit cache kernels read them: each request's
    whole sequence, its new chunk written to the cache first."""

    qo_indptr: torch.Tensor
    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    max_extend_len: int


def refuse_layers_the_kv8_cache_cannot_serve(model) -> None:
    """Raise at start-up if any attention layer of ``model`` needs what only SGLang's
    Triton backend computes: with the 8-bit cache nothing else can read the KV."""
    from sglang.srt.layers.radix_attention import RadixAttention

    layers = [module for module in model.modules() if isinstance(module, RadixAttention)]
    reasons = {reason for layer in layers if (reason := unsupported_layer_reason(layer))}
    reasons |= {
        f"{group} query heads per KV head on a rank (the 8-bit kernels take up to {MAX_GROUP})"
        for layer in layers
        if (group := layer.tp_q_head_num // layer.tp_k_head_num) > MAX_GROUP
    }
    if reasons:
        raise ValueError(
            f"{KV_CACHE_ENV}=int8: this model has attention layers the 8-bit cache's "
            f"kernels do not compute ({'; '.join(sorted(reasons))}); serve it without "
            f"{KV_CACHE_ENV}"
        )


class SageKV8AttentionBackend(SageAttentionBackend):
    uses_8bit_cache = True

    def __init__(self, model_runner, settings=None):
        # Answers every attention call while kv8_calibration.py runs its start-up
        # forward (``recording``).
        self.calibration = None
        self.kv8_decode_batches = 0
        super().__init__(model_runner, settings)
        # Kept out of torch.compile's trace, as SGLang's backends keep their kernels.
        self.extend_attention_kv8 = torch.compiler.disable(sage_extend_attention_kv8)
        self.decode_attention_kv8 = torch.compiler.disable(sage_decode_kv8)

    # ---- start-up -------------------------------------------------------------

    def _check_pool(self, model_runner) -> None:
        pool = self.token_to_kv_pool
        if not isinstance(pool, SageKV8TokenToKVPool):
            raise ValueError(
                f"{type(self).__name__} reads sage_attn's 8-bit KV pool; this server built "
                f"a {type(pool).__name__}"
            )
        self.kv8_pool = pool
        if getattr(model_runner, "model", None) is not None:
            refuse_layers_the_kv8_cache_cannot_serve(model_runner.model)

    def _crossover(self, device, head_dim: int) -> tuple[int | None, str]:
        return 0, "the 8-bit KV cache: every chunk"

    def _warn_missing_kernels(self, model_runner) -> None:
        pass  # the 8-bit cache's kernels are Triton alone

    def _kv_cache_description(self) -> str:
        return "8-bit (int8, sage_attn's kernels for prefill and decode)"

    @contextmanager
    def recording(self, recorder):
        """Let ``recorder`` answer every attention call (the calibration forward)."""
        self.calibration = recorder
        try:
            yield recorder
        finally:
            self.calibration = None

    # ---- metadata -------------------------------------------------------------

    def _plan_extend(self, forward_batch, plan):
        """Whole-sequence slots of an extend batch (the Triton base's list only the
        cached prefixes), built by SGLang's own index packer."""
        triton_metadata = self.base.forward_metadata
        batch_size = forward_batch.batch_size
        total = forward_batch.seq_lens_sum
        if total is None:
            total = int(forward_batch.seq_lens[:batch_size].sum())
        kv_indptr = torch.zeros(
            batch_size + 1, dtype=torch.int32, device=forward_batch.seq_lens.device
        )
        kv_indices = torch.empty(total, dtype=torch.int64, device=kv_indptr.device)
        self.base._fill_kv_indptr_and_indices(
            forward_batch.kv_loc_plan,
            batch_size,
            forward_batch.seq_lens[:batch_size],
            forward_batch.req_pool_indices,
            kv_indices,
            kv_indptr=kv_indptr,
        )
        plan.kv8_indices = KV8Indices(
            qo_indptr=triton_metadata.qo_indptr,
            kv_indptr=kv_indptr,
            kv_indices=kv_indices,
            max_extend_len=triton_metadata.max_extend_len,
        )
        return plan

    # ---- forward ----------------------------------------------------------------

    def _describe_sage_path(self, plan, layer, q) -> dict:
        requests = plan.kv8_indices.qo_indptr.shape[0] - 1
        return dict(
            kernel="8-bit KV cache",
            pv="int8" if extend_kv8.PV_INT8 else "fp16",
            requests=requests,
            total=requests,
            longest=plan.kv8_indices.max_extend_len,
        )

    def _write_kv8(self, q, k, v, layer, forward_batch, save_kv_cache, reason):
        """Write the new K/V into the 8-bit cache. Returns the layer's output rows and
        the kv8 kernels' first three arguments: q [N, Hq, D], o [N, Hq, Dv], the cache."""
        if reason is not None or not save_kv_cache:
            # Refused at start-up where it can be (kv8_hooks.py, the layer check);
            # anything left has no kernel that reads this cache. The kernels read the
            # new tokens from the cache, so the backend must be the one to write them.
            raise ValueError(
                f"sage_attn's 8-bit KV cache cannot serve {reason or 'save_kv_cache=False'}"
            )
        self.kv8_pool.set_kv_buffer(layer, KVWriteLoc.for_batch(forward_batch), k, v)
        o = self._output_rows(q, layer, forward_batch)
        num_q_heads = layer.tp_q_head_num
        return o, (
            q.view(-1, num_q_heads, layer.qk_head_dim),
            o.view(-1, num_q_heads, layer.v_head_dim),
            self.kv8_pool.kv8_cache(layer.layer_id),
        )

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        """Write the chunk, then attend over each request's whole sequence in the cache."""
        if self.calibration is not None:
            return self.calibration.attend(q, k, v, layer)
        plan = self.forward_metadata
        reason = plan.delegate_reason or layer_delegate_reason(q, k, layer, kwargs)
        o, qoc = self._write_kv8(q, k, v, layer, forward_batch, save_kv_cache, reason)
        self._count_sage_batch(plan, layer, q)
        indices = plan.kv8_indices
        self.extend_attention_kv8(
            *qoc,
            qo_indptr=indices.qo_indptr,
            kv_indptr=indices.kv_indptr,
            kv_indices=indices.kv_indices,
            max_len_extend=indices.max_extend_len,
            sm_scale=layer.scaling,
        )
        return o

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        """A decode step: the Triton base's decode metadata (splits, scratch, CUDA-graph
        buffers), sage_attn's kernel."""
        reason = layer_delegate_reason(q, k, layer, kwargs)
        o, qoc = self._write_kv8(q, k, v, layer, forward_batch, save_kv_cache, reason)
        metadata = self.base.forward_metadata
        self.decode_attention_kv8(
            *qoc,
            kv_indptr=metadata.kv_indptr,
            kv_indices=metadata.kv_indices,
            attn_logits=metadata.attn_logits,
            attn_lse=metadata.attn_lse,
            num_kv_splits=metadata.num_kv_splits,
            max_kv_splits=self.base.max_kv_splits,
            sm_scale=layer.scaling,
        )
        if layer.layer_id == self.kv8_pool.start_layer:
            self._count_decode_batch(qoc[2], q)
        return o

    def _count_decode_batch(self, cache, q) -> None:
        """Count decode steps (logged at 1, 2, 4, ...; Python runs once per eager step and
        once per graph capture), so a server log proves the decode path."""
        self.kv8_decode_batches += 1
        if not is_power_of_two(self.kv8_decode_batches):
            return
        whole_pages, tma = how_decode_reads(cache, q.device)
        logger.info(
            "sage_attn: %d decode batches on the 8-bit cache kernel so far (%s)%s",
            self.kv8_decode_batches,
            f"whole pages of {cache.page_size}{' through TMA' if tma else ''}"
            if whole_pages
            else "token by token",
            " (CUDA-graph capture included)"
            if q.is_cuda and torch.cuda.is_current_stream_capturing()
            else "",
        )
