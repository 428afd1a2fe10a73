"""SageAttentionBackend: 8-bit SageAttention prefill for SGLang (``--attention-backend sage_attn``).

sage_attn runs its 8-bit kernel only where it wins and hands everything else to one
SGLang backend chosen at start-up, the *base* (``sage_attention/base_backend.py``:
FlashAttention-3/4 on Hopper, as SGLang's own default; ``SGLANG_SAGE_ATTN_BASE_BACKEND``
names another), the way ``HybridAttnBackend`` composes two backends:

- the base plans every batch (``init_forward_metadata``) and owns decode, IDLE, decode
  CUDA graphs, the speculative modes and the runner hooks they call (forwarded to it
  below), so those run exactly as on the base;
- an extend batch (prefill, radix-prefix hits, chunked prefill, mixed batches) runs
  ``sage_extend_attention`` over the paged KV cache for each request whose new chunk is
  at least the crossover long (measured against the base for this GPU and head dim,
  ``sage_attention/crossover.py``; where the 8-bit kernel never won, it is not used),
  and the base's kernel for the batch's other requests in the same layer call
  (``sage_attention/base_extend.py``), so a request's path depends only on its own chunk;
- what the sage kernel does not compute (custom masks of speculative modes, sliding
  windows, soft-capping, sinks, non-causal layers, fp8 KV caches, other head dims) is
  delegated to the base whole, with one INFO line per reason.

Prefill CUDA graphs (breakable, and torch.compile piecewise) call ``forward_extend``
in their eager attention region with the graph's output rows in
``forward_batch._attn_output``; the sage kernel writes them in place.

On sage_attn's 8-bit KV cache (``SGLANG_SAGE_ATTN_KV_CACHE=int8``, the pool of
``sage_attention/kv8_pool.py``) nothing can be delegated, since no other kernel
reads that cache: every extend runs ``sage_extend_attention_kv8`` over each
request's whole sequence in the cache and every decode step (eager or in a
CUDA graph) ``sage_decode_kv8`` with the Triton base's split metadata and
scratch; what those kernels do not compute is refused at start-up
(``refuse_layers_the_kv8_cache_cannot_serve``, ``kv8_hooks.kv8_refusals``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from sglang.srt.configs.model_config import AttentionArch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from sglang.srt.layers.attention.sage_attention import (
    SUPPORTED_DTYPES,
    SUPPORTED_HEAD_DIMS,
    sage_extend_attention,
)
from sglang.srt.layers.attention.sage_attention.base_backend import build_base_backend
from sglang.srt.layers.attention.sage_attention.base_extend import (
    extend_indices,
    host_lens,
    subset_kernel_for,
)
from sglang.srt.layers.attention.sage_attention.crossover import arch_of, measured_crossover
from sglang.srt.layers.attention.sage_attention.decode_kv8 import (
    how_decode_reads,
    sage_decode_kv8,
)
from sglang.srt.layers.attention.sage_attention.extend_attention import (
    hopper_kernel_wanted,
    use_hopper_kernel,
)
from sglang.srt.layers.attention.sage_attention.extend_kv8 import sage_extend_attention_kv8
from sglang.srt.layers.attention.sage_attention.hopper_attention import gluon_import_error
from sglang.srt.layers.attention.sage_attention.kv8_pool import SageKV8TokenToKVPool
from sglang.srt.layers.attention.sage_attention.kv8_tiles import MAX_GROUP
from sglang.srt.layers.attention.sage_attention.layout import (
    PV,
    PackedKV,
    allocate_packed_kv,
    packed_len,
)
from sglang.srt.layers.attention.sage_attention.request_split import (
    RequestSubset,
    split_requests,
    takes_8bit,
)
from sglang.srt.layers.attention.sage_attention.settings import (
    KV_CACHE_ENV,
    MIN_EXTEND_LEN_ENV,
    SageAttnSettings,
)
from sglang.srt.layers.attention.triton_backend import TritonAttnBackend
from sglang.srt.layers.radix_attention import AttentionType
from sglang.srt.mem_cache.kv_loc_plan import IdSpaceKind
from sglang.srt.mem_cache.memory_pool import KVWriteLoc
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode
from sglang.srt.runtime_context import get_parallel

if TYPE_CHECKING:
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.model_executor.model_runner import ModelRunner

logger = logging.getLogger(__name__)

# Modes whose attention is a plain causal extend over prefix + chunk.
NATIVE_MODES = (ForwardMode.EXTEND, ForwardMode.MIXED)


def heads_per_rank(model_config, attn_tp_size: int) -> tuple[int, int]:
    """(query heads, KV heads) one attention-TP rank holds; KV heads are replicated
    when there are fewer of them than ranks."""
    num_q_heads = model_config.get_max_num_attention_heads() // attn_tp_size
    return num_q_heads, model_config.get_num_kv_heads(attn_tp_size)


def refuse_unsupported_model(model_runner: ModelRunner) -> None:
    """Raise for models neither the sage kernel nor the Triton fallback can serve."""
    config = model_runner.model_config
    if config.attention_arch == AttentionArch.MLA:
        raise ValueError(
            "sage_attn does not support MLA attention (DeepSeek-style latent KV); "
            "use --attention-backend flashinfer, fa3 or triton for this model"
        )
    if config.is_encoder_decoder:
        raise ValueError(
            "sage_attn does not support encoder-decoder models (cross attention), and "
            "neither does its Triton fallback; use --attention-backend flashinfer"
        )


@dataclass
class KV8Indices:
    """An extend batch's slots as the 8-bit cache kernels read them: each request's
    whole sequence, its new chunk written to the cache first."""

    qo_indptr: torch.Tensor
    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    max_extend_len: int


@dataclass
class SageForwardMetadata:
    """One batch's plan: which requests run on which kernel, or why the batch is delegated.

    Built once per batch after the base backend's own plan, from the same slots
    (``base_extend.extend_indices``), so the delegated and native layers of a batch
    read the same cache.
    """

    # Requests on the 8-bit kernel and on the base backend's kernel (with that
    # kernel's plan for them, ``base_extend``).
    sage: RequestSubset | None
    base: RequestSubset | None
    # A sliding-window pool's write slots for the batch (None for other pools).
    swa_out_cache_loc: torch.Tensor | None
    # Why this whole batch runs on the base backend, or None.
    delegate_reason: str | None
    base_plan: object = None
    # The 8-bit pre-pass's packed K/V, allocated by the batch's first layer and
    # reused by the others (sized for the ``sage`` requests only).
    workspace: PackedKV | None = None
    # Set by the batch's first layer that runs the 8-bit kernel (the batch count).
    counted: bool = False
    # With the 8-bit KV cache: every request's whole sequence (prefix, then chunk).
    kv8_indices: KV8Indices | None = None


def raise_decode_split_cap(triton_backend: TritonAttnBackend, cap: int) -> None:
    """Let SGLang's Triton decode kernel split long contexts up to ``cap`` ways (it picks
    the count per batch on the GPU, below the cap). Its default cap of 8 leaves a
    batch-1 long-context decode on a few SMs (settings.py has the figures). Set
    before any decode buffer is sized. Left alone when SGLang fixes the splits
    itself: deterministic inference sizes them from a tile, and static splits
    (SGLANG_TRITON_DECODE_ATTN_STATIC_KV_SPLITS) give every request the cap, which
    would make every short decode run 64 splits. A cap at or below SGLang's is
    SGLang's to keep."""
    fixed_by_sglang = triton_backend.split_tile_size is not None or triton_backend.static_kv_splits
    if cap > triton_backend.max_kv_splits and not fixed_by_sglang:
        triton_backend.max_kv_splits = cap


