"""Random-weight GGUF export: llama.cpp-shaped metadata, exact Q4_0/Q8_0 blocks, lossless round trip."""

from __future__ import annotations

import gguf
import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from batchbench import presets
from batchbench.loaders import load_model
from batchbench.loaders.export_gguf import export_gguf, export_main, vocab
from batchbench.presets import make_preset, reference_logits

TOKENS = [1, 2, 3, 100, 200, 300, 400, 511, 0, 17]
TINY_LLAMA = dict(model_type="llama", hidden_size=128, num_hidden_layers=2, intermediate_size=256,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                  max_position_embeddings=2048, rope_theta=500000.0)


@pytest.fixture
def tiny_llama(monkeypatch):
    monkeypatch.setitem(presets.PRESETS, "tiny-llama", TINY_LLAMA)
    return "tiny-llama"


@pytest.mark.parametrize("type", ["f16", "q8_0", "q4_0"])
@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_round_trip_logits_identical(tmp_path, tiny_llama, preset, type):
    out = str(tmp_path / "m.gguf")
    summary = export_gguf(preset, out, type)
    model, cfg = make_preset(preset, mx.float16, "none" if type == "f16" else type)
    loaded = load_model(out, dtype=mx.float16)
    n_linear = 7 * cfg["num_hidden_layers"] + (0 if cfg.get("tie_word_embeddings") else 1)
    assert summary.requantized == 0
    assert summary.exact_blocks == (0 if type == "f16" else n_linear)
    assert loaded.quant == type
    assert loaded.n_ctx_train == cfg["max_position_embeddings"]
    toks = [t % cfg["vocab_size"] for t in TOKENS]
    a = reference_logits(model, toks, dtype=mx.float16)
    b = reference_logits(loaded.model, toks, dtype=mx.float16)
    # Same bits in every weight and the same fp16 compute: the logits are identical.
    np.testing.assert_array_equal(a, b)


def test_q4_0_blocks_read_back_by_gguf_py(tmp_path, tiny_llama):
    # Independent of our loader: gguf-py's reader + dequantizer see the preset's exact weights,
    # with llama-arch Q/K rows in llama.cpp's permuted order.
    out = str(tmp_path / "m.gguf")
    export_gguf("tiny-llama", out, "q4_0")
    model, cfg = make_preset("tiny-llama", mx.float16, "q4_0")
    r = gguf.GGUFReader(out)
    tensors = {t.name: t for t in r.tensors}
    for name, layer, n_head in [("blk.1.attn_q", model.layers[1].self_attn.q_proj, 4),
                                ("blk.1.attn_k", model.layers[1].self_attn.k_proj, 2),
                                ("blk.0.ffn_down", model.layers[0].mlp.down_proj, None)]:
        t = tensors[name + ".weight"]
        assert t.tensor_type == T.Q4_0
        got = gguf.quants.dequantize(np.asarray(t.data), T.Q4_0)
        f32 = lambda a: a.astype(mx.float32)  # noqa: E731  (an fp16 dequantize would round)
        w = np.array(mx.dequantize(layer.weight, f32(layer.scales), f32(layer.biases), group_size=32, bits=4))
        if n_head:
            D = w.shape[0] // n_head
            w = w.reshape(n_head, 2, D // 2, -1).swapaxes(1, 2).reshape(w.shape)
        np.testing.assert_array_equal(got, w)
    assert tensors["token_embd.weight"].tensor_type == T.F16
    assert tensors["output_norm.weight"].tensor_type == T.F32


def test_metadata_llama_cpp_needs(tmp_path):
    out = str(tmp_path / "m.gguf")
    export_main("tiny", "q8_0", out)
    r = gguf.GGUFReader(out)
    f = r.fields
    val = lambda k: f[k].contents()  # noqa: E731
    cfg = presets.PRESETS["tiny"]
    assert val("general.architecture") == "qwen2"
    assert val("general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    for key, want in [("block_count", cfg["num_hidden_layers"]), ("embedding_length", cfg["hidden_size"]),
                      ("feed_forward_length", cfg["intermediate_size"]), ("context_length", cfg["max_position_embeddings"]),
                      ("attention.head_count", cfg["num_attention_heads"]),
                      ("attention.head_count_kv", cfg["num_key_value_heads"]),
                      ("rope.dimension_count", cfg["hidden_size"] // cfg["num_attention_heads"])]:
        assert val(f"qwen2.{key}") == want, key
    assert val("qwen2.rope.freq_base") == 1e6
    assert abs(val("qwen2.attention.layer_norm_rms_epsilon") - 1e-6) < 1e-12
    tokens = val("tokenizer.ggml.tokens")
    assert val("tokenizer.ggml.model") == "llama"
    assert len(tokens) == len(val("tokenizer.ggml.scores")) == len(val("tokenizer.ggml.token_type")) == cfg["vocab_size"]
    assert len(set(tokens)) == len(tokens)
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and tokens[3 + 0x0A] == "<0x0A>"
    assert (val("tokenizer.ggml.bos_token_id"), val("tokenizer.ggml.eos_token_id"), val("tokenizer.ggml.unknown_token_id")) == (1, 2, 0)
    # llama.cpp rejects files with tensors it does not use and needs the qwen2 q/k/v biases.
    names = {t.name for t in r.tensors}
    assert "blk.0.attn_q.bias" in names and "blk.0.attn_output.bias" not in names
    assert len(names) == 3 + 12 * cfg["num_hidden_layers"]


def test_float_model_is_requantized(tmp_path):
    # A float model exported as q4_0 goes through gguf-py's reference quantizer (lossy, reported).
    model, cfg = make_preset("tiny", mx.float32, "none")
    s = export_gguf(model, str(tmp_path / "m.gguf"), "q4_0", config=cfg)
    assert s.requantized == 7 * cfg["num_hidden_layers"] + 1 and s.exact_blocks == 0
    loaded = load_model(str(tmp_path / "m.gguf"), dtype=mx.float32)
    a = reference_logits(model, TOKENS, dtype=mx.float32)
    b = reference_logits(loaded.model, TOKENS, dtype=mx.float32)
    err = np.abs(a - b).max() / np.abs(a).max()
    assert 1e-4 < err < 0.5  # clearly quantized, still the same model


def test_bad_requests(tmp_path):
    with pytest.raises(ValueError, match="--type must be one of f16, q8_0, q4_0"):
        export_gguf("tiny", str(tmp_path / "m.gguf"), "q5_k")
    with pytest.raises(ValueError, match="too small"):
        vocab(100)
    with pytest.raises(ValueError, match="does not exist"):
        export_gguf("tiny", str(tmp_path / "no" / "m.gguf"), "f16")
    assert not list(tmp_path.iterdir())
