"""Serve a model with one attention backend, record log-probs; compare two such runs.

    python benchmark/sage_attention/serve_logprobs.py run --backend triton --out a.json \
        --model examples/tiny-granite --extra "--chunked-prefill-size 256"
    python benchmark/sage_attention/serve_logprobs.py compare a.json b.json
    # SmolLM2 (validate.py --model smollm2's conversion) on prose windows:
    python benchmark/sage_attention/serve_logprobs.py run --backend sage_attn --out b.json \
        --model smollm2 --load-format auto --heldout-windows 8 --window-len 4096

``run`` starts ``python -m sglang.launch_server`` (the flags that make SGLang run on
the GPU image here: see ../shared/gpu/serve-smoke.sh), sends the same greedy
requests with ``return_logprob`` (input and output log-probs, top-5), saves the
responses, and keeps the server log beside them. ``compare`` reports per-token
agreement of the generated ids and the largest log-prob gaps.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shlex
import subprocess
import sys
import time
import urllib.request


def _post(url: str, payload: dict, timeout: float = 300.0) -> dict | list:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def _wait_healthy(port: int, server: subprocess.Popen, log_path: str, timeout: float = 600.0):
    start = time.time()
    while time.time() - start < timeout:
        if server.poll() is not None:
            raise RuntimeError(f"server exited with {server.returncode}; see {log_path}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return time.time() - start
        except OSError:
            time.sleep(2)
    raise TimeoutError(f"server not healthy after {timeout:.0f} s; see {log_path}")


def prompts(seed: int, lengths: list[int], vocab: tuple[int, int]) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(*vocab) for _ in range(n)] for n in lengths]


def heldout_prompts(model: str, count: int, length: int) -> list[list[int]]:
    """Held-out windows of real text as token ids: SmolLM2's prose windows (the
    validation harness's text and tokenizer) or the byte model's stdlib windows."""
    if model == "smollm2":
        import smollm2

        ckpt = smollm2.prepare()
        stream = smollm2.token_stream(smollm2.load_tokenizer(ckpt), smollm2.prose_text())
        return smollm2.token_windows(stream, count, length, seed=length).tolist()
    from byte_model import stdlib_corpus, windows

    return windows(stdlib_corpus()[1], count, length, seed=length).tolist()


def token_capacity(log_path: str) -> int | None:
    """The KV pool's token capacity the scheduler logged (``max_total_num_tokens``)."""
    with open(log_path) as log:
        found = re.findall(r"max_total_num_tokens=(\d+)", log.read())
    return int(found[-1]) if found else None


def launch_server(
    *, model_path: str, backend: str, port: int, log_path: str, flags: list[str], env=None
) -> tuple[list[str], subprocess.Popen]:
    """Start ``python -m sglang.launch_server`` with the flags that make SGLang run on
    the GPU image here (see ../shared/gpu/serve-smoke.sh) and ``flags``; its output goes
    to ``log_path``. ``env``: extra environment variables for the server."""
    server_env = dict(
        os.environ,
        SGLANG_FORCE_FUSED_OP_BACKEND="torch",
        SGLANG_SKIP_SGL_KERNEL_VERSION_CHECK="1",
        PYTHONUNBUFFERED="1",
        **(env or {}),
    )
    command = [
        sys.executable, "-m", "sglang.launch_server", "--model-path", model_path,
        "--skip-tokenizer-init", "--attention-backend", backend,
        "--sampling-backend", "pytorch", "--grammar-backend", "none",
        "--port", str(port), "--host", "127.0.0.1", *flags,
    ]  # fmt: skip
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=server_env)
    return command, server


def run(args) -> None:
    model_path = args.model
    if args.model == "smollm2":  # the converted GGUF, served as SGLang's Granite architecture
        import smollm2

        model_path = smollm2.serving_checkpoint(smollm2.prepare())
    log_path = args.out.removesuffix(".json") + ".server.log"
    command, server = launch_server(
        model_path=model_path,
        backend=args.backend,
        port=args.port,
        log_path=log_path,
        flags=[
            "--load-format", args.load_format, "--disable-radix-cache",
            "--mem-fraction-static", "0.3", *shlex.split(args.extra),
        ],
    )  # fmt: skip
    try:
        startup_s = _wait_healthy(args.port, server, log_path)
        if args.heldout_windows:
            batch = heldout_prompts(args.model, args.heldout_windows, args.window_len)
        else:
            batch = prompts(args.seed, args.lengths, (3, args.vocab_max))
        response = _post(
            f"http://127.0.0.1:{args.port}/generate",
            {
                "input_ids": batch,
                "sampling_params": {"max_new_tokens": args.max_new_tokens, "temperature": 0},
                "return_logprob": True,
                "logprob_start_len": 0,
                "top_logprobs_num": args.top_logprobs,
            },
        )
    finally:
        server.terminate()
        server.wait(timeout=60)
    with open(args.out, "w") as f:
        json.dump(
            {
                "backend": args.label or args.backend,
                "max_total_num_tokens": token_capacity(log_path),
                "command": command,
                "startup_s": startup_s,
                "prompts": batch,
                "responses": response,
            },
            f,
        )
    print(
        f"{args.label or args.backend}: {len(response)} responses in {args.out}; "
        f"max_total_num_tokens {token_capacity(log_path)}; server log {log_path}"
    )


def _logprobs(entries) -> list[float]:
    return [entry[0] for entry in entries if entry[0] is not None]


def prompt_perplexity(responses) -> float:
    """exp(mean NLL) of every prompt token after the first, from the input log-probs."""
    logprobs = [lp for r in responses for lp in _logprobs(r["meta_info"]["input_token_logprobs"])]
    return math.exp(-sum(logprobs) / len(logprobs))


