"""How ``SGLANG_SAGE_ATTN_KV_CACHE=int8`` reaches SGLang: three questions SGLang asks.

SGLang's ``--kv-cache-dtype`` choices are an inline list and its pool choice has no
int8 branch, so the switch is sage_attn's own setting, answered by three plain
functions:

- ``kv8_cell_bytes_for`` (from ``DefaultPoolConfigurator._compute_cell_size``): the
  bytes per token the memory planner divides its budget by, so
  ``max_total_num_tokens`` counts the real 8-bit bytes (``kv8_pool.kv8_cell_bytes``);
- ``kv8_pool_class_for`` (from ``KVCacheConfigurator._build_mha_kv_pool``): the pool
  class, ``SageKV8TokenToKVPool``;
- ``calibrate_kv8_pool`` (after ``ModelRunner.init_attention_backends``, before any
  CUDA graph is captured): the smoothing calibration (``kv8_calibration.py``).

As a plugin, ``register_kv8_hooks`` wraps those three SGLang methods with
``HookRegistry`` (applied in every SGLang process by ``load_plugins()``; no SGLang
file is edited); the in-tree form (``scripts/make_upstream_patch.py``) calls the
functions from the methods themselves. Both refuse, at start-up and with the reason,
every option under which something other than sage_attn's kernels would read the
cache (``kv8_refusals``). With the setting off they answer None and SGLang's code
runs unchanged; this module then imports no kernel (SGLang asks on every server).
"""

from __future__ import annotations

import logging

from sglang.srt.layers.attention.sage_attention.settings import (
    BACKEND_NAME,
    KV_CACHE_ENV,
    kv_cache_setting,
)

logger = logging.getLogger(__name__)

CELL_SIZE_TARGET = (
    "sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator._compute_cell_size"
)
POOL_TARGET = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator._build_mha_kv_pool"
CALIBRATION_TARGET = "sglang.srt.model_executor.model_runner.ModelRunner.init_attention_backends"
# Server options that hand the KV cache to another reader or writer, with why.
_REFUSED_FLAGS = {
    "enable_hierarchical_cache": "HiCache copies KV pages to host memory in its own format",
    "enable_hisparse": "hierarchical sparse attention reads the cache itself",
    "enable_lmcache": "LMCache reads and writes the cache itself",
    "enable_unified_memory": "the unified memory pool lays out its own KV buffers",
    "enable_unified_cache_external_linker": "the external cache linker moves KV pages",
    "enable_page_major_kv_layout": "the page-major layout is another pool",
    "enable_kv_cache_sharding": "KV-cache sharding stripes the bf16 pool",
}


_MISSING = object()


def _option(view, name: str):
    """A server option's value; a name this SGLang lacks is an error, not False, so a
    renamed option cannot silently drop a refusal."""
    value = getattr(view, name, _MISSING)
    if value is _MISSING:
        raise ValueError(
            f"sage_attn's 8-bit KV cache checks the server option {name!r}, which this "
            "SGLang does not have: this sage_attn release does not support this SGLang"
        )
    return value


def kv8_requested() -> bool:
    # The setting alone: the backend checks the whole SageAttnSettings (and refuses a
    # bad value) at start-up.
    return kv_cache_setting() == "int8"


def kv8_refusals(server_args, configurator=None) -> list[str]:
    """Why this server cannot use the 8-bit cache (empty when it can). ``server_args``
    is SGLang's ``ServerArgs``; ``configurator`` its ``KVCacheConfigurator``, which
    knows the model's attention kind."""
    from sglang.srt.arg_groups.model_override_base import attention_backends_of, resolved_view
    from sglang.srt.environ import envs

    view = resolved_view(server_args)
    reasons = []
    prefill, decode = attention_backends_of(view)
    if (prefill, decode) != (BACKEND_NAME, BACKEND_NAME):
        reasons.append(
            f"prefill and decode must both run sage_attn, the cache's only reader (got "
            f"prefill={prefill}, decode={decode}): use --attention-backend sage_attn"
        )
    kv_dtype = _option(view, "kv_cache_dtype")
    if kv_dtype not in (None, "auto", "bf16", "bfloat16", "fp16", "float16"):
        reasons.append(f"--kv-cache-dtype {kv_dtype} asks for another cache format")
    for flag, why in _REFUSED_FLAGS.items():
        if _option(view, flag):
            reasons.append(f"--{flag.replace('_', '-')}: {why}")
    if _option(view, "disaggregation_mode") not in (None, "null"):
        reasons.append("PD disaggregation transfers KV pages in the bf16 layout")
    if _option(view, "speculative_algorithm"):
        reasons.append(
            "speculative decoding verifies and drafts on SGLang's Triton backend, which "
            "cannot read the 8-bit cache"
        )
    if _option(view, "pp_size") > 1:
        reasons.append("pipeline parallelism (the start-up calibration runs all layers)")
    if _option(view, "dcp_size") > 1:
        reasons.append("decode context parallelism shards the cache")
    if _option(view, "attn_dp_size") > 1 or _option(view, "ep_join_mode") == "scale":
        reasons.append(
            "DP attention (the start-up calibration's forward is not run in DP lockstep, "
            "and it is untested with the 8-bit cache)"
        )
    if envs.SGLANG_ENABLE_POST_CAPTURE_KV_SIZING.get():
        reasons.append(
            "SGLANG_ENABLE_POST_CAPTURE_KV_SIZING: the pool would be sized after CUDA-graph "
            "capture, which the 8-bit pool does not implement"
        )
    if envs.SGLANG_USE_HND_KVCACHE.get():
        reasons.append("SGLANG_USE_HND_KVCACHE: the 8-bit cache is token-major (NHD)")
    if configurator is not None:
        if configurator.use_mla_backend:
            reasons.append("MLA models (latent KV) have no per-head K/V to quantize")
        if configurator.is_hybrid_swa:
            reasons.append("sliding-window hybrid models keep two pools")
        if configurator.mambaish_config is not None:
            reasons.append("hybrid linear-attention models keep state pools")
    return reasons


