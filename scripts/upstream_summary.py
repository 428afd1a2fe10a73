"""The figure tables of UPSTREAM.md and the docs page, generated from the committed JSON.

    python scripts/upstream_summary.py          # rewrite the generated regions
    python scripts/upstream_summary.py --check  # exit 1 if a region is not what its JSON says

A generated region is the text between ``<!-- generated:NAME -->`` and
``<!-- /generated:NAME -->`` in a file of ``TARGETS``. NAME is a ``Table`` of ``TABLES``
(a JSON result file, the command that produced it, its columns and a function from
its data to rows), or ``file:PATH`` for a markdown file shown verbatim. Another
table is one more ``Table`` and a region where it should appear.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGETS = ["UPSTREAM.md", "docs/advanced_features/sage_attn.md"]
KERNEL_RESULTS = "benchmark/kernels/sage_attention/results"
MODEL_RESULTS = "benchmark/sage_attention/results"
BENCH = "python benchmark/kernels/sage_attention/bench_sage_attention.py"
REGION = re.compile(r"(<!-- generated:(\S+) -->\n).*?(<!-- /generated:\2 -->)", re.S)


def setting(name: str):
    """A constant of sage_attn's settings module (read, not imported: no torch here)."""
    source = (REPO / "python/sglang/srt/layers/attention/sage_attention/settings.py").read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == name for target in node.targets
        ):
            return ast.literal_eval(node.value)
    raise KeyError(f"settings.py has no {name}")


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×"


def kilo(tokens: int) -> str:
    return f"{tokens // 1024}K"


def by_key(rows: Iterable[dict], *fields: str) -> dict:
    return {tuple(row[field] for field in fields): row for row in rows}


# ---- kernel benchmark (bench_sage_attention.py rows) ------------------------------


def default_impl(head_dim: int) -> str:
    """The op the backend runs by default: Q/K rotated at small head dims (settings)."""
    rotated = head_dim <= setting("AUTO_ROTATION_MAX_HEAD_DIM")
    return "sage_fp16_rotated" if rotated else "sage_fp16"


def prefill_rows(data: dict) -> list[tuple]:
    rows = by_key(data["rows"], "impl", "head_dim", "q_len", "causal")
    dense = sorted({(r["head_dim"], r["q_len"]) for r in data["rows"]}, key=lambda k: (-k[0], k[1]))
    table = []
    for head_dim, tokens in dense:
        for causal in (False, True):
            sage = rows[default_impl(head_dim), head_dim, tokens, causal]
            cudnn = rows["sdpa_cudnn", head_dim, tokens, causal]
            table.append((
                head_dim, kilo(tokens), "yes" if causal else "no", f"{cudnn['tops']:.0f}",
                f"{sage['tops']:.0f}", ratio(sage["tops"], cudnn["tops"]), f"{sage['cos']:.5f}",
            ))  # fmt: skip
    return table


def extend_rows(data: dict) -> list[tuple]:
    extend = [r for r in data["rows"] if r["suite"] == "extend"]
    rows = by_key(extend, "impl", "kv_len", "q_len")
    table = []
    shapes = sorted({(r["kv_len"], r["q_len"]) for r in extend}, key=lambda k: (k[0], -k[1]))
    for kv_len, q_len in shapes:
        sage, triton, cudnn = (
            rows[impl, kv_len, q_len] for impl in ("sage_fp16", "sglang_triton", "sdpa_cudnn")
        )
        table.append((
            kilo(kv_len), f"{1 - q_len / kv_len:.0%}", q_len, f"{sage['tops']:.0f}",
            f"{triton['tops']:.0f}", f"{cudnn['tops']:.0f}", ratio(sage["tops"], triton["tops"]),
            ratio(sage["tops"], cudnn["tops"]),
        ))  # fmt: skip
    return table


# The bench's names for SGLang's Triton decode at a split cap of 16 (what sage_attn
# ran when this file was measured) and at 64 (what it runs now).
DECODE_CAP_16 = "sglang_triton_decode (sage_attn's decode)"
DECODE_CAP_64 = "sglang_triton_decode_splits64"


