"""Two questions for issue 3's missed targets, answered by probes instead of estimates.

1. Merge spread over several blocks ("mergers"). The attention kernel's last split merges all
   16 split records of its (row, kv head) pair alone at B=2 x 4096; the thirty-sixth session
   found that merge bound by the bytes one SM pulls in. Here the last K arrivers each merge 1/K
   of the output; the K-1 that arrive before the last one poll the pair's counter until every
   split has counted. The counter never needs a reset: its low 16 bits count arrivals, and the
   last arriver adds 0x10000 - NS, which clears them and moves the epoch in the high bits, so
   a poller that misses the full count still sees the epoch move. Each block first streams its
   share of a buffer the size of the attention case's K/V (as the walk does), then writes a
   record of the attention kernel's size (7 rows x 128 fp16 + (max, sum)), counts, and merges.
   Variants: K mergers (1 = today's protocol, with a register merge), PW poll warps (1: thread 0
   polls, then the whole block merges; 4: lane 0 of each warp polls, staggered by STAG ns, and
   the first warp to see the count merges alone). Kernel time by CUPTI over chains of launches.
   The outputs are checked against NumPy every run (a wrong protocol reads wrong, a stuck poll
   gives up after ~2^22 polls and writes NaN). Its first run (thirty-seventh session, call2)
   cleared the count with a release add, whose fence slowed K=1 most: it read K=2-8 0.7-0.8 us
   under K=1, where the attention kernel's A/Bs then measured 0.1-0.2 us.

2. Would the 4 SMs that a 128-block grid leaves idle help? (a stream-K split over all 132 SMs
   is the one balancing idea left for B=8 and 32 x 8192.) A plain streaming read of the same
   bytes, each block reading one contiguous equal share, on 128, 130 and 132 blocks; with the
   spread of the blocks' own durations (globaltimer), to see whether SM speed classes show in a
   plain read too.

3. The attention walk's access pattern without its arithmetic (MERGE_PROBE=walk; see walk_probe).

4. Why the kernel walks slower than probe 3 and plain reads (MERGE_PROBE=gap; see gap_probe).

    PYTHONPATH=. python3 scripts/h200_merge_probe.py    # on a CUDA machine; OUT=dir writes merge-probe.md
    MERGE_PROBE=walk python3 scripts/h200_merge_probe.py
    MERGE_PROBE=gap python3 scripts/h200_merge_probe.py     # 4: the kernel's walk against the probe's
"""

from __future__ import annotations

import math
import os
import sys

import mlx.core as mx
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from batchbench import backend  # noqa: E402
from batchbench.bench_attention import kernel_time_us  # noqa: E402

GH, D = 7, 128  # rows and head dim of one attention record (Qwen2.5-7B: 28 / 4 heads)
NT4 = GH * D // 4  # items of 4 fp16
REC_W = (GH * D * 2 + 64) // 4  # a record in 32-bit words: O in fp16, then 16 floats (max, sum)
ML_W = GH * D // 2  # word offset of (max, sum)
STREAM_SMEM = 2 * 32 * 128 * 16  # two rounds of U=32 x 128 threads (or 16 x 256) x 16 bytes

