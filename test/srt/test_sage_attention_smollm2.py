"""The SmolLM2 harness (benchmark/sage_attention/validate.py --model smollm2) on a tiny GGUF.

CI has no GPU and must not download the 98 MB model: a 2-layer Llama with random
weights (Q4_1 and F32 tensors, as in the real file, plus one Q8_0 embedding) and a toy
byte-level BPE vocabulary is written with gguf's own writer, the way llama.cpp's
convert script writes it (q/k rows permuted for its RoPE layout), under the file name
the harness looks for in its cache. The harness runs once through its command line
(never imported: ``--quick --cpu``, the triton backend and fp32), converting the GGUF
into its checkpoint on the way. Checked from what it leaves: the config from the GGUF
metadata, dequantization against gguf's reference and the q/k permutation undone, the
tokenizer round trip, the harness's fp32 model against transformers' Llama (the
converted checkpoint) and Granite (the directory the server steps serve), and the
SGLang triton-backend path (chunked prefill over shuffled pages, decode) against fp32.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

VALIDATE = pathlib.Path(__file__).resolve().parents[2] / "benchmark/sage_attention/validate.py"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"  # what the harness finds in its cache
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS = 128, 2, 1, 64, 96, 2
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "r e", "Ġ s", "Ġa n"]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# GGUF tensor names -> HF (llama.cpp's convert_hf_to_gguf mapping, reversed).
GGUF_PARTS = "attn_norm ffn_norm attn_q attn_k attn_v attn_output ffn_gate ffn_up ffn_down"
HF_PARTS = (
    "input_layernorm post_attention_layernorm self_attn.q_proj self_attn.k_proj "
    "self_attn.v_proj self_attn.o_proj mlp.gate_proj mlp.up_proj mlp.down_proj"
)
HF_NAME = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    **{
        f"blk.{i}.{g}.weight": f"model.layers.{i}.{h}.weight"
        for i in range(LAYERS)
        for g, h in zip(GGUF_PARTS.split(), HF_PARTS.split(), strict=True)
    },
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's ``permute``: HF's rotate-half q/k rows -> GGUF's interleaved."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _hf_weights(seed=0) -> dict[str, np.ndarray]:
    """Random weights under GGUF names, in HF's (rotate-half) q/k row order."""
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


