"""Batches for the sage_attn kernel tests: ragged requests over a scrambled paged cache.

One ``ExtendCase`` describes a batch; ``make_extend_inputs`` builds the tensors
``sage_extend_attention`` takes, with every cache slot no request owns set to
NaN, so a kernel that reads outside the prefix it was given cannot pass.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_GPU = torch.cuda.is_available() and not INTERPRET
# Where the small cases run: the GPU if there is one, else the CPU interpreter.
DEVICE = "cuda" if HAS_GPU else "cpu"
CAN_RUN_KERNELS = HAS_GPU or INTERPRET
requires_kernels = dict(
    condition=not CAN_RUN_KERNELS,
    reason="needs a GPU or TRITON_INTERPRET=1 (CPU interpreter)",
)


@dataclass(frozen=True)
class ExtendCase:
    name: str
    prefix_lens: tuple[int, ...]
    extend_lens: tuple[int, ...]
    num_q_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 64
    head_dim_v: int | None = None
    page_size: int = 1
    # "randn"; "k_bias": per-channel K offset of 10 sigma and a few 8x Q channels;
    # "sink": every query leans towards its request's first, large key;
    # "big_v": three V channels near 5e5 (past fp16's range: use bf16);
    # "big_qk": Q x 3 and a per-channel K offset of 2e4..6e4 (q·k ~1e6 before smoothing);
    # "qk_channels": four channels 20x larger in both Q and K (the massive channels of
    # real LLMs' queries and keys; smoothing cannot remove them, rotation spreads them).
    values: str = "randn"


def _scrambled_slots(prefix_lens, page_size, generator):
    """Slot ids per request: whole pages, handed out in a random order across requests."""
    pages_per_req = [-(-n // page_size) for n in prefix_lens]
    # Page 0 stays unused, as in SGLang's pools.
    page_ids = torch.randperm(sum(pages_per_req), generator=generator) + 1
    slots, next_page = [], 0
    for n, pages in zip(prefix_lens, pages_per_req, strict=True):
        mine = page_ids[next_page : next_page + pages]
        next_page += pages
        offsets = torch.arange(pages * page_size) % page_size
        slots.append((mine.repeat_interleave(page_size) * page_size + offsets)[:n])
    num_slots = (sum(pages_per_req) + 2) * page_size
    return slots, num_slots


def make_extend_inputs(case: ExtendCase, dtype=torch.float16, device=DEVICE, seed=0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    head_dim_v = case.head_dim_v or case.head_dim
    hq, hkv, d = case.num_q_heads, case.num_kv_heads, case.head_dim
    num_tokens = sum(case.extend_lens)
    slots, num_slots = _scrambled_slots(case.prefix_lens, case.page_size, gen)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    q = randn(num_tokens, hq, d)
    k_extend, v_extend = randn(num_tokens, hkv, d), randn(num_tokens, hkv, head_dim_v)
    k_buffer = torch.full((num_slots, hkv, d), float("nan"))
    v_buffer = torch.full((num_slots, hkv, head_dim_v), float("nan"))
    for ids in slots:
        k_buffer[ids] = randn(len(ids), hkv, d)
        v_buffer[ids] = randn(len(ids), hkv, head_dim_v)

    if case.values == "k_bias":
        bias = 10.0 * randn(hkv, d)
        k_extend += bias
        for ids in slots:
            k_buffer[ids] += bias
        q[:, :, torch.randperm(d, generator=gen)[:4]] *= 8.0
    elif case.values == "sink":
        # Each request's first key is 4x the norm of the others and every query
        # leans towards it (logit ~6 against ~N(0, 1)): it draws most of the
        # attention mass and coarsens the INT8 scale of its K block.
        unit = randn(hkv, d)
        unit = unit / unit.norm(dim=-1, keepdim=True)
        q += 1.5 * unit.repeat_interleave(hq // hkv, 0)
        sink_key = 4.0 * d**0.5 * unit
        start = 0
        for b, ids in enumerate(slots):
            if len(ids):
                k_buffer[ids[0]] = sink_key
            elif case.extend_lens[b]:
                k_extend[start] = sink_key
            start += case.extend_lens[b]
    elif case.values == "big_v":
        v_extend[..., :3] *= 5e5
        for ids in slots:
            v_buffer[ids, :, :3] *= 5e5
    elif case.values == "big_qk":
        bias = 2e4 * (1 + randn(hkv, d).abs()).clamp_max(3)
        k_extend += bias
        for ids in slots:
            k_buffer[ids] += bias
        q *= 3.0
    elif case.values == "qk_channels":
        channels = torch.randperm(d, generator=gen)[:4]
        q[:, :, channels] *= 20.0
        k_extend[:, :, channels] *= 20.0
        for ids in slots:
            k_buffer[ids[:, None], :, channels] *= 20.0
    elif case.values != "randn":
        raise ValueError(f"unknown values {case.values!r}")

    def cumsum(lens):
        return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)

    def to(t):
        return t.to(device=device, dtype=dtype)

    return dict(
        q_extend=to(q),
        k_extend=to(k_extend),
        v_extend=to(v_extend),
        o_extend=torch.full((num_tokens, hq, head_dim_v), float("nan"), dtype=dtype, device=device),
        k_buffer=to(k_buffer),
        v_buffer=to(v_buffer),
        qo_indptr=cumsum(case.extend_lens).to(device),
        kv_indptr=cumsum(case.prefix_lens).to(device),
        kv_indices=torch.cat([torch.zeros(0, dtype=torch.int64), *slots]).to(device),
        max_len_extend=max(case.extend_lens),
    )


def run_op(op, inputs: dict, **kwargs) -> torch.Tensor:
    """Run an op with ``sage_extend_attention``'s signature on a fresh output buffer."""
    args = dict(inputs, o_extend=inputs["o_extend"].clone())
    op(**args, **kwargs)
    return args["o_extend"]


