"""H200 run of the block-skipping decode attention: correctness on CUDA, then the benchmark.

Run on the GPU machine:  PYTHONPATH=. python3 scripts/h200_attention.py
Writes $OUT/attention-h200.md (and attention-bench.md) when OUT is set. Each check or
benchmark variant that fails is reported and the run goes on. Finishes in a few minutes.
"""

from __future__ import annotations

import os

os.environ.setdefault("MLX_ENABLE_TF32", "0")  # fp32 references must be real fp32

import datetime
import math
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

import mlx.core as mx

from batchbench import backend
from batchbench.kernels import attention as A
from batchbench.kernels.attention_cases import additive, live_lists, make_layout, reference

OUT = os.environ.get("OUT")
NP_DTYPE = {mx.float16: np.float16, mx.bfloat16: np.float32, mx.float32: np.float32}


def _gpu_name() -> str:
    try:
        r = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )
        return r.stdout.strip().splitlines()[0]
    except Exception:  # noqa: BLE001
        return "unknown GPU"


# (name, dtype, mask kind, D, G, Hkv, layout kwargs)
CASES = [
    ("fp16 G7 contiguous", mx.float16, "add", 128, 7, 4, dict(kind="contiguous", n_seq=8)),
    ("bf16 G7 2 tok/seq swa", mx.bfloat16, "add", 128, 7, 2,
     dict(kind="contiguous", n_seq=5, tokens_per_seq=2, n_swa=40)),
    ("fp16 G1 bool interleaved", mx.float16, "bool", 64, 1, 8, dict(kind="interleaved", n_seq=3)),
    ("fp16 G4 shared+empty row", mx.float16, "add", 128, 4, 2,
     dict(kind="shared", n_seq=4, empty_row=True)),
    ("bf16 G8 B32", mx.bfloat16, "add", 64, 8, 2, dict(kind="contiguous", n_seq=32, max_prompt=300)),
    ("fp16 G7 fp32-mask long", mx.float16, "f32", 96, 7, 1,
     dict(kind="contiguous", n_seq=2, max_prompt=3000)),
    ("fp16 G16", mx.float16, "add", 128, 16, 1, dict(kind="contiguous", n_seq=3)),
    ("bf16 G24 bool", mx.bfloat16, "bool", 128, 24, 1, dict(kind="interleaved", n_seq=2)),
    ("fp16 G7 B32 big", mx.float16, "add", 128, 7, 4,
     dict(kind="contiguous", n_seq=32, max_prompt=1000, tail=0)),
    ("fp16 G4 1 cell in last block", mx.float16, "add", 64, 4, 2, None),
]


def _inputs(rng, dtype, d, g, hkv, vis):
    t, n = vis.shape
    s = n + 37  # buffer past N holds NaN: the kernel must never read it
    q = rng.standard_normal((1, hkv * g, t, d)).astype(np.float32)
    k = rng.standard_normal((1, hkv, s, d)).astype(np.float32)
    v = rng.standard_normal((1, hkv, s, d)).astype(np.float32)
    k[:, :, n:] = np.nan
    v[:, :, n:] = np.nan
    qm, km, vm = (mx.array(x).astype(dtype) for x in (q, k, v))
    # The reference sees exactly the rounded inputs.
    q64, k64, v64 = (np.array(x.astype(mx.float32)) for x in (qm, km, vm))
    return qm, km, vm, q64, k64, v64


