"""Train the byte-level validation model on the CPython standard library (GPU, minutes).

    python benchmark/sage_attention/train_byte_model.py --out benchmark/sage_attention/byte-granite

Seeded; files are split train / held-out by a hash of their path. Writes a
Granite checkpoint (config.json, model.safetensors) and train_log.json with the
held-out loss next to the unigram baseline's.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from byte_model import (
    ByteLlama,
    ByteLlamaConfig,
    causal_sdpa,
    save_checkpoint,
    stdlib_corpus,
    unigram_cross_entropy,
    windows,
)


def held_out_loss(model, data: bytes, count: int, length: int, device) -> float:
    """Mean next-byte NLL (nats) over ``count`` held-out windows of ``length``."""
    tokens = windows(data, count, length + 1, seed=1).to(device)
    total = 0.0
    with (
        torch.no_grad(),
        torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"),
    ):
        for row in tokens.split(4):
            x, y = row[:, :-1], row[:, 1:]
            positions = torch.arange(length, device=device).repeat(x.shape[0])
            logits = model(x.flatten(), positions, causal_sdpa(x.shape[0], length))
            total += F.cross_entropy(logits.float(), y.flatten(), reduction="sum").item()
    return total / (count * length)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--minutes", type=float, default=4.0)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=100_000)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke: a tiny model, a few steps")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = ByteLlamaConfig.tiny() if args.tiny else ByteLlamaConfig()
    train, held_out = stdlib_corpus()
    model = ByteLlama(config).to(device)
    params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        fused=device.type == "cuda",
    )
    corpus = torch.frombuffer(bytearray(train), dtype=torch.uint8).to(device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    positions = torch.arange(args.context, device=device).repeat(args.batch)
    budget_s, warmup_steps = args.minutes * 60, 200
    print(
        f"{params / 1e6:.2f} M parameters; train {len(train) / 1e6:.1f} MB, "
        f"held-out {len(held_out) / 1e6:.1f} MB; {device}"
    )
    start, step, history = time.time(), 0, []
    while step < args.max_steps and time.time() - start < budget_s:
        progress = (time.time() - start) / budget_s
        lr = (
            args.lr
            * min(1.0, (step + 1) / warmup_steps)
            * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        )
        for group in opt.param_groups:
            group["lr"] = lr
        offsets = torch.randint(
            0, len(corpus) - args.context - 1, (args.batch,), device=device, generator=gen
        )
        rows = corpus[offsets[:, None] + torch.arange(args.context + 1, device=device)].long()
        x, y = rows[:, :-1], rows[:, 1:]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x.flatten(), positions, causal_sdpa(args.batch, args.context))
        loss = F.cross_entropy(logits.float(), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 200 == 0:
            history.append((step, round(time.time() - start, 1), loss.item()))
            print(
                f"step {step} {time.time() - start:6.1f}s loss {loss.item():.4f} lr {lr:.2e}",
                flush=True,
            )
        step += 1

    eval_count = 4 if args.tiny else 64
    log = dict(
        seed=args.seed,
        steps=step,
        seconds=round(time.time() - start, 1),
        parameters=params,
        context=args.context,
        batch=args.batch,
        tokens_seen=step * args.batch * args.context,
        train_bytes=len(train),
        held_out_bytes=len(held_out),
        device=str(device),
        held_out_nll=held_out_loss(model, held_out, eval_count, args.context, device),
        unigram_nll=unigram_cross_entropy(train, held_out),
        history=history,
    )
    for key in ("held_out_nll", "unigram_nll"):
        print(f"{key}: {log[key]:.4f} nats/byte = {log[key] / math.log(2):.3f} bits/byte")
    save_checkpoint(model, args.out, extra=log)


if __name__ == "__main__":
    main()
