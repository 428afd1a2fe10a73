"""conftest.py's guard: under the interpreter a kernel that computes inf - inf fails
the tests of sage_attn's own kernels instead of printing a RuntimeWarning."""

from __future__ import annotations

import os

import pytest
import torch
import triton
import triton.language as tl


@triton.jit
def _subtract_itself(x, out):
    value = tl.load(x)
    tl.store(out, value - value)


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="the guard is for the CPU interpreter"
)
def test_an_inf_minus_inf_in_a_kernel_fails_the_test():
    x = torch.tensor([float("inf")])
    with pytest.raises(Exception, match="invalid value encountered in subtract"):
        _subtract_itself[(1,)](x, torch.empty_like(x))
