"""SageAttentionBackend under real attention tensor parallelism (TP = 2, two processes).

Each rank brings up SGLang's parallel state the way a scheduler process does
(``publish`` with its spawn rank, then ``bootstrap.init_parallel_runtime``: NCCL on
GPUs, gloo on the CPU), builds the backend through the plugin-registered factory,
and runs an 8B-shaped attention layer (32 query heads of 128; 8 KV heads, or 1
that each rank must replicate) sharded as SGLang's QKVParallelLinear shards it:
an extend, an extend over that cached prefix, and a decode step. Rank 0 gathers
the heads; the same code then runs as a group of one rank holding every head
(the single-GPU result), and the two are compared:
- extend: bitwise equal -- each head's arithmetic, the per-request K mean and its
  summation order do not depend on how many heads a rank holds;
- decode: within bf16 rounding -- SGLang's Triton decode kernel picks its KV split
  count from the heads per GPU, so the split-KV reduction order differs.

Both on SGLang's bf16 pool and on sage_attn's 8-bit KV cache (``kv_cache="int8"``:
the pool holds each rank's KV heads, and every step runs the 8-bit cache kernels).

    python test/srt/test_sage_attention_tp.py [--device cuda|cpu]   # standalone
The GPU case runs only with >= 2 GPUs; the CPU case (gloo, Triton interpreter,
small shapes) runs in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile

import pytest
import torch

TP = 2
NUM_Q_HEADS = 32
HEAD_DIM = 128
# (prefix, chunk) per request for the first extend; the second extends both by CHUNK_2.
SHAPES = {
    "cuda": dict(chunk_1=(1536, 700), chunk_2=(1024, 300), dtype=torch.bfloat16),
    "cpu": dict(chunk_1=(70, 33), chunk_2=(40, 9), dtype=torch.float16),
}
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# The 8-bit cache runs in pages its decode reads whole (kv8_cache.py); bf16 at page size 1.
PAGE_SIZE = {"auto": 1, "int8": 16}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model_dir(num_kv_heads: int, parent: str) -> str:
    """A one-layer Granite config with ``num_kv_heads`` KV heads, in ``parent``."""
    path = os.path.join(parent, f"model_kv{num_kv_heads}")
    os.makedirs(path)
    config = dict(
        architectures=["GraniteForCausalLM"], model_type="granite", hidden_size=4096,
        intermediate_size=14336, num_attention_heads=NUM_Q_HEADS,
        num_key_value_heads=num_kv_heads, num_hidden_layers=1, vocab_size=256,
        max_position_embeddings=8192, torch_dtype="bfloat16",
    )  # fmt: skip
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return path


def _make_runner(model_config, num_kv_heads, device, dtype, max_context_len, batch, kv_cache):
    """The parts of a ModelRunner an attention backend reads, with real SGLang pools.

    Not the attention kit's MockModelRunner: importing the kit pins attention TP to
    1 process-wide, and this test is about the TP state SGLang's bring-up sets."""
    from types import SimpleNamespace

    from torch import nn

    from sglang.srt.layers.attention.sage_attention.kv8_pool import SageKV8TokenToKVPool
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
    from sglang.srt.model_executor.graph_shared_output import GraphSharedOutput
    from sglang.srt.model_executor.model_runner import ModelRunner
    from sglang.srt.runtime_context import get_server_args
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    runner = ModelRunner.__new__(ModelRunner)
    runner.__dict__.update(
        server_args=get_server_args(),
        device=device, dtype=dtype, kv_cache_dtype=dtype, kv_cache_dtype_str="auto",
        gpu_id=torch.cuda.current_device() if device == "cuda" else 0,
        page_size=PAGE_SIZE[kv_cache], model_config=model_config, is_draft_worker=False,
        max_running_requests=batch, model=nn.Module(), spec_algorithm=SpeculativeAlgorithm.NONE,
        prefill_attention_backend_str="sage_attn", decode_attention_backend_str="sage_attn",
        draft_attention_backend=None, canary_manager=None, _kernel_warmed_up=True,
        attention_chunk_size=None, hisparse_coordinator=None, init_new_workspace=False,
        is_hybrid_swa=False, sliding_window_size=None, use_mla_backend=False,
    )  # fmt: skip
    runner.req_to_token_pool = ReqToTokenPool(
        size=batch, max_context_len=max_context_len, device=device, enable_memory_saver=False
    )
    pool_class = SageKV8TokenToKVPool if kv_cache == "int8" else MHATokenToKVPool
    runner.token_to_kv_pool = pool_class(
        size=batch * max_context_len, page_size=runner.page_size, dtype=dtype,
        head_num=num_kv_heads,
        head_dim=HEAD_DIM, layer_num=1, device=device, enable_memory_saver=False,
        enable_alt_stream=False,
    )  # fmt: skip
    runner.token_to_kv_pool_allocator = SimpleNamespace(
        page_size=runner.page_size, get_kvcache=lambda: runner.token_to_kv_pool
    )
    runner.graph_shared_output = GraphSharedOutput(device=device, max_rows=batch * max_context_len)
    runner.init_kv_index_translator()
    return runner