def _top1(entries) -> list:
    return [top[0][1] for top in entries if top]


def compare_pair(base_run: dict, cand_run: dict) -> dict:
    """Agreement of a candidate run with the baseline on the same prompts."""
    base, cand = base_run["responses"], cand_run["responses"]
    agree = total = 0
    for b, c in zip(base, cand, strict=True):
        b_top, c_top = (
            _top1(b["meta_info"]["input_top_logprobs"]),
            _top1(c["meta_info"]["input_top_logprobs"]),
        )
        agree += sum(x == y for x, y in zip(b_top, c_top, strict=True))
        total += len(b_top)
    same_tokens = total_tokens = 0
    first_divergence, output_gap, input_gaps = [], 0.0, []
    for b, c in zip(base, cand, strict=True):
        b_ids, c_ids = b["output_ids"], c["output_ids"]
        same = [x == y for x, y in zip(b_ids, c_ids, strict=False)]
        same_tokens += sum(same)
        total_tokens += len(b_ids)
        first_divergence.append(same.index(False) if False in same else len(same))
        # Log-probs of the same positions; after a divergence the contexts differ.
        stop = first_divergence[-1]
        b_out = _logprobs(b["meta_info"]["output_token_logprobs"][:stop])
        c_out = _logprobs(c["meta_info"]["output_token_logprobs"][:stop])
        output_gap = max([output_gap] + [abs(x - y) for x, y in zip(b_out, c_out, strict=True)])
        b_in = _logprobs(b["meta_info"]["input_token_logprobs"])
        c_in = _logprobs(c["meta_info"]["input_token_logprobs"])
        input_gaps += [abs(x - y) for x, y in zip(b_in, c_in, strict=True)]
    base_ppl, cand_ppl = prompt_perplexity(base), prompt_perplexity(cand)
    return {
        "baseline": base_run["backend"],
        "candidate": cand_run["backend"],
        "baseline_perplexity": base_ppl,
        "perplexity": cand_ppl,
        "delta_ppl_pct": 100 * (cand_ppl / base_ppl - 1),
        "prompt_top1_agreement": agree / max(total, 1),
        "prompt_tokens": total,
        "mean_abs_input_logprob_gap": sum(input_gaps) / max(len(input_gaps), 1),
        "max_input_logprob_gap": max(input_gaps, default=0.0),
        "generated_agreement": same_tokens / max(total_tokens, 1),
        "tokens_before_first_divergence": first_divergence,
        "max_output_logprob_gap": output_gap,
        "baseline_capacity": base_run.get("max_total_num_tokens"),
        "capacity": cand_run.get("max_total_num_tokens"),
    }


def compare(args) -> None:
    runs = [json.load(open(path)) for path in (args.baseline, *args.candidates)]
    for run in runs:
        ppl = prompt_perplexity(run["responses"])
        print(
            f"{run['backend']}: prompt perplexity {ppl:.4f} ({math.log2(ppl):.4f} bits/token), "
            f"max_total_num_tokens {run.get('max_total_num_tokens')}"
        )
    rows = [compare_pair(runs[0], cand) for cand in runs[1:]]
    for row in rows:
        print(f"baseline {row['baseline']} vs candidate {row['candidate']}")
        print(
            f"  prompt top-1 agreement: {100 * row['prompt_top1_agreement']:.3f}% of "
            f"{row['prompt_tokens']}; delta PPL {row['delta_ppl_pct']:+.3f}%"
        )
        print(f"  generated-token agreement: {100 * row['generated_agreement']:.1f}%")
        print(f"  tokens before first divergence: {row['tokens_before_first_divergence']}")
        print(
            f"  input log-prob gap: mean {row['mean_abs_input_logprob_gap']:.4g}, "
            f"max {row['max_input_logprob_gap']:.4g}; output (before divergence) "
            f"max {row['max_output_logprob_gap']:.4g}"
        )
        if row["capacity"] and row["baseline_capacity"]:
            print(
                f"  token capacity {row['capacity'] / row['baseline_capacity']:.3f}x the baseline's"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"comparisons": rows}, f, indent=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--backend", required=True)
    r.add_argument("--label", help="the run's name in reports (default: the backend)")
    r.add_argument("--out", required=True)
    r.add_argument(
        "--model",
        default="examples/tiny-granite",
        help="a checkpoint directory, or 'smollm2' (validate.py's SmolLM2 conversion)",
    )
    r.add_argument("--load-format", default="dummy")
    r.add_argument("--extra", default="--chunked-prefill-size 256 --disable-cuda-graph")
    r.add_argument("--port", type=int, default=30000)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--lengths", type=int, nargs="+", default=[600, 1000, 300, 2000])
    r.add_argument("--vocab-max", type=int, default=1000)
    r.add_argument("--max-new-tokens", type=int, default=32)
    r.add_argument("--top-logprobs", type=int, default=5)
    r.add_argument(
        "--heldout-windows",
        type=int,
        default=0,
        help="prompts: this many held-out text windows (SmolLM2: prose tokens; else the "
        "byte model's stdlib bytes) instead of random ids",
    )
    r.add_argument("--window-len", type=int, default=4096)
    c = sub.add_parser("compare")
    c.add_argument("baseline")
    c.add_argument("candidates", nargs="+")
    c.add_argument("--json", help="write the comparison rows here")
    args = parser.parse_args()
    run(args) if args.cmd == "run" else compare(args)


if __name__ == "__main__":
    main()
