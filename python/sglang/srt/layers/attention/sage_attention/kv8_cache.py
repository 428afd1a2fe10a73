"""sage_attn's 8-bit paged KV cache: the format, its write path and their torch twins.

One layer's cache, per SGLang token slot ``s`` and KV head ``h`` (page size 1:
any slot list ``kv_indices`` addresses it, as SGLang's pools do):

- ``k_int8 [S, Hkv, D]`` int8: ``round((k' - k_mean[h]) / k_scale[s, h])``, where
  ``k'`` is the key, rotated by the Hadamard matrix when ``rotated`` (``rotation.py``);
- ``k_scale [S, Hkv]`` fp32: ``max_d |k' - k_mean[h]| / 127``, one per key;
- ``v_int8 [S, Hkv, Dv]`` int8: ``round(v / v_scale[s, h])``;
- ``v_scale [S, Hkv]`` fp32: ``max_d |v| / 127``, one per value row;
- ``k_mean [Hkv, D]`` fp32: the layer's smoothing vector (in the rotated space when
  ``rotated``).

Bytes per token and KV head: ``D + Dv + 8`` (hd128: 264 = 2.06·D; hd64: 136 =
2.13·D), against ``4·D`` for bf16.

Why these choices. A page-size-1 cache writes one token at a time, so the scale
unit is the token: one scale per (token, head) for K and for V. On SmolLM2 per-key
K scales halve K's INT8 error against the per-128-key blocks of the packed
pre-pass (``benchmark/sage_attention/VALIDATION.md``), and a Hadamard rotation cuts
the Q·Kᵀ error further. V in INT8 per row rather than e4m3: for the bell-shaped
rows of a value projection, 127 uniform steps up to the row's max err ~0.6% rms
where e4m3's 3 mantissa bits err ~3.6% at every magnitude; measured on decode over
random rows, cos 0.9984 / rel-L1 0.050 with e4m3 V against the INT8 figures in
``test_sage_attention_decode_kv8.py``.

The smoothing vector: for any m, q·(k - m) = q·k - q·m and q·m is the same for
every key of a query, so softmax is unchanged and nothing is added back; m only
decides how well K quantizes. It must be a function of the model alone (never of
user traffic, warm-up or graph-capture dummies), so the same request gets the same
bytes whatever was served before it: the serving side computes it once from a
fixed calibration prompt at start-up and passes it here frozen; zeros (no
smoothing) are valid.

Writes are one Triton kernel per batch (what ``set_kv_buffer`` does for bf16): no
host sync, fixed grid, graph-capturable, inputs only read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sglang.srt.layers.attention.sage_attention.layout import INT8_MAX, SCALE_EPS
from sglang.srt.layers.attention.sage_attention.rotation import (
    hadamard_matrix,
    hadamard_tile,
    rotate_rows,
)

_INT8_MAX = tl.constexpr(INT8_MAX)
_SCALE_EPS = tl.constexpr(SCALE_EPS)
# Tokens per write program: >= 16, the smallest tile the rotation's tensor-core dot takes.
WRITE_BLOCK = 32


def kv8_bytes_per_token_head(head_dim: int, head_dim_v: int) -> int:
    """Bytes one token occupies per KV head: INT8 K, INT8 V, two fp32 scales."""
    return head_dim + head_dim_v + 2 * 4


@dataclass
class KV8Cache:
    """One layer's 8-bit KV cache (layout in the module docstring)."""

    k_int8: torch.Tensor  # [S, Hkv, D] int8
    k_scale: torch.Tensor  # [S, Hkv] fp32
    v_int8: torch.Tensor  # [S, Hkv, Dv] int8
    v_scale: torch.Tensor  # [S, Hkv] fp32
    k_mean: torch.Tensor  # [Hkv, D] fp32, frozen
    rotated: bool = False

    @property
    def num_kv_heads(self) -> int:
        return self.k_int8.shape[1]

    @property
    def head_dim(self) -> int:
        return self.k_int8.shape[2]

    @property
    def head_dim_v(self) -> int:
        return self.v_int8.shape[2]

    def check_queries(self, q: torch.Tensor, o: torch.Tensor) -> None:
        """Queries ``q [N, Hq, D]`` and outputs ``o [N, Hq, Dv]`` this cache can serve."""
        if q.shape[2] != self.head_dim or o.shape[2] != self.head_dim_v:
            raise ValueError("sage_attn: q/o head dims do not match the 8-bit cache")
        if q.shape[1] % self.num_kv_heads:
            raise ValueError("sage_attn: query heads are not a multiple of the cache's KV heads")


