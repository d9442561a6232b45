"""4-bit matrix-vector products for decode with the activations in int8 (llama.cpp's mmvq
idea: Q4 weights against q8_1 activations). CUDA kernel, with a pure-MLX twin elsewhere and as
the test oracle. The model's decode matmuls of one or two tokens take it on CUDA (qmm's dispatch:
`qmm._x8_takes`; BB_QMM_X8, on by default since session 26; 0 turns it off).

Why: at M=1 the fp16 path (`qmm`) is bound by instruction issue, not by the weight read. On the
H200 (session 24, `scripts/h200_phase_probe.py`) a plain streaming read of the 7B layer's
4-bit weights takes 42.6 us a layer; with the fp16 path's work on each 4-byte word (~19
instructions: codes to fp16, scale and bias, a product) 67 us; with what an int8 path does
(~7: two LOP3 and a shift make the 8 codes bytes, two DP4A take them against int8 x, one
conversion and scaling a group) 46 us. `qmm`'s kernels take 62 us.

The numbers change: x is quantized to int8 per group of 32 (scale max|x| / 127, round to
nearest even), so y carries that rounding as well as the weights'. What stays exact: the codes'
products with the int8 x (integer sums), and the bias term, which takes the group's exact sum of
x. Per group g of 32 k and row n:

    y[m, n] = sum_g scales[n, g] * (d[m, g] * sum_k code[n, k] * xq[m, k] + e8[m, g]) + biases[n, g] * sx[m, g]

with d = max|x_g| / 127, xq = rint(x * (127 / max|x_g|)), sx = sum(x_g) and e8 = 8 * (sx - d * sum_k xq) in fp32.
The e8 term makes x's rounding error meet code - 8 (about the weight minus its group's mean)
rather than the code (0..15): on one random case (N=64, K=256) the error fell from 1.8e-2 to
6.0e-3 of max|y|. On the H200 the error against float32 is 4.6-5.8e-3 of max|y| on the 7B
matrices, against 2.7-4.3e-4 for the fp16 path.

The kernel: each block takes a contiguous run of rows, so every SM reads the same bytes. Its
threads form slots of LPR lanes: a warp a row where rows are many (gate/up, lm_head), 128 or
256 lanes sharing a row's groups where they are few (o_proj, q/k/v, down: one warp a row left
1-2 rows a warp). A lane takes one group of 32 k of a row at a time (one 16-byte load = the
group's four words); a step loads R rows x U groups a lane before any product, and the first
step's loads go out before x is quantized. x is quantized into shared memory by the whole
block (each word's even k in one int, its odd k in the next, as the codes come out of
`& 0x0f0f0f0f` and `>> 4`), or, where one step covers a row and the staging would take several
groups a thread (down_proj at M=1), by each lane for its own groups into registers (XREG).
Epilogues for the decode step (`Epilogue`): the RMSNorm of x in that prologue, or a producer's
share of it (x = y * weight and its partial sums of squares, qmm.PendingNorm); the gate product
of paired gate/up rows (qmm.glu_pair_order); a residual; and the next norm's share out (y *
weight and each block's sums of squares). M = 1..4, 4-bit, group 32, fp16 or bf16.

Measured on the H200 (session 25, `results/h200-2026-11-30-s25/`, M=1, kernel time, 2 blocks an
SM): gate/up 23.9 us against 29.2 on the fp16 path, lm_head 82.5 against 97.7, down 15.0
against 18.9, o_proj 5.1 against 5.5, q/k/v 7.6 against 8.0; at M=2 only gate/up and lm_head
are faster. The decode step of the 7B shape (attention excluded) with BB_QMM_X8=1: B=1 1.873
-> 1.603-1.605 ms, B=2 1.99 -> 1.80. There q/k/v ran on the fp16 kernel, whose epilogue rotates q
and k and writes the cache. This kernel has that epilogue too (a bias, and bbrope::PairRope on
each pair of rows, as the fp16 kernel's QmmRopeCfg); session 26 (`results/h200-2026-11-30-s26/`)
ran it: q/k/v in the step 8.5 -> 6.8 us, B=1 1.604 -> 1.556-1.558 ms (BB_QMM_X8=noqkv against 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from batchbench import backend
from batchbench.kernels import spec as kspec
from batchbench.kernels.rope import ROPE_HEADER
from batchbench.kernels.spec import KernelSpec, Launch

GROUP = 32
MAX_M = 4
THREADS = 256
BLOCKS_PER_SM = 2  # session 24 (call19): 4 lost on down (33.9 against 27.8 us) and o_proj, won only on lm_head

HEADER = r"""
#ifndef BB_QMV8_HEADER
#define BB_QMV8_HEADER
// One group of 32 x values (four 16-byte loads) to int8 codes, each word's even k's four bytes in
// out[2j], its odd k's in out[2j + 1] (as the weight codes come out of & 0x0f0f0f0f and >> 4), the
// scale d = max|x| / 127, the exact sum sx and e8 = 8 (sx - d * sum(codes)). e8 centres the weight
// codes: s * (d * dot + e8) = s * d * dot(code - 8, xq) + 8 s sx, so x's rounding meets code - 8
// (about w - mean(w)) instead of code (0..15). NM 1 (NORM): x * rinv * nw first; 2 (NPRE): x * rinv.
template <typename T, int NM>
__device__ __forceinline__ void bb_qmv8_quant(const uint4 raw[4], const T* __restrict__ nwg, float rinv, int out[8],
                                              float& d, float& sum, float& e8) {
  float v[32];
  float amax = 0.f;
  sum = 0.f;
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    const uint4 u = raw[c];
    const T* e = reinterpret_cast<const T*>(&u);
    uint4 un = u;
    if constexpr (NM == 1) un = reinterpret_cast<const uint4*>(nwg)[c];
    const T* en = reinterpret_cast<const T*>(&un);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      float f = (float)e[i];
      if constexpr (NM == 1) f = f * rinv * (float)en[i];
      if constexpr (NM == 2) f = f * rinv;
      v[8 * c + i] = f;
      amax = fmaxf(amax, fabsf(f));
      sum += f;
    }
  }
  d = amax / 127.f;
  const float inv = amax > 0.f ? 127.f / amax : 0.f;  // one division a group
  int sq = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) {  // the group's four words
    unsigned int ev = 0u, od = 0u;
#pragma unroll
    for (int n = 0; n < 4; ++n) {
      const int qe = __float2int_rn(v[8 * j + 2 * n] * inv);
      const int qo = __float2int_rn(v[8 * j + 2 * n + 1] * inv);
      sq += qe + qo;
      ev |= ((unsigned int)qe & 255u) << (8 * n);
      od |= ((unsigned int)qo & 255u) << (8 * n);
    }
    out[2 * j] = (int)ev;
    out[2 * j + 1] = (int)od;
  }
  e8 = 8.f * (sum - d * (float)sq);
}

