"""The int8-activation matrix-vector kernel (batchbench.kernels.qmv8): its twin against an
independent float64 definition, the CUDA source under the CPU emulator against the twin."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from batchbench.kernels import qmv8
from batchbench.verify import emulate, toolchain


def _problem(rng: np.random.Generator, m: int, n: int, k: int, dtype):
    w = mx.array(rng.standard_normal((n, k)).astype(np.float32) * 0.05).astype(dtype)
    wq, s, b = mx.quantize(w, group_size=32, bits=4)
    x = mx.array(rng.standard_normal((m, k)).astype(np.float32) * rng.uniform(0.5, 3.0)).astype(dtype)
    return x, wq, s, b


def _f64(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32)).astype(np.float64)


def _definition(x, wq, s, b) -> np.ndarray:
    """y from the module doc's formula, in float64 NumPy (codes unpacked from the words here)."""
    xf = _f64(x)
    m, k = xf.shape
    words = np.array(wq).astype(np.uint64)
    codes = ((words[..., None] >> (4 * np.arange(8, dtype=np.uint64))) & 15).reshape(words.shape[0], k)
    xg = xf.reshape(m, k // 32, 32).astype(np.float32)
    amax = np.abs(xg).max(axis=-1)
    d = (amax / np.float32(127)).astype(np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    xq = np.rint(xg * inv[..., None]).astype(np.float64)
    sx = xg.astype(np.float64).sum(axis=-1)
    dots = np.einsum("mgk,ngk->mng", xq, codes.reshape(-1, k // 32, 32).astype(np.float64))
    e8 = 8 * (sx - d * xq.sum(axis=-1))
    return ((d[:, None, :] * dots + e8[:, None, :]) * _f64(s)[None] + _f64(b)[None] * sx[:, None, :]).sum(axis=-1)


@pytest.mark.parametrize("m,n,k,dtype", [(1, 48, 256, mx.float16), (3, 20, 1024, mx.bfloat16), (4, 7, 96, mx.float16)])
def test_twin_is_the_definition_and_near_the_exact_product(m, n, k, dtype):
    rng = np.random.default_rng()
    x, wq, s, b = _problem(rng, m, n, k, dtype)
    got = _f64(qmv8.twin(x, wq, s, b))
    want = _definition(x, wq, s, b)
    rounding = 2e-3 if dtype == mx.float16 else 1.6e-2  # the output's dtype
    assert np.abs(got - want).max() <= rounding * np.abs(want).max() + 1e-6
    exact = _f64(x) @ _f64(mx.dequantize(wq, s, b, group_size=32, bits=4)).T
    # int8 x: the error the module doc states (4-6e-3 of max|y| on the 7B matrices)
    assert np.abs(got - exact).max() <= 2e-2 * np.abs(exact).max()


def test_centred_codes_cut_the_error():
    """Without e8 (codes 0..15 meeting x's rounding) the same inputs are further from exact."""
    rng = np.random.default_rng()
    x, wq, s, b = _problem(rng, 1, 256, 2048, mx.float16)
    exact = _f64(x) @ _f64(mx.dequantize(wq, s, b, group_size=32, bits=4)).T
    codes, d, sx, _ = qmv8.quantize_x(x.astype(mx.float32))
    qw = qmv8.unpack_codes(wq).reshape(256, -1, 32).astype(mx.float32)
    dots = mx.einsum("mgk,ngk->mng", codes.reshape(1, -1, 32).astype(mx.float32), qw)
    uncentred = mx.sum(s.astype(mx.float32)[None] * d[:, None] * dots + b.astype(mx.float32)[None] * sx[:, None], -1)
    err_c = np.abs(_f64(qmv8.twin(x.astype(mx.float32), wq, s.astype(mx.float32), b.astype(mx.float32))) - exact).max()
    err_u = np.abs(_f64(uncentred) - exact).max()
    assert err_c < 0.75 * err_u


def test_off_cuda_the_call_is_the_twin_and_bad_input_is_refused():
    rng = np.random.default_rng()
    x, wq, s, b = _problem(rng, 2, 16, 128, mx.float16)
    y = qmv8.quantized_matvec_x8(x[:, None], wq, s, b)
    assert y.shape == (2, 1, 16)
    assert np.array_equal(np.array(y[:, 0]), np.array(qmv8.twin(x, wq, s, b)))
    with pytest.raises(ValueError, match="1..4 rows"):
        qmv8.quantized_matvec_x8(mx.zeros((5, 128), mx.float16), wq, s, b)
    with pytest.raises(ValueError, match="do not match"):
        qmv8.quantized_matvec_x8(x[:, :96], wq, s, b)
    w64, s64, b64 = mx.quantize(mx.zeros((16, 128), mx.float16), group_size=64, bits=4)
    with pytest.raises(ValueError, match="group 64"):
        qmv8.quantized_matvec_x8(x, w64, s64, b64, group_size=64)


# (M, N, K, dtype, config): a warp a row over more warps than rows (some idle); two rows a step
# with a zero x row (bf16); 128 lanes a row, 4 rows a slot, a block's rows not a multiple of its
# slots; 256 lanes a row with fewer groups than lanes (K = 2080: 65), and with a second round of
# loads for one lane (K = 8224: 257 groups)
EMULATED = [
    (1, 37, 256, mx.float16, qmv8.X8Config(r=1, u=1, blocks=6)),
    (3, 21, 1024, mx.bfloat16, qmv8.X8Config(r=2, u=1, blocks=1)),
    (2, 13, 3584, mx.float16, qmv8.X8Config(r=4, u=1, blocks=2, lpr=128)),
    (1, 7, 2080, mx.bfloat16, qmv8.X8Config(r=2, u=1, blocks=2, lpr=256)),
    (1, 9, 8224, mx.float16, qmv8.X8Config(r=3, u=1, blocks=2, lpr=256)),
]


@pytest.mark.parametrize("m,n,k,dtype,cfg", EMULATED)
def test_kernel_emulated_matches_twin(m, n, k, dtype, cfg):
    toolchain.need(toolchain.host_cxx)
    rng = np.random.default_rng()
    x, wq, s, b = _problem(rng, m, n, k, dtype)
    if m == 3:
        x = mx.concatenate([x[:1], mx.zeros_like(x[:1]), x[2:]])
    spec, launch = qmv8.plan(x, wq, s, b, cfg)
    got = emulate(spec, launch).outputs[0].astype(np.float64)
    want = _f64(qmv8.twin(x, wq, s, b))
    tol = (2e-3 if dtype == mx.float16 else 1.6e-2) * np.abs(want).max()
    assert np.abs(got - want).max() <= tol
    if m == 3:
        assert not np.any(got[1]), "a zero x row must give zeros (its group sums are 0)"


def test_kernel_compiles_for_sm90a_at_the_7b_shapes():
    """The configs choose_config picks for the 7B matrices at M = 1 and 2, whole rows and parts."""
    from conftest import assert_compile_for_sm90a

    items = []
    for n, k in ((3584, 3584), (37888, 3584), (3584, 18944)):
        for m in (1, 2):
            x = mx.zeros((m, k), mx.float16)
            w, s = mx.zeros((n, k // 8), mx.uint32), mx.zeros((n, k // 32), mx.float16)
            items.append(qmv8.plan(x, w, s, s, qmv8.choose_config(m, n, k, sms=132)))
    assert [qmv8.choose_config(1, n, k, sms=132).lpr for n, k in ((37888, 3584), (3584, 3584), (3584, 18944))] \
        == [32, 128, 256]
    assert_compile_for_sm90a(items)


def _epilogue_definition(x, wq, s, b, nw=None, eps=1e-5, residual=None, glu=False) -> np.ndarray:
    xf = _f64(x)
    if nw is not None:
        xf = xf / np.sqrt((xf ** 2).mean(axis=-1, keepdims=True) + eps) * _f64(nw)
    y = _definition(mx.array(xf.astype(np.float32)), wq, s, b)
    if glu:
        t = y.reshape(y.shape[0], -1, 2, 8)
        gate, up = t[:, :, 0], t[:, :, 1]
        y = (gate / (1 + np.exp(-gate)) * up).reshape(y.shape[0], -1)
    if residual is not None:
        y = y + _f64(residual)
    return y


# (M, N, K, dtype, config, norm, residual, glu): lm_head (norm), o_proj / down (residual), the
# gate/up pair (norm + glu) a warp a pair and over 128 lanes, bf16
EPILOGUES = [
    (2, 40, 512, mx.float16, qmv8.X8Config(r=2, u=1, blocks=3), True, False, False),
    (1, 24, 1024, mx.float16, qmv8.X8Config(r=3, u=1, blocks=2, lpr=256), False, True, False),
    (3, 48, 512, mx.bfloat16, qmv8.X8Config(r=2, u=1, blocks=2), True, False, True),
    (1, 64, 3584, mx.float16, qmv8.X8Config(r=3, u=1, blocks=2, lpr=128), True, False, True),
]


@pytest.mark.parametrize("m,n,k,dtype,cfg,norm,res,glu", EPILOGUES)
def test_epilogues_emulated_match_twin_and_definition(m, n, k, dtype, cfg, norm, res, glu):
    toolchain.need(toolchain.host_cxx)
    rng = np.random.default_rng()
    x, wq, s, b = _problem(rng, m, n, k, dtype)
    nw = mx.array(rng.uniform(0.5, 1.5, k).astype(np.float32)).astype(dtype) if norm else None
    n_out = n // 2 if glu else n
    residual = mx.array(rng.standard_normal((m, n_out)).astype(np.float32)).astype(dtype) if res else None
    epi = qmv8.Epilogue(norm=(nw, 1e-5) if norm else None, residual=residual, glu_pair=glu)
    spec, launch = qmv8.plan(x, wq, s, b, cfg, epi)
    got = emulate(spec, launch).outputs[0].astype(np.float64)
    twin = _f64(qmv8.twin(x, wq, s, b, epi))
    want = _epilogue_definition(x, wq, s, b, nw, 1e-5, residual, glu)
    assert got.shape == (m, n_out)
    tol = (2e-3 if dtype == mx.float16 else 1.6e-2) * np.abs(want).max()
    assert np.abs(got - twin).max() <= tol
    assert np.abs(twin - want).max() <= tol


def test_glu_pairs_follow_the_fused_layers_row_order():
    """silu(gate) * up from the pair kernel's twin equals the same product of two plain matvecs
    on the gate and up weights, with the rows stored as qmm.glu_pair_order stores them."""
    from batchbench.kernels import qmm

    rng = np.random.default_rng()
    ff, k = 32, 256
    x, wg, sg, bg = _problem(rng, 1, ff, k, mx.float16)
    _, wu, su, bu = _problem(rng, 1, ff, k, mx.float16)
    order = mx.array(qmm.glu_pair_order(ff))
    w, s, b = (mx.take(mx.concatenate([a, c]), order, axis=0) for a, c in ((wg, wu), (sg, su), (bg, bu)))
    got = _f64(qmv8.quantized_matvec_x8(x, w, s, b, glu_pair=True))
    g = _f64(qmv8.twin(x, wg, sg, bg)).astype(np.float64)
    u = _f64(qmv8.twin(x, wu, su, bu)).astype(np.float64)
    want = g / (1 + np.exp(-g)) * u
    assert np.abs(got - want).max() <= 5e-3 * np.abs(want).max()
