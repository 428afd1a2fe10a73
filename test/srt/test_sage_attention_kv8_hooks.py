"""kv8_hooks.py: how SGLANG_SAGE_ATTN_KV_CACHE=int8 reaches SGLang's planner and pool choice.

The hooks must call SGLang unchanged when the setting is off, give the planner the
8-bit bytes and the configurator sage_attn's pool class when it is on, and refuse
every server option that would hand the cache to another reader. The targets are
resolved against the installed SGLang, so a rename there fails here, not in a
server.
"""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from sglang.srt.layers.attention.sage_attention import kv8_hooks
from sglang.srt.layers.attention.sage_attention.kv8_pool import SageKV8TokenToKVPool


def server_args(**overrides):
    """The fields kv8_refusals reads, at a servable configuration."""
    fields = dict(
        attention_backend="sage_attn", prefill_attention_backend=None,
        decode_attention_backend=None, kv_cache_dtype="auto", disaggregation_mode="null",
        speculative_algorithm=None, pp_size=1, dcp_size=1, attn_dp_size=1, ep_join_mode=None,
        **dict.fromkeys(kv8_hooks._REFUSED_FLAGS, False),
    )  # fmt: skip
    fields.update(overrides)
    return SimpleNamespace(**fields)


def configurator(**overrides):
    fields = dict(use_mla_backend=False, is_hybrid_swa=False, mambaish_config=None,
                  is_draft_worker=False, server_args=server_args())  # fmt: skip
    fields.update(overrides)
    return SimpleNamespace(**fields)


def test_a_plain_sage_attn_server_is_servable():
    assert kv8_hooks.kv8_refusals(server_args(), configurator()) == []


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        (dict(decode_attention_backend="triton"), "prefill and decode must both run sage_attn"),
        (dict(attention_backend="flashinfer"), "prefill=flashinfer"),
        (dict(kv_cache_dtype="fp8_e4m3"), "--kv-cache-dtype fp8_e4m3"),
        (dict(enable_hierarchical_cache=True), "HiCache"),
        (dict(enable_lmcache=True), "LMCache"),
        (dict(disaggregation_mode="prefill"), "PD disaggregation"),
        (dict(speculative_algorithm="EAGLE"), "speculative decoding"),
        (dict(pp_size=2), "pipeline parallelism"),
        (dict(dcp_size=2), "decode context parallelism"),
        (dict(attn_dp_size=2), "DP attention"),
    ],
)
def test_options_that_hand_the_cache_to_another_reader_are_refused(overrides, reason):
    reasons = kv8_hooks.kv8_refusals(server_args(**overrides), configurator())
    assert len(reasons) == 1 and reason in reasons[0], reasons


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        (dict(use_mla_backend=True), "MLA"),
        (dict(is_hybrid_swa=True), "sliding-window hybrid"),
        (dict(mambaish_config=object()), "linear-attention"),
    ],
)
def test_models_without_a_plain_mha_pool_are_refused(overrides, reason):
    reasons = kv8_hooks.kv8_refusals(server_args(), configurator(**overrides))
    assert len(reasons) == 1 and reason in reasons[0], reasons


def test_every_option_the_refusals_read_is_a_server_arg_of_this_sglang():
    """A renamed option must fail here and at start-up, never read as False."""
    from sglang.srt.arg_groups.arg_utils import field_names
    from sglang.srt.server_args import ServerArgs

    assert set(vars(server_args())) <= field_names(ServerArgs)
    args = server_args()
    del args.enable_lmcache
    with pytest.raises(ValueError, match="'enable_lmcache'.*does not support this SGLang"):
        kv8_hooks.kv8_refusals(args, configurator())


def test_refusal_names_the_setting_and_every_reason():
    args = server_args(decode_attention_backend="triton", speculative_algorithm="EAGLE")
    with pytest.raises(ValueError, match="SGLANG_SAGE_ATTN_KV_CACHE=int8") as error:
        kv8_hooks.refuse_unless_kv8_servable(args, configurator())
    assert "prefill and decode" in str(error.value) and "speculative" in str(error.value)


