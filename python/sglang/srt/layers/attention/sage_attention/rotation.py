"""Optional Hadamard rotation of Q and K before their INT8 quantization.

For an orthogonal H, (q H)·(k H) = q·k, so attention is unchanged; but a few
large channels of q or k (which set the INT8 scale and leave the other channels
a handful of levels) are spread over all channels. On SmolLM2 this cut the error
of the INT8 Q·Kᵀ three-fold (benchmark/sage_attention/VALIDATION.md).

H is the Sylvester-Hadamard matrix, entries ±1 (H[i, j] = (-1)^popcount(i & j)),
built in registers by each program -- no tensor to allocate or capture. The
kernels multiply the fp16/bf16 rows by it on the tensor cores (±1 times a 16-bit
value is exact; the fp32 sum of at most 128 of them rounds at ~1e-7, far below the
INT8 step that follows), and fold the 1/D that makes H H = D·I into the query scale.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def hadamard_tile(DIM: tl.constexpr, dtype: tl.constexpr):
    """[DIM, DIM] Sylvester-Hadamard matrix (±1) in ``dtype``; DIM a power of two <= 256."""
    bits = tl.arange(0, DIM)[:, None] & tl.arange(0, DIM)[None, :]
    # Parity of the common bits: fold 8 bits down to bit 0.
    bits = bits ^ (bits >> 4)
    bits = bits ^ (bits >> 2)
    bits = bits ^ (bits >> 1)
    return (1 - 2 * (bits & 1)).to(dtype)


@triton.jit
def rotate_rows(x, hadamard):
    """x [rows, D] (values exact in the tile's dtype) -> x @ H in fp32 (unnormalised:
    x H H = D x). ``hadamard``: a ``hadamard_tile``, built once outside any key loop."""
    return tl.dot(x.to(hadamard.dtype), hadamard, out_dtype=tl.float32)


def hadamard_matrix(dim: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """Host twin of ``hadamard_tile``: the same ±1 matrix [dim, dim]."""
    h = torch.ones(1, 1, dtype=dtype, device=device)
    while h.shape[0] < dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h