# Both probes stream their bytes as the attention walk does: cp.async (16 bytes a thread) into
# shared memory, two rounds of U x threads chunks in flight (128 KB an SM at 128 threads x U=32,
# the attention kernel's 4 warps x 2 stages x 16 KB). Plain loads compiled to 2-3 in flight.
HEADER = """
#include <cuda_fp16.h>
template <int U>
__device__ void bb_stream(const uint4* p, long base, long share, int tid, int nt) {
  extern __shared__ __align__(16) unsigned char bb_sm[];
  const unsigned s0 = (unsigned)__cvta_generic_to_shared(bb_sm);
  int buf = 0;
  for (long i = 0; i < share; i += (long)U * nt) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const unsigned dst = s0 + (unsigned)(((buf * U + u) * nt + tid) * 16);
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(p + base + i + (long)u * nt + tid) : "memory");
    }
    asm volatile("cp.async.commit_group;" ::: "memory");
    asm volatile("cp.async.wait_group 1;" ::: "memory");
    buf ^= 1;
  }
  asm volatile("cp.async.wait_group 0;" ::: "memory");
}
__device__ unsigned long long bb_now() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
// A block's span: once every thread's copies have landed, thread 0 writes (tag, ns since t0) at
// out[2 blk], out[2 blk + 1].
__device__ void bb_block_span(unsigned* out, long blk, unsigned tag, unsigned long long t0) {
  asm volatile("cp.async.wait_group 0;" ::: "memory");
  __syncthreads();
  if (threadIdx.x == 0) {
    out[blk * 2] = tag;
    out[blk * 2 + 1] = (unsigned)(bb_now() - t0);
  }
}
"""

MERGE_SOURCE = """
  constexpr int GH = 7, D = 128, NT4 = GH * D / 4, REC_W = (GH * D * 2 + 64) / 4, ML_W = GH * D / 2;
  const int split = blockIdx.x, pair = blockIdx.y, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int np = gridDim.y;
  __shared__ int role_s, claim_s;
  if (READ) {
    const long share = (x_shape[0] / 8) / ((long)NS * np) / (U * 128) * (U * 128);  // whole rounds
    bb_stream<U>(reinterpret_cast<const uint4*>(x), ((long)pair * NS + split) * share, share, tid, 128);
  }
  const float bump = 0.0f;
  uint32_t* rec = ws + ((long)pair * NS + split) * REC_W;
  for (int i = tid; i < NT4; i += 128) {
    const float val = 0.01f * (split + 1) + 0.001f * (i % 13) + bump;
    __half2 h = __floats2half2_rn(val, val);
    uint2 w;
    w.x = *reinterpret_cast<uint32_t*>(&h);
    w.y = w.x;
    reinterpret_cast<uint2*>(rec)[i] = w;
  }
  if (tid < GH) {
    reinterpret_cast<float*>(rec + ML_W)[tid * 2] = 0.25f * split - 0.1f * tid;
    reinterpret_cast<float*>(rec + ML_W)[tid * 2 + 1] = 1.0f + split;
  }
  __syncthreads();
  int* ctr = const_cast<int*>(reinterpret_cast<const int*>(counters)) + pair;
  if (tid == 0) {
    int prev;
    asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], 1;" : "=r"(prev) : "l"(ctr) : "memory");
    role_s = prev;
    claim_s = 0;
  }
  __syncthreads();
  const unsigned prev = (unsigned)role_s;
  const int q = (int)(prev & 0xffffu) - (NS - K);
  if (q < 0) {
    return;
  }
  int nthreads = 128, t = tid;
  if (q == K - 1) {
    if (tid == 0) {  // relaxed: the add continues the arrivals' release sequence. (The thirty-seventh
      // session's call2 ran red.release here: a MEMBAR.ALL.GPU ahead of the last arriver's merge,
      // which made K=1 ~0.7 us slower than it is; the kernel's A/Bs measured the merge in parts.)
      asm volatile("red.relaxed.gpu.global.add.s32 [%0], %1;" ::"l"(ctr), "r"(0x10000 - NS) : "memory");
    }
  } else if (PW == 1) {
    if (tid == 0) {
      int failed = 0;
      for (int it = 0;; ++it) {
        unsigned v;
        asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(ctr) : "memory");
        if ((v & 0xffffu) == (unsigned)NS || (v >> 16) != (prev >> 16)) break;
        if (it > (1 << 22)) { failed = 1; break; }
      }
      claim_s = failed;
    }
    __syncthreads();
    if (claim_s) {  // gave up: leave NaN
      if (tid == 0) out[pair * GH * D] = __float2half(__int_as_float(0x7fc00000));
      return;
    }
  } else {
    if (warp >= PW) return;
    int mine = 0;
    if (lane == 0) {
      __nanosleep(warp * STAG);
      for (int it = 0;; ++it) {
        if (*(volatile int*)&claim_s) break;
        unsigned v;
        asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(ctr) : "memory");
        if ((v & 0xffffu) == (unsigned)NS || (v >> 16) != (prev >> 16)) {
          mine = atomicCAS(&claim_s, 0, 1) == 0;
          break;
        }
        if (it > (1 << 22)) {
          if (atomicCAS(&claim_s, 0, 2) == 0) out[pair * GH * D] = __float2half(__int_as_float(0x7fc00000));
          break;
        }
      }
    }
    mine = __shfl_sync(0xffffffffu, mine, 0);
    __syncwarp();
    if (!mine) return;
    nthreads = 32;
    t = lane;
  }
  const int lo = q * NT4 / K, hi = (q + 1) * NT4 / K;
  for (int i = lo + t; i < hi; i += nthreads) {
    const int r = (4 * i) / D;
    float ms[NS], ls[NS];
    uint2 o[NS];
#pragma unroll
    for (int s = 0; s < NS; ++s) {
      const uint32_t* rs = ws + ((long)pair * NS + s) * REC_W;
      const float2 ml = __ldcg(reinterpret_cast<const float2*>(rs + ML_W) + r);
      ms[s] = ml.x;
      ls[s] = ml.y;
      o[s] = __ldcg(reinterpret_cast<const uint2*>(rs) + i);
    }
    float m = -INFINITY;
#pragma unroll
    for (int s = 0; s < NS; ++s) m = fmaxf(m, ms[s]);
    float l = 0.0f, a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma unroll
    for (int s = 0; s < NS; ++s) {
      const float f = exp2f(ms[s] - m) * ls[s];
      l += f;
      const float2 p01 = __half22float2(*reinterpret_cast<const __half2*>(&o[s].x));
      const float2 p23 = __half22float2(*reinterpret_cast<const __half2*>(&o[s].y));
      a0 += f * p01.x;
      a1 += f * p01.y;
      a2 += f * p23.x;
      a3 += f * p23.y;
    }
    const float inv = 1.0f / l;
    __half* dst = out + (long)pair * GH * D + 4 * i;
    dst[0] = __float2half(a0 * inv);
    dst[1] = __float2half(a1 * inv);
    dst[2] = __float2half(a2 * inv);
    dst[3] = __float2half(a3 * inv);
  }
"""

