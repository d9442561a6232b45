"""What would one persistent launch per layer gain over one launch per matmul? A probe for the
persistent layer (docs/perf-notes.md, twenty-fourth session).

Session 24 measured two bounds: a grid barrier costs ~0.9-1.4 us (`h200_barrier_probe.py`), and
the decode step with its layers made independent (`QMM_DECODE_INDEP=1`, so MLX overlaps the
kernels of several layers) spans 1.55 ms against 1.91 at B=1. Between the two lies what a chain
of dependent phases in one launch keeps. This probe measures it without the matmul kernel: each
phase streams its matrix's bytes (the 7B layer at 4-bit with fp16 scales and biases: o_proj,
gate/up, down, the next layer's q/k/v) with 16-byte loads, 8 a thread in flight, and folds them
into one word a block; the next phase reads another block's word of the previous phase before
it folds anything (the activations' dependency). Layouts, all 28 layers on distinct bytes (4 GB,
so nothing stays in L2):
- `launches`: one launch a phase (112), each reading the previous launch's output;
- `layer`: one launch a layer (28) of 4 phases with a grid barrier between phases;
- `layer-pre`: as `layer`, but each phase issues its first loads before the barrier (weights
  depend on nothing), which is what the persistent layer would do;
- `all` / `all-pre`: the 112 phases in one launch.
Kernel time is the sum of the probe's own kernels (CUPTI; MLX's fills of the barrier counts
excluded), GPU span from the first kernel's start to the last one's end, per layer. ALU=1 and
ALU=2 add, on each loaded word, the work of the fp16 path and of an int8 path (see `fold`).

    PYTHONPATH=. python3 scripts/h200_phase_probe.py      # on a CUDA machine
    BLOCKS_PER_SM=2 LAYERS=28 ALU=0,1,2 ...                # the defaults
"""

from __future__ import annotations

import os
import statistics
import sys

import mlx.core as mx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from batchbench import backend  # noqa: E402
from batchbench.bench_attention import _torch_cuda, trace_events  # noqa: E402
from batchbench.kernels import qmm  # noqa: E402
from batchbench.kernels import spec as kspec  # noqa: E402

THREADS = 256
UNROLL = 8
H, FF = 3584, 18944
# each phase's matrix in weights (4-bit with fp16 scales and biases a group of 32: 0.625 bytes a
# weight, `plan`)
PHASES = (("o", H * H), ("gate_up", 2 * FF * H), ("down", H * FF), ("qkv", 4608 * H))
GAVE_UP = 0x80000000
# meta: [phases, mode (0 none, 1 barrier then loads, 2 first loads then barrier)];
# offs: phase starts in 16-byte words (phases + 1 entries, padded); prev: the previous launch's
# out; out[0]: the barrier count; out[1 + p * G + b]: block b's word of phase p (bit 31: a spin
# gave up, the blocks were not co-resident)
# ALU=1: each 4-byte word also goes through what the 4-bit matmul does with it at M=1 without
# its mma (three shifts, four LOP3 to (1024 + q) half pairs, HFMA2 by the scale with -1024 s,
# HADD2 of the bias, HFMA2 with a pair of x read from shared memory: ~20 instructions a word)
ALU_WORD = """
      {
        const uint4 xv = xsm[(c + (int)(i & 15)) & 63];
        const __half2 xs[4] = {*reinterpret_cast<const __half2*>(&xv.x), *reinterpret_cast<const __half2*>(&xv.y),
                               *reinterpret_cast<const __half2*>(&xv.z), *reinterpret_cast<const __half2*>(&xv.w)};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          unsigned int t = ((wd >> (4 * j)) & 0x000f000fu) | 0x64006400u;
          const __half2 m = *reinterpret_cast<const __half2*>(&t);
          a2 = __hfma2(__hadd2(__hfma2(m, s2, n2), b2), xs[j], a2);
        }
      }
"""


