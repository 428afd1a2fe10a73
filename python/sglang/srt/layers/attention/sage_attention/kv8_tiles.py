"""Tile math of the attention kernels over sage_attn's 8-bit KV cache (``kv8_cache.py``).

Shared by ``decode_kv8.py`` and ``extend_kv8.py``: scores of INT8 query rows against
an INT8 key tile with per-key scales, the online-softmax step with FP16 P·V on an
INT8 value tile with per-row scales, and the INT8 -> fp16 conversion that P·V needs.
The cache's layout and how a tile is gathered stay in ``kv8_cache.py``.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Query heads per KV head that one program's rows hold, in both kernels (a GQA group
# is padded to a power of two of MMA rows); a model past it is refused at start-up.
MAX_GROUP = 128


def fast_int8_cvt() -> bool:
    """Whether kernels may convert INT8 with PTX (``int8_to_fp16``): not under the
    CPU interpreter, which runs no inline assembly."""
    return os.environ.get("TRITON_INTERPRET", "0") != "1"


@triton.jit
def int8_to_fp16(x, FAST: tl.constexpr, IN_ROWS: tl.constexpr = False):
    """INT8 -> fp16, exact. FAST (PTX): four values per xor + two byte permutes + two
    packed subtracts -- the fp16 bit pattern of 1024 + (x + 128), minus 1152 -- where
    a plain cast costs a quarter-rate cvt per value (FasterTransformer's conversion;
    +9% in the extend kernel on the H200).

    IN_ROWS (with FAST): convert ``x`` in the layout it was loaded in, so a P·V
    operand is transposed as fp16 (``ldmatrix.trans``). Triton otherwise moves the
    layout change above the conversion, to the INT8 tile, and for the value tile of
    P·V (keys must pair up, the cache stores a key's row) that is a byte-wise gather
    from shared memory. Marking the asm impure is what keeps Triton from moving it."""
    if FAST:
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 biased, bias;
            xor.b32 biased, $2, 0x80808080;
            prmt.b32 $0, biased, 0x64646464, 0x4140;
            prmt.b32 $1, biased, 0x64646464, 0x4342;
            mov.b32 bias, 0x64806480;
            sub.f16x2 $0, $0, bias;
            sub.f16x2 $1, $1, bias;
            }""",
            constraints="=r,=r,r",
            args=[x],
            dtype=tl.float16,
            is_pure=not IN_ROWS,
            pack=4,
        )
    return x.to(tl.float16)


@triton.jit
def kv8_scores(q_int8, q_scale, key, key_scale):
    """Scores of INT8 query rows (one scale per row, exp2 units folded in) against an
    INT8 key tile (one scale per key): an INT8 tensor-core product, then two scales."""
    return tl.dot(q_int8, tl.trans(key)).to(tl.float32) * q_scale[:, None] * key_scale[None, :]


@triton.jit
def kv8_pv(
    p,
    value,
    value_scale,
    FAST_CVT: tl.constexpr,
    CVT_IN_ROWS: tl.constexpr = False,
    PV_INT8: tl.constexpr = False,
):
    """``p [M, N]`` (softmax numerators in [0, 1]) times an INT8 value tile with one
    scale per row (key). V's row scales are folded into P relative to the tile's
    largest (so P stays in [0, 1] whatever V's magnitude), which then multiplies the
    tile's product.

    FP16 (default): P in fp16 times the exact INT8 V converted to fp16.
    PV_INT8: P quantized to INT8 against each query row's own largest value in this
    tile (a row's scale factors out of its sum over keys), times the stored INT8 V
    as is: an INT8 tensor-core product, no conversion of V. A row-and-tile scale keeps
    P's small entries that one [0, 1] scale would round to zero (RESULTS.md, round 9:
    worst-head cos 0.99986 against FP16's 0.99993, where a fixed 1/127 step gets
    0.9990 and FP8 P 0.9992)."""
    tile_scale = tl.maximum(tl.max(value_scale, 0), 1.0e-30)
    p_v = p * (value_scale / tile_scale)[None, :]
    if PV_INT8:
        row_max = tl.maximum(tl.max(p_v, 1), 1.0e-30)
        # A row's largest P maps to 127; p_v >= 0, so adding 0.5 before the truncating
        # cast rounds to nearest.
        p_int8 = (p_v * (127.0 / row_max)[:, None] + 0.5).to(tl.int8)
        product = tl.dot(p_int8, value).to(tl.float32)
        return product * (row_max * (tile_scale / 127.0))[:, None]
    return tl.dot(p_v.to(tl.float16), int8_to_fp16(value, FAST_CVT, CVT_IN_ROWS)) * tile_scale


@triton.jit
def kv8_softmax_step(
    acc,
    l_i,
    m_i,
    s,
    value,
    value_scale,
    FAST_CVT: tl.constexpr,
    CVT_IN_ROWS: tl.constexpr = False,
    PV_INT8: tl.constexpr = False,
):
    """One exp2 online-softmax step over a tile of scores ``s [M, N]`` (masked entries
    -inf) and its INT8 values: (acc, row sum, row max) updated. Both kv8 kernels'
    inner loops end in it. The row sum is of the unquantized P."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + kv8_pv(p, value, value_scale, FAST_CVT, CVT_IN_ROWS, PV_INT8)
    return acc, l_i, m_new
