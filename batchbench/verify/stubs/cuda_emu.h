// CUDA on the CPU for the SIMT emulator: what MLX's custom-kernel sources see through
// "mlx/backend/cuda/device/utils.cuh", <cooperative_groups.h>, <cuda_fp16.h> and
// <cuda_bf16.h>, implemented on top of simt.h. Inline PTX cannot run here: kernels keep it
// in small helpers with a plain variant under BB_PORTABLE, which the emulator defines.
#pragma once
#pragma GCC system_header

#include <algorithm>
#include <array>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>

#include "bbfloat.h"
#include "simt.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))
#define __grid_constant__
#define __constant__
#define __managed__
#define __shared__ static
#define __CUDA_EMU__ 1

#ifndef MAX_NDIM
#define MAX_NDIM 10
#endif
#ifndef WARP_SIZE
#define WARP_SIZE 32
#endif

namespace cuda {
namespace std = ::std;
}

// ---- vector types ------------------------------------------------------------------------

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int a = 1, unsigned int b = 1, unsigned int c = 1) : x(a), y(b), z(c) {}
};

#define BB_CU_VEC(T, NAME, A2, A4)                                                              \
  struct NAME##1 {                                                                              \
    T x;                                                                                        \
  };                                                                                            \
  struct __attribute__((aligned(A2))) NAME##2 {                                                 \
    T x, y;                                                                                     \
  };                                                                                            \
  struct NAME##3 {                                                                              \
    T x, y, z;                                                                                  \
  };                                                                                            \
  struct __attribute__((aligned(A4))) NAME##4 {                                                 \
    T x, y, z, w;                                                                               \
  };                                                                                            \
  inline NAME##1 make_##NAME##1(T a) { return NAME##1{a}; }                                     \
  inline NAME##2 make_##NAME##2(T a, T b) { return NAME##2{a, b}; }                             \
  inline NAME##3 make_##NAME##3(T a, T b, T c) { return NAME##3{a, b, c}; }                     \
  inline NAME##4 make_##NAME##4(T a, T b, T c, T d) { return NAME##4{a, b, c, d}; }
BB_CU_VEC(char, char, 2, 4)
BB_CU_VEC(unsigned char, uchar, 2, 4)
BB_CU_VEC(short, short, 4, 8)
BB_CU_VEC(unsigned short, ushort, 4, 8)
BB_CU_VEC(int, int, 8, 16)
BB_CU_VEC(unsigned int, uint, 8, 16)
BB_CU_VEC(long long, longlong, 16, 16)
BB_CU_VEC(unsigned long long, ulonglong, 16, 16)
BB_CU_VEC(float, float, 8, 16)
BB_CU_VEC(double, double, 16, 16)
#undef BB_CU_VEC

// ---- 16-bit floats -----------------------------------------------------------------------

typedef bbemu::f16 __half;
typedef bbemu::bf16 __nv_bfloat16;
typedef __half half;
typedef __nv_bfloat16 nv_bfloat16;
struct __half_raw {
  unsigned short x;
};
struct __nv_bfloat16_raw {
  unsigned short x;
};
struct __attribute__((aligned(4))) __half2 {
  __half x, y;
};
struct __attribute__((aligned(4))) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
typedef __half2 half2;
typedef __nv_bfloat162 nv_bfloat162;