template <typename T, int NM>
__device__ __forceinline__ void bb_qmv8_group(const T* __restrict__ xg, const T* __restrict__ nwg, float rinv,
                                              int out[8], float& d, float& sum, float& e8) {
  uint4 raw[4];
#pragma unroll
  for (int c = 0; c < 4; ++c) raw[c] = reinterpret_cast<const uint4*>(xg)[c];
  bb_qmv8_quant<T, NM>(raw, nwg, rinv, out, d, sum, e8);
}

// NPRE: rsqrt(mean(y^2) + eps) of each token from a producer's partial sums of squares pss
// [npt, MT] (its tiles or blocks), summed by one warp a token; lane 0 of each warp gets it.
// All of a lane's loads go out at once up to 16 * 32 partials (a loop with a runtime count kept
// them a few round trips to L2 apart).
template <int MT>
__device__ __forceinline__ float bb_qmv8_pre_rinv(const float* __restrict__ pss, int npt, int m, int K, float eps) {
  const int lane = threadIdx.x & 31;
  float v[16];
#pragma unroll
  for (int u = 0; u < 16; ++u) {
    const int t = lane + 32 * u;
    v[u] = t < npt ? pss[(size_t)t * MT + m] : 0.f;
  }
  float q = 0.f;
#pragma unroll
  for (int u = 0; u < 16; ++u) q += v[u];
  for (int t = lane + 512; t < npt; t += 32) q += pss[(size_t)t * MT + m];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) q += __shfl_xor_sync(0xffffffffu, q, o);
  return rsqrtf(q / (float)K + eps);
}

