"""The SmolLM2 GGUF loader (benchmark/sage_attention/smollm2.py) on a tiny synthetic GGUF.

CI has no GPU and must not download the 98 MB model: a 2-layer Llama with random
weights (Q4_1 and F32 tensors, as in the real file, plus one Q8_0 embedding) and a toy
byte-level BPE vocabulary is written with gguf's own writer, the way llama.cpp's
convert script writes it (q/k rows permuted for its RoPE layout). Checked:
dequantization against gguf's reference, the q/k permutation round trip (and that it
is the one that turns GGUF's interleaved RoPE into HF's rotate-half), the tokenizer
round trip, and torch-model logits against the SGLang triton-backend path (fp16 on the
CPU interpreter; chunked prefill over shuffled pages, then a decode step).
"""

from __future__ import annotations

import os
import pathlib
import sys

import numpy as np
import pytest
import torch

HARNESS = pathlib.Path(__file__).resolve().parents[2] / "benchmark" / "sage_attention"
sys.path.insert(0, str(HARNESS))

import smollm2  # noqa: E402

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS = 128, 2, 1, 64, 96, 2
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "r e", "Ġ s", "Ġa n"]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _hf_weights(seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def w(rows, cols, scale=0.08):
        return (rng.standard_normal((rows, cols)) * scale).astype(np.float32)

    out = {}
    for i in range(LAYERS):
        out[f"blk.{i}.attn_q.weight"] = w(HEADS * HEAD_DIM, HIDDEN)
        out[f"blk.{i}.attn_k.weight"] = w(KV_HEADS * HEAD_DIM, HIDDEN)
        out[f"blk.{i}.attn_v.weight"] = w(KV_HEADS * HEAD_DIM, HIDDEN)
        out[f"blk.{i}.attn_output.weight"] = w(HIDDEN, HEADS * HEAD_DIM)
        out[f"blk.{i}.ffn_gate.weight"] = w(FFN, HIDDEN)
        out[f"blk.{i}.ffn_up.weight"] = w(FFN, HIDDEN)
        out[f"blk.{i}.ffn_down.weight"] = w(HIDDEN, FFN)
        out[f"blk.{i}.attn_norm.weight"] = 1 + 0.1 * rng.standard_normal(HIDDEN, np.float32)
        out[f"blk.{i}.ffn_norm.weight"] = 1 + 0.1 * rng.standard_normal(HIDDEN, np.float32)
    out["output_norm.weight"] = np.ones(HIDDEN, np.float32)
    return out


def _vocab():
    from gguf.vocab import bytes_to_unicode

    tokens = list(SPECIAL) + sorted(set(bytes_to_unicode().values()))
    tokens += ["".join(m.split(" ")) for m in MERGES]
    types = [3] * len(SPECIAL) + [1] * (len(tokens) - len(SPECIAL))
    return tokens, types


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import gguf
    from gguf.quants import quantize

    Q = gguf.GGMLQuantizationType
    root = tmp_path_factory.mktemp("smollm2")
    tokens, types = _vocab()
    hf = _hf_weights()
    hf["token_embd.weight"] = (
        np.random.default_rng(1).standard_normal((len(tokens), HIDDEN)).astype(np.float32) * 0.5
    )
    writer = gguf.GGUFWriter(str(root / "tiny.gguf"), "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(512)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    written = {}
    for name, w in hf.items():
        if name.endswith("attn_q.weight"):
            w = smollm2.permute_qk(w, HEADS)  # as llama.cpp's convert_hf_to_gguf does
        elif name.endswith("attn_k.weight"):
            w = smollm2.permute_qk(w, KV_HEADS)
        qtype = Q.F32 if w.ndim == 1 else Q.Q8_0 if name == "token_embd.weight" else Q.Q4_1
        data = w if qtype == Q.F32 else quantize(w, qtype)
        writer.add_tensor(name, data, raw_dtype=qtype)
        written[name] = (data, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ckpt = smollm2.convert(str(root / "tiny.gguf"), str(root / "ckpt"))
    return dict(ckpt=ckpt, hf=hf, written=written, tokens=tokens)


def test_config_from_metadata(tiny):
    config = smollm2.load_config(tiny["ckpt"])
    assert (config["hidden_size"], config["num_hidden_layers"]) == (HIDDEN, LAYERS)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (HEADS, KV_HEADS)
    assert (config["head_dim"], config["intermediate_size"]) == (HEAD_DIM, FFN)
    assert config["vocab_size"] == len(tiny["tokens"]) and config["tie_word_embeddings"]
    assert config["rope_theta"] == 10000.0 and abs(config["rms_norm_eps"] - 1e-5) < 1e-9


def test_dequantization_matches_gguf_reference(tiny):
    from gguf.quants import dequantize
    from safetensors.numpy import load_file

    saved = load_file(os.path.join(tiny["ckpt"], "model.safetensors"))
    for name, (data, qtype) in tiny["written"].items():
        ref = dequantize(data, qtype).reshape(tiny["hf"][name].shape)
        if name.endswith("attn_q.weight"):
            ref = smollm2.unpermute_qk(ref, HEADS)
        elif name.endswith("attn_k.weight"):
            ref = smollm2.unpermute_qk(ref, KV_HEADS)
        np.testing.assert_array_equal(saved[smollm2.hf_name(name)], ref, err_msg=name)
        # And close to the float weights the file was made from (Q4_1: 16 levels per 32).
        err = np.abs(saved[smollm2.hf_name(name)] - tiny["hf"][name]).max()
        assert err <= (0.06 if qtype.name == "Q4_1" else 0.02), (name, err)


def test_qk_permutation_round_trip_and_rope():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3 * 64, 16)).astype(np.float32)
    p = smollm2.permute_qk(w, 3)
    assert not np.array_equal(p, w)
    np.testing.assert_array_equal(smollm2.unpermute_qk(p, 3), w)
    # llama.cpp's interleaved RoPE on the permuted rows == HF rotate-half on the original.
    from byte_model import rope

    x = torch.from_numpy(rng.standard_normal((5, 16)).astype(np.float32))
    pos = torch.arange(5) * 7
    hf = rope((x @ torch.from_numpy(w).T).view(5, 3, 64), pos, 10000.0)
    q = (x @ torch.from_numpy(p).T).view(5, 3, 64)
    inv = 1.0 / 10000.0 ** (torch.arange(0, 64, 2).float() / 64)
    ang = pos.float()[:, None, None] * inv
    even, odd = q[..., 0::2], q[..., 1::2]
    gptj = torch.stack([even * ang.cos() - odd * ang.sin(), odd * ang.cos() + even * ang.sin()], -1)
    back = smollm2.unpermute_qk(gptj.reshape(5, 3 * 64).T.numpy(), 3).T
    torch.testing.assert_close(torch.from_numpy(np.ascontiguousarray(back)).view(5, 3, 64), hf)


def test_tokenizer_round_trip(tiny):
    tok = smollm2.load_tokenizer(tiny["ckpt"])
    for text in ["the cat sat on the mat", "Ünïcode ☃ and 2024 tabs\tand\nlines", "  x  "]:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text
    enc = tok.encode("<|im_start|>user: the answer<|im_end|>", add_special_tokens=False)
    assert enc.ids[0] == 1 and enc.ids[-1] == 2
    assert "Ġthe" in enc.tokens  # the merges apply
    assert tok.encode("2024", add_special_tokens=False).tokens == ["2", "0", "2", "4"]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU interpreter test")
def test_torch_model_matches_sglang_triton_path(tiny):
    from sglang_stack import SGLangStack

    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    torch.manual_seed(0)
    model32 = smollm2.load_model(tiny["ckpt"])
    model16 = smollm2.load_model(tiny["ckpt"], torch.float16)
    assert model16.lm_head.weight is model16.model.embed_tokens.weight  # tied
    batch, n = 2, 48
    tokens = torch.randint(0, len(tiny["tokens"]), (batch, n + 1))
    ref = smollm2.reference_logits(model32, tokens)
    stack = SGLangStack(
        "triton",
        LAYERS,
        HEADS,
        KV_HEADS,
        HEAD_DIM,
        device="cpu",
        dtype=torch.float16,
        max_batch=batch,
        max_context=128,
    )
    stack.begin(batch, n + 1)
    got = stack.prefill(model16, tokens[:, :n], chunk=16)  # 3 chunks over a cached prefix
    step = stack.forward(model16, tokens[:, n:], ForwardMode.DECODE, n).float()
    got = torch.cat([got, step], dim=1)
    scale = ref.abs().max()
    assert (got - ref).abs().max() <= 2e-2 * scale, ((got - ref).abs().max(), scale)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.97


def test_serving_checkpoint_is_the_same_model_as_granite(tiny, tmp_path):
    """The directory the server step serves (SGLang's Granite architecture over the
    same weights) computes the harness model's logits: checked with transformers'
    Granite, the reference implementation SGLang's granite.py follows."""
    transformers = pytest.importorskip("transformers")
    served = smollm2.serving_checkpoint(tiny["ckpt"], str(tmp_path / "serve"))
    granite = transformers.AutoModelForCausalLM.from_pretrained(served, torch_dtype=torch.float32)
    assert type(granite).__name__ == "GraniteForCausalLM"
    model = smollm2.load_model(tiny["ckpt"])
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, len(tiny["tokens"]), (1, 40), generator=generator)
    with torch.no_grad():
        want = smollm2.reference_logits(model, tokens)
        got = granite(tokens).logits
    assert torch.allclose(got, want, atol=2e-4, rtol=1e-4), (got - want).abs().max()