def make_kv8_inputs(case: ExtendCase, rotated: bool = False, smooth: bool = True) -> dict:
    """The case's batch over sage_attn's 8-bit KV cache in pages of ``case.page_size``:
    each request's whole sequence (prefix, then chunk, as SGLang writes a chunk before
    attention) in its own pages, handed out in a random order, token i at offset
    i % page_size as SGLang's paged allocator places it; all quantized by ``write_kv8``.
    ``kv_indptr``/``kv_indices`` list each request's whole sequence. Slots no request
    owns (the rest of a last page included) hold NaN scales, so a kernel that reads
    outside its request cannot pass. ``exact``: the fp32 op on the original K/V.
    ``smooth``: the keys' mean as the smoothing vector (a calibration mean), else 0."""
    from sglang.srt.layers.attention.sage_attention.kv8_cache import allocate_kv8_cache, write_kv8
    from sglang.srt.layers.attention.sage_attention.reference import sage_extend_attention_ref
    from sglang.srt.layers.attention.sage_attention.rotation import hadamard_matrix

    inputs = make_extend_inputs(case)
    device = inputs["q_extend"].device
    hkv, d = case.num_kv_heads, case.head_dim
    owned = inputs["kv_indices"]
    seq_lens = [p + e for p, e in zip(case.prefix_lens, case.extend_lens, strict=True)]
    seq_slots, num_slots = _scrambled_slots(
        seq_lens, case.page_size, torch.Generator().manual_seed(1)
    )
    seq_slots = [ids.to(device) for ids in seq_slots]
    prefix_slots = torch.cat([torch.zeros(0, dtype=torch.int64, device=device)] + [
        ids[:p] for ids, p in zip(seq_slots, case.prefix_lens, strict=True)
    ])  # fmt: skip
    chunk_slots = torch.cat([torch.zeros(0, dtype=torch.int64, device=device)] + [
        ids[p:] for ids, p in zip(seq_slots, case.prefix_lens, strict=True)
    ])  # fmt: skip
    keys = torch.cat([inputs["k_buffer"][owned], inputs["k_extend"]])
    mean = keys.float().mean(0) if smooth else torch.zeros(hkv, d, device=device)
    if rotated:
        mean = mean @ hadamard_matrix(d, device=device)
    cache = allocate_kv8_cache(
        num_slots, hkv, d, case.head_dim_v or d, device, k_mean=mean, rotated=rotated,
        page_size=case.page_size,
    )  # fmt: skip
    cache.k_scale.fill_(float("nan"))
    cache.v_scale.fill_(float("nan"))
    write_kv8(cache, prefix_slots, inputs["k_buffer"][owned], inputs["v_buffer"][owned])
    write_kv8(cache, chunk_slots, inputs["k_extend"], inputs["v_extend"])
    kv_indices = torch.cat([torch.zeros(0, dtype=torch.int64, device=device), *seq_slots])
    exact = inputs["o_extend"].clone()
    sage_extend_attention_ref(**dict(inputs, o_extend=exact), causal=True)
    return dict(
        q_extend=inputs["q_extend"],
        o_extend=inputs["o_extend"],
        cache=cache,
        qo_indptr=inputs["qo_indptr"],
        kv_indptr=inputs["kv_indptr"] + inputs["qo_indptr"],
        kv_indices=kv_indices,
        max_len_extend=inputs["max_len_extend"],
        exact=exact,
    )


def huge_kv8_cache(length=300, page_size=1):
    """A 1-KV-head hd64 cache whose int8 buffers pass 2^31 elements, and ``length`` keys
    written to its last slots (int64 addressing or bust). GPU only (~4.5 GB)."""
    from sglang.srt.layers.attention.sage_attention.kv8_cache import allocate_kv8_cache, write_kv8

    num_slots = 2**31 // 64 + 4096
    cache = allocate_kv8_cache(num_slots, 1, 64, 64, "cuda", page_size=page_size)
    first = (num_slots - length) // page_size * page_size  # token i at offset i % page_size
    slots = torch.arange(first, first + length, device="cuda")
    k = torch.randn(length, 1, 64, dtype=torch.float16, device="cuda")
    write_kv8(cache, slots, k, torch.randn_like(k))
    return cache, slots, torch.tensor([0, length], dtype=torch.int32, device="cuda")
