"""Run the exact generated kernel source on the CPU (SIMT emulation, stubs/simt.h).

The generated source (see source.py), with BB_PORTABLE and BB_EMU defined and the shared
memory rewrite of rewrite.py, is compiled with a host C++ compiler into a shared library
together with a launcher, and called through ctypes on numpy copies of the inputs. Every
buffer sits against a guard page (out-of-bounds accesses stop the run with the buffer's
name); outputs start as 0xff bytes (NaN) unless `init_value` is set, as MLX leaves them
uninitialised. By default each launch runs under two schedules (threads and blocks in
forward and in reverse order) and the outputs must agree bit for bit: a missing barrier or
an unsynchronised cross-thread read makes them differ (RaceError).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import mlx.core as mx
import numpy as np

from batchbench.kernels.spec import KernelSpec, Launch
from batchbench.verify import rewrite, source, toolchain

SCHEDULES = {"forward": 0, "reverse": 1, "random": 2}
_META_STRIDE = 21  # per input: ndim, shape[10], strides[10]


class EmulationError(AssertionError):
    """The kernel did something the GPU would not survive or define (message says what)."""


class RaceError(EmulationError):
    """Outputs depend on the thread schedule: a missing barrier or unsynchronised access."""


class _Cfg(ctypes.Structure):
    _fields_ = [
        ("grid", ctypes.c_int64 * 3),
        ("tg", ctypes.c_int64 * 3),
        ("dialect", ctypes.c_int64),
        ("schedule", ctypes.c_int64),
        ("seed", ctypes.c_int64),
        ("strict", ctypes.c_int64),
        ("cpu_limit_s", ctypes.c_int64),
        ("stack_kb", ctypes.c_int64),
    ]


@dataclass
class EmuResult:
    outputs: list[np.ndarray]  # per output: fp16 as float16, bf16 as float32, others as is
    raw_outputs: list[np.ndarray]  # storage dtype (bf16 as uint16 bits)
    inputs_after: list[np.ndarray]  # input buffers after the run (kernels may write them)
    unwritten: dict[str, int] = field(default_factory=dict)  # elements still 0xff-poisoned
    schedules: list[str] = field(default_factory=list)
    kernel_name: str = ""

    def __getitem__(self, i: int) -> np.ndarray:
        return self.outputs[i]


def _launcher(gen: source.Generated) -> str:
    """C++ glue: unpack buffers and shapes, call the kernel from every emulated thread.

    `meta` holds, per input, ndim then shape[10] then strides[10] (MLX's MAX_NDIM)."""
    cuda = gen.backend == "cuda"
    tname = source.cuda_type if cuda else source.type_string
    # CUDA gets Shape/Strides by value (cuda::std::array); Metal gets constant pointers.
    shape_t, strides_t, arr = (
        ("mlx::core::cu::Shape", "mlx::core::cu::Strides", "{}") if cuda else ("int", "int64_t", "[10]")
    )
    lines = [
        'extern "C" __attribute__((visibility("default"))) int bbemu_run(',
        "    void** bufs, const int64_t* meta, const bbemu::LaunchCfg* cfg, char* err, int errlen) {",
    ]
    args: list[str] = []
    for i, (x, (has_shape, has_strides, has_ndim)) in enumerate(zip(gen.inputs, gen.shape_infos)):
        o, t = i * _META_STRIDE, tname(x.dtype)
        if x.ndim == 0 and not cuda:  # Metal passes a 0-d input by reference
            lines.append(f"  const {t}& in{i} = *static_cast<const {t}*>(bufs[{i}]);")
        else:
            lines.append(f"  const {t}* in{i} = static_cast<const {t}*>(bufs[{i}]);")
        args.append(f"in{i}")
        if x.ndim == 0:
            continue
        for present, name, typ, off in ((has_shape, "shape", shape_t, 1), (has_strides, "strides", strides_t, 11)):
            if present:
                lines.append(f"  {typ} in{i}_{name}{arr};")
                lines.append(f"  for (int d = 0; d < 10; ++d) in{i}_{name}[d] = meta[{o + off} + d];")
                args.append(f"in{i}_{name}")
        if has_ndim:
            lines.append(f"  const int in{i}_ndim = static_cast<int>(meta[{o}]);")
            args.append(f"in{i}_ndim")
    for j, dt in enumerate(gen.output_dtypes):
        t = tname(dt)
        lines.append(f"  {t}* out{j} = static_cast<{t}*>(bufs[{len(gen.inputs) + j}]);")
        args.append(f"out{j}")
    if cuda:
        call = f"mlx::core::cu::{gen.kernel_name}({', '.join(args)})"
    else:
        args += [f"::bbemu::mattr::{a}()" for a in gen.attributes]
        call = f"{gen.kernel_name}{gen.template_call}({', '.join(args)})"
    lines.append(f"  auto body = [&]() {{ {call}; }};")
    lines.append(
        "  return ::bbemu::launch(*cfg, &::bbemu::call_body<decltype(body)>, &body, err, errlen);"
    )
    lines.append("}")
    return "\n".join(lines) + "\n"


def translation_unit(spec: KernelSpec, launch: Launch) -> tuple[source.Generated, str]:
    """The C++ the emulator compiles for this call."""
    gen = source.generate(spec, launch)
    body = rewrite.for_emulation(gen.source, gen.backend)
    smem = max(int(spec.shared_memory), 16)
    pre = [
        "#define BB_PORTABLE 1",
        "#define BB_EMU 1",
        f"#define BB_DYN_SMEM_BYTES {smem}",
    ]
    if gen.backend == "metal":
        pre.append('#include "mlx_metal_preamble.h"')
    else:
        pre.append('#include "cuda_emu.h"')
    pre.append("#line 1 \"kernel\"")
    return gen, "\n".join(pre) + "\n" + body + "\n#line 1 \"launcher\"\n" + _launcher(gen)


_LIBS: dict[str, ctypes.CDLL] = {}
_GLOBAL_LOCK = threading.Lock()
# One emulation at a time per process: signal handlers and the CPU timer are process-wide.
_RUN_LOCK = threading.Lock()

CXXFLAGS = (
    "-std=c++17", "-O1", "-g0", "-fPIC", "-shared", "-fno-strict-aliasing",
    "-fvisibility=hidden", "-w", "-fno-fast-math", "-ffp-contract=off",
)


def _flags() -> tuple[str, ...]:
    """CXXFLAGS plus BATCHBENCH_VERIFY_CXXFLAGS (e.g. "-O0 -g" to debug a kernel)."""
    return CXXFLAGS + tuple(os.environ.get("BATCHBENCH_VERIFY_CXXFLAGS", "").split())


def _prepare(spec: KernelSpec, launch: Launch):
    gen, unit = translation_unit(spec, launch)
    cxx = toolchain.host_cxx()
    inc = toolchain.include_tree("metal" if gen.backend == "metal" else "cuda-emu")
    key = hashlib.sha256(
        "\0".join([unit, cxx, toolchain.tool_version(cxx), " ".join(_flags()), str(inc)]).encode()
    ).hexdigest()[:24]
    d = toolchain.cache_dir() / "emu"
    d.mkdir(parents=True, exist_ok=True)
    return gen, unit, cxx, inc, d, key


def _compile(gen: source.Generated, unit: str, cxx: str, inc: Path, d: Path, key: str) -> str:
    so = d / f"{key}.so"
    if so.exists():
        return str(so)
    src = d / f"{key}.cpp"
    src.write_text(unit)
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".so")
    os.close(fd)
    cmd = [cxx, *_flags(), f"-I{inc}", "-o", tmp, str(src)]
    p = toolchain.run(cmd)
    if p.returncode != 0:
        os.unlink(tmp)
        raise EmulationError(
            f"emulator build of {gen.kernel_name} failed ({' '.join(cmd)}):\n"
            + _trim(p.stdout + p.stderr)
        )
    os.replace(tmp, so)
    return str(so)


