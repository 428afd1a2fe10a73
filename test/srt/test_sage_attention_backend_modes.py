"""SageAttentionBackend in the modes it delegates or shares with SGLang's runners.

Speculative decoding (TARGET_VERIFY, DRAFT_EXTEND_V2, their CUDA-graph capture and
replay) and decode graphs run on the base backend (Triton on a machine without a
GPU), so the sage kernel must not run there (a call counter checks it) and every
hook a speculative worker or graph runner calls must be the base's. Prefill CUDA graphs (breakable,
the 0.5.23 CUDA default, and torch.compile piecewise) run the sage kernel inside
the graph's eager attention region. Settings a device cannot run are refused when
the backend is built.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from sage_attention_inputs import DEVICE, requires_kernels
from sage_attention_kit import BACKEND, KIT_DTYPE, KitTestCase, sage_calls_fixture  # noqa: F401

import sglang.srt.layers.attention.sage_attention_backend as backend_module
from sglang.srt.layers.attention.sage_attention.settings import SageAttnSettings
from sglang.srt.layers.attention.sage_attention_backend import (
    BaseHook,
    SageAttentionBackend,
)
from sglang.srt.model_executor.forward_batch_info import ForwardMode
from sglang.test.kits.attention_unittest.attention_methods import dense_attention as kit
from sglang.test.kits.attention_unittest.runner_modes import (
    speculative_draft_extend_runner,
    speculative_target_verify_runner,
    split_op_runner,
)

HEAD_DIM = 64  # a head dim the sage kernel has (the kit's default, 16, is delegated)
KIT = dict(head_dim=HEAD_DIM, dtype=KIT_DTYPE, device=DEVICE)


def _case(name, mode, prefix_lens, extend_lens):
    return kit.DenseAttentionCase(
        name=name, backend=BACKEND, forward_mode=mode, num_heads=4, num_kv_heads=2,
        page_size=1, prefix_lens=prefix_lens, extend_lens=extend_lens,
    )  # fmt: skip


# Draft length 3: the kit's tree mask for topk > 1 has three draft tokens.
VERIFY = _case("gqa_target_verify", ForwardMode.TARGET_VERIFY, (5, 17), (3, 3))
DRAFT_EXTEND = _case("gqa_draft_extend_v2", ForwardMode.DRAFT_EXTEND_V2, (6, 11), (2, 2))
# The kit's extend cases (ragged, page edges, cached prefixes) at head dim 64.
EXTEND_CASES = [c for c in kit.make_dense_input_config_cases(BACKEND) if c.forward_mode.is_extend()]
RAGGED = next(c for c in EXTEND_CASES if c.name == "mha_extend_ragged_page_boundary")


# ---- speculative decoding: delegated to the base, with the base's hooks --------------


@pytest.mark.skipif(**requires_kernels)
@pytest.mark.parametrize("topk", [1, 2])
def test_target_verify_runs_on_the_base(topk, sage_calls):
    with torch.no_grad():
        speculative_target_verify_runner.run_dense_spec_verify_case(
            KitTestCase(), VERIFY, topk=topk, **KIT
        )
    assert sage_calls == [], "TARGET_VERIFY is delegated to the base: the sage kernel must not run"


def _verify_graph_runner_error(case, topk) -> str | None:
    """The kit's speculative CUDA-graph runner on ``case``: None, or its assertion."""
    try:
        with torch.no_grad():
            speculative_target_verify_runner.run_dense_spec_verify_cuda_graph_case(
                KitTestCase(), case, topk=topk, **KIT
            )
    except AssertionError as exc:
        return str(exc)
    return None


@pytest.mark.skipif(**requires_kernels)
@pytest.mark.parametrize("topk", [1, 2])
def test_target_verify_cuda_graph_runner_matches_the_base(topk, sage_calls):
    """The kit's speculative CUDA-graph runner (graph state, capture/replay metadata,
    a padded replay batch) behaves for sage_attn exactly as for its base backend,
    whose hooks sage forwards. On the H200 (2026-11-30) the runner's eager leg missed
    the kit's tolerance for sage_attn on a Triton base; under the CPU interpreter it
    misses it for ``triton`` too, with the same mismatch report, so the runner is
    held to parity with the base here, not to its own tolerance."""
    base = _built_backend().base_choice.name
    sage_error = _verify_graph_runner_error(VERIFY, topk)
    assert sage_calls == [], "TARGET_VERIFY graphs run on the base: the sage kernel must not run"
    base_error = _verify_graph_runner_error(dataclasses.replace(VERIFY, backend=base), topk)
    # Same outputs give the same verdict, and the same mismatch report if both miss.
    assert sage_error == base_error, (sage_error, base_error)
    if base_error is not None:
        pytest.xfail(f"the kit's runner misses its own tolerance for SGLang's {base} too")


@pytest.mark.skipif(**requires_kernels)
@pytest.mark.parametrize("pad_style", ["small_real", "prod_fill"])
def test_draft_extend_cuda_graph_runs_on_the_base(pad_style, sage_calls):
    with torch.no_grad():
        speculative_draft_extend_runner.run_dense_draft_extend_v2_cuda_graph_case(
            KitTestCase(), DRAFT_EXTEND, pad_style=pad_style, **KIT
        )
    assert sage_calls == [], "DRAFT_EXTEND_V2 runs on the base: the sage kernel must not run"