#define BB_CU_16(H, H2, NAME, NAME2)                                                            \
  inline H __float2##NAME(float f) { return H(f); }                                             \
  inline H __float2##NAME##_rn(float f) { return H(f); }                                        \
  inline H __float2##NAME##_rz(float f) { return H(f); }                                        \
  inline float __##NAME##2float(H h) { return static_cast<float>(h); }                          \
  inline H2 __floats2##NAME2##_rn(float a, float b) { return H2{H(a), H(b)}; }                  \
  inline H2 __float22##NAME2##_rn(float2 v) { return H2{H(v.x), H(v.y)}; }                      \
  inline H2 __float2##NAME2##_rn(float a) { return H2{H(a), H(a)}; }                            \
  inline float2 __##NAME2##2float2(H2 v) { return float2{float(v.x), float(v.y)}; }             \
  inline float __low2float(H2 v) { return static_cast<float>(v.x); }                            \
  inline float __high2float(H2 v) { return static_cast<float>(v.y); }                           \
  inline H __low2##NAME(H2 v) { return v.x; }                                                   \
  inline H __high2##NAME(H2 v) { return v.y; }                                                  \
  inline H2 __halves2##NAME2(H a, H b) { return H2{a, b}; }                                     \
  inline H2 __##NAME##2##NAME2(H a) { return H2{a, a}; }                                        \
  inline H2 __lows2##NAME2(H2 a, H2 b) { return H2{a.x, b.x}; }                                 \
  inline H2 __highs2##NAME2(H2 a, H2 b) { return H2{a.y, b.y}; }                                \
  inline H __hadd(H a, H b) { return a + b; }                                                   \
  inline H __hsub(H a, H b) { return a - b; }                                                   \
  inline H __hmul(H a, H b) { return a * b; }                                                   \
  inline H __hdiv(H a, H b) { return a / b; }                                                   \
  inline H __hfma(H a, H b, H c) { return H(std::fma(float(a), float(b), float(c))); }          \
  inline H __hneg(H a) { return -a; }                                                           \
  inline H __habs(H a) { return float(a) < 0.0f ? -a : a; }                                     \
  inline H __hmax(H a, H b) { return H(std::fmax(float(a), float(b))); }                        \
  inline H __hmin(H a, H b) { return H(std::fmin(float(a), float(b))); }                        \
  inline bool __heq(H a, H b) { return a == b; }                                                \
  inline bool __hne(H a, H b) { return a != b; }                                                \
  inline bool __hlt(H a, H b) { return a < b; }                                                 \
  inline bool __hle(H a, H b) { return a <= b; }                                                \
  inline bool __hgt(H a, H b) { return a > b; }                                                 \
  inline bool __hge(H a, H b) { return a >= b; }                                                \
  inline bool __hisnan(H a) { return std::isnan(float(a)); }                                    \
  inline int __hisinf(H a) { return std::isinf(float(a)) ? (float(a) < 0 ? -1 : 1) : 0; }       \
  inline H2 __hadd2(H2 a, H2 b) { return H2{a.x + b.x, a.y + b.y}; }                            \
  inline H2 __hsub2(H2 a, H2 b) { return H2{a.x - b.x, a.y - b.y}; }                            \
  inline H2 __hmul2(H2 a, H2 b) { return H2{a.x * b.x, a.y * b.y}; }                            \
  inline H2 __hfma2(H2 a, H2 b, H2 c) { return H2{__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y)}; } \
  inline H2 __hmax2(H2 a, H2 b) { return H2{__hmax(a.x, b.x), __hmax(a.y, b.y)}; }              \
  inline H2 __hneg2(H2 a) { return H2{-a.x, -a.y}; }
BB_CU_16(__half, __half2, half, half2)
BB_CU_16(__nv_bfloat16, __nv_bfloat162, bfloat16, bfloat162)
#undef BB_CU_16

inline __half __ushort_as_half(unsigned short b) { return __half::from_bits(b); }
inline unsigned short __half_as_ushort(__half h) { return h.bits; }
inline __half __short_as_half(short b) { return __half::from_bits(static_cast<unsigned short>(b)); }
inline short __half_as_short(__half h) { return static_cast<short>(h.bits); }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short b) { return __nv_bfloat16::from_bits(b); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.bits; }
inline __half __int2half_rn(int i) { return __half(static_cast<float>(i)); }
inline int __half2int_rn(__half h) { return static_cast<int>(std::nearbyint(float(h))); }
inline __half hexp(__half h) { return __half(std::exp(float(h))); }
inline __half hexp2(__half h) { return __half(std::exp2(float(h))); }
inline __half hlog(__half h) { return __half(std::log(float(h))); }
inline __half hsqrt(__half h) { return __half(std::sqrt(float(h))); }
inline __half hrsqrt(__half h) { return __half(1.0f / std::sqrt(float(h))); }
inline __nv_bfloat16 hexp(__nv_bfloat16 h) { return __nv_bfloat16(std::exp(float(h))); }
inline __nv_bfloat16 hexp2(__nv_bfloat16 h) { return __nv_bfloat16(std::exp2(float(h))); }
inline __half2 make_half2(__half a, __half b) { return __half2{a, b}; }
inline __nv_bfloat162 make_bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat162{a, b}; }

