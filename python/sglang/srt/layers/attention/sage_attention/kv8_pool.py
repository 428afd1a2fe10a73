"""sage_attn's 8-bit KV cache as an SGLang token-to-KV pool (``SGLANG_SAGE_ATTN_KV_CACHE=int8``).

A subclass of SGLang's ``MHATokenToKVPool`` (as ``MHATokenToKVPoolMXFP8`` is) whose
per-layer buffers are the format of ``kv8_cache.py``, defined there once, in pages
of the server's ``--page-size``: INT8 K (smoothed by a frozen per-(layer, head)
vector, Hadamard-rotated when the settings rotate this head dim), INT8 V stored
transposed within its page, one fp32 scale per token and head for each. SGLang's
allocator, radix cache and scheduler only handle slot ids, so they work unchanged;
what reads the bytes is sage_attn's backend alone (``kv8_cache(layer_id)``), and
the plugin's hooks (``kv8_hooks.py``) refuse every server option that would hand
this pool to another reader.

Bytes per token: layers x KV heads x (D + Dv + 8), e.g. 264 per head at hd128
against bf16's 512 (1.94x the tokens in the same memory); SGLang's memory planner
is told the same figure (``kv8_cell_bytes``), so ``max_total_num_tokens`` grows by it.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

import torch

from sglang.srt.constants import GPU_MEMORY_TYPE_KV_CACHE
from sglang.srt.layers.attention.sage_attention.kv8_cache import (
    MIN_WHOLE_PAGE,
    KV8Cache,
    allocate_kv8_cache,
    check_page_size,
    kv8_bytes_per_token_head,
    kv8_token_rows,
    set_kv8_token_rows,
    write_kv8,
)
from sglang.srt.layers.attention.sage_attention.settings import SageAttnSettings
from sglang.srt.mem_cache.memory_pool import (
    MHATokenToKVPool,
    get_tensor_size_bytes,
    unwrap_write_loc,
)

logger = logging.getLogger(__name__)

# What the start-up log suggests when a server runs the cache at page size 1.
RECOMMENDED_PAGE_SIZE = 64

KV8_FORMAT = "INT8 K (smoothed, per-token scale) + INT8 V (per-token scale, transposed per page)"


def kv8_cell_bytes(num_layers: int, num_kv_heads: int, head_dim: int, head_dim_v: int) -> int:
    """Bytes one token takes in this pool across ``num_layers`` layers (the planner's
    ``cell_size``)."""
    return num_layers * num_kv_heads * kv8_bytes_per_token_head(head_dim, head_dim_v)


class SageKV8TokenToKVPool(MHATokenToKVPool):
    """Token-to-KV pool in sage_attn's 8-bit format (module docstring)."""

    def __init__(self, *args, dtype: torch.dtype, post_capture_active: bool = False, **kwargs):
        if post_capture_active:  # refused at start-up too (kv8_hooks.kv8_refusals)
            raise ValueError(
                "sage_attn's 8-bit KV cache does not support post-capture KV sizing "
                "(unset SGLANG_ENABLE_POST_CAPTURE_KV_SIZING)"
            )
        # Read before the base constructor, which allocates the buffers.
        self.settings = SageAttnSettings.from_env()
        # The pool's dtype is its storage, int8: code that takes a bf16 pool's fast
        # paths (e.g. models fusing RoPE with a bf16 cache write) must not take them.
        self.model_dtype = dtype
        super().__init__(*args, dtype=torch.int8, **kwargs)
        if self.kv_cache_layout != "nhd":
            raise ValueError(
                f"sage_attn's 8-bit KV cache is token-major (NHD); this server asks for a "
                f"{self.kv_cache_layout!r} layout (unset SGLANG_USE_HND_KVCACHE)"
            )
        # The smoothing vectors are computed from a fixed calibration prompt once the
        # model runner's backends exist (kv8_hooks.calibrate_kv8_pool); until then,
        # and with SGLANG_SAGE_ATTN_KV_SMOOTHING=none, they are zeros.
        self.needs_calibration = self.settings.kv_smoothing == "calibrate"
        bf16_bytes = 2 * (self.head_dim + self.v_head_dim)
        kv8_bytes = kv8_bytes_per_token_head(self.head_dim, self.v_head_dim)
        logger.info(
            "sage_attn: 8-bit KV cache: %s, pages of %d tokens (%s), %d B per token and KV "
            "head (bf16: %d, %.2fx the tokens per byte), Q/K rotation %s; %d tokens x %d "
            "layers x %d KV heads = %.2f GB",
            KV8_FORMAT,
            self.page_size,
            "decode reads whole pages"
            if self.page_size >= MIN_WHOLE_PAGE
            else f"decode gathers token by token; --page-size {RECOMMENDED_PAGE_SIZE} reads "
            "whole pages",
            kv8_bytes,
            bf16_bytes,
            bf16_bytes / kv8_bytes,
            "on" if self.rotated else "off",
            self.size,
            self.layer_num,
            self.head_num,
            sum(self.get_kv_size_bytes()) / (1 << 30),
        )

    # ---- buffers --------------------------------------------------------------

    def _create_buffers(self):
        check_page_size(self.page_size)
        self.rotated = self.settings.rotate_qk(self.head_dim)
        self.store_dtype = torch.int8
        with self.memory_saver_adapter.region(GPU_MEMORY_TYPE_KV_CACHE):
            with (
                torch.cuda.use_mem_pool(self.custom_mem_pool)
                if self.enable_custom_mem_pool
                else nullcontext()
            ):
                # One layer's buffers each, in kv8_cache.py's layout. Slot 0's page
                # absorbs padded-token writes, as in the bf16 pool; the smoothing
                # vectors start at zero (no smoothing) until calibrated.
                self.caches = [
                    allocate_kv8_cache(
                        num_slots=self.size + self.page_size,
                        num_kv_heads=self.head_num,
                        head_dim=self.head_dim,
                        head_dim_v=self.v_head_dim,
                        device=self.device,
                        rotated=self.rotated,
                        page_size=self.page_size,
                    )
                    for _ in range(self.layer_num)
                ]
        # SGLang's per-layer buffer lists, as views of the caches: [pages, Hkv, P, D(v)],
        # V's a transposed view, since SGLang reads a value buffer's last dim as Dv.
        self.k_buffer = [cache.k_int8 for cache in self.caches]
        self.v_buffer = [cache.v_int8.transpose(2, 3) for cache in self.caches]
        self.k_scale_buffer = [cache.k_scale for cache in self.caches]
        self.v_scale_buffer = [cache.v_scale for cache in self.caches]
        self.k_mean = [cache.k_mean for cache in self.caches]
        # SGLang's slot-copy and transfer paths (speculative decoding, PD
        # disaggregation, HiCache) are refused with this pool (kv8_hooks.py); the
        # pointer tables they would read stay unset.
        self.k_data_ptrs = self.v_data_ptrs = None

    def _clear_buffers(self):
        del self.k_buffer, self.v_buffer, self.k_scale_buffer, self.v_scale_buffer
        del self.k_mean, self.caches

    def get_kv_size_bytes(self):
        size = get_tensor_size_bytes
        return (
            size(self.k_buffer) + size(self.k_scale_buffer) + size(self.k_mean),
            size(self.v_buffer) + size(self.v_scale_buffer),
        )

    def kv8_cache(self, layer_id: int) -> KV8Cache:
        """The layer's cache as the sage_attn kernels read it."""
        if self.layer_transfer_counter is not None:
            self.layer_transfer_counter.wait_until(layer_id - self.start_layer)
        return self.caches[layer_id - self.start_layer]

    # The raw INT8 buffers (never viewed as the model dtype, as the base pool would).
    def _get_key_buffer(self, layer_id: int):
        return self.k_buffer[layer_id - self.start_layer]

    def _get_value_buffer(self, layer_id: int):
        return self.v_buffer[layer_id - self.start_layer]

    # ---- writes ---------------------------------------------------------------

    def set_kv_buffer(
        self,
        layer,
        loc_info,
        cache_k: torch.Tensor,
        cache_v: torch.Tensor,
        k_scale=None,
        v_scale=None,
        layer_id_override: int | None = None,
        dcp_kv_mask: torch.Tensor | None = None,
    ):
        """Quantize ``cache_k [N, Hkv, D]`` / ``cache_v [N, Hkv, Dv]`` into the slots of
        ``loc_info`` (one Triton kernel; the inputs are only read)."""
        if k_scale is not None or v_scale is not None or dcp_kv_mask is not None:
            raise ValueError(
                "sage_attn's 8-bit KV cache takes unscaled bf16/fp16 K/V (no per-layer "
                "KV scales, no DCP masks)"
            )
        loc, _, _ = unwrap_write_loc(loc_info)
        self._check_physical_write_loc(loc_info, "set_kv_buffer (sage_attn int8)")
        layer_id = layer_id_override if layer_id_override is not None else layer.layer_id
        cache = self.caches[layer_id - self.start_layer]
        write_kv8(
            cache,
            loc,
            cache_k.view(-1, self.head_num, self.head_dim),
            cache_v.view(-1, self.head_num, self.v_head_dim),
        )

    def move_kv_cache(self, tgt_loc: torch.Tensor, src_loc: torch.Tensor):
        raise NotImplementedError(
            "sage_attn's 8-bit KV cache does not move slots (speculative decoding is refused)"
        )

    # ---- retraction's CPU copy: the INT8 rows and their scales ------------------

    def get_cpu_copy(self, indices, mamba_indices=None, req_pool_index=None):
        return [[rows.cpu() for rows in kv8_token_rows(c, indices)] for c in self.caches]

    def load_cpu_copy(self, kv_cache_cpu, indices, mamba_indices=None, req_pool_index=None):
        for cache, saved_rows in zip(self.caches, kv_cache_cpu, strict=True):
            set_kv8_token_rows(cache, indices, saved_rows)
