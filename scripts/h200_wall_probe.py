"""Where the decode-attention model path's wall time above kernel time goes (issue 3 asks for at
most 10 us a layer). bench-attention's 'model' variant is timed as one chain of 32 dependent
layers, so its wall per layer holds the chain's fixed start and final wait too. Here:

1. chains of 16, 32, 64 and 128 layers (best of 7 wall times each), fitted as fixed + per layer;
2. one 32-layer chain under torch's profiler (host and CUDA activity on one clock): from the
   run's start to its first kernel, the gaps between kernels, from the last kernel to the run's
   end, and the host's CUDA runtime and driver calls (graph launches and the rest) by name;
3. MLX's own floor: the same chains with a trivial custom kernel per layer (a copy of q, the
   same segments), so that what is left above it is ours;
4. the chain's end: run() and then mx.synchronize() in the timed part (bench-attention until
   session 39) against run() alone, which already waits for the last layer's output (its
   mx.eval): the difference is one extra round trip. wall_time_us now times run() alone.

5. `launch` (an argument of its own): where a host-bound chain's time goes. At B=2 x 64 every
   chain is host-bound. (The profiler shows ~60-80 us per cudaGraphLaunch for ours and for
   every variant but the floor's ~15, without the wall time following: CUPTI inflates them.)
   Trivial custom ops that differ from the floor in one way each (dynamic shared memory as ours
   asks, ours' inputs and outputs, ours' shape arguments), then ours: wall a layer (fit) and
   the host's graph calls.

    PYTHONPATH=. python3 scripts/h200_wall_probe.py 2x4096 3x4096 32x8192   # OUT=dir: wall-probe.md
    PYTHONPATH=. python3 scripts/h200_wall_probe.py launch
"""

from __future__ import annotations

import math
import os
import sys
from collections import defaultdict

import mlx.core as mx
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from batchbench import backend  # noqa: E402
from batchbench.kernels import attention as A, spec  # noqa: E402
from batchbench.bench_attention import (  # noqa: E402
    _chain, kernel_time_us, model_segments, model_step, trace_events, unified_problem, wall_time_us)

LENGTHS = (16, 32, 64, 128)

COPY = """
  const unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
  out[i] = x[i];
"""
OURS_INPUTS = ["x", "k", "v", "mask", "live", "counters"]


def copy_step(name: str, source: str = COPY, smem: int = 0, names=("x",), extra=lambda i: [], n_out: int = 1):
    """A layer that is one trivial custom op (a copy of x, the MLX cost of a custom op in a
    chain): inputs x and extra(i), named `names`; a second output `ws` if n_out == 2."""
    kernel = mx.fast.cuda_kernel(name=name, input_names=list(names), output_names=["out", "ws"][:n_out],
                                 source=source, shared_memory=smem)

    def step(x: mx.array, i: int) -> mx.array:
        assert x.size % 128 == 0
        return kernel(inputs=[x, *extra(i)], grid=(x.size, 1, 1), threadgroup=(128, 1, 1),
                      output_shapes=[x.shape, (64,)][:n_out], output_dtypes=[x.dtype, mx.int32][:n_out])[0]

    return step


def raw_step(layers, mask: mx.array, live, scale: float):
    """The model path's layer with one view op: the kernel's [1, T, Hq, D] output reshaped."""
    rows = A.pack_live_blocks(live)
    mx.eval(rows)

    def one(x, k, v, mask, rows):
        kspec, launch = A.plan_decode_attention("cuda", x, k, v, mask, scale=scale, skip=True,
                                                live_blocks=A.PackedLive(rows))
        return spec.run(kspec, launch)[0].reshape(x.shape)

    fn = mx.compile(one)

    def step(x: mx.array, i: int) -> mx.array:
        k, v, _, _ = layers[i % len(layers)]
        return fn(x, k, v, mask, rows)

    return step


def copy_with_shapes(sink: str) -> str:
    """COPY that also reads ours' four shape arguments (so MLX passes them, as for ours), in a
    branch never taken that stores `sink`."""
    return COPY + f"""
  if (i == 0 && k_shape[0] == -1 && v_shape[0] == -1 && mask_shape[0] == -1 && live_shape[0] == -1) {{
    {sink}
  }}
"""


