"""Kernel descriptions shared by the MLX launchers and the CPU verification harness.

A kernel is a `KernelSpec` (what MLX compiles) plus a `Launch` (one call's inputs and
geometry). Keeping both as plain data lets `batchbench.verify` compile and emulate the
exact source MLX would run, without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx


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


def build_kernel(spec: KernelSpec):
    """The MLX kernel object for a spec (cuda_kernel raises without CUDA: call lazily)."""
    if spec.backend == "cuda":
        return mx.fast.cuda_kernel(
            name=spec.name,
            input_names=list(spec.input_names),
            output_names=list(spec.output_names),
            source=spec.source,
            header=spec.header,
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
