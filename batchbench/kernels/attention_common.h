// Block-skipping flash decode attention: the algorithm, shared by CUDA and Metal.
//
// One thread block per (token row, kv head [, chunk of 16 query heads], split). Its W warps
// walk 32-cell KV blocks; a block is loaded only if it may hold a visible cell: either it is
// in the row's live list (LIVE) or one of its 32 mask values is not -inf (SKIP, in-kernel
// scan). The G query heads of the GQA group share one tensor-core tile, so every K/V element
// is read once per (row, kv head): with G <= 8 they are its 8 columns (S^T = K Q^T, O^T += V^T
// P^T), else 16 rows (Q K^T, P V). Online softmax runs in fp32 in the log2 domain.
// Splits write partial (O, max, sum) to `ws`; the last MG splits to finish (atomic counter)
// merge them, each one part of the output, so the whole layer is one launch. A counter's low 16
// bits (the count) are left at zero for the next call; the bits above count launches.
//
// The backend layer (attention_cuda.h / attention_metal.h) supplies BB_FN, BB_GLOBAL,
// BB_SHARED, BB_THREAD, BB_UNROLL, warp/block primitives and the chip helpers
// bb_cp_async16, bb_ldsm_rows(_trans), bb_mma_16816, bb_movmatrix_trans.
#ifndef BB_ATTENTION_COMMON_H
#define BB_ATTENTION_COMMON_H

#define BB_BLOCK 32     // KV cells per block
#define BB_MAX_SPLIT 64 // merge factors kept in shared memory; the merge reads two splits a lane
#define BB_LIST_CAP 256 // block ids buffered per warp
#define BB_MASK_STAGE 128 // bytes of one block's 32 mask values in a pipeline stage (fp32 masks)

// Shared tiles (K, V, Q) hold rows of D 2-byte elements. Where D is a multiple of 64 the rows are
// unpadded and the 16-byte chunks of row r are permuted by XOR with r % 8 (the permutation stays
// within each 128-byte line): ldmatrix's 8 rows of one chunk then hit 8 different bank groups,
// and a warp's 16-byte cp.async stores still fill whole, aligned lines. Other D pad each row by
// 16 bytes instead. (Padded rows at D=128 made the walk's copies stream ~8% slower on the H200:
// a walk without arithmetic read B=32 x 8192's K/V in 118.6 us into unpadded rows, 128.8 into
// padded ones; the kernel went 135 -> 123 us. results/h200-2026-12-01-s38.)
constexpr BB_FN bool bb_attn_swizzled(int d) { return d % 64 == 0; }
constexpr BB_FN int bb_attn_pitch(int d) { return bb_attn_swizzled(d) ? d : d + 8; }
template <int D>
struct BBTile {
  // element offset of (row r, column c)
  static BB_FN int at(int r, int c) {
    // (the 128-byte line c & ~63 added apart: callers' column offsets within a line then stay
    // register + immediate)
    return bb_attn_swizzled(D) ? r * D + (c & ~63) + (((((c & 63) >> 3) ^ (r & 7)) << 3) | (c & 7))
                               : r * (D + 8) + c;
  }
};

#ifndef BB_HAS_MOVMATRIX
// The 8x8 matrix of 16-bit values held in mma fragment layout (lane 4 i + j: row i, columns 2j,
// 2j + 1), transposed: what movmatrix.trans does, from two shuffles. Metal's version, and CUDA's
// under BB_PORTABLE.
BB_FN uint32_t bb_movmatrix_trans(uint32_t x, int lane) {
  const int g = lane >> 2, c = lane & 3;
  const uint32_t v0 = bb_shfl(x, 8 * c + (g >> 1));     // row 2c, the column pair holding g
  const uint32_t v1 = bb_shfl(x, 8 * c + 4 + (g >> 1)); // row 2c + 1
  const uint32_t sh = (uint32_t)(g & 1) * 16u;
  return ((v0 >> sh) & 0xffffu) | (((v1 >> sh) & 0xffffu) << 16);
}
#endif

#ifndef BB_HAS_MMA
// Plain mma.m16n8k16 (C[16x8] += A[16x16] B[16x8], fp32 accumulate) from warp shuffles: Metal's
// version, and CUDA's under BB_PORTABLE (the emulator's), so both run one code.
template <typename T>
BB_FN void bb_mma_16816(BB_THREAD float* acc, BB_THREAD const uint32_t* a, uint32_t b0, uint32_t b1, int lane) {
  const int g = lane >> 2, c = lane & 3;
  BB_UNROLL
  for (int cc = 0; cc < 4; ++cc) {
    // Row g / g+8 of A, columns 2cc, 2cc+1 (+8), held by lane 4g + cc.
    const int la = 4 * g + cc;
    float a0l, a0h, a1l, a1h, a2l, a2h, a3l, a3h;
    bb_unpack2<T>(bb_shfl(a[0], la), &a0l, &a0h);
    bb_unpack2<T>(bb_shfl(a[1], la), &a1l, &a1h);
    bb_unpack2<T>(bb_shfl(a[2], la), &a2l, &a2h);
    bb_unpack2<T>(bb_shfl(a[3], la), &a3l, &a3h);
    // Column n of B, rows 2cc, 2cc+1 (+8), held by lane 4n + cc; n = 2c, 2c+1.
    const int lb0 = 8 * c + cc, lb1 = 8 * c + 4 + cc;
    float b00l, b00h, b01l, b01h, b10l, b10h, b11l, b11h;
    bb_unpack2<T>(bb_shfl(b0, lb0), &b00l, &b00h);
    bb_unpack2<T>(bb_shfl(b1, lb0), &b01l, &b01h);
    bb_unpack2<T>(bb_shfl(b0, lb1), &b10l, &b10h);
    bb_unpack2<T>(bb_shfl(b1, lb1), &b11l, &b11h);
    acc[0] += a0l * b00l + a0h * b00h + a2l * b01l + a2h * b01h;
    acc[1] += a0l * b10l + a0h * b10h + a2l * b11l + a2h * b11h;
    acc[2] += a1l * b00l + a1h * b00h + a3l * b01l + a3h * b01h;
    acc[3] += a1l * b10l + a1h * b10h + a3l * b11l + a3h * b11h;
  }
}
#endif

// A split's partial record in ws, in bytes: O [GH][D], then (max, sum) [GH][2] in fp32 padded
// to 16 bytes. O is held in T divided by the split's sum: a convex combination of V rows, so T
// holds it, and the last split reads half the bytes of fp32. (BB_REC32: O in fp32 relative to
// the split's max, not divided; the kernel before the thirty-second session, for A/B runs.)
#ifdef BB_REC32
#define BB_REC_ESIZE(esize) 4
#else
#define BB_REC_ESIZE(esize) (esize)
#endif
constexpr BB_FN int bb_attn_rec_bytes(int gh, int d, int rsize) { return gh * d * rsize + ((gh * 2 + 3) & ~3) * 4; }

