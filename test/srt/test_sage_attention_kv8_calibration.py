"""kv8_calibration.py: the 8-bit cache's smoothing vectors from a fixed start-up prompt.

A small model (an embedding, then attention layers over projections) runs through a
real SageAttentionBackend on its 8-bit pool, built by SGLang's attention kit. The
calibration must store each layer's mean key (rotated when the pool is), answer
the attention calls with exact causal attention of the prompt over itself (the
next layer sees a real prefill's hidden states), stop after the last layer, and
leave the cache untouched.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sage_attention_inputs import DEVICE
from sage_attention_kit import BACKEND, KitTestCase

from sglang.srt.layers.attention.sage_attention.kv8_calibration import (
    CALIBRATION_TOKENS,
    calibrate_key_means,
    calibration_token_ids,
)
from sglang.srt.layers.attention.sage_attention.kv8_pool import SageKV8TokenToKVPool
from sglang.srt.layers.attention.sage_attention.rotation import hadamard_matrix
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.test.kits.attention_unittest.attention_methods import dense_attention as kit

HEAD_DIM, VOCAB = 64, 100


class TwoLayerModel(torch.nn.Module):
    """Attention layers 0 and 1 (the pool's), then a layer the calibration never reaches."""

    def __init__(self, num_heads, num_kv_heads, dtype):
        super().__init__()
        hidden = num_heads * HEAD_DIM
        self.embed = torch.nn.Embedding(VOCAB, hidden, dtype=dtype, device=DEVICE)
        kv = num_kv_heads * HEAD_DIM
        self.qkv = torch.nn.ModuleList(
            torch.nn.Linear(hidden, hidden + 2 * kv, dtype=dtype, device=DEVICE) for _ in range(3)
        )
        self.attn = torch.nn.ModuleList(
            RadixAttention(num_heads, HEAD_DIM, HEAD_DIM**-0.5, num_kv_heads, layer_id=i)
            for i in range(3)
        )
        self.split = (hidden, kv, kv)
        self.seen = []  # (q, k, v, attention output) of each layer reached

    def forward(self, input_ids, positions, forward_batch):
        x = self.embed(input_ids)
        for qkv, attn in zip(self.qkv, self.attn, strict=True):
            q, k, v = qkv(x).split(self.split, dim=-1)
            self.seen.append([q, k, v])
            x = attn(q.contiguous(), k.contiguous(), v.contiguous(), forward_batch)
            self.seen[-1].append(x)
        return x


@pytest.fixture(name="kv8_fixture")
def kv8_fixture_fixture(monkeypatch):
    """The kit's runner and backend on sage_attn's 8-bit pool, two layers deep."""
    monkeypatch.setenv("SGLANG_SAGE_ATTN_KV_CACHE", "int8")

    def two_layer_pool(*args, layer_num, **kwargs):
        return SageKV8TokenToKVPool(*args, layer_num=2, **kwargs)

    monkeypatch.setattr(kit, "MHATokenToKVPool", two_layer_pool)
    case = next(c for c in kit.make_dense_input_config_cases(BACKEND) if c.num_kv_heads > 1)
    fixture = kit.build_dense_attention_fixture(
        KitTestCase(), case, head_dim=HEAD_DIM, dtype=torch.float16, device=DEVICE
    )
    return fixture, case


def test_the_prompt_is_fixed_and_in_the_vocabulary():
    ids = calibration_token_ids(VOCAB)
    assert ids.shape == (CALIBRATION_TOKENS,) and torch.equal(ids, calibration_token_ids(VOCAB))
    assert 0 <= ids.min() and ids.max() < VOCAB and len(set(ids.tolist())) > VOCAB // 2


@pytest.mark.parametrize("rotation", ["none", "hadamard"])
def test_calibration_records_key_means_and_answers_with_exact_attention(
    kv8_fixture, rotation, monkeypatch
):
    monkeypatch.setenv("SGLANG_SAGE_ATTN_QK_ROTATION", rotation)
    fixture, case = kv8_fixture
    runner, backend = fixture.runner, fixture.backend
    pool = runner.token_to_kv_pool = backend.kv8_pool = backend.token_to_kv_pool = (
        SageKV8TokenToKVPool(size=64, page_size=1, dtype=torch.float16,
                             head_num=case.num_kv_heads, head_dim=HEAD_DIM, layer_num=2,
                             device=DEVICE, enable_memory_saver=False, enable_alt_stream=False)
    )  # fmt: skip
    pool.needs_calibration = True
    model = TwoLayerModel(case.num_heads, case.num_kv_heads, torch.float32)
    runner.model = model
    runner.model_config = type("Config", (), {"vocab_size": VOCAB})()
    cache_before = [t.clone() for t in pool.k_buffer + pool.v_buffer + pool.k_scale_buffer]
    with torch.no_grad():
        calibrate_key_means(runner, backend)

    assert len(model.seen) == 2, "the forward must stop after the pool's last layer"
    assert pool.rotated == (rotation == "hadamard") and not pool.needs_calibration
    assert backend.calibration is None
    group = case.num_heads // case.num_kv_heads

    def heads(x, n, repeat=1):
        return x.view(-1, n, HEAD_DIM).transpose(0, 1).repeat_interleave(repeat, 0)

    for layer_id, (q, k, v, *out) in enumerate(model.seen):
        keys = k.view(-1, case.num_kv_heads, HEAD_DIM).float()
        if pool.rotated:
            keys = keys @ hadamard_matrix(HEAD_DIM, device=keys.device)
        torch.testing.assert_close(pool.k_mean[layer_id], keys.mean(0))
        if out:  # the last layer stops the forward before it returns
            want = F.scaled_dot_product_attention(
                heads(q, case.num_heads), heads(k, case.num_kv_heads, group),
                heads(v, case.num_kv_heads, group), is_causal=True, scale=HEAD_DIM**-0.5,
            ).transpose(0, 1).reshape(q.shape[0], -1)  # fmt: skip
            torch.testing.assert_close(out[0], want)
    assert [len(seen) for seen in model.seen] == [4, 3]
    cache_after = pool.k_buffer + pool.v_buffer + pool.k_scale_buffer
    assert all(torch.equal(a, b) for a, b in zip(cache_before, cache_after, strict=True))


def test_a_forward_that_misses_a_layer_is_an_error(kv8_fixture):
    fixture, case = kv8_fixture
    runner, backend = fixture.runner, fixture.backend
    model = TwoLayerModel(case.num_heads, case.num_kv_heads, torch.float32)
    model.qkv, model.attn = model.qkv[:1], model.attn[:1]  # layer 1 never attends
    runner.model = model
    runner.model_config = type("Config", (), {"vocab_size": VOCAB})()
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"layers \[1\]"):
        calibrate_key_means(runner, backend)
