"""sage_attn's 8-bit paged KV cache: the format, its write path and their torch twins.

One layer's cache, in pages of ``P`` tokens (SGLang's ``--page-size``; slot ``s`` is
offset ``s % P`` of page ``s // P``, as SGLang's paged allocator hands them out, and
a request's token ``i`` sits at offset ``i % P``). Per page and KV head ``h``:

- ``k_int8 [pages, Hkv, P, D]`` int8: ``round((k' - k_mean[h]) / k_scale)`` per
  token row, where ``k'`` is the key, rotated by the Hadamard matrix when
  ``rotated`` (``rotation.py``);
- ``k_scale [pages, Hkv, P]`` fp32: ``max_d |k' - k_mean[h]| / 127``, one per key;
- ``v_int8 [pages, Hkv, Dv, P]`` int8: the page's values transposed (d-major,
  token-contiguous per channel): ``round(v / v_scale)``;
- ``v_scale [pages, Hkv, P]`` fp32: ``max_d |v| / 127``, one per value row;
- ``k_mean [Hkv, D]`` fp32: the layer's smoothing vector (in the rotated space when
  ``rotated``).

At ``P = 1`` this is a token-major cache, one 128-byte row per token; at ``P >= 16``
one (page, head) is four contiguous blocks (K ``P x D``, Vᵀ ``Dv x P``, two
``P``-vectors of scales) that a kernel reads whole. Both operands of an 8-bit
tensor-core product must be contiguous along the reduced dimension: D for Q·Kᵀ
(the K rows), the tokens for P·V, which is why a page stores V transposed.

Bytes per token and KV head: ``D + Dv + 8`` (hd128: 264 = 2.06·D; hd64: 136 =
2.13·D), against ``4·D`` for bf16, at every page size.

Why these scales. Writes arrive one token at a time (decode appends to a page), so
the scale unit is the token: a per-page scale would re-round earlier tokens whenever
a later one raised it. On SmolLM2 per-key K scales halve K's INT8 error against the
per-128-key blocks of the packed pre-pass (``benchmark/sage_attention/VALIDATION.md``),
and a Hadamard rotation cuts the Q·Kᵀ error further. V in INT8 per row rather than
e4m3: for the bell-shaped rows of a value projection, 127 uniform steps up to the
row's max err ~0.6% rms where e4m3's 3 mantissa bits err ~3.6% at every magnitude;
measured on decode over random rows, cos 0.9984 / rel-L1 0.050 with e4m3 V against
the INT8 figures in ``test_sage_attention_decode_kv8.py``.

The smoothing vector: for any m, q·(k - m) = q·k - q·m and q·m is the same for
every key of a query, so softmax is unchanged and nothing is added back; m only
decides how well K quantizes. It must be a function of the model alone (never of
user traffic, warm-up or graph-capture dummies), so the same request gets the same
bytes whatever was served before it: the serving side computes it once from a
fixed calibration prompt at start-up and passes it here frozen; zeros (no
smoothing) are valid.

Writes are one Triton kernel per batch (what ``set_kv_buffer`` does for bf16): no
host sync, fixed grid, graph-capturable, inputs only read. Kernels address the
cache only through ``load_kv8_keys`` (``load_kv8_tile`` / ``load_kv8_page``, as
``kv8_read_plan`` decides), and torch code only
through ``kv8_token_rows`` / ``set_kv8_token_rows``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from sglang.srt.layers.attention.sage_attention.layout import INT8_MAX, SCALE_EPS
from sglang.srt.layers.attention.sage_attention.rotation import (
    hadamard_matrix,
    hadamard_tile,
    rotate_rows,
)

_INT8_MAX = tl.constexpr(INT8_MAX)
_SCALE_EPS = tl.constexpr(SCALE_EPS)
# Tokens per write program: >= 16, the smallest tile the rotation's tensor-core dot takes.
WRITE_BLOCK = 32
# Page sizes the cache takes: powers of two up to 256. From MIN_WHOLE_PAGE tokens a page
# is read as contiguous blocks (load_kv8_page); below, token by token (load_kv8_tile).
MAX_PAGE_SIZE = 256
MIN_WHOLE_PAGE = 16


def kv8_bytes_per_token_head(head_dim: int, head_dim_v: int) -> int:
    """Bytes one token occupies per KV head: INT8 K, INT8 V, two fp32 scales."""
    return head_dim + head_dim_v + 2 * 4


def check_page_size(page_size: int) -> None:
    if page_size < 1 or page_size > MAX_PAGE_SIZE or page_size & (page_size - 1):
        raise ValueError(
            f"sage_attn's 8-bit KV cache takes page sizes that are powers of two up to "
            f"{MAX_PAGE_SIZE}, got {page_size}"
        )


@dataclass
class KV8Cache:
    """One layer's 8-bit KV cache (layout in the module docstring)."""

    k_int8: torch.Tensor  # [pages, Hkv, P, D] int8
    k_scale: torch.Tensor  # [pages, Hkv, P] fp32
    v_int8: torch.Tensor  # [pages, Hkv, Dv, P] int8, V transposed within a page
    v_scale: torch.Tensor  # [pages, Hkv, P] fp32
    k_mean: torch.Tensor  # [Hkv, D] fp32, frozen
    rotated: bool = False

    @property
    def num_kv_heads(self) -> int:
        return self.k_int8.shape[1]

    @property
    def page_size(self) -> int:
        return self.k_int8.shape[2]

    @property
    def head_dim(self) -> int:
        return self.k_int8.shape[3]

    @property
    def head_dim_v(self) -> int:
        return self.v_int8.shape[2]

    @property
    def num_slots(self) -> int:
        return self.k_int8.shape[0] * self.page_size

    def check_queries(self, q: torch.Tensor, o: torch.Tensor) -> None:
        """Queries ``q [N, Hq, D]`` and outputs ``o [N, Hq, Dv]`` this cache can serve."""
        if q.shape[2] != self.head_dim or o.shape[2] != self.head_dim_v:
            raise ValueError("sage_attn: q/o head dims do not match the 8-bit cache")
        if q.shape[1] % self.num_kv_heads:
            raise ValueError("sage_attn: query heads are not a multiple of the cache's KV heads")


