"""Kernel descriptions shared by the MLX launchers and the CPU verification harness.

A kernel is a `KernelSpec` (what MLX compiles) plus a `Launch` (one call's inputs and
geometry). Keeping both as plain data lets `batchbench.verify` compile and emulate the
exact source MLX would run, without a GPU.
"""

from __future__ import annotations

import hashlib
import os
import struct
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from batchbench import ON_OFF, env_choice


@dataclass(frozen=True)
class KernelSpec:
    backend: str  # "cuda" or "metal"
    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    source: str
    header: str = ""
    ensure_row_contiguous: bool = True
    shared_memory: int = 0  # CUDA only: dynamic shared-memory bytes


@dataclass
class Launch:
    inputs: list[Any]
    output_shapes: list[tuple[int, ...]]
    output_dtypes: list[Any]
    grid: tuple[int, int, int]  # in threads, as MLX takes it
    threadgroup: tuple[int, int, int]
    template: list[tuple[str, Any]] = field(default_factory=list)
    init_value: float | None = None


_KERNELS: dict[KernelSpec, Any] = {}


def f32_bits(v: float) -> int:
    """Bit pattern of v as a float32, for float constants passed as int template values
    (kernels read them back with __int_as_float / as_type<float>)."""
    return struct.unpack("<i", struct.pack("<f", float(v)))[0]


def compact(src: str) -> str:
    """Kernel source without comments, indentation or blank lines.

    MLX's CUDA back-end hashes the whole generated source on every launch (measured on the
    H200: a 40 KB source costs ~8 us more host time per call than a 0.1 KB one), so what we
    hand to MLX is the compacted text; the readable files stay in the repository.
    """
    out, i, n = [], 0, len(src)
    while i < n:
        c = src[i]
        if c == '"' or c == "'":  # literal: copy verbatim up to the closing quote
            j = i + 1
            while j < n and src[j] != c:
                j += 2 if src[j] == "\\" else 1
            out.append(src[i : j + 1])
            i = j + 1
        elif src.startswith("//", i):
            j = src.find("\n", i)
            i = n if j < 0 else j
        elif src.startswith("/*", i):
            j = src.find("*/", i + 2)
            i = n if j < 0 else j + 2
            out.append(" ")
        else:
            out.append(c)
            i += 1
    lines = (" ".join(line.split()) for line in "".join(out).split("\n"))
    return "\n".join(line for line in lines if line) + "\n"


# MLX's CUDA back-end pastes the header into every launch's generated source and hashes that
# source at every launch. Handing it `#include "<file>"` instead keeps both to ~100 bytes; the
# file name carries the header's hash, so a changed header is a new module. BATCHBENCH_KERNEL_INCLUDE=0
# passes headers inline.
INCLUDE_HEADERS = env_choice("BATCHBENCH_KERNEL_INCLUDE", "1", ON_OFF) == "1"
_INCLUDE_MIN = 1024


def _include_dir() -> str:
    d = os.environ.get("BATCHBENCH_KERNEL_DIR") or os.path.join(
        tempfile.gettempdir(), f"batchbench-kernels-{os.getuid() if hasattr(os, 'getuid') else 0}")
    os.makedirs(d, exist_ok=True)
    return os.path.abspath(d)


def cuda_header(header: str) -> str:
    """What build_kernel hands MLX as the header: an #include of a content-named file holding
    it (written once), or the header itself when short, disabled or not writable."""
    if not INCLUDE_HEADERS or len(header) < _INCLUDE_MIN:
        return header
    try:
        path = os.path.join(_include_dir(), hashlib.sha1(header.encode()).hexdigest()[:20] + ".cuh")
        if '"' in path or "\\" in path:
            return header
        if not os.path.exists(path):
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                f.write(header)
            os.replace(tmp, path)  # atomic: a concurrent process never reads half a file
        return f'#include "{path}"\n'
    except OSError as e:
        print(f"note: kernel header passed inline ({e}); each launch hashes it", file=sys.stderr)
        return header


def build_kernel(spec: KernelSpec):
    """The MLX kernel object for a spec (cuda_kernel raises without CUDA: call lazily)."""
    if spec.backend == "cuda":
        return mx.fast.cuda_kernel(
            name=spec.name,
            input_names=list(spec.input_names),
            output_names=list(spec.output_names),
            source=spec.source,
            header=cuda_header(spec.header),
            ensure_row_contiguous=spec.ensure_row_contiguous,
            shared_memory=spec.shared_memory,
        )
    if spec.backend == "metal":
        return mx.fast.metal_kernel(
            name=spec.name,
            input_names=list(spec.input_names),
            output_names=list(spec.output_names),
            source=spec.source,
            header=spec.header,
            ensure_row_contiguous=spec.ensure_row_contiguous,
        )
    raise ValueError(f"no custom kernels on back-end {spec.backend!r}")


def run(spec: KernelSpec, launch: Launch) -> list[mx.array]:
    """Build the kernel object once per spec (lazily: cuda_kernel raises without CUDA), then call it."""
    kernel = _KERNELS.get(spec)
    if kernel is None:
        kernel = _KERNELS[spec] = build_kernel(spec)
    kwargs = dict(
        inputs=launch.inputs,
        output_shapes=launch.output_shapes,
        output_dtypes=launch.output_dtypes,
        grid=launch.grid,
        threadgroup=launch.threadgroup,
        template=launch.template or None,
    )
    if launch.init_value is not None:
        kwargs["init_value"] = launch.init_value
    return kernel(**kwargs)