def _cell_size_configurator(**overrides):
    config = SimpleNamespace(
        head_dim=128, v_head_dim=128, get_num_kv_heads=lambda tp, dcp=1: max(1, 8 // tp)
    )
    return configurator(model_config=config, **overrides)


def test_cell_size_is_sglangs_when_off_and_the_8bit_bytes_when_on(monkeypatch):
    def original(pool_configurator, kvc, num_layers):
        return "sglang's"

    kvc = _cell_size_configurator()
    monkeypatch.delenv("SGLANG_SAGE_ATTN_KV_CACHE", raising=False)
    assert kv8_hooks.kv8_cell_size(original, None, kvc, 32) == "sglang's"
    monkeypatch.setenv("SGLANG_SAGE_ATTN_KV_CACHE", "int8")
    monkeypatch.setattr(
        "sglang.srt.runtime_context.get_parallel",
        lambda: SimpleNamespace(attn_tp_size=2, attn_dcp_size=1),
    )
    # 32 layers x 4 KV heads per rank x (128 + 128 + 8) B.
    assert kv8_hooks.kv8_cell_size(original, None, kvc, 32) == 32 * 4 * 264
    # A draft model's pool is never swapped (speculative decoding is refused anyway).
    assert kv8_hooks.kv8_cell_size(original, None, _cell_size_configurator(
        is_draft_worker=True), 32) == "sglang's"  # fmt: skip
    with pytest.raises(ValueError, match="MLA"):
        kv8_hooks.kv8_cell_size(original, None, _cell_size_configurator(use_mla_backend=True), 32)


def test_pool_hook_passes_sglangs_arguments_with_sage_attns_class(monkeypatch):
    seen = {}

    def original(kvc, *, max_total_num_tokens, mha_pool_class, quant_method=None):
        seen.update(size=max_total_num_tokens, cls=mha_pool_class, quant=quant_method)
        return "pool"

    class SGLangPool:
        pass

    kvc = configurator()
    monkeypatch.delenv("SGLANG_SAGE_ATTN_KV_CACHE", raising=False)
    kv8_hooks.kv8_pool(original, kvc, max_total_num_tokens=10, mha_pool_class=SGLangPool)
    assert seen["cls"] is SGLangPool
    monkeypatch.setenv("SGLANG_SAGE_ATTN_KV_CACHE", "int8")
    assert kv8_hooks.kv8_pool(original, kvc, max_total_num_tokens=10, mha_pool_class=SGLangPool)
    assert seen == dict(size=10, cls=SageKV8TokenToKVPool, quant=None)
    speculative = configurator(server_args=server_args(speculative_algorithm="EAGLE"))
    with pytest.raises(ValueError, match="speculative"):
        kv8_hooks.kv8_pool(original, speculative, max_total_num_tokens=10, mha_pool_class=dict)


def test_calibration_runs_once_for_an_8bit_pool_that_asks(monkeypatch):
    calls = []
    monkeypatch.setattr(
        "sglang.srt.layers.attention.sage_attention.kv8_calibration.calibrate_key_means",
        lambda runner, backend: calls.append(1),
    )
    pool = object.__new__(SageKV8TokenToKVPool)
    pool.needs_calibration = True
    runner = SimpleNamespace(token_to_kv_pool=pool, attn_backend=None)
    assert kv8_hooks.kv8_calibrate("result", runner) == "result"
    assert calls == [1]
    pool.needs_calibration = False
    kv8_hooks.kv8_calibrate(None, runner)
    kv8_hooks.kv8_calibrate(None, SimpleNamespace(token_to_kv_pool=object()))  # a bf16 pool
    assert calls == [1]


@pytest.mark.parametrize(
    "target", [kv8_hooks.CELL_SIZE_TARGET, kv8_hooks.POOL_TARGET, kv8_hooks.CALIBRATION_TARGET]
)
def test_hook_targets_exist_in_the_installed_sglang(target):
    owner, attribute = target.rsplit(".", 1)
    assert callable(getattr(pkgutil.resolve_name(owner), attribute))


def test_sglang_asking_with_the_setting_off_loads_no_kernel_module():
    """SGLang's planner asks on every server: the answer must not import the kernels."""
    code = (
        "import sys; from types import SimpleNamespace as N\n"
        "from sglang.srt.layers.attention.sage_attention import kv8_hooks\n"
        "assert kv8_hooks.kv8_cell_bytes_for(N(is_draft_worker=False), 32) is None\n"
        "assert kv8_hooks.kv8_pool_class_for(N(is_draft_worker=False)) is None\n"
        "kv8_hooks.calibrate_kv8_pool(N(token_to_kv_pool=object()))\n"
        "loaded = [m for m in sys.modules if m.startswith('sglang.srt.layers.attention.sage')]\n"
        "print(sorted(loaded))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "SGLANG_SAGE_ATTN_KV_CACHE"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = out.stdout.strip().splitlines()[-1]
    for heavy in ("extend_attention", "kv8_pool", "kv8_cache", "quantize", "hopper_attention"):
        assert heavy not in loaded, loaded


def test_registering_twice_registers_each_hook_once(monkeypatch):
    from sglang.srt.plugins.hook_registry import HookRegistry

    monkeypatch.setattr(kv8_hooks, "_registered", False)
    targets = (kv8_hooks.CELL_SIZE_TARGET, kv8_hooks.POOL_TARGET, kv8_hooks.CALIBRATION_TARGET)
    before = {target: len(HookRegistry._hooks.get(target, [])) for target in targets}
    kv8_hooks.register_kv8_hooks()
    kv8_hooks.register_kv8_hooks()
    for target, count in before.items():
        assert len(HookRegistry._hooks[target]) == count + 1
        HookRegistry._hooks[target].pop()  # leave the registry as it was


def test_post_capture_kv_sizing_is_refused(monkeypatch):
    """SGLang would size the pool after CUDA-graph capture, which the 8-bit pool does
    not implement: refused at start-up, and by the pool should it be built anyway."""
    monkeypatch.setenv("SGLANG_ENABLE_POST_CAPTURE_KV_SIZING", "1")
    reasons = kv8_hooks.kv8_refusals(server_args(), configurator())
    assert len(reasons) == 1 and "SGLANG_ENABLE_POST_CAPTURE_KV_SIZING" in reasons[0], reasons
    with pytest.raises(ValueError, match="post-capture KV sizing"):
        SageKV8TokenToKVPool(
            size=16, page_size=1, dtype=torch.float16, head_num=1, head_dim=64, layer_num=1,
            device="cpu", enable_memory_saver=False, post_capture_active=True,
        )  # fmt: skip
