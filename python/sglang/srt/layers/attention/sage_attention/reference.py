"""Pure-torch twins of ``sage_extend_attention`` (same signature, same semantics).

- ``sage_extend_attention_ref``: the exact op in fp32 (torch SDPA with a
  bottom-right causal mask). What the kernel's accuracy is measured against.
- ``sage_extend_attention_quant_ref``: replays the kernel's arithmetic step by
  step -- smoothing, INT8 Q (per row) and K (per ``KV_BLOCK`` keys), exact integer
  Q·Kᵀ, the tiled online softmax in exp2, FP16, FP8 or INT8 P and V with their scales.
  Kernel vs this twin should agree to rounding; a larger gap is a kernel bug,
  not quantization error.
- ``quantize_kv_ref``: the pre-pass, writing the same packed layout.

Both loop over requests on the host: they are references, not fast paths.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sglang.srt.layers.attention.sage_attention.extend_attention import tile_config
from sglang.srt.layers.attention.sage_attention.layout import (
    FP8_E4M3_MAX,
    FP16_V_LIMIT,
    INT8_MAX,
    KV_BLOCK,
    PV,
    SCALE_EPS,
    PackedKV,
    packed_len,
    segment_starts,
)
from sglang.srt.layers.attention.sage_attention.rotation import hadamard_matrix

_M_INIT = -1.0e30


def _requests(q_extend, k_extend, v_extend, k_buffer, v_buffer, qo_indptr, kv_indptr, kv_indices):
    """Yield (query rows, q [Hq, E, D], k [Hkv, L, D], v [Hkv, L, Dv], prefix_len) in fp32."""
    qo = qo_indptr.tolist()
    kv = kv_indptr.tolist()
    for b in range(len(qo) - 1):
        rows = slice(qo[b], qo[b + 1])
        slots = kv_indices[kv[b] : kv[b + 1]].long()
        k = torch.cat([k_buffer[slots], k_extend[rows]]).float().transpose(0, 1)
        v = torch.cat([v_buffer[slots], v_extend[rows]]).float().transpose(0, 1)
        yield rows, q_extend[rows].float().transpose(0, 1), k, v, kv[b + 1] - kv[b]


def visible_keys(
    num_queries: int, kv_len: int, prefix_len: int, causal: bool, device
) -> torch.Tensor:
    """[E, L] bool: bottom-right causal (query i sees keys <= prefix_len + i)."""
    keys = torch.arange(kv_len, device=device)[None, :]
    if not causal:
        return keys < kv_len
    return keys <= prefix_len + torch.arange(num_queries, device=device)[:, None]


def sage_extend_attention_ref(
    q_extend,
    k_extend,
    v_extend,
    o_extend,
    k_buffer,
    v_buffer,
    qo_indptr,
    kv_indptr,
    kv_indices,
    max_len_extend,
    sm_scale: float | None = None,
    causal: bool = True,
    pv: str = "fp16",
    rotate_qk: bool = False,
) -> None:
    """Exact attention in fp32 (``pv``, ``rotate_qk``: signature parity, ignored)."""
    del max_len_extend, pv, rotate_qk
    sm_scale = q_extend.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    group = q_extend.shape[1] // k_extend.shape[1]
    for rows, q, k, v, prefix_len in _requests(
        q_extend, k_extend, v_extend, k_buffer, v_buffer, qo_indptr, kv_indptr, kv_indices
    ):
        if q.shape[1] == 0:
            continue
        mask = visible_keys(q.shape[1], k.shape[1], prefix_len, causal, q.device)
        out = F.scaled_dot_product_attention(
            q,
            k.repeat_interleave(group, 0),
            v.repeat_interleave(group, 0),
            attn_mask=mask,
            scale=sm_scale,
        )
        o_extend[rows] = out.transpose(0, 1).to(o_extend.dtype)


def quantize_int8_blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [H, L, D] -> (integer-valued fp64 [H, L, D], scale [H, L, 1]) per block of rows."""
    heads, length, dim = x.shape
    padded = F.pad(x, (0, 0, 0, -length % block)).view(heads, -1, block, dim)
    scale = padded.abs().amax(dim=(2, 3), keepdim=True).clamp_min(SCALE_EPS) / INT8_MAX
    q = _round_half_away(padded / scale)
    q = q.reshape(heads, -1, dim)[:, :length].double()
    return q, scale.expand(-1, -1, block, 1).reshape(heads, -1, 1)[:, :length]