def refuse_unless_kv8_servable(server_args, configurator=None) -> None:
    reasons = kv8_refusals(server_args, configurator)
    if reasons:
        raise ValueError(
            f"{KV_CACHE_ENV}=int8 (sage_attn's 8-bit KV cache) cannot serve this "
            "configuration: " + "; ".join(reasons)
        )


def _for_target_model(configurator) -> bool:
    # A draft model's pool is refused with speculative decoding; never swap it.
    return kv8_requested() and not configurator.is_draft_worker


# ---- what SGLang's planner, pool choice and runner ask (in-tree: called directly) ----


def kv8_cell_bytes_for(configurator, num_layers: int) -> int | None:
    """The 8-bit bytes per token of ``num_layers`` layers when this configurator's pool
    will be the 8-bit one (refusing what cannot serve it), else None."""
    if not _for_target_model(configurator):
        return None
    refuse_unless_kv8_servable(configurator.server_args, configurator)
    from sglang.srt.layers.attention.sage_attention.kv8_pool import kv8_cell_bytes
    from sglang.srt.runtime_context import get_parallel

    parallel = get_parallel()
    config = configurator.model_config
    return kv8_cell_bytes(
        num_layers=num_layers,
        num_kv_heads=config.get_num_kv_heads(parallel.attn_tp_size, parallel.attn_dcp_size),
        head_dim=config.head_dim,
        head_dim_v=config.v_head_dim,
    )


def kv8_pool_class_for(configurator) -> type | None:
    """``SageKV8TokenToKVPool`` when this configurator's MHA pool is to be the 8-bit
    one (refusing what cannot serve it), else None."""
    if not _for_target_model(configurator):
        return None
    refuse_unless_kv8_servable(configurator.server_args, configurator)
    from sglang.srt.layers.attention.sage_attention.kv8_pool import SageKV8TokenToKVPool

    return SageKV8TokenToKVPool


def calibrate_kv8_pool(model_runner) -> None:
    """Calibrate the runner's 8-bit pool if it asks for it (after its attention
    backends are built, before any CUDA graph)."""
    # Only sage_attn's 8-bit pool has the flag.
    if getattr(getattr(model_runner, "token_to_kv_pool", None), "needs_calibration", False):
        from sglang.srt.layers.attention.sage_attention.kv8_calibration import (
            calibrate_key_means,
        )

        calibrate_key_means(model_runner, model_runner.attn_backend)


# ---- the plugin's hooks around them ------------------------------------------------


def kv8_cell_size(original, pool_configurator, configurator, num_layers: int) -> int:
    """AROUND hook on ``_compute_cell_size``: the 8-bit bytes per token when the 8-bit
    cache is on, SGLang's own figure otherwise."""
    cell = kv8_cell_bytes_for(configurator, num_layers)
    if cell is None:
        return original(pool_configurator, configurator, num_layers)
    return cell


def kv8_pool(original, configurator, *args, mha_pool_class, **kwargs):
    """AROUND hook on ``_build_mha_kv_pool``: SGLang builds the pool with its own
    arguments, of sage_attn's class when the 8-bit cache is on."""
    mha_pool_class = kv8_pool_class_for(configurator) or mha_pool_class
    return original(configurator, *args, mha_pool_class=mha_pool_class, **kwargs)


def kv8_calibrate(result, model_runner, *args, **kwargs):
    """AFTER hook on ``init_attention_backends``."""
    calibrate_kv8_pool(model_runner)
    return result


_registered = False


def register_kv8_hooks() -> None:
    """Register both hooks once per process (``load_plugins`` applies them)."""
    global _registered
    if _registered:
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(CELL_SIZE_TARGET, kv8_cell_size, HookType.AROUND)
    HookRegistry.register(POOL_TARGET, kv8_pool, HookType.AROUND)
    HookRegistry.register(CALIBRATION_TARGET, kv8_calibrate, HookType.AFTER)
    _registered = True
