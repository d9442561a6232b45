"""CPU tests of batchbench.kernels.qmm: fallback numerics, CUDA dispatch/planning, layer swap.

The CUDA kernel itself runs on the H200 (scripts/h200_qmm.py); here the dispatch is checked
by planning launches with BACKEND forced to "cuda" and a stubbed `spec.run`.
"""

from __future__ import annotations

import dataclasses
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx.utils import tree_flatten

from batchbench import SettingError, env_choice, env_number
from batchbench.kernels import qmm
from conftest import qmm_setting_read

MODEL_SHAPES = [(3584, 3584), (512, 3584), (18944, 3584), (3584, 18944), (152064, 3584), (896, 896), (128, 896), (4864, 896), (896, 4864)]


def _quantized(n, k, bits, gs, dtype, seed):
    rng = np.random.default_rng(seed)
    w = mx.array(rng.standard_normal((n, k)).astype(np.float32) * 0.05).astype(dtype)
    return mx.quantize(w, group_size=gs, bits=bits)


def _reference(x, wq, s, b, gs, bits, bias=None):
    wd = np.array(mx.dequantize(wq, s, b, group_size=gs, bits=bits).astype(mx.float32), np.float64)
    ref = np.array(x.astype(mx.float32), np.float64) @ wd.T
    if bias is not None:
        ref = ref + np.array(bias.astype(mx.float32), np.float64)
    return ref


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.float32])
@pytest.mark.parametrize("bits,gs", [(4, 32), (4, 64), (8, 64)])
@pytest.mark.parametrize("lead", [(1,), (3,), (2, 7), (33,)])
def test_fallback_matches_float64(dtype, bits, gs, lead):
    n, k = 48, 256
    wq, s, b = _quantized(n, k, bits, gs, dtype, seed=len(lead) * 7 + lead[-1])
    x = mx.array(np.random.default_rng(1).standard_normal((*lead, k)).astype(np.float32)).astype(dtype)
    bias = mx.array(np.random.default_rng(2).standard_normal(n).astype(np.float32)).astype(dtype)
    y = qmm.quantized_matmul(x, wq, s, b, group_size=gs, bits=bits, bias=bias)
    assert y.shape == (*lead, n) and y.dtype == dtype
    ref = _reference(x.reshape(-1, k), wq, s, b, gs, bits, bias).reshape(*lead, n)
    err = np.abs(np.array(y.astype(mx.float32), np.float64) - ref).max() / np.abs(ref).max()
    assert err < {mx.float16: 5e-3, mx.bfloat16: 3e-2, mx.float32: 1e-5}[dtype], err


class _Captured(Exception):
    pass