def _built_backend():
    with torch.no_grad():
        fixture = kit.build_dense_attention_fixture(KitTestCase(), VERIFY, **KIT)
    assert isinstance(fixture.backend, SageAttentionBackend)
    return fixture.backend


def test_speculative_and_graph_hooks_are_the_base_backends():
    backend = _built_backend()
    base = backend.base
    backend.init_cuda_graph_state(max_bs=4, max_num_tokens=12)
    hooks = [
        name for name, value in vars(SageAttentionBackend).items() if isinstance(value, BaseHook)
    ]
    assert {"verify_mask", "update_verify_buffers_to_fill_after_draft", "max_context_len",
            "glue_target_verify_metadata", "glue_draft_metadata"} <= set(hooks)  # fmt: skip
    for name in hooks:
        if not hasattr(base, name):
            continue  # a hook this base does not have (its "supports_*" flag says so)
        ours, theirs = getattr(backend, name), getattr(base, name)
        if callable(theirs):
            assert ours.__func__ is theirs.__func__ and ours.__self__ is base, name
        else:
            assert ours is theirs, name
    # The tree mask the draft stage fills must be the buffer the base's verify reads.
    assert backend.verify_mask is base.verify_mask
    assert backend.max_context_len == base.max_context_len


def test_host_length_flags_and_fill_value_are_the_bases():
    backend = _built_backend()
    for name in ("needs_cpu_seq_lens", "extend_dummy_seqs_capped_by_req_pool"):
        assert getattr(backend, name) == getattr(backend.base, name), name
    assert backend.get_cuda_graph_seq_len_fill_value() == (
        backend.base.get_cuda_graph_seq_len_fill_value()
    )


# ---- prefill CUDA graphs: the sage kernel inside the graph's eager region ------------


SPLIT_OP_RUNS = [(case, False) for case in EXTEND_CASES] + [(RAGGED, True)]


@pytest.mark.skipif(**requires_kernels)
@pytest.mark.parametrize("breakable", [True, False], ids=["breakable", "piecewise"])
@pytest.mark.parametrize(
    "case, padded", SPLIT_OP_RUNS, ids=[c.name + ("_padded" if p else "") for c, p in SPLIT_OP_RUNS]
)
def test_prefill_graph_split_op_runs_sage(case, padded, breakable, sage_calls, monkeypatch):
    """The kit's split-op runner: an eager leg, then the graph leg on a static
    (optionally padded) batch, each checked against the reference and each other."""
    wrote_in_place = []
    real_forward_extend = SageAttentionBackend.forward_extend

    def forward_extend(self, q, k, v, layer, forward_batch, *args, **kwargs):
        given = forward_batch._attn_output
        o = real_forward_extend(self, q, k, v, layer, forward_batch, *args, **kwargs)
        wrote_in_place.append(given is not None and o.data_ptr() == given.data_ptr())
        return o

    monkeypatch.setattr(SageAttentionBackend, "forward_extend", forward_extend)
    static_num_tokens = case.num_input_tokens + (5 if padded else 0)
    with torch.no_grad():
        split_op_runner.run_dense_split_op_extend_case(
            KitTestCase(), case, breakable=breakable, static_num_tokens=static_num_tokens, **KIT
        )
    assert sage_calls == ["fp16", "fp16"], "the eager and the graph leg must both run sage"
    # The graph leg hands in its output rows (forward_batch._attn_output) when the
    # graph is breakable or the batch padded; sage fills them in place, as Triton does.
    assert wrote_in_place == [False, breakable or padded]


# ---- settings a device cannot run: refused at start-up -------------------------------


