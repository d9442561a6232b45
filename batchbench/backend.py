"""The one place that decides which back-end runs custom kernels.

Model and benchmark code never branch on the back-end; kernels ask `BACKEND`.
"""

from __future__ import annotations

import os

import mlx.core as mx
import numpy as np

from batchbench import SettingError


def _detect() -> str:
    forced = os.environ.get("BATCHBENCH_BACKEND")
    if forced:
        if forced not in ("cuda", "metal", "cpu"):
            raise SettingError(f"BATCHBENCH_BACKEND must be cuda, metal or cpu, not {forced!r}")
        return forced
    if mx.default_device() == mx.cpu:
        return "cpu"
    if mx.cuda.is_available():
        return "cuda"
    if mx.metal.is_available():
        return "metal"
    return "cpu"


BACKEND: str = _detect()


def _decode_setting(var: str, cuda: int) -> int:
    """A decode-step setting: the environment variable if set, else `cuda` on CUDA, 0 elsewhere."""
    v = os.environ.get(var)
    if v is not None:
        try:
            return max(0, int(v))
        except ValueError:
            raise SettingError(f"{var} must be a whole number of layers, not {v!r}") from None
    return cuda if BACKEND == "cuda" else 0


def _eval_every() -> int:
    # A decode step's graph takes ~1 ms of Python to build on a 28-layer model; submitting it
    # every few layers lets the GPU start while Python builds the rest (H200, B=1: 6.9 -> 5.7 ms
    # per step). Each submit is a CUDA graph launch of ~0.1 ms of host time, and at B <= 4 the
    # host is the bottleneck: a short first segment, then 7 layers each (H200, same call,
    # segments 2+7+7+7+5 vs 4 x 7: S_TG B=1 264.7 -> 290.3, B=4 912.4 -> 1002.1 t/s,
    # results/h200-2026-11-29-s5). On the CPU there is nothing to overlap.
    return _decode_setting("BATCHBENCH_EVAL_EVERY", 7)


def _first_segment() -> int:
    return _decode_setting("BATCHBENCH_FIRST_SEGMENT", 2)


# Compiled decode segments on CUDA by default (see _segments).
CUDA_DECODE_SEGMENTS = (2, 3, 5, 7)


def _segments() -> tuple[int, ...]:
    """Layer counts of the compiled decode segments, the last repeating; () for the segments of
    DECODE_EVAL_EVERY / DECODE_FIRST_SEGMENT. On CUDA they grow, so that the host encodes each
    segment while the GPU runs the one before: H200, decode steps timed interleaved in one
    process, 2+3+5+7+7+4 against 2+7+7+7+5: B=1 3.055 -> 2.851 ms, B=8 4.276 -> 4.066, B=32
    7.306 -> 7.137 (results/h200-2026-11-29-s10)."""
    v = os.environ.get("BATCHBENCH_SEGMENTS")
    if v is None:
        explicit = "BATCHBENCH_EVAL_EVERY" in os.environ or "BATCHBENCH_FIRST_SEGMENT" in os.environ
        return CUDA_DECODE_SEGMENTS if BACKEND == "cuda" and not explicit else ()
    try:
        sizes = tuple(int(x) for x in v.split(",") if x.strip())
    except ValueError:
        sizes = (0,)
    if any(x <= 0 for x in sizes):
        raise SettingError(f"BATCHBENCH_SEGMENTS must be positive layer counts like 2,3,5,7, not {v!r}")
    return sizes


# Op-by-op decode steps call mx.async_eval on the hidden state every this many layers (0: never);
# compiled decode steps are cut into segments of this many layers.
DECODE_EVAL_EVERY: int = _eval_every()
# Layers in the first compiled decode segment (0: DECODE_EVAL_EVERY): the GPU starts sooner.
DECODE_FIRST_SEGMENT: int = _first_segment()
# Compiled decode segments listed by size (overrides the two above when not empty).
DECODE_SEGMENTS: tuple[int, ...] = _segments()


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
    global DECODE_EVAL_EVERY, DECODE_FIRST_SEGMENT, DECODE_SEGMENTS
    DECODE_EVAL_EVERY, DECODE_FIRST_SEGMENT = _eval_every(), _first_segment()
    DECODE_SEGMENTS = _segments()


def describe() -> str:
    return f"{BACKEND} (mlx {mx.__version__}, device {mx.default_device()})"


HOST_PAGE = 1 << 16  # keep_on_host advises whole 64 KB pages (covers 4 KB pages too)


def keep_on_host(view: np.ndarray) -> bool:
    """Ask CUDA to keep the managed memory under `view` (host-made MLX array data, aligned to
    HOST_PAGE at both ends) on the host and mapped for the device: kernels then read it in place
    over the bus, and neither side faults its pages over when the other wrote them. On the
    H200, kernels reading a freshly host-written array took 0.1-0.35 ms even for a few bytes.
    Returns whether the advice was taken; a no-op off CUDA or without the driver library."""
    if BACKEND != "cuda":
        return False
    import ctypes

    a, n = view.ctypes.data, view.nbytes
    if a % HOST_PAGE or n % HOST_PAGE or not n:
        raise ValueError("keep_on_host: the view must cover whole HOST_PAGE pages")
    try:
        advise = ctypes.CDLL("libcuda.so.1").cuMemAdvise  # the CUdevice form (CU_DEVICE_CPU = -1)
    except (OSError, AttributeError):
        return False
    advise.argtypes = [ctypes.c_uint64, ctypes.c_size_t, ctypes.c_int, ctypes.c_int]
    advise.restype = ctypes.c_int
    dev = getattr(mx.default_device(), "index", 0)
    set_preferred_location, set_accessed_by = 3, 5
    return advise(a, n, set_preferred_location, -1) == 0 and advise(a, n, set_accessed_by, dev) == 0