// ---- math ---------------------------------------------------------------------------------

using std::isfinite;
using std::isinf;
using std::isnan;
using std::signbit;

#define CUDART_INF_F (__builtin_inff())
#define CUDART_NAN_F (__builtin_nanf(""))
#define CUDART_INF (__builtin_inf())
#define CUDART_NAN (__builtin_nan(""))
#define CUDART_PI_F 3.141592654f
#define CUDART_L2E_F 1.442695041f
#define CUDART_LN2_F 0.693147181f

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __exp10f(float x) { return std::pow(10.0f, x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __log10f(float x) { return std::log10(x); }
inline float __powf(float a, float b) { return std::pow(a, b); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __tanf(float x) { return std::tan(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __frsqrt_rn(float x) { return 1.0f / std::sqrt(x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline float exp10f(float x) { return std::pow(10.0f, x); }
inline int __float2int_rn(float x) { return static_cast<int>(std::nearbyint(x)); }
// four signed byte products added to c (int8 dot products, sm_61+)
inline int __dp4a(int a, int b, int c) {
  for (int i = 0; i < 4; ++i)
    c += static_cast<int>(static_cast<signed char>(a >> (8 * i))) * static_cast<int>(static_cast<signed char>(b >> (8 * i)));
  return c;
}
inline int __float2int_rz(float x) { return static_cast<int>(x); }
inline int __float2int_rd(float x) { return static_cast<int>(std::floor(x)); }
inline int __float2int_ru(float x) { return static_cast<int>(std::ceil(x)); }
inline unsigned __float2uint_rn(float x) { return static_cast<unsigned>(std::nearbyint(x)); }
inline float __int2float_rn(int x) { return static_cast<float>(x); }
inline float __uint2float_rn(unsigned x) { return static_cast<float>(x); }
inline float __int_as_float(int x) { return __builtin_bit_cast(float, x); }
inline int __float_as_int(float x) { return __builtin_bit_cast(int, x); }
inline float __uint_as_float(unsigned x) { return __builtin_bit_cast(float, x); }
inline unsigned __float_as_uint(float x) { return __builtin_bit_cast(unsigned, x); }
inline double __longlong_as_double(long long x) { return __builtin_bit_cast(double, x); }
inline long long __double_as_longlong(double x) { return __builtin_bit_cast(long long, x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) {
    r |= ((x >> i) & 1u) << (31 - i);
  }
  return r;
}
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t v = (static_cast<uint64_t>(y) << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) {
    const unsigned sel = (s >> (4 * i)) & 7u;
    r |= static_cast<unsigned>((v >> (8 * sel)) & 0xffu) << (8 * i);
  }
  return r;
}
inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned sh) {
  const uint64_t v = (static_cast<uint64_t>(hi) << 32) | lo;
  return static_cast<unsigned>((v << (sh & 31u)) >> 32);
}
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned sh) {
  const uint64_t v = (static_cast<uint64_t>(hi) << 32) | lo;
  return static_cast<unsigned>(v >> (sh & 31u));
}
inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<uint64_t>(a) * b) >> 32);
}
inline int __mulhi(int a, int b) { return static_cast<int>((static_cast<int64_t>(a) * b) >> 32); }
inline int __mul24(int a, int b) { return a * b; }
inline unsigned __umul24(unsigned a, unsigned b) { return a * b; }

// CUDA's global min/max overloads (int, unsigned, float, ... and mixed).
template <class A, class B,
          std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value, int> = 0>
constexpr std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point<C>::value) {
    return std::fmin(static_cast<C>(a), static_cast<C>(b));
  } else {
    return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(a) : static_cast<C>(b);
  }
}
template <class A, class B,
          std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value, int> = 0>
