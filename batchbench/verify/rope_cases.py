"""The q/k/v split + RoPE kernel (batchbench.kernels.rope) on small inputs, with float64
NumPy expectations; same `Case` protocol as cases.py."""

from __future__ import annotations

from dataclasses import replace

import mlx.core as mx
import numpy as np

from batchbench.kernels import qmm as Q
from batchbench.kernels import rope as R
from batchbench.verify.cases import QMM_RTOL, Case, Executor, _f64, folded_norm, producer_share
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
    paired: bool = False,
) -> Case:
    """qkv_rope's CUDA kernel on random qkv and random (non-contiguous) positions.
    store_cells > 0: the storing variant, writing k and v into random cache buffers of that
    many cells at random distinct cells (the other cells must stay as they were).
    paired: the kernel reads q and k heads in rope_pair_order (the fused projection's order)."""
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
    qkv_in = qkv
    if paired:
        order = mx.array(R.rope_pair_order(n_heads, n_kv_heads, head_dim, traditional), dtype=mx.int32)
        qkv_in = mx.take(qkv, order, axis=-1)
    kspec, launch = R.plan_qkv_rope(qkv_in, mx.array(pos), store=store, paired=paired, **kw)

    def run(execute: Executor) -> np.ndarray:
        outs, after = execute(kspec, launch)
        if store_cells:  # the cache buffers after the run (the emulator gives storage bits)
            outs = [outs[0]] + [_values(after[i], dtype) for i in (3, 4)]
        return np.concatenate([o.astype(np.float64).ravel() for o in outs])

    name = (
        f"rope-cuda-{'bf16' if dtype == mx.bfloat16 else 'fp16'}-D{head_dim}-Hq{n_heads}-Hkv{n_kv_heads}"
        f"-T{t}-{'trad' if traditional else 'half'}-pos{max_pos}"
        f"{f'-store{store_cells}' if store_cells else ''}{'-paired' if paired else ''}"
    )
    return Case(name, [(kspec, launch)], run, want, rope_tolerance(x, pos, scale, dtype))


def _values(a: np.ndarray, dtype) -> np.ndarray:
    return to_numpy(a, dtype) if a.dtype == np.uint16 and dtype == mx.bfloat16 else a