READ_SOURCE = """
  const long share = (x_shape[0] / 8) / gridDim.x / (U * blockDim.x) * (U * blockDim.x);  // whole rounds
  const unsigned long long t0 = bb_now();
  bb_stream<U>(reinterpret_cast<const uint4*>(x), (long)blockIdx.x * share, share, threadIdx.x, blockDim.x);
  unsigned smid;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
  bb_block_span(out, blockIdx.x, smid, t0);
"""


def merge_reference(n_pairs: int, ns: int) -> np.ndarray:
    """What every merger must write: the weighted mean of the split records' values."""
    s = np.arange(ns, dtype=np.float64)[:, None]
    r = np.arange(GH, dtype=np.float64)[None, :]
    m = 0.25 * s - 0.1 * r  # [ns, GH] (log2 domain)
    w = np.exp2(m - m.max(axis=0)) * (1.0 + s)  # [ns, GH]
    i = np.arange(NT4)
    val = (0.01 * (np.arange(ns)[:, None] + 1) + 0.001 * (i % 13)[None, :]).astype(np.float16).astype(np.float64)
    row = (4 * i) // D
    o = (w[:, row] * val).sum(axis=0) / w[:, row].sum(axis=0)  # [NT4]
    return np.repeat(np.tile(o, (n_pairs, 1)), 4, axis=1)  # [pairs, GH * D]


