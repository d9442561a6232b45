// Metal layer of the block-skipping decode attention (see attention_common.h).
//
// Same names and fragment layouts as attention_cuda.h. The tensor-core and async-copy
// helpers are the portable variants: the m16n8k16 product is gathered with simd
// shuffles and copies are synchronous. A simdgroup_matrix version can replace them
// later without touching the algorithm.
#ifndef BB_ATTENTION_METAL_H
#define BB_ATTENTION_METAL_H

#include <metal_stdlib>
using namespace metal;

typedef uint uint32_t; // same type as metal_stdlib's, if it has one

#define BB_FN inline
#define BB_GLOBAL device
#define BB_SHARED threadgroup
#define BB_THREAD thread
#define BB_UNROLL _Pragma("clang loop unroll(full)")

// ---- scalars and conversions ------------------------------------------------

BB_FN float bb_neg_inf() { return -INFINITY; }
BB_FN float bb_maxf(float a, float b) { return fmax(a, b); }
BB_FN int bb_mini(int a, int b) { return a < b ? a : b; }

BB_FN float bb_to_float(half x) { return float(x); }
BB_FN float bb_to_float(bfloat x) { return float(x); }
BB_FN float bb_to_float(float x) { return x; }

template <typename T>
BB_FN T bb_from_float(float x) {
  return static_cast<T>(x);
}

// bf16 bits of a float, round to nearest even (NaN stays NaN).
BB_FN uint bb_bf16_bits(float x) {
  uint u = as_type<uint>(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    return 0x7fc0u;
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  return u >> 16;
}

template <typename T>
BB_FN uint bb_pack2(float lo, float hi);
template <>
BB_FN uint bb_pack2<half>(float lo, float hi) {
  return as_type<uint>(half2(half(lo), half(hi)));
}
template <>
BB_FN uint bb_pack2<bfloat>(float lo, float hi) {
  return bb_bf16_bits(lo) | (bb_bf16_bits(hi) << 16);
}

template <typename T>
BB_FN void bb_unpack2(uint r, thread float* lo, thread float* hi);
template <>
BB_FN void bb_unpack2<half>(uint r, thread float* lo, thread float* hi) {
  half2 h = as_type<half2>(r);
  *lo = float(h.x);
  *hi = float(h.y);
}
template <>
BB_FN void bb_unpack2<bfloat>(uint r, thread float* lo, thread float* hi) {
  *lo = as_type<float>(r << 16);
  *hi = as_type<float>(r & 0xffff0000u);
}

BB_FN float bb_mask_value(half x) { return float(x); }
BB_FN float bb_mask_value(bfloat x) { return float(x); }
BB_FN float bb_mask_value(float x) { return x; }
BB_FN float bb_mask_value(bool x) { return x ? 0.0f : -INFINITY; }

template <typename MT>
BB_FN uint bb_mask_hidden_word();
template <>
BB_FN uint bb_mask_hidden_word<half>() { return 0xfc00fc00u; }
template <>
BB_FN uint bb_mask_hidden_word<bfloat>() { return 0xff80ff80u; }
template <>
BB_FN uint bb_mask_hidden_word<float>() { return 0xff800000u; }
template <>
BB_FN uint bb_mask_hidden_word<bool>() { return 0u; }

BB_FN float bb_exp2(float x) { return exp2(x); }
BB_FN float bb_rcp(float x) { return 1.0f / x; }

// ---- simdgroup and threadgroup ----------------------------------------------

BB_FN void bb_sync_block() { threadgroup_barrier(mem_flags::mem_threadgroup); }
BB_FN void bb_sync_warp() { simdgroup_barrier(mem_flags::mem_threadgroup); }
BB_FN uint bb_shfl(uint v, int src) { return simd_shuffle(v, ushort(src)); }
BB_FN float bb_shfl_xor(float v, int m) { return simd_shuffle_xor(v, ushort(m)); }
// No pointer-to-integer casts in Metal: the mask buffer is taken as 16-byte aligned (the scan's
// 16-byte loads have always assumed it).
template <typename P> BB_FN bool bb_aligned16(P) { return true; }
BB_FN uint bb_ballot(bool p) {
  return uint(static_cast<simd_vote::vote_t>(simd_ballot(p)) & 0xffffffffu);
}
BB_FN int bb_popc(uint x) { return int(popcount(x)); }

// ---- device memory ----------------------------------------------------------

BB_FN void bb_fence_device() {
  atomic_thread_fence(mem_flags::mem_device, memory_order_seq_cst, thread_scope_device);
}
BB_FN int bb_atomic_add(device int* p, int v) {
  return atomic_fetch_add_explicit((device atomic_int*)p, v, memory_order_relaxed);
}
// Counting a finished split (see attention_cuda.h): fences around a relaxed atomic.
BB_FN void bb_split_release() { bb_fence_device(); }
BB_FN int bb_split_arrive(device int* p) {
  const int prev = bb_atomic_add(p, 1);
  bb_fence_device();
  return prev;
}
BB_FN void bb_split_acquire() { bb_fence_device(); }
// The pair's counter after the last arrival: count back to 0, epoch on (see attention_cuda.h).
BB_FN void bb_split_clear(device int* p, int n) {
  bb_fence_device();
  bb_atomic_add(p, 0x10000 - n);
}
// Metal promises no progress to a threadgroup that waits for another, so no block polls here:
// the last split merges every part of the merge itself.
#define BB_CAN_POLL 0
BB_FN void bb_split_wait(device int*, int, int) {}
BB_FN float bb_load_coherent(device const float* p) { return *(device const volatile float*)p; }

// ---- copies (synchronous) ---------------------------------------------------

BB_FN void bb_cp_async16(threadgroup void* dst, device const void* src, bool valid) {
  *(threadgroup uint4*)dst = valid ? *(device const uint4*)src : uint4(0u);
}
// 16 bytes written by another threadgroup of this launch (the split records): volatile reads.
BB_FN void bb_cp_coherent16(threadgroup void* dst, device const void* src) {
  device const volatile uint* q = (device const volatile uint*)src;
  *(threadgroup uint4*)dst = uint4(q[0], q[1], q[2], q[3]);
}
BB_FN void bb_cp_async_commit() {}
template <int N>
BB_FN void bb_cp_async_wait() {}

// ---- register fragments (layouts of mma.m16n8k16, see attention_cuda.h) -------

template <typename T, typename L>
BB_FN void bb_ldsm_rows(threadgroup const T* tile, int row0, int col0, thread uint* r, int lane) {
  BB_UNROLL
  for (int m = 0; m < 4; ++m) {
    r[m] = *(threadgroup const uint*)(tile + L::at(row0 + (lane >> 2), col0 + 8 * m + 2 * (lane & 3)));
  }
}

template <typename T, typename L>
BB_FN void bb_ldsm_rows_trans(threadgroup const T* tile, int row0, int col0, thread uint* r, int lane) {
  BB_UNROLL
  for (int m = 0; m < 4; ++m) {
    const int row = row0 + 8 * (m & 1) + 2 * (lane & 3), col = col0 + 8 * (m >> 1) + (lane >> 2);
    const uint lo = *(threadgroup const ushort*)(tile + L::at(row, col));
    const uint hi = *(threadgroup const ushort*)(tile + L::at(row + 1, col));
    r[m] = lo | (hi << 16);
  }
}

#endif // BB_ATTENTION_METAL_H
