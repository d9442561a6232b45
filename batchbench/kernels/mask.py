"""The KQ mask of a decode ubatch from the cache's cell metadata, as one CUDA launch.

`decode_mask(bits, cell_pos, seq, p1, dtype)` returns [T, n]: 0 where cell c holds sequence
seq[t] (bit seq[t] % 32 of bits[seq[t] // 32, c]) at a position 0 <= cell_pos[c] <= p1[t],
-inf elsewhere; n = len(cell_pos) (the window; bits may be wider). These are llama.cpp's
set_input_kq_mask rules without sliding windows. On MLX's CUDA back-end the same expression
is ~15 small launches (gather, shifts, compares, integer casts, select) over [T, n]; here it
is one pass. Elsewhere, and for fp32 masks, the pure-MLX twin `decode_mask_ref` runs.
"""

from __future__ import annotations

import mlx.core as mx

from batchbench import backend
from batchbench.kernels import spec as kspec
from batchbench.kernels.spec import KernelSpec, Launch

CELLS_PER_THREAD = 8
THREADS = 256
_DTYPES = (mx.float16, mx.bfloat16)

MASK_HEADER = r"""
#ifndef BB_MASK_HEADER
#define BB_MASK_HEADER
namespace bbmask {

// -inf as the output dtype's bit pattern.
template <typename T> struct ninf_bits { static constexpr unsigned short v = 0xFC00u; };
template <> struct ninf_bits<__nv_bfloat16> { static constexpr unsigned short v = 0xFF80u; };

// Thread x of row y: cells 8x .. 8x+7 of token y. 0 / -inf as the output dtype's bits.
template <typename T>
__device__ __forceinline__ void decode_mask(const uint32_t* __restrict__ bits, const int stride,
                                            const int32_t* __restrict__ cell_pos,
                                            const int32_t* __restrict__ seq,
                                            const int32_t* __restrict__ p1, T* __restrict__ out,
                                            const int n, const int n_tok) {
  const int c0 = (blockIdx.x * blockDim.x + threadIdx.x) * 8;
  const int t = blockIdx.y;
  if (c0 >= n || t >= n_tok) return;
  const int s = seq[t], p = p1[t];
  const uint32_t* row = bits + (size_t)(s >> 5) * stride;
  const uint32_t b = (uint32_t)(s & 31);
  const unsigned short ninf = ninf_bits<T>::v;
  unsigned short* o = reinterpret_cast<unsigned short*>(out) + (size_t)t * n;
  for (int j = 0; j < 8 && c0 + j < n; ++j) {
    const int c = c0 + j;
    const int q = cell_pos[c];
    const bool vis = ((row[c] >> b) & 1u) && q >= 0 && q <= p;
    o[c] = vis ? (unsigned short)0 : ninf;
  }
}

}  // namespace bbmask
#endif  // BB_MASK_HEADER
"""


MASK_HEADER = kspec.compact(MASK_HEADER)  # MLX hashes the source on every launch
_SOURCE = (
    "bbmask::decode_mask<T>(bits, bits_shape[1], cell_pos, seq, p1, out, cell_pos_shape[0], "
    "seq_shape[0]);"
)
MASK_SPEC = KernelSpec("cuda", "bb_decode_mask", ("bits", "cell_pos", "seq", "p1"), ("out",), _SOURCE,
                       MASK_HEADER)


def _check(bits: mx.array, cell_pos: mx.array, seq: mx.array, p1: mx.array) -> tuple[int, int]:
    if bits.ndim != 2 or bits.dtype != mx.uint32:
        raise ValueError(f"decode_mask: bits must be uint32 [words, cells], got {bits.dtype} {bits.shape}")
    if cell_pos.ndim != 1 or cell_pos.shape[0] > bits.shape[1]:
        raise ValueError(f"decode_mask: cell_pos must be [n <= {bits.shape[1]}], got {cell_pos.shape}")
    if seq.ndim != 1 or p1.shape != seq.shape:
        raise ValueError(f"decode_mask: seq and p1 must be [T], got {seq.shape} and {p1.shape}")
    return seq.shape[0], cell_pos.shape[0]


def plan_decode_mask(bits: mx.array, cell_pos: mx.array, seq: mx.array, p1: mx.array,
                     dtype) -> tuple[KernelSpec, Launch]:
    """The CUDA kernel and launch of `decode_mask`: T and n are runtime values."""
    t, n = _check(bits, cell_pos, seq, p1)
    if dtype not in _DTYPES:
        raise ValueError(f"decode_mask kernel: needs a float16/bfloat16 mask, not {dtype}")
    threads = -(-n // CELLS_PER_THREAD)
    launch = Launch(
        inputs=[bits, cell_pos.astype(mx.int32), seq.astype(mx.int32), p1.astype(mx.int32)],
        output_shapes=[(t, n)],
        output_dtypes=[dtype],
        grid=(threads, t, 1),
        threadgroup=(min(THREADS, threads), 1, 1),
        template=[("T", dtype)],
    )
    return MASK_SPEC, launch


def visible(bits: mx.array, cell_pos: mx.array, seq: mx.array, p1: mx.array) -> mx.array:
    """bool [T, n], in MLX ops: cell c holds sequence seq[t] at a position 0 <= cell_pos[c] <= p1[t]."""
    _check(bits, cell_pos, seq, p1)
    n = cell_pos.shape[0]
    s = seq.astype(mx.uint32)
    words = bits[:, :n][(s // 32).astype(mx.int32)]
    member = ((words >> (s % 32)[:, None]) & 1) == 1
    p0 = cell_pos[None, :]
    return member & (p0 >= 0) & (p0 <= p1.astype(mx.int32)[:, None])


def additive(vis: mx.array, dtype) -> mx.array:
    """0 where visible, -inf elsewhere."""
    return mx.where(vis, mx.array(0.0, dtype), mx.array(-mx.inf, dtype))


def decode_mask_ref(bits: mx.array, cell_pos: mx.array, seq: mx.array, p1: mx.array, dtype) -> mx.array:
    """Pure-MLX twin of `decode_mask`."""
    return additive(visible(bits, cell_pos, seq, p1), dtype)


def decode_mask(bits: mx.array, cell_pos: mx.array, seq: mx.array, p1: mx.array, dtype) -> mx.array:
    """[T, n] additive mask (0 / -inf) of tokens (seq[t], p1[t]) over cells 0..n-1,
    n = len(cell_pos); one CUDA kernel when `backend.BACKEND == "cuda"`, else the twin."""
    if backend.BACKEND == "cuda" and dtype in _DTYPES:
        return kspec.run(*plan_decode_mask(bits, cell_pos, seq, p1, dtype))[0]
    return decode_mask_ref(bits, cell_pos, seq, p1, dtype)
