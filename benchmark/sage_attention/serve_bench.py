"""Serving benchmark: SGLang's own ``sglang.benchmark.serving`` against one server per
configuration, sage_attn beside the backends a Hopper user runs today.

    python benchmark/sage_attention/serve_bench.py --model examples/llama-8b \\
        --configs fa4 fa4_fp8kv triton sage_attn sage_attn_kv8 --out results/ --tag llama8b

For each configuration (``CONFIGS``) it starts ``python -m sglang.launch_server`` with the
model (``--load-format dummy`` by default: random weights, so any config.json serves;
a tokenizer that covers the vocabulary is written beside it when the directory has
none), waits for it, checks the server log for the configuration's path (a run whose
log lacks it is marked failed and the script exits non-zero), runs the workloads with
a fixed seed, and stops the server. Workloads (input/output tokens at a concurrency):

- ``chat``            1K / 256 at 64 (two waves of prompts);
- ``long_context``    32K / 256 at the concurrency the bf16 cache of the first
                      bf16-cache configuration holds at ``--mem-fraction-static``
                      (capacity // 33K; its capacity is in the JSON), and at twice that,
                      which only the 8-bit cache holds (one wave each);
- ``long_generation`` 2K / 2K at 64 (one wave).

Rows are ``{"workload", "config", "max_concurrency", "kv_capacity_tokens",
"request_throughput", "input_tok_s", "output_tok_s", "ttft_p50_ms", "ttft_p99_ms",
"itl_p50_ms", "itl_p99_ms"}`` in ``<out>/<device>_serving_<tag>.json``, with an MD table
and a PNG beside it; the JSON is rewritten after every configuration, and
``--resume`` adds configurations to an earlier run's file. ``--report JSON`` redraws
the table and the plot. Server flags every configuration shares go in
``--server-args``, environment variables for the servers in the environment.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from serve_logprobs import _wait_healthy, token_capacity


@dataclass(frozen=True)
class Config:
    backend: str
    flags: tuple[str, ...] = ()
    env: dict = field(default_factory=dict)
    # Regexes the server log must hold: the configuration's path, proven.
    proof: tuple[str, ...] = ()
    bf16_cache: bool = True
    # Run instead when this one cannot serve here (the reason is kept in the JSON).
    fallback: str | None = None


def _server_arg(name: str, value: str) -> str:
    return rf"""['"]{name}['"]: ['"]{value}['"]"""


CONFIGS = {
    "fa4": Config("fa4", proof=(_server_arg("attention_backend", "fa4"),)),
    "fa4_fp8kv": Config(
        "fa4",
        ("--kv-cache-dtype", "fp8_e4m3"),
        proof=(_server_arg("attention_backend", "fa4"), _server_arg("kv_cache_dtype", "fp8_e4m3")),
        bf16_cache=False,
        fallback="triton_fp8kv",
    ),
    "triton_fp8kv": Config(
        "triton",
        ("--kv-cache-dtype", "fp8_e4m3"),
        proof=(
            _server_arg("attention_backend", "triton"),
            _server_arg("kv_cache_dtype", "fp8_e4m3"),
        ),
        bf16_cache=False,
    ),
    "triton": Config("triton", proof=(_server_arg("attention_backend", "triton"),)),
    # Which base it composes with and where its 8-bit kernel runs: the backend's own
    # start-up line (``--require sage_attn=...`` adds what a run must show beyond it).
    "sage_attn": Config("sage_attn", proof=(r"SageAttentionBackend: base backend \w+",)),
    # The 8-bit cache in pages its decode reads whole (kv8_cache.py), proven by the pool's
    # start-up line.
    "sage_attn_kv8": Config(
        "sage_attn",
        ("--page-size", "64"),
        env={"SGLANG_SAGE_ATTN_KV_CACHE": "int8"},
        proof=(
            r"sage_attn: 8-bit KV cache: .*pages of 64 tokens \(decode reads whole pages\)",
            # Either extend route (kv8_backend.py); ``--require`` pins the one expected.
            r"extend batches on (the 8-bit kernel|FlashAttention-\d over the unpacked 8-bit "
            r"cache) so far",
            r"decode batches on the 8-bit cache kernel so far \(whole pages of 64",
        ),
        bf16_cache=False,
    ),
}


@dataclass(frozen=True)
class Workload:
    name: str
    input_len: int
    output_len: int
    concurrency: int | None  # None: the bf16 cache's long-context concurrency
    waves: int  # prompts = waves x concurrency


WORKLOADS = (
    Workload("chat", 1024, 256, 64, 2),
    Workload("long_context", 32768, 256, None, 1),
    Workload("long_generation", 2048, 2048, 64, 1),
)

ROW_FIELDS = {
    "request_throughput": "request_throughput",
    "input_tok_s": "input_throughput",
    "output_tok_s": "output_throughput",
    "ttft_p50_ms": "median_ttft_ms",
    "ttft_p99_ms": "p99_ttft_ms",
    "itl_p50_ms": "median_itl_ms",
    "itl_p99_ms": "p99_itl_ms",
}


def write_tokenizer(model_dir: str, vocab_size: int) -> None:
    """A word-level tokenizer of ``vocab_size`` tokens ("t0" ... ), so that a dummy-weight
    model serves text (SGLang's benchmark counts streamed text) with every id it samples."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, "t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(cleanup=False)  # words joined by spaces
    tokenizer.save(os.path.join(model_dir, "tokenizer.json"))
    with open(os.path.join(model_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 20}, f)


def prepare_model(model: str, workdir: str) -> str:
    """``model`` itself if it has a tokenizer, else a copy of its config with one."""
    if any(os.path.exists(os.path.join(model, f)) for f in ("tokenizer.json", "tokenizer.model")):
        return model
    with open(os.path.join(model, "config.json")) as f:
        config = json.load(f)
    target = os.path.join(workdir, os.path.basename(os.path.normpath(model)) + "-with-tokenizer")
    os.makedirs(target, exist_ok=True)
    with open(os.path.join(target, "config.json"), "w") as f:
        json.dump(config, f)
    write_tokenizer(target, config["vocab_size"])
    return target


def port_in_use(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def launch(model, config: Config, args, log_path: str) -> subprocess.Popen:
    if port_in_use(args.port):
        # Another server answering there would be measured instead of this one.
        raise RuntimeError(f"port {args.port} is in use: stop the server there first")
    command = [
        sys.executable, "-m", "sglang.launch_server", "--model-path", model,
        "--load-format", args.load_format, "--attention-backend", config.backend,
        "--mem-fraction-static", str(args.mem_fraction_static),
        "--context-length", str(args.context_length), "--port", str(args.port),
        "--host", "127.0.0.1", *config.flags, *shlex.split(args.server_args),
    ]  # fmt: skip
    env = dict(os.environ, PYTHONUNBUFFERED="1", **config.env)
    with open(log_path, "w") as log:
        log.write("+ " + shlex.join(command) + "\n")
        log.flush()
        # Its own session: the scheduler and detokenizer processes stop with it.
        return subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def stop(server: subprocess.Popen) -> None:
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
    time.sleep(3)  # GPU memory back before the next server


def bench(model, args, workload: Workload, concurrency: int, result_file: str) -> dict:
    """One workload through SGLang's ``python -m sglang.benchmark.serving`` command line,
    run in this process (its import costs seconds, paid once); its result line."""
    import importlib.util

    if "datasets" not in sys.modules and importlib.util.find_spec("datasets") is None:
        # HF `datasets` is imported at module level only by the MMMU dataset loader;
        # the random-ids workloads here never call it (an offline machine may lack it).
        import importlib.machinery
        import types

        stub = types.ModuleType("datasets")
        stub.__spec__ = importlib.machinery.ModuleSpec("datasets", None)

        def load_dataset(*args, **kwargs):
            raise ImportError("the `datasets` package is not installed")

        stub.load_dataset = load_dataset
        sys.modules["datasets"] = stub
    from sglang.benchmark import serving

    argv = [
        "--backend", "sglang", "--host", "127.0.0.1", "--port", str(args.port),
        "--model", model, "--tokenizer", model, "--dataset-name", "random-ids",
        "--tokenize-prompt",
        "--random-input-len", str(workload.input_len),
        "--random-output-len", str(workload.output_len), "--random-range-ratio", "1",
        "--num-prompts", str(workload.waves * concurrency),
        "--max-concurrency", str(concurrency), "--seed", str(args.seed),
        "--output-file", result_file, "--disable-tqdm",
    ]  # fmt: skip
    if os.path.exists(result_file):
        os.remove(result_file)
    saved_argv, sys.argv = sys.argv, ["sglang.benchmark.serving", *argv]
    try:
        serving.cli_main()
    except SystemExit as exc:
        if exc.code not in (None, 0):
            message = f"{workload.name}: sglang.benchmark.serving exited {exc.code}"
            raise RuntimeError(message) from None
    finally:
        sys.argv = saved_argv
    with open(result_file) as f:
        result = json.loads(f.read().splitlines()[-1])
    if result["completed"] != workload.waves * concurrency:
        raise RuntimeError(f"{workload.name}: {result['completed']} requests completed")
    return result


def fa4_fp8_cache_error() -> str | None:
    """Why FA4 cannot read an fp8_e4m3 cache on this GPU, or None. Called as the fa4
    backend calls it: prefill with the model-dtype query and no descale, decode with the
    query cast to the cache's dtype."""
    import torch

    from sglang.kernels.ops.attention.flash_attention import flash_attn_with_kvcache

    cache = torch.randn(64, 1, 8, 128, device="cuda").to(torch.float8_e4m3fn)
    page_table = torch.arange(64, dtype=torch.int32, device="cuda")[None]
    for name, q_len, q_dtype in (("prefill", 16, torch.bfloat16), ("decode", 1, cache.dtype)):
        q = torch.randn(q_len, 32, 128, device="cuda").to(q_dtype)
        try:
            flash_attn_with_kvcache(
                q=q, k_cache=cache, v_cache=cache, page_table=page_table,
                cache_seqlens=torch.tensor([64], dtype=torch.int32, device="cuda"),
                cu_seqlens_q=torch.tensor([0, q_len], dtype=torch.int32, device="cuda"),
                max_seqlen_q=q_len, softmax_scale=128**-0.5, causal=True, ver=4,
            )  # fmt: skip
            torch.cuda.synchronize()
        except Exception as exc:
            return f"FA4 {name} on an fp8_e4m3 cache: {type(exc).__name__}: {str(exc)[:300]}"
    return None


def proof_of_path(log_text: str, patterns) -> dict:
    return {pattern: len(re.findall(pattern, log_text)) for pattern in patterns}


def run_config(name: str, model: str, args, summary: dict) -> tuple[list[dict], dict]:
    config = CONFIGS[name]
    log_path = os.path.join(args.out, f"server_{name}.log")
    server = launch(model, config, args, log_path)

    def stop_and_exit(signum, frame):  # a time limit's SIGTERM: no server left behind
        stop(server)
        raise SystemExit(f"{name}: stopped by signal {signum}")

    signal.signal(signal.SIGTERM, stop_and_exit)
    rows, error = [], None
    try:
        startup_s = _wait_healthy(args.port, server, log_path, timeout=args.startup_timeout)
        capacity = token_capacity(log_path)
        if config.bf16_cache and summary.get("long_context_concurrency") is None:
            summary["bf16_kv_capacity_tokens"] = capacity
            summary["long_context_concurrency"] = capacity // (32768 + 256)
        long_c = summary.get("long_context_concurrency") or args.long_context_concurrency
        for workload in WORKLOADS:
            levels = [workload.concurrency] if workload.concurrency else [long_c, 2 * long_c]
            for concurrency in levels:
                result_file = os.path.join(args.out, f"bench_{name}_{workload.name}.jsonl")
                result = bench(model, args, workload, concurrency, result_file)
                rows.append(
                    dict(
                        workload=workload.name,
                        config=name,
                        max_concurrency=concurrency,
                        kv_capacity_tokens=capacity,
                        **{ours: result[theirs] for ours, theirs in ROW_FIELDS.items()},
                    )  # fmt: skip
                )
                print(json.dumps(rows[-1]), flush=True)
    except Exception as exc:  # recorded in the JSON; the script exits non-zero at the end
        error = f"{type(exc).__name__}: {exc}"
        print(f"{name}: {error}", flush=True)
        startup_s = None
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        stop(server)
    with open(log_path) as f:
        text = f.read()
    patterns = config.proof + tuple(p for c, p in args.require if c == name)
    proof = proof_of_path(text, patterns)
    if error is None and not all(proof.values()):
        error = f"the server log lacks {[p for p, n in proof.items() if not n]}"
    sage_lines = [line for line in text.splitlines() if re.search("sage_attn|Sage", line)]
    info = dict(
        backend=config.backend, flags=list(config.flags), env=config.env,
        startup_s=startup_s, proof=proof, error=error, log_lines=sage_lines[:12],
    )  # fmt: skip
    return rows, info


def report(result: dict) -> str:
    """An MD table: every row, and each config's output tok/s against the first config's."""
    rows = result["rows"]
    configs = list(dict.fromkeys(r["config"] for r in rows))
    baseline = configs[0] if configs else "-"
    lines = [
        f"Serving, {result['model']} ({result['device']}, sglang {result['sglang']}): "
        f"`--mem-fraction-static {result['mem_fraction_static']}`, the bf16 cache holds "
        f"{result.get('bf16_kv_capacity_tokens')} tokens, long_context at "
        f"{result.get('long_context_concurrency')} (its capacity) and twice that. "
        f"Ratios against `{baseline}`.",
        "",
        "| workload | concurrency | config | KV tokens | req/s | input tok/s | output tok/s "
        "| TTFT p50 / p99 ms | ITL p50 / p99 ms | output vs " + baseline + " |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {(r["workload"], r["max_concurrency"]): r for r in rows if r["config"] == baseline}
    for r in sorted(rows, key=lambda r: (r["workload"], r["max_concurrency"])):
        ref = base.get((r["workload"], r["max_concurrency"]))
        ratio = f"{r['output_tok_s'] / ref['output_tok_s']:.2f}x" if ref else "-"
        lines.append(
            f"| {r['workload']} | {r['max_concurrency']} | {r['config']} | "
            f"{r['kv_capacity_tokens']:,} | {r['request_throughput']:.2f} | "
            f"{r['input_tok_s']:,.0f} | {r['output_tok_s']:,.0f} | "
            f"{r['ttft_p50_ms']:,.0f} / {r['ttft_p99_ms']:,.0f} | "
            f"{r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f} | {ratio} |"
        )
    failed = {name: info["error"] for name, info in result["configs"].items() if info["error"]}
    if failed:
        lines += ["", "Failed: " + "; ".join(f"`{n}`: {e}" for n, e in failed.items())]
    # Configurations asked for but never started (recorded by hand in the JSON: why).
    not_run = result.get("not_run") or {}
    if not_run:
        lines += ["", "Not run: " + "; ".join(f"`{n}`: {why}" for n, why in not_run.items())]
    return "\n".join(lines)


def plot(result: dict, png: str) -> None:
    """Output and input tok/s per workload, each config against the first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    configs = list(dict.fromkeys(r["config"] for r in rows))
    keys = sorted({(r["workload"], r["max_concurrency"]) for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(configs)
    for ax, metric in zip(axes, ("output_tok_s", "input_tok_s"), strict=True):
        base = {
            (r["workload"], r["max_concurrency"]): r[metric]
            for r in rows
            if r["config"] == configs[0]
        }
        for i, config in enumerate(configs):
            by_key = {
                (r["workload"], r["max_concurrency"]): r[metric]
                for r in rows
                if r["config"] == config
            }
            values = [by_key.get(k, math.nan) / base.get(k, math.nan) for k in keys]
            ax.bar([j + i * width for j in range(len(keys))], values, width, label=config)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))])
        ax.set_xticklabels([f"{w}\n@{c}" for w, c in keys], fontsize=8)
        ax.set_title(f"{metric} vs {configs[0]}")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{result['model']} on {result['device']}")
    fig.tight_layout()
    fig.savefig(png, dpi=90)


def save(result: dict, stem: str) -> None:
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(report(result) + "\n")
    try:
        if result["rows"]:
            plot(result, stem + ".png")
    except ImportError as exc:  # the GPU machine may lack matplotlib: --report draws it later
        print(f"no plot ({exc}); draw it with --report {stem}.json")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="examples/llama-8b")
    parser.add_argument("--load-format", default="dummy")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--mem-fraction-static", type=float, default=0.7)
    parser.add_argument("--context-length", type=int, default=36864)
    parser.add_argument("--server-args", default="", help="more launch_server flags, for all")
    parser.add_argument(
        "--require", nargs="*", default=[], type=lambda s: tuple(s.split("=", 1)),
        metavar="CONFIG=REGEX", help="more patterns a configuration's server log must hold",
    )  # fmt: skip
    parser.add_argument(
        "--long-context-concurrency", type=int,
        help="when no bf16-cache configuration runs first (default: its capacity // 33K)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--port", type=int, default=31000)
    parser.add_argument("--startup-timeout", type=float, default=900)
    parser.add_argument("--out", default="serve_bench_out")
    parser.add_argument("--tag", default="llama8b")
    parser.add_argument("--resume", action="store_true", help="add to the --out file's run")
    parser.add_argument("--report", metavar="JSON", help="only redraw the table and plot")
    args = parser.parse_args()
    if args.report:
        result = json.load(open(args.report))
        save(result, args.report.removesuffix(".json"))
        print(report(result))
        return
    import torch

    import sglang

    os.makedirs(args.out, exist_ok=True)
    device = torch.cuda.get_device_name()
    card = next((w.lower() for w in device.split() if w.upper().startswith("H")), "gpu")
    stem = os.path.join(args.out, f"{card}_serving_{args.tag}")
    if args.resume and os.path.exists(stem + ".json"):
        result = json.load(open(stem + ".json"))
    else:
        result = dict(
            device=device, sglang=sglang.__version__, model=args.model,
            mem_fraction_static=args.mem_fraction_static, server_args=args.server_args,
            seed=args.seed, workloads=[w.__dict__ for w in WORKLOADS], configs={}, rows=[],
        )  # fmt: skip
    model = prepare_model(args.model, args.out)
    names = list(args.configs)
    while names:
        name = names.pop(0)
        config = CONFIGS[name]
        unservable = fa4_fp8_cache_error() if name == "fa4_fp8kv" else None
        if unservable:
            rows, info = [], dict(backend=config.backend, error=unservable, proof={})
        else:
            rows, info = run_config(name, model, args, result)
        result["rows"] = [r for r in result["rows"] if r["config"] != name] + rows
        result["configs"][name] = info
        save(result, stem)
        if info["error"] and config.fallback:
            print(f"{name} cannot serve here ({info['error']}); running {config.fallback}")
            info["replaced_by"] = config.fallback
            names.insert(0, config.fallback)
    print(report(result))
    failed = [
        name for name, info in result["configs"].items()
        if info["error"] and not info.get("replaced_by")
    ]  # fmt: skip
    if failed:
        raise SystemExit(f"failed: {failed}; see {args.out}/server_<config>.log")


if __name__ == "__main__":
    main()
