"""Read-only bandwidth of the card, by CUPTI kernel time (a ceiling for decode attention).

Issue 3 compares the attention kernel with MLX's copy bandwidth (`x * 2`: read + write). A
kernel that only reads can go faster than a copy; this script measures how much, with a
plain streaming kernel: every thread keeps U 16-byte loads in flight, grid-strided over the
buffer, and writes one word per block (so nothing is optimised away). Buffers are rotated so
that no read hits L2 from the call before.

    PYTHONPATH=. python3 scripts/h200_readbw.py        # on a CUDA machine; OUT=dir writes readbw.md
"""

from __future__ import annotations

import os
import sys

import mlx.core as mx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from batchbench import backend  # noqa: E402
from batchbench.bench_attention import copy_bandwidth, copy_bandwidth_median, kernel_time_us  # noqa: E402
from batchbench.kernels.attention import smem_bytes  # noqa: E402

SOURCE = """
  const uint4* p = reinterpret_cast<const uint4*>(x);
  const long n = x_shape[0] / 8;  // 16-byte words
  const long stride = (long)gridDim.x * blockDim.x;
  uint32_t acc = 0;
  for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += U * stride) {
    uint4 r[U];
    #pragma unroll
    for (int u = 0; u < U; ++u) {
      const long j = i + u * stride;
      r[u] = j < n ? __ldcs(p + j) : make_uint4(0, 0, 0, 0);
    }
    #pragma unroll
    for (int u = 0; u < U; ++u) {
      acc ^= r[u].x ^ r[u].y ^ r[u].z ^ r[u].w;
    }
  }
  if (acc == 0x9e3779b9u) {  // practically never: keeps the loads
    out[blockIdx.x] = acc;
  }
"""


EMPTY = """
  if (threadIdx.x == 0 && x[0] == 12345.0f) {  // never: the launch is all there is
    out[blockIdx.x] = 1u;
  }
"""

# Attention-sized reads: the K/V bytes of issue 3's small cases, and what one launch of
# nothing costs, at the attention kernel's grid and shared memory (one block per SM).
SMALL_MB = [(16.8, "B=2 x 4096"), (33.6, "B=2 x 8192"), (67.1, "B=8 x 4096"), (134.2, "B=8 x 8192"),
            (536.9, "B=32 x 8192")]
# Issue 7's per-matrix target (>= 80% of the copy bandwidth on weight bytes): the 4-bit group-32
# bytes of each 7B matrix (weights + fp16 scale and bias a group), as scripts/h200_qmm.py counts
# them, read by a plain streaming kernel in one launch: what no matmul of those bytes can beat.
# READBW_SIZES=matrices runs these (and the empty launches) only; =attention, the sizes above.
MATRICES = [("k/v_proj 512x3584", 512, 3584), ("q/o_proj 3584x3584", 3584, 3584),
            ("q/k/v fused 4608x3584", 4608, 3584), ("gate or down 18944x3584", 18944, 3584),
            ("gate/up fused 37888x3584", 37888, 3584), ("lm_head 152064x3584", 152064, 3584)]
