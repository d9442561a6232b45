"""`-m model.gguf`: llama / qwen2 GGUF files, checked tensor by tensor against the header.

mx.load keeps Q4_0/Q4_1/Q8_0 as MLX affine (group 32), which we run as is. It decodes Q4_K wrongly,
silently drops types it does not know (MXFP4, TQ1_0) along with every later tensor, and fails on
others, so the header decides first, and Q4_K/Q6_K/BF16 are decoded here from the raw bytes.
"""

from __future__ import annotations

import re
import struct
from typing import Any

import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType as T

from batchbench.loaders import gguf_quants as gq
from batchbench.loaders.gguf_header import Header, TensorInfo, raw_rows, read_header
from batchbench.loaders.common import (
    LoadedModel,
    cast_floats,
    count_params,
    load_strict,
    quantize_layers,
    resolve_dtype,
    weight_bytes,
)
from batchbench.models import build_model

ARCHS = ("llama", "qwen2")
# Types mx.load returns correctly, and how: (bits of the affine layout or None for float).
NATIVE = {T.F32: None, T.F16: None, T.Q4_0: 4, T.Q4_1: 4, T.Q8_0: 8}
# Types we decode from the raw bytes ourselves.
DECODED = (T.BF16, T.Q4_K, T.Q6_K)
SUPPORTED = tuple(NATIVE) + DECODED

_GLOBAL = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_NAME = re.compile(r"^(?:blk\.(\d+)\.)?(\w+)\.(weight|bias)$")


def hf_name(name: str) -> str:
    """GGUF tensor name -> mlx-lm/HF parameter path, e.g. blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight."""
    m = _NAME.match(name)
    if m:
        layer, base, suffix = m.groups()
        if layer is None and base in _GLOBAL:
            return f"{_GLOBAL[base]}.{suffix}"
        if layer is not None and base in _LAYER:
            return f"model.layers.{layer}.{_LAYER[base]}.{suffix}"
    if name == "rope_freqs.weight":
        raise ValueError("rope_freqs.weight (llama3-style RoPE scaling) is not supported yet")
    raise ValueError(f"unexpected tensor {name} (not a llama/qwen2 decoder tensor)")


