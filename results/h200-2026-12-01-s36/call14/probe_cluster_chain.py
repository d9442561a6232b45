# Throwaway (session 36, not committed): the attention kernel with compile-time clusters in chains.
import dataclasses, math
import mlx.core as mx
import numpy as np
from batchbench import bench_attention as ba
from batchbench.kernels import attention as A
from batchbench.kernels import spec as kspec

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
b, ctx = 2, 4096
layers, q, mask, live = ba.unified_problem(b, ctx, 4)
scale = 1 / math.sqrt(ba.D)
for cl in (1, 2, 1, 4, 1):
    CL[0] = cl
    for mode in ("independent", "chain", "chain-eval-each"):
        x = q
        outs = []
        for i in range(40):
            k, v = layers[i % 4][0], layers[i % 4][1]
            o = A.decode_attention(x, k, v, scale=scale, mask=mask, live_blocks=live)
            if mode == "independent":
                outs.append((o, q, k, v))
            else:
                outs.append((o, x, k, v))
                x = o.astype(q.dtype)
            if mode == "chain-eval-each":
                mx.eval(o)
        mx.eval([t[0] for t in outs])
        worst = 0.0
        for o, xi, k, v in outs[-3:]:
            ref = A.decode_attention_ref(xi, k, v, scale=scale, mask=mask, live_blocks=live)
            worst = max(worst, float(mx.abs(o.astype(mx.float32) - ref.astype(mx.float32)).max()))
        cnt = [np.array(c) for c in A._counters[64][0]]
        nz = sum(int((c != 0).sum()) for c in cnt)
        print(f"cl={cl} {mode}: max abs err of the last 3 {worst:.3g}; nonzero counters in the pool {nz}", flush=True)