def decode_rows(data: dict) -> list[tuple]:
    decode = [r for r in data["rows"] if r["suite"] == "decode"]
    rows = by_key(decode, "impl", "batch", "kv_len")
    table = []
    for batch, kv_len in sorted({(r["batch"], r["kv_len"]) for r in decode}):
        old, new = rows[DECODE_CAP_16, batch, kv_len], rows[DECODE_CAP_64, batch, kv_len]
        share = f"{old['gbps'] / data['copy_gbps']:.0%} → {new['gbps'] / data['copy_gbps']:.0%}"
        table.append((
            batch, kilo(kv_len), f"{old['ms']:.3f}", f"{new['ms']:.3f}",
            ratio(old["ms"], new["ms"]), share,
        ))  # fmt: skip
    return table


# ---- model-level validation (validate.py --model smollm2) --------------------------

# sage_attn's defaults on this head-dim-64 model (rotated), and without the rotation
# (what a head-dim-128 model runs by default).
SMOLLM2_BACKENDS = {"sage_fp16_rot": "default (rotated)", "sage_fp16": "unrotated (hd-128 default)"}
# The KV caches in the harness (validate.py --backends triton sage_kv8 triton_fp8).
SMOLLM2_KV_CACHES = {
    "sage_kv8": "8-bit cache (sage_attn)",
    "triton_fp8": "fp8_e4m3 cache (SGLang Triton)",
}


def smollm2_rows(data: dict, backends: dict = SMOLLM2_BACKENDS) -> list[tuple]:
    """Per text and context, each of ``backends`` against the bf16 Triton run."""
    ppl = by_key(data["perplexity"], "text", "context", "backend")
    vs_fp32 = by_key(
        (r for r in data["agreement"] if r["against"] == "fp32"), "text", "context", "backend"
    )
    table = []
    for text, context, _ in (key for key in ppl if key[2] == "triton"):
        bf16, bf16_ppl = vs_fp32[text, context, "triton"], ppl[text, context, "triton"]["ppl"]
        for backend, label in backends.items():
            sage = vs_fp32[text, context, backend]
            dppl = ppl[text, context, backend]["ppl"] / bf16_ppl - 1
            kl, bf16_kl = sage["kl_mean"], bf16["kl_mean"]
            miss, bf16_miss = 1 - sage["top1_agreement"], 1 - bf16["top1_agreement"]
            table.append((
                text, kilo(context), label, f"{dppl:+.3%}",
                f"{bf16_kl:.2e} / {kl:.2e} ({ratio(kl, bf16_kl)})",
                f"{bf16_miss:.2%} / {miss:.2%} ({ratio(miss, bf16_miss)})",
            ))  # fmt: skip
    return table


# ---- real servers (serve_throughput.py, serve_logprobs.py compare) ----------------

# serve_throughput.py's run labels, baseline first.
SERVING_CONFIGS = {
    "triton": "SGLang Triton, bf16 cache",
    "sage_bf16": "sage_attn, bf16 cache",
    "sage_kv8": "sage_attn, 8-bit cache",
}


def serving_runs(data: dict) -> dict:
    runs = {run["label"]: run for run in data["runs"]}
    return {label: runs[label] for label in SERVING_CONFIGS}


def capacity_rows(data: dict) -> list[tuple]:
    runs = serving_runs(data)
    baseline = runs["triton"]["max_total_num_tokens"]
    return [
        (name, f"{runs[label]['max_total_num_tokens']:,}",
         ratio(runs[label]["max_total_num_tokens"], baseline))
        for label, name in SERVING_CONFIGS.items()
    ]  # fmt: skip


def decode_batch_rows(data: dict) -> list[tuple]:
    """Decode tok/s at the longest input, per batch: Triton on the bf16 cache against
    sage_attn on the 8-bit cache (the runs of one serve_throughput.py call each)."""
    runs = {run["label"]: by_key(run["cells"], "input_len", "batch") for run in data["runs"]}
    triton, kv8 = runs["triton"], runs["sage_kv8"]
    longest = max(length for length, _ in triton)
    return [
        (kilo(longest), batch, f"{triton[longest, batch]['output_tok_s']:,.0f}",
         f"{kv8[longest, batch]['output_tok_s']:,.0f}",
         ratio(kv8[longest, batch]["output_tok_s"], triton[longest, batch]["output_tok_s"]))
        for length, batch in sorted(triton)
        if length == longest
    ]  # fmt: skip


def throughput_rows(data: dict) -> list[tuple]:
    cells = {
        label: by_key(run["cells"], "input_len", "batch")
        for label, run in serving_runs(data).items()
    }
    table = []
    for input_len, batch in sorted(cells["triton"]):
        row = [kilo(input_len), batch]
        for rate in ("input_tok_s", "output_tok_s"):  # prefill, decode
            baseline = cells["triton"][input_len, batch][rate]
            row.append(f"{baseline:,.0f}")
            for label in list(SERVING_CONFIGS)[1:]:
                value = cells[label][input_len, batch][rate]
                row.append(f"{value:,.0f} ({ratio(value, baseline)})")
        table.append(tuple(row))
    return table