def _write_gguf(path: pathlib.Path) -> dict:
    import gguf
    from gguf.quants import quantize

    Q = gguf.GGMLQuantizationType
    tokens, types = _vocab()
    hf = _hf_weights()
    hf["token_embd.weight"] = (
        np.random.default_rng(1).standard_normal((len(tokens), HIDDEN)).astype(np.float32) * 0.5
    )
    writer = gguf.GGUFWriter(str(path), "llama")
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
            w = llama_cpp_permute(w, HEADS)
        elif name.endswith("attn_k.weight"):
            w = llama_cpp_permute(w, KV_HEADS)
        qtype = Q.F32 if w.ndim == 1 else Q.Q8_0 if name == "token_embd.weight" else Q.Q4_1
        data = w if qtype == Q.F32 else quantize(w, qtype)
        writer.add_tensor(name, data, raw_dtype=qtype)
        written[name] = (data, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dict(hf=hf, written=written, tokens=tokens)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny GGUF in a fresh harness cache, and the harness's quick run over it."""
    cache, out = tmp_path_factory.mktemp("smollm2-cache"), tmp_path_factory.mktemp("out")
    made = _write_gguf(cache / GGUF_NAME)
    command = [sys.executable, str(VALIDATE), "--model", "smollm2", "--quick", "--cpu"]
    run = subprocess.run(
        # Task prompts of 256 tokens: the toy vocabulary spends about a token per byte.
        [*command, "--smollm2-cache", str(cache), "--backends", "triton"]
        + ["--task-lengths", "256", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "validation_smollm2.json").read_text())
    assert report["checkpoint"] == str(cache / "checkpoint")
    return dict(made, ckpt=cache / "checkpoint", report=report, stdout=run.stdout)


def test_config_from_metadata(tiny):
    config = json.loads((tiny["ckpt"] / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"]) == (HIDDEN, LAYERS)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (HEADS, KV_HEADS)
    assert (config["head_dim"], config["intermediate_size"]) == (HEAD_DIM, FFN)
    assert config["vocab_size"] == len(tiny["tokens"]) and config["tie_word_embeddings"]
    assert config["rope_theta"] == 10000.0 and abs(config["rms_norm_eps"] - 1e-5) < 1e-9


def test_dequantization_matches_gguf_reference(tiny):
    from gguf.quants import dequantize
    from safetensors.numpy import load_file

    saved = load_file(str(tiny["ckpt"] / "model.safetensors"))
    assert set(saved) == set(HF_NAME.values())
    for name, (data, qtype) in tiny["written"].items():
        ref = dequantize(data, qtype).reshape(tiny["hf"][name].shape)
        got = saved[HF_NAME[name]]
        # The converter undid llama.cpp's q/k permutation: permuting again gives the file's rows.
        if name.endswith("attn_q.weight"):
            got = llama_cpp_permute(got, HEADS)
        elif name.endswith("attn_k.weight"):
            got = llama_cpp_permute(got, KV_HEADS)
        np.testing.assert_array_equal(got, ref, err_msg=name)
        # And close to the float weights the file was made from (Q4_1: 16 levels per 32).
        err = np.abs(saved[HF_NAME[name]] - tiny["hf"][name]).max()
        assert err <= (0.06 if qtype.name == "Q4_1" else 0.02), (name, err)


def _rotate_half_rope(x, pos, theta):
    """HF Llama's RoPE: x [n, heads, d], the two halves of each head rotated together."""
    inv = 1.0 / theta ** (torch.arange(0, x.shape[-1], 2).float() / x.shape[-1])
    ang = torch.cat([pos.float()[:, None] * inv] * 2, -1)[:, None]
    x1, x2 = x.chunk(2, -1)
    return x * ang.cos() + torch.cat([-x2, x1], -1) * ang.sin()


def test_qk_permutation_turns_interleaved_rope_into_rotate_half():
    """Why the converter must undo llama.cpp's permutation: GGUF's interleaved-pair RoPE
    on the permuted rows is HF's rotate-half RoPE on the original rows."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3 * 64, 16)).astype(np.float32)
    p = llama_cpp_permute(w, 3)
    assert not np.array_equal(p, w)
    x = torch.from_numpy(rng.standard_normal((5, 16)).astype(np.float32))
    pos = torch.arange(5) * 7
    hf = _rotate_half_rope((x @ torch.from_numpy(w).T).view(5, 3, 64), pos, 10000.0)
    q = (x @ torch.from_numpy(p).T).view(5, 3, 64)
    inv = 1.0 / 10000.0 ** (torch.arange(0, 64, 2).float() / 64)
    ang = pos.float()[:, None, None] * inv
    even, odd = q[..., 0::2], q[..., 1::2]
    gptj = torch.stack([even * ang.cos() - odd * ang.sin(), odd * ang.cos() + even * ang.sin()], -1)
    torch.testing.assert_close(
        torch.from_numpy(llama_cpp_permute(hf.reshape(5, 3 * 64).T.numpy(), 3).T.copy()),
        gptj.reshape(5, 3 * 64),
    )


def test_tokenizer_round_trip(tiny):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny["ckpt"] / "tokenizer.json"))
    for text in ["the cat sat on the mat", "Ünïcode ☃ and 2024 tabs\tand\nlines", "  x  "]:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text
    enc = tok.encode("<|im_start|>user: the answer<|im_end|>", add_special_tokens=False)
    assert enc.ids[0] == 1 and enc.ids[-1] == 2
    assert "Ġthe" in enc.tokens  # the merges apply
    assert tok.encode("2024", add_special_tokens=False).tokens == ["2", "0", "2", "4"]


def test_harness_model_is_transformers_llama_and_the_served_granite(tiny):
    """The harness's fp32 model computes what transformers' Llama computes from the
    converted checkpoint, and its Granite from the directory the server steps serve."""
    check = tiny["report"]["reference_check"]
    if "skipped" in check:
        pytest.skip(check["skipped"])
    bound = 2e-4 + 1e-4 * check["max_abs_logit"]
    assert check["llama_max_abs_diff"] <= bound, check
    assert check["granite_max_abs_diff"] <= bound, check


def test_sglang_triton_path_matches_the_fp32_model(tiny):
    """Chunked prefill over shuffled pages and decode steps through SGLang's pools and its
    triton backend (fp16 on the CPU interpreter) agree with the fp32 model."""
    report = tiny["report"]
    assert report["quick"] and report["layers"] == LAYERS and report["backends"] == ["triton"]
    rows = [r for r in report["agreement"] if r["backend"] == "triton"]
    assert rows and all(r["against"] == "fp32" for r in rows)
    assert all(r["top1_agreement"] >= 0.97 for r in rows), rows
    assert report["determinism"] == {"triton": True}
    assert min(r["cos"] for r in report["drift"]) >= 0.9999, report["drift"]
    # Decode: fp32's greedy tokens against triton's (prefill, then a decode step per token).
    assert report["generation"]["fp32"]["steps"] > 0
    assert tiny["stdout"].startswith("**Quick run (--quick)**")
