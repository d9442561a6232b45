"""Timeline of whole decode steps (CUDA): where the GPU waits for the host.

Runs decode steps of the Qwen2.5-7B shape (Q4_0-format weights, unified cache, PP cells per
sequence, live-block skipping) exactly as the benchmark's TG loop does (prepared ahead,
compiled segments, a wait per step), under torch.profiler with CPU ranges per step, and prints
per step: wall time, GPU kernel time, the time from the step's start to its first kernel,
gaps between kernels inside the step, and the time from its last kernel to the step's end;
then the CUDA runtime calls by total host time and the kernels by total GPU time.

    PYTHONPATH=. python3 scripts/h200_step_trace.py [B ...]     # OUT=dir keeps the traces
    TRACE_SYNC_AB=1: first time the steps with and without a trailing mx.synchronize(), interleaved
    TRACE_SEG_AB="2,7;1,2,4,7": first time steps under these decode segmentations, interleaved
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time

import mlx.core as mx
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from batchbench import backend  # noqa: E402
from batchbench import bench  # noqa: E402
from batchbench.bench import Mode, Runner  # noqa: E402
from batchbench.bench_attention import trace_events  # noqa: E402
from batchbench.decode_step import CompiledDecode  # noqa: E402
from batchbench.kv_cache import KVCache  # noqa: E402
from batchbench.presets import make_preset  # noqa: E402

PP = int(os.environ.get("TRACE_PP", "4096"))
AB = os.environ.get("TRACE_SYNC_AB") == "1"
SEG_AB = os.environ.get("TRACE_SEG_AB", "")  # "2,7;1,2,4,7": decode segmentations to compare
STEPS = int(os.environ.get("TRACE_STEPS", "8"))


def trace_steps(model, B: int) -> None:
    import torch  # noqa: F401
    from torch.profiler import ProfilerActivity, profile, record_function

    a = model.args
    cache = KVCache(a.num_hidden_layers, a.num_key_value_heads, a.head_dim, B * (PP + 256) + 256, B, True,
                    mx.float16)
    r = Runner(model, cache, Mode("skip"), 2048, 512, compiled=True)
    cache.find_slot(np.repeat(np.arange(B), PP), np.tile(np.arange(PP), B))

    def batch(i):
        return np.arange(B) % a.vocab_size, np.full(B, PP + i), np.arange(B), np.ones(B, bool)

    def run(n: int, i0: int, mark: bool) -> list[float]:
        walls = []
        nxt = r.prepare(*batch(i0))
        for i in range(n):
            t0 = time.perf_counter()
            with record_function(f"step{i}") if mark else contextlib.nullcontext():
                last = r.submit(*nxt)
                nxt = r.prepare(*batch(i0 + i + 1))
                bench._sync(last)
            walls.append(time.perf_counter() - t0)
        return walls

    run(4, 0, False)  # compile, warm
    i0 = 4
    if AB:  # the step's wait with and without a trailing mx.synchronize(), interleaved
        res = {False: [], True: []}
        for rep in range(6):
            for full in (False, True):
                bench.FULL_SYNC = full
                res[full] += run(16, i0, False)
                i0 += 16
        bench.FULL_SYNC = False
        print(f"B={B}: step wall, eval only {statistics.median(res[False]) * 1e3:.3f} ms, eval + "
              f"mx.synchronize() {statistics.median(res[True]) * 1e3:.3f} ms (medians of {len(res[False])} steps)")
    if SEG_AB:
        seg_ab(model, cache, r, batch)
    walls = run(STEPS, i0, False)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run(STEPS, i0 + STEPS, True)
    X = trace_events(prof, os.path.join(os.environ.get("OUT") or "/tmp", f"step_trace_B{B}.json"))
    steps = sorted((e for e in X if e.get("cat") == "user_annotation" and str(e.get("name", "")).startswith("step")),
                   key=lambda e: e["ts"])
    ks = sorted((e for e in X if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    rt = [e for e in X if e.get("cat") == "cuda_runtime"]
    print(f"\nB={B} PP={PP}: wall per step, unprofiled: median {statistics.median(walls) * 1e3:.3f} ms "
          f"({B / statistics.median(walls):.1f} t/s)")
    print(f"{'step':>4} {'wall':>8} {'kernels':>8} {'n':>5} {'to 1st':>8} {'gaps':>8} {'after':>8}   us")
    for i, s in enumerate(steps):
        t0, t1 = s["ts"], s["ts"] + s["dur"]
        mine = [k for k in ks if t0 <= k["ts"] < t1]
        if not mine:
            continue
        busy = sum(k["dur"] for k in mine)
        span = mine[-1]["ts"] + mine[-1]["dur"] - mine[0]["ts"]
        print(f"{i:>4} {s['dur']:8.0f} {busy:8.0f} {len(mine):5d} {mine[0]['ts'] - t0:8.0f} {span - busy:8.0f} "
              f"{t1 - (mine[-1]['ts'] + mine[-1]['dur']):8.0f}")
    by: dict = {}
    for e in rt:
        n, d = by.get(e["name"], (0, 0.0))
        by[e["name"]] = (n + 1, d + e["dur"])
    print("CUDA runtime calls, per step: " + ", ".join(
        f"{name} {n / STEPS:.0f}x {d / STEPS:.0f} us" for name, (n, d) in sorted(by.items(), key=lambda kv: -kv[1][1])[:6]))
    byk: dict = {}
    for e in ks:
        key = e["name"][:56]
        n, d = byk.get(key, (0, 0.0))
        byk[key] = (n + 1, d + e["dur"])
    for key, (n, d) in sorted(byk.items(), key=lambda kv: -kv[1][1])[:8]:
        print(f"  {d / STEPS:8.0f} us/step  {n / STEPS:5.1f}x {d / n:7.1f} us  {key}")
    del cache, r
    mx.clear_cache()


def seg_ab(model, cache, r, batch) -> None:
    """Decode steps at one position (their cells removed after each step, so every step sees
    the same cache and no new shape) under each segmentation of TRACE_SEG_AB, interleaved."""
    schedules = [[int(x) for x in sch.split(",")] for sch in SEG_AB.split(";")]
    fns = [CompiledDecode(model, cache, sizes=sch) for sch in schedules]
    res: dict = {i: [] for i in range(len(fns))}

    def one(fn) -> float:
        toks, plan = r.prepare(*batch(0))
        t0 = time.perf_counter()
        bench._sync(fn(toks, plan))
        dt = time.perf_counter() - t0
        cache.seq_rm(-1, PP)
        return dt

    for fn in fns:  # compile
        for _ in range(3):
            one(fn)
    for _ in range(8):
        for i, fn in enumerate(fns):
            res[i] += [one(fn) for _ in range(12)]
    B = len(batch(0)[0])
    for i, sch in enumerate(schedules):
        segs = "+".join(str(b - a) for a, b in fns[i].segments)
        print(f"B={B}: segments {segs:18s} step wall median {statistics.median(res[i]) * 1e3:.3f} ms, "
              f"mean {statistics.mean(res[i]) * 1e3:.3f} ms ({len(res[i])} steps)")


def main(bs) -> None:
    print(f"backend {backend.describe()}")
    if backend.BACKEND != "cuda":
        print("h200_step_trace: needs MLX's CUDA back-end (torch.profiler reads CUPTI)")
        return
    model, _ = make_preset("qwen2.5-7b", mx.float16, "q4_0")
    from batchbench.kernels import qmm

    qmm.fuse_quantized_projections(model)
    qmm.use_fast_quantized_linears(model)
    for B in bs:
        trace_steps(model, B)


if __name__ == "__main__":
    main(tuple(int(x) for x in sys.argv[1:]) or (1, 8, 32))
