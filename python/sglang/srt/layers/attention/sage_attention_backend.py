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

On sage_attn's 8-bit KV cache (``SGLANG_SAGE_ATTN_KV_CACHE=int8``) the plugin builds
the subclass of ``sage_attention/kv8_backend.py`` instead: it overrides the extend plan
and the forward calls, since no other kernel reads that cache.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
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
from sglang.srt.layers.attention.sage_attention.extend_attention import (
    hopper_kernel_wanted,
    use_hopper_kernel,
)
from sglang.srt.layers.attention.sage_attention.hopper_attention import gluon_import_error
from sglang.srt.layers.attention.sage_attention.layout import PV, PackedKV, packed_kv_workspace
from sglang.srt.layers.attention.sage_attention.request_split import (
    RequestSubset,
    run_on_subset,
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
    # With the 8-bit KV cache (``kv8_backend.py``; ``sage`` then lists whole sequences):
    # the requests FlashAttention serves over the unpacked cache, in groups that fit
    # the workspace, the workspace (``kv8_flash.Workspace``), and whether counted.
    kv8_flash: list[RequestSubset] = field(default_factory=list)
    kv8_workspace: object = None
    kv8_flash_counted: bool = False


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


def layer_delegate_reason(q, k, layer: RadixAttention, kwargs) -> str | None:
    """Why this layer call cannot run on a sage kernel (the cache aside), or None."""
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
    return None


def is_power_of_two(n: int) -> bool:
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
    """sage_attn on SGLang's own (bf16/fp16) KV cache; ``kv8_backend.py`` holds the
    variant on sage_attn's 8-bit cache."""

    uses_8bit_cache = False
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
        self._check_pool(model_runner)
        self.base, self.base_choice = build_base_backend(
            model_runner, override=self.settings.base_backend, kv8_cache=self.uses_8bit_cache
        )
        if isinstance(self.base, TritonAttnBackend):
            raise_decode_split_cap(self.base, self.settings.decode_max_splits)
        # The base's kernel on the short requests of an extend batch that also holds
        # 8-bit ones (base_extend.py).
        self.base_subset_kernel = subset_kernel_for(self.base, model_runner.page_size)
        head_dim = model_runner.model_config.head_dim
        self.min_extend_len, crossover_source = self._crossover(model_runner.device, head_dim)
        self._warn_missing_kernels(model_runner)
        # Snapshot/restore code (metadata glue graph) walks these for forward_metadata.
        self.attn_backend_list = [self.base]
        # Kept out of torch.compile's trace (piecewise prefill graphs), as SGLang's
        # backends keep their kernels.
        self.extend_attention = torch.compiler.disable(sage_extend_attention)
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
            self._kv_cache_description(),
        )
        if isinstance(self.base, TritonAttnBackend):
            logger.info("sage_attn: Triton decode split cap %d", self.base.max_kv_splits)

    def _check_pool(self, model_runner) -> None:
        """Raise when the server's KV pool is not the one this class reads."""
        if self.settings.kv8_cache:
            raise ValueError(
                f"{KV_CACHE_ENV}=int8, but this server built a "
                f"{type(self.token_to_kv_pool).__name__}: its model or options take another "
                "KV pool (see the start-up log)"
            )

    def _warn_missing_kernels(self, model_runner) -> None:
        config = model_runner.model_config
        warn_if_gluon_is_missing(
            self.settings.kernel, config.head_dim, config.v_head_dim, model_runner.device
        )

    def _kv_cache_description(self) -> str:
        return f"model dtype (decode on {self.base_choice.name})"

    def _crossover(self, device, head_dim: int) -> tuple[int | None, str]:
        """The shortest chunk on the 8-bit kernel (None: never) and where it comes from."""
        setting = self.settings.min_extend_len
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
        return self._plan_extend(forward_batch, plan)

    def _plan_extend(self, forward_batch, plan: SageForwardMetadata) -> SageForwardMetadata:
        """Which requests of a plain extend batch run on the 8-bit kernel."""
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

    # ---- forward ----------------------------------------------------------------

    def _cache_delegate_reason(self, q, layer: RadixAttention) -> str | None:
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
        plan = self.forward_metadata
        reason = (
            plan.delegate_reason
            or layer_delegate_reason(q, k, layer, kwargs)
            or self._cache_delegate_reason(q, layer)
        )
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
        inputs, out = qkvo[:3], qkvo[3]
        run_on_subset(plan.sage, inputs, out, lambda *t: self._sage_kernel(plan, layer, *t, *cache))
        if plan.base is not None:
            run_on_subset(
                plan.base,
                inputs,
                out,
                lambda *t: self.base_subset_kernel.run(plan.base_plan, layer, *t, *cache),
            )
        return o

    def _count_sage_batch(self, plan, layer, q) -> None:
        """Log the first 8-bit extend and count batches (at 1, 2, 4, ...), so a server
        log proves which path its figures came from."""
        if not self._announced_sage_path:
            self._announced_sage_path = True
            logger.info(
                "sage_attn: extend batches run on the 8-bit kernel (%(kernel)s; first: "
                "%(requests)d of %(total)d requests 8-bit, longest chunk %(longest)d tokens, "
                "P·V %(pv)s)",
                self._describe_sage_path(plan, layer, q),
            )
        if not plan.counted:
            plan.counted = True
            self.sage_extend_batches += 1
            if is_power_of_two(self.sage_extend_batches):
                logger.info(
                    "sage_attn: %d extend batches on the 8-bit kernel so far",
                    self.sage_extend_batches,
                )

    def _describe_sage_path(self, plan, layer, q) -> dict:
        """The first 8-bit batch, for the log line that proves the path."""
        hopper = use_hopper_kernel(
            self.settings.kernel, layer.qk_head_dim, layer.v_head_dim, q.device
        )
        requests = plan.sage.batch_size
        return dict(
            kernel="Gluon, Hopper" if hopper else "Triton",
            pv=self.settings.pv,
            requests=requests,
            total=requests + (plan.base.batch_size if plan.base else 0),
            longest=plan.sage.max_extend_len,
        )

    def _output_rows(self, q, layer, forward_batch):
        """The layer's output [N, Hq * Dv]: a prefill CUDA graph's own rows when given."""
        o = forward_batch._attn_output
        if o is None:
            o = q.new_empty((q.shape[0], layer.tp_q_head_num * layer.v_head_dim))
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
        subset = plan.sage
        plan.workspace = packed_kv_workspace(
            plan.workspace,
            num_prefix_slots=subset.kv_indices.shape[0],
            k=k,
            v=v,
            batch_size=subset.batch_size,
            pv=PV(self.settings.pv),
        )
        return plan.workspace

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
        return self.base.forward_decode(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)