def launch_variants(lines: list[str]) -> None:
    b, ctx = 2, 64
    layers, q, mask, live = unified_problem(b, ctx, 4)
    scale = 1.0 / math.sqrt(128)
    kspec, _ = A.plan_decode_attention("cuda", q, layers[0][0], layers[0][1], mask, scale=scale, skip=True,
                                       live_blocks=live)
    smem = kspec.shared_memory
    rows = A.pack_live_blocks(live)
    counters = mx.zeros((64,), mx.int32)
    mx.eval(rows, counters)

    tiny = [mx.zeros((64,), mx.float16) for _ in range(5)]
    mx.eval(tiny)

    def ours(i: int) -> list[mx.array]:
        k, v, _, _ = layers[i % len(layers)]
        return [k, v, mask, rows, counters]

    variants = [
        ("floor: copy, 1 input, 1 output", copy_step("bb_wall_c1")),
        (f"copy, {smem} B dynamic shared memory", copy_step("bb_wall_c1s", smem=smem)),
        ("copy, 1 input, 2 outputs", copy_step("bb_wall_c1o2", n_out=2)),
        ("copy, 6 inputs (5 tiny arrays), 1 output", copy_step("bb_wall_c6t", names=OURS_INPUTS, extra=lambda i: tiny)),
        ("copy, ours' 6 inputs, 1 output", copy_step("bb_wall_c6", names=OURS_INPUTS, extra=ours)),
        ("copy, ours' 6 inputs, 1 output, 4 shape arguments",
         copy_step("bb_wall_c6h", copy_with_shapes("out[1] = x[0];"), names=OURS_INPUTS, extra=ours)),
        ("copy, ours' 6 inputs, 2 outputs, 4 shape arguments",
         copy_step("bb_wall_c6o2", copy_with_shapes("ws[0] = counters[0];"), names=OURS_INPUTS, extra=ours, n_out=2)),
        ("ours (model path)", model_step(layers, mask, live, scale)),
    ]
    lines += ["", f"## Host-bound chains at B={b} x {ctx} (segments {model_segments()})", "",
              "| layer | kernel us | wall us a layer (fit) | fixed us | cudaGraphLaunch count x us | "
              "cudaGraphExecUpdate count x us |", "|---|---|---|---|---|---|"]
    for what, step in variants:
        runs = {n: _chain(step, q, n, model_segments()) for n in LENGTHS}
        k_us = kernel_time_us(runs[32], 32)
        _, fixed, per = fit(runs, k_us)
        p = profile_chain(runs[32])
        rt = p["runtime"]

        def call(name):
            c, d = rt.get(name, (0, 0.0))
            return f"{c} x {d / c:.1f}" if c else "-"

        lines.append(f"| {what} | {k_us:.1f} | {per:.1f} | {fixed:.0f} | {call('cudaGraphLaunch')} | "
                     f"{call('cudaGraphExecUpdate')} |")
        print(lines[-1], flush=True)


def fit(runs, k_us: float) -> tuple[list[str], float, float]:
    totals = np.array([wall_time_us(runs[n], n, 7) * n for n in LENGTHS])
    per, fixed = np.polyfit(np.array(LENGTHS, float), totals, 1)
    lines = ["| layers | wall us | wall / layer | wall / layer - kernel |", "|---|---|---|---|"]
    lines += [f"| {n} | {t:.0f} | {t / n:.1f} | {t / n - k_us:.1f} |" for n, t in zip(LENGTHS, totals)]
    lines += ["", f"fit: {fixed:.0f} us fixed + {per:.1f} us a layer ({per - k_us:.1f} above kernel time)"]
    return lines, fixed, per


def ends(run, n: int, rounds: int = 3, reps: int = 7) -> list[str]:
    """Best-of-reps wall per layer, alternating: run() + mx.synchronize() in the timed part (how
    bench-attention timed it until session 39) and run() alone (wall_time_us now)."""
    a, b = [], []
    for _ in range(rounds):
        a.append(wall_time_us(run, n, reps, time_drain=True))
        b.append(wall_time_us(run, n, reps))
    return [f"- {n}-layer chain, wall / layer, {rounds} rounds alternating: run() + mx.synchronize() "
            f"{' / '.join(f'{x:.1f}' for x in a)}; run() alone {' / '.join(f'{x:.1f}' for x in b)}"]


