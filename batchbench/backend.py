"""The one place that decides which back-end runs custom kernels.

Model and benchmark code never branch on the back-end; kernels ask `BACKEND`.
"""

from __future__ import annotations

import os

import mlx.core as mx


def _detect() -> str:
    forced = os.environ.get("BATCHBENCH_BACKEND")
    if forced:
        if forced not in ("cuda", "metal", "cpu"):
            raise ValueError(f"BATCHBENCH_BACKEND must be cuda, metal or cpu, not {forced!r}")
        return forced
    if mx.default_device() == mx.cpu:
        return "cpu"
    if mx.cuda.is_available():
        return "cuda"
    if mx.metal.is_available():
        return "metal"
    return "cpu"


BACKEND: str = _detect()


def set_device(name: str) -> None:
    """Select `cpu` or `gpu` for MLX and re-decide the kernel back-end."""
    global BACKEND
    if name == "cpu":
        mx.set_default_device(mx.cpu)
    elif name == "gpu":
        if not mx.is_available(mx.gpu):
            raise ValueError("--device gpu: this MLX build has no GPU back-end")
        mx.set_default_device(mx.gpu)
    else:
        raise ValueError(f"--device must be cpu or gpu, not {name!r}")
    BACKEND = _detect()


def describe() -> str:
    return f"{BACKEND} (mlx {mx.__version__}, device {mx.default_device()})"