def merge_probe(lines: list[str]) -> None:
    kernel = mx.fast.cuda_kernel(name="bb_merge_probe", input_names=["x", "counters"], output_names=["out", "ws"],
                                 source=MERGE_SOURCE, header=HEADER, shared_memory=STREAM_SMEM)
    n_pairs, ns = 8, 16  # B=2 x 4096: 2 rows x 4 kv heads, 16 splits
    mb = 16.8
    n = int(mb * 1e6) // 16 * 8
    sets = [mx.random.normal((n,)).astype(mx.float16) for _ in range(12)]
    counters = mx.zeros((64,), dtype=mx.int32)
    mx.eval(sets, counters)
    want = merge_reference(n_pairs, ns)
    lines += ["", f"## Merge spread over K blocks (B=2 x 4096's shape: {n_pairs} pairs x {ns} splits of 128 threads, "
              f"records of {REC_W * 4} bytes)", "",
              "| read | K mergers | poll warps | stagger ns | us per launch | max abs err |", "|---|---|---|---|---|---|"]
    variants = [(k, 1, 0) for k in (1, 2, 4, 8)] + [(k, 4, st) for k in (2, 4) for st in (0, 150)]
    for read in (1, 0):
        for k, pw, stag in variants:
            def launch(x, k=k, pw=pw, stag=stag, read=read):
                return kernel(inputs=[x, counters], grid=(128 * ns, n_pairs, 1), threadgroup=(128, 1, 1),
                              template=[("K", k), ("NS", ns), ("READ", read), ("PW", pw), ("STAG", stag), ("U", 32)],
                              output_shapes=[(n_pairs, GH * D), (n_pairs * ns * REC_W,)],
                              output_dtypes=[mx.float16, mx.uint32])[0]

            try:
                got = np.array(launch(sets[0]).astype(mx.float32))
                err = float(np.nanmax(np.abs(got - want))) if np.isfinite(got).all() else float("nan")

                def run(launch=launch):
                    for x in sets:
                        mx.eval(launch(x))

                us = kernel_time_us(run, len(sets))
                again = np.array(launch(sets[1]).astype(mx.float32))
                if not np.isfinite(again).all() or np.abs(again - want).max() > 2e-3:
                    err = float("nan")
                line = f"| {'16.8 MB' if read else 'none'} | {k} | {pw} | {stag} | {us:.2f} | {err:.1e} |"
            except Exception as e:  # noqa: BLE001 (a probe: report and go on)
                line = f"| {'16.8 MB' if read else 'none'} | {k} | {pw} | {stag} | failed: {str(e)[:120]} | |"
            lines.append(line)
            print(line, flush=True)
    left = np.array(counters) & 0xFFFF
    lines.append(f"\ncounters' low bits after every launch (must be 0): {sorted(set(left.tolist()))}")
    print(lines[-1], flush=True)


