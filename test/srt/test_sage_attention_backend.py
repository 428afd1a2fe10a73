"""SageAttentionBackend through SGLang's own attention test kit.

The kit builds the backend exactly as SGLang does (``ATTENTION_BACKENDS[name](runner)``
on a runner with real pools and scrambled slot layouts) and checks it against its
fp32 reference with its own tolerance (atol = rtol = 3e-2, on the output projection).
Here that runs for ``sage_attn`` on every dense case, every slot layout and both
P·V precisions, with the short-chunk crossover at 0 so the kit's few-token chunks
really take the 8-bit path (a call counter proves it).
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from sage_attention_inputs import DEVICE, requires_kernels
from sage_attention_kit import BACKEND, KIT_DTYPE, KitTestCase, sage_calls_fixture  # noqa: F401

import sglang.srt.layers.attention.sage_attention_backend as backend_module
from sglang.srt.layers.attention.sage_attention_backend import (
    SageAttentionBackend,
    heads_per_rank,
)
from sglang.srt.model_executor.forward_batch_info import ForwardMode
from sglang.test.kits.attention_unittest.attention_methods import dense_attention as kit
from sglang.test.kits.attention_unittest.runner_modes.cuda_graph_decode_runner import (
    run_dense_cuda_graph_decode_case,
)

LAYOUTS = ("contiguous", "shuffled_pages", "interleaved_pages", "non_monotonic_extend")
DENSE_CASES = kit.make_dense_input_config_cases(BACKEND) + kit.make_dense_attention_config_cases(
    BACKEND
)
SWA_CASES = kit.make_swa_no_prefix_input_config_cases(
    BACKEND
) + kit.make_swa_prefix_input_config_cases(BACKEND)


def _case_id(case):
    return case.name


@pytest.mark.skipif(**requires_kernels)
@pytest.mark.parametrize("pv", ["fp16", "fp8"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", DENSE_CASES, ids=_case_id)
def test_kit_dense_cases(case, layout, pv, sage_calls, monkeypatch):
    monkeypatch.setenv("SGLANG_SAGE_ATTN_PV", pv)
    with torch.no_grad():
        kit.run_dense_attention_case(
            KitTestCase(), case, head_dim=64, dtype=KIT_DTYPE, device=DEVICE, loc_layout=layout
        )
    if case.forward_mode == ForwardMode.EXTEND:
        assert sage_calls == [pv], "the extend case did not run on the sage kernel"
    else:
        assert sage_calls == [], "decode must run on the Triton decode kernel"


@pytest.mark.skipif(**requires_kernels)
@pytest.mark.parametrize("case", SWA_CASES, ids=_case_id)
def test_kit_sliding_window_cases_are_delegated(case, sage_calls):
    with torch.no_grad():
        kit.run_dense_attention_case(
            KitTestCase(), case, head_dim=64, dtype=KIT_DTYPE, device=DEVICE
        )
    assert sage_calls == []


@pytest.mark.skipif(**requires_kernels)
@pytest.mark.parametrize(
    "case", [c for c in DENSE_CASES if c.forward_mode.is_decode()], ids=_case_id
)
def test_kit_cuda_graph_decode_replay_matches_eager(case, sage_calls):
    with torch.no_grad():
        run_dense_cuda_graph_decode_case(
            KitTestCase(), case, head_dim=64, dtype=KIT_DTYPE, device=DEVICE
        )


def _fixture(case, head_dim, layout="shuffled_pages"):
    with torch.no_grad():
        return kit.build_dense_attention_fixture(
            KitTestCase(), case, head_dim=head_dim, dtype=KIT_DTYPE, device=DEVICE,
            loc_layout=layout,
        )  # fmt: skip


def _run_with(fixture, backend):
    """One eager forward of the fixture's batch through ``backend``, on fresh cache state."""
    with torch.no_grad():
        fresh = kit.build_dense_attention_fixture(
            KitTestCase(), fixture.case, head_dim=fixture.actual_module.head_dim,
            dtype=KIT_DTYPE, device=DEVICE,
        )  # fmt: skip
        kit.replace_backend(fresh, backend(fresh.runner))
        return kit.run_dense_fixture_eager(fresh)


@pytest.mark.skipif(**requires_kernels)
def test_delegated_layer_logs_its_reason_once_and_matches_triton(sage_calls, caplog):
    """Head dim 16 has no sage kernel: the layer runs on Triton, bit for bit."""
    case = next(c for c in DENSE_CASES if c.name == "mha_extend_page_size_1")
    with torch.no_grad():
        fixture = _fixture(case, head_dim=16)
        triton = _run_with(fixture, backend_module.TritonAttnBackend)
        sage_backend = SageAttentionBackend(fixture.runner)
        kit.replace_backend(fixture, sage_backend)
        with caplog.at_level(logging.INFO, logger=backend_module.__name__):
            first = kit.run_dense_fixture_eager(fixture)
            second = kit.run_dense_fixture_eager(fixture)
    assert sage_calls == []
    assert torch.equal(first, triton) and torch.equal(second, triton)
    reasons = [r.getMessage() for r in caplog.records if "running on the Triton" in r.getMessage()]
    assert len(reasons) == 1 and "head dim qk=16" in reasons[0], reasons


@pytest.mark.skipif(**requires_kernels)
def test_short_chunks_take_the_bf16_path(monkeypatch, sage_calls):
    monkeypatch.setenv("SGLANG_SAGE_ATTN_MIN_EXTEND_LEN", "64")
    case = next(c for c in DENSE_CASES if c.name == "mha_extend_page_size_1")
    with torch.no_grad():
        kit.run_dense_attention_case(
            KitTestCase(), case, head_dim=64, dtype=KIT_DTYPE, device=DEVICE
        )
    assert sage_calls == []


def test_speculative_modes_are_delegated():
    backend = object.__new__(SageAttentionBackend)
    backend.settings = backend_module.SageAttnSettings(min_extend_len=0)
    backend.decode_context_parallel = False
    backend.triton_backend = type("T", (), {})()
    backend.triton_backend.forward_metadata = type(
        "M",
        (),
        dict(
            qo_indptr=None, kv_indptr=None, kv_indices=None, max_extend_len=8,
            swa_out_cache_loc=None,
        ),
    )()  # fmt: skip
    for mode in (ForwardMode.TARGET_VERIFY, ForwardMode.DRAFT_EXTEND_V2, ForwardMode.DLLM_EXTEND):
        assert mode.name in backend._plan(mode).delegate_reason
    for mode in (ForwardMode.EXTEND, ForwardMode.MIXED):
        assert backend._plan(mode).delegate_reason is None


def _granite_config(tmp_path, num_heads, num_kv_heads):
    from sglang.srt.configs.model_config import ModelConfig

    config = dict(
        architectures=["GraniteForCausalLM"], model_type="granite", hidden_size=4096,
        intermediate_size=8192, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        num_hidden_layers=1, vocab_size=256, max_position_embeddings=4096,
    )  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    return ModelConfig(model_path=str(tmp_path))


@pytest.mark.parametrize("tp_size", [1, 2, 4, 8])
@pytest.mark.parametrize("num_kv_heads", [8, 2])
def test_heads_per_rank(tp_size, num_kv_heads, tmp_path):
    """SGLang's own ModelConfig (an 8B shape: 32 query heads) split over TP ranks."""
    q_heads, kv_heads = heads_per_rank(_granite_config(tmp_path, 32, num_kv_heads), tp_size)
    assert q_heads == 32 // tp_size
    # Fewer KV heads than ranks: each rank keeps (a replica of) one.
    assert kv_heads == max(1, num_kv_heads // tp_size)