def build(spec: KernelSpec, launch: Launch) -> tuple[source.Generated, str]:
    """Compile (or reuse) the emulator library for this call; returns (generated, path)."""
    prep = _prepare(spec, launch)
    return prep[0], _compile(*prep)


def _trim(log: str, n: int = 6000) -> str:
    return log if len(log) <= n else log[:n] + "\n[...]"


def _load(path: str) -> ctypes.CDLL:
    with _GLOBAL_LOCK:
        lib = _LIBS.get(path)
        if lib is None:
            lib = ctypes.CDLL(path)
            lib.bbemu_alloc.restype = ctypes.c_void_p
            lib.bbemu_alloc.argtypes = [ctypes.c_uint64, ctypes.POINTER(ctypes.c_uint64),
                                        ctypes.POINTER(ctypes.c_void_p)]
            lib.bbemu_free.argtypes = [ctypes.c_void_p, ctypes.c_uint64]
            lib.bbemu_register.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p,
                                           ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint64]
            lib.bbemu_run.restype = ctypes.c_int
            lib.bbemu_run.argtypes = [ctypes.POINTER(ctypes.c_void_p),
                                      ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(_Cfg),
                                      ctypes.c_char_p, ctypes.c_int]
            _LIBS[path] = lib
        return lib


def _fill_value(dtype, value: float) -> np.ndarray:
    if dtype == mx.bfloat16:
        return np.array(mx.array(value, dtype=mx.bfloat16).view(mx.uint16))
    return np.array(value, dtype=source.storage_dtype(dtype))


