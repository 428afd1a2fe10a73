"""The CuTe DSL version of the 8-bit pages' Hopper kernel (``hopper_kv8_cute.py``).

GPU only (sm_90 with the CuTe DSL installed, as FA4 brings it; skipped elsewhere, CI
included): ``test_sage_attention_hopper_kv8.py``'s cases, twin and fp32 bars, every
row finite, bitwise deterministic, inputs untouched; and every schedule option gives
the default's bits.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from sage_attention_inputs import make_kv8_inputs
from test_sage_attention_hopper import needs_hopper
from test_sage_attention_hopper_kv8 import (
    GPU_CASES,
    RING_CASE,
    _index_args,
    assert_matches_twin_and_fp32,
)

cute_kernel = pytest.importorskip(
    "sglang.srt.layers.attention.sage_attention.hopper_kv8_cute",
    reason="the CuTe DSL (nvidia-cutlass-dsl) is not installed",
)


@needs_hopper
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", GPU_CASES, ids=[c.name for c in GPU_CASES])
def test_matches_the_twin_and_fp32(case, causal):
    batch = make_kv8_inputs(case)
    assert_matches_twin_and_fp32(cute_kernel.sage_extend_kv8_cute, case, batch, causal, "CUTE_KV8")


SCHEDULES = {"no_pingpong": dict(pingpong=False), "stages3": dict(stages=3)}


@needs_hopper
@pytest.mark.parametrize("schedule", list(SCHEDULES), ids=list(SCHEDULES))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_every_schedule_gives_the_same_bits(schedule, causal):
    """The schedules only reorder when work is issued, not the arithmetic (pages of 256,
    an odd run count, a ring that wraps several times)."""
    batch = make_kv8_inputs(RING_CASE)
    outs = []
    for config in ({}, SCHEDULES[schedule]):
        out = batch["o_extend"].clone()
        cute_kernel.sage_extend_kv8_cute(
            batch["q_extend"], out, batch["cache"], *_index_args(batch), sm_scale=0.1,
            causal=causal, **config,
        )  # fmt: skip
        outs.append(out)
    assert torch.isfinite(outs[0]).all() and torch.equal(outs[0], outs[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_refuses_off_hopper_and_unreadable_caches():
    """A device other than sm_90, or a cache the kernel cannot read, is refused."""
    batch = make_kv8_inputs(GPU_CASES[0])
    run = lambda: cute_kernel.sage_extend_kv8_cute(  # noqa: E731
        batch["q_extend"], batch["o_extend"].clone(), batch["cache"], *_index_args(batch),
        sm_scale=0.1, causal=True,
    )  # fmt: skip
    if torch.cuda.get_device_capability()[0] != 9:
        with pytest.raises(ValueError, match="sm_90"):
            run()
        return
    with mock.patch.object(cute_kernel, "_cache_refusal", return_value="no variant"):
        with pytest.raises(ValueError, match="no variant"):
            run()
