"""What both validation harnesses measure, and the report they share.

``validate.py`` (the trained byte model, and the command line of both harnesses) and
``validate_smollm2.py`` (SmolLM2) import this module and not each other: the fp32
reference's logits and greedy tokens, per-token NLL, KL and top-1 agreement, layer
drift, bitwise determinism, greedy divergence from the bf16 baseline, and the
markdown tables of those results.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from byte_model import causal_sdpa

BASELINE = "triton"
QUICK_NOTE = (
    "**Quick run (--quick)**: tiny shapes and a few tokens. These figures only check that "
    "the pipeline runs end to end; they are not accuracy results and are not meant to "
    "match the full run's (needles missed by fp32 too, KL ratios far from 1 are expected)."
)


def quick_note(result: dict) -> str:
    """The line a quick run's report starts with; empty for a full run."""
    return QUICK_NOTE + "\n\n" if result.get("quick") else ""


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


def drift_and_determinism(stacks, model, model32, tokens, chunk, result) -> None:
    """Into ``result``: each stack's layer outputs on the last chunk of ``tokens`` [B, n]
    against fp32 ("drift"), and whether a second prefill gives bitwise equal logits."""
    batch, n = tokens.shape
    ref_capture = {}
    reference_logits(model32, tokens, ref_capture)
    n_last = n - (n - 1) // chunk * chunk
    for key, stack in stacks.items():
        stack.begin(batch, n)
        cap = {}
        first = stack.prefill(model, tokens, chunk, cap)
        second = stack.prefill(model, tokens, chunk)
        result["determinism"][key] = bool(torch.equal(first, second))
        for name, tensor in cap.items():
            ref = ref_capture[name].view(batch, n, -1)[:, -n_last:]
            result["drift"].append(
                dict(backend=key, tensor=name, **drift(tensor.view(batch, n_last, -1), ref))
            )


def greedy_divergence(generated: dict, steps: int) -> dict:
    """Per backend, how many greedy tokens [B, steps] match the baseline's before the
    first difference (mean), and how many sequences match it entirely."""
    out = {}
    for key, tokens in generated.items():
        if key == BASELINE or BASELINE not in generated:
            continue
        same = (tokens == generated[BASELINE]).int()
        first_diff = torch.where(same.all(1), same.shape[1], (1 - same).argmax(1))
        out[key] = dict(
            prompts=tokens.shape[0],
            steps=steps,
            mean_tokens_before_divergence=first_diff.float().mean().item(),
            identical_sequences=int(same.all(1).sum()),
        )
    return out


def render_report(result: dict) -> str:
    """Markdown tables of one run's perplexity, agreement, generation, drift,
    determinism and needle results."""
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
    return "\n".join(lines) + "\n"