def unsupported_layer_reason(layer) -> str | None:
    """Why the sage kernels cannot compute this attention layer (a property of the
    layer alone), or None."""
    if layer.sliding_window_size is not None and layer.sliding_window_size > -1:
        return "sliding-window layers"
    if layer.logit_cap is not None and layer.logit_cap > 0:
        return "logit soft-capping"
    if layer.is_cross_attention:
        return "cross attention"
    if layer.attn_type != AttentionType.DECODER:
        return f"{layer.attn_type.value} attention (not causal)"
    if layer.xai_temperature_len > 0:
        return "xai temperature scaling"
    if layer.k_scale is not None or layer.v_scale is not None:
        return "per-layer KV-cache scales"
    if layer.qk_head_dim not in SUPPORTED_HEAD_DIMS or layer.v_head_dim not in SUPPORTED_HEAD_DIMS:
        return (
            f"head dim qk={layer.qk_head_dim}, v={layer.v_head_dim} "
            f"(sage_attn kernels: {SUPPORTED_HEAD_DIMS})"
        )
    return None


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


def warn_if_gluon_is_missing(kernel: str, head_dim: int, head_dim_v: int, device) -> None:
    """Say at start-up when the settings pick the Gluon Hopper kernel for this model but
    Gluon did not import, so the bf16-cache 8-bit path runs the slower Triton kernel."""
    error = gluon_import_error()
    if error is not None and hopper_kernel_wanted(
        kernel, head_dim, head_dim_v, torch.device(device)
    ):
        logger.warning(
            "sage_attn: the Gluon Hopper kernel is unavailable (%s); the 8-bit kernel on "
            "the bf16 cache runs the portable Triton kernel instead",
            error,
        )


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class BaseHook:
    """A backend attribute that is the base backend's: a bound method for a method, the
    value for a property or a plain attribute."""

    def __set_name__(self, owner, name: str):
        self.name = name

    def __get__(self, backend, owner=None):
        if backend is None:
            return self
        return getattr(backend.base, self.name)


