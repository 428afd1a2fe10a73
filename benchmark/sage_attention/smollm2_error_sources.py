"""Where sage_attn's error on SmolLM2 comes from: each quantization step alone.

The fp32 model (``smollm2.py``) on the CPU, its attention replaced by exact causal
attention with ONE of sage_attn's quantization steps applied in torch (the steps of
the kernel's twin, ``reference.py``), so each step's cost shows in the end metric
(mean KL and top-1 agreement against the fp32 model, perplexity change) rather than
in a per-layer cosine. Not the kernel: the twin's arithmetic, dense and in fp32, so
the bf16 model error that every GPU backend also carries is absent here.

Steps (combinations as named):
  q_int8            Q per row to INT8 (the kernel's quantize_q_rows)
  k_int8_b128       K smoothed, INT8 per 128-key block (the shipped layout)
  k_int8_b128_raw   the same without smoothing
  k_int8_b32        K smoothed, INT8 per 32-key block
  k_int8_token      K smoothed, INT8 per key
  pv_fp16/fp8/int8  P and V as the P·V modes round them
  v_int8_row / v_fp8_row  V per row (the 8-bit KV cache's format, and its e4m3 alternative)
  k_int8_token_cal:P      K smoothed by a frozen per-layer mean key, as the 8-bit cache is,
                          recorded on calibration prompt P: ``random`` (the server's,
                          kv8_calibration.calibration_token_ids) or ``text`` (as many
                          tokens of the other text: code when measuring prose)

    python benchmark/sage_attention/smollm2_error_sources.py --windows 4 --context 1024
"""

from __future__ import annotations

import argparse
import json
import math
import os

import smollm2
import torch
import torch.nn.functional as F
from measure import compare, reference_logits, token_nll

from sglang.srt.layers.attention.sage_attention.kv8_calibration import (
    CALIBRATION_TOKENS,
    calibration_token_ids,
)
from sglang.srt.layers.attention.sage_attention.layout import FP8_E4M3_MAX, INT8_MAX, KV_BLOCK, PV
from sglang.srt.layers.attention.sage_attention.reference import (
    lowp_values,
    quantize_int8_blocks,
)
from sglang.srt.layers.attention.sage_attention.rotation import hadamard_matrix

VARIANTS = {
    "exact": (),
    "q_int8": ("q_int8",),
    "k_int8_b128": ("k_b128",),
    "k_int8_b128_raw": ("k_b128_raw",),
    "k_int8_b32": ("k_b32",),
    "k_int8_token": ("k_b1",),
    "pv_fp16": ("pv_fp16",),
    "pv_fp8": ("pv_fp8",),
    "pv_int8": ("pv_int8",),
    "qk_shipped (q_int8+k_int8_b128)": ("q_int8", "k_b128"),
    "qk_k_per_token (q_int8+k_int8_token)": ("q_int8", "k_b1"),
    "sage_fp16 (qk_shipped+pv_fp16)": ("q_int8", "k_b128", "pv_fp16"),
    "sage_int8 (qk_shipped+pv_int8)": ("q_int8", "k_b128", "pv_int8"),
    "sage_fp8 (qk_shipped+pv_fp8)": ("q_int8", "k_b128", "pv_fp8"),
    # Rotate Q and K by one orthonormal Hadamard matrix before quantizing (q·k is
    # unchanged; outlier channels are spread over all channels): ``rotate_qk``.
    "hadamard qk_shipped": ("hadamard", "q_int8", "k_b128"),
    "hadamard q_int8+k_int8_token": ("hadamard", "q_int8", "k_b1"),
    # The 8-bit KV cache's format (kv8_cache.py) as its extend kernel reads it: per-key
    # K scales, V per row (INT8, or the e4m3 alternative), FP16 P.
    "kv8 cache (q_int8+k_int8_token+v_int8_row)": ("q_int8", "k_b1", "v_int8_row"),
    "kv8 cache, e4m3 V (q_int8+k_int8_token+v_fp8_row)": ("q_int8", "k_b1", "v_fp8_row"),
    "kv8 cache rotated (hadamard+q_int8+k_int8_token+v_int8_row)": (
        "hadamard",
        "q_int8",
        "k_b1",
        "v_int8_row",
    ),
    # The smoothing vector as the server has it: frozen per layer and head, from a
    # calibration prompt, not each sequence's own mean (the rows above: the best case).
    "kv8 cache, K not smoothed": ("q_int8", "k_b1_raw", "v_int8_row"),
    "kv8 cache, K smoothed by the random-id calibration": (
        "q_int8",
        "k_b1_cal:random",
        "v_int8_row",
    ),
    "kv8 cache, K smoothed by a text calibration": ("q_int8", "k_b1_cal:text", "v_int8_row"),
    "kv8 cache rotated, K not smoothed": ("hadamard", "q_int8", "k_b1_raw", "v_int8_row"),
    "kv8 cache rotated, K smoothed by the random-id calibration (served at hd64)": (
        "hadamard",
        "q_int8",
        "k_b1_cal:random",
        "v_int8_row",
    ),
    "kv8 cache rotated, K smoothed by a text calibration": (
        "hadamard",
        "q_int8",
        "k_b1_cal:text",
        "v_int8_row",
    ),
}


