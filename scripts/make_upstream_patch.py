"""Write sage_attn as one patch against SGLang 0.5.23's own tree (the in-tree route).

    python scripts/make_upstream_patch.py --out sage_attn.patch      # fetches the wheel once
    python scripts/make_upstream_patch.py --sglang-src DIR --out sage_attn.patch
    python scripts/make_upstream_patch.py --check                    # apply to a copy, import it

DIR is SGLang's ``sglang/`` package as unpacked from the sglang==0.5.23 wheel, or a
SGLang checkout (``python/sglang/``, ``docs/``). Without ``--sglang-src`` the wheel is
fetched with ``pip download`` into ~/.cache/sage_attn/sglang-wheel. Never point it at
a site-packages that has this plugin installed: that tree already holds its modules
(refused). Apply the patch from a SGLang repo root: ``git apply sage_attn.patch`` or
``patch -p1 < sage_attn.patch``.

The patch adds this project's modules at the same paths, the tests where SGLang
keeps registered tests (with their CI registration), and edits SGLang's own files:
registers ``sage_attn`` in ``attention_registry.py`` as the in-tree backends are
registered, adds it to the ``--attention-backend`` choices, has the memory planner,
the pool choice and the model runner call ``kv8_hooks.py``'s functions for the 8-bit
KV cache (``SGLANG_SAGE_ATTN_KV_CACHE=int8``), and, in a checkout with SGLang's docs,
adds its row to the attention-backend support matrix. ``plugin.py`` (the pip entry
point) stays out: in-tree, nothing is registered through it, and no ``HookRegistry``
hook is applied.

Each edit of an SGLang file is an ``Edit`` in ``EDITS``: a path and a transform that
replaces anchor text and raises ``SourceChanged`` when the anchor is not there
exactly once, so a changed SGLang stops the generation instead of yielding a patch
that no longer does what it says.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import fnmatch
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SGLANG_VERSION = "0.5.23"
BACKEND_NAME = "sage_attn"
REPO = Path(__file__).resolve().parents[1]
WHEEL_CACHE = Path.home() / ".cache" / "sage_attn" / "sglang-wheel"

# Paths in SGLang's repository (and in this one, which mirrors its layout).
ATTENTION = "python/sglang/srt/layers/attention"
PLUGIN = f"{ATTENTION}/sage_attention/plugin.py"
REGISTRY = f"{ATTENTION}/attention_registry.py"
CHOICES = "python/sglang/srt/arg_groups/choices.py"
POOL_CONFIGURATOR = "python/sglang/srt/model_executor/pool_configurator.py"
KV_CACHE_CONFIGURATOR = "python/sglang/srt/mem_cache/kv_cache_configurator.py"
MODEL_RUNNER = "python/sglang/srt/model_executor/model_runner.py"
KV8_HOOKS = f"{ATTENTION}/sage_attention/kv8_hooks.py"
DOCS_TABLE = "docs/advanced_features/attention_backend.md"
# This project's row of SGLang's MHA support matrix, with the table's header above it.
SUPPORT_ROW = "docs/advanced_features/sage_attn_support_matrix.md"

# An allow-list that names no plugin: load_plugins() then loads none, so the
# sage_attn entry point of an installed copy cannot register anything.
NO_PLUGINS = "none"


class SourceChanged(RuntimeError):
    """A file the patch is made from (SGLang's or this project's) no longer has what
    the script expects of it: regenerating blindly would make a wrong patch."""


def replace_once(text: str, anchor: str, replacement: str, *, where: str) -> str:
    count = text.count(anchor)
    if count != 1:
        raise SourceChanged(f"{where}: expected this text once, found it {count} times:\n{anchor}")
    return text.replace(anchor, replacement)


# ---- edits of SGLang's own files ---------------------------------------------------


def _plugin_factory() -> str:
    """The source of plugin.py's backend factory, so the in-tree registration builds
    the backend exactly as the plugin does."""
    source = (REPO / PLUGIN).read_text()
    module = ast.parse(source)
    functions = {node.name: node for node in module.body if isinstance(node, ast.FunctionDef)}
    factory = functions.get("create_sage_attn_backend")
    if factory is None:
        raise SourceChanged(f"{PLUGIN}: no create_sage_attn_backend")
    # In attention_registry.py the factory cannot see plugin.py's globals.
    plugin_globals = set(functions)
    for node in module.body:
        if isinstance(node, ast.Assign):
            plugin_globals |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.Import | ast.ImportFrom):
            plugin_globals |= {(a.asname or a.name).split(".")[0] for a in node.names}
    used = {node.id for node in ast.walk(factory) if isinstance(node, ast.Name)}
    if used & (plugin_globals - {factory.name}):
        raise SourceChanged(
            f"{PLUGIN}: create_sage_attn_backend uses the module's globals "
            f"{sorted(used & plugin_globals)}; make it self-contained to register it in-tree"
        )
    return ast.get_source_segment(source, factory)


def register_backend(registry: str) -> str:
    """Register sage_attn right after triton, whose kernels it runs for decode and
    for the layers it delegates."""
    anchor = '@register_attention_backend("torch_native")\n'
    entry = f'@register_attention_backend("{BACKEND_NAME}")\n{_plugin_factory()}\n\n\n'
    return replace_once(registry, anchor, entry + anchor, where=REGISTRY)


def add_backend_choice(choices: str) -> str:
    """Add sage_attn to --attention-backend's choices, last of the NVIDIA ones."""
    anchor = '    "minicpm_flashinfer",\n    # AMD specific\n'
    entry = f'    "{BACKEND_NAME}",  # 8-bit SageAttention prefill; Triton decode\n'
    last_nvidia, amd = anchor.splitlines(keepends=True)
    return replace_once(choices, anchor, last_nvidia + entry + amd, where=CHOICES)


