"""Model-level validation of sage_attn: a trained byte model run through SGLang's batches.

The model's attention layers are SGLang ``RadixAttention`` layers over real pools
(the attention test kit's runner pattern), driven through the registered backend
exactly as a server drives it: prefill in chunks (later chunks read the cached
prefix through shuffled pages), then decode steps. Backends: ``triton`` (the bf16
baseline), ``sage_attn`` with P·V in fp16 and in fp8 (short-chunk crossover 0:
every chunk on the 8-bit kernel), and an fp32 torch reference.

    python benchmark/sage_attention/validate.py --checkpoint benchmark/sage_attention/byte-granite
    python benchmark/sage_attention/validate.py --report-from results.json   # markdown + PNGs
    python benchmark/sage_attention/validate.py --quick --cpu   # smoke run (VALIDATION.md)
    python benchmark/sage_attention/validate.py --model smollm2   # validate_smollm2.py

Measured on held-out standard-library text: perplexity and bits/byte at several
contexts; per-token KL and top-1 agreement against the baseline; greedy
generation divergence; layer-by-layer drift against fp32; bitwise determinism;
needle retrieval; and (GPU) time and peak memory of an 8B-shaped attention layer.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sys

import torch
import validate_smollm2
from byte_model import ByteLlama, ByteLlamaConfig, load_checkpoint, stdlib_corpus, windows
from measure import (
    BASELINE,
    compare,
    drift_and_determinism,
    greedy_divergence,
    quick_note,
    reference_greedy,
    reference_logits,
    token_nll,
)
from measure import render_report as render_tables
from sglang_stack import SGLANG_BACKENDS, build_stacks


def needle_prompts(held_out: bytes, lengths, depths, trials, seed=0):
    """Filler code with ``name = "value"`` inserted at a depth, ending with
    ``assert name == "`` -- the model must copy the value from far back."""
    rng = random.Random(seed)
    cases = []
    for length in lengths:
        for depth in depths:
            for t in range(trials):
                name = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6)) + "_id"
                value = str(rng.randrange(10**5, 10**6))
                needle, question = (
                    f'\n{name} = "{value}"\n'.encode(),
                    f'\nassert {name} == "'.encode(),
                )
                filler_len = length - len(needle) - len(question)
                start = rng.randrange(0, len(held_out) - filler_len)
                filler = held_out[start : start + filler_len].replace(b"\0", b"\n")
                cut = int(depth * filler_len)
                text = filler[:cut] + needle + filler[cut:] + question
                cases.append(
                    dict(length=length, depth=depth, trial=t, value=value, tokens=list(text))
                )
    return cases


def run_needles(generate, cases):
    """generate(tokens [B, L], steps) -> [B, steps]; returns per-case success."""
    results = []
    for length in sorted({c["length"] for c in cases}):
        group = [c for c in cases if c["length"] == length]
        steps = len(group[0]["value"]) + 1
        out = generate(torch.tensor([c["tokens"] for c in group]), steps)
        for c, row in zip(group, out.tolist(), strict=True):
            answer = bytes(row).decode("latin-1")
            results.append(dict(length=length, depth=c["depth"], ok=answer == c["value"] + '"'))
    return results


def configure(args) -> None:
    """The run's sizes: ``--quick`` a smoke run of every step, else the full grid."""
    if args.quick:  # every step once, at the least that still chunks and decodes
        args.contexts, args.windows_per_context = [64], [2]
        args.prompts, args.prompt_len, args.gen_steps = 2, 64, 2
        args.needle_lengths, args.needle_depths, args.needle_trials = [96], [0.5], 1
    else:
        args.contexts, args.windows_per_context = [512, 2048, 4096], [32, 8, 8]
        args.prompts, args.prompt_len, args.gen_steps = 50, 512, 64
        args.needle_lengths, args.needle_depths, args.needle_trials = (
            [1024, 2048, 4000],
            [0.1, 0.5, 0.9],
            8,
        )


