"""The in-tree route: scripts/make_upstream_patch.py's patch, applied to SGLang 0.5.23 itself.

The sglang==0.5.23 wheel (``pip download``, cached in ~/.cache/sage_attn) is unpacked
twice into temporary directories laid out as SGLang's repository: one stays pristine,
the other gets the patch through ``git apply``. Each is then imported in a fresh
process whose ``sglang`` is that tree (first on PYTHONPATH; the installed sglang, which
holds this plugin's modules, is shadowed) and in which SGLang's ``load_plugins()``
runs with ``SGLANG_PLUGINS`` naming no plugin, so the installed sage_attn entry point
cannot register anything:

- pristine tree: sage_attn is neither registered nor a choice, and
  ``SGLANG_SAGE_ATTN_KV_CACHE=int8`` leaves the memory planner's bytes per token
  at bf16's (the negative control: in this environment nothing but the patch
  registers the backend or sizes the 8-bit cache);
- patched tree: the backend is both, its factory is the patched
  ``attention_registry.py``'s, and building the backend through it with SGLang's
  attention kit runs the 8-bit kernel from the patched tree. No ``HookRegistry``
  hook of sage_attn is registered; SGLang's planner, pool choice and model runner
  call ``kv8_hooks.py``'s functions themselves, and the patched planner gives the
  8-bit bytes per token with the setting at int8 and its own bf16 figure without;
- the tests the patch adds pass SGLang's own CI collection (registration and
  ``__main__`` in every file), and some of them (the 8-bit cache's hooks, pool and
  calibration among them) pass from the patched tree.

Without PyPI (the GPU machine) the wheel cannot be had and those tests skip, unless
``CI`` is set: then they fail. The anchored edits are checked without the wheel.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from sage_attention_inputs import CAN_RUN_KERNELS, requires_kernels

REPO = Path(__file__).resolve().parents[2]


def load_module(name: str, path: Path):
    """A module by its file, as SGLang's own CI checks load ci_register.py."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


upstream = load_module("make_upstream_patch", REPO / "scripts/make_upstream_patch.py")
# Quick in-tree tests that need the moved helpers and the in-tree conftest.
IN_TREE_SMOKE = [
    f"{upstream.KERNEL_TESTS}/test_sage_attention_reference.py",
    f"{upstream.KERNEL_TESTS}/test_sage_attention_request_split.py",
    f"{upstream.BACKEND_TESTS}/test_sage_attention_kv8_hooks.py",
    f"{upstream.BACKEND_TESTS}/test_sage_attention_kv8_pool.py",
    f"{upstream.BACKEND_TESTS}/test_sage_attention_kv8_calibration.py",
]
# Per-commit CUDA suites of SGLang's test/run_suite.py the added tests may name.
SUITES = {
    "base-b-kernel-unit-test-1-gpu-large",
    "base-b-test-1-gpu-large",
    "base-b-test-2-gpu-large",
}
# An 8B-shaped model's bytes per token (32 layers, 8 KV heads at TP 2, head dim 128):
# 4 KV heads per rank x 32 layers x (128 + 128) x 2 B in bf16, x (128 + 128 + 8) B
# in the 8-bit cache.
BF16_CELL_BYTES = 4 * 32 * 256 * 2
KV8_CELL_BYTES = 4 * 32 * 264


# ---- what a fresh process on a tree registers (run as this file's __main__) -------


def probe(build: bool) -> dict:
    """What the ``sglang`` first on the path registers for sage_attn once SGLang has
    loaded its plugins; with ``build``, what building it through that entry runs."""
    import importlib.metadata
    import pkgutil

    import sglang
    from sglang.srt.plugins import load_plugins

    load_plugins()
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    factory = ATTENTION_BACKENDS.get("sage_attn")
    plugins = importlib.metadata.entry_points(group="sglang.srt.plugins")
    found = {
        "sglang": sglang.__file__,
        "in_choices": "sage_attn" in ATTENTION_BACKEND_CHOICES,
        "factory_file": factory and inspect.getsourcefile(factory),
        "entry_point_installed": "sage_attn" in plugins.names,
        "sage_attn_hooks": sage_attn_hook_targets(),
        "kv8_calls": {
            name: call in inspect.getsource(pkgutil.resolve_name(name))
            for name, call in upstream.KV8_CALLS.items()
        },
        "cell_bytes": planner_cell_bytes(),
    }
    if build and factory is not None:
        found.update(build_through_registry())
    return found