constexpr std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point<C>::value) {
    return std::fmax(static_cast<C>(a), static_cast<C>(b));
  } else {
    return static_cast<C>(a) > static_cast<C>(b) ? static_cast<C>(a) : static_cast<C>(b);
  }
}

// ---- built-in variables ------------------------------------------------------------------

namespace bbemu {
inline uint3 cu_thread_idx() { return uint3{cur().tid.x, cur().tid.y, cur().tid.z}; }
inline uint3 cu_block_idx() { return uint3{g_bid.x, g_bid.y, g_bid.z}; }
inline dim3 cu_block_dim() { return dim3(g_bdim.x, g_bdim.y, g_bdim.z); }
inline dim3 cu_grid_dim() { return dim3(g_nblocks.x, g_nblocks.y, g_nblocks.z); }
} // namespace bbemu
#define threadIdx (::bbemu::cu_thread_idx())
#define blockIdx (::bbemu::cu_block_idx())
#define blockDim (::bbemu::cu_block_dim())
#define gridDim (::bbemu::cu_grid_dim())
constexpr int warpSize = 32;

// ---- barriers, warp functions ------------------------------------------------------------

inline void __syncthreads(::bbemu::Loc line_ = ::bbemu::Loc()) { bbemu::block_barrier("__syncthreads", line_); }
inline int __syncthreads_count(int p, ::bbemu::Loc line_ = ::bbemu::Loc()) {
  return bbemu::block_count(p != 0, "__syncthreads_count", line_);
}
inline int __syncthreads_or(int p, ::bbemu::Loc line_ = ::bbemu::Loc()) {
  return __syncthreads_count(p, line_) > 0;
}
inline int __syncthreads_and(int p, ::bbemu::Loc line_ = ::bbemu::Loc()) {
  return bbemu::block_count(p == 0, "__syncthreads_and", line_) == 0;
}
inline void __threadfence() {}
inline void __threadfence_block() {}
inline void __threadfence_system() {}
inline void __nanosleep(unsigned) { bbemu::yield(); }
inline long long clock64() { return 0; }
inline void __trap() { bbemu::fail("__trap() called"); }
inline void __brkpt() { bbemu::fail("__brkpt() called"); }

namespace bbemu {
enum { kCuShfl = 20, kCuVote, kCuSync, kCuReduce };

// mode: 0 idx, 1 xor, 2 down, 3 up (PTX shfl.sync semantics with segments of `width`).
template <class T>
inline T cu_shfl(unsigned mask, T v, int mode, int arg, int width, const char* what, int line) {
  static_assert(sizeof(T) <= kSlotBytes, "shuffle value too large");
  if (width <= 0 || width > 32 || (width & (width - 1))) {
    fail("%s: width %d is not a power of two <= 32", what, width);
  }
  const unsigned char* row = warp_collective(mask, &v, sizeof(T), kCuShfl, what, line);
  const int lane = static_cast<int>(cur().lane);
  const int lo = lane & ~(width - 1);
  const int hi = lo | (width - 1);
  int src = lane;
  switch (mode) {
    case 0:
      src = lo | (arg & (width - 1));
      break;
    case 1:
      src = lane ^ arg;
      if (src > hi) {
        src = lane;
      }
      break;
    case 2:
      src = lane + arg;
      if (src > hi) {
        src = lane;
      }
      break;
    default:
      src = lane - arg;
      if (src < lo) {
        src = lane;
      }
      break;
  }
  return lane_value(row, src, v);
}

inline unsigned cu_vote(unsigned mask, int p, const char* what, int line) {
  const int v = p != 0;
  const unsigned char* row = warp_collective(mask, &v, sizeof(v), kCuVote, what, line);
  unsigned bits = 0;
  for (int l = 0; l < kWarp; ++l) {
    if (coll_mask() & (1u << l)) {
      int x;
      memcpy(&x, row + l * kSlotBytes, sizeof(x));
      if (x) {
        bits |= 1u << l;
      }
    }
  }
  return bits;
}

template <class T, class F>
inline T cu_reduce(unsigned mask, T v, const char* what, int line, F op) {
  const unsigned char* row = warp_collective(mask, &v, sizeof(T), kCuReduce, what, line);
  bool first = true;
  T acc{};
  for (int l = 0; l < kWarp; ++l) {
    if (coll_mask() & (1u << l)) {
      T x;
      memcpy(static_cast<void*>(&x), row + l * kSlotBytes, sizeof(T));
      acc = first ? x : op(acc, x);
      first = false;
    }
  }
  return acc;
}
} // namespace bbemu

