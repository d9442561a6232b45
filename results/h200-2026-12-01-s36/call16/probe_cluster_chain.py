# Throwaway (session 36, not committed): the attention kernel with compile-time clusters, in the
# bench's chain, checked after plain runs and after a run under the torch profiler (CUPTI).
import dataclasses, math
import mlx.core as mx
import numpy as np
from batchbench import bench_attention as ba
from batchbench.kernels import attention as A

ORIG = A.plan_decode_attention
CL = [1]


def plan(*a, **kw):
    ks, launch = ORIG(*a, **kw)
    cl = CL[0]
    if cl > 1 and launch.grid[1] % cl == 0:
        ks = dataclasses.replace(ks, name=ks.name + f"_cl{cl}", header=(
            f"#undef __global__\n#define __global__ __location__(global) __cluster_dims__(1, {cl}, 1)\n" + ks.header))
    return ks, launch


A.plan_decode_attention = plan
scale = 1 / math.sqrt(ba.D)


def check(tag, layers, q, mask, live):
    k, v = layers[0][0], layers[0][1]
    o = A.decode_attention(q, k, v, scale=scale, mask=mask, live_blocks=live)
    ref = A.decode_attention_ref(q, k, v, scale=scale, mask=mask, live_blocks=live)
    err = float(mx.abs(o.astype(mx.float32) - ref.astype(mx.float32)).max())
    nz = sum(int((np.array(c) != 0).sum()) for c in A._counters[64][0])
    print(f"  {tag}: fresh launch max abs err {err:.3g}; nonzero counters {nz}", flush=True)


for b, ctx in ((2, 4096), (8, 8192)):
    layers, q, mask, live = ba.unified_problem(b, ctx, 4)
    for cl in (1, 2, 4, 1):
        CL[0] = cl
        print(f"B={b} ctx={ctx} cl={cl}", flush=True)

        def step(x, i):
            k, v = layers[i % 4][0], layers[i % 4][1]
            return ba._in_place(A.decode_attention(x, k, v, scale=scale, mask=mask, live_blocks=live), x)

        run = ba._chain(step, q, 32)
        run(); run()
        check("after 2 plain chains", layers, q, mask, live)
        us = ba.kernel_time_us(run, 32)
        check(f"after the profiled chain ({us:.1f} us a layer)", layers, q, mask, live)
        w = ba.wall_time_us(run, 32, 5)
        check(f"after wall timing ({w:.1f} us a layer)", layers, q, mask, live)
