"""What does a grid-wide barrier cost inside one `mx.fast.cuda_kernel` launch? This is a probe
for a layer's matmuls in one persistent launch (docs/perf-notes.md, twenty-third session, step 4).

MLX gives no programmatic dependent launch, so the only way to overlap one matmul's tail with the
next one's first weight loads is one launch with a barrier between the phases. This probe times a
persistent grid (BLOCKS_PER_SM blocks of 256 threads on every SM, so all are co-resident) that
passes N barriers: N = 0, 1, 8, 32. Kernel time (CUPTI) minus N = 0's, divided by N, is the cost
of one barrier. A barrier is a block barrier, then thread 0 adds one to a global count
(release) and spins until the count reaches (i + 1) x blocks (acquire), then a block barrier.

Every block reports how many barriers it passed. A spin that waits too long (2^20 polls: blocks
not co-resident) gives up and flags its block, so the probe cannot hang; a flagged grid is not
timed.

    PYTHONPATH=. python3 scripts/h200_barrier_probe.py      # on a CUDA machine
    BLOCKS_PER_SM=1,2,3 SMS=132 ...                          # the defaults
"""

from __future__ import annotations

import os
import sys

import mlx.core as mx
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from batchbench import backend  # noqa: E402
from batchbench.bench_attention import kernel_time_us  # noqa: E402
from batchbench.kernels import spec as kspec  # noqa: E402

THREADS = 256
# out[0]: the arrival count; out[1 + b]: barriers block b passed, GAVE_UP set if one spin gave up
SOURCE = """
  unsigned int* count = out;
  const int n = nb[0];
  const unsigned int blocks = gridDim.x;
  unsigned int flag = 0u;
  for (int i = 0; i < n; ++i) {
    __syncthreads();
    if (threadIdx.x == 0) {
      unsigned int old;
      asm volatile("atom.release.gpu.global.add.u32 %0, [%1], 1;" : "=r"(old) : "l"(count) : "memory");
      const unsigned int target = (unsigned int)(i + 1) * blocks;
      for (unsigned int spins = 0;; ++spins) {
        unsigned int v;
        asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(count) : "memory");
        if (v >= target) break;
        if (spins > (1u << 20)) { flag = 0x80000000u; break; }
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) out[1 + blockIdx.x] = (unsigned int)n | flag;
"""
SPEC = kspec.KernelSpec(backend="cuda", name="bb_barrier_probe", input_names=("nb",), output_names=("out",),
                        source=SOURCE)


def launch(blocks: int, n: int) -> kspec.Launch:
    # padded past 8 bytes: MLX keeps arrays of 8 bytes or less in a managed-memory scalar pool,
    # and a kernel that reads one stalls for 10-15 us (session 24's first run: 11 us at N = 0)
    nb = mx.array([n] + [0] * 63, dtype=mx.int32)
    return kspec.Launch(inputs=[nb], output_shapes=[(1 + blocks,)],
                        output_dtypes=[mx.uint32], grid=(blocks * THREADS, 1, 1), threadgroup=(THREADS, 1, 1),
                        init_value=0)


def probe(blocks: int, n: int) -> tuple[bool, float | None]:
    """(every block passed n barriers and the count is n x blocks, kernel time in us)."""
    ln = launch(blocks, n)
    out = np.array(kspec.run(SPEC, ln)[0])
    ok = bool(out[0] == n * blocks and (out[1:] == n).all())
    if not ok:  # a spin gave up: not worth timing
        return ok, None

    def run() -> None:
        for _ in range(8):
            mx.eval(kspec.run(SPEC, ln)[0])

    return ok, kernel_time_us(run, 8)


def _sms() -> int:
    if "SMS" in os.environ:
        return int(os.environ["SMS"])
    try:
        import torch

        return torch.cuda.get_device_properties(0).multi_processor_count
    except Exception:  # noqa: BLE001 (no torch: the H200's count)
        return 132


def main() -> None:
    if backend.BACKEND != "cuda":
        print("h200_barrier_probe: needs MLX's CUDA back-end")
        return
    sms = _sms()
    print(f"{sms} SMs, {THREADS} threads a block")
    print("| blocks a SM | blocks | N | all passed | kernel us | us a barrier |")
    print("|---|---|---|---|---|---|")
    for per_sm in (int(v) for v in os.environ.get("BLOCKS_PER_SM", "1,2,3").split(",")):
        blocks = per_sm * sms
        base = None
        for n in (0, 1, 8, 32):
            try:
                ok, us = probe(blocks, n)
            except Exception as e:  # noqa: BLE001 (a probe: report and go on)
                print(f"| {per_sm} | {blocks} | {n} | failed: {str(e)[:200]} | | |", flush=True)
                break
            base = us if n == 0 else base
            each = "" if n == 0 or us is None or base is None else f"{(us - base) / n:.2f}"
            print(f"| {per_sm} | {blocks} | {n} | {'yes' if ok else 'NO'} | "
                  f"{'n/a' if us is None else f'{us:.2f}'} | {each} |", flush=True)


if __name__ == "__main__":
    main()