template <class T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32, ::bbemu::Loc line_ = ::bbemu::Loc()) {
  return bbemu::cu_shfl(mask, v, 0, src, width, "__shfl_sync", line_);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int m, int width = 32, ::bbemu::Loc line_ = ::bbemu::Loc()) {
  return bbemu::cu_shfl(mask, v, 1, m, width, "__shfl_xor_sync", line_);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned d, int width = 32, ::bbemu::Loc line_ = ::bbemu::Loc()) {
  return bbemu::cu_shfl(mask, v, 2, static_cast<int>(d), width, "__shfl_down_sync", line_);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned d, int width = 32, ::bbemu::Loc line_ = ::bbemu::Loc()) {
  return bbemu::cu_shfl(mask, v, 3, static_cast<int>(d), width, "__shfl_up_sync", line_);
}
inline unsigned __ballot_sync(unsigned mask, int p, ::bbemu::Loc line_ = ::bbemu::Loc()) {
  return bbemu::cu_vote(mask, p, "__ballot_sync", line_);
}
inline int __any_sync(unsigned mask, int p, ::bbemu::Loc line_ = ::bbemu::Loc()) {
  return bbemu::cu_vote(mask, p, "__any_sync", line_) != 0;
}
inline int __all_sync(unsigned mask, int p, ::bbemu::Loc line_ = ::bbemu::Loc()) {
  return bbemu::cu_vote(mask, p, "__all_sync", line_) == mask;
}
inline int __uni_sync(unsigned mask, int p, ::bbemu::Loc line_ = ::bbemu::Loc()) {
  const unsigned b = bbemu::cu_vote(mask, p, "__uni_sync", line_);
  return b == 0 || b == mask;
}
inline unsigned __activemask() { return bbemu::g_warps[bbemu::cur().warp].live; }
inline void __syncwarp(unsigned mask = 0xffffffffu, ::bbemu::Loc line_ = ::bbemu::Loc()) {
  const char z = 0;
  bbemu::warp_collective(mask, &z, 1, bbemu::kCuSync, "__syncwarp", line_);
}
inline unsigned __lanemask_lt() { return (1u << bbemu::cur().lane) - 1u; }
inline unsigned __lanemask_le() { return (2u << bbemu::cur().lane) - 1u; }
#define BB_CU_RED(NAME, T, EXPR)                                                                \
  inline T NAME(unsigned mask, T v, ::bbemu::Loc line_ = ::bbemu::Loc()) {                             \
    return bbemu::cu_reduce(mask, v, #NAME, line_, [](T a, T b) { return EXPR; });              \
  }
BB_CU_RED(__reduce_add_sync, unsigned, a + b)
BB_CU_RED(__reduce_add_sync, int, a + b)
BB_CU_RED(__reduce_min_sync, unsigned, a < b ? a : b)
BB_CU_RED(__reduce_min_sync, int, a < b ? a : b)
BB_CU_RED(__reduce_max_sync, unsigned, a > b ? a : b)
BB_CU_RED(__reduce_max_sync, int, a > b ? a : b)
BB_CU_RED(__reduce_and_sync, unsigned, a & b)
BB_CU_RED(__reduce_or_sync, unsigned, a | b)
BB_CU_RED(__reduce_xor_sync, unsigned, a ^ b)
#undef BB_CU_RED

// ---- atomics (blocks run one at a time: a read-modify-write is atomic) ---------------------

#define BB_CU_ATOMIC(NAME, EXPR)                                                                \
  template <class T, class U>                                                                   \
  inline T NAME(T* p, U arg) {                                                                  \
    bbemu::yield();                                                                             \
    const T old = *p;                                                                           \
    const T a = static_cast<T>(arg);                                                            \
    *p = static_cast<T>(EXPR);                                                                  \
    return old;                                                                                 \
  }                                                                                             \
  template <class T, class U>                                                                   \
  inline T NAME##_block(T* p, U arg) {                                                          \
    return NAME(p, arg);                                                                        \
  }                                                                                             \
  template <class T, class U>                                                                   \
  inline T NAME##_system(T* p, U arg) {                                                         \
    return NAME(p, arg);                                                                        \
  }