// Shared (threadgroup) memory, in bytes; attention.py mirrors this. The walk uses the pipeline
// tiles, the per-warp block lists, each stage's mask values and the Q tile. After its walk each
// warp leaves its O rows and (max, sum) in its own tiles (WSLICE in bb_attn_decode), so it need
// not wait for the others. Once the split's record is written, the same bytes hold the merge header (fac_s,
// flag_s) and then the last split's staging of the split records (at least one record).
// O rows are padded by 8 floats: a warp's 8-byte stores of its rows g and g + 8 then hit every
// bank once per two wavefronts (unpadded, the 8 rows g of one store shared 8 banks: 8-way).
constexpr BB_FN int bb_attn_opitch(int d) { return d + 8; }
constexpr BB_FN int bb_attn_merge_hdr() { return 4 * (BB_MAX_SPLIT * 16) + 16; } // fac_s, flag_s
constexpr BB_FN int bb_attn_maxi(int a, int b) { return a > b ? a : b; }
// The Q tile (16 rows of D, padded) after the pipeline tiles, lists and mask stages.
constexpr BB_FN int bb_attn_qt_offset(int d, int w, int stages, int esize) {
  return w * stages * 2 * BB_BLOCK * bb_attn_pitch(d) * esize + w * BB_LIST_CAP * 4 + w * stages * BB_MASK_STAGE;
}
template <int D, int W, int STAGES, int ESIZE, int GH>
constexpr BB_FN int bb_attn_smem_bytes() {
  return bb_attn_maxi(bb_attn_qt_offset(D, W, STAGES, ESIZE) + 16 * bb_attn_pitch(D) * ESIZE,
                      bb_attn_merge_hdr() + bb_attn_rec_bytes(GH, D, BB_REC_ESIZE(ESIZE)));
}

// Append the lanes with `ok` to list[at..] in lane order; returns how many were appended.
BB_FN int bb_attn_append(BB_SHARED int* list, int at, bool ok, int b, int lane) {
  const uint32_t m = bb_ballot(ok);
  if (ok) {
    list[at + bb_popc(m & ((1u << lane) - 1u))] = b;
  }
  return bb_popc(m);
}

// The 32-cell blocks one warp processes, ascending, buffered BB_LIST_CAP at a time in a
// per-warp list in shared memory (so their addresses are known one pipeline stage ahead):
//   LIVE:  entries base + i * step of the row's live list, 32 at a time (round-robin as
//          below). Each lane's entry of a round is loaded one round early (`ahead`; the
//          first round's together with the row's count), so no refill waits for a round trip;
//   else:  candidate blocks base + i * step with base = split * W + warp and
//          step = n_split * W (round-robin: contiguous runs of live blocks spread evenly
//          over splits and warps); with SKIP a candidate whose 32 mask values are all
//          -inf is dropped. The scan tests 32 candidates per warp step, one per lane,
//          with 16-byte loads, several steps in flight.
template <typename MT, typename MaskPtr, typename LivePtr, bool SKIP, bool LIVE>
struct BBCursor {
  MaskPtr mrow;         // mask row of this token
  LivePtr lrow;         // live row: [count, block0, block1, ...]
  BB_SHARED int* list;  // this warp's buffered block ids
  int n_used;           // N: cells in use (mask columns)
  int n_blk;            // ceil(N / 32)
  int base, step;       // candidate (or live entry) i is base + i * step
  int src, src_end;     // next candidate index, number of candidates
  int count, pos;       // list fill and read position
  bool vec_ok;          // mask buffer and rows 16-byte aligned
  int ahead;            // LIVE: this lane's entry of the next round, live row [1 + base + (src + lane) * step]

  BB_FN void fill(int lane) {
    int cnt = 0;
    if (LIVE) {
      while (cnt == 0 && src < src_end) { // one round, more only past rounds of bad entries
        const int j = src + lane;
        const int b = j < src_end ? ahead : -1;
        ahead = j + 32 < src_end ? lrow[1 + base + (j + 32) * step] : -1;
        // A bad entry must not send loads out of bounds.
        cnt += bb_attn_append(list, cnt, b >= 0 && b < n_blk, b, lane);
        src += 32;
      }
    } else if (SKIP) {
      constexpr int NV = 2 * (int)sizeof(MT); // 16-byte words per 32 mask values
      constexpr int U = 16 / NV;              // warp steps in flight
      const uint32_t hidden = bb_mask_hidden_word<MT>();
      while (cnt <= BB_LIST_CAP - 32 * U && src < src_end) {
        uint4 raw[U][NV];
        bool vis[U];
        BB_UNROLL
        for (int u = 0; u < U; ++u) {
          const int i = src + 32 * u + lane;
          const int b = base + i * step;
          vis[u] = false;
          if (i < src_end && vec_ok && (b + 1) * BB_BLOCK <= n_used) {
            BB_GLOBAL const uint4* p = (BB_GLOBAL const uint4*)(mrow + (long)b * BB_BLOCK);
            BB_UNROLL
            for (int w = 0; w < NV; ++w) {
              raw[u][w] = p[w];
            }
          } else {
            BB_UNROLL
            for (int w = 0; w < NV; ++w) {
              raw[u][w].x = raw[u][w].y = raw[u][w].z = raw[u][w].w = hidden;
            }
            if (i < src_end) { // partial last block or unaligned rows: value by value
              for (int e = 0; e < BB_BLOCK; ++e) {
                const int cell = b * BB_BLOCK + e;
                if (cell < n_used && bb_mask_value(mrow[cell]) != bb_neg_inf()) {
                  vis[u] = true;
                }
              }
            }
          }
        }
        BB_UNROLL
        for (int u = 0; u < U; ++u) {
          bool any = vis[u];
          BB_UNROLL
          for (int w = 0; w < NV; ++w) {
            any = any || raw[u][w].x != hidden || raw[u][w].y != hidden ||
                  raw[u][w].z != hidden || raw[u][w].w != hidden;
          }
          const int b = base + (src + 32 * u + lane) * step;
          cnt += bb_attn_append(list, cnt, any, b, lane);
        }
        src += 32 * U;
      }
    } else {
      while (cnt <= BB_LIST_CAP - 32 && src < src_end) {
        const int i = src + lane;
        cnt += bb_attn_append(list, cnt, i < src_end, base + i * step, lane);
        src += 32;
      }
    }
    count = cnt;
    pos = 0;
    bb_sync_warp();
  }

  BB_FN int next(int lane) {
    if (pos == count) {
      if (src >= src_end) {
        return -1;
      }
      bb_sync_warp(); // every lane has read the list before it is overwritten
      fill(lane);
      if (count == 0) {
        return -1;
      }
    }
    return list[pos++];
  }
};

// A block whose 32 mask values ride in its pipeline stage: whole, in a 16-byte aligned row.
// (BB_NO_MASK_STAGE: never, every block's values are loaded from global memory in the walk.)
BB_FN bool bb_attn_m_whole(bool aligned, int b, int n_used) {
#ifdef BB_NO_MASK_STAGE
  return false;
#else
  return aligned && (b + 1) * BB_BLOCK <= n_used;
#endif
}