def allocate_kv8_cache(
    num_slots: int,
    num_kv_heads: int,
    head_dim: int,
    head_dim_v: int,
    device: torch.device | str,
    k_mean: torch.Tensor | None = None,
    rotated: bool = False,
) -> KV8Cache:
    """A zeroed cache (zero scales dequantize to zero, like SGLang's zeroed pools)."""
    if k_mean is None:
        k_mean = torch.zeros((num_kv_heads, head_dim), dtype=torch.float32, device=device)
    if tuple(k_mean.shape) != (num_kv_heads, head_dim) or k_mean.dtype != torch.float32:
        raise ValueError(
            f"sage_attn: k_mean must be fp32 [{num_kv_heads}, {head_dim}], got "
            f"{k_mean.dtype} {tuple(k_mean.shape)}"
        )
    return KV8Cache(
        k_int8=torch.zeros((num_slots, num_kv_heads, head_dim), dtype=torch.int8, device=device),
        k_scale=torch.zeros((num_slots, num_kv_heads), dtype=torch.float32, device=device),
        v_int8=torch.zeros((num_slots, num_kv_heads, head_dim_v), dtype=torch.int8, device=device),
        v_scale=torch.zeros((num_slots, num_kv_heads), dtype=torch.float32, device=device),
        k_mean=k_mean.to(device),
        rotated=rotated,
    )


@triton.jit
def kv8_cell(slot, kv_head, num_kv_heads):
    """Row of (slot, KV head) in the [S * Hkv, ...] views of the buffers (int64 slots)."""
    return slot.to(tl.int64) * num_kv_heads + kv_head


@triton.jit
def load_kv8_tile(
    k_int8,
    k_scale,
    v_int8,
    v_scale,
    slots_of_seq,
    pos,
    valid,
    kv_head,
    num_kv_heads,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
):
    """Keys and values at positions ``pos`` of a sequence whose slot ids start at
    ``slots_of_seq``: INT8 K [N, D] and its scales [N], INT8 V [N, Dv] and its scales
    [N]; zeros where not ``valid``. The kernels read the cache only through this."""
    slot = tl.load(slots_of_seq + pos, mask=valid, other=0)
    cell = kv8_cell(slot, kv_head, num_kv_heads)
    key = tl.load(
        k_int8 + cell[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :],
        mask=valid[:, None],
        other=0,
    )
    value = tl.load(
        v_int8 + cell[:, None] * HEAD_DIM_V + tl.arange(0, HEAD_DIM_V)[None, :],
        mask=valid[:, None],
        other=0,
    )
    key_scale = tl.load(k_scale + cell, mask=valid, other=0.0)
    value_scale = tl.load(v_scale + cell, mask=valid, other=0.0)
    return key, key_scale, value, value_scale


@triton.jit
def _kv8_write_kernel(
    k,
    v,
    loc,
    k_int8,
    k_scale,
    v_int8,
    v_scale,
    k_mean,
    num_tokens,
    stride_k_tok,
    stride_k_head,
    stride_v_tok,
    stride_v_head,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK: tl.constexpr,
    ROTATE: tl.constexpr,
):
    head = tl.program_id(1)
    num_heads = tl.num_programs(1)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = rows < num_tokens
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    rows64 = rows.to(tl.int64)
    key = tl.load(
        k + rows64[:, None] * stride_k_tok + head * stride_k_head + offs_d[None, :],
        mask=valid[:, None],
        other=0.0,
    )
    if ROTATE:
        key = rotate_rows(key, hadamard_tile(HEAD_DIM, k.dtype.element_ty))
    key = key.to(tl.float32) - tl.load(k_mean + head * HEAD_DIM + offs_d)[None, :]
    key_scale = tl.maximum(tl.max(tl.abs(key), 1), _SCALE_EPS) / _INT8_MAX
    key = key / key_scale[:, None]
    # Round half away from zero (the cast truncates), as the packed pre-pass does.
    key_q = (key + tl.where(key >= 0, 0.5, -0.5)).to(tl.int8)

    value = tl.load(
        v + rows64[:, None] * stride_v_tok + head * stride_v_head + offs_dv[None, :],
        mask=valid[:, None],
        other=0.0,
    ).to(tl.float32)
    value_scale = tl.maximum(tl.max(tl.abs(value), 1), _SCALE_EPS) / _INT8_MAX
    value = value / value_scale[:, None]
    value_q = (value + tl.where(value >= 0, 0.5, -0.5)).to(tl.int8)

    # Slot ids are int64: a cache may hold more than 2^31 elements.
    cell = kv8_cell(tl.load(loc + rows64, mask=valid, other=0), head, num_heads)
    tl.store(k_int8 + cell[:, None] * HEAD_DIM + offs_d[None, :], key_q, mask=valid[:, None])
    tl.store(v_int8 + cell[:, None] * HEAD_DIM_V + offs_dv[None, :], value_q, mask=valid[:, None])
    tl.store(k_scale + cell, key_scale, mask=valid)
    tl.store(v_scale + cell, value_scale, mask=valid)