def to_numpy(raw: np.ndarray, dtype) -> np.ndarray:
    """Storage array -> numpy values (bf16 bits -> float32)."""
    if dtype == mx.bfloat16:
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw


def _run_once(lib, gen: source.Generated, spec: KernelSpec, launch: Launch, schedule: str,
              seed: int, strict: bool, cpu_limit_s: int, stack_kb: int):
    allocs = []  # (map_base, map_size)
    ptrs = []
    names = []  # keep the bytes alive while the C side holds pointers
    try:
        views = []
        for i, x in enumerate(gen.inputs):
            nbytes = x.data.nbytes
            ms, base = ctypes.c_uint64(), ctypes.c_void_p()
            p = lib.bbemu_alloc(max(nbytes, 1), ctypes.byref(ms), ctypes.byref(base))
            if not p:
                raise MemoryError("bbemu_alloc failed")
            allocs.append((base.value, ms.value))
            ctypes.memmove(p, x.data.ctypes.data, nbytes)
            nm = ctypes.c_char_p(f"input {x.name}".encode())
            names.append(nm)
            lib.bbemu_register(i, nm, p, nbytes, base, ms.value)
            ptrs.append(p)
            views.append((p, x.data.dtype, x.data.size))
        outs = []
        for j, (oname, shape, dt) in enumerate(
            zip(gen.output_names, launch.output_shapes, gen.output_dtypes)
        ):
            sd = source.storage_dtype(dt)
            n = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
            nbytes = n * sd.itemsize
            ms, base = ctypes.c_uint64(), ctypes.c_void_p()
            p = lib.bbemu_alloc(max(nbytes, 1), ctypes.byref(ms), ctypes.byref(base))
            if not p:
                raise MemoryError("bbemu_alloc failed")
            allocs.append((base.value, ms.value))
            if launch.init_value is not None:
                arr = np.ctypeslib.as_array((ctypes.c_ubyte * nbytes).from_address(p)).view(sd)
                arr[...] = _fill_value(dt, launch.init_value)
            nm = ctypes.c_char_p(f"output {oname}".encode())
            names.append(nm)
            lib.bbemu_register(len(gen.inputs) + j, nm, p, nbytes, base, ms.value)
            ptrs.append(p)
            outs.append((p, sd, n, tuple(shape), dt))

        meta = np.zeros(_META_STRIDE * max(len(gen.inputs), 1), dtype=np.int64)
        for i, x in enumerate(gen.inputs):
            if x.ndim > 10:
                raise ValueError(f"input {x.name!r}: more than 10 dimensions")
            meta[i * _META_STRIDE] = x.ndim
            meta[i * _META_STRIDE + 1 : i * _META_STRIDE + 1 + x.ndim] = x.shape
            meta[i * _META_STRIDE + 11 : i * _META_STRIDE + 11 + x.ndim] = x.strides
        cfg = _Cfg()
        for d in range(3):
            cfg.grid[d] = int(launch.grid[d])
            cfg.tg[d] = int(launch.threadgroup[d])
        cfg.dialect = 0 if gen.backend == "cuda" else 1
        cfg.schedule = SCHEDULES[schedule]
        cfg.seed = seed
        cfg.strict = 1 if strict else 0
        cfg.cpu_limit_s = cpu_limit_s
        cfg.stack_kb = stack_kb
        bufs = (ctypes.c_void_p * len(ptrs))(*ptrs)
        err = ctypes.create_string_buffer(4096)
        rc = lib.bbemu_run(bufs, meta.ctypes.data_as(ctypes.POINTER(ctypes.c_int64)),
                           ctypes.byref(cfg), err, len(err))
        if rc != 0:
            raise EmulationError(f"{gen.kernel_name} ({schedule} schedule): "
                                 + err.value.decode(errors="replace"))
        raw_outs = []
        for p, sd, n, shape, dt in outs:
            buf = (ctypes.c_ubyte * (n * sd.itemsize)).from_address(p)
            raw_outs.append(np.frombuffer(bytes(buf), dtype=sd).reshape(shape).copy())
        ins_after = []
        for p, dt, n in views:
            buf = (ctypes.c_ubyte * (n * dt.itemsize)).from_address(p)
            ins_after.append(np.frombuffer(bytes(buf), dtype=dt).copy())
        return raw_outs, ins_after
    finally:
        for base, size in allocs:
            lib.bbemu_free(base, size)


