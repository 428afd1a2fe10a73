"""split_requests: per-request routing of an extend batch (8-bit vs bf16 kernel)."""

from __future__ import annotations

import pytest
import torch
from sage_attention_inputs import ExtendCase, make_extend_inputs, requires_kernels, run_op

from sglang.srt.layers.attention.sage_attention import sage_extend_attention
from sglang.srt.layers.attention.sage_attention.request_split import split_requests

CASE = ExtendCase("mixed", (30, 0, 70, 9, 5), (1, 80, 3, 65, 0), num_kv_heads=2)


def _split(inputs, min_len):
    return split_requests(
        qo_indptr=inputs["qo_indptr"],
        kv_indptr=inputs["kv_indptr"],
        kv_indices=inputs["kv_indices"],
        extend_lens=list(CASE.extend_lens),
        prefix_lens=list(CASE.prefix_lens),
        min_extend_len=min_len,
    )


def test_subsets_hold_each_request_once_with_its_rows_and_slots():
    inputs = make_extend_inputs(CASE, device="cpu")
    long_side, short_side = _split(inputs, min_len=64)
    qo, kv = inputs["qo_indptr"].tolist(), inputs["kv_indptr"].tolist()
    for subset, picked in ((long_side, [1, 3]), (short_side, [0, 2])):
        assert subset.extend_lens == [CASE.extend_lens[b] for b in picked]
        want_rows = [r for b in picked for r in range(qo[b], qo[b + 1])]
        assert subset.rows.tolist() == want_rows
        want_slots = torch.cat([inputs["kv_indices"][kv[b] : kv[b + 1]] for b in picked])
        assert torch.equal(subset.kv_indices, want_slots)
        assert subset.qo_indptr.tolist()[-1] == len(want_rows)
        assert subset.kv_indptr.tolist()[-1] == want_slots.numel()
        assert subset.max_extend_len == max(subset.extend_lens)


def test_one_sided_batches_use_the_batch_metadata_as_is():
    inputs = make_extend_inputs(ExtendCase("all_long", (3, 4), (70, 90)), device="cpu")
    long_side, short_side = split_requests(
        inputs["qo_indptr"], inputs["kv_indptr"], inputs["kv_indices"], [70, 90], [3, 4], 64
    )
    assert short_side is None and long_side.rows is None
    assert long_side.qo_indptr is inputs["qo_indptr"]
    none, all_short = split_requests(
        inputs["qo_indptr"], inputs["kv_indptr"], inputs["kv_indices"], [70, 90], [3, 4], 128
    )
    assert none is None and all_short.rows is None


@pytest.mark.skipif(**requires_kernels)
def test_a_long_request_gets_the_same_bits_beside_short_ones():
    """Routing is decided per request, and the 8-bit op is batch-independent: a long
    request's rows, computed in its batch's 8-bit subset, equal it computed alone."""
    inputs = make_extend_inputs(CASE)
    long_side, _ = _split(inputs, min_len=64)
    rows = long_side.rows
    subset_inputs = dict(
        inputs,
        q_extend=inputs["q_extend"][rows],
        k_extend=inputs["k_extend"][rows],
        v_extend=inputs["v_extend"][rows],
        o_extend=inputs["o_extend"][rows],
        qo_indptr=long_side.qo_indptr,
        kv_indptr=long_side.kv_indptr,
        kv_indices=long_side.kv_indices,
        max_len_extend=long_side.max_extend_len,
    )
    together = run_op(sage_extend_attention, subset_inputs)
    alone_inputs = dict(
        subset_inputs,
        q_extend=subset_inputs["q_extend"][:80],
        k_extend=subset_inputs["k_extend"][:80],
        v_extend=subset_inputs["v_extend"][:80],
        o_extend=subset_inputs["o_extend"][:80],
        qo_indptr=long_side.qo_indptr[:2],
        kv_indptr=long_side.kv_indptr[:2],
        max_len_extend=80,
    )
    assert torch.equal(run_op(sage_extend_attention, alone_inputs), together[:80])