def _check_write(cache: KV8Cache, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if k.dtype not in (torch.float16, torch.bfloat16) or v.dtype != k.dtype:
        raise ValueError(f"sage_attn: k/v must both be fp16 or bf16, got {k.dtype}, {v.dtype}")
    want_k = (loc.shape[0], cache.num_kv_heads, cache.head_dim)
    want_v = (loc.shape[0], cache.num_kv_heads, cache.head_dim_v)
    if tuple(k.shape) != want_k or tuple(v.shape) != want_v:
        raise ValueError(
            f"sage_attn: k {tuple(k.shape)} / v {tuple(v.shape)} do not match loc and the "
            f"cache: expected {want_k} / {want_v}"
        )
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("sage_attn: k and v need a contiguous last dimension")
    if loc.dim() != 1 or loc.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"sage_attn: loc must be 1-D int32/int64, got {loc.dtype}")
    for t in (cache.k_int8, cache.k_scale, cache.v_int8, cache.v_scale):
        if not t.is_contiguous():
            raise ValueError("sage_attn: the 8-bit cache buffers must be contiguous")


def write_kv8(cache: KV8Cache, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Quantize new keys/values ``k [N, Hkv, D]``, ``v [N, Hkv, Dv]`` into slots ``loc [N]``."""
    _check_write(cache, loc, k, v)
    num_tokens = loc.shape[0]
    if num_tokens == 0:
        return
    grid = (triton.cdiv(num_tokens, WRITE_BLOCK), cache.num_kv_heads)
    _kv8_write_kernel[grid](
        k,
        v,
        loc,
        cache.k_int8,
        cache.k_scale,
        cache.v_int8,
        cache.v_scale,
        cache.k_mean,
        num_tokens,
        stride_k_tok=k.stride(0),
        stride_k_head=k.stride(1),
        stride_v_tok=v.stride(0),
        stride_v_head=v.stride(1),
        HEAD_DIM=cache.head_dim,
        HEAD_DIM_V=cache.head_dim_v,
        BLOCK=WRITE_BLOCK,
        ROTATE=cache.rotated,
    )


# ---- torch twins ---------------------------------------------------------------------


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    return torch.trunc(x + torch.where(x >= 0, 0.5, -0.5))


def write_kv8_ref(cache: KV8Cache, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Twin of ``write_kv8``: the same bytes, in torch."""
    _check_write(cache, loc, k, v)
    key = k.float()
    if cache.rotated:
        key = key @ hadamard_matrix(cache.head_dim, device=k.device)
    key = key - cache.k_mean
    key_scale = key.abs().amax(-1).clamp_min(SCALE_EPS) / INT8_MAX
    key = key / key_scale[..., None]
    key_q = _round_half_away(key).to(torch.int8)
    value = v.float()
    value_scale = value.abs().amax(-1).clamp_min(SCALE_EPS) / INT8_MAX
    slots = loc.long()
    cache.k_int8[slots] = key_q
    cache.k_scale[slots] = key_scale
    cache.v_int8[slots] = _round_half_away(value / value_scale[..., None]).to(torch.int8)
    cache.v_scale[slots] = value_scale


def dequantize_kv8(cache: KV8Cache, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, V) of ``slots`` in fp32 as the kernels see them: K in the cache's own space
    (rotated and mean-subtracted when so stored), V scaled back."""
    slots = slots.long()
    k = cache.k_int8[slots].float() * cache.k_scale[slots][..., None]
    v = cache.v_int8[slots].float() * cache.v_scale[slots][..., None]
    return k, v


def reconstruct_keys(cache: KV8Cache, slots: torch.Tensor) -> torch.Tensor:
    """The original keys of ``slots`` (fp32): mean added back, rotation undone."""
    k, _ = dequantize_kv8(cache, slots)
    k = k + cache.k_mean
    if cache.rotated:  # H H = D I
        k = k @ hadamard_matrix(cache.head_dim, device=k.device) / cache.head_dim
    return k
