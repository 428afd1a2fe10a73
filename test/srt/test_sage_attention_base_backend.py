"""Which SGLang backend sage_attn composes with (``base_backend.py``), for every kind of
server: a table of facts and the choice SGLang's own default would make there, minus
what does not load."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from sage_attention_inputs import DEVICE
from sage_attention_kit import BACKEND, KIT_DTYPE, KitTestCase

from sglang.srt.layers.attention.sage_attention.base_backend import (
    BaseFacts,
    build_base_backend,
    choose_base_backend,
    flash_version,
)
from sglang.srt.layers.attention.sage_attention_backend import SageAttentionBackend
from sglang.srt.layers.attention.triton_backend import TritonAttnBackend
from sglang.srt.model_executor.forward_batch_info import ForwardMode
from sglang.test.kits.attention_unittest.attention_methods import dense_attention as kit

HOPPER = BaseFacts(
    is_cuda=True, capability=(9, 0), page_size=1, spec_allows_fa=True,
    has_attention_sinks=False, asymmetric_kv=False, kv8_cache=False,
    fa3_missing=None, fa4_missing=None, flashinfer_missing=None,
)  # fmt: skip
NO_FA3 = "ImportError: Can not import FA3 in sgl_kernel"


def _facts(**changes) -> BaseFacts:
    return dataclasses.replace(HOPPER, **changes)


@pytest.mark.parametrize(
    "facts, want",
    [
        (_facts(), "fa3"),  # SGLang's Hopper default
        (_facts(fa3_missing=NO_FA3), "fa4"),  # the GPU image here: sgl-kernel does not load
        (_facts(fa3_missing=NO_FA3, fa4_missing="no cutlass"), "flashinfer"),
        (_facts(fa3_missing=NO_FA3, fa4_missing="x", flashinfer_missing="x"), "triton"),
        (_facts(spec_allows_fa=False), "flashinfer"),  # EAGLE top-k > 1: no FA, as SGLang
        (_facts(capability=(10, 0), page_size=64), "trtllm_mha"),
        (_facts(capability=(10, 0), page_size=1), "flashinfer"),  # trtllm_mha: pages of 16-128
        (_facts(capability=(10, 0), page_size=128, asymmetric_kv=True), "fa4"),
        (_facts(capability=(10, 0), page_size=1, asymmetric_kv=True), "flashinfer"),
        (_facts(capability=(12, 0)), "flashinfer"),
        (_facts(capability=(8, 0)), "flashinfer"),
        (_facts(capability=(8, 0), has_attention_sinks=True), "triton"),
        (_facts(is_cuda=False, capability=None), "triton"),
        (_facts(kv8_cache=True), "triton"),  # the 8-bit cache decodes on Triton's metadata
    ],
)
def test_choice(facts, want):
    choice = choose_base_backend(facts)
    assert choice.name == want, choice.reason
    assert choice.reason


def test_the_reason_says_why_fa3_was_passed_over():
    reason = choose_base_backend(_facts(fa3_missing=NO_FA3)).reason
    assert "FlashAttention-3 does not load" in reason and NO_FA3 in reason


def test_override():
    assert choose_base_backend(HOPPER, "triton").name == "triton"
    assert choose_base_backend(HOPPER, "fa4").reason == "SGLANG_SAGE_ATTN_BASE_BACKEND=fa4"
    with pytest.raises(ValueError, match="its own base"):
        choose_base_backend(HOPPER, "sage_attn")
    with pytest.raises(ValueError, match="KV_CACHE=int8"):
        choose_base_backend(_facts(kv8_cache=True), "fa4")


def _fixture():
    case = kit.DenseAttentionCase(
        name="extend", backend=BACKEND, forward_mode=ForwardMode.EXTEND, num_heads=4,
        num_kv_heads=2, page_size=1, prefix_lens=(4,), extend_lens=(8,),
    )  # fmt: skip
    with torch.no_grad():
        return kit.build_dense_attention_fixture(
            KitTestCase(), case, head_dim=64, dtype=KIT_DTYPE, device=DEVICE
        )


def test_unknown_base_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="not an SGLang attention backend.*triton"):
        build_base_backend(_fixture().runner, override="no_such_backend", kv8_cache=False)


def test_the_start_up_log_names_the_base_and_why(caplog, monkeypatch):
    monkeypatch.delenv("SGLANG_SAGE_ATTN_BASE_BACKEND", raising=False)
    runner = _fixture().runner
    with caplog.at_level(logging.INFO):
        backend = SageAttentionBackend(runner)
    line = next(r.getMessage() for r in caplog.records if "SageAttentionBackend:" in r.getMessage())
    if not torch.cuda.is_available():
        assert isinstance(backend.base, TritonAttnBackend)
        assert "base backend triton (no CUDA GPU)" in line
    assert "8-bit kernel for chunks of" in line


@pytest.mark.parametrize(
    "capability, fa3, fa4, want",
    [
        ((9, 0), None, None, 3),
        ((9, 0), "ImportError", None, 4),
        ((10, 0), None, None, 4),  # FA3 is Hopper-only
        ((9, 0), "ImportError", "ImportError", None),
        ((8, 9), None, None, None),
        (None, None, None, None),
    ],
)
def test_flash_version_follows_the_gpu_and_what_loads(capability, fa3, fa4, want):
    ver, why = flash_version(capability, fa3, fa4)
    assert ver == want and why
