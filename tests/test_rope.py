"""batchbench.kernels.rope: the MLX twin against float64 and llama.py, CUDA dispatch and
planning (BACKEND forced to cuda, `spec.run` stubbed), and the CUDA kernel compiled with
nvcc and emulated on the CPU. Missing compilers skip, as in test_verify_kernels.py."""

from __future__ import annotations

import os

import mlx.core as mx
import numpy as np
import pytest

from batchbench.kernels import rope
from batchbench.kernels import spec as kspec
from batchbench.models.llama import Attention, ModelArgs
from batchbench.verify.rope_cases import (qmm_rope_case, qmm_rope_cases, rope_case, rope_cases, rope_reference,
                                         rope_tolerance)
from conftest import assert_compile_for_sm90a, emulated, verify_emulated

SEED = int(os.environ.get("BATCHBENCH_VERIFY_SEED", np.random.SeedSequence().entropy % (1 << 32)))
N_CASES = len(rope_cases(np.random.default_rng(0)))
N_QMM_CASES = len(qmm_rope_cases(np.random.default_rng(0)))


def _np(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32)).astype(np.float64)


@pytest.mark.parametrize("traditional", [False, True])
@pytest.mark.parametrize("t", [1, 3, 8])
@pytest.mark.parametrize("max_pos", [64, 100000])
def test_twin_matches_float64(traditional, t, max_pos):
    rng = np.random.default_rng(t * 7 + max_pos + traditional)
    hq, hkv, d, base, scale = 6, 2, 32, 500000.0, 0.5
    x = rng.standard_normal((1, t, (hq + 2 * hkv) * d)).astype(np.float32)
    pos = rng.choice(max_pos, size=t, replace=False).astype(np.int32)
    kw = dict(n_heads=hq, n_kv_heads=hkv, head_dim=d, base=base, scale=scale, traditional=traditional)
    got = rope.qkv_rope(mx.array(x), mx.array(pos), **kw)  # CPU: the twin
    tol = rope_tolerance(x, pos, scale, mx.float32)
    for g, w, shape in zip(got, rope_reference(x, pos, **kw), [(1, hq, t, d), (1, hkv, t, d), (1, hkv, t, d)]):
        assert g.shape == shape and g.dtype == mx.float32
        err = np.abs(_np(g) - w).max()
        assert err <= tol, f"max error {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
@pytest.mark.parametrize("traditional,scaling,bias", [(False, None, True), (True, 4.0, False)])
@pytest.mark.parametrize("t", [1, 5])
def test_twin_equals_per_tensor_rope(dtype, traditional, scaling, bias, t):
    """Attention.qkv (which runs qkv_rope) equals the per-tensor path the model used before:
    separate projections, one mx.fast.rope per tensor, tokens at their own positions."""
    args = ModelArgs(
        hidden_size=64, num_hidden_layers=1, intermediate_size=96, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rope_theta=1e6, rope_traditional=traditional,
        rope_scaling={"type": "linear", "factor": scaling} if scaling else None, attention_bias=bias,
    )
    mx.random.seed(t)
    attn = Attention(args)
    attn.set_dtype(dtype)
    x = mx.random.normal((1, t, 64)).astype(dtype)
    pos = mx.array(np.random.default_rng(t).choice(100000, size=t, replace=False).astype(np.int32))
    got = attn.qkv(x, pos)

    def per_tensor(y, heads):
        y = y.reshape(t, heads, 1, attn.head_dim)
        y = mx.fast.rope(y, attn.head_dim, traditional=traditional, base=attn.rope_theta,
                         scale=attn.rope_scale, offset=pos)
        return y.reshape(t, heads, attn.head_dim).transpose(1, 0, 2)[None]

    v = attn.v_proj(x).reshape(1, t, attn.n_kv_heads, attn.head_dim).transpose(0, 2, 1, 3)
    want = (per_tensor(attn.q_proj(x), attn.n_heads), per_tensor(attn.k_proj(x), attn.n_kv_heads), v)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert np.array_equal(np.array(g.astype(mx.float32)), np.array(w.astype(mx.float32)))


