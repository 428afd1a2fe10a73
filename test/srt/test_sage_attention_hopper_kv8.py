"""sage_attn's Hopper kernel over the 8-bit cache's pages (``hopper_kv8.py``).

CPU (CI): every launch variant compiles for sm_90 into INT8 wgmmas fed by TMA, with
register reallocation between partitions. Gluon does not run in the interpreter, so
under ``TRITON_INTERPRET=1`` this module re-runs its compile tests in a child process
without it (``test_sage_attention_compile.py``'s helpers).

GPU (sm_90): the kernel's arithmetic is the Triton kernel's INT8 P·V over tiles of
``STEP_N`` keys, so the twin is ``sage_extend_attention_kv8_ref(pv_int8=True,
block_n=STEP_N)``; only exp2, summation order and P's rounding mode differ
(``test_sage_attention_extend_kv8.VS_TWIN``). Against the fp32 op: that file's INT8
P·V bars. Every row is finite (slots no request owns hold NaN scales), results are
bitwise deterministic and graph-replayable, inputs are untouched.
"""

from __future__ import annotations

import dataclasses
import re
from unittest import mock

import pytest
import test_sage_attention_compile as compile_helpers
import torch
from sage_attention_inputs import ExtendCase, make_kv8_inputs
from test_sage_attention_compile import (
    captured_launches,
    compile_for,
    compiled_kernels,
    only_interpreted,
    run_compile_tests_in_child,
)
from test_sage_attention_extend_kv8 import CASES as KV8_CASES
from test_sage_attention_extend_kv8 import OUTLIER_CASES as KV8_OUTLIERS
from test_sage_attention_extend_kv8 import (
    VS_EXACT,
    VS_EXACT_INT8_PV_OUTLIER,
    VS_EXACT_QK_CHANNELS,
    VS_TWIN,
)
from test_sage_attention_hopper import needs_gluon, needs_hopper

from sglang.srt.layers.attention.sage_attention import extend_kv8
from sglang.srt.layers.attention.sage_attention.hopper_attention import hopper_kernel_available
from sglang.srt.layers.attention.sage_attention.hopper_kv8 import (
    KV8_HOPPER_CONFIG,
    KV8_MIN_PAGE,
    STEP_N,
    KV8HopperConfig,
    hopper_kv8_supports,
    sage_extend_kv8_hopper,
)
from sglang.srt.layers.attention.sage_attention.kv8_cache import KV8Cache, allocate_kv8_cache
from sglang.srt.layers.attention.sage_attention.kv8_reference import (
    sage_extend_attention_kv8_ref,
)
from sglang.srt.layers.attention.sage_attention.reference import attention_error


@only_interpreted
def test_compile_suite_without_interpreter():
    run_compile_tests_in_child(__file__, keyword="compile")


# The schedules the config selects, besides the default (same arithmetic, same bits).
OTHER_CONFIGS = [KV8HopperConfig(overlap=False), KV8HopperConfig(stages=3)]


COMPILE_CONFIGS = (
    [
        (head_dim, page_size, causal, False, KV8_HOPPER_CONFIG)
        for head_dim in (64, 128)
        for page_size in (64, 128, 256)
        for causal in (True, False)
    ]
    + [(128, 64, True, True, KV8_HOPPER_CONFIG)]  # rotated keys
    + [  # the other schedules
        (head_dim, 64, True, False, config) for head_dim in (64, 128) for config in OTHER_CONFIGS
    ]
)


def _config_id(config: KV8HopperConfig) -> str:
    return f"stages{config.stages}" + ("-overlap" if config.overlap else "")


def _launch(cache, q, causal, config=KV8_HOPPER_CONFIG):
    n = q.shape[0]
    qo_indptr = torch.tensor([0, n], dtype=torch.int32)
    kv_indptr = torch.tensor([0, n + 40], dtype=torch.int32)
    kv_indices = torch.arange(n + 40, dtype=torch.int64)
    return lambda: sage_extend_kv8_hopper(
        q, torch.empty_like(q), cache, qo_indptr, kv_indptr, kv_indices, n, sm_scale=0.1,
        causal=causal, config=config,
    )  # fmt: skip


