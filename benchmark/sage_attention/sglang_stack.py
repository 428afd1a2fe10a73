"""SGLang's attention stack for one model, without a server: RadixAttention layers
over real pools, driven through a backend built by SGLang's registry.

Shared by ``validate.py`` (model-level accuracy) and ``layer_timing.py`` (layer time).
"""

from __future__ import annotations

import contextlib
import os

import torch

_ROTATION = "SGLANG_SAGE_ATTN_QK_ROTATION"
SGLANG_BACKENDS = {
    "triton": ("triton", {}),
    # Each P·V mode without the Q/K rotation ("auto" would rotate at head dim 64)...
    "sage_fp16": ("sage_attn", {"SGLANG_SAGE_ATTN_PV": "fp16", _ROTATION: "none"}),
    "sage_fp8": ("sage_attn", {"SGLANG_SAGE_ATTN_PV": "fp8", _ROTATION: "none"}),
    "sage_int8": ("sage_attn", {"SGLANG_SAGE_ATTN_PV": "int8", _ROTATION: "none"}),
    # ...and the default P·V with Q and K rotated before quantization (rotation.py).
    "sage_fp16_rot": ("sage_attn", {"SGLANG_SAGE_ATTN_PV": "fp16", _ROTATION: "hadamard"}),
    # The KV caches: sage_attn's 8-bit pool (default rotation, calibrated smoothing)
    # and SGLang's fp8_e4m3 pool read by its Triton backend (no scales, as
    # --kv-cache-dtype fp8_e4m3 serves a checkpoint without KV scales).
    "sage_kv8": ("sage_attn", {"SGLANG_SAGE_ATTN_KV_CACHE": "int8"}),
    "triton_fp8": ("triton", {}),
}
# Stacks whose pool is not SGLang's model-dtype MHA pool.
KV_CACHES = {"sage_kv8": "int8", "triton_fp8": "fp8_e4m3"}


@contextlib.contextmanager
def env(values: dict):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


