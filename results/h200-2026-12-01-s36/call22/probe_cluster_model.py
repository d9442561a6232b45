# Throwaway (session 36, not committed): clustered attention through the compiled model path.
import dataclasses, math
import mlx.core as mx
import numpy as np
from batchbench import bench_attention as ba
from batchbench.kernels import attention as A
from batchbench.models.base import _compiled_decode_attention

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


def counters():
    return sum(int((np.array(c) != 0).sum()) for e in A._counters.values() for c in e[0])


for b, ctx in ((2, 4096),):
    layers, q, mask, live = ba.unified_problem(b, ctx, 4)
    packed = A.pack_live_blocks(live)
    mx.eval(packed)
    k0, v0 = layers[0][0], layers[0][1]
    ref = A.decode_attention_ref(q, k0, v0, scale=scale, mask=mask, live_blocks=live)
    for cl in (1, 2, 1):
        CL[0] = cl
        fn = _compiled_decode_attention.__wrapped__(scale, True, True)  # a fresh trace per cl
        o = fn(q, k0, v0, mask, packed)
        mx.eval(o)
        e1 = float(mx.abs(o.astype(mx.float32) - ref.astype(mx.float32)).max())
        o = fn(q, k0, v0, mask, packed)
        mx.eval(o)
        e2 = float(mx.abs(o.astype(mx.float32) - ref.astype(mx.float32)).max())
        print(f"cl={cl} compiled: first call err {e1:.3g}, second {e2:.3g}; nonzero counters {counters()}", flush=True)

        def step(x, i):
            k, v = layers[i % 4][0], layers[i % 4][1]
            return ba._in_place(fn(x, k, v, mask, packed), x)

        run = ba._chain(step, q, 32, ba.model_segments())
        run(); run()
        o = fn(q, k0, v0, mask, packed)
        mx.eval(o)
        e3 = float(mx.abs(o.astype(mx.float32) - ref.astype(mx.float32)).max())
        print(f"  after 2 compiled-segment chains: err {e3:.3g}; nonzero counters {counters()}", flush=True)
        us = ba.kernel_time_us(run, 32)
        o = fn(q, k0, v0, mask, packed)
        mx.eval(o)
        e4 = float(mx.abs(o.astype(mx.float32) - ref.astype(mx.float32)).max())
        print(f"  after a profiled chain ({us:.1f} us a layer): err {e4:.3g}; nonzero counters {counters()}", flush=True)