# ALU=2: what an int8 path would do with each word (llama.cpp's mmvq: activations quantized to
# int8): two LOP3 and a shift make the 8 codes 8 bytes, two DP4A take them against 8 int8 x values
# read from shared memory (an LDS.64), and each 4 words (a group of 32) convert the integer sum
# and apply the group's scale and bias (an LDS of the pair, I2F, two FFMA): ~7 instructions a word
X8_WORD = """
      {
        const uint2 xq = xsm8[(c + (int)(i & 15)) & 63];
        idot = __dp4a((int)(wd & 0x0f0f0f0fu), (int)xq.x, idot);
        idot = __dp4a((int)((wd >> 4) & 0x0f0f0f0fu), (int)xq.y, idot);
      }
"""


def fold(alu: int) -> str:
    if not alu:
        return "acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;"
    word = ALU_WORD if alu == 1 else X8_WORD
    words = "".join(f"{{ const unsigned int wd = v[u].{f}; const int c = {n};{word}}}" for n, f in enumerate("xyzw"))
    if alu == 1:
        return "{" + words + "}"
    return ("{ int idot = 0;" + words + "const float2 sb = __half22float2(xsb[(int)(i & 63)]);"
            " yf = fmaf(sb.x, (float)idot, yf); yf = fmaf(sb.y, sxf, yf); }")


def source(alu: int) -> str:
    return SOURCE.replace("@FOLD@", fold(alu))


SOURCE = f"""
  const int nphase = meta[0];
  const int mode = meta[1];
  const uint4* W = reinterpret_cast<const uint4*>(w);
  const unsigned int G = gridDim.x;
  const long long stride = (long long)G * blockDim.x;
  const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  __shared__ unsigned int red[32];
  __shared__ uint4 xsm[64];
  __shared__ uint2 xsm8[64];
  __shared__ __half2 xsb[64];
  unsigned int acc = __ldcg(prev + 1 + blockIdx.x);
  if (threadIdx.x < 64) {{
    const __half2 h = __float2half2_rn(0.25f + 0.001f * (float)threadIdx.x);
    const unsigned int hb = *reinterpret_cast<const unsigned int*>(&h);
    xsm[threadIdx.x] = make_uint4(hb, hb ^ 1u, hb ^ 2u, hb ^ 3u);
    xsm8[threadIdx.x] = make_uint2(0x01fe03fcu ^ threadIdx.x, 0x05fa07f8u ^ threadIdx.x);
    xsb[threadIdx.x] = __floats2half2_rn(1e-3f * (float)(1 + threadIdx.x), -8e-3f);
  }}
  __syncthreads();
  const __half2 s2 = __float2half2_rn(1e-3f * (float)(1 + (acc & 1u)));
  const __half2 n2 = __hmul2(s2, __float2half2_rn(-1024.f));
  const __half2 b2 = __float2half2_rn(-8e-3f * (float)(1 + (acc & 2u)));
  __half2 a2 = __float2half2_rn(0.f);
  float yf = 0.f;
  const float sxf = 0.5f + (float)(acc & 7u);
  unsigned int flag = 0u;
  for (int p = 0; p < nphase; ++p) {{
    const long long b1 = offs[p + 1];
    long long i = offs[p] + tid;
    uint4 v[{UNROLL}];
    if (mode != 1 || p == 0) {{
#pragma unroll
      for (int u = 0; u < {UNROLL}; ++u) v[u] = i + u * stride < b1 ? __ldcs(W + i + u * stride) : make_uint4(0, 0, 0, 0);
    }}
    if (p > 0) {{
      __syncthreads();
      if (threadIdx.x == 0) {{
        unsigned int* count = out;
        unsigned int old;
        asm volatile("atom.release.gpu.global.add.u32 %0, [%1], 1;" : "=r"(old) : "l"(count) : "memory");
        const unsigned int target = (unsigned int)p * G;
        for (unsigned int spins = 0;; ++spins) {{
          unsigned int c;
          asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(c) : "l"(count) : "memory");
          if (c >= target) break;
          if (spins > (1u << 22)) {{ flag = {GAVE_UP}u; break; }}
        }}
      }}
      __syncthreads();
      acc ^= __ldcg(out + 1 + (p - 1) * G + (blockIdx.x + 1) % G);
      if (mode == 1) {{
#pragma unroll
        for (int u = 0; u < {UNROLL}; ++u) v[u] = i + u * stride < b1 ? __ldcs(W + i + u * stride) : make_uint4(0, 0, 0, 0);
      }}
    }}
    for (;;) {{
#pragma unroll
      for (int u = 0; u < {UNROLL}; ++u) @FOLD@
      i += {UNROLL} * stride;
      if (i >= b1) break;
#pragma unroll
      for (int u = 0; u < {UNROLL}; ++u) v[u] = i + u * stride < b1 ? __ldcs(W + i + u * stride) : make_uint4(0, 0, 0, 0);
    }}
    acc ^= *reinterpret_cast<const unsigned int*>(&a2) ^ __float_as_uint(yf);
    for (int o = 16; o > 0; o >>= 1) acc ^= __shfl_xor_sync(0xffffffffu, acc, o);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {{
      unsigned int a = 0u;
      for (int k = 0; k < (int)(blockDim.x >> 5); ++k) a ^= red[k];
      out[1 + p * G + blockIdx.x] = (a & 0x7fffffffu) | flag;
    }}
    __syncthreads();
  }}
"""
SPECS = {alu: kspec.KernelSpec(backend="cuda", name=f"bb_phase_probe{('', '_alu', '_x8')[alu]}",
                               input_names=("w", "meta", "offs", "prev"), output_names=("out",), source=source(alu))
         for alu in (0, 1, 2)}


