"""4/8-bit affine quantized matmul for decode (M = 1..64 rows of x) on MLX's CUDA back-end.

MLX 0.32.4's own CUDA quantized matmuls run at ~18% of the weight-read floor for decode
(issue 7). This kernel reads every weight byte once for all M rows, 16 bytes per load,
dequantizes in registers and multiplies on tensor cores (mma.sync m16n8k16, fp32
accumulate): the weights are the mma's A operand (16 output features), x is B (8 tokens),
so M = 1 wastes tensor-core work, which is free here, and no extra code path is needed.

Layout is MLX's affine format with transpose=True semantics, exactly what `mx.quantize`
returns: w uint32 [N, K*bits/32] (element k of a word sits at bits k*bits, lowest first),
scales/biases [N, K/group_size] in the activation dtype; y = x @ dequantize(w).T.

Work split: a tile is 16*WN output features; a block takes one of S slices of K and walks
tiles blockIdx.x, + gridDim.x, ... (persistent: x is staged, and normalized, once per block,
and the next tile's first weights load while the current one is reduced). Its WN*WK warps
take 16 features each and a contiguous run of 128-k (4-bit) or 64-k (8-bit) chunks. A lane
loads 16 contiguous bytes of two feature rows per chunk, which fall inside one quantization
group, so it needs one scale and one bias per row. The k order inside an mma is free, so
the lane's nibbles map to mma k-slots such that its x operand is 16 bytes of x staged in
shared memory (swizzled: conflict-free 16-byte reads; for the fp16 "lop3" dequantization the
8 halves of a granule are reordered to the {k, k+4} pairs it produces). Where a layer's scales
come packed and all lie below 2 (BB_QMM_DQ=sub, the default), lop3's codes are read as fp16
subnormals instead: two instructions a pair of weights, bias included (qmm_dq4_sub). Warps reduce through
shared memory; with S > 1 slices the block writes fp32 partials and a small second kernel
sums them, adds the bias and the residual, and casts.

Weights reach registers one of two ways: two register stages of P chunks (the default), or a
ring of `QmmConfig.ns` one-chunk slots per warp in shared memory filled by cp.async (wide
matrices at M = 9-32 and, with the weights repacked, narrow ones at M = 17-32: where the H200
measured it faster); on the ring a warp may also take two
16-row feature tiles (`QmmConfig.wf`), so each x fragment feeds both.

Everything else (CPU, Metal, shapes or dtypes not covered) goes to `mx.quantized_matmul`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import functools
import os
import sys
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn

from batchbench import ON_OFF, backend, env_choice, env_number
from batchbench.kernels import qmv8
from batchbench.kernels import spec as kspec
from batchbench.kernels.rope import ROPE_HEADER, angle_template, inverse_order, pair_layout, rope_pair_order  # noqa: F401 (rope_pair_order: re-export)
from batchbench.kernels.spec import KernelSpec, Launch

MAX_M = 64
SMEM_BUDGET = 96 * 1024  # x slice per block: two blocks of 256 threads fit one SM
SMEM_STEP = 8 * 1024
MIN_WARPS = 256  # below this many warps, split K across blocks for more loads in flight
_BITS = (4, 8)
_GROUPS = (32, 64, 128)
_DTYPES = (mx.float16, mx.bfloat16)

QMM_HEADER = r"""
// ---------------------------------------------------------------------------------------
// batchbench qmm: affine 4/8-bit quantized matmul, y[M,N] = x[M,K] @ dequant(w)[N,K]^T.
// Chip-specific instructions live in the qmm_* helpers below; -DBB_PORTABLE selects plain
// CUDA versions of them (used by the CPU emulator of the verification harness).
// ---------------------------------------------------------------------------------------
#ifndef BB_QMM_HEADER
#define BB_QMM_HEADER
#ifndef BB_QMM_X_ASYNC
#define BB_QMM_X_ASYNC 1
#endif

namespace bbqmm {

template <typename T> struct is_bf16 { static constexpr bool value = false; };
template <> struct is_bf16<__nv_bfloat16> { static constexpr bool value = true; };

// 16 bytes of weights that are read exactly once: keep them out of L1, and let L2 fetch
// whole 256-byte runs (a warp walks each feature row in contiguous 64-byte steps).
__device__ __forceinline__ uint4 qmm_ld_stream(const uint32_t* p) {
#ifdef BB_PORTABLE
  return *reinterpret_cast<const uint4*>(p);
#else
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
#endif
}

// Asynchronous copies into shared memory (the ring pipeline, NS > 0): 16 bytes of weights
// (L1 bypassed, L2 fetching 256-byte runs as qmm_ld_stream), or SB = 4 / 8 bytes of scales.
template <int SB>
__device__ __forceinline__ void qmm_cp_async(void* dst, const void* src) {
#if defined(BB_EMU)
  bbemu::async_copy(dst, src, SB);  // held back until the wait that retires its group
#elif defined(BB_PORTABLE)
  const uint32_t* s = reinterpret_cast<const uint32_t*>(src);
  uint32_t* d = reinterpret_cast<uint32_t*>(dst);
  for (int i = 0; i < SB / 4; ++i) d[i] = s[i];
#else
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  if constexpr (SB == 16) {
    asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16;" ::"r"(a), "l"(src) : "memory");
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;" ::"r"(a), "l"(src), "n"(SB) : "memory");
  }
#endif
}

__device__ __forceinline__ void qmm_cp_commit() {
#if defined(BB_EMU)
  bbemu::async_commit();
#elif !defined(BB_PORTABLE)
  asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}

template <int N>
__device__ __forceinline__ void qmm_cp_wait() {
#if defined(BB_EMU)
  bbemu::async_wait(N);
#elif !defined(BB_PORTABLE)
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}

// Byte permute (PRMT): result byte i = byte sel[4i..4i+3] of the 8-byte value {b, a}.
__device__ __forceinline__ uint32_t qmm_prmt(uint32_t a, uint32_t b, uint32_t sel) {
#ifdef BB_PORTABLE
  unsigned long long ab = ((unsigned long long)b << 32) | a;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) {
    uint32_t byte = (uint32_t)(ab >> (8 * ((sel >> (4 * i)) & 7))) & 0xFFu;
    r |= byte << (8 * i);
  }
  return r;
#else
  return __byte_perm(a, b, sel);
#endif
}

// (a & b) | c as one LOP3. Written in C with two constants it compiles to two LOP3s (each
// takes one immediate); here ptxas keeps the constants in registers across the loop.
__device__ __forceinline__ uint32_t qmm_and_or(uint32_t a, uint32_t b, uint32_t c) {
#ifdef BB_PORTABLE
  return (a & b) | c;
#else
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
#endif
}

// A 16-bit value (zero-extended) in both halves of a word.
__device__ __forceinline__ uint32_t qmm_dup16(uint32_t v) { return qmm_prmt(v, v, 0x1010u); }
__device__ __forceinline__ uint32_t qmm_hi16(uint32_t v) { return qmm_prmt(v, v, 0x3232u); }

__device__ __forceinline__ float qmm_u2f(uint32_t u) {
#ifdef BB_PORTABLE
  union { uint32_t u; float f; } c;  // NVRTC has no __builtin_memcpy
  c.u = u;
  return c.f;
#else
  return __uint_as_float(u);
#endif
}

__device__ __forceinline__ float2 qmm_to_float2(uint32_t v, bool bf16) {
  float lo, hi;
  if (bf16) {
    lo = qmm_u2f(v << 16);
    hi = qmm_u2f(v & 0xFFFF0000u);
  } else {
    __half2 h = *reinterpret_cast<__half2*>(&v);
    float2 f = __half22float2(h);
    lo = f.x;
    hi = f.y;
  }
  return make_float2(lo, hi);
}

// c[16x8] += a[16x16] * b[16x8]; fragments as in PTX mma.m16n8k16 (a row-major, b col-major):
// a = {row g k 2t..2t+1, row g+8 k 2t.., row g k 2t+8.., row g+8 k 2t+8..}, b = {k 2t.., k 2t+8..}
// of column g, c = {(g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)} with g = lane/4, t = lane%4.
template <bool BF16>
__device__ __forceinline__ void qmm_mma(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                        uint32_t a3, uint32_t b0, uint32_t b1) {
#ifdef BB_PORTABLE
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  float d[4] = {c[0], c[1], c[2], c[3]};
  for (int q = 0; q < 4; ++q) {
    const int sa = g * 4 + q, sb0 = (2 * t) * 4 + q, sb1 = (2 * t + 1) * 4 + q;
    float2 ag = qmm_to_float2(__shfl_sync(0xffffffffu, a0, sa), BF16);
    float2 ag8 = qmm_to_float2(__shfl_sync(0xffffffffu, a1, sa), BF16);
    float2 agh = qmm_to_float2(__shfl_sync(0xffffffffu, a2, sa), BF16);
    float2 ag8h = qmm_to_float2(__shfl_sync(0xffffffffu, a3, sa), BF16);
    float2 b0l = qmm_to_float2(__shfl_sync(0xffffffffu, b0, sb0), BF16);
    float2 b0h = qmm_to_float2(__shfl_sync(0xffffffffu, b1, sb0), BF16);
    float2 b1l = qmm_to_float2(__shfl_sync(0xffffffffu, b0, sb1), BF16);
    float2 b1h = qmm_to_float2(__shfl_sync(0xffffffffu, b1, sb1), BF16);
    d[0] += ag.x * b0l.x + ag.y * b0l.y + agh.x * b0h.x + agh.y * b0h.y;
    d[1] += ag.x * b1l.x + ag.y * b1l.y + agh.x * b1h.x + agh.y * b1h.y;
    d[2] += ag8.x * b0l.x + ag8.y * b0l.y + ag8h.x * b0h.x + ag8h.y * b0h.y;
    d[3] += ag8.x * b1l.x + ag8.y * b1l.y + ag8h.x * b1h.x + ag8h.y * b1h.y;
  }
  c[0] = d[0]; c[1] = d[1]; c[2] = d[2]; c[3] = d[3];
#else
  if constexpr (BF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
#endif
}

// Two codes already placed as {code | magic} in each 16-bit half -> scale * code + bias.
// The magic makes the half read 1024 + code (fp16) or 128 + code (bf16) exactly.
template <bool BF16>
__device__ __forceinline__ uint32_t qmm_dq_magic(uint32_t v, uint32_t s2, uint32_t b2) {
#ifdef BB_PORTABLE
  const float2 h = qmm_to_float2(v, BF16);
  const float magic = BF16 ? 128.0f : 1024.0f;
  const float s = qmm_to_float2(s2, BF16).x, b = qmm_to_float2(b2, BF16).x;
  const float lo = fmaf(h.x - magic, s, b), hi = fmaf(h.y - magic, s, b);
  if constexpr (BF16) {
    __nv_bfloat162 r = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&r);
  } else {
    __half2 r = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&r);
  }
#else
  if constexpr (BF16) {
    __nv_bfloat162 h = *reinterpret_cast<__nv_bfloat162*>(&v);
    const uint32_t m = 0x43004300u;
    h = __hsub2(h, *reinterpret_cast<const __nv_bfloat162*>(&m));
    h = __hfma2(h, *reinterpret_cast<__nv_bfloat162*>(&s2), *reinterpret_cast<__nv_bfloat162*>(&b2));
    return *reinterpret_cast<uint32_t*>(&h);
  } else {
    __half2 h = *reinterpret_cast<__half2*>(&v);
    const uint32_t m = 0x64006400u;
    h = __hsub2(h, *reinterpret_cast<const __half2*>(&m));
    h = __hfma2(h, *reinterpret_cast<__half2*>(&s2), *reinterpret_cast<__half2*>(&b2));
    return *reinterpret_cast<uint32_t*>(&h);
  }
#endif
}

// 4-bit word u holds k = 0..7 (k at bits 4k). Returns the pair {k = 2p, 2p + 1}.
template <bool BF16>
__device__ __forceinline__ uint32_t qmm_pair4(uint32_t u, uint32_t u_shr4, int p, uint32_t s2,
                                              uint32_t b2) {
  const uint32_t sel = (uint32_t)p | ((uint32_t)p << 4) | ((uint32_t)(4 + p) << 8) |
                       ((uint32_t)(4 + p) << 12);
  const uint32_t magic = BF16 ? 0x43004300u : 0x64006400u;
  const uint32_t v = qmm_and_or(qmm_prmt(u, u_shr4, sel), 0x000F000Fu, magic);
  return qmm_dq_magic<BF16>(v, s2, b2);
}

// fp16 4-bit, fewer instructions (the "lop3" dequantization): word u holds k = 0..7 (k at
// bits 4k). One AND-OR each extracts the pairs {k, k + 4}: bits 0-3 and 16-19 give 1024 + code,
// bits 4-7 and 20-23 give 1024 + 16 * code, which is scaled by s/16 (s16). Pairs out:
// A[0] = {0, 4}, A[1] = {1, 5}, A[2] = {2, 6}, A[3] = {3, 7}; x is staged to match (qmm_perm8).
__device__ __forceinline__ void qmm_dq4_lop3(uint32_t u, uint32_t s2, uint32_t s16, uint32_t b2,
                                             uint32_t (&A)[4]) {
  const uint32_t magic = 0x64006400u;
  const uint32_t u8 = u >> 8;
  A[0] = qmm_dq_magic<false>(qmm_and_or(u, 0x000F000Fu, magic), s2, b2);
  A[1] = qmm_dq_magic<false>(qmm_and_or(u, 0x00F000F0u, magic), s16, b2);
  A[2] = qmm_dq_magic<false>(qmm_and_or(u8, 0x000F000Fu, magic), s2, b2);
  A[3] = qmm_dq_magic<false>(qmm_and_or(u8, 0x00F000F0u, magic), s16, b2);
}

// s/16 in both halves of an fp16 pair (exact for normal s).
__device__ __forceinline__ uint32_t qmm_scale16(uint32_t s2) {
#ifdef BB_PORTABLE
  const float2 f = qmm_to_float2(s2, false);
  __half2 h = __floats2half2_rn(f.x * 0.0625f, f.y * 0.0625f);
#else
  const uint32_t k = 0x2C002C00u;  // 1/16 in both halves: a power of two, so the product is exact
  __half2 h = __hmul2(*reinterpret_cast<__half2*>(&s2), *reinterpret_cast<const __half2*>(&k));
#endif
  return *reinterpret_cast<uint32_t*>(&h);
}

// DQ = 2 ("lop3b", qmm_kernel's BSUM): the lop3 dequantization without the bias. One HFMA2
// makes s * code from 1024 + code with c2 = -1024 * s (exact: a power of two times s, for
// |s| < 64), rounded once from the exact product; the bias enters the sums as b times the sum
// of the x values the weights meet (fp32). Two instructions a pair of weights instead of three.
__device__ __forceinline__ uint32_t qmm_dq_magic_nb(uint32_t v, uint32_t s2, uint32_t c2) {
#ifdef BB_PORTABLE
  const float2 h = qmm_to_float2(v, false), s = qmm_to_float2(s2, false), c = qmm_to_float2(c2, false);
  __half2 r = __floats2half2_rn(fmaf(h.x, s.x, c.x), fmaf(h.y, s.y, c.y));  // h * s is exact in fp32
  return *reinterpret_cast<uint32_t*>(&r);
#else
  __half2 h = __hfma2(*reinterpret_cast<__half2*>(&v), *reinterpret_cast<__half2*>(&s2),
                      *reinterpret_cast<__half2*>(&c2));
  return *reinterpret_cast<uint32_t*>(&h);
#endif
}

// -1024 * s in both halves of an fp16 pair (exact for |s| < 64).
__device__ __forceinline__ uint32_t qmm_m1024(uint32_t s2) {
#ifdef BB_PORTABLE
  const float2 f = qmm_to_float2(s2, false);
  __half2 h = __floats2half2_rn(f.x * -1024.0f, f.y * -1024.0f);
#else
  const uint32_t k = 0xE400E400u;  // -1024 in both halves
  __half2 h = __hmul2(*reinterpret_cast<__half2*>(&s2), *reinterpret_cast<const __half2*>(&k));
#endif
  return *reinterpret_cast<uint32_t*>(&h);
}

__device__ __forceinline__ void qmm_dq4_lop3_nb(uint32_t u, uint32_t s2, uint32_t s16, uint32_t c2, uint32_t c16,
                                                uint32_t (&A)[4]) {
  const uint32_t magic = 0x64006400u;
  const uint32_t u8 = u >> 8;
  A[0] = qmm_dq_magic_nb(qmm_and_or(u, 0x000F000Fu, magic), s2, c2);
  A[1] = qmm_dq_magic_nb(qmm_and_or(u, 0x00F000F0u, magic), s16, c16);
  A[2] = qmm_dq_magic_nb(qmm_and_or(u8, 0x000F000Fu, magic), s2, c2);
  A[3] = qmm_dq_magic_nb(qmm_and_or(u8, 0x00F000F0u, magic), s16, c16);
}

// DQ = 3 ("sub"): the lop3 dequantization in two instructions a pair of weights, bias kept.
// Masked without the 1024 magic, a half's bits are a subnormal: bits 0-3 read code * 2^-24,
// bits 4-7 code * 2^-20. One HFMA2 with S = s * 2^15 (lo) or s * 2^11 (hi) and B = b * 2^-9
// makes (s * code + b) * 2^-9, rounded once from the exact product (powers of two scale
// exactly); the accumulators are multiplied by 2^9 after the products (qmm_kernel's SUB). S
// overflows fp16 for |s| >= 2, so callers take this only for layers whose scales are below
// that (`quantized_matmul`'s scale_max). Below 2^-14 the result is subnormal, with a fixed step
// of 2^-24: weights below 2^-5 in magnitude round to steps of 2^-15 (fp16's own step at 2^-5),
// larger ones as in fp16.
__device__ __forceinline__ uint32_t qmm_hfma2_sub(uint32_t v, uint32_t s2, uint32_t b2) {
#ifdef BB_PORTABLE
  const float2 h = qmm_to_float2(v, false), s = qmm_to_float2(s2, false), b = qmm_to_float2(b2, false);
  __half2 r = __floats2half2_rn(fmaf(h.x, s.x, b.x), fmaf(h.y, s.y, b.y));
  return *reinterpret_cast<uint32_t*>(&r);
#else
  uint32_t d;  // no .ftz: the operand and the result may be subnormal
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(v), "r"(s2), "r"(b2));
  return d;
#endif
}

// s2 * c (both halves; c a power of two given as its fp16 pair), no flush of subnormal s.
__device__ __forceinline__ uint32_t qmm_hmul2_pow2(uint32_t s2, uint32_t c2) {
#ifdef BB_PORTABLE
  const float2 f = qmm_to_float2(s2, false), c = qmm_to_float2(c2, false);
  __half2 h = __floats2half2_rn(f.x * c.x, f.y * c.y);
  return *reinterpret_cast<uint32_t*>(&h);
#else
  uint32_t d;
  asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(s2), "r"(c2));
  return d;
#endif
}

__device__ __forceinline__ void qmm_dq4_sub(uint32_t u, uint32_t slo, uint32_t shi, uint32_t b2, uint32_t (&A)[4]) {
  const uint32_t u8 = u >> 8;
  A[0] = qmm_hfma2_sub(u & 0x000F000Fu, slo, b2);
  A[1] = qmm_hfma2_sub(u & 0x00F000F0u, shi, b2);
  A[2] = qmm_hfma2_sub(u8 & 0x000F000Fu, slo, b2);
  A[3] = qmm_hfma2_sub(u8 & 0x00F000F0u, shi, b2);
}

// The sum of a granule's 8 fp16 values in fp32.
__device__ __forceinline__ float qmm_sum8(uint4 v) {
  const uint32_t u[4] = {v.x, v.y, v.z, v.w};
  float r = 0.f;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const float2 f = qmm_to_float2(u[q], false);
    r += f.x + f.y;
  }
  return r;
}

// A granule of 8 halves x0..x7 reordered as {x0, x4}, {x1, x5}, {x2, x6}, {x3, x7}.
__device__ __forceinline__ uint4 qmm_perm8(uint4 v) {
  return make_uint4(qmm_prmt(v.x, v.z, 0x5410u), qmm_prmt(v.x, v.z, 0x7632u),
                    qmm_prmt(v.y, v.w, 0x5410u), qmm_prmt(v.y, v.w, 0x7632u));
}

// 8-bit word u holds k = 0..3 (k at bits 8k). Returns the pair {k = 2p, 2p + 1}.
template <bool BF16>
__device__ __forceinline__ uint32_t qmm_pair8(uint32_t u, int p, uint32_t s2, uint32_t b2) {
  if constexpr (BF16) {
    // 128 + code does not fit bf16's 8-bit significand for codes >= 128: go through fp32.
    const float lo = qmm_u2f(0x4B000000u | ((u >> (16 * p)) & 0xFFu)) - 8388608.0f;
    const float hi = qmm_u2f(0x4B000000u | ((u >> (16 * p + 8)) & 0xFFu)) - 8388608.0f;
    const float s = qmm_u2f(s2 << 16), b = qmm_u2f(b2 << 16);
    __nv_bfloat162 h = __floats2bfloat162_rn(fmaf(lo, s, b), fmaf(hi, s, b));
    return *reinterpret_cast<uint32_t*>(&h);
  } else {
    const uint32_t sel = p == 0 ? 0x4140u : 0x4342u;
    return qmm_dq_magic<false>(qmm_prmt(u, 0x64646464u, sel), s2, b2);
  }
}

template <typename O, typename T>
__device__ __forceinline__ O qmm_cast(float v) {
  if constexpr (is_bf16<O>::value) {
    return __float2bfloat16(v);
  } else if constexpr (sizeof(O) == 2) {
    return __float2half(v);
  } else {
    return v;
  }
}

template <typename T>
__device__ __forceinline__ float qmm_float(T v) {
  if constexpr (sizeof(T) == 4) {  // fp32 partials (BB_QMM_PART16=0, bf16)
    return v;
  } else if constexpr (is_bf16<T>::value) {
    return __bfloat162float(v);
  } else {
    return __half2float(v);
  }
}

// Two floats rounded to the activation dtype, packed in one 32-bit word (low half first).
template <typename T>
__device__ __forceinline__ uint32_t qmm_pack2(float lo, float hi) {
  if constexpr (is_bf16<T>::value) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  } else {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
}

