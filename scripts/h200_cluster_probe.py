"""Do thread-block clusters work through `mx.fast.cuda_kernel`? (a probe for the attention merge)

MLX generates the kernel's signature and launches it with a grid and a block size only, so a
cluster cannot be asked for at launch. A compile-time cluster shape can: the header redefines
`__global__` to carry `__cluster_dims__(1, CL, 1)` for the one kernel that follows it (nvcc
emits `.reqnctapercluster 1, CL, 1`). Each block stores a value in its shared memory, the
cluster synchronises, and each block reads its neighbour's through distributed shared memory.
If the launch honours the attribute, every block reports CL blocks in its cluster and its
neighbour's value; otherwise clusters of 1 (or a launch error). Two launch shapes: 16 blocks of
32 threads with 1 KB of shared memory, and the attention kernel's at B=2 x 4096 (4 x 16 x 2
blocks of 128 threads, 148736 bytes; clusters of 1, 2, 4 passed there on the H200, thirty-sixth
session).

    PYTHONPATH=. python3 scripts/h200_cluster_probe.py      # on a CUDA machine
"""

from __future__ import annotations

import os
import sys

import mlx.core as mx
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from batchbench import backend  # noqa: E402
from batchbench.bench_attention import kernel_time_us  # noqa: E402

HEADER = """
#undef __global__
#define __global__ __location__(global) __cluster_dims__(1, BB_CL, 1)
"""

SOURCE = """
  extern __shared__ unsigned int bb_sm[];
  cg::cluster_group cl = cg::this_cluster();
  const unsigned int b = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
  if (threadIdx.x == 0) {
    bb_sm[0] = b * 1000u + (unsigned int)x[0];
  }
  cl.sync();
  unsigned int* peer = cl.map_shared_rank(bb_sm, (cl.block_rank() + 1) % cl.num_blocks());
  if (threadIdx.x == 0) {
    out[b * 3 + 0] = cl.num_blocks();
    out[b * 3 + 1] = cl.block_rank();
    out[b * 3 + 2] = *peer;
  }
  cl.sync();  // no block leaves while a neighbour may still read its shared memory
"""


def probe(cl: int, blocks: int = 16, smem: int = 1024, tg: int = 32, gx: int = 1, gz: int = 1) -> tuple[bool, str]:
    """Clusters of cl blocks along y on a grid of gx x blocks x gz blocks of tg threads, with
    smem bytes of dynamic shared memory (the attention kernel at B=2 x 4096: 4 x 16 x 2 blocks
    of 128 threads, 148736 bytes)."""
    kernel = mx.fast.cuda_kernel(
        name=f"bb_cluster_probe_{cl}_{smem}", input_names=["x"], output_names=["out"], source=SOURCE,
        header=f"#define BB_CL {cl}\n" + HEADER, shared_memory=smem,
    )
    x = mx.array([7.0], dtype=mx.float32)
    n = gx * blocks * gz

    def launch() -> mx.array:
        return kernel(inputs=[x], grid=(tg * gx, blocks, gz), threadgroup=(tg, 1, 1),
                      output_shapes=[(n * 3,)], output_dtypes=[mx.uint32])[0]

    got = np.array(launch()).reshape(n, 3)
    z, y, xx = np.meshgrid(np.arange(gz), np.arange(blocks), np.arange(gx), indexing="ij")
    y, z, xx = y.ravel(), z.ravel(), xx.ravel()
    want_rank = y % cl
    peer_y = y // cl * cl + (want_rank + 1) % cl
    want_peer = ((z * blocks + peer_y) * gx + xx) * 1000 + 7
    ok = (got[:, 0] == cl).all() and (got[:, 1] == want_rank).all() and (got[:, 2] == want_peer).all()

    def run():
        for _ in range(16):
            mx.eval(launch())

    us = kernel_time_us(run, 16)
    return bool(ok), f"cluster {cl}, {gx}x{blocks}x{gz} blocks of {tg}, smem {smem}: {'ok' if ok else 'WRONG'}; " \
                     f"first rows {got[:3].tolist()}; {'n/a' if us is None else f'{us:.1f} us'} per launch"


def main() -> None:
    if backend.BACKEND != "cuda":
        print("h200_cluster_probe: needs MLX's CUDA back-end")
        return
    for cl, shape in [(c, {}) for c in (1, 2, 4, 8)] + [(c, dict(smem=148736, tg=128, gx=4, gz=2)) for c in (1, 2, 4)]:
        try:
            print(probe(cl, **shape)[1], flush=True)
        except Exception as e:  # noqa: BLE001 (a probe: report and go on)
            print(f"cluster {cl} {shape or 'small'}: failed: {str(e)[:300]}", flush=True)


if __name__ == "__main__":
    main()