// Issue the copies of K and V block `b` (32 rows of D) into one stage; rows >= N are zeroed
// (they may hold anything: the buffer is larger than the used range). With `m_stage`, the
// block's 32 mask values come along into `mt`, so the walk reads them from shared memory
// instead of waiting on a global load per block (a whole block of a 16-byte aligned row).
// (Row-wise cp.async.bulk copies on an mbarrier per stage were measured slower on the H200:
// B=32 x 8192 219 vs 138 us, results/h200-2026-11-29-s8.)
template <typename T, int D, typename MT, typename MaskPtr>
BB_FN void bb_attn_load_block(BB_SHARED T* kt, BB_SHARED T* vt, BB_SHARED MT* mt,
                              BB_GLOBAL const T* kh, BB_GLOBAL const T* vh, MaskPtr mrow,
                              bool m_stage, int b, int n_used, int lane) {
  constexpr int MPC = 16 / (int)sizeof(MT); // mask values per 16-byte chunk
  if (m_stage && lane < BB_BLOCK / MPC) {
    bb_cp_async16(mt + lane * MPC, mrow + (long)b * BB_BLOCK + lane * MPC, true);
  }
  constexpr int CPR = D / 8; // 16-byte chunks per row
  if (bb_attn_swizzled(D)) {
    // BBTile<D>::at(r, 8 cc), spelled so that the lane's part is computed once: a warp step
    // covers RPI whole rows, and r % 8 = r0 | (RPI j % 8) since r0 < RPI.
    constexpr int RPI = 32 / CPR;
    const int r0 = lane / CPR, cc = lane % CPR;
    const int x = (cc & 7) ^ r0;
    BB_UNROLL
    for (int j = 0; j < BB_BLOCK / RPI; ++j) {
      const int r = r0 + RPI * j;
      const int cell = b * BB_BLOCK + r;
      const bool ok = cell < n_used;
      const long goff = (long)(ok ? cell : 0) * D + cc * 8;
      const int soff = r * D + (cc & ~7) * 8 + ((x ^ ((RPI * j) & 7)) << 3);
      bb_cp_async16(kt + soff, kh + goff, ok);
      bb_cp_async16(vt + soff, vh + goff, ok);
    }
    return;
  }
  BB_UNROLL
  for (int i = lane; i < BB_BLOCK * CPR; i += 32) {
    const int r = i / CPR, cc = i % CPR;
    const int cell = b * BB_BLOCK + r;
    const bool ok = cell < n_used;
    const long goff = (long)(ok ? cell : 0) * D + cc * 8;
    const int soff = BBTile<D>::at(r, cc * 8);
    bb_cp_async16(kt + soff, kh + goff, ok);
    bb_cp_async16(vt + soff, vh + goff, ok);
  }
}

// The last split's merge: acc += f * the 4 values of item i4 of one staged split record (O in
// fp32 under BB_REC32, else in the activation dtype T).
template <typename T>
BB_FN void bb_attn_merge_add(BB_THREAD float* acc, BB_SHARED const unsigned char* rec, float f, int i4) {
#ifdef BB_REC32
  const float4 pv = *(BB_SHARED const float4*)(rec + 16 * i4);
  acc[0] += f * pv.x;
  acc[1] += f * pv.y;
  acc[2] += f * pv.z;
  acc[3] += f * pv.w;
#else
  const uint2 pw = *(BB_SHARED const uint2*)(rec + 8 * i4);
  float p0, p1, p2, p3;
  bb_unpack2<T>(pw.x, &p0, &p1);
  bb_unpack2<T>(pw.y, &p2, &p3);
  acc[0] += f * p0;
  acc[1] += f * p1;
  acc[2] += f * p2;
  acc[3] += f * p3;
#endif
}

// The merge's staging: from each of sb split records (REC bytes apart from recs), the part's
// QC chunks of 16 bytes from byte `off`, into `stage` one record after another; one commit group.
template <int QC, int REC, int NTH>
BB_FN void bb_attn_stage_part(BB_SHARED unsigned char* stage, BB_GLOBAL const unsigned char* recs, int sb, int off,
                              int tid) {
  for (int i = tid; i < sb * QC; i += NTH) {
    const int s2 = i / QC, c2 = i - s2 * QC;
    bb_cp_coherent16(stage + 16 * i, recs + (long)s2 * REC + off + 16 * c2);
  }
  bb_cp_async_commit();
}

// The merge's sums for one part (items lo..lo+PI-1) over sb staged records QB bytes apart:
// acc[4j..4j+3] += factor * item lo + k of each record, k = tid + j * NTH, clamped onto the part's
// last item (never stored), splits outer and four at a time, items inner and without a branch:
// the loads of 4 * IPTX independent products are in flight together. (A branch around each
// product kept the compiler from hoisting their loads: ~1 us of dependent shared-memory loads at
// 16 splits, H200.) fac: the factors [split][16 rows] of the first staged split.
template <typename T, int IPTX, int NTH, int D, int PI, int QB>
BB_FN void bb_attn_merge_sums(BB_THREAD float* acc, BB_SHARED const unsigned char* stage,
                              BB_SHARED const float* fac, int sb, int lo, int tid) {
  int u = 0;
  for (; u + 4 <= sb; u += 4) {
    BB_UNROLL
    for (int uu = 0; uu < 4; ++uu) {
      BB_UNROLL
      for (int j = 0; j < IPTX; ++j) {
        const int k = bb_mini(tid + j * NTH, PI - 1);
        bb_attn_merge_add<T>(acc + 4 * j, stage + (u + uu) * QB, fac[(u + uu) * 16 + (4 * (lo + k)) / D], k);
      }
    }
  }
  for (; u < sb; ++u) {
    BB_UNROLL
    for (int j = 0; j < IPTX; ++j) {
      const int k = bb_mini(tid + j * NTH, PI - 1);
      bb_attn_merge_add<T>(acc + 4 * j, stage + u * QB, fac[u * 16 + (4 * (lo + k)) / D], k);
    }
  }
}

// Row r of the W warps' partial results (each warp's slice: O [16][OP] floats relative to the
// warp's max, then (max, sum) [16][2], slices WSLICE floats apart) combined for the 4 elements
// d..d+3: a = sum of O_w * 2^(m_w - M), mm = M the row's max, ll = its sum (log2 domain). A warp
// with nothing visible in the row (max -inf) counts 0.
template <int W, int OP, int WSLICE>
BB_FN void bb_attn_warp_merge4(BB_SHARED const float* slices, int r, int d, BB_THREAD float* a,
                               BB_THREAD float* mm, BB_THREAD float* ll) {
  const float NEG_INF = bb_neg_inf();
  float mw[W];
  float m = NEG_INF;
  BB_UNROLL
  for (int w = 0; w < W; ++w) {
    mw[w] = slices[w * WSLICE + 16 * OP + r * 2];
    m = bb_maxf(m, mw[w]);
  }
  float l = 0.0f;
  a[0] = a[1] = a[2] = a[3] = 0.0f;
  BB_UNROLL
  for (int w = 0; w < W; ++w) {
    const float f = mw[w] == NEG_INF ? 0.0f : bb_exp2(mw[w] - m);
    l += f * slices[w * WSLICE + 16 * OP + r * 2 + 1];
    const float4 p = *(BB_SHARED const float4*)(slices + w * WSLICE + r * OP + d);
    a[0] += f * p.x;
    a[1] += f * p.y;
    a[2] += f * p.z;
    a[3] += f * p.w;
  }
  *mm = m;
  *ll = l;
}

// One online-softmax step of a row (a head) whose block maximum is mx (log2 domain): the new
// running maximum in *m, the reference this block's exponentials subtract in *ref (0 while
// nothing is visible: exp2(-inf - 0) = 0, never NaN), and, returned, the factor that rescales
// what was summed before.
BB_FN float bb_attn_softmax_step(float mx, BB_THREAD float* m, BB_THREAD float* ref) {
  const float mn = bb_maxf(*m, mx);
  *ref = mn == bb_neg_inf() ? 0.0f : mn;
  const float al = bb_exp2(*m - *ref);
  *m = mn;
  return al;
}