def sage_attn_hook_targets() -> list[str]:
    """The targets of every ``HookRegistry`` hook defined in a sage_attn module."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    return sorted(
        target
        for target, hooks in HookRegistry._hooks.items()
        if any("sage_attention" in getattr(hook, "__module__", "") for _, hook, _ in hooks)
    )


def planner_cell_bytes() -> dict:
    """The tree's memory planner (``DefaultPoolConfigurator._compute_cell_size``) on
    an 8B-shaped bf16 model with ``SGLANG_SAGE_ATTN_KV_CACHE`` unset and at int8. The
    configurator stands in with what the planner and ``kv8_refusals`` read, for a
    servable ``--attention-backend sage_attn`` server."""
    from types import SimpleNamespace

    import torch

    import sglang.srt.layers.cp.utils as cp_utils
    import sglang.srt.model_executor.pool_configurator as planner_module
    import sglang.srt.runtime_context as runtime_context

    parallel = SimpleNamespace(attn_tp_size=2, attn_dcp_size=1, enable_dsa_cache_layer_split=False)
    try:
        from sglang.srt.layers.attention.sage_attention.kv8_hooks import _REFUSED_FLAGS
    except ModuleNotFoundError:  # pristine SGLang: nothing reads the 8-bit cache's flags
        _REFUSED_FLAGS = {}

    server_args = SimpleNamespace(
        attention_backend="sage_attn", prefill_attention_backend=None,
        decode_attention_backend=None, kv_cache_dtype="auto", disaggregation_mode="null",
        speculative_algorithm=None, pp_size=1, dcp_size=1, attn_dp_size=1, ep_join_mode=None,
        **dict.fromkeys(("enable_hisparse", *_REFUSED_FLAGS), False),  # the planner reads it
    )  # fmt: skip
    model_config = SimpleNamespace(
        head_dim=128, v_head_dim=128, hf_config=SimpleNamespace(architectures=["LlamaForCausalLM"]),
        get_num_kv_heads=lambda tp, dcp=1: 8 // tp,
    )  # fmt: skip
    kvc = SimpleNamespace(
        server_args=server_args, model_config=model_config, kv_cache_dtype=torch.bfloat16,
        use_mla_backend=False, is_hybrid_swa=False, mambaish_config=None, is_draft_worker=False,
    )  # fmt: skip
    planner = object.__new__(planner_module.DefaultPoolConfigurator)
    planner.kv_cache_dtype_str = "auto"
    # Each of these modules binds get_parallel; the kit (build_through_registry) needs
    # the real one back.
    originals = {
        module: module.get_parallel for module in (runtime_context, planner_module, cp_utils)
    }
    sizes = {}
    os.environ.pop("SGLANG_SAGE_ATTN_KV_CACHE", None)
    try:
        for module in originals:
            module.get_parallel = lambda: parallel
        sizes["unset"] = planner._compute_cell_size(kvc, 32)
        os.environ["SGLANG_SAGE_ATTN_KV_CACHE"] = "int8"
        sizes["int8"] = planner._compute_cell_size(kvc, 32)
    finally:
        os.environ.pop("SGLANG_SAGE_ATTN_KV_CACHE", None)
        for module, original in originals.items():
            module.get_parallel = original
    return sizes


def build_through_registry() -> dict:
    """One extend batch through SGLang's attention kit, which builds the backend as
    SGLang does (``ATTENTION_BACKENDS["sage_attn"](runner)``), every chunk on the
    8-bit kernel; the helpers are the ones the patch moved into SGLang's package."""
    import torch

    import sglang.srt.layers.attention.sage_attention_backend as backend_module
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    from sglang.test.kernels.sage_attention_inputs import DEVICE
    from sglang.test.kits.attention_unittest.attention_methods import dense_attention as kit
    from sglang.test.kits.sage_attention_kit import BACKEND, KIT_DTYPE, KitTestCase

    os.environ["SGLANG_SAGE_ATTN_MIN_EXTEND_LEN"] = "0"
    calls = []
    kernel = backend_module.sage_extend_attention

    def counted(*args, **kwargs):
        calls.append(kwargs["pv"])
        return kernel(*args, **kwargs)

    backend_module.sage_extend_attention = counted  # the backend takes it when built
    case = next(
        case
        for case in kit.make_dense_input_config_cases(BACKEND)
        if case.forward_mode == ForwardMode.EXTEND
    )
    with torch.no_grad():
        kit.run_dense_attention_case(
            KitTestCase(), case, head_dim=64, dtype=KIT_DTYPE, device=DEVICE
        )
    return {"backend_file": inspect.getsourcefile(backend_module), "sage_kernel_calls": calls}


