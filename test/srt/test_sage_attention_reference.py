"""The fp32 twin means what SGLang means: it agrees with SGLang's own extend kernel.

SGLang's ``extend_attention_fwd`` (bf16/fp16 Triton, no quantization) is the
semantics the backend replaces: prefix through ``kv_indices``, bottom-right
causal chunk, GQA by index. If the twin disagreed with it, every accuracy figure
measured against the twin would be measured against the wrong function.
"""

from __future__ import annotations

import pytest
import torch
from sage_attention_inputs import ExtendCase, make_extend_inputs, requires_kernels, run_op

from sglang.kernels.ops.attention.extend_attention import extend_attention_fwd
from sglang.srt.layers.attention.sage_attention.reference import (
    attention_error,
    sage_extend_attention_ref,
)

CASES = [
    ExtendCase(
        "ragged_gqa4_paged", (0, 37, 90), (20, 1, 45), num_q_heads=8, num_kv_heads=2, page_size=16
    ),
    ExtendCase("mqa_hd128", (50,), (30,), num_q_heads=4, num_kv_heads=1, head_dim=128),
]


def sglang_extend(inputs, causal):
    out = inputs["o_extend"].clone()
    extend_attention_fwd(
        inputs["q_extend"],
        inputs["k_extend"],
        inputs["v_extend"],
        out,
        inputs["k_buffer"],
        inputs["v_buffer"],
        inputs["qo_indptr"],
        inputs["kv_indptr"],
        inputs["kv_indices"],
        None,
        causal,
        None,
        inputs["max_len_extend"],
        1.0,
        1.0,
    )
    return out


@pytest.mark.skipif(**requires_kernels)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_fp32_twin_agrees_with_sglang_extend_kernel(case, causal):
    inputs = make_extend_inputs(case, dtype=torch.float16)
    cos, rel_l1 = attention_error(
        run_op(sage_extend_attention_ref, inputs, causal=causal), sglang_extend(inputs, causal)
    )
    # Both compute the same function; only SGLang's fp16 rounding separates them.
    assert cos >= 0.99999 and rel_l1 <= 2e-3, (cos, rel_l1)
