// CUDA layer of the block-skipping decode attention (see attention_common.h).
//
// Everything the shared algorithm needs from the chip lives here: qualifiers, warp
// votes and shuffles, barriers, atomics, and the few tensor-core / async-copy
// instructions. Each PTX helper has a plain variant under BB_PORTABLE, which the
// CPU verification harness compiles instead (same fragment layouts, no PTX).
#ifndef BB_ATTENTION_CUDA_H
#define BB_ATTENTION_CUDA_H

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define BB_FN __device__ __forceinline__
#define BB_GLOBAL
#define BB_SHARED
#define BB_THREAD
#define BB_UNROLL _Pragma("unroll")

// ---- scalars and conversions ------------------------------------------------

BB_FN float bb_neg_inf() { return __int_as_float(0xff800000); }
BB_FN float bb_maxf(float a, float b) { return fmaxf(a, b); }
BB_FN int bb_mini(int a, int b) { return a < b ? a : b; }

BB_FN float bb_to_float(__half x) { return __half2float(x); }
BB_FN float bb_to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
BB_FN float bb_to_float(float x) { return x; }

template <typename T>
BB_FN T bb_from_float(float x);
template <>
BB_FN __half bb_from_float<__half>(float x) { return __float2half_rn(x); }
template <>
BB_FN __nv_bfloat16 bb_from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Two floats packed into one 32-bit register of T (low half = first).
template <typename T>
BB_FN uint32_t bb_pack2(float lo, float hi);
template <>
BB_FN uint32_t bb_pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <>
BB_FN uint32_t bb_pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

template <typename T>
BB_FN void bb_unpack2(uint32_t r, BB_THREAD float* lo, BB_THREAD float* hi);
template <>
BB_FN void bb_unpack2<__half>(uint32_t r, float* lo, float* hi) {
  __half2 h = *reinterpret_cast<__half2*>(&r);
  *lo = __low2float(h);
  *hi = __high2float(h);
}
template <>
BB_FN void bb_unpack2<__nv_bfloat16>(uint32_t r, float* lo, float* hi) {
  *lo = __uint_as_float(r << 16);
  *hi = __uint_as_float(r & 0xffff0000u);
}

// Additive mask value (bool: True = attend).
BB_FN float bb_mask_value(__half x) { return __half2float(x); }
BB_FN float bb_mask_value(__nv_bfloat16 x) { return __bfloat162float(x); }
BB_FN float bb_mask_value(float x) { return x; }
BB_FN float bb_mask_value(bool x) { return x ? 0.0f : bb_neg_inf(); }

// 32-bit word of a mask whose values are all hidden (-inf, or false).
template <typename MT>
BB_FN uint32_t bb_mask_hidden_word();
template <>
BB_FN uint32_t bb_mask_hidden_word<__half>() { return 0xfc00fc00u; }
template <>
BB_FN uint32_t bb_mask_hidden_word<__nv_bfloat16>() { return 0xff80ff80u; }
template <>
BB_FN uint32_t bb_mask_hidden_word<float>() { return 0xff800000u; }
template <>
BB_FN uint32_t bb_mask_hidden_word<bool>() { return 0u; }