// SiLU(g) * u in fp32, one rounding: the down projection's input from the gate/up output.
template <typename T>
__device__ __forceinline__ uint4 qmm_glu8(uint4 g, uint4 u) {
  const uint32_t gw[4] = {g.x, g.y, g.z, g.w}, uw[4] = {u.x, u.y, u.z, u.w};
  uint32_t r[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 gf = qmm_to_float2(gw[i], is_bf16<T>::value);
    const float2 uf = qmm_to_float2(uw[i], is_bf16<T>::value);
    r[i] = qmm_pack2<T>(gf.x / (1.f + expf(-gf.x)) * uf.x, gf.y / (1.f + expf(-gf.y)) * uf.y);
  }
  return make_uint4(r[0], r[1], r[2], r[3]);
}

// Where x granule j of a row is staged: at 4 bits, granules 8t + 0..7 swap in pairs at odd t
// (conflict-free 16-byte reads by the mma lanes). An involution: also staged -> source.
template <int BITS>
__device__ __forceinline__ int qmm_swz(const int j) {
  return BITS == 4 ? (j ^ ((j >> 3) & 1)) : j;
}

// One granule of x normalized: x * rs * nw in fp32, one rounding (as mx.fast.rms_norm).
template <typename T>
__device__ __forceinline__ uint4 qmm_norm8(const uint4 v, const uint4 w, const float rs) {
  const uint32_t u[4] = {v.x, v.y, v.z, v.w}, ww[4] = {w.x, w.y, w.z, w.w};
  uint32_t r[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const float2 f = qmm_to_float2(u[q], is_bf16<T>::value);
    const float2 g = qmm_to_float2(ww[q], is_bf16<T>::value);
    r[q] = qmm_pack2<T>(f.x * rs * g.x, f.y * rs * g.y);
  }
  return make_uint4(r[0], r[1], r[2], r[3]);
}

// RMSNorm of the staged rows in place (the block holds whole rows: one K-slice):
// x * rsqrt(mean(x^2) + eps) * nw, in fp32 with one rounding, as mx.fast.rms_norm. The sums
// of squares were taken while staging (wss: one partial per warp and row, fixed order).
template <typename T, int BITS, int NT, bool PERM, bool EARLY, int NWR, int MP>
__device__ __forceinline__ void qmm_rms_norm(uint16_t* xs, const int XS, const T* __restrict__ nw,
                                             const uint4 (&nwr)[NWR], const float* wss,
                                             const float eps, const int M, const int K, const int tid) {
  const int gpr = K / 8;
  // Row m's scale is computed once, by lane m of every warp, and shuffled to the lanes that
  // scale the row (before: 8 shared loads and adds, a division and an rsqrt per granule and row).
  // A warp's lanes walk the same granules (K % 256 == 0): the shuffle sees the whole warp.
  auto row_scale = [&](const int m) {
    float ss = 0.f;
#pragma unroll
    for (int q = 0; q < NT / 32; ++q) ss += wss[q * MP + m];
    return rsqrtf(ss / (float)K + eps);
  };
  constexpr bool RS_LANE = MP <= 32;
  const int lane = tid & 31;
  const float rs_lane = RS_LANE && lane < M ? row_scale(lane) : 0.f;
  const uint4* nwg = reinterpret_cast<const uint4*>(nw);
  // Column by column: one load of the norm weights serves every row (a loop over all
  // granules waited an L2 round trip per granule: 14 a thread at M=8, K=3584). EARLY: the
  // first NWR granules of a thread were loaded before the x staging (qmm_nw_early).
  for (int pj = tid, i = 0; pj < gpr; pj += NT, ++i) {
    const int j = qmm_swz<BITS>(pj);  // the staged granule's source
    uint4 wv;
    if (EARLY && i < NWR) {
#pragma unroll
      for (int e = 0; e < NWR; ++e)  // static register indices
        if (e == i) wv = nwr[e];
    } else {
      wv = nwg[j];
    }
    if constexpr (PERM) wv = qmm_perm8(wv);  // the staged x granules are reordered
    auto scale_row = [&](const int m, const float rs) {
      uint4* p = reinterpret_cast<uint4*>(xs + m * XS + pj * 8);
      *p = qmm_norm8<T>(*p, wv, rs);
    };
    for (int m = 0; m < M; ++m) {
      if constexpr (RS_LANE) {
        scale_row(m, __shfl_sync(0xffffffffu, rs_lane, m));
      } else {
        scale_row(m, row_scale(m));
      }
    }
  }
  __syncthreads();
}

// The norm weights' granules qmm_rms_norm gives this thread (pj = tid + i * NT), loaded before
// the x staging (NEARLY) so that their L2 round trip overlaps it instead of following the
// barrier after it.
template <int BITS, int NT, int NWR>
__device__ __forceinline__ void qmm_nw_early(const uint4* nwg, uint4 (&nwr)[NWR], const int K, const int tid) {
#pragma unroll
  for (int i = 0; i < NWR; ++i) {
    const int pj = tid + i * NT;
    if (pj < K / 8) nwr[i] = nwg[qmm_swz<BITS>(pj)];
  }
}

// Sum of squares of one 16-byte granule of x, in fp32.
template <typename T>
__device__ __forceinline__ float qmm_sumsq8(uint4 v) {
  const uint32_t u[4] = {v.x, v.y, v.z, v.w};
  float ss = 0.f;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const float2 f = qmm_to_float2(u[q], is_bf16<T>::value);
    ss += f.x * f.x + f.y * f.y;
  }
  return ss;
}

// The fused RMSNorm's sums of squares from the staged rows (NPASS), instead of a warp
// reduction per granule inside the staging loop: each thread sums its columns for 8 rows at a
// time in registers, then one warp reduction per row. wss: one partial per warp and row.
template <typename T, int NT>
__device__ __forceinline__ void qmm_norm_sums(const uint16_t* xs, const int XS, float* wss, const int MP,
                                              const int M, const int K, const int tid) {
  const int gpr = K / 8, lane = tid & 31, wid = tid >> 5;
  for (int m0 = 0; m0 < M; m0 += 8) {
    float ss[8];
#pragma unroll
    for (int r = 0; r < 8; ++r) ss[r] = 0.f;
    for (int pj = tid; pj < gpr; pj += NT) {  // all staged granules: the 4-bit swizzle permutes them
#pragma unroll
      for (int r = 0; r < 8; ++r)
        if (m0 + r < M) ss[r] += qmm_sumsq8<T>(*reinterpret_cast<const uint4*>(xs + (m0 + r) * XS + pj * 8));
    }
#pragma unroll
    for (int r = 0; r < 8; ++r) {
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) ss[r] += __shfl_xor_sync(0xffffffffu, ss[r], o);
      if (lane == 0 && m0 + r < M) wss[wid * MP + m0 + r] = ss[r];
    }
  }
  __syncthreads();
}

