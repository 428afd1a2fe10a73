"""Model-level validation of sage_attn: a trained byte model run through SGLang's batches.

The model's attention layers are SGLang ``RadixAttention`` layers over real pools
(the attention test kit's runner pattern), driven through the registered backend
exactly as a server drives it: prefill in chunks (later chunks read the cached
prefix through shuffled pages), then decode steps. Backends: ``triton`` (the bf16
baseline), ``sage_attn`` with P·V in fp16 and in fp8 (short-chunk crossover 0:
every chunk on the 8-bit kernel), and an fp32 torch reference.

    python benchmark/sage_attention/validate.py --checkpoint benchmark/sage_attention/byte-granite
    python benchmark/sage_attention/validate.py --report-from results.json   # markdown + PNGs

Measured on held-out standard-library text: perplexity and bits/byte at several
contexts; per-token KL and top-1 agreement against the baseline; greedy
generation divergence; layer-by-layer drift against fp32; bitwise determinism;
needle retrieval; and (GPU) time and peak memory of an 8B-shaped attention layer.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys

import torch
import torch.nn.functional as F
from byte_model import causal_sdpa, load_checkpoint, stdlib_corpus, windows
from sglang_stack import SGLANG_BACKENDS, build_stacks

BASELINE = "triton"


def reference_logits(model32, tokens, capture=None):
    batch, n = tokens.shape
    positions = torch.arange(n, device=tokens.device).repeat(batch)
    return model32(tokens.flatten(), positions, causal_sdpa(batch, n), capture).view(batch, n, -1)


def reference_greedy(model32, prompts, steps):
    tokens = prompts
    for _ in range(steps):
        nxt = reference_logits(model32, tokens)[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], dim=1)
    return tokens[:, prompts.shape[1] :].cpu()


def token_nll(logits, tokens):
    """Next-token NLL per position [B, n-1] (nats)."""
    return F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), tokens[:, 1:], reduction="none")


def compare(base_logits, logits):
    logp_base, logp = base_logits.float().log_softmax(-1), logits.float().log_softmax(-1)
    kl = (logp_base.exp() * (logp_base - logp)).sum(-1)
    return dict(
        kl_mean=kl.mean().item(),
        kl_max=kl.max().item(),
        top1_agreement=(logp_base.argmax(-1) == logp.argmax(-1)).float().mean().item(),
    )


def drift(a: torch.Tensor, ref: torch.Tensor) -> dict:
    a, ref = a.double().flatten(), ref.double().flatten()
    return dict(
        cos=F.cosine_similarity(a, ref, dim=0).item(), rel_l2=((a - ref).norm() / ref.norm()).item()
    )


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


def run_validation(args) -> dict:
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    # bf16 like a server; fp16 on the CPU interpreter (its bf16 is broken).
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    torch.manual_seed(0)
    model = load_checkpoint(args.checkpoint, dtype, device)
    model32 = load_checkpoint(args.checkpoint, torch.float32, device)
    c = model.config
    _, held_out = stdlib_corpus()
    max_ctx = max(args.contexts) + args.gen_steps + 16
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
        checkpoint=args.checkpoint,
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
        ref_capture = {}
        reference_logits(model32, last_tokens, ref_capture)
        n_last = last_tokens.shape[1] - (last_tokens.shape[1] - 1) // last_chunk * last_chunk
        for key, stack in stacks.items():
            stack.begin(2, last_tokens.shape[1])
            cap = {}
            first = stack.prefill(model, last_tokens, last_chunk, cap)
            second = stack.prefill(model, last_tokens, last_chunk)
            result["determinism"][key] = bool(torch.equal(first, second))
            for name, tensor in cap.items():
                ref = ref_capture[name].view(2, last_tokens.shape[1], -1)[:, -n_last:]
                result["drift"].append(
                    dict(backend=key, tensor=name, **drift(tensor.view(2, n_last, -1), ref))
                )
        progress.update()

        # Greedy generation: tokens before the first divergence from the baseline.
        prompts = windows(held_out, args.prompts, args.prompt_len, seed=7).to(device)
        gen = {
            k: s.greedy(model, prompts, args.gen_steps, args.prompt_len // 2)
            for k, s in stacks.items()
        }
        gen["fp32"] = reference_greedy(model32, prompts, args.gen_steps)
        for key, out in gen.items():
            if key == BASELINE:
                continue
            same = (out == gen[BASELINE]).int()
            first_diff = torch.where(same.all(1), same.shape[1], (1 - same).argmax(1))
            result["generation"][key] = dict(
                prompts=args.prompts,
                steps=args.gen_steps,
                mean_tokens_before_divergence=first_diff.float().mean().item(),
                identical_sequences=int(same.all(1).sum()),
            )
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


def render_report(result: dict, out_dir: str) -> str:
    """Markdown tables (and PNGs when matplotlib is there) from a result JSON."""
    lines = [
        f"Device: {result['device']}, model dtype {result['dtype']}, torch {result['torch']}.",
        "",
    ]
    lines += [
        "### Perplexity (held-out stdlib bytes)",
        "",
        "| context | backend | bits/byte | perplexity | Δ ppl vs triton |",
        "|---|---|---|---|---|",
    ]
    base = {(r["context"]): r["ppl"] for r in result["perplexity"] if r["backend"] == BASELINE}
    for r in result["perplexity"]:
        delta = (r["ppl"] / base[r["context"]] - 1) * 100
        lines.append(
            f"| {r['context']} | {r['backend']} | {r['bits_per_byte']:.4f} | "
            f"{r['ppl']:.4f} | {delta:+.3f}% |"
        )
    lines += [
        "",
        "### Agreement per token",
        "",
        "| context | backend | against | mean KL | max KL | top-1 agreement |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["agreement"]:
        lines.append(
            f"| {r['context']} | {r['backend']} | {r['against']} | {r['kl_mean']:.2e} | "
            f"{r['kl_max']:.2e} | {100 * r['top1_agreement']:.3f}% |"
        )
    lines += [
        "",
        "### Greedy generation vs triton",
        "",
        "| backend | prompts | steps | mean tokens before first divergence | identical |",
        "|---|---|---|---|---|",
    ]
    for key, g in result["generation"].items():
        lines.append(
            f"| {key} | {g['prompts']} | {g['steps']} | "
            f"{g['mean_tokens_before_divergence']:.2f} | {g['identical_sequences']} |"
        )
    lines += [
        "",
        "### Drift against the fp32 reference (last chunk of a long window)",
        "",
        "| backend | tensor | cos | rel-L2 |",
        "|---|---|---|---|",
    ]
    for r in result["drift"]:
        lines.append(f"| {r['backend']} | {r['tensor']} | {r['cos']:.6f} | {r['rel_l2']:.2e} |")
    lines += ["", "### Determinism (same inputs twice, bitwise equal logits)", ""]
    lines += [f"- {k}: {'yes' if v else 'NO'}" for k, v in result["determinism"].items()]
    lines += ["", "### Needle retrieval (accuracy)", ""]
    keys = list(result["needle"])
    cells = sorted({(r["length"], r["depth"]) for r in result["needle"][keys[0]]})
    lines += ["| length | depth | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for length, depth in cells:
        row = []
        for k in keys:
            oks = [
                r["ok"] for r in result["needle"][k] if (r["length"], r["depth"]) == (length, depth)
            ]
            row.append(f"{sum(oks)}/{len(oks)}")
        lines.append(f"| {length} | {depth} | " + " | ".join(row) + " |")
    totals = {k: sum(r["ok"] for r in v) / len(v) for k, v in result["needle"].items()}
    lines.append("| all | | " + " | ".join(f"{100 * totals[k]:.1f}%" for k in keys) + " |")
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
    _plots(result, out_dir)
    return "\n".join(lines) + "\n"


def _plots(result: dict, out_dir: str) -> None:
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
    os.makedirs(args.out, exist_ok=True)
    if args.model == "smollm2":
        import validate_smollm2 as harness

        harness.configure(args)
    else:
        harness = None
    if args.report_from:
        with open(args.report_from) as f:
            result, out_dir = json.load(f), os.path.dirname(os.path.abspath(args.report_from))
        print(harness.render(result, out_dir) if harness else render_report(result, out_dir))
        return
    if harness:
        result = harness.run(args)
        with open(os.path.join(args.out, "validation_smollm2.json"), "w") as f:
            json.dump(result, f, indent=1)
        report = harness.render(result, args.out)
        with open(os.path.join(args.out, "validation_smollm2.md"), "w") as f:
            f.write(report)
        print(report)
        return
    if args.quick:
        args.contexts, args.windows_per_context = [64, 128], [2, 2]
        args.prompts, args.prompt_len, args.gen_steps = 3, 64, 4
        args.needle_lengths, args.needle_depths, args.needle_trials = [96], [0.5], 1
    else:
        args.contexts, args.windows_per_context = [512, 2048, 4096], [32, 8, 8]
        args.prompts, args.prompt_len, args.gen_steps = 50, 512, 64
        args.needle_lengths, args.needle_depths, args.needle_trials = (
            [1024, 2048, 4000],
            [0.1, 0.5, 0.9],
            8,
        )
    result = run_validation(args)
    path = os.path.join(args.out, "validation.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    report = render_report(result, args.out)
    with open(os.path.join(args.out, "validation.md"), "w") as f:
        f.write(report)
    print(report)


if __name__ == "__main__":
    sys.exit(main())
