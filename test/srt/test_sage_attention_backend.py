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
from types import SimpleNamespace

import pytest
import torch
from sage_attention_inputs import DEVICE, HAS_GPU, ExtendCase, make_extend_inputs, requires_kernels
from sage_attention_kit import BACKEND, KIT_DTYPE, KitTestCase, sage_calls_fixture  # noqa: F401

import sglang.srt.layers.attention.sage_attention_backend as backend_module
from sglang.srt.layers.attention.sage_attention import base_extend
from sglang.srt.layers.attention.sage_attention.base_backend import BaseChoice
from sglang.srt.layers.attention.sage_attention.settings import BASE_BACKEND_ENV
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
@pytest.mark.parametrize("pv", ["fp16", "fp8", "int8"])
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


def _fixture(case, head_dim, layout="shuffled_pages", max_context_len=kit.DEFAULT_MAX_CONTEXT_LEN):
    with torch.no_grad():
        return kit.build_dense_attention_fixture(
            KitTestCase(), case, head_dim=head_dim, dtype=KIT_DTYPE, device=DEVICE,
            loc_layout=layout, max_context_len=max_context_len,
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
def test_delegated_layer_logs_its_reason_once_and_matches_the_base(sage_calls, caplog):
    """Head dim 16 has no sage kernel: the layer runs on the base backend, bit for bit."""
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    case = next(c for c in DENSE_CASES if c.name == "mha_extend_page_size_1")
    with torch.no_grad():
        fixture = _fixture(case, head_dim=16)
        sage_backend = SageAttentionBackend(fixture.runner)
        base = _run_with(fixture, ATTENTION_BACKENDS[sage_backend.base_choice.name])
        kit.replace_backend(fixture, sage_backend)
        with caplog.at_level(logging.INFO, logger=backend_module.__name__):
            first = kit.run_dense_fixture_eager(fixture)
            second = kit.run_dense_fixture_eager(fixture)
    assert sage_calls == []
    assert torch.equal(first, base) and torch.equal(second, base)
    reasons = [r.getMessage() for r in caplog.records if "on the base backend" in r.getMessage()]
    assert len(reasons) == 1 and "head dim qk=16" in reasons[0], reasons


def _batch_counts(caplog) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if "on the 8-bit kernel so far" in r.getMessage()
    ]


@pytest.mark.skipif(**requires_kernels)
def test_sage_batches_are_counted_in_the_log(sage_calls, caplog):
    """A server log proves its path: batches on the 8-bit kernel are counted (1, 2, 4, ...),
    once per batch whatever its layer count; delegated batches are not."""
    case = next(c for c in DENSE_CASES if c.name == "mha_extend_page_size_1")
    with torch.no_grad():
        fixture = _fixture(case, head_dim=64)
        kit.replace_backend(fixture, SageAttentionBackend(fixture.runner))
        with caplog.at_level(logging.INFO, logger=backend_module.__name__):
            for _ in range(3):
                kit.run_dense_fixture_eager(fixture)
    assert len(sage_calls) >= 3
    assert _batch_counts(caplog) == [
        "sage_attn: 1 extend batches on the 8-bit kernel so far",
        "sage_attn: 2 extend batches on the 8-bit kernel so far",
    ]


@pytest.mark.skipif(**requires_kernels)
def test_short_chunks_take_the_bf16_path(monkeypatch, sage_calls, caplog):
    monkeypatch.setenv("SGLANG_SAGE_ATTN_MIN_EXTEND_LEN", "64")
    case = next(c for c in DENSE_CASES if c.name == "mha_extend_page_size_1")
    with torch.no_grad(), caplog.at_level(logging.INFO, logger=backend_module.__name__):
        kit.run_dense_attention_case(
            KitTestCase(), case, head_dim=64, dtype=KIT_DTYPE, device=DEVICE
        )
    assert sage_calls == []
    assert _batch_counts(caplog) == []


def _triton_base(**forward_metadata):
    """A Triton base backend holding only a batch's extend metadata (bare-backend tests)."""
    base = object.__new__(backend_module.TritonAttnBackend)
    base.forward_metadata = SimpleNamespace(**forward_metadata)
    return base


def _bare_plan_backend(min_extend_len, page_size=1):
    """A SageAttentionBackend with just what ``_plan`` reads, on a Triton base."""
    backend = object.__new__(SageAttentionBackend)
    backend.min_extend_len = min_extend_len
    backend.decode_context_parallel = False
    backend.base_choice = BaseChoice("triton", "a test's bare backend")
    backend.base_subset_kernel = base_extend.TritonKernelOnSubset(page_size)
    return backend


