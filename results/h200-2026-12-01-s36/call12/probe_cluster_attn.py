# Throwaway (session 36, not committed): the attention kernel launched with compile-time clusters.
import dataclasses, math, sys
import mlx.core as mx
import numpy as np
from batchbench import bench_attention as ba
from batchbench.kernels import attention as A
from batchbench.kernels import spec as kspec

for cl in (1, 2, 4):
    for b, ctx in ((2, 4096), (8, 8192)):
        layers, q, mask, live = ba.unified_problem(b, ctx, 1)
        k, v = layers[0][0], layers[0][1]
        scale = 1 / math.sqrt(ba.D)
        ks, launch = A.plan_decode_attention("cuda", q, k, v, mask, scale=scale, live_blocks=live)
        if cl > 1:
            ks = dataclasses.replace(ks, name=ks.name + f"_cl{cl}", header=(
                f"#undef __global__\n#define __global__ __location__(global) __cluster_dims__(1, {cl}, 1)\n" + ks.header))
        cnt = launch.inputs[5]
        before = int(np.abs(np.array(cnt)).sum())
        try:
            out = kspec.run(ks, launch)[0]
            mx.eval(out)
            ref = A.decode_attention_ref(q, k, v, scale=scale, mask=mask, live_blocks=live).transpose(0, 2, 1, 3)
            err = float(mx.abs(out.astype(mx.float32) - ref.astype(mx.float32)).max())
            after = np.array(cnt)
            print(f"cl={cl} B={b} ctx={ctx} splits={launch.grid[1]}: max abs err {err:.3g}; counters nonzero before {before}, after {int((after != 0).sum())} (values {sorted(set(after.tolist()))[:6]})", flush=True)
        except Exception as e:
            print(f"cl={cl} B={b} ctx={ctx}: failed: {str(e)[:300]}", flush=True)
