"""The packed K/V layout that sage_attn's pre-pass writes and its attention kernel reads.

Defined here once; the pre-pass (``quantize.py``), the attention kernel
(``extend_attention.py``), the torch twins (``reference.py``) and the tests all
use these names.

For a batch of B requests, request b's keys (its cached prefix, then its new
chunk; ``kv_len_b`` in all) occupy rows ``[start_b, start_b + kv_len_b)`` of
every KV head's slice of the packed buffers, where

    start_b = KV_BLOCK * ((kv_indptr[b] + qo_indptr[b]) // KV_BLOCK + b)

-- block aligned and computable in a kernel from the index pointers alone. A
segment owns whole blocks: the rows from ``start_b + kv_len_b`` to the next
block boundary are written as zeros, so the attention kernel reads whole
``KV_BLOCK``-key tiles (TMA boxes on Hopper) without load masks and never sees
uninitialised bytes.

Buffers (``T = packed_len(...)`` rows per KV head):
- ``k_int8 [Hkv, T, D]`` int8: keys minus the request's per-channel mean (smoothing).
- ``k_scale [Hkv, T // KV_BLOCK]`` fp32: one scale per block of ``KV_BLOCK`` keys,
  i.e. per attention tile, so it folds into the query row's scale.
- ``v``: ``PV.FP16``: ``[Hkv, T, Dv]`` fp16.  ``PV.FP8`` / ``PV.INT8``:
  ``[Hkv, Dv, T]`` e4m3 / int8, token-contiguous ("K-major"), the operand layout
  8-bit MMAs want for P·V (Hopper's wgmma cannot transpose 8-bit operands).
- ``v_scale [B, Hkv, Dv]`` fp32: per (request, head, channel). FP8: absmax / 448;
  INT8: absmax / 127. FP16: a power of two, 1 unless the channel exceeds fp16's
  range (bf16 models can hold values past 65504). The kernel multiplies the
  output by it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Keys per packed block: segment alignment, K-scale granularity and the attention
# kernel's key tile (BLOCK_N) are the same number, so a tile needs one K scale.
KV_BLOCK = 128
INT8_MAX = 127.0
FP8_E4M3_MAX = 448.0
# fp16 values are kept below this (max finite 65504) after the power-of-two V scale.
FP16_V_LIMIT = 32768.0
# 1.5 * 2^23: x + ROUND_MAGIC (fp32, round-to-nearest-even) holds round(x) in its low
# mantissa bits for |x| < 2^22, and the bits of ROUND_MAGIC + i are ROUND_MAGIC_BITS + i.
# Kernels convert int <-> float this way with one full-rate add instead of a
# quarter-rate cvt, which an 8-bit attention loop is short of.
ROUND_MAGIC = 12582912.0
ROUND_MAGIC_BITS = 0x4B400000
# Guards a scale against an all-zero block; far below any real activation.
SCALE_EPS = 1e-12


class PV(str, enum.Enum):
    """Precision of the P·V product (and of the packed V)."""

    FP16 = "fp16"  # SageAttention1: fp16 P and V, accurate everywhere
    FP8 = "fp8"  # SageAttention2: e4m3 P and V, needs an FP8 tensor core (sm_89+)
    # INT8 P (each row scaled to 127 by its max within the key tile) and V (per
    # channel): the FP8 MMA rate on Hopper, 2x fp16's on Ampere and Ada, and 4 more
    # mantissa bits than e4m3 for the large probabilities that dominate the output.
    INT8 = "int8"

    @property
    def v_dtype(self) -> torch.dtype:
        return {PV.FP16: torch.float16, PV.FP8: torch.float8_e4m3fn, PV.INT8: torch.int8}[self]

    @property
    def v_token_major(self) -> bool:
        """V stored ``[Hkv, Dv, T]`` (8-bit P·V) rather than ``[Hkv, T, Dv]``."""
        return self is not PV.FP16


@dataclass
class PackedKV:
    """What the attention kernel reads; written by ``quantize_kv``."""

    pv: PV
    k_int8: torch.Tensor  # [Hkv, T, D] int8
    k_scale: torch.Tensor  # [Hkv, T // KV_BLOCK] fp32
    v: torch.Tensor  # FP16: [Hkv, T, Dv] fp16; FP8 / INT8: [Hkv, Dv, T] e4m3 / int8
    v_scale: torch.Tensor  # [B, Hkv, Dv] fp32
    # K was rotated by the Hadamard matrix before quantization (``rotation.py``), so
    # the attention kernel rotates Q the same way. Written by ``quantize_kv``.
    rotated: bool = False

    @property
    def num_rows(self) -> int:
        return self.k_int8.shape[1]

    def v_strides(self) -> tuple[int, int, int]:
        """(head, token, channel) strides of ``v``, whichever way it is stored."""
        if self.pv.v_token_major:
            return self.v.stride(0), self.v.stride(2), self.v.stride(1)
        return self.v.stride(0), self.v.stride(1), self.v.stride(2)

    def matches(
        self,
        num_rows: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        head_dim_v: int,
        pv: PV,
    ) -> bool:
        """Whether this buffer can take a call's packed K/V: same layout, enough rows."""
        return (
            self.pv is pv
            and self.num_rows >= num_rows
            and self.v_scale.shape[0] >= batch_size
            and (self.k_int8.shape[0], self.k_int8.shape[2]) == (num_kv_heads, head_dim)
            and self.v_scale.shape[2] == head_dim_v
        )

    def tile_views(self, block_n: int):
        """2-D views a TMA descriptor spans and the tile shape of each, for K then V:
        K ``[Hkv * T, D]`` in ``[block_n, D]`` tiles; V FP16 ``[Hkv * T, Dv]`` in
        ``[block_n, Dv]`` tiles, 8-bit ``[Hkv * Dv, T]`` in ``[Dv, block_n]`` tiles."""
        num_kv_heads, num_rows, head_dim = self.k_int8.shape
        k = (self.k_int8.view(num_kv_heads * num_rows, head_dim), [block_n, head_dim])
        if self.pv.v_token_major:
            head_dim_v = self.v.shape[1]
            v = (self.v.view(num_kv_heads * head_dim_v, num_rows), [head_dim_v, block_n])
        else:
            head_dim_v = self.v.shape[2]
            v = (self.v.view(num_kv_heads * num_rows, head_dim_v), [block_n, head_dim_v])
        # A descriptor's coordinates are int32: refuse what they cannot reach.
        if max(k[0].shape[0], v[0].shape[0], v[0].shape[1]) >= 2**31:
            raise ValueError(
                f"sage_attn: a packed K/V of {num_kv_heads} x {num_rows} rows is past TMA's "
                "int32 coordinates"
            )
        return k, v


