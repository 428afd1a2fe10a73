"""Test setup shared by every sage_attn test.

1. Tests import this checkout, not a stale copy under site-packages: ``sglang``
   is a regular package but ``sglang.srt`` and below are namespace packages, so
   putting the checkout's ``python/sglang`` first on ``sglang.__path__`` makes
   every ``sglang.srt...sage_attention*`` import resolve here, while the rest of
   SGLang still comes from the installed wheel.
2. Under ``TRITON_INTERPRET=1`` the interpreter's fp32 -> e4m3 conversion
   truncates subnormals and drops the mantissa carry (triton 3.8
   ``interpreter._convert_float``), where the GPU's ``cvt.rn.satfinite`` rounds
   to nearest even. The CPU runs use torch's RTNE conversion instead, so the
   interpreter computes what the GPU computes and the FP8 P·V kernel can be held
   to the quantization twin as tightly as on the GPU. Kernel code is untouched.
3. Under the interpreter, a NumPy ``RuntimeWarning`` (``invalid value encountered in
   subtract``: an inf - inf or NaN inside a kernel) fails the tests of sage_attn's own
   kernels. The attention-kit tests are left alone: there the warning comes from
   SGLang's Triton decode kernel (``_fwd_grouped_kernel_stage1``), run as the base.
"""

from __future__ import annotations

import os
import pathlib
import warnings

import numpy as np
import pytest
import torch

import sglang

CHECKOUT_SGLANG = pathlib.Path(__file__).resolve().parents[2] / "python" / "sglang"
if str(CHECKOUT_SGLANG) not in sglang.__path__:
    sglang.__path__.insert(0, str(CHECKOUT_SGLANG))


def _patch_interpreter_fp8_rounding() -> None:
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter._convert_float
    numpy_float = {tl.float32: np.float32, tl.float16: np.float16}

    def convert_float(data, input_dtype, output_dtype, rounding_mode):
        if output_dtype == tl.float8e4nv and input_dtype in numpy_float:
            values = torch.from_numpy(
                np.ascontiguousarray(data).view(numpy_float[input_dtype]).astype(np.float32)
            )
            return values.to(torch.float8_e4m3fn).view(torch.uint8).numpy().reshape(data.shape)
        return original(data, input_dtype, output_dtype, rounding_mode)

    interpreter._convert_float = convert_float


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_interpreter_fp8_rounding()


# Test modules whose every kernel launch is sage_attn's own (point 3 above).
OWN_KERNEL_TESTS = {
    "test_sage_attention_extend",
    "test_sage_attention_extend_kv8",
    "test_sage_attention_interpreter_guard",
    "test_sage_attention_decode_kv8",
    "test_sage_attention_kv8_cache",
    "test_sage_attention_kv8_tiles",
    "test_sage_attention_quantize",
    "test_sage_attention_rotation",
}


@pytest.fixture(autouse=True)
def _own_kernels_raise_no_numpy_warning(request):
    if os.environ.get("TRITON_INTERPRET") != "1" or request.module.__name__ not in OWN_KERNEL_TESTS:
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        yield