def _bare_batch(mode, extend_lens, prefix_lens):
    return SimpleNamespace(
        forward_mode=mode, extend_seq_lens_cpu=list(extend_lens),
        extend_prefix_lens_cpu=list(prefix_lens), out_cache_loc=None, _attn_output=None,
    )  # fmt: skip


def test_speculative_modes_are_delegated():
    backend = _bare_plan_backend(min_extend_len=0)
    backend.base = _triton_base(
        qo_indptr=torch.tensor([0, 8], dtype=torch.int32),
        kv_indptr=torch.tensor([0, 0], dtype=torch.int32),
        kv_indices=torch.zeros(0, dtype=torch.int64),
    )
    for mode in (ForwardMode.TARGET_VERIFY, ForwardMode.DRAFT_EXTEND_V2, ForwardMode.DLLM_EXTEND):
        assert mode.name in backend._plan(_bare_batch(mode, [8], [0])).delegate_reason
    for mode in (ForwardMode.EXTEND, ForwardMode.MIXED):
        plan = backend._plan(_bare_batch(mode, [8], [0]))
        assert plan.delegate_reason is None and plan.sage.batch_size == 1 and plan.base is None


def test_no_crossover_delegates_every_extend():
    """Where the 8-bit kernel never won against the base (crossover None), every extend
    batch runs on the base, whatever its chunk lengths."""
    backend = _bare_plan_backend(min_extend_len=None)
    plan = backend._plan(_bare_batch(ForwardMode.EXTEND, [32768], [0]))
    assert plan.sage is None and "off for this model" in plan.delegate_reason


def test_a_batch_of_short_chunks_is_planned_from_host_lengths_alone():
    """No request reaches the crossover: the batch is delegated before any index is
    built (a base without extend metadata is never asked for it)."""
    backend = _bare_plan_backend(min_extend_len=16384)
    backend.base = object()
    plan = backend._plan(_bare_batch(ForwardMode.EXTEND, [8192, 1024], [24576, 0]))
    assert plan.sage is None and "shorter than 16384" in plan.delegate_reason


@pytest.fixture
def kernel_calls(monkeypatch, sage_calls):
    """Requests per launch of each kernel: the sage op and the Triton base's extend kernel
    on a batch's short requests (the base is pinned to Triton: where FA3/FA4 load, the
    backend would pick them and these counts would miss their launches)."""
    monkeypatch.setenv(BASE_BACKEND_ENV, "triton")
    calls = {"sage": [], "base": []}
    real_sage = backend_module.sage_extend_attention

    def sage(*args, **kwargs):
        calls["sage"].append(args[6].shape[0] - 1)  # qo_indptr
        return real_sage(*args, **kwargs)

    monkeypatch.setattr(backend_module, "sage_extend_attention", sage)
    real_init = base_extend.TritonKernelOnSubset.__init__

    def counting_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        fwd = self.extend_attention_fwd

        def counted(*a, **k):
            calls["base"].append(a[6].shape[0] - 1)
            return fwd(*a, **k)

        self.extend_attention_fwd = counted

    monkeypatch.setattr(base_extend.TritonKernelOnSubset, "__init__", counting_init)
    return calls


@pytest.mark.skipif(**requires_kernels)
@pytest.mark.parametrize("layout", ["shuffled_pages", "non_monotonic_extend"])
@pytest.mark.parametrize("mode", [ForwardMode.EXTEND, ForwardMode.MIXED])
def test_each_request_takes_its_own_path(mode, layout, kernel_calls, monkeypatch):
    """A batch with long and short chunks: the long ones run 8-bit, the short ones
    (like a mixed batch's decode rows) on the Triton base's bf16 extend kernel, in
    one layer call, and the kit's fp32 reference holds for every row."""
    monkeypatch.setenv("SGLANG_SAGE_ATTN_MIN_EXTEND_LEN", "64")
    case = kit.DenseAttentionCase(
        name="long_and_short", backend=BACKEND, forward_mode=mode, num_heads=4,
        num_kv_heads=2, page_size=1, prefix_lens=(30, 0, 70, 9), extend_lens=(1, 80, 3, 65),
    )  # fmt: skip
    with torch.no_grad():
        kit.run_dense_attention_case(
            KitTestCase(), case, head_dim=64, dtype=KIT_DTYPE, device=DEVICE, loc_layout=layout,
            max_context_len=256,
        )  # fmt: skip
    assert kernel_calls == {"sage": [2], "base": [2]}


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


