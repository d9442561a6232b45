"""Model architectures: one module per `model_type`, found by name (no registry to edit)."""

from __future__ import annotations

import importlib
from typing import Any

import mlx.nn as nn

# model_type values that reuse another architecture's file.
MODEL_REMAPPING = {"mistral": "llama"}
SUPPORTED = ("llama", "mistral", "qwen2")


def get_classes(model_type: str):
    if model_type not in SUPPORTED:
        raise ValueError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED)}"
        )
    module = importlib.import_module(f"batchbench.models.{MODEL_REMAPPING.get(model_type, model_type)}")
    return module.Model, module.ModelArgs


def build_model(config: dict[str, Any]) -> nn.Module:
    """Build an (uninitialised, lazily random) model from a config.json-style dict."""
    model_cls, args_cls = get_classes(config.get("model_type", ""))
    return model_cls(args_cls.from_dict(config))