# serve_logprobs.py compare's candidates on other KV caches: (KV cache, attention).
KV_CACHES = {
    "sage_kv8": ("8-bit (`SGLANG_SAGE_ATTN_KV_CACHE=int8`)", "sage_attn"),
    "triton_fp8_e4m3": ("fp8_e4m3 (`--kv-cache-dtype`)", "SGLang Triton"),
}
KV_BASELINE = "triton_bf16"


def _logprob_cells(row: dict) -> tuple:
    return (
        f"{row['perplexity']:.4f}", f"{row['delta_ppl_pct']:+.3f}%",
        f"{row['prompt_top1_agreement']:.2%}", f"{row['mean_abs_input_logprob_gap']:.3f}",
        f"{row['generated_agreement']:.1%}",
    )  # fmt: skip


def kv_cache_rows(data: dict) -> list[tuple]:
    """The bf16 cache, each other cache against it, and sage_attn on the bf16 cache
    (against its own Triton run, from serve_smollm2; its capacity is bf16's)."""
    rows = data["kv_caches"]
    if {row["baseline"] for row in rows} != {KV_BASELINE}:
        raise ValueError(f"kv_caches are not all compared with {KV_BASELINE}")
    baseline = rows[0]
    table = [(
        "bf16", "SGLang Triton", f"{baseline['baseline_capacity']:,}", "1.00×",
        f"{baseline['baseline_perplexity']:.4f}", "(baseline)", "—", "—", "—",
    )]  # fmt: skip
    for row in rows:
        cache, attention = KV_CACHES[row["candidate"]]
        capacity = row["capacity"]
        table.append((
            cache, attention, f"{capacity:,}", ratio(capacity, row["baseline_capacity"]),
            *_logprob_cells(row),
        ))  # fmt: skip
    table.append(("bf16", "sage_attn", "—", "—", *_logprob_cells(data["sage_attn_bf16_cache"])))
    return table


@dataclass(frozen=True)
class Table:
    name: str
    source: str  # a JSON file, from the repository root
    columns: str  # "a | b | c"
    rows: Callable[[dict], list[tuple]]
    command: str | None = None  # what wrote the file; None: the table above's run