def _smoothed_int8_keys(k: torch.Tensor, smooth_k: bool = True, rotate: bool = False):
    """One request's keys [Hkv, L, D] -> INT8 values and per-key scales, as the pre-pass."""
    if rotate:
        k = k @ hadamard_matrix(k.shape[-1], device=k.device)
    if smooth_k:
        # One mean per (request, KV head), summed as k / L like the pre-pass.
        k = k - (k / max(k.shape[1], 1)).sum(dim=1, keepdim=True)
    return quantize_int8_blocks(k, KV_BLOCK)


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest integer, halves away from zero (the kernels' +-0.5 then truncate)."""
    return torch.trunc(x + torch.where(x >= 0, 0.5, -0.5))


def lowp_values(v: torch.Tensor, pv: PV):
    """One request's values [Hkv, L, Dv] -> (fp16, e4m3 or int8 values, scale [Hkv, 1, Dv])."""
    amax = v.abs().amax(dim=1, keepdim=True).clamp_min(SCALE_EPS)
    if pv is PV.FP8:
        scale = amax / FP8_E4M3_MAX
    elif pv is PV.INT8:
        scale = amax / INT8_MAX
        return _round_half_away(v / scale).to(torch.int8), scale
    else:  # a power of two, 1 unless the channel would overflow fp16
        scale = torch.exp2(torch.ceil(torch.log2(amax / FP16_V_LIMIT)).clamp_min(0.0))
    return (v / scale).to(pv.v_dtype), scale


def quantize_kv_ref(
    k_extend,
    v_extend,
    k_buffer,
    v_buffer,
    qo_indptr,
    kv_indptr,
    kv_indices,
    pv: PV,
    smooth_k: bool = True,
    rotate: bool = False,
) -> PackedKV:
    """Twin of ``quantize_kv``: the same packed layout; rows no request owns stay 0."""
    batch_size = qo_indptr.shape[0] - 1
    num_kv_heads, head_dim, head_dim_v = k_extend.shape[1], k_extend.shape[2], v_extend.shape[2]
    t_pad = packed_len(kv_indices.shape[0], k_extend.shape[0], batch_size)
    device = k_extend.device
    k_int8 = torch.zeros((num_kv_heads, t_pad, head_dim), dtype=torch.int8, device=device)
    k_scale = torch.zeros((num_kv_heads, t_pad // KV_BLOCK), device=device)
    v_packed = torch.zeros((num_kv_heads, t_pad, head_dim_v), dtype=pv.v_dtype, device=device)
    v_scale = torch.zeros((batch_size, num_kv_heads, head_dim_v), device=device)
    starts = segment_starts(qo_indptr, kv_indptr)
    for b, (_, _, k, v, _) in enumerate(
        _requests(
            k_extend, k_extend, v_extend, k_buffer, v_buffer, qo_indptr, kv_indptr, kv_indices
        )
    ):
        rows = slice(starts[b], starts[b] + k.shape[1])
        k_int, k_row_scale = _smoothed_int8_keys(k, smooth_k, rotate)
        k_int8[:, rows] = k_int.to(torch.int8)
        block_scales = k_row_scale[:, ::KV_BLOCK, 0]  # one per block of keys
        first_block = starts[b] // KV_BLOCK
        k_scale[:, first_block : first_block + block_scales.shape[1]] = block_scales
        v_lowp, v_chan_scale = lowp_values(v, pv)
        v_packed[:, rows] = v_lowp
        v_scale[b] = v_chan_scale[:, 0]
    if pv.v_token_major:  # token-contiguous, as the kernel's pre-pass writes it
        v_packed = v_packed.transpose(1, 2).contiguous()
    return PackedKV(
        pv=pv, k_int8=k_int8, k_scale=k_scale, v=v_packed, v_scale=v_scale, rotated=rotate
    )


def sage_extend_attention_quant_ref(
    q_extend,
    k_extend,
    v_extend,
    o_extend,
    k_buffer,
    v_buffer,
    qo_indptr,
    kv_indptr,
    kv_indices,
    max_len_extend,
    sm_scale: float | None = None,
    causal: bool = True,
    pv: str = "fp16",
    rotate_qk: bool = False,
) -> None:
    """The kernel's quantized arithmetic, replayed in torch with the kernel's tile shape."""
    del max_len_extend
    pv = PV(pv)
    head_dim = q_extend.shape[-1]
    sm_scale = head_dim**-0.5 if sm_scale is None else sm_scale
    config = tile_config(head_dim, causal, pv, q_extend.device)
    group = q_extend.shape[1] // k_extend.shape[1]
    for rows, q, k, v, prefix_len in _requests(
        q_extend, k_extend, v_extend, k_buffer, v_buffer, qo_indptr, kv_indptr, kv_indices
    ):
        num_queries, kv_len = q.shape[1], k.shape[1]
        if num_queries == 0:
            continue
        k_int, k_scale = _smoothed_int8_keys(k, rotate=rotate_qk)
        qk_scale = sm_scale * math.log2(math.e)
        if rotate_qk:  # (q H)·(k H) = D q·k
            q, qk_scale = q @ hadamard_matrix(head_dim, device=q.device), qk_scale / head_dim
        q_int, q_scale = quantize_int8_blocks(q * qk_scale, 1)
        k_int = k_int.repeat_interleave(group, 0)
        k_scale = k_scale.repeat_interleave(group, 0)
        v_lowp, v_chan_scale = lowp_values(v, pv)
        v_lowp = v_lowp.float().repeat_interleave(group, 0)

        # [Hq, E, L] exact integer dot; each score is dequantized inside the softmax
        # by its row's Q scale times its tile's K scale, in the kernel's order.
        s = (q_int @ k_int.transpose(1, 2)).float()
        s = s.masked_fill(
            ~visible_keys(num_queries, kv_len, prefix_len, causal, q.device), float("-inf")
        )
        # P is produced pre-scaled to e4m3's range for FP8 (the factor cancels in 1/l).
        p_offset = math.log2(FP8_E4M3_MAX) if pv is PV.FP8 else 0.0
        v_is_int = pv is PV.INT8
        m = torch.full((q.shape[0], num_queries, 1), _M_INIT, device=q.device)
        l = torch.zeros_like(m)
        acc = torch.zeros((q.shape[0], num_queries, v.shape[2]), device=q.device)
        for start in range(0, kv_len, config.block_n):
            tile = slice(start, start + config.block_n)
            row_scale = q_scale * k_scale[:, start : start + 1, :].transpose(1, 2)
            m_tile = s[:, :, tile].amax(dim=2, keepdim=True) * row_scale
            m_new = torch.maximum(m, m_tile)
            alpha = torch.exp2(m - m_new)
            if v_is_int:
                # P scaled to 127 by its row's max in this tile, rounded half to even
                # (the kernel's fp32 add of 1.5*2^23); beta takes the tile from its own
                # max to the running one; the row sums use the unrounded P.
                m_ref = m_tile.clamp_min(_M_INIT)
                p = torch.exp2(s[:, :, tile] * row_scale - (m_ref - math.log2(INT8_MAX)))
                beta = torch.exp2(m_ref - m_new) / INT8_MAX
                l = l * alpha + p.sum(dim=2, keepdim=True) * beta
                pv_int = torch.round(p).double() @ v_lowp[:, tile].double()
                acc = acc * alpha + pv_int.float() * beta
            else:
                p = torch.exp2(s[:, :, tile] * row_scale - (m_new - p_offset))
                l = l * alpha + p.sum(dim=2, keepdim=True)
                p_lowp = p.to(pv.v_dtype).float()
                acc = acc * alpha + p_lowp @ v_lowp[:, tile]
            m = m_new
        out = acc / l * v_chan_scale.repeat_interleave(group, 0)
        o_extend[rows] = out.transpose(0, 1).to(o_extend.dtype)


def attention_error(
    out: torch.Tensor, ref: torch.Tensor, request_rows: torch.Tensor | None = None
) -> tuple[float, float]:
    """(cosine similarity, relative L1) of ``out`` against ``ref`` ``[rows, heads, dim]``,
    in fp64. The cosine is the worst over heads and, given ``request_rows`` (request
    boundaries along the rows: an extend batch's ``cu_seqlens``, ``arange(B + 1)`` for
    decode), over requests too, so that one bad head or request in a large batch cannot
    hide behind the rest. The relative L1 is over the whole tensor."""
    out, ref = out.double(), ref.double()
    if out.dim() < 3:  # one row [heads, dim], or a bare vector
        out, ref = out.reshape(1, -1, out.shape[-1]), ref.reshape(1, -1, ref.shape[-1])
    bounds = [0, out.shape[0]] if request_rows is None else request_rows.tolist()
    cos = min(
        F.cosine_similarity(
            out[lo:hi].transpose(0, 1).flatten(1), ref[lo:hi].transpose(0, 1).flatten(1), dim=1
        )
        .min()
        .item()
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
        if hi > lo
    )
    rel_l1 = ((out - ref).abs().sum() / ref.abs().sum().clamp_min(1e-30)).item()
    return cos, rel_l1
