"""Time and peak memory of one 8B-shaped attention layer (hidden 4096, 32 query / 8 KV
heads of 128, bf16, random weights) through SGLang's backends and through cuDNN.

A layer call is QKV projection, RoPE, attention (writing the KV cache for the
SGLang backends) and the output projection; the per-batch metadata is built once,
outside the timing, as a server builds it once for all layers.
"""

from __future__ import annotations

import torch
import triton
from byte_model import rope
from sglang_stack import SGLangStack

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 4096, 32, 8, 128
DECODE_KV = 4096


def _weights():
    gen = torch.Generator(device="cuda").manual_seed(0)

    def w(rows, cols):
        return (
            torch.randn(rows, cols, device="cuda", generator=gen, dtype=torch.bfloat16) * rows**-0.5
        )

    return w(HIDDEN, (HEADS + 2 * KV_HEADS) * HEAD_DIM), w(HEADS * HEAD_DIM, HIDDEN)


def _qkv(h, positions, w_qkv):
    q, k, v = (h @ w_qkv).split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], -1)
    q = rope(q.view(-1, HEADS, HEAD_DIM), positions, 10000.0)
    k = rope(k.view(-1, KV_HEADS, HEAD_DIM), positions, 10000.0)
    return q, k, v.view(-1, KV_HEADS, HEAD_DIM)


def _measure(fn) -> dict:
    """Median ms; peak memory of one call (absolute, and above what was allocated before)."""
    fn()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    ms = triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median")
    return dict(ms=ms, peak_mib=(peak - before) / 2**20, peak_total_mib=peak / 2**20)


def _sglang_layer(stack, fb, w_qkv, w_o):
    from sglang.srt.model_executor.forward_context import ForwardContext, forward_context

    layer = stack.layers[0]

    def run(h):
        with forward_context(ForwardContext(attn_backend=stack.backend)):
            q, k, v = _qkv(h, fb.positions, w_qkv)
            out = layer(q.flatten(1), k.flatten(1), v.flatten(1), fb)
            return out @ w_o

    return run


def time_8b_layer(quick: bool = False) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention

    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    w_qkv, w_o = _weights()
    prefill_lens = [1024, 4096] if quick else [1024, 2048, 4096, 8192, 16384, 32768]
    decode_batches = [1, 8] if quick else [1, 8, 32, 64]
    rows = []

    def make_stack(key, max_batch, max_context):
        return SGLangStack(
            key,
            1,
            HEADS,
            KV_HEADS,
            HEAD_DIM,
            device="cuda",
            dtype=torch.bfloat16,
            max_batch=max_batch,
            max_context=max_context,
        )

    # Per backend: one pool sized for the longest prefill, one for the widest decode.
    stacks = {
        key: (
            make_stack(key, 1, max(prefill_lens) + 16),
            make_stack(key, max(decode_batches), DECODE_KV + 16),
        )
        for key in ("triton", "sage_fp16", "sage_fp8", "sage_int8", "sage_fp16_rot")
    }
    with torch.no_grad():
        for n in prefill_lens:
            h = torch.randn(n, HIDDEN, device="cuda", dtype=torch.bfloat16)
            for key, (stack, _) in stacks.items():
                stack.begin(1, n)
                fb = stack._batch(ForwardMode.EXTEND, 0, n, 1)
                stack.backend.init_forward_metadata(fb)
                run = _sglang_layer(stack, fb, w_qkv, w_o)
                rows.append(
                    dict(phase="prefill", size=n, impl=key, **_measure(lambda r=run, h=h: r(h)))
                )
                stack.require_sage_kernel()
            positions = torch.arange(n, device="cuda")

            def cudnn(h=h, positions=positions, n=n):
                q, k, v = _qkv(h, positions, w_qkv)
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    out = scaled_dot_product_attention(
                        q.transpose(0, 1)[None],
                        k.transpose(0, 1)[None],
                        v.transpose(0, 1)[None],
                        is_causal=True,
                        enable_gqa=True,
                    )
                return out[0].transpose(0, 1).reshape(n, -1) @ w_o

            rows.append(
                dict(phase="prefill", size=n, impl="sdpa_cudnn (no KV cache)", **_measure(cudnn))
            )
        for batch in decode_batches:
            h = torch.randn(batch, HIDDEN, device="cuda", dtype=torch.bfloat16)
            for key, (_, stack) in stacks.items():
                stack.begin(batch, DECODE_KV + 1)
                pool = stack.runner.token_to_kv_pool
                pool.get_key_buffer(0).normal_()  # a cached context to read, not zeros
                pool.get_value_buffer(0).normal_()
                fb = stack._batch(ForwardMode.DECODE, DECODE_KV, 1, batch)
                stack.backend.init_forward_metadata(fb)
                run = _sglang_layer(stack, fb, w_qkv, w_o)
                rows.append(
                    dict(phase="decode", size=batch, impl=key, **_measure(lambda r=run, h=h: r(h)))
                )
    return rows


def main():
    import argparse
    import json
    import os

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    rows = time_8b_layer(args.quick)
    with open(os.path.join(args.out, "layer_8b.json"), "w") as f:
        json.dump(rows, f, indent=1)
    for r in rows:
        print(
            f"{r['phase']:8} {r['size']:>6} {r['impl']:26} {r['ms']:9.3f} ms "
            f"peak {r['peak_total_mib']:8.0f} MiB (+{r['peak_mib']:.0f})"
        )


if __name__ == "__main__":
    main()
