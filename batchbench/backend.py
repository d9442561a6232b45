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


def _eval_every() -> int:
    v = os.environ.get("BATCHBENCH_EVAL_EVERY")
    if v is not None:
        return max(0, int(v))
    # A decode step's graph takes ~1 ms of Python to build on a 28-layer model; submitting it
    # every few layers lets the GPU start while Python builds the rest (H200, B=1: 6.9 -> 5.7 ms
    # per step). On the CPU there is nothing to overlap.
    return 4 if BACKEND == "cuda" else 0


# Op-by-op decode steps call mx.async_eval on the hidden state every this many layers (0: never);
# compiled decode steps are cut into segments of this many layers.
DECODE_EVAL_EVERY: int = _eval_every()
# Layers in the first compiled decode segment (0: DECODE_EVAL_EVERY), for experiments.
DECODE_FIRST_SEGMENT: int = max(0, int(os.environ.get("BATCHBENCH_FIRST_SEGMENT", "0")))


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
    global DECODE_EVAL_EVERY
    DECODE_EVAL_EVERY = _eval_every()


def describe() -> str:
    return f"{BACKEND} (mlx {mx.__version__}, device {mx.default_device()})"
