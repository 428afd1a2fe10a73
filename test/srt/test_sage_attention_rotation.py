"""rotation.py: the in-register Hadamard matrix and the row rotation, against torch."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from sage_attention_inputs import DEVICE, requires_kernels

from sglang.srt.layers.attention.sage_attention.rotation import (
    hadamard_matrix,
    hadamard_tile,
    rotate_rows,
)


@triton.jit
def _rotate_kernel(x, out, h_out, ROWS: tl.constexpr, DIM: tl.constexpr):
    offs = tl.arange(0, ROWS)[:, None] * DIM + tl.arange(0, DIM)[None, :]
    tl.store(out + offs, rotate_rows(tl.load(x + offs), hadamard_tile(DIM, x.dtype.element_ty)))
    square = tl.arange(0, DIM)[:, None] * DIM + tl.arange(0, DIM)[None, :]
    tl.store(h_out + square, hadamard_tile(DIM, tl.float32))


def test_hadamard_matrix_is_orthogonal_up_to_its_dim():
    for dim in (16, 64, 128):
        h = hadamard_matrix(dim, dtype=torch.float64)
        assert torch.equal(h @ h.T, dim * torch.eye(dim, dtype=torch.float64))
        assert set(h.unique().tolist()) == {-1.0, 1.0}


@pytest.mark.skipif(**requires_kernels)
@pytest.mark.parametrize("dim", [64, 128])
def test_kernel_tile_and_rotation_match_torch(dim):
    """The in-kernel matrix is the host one, and rows of 16-bit values rotate to fp32
    rounding (exact ±1 products, fp32 sums), large values included."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(32, dim, generator=gen) * 100).to(torch.float16)
    x[0, :4] = 60000.0
    out = torch.empty(32, dim, device=DEVICE)
    h = torch.empty(dim, dim, device=DEVICE)
    _rotate_kernel[(1,)](x.to(DEVICE), out, h, ROWS=32, DIM=dim)
    want_h = hadamard_matrix(dim)
    assert torch.equal(h.cpu(), want_h)
    want = (x.double() @ want_h.double()).float()
    torch.testing.assert_close(out.cpu(), want, rtol=1e-5, atol=0)
