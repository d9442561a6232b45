"""The exact kernel source MLX 0.32 compiles for a `KernelSpec` + `Launch`.

Metal: `mlx/backend/common/metal_kernel.cpp` (`write_signature`, `write_template`,
`make_template_hash`); MLX prepends `metal::utils()` (metal_stdlib, `using namespace metal`,
float16_t/bfloat16_t) when it builds the library. On Linux `traced_metal_source` gets the
same text from MLX itself (tracing under `mx.export_function` with verbose=True), which the
tests compare against this reconstruction.

CUDA: `mlx/backend/cuda/custom_kernel.cpp` (`build_kernel`, `template_arguments_hash`) and
`dtype_to_cuda_type` in `mlx/backend/cuda/utils.cpp`. It cannot be traced without CUDA.
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np

from batchbench.kernels.spec import KernelSpec, Launch, build_kernel

# Metal and the kernel name use get_type_string(); CUDA signatures use dtype_to_cuda_type().
_TYPES: dict[Any, tuple[str, str, Any]] = {
    # mx dtype: (metal/get_type_string, cuda, numpy storage dtype)
    mx.float32: ("float", "float", np.float32),
    mx.float16: ("float16_t", "__half", np.float16),
    mx.bfloat16: ("bfloat16_t", "__nv_bfloat16", np.uint16),
    mx.float64: ("double", "double", np.float64),
    mx.bool_: ("bool", "bool", np.bool_),
    mx.int8: ("int8_t", "int8_t", np.int8),
    mx.int16: ("int16_t", "int16_t", np.int16),
    mx.int32: ("int32_t", "int32_t", np.int32),
    mx.int64: ("int64_t", "int64_t", np.int64),
    mx.uint8: ("uint8_t", "uint8_t", np.uint8),
    mx.uint16: ("uint16_t", "uint16_t", np.uint16),
    mx.uint32: ("uint32_t", "uint32_t", np.uint32),
    mx.uint64: ("uint64_t", "uint64_t", np.uint64),
}

_NP_TO_MX = {
    np.dtype(np.float32): mx.float32,
    np.dtype(np.float16): mx.float16,
    np.dtype(np.float64): mx.float64,
    np.dtype(np.bool_): mx.bool_,
    np.dtype(np.int8): mx.int8,
    np.dtype(np.int16): mx.int16,
    np.dtype(np.int32): mx.int32,
    np.dtype(np.int64): mx.int64,
    np.dtype(np.uint8): mx.uint8,
    np.dtype(np.uint16): mx.uint16,
    np.dtype(np.uint32): mx.uint32,
    np.dtype(np.uint64): mx.uint64,
}

MAX_CONSTANT_ARRAY_SIZE = 8  # Metal: inputs with fewer elements go to the constant space

# Metal built-in attributes MLX adds when their name occurs in `source`, in MLX's order.
METAL_ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
)


def type_string(dtype) -> str:
    """MLX's get_type_string (Metal types, kernel names)."""
    try:
        return _TYPES[dtype][0]
    except KeyError:
        raise ValueError(f"unsupported kernel dtype {dtype}") from None


def cuda_type(dtype) -> str:
    """MLX's dtype_to_cuda_type."""
    try:
        return _TYPES[dtype][1]
    except KeyError:
        raise ValueError(f"unsupported kernel dtype {dtype}") from None


def storage_dtype(dtype) -> np.dtype:
    return np.dtype(_TYPES[dtype][2])


@dataclass
class KernelInput:
    """One kernel input as MLX would pass it (after `ensure_row_contiguous`)."""

    name: str
    dtype: Any  # mx.Dtype
    shape: tuple[int, ...]
    strides: tuple[int, ...]  # in elements, as MLX passes `_strides`
    data: np.ndarray  # flat storage (bf16 as uint16), laid out per `strides`

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


def _row_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= s
    return tuple(reversed(strides))