// x [MT, K] -> every group's codes, d, sx and e8 in shared memory, a thread a group. NM as in
// bb_qmv8_group: NORM takes a block-wide sum of squares a token first, NPRE the producer's sums.
template <typename T, int K, int MT, int NM>
__device__ __forceinline__ void bb_qmv8_stage(const T* __restrict__ x, const T* __restrict__ nw,
                                              const float* __restrict__ pss, int npt, float eps, int* xq,
                                              float* xd, float* xs, float* xe) {
  constexpr int G = K / 32;
  __shared__ float rinv[MT];
  __shared__ float part[32];
  if constexpr (NM == 1) {
    for (int m = 0; m < MT; ++m) {
      float ss = 0.f;
      for (int c = threadIdx.x; c < K / 8; c += blockDim.x) {
        const uint4 u = reinterpret_cast<const uint4*>(x + (size_t)m * K)[c];
        const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
        for (int i = 0; i < 8; ++i) ss = fmaf((float)e[i], (float)e[i], ss);
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
      if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = ss;
      __syncthreads();
      if (threadIdx.x == 0) {
        float t = 0.f;
        for (int k = 0; k < (int)(blockDim.x >> 5); ++k) t += part[k];
        rinv[m] = rsqrtf(t / (float)K + eps);
      }
      __syncthreads();
    }
  }
  int t1 = threadIdx.x;
  if constexpr (NM == 2) {
    // a thread's first group is loaded before the partial sums are, both in flight together
    uint4 raw[4];
    const int m0 = threadIdx.x / G, g0 = threadIdx.x - m0 * G;
    if (threadIdx.x < MT * G) {
#pragma unroll
      for (int c = 0; c < 4; ++c) raw[c] = reinterpret_cast<const uint4*>(x + (size_t)m0 * K + g0 * 32)[c];
    }
    for (int m = threadIdx.x >> 5; m < MT; m += blockDim.x >> 5) {
      const float r = bb_qmv8_pre_rinv<MT>(pss, npt, m, K, eps);
      if ((threadIdx.x & 31) == 0) rinv[m] = r;
    }
    __syncthreads();
    if (threadIdx.x < MT * G)
      bb_qmv8_quant<T, NM>(raw, nullptr, rinv[m0], xq + m0 * (K / 4) + g0 * 8, xd[threadIdx.x], xs[threadIdx.x],
                           xe[threadIdx.x]);
    t1 += blockDim.x;
  }
  for (int t = t1; t < MT * G; t += blockDim.x) {
    const int m = t / G, g = t - m * G;
    bb_qmv8_group<T, NM>(x + (size_t)m * K + g * 32, nw + g * 32, NM ? rinv[m] : 1.f, xq + m * (K / 4) + g * 8,
                         xd[t], xs[t], xe[t]);
  }
}

// The 8 codes of a word against its 8 int8 x values (even k in xe, odd k in xo).
__device__ __forceinline__ int bb_qmv8_dot(unsigned int u, int xe, int xo, int acc) {
  acc = __dp4a((int)(u & 0x0f0f0f0fu), xe, acc);
  return __dp4a((int)((u >> 4) & 0x0f0f0f0fu), xo, acc);
}

// The q/k/v epilogue (RC): bb_qmv8_rope rotates each pair of rows and writes q and the cache
// (bbrope::PairRope, as qmm's QmmRopeCfg); bb_qmv8_norope: none.
template <int D, int HQ, int HKV, bool TRAD>
struct bb_qmv8_rope : bbrope::PairRope<D, HQ, HKV, TRAD> {
  static constexpr bool ON = true;
};
struct bb_qmv8_norope {
  static constexpr bool ON = false;
};

// Each block takes a contiguous run of units (every SM reads the same bytes): a unit is a row,
// or with GLU a (gate, up) pair of rows (glu_pair_order: each 16-row tile is 8 gate rows, then
// their 8 up rows) and its output silu(gate) * up. Its threads form slots of LPR lanes (32: a
// warp a unit, 128 or 256: warps share a unit's groups); a slot takes R units a step, each lane
// U groups of each row (one 16-byte load a row and group), all loads of a step in flight before
// the products; the next step's go out before this step's reduce, the first step's before x is
// quantized (weights need no x). With LPR > 32 the warps' sums meet in shared memory
// (double-buffered: one barrier a step). RES adds res [MT, N / (GLU ? 2 : 1)] to the output.
// XREG: where one step covers a row (LPR * U >= G) a lane only ever meets its own U groups of
// x, so it quantizes those into registers itself: no shared x, no barrier before the products
// (the block-wide staging held down_proj, K = 18944, at 16.5 us against a 11 us floor).
// NPRE: x is a producer's y * nw and pss its sums of squares (qmm.PendingNorm). NOUT: also
// yw = y * onw and this block's sums of squares of y, ss [gridDim.x, MT]: the next norm's share.
// BIAS adds lbias [N] to each row's sum. RC::ON: a unit is a pair of rows in rope_pair_order, and
// y is q [HQ, MT, D] (k and v go into rp's cache buffers).
template <typename T, int K, int MT, int R, int U, int LPR, bool NORM, bool RES, bool GLU, bool NPRE, bool NOUT,
          bool XREG, bool BIAS, typename RC>
__device__ __forceinline__ void bb_qmv8(const T* __restrict__ x, const unsigned int* __restrict__ w,
                                        const T* __restrict__ scales, const T* __restrict__ biases,
                                        const T* __restrict__ nw, const T* __restrict__ res,
                                        const T* __restrict__ onw, const float* __restrict__ pss, const int npt,
                                        const T* __restrict__ lbias, const bbrope::RopeIO<T> rp,
                                        T* __restrict__ y, T* __restrict__ yw, float* __restrict__ ss,
                                        const int N, const float eps) {
  constexpr int G = K / 32;
  constexpr int WPS = LPR / 32;  // warps a slot
  constexpr bool PAIRED = GLU || RC::ON;
  constexpr int NR = PAIRED ? 2 : 1;  // rows a unit
  constexpr int RR = R * NR;      // rows a slot and step
  constexpr int NM = NORM ? 1 : (NPRE ? 2 : 0);
  static_assert(!(NORM && NPRE), "qmv8: one norm of x");
  static_assert(!(GLU && RC::ON) && !(RC::ON && (RES || NOUT)), "qmv8: the RoPE pair takes no other epilogue");
  static_assert(!XREG || (!NORM && LPR * U >= G), "qmv8: x in registers needs one step a row and no block norm");
  extern __shared__ uint4 bb_qmv8_smem[];
  int* xq = reinterpret_cast<int*>(bb_qmv8_smem);
  float* xd = reinterpret_cast<float*>(xq + MT * (K / 4));
  float* xs = xd + MT * G;
  float* xe = xs + MT * G;
  float* red = XREG ? reinterpret_cast<float*>(bb_qmv8_smem) : xe + MT * G;  // [2][slots][WPS][RR][MT] (LPR > 32)
  const int NU = N / NR;
  const int slots = blockDim.x / LPR;
  const int slot = threadIdx.x / LPR, sl = threadIdx.x - slot * LPR;
  const int lane = threadIdx.x & 31, wis = sl >> 5;
  const int ub = (int)((long long)blockIdx.x * NU / gridDim.x);
  const int ue = (int)((long long)(blockIdx.x + 1) * NU / gridDim.x);
  const uint4* w4 = reinterpret_cast<const uint4*>(w);
  uint4 q[U][RR];
  float sc[U][RR], bi[U][RR];
  constexpr int XU = XREG ? U : 1, XM = XREG ? MT : 1;
  int xc[XU][XM][8];
  float xdr[XU][XM], xsr[XU][XM], xer[XU][XM];
  float ssq[NOUT ? MT : 1];
#pragma unroll
  for (int m = 0; m < (NOUT ? MT : 1); ++m) ssq[m] = 0.f;
  // one step's loads for a slot's units from ps, groups from g0
  auto load = [&](int ps, int g0) {
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int i = 0; i < RR; ++i) {
        const int p = ps + i / NR, h = i % NR;
        const int g = g0 + LPR * u;
        const bool ok = g < G && p < ue;
        const int row = PAIRED ? (p >> 3) * 16 + h * 8 + (p & 7) : p;
        const size_t o = (size_t)row * G + g;
        q[u][i] = ok ? w4[o] : make_uint4(0u, 0u, 0u, 0u);
        sc[u][i] = ok ? (float)scales[o] : 0.f;
        bi[u][i] = ok ? (float)biases[o] : 0.f;
      }
  };
  // the output of unit p for token m from its rows' sums
  // What a step's stores take besides the sums, loaded (and the RoPE angle taken) at its start.
  struct Ops {
    float res = 0.f, nw = 0.f, b0 = 0.f, b1 = 0.f, c = 1.f, s = 0.f;
    int cell = 0;
  };
  // (the first row of unit p; with pairs its partner is 8 rows on)
  auto row0 = [&](int p) { return PAIRED ? (p >> 3) * 16 + (p & 7) : p; };
  auto store = [&](int m, int p, float a0, float a1, const Ops& o) {
    if constexpr (BIAS) {
      a0 += o.b0;
      a1 += o.b1;
    }
    if constexpr (RC::ON) {
      RC::template store<T>(a0, a1, row0(p), m, MT, rp, y, typename RC::Prep{o.c, o.s, o.cell});
      return;
    }
    float v = GLU ? a0 / (1.f + expf(-a0)) * a1 : a0;
    if constexpr (RES) v += o.res;
    const T t = (T)v;
    y[(size_t)m * NU + p] = t;
    if constexpr (NOUT) {
      const float hf = (float)t;
      yw[(size_t)m * NU + p] = (T)(hf * o.nw);
      ssq[m] = fmaf(hf, hf, ssq[m]);
    }
  };
  auto ops_of = [&](int m, int p) {
    Ops o{};
    if constexpr (RES) o.res = (float)res[(size_t)m * NU + p];
    if constexpr (NOUT) o.nw = (float)onw[p];
    if constexpr (BIAS) {
      o.b0 = (float)lbias[row0(p)];
      if constexpr (PAIRED) o.b1 = (float)lbias[row0(p) + 8];
    }
    if constexpr (RC::ON) {
      const typename RC::Prep q = RC::template prep<T>(row0(p), m, rp);
      o.c = q.c;
      o.s = q.s;
      o.cell = q.cell;
    }
    return o;
  };
  constexpr bool OPS = RES || NOUT || BIAS || RC::ON;
  // A step's store operands go out with its products, not after its reduce: thread (LPR > 32)
  // or lane (LPR == 32) e holds those of the step's output e (unit e / MT, token e % MT).
  auto preload = [&](int r0) {
    const int e = LPR > 32 ? (int)threadIdx.x : lane;
    const int m = e % MT, i = (e / MT) % R, j = e / (MT * R);
    const int p = LPR > 32 ? r0 + j * R + i : r0 + slot * R + e / MT;
    const bool ok = (LPR > 32 ? e < slots * R * MT : e < R * MT) && p < ue;
    return ok ? ops_of(m, p) : Ops{};
  };
  load(ub + slot * R, sl);
  if constexpr (XREG) {
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      const float rv = NPRE ? bb_qmv8_pre_rinv<MT>(pss, npt, m, K, eps) : 1.f;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int g = sl + LPR * u;
        if (g < G) {
          bb_qmv8_group<T, NM>(x + (size_t)m * K + g * 32, nullptr, rv, xc[u][m], xdr[u][m], xsr[u][m], xer[u][m]);
        } else {
#pragma unroll
          for (int j = 0; j < 8; ++j) xc[u][m][j] = 0;
          xdr[u][m] = xsr[u][m] = xer[u][m] = 0.f;
        }
      }
    }
  } else {
    bb_qmv8_stage<T, K, MT, NM>(x, nw, pss, npt, eps, xq, xd, xs, xe);
    __syncthreads();
  }
  int buf = 0;
  for (int r0 = ub; r0 < ue; r0 += slots * R) {
    const int ps = r0 + slot * R;
    Ops pre{};
    if constexpr (OPS) pre = preload(r0);
    float acc[RR][MT];
#pragma unroll
    for (int i = 0; i < RR; ++i)
#pragma unroll
      for (int m = 0; m < MT; ++m) acc[i][m] = 0.f;
    for (int g0 = sl; g0 < G; g0 += LPR * U) {
      if (g0 != sl) load(ps, g0);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int g = g0 + LPR * u;
        if (g >= G) break;
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          int4 a, b;
          float d, s, e;
          if constexpr (XREG) {
            a = make_int4(xc[u][m][0], xc[u][m][1], xc[u][m][2], xc[u][m][3]);
            b = make_int4(xc[u][m][4], xc[u][m][5], xc[u][m][6], xc[u][m][7]);
            d = xdr[u][m];
            s = xsr[u][m];
            e = xer[u][m];
          } else {
            const int4* xg = reinterpret_cast<const int4*>(xq + m * (K / 4) + g * 8);
            a = xg[0];
            b = xg[1];
            d = xd[m * G + g];
            s = xs[m * G + g];
            e = xe[m * G + g];
          }
#pragma unroll
          for (int i = 0; i < RR; ++i) {
            int dot = bb_qmv8_dot(q[u][i].x, a.x, a.y, 0);
            dot = bb_qmv8_dot(q[u][i].y, a.z, a.w, dot);
            dot = bb_qmv8_dot(q[u][i].z, b.x, b.y, dot);
            dot = bb_qmv8_dot(q[u][i].w, b.z, b.w, dot);
            acc[i][m] = fmaf(sc[u][i], fmaf(d, (float)dot, e), fmaf(bi[u][i], s, acc[i][m]));
          }
        }
      }
    }
    if (r0 + slots * R < ue) load(ps + slots * R, sl);