# The 8-bit KV cache. The plugin reaches these three places through HookRegistry
# (kv8_hooks.register_kv8_hooks); in-tree, SGLang's code calls the functions the
# hooks wrap. Each is imported inside the function that calls it (as
# _compute_cell_size imports its helpers): sage_attn's modules, Triton kernels
# included, load when a server sizes its pool, not whenever SGLang is imported.


def _kv8_import(name: str, indent: str) -> str:
    """A local import of ``kv8_hooks.name``, which must be a function there."""
    module = ast.parse((REPO / KV8_HOOKS).read_text())
    if name not in {node.name for node in module.body if isinstance(node, ast.FunctionDef)}:
        raise SourceChanged(f"{KV8_HOOKS}: no function {name}, which SGLang's code is to call")
    package = KV8_HOOKS.removeprefix("python/").removesuffix(".py").replace("/", ".")
    return f"{indent}from {package} import (\n{indent}    {name},\n{indent})\n\n"


def size_kv8_cells(planner: str) -> str:
    """The memory planner divides its budget by the 8-bit bytes per token, so
    max_total_num_tokens counts the 8-bit cache (the plugin's AROUND hook)."""
    anchor = (
        "    def _compute_cell_size(self, kvc: KVCacheConfigurator, num_layers: int) -> int:\n"
        '        """Compute per-token KV cache cost in bytes."""\n'
    )
    call = (
        "        # sage_attn's 8-bit KV cache (SGLANG_SAGE_ATTN_KV_CACHE=int8) is not a\n"
        "        # --kv-cache-dtype: it gives its own bytes per token (None when off).\n"
        + _kv8_import("kv8_cell_bytes_for", " " * 8)
        + "        cell = kv8_cell_bytes_for(kvc, num_layers)\n"
        "        if cell is not None:\n"
        "            return cell\n"
    )
    return replace_once(planner, anchor, anchor + call, where=POOL_CONFIGURATOR)