def _from_mx(name: str, a: mx.array, row_contiguous: bool) -> KernelInput:
    dtype = a.dtype
    if dtype not in _TYPES:
        raise ValueError(f"input {name!r}: unsupported dtype {dtype}")
    shape = tuple(int(s) for s in a.shape)
    if not row_contiguous:
        # MLX passes the array's own strides when it does not copy; mirror its memory.
        src = a.view(mx.uint16) if dtype == mx.bfloat16 else a
        view = np.asarray(memoryview(src))
        if not view.flags.c_contiguous and view.size > 0:
            item = view.itemsize
            strides = tuple(int(s) // item for s in view.strides)
            if any(s < 0 for s in strides):
                raise ValueError(f"input {name!r}: negative strides are not supported")
            extent = 1 + sum((n - 1) * s for n, s in zip(shape, strides))
            flat = np.lib.stride_tricks.as_strided(view, shape=(extent,), strides=(item,))
            return KernelInput(name, dtype, shape, strides, np.array(flat))
    data = np.array(a.view(mx.uint16) if dtype == mx.bfloat16 else a, copy=True)
    data = np.ascontiguousarray(data).reshape(-1)
    return KernelInput(name, dtype, shape, _row_strides(shape), data)


def normalize_inputs(spec: KernelSpec, launch: Launch) -> list[KernelInput]:
    """Inputs as MLX sees them: Python scalars become 0-d int32/float32/bool arrays."""
    if len(launch.inputs) != len(spec.input_names):
        raise ValueError(
            f"{spec.name}: {len(spec.input_names)} input names but {len(launch.inputs)} inputs"
        )
    out = []
    for name, x in zip(spec.input_names, launch.inputs):
        if isinstance(x, bool):
            x = mx.array(x, dtype=mx.bool_)
        elif isinstance(x, int):
            x = mx.array(x, dtype=mx.int32)
        elif isinstance(x, float):
            x = mx.array(x, dtype=mx.float32)
        elif isinstance(x, np.ndarray):
            if x.dtype not in _NP_TO_MX:
                raise ValueError(f"input {name!r}: unsupported numpy dtype {x.dtype}")
            x = mx.array(x)
        if not isinstance(x, mx.array):
            raise ValueError(f"input {name!r}: expected mx.array or scalar, got {type(x).__name__}")
        out.append(_from_mx(name, x, spec.ensure_row_contiguous))
    return out


def _template_args(launch: Launch) -> list[tuple[str, Any]]:
    args = []
    for name, value in launch.template or []:
        if isinstance(value, bool):
            args.append((name, bool(value)))
        elif isinstance(value, int):
            args.append((name, int(value)))
        elif isinstance(value, mx.Dtype):
            args.append((name, value))
        else:
            raise ValueError(f"template {name!r}: must be mx.Dtype, int or bool, not {value!r}")
    return args


def shape_infos(spec: KernelSpec) -> list[tuple[bool, bool, bool]]:
    """Which of name_shape / name_strides / name_ndim MLX adds (substring test on source)."""
    return [
        (f"{n}_shape" in spec.source, f"{n}_strides" in spec.source, f"{n}_ndim" in spec.source)
        for n in spec.input_names
    ]


@dataclass
class Generated:
    """What MLX compiles for one call, plus what the emulator's launcher needs."""

    backend: str
    kernel_name: str  # Metal: host_name; CUDA: unqualified function name
    source: str  # exactly what MLX generates (Metal: without the metal::utils() preamble)
    inputs: list[KernelInput]
    shape_infos: list[tuple[bool, bool, bool]]
    output_names: list[str]
    output_dtypes: list[Any]
    template: list[tuple[str, Any]]
    attributes: list[str] = field(default_factory=list)  # Metal built-ins, in signature order
    template_call: str = ""  # Metal: "<float16_t, 32, 0>" (write_template)


def _metal_template_def(targs: list[tuple[str, Any]]) -> str:
    parts = []
    for _, v in targs:
        if isinstance(v, bool):
            parts.append("1" if v else "0")  # std::ostream << bool
        elif isinstance(v, int):
            parts.append(str(v))
        else:
            parts.append(type_string(v))
    return "<" + ", ".join(parts) + ">"


def _metal_template_hash(template_def: str) -> str:
    out, i = [], 0
    while i < len(template_def):
        c = template_def[i]
        if c in "<>-":  # '-' (negative ints): MLX 0.32.4, found by the trace test
            out.append("_")
        elif c == "," and i + 1 < len(template_def) and template_def[i + 1] == " ":
            out.append("_")
            i += 1
        else:
            out.append(c)
        i += 1
    return "".join(out)[:-1]


def metal_source(spec: KernelSpec, launch: Launch, atomic_outputs: bool = False) -> Generated:
    inputs = normalize_inputs(spec, launch)
    targs = _template_args(launch)
    infos = shape_infos(spec)
    attrs = [a for a, _ in METAL_ATTRIBUTES if a in spec.source]
    attr_types = dict(METAL_ATTRIBUTES)

    name = "custom_kernel_" + spec.name
    template_def = ""
    if targs:
        template_def = _metal_template_def(targs)
        name += "_" + _metal_template_hash(template_def)
    for x in inputs:
        name += "_" + type_string(x.dtype)
        if x.ndim == 0:
            name += "s"
        elif x.size < MAX_CONSTANT_ARRAY_SIZE:
            name += "c"
    for d in launch.output_dtypes:
        name += "_" + type_string(d)

    src = [spec.header]
    if targs:
        kinds = ["bool" if isinstance(v, bool) else "int" if isinstance(v, int) else "typename"
                 for _, v in targs]
        src.append("template <" + ", ".join(f"{k} {n}" for k, (n, _) in zip(kinds, targs)) + ">\n")
    src.append(f"[[kernel]] void {name}(\n")
    index = 0
    for x, (has_shape, has_strides, has_ndim) in zip(inputs, infos):
        location = "constant" if x.size < MAX_CONSTANT_ARRAY_SIZE else "device"
        ref = "&" if x.ndim == 0 else "*"
        src.append(f"  const {location} {type_string(x.dtype)}{ref} {x.name} [[buffer({index})]],\n")
        index += 1
        if x.ndim > 0:
            if has_shape:
                src.append(f"  const constant int* {x.name}_shape [[buffer({index})]],\n")
                index += 1
            if has_strides:
                src.append(f"  const constant int64_t* {x.name}_strides [[buffer({index})]],\n")
                index += 1
            if has_ndim:
                src.append(f"  const constant int& {x.name}_ndim [[buffer({index})]],\n")
                index += 1
    n_out = len(spec.output_names)
    for oname, odt in zip(spec.output_names, launch.output_dtypes):
        t = type_string(odt)
        t = f"atomic<{t}>" if atomic_outputs else t
        src.append(f"  device {t}* {oname} [[buffer({index})]]")
        # MLX's test compares the running buffer index with len(inputs) + len(outputs) - 1.
        last = index >= len(inputs) + n_out - 1 and not attrs
        src.append(") {\n" if last else ",\n")
        index += 1
    for i, a in enumerate(attrs):
        src.append(f"  {attr_types[a]} {a} [[{a}]]")
        src.append(") {\n" if i == len(attrs) - 1 else ",\n")
    src.append(spec.source)
    src.append("\n}\n")
    if targs:
        inst = name + template_def
        src.append(
            f'\ntemplate [[host_name("{name}")]] [[kernel]] decltype({inst}) {inst};\n'
        )
    return Generated(
        backend="metal",
        kernel_name=name,
        source="".join(src),
        inputs=inputs,
        shape_infos=infos,
        output_names=list(spec.output_names),
        output_dtypes=list(launch.output_dtypes),
        template=targs,
        attributes=attrs,
        template_call=template_def,
    )


_CUDA_DEFAULT_HEADER = (
    '\n#include "mlx/backend/cuda/device/utils.cuh"\n\n#include <cooperative_groups.h>\n\n'
)


def cuda_source(spec: KernelSpec, launch: Launch) -> Generated:
    inputs = normalize_inputs(spec, launch)
    targs = _template_args(launch)
    infos = shape_infos(spec)
    if not spec.output_names:
        raise ValueError("[custom_kernel] Must specify at least one output.")

    name = "custom_kernel_" + spec.name
    for _, v in targs:
        if isinstance(v, bool):
            name += "_t" if v else "_f"
        elif isinstance(v, int):
            name += f"_{v}"
        else:
            name += "_" + type_string(v)

    src = [_CUDA_DEFAULT_HEADER, spec.header]
    src.append("namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n")
    src.append(f"__global__ void {name}(\n")
    for x, (has_shape, has_strides, has_ndim) in zip(inputs, infos):
        src.append(f"    const {cuda_type(x.dtype)}* {x.name},\n")
        if x.ndim > 0:
            if has_shape:
                src.append(f"    const __grid_constant__ Shape {x.name}_shape,\n")
            if has_strides:
                src.append(f"    const __grid_constant__ Strides {x.name}_strides,\n")
            if has_ndim:
                src.append(f"    const __grid_constant__ int {x.name}_ndim,\n")
    for i, (oname, odt) in enumerate(zip(spec.output_names, launch.output_dtypes)):
        src.append(f"    {cuda_type(odt)}* {oname}")
        src.append(",\n" if i < len(spec.output_names) - 1 else ") {\n")
    if targs:
        for n, v in targs:
            if isinstance(v, bool):
                src.append(f"  constexpr bool {n} = {'true' if v else 'false'};\n")
            elif isinstance(v, int):
                src.append(f"  constexpr int {n} = {v};\n")
            else:
                src.append(f"  using {n} = {cuda_type(v)};\n")
        src.append("\n")
    src.append(spec.source)
    src.append("\n}\n\n} // namespace mlx::core::cu\n")
    return Generated(
        backend="cuda",
        kernel_name=name,
        source="".join(src),
        inputs=inputs,
        shape_infos=infos,
        output_names=list(spec.output_names),
        output_dtypes=list(launch.output_dtypes),
        template=targs,
    )


def generate(spec: KernelSpec, launch: Launch) -> Generated:
    if spec.backend == "metal":
        return metal_source(spec, launch)
    if spec.backend == "cuda":
        return cuda_source(spec, launch)
    raise ValueError(f"no generated source for back-end {spec.backend!r}")


def traced_metal_source(spec: KernelSpec, launch: Launch) -> str:
    """MLX's own generated Metal source, captured from its verbose print while tracing the
    call under `mx.export_function` (works without a Metal device)."""
    if spec.backend != "metal":
        raise ValueError(f"traced_metal_source needs a Metal kernel spec, got {spec.backend!r}")
    kernel = build_kernel(spec)
    arrays = [x for x in launch.inputs if isinstance(x, mx.array)]
    slots = [i for i, x in enumerate(launch.inputs) if isinstance(x, mx.array)]

    def call(*args):
        ins = list(launch.inputs)
        for i, a in zip(slots, args):
            ins[i] = a
        return kernel(
            inputs=ins,
            output_shapes=launch.output_shapes,
            output_dtypes=launch.output_dtypes,
            grid=launch.grid,
            threadgroup=launch.threadgroup,
            template=launch.template or None,
            verbose=True,
        )

    if not arrays:
        raise ValueError("tracing needs at least one mx.array input")
    with tempfile.TemporaryDirectory() as d:
        captured = _capture_fd1(lambda: mx.export_function(os.path.join(d, "k.mlxfn"), call, *arrays))
    start = captured.find("```\n")
    end = captured.rfind("\n```")
    if start < 0 or end <= start:
        raise RuntimeError(f"no generated source in MLX's output: {captured[:200]!r}")
    return captured[start + 4 : end]


def _capture_fd1(fn) -> str:
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 1)
        try:
            fn()
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        tmp.seek(0)
        return tmp.read().decode("utf-8", errors="replace")
