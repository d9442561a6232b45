"""`-m path/to/dir`: Hugging Face / mlx-lm folders (config.json + *.safetensors, sharded or not)."""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import mlx.core as mx

from batchbench.loaders.common import (
    FLOAT_DTYPES,
    LoadedModel,
    cast_floats,
    count_params,
    load_strict,
    quantize_layers,
    resolve_dtype,
    weight_bytes,
)
from batchbench.models import build_model


def _read_config(path: str) -> dict[str, Any]:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{path}: no config.json (expected a Hugging Face / mlx-lm model folder)")
    try:
        with open(cfg_path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{cfg_path}: unreadable ({e})") from None


def _weight_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, x) for x in files]
    # Prefer the transformers names; some repos also ship a consolidated.safetensors duplicate.
    files = sorted(glob.glob(os.path.join(path, "model*.safetensors")))
    return files or sorted(glob.glob(os.path.join(path, "*.safetensors")))


def _quant_params(cfg: dict[str, Any], path: str) -> dict[str, Any] | None:
    q = cfg.get("quantization")
    if q is None and "quantization_config" in cfg:
        qc = cfg["quantization_config"]
        # mlx-lm writes its own block under both keys; anything else (GPTQ, AWQ, FP8, ...) is not ours.
        if "group_size" in qc and "bits" in qc and "quant_method" not in qc:
            q = qc
        else:
            method = qc.get("quant_method", "unknown")
            raise ValueError(f"{path}: quantization_config method {method!r} is not supported (mlx-lm quantized folders are)")
    return q


def load_hf(path: str, dtype) -> LoadedModel:
    dtype = resolve_dtype(dtype)
    cfg = _read_config(path)
    files = _weight_files(path)
    if not files:
        raise ValueError(f"{path}: no *.safetensors files")
    weights: dict[str, mx.array] = {}
    for f in files:
        if not os.path.isfile(f):
            raise ValueError(f"{path}: shard {os.path.basename(f)} listed in the index is missing")
        try:
            weights.update(mx.load(f))
        except Exception as e:
            raise ValueError(f"{f}: cannot read safetensors ({type(e).__name__}: {e})") from None

    model = build_model(cfg)  # unknown model_type -> ValueError listing the supported ones
    weights = model.sanitize(weights)
    q = _quant_params(cfg, path)
    qparams: dict[str, dict] = {}
    if q is not None:
        default = {"group_size": q.get("group_size", 64), "bits": q.get("bits", 4), "mode": q.get("mode", "affine")}
        for p, m in model.named_modules():
            # Per-layer overrides are keyed by path; otherwise quantize exactly the layers that have scales.
            override = q.get(p)
            if isinstance(override, dict):
                qparams[p] = {**default, **override}
            elif override is not False and hasattr(m, "to_quantized") and f"{p}.scales" in weights:
                qparams[p] = dict(default)
        quantize_layers(model, qparams)

    for k, v in weights.items():
        if v.dtype not in FLOAT_DTYPES and k.rsplit(".", 1)[0] not in qparams:
            raise ValueError(f"{path}: tensor {k} has unsupported dtype {v.dtype}")
    load_strict(model, cast_floats(weights, dtype), path)
    n_ctx = int(cfg.get("max_position_embeddings") or model.args.max_position_embeddings)
    return LoadedModel(
        model=model,
        config=cfg,
        quant=_describe(q) if q else _dtype_name(weights),
        source=path,
        n_ctx_train=n_ctx,
        n_params=count_params(model),
        weight_bytes=weight_bytes(model),
    )


def _dtype_name(weights: dict[str, mx.array]) -> str:
    names = {mx.float16: "f16", mx.bfloat16: "bf16", mx.float32: "f32"}
    found = sorted({names[v.dtype] for v in weights.values() if v.dtype in names})
    return found[0] if len(found) == 1 else "mixed: " + ", ".join(found)


def _describe(q: dict[str, Any]) -> str:
    mode = q.get("mode", "affine")
    return f"mlx {mode} {q.get('bits', 4)}-bit g{q.get('group_size', 64)}"