def _bare_backend(inputs, min_extend_len, page_size=1):
    """A SageAttentionBackend around ``inputs``' cache and index tensors on a Triton
    base, without a model runner: the batch plan and the forward path as SGLang
    drives them (the ``kernel_calls`` fixture counts the kernels)."""
    backend = _bare_plan_backend(min_extend_len, page_size)
    backend._logged_reasons, backend._announced_sage_path = set(), False
    backend.sage_extend_batches = 0
    backend.settings = backend_module.SageAttnSettings(min_extend_len=min_extend_len)
    backend.extend_attention = backend_module.sage_extend_attention
    backend.token_to_kv_pool = SimpleNamespace(
        get_key_buffer=lambda layer_id: inputs["k_buffer"],
        get_value_buffer=lambda layer_id: inputs["v_buffer"],
    )
    backend.base = _triton_base(
        qo_indptr=inputs["qo_indptr"], kv_indptr=inputs["kv_indptr"],
        kv_indices=inputs["kv_indices"], max_extend_len=inputs["max_len_extend"],
    )  # fmt: skip
    return backend


def _bare_layer(inputs):
    num_q_heads, head_dim = inputs["q_extend"].shape[1:]
    return SimpleNamespace(
        layer_id=0, tp_q_head_num=num_q_heads, tp_k_head_num=inputs["k_extend"].shape[1],
        qk_head_dim=head_dim, v_head_dim=inputs["v_extend"].shape[2], scaling=head_dim**-0.5,
        sliding_window_size=-1, logit_cap=0.0, is_cross_attention=False,
        attn_type=backend_module.AttentionType.DECODER, xai_temperature_len=-1,
        k_scale=None, v_scale=None,
    )  # fmt: skip


@pytest.mark.skipif(not HAS_GPU, reason="a 2M-token cache needs a GPU")
def test_gpu_mixed_batch_packs_only_its_long_chunk(kernel_calls):
    """One 2048-token chunk beside 64 decode rows of 32K context (a MIXED batch):
    only the chunk is packed for the 8-bit kernel (one sage launch, one request);
    the decode rows run on the Triton base's bf16 extend kernel. Packing every
    request's cached prefix used to add ~6 GiB here; now the layer's transient
    memory stays under 256 MiB."""
    from sage_attention_inputs import run_op

    from sglang.srt.layers.attention.sage_attention.reference import (
        attention_error,
        sage_extend_attention_ref,
    )

    case = ExtendCase(
        "mixed_32k", (0,) + (32767,) * 64, (2048,) + (1,) * 64,
        num_q_heads=32, num_kv_heads=8, head_dim=128, page_size=64,
    )  # fmt: skip
    inputs = make_extend_inputs(case, dtype=torch.bfloat16, device="cuda")
    backend = _bare_backend(inputs, min_extend_len=2048)
    layer = _bare_layer(inputs)
    batch = _bare_batch(ForwardMode.MIXED, case.extend_lens, case.prefix_lens)
    backend.forward_metadata = backend._plan(batch)
    q, k, v = (inputs[n].flatten(1) for n in ("q_extend", "k_extend", "v_extend"))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with torch.no_grad():
        out = backend.forward_extend(q, k, v, layer, batch, save_kv_cache=False)
    torch.cuda.synchronize()
    transient = torch.cuda.max_memory_allocated() - before
    print(f"\nMIXED 2048 + 64x32K: transient {transient / 2**20:.1f} MiB, calls {kernel_calls}")
    assert kernel_calls == {"sage": [1], "base": [64]}  # one launch, 64 short requests
    assert backend.sage_extend_batches == 1  # the count the server log reports
    assert transient <= 256 * 2**20, f"{transient / 2**20:.0f} MiB"
    exact = run_op(sage_extend_attention_ref, inputs).flatten(1)
    assert torch.isfinite(out).all()
    assert attention_error(out[:2048], exact[:2048])[0] >= 0.9999  # 8-bit rows
    assert attention_error(out[2048:], exact[2048:])[0] >= 0.99999  # bf16 rows


@pytest.mark.parametrize("error", [None, "ImportError('no gluon')"])
def test_a_missing_gluon_is_said_at_start_up(monkeypatch, caplog, error):
    """Where the settings pick the Gluon Hopper kernel and Gluon did not import, the
    start-up log says so and why, instead of running Triton silently."""
    monkeypatch.setattr(backend_module, "hopper_kernel_wanted", lambda *args: True)
    monkeypatch.setattr(backend_module, "gluon_import_error", lambda: error)
    with caplog.at_level(logging.WARNING, logger=backend_module.__name__):
        backend_module.warn_if_gluon_is_missing("auto", 128, 128, "cpu")
    said = [r.getMessage() for r in caplog.records if "Gluon Hopper kernel" in r.getMessage()]
    if error is None:
        assert said == []
    else:
        assert len(said) == 1 and error in said[0], said