def allocate_kv8_cache(
    num_slots: int,
    num_kv_heads: int,
    head_dim: int,
    head_dim_v: int,
    device: torch.device | str,
    k_mean: torch.Tensor | None = None,
    rotated: bool = False,
    page_size: int = 1,
) -> KV8Cache:
    """A zeroed cache of at least ``num_slots`` slots, in whole pages (zero scales
    dequantize to zero, like SGLang's zeroed pools)."""
    check_page_size(page_size)
    if k_mean is None:
        k_mean = torch.zeros((num_kv_heads, head_dim), dtype=torch.float32, device=device)
    if tuple(k_mean.shape) != (num_kv_heads, head_dim) or k_mean.dtype != torch.float32:
        raise ValueError(
            f"sage_attn: k_mean must be fp32 [{num_kv_heads}, {head_dim}], got "
            f"{k_mean.dtype} {tuple(k_mean.shape)}"
        )
    pages = triton.cdiv(num_slots, page_size)

    def zeros(*shape, dtype):
        return torch.zeros((pages, num_kv_heads, *shape), dtype=dtype, device=device)

    return KV8Cache(
        k_int8=zeros(page_size, head_dim, dtype=torch.int8),
        k_scale=zeros(page_size, dtype=torch.float32),
        v_int8=zeros(head_dim_v, page_size, dtype=torch.int8),
        v_scale=zeros(page_size, dtype=torch.float32),
        k_mean=k_mean.to(device),
        rotated=rotated,
    )


# ---- addressing (Triton) ---------------------------------------------------------------


@triton.jit
def kv8_row(slot, kv_head, num_kv_heads, PAGE_SIZE: tl.constexpr):
    """Row of (slot, KV head) in the flat views of K [rows, D] and of both scales
    (int64: a cache may hold more than 2^31 elements)."""
    slot = slot.to(tl.int64)
    page = slot // PAGE_SIZE
    return (page * num_kv_heads + kv_head) * PAGE_SIZE + slot % PAGE_SIZE


