"""sage_attn kernel benchmark: side by side with torch SDPA (flash, cuDNN) and SGLang's Triton.

One process, the same inputs for every implementation, medians of
``triton.testing.do_bench``. TOPS count only the visible (query, key) pairs:
4 * H * D * pairs, pairs = Lq*Lk (full) or the bottom-right causal triangle.

    python benchmark/kernels/sage_attention/bench_sage_attention.py --quick
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import asdict, dataclass

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention

from sglang.kernels.ops.attention.extend_attention import extend_attention_fwd
from sglang.srt.layers.attention.sage_attention import sage_extend_attention
from sglang.srt.layers.attention.sage_attention.extend_attention import (
    sage_attention_from_packed,
    tile_config,
)
from sglang.srt.layers.attention.sage_attention.quantize import quantize_kv
from sglang.srt.layers.attention.sage_attention.reference import attention_error


@dataclass
class Row:
    kind: str  # "dense" (no cached prefix)
    impl: str
    batch: int
    q_heads: int
    kv_heads: int
    head_dim: int
    q_len: int
    kv_len: int
    causal: bool
    ms: float
    tops: float
    cos: float
    rel_l1: float


def visible_pairs(q_len: int, kv_len: int, causal: bool) -> int:
    if not causal:
        return q_len * kv_len
    prefix = kv_len - q_len
    return q_len * prefix + q_len * (q_len + 1) // 2


def dense_inputs(batch, q_heads, kv_heads, head_dim, seq_len, dtype=torch.bfloat16):
    """One ragged-extend batch of ``batch`` requests with no cached prefix."""
    tokens = batch * seq_len
    q = torch.randn(tokens, q_heads, head_dim, dtype=dtype, device="cuda")
    k = torch.randn(tokens, kv_heads, head_dim, dtype=dtype, device="cuda")
    v = torch.randn(tokens, kv_heads, head_dim, dtype=dtype, device="cuda")
    qo_indptr = torch.arange(0, tokens + 1, seq_len, dtype=torch.int32, device="cuda")
    return dict(
        q_extend=q,
        k_extend=k,
        v_extend=v,
        o_extend=torch.empty_like(q),
        k_buffer=torch.empty((1, kv_heads, head_dim), dtype=dtype, device="cuda"),
        v_buffer=torch.empty((1, kv_heads, head_dim), dtype=dtype, device="cuda"),
        qo_indptr=qo_indptr,
        kv_indptr=torch.zeros(batch + 1, dtype=torch.int32, device="cuda"),
        kv_indices=torch.empty(0, dtype=torch.int64, device="cuda"),
        max_len_extend=seq_len,
    )


def implementations(inputs, causal, batch, seq_len):
    """name -> zero-argument callable returning the output as [tokens, Hq, D]."""
    q, k, v = inputs["q_extend"], inputs["k_extend"], inputs["v_extend"]
    q_heads, head_dim = q.shape[1], q.shape[2]
    group = q_heads // k.shape[1]

    def bhld(x):
        return x.view(batch, seq_len, x.shape[1], head_dim).transpose(1, 2)

    def sdpa(backend):
        def run():
            with sdpa_kernel(backend):
                out = scaled_dot_product_attention(
                    bhld(q), bhld(k), bhld(v), is_causal=causal, enable_gqa=group > 1
                )
            return out.transpose(1, 2).reshape(q.shape)

        return run

    def sage(pv):
        def run():
            sage_extend_attention(**inputs, causal=causal, pv=pv)
            return inputs["o_extend"]

        return run

    def sage_kernel_only(pv):
        packed = quantize_kv(
            k, v, inputs["k_buffer"], inputs["v_buffer"], inputs["qo_indptr"],
            inputs["kv_indptr"], inputs["kv_indices"], pv_fp8=pv == "fp8",
        )  # fmt: skip
        config = tile_config(head_dim, causal, pv, q.device)

        def run():
            sage_attention_from_packed(
                q, inputs["o_extend"], packed, inputs["qo_indptr"], inputs["kv_indptr"],
                seq_len, head_dim**-0.5, causal, config,
            )  # fmt: skip
            return inputs["o_extend"]

        return run

    def sglang_triton():
        extend_attention_fwd(
            q, k, v, inputs["o_extend"], inputs["k_buffer"], inputs["v_buffer"],
            inputs["qo_indptr"], inputs["kv_indptr"], inputs["kv_indices"], None, causal,
            None, seq_len, 1.0, 1.0,
        )  # fmt: skip
        return inputs["o_extend"]

    impls = {
        "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
        "sglang_triton": sglang_triton,
    }
    for pv in ("fp16", "fp8"):
        impls[f"sage_{pv}"] = sage(pv)
        impls[f"sage_{pv}_kernel_only"] = sage_kernel_only(pv)
    return impls


def reference_slice(inputs, causal, seq_len, rows=256):
    """fp32 reference for the last ``rows`` queries of request 0, every head."""
    rows = min(rows, seq_len)
    q = inputs["q_extend"][seq_len - rows : seq_len].float()
    k = inputs["k_extend"][:seq_len].float()
    v = inputs["v_extend"][:seq_len].float()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[2])
    if causal:
        visible = (
            torch.arange(seq_len, device="cuda")[None, :]
            <= (torch.arange(seq_len - rows, seq_len, device="cuda")[:, None])
        )
        scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v), slice(seq_len - rows, seq_len)


def bench_dense(args, head_dim, seq_len, causal) -> list[Row]:
    batch = max(1, args.tokens // seq_len)
    q_heads, kv_heads = args.q_heads, args.kv_heads
    inputs = dense_inputs(batch, q_heads, kv_heads, head_dim, seq_len)
    ref, rows = reference_slice(inputs, causal, seq_len)
    pairs = batch * visible_pairs(seq_len, seq_len, causal)
    results = []
    for name, run in implementations(inputs, causal, batch, seq_len).items():
        try:
            out = run()
            cos, rel_l1 = attention_error(out[rows], ref)
            ms = triton.testing.do_bench(run, warmup=args.warmup_ms, rep=args.rep_ms)
        except Exception as exc:  # a baseline that cannot run this shape
            print(f"  {name}: skipped ({type(exc).__name__}: {str(exc)[:80]})")
            continue
        tops = 4 * q_heads * head_dim * pairs / (ms * 1e-3) / 1e12
        results.append(
            Row("dense", name, batch, q_heads, kv_heads, head_dim, seq_len, seq_len, causal,
                ms, tops, cos, rel_l1)
        )  # fmt: skip
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="hd128, 8K, causal and not")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 4096, 8192, 32768])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32768, help="batch = tokens // seq_len")
    parser.add_argument("--warmup-ms", type=int, default=100)
    parser.add_argument("--rep-ms", type=int, default=500)
    parser.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = parser.parse_args()
    if args.quick:
        args.seq_lens, args.head_dims = [8192], [128]
    os.makedirs(args.out, exist_ok=True)

    rows: list[Row] = []
    for head_dim in args.head_dims:
        for seq_len in args.seq_lens:
            for causal in (False, True):
                print(f"dense hd{head_dim} L={seq_len} causal={causal}", flush=True)
                rows += bench_dense(args, head_dim, seq_len, causal)

    with open(os.path.join(args.out, "bench_sage_attention.json"), "w") as f:
        json.dump([asdict(r) for r in rows], f, indent=1)
    header = ("impl", "hd", "L", "causal", "ms", "TOPS", "cos", "relL1")
    print("\n{:24} {:>4} {:>6} {:>6} {:>9} {:>7} {:>9} {:>7}".format(*header))
    for r in rows:
        print(
            f"{r.impl:24} {r.head_dim:>4} {r.q_len:>6} {r.causal!s:>6} {r.ms:9.3f} "
            f"{r.tops:7.1f} {r.cos:9.6f} {r.rel_l1:7.4f}"
        )


if __name__ == "__main__":
    main()
