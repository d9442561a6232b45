"""Split of the fused q/k/v projection plus RoPE of q and k, as one CUDA launch per layer.

`qkv_rope` takes the projection output qkv [1, T, (Hq + 2*Hkv) * D] (q columns, then k,
then v) and the position of each token, and returns q [1, Hq, T, D], k [1, Hkv, T, D]
(both rotated) and v [1, Hkv, T, D]. On MLX's CUDA back-end the split, the two RoPEs and
the transposes are 4-6 small launches; here they are one kernel, one thread per rotated
pair. Elsewhere (CPU, Metal, fp32, D > 256) the pure-MLX twin `qkv_rope_ref` runs: the
same mx.fast.rope that batchbench.models.llama uses.

Angle of pair i of token t: theta = (scale * positions[t]) * exp2(-(i / (D/2)) * log2(base)),
in fp32 like MLX's own rope kernels, rotation in fp32, one rounding to the output dtype.
"""

from __future__ import annotations

import functools
import math
import struct

import mlx.core as mx

from batchbench import backend
from batchbench.kernels import spec as kspec
from batchbench.kernels.spec import KernelSpec, Launch

MAX_D = 256
THREADS = 256
_DTYPES = (mx.float16, mx.bfloat16)

ROPE_HEADER = r"""
#ifndef BB_ROPE_HEADER
#define BB_ROPE_HEADER
namespace bbrope {

// Explicit conversions: no reliance on __half/__nv_bfloat16 conversion operators.
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ void from_f(float f, __half* o) { *o = __float2half_rn(f); }
__device__ __forceinline__ void from_f(float f, __nv_bfloat16* o) { *o = __float2bfloat16_rn(f); }

// Rotates the pair (x1, x2), pair i of P = D/2, at position pos: the same fp32 steps as
// mlx/backend/cuda/rope.cu (full-range sinf/cosf: theta reaches ~1e5). The q/k/v matmul's
// RoPE epilogue (bbqmm::QmmRopeCfg) calls its two halves apart: the angle before the sums.
__device__ __forceinline__ void angle(float& c, float& s, const int i, const int P, const int pos,
                                      const float log2_base, const float scale) {
  const float inv_freq = exp2f(-((float)i / (float)P) * log2_base);
  const float theta = (scale * (float)pos) * inv_freq;
  c = cosf(theta);
  s = sinf(theta);
}
__device__ __forceinline__ void turn(float& x1, float& x2, const float c, const float s) {
  const float a = x1 * c - x2 * s, b = x1 * s + x2 * c;
  x1 = a;
  x2 = b;
}
__device__ __forceinline__ void rotate(float& x1, float& x2, const int i, const int P, const int pos,
                                       const float log2_base, const float scale) {
  float c, s;
  angle(c, s, i, P, pos, log2_base, scale);
  turn(x1, x2, c, s);
}

// Thread (x, y): pair i of head h (q heads, then k heads, then v heads) of token y.
// Pairs are (i, i + D/2), or (2i, 2i + 1) when TRAD. v pairs are copied unrotated.
// STORE: k and v are the layer's cache buffers [Hkv, nc, D]; token y's rows go to cell
// cells[y] (the K/V write of a decode step, in place: no separate copy launches).
// PAIRED: the q and k heads of qkv come in qmm.rope_pair_order (each 16 features: the first
// elements of 8 pairs, then their partners), as the fused projection stores them on CUDA.
template <typename T, int D, bool TRAD, int HQ, int HKV, bool STORE, bool PAIRED>
__device__ __forceinline__ void qkv_rope(const T* __restrict__ qkv, const int32_t* __restrict__ positions,
                                         T* __restrict__ q, T* __restrict__ k, T* __restrict__ v,
                                         const int n_tok, const float log2_base, const float scale,
                                         const int32_t* __restrict__ cells, const int nc) {
  constexpr int P = D / 2;
  constexpr int H = HQ + 2 * HKV;
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  const int t = blockIdx.y;
  if (idx >= H * P || t >= n_tok) return;
  const int h = idx / P, i = idx - h * P;
  const int i1 = TRAD ? 2 * i : i, i2 = TRAD ? 2 * i + 1 : i + P;
  const T* x = qkv + ((size_t)t * H + h) * D;
  const int j1 = PAIRED && h < HQ + HKV ? 16 * (i >> 3) + (i & 7) : i1;  // where x holds them
  const int j2 = PAIRED && h < HQ + HKV ? j1 + 8 : i2;
  const size_t row = STORE ? (size_t)cells[t] : (size_t)t;
  const size_t rows = STORE ? (size_t)nc : (size_t)n_tok;
  if (h >= HQ + HKV) {
    T* o = v + ((size_t)(h - HQ - HKV) * rows + row) * D;
    o[i1] = x[i1];
    o[i2] = x[i2];
    return;
  }
  T* o = h < HQ ? q + ((size_t)h * n_tok + t) * D : k + ((size_t)(h - HQ) * rows + row) * D;
  float x1 = to_f(x[j1]), x2 = to_f(x[j2]);
  rotate(x1, x2, i, P, positions[t], log2_base, scale);
  from_f(x1, o + i1);
  from_f(x2, o + i2);
}

// The q/k/v matmul's RoPE epilogue (qmm's QmmRopeCfg, qmv8's ROPE) on one pair of its output
// rows stored in rope_pair_order: rows n and n + 8 of n's 16-row tile (n % 16 < 8). q heads go
// rotated into q [HQ, M, D]; k heads rotated, and v heads as they are, into the cache buffers
// [HKV, nc, D] at cell cells[m]. prep (the angle and the cell) needs only n and m, so a matmul
// can take it before its sums. lo and hi are rounded to T before the rotation, as the unfused
// path rounds the matmul's output.
template <typename T>
struct RopeIO {
  const int32_t* pos;
  const int32_t* cells;
  T* kc;
  T* vc;
  int nc;  // cells per kv head in the cache buffers
  float log2_base;
  float scale;
};

template <int D, int HQ, int HKV, bool TRAD>
struct PairRope {
  static constexpr int P = D / 2, TPH = D / 16;  // rotation pairs and 16-row tiles per head
  struct Prep {
    float c, s;
    int cell;
  };
  template <typename T>
  static __device__ __forceinline__ Prep prep(const int n, const int m, const RopeIO<T>& rp) {
    const int tile = n >> 4, h = tile / TPH;
    Prep p{1.f, 0.f, 0};
    if (h < HQ + HKV) angle(p.c, p.s, (tile - h * TPH) * 8 + (n & 7), P, rp.pos[m], rp.log2_base, rp.scale);
    if (h >= HQ) p.cell = rp.cells[m];
    return p;
  }
  template <typename T>
  static __device__ __forceinline__ void store(float lo, float hi, const int n, const int m, const int M,
                                               const RopeIO<T>& rp, T* __restrict__ q, const Prep& p) {
    const int tile = n >> 4, rr = n & 7;
    const int h = tile / TPH, jt = tile - h * TPH;
    T tl, th;
    from_f(lo, &tl);
    from_f(hi, &th);
    lo = to_f(tl);
    hi = to_f(th);
    T* dst;
    int dlo, dhi;
    if (h < HQ + HKV) {
      const int i = jt * 8 + rr;
      dlo = TRAD ? 2 * i : i;
      dhi = TRAD ? 2 * i + 1 : i + P;
      turn(lo, hi, p.c, p.s);
      dst = h < HQ ? q + ((size_t)h * M + m) * D : rp.kc + ((size_t)(h - HQ) * rp.nc + p.cell) * D;
    } else {
      dlo = jt * 16 + rr;
      dhi = dlo + 8;
      dst = rp.vc + ((size_t)(h - HQ - HKV) * rp.nc + p.cell) * D;
    }
    from_f(lo, dst + dlo);
    from_f(hi, dst + dhi);
  }
};

}  // namespace bbrope
#endif  // BB_ROPE_HEADER
"""
ROPE_HEADER = kspec.compact(ROPE_HEADER)  # MLX hashes the source on every launch

