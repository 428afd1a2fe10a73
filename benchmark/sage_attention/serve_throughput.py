"""Serving throughput of one server configuration: prefill and decode over a grid of
input lengths x batch sizes, with the server's own token capacity and proof of path.

    python benchmark/sage_attention/serve_throughput.py --label sage_kv8 \
        --backend sage_attn --env SGLANG_SAGE_ATTN_KV_CACHE=int8 \
        --model examples/granite-8b-attn --lengths 1024 4096 16384 32768 --batches 1 8 32 \
        --out kv8.json
    python benchmark/sage_attention/serve_throughput.py --report triton.json sage.json kv8.json

Per (length L, batch B), with the same seeded random prompts for every configuration:

- prefill: B concurrent requests of L tokens and ``max_new_tokens=1``: time to the
  last first token, input tokens/s = B·L / that time;
- decode: the same B prompts again with ``max_new_tokens=1+D`` and ``ignore_eos``;
  output tokens/s is SGLang's own ``gen throughput`` of the decode log lines with the
  whole batch running (median; pass ``--decode-log-interval`` small enough to get
  several), and B·D / (that request time - the prefill time) is kept as a cross-check.

The GPU image here needs ``--disable-radix-cache`` (its radix-cache insert fails),
so every request prefills in full.

The model is any checkpoint directory; with ``--load-format dummy`` (default) a
config alone gives an 8B-shaped attention stack at random weights. The server log
must show the configuration's path (``--require`` patterns; the run fails without
them), and ``max_total_num_tokens`` is read from it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

from serve_logprobs import _post, _wait_healthy, launch_server, prompts, token_capacity


def launch(args, log_path: str) -> subprocess.Popen:
    _, server = launch_server(
        model_path=args.model,
        backend=args.backend,
        port=args.port,
        log_path=log_path,
        env=dict(item.split("=", 1) for item in args.env),
        flags=[
            "--load-format", args.load_format,
            "--mem-fraction-static", str(args.mem_fraction),
            "--context-length", str(max(args.lengths) + args.decode_tokens + 64),
            "--max-running-requests", str(max(args.batches)),
            *shlex.split(args.extra),
        ],
    )  # fmt: skip
    return server


def timed_batch(port: int, batch: list[list[int]], max_new_tokens: int) -> float:
    """Wall time of ``batch`` sent as concurrent requests (one per prompt)."""
    payload = {"temperature": 0, "max_new_tokens": max_new_tokens, "ignore_eos": True}

    def one(ids):
        return _post(
            f"http://127.0.0.1:{port}/generate",
            {"input_ids": ids, "sampling_params": payload},
            timeout=1200,
        )

    start = time.perf_counter()
    with ThreadPoolExecutor(len(batch)) as pool:
        outs = list(pool.map(one, batch))
    elapsed = time.perf_counter() - start
    for out in outs:
        if len(out["output_ids"]) != max_new_tokens:
            raise RuntimeError(f"asked {max_new_tokens} tokens, got {len(out['output_ids'])}")
    return elapsed


def decode_log_rates(text: str, batch_size: int) -> list[float]:
    """``gen throughput`` of the scheduler's decode log lines with the whole batch
    running, the first such line dropped (its interval includes the prefill)."""
    rates = [
        float(rate)
        for running, rate in re.findall(
            r"Decode batch, #running-req: (\d+),.*?gen throughput \(token/s\): ([\d.]+)", text
        )
        if int(running) == batch_size
    ]
    return rates[1:]


def measure(args) -> dict:
    log_path = args.out.removesuffix(".json") + ".server.log"
    server = launch(args, log_path)
    cells = []
    try:
        startup_s = _wait_healthy(args.port, server, log_path, timeout=900)
        timed_batch(args.port, prompts(99, [256], (3, args.vocab_max)), 8)  # warm-up
        for length in args.lengths:
            for batch_size in args.batches:
                batch = prompts(length + batch_size, [length] * batch_size, (3, args.vocab_max))
                prefill_s = timed_batch(args.port, batch, 1)
                mark = os.path.getsize(log_path)
                total_s = timed_batch(args.port, batch, 1 + args.decode_tokens)
                with open(log_path) as log:
                    log.seek(mark)
                    logged = decode_log_rates(log.read(), batch_size)
                cells.append(
                    dict(
                        input_len=length,
                        batch=batch_size,
                        prefill_s=prefill_s,
                        input_tok_s=batch_size * length / prefill_s,
                        # SGLang's own decode rate (log lines of the full batch, the
                        # first one left out: its interval holds the prefill).
                        output_tok_s=statistics.median(logged) if logged else None,
                        logged_rates=logged,
                        # Client-side cross-check: both requests prefill the same prompts.
                        client_output_tok_s=batch_size * args.decode_tokens / (total_s - prefill_s),
                    )
                )
                print(json.dumps(cells[-1]), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=120)
    with open(log_path) as log:
        text = log.read()
    proof = {pattern: len(re.findall(pattern, text)) for pattern in args.require}
    missing = [pattern for pattern, count in proof.items() if count == 0]
    result = dict(
        label=args.label,
        backend=args.backend,
        env=args.env,
        extra=args.extra,
        model=args.model,
        startup_s=startup_s,
        decode_tokens=args.decode_tokens,
        max_total_num_tokens=token_capacity(log_path),
        cuda_graph="--disable-cuda-graph" not in args.extra,
        proof=proof,
        cells=cells,
    )
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    if missing:
        raise SystemExit(f"{args.label}: the server log lacks {missing}; see {log_path}")
    return result


def report(paths: list[str]) -> str:
    """Markdown table of several runs, the first as the baseline of the speed-ups."""
    runs = [json.load(open(p)) for p in paths]
    base = {(c["input_len"], c["batch"]): c for c in runs[0]["cells"]}
    lines = [
        "| config | KV capacity (tokens) | " + " | ".join(r["label"] for r in runs) + " |",
        "|---|---|" + "---|" * len(runs),
        "| max_total_num_tokens | | "
        + " | ".join(f"{r['max_total_num_tokens']:,}" for r in runs)
        + " |",
        "",
        "| input | batch | "
        + " | ".join(f"{r['label']} prefill tok/s" for r in runs)
        + " | "
        + " | ".join(f"{r['label']} decode tok/s" for r in runs)
        + " |",
        "|---|---|" + "---|" * (2 * len(runs)),
    ]
    for key, cell in base.items():
        cells = [{(c["input_len"], c["batch"]): c for c in r["cells"]}.get(key) for r in runs]

        def fmt(c, field, base_cell):
            if c is None:
                return "—"
            if c[field] is None or base_cell[field] is None:
                return "—"
            ratio = c[field] / base_cell[field]
            return f"{c[field]:,.0f} ({ratio:.2f}x)"

        lines.append(
            f"| {key[0]} | {key[1]} | "
            + " | ".join(fmt(c, "input_tok_s", cell) for c in cells)
            + " | "
            + " | ".join(fmt(c, "output_tok_s", cell) for c in cells)
            + " |"
        )
    short_len = min(length for length, _ in base)
    shares = [attention_share(r, short_len) for r in runs]
    if any(shares):
        lines += [
            "",
            f"Share of a decode step in attention (lower bound, `1 - step({short_len}) / "
            "step(L)`, same batch):",
            "",
            "| input x batch | " + " | ".join(r["label"] for r in runs) + " |",
            "|---|" + "---|" * len(runs),
        ]
        for key in shares[0]:
            row = " | ".join(f"{share[key]:.0%}" if key in share else "—" for share in shares)
            lines.append(f"| {key} | {row} |")
    return "\n".join(lines)


def attention_share(run: dict, short_len: int) -> dict:
    """Share of a decode step spent in attention, estimated per batch size as
    1 - (step time at ``short_len``) / (step time at each length): the rest of the
    step (linear layers, sampling, scheduling) does not grow with the context, and
    attention at ``short_len`` is counted as the rest (so this is a lower bound)."""
    steps = {(c["input_len"], c["batch"]): c["batch"] / c["output_tok_s"] for c in run["cells"]}
    return {
        f"{length}x{batch}": 1 - steps[(short_len, batch)] / step
        for (length, batch), step in steps.items()
        if length != short_len and (short_len, batch) in steps
    }


def plot(paths: list[str], out_png: str) -> None:
    """Prefill and decode tokens/s against input length, one line per run and batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.load(open(p)) for p in paths]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    styles = ["-", "--", ":"]
    for run, style in zip(runs, styles, strict=False):
        for batch in sorted({c["batch"] for c in run["cells"]}):
            cells = sorted(
                (c for c in run["cells"] if c["batch"] == batch), key=lambda c: c["input_len"]
            )
            lengths = [c["input_len"] for c in cells]
            for ax, field in zip(axes, ("input_tok_s", "output_tok_s"), strict=True):
                ax.plot(lengths, [c[field] for c in cells], style, marker="o",
                        label=f"{run['label']} b{batch}")  # fmt: skip
    for ax, title in zip(
        axes, ("prefill (input tokens/s)", "decode (output tokens/s)"), strict=True
    ):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("input length (tokens)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=80)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", nargs="+", metavar="JSON", help="only tabulate these runs")
    parser.add_argument("--label", default="run")
    parser.add_argument("--backend", default="sage_attn")
    parser.add_argument("--env", nargs="*", default=[], help="NAME=VALUE for the server")
    parser.add_argument("--model", default="examples/granite-8b-attn")
    parser.add_argument("--load-format", default="dummy")
    parser.add_argument("--extra", default="", help="more launch_server flags")
    parser.add_argument("--mem-fraction", type=float, default=0.7)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--vocab-max", type=int, default=32000)
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--require", nargs="*", default=[], help="regexes the log must hold")
    parser.add_argument("--out", default="throughput.json")
    parser.add_argument("--plot", metavar="PNG", help="with --report: also plot the runs here")
    args = parser.parse_args()
    if args.report:
        print(report(args.report))
        if args.plot:
            plot(args.report, args.plot)
    else:
        measure(args)


if __name__ == "__main__":
    main()