@compiled_kernels
@needs_gluon
@pytest.mark.parametrize(
    "head_dim,page_size,causal,rotated,config",
    COMPILE_CONFIGS,
    ids=[
        f"compile-kv8-hd{h}-page{p}-{'causal' if c else 'full'}-{_config_id(cfg)}"
        + ("-rotated" if r else "")
        for h, p, c, r, cfg in COMPILE_CONFIGS
    ],
)
def test_every_launch_compiles(head_dim, page_size, causal, rotated, config):
    from triton.experimental.gluon._runtime import GluonASTSource

    cache = allocate_kv8_cache(
        1024, 2, head_dim, head_dim, "cpu", rotated=rotated, page_size=page_size
    )
    q = torch.randn(70, 8, head_dim, dtype=torch.bfloat16)
    launches = captured_launches(_launch(cache, q, causal, config))
    names = [fn.__name__ for fn, _, _ in launches]
    assert names == ["_quantize_q_kernel", "_sage_hopper_kv8_kernel"], names
    fn, bound, options = launches[1]
    with mock.patch.object(compile_helpers, "ASTSource", GluonASTSource):
        kernel = compile_for(fn, bound, options)
    ptx = kernel.asm["ptx"]
    assert kernel.asm["cubin"]
    # Both products are INT8 wgmmas (two per product and step: a page pair); K and Vᵀ
    # arrive by TMA; partitions trade registers.
    assert "wgmma.mma_async.sync.aligned" in ptx and ".s8.s8" in ptx
    assert ".e4m3.e4m3" not in ptx and ".f16.f16" not in ptx
    assert "cp.async.bulk.tensor" in ptx and "setmaxnreg" in ptx
    assert kernel.metadata.shared <= 227 * 1024
    # A stage is released by one thread's arrive: only safe after a barrier of both
    # consumer warpgroups (256 threads), which Triton inserts and Gluon does not promise.
    lines = ptx.splitlines()
    releases = [i for i, line in enumerate(lines) if re.search(r"mbarrier\.arrive\.shared", line)]
    assert releases, "no stage release"
    for i in releases:
        assert any("bar.sync" in line and "256" in line for line in lines[max(0, i - 8) : i]), (
            "a stage is released without a barrier of both warpgroups"
        )


