"""sage_attn: 8-bit SageAttention kernels for SGLang (INT8 Q·Kᵀ, FP16/FP8/INT8 P·V).

Three groups of modules, each above only the groups below it:

- SGLang glue: ``plugin`` (entry point and factory), ``kv8_backend`` (the backend on
  the 8-bit cache; the bf16-cache backend is ``../sage_attention_backend.py``),
  ``base_backend`` / ``base_extend`` (the base backend and its kernel on a subset),
  ``request_split`` / ``crossover`` (per-request routing), ``settings``, and the 8-bit
  cache's SGLang side: ``kv8_pool``, ``kv8_hooks``, ``kv8_calibration``.
- The 8-bit KV cache path: ``kv8_cache`` (the page format, its write kernel and
  accessors), ``kv8_tiles`` (tile math both kernels share), ``extend_kv8``,
  ``decode_kv8``, ``kv8_flash`` (prefill through FlashAttention over unpacked rows).
- The bf16-cache path: ``layout`` (the packed K/V format), ``quantize`` (the pre-pass),
  ``extend_attention`` (portable Triton kernel and dispatch), ``hopper_attention``
  (Gluon, sm_90), ``rotation``.

Pure-torch twins, imported by tests and tools only: ``reference`` (bf16-cache path),
``kv8_reference`` (8-bit cache kernels; ``kv8_cache`` holds its own write twin).

The kernel names below load on first use (PEP 562), so importing a light module of
this package (``settings``, ``kv8_hooks``: SGLang's planner asks them on every
server) does not compile or import the Triton kernels.
"""

_EXPORTS = ("SUPPORTED_DTYPES", "SUPPORTED_HEAD_DIMS", "SUPPORTED_PV", "sage_extend_attention")

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        from sglang.srt.layers.attention.sage_attention import extend_attention

        return getattr(extend_attention, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