@triton.jit
def kv8_v_start(row, HEAD_DIM_V: tl.constexpr, PAGE_SIZE: tl.constexpr):
    """Offset in ``v_int8`` of channel 0 of row ``row`` (``kv8_row``); channel c sits
    ``c * PAGE_SIZE`` further on (V is transposed within its page)."""
    in_page = row % PAGE_SIZE
    return (row - in_page) * HEAD_DIM_V + in_page


@triton.jit
def kv8_vt_coords(row, HEAD_DIM_V: tl.constexpr, PAGE_SIZE: tl.constexpr):
    """(row, column) of row ``row`` (``kv8_row``)'s channel 0 in the Vᵀ view
    ``[pages * Hkv * Dv, P]`` that TMA reads (int32: ``tma_can_read`` checks the view
    fits): its (page, head)'s first channel row, and its offset in the page."""
    in_page = row % PAGE_SIZE
    return ((row - in_page) // PAGE_SIZE * HEAD_DIM_V).to(tl.int32), in_page.to(tl.int32)


@triton.jit
def kv8_v_offsets(row, channel, HEAD_DIM_V: tl.constexpr, PAGE_SIZE: tl.constexpr):
    """Element offsets in ``v_int8`` of rows ``row [N]`` (``kv8_row``), channels
    ``channel [C]``: [N, C]."""
    start = kv8_v_start(row, HEAD_DIM_V, PAGE_SIZE)
    return start[:, None] + channel.to(tl.int64)[None, :] * PAGE_SIZE


@triton.jit
def load_kv8_tile(
    k_int8,
    k_scale,
    v_int8,
    v_scale,
    slots_of_seq,
    pos,
    valid,
    kv_head,
    num_kv_heads,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
):
    """Keys and values at positions ``pos`` of a sequence whose slot ids start at
    ``slots_of_seq``, each token found through its own slot: INT8 K [N, D] and its
    scales [N], INT8 V [N, Dv] and its scales [N]; zeros where not ``valid``."""
    slot = tl.load(slots_of_seq + pos, mask=valid, other=0)
    row = kv8_row(slot, kv_head, num_kv_heads, PAGE_SIZE)
    key = tl.load(
        k_int8 + row[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :],
        mask=valid[:, None],
        other=0,
    )
    value = tl.load(
        v_int8 + kv8_v_offsets(row, tl.arange(0, HEAD_DIM_V), HEAD_DIM_V, PAGE_SIZE),
        mask=valid[:, None],
        other=0,
    )
    key_scale = tl.load(k_scale + row, mask=valid, other=0.0)
    value_scale = tl.load(v_scale + row, mask=valid, other=0.0)
    return key, key_scale, value, value_scale


def tma_can_read(cache: KV8Cache, device: torch.device) -> bool:
    """Whether ``load_kv8_page`` may go through TMA: Hopper or newer (the CPU
    interpreter emulates descriptors), and every row of the layer within a
    descriptor's int32 coordinates (past them, plain loads address it in int64)."""
    # K's view has pages * Hkv * P rows, Vᵀ's pages * Hkv * Dv.
    pages_x_heads = cache.k_int8.shape[0] * cache.num_kv_heads
    if pages_x_heads * max(cache.page_size, cache.head_dim_v) >= 2**31:
        return False
    return device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= 9


def kv8_tile_views(cache: KV8Cache, block_n: int) -> tuple:
    """The 2-D views TMA reads the pages through, each with its box of ``block_n``
    keys of one page: ((K rows ``[pages * Hkv * P, D]``, ``[block_n, D]``), (Vᵀ rows
    ``[pages * Hkv * Dv, P]``, ``[Dv, block_n]``)). ``kv8_row`` / ``kv8_vt_coords``
    give a tile's coordinates in them."""
    return (
        (cache.k_int8.view(-1, cache.head_dim), [block_n, cache.head_dim]),
        (cache.v_int8.view(-1, cache.page_size), [cache.head_dim_v, block_n]),
    )


def kv8_scale_views(cache: KV8Cache, run: int) -> tuple:
    """The 2-D views TMA reads the per-key scales through, ``run`` keys per row (K's
    and V's ``[pages * Hkv * P / run, run]``, each with its box ``[1, run]``): a run of
    one page's keys starting at ``kv8_row`` ``r`` is row ``r // run``, for page sizes
    that are multiples of ``run`` and runs that start at one."""
    return tuple((scales.view(-1, run), [1, run]) for scales in (cache.k_scale, cache.v_scale))


def kv8_page_sources(cache: KV8Cache, block_n: int, use_tma: bool) -> tuple:
    """What ``load_kv8_page`` reads K and Vᵀ through: TMA descriptors on
    ``kv8_tile_views`` with ``use_tma`` (``tma_can_read``), else the buffers."""
    if not use_tma:
        return cache.k_int8, cache.v_int8
    return tuple(
        TensorDescriptor.from_tensor(view, box) for view, box in kv8_tile_views(cache, block_n)
    )


@triton.jit
def load_kv8_page(
    k_src,
    k_scale,
    v_src,
    v_scale,
    first_slot,
    valid,
    kv_head,
    num_kv_heads,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    """``BLOCK_N`` consecutive tokens of one page (``BLOCK_N`` divides ``PAGE_SIZE``,
    the first at slot ``first_slot``, a multiple of ``BLOCK_N``), read as contiguous
    blocks through ``kv8_page_sources``: INT8 K [N, D], its scales [N], INT8 Vᵀ [Dv, N]
    (as stored) and its scales [N]. Scales are 0 where not ``valid [N]``; K and V
    there are zeros (plain loads) or the page's own bytes (TMA reads whole boxes), so
    callers mask the scores."""
    row = kv8_row(first_slot, kv_head, num_kv_heads, PAGE_SIZE)
    tokens = tl.arange(0, BLOCK_N)
    if USE_TMA:
        key = k_src.load([row.to(tl.int32), 0])
        vt_row, vt_col = kv8_vt_coords(row, HEAD_DIM_V, PAGE_SIZE)
        value_t = v_src.load([vt_row, vt_col])
    else:
        key = tl.load(
            k_src + (row + tokens)[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :],
            mask=valid[:, None],
            other=0,
        )
        value_t = tl.load(
            v_src
            + kv8_v_start(row, HEAD_DIM_V, PAGE_SIZE)
            + tl.arange(0, HEAD_DIM_V)[:, None] * PAGE_SIZE
            + tokens[None, :],
            mask=valid[None, :],
            other=0,
        )
    key_scale = tl.load(k_scale + row + tokens, mask=valid, other=0.0)
    value_scale = tl.load(v_scale + row + tokens, mask=valid, other=0.0)
    return key, key_scale, value_t, value_scale


def kv8_read_plan(
    cache: KV8Cache, device: torch.device, block_n: int, use_tma: bool
) -> tuple[bool, bool, int]:
    """How a kernel taking ``block_n`` keys per step reads this cache here: (whole
    pages, through TMA, keys per step). Whole pages from ``MIN_WHOLE_PAGE``, a step
    then being ``min(page size, block_n)`` keys of one page; TMA where ``use_tma`` and
    ``tma_can_read``."""
    whole_pages = cache.page_size >= MIN_WHOLE_PAGE
    tma = whole_pages and use_tma and tma_can_read(cache, device)
    return whole_pages, tma, min(cache.page_size, block_n) if whole_pages else block_n


@triton.jit
def load_kv8_keys(
    k_int8,
    k_scale,
    v_int8,
    v_scale,
    k_page_src,
    v_page_src,
    slots_of_seq,
    start,
    valid,
    kv_head,
    num_kv_heads,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WHOLE_PAGES: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    """Keys ``start .. start + BLOCK_N`` of a sequence whose slot ids start at
    ``slots_of_seq``, as ``kv8_read_plan`` says: INT8 K [N, D], its scales [N], INT8 V
    [N, Dv], its scales [N]; scales 0 where not ``valid [N]`` (callers mask scores).
    With WHOLE_PAGES, ``start`` is a multiple of BLOCK_N, so the tokens are one page's
    consecutive slots: SGLang's paged allocator puts a request's token i at offset
    i % page_size (its own debug check; test_sage_attention_kv8_pool.py holds it)."""
    if WHOLE_PAGES:
        key, key_scale, value_t, value_scale = load_kv8_page(
            k_page_src, k_scale, v_page_src, v_scale, tl.load(slots_of_seq + start), valid,
            kv_head, num_kv_heads, HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V,
            PAGE_SIZE=PAGE_SIZE, BLOCK_N=BLOCK_N, USE_TMA=USE_TMA,
        )  # fmt: skip
        value = tl.trans(value_t)
    else:
        key, key_scale, value, value_scale = load_kv8_tile(
            k_int8, k_scale, v_int8, v_scale, slots_of_seq, start + tl.arange(0, BLOCK_N),
            valid, kv_head, num_kv_heads, HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V,
            PAGE_SIZE=PAGE_SIZE,
        )  # fmt: skip
    return key, key_scale, value, value_scale


@triton.jit
def _kv8_write_kernel(
    k,
    v,
    loc,
    k_int8,
    k_scale,
    v_int8,
    v_scale,
    k_mean,
    num_tokens,
    stride_k_tok,
    stride_k_head,
    stride_v_tok,
    stride_v_head,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK: tl.constexpr,
    ROTATE: tl.constexpr,
):
    head = tl.program_id(1)
    num_heads = tl.num_programs(1)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = rows < num_tokens
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    rows64 = rows.to(tl.int64)
    key = tl.load(
        k + rows64[:, None] * stride_k_tok + head * stride_k_head + offs_d[None, :],
        mask=valid[:, None],
        other=0.0,
    )
    if ROTATE:
        key = rotate_rows(key, hadamard_tile(HEAD_DIM, k.dtype.element_ty))
    key = key.to(tl.float32) - tl.load(k_mean + head * HEAD_DIM + offs_d)[None, :]
    key_scale = tl.maximum(tl.max(tl.abs(key), 1), _SCALE_EPS) / _INT8_MAX
    key = key / key_scale[:, None]
    # Round half away from zero (the cast truncates), as the packed pre-pass does.
    key_q = (key + tl.where(key >= 0, 0.5, -0.5)).to(tl.int8)

    value = tl.load(
        v + rows64[:, None] * stride_v_tok + head * stride_v_head + offs_dv[None, :],
        mask=valid[:, None],
        other=0.0,
    ).to(tl.float32)
    value_scale = tl.maximum(tl.max(tl.abs(value), 1), _SCALE_EPS) / _INT8_MAX
    value = value / value_scale[:, None]
    value_q = (value + tl.where(value >= 0, 0.5, -0.5)).to(tl.int8)

    row = kv8_row(tl.load(loc + rows64, mask=valid, other=0), head, num_heads, PAGE_SIZE)
    tl.store(k_int8 + row[:, None] * HEAD_DIM + offs_d[None, :], key_q, mask=valid[:, None])
    tl.store(
        v_int8 + kv8_v_offsets(row, offs_dv, HEAD_DIM_V, PAGE_SIZE),
        value_q,
        mask=valid[:, None],
    )
    tl.store(k_scale + row, key_scale, mask=valid)
    tl.store(v_scale + row, value_scale, mask=valid)


def _check_write(cache: KV8Cache, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if k.dtype not in (torch.float16, torch.bfloat16) or v.dtype != k.dtype:
        raise ValueError(f"sage_attn: k/v must both be fp16 or bf16, got {k.dtype}, {v.dtype}")
    want_k = (loc.shape[0], cache.num_kv_heads, cache.head_dim)
    want_v = (loc.shape[0], cache.num_kv_heads, cache.head_dim_v)
    if tuple(k.shape) != want_k or tuple(v.shape) != want_v:
        raise ValueError(
            f"sage_attn: k {tuple(k.shape)} / v {tuple(v.shape)} do not match loc and the "
            f"cache: expected {want_k} / {want_v}"
        )
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("sage_attn: k and v need a contiguous last dimension")
    if loc.dim() != 1 or loc.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"sage_attn: loc must be 1-D int32/int64, got {loc.dtype}")
    for t in (cache.k_int8, cache.k_scale, cache.v_int8, cache.v_scale):
        if not t.is_contiguous():
            raise ValueError("sage_attn: the 8-bit cache buffers must be contiguous")


def write_kv8(cache: KV8Cache, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Quantize new keys/values ``k [N, Hkv, D]``, ``v [N, Hkv, Dv]`` into slots ``loc [N]``."""
    _check_write(cache, loc, k, v)
    num_tokens = loc.shape[0]
    if num_tokens == 0:
        return
    grid = (triton.cdiv(num_tokens, WRITE_BLOCK), cache.num_kv_heads)
    _kv8_write_kernel[grid](
        k,
        v,
        loc,
        cache.k_int8,
        cache.k_scale,
        cache.v_int8,
        cache.v_scale,
        cache.k_mean,
        num_tokens,
        stride_k_tok=k.stride(0),
        stride_k_head=k.stride(1),
        stride_v_tok=v.stride(0),
        stride_v_head=v.stride(1),
        HEAD_DIM=cache.head_dim,
        HEAD_DIM_V=cache.head_dim_v,
        PAGE_SIZE=cache.page_size,
        BLOCK=WRITE_BLOCK,
        ROTATE=cache.rotated,
    )


# ---- torch twins ---------------------------------------------------------------------


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    return torch.trunc(x + torch.where(x >= 0, 0.5, -0.5))


def kv8_token_rows(cache: KV8Cache, slots: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The stored bytes of ``slots [N]``, token-major whatever the page size: INT8 K
    [N, Hkv, D], K scales [N, Hkv], INT8 V [N, Hkv, Dv], V scales [N, Hkv]."""
    page, in_page = _page_and_offset(cache, slots)
    return (
        cache.k_int8[page, :, in_page],
        cache.k_scale[page, :, in_page],
        cache.v_int8[page, :, :, in_page],
        cache.v_scale[page, :, in_page],
    )


def set_kv8_token_rows(
    cache: KV8Cache, slots: torch.Tensor, rows: tuple[torch.Tensor, ...]
) -> None:
    """Store ``rows`` (as ``kv8_token_rows`` returns them) at ``slots``."""
    page, in_page = _page_and_offset(cache, slots)
    k_int8, k_scale, v_int8, v_scale = rows
    cache.k_int8[page, :, in_page] = k_int8.to(cache.k_int8.device)
    cache.k_scale[page, :, in_page] = k_scale.to(cache.k_scale.device)
    cache.v_int8[page, :, :, in_page] = v_int8.to(cache.v_int8.device)
    cache.v_scale[page, :, in_page] = v_scale.to(cache.v_scale.device)


def _page_and_offset(cache: KV8Cache, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    slots = slots.long().to(cache.k_int8.device)
    return slots // cache.page_size, slots % cache.page_size


def write_kv8_ref(cache: KV8Cache, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Twin of ``write_kv8``: the same bytes, in torch."""
    _check_write(cache, loc, k, v)
    key = k.float()
    if cache.rotated:
        key = key @ hadamard_matrix(cache.head_dim, device=k.device)
    key = key - cache.k_mean
    key_scale = key.abs().amax(-1).clamp_min(SCALE_EPS) / INT8_MAX
    key = key / key_scale[..., None]
    value = v.float()
    value_scale = value.abs().amax(-1).clamp_min(SCALE_EPS) / INT8_MAX
    rows = (
        _round_half_away(key).to(torch.int8),
        key_scale,
        _round_half_away(value / value_scale[..., None]).to(torch.int8),
        value_scale,
    )
    set_kv8_token_rows(cache, loc, rows)


def dequantize_kv8(cache: KV8Cache, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, V) of ``slots`` in fp32 [N, Hkv, D(v)] as the kernels see them: K in the
    cache's own space (rotated and mean-subtracted when so stored), V scaled back."""
    k_int8, k_scale, v_int8, v_scale = kv8_token_rows(cache, slots)
    return k_int8.float() * k_scale[..., None], v_int8.float() * v_scale[..., None]


def reconstruct_keys(cache: KV8Cache, slots: torch.Tensor) -> torch.Tensor:
    """The original keys of ``slots`` (fp32): mean added back, rotation undone."""
    k, _ = dequantize_kv8(cache, slots)
    k = k + cache.k_mean
    if cache.rotated:  # H H = D I
        k = k @ hadamard_matrix(cache.head_dim, device=k.device) / cache.head_dim
    return k
