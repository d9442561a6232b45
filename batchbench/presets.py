"""Built-in random-weight models: throughput does not depend on weight values."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from batchbench.models import build_model

PRESETS: dict[str, dict] = {
    # For tests: tiny and fast, yet GQA (4 query heads per KV head) and D = 64.
    "tiny": dict(model_type="qwen2", hidden_size=256, num_hidden_layers=2, intermediate_size=512,
                 num_attention_heads=4, num_key_value_heads=1, vocab_size=512,
                 max_position_embeddings=4096),
    # The default: runs the standard sweep on a laptop CPU in seconds.
    "small": dict(model_type="qwen2", hidden_size=512, num_hidden_layers=6, intermediate_size=1408,
                  num_attention_heads=8, num_key_value_heads=2, vocab_size=8192,
                  max_position_embeddings=8192),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24,
                         intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2,
                         vocab_size=151936, max_position_embeddings=32768, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, num_hidden_layers=28,
                         intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2,
                         vocab_size=151936, max_position_embeddings=32768, tie_word_embeddings=True),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, num_hidden_layers=28,
                       intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                       vocab_size=152064, max_position_embeddings=32768),
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32,
                       intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                       vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
}
DEFAULT_PRESET = "small"
QUANTS = {"none": None, "q8_0": 8, "q4_0": 4}
GROUP_SIZE = 32  # GGUF Q4_0/Q8_0 blocks are 32 weights


def preset_config(name: str) -> dict:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return dict(PRESETS[name])


def param_count(cfg: dict) -> int:
    h, L, f, v = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = h // cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * hd
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * f + 2 * h
    if cfg["model_type"] == "qwen2":
        per_layer += h + 2 * kv  # q/k/v biases
    head = 0 if cfg.get("tie_word_embeddings") else v * h
    return L * per_layer + v * h + head + h


def weight_bytes(cfg: dict, dtype=mx.float16, quant: str = "none", packed: bool = False,
                 wpacked: bool = False) -> int:
    """Bytes of weights on the device (embedding stays in `dtype`, linears quantized). packed:
    the linears also keep their scales and biases as pairs (BB_QMM_SB_PACK on CUDA); wpacked,
    their weights repacked (BB_QMM_WPACK on CUDA)."""
    bits = QUANTS[quant]
    n = param_count(cfg)
    emb = cfg["vocab_size"] * cfg["hidden_size"]
    if bits is None:
        return n * dtype.size
    # bits (twice with wpacked) + fp16 scale and bias a group (twice with packed)
    per_weight = bits / 8 * (2 if wpacked else 1) + 2 * 2 / GROUP_SIZE * (2 if packed else 1)
    return int(emb * dtype.size + (n - emb) * per_weight)


def _quantizable(path: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and module.weight.shape[1] % GROUP_SIZE == 0


def make_preset(name: str, dtype=mx.float16, quant: str = "none", seed: int = 0):
    """Build a preset with random weights; returns (model, config).

    Quantized presets hold MLX affine weights whose biases are -2^(bits-1) * scale, which is
    exactly GGUF's Q4_0 / Q8_0, so an exported file is lossless.
    """
    if quant not in QUANTS:
        raise ValueError(f"--quant must be one of {', '.join(QUANTS)}, not {quant!r}")
    cfg = preset_config(name)
    model = build_model(cfg)  # lazy: the default init never materialises
    bits = QUANTS[quant]
    if bits is not None:
        nn.quantize(model, group_size=GROUP_SIZE, bits=bits, class_predicate=_quantizable)
    params = []
    for i, (path, p) in enumerate(nn.utils.tree_flatten(model.parameters())):
        k = mx.random.key(seed * 1_000_003 + i)
        params.append((path, _random_like(path, p, dtype, bits, k)))
    model.load_weights(params, strict=True)
    if bits is not None:
        _fix_biases(model, bits)
    mx.eval(model.parameters())
    return model, cfg


def reference_logits(model: nn.Module, tokens: list[int], dtype=None) -> np.ndarray:
    """Logits of every position of one sequence (prefill in one ubatch), float32 numpy."""
    from batchbench.kv_cache import KVCache, pad_to

    args = model.args
    n = len(tokens)
    if dtype is None:
        dtype = model.model.embed_tokens.weight.dtype
    cache = KVCache(args.num_hidden_layers, args.num_key_value_heads, args.head_dim,
                    pad_to(max(n, 1), 256), 1, unified=True, dtype=dtype)
    plan = cache.prepare(np.zeros(n, np.int64), np.arange(n), np.arange(n))
    logits = model(mx.array(np.asarray(tokens, np.int32))[None], plan, cache)
    return np.array(logits.astype(mx.float32))


def _random_like(path: str, p: mx.array, dtype, bits, key) -> mx.array:
    if path.endswith("norm.weight"):
        return mx.ones(p.shape, dtype)
    if p.dtype == mx.uint32:  # packed quantized weights: uniform random codes
        k1, k2 = mx.random.split(key)
        hi = mx.random.randint(0, 1 << 16, p.shape, key=k1).astype(mx.uint32)
        lo = mx.random.randint(0, 1 << 16, p.shape, key=k2).astype(mx.uint32)
        return (hi << 16) | lo
    if path.endswith(".scales"):
        fan_in = p.shape[-1] * GROUP_SIZE
        s = mx.random.uniform(0.5, 1.5, p.shape, key=key) * (2.0 / (2**bits * math.sqrt(fan_in)))
        return s.astype(dtype)
    if path.endswith(".biases"):
        return mx.zeros(p.shape, dtype)  # replaced below from the scales
    if path.endswith(".bias"):
        return (0.02 * mx.random.normal(p.shape, key=key)).astype(dtype)
    fan_in = p.shape[-1]
    std = 1.0 if "embed_tokens" in path else 1.0 / math.sqrt(fan_in)
    return (std * mx.random.normal(p.shape, key=key)).astype(dtype)


def _fix_biases(model: nn.Module, bits: int) -> None:
    for _, m in model.named_modules():
        if isinstance(m, nn.QuantizedLinear):
            m.biases = (-(2 ** (bits - 1)) * m.scales).astype(m.scales.dtype)