def run_probe(python_dir: Path, build: bool = False) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, *(["--build"] if build else [])],
        env=upstream.sglang_env(python_dir), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---- the trees ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def wheel() -> Path:
    try:
        return upstream.fetch_wheel()
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as error:
        detail = getattr(error, "stderr", None) or str(error)
        reason = f"sglang=={upstream.SGLANG_VERSION} wheel not reachable: {detail[-500:]}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason + " (set CI=1 to make this a failure)")


@pytest.fixture(scope="module")
def trees() -> Path:
    # Two unpacked wheels are ~270 MB: gone with the module, not kept by pytest.
    with tempfile.TemporaryDirectory(prefix="sage_attn_upstream_") as tmp:
        yield Path(tmp)


@pytest.fixture(scope="module")
def pristine(wheel, trees) -> Path:
    """The wheel's sglang, unpacked and untouched (the ``python`` directory)."""
    return upstream.unpack_wheel(wheel, trees / "pristine" / "python")


@pytest.fixture(scope="module")
def patched(pristine, trees) -> Path:
    """The same tree as SGLang's repository, after ``git apply`` of the patch."""
    patch_text = upstream.build_patch(upstream.BaseTree(pristine))
    return upstream.patched_tree(trees / "patched", patch_text, pristine)


@pytest.fixture(scope="module")
def patched_probe(patched) -> dict:
    return run_probe(patched, build=CAN_RUN_KERNELS)


@pytest.fixture(scope="module")
def pristine_probe(pristine) -> dict:
    return run_probe(pristine)


def test_pristine_sglang_does_not_register_sage_attn(pristine, pristine_probe):
    found = pristine_probe
    assert found["sglang"].startswith(str(pristine.resolve()) + os.sep), found
    assert not found["in_choices"] and found["factory_file"] is None, found


def test_pristine_sglang_does_not_size_the_8bit_cache(pristine, pristine_probe):
    assert not any(pristine_probe["kv8_calls"].values()), pristine_probe["kv8_calls"]
    problems = upstream.registration_problems(pristine_probe, pristine)  # what --check says
    assert sum("does not call" in problem for problem in problems) == len(upstream.KV8_CALLS)
    assert pristine_probe["cell_bytes"] == {"unset": BF16_CELL_BYTES, "int8": BF16_CELL_BYTES}


def test_patched_sglang_registers_sage_attn_itself(patched, patched_probe):
    assert upstream.registration_problems(patched_probe, patched) == []
    assert patched_probe["factory_file"].endswith("layers/attention/attention_registry.py")


def test_patched_sglang_calls_the_8bit_cache_itself(patched_probe):
    """No plugin hook: SGLang's own planner, pool choice and runner make the calls,
    and the planner counts the 8-bit bytes only with the setting at int8."""
    assert patched_probe["sage_attn_hooks"] == [], patched_probe["sage_attn_hooks"]
    assert all(patched_probe["kv8_calls"].values()), patched_probe["kv8_calls"]
    assert patched_probe["cell_bytes"] == {"unset": BF16_CELL_BYTES, "int8": KV8_CELL_BYTES}