#ifdef BB_PORTABLE
BB_FN float bb_exp2(float x) { return exp2f(x); }
BB_FN float bb_rcp(float x) { return 1.0f / x; }
#else
// 1 / x for the softmax sums (x >= 1 where used): rcp.approx, 1 ulp, without the IEEE
// division's slow-path branch.
BB_FN float bb_rcp(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
// ex2.approx: 2 ulp, exp2(-inf) = +0, which is all the online softmax needs.
BB_FN float bb_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
#endif

// ---- warp and block ---------------------------------------------------------

BB_FN void bb_sync_block() { __syncthreads(); }
BB_FN void bb_sync_warp() { __syncwarp(); }
BB_FN uint32_t bb_shfl(uint32_t v, int src) { return __shfl_sync(0xffffffffu, v, src); }
BB_FN float bb_shfl_xor(float v, int m) { return __shfl_xor_sync(0xffffffffu, v, m); }
BB_FN uint32_t bb_ballot(bool p) { return __ballot_sync(0xffffffffu, p); }
// 16-byte mask loads need a 16-byte aligned buffer: an MLX array may be a view at any offset.
template <typename P> BB_FN bool bb_aligned16(P p) { return ((uintptr_t)(const void*)p & 15u) == 0; }
BB_FN int bb_popc(uint32_t x) { return __popc(x); }

// ---- device memory ----------------------------------------------------------

BB_FN void bb_fence_device() { __threadfence(); }
BB_FN int bb_atomic_add(int* p, int v) { return atomicAdd(p, v); }
// Counting a finished split (attention_common.h): every thread calls bb_split_release, then a
// block barrier, then thread 0 bb_split_arrive (returns the count before); the last block calls
// bb_split_acquire before it reads the other splits' records. A barrier followed by one
// release atomic orders every thread's writes (CUTLASS's semaphore does the same).
#ifdef BB_PORTABLE
BB_FN void bb_split_release() { bb_fence_device(); }
BB_FN int bb_split_arrive(int* p) { return bb_atomic_add(p, 1); }
BB_FN void bb_split_acquire() { bb_fence_device(); }
#else
BB_FN void bb_split_release() {}
BB_FN int bb_split_arrive(int* p) {
  int prev;
  asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], 1;" : "=r"(prev) : "l"(p) : "memory");
  return prev;
}
BB_FN void bb_split_acquire() {}
#endif
// A pair's counter: arrivals in its low 16 bits, an epoch above. The last split to arrive adds
// 0x10000 - n (bb_split_clear): the count goes back to 0 for the next launch and the epoch moves
// on, so a merger that polls (bb_split_wait) and misses the moment of the full count still sees
// that every split counted. Only the last arriver writes after the count, so no launch needs a
// reset.
#ifdef BB_PORTABLE
BB_FN void bb_split_clear(int* p, int n) {
  bb_fence_device();
  atomicAdd(p, 0x10000 - n);
}
#else
// Relaxed: an atomic add continues the release sequence of every split's arrival, so a merger
// that acquires the cleared value sees every record. (red.release put a MEMBAR.ALL.GPU, about
// one round trip, ahead of the last split's merge: +0.9 us at B=2 x 4096, H200.)
BB_FN void bb_split_clear(int* p, int n) {
  asm volatile("red.relaxed.gpu.global.add.s32 [%0], %1;" ::"l"(p), "r"(0x10000 - n) : "memory");
}
#endif
// Whether a block may wait for other blocks of its launch (bb_split_wait). Not in the CPU
// emulator, which runs one block at a time: there the last split merges every part itself.
#ifdef BB_EMU
#define BB_CAN_POLL 0
#else
#define BB_CAN_POLL 1
#endif
// Wait until all n splits of this launch have counted; `prev` is this block's own count before
// it arrived (bb_split_arrive). Afterwards every split's record is visible (acquire).
BB_FN bool bb_split_counted(unsigned v, unsigned prev, int n) {
  return (v & 0xffffu) == (unsigned)n || (v >> 16) != (prev >> 16);
}
#ifdef BB_PORTABLE
BB_FN void bb_split_wait(int* p, int n, int prev) {
  while (!bb_split_counted((unsigned)atomicAdd(p, 0), (unsigned)prev, n)) {
  }
  bb_fence_device();
}
#else
BB_FN void bb_split_wait(int* p, int n, int prev) {
  unsigned v;
  do {
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  } while (!bb_split_counted(v, (unsigned)prev, n));
}
#endif
// Partials written by other blocks: read through L2, never a stale L1 line.
BB_FN float bb_load_coherent(const float* p) { return __ldcg(p); }

// ---- phase timestamps (diagnostic builds, BB_TIMELINE) ------------------------

#ifdef BB_TIMELINE
#ifdef BB_PORTABLE
// Deterministic stand-ins: the emulator checks where the stamps land, not their values.
BB_FN uint32_t bb_smid() { return 0u; }
BB_FN void bb_stamp_write(uint32_t* s, int i) {
  s[2 * i] = (uint32_t)i;
  s[2 * i + 1] = 0u;
}
#else
BB_FN uint32_t bb_smid() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(r));
  return r;
}
// %globaltimer: nanoseconds, one clock for every SM.
BB_FN void bb_stamp_write(uint32_t* s, int i) {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  s[2 * i] = (uint32_t)t;
  s[2 * i + 1] = (uint32_t)(t >> 32);
}
#endif
#endif

// ---- asynchronous global -> shared copies -----------------------------------

