"""Start-up calibration of the 8-bit KV cache's smoothing vectors.

The smoothing vector of a (layer, KV head) is subtracted from every key before its
INT8 quantization (``kv8_cache.py``): softmax does not see it, but a key channel
with a large constant offset (a K-projection bias, a RoPE-stable outlier channel)
no longer eats the key's INT8 range. It must be a function of the model alone, so
the same request gets the same bytes whatever was served before it: here it is the
mean key (rotated when the cache is) of a fixed calibration prompt, computed once
per process before the server takes traffic or captures a CUDA graph.

How: one eager forward of the model over ``CALIBRATION_TOKENS`` fixed token ids
(seeded, uniform over the vocabulary) as a single prefill with nothing cached. The
backend's ``calibration`` recorder answers every attention call of that forward
without touching the cache: it stores the layer's key mean and returns exact causal
attention of the prompt over itself (torch SDPA), so the next layer sees the hidden
states a real prefill would give. After the last layer it stops the forward
(``CalibrationDone``), before the logits. Every TP rank runs it at the same point
with the same ids, so the model's collectives stay in step.

Measured on the ops (``test_sage_attention_decode_kv8.py``): with a 10-sigma
per-channel K bias, zeros instead of the key mean drop decode accuracy from cos
0.99995 to 0.997 at hd64, rotated or not (the rotation spreads a bias channel, it
does not remove its energy). Random ids rather than text: on SmolLM2 a text prompt
gives the same end accuracy (mean KL within 5% either way, VALIDATION.md round 10) and
would need the tokenizer.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from sglang.srt.layers.attention.sage_attention.rotation import hadamard_matrix

logger = logging.getLogger(__name__)

CALIBRATION_TOKENS = 512
CALIBRATION_SEED = 0


class CalibrationDone(Exception):
    """Raised by the recorder after the pool's last layer: the forward has nothing
    more to give."""


def calibration_token_ids(vocab_size: int, num_tokens: int = CALIBRATION_TOKENS) -> torch.Tensor:
    """The fixed prompt: seeded ids, the same in every process and run."""
    generator = torch.Generator().manual_seed(CALIBRATION_SEED)
    return torch.randint(0, vocab_size, (num_tokens,), generator=generator)


class KeyMeanRecorder:
    """Answers a calibration forward's attention calls (module docstring)."""

    def __init__(self, pool):
        self.pool = pool
        self.recorded: set[int] = set()

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer) -> torch.Tensor:
        pool = self.pool
        keys = k.view(k.shape[0], pool.head_num, pool.head_dim).float()
        if pool.rotated:
            keys = keys @ hadamard_matrix(pool.head_dim, device=keys.device)
        pool.k_mean[layer.layer_id - pool.start_layer].copy_(keys.mean(0))
        self.recorded.add(layer.layer_id)

        group = layer.tp_q_head_num // layer.tp_k_head_num

        def heads_first(x, num_heads, head_dim, repeat=1):
            x = x.view(x.shape[0], num_heads, head_dim).transpose(0, 1).float()
            return x.repeat_interleave(repeat, 0)

        out = F.scaled_dot_product_attention(
            heads_first(q, layer.tp_q_head_num, layer.qk_head_dim),
            heads_first(k, layer.tp_k_head_num, layer.qk_head_dim, group),
            heads_first(v, layer.tp_v_head_num, layer.v_head_dim, group),
            is_causal=True,
            scale=layer.scaling,
        )
        # (The pool's own end_layer is inclusive or exclusive by who built it.)
        if layer.layer_id == pool.start_layer + pool.layer_num - 1:
            raise CalibrationDone
        return out.transpose(0, 1).reshape(q.shape[0], -1).to(q.dtype)


def calibration_batch(model_runner, input_ids: torch.Tensor):
    """A one-request prefill of ``input_ids`` with nothing cached."""
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

    device, n = model_runner.device, input_ids.shape[0]
    batch = ForwardBatch(
        forward_mode=ForwardMode.EXTEND,
        batch_size=1,
        input_ids=input_ids.to(device),
        req_pool_indices=torch.zeros(1, dtype=torch.int32, device=device),
        seq_lens=torch.tensor([n], dtype=torch.int32, device=device),
        seq_lens_cpu=torch.tensor([n], dtype=torch.int32),
        out_cache_loc=torch.zeros(n, dtype=torch.int64, device=device),
        seq_lens_sum=n,
        positions=torch.arange(n, dtype=torch.int64, device=device),
    )
    batch.extend_prefix_lens = torch.zeros(1, dtype=torch.int32, device=device)
    batch.extend_prefix_lens_cpu = [0]
    batch.extend_seq_lens = torch.tensor([n], dtype=torch.int32, device=device)
    batch.extend_seq_lens_cpu = [n]
    batch.extend_num_tokens = n
    return batch


def record_key_means(backend, forward, num_tokens: int) -> None:
    """Run ``forward`` (a model forward over ``num_tokens`` calibration tokens, through
    ``backend``) with the recorder answering its attention calls, and freeze the
    smoothing vectors of ``backend``'s 8-bit pool. Shared by the server
    (``calibrate_key_means``) and the offline harness, which runs its own model."""
    pool = backend.kv8_pool
    with backend.recording(KeyMeanRecorder(pool)) as recorder:
        try:
            forward()
        except CalibrationDone:
            pass
    missing = set(range(pool.start_layer, pool.start_layer + pool.layer_num)) - recorder.recorded
    if missing:
        raise RuntimeError(
            f"sage_attn: the 8-bit KV cache's calibration forward reached no attention in "
            f"layers {sorted(missing)}; set SGLANG_SAGE_ATTN_KV_SMOOTHING=none to serve "
            "without smoothing"
        )
    pool.needs_calibration = False
    norms = torch.stack([m.norm(dim=-1).max() for m in pool.k_mean])
    logger.info(
        "sage_attn: 8-bit KV cache smoothing calibrated on %d fixed tokens: largest key-mean "
        "norm per layer %.3g (median over layers %.3g)",
        num_tokens,
        norms.max().item(),
        norms.median().item(),
    )


def calibrate_key_means(model_runner, backend) -> None:
    """Fill ``backend``'s 8-bit pool's smoothing vectors from the calibration prompt."""
    from sglang.srt.model_executor.forward_context import ForwardContext, forward_context

    input_ids = calibration_token_ids(model_runner.model_config.vocab_size)
    batch = calibration_batch(model_runner, input_ids)

    def forward():
        with torch.inference_mode(), forward_context(ForwardContext(attn_backend=backend)):
            model_runner.model.forward(batch.input_ids, batch.positions, batch)

    record_key_means(backend, forward, input_ids.shape[0])