def load_models(args, dtype, device):
    """(model in ``dtype``, the same model in fp32): the checkpoint's, or with
    ``--tiny-random-model`` ``ByteLlamaConfig.tiny()`` with seeded random weights."""
    torch.manual_seed(0)
    if not args.tiny_random_model:
        return (
            load_checkpoint(args.checkpoint, dtype, device),
            load_checkpoint(args.checkpoint, torch.float32, device),
        )
    model32 = ByteLlama(ByteLlamaConfig.tiny()).to(device).eval().requires_grad_(False)
    return copy.deepcopy(model32).to(dtype), model32


def run_validation(args) -> dict:
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    # bf16 like a server; fp16 on the CPU interpreter (its bf16 is broken).
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    model, model32 = load_models(args, dtype, device)
    c = model.config
    _, held_out = stdlib_corpus()
    longest = max(*args.contexts, *args.needle_lengths, args.prompt_len)
    max_ctx = longest + max(args.gen_steps, 7) + 16  # a needle's answer: 6 digits and '"'
    max_batch = max(max(args.windows_per_context), args.prompts)
    stacks = build_stacks(
        args.backends, c, device=device, dtype=dtype, max_batch=max_batch, max_context=max_ctx
    )
    for stack in stacks.values():  # the 8-bit cache's smoothing, as a server has it
        stack.calibrate(model)
    from tqdm import tqdm

    result = dict(
        device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
        dtype=str(dtype),
        checkpoint="tiny random (seed 0)" if args.tiny_random_model else args.checkpoint,
        quick=args.quick,
        torch=torch.__version__,
        backends=args.backends,
        perplexity=[],
        agreement=[],
        drift=[],
        determinism={},
        generation={},
        needle={},
    )
    progress = tqdm(total=len(args.contexts) + 4, desc="validate", unit="step")
    with torch.no_grad():
        last_tokens = None
        for ctx, count in zip(args.contexts, args.windows_per_context, strict=True):
            tokens = windows(held_out, count, ctx, seed=ctx).to(device)
            chunk = max(ctx // 4, 16)
            logits = {"fp32": reference_logits(model32, tokens)}
            for key, stack in stacks.items():
                stack.begin(count, ctx)
                logits[key] = stack.prefill(model, tokens, chunk)
            for key, lg in logits.items():
                nll = token_nll(lg, tokens).mean().item()
                result["perplexity"].append(
                    dict(
                        context=ctx,
                        windows=count,
                        backend=key,
                        nll=nll,
                        ppl=math.exp(nll),
                        bits_per_byte=nll / math.log(2),
                    )
                )
            for key in stacks:
                for base in (BASELINE, "fp32"):
                    if key != base:
                        result["agreement"].append(
                            dict(
                                context=ctx,
                                backend=key,
                                against=base,
                                **compare(logits[base], logits[key]),
                            )
                        )
            last_tokens, last_chunk = tokens[:2], chunk
            progress.update()

        # Layer drift and determinism on the longest context.
        drift_and_determinism(stacks, model, model32, last_tokens, last_chunk, result)
        progress.update()

        # Greedy generation: tokens before the first divergence from the baseline.
        prompts = windows(held_out, args.prompts, args.prompt_len, seed=7).to(device)
        gen = {
            k: s.greedy(model, prompts, args.gen_steps, args.prompt_len // 2)
            for k, s in stacks.items()
        }
        gen["fp32"] = reference_greedy(model32, prompts, args.gen_steps)
        result["generation"] = greedy_divergence(gen, args.gen_steps)
        progress.update()

        # Needle retrieval at several depths and lengths.
        cases = needle_prompts(
            held_out, args.needle_lengths, args.needle_depths, args.needle_trials
        )
        generators = {
            k: (lambda t, n, s=s: s.greedy(model, t.to(device), n, 256)) for k, s in stacks.items()
        }
        generators["fp32"] = lambda t, n: reference_greedy(model32, t.to(device), n)
        for key, generate in generators.items():
            result["needle"][key] = run_needles(generate, cases)
        progress.update()

    if device == "cuda" and not args.skip_layer_timing:
        from layer_timing import time_8b_layer

        result["layer_8b"] = time_8b_layer(args.quick)
    progress.update()
    progress.close()
    return result


def render_report(result: dict) -> str:
    """Markdown tables from a result JSON."""
    lines = [render_tables(result).rstrip("\n")]
    if "layer_8b" in result:
        lines += [
            "",
            "### 8B-shaped attention layer (hidden 4096, 32/8 heads, hd128, bf16)",
            "",
            "| phase | tokens / batch | impl | ms | peak MiB of the call (above resident) |",
            "|---|---|---|---|---|",
        ]
        for r in result["layer_8b"]:
            lines.append(
                f"| {r['phase']} | {r['size']} | {r['impl']} | {r['ms']:.3f} | "
                f"{r['peak_total_mib']:.0f} ({r['peak_mib']:.0f}) |"
            )
    return "\n".join(lines) + "\n"


def plots(result: dict, out_dir: str) -> None:
    """validation_bpb.png (and validation_layer_8b.png) when matplotlib is there."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in sorted({r["backend"] for r in result["perplexity"]}):
        pts = sorted(
            (r["context"], r["bits_per_byte"]) for r in result["perplexity"] if r["backend"] == key
        )
        ax.plot(*zip(*pts, strict=True), marker="o", label=key)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (bytes)")
    ax.set_ylabel("bits per byte")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "validation_bpb.png"), dpi=110)
    if "layer_8b" in result:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, phase in zip(axes, ("prefill", "decode"), strict=True):
            rows = [r for r in result["layer_8b"] if r["phase"] == phase]
            for impl in sorted({r["impl"] for r in rows}):
                pts = sorted((r["size"], r["ms"]) for r in rows if r["impl"] == impl)
                ax.plot(*zip(*pts, strict=True), marker="o", label=impl)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("tokens" if phase == "prefill" else "batch (KV 4096 each)")
            ax.set_ylabel("ms per layer call")
            ax.set_title(phase)
            ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "validation_layer_8b.png"), dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint", default=os.path.join(os.path.dirname(__file__), "byte-granite")
    )
    parser.add_argument(
        "--tiny-random-model",
        action="store_true",
        help="a 2-layer head-dim-64 byte model with random weights instead of --checkpoint "
        "(the CI smoke run: the pipeline, not accuracy)",
    )
    parser.add_argument("--out", default=os.environ.get("OUT", "validation_out"))
    parser.add_argument("--quick", action="store_true", help="small shapes, a few tokens")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (Triton interpreter)")
    parser.add_argument("--backends", nargs="+", default=list(SGLANG_BACKENDS))
    parser.add_argument("--skip-layer-timing", action="store_true")
    parser.add_argument("--report-from", metavar="JSON", help="only render the report of a run")
    parser.add_argument("--model", choices=["byte", "smollm2"], default="byte")
    smol = parser.add_argument_group("--model smollm2 (validate_smollm2.py)")
    smol.add_argument("--smollm2-cache", help="default $SAGE_ATTN_SMOLLM2_CACHE or ~/.cache/...")
    smol.add_argument("--layers", type=int, help="run only the first N layers")
    smol.add_argument("--chat-prompt", default="What is the capital of France?")
    smol.add_argument("--task-lengths", type=int, nargs="+", help="default 1K 2K 4K 8K")
    smol.add_argument("--task-trials", type=int, help="cases per (task, length, depth); 4")
    args = parser.parse_args()
    if args.cpu and os.environ.get("TRITON_INTERPRET") != "1":
        # The interpreter is chosen when triton is imported (already done above):
        # start again with it switched on, so `--cpu` works as the only flag.
        env = dict(os.environ, TRITON_INTERPRET="1")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    byte_model = args.model == "byte"
    if byte_model:
        name, setup, run, render = "validation", configure, run_validation, render_report
    else:
        name, harness = "validation_smollm2", validate_smollm2
        setup, run, render = harness.configure, harness.run, harness.render
    if args.report_from:
        with open(args.report_from) as f:
            result, out_dir = json.load(f), os.path.dirname(os.path.abspath(args.report_from))
    else:
        os.makedirs(args.out, exist_ok=True)
        setup(args)
        result, out_dir = run(args), args.out
        with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
            json.dump(result, f, indent=1)
    report = quick_note(result) + render(result)
    if byte_model:
        plots(result, out_dir)
    if not args.report_from:
        with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
            f.write(report)
    print(report)


if __name__ == "__main__":
    sys.exit(main())
