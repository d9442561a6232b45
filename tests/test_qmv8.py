"""The int8-activation matrix-vector kernel (batchbench.kernels.qmv8): its twin against an
independent float64 definition, the CUDA source under the CPU emulator against the twin."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from batchbench.kernels import qmv8
from batchbench.verify import emulate, toolchain
from batchbench.verify.cases import _f64
from batchbench.verify.qmv8_cases import definition, epilogue_definition, qmv8_cases
from batchbench.verify.qmv8_cases import problem as _problem
from conftest import qmm_setting_read


def _definition(x, wq, s, b) -> np.ndarray:
    """y from the module doc's formula, in float64 NumPy (qmv8_cases.definition)."""
    return definition(_f64(x), wq, s, b)


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
    # q/k/v with its bias and RoPE epilogue, x a producer's norm share (BB_QMM_X8=1)
    from batchbench.kernels import qmm

    n, k = 36 * 128, 3584
    x, kc = mx.zeros((1, k), mx.float16), mx.zeros((1, 4, 64, 128), mx.float16)
    w, s = mx.zeros((n, k // 8), mx.uint32), mx.zeros((n, k // 32), mx.float16)
    rs = qmm.RopeStore(mx.zeros((1,), mx.int32), mx.zeros((1,), mx.int32), kc, kc, 28, 4, 128, 1e6, 1.0, False)
    epi = qmv8.Epilogue(bias=mx.zeros((n,), mx.float16), rope=rs, prenorm=(mx.zeros((264, 1)), 1e-6))
    items.append(qmv8.plan(x, w, s, s, qmv8.choose_config(1, n // 2, k, sms=132, rows_a_unit=2), epi))
    # and the decode step's epilogues at the 7B shapes: down_proj with its residual and share
    # out (x in registers), the gate/up pair taking a share
    res, onw = mx.zeros((1, 3584), mx.float16), mx.zeros((3584,), mx.float16)
    x, w, s = mx.zeros((1, 18944), mx.float16), mx.zeros((3584, 18944 // 8), mx.uint32), mx.zeros((3584, 592), mx.float16)
    items.append(qmv8.plan(x, w, s, s, qmv8.choose_config(1, 3584, 18944, sms=132),
                           qmv8.Epilogue(residual=res, norm_out=onw)))
    x, w, s = mx.zeros((1, 3584), mx.float16), mx.zeros((37888, 448), mx.uint32), mx.zeros((37888, 112), mx.float16)
    items.append(qmv8.plan(x, w, s, s, qmv8.choose_config(1, 18944, 3584, sms=132, rows_a_unit=2),
                           qmv8.Epilogue(prenorm=(mx.zeros((264, 1)), 1e-6), glu_pair=True)))
    assert [qmv8.choose_config(1, n, k, sms=132).lpr for n, k in ((37888, 3584), (3584, 3584), (3584, 18944))] \
        == [32, 128, 256]
    assert_compile_for_sm90a(items)


def _epilogue_definition(x, wq, s, b, nw=None, eps=1e-5, residual=None, glu=False) -> np.ndarray:
    return epilogue_definition(_f64(x), wq, s, b, nw, eps, residual, glu)


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


# x quantized by each lane into registers (XREG): 128 lanes a row with fewer groups than lanes
# (K = 3584: 112), 256 lanes and two groups a lane with a partial second round (K = 8224: 257),
# a residual; with the next norm's share written (NOUT) and with a producer's share as x (NPRE);
# the last two with x staged in shared memory (a warp a row: the residuals and norm weights of a
# step's outputs loaded by lanes 0..R*M-1 and passed to lane 0)
XREG = [
    (1, 24, 3584, mx.float16, qmv8.X8Config(r=4, u=1, blocks=3, lpr=128, xreg=True), False, False),
    (1, 9, 8224, mx.bfloat16, qmv8.X8Config(r=2, u=2, blocks=2, lpr=256, xreg=True), True, False),
    (1, 16, 1024, mx.float16, qmv8.X8Config(r=3, u=1, blocks=2, lpr=32, xreg=True), False, True),
    (2, 20, 2048, mx.float16, qmv8.X8Config(r=2, u=1, blocks=3, lpr=64, xreg=True), True, True),
    (3, 20, 512, mx.float16, qmv8.X8Config(r=2, u=1, blocks=3), True, False),  # lanes hand lane 0 its operands
    (4, 22, 1024, mx.bfloat16, qmv8.X8Config(r=3, u=1, blocks=2, lpr=128), True, True),  # staged x, NPRE
]


def _pending(rng, m, k, dtype, eps=1e-5):
    """A producer's share of x's norm as qmm.PendingNorm holds it: x * weight, and sums of
    squares of x split over 5 partials; with the x it stands for and the weight."""
    y = mx.array(rng.standard_normal((m, k)).astype(np.float32) * 2).astype(dtype)
    nw = mx.array(rng.uniform(0.5, 1.5, k).astype(np.float32)).astype(dtype)
    yf = y.astype(mx.float32)
    parts = mx.stack([mx.sum(c * c, axis=-1) for c in mx.split(yf, 4, axis=-1)] + [mx.zeros((m,))])
    return (yf * nw.astype(mx.float32)).astype(dtype), (parts, eps), y, nw


@pytest.mark.parametrize("m,n,k,dtype,cfg,res,pre", XREG)
def test_x_in_registers_and_norm_shares_emulated(m, n, k, dtype, cfg, res, pre):
    toolchain.need(toolchain.host_cxx)
    rng = np.random.default_rng()
    x, wq, s, b = _problem(rng, m, n, k, dtype)
    prenorm = None
    if pre:
        x, prenorm, y_prod, _ = _pending(rng, m, k, dtype)
    residual = mx.array(rng.standard_normal((m, n)).astype(np.float32)).astype(dtype) if res else None
    onw = mx.array(rng.uniform(0.5, 1.5, n).astype(np.float32)).astype(dtype)
    epi = qmv8.Epilogue(residual=residual, prenorm=prenorm, norm_out=onw)
    spec, launch = qmv8.plan(x, wq, s, b, cfg, epi)
    y, yw, ss = (o.astype(np.float64) for o in emulate(spec, launch).outputs)
    ty, tyw, tss = (_f64(o) for o in qmv8.twin(x, wq, s, b, epi))
    if pre:  # x * rsqrt(mean of the producer's y^2 + eps), x being the rounded y * weight
        ms = _f64(prenorm[0]).sum(axis=0) / k
        np.testing.assert_allclose(ms, (_f64(y_prod) ** 2).mean(axis=-1), rtol=1e-5)
        xn = mx.array((_f64(x) / np.sqrt(ms + 1e-5)[:, None]).astype(np.float32))
        want = _epilogue_definition(xn, wq, s, b, None, 1e-5, residual)
    else:
        want = _epilogue_definition(x, wq, s, b, None, 1e-5, residual)
    tol = (2e-3 if dtype == mx.float16 else 1.6e-2) * np.abs(want).max()
    assert np.abs(y - ty).max() <= tol and np.abs(ty - want).max() <= tol
    # the next norm's share: y * weight of the y written, and per-block sums that add up to y's
    assert ss.shape == (cfg.blocks, m)
    assert np.abs(yw - y * _f64(onw)).max() <= tol * 1.5 + 1e-6
    assert np.allclose(ss.sum(axis=0), (y ** 2).sum(axis=-1), rtol=1e-4)
    assert np.allclose(tss[0], (ty ** 2).sum(axis=-1), rtol=1e-4)


def test_producer_share_then_consumer_is_the_norm():
    """A down_proj-like launch writing the next norm's share (NOUT) and a consumer taking it as
    x (NPRE) give what the consumer gives on the RMSNorm of the producer's y (twins, CPU)."""
    rng = np.random.default_rng()
    a, w1, s1, b1 = _problem(rng, 2, 256, 512, mx.float16)
    _, w2, s2, b2 = _problem(rng, 2, 64, 256, mx.float16)
    nw = mx.array(rng.uniform(0.5, 1.5, 256).astype(np.float32)).astype(mx.float16)
    y, yw, ss = qmv8.quantized_matvec_x8(a, w1, s1, b1, norm_out=nw)
    chained = _f64(qmv8.quantized_matvec_x8(yw, w2, s2, b2, prenorm=(ss, 1e-6)))
    direct = _f64(qmv8.quantized_matvec_x8(y, w2, s2, b2, norm=(nw, 1e-6)))
    assert np.abs(chained - direct).max() <= 2e-2 * np.abs(direct).max()
    with pytest.raises(ValueError, match="prenorm"):
        qmv8.quantized_matvec_x8(yw, w2, s2, b2, prenorm=(ss, 1e-6), norm=(nw, 1e-6))
    with pytest.raises(ValueError, match="output norm weight"):
        qmv8.quantized_matvec_x8(a, w1, s1, b1, norm_out=nw[:8])


def test_registers_where_a_row_is_one_step_at_one_token():
    """choose_config keeps x in registers for down_proj at M=1 on 132 SMs (256 lanes a row cover
    its 592 groups, which the staging would take three to a thread), not for o_proj and q/k/v
    (112 groups: one a thread), not at M=2, not a warp a row (gate/up, lm_head), not with a
    block-wide norm; plan refuses it where a row takes two steps."""
    cfg = {(n, k): qmv8.choose_config(1, n, k, sms=132) for n, k in ((3584, 3584), (4608, 3584), (3584, 18944),
                                                                    (18944, 3584), (152064, 3584))}
    assert [c.xreg for c in cfg.values()] == [False, False, True, False, False]
    assert not qmv8.choose_config(2, 3584, 18944, sms=132).xreg
    # a block's units in one step where that takes at most 10 loads a lane: q/k/v's 9 pairs a
    # block as 5 a slot (two slots), not 4 + 1; gate/up (72 pairs a block) keeps 8 loads a lane
    assert qmv8.choose_config(1, 2304, 3584, sms=132, rows_a_unit=2).r == 5
    assert qmv8.choose_config(1, 18944, 3584, sms=132, rows_a_unit=2).r == 1
    assert [c.r for c in cfg.values()] == [7, 9, 2, 2, 2]
    assert not qmv8.choose_config(1, 3584, 18944, sms=132, block_norm=True).xreg
    x = mx.zeros((1, 8224), mx.float16)
    w, s = mx.zeros((8, 1028), mx.uint32), mx.zeros((8, 257), mx.float16)
    with pytest.raises(ValueError, match="registers"):
        qmv8.plan(x, w, s, s, qmv8.X8Config(r=1, u=1, blocks=1, lpr=256, xreg=True))


@pytest.mark.parametrize("value,want", [(None, ("1", True, True)), ("0", ("0", False, False)),
                                        ("1", ("1", True, True)), ("noqkv", ("noqkv", True, False))])
def test_bb_qmm_x8_values(value, want):
    """BB_QMM_X8 is on by default (q/k/v included), 0 turns it off, noqkv keeps q/k/v on the fp16
    kernel; read once, when qmm is first imported (a fresh interpreter each)."""
    got = qmm_setting_read("BB_QMM_X8", value, "qmm.X8_MODE, qmm.X8, qmm.X8_QKV")
    assert got == [want[0], str(want[1]), str(want[2])]


def test_bb_qmm_x8_takes_the_calls_session_25_measured_faster(monkeypatch, capsys):
    """With BB_QMM_X8=1 on CUDA (132 SMs), qmm sends every 7B decode matmul without a bias at one
    token to the int8 kernel, at two tokens only those with many rows (the gate/up pair, lm_head),
    none at three; a bias, 8-bit weights, a launch too big for the GPU's shared memory, another
    back-end or the setting off keep the fp16 path."""
    import types

    from batchbench.kernels import qmm

    monkeypatch.setenv("BATCHBENCH_SMS", "132")
    monkeypatch.setattr(qmm, "backend", types.SimpleNamespace(BACKEND="cuda"))
    monkeypatch.setattr(qmm, "X8", True)
    shapes = {"o": (3584, 3584, 1), "gate/up": (37888, 3584, 2), "down": (3584, 18944, 1),
              "lm_head": (152064, 3584, 1)}

    def takes(m, n, k, unit, bias=None, bits=4, dtype=mx.float16):
        x = mx.zeros((m, k), dtype)
        s = mx.zeros((1, 1), dtype)
        return qmm._x8_takes(m, n, k, x, s, s, 32, bits, bias, rows_a_unit=unit)

    assert [name for name, v in shapes.items() if takes(1, *v)] == list(shapes)
    assert [name for name, v in shapes.items() if takes(2, *v)] == ["gate/up", "lm_head"]
    assert not any(takes(3, *v) for v in shapes.values())
    assert not takes(1, 3584, 3584, 1, bias=mx.zeros((3584,), mx.float16))
    assert not takes(1, 3584, 3584, 1, bits=8)
    # a launch that does not fit the GPU's shared memory runs the fp16 path, and says so once
    monkeypatch.setenv("BATCHBENCH_SMEM_KB", "16")
    monkeypatch.setattr(qmm, "_NOTED_TOO_BIG", set())
    assert takes(1, *shapes["gate/up"]) and not takes(1, *shapes["down"]) and not takes(1, *shapes["down"])
    assert capsys.readouterr().err.count("int8-activation matmul N=3584 K=18944 at M=1 needs 28 KB") == 1
    monkeypatch.delenv("BATCHBENCH_SMEM_KB")
    monkeypatch.setattr(qmm, "X8", False)
    assert not takes(1, 3584, 3584, 1)
    monkeypatch.setattr(qmm, "X8", True)
    monkeypatch.setattr(qmm, "backend", types.SimpleNamespace(BACKEND="metal"))
    assert not takes(1, 3584, 3584, 1)


# (M, dtype, traditional, Hq, Hkv, D, config): the q/k/v projection with its bias and the RoPE
# pair epilogue (q rotated out, k rotated and v into the cache at the tokens' cells): a warp a
# pair with lane 0 handed each output's angle and cell, and 128 lanes a pair with x in registers
ROPE = [
    (1, mx.float16, False, 4, 2, 64, qmv8.X8Config(r=2, u=2, blocks=3)),
    (2, mx.bfloat16, True, 4, 1, 32, qmv8.X8Config(r=3, u=1, blocks=2, lpr=128, xreg=True)),
]


@pytest.mark.parametrize("m,dtype,trad,hq,hkv,d,cfg", ROPE)
def test_qkv_rope_epilogue_emulated(m, dtype, trad, hq, hkv, d, cfg):
    from batchbench.kernels import qmm
    from batchbench.kernels import rope as R
    from batchbench.verify.rope_cases import _values, rope_reference, rope_tolerance

    toolchain.need(toolchain.host_cxx)
    rng = np.random.default_rng()
    n, k, nc = (hq + 2 * hkv) * d, 256, 23
    x, wq, s, b = _problem(rng, m, n, k, dtype)
    bias = mx.array(rng.standard_normal(n).astype(np.float32) * 0.5).astype(dtype)
    order = mx.array(R.rope_pair_order(hq, hkv, d, trad))
    wq, s, b, bias = (mx.take(a, order, axis=0) for a in (wq, s, b, bias))
    pos = rng.integers(0, 20000, m).astype(np.int32)
    cells = rng.choice(nc, size=m, replace=False).astype(np.int32)
    kc = mx.array(rng.standard_normal((1, hkv, nc, d)).astype(np.float32)).astype(dtype)
    vc = mx.array(rng.standard_normal((1, hkv, nc, d)).astype(np.float32)).astype(dtype)
    rs = qmm.RopeStore(mx.array(pos), mx.array(cells), kc, vc, hq, hkv, d, 10000.0, 1.0, trad)
    spec, launch = qmv8.plan(x, wq, s, b, cfg, qmv8.Epilogue(bias=bias, rope=rs))
    res = emulate(spec, launch)
    got_q = res.outputs[0].astype(np.float64)
    got_k, got_v = (_values(res.inputs_after[i], dtype).astype(np.float64).reshape(kc.shape) for i in (7, 8))
    # the twin's projection (bias added, rows in pair order) put back in order, rotated in float64
    y = R.unpair(qmv8.twin(x, wq, s, b, qmv8.Epilogue(bias=bias)), hq, hkv, d, trad)
    yf = _f64(y)
    want_q, want_k, want_v = rope_reference(yf[None], pos, n_heads=hq, n_kv_heads=hkv, head_dim=d,
                                            base=10000.0, scale=1.0, traditional=trad)
    tol = (2e-3 if dtype == mx.float16 else 1.6e-2) * np.abs(yf).max() + rope_tolerance(yf, pos, 1.0, dtype)
    assert got_q.shape == (1, hq, m, d)
    assert np.abs(got_q - want_q).max() <= tol
    k_before, v_before = _f64(kc), _f64(vc)
    for t, c in enumerate(cells):
        assert np.abs(got_k[0, :, c] - want_k[0, :, t]).max() <= tol
        assert np.abs(got_v[0, :, c] - want_v[0, :, t]).max() <= tol
    rest = np.setdiff1d(np.arange(nc), cells)
    assert np.array_equal(got_k[0, :, rest], k_before[0, :, rest])
    assert np.array_equal(got_v[0, :, rest], v_before[0, :, rest])


def test_bb_qmm_x8_qkv_sends_one_token_q_k_v_with_rope_to_the_int8_kernel(monkeypatch):
    """BB_QMM_X8=1: project_rope_store hands a one-token q/k/v projection (its bias, the RoPE
    store, its norm) to the int8 kernel; two tokens, or BB_QMM_X8=noqkv, keep the fp16 kernel."""
    import types

    import mlx.nn as nn

    from batchbench.kernels import qmm
    from batchbench.kernels import spec as kspec

    monkeypatch.setenv("BATCHBENCH_SMS", "132")
    monkeypatch.setattr(qmm, "backend", types.SimpleNamespace(BACKEND="cuda"))
    monkeypatch.setattr(qmv8, "backend", types.SimpleNamespace(BACKEND="cuda"))
    monkeypatch.setattr(qmm, "X8", True)
    calls = []

    def x8_run(x, w, s, b, config=None, epi=qmv8.Epilogue()):
        calls.append(("x8", epi))
        _, launch = qmv8.plan(x, w, s, b, config, epi)  # the launch it would make (shapes checked)
        return mx.zeros(launch.output_shapes[0], x.dtype)

    def fp16_run(spec, launch):
        calls.append(("fp16", spec.name))
        return [mx.zeros(sh, dt) for sh, dt in zip(launch.output_shapes, launch.output_dtypes)]

    monkeypatch.setattr(qmv8, "run", x8_run)
    monkeypatch.setattr(kspec, "run", fp16_run)
    hq, hkv, d, k = 28, 4, 128, 256
    layers = []
    for n in (hq * d, hkv * d, hkv * d):
        ql = nn.QuantizedLinear(k, n, bias=True, group_size=32, bits=4)
        ql.scales, ql.biases, ql.bias = (a.astype(mx.float16) for a in (ql.scales, ql.biases, ql.bias))
        layers.append(ql)
    fused = qmm.FusedQuantizedLinear(layers, rope=dict(n_heads=hq, n_kv_heads=hkv, head_dim=d, base=1e6,
                                                       scale=1.0, traditional=False))
    kc = mx.zeros((1, hkv, 8, d), mx.float16)
    norm = nn.RMSNorm(k)
    norm.weight = mx.ones((k,), mx.float16)
    for mode, m, want in (("1", 1, "x8"), ("1", 2, "fp16"), ("noqkv", 1, "fp16")):
        monkeypatch.setattr(qmm, "X8_QKV", mode == "1")
        calls.clear()
        rs = qmm.RopeStore(mx.arange(m), mx.arange(m), kc, kc, hq, hkv, d, 1e6, 1.0, False)
        qmm.project_rope_store(fused, mx.zeros((1, m, k), mx.float16), norm, rs)
        assert calls and calls[0][0] == want, (mode, m, calls)
        if want == "x8":
            epi = calls[0][1]
            assert epi.rope is rs and epi.norm is not None
            assert tuple(epi.bias.shape) == ((hq + 2 * hkv) * d,)
            _, launch = qmv8.plan(mx.zeros((1, k), mx.float16), fused["weight"], fused["scales"], fused["biases"],
                                  None, epi)
            assert launch.output_shapes[0] == (1, hq, 1, d)


N_CASES = len(qmv8_cases(np.random.default_rng(0)))


@pytest.fixture(scope="module")
def verify_cases():
    return qmv8_cases(np.random.default_rng(25))


@pytest.mark.parametrize("i", range(N_CASES))
def test_verify_cases_emulated_match_float64(verify_cases, i):
    """The cases `python -m batchbench.verify.gpu` runs on CUDA (BATCHBENCH_VERIFY_ONLY=qmv8),
    emulated here against their float64 expectations."""
    from conftest import verify_emulated

    toolchain.need(toolchain.host_cxx)
    verify_emulated(verify_cases[i], 25)


def test_pairs_get_the_reduce_area_of_two_rows_a_unit():
    """With LPR > 32 the warps' sums of a step go through shared memory, RR = 2R rows for a
    gate/up or RoPE pair: both pair epilogues plan the same area, twice a plain launch's."""
    from batchbench.kernels import qmm

    m, k, n = 1, 256, (4 + 2 * 2) * 64
    x = mx.zeros((m, k), mx.float16)
    w, s = mx.zeros((n, k // 8), mx.uint32), mx.zeros((n, k // 32), mx.float16)
    kc = mx.zeros((1, 2, 8, 64), mx.float16)
    rs = qmm.RopeStore(mx.zeros((m,), mx.int32), mx.zeros((m,), mx.int32), kc, kc, 4, 2, 64, 1e4, 1.0, False)
    for cfg in (qmv8.X8Config(r=3, u=1, blocks=2, lpr=128, xreg=True), qmv8.X8Config(r=2, u=1, blocks=2, lpr=256)):
        plain = qmv8.plan(x, w, s, s, cfg)[0].shared_memory
        glu = qmv8.plan(x, w, s, s, cfg, qmv8.Epilogue(glu_pair=True))[0].shared_memory
        rope = qmv8.plan(x, w, s, s, cfg, qmv8.Epilogue(rope=rs))[0].shared_memory
        red = plain - (0 if cfg.xreg else m * k + 3 * m * (k // 32) * 4)
        assert glu == rope == plain + red and red > 0


@pytest.mark.parametrize("x8_mode", ["1", "0"])
def test_q4_0_gguf_one_token_decode_takes_the_int8_kernel(tmp_path, monkeypatch, cuda_dispatch, x8_mode):
    """A Q4_0 GGUF file (exported, loaded back as MLX's affine layout) decodes one sequence on
    CUDA with every 4-bit matmul of a decode step in the int8 kernel (q/k/v with its RoPE
    epilogue, o_proj, the gate/up pair, down_proj, lm_head) under BB_QMM_X8=1, and none in it
    under 0. The prompt's layers (7 tokens) stay on the fp16 kernels; its lm_head takes the last
    token only. Launches are recorded, not run (conftest's cuda_dispatch)."""
    from batchbench.bench import Mode, Runner
    from batchbench.kernels import qmm
    from batchbench.kv_cache import KVCache
    from batchbench.loaders import load_model
    from batchbench.loaders.export_gguf import export_gguf

    path = str(tmp_path / "tiny-q4_0.gguf")
    export_gguf("tiny", path, "q4_0")
    model = load_model(path, dtype=mx.float16).model
    a = model.args
    monkeypatch.setenv("BATCHBENCH_SMS", "132")
    monkeypatch.setattr(qmm, "X8", x8_mode != "0")
    monkeypatch.setattr(qmm, "X8_QKV", x8_mode == "1")
    qmm.fuse_quantized_projections(model)
    qmm.use_fast_quantized_linears(model)
    cache = KVCache(a.num_hidden_layers, a.num_key_value_heads, a.head_dim, 512, 1, True, mx.float16)
    runner = Runner(model, cache, Mode("t", True), 2048, 64, compiled=False)
    runner.decode(np.arange(7), np.arange(7), np.zeros(7, np.int64), np.zeros(7, bool), sync=True)
    prompt = [ks.name for ks, _ in cuda_dispatch]
    cuda_dispatch.clear()
    runner.decode(np.array([3]), np.array([7]), np.array([0]), np.ones(1, bool), sync=True)
    step = [ks.name for ks, _ in cuda_dispatch]
    layers = a.num_hidden_layers
    assert sum(n.startswith("bb_qmm") for n in prompt) >= 4 * layers, prompt
    assert sum(n.startswith("bb_qmv8") for n in prompt) == (x8_mode != "0"), prompt
    x8 = [n for n in step if n.startswith("bb_qmv8")]
    if x8_mode == "0":
        assert not x8 and sum(n.startswith("bb_qmm") for n in step) >= 4 * layers, step
        return
    # per layer q/k/v (RoPE), o_proj, gate/up, down_proj; then lm_head (untied); no fp16 matmul
    assert len(x8) == 4 * layers + 1, step
    assert sum(n.endswith("_rope") for n in x8) == layers
    assert not [n for n in step if n.startswith("bb_qmm")], step


def test_a_run_says_when_activations_go_int8(monkeypatch):
    """On CUDA with BB_QMM_X8 on, a model with 4-bit group-32 layers gets a one-line note (its
    numbers differ from MLX's own kernels); not with the setting off, on the CPU, or with 8-bit
    layers."""
    import types

    from batchbench.kernels import qmm
    from batchbench.presets import make_preset

    q4, _ = make_preset("tiny", mx.float16, "q4_0")
    q8, _ = make_preset("tiny", mx.float16, "q8_0")
    monkeypatch.setattr(qmm, "backend", types.SimpleNamespace(BACKEND="cuda"))
    monkeypatch.setattr(qmm, "X8", True)
    note = qmm.x8_note(q4)
    assert note and "int8" in note and "BB_QMM_X8=0" in note and "\n" not in note
    assert qmm.x8_note(q8) is None
    monkeypatch.setattr(qmm, "X8", False)
    assert qmm.x8_note(q4) is None
    monkeypatch.setattr(qmm, "X8", True)
    monkeypatch.setattr(qmm, "backend", types.SimpleNamespace(BACKEND="cpu"))
    assert qmm.x8_note(q4) is None