def choose_kv8_pool(configurator: str) -> str:
    """The MHA pool is sage_attn's 8-bit pool class, built with SGLang's own
    arguments (the plugin's AROUND hook)."""
    anchor = (
        "    def _build_mha_kv_pool(\n"
        "        self, *, max_total_num_tokens: int, mha_pool_class: type, quant_method=None\n"
        "    ) -> KVCache:\n"
    )
    call = (
        "        # sage_attn's 8-bit KV cache (SGLANG_SAGE_ATTN_KV_CACHE=int8) is its own\n"
        "        # pool class (None when off), built with the arguments below.\n"
        + _kv8_import("kv8_pool_class_for", " " * 8)
        + "        mha_pool_class = kv8_pool_class_for(self) or mha_pool_class\n"
    )
    return replace_once(configurator, anchor, anchor + call, where=KV_CACHE_CONFIGURATOR)


def calibrate_kv8_smoothing(runner: str) -> str:
    """The 8-bit pool's smoothing vectors are calibrated once the attention backends
    exist, before any CUDA graph is captured (the plugin's AFTER hook)."""
    anchor = (
        "            self._prepare_replicated_q_proj()\n"
        "\n"
        "    def _prepare_replicated_q_proj(self) -> None:\n"
    )
    last_line, blank, next_def = anchor.splitlines(keepends=True)
    call = (
        "\n"
        "        # sage_attn's 8-bit KV cache calibrates its K smoothing here: the backends\n"
        "        # are built and no CUDA graph is captured yet (a no-op for other pools).\n"
        + _kv8_import("calibrate_kv8_pool", " " * 8)
        + "        calibrate_kv8_pool(self)\n"
    )
    return replace_once(runner, anchor, last_line + call + blank + next_def, where=MODEL_RUNNER)


# What the three edits make SGLang call, by the function that calls it (``--check``).
KV8_CALLS = {
    "sglang.srt.model_executor.pool_configurator:DefaultPoolConfigurator._compute_cell_size":
        "kv8_cell_bytes_for(kvc, num_layers)",
    "sglang.srt.mem_cache.kv_cache_configurator:KVCacheConfigurator._build_mha_kv_pool":
        "kv8_pool_class_for(self)",
    "sglang.srt.model_executor.model_runner:ModelRunner.init_attention_backends":
        "calibrate_kv8_pool(self)",
}  # fmt: skip


def _table_lines(markdown: str) -> list[str]:
    return [line for line in markdown.splitlines() if line.startswith("|")]


def _cells(row: str) -> list[str]:
    return [cell.strip() for cell in row.strip().strip("|").split("|")]


def add_support_row(doc: str) -> str:
    """Add sage_attn's row to the MHA table of the support matrix, after Triton's."""
    header, _, row = _table_lines((REPO / SUPPORT_ROW).read_text())
    section = doc.find("### MHA Backends")
    if section < 0:
        raise SourceChanged(f"{DOCS_TABLE}: no '### MHA Backends' section")
    table = _table_lines(doc[section:])
    if not table or _cells(table[0]) != _cells(header):
        raise SourceChanged(
            f"{DOCS_TABLE}: the MHA table's columns changed; update {SUPPORT_ROW} to\n"
            f"{table[0] if table else '(no table)'}"
        )
    triton = next((line for line in table if line.startswith("| **Triton**")), None)
    if triton is None:
        raise SourceChanged(f"{DOCS_TABLE}: no Triton row in the MHA table")
    before, after = doc[:section], doc[section:]
    return before + replace_once(after, triton + "\n", f"{triton}\n{row}\n", where=DOCS_TABLE)


@dataclass(frozen=True)
class Edit:
    path: str  # in SGLang's repository
    transform: Callable[[str], str]
    # Applied only when the base tree has the file (the wheel ships no docs).
    optional: bool = False