// The RMSNorm of one K-slice of the staged rows (a norm folded over a split K, see NORM in
// qmm_kernel): every thread takes (row, granule) pairs of the slice, where qmm_norm_sums and
// qmm_rms_norm give each thread all rows of a granule (a short slice of many rows left most
// threads idle: q/k/v at 32 rows, 7 slices, has 64 granules a row for 256 threads).
// Sums of squares per 8-granule segment (an 8-lane group of a warp lies in one row and segment:
// K / 8 is a multiple of 8) go to part [K / 64, MP] (scratch: the reduction area, unused before
// the first tile's reduction), then each row's: its scale in this slice (rs), the inverse (ri),
// and, from block 0 of the slice, the sums for the reduce kernel (ssout [S, M]). K: the slice's
// length. The staged x is then scaled by rs and nw (nw: the slice's part), four granules a
// thread in flight.
template <typename T, int BITS, int NT, bool PERM>
__device__ __forceinline__ void qmm_norm_slice(uint16_t* xs, const int XS, const T* __restrict__ nw, float* part,
                                               const int MP, float* rs, float* ri, float* __restrict__ ssout,
                                               const float eps, const int M, const int K, const int tid) {
  const int gpr = K / 8, total = M * gpr, lane = tid & 31;
  for (int b = tid - lane; b < total; b += NT) {  // whole warps: the shuffles see every lane
    const int i = b + lane;
    const int m = i < total ? i / gpr : 0, pj = i - m * gpr;
    float ss = i < total ? qmm_sumsq8<T>(*reinterpret_cast<const uint4*>(xs + m * XS + pj * 8)) : 0.f;
#pragma unroll
    for (int o = 4; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if ((lane & 7) == 0 && i < total) part[(pj >> 3) * MP + m] = ss;
  }
  __syncthreads();
  for (int m = tid; m < M; m += NT) {
    float ss = 0.f;
    for (int q = 0; q < gpr / 8; ++q) ss += part[q * MP + m];
    const float var = ss / (float)max(K, 1) + eps;  // a slice may hold no chunk
    rs[m] = rsqrtf(var);
    ri[m] = sqrtf(var);
    if (blockIdx.x == 0) ssout[blockIdx.y * M + m] = ss;
  }
  __syncthreads();
  const uint4* nwg = reinterpret_cast<const uint4*>(nw);
  for (int i0 = tid; i0 < total; i0 += 4 * NT) {
    int off[4];
    uint4 v[4], g[4];
    float r[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int i = i0 + u * NT;
      if (i < total) {
        const int m = i / gpr, pj = i - m * gpr;
        off[u] = m * XS + pj * 8;
        v[u] = *reinterpret_cast<const uint4*>(xs + off[u]);
        g[u] = nwg[qmm_swz<BITS>(pj)];
        r[u] = rs[m];
      }
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      if (i0 + u * NT >= total) break;
      // PERM: x was staged in the lop3 order, so the norm weights take it too
      *reinterpret_cast<uint4*>(xs + off[u]) = qmm_norm8<T>(v[u], PERM ? qmm_perm8(g[u]) : g[u], r[u]);
    }
  }
  __syncthreads();
}

// Pair epilogues (E): the rows of each 16-row tile are stored in an order where row n
// (n % 16 < 8) and row n + 8 belong together, so that one thread sums both and stores them
// together. Both values are first rounded to T, as the unfused path stores them.
// - QmmRopeCfg: the q/k/v projection (rows in qmm.rope_pair_order: each 16-row tile of a q
//   or k head holds 8 rotation pairs, v heads keep their order). The pair is rotated and
//   written to q [HQ, M, D], or k / v into the cache buffers [HKV, nc, D] at cells[m], in
//   place (the buffers come in as inputs: see qkv_rope_store in batchbench/kernels/rope.py).
//   bbrope::PairRope does it (the RoPE header comes first), as qmv8's q/k/v epilogue does.
// - QmmGluPair: the gate/up projection (rows in qmm.glu_pair_order: tile t holds gate rows
//   8t..8t+7, then the same up rows). The pair gives silu(gate) * up in fp32, one rounding,
//   as qmm_glu8: out is [M, N/2], the down projection's input.
// QmmPlain: no pairing.
// Pair pr of a tile (or of a row of tiles) is its rows r and r + 8: r = 16 (pr / 8) + pr % 8.
__device__ __forceinline__ int qmm_pair_row(const int pr) { return (pr >> 3) * 16 + (pr & 7); }

template <typename T>
using QmmRope = bbrope::RopeIO<T>;

struct QmmPlain {
  static constexpr bool PAIR = false;
  struct Prep {};
};

template <int D, int HQ, int HKV, bool TRAD>
struct QmmRopeCfg {
  static constexpr bool PAIR = true;
  using R = bbrope::PairRope<D, HQ, HKV, TRAD>;
  using Prep = typename R::Prep;
  template <typename T>
  static __device__ __forceinline__ Prep prep(const int n, const int m, const QmmRope<T>& rp) {
    return R::template prep<T>(n, m, rp);
  }
  template <typename T>
  static __device__ __forceinline__ void store(float lo, float hi, const int n, const int m, const int M,
                                               const int N, const QmmRope<T>& rp, T* __restrict__ q,
                                               const Prep& p) {
    R::template store<T>(lo, hi, n, m, M, rp, q, p);
  }
};

struct QmmGluPair {
  static constexpr bool PAIR = true;
  struct Prep {};
  template <typename T>
  static __device__ __forceinline__ Prep prep(const int, const int, const QmmRope<T>&) {
    return {};
  }
  template <typename T>
  static __device__ __forceinline__ void store(float g, float u, const int n, const int m, const int M,
                                               const int N, const QmmRope<T>&, T* __restrict__ out, const Prep&) {
    g = qmm_float<T>(qmm_cast<T, T>(g));
    u = qmm_float<T>(qmm_cast<T, T>(u));
    out[(size_t)m * (N / 2) + (n >> 4) * 8 + (n & 7)] = qmm_cast<T, T>(g / (1.f + expf(-g)) * u);
  }
};

// One warp's weights for P chunks in flight: two feature rows (g, g + 8), 16 bytes each.
template <int P>
struct QmmStage {
  uint4 wa[P], wb[P];
  uint32_t sa[P], sb[P], ba[P], bb[P];
};

// NOUT / NPRE operands (see qmm_kernel). nw: the next norm's weights; yw, ssp: NOUT's outputs,
// y * nw [M, N] and the sums of squares of y [N / BN tiles, M]; pss: NPRE's input, such sums of
// a producer's tiles [pt, M] (of any tile size: the consumer sums all pt rows of a column).
template <typename T>
struct QmmNormIO {
  const T* nw;
  T* yw;
  float* ssp;
  const float* pss;
  int pt;  // rows of pss
};

// T: activation dtype; BITS 4|8; GS group size; MT token tiles of 8 (M <= 8*MT);
// WN x WK warps per block (features x K); P chunks per load stage, two stages in flight
// (the next P chunks load while the current ones are multiplied); NS > 0 instead streams
// weights, scales and biases through a ring of NS one-chunk slots per warp in shared memory
// (cp.async, NS - 1 chunks in flight without holding registers; the ring runs on across tiles).
// WF 16-row feature tiles per warp (WF = 2 needs the ring): each x fragment read from shared
// memory feeds WF tiles' mma. Runtime: M, and the
// weight shape N x K (N % (16*WN) == 0, K % (512/BITS) == 0, checked by the launcher);
// gridDim.y = S K-slices. The block walks feature tiles blockIdx.x, + gridDim.x, ...: x is
// staged (and normalized) once per block, and the first loads of the next tile are in flight
// while the current one is reduced. SPLIT: write partials [S, M, N] (fp32, or O = fp16 with
// BB_QMM_PART16) instead of y.
// GLU: x is [M, 2K] = [gate | up] and the input is silu(gate) * up (the MLP's down projection).
// HAS_RES: y += res[M, N] (the residual add after o_proj / down_proj).
// NORM: the input is rms_norm(x) * nw[K] (eps), computed on the staged x; K % 256 == 0 (a warp's
// 32 staging granules then lie in one row). With SPLIT (needs NPASS) the norm is folded: the
// row scale is a scalar, y = rsqrt(mean(x^2) + eps) * ((x * nw) @ W^T), so each K-slice
// normalizes its x by its own sums (qmm_norm_slice: the staged values keep rms_norm's
// magnitude), writes its partials times the inverse of that scale and its sums of squares to
// ssout [S, M], and the reduce kernel scales the summed partials by the whole row's rsqrt.
// DQ = 1: fp16 4-bit weights take qmm_dq4_lop3 (x staged reordered to match); else qmm_pair4.
// E: QmmPlain, or a pair epilogue (QmmRopeCfg, QmmGluPair) that stores rows n and n + 8 together.
// The next layer's RMSNorm split between two launches of one K-slice (QmmNormIO): NOUT, this
// launch (plain epilogue, tiles of 16 or 32 rows) also writes y * nw and each tile's sums of
// squares of y per row; NPRE, this launch's x is such a y * nw: it scales its sums by each
// row's rsqrt(mean + eps) from those partial sums before the bias (no norm passes over x).
template <typename T, int BITS, int GS, int MT, int WN, int WK, int P, int NS, int WF, bool PRE, bool SPLIT, bool HAS_BIAS,
          bool HAS_RES, bool GLU, bool NORM, bool NPASS, bool NEARLY, int DQ, bool EPRE, bool NOUT, bool NPRE,
          bool SBP, int WP, typename E, typename O>
__device__ __forceinline__ void qmm_kernel(const T* __restrict__ x, const uint32_t* __restrict__ w,
                                           const T* __restrict__ scales,
                                           const T* __restrict__ biases,
                                           const T* __restrict__ lbias, const T* __restrict__ res,
                                           const T* __restrict__ nw, const float eps,
                                           O* __restrict__ out, float* __restrict__ ssout,
                                           const int M, const int N, const int K, const QmmRope<T> rp,
                                           const QmmNormIO<T> nio) {
  constexpr bool BF16 = is_bf16<T>::value;
  constexpr bool LOP3 = (DQ == 1 || DQ == 2 || DQ == 3) && BITS == 4 && !BF16;
  constexpr bool SUB = DQ == 3 && LOP3;  // qmm_dq4_sub: the products come out scaled by 2^-9
  // DQ = 2: the weights dequantized without their bias; each lane adds bias times the sum of
  // the 32 x values its 16 bytes meet (one token: the spans' sums are staged beside x).
  constexpr bool BSUM = DQ == 2;
  // SBP: scales and biases packed at load time as one 4-byte (scale, bias) pair a group
  // (`pack_scales_biases`, passed as both `scales` and `biases`): one load a row and chunk
  // instead of two, one L2 sector instead of two for the quad's 4 groups. The ring copies a
  // row's pairs of a chunk (2 * SB bytes) in two halves, where it copied the scales and the
  // biases, into the same slot bytes.
  static_assert(!BSUM || (LOP3 && MT == 1 && WF == 1 && NS == 0 && !NORM),
                "qmm: the bias sums need the fp16 4-bit lop3 path, one token tile, register stages, no fused norm");
  constexpr int KT = 128 / BITS;            // k per lane per 16-byte load: 32 or 16
  constexpr int CK = 4 * KT;                // k per chunk (4 lanes per feature row)
  constexpr int BN = 16 * WN * WF;
  constexpr int NT = 32 * WN * WK;
  constexpr int MP = 8 * MT;
  constexpr int RS = BN + 4;                // reduction row stride: conflict-free fragment stores
  static_assert(GS % KT == 0, "qmm: group smaller than a lane's 16 bytes");
  // Ring slot: the warp's 32 x 16 bytes of rows g, then of rows g + 8, then scales and biases
  // of its 16 rows (SB bytes each: the chunk's groups).
  constexpr int SB = NS > 0 ? (CK / GS) * 2 : 0;
  constexpr int FSLOT = 1024 + 32 * SB;  // one feature tile's part of a slot
  constexpr int SLOTB = WF * FSLOT;
  static_assert(WF == 1 || (WF == 2 && NS > 0), "qmm: two feature tiles per warp need the ring");
  static_assert(NS == 0 || (CK % GS == 0 && (SB == 4 || SB == 8 || SB == 16)), "qmm: ring needs 4-16 scale bytes per chunk");
  const int S = gridDim.y;
  const int NCH = K / CK;
  const int NCHS = (NCH + S - 1) / S;       // most chunks in one K-slice
  const int XS = NCHS * CK + (BITS == 4 ? 16 : 8);  // x row stride in smem (halves)
  const int KW = K * BITS / 32;             // words per weight row
  // WP: the weights repacked at load time (`pack_weights`): each 16-row block's chunk is 1 KB
  // in lane order, so a warp's load is 512 contiguous bytes (MLX's layout: 64 bytes of 8 rows)
  constexpr int CSTEP = WP ? 256 : CK * BITS / 32;  // words from one chunk of a lane's rows to the next
  // WP = 2: the pairs (SBP) repacked too (`pack_pairs`): each 16-row block's chunk is its rows'
  // CPG pairs in row order, 64 * CPG contiguous bytes (the ring slot's order) where MLX's layout
  // has 4 * CPG bytes of each of 16 rows
  constexpr bool PR = WP == 2;
  constexpr int CPG = CK % GS == 0 ? CK / GS : 1;  // pairs of a row in one chunk
  static_assert(!PR || (SBP && CK % GS == 0), "qmm: repacked pairs need the pairs and whole groups in a chunk");
  const int NG = K / GS;
  const int NTILE = N / BN;

  // smem: x slice [M rows x XS halves], the reduction area [WK * MP x RS floats], the rings.
  extern __shared__ uint4 qmm_smem[];
  uint16_t* xs = reinterpret_cast<uint16_t*>(qmm_smem);
  float* red = reinterpret_cast<float*>(xs + M * XS);
  float* sxs = red + WK * MP * RS;  // BSUM: x's 32-k span sums of this K-slice (where the ring would be)
  constexpr bool FOLD = NORM && SPLIT;
  __shared__ float wss[NORM && !FOLD ? (NT / 32) * MP : 1];
  static_assert(!FOLD || NPASS, "qmm: a norm over a K-slice takes its sums after the staging");
  __shared__ float rsc[FOLD ? MP : 1], rinv[FOLD ? MP : 1];  // FOLD: each row's scale in this K-slice, its inverse
  __shared__ float rsn[NPRE ? MP : 1];  // NPRE: each row's rsqrt(mean(y^2) + eps) of the producer's y
  static_assert(!(NPRE && (NORM || SPLIT)), "qmm: a norm split with the producer needs one K-slice, no norm of its own");
  static_assert(!(NOUT && (SPLIT || E::PAIR || (BN != 16 && BN != 32))), "qmm: NOUT needs a plain epilogue and 16 or 32-row tiles");

  const int tid = threadIdx.x, lane = tid & 31, wid = tid >> 5;
  const int wn = wid % WN, wk = wid / WN;
  const int g = lane >> 2, t = lane & 3;
  const int s = blockIdx.y;
  const int cs0 = s * NCH / S, cs1 = (s + 1) * NCH / S;
  const int nch = cs1 - cs0;
  const int k0 = cs0 * CK;
  const int wc0 = cs0 + wk * nch / WK, wc1 = cs0 + (wk + 1) * nch / WK;

  const uint32_t* w0;
  const uint32_t* w1;
  const uint16_t* sc0;
  const uint16_t* bi0;
  const uint32_t* sp0;  // SBP
  auto at_tile = [&](int tile) {
    const int r0 = tile * BN + wn * 16 + g;
    if constexpr (WP) {  // the 16-row block's chunks, 1 KB each: rows g of all lanes, then rows g + 8
      w0 = w + (size_t)(tile * (BN / 16) + wn) * NCH * 256 + lane * 4;
      w1 = w0 + 128;
    } else {
      w0 = w + (size_t)r0 * KW + t * (KT * BITS / 32);
      w1 = w0 + (size_t)8 * KW;
    }
    // When a chunk spans whole groups, the lane's group is c * CK / GS + t * KT / GS
    const size_t g0 = (size_t)r0 * NG + (CK % GS == 0 ? t * KT / GS : 0);
    if constexpr (PR) {  // word g * CPG + q of the block's chunk, rows g + 8 at 8 * CPG
      sp0 = reinterpret_cast<const uint32_t*>(scales) + (size_t)(tile * (BN / 16) + wn) * NCH * 16 * CPG
            + g * CPG + t * KT / GS;
    } else if constexpr (SBP) {
      sp0 = reinterpret_cast<const uint32_t*>(scales) + g0;
    } else {
      sc0 = reinterpret_cast<const uint16_t*>(scales) + g0;
      bi0 = reinterpret_cast<const uint16_t*>(biases) + g0;
    }
  };

  auto load = [&](QmmStage<P>& st, int c0) {
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const int c = c0 + p;
      if (c < wc1) {
        st.wa[p] = qmm_ld_stream(w0 + c * CSTEP);
        st.wb[p] = qmm_ld_stream(w1 + c * CSTEP);
        const int grp = CK % GS == 0 ? c * (CK / GS) : (c * CK + t * KT) / GS;
        if constexpr (PR) {
          st.sa[p] = st.ba[p] = sp0[c * 16 * CPG];
          st.sb[p] = st.bb[p] = sp0[c * 16 * CPG + 8 * CPG];
        } else if constexpr (SBP) {  // the bias in the high half: mul takes it from there
          st.sa[p] = st.ba[p] = sp0[grp];
          st.sb[p] = st.bb[p] = sp0[grp + 8 * NG];
        } else {
          st.sa[p] = sc0[grp];
          st.ba[p] = bi0[grp];
          st.sb[p] = sc0[grp + 8 * NG];
          st.bb[p] = bi0[grp + 8 * NG];
        }
      }
    }
  };
  QmmStage<P> sA, sB;
  int tile = blockIdx.x;
  if (tile >= NTILE) return;

  unsigned char* ring = reinterpret_cast<unsigned char*>(red + WK * MP * RS) + wid * NS * SLOTB;
  int ptile = wc1 > wc0 ? tile : NTILE, pc = wc0;  // the next chunk the ring requests
  auto request = [&](int slot) {
    if constexpr (NS > 0) {
      if (ptile < NTILE) {
#pragma unroll
        for (int f = 0; f < WF; ++f) {
          const int r0 = ptile * BN + (wn * WF + f) * 16 + g;
          const uint32_t* src = WP ? w + ((size_t)(ptile * (BN / 16) + wn * WF + f) * NCH + pc) * 256 + lane * 4
                                   : w + (size_t)r0 * KW + t * (KT * BITS / 32) + (size_t)pc * CSTEP;
          unsigned char* d = ring + slot * SLOTB + f * FSLOT;
          qmm_cp_async<16>(d + lane * 16, src);
          qmm_cp_async<16>(d + 512 + lane * 16, src + (WP ? (size_t)128 : (size_t)8 * KW));
          // lane t copies scales (t even) or biases (t odd) of row g (t < 2) or g + 8; SBP: the
          // first (t even) or second half of the row's pairs
          // PR: the block's chunk holds the slot's bytes in the slot's order
          const int so = ((g + 8 * (t >> 1)) * 2 + (t & 1)) * SB;
          const size_t sr = (size_t)(r0 + 8 * (t >> 1)) * NG + (size_t)pc * (CK / GS);
          const T* ssrc = PR ? scales + ((size_t)(ptile * (BN / 16) + wn * WF + f) * NCH + pc) * 16 * SB + so / 2
                          : SBP ? scales + 2 * sr + (t & 1) * (SB / 2) : ((t & 1) ? biases : scales) + sr;
          qmm_cp_async<SB>(d + 1024 + so, ssrc);
        }
        if (++pc == wc1) {
          pc = wc0;
          ptile += gridDim.x;
        }
      }
      qmm_cp_commit();
    }
  };
  // First weights in flight before the x staging and the barrier.
  if constexpr (NS > 0) {
#pragma unroll
    for (int i = 0; i < NS - 1; ++i) request(i);
  } else {
    at_tile(tile);
    load(sA, wc0);
    if constexpr (PRE) load(sB, wc0 + P);  // both stages in flight over the staging
  }
  // The norm's weights: with NEARLY, a thread's first granules are in flight over the staging.
  constexpr bool EARLY = NORM && NEARLY && !FOLD;
  constexpr int NWR = EARLY ? 2 : 1;  // 2: all of them for K <= 16 * NT (4096 at 256 threads)
  uint4 nwr[NWR];
  if constexpr (EARLY) qmm_nw_early<BITS, NT, NWR>(reinterpret_cast<const uint4*>(nw), nwr, K, tid);

  // NPRE: each row's scale from the producer's per-tile sums (the barrier after the staging
  // publishes it; the first weights are in flight meanwhile).
  // A lane's partials load PU at a time, all in flight at once (pt <= 384: one round). A plain
  // loop over pt, which nvcc unrolled for 16 and 4 at a time, left 224 partials (7 a lane) a few
  // round trips to L2 in a row: H200 decode step, the gate/up pair at M=1 29.4 us plain, 30.7
  // with its norm fused, 33.5 with NPRE and that loop, 29.8 with these loads
  // (results/h200-2026-11-30-s21/call2, call3, call6).
  if constexpr (NPRE) {
    constexpr int PU = 12;  // one round up to 384 partials (qmv8's producers write one a block: 264 on an H200)
    for (int m = wid; m < M; m += NT / 32) {
      float q = 0.f;
      for (int t0 = lane; t0 < nio.pt; t0 += 32 * PU) {
        float v[PU];
#pragma unroll
        for (int u = 0; u < PU; ++u) {
          const int t = t0 + 32 * u;
          v[u] = t < nio.pt ? nio.pss[(size_t)t * M + m] : 0.f;
        }
#pragma unroll
        for (int u = 0; u < PU; ++u) q += v[u];
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) q += __shfl_xor_sync(0xffffffffu, q, o);
      if (lane == 0) rsn[m] = rsqrtf(q / (float)K + eps);
    }
  }

  // The norm's sums of squares: in the staging loop (a warp reduction per granule), or with
  // NPASS in one pass over the staged rows after it (qmm_norm_sums).
  constexpr bool SUMS_IN_LOOP = NORM && !NPASS;
  // x that is copied unchanged (no norm sums on the way, no gate product, no lop3 reordering): cp.async,
  // every copy of the block in flight at once (H200: down M=32 45.4 -> 41.6 us). Otherwise
  // through registers: cp.async and then an in-place pass lost (o_proj M=8 7.8 -> 9.4 us),
  // and so did loading 4 or 8 granules a thread before storing any (o_proj M=32 14.9 -> 21.3).
  // H200, decode step without attention (results/h200-2026-11-30-s19/call3): with the lop3 order made
  // in the norm's pass instead (x by cp.async), B=8 2.430 -> 2.475 ms; made as the product reads
  // each granule, 2.554 (B=32 4.05 -> 4.20).
  constexpr bool ASYNC = BB_QMM_X_ASYNC && !GLU && !SUMS_IN_LOOP && !LOP3;
  {  // stage this K-slice of x (all M rows) in smem, 16-byte granules, swizzled for 4-bit
    const int gpr = nch * CK / 8;
    const int xr8 = (GLU ? 2 * K : K) / 8, k08 = k0 / 8;  // granules: a row of x, the slice's start
    const uint4* xg = reinterpret_cast<const uint4*>(x);
    // Thread tid takes granules tid, tid + NT, ... of the M x gpr slice: (m, j) steps by NT
    // without a division per granule (one each cost ~30 instructions: 14 granules a thread at
    // M=8, K=3584, all of a block's warps issuing them before its first product). With the
    // norm's row scales shuffled (qmm_rms_norm), H200 decode step at B=8, two runs each way
    // (results/h200-2026-11-29-s18/call15): 2.524-2.525 -> 2.423-2.430 ms (gate/up 37.5 ->
    // 35.6 us, q/k/v 14.7 -> 13.7, down 22.1 -> 21.7, o_proj 7.7 -> 7.6).
    // (A K-slice can hold no chunk: then gpr == 0 and there is nothing to stage.)
    const int mstep = gpr > 0 ? NT / gpr : 0, jstep = NT - mstep * gpr;
    const int m_first = gpr > 0 ? tid / gpr : M, j_first = tid - m_first * gpr;
    auto next_granule = [&](int& m, int& j) {
      j += jstep;
      m += mstep;
      if (j >= gpr) {
        j -= gpr;
        ++m;
      }
    };
    if constexpr (SUMS_IN_LOOP) {
      for (int m = lane; m < M; m += 32) wss[wid * MP + m] = 0.f;
      __syncwarp();
    }
    if constexpr (ASYNC) {
      for (int m = m_first, j = j_first; m < M; next_granule(m, j)) {
        const int pj = qmm_swz<BITS>(j);
        qmm_cp_async<16>(xs + m * XS + pj * 8, xg + m * xr8 + k08 + j);
      }
      qmm_cp_commit();
      qmm_cp_wait<0>();  // also the ring's first requests, which the first chunk needs anyway
    } else {
      // XU granules a thread in flight at once, then each is finished and stored. One for the
      // gate/up pair at one row (sums in this loop, norm weights late): H200 decode step, two runs
      // each way (results/h200-2026-11-30-s19/call5), XU=4 there 30.7 -> 34.6 us (B=1 1.950 ->
      // 2.055 ms) and XU=1 31.0; everywhere else XU=4 measured faster than XU=1 (B=2 2.110 ->
      // 2.075-2.079, q/k/v at B=1 9.7 -> 9.3 us).
      constexpr int XU = SUMS_IN_LOOP && !EARLY ? 1 : 4;
      for (int m = m_first, j = j_first; m < M;) {
        int mu[XU], ju[XU];
        uint4 v[XU], vu[GLU ? XU : 1];
#pragma unroll
        for (int u = 0; u < XU; ++u) {
          mu[u] = m;
          ju[u] = j;
          if (m < M) {
            const int gi = m * xr8 + k08 + j;
            v[u] = xg[gi];
            if constexpr (GLU) vu[u] = xg[gi + K / 8];
          }
          next_granule(m, j);
        }
#pragma unroll
        for (int u = 0; u < XU; ++u) {
          if (mu[u] >= M) break;  // whole warps: a warp's lanes share a row where it matters
          uint4 w = v[u];
          if constexpr (GLU) w = qmm_glu8<T>(w, vu[u]);
          if constexpr (SUMS_IN_LOOP) {  // gpr % 32 == 0: the warp's 32 granules are one row
            float ss = qmm_sumsq8<T>(w);
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
            if (lane == 0) wss[wid * MP + mu[u]] += ss;
          }
          if constexpr (LOP3) w = qmm_perm8(w);
          *reinterpret_cast<uint4*>(xs + mu[u] * XS + qmm_swz<BITS>(ju[u]) * 8) = w;
        }
      }
    }
  }
  __syncthreads();
  if constexpr (FOLD) {
    qmm_norm_slice<T, BITS, NT, LOP3>(xs, XS, nw + k0, red, MP, rsc, rinv, ssout, eps, M, nch * CK, tid);
  } else if constexpr (NORM) {
    if constexpr (NPASS) qmm_norm_sums<T, NT>(xs, XS, wss, MP, M, K, tid);
    qmm_rms_norm<T, BITS, NT, LOP3, EARLY, NWR, MP>(xs, XS, nw, nwr, wss, eps, M, K, tid);
  }
  if constexpr (BSUM) {  // the staged row's 32-k spans: 4 granules each (the swizzle stays within them)
    const uint4* xs4s = reinterpret_cast<const uint4*>(xs);
    for (int i = tid; i < nch * (CK / 32); i += NT)
      sxs[i] = qmm_sum8(xs4s[4 * i]) + qmm_sum8(xs4s[4 * i + 1]) + qmm_sum8(xs4s[4 * i + 2]) + qmm_sum8(xs4s[4 * i + 3]);
    __syncthreads();
  }

  // This lane's x row per token tile, as a 16-byte granule index into xs. Rows past M read
  // row M - 1: they only feed output columns that are never stored, and an unpredicated
  // read needs no zeroing. The 4-bit swizzle of a lane's granules is the same in every
  // chunk: granule 4t + wd sits at 4t + (wd ^ sw).
  const uint4* xs4 = reinterpret_cast<const uint4*>(xs);
  // Per token tile, two bases: granule 4t + wd sits at 4t + (wd ^ sw), i.e. at xe[tt] + (wd & 2)
  // for even wd and at xd[tt] + (wd & 2) for odd wd, so each read is a base plus an immediate.
  const int sw = BITS == 4 ? (t >> 1) & 1 : 0;
  int xe[MT], xd[MT];
#pragma unroll
  for (int tt = 0; tt < MT; ++tt) {
    const int xo = min(tt * 8 + g, M - 1) * (XS / 8) + t * (KT / 8);
    xe[tt] = xo + sw;
    xd[tt] = xo + (BITS == 4 ? 1 - sw : 0);
  }

  float acc[WF][MT][4];
  float bs0 = 0.f, bs1 = 0.f;  // BSUM: this lane's bias terms of rows g and g + 8 (token 0)

  // One chunk c of WF feature tiles: rows g (wa, scale sa, bias ba) and g + 8 (wb, sb, bb) of
  // each, times the staged x.
  auto mul = [&](const uint4 (&wa)[WF], const uint4 (&wb)[WF], const uint32_t (&sa)[WF],
                 const uint32_t (&ba)[WF], const uint32_t (&sb)[WF], const uint32_t (&bb)[WF], const int c) {
    uint32_t s0[WF], b0[WF], s1[WF], b1[WF], s0h[WF], s1h[WF], u0[WF][4], u1[WF][4];
    uint32_t c0[WF], c0h[WF], c1[WF], c1h[WF];  // BSUM: -1024 times each scale
#pragma unroll
    for (int f = 0; f < WF; ++f) {
      s0h[f] = s1h[f] = 0u;
      if constexpr (SUB && SBP) {  // one multiply makes the pair (s * 2^15, b * 2^-9)
        const uint32_t qa = qmm_hmul2_pow2(sa[f], 0x18007800u), qb = qmm_hmul2_pow2(sb[f], 0x18007800u);
        s0[f] = qmm_dup16(qa);
        b0[f] = qmm_hi16(qa);
        s1[f] = qmm_dup16(qb);
        b1[f] = qmm_hi16(qb);
      } else {
        s0[f] = qmm_dup16(sa[f]);
        b0[f] = SBP ? qmm_hi16(ba[f]) : qmm_dup16(ba[f]);
        s1[f] = qmm_dup16(sb[f]);
        b1[f] = SBP ? qmm_hi16(bb[f]) : qmm_dup16(bb[f]);
      }
      if constexpr (SUB) {  // S = s * 2^15 (lo codes), s * 2^11 (hi codes), B = b * 2^-9
        if constexpr (!SBP) {
          s0[f] = qmm_hmul2_pow2(s0[f], 0x78007800u);
          s1[f] = qmm_hmul2_pow2(s1[f], 0x78007800u);
          b0[f] = qmm_hmul2_pow2(b0[f], 0x18001800u);
          b1[f] = qmm_hmul2_pow2(b1[f], 0x18001800u);
        }
        s0h[f] = qmm_hmul2_pow2(s0[f], 0x2C002C00u);  // 2^-4: exact while s * 2^11 is normal
        s1h[f] = qmm_hmul2_pow2(s1[f], 0x2C002C00u);
      } else if constexpr (LOP3) {
        s0h[f] = qmm_scale16(s0[f]);
        s1h[f] = qmm_scale16(s1[f]);
      }
      if constexpr (BSUM) {
        c0[f] = qmm_m1024(s0[f]);
        c0h[f] = qmm_m1024(s0h[f]);
        c1[f] = qmm_m1024(s1[f]);
        c1h[f] = qmm_m1024(s1h[f]);
        const float sx = sxs[(c - cs0) * (CK / 32) + t];  // the sum of the 32 x values of this lane's 16 bytes
        bs0 += qmm_to_float2(b0[f], false).x * sx;  // b0, b1: the biases in both halves
        bs1 += qmm_to_float2(b1[f], false).x * sx;
      }
      u0[f][0] = wa[f].x; u0[f][1] = wa[f].y; u0[f][2] = wa[f].z; u0[f][3] = wa[f].w;
      u1[f][0] = wb[f].x; u1[f][1] = wb[f].y; u1[f][2] = wb[f].z; u1[f][3] = wb[f].w;
    }
    const int jc = (c - cs0) * (CK / 8);  // the chunk's first x granule
    if constexpr (BITS == 4) {
#pragma unroll
      for (int wd = 0; wd < 4; ++wd) {
        uint32_t A0[WF][4], A1[WF][4];
#pragma unroll
        for (int f = 0; f < WF; ++f) {
          if constexpr (BSUM) {
            qmm_dq4_lop3_nb(u0[f][wd], s0[f], s0h[f], c0[f], c0h[f], A0[f]);
            qmm_dq4_lop3_nb(u1[f][wd], s1[f], s1h[f], c1[f], c1h[f], A1[f]);
          } else if constexpr (SUB) {
            qmm_dq4_sub(u0[f][wd], s0[f], s0h[f], b0[f], A0[f]);
            qmm_dq4_sub(u1[f][wd], s1[f], s1h[f], b1[f], A1[f]);
          } else if constexpr (LOP3) {
            qmm_dq4_lop3(u0[f][wd], s0[f], s0h[f], b0[f], A0[f]);
            qmm_dq4_lop3(u1[f][wd], s1[f], s1h[f], b1[f], A1[f]);
          } else {
            const uint32_t u0s = u0[f][wd] >> 4, u1s = u1[f][wd] >> 4;
#pragma unroll
            for (int q = 0; q < 4; ++q) {
              A0[f][q] = qmm_pair4<BF16>(u0[f][wd], u0s, q, s0[f], b0[f]);
              A1[f][q] = qmm_pair4<BF16>(u1[f][wd], u1s, q, s1[f], b1[f]);
            }
          }
        }
#pragma unroll
        for (int tt = 0; tt < MT; ++tt) {
          const uint4 xv = (xs4 + ((wd & 1) ? xd[tt] : xe[tt]) + jc)[wd & 2];
#pragma unroll
          for (int f = 0; f < WF; ++f) {
            qmm_mma<BF16>(acc[f][tt], A0[f][0], A1[f][0], A0[f][1], A1[f][1], xv.x, xv.y);
            qmm_mma<BF16>(acc[f][tt], A0[f][2], A1[f][2], A0[f][3], A1[f][3], xv.z, xv.w);
          }
        }
      }
    } else {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        uint32_t A0[WF][4], A1[WF][4];
#pragma unroll
        for (int f = 0; f < WF; ++f) {
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            A0[f][q] = qmm_pair8<BF16>(u0[f][2 * h + (q >> 1)], q & 1, s0[f], b0[f]);
            A1[f][q] = qmm_pair8<BF16>(u1[f][2 * h + (q >> 1)], q & 1, s1[f], b1[f]);
          }
        }
#pragma unroll
        for (int tt = 0; tt < MT; ++tt) {
          const uint4 xv = (xs4 + xe[tt] + jc)[h];
#pragma unroll
          for (int f = 0; f < WF; ++f) {
            qmm_mma<BF16>(acc[f][tt], A0[f][0], A1[f][0], A0[f][1], A1[f][1], xv.x, xv.y);
            qmm_mma<BF16>(acc[f][tt], A0[f][2], A1[f][2], A0[f][3], A1[f][3], xv.z, xv.w);
          }
        }
      }
    }
  };
  auto compute = [&](const QmmStage<P>& st, int c0) {
#pragma unroll
    for (int p = 0; p < P; ++p) {
      if constexpr (WF == 1) {  // the register stages hold one feature tile
        if (c0 + p < wc1) {
          const uint4 wa[1] = {st.wa[p]}, wb[1] = {st.wb[p]};
          const uint32_t sa[1] = {st.sa[p]}, ba[1] = {st.ba[p]}, sb[1] = {st.sb[p]}, bb[1] = {st.bb[p]};
          mul(wa, wb, sa, ba, sb, bb, c0 + p);
        }
      }
    }
  };
  // The ring's chunk c in `slot`: per feature tile, this lane's own 2 x 16 bytes and its
  // rows' scales and biases.
  auto take = [&](const int slot, const int c) {
    uint4 wa[WF], wb[WF];
    uint32_t sa[WF], ba[WF], sb[WF], bb[WF];
    const int q = t * KT / GS;  // the lane's group within the chunk
#pragma unroll
    for (int f = 0; f < WF; ++f) {
      const unsigned char* d = ring + slot * SLOTB + f * FSLOT;
      wa[f] = *reinterpret_cast<const uint4*>(d + lane * 16);
      wb[f] = *reinterpret_cast<const uint4*>(d + 512 + lane * 16);
      if constexpr (SBP) {  // a row's 2 * SB bytes of pairs: word q is group q's
        const uint32_t* sp = reinterpret_cast<const uint32_t*>(d + 1024);
        sa[f] = ba[f] = sp[g * (SB / 2) + q];
        sb[f] = bb[f] = sp[(g + 8) * (SB / 2) + q];
      } else {
        const uint16_t* sc = reinterpret_cast<const uint16_t*>(d + 1024);
        sa[f] = sc[(g * 2) * (SB / 2) + q];
        ba[f] = sc[(g * 2 + 1) * (SB / 2) + q];
        sb[f] = sc[((g + 8) * 2) * (SB / 2) + q];
        bb[f] = sc[((g + 8) * 2 + 1) * (SB / 2) + q];
      }
    }
    mul(wa, wb, sa, ba, sb, bb, c);
  };
  int slot = 0;  // the ring slot of the next chunk to multiply

  for (;;) {
    const int n0 = tile * BN;
    // EPRE: the operands of this thread's first epilogue element (bias, residual; the RoPE angle
    // and cache cell) load while the tile is multiplied instead of after its reduction.
    float pb0 = 0.f, pb1 = 0.f;  // bias of rows n and n + 8 (pair), or bias and residual (plain)
    float pb2 = 0.f;  // NOUT: the next norm's weight
    typename E::Prep pp{};
    if constexpr (EPRE && !SPLIT) {
      if constexpr (E::PAIR) {
        if (tid < M * (BN / 2)) {
          const int m = tid / (BN / 2), n = n0 + qmm_pair_row(tid - m * (BN / 2));
          if constexpr (HAS_BIAS) {
            pb0 = qmm_float<T>(lbias[n]);
            pb1 = qmm_float<T>(lbias[n + 8]);
          }
          pp = E::template prep<T>(n, m, rp);
        }
      } else if (tid < M * BN) {
        const int m = tid / BN, n = n0 + tid - m * BN;
        if constexpr (HAS_BIAS) pb0 = qmm_float<T>(lbias[n]);
        if constexpr (HAS_RES) pb1 = qmm_float<T>(res[(size_t)m * N + n]);
        if constexpr (NOUT) pb2 = qmm_float<T>(nio.nw[n]);
      }
    }
#pragma unroll
    for (int f = 0; f < WF; ++f)
#pragma unroll
      for (int tt = 0; tt < MT; ++tt) acc[f][tt][0] = acc[f][tt][1] = acc[f][tt][2] = acc[f][tt][3] = 0.f;
    bs0 = bs1 = 0.f;
    if constexpr (NS > 0) {
      for (int c = wc0; c < wc1; ++c) {
        __syncwarp();  // every lane is done with the slot refilled now (multiplied last step)
        request(slot == 0 ? NS - 1 : slot - 1);
        qmm_cp_wait<NS - 1>();
        __syncwarp();  // the other lanes' scales and biases have landed
        take(slot, c);
        slot = slot + 1 == NS ? 0 : slot + 1;
      }
    } else {
      // Two stages: while one stage's chunks are multiplied, the next stage's loads are in flight.
      // (PRE: stage B was loaded before the loop or at the end of the last round.)
      for (int c0 = wc0; c0 < wc1; c0 += 2 * P) {
        if constexpr (!PRE) load(sB, c0 + P);
        compute(sA, c0);
        load(sA, c0 + 2 * P);
        compute(sB, c0 + P);
        if constexpr (PRE) load(sB, c0 + 3 * P);
      }
    }
    const int next = tile + gridDim.x;
    if (NS == 0 && next < NTILE) {  // the next tile's first weights load during this tile's reduction
      at_tile(next);
      load(sA, wc0);
      if constexpr (PRE) load(sB, wc0 + P);
    }

    if constexpr (BSUM) {  // the quad's 4 lanes hold the tile rows' bias terms of 4 spans a chunk
      bs0 += __shfl_xor_sync(0xffffffffu, bs0, 1);
      bs0 += __shfl_xor_sync(0xffffffffu, bs0, 2);
      bs1 += __shfl_xor_sync(0xffffffffu, bs1, 1);
      bs1 += __shfl_xor_sync(0xffffffffu, bs1, 2);
      if (t == 0) {  // token 0 of rows g and g + 8
        acc[0][0][0] += bs0;
        acc[0][0][2] += bs1;
      }
    }
    if constexpr (SUB) {
#pragma unroll
      for (int f = 0; f < WF; ++f)
#pragma unroll
        for (int tt = 0; tt < MT; ++tt)
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[f][tt][i] *= 512.f;
    }
    // Reduce the WK warps of each feature tile through smem.
#pragma unroll
    for (int f = 0; f < WF; ++f)
#pragma unroll
      for (int tt = 0; tt < MT; ++tt) {
        const int m = tt * 8 + 2 * t, r = (wn * WF + f) * 16 + g;
        red[(wk * MP + m) * RS + r] = acc[f][tt][0];
        red[(wk * MP + m + 1) * RS + r] = acc[f][tt][1];
        red[(wk * MP + m) * RS + r + 8] = acc[f][tt][2];
        red[(wk * MP + m + 1) * RS + r + 8] = acc[f][tt][3];
      }
    __syncthreads();
    if constexpr (E::PAIR && !SPLIT) {
      for (int e = tid; e < M * (BN / 2); e += NT) {
        const int m = e / (BN / 2);
        const int r = qmm_pair_row(e - m * (BN / 2));  // the pair's rows r and r + 8 of this tile
        float lo = 0.f, hi = 0.f;
#pragma unroll
        for (int q = 0; q < WK; ++q) {
          lo += red[(q * MP + m) * RS + r];
          hi += red[(q * MP + m) * RS + r + 8];
        }
        const int n = n0 + r;
        const bool pre = EPRE && e == tid;
        if constexpr (NPRE) {
          lo *= rsn[m];
          hi *= rsn[m];
        }
        if constexpr (HAS_BIAS) {
          lo += pre ? pb0 : qmm_float<T>(lbias[n]);
          hi += pre ? pb1 : qmm_float<T>(lbias[n + 8]);
        }
        E::template store<T>(lo, hi, n, m, M, N, rp, out, pre ? pp : E::template prep<T>(n, m, rp));
      }
    } else
    for (int e = tid; e < M * BN; e += NT) {
      const int m = e / BN, r = e - m * BN;
      float v = 0.f;
#pragma unroll
      for (int q = 0; q < WK; ++q) v += red[(q * MP + m) * RS + r];
      const int n = n0 + r;
      if constexpr (SPLIT) {
        out[((size_t)s * M + m) * N + n] = qmm_cast<O, T>(FOLD ? v * rinv[m] : v);
      } else {
        const bool pre = EPRE && e == tid;
        if constexpr (NPRE) v *= rsn[m];
        if constexpr (HAS_BIAS) v += pre ? pb0 : qmm_float<T>(lbias[n]);
        if constexpr (HAS_RES) v += pre ? pb1 : qmm_float<T>(res[(size_t)m * N + n]);
        out[(size_t)m * N + n] = qmm_cast<O, T>(v);
        if constexpr (NOUT) {
          // y * nw, and the sum of squares of this tile's row m: its BN outputs are BN lanes of
          // one warp (NT % 32 == 0, M * BN % BN == 0), all in this iteration or none.
          const float hf = qmm_float<T>(qmm_cast<T, T>(v));
          nio.yw[(size_t)m * N + n] = qmm_cast<T, T>(hf * (pre ? pb2 : qmm_float<T>(nio.nw[n])));
          const unsigned gmask = BN == 32 ? 0xffffffffu : 0xffffu << (lane & 16);
          float q = hf * hf;
#pragma unroll
          for (int o = BN / 2; o > 0; o >>= 1) q += __shfl_xor_sync(gmask, q, o);
          if (r == 0) nio.ssp[(size_t)tile * M + m] = q;
        }
      }
    }
    if (next >= NTILE) break;
    __syncthreads();  // the reduction area is rewritten by the next tile
    tile = next;
  }
}

