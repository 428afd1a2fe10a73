"""sage_attn: 8-bit SageAttention kernels for SGLang (INT8 Q·Kᵀ, FP16/FP8 P·V)."""

from sglang.srt.layers.attention.sage_attention.extend_attention import (
    SUPPORTED_DTYPES,
    SUPPORTED_HEAD_DIMS,
    SUPPORTED_PV,
    sage_extend_attention,
)

__all__ = [
    "SUPPORTED_DTYPES",
    "SUPPORTED_HEAD_DIMS",
    "SUPPORTED_PV",
    "sage_extend_attention",
]