def test_small_pages_and_wide_caches_are_refused():
    """What ``hopper_kv8_supports`` refuses, on an sm_90 device (mocked: the check reads
    only its capability), and the wrapper's own refusal of small pages."""
    hopper = torch.device("cuda")
    with mock.patch.object(torch.cuda, "get_device_capability", return_value=(9, 0)):
        for page_size, supported in ((KV8_MIN_PAGE // 2, False), (KV8_MIN_PAGE, True)):
            cache = allocate_kv8_cache(256, 2, 128, 128, "cpu", page_size=page_size)
            assert hopper_kv8_supports(cache, hopper) is (hopper_kernel_available() and supported)
        # Rows past TMA's int32 coordinates.
        cache = allocate_kv8_cache(256, 2, 128, 128, "cpu", page_size=KV8_MIN_PAGE)
        with mock.patch(
            "sglang.srt.layers.attention.sage_attention.hopper_kv8.tma_can_read", return_value=False
        ):
            assert not hopper_kv8_supports(cache, hopper)
    small = allocate_kv8_cache(256, 2, 128, 128, "cpu", page_size=KV8_MIN_PAGE // 2)
    q = torch.randn(4, 8, 128, dtype=torch.bfloat16)
    with pytest.raises((ValueError, RuntimeError), match="sage_attn"):
        _launch(small, q, True)()


def _gpu_cases():
    paged = [c for c in KV8_CASES if c.page_size >= KV8_MIN_PAGE]
    # The other shapes (ragged GQA, empty chunks, MQA 66, two query blocks) and every
    # outlier kind, on pages of 64.
    repaged = [
        dataclasses.replace(c, name=f"{c.name}_p64", page_size=64)
        for c in KV8_CASES + KV8_OUTLIERS
        if c.page_size < KV8_MIN_PAGE and c.head_dim in (64, 128) and not c.head_dim_v
    ]
    # Many steps (the ring wraps several times), pages of 256 (runs at offsets 64-192
    # of a page), an odd run count (700 keys: 11 runs, the last step reads one twice).
    ring = ExtendCase("ring_pages256", (550,), (150,), 8, 2, head_dim=128, page_size=256)
    return paged + repaged + [ring]


GPU_CASES = _gpu_cases()
RING_CASE = GPU_CASES[-1]


def _index_args(batch: dict) -> list:
    return [batch[k] for k in ("qo_indptr", "kv_indptr", "kv_indices", "max_len_extend")]


def assert_matches_twin_and_fp32(kernel, case, batch, causal, tag):
    """``kernel`` (``sage_extend_kv8_hopper``'s signature) on ``case``'s ``batch``: every row
    finite, bitwise deterministic, inputs (NaN-poisoned slots included) untouched, the
    twin's INT8 P·V over STEP_N-key tiles within VS_TWIN, the fp32 op within the INT8
    P·V bars (causal: make_kv8_inputs' fp32 reference is causal)."""
    cache: KV8Cache = batch["cache"]
    args = _index_args(batch)
    watched = [batch["q_extend"], *args[:3], cache.k_int8, cache.k_scale, cache.v_int8,
               cache.v_scale]  # fmt: skip
    before = [t.clone() for t in watched]

    def attend():
        out = batch["o_extend"].clone()
        kernel(batch["q_extend"], out, cache, *args, sm_scale=case.head_dim**-0.5, causal=causal)
        return out

    out, again = attend(), attend()
    twin = batch["o_extend"].clone()
    sage_extend_attention_kv8_ref(
        batch["q_extend"], twin, cache, *args, causal=causal, pv_int8=True, block_n=STEP_N
    )
    assert torch.isfinite(out).all(), "a row was left unwritten or is not finite"
    assert torch.equal(out, again), "not bitwise deterministic"
    for old, new in zip(before, watched, strict=True):
        torch.testing.assert_close(new, old, rtol=0, atol=0, equal_nan=True)
    twin_cos, twin_l1 = attention_error(out, twin)
    print(f"\n{tag} {case.name} causal={causal} twin {twin_cos:.7f} {twin_l1:.2e}")
    assert twin_cos >= VS_TWIN[0] and twin_l1 <= VS_TWIN[1], (twin_cos, twin_l1)
    if causal:
        cos, rel_l1 = attention_error(out, batch["exact"], request_rows=batch["qo_indptr"])
        print(f"ACCURACY {tag.lower()}_{case.name} cos={cos:.6f} rel_l1={rel_l1:.4f}")
        min_cos, max_l1 = {
            "randn": VS_EXACT, "qk_channels": VS_EXACT_QK_CHANNELS[False]
        }.get(case.values, VS_EXACT_INT8_PV_OUTLIER)  # fmt: skip
        assert cos >= min_cos and rel_l1 <= max_l1, f"vs fp32: {cos:.6f} / {rel_l1:.4f}"


@needs_hopper
@needs_gluon
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", GPU_CASES, ids=[c.name for c in GPU_CASES])
def test_matches_the_twin_and_fp32(case, causal):
    batch = make_kv8_inputs(case)
    assert hopper_kv8_supports(batch["cache"], batch["q_extend"].device)
    assert_matches_twin_and_fp32(sage_extend_kv8_hopper, case, batch, causal, "HOPPER_KV8")


@needs_hopper
@needs_gluon
@pytest.mark.parametrize("config", OTHER_CONFIGS, ids=[_config_id(c) for c in OTHER_CONFIGS])
def test_every_schedule_gives_the_same_bits(config):
    """The schedules only reorder when work is issued, not the arithmetic (on a batch
    whose ring wraps several times)."""
    batch = make_kv8_inputs(RING_CASE)
    outs = []
    for cfg in (KV8_HOPPER_CONFIG, config):
        out = batch["o_extend"].clone()
        sage_extend_kv8_hopper(
            batch["q_extend"], out, batch["cache"], *_index_args(batch), sm_scale=0.1,
            causal=True, config=cfg,
        )  # fmt: skip
        outs.append(out)
    assert torch.isfinite(outs[0]).all() and torch.equal(outs[0], outs[1])


@needs_hopper
@needs_gluon
def test_dispatch_takes_the_gluon_kernel_on_hopper():
    """extend_kv8 runs this kernel for "gluon" on sm_90 pages of 64; "auto" and
    "triton" keep the Triton kernel (extend_kv8's docstring says why)."""
    batch = make_kv8_inputs(next(c for c in GPU_CASES if c.page_size == 64))
    calls = mock.Mock(wraps=extend_kv8.sage_extend_kv8_hopper)
    with mock.patch.object(extend_kv8, "sage_extend_kv8_hopper", calls):
        for kernel in ("gluon", "auto", "triton"):
            extend_kv8.sage_extend_attention_kv8(
                batch["q_extend"], batch["o_extend"].clone(), batch["cache"],
                *_index_args(batch), kernel=kernel,
            )  # fmt: skip
    assert calls.call_count == 1


@needs_hopper
@needs_gluon
def test_cuda_graph_replay_gives_the_same_bits():
    batch = make_kv8_inputs(GPU_CASES[0])
    args = _index_args(batch)
    q = batch["q_extend"]
    eager = batch["o_extend"].clone()
    sage_extend_kv8_hopper(q, eager, batch["cache"], *args, sm_scale=0.1, causal=True)
    out = batch["o_extend"].clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sage_extend_kv8_hopper(q, out, batch["cache"], *args, sm_scale=0.1, causal=True)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
