"""kv8_tiles.py: the INT8 -> fp16 conversion the 8-bit cache's P·V runs on.

Every one of the 256 INT8 values, in every position of a packed group of four (the
PTX path converts four per instruction group), must come out exactly as torch's
cast. On a GPU that is the PTX path; under the CPU interpreter, which runs no inline
assembly, the plain cast the kernels fall back to (``fast_int8_cvt``).
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from sage_attention_inputs import DEVICE, requires_kernels

from sglang.srt.layers.attention.sage_attention.kv8_tiles import fast_int8_cvt, int8_to_fp16


@triton.jit
def _convert(src, dst, BLOCK: tl.constexpr, FAST: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst + offs, int8_to_fp16(tl.load(src + offs), FAST))


@pytest.mark.skipif(**requires_kernels)
def test_int8_to_fp16_is_exact_for_every_value_and_lane():
    values = torch.arange(-128, 128, dtype=torch.int16).to(torch.int8)
    # Each value at each of the four byte positions of a 32-bit register.
    src = torch.cat([values.roll(shift) for shift in range(4)]).to(DEVICE)
    dst = torch.empty(src.shape, dtype=torch.float16, device=DEVICE)
    _convert[(src.numel() // 256,)](src, dst, BLOCK=256, FAST=fast_int8_cvt())
    assert torch.equal(dst.cpu(), src.cpu().to(torch.float16))