@pytest.mark.parametrize(
    "capability, refused", [((8, 0), True), ((8, 6), True), ((8, 9), False), ((9, 0), False)]
)
def test_fp8_pv_needs_fp8_tensor_cores(capability, refused, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    settings = SageAttnSettings(pv="fp8")
    if refused:
        with pytest.raises(ValueError, match=r"SGLANG_SAGE_ATTN_PV=fp8 needs FP8 tensor cores"):
            settings.check_device("cuda")
    else:
        settings.check_device("cuda")
    SageAttnSettings(pv="fp16").check_device("cuda")  # fp16 runs everywhere
    SageAttnSettings(pv="fp8").check_device("cpu")  # the interpreter emulates FP8


def test_backend_refuses_fp8_pv_on_an_a100_when_built(monkeypatch):
    """Refused in ``__init__``, before any batch: the server fails at start-up."""
    with torch.no_grad():
        fixture = kit.build_dense_attention_fixture(KitTestCase(), RAGGED, **KIT)
    fixture.runner.device = "cuda"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(backend_module, "build_base_backend", None)  # never reached
    monkeypatch.setenv("SGLANG_SAGE_ATTN_PV", "fp8")
    with pytest.raises(ValueError, match="sm_80"):
        SageAttentionBackend(fixture.runner)


@pytest.mark.parametrize(
    "environ, field, value",
    [
        ({}, "qk_rotation", "auto"),
        ({"SGLANG_SAGE_ATTN_QK_ROTATION": "none"}, "qk_rotation", "none"),
        ({"SGLANG_SAGE_ATTN_QK_ROTATION": "Hadamard"}, "qk_rotation", "hadamard"),
        ({"SGLANG_SAGE_ATTN_PV": "INT8"}, "pv", "int8"),
        ({}, "decode_max_splits", 64),
        ({"SGLANG_SAGE_ATTN_DECODE_MAX_SPLITS": "0"}, "decode_max_splits", 0),
        ({}, "min_extend_len", "auto"),  # the measured crossover (crossover.py)
        ({"SGLANG_SAGE_ATTN_MIN_EXTEND_LEN": "OFF"}, "min_extend_len", "off"),
        ({"SGLANG_SAGE_ATTN_MIN_EXTEND_LEN": "4096"}, "min_extend_len", 4096),
        ({}, "base_backend", "auto"),
        ({"SGLANG_SAGE_ATTN_BASE_BACKEND": "FA4"}, "base_backend", "fa4"),
    ],
)
def test_settings_from_environment(environ, field, value):
    assert getattr(SageAttnSettings.from_env(environ), field) == value


@pytest.mark.parametrize(
    "environ, message",
    [
        ({"SGLANG_SAGE_ATTN_QK_ROTATION": "random"}, "SGLANG_SAGE_ATTN_QK_ROTATION='random'"),
        ({"SGLANG_SAGE_ATTN_PV": "int4"}, "SGLANG_SAGE_ATTN_PV='int4'"),
        ({"SGLANG_SAGE_ATTN_DECODE_MAX_SPLITS": "x"}, "SGLANG_SAGE_ATTN_DECODE_MAX_SPLITS='x'"),
        ({"SGLANG_SAGE_ATTN_MIN_EXTEND_LEN": "-1"}, "SGLANG_SAGE_ATTN_MIN_EXTEND_LEN=-1"),
        ({"SGLANG_SAGE_ATTN_MIN_EXTEND_LEN": "long"}, "SGLANG_SAGE_ATTN_MIN_EXTEND_LEN='long'"),
    ],
)
def test_invalid_settings_are_refused_with_the_variable_named(environ, message):
    with pytest.raises(ValueError, match=message):
        SageAttnSettings.from_env(environ)


@pytest.mark.parametrize(
    "rotation, head_dim, want",
    [("auto", 64, True), ("auto", 128, False), ("none", 64, False), ("hadamard", 128, True)],
)
def test_rotation_per_head_dim(rotation, head_dim, want):
    assert SageAttnSettings(qk_rotation=rotation).rotate_qk(head_dim) is want


@pytest.mark.parametrize(
    "cap, split_tile_size, static, sglang_cap, want",
    [
        (64, None, False, 8, 64),  # raised above SGLang's default
        (64, None, False, 128, 128),  # a larger --triton-attention-num-kv-splits stays
        (4, None, False, 8, 8),  # a lower one too
        (0, None, False, 8, 8),  # 0: SGLang's own cap
        (64, 256, False, 40, 40),  # deterministic inference sizes splits from its tile
        (64, None, True, 8, 8),  # static splits would give every request the cap
    ],
)
def test_decode_split_cap(cap, split_tile_size, static, sglang_cap, want):
    triton = SimpleNamespace(
        max_kv_splits=sglang_cap, split_tile_size=split_tile_size, static_kv_splits=static
    )
    backend_module.raise_decode_split_cap(triton, cap)
    assert triton.max_kv_splits == want


def test_backend_raises_the_decode_split_cap(monkeypatch):
    """Built by SGLang's kit on a Triton base, the backend's Triton decode has the
    raised cap before any decode buffer is sized."""
    monkeypatch.setenv("SGLANG_SAGE_ATTN_BASE_BACKEND", "triton")
    with torch.no_grad():
        fixture = kit.build_dense_attention_fixture(KitTestCase(), RAGGED, **KIT)
    backend = SageAttentionBackend(fixture.runner)
    assert backend.base.max_kv_splits == 64


@pytest.mark.skipif(**requires_kernels)
@pytest.mark.parametrize(
    "rotation, want",
    [("hadamard", True), ("none", False), ("auto", KIT["head_dim"] <= 64)],
)
def test_backend_passes_the_rotation_setting_to_the_op(sage_calls, monkeypatch, rotation, want):
    """What the op is told per layer: the setting, resolved for the layer's head dim."""
    monkeypatch.setenv("SGLANG_SAGE_ATTN_QK_ROTATION", rotation)
    seen = []
    real = backend_module.sage_extend_attention

    def spy(*args, **kwargs):
        seen.append(kwargs["rotate_qk"])
        return real(*args, **kwargs)

    monkeypatch.setattr(backend_module, "sage_extend_attention", spy)
    with torch.no_grad():
        kit.run_dense_attention_case(KitTestCase(), RAGGED, **KIT)
    assert seen and all(rotate is want for rotate in seen)