BB_CU_ATOMIC(atomicAdd, old + a)
BB_CU_ATOMIC(atomicSub, old - a)
BB_CU_ATOMIC(atomicExch, a)
BB_CU_ATOMIC(atomicMin, old < a ? old : a)
BB_CU_ATOMIC(atomicMax, old > a ? old : a)
BB_CU_ATOMIC(atomicAnd, old & a)
BB_CU_ATOMIC(atomicOr, old | a)
BB_CU_ATOMIC(atomicXor, old ^ a)
BB_CU_ATOMIC(atomicInc, old >= a ? 0 : old + 1)
BB_CU_ATOMIC(atomicDec, (old == 0 || old > a) ? a : old - 1)
#undef BB_CU_ATOMIC
template <class T, class U, class V>
inline T atomicCAS(T* p, U compare, V val) {
  bbemu::yield();
  const T old = *p;
  if (old == static_cast<T>(compare)) {
    *p = static_cast<T>(val);
  }
  return old;
}

// ---- loads and stores with cache hints -----------------------------------------------------

template <class T>
inline T __ldg(const T* p) { return *p; }
template <class T>
inline T __ldcg(const T* p) { return *p; }
template <class T>
inline T __ldca(const T* p) { return *p; }
template <class T>
inline T __ldcs(const T* p) { return *p; }
template <class T>
inline T __ldlu(const T* p) { return *p; }
template <class T>
inline T __ldcv(const T* p) { return *p; }
template <class T>
inline void __stcg(T* p, T v) { *p = v; }
template <class T>
inline void __stcs(T* p, T v) { *p = v; }
template <class T>
inline void __stwb(T* p, T v) { *p = v; }
template <class T>
inline void __stwt(T* p, T v) { *p = v; }
inline size_t __cvta_generic_to_shared(const void* p) { return reinterpret_cast<size_t>(p); }
inline size_t __cvta_generic_to_global(const void* p) { return reinterpret_cast<size_t>(p); }

// ---- cooperative groups --------------------------------------------------------------------