def test_cuda_dispatch_plans_one_kernel_with_runtime_positions(cuda_dispatch):
    kw = dict(n_heads=28, n_kv_heads=4, head_dim=128, base=1e6, scale=1.0, traditional=False)
    for t in (1, 7):
        q, k, v = rope.qkv_rope(mx.zeros((1, t, 36 * 128), mx.bfloat16), mx.arange(t, dtype=mx.int32) * 9, **kw)
        assert (q.shape, k.shape, v.shape) == ((1, 28, t, 128), (1, 4, t, 128), (1, 4, t, 128))
    (s1, l1), (s7, l7) = cuda_dispatch
    # one compiled kernel for every step: T and positions are runtime, not template values
    assert s1 is s7 == rope.ROPE_SPEC and l1.template == l7.template
    assert s1.header == kspec.compact(s1.header) and s1.backend == "cuda"
    assert l7.grid == (36 * 64, 7, 1) and l7.threadgroup == (256, 1, 1)
    assert l7.inputs[1].dtype == mx.int32 and l7.output_dtypes == [mx.bfloat16] * 3


@pytest.mark.parametrize("case", ["fp32", "d288"])
def test_cuda_dispatch_falls_back(cuda_dispatch, case):
    dt, d = (mx.float32, 32) if case == "fp32" else (mx.float16, 288)
    x = np.random.default_rng(0).standard_normal((1, 3, 4 * d)).astype(np.float32)
    pos = np.array([5, 900, 17], np.int32)
    kw = dict(n_heads=2, n_kv_heads=1, head_dim=d, base=10000.0, scale=1.0, traditional=True)
    got = rope.qkv_rope(mx.array(x).astype(dt), mx.array(pos), **kw)
    assert cuda_dispatch == []
    xr = _np(mx.array(x).astype(dt))
    for g, w in zip(got, rope_reference(xr, pos, **kw)):
        assert np.abs(_np(g) - w).max() <= rope_tolerance(xr, pos, 1.0, dt)


def test_bad_shapes_raise():
    kw = dict(n_heads=2, n_kv_heads=1, head_dim=8, base=10000.0, scale=1.0, traditional=False)
    with pytest.raises(ValueError, match="qkv must be"):
        rope.qkv_rope(mx.zeros((1, 2, 24)), mx.zeros((2,), mx.int32), **kw)
    with pytest.raises(ValueError, match="positions must be"):
        rope.qkv_rope(mx.zeros((1, 2, 32)), mx.zeros((3,), mx.int32), **kw)


# ---- the CUDA kernel, without a GPU --------------------------------------------------------


@pytest.fixture(scope="module")
def cases():
    return emulated(rope_cases(np.random.default_rng(SEED)))


@pytest.mark.parametrize("i", range(N_CASES))
def test_rope_kernel_emulated_matches_float64(cases, i):
    # fp16/bf16, traditional/half-split, T 1/5/3, GQA 2 and 7, D 64/80/128, base 1e4/1e6,
    # linear scaling, K/V written into cache buffers; every output element written (else NaN),
    # same bits in both schedules
    verify_emulated(cases[i], SEED)


@pytest.fixture(scope="module")
def qmm_cases():
    return emulated(qmm_rope_cases(np.random.default_rng(SEED + 1)))


@pytest.mark.parametrize("i", range(N_QMM_CASES))
def test_projection_rope_epilogue_emulated_matches_float64(qmm_cases, i):
    # the q/k/v projection with RoPE and the K/V write in its epilogue: rows in rope_pair_order,
    # both pair layouts, GQA 2 and 7, bias, fused norm, 1 and 2 token tiles, split K + reduce
    verify_emulated(qmm_cases[i], SEED)