EDITS = [
    Edit(REGISTRY, register_backend),
    Edit(CHOICES, add_backend_choice),
    Edit(POOL_CONFIGURATOR, size_kv8_cells),
    Edit(KV_CACHE_CONFIGURATOR, choose_kv8_pool),
    Edit(MODEL_RUNNER, calibrate_kv8_smoothing),
    Edit(DOCS_TABLE, add_support_row, optional=True),
]


# ---- this project's files --------------------------------------------------------


# The plugin's way into SGLang, which in-tree code replaces by edits of SGLang's files.
PLUGIN_ROUTE = {
    PLUGIN: "the pip entry point; in-tree, EDITS register the backend and call kv8_hooks.py",
}


def project_modules() -> dict[str, str]:
    """Every module of the backend, at the same path in SGLang's tree (so modules
    added later are picked up), but the plugin route's."""
    modules = {
        path.relative_to(REPO).as_posix(): path.read_text()
        for path in sorted((REPO / ATTENTION).rglob("*.py"))
        if "__pycache__" not in path.parts and path.relative_to(REPO).as_posix() not in PLUGIN_ROUTE
    }
    for path, text in modules.items():
        if re.search(r"sage_attention(\.| import )plugin\b", text):
            raise SourceChanged(f"{path} imports plugin.py, which in-tree code has no use for")
    return modules


# Where the tests go in SGLang's test/registered tree, and the CI suite that runs
# them (run_suite.py requires a registration in every file there; kernel tests
# live under kernels/ops/<group>/). Times are estimates for a first CI run.
KERNEL_TESTS = "test/registered/kernels/ops/attention/sage_attention"
BACKEND_TESTS = "test/registered/attention/sage_attention"
CUDA_CI = 'register_cuda_ci(est_time={{}}, stage="{}", runner_config="{}")'
KERNEL_SUITE = CUDA_CI.format("base-b-kernel-unit", "1-gpu-large")
ONE_GPU = CUDA_CI.format("base-b", "1-gpu-large")
TWO_GPUS = CUDA_CI.format("base-b", "2-gpu-large")
# Test file (shell pattern; the first match wins) -> directory, suite, est. seconds.
# The 8-bit cache's hooks, pool and calibration tests exercise SGLang's planner, pool
# and a backend, not a kernel: they go with the backend tests.
TEST_PLACEMENT = [
    ("test_sage_attention_tp.py", BACKEND_TESTS, TWO_GPUS, 180),
    ("test_sage_attention_backend*.py", BACKEND_TESTS, ONE_GPU, 300),
    ("test_sage_attention_base_*.py", BACKEND_TESTS, ONE_GPU, 120),
    ("test_sage_attention_kv8_hooks.py", BACKEND_TESTS, ONE_GPU, 30),
    ("test_sage_attention_kv8_pool.py", BACKEND_TESTS, ONE_GPU, 60),
    ("test_sage_attention_kv8_calibration.py", BACKEND_TESTS, ONE_GPU, 120),
    ("test_sage_attention_extend.py", KERNEL_TESTS, KERNEL_SUITE, 300),
    ("test_sage_attention_hopper.py", KERNEL_TESTS, KERNEL_SUITE, 300),
    ("test_sage_attention_compile.py", KERNEL_TESTS, KERNEL_SUITE, 300),
    ("*", KERNEL_TESTS, KERNEL_SUITE, 120),
]
# This project's packaging and harness, not the backend.
TESTS_LEFT_OUT = {
    "test_sage_attention_plugin.py": "the pip entry point, which in-tree registration replaces",
    "test_sage_attention_smollm2.py": "benchmark/sage_attention's loader, not in the patch",
    "test_sage_attention_validate.py": "benchmark/sage_attention's harness, not in the patch",
    "test_sage_attention_upstream.py": "the in-tree route itself (this script)",
    "test_sage_attention_upstream_summary.py": "UPSTREAM.md's generated tables",
    "test_sage_attention_crossover.py": "checks the crossover table against this project's "
    "committed measurements (benchmark/sage_attention/results), which the patch leaves out",
}
# Test helpers become modules of SGLang's test package (test/registered may hold
# only registered test files).
HELPERS = {
    "sage_attention_inputs": "sglang.test.kernels.sage_attention_inputs",
    "sage_attention_kit": "sglang.test.kits.sage_attention_kit",
}


