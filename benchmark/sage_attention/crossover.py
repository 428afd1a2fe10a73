"""Measure the crossover of sage_attn's 8-bit kernel against its base backend (GPU).

    python benchmark/sage_attention/crossover.py --bases fa4 triton --head-dims 64 128

For each base and head dim: one attention layer of an 8B-shaped model (32 query / 8 KV
heads, bf16, SGLang's pool at page size 1, a server's default) called as a server calls
it (``RadixAttention`` -> the backend's ``forward_extend``: the KV write, and for
sage_attn the per-call re-quantization of the request's cached prefix), for one request
per chunk length over a fresh prefix and a 75%-cached one (3 x the chunk), through

- the base itself (SGLang's ``fa4`` / ``triton`` backend), and
- ``sage_attn`` on that base with every chunk on the 8-bit kernel (crossover 0; its
  8-bit op is counted, and a run that did not reach it fails).

The per-batch metadata is built outside the timing, as a server builds it once for all
layers. ``crossover.decide`` turns each (base, head dim)'s rows into the entry of
``sage_attention/crossover.py``'s table; the JSON holds rows and decisions.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import triton
from sglang_stack import SGLangStack

Q_HEADS, KV_HEADS = 32, 8
DEVICE, DTYPE = "cuda", torch.bfloat16


def time_layer(stack, head_dim: int, chunk_len: int, prefix_len: int) -> float:
    """Median ms of one layer call: ``chunk_len`` new tokens over ``prefix_len`` cached,
    the request's slots in order (a fresh server's allocation)."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    from sglang.srt.model_executor.forward_context import ForwardContext, forward_context

    stack.begin(1, prefix_len + chunk_len, layout="contiguous")
    fb = stack._batch(ForwardMode.EXTEND, prefix_len, chunk_len, 1)
    gen = torch.Generator(device=DEVICE).manual_seed(chunk_len + prefix_len)

    def randn(heads):
        return torch.randn(chunk_len, heads * head_dim, device=DEVICE, generator=gen).to(DTYPE)

    q, k, v = randn(Q_HEADS), randn(KV_HEADS), randn(KV_HEADS)
    layer = stack.layers[0]
    with forward_context(ForwardContext(attn_backend=stack.backend)):
        stack.backend.init_forward_metadata(fb)
        return triton.testing.do_bench(
            lambda: layer(q, k, v, fb), warmup=25, rep=100, return_mode="median"
        )


def measure(bases, head_dims, chunk_lens) -> list[dict]:
    from sglang_stack import SGLANG_BACKENDS

    from sglang.srt.layers.attention.sage_attention.settings import BASE_BACKEND_ENV

    max_context = max(chunk_lens) * 4 + 16
    rows = []
    for base in bases:
        # The base alone, and sage_attn on it (defaults: fp16 P·V, rotation auto).
        SGLANG_BACKENDS[base] = (base, {})
        SGLANG_BACKENDS[f"sage_on_{base}"] = ("sage_attn", {BASE_BACKEND_ENV: base})
        for head_dim in head_dims:
            stacks = {
                key: SGLangStack(
                    key,
                    1,
                    Q_HEADS,
                    KV_HEADS,
                    head_dim,
                    device=DEVICE,
                    dtype=DTYPE,
                    max_batch=1,
                    max_context=max_context,
                    page_size=1,
                )  # fmt: skip
                for key in (base, f"sage_on_{base}")
            }
            for stack in stacks.values():
                pool = stack.runner.token_to_kv_pool
                pool.get_key_buffer(0).normal_()  # a cached prefix to read, not zeros
                pool.get_value_buffer(0).normal_()
            for chunk_len in chunk_lens:
                for prefix_len in (0, 3 * chunk_len):
                    base_ms = time_layer(stacks[base], head_dim, chunk_len, prefix_len)
                    sage_ms = time_layer(stacks[f"sage_on_{base}"], head_dim, chunk_len, prefix_len)
                    rows.append(
                        dict(
                            base=base,
                            head_dim=head_dim,
                            chunk_len=chunk_len,
                            prefix_len=prefix_len,
                            base_ms=base_ms,
                            sage_ms=sage_ms,
                            gain=base_ms / sage_ms,
                        )  # fmt: skip
                    )
                    print(json.dumps(rows[-1]), flush=True)
            stacks[f"sage_on_{base}"].require_sage_kernel()
            del stacks
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
    return rows


def decisions(rows) -> dict[str, int | None]:
    from sglang.srt.layers.attention.sage_attention.crossover import decide

    keys = sorted({(r["base"], r["head_dim"]) for r in rows})
    return {
        f"{base}/{hd}": decide([r for r in rows if (r["base"], r["head_dim"]) == (base, hd)])
        for base, hd in keys
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bases", nargs="+", default=["fa4", "triton"])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument(
        "--chunk-lens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768]
    )
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    import sglang
    from sglang.srt.layers.attention.sage_attention.crossover import MIN_GAIN, arch_of

    rows = measure(args.bases, args.head_dims, args.chunk_lens)
    decided = decisions(rows)
    device = torch.cuda.get_device_name()
    result = dict(
        device=device, arch=arch_of("cuda"), sglang=sglang.__version__,
        torch=torch.__version__, triton=triton.__version__, min_gain=MIN_GAIN,
        command="python benchmark/sage_attention/crossover.py --bases "
        + " ".join(args.bases) + " --head-dims " + " ".join(map(str, args.head_dims)),
        decisions=decided, rows=rows,
    )  # fmt: skip
    tag = device.split()[-1].lower().replace(" ", "_")  # "h100 80gb hbm3" -> "hbm3"
    tag = next((w.lower() for w in device.split() if w.upper().startswith("H")), tag)
    path = os.path.join(args.out, f"{tag}_crossover.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")
    print("| base | hd | chunk | prefix | base ms | sage ms | gain |")
    for r in rows:
        print(
            f"| {r['base']} | {r['head_dim']} | {r['chunk_len']} | {r['prefix_len']} | "
            f"{r['base_ms']:.3f} | {r['sage_ms']:.3f} | {r['gain']:.2f}x |"
        )
    print("decisions (shortest chunk on the 8-bit kernel; None = never):", decided)


if __name__ == "__main__":
    main()