MATRIX_MB = [((n * k // 2 + 4 * n * (k // 32)) / 1e6, name) for name, n, k in MATRICES]
ATTN_SMEM = smem_bytes(128, 4, 2, 2, 7)  # D=128, 4 warps, 2 stages, fp16, 7 heads (the 7B's decode)


def _read(kernel, x: mx.array, tpb: int, blocks: int, u: int) -> mx.array:
    """One launch of the streaming read over x (not evaluated)."""
    return kernel(inputs=[x], template=[("U", u)], grid=(blocks * tpb, 1, 1), threadgroup=(tpb, 1, 1),
                  output_shapes=[(blocks,)], output_dtypes=[mx.uint32])[0]


def small_reads(kernel, sizes: list[tuple[float, str]], copy_tbs: float) -> list[str]:
    """One-launch reads of each size at four geometries; copy_tbs: the copy bandwidth the
    last column divides by (h200_qmm.py's, by wall time)."""
    lines = ["", "## Floors for one launch (CUPTI kernel time per call, each call evaluated alone, "
             "buffers rotated past L2)", "",
             f"% copy: the read's rate over the copy bandwidth by wall time ({copy_tbs:.2f} TB/s, "
             "`x + 1` over 2 GiB, read + write, as scripts/h200_qmm.py measures it)", "",
             "| what | blocks x threads | dynamic smem | us | TB/s | % copy |", "|---|---|---|---|---|---|"]
    for mb, what in sizes:
        n = int(mb * 1e6) // 16 * 8  # fp16 elements, a multiple of 8
        sets = [mx.random.normal((n,)).astype(mx.float16) for _ in range(max(3, int(160 // mb) + 1))]
        mx.eval(sets)
        for tpb, blocks, u in [(256, 132, 8), (256, 264, 4), (512, 132, 8), (256, 528, 4)]:
            def run(tpb=tpb, blocks=blocks, u=u, sets=sets):
                for x in sets:
                    mx.eval(_read(kernel, x, tpb, blocks, u))

            us = kernel_time_us(run, len(sets))
            tbs = mb * 1e6 / (us * 1e-6) / 1e12
            lines.append(f"| read {mb:.2f} MB ({what}), {u} loads/thread | {blocks} x {tpb} | 0 | {us:.1f} | "
                         f"{tbs:.2f} | {100 * tbs / copy_tbs:.0f}% |")
            print(lines[-1], flush=True)
        del sets
    x = mx.zeros((1024,), dtype=mx.float32)
    mx.eval(x)
    for smem in (0, ATTN_SMEM):
        empty = mx.fast.cuda_kernel(name=f"bb_empty_{smem}", input_names=["x"], output_names=["out"],
                                    source=EMPTY, shared_memory=smem)
        for blocks in (8, 128, 132):
            def run(blocks=blocks, empty=empty):
                for _ in range(16):
                    o = empty(inputs=[x], grid=(blocks * 128, 1, 1), threadgroup=(128, 1, 1),
                              output_shapes=[(blocks,)], output_dtypes=[mx.uint32])[0]
                    mx.eval(o)

            us = kernel_time_us(run, 16)
            lines.append(f"| empty launch | {blocks} x 128 | {smem} | {us:.1f} | - | - |")
            print(lines[-1], flush=True)
    return lines


def main() -> None:
    if backend.BACKEND != "cuda":
        print("h200_readbw: needs MLX's CUDA back-end")
        return
    which = os.environ.get("READBW_SIZES", "all")
    if which not in ("all", "matrices", "attention"):
        sys.exit(f"h200_readbw: READBW_SIZES must be all, matrices or attention, not {which!r}")
    kernel = mx.fast.cuda_kernel(name="bb_readbw", input_names=["x"], output_names=["out"], source=SOURCE)
    copy_tbs = copy_bandwidth_median() / 1e12  # as scripts/h200_qmm.py measures it
    if which == "matrices":
        lines = [f"# One-launch reads of issue 7's matrix bytes, H200 (MLX {mx.__version__}), CUPTI kernel time"]
        lines += small_reads(kernel, MATRIX_MB, copy_tbs)
        _write(lines)
        return
    nbytes = 1 << 30
    sets = [mx.random.normal((nbytes // 2,)).astype(mx.float16) for _ in range(3)]
    mx.eval(sets)
    lines = [f"# Read-only bandwidth, H200 (MLX {mx.__version__}), {nbytes >> 20} MiB fp16 per call, CUPTI kernel time", "",
             "| threads/block | blocks | loads in flight/thread | us | TB/s |", "|---|---|---|---|---|"]
    best = 0.0
    for tpb, blocks, u in [(256, 132 * 8, 4), (512, 132 * 4, 4), (256, 132 * 8, 8), (1024, 132 * 2, 8),
                           (256, 132 * 16, 2), (128, 132 * 16, 8)]:
        def run(tpb=tpb, blocks=blocks, u=u):
            outs = [_read(kernel, x, tpb, blocks, u) for x in sets]
            for o in outs:
                mx.eval(o)

        us = kernel_time_us(run, len(sets))
        tbs = nbytes / (us * 1e-6) / 1e12
        best = max(best, tbs)
        lines.append(f"| {tpb} | {blocks} | {u} | {us:.1f} | {tbs:.2f} |")
        print(lines[-1], flush=True)
    lines += small_reads(kernel, SMALL_MB + ([] if which == "attention" else MATRIX_MB), copy_tbs)
    k_bw, w_bw = copy_bandwidth()
    lines += ["", f"best read-only: {best:.2f} TB/s; MLX copy (x*2, read+write, 1 GiB): kernel {k_bw:.2f} TB/s, wall {w_bw:.2f} TB/s"]
    print(lines[-1])
    _write(lines)


def _write(lines: list[str]) -> None:
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "readbw.md"), "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
