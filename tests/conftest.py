"""Fixtures and helpers shared by the kernel tests."""

import mlx.core as mx
import pytest

from batchbench import backend
from batchbench.kernels import spec as kspec
from batchbench.verify import EmulationError, toolchain
from batchbench.verify.compile import check_all
from batchbench.verify.emulate import prebuild


@pytest.fixture
def cuda_dispatch(monkeypatch):
    """BACKEND forced to cuda; spec.run records the plans and returns zero outputs."""
    calls = []

    def fake_run(ks, launch):
        calls.append((ks, launch))
        return [mx.zeros(shape, dt) for shape, dt in zip(launch.output_shapes, launch.output_dtypes)]

    monkeypatch.setattr(backend, "BACKEND", "cuda")
    monkeypatch.setattr(kspec, "run", fake_run)
    monkeypatch.setenv("BATCHBENCH_SMEM_KB", "227")  # an H200's shared memory a block (the CPU reports none)
    return calls


def emulated(cases: list) -> list:
    """Cases ready to emulate: host compiler required, every kernel built up front."""
    toolchain.need(toolchain.host_cxx)
    prebuild([kl for c in cases for kl in c.kernels])
    return cases


def verify_emulated(case, seed: int) -> float:
    """Emulate a case against its float64 expectation; a failure names the case and the seed."""
    try:
        err, _ = case.verify()
    except EmulationError as e:
        pytest.fail(f"{case.name} (seed {seed}): {e}")
    except AssertionError as e:
        pytest.fail(f"{e} (seed {seed})")
    return err


def assert_compile_for_sm90a(items: list) -> None:
    """nvcc -arch=sm_90a builds every (spec, launch) to SASS without register spills and
    without pulling in host headers (MLX compiles with NVRTC, which has none)."""
    toolchain.need(toolchain.nvcc)
    for r in check_all(items):
        assert r.ok, f"{r.kernel_name} does not compile for sm_90a:\n{r.log}"
        assert r.spill_stores == 0, f"{r.kernel_name} spills registers:\n{r.log}"
        host_headers = [w for w in r.warnings if "host header" in w]
        assert not host_headers, "\n".join(host_headers)


def qmm_setting_read(var: str, value: str | None, expr: str) -> list[str]:
    """`expr` printed by a fresh interpreter that imports qmm with the environment variable `var`
    set to `value` (None: unset): settings are read once, at the first import."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != var}
    if value is not None:
        env[var] = value
    r = subprocess.run([sys.executable, "-c", f"from batchbench.kernels import qmm; print({expr})"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()