TABLES = [
    Table(
        name="prefill_h200",
        source=f"{KERNEL_RESULTS}/h200_v4_rotation_dense.json",
        columns="head dim | tokens | causal | cuDNN (TOPS) | sage_attn (TOPS) | × cuDNN | "
        "cos vs fp32",
        rows=prefill_rows,
        command=f"{BENCH} --suites dense \\\n    --head-dims 64 128 --seq-lens 4096 8192 32768 "
        "--impls sage_fp16 sage_fp16_rotated sdpa_cudnn",
    ),
    Table(
        name="extend_h200",
        source=f"{KERNEL_RESULTS}/h200_v4_kv8_extend_decode.json",
        columns="KV tokens | cached | new tokens | sage_attn (TOPS) | SGLang Triton (TOPS) | "
        "cuDNN (TOPS) | × Triton | × cuDNN",
        rows=extend_rows,
        command=f"{BENCH} --suites extend decode \\\n    --extend-lens 8192 32768 "
        "--cached-fractions 0 0.5 0.9 --decode-batches 1 8 64 \\\n"
        "    --decode-lens 1024 8192 32768 131072 "
        "--impls sage_fp16 'sage_kv8*' sdpa_cudnn 'sglang_triton*'",
    ),
    Table(
        name="decode_h200",
        source=f"{KERNEL_RESULTS}/h200_v4_kv8_extend_decode.json",
        columns="batch | KV tokens | split cap 16 (ms) | split cap 64: sage_attn (ms) | "
        "speed-up | share of the copy rate",
        rows=decode_rows,
    ),
    Table(
        name="accuracy_smollm2",
        source=f"{MODEL_RESULTS}/h200_smollm2_validation_v4.json",
        columns="text | context | sage_attn | ΔPPL vs bf16 | mean KL vs fp32: bf16 / sage_attn | "
        "top-1 miss vs fp32: bf16 / sage_attn",
        rows=smollm2_rows,
        command="python benchmark/sage_attention/validate.py --model smollm2 \\\n"
        "    --task-lengths 1024 4096 8192 --task-trials 2 "
        "--backends triton sage_fp16 sage_fp8 sage_fp16_rot",
    ),
    Table(
        name="serving_capacity_h200",
        source=f"{KERNEL_RESULTS}/h200_serving_throughput.json",
        columns="server | max_total_num_tokens | × triton",
        rows=capacity_rows,
        command="bash scripts/gpu_suite.sh throughput",
    ),
    Table(
        name="serving_throughput_h200",
        source=f"{KERNEL_RESULTS}/h200_serving_throughput.json",
        columns="input | batch | prefill tok/s: triton | sage_attn bf16 | sage_attn 8-bit | "
        "decode tok/s: triton | sage_attn bf16 | sage_attn 8-bit",
        rows=throughput_rows,
    ),
    Table(
        name="serving_decode_32k_h200",
        source=f"{KERNEL_RESULTS}/h200_serving_throughput_32k_v6.json",
        columns="input | batch | decode tok/s: triton, bf16 cache | sage_attn, 8-bit cache | "
        "speed-up",
        rows=decode_batch_rows,
        command="THROUGHPUT_CONFIGS='kv8 triton' \\\n"
        "    THROUGHPUT_ARGS='--lengths 1024 32768 --batches 8 16 32' "
        "bash scripts/gpu_suite.sh throughput",
    ),
    Table(
        name="kv_cache_kl_smollm2",
        source=f"{MODEL_RESULTS}/h200_smollm2_kv8_validation.json",
        columns="text | context | KV cache | ΔPPL vs bf16 | mean KL vs fp32: bf16 / this cache | "
        "top-1 miss vs fp32: bf16 / this cache",
        rows=lambda data: smollm2_rows(data, SMOLLM2_KV_CACHES),
        command="SMOLLM2_ARGS='--backends triton sage_kv8 triton_fp8 --task-lengths 1024 "
        "--task-trials 1' \\\n    bash scripts/gpu_suite.sh smollm2",
    ),
    Table(
        name="kv_cache_accuracy_smollm2",
        source=f"{MODEL_RESULTS}/h200_kv8_serving_accuracy.json",
        columns="KV cache | attention | max_total_num_tokens | × bf16 | prompt PPL | ΔPPL | "
        "prompt top-1 agreement | mean abs Δ log-prob | generated tokens equal",
        rows=kv_cache_rows,
        command="bash scripts/gpu_suite.sh serve_kv8      # the bf16, 8-bit and fp8_e4m3 caches\n"
        "bash scripts/gpu_suite.sh serve_smollm2  # sage_attn on the bf16 cache",
    ),
]


def render(table: Table, target: str) -> str:
    """The table and where its figures come from, linked relative to ``target``."""
    data = json.loads((REPO / table.source).read_text())
    columns = table.columns.split(" | ")
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        *("| " + " | ".join(str(cell) for cell in row) + " |" for row in table.rows(data)),
    ]
    link = os.path.relpath(REPO / table.source, (REPO / target).parent)
    origin = f"From [`{Path(table.source).name}`]({link})"
    if table.command is None:
        return "\n".join(lines) + f"\n\n{origin}, the run above.\n"
    return "\n".join(lines) + f"\n\n{origin}, written by:\n\n```bash\n{table.command}\n```\n"


def embed(path: str) -> str:
    """A markdown file of the repository (``file:PATH`` regions), less its leading
    comment: the docs' support-matrix row, shown where the patch cannot put it."""
    return re.sub(r"\A<!--.*?-->\s*", "", (REPO / path).read_text(), flags=re.S)


def regenerate(text: str, target: str) -> str:
    """``text`` with every generated region rewritten from its source."""
    tables = {table.name: table for table in TABLES}

    def fill(match: re.Match) -> str:
        start, name, end = match.groups()
        if name.startswith("file:"):
            return start + embed(name.removeprefix("file:")) + end
        if name not in tables:
            raise SystemExit(f"{target}: no table named {name!r} in TABLES")
        return start + render(tables[name], target) + end

    return REGION.sub(fill, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if a region is stale")
    args = parser.parse_args()
    stale = []
    for target in TARGETS:
        path = REPO / target
        text = path.read_text()
        fresh = regenerate(text, target)
        if fresh != text:
            stale.append(target)
            if not args.check:
                path.write_text(fresh)
    if args.check and stale:
        sys.exit(f"stale generated tables in {', '.join(stale)}: run {Path(__file__).name}")


if __name__ == "__main__":
    main()