def fake_int8(x: torch.Tensor, block: int) -> torch.Tensor:
    """[H, L, D] quantized to INT8 per ``block`` rows and back (the twin's rounding)."""
    values, scale = quantize_int8_blocks(x, block)
    return values.float() * scale


def quantized_attention(steps: tuple, length: int, key_means: dict | None = None):
    """attention(i, q, k, v) over one sequence with the given quantization steps;
    ``key_means[prompt][i]``: layer i's calibration mean key [Hkv, D] (``k_b*_cal:``)."""

    def attention(layer, q, k, v):
        q, k, v = (t.transpose(0, 1).float() for t in (q, k, v))  # [H, L, D]
        group = q.shape[0] // k.shape[0]
        scale = q.shape[-1] ** -0.5
        rotation = None
        if "hadamard" in steps:
            rotation = hadamard_matrix(q.shape[-1]) / math.sqrt(q.shape[-1])
            q, k = q @ rotation, k @ rotation
        if "q_int8" in steps:
            q = fake_int8(q, 1)
        for step in steps:
            if step.startswith("k_b"):
                block, _, smoothing = step.removeprefix("k_b").partition("_")
                # Smoothing subtracts a per-channel mean; q·mean is the same for every
                # key of a row, so softmax is unchanged and it is not added back.
                if smoothing == "raw":
                    mean = torch.zeros_like(k[:, :1])
                elif smoothing.startswith("cal:"):
                    mean = key_means[smoothing.removeprefix("cal:")][layer].float()[:, None]
                    mean = mean @ rotation if rotation is not None else mean
                else:
                    mean = k.mean(dim=1, keepdim=True)
                k = fake_int8(k - mean, int(block))
        if "v_int8_row" in steps:
            v = fake_int8(v, 1)
        if "v_fp8_row" in steps:
            v_scale = v.abs().amax(-1, keepdim=True).clamp_min(1e-12) / FP8_E4M3_MAX
            v = (v / v_scale).to(torch.float8_e4m3fn).float() * v_scale
        k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
        s = (q @ k.transpose(1, 2)) * (scale * math.log2(math.e))
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        s = s.masked_fill(~causal, float("-inf"))
        pv = next((PV(s.removeprefix("pv_")) for s in steps if s.startswith("pv_")), None)
        if pv is None:
            out = torch.softmax(s * math.log(2), dim=-1) @ v
        else:
            out = _lowp_pv(s, v, pv)
        return out.transpose(0, 1)

    return attention


