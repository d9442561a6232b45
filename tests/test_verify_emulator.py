"""The SIMT emulator itself: warp/simdgroup functions, barriers, shared memory, atomics and
16-bit floats against NumPy models, and the faults it must catch (races, divergent
barriers, out-of-bounds accesses, deadlocks, spin loops) on small CUDA and Metal kernels."""

import mlx.core as mx
import numpy as np
import pytest

from batchbench.kernels.spec import KernelSpec, Launch
from batchbench.verify import EmulationError, RaceError, emulate, toolchain
from batchbench.verify.emulate import prebuild


@pytest.fixture(scope="module", autouse=True)
def _cxx():
    toolchain.need(toolchain.host_cxx)
    prebuild([k for k in _all_kernels()])


# ---- collectives, barriers, shared memory, atomics --------------------------------------

N_CU, TG = 150, 64  # 3 blocks; CUDA runs the whole last block (threads 150..191 exist)

CUDA_COLL = r"""
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int gid = blockIdx.x * blockDim.x + tid;
  const float val = gid < n[0] ? x[gid] : 0.0f;
  float* o = f + (size_t)gid * 8;
  o[0] = __shfl_sync(0xffffffffu, val, (lane * 7) % 32);
  o[1] = __shfl_xor_sync(0xffffffffu, val, 5);
  o[2] = __shfl_down_sync(0xffffffffu, val, 3);
  o[3] = __shfl_up_sync(0xffffffffu, val, 3);
  o[4] = __shfl_xor_sync(0xffffffffu, val, 6, 8);
  o[5] = __shfl_down_sync(0xffffffffu, val, 2, 16);
  auto tile = cg::tiled_partition<32>(cg::this_thread_block());
  o[6] = cg::reduce(tile, val, cg::plus<float>());
  o[7] = tile.shfl_xor(val, 16);
  int* oi = ints + (size_t)gid * 4;
  oi[0] = (int)__ballot_sync(0xffffffffu, val > 0.5f);
  oi[1] = __syncthreads_count(val > 0.5f);
  oi[2] = (int)__reduce_add_sync(0xffffffffu, (unsigned)lane);
  __shared__ float s[64];
  s[tid] = val;
  __syncthreads();
  oi[3] = __float_as_int(s[blockDim.x - 1 - tid]);
  __shared__ float bsum[2];
  if (lane == 0) bsum[warp] = o[6];
  __syncthreads();
  if (tid == 0) {  // the last block to finish adds up every block's sum
    ws[blockIdx.x] = bsum[0] + bsum[1];
    __threadfence();
    if (atomicAdd(counter, 1) == (int)gridDim.x - 1) {
      float t = 0.0f;
      for (int b = 0; b < (int)gridDim.x; ++b) t += ws[b];
      total[0] = t;
    }
  }
"""

METAL_COLL = r"""
  const uint tid = thread_index_in_threadgroup, lane = thread_index_in_simdgroup;
  const uint sg = simdgroup_index_in_threadgroup, gid = thread_position_in_grid.x;
  const float val = x[gid];
  device float* o = f + gid * 8;
  o[0] = simd_shuffle(val, ushort((lane * 7) % 32));
  o[1] = simd_shuffle_xor(val, ushort(5));
  o[2] = simd_shuffle_down(val, ushort(3));
  o[3] = simd_shuffle_up(val, ushort(3));
  o[4] = simd_sum(val);
  o[5] = simd_prefix_exclusive_sum(val);
  o[6] = simd_max(val);
  o[7] = simd_broadcast_first(val);
  device int* oi = ints + gid * 4;
  oi[0] = int(uint(static_cast<simd_vote::vote_t>(simd_ballot(val > 0.5f))));
  oi[1] = int(threads_per_threadgroup.x);
  oi[2] = int(simdgroups_per_threadgroup);
  threadgroup float s[64];
  s[tid] = val;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  oi[3] = as_type<int>(s[threads_per_threadgroup.x - 1 - tid]);
  threadgroup float gsum[2];
  if (lane == 0) gsum[sg] = o[4];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (tid == 0) {
    float t = 0.0f;
    for (uint w = 0; w < simdgroups_per_threadgroup; ++w) t += gsum[w];
    ws[threadgroup_position_in_grid.x] = t;
    atomic_thread_fence(mem_flags::mem_device, memory_order_seq_cst, thread_scope_device);
    if (atomic_fetch_add_explicit((device atomic_int*)counter, 1, memory_order_relaxed) ==
        int(threadgroups_per_grid.x) - 1) {
      float tt = 0.0f;
      for (uint b = 0; b < threadgroups_per_grid.x; ++b) tt += ws[b];
      total[0] = tt;
    }
  }
"""


