"""SGLang plugin entry point (group ``sglang.srt.plugins``): registers ``sage_attn``.

SGLang calls ``register`` in every process it starts (launcher, scheduler, TP
workers) before parsing arguments, so ``--attention-backend``,
``--prefill-attention-backend`` and ``--decode-attention-backend`` all accept
``sage_attn``. It also registers the hooks of the 8-bit KV cache
(``kv8_hooks.py``; inert unless ``SGLANG_SAGE_ATTN_KV_CACHE=int8``), which
``load_plugins()`` applies after every plugin has run. Calling it again changes
nothing.
"""

from __future__ import annotations

from sglang.srt.layers.attention.sage_attention.settings import BACKEND_NAME

__all__ = ["BACKEND_NAME", "create_sage_attn_backend", "register"]


def create_sage_attn_backend(runner):
    """The bf16-cache backend, or its variant on sage_attn's 8-bit KV pool (whose
    kernel modules only that variant loads)."""
    from sglang.srt.layers.attention.sage_attention.kv8_pool import SageKV8TokenToKVPool

    if isinstance(runner.token_to_kv_pool, SageKV8TokenToKVPool):
        from sglang.srt.layers.attention.sage_attention.kv8_backend import (
            SageKV8AttentionBackend,
        )

        return SageKV8AttentionBackend(runner)
    from sglang.srt.layers.attention.sage_attention_backend import SageAttentionBackend

    return SageAttentionBackend(runner)


def register() -> None:
    from sglang.srt.arg_groups.choices import (
        ATTENTION_BACKEND_CHOICES,
        add_attention_backend_choices,
    )
    from sglang.srt.layers.attention.attention_registry import register_attention_backend
    from sglang.srt.layers.attention.sage_attention.kv8_hooks import register_kv8_hooks

    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])
    register_attention_backend(BACKEND_NAME)(create_sage_attn_backend)
    register_kv8_hooks()