// 1 / a row's softmax sum, or 0 for a row with nothing visible (sum 0: its output is zeros,
// never NaN). Where the sum is not 0 it is >= 1 (the max's own term), so bb_rcp's approximation holds.
BB_FN float bb_attn_inv_sum(float l) { return l > 0.0f ? bb_rcp(l) : 0.0f; }

// Four values to T at an 8-byte aligned address (D is a multiple of 4 and buffers are aligned),
// stored as one uint2. (nvcc makes it one 8-byte store into the split records, two 4-byte
// stores into `out`, whose alignment it cannot see.)
template <typename T>
BB_FN void bb_attn_store4(BB_GLOBAL T* o, float x0, float x1, float x2, float x3) {
  uint2 w;
  w.x = bb_pack2<T>(x0, x1);
  w.y = bb_pack2<T>(x2, x3);
  *(BB_GLOBAL uint2*)o = w;
}

// Phase timestamps (diagnostic builds only: attention.py's `timeline`, CUDA). Thread 0 of every
// block writes BB_STAMPS pairs of 32-bit words after the split records in ws: its SM id, then
// the global timer at entry (1), list filled (2), first K/V block landed (3), walk done (4),
// warps merged (5), split counted (6; for a merger that waits, every split counted), end (7);
// a merger's part of the merge (the last part's, where one block merges them all): records'
// copies issued (8), weights done (9), records staged (10), sums done (11); and the live list's
// count in a register (12: its round trip at entry, before any K/V can be requested).
#define BB_STAMPS 13
#ifdef BB_TIMELINE
#define BB_STAMP_IF(i, cond)                 \
  do {                                       \
    if (tid == 0 && (cond)) {                \
      bb_stamp_write(stamps, (i));           \
    }                                        \
  } while (0)
#else
#define BB_STAMP_IF(i, cond) \
  do {                       \
  } while (0)
#endif
#define BB_STAMP(i) BB_STAMP_IF(i, true)
// Stamped once `v` is in a register: comparing `v` makes the stamp wait for the load that fills it.
#define BB_STAMP_AFTER(i, v) BB_STAMP_IF(i, (v) != -2147483647)

template <typename T, typename MT, int D, int G, int W, int STAGES, bool SKIP, bool LIVE, int MG,
          typename MaskPtr, typename LivePtr>