def words(nbytes: int) -> int:
    """16-byte words of a phase's bytes (rounded up)."""
    return -(-nbytes // 16)


def consts(phases: list[int], start: int, mode: int) -> tuple[mx.array, mx.array]:
    """A launch's meta and offs. Made once and reused: an array made from host data lives in
    MLX's managed memory, and the first kernel that reads it stalls on the migration (session 4;
    the first run of this probe made them afresh for every launch). Padded past 8 bytes (MLX's
    scalar pool stalls every time)."""
    offs = [start]
    for n in phases:
        offs.append(offs[-1] + n)
    meta, offs_a = mx.array([len(phases), mode] + [0] * 14, dtype=mx.int32), mx.array(offs + [0] * 16, dtype=mx.int64)
    mx.eval(meta, offs_a)
    return meta, offs_a


def launch(w: mx.array, phases: list[int], mode: int, const: tuple[mx.array, mx.array], prev: mx.array,
           blocks: int) -> kspec.Launch:
    return kspec.Launch(inputs=[w, const[0], const[1], prev],
                        output_shapes=[(1 + len(phases) * blocks,)], output_dtypes=[mx.uint32],
                        grid=(blocks * THREADS, 1, 1), threadgroup=(THREADS, 1, 1),
                        init_value=0 if mode else None)


def plan(layout: str, layers: int, blocks: int) -> list[tuple[list[int], int, int]]:
    """(phase sizes in words, first word, mode) of each launch."""
    sizes = [words(b * 5 // 8) for _, b in PHASES] * layers
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    mode = 2 if layout.endswith("-pre") else 1
    if layout == "launches":
        return [([n], s, 0) for n, s in zip(sizes, starts)]
    if layout.startswith("layer"):
        k = len(PHASES)
        return [(sizes[i:i + k], starts[i], mode) for i in range(0, len(sizes), k)]
    return [(sizes, 0, mode)]


def measure(w: mx.array, layout: str, layers: int, blocks: int, reps: int, alu: int = 0) -> dict:
    first = mx.zeros((1 + blocks,), dtype=mx.uint32)
    launches = plan(layout, layers, blocks)
    made = [consts(phases, start, mode) for phases, start, mode in launches]

    def run() -> list[mx.array]:
        prev, outs = first, []
        for (phases, _, mode), const in zip(launches, made):
            prev = kspec.run(SPECS[alu], launch(w, phases, mode, const, prev, blocks))[0]
            outs.append(prev)
        mx.eval(outs)
        return outs

    run()
    outs = run()  # the second run: every launch's constants already on the device
    ok = all(not (int(mx.max(o[1:] & GAVE_UP).item())) for o in outs)
    torch = _torch_cuda()
    from torch.profiler import ProfilerActivity, profile

    ktimes, spans, phases = [], [], []
    for _ in range(reps):
        mx.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run()
            mx.synchronize()
            torch.cuda.synchronize()
        ks = sorted((e for e in trace_events(prof) if e.get("cat") == "kernel"), key=lambda e: e["ts"])
        mine = [e for e in ks if "bb_phase_probe" in e.get("name", "")]
        ktimes.append(sum(float(e["dur"]) for e in mine) / layers)
        if layout == "launches":  # each phase's own launch, in order: o, gate/up, down, q/k/v, o, ...
            k = len(PHASES)
            phases.append([sum(float(e["dur"]) for e in mine[j::k]) / layers for j in range(k)])
        spans.append((ks[-1]["ts"] + ks[-1]["dur"] - ks[0]["ts"]) / layers if ks else 0.0)
    each = [statistics.median(col) for col in zip(*phases)] if phases else []
    return dict(ok=ok, kernel=statistics.median(ktimes), span=statistics.median(spans), launches=len(launches),
                each=each)


def main() -> None:
    if backend.BACKEND != "cuda" or _torch_cuda() is None:
        print("h200_phase_probe: needs MLX's CUDA back-end and torch (CUPTI)")
        return
    sms = qmm.sm_count()  # BATCHBENCH_SMS overrides
    layers = int(os.environ.get("LAYERS", "28"))
    total = sum(words(b * 5 // 8) for _, b in PHASES) * layers
    w = mx.zeros((total * 4,), dtype=mx.uint32)
    mx.eval(w)
    mb = [f"{name} {b * 5 / 8 / 1e6:.1f}" for name, b in PHASES]
    print(f"{sms} SMs, {THREADS} threads a block, {UNROLL} 16-byte loads a thread in flight; {layers} layers of "
          f"{', '.join(mb)} MB ({total * 16 / 1e9:.2f} GB)")
    print("| ALU | blocks a SM | layout | launches | all co-resident | kernel us a layer | span us a layer | "
          "TB/s by kernel time |")
    print("|---|---|---|---|---|---|---|---|")
    per_layer = total * 16 / layers
    for alu in (int(v) for v in os.environ.get("ALU", "0,1,2").split(",")):
        for per_sm in (int(v) for v in os.environ.get("BLOCKS_PER_SM", "2").split(",")):
            for layout in os.environ.get("LAYOUTS", "launches,layer,layer-pre,all,all-pre").split(","):
                try:
                    r = measure(w, layout, layers, per_sm * sms, int(os.environ.get("REPS", "5")), alu)
                except Exception as e:  # noqa: BLE001 (a probe: report and go on)
                    print(f"| {int(alu)} | {per_sm} | {layout} | failed: {str(e)[:200]} | | | | |", flush=True)
                    continue
                print(f"| {int(alu)} | {per_sm} | {layout} | {r['launches']} | {'yes' if r['ok'] else 'NO'} | "
                      f"{r['kernel']:.2f} | {r['span']:.2f} | {per_layer / r['kernel'] / 1e6:.2f} |", flush=True)
                if r["each"]:
                    print("| | | " + ", ".join(f"{name} {us:.2f} us" for (name, _), us in zip(PHASES, r["each"]))
                          + " | | | | | |", flush=True)


if __name__ == "__main__":
    main()