def read_probe(lines: list[str]) -> None:
    kernel = mx.fast.cuda_kernel(name="bb_read_share", input_names=["x"], output_names=["out"], source=READ_SOURCE,
                                 header=HEADER, shared_memory=STREAM_SMEM)
    lines += ["", "## Contiguous equal shares on 128-132 blocks (plain streaming read, CUPTI kernel time)", "",
              "| MB | blocks x threads | loads/thread in flight | us | TB/s | block durations min / median / max us |",
              "|---|---|---|---|---|---|"]
    for mb in (134.2, 536.9):
        n = int(mb * 1e6) // 16 * 8
        sets = [mx.random.normal((n,)).astype(mx.float16) for _ in range(max(3, int(160 // mb) + 1))]
        mx.eval(sets)
        for tpb, u in ((128, 32), (256, 16)):
            for blocks in (128, 130, 132):
                def launch(x, blocks=blocks, tpb=tpb, u=u):
                    return kernel(inputs=[x], template=[("U", u)], grid=(blocks * tpb, 1, 1), threadgroup=(tpb, 1, 1),
                                  output_shapes=[(2 * blocks,)], output_dtypes=[mx.uint32])[0]

                def run(launch=launch, sets=sets):
                    for x in sets:
                        mx.eval(launch(x))

                us = kernel_time_us(run, len(sets))
                dur = np.array(launch(sets[0])).reshape(blocks, 2)[:, 1] / 1e3
                line = (f"| {mb:.1f} | {blocks} x {tpb} | {u} | {us:.1f} | {mb * 1e6 / (us * 1e-6) / 1e12:.2f} | "
                        f"{dur.min():.1f} / {np.median(dur):.1f} / {dur.max():.1f} |")
                lines.append(line)
                print(line, flush=True)
        del sets


# 3. The attention walk's access pattern without its arithmetic: B=8 x 8192's K/V as 32 pairs of
# a 2 MB K region and a 2 MB V region (8192 cells x 128 fp16), 4 splits x 4 warps a pair, each
# warp streaming 16 KB blocks (8 KB of K, 8 KB of V) through 2 cp.async stages as the kernel
# does. PAT 0: the kernel's order (block split*4 + warp + 16 i: a pair's splits and warps
# interleaved block by block); 1: each split a contiguous quarter, its warps interleaved; 2: each
# warp a contiguous run. A plain contiguous read of the same bytes took 29.6 us (probe 2); the
# kernel 38.5-39.4 us, its walks 26-36 us after entry (the thirty-sixth session's timelines).
WALK_SOURCE = """
  extern __shared__ __align__(16) unsigned char bb_sm[];
  const int split = blockIdx.x, pair = blockIdx.y, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int ns = gridDim.x, np = gridDim.y;
  const long cells = x_shape[0] / ((long)np * 2 * 128);
  const int nb = (int)(cells / 32);          // 32-cell blocks of a pair
  const int per_warp = nb / (ns * 4);
  const uint4* kreg = reinterpret_cast<const uint4*>(x) + (long)pair * 2 * cells * 16;  // 16 uint4 a cell
  const uint4* vreg = kreg + cells * 16;
  const unsigned s0 = (unsigned)__cvta_generic_to_shared(bb_sm) + warp * 2 * 16384;
  const unsigned long long t0 = bb_now();
  for (int i = 0; i < per_warp; ++i) {
    const int b = PAT == 0 ? split * 4 + warp + ns * 4 * i
                : PAT == 1 ? split * (nb / ns) + warp + 4 * i
                           : (split * 4 + warp) * per_warp + i;
    const unsigned st = s0 + (i & 1) * 16384;
#pragma unroll
    for (int c = 0; c < 16; ++c) {
      const int chunk = c * 32 + lane;  // 512 chunks of 16 bytes in 8 KB
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(st + chunk * 16), "l"(kreg + (long)b * 512 + chunk) : "memory");
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(st + 8192 + chunk * 16), "l"(vreg + (long)b * 512 + chunk) : "memory");
    }
    asm volatile("cp.async.commit_group;" ::: "memory");
    asm volatile("cp.async.wait_group 1;" ::: "memory");
  }
  bb_block_span(out, pair * ns + split, 0, t0);
"""


def walk_probe(lines: list[str]) -> None:
    kernel = mx.fast.cuda_kernel(name="bb_walk_probe", input_names=["x"], output_names=["out"], source=WALK_SOURCE,
                                 header=HEADER, shared_memory=4 * 2 * 16384)
    n_pairs, ns, cells = 32, 4, 8192
    n = n_pairs * 2 * cells * 128
    sets = [mx.random.normal((n,)).astype(mx.float16) for _ in range(3)]
    mx.eval(sets)
    lines += ["", "## The walk's access pattern alone (B=8 x 8192: 32 pairs x 4 splits x 4 warps, 2 stages of 16 KB a warp)",
              "", "| pattern | us | TB/s | block durations min / median / max us |", "|---|---|---|---|"]
    names = {0: "kernel's (splits and warps interleaved)", 1: "split-contiguous, warps interleaved", 2: "warp-contiguous"}
    for rep in range(2):
        for pat in (0, 1, 2):
            def launch(x, pat=pat):
                return kernel(inputs=[x], template=[("PAT", pat)], grid=(128 * ns, n_pairs, 1), threadgroup=(128, 1, 1),
                              output_shapes=[(2 * n_pairs * ns,)], output_dtypes=[mx.uint32])[0]

            def run(launch=launch):
                for x in sets:
                    mx.eval(launch(x))

            us = kernel_time_us(run, len(sets))
            dur = np.array(launch(sets[0])).reshape(-1, 2)[:, 1] / 1e3
            line = (f"| {names[pat]} | {us:.1f} | {n * 2 / (us * 1e-6) / 1e12:.2f} | "
                    f"{dur.min():.1f} / {np.median(dur):.1f} / {dur.max():.1f} |")
            lines.append(line)
            print(line, flush=True)


# 4. Where the kernel's walk loses to the probe's (MERGE_PROBE=gap). Without its arithmetic the
# kernel took 37.6 us at B=8 x 8192 and 130.6 at 32 x 8192 (thirty-seventh session, call16),
# where probe 3 walked B=8 x 8192's bytes in 31.2 us and plain reads of 32 x 8192's in 116.1.
# Two suspects: (a) how they were timed: probes 2-3 wait for each launch, the bench chains its
# layers back to back; (b) what the kernel's walk adds: its K/V layout (separate [Hkv, S, D]
# buffers, grid (kv head, split, row)), the 272-byte padded tile rows, the zero-fill form of
# cp.async, and each block's 64 mask bytes staged with it. This walk takes the kernel's layout
# and adds each of (b) in turn; every variant is timed both ways, and so is the kernel itself.
WALK2_SOURCE = """
  extern __shared__ __align__(16) unsigned char bb_sm[];
  const int head = blockIdx.x, split = blockIdx.y, row = blockIdx.z;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int ns = gridDim.y, rows = gridDim.z;
  const long S = k_shape[2], n_used = mask_shape[1];  // k, v: [1, Hkv, S, D]
  const int nb = (int)(n_used / rows / 32);  // blocks a row owns
  const int per_warp = nb / (ns * 4);
  const uint4* kh = reinterpret_cast<const uint4*>(k) + (long)head * S * 16;
  const uint4* vh = reinterpret_cast<const uint4*>(v) + (long)head * S * 16;
  const char* mrow = reinterpret_cast<const char*>(mask) + (long)row * n_used * 2;
  constexpr int PB = PITCH ? 272 : 256, TILE = 32 * PB;
  const unsigned base = (unsigned)__cvta_generic_to_shared(bb_sm);
  const unsigned s0 = base + warp * 4 * TILE, m0 = base + 16 * TILE + warp * 256;
  const unsigned long long t0 = bb_now();
  for (int i = 0; i < per_warp; ++i) {
    const int b = row * nb + split * 4 + warp + ns * 4 * i;
    const unsigned st = s0 + (i & 1) * 2 * TILE;
    if (MASKLD && lane < 4) {
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(m0 + (i & 1) * 128 + lane * 16), "l"(mrow + (long)b * 64 + lane * 16), "r"(16) : "memory");
    }
#pragma unroll
    for (int c = 0; c < 16; ++c) {
      const int chunk = c * 32 + lane, r = chunk >> 4, cc = chunk & 15;
      const long goff = ((long)b * 32 + r) * 16 + cc;
      const unsigned d = st + r * PB + cc * 16;
      if (ZF) {
        const int n = ((long)b * 32 + r) < n_used ? 16 : 0;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(d), "l"(kh + goff), "r"(n) : "memory");
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(d + TILE), "l"(vh + goff), "r"(n) : "memory");
      } else {
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(d), "l"(kh + goff) : "memory");
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(d + TILE), "l"(vh + goff) : "memory");
      }
    }
    asm volatile("cp.async.commit_group;" ::: "memory");
    asm volatile("cp.async.wait_group 1;" ::: "memory");
  }
  bb_block_span(out, (row * ns + split) * gridDim.x + head, 0, t0);
"""


def gap_probe(lines: list[str]) -> None:
    from batchbench.bench_attention import _in_place, unified_problem
    from batchbench.kernels.attention import decode_attention

    kernel = mx.fast.cuda_kernel(name="bb_walk2_probe", input_names=["k", "v", "mask", "dep"], output_names=["out"],
                                 source=WALK2_SOURCE, header=HEADER, shared_memory=16 * 272 * 32 + 4 * 256)
    n_layers, n_sets = 32, 4
    zero = mx.zeros((1,), mx.uint32)  # the first launch's dep
    mx.eval(zero)
    lines += ["", "## The kernel's walk against the probe's (kernel layout; 'each': an eval per launch, as probes 2-3;"
              " 'chain': 32 launches back to back, as the bench)", "",
              "| B x ctx | what | each us | chain us | TB/s (chain) | block durations min / median / max us |",
              "|---|---|---|---|---|---|"]
    for b, ctx, ns in ((8, 8192, 4), (32, 8192, 1)):
        layers, q, mask, live = unified_problem(b, ctx, n_sets)
        nbytes = b * ctx * 4 * 128 * 2 * 2

        def timed(launch, name, dur_of=None):
            # launch(i, dep): layer i's launch; dep, the previous launch's output, orders the
            # chain (independent launches in one graph may overlap, which would skew the sum)
            def each():
                for i in range(len(layers)):
                    mx.eval(launch(i, None))

            def chain():
                dep = None
                for i in range(n_layers):
                    dep = launch(i % n_sets, dep)
                mx.eval(dep)

            e_us = kernel_time_us(each, len(layers))
            c_us = kernel_time_us(chain, n_layers)
            dur = f"{dur_of.min():.1f} / {np.median(dur_of):.1f} / {dur_of.max():.1f}" if dur_of is not None else "-"
            line = (f"| {b} x {ctx} | {name} | {e_us:.1f} | {c_us:.1f} | {nbytes / (c_us * 1e-6) / 1e12:.2f} | {dur} |")
            lines.append(line)
            print(line, flush=True)

        for pitch, zf, maskld in ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 1)):
            def launch(i, dep, pitch=pitch, zf=zf, maskld=maskld):
                k, v, _, _ = layers[i]
                dep = zero if dep is None else dep
                return kernel(inputs=[k, v, mask, dep],
                              template=[("PITCH", pitch), ("ZF", zf), ("MASKLD", maskld)],
                              grid=(128 * 4, ns, b), threadgroup=(128, 1, 1), output_shapes=[(2 * 4 * ns * b,)],
                              output_dtypes=[mx.uint32])[0]

            dur = np.array(launch(0, None)).reshape(-1, 2)[:, 1] / 1e3
            timed(launch, f"walk: pitch {272 if pitch else 256}, zero-fill {zf}, mask bytes {maskld}", dur)

        scale = 1.0 / math.sqrt(128)

        def launch_k(i, dep):
            k, v, _, _ = layers[i % n_sets]
            x = q if dep is None else dep
            return _in_place(decode_attention(x, k, v, scale=scale, mask=mask, live_blocks=live), x)

        timed(launch_k, "kernel (list; 'chain' is the bench's dependent chain)")
        del layers


def main() -> None:
    if backend.BACKEND != "cuda":
        print("h200_merge_probe: needs MLX's CUDA back-end")
        return
    lines = [f"# Merge and idle-SM probes, H200 (MLX {mx.__version__})"]
    which = os.environ.get("MERGE_PROBE", "merge,read").split(",")
    if "merge" in which:
        merge_probe(lines)
    if "read" in which:
        read_probe(lines)
    if "walk" in which:
        walk_probe(lines)
    if "gap" in which:
        gap_probe(lines)
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "merge-probe.md"), "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
