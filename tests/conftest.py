"""Fixtures shared by the kernel dispatch tests."""

import mlx.core as mx
import pytest

from batchbench import backend
from batchbench.kernels import spec as kspec


@pytest.fixture
def cuda_dispatch(monkeypatch):
    """BACKEND forced to cuda; spec.run records the plans and returns zero outputs."""
    calls = []

    def fake_run(ks, launch):
        calls.append((ks, launch))
        return [mx.zeros(shape, dt) for shape, dt in zip(launch.output_shapes, launch.output_dtypes)]

    monkeypatch.setattr(backend, "BACKEND", "cuda")
    monkeypatch.setattr(kspec, "run", fake_run)
    return calls