def _drop_plugin_from_kit(text: str) -> str:
    where = "sage_attention_kit.py"
    text = replace_once(
        text, "from sglang.srt.layers.attention.sage_attention import plugin\n", "", where=where
    )
    registration = "plugin.register()\nBACKEND = plugin.BACKEND_NAME\n"
    return replace_once(text, registration, f'BACKEND = "{BACKEND_NAME}"\n', where=where)


def _drop_plugin_from_tp(text: str) -> str:
    where = "test_sage_attention_tp.py"
    text = replace_once(text, "plugin-registered factory", "registered factory", where=where)
    text = replace_once(
        text, "    from sglang.srt.layers.attention.sage_attention import plugin\n", "", where=where
    )
    registration = "    plugin.register()  # what load_plugins() does in a scheduler process\n"
    return replace_once(text, registration, "", where=where)


def _drop_checkout_path(text: str) -> str:
    """In SGLang's tree the tests import the tree itself: no checkout to put first."""
    where = "conftest.py"
    item_1, item_2 = text.find("1. Tests import this checkout"), text.find("2. Under")
    start, end = text.find("import sglang\n"), text.find("def _patch_interpreter_fp8_rounding")
    if min(item_1, item_2, start, end) < 0 or "sglang.__path__" not in text[start:end]:
        raise SourceChanged(f"{where}: the checkout-path block changed")
    docstring = text[:item_1] + text[item_2 + len("2. ") : start].replace("\n   ", "\n")
    return replace_once(docstring, "import pathlib\n", "", where=where) + "\n" + text[end:]


# Per-file edits beyond the ones every test gets (registration, helper imports).
TEST_EDITS = {
    "sage_attention_kit.py": _drop_plugin_from_kit,
    "test_sage_attention_tp.py": _drop_plugin_from_tp,
}


def _import_helpers_from_package(text: str) -> str:
    for name, module in HELPERS.items():
        text = re.sub(rf"^(\s*)from {name} import", rf"\1from {module} import", text, flags=re.M)
        text = re.sub(rf"^(\s*)import {name}$", rf"\1import {module} as {name}", text, flags=re.M)
    return text