BB_FN void bb_attn_decode(BB_GLOBAL const T* q, BB_GLOBAL const T* k, BB_GLOBAL const T* v,
                          MaskPtr mask, LivePtr live, BB_GLOBAL int* counters,
                          BB_GLOBAL T* out, BB_GLOBAL float* ws,
                          int n_rows,     // T: token rows (q.shape[2])
                          int n_kv_heads, // Hkv
                          int n_cells,    // S: cells in the K/V buffer
                          int n_used,     // N: cells attended (mask columns)
                          int live_stride, float scale,
                          int bx,         // kv head + Hkv * head chunk
                          int split, int n_split, int row, int lane, int warp,
                          BB_SHARED unsigned char* smem) {
  constexpr int GH = G < 16 ? G : 16; // query heads of one block (rows of the mma tile)
  constexpr int HC = (G + 15) / 16;   // head chunks per kv head
  // A split's partial record in ws (bb_attn_rec_bytes): O [GH][D] in RT, then (max, sum) [GH][2].
#ifdef BB_REC32
  typedef float RT;
#else
  typedef T RT;
#endif
  constexpr int REC = bb_attn_rec_bytes(GH, D, (int)sizeof(RT)); // bytes, a multiple of 16
  constexpr int REC_ML = GH * D * (int)sizeof(RT);                // byte offset of (max, sum)
  constexpr int PITCH = bb_attn_pitch(D);
  constexpr int TILE = BB_BLOCK * PITCH;
  constexpr int KS = D / 16; // k-steps of Q K^T
  constexpr int NT = D / 8;  // n-tiles of O
  // G <= 8: each block computes S^T = K Q^T and O^T = V^T P^T (heads as the 8 columns of the
  // tiles); else Q K^T and P V with 16 heads as the rows.
  constexpr bool SWAP = G <= 8;
  const float LOG2E = 1.4426950408889634f;
  const float NEG_INF = bb_neg_inf();

  const int tid = warp * 32 + lane;
#ifdef BB_TIMELINE
  const long tl_records = n_split > 1 ? (long)n_rows * n_kv_heads * HC * n_split * (REC / 4) : 0;
  const long tl_block = ((long)row * n_kv_heads * HC + bx) * n_split + split;
  BB_GLOBAL uint32_t* stamps = (BB_GLOBAL uint32_t*)(ws + tl_records) + tl_block * 2 * BB_STAMPS;
  if (tid == 0) {  // a phase this block never reaches reads 0
    stamps[0] = bb_smid();
    for (int i = 1; i < 2 * BB_STAMPS; ++i) {
      stamps[i] = 0u;
    }
  }
#endif
  BB_STAMP(1);
  const int kvh = bx % n_kv_heads;
  const int hc = bx / n_kv_heads;
  const int head0 = kvh * G + hc * 16;
  const int rows_valid = bb_mini(GH, G - hc * 16);
  const int g = lane >> 2, c = lane & 3;
  const float qk_scale = scale * LOG2E;
  const int n_blk = (n_used + BB_BLOCK - 1) / BB_BLOCK;

  BB_GLOBAL const T* kh = k + (long)kvh * n_cells * D;
  BB_GLOBAL const T* vh = v + (long)kvh * n_cells * D;
  MaskPtr mrow = mask + (long)row * n_used;

  BBCursor<MT, MaskPtr, LivePtr, SKIP, LIVE> cur;
  cur.mrow = mrow;
  cur.lrow = LIVE ? live + (long)row * live_stride : live;
  cur.list = (BB_SHARED int*)(smem + W * STAGES * 2 * TILE * (int)sizeof(T)) + warp * BB_LIST_CAP;
  cur.n_used = n_used;
  cur.n_blk = n_blk;
  cur.vec_ok = (n_used * (int)sizeof(MT)) % 16 == 0 && bb_aligned16(mask);
  cur.src = 0;
  cur.count = 0;
  cur.pos = 0;
  cur.base = split * W + warp;
  cur.step = n_split * W;
  cur.ahead = -1;
  int count = 0;
  if (LIVE) {
    const int fi = 1 + cur.base + lane * cur.step;
    if (fi < live_stride) {
      cur.ahead = cur.lrow[fi];
    }
    count = cur.lrow[0];
  }

  // Q of the GQA group: its 16 rows (rows past the group zero) copied once per block into
  // shared memory, in a commit group of their own issued after the live list's loads, and read
  // as A fragments once the first stages are in flight. (Each warp loading its fragments from
  // global memory queued ~1000 sector requests an SM ahead of the live list's.)
  BB_SHARED T* qt = (BB_SHARED T*)(smem + bb_attn_qt_offset(D, W, STAGES, (int)sizeof(T)));
  {
    BB_GLOBAL const T* qrow = q + (long)head0 * n_rows * D + (long)row * D; // head0's row
    if (bb_aligned16(q)) { // rows are D >= 32 elements apart: 16-byte aligned with q
      constexpr int CPR = D / 8; // 16-byte chunks a row
      for (int i = tid; i < 16 * CPR; i += W * 32) {
        const int r = i / CPR, cc = i % CPR;
        const bool ok = r < rows_valid;
        bb_cp_async16(qt + BBTile<D>::at(r, cc * 8), qrow + (long)(ok ? r : 0) * n_rows * D + cc * 8, ok);
      }
    } else { // a view at an odd offset: 4-byte words
      for (int i = tid; i < 16 * (D / 2); i += W * 32) {
        const int r = i / (D / 2), w2 = i % (D / 2);
        *(BB_SHARED uint32_t*)(qt + BBTile<D>::at(r, 2 * w2)) =
            r < rows_valid ? *(BB_GLOBAL const uint32_t*)(qrow + (long)r * n_rows * D + 2 * w2) : 0u;
      }
    }
    bb_cp_async_commit();
  }

  BB_STAMP_AFTER(12, count);
  if (LIVE) {
    count = bb_mini(count, live_stride - 1);
    count = count < 0 ? 0 : count;
    cur.src_end = count - cur.base > 0 ? (count - cur.base + cur.step - 1) / cur.step : 0;
  } else {
    cur.src_end = n_blk - cur.base > 0 ? (n_blk - cur.base + cur.step - 1) / cur.step : 0;
  }

  float m0 = NEG_INF, m1 = NEG_INF; // running max (log2 domain) of rows g, g+8
  float l0 = 0.0f, l1 = 0.0f;       // this lane's part of the running sums
  float o[NT][4];
  BB_UNROLL
  for (int n = 0; n < NT; ++n) {
    o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  }

  BB_SHARED T* tiles = (BB_SHARED T*)smem + warp * (STAGES * 2 * TILE);
  // Each stage's 32 mask values (after the tiles and lists), for blocks bb_attn_m_whole admits.
  constexpr int MST = BB_MASK_STAGE / (int)sizeof(MT);
  BB_SHARED MT* mtiles = (BB_SHARED MT*)(smem + W * STAGES * 2 * TILE * (int)sizeof(T) + W * BB_LIST_CAP * 4) +
                         warp * (STAGES * MST);
  const bool m_aligned = cur.vec_ok;

  // Per-warp pipeline: STAGES blocks in flight, compute the oldest, refill its slot.
  int pend[STAGES];
  BB_UNROLL
  for (int s = 0; s < STAGES; ++s) {
    pend[s] = cur.next(lane);
    if (pend[s] >= 0) {
      bb_attn_load_block<T, D, MT>(tiles + s * 2 * TILE, tiles + s * 2 * TILE + TILE, mtiles + s * MST,
                                   kh, vh, mrow, bb_attn_m_whole(m_aligned, pend[s], n_used), pend[s], n_used, lane);
    }
    bb_cp_async_commit();
  }
  BB_STAMP(2);
  // Q's group is the oldest of STAGES + 1; every thread's copies landed before any warp reads.
  bb_cp_async_wait<STAGES>();
  bb_sync_block();
  // Q's fragments: the A operand of Q K^T (16 heads), or with SWAP the B operand of K Q^T (8
  // heads: qa[k][0..1]).
  uint32_t qa[KS][4];
  BB_UNROLL
  for (int kk = 0; kk < KS; kk += 2) {
    uint32_t lo[4], hi[4]; // rows g and g + 8, columns 16 kk + {0, 8, 16, 24} + 2c
    bb_ldsm_rows<T, BBTile<D>>(qt, 0, 16 * kk, lo, lane);
    if (SWAP) {
      qa[kk][0] = lo[0];
      qa[kk][1] = lo[1];
      qa[kk + 1][0] = lo[2];
      qa[kk + 1][1] = lo[3];
      qa[kk][2] = qa[kk][3] = qa[kk + 1][2] = qa[kk + 1][3] = 0u;
    } else {
      bb_ldsm_rows<T, BBTile<D>>(qt, 8, 16 * kk, hi, lane);
      qa[kk][0] = lo[0];
      qa[kk][1] = hi[0];
      qa[kk][2] = lo[1];
      qa[kk][3] = hi[1];
      qa[kk + 1][0] = lo[2];
      qa[kk + 1][1] = hi[2];
      qa[kk + 1][2] = lo[3];
      qa[kk + 1][3] = hi[3];
    }
  }
  int slot = 0;
#ifdef BB_TIMELINE
  bool tl_first = true;
#endif
  while (pend[0] >= 0) {
    const int b = pend[0];
    BB_SHARED T* kt = tiles + slot * 2 * TILE;
    BB_SHARED T* vt = kt + TILE;
    BB_SHARED MT* mt = mtiles + slot * MST;
    const bool staged = bb_attn_m_whole(m_aligned, b, n_used);

    if (SWAP) {
      // G <= 8 heads: S^T = K Q^T with the block's 32 cells as the rows of two m16 tiles and the
      // heads as the 8 columns, then O^T += V^T P^T: half the tensor-core work of 16-row Q tiles
      // (7 of 16 rows used at G=7) and half the exponentials a lane. A lane holds cells
      // 16 t + g (+8) of heads 2c, 2c + 1. (The walk's arithmetic was ~1 us of the B=2 x 4096
      // kernel, H200.)
      float mvs[2][2]; // mask of cells 16 t + g + 8 h
      if (!staged) {
        BB_UNROLL
        for (int t2 = 0; t2 < 2; ++t2) {
          BB_UNROLL
          for (int h = 0; h < 2; ++h) {
            const int cell = b * BB_BLOCK + 16 * t2 + g + 8 * h;
            mvs[t2][h] = cell < n_used ? bb_mask_value(mrow[cell]) * LOG2E : NEG_INF;
          }
        }
      }
      bb_cp_async_wait<STAGES - 1>();
      bb_sync_warp();
      if (staged) {
        BB_UNROLL
        for (int t2 = 0; t2 < 2; ++t2) {
          BB_UNROLL
          for (int h = 0; h < 2; ++h) {
            mvs[t2][h] = bb_mask_value(mt[16 * t2 + g + 8 * h]) * LOG2E;
          }
        }
      }
#ifdef BB_TIMELINE
      if (tl_first) {
        BB_STAMP(3);
        tl_first = false;
      }
#endif
      float st[2][4];
      BB_UNROLL
      for (int t2 = 0; t2 < 2; ++t2) {
        st[t2][0] = st[t2][1] = st[t2][2] = st[t2][3] = 0.0f;
        BB_UNROLL
        for (int kk = 0; kk < KS; kk += 2) {
          uint32_t lo[4], hi[4], ka[4];
          bb_ldsm_rows<T, BBTile<D>>(kt, 16 * t2, 16 * kk, lo, lane);
          bb_ldsm_rows<T, BBTile<D>>(kt, 16 * t2 + 8, 16 * kk, hi, lane);
          ka[0] = lo[0];
          ka[1] = hi[0];
          ka[2] = lo[1];
          ka[3] = hi[1];
          bb_mma_16816<T>(st[t2], ka, qa[kk][0], qa[kk][1], lane);
          ka[0] = lo[2];
          ka[1] = hi[2];
          ka[2] = lo[3];
          ka[3] = hi[3];
          bb_mma_16816<T>(st[t2], ka, qa[kk + 1][0], qa[kk + 1][1], lane);
        }
      }
      // Online softmax per head (column): m0, l0 for head 2c, m1, l1 for head 2c + 1, over the
      // 8 lanes g of a column (xor 4, 8, 16).
      float mx0 = NEG_INF, mx1 = NEG_INF;
      BB_UNROLL
      for (int t2 = 0; t2 < 2; ++t2) {
        st[t2][0] = st[t2][0] * qk_scale + mvs[t2][0];
        st[t2][1] = st[t2][1] * qk_scale + mvs[t2][0];
        st[t2][2] = st[t2][2] * qk_scale + mvs[t2][1];
        st[t2][3] = st[t2][3] * qk_scale + mvs[t2][1];
        mx0 = bb_maxf(mx0, bb_maxf(st[t2][0], st[t2][2]));
        mx1 = bb_maxf(mx1, bb_maxf(st[t2][1], st[t2][3]));
      }
      BB_UNROLL
      for (int x = 4; x <= 16; x <<= 1) {
        mx0 = bb_maxf(mx0, bb_shfl_xor(mx0, x));
        mx1 = bb_maxf(mx1, bb_shfl_xor(mx1, x));
      }
      float ref0, ref1;
      const float al0 = bb_attn_softmax_step(mx0, &m0, &ref0), al1 = bb_attn_softmax_step(mx1, &m1, &ref1);
      float ps0 = 0.0f, ps1 = 0.0f;
      BB_UNROLL
      for (int t2 = 0; t2 < 2; ++t2) {
        st[t2][0] = bb_exp2(st[t2][0] - ref0);
        st[t2][1] = bb_exp2(st[t2][1] - ref1);
        st[t2][2] = bb_exp2(st[t2][2] - ref0);
        st[t2][3] = bb_exp2(st[t2][3] - ref1);
        ps0 += st[t2][0] + st[t2][2];
        ps1 += st[t2][1] + st[t2][3];
      }
      l0 = l0 * al0 + ps0;
      l1 = l1 * al1 + ps1;
      BB_UNROLL
      for (int n = 0; n < D / 16; ++n) {
        o[n][0] *= al0;
        o[n][1] *= al1;
        o[n][2] *= al0;
        o[n][3] *= al1;
      }
      // O^T += V^T P^T: P^T's fragments are the score tiles transposed in registers.
      BB_UNROLL
      for (int kc = 0; kc < 2; ++kc) {
        const uint32_t pb0 = bb_movmatrix_trans(bb_pack2<T>(st[kc][0], st[kc][1]), lane);
        const uint32_t pb1 = bb_movmatrix_trans(bb_pack2<T>(st[kc][2], st[kc][3]), lane);
        BB_UNROLL
        for (int n = 0; n < D / 16; ++n) {
          uint32_t vr[4], va[4];
          bb_ldsm_rows_trans<T, BBTile<D>>(vt, 16 * kc, 16 * n, vr, lane);
          va[0] = vr[0];
          va[1] = vr[2];
          va[2] = vr[1];
          va[3] = vr[3];
          bb_mma_16816<T>(o[n], va, pb0, pb1, lane);
        }
      }
    } else {
      // Mask of this lane's 8 cells: from the stage, or else from global memory (issued first:
      // its latency hides behind Q K^T).
      float mv[4][2];
      if (!staged) {
        BB_UNROLL
        for (int j = 0; j < 4; ++j) {
          BB_UNROLL
          for (int e = 0; e < 2; ++e) {
            const int cell = b * BB_BLOCK + 8 * j + 2 * c + e;
            mv[j][e] = cell < n_used ? bb_mask_value(mrow[cell]) * LOG2E : NEG_INF;
          }
        }
      }

      bb_cp_async_wait<STAGES - 1>();
      bb_sync_warp();
      if (staged) {
        BB_UNROLL
        for (int j = 0; j < 4; ++j) {
          BB_UNROLL
          for (int e = 0; e < 2; ++e) {
            mv[j][e] = bb_mask_value(mt[8 * j + 2 * c + e]) * LOG2E;
          }
        }
      }
  #ifdef BB_TIMELINE
      if (tl_first) {
        BB_STAMP(3);
        tl_first = false;
      }
  #endif

      // S = Q K^T: 16 heads x 32 cells, n-tile j = cells 8j..8j+7.
      float s[4][4];
      BB_UNROLL
      for (int j = 0; j < 4; ++j) {
        s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
        BB_UNROLL
        for (int kk = 0; kk < KS; kk += 2) {
          uint32_t kb[4];
          bb_ldsm_rows<T, BBTile<D>>(kt, 8 * j, 16 * kk, kb, lane);
          bb_mma_16816<T>(s[j], qa[kk], kb[0], kb[1], lane);
          bb_mma_16816<T>(s[j], qa[kk + 1], kb[2], kb[3], lane);
        }
      }

      // Online softmax on rows g (s[.][0..1]) and g+8 (s[.][2..3]).
      float mx0 = NEG_INF, mx1 = NEG_INF;
      BB_UNROLL
      for (int j = 0; j < 4; ++j) {
        s[j][0] = s[j][0] * qk_scale + mv[j][0];
        s[j][1] = s[j][1] * qk_scale + mv[j][1];
        s[j][2] = s[j][2] * qk_scale + mv[j][0];
        s[j][3] = s[j][3] * qk_scale + mv[j][1];
        mx0 = bb_maxf(mx0, bb_maxf(s[j][0], s[j][1]));
        mx1 = bb_maxf(mx1, bb_maxf(s[j][2], s[j][3]));
      }
      mx0 = bb_maxf(mx0, bb_shfl_xor(mx0, 1));
      mx0 = bb_maxf(mx0, bb_shfl_xor(mx0, 2));
      mx1 = bb_maxf(mx1, bb_shfl_xor(mx1, 1));
      mx1 = bb_maxf(mx1, bb_shfl_xor(mx1, 2));
      float ref0, ref1;
      const float al0 = bb_attn_softmax_step(mx0, &m0, &ref0), al1 = bb_attn_softmax_step(mx1, &m1, &ref1);
      float ps0 = 0.0f, ps1 = 0.0f;
      BB_UNROLL
      for (int j = 0; j < 4; ++j) {
        s[j][0] = bb_exp2(s[j][0] - ref0);
        s[j][1] = bb_exp2(s[j][1] - ref0);
        s[j][2] = bb_exp2(s[j][2] - ref1);
        s[j][3] = bb_exp2(s[j][3] - ref1);
        ps0 += s[j][0] + s[j][1];
        ps1 += s[j][2] + s[j][3];
      }
      l0 = l0 * al0 + ps0;
      l1 = l1 * al1 + ps1;
      BB_UNROLL
      for (int n = 0; n < NT; ++n) {
        o[n][0] *= al0;
        o[n][1] *= al0;
        o[n][2] *= al1;
        o[n][3] *= al1;
      }

      // O += P V: P (16 x 32) from the score registers, V^T fragments via transposed loads.
      BB_UNROLL
      for (int kc = 0; kc < 2; ++kc) {
        uint32_t pa[4];
        pa[0] = bb_pack2<T>(s[2 * kc][0], s[2 * kc][1]);
        pa[1] = bb_pack2<T>(s[2 * kc][2], s[2 * kc][3]);
        pa[2] = bb_pack2<T>(s[2 * kc + 1][0], s[2 * kc + 1][1]);
        pa[3] = bb_pack2<T>(s[2 * kc + 1][2], s[2 * kc + 1][3]);
        BB_UNROLL
        for (int n = 0; n < NT; n += 2) {
          uint32_t vb[4];
          bb_ldsm_rows_trans<T, BBTile<D>>(vt, 16 * kc, 8 * n, vb, lane);
          bb_mma_16816<T>(o[n], pa, vb[0], vb[1], lane);
          bb_mma_16816<T>(o[n + 1], pa, vb[2], vb[3], lane);
        }
      }
    }
    bb_sync_warp(); // every lane is done with this slot before it is refilled

    const int nb = cur.next(lane);
    if (nb >= 0) {
      bb_attn_load_block<T, D, MT>(kt, vt, mt, kh, vh, mrow, bb_attn_m_whole(m_aligned, nb, n_used), nb, n_used, lane);
    }
    bb_cp_async_commit();
    BB_UNROLL
    for (int s2 = 0; s2 < STAGES - 1; ++s2) {
      pend[s2] = pend[s2 + 1];
    }
    pend[STAGES - 1] = nb;
    slot = slot + 1 == STAGES ? 0 : slot + 1;
  }
  bb_cp_async_wait<0>();
  BB_STAMP(4);

  // Row sums over the 4 lanes of a quad (SWAP: head sums over the 8 lanes of a column).
  if (SWAP) {
    BB_UNROLL
    for (int x = 4; x <= 16; x <<= 1) {
      l0 += bb_shfl_xor(l0, x);
      l1 += bb_shfl_xor(l1, x);
    }
  } else {
    l0 += bb_shfl_xor(l0, 1);
    l0 += bb_shfl_xor(l0, 2);
    l1 += bb_shfl_xor(l1, 1);
    l1 += bb_shfl_xor(l1, 2);
  }

  // ---- merge the W warps ----
  // Each warp leaves its O rows (not rescaled) and (max, sum) in its own tiles, which no other
  // warp touches, as soon as its walk is done; one barrier, then every thread combines the warps
  // for its own items (bb_attn_warp_merge4). (Before, a first barrier freed shared memory for the
  // slices, a second shared the warps' maxima and a third the rescaled rows.)
  constexpr int OP = bb_attn_opitch(D);
  constexpr int WSLICE = STAGES * 2 * TILE * (int)sizeof(T) / 4; // a warp's tiles, in floats
  bb_sync_warp(); // every lane of this warp is done with its tiles
  {
    BB_SHARED float* o_w = (BB_SHARED float*)smem + warp * WSLICE; // [16][OP], then [16][2]
    if (SWAP) { // heads 2c, 2c + 1; D rows 16 n + g (+8); rows 8..15 of the slice unused
      if (g == 0) {
        o_w[16 * OP + (2 * c) * 2 + 0] = m0;
        o_w[16 * OP + (2 * c) * 2 + 1] = l0;
        o_w[16 * OP + (2 * c + 1) * 2 + 0] = m1;
        o_w[16 * OP + (2 * c + 1) * 2 + 1] = l1;
      }
      BB_UNROLL
      for (int n = 0; n < D / 16; ++n) {
        const int d = 16 * n + g;
        o_w[(2 * c) * OP + d] = o[n][0];
        o_w[(2 * c + 1) * OP + d] = o[n][1];
        o_w[(2 * c) * OP + d + 8] = o[n][2];
        o_w[(2 * c + 1) * OP + d + 8] = o[n][3];
      }
    } else {
      if (c == 0) {
        o_w[16 * OP + g * 2 + 0] = m0;
        o_w[16 * OP + g * 2 + 1] = l0;
        o_w[16 * OP + (g + 8) * 2 + 0] = m1;
        o_w[16 * OP + (g + 8) * 2 + 1] = l1;
      }
      BB_UNROLL
      for (int n = 0; n < NT; ++n) {
        const int d = 8 * n + 2 * c;
        o_w[g * OP + d] = o[n][0];
        o_w[g * OP + d + 1] = o[n][1];
        o_w[(g + 8) * OP + d] = o[n][2];
        o_w[(g + 8) * OP + d + 1] = o[n][3];
      }
    }
  }
  bb_sync_block();
  BB_STAMP(5);
  const long pair = (long)row * (n_kv_heads * HC) + bx; // (row, kv head, head chunk)
  // Items of 4 consecutive elements of one row: 16-byte loads of each warp's O and one uint2
  // store (the element-wise loop was 2-byte stores and an IEEE division per element).
  constexpr int NI4 = GH * D / 4;
  if (n_split == 1) {
    for (int i = tid; i < NI4; i += W * 32) {
      const int r = (4 * i) / D, d = (4 * i) % D;
      if (r < rows_valid) {
        float a[4], mm, ll;
        bb_attn_warp_merge4<W, OP, WSLICE>((BB_SHARED const float*)smem, r, d, a, &mm, &ll);
        const float inv = bb_attn_inv_sum(ll);
        bb_attn_store4<T>(out + ((long)row * n_kv_heads * G + head0 + r) * D + d, a[0] * inv, a[1] * inv,
                          a[2] * inv, a[3] * inv);
      }
    }
  } else {
    // This split's partial record (REC above).
    BB_GLOBAL unsigned char* rec = (BB_GLOBAL unsigned char*)ws + (pair * n_split + split) * (long)REC;
    for (int i = tid; i < NI4; i += W * 32) {
      const int r = (4 * i) / D, d = (4 * i) % D;
      float a[4], mm, ll;
      bb_attn_warp_merge4<W, OP, WSLICE>((BB_SHARED const float*)smem, r, d, a, &mm, &ll);
      if (d == 0) { // the row's first item also leaves the row's (max, sum)
        ((BB_GLOBAL float*)(rec + REC_ML))[r * 2 + 0] = mm;
        ((BB_GLOBAL float*)(rec + REC_ML))[r * 2 + 1] = ll;
      }
#ifdef BB_REC32
      BB_GLOBAL float* rf = (BB_GLOBAL float*)rec + 4 * i;
      rf[0] = a[0];
      rf[1] = a[1];
      rf[2] = a[2];
      rf[3] = a[3];
#else
      const float inv = bb_attn_inv_sum(ll);
      bb_attn_store4<T>((BB_GLOBAL T*)rec + 4 * i, a[0] * inv, a[1] * inv, a[2] * inv, a[3] * inv);
#endif
    }
    // Every thread's record writes are ordered before the count by the barrier and the
    // release of thread 0's atomic (bb_split_arrive); the mergers acquire them there or in
    // bb_split_wait. After this barrier the warps' slices are dead: the merge header takes their bytes.
    bb_split_release();
    bb_sync_block();
    BB_SHARED float* fac_s = (BB_SHARED float*)smem;               // [BB_MAX_SPLIT][16]
    BB_SHARED int* flag_s = (BB_SHARED int*)(fac_s + BB_MAX_SPLIT * 16);
    // The last MG splits to arrive merge the records, each one part of the output (a part: a
    // range of items of 4 elements). The last split alone pulled every record into one SM
    // (29 KB at B=2 x 4096), and that issue and its round trip ended the launch. The mergers
    // before the last wait until every split has counted (bb_split_wait: a few blocks, after
    // all the others have exited); where a block cannot wait (Metal, the CPU emulator) the last
    // split merges every part in turn. MG is the planner's: at most n_split, and it divides the
    // items into equal parts of whole 16-byte chunks.
    if (tid == 0) {
      const int prev = bb_split_arrive(counters + pair);
      const int part = (prev & 0xffff) - (n_split - MG); // this block's part, < 0: none
      int first = part, last = part;
      if (part == MG - 1) {
        bb_split_clear(counters + pair, n_split); // every split has counted: ready for the next launch
        first = BB_CAN_POLL ? part : 0;
      } else if (part >= 0) {
        if (BB_CAN_POLL) {
          bb_split_wait(counters + pair, n_split, prev);
        } else {
          first = 0; // the last split merges this part
          last = -1;
        }
      }
      flag_s[0] = first;
      flag_s[1] = last;
    }
    bb_sync_block();
    BB_STAMP(6);
    const int part_first = flag_s[0], part_last = flag_s[1];
    if (part_first >= 0) {
      bb_split_acquire();
    }
    for (int part = part_first; part >= 0 && part <= part_last; ++part) {
      // Items [lo, lo + PI) of every split's record (whole 16-byte chunks: QC of them), copied
      // into shared memory SB splits at a time (all of them at small batch, where the merge is a
      // chain of dependent L2 round trips), together with one round of loads of every split's
      // (max, sum) of the part's rows r_lo..r_hi. The part's sizes are compile-time constants:
      // with run-time ones the address arithmetic cost ~0.4 us at B=2 x 4096 (H200).
      constexpr int HDR = bb_attn_merge_hdr();
      constexpr int CAP = bb_attn_smem_bytes<D, W, STAGES, (int)sizeof(T), GH>() - HDR; // >= REC
      constexpr int NT4 = GH * D / 4;                    // items of 4 elements of O
      constexpr int PI = NT4 / MG;                       // items of a part
      constexpr int IPT = (PI + W * 32 - 1) / (W * 32);  // items per thread
      constexpr int IB = 4 * (int)sizeof(RT);            // bytes of an item in a record
      constexpr int QC = PI * IB / 16;                   // 16-byte chunks of a part in one record
      constexpr int QB = 16 * QC;
      constexpr int SB = CAP / QB;
      static_assert(NT4 % MG == 0 && (PI * IB) % 16 == 0, "MG must split the items into whole 16-byte chunks");
      const int lo = part * PI;
      const int r_lo = (4 * lo) / D, r_hi = (4 * (lo + PI - 1)) / D;
      BB_SHARED unsigned char* stage = smem + HDR;
      BB_GLOBAL const unsigned char* recs = (BB_GLOBAL const unsigned char*)ws + pair * n_split * (long)REC;
      // Each split's weight per row: a warp per row, its lanes over the splits (two at most each),
      // (max, sum) loaded before the records' copies are issued and reduced by shuffles. (One
      // thread per row looping over the splits was three chains of dependent shared-memory
      // reads.) A warp with several rows issues all their loads first: one round trip, not one a row.
      constexpr int RPW = (GH + W - 1) / W; // rows a warp weighs
      float ms[RPW][2], ls[RPW][2];
      BB_UNROLL
      for (int j = 0; j < RPW; ++j) {
        const int r = r_lo + warp + j * W;
        BB_UNROLL
        for (int u = 0; u < 2; ++u) {
          const int s2 = lane + 32 * u;
          ms[j][u] = NEG_INF;
          ls[j][u] = 0.0f;
          if (r <= r_hi && s2 < n_split) {
            BB_GLOBAL const float* ml = (BB_GLOBAL const float*)(recs + (long)s2 * REC + REC_ML);
            ms[j][u] = bb_load_coherent(ml + r * 2);
            ls[j][u] = bb_load_coherent(ml + r * 2 + 1);
          }
        }
      }
      int sb = bb_mini(n_split, SB);
      bb_attn_stage_part<QC, REC, W * 32>(stage, recs, sb, lo * IB, tid);
      BB_STAMP(8);
      // No branch around the shuffles (a row outside the part reduces NEG_INF and 0s, and stores
      // nothing): shuffles under a branch compile to a slow convergence-checking loop. Each
      // reduction level takes every row of the warp, so the rows' shuffle chains overlap instead
      // of running one after another (G=7 on 4 warps: two rows a warp).
      float mm[RPW], ll[RPW], f[RPW][2];
      BB_UNROLL
      for (int j = 0; j < RPW; ++j) {
        mm[j] = bb_maxf(ms[j][0], ms[j][1]);
      }
      BB_UNROLL
      for (int x = 16; x >= 1; x >>= 1) {
        BB_UNROLL
        for (int j = 0; j < RPW; ++j) {
          mm[j] = bb_maxf(mm[j], bb_shfl_xor(mm[j], x));
        }
      }
      BB_UNROLL
      for (int j = 0; j < RPW; ++j) {
        ll[j] = 0.0f;
        BB_UNROLL
        for (int u = 0; u < 2; ++u) {
          f[j][u] = ms[j][u] == NEG_INF ? 0.0f : bb_exp2(ms[j][u] - mm[j]);
          ll[j] += f[j][u] * ls[j][u];
        }
      }
      BB_UNROLL
      for (int x = 16; x >= 1; x >>= 1) {
        BB_UNROLL
        for (int j = 0; j < RPW; ++j) {
          ll[j] += bb_shfl_xor(ll[j], x);
        }
      }
      BB_UNROLL
      for (int j = 0; j < RPW; ++j) {
        const int r = r_lo + warp + j * W;
        const float inv = bb_attn_inv_sum(ll[j]);
        BB_UNROLL
        for (int u = 0; u < 2; ++u) {
          const int s2 = lane + 32 * u;
          if (r <= r_hi && s2 < n_split) {
#ifdef BB_REC32
            fac_s[s2 * 16 + r] = f[j][u] * inv;
#else
            fac_s[s2 * 16 + r] = f[j][u] * inv * ls[j][u]; // records hold O / sum
#endif
          }
        }
      }
      BB_STAMP(9);
      float acc[IPT * 4];
      BB_UNROLL
      for (int j = 0; j < IPT * 4; ++j) {
        acc[j] = 0.0f;
      }
      for (int s0 = 0; s0 < n_split; s0 += SB) {
        if (s0 > 0) { // the next records, once every thread is done with the last ones
          sb = bb_mini(n_split - s0, SB);
          bb_sync_block();
          bb_attn_stage_part<QC, REC, W * 32>(stage, recs + (long)s0 * REC, sb, lo * IB, tid);
        }
        bb_cp_async_wait<0>();
        bb_sync_block(); // the staged records and the factors are visible to every thread
        BB_STAMP(10);
        bb_attn_merge_sums<T, IPT, W * 32, D, PI, QB>(acc, stage, fac_s + s0 * 16, sb, lo, tid);
      }
      BB_STAMP(11);
      BB_UNROLL
      for (int j = 0; j < IPT; ++j) {
        const int k = tid + j * W * 32;
        const int r = (4 * (lo + k)) / D, d = (4 * (lo + k)) % D;
        if (k < PI && r < rows_valid) {
          bb_attn_store4<T>(out + ((long)row * n_kv_heads * G + head0 + r) * D + d, acc[4 * j], acc[4 * j + 1],
                            acc[4 * j + 2], acc[4 * j + 3]);
        }
      }
      if (part < part_last) {
        bb_sync_block(); // the next part reuses the staging and the factors
      }
    }
  }
  BB_STAMP(7);
}

#endif // BB_ATTENTION_COMMON_H