_SOURCE = (
    "bbrope::qkv_rope<T, D, TRAD, HQ, HKV, false, PAIRED>(qkv, positions, q, k, v, qkv_shape[1], "
    "__int_as_float(LOG2_BASE_BITS), __int_as_float(SCALE_BITS), nullptr, 0);"
)
ROPE_SPEC = KernelSpec("cuda", "bb_qkv_rope", ("qkv", "positions"), ("q", "k", "v"), _SOURCE, ROPE_HEADER)
# MLX has no in-place custom kernels: the cache buffers come in as inputs and are written
# through a const_cast. MLX's CUDA graph orders a launch after those that output its buffers,
# so every reader of the buffers must take q, this kernel's output (qkv_rope_store says when).
# Inputs must be row-contiguous (the cache's are): MLX would otherwise hand the kernel a copy
# and the write would be lost.
_STORE_SOURCE = (
    "bbrope::qkv_rope<T, D, TRAD, HQ, HKV, true, PAIRED>(qkv, positions, q, const_cast<T*>(kc), "
    "const_cast<T*>(vc), qkv_shape[1], __int_as_float(LOG2_BASE_BITS), __int_as_float(SCALE_BITS), "
    "cells, kc_shape[2]);"
)
STORE_SPEC = KernelSpec("cuda", "bb_qkv_rope_store", ("qkv", "positions", "cells", "kc", "vc"), ("q",),
                        _STORE_SOURCE, ROPE_HEADER)


