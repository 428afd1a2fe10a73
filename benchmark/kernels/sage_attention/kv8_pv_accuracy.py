"""Which 8-bit P·V an attention kernel over sage_attn's 8-bit KV cache can use (CPU).

Simulates the exp2 online softmax tile by tile over the real cache (``write_kv8_ref``,
pages of 64) with each P·V variant, and prints the worst head's cosine against fp32
attention on the original K/V (the issue bars: >= 0.9995 random, >= 0.999 outliers):

- fp16: P in fp16 times the exact INT8 V (the kernels' default);
- int8_unit: INT8 P on one [0, 1] scale (step 1/127);
- int8_row_tile: INT8 P against each row's own largest value in the tile
  (``kv8_tiles.kv8_pv`` with PV_INT8; its twin is ``kv8_reference.int8_pv_softmax_ref``);
- fp8_p_exact_v: e4m3 P times the exact V (P's share of the FP8 error);
- fp8_p_fp8_v: e4m3 P times V stored in e4m3 with a per-token scale.

    python benchmark/kernels/sage_attention/kv8_pv_accuracy.py [--kv-len 4096 16384]
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "../../../test/srt"))
from sage_attention_inputs import ExtendCase, make_extend_inputs  # noqa: E402

from sglang.srt.layers.attention.sage_attention.kv8_cache import (  # noqa: E402
    allocate_kv8_cache,
    kv8_token_rows,
    write_kv8_ref,
)
from sglang.srt.layers.attention.sage_attention.reference import (  # noqa: E402
    attention_error,
    quantize_int8_blocks,
)

E4M3, E4M3_MAX, TILE = torch.float8_e4m3fn, 448.0, 64
VARIANTS = ("fp16", "int8_unit", "int8_row_tile", "fp8_p_exact_v", "fp8_p_fp8_v")


def tile_product(variant, p, v_int8, v_scale, v_orig):
    """One tile's P·V, ``p [H, E, N]``, INT8 ``v_int8 [H, N, Dv]`` with per-key scales."""
    tile_scale = v_scale.amax(-1, keepdim=True).clamp_min(1e-30)[:, None]  # [H, 1, 1]
    p_v = p * (v_scale[:, None, :] / tile_scale)
    if variant == "fp16":
        return p_v.half().float() @ v_int8 * tile_scale
    if variant == "int8_unit":
        return torch.round(p_v * 127) @ v_int8 * tile_scale / 127
    if variant == "int8_row_tile":
        row_max = p_v.amax(-1, keepdim=True).clamp_min(1e-30)
        return torch.floor(p_v * (127 / row_max) + 0.5) @ v_int8 * row_max * tile_scale / 127
    p_fp8 = lambda x: (x * E4M3_MAX).to(E4M3).float() / E4M3_MAX  # noqa: E731
    if variant == "fp8_p_exact_v":
        return p_fp8(p_v) @ v_int8 * tile_scale
    # V in e4m3 per token (from the original values), its scales folded into P as above.
    scale = v_orig.abs().amax(-1).clamp_min(1e-30) / E4M3_MAX  # [H, N]
    scale_max = scale.amax(-1, keepdim=True)[:, None]
    v_fp8 = (v_orig / scale[..., None]).to(E4M3).float()
    return p_fp8(p * (scale[:, None, :] / scale_max)) @ v_fp8 * scale_max


def worst_head_cos(kind, head_dim, kv_len, queries=512, q_heads=8, kv_heads=2):
    torch.manual_seed(0)
    case = ExtendCase(kind, (kv_len - queries,), (queries,), q_heads, kv_heads, head_dim=head_dim,
                      values=kind)  # fmt: skip
    x = make_extend_inputs(case)
    k = torch.cat([x["k_buffer"][x["kv_indices"]], x["k_extend"]])
    v = torch.cat([x["v_buffer"][x["kv_indices"]], x["v_extend"]])
    cache = allocate_kv8_cache(kv_len, kv_heads, head_dim, head_dim, "cpu",
                               k_mean=k.float().mean(0), page_size=64)  # fmt: skip
    slots = torch.arange(kv_len)
    write_kv8_ref(cache, slots, k, v)
    group = q_heads // kv_heads
    heads = lambda t: t.float().transpose(0, 1).repeat_interleave(group, 0)  # noqa: E731
    q = x["q_extend"].float().transpose(0, 1)
    hidden = torch.arange(kv_len)[None, :] > kv_len - queries + torch.arange(queries)[:, None]
    exact = ((q @ heads(k).transpose(1, 2)) / math.sqrt(head_dim)).masked_fill(
        hidden, float("-inf")
    ).softmax(-1) @ heads(v)
    k_int8, k_scale, v_int8, v_scale = kv8_token_rows(cache, slots)
    q_int8, q_scale = quantize_int8_blocks(q * math.log2(math.e) / math.sqrt(head_dim), 1)
    s = (q_int8.float() @ heads(k_int8).transpose(1, 2)) * q_scale.float() * heads(k_scale)[:, None]
    s = s.masked_fill(hidden, float("-inf"))
    result = {}
    for variant in VARIANTS:
        m = torch.full((q_heads, queries, 1), -1e30)
        row_sum, acc = torch.zeros_like(m), torch.zeros(q_heads, queries, head_dim)
        for lo in range(0, kv_len, TILE):
            tile = slice(lo, lo + TILE)
            m_new = torch.maximum(m, s[..., tile].amax(-1, keepdim=True))
            p, alpha = torch.exp2(s[..., tile] - m_new), torch.exp2(m - m_new)
            row_sum = row_sum * alpha + p.sum(-1, keepdim=True)
            acc = acc * alpha + tile_product(
                variant, p, heads(v_int8)[:, tile], heads(v_scale)[:, tile], heads(v)[:, tile]
            )
            m = m_new
        out = (acc / row_sum).transpose(0, 1)
        result[variant] = attention_error(out, exact.transpose(0, 1))[0]
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kv-len", type=int, nargs="+", default=[4096])
    args = parser.parse_args()
    print("| keys | hd | inputs | " + " | ".join(VARIANTS) + " |")
    print("|---" * (3 + len(VARIANTS)) + "|")
    for kv_len in args.kv_len:
        for head_dim in (64, 128):
            for kind in ("randn", "k_bias", "sink"):
                cos = worst_head_cos(kind, head_dim, kv_len)
                cells = " | ".join(f"{cos[v]:.5f}" for v in VARIANTS)
                print(f"| {kv_len} | {head_dim} | {kind} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