class SageAttentionBackend(AttentionBackend):
    # What SGLang's model runner, CUDA-graph runners, speculative workers and scheduler
    # call or read on the attention backend besides the forward path. What they concern
    # (which lengths must be on the host, decode and its graphs, prefill-graph limits,
    # the TARGET_VERIFY tree mask, draft extend, the metadata glue graph) is the base's,
    # so they are forwarded to it, as HybridAttnBackend forwards them to the child that
    # runs those modes.
    needs_cpu_seq_lens = BaseHook()
    extend_dummy_seqs_capped_by_req_pool = BaseHook()
    max_context_len = BaseHook()
    init_cuda_graph_state = BaseHook()
    init_forward_metadata_in_graph = BaseHook()
    on_after_cuda_graph_warmup = BaseHook()
    get_cuda_graph_seq_len_fill_value = BaseHook()
    validate_elastic_cuda_graph_recapture = BaseHook()
    shared_read_ends = BaseHook()
    supports_prefill_cuda_graph_max_context_size = BaseHook()
    prefill_cuda_graph_default_max_seq_len = BaseHook()
    verify_mask = BaseHook()
    update_verify_buffers_to_fill_after_draft = BaseHook()
    glue_target_verify_metadata = BaseHook()
    glue_draft_metadata = BaseHook()
    supports_ragged_verify_graph = BaseHook()
    supports_draft_extend_metadata_staging = BaseHook()
    stage_draft_extend_metadata = BaseHook()
    draft_extend_metadata_captured_in_graph = BaseHook()

    def __init__(self, model_runner: ModelRunner, settings: SageAttnSettings | None = None):
        super().__init__()
        refuse_unsupported_model(model_runner)
        self.settings = settings or SageAttnSettings.from_env()
        self.settings.check_device(model_runner.device)
        self.req_to_token_pool = model_runner.req_to_token_pool
        self.token_to_kv_pool = model_runner.token_to_kv_pool
        self.kv_index_translator = model_runner.kv_index_translator
        parallel = get_parallel()
        self.decode_context_parallel = parallel.attn_dcp_size > 1
        # sage_attn's 8-bit KV cache (kv8_pool.py): then every attention of the
        # model runs on the 8-bit cache kernels, since no other kernel reads it.
        pool = self.token_to_kv_pool
        self.kv8_pool = pool if isinstance(pool, SageKV8TokenToKVPool) else None
        if self.settings.kv8_cache and self.kv8_pool is None:
            raise ValueError(
                f"{KV_CACHE_ENV}=int8, but this server built a {type(pool).__name__}: its "
                "model or options take another KV pool (see the start-up log)"
            )
        if self.kv8_pool is not None and getattr(model_runner, "model", None) is not None:
            refuse_layers_the_kv8_cache_cannot_serve(model_runner.model)
        self.base, self.base_choice = build_base_backend(
            model_runner, override=self.settings.base_backend, kv8_cache=self.kv8_pool is not None
        )
        if isinstance(self.base, TritonAttnBackend):
            raise_decode_split_cap(self.base, self.settings.decode_max_splits)
        # The base's kernel on the short requests of an extend batch that also holds
        # 8-bit ones (base_extend.py).
        self.base_subset_kernel = subset_kernel_for(self.base, model_runner.page_size)
        head_dim = model_runner.model_config.head_dim
        self.min_extend_len, crossover_source = self._crossover(model_runner.device, head_dim)
        if self.kv8_pool is None:  # the 8-bit cache's kernels are Triton alone
            warn_if_gluon_is_missing(
                self.settings.kernel,
                head_dim,
                model_runner.model_config.v_head_dim,
                model_runner.device,
            )
        # Set while kv8_calibration.py runs its start-up forward.
        self.calibration = None
        self.kv8_decode_batches = 0
        # Snapshot/restore code (metadata glue graph) walks these for forward_metadata.
        self.attn_backend_list = [self.base]
        # Kept out of torch.compile's trace (piecewise prefill graphs), as SGLang's
        # backends keep their kernels.
        self.extend_attention = torch.compiler.disable(sage_extend_attention)
        self.extend_attention_kv8 = torch.compiler.disable(sage_extend_attention_kv8)
        self.decode_attention_kv8 = torch.compiler.disable(sage_decode_kv8)
        self.forward_metadata: SageForwardMetadata | None = None
        self._logged_reasons: set[str] = set()
        self._announced_sage_path = False
        # Extend batches that ran the 8-bit kernel in this process, logged at 1, 2, 4, ...
        # so a server log proves (and counts) the path its figures came from.
        self.sage_extend_batches = 0
        # Heads this rank holds (layers carry their own; these are for the log and
        # for checking a TP bring-up).
        self.num_q_heads, self.num_kv_heads = heads_per_rank(
            model_runner.model_config, parallel.attn_tp_size
        )
        logger.info(
            "SageAttentionBackend: base backend %s (%s); %d query / %d KV heads per rank, "
            "P·V %s, kernel %s, Q/K rotation %s (%s at head dim %d), 8-bit kernel for "
            "chunks of %s (%s), KV cache %s",
            self.base_choice.name,
            self.base_choice.reason,
            self.num_q_heads,
            self.num_kv_heads,
            self.settings.pv,
            self.settings.kernel,
            self.settings.qk_rotation,
            "on" if self.settings.rotate_qk(head_dim) else "off",
            head_dim,
            "no length: off" if self.min_extend_len is None else f">= {self.min_extend_len} tokens",
            crossover_source,
            "8-bit (int8, sage_attn's kernels for prefill and decode)"
            if self.kv8_pool is not None
            else f"model dtype (decode on {self.base_choice.name})",
        )
        if isinstance(self.base, TritonAttnBackend):
            logger.info("sage_attn: Triton decode split cap %d", self.base.max_kv_splits)

    def _crossover(self, device, head_dim: int) -> tuple[int | None, str]:
        """The shortest chunk on the 8-bit kernel (None: never) and where it comes from."""
        setting = self.settings.min_extend_len
        if self.kv8_pool is not None:
            return 0, "the 8-bit KV cache: every chunk"
        if setting == "auto":
            return measured_crossover(arch_of(device), head_dim, self.base_choice.name)
        return (None if setting == "off" else setting), f"{MIN_EXTEND_LEN_ENV}={setting}"

    # ---- metadata -------------------------------------------------------------

    def init_forward_metadata(self, forward_batch: ForwardBatch):
        self.base.init_forward_metadata(forward_batch)
        self.forward_metadata = self._plan(forward_batch)

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        # Graph modes (decode, target verify, draft extend) all run on the base.
        self.base.init_forward_metadata_out_graph(forward_batch, in_capture)
        self.forward_metadata = self._plan(forward_batch)

    def _plan(self, forward_batch) -> SageForwardMetadata:
        mode = forward_batch.forward_mode
        plan = SageForwardMetadata(
            sage=None, base=None, swa_out_cache_loc=None, delegate_reason=None
        )
        if mode.is_decode_or_idle():
            return plan  # decode always runs on the base (or the 8-bit cache's kernel)
        if mode not in NATIVE_MODES:
            plan.delegate_reason = (
                f"forward mode {mode.name} (speculative or custom-mask attention)"
            )
            return plan
        if self.decode_context_parallel:
            plan.delegate_reason = "decode context parallelism (DCP) shards the KV cache"
            return plan
        if self.kv8_pool is not None:
            plan.kv8_indices = self._kv8_indices(forward_batch)
            return plan
        if self.min_extend_len is None:
            plan.delegate_reason = "the 8-bit kernel is off for this model (start-up log)"
            return plan
        extend_lens, prefix_lens = host_lens(forward_batch)
        if not any(takes_8bit(n, self.min_extend_len) for n in extend_lens):
            # Decided on the host lengths alone: an all-base batch packs no indices.
            plan.delegate_reason = (
                f"chunks shorter than {self.min_extend_len} tokens (the crossover)"
            )
            return plan
        indices = extend_indices(self.base, forward_batch, self.kv_index_translator, prefix_lens)
        plan.sage, plan.base = split_requests(
            qo_indptr=indices.qo_indptr,
            kv_indptr=indices.kv_indptr,
            kv_indices=indices.kv_indices,
            extend_lens=extend_lens,
            prefix_lens=prefix_lens,
            min_extend_len=self.min_extend_len,
        )
        if forward_batch.out_cache_loc is not None:
            # The layers' KV writes on a sliding-window pool (None on other pools).
            plan.swa_out_cache_loc = self.kv_index_translator.write_ids(
                forward_batch, IdSpaceKind.SLIDING_WINDOW
            )
        if plan.base is not None:
            plan.base_plan = self.base_subset_kernel.plan(plan.base)
        return plan

    def _kv8_indices(self, forward_batch) -> KV8Indices:
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
        return KV8Indices(
            qo_indptr=triton_metadata.qo_indptr,
            kv_indptr=kv_indptr,
            kv_indices=kv_indices,
            max_extend_len=triton_metadata.max_extend_len,
        )

    # ---- forward ----------------------------------------------------------------

    def _layer_delegate_reason(self, q, k, layer: RadixAttention, kwargs) -> str | None:
        """Why this layer cannot run on the sage kernel, or None."""
        extra = sorted(name for name, value in kwargs.items() if value is not None)
        if extra:
            return f"attention extras {', '.join(extra)}"
        reason = unsupported_layer_reason(layer)
        if reason is not None:
            return reason
        if k is None:
            return "K/V read back from the cache (k is None)"
        if q.dtype not in SUPPORTED_DTYPES:
            return f"model dtype {q.dtype} (sage_attn: fp16, bf16)"
        if self.kv8_pool is None:
            cache_dtype = self.token_to_kv_pool.get_key_buffer(layer.layer_id).dtype
            if cache_dtype != q.dtype:
                return f"KV cache dtype {cache_dtype} (sage_attn reads a {q.dtype} cache)"
        return None

    def _log_delegation(self, reason: str) -> None:
        if reason not in self._logged_reasons:
            self._logged_reasons.add(reason)
            logger.info(
                "sage_attn: running on the base backend (%s): %s", self.base_choice.name, reason
            )

    def forward_extend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: RadixAttention,
        forward_batch: ForwardBatch,
        save_kv_cache: bool = True,
        **kwargs,
    ):
        if self.calibration is not None:
            return self.calibration.attend(q, k, v, layer)
        plan = self.forward_metadata
        reason = plan.delegate_reason or self._layer_delegate_reason(q, k, layer, kwargs)
        if self.kv8_pool is not None:
            return self._extend_kv8(q, k, v, layer, forward_batch, save_kv_cache, reason)
        if reason is not None:
            self._log_delegation(reason)
            return self.base.forward_extend(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)

        if save_kv_cache:
            # Same dtype as the cache and no scales: the pool copies, it never
            # rescales the caller's k/v in place.
            write_loc = KVWriteLoc.for_batch(forward_batch, swa_loc=plan.swa_out_cache_loc)
            self.token_to_kv_pool.set_kv_buffer(layer, write_loc, k, v)
        num_q_heads, num_kv_heads = layer.tp_q_head_num, layer.tp_k_head_num
        # Prefill CUDA graphs hand in their own output rows to fill.
        o = self._output_rows(q, layer, forward_batch)
        self._count_sage_batch(plan, layer, q)
        qkvo = (
            q.view(-1, num_q_heads, layer.qk_head_dim),
            k.view(-1, num_kv_heads, layer.qk_head_dim),
            v.view(-1, num_kv_heads, layer.v_head_dim),
            o.view(-1, num_q_heads, layer.v_head_dim),
        )
        cache = (
            self.token_to_kv_pool.get_key_buffer(layer.layer_id),
            self.token_to_kv_pool.get_value_buffer(layer.layer_id),
        )
        _run_on_subset(plan.sage, qkvo, lambda *t: self._sage_kernel(plan, layer, *t, *cache))
        if plan.base is not None:
            _run_on_subset(
                plan.base,
                qkvo,
                lambda *t: self.base_subset_kernel.run(plan.base_plan, layer, *t, *cache),
            )
        return o

    def _count_sage_batch(self, plan, layer, q) -> None:
        """Log the first 8-bit extend and count batches (at 1, 2, 4, ...), so a server
        log proves which path its figures came from."""
        if not self._announced_sage_path:
            self._announced_sage_path = True
            if self.kv8_pool is not None:
                kernel, pv = "8-bit KV cache", "fp16"
                requests = total = plan.kv8_indices.qo_indptr.shape[0] - 1
                longest = plan.kv8_indices.max_extend_len
            else:
                hopper = use_hopper_kernel(
                    self.settings.kernel, layer.qk_head_dim, layer.v_head_dim, q.device
                )
                kernel, pv = ("Gluon, Hopper" if hopper else "Triton"), self.settings.pv
                requests, longest = plan.sage.batch_size, plan.sage.max_extend_len
                total = requests + (plan.base.batch_size if plan.base else 0)
            logger.info(
                "sage_attn: extend batches run on the 8-bit kernel (%s; first: %d of %d "
                "requests 8-bit, longest chunk %d tokens, P·V %s)",
                kernel,
                requests,
                total,
                longest,
                pv,
            )
        if not plan.counted:
            plan.counted = True
            self.sage_extend_batches += 1
            if _is_power_of_two(self.sage_extend_batches):
                logger.info(
                    "sage_attn: %d extend batches on the 8-bit kernel so far",
                    self.sage_extend_batches,
                )

    def _output_rows(self, q, layer, forward_batch):
        """The layer's output [N, Hq * Dv]: a prefill CUDA graph's own rows when given."""
        o = forward_batch._attn_output
        if o is None:
            o = q.new_empty((q.shape[0], layer.tp_q_head_num * layer.v_head_dim))
        return o

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

    def _extend_kv8(self, q, k, v, layer, forward_batch, save_kv_cache, reason):
        """An extend batch on the 8-bit cache: write the chunk, then attend over each
        request's whole sequence in the cache."""
        o, qoc = self._write_kv8(q, k, v, layer, forward_batch, save_kv_cache, reason)
        plan = self.forward_metadata
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

    def _decode_kv8(self, q, k, v, layer, forward_batch, save_kv_cache, kwargs):
        """A decode step on the 8-bit cache: the Triton base's decode metadata (splits,
        scratch, CUDA-graph buffers), sage_attn's kernel."""
        reason = self._layer_delegate_reason(q, k, layer, kwargs)
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
            # Python runs once per eager step and once per graph capture.
            self.kv8_decode_batches += 1
            if _is_power_of_two(self.kv8_decode_batches):
                cache = qoc[2]
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
        return o

    def _sage_kernel(self, plan, layer, q, k, v, o, k_buffer, v_buffer):
        subset = plan.sage
        self.extend_attention(
            q,
            k,
            v,
            o,
            k_buffer,
            v_buffer,
            subset.qo_indptr,
            subset.kv_indptr,
            subset.kv_indices,
            subset.max_extend_len,
            sm_scale=layer.scaling,
            causal=True,
            pv=self.settings.pv,
            workspace=self._workspace(plan, k, v),
            kernel=self.settings.kernel,
            rotate_qk=self.settings.rotate_qk(layer.qk_head_dim),
        )

    def _workspace(self, plan, k: torch.Tensor, v: torch.Tensor) -> PackedKV:
        """The batch's packed-K/V buffer: one allocation for all its layers."""
        subset, pv = plan.sage, PV(self.settings.pv)
        rows = packed_len(subset.kv_indices.shape[0], k.shape[0], subset.batch_size)
        workspace = plan.workspace
        if workspace is None or not workspace.matches(
            rows, subset.batch_size, k.shape[1], k.shape[2], v.shape[2], pv
        ):
            workspace = plan.workspace = allocate_packed_kv(
                num_rows=rows,
                batch_size=subset.batch_size,
                num_kv_heads=k.shape[1],
                head_dim=k.shape[2],
                head_dim_v=v.shape[2],
                pv=pv,
                device=k.device,
            )
        return workspace

    def forward_decode(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: RadixAttention,
        forward_batch: ForwardBatch,
        save_kv_cache: bool = True,
        **kwargs,
    ):
        if self.kv8_pool is not None:
            return self._decode_kv8(q, k, v, layer, forward_batch, save_kv_cache, kwargs)
        return self.base.forward_decode(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)


def _run_on_subset(subset: RequestSubset, qkvo, kernel) -> None:
    """Run ``kernel(q, k, v, o)`` on a subset's rows: in place for the whole batch,
    else on gathered rows whose output is scattered back."""
    q, k, v, o = qkvo
    if subset.rows is None:
        kernel(q, k, v, o)
        return
    rows = subset.rows
    o_rows = o.new_empty((rows.shape[0], *o.shape[1:]))
    kernel(q[rows], k[rows], v[rows], o_rows)
    o.index_copy_(0, rows, o_rows)