def packed_len(num_prefix_slots: int, num_extend_tokens: int, batch_size: int) -> int:
    """Rows per KV head that every request's block-aligned segment fits in."""
    total = num_prefix_slots + num_extend_tokens
    return KV_BLOCK * (total // KV_BLOCK + batch_size)


def packed_nbytes(
    num_rows: int, batch_size: int, num_kv_heads: int, head_dim: int, head_dim_v: int, pv: PV
) -> int:
    """Bytes of a ``PackedKV`` of ``num_rows`` rows (the transient workspace a call needs)."""
    v_bytes = pv.v_dtype.itemsize
    per_row = head_dim + head_dim_v * v_bytes + 4 / KV_BLOCK
    return int(num_kv_heads * (num_rows * per_row + batch_size * head_dim_v * 4))


def allocate_packed_kv(
    num_rows: int,
    batch_size: int,
    num_kv_heads: int,
    head_dim: int,
    head_dim_v: int,
    pv: PV,
    device: torch.device | str,
) -> PackedKV:
    """Uninitialised buffers in the packed layout (the pre-pass writes every row it owns)."""
    if num_rows % KV_BLOCK:
        raise ValueError(f"sage_attn: packed rows must be a multiple of {KV_BLOCK}")
    if pv.v_token_major:
        v = torch.empty((num_kv_heads, head_dim_v, num_rows), dtype=pv.v_dtype, device=device)
    else:
        v = torch.empty((num_kv_heads, num_rows, head_dim_v), dtype=pv.v_dtype, device=device)
    return PackedKV(
        pv=pv,
        k_int8=torch.empty((num_kv_heads, num_rows, head_dim), dtype=torch.int8, device=device),
        k_scale=torch.empty(
            (num_kv_heads, num_rows // KV_BLOCK), dtype=torch.float32, device=device
        ),
        v=v,
        v_scale=torch.empty(
            (batch_size, num_kv_heads, head_dim_v), dtype=torch.float32, device=device
        ),
    )


def packed_kv_workspace(
    workspace: PackedKV | None,
    *,
    num_prefix_slots: int,
    k: torch.Tensor,
    v: torch.Tensor,
    batch_size: int,
    pv: PV,
) -> PackedKV:
    """A pre-pass workspace for a call with new ``k`` [N, Hkv, D] / ``v`` [N, Hkv, Dv]:
    ``workspace`` when it fits (one allocation serves every layer of a batch), else a
    new one."""
    rows = packed_len(num_prefix_slots, k.shape[0], batch_size)
    shape = (rows, batch_size, k.shape[1], k.shape[2], v.shape[2], pv)
    if workspace is not None and workspace.matches(*shape):
        return workspace
    return allocate_packed_kv(*shape, device=k.device)


def segment_starts(qo_indptr: torch.Tensor, kv_indptr: torch.Tensor) -> list[int]:
    """Host twin of ``segment_start`` for every request (reads the index pointers)."""
    qo, kv = qo_indptr.tolist(), kv_indptr.tolist()
    return [KV_BLOCK * ((kv[b] + qo[b]) // KV_BLOCK + b) for b in range(len(qo) - 1)]


@triton.jit
def segment_start(qo_indptr, kv_indptr, b, KV_BLOCK: tl.constexpr):
    """First packed row of request b (see the module docstring)."""
    start = tl.load(kv_indptr + b).to(tl.int64) + tl.load(qo_indptr + b).to(tl.int64)
    return KV_BLOCK * (start // KV_BLOCK + b)


@triton.jit
def request_bounds(qo_indptr, kv_indptr, b):
    """Request b's cached prefix (start in kv_indices, length) and chunk (start row, length)."""
    prefix_start = tl.load(kv_indptr + b).to(tl.int64)
    prefix_len = tl.load(kv_indptr + b + 1).to(tl.int64) - prefix_start
    extend_start = tl.load(qo_indptr + b).to(tl.int64)
    extend_len = tl.load(qo_indptr + b + 1).to(tl.int64) - extend_start
    return prefix_start, prefix_len, extend_start, extend_len
