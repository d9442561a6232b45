#!/usr/bin/env python3
"""Where a decode step's wall time goes on MLX's CUDA back-end (issues 7 and 8).

Three questions, each answered by a measurement:
1. What does one op cost in a dependent chain (elementwise, tiny custom kernel with a small and
   a 40 KB source), split into host encode time (until `mx.async_eval` returns) and the rest?
2. For a 7B decode step (Q4_0-format weights, unified cache, PP=4096): host prep, Python graph
   build, host encode, wall; variants op-by-op / whole step compiled / async_eval every k layers.
3. What the device does in that step (torch.profiler/CUPTI): kernel count, sum of kernel
   durations, first-to-last span, top kernels by time; with API=1 also the host's CUDA runtime
   and driver calls (count, total time) during the step.
4. UPLOAD=1: what a small host-made array costs a decode step. MLX allocates arrays made from
   host data in CUDA managed memory; a kernel that reads one right after the host wrote it
   may fault its page over to the device.

Env: VARIANTS (comma list of op, op4, step, seg<k>[f<first>], default op4,step,seg4,seg7),
PROFILED (variants to profile with CUPTI), PREP_PROFILE=1 (cProfile of the host prep).

MLX reads MLX_USE_CUDA_GRAPHS / MLX_MAX_OPS_PER_BUFFER once per process: run this script once
per setting. Run: PYTHONPATH=. python3 scripts/h200_overhead.py [B ...]
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import statistics
import sys
import re
import time

import mlx.core as mx
import numpy as np

from batchbench import backend
from batchbench.bench_attention import trace_events
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
    ev = trace_events(prof)
    ks = [e for e in ev if e.get("cat") == "kernel"]
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
    if os.environ.get("API", "1") == "1":
        api = {}
        for e in ev:
            if e.get("cat") in ("cuda_runtime", "cuda_driver"):
                c, d = api.get(e["name"], (0, 0.0))
                api[e["name"]] = (c + 1, d + e["dur"])
        print(f"  host API [{label}]: {sum(d for _, d in api.values()) / 1e3:.3f} ms in {sum(c for c, _ in api.values())} calls")
        for n, (c, d) in sorted(api.items(), key=lambda kv: -kv[1][1])[:10]:
            print(f"    {d / 1e3:7.3f} ms {c:5d}x  {n[:70]}")


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
        for v in VARIANTS:
            label, compiled, every, first = _variant(v)
            step = CompiledDecode(model, cache, every, first) if compiled else None
            i = [0]

            def one(record=None):
                t0 = time.perf_counter()
                plan = cache.prepare(np.arange(B), np.full(B, pp + i[0]), None, tokens=np.arange(B))
                plan.eval_every = every
                t1 = time.perf_counter()
                toks = plan.tokens[None]
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
            if os.environ.get("PREP_PROFILE") == "1" and v == VARIANTS[-1]:
                pr = cProfile.Profile()
                pr.enable()
                for _ in range(steps):
                    one()
                pr.disable()
                buf = io.StringIO()
                pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(12)
                print(f"  cProfile of {steps} steps [{label}], by own time:")
                print("\n".join("    " + x for x in buf.getvalue().splitlines()[6:22] if x.strip()))
            if v in PROFILED and os.environ.get("PROFILE", "1") == "1":
                kernel_profile(one, f"B{B}-{label.replace(' ', '-').replace(',', '')}")
            cache.seq_rm(-1, pp)
        st = cache._staging
        print(f"  step data staged {'on the host (advised)' if st is not None and st.on_host else 'in managed memory'}")
        del cache
        mx.clear_cache()


VARIANTS = os.environ.get("VARIANTS", "op4,step,seg4,seg7").split(",")
PROFILED = os.environ.get("PROFILED", "op4,seg4").split(",")


def _variant(v: str) -> tuple[str, bool, int, int]:
    """(label, compiled, every, first) of a variant name: op, op4, step, seg<k>[f<first>]."""
    if v in ("op", "op4"):
        return ("op-by-op" + (", async every 4" if v == "op4" else ""), False, 4 if v == "op4" else 0, 0)
    if v == "step":
        return ("compiled step", True, 0, 0)
    m = re.fullmatch(r"seg(\d+)(?:f(\d+))?", v)
    if not m:
        raise SystemExit(f"unknown variant {v!r}")
    every, first = int(m[1]), int(m[2] or 0)
    return (f"compiled segments of {every}" + (f", first {first}" if first else ""), True, every, first)


def section_upload(reps=200):
    """Wall time of a tiny dependent step (gather one embedding row, add) whose index comes from
    the host each time, against one whose index is computed on the device."""
    print("\n== a host-made index array per step (us per step: host array creation / wall) ==")
    emb = mx.random.normal((32000, 3584)).astype(mx.float16)
    acc = mx.zeros((1, 3584), mx.float16)
    mx.eval(emb, acc)
    dev_idx = mx.array(np.array([5, 0, 0, 0], np.int32))[:1] + 0

    def run(make):
        nonlocal acc
        mk, wall = [], []
        for r in range(reps):
            t0 = time.perf_counter()
            idx = make(r)
            t1 = time.perf_counter()
            acc = acc + emb[idx]
            mx.eval(acc)
            t2 = time.perf_counter()
            mk.append(t1 - t0)
            wall.append(t2 - t0)
        return statistics.median(mk) * 1e6, statistics.median(wall) * 1e6

    state = {"d": dev_idx}

    def device_made(r):
        state["d"] = (state["d"] + 1) % 32000
        return state["d"]

    rows = [("host, 4 bytes (mx.array)", lambda r: mx.array(np.array([r], np.int32))),
            ("host, 16 bytes, first of 4", lambda r: mx.array(np.array([r, 0, 0, 0], np.int32))[:1]),
            ("host, 64 KB, first element", lambda r: mx.array(np.full(16384, r, np.int32))[:1]),
            ("device-made (index + 1)", device_made)]
    for label, make in rows:
        run(make)
        mk, wall = run(make)
        print(f"  {label:32s} {mk:8.1f} / {wall:8.1f}")


def main():
    print(f"backend {backend.describe()}  MLX_USE_CUDA_GRAPHS={os.environ.get('MLX_USE_CUDA_GRAPHS', '-')}"
          f"  MLX_MAX_OPS_PER_BUFFER={os.environ.get('MLX_MAX_OPS_PER_BUFFER', '-')}")
    if os.environ.get("OPS", "1") == "1":
        section_ops()
    if os.environ.get("UPLOAD") == "1":
        section_upload()
    bs = tuple(int(x) for x in sys.argv[1:]) or (1, 32)
    section_step(bs, steps=12 if backend.BACKEND == "cuda" else 2)


if __name__ == "__main__":
    main()
