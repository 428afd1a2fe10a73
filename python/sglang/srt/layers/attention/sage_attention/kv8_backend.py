"""SageKV8AttentionBackend: sage_attn on its own 8-bit KV cache.

With ``SGLANG_SAGE_ATTN_KV_CACHE=int8`` the server builds the 8-bit pool
(``kv8_pool.py``) and the plugin's factory this class. No SGLang kernel reads that
cache, so nothing is delegated:

- decode (eager or in a CUDA graph): ``sage_decode_kv8`` with the Triton base's split
  metadata and scratch;
- extend, per request by its own chunk length (``crossover.measured_kv8_crossover``):
  ``sage_extend_attention_kv8`` over the request's whole sequence in the cache from
  the crossover up, and below it FlashAttention over the request's rows unpacked to the
  model dtype (``kv8_flash.py``) where a FlashAttention kernel loads, but for chunks
  under ``kv8_flash.MIN_FLASH_CHUNK`` tokens (decode rows of mixed batches). On the H100 the
  8-bit extend kernel never beat FA4, so there every chunk from that floor up takes
  FlashAttention; without FlashAttention (CPU, Ampere/Ada) every chunk takes the 8-bit
  kernel.

What those kernels do not compute is refused at start-up: before the pool is built
(``kv8_hooks.kv8_refusals``) and here, per layer
(``refuse_layers_the_kv8_cache_cannot_serve``). Planning, the base's hooks and the
path log are the bf16-cache backend's (``SageAttentionBackend``).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch

from sglang.srt.layers.attention.sage_attention import extend_kv8, kv8_flash
from sglang.srt.layers.attention.sage_attention.base_backend import flash_version_here
from sglang.srt.layers.attention.sage_attention.base_extend import host_lens
from sglang.srt.layers.attention.sage_attention.crossover import arch_of, measured_kv8_crossover
from sglang.srt.layers.attention.sage_attention.decode_kv8 import (
    how_decode_reads,
    sage_decode_kv8,
)
from sglang.srt.layers.attention.sage_attention.extend_kv8 import sage_extend_attention_kv8
from sglang.srt.layers.attention.sage_attention.kv8_pool import SageKV8TokenToKVPool
from sglang.srt.layers.attention.sage_attention.kv8_tiles import MAX_GROUP
from sglang.srt.layers.attention.sage_attention.request_split import (
    budget_groups,
    pick_requests,
    run_on_subset,
    subset_of,
)
from sglang.srt.layers.attention.sage_attention.settings import KV_CACHE_ENV, MIN_EXTEND_LEN_ENV
from sglang.srt.layers.attention.sage_attention_backend import (
    SageAttentionBackend,
    is_power_of_two,
    layer_delegate_reason,
    unsupported_layer_reason,
)
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

logger = logging.getLogger(__name__)


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
        self.flash_extend_batches = 0
        self._announced_flash_path = False
        # FlashAttention for the chunks the 8-bit extend kernel does not win (None: no
        # FlashAttention loads here); read by ``_crossover`` during the base class's set-up.
        self.flash_ver, self.flash_reason = flash_version_here(model_runner.device)
        self.flash_name = f"FlashAttention-{self.flash_ver}" if self.flash_ver else None
        self.dense_attention = kv8_flash.flash_attention(self.flash_ver) if self.flash_ver else None
        self.flash_budget = kv8_flash.budget_tokens(model_runner.model_config.context_len)
        super().__init__(model_runner, settings)
        # Kept out of torch.compile's trace, as SGLang's backends keep their kernels.
        self.extend_attention_kv8 = torch.compiler.disable(sage_extend_attention_kv8)
        self.decode_attention_kv8 = torch.compiler.disable(sage_decode_kv8)
        self.flash_prefill_kv8 = torch.compiler.disable(kv8_flash.flash_prefill_kv8)
        if self.dense_attention is not None:
            config = model_runner.model_config
            workspace = kv8_flash.workspace_bytes(
                self.flash_budget,
                self.num_kv_heads,
                config.head_dim,
                config.v_head_dim,
                model_runner.dtype,
            )
            logger.info(
                "sage_attn: prefill on the 8-bit cache below the crossover: %s (%s) for "
                "chunks of at least %d tokens (shorter ones on the 8-bit kernel), over the "
                "requests' rows unpacked to %s, in a workspace of up to %d tokens (%.0f MB, "
                "outside SGLang's KV budget, one per batch)",
                self.flash_name,
                self.flash_reason,
                kv8_flash.MIN_FLASH_CHUNK,
                model_runner.dtype,
                self.flash_budget,
                workspace / 2**20,
            )

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
        setting = self.settings.min_extend_len
        if self.dense_attention is None:
            if setting == "off":
                raise ValueError(
                    f"{MIN_EXTEND_LEN_ENV}=off with {KV_CACHE_ENV}=int8: no FlashAttention "
                    f"loads here ({self.flash_reason}), and only the 8-bit kernel reads the "
                    "8-bit cache"
                )
            return 0, f"the 8-bit KV cache: every chunk (no FlashAttention: {self.flash_reason})"
        if setting == "auto":
            return measured_kv8_crossover(arch_of(device), head_dim, self.flash_name)
        if setting == "off":
            return None, f"{MIN_EXTEND_LEN_ENV}=off: {self.flash_name} over the unpacked cache"
        below = f"{self.flash_name} over the unpacked cache below it"
        return setting, f"{MIN_EXTEND_LEN_ENV}={setting}; {below}"

    def _warn_missing_kernels(self, model_runner) -> None:
        pass  # the 8-bit cache's kernels are Triton alone

    def _kv_cache_description(self) -> str:
        return "8-bit (int8; decode on sage_attn's 8-bit kernel)"

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
        """Each request's whole sequence (the Triton base lists only the cached
        prefixes), built by SGLang's own index packer, then split by chunk length:
        ``plan.sage`` for the 8-bit kernel, ``plan.kv8_flash`` for FlashAttention."""
        batch_size = forward_batch.batch_size
        extend_lens, prefix_lens = host_lens(forward_batch)
        kv_lens = [n + p for n, p in zip(extend_lens, prefix_lens, strict=True)]
        kv_indptr = torch.zeros(
            batch_size + 1, dtype=torch.int32, device=forward_batch.seq_lens.device
        )
        kv_indices = torch.empty(sum(kv_lens), dtype=torch.int64, device=kv_indptr.device)
        self.base._fill_kv_indptr_and_indices(
            forward_batch.kv_loc_plan,
            batch_size,
            forward_batch.seq_lens[:batch_size],
            forward_batch.req_pool_indices,
            kv_indices,
            kv_indptr=kv_indptr,
        )
        index = (self.base.forward_metadata.qo_indptr, kv_indptr, kv_indices, extend_lens, kv_lens)
        int8_requests, flash_requests = self._routes(extend_lens, kv_lens)
        plan.sage = subset_of(int8_requests, *index)
        plan.kv8_flash = [
            subset_of(group, *index)
            for group in budget_groups(flash_requests, kv_lens, self.flash_budget)
        ]
        return plan

    def _routes(self, extend_lens: list[int], kv_lens: list[int]) -> tuple[list[int], list[int]]:
        """(requests on the 8-bit kernel, requests on FlashAttention), each by its own
        chunk and sequence: FlashAttention below the crossover, except chunks shorter
        than ``kv8_flash.MIN_FLASH_CHUNK`` (decode rows of mixed batches, short turns over
        a long prefix: unpacking the whole sequence would cost more) and sequences longer
        than the workspace (none within the context length it is sized for)."""
        int8_requests, flash_requests = pick_requests(extend_lens, self.min_extend_len)
        kept = {
            b
            for b in flash_requests
            if extend_lens[b] < kv8_flash.MIN_FLASH_CHUNK or kv_lens[b] > self.flash_budget
        }
        if not kept:
            return int8_requests, flash_requests
        return sorted([*int8_requests, *kept]), [b for b in flash_requests if b not in kept]

    # ---- forward ----------------------------------------------------------------

    def _describe_sage_path(self, plan, layer, q) -> dict:
        return dict(
            kernel="8-bit KV cache",
            pv="int8" if extend_kv8.PV_INT8 else "fp16",
            requests=plan.sage.batch_size,
            total=plan.sage.batch_size + sum(g.batch_size for g in plan.kv8_flash),
            longest=plan.sage.max_extend_len,
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
        """Write the chunk, then attend over each request's whole sequence in the cache:
        the 8-bit kernel or FlashAttention over the unpacked rows, by the request's chunk."""
        if self.calibration is not None:
            return self.calibration.attend(q, k, v, layer)
        plan = self.forward_metadata
        reason = plan.delegate_reason or layer_delegate_reason(q, k, layer, kwargs)
        o, (q_rows, o_rows, cache) = self._write_kv8(
            q, k, v, layer, forward_batch, save_kv_cache, reason
        )
        if plan.sage is not None:
            self._count_sage_batch(plan, layer, q)
            run_on_subset(
                plan.sage,
                (q_rows,),
                o_rows,
                lambda q_sub, o_sub: self.extend_attention_kv8(
                    q_sub,
                    o_sub,
                    cache,
                    qo_indptr=plan.sage.qo_indptr,
                    kv_indptr=plan.sage.kv_indptr,
                    kv_indices=plan.sage.kv_indices,
                    max_len_extend=plan.sage.max_extend_len,
                    sm_scale=layer.scaling,
                    kernel=self.settings.kernel,
                ),
            )
        for group in plan.kv8_flash:
            self._count_flash_batch(plan, group)
            run_on_subset(
                group,
                (q_rows,),
                o_rows,
                lambda q_sub, o_sub, group=group: self._flash(plan, group, layer, q_sub, o_sub),
            )
        return o

    def _flash(self, plan, group, layer, q, o) -> None:
        plan.kv8_workspace = self.flash_prefill_kv8(
            q,
            o,
            self.kv8_pool.kv8_cache(layer.layer_id),
            qo_indptr=group.qo_indptr,
            kv_indptr=group.kv_indptr,
            kv_indices=group.kv_indices,
            max_len_extend=group.max_extend_len,
            max_len_kv=max(group.kv_lens),
            sm_scale=layer.scaling,
            attention=self.dense_attention,
            workspace=plan.kv8_workspace,
        )

    def _count_flash_batch(self, plan, group) -> None:
        """Log the first FlashAttention extend and count batches (at 1, 2, 4, ...), so a
        server log proves the prefill path."""
        if not self._announced_flash_path:
            self._announced_flash_path = True
            logger.info(
                "sage_attn: extend on the 8-bit cache runs %s over the unpacked rows "
                "(first: %d of %d requests, longest chunk %d tokens, longest sequence %d)",
                self.flash_name,
                group.batch_size,
                (plan.sage.batch_size if plan.sage else 0)
                + sum(g.batch_size for g in plan.kv8_flash),
                group.max_extend_len,
                max(group.kv_lens),
            )
        if not plan.kv8_flash_counted:
            plan.kv8_flash_counted = True
            self.flash_extend_batches += 1
            if is_power_of_two(self.flash_extend_batches):
                logger.info(
                    "sage_attn: %d extend batches on %s over the unpacked 8-bit cache so far",
                    self.flash_extend_batches,
                    self.flash_name,
                )

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
