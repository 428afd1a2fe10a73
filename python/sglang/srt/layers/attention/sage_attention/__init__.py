"""sage_attn: 8-bit SageAttention kernels for SGLang (INT8 Q·Kᵀ, FP16/FP8 P·V).

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
