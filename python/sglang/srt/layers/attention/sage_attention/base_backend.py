"""The SGLang backend sage_attn hands everything off its 8-bit path to, chosen at start-up.

sage_attn computes only what its 8-bit kernels win; the rest of a server's attention
(decode on the bf16 cache, chunks below the crossover, speculative modes, delegated
layer kinds, IDLE) runs on one SGLang backend, the *base*, picked the way SGLang picks
its own default (``get_default_attn_backend``), skipping what does not load here:

- Hopper: ``fa3`` when sgl-kernel's FlashAttention-3 loads, else ``fa4`` (FlashAttention-4's
  CuTe kernels vendored in the sglang wheel); not with EAGLE top-k > 1, as SGLang;
- Blackwell (sm100/103): ``trtllm_mha`` (``fa4`` for asymmetric K/V rows) where the page
  size allows it, as SGLang;
- else ``flashinfer`` when importable (not for models with attention sinks), else ``triton``.

``SGLANG_SAGE_ATTN_BASE_BACKEND`` names one instead. With sage_attn's 8-bit KV cache the
base is ``triton``: no other kernel reads that cache, and the 8-bit decode kernel takes
the Triton backend's split-KV metadata and CUDA-graph buffers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sglang.srt.layers.attention.sage_attention.settings import (
    BACKEND_NAME,
    BASE_BACKEND_ENV,
    KV_CACHE_ENV,
)

logger = logging.getLogger(__name__)

# What SGLang's post-processing would have set for these bases (page sizes), which it
# does not do for --attention-backend sage_attn: a base is only chosen where it fits.
TRTLLM_MHA_PAGE_SIZES = (16, 32, 64, 128)
FA4_BLACKWELL_PAGE_SIZE = 128


@dataclass(frozen=True)
class BaseFacts:
    """What the choice depends on, gathered once from the server (``facts_of``)."""

    is_cuda: bool
    capability: tuple[int, int] | None
    page_size: int
    # No speculative decoding, or EAGLE top-k 1 at page size 1 (SGLang's fa3 condition).
    spec_allows_fa: bool
    has_attention_sinks: bool
    asymmetric_kv: bool
    kv8_cache: bool
    # Why each optional kernel library does not load here (None: it loads).
    fa3_missing: str | None
    fa4_missing: str | None
    flashinfer_missing: str | None


@dataclass(frozen=True)
class BaseChoice:
    name: str  # a key of SGLang's ATTENTION_BACKENDS
    reason: str


def choose_base_backend(facts: BaseFacts, override: str = "auto") -> BaseChoice:
    """The base for a server with these facts (a pure function: the tests drive it)."""
    if override != "auto":
        if override == BACKEND_NAME:
            raise ValueError(f"{BASE_BACKEND_ENV}={override}: sage_attn cannot be its own base")
        if facts.kv8_cache and override != "triton":
            raise ValueError(
                f"{BASE_BACKEND_ENV}={override} with {KV_CACHE_ENV}=int8: the 8-bit cache's "
                "decode kernel runs on the Triton backend's split-KV metadata; unset one"
            )
        return BaseChoice(override, f"{BASE_BACKEND_ENV}={override}")
    if facts.kv8_cache:
        return BaseChoice(
            "triton",
            "the 8-bit KV cache: only sage_attn's kernels read it; the Triton backend plans "
            "their decode splits and CUDA-graph buffers",
        )
    if not facts.is_cuda or facts.capability is None:
        return BaseChoice("triton", "no CUDA GPU")
    major, minor = facts.capability
    arch = f"sm{major}{minor}"
    if major == 9:
        if not facts.spec_allows_fa:
            skipped = "EAGLE top-k > 1 (SGLang does not default to FlashAttention there)"
        elif facts.fa3_missing is None:
            return BaseChoice("fa3", f"{arch}: sgl-kernel's FlashAttention-3 (SGLang's default)")
        elif facts.fa4_missing is None:
            return BaseChoice(
                "fa4",
                f"{arch}: FlashAttention-3 does not load ({facts.fa3_missing}); "
                "FlashAttention-4's CuTe kernels do",
            )
        else:
            skipped = f"neither FA3 ({facts.fa3_missing}) nor FA4 ({facts.fa4_missing}) loads"
    elif (major, minor) in ((10, 0), (10, 3)) and facts.spec_allows_fa:
        if facts.asymmetric_kv:
            if facts.fa4_missing is None and facts.page_size == FA4_BLACKWELL_PAGE_SIZE:
                return BaseChoice("fa4", f"{arch}, K and V of different widths (as SGLang)")
            skipped = f"fa4 needs --page-size {FA4_BLACKWELL_PAGE_SIZE} on {arch}"
        elif facts.flashinfer_missing is None and facts.page_size in TRTLLM_MHA_PAGE_SIZES:
            return BaseChoice("trtllm_mha", f"{arch} (SGLang's default there)")
        else:
            skipped = f"trtllm_mha needs flashinfer and --page-size in {TRTLLM_MHA_PAGE_SIZES}"
    else:
        skipped = f"{arch} has no FlashAttention default in SGLang"
    if facts.flashinfer_missing is None and not facts.has_attention_sinks:
        return BaseChoice("flashinfer", f"{skipped}; flashinfer is installed")
    why_not = facts.flashinfer_missing or "the model has attention sinks"
    return BaseChoice("triton", f"{skipped}; no flashinfer ({why_not})")


def _import_error(load) -> str | None:
    try:
        ok = load()
    except Exception as exc:  # an optional kernel library: any failure means "not here"
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
    return None if ok is not False else "not supported on this GPU"


def _fa3_loads() -> bool:
    from sgl_kernel.flash_attn import is_fa3_supported  # loads sgl-kernel's FA3 library

    return is_fa3_supported()


def _fa4_loads() -> bool:
    from sglang.kernels.ops.attention.flash_attention_v4 import (
        is_flash_attention_v4_available,
    )

    return is_flash_attention_v4_available()


def _flashinfer_loads() -> bool:
    import flashinfer  # noqa: F401

    return True


def flash_libraries_missing() -> tuple[str | None, str | None]:
    """Why FlashAttention-3 and FlashAttention-4 do not load here (None: it loads)."""
    return _import_error(_fa3_loads), _import_error(_fa4_loads)


def flash_version(
    capability: tuple[int, int] | None, fa3_missing: str | None, fa4_missing: str | None
) -> tuple[int | None, str]:
    """(FlashAttention version, why), or (None, why none), for a GPU of ``capability``
    (None: no CUDA) given why each library does not load (None: it loads)."""
    if capability is None:
        return None, "no CUDA GPU"
    major, minor = capability
    arch = f"sm{major}{minor}"
    if major == 9 and fa3_missing is None:
        return 3, f"{arch}: sgl-kernel's FlashAttention-3"
    if major in (9, 10) and fa4_missing is None:
        return 4, f"{arch}: FlashAttention-4's CuTe kernels"
    if major not in (9, 10):
        return None, f"{arch}: no FlashAttention-3/4 kernel for this architecture"
    return None, f"{arch}: neither FA3 ({fa3_missing}) nor FA4 ({fa4_missing}) loads"


def flash_version_here(device) -> tuple[int | None, str]:
    """``flash_version`` for ``device`` (a torch device or its name)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None, "no CUDA GPU"
    return flash_version(torch.cuda.get_device_capability(device), *flash_libraries_missing())