def test_rope_kernel_compiles_for_sm90a():
    rng = np.random.default_rng(SEED)
    assert_compile_for_sm90a([
        rope_case(rng, t=2, dtype=mx.float16, head_dim=128).kernels[0],
        rope_case(rng, t=2, dtype=mx.bfloat16, head_dim=256, traditional=True).kernels[0],
        qmm_rope_case(rng, m=1, head_dim=128, n_heads=7, n_kv_heads=1, k=512, bias=True, norm=True).kernels[0],
        *qmm_rope_case(rng, m=4, dtype=mx.bfloat16, head_dim=64, split=2, traditional=True).kernels,
    ])


@pytest.mark.parametrize("traditional", [False, True])
def test_rope_pair_order_pairs_rows_eight_apart(traditional):
    """Each 16-row tile of a q/k head holds 8 rotation pairs, row r and r + 8; v heads keep
    their order; the order is a permutation."""
    from batchbench.kernels.qmm import rope_pair_order

    hq, hkv, d = 3, 1, 32
    order = rope_pair_order(hq, hkv, d, traditional)
    assert sorted(order) == list(range((hq + 2 * hkv) * d))
    for row in range(0, (hq + hkv) * d, 16):
        for r in range(8):
            lo, hi = order[row + r], order[row + r + 8]
            assert lo // d == hi // d == row // d
            assert (hi - lo, lo % 2) == ((1, 0) if traditional else (d // 2, lo % 2)) and (lo % d < d // 2 or traditional)
    assert order[(hq + hkv) * d:] == list(range((hq + hkv) * d, (hq + 2 * hkv) * d))


@pytest.mark.parametrize("decode,flash,d,in_place", [(True, True, 128, True), (False, True, 128, False),
                                                     (True, False, 128, False), (True, True, 160, False)])
def test_cache_writes_in_place_only_before_the_attention_kernel(cuda_dispatch, decode, flash, d, in_place):
    """MLX's CUDA graphs order a launch after the ones that output its buffers, and the in-place
    K/V write outputs only q: it is used only where the decode attention kernel (which takes q)
    is the one reader of the cache. Prefill, -fa off and head dims the kernel does not take get
    RoPE plus an MLX slice or scatter update."""
    from batchbench.kv_cache import KVCache

    c = KVCache(1, 2, d, 256, 2, True, mx.float16)
    t = 2 if decode else 40
    seq = np.arange(2) if decode else np.repeat(np.arange(2), 20)
    pos = np.full(2, 0) if decode else np.tile(np.arange(20), 2)
    c.prepare(seq, pos, None, flash=flash)
    kw = dict(n_heads=4, n_kv_heads=2, head_dim=d, base=1e4, scale=1.0, traditional=False)
    q, keys, _ = c.layers[0].store_qkv(mx.zeros((1, t, 8 * d), mx.float16), mx.arange(t, dtype=mx.int32), kw)
    spec = [s for s, _ in cuda_dispatch if s.name.startswith("bb_qkv_rope")][-1]
    assert spec is (rope.STORE_SPEC if in_place else rope.ROPE_SPEC)
    assert q.shape == (1, 4, t, d) and keys.shape == (1, 2, 256, d)


def _rope_fused_attention(bias: bool, d: int = 64):
    import mlx.nn as nn

    from batchbench.kernels import qmm
    from batchbench.models.llama import Attention, ModelArgs

    args = ModelArgs(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=d,
                     attention_bias=bias, rope_theta=1e6)
    attn = Attention(args)
    attn.set_dtype(mx.float16)
    nn.quantize(attn, group_size=32, bits=4)
    parts = [attn[n] for n in ("q_proj", "k_proj", "v_proj")]
    return attn, parts, qmm.FusedQuantizedLinear(parts, attn.rope), qmm.FusedQuantizedLinear(parts)


@pytest.mark.parametrize("bias", [False, True])
def test_rope_ordered_projection_gives_the_layers_outputs(bias):
    """With its rows in rope_pair_order, the fused projection still returns q, k, v in the
    layers' own order (MLX ops on the CPU)."""
    _, parts, ordered, plain = _rope_fused_attention(bias)
    assert ordered.rope_layout == (4, 2, 64, False) and plain.rope_layout is None
    x = mx.random.normal((1, 3, 256), key=mx.random.key(SEED % 1000)).astype(mx.float16)
    want = mx.concatenate([p(x) for p in parts], axis=-1)
    assert mx.array_equal(ordered.fused(x), want) and mx.array_equal(plain.fused(x), want)
    assert not mx.array_equal(ordered["weight"], plain["weight"])  # the rows did move
    assert "_unorder" not in dict(ordered) and "rope_layout" not in dict(ordered)  # not parameters


@pytest.mark.parametrize("decode,flash,fused,n_seq", [(True, True, True, 2), (False, True, False, 2),
                                                   (True, False, False, 2), (True, True, False, 80)])
def test_projection_rope_and_cache_write_are_one_launch_in_flash_decode(cuda_dispatch, decode, flash, fused,
                                                                         n_seq):
    """On the in-place decode path the q/k/v projection's kernel rotates and writes the cache
    itself (one launch, no RoPE kernel); elsewhere (prefill, -fa off, more decode rows than the
    matmul kernel takes) the RoPE kernel follows, reading q/k in the stored pair order."""
    from batchbench.kv_cache import KVCache
    from batchbench.models.base import QKVProjection

    attn, _, ordered, _ = _rope_fused_attention(True)
    attn.qkv_proj = ordered
    c = KVCache(1, 2, 64, 256 if n_seq <= 2 else 1024, n_seq, True, mx.float16)
    t = n_seq if decode else 40
    seq = np.arange(n_seq) if decode else np.repeat(np.arange(2), 20)
    pos = np.full(n_seq, 0) if decode else np.tile(np.arange(20), 2)
    c.prepare(seq, pos, None, flash=flash)
    x = mx.zeros((1, t, 256), mx.float16)
    del cuda_dispatch[:]  # the mask kernel of prepare
    q, keys, _ = c.layers[0].store_qkv(QKVProjection(attn, x), mx.arange(t, dtype=mx.int32), attn.rope)
    names = [s.name for s, _ in cuda_dispatch]
    assert q.shape == (1, 4, t, 64) and keys.shape == (1, 2, c.n_cells, 64)
    if fused:
        assert names == ["bb_qmm_b_rope"], names
        launch = cuda_dispatch[0][1]
        assert launch.inputs[-2] is keys and launch.output_shapes == [(1, 4, t, 64)]
    else:
        # M <= 64: our matmul, then the RoPE kernel; more rows: MLX's matmul, then the RoPE kernel
        assert names[-1].startswith("bb_qkv_rope") and names[:-1] == (["bb_qmm_b"] if t <= 64 else []), names
        assert ("PAIRED", True) in cuda_dispatch[-1][1].template  # reads the stored order, no gather
        assert names[-1] == ("bb_qkv_rope_store" if decode and flash else "bb_qkv_rope")


@pytest.mark.parametrize("traditional", [False, True])
def test_twin_reads_the_paired_order(traditional):
    """qkv_rope(paired=True) off CUDA puts q/k back in order first: same result as the natural
    layout."""
    kw = dict(n_heads=3, n_kv_heads=1, head_dim=32, base=1e4, scale=1.0, traditional=traditional)
    x = mx.random.normal((1, 4, 5 * 32), key=mx.random.key(7))
    pos = mx.array([3, 9, 100, 7], dtype=mx.int32)
    order = mx.array(rope.rope_pair_order(3, 1, 32, traditional), dtype=mx.int32)
    got = rope.qkv_rope(mx.take(x, order, axis=-1), pos, paired=True, **kw)
    for g, w in zip(got, rope.qkv_rope(x, pos, **kw)):
        assert mx.array_equal(g, w)
