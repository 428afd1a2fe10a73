"""User settings of the sage_attn backend, read once from the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

# The P·V modes are the packed layout's (one definition); no kernel module is imported
# here, so reading a setting (SGLang's memory planner does, on every server) compiles
# nothing.
from sglang.srt.layers.attention.sage_attention.layout import PV

# The backend's name in SGLang's registry and in --attention-backend.
BACKEND_NAME = "sage_attn"
PV_ENV = "SGLANG_SAGE_ATTN_PV"
MIN_EXTEND_LEN_ENV = "SGLANG_SAGE_ATTN_MIN_EXTEND_LEN"
KERNEL_ENV = "SGLANG_SAGE_ATTN_KERNEL"
QK_ROTATION_ENV = "SGLANG_SAGE_ATTN_QK_ROTATION"
DECODE_MAX_SPLITS_ENV = "SGLANG_SAGE_ATTN_DECODE_MAX_SPLITS"
KV_CACHE_ENV = "SGLANG_SAGE_ATTN_KV_CACHE"
KV_SMOOTHING_ENV = "SGLANG_SAGE_ATTN_KV_SMOOTHING"
BASE_BACKEND_ENV = "SGLANG_SAGE_ATTN_BASE_BACKEND"
# "auto": the model dtype (SGLang's own pool); "int8": sage_attn's 8-bit pool (kv8_pool.py).
SUPPORTED_KV_CACHES = ("auto", "int8")
# "calibrate": the 8-bit cache's per-(layer, head) smoothing vectors are the key means
# of a fixed calibration prompt, computed at start-up (kv8_calibration.py); "none": zeros.
SUPPORTED_KV_SMOOTHING = ("calibrate", "none")
SUPPORTED_QK_ROTATIONS = ("auto", "none", "hadamard")
SUPPORTED_PV = tuple(mode.value for mode in PV)
# "auto": per path, the kernel measured faster there: on Hopper the Gluon kernel for the
# bf16 cache's hd128, the Triton kernel for the 8-bit cache (RESULTS.md round 12: the
# short chunks the server sends it run 1.8x faster on Triton at 64 tokens);
# "gluon": the Gluon kernel wherever it has a variant (Hopper, hd 64/128, 8-bit pages
# of >= 64 tokens), else Triton; "triton": the portable Triton kernel everywhere (an
# escape hatch and an A/B baseline).
SUPPORTED_KERNELS = ("auto", "triton", "gluon")
# "auto" rotates Q/K at head dims up to this, where it was measured free on the
# H200 (hd64 dense prefill 4K-32K: 0.6-4.6% *less* time than without) and closed
# SmolLM2's (hd64) gap to bf16 (mean KL against fp32 1.33-1.45x bf16's, from
# 1.87-2.07x). At hd128 it cost 4-15% of the Gluon kernel's speed and has no
# real-model measurement yet, so "auto" leaves it off there.
AUTO_ROTATION_MAX_HEAD_DIM = 64
# Cap on the KV splits of SGLang's Triton decode kernel under sage_attn, raised to
# this when SGLang's own (--triton-attention-num-kv-splits, default 8) is lower.
# Measured on the H200 (RESULTS.md round 4, 32 q / 8 KV heads, hd128) against a cap
# of 16: a cap of 64 decodes batch 1 at 128K context 3.3x faster (0.793 -> 0.240 ms)
# and batch 8 at 128K 1.33x, and equals 16 from batch 64 (the kernel picks fewer
# splits when the batch fills the GPU). It costs decode scratch of batch x q heads x
# cap x (Dv + 1) fp32: the CUDA-graph copy is sized for the largest captured batch
# (256 x 32 x 64 x 129 x 4 B = 258 MiB; 32 MiB at a cap of 8), and an eager decode
# batch allocates its own per step.
DEFAULT_DECODE_MAX_SPLITS = 64


def fp8_mma_supported(device: torch.device) -> bool:
    """FP8 tensor cores: Ada (sm_89) and newer. The CPU interpreter emulates them."""
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device) >= (8, 9)


def kv_cache_setting(environ=os.environ) -> str:
    """``SGLANG_SAGE_ATTN_KV_CACHE`` as read into ``SageAttnSettings.kv_cache``; alone, for
    callers that must not load the kernels (SageAttnSettings checks its other fields
    against the kernels' lists): kv8_hooks, which SGLang's planner asks on every server."""
    return environ.get(KV_CACHE_ENV, "auto").lower()


@dataclass(frozen=True)
class SageAttnSettings:
    # P·V precision: "fp16" (accurate everywhere, the default), "fp8" (e4m3 P and V,
    # sm_89+) or "int8" (INT8 P per key tile and V per channel; any GPU). On the H200
    # neither 8-bit mode is both faster and as accurate as fp16 on a real model
    # (benchmark/kernels/sage_attention/RESULTS.md, benchmark/sage_attention/VALIDATION.md).
    pv: str = "fp16"
    # Requests whose new chunk is shorter run on the base backend. "auto": the crossover
    # measured against the base for this GPU and head dim (crossover.py); "off": every
    # request on the base (the bf16 cache never runs the 8-bit kernel).
    min_extend_len: int | str = "auto"
    # "auto" (the Gluon kernel on Hopper, Triton elsewhere) or "triton" (Triton everywhere).
    kernel: str = "auto"
    # "hadamard": rotate Q and K before their INT8 quantization (rotation.py); "none";
    # "auto": rotate at head dims <= AUTO_ROTATION_MAX_HEAD_DIM (see there).
    qk_rotation: str = "auto"
    # Cap on the decode kernel's KV splits; 0 keeps SGLang's --triton-attention-num-kv-splits.
    decode_max_splits: int = DEFAULT_DECODE_MAX_SPLITS
    # The KV cache's format: "auto" (SGLang's pool, model dtype) or "int8" (kv8_pool.py).
    kv_cache: str = "auto"
    # The 8-bit cache's smoothing vectors: "calibrate" (start-up prompt) or "none".
    kv_smoothing: str = "calibrate"
    # The SGLang backend everything off the 8-bit path runs on: "auto" (base_backend.py)
    # or a name in SGLang's registry.
    base_backend: str = "auto"

    @property
    def kv8_cache(self) -> bool:
        return self.kv_cache == "int8"

    def rotate_qk(self, head_dim: int) -> bool:
        """Whether layers of this head dim rotate Q and K."""
        if self.qk_rotation == "auto":
            return head_dim <= AUTO_ROTATION_MAX_HEAD_DIM
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
        if self.kv_cache not in SUPPORTED_KV_CACHES:
            raise ValueError(
                f"{KV_CACHE_ENV}={self.kv_cache!r}: must be one of {SUPPORTED_KV_CACHES}"
            )
        if self.kv_smoothing not in SUPPORTED_KV_SMOOTHING:
            raise ValueError(
                f"{KV_SMOOTHING_ENV}={self.kv_smoothing!r}: must be one of {SUPPORTED_KV_SMOOTHING}"
            )
        if isinstance(self.min_extend_len, str):
            if self.min_extend_len not in ("auto", "off"):
                raise ValueError(
                    f"{MIN_EXTEND_LEN_ENV}={self.min_extend_len!r}: must be auto, off or a "
                    "token count"
                )
        elif self.min_extend_len < 0:
            raise ValueError(f"{MIN_EXTEND_LEN_ENV}={self.min_extend_len}: must be >= 0")
        if not 0 <= self.decode_max_splits <= 1024:
            raise ValueError(
                f"{DECODE_MAX_SPLITS_ENV}={self.decode_max_splits}: must be in [0, 1024]"
            )

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
        def integer(name: str, default: int | str) -> int:
            raw = environ.get(name, str(default))
            try:
                return int(raw)
            except ValueError:
                raise ValueError(f"{name}={raw!r}: must be an integer") from None

        min_extend_len = environ.get(MIN_EXTEND_LEN_ENV, "auto").lower()
        return cls(
            pv=environ.get(PV_ENV, "fp16").lower(),
            min_extend_len=min_extend_len
            if min_extend_len in ("auto", "off")
            else integer(MIN_EXTEND_LEN_ENV, min_extend_len),
            decode_max_splits=integer(DECODE_MAX_SPLITS_ENV, DEFAULT_DECODE_MAX_SPLITS),
            kernel=environ.get(KERNEL_ENV, "auto").lower(),
            qk_rotation=environ.get(QK_ROTATION_ENV, "auto").lower(),
            kv_cache=kv_cache_setting(environ),
            kv_smoothing=environ.get(KV_SMOOTHING_ENV, "calibrate").lower(),
            base_backend=environ.get(BASE_BACKEND_ENV, "auto").lower(),
        )