def run_checks(rng) -> list[tuple[str, str, float, str]]:
    results = []
    for name, dtype, mkind, d, g, hkv, lay in CASES:
        t0 = time.perf_counter()
        try:
            if lay is None:
                n = 77
                vis = np.zeros((2, n), dtype=bool)
                vis[0, n - 1] = True  # single visible cell in a partial last block
                vis[1, 40] = True
                owned = vis.copy()
            else:
                layout = make_layout(rng, **lay)
                vis, owned = layout.visible, layout.owned
            q, k, v, q64, k64, v64 = _inputs(rng, dtype, d, g, hkv, vis)
            if mkind == "bool":
                mask = mx.array(vis)
            else:
                mask = mx.array(additive(vis)).astype(mx.float32 if mkind == "f32" else dtype)
            scale = 1.0 / math.sqrt(d)
            want = reference(q64, k64, v64, vis, scale)
            exact = tuple(mx.array(x) for x in live_lists(vis))
            superset = tuple(mx.array(x) for x in live_lists(owned, pad_to=vis.shape[1] // 32 + 3))
            variants = {
                "scan": dict(skip=True),
                "list": dict(skip=True, live_blocks=exact),
                "list-superset": dict(skip=True, live_blocks=superset),
                "noskip": dict(skip=False),
            }
            tol = 4e-3 if dtype == mx.float16 else 3e-2
            worst, notes = 0.0, []
            for vname, kw in variants.items():
                got = A.decode_attention(q, k, v, scale=scale, mask=mask, **kw)
                got = np.array(got.astype(mx.float32)).astype(np.float64)
                err = float(np.abs(got - want).max()) if np.isfinite(got).all() else math.inf
                dead = ~vis.any(axis=1)
                if dead.any() and np.abs(got[:, :, dead]).max() != 0.0:
                    notes.append(f"{vname}: masked row not zero")
                if err > tol:
                    notes.append(f"{vname}: err {err:.2e}")
                worst = max(worst, err)
            # Independent launches in one graph may overlap: they must not disturb each other.
            n_conc = 4 if vis.size < 100_000 else 0
            outs = [A.decode_attention(q * (i + 1), k, v, scale=scale, mask=mask) for i in range(n_conc)]
            mx.eval(outs)
            for i, o in enumerate(outs):
                wi = reference(q64 * (i + 1), k64, v64, vis, scale)
                e = float(np.abs(np.array(o.astype(mx.float32)) - wi).max())
                if not e <= tol * (i + 1):
                    notes.append(f"concurrent call {i}: err {e:.2e}")
            status = "PASS" if not notes else "FAIL"
            shape = f"T={vis.shape[0]} N={vis.shape[1]} D={d} G={g} Hkv={hkv}"
            results.append((name, status, worst, shape + ("; " + "; ".join(notes) if notes else "")))
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            results.append((name, "ERROR", math.inf, str(e).splitlines()[0][:300]))
        print(f"{results[-1][1]:5s} {name:32s} max err {results[-1][2]:.2e} "
              f"({time.perf_counter() - t0:.1f}s) {results[-1][3]}", flush=True)
    # Every counter's count (its low 16 bits; the bits above count launches) must be back at zero.
    for (dtype, size), (arrays, _) in A._pools.items():
        if dtype == mx.int32 and any((np.array(a) & 0xFFFF).any() for a in arrays):
            results.append(("counters reset", "FAIL", math.inf, f"pool {size} not zero"))
            print("FAIL  counter pool not zero", flush=True)
    return results


def tune() -> str:
    """Kernel time of the list variant under a few (warps, stages, SMs) settings."""
    from batchbench import bench_attention as bench

    settings = [(4, 2, 132), (4, 3, 132), (8, 1, 132), (4, 2, 264)]
    configs = [(32, 8192), (8, 8192), (2, 4096)]
    scale = 1.0 / math.sqrt(bench.D)
    lines = ["| B | ctx | " + " | ".join(f"W={w} S={st} SMs={sm}" for w, st, sm in settings) + " |",
             "|---|---|" + "---|" * len(settings)]
    saved = {k: os.environ.get(k) for k in ("BB_ATTN_WARPS", "BB_ATTN_STAGES", "BB_ATTN_SMS")}
    try:
        for b, ctx in configs:
            layers, q, mask, live = bench.unified_problem(b, ctx, n_sets=4)
            cells = []
            for w, st, sm in settings:
                os.environ.update(BB_ATTN_WARPS=str(w), BB_ATTN_STAGES=str(st), BB_ATTN_SMS=str(sm))

                def step(x, i):
                    k, v, _, _ = layers[i % 4]
                    return A.decode_attention(x, k, v, scale=scale, mask=mask, live_blocks=live)

                try:
                    run = bench._chain(step, q, 32)
                    k_us = bench.kernel_time_us(run, 32)
                    if k_us is None:
                        k_us = bench.wall_time_us(run, 32, 3)
                    cells.append(f"{k_us:.1f}")
                except Exception as e:  # noqa: BLE001
                    cells.append("err: " + str(e).splitlines()[0][:60])
            lines.append(f"| {b} | {ctx} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
            del layers
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return "\n".join(lines)


def main() -> None:
    started = time.perf_counter()
    rng = np.random.default_rng(int(os.environ.get("SEED", "0")))
    head = [
        f"# Decode attention on {_gpu_name()}",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- machine: {platform.node()} ({platform.machine()}), MLX {mx.__version__}, "
        f"backend {backend.describe()}, MLX_ENABLE_TF32={os.environ.get('MLX_ENABLE_TF32')}",
        f"- command: PYTHONPATH=. python3 {' '.join(sys.argv)}",
        "",
    ]
    print("\n".join(head), flush=True)
    if backend.BACKEND != "cuda":
        print(f"warning: backend is {backend.BACKEND}, not cuda: the twin is what gets checked")

    checks = run_checks(rng)
    check_md = ["## Correctness (CUDA kernel vs float64 NumPy, K/V past N filled with NaN)", "",
                "| case | status | max abs err | notes |", "|---|---|---|---|"]
    for name, status, err, note in checks:
        check_md.append(f"| {name} | {status} | {err:.2e} | {note} |")

    bench_md = ""
    try:
        from batchbench import bench_attention

        out = os.path.join(OUT, "attention-bench.md") if OUT else None
        bench_attention.main(reps=5, out=out)
        if out and os.path.exists(out):
            bench_md = Path(out).read_text()
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        bench_md = f"benchmark failed: {e}"

    tune_md = ""
    if time.perf_counter() - started < float(os.environ.get("TUNE_BUDGET_S", "170")):
        try:
            tune_md = tune()
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            tune_md = f"tuning failed: {e}"
    else:
        tune_md = "skipped (time budget)"

    text = "\n".join(head + check_md) + "\n\n## Benchmark\n\n" + bench_md + \
        "\n\n## Tuning (ours, live lists; kernel us per layer)\n\n" + tune_md + \
        f"\n\ntotal run time {time.perf_counter() - started:.0f} s\n"
    if OUT:
        Path(OUT).mkdir(parents=True, exist_ok=True)
        Path(OUT, "attention-h200.md").write_text(text)
    print()
    print("\n".join(check_md))
    n_bad = sum(1 for c in checks if c[1] != "PASS")
    print(f"\n{len(checks) - n_bad}/{len(checks)} checks passed; total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