def _is_main_guard(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'"


def _register_for_ci(text: str, registration: str) -> str:
    """Register the file for SGLang's CI after its imports, and give it the
    ``__main__`` entry CI runs it through (``python3 file.py``)."""
    module = ast.parse(text)
    after = 0  # the line after which to register: the last of the leading imports
    for index, node in enumerate(module.body):
        docstring = index == 0 and ast.get_docstring(module) is not None
        if not (docstring or isinstance(node, ast.Import | ast.ImportFrom)):
            break
        after = node.end_lineno
    lines = text.splitlines(keepends=True)
    header = f"from sglang.test.ci.ci_register import register_cuda_ci\n\n{registration}\n"
    lines.insert(after, header)
    text = "".join(lines)
    if not any(_is_main_guard(node) for node in module.body):
        text += _main_block(module)
    return text


def _main_block(module: ast.Module) -> str:
    imported = {
        alias.name for node in module.body if isinstance(node, ast.Import) for alias in node.names
    }
    missing = [f"    import {name}\n" for name in ("sys", "pytest") if name not in imported]
    imports = "".join(missing) + ("\n" if missing else "")
    return f'\n\nif __name__ == "__main__":\n{imports}    sys.exit(pytest.main([__file__, "-v"]))\n'


def project_tests() -> dict[str, str]:
    """The backend's tests and their helpers at their places in SGLang's tree."""
    files, test_dirs = {}, {}
    for path in sorted((REPO / "test" / "srt").glob("*.py")):
        name = path.name
        if name in TESTS_LEFT_OUT or name == "conftest.py":
            continue
        text = path.read_text()
        if name in TEST_EDITS:
            text = TEST_EDITS[name](text)
        if path.stem in HELPERS:
            files["python/" + HELPERS[path.stem].replace(".", "/") + ".py"] = (
                _import_helpers_from_package(text)
            )
            continue
        if not name.startswith("test_"):
            raise SourceChanged(f"test/srt/{name}: a helper with no place in HELPERS")
        directory, suite, est_time = next(
            placement[1:] for placement in TEST_PLACEMENT if fnmatch.fnmatch(name, placement[0])
        )
        text = _import_helpers_from_package(text)
        files[f"{directory}/{name}"] = _register_for_ci(text, suite.format(est_time))
        test_dirs[path.stem] = directory
    _check_imports(files, test_dirs)
    conftest = _drop_checkout_path((REPO / "test" / "srt" / "conftest.py").read_text())
    for directory in sorted(set(test_dirs.values())):
        files[f"{directory}/conftest.py"] = conftest
    return files


def _check_imports(files: dict[str, str], test_dirs: dict[str, str]) -> None:
    """Tests that import each other (hopper imports compile and extend) must share a
    directory; nothing may still import a helper or plugin.py by its old name."""
    for path, text in files.items():
        for stem, directory in test_dirs.items():
            if re.search(rf"^\s*(from|import) {stem}\b", text, re.M) and not path.startswith(
                directory + "/"
            ):
                raise SourceChanged(f"{path} imports {stem}, which goes to {directory}")
        old_names = "|".join(HELPERS)
        stale = re.search(rf"^\s*(from|import) ({old_names})\b|plugin\.register", text, re.M)
        if stale:
            raise SourceChanged(f"{path}: left unconverted: {stale.group(0).strip()}")


# ---- the base tree and the patch -------------------------------------------------


class BaseTree:
    """A pristine SGLang tree: an unpacked wheel (``sglang/``) or a checkout."""

    def __init__(self, src: Path):
        if (src / "python" / "sglang").is_dir():
            self.python, self.repo = src / "python", src
        elif (src / "sglang").is_dir():
            self.python, self.repo = src, None
        else:
            raise SystemExit(f"{src}: neither an unpacked sglang wheel nor a SGLang checkout")
        if (self.python / "sglang/srt/layers/attention/sage_attention_backend.py").exists():
            raise SystemExit(
                f"{src} already holds sage_attention_backend.py: not a pristine SGLang tree "
                "(a site-packages with this plugin installed?)"
            )

    def read(self, repo_path: str) -> str | None:
        """A file by its path in SGLang's repository; None if this tree lacks it."""
        if repo_path.startswith("python/"):
            path = self.python / repo_path.removeprefix("python/")
        elif self.repo is not None:
            path = self.repo / repo_path
        else:
            return None
        return path.read_text() if path.exists() else None


def file_diff(path: str, old: str | None, new: str) -> str:
    """A git-style diff of one file (``old`` None: a new file)."""
    header = f"diff --git a/{path} b/{path}\n" + ("new file mode 100644\n" if old is None else "")
    lines = difflib.unified_diff(
        old.splitlines(keepends=True) if old is not None else [],
        new.splitlines(keepends=True),
        "/dev/null" if old is None else f"a/{path}",
        f"b/{path}",
    )
    return header + "".join(
        line if line.endswith("\n") else line + "\n\\ No newline at end of file\n" for line in lines
    )


def sglang_style(files: dict[str, str]) -> dict[str, str]:
    """The Python files formatted as SGLang's pre-commit formats them (isort, black at
    88 columns; this project formats with ruff at 100), by ruff in that mode."""
    ruff = [sys.executable, "-m", "ruff"]
    with tempfile.TemporaryDirectory() as tmp:
        for path, text in files.items():
            (Path(tmp) / path).parent.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / path).write_text(text)
        try:
            subprocess.run(
                [*ruff, "check", "--isolated", "--quiet", "--select", "I", "--fix",
                 "--config", "lint.isort.known-first-party=['sglang']", tmp],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            subprocess.run(
                [*ruff, "format", "--isolated", "--quiet", "--line-length", "88", tmp],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
        except subprocess.CalledProcessError as error:
            raise SystemExit(f"ruff (pip install ruff) failed:\n{error.stderr}") from None
        return {path: (Path(tmp) / path).read_text() for path in files}


def build_patch(base: BaseTree) -> str:
    diffs = []
    for edit in EDITS:
        old = base.read(edit.path)
        if old is None:
            if edit.optional:
                print(f"skipped: {edit.path} is not in the base tree", file=sys.stderr)
                continue
            raise SystemExit(f"the base tree has no {edit.path}")
        diffs.append(file_diff(edit.path, old, edit.transform(old)))
    new_files = sglang_style(project_modules() | project_tests())
    for path in sorted(new_files):
        if base.read(path) is not None:
            raise SystemExit(f"the base tree already has {path}")
        diffs.append(file_diff(path, None, new_files[path]))
    return "".join(diffs)


# ---- the wheel, applying, checking -------------------------------------------------


def fetch_wheel(cache: Path = WHEEL_CACHE) -> Path:
    """The sglang wheel for this interpreter, downloaded once into ``cache``; raises
    ``subprocess.CalledProcessError`` / ``TimeoutExpired`` when PyPI is out of reach."""
    cache = cache / sys.implementation.cache_tag / platform.machine()
    cached = sorted(cache.glob(f"sglang-{SGLANG_VERSION}-*.whl"))
    if cached:
        return cached[-1]
    cache.mkdir(parents=True, exist_ok=True)
    # Into a scratch dir first, so an interrupted download is never taken for the wheel.
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "--timeout", "15", "--retries", "1", "--dest", scratch,
             f"sglang=={SGLANG_VERSION}"],
            check=True, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        (wheel,) = Path(scratch).glob("*.whl")
        return Path(shutil.move(wheel, cache / wheel.name))


def unpack_wheel(wheel: Path, python_dir: Path) -> Path:
    """Unpack the wheel's ``sglang`` package into ``python_dir``."""
    with zipfile.ZipFile(wheel) as archive:
        members = [name for name in archive.namelist() if name.startswith("sglang/")]
        archive.extractall(python_dir, members=members)
    return python_dir


def apply_patch(patch: Path, repo_root: Path) -> None:
    """Apply as a maintainer would, from the repository root."""
    if shutil.which("git"):
        command = ["git", "apply", "--whitespace=nowarn", str(patch.resolve())]
    else:
        command = ["patch", "-p1", "--forward", "--input", str(patch.resolve())]
    # Inside another repository's work tree git would apply relative to that one.
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(repo_root.resolve().parent))
    subprocess.run(command, cwd=repo_root, env=env, check=True, capture_output=True, text=True)


