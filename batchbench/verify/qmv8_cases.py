"""The int8-activation matrix-vector kernel (batchbench.kernels.qmv8) on small inputs, with
float64 NumPy expectations from the module doc's formula; same `Case` protocol as cases.py
(the CPU emulator in tests, `python -m batchbench.verify.gpu` on CUDA)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from batchbench.kernels import qmm as Q
from batchbench.kernels import qmv8
from batchbench.kernels import rope as R
from batchbench.verify.cases import QMM_RTOL, Case, Executor, _f64
from batchbench.verify.emulate import to_numpy
from batchbench.verify.rope_cases import rope_reference, rope_tolerance


def definition(x: np.ndarray, wq: mx.array, scales: mx.array, biases: mx.array) -> np.ndarray:
    """y [M, N] for x [M, K] (float64, already normalized): x quantized per group of 32 in
    float32 as the kernel does (scale max|x| / 127, one reciprocal a group, round to nearest
    even), the codes' products and the e8 centring exact, the rest float64."""
    m, k = x.shape
    words = np.array(wq).astype(np.uint64)
    codes = ((words[..., None] >> (4 * np.arange(8, dtype=np.uint64))) & 15).reshape(words.shape[0], k)
    xg = x.reshape(m, k // 32, 32).astype(np.float32)
    amax = np.abs(xg).max(axis=-1)
    d = (amax / np.float32(127)).astype(np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    xq = np.rint(xg * inv[..., None]).astype(np.float64)
    sx = xg.astype(np.float64).sum(axis=-1)
    dots = np.einsum("mgk,ngk->mng", xq, codes.reshape(-1, k // 32, 32).astype(np.float64))
    e8 = 8 * (sx - d * xq.sum(axis=-1))
    return ((d[:, None, :] * dots + e8[:, None, :]) * _f64(scales)[None]
            + _f64(biases)[None] * sx[:, None, :]).sum(axis=-1)


def epilogue_definition(x: np.ndarray, wq, scales, biases, nw=None, eps: float = 1e-5, residual=None,
                        glu: bool = False, bias=None) -> np.ndarray:
    """`definition` with the kernel's epilogues: x's RMSNorm (weight nw) first, a bias on each
    row, the gate product of paired rows (each 16-row tile: 8 gate rows, their 8 up rows), a
    residual on the output."""
    if nw is not None:
        x = x / np.sqrt((x ** 2).mean(axis=-1, keepdims=True) + eps) * _f64(nw)
    y = definition(x, wq, scales, biases)
    if bias is not None:
        y = y + _f64(bias)
    if glu:
        t = y.reshape(y.shape[0], -1, 2, 8)
        gate, up = t[:, :, 0], t[:, :, 1]
        y = (gate / (1 + np.exp(-gate)) * up).reshape(y.shape[0], -1)
    if residual is not None:
        y = y + _f64(residual)
    return y


def problem(rng: np.random.Generator, m: int, n: int, k: int, dtype):
    """Random x [M, K] (a random scale) and 4-bit group-32 weights (wq, scales, biases) of N rows."""
    w = mx.array(rng.standard_normal((n, k)).astype(np.float32) * 0.05).astype(dtype)
    wq, s, b = mx.quantize(w, group_size=32, bits=4)
    x = mx.array(rng.standard_normal((m, k)).astype(np.float32) * rng.uniform(0.5, 3.0)).astype(dtype)
    return x, wq, s, b


def _name(m, n, k, dtype, cfg: qmv8.X8Config, tag: str) -> str:
    return (f"qmv8-cuda-{'bf16' if dtype == mx.bfloat16 else 'fp16'}-M{m}-N{n}-K{k}-lpr{cfg.lpr}-r{cfg.r}-u{cfg.u}"
            f"{'-xreg' if cfg.xreg else ''}{'-' + tag if tag else ''}")


def qmv8_case(rng: np.random.Generator, *, m: int, n: int, k: int, dtype=mx.float16,
              cfg: qmv8.X8Config | None = None, norm: bool = False, res: bool = False, glu: bool = False,
              pre: bool = False, nout: bool = False, eps: float = 1e-5) -> Case:
    """One launch with the chosen epilogues. pre: x is a producer's share (x * weight and
    partial sums of squares, qmm.PendingNorm) of the x it stands for; nout: the result also
    holds y * weight of the next norm and the blocks' sums of squares added up."""
    x, wq, s, b = problem(rng, m, n, k, dtype)
    n_out = n // 2 if glu else n
    nw = mx.array(rng.uniform(0.5, 1.5, k).astype(np.float32)).astype(dtype) if norm or pre else None
    xf = _f64(x)
    prenorm = None
    if pre:  # the producer's y is x; the kernel sees round(x * nw) and the sums of x^2
        parts = np.stack([(c ** 2).sum(axis=-1) for c in np.array_split(xf, 3, axis=-1)]).astype(np.float32)
        prenorm = (mx.array(parts), eps)
        x = mx.array((xf * _f64(nw)).astype(np.float32)).astype(dtype)
        ms = parts.astype(np.float64).sum(axis=0) / k
        xf = _f64(x) / np.sqrt(ms + eps)[:, None]
    residual = mx.array(rng.standard_normal((m, n_out)).astype(np.float32)).astype(dtype) if res else None
    onw = mx.array(rng.uniform(0.5, 1.5, n_out).astype(np.float32)).astype(dtype) if nout else None
    epi = qmv8.Epilogue(norm=(nw, eps) if norm else None, residual=residual, glu_pair=glu, prenorm=prenorm,
                        norm_out=onw)
    cfg = cfg or qmv8.choose_config(m, n_out, k, sms=2, rows_a_unit=2 if glu else 1, block_norm=norm)
    spec, launch = qmv8.plan(x, wq, s, b, cfg, epi)
    y = epilogue_definition(xf, wq, s, b, nw if norm else None, eps, residual, glu)
    want = [y.ravel()]
    if nout:  # y * weight of the y the kernel rounds to its dtype; the sums as an rms of that y
        yr = _f64(mx.array(y.astype(np.float32)).astype(dtype))
        want += [(yr * _f64(onw)).ravel(), np.sqrt((yr ** 2).sum(axis=-1) / n_out)]

    def run(execute: Executor) -> np.ndarray:
        outs, _ = execute(spec, launch)
        got = [outs[0].astype(np.float64).ravel()]
        if nout:
            got += [outs[1].astype(np.float64).ravel(), np.sqrt(outs[2].astype(np.float64).sum(axis=0) / n_out)]
        return np.concatenate(got)

    tag = "-".join(t for t, on in (("norm", norm), ("pre", pre), ("res", res), ("glu", glu), ("nout", nout)) if on)
    return Case(_name(m, n, k, dtype, cfg, tag), [(spec, launch)], run, np.concatenate(want),
                QMM_RTOL[dtype] * 1.5 * float(np.abs(y).max()))


def qmv8_rope_case(rng: np.random.Generator, *, m: int, dtype=mx.float16, n_heads: int = 4, n_kv_heads: int = 2,
                   head_dim: int = 64, k: int = 256, traditional: bool = False, nc: int = 23,
                   cfg: qmv8.X8Config | None = None, norm: bool = False) -> Case:
    """The q/k/v projection with its bias and the RoPE pair epilogue: q rotated out, k rotated
    and v written into cache buffers at the tokens' cells (the result holds q and both buffers,
    so rows that must stay untouched are compared too)."""
    n = (n_heads + 2 * n_kv_heads) * head_dim
    x, wq, s, b = problem(rng, m, n, k, dtype)
    bias = mx.array(rng.standard_normal(n).astype(np.float32) * 0.5).astype(dtype)
    order = mx.array(R.rope_pair_order(n_heads, n_kv_heads, head_dim, traditional))
    wq, s, b, bias = (mx.take(a, order, axis=0) for a in (wq, s, b, bias))
    nw = mx.array(rng.uniform(0.5, 1.5, k).astype(np.float32)).astype(dtype) if norm else None
    pos = rng.integers(0, 20000, m).astype(np.int32)
    cells = rng.choice(nc, size=m, replace=False).astype(np.int32)
    kc = mx.array(rng.standard_normal((1, n_kv_heads, nc, head_dim)).astype(np.float32)).astype(dtype)
    vc = mx.array(rng.standard_normal((1, n_kv_heads, nc, head_dim)).astype(np.float32)).astype(dtype)
    rs = Q.RopeStore(mx.array(pos), mx.array(cells), kc, vc, n_heads, n_kv_heads, head_dim, 10000.0, 1.0,
                     traditional)
    cfg = cfg or qmv8.choose_config(m, n // 2, k, sms=2, rows_a_unit=2, block_norm=norm)
    spec, launch = qmv8.plan(x, wq, s, b, cfg, qmv8.Epilogue(bias=bias, rope=rs, norm=(nw, 1e-5) if norm else None))
    # the projection (rows in pair order) rounded as the kernel rounds it, back in order, rotated
    y = epilogue_definition(_f64(x), wq, s, b, nw, 1e-5, bias=bias)
    y = _f64(R.unpair(mx.array(y.astype(np.float32)).astype(dtype), n_heads, n_kv_heads, head_dim, traditional))
    q, kr, vr = rope_reference(y[None], pos, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
                               base=10000.0, scale=1.0, traditional=traditional)
    k_want, v_want = _f64(kc), _f64(vc)
    k_want[0, :, cells], v_want[0, :, cells] = kr[0].transpose(1, 0, 2), vr[0].transpose(1, 0, 2)
    expected = np.concatenate([q.ravel(), k_want.ravel(), v_want.ravel()])
    n_in = len(launch.inputs)

    def run(execute: Executor) -> np.ndarray:
        outs, after = execute(spec, launch)
        bufs = [after[i] for i in (n_in - 2, n_in - 1)]
        bufs = [to_numpy(a, dtype) if a.dtype == np.uint16 and dtype == mx.bfloat16 else a for a in bufs]
        return np.concatenate([outs[0].astype(np.float64).ravel()] + [a.astype(np.float64).ravel() for a in bufs])

    tol = QMM_RTOL[dtype] * 1.5 * float(np.abs(y).max()) + rope_tolerance(y, pos, 1.0, dtype)
    name = _name(m, n, k, dtype, cfg, f"rope{'-trad' if traditional else ''}{'-norm' if norm else ''}")
    return Case(name, [(spec, launch)], run, expected, tol)


def qmv8_cases(rng: np.random.Generator, quick: bool = False) -> list[Case]:
    """A warp a row (some warps idle) and two rows a step; 128 and 256 lanes a row (fewer groups
    than lanes, a second round of loads); x in registers; every epilogue: the RMSNorm, a
    producer's norm share in (staged and in registers) and out, the gate product, the residual,
    the q/k/v bias + RoPE + K/V write; fp16 and bf16; a zero-free M of 1 to 4."""
    C = qmv8.X8Config
    cases = [
        qmv8_case(rng, m=1, n=37, k=256, cfg=C(r=1, u=1, blocks=6)),
        qmv8_case(rng, m=3, n=21, k=1024, dtype=mx.bfloat16, cfg=C(r=2, u=1, blocks=1), norm=True),
        qmv8_case(rng, m=2, n=48, k=512, cfg=C(r=2, u=1, blocks=3), pre=True, glu=True),
        qmv8_case(rng, m=1, n=24, k=2080, dtype=mx.bfloat16, cfg=C(r=3, u=1, blocks=2, lpr=256, xreg=True),
                  res=True, nout=True),
        qmv8_case(rng, m=1, n=9, k=8224, cfg=C(r=2, u=2, blocks=2, lpr=256, xreg=True), pre=True),
        qmv8_case(rng, m=4, n=22, k=1024, cfg=C(r=3, u=1, blocks=2, lpr=128), res=True, nout=True, pre=True),
        qmv8_case(rng, m=1, n=64, k=3584, cfg=C(r=3, u=1, blocks=2, lpr=128), norm=True, glu=True),
        qmv8_rope_case(rng, m=1, cfg=C(r=2, u=2, blocks=3)),
        qmv8_rope_case(rng, m=2, dtype=mx.bfloat16, n_kv_heads=1, head_dim=32, traditional=True,
                       cfg=C(r=3, u=1, blocks=2, lpr=128, xreg=True)),
    ]
    if not quick:
        cases.append(qmv8_rope_case(rng, m=1, n_heads=7, n_kv_heads=1, cfg=C(r=2, u=1, blocks=2, lpr=128),
                                    norm=True))
    return cases


def model_shape_cases(rng: np.random.Generator) -> list[Case]:
    """The 7B shapes at one token with choose_config's geometry on the real GPU (too large for
    the emulator): down_proj with x in registers, the residual and the share out; the gate/up
    pair taking a share; q/k/v with the bias and RoPE."""
    from batchbench.kernels.qmm import sm_count

    sms = sm_count()
    C = qmv8.choose_config
    return [
        qmv8_case(rng, m=1, n=3584, k=18944, cfg=C(1, 3584, 18944, sms=sms), res=True, nout=True),
        qmv8_case(rng, m=1, n=37888, k=3584, cfg=C(1, 18944, 3584, sms=sms, rows_a_unit=2), pre=True, glu=True),
        qmv8_rope_case(rng, m=1, n_heads=28, n_kv_heads=4, head_dim=128, k=3584, nc=64,
                       cfg=C(1, 2304, 3584, sms=sms, rows_a_unit=2)),
    ]