#pragma unroll
    for (int i = 0; i < RR; ++i)
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        float v = acc[i][m];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        acc[i][m] = v;
        if constexpr (LPR > 32) {
          if (lane == 0) red[(((buf * slots + slot) * WPS + wis) * RR + i) * MT + m] = v;
        }
      }
    if constexpr (LPR == 32) {
      static_assert(LPR > 32 || R * MT <= 32, "qmv8: a warp's lanes hold a step's epilogue operands");
#pragma unroll
      for (int i = 0; i < R; ++i)
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          const int src = i * MT + m;
          Ops o{};
          if constexpr (RES) o.res = __shfl_sync(0xffffffffu, pre.res, src);
          if constexpr (NOUT) o.nw = __shfl_sync(0xffffffffu, pre.nw, src);
          if constexpr (BIAS) {
            o.b0 = __shfl_sync(0xffffffffu, pre.b0, src);
            o.b1 = __shfl_sync(0xffffffffu, pre.b1, src);
          }
          if constexpr (RC::ON) {
            o.c = __shfl_sync(0xffffffffu, pre.c, src);
            o.s = __shfl_sync(0xffffffffu, pre.s, src);
            o.cell = __shfl_sync(0xffffffffu, pre.cell, src);
          }
          if (lane == 0 && ps + i < ue) store(m, ps + i, acc[i * NR][m], acc[i * NR + NR - 1][m], o);
        }
    } else {
      __syncthreads();
      for (int t = threadIdx.x; t < slots * R * MT; t += blockDim.x) {
        const int m = t % MT, i = (t / MT) % R, j = t / (MT * R);
        const int p = r0 + j * R + i;
        if (p < ue) {
          float v[NR];
#pragma unroll
          for (int h = 0; h < NR; ++h) {
            v[h] = 0.f;
#pragma unroll
            for (int k = 0; k < WPS; ++k) v[h] += red[(((buf * slots + j) * WPS + k) * RR + i * NR + h) * MT + m];
          }
          // preloaded for t == threadIdx.x, the only round where blockDim covers them all
          const Ops o = t == (int)threadIdx.x ? pre : ops_of(m, p);
          if constexpr (NOUT) {
            // m is t % MT: unrolled over MT so that ssq stays in registers
#pragma unroll
            for (int mm = 0; mm < MT; ++mm)
              if (mm == m) store(mm, p, v[0], v[NR - 1], o);
          } else {
            store(m, p, v[0], v[NR - 1], o);
          }
        }
      }
      buf ^= 1;
    }
  }
  if constexpr (NOUT) {
    __shared__ float nsum[32][MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      float v = ssq[m];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lane == 0) nsum[threadIdx.x >> 5][m] = v;
    }
    __syncthreads();
    if (threadIdx.x < MT) {
      float t = 0.f;
      for (int k = 0; k < (int)(blockDim.x >> 5); ++k) t += nsum[k][threadIdx.x];
      ss[(size_t)blockIdx.x * MT + threadIdx.x] = t;
    }
  }
}
#endif  // BB_QMV8_HEADER
"""
HEADER = ROPE_HEADER + kspec.compact(HEADER)  # MLX hashes the source on every launch


# The RoPE epilogue's operands (as qmm's): positions and cells [M] int32, the layer's K and V
# cache buffers, written in place through a const_cast (see rope.qkv_rope_store).
_ROPE_IO = ("bbrope::RopeIO<T>{pos, cells, const_cast<T*>(kc), const_cast<T*>(vc), (int)kc_shape[2], "
            "__int_as_float(LOG2_BASE_BITS), __int_as_float(SCALE_BITS)}")


def source(norm: bool, res: bool, pre: bool = False, nout: bool = False, bias: bool = False,
           rope: bool = False) -> str:
    rc = "bb_qmv8_rope<RD, HQ, HKV, TRAD>" if rope else "bb_qmv8_norope"
    return (f"bb_qmv8<T, K, MT, R, U, LPR, NORM, RES, GLU, NPRE, NOUT, XREG, {'true' if bias else 'false'}, {rc}>("
            "x, w, scales, biases, "
            f"{'nw' if norm else '(const T*)nullptr'}, {'res' if res else '(const T*)nullptr'}, "
            f"{'onw' if nout else '(const T*)nullptr'}, {'pss' if pre else '(const float*)nullptr'}, "
            f"{'pss_shape[0]' if pre else '0'}, {'lbias' if bias else '(const T*)nullptr'}, "
            f"{_ROPE_IO if rope else 'bbrope::RopeIO<T>{}'}, y, {'yw' if nout else '(T*)nullptr'}, "
            f"{'ss' if nout else '(float*)nullptr'}, w_shape[0], __int_as_float(EPS_BITS));")


# x in registers (XREG) up to this many rows: a lane keeps U groups x M rows of codes (11 registers
# each), which at M = 2 on down_proj (U = 3) would be 66 on top of the weights' ~36.
XREG_MAX_M = 1


@dataclass(frozen=True)
class X8Config:
    r: int  # units (rows, or gate/up pairs of rows) a slot and step
    u: int  # groups a lane and row in one step (each a 16-byte load)
    blocks: int  # blocks of THREADS
    lpr: int = 32  # lanes a unit (32, 64, 128 or 256): a slot
    xreg: bool = False  # each lane quantizes its own groups of x into registers (needs lpr * u >= K / 32)


def choose_config(m: int, n: int, k: int, sms: int | None = None, rows_a_unit: int = 1,
                  block_norm: bool = False) -> X8Config:
    """A warp a row where there are eight rows a warp or more (gate/up, lm_head); else a row's
    groups over 128 or 256 lanes (a warp a row left down at 27 us against 18.8 on the fp16 path:
    one or two rows a warp). n counts units (rows, or gate/up pairs of rows_a_unit = 2). R units
    a step so that ~8 16-byte loads are in flight a lane (up to 10 where that makes a block's
    units one step) and a block's units fit its slots.
    x in registers where a row is one step, rows are shared by 128 or more lanes (a warp a row
    would quantize every group in every warp), the block's staging would take more than one
    group a thread and x needs no block-wide norm (block_norm). Session 25 (H200, M=1): down_proj
    (592 groups) 16.4 -> 15.0 us with x in registers, o_proj (112) 5.1 -> 5.3."""
    from batchbench.kernels.qmm import sm_count

    blocks = (sms or sm_count()) * BLOCKS_PER_SM
    warps = blocks * THREADS // 32
    g = k // GROUP
    lpr = 32 if n >= 8 * warps else (256 if g > 128 else 128)
    u = max(1, min(8, -(-g // lpr)))
    slots = THREADS // lpr
    rows = -(-n // blocks)
    one_step = -(-rows // slots)  # units a slot takes for the block's run to be one step
    # up to 10 loads a lane where that makes the run one step (q/k/v pairs: 5 instead of 4,
    # whose second step held one pair: a whole load round for it; not yet measured)
    r = one_step if one_step * u * rows_a_unit <= 10 else max(1, min(max(1, 8 // (u * rows_a_unit)), one_step))
    xreg = m <= XREG_MAX_M and lpr >= 128 and lpr * u >= g and m * g > THREADS and not block_norm
    return X8Config(r=r, u=u, blocks=blocks, lpr=lpr, xreg=xreg)


def covered(m: int, k: int, dtype, group_size: int, bits: int, biases) -> bool:
    return (1 <= m <= MAX_M and bits == 4 and group_size == GROUP and k % GROUP == 0 and biases is not None
            and dtype in (mx.float16, mx.bfloat16))


def smem_bytes(m: int, k: int, cfg: X8Config, pair: bool = False) -> int:
    """Dynamic shared memory: x's codes and group constants (unless x is in registers), and with
    LPR > 32 the warps' sums [2][slots][warps a slot][R rows (2R with pairs)][M]."""
    red = 2 * THREADS // 32 * cfg.r * (2 if pair else 1) * m * 4 if cfg.lpr > 32 else 0
    return red if cfg.xreg else m * k + 3 * m * (k // GROUP) * 4 + red


@dataclass(frozen=True)
class Epilogue:
    """What the kernel does around the product: norm (weight [K], eps) on x first, or prenorm
    (sums of squares [P, M] float32, eps): x is a producer's y * weight and the rows still need
    rsqrt(mean(y^2) + eps) (qmm.PendingNorm); the gate product of paired rows (glu_pair_order,
    output [M, N / 2]); a residual added to the output; norm_out (the next norm's weight
    [N_out]): also y * weight and the sums of squares of y, the next norm's share; bias [N];
    rope (a qmm.RopeStore): rows in rope_pair_order, q [1, Hq, M, D] out rotated, k and v
    written into its cache buffers at its cells (no residual, norm share or gate product)."""

    norm: tuple[mx.array, float] | None = None
    residual: mx.array | None = None
    glu_pair: bool = False
    prenorm: tuple[mx.array, float] | None = None
    norm_out: mx.array | None = None
    bias: mx.array | None = None  # [N], added to each row's sum (before a pair epilogue)
    rope: object | None = None  # a qmm.RopeStore: the q/k/v RoPE pair epilogue (rows in rope_pair_order)


def plan(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array,
         config: X8Config | None = None, epi: Epilogue = Epilogue()) -> tuple[KernelSpec, Launch]:
    """The CUDA kernel and launch for x [M, K] against w [N, K / 8] (4-bit, group 32)."""
    m, k = x.shape
    n = w.shape[0]
    nr = 2 if epi.glu_pair else 1
    if epi.glu_pair and n % 16:
        raise ValueError(f"qmv8: the gate/up pair needs N % 16 == 0, got {n}")
    norm, res, pre, nout = (epi.norm is not None, epi.residual is not None, epi.prenorm is not None,
                            epi.norm_out is not None)
    bias, rope = epi.bias is not None, epi.rope is not None
    if norm and pre:
        raise ValueError("qmv8: norm and prenorm do not combine")
    if rope:
        if epi.glu_pair or res or nout or n % 16 or n != epi.rope.width:
            raise ValueError(f"qmv8: the RoPE pair takes N = (Hq + 2 Hkv) * D rows in rope_pair_order and no "
                             f"gate product, residual or norm share; got N={n}")
        nr = 2
    if bias and tuple(epi.bias.shape) != (n,):
        raise ValueError(f"qmv8: the bias must be [{n}], got {tuple(epi.bias.shape)}")
    cfg = config or choose_config(m, n // nr, k, rows_a_unit=nr, block_norm=norm)
    if cfg.lpr not in (32, 64, 128, 256):
        raise ValueError(f"qmv8: lanes a row must be 32, 64, 128 or 256, got {cfg.lpr}")
    if cfg.xreg and (norm or cfg.lpr * cfg.u < k // GROUP):
        raise ValueError("qmv8: x in registers needs lpr * u >= K / 32 and no norm of x")
    smem = smem_bytes(m, k, cfg, nr == 2)  # a gate/up or RoPE pair: two rows a unit
    names = (("x", "w", "scales", "biases") + (("nw",) if norm else ()) + (("res",) if res else ())
             + (("onw",) if nout else ()) + (("pss",) if pre else ()) + (("lbias",) if bias else ())
             + (("pos", "cells", "kc", "vc") if rope else ()))
    spec = KernelSpec("cuda", f"bb_qmv8_{smem}" + "_n" * norm + "_r" * res + "_p" * pre + "_o" * nout
                      + "_x" * cfg.xreg + "_b" * bias + "_rope" * rope, names, ("y", "yw", "ss") if nout else ("y",),
                      source(norm, res, pre, nout, bias, rope), HEADER, shared_memory=smem)
    n_out = n // nr
    inputs = ([x, w, scales, biases] + ([epi.norm[0]] if norm else []) + ([epi.residual.reshape(m, n_out)] if res else [])
              + ([epi.norm_out] if nout else []) + ([epi.prenorm[0]] if pre else [])
              + ([epi.bias.astype(x.dtype)] if bias else []) + (epi.rope.inputs() if rope else []))
    eps = epi.norm[1] if norm else epi.prenorm[1] if pre else 0.0
    y_shape = (1, epi.rope.n_heads, m, epi.rope.head_dim) if rope else (m, n_out)
    launch = Launch(inputs=inputs,
                    output_shapes=[y_shape] + ([(m, n_out), (cfg.blocks, m)] if nout else []),
                    output_dtypes=[x.dtype] + ([x.dtype, mx.float32] if nout else []),
                    grid=(cfg.blocks * THREADS, 1, 1), threadgroup=(THREADS, 1, 1),
                    template=[("T", x.dtype), ("K", k), ("MT", m), ("R", cfg.r), ("U", cfg.u), ("LPR", cfg.lpr),
                              ("NORM", norm), ("RES", res), ("GLU", epi.glu_pair), ("NPRE", pre), ("NOUT", nout),
                              ("XREG", cfg.xreg), ("EPS_BITS", kspec.f32_bits(eps))]
                    + (epi.rope.template() if rope else []))
    return spec, launch


def run(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, config: X8Config | None = None,
        epi: Epilogue = Epilogue()):
    """The CUDA kernel on x [M, K]: y [M, N] (glu_pair: [M, N / 2]) in x's dtype; with
    epi.norm_out, (y, y * weight, sums of squares [blocks, M] float32)."""
    out = kspec.run(*plan(x, w, scales, biases, config, epi))
    return tuple(out) if epi.norm_out is not None else out[0]


def quantize_x(x: mx.array) -> tuple[mx.array, mx.array, mx.array, mx.array]:
    """(codes [M, K] int32, d, sx, e8 [M, G] float32) as the kernel makes them."""
    m, k = x.shape
    xg = x.astype(mx.float32).reshape(m, k // GROUP, GROUP)
    amax = mx.max(mx.abs(xg), axis=-1)
    d = amax / 127.0
    inv = mx.where(amax > 0, 127.0 / mx.where(amax > 0, amax, 1.0), 0.0)  # one division a group
    codes = mx.round(xg * inv[..., None]).astype(mx.int32)
    sx = mx.sum(xg, axis=-1)
    e8 = 8.0 * (sx - d * mx.sum(codes, axis=-1).astype(mx.float32))
    return codes.reshape(m, k), d, sx, e8


def unpack_codes(w: mx.array) -> mx.array:
    """4-bit codes [N, K] int32 of MLX's affine layout (k at bits 4 * (k % 8) of word k // 8)."""
    shifts = mx.arange(0, 32, 4, dtype=mx.uint32)
    return ((w[..., None] >> shifts) & 15).astype(mx.int32).reshape(w.shape[0], -1)


def twin(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, epi: Epilogue = Epilogue()):
    """The kernel's arithmetic in MLX ops (integer group sums exact, the rest fp32); returns
    what `run` returns (the sums of squares as one partial, [1, M]). With a bias; not the RoPE
    epilogue (take its y, rows in rope_pair_order, to `rope.unpair` and `rope.qkv_rope`)."""
    if epi.rope is not None:
        raise ValueError("qmv8.twin: no RoPE epilogue; the twin of that is twin(...) with the bias, "
                         "then rope.unpair and rope.qkv_rope")
    m, k = x.shape
    n = w.shape[0]
    xf = x.astype(mx.float32)
    if epi.norm is not None:
        nw, eps = epi.norm
        xf = xf * mx.rsqrt(mx.mean(xf * xf, axis=-1, keepdims=True) + eps) * nw.astype(mx.float32)
    if epi.prenorm is not None:
        pss, eps = epi.prenorm
        xf = xf * mx.rsqrt(mx.sum(pss, axis=0) / k + eps)[:, None]
    codes, d, sx, e8 = quantize_x(xf)
    qw = unpack_codes(w).reshape(n, k // GROUP, GROUP)
    qx = codes.reshape(m, k // GROUP, GROUP)
    # integer sums per (m, n, g): exact in fp32 while |sum| < 2^24 (32 * 15 * 127 is far below)
    dots = mx.einsum("mgk,ngk->mng", qx.astype(mx.float32), qw.astype(mx.float32))
    s, b = scales.astype(mx.float32), biases.astype(mx.float32)
    y = mx.sum(s[None] * (d[:, None, :] * dots + e8[:, None, :]) + b[None] * sx[:, None, :], axis=-1)
    if epi.bias is not None:
        y = y + epi.bias.astype(mx.float32)
    if epi.glu_pair:  # each 16-row tile: 8 gate rows, then their 8 up rows
        y = y.reshape(m, n // 16, 2, 8)
        gate, up = y[:, :, 0, :], y[:, :, 1, :]
        y = (gate / (1 + mx.exp(-gate)) * up).reshape(m, n // 2)
    if epi.residual is not None:
        y = y + epi.residual.reshape(y.shape).astype(mx.float32)
    y = y.astype(x.dtype)
    if epi.norm_out is None:
        return y
    hf = y.astype(mx.float32)
    return y, (hf * epi.norm_out.astype(mx.float32)).astype(x.dtype), mx.sum(hf * hf, axis=-1)[None]


def quantized_matvec_x8(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, *,
                        group_size: int = GROUP, bits: int = 4, norm: tuple[mx.array, float] | None = None,
                        residual: mx.array | None = None, glu_pair: bool = False,
                        prenorm: tuple[mx.array, float] | None = None, norm_out: mx.array | None = None,
                        bias: mx.array | None = None, rope=None):
    """y = x @ dequantize(w)^T with x quantized to int8 per group of 32 (see the module doc).
    x [..., K] with at most MAX_M rows; norm (weight, eps): RMSNorm of x first; prenorm (sums
    of squares [P, M] float32, eps): x is a producer's y * weight, scaled by rsqrt(mean + eps)
    first; glu_pair: rows in glu_pair_order, output silu(gate) * up [..., N / 2]; residual added
    to the output; norm_out (weight [N_out]): returns (y, y * weight, sums of squares [P, M]
    float32), the next norm's share; bias [N]; rope (a qmm.RopeStore, CUDA only): returns q
    [1, Hq, M, D] rotated and writes k and v into its cache buffers. The CUDA kernel on CUDA,
    the twin elsewhere."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if not covered(m, k, x.dtype, group_size, bits, biases):
        raise ValueError(f"quantized_matvec_x8: needs 1..{MAX_M} rows, 4-bit group-32 weights with biases and fp16 "
                         f"or bf16 x, got {m} rows, {bits}-bit group {group_size}, {x.dtype}")
    if w.shape[1] * 8 != k or scales.shape != (w.shape[0], k // GROUP) or scales.dtype != x.dtype:
        raise ValueError(f"quantized_matvec_x8: weights {tuple(w.shape)} / scales {tuple(scales.shape)} "
                         f"{scales.dtype} do not match x [.., {k}] {x.dtype}")
    n_out = w.shape[0] // (2 if glu_pair else 1)
    if norm is not None and (tuple(norm[0].shape) != (k,) or norm[0].dtype != x.dtype):
        raise ValueError(f"quantized_matvec_x8: the norm weight must be [{k}] {x.dtype}")
    if prenorm is not None and (norm is not None or prenorm[0].ndim != 2 or prenorm[0].shape[1] != m
                                or prenorm[0].dtype != mx.float32):
        raise ValueError(f"quantized_matvec_x8: prenorm needs sums [P, {m}] float32 and no norm")
    if norm_out is not None and (tuple(norm_out.shape) != (n_out,) or norm_out.dtype != x.dtype):
        raise ValueError(f"quantized_matvec_x8: the output norm weight must be [{n_out}] {x.dtype}")
    if residual is not None and residual.size != m * n_out:
        raise ValueError(f"quantized_matvec_x8: the residual must hold {m} x {n_out} values, got {tuple(residual.shape)}")
    if bias is not None and tuple(bias.shape) != (w.shape[0],):
        raise ValueError(f"quantized_matvec_x8: the bias must be [{w.shape[0]}], got {tuple(bias.shape)}")
    epi = Epilogue(norm=norm, residual=residual, glu_pair=glu_pair, prenorm=prenorm, norm_out=norm_out, bias=bias,
                   rope=rope)
    if rope is not None:
        if backend.BACKEND != "cuda":
            raise ValueError("quantized_matvec_x8: the RoPE epilogue is the CUDA kernel's only")
        return run(x2, w, scales, biases, epi=epi)
    out = run(x2, w, scales, biases, epi=epi) if backend.BACKEND == "cuda" else twin(x2, w, scales, biases, epi)
    if norm_out is None:
        return out.reshape(*lead, n_out)
    y, yw, ss = out
    return y.reshape(*lead, n_out), yw.reshape(*lead, n_out), ss