// A folded norm's row scale after a split K (see NORM in qmm_kernel): the sums of squares of
// the K-slices ss [S, M] over the row length K.
struct QmmNormSums {
  const float* ss;
  int K;
  float eps;
  __device__ __forceinline__ float scale(const int m, const int S, const int M) const {
    float q = 0.f;
    for (int s = 0; s < S; ++s) q += ss[s * M + m];
    return rsqrtf(q / (float)K + eps);
  }
};

// Four consecutive partials (16 bytes of fp32 or 8 of fp16; p 16- or 8-byte aligned).
template <typename P>
__device__ __forceinline__ float4 qmm_part4(const P* p) {
  if constexpr (sizeof(P) == 4) {
    return *reinterpret_cast<const float4*>(p);
  } else {
    const uint2 u = *reinterpret_cast<const uint2*>(p);
    const float2 a = qmm_to_float2(u.x, is_bf16<P>::value), b = qmm_to_float2(u.y, is_bf16<P>::value);
    return make_float4(a.x, a.y, b.x, b.y);
  }
}

// v[0..7] += the 8 consecutive partials at p (16-byte aligned for fp32, 8 for fp16).
template <typename P>
__device__ __forceinline__ void qmm_add_parts8(float (&v)[8], const P* p) {
  const float4 a = qmm_part4(p), b = qmm_part4(p + 4);
  v[0] += a.x; v[1] += a.y; v[2] += a.z; v[3] += a.w;
  v[4] += b.x; v[5] += b.y; v[6] += b.z; v[7] += b.w;
}

// v[0..7] += the 8 activations of one 16-byte granule g.
template <typename T>
__device__ __forceinline__ void qmm_add8(float (&v)[8], const uint4 g) {
  const uint32_t u[4] = {g.x, g.y, g.z, g.w};
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const float2 f = qmm_to_float2(u[q], is_bf16<T>::value);
    v[2 * q] += f.x;
    v[2 * q + 1] += f.y;
  }
}

// y[m, n] = sum_s part[s, m, n] (* the norm's row scale) (+ bias[n]) (+ res[m, n]), cast to the
// activation dtype. P: the partials' type (float, or fp16 with BB_QMM_PART16). V: elements a
// thread, 1 or 8 (N % 8 == 0: a granule of 8 never crosses a row; 16-byte stores, and 16- or
// 32-byte loads a K-slice), the same sums in the same order either way.
template <typename T, bool HAS_BIAS, bool HAS_RES, bool NORM, int V, typename P>
__device__ __forceinline__ void qmm_reduce(const P* __restrict__ part,
                                           const T* __restrict__ lbias,
                                           const T* __restrict__ res, T* __restrict__ y,
                                           const int S, const int M, const int N, const QmmNormSums ns) {
  if constexpr (V == 1) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= M * N) return;
    float v = 0.f;
    for (int s = 0; s < S; ++s) v += qmm_float<P>(part[(size_t)s * M * N + i]);
    if constexpr (NORM) v *= ns.scale(i / N, S, M);
    if constexpr (HAS_BIAS) v += qmm_float<T>(lbias[i % N]);
    if constexpr (HAS_RES) v += qmm_float<T>(res[i]);
    y[i] = qmm_cast<T, T>(v);
  } else {
    static_assert(V == 8, "qmm_reduce: 1 or 8 elements a thread");
    const int gi = blockIdx.x * blockDim.x + threadIdx.x;  // the granule of 8
    if (gi >= M * N / 8) return;
    const size_t i = (size_t)gi * 8;
    float v[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int s = 0; s < S; ++s) qmm_add_parts8(v, part + (size_t)s * M * N + i);
    if constexpr (NORM) {
      const float r = ns.scale((int)(i / N), S, M);
#pragma unroll
      for (int j = 0; j < 8; ++j) v[j] *= r;
    }
    if constexpr (HAS_BIAS) qmm_add8<T>(v, reinterpret_cast<const uint4*>(lbias)[(i % N) / 8]);
    if constexpr (HAS_RES) qmm_add8<T>(v, reinterpret_cast<const uint4*>(res)[gi]);
    reinterpret_cast<uint4*>(y)[gi] = make_uint4(qmm_pack2<T>(v[0], v[1]), qmm_pack2<T>(v[2], v[3]),
                                                 qmm_pack2<T>(v[4], v[5]), qmm_pack2<T>(v[6], v[7]));
  }
}

// qmm_reduce (same sums, same order, same y) for one row m = blockIdx.x a block, and also
// yn = rms_norm(y) * nw of that row for the next layer that normalizes it (qmm_norm8 on y as
// rounded to T), so that layer needs no rms_norm launch of its own. NG granules of 8 a thread.
template <typename T, bool HAS_BIAS, bool HAS_RES, int NG, typename P>
__device__ __forceinline__ void qmm_reduce_norm(const P* __restrict__ part,
                                                const T* __restrict__ lbias,
                                                const T* __restrict__ res, const T* __restrict__ nw,
                                                T* __restrict__ y, T* __restrict__ yn,
                                                const int S, const int M, const int N, const float eps) {
  __shared__ float wsum[32];
  const int m = blockIdx.x, tid = threadIdx.x, nt = blockDim.x, G = N / 8;
  const int lane = tid & 31, wid = tid >> 5;
  uint4 hv[NG], wv[NG];
  float ss = 0.f;
#pragma unroll
  for (int i = 0; i < NG; ++i) {
    const int gi = tid + i * nt;
    if (gi >= G) break;
    wv[i] = reinterpret_cast<const uint4*>(nw)[gi];  // in flight with the partials
    float v[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int s = 0; s < S; ++s) qmm_add_parts8(v, part + ((size_t)s * M + m) * N + 8 * gi);
    if constexpr (HAS_BIAS) qmm_add8<T>(v, reinterpret_cast<const uint4*>(lbias)[gi]);
    if constexpr (HAS_RES) qmm_add8<T>(v, reinterpret_cast<const uint4*>(res + (size_t)m * N)[gi]);
    hv[i] = make_uint4(qmm_pack2<T>(v[0], v[1]), qmm_pack2<T>(v[2], v[3]), qmm_pack2<T>(v[4], v[5]),
                       qmm_pack2<T>(v[6], v[7]));
    reinterpret_cast<uint4*>(y + (size_t)m * N)[gi] = hv[i];
    ss += qmm_sumsq8<T>(hv[i]);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  if (lane == 0) wsum[wid] = ss;
  __syncthreads();
  if (wid == 0) {
    float t = lane < (nt >> 5) ? wsum[lane] : 0.f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
    if (lane == 0) wsum[0] = rsqrtf(t / (float)N + eps);
  }
  __syncthreads();
  const float rs = wsum[0];
#pragma unroll
  for (int i = 0; i < NG; ++i) {
    const int gi = tid + i * nt;
    if (gi >= G) break;
    reinterpret_cast<uint4*>(yn + (size_t)m * N)[gi] = qmm_norm8<T>(hv[i], wv[i], rs);
  }
}

// A pair epilogue after a split K: one thread per pair (rows n, n + 8 of a token), or with PV = 4
// four (rows n0..n0 + 3 and n0 + 8..n0 + 11 by two 16-byte loads a K-slice; (N / 2) % 4 == 0).
// Each pair's sums are the same, in the same order, either way.
template <typename T, bool HAS_BIAS, bool NORM, typename E, int PV, typename P>
__device__ __forceinline__ void qmm_reduce_pair(const P* __restrict__ part,
                                                const T* __restrict__ lbias, T* __restrict__ y,
                                                const int S, const int M, const int N,
                                                const QmmRope<T> rp, const QmmNormSums ns) {
  static_assert(PV == 1 || PV == 4, "qmm: one or four pairs a thread");
  if constexpr (PV == 1) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= M * (N / 2)) return;
    const int m = i / (N / 2);
    const int n = qmm_pair_row(i - m * (N / 2));
    float lo = 0.f, hi = 0.f;
    for (int s = 0; s < S; ++s) {
      lo += qmm_float<P>(part[((size_t)s * M + m) * N + n]);
      hi += qmm_float<P>(part[((size_t)s * M + m) * N + n + 8]);
    }
    if constexpr (NORM) {
      const float rs = ns.scale(m, S, M);
      lo *= rs;
      hi *= rs;
    }
    if constexpr (HAS_BIAS) {
      lo += qmm_float<T>(lbias[n]);
      hi += qmm_float<T>(lbias[n + 8]);
    }
    E::template store<T>(lo, hi, n, m, M, N, rp, y, E::template prep<T>(n, m, rp));
  } else {
    const int j0 = 4 * (blockIdx.x * blockDim.x + threadIdx.x);
    if (j0 >= M * (N / 2)) return;
    const int m = j0 / (N / 2);
    const int n0 = qmm_pair_row(j0 - m * (N / 2));  // j0 % 4 == 0: pairs j0..j0 + 3 are rows n0..n0 + 3
    float lo[4] = {0.f, 0.f, 0.f, 0.f}, hi[4] = {0.f, 0.f, 0.f, 0.f};
    for (int s = 0; s < S; ++s) {
      const P* p = part + ((size_t)s * M + m) * N + n0;
      const float4 a = qmm_part4(p), b = qmm_part4(p + 8);
      lo[0] += a.x; lo[1] += a.y; lo[2] += a.z; lo[3] += a.w;
      hi[0] += b.x; hi[1] += b.y; hi[2] += b.z; hi[3] += b.w;
    }
    const float rs = NORM ? ns.scale(m, S, M) : 1.f;
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int n = n0 + u;
      if constexpr (NORM) {
        lo[u] *= rs;
        hi[u] *= rs;
      }
      if constexpr (HAS_BIAS) {
        lo[u] += qmm_float<T>(lbias[n]);
        hi[u] += qmm_float<T>(lbias[n + 8]);
      }
      E::template store<T>(lo[u], hi[u], n, m, M, N, rp, y, E::template prep<T>(n, m, rp));
    }
  }
}

}  // namespace bbqmm

#endif  // BB_QMM_HEADER
"""
# x copied unchanged is staged by cp.async; BB_QMM_X_ASYNC=0 stages all x through registers
# (A/B runs).
X_ASYNC = env_choice("BB_QMM_X_ASYNC", "1", ON_OFF) == "1"
# The fused RMSNorm's two variants (template parameters, chosen per launch by `norm_variant`):
# BB_QMM_NORM_PASS, its sums of squares in one pass over the staged rows instead of a warp
# reduction per granule inside the staging loop; BB_QMM_NW_EARLY, its weights loaded before the
# x staging. auto: where the H200 measured them faster (`norm_variant`); 0 / 1: nowhere / everywhere.
NORM_PASS = env_choice("BB_QMM_NORM_PASS", "auto", ("auto", "0", "1"))
NW_EARLY = env_choice("BB_QMM_NW_EARLY", "auto", ("auto", "0", "1"))
NORM_PASS_ROWS = 4  # auto: the pass from this many rows of x on
# Each tile's epilogue operands (bias, residual, RoPE angle and cache cell of a thread's first
# output) load before the tile's main loop instead of after its reduction (BB_QMM_EPI_PRE=0: after).
# H200 decode step, two runs each way (results/h200-2026-11-29-s18/call6): kernel time B=1
# 1.961-1.963 -> 1.944-1.947 ms (q/k/v 9.9-10.0 -> 9.7 us, down 19.2 -> 19.0, o 6.2 -> 6.1),
# B=8 2.548-2.563 -> 2.524-2.527 (q/k/v 15.5-15.6 -> 14.7).
EPI_PRE = env_choice("BB_QMM_EPI_PRE", "1", ON_OFF) == "1"


def norm_variant(m: int, glu_pair: bool) -> tuple[bool, bool]:
    """(sums in a pass, weights early) for a fused RMSNorm at M = m.

    H200, 7B decode step without attention, per kernel (results/h200-2026-11-29-s15/call4):
    the pass wins at M=8 (gate/up 38.8 -> 37.8 us, q/k/v 17.2 -> 15.7 with the weights early),
    is even at M=4 and loses at M=1 (30.6 -> 31.3, 10.5 -> 11.2). The weights early win from
    M=2 (M=2: 32.9 -> 32.3, 11.7 -> 11.2) and for q/k/v at M=1 (10.5 -> 10.0), but the gate/up
    pair at M=1 with its sums in the staging loop went 30.6 -> 34.1 us."""
    npass = NORM_PASS == "1" or (NORM_PASS == "auto" and m >= NORM_PASS_ROWS)
    early = NW_EARLY == "1" or (NW_EARLY == "auto" and not (m == 1 and glu_pair and not npass))
    return npass, early


# MLX hashes the source on every launch: compacted. The RoPE epilogue uses bbrope::rotate.
QMM_HEADER = ROPE_HEADER + ("" if X_ASYNC else "#define BB_QMM_X_ASYNC 0\n") + kspec.compact(QMM_HEADER)

_SRC_MAIN = (
    "bbqmm::qmm_kernel<T, BITS, GS, MT, WN, WK, P, NS, WF, PRE, SPLIT, {has_bias}, {has_res}, {glu}, {norm}, DQ, EPRE,"
    " {nout}, {npre}, SBP, WP, {pair_t}>(x, w, scales, biases, {lbias}, {res}, {nw}, {eps}, y, {ss}, x_shape[0], w_shape[0],"
    " w_shape[1] * 32 / BITS, {rope}, {nio});"
)
_SRC_REDUCE = (
    "bbqmm::qmm_reduce<T, {has_bias}, {has_res}, {norm}, V>"
    "(part, {lbias}, {res}, y, part_shape[0], part_shape[1], part_shape[2], {sums});"
)
_SRC_REDUCE_NORM = (
    "bbqmm::qmm_reduce_norm<T, {has_bias}, {has_res}, NG>"
    "(part, {lbias}, {res}, nw, y, yn, part_shape[0], part_shape[1], part_shape[2], __int_as_float(EPS_BITS));"
)
_SRC_REDUCE_PAIR = (
    "bbqmm::qmm_reduce_pair<T, {has_bias}, {norm}, {pair_t}, PV>"
    "(part, {lbias}, y, part_shape[0], part_shape[1], part_shape[2], {rope}, {sums});"
)
# A folded norm's sums after a split K: the main kernel's second output, the row length, eps.
_NORM_SUMS_ARG = "bbqmm::QmmNormSums{ss, NK, __int_as_float(EPS_BITS)}"
# Pair epilogues (rows n and n + 8 of a tile stored together): "rope" (RoPE and the K/V write
# of the q/k/v projection, RopeStore) and "glu" (silu(gate) * up of the gate/up projection).
_PAIR_TYPES = {"": "bbqmm::QmmPlain", "rope": "bbqmm::QmmRopeCfg<RD, HQ, HKV, TRAD>",
               "glu": "bbqmm::QmmGluPair"}
# The RoPE epilogue's inputs: positions and cells [M] int32, the layer's K and V cache buffers
# (written in place through a const_cast, as bbrope's storing kernel does).
_ROPE_INPUTS = ("pos", "cells", "kc", "vc")
_ROPE_ARG = ("bbqmm::QmmRope<T>{pos, cells, const_cast<T*>(kc), const_cast<T*>(vc), (int)kc_shape[2],"
             " __int_as_float(LOG2_BASE_BITS), __int_as_float(SCALE_BITS)}")


def _pair_args(pair: str) -> dict[str, str]:
    return dict(pair_t=_PAIR_TYPES[pair], rope=_ROPE_ARG if pair == "rope" else "bbqmm::QmmRope<T>{}")


def _epilogue(has_bias: bool, has_res: bool) -> dict[str, str]:
    return dict(
        has_bias="true" if has_bias else "false", lbias="lbias" if has_bias else "(const T*)nullptr",
        has_res="true" if has_res else "false", res="res" if has_res else "(const T*)nullptr",
    )


def _suffix(has_bias: bool, has_res: bool, glu: bool = False, norm: bool = False, pair: str = "") -> str:
    return ("_b" if has_bias else "") + ("_r" if has_res else "") + ("_g" if glu else "") + (
        "_n" if norm else "") + (f"_{pair}" if pair else "")


def _main_spec(has_bias: bool, has_res: bool = False, glu: bool = False, norm: bool = False,
               pair: str = "", fold: bool = False, nout: bool = False, npre: bool = False) -> KernelSpec:
    """fold: the norm over a split K (its sums of squares are a second output, "ss"). nout: also
    y * nw2 ("yw") and each tile's sums of squares ("ssp") for the next launch; npre: x is such
    a y * nw, scaled by the rows' scales from the producer's sums ("pss") (see QmmNormIO)."""
    names = ("x", "w", "scales", "biases") + (("lbias",) if has_bias else ()) + (
        ("res",) if has_res else ()) + (("nw",) if norm else ()) + (_ROPE_INPUTS if pair == "rope" else ()) + (
        ("nw2",) if nout else ()) + (("pss",) if npre else ())
    nio = ("bbqmm::QmmNormIO<T>{" + ("nw2, yw, ssp" if nout else "nullptr, nullptr, nullptr")
           + (", pss, (int)pss_shape[0]}" if npre else ", nullptr, 0}"))
    src = _SRC_MAIN.format(
        glu="true" if glu else "false", norm="true, NPASS, NEARLY" if norm else "false, false, false",
        nw="nw" if norm else "(const T*)nullptr",
        eps="__int_as_float(EPS_BITS)" if norm or npre else "0.f",
        ss="ss" if fold else "(float*)nullptr", nout="true" if nout else "false", npre="true" if npre else "false",
        nio=nio, **_pair_args(pair), **_epilogue(has_bias, has_res),
    )
    name = "bb_qmm" + _suffix(has_bias, has_res, glu, norm, pair) + ("f" if fold else "") + (
        "_no" if nout else "") + ("_np" if npre else "")
    outs = ("y",) + (("ss",) if fold else ()) + (("yw", "ssp") if nout else ())
    return KernelSpec("cuda", name, names, outs, src, QMM_HEADER)


def _reduce_spec(has_bias: bool, has_res: bool = False, pair: str = "", norm: bool = False) -> KernelSpec:
    """norm: the summed partials are scaled by a folded norm's row scale (QmmNormSums)."""
    head = ("part",) + (("ss",) if norm else ())
    fmt = dict(norm="true" if norm else "false",
               sums=_NORM_SUMS_ARG if norm else "bbqmm::QmmNormSums{nullptr, 1, 0.f}")
    if pair:
        names = head + (("lbias",) if has_bias else ()) + (_ROPE_INPUTS if pair == "rope" else ())
        src = _SRC_REDUCE_PAIR.format(**_pair_args(pair), **_epilogue(has_bias, False), **fmt)
        return KernelSpec("cuda", "bb_qmm_red" + _suffix(has_bias, False, norm=norm, pair=pair), names, ("y",),
                          src, QMM_HEADER)
    names = head + (("lbias",) if has_bias else ()) + (("res",) if has_res else ())
    src = _SRC_REDUCE.format(**_epilogue(has_bias, has_res), **fmt)
    return KernelSpec("cuda", "bb_qmm_red" + _suffix(has_bias, has_res, norm=norm), names, ("y",), src,
                      QMM_HEADER)


