"""sage_attn composed with a FlashAttention base (``fa4``).

On a GPU with FlashAttention-4's CuTe DSL installed this runs SGLang's
``FlashAttentionBackend`` with its real kernels; without a GPU it runs with the kernel
replaced by a pure-torch paged attention of the same signature, so what the
composition adds is checked wherever the tests run: the base plans and serves whole
batches (decode, delegated extends), and in a batch with requests on both sides of the
crossover the short ones run on the base's kernel over the rows of the base's own page
table (``base_extend.FlashAttentionOnSubset``), every row checked against the kit's
fp32 reference.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
from sage_attention_inputs import DEVICE, HAS_GPU, requires_kernels
from sage_attention_kit import BACKEND, KIT_DTYPE, KitTestCase, sage_calls_fixture  # noqa: F401

from sglang.srt.layers.attention.sage_attention import base_extend
from sglang.srt.model_executor.forward_batch_info import ForwardMode
from sglang.test.kits.attention_unittest.attention_methods import dense_attention as kit
from sglang.test.kits.attention_unittest.runner_modes.cuda_graph_decode_runner import (
    run_dense_cuda_graph_decode_case,
)

HEAD_DIM = 64


def paged_attention_reference(
    q, k_cache, v_cache, *, page_table, cache_seqlens, cu_seqlens_q, max_seqlen_q,
    softmax_scale, causal, window_size=(-1, -1), softcap=0.0, out=None,
    return_softmax_lse=False, **unused,
):  # fmt: skip
    """FlashAttention's ``flash_attn_with_kvcache`` contract, in fp32 torch: request b's
    queries ``q[cu_seqlens_q[b]:cu_seqlens_q[b+1]]`` attend to its first
    ``cache_seqlens[b]`` keys, read page by page through ``page_table[b]``; causal is
    bottom-right. Refuses what the tests here never ask (windows, soft-cap, LSE)."""
    if tuple(window_size) != (-1, -1) or softcap or return_softmax_lse:
        raise NotImplementedError("the CPU stand-in computes plain causal attention only")
    page_size, num_kv_heads, head_dim = k_cache.shape[1:]
    keys, values = (
        k_cache.reshape(-1, num_kv_heads, head_dim),
        v_cache.reshape(-1, num_kv_heads, v_cache.shape[-1]),
    )
    result = torch.empty(q.shape[0], q.shape[1], v_cache.shape[-1], dtype=q.dtype)
    group = q.shape[1] // num_kv_heads
    for b in range(cache_seqlens.shape[0]):
        start, end = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        kv_len = int(cache_seqlens[b])
        pos = torch.arange(kv_len)
        slots = page_table[b, pos // page_size].long() * page_size + pos % page_size
        k = keys[slots].float().repeat_interleave(group, 1)
        v = values[slots].float().repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", q[start:end].float(), k) * softmax_scale
        if causal:
            query_pos = kv_len - (end - start) + torch.arange(end - start)
            scores = scores.masked_fill(pos[None, :] > query_pos[:, None], float("-inf"))
        result[start:end] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype)
    if out is not None:
        out.copy_(result)
        return out
    return result


@pytest.fixture
def fa4_base(monkeypatch):
    """SGLang's FlashAttentionBackend (fa_impl_ver=4) as sage_attn's base. On a GPU its
    own kernels (skipped where FA4's CuTe DSL is missing); without one, sgl-kernel
    (which cannot load without CUDA) is stubbed while its module imports, and the
    kernel is the reference above. Returns the kernel launches' batch sizes."""
    if HAS_GPU:
        from sglang.kernels.ops.attention.flash_attention_v4 import (
            is_flash_attention_v4_available,
        )

        if not is_flash_attention_v4_available():
            pytest.skip("FlashAttention-4's CuTe DSL is not installed on this GPU machine")
        from sglang.srt.layers.attention import flashattention_backend

        kernel = flashattention_backend.flash_attn_with_kvcache
    else:
        stub = types.ModuleType("sgl_kernel")
        stub.merge_state_v2 = None  # imported by name, never called on these paths
        with monkeypatch.context() as during_import:
            during_import.setitem(sys.modules, "sgl_kernel", stub)
            from sglang.srt.layers.attention import flashattention_backend
        kernel = paged_attention_reference
    launches = []

    def counted(*args, **kwargs):
        launches.append(kwargs["cache_seqlens"].shape[0])
        return kernel(*args, **kwargs)

    monkeypatch.setattr(flashattention_backend, "flash_attn_with_kvcache", counted)
    monkeypatch.setenv("SGLANG_SAGE_ATTN_BASE_BACKEND", "fa4")
    return launches


def _case(name, mode, prefix_lens, extend_lens=()):
    return kit.DenseAttentionCase(
        name=name, backend=BACKEND, forward_mode=mode, num_heads=4, num_kv_heads=2,
        page_size=1, prefix_lens=prefix_lens, extend_lens=extend_lens,
    )  # fmt: skip


def _run(case, layout="shuffled_pages", base_rows=None):
    """The case through sage_attn on the fa4 base, against the kit's fp32 reference: the
    kit's own tolerance for every row, and ``base_rows`` (rows the base's kernel computes
    in this batch) to two roundings of the dtype, so a wrong page-table row or length
    cannot hide in the kit's 3e-2."""
    with torch.no_grad():
        fixture = kit.build_dense_attention_fixture(
            KitTestCase(), case, head_dim=HEAD_DIM, dtype=KIT_DTYPE, device=DEVICE,
            loc_layout=layout, max_context_len=256,
        )  # fmt: skip
        assert type(fixture.backend.base).__name__ == "FlashAttentionBackend"
        assert isinstance(fixture.backend.base_subset_kernel, base_extend.FlashAttentionOnSubset)
        out = kit.run_dense_fixture_eager(fixture).float()
        expected = kit.expected_dense_fixture_output(fixture).float()
    torch.testing.assert_close(out, expected, atol=3e-2, rtol=3e-2)
    rows = slice(None) if base_rows is None else base_rows
    tight = 2 * torch.finfo(KIT_DTYPE).eps  # fp16 2e-3 (CPU), bf16 1.6e-2 (GPU)
    torch.testing.assert_close(out[rows], expected[rows], atol=tight, rtol=tight)


@pytest.mark.skipif(**requires_kernels)
@pytest.mark.parametrize("layout", ["shuffled_pages", "non_monotonic_extend"])
@pytest.mark.parametrize("mode", [ForwardMode.EXTEND, ForwardMode.MIXED])
def test_short_requests_run_on_the_flash_base(mode, layout, fa4_base, sage_calls, monkeypatch):
    """Long chunks on the 8-bit kernel, short ones on the base's FlashAttention kernel
    over its own page-table rows, in one layer call."""
    monkeypatch.setenv("SGLANG_SAGE_ATTN_MIN_EXTEND_LEN", "64")
    # Rows 0 and 81-83 are the short requests' (chunks of 1 and 3 tokens).
    short_rows = torch.tensor([0, 81, 82, 83])
    _run(_case("long_and_short", mode, (30, 0, 70, 9), (1, 80, 3, 65)), layout, short_rows)
    assert len(sage_calls) == 1  # the two long requests, one launch
    assert fa4_base == [2]  # the two short requests, one launch


@pytest.mark.skipif(**requires_kernels)
def test_short_batches_and_decode_run_on_the_flash_base(fa4_base, sage_calls, monkeypatch):
    monkeypatch.setenv("SGLANG_SAGE_ATTN_MIN_EXTEND_LEN", "64")
    _run(_case("short", ForwardMode.EXTEND, (30, 9), (1, 3)))
    _run(_case("decode", ForwardMode.DECODE, (30, 9, 100)))
    assert sage_calls == []
    assert fa4_base == [2, 3]  # whole batches, through the base's own forward


@pytest.mark.skipif(**requires_kernels)
def test_decode_cuda_graph_runs_on_the_flash_base(fa4_base, sage_calls):
    """SGLang's CUDA-graph decode runner drives the base's graph hooks through sage_attn."""
    case = _case("decode", ForwardMode.DECODE, (14, 15, 16))
    with torch.no_grad():
        run_dense_cuda_graph_decode_case(
            KitTestCase(), case, head_dim=HEAD_DIM, dtype=KIT_DTYPE, device=DEVICE
        )
    assert sage_calls == [] and fa4_base
