#!/usr/bin/env python3
"""Where a decode step's wall time goes on MLX's CUDA back-end (issues 7 and 8).

Three questions, each answered by a measurement:
1. What does one op cost in a dependent chain (elementwise, tiny custom kernel with a small and
   a 40 KB source), split into host encode time (until `mx.async_eval` returns) and the rest?
2. For a 7B decode step (Q4_0-format weights, unified cache, PP=4096): host prep, Python graph
   build, host encode, wall; variants op-by-op / whole step compiled / async_eval every k layers.
3. What the device does in that step (torch.profiler/CUPTI): kernel count, sum of kernel
   durations, first-to-last span, top kernels by time.

MLX reads MLX_USE_CUDA_GRAPHS / MLX_MAX_OPS_PER_BUFFER once per process: run this script once
per setting. Run: PYTHONPATH=. python3 scripts/h200_overhead.py [B ...]
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import mlx.core as mx
import numpy as np

from batchbench import backend
from batchbench.decode_step import CompiledDecode
from batchbench.kernels import qmm
from batchbench.kv_cache import KVCache
from batchbench.presets import make_preset

OUT = os.environ.get("OUT", "/tmp")
TAG = os.environ.get("TAG", "default")


def chain_cost(step, x, n=256, reps=5):
    """Per-op (encode, wall) in us for a chain of n dependent calls of `step`."""
    enc, wall = [], []
    for r in range(reps + 1):
        mx.synchronize()
        t0 = time.perf_counter()
        h = x
        for _ in range(n):
            h = step(h)
        t1 = time.perf_counter()
        mx.async_eval(h)
        t2 = time.perf_counter()
        mx.eval(h)
        mx.synchronize()
        t3 = time.perf_counter()
        if r:
            enc.append((t2 - t1) / n * 1e6)
            wall.append((t3 - t0) / n * 1e6)
    return statistics.median(enc), statistics.median(wall)


def section_ops():
    print("\n== per-op cost in a dependent chain of 256 (us per op: host encode / wall) ==")
    x = mx.random.normal((1, 3584)).astype(mx.float16)
    mx.eval(x)
    cstep = mx.compile(lambda h: h * 1.0001)
    rows = [("elementwise, compiled", cstep), ("elementwise, op-by-op", lambda h: h * 1.0001)]
    if backend.BACKEND == "cuda":
        body = "unsigned int i = threadIdx.x + blockIdx.x * blockDim.x; if (i < 3584) out[i] = inp[i];"
        from batchbench.kernels.spec import cuda_header

        big = "// " + "x" * 40000 + "\n"
        for label, pad in (("custom kernel, 0.1 KB source", ""), ("custom kernel, 40 KB source", big),
                           ("custom kernel, 40 KB header #included", cuda_header(big + "// inc\n"))):
            k = mx.fast.cuda_kernel(name=f"bb_copy_{len(pad)}", input_names=["inp"], output_names=["out"],
                                    source=body, header=pad)

            def kstep(h, k=k):
                return k(inputs=[h], output_shapes=[h.shape], output_dtypes=[h.dtype],
                         grid=(3584, 1, 1), threadgroup=(256, 1, 1))[0]

            rows.append((label + ", op-by-op", kstep))
            rows.append((label + ", compiled", mx.compile(kstep)))
    for label, fn in rows:
        e, w = chain_cost(fn, x)
        print(f"{label:42s} {e:7.2f} / {w:7.2f}")


def kernel_profile(run_step, label):
    try:
        import torch
        from torch.profiler import ProfilerActivity, profile

        torch.zeros(1, device="cuda")
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001
        print(f"  profile skipped ({type(e).__name__}: {e})")
        return
    run_step()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run_step()
        mx.synchronize()
    path = os.path.join(OUT, f"trace-{TAG}-{label}.json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        ev = json.load(f)
    os.remove(path)
    ev = ev.get("traceEvents", ev) if isinstance(ev, dict) else ev
    ks = [e for e in ev if e.get("ph") == "X" and e.get("cat") == "kernel"]
    if not ks:
        print("  profile: no kernel events")
        return
    tot = sum(e["dur"] for e in ks)
    span = max(e["ts"] + e["dur"] for e in ks) - min(e["ts"] for e in ks)
    by = {}
    for e in ks:
        n = e["name"]
        n = n[:70]
        c, d = by.get(n, (0, 0.0))
        by[n] = (c + 1, d + e["dur"])
    print(f"  device [{label}]: {len(ks)} kernels, busy {tot / 1e3:.3f} ms, span {span / 1e3:.3f} ms")
    for n, (c, d) in sorted(by.items(), key=lambda kv: -kv[1][1])[:10]:
        print(f"    {d / 1e3:7.3f} ms {c:5d}x  {n}")


def section_step(bs, pp=4096, steps=12):
    print("\n== 7B decode step (qwen2.5-7b shape, q4_0 layout, unified cache, skip), ms ==")
    t = time.perf_counter()
    model, _ = make_preset(os.environ.get("PRESET", "qwen2.5-7b"), mx.float16, "q4_0")
    print("built in %.1f s; fused %s, fast linears %s" % (
        time.perf_counter() - t, qmm.fuse_quantized_projections(model), qmm.use_fast_quantized_linears(model)))
    a = model.args
    for B in bs:
        cache = KVCache(a.num_hidden_layers, a.num_key_value_heads, a.head_dim,
                        B * (pp + 256) + 256, B, True, mx.float16)
        cache.find_slot(np.repeat(np.arange(B), pp), np.tile(np.arange(pp), B))
        print(f"\nB={B}: {'variant':26s} {'prep':>7s} {'build':>7s} {'encode':>7s} {'wall':>7s} {'t/s':>7s}")
        # op by op (async_eval every k layers), or compiled segments of k layers (0: whole step)
        for label, compiled, every in (("op-by-op", False, 0), ("op-by-op, async every 4", False, 4),
                                       ("compiled step", True, 0), ("compiled segments of 4", True, 4),
                                       ("compiled segments of 7", True, 7)):
            step = CompiledDecode(model, cache, every) if compiled else None
            i = [0]

            def one(record=None):
                t0 = time.perf_counter()
                plan = cache.prepare(np.arange(B), np.full(B, pp + i[0]), None)
                plan.eval_every = every
                t1 = time.perf_counter()
                toks = mx.array(np.arange(B, dtype=np.int32))[None]
                logits = step(toks, plan) if compiled else model(toks, plan, cache)
                t2 = time.perf_counter()
                mx.async_eval(logits)
                t3 = time.perf_counter()
                mx.eval(logits)
                mx.synchronize()
                t4 = time.perf_counter()
                i[0] += 1
                if record is not None:
                    record.append((t1 - t0, t2 - t1, t3 - t2, t4 - t0))

            rec = []
            try:
                for _ in range(3):
                    one()
                for _ in range(steps):
                    one(rec)
            except Exception as e:  # noqa: BLE001
                print(f"   {label}: failed ({type(e).__name__}: {e})")
                continue
            med = [statistics.median(x) * 1e3 for x in zip(*rec)]
            print(f"     {label:26s} {med[0]:7.3f} {med[1]:7.3f} {med[2]:7.3f} {med[3]:7.3f} {B / med[3] * 1e3:7.1f}")
            if label in PROFILED and os.environ.get("PROFILE", "1") == "1":
                kernel_profile(one, f"B{B}-{label.replace(' ', '-').replace(',', '')}")
            cache.seq_rm(-1, pp)
        del cache
        mx.clear_cache()


PROFILED = ("op-by-op, async every 4", "compiled segments of 4")


def main():
    print(f"backend {backend.describe()}  MLX_USE_CUDA_GRAPHS={os.environ.get('MLX_USE_CUDA_GRAPHS', '-')}"
          f"  MLX_MAX_OPS_PER_BUFFER={os.environ.get('MLX_MAX_OPS_PER_BUFFER', '-')}")
    if os.environ.get("OPS", "1") == "1":
        section_ops()
    bs = tuple(int(x) for x in sys.argv[1:]) or (1, 32)
    section_step(bs, steps=12 if backend.BACKEND == "cuda" else 2)


if __name__ == "__main__":
    main()
