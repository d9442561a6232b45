"""Compile checks of the exact generated sources, without the target hardware.

Metal: clang++ in C++17 mode, syntax and types only, against the metal_stdlib stand-in and
MLX's preamble (stubs/). Catches syntax errors, undeclared names, wrong argument counts and
types, template errors in the instantiated kernel. Cannot catch address-space errors,
Metal-only restrictions (no recursion, no function pointers...) or Metal-compiler limits.

CUDA: nvcc for sm_90a, to a cubin, so ptxas also checks the inline PTX (mma, ldmatrix,
cp.async, ...), and reports registers and spills. MLX compiles with NVRTC and
`--device-as-default-execution-space`; nvcc does not, so helpers need `__device__`
(stricter than MLX), and nvcc finds host headers NVRTC may not (`#include` of system
headers is flagged as a warning).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from batchbench.kernels.spec import KernelSpec, Launch
from batchbench.verify import rewrite, source, toolchain

# Headers a kernel may include under NVRTC (CUDA's own include tree and MLX's JIT headers).
_NVRTC_OK = re.compile(
    r"^(cuda_\w+\.h|cooperative_groups(/\w+)?\.h|mma\.h|cuda/.*|mlx/backend/cuda/device/.*|"
    r"math_constants\.h|vector_types\.h|crt/.*|cuda\.h|cuda_runtime\.h|sm_\w+\.h)$"
)


SM90_MAX_SMEM = 232448  # bytes of shared memory per block (opt-in maximum, H100/H200)


@dataclass
class CompileResult:
    backend: str
    kernel_name: str
    ok: bool
    command: list[str]
    log: str
    warnings: list[str] = field(default_factory=list)
    registers: int | None = None  # CUDA: per thread
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack_bytes: int | None = None
    static_smem: int | None = None  # CUDA: bytes of __shared__ (ptxas), besides the dynamic

    def summary(self) -> str:
        s = f"{self.backend}:{self.kernel_name} {'ok' if self.ok else 'FAILED'}"
        if self.registers is not None:
            s += f" regs={self.registers} spills={self.spill_stores}/{self.spill_loads}"
        return s


class CompileError(AssertionError):
    pass


def _workdir(tag: str, text: str) -> Path:
    h = hashlib.sha256(text.encode()).hexdigest()[:20]
    d = toolchain.cache_dir() / "compile" / f"{tag}-{h}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def metal_unit(spec: KernelSpec, launch: Launch) -> tuple[source.Generated, str]:
    """The translation unit the Metal check compiles: MLX preamble + generated source."""
    gen = source.metal_source(spec, launch)
    unit = '#include "mlx_metal_preamble.h"\n' + rewrite.instantiation_fix(gen.source)
    return gen, unit


@dataclass
class _Job:
    backend: str
    kernel_name: str
    cmd: list[str]
    includes_from: str  # kernel text whose #includes are linted (CUDA)
    dynamic_smem: int = 0


def _metal_job(spec: KernelSpec, launch: Launch, extra_flags: tuple[str, ...] = ()) -> _Job:
    gen, unit = metal_unit(spec, launch)
    inc = toolchain.include_tree("metal")
    d = _workdir("metal", unit)
    path = d / f"{gen.kernel_name[:80]}.metal.cpp"
    path.write_text(unit)
    cmd = [
        toolchain.clang(), "-x", "c++", "-std=c++17", "-fsyntax-only", f"-I{inc}",
        "-Wall", "-Wno-unknown-attributes", "-Wno-unused-variable", "-Wno-unused-function",
        "-Wno-unused-but-set-variable", "-ferror-limit=50", *extra_flags, str(path),
    ]
    return _Job("metal", gen.kernel_name, cmd, "")


def _cuda_job(
    spec: KernelSpec, launch: Launch, arch: str = "sm_90a", extra_flags: tuple[str, ...] = ()
) -> _Job:
    gen = source.cuda_source(spec, launch)
    inc = toolchain.include_tree("nvcc")
    d = _workdir("cuda", gen.source + arch + " ".join(extra_flags))
    path = d / f"{gen.kernel_name[:80]}.cu"
    path.write_text(gen.source)
    cmd = [
        toolchain.nvcc(), "-std=c++17", f"-arch={arch}", "-cubin", "-Xptxas", "-v",
        f"-I{inc}", "-o", str(d / "kernel.cubin"), *extra_flags, str(path),
    ]
    return _Job("cuda", gen.kernel_name, cmd, spec.header + spec.source, int(spec.shared_memory))


def _job(spec: KernelSpec, launch: Launch, **kw) -> _Job:
    if spec.backend == "metal":
        return _metal_job(spec, launch, **kw)
    if spec.backend == "cuda":
        return _cuda_job(spec, launch, **kw)
    raise ValueError(f"no compile check for back-end {spec.backend!r}")


def _run(job: _Job) -> CompileResult:
    p = toolchain.run(job.cmd)
    log = (p.stdout + p.stderr).strip()
    res = CompileResult(job.backend, job.kernel_name, p.returncode == 0, job.cmd, log)
    if job.backend == "metal":
        res.warnings = [ln for ln in log.splitlines() if "warning:" in ln]
        return res
    m = re.search(r"Used (\d+) registers", log)
    if m:
        res.registers = int(m.group(1))
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if m:
        res.stack_bytes, res.spill_stores, res.spill_loads = map(int, m.groups())
    res.warnings = [ln for ln in log.splitlines() if "warning" in ln.lower()]
    m = re.search(r"(\d+) bytes smem", log)
    res.static_smem = int(m.group(1)) if m else 0
    if res.ok and res.static_smem + job.dynamic_smem > SM90_MAX_SMEM:
        res.ok = False
        res.log += (
            f"\nshared memory {res.static_smem} static + {job.dynamic_smem} dynamic bytes exceeds "
            f"the {SM90_MAX_SMEM} bytes a block may use on sm_90: the launch would fail"
        )
    for inc_name in re.findall(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', job.includes_from, re.M):
        if not _NVRTC_OK.match(inc_name):
            res.warnings.append(
                f"#include <{inc_name}>: a host header; MLX compiles with NVRTC, which may not "
                "find it (use <cuda/std/...> or CUDA's own headers)"
            )
    return res


def check_metal(spec: KernelSpec, launch: Launch, extra_flags: tuple[str, ...] = ()) -> CompileResult:
    return _run(_metal_job(spec, launch, extra_flags))


def check_cuda(
    spec: KernelSpec, launch: Launch, arch: str = "sm_90a", extra_flags: tuple[str, ...] = ()
) -> CompileResult:
    return _run(_cuda_job(spec, launch, arch, extra_flags))


def check(spec: KernelSpec, launch: Launch, **kw) -> CompileResult:
    return _run(_job(spec, launch, **kw))


def check_all(items, workers: int | None = None) -> list[CompileResult]:
    """Compile checks of several (spec, launch) pairs, the compilers running in parallel
    (sources are generated on this thread: MLX arrays belong to it)."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = [_job(s, l) for s, l in items]
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 2) as pool:
        return list(pool.map(_run, jobs))


def assert_compiles(spec: KernelSpec, launch: Launch, **kw) -> CompileResult:
    res = check(spec, launch, **kw)
    if not res.ok:
        raise CompileError(f"{res.backend} kernel {res.kernel_name} does not compile:\n{res.log}")
    return res