def _forward_batch(runner, mode, prefix_lens, input_lens, max_context_len, device):
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch

    seq_lens = [p + n for p, n in zip(prefix_lens, input_lens, strict=True)]
    locs, positions = [], []
    for req, (prefix, seq_len) in enumerate(zip(prefix_lens, seq_lens, strict=True)):
        # After the padding page; token i at offset i % page_size, as SGLang pages them.
        slots = runner.page_size + req * max_context_len + torch.arange(seq_len)
        runner.req_to_token_pool.req_to_token[req, :seq_len] = slots.to(device)
        locs += slots[prefix:].tolist()
        positions += list(range(prefix, seq_len))
    batch = ForwardBatch(
        forward_mode=mode,
        batch_size=len(seq_lens),
        input_ids=torch.zeros(len(locs), dtype=torch.int64, device=device),
        req_pool_indices=torch.arange(len(seq_lens), dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        seq_lens_cpu=torch.tensor(seq_lens, dtype=torch.int32),
        out_cache_loc=torch.tensor(locs, dtype=torch.int64, device=device),
        seq_lens_sum=sum(seq_lens),
        positions=torch.tensor(positions, dtype=torch.int64, device=device),
    )
    runner.kv_index_translator.bind_own_plan(batch)
    if mode.is_extend():
        batch.extend_prefix_lens = torch.tensor(prefix_lens, dtype=torch.int32, device=device)
        batch.extend_prefix_lens_cpu = list(prefix_lens)
        batch.extend_seq_lens = torch.tensor(input_lens, dtype=torch.int32, device=device)
        batch.extend_seq_lens_cpu = list(input_lens)
        batch.extend_num_tokens = sum(input_lens)
    return batch


def _full_qkv(steps, num_kv_heads, dtype):
    """Full-layer q, k, v per step, the same on every rank (seeded, made on the CPU)."""
    gen = torch.Generator().manual_seed(1234)
    out = []
    for _, _, input_lens in steps:
        n = sum(input_lens)
        out.append(
            tuple(
                torch.randn(n, heads, HEAD_DIM, generator=gen).to(dtype)
                for heads in (NUM_Q_HEADS, num_kv_heads, num_kv_heads)
            )
        )
    return out


def _run_layer(
    num_q_heads, num_kv_heads, q_heads, kv_heads, full_qkv, steps, device, dtype, max_ctx, kv_cache
):
    """Run the three steps through a freshly built sage_attn backend on the given heads."""
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.model_executor.forward_context import ForwardContext, forward_context
    from sglang.srt.runtime_context import get_server_args

    model_config = ModelConfig.from_server_args(get_server_args())
    batch = len(steps[0][1])
    runner = _make_runner(model_config, num_kv_heads, device, dtype, max_ctx, batch, kv_cache)
    backend = ATTENTION_BACKENDS["sage_attn"](runner)
    layer = RadixAttention(num_q_heads, HEAD_DIM, HEAD_DIM**-0.5, num_kv_heads, layer_id=0)
    outputs = []
    with torch.no_grad(), forward_context(ForwardContext(attn_backend=backend)):
        for (mode, prefix_lens, input_lens), (q, k, v) in zip(steps, full_qkv, strict=True):
            fb = _forward_batch(runner, mode, prefix_lens, input_lens, max_ctx, device)
            backend.init_forward_metadata(fb)
            args = [t[:, heads].contiguous().to(device) for t, heads in
                    ((q, q_heads), (k, kv_heads), (v, kv_heads))]  # fmt: skip
            out = layer(args[0].flatten(1), args[1].flatten(1), args[2].flatten(1), fb)
            outputs.append(out.view(out.shape[0], num_q_heads, HEAD_DIM))
    return backend, outputs


def _cpu_ranks_without_gpu_communicators(world: int) -> None:
    """SGLang's generic TP groups assume a GPU (PyNccl, custom all-reduce); its CPU
    serving path needs sgl-kernel's AMX build. The CPU variant keeps gloo only."""
    from sglang.srt.distributed import parallel_state

    last = (os.cpu_count() or 1) - 1
    os.environ["SGLANG_CPU_OMP_THREADS_BIND"] = "|".join(str(min(r, last)) for r in range(world))
    build_group = parallel_state.init_model_parallel_group

    def gloo_only_group(*args, **kwargs):
        kwargs.update(use_pynccl=False, use_custom_allreduce=False, use_mscclpp=False,
                      use_torch_symm_mem_allreduce=False)  # fmt: skip
        return build_group(*args, **kwargs)

    parallel_state.init_model_parallel_group = gloo_only_group


def _count_sage_kernel_calls() -> list:
    """Names of the sage kernels the backend launches, in order."""
    import sglang.srt.layers.attention.sage_attention.kv8_backend as kv8_backend_module
    import sglang.srt.layers.attention.sage_attention_backend as backend_module

    calls = []
    for module, name in (
        (backend_module, "sage_extend_attention"),
        (kv8_backend_module, "sage_extend_attention_kv8"),
        (kv8_backend_module, "sage_decode_kv8"),
    ):
        kernel = getattr(module, name)

        def counted(*args, _kernel=kernel, _name=name, **kwargs):
            calls.append(_name)
            return _kernel(*args, **kwargs)

        setattr(module, name, counted)
    return calls


def worker(
    rank: int,
    world: int,
    device: str,
    port: int,
    num_kv_heads: int,
    kv_cache: str,
    model_dir: str,
    out_path: str,
):
    """One scheduler-like process of a ``world``-rank attention-TP group."""
    os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
                      NVSHMEM_DISABLE_NVLS="1")  # fmt: skip
    import torch.distributed as dist

    from sglang.srt.distributed import bootstrap
    from sglang.srt.layers.attention.sage_attention import plugin
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    from sglang.srt.runtime_context import SpawnRanks, get_parallel, publish
    from sglang.srt.server_args import ServerArgs

    if device == "cuda":
        torch.cuda.set_device(rank)
    else:
        _cpu_ranks_without_gpu_communicators(world)
    plugin.register()  # what load_plugins() does in a scheduler process
    os.environ["SGLANG_SAGE_ATTN_MIN_EXTEND_LEN"] = "0"  # every extend on the sage kernel
    os.environ["SGLANG_SAGE_ATTN_KV_CACHE"] = kv_cache
    sage_calls = _count_sage_kernel_calls()
    shapes = SHAPES[device]
    server_args = ServerArgs(
        model_path=model_dir, load_format="dummy", tp_size=world, device=device,
        attention_backend="sage_attn", disable_cuda_graph=True,
    )  # fmt: skip
    publish(server_args, role="scheduler", ranks=SpawnRanks(world_rank=rank, gpu_id=rank))
    bootstrap.init_parallel_runtime(server_args=server_args, device=device, dist_port=port)
    parallel = get_parallel()

    # SGLang's QKVParallelLinear: query heads split evenly; KV heads split, or
    # replicated when there are fewer than ranks.
    q_per_rank = NUM_Q_HEADS // world
    kv_per_rank = max(1, num_kv_heads // world)
    q_heads = slice(rank * q_per_rank, (rank + 1) * q_per_rank)
    first_kv = rank * num_kv_heads // world
    kv_heads = slice(first_kv, first_kv + kv_per_rank)
    (c1, c2), (d1, d2) = shapes["chunk_1"], shapes["chunk_2"]
    steps = [
        (ForwardMode.EXTEND, (0, 0), (c1, c2)),
        (ForwardMode.EXTEND, (c1, c2), (d1, d2)),  # over the cached first chunk
        (ForwardMode.DECODE, (c1 + d1, c2 + d2), (1, 1)),
    ]
    max_ctx = (max(c1 + d1, c2 + d2) // 16 + 1) * 16  # whole pages
    full_qkv = _full_qkv(steps, num_kv_heads, shapes["dtype"])
    backend, outputs = _run_layer(q_per_rank, kv_per_rank, q_heads, kv_heads, full_qkv, steps,
                                  device, shapes["dtype"], max_ctx, kv_cache)  # fmt: skip
    report = dict(
        rank=rank, attn_tp_size=parallel.attn_tp_size, attn_tp_rank=parallel.attn_tp_rank,
        backend=type(backend).__name__, heads=[backend.num_q_heads, backend.num_kv_heads],
        sage_kernel_calls=sage_calls, kv8_pool=backend.uses_8bit_cache,
    )  # fmt: skip
    reports, gathered = [report], outputs
    if world > 1:
        reports = [None] * world
        dist.all_gather_object(reports, report)
        gathered = []
        for out in outputs:
            parts = [torch.empty_like(out) for _ in range(world)]
            dist.all_gather(parts, out.contiguous())
            gathered.append(torch.cat(parts, dim=1))
    if rank == 0:
        torch.save(dict(reports=reports, outputs=[o.cpu() for o in gathered]), out_path)
    dist.barrier()
    dist.destroy_process_group()


def run_tp(device: str, num_kv_heads: int, kv_cache: str = "auto") -> dict:
    """TP=2 on two ranks, then the same steps on one rank holding every head."""
    import torch.multiprocessing as mp

    runs = {}
    with tempfile.TemporaryDirectory(prefix="sage_tp_") as tmp:  # removed however it ends
        model_dir = _model_dir(num_kv_heads, tmp)
        for world in (TP, 1):
            out_path = os.path.join(tmp, f"outputs.tp{world}.pt")
            mp.start_processes(worker, args=(world, device, _free_port(), num_kv_heads, kv_cache,
                                             model_dir, out_path),
                               nprocs=world, join=True, start_method="spawn")  # fmt: skip
            runs[world] = torch.load(out_path)
    comparison = []
    for step, tp_out, one in zip(("extend", "extend_prefix", "decode"), runs[TP]["outputs"],
                                 runs[1]["outputs"], strict=True):  # fmt: skip
        comparison.append(dict(step=step, bitwise=bool(torch.equal(tp_out, one)),
                               max_abs_diff=(tp_out.float() - one.float()).abs().max().item(),
                               max_abs_ref=one.float().abs().max().item()))  # fmt: skip
    return dict(device=device, num_kv_heads=num_kv_heads, kv_cache=kv_cache,
                ranks=runs[TP]["reports"],
                single_gpu=runs[1]["reports"][0], steps=comparison)  # fmt: skip


def check(result: dict) -> None:
    kv = result["num_kv_heads"]
    for r in result["ranks"]:
        kv8 = result["kv_cache"] == "int8"
        backend = "SageKV8AttentionBackend" if kv8 else "SageAttentionBackend"
        assert (r["attn_tp_size"], r["backend"]) == (TP, backend), r
        assert r["heads"] == [NUM_Q_HEADS // TP, max(1, kv // TP)], r
        if result["kv_cache"] == "int8":  # every step on the 8-bit cache kernels
            assert r["kv8_pool"] and r["sage_kernel_calls"] == [
                "sage_extend_attention_kv8", "sage_extend_attention_kv8", "sage_decode_kv8"
            ], r  # fmt: skip
        else:  # both extends on the 8-bit kernel, decode on SGLang's Triton kernel
            assert r["sage_kernel_calls"] == ["sage_extend_attention"] * 2, r
    assert result["single_gpu"]["heads"] == [NUM_Q_HEADS, kv], result["single_gpu"]
    extend, extend_prefix, decode = result["steps"]
    assert extend["bitwise"] and extend_prefix["bitwise"], result["steps"]
    # bf16: one rounding step at the output's magnitude; fp16 (CPU) is finer.
    assert decode["max_abs_diff"] <= 2**-7 * max(1.0, decode["max_abs_ref"]), decode


@pytest.mark.skipif(torch.cuda.device_count() < TP or INTERPRET, reason="needs 2 GPUs")
@pytest.mark.parametrize("kv_cache", ["auto", "int8"])
@pytest.mark.parametrize("num_kv_heads", [8, 1])
def test_tp2_on_two_gpus_matches_one_gpu(num_kv_heads, kv_cache):
    check(run_tp("cuda", num_kv_heads, kv_cache))


@pytest.mark.skipif(not INTERPRET, reason="the CPU variant runs the kernels in the interpreter")
@pytest.mark.parametrize("kv_cache", ["auto", "int8"])
@pytest.mark.parametrize("num_kv_heads", [8, 1])
def test_tp2_on_cpu_ranks_matches_one_rank(num_kv_heads, kv_cache):
    check(run_tp("cpu", num_kv_heads, kv_cache))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="TP=2 run of sage_attn")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args()
    for kv in (8, 1):
        for kv_cache in ("auto", "int8"):
            result = run_tp(args.device, kv, kv_cache)
            print(json.dumps(result))
            check(result)
    print("TP=2 checks passed", file=sys.stderr)