def sglang_env(python_dir: Path) -> dict[str, str]:
    """An environment whose ``sglang`` is the one under ``python_dir`` (first on the
    path) and in which SGLang loads no plugin."""
    return dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(python_dir), os.environ.get("PYTHONPATH", "")]),
        SGLANG_PLUGINS=NO_PLUGINS, PYTHONDONTWRITEBYTECODE="1",
    )  # fmt: skip


REGISTRY_PROBE = """
import inspect, json, pkgutil, sys, sglang
from sglang.srt.plugins import load_plugins
from sglang.srt.plugins.hook_registry import HookRegistry
load_plugins()  # as every SGLang process does; SGLANG_PLUGINS keeps the entry point out
from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES
from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
factory = ATTENTION_BACKENDS.get("sage_attn")
print(json.dumps({
    "sglang": sglang.__file__,
    "in_choices": "sage_attn" in ATTENTION_BACKEND_CHOICES,
    "factory_file": factory and inspect.getsourcefile(factory),
    "sage_attn_hooks": sorted(
        target for target, hooks in HookRegistry._hooks.items()
        if any("sage_attention" in getattr(hook, "__module__", "") for _, hook, _ in hooks)
    ),
    "kv8_calls": {
        name: call in inspect.getsource(pkgutil.resolve_name(name))
        for name, call in json.loads(sys.argv[1]).items()
    },
}))
"""