def calibration_key_means(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's mean key [Hkv, D] over ``ids`` under exact attention, as the
    server's calibration forward records it (``kv8_calibration.KeyMeanRecorder``)."""
    means, exact = [], quantized_attention((), len(ids))

    def record(layer, q, k, v):
        means.append(k.float().mean(0))
        return exact(layer, q, k, v)

    model(ids, torch.arange(len(ids)), record)
    return means


def _lowp_pv(s: torch.Tensor, v: torch.Tensor, pv: PV) -> torch.Tensor:
    """P·V with P and V rounded as mode ``pv`` does; P per row, and for INT8 per
    128-key tile against the tile's own max (the kernel's scaling)."""
    v_low, v_scale = lowp_values(v, pv)
    v_low = v_low.float()
    m = s.amax(dim=-1, keepdim=True)
    if pv is PV.INT8:
        heads, rows, keys = s.shape
        tiles = F.pad(s, (0, -keys % KV_BLOCK), value=float("-inf")).view(heads, rows, -1, KV_BLOCK)
        m_tile = tiles.amax(dim=-1, keepdim=True).clamp_min(-1e30)
        p_int = torch.round(torch.exp2(tiles - m_tile) * INT8_MAX)
        weight = torch.exp2(m_tile - m.unsqueeze(-1)) / INT8_MAX
        p_exact = torch.exp2(tiles - m.unsqueeze(-1))
        p = (p_int * weight).flatten(2)[..., :keys]
        l = p_exact.flatten(2)[..., :keys].sum(-1, keepdim=True)
    else:
        p_exact = torch.exp2(s - m)
        offset = FP8_E4M3_MAX if pv is PV.FP8 else 1.0
        p = (p_exact * offset).to(pv.v_dtype).float() / offset
        l = p_exact.sum(-1, keepdim=True)
    return (p @ v_low) / l * v_scale


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--text", choices=["prose", "code"], default="prose")
    parser.add_argument("--smollm2-cache")
    parser.add_argument("--out", default=os.environ.get("OUT", "validation_out"))
    parser.add_argument("--variants", nargs="+", help="names of VARIANTS to run (default all)")
    args = parser.parse_args()
    torch.manual_seed(0)
    ckpt = smollm2.prepare(args.smollm2_cache)
    tokenizer = smollm2.load_tokenizer(ckpt)
    model = smollm2.load_model(ckpt, torch.float32, "cpu")
    text = smollm2.prose_text() if args.text == "prose" else smollm2.code_text()
    other_text = smollm2.code_text() if args.text == "prose" else smollm2.prose_text()
    stream = smollm2.token_stream(tokenizer, text)
    windows = smollm2.token_windows(stream, args.windows, args.context, seed=args.context)
    positions = torch.arange(args.context)
    rows = []
    with torch.no_grad():
        vocab_size = smollm2.load_config(ckpt)["vocab_size"]
        key_means = {
            "random": calibration_key_means(model, calibration_token_ids(vocab_size)),
            "text": calibration_key_means(
                model, smollm2.token_stream(tokenizer, other_text)[:CALIBRATION_TOKENS]
            ),
        }
        exact = [reference_logits(model, w[None]) for w in windows]
        nll_exact = torch.cat([token_nll(e, w[None]) for e, w in zip(exact, windows, strict=True)])
        for name, steps in VARIANTS.items():
            if args.variants and name not in args.variants:
                continue
            logits = [
                model(w, positions, quantized_attention(steps, args.context, key_means)).view(
                    1, len(w), -1
                )
                for w in windows
            ]
            stats = [compare(e, lg) for e, lg in zip(exact, logits, strict=True)]
            nll = torch.cat([token_nll(lg, w[None]) for lg, w in zip(logits, windows, strict=True)])
            row = dict(
                variant=name,
                kl_mean=sum(s["kl_mean"] for s in stats) / len(stats),
                top1_agreement=sum(s["top1_agreement"] for s in stats) / len(stats),
                dppl=math.exp(nll.mean().item() - nll_exact.mean().item()) - 1.0,
            )
            rows.append(row)
            print(
                f"{name:40s} KL {row['kl_mean']:.2e}  top-1 {100 * row['top1_agreement']:.3f}%"
                f"  dPPL {100 * row['dppl']:+.3f}%",
                flush=True,
            )
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"smollm2_error_sources_{args.text}_{args.context}.json")
    with open(path, "w") as f:
        json.dump(dict(context=args.context, windows=args.windows, text=args.text, rows=rows), f)
    print("wrote", path)


if __name__ == "__main__":
    main()