def unpermute(w: mx.array, n_head: int) -> mx.array:
    """Undo llama.cpp's convert-time Q/K row permutation (HF half-split RoPE -> interleaved pairs).

    The writer maps HF row h*D + s*D/2 + i to GGUF row h*D + 2*i + s; whole rows move, so the same
    works for packed quantized weights, their scales/biases and 1-D biases.
    """
    D = w.shape[0] // n_head
    rest = w.shape[1:]
    return w.reshape(n_head, D // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def permute(w, n_head: int):
    """The writer's permutation (numpy or mx), for export and tests."""
    D = w.shape[0] // n_head
    rest = w.shape[1:]
    return w.reshape(n_head, 2, D // 2, *rest).swapaxes(1, 2).reshape(w.shape)


class _Meta:
    def __init__(self, header: Header, path: str):
        self.values = header.metadata
        self.path = path

    def get(self, key: str, default: Any = None) -> Any:
        v = self.values.get(key, default)
        return v.item() if isinstance(v, np.generic) else v

    def need(self, key: str) -> Any:
        v = self.get(key)
        if v is None:
            raise ValueError(f"{self.path}: missing GGUF key {key}")
        return v


def _config(meta: _Meta, arch: str, shapes: dict[str, tuple]) -> dict[str, Any]:
    p = arch + "."
    n_embd = int(meta.need(p + "embedding_length"))
    n_head = int(meta.need(p + "attention.head_count"))
    head_dim = int(meta.get(p + "attention.key_length", n_embd // n_head))
    if int(meta.get(p + "attention.value_length", head_dim)) != head_dim:
        raise ValueError(f"{meta.path}: key_length != value_length is not supported")
    rope_dim = int(meta.get(p + "rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(f"{meta.path}: partial RoPE ({rope_dim} of {head_dim} dims) is not supported")
    if "token_embd.weight" not in shapes:
        raise ValueError(f"{meta.path}: no token_embd.weight tensor")
    n_vocab = shapes["token_embd.weight"][0]
    cfg: dict[str, Any] = {
        "model_type": arch,
        "hidden_size": n_embd,
        "num_hidden_layers": int(meta.need(p + "block_count")),
        "intermediate_size": int(meta.need(p + "feed_forward_length")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(meta.get(p + "attention.head_count_kv", n_head)),
        "head_dim": head_dim,
        # Stored as f32; 7 digits gives back the config's 1e-06 rather than 9.99999997e-07.
        "rms_norm_eps": float(f'{meta.need(p + "attention.layer_norm_rms_epsilon"):.7g}'),
        "vocab_size": n_vocab,
        "rope_theta": float(f'{meta.get(p + "rope.freq_base", 1e6 if arch == "qwen2" else 1e4):.7g}'),
        "max_position_embeddings": int(meta.need(p + "context_length")),
        "tie_word_embeddings": "output.weight" not in shapes,
        "attention_bias": "blk.0.attn_output.bias" in shapes,
        "mlp_bias": "blk.0.ffn_gate.bias" in shapes,
    }
    if arch == "qwen2" and head_dim != n_embd // n_head:
        raise ValueError(f"{meta.path}: qwen2 with head_dim {head_dim} != hidden/heads is not supported")
    scaling = meta.get(p + "rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise ValueError(f"{meta.path}: RoPE scaling {scaling!r} is not supported (only linear)")
        cfg["rope_scaling"] = {"type": "linear", "factor": float(meta.need(p + "rope.scaling.factor"))}
    window = meta.get(p + "attention.sliding_window")
    if window:
        cfg["sliding_window"] = int(window)
    return cfg


def _quant_summary(types: dict[str, str]) -> str:
    """How the matmul weights are held: one type name, or 'mixed: type x count, ...'."""
    counts: dict[str, int] = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    if len(counts) == 1:
        return next(iter(counts))
    return "mixed: " + ", ".join(f"{t} x {n}" for t, n in sorted(counts.items(), key=lambda x: -x[1]))


def load_gguf(path: str, dtype) -> LoadedModel:
    dtype = resolve_dtype(dtype)
    try:
        header = read_header(path)
    except (ValueError, OSError, struct.error, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read GGUF header ({e})") from None
    meta = _Meta(header, path)
    arch = meta.get("general.architecture")
    if arch not in ARCHS:
        raise ValueError(f"{path}: unsupported GGUF architecture {arch!r}; supported: {', '.join(ARCHS)}")

    tensors: dict[str, TensorInfo] = {t.name: t for t in header.tensors}
    for t in header.tensors:
        if t.type not in SUPPORTED:
            names = ", ".join(x.name for x in SUPPORTED)
            raise ValueError(f"{path}: tensor {t.name} has type {t.type_name}, not supported (supported: {names})")
        if NATIVE.get(t.type) and not t.name.endswith(".weight"):
            raise ValueError(f"{path}: quantized tensor {t.name} is not a weight")
        hf_name(t.name)  # unknown names fail here, before the big read
    shapes = {n: t.shape for n, t in tensors.items()}
    cfg = _config(meta, arch, shapes)

    try:
        loaded = mx.load(path, return_metadata=True)[0]
    except Exception as e:
        raise ValueError(f"{path}: mx.load failed ({type(e).__name__}: {e})") from None

    weights: dict[str, mx.array] = {}
    qparams: dict[str, dict] = {}
    wtypes: dict[str, str] = {}
    for name, t in tensors.items():
        rows, cols = shapes[name][0], shapes[name][-1]
        hf = hf_name(name)
        module = hf.rsplit(".", 1)[0]
        tname = t.type.name.lower()
        if t.type in (T.F32, T.F16):
            arr = _take(loaded, name, shapes[name], None, path, tname)
        elif t.type in NATIVE:
            bits = NATIVE[t.type]
            base = name[: -len(".weight")]
            arr = _take(loaded, name, (rows, cols * bits // 32), mx.uint32, path, tname)
            for part in ("scales", "biases"):
                weights[f"{module}.{part}"] = _take(loaded, f"{base}.{part}", (rows, cols // 32), None, path, tname)
            qparams[module] = {"group_size": 32, "bits": bits, "mode": "affine"}
        else:
            # mx.load's version of these is wrong or untrusted; decode the raw bytes instead.
            loaded.pop(name, None)
            raw = raw_rows(path, t)
            if t.type == T.Q4_K:
                q, s, b = gq.q4_k_affine(raw)
                arr = mx.array(gq.pack_nibbles(q))
                weights[f"{module}.scales"] = mx.array(s)
                weights[f"{module}.biases"] = mx.array(b)
                qparams[module] = {"group_size": 32, "bits": 4, "mode": "affine"}
                tname = "q4_k->affine4"
            elif t.type == T.Q6_K:
                out = np.float16 if dtype == mx.float16 else np.float32
                arr = mx.array(gq.dequantize_q6_k(raw, out))
                tname = f"q6_k->{_dtname(dtype)}"
            else:
                arr = mx.array(gq.dequantize_bf16(np.ascontiguousarray(raw)).reshape(shapes[name]))
                tname = f"bf16->{_dtname(dtype)}"
        weights[hf] = arr
        # Summarise the matmul weights; the embedding is a gather unless it doubles as the output.
        if len(shapes[name]) == 2 and (name != "token_embd.weight" or cfg["tie_word_embeddings"]):
            wtypes[name] = tname
    if loaded:
        raise ValueError(f"{path}: mx.load returned tensors not in the header: {', '.join(sorted(loaded)[:3])}")

    if arch == "llama":
        # llama.cpp permutes Q/K rows for its interleaved RoPE; undo it for the HF-layout model.
        heads = {"q_proj": cfg["num_attention_heads"], "k_proj": cfg["num_key_value_heads"]}
        for k in list(weights):
            proj = k.split(".")[-2]
            if proj in heads:
                weights[k] = unpermute(weights[k], heads[proj])

    model = build_model(cfg)
    quantize_layers(model, qparams)
    weights = model.sanitize(weights)
    load_strict(model, cast_floats(weights, dtype), path)
    return LoadedModel(
        model=model,
        config=cfg,
        quant=_quant_summary(wtypes),
        source=path,
        n_ctx_train=cfg["max_position_embeddings"],
        n_params=count_params(model),
        weight_bytes=weight_bytes(model),
    )


def _dtname(dtype: mx.Dtype) -> str:
    return {mx.float16: "f16", mx.bfloat16: "bf16", mx.float32: "f32"}[dtype]


def _take(loaded: dict, name: str, shape: tuple, dtype, path: str, tname: str) -> mx.array:
    """Pop one tensor mx.load returned and check it against the header's shape."""
    arr = loaded.pop(name, None)
    if arr is None:
        raise ValueError(f"{path}: tensor {name} ({tname}) listed in the header was not returned by mx.load")
    if tuple(arr.shape) != tuple(shape) or (dtype is not None and arr.dtype != dtype):
        raise ValueError(f"{path}: tensor {name} ({tname}) came back as {arr.dtype}{tuple(arr.shape)}, header says {shape}")
    return arr
