"""`-m PATH`: load a real model file (GGUF) or folder (Hugging Face / mlx-lm) into a batchbench model.

Every loader loads all tensors strictly or raises ValueError with a one-line message, so a
half-loaded model never reaches the benchmark. `preset:NAME` is handled by batchbench.presets.
"""

from __future__ import annotations

import os
from typing import Union

import mlx.core as mx

from batchbench.loaders.common import LoadedModel

__all__ = ["LoadedModel", "load_model"]


def load_model(path: str, *, dtype: Union[str, mx.Dtype] = mx.float16) -> LoadedModel:
    if not os.path.exists(path):
        raise ValueError(f"model path {path!r} does not exist")
    if os.path.isdir(path):
        from batchbench.loaders.hf import load_hf

        return load_hf(path, dtype)
    if not os.access(path, os.R_OK):
        raise ValueError(f"model file {path!r} is not readable")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        from batchbench.loaders.gguf import load_gguf

        return load_gguf(path, dtype)
    if path.endswith(".safetensors"):
        raise ValueError(f"{path}: pass the folder holding config.json, not a single .safetensors file")
    raise ValueError(f"{path}: not a GGUF file (bad magic {magic!r}) and not a model folder")