def _reduce_norm_spec(has_bias: bool, has_res: bool) -> KernelSpec:
    """The reduce that also writes the row's RMSNorm for the next layer (`qmm_reduce_norm`)."""
    names = ("part",) + (("lbias",) if has_bias else ()) + (("res",) if has_res else ()) + ("nw",)
    src = _SRC_REDUCE_NORM.format(**_epilogue(has_bias, has_res))
    return KernelSpec("cuda", "bb_qmm_redn" + _suffix(has_bias, has_res), names, ("y", "yn"), src, QMM_HEADER)


def chunk_k(bits: int) -> int:
    """k of one chunk: a warp's 16 rows x 4 lanes x 16 bytes (128 at 4 bits, 64 at 8)."""
    return 128 if bits == 4 else 64


@dataclass(frozen=True)
class QmmConfig:
    """Launch geometry of one (M, N, K, bits) class; see `choose_config`."""

    mt: int  # token tiles of 8
    wn: int  # warps along N (16 features each)
    wk: int  # warps along K
    p: int  # chunks in flight per warp
    s: int  # K-slices over blocks (> 1: fp32 partials + reduce kernel)
    mrows: int  # x rows allocated in smem (power of two >= M)
    blocks: int = 0  # blocks along N per K-slice, each walking every blocks-th tile (0: one per tile)
    ns: int = 0  # ring slots per warp (cp.async pipeline in shared memory); 0: register stages
    wf: int = 1  # 16-row feature tiles per warp (2 needs the ring)
    pre: bool = False  # register stages: both in flight before the x staging and each next tile (see _preload)

    def xbytes(self, k: int, bits: int) -> int:
        """Shared memory of the staged x slice."""
        return self.mrows * (self.slice_chunks(k, bits) * chunk_k(bits) + (16 if bits == 4 else 8)) * 2

    def slice_chunks(self, k: int, bits: int) -> int:
        """Chunks of the longest K-slice."""
        return -(-(k // chunk_k(bits)) // self.s)

    def tiles(self, n: int) -> int:
        """Feature tiles of one block (16 * wn * wf rows each)."""
        return n // (16 * self.wn * self.wf)

    def smem(self, k: int, bits: int) -> int:
        """x slice and reduction area side by side (a block reduces one tile while x stays),
        then the warps' rings (slots of 1 KiB of weights and up to 256 bytes of scales)."""
        return (self.xbytes(k, bits) + self.wk * 8 * self.mt * (16 * self.wn * self.wf + 4) * 4
                + self.wn * self.wk * self.ns * self.wf * RING_SLOT)

    def launch_smem(self, k: int, bits: int, extra: int = 0) -> int:
        """Dynamic shared memory of the launch: smem (+ extra bytes, e.g. the bias sums of
        DQ = 2) rounded up to SMEM_STEP (kernels of one config then share a compiled kernel
        across shapes; the size is in its name)."""
        return -(-(self.smem(k, bits) + extra) // SMEM_STEP) * SMEM_STEP

    def fold_fits(self, k: int, bits: int) -> bool:
        """A norm folded over this split K fits: its per-segment sums (8 granules of x each) of
        the longest K-slice fit the reduction area it borrows (qmm_norm_slice)."""
        return self.slice_chunks(k, bits) * chunk_k(bits) // 64 <= self.wk * (16 * self.wn * self.wf + 4)

    def grid_blocks(self, n: int) -> int:
        tiles = self.tiles(n)
        return tiles if self.blocks <= 0 else min(tiles, self.blocks)


def sm_count() -> int:
    """Streaming multiprocessors of the GPU (MLX does not report it): BATCHBENCH_SMS, else
    by device name, else 132 (H100/H200). Only sizes the persistent grid; any value is correct."""
    if os.environ.get("BATCHBENCH_SMS"):
        return max(1, env_number("BATCHBENCH_SMS", 1))
    try:
        name = str(mx.device_info().get("device_name", ""))
    except Exception:  # noqa: BLE001 - older MLX
        name = ""
    for key, sms in (("H200", 132), ("H100", 132), ("H800", 132), ("A100", 108), ("A800", 108),
                     ("L40", 142), ("4090", 128), ("L4", 58), ("A10", 72)):
        if key in name:
            return sms
    return 132


# Shared memory a block may take, by compute capability (CUDA's opt-in maximum per block).
_SMEM_BY_ARCH = {"sm_75": 64, "sm_80": 163, "sm_86": 99, "sm_87": 163, "sm_89": 99, "sm_90": 227,
                 "sm_100": 227, "sm_120": 99}
_STATIC_SMEM = 3 * 1024  # the kernel's static shared arrays (norm sums, row scales) at most


def smem_per_block() -> int:
    """Bytes of shared memory one block of this GPU may take: BATCHBENCH_SMEM_KB, else by the
    architecture MLX reports (99 KB for one not in the table), else 227 KB (the H100/H200 the
    configs were tuned on). A 4-bit matmul whose config needs more runs mx.quantized_matmul."""
    if os.environ.get("BATCHBENCH_SMEM_KB"):
        return max(1, env_number("BATCHBENCH_SMEM_KB", 1)) * 1024
    arch = _device_arch()
    return (_SMEM_BY_ARCH.get(arch, 99) if arch else 227) * 1024


@functools.lru_cache(maxsize=1)
def _device_arch() -> str:
    """The GPU's architecture as MLX reports it (asked once: every matmul call checks its fit)."""
    try:
        return str(mx.device_info().get("architecture", ""))
    except Exception:  # noqa: BLE001 - older MLX
        return ""


def fits_device(cfg: "QmmConfig", k: int, bits: int, extra: int = 0) -> bool:
    """A launch of cfg (+ extra bytes) fits a block's shared memory on this GPU."""
    return cfg.launch_smem(k, bits, extra) + _STATIC_SMEM <= smem_per_block()


_NOTED_TOO_BIG: set[tuple] = set()  # shapes whose launch did not fit, said once on stderr


def _note_once(key: tuple, msg: str) -> None:
    """A launch that does not fit this GPU says so on stderr once a shape."""
    if key not in _NOTED_TOO_BIG:
        _NOTED_TOO_BIG.add(key)
        print(f"note: {msg}", file=sys.stderr)


# Persistent blocks (each walks several feature tiles, staging x once): on by default,
# BB_QMM_PERSIST=0 launches one block per tile as before (A/B runs).
PERSIST = env_choice("BB_QMM_PERSIST", "1", ON_OFF) == "1"
FUSE_NORM = env_choice("BB_QMM_FUSE_NORM", "1", ON_OFF) == "1"
# The norm folded over a split K (BB_QMM_NORM_SPLIT=1) measured slower than its separate launch:
# H200 decode step without attention, two runs each way (results/h200-2026-11-30-s19/call2):
# B=16 3.395-3.402 -> 3.588-3.593 ms, B=32 3.819 -> 4.047-4.052 (q/k/v at M=32 14.4 -> 20.7 us,
# gate/up 47.5 -> 54.4, their reduces +1.2-1.6 each, against 2 x 3.5 us of rms_norm saved); with
# qmm_norm_slice's passes (call11) B=32 3.798-3.803 -> 4.153-4.156 (q/k/v 18.3, gate/up 60.7).
NORM_SPLIT = env_choice("BB_QMM_NORM_SPLIT", "0", ON_OFF) == "1"
# Where a 4-bit matmul with a residual splits K (o_proj at M > 8, down_proj at M > 2 on the 7B
# shape) and the next layer normalizes its output, the reduce kernel writes that RMSNorm too
# (qmm_reduce_norm, linear_norm): no separate rms_norm launch at M > 8, and at M <= 8 the next
# q/k/v matmul runs without its fused norm. BB_QMM_NORM_OUT=0: neither (A/B runs).
NORM_OUT = env_choice("BB_QMM_NORM_OUT", "1", ON_OFF) == "1"
# The same where such a matmul runs on one K-slice (o_proj at M <= 8, down_proj at M <= 2 on the
# 7B shape): a row spans many blocks, so its epilogue writes y * nw and each tile's sums of
# squares, and the next matmul (one K-slice too) scales its sums by the rows' rsqrt instead of
# normalizing x in its prologue (PendingNorm; NOUT / NPRE in qmm_kernel). H200 decode step,
# kernel time, two runs each way (results/h200-2026-11-30-s21/call6): B=1 1.937-1.941 -> 1.895-1.898
# ms, B=2 2.070-2.076 -> 2.037-2.041, B=4 2.139-2.145 -> 2.099-2.104, B=8 2.305-2.306 ->
# 2.233-2.236 (gate/up at M=1 30.7 -> 29.8 us, q/k/v 9.3 -> 8.3; o_proj and down +0.2-0.3).
# BB_QMM_NORM_PRE=0: the norm fused in the consumer's prologue as before (A/B runs).
NORM_PRE = env_choice("BB_QMM_NORM_PRE", "1", ON_OFF) == "1"
# Pair epilogues on CUDA (fuse_quantized_projections orders the rows for them): RoPE and the
# K/V write in the q/k/v projection (project_rope_store), silu(gate) * up in the gate/up
# projection (FusedQuantizedLinear.glu). BB_QMM_ROPE=0 / BB_QMM_GLU_PAIR=0 keep the separate
# RoPE kernel / the gate product in the down projection's x staging (A/B runs).
FUSE_ROPE = env_choice("BB_QMM_ROPE", "1", ON_OFF) == "1"
GLU_PAIR = env_choice("BB_QMM_GLU_PAIR", "1", ON_OFF) == "1"
# fp16 4-bit dequantization: "lop3" (AND-OR extraction of {k, k + 4} pairs, x staged reordered)
# where `_lop3` finds it faster, or "prmt" (byte permutes of adjacent pairs) everywhere.
# "lop3b": lop3, and at one token the weights without their bias (two instructions a pair of
# weights instead of three; the bias times x's 32-k sums added in fp32: `_bias_sums_fit`).
# Much slower on the H200 although nvcc's main loop is shorter and spills nothing (s22/call2,
# two runs each way): B=1 decode step 1.887-1.888 -> 2.232-2.236 ms (down 19.2 -> 24.7 us,
# q/k/v 8.2 -> 12.1, gate/up 29.6 -> 32.8). Cause not found; kept as an off switch.
# "sub" (the default): lop3, and where the caller knows every scale is below SUB_SCALE_LIMIT in
# magnitude (the swapped layers check once: `scale_max`) and the scales come packed, two
# instructions a pair of weights with the bias kept (qmm_dq4_sub: the codes read as fp16
# subnormals, no magic to subtract). H200 decode step, two runs each way (s27/call4): B=2
# 1.790-1.792 -> 1.771-1.773 ms, B=8 2.162-2.165 -> 2.107-2.109, B=32 3.468-3.475 -> 3.387-3.391.
DQ_MODE = env_choice("BB_QMM_DQ", "sub", ("lop3", "prmt", "lop3b", "sub"))
SUB_SCALE_LIMIT = 2.0  # s * 2^15 must stay finite in fp16
DEQUANT_LOP3 = DQ_MODE != "prmt"
SMEM_PER_SM = 227 * 1024
# Ring pipeline (QmmConfig.ns): BB_QMM_RING=n gives every covered call n slots per warp.
RING = env_number("BB_QMM_RING", 0)
# ... else the ring where the H200 measured it faster (choose_config); BB_QMM_RING_WIDE=0: not for
# the wide matrices (the narrow ones at M = 17-32 keep it with the repacked weights)
RING_WIDE = env_choice("BB_QMM_RING_WIDE", "1", ON_OFF) == "1"
RING_SLOT = 1024 + 32 * 8  # bytes: weights of one chunk, scales and biases (<= 8 bytes a row)


def ring_ok(bits: int, group_size: int) -> bool:
    """The ring copies a row's scales of one chunk in one 4- to 16-byte cp.async: the chunk
    (128 k at 4 bits, 64 at 8) must hold at least two whole groups."""
    ck = chunk_k(bits)
    return ck % group_size == 0 and ck // group_size >= 2


def _resident_blocks(cfg: QmmConfig, k: int, bits: int) -> int:
    """Blocks that fit on the GPU at once: registers (64K per SM) and shared memory. nvcc
    sm_90a counts ~76 registers per thread with one chunk per stage and one token tile, 114-128
    with two (two 256-thread blocks). Four token tiles take 166, which leaves one block per
    SM, not the two assumed here: Nsight Compute saw one (results/h200-2026-11-29-s5/run2-ncu.txt,
    M=32, 133 registers then); BB_QMM_ONE_WAVE (below) sizes those grids for one."""
    per_sm = 3 if (cfg.mt == 1 and (cfg.p == 1 or cfg.ns)) else 2  # the ring: ~72 registers at mt=1
    if _one_wave(cfg):
        per_sm = 1
    per_sm = max(1, per_sm * 256 // (32 * cfg.wn * cfg.wk))  # the estimates are for 256 threads
    per_sm = max(1, min(per_sm, SMEM_PER_SM // (cfg.smem(k, bits) + 1024)))
    return per_sm * sm_count()


# Persistent grids in one wave (BB_QMM_ONE_WAVE, default 2; 0 restores the old grids for A/B):
# - 1: four or more token tiles without the ring (M = 17-64: q/k/v, o_proj, down_proj) take
#   150-175 registers (nvcc sm_90a), so one 256-thread block fits an SM, not the two assumed
#   above: their grids are sized for one. And the blocks per K-slice are rounded down, so that
#   S slices never ask for more blocks than fit (rounded up, down at M=16 asks for 7 x 38 = 266
#   of 264).
# - 2: as 1, and those register-heavy matmuls pick their K-slices for the least work on the
#   busiest block (tiles it walks x chunks per slice) instead of the smallest x slice under
#   SMEM_BUDGET, which assumed two blocks per SM: down at M=32 9 slices of 14 blocks, at most
#   4 tiles x 17 chunks, against 14 x 9 at most 7 x 11.
# H200, 7B decode step without attention at B=32 (results/h200-2026-11-29-s14/call2, one call):
# kernel time 4.197 ms (0) -> 3.926 (1) -> 3.806 (2); down at M=32 41.4 -> 37.1 -> 32.9 us,
# q/k/v and o 14.9 -> 12.4-12.5 us; B=1 and B=8 unchanged (no matmul there has four tiles).
ONE_WAVE = int(env_choice("BB_QMM_ONE_WAVE", "2", ("0", "1", "2")))


def _one_wave(cfg: QmmConfig) -> bool:
    """Register-heavy: sized for one block per SM under BB_QMM_ONE_WAVE."""
    return ONE_WAVE > 0 and cfg.mt >= 4 and cfg.ns == 0


def _one_block_fits(cfg: QmmConfig, k: int, bits: int) -> bool:
    """cfg's shared memory fits an SM (one block), in the launcher's allocation steps."""
    return cfg.smem(k, bits) <= SMEM_PER_SM - SMEM_STEP


def _balanced_slices(cfg: QmmConfig, n: int, k: int, bits: int) -> QmmConfig:
    """cfg (split over K) with the number of K-slices (2 or more) whose one-wave grid gives the
    busiest block the fewest tiles x chunks, its shared memory fitting one block per SM; ties
    to fewer slices (fewer fp32 partials)."""
    nch = k // chunk_k(bits)
    tiles = cfg.tiles(n)
    best, best_work = cfg, None
    for s in range(2, nch + 1):
        c = replace(cfg, s=s)
        if not _one_block_fits(c, k, bits):
            continue
        blocks = _resident_blocks(c, k, bits) // s  # what persistent() gives each slice
        if blocks < 1:
            break
        work = -(-tiles // min(blocks, tiles)) * -(-nch // s)
        if best_work is None or work < best_work:
            best, best_work = c, work
    return best


def persistent(cfg: QmmConfig, k: int, bits: int) -> QmmConfig:
    """cfg with the persistent grid: the blocks resident on the GPU, shared over its K-slices."""
    resident = _resident_blocks(cfg, k, bits)
    if ONE_WAVE:
        return replace(cfg, blocks=max(1, resident // cfg.s))
    return replace(cfg, blocks=-(-resident // cfg.s))


# mt -> (wn, wk, p). p chunks per load stage, two stages in flight: p=2 keeps the registers
# of the single-stage p=4 kernel (~105 per thread, two 256-thread blocks per SM).
_TILES = {1: (1, 8, 2), 2: (2, 4, 2), 4: (4, 2, 2), 8: (4, 2, 1)}
# Wide matrices (gate/up, lm_head) with several tokens: more features per block share the
# staged x (H200 sweep, results/h200-2026-11-29-s2/qmm-tune-v1.json: M=8 lm_head 249 -> 198 us,
# M=32 gate/up 113 -> 104 us).
_WIDE_N = 16384
_WIDE_TILES = {1: (4, 2, 2), 2: (4, 2, 2), 4: (8, 1, 2), 8: (8, 1, 1)}
# The vocabulary projection takes them at one token too: 2376 four-tile blocks share out as 9
# per persistent block and each warp walks 14 chunks a tile instead of 3.5 (H200 decode step,
# results/h200-2026-11-29-s17/call6, two runs each: lm_head 102.1-102.5 -> 97.2-97.3 us; two
# warps along N 111 us). gate/up (2368 tiles) keeps one warp along N at M=1: in fours its tiles
# would fall 2.24 to a block.
_VOCAB_N = 65536
_RING_SPLIT_K_N = 65536  # the ring's wide matrices below this width take warps along K (choose_config)
LONG_K_CHUNKS = 12  # chunks per warp above which K is split over two blocks (down_proj, M=1)
# BB_QMM_LONG_K_SPLIT=0: keep one K-slice there (one launch less per layer: no reduce kernel)
LONG_K_SPLIT = env_choice("BB_QMM_LONG_K_SPLIT", "1", ON_OFF) == "1"
# One token tile on register stages and one K-slice: with 8 warps along K and K = 3584 (28 chunks)
# half the warps take 4 chunks and half 3, and all wait for the slowest at each tile's barrier.
# BB_QMM_WK_DIVIDE=1 takes the most warps along K, down to 3/4 of them, that divide the chunks
# (7 at K = 3584: the gate/up pair at M=1, o_proj at M = 1-8, q/k/v at M = 2-8; 6 at K = 1536).
# H200 decode step (results/h200-2026-11-30-s22/call2, two runs each way): o_proj gained at
# every M (M = 1 / 2 / 8: 6.5 -> 6.2, 7.1 -> 6.9, 7.8-7.9 -> 7.7 us), q/k/v at M=8 (10.2 ->
# 9.9) but not at M=2 (9.6 -> 9.7), and the gate/up pair at M=1 lost (29.6 -> 30.3).
# Default `narrow`: only matrices narrower than _WIDE_N (o_proj, q/k/v). Decode step, kernel
# time at B = 1 / 2 / 4 / 8 (s22/call5, two runs each way): 1.900-1.896 / 2.045-2.040 /
# 2.099-2.100 / 2.236-2.242 -> 1.889 / 2.040-2.031 / 2.092-2.091 / 2.216-2.224 ms.
WK_DIVIDE = env_choice("BB_QMM_WK_DIVIDE", "narrow", ON_OFF + ("narrow",))
# The pair reduce after a split K (the gate/up pair and q/k/v with RoPE at M > 8: 5.7 and 3.3 us
# at M=32) reads two 4-byte partials a thread and K-slice; BB_QMM_RED_VEC=1: four pairs a thread
# by two 16-byte loads (the same sums in the same order). Slower on the H200 (s22/call3, two runs
# each way, decode step kernel time): B=16 3.194-3.195 -> 3.216-3.217 ms, B=32 3.585-3.587 ->
# 3.607-3.613. The gate product's reduce gained (M = 16 / 32: 3.2 -> 2.8, 5.8 -> 4.7 us), the
# RoPE pair's lost more (2.6 -> 3.6, 3.3 -> 4.5). Default `glu`: the gate product's only;
# decode step, kernel time (s23/call2, two runs each way): B=16 3.212 -> 3.200-3.202 ms, B=32
# 3.603 -> 3.554-3.581.
RED_VEC = env_choice("BB_QMM_RED_VEC", "glu", ON_OFF + ("glu",))
# The plain reduce (no pair epilogue: lm_head's, and any reduce that does not write the next
# norm) takes 8 elements a thread where N % 8 == 0, with 16-byte stores: lm_head's at M=32 22.5
# -> 8.1 us, the B=32 decode step 3.042-3.044 -> 3.027 ms (H200, results/h200-2026-11-30-s30/
# call5). 1: one a thread, the A/B's baseline (scripts/h200_qmm.py's QMM_RED_PLAIN_VEC).
PLAIN_RED_VEC = 8
# The register-stage kernels load a row's scale and bias of a chunk as two 2-byte loads from two
# arrays: the quad's 4 lanes touch two L2 sectors for 8 + 8 useful bytes (ncu, the gate/up pair
# at M=1: 4.36 M L2 sectors against 2.77 M ideal, results/h200-2026-11-30-s21/call4).
# BB_QMM_SB_PACK=1: each swapped or fused layer also keeps its scales and biases packed as
# (scale, bias) pairs (`pack_scales_biases`: 25% of the 4-bit weights' bytes more at groups of
# 32, beside the two arrays, which the twins and prefill read), and those kernels take one
# 4-byte load a row and chunk (the ring: one sector a row instead of two, the same copies).
# On by default: decode step, kernel time (s23/call2, two runs each way): B = 1 / 2 / 8 / 32
# 1.900 / 2.042-2.046 / 2.202-2.206 / 3.588-3.613 -> 1.869-1.871 / 2.028-2.030 / 2.186-2.187 /
# 3.492-3.494 ms. BB_QMM_SB_PACK=0 saves the packed copy's memory. At M = 1, 2, 8, 32 every
# matmul gained but q/k/v with its RoPE epilogue on one K-slice (M <= 8 in the 7B shape: 8.3
# -> 8.6-8.7 us at M=1, 9.9 -> 10.3 at M=8). Default `norope`: the layers keep the pairs but
# those calls read the two arrays. 1 -> norope (s23/call9, two runs each way): B=1 1.851-1.856 -> 1.839-1.846 ms, B=8
# 2.172 -> 2.157-2.163 (q/k/v 8.6 -> 8.2-8.3 us at M=1, 10.4 -> 9.9 at M=8).
SB_PACK = env_choice("BB_QMM_SB_PACK", "norope", ON_OFF + ("norope",))


def packs_scales() -> bool:
    """The swaps keep packed scales and biases (BB_QMM_SB_PACK, read only by the CUDA kernels)."""
    return SB_PACK != "0" and backend.BACKEND == "cuda"


def packed_bytes(model: nn.Module) -> int:
    """What the swaps' extra copies add to `model`: each quantized linear's scales and biases again
    (BB_QMM_SB_PACK's pairs) and, with BB_QMM_WPACK, its weights again."""
    layers = [m for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear) and m.get("biases") is not None]
    return (sum(m["scales"].nbytes + m["biases"].nbytes for m in layers) if packs_scales() else 0) + \
        (sum(m["weight"].nbytes for m in layers) if packs_weights() else 0)


# BB_QMM_WPACK: the swaps on CUDA also keep each quantized linear's weights repacked for the
# fp16-activation kernel (`pack_weights`: a warp's 16-byte loads then read 512 contiguous bytes
# instead of 64 bytes of 8 rows each). The int8 kernel and prefill still read MLX's layout, so
# the weights are held twice; 0 trades the speed at M >= 2 for that memory. pairs (the default):
# the packed (scale, bias) pairs too, in place (`pack_pairs`; only that kernel reads them);
# 1: the weights alone. H200 decode step, two runs each way (results/h200-2026-11-30-s28/call4),
# 1 -> pairs: B=2 1.71 -> 1.69 ms, B=8 1.99 -> 1.96, B=32 3.27 -> 3.16.
WPACK = env_choice("BB_QMM_WPACK", "pairs", ON_OFF + ("pairs",))

# BB_QMM_PART16 (default 1): with fp16 activations a split K writes its partials in fp16 instead of
# fp32 (not under a folded norm), halving what the main kernel writes and the reduce kernel reads.
# Each partial is then rounded once to fp16 (half an ulp of the partial, about 2.4e-4 of it)
# before the fp32 sum; a partial past fp16's range (65504) turns inf even where the sum would
# fit. bf16 activations keep fp32 partials. 0: fp32 everywhere (A/B runs).
PART16 = env_choice("BB_QMM_PART16", "1", ON_OFF) == "1"


def partial_dtype(x_dtype, fold: bool = False):
    """The dtype of a split K's partials (`BB_QMM_PART16`)."""
    return mx.float16 if PART16 and x_dtype == mx.float16 and not fold else mx.float32


def packs_weights() -> bool:
    """The swaps keep repacked weights (BB_QMM_WPACK, read only by the CUDA kernels)."""
    return WPACK != "0" and backend.BACKEND == "cuda"


def pack_weights(w: mx.array, bits: int) -> mx.array:
    """MLX's [N, K * bits / 32] uint32 weights in the kernel's load order (its WP layout): per 16-row
    block and chunk (128 k at 4 bits, 64 at 8: 64 bytes a row), rows 0-7 then rows 8-15, each as
    lane 4 * (row % 8) + t holds them (bytes 16 t .. 16 t + 15 of the row's chunk). Same shape."""
    n, kw = w.shape
    if not tiles_fit(n, kw * 32 // bits, bits):
        raise ValueError(f"pack_weights: needs N % 16 == 0 and K a multiple of {chunk_k(bits)}, got {n} x {kw} words")
    nch = kw * 32 // bits // chunk_k(bits)
    return w.reshape(n // 16, 2, 8, nch, 4, 4).transpose(0, 3, 1, 2, 4, 5).reshape(n, kw)


def pairs_fit(n: int, k: int, bits: int, group_size: int) -> bool:
    """`pack_pairs` can lay out this matrix: whole tiles and chunks, whole groups in a chunk."""
    return tiles_fit(n, k, bits) and chunk_k(bits) % group_size == 0


def pack_pairs(packed: mx.array, bits: int, group_size: int) -> mx.array:
    """`pack_scales_biases`' [N, G, 2] pairs in the kernel's load order (its WP = 2 layout): per
    16-row block and chunk, the chunk's pairs of rows 0-15 in row order (a ring slot's bytes).
    Same shape; `pack_weights`' weights come with it."""
    n, ng = packed.shape[:2]
    k = ng * group_size
    if not pairs_fit(n, k, bits, group_size):
        raise ValueError(f"pack_pairs: needs N % 16 == 0, K a multiple of {chunk_k(bits)} and groups "
                         f"dividing it, got {n} x {k} in groups of {group_size}")
    cpg = chunk_k(bits) // group_size
    return packed.reshape(n // 16, 16, ng // cpg, cpg, 2).transpose(0, 2, 1, 3, 4).reshape(packed.shape)


def pack_scales_biases(scales: mx.array, biases: mx.array) -> mx.array:
    """[N, G] scales and biases as [N, G, 2] (scale, bias) pairs: one 4-byte word a group, the
    scale in its low half (the kernel's SBP)."""
    return mx.stack([scales, biases], axis=-1)


def _dividing_wk(cfg: QmmConfig, k: int, bits: int) -> QmmConfig:
    """cfg with the most warps along K (down to 3/4 of cfg.wk) that divide the chunks evenly."""
    nch = k // chunk_k(bits)
    if cfg.mt != 1 or cfg.s != 1 or cfg.ns or nch % cfg.wk == 0:
        return cfg
    for wk in range(cfg.wk - 1, (3 * cfg.wk + 3) // 4 - 1, -1):
        if nch % wk == 0:
            return replace(cfg, wk=wk)
    return cfg


def _lop3(cfg: QmmConfig, n: int, k: int) -> bool:
    """The lop3 dequantization where the H200 sweep measured it faster
    (results/h200-2026-11-29-s3/qmm-tune-dq.txt): one token tile (M=1: lm_head 152 -> 139 us,
    gate/up 40.5 -> 37.3, down 35.8 -> 30.7) and narrow matrices at M=32 (o_proj 22.2 -> 21.4);
    wide or long matrices at M=32 lose with it (gate/up 102 -> 123 us, down 63 -> 82) with the
    register stages, but win with the ring (results/h200-2026-11-29-s7, M=32: gate/up 79.9 ->
    75.2 us, lm_head 247 -> 234)."""
    return DEQUANT_LOP3 and (cfg.mt == 1 or cfg.ns > 0 or (n < _WIDE_N and k <= 8192))


def _load_depth(m: int, mt: int, n: int, k: int, p: int) -> int:
    """Chunks per load stage, two stages in flight, persistent blocks (H200 sweep,
    results/h200-2026-11-29-s3/qmm-tune.json): two chunks win at M=1 (gate/up 44.2 -> 41.2 us,
    lm_head 171 -> 153 us), and for wide or long matrices at M=32 (gate/up 126 -> 101 us,
    down 84 -> 62 us); narrow matrices at M=32 keep three (o_proj 21.5 us). The long-K down
    projection at M=1 took one chunk on the persistent grid then; on today's grid (one block
    per tile, both stages preloaded) two win: 20.2 -> 19.0 us in the decode step, three 19.7
    (results/h200-2026-11-29-s17, two runs each)."""
    if m == 1:
        return 2
    if mt >= 4:
        return 2 if n >= _WIDE_N or k > 8192 else 3
    return p


# Both register stages in flight before the x staging and before each next tile's reduction
# (QmmConfig.pre), not one: BB_QMM_PRELOAD2=auto (where _preload finds it), 1 (every register-
# stage kernel) or 0 (none).
PRELOAD2 = env_choice("BB_QMM_PRELOAD2", "auto", ("auto", "0", "1"))
PRELOAD_TILES = 16  # tiles per persistent block from which the next tile's preload pays


def _preload(cfg: QmmConfig, n: int, k: int, bits: int) -> bool:
    """Where the H200 measured the second stage's preload faster (results/h200-2026-11-29-s14/
    call7, two runs each way): warps with more than one round of chunks (down at M = 1, 8, 32
    20.9 -> 20.4, 22.6 -> 22.1, 33.0 -> 32.5 us; gate/up at M=8 40.0 -> 38.9) and persistent
    blocks of many tiles (lm_head at M=1 104 -> 102). With one round or less it lost: gate/up
    at M=1 30.6 -> 31.1. At four token tiles q/k/v and o lost together (12.5 -> 13.0 us, o with
    7 chunks a warp), so above one token tile only the long-K down projection takes it."""
    if cfg.ns or PRELOAD2 == "0":
        return False
    if PRELOAD2 == "1":
        return True
    per_warp = -(-cfg.slice_chunks(k, bits) // cfg.wk)
    per_block = -(-cfg.tiles(n) // cfg.grid_blocks(n))
    return (per_warp > 2 * cfg.p or per_block >= PRELOAD_TILES) and (cfg.mt == 1 or k > 8192)


# One token, one K-slice of at most 8 chunks a warp at 4 warps along K, and more 16-row tiles
# than two 256-thread blocks per SM hold but no more than three 128-thread blocks (~164
# registers at 4 chunks a stage): q/k/v of the 7B shape, 288 tiles where 264 blocks fit. One
# 128-thread block per tile runs them in one round, each warp's 7 chunks in flight at once.
# H200 decode step (results/h200-2026-11-29-s17/call4, two runs each): q/k/v at M=1 10.1 ->
# 9.8 us. Not taken: at M = 2 / 4 / 8 it lost (11.2 -> 11.5, 12.7 -> 14.0, 15.6 -> 18.7 us),
# and o_proj (224 tiles, one round already) lost too (6.2 -> 6.7, call4 `owk4`).
NARROW_WK, NARROW_P, NARROW_PER_SM = 4, 4, 3


def _one_round_narrow(m: int, n: int, k: int, bits: int, cfg: QmmConfig) -> QmmConfig | None:
    """cfg (one token tile, 1 x 8 warps, one K-slice, register stages) on 128-thread blocks,
    one per tile, where that fits the rule above; else None."""
    if m != 1 or cfg.s != 1 or cfg.ns or (cfg.wn, cfg.wk) != (1, 8):
        return None
    if not (_resident_blocks(cfg, k, bits) < cfg.tiles(n) <= NARROW_PER_SM * sm_count()):
        return None
    if cfg.slice_chunks(k, bits) > 2 * NARROW_P * NARROW_WK:  # a warp's chunks must fit both stages
        return None
    return replace(cfg, wk=NARROW_WK, p=NARROW_P, blocks=0)


def choose_config(m: int, n: int, k: int, bits: int) -> QmmConfig:
    mt = 1 if m <= 8 else 2 if m <= 16 else 4 if m <= 32 else 8
    wn, wk, p = _WIDE_TILES[mt] if (m > 1 and n >= _WIDE_N) or n >= _VOCAB_N else _TILES[mt]
    while n % (16 * wn):  # keep the block's warps: trade warps along N for warps along K
        wn, wk = wn // 2, wk * 2
    nch = k // chunk_k(bits)
    p = _load_depth(m, mt, n, k, p)
    cfg = QmmConfig(mt, wn, wk, p, 1, 1 << (m - 1).bit_length(), ns=RING)
    while cfg.xbytes(k, bits) > SMEM_BUDGET and cfg.s < nch:
        cfg = replace(cfg, s=cfg.s + 1)
    warps = (n // (16 * wn)) * wn * wk
    if warps < MIN_WARPS:
        s_par = min(-(-MIN_WARPS // warps), max(1, nch // wk))
        cfg = replace(cfg, s=max(cfg.s, s_par))
    if LONG_K_SPLIT and m > 2 and cfg.s == 1 and nch / wk > LONG_K_CHUNKS and warps < 2 * 132 * 8:
        # few warps with long runs of K (down_proj): 2 slices are faster kernels (H200, M=1
        # 33 -> 31 us), but at M <= 2 the step is bound by the host and the reduce launch costs
        # more than it saves (S_TG at B=1 162 -> 188 t/s without it, results/h200-2026-11-29-s3)
        cfg = replace(cfg, s=2)
    if RING_WIDE and not RING and cfg.mt == 4 and n >= _WIDE_N and cfg.s > 2:
        # Wide matrices at four token tiles (one block per SM): the ring with half the K-slices
        # (a larger x slice, fewer fp32 partials). H200, results/h200-2026-11-29-s7: lm_head
        # 329 -> 246 us, gate/up 97 -> 79 us at M=32; the ring loses at M=1 (gate/up 28.7 ->
        # 33.9 us), is even at M=8 and loses on narrow or long-K matrices at M=32 (down 60 -> 67).
        c = replace(cfg, ns=4, s=max(2, cfg.s // 2))
        if n < _RING_SPLIT_K_N and c.wn == 8 and n % (16 * 4) == 0:
            # two warps along K instead of eight along N below lm_head's width: gate/up 74.8 ->
            # 71.2 us at M=32 (H200 tune, results/h200-2026-11-29-s8); lm_head loses (233 -> 246)
            c = replace(c, wn=4, wk=2)
        if _one_block_fits(c, k, bits):
            cfg = c
    if ONE_WAVE == 2 and _one_wave(cfg) and cfg.s > 1:
        cfg = _balanced_slices(cfg, n, k, bits)
    if WPACK != "0" and not RING and ((cfg.mt == 4 and n < _WIDE_N) or (RING_WIDE and cfg.mt == 2 and n >= _WIDE_N)):
        # With the weights and pairs repacked in load order (BB_QMM_WPACK), the ring with the
        # K-slices chosen for register stages, where the H200 measured it faster (on MLX's
        # layout the ring had lost: down 60 -> 67 us at M=32, session 7):
        # - the narrow matrices at four token tiles: at M=32 the long-K down projection 27.7 ->
        #   25.6 us (results/h200-2026-11-30-s29/call2), o_proj 10.2 -> 9.1 and q/k/v 10.7 -> 9.6
        #   (session 30, call5);
        # - the wide ones at two token tiles (M = 9-16): gate/up 37.9 -> 30.4 us and lm_head
        #   121.4 -> 97.7 at M=16, the decode step at B=16 2.608-2.612 -> 2.386-2.389 ms, B=12
        #   2.524 -> 2.294 (results/h200-2026-11-30-s31, calls 2-3). The narrow ones lost there
        #   (down 21.8 -> 23.3, q/k/v +0.4, o_proj +0.2), and at M=8 no matrix gained (gate/up
        #   -1.0 us, but its down and reduce +1.0).
        c = replace(cfg, ns=4)
        if _one_block_fits(c, k, bits):
            cfg = c
    narrow = _one_round_narrow(m, n, k, bits, cfg)
    if narrow is not None:
        return replace(narrow, pre=_preload(narrow, n, k, bits))
    if WK_DIVIDE == "1" or (WK_DIVIDE == "narrow" and n < _WIDE_N):
        cfg = _dividing_wk(cfg, k, bits)
    if PERSIST and not (m == 1 and (cfg.s > 1 or k > 8192)):
        # one block per tile for the long-K down projection at M=1: split, 31 us vs 33
        # persistent; one K-slice, 25.6 vs 28.1 (H200 tune, results/h200-2026-11-29-s9/call3)
        cfg = persistent(cfg, k, bits)
    return replace(cfg, pre=_preload(cfg, n, k, bits))


def _shape_info(x: mx.array, w: mx.array, scales: mx.array, biases, group_size: int, bits: int,
                glu: bool = False):
    """Validate like mx.quantized_matmul would, with a one-line message; return (M, N, K).
    glu: x holds [gate | up], 2K features."""
    if w.ndim != 2 or w.dtype != mx.uint32:
        raise ValueError(f"quantized_matmul: w must be a 2-D uint32 array, got {w.dtype} {w.shape}")
    if bits not in (2, 3, 4, 5, 6, 8):
        raise ValueError(f"quantized_matmul: bits must be one of 2, 3, 4, 5, 6, 8, not {bits}")
    if group_size not in _GROUPS:
        raise ValueError(f"quantized_matmul: group_size must be 32, 64 or 128, not {group_size}")
    n, kw = w.shape
    k = kw * 32 // bits
    if x.ndim < 1 or x.shape[-1] != (2 * k if glu else k):
        raise ValueError(
            f"quantized_matmul: x has {x.shape[-1] if x.ndim else 0} features but the {bits}-bit "
            f"weight [{n}, {kw}] holds {k}{' (x2 for glu)' if glu else ''}"
        )
    if k % group_size != 0:
        raise ValueError(
            f"quantized_matmul: K={k} is not a multiple of group_size={group_size}"
        )
    want = (n, k // group_size)
    if tuple(scales.shape) != want or (biases is not None and tuple(biases.shape) != want):
        raise ValueError(
            f"quantized_matmul: scales/biases must be {list(want)} for w {list(w.shape)} with "
            f"group_size={group_size}, got {list(scales.shape)}"
            f"{'' if biases is None else ' / ' + str(list(biases.shape))}"
        )
    m = 1
    for d in x.shape[:-1]:
        m *= d
    return m, n, k


def _kernel_config(m: int, n: int, k: int, x: mx.array, scales, biases, group_size: int,
                   bits: int) -> QmmConfig | None:
    """The launch config where this call runs the custom kernel: the CUDA back-end, a covered
    shape and a launch that fits this GPU's shared memory (the configs were tuned on the H200's
    227 KB a block; one that does not fit says so on stderr, once a shape); None: MLX runs it."""
    if backend.BACKEND != "cuda" or not covered(m, n, k, x.dtype, scales, biases, group_size, bits):
        return None
    cfg = choose_config(m, n, k, bits)
    # BB_QMM_DQ=lop3b at one token may add its bias sums (at most: plan_quantized_matmul decides)
    extra = _bias_sums_bytes(cfg, k, bits) if DQ_MODE == "lop3b" and m == 1 else 0
    if fits_device(cfg, k, bits, extra):
        return cfg
    _note_once((n, k, bits), f"the {bits}-bit matmul N={n} K={k} at M={m} needs {cfg.launch_smem(k, bits, extra) // 1024} "
               f"KB of shared memory a block, this GPU gives {smem_per_block() // 1024} KB: mx.quantized_matmul runs "
               f"it (BATCHBENCH_SMEM_KB sets the limit)")
    return None


def covered(m: int, n: int, k: int, x_dtype, scales, biases, group_size: int, bits: int) -> bool:
    """True when the custom CUDA kernel handles this call (back-end aside)."""
    return (
        biases is not None
        and bits in _BITS
        and group_size in _GROUPS
        and x_dtype in _DTYPES
        and scales.dtype == x_dtype
        and biases.dtype == x_dtype
        and 1 <= m <= MAX_M
        and tiles_fit(n, k, bits)
    )


def tiles_fit(n: int, k: int, bits: int) -> bool:
    """N in whole 16-row tiles and K in whole chunks: what the kernel's (and `pack_weights`'s)
    layout needs."""
    return n % 16 == 0 and k % chunk_k(bits) == 0


@dataclass(frozen=True)
class RopeStore:
    """The q/k/v projection's RoPE epilogue: q comes out [1, Hq, M, D], rotated; k (rotated)
    and v go into the cache buffers keys/values [1, Hkv, nc, D] at cells [M], in place. The
    weight rows must be in `rope_pair_order`."""

    positions: mx.array  # [M] int32
    cells: mx.array  # [M] int32
    keys: mx.array
    values: mx.array
    n_heads: int
    n_kv_heads: int
    head_dim: int
    base: float
    scale: float
    traditional: bool

    @property
    def width(self) -> int:
        return (self.n_heads + 2 * self.n_kv_heads) * self.head_dim

    @property
    def layout(self) -> tuple[int, int, int, bool]:
        """As `pair_layout`: the fused weight's `rope_layout` must equal it."""
        return (self.n_heads, self.n_kv_heads, self.head_dim, bool(self.traditional))

    def inputs(self) -> list[mx.array]:
        return [self.positions.astype(mx.int32), self.cells.astype(mx.int32), self.keys, self.values]

    def template(self) -> list[tuple[str, object]]:
        return [("RD", self.head_dim), ("HQ", self.n_heads), ("HKV", self.n_kv_heads),
                ("TRAD", bool(self.traditional)), *angle_template(self.base, self.scale)]


def glu_pair_order(n_ff: int) -> list[int]:
    """Row order of a fused [gate; up] weight (n_ff rows each) for the gate product epilogue:
    new row j is old row order[j]; 16-row tile t holds gate rows 8t..8t+7, then the same up rows."""
    if n_ff % 8:
        raise ValueError(f"glu_pair_order: the intermediate size must be a multiple of 8, got {n_ff}")
    return [i + half * n_ff for t in range(n_ff // 8) for half in (0, 1) for i in range(8 * t, 8 * t + 8)]


def plan_quantized_matmul(
    backend_name: str,
    x: mx.array,
    w: mx.array,
    scales: mx.array,
    biases: mx.array,
    *,
    group_size: int,
    bits: int,
    bias: mx.array | None = None,
    residual: mx.array | None = None,
    glu: bool = False,
    norm: tuple[mx.array, float] | None = None,
    config: QmmConfig | None = None,
    lop3: bool | None = None,
    rope: RopeStore | None = None,
    glu_pair: bool = False,
    norm_next: tuple[mx.array, float] | None = None,
    prenorm: "PendingNorm | None" = None,
    bias_sums: bool | None = None,
    packed: mx.array | None = None,
    scale_max: float | None = None,
    sub: bool | None = None,
    wpack: mx.array | None = None,
    ppack: bool = False,
) -> tuple[KernelSpec, Launch]:
    """The main kernel's spec and launch (x taken as [M, K], or [M, 2K] with glu). With
    config.s > 1 its output is partials [S, M, N] (`partial_dtype`) that `plan_qmm_reduce` turns into y
    (bias and residual are then added there). lop3 forces the fp16 4-bit dequantization
    (None: where `_lop3` measured it faster). Pair epilogues (after a split K, the reduce
    kernel's): rope, the output is q and k/v go to the cache (`RopeStore`); glu_pair, the
    rows are in `glu_pair_order` and the output is silu(gate) * up [M, N/2]. norm with a split
    K: a second output, the K-slices' sums of squares [S, M] fp32, for the reduce kernel's
    `norm` (the norm is folded: see NORM in the kernel). One K-slice only: norm_next (weight,
    eps), two more outputs, y * weight [M, N] and each tile's sums of squares of y [tiles, M]
    fp32 (NOUT); prenorm, x is such a y * weight and the outputs are scaled by the rows'
    rsqrt(mean + eps) from its sums (NPRE). bias_sums: the lop3 dequantization without the bias,
    which enters as bias times x's 32-k sums (None: BB_QMM_DQ=lop3b, where `_bias_sums_fit`).
    packed: `pack_scales_biases(scales, biases)`, which the kernel then reads instead of the two
    arrays (SBP). scale_max: max |scales| where the caller knows it; below SUB_SCALE_LIMIT and
    with BB_QMM_DQ=sub the fp16 4-bit lop3 dequantization takes two instructions a pair (DQ = 3;
    sub=True asks for it whatever BB_QMM_DQ says, False keeps it off). wpack: `pack_weights(w, bits)`,
    which the kernel then reads instead of w (WP). ppack: packed is `pack_pairs` of the pairs
    (needs wpack; WP = 2)."""
    if backend_name != "cuda":
        raise ValueError(f"quantized_matmul has a custom kernel only on cuda, not {backend_name!r}")
    m, n, k = _shape_info(x, w, scales, biases, group_size, bits, glu)
    if not covered(m, n, k, x.dtype, scales, biases, group_size, bits):
        raise ValueError(
            f"quantized_matmul: no custom kernel for M={m} N={n} K={k} bits={bits} "
            f"group_size={group_size} dtype={x.dtype}"
        )
    cfg = config or choose_config(m, n, k, bits)
    if cfg.ns and not ring_ok(bits, group_size):
        cfg = replace(cfg, ns=0, wf=1)
    if packed is not None and (tuple(packed.shape) != (*scales.shape, 2) or packed.dtype != scales.dtype):
        raise ValueError(f"quantized_matmul: packed scales and biases must be {[*scales.shape, 2]} {scales.dtype}, "
                         f"got {list(packed.shape)} {packed.dtype}")
    sbp = packed is not None
    if wpack is not None and (wpack.shape != w.shape or wpack.dtype != w.dtype):
        raise ValueError(f"quantized_matmul: repacked weights must be {list(w.shape)} {w.dtype}, "
                         f"got {list(wpack.shape)} {wpack.dtype}")
    if ppack and (wpack is None or not sbp or not pairs_fit(n, k, bits, group_size)):
        raise ValueError("quantized_matmul: repacked pairs come with the packed pairs, the repacked weights "
                         f"and whole groups in a chunk ({chunk_k(bits)} k), got group_size {group_size}")
    if cfg.wf not in (1, 2) or (cfg.wf == 2 and not cfg.ns) or n % (16 * cfg.wn * cfg.wf):
        raise ValueError(f"quantized_matmul: config {cfg} does not fit N={n} (wf 2 needs the ring, "
                         f"N a multiple of 16 * wn * wf)")
    use_lop3 = _lop3(cfg, n, k) if lop3 is None else lop3
    # sub taken by itself only with the packed pairs: unpacked, the scales and biases take three
    # more HMUL2 a chunk, and the q/k/v projections with RoPE (unpacked under the default
    # BB_QMM_SB_PACK=norope) lost 0.2-0.4 us with it on the H200 (results/h200-2026-11-30-s27/call4).
    wants_sub = (DQ_MODE == "sub" and sbp) if sub is None else sub
    sub_fits = sub_ok(x.dtype, bits, scale_max)
    if lop3 is None and not use_lop3 and DEQUANT_LOP3 and wants_sub and n < _WIDE_N and sub_fits:
        # The long-K narrow matrices (down_proj at M = 17-64) keep the byte permutes against lop3,
        # but not against sub: H200 decode step at B=32, two runs each way (s27/call7), down 30.8-30.9
        # -> 29.8 us, step 3.406-3.409 -> 3.373-3.378 ms.
        use_lop3 = True
    bsum_ok = use_lop3 and _bias_sums_fit(cfg, m, bits, x.dtype, norm)
    if bias_sums and not bsum_ok:
        raise ValueError(f"quantized_matmul: the dequantization without the bias needs one token, fp16 4-bit "
                         f"lop3, register stages, one feature tile a warp and no fused norm (config {cfg})")
    bsum = bsum_ok and (DQ_MODE == "lop3b" if bias_sums is None else bias_sums)
    can_sub = use_lop3 and not bsum and sub_fits
    if sub and not can_sub:
        raise ValueError(f"quantized_matmul: the subnormal dequantization needs fp16 4-bit lop3 weights (no bias "
                         f"sums) and scales known below {SUB_SCALE_LIMIT} (scale_max={scale_max}, config {cfg})")
    sub = can_sub and wants_sub
    extra = _bias_sums_bytes(cfg, k, bits) if bsum else 0
    need = cfg.smem(k, bits) + extra
    if need > SMEM_PER_SM:  # a launch would fail inside MLX's graph with "invalid argument"
        raise ValueError(f"quantized_matmul: config {cfg} needs {need} bytes of shared memory for "
                         f"K={k}, more than a block may take ({SMEM_PER_SM}): more K-slices (s) or fewer rows")
    split = cfg.s > 1
    if norm is not None and (glu or k % 256 or (split and not cfg.fold_fits(k, bits))):
        raise ValueError("quantized_matmul: the fused RMSNorm needs K % 256 == 0, no glu and, over a split K, "
                         "its sums' scratch within the reduction area (QmmConfig.fold_fits)")
    fold = norm is not None and split
    bn = 16 * cfg.wn * cfg.wf
    if norm_next is not None and not (_norm_parts_fit(cfg, glu_pair or rope is not None)
                                      and _norm_weight_ok(norm_next[0], n, x.dtype)):
        raise ValueError(f"quantized_matmul: writing the next norm's parts needs one K-slice, a plain epilogue, "
                         f"tiles of 16 or 32 rows and a weight [{n}] {x.dtype} (config {cfg})")
    if prenorm is not None and (split or norm is not None or prenorm.ss.dtype != mx.float32
                                or prenorm.ss.ndim != 2 or prenorm.ss.shape[1] != m):
        raise ValueError(f"quantized_matmul: a pending norm needs one K-slice, no norm of its own and sums "
                         f"[tiles, {m}] float32 (config {cfg})")
    has_bias = bias is not None and not split
    has_res = residual is not None and not split
    pair = _check_pair(rope, glu_pair, m, n, x.dtype, glu, residual)
    pair_here = pair if not split else ""
    rope_here = pair_here == "rope"
    # Shapes share compiled kernels: N and K are runtime values and the dynamic smem size is
    # rounded up to 8 KiB steps (it is part of the kernel name, see the template below).
    smem = cfg.launch_smem(k, bits, extra)
    nt = 32 * cfg.wn * cfg.wk
    inputs = [x.reshape(m, 2 * k if glu else k), w if wpack is None else wpack]
    inputs += [packed, packed] if sbp else [scales, biases]
    inputs += ([bias] if has_bias else []) + ([residual.reshape(m, n)] if has_res else [])
    inputs += [norm[0]] if norm is not None else []
    inputs += rope.inputs() if rope_here else []
    inputs += ([norm_next[0]] if norm_next is not None else []) + ([prenorm.ss] if prenorm is not None else [])
    out_shape = (cfg.s, m, n) if split else _pair_shape(pair, rope, m, n)
    # over a K-slice (fold) the norm takes its sums in a pass after the staging (qmm_norm_slice)
    npass, early = norm_variant(m, glu_pair) if norm is not None else (False, False)
    launch = Launch(
        inputs=inputs,
        output_shapes=[out_shape] + ([(cfg.s, m)] if fold else []) + ([(m, n), (n // bn, m)] if norm_next else []),
        output_dtypes=[partial_dtype(x.dtype, fold) if split else x.dtype] + ([mx.float32] if fold else [])
        + ([x.dtype, mx.float32] if norm_next else []),
        grid=(cfg.grid_blocks(n) * nt, cfg.s, 1),
        threadgroup=(nt, 1, 1),
        template=[
            ("T", x.dtype), ("BITS", bits), ("GS", group_size), ("MT", cfg.mt), ("WN", cfg.wn),
            ("WK", cfg.wk), ("P", cfg.p), ("NS", cfg.ns), ("WF", cfg.wf), ("PRE", cfg.pre and not cfg.ns),
            ("SPLIT", split), ("EPRE", EPI_PRE and not split),
            ("DQ", 3 if sub else 2 if bsum else 1 if use_lop3 else 0), ("SBP", sbp),
            ("WP", 0 if wpack is None else 2 if ppack else 1),
            ("SMEM", smem),  # in the kernel name: MLX sets the smem attribute once per kernel
        ] + ([("EPS_BITS", kspec.f32_bits(norm[1])), ("NPASS", npass or fold), ("NEARLY", early)]
             if norm is not None else [])
        + ([("EPS_BITS", kspec.f32_bits(prenorm.eps))] if prenorm is not None else [])
        + (rope.template() if rope_here else []),
    )
    spec = _main_spec(has_bias, has_res, glu, norm is not None, pair_here, fold, norm_next is not None,
                      prenorm is not None)
    return replace(spec, shared_memory=smem), launch


def sub_ok(dtype, bits: int, scale_max: float | None) -> bool:
    """The subnormal dequantization (DQ = 3) can run on the lop3 path: fp16 4-bit weights whose
    scales are known to stay below SUB_SCALE_LIMIT (BB_QMM_DQ=sub then takes it)."""
    return dtype == mx.float16 and bits == 4 and scale_max is not None and scale_max < SUB_SCALE_LIMIT


def _pair_shape(pair: str, rope: RopeStore | None, m: int, n: int) -> tuple[int, ...]:
    return (1, rope.n_heads, m, rope.head_dim) if pair == "rope" else (m, n // 2) if pair == "glu" else (m, n)


def _check_pair(rope: RopeStore | None, glu_pair: bool, m: int, n: int, dtype, glu: bool, residual) -> str:
    """The pair epilogue asked for ("", "rope" or "glu"), checked."""
    if rope is None and not glu_pair:
        return ""
    if glu or residual is not None or (rope is not None and glu_pair):
        raise ValueError("quantized_matmul: a pair epilogue (rope, glu_pair) takes no glu, no residual "
                         "and not the other pair epilogue")
    if glu_pair:
        if n % 16:
            raise ValueError(f"quantized_matmul: glu_pair needs N % 16 == 0, got N={n}")
        return "glu"
    _check_rope(rope, m, n, dtype)
    return "rope"


def _check_rope(rope: RopeStore, m: int, n: int, dtype) -> None:
    if n != rope.width or rope.head_dim % 16:
        raise ValueError(f"quantized_matmul: the RoPE epilogue needs N = (Hq + 2 Hkv) * D = {rope.width} "
                         f"and D % 16 == 0, got N={n}, D={rope.head_dim}")
    want = (1, rope.n_kv_heads)
    for buf in (rope.keys, rope.values):
        if buf.ndim != 4 or tuple(buf.shape[:2]) != want or buf.shape[3] != rope.head_dim or buf.dtype != dtype:
            raise ValueError(f"quantized_matmul: cache buffers must be [1, {rope.n_kv_heads}, cells, "
                             f"{rope.head_dim}] {dtype}, got {tuple(buf.shape)} {buf.dtype}")
    if rope.positions.shape != (m,) or rope.cells.shape != (m,):
        raise ValueError(f"quantized_matmul: positions and cells must be [{m}]")



REDUCE_NORM_THREADS = 512  # qmm_reduce_norm: threads of its block (one row of y)
REDUCE_NORM_MAX_NG = 8  # granules of 8 a thread it holds in registers


def _reduce_norm_geometry(n: int) -> tuple[int, int]:
    """(threads, granules a thread) of qmm_reduce_norm for rows of n."""
    g = n // 8
    nt = min(REDUCE_NORM_THREADS, -(-g // 32) * 32)
    return nt, -(-g // nt)


def _reduce_norm_fits(n: int, pair: bool, folded: bool) -> bool:
    """qmm_reduce_norm can finish this split K: a plain epilogue, no folded norm, rows it holds."""
    return not pair and not folded and n % 8 == 0 and n // 8 <= REDUCE_NORM_THREADS * REDUCE_NORM_MAX_NG


def _norm_parts_fit(cfg: QmmConfig, pair: bool) -> bool:
    """The main kernel can write the next norm's parts (NOUT): one K-slice, a plain epilogue,
    tiles of 16 or 32 rows (a tile's row is then one warp's lanes)."""
    return cfg.s == 1 and not pair and 16 * cfg.wn * cfg.wf in (16, 32)


def _norm_weight_ok(weight: mx.array, n: int, dtype) -> bool:
    return weight.shape == (n,) and weight.dtype == dtype


def _bias_sums_fit(cfg: QmmConfig, m: int, bits: int, dtype, norm) -> bool:
    """The lop3 dequantization without the bias (DQ = 2) can run: one token, fp16 4-bit, register
    stages with one feature tile a warp, no fused norm (its sums are of the staged x as it is)."""
    return m == 1 and cfg.mt == 1 and bits == 4 and dtype == mx.float16 and not cfg.ns and cfg.wf == 1 and norm is None


def _bias_sums_bytes(cfg: QmmConfig, k: int, bits: int) -> int:
    """Shared memory of DQ = 2's sums: one float per 32 k of the longest K-slice."""
    return cfg.slice_chunks(k, bits) * chunk_k(bits) // 32 * 4


def plan_qmm_reduce(
    part: mx.array, dtype, bias: mx.array | None = None, residual: mx.array | None = None,
    rope: RopeStore | None = None,
    glu_pair: bool = False,
    norm: tuple[mx.array, int, float] | None = None,
    norm_out: tuple[mx.array, float] | None = None,
) -> tuple[KernelSpec, Launch]:
    """y from the partials [S, M, N] (fp32 or fp16) of a split K. norm: (the main kernel's sums of
    squares [S, M], K, eps) of a folded RMSNorm. norm_out (weight [N], eps): a second output,
    mx.fast.rms_norm(y, weight, eps), from one block per row (`qmm_reduce_norm`)."""
    s, m, n = part.shape
    if part.dtype not in (mx.float32, mx.float16):
        raise ValueError(f"quantized_matmul: the partials must be float32 or float16, got {part.dtype}")
    pair = _check_pair(rope, glu_pair, m, n, dtype, False, residual)
    if norm_out is not None:
        nw, eps = norm_out
        if not _reduce_norm_fits(n, bool(pair), norm is not None):
            raise ValueError(f"quantized_matmul: the norm of the output needs a plain epilogue and N % 8 == 0, "
                             f"N <= {8 * REDUCE_NORM_THREADS * REDUCE_NORM_MAX_NG}, got N={n}")
        if not _norm_weight_ok(nw, n, dtype):
            raise ValueError(f"quantized_matmul: the output norm's weight must be [{n}] {dtype}, got "
                             f"{tuple(nw.shape)} {nw.dtype}")
        nt, ng = _reduce_norm_geometry(n)
        launch = Launch(
            inputs=[part] + ([bias] if bias is not None else [])
            + ([residual.reshape(m, n)] if residual is not None else []) + [nw],
            output_shapes=[(m, n), (m, n)],
            output_dtypes=[dtype, dtype],
            grid=(m * nt, 1, 1),
            threadgroup=(nt, 1, 1),
            template=[("T", dtype), ("NG", ng), ("EPS_BITS", kspec.f32_bits(eps))],
        )
        return _reduce_norm_spec(bias is not None, residual is not None), launch
    head = [part]
    norm_t = []
    if norm is not None:
        ss, k, eps = norm
        if tuple(ss.shape) != (s, m) or ss.dtype != mx.float32:
            raise ValueError(f"quantized_matmul: the norm's sums must be [{s}, {m}] float32, got "
                             f"{tuple(ss.shape)} {ss.dtype}")
        head.append(ss)
        norm_t = [("NK", int(k)), ("EPS_BITS", kspec.f32_bits(eps))]
    if pair:
        pv = 4 if (RED_VEC == "1" or (RED_VEC == "glu" and pair == "glu")) and (n // 2) % 4 == 0 else 1
        launch = Launch(
            inputs=head + ([bias] if bias is not None else []) + (rope.inputs() if rope is not None else []),
            output_shapes=[_pair_shape(pair, rope, m, n)],
            output_dtypes=[dtype],
            grid=(m * (n // 2) // pv, 1, 1),
            threadgroup=(256, 1, 1),
            template=[("T", dtype), ("PV", pv)] + norm_t + (rope.template() if rope is not None else []),
        )
        return _reduce_spec(bias is not None, pair=pair, norm=norm is not None), launch
    v = PLAIN_RED_VEC if n % PLAIN_RED_VEC == 0 else 1
    launch = Launch(
        inputs=head + ([bias] if bias is not None else [])
        + ([residual.reshape(m, n)] if residual is not None else []),
        output_shapes=[(m, n)],
        output_dtypes=[dtype],
        grid=(m * n // v, 1, 1),
        threadgroup=(256, 1, 1),
        template=[("T", dtype), ("V", v)] + norm_t,
    )
    return _reduce_spec(bias is not None, residual is not None, norm=norm is not None), launch


# Rows of x from which CUDA dequantizes and uses cuBLAS instead (0: never).
DEQUANT_MIN_M = env_number("BB_QMM_DEQUANT_MIN_M", 256)


def _silu_mul(x: mx.array) -> mx.array:
    g, u = mx.split(x, 2, axis=-1)
    return nn.silu(g) * u


# BB_QMM_X8 (default 1): on CUDA, decode matmuls of one or two tokens with 4-bit group-32
# weights take x in int8 (batchbench.kernels.qmv8, llama.cpp's q8_1 activations, which its CUDA
# decode uses by default too): at M=1 every such matmul, the q/k/v projection with its bias and
# RoPE + K/V-write epilogue included, at M=2 those with many rows (gate/up, lm_head), where
# sessions 25-26 measured it faster (at M=2 down_proj was even, o_proj and q/k/v slower; at M=4
# gate/up 37.9 us against 30.6 and lm_head 122.7 against 98.1). Their norm, gate product,
# residual and the next norm's share stay fused. The numbers change: 4-6e-3 of max|y| from
# float32 against 2-4e-4 on the fp16 path. 0: the fp16 path everywhere; noqkv: as 1 but q/k/v
# on the fp16 kernel (session 25's set, for A/B runs).
X8_MODE = env_choice("BB_QMM_X8", "1", ON_OFF + ("noqkv",))
X8 = X8_MODE != "0"
X8_QKV = X8_MODE == "1"
X8_MANY_ROWS_MAX_M = 2


def _x8_takes(m: int, n: int, k: int, x: mx.array, scales, biases, group_size: int, bits: int, bias,
              rows_a_unit: int = 1) -> bool:
    if not (X8 and backend.BACKEND == "cuda" and bias is None and scales.dtype == x.dtype
            and qmv8.covered(m, k, x.dtype, group_size, bits, biases)):
        return False
    cfg = qmv8.choose_config(m, n // rows_a_unit, k, rows_a_unit=rows_a_unit)
    if m > 1 and (m > X8_MANY_ROWS_MAX_M or cfg.lpr != 32):
        return False
    # as _kernel_config: the launch must fit this GPU's shared memory (x staged: a launch with a
    # norm of x cannot keep it in registers)
    need = qmv8.smem_bytes(m, k, replace(cfg, xreg=False), rows_a_unit == 2) + _STATIC_SMEM
    if need <= smem_per_block():
        return True
    _note_once(("x8", n, k, m), f"the int8-activation matmul N={n} K={k} at M={m} needs {need // 1024} KB of shared "
               f"memory a block, this GPU gives {smem_per_block() // 1024} KB: the fp16 path runs it "
               f"(BATCHBENCH_SMEM_KB sets the limit)")
    return False


def _x8_run(x: mx.array, w, scales, biases, n_out: int, residual, norm, norm_out=None, glu_pair: bool = False,
            bias=None, rope: "RopeStore | None" = None):
    """The int8-activation kernel on x [..., K] with the epilogues `quantized_matmul` takes; y,
    or with norm_out (y, NormParts | None) as `quantized_matmul` returns them."""
    k = x.shape[-1]
    kw: dict = {}
    if isinstance(norm, PendingNorm):
        kw["prenorm"] = (norm.ss, norm.eps)
    elif norm is not None:
        if _norm_weight_ok(norm[0], k, x.dtype):
            kw["norm"] = norm
        else:
            x = mx.fast.rms_norm(x, norm[0], norm[1])
    if residual is not None:
        kw["residual"] = residual.astype(x.dtype)
    share = norm_out is not None and NORM_PRE and _norm_weight_ok(norm_out[0], n_out, x.dtype)
    if share:
        kw["norm_out"] = norm_out[0]
    if bias is not None:
        kw["bias"] = bias.reshape(-1).astype(x.dtype)
    out = qmv8.quantized_matvec_x8(x, w, scales, biases, glu_pair=glu_pair, rope=rope, **kw)
    if norm_out is None:
        return out
    if share:
        y, yw, ss = out
        return y, NormParts(yw, PendingNorm(ss, float(norm_out[1])))
    return out, None


def quantized_matmul(
    x: mx.array,
    w: mx.array,
    scales: mx.array,
    biases: mx.array | None,
    *,
    group_size: int,
    bits: int,
    bias: mx.array | None = None,
    residual: mx.array | None = None,
    glu: bool = False,
    norm: "tuple[mx.array, float] | PendingNorm | None" = None,
    norm_out: tuple[mx.array, float] | None = None,
    packed: mx.array | None = None,
    scale_max: float | None = None,
    wpack: mx.array | None = None,
    ppack: bool = False,
):
    """x @ dequantize(w, scales, biases).T (+ bias) (+ residual): MLX affine layout,
    transpose=True. glu: x is [..., 2K] = [gate | up] and the product uses silu(gate) * up.
    norm (weight, eps): the product uses mx.fast.rms_norm(x, weight, eps).
    norm_out (weight, eps): returns (y, y_n) with y_n = mx.fast.rms_norm(y, weight, eps) where
    the launch that makes y also wrote it (the reduce kernel after a split K), NormParts where
    it wrote its share of it (one K-slice, BB_QMM_NORM_PRE), else (y, None). norm may also be
    a PendingNorm (x is then a producer's y * weight). packed: `pack_scales_biases(scales,
    biases)`, which the custom kernel may read instead (BB_QMM_SB_PACK). scale_max: max |scales|
    where the caller knows it (`plan_quantized_matmul`). wpack: `pack_weights(w, bits)`, which the
    fp16-activation kernel then reads (BB_QMM_WPACK); ppack: packed is `pack_pairs` of the pairs.

    Custom CUDA kernel when `backend.BACKEND == "cuda"` and the shape is covered (bias,
    residual, the gate product and the norm fused in where they fit), otherwise MLX ops."""
    if norm is not None and glu:
        raise ValueError("quantized_matmul: glu and norm do not combine")
    m, n, k = _shape_info(x, w, scales, biases, group_size, bits, glu)
    lead = x.shape[:-1]
    if not glu and _x8_takes(m, n, k, x, scales, biases, group_size, bits, bias):
        return _x8_run(x, w, scales, biases, n, residual, norm, norm_out)
    cfg = _kernel_config(m, n, k, x, scales, biases, group_size, bits)
    if cfg is not None:
        y = _run_kernel(cfg, x, w, scales, biases, group_size, bits, m, n, k, bias, residual, glu, norm,
                        norm_out=norm_out, packed=packed, scale_max=scale_max, wpack=wpack, ppack=ppack)
        if norm_out is None:
            return y.reshape(*lead, n)
        y, yn = y
        if isinstance(yn, NormParts):
            return y.reshape(*lead, n), NormParts(yn.x.reshape(*lead, n), yn.norm)
        return y.reshape(*lead, n), None if yn is None else yn.reshape(*lead, n)
    if norm is not None:
        x = norm(x) if isinstance(norm, PendingNorm) else mx.fast.rms_norm(x, norm[0], norm[1])
    if glu:
        x = _silu_mul(x)
    if backend.BACKEND == "cuda" and DEQUANT_MIN_M and m >= DEQUANT_MIN_M and biases is not None:
        # Prefill-sized M: dequantize to the activation dtype and use cuBLAS (llama.cpp's CUDA
        # back-end does the same for large batches); MLX's 4-bit GEMM is slower here.
        wd = mx.dequantize(w, scales, biases, group_size=group_size, bits=bits).astype(x.dtype)
        y = x @ wd.T
        if bias is not None:
            y = y + bias.astype(y.dtype)
    else:
        y = mx.quantized_matmul(
            x, w, scales, biases, transpose=True, group_size=group_size, bits=bits
        )
        if bias is not None:
            y = y + bias
    y = y if residual is None else residual + y
    return y if norm_out is None else (y, None)


def _run_kernel(cfg: QmmConfig, x, w, scales, biases, group_size: int, bits: int, m: int, n: int, k: int, bias,
                residual, glu: bool, norm, rope: RopeStore | None = None, glu_pair: bool = False,
                norm_out: tuple[mx.array, float] | None = None, packed: mx.array | None = None,
                scale_max: float | None = None, wpack: mx.array | None = None, ppack: bool = False):
    """The custom kernel (and its reduce kernel after a split K) on a call _kernel_config gave cfg.
    With norm_out (weight, eps): (y, y_n) as `quantized_matmul` returns them."""
    # Each block normalizes its rows itself, once: the sums of squares are taken while x is
    # staged and a persistent block stages x once for all its tiles (over a split K, per
    # K-slice, finished by the reduce kernel). Needs K % 256 == 0; BB_QMM_FUSE_NORM=0 keeps the
    # separate rms_norm launch, BB_QMM_NORM_SPLIT=0 keeps it where K is split (A/B runs).
    prenorm = None
    if isinstance(norm, PendingNorm):  # the producer's share is done: x is y * weight
        if cfg.s == 1:
            prenorm = norm
        else:
            x = norm(x)
        norm = None
    fuse_norm = FUSE_NORM and norm is not None and norm[0].dtype == x.dtype and k % 256 == 0
    if norm is not None and not (fuse_norm and (cfg.s == 1 or (NORM_SPLIT and cfg.fold_fits(k, bits)))):
        x, norm = mx.fast.rms_norm(x, norm[0], norm[1]), None
    if bias is not None and (bias.shape != (n,) or bias.dtype != x.dtype):
        bias = bias.reshape(n).astype(x.dtype)
    if residual is not None and residual.dtype != x.dtype:
        residual = residual.astype(x.dtype)
    pair = glu_pair or rope is not None
    if rope is not None and cfg.s == 1 and SB_PACK == "norope":
        packed, ppack = None, False
    norm_next = norm_out if (NORM_PRE and norm_out is not None and _norm_parts_fit(cfg, pair)
                             and _norm_weight_ok(norm_out[0], n, x.dtype)) else None
    ks, launch = plan_quantized_matmul(
        "cuda", x, w, scales, biases, group_size=group_size, bits=bits, bias=bias,
        residual=residual, glu=glu, norm=norm, config=cfg, rope=rope, glu_pair=glu_pair,
        norm_next=norm_next, prenorm=prenorm, packed=packed, scale_max=scale_max, wpack=wpack,
        ppack=ppack,
    )
    y, *ss = kspec.run(ks, launch)
    if norm_next is not None:
        return y, NormParts(ss[0], PendingNorm(ss[1], float(norm_next[1])))
    yn = None
    if cfg.s > 1:
        out_norm = norm_out if (NORM_OUT and norm_out is not None and _reduce_norm_fits(n, pair, bool(ss))
                                and _norm_weight_ok(norm_out[0], n, x.dtype)) else None
        rs, rl = plan_qmm_reduce(y, x.dtype, bias, residual, rope=rope, glu_pair=glu_pair,
                                 norm=(ss[0], k, norm[1]) if ss else None, norm_out=out_norm)
        y, *yn = kspec.run(rs, rl)
        yn = yn[0] if yn else None
    return y if norm_out is None else (y, yn)


def project_rope_store(layer: "FusedQuantizedLinear", x: mx.array, norm: nn.RMSNorm | None,
                       rope: RopeStore) -> mx.array | None:
    """q [1, Hq, T, D] of a fused q/k/v projection of norm(x) [1, T, K], rotated, with k and v
    written into the cache (`RopeStore`), in one launch (two after a split K) on CUDA; None
    where that kernel does not cover the call (the caller then projects, rotates and stores
    separately)."""
    if backend.BACKEND != "cuda" or getattr(layer, "rope_layout", None) != rope.layout or rope.keys.dtype != x.dtype:
        return None
    w, scales, biases = layer["weight"], layer["scales"], layer["biases"]
    m, n, k = _shape_info(x, w, scales, biases, layer.group_size, layer.bits)
    if X8_QKV and m == 1 and _x8_takes(m, n, k, x, scales, biases, layer.group_size, layer.bits, None, rows_a_unit=2):
        return _x8_run(x, w, scales, biases, n, None, _norm_args(norm), bias=layer.get("bias"), rope=rope)
    cfg = _kernel_config(m, n, k, x, scales, biases, layer.group_size, layer.bits)
    if cfg is None:
        return None
    return _run_kernel(cfg, x, w, scales, biases, layer.group_size, layer.bits, m, n, k, layer.get("bias"), None,
                       False, _norm_args(norm), rope, **layer_extras(layer))


class QuantizedLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear whose matmul (bias fused) goes through `quantized_matmul`."""

    def __call__(self, x: mx.array, *, residual: mx.array | None = None, glu: bool = False,
                 norm: tuple[mx.array, float] | None = None, norm_out: tuple[mx.array, float] | None = None):
        """With norm_out: (y, y_n or None), as `quantized_matmul`."""
        return quantized_matmul(
            x,
            self["weight"],
            self["scales"],
            self.get("biases"),
            group_size=self.group_size,
            bits=self.bits,
            bias=self.get("bias"),
            residual=residual,
            glu=glu,
            norm=norm,
            norm_out=norm_out,
            **layer_extras(self),
        )

    @classmethod
    def from_quantized(cls, layer: nn.QuantizedLinear) -> "QuantizedLinear":
        """Same arrays and settings, no copy (nn.QuantizedLinear's __init__ would quantize noise);
        with BB_QMM_SB_PACK (1, norope) on CUDA, also the packed scales and biases ("packed")."""
        new = cls.__new__(cls)
        new.__dict__.update(layer.__dict__)
        dict.update(new, layer)
        _add_packed(new)
        return new


def layer_extras(layer: nn.Module) -> dict:
    """What a swapped layer's `_add_packed` made for the kernels, as `quantized_matmul`'s keywords."""
    return dict(packed=layer.get("packed"), scale_max=getattr(layer, "scale_max", None), wpack=layer.get("wpack"),
                ppack=getattr(layer, "ppack", False))


def _add_packed(layer: nn.Module) -> None:
    """layer["packed"] = its scales and biases as pairs, where BB_QMM_SB_PACK (1, norope) asks for them on CUDA;
    with BB_QMM_DQ=sub on CUDA also layer.scale_max, max |scales| (once: the kernels then know whether
    the subnormal dequantization may take the layer); with BB_QMM_WPACK on CUDA layer["wpack"],
    its weights in the kernel's load order, and with BB_QMM_WPACK=pairs its pairs in that order
    too (in place of the row-order ones: nothing else reads them; layer.ppack)."""
    n, kw = layer["weight"].shape
    k = kw * 32 // layer.bits
    wpacks = packs_weights() and layer.bits in _BITS and tiles_fit(n, k, layer.bits)
    if packs_scales() and layer.get("biases") is not None:
        packed = pack_scales_biases(layer["scales"], layer["biases"])
        if wpacks and WPACK == "pairs" and pairs_fit(n, k, layer.bits, layer.group_size):
            # made in the load order directly: the row-order pairs are never materialized
            packed = pack_pairs(packed, layer.bits, layer.group_size)
            object.__setattr__(layer, "ppack", True)
        layer["packed"] = packed
        mx.eval(layer["packed"])
    # sub is taken only with the pairs: without them the bound (a device sync a layer) goes unused
    if DQ_MODE == "sub" and layer.get("packed") is not None and layer["scales"].dtype == mx.float16:
        object.__setattr__(layer, "scale_max", mx.max(mx.abs(layer["scales"])).item())
    if wpacks:
        layer["wpack"] = pack_weights(layer["weight"], layer.bits)
        mx.eval(layer["wpack"])


@dataclass(frozen=True)
class PendingNorm:
    """An RMSNorm split between two launches of one K-slice (BB_QMM_NORM_PRE): the producer
    wrote x = y * weight and ss, its tiles' sums of squares of y [tiles, M] fp32; what is left
    is scaling each row by rsqrt(mean(y^2) + eps). Passed where an nn.RMSNorm would be: our
    kernel takes it as NPRE, anything else calls it on x (MLX ops)."""

    ss: mx.array
    eps: float

    def __call__(self, x: mx.array) -> mx.array:
        rs = mx.rsqrt(self.ss.sum(axis=0) / x.shape[-1] + self.eps)
        return (x.astype(mx.float32) * rs.reshape(*x.shape[:-1], 1)).astype(x.dtype)

    def take_rows(self, rows: mx.array) -> "PendingNorm":
        return PendingNorm(self.ss[:, rows], self.eps)


class NormParts(NamedTuple):
    """A producer's share of the next RMSNorm (see PendingNorm): x = y * weight, and the rest."""

    x: mx.array
    norm: PendingNorm


def _norm_args(norm) -> tuple[mx.array, float] | PendingNorm | None:
    return None if norm is None else norm if isinstance(norm, PendingNorm) else (norm.weight, norm.eps)


def linear(layer: nn.Module, x: mx.array, *, residual: mx.array | None = None,
           glu: bool = False, norm: nn.RMSNorm | None = None) -> mx.array:
    """layer(norm(x)) (+ residual), fused into one launch where the layer is ours.
    glu: x is [..., 2K] = [gate | up] and the layer's input is silu(gate) * up."""
    if isinstance(layer, QuantizedLinear):
        return layer(x, residual=residual, glu=glu, norm=_norm_args(norm))
    if norm is not None:
        x = norm(x)
    y = layer(_silu_mul(x) if glu else x)
    return y if residual is None else residual + y


def linear_norm(layer: nn.Module, x: mx.array, *, residual: mx.array | None, norm: nn.RMSNorm,
                glu: bool = False) -> tuple[mx.array, mx.array, nn.RMSNorm | None]:
    """(h, x_n, norm_left) for h = layer(x) (+ residual) followed by a layer that takes norm(h):
    where the launch that makes h can write norm(h) too (our CUDA kernel's reduce after a split
    K), x_n = norm(h) and norm_left = None; elsewhere x_n = h and norm_left = norm, for the next
    layer to apply (fused into its own launch where it can). glu as in `linear`."""
    if isinstance(layer, QuantizedLinear) and NORM_OUT:
        h, hn = layer(x, residual=residual, glu=glu, norm_out=_norm_args(norm))
        if isinstance(hn, NormParts):
            return h, hn.x, hn.norm
        return (h, hn, None) if hn is not None else (h, h, norm)
    h = linear(layer, x, residual=residual, glu=glu)
    return h, h, norm


def _swappable(m: nn.Module) -> bool:
    return (
        isinstance(m, nn.QuantizedLinear)
        and not isinstance(m, QuantizedLinear)
        and getattr(m, "mode", "affine") == "affine"
        and m.bits in _BITS
        and m.group_size in (32, 64)
        and m.get("biases") is not None
    )


def use_fast_quantized_linears(model: nn.Module) -> int:
    """Swap every affine 4/8-bit, group 32/64 nn.QuantizedLinear of `model` in place for
    `QuantizedLinear`; return how many were swapped."""
    swaps = [(path, QuantizedLinear.from_quantized(m)) for path, m in model.named_modules() if _swappable(m)]
    if swaps:
        from mlx.utils import tree_unflatten

        model.update_modules(tree_unflatten(swaps))
    return len(swaps)


def x8_note(model: nn.Module) -> str | None:
    """The stderr note for a run whose decode matmuls quantize x to int8 (BB_QMM_X8 on CUDA with
    4-bit group-32 layers): the numbers differ from MLX's own kernels, so a run says so once."""
    if not (X8 and backend.BACKEND == "cuda"):
        return None
    if not any(getattr(m, "bits", None) == 4 and getattr(m, "group_size", None) == qmv8.GROUP
               for _, m in model.named_modules()):
        return None
    return ("decode matmuls of 1-2 tokens quantize activations to int8 per group of 32, as llama.cpp's "
            "CUDA decode does (BB_QMM_X8=0: fp16 activations)")


class FusedQuantizedLinear(nn.Module):
    """Several quantized linears on the same input (q/k/v, gate/up) as one matmul launch.

    Weights, scales, biases (and bias, if any layer has one) are concatenated along N once;
    __call__ returns one output per original layer. Rows may be stored in another order, for
    a pair epilogue of the CUDA kernel: with `rope` (the attention's qkv_rope arguments) in
    `rope_pair_order` (`project_rope_store`), with `glu_pair` (gate, up) in `glu_pair_order`
    (`glu`). `fused` then puts its output back in the layers' order (one gather)."""

    def __init__(self, layers: list[nn.QuantizedLinear], rope: dict | None = None, glu_pair: bool = False):
        super().__init__()
        first = layers[0]
        for l in layers:
            if not isinstance(l, nn.QuantizedLinear) or l.get("biases") is None:
                raise ValueError("FusedQuantizedLinear: needs affine nn.QuantizedLinear layers")
            if (l.bits, l.group_size, l["weight"].shape[1]) != (
                first.bits, first.group_size, first["weight"].shape[1]
            ) or l["scales"].dtype != first["scales"].dtype:
                raise ValueError("FusedQuantizedLinear: layers differ in bits, group size, K or dtype")
        self.group_size, self.bits = first.group_size, first.bits
        self.sizes = [l["weight"].shape[0] for l in layers]
        self.weight = mx.concatenate([l["weight"] for l in layers])
        self.scales = mx.concatenate([l["scales"] for l in layers])
        self.biases = mx.concatenate([l["biases"] for l in layers])
        if any("bias" in l for l in layers):
            dt = first["scales"].dtype
            self.bias = mx.concatenate(
                [l["bias"].astype(dt) if "bias" in l else mx.zeros((n,), dt) for l, n in zip(layers, self.sizes)]
            )
        self.rope_layout = None  # (Hq, Hkv, D, traditional) when the rows are in rope_pair_order
        self.glu_paired = False  # the rows are in glu_pair_order
        self._unorder = None
        order = None
        if rope is not None and rope["head_dim"] % 16 == 0 and sum(self.sizes) == (
                rope["n_heads"] + 2 * rope["n_kv_heads"]) * rope["head_dim"]:
            layout = pair_layout(rope)
            order = rope_pair_order(*layout)
            object.__setattr__(self, "rope_layout", layout)  # plain attributes, not parameters
        elif glu_pair and len(self.sizes) == 2 and self.sizes[0] == self.sizes[1] and self.sizes[0] % 8 == 0:
            order = glu_pair_order(self.sizes[0])
            self.glu_paired = True
        if order is not None:
            ix = mx.array(order, dtype=mx.int32)
            for name in ("weight", "scales", "biases", "bias"):
                if name in self:
                    self[name] = mx.take(self[name], ix, axis=0)
            object.__setattr__(self, "_unorder", inverse_order(order))
        _add_packed(self)
        mx.eval(self.parameters())
        self.freeze()

    def glu(self, x: mx.array, norm: nn.RMSNorm | None = None) -> mx.array:
        """silu(gate(n)) * up(n), n = norm(x), for the fused pair (gate, up): on CUDA the gate
        product is the matmul kernel's epilogue where it covers the call and the rows are paired."""
        w, scales, biases = self["weight"], self["scales"], self["biases"]
        if not self.glu_paired:
            return _silu_mul(self.fused(x, norm))
        m, n, k = _shape_info(x, w, scales, biases, self.group_size, self.bits)
        if _x8_takes(m, n, k, x, scales, biases, self.group_size, self.bits, self.get("bias"), rows_a_unit=2):
            return _x8_run(x, w, scales, biases, n // 2, None, _norm_args(norm), glu_pair=True)
        cfg = _kernel_config(m, n, k, x, scales, biases, self.group_size, self.bits)
        if cfg is not None:
            y = _run_kernel(cfg, x, w, scales, biases, self.group_size, self.bits, m, n, k, self.get("bias"), None,
                            False, _norm_args(norm), glu_pair=True, **layer_extras(self))
            return y.reshape(*x.shape[:-1], n // 2)
        y = quantized_matmul(x, w, scales, biases, group_size=self.group_size, bits=self.bits,
                             bias=self.get("bias"), norm=_norm_args(norm), **layer_extras(self))
        y = y.reshape(*x.shape[:-1], n // 16, 2, 8)  # the paired rows: [gate 8 | up 8] per tile
        return (nn.silu(y[..., 0, :]) * y[..., 1, :]).reshape(*x.shape[:-1], n // 2)

    def fused(self, x: mx.array, norm: nn.RMSNorm | None = None, stored_order: bool = False) -> mx.array:
        """The outputs side by side along the last axis, as one array (of norm(x)); with
        stored_order, in the order the rows are stored (rope_pair_order, glu_pair_order)."""
        y = quantized_matmul(
            x, self["weight"], self["scales"], self["biases"],
            group_size=self.group_size, bits=self.bits, bias=self.get("bias"),
            norm=_norm_args(norm), **layer_extras(self),
        )
        return y if self._unorder is None or stored_order else mx.take(y, self._unorder, axis=-1)

    def __call__(self, x: mx.array) -> list[mx.array]:
        y = self.fused(x)
        cuts, acc = [], 0
        for n in self.sizes[:-1]:
            acc += n
            cuts.append(acc)
        return mx.split(y, cuts, axis=-1)


def fuse_quantized_projections(model: nn.Module, pair_order: bool | None = None) -> int:
    """Replace each layer's q/k/v and gate/up quantized projections by one fused launch
    (`qkv_proj`, `gate_up_proj`, which the model files use when present); returns the count.
    pair_order (default: on CUDA, where the kernel's pair epilogues use it): q/k/v rows in
    `rope_pair_order` (unless BB_QMM_ROPE=0), gate/up rows in `glu_pair_order` (unless
    BB_QMM_GLU_PAIR=0)."""
    if pair_order is None:
        pair_order = backend.BACKEND == "cuda"
    fused = 0
    for layer in getattr(model, "layers", []):
        rope = getattr(layer.self_attn, "rope", None) if pair_order and FUSE_ROPE else None
        for parent, names, new in ((layer.self_attn, ("q_proj", "k_proj", "v_proj"), "qkv_proj"),
                                   (layer.mlp, ("gate_proj", "up_proj"), "gate_up_proj")):
            parts = [parent.get(n) for n in names]
            if not all(isinstance(p, nn.QuantizedLinear) and p.get("biases") is not None for p in parts):
                continue
            if len({(p.bits, p.group_size, p["weight"].shape[1]) for p in parts}) != 1:
                continue
            parent[new] = FusedQuantizedLinear(parts, rope if new == "qkv_proj" else None,
                                               glu_pair=pair_order and GLU_PAIR and new == "gate_up_proj")
            for n in names:
                parent.pop(n)
            fused += 1
    return fused
