"""Finding the compilers, the stub include trees and the build cache.

Compilers: clang++ (Metal check; env BATCHBENCH_CLANG), nvcc (CUDA check; BATCHBENCH_NVCC),
a host C++17 compiler for the emulator (BATCHBENCH_CXX; g++, then c++, then clang++).
Compiled emulator libraries are cached by content hash in BATCHBENCH_VERIFY_CACHE
(default ~/.cache/batchbench/verify).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

STUBS = Path(__file__).parent / "stubs"

# Include trees MLX's sources expect, mapped onto the flat stub files.
_CUDA_EMU_NAMES = (
    "mlx/backend/cuda/device/utils.cuh",
    "cooperative_groups.h",
    "cooperative_groups/reduce.h",
    "cooperative_groups/memcpy_async.h",
    "cuda_fp16.h",
    "cuda_bf16.h",
    "cuda_runtime.h",
    "cuda.h",
    "math_constants.h",
    "cuda/std/array",
    "cuda/std/limits",
    "cuda/std/tuple",
    "cuda/std/cstdint",
    "cuda/std/type_traits",
    "cuda/std/utility",
)
_METAL_NAMES = (
    "metal_math",
    "metal_simdgroup",
    "metal_atomic",
    "metal_compute",
    "metal_integer",
    "metal_common",
    "metal_relational",
)


class ToolchainMissing(RuntimeError):
    """A compiler the check needs is not installed."""


def require_toolchains() -> bool:
    """BATCHBENCH_REQUIRE_TOOLCHAINS=1 (CI): a missing compiler fails instead of skipping."""
    return os.environ.get("BATCHBENCH_REQUIRE_TOOLCHAINS", "") not in ("", "0")


def _which(env: str, names: tuple[str, ...], extra: tuple[str, ...] = ()) -> str | None:
    forced = os.environ.get(env)
    if forced:
        return forced if shutil.which(forced) else None
    for n in names:
        p = shutil.which(n)
        if p:
            return p
    for p in extra:
        if os.access(p, os.X_OK):
            return p
    return None


def clang() -> str:
    p = _which("BATCHBENCH_CLANG", ("clang++", "clang++-19", "clang++-18", "clang++-17",
                                     "clang++-16", "clang++-15", "clang++-14"))
    if not p:
        raise ToolchainMissing("clang++ not found (apt-get install clang, or set BATCHBENCH_CLANG)")
    return p


def nvcc() -> str:
    p = _which("BATCHBENCH_NVCC", ("nvcc",), ("/usr/local/bin/nvcc", "/usr/local/cuda/bin/nvcc"))
    if not p:
        raise ToolchainMissing("nvcc not found (install the CUDA toolkit, or set BATCHBENCH_NVCC)")
    return p


def host_cxx() -> str:
    p = _which("BATCHBENCH_CXX", ("g++", "c++", "clang++"))
    if not p:
        raise ToolchainMissing("no host C++ compiler (g++/clang++) for the emulator")
    return p


@lru_cache(maxsize=None)
def tool_version(path: str) -> str:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
        return (out.stdout or out.stderr).strip().splitlines()[-1 if "nvcc" in path else 0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def cache_dir() -> Path:
    d = Path(os.environ.get("BATCHBENCH_VERIFY_CACHE") or Path.home() / ".cache/batchbench/verify")
    d.mkdir(parents=True, exist_ok=True)
    return d


def stubs_digest() -> str:
    h = hashlib.sha256()
    for f in sorted(STUBS.iterdir()):
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _write_atomic(path: Path, data: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(data)
    os.replace(tmp, path)


@lru_cache(maxsize=None)
def include_tree(kind: str) -> Path:
    """A directory of headers laid out the way the kernel sources include them.

    kind: "nvcc" (MLX's utils.cuh stand-in over the real CUDA headers), "cuda-emu" (CUDA on
    the CPU), "metal" (metal_stdlib stand-in, for the clang check and the emulator).
    """
    root = cache_dir() / f"include-{kind}-{stubs_digest()}"
    if (root / ".done").exists():
        return root
    if kind == "nvcc":
        _write_atomic(root / "mlx/backend/cuda/device/utils.cuh",
                      (STUBS / "mlx_cuda_utils.cuh").read_text())
    elif kind == "cuda-emu":
        for f in ("simt.h", "bbfloat.h", "cuda_emu.h"):
            _write_atomic(root / f, (STUBS / f).read_text())
        for name in _CUDA_EMU_NAMES:
            _write_atomic(root / name, '#pragma once\n#include "cuda_emu.h"\n')
    elif kind == "metal":
        for f in ("simt.h", "bbfloat.h", "metal_stdlib", "mlx_metal_preamble.h"):
            _write_atomic(root / f, (STUBS / f).read_text())
        for name in _METAL_NAMES + ("metal_simdgroup_matrix",):
            _write_atomic(root / name, "#pragma once\n#include <metal_stdlib>\n")
    else:
        raise ValueError(kind)
    (root / ".done").write_text("")
    return root


def run(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def need(getter) -> str:
    """For tests: the tool's path, or skip (fail under BATCHBENCH_REQUIRE_TOOLCHAINS=1)."""
    try:
        return getter()
    except ToolchainMissing as e:
        import pytest

        if require_toolchains():
            pytest.fail(f"{e} -- BATCHBENCH_REQUIRE_TOOLCHAINS is set, so this is an error")
        pytest.skip(str(e))