def _f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def angle_template(base: float, scale: float) -> list[tuple[str, int]]:
    """The angle constants as int template values (float bits), as MLX's RoPE primitive
    takes them: base and scale are floats, log2 taken of the float base."""
    return [("LOG2_BASE_BITS", kspec.f32_bits(_f32(math.log2(_f32(base))))),
            ("SCALE_BITS", kspec.f32_bits(scale))]


def pair_layout(rope: dict) -> tuple[int, int, int, bool]:
    """(Hq, Hkv, D, traditional) of an attention's qkv_rope arguments: what `rope_pair_order`
    depends on, and so what a fused q/k/v weight stored in that order must match."""
    return (rope["n_heads"], rope["n_kv_heads"], rope["head_dim"], bool(rope["traditional"]))


def rope_pair_order(n_heads: int, n_kv_heads: int, head_dim: int, traditional: bool) -> list[int]:
    """Row order of a fused q/k/v weight for the RoPE epilogue: new row j is old row order[j].
    In each q and k head, 16-row tile t holds rotation pairs 8t..8t+7: their first elements
    (d = i, or 2i when traditional), then their partners (i + D/2, or 2i + 1). v is unchanged."""
    d, p = head_dim, head_dim // 2
    if d % 16:
        raise ValueError(f"rope_pair_order: head_dim must be a multiple of 16, got {d}")
    head = []
    for t in range(d // 16):
        pairs = range(8 * t, 8 * t + 8)
        head += [2 * i if traditional else i for i in pairs] + [2 * i + 1 if traditional else i + p for i in pairs]
    order = [h * d + j for h in range(n_heads + n_kv_heads) for j in head]
    return order + list(range((n_heads + n_kv_heads) * d, (n_heads + 2 * n_kv_heads) * d))


def inverse_order(order: list[int]) -> mx.array:
    """The gather index that puts rows stored in `order` (new row j = old row order[j]) back."""
    unorder = [0] * len(order)
    for j, i in enumerate(order):
        unorder[i] = j
    return mx.array(unorder, dtype=mx.int32)


@functools.lru_cache(maxsize=None)
def _unpair_index(n_heads: int, n_kv_heads: int, head_dim: int, traditional: bool) -> mx.array:
    return inverse_order(rope_pair_order(n_heads, n_kv_heads, head_dim, traditional))


def unpair(qkv: mx.array, n_heads: int, n_kv_heads: int, head_dim: int, traditional: bool) -> mx.array:
    """qkv [..., W] from rope_pair_order back to the natural order (one gather)."""
    return mx.take(qkv, _unpair_index(n_heads, n_kv_heads, head_dim, bool(traditional)), axis=-1)


def _check(qkv: mx.array, positions: mx.array, n_heads: int, n_kv_heads: int, head_dim: int) -> int:
    """Validate shapes; returns T."""
    width = (n_heads + 2 * n_kv_heads) * head_dim
    if qkv.ndim != 3 or qkv.shape[0] != 1 or qkv.shape[2] != width:
        raise ValueError(
            f"qkv_rope: qkv must be [1, T, {width}] for Hq={n_heads}, Hkv={n_kv_heads}, D={head_dim}, "
            f"got {tuple(qkv.shape)}"
        )
    t = qkv.shape[1]
    if positions.shape != (t,):
        raise ValueError(f"qkv_rope: positions must be [{t}], got {tuple(positions.shape)}")
    if head_dim % 2:
        raise ValueError(f"qkv_rope: head_dim must be even, got {head_dim}")
    return t


def kernel_supported(qkv: mx.array, head_dim: int) -> bool:
    return qkv.dtype in _DTYPES and head_dim % 2 == 0 and head_dim <= MAX_D


def plan_qkv_rope(
    qkv: mx.array,
    positions: mx.array,
    *,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    base: float,
    scale: float,
    traditional: bool,
    store: tuple[mx.array, mx.array, mx.array] | None = None,
    paired: bool = False,
) -> tuple[KernelSpec, Launch]:
    """The CUDA kernel and launch `qkv_rope` runs. Per-model constants (dtype, D, heads,
    base, scale, layout) are template values; T and the positions are runtime inputs.
    store (cells [T] int32, keys, values [1, Hkv, cells, D]): write k and v into the cache
    buffers at those cells instead of returning them (`qkv_rope_store`)."""
    t = _check(qkv, positions, n_heads, n_kv_heads, head_dim)
    if not kernel_supported(qkv, head_dim):
        raise ValueError(f"qkv_rope kernel: needs fp16/bf16 and even D <= {MAX_D}, got {qkv.dtype}, D={head_dim}")
    if paired and head_dim % 16:
        raise ValueError(f"qkv_rope kernel: the paired layout needs D % 16 == 0, got D={head_dim}")
    if positions.dtype != mx.int32:
        positions = positions.astype(mx.int32)
    pairs = (n_heads + 2 * n_kv_heads) * (head_dim // 2)
    inputs, shapes = [qkv, positions], [(1, n_heads, t, head_dim)]
    if store is None:
        shapes += [(1, n_kv_heads, t, head_dim)] * 2
    else:
        cells, keys, values = store
        _check_store(qkv, cells, keys, values, t, n_kv_heads, head_dim)
        if keys.dtype != qkv.dtype or values.dtype != qkv.dtype:
            raise ValueError(f"qkv_rope_store kernel: cache dtype {keys.dtype} differs from {qkv.dtype}")
        inputs += [cells.astype(mx.int32), keys, values]
    launch = Launch(
        inputs=inputs,
        output_shapes=shapes,
        output_dtypes=[qkv.dtype] * len(shapes),
        grid=(pairs, t, 1),
        threadgroup=(min(THREADS, pairs), 1, 1),
        template=[
            ("T", qkv.dtype), ("D", head_dim), ("TRAD", bool(traditional)), ("HQ", n_heads),
            ("HKV", n_kv_heads), *angle_template(base, scale), ("PAIRED", bool(paired)),
        ],
    )
    return (ROPE_SPEC if store is None else STORE_SPEC), launch


def _check_store(qkv, cells, keys, values, t, n_kv_heads, head_dim) -> None:
    want = (1, n_kv_heads)
    for name, buf in (("keys", keys), ("values", values)):
        if buf.ndim != 4 or tuple(buf.shape[:2]) != want or buf.shape[3] != head_dim:
            raise ValueError(
                f"qkv_rope_store: {name} must be [1, {n_kv_heads}, cells, {head_dim}], got {tuple(buf.shape)}"
            )
    if keys.shape != values.shape:
        raise ValueError(f"qkv_rope_store: keys {tuple(keys.shape)} and values {tuple(values.shape)} differ")
    if cells.shape != (t,):
        raise ValueError(f"qkv_rope_store: cells must be [{t}], got {tuple(cells.shape)}")


def qkv_rope_ref(
    qkv: mx.array,
    positions: mx.array,
    *,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    base: float,
    scale: float,
    traditional: bool,
) -> tuple[mx.array, mx.array, mx.array]:
    """Pure-MLX twin (what llama.py's Attention.qkv does). q and k share one mx.fast.rope call:
    [T, Hq + Hkv, 1, D] rotates every token at its own position. Returns transposed views."""
    t = _check(qkv, positions, n_heads, n_kv_heads, head_dim)
    hqk = n_heads + n_kv_heads
    qk = qkv[..., : hqk * head_dim].reshape(t, hqk, 1, head_dim)
    qk = mx.fast.rope(qk, head_dim, traditional=traditional, base=base, scale=scale, offset=positions)
    qk = qk.reshape(t, hqk, head_dim).transpose(1, 0, 2)[None]
    v = qkv[..., hqk * head_dim :].reshape(1, t, n_kv_heads, head_dim).transpose(0, 2, 1, 3)
    return qk[:, :n_heads], qk[:, n_heads:], v


def qkv_rope(
    qkv: mx.array,
    positions: mx.array,
    *,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    base: float,
    scale: float,
    traditional: bool,
    paired: bool = False,
) -> tuple[mx.array, mx.array, mx.array]:
    """(q [1, Hq, T, D], k [1, Hkv, T, D], v [1, Hkv, T, D]) from qkv [1, T, (Hq + 2*Hkv) * D],
    q and k rotated at positions [T]. One CUDA kernel when `backend.BACKEND == "cuda"` and
    the dtype/D are covered (row-contiguous outputs), else `qkv_rope_ref`. paired: qkv's
    q and k heads are in `rope_pair_order` (the kernel reads them so; the twin gets them back
    in order first)."""
    kw = dict(n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, base=base, scale=scale,
              traditional=traditional)
    if backend.BACKEND == "cuda" and kernel_supported(qkv, head_dim):
        q, k, v = kspec.run(*plan_qkv_rope(qkv, positions, paired=paired, **kw))
        return q, k, v
    if paired:
        qkv = unpair(qkv, n_heads, n_kv_heads, head_dim, traditional)
    return qkv_rope_ref(qkv, positions, **kw)


def qkv_rope_store(
    qkv: mx.array,
    positions: mx.array,
    cells: mx.array,
    keys: mx.array,
    values: mx.array,
    *,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    base: float,
    scale: float,
    traditional: bool,
    where: slice | None = None,
    in_place: bool = True,
    paired: bool = False,
) -> tuple[mx.array, mx.array, mx.array]:
    """`qkv_rope`, then the K/V write: returns (q, keys, values) where the cache buffers
    keys/values [1, Hkv, cells, D] hold token t's k and v at cell cells[t].

    On CUDA with `in_place`, one kernel writes the buffers in place and returns them as they
    came. MLX's CUDA graphs order launches by the buffers they *output*, and these buffers are
    inputs here: only a launch that also takes q is sure to run after the write. The decode
    attention kernel is such a launch. Prefill's SDPA, or copies made of strided slices, are not,
    so callers pass in_place=False there. Then qkv_rope runs, followed by a slice update when
    `where` (the same cells as a slice) is given, else a scatter. Callers must keep what is
    returned, which is correct for both. paired: as in `qkv_rope`."""
    kw = dict(n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, base=base, scale=scale,
              traditional=traditional)
    if (in_place and backend.BACKEND == "cuda" and kernel_supported(qkv, head_dim)
            and keys.dtype == qkv.dtype):
        (q,) = kspec.run(*plan_qkv_rope(qkv, positions, store=(cells, keys, values), paired=paired, **kw))
        return q, keys, values
    t = _check(qkv, positions, n_heads, n_kv_heads, head_dim)
    _check_store(qkv, cells, keys, values, t, n_kv_heads, head_dim)
    return _store(qkv_rope(qkv, positions, paired=paired, **kw), cells, keys, values, where)


def qkv_rope_store_ref(qkv, positions, cells, keys, values, *, where=None, in_place=True, **kw):
    """Pure-MLX twin of `qkv_rope_store` (in_place changes nothing here)."""
    t = _check(qkv, positions, kw["n_heads"], kw["n_kv_heads"], kw["head_dim"])
    _check_store(qkv, cells, keys, values, t, kw["n_kv_heads"], kw["head_dim"])
    return _store(qkv_rope_ref(qkv, positions, **kw), cells, keys, values, where)


def _store(qkv_out, cells, keys, values, where):
    q, k, v = qkv_out
    idx = where if where is not None else cells
    keys[:, :, idx] = k.astype(keys.dtype)
    values[:, :, idx] = v.astype(values.dtype)
    return q, keys, values