class SGLangStack:
    """Attention layers of one model as SGLang RadixAttention layers over real pools,
    run through one backend built by SGLang's registry (``ATTENTION_BACKENDS``)."""

    def __init__(
        self,
        backend_key,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        *,
        device,
        dtype,
        max_batch,
        max_context,
        page_size=16,
    ):
        from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
        from sglang.srt.layers.attention.sage_attention import plugin
        from sglang.srt.layers.attention.sage_attention.kv8_pool import SageKV8TokenToKVPool
        from sglang.srt.layers.radix_attention import RadixAttention
        from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
        from sglang.srt.model_executor.forward_batch_info import ForwardMode
        from sglang.test.kits.attention_unittest.attention_methods import dense_attention as kit

        plugin.register()
        # Whole pages per request, so token i sits at offset i % page_size as SGLang's
        # paged allocator places it (the kit's layouts start a request every
        # max_context slots; paged kernels read a page from its first slot).
        max_context = -(-max_context // page_size) * page_size
        self.kit, self.device, self.max_context = kit, device, max_context
        self.page_size, self.num_heads, self.num_kv_heads = page_size, num_heads, num_kv_heads
        name, settings = SGLANG_BACKENDS[backend_key]
        self.name = name
        case = self._case(ForwardMode.EXTEND, (0,) * max_batch, (1,) * max_batch)
        config = kit.TinyModelConfig(
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            hidden_size=num_heads * head_dim,
            context_len=max_context,
        )
        runner = kit.MockModelRunner(
            case=case,
            model_config=config,
            dtype=dtype,
            device=device,
            max_context_len=max_context,
            head_dim=head_dim,
        )
        self.kv_cache = KV_CACHES.get(backend_key, "auto")
        pool_class = SageKV8TokenToKVPool if self.kv_cache == "int8" else MHATokenToKVPool
        with env(dict(settings, SGLANG_SAGE_ATTN_MIN_EXTEND_LEN="0")):
            runner.token_to_kv_pool = pool_class(
                size=runner.token_to_kv_pool.size,
                page_size=page_size,
                dtype=torch.float8_e4m3fn if self.kv_cache == "fp8_e4m3" else dtype,
                head_num=num_kv_heads,
                head_dim=head_dim,
                layer_num=num_layers,
                device=device,
                enable_memory_saver=False,
                enable_alt_stream=False,
            )
            runner.init_kv_index_translator()
            self.runner = runner
            self.backend = ATTENTION_BACKENDS[name](runner)
        # Launches of the 8-bit op: a figure labelled sage must come from it, not
        # from a layer the backend delegated to Triton (see ``require_sage_kernel``).
        self.sage_kernel_calls = 0
        if name == "sage_attn":
            # The 8-bit cache's extend op, or the packed path's.
            op_name = "extend_attention_kv8" if self.kv_cache == "int8" else "extend_attention"
            sage_op = getattr(self.backend, op_name)

            def counted_sage_op(*args, **kwargs):
                self.sage_kernel_calls += 1
                return sage_op(*args, **kwargs)

            setattr(self.backend, op_name, counted_sage_op)
        self.layers = [
            RadixAttention(num_heads, head_dim, head_dim**-0.5, num_kv_heads, layer_id=i)
            for i in range(num_layers)
        ]
        self.loc_fn = None

    def calibrate(self, model) -> None:
        """The 8-bit cache's smoothing vectors from the server's calibration prompt
        (kv8_calibration.py), run through this stack's layers; no-op for other caches."""
        from sglang.srt.layers.attention.sage_attention.kv8_calibration import (
            CALIBRATION_TOKENS,
            calibration_token_ids,
            record_key_means,
        )
        from sglang.srt.model_executor.forward_batch_info import ForwardMode

        if self.kv_cache != "int8":
            return
        # The server's prompt, cut to a stack too short to hold it (--quick runs).
        length = min(CALIBRATION_TOKENS, self.max_context)
        ids = calibration_token_ids(model.config.vocab_size, length)[None]
        self.begin(1, ids.shape[1])
        record_key_means(
            self.backend, lambda: self.forward(model, ids, ForwardMode.EXTEND, 0), length
        )

    def begin(self, batch: int, total_len: int, seed: int = 0, layout="shuffled_pages") -> None:
        """Slot layout for ``batch`` requests of up to ``total_len`` tokens: by default
        each request's pages shuffled (the kit's default layout)."""
        self.loc_fn = self.kit.make_loc_fn(
            layout,
            batch_size=batch,
            seq_lens=(total_len,) * batch,
            prefix_lens=(0,) * batch,
            page_size=self.page_size,
            max_context_len=self.max_context,
            seed=seed,
        )

    def _case(self, mode, prefix_lens, extend_lens):
        """The kit's description of a batch (its runner and batch builder read it)."""
        return self.kit.DenseAttentionCase(
            name="validate",
            backend=self.name,
            forward_mode=mode,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            page_size=self.page_size,
            prefix_lens=prefix_lens,
            extend_lens=extend_lens,
        )

    def _batch(self, mode, prefix_len: int, input_len: int, batch: int):
        extend_lens = () if mode.is_decode() else (input_len,) * batch
        case = self._case(mode, (prefix_len,) * batch, extend_lens)
        return self.kit._make_forward_batch(
            case,
            self.runner,
            max_context_len=self.max_context,
            device=self.device,
            loc_fn=self.loc_fn,
        )

    def forward(self, model, tokens, mode, prefix_len, capture=None):
        """tokens [B, n] as one batch continuing at ``prefix_len``: logits [B, n, V]."""
        from sglang.srt.model_executor.forward_context import ForwardContext, forward_context

        batch, n = tokens.shape
        fb = self._batch(mode, prefix_len, n, batch)
        with forward_context(ForwardContext(attn_backend=self.backend)):
            self.backend.init_forward_metadata(fb)

            def attention(i, q, k, v):
                out = self.layers[i](q.flatten(1), k.flatten(1), v.flatten(1), fb)
                return out.view(q.shape[0], q.shape[1], -1)

            logits = model(tokens.flatten().to(self.device), fb.positions, attention, capture)
        return logits.view(batch, n, -1)

    def require_sage_kernel(self) -> None:
        """Raise if this is a sage_attn stack whose extends never reached the 8-bit op."""
        if self.name == "sage_attn" and self.sage_kernel_calls == 0:
            raise RuntimeError(
                "sage_attn stack: no extend ran on the 8-bit kernel (every layer was "
                "delegated to Triton); its figures would measure Triton"
            )

    def prefill(self, model, tokens, chunk, capture=None):
        from sglang.srt.model_executor.forward_batch_info import ForwardMode

        outs = []
        for start in range(0, tokens.shape[1], chunk):
            part = capture if start + chunk >= tokens.shape[1] else None  # last chunk only
            piece = tokens[:, start : start + chunk]
            outs.append(self.forward(model, piece, ForwardMode.EXTEND, start, part).float())
        self.require_sage_kernel()
        return torch.cat(outs, dim=1)

    def greedy(self, model, prompts, steps, chunk):
        from sglang.srt.model_executor.forward_batch_info import ForwardMode

        self.begin(prompts.shape[0], prompts.shape[1] + steps)
        logits = self.prefill(model, prompts, chunk)
        token = logits[:, -1].argmax(-1)
        generated = [token]
        for i in range(steps - 1):
            out = self.forward(model, token[:, None], ForwardMode.DECODE, prompts.shape[1] + i)
            token = out[:, -1].float().argmax(-1)
            generated.append(token)
        return torch.stack(generated, dim=1).cpu()


def build_stacks(keys, config, *, device, dtype, max_batch, max_context) -> dict:
    """One ``SGLangStack`` per backend key for a model of ``config``'s attention shape
    (layers, heads, KV heads, head dim)."""
    return {
        key: SGLangStack(
            key,
            config.num_layers,
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
            device=device,
            dtype=dtype,
            max_batch=max_batch,
            max_context=max_context,
        )
        for key in keys
    }