def _coll(backend, x):
    rows = 192 if backend == "cuda" else N_CU
    names = ("x", "n") if backend == "cuda" else ("x",)
    src = CUDA_COLL if backend == "cuda" else METAL_COLL
    spec = KernelSpec(backend, "coll", names, ("f", "ints", "ws", "counter", "total"), src)
    ins = [mx.array(x), N_CU] if backend == "cuda" else [mx.array(x)]
    launch = Launch(
        ins,
        [(rows * 8,), (rows * 4,), (3,), (1,), (1,)],
        [mx.float32, mx.int32, mx.float32, mx.int32, mx.float32],
        (N_CU, 1, 1),
        (TG, 1, 1),
        init_value=0,
    )
    return spec, launch


def _model(backend, x):
    """What each thread must see; NaN marks values the GPU leaves undefined."""
    rows = 192 if backend == "cuda" else N_CU
    v = np.zeros(rows, np.float32)
    v[:N_CU] = x
    f = np.full((rows, 8), np.nan, np.float64)
    ints = np.zeros((rows, 4), np.int64)
    for b in range(3):
        base = b * TG
        size = min(TG, rows - base)
        for w in range(-(-size // 32)):
            wb = base + 32 * w
            nl = min(32, size - 32 * w)
            lv = v[wb : wb + nl].astype(np.float64)

            def get(src, own, lane):
                if src < 0 or src >= 32:
                    return own
                return lv[src] if src < nl else np.nan

            for lane in range(nl):
                own = lv[lane]
                r = f[wb + lane]
                r[0] = get((lane * 7) % 32, own, lane)
                r[1] = get(lane ^ 5, own, lane)
                r[2] = get(lane + 3, own, lane)
                r[3] = get(lane - 3 if lane >= 3 else -1, own, lane)
                if backend == "cuda":
                    r[4] = lv[lane ^ 6]
                    r[5] = lv[lane + 2] if (lane & 15) + 2 <= 15 else own
                    r[6] = lv.sum()
                    r[7] = lv[lane ^ 16]
                else:
                    r[4] = lv.sum()
                    r[5] = lv[:lane].sum()
                    r[6] = lv.max()
                    r[7] = lv[0]
                bits = sum(1 << l for l in range(nl) if lv[l] > 0.5)
                ints[wb + lane, 0] = bits - (1 << 32) if bits >= 1 << 31 else bits
                if backend == "cuda":
                    ints[wb + lane, 1] = int((v[base : base + size] > 0.5).sum())
                    ints[wb + lane, 2] = 496
                else:
                    ints[wb + lane, 1] = size
                    ints[wb + lane, 2] = -(-size // 32)
                ints[wb + lane, 3] = v[base + size - 1 - (32 * w + lane)].view(np.int32)
    return f, ints, float(v.astype(np.float64).sum())


@pytest.mark.parametrize("backend", ["cuda", "metal"])
def test_collectives_barriers_atomics_match_model(backend):
    rng = np.random.default_rng()
    x = rng.random(N_CU).astype(np.float32)
    spec, launch = _coll(backend, x)
    res = emulate(spec, launch, schedules=("forward", "reverse", "random"), seed=int(rng.integers(1 << 30)))
    f, ints, ws, counter, total = res.outputs
    rows = 192 if backend == "cuda" else N_CU
    want_f, want_i, want_total = _model(backend, x)
    f = f.reshape(rows, 8).astype(np.float64)
    undefined = np.isnan(want_f)
    assert np.isnan(f[undefined]).all(), "undefined shuffle sources must read as NaN poison"
    np.testing.assert_allclose(f[~undefined], want_f[~undefined], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(ints.reshape(rows, 4)[:, :3], want_i[:, :3])
    np.testing.assert_array_equal(ints.reshape(rows, 4)[:, 3], want_i[:, 3].astype(np.int32))
    assert counter[0] == 3
    assert total[0] == pytest.approx(want_total, rel=1e-5)


TILES = r"""
  auto block = cg::this_thread_block();
  auto t16 = cg::tiled_partition<16>(block);
  auto t4 = cg::tiled_partition<4>(block);
  const int i = threadIdx.x;
  const float v = x[i];
  o[i * 4 + 0] = cg::reduce(t16, v, cg::plus<float>());
  o[i * 4 + 1] = t16.shfl_down(v, 1);
  o[i * 4 + 2] = __int_as_float((int)t4.ballot(v > 0.5f));
  if ((i & 16) == 0) {  // half-warps diverge: only the low half shuffles here
    o[i * 4 + 3] = __shfl_xor_sync(0x0000ffffu, v, 3);
  } else {
    o[i * 4 + 3] = __shfl_sync(0xffff0000u, v, 16);
  }
"""


def _tiles_kernel():
    spec = KernelSpec("cuda", "tiles", ("x",), ("o",), TILES)
    return spec, Launch([mx.zeros((64,))], [(64 * 4,)], [mx.float32], (64, 1, 1), (64, 1, 1))


def test_cuda_tiles_and_partial_masks():
    x = np.random.default_rng().random(64).astype(np.float32)
    spec, launch = _tiles_kernel()
    launch.inputs = [mx.array(x)]
    o = emulate(spec, launch, schedules=("forward", "reverse", "random")).outputs[0].reshape(64, 4)
    g16 = x.reshape(-1, 16).astype(np.float64)
    np.testing.assert_allclose(o[:, 0], np.repeat(g16.sum(1), 16), rtol=1e-6)
    down = np.where(np.arange(64) % 16 == 15, x, np.roll(x, -1))
    np.testing.assert_array_equal(o[:, 1], down)
    bits = (x.reshape(-1, 4) > 0.5) @ (1 << np.arange(4))
    np.testing.assert_array_equal(o[:, 2].view(np.int32), np.repeat(bits, 4))
    lanes = np.arange(64)
    want3 = np.where(lanes & 16 == 0, x[lanes ^ 3], x[(lanes // 32) * 32 + 16])
    np.testing.assert_array_equal(o[:, 3], want3)


# ---- 16-bit floats -----------------------------------------------------------------------

SPECIAL = [0.0, -0.0, 1.0, 65504.0, 65519.0, 65520.0, 1e6, -1e6, 6.1e-5, 6.0e-8, 3.0e-8,
           2.9e-8, 1e-9, np.inf, -np.inf, 1.0 + 2**-11, 1.0 + 3 * 2**-11, 3.3895e38, 1e-40]

CUDA_F16 = r"""
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n[0]) {
    const __half h = __float2half_rn(x[i]);
    const __nv_bfloat16 b = __float2bfloat16_rn(x[i]);
    hb[i] = __half_as_ushort(h);
    bb[i] = __bfloat16_as_ushort(b);
    back[i] = __half2float(h) + __bfloat162float(b);
    prod[i] = __half_as_ushort(h * __float2half_rn(y[i]));
  }
"""

METAL_F16 = r"""
  const uint i = thread_position_in_grid.x;
  const half h = half(x[i]);
  const bfloat b = bfloat(x[i]);
  hb[i] = as_type<ushort>(h);
  bb[i] = as_type<ushort>(b);
  back[i] = float(h) + float(b);
  prod[i] = as_type<ushort>(h * half(y[i]));
"""


def _f16_kernel(backend, x, y):
    names = ("x", "y", "n") if backend == "cuda" else ("x", "y")
    spec = KernelSpec(backend, "f16", names, ("hb", "bb", "back", "prod"),
                      CUDA_F16 if backend == "cuda" else METAL_F16)
    ins = [mx.array(x), mx.array(y)] + ([len(x)] if backend == "cuda" else [])
    n = len(x)
    return spec, Launch(ins, [(n,)] * 4, [mx.uint16, mx.uint16, mx.float32, mx.uint16],
                        (n, 1, 1), (64, 1, 1))


@pytest.mark.parametrize("backend", ["cuda", "metal"])
def test_16bit_floats_round_like_numpy_and_mlx(backend):
    rng = np.random.default_rng()
    x = np.concatenate([
        np.array(SPECIAL, np.float32),
        -np.array(SPECIAL, np.float32),
        (rng.standard_normal(300) * 10.0 ** rng.integers(-9, 6, 300)).astype(np.float32),
    ])
    y = (rng.standard_normal(len(x)) * 4).astype(np.float32)
    res = emulate(*_f16_kernel(backend, x, y), schedules=("forward",))
    hb, bb, back, prod = res.raw_outputs
    with np.errstate(over="ignore"):
        want_h = x.astype(np.float16)
        want_prod = (want_h * y.astype(np.float16)).view(np.uint16)
    want_b = np.array(mx.array(x).astype(mx.bfloat16).view(mx.uint16))
    np.testing.assert_array_equal(hb, want_h.view(np.uint16))
    np.testing.assert_array_equal(bb, want_b)
    want_back = want_h.astype(np.float32) + (want_b.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(back, want_back)
    finite = np.isfinite(want_h)
    np.testing.assert_array_equal(prod[finite], want_prod[finite])


# ---- faults it must catch ------------------------------------------------------------------

ROWSUM_CUDA = r"""
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, row = blockIdx.x;
  __shared__ float partial[32];
  float acc = 0.0f;
  for (int i = tid; i < n[0]; i += blockDim.x) acc += static_cast<float>(x[row * n[0] + i]);
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (lane == 0) partial[warp] = acc;
  __syncthreads();
  if (warp == 0) {
    float v = lane < (int)(blockDim.x >> 5) ? partial[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) out[row] = v;
  }
"""

ROWSUM_METAL = r"""
  const uint lane = thread_index_in_simdgroup, warp = simdgroup_index_in_threadgroup;
  const uint row = threadgroup_position_in_grid.x;
  threadgroup float partial[32];
  float acc = 0.0f;
  for (uint i = thread_index_in_threadgroup; i < uint(n); i += threads_per_threadgroup.x)
    acc += float(x[row * n + i]);
  acc = simd_sum(acc);
  if (lane == 0) partial[warp] = acc;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (warp == 0) {
    float v = lane < simdgroups_per_threadgroup ? partial[lane] : 0.0f;
    v = simd_sum(v);
    if (lane == 0) out[row] = v;
  }
"""

ROWS, COLS = 5, 300
_X = np.random.default_rng(7).standard_normal((ROWS, COLS)).astype(np.float16)


def _rowsum(backend, src=None, grid=ROWS * 128):
    src = src or (ROWSUM_CUDA if backend == "cuda" else ROWSUM_METAL)
    spec = KernelSpec(backend, "rowsum", ("x", "n"), ("out",), src)
    return spec, Launch([mx.array(_X), COLS], [(ROWS,)], [mx.float32], (grid, 1, 1), (128, 1, 1))


def _rowsum_err(res):
    return float(np.abs(res.outputs[0] - _X.astype(np.float64).sum(1)).max())


MUTANTS = {
    "cuda": {
        "missing_barrier": ("__syncthreads();", ""),
        "wrong_shuffle": ("for (int o = 16; o > 0; o >>= 1) acc", "for (int o = 8; o > 0; o >>= 1) acc"),
        "divergent_barrier": ("if (warp == 0) {", "if (warp == 0) { __syncthreads();"),
        "early_return": ("const int tid", "if (threadIdx.x > 40) return;\n  const int tid"),
        "oob_write": ("out[row] = v", "out[row + 1024] = v"),
        "oob_read": ("x[row * n[0] + i]", "x[row * n[0] + i + 1200]"),
        "deadlock": ("if (lane == 0) partial[warp] = acc;", "if (lane != 0) __syncwarp(); partial[warp] = acc;"),
        "uninit_shared": ("partial[lane] : 0.0f", "partial[lane + 8] : 0.0f"),
    },
    "metal": {
        "missing_barrier": ("threadgroup_barrier(mem_flags::mem_threadgroup);", ""),
        "wrong_shuffle": ("acc = simd_sum(acc);", "acc += simd_shuffle_xor(acc, ushort(1));"),
        "divergent_simd": ("v = simd_sum(v);", "v = lane < 16 ? simd_sum(v) : simd_max(v);"),
        "oob_write": ("out[row] = v", "out[row + 1024] = v"),
        "uninit_shared": ("partial[lane] : 0.0f", "partial[lane + 8] : 0.0f"),
    },
}

EXPECT = {
    "missing_barrier": (RaceError, "thread schedules"),
    "wrong_shuffle": (None, None),
    "divergent_barrier": (EmulationError, "wait at __syncthreads"),
    "early_return": (EmulationError, "returned while"),
    "oob_write": (EmulationError, "past the end of 'output out'"),
    "oob_read": (EmulationError, "past the end of 'input x'"),
    "deadlock": (EmulationError, "deadlock"),
    "divergent_simd": (EmulationError, "divergent control flow"),
    "uninit_shared": (None, None),
}


def _mutant(backend, name):
    old, new = MUTANTS[backend][name]
    src = ROWSUM_CUDA if backend == "cuda" else ROWSUM_METAL
    assert old in src
    return _rowsum(backend, src.replace(old, new, 1))


def _all_kernels():
    x = np.zeros(N_CU, np.float32)
    yield _coll("cuda", x)
    yield _coll("metal", x)
    yield _f16_kernel("cuda", x, x)
    yield _f16_kernel("metal", x, x)
    yield _tiles_kernel()
    for b in ("cuda", "metal"):
        yield _rowsum(b)
        for name in MUTANTS[b]:
            yield _mutant(b, name)


@pytest.mark.parametrize("backend", ["cuda", "metal"])
def test_correct_kernel_passes_every_schedule(backend):
    res = emulate(*_rowsum(backend), schedules=("forward", "reverse", "random"), seed=3)
    assert _rowsum_err(res) < 1e-3
    assert res.unwritten == {"out": 0}


@pytest.mark.parametrize(
    "backend,name", [(b, n) for b in ("cuda", "metal") for n in MUTANTS[b]]
)
def test_broken_kernel_is_caught(backend, name):
    exc, msg = EXPECT[name]
    spec, launch = _mutant(backend, name)
    if exc is None:  # runs, but the numbers are wrong (NaN for unwritten shared memory)
        res = emulate(spec, launch)
        err = _rowsum_err(res)
        assert not err < 1e-3, f"{name}: emulated result still correct (max error {err})"
    else:
        with pytest.raises(exc, match=msg):
            emulate(spec, launch)


def test_spin_wait_hits_cpu_limit():
    src = "volatile const int* f = flag; while (f[0] == 0) {} out[0] = 1.0f;"
    spec = KernelSpec("cuda", "spin", ("flag",), ("out",), src)
    launch = Launch([mx.zeros((8,), mx.int32)], [(1,)], [mx.float32], (1, 1, 1), (1, 1, 1))
    with pytest.raises(EmulationError, match="CPU time limit"):
        emulate(spec, launch, schedules=("forward",), cpu_limit_s=1)


def test_metal_threadgroup_memory_limit():
    spec = KernelSpec("metal", "big_tg", ("a",), ("out",),
                      "threadgroup float big[9000]; big[0] = a[0]; out[0] = big[0];")
    launch = Launch([mx.ones((8,))], [(1,)], [mx.float32], (1, 1, 1), (1, 1, 1))
    with pytest.raises(EmulationError, match="threadgroup memory of 36000 bytes"):
        emulate(spec, launch, schedules=("forward",))


def test_unwritten_outputs_are_counted():
    spec = KernelSpec("cuda", "half_written", ("a",), ("out",),
                      "int i = threadIdx.x; if (i % 2 == 0) out[i] = a[i];")
    launch = Launch([mx.ones((32,))], [(32,)], [mx.float32], (32, 1, 1), (32, 1, 1))
    res = emulate(spec, launch)
    assert res.unwritten == {"out": 16}
    assert np.isnan(res.outputs[0][1::2]).all()