def profile_chain(run) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    run()
    mx.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function("bb_chain"):
            run()
            mx.synchronize()
        torch.cuda.synchronize()
    ev = trace_events(prof)
    chain = next(e for e in ev if e.get("name") == "bb_chain" and e.get("cat") != "gpu_user_annotation")
    c0, c1 = float(chain["ts"]), float(chain["ts"]) + float(chain["dur"])
    ks = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in ev if e.get("cat") == "kernel")
    ks = [k for k in ks if c0 <= k[0] <= c1]
    gaps = [b[0] - a[1] for a, b in zip(ks, ks[1:])]
    rt = defaultdict(lambda: [0, 0.0])
    for e in ev:
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and c0 <= float(e["ts"]) <= c1:
            rt[e["name"]][0] += 1
            rt[e["name"]][1] += float(e["dur"])
    return dict(kernels=len(ks), busy=sum(b - a for a, b in ks), start=ks[0][0] - c0 if ks else math.nan,
                gaps=sum(gaps), max_gap=max(gaps) if gaps else 0.0, tail=c1 - ks[-1][1] if ks else math.nan,
                total=c1 - c0, runtime=dict(rt))


def main() -> None:
    if backend.BACKEND != "cuda":
        print("h200_wall_probe: needs MLX's CUDA back-end")
        return
    args = sys.argv[1:] or ["2x4096", "3x4096", "32x8192"]
    cases = [tuple(int(x) for x in a.split("x")) for a in args if a != "launch"]
    scale = 1.0 / math.sqrt(128)
    lines = [f"# The model path's wall time above kernel time (MLX {mx.__version__}; segments {model_segments()})"]
    if "launch" in args:
        launch_variants(lines)
    for b, ctx in cases:
        layers, q, mask, live = unified_problem(b, ctx, 4)
        step = model_step(layers, mask, live, scale)
        runs = {n: _chain(step, q, n, model_segments()) for n in LENGTHS}
        k_us = kernel_time_us(runs[32], 32)
        lines += ["", f"## B={b} x {ctx}: kernel {k_us:.1f} us a layer", ""]
        lines += fit(runs, k_us)[0] + [""]
        fstep = copy_step("bb_wall_floor")
        floor = {n: _chain(fstep, q, n, model_segments()) for n in LENGTHS}
        f_us = kernel_time_us(floor[32], 32)
        lines += [f"MLX's floor: the same chains with one trivial custom op a layer (a copy of q; "
                  f"kernel {f_us:.1f} us a layer)", ""]
        lines += fit(floor, f_us)[0] + [""]
        raw = {n: _chain(raw_step(layers, mask, live, scale), q, n, model_segments()) for n in LENGTHS}
        r_us = kernel_time_us(raw[32], 32)
        lines += [f"Ours with one view op a layer (kernel {r_us:.1f} us a layer)", ""]
        lines += fit(raw, r_us)[0] + [""]
        lines += ends(runs[32], 32) + [f"  (floor: {ends(floor[32], 32)[0][2:]})", ""]
        for rep in range(2):
            p = profile_chain(runs[32])
            rt = ", ".join(f"{name} {c} x {d / c:.1f}" for name, (c, d) in
                           sorted(p["runtime"].items(), key=lambda kv: -kv[1][1])[:6])
            lines.append(
                f"- profiled 32-layer chain {rep + 1}: {p['total']:.0f} us; {p['kernels']} kernels busy {p['busy']:.0f}; "
                f"start -> first kernel {p['start']:.0f}; gaps {p['gaps']:.0f} (max {p['max_gap']:.0f}); "
                f"last kernel -> end {p['tail']:.0f}; runtime calls (count x us): {rt}")
        print("\n".join(lines[-(3 * len(LENGTHS) + 24):]), flush=True)
        del layers, runs, step, floor, fstep, raw
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "wall-probe.md"), "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