def emulate(
    spec: KernelSpec,
    launch: Launch,
    *,
    schedules: Sequence[str] = ("forward", "reverse"),
    seed: int = 0,
    strict: bool = True,
    cpu_limit_s: int = 120,
    stack_kb: int = 256,
) -> EmuResult:
    """Emulate one kernel call; outputs must not depend on the schedule (RaceError)."""
    for s in schedules:
        if s not in SCHEDULES:
            raise ValueError(f"unknown schedule {s!r} (forward, reverse, random)")
    if not schedules:
        raise ValueError("at least one schedule")
    gen, path = build(spec, launch)
    lib = _load(path)
    results = []
    with _RUN_LOCK:
        for s in schedules:
            results.append(_run_once(lib, gen, spec, launch, s, seed, strict, cpu_limit_s, stack_kb))
    raw, ins_after = results[0]
    for s, (other, other_ins) in zip(schedules[1:], results[1:]):
        for x, a, b in zip(gen.inputs, ins_after, other_ins):  # kernels that write their inputs
            if not np.array_equal(a.view(np.uint8), b.view(np.uint8)):
                raise RaceError(
                    f"{gen.kernel_name}: input {x.name!r} after the run differs between the "
                    f"{schedules[0]} and {s} thread schedules"
                )
        for name, a, b in zip(gen.output_names, raw, other):
            if not np.array_equal(a.view(np.uint8), b.view(np.uint8)):
                diff = int(np.count_nonzero(a.reshape(-1).view(np.uint8) != b.reshape(-1).view(np.uint8)))
                raise RaceError(
                    f"{gen.kernel_name}: output {name!r} differs between the {schedules[0]} and "
                    f"{s} thread schedules ({diff} bytes): a missing barrier, or threads "
                    "reading each other's data without synchronisation"
                )
    unwritten = {}
    for name, a in zip(gen.output_names, raw):
        if launch.init_value is None:
            flat = a.reshape(-1).view(np.uint8).reshape(a.size, -1) if a.size else a
            if a.size:
                unwritten[name] = int(np.count_nonzero(np.all(flat == 0xFF, axis=1)))
    outputs = [to_numpy(a, dt) for a, dt in zip(raw, gen.output_dtypes)]
    return EmuResult(outputs, raw, ins_after, unwritten, list(schedules), gen.kernel_name)


def prebuild(kernels: Sequence[tuple[KernelSpec, Launch]], workers: int | None = None) -> None:
    """Compile the emulator libraries of several launches in parallel (compilers release the
    GIL; the cache makes later `emulate` calls start at once). Errors surface in `emulate`."""
    from concurrent.futures import ThreadPoolExecutor

    workers = workers or os.cpu_count() or 2
    preps = [_prepare(s, l) for s, l in kernels]  # MLX arrays: on this thread only
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_compile, *p) for p in preps]
        for f in futures:
            try:
                f.result()
            except EmulationError:
                pass
