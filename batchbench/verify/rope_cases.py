"""The q/k/v split + RoPE kernel (batchbench.kernels.rope) on small inputs, with float64
NumPy expectations; same `Case` protocol as cases.py."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from batchbench.kernels import rope as R
from batchbench.verify.cases import Case, Executor, _f64
from batchbench.verify.emulate import to_numpy

# Half an ulp of the output dtype, relative to the largest output (|rotated| <= sqrt(2) max|x|).
ROUND_TOL = {mx.float16: 2.0**-11 * 1.5, mx.bfloat16: 2.0**-8 * 1.5, mx.float32: 2.0**-24 * 4}


def rope_reference(
    qkv: np.ndarray, positions: np.ndarray, *, n_heads: int, n_kv_heads: int, head_dim: int,
    base: float, scale: float, traditional: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 q [1, Hq, T, D], k [1, Hkv, T, D] (rotated), v [1, Hkv, T, D] from qkv [1, T, W]."""
    t, d, p = qkv.shape[1], head_dim, head_dim // 2
    x = qkv.astype(np.float64).reshape(t, n_heads + 2 * n_kv_heads, d)
    theta = (scale * positions.astype(np.float64))[:, None] * float(base) ** (-2.0 * np.arange(p) / d)
    c, s = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
    lo, hi = (slice(0, d, 2), slice(1, d, 2)) if traditional else (slice(0, p), slice(p, d))
    y = x.copy()
    qk = slice(0, n_heads + n_kv_heads)
    a, b = x[:, qk, lo], x[:, qk, hi]
    y[:, qk, lo], y[:, qk, hi] = a * c - b * s, a * s + b * c
    y = y.transpose(1, 0, 2)[None]
    return y[:, :n_heads], y[:, n_heads : n_heads + n_kv_heads], y[:, n_heads + n_kv_heads :]


def rope_tolerance(x: np.ndarray, positions: np.ndarray, scale: float, dtype) -> float:
    """Output rounding plus the fp32 angle error: theta carries a few ulp of |scale * pos|
    (the rotation by position 1e5 is only known to ~1e-2 rad in fp32, in MLX's kernels too)."""
    angle = 4 * 2.0**-24 * float(np.abs(scale * positions.astype(np.float64)).max(initial=0.0)) + 1e-6
    return float(np.abs(x).max()) * (np.sqrt(2) * angle + ROUND_TOL[dtype])


def rope_case(
    rng: np.random.Generator,
    *,
    t: int,
    dtype=mx.float16,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    head_dim: int = 64,
    traditional: bool = False,
    base: float = 10000.0,
    scale: float = 1.0,
    max_pos: int = 100000,
    store_cells: int = 0,
) -> Case:
    """qkv_rope's CUDA kernel on random qkv and random (non-contiguous) positions.
    store_cells > 0: the storing variant, writing k and v into random cache buffers of that
    many cells at random distinct cells (the other cells must stay as they were)."""
    width = (n_heads + 2 * n_kv_heads) * head_dim
    qkv = mx.array(rng.standard_normal((1, t, width)).astype(np.float32)).astype(dtype)
    pos = rng.choice(max_pos, size=t, replace=False).astype(np.int32)
    kw = dict(n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, base=base, scale=scale,
              traditional=traditional)
    x = _f64(qkv)
    q_ref, k_ref, v_ref = rope_reference(x, pos, **kw)
    store = None
    if store_cells:
        shape = (1, n_kv_heads, store_cells, head_dim)
        bufs = [mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype) for _ in range(2)]
        cells = rng.choice(store_cells, size=t, replace=False).astype(np.int32)
        store = (mx.array(cells), *bufs)
        after = [_f64(b).copy() for b in bufs]
        after[0][:, :, cells] = k_ref
        after[1][:, :, cells] = v_ref
        want = np.concatenate([q_ref.ravel(), after[0].ravel(), after[1].ravel()])
    else:
        want = np.concatenate([a.ravel() for a in (q_ref, k_ref, v_ref)])
    kspec, launch = R.plan_qkv_rope(qkv, mx.array(pos), store=store, **kw)

    def run(execute: Executor) -> np.ndarray:
        outs, after = execute(kspec, launch)
        if store_cells:  # the cache buffers after the run (the emulator gives storage bits)
            outs = [outs[0]] + [_values(after[i], dtype) for i in (3, 4)]
        return np.concatenate([o.astype(np.float64).ravel() for o in outs])

    name = (
        f"rope-cuda-{'bf16' if dtype == mx.bfloat16 else 'fp16'}-D{head_dim}-Hq{n_heads}-Hkv{n_kv_heads}"
        f"-T{t}-{'trad' if traditional else 'half'}-pos{max_pos}"
        f"{f'-store{store_cells}' if store_cells else ''}"
    )
    return Case(name, [(kspec, launch)], run, want, rope_tolerance(x, pos, scale, dtype))


def _values(a: np.ndarray, dtype) -> np.ndarray:
    return to_numpy(a, dtype) if a.dtype == np.uint16 and dtype == mx.bfloat16 else a


def rope_cases(rng: np.random.Generator, quick: bool = False) -> list[Case]:
    """fp16/bf16 x traditional/half-split x T in {1, 5}, GQA; plus odd shapes (D 80 with a
    partial block, large base and linear scaling, small positions: tight angle tolerance)."""
    specs = [
        dict(t=t, dtype=dt, traditional=trad)
        for dt in (mx.float16, mx.bfloat16)
        for trad in (False, True)
        for t in (1, 5)
    ]
    # the storing variant (decode K/V write in place), one case in the quick set too
    specs.append(dict(t=5, dtype=mx.bfloat16, n_heads=8, n_kv_heads=2, head_dim=128, store_cells=37))
    if quick:
        specs = specs[::3] + specs[-1:]
    else:
        specs += [
            dict(t=3, dtype=mx.bfloat16, n_heads=7, n_kv_heads=1, head_dim=80, base=1e6, scale=0.25),
            dict(t=5, dtype=mx.float16, head_dim=128, traditional=True, max_pos=64),
            dict(t=1, dtype=mx.float16, n_heads=7, n_kv_heads=1, head_dim=64, store_cells=40),
        ]
    return [rope_case(rng, **s) for s in specs]