#if defined(BB_EMU)
// The CPU emulator holds each copy back until the wait that retires its group.
BB_FN void bb_cp_async16(void* dst, const void* src, bool valid) {
  bbemu::async_copy(dst, valid ? src : nullptr, 16);
}
BB_FN void bb_cp_async_commit() { bbemu::async_commit(); }
template <int N>
BB_FN void bb_cp_async_wait() { bbemu::async_wait(N); }
#elif defined(BB_PORTABLE)
BB_FN void bb_cp_async16(void* dst, const void* src, bool valid) {
  uint4 z = make_uint4(0, 0, 0, 0);
  *reinterpret_cast<uint4*>(dst) = valid ? *reinterpret_cast<const uint4*>(src) : z;
}
BB_FN void bb_cp_async_commit() {}
template <int N>
BB_FN void bb_cp_async_wait() {}
#else
// 16-byte cp.async.cg (bypasses L1); src-size 0 zero-fills the destination.
BB_FN void bb_cp_async16(void* dst, const void* src, bool valid) {
  uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(n));
}
BB_FN void bb_cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
BB_FN void bb_cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
#endif

// 16 bytes written by another block of this launch (the split records): cp.async.cg reads
// through L2, never a stale L1 line (same commit groups as bb_cp_async16).
BB_FN void bb_cp_coherent16(void* dst, const void* src) { bb_cp_async16(dst, src, true); }

// ---- shared -> register fragments (ldmatrix) --------------------------------
// Fragment layout of mma.m16n8k16 (g = lane / 4, c = lane % 4):
//   A 16x16 row: a0 = A[g][2c..], a1 = A[g+8][2c..], a2 = A[g][2c+8..], a3 = A[g+8][2c+8..]
//   B 16x8 col:  b0 = B[2c..2c+1][g], b1 = B[2c+8..2c+9][g]
//   C 16x8:      c0,c1 = C[g][2c, 2c+1], c2,c3 = C[g+8][2c, 2c+1]

// Four 8x8 matrices at rows row0..row0+7, columns col0 + 8m (m = 0..3) of a tile laid out by
// L (L::at(row, column): element offset; row0 and col0 multiples of 8):
// r[m] = tile[row0 + g][col0 + 8m + 2c .. +1]. For K as the B operand of Q K^T.
template <typename T, typename L>
BB_FN void bb_ldsm_rows(const T* tile, int row0, int col0, uint32_t* r, int lane) {
#ifdef BB_PORTABLE
  BB_UNROLL
  for (int m = 0; m < 4; ++m) {
    r[m] = *reinterpret_cast<const uint32_t*>(tile + L::at(row0 + (lane >> 2), col0 + 8 * m + 2 * (lane & 3)));
  }
#else
  const T* p = tile + L::at(row0 + (lane & 7), col0 + 8 * (lane >> 3));
  uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
#endif
}

// Transposed: matrix m has origin (row0 + 8 (m & 1), col0 + 8 (m >> 1)) and
// r[m] = {tile[r + 2c][col + g], tile[r + 2c + 1][col + g]}. For V as the B operand of P V.
template <typename T, typename L>
BB_FN void bb_ldsm_rows_trans(const T* tile, int row0, int col0, uint32_t* r, int lane) {
#ifdef BB_PORTABLE
  BB_UNROLL
  for (int m = 0; m < 4; ++m) {
    const int row = row0 + 8 * (m & 1) + 2 * (lane & 3), col = col0 + 8 * (m >> 1) + (lane >> 2);
    uint16_t lo = *reinterpret_cast<const uint16_t*>(tile + L::at(row, col));
    uint16_t hi = *reinterpret_cast<const uint16_t*>(tile + L::at(row + 1, col));
    r[m] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
#else
  const int m = lane >> 3;
  const T* p = tile + L::at(row0 + 8 * (m & 1) + (lane & 7), col0 + 8 * (m >> 1));
  uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
#endif
}

// ---- fragment transpose: an 8x8 b16 matrix in mma layout, transposed ---------

#ifndef BB_PORTABLE
#define BB_HAS_MOVMATRIX 1  // the portable version is in attention_common.h
BB_FN uint32_t bb_movmatrix_trans(uint32_t x, int) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}
#endif

// ---- tensor cores: C[16x8] += A[16x16] B[16x8], fp32 accumulate ---------------

#ifndef BB_PORTABLE
#define BB_HAS_MMA 1  // tensor-core version below; the portable one is in attention_common.h
template <typename T>
BB_FN void bb_mma_16816(float* acc, const uint32_t* a, uint32_t b0, uint32_t b1, int lane);
template <>
BB_FN void bb_mma_16816<__half>(float* acc, const uint32_t* a, uint32_t b0, uint32_t b1,
                                          int) {
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
BB_FN void bb_mma_16816<__nv_bfloat16>(float* acc, const uint32_t* a, uint32_t b0, uint32_t b1,
                                          int) {
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif

#endif // BB_ATTENTION_CUDA_H