@pytest.mark.parametrize("m", [1, 2, 7, 8, 9, 31, 33, 64])
@pytest.mark.parametrize("bits", [4, 8])
def test_cuda_dispatch_plans_custom_kernel(cuda_dispatch, m, bits):
    n, k, gs = 512, 1024, 64
    wq, s, b = _quantized(n, k, bits, gs, mx.float16, seed=m)
    x = mx.zeros((m, k), mx.float16)
    bias = mx.zeros((n,), mx.float16)
    y = qmm.quantized_matmul(x, wq, s, b, group_size=gs, bits=bits, bias=bias)
    assert y.shape == (m, n) and y.dtype == mx.float16
    main_spec, main = cuda_dispatch[0]
    t = dict(main.template)
    assert main_spec.backend == "cuda" and main_spec.name.startswith("bb_qmm")
    assert t["T"] == mx.float16 and (t["BITS"], t["GS"]) == (bits, gs)
    assert 8 * t["MT"] >= m and main.inputs[0].shape == (m, k) and main.inputs[1].shape[0] == n
    nt, splits = 32 * t["WN"] * t["WK"], main.grid[1]
    assert main.threadgroup == (nt, 1, 1) and main.grid == (n // (16 * t["WN"]) * nt, splits, 1)
    assert main_spec.shared_memory == t["SMEM"] <= 227 * 1024 and t["SMEM"] % qmm.SMEM_STEP == 0
    assert t["SPLIT"] == (splits > 1)
    if splits > 1:  # partials (fp16 with fp16 activations: BB_QMM_PART16), then the reduce kernel adds the bias and casts
        assert main.output_dtypes == [mx.float16] and main.output_shapes == [(splits, m, n)]
        red_spec, red = cuda_dispatch[1]
        assert red_spec.name == "bb_qmm_red_b" and red.output_dtypes == [mx.float16]
        assert len(cuda_dispatch) == 2
    else:
        assert main_spec.name == "bb_qmm_b" and main.output_shapes == [(m, n)]
        assert len(cuda_dispatch) == 1


@pytest.mark.parametrize(
    "case",
    ["m65", "x_f32", "scale_dtype", "n_not_16", "bits3", "k_not_128"],
)
def test_cuda_dispatch_falls_back(cuda_dispatch, case):
    n, k, m, bits, gs, dt = 64, 512, 4, 4, 64, mx.float16
    if case == "m65":
        m = 65
    if case == "n_not_16":
        n = 40
    if case == "bits3":
        bits = 3
    if case == "k_not_128":
        k, gs = 576, 64
    wq, s, b = _quantized(n, k, bits, gs, dt, seed=3)
    x = mx.array(np.random.default_rng(4).standard_normal((m, k)).astype(np.float32))
    x = x if case == "x_f32" else x.astype(dt)
    if case == "scale_dtype":
        s, b = s.astype(mx.bfloat16), b.astype(mx.bfloat16)
    y = qmm.quantized_matmul(x, wq, s, b, group_size=gs, bits=bits)
    assert cuda_dispatch == []  # went to mx.quantized_matmul
    ref = _reference(x, wq, s, b, gs, bits)
    err = np.abs(np.array(y.astype(mx.float32), np.float64) - ref).max() / np.abs(ref).max()
    assert err < 1e-2


def test_configs_fit_the_gpu():
    for n, k in MODEL_SHAPES + [(4608, 3584), (37888, 3584)]:
        for bits in (4, 8):
            nch = k // (128 if bits == 4 else 64)
            for m in range(1, qmm.MAX_M + 1):
                c = qmm.choose_config(m, n, k, bits)
                assert n % (16 * c.wn) == 0 and 8 * c.mt >= m and c.mrows >= m
                assert 1 <= c.s <= nch and 32 * c.wn * c.wk <= 1024
                # the x slice keeps to the budget, except with the ring's halved K-slices or
                # the one-wave grids' balanced K-slices (one block per SM both) or when every
                # slice is one chunk
                assert (c.xbytes(k, bits) <= qmm.SMEM_BUDGET or c.s == nch or (c.ns and c.mt == 4)
                        or (qmm.ONE_WAVE == 2 and qmm._one_wave(c))), (m, n, k, bits, c)
                assert c.ns == 0 or qmm.ring_ok(bits, 32)
                assert 0 <= c.blocks and c.grid_blocks(n) <= n // (16 * c.wn)
                assert c.smem(k, bits) <= 227 * 1024


def test_ring_where_measured_and_dropped_for_large_groups(monkeypatch):
    wide = qmm.choose_config(32, 37888, 3584, 4)
    assert wide.ns == 4 and wide.s == 2  # the H200's pick for wide matrices at M=32
    assert qmm.choose_config(1, 37888, 3584, 4).ns == 0  # slower at one token
    # two token tiles: the wide matrices on the ring (their K-slices kept), not at M=8
    for n in (37888, 152064):
        assert [qmm.choose_config(m, n, 3584, 4).ns for m in (8, 9, 16)] == [0, 4, 4]
        assert qmm.choose_config(16, n, 3584, 4).s == 2
    # the narrow matrices (down, o_proj, q/k/v): on the ring with the repacked weights, not on
    # MLX's layout; their K-slices stay those of register stages
    narrow = [(3584, 18944), (3584, 3584), (4608, 3584)]
    assert [qmm.choose_config(32, n, k, 4).ns for n, k in narrow] == [4, 4, 4]
    assert [qmm.choose_config(32, n, k, 4).s for n, k in narrow] == [9, 2, 7]
    assert [qmm.choose_config(16, n, k, 4).ns for n, k in narrow] == [0, 0, 0]  # two token tiles: slower there
    monkeypatch.setattr(qmm, "WPACK", "0")
    assert [qmm.choose_config(32, n, k, 4).ns for n, k in narrow] == [0, 0, 0]
    assert qmm.choose_config(16, 37888, 3584, 4).ns == 0
    monkeypatch.setattr(qmm, "WPACK", "pairs")
    monkeypatch.setattr(qmm, "RING_WIDE", False)
    assert qmm.choose_config(16, 37888, 3584, 4).ns == 0 and qmm.choose_config(32, 37888, 3584, 4).ns == 0
    monkeypatch.setattr(qmm, "RING_WIDE", True)
    assert qmm.ring_ok(4, 32) and qmm.ring_ok(4, 64) and qmm.ring_ok(8, 32)
    assert not qmm.ring_ok(4, 128) and not qmm.ring_ok(8, 64)
    # a group too large for the ring's scale copies: the plan falls back to register stages
    x = mx.zeros((32, 3584), mx.float16)
    w = mx.zeros((37888, 3584 // 8), mx.uint32)
    sc = mx.zeros((37888, 3584 // 128), mx.float16)
    _, launch = qmm.plan_quantized_matmul("cuda", x, w, sc, sc, group_size=128, bits=4)
    assert dict(launch.template)["NS"] == 0
    _, launch = qmm.plan_quantized_matmul("cuda", x, w, mx.zeros((37888, 112), mx.float16),
                                          mx.zeros((37888, 112), mx.float16), group_size=32, bits=4)
    assert dict(launch.template)["NS"] == 4


def test_plan_rejects_uncovered():
    wq, s, b = _quantized(64, 256, 4, 64, mx.float16, seed=5)
    x = mx.zeros((65, 256), mx.float16)
    with pytest.raises(ValueError, match="no custom kernel"):
        qmm.plan_quantized_matmul("cuda", x, wq, s, b, group_size=64, bits=4)
    with pytest.raises(ValueError, match="only on cuda"):
        qmm.plan_quantized_matmul("metal", x[:1], wq, s, b, group_size=64, bits=4)


def test_bad_inputs_raise_clear_errors():
    # K = 96 is not a multiple of group_size 64 (w holds 96 4-bit codes per row)
    w = mx.zeros((16, 12), mx.uint32)
    s = mx.ones((16, 1), mx.float16)
    x = mx.ones((2, 96), mx.float16)
    with pytest.raises(ValueError, match="K=96 is not a multiple of group_size=64"):
        qmm.quantized_matmul(x, w, s, s, group_size=64, bits=4)
    wq, s, b = _quantized(32, 256, 4, 64, mx.float16, seed=6)
    with pytest.raises(ValueError, match="x has 128 features"):
        qmm.quantized_matmul(mx.ones((1, 128), mx.float16), wq, s, b, group_size=64, bits=4)
    with pytest.raises(ValueError, match="scales/biases must be"):
        qmm.quantized_matmul(mx.ones((1, 256), mx.float16), wq, s, b, group_size=32, bits=4)
    with pytest.raises(ValueError, match="uint32"):
        qmm.quantized_matmul(mx.ones((1, 256), mx.float16), s, s, b, group_size=64, bits=4)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(128, 128, bias=True)
        self.k_proj = nn.Linear(128, 32, bias=True)
        self.down_proj = nn.Linear(256, 128, bias=False)
        self.up_proj = nn.Linear(128, 256, bias=False)
        self.norm = nn.RMSNorm(128)

    def __call__(self, x):
        h = self.q_proj(self.norm(x)) + self.k_proj(x).sum(-1, keepdims=True)
        return h + self.down_proj(nn.silu(self.up_proj(h)))


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = [_Block() for _ in range(2)]
        self.lm_head = nn.Linear(128, 96, bias=False)

    def __call__(self, x):
        for l in self.layers:
            x = l(x)
        return self.lm_head(x)


def test_swap_keeps_outputs_and_counts():
    mx.random.seed(0)
    model = _Model()
    model.set_dtype(mx.float16)
    nn.quantize(model, group_size=32, bits=4)
    # one layer in an unsupported setting stays MLX's
    model.layers[1].up_proj = nn.QuantizedLinear.from_linear(nn.Linear(128, 256, bias=False), group_size=128, bits=4)
    x = mx.random.normal((3, 5, 128)).astype(mx.float16)
    before = model(x)
    trainable = [k for k, _ in tree_flatten(model.trainable_parameters())]
    n = qmm.use_fast_quantized_linears(model)
    assert n == 2 * 4 - 1 + 1  # 4 linears per block, one skipped, plus lm_head
    swapped = [m for _, m in model.named_modules() if isinstance(m, qmm.QuantizedLinear)]
    assert len(swapped) == n
    assert not isinstance(model.layers[1].up_proj, qmm.QuantizedLinear)
    assert model.layers[0].q_proj["weight"] is not None and "bias" in model.layers[0].q_proj
    after = model(x)
    np.testing.assert_array_equal(np.array(before.astype(mx.float32)), np.array(after.astype(mx.float32)))
    assert qmm.use_fast_quantized_linears(model) == 0  # idempotent
    assert [k for k, _ in tree_flatten(model.trainable_parameters())] == trainable


def test_fused_linear_matches_separate():
    mx.random.seed(1)
    layers = [nn.QuantizedLinear.from_linear(nn.Linear(256, n, bias=bias), group_size=64, bits=4) for n, bias in ((128, True), (32, False), (32, True))]
    fused = qmm.FusedQuantizedLinear(layers)
    x = mx.random.normal((7, 256))
    outs = fused(x)
    assert [o.shape for o in outs] == [(7, 128), (7, 32), (7, 32)]
    for o, l in zip(outs, layers):
        np.testing.assert_allclose(np.array(o), np.array(l(x)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="differ"):
        qmm.FusedQuantizedLinear([layers[0], nn.QuantizedLinear.from_linear(nn.Linear(256, 16), group_size=32, bits=4)])


@pytest.mark.parametrize(
    "m,n,k,bits,gs,dtype,bias,cfg",
    [
        (3, 32, 512, 4, 32, mx.float16, True, None),  # M < 8, fused bias
        (20, 64, 512, 4, 64, mx.bfloat16, False, None),  # 4 token tiles, 4 warps along N
        (9, 32, 512, 8, 64, mx.bfloat16, True, None),  # 8-bit, K split -> partials + reduce
        (5, 64, 1280, 4, 32, mx.float16, True, qmm.QmmConfig(1, 1, 8, 4, 3, 8)),  # uneven split
    ],
)
def test_cuda_kernel_under_cpu_emulation(m, n, k, bits, gs, dtype, bias, cfg):
    """The exact CUDA source (BB_PORTABLE helpers) run by batchbench.verify's emulator."""
    from batchbench.verify import toolchain
    from batchbench.verify.emulate import emulate

    toolchain.need(toolchain.host_cxx)
    wq, s, b = _quantized(n, k, bits, gs, dtype, seed=m + k)
    x = mx.array(np.random.default_rng(m).standard_normal((m, k)).astype(np.float32)).astype(dtype)
    lb = mx.array(np.random.default_rng(n).standard_normal(n).astype(np.float32) * 0.1).astype(dtype) if bias else None
    ks, launch = qmm.plan_quantized_matmul("cuda", x, wq, s, b, group_size=gs, bits=bits, bias=lb, config=cfg)
    res = emulate(ks, launch)
    assert res.unwritten == {"y": 0}
    y = res[0]
    if dict(launch.template)["SPLIT"]:
        rs, rl = qmm.plan_qmm_reduce(mx.array(y), dtype, lb)
        y = emulate(rs, rl)[0]
    ref = _reference(x, wq, s, b, gs, bits, lb)
    err = np.abs(np.asarray(y, np.float64) - ref).max() / np.abs(ref).max()
    assert err < (2e-3 if dtype == mx.float16 else 1.5e-2), err


@pytest.mark.parametrize("m,k", [(1, 1024), (8, 4096)])  # one launch; K split (reduce adds them)
def test_cuda_dispatch_fuses_gate_product_and_residual(cuda_dispatch, m, k):
    n, gs = 512, 32
    wq, s, b = _quantized(n, k, 4, gs, mx.float16, seed=m)
    gu = mx.zeros((m, 2 * k), mx.float16)
    res = mx.zeros((m, n), mx.float16)
    y = qmm.quantized_matmul(gu, wq, s, b, group_size=gs, bits=4, residual=res, glu=True)
    assert y.shape == (m, n)
    main_spec, main = cuda_dispatch[0]
    assert main.inputs[0].shape == (m, 2 * k) and main_spec.source.count("true") >= 1  # GLU on
    if main.grid[1] > 1:
        assert main_spec.name == "bb_qmm_g" and "res" not in main_spec.input_names
        red_spec, red = cuda_dispatch[1]
        assert red_spec.name == "bb_qmm_red_r" and red.inputs[-1].shape == (m, n)
    else:
        assert main_spec.name == "bb_qmm_r_g" and main_spec.input_names[-1] == "res"
        assert main.inputs[-1].shape == (m, n) and len(cuda_dispatch) == 1


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_fallback_gate_product_and_residual(dtype):
    """Off CUDA, glu/residual are the MLX ops they replace: silu(gate) * up, then + residual."""
    n, k, gs = 96, 256, 64
    wq, s, b = _quantized(n, k, 4, gs, dtype, seed=7)
    rng = np.random.default_rng(7)
    gu = mx.array(rng.standard_normal((3, 2 * k)).astype(np.float32)).astype(dtype)
    res = mx.array(rng.standard_normal((3, n)).astype(np.float32)).astype(dtype)
    got = qmm.quantized_matmul(gu, wq, s, b, group_size=gs, bits=4, residual=res, glu=True)
    g, u = gu[:, :k], gu[:, k:]
    want = res + mx.quantized_matmul(nn.silu(g) * u, wq, s, b, transpose=True, group_size=gs, bits=4)
    assert np.array_equal(np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32)))
    with pytest.raises(ValueError, match="glu"):
        qmm.quantized_matmul(gu[:, :k], wq, s, b, group_size=gs, bits=4, glu=True)


@pytest.mark.parametrize("norm_split", [True, False])
def test_cuda_dispatch_fuses_rms_norm(cuda_dispatch, monkeypatch, norm_split):
    """The norm runs inside the matmul: whole rows of x in a block (one K-slice), or folded over
    a split K (the K-slices' sums of squares go to the reduce kernel, which scales by the row's
    rsqrt) with BB_QMM_NORM_SPLIT=1; by default (0, measured slower) mx.fast.rms_norm runs first there."""
    monkeypatch.setattr(qmm, "NORM_SPLIT", norm_split)
    n, k, gs = 512, 1024, 32
    wq, s, b = _quantized(n, k, 4, gs, mx.float16, seed=1)
    nw = mx.ones((k,), mx.float16)
    qmm.quantized_matmul(mx.zeros((2, k), mx.float16), wq, s, b, group_size=gs, bits=4, norm=(nw, 1e-6))
    spec1, l1 = cuda_dispatch[-1]
    assert spec1.name == "bb_qmm_n" and spec1.input_names[-1] == "nw" and l1.grid[1] == 1
    assert dict(l1.template)["EPS_BITS"] == np.array(1e-6, np.float32).view(np.int32)
    kk = 18944  # 64 rows of this x do not fit one block: K is split
    wq, s, b = _quantized(n, kk, 4, gs, mx.float16, seed=2)
    del cuda_dispatch[:]
    qmm.quantized_matmul(mx.zeros((64, kk), mx.float16), wq, s, b, group_size=gs, bits=4,
                         norm=(mx.ones((kk,), mx.float16), 1e-6))
    (spec2, l2), (rspec, rl) = [c for c in cuda_dispatch if c[0].name.startswith("bb_qmm")]
    assert l2.grid[1] > 1 and rspec.name.startswith("bb_qmm_red")
    if norm_split:
        assert spec2.name == "bb_qmm_nf" and spec2.input_names[-1] == "nw" and spec2.output_names == ("y", "ss")
        assert l2.output_shapes[1] == (l2.grid[1], 64) and dict(l2.template)["NPASS"]
        assert rspec.input_names[:2] == ("part", "ss") and rl.inputs[1].shape == (l2.grid[1], 64)
        assert dict(rl.template)["NK"] == kk and dict(rl.template)["EPS_BITS"] == dict(l2.template)["EPS_BITS"]
    else:
        assert spec2.name == "bb_qmm" and "nw" not in spec2.input_names and "ss" not in rspec.input_names


def test_fallback_rms_norm():
    n, k, gs = 96, 256, 64
    wq, s, b = _quantized(n, k, 4, gs, mx.float16, seed=8)
    rng = np.random.default_rng(8)
    x = mx.array(rng.standard_normal((3, k)).astype(np.float32)).astype(mx.float16)
    nw = mx.array(rng.uniform(0.5, 1.5, (k,)).astype(np.float32)).astype(mx.float16)
    got = qmm.quantized_matmul(x, wq, s, b, group_size=gs, bits=4, norm=(nw, 1e-5))
    want = mx.quantized_matmul(mx.fast.rms_norm(x, nw, 1e-5), wq, s, b, transpose=True, group_size=gs, bits=4)
    assert np.array_equal(np.array(got), np.array(want))
    with pytest.raises(ValueError, match="glu and norm"):
        qmm.quantized_matmul(x, wq, s, b, group_size=gs, bits=4, norm=(nw, 1e-5), glu=True)


@pytest.mark.parametrize("m,k,switch,fused", [(2, 1024, True, True), (8, 1024, True, True),
                                              (8, 1152, True, False), (8, 1024, False, False)])
def test_norm_fused_when_rows_fit_a_block(cuda_dispatch, monkeypatch, m, k, switch, fused):
    """The in-kernel norm sums squares while staging x, one warp per 32 granules of a row:
    it needs K % 256 == 0 (1152 is not) and is switched off by BB_QMM_FUSE_NORM=0."""
    monkeypatch.setattr(qmm, "FUSE_NORM", switch)
    n, gs = qmm._WIDE_N, 32
    wq, s, b = _quantized(n, k, 4, gs, mx.float16, seed=3)
    qmm.quantized_matmul(mx.zeros((m, k), mx.float16), wq, s, b, group_size=gs, bits=4,
                         norm=(mx.ones((k,), mx.float16), 1e-6))
    spec, _ = cuda_dispatch[-1]
    assert spec.name.endswith("_n") == fused


@pytest.mark.parametrize("m,n,k,lop3,wpack", [(1, 37888, 3584, 1, "pairs"), (8, 3584, 18944, 1, "pairs"),
                                              (32, 3584, 3584, 1, "pairs"), (32, 37888, 3584, 1, "pairs"),
                                              (32, 3584, 18944, 1, "pairs"), (32, 3584, 18944, 0, "0")])
def test_dequant_variant_follows_the_sweep(monkeypatch, m, n, k, lop3, wpack):
    """fp16 4-bit: the lop3 dequantization at one token tile, for narrow matrices and with the
    ring (wide matrices at M=32, and the long-K down projection there with the repacked
    weights); the byte-permute one for that down projection on register stages (BB_QMM_WPACK=0:
    measured slower there with lop3)."""
    monkeypatch.setattr(qmm, "WPACK", wpack)
    wq = mx.zeros((n, k // 8), mx.uint32)  # shapes are all the plan looks at
    s = b = mx.zeros((n, k // 32), mx.float16)
    _, launch = qmm.plan_quantized_matmul("cuda", mx.zeros((m, k), mx.float16), wq, s, b, group_size=32, bits=4)
    assert dict(launch.template)["DQ"] == lop3


def _paired_mlp(f: int = 64, k: int = 256, dtype=mx.float16):
    mx.random.seed(3)
    layers = [nn.QuantizedLinear.from_linear(nn.Linear(k, f, bias=False), group_size=32, bits=4) for _ in range(2)]
    for l in layers:
        l.set_dtype(dtype)
    return layers, qmm.FusedQuantizedLinear(layers, glu_pair=True), qmm.FusedQuantizedLinear(layers)


def test_glu_paired_rows_give_the_gate_product():
    """Rows in glu_pair_order: tile t holds gate rows 8t..8t+7, then the same up rows; fused()
    still returns [gate | up] and glu() returns silu(gate) * up (MLX ops on the CPU)."""
    order = qmm.glu_pair_order(32)
    assert sorted(order) == list(range(64)) and order[:16] == list(range(8)) + list(range(32, 40))
    (gate, up), paired, plain = _paired_mlp(dtype=mx.float32)
    assert paired.glu_paired and not plain.glu_paired
    x = mx.random.normal((2, 5, 256))
    np.testing.assert_array_equal(np.array(paired.fused(x)), np.array(plain.fused(x)))
    want = nn.silu(gate(x)) * up(x)
    np.testing.assert_allclose(np.array(paired.glu(x)), np.array(want), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(plain.glu(x)), np.array(want), rtol=1e-5, atol=1e-5)
    assert not mx.array_equal(paired["weight"], plain["weight"])


@pytest.mark.parametrize("m,split", [(1, False), (24, True)])
def test_cuda_dispatch_gate_product_in_the_gate_up_epilogue(cuda_dispatch, monkeypatch, m, split):
    """On CUDA the paired gate/up launch returns silu(gate) * up [M, F] (after a split K its
    reduce kernel does), and the down projection then takes x as it is (no gate product). The
    fp16 kernels: BB_QMM_X8=0 (on, one token goes to the int8 kernel: test_qmv8)."""
    monkeypatch.setattr(qmm, "X8", False)
    _, paired, _ = _paired_mlp(f=1024, k=4096)
    h = paired.glu(mx.zeros((1, m, 4096), mx.float16))
    assert h.shape == (1, m, 1024)
    names = [s.name for s, _ in cuda_dispatch]
    assert names == (["bb_qmm_glu"] if not split else ["bb_qmm", "bb_qmm_red_glu"]), names
    assert cuda_dispatch[-1][1].output_shapes == [(m, 1024)]


def test_long_k_at_one_token_takes_one_block_per_tile():
    """The down projection at M=1 (one K-slice) runs one block per tile, not the persistent
    grid (H200 tune, ninth session: 25.6 vs 28.1 us); shorter K keeps the persistent grid."""
    assert qmm.choose_config(1, 3584, 18944, 4).blocks == 0
    assert qmm.choose_config(1, 3584, 3584, 4).blocks > 0
    assert qmm.choose_config(2, 3584, 18944, 4).blocks > 0


def test_one_token_geometries_measured_in_session_17():
    """At M=1: q/k/v (288 tiles, 264 resident 256-thread blocks) runs one 128-thread block per
    tile with 4 chunks a stage; o_proj (224 tiles, one round already), gate/up and lm_head (many
    tiles) and every M above 1 keep 8 warps along K. The long-K down projection takes two
    chunks a stage, one block per tile, both stages preloaded."""
    qkv = qmm.choose_config(1, 4608, 3584, 4)
    assert (qkv.wk, qkv.p, qkv.blocks, qkv.grid_blocks(4608), qkv.pre) == (4, 4, 0, 288, False)
    assert qkv.grid_blocks(4608) <= qmm.NARROW_PER_SM * qmm.sm_count()
    for m, n, k in [(2, 4608, 3584), (8, 4608, 3584), (1, 3584, 3584), (1, 37888, 3584), (1, 152064, 3584),
                    (1, 4608, 8192)]:  # K too long for 8 chunks a warp at 4 warps
        assert qmm.choose_config(m, n, k, 4).wk != 4 or qmm.choose_config(m, n, k, 4).wn != 1, (m, n, k)
    down = qmm.choose_config(1, 3584, 18944, 4)
    assert (down.p, down.blocks, down.pre, down.s) == (2, 0, True, 1)
    # the vocabulary projection: 4 warps along N (even share: 2376 four-tile blocks on 264),
    # gate/up keeps one (its 2368 tiles in fours would fall 2.24 to a block)
    lm, gate_up = qmm.choose_config(1, 152064, 3584, 4), qmm.choose_config(1, 37888, 3584, 4)
    assert (lm.wn, lm.wk, lm.p, lm.grid_blocks(152064)) == (4, 2, 2, 264)
    assert (gate_up.wn, gate_up.wk) == (1, 8)


@pytest.mark.parametrize("switch", [0, 1, 2])
def test_persistent_grids_in_one_wave_unless_switched_off(monkeypatch, switch):
    """With BB_QMM_ONE_WAVE (2 by default) a persistent grid never asks for more blocks than fit: one 256-thread
    block per SM for four or more token tiles without the ring (150-175 registers), two
    otherwise, at most s - 1 of them unused. Off, the blocks per K-slice round up (the down
    projection at M=32: 266 blocks, three rounds on 132 SMs). With 2 the register-heavy ones
    also pick their K-slices for the least work on the busiest block, in shared memory that
    one block per SM has."""
    monkeypatch.setattr(qmm, "ONE_WAVE", switch)
    sms = qmm.sm_count()
    for n, k in MODEL_SHAPES + [(4608, 3584), (37888, 3584)]:
        nch = k // 128
        for m in range(1, qmm.MAX_M + 1):
            c = qmm.choose_config(m, n, k, 4)
            assert 1 <= c.s <= nch and c.smem(k, 4) <= qmm.SMEM_PER_SM, (m, n, k, c)
            if c.blocks <= 0 or not switch:
                continue
            fits = qmm._resident_blocks(c, k, 4)
            if c.mt >= 4 and not c.ns:
                assert fits == sms * max(1, 256 // (32 * c.wn * c.wk)), (m, n, k, c)
            asked = c.blocks * c.s  # K-slices with fewer tiles than blocks launch fewer
            assert fits - c.s < asked <= fits, (m, n, k, c)
    down = qmm.choose_config(32, 3584, 18944, 4)  # on the ring: one block an SM
    assert (down.s, down.grid_blocks(3584) * down.s) == {0: (14, 140), 1: (14, 126), 2: (9, 126)}[switch]
    monkeypatch.setattr(qmm, "WPACK", "0")  # register stages: two
    down = qmm.choose_config(32, 3584, 18944, 4)
    assert (down.s, down.grid_blocks(3584) * down.s) == {0: (14, 266), 1: (14, 126), 2: (9, 126)}[switch]
    down16 = qmm.choose_config(16, 3584, 18944, 4)
    assert down16.grid_blocks(3584) * down16.s == (259 if switch else 266)


def test_second_stage_preloaded_where_the_h200_measured_it_faster(monkeypatch):
    """Both register stages in flight before the x staging where a warp walks more than one
    round of chunks or a persistent block many tiles (one token tile), and for the long-K down
    projection at any M; never with the ring. BB_QMM_PRELOAD2=0 / 1 turn it off / on everywhere."""
    monkeypatch.setattr(qmm, "PRELOAD2", "auto")
    down, gate_up, qkv, o, lm_head = (3584, 18944), (37888, 3584), (4608, 3584), (3584, 3584), (152064, 3584)
    assert all(qmm.choose_config(m, *down, 4).pre for m in (1, 8, 16, 64))
    assert qmm.choose_config(32, *down, 4).ns  # the ring there (with BB_QMM_WPACK)
    monkeypatch.setattr(qmm, "WPACK", "0")
    assert qmm.choose_config(32, *down, 4).pre
    monkeypatch.setattr(qmm, "WPACK", "pairs")
    assert qmm.choose_config(8, *gate_up, 4).pre and not qmm.choose_config(1, *gate_up, 4).pre
    assert qmm.choose_config(1, *lm_head, 4).pre  # 14 chunks a warp, 9 four-tile blocks a persistent block
    assert not any(qmm.choose_config(m, *shape, 4).pre for m in (1, 8, 32) for shape in (qkv, o))
    ring = qmm.choose_config(32, *gate_up, 4)
    assert ring.ns and not ring.pre
    for setting, want in (("0", False), ("1", True)):
        monkeypatch.setattr(qmm, "PRELOAD2", setting)
        assert {qmm.choose_config(m, *shape, 4).pre for m in (1, 8, 32) for shape in (down, qkv, o)
                if not qmm.choose_config(m, *shape, 4).ns} == {want}
        assert not qmm.choose_config(32, *gate_up, 4).pre and not qmm.choose_config(32, *down, 4).pre


def test_env_settings_are_checked(monkeypatch):
    """The BB_QMM_* (and BB_ATTN_*) settings go through these two readers: a value they do not
    take is a one-line SettingError, not a silent default (which variable takes what is checked
    end to end in test_cli's bad environment settings)."""
    allowed = ("auto", "0", "1")
    monkeypatch.setenv("BB_TEST_SETTING", "3x")
    with pytest.raises(SettingError, match="BB_TEST_SETTING must be one of auto, 0, 1, not '3x'"):
        env_choice("BB_TEST_SETTING", "auto", allowed)
    with pytest.raises(SettingError, match="BB_TEST_SETTING must be a number, not '3x'"):
        env_number("BB_TEST_SETTING", 2)
    for v in allowed:
        monkeypatch.setenv("BB_TEST_SETTING", v)
        assert env_choice("BB_TEST_SETTING", "auto", allowed) == v
    monkeypatch.setenv("BB_TEST_SETTING", "0.5")
    assert env_number("BB_TEST_SETTING", 1.0, float) == 0.5
    monkeypatch.delenv("BB_TEST_SETTING")
    assert env_choice("BB_TEST_SETTING", "auto", allowed) == "auto"
    assert env_number("BB_TEST_SETTING", 7) == 7


def test_sm_count_setting(monkeypatch):
    """BATCHBENCH_SMS sizes the persistent grids (read when a config is chosen, on CUDA)."""
    monkeypatch.setenv("BATCHBENCH_SMS", "100")
    assert qmm.sm_count() == 100
    monkeypatch.setenv("BATCHBENCH_SMS", "many")
    with pytest.raises(SettingError, match="BATCHBENCH_SMS must be a number, not 'many'"):
        qmm.sm_count()


def test_config_larger_than_shared_memory_is_refused():
    """An explicit config whose x slice does not fit an SM's shared memory is a clear error, not
    a failed launch (H200: down at M=8 on one K-slice needs 303 KB; MLX's graph said "invalid
    argument"); choose_config's own configs all fit."""
    m, n, k = 8, 3584, 18944
    wq = mx.zeros((n, k // 8), mx.uint32)
    s = b = mx.zeros((n, k // 32), mx.float16)
    x = mx.zeros((m, k), mx.float16)
    big = dataclasses.replace(qmm.choose_config(m, n, k, 4), s=1)
    with pytest.raises(ValueError, match="shared memory"):
        qmm.plan_quantized_matmul("cuda", x, wq, s, b, group_size=32, bits=4, config=big)
    for mm in (1, 2, 8, 16, 32, 64):
        for nn, kk in ((4608, 3584), (3584, 3584), (37888, 3584), (3584, 18944), (152064, 3584)):
            assert qmm.choose_config(mm, nn, kk, 4).smem(kk, 4) <= qmm.SMEM_PER_SM


def test_folded_norm_needs_its_scratch(cuda_dispatch, monkeypatch):
    """A norm folded over a split K keeps per-segment sums of squares (8 granules of x each) in
    the reduction area: the decode shapes fit; a long slice on a one-warp block does not, and
    then the planner refuses it and the dispatch runs rms_norm first instead."""
    for m in (16, 32, 64):
        for n in (4608, 37888):
            assert qmm.choose_config(m, n, 3584, 4).fold_fits(3584, 4)
    m, n, k = 9, 32, 8192
    cfg = dataclasses.replace(qmm.choose_config(m, n, k, 4), wn=1, wk=1, s=2, blocks=0, ns=0)
    assert not cfg.fold_fits(k, 4)  # 32 chunks a slice: 64 segments > 1 x (16 + 4)
    wq = mx.zeros((n, k // 8), mx.uint32)
    s = b = mx.zeros((n, k // 32), mx.float16)
    nw = (mx.ones((k,), mx.float16), 1e-6)
    with pytest.raises(ValueError, match="fold_fits"):
        qmm.plan_quantized_matmul("cuda", mx.zeros((m, k), mx.float16), wq, s, b, group_size=32, bits=4,
                                  norm=nw, config=cfg)
    monkeypatch.setattr(qmm, "NORM_SPLIT", True)
    monkeypatch.setattr(qmm, "choose_config", lambda *a: cfg)
    qmm.quantized_matmul(mx.zeros((m, k), mx.float16), wq, s, b, group_size=32, bits=4, norm=nw)
    spec, launch = [c for c in cuda_dispatch if c[0].name.startswith("bb_qmm") and "red" not in c[0].name][-1]
    assert spec.name == "bb_qmm" and "nw" not in spec.input_names and launch.grid[1] == 2


@pytest.mark.parametrize("arch,kb", [("sm_90", 227), ("sm_80", 163), ("sm_89", 99), ("sm_999", 99)])
def test_shared_memory_a_block_by_architecture(monkeypatch, arch, kb):
    monkeypatch.delenv("BATCHBENCH_SMEM_KB", raising=False)
    monkeypatch.setattr(mx, "device_info", lambda: {"architecture": arch, "device_name": "x"})
    qmm._device_arch.cache_clear()
    try:
        assert qmm.smem_per_block() == kb * 1024
    finally:
        qmm._device_arch.cache_clear()
    monkeypatch.setenv("BATCHBENCH_SMEM_KB", "lots")
    with pytest.raises(SettingError, match="BATCHBENCH_SMEM_KB"):
        qmm.smem_per_block()


def test_matmul_too_big_for_the_gpu_runs_mlx(cuda_dispatch, monkeypatch, capsys):
    """The configs were tuned on the H200 (227 KB of shared memory a block). On a GPU with less
    (99 KB: sm_86/89, L4, 4090) a call whose config needs more runs mx.quantized_matmul instead
    of failing inside MLX's graph; small ones keep the kernel."""
    m, n, k = 16, 256, 11264  # a long K at 16 rows: more than 99 KB of x slice and reduction area
    wq, s, b = _quantized(n, k, 4, 32, mx.float16, seed=4)
    x = mx.array(np.random.default_rng(4).standard_normal((m, k)).astype(np.float32)).astype(mx.float16)
    fits = lambda mm, nn, kk: qmm.fits_device(qmm.choose_config(mm, nn, kk, 4), kk, 4)  # noqa: E731
    assert fits(m, n, k)  # the fixture's H200
    qmm.quantized_matmul(x, wq, s, b, group_size=32, bits=4)
    assert any(c[0].name.startswith("bb_qmm") for c in cuda_dispatch)
    del cuda_dispatch[:]
    monkeypatch.setenv("BATCHBENCH_SMEM_KB", "99")
    monkeypatch.setattr(qmm, "_NOTED_TOO_BIG", set())
    assert not fits(m, n, k) and fits(1, 512, 1024)
    got = qmm.quantized_matmul(x, wq, s, b, group_size=32, bits=4)
    assert not cuda_dispatch
    assert "mx.quantized_matmul runs it" in capsys.readouterr().err
    want = mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=32, bits=4)
    assert np.array_equal(np.array(got), np.array(want))


def _qlinear(n, k, seed, dtype=mx.float16):
    lin = nn.QuantizedLinear(k, n, bias=False, group_size=32, bits=4)
    lin.weight, lin.scales, lin.biases = _quantized(n, k, 4, 32, dtype, seed)
    return qmm.QuantizedLinear.from_quantized(lin)


@pytest.mark.parametrize("m,switch,fused", [(32, True, True), (2, True, False), (32, False, False)])
def test_linear_norm_writes_the_next_norm_in_the_reduce(cuda_dispatch, monkeypatch, m, switch, fused):
    """o_proj with its residual, then the MLP's RMSNorm: after a split K (M=32 on the 7B shape)
    the reduce kernel writes norm(h) beside h and the MLP gets no norm to apply; with one
    K-slice (M=2, no reduce) or BB_QMM_NORM_OUT=0 the MLP keeps the norm (fused in its launch).
    BB_QMM_NORM_PRE is off here: what it does at one K-slice is the next test's."""
    monkeypatch.setattr(qmm, "NORM_OUT", switch)
    monkeypatch.setattr(qmm, "NORM_PRE", False)
    n = k = 3584
    layer = _qlinear(n, k, seed=11)
    norm = nn.RMSNorm(n, eps=1e-6)
    norm.weight = norm.weight.astype(mx.float16)
    x, res = mx.zeros((1, m, k), mx.float16), mx.zeros((1, m, n), mx.float16)
    h, x_n, left = qmm.linear_norm(layer, x, residual=res, norm=norm)
    last, ll = cuda_dispatch[-1]
    assert h.shape == x_n.shape == (1, m, n)
    if fused:
        assert last.name == "bb_qmm_redn_r" and last.output_names == ("y", "yn") and left is None
        assert ll.inputs[-1] is norm.weight and ll.grid == (m * ll.threadgroup[0], 1, 1)
        assert dict(ll.template)["EPS_BITS"] == np.array(1e-6, np.float32).view(np.int32)
        assert x_n is not h
    else:
        assert left is norm and x_n is h and not last.name.startswith("bb_qmm_redn")


def test_linear_norm_off_cuda_leaves_the_norm_to_the_next_layer():
    """On the CPU (and for layers that are not ours) h = layer(x) + residual as `linear`, and the
    norm is handed on untouched."""
    layer = _qlinear(96, 256, seed=12)
    rng = np.random.default_rng(12)
    x = mx.array(rng.standard_normal((1, 3, 256)).astype(np.float32)).astype(mx.float16)
    res = mx.array(rng.standard_normal((1, 3, 96)).astype(np.float32)).astype(mx.float16)
    norm = nn.RMSNorm(96)
    for lay in (layer, nn.Linear(256, 96)):
        lay = lay if isinstance(lay, qmm.QuantizedLinear) else lay.update(
            {"weight": lay.weight.astype(mx.float16), "bias": lay.bias.astype(mx.float16)})
        h, x_n, left = qmm.linear_norm(lay, x, residual=res, norm=norm)
        assert x_n is h and left is norm
        assert np.array_equal(np.array(h), np.array(qmm.linear(lay, x, residual=res)))


@pytest.mark.parametrize("switch", [True, False])
def test_partials_in_fp16_for_fp16_activations(monkeypatch, switch):
    """BB_QMM_PART16: a split K's partials are fp16 with fp16 activations (not under a folded norm,
    nor with bf16); off, fp32 everywhere. The reduce kernels take either (others: an error)."""
    monkeypatch.setattr(qmm, "PART16", switch)
    wq, s, b = _quantized(64, 1024, 4, 32, mx.float16, seed=3)
    cfg = qmm.QmmConfig(1, 1, 8, 2, 2, 8)
    for dtype, norm, want in ((mx.float16, None, mx.float16 if switch else mx.float32), (mx.bfloat16, None, mx.float32),
                              (mx.float16, (mx.ones((1024,), mx.float16), 1e-5), mx.float32)):
        x = mx.zeros((5, 1024), dtype)
        sb = [a.astype(dtype) for a in (s, b)]
        _, launch = qmm.plan_quantized_matmul("cuda", x, wq, *sb, group_size=32, bits=4, config=cfg, norm=norm)
        assert launch.output_dtypes[0] == want and launch.output_shapes[0] == (2, 5, 64)
    with pytest.raises(ValueError, match="float32 or float16"):
        qmm.plan_qmm_reduce(mx.zeros((2, 5, 64), mx.bfloat16), mx.bfloat16)


@pytest.mark.parametrize("value,want", [(None, "True"), ("1", "True"), ("0", "False")])
def test_bb_qmm_part16_values(value, want):
    """BB_QMM_PART16 is on by default (fp16 partials); read once, at import."""
    assert qmm_setting_read("BB_QMM_PART16", value, "qmm.PART16") == [want]


def test_reduce_norm_refuses_what_it_cannot_do():
    part = mx.zeros((2, 4, 64), mx.float32)
    nw = mx.ones((64,), mx.float16)
    spec, launch = qmm.plan_qmm_reduce(part, mx.float16, norm_out=(nw, 1e-5))
    assert launch.threadgroup == (32, 1, 1) and dict(launch.template)["NG"] == 1
    with pytest.raises(ValueError, match="output norm's weight"):
        qmm.plan_qmm_reduce(part, mx.float16, norm_out=(mx.ones((32,), mx.float16), 1e-5))
    with pytest.raises(ValueError, match="output norm's weight"):
        qmm.plan_qmm_reduce(part, mx.float16, norm_out=(nw.astype(mx.float32), 1e-5))
    with pytest.raises(ValueError, match="plain epilogue"):
        qmm.plan_qmm_reduce(part, mx.float16, glu_pair=True, norm_out=(nw, 1e-5))
    wide = mx.zeros((2, 1, 8 * qmm.REDUCE_NORM_THREADS * qmm.REDUCE_NORM_MAX_NG + 8), mx.float32)
    with pytest.raises(ValueError, match="N % 8"):
        qmm.plan_qmm_reduce(wide, mx.float16, norm_out=(mx.ones((wide.shape[2],), mx.float16), 1e-5))
    assert qmm._reduce_norm_geometry(3584) == (448, 1) and qmm._reduce_norm_geometry(4352) == (512, 2)


@pytest.mark.parametrize("switch", [True, False])
def test_norm_split_with_its_producer_on_one_k_slice(cuda_dispatch, monkeypatch, switch):
    """BB_QMM_NORM_PRE: o_proj at M=1 (one K-slice) writes h, h * weight and its tiles' sums of
    squares; the next matmul takes them as a PendingNorm (NPRE, no norm passes of its own), or
    applies it by MLX ops where it splits K. Off: the norm is handed on, as before. The fp16
    kernels: BB_QMM_X8=0."""
    monkeypatch.setattr(qmm, "NORM_PRE", switch)
    monkeypatch.setattr(qmm, "X8", False)
    n = k = 3584
    layer = _qlinear(n, k, seed=13)
    norm = nn.RMSNorm(n, eps=1e-6)
    norm.weight = norm.weight.astype(mx.float16)
    h, x_n, left = qmm.linear_norm(layer, mx.zeros((1, 1, k), mx.float16), residual=mx.zeros((1, 1, n), mx.float16),
                                   norm=norm)
    spec, launch = cuda_dispatch[-1]
    if not switch:
        assert left is norm and x_n is h and spec.name == "bb_qmm_r"
        return
    assert spec.name == "bb_qmm_r_no" and spec.output_names == ("y", "yw", "ssp") and launch.inputs[-1] is norm.weight
    assert isinstance(left, qmm.PendingNorm) and left.ss.shape == (n // 16, 1) and left.eps == pytest.approx(1e-6)
    assert x_n.shape == h.shape == (1, 1, n) and x_n is not h
    wq, s, b = _quantized(4608, k, 4, 32, mx.float16, seed=14)
    qmm.quantized_matmul(x_n, wq, s, b, group_size=32, bits=4, norm=qmm._norm_args(left))
    spec, launch = cuda_dispatch[-1]
    assert spec.name == "bb_qmm_np" and spec.input_names[-1] == "pss" and launch.inputs[-1] is left.ss
    assert dict(launch.template)["EPS_BITS"] == np.array(1e-6, np.float32).view(np.int32)
    # a consumer that splits K (M=32) cannot take it: x * rs by MLX ops first, a plain matmul
    pending = qmm.PendingNorm(mx.ones((n // 16, 32), mx.float32), 1e-6)
    del cuda_dispatch[:]
    qmm.quantized_matmul(mx.ones((32, k), mx.float16), wq, s, b, group_size=32, bits=4, norm=pending)
    assert [c[0].name for c in cuda_dispatch] == ["bb_qmm", "bb_qmm_red"]


def test_pending_norm_applied_by_mlx_ops_is_the_rms_norm():
    """What a consumer without the kernel does with a PendingNorm: x * rsqrt(mean(y^2) + eps)
    with x = y * weight, i.e. mx.fast.rms_norm(y, weight, eps); take_rows keeps rows' sums."""
    rng = np.random.default_rng(15)
    y = mx.array(rng.standard_normal((1, 5, 256)).astype(np.float32))
    wt = mx.array(rng.uniform(0.5, 1.5, (256,)).astype(np.float32))
    ss = (y[0] ** 2).reshape(5, 16, 16).sum(axis=-1).T
    pn = qmm.PendingNorm(ss, 1e-5)
    want = mx.fast.rms_norm(y, wt, 1e-5)
    np.testing.assert_allclose(np.array(pn(y * wt)), np.array(want), rtol=1e-5, atol=1e-5)
    rows = mx.array([4, 1])
    np.testing.assert_allclose(np.array(pn.take_rows(rows)((y * wt)[:, rows])), np.array(want[:, rows]),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["lop3", "lop3b"])
def test_bias_sums_dequantization_only_at_one_token(cuda_dispatch, monkeypatch, mode):
    """BB_QMM_DQ=lop3b: one token's fp16 4-bit matmul dequantizes without the bias (DQ = 2) and
    stages one float per 32 k of x beside the reduction area; at two tokens, with a fused norm
    or in bf16 it keeps the plain lop3 (DQ = 1). Forced where it cannot run: a one-line error.
    The fp16 kernels: BB_QMM_X8=0."""
    monkeypatch.setattr(qmm, "DQ_MODE", mode)
    monkeypatch.setattr(qmm, "X8", False)
    n, k = 4608, 3584
    wq, s, b = _quantized(n, k, 4, 32, mx.float16, seed=16)
    dq = {}
    for m in (1, 2):
        qmm.quantized_matmul(mx.zeros((m, k), mx.float16), wq, s, b, group_size=32, bits=4)
        spec, launch = cuda_dispatch[-1]
        dq[m] = dict(launch.template)["DQ"]
        cfg = qmm.choose_config(m, n, k, 4)
        extra = k // 32 * 4 if dq[m] == 2 else 0
        assert spec.shared_memory == -(-(cfg.smem(k, 4) + extra) // qmm.SMEM_STEP) * qmm.SMEM_STEP
    assert dq == ({1: 2, 2: 1} if mode == "lop3b" else {1: 1, 2: 1})
    qmm.quantized_matmul(mx.zeros((1, k), mx.float16), wq, s, b, group_size=32, bits=4,
                         norm=(mx.ones((k,), mx.float16), 1e-6))
    assert dict(cuda_dispatch[-1][1].template)["DQ"] == 1
    x = mx.zeros((2, k), mx.float16)
    with pytest.raises(ValueError, match="without the bias needs one token"):
        qmm.plan_quantized_matmul("cuda", x, wq, s, b, group_size=32, bits=4, bias_sums=True)


def test_warps_along_k_that_divide_the_chunks(monkeypatch):
    """BB_QMM_WK_DIVIDE: one token tile, one K-slice, register stages, and the warps along K do
    not divide the chunks: the most warps, down to 3/4 of them, that do (K = 3584: 28 chunks,
    7 warps; K = 1536: 12 chunks, 6). Chunk counts no such warp count divides, split K and
    several token tiles keep their config; off, nothing changes; `narrow` leaves matrices of
    _WIDE_N features or more (the gate/up pair) as they are."""
    shapes = dict(gu1=(1, 37888, 3584), o8=(8, 3584, 3584), down1=(1, 3584, 18944), down8=(8, 3584, 18944),
                  o32=(32, 3584, 3584), o15=(1, 1536, 1536), qkv1=(1, 4608, 3584))

    def configs(switch: str) -> dict:
        monkeypatch.setattr(qmm, "WK_DIVIDE", switch)
        return {s: qmm.choose_config(m, n, k, 4) for s, (m, n, k) in shapes.items()}

    off, on, narrow = configs("0"), configs("1"), configs("narrow")
    assert {s: c.wk for s, c in off.items()} == dict(gu1=8, o8=8, down1=8, down8=8, o32=2, o15=8, qkv1=4)
    assert {s: c.wk for s, c in on.items()} == dict(gu1=7, o8=7, down1=8, down8=8, o32=2, o15=6, qkv1=4)
    for s in ("down1", "down8", "o32", "qkv1"):
        assert on[s] == off[s]
    assert narrow == dict(on, gu1=off["gu1"])
    # the persistent grid is sized for the new block (two 224-thread blocks an SM)
    assert on["gu1"].blocks == qmm.persistent(dataclasses.replace(on["gu1"], blocks=0), 3584, 4).blocks


def test_packed_scales_and_biases_replace_the_two_arrays():
    """BB_QMM_SB_PACK: `pack_scales_biases` puts each group's (scale, bias) in one 4-byte word,
    scale in the low half; a launch with them reads that array in place of the two (SBP), on
    register stages and on the ring; a packed array of the wrong shape or dtype is a one-line
    error."""
    rng = np.random.default_rng(3)
    w = mx.array(rng.standard_normal((64, 512)).astype(np.float32)).astype(mx.float16)
    wq, s, b = mx.quantize(w, group_size=32, bits=4)
    packed = qmm.pack_scales_biases(s, b)
    words = np.array(packed).view(np.uint32)[..., 0]
    assert words.shape == s.shape
    assert np.array_equal(words & 0xFFFF, np.array(s).view(np.uint16))
    assert np.array_equal(words >> 16, np.array(b).view(np.uint16))
    x = mx.zeros((1, 512), mx.float16)
    for ns in (0, 4):
        cfg = dataclasses.replace(qmm.choose_config(1, 64, 512, 4), ns=ns)
        for p, sbp in ((packed, True), (None, False)):
            _, launch = qmm.plan_quantized_matmul("cuda", x, wq, s, b, group_size=32, bits=4, config=cfg, packed=p)
            assert dict(launch.template)["SBP"] is sbp
            want = (packed, packed) if sbp else (s, b)
            assert all(got is arr for got, arr in zip(launch.inputs[2:4], want))
    for bad in (packed[:32], packed.astype(mx.bfloat16), mx.stack([s, b, b], axis=-1)):
        with pytest.raises(ValueError, match="packed scales and biases must be"):
            qmm.plan_quantized_matmul("cuda", x, wq, s, b, group_size=32, bits=4, packed=bad)


@pytest.mark.parametrize("sb_pack,wpack", [("1", False), ("0", True), ("1", True), ("0", False)])
def test_packed_bytes_count_every_quantized_linear(monkeypatch, sb_pack, wpack):
    """`packed_bytes` on CUDA: what the swaps' copies add, each quantized linear's scales and biases
    again (BB_QMM_SB_PACK) and its weights again (BB_QMM_WPACK); the preset's estimate
    (weight_bytes with packed, wpacked) agrees with it. Another back-end: nothing."""
    from batchbench.presets import make_preset, weight_bytes

    monkeypatch.setattr(qmm, "SB_PACK", sb_pack)
    monkeypatch.setattr(qmm, "WPACK", "1" if wpack else "0")
    model, cfg = make_preset("tiny", mx.float16, "q4_0")
    layers = [m for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert layers and qmm.packed_bytes(model) == 0  # the CPU back-end
    monkeypatch.setattr(qmm.backend, "BACKEND", "cuda")
    want = (sum(l["scales"].nbytes * 2 for l in layers) if sb_pack == "1" else 0) + \
        (sum(l["weight"].nbytes for l in layers) if wpack else 0)
    assert qmm.packed_bytes(model) == want
    extra = (weight_bytes(cfg, mx.float16, "q4_0", packed=sb_pack == "1", wpacked=wpack)
             - weight_bytes(cfg, mx.float16, "q4_0"))
    assert extra == pytest.approx(want, rel=0.01, abs=0)


@pytest.mark.parametrize("sb_pack,wpack,named", [("1", False, "packed scales"), ("0", True, "repacked weights"),
                                                 ("1", True, "packed scales .*BB_QMM_SB_PACK=0.* and repacked weights")])
def test_packing_is_checked_against_memory_before_it_is_made(monkeypatch, sb_pack, wpack, named):
    """With BB_QMM_SB_PACK or BB_QMM_WPACK on CUDA, `run.load` checks the copies against the free
    memory before the swaps make them: a clear MemoryError naming them."""
    from batchbench import run
    from batchbench.presets import make_preset

    checked = []

    def check_fits(needed: int, what: str) -> None:
        checked.append(what)
        raise MemoryError(f"{what} needs about {needed} bytes")

    monkeypatch.setattr(qmm, "SB_PACK", sb_pack)
    monkeypatch.setattr(qmm, "WPACK", "1" if wpack else "0")
    monkeypatch.setattr(run.backend, "BACKEND", "cuda")
    monkeypatch.setattr(run, "_load", lambda values, dtype: (
        make_preset("tiny", mx.float16, "q4_0")[0], {}, "tiny", "q4_0", 512))
    monkeypatch.setattr(run, "check_fits", check_fits)
    with pytest.raises(MemoryError, match=f"tiny with {named} .*leaves them out"):
        run.load({}, mx.float16)
    assert len(checked) == 1


@pytest.mark.parametrize("pack,quant,back,wpack", [(True, "q4_0", "cuda", False), (False, "q4_0", "cuda", False),
                                                   (True, "none", "cuda", True), (True, "q4_0", "cpu", True),
                                                   (True, "q4_0", "cuda", True), (False, "q4_0", "cuda", True)])
def test_preset_memory_check_counts_the_packed_pairs_and_says_how_to_drop_them(monkeypatch, pack, quant, back, wpack):
    """A preset's memory check before anything is built: with BB_QMM_SB_PACK on CUDA (the default
    there) it counts the packed pairs of the quantized linears, with BB_QMM_WPACK their repacked
    weights, and its error says how to leave each out; unquantized presets and other back-ends
    have none."""
    from batchbench import run
    from batchbench.presets import preset_config, weight_bytes

    checked = []

    def check_fits(needed: int, what: str) -> None:
        checked.append((needed, what))
        raise MemoryError(what)

    monkeypatch.setattr(qmm, "SB_PACK", "1" if pack else "0")
    monkeypatch.setattr(qmm, "WPACK", "1" if wpack else "0")
    monkeypatch.setattr(run.backend, "BACKEND", back)
    monkeypatch.setattr(run, "check_fits", check_fits)
    with pytest.raises(MemoryError):
        run._load({"model": "preset:qwen2.5-7b", "quant": quant}, mx.float16)
    (needed, what), = checked
    packed = pack and quant != "none" and back == "cuda"
    wpacked = wpack and quant != "none" and back == "cuda"
    assert needed == weight_bytes(preset_config("qwen2.5-7b"), mx.float16, quant, packed=packed, wpacked=wpacked)
    assert ("BB_QMM_SB_PACK=0" in what) == packed
    assert ("BB_QMM_WPACK=0" in what) == wpacked


@pytest.mark.parametrize("mode", ["1", "norope"])
def test_norope_reads_the_two_arrays_only_where_rope_is_the_matmuls_epilogue(monkeypatch, mode):
    """BB_QMM_SB_PACK=norope: the layers keep their pairs, but q/k/v whose RoPE epilogue is in the
    matmul (one K-slice) gets the two arrays; over a split K (RoPE in the reduce) and without
    RoPE the kernel gets the pairs, as with 1."""
    x = mx.zeros((1, 512), mx.float16)
    wq, s, b = mx.quantize(mx.zeros((256, 512), mx.float16), group_size=32, bits=4)
    packed = qmm.pack_scales_biases(s, b)
    seen = []

    class Planned(Exception):
        pass

    def plan(*args, packed=None, config=None, **kw):
        seen.append((config.s, kw["rope"] is not None, packed is not None))
        raise Planned

    monkeypatch.setattr(qmm, "SB_PACK", mode)
    monkeypatch.setattr(qmm, "plan_quantized_matmul", plan)
    one = qmm.QmmConfig(mt=1, wn=2, wk=4, p=2, s=1, mrows=1)
    split = dataclasses.replace(one, s=2)
    for cfg, rope in ((one, object()), (split, object()), (one, None)):
        with pytest.raises(Planned):
            qmm._run_kernel(cfg, x, wq, s, b, 32, 4, 1, 256, 512, None, None, False, None, rope=rope, packed=packed)
    assert seen == [(1, True, mode == "1"), (2, True, True), (1, False, True)]


def test_subnormal_dequantization_only_where_it_is_exact(monkeypatch):
    """BB_QMM_DQ=sub (the default): the fp16 4-bit lop3 path takes DQ = 3 when the caller knows
    max |scales| < 2 (s * 2^15 must stay finite in fp16) and the scales come packed; unknown or
    larger scales, unpacked scales, bf16, the byte-permute path or BB_QMM_DQ=lop3 keep DQ = 1 / 0.
    Asked for where it cannot run: a one-line error."""
    monkeypatch.setattr(qmm, "DQ_MODE", "sub")
    m, n, k = 8, 37888, 3584
    wq = mx.zeros((n, k // 8), mx.uint32)
    s = b = mx.zeros((n, k // 32), mx.float16)
    packed = mx.zeros((n, k // 32, 2), mx.float16)
    x = mx.zeros((m, k), mx.float16)

    def dq(**kw):
        _, launch = qmm.plan_quantized_matmul("cuda", kw.pop("x", x), wq, kw.pop("s", s), kw.pop("b", b),
                                              group_size=32, bits=4, **kw)
        return dict(launch.template)["DQ"]

    assert dq(packed=packed, scale_max=1.99) == 3
    assert dq(packed=packed, scale_max=2.0) == 1
    assert dq(packed=packed) == 1
    assert dq(scale_max=0.5) == 1
    assert dq(scale_max=0.5, sub=True) == 3  # forced: the unpacked variant runs too (verify cases)
    assert dq(packed=packed, scale_max=0.5, lop3=False) == 0
    bf = mx.zeros((n, k // 32), mx.bfloat16)
    assert dq(x=x.astype(mx.bfloat16), s=bf, b=bf, packed=packed.astype(mx.bfloat16), scale_max=0.5) == 1
    with pytest.raises(ValueError, match="subnormal dequantization needs"):
        dq(packed=packed, sub=True)
    monkeypatch.setattr(qmm, "DQ_MODE", "lop3")
    assert dq(packed=packed, scale_max=0.5) == 1


@pytest.mark.parametrize("factor,want", [(1.0, 3), (80.0, 1)])
def test_swapped_layers_note_their_scale_bound(cuda_dispatch, monkeypatch, factor, want):
    """On CUDA with BB_QMM_DQ=sub a swapped layer notes max |scales| once; its matmuls at 8 tokens
    then take the subnormal dequantization, unless a scale reaches 2 (weights of std 0.05 give
    scales near 0.02; times 80 some pass 2)."""
    monkeypatch.setattr(qmm, "DQ_MODE", "sub")
    monkeypatch.setattr(qmm, "SB_PACK", "1")
    monkeypatch.setattr(qmm, "X8", False)
    n, k = 512, 3584
    wq, s, b = _quantized(n, k, 4, 32, mx.float16, seed=21)
    layer = nn.QuantizedLinear(k, n, bias=False, group_size=32, bits=4)
    layer.weight, layer.scales, layer.biases = wq, s * factor, b * factor
    fast = qmm.QuantizedLinear.from_quantized(layer)
    assert fast.scale_max == pytest.approx(float(mx.max(mx.abs(layer.scales)).item()))
    assert (fast.scale_max < 2) == (want == 3)
    fast(mx.zeros((8, k), mx.float16))
    assert dict(cuda_dispatch[-1][1].template)["DQ"] == want


@pytest.mark.parametrize("value,want", [(None, "sub"), ("lop3", "lop3"), ("sub", "sub")])
def test_bb_qmm_dq_values(value, want):
    """BB_QMM_DQ is read once, when qmm is first imported (a fresh interpreter each); sub is the
    default."""
    assert qmm_setting_read("BB_QMM_DQ", value, "qmm.DQ_MODE") == [want]


def test_sub_takes_the_long_k_narrow_matrices(monkeypatch):
    """With BB_QMM_DQ=sub, packed scales below 2: the long-K down projection at M=32 on register
    stages (byte permutes under lop3) takes the subnormal dequantization (DQ = 3); without what
    sub needs, or with lop3 asked off, it keeps the byte permutes (DQ = 0). Wide matrices at two
    token tiles keep theirs (not measured with sub)."""
    m, n, k = 32, 3584, 18944
    wq = mx.zeros((n, k // 8), mx.uint32)
    s = b = mx.zeros((n, k // 32), mx.float16)
    packed = mx.zeros((n, k // 32, 2), mx.float16)
    x = mx.zeros((m, k), mx.float16)
    monkeypatch.setattr(qmm, "WPACK", "0")  # register stages (with the repacked weights: the ring)

    def dq(mode, **kw):
        monkeypatch.setattr(qmm, "DQ_MODE", mode)
        return dict(qmm.plan_quantized_matmul("cuda", x, wq, s, b, group_size=32, bits=4, **kw)[1].template)["DQ"]

    assert dq("sub", packed=packed, scale_max=0.5) == 3
    assert dq("sub", packed=packed, scale_max=2.5) == 0
    assert dq("sub", scale_max=0.5) == 0
    assert dq("sub", packed=packed, scale_max=0.5, lop3=False) == 0
    assert dq("lop3", packed=packed, scale_max=0.5) == 0
    n2, m2 = 37888, 16  # gate/up at M=16: two token tiles, register stages, byte permutes
    wq2, s2 = mx.zeros((n2, 3584 // 8), mx.uint32), mx.zeros((n2, 3584 // 32), mx.float16)
    monkeypatch.setattr(qmm, "DQ_MODE", "sub")
    _, launch = qmm.plan_quantized_matmul("cuda", mx.zeros((m2, 3584), mx.float16), wq2, s2, s2, group_size=32,
                                          bits=4, packed=mx.zeros((n2, 3584 // 32, 2), mx.float16), scale_max=0.5)
    cfg = qmm.choose_config(m2, n2, 3584, 4)
    assert cfg.mt == 2 and cfg.ns == 0 and dict(launch.template)["DQ"] == 0


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_weights_puts_each_lane_s_16_bytes_in_load_order(bits):
    """`pack_weights`: per 16-row block and chunk (64 bytes a row), 1 KB with rows 0-7 first, each
    row's 64 bytes as lanes 4 * row + t take them; shape and dtype kept. Shapes the kernel does
    not cover: a one-line error."""
    n, k = 48, 3 * qmm.chunk_k(bits)
    kw = k * bits // 32
    w = mx.array(np.arange(n * kw, dtype=np.uint32).reshape(n, kw))
    got = np.array(qmm.pack_weights(w, bits)).reshape(-1)
    src = np.array(w)
    want = np.empty(n * kw, np.uint32)
    nch = k // qmm.chunk_k(bits)
    for r in range(n):
        for c in range(nch):
            for t in range(4):
                lane = 4 * (r % 8) + t
                at = ((r // 16 * nch + c) * 2 + (r % 16) // 8) * 128 + lane * 4
                want[at:at + 4] = src[r, c * 16 + t * 4:c * 16 + t * 4 + 4]
    np.testing.assert_array_equal(got, want)
    assert qmm.pack_weights(w, bits).shape == w.shape and qmm.pack_weights(w, bits).dtype == mx.uint32
    with pytest.raises(ValueError, match="pack_weights: needs N % 16 == 0"):
        qmm.pack_weights(w[:40], bits)


@pytest.mark.parametrize("group_size", [32, 64])
def test_pack_pairs_puts_a_block_s_chunk_of_pairs_together_in_row_order(group_size):
    """`pack_pairs`: per 16-row block and chunk (128 k at 4 bits), the chunk's CPG pairs of rows
    0-15 in row order, as a ring slot holds them; shape and dtype kept. Groups that straddle
    chunks (8 bits, group 128), or rows that are not whole tiles: a one-line error."""
    n, k, bits = 48, 3 * qmm.chunk_k(4), 4
    ng = k // group_size
    src = np.arange(n * ng * 2, dtype=np.float16).reshape(n, ng, 2)
    got = np.array(qmm.pack_pairs(mx.array(src), bits, group_size)).reshape(-1, 2)
    cpg, nch = qmm.chunk_k(bits) // group_size, k // qmm.chunk_k(bits)
    want = np.empty((n * ng, 2), np.float16)
    for r in range(n):
        for q in range(ng):
            c, j = divmod(q, cpg)
            want[((r // 16 * nch + c) * 16 + r % 16) * cpg + j] = src[r, q]
    np.testing.assert_array_equal(got, want)
    packed = qmm.pack_pairs(mx.array(src), bits, group_size)
    assert packed.shape == src.shape and packed.dtype == mx.float16
    with pytest.raises(ValueError, match="pack_pairs: needs N % 16 == 0"):
        qmm.pack_pairs(mx.array(src[:40]), bits, group_size)
    with pytest.raises(ValueError, match="groups dividing it"):
        qmm.pack_pairs(mx.zeros((16, 2, 2), mx.float16), 8, 128)


@pytest.mark.parametrize("mode", ["1", "0", "pairs"])
def test_swapped_layers_keep_repacked_weights_for_the_fp16_kernel(cuda_dispatch, monkeypatch, mode):
    """BB_QMM_WPACK=1 on CUDA: a swapped layer keeps `pack_weights` of its weights, which the fp16
    kernel reads (WP = 1); the int8 kernel (one token) still reads MLX's layout. Off: no copy.
    pairs: the packed pairs are `pack_pairs`' in place of the row-order ones (WP = 2)."""
    monkeypatch.setattr(qmm, "WPACK", mode)
    monkeypatch.setattr(qmm, "SB_PACK", "1")
    monkeypatch.setattr(qmm, "X8", True)
    on = mode != "0"
    n, k = 512, 3584
    wq, s, b = _quantized(n, k, 4, 32, mx.float16, seed=22)
    layer = nn.QuantizedLinear(k, n, bias=False, group_size=32, bits=4)
    layer.weight, layer.scales, layer.biases = wq, s, b
    fast = qmm.QuantizedLinear.from_quantized(layer)
    assert ("wpack" in fast) == on
    rows = np.array(qmm.pack_scales_biases(s, b))
    want_pairs = np.array(qmm.pack_pairs(mx.array(rows), 4, 32)) if mode == "pairs" else rows
    np.testing.assert_array_equal(np.array(fast["packed"]), want_pairs)
    fast(mx.zeros((8, k), mx.float16))
    spec, launch = cuda_dispatch[-1]
    assert dict(launch.template)["WP"] == {"0": 0, "1": 1, "pairs": 2}[mode]
    assert launch.inputs[1] is (fast["wpack"] if on else fast["weight"]) and launch.inputs[2] is fast["packed"]
    fast(mx.zeros((1, k), mx.float16))
    spec, launch = cuda_dispatch[-1]
    assert spec.name.startswith("bb_qmv8") and launch.inputs[1] is fast["weight"]


def test_repacked_pairs_need_what_their_layout_assumes():
    """ppack without the repacked weights or the pairs, or with groups that straddle a chunk:
    a one-line error, not a kernel reading the wrong bytes."""
    n, k = 64, 512
    x = mx.zeros((8, k), mx.float16)
    wq, s, b = _quantized(n, k, 4, 32, mx.float16, seed=3)
    packed = qmm.pack_pairs(qmm.pack_scales_biases(s, b), 4, 32)
    for kw in (dict(packed=packed), dict(wpack=qmm.pack_weights(wq, 4))):
        with pytest.raises(ValueError, match="repacked pairs come with"):
            qmm.plan_quantized_matmul("cuda", x, wq, s, b, group_size=32, bits=4, ppack=True, **kw)


@pytest.mark.parametrize("value,want", [(None, "pairs"), ("1", "1"), ("0", "0"), ("pairs", "pairs")])
def test_bb_qmm_wpack_values(value, want):
    """BB_QMM_WPACK is pairs (weights and pairs repacked) by default; read once, when qmm is first imported."""
    assert qmm_setting_read("BB_QMM_WPACK", value, "qmm.WPACK") == [want]