def probe_registry(python_dir: Path) -> dict:
    """What SGLang under ``python_dir`` registers for sage_attn and whether it calls
    the 8-bit cache's functions, from a fresh process."""
    result = subprocess.run(
        [sys.executable, "-c", REGISTRY_PROBE, json.dumps(KV8_CALLS)], env=sglang_env(python_dir),
        cwd=python_dir, capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    return json.loads(result.stdout.strip().splitlines()[-1])


def patched_tree(root: Path, patch_text: str, src: Path | None) -> Path:
    """A copy of the base tree (the wheel's by default) at ``root``, laid out as
    SGLang's repository, with the patch applied; returns its ``python`` directory."""
    if src is None:
        unpack_wheel(fetch_wheel(), root / "python")
    else:
        base = BaseTree(src)
        shutil.copytree(base.python / "sglang", root / "python" / "sglang")
        if base.repo is not None and (base.repo / "docs").is_dir():
            shutil.copytree(base.repo / "docs", root / "docs")
    (root / "sage_attn.patch").write_text(patch_text)
    apply_patch(root / "sage_attn.patch", root)
    return root / "python"


def check(patch_text: str, src: Path | None) -> None:
    """Apply the patch to a copy of the base tree and import what it patched."""
    with tempfile.TemporaryDirectory() as tmp:
        python_dir = patched_tree(Path(tmp), patch_text, src)
        problems = registration_problems(probe_registry(python_dir), python_dir)
    if problems:
        raise SystemExit("check failed: " + "; ".join(problems))
    print(
        "check passed: the patched tree registers sage_attn and calls the 8-bit cache's "
        "functions itself",
        file=sys.stderr,
    )


def registration_problems(found: dict, python_dir: Path) -> list[str]:
    """What is wrong with ``probe_registry``'s answer for a patched tree."""
    inside = str(python_dir.resolve()) + os.sep
    problems = []
    if not found["sglang"].startswith(inside):
        problems.append(f"sglang was imported from {found['sglang']}, not the patched tree")
    if not found["in_choices"]:
        problems.append("sage_attn is not among --attention-backend's choices")
    if not (found["factory_file"] or "").startswith(inside):
        problems.append(f"sage_attn's factory comes from {found['factory_file']}")
    if found["sage_attn_hooks"]:
        problems.append(f"sage_attn hooks are registered on {found['sage_attn_hooks']}")
    for name, called in found["kv8_calls"].items():
        if not called:
            problems.append(f"{name} does not call {KV8_CALLS[name]}")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sglang-src", type=Path, help="unpacked sglang wheel or SGLang checkout")
    parser.add_argument("--out", type=Path, help="write the patch here (default: stdout)")
    parser.add_argument("--check", action="store_true", help="apply to a copy and import it")
    args = parser.parse_args()

    if args.sglang_src is not None:
        patch_text = build_patch(BaseTree(args.sglang_src))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            patch_text = build_patch(BaseTree(unpack_wheel(fetch_wheel(), Path(tmp))))
    if args.out is not None:
        args.out.write_text(patch_text)
    elif not args.check:
        sys.stdout.write(patch_text)
    if args.check:
        check(patch_text, args.sglang_src)


if __name__ == "__main__":
    main()