@pytest.mark.skipif(**requires_kernels)
def test_backend_built_through_the_registry_runs_the_8bit_kernel(patched, patched_probe):
    assert patched_probe["backend_file"].startswith(str(patched.resolve()) + os.sep)
    assert patched_probe["sage_kernel_calls"] == ["fp16"], patched_probe


def test_added_tests_pass_sglang_ci_collection(patched):
    """run_suite.py collects every file under test/registered and refuses one without
    a registration or a ``__main__`` entry; kernel tests live under kernels/ops/<group>."""
    ci_register = load_module("ci_register", patched / "sglang/test/ci/ci_register.py")
    registered = patched.parent / "test/registered"
    files = sorted(str(p) for p in registered.rglob("test_*.py"))
    registries = ci_register.collect_tests(files, sanity_check=True)

    assert {Path(r.filename).name for r in registries} == {
        path.name
        for path in (REPO / "test/srt").glob("test_*.py")
        if path.name not in upstream.TESTS_LEFT_OUT
    }
    assert {r.effective_suite for r in registries} <= SUITES
    for path in registered.joinpath("kernels").rglob("test_*.py"):
        assert path.relative_to(registered).parts[:2] == ("kernels", "ops"), path


@pytest.mark.skipif(**requires_kernels)
def test_added_tests_pass_from_the_patched_tree(patched):
    root = patched.parent
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *IN_TREE_SMOKE],
        cwd=root, env=upstream.sglang_env(patched), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout.splitlines()[-1]


def test_hook_probe_sees_the_plugins_8bit_cache_hooks(monkeypatch):
    """The positive control of ``sage_attn_hooks == []``: registered as the plugin
    registers them, the 8-bit cache's hooks are found."""
    from sglang.srt.layers.attention.sage_attention import kv8_hooks
    from sglang.srt.plugins.hook_registry import HookRegistry

    targets = [kv8_hooks.CELL_SIZE_TARGET, kv8_hooks.POOL_TARGET, kv8_hooks.CALIBRATION_TARGET]
    before = sage_attn_hook_targets()
    monkeypatch.setattr(kv8_hooks, "_registered", False)
    kv8_hooks.register_kv8_hooks()
    try:
        assert set(sage_attn_hook_targets()) == set(before) | set(targets)
    finally:
        for target in targets:
            HookRegistry._hooks[target].pop()  # leave the registry as it was


# ---- the edits fail loudly (no wheel needed) -----------------------------------------


@pytest.mark.parametrize("edit", upstream.EDITS, ids=lambda edit: edit.path.split("/")[-1])
def test_edits_refuse_sources_without_their_anchor(edit):
    with pytest.raises(upstream.SourceChanged):
        edit.transform("# an SGLang file that changed\n")


def test_kv8_edits_refuse_a_function_kv8_hooks_lacks():
    with pytest.raises(upstream.SourceChanged, match="no function"):
        upstream._kv8_import("kv8_renamed", " " * 8)


def _support_matrix(header: str) -> str:
    """SGLang's docs page, reduced to what the edit reads: the MHA table (with a
    Triton row) and the MLA table after it (also with one)."""
    separator = "|" + "---|" * (header.count("|") - 1)
    return (
        "## Support Matrix\n\n### MHA Backends\n\n"
        f"{header}\n{separator}\n| **FA3** | ✅ |\n| **Triton** | ❌ |\n| **AITER** | ✅ |\n\n"
        f"### MLA Backends\n\n{header}\n{separator}\n| **Triton** | n/a |\n"
    )


def test_support_row_goes_after_triton_in_the_mha_table():
    header, _, row = upstream._table_lines((REPO / upstream.SUPPORT_ROW).read_text())
    lines = upstream.add_support_row(_support_matrix(header)).splitlines()
    assert lines.count(row) == 1
    assert lines[lines.index(row) - 1] == "| **Triton** | ❌ |"
    assert lines.index(row) < lines.index("### MLA Backends")


def test_support_row_refuses_a_table_with_other_columns():
    with pytest.raises(upstream.SourceChanged, match="columns changed"):
        upstream.add_support_row(_support_matrix("| **Backend** | **Page Size > 1** |"))


if __name__ == "__main__":
    print(json.dumps(probe(build="--build" in sys.argv)))
