"""SGLang's attention test kit set up for sage_attn: shared by the backend tests."""

from __future__ import annotations

import pytest
import torch
from sage_attention_inputs import HAS_GPU

import sglang.srt.layers.attention.sage_attention_backend as backend_module
from sglang.srt.layers.attention.sage_attention import plugin
from sglang.test.kits.attention_unittest.attention_methods import dense_attention as kit

plugin.register()
BACKEND = plugin.BACKEND_NAME
KIT_DTYPE = torch.bfloat16 if HAS_GPU else torch.float16  # bf16 is broken in the interpreter


class KitTestCase:
    """What the kit expects of its ``testcase`` argument.

    The kit calls ``skipTest`` when building the backend raises (it expects a
    backend's optional dependencies to be missing); sage_attn has none, so a
    backend that does not build is a failure here, never a skip.
    """

    def skipTest(self, reason):  # noqa: N802 (unittest's name)
        pytest.fail(f"the attention kit could not run sage_attn: {reason}")


@pytest.fixture(name="sage_calls")
def sage_calls_fixture(monkeypatch):
    """The P·V mode of each sage kernel launch, with the short-chunk crossover at 0
    so the kit's few-token chunks go to sage. Import it into a test module to use it."""
    monkeypatch.setenv("SGLANG_SAGE_ATTN_MIN_EXTEND_LEN", "0")
    # sage_attn decodes with the Triton kernel, so the kit's SWA decode rule is Triton's.
    monkeypatch.setattr(
        kit, "_SWA_DECODE_MIN_SEQ_LEN_WINDOW", kit._SWA_DECODE_MIN_SEQ_LEN_WINDOW | {BACKEND}
    )
    calls = []
    real = backend_module.sage_extend_attention

    def counted(*args, **kwargs):
        calls.append(kwargs["pv"])
        return real(*args, **kwargs)

    # The backend takes the op when it is built, so patch before the kit builds it.
    monkeypatch.setattr(backend_module, "sage_extend_attention", counted)
    return calls
