"""GGUF loading: every supported tensor type gives the logits of the same weights from safetensors.

Reference weights are what gguf-py's own dequantizer makes of the blocks we write, so a loader
bug (wrong type decode, wrong name map, missing Q/K un-permute, wrong hparam) shows as a mismatch.
"""

from __future__ import annotations

import json

import gguf
import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from batchbench.loaders import load_model
from batchbench.loaders import gguf as gguf_loader
from batchbench.loaders import gguf_quants as gq
from batchbench.presets import reference_logits

HIDDEN, LAYERS, FFN, HEADS, KV_HEADS, VOCAB, CTX = 256, 2, 512, 4, 2, 320, 2048
TOKENS = [1, 7, 300, 42, 5, 5, 199, 64, 3, 250, 11, 17]
LAYER_MAP = {  # GGUF -> HF, written out here independently of the loader's table
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def hf_config(arch: str, tie: bool = False) -> dict:
    return {
        "model_type": arch, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "intermediate_size": FFN,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB,
        "rms_norm_eps": 1e-6 if arch == "qwen2" else 1e-5, "rope_theta": 1e6 if arch == "qwen2" else 1e4,
        "max_position_embeddings": CTX, "tie_word_embeddings": tie,
    }


def convert_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp convert_hf_to_gguf.py LlamaModel.permute: HF half-split RoPE rows -> interleaved.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_blocks(rng, rows: int, cols: int, qtype) -> np.ndarray:
    """Valid K-quant blocks: random codes and scales, with small finite fp16 super-block scales."""
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    raw = rng.integers(0, 256, (rows, cols // 256, size), dtype=np.uint8)
    offsets = {T.Q4_K: [0, 2], T.Q6_K: [208], T.Q5_K: [0, 2]}[qtype]
    for off in offsets:
        d = rng.uniform(0.5, 1.0, (rows, cols // 256, 1)) * 2e-4
        raw[..., off : off + 2] = d.astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


def encode(rng, x: np.ndarray, qtype) -> tuple[np.ndarray, np.ndarray]:
    """(data to write, float32 weights gguf-py reads back) for one tensor in GGUF row order."""
    if qtype == T.F32:
        return x.astype(np.float32), x.astype(np.float32)
    if qtype == T.F16:
        return x.astype(np.float16), x.astype(np.float16).astype(np.float32)
    if qtype in (T.Q4_K, T.Q6_K, T.Q5_K):
        data = random_blocks(rng, *x.shape, qtype)
    else:
        data = gguf.quants.quantize(x.astype(np.float32), qtype)
    return data, gguf.quants.dequantize(data, qtype).astype(np.float32).reshape(x.shape)


def build_pair(tmp_path, arch: str, wtype, *, tie=False, out_type=None, seed=0, extra=None, drop=None):
    """Write model.gguf and an HF folder holding exactly the weights the GGUF decodes to."""
    rng = np.random.default_rng(seed)
    hd = HIDDEN // HEADS
    shapes = {"token_embd": (VOCAB, HIDDEN), "output_norm": (HIDDEN,)}
    if not tie:
        shapes["output"] = (VOCAB, HIDDEN)
    for i in range(LAYERS):
        b = f"blk.{i}."
        shapes.update({b + "attn_norm": (HIDDEN,), b + "ffn_norm": (HIDDEN,),
                       b + "attn_q": (HEADS * hd, HIDDEN), b + "attn_k": (KV_HEADS * hd, HIDDEN),
                       b + "attn_v": (KV_HEADS * hd, HIDDEN), b + "attn_output": (HIDDEN, HEADS * hd),
                       b + "ffn_gate": (FFN, HIDDEN), b + "ffn_up": (FFN, HIDDEN), b + "ffn_down": (HIDDEN, FFN)})
    writer = gguf.GGUFWriter(str(tmp_path / "model.gguf"), arch)
    writer.add_context_length(CTX)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(hf_config(arch)["rope_theta"])
    writer.add_layer_norm_rms_eps(hf_config(arch)["rms_norm_eps"])
    writer.add_token_list([f"t{i}" for i in range(VOCAB)])
    hf: dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        if drop and name == drop:
            continue
        layer = name.split(".")[1] if name.startswith("blk.") else None
        base = name.split(".")[-1]
        hf_base = (f"model.layers.{layer}.{LAYER_MAP[base]}" if layer is not None
                   else {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}[base])
        n_head = {"attn_q": HEADS, "attn_k": KV_HEADS}.get(base) if arch == "llama" else None
        if len(shape) == 1:
            x = (1.0 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
            writer.add_tensor(name + ".weight", x)
            hf[hf_base + ".weight"] = x
            continue
        x = rng.standard_normal(shape).astype(np.float32) * (1.0 if base == "token_embd" else shape[1] ** -0.5)
        qtype = out_type if (base == "output" and out_type is not None) else wtype
        data, deq = encode(rng, x, qtype)
        if n_head:
            # The file holds permuted rows (as convert_hf_to_gguf writes them); the HF row of GGUF row r is idx[r].
            idx = convert_permute(np.arange(shape[0]), n_head)
            ref = np.empty_like(deq)
            ref[idx] = deq
        else:
            ref = deq
        writer.add_tensor(name + ".weight", data, raw_dtype=None if qtype in (T.F32, T.F16) else qtype)
        hf[hf_base + ".weight"] = ref
        if arch == "qwen2" and base in ("attn_q", "attn_k", "attn_v"):
            bias = (0.1 * rng.standard_normal(shape[0])).astype(np.float32)
            writer.add_tensor(name + ".bias", bias)
            hf[hf_base + ".bias"] = bias
    for name, data, qtype in extra or []:
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    folder = tmp_path / "hf"
    folder.mkdir()
    mx.save_safetensors(str(folder / "model.safetensors"), {k: mx.array(v) for k, v in hf.items()})
    (folder / "config.json").write_text(json.dumps(hf_config(arch, tie)))
    return str(tmp_path / "model.gguf"), str(folder), hf


def logits(path: str, dtype=mx.float32) -> np.ndarray:
    return reference_logits(load_model(path, dtype=dtype).model, TOKENS, dtype=dtype)


def dense_weights(model) -> dict[str, np.ndarray]:
    out = {}
    for path, m in model.named_modules():
        if hasattr(m, "scales"):
            w = mx.dequantize(m.weight, m.scales, m.biases, group_size=m.group_size, bits=m.bits)
            out[path + ".weight"] = np.array(w.astype(mx.float32))
        elif "weight" in m and isinstance(m["weight"], mx.array):
            out[path + ".weight"] = np.array(m.weight.astype(mx.float32))
    return out


TYPES = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q4_K, T.Q6_K]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("wtype", TYPES, ids=lambda t: t.name)
def test_gguf_matches_safetensors(tmp_path, arch, wtype):
    gpath, hpath, hf = build_pair(tmp_path, arch, wtype)
    loaded = load_model(gpath, dtype=mx.float32)
    # Weights first: every decoded tensor equals gguf-py's reading of the same bytes.
    got = dense_weights(loaded.model)
    for k, ref in hf.items():
        if k.endswith(".weight"):
            np.testing.assert_allclose(got[k], ref, rtol=0, atol=1e-6 * max(1.0, np.abs(ref).max()), err_msg=k)
    # Then logits, float32 compute on both sides; only summation order differs.
    a = reference_logits(loaded.model, TOKENS, dtype=mx.float32)
    b = logits(hpath)
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
    assert loaded.n_ctx_train == CTX
    assert loaded.config["model_type"] == arch
    assert loaded.n_params == sum(v.size for v in hf.values())


def test_llama_without_unpermute_would_differ(tmp_path, monkeypatch):
    # Guards the test above: skipping the un-permute must be detectable.
    gpath, hpath, _ = build_pair(tmp_path, "llama", T.F32)
    good = logits(gpath)
    monkeypatch.setattr(gguf_loader, "unpermute", lambda w, n: w)
    bad = logits(gpath)
    ref = logits(hpath)
    assert np.abs(good - ref).max() < 1e-4 * np.abs(ref).max()
    assert np.abs(bad - ref).max() > 1e-2 * np.abs(ref).max()


def test_tied_embeddings_and_float16(tmp_path):
    gpath, hpath, _ = build_pair(tmp_path, "qwen2", T.Q4_0, tie=True)
    loaded = load_model(gpath, dtype=mx.float16)
    assert loaded.config["tie_word_embeddings"] is True
    assert "lm_head" not in dict(loaded.model.named_modules())
    assert loaded.model.model.embed_tokens.scales.dtype == mx.float16
    a = reference_logits(loaded.model, TOKENS, dtype=mx.float16)
    b = logits(hpath, mx.float32)
    # float16 compute against float32: a few fp16 ulps of the logit range.
    assert np.abs(a - b).max() <= 2e-2 * np.abs(b).max()


def test_quant_summary(tmp_path):
    gpath, _, _ = build_pair(tmp_path, "llama", T.Q4_K, out_type=T.Q6_K)
    q = load_model(gpath, dtype=mx.float16).quant
    assert q.startswith("mixed:") and "q4_k->affine4" in q and "q6_k->f16" in q
    (tmp_path / "b").mkdir()
    gpath, _, _ = build_pair(tmp_path / "b", "llama", T.Q8_0)
    assert load_model(gpath, dtype=mx.float16).quant == "q8_0"


@pytest.mark.parametrize("bad", [T.Q5_K, T.MXFP4, T.TQ1_0], ids=lambda t: t.name)
def test_unsupported_type_refused(tmp_path, bad):
    # MXFP4/TQ1_0 are the types mx.load silently drops (with every later tensor); Q5_K it cannot read.
    rng = np.random.default_rng(1)
    if bad == T.Q5_K:
        data = random_blocks(rng, FFN, HIDDEN, bad)
    else:
        block, size = gguf.GGML_QUANT_SIZES[bad]
        data = rng.integers(0, 256, (FFN, HIDDEN // block * size), dtype=np.uint8)
    gpath, _, _ = build_pair(tmp_path, "llama", T.Q4_0, drop="blk.1.ffn_up",
                             extra=[("blk.1.ffn_up.weight", data, bad)])
    with pytest.raises(ValueError, match=rf"tensor blk\.1\.ffn_up\.weight has type {bad.name}, not supported"):
        load_model(gpath, dtype=mx.float16)


def test_tensor_missing_from_mx_load_is_caught(tmp_path, monkeypatch):
    # Simulates mx.load's silent drop: the header check must notice before anything runs.
    gpath, _, _ = build_pair(tmp_path, "qwen2", T.Q8_0)
    real = mx.load

    def lossy(path, return_metadata=False):
        t, m = real(path, return_metadata=True)
        for k in [k for k in t if k.startswith("blk.1.")]:
            del t[k]
        return t, m

    monkeypatch.setattr(gguf_loader.mx, "load", lossy)
    with pytest.raises(ValueError, match="listed in the header was not returned by mx.load"):
        load_model(gpath, dtype=mx.float16)


def test_bad_files_refused(tmp_path):
    gpath, _, _ = build_pair(tmp_path, "llama", T.F16, drop="blk.1.ffn_down")
    with pytest.raises(ValueError, match="missing tensors model.layers.1.mlp.down_proj.weight"):
        load_model(gpath, dtype=mx.float16)
    data = open(gpath, "rb").read()
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="trunc.gguf"):
        load_model(str(trunc), dtype=mx.float16)
    with pytest.raises(ValueError, match="does not exist"):
        load_model(str(tmp_path / "nope.gguf"), dtype=mx.float16)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"hello world")
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_model(str(junk), dtype=mx.float16)


def test_unknown_arch_and_tensor_refused(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gemma")
    w.add_tensor("token_embd.weight", np.zeros((8, 32), np.float16))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'gemma'; supported: llama, qwen2"):
        load_model(str(tmp_path / "g.gguf"), dtype=mx.float16)
    extra = [("blk.0.ffn_gate_exps.weight", np.zeros((4, 32), np.float16), None)]
    (tmp_path / "e").mkdir()
    gpath, _, _ = build_pair(tmp_path / "e", "llama", T.F16, extra=extra)
    with pytest.raises(ValueError, match="unexpected tensor blk.0.ffn_gate_exps.weight"):
        load_model(gpath, dtype=mx.float16)


def test_kquant_decoders_match_gguf_py():
    rng = np.random.default_rng(3)
    for qtype, fn in [(T.Q4_K, gq.dequantize_q4_k), (T.Q6_K, gq.dequantize_q6_k)]:
        raw = random_blocks(rng, 9, 512, qtype)
        np.testing.assert_array_equal(fn(raw), gguf.quants.dequantize(raw, qtype))
    x = rng.standard_normal((5, 64)).astype(np.float32)
    raw = gguf.quants.quantize(x, T.BF16)
    np.testing.assert_array_equal(gq.dequantize_bf16(raw), gguf.quants.dequantize(raw, T.BF16))


def test_nibble_packing_is_mlx_layout():
    rng = np.random.default_rng(4)
    q = rng.integers(0, 16, (6, 64), dtype=np.uint8)
    s = rng.uniform(0.1, 1, (6, 2)).astype(np.float32)
    b = rng.uniform(-1, 1, (6, 2)).astype(np.float32)
    w = mx.dequantize(mx.array(gq.pack_nibbles(q)), mx.array(s), mx.array(b), group_size=32, bits=4)
    ref = q.reshape(6, 2, 32) * s[..., None] + b[..., None]
    np.testing.assert_allclose(np.array(w), ref.reshape(6, 64), rtol=1e-6)
    np.testing.assert_array_equal(gq.unpack_nibbles(gq.pack_nibbles(q)), q)


def test_unpermute_inverts_convert_permute():
    x = np.arange(6 * 64 * 3).reshape(6 * 64, 3)
    for n_head in (1, 2, 6):
        p = convert_permute(x, n_head)
        np.testing.assert_array_equal(np.array(gguf_loader.unpermute(mx.array(p), n_head)), x)
        np.testing.assert_array_equal(gguf_loader.permute(x, n_head), p)


def test_header_reader_agrees_with_gguf_py(tmp_path):
    from batchbench.loaders.gguf_header import raw_rows, read_header

    gpath, _, _ = build_pair(tmp_path, "qwen2", T.Q4_K, out_type=T.Q6_K)
    ours = read_header(gpath)
    ref = gguf.GGUFReader(gpath)
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ours.tensors, ref.tensors):
        assert (a.type, a.shape, a.offset, a.n_bytes) == (b.tensor_type, tuple(reversed(b.shape.tolist())), b.data_offset, b.n_bytes)
        np.testing.assert_array_equal(np.asarray(raw_rows(gpath, a)).reshape(-1), np.asarray(b.data).view(np.uint8).reshape(-1))
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        if key in ours.array_len:
            assert ours.array_len[key] == len(field.data)
        else:
            assert ours.metadata[key] == pytest.approx(field.contents()), key
