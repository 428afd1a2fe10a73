"""A byte-level Llama-architecture decoder (RoPE, RMSNorm, SwiGLU, GQA, head dim 128),
saved as a Granite checkpoint SGLang can serve, plus the CPython-stdlib corpus it learns.

One forward serves training, the fp32 reference and SGLang: attention is a
callable ``attention(layer_index, q, k, v) -> out`` over flat token rows, so the
same weights and the same arithmetic run through torch SDPA or through SGLang's
``RadixAttention`` layers and pools.
"""

from __future__ import annotations

import json
import os
import sysconfig
import zlib
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ByteLlamaConfig:
    vocab_size: int = 256  # one token per byte
    hidden_size: int = 512
    num_layers: int = 3
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 128
    intermediate_size: int = 448
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 8192

    @classmethod
    def tiny(cls) -> ByteLlamaConfig:
        """Head dim 64, two layers: for CPU smoke runs."""
        return cls(
            hidden_size=128,
            num_layers=2,
            num_heads=2,
            num_kv_heads=1,
            head_dim=64,
            intermediate_size=128,
        )

    def granite_config(self) -> dict:
        """HF ``config.json`` of the same network as GraniteForCausalLM (multipliers
        at their Llama values; the softmax scale is Granite's attention_multiplier)."""
        return dict(
            architectures=["GraniteForCausalLM"],
            model_type="granite",
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            rope_theta=self.rope_theta,
            rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            hidden_act="silu",
            attention_multiplier=self.head_dim**-0.5,
            embedding_multiplier=1.0,
            residual_multiplier=1.0,
            logits_scaling=1.0,
            tie_word_embeddings=False,
            attention_bias=False,
            mlp_bias=False,
            torch_dtype="bfloat16",
            bos_token_id=None,
            eos_token_id=None,
            sage_attn_byte_llama=asdict(self),
        )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (x32 * weight.float()).to(x.dtype)


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Neox-style rotary embedding of x [N, H, D] at integer positions [N]."""
    dim = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim)
    angles = positions.float()[:, None] * inv_freq[None, :]
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class _Attention(nn.Module):
    def __init__(self, c: ByteLlamaConfig):
        super().__init__()
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)


class _MLP(nn.Module):
    def __init__(self, c: ByteLlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)


class _Layer(nn.Module):
    def __init__(self, c: ByteLlamaConfig):
        super().__init__()
        self.input_layernorm = nn.Parameter(torch.ones(c.hidden_size))
        self.self_attn = _Attention(c)
        self.post_attention_layernorm = nn.Parameter(torch.ones(c.hidden_size))
        self.mlp = _MLP(c)


class _Body(nn.Module):
    def __init__(self, c: ByteLlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(_Layer(c) for _ in range(c.num_layers))
        self.norm = nn.Parameter(torch.ones(c.hidden_size))


class ByteLlama(nn.Module):
    """Parameter names follow HF Llama/Granite, so the state dict is the checkpoint."""

    def __init__(self, config: ByteLlamaConfig):
        super().__init__()
        self.config = config
        self.model = _Body(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, tokens, positions, attention, capture: dict | None = None):
        """tokens, positions: [N]; attention(i, q, k, v) -> [N, H, D]. Returns logits [N, V]."""
        c = self.config
        x = self.model.embed_tokens(tokens)
        for i, layer in enumerate(self.model.layers):
            h = rms_norm(x, layer.input_layernorm, c.rms_norm_eps)
            attn = layer.self_attn
            q = attn.q_proj(h).view(-1, c.num_heads, c.head_dim)
            k = attn.k_proj(h).view(-1, c.num_kv_heads, c.head_dim)
            v = attn.v_proj(h).view(-1, c.num_kv_heads, c.head_dim)
            q, k = rope(q, positions, c.rope_theta), rope(k, positions, c.rope_theta)
            a = attention(i, q, k, v)
            x = x + attn.o_proj(a.reshape(a.shape[0], -1))
            h = rms_norm(x, layer.post_attention_layernorm, c.rms_norm_eps)
            x = x + layer.mlp.down_proj(F.silu(layer.mlp.gate_proj(h)) * layer.mlp.up_proj(h))
            if capture is not None:
                capture[f"attn{i}"], capture[f"resid{i}"] = a.detach(), x.detach()
        return self.lm_head(rms_norm(x, self.model.norm, c.rms_norm_eps))

    def state_dict_for_hf(self) -> dict:
        """HF names (layernorm weights as ``.weight``), contiguous bf16."""
        out = {}
        for name, tensor in self.state_dict().items():
            if name.endswith("layernorm") or name == "model.norm":
                name += ".weight"
            out[name] = tensor.detach().to(torch.bfloat16).contiguous().cpu()
        return out

    def load_hf_state_dict(self, tensors: dict) -> None:
        own = {}
        for name, tensor in tensors.items():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                name = name.removesuffix(".weight")
            own[name] = tensor
        self.load_state_dict(own)


def causal_sdpa(batch: int, length: int):
    """attention(i, q, k, v) for ``batch`` sequences of ``length`` rows laid out back to back."""

    def attention(_, q, k, v):
        def bhld(t):
            return t.view(batch, length, t.shape[1], t.shape[2]).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            bhld(q), bhld(k), bhld(v), is_causal=True, enable_gqa=q.shape[1] != k.shape[1]
        )
        return out.transpose(1, 2).reshape(q.shape)

    return attention


def save_checkpoint(model: ByteLlama, path: str, extra: dict | None = None) -> None:
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(model.config.granite_config(), f, indent=1)
    save_file(model.state_dict_for_hf(), os.path.join(path, "model.safetensors"))
    if extra:
        with open(os.path.join(path, "train_log.json"), "w") as f:
            json.dump(extra, f, indent=1)


def load_checkpoint(path: str, dtype=torch.float32, device="cpu") -> ByteLlama:
    from safetensors.torch import load_file

    with open(os.path.join(path, "config.json")) as f:
        config = ByteLlamaConfig(**json.load(f)["sage_attn_byte_llama"])
    model = ByteLlama(config)
    model.load_hf_state_dict(load_file(os.path.join(path, "model.safetensors")))
    return model.to(device=device, dtype=dtype).eval()


# ---------------------------------------------------------------- corpus


def stdlib_corpus(held_out_every: int = 10) -> tuple[bytes, bytes]:
    """(train, held_out) bytes: every ``.py`` under this interpreter's standard
    library (site-packages excluded); a file is held out when the CRC32 of its
    relative path is divisible by ``held_out_every``. Files are joined by NUL."""
    root = sysconfig.get_paths()["stdlib"]
    train, held_out = [], []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "dist-packages"))
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                data = f.read()
            rel = os.path.relpath(path, root).encode()
            (held_out if zlib.crc32(rel) % held_out_every == 0 else train).append(data)
    return b"\0".join(train), b"\0".join(held_out)


def windows(data: bytes, count: int, length: int, seed: int) -> torch.Tensor:
    """``count`` random windows of ``length`` bytes as int64 token ids [count, length]."""
    gen = torch.Generator().manual_seed(seed)
    corpus = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    starts = torch.randint(0, len(corpus) - length, (count,), generator=gen)
    return torch.stack([corpus[s : s + length] for s in starts.tolist()]).long()


def unigram_cross_entropy(train: bytes, held_out: bytes) -> float:
    """Held-out cross-entropy (nats/byte) of the train split's byte frequencies."""
    counts = torch.bincount(
        torch.frombuffer(bytearray(train), dtype=torch.uint8).long(), minlength=256
    )
    probs = (counts.double() + 1) / (counts.sum() + 256)  # add-one: no byte is impossible
    test = torch.bincount(
        torch.frombuffer(bytearray(held_out), dtype=torch.uint8).long(), minlength=256
    )
    return float(-(test.double() * probs.log()).sum() / test.sum())