def qmm_rope_case(
    rng: np.random.Generator,
    *,
    m: int,
    dtype=mx.float16,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    head_dim: int = 64,
    k: int = 256,
    bits: int = 4,
    group_size: int = 32,
    traditional: bool = False,
    bias: bool = False,
    norm: bool = False,
    split: int | None = None,
    n_cells: int = 40,
    base: float = 1e6,
    scale: float = 1.0,
    prenorm: bool = False,
    packed: bool = False,
) -> Case:
    """The q/k/v projection with the RoPE + K/V-write epilogue (qmm's RopeStore): weight rows
    in rope_pair_order, against float64 projection + rotation of the rows in their own order;
    the result is q, then both cache buffers (cells not written must keep their values).
    split: K over that many blocks, the epilogue then in the reduce kernel. prenorm (with norm):
    x reaches the kernel as round(x * nw) with its 16-column sums of squares (a PendingNorm).
    packed: the scales and biases as (scale, bias) pairs (`pack_scales_biases`)."""
    width = (n_heads + 2 * n_kv_heads) * head_dim
    w = mx.array(rng.standard_normal((width, k)).astype(np.float32) / np.sqrt(k)).astype(dtype)
    wq, sc, bi = mx.quantize(w, group_size=group_size, bits=bits)
    lb = mx.array(rng.standard_normal((width,)).astype(np.float32)).astype(dtype) if bias else None
    x = mx.array(rng.standard_normal((1, m, k)).astype(np.float32)).astype(dtype)
    nw = mx.array(rng.uniform(0.5, 1.5, (k,)).astype(np.float32)).astype(dtype) if norm else None
    pos = rng.choice(100000, size=m, replace=False).astype(np.int32)
    cells = rng.choice(n_cells, size=m, replace=False).astype(np.int32)
    shape = (1, n_kv_heads, n_cells, head_dim)
    bufs = [mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype) for _ in range(2)]
    kw = dict(n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, base=base, scale=scale,
              traditional=traditional)
    order = mx.array(Q.rope_pair_order(n_heads, n_kv_heads, head_dim, traditional), dtype=mx.int32)
    wq_p, sc_p, bi_p = (mx.take(a, order, axis=0) for a in (wq, sc, bi))
    lb_p = mx.take(lb, order, axis=0) if bias else None
    rope = Q.RopeStore(mx.array(pos), mx.array(cells), bufs[0], bufs[1], **kw)
    cfg = None
    if split:
        cfg = replace(Q.choose_config(m, width, k, bits), s=split, blocks=0, ns=0, wf=1)
    norm_arg = (nw, 1e-5) if norm and not prenorm else None
    x_in, pending = producer_share(x, nw, 1e-5) if prenorm else (x, None)
    kspec, launch = Q.plan_quantized_matmul("cuda", x_in, wq_p, sc_p, bi_p, group_size=group_size, bits=bits,
                                            bias=lb_p, norm=norm_arg, config=cfg, rope=rope, prenorm=pending,
                                            packed=Q.pack_scales_biases(sc_p, bi_p) if packed else None)
    is_split = bool(dict(launch.template)["SPLIT"])

    xf = _f64(x)[0]
    if norm:
        xf = xf / np.sqrt((xf**2).mean(axis=1, keepdims=True) + 1e-5) * _f64(nw)
    qkv = xf @ _f64(mx.dequantize(wq, sc, bi, group_size=group_size, bits=bits)).T
    if bias:
        qkv = qkv + _f64(lb)
    q_ref, k_ref, v_ref = rope_reference(qkv[None], pos, **kw)
    after = [_f64(b).copy() for b in bufs]
    after[0][:, :, cells] = k_ref
    after[1][:, :, cells] = v_ref
    want = np.concatenate([q_ref.ravel(), after[0].ravel(), after[1].ravel()])
    kernels = [(kspec, launch)]
    if is_split:
        zeros = [mx.zeros(shape, dtype=dt) for shape, dt in zip(launch.output_shapes, launch.output_dtypes)]
        kernels.append(Q.plan_qmm_reduce(zeros[0], dtype, lb_p, rope=rope, norm=folded_norm(zeros, k)))

    def run(execute: Executor) -> np.ndarray:
        outs, inputs = execute(kspec, launch)
        if is_split:
            parts = [mx.array(o) for o in outs]
            rspec, rlaunch = Q.plan_qmm_reduce(parts[0], dtype, lb_p, rope=rope, norm=folded_norm(parts, k))
            outs, inputs = execute(rspec, rlaunch)
        tail = 1 if prenorm and not is_split else 0  # the pending norm's sums come after the cache buffers
        kc, vc = (_values(inputs[i - tail], dtype) for i in (-2, -1))
        return np.concatenate([outs[0].astype(np.float64).ravel(), kc.ravel(), vc.ravel()])

    atol = QMM_RTOL[dtype] * max(1.0, float(np.abs(qkv).max())) * np.sqrt(2) + rope_tolerance(qkv, pos, scale, dtype)
    name = (
        f"qmm-rope-cuda-{'bf16' if dtype == mx.bfloat16 else 'fp16'}-M{m}-D{head_dim}-Hq{n_heads}-Hkv{n_kv_heads}"
        f"-K{k}-b{bits}-{'trad' if traditional else 'half'}{'-bias' if bias else ''}{'-norm' if norm else ''}"
        f"{'-split' + str(split) if split else ''}{'-prenorm' if prenorm else ''}{'-packed' if packed else ''}"
    )
    return Case(name, kernels, run, want, atol)


def qmm_rope_cases(rng: np.random.Generator, quick: bool = False) -> list[Case]:
    """GQA, both pair layouts, bias and the fused norm, one and several token tiles, a split K."""
    specs = [
        dict(m=1, bias=True, norm=True),
        dict(m=5, dtype=mx.bfloat16, traditional=True, n_heads=7, n_kv_heads=1),
        dict(m=3, head_dim=128, n_heads=2, n_kv_heads=1, bits=8, group_size=64, bias=True, split=2),
        dict(m=11, dtype=mx.bfloat16, norm=True, bias=True, k=512),
        dict(m=9, norm=True, bias=True, k=768, split=3),  # the norm folded over the K-slices
        dict(m=4, norm=True, bias=True, k=512, prenorm=True),  # the norm split with its producer
        dict(m=2, norm=True, bias=True, k=512, packed=True),  # scales and biases as pairs (BB_QMM_SB_PACK)
    ]
    quick_specs = specs[:1] + [s for s in specs if (s.get("split") and s.get("norm")) or s.get("prenorm")
                               or s.get("packed")]
    return [qmm_rope_case(rng, **s) for s in (quick_specs if quick else specs)]


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
    # q/k read in the fused projection's pair order (prefill after the paired projection)
    specs.append(dict(t=6, dtype=mx.float16, n_heads=7, n_kv_heads=1, head_dim=128, paired=True))
    specs.append(dict(t=3, dtype=mx.bfloat16, traditional=True, head_dim=64, paired=True, store_cells=20))
    if quick:
        specs = specs[::3] + specs[-1:]
    else:
        specs += [
            dict(t=3, dtype=mx.bfloat16, n_heads=7, n_kv_heads=1, head_dim=80, base=1e6, scale=0.25),
            dict(t=5, dtype=mx.float16, head_dim=128, traditional=True, max_pos=64),
            dict(t=1, dtype=mx.float16, n_heads=7, n_kv_heads=1, head_dim=64, store_cells=40),
        ]
    return [rope_case(rng, **s) for s in specs]
