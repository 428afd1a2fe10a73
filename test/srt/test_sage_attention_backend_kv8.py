"""SageAttentionBackend on its 8-bit KV cache, through SGLang's own attention test kit.

The kit's runner gets sage_attn's pool (``SageKV8TokenToKVPool``) where it would build
SGLang's bf16 one, with ``SGLANG_SAGE_ATTN_KV_CACHE=int8``; the kit then writes the
cached prefixes through the pool, builds the backend from SGLang's registry and
checks every dense case, slot layout and the CUDA-graph decode runner against its
fp32 reference (atol = rtol = 3e-2 on the output projection). Call counters prove
that extends and decodes ran the 8-bit cache kernels, and nothing else: no other
kernel can read this cache. Extends run on each route (``extend_route``): the 8-bit
kernel, FlashAttention over the unpacked rows with its fp64 twin standing in (CPU),
and the real FlashAttention where it loads (GPU).
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from sage_attention_inputs import DEVICE, requires_kernels
from sage_attention_kit import BACKEND, KIT_DTYPE, KitTestCase

import sglang.srt.layers.attention.sage_attention.kv8_backend as kv8_backend_module
import sglang.srt.layers.attention.sage_attention.kv8_flash as kv8_flash_module
import sglang.srt.layers.attention.sage_attention_backend as backend_module
from sglang.srt.layers.attention.sage_attention.base_backend import flash_version_here
from sglang.srt.layers.attention.sage_attention.kv8_pool import SageKV8TokenToKVPool
from sglang.srt.layers.attention.sage_attention.kv8_reference import dense_attention_ref
from sglang.srt.model_executor.forward_batch_info import ForwardMode
from sglang.test.kits.attention_unittest.attention_methods import dense_attention as kit
from sglang.test.kits.attention_unittest.runner_modes.cuda_graph_decode_runner import (
    run_dense_cuda_graph_decode_case,
)

LAYOUTS = ("contiguous", "shuffled_pages", "interleaved_pages", "non_monotonic_extend")
DENSE_CASES = kit.make_dense_input_config_cases(BACKEND) + kit.make_dense_attention_config_cases(
    BACKEND
)


@pytest.fixture(name="kv8_calls")
def kv8_calls_fixture(monkeypatch):
    """The kit's runners on sage_attn's 8-bit pool; the 8-bit cache kernels' launches."""
    monkeypatch.setenv("SGLANG_SAGE_ATTN_KV_CACHE", "int8")
    monkeypatch.setattr(kit, "MHATokenToKVPool", SageKV8TokenToKVPool)
    calls = []
    for module, name in (
        (kv8_backend_module, "sage_extend_attention_kv8"),
        (kv8_backend_module, "sage_decode_kv8"),
        (kv8_flash_module, "flash_prefill_kv8"),
        (backend_module, "sage_extend_attention"),  # the bf16-cache kernel: never here
    ):
        real = getattr(module, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return calls


FLASH_HERE = flash_version_here(DEVICE)[0]
# route -> the extend kernel the counters must show.
ROUTES = {"int8": "sage_extend_attention_kv8", "flash_twin": "flash_prefill_kv8"}
if FLASH_HERE:
    ROUTES["flash"] = "flash_prefill_kv8"


@pytest.fixture(name="extend_route", params=list(ROUTES))
def extend_route_fixture(request, monkeypatch):
    """Pin the extend route: the 8-bit kernel for every chunk, or FlashAttention over
    the unpacked rows for every chunk (its fp64 twin on the CPU, or the real one)."""
    route = request.param
    monkeypatch.setenv("SGLANG_SAGE_ATTN_MIN_EXTEND_LEN", "0" if route == "int8" else "off")
    # The kit's chunks are a few tokens long: below the route's floor (test_routes_*).
    monkeypatch.setattr(kv8_flash_module, "MIN_FLASH_CHUNK", 1)
    if route == "flash_twin":
        monkeypatch.setattr(
            kv8_backend_module,
            "flash_version_here",
            lambda device: (4, "the fp64 twin stands in (test)"),
        )
        monkeypatch.setattr(kv8_flash_module, "flash_attention", lambda ver: dense_attention_ref)
    return route


@pytest.mark.skipif(**requires_kernels)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", DENSE_CASES, ids=lambda c: c.name)
def test_kit_dense_cases_on_the_8bit_cache(case, layout, kv8_calls, extend_route):
    if layout == "non_monotonic_extend" and case.page_size > 1:
        pytest.skip(
            "outside SGLang's paged allocator: from page size 2 it puts a request's token i "
            "at offset i % page_size (PagedTokenToKVPoolAllocator's own check), which the "
            "8-bit cache's whole-page reads rely on; this layout scatters a chunk's tokens "
            "across its pages"
        )
    with torch.no_grad():
        kit.run_dense_attention_case(
            KitTestCase(), case, head_dim=64, dtype=KIT_DTYPE, device=DEVICE, loc_layout=layout
        )
    kernel = ROUTES[extend_route] if case.forward_mode.is_extend() else "sage_decode_kv8"
    assert kv8_calls == [kernel], kv8_calls


@pytest.mark.skipif(**requires_kernels)
@pytest.mark.parametrize(
    "case", [c for c in DENSE_CASES if c.forward_mode.is_decode()], ids=lambda c: c.name
)
def test_kit_cuda_graph_decode_replay_on_the_8bit_cache(case, kv8_calls):
    with torch.no_grad():
        run_dense_cuda_graph_decode_case(
            KitTestCase(), case, head_dim=64, dtype=KIT_DTYPE, device=DEVICE
        )
    assert kv8_calls and set(kv8_calls) == {"sage_decode_kv8"}, kv8_calls


@pytest.mark.skipif(**requires_kernels)
def test_the_log_says_which_cache_and_counts_batches(kv8_calls, caplog, monkeypatch):
    monkeypatch.setenv("SGLANG_SAGE_ATTN_MIN_EXTEND_LEN", "0")
    extend = next(c for c in DENSE_CASES if c.forward_mode == ForwardMode.EXTEND)
    with torch.no_grad(), caplog.at_level(logging.INFO, logger=backend_module.__name__):
        fixture = kit.build_dense_attention_fixture(
            KitTestCase(), extend, head_dim=64, dtype=KIT_DTYPE, device=DEVICE
        )
        kit.run_dense_fixture_eager(fixture)
    messages = [r.getMessage() for r in caplog.records]
    assert any("KV cache 8-bit" in m for m in messages), messages
    assert any("(8-bit KV cache; first:" in m for m in messages), messages
    assert "sage_attn: 1 extend batches on the 8-bit kernel so far" in messages


@pytest.mark.skipif(**requires_kernels)
def test_the_log_names_the_flash_route_and_counts_its_batches(kv8_calls, caplog, monkeypatch):
    monkeypatch.setenv("SGLANG_SAGE_ATTN_MIN_EXTEND_LEN", "off")
    monkeypatch.setattr(kv8_flash_module, "MIN_FLASH_CHUNK", 1)
    monkeypatch.setattr(
        kv8_backend_module,
        "flash_version_here",
        lambda device: (4, "the fp64 twin stands in (test)"),
    )
    monkeypatch.setattr(kv8_flash_module, "flash_attention", lambda ver: dense_attention_ref)
    extend = next(c for c in DENSE_CASES if c.forward_mode == ForwardMode.EXTEND)
    with torch.no_grad(), caplog.at_level(logging.INFO):
        fixture = kit.build_dense_attention_fixture(
            KitTestCase(), extend, head_dim=64, dtype=KIT_DTYPE, device=DEVICE
        )
        kit.run_dense_fixture_eager(fixture)
    assert kv8_calls == ["flash_prefill_kv8"]
    messages = [r.getMessage() for r in caplog.records]
    assert any("8-bit kernel for chunks of no length: off" in m for m in messages), messages
    assert any("below the crossover: FlashAttention-4" in m and "MB" in m for m in messages)
    assert any("runs FlashAttention-4 over the unpacked rows (first:" in m for m in messages)
    want = "sage_attn: 1 extend batches on FlashAttention-4 over the unpacked 8-bit cache so far"
    assert want in messages, messages


@pytest.mark.parametrize(
    "min_extend_len, want_int8, want_flash",
    [
        (None, [0, 1, 5], [2, 3]),  # the H100's table: FlashAttention from the floor up
        (300, [0, 1, 3, 5], [2]),  # a crossover: long chunks back on the 8-bit kernel
        (0, [0, 1, 2, 3, 5], []),  # every chunk 8-bit (no FlashAttention here)
    ],
)
def test_routes_keep_chunks_below_the_floor_on_the_8bit_kernel(
    min_extend_len, want_int8, want_flash
):
    """Decode rows of mixed batches (1 token) and chunks under MIN_FLASH_CHUNK would
    unpack their whole sequence for a few rows; empty chunks go nowhere."""
    floor = kv8_flash_module.MIN_FLASH_CHUNK
    extend_lens = [1, floor - 1, floor, 500, 0, 2]
    kv_lens = [n + 1000 for n in extend_lens]
    backend = SimpleNamespace(min_extend_len=min_extend_len, flash_budget=4096)
    routes = kv8_backend_module.SageKV8AttentionBackend._routes(backend, extend_lens, kv_lens)
    assert routes == (want_int8, want_flash)
    # A sequence past the workspace (beyond the context length it is sized for) stays
    # on the 8-bit kernel rather than failing the batch.
    backend.flash_budget = 1100
    routes = kv8_backend_module.SageKV8AttentionBackend._routes(backend, extend_lens, kv_lens)
    assert routes[1] == [b for b in want_flash if kv_lens[b] <= 1100]


def test_min_extend_len_off_without_flash_attention_is_refused(kv8_calls, monkeypatch):
    monkeypatch.setenv("SGLANG_SAGE_ATTN_MIN_EXTEND_LEN", "off")
    monkeypatch.setattr(
        kv8_backend_module, "flash_version_here", lambda device: (None, "no CUDA GPU")
    )
    with pytest.raises(ValueError, match="MIN_EXTEND_LEN=off with .*no FlashAttention"):
        kit.build_dense_attention_fixture(
            KitTestCase(), DENSE_CASES[0], head_dim=64, dtype=KIT_DTYPE, device=DEVICE
        )


@pytest.mark.skipif(**requires_kernels)
def test_the_decode_log_says_how_the_kernel_reads_the_cache(kv8_calls, caplog):
    decode = next(c for c in DENSE_CASES if c.name == "mha_decode_page_boundary")
    assert decode.page_size == 16
    with torch.no_grad(), caplog.at_level(logging.INFO, logger=kv8_backend_module.__name__):
        kit.run_dense_attention_case(
            KitTestCase(), decode, head_dim=64, dtype=KIT_DTYPE, device=DEVICE
        )
    assert kv8_calls == ["sage_decode_kv8"]
    messages = [r.getMessage() for r in caplog.records]
    want = "sage_attn: 1 decode batches on the 8-bit cache kernel so far (whole pages of 16"
    assert any(m.startswith(want) for m in messages), messages


def test_int8_setting_without_the_8bit_pool_is_refused(monkeypatch):
    """The setting with SGLang's bf16 pool (another pool class won the configurator:
    a hybrid model, --prefill-only-disable-kv-cache, ...) stops the server at start-up."""
    monkeypatch.setenv("SGLANG_SAGE_ATTN_KV_CACHE", "int8")
    case = DENSE_CASES[0]
    with pytest.raises(ValueError, match="SGLANG_SAGE_ATTN_KV_CACHE=int8, but this server built"):
        kit.build_dense_attention_fixture(
            KitTestCase(), case, head_dim=64, dtype=KIT_DTYPE, device=DEVICE
        )


def test_layers_the_8bit_kernels_cannot_compute_are_refused_at_start_up():
    from sglang.srt.layers.radix_attention import RadixAttention

    model = torch.nn.ModuleList(
        [
            RadixAttention(4, 64, 0.125, 2, layer_id=0),
            RadixAttention(4, 64, 0.125, 2, layer_id=1, sliding_window_size=128),
            RadixAttention(4, 64, 0.125, 2, layer_id=2, logit_cap=30.0),
            RadixAttention(129, 64, 0.125, 1, layer_id=3),  # a GQA group past 128 rows
        ]
    )
    with pytest.raises(
        ValueError,
        match="129 query heads per KV head on a rank .*; logit soft-capping; sliding-window",
    ):
        kv8_backend_module.refuse_layers_the_kv8_cache_cannot_serve(model)
    kv8_backend_module.refuse_layers_the_kv8_cache_cannot_serve(model[:1])  # a plain layer passes


def test_backend_builds_on_the_8bit_pool(kv8_calls):
    case = DENSE_CASES[0]
    fixture = kit.build_dense_attention_fixture(
        KitTestCase(), case, head_dim=64, dtype=KIT_DTYPE, device=DEVICE
    )
    assert isinstance(fixture.backend, kv8_backend_module.SageKV8AttentionBackend)
    assert fixture.backend.kv8_pool is fixture.runner.token_to_kv_pool
