"""Pieces shared by the GGUF and folder loaders: the result type and the one strict load path."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

FLOAT_DTYPES = (mx.float16, mx.bfloat16, mx.float32)
_DTYPE_NAMES = {
    "f16": mx.float16,
    "float16": mx.float16,
    "bf16": mx.bfloat16,
    "bfloat16": mx.bfloat16,
    "f32": mx.float32,
    "float32": mx.float32,
}


@dataclass
class LoadedModel:
    model: nn.Module
    config: dict[str, Any]
    quant: str  # "f16", "q4_0", "mixed: q4_0 x 168, q6_k->f16 x 1", ...
    source: str
    n_ctx_train: int
    n_params: int
    weight_bytes: int


def resolve_dtype(dtype: Union[str, mx.Dtype]) -> mx.Dtype:
    if isinstance(dtype, mx.Dtype):
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"unsupported compute dtype {dtype}; use float16, bfloat16 or float32")
        return dtype
    try:
        return _DTYPE_NAMES[str(dtype).lower()]
    except KeyError:
        raise ValueError(
            f"unsupported dtype {dtype!r}; use one of {', '.join(_DTYPE_NAMES)}"
        ) from None


def cast_floats(weights: dict[str, mx.array], dtype: mx.Dtype) -> dict[str, mx.array]:
    """Float tensors (weights, norms, quantization scales/biases) to the compute dtype; packed ints stay."""
    return {k: v.astype(dtype) if v.dtype in FLOAT_DTYPES else v for k, v in weights.items()}


def _short(names: list[str], n: int = 3) -> str:
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def load_strict(model: nn.Module, weights: dict[str, mx.array], source: str) -> None:
    """Load every parameter or raise; the caller drops the model on error, so nothing half-loaded escapes."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing:
        raise ValueError(f"{source}: missing tensors {_short(missing)}")
    if extra:
        raise ValueError(f"{source}: unexpected tensors {_short(extra)}")
    for k, v in weights.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ValueError(
                f"{source}: tensor {k} has shape {tuple(v.shape)}, model expects {tuple(expected[k].shape)}"
            )
        if v.dtype == mx.uint32 and expected[k].dtype != mx.uint32:
            raise ValueError(f"{source}: tensor {k} is packed/quantized but the model layer is not")
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())


def count_params(model: nn.Module) -> int:
    """Logical parameter count: a packed quantized weight counts its unpacked elements."""
    n = 0
    for _, m in model.named_modules():
        bits = getattr(m, "bits", None)
        for name, v in m.items():
            if not isinstance(v, mx.array):
                continue
            if bits is not None and name in ("scales", "biases"):
                continue
            if bits is not None and name == "weight" and v.dtype == mx.uint32:
                n += v.shape[0] * v.shape[1] * 32 // bits
            else:
                n += v.size
    return n


def weight_bytes(model: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def quantize_layers(model: nn.Module, params: dict[str, dict]) -> None:
    """Swap the named layers for quantized ones (path -> to_quantized kwargs); others stay float."""
    if params:
        nn.quantize(model, class_predicate=lambda p, m: dict(params[p]) if p in params else False)