namespace cooperative_groups {
struct thread_block {
  void sync(::bbemu::Loc line_ = ::bbemu::Loc()) const { bbemu::block_barrier("thread_block::sync", line_); }
  unsigned thread_rank() const { return bbemu::cur().lin; }
  unsigned size() const { return bbemu::g_bdim.x * bbemu::g_bdim.y * bbemu::g_bdim.z; }
  unsigned num_threads() const { return size(); }
  dim3 group_index() const { return dim3(bbemu::g_bid.x, bbemu::g_bid.y, bbemu::g_bid.z); }
  dim3 thread_index() const {
    return dim3(bbemu::cur().tid.x, bbemu::cur().tid.y, bbemu::cur().tid.z);
  }
  dim3 group_dim() const { return dim3(bbemu::g_bdim.x, bbemu::g_bdim.y, bbemu::g_bdim.z); }
  dim3 dim_threads() const { return group_dim(); }
};
inline thread_block this_thread_block() { return thread_block{}; }
inline void sync(const thread_block& b, ::bbemu::Loc line_ = ::bbemu::Loc()) { b.sync(line_); }

template <unsigned N>
struct thread_block_tile {
  static_assert(N >= 1 && N <= 32 && (N & (N - 1)) == 0, "tile size must be a power of 2 <= 32");
  static unsigned mask() {
    const unsigned lane = bbemu::cur().lane;
    const unsigned base = lane & ~(N - 1);
    return N == 32 ? 0xffffffffu : (((1u << N) - 1u) << base);
  }
  unsigned thread_rank() const { return bbemu::cur().lin % N; }
  unsigned meta_group_rank() const { return bbemu::cur().lin / N; }
  unsigned meta_group_size() const { return (bbemu::g_nthreads + N - 1) / N; }
  static constexpr unsigned size() { return N; }
  static constexpr unsigned num_threads() { return N; }
  void sync(::bbemu::Loc line_ = ::bbemu::Loc()) const { __syncwarp(mask(), line_); }
  template <class T>
  T shfl(T v, int src, ::bbemu::Loc line_ = ::bbemu::Loc()) const {
    return bbemu::cu_shfl(mask(), v, 0, src, N, "tile.shfl", line_);
  }
  template <class T>
  T shfl_xor(T v, int m, ::bbemu::Loc line_ = ::bbemu::Loc()) const {
    return bbemu::cu_shfl(mask(), v, 1, m, N, "tile.shfl_xor", line_);
  }
  template <class T>
  T shfl_down(T v, unsigned d, ::bbemu::Loc line_ = ::bbemu::Loc()) const {
    return bbemu::cu_shfl(mask(), v, 2, static_cast<int>(d), N, "tile.shfl_down", line_);
  }
  template <class T>
  T shfl_up(T v, unsigned d, ::bbemu::Loc line_ = ::bbemu::Loc()) const {
    return bbemu::cu_shfl(mask(), v, 3, static_cast<int>(d), N, "tile.shfl_up", line_);
  }
  unsigned ballot(int p, ::bbemu::Loc line_ = ::bbemu::Loc()) const {
    const unsigned base = bbemu::cur().lane & ~(N - 1);
    return bbemu::cu_vote(mask(), p, "tile.ballot", line_) >> base;
  }
  bool any(int p, ::bbemu::Loc line_ = ::bbemu::Loc()) const { return ballot(p, line_) != 0; }
  bool all(int p, ::bbemu::Loc line_ = ::bbemu::Loc()) const {
    return ballot(p, line_) == (N == 32 ? 0xffffffffu : ((1u << N) - 1u));
  }
};
template <unsigned N, class Parent>
inline thread_block_tile<N> tiled_partition(const Parent&) {
  return thread_block_tile<N>{};
}

template <class T>
struct plus {
  T operator()(T a, T b) const { return a + b; }
};
template <class T>
struct less {
  T operator()(T a, T b) const { return a < b ? a : b; }
};
template <class T>
struct greater {
  T operator()(T a, T b) const { return a > b ? a : b; }
};
template <class T>
struct bit_and {
  T operator()(T a, T b) const { return a & b; }
};
template <class T>
struct bit_or {
  T operator()(T a, T b) const { return a | b; }
};
template <class T>
struct bit_xor {
  T operator()(T a, T b) const { return a ^ b; }
};

template <unsigned N, class T, class Op>
inline T reduce(const thread_block_tile<N>& g, T v, Op op, ::bbemu::Loc line_ = ::bbemu::Loc()) {
  return bbemu::cu_reduce(g.mask(), v, "cg::reduce", line_, op);
}
} // namespace cooperative_groups

// ---- the parts of MLX's utils.cuh a custom kernel may use ----------------------------------

namespace mlx::core::cu {
using Shape = std::array<int32_t, MAX_NDIM>;
using Strides = std::array<int64_t, MAX_NDIM>;

template <typename T, int N>
struct alignas(sizeof(T) * N) AlignedVector {
  T val[N];
  T& operator[](int i) { return val[i]; }
  T operator[](int i) const { return val[i]; }
};

template <typename IdxT = int64_t>
inline IdxT elem_to_loc(IdxT elem, const int* shape, const int64_t* strides, int ndim) {
  IdxT loc = 0;
  for (int i = ndim - 1; i >= 0 && elem > 0; --i) {
    loc += (elem % shape[i]) * IdxT(strides[i]);
    elem /= shape[i];
  }
  return loc;
}
} // namespace mlx::core::cu