def facts_of(model_runner, kv8_cache: bool) -> BaseFacts:
    from sglang.srt.runtime_context import get_platform, get_spec

    platform = get_platform()
    is_cuda = bool(platform.is_cuda)
    spec = get_spec()
    topk = spec.speculative_eagle_topk
    page_size = model_runner.page_size
    config = model_runner.model_config
    fa3_missing, fa4_missing = flash_libraries_missing() if is_cuda else ("no CUDA",) * 2
    return BaseFacts(
        is_cuda=is_cuda,
        capability=tuple(platform.device_capability) if is_cuda else None,
        page_size=page_size,
        spec_allows_fa=spec.speculative_algorithm is None
        or topk is None
        or (topk == 1 and page_size == 1),
        has_attention_sinks=bool(getattr(config, "has_attention_sinks", False)),
        asymmetric_kv=bool(getattr(config, "has_asymmetric_kv", False)),
        kv8_cache=kv8_cache,
        fa3_missing=fa3_missing,
        fa4_missing=fa4_missing,
        flashinfer_missing=(
            None
            if is_cuda and platform.has_flashinfer and _import_error(_flashinfer_loads) is None
            else "not installed or no CUDA"
        ),
    )


def build_base_backend(model_runner, *, override: str, kv8_cache: bool):
    """(the base backend, the choice), built through SGLang's own registry. An automatic
    choice that fails to build falls back to ``triton`` with a warning; a named one raises."""
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    choice = choose_base_backend(facts_of(model_runner, kv8_cache), override)
    if choice.name not in ATTENTION_BACKENDS:
        raise ValueError(
            f"{BASE_BACKEND_ENV}={choice.name}: not an SGLang attention backend "
            f"(choices: {', '.join(sorted(ATTENTION_BACKENDS))})"
        )
    try:
        return ATTENTION_BACKENDS[choice.name](model_runner), choice
    except Exception as exc:
        if override != "auto" or choice.name == "triton":
            raise
        logger.warning(
            "sage_attn: base backend %s failed to build (%s: %s); using triton",
            choice.name,
            type(exc).__name__,
            exc,
        )
        fallback = BaseChoice("triton", f"{choice.name} failed to build: {type(exc).__name__}")
        return ATTENTION_BACKENDS["triton"](model_runner), fallback
