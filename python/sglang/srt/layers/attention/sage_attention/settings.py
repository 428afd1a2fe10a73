"""User settings of the sage_attn backend, read once from the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from sglang.srt.layers.attention.sage_attention.extend_attention import (
    SUPPORTED_KERNELS,
    SUPPORTED_PV,
    fp8_mma_supported,
)

PV_ENV = "SGLANG_SAGE_ATTN_PV"
MIN_EXTEND_LEN_ENV = "SGLANG_SAGE_ATTN_MIN_EXTEND_LEN"
KERNEL_ENV = "SGLANG_SAGE_ATTN_KERNEL"
QK_ROTATION_ENV = "SGLANG_SAGE_ATTN_QK_ROTATION"
SUPPORTED_QK_ROTATIONS = ("none", "hadamard")
# Measured crossover against the bf16 Triton extend kernel short requests fall back
# to (benchmark/kernels/sage_attention/RESULTS.md): an 8B-shaped layer prefilling
# one request is 0.85x at 1024 tokens, 1.02x at 2048, 1.31x at 4096 (H100, v1);
# 0.63x at 1024 and 1.40x at 4096 (H200, v2).
DEFAULT_MIN_EXTEND_LEN = 2048


@dataclass(frozen=True)
class SageAttnSettings:
    # P·V precision: "fp16" (accurate everywhere, the default), "fp8" (e4m3 P and V,
    # sm_89+) or "int8" (INT8 P per key tile and V per channel; any GPU). On the H200
    # neither 8-bit mode is both faster and as accurate as fp16 on a real model
    # (benchmark/kernels/sage_attention/RESULTS.md, benchmark/sage_attention/VALIDATION.md).
    pv: str = "fp16"
    # Requests whose new chunk is shorter run on SGLang's Triton extend kernel.
    min_extend_len: int = DEFAULT_MIN_EXTEND_LEN
    # "auto" (the Gluon kernel on Hopper, Triton elsewhere) or "triton" (Triton everywhere).
    kernel: str = "auto"
    # "hadamard": rotate Q and K before their INT8 quantization (rotation.py). Off by
    # default until its speed is measured on a GPU (its accuracy gain is measured:
    # benchmark/sage_attention/VALIDATION.md).
    qk_rotation: str = "none"

    @property
    def rotate_qk(self) -> bool:
        return self.qk_rotation == "hadamard"

    def __post_init__(self):
        if self.pv not in SUPPORTED_PV:
            raise ValueError(f"{PV_ENV}={self.pv!r}: must be one of {SUPPORTED_PV}")
        if self.kernel not in SUPPORTED_KERNELS:
            raise ValueError(f"{KERNEL_ENV}={self.kernel!r}: must be one of {SUPPORTED_KERNELS}")
        if self.qk_rotation not in SUPPORTED_QK_ROTATIONS:
            raise ValueError(
                f"{QK_ROTATION_ENV}={self.qk_rotation!r}: must be one of {SUPPORTED_QK_ROTATIONS}"
            )
        if self.min_extend_len < 0:
            raise ValueError(f"{MIN_EXTEND_LEN_ENV}={self.min_extend_len}: must be >= 0")

    def check_device(self, device: torch.device | str) -> None:
        """Raise for a setting ``device`` cannot run, so a server refuses it at
        start-up instead of failing its first long prefill."""
        device = torch.device(device)
        if self.pv == "fp8" and not fp8_mma_supported(device):
            capability = torch.cuda.get_device_capability(device)
            raise ValueError(
                f"{PV_ENV}=fp8 needs FP8 tensor cores (sm_89 or newer: L4, L40, H100, ...); "
                f"this GPU is sm_{capability[0]}{capability[1]}. Unset {PV_ENV} or set it to fp16."
            )

    @classmethod
    def from_env(cls, environ=os.environ) -> SageAttnSettings:
        raw_min_len = environ.get(MIN_EXTEND_LEN_ENV, str(DEFAULT_MIN_EXTEND_LEN))
        try:
            min_extend_len = int(raw_min_len)
        except ValueError:
            raise ValueError(
                f"{MIN_EXTEND_LEN_ENV}={raw_min_len!r}: must be an integer token count"
            ) from None
        return cls(
            pv=environ.get(PV_ENV, "fp16").lower(),
            min_extend_len=min_extend_len,
            kernel=environ.get(KERNEL_ENV, "auto").lower(),
            qk_rotation=environ.get(QK_ROTATION_ENV, "none").lower(),
        )
