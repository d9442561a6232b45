"""Hugging Face / mlx-lm folders: float, sharded and mlx-lm-quantized, loaded strictly or refused."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from batchbench.loaders import load_model
from batchbench.models import build_model
from batchbench.presets import reference_logits

TOKENS = [1, 9, 250, 33, 2, 2, 101, 7]


def tiny_config(arch: str = "llama", **kw) -> dict:
    cfg = {"model_type": arch, "hidden_size": 128, "num_hidden_layers": 2, "intermediate_size": 256,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
           "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
    cfg.update(kw)
    return cfg


def random_model(cfg: dict, seed: int = 0) -> nn.Module:
    """Model with every parameter random (norms too, so a swapped name cannot hide)."""
    model = build_model(cfg)
    rng = np.random.default_rng(seed)
    params = []
    for k, v in tree_flatten(model.parameters()):
        scale = 1.0 if "embed" in k else (0.2 if v.ndim == 1 else v.shape[-1] ** -0.5)
        x = rng.standard_normal(v.shape) * scale + (1.0 if "norm" in k else 0.0)
        params.append((k, mx.array(x.astype(np.float32))))
    model.load_weights(params, strict=True)
    return model


def save_folder(path, model: nn.Module, cfg: dict, dtype=mx.float16, shards: int = 1, index: bool = True):
    path.mkdir(parents=True, exist_ok=True)
    weights = {k: v.astype(dtype) if v.dtype == mx.float32 else v for k, v in tree_flatten(model.parameters())}
    names = sorted(weights)
    weight_map = {}
    for i in range(shards):
        fname = "model.safetensors" if shards == 1 else f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: weights[k] for k in names[i::shards]}
        mx.save_safetensors(str(path / fname), part)
        weight_map.update({k: fname for k in part})
    if shards > 1 and index:
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(cfg))
    return str(path)


def ref_logits(model, dtype=mx.float32) -> np.ndarray:
    return reference_logits(model, TOKENS, dtype=dtype)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_float32_folder_is_exact(tmp_path, arch):
    cfg = tiny_config(arch)
    model = random_model(cfg)
    loaded = load_model(save_folder(tmp_path, model, cfg, mx.float32), dtype=mx.float32)
    np.testing.assert_array_equal(ref_logits(loaded.model), ref_logits(model))
    assert loaded.quant == "f32"
    assert loaded.n_ctx_train == 1024
    assert loaded.n_params == sum(v.size for _, v in tree_flatten(model.parameters()))
    assert loaded.weight_bytes == 4 * loaded.n_params


@pytest.mark.parametrize("shards,index", [(1, True), (3, True), (2, False)])
def test_bf16_and_sharded(tmp_path, shards, index):
    cfg = tiny_config("qwen2", tie_word_embeddings=True)
    model = random_model(cfg, seed=1)
    folder = save_folder(tmp_path, model, cfg, mx.bfloat16, shards=shards, index=index)
    loaded = load_model(folder, dtype=mx.float32)
    assert loaded.quant == "bf16"
    # Same bf16-rounded weights on both sides, float32 compute: identical.
    model.update(nn.utils.tree_map(lambda v: v.astype(mx.bfloat16).astype(mx.float32), model.parameters()))
    np.testing.assert_array_equal(ref_logits(loaded.model), ref_logits(model))
    half = load_model(folder, dtype="f16")
    assert all(v.dtype == mx.float16 for _, v in tree_flatten(half.model.parameters()))


def test_mlx_lm_quantized_folder(tmp_path):
    cfg = tiny_config("llama")
    model = random_model(cfg, seed=2)
    # Like mlx_lm.convert -q: 4-bit group 64 everywhere, plus a per-layer 8-bit override; the
    # embedding is left float, which only the absent `.scales` tells.
    overrides = {"lm_head": {"group_size": 32, "bits": 8}}
    nn.quantize(model, 64, 4, class_predicate=lambda p, m: overrides.get(p, isinstance(m, nn.Linear)))
    cfg["quantization"] = {"group_size": 64, "bits": 4, "mode": "affine", **overrides}
    loaded = load_model(save_folder(tmp_path, model, cfg, mx.float32), dtype=mx.float32)
    assert isinstance(loaded.model.lm_head, nn.QuantizedLinear) and loaded.model.lm_head.bits == 8
    assert isinstance(loaded.model.layers[0].mlp.up_proj, nn.QuantizedLinear)
    assert isinstance(loaded.model.model.embed_tokens, nn.Embedding)
    assert loaded.quant == "mlx affine 4-bit g64"
    np.testing.assert_array_equal(ref_logits(loaded.model), ref_logits(model))


def test_unknown_model_type_lists_supported(tmp_path):
    cfg = tiny_config("llama")
    folder = save_folder(tmp_path, random_model(cfg), {**cfg, "model_type": "gemma3"})
    with pytest.raises(ValueError, match="unsupported model_type 'gemma3'; supported: llama, mistral, qwen2"):
        load_model(folder, dtype=mx.float16)


def test_bad_folders_refused(tmp_path):
    cfg = tiny_config("llama")
    model = random_model(cfg)
    with pytest.raises(ValueError, match="no config.json"):
        load_model(str(tmp_path), dtype=mx.float16)
    folder = save_folder(tmp_path / "a", model, cfg)
    weights = mx.load(folder + "/model.safetensors")
    mx.eval(weights)  # mx.load reads lazily; the file is rewritten below
    # A missing tensor, an unexpected one, a wrong shape: each refused, naming the tensor.
    for change, msg in [
        (lambda w: w.pop("model.layers.1.mlp.down_proj.weight"), "missing tensors model.layers.1.mlp.down_proj.weight"),
        (lambda w: w.__setitem__("model.extra.weight", mx.zeros(3)), "unexpected tensors model.extra.weight"),
        (lambda w: w.__setitem__("model.norm.weight", mx.zeros(5)), r"model.norm.weight has shape \(5,\)"),
    ]:
        w = dict(weights)
        change(w)
        mx.save_safetensors(folder + "/model.safetensors", w)
        with pytest.raises(ValueError, match=msg):
            load_model(folder, dtype=mx.float16)
    (tmp_path / "a" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="cannot read safetensors"):
        load_model(folder, dtype=mx.float16)
    (tmp_path / "a" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        load_model(folder, dtype=mx.float16)


def test_foreign_quantization_refused(tmp_path):
    cfg = tiny_config("llama", quantization_config={"quant_method": "gptq", "bits": 4})
    folder = save_folder(tmp_path, random_model(tiny_config("llama")), cfg)
    with pytest.raises(ValueError, match="quantization_config method 'gptq' is not supported"):
        load_model(folder, dtype=mx.float16)
    with pytest.raises(ValueError, match="unsupported dtype"):
        load_model(folder, dtype="int8")
