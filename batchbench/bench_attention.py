"""Micro-benchmark of the block-skipping decode attention (`batchbench bench-attention`).

B sequences of ctx cells each in one unified cache (K/V [1, Hkv, B*ctx, D]), one decode
row per sequence. For every (B, ctx) it times a chain of dependent layers (layer i+1's q
is layer i's output; each layer has its own K/V so nothing stays in L2):
  ours list   : skip with the per-row live-block lists the cache provides
  ours scan   : skip by scanning the mask in the kernel (no lists)
  ours noskip : every block (the A/B baseline, --no-skip)
  sdpa unified: mx.fast.scaled_dot_product_attention on the unified cache with the mask
  sdpa separate: SDPA on separate per-sequence caches [B, Hkv, ctx, D], no mask
Kernel time = sum of CUDA kernel durations (torch.profiler in this process) per layer;
wall = MLX wall clock per layer inside the chain, until the last layer's output is ready.
TB/s = K/V bytes the B sequences own / time.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import mlx.core as mx

from batchbench import backend
from batchbench.kernels.attention import BLOCK, decode_attention, decode_attention_ref, pack_live_blocks
from batchbench.decode_step import segment_bounds
from batchbench.models.base import _compiled_decode_attention

HQ, HKV, D = 28, 4, 128
VARIANTS = ("list", "model", "scan", "noskip", "sdpa_unified", "sdpa_separate")
OURS = ("list", "model", "scan", "noskip")
DTYPE = mx.float16


@dataclass
class Timing:
    kernel_us: Optional[float]
    wall_us: float
    # Wall per layer added by a chain twice as long: what a layer costs once the chain's fixed
    # start (first submission) and end (the wait) are paid, as in a decode step of many layers.
    marginal_us: Optional[float] = None


@dataclass
class Row:
    b: int
    ctx: int
    kv_bytes: int
    times: dict = field(default_factory=dict)  # variant -> Timing
    errors: dict = field(default_factory=dict)  # variant -> max relative error vs fp32


# ---------------------------------------------------------------------------------------
# Timing helpers


def _torch_cuda():
    try:
        import torch  # noqa: WPS433 (optional, only for the profiler)
    except Exception:
        return None
    try:
        return torch if torch.cuda.is_available() else None
    except Exception:
        return None


def trace_events(prof, path: Optional[str] = None) -> list[dict]:
    """The complete ("X") events of a torch.profiler run, read back from its chrome trace
    (written to `path` and kept there, or to a temporary file)."""
    if path is None:
        with tempfile.TemporaryDirectory() as tmp:
            return trace_events(prof, os.path.join(tmp, "trace.json"))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    prof.export_chrome_trace(path)
    ev = json.loads(Path(path).read_text())
    ev = ev.get("traceEvents", ev) if isinstance(ev, dict) else ev
    return [e for e in ev if e.get("ph") == "X"]


def kernel_time_us(run: Callable[[], None], n_layers: int, names: tuple[str, ...] = ()) -> Optional[float]:
    """Sum of CUDA kernel durations of one `run()` per layer, or None without torch/CUDA. names:
    only the kernels whose name holds one of them (a chain's glue ops left out)."""
    torch = _torch_cuda()
    if torch is None or backend.BACKEND != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    run()
    mx.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        mx.synchronize()
        torch.cuda.synchronize()
    total = sum(float(e.get("dur", 0.0)) for e in trace_events(prof) if e.get("cat") == "kernel"
                and (not names or any(n in e.get("name", "") for n in names)))
    return total / n_layers


def wall_time_us(run: Callable[[], None], n_layers: int, reps: int, time_drain: bool = False) -> float:
    """Best of reps wall times of run(), per layer. run() waits for its own result (its
    mx.eval), as a decode step waits for its logits; the stream is drained after the clock
    stops, so that each rep starts idle without timing a second round trip to the device
    (0.5-1.3 us a layer of a 32-layer chain at B <= 3 on the H200, results/h200-2026-12-01-s39).
    time_drain=True times the drain too, as before (scripts/h200_wall_probe.py compares)."""
    run()
    mx.synchronize()
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        if time_drain:
            mx.synchronize()
        best = min(best, time.perf_counter() - t0)
        mx.synchronize()
    return best * 1e6 / n_layers


def copy_bandwidth_median(nbytes: int = 1 << 31, reps: int = 7) -> float:
    """MLX `x + 1` over nbytes of fp16 (read + write): bytes/s by the median wall time of reps
    calls after one warm-up (issue 7's copy bandwidth, scripts/h200_qmm.py's and h200_readbw.py's)."""
    a = mx.zeros((nbytes // 2,), mx.float16)
    mx.eval(a)
    mx.eval(a + 1)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        mx.eval(a + 1)
        ts.append(time.perf_counter() - t0)
    return 2 * a.nbytes / statistics.median(ts)


def copy_bandwidth(nbytes: int = 1 << 30, reps: int = 5) -> tuple[Optional[float], float]:
    """MLX `x * 2` over nbytes of fp16 (read + write): (TB/s by kernel time, TB/s by wall)."""
    x = mx.random.normal((nbytes // 2,)).astype(mx.float16)
    mx.eval(x)
    holder = {}

    def run():
        holder["y"] = x * 2
        mx.eval(holder["y"])

    k_us = kernel_time_us(run, 1)
    w_us = wall_time_us(run, 1, reps)
    moved = 2 * nbytes
    return (moved / (k_us * 1e-6) / 1e12 if k_us else None), moved / (w_us * 1e-6) / 1e12


# ---------------------------------------------------------------------------------------
# Problem set-up


def unified_problem(b: int, ctx: int, n_sets: int, pad: int = 256, seed: int = 0):
    """Per-layer K/V (unified and separate layouts), q, mask, live lists."""
    mx.random.seed(seed)
    n = b * ctx
    s = n + pad  # the cache buffer is larger than the used range
    layers = []
    for _ in range(n_sets):
        k = mx.random.normal((1, HKV, s, D)).astype(DTYPE)
        v = mx.random.normal((1, HKV, s, D)).astype(DTYPE)
        # Separate per-sequence caches with the same values.
        ks = k[0, :, :n].reshape(HKV, b, ctx, D).transpose(1, 0, 2, 3)
        vs = v[0, :, :n].reshape(HKV, b, ctx, D).transpose(1, 0, 2, 3)
        ks, vs = mx.contiguous(ks), mx.contiguous(vs)
        mx.eval(k, v, ks, vs)
        layers.append((k, v, ks, vs))
    q = mx.random.normal((1, HQ, b, D)).astype(DTYPE)
    cell_seq = mx.arange(n) // ctx
    mask = mx.where(cell_seq[None, :] == mx.arange(b)[:, None], 0.0, -math.inf).astype(DTYPE)
    per = ctx // BLOCK
    blocks = (mx.arange(b)[:, None] * per + mx.arange(per)[None, :]).astype(mx.int32)
    counts = mx.full((b,), per, dtype=mx.int32)
    mx.eval(q, mask, blocks, counts)
    return layers, q, mask, (blocks, counts)


def _chain(step: Callable[[mx.array, int], mx.array], q0: mx.array, n_layers: int,
           segments: Sequence[int] = ()):
    """One run of the chain. segments: as the model's decode step runs it, in compiled
    segments of these many layers (the last repeating), each submitted (mx.async_eval) before
    the next is built."""
    if not segments:
        def run():
            x = q0
            for i in range(n_layers):
                x = step(x, i)
            mx.eval(x)
            return x

        return run

    def body(a: int, b: int):
        return mx.compile(lambda x: _apply(step, x, a, b))

    segs = [body(a, b) for a, b in segment_bounds(n_layers, sizes=segments)]

    def run():
        x = q0
        for f in segs:
            x = f(x)
            mx.async_eval(x)
        mx.eval(x)
        return x

    return run


def model_segments() -> tuple[int, ...]:
    """Layers per compiled segment of the "model" chain: the decode step's on CUDA (also on
    other back-ends, for the table)."""
    return backend.DECODE_SEGMENTS or backend.CUDA_DECODE_SEGMENTS


def _in_place(o: mx.array, x: mx.array) -> mx.array:
    """Our kernels write token-major [1, T, Hq, D] (what o_proj reads) and return a transposed
    view; read as the next layer's q [1, Hq, T, D] it would make MLX copy it, a launch the
    model does not have. Reinterpreting the output's memory keeps one op per layer (the
    values are as good as any for timing; `_check_row` undoes it)."""
    return o.transpose(0, 2, 1, 3).reshape(x.shape)


def model_step(layers, mask: mx.array, live, scale: float) -> Callable[[mx.array, int], mx.array]:
    """Layer i of the 'model' chain: what the model's decode step runs, the compiled call with
    the live rows packed once per step by the cache (PackedLive), so a layer is one custom op
    (run in compiled segments of layers, each submitted before the next is built)."""
    packed = pack_live_blocks(live)
    mx.eval(packed)
    fn = _compiled_decode_attention(scale, True, True)

    def step(x: mx.array, i: int) -> mx.array:
        k, v, _, _ = layers[i % len(layers)]
        return _in_place(fn(x, k, v, mask, packed), x)

    return step


def _apply(step, x, a: int, b: int):
    for i in range(a, b):
        x = step(x, i)
    return x


def main(
    bs: Sequence[int] = (2, 3, 8, 32),
    ctxs: Sequence[int] = (4096, 8192),
    reps: int = 5,
    out: Optional[str] = None,
    n_layers: int = 32,
    n_sets: int = 4,
    check: bool = True,
    variants: Sequence[str] = VARIANTS,
) -> list[Row]:
    """Run the sweep, print a table, optionally write it (markdown) to `out`."""
    scale = 1.0 / math.sqrt(D)
    rows: list[Row] = []
    k_bw, w_bw = copy_bandwidth()
    lines = [
        f"backend {backend.describe()}; Hq={HQ} Hkv={HKV} D={D} fp16; chain of {n_layers} "
        f"dependent layers over {n_sets} K/V sets",
        f"MLX copy bandwidth (x*2, 1 GiB): kernel {k_bw:.2f} TB/s, wall {w_bw:.2f} TB/s"
        if k_bw
        else f"MLX copy bandwidth (x*2, 1 GiB): kernel n/a, wall {w_bw:.2f} TB/s",
    ]
    print(lines[0])
    print(lines[1])
    for ctx in ctxs:
        for b in bs:
            row = Row(b, ctx, kv_bytes=b * ctx * HKV * D * 2 * DTYPE.size)
            try:
                layers, q, mask, live = unified_problem(b, ctx, n_sets)
            except Exception as e:  # noqa: BLE001 (report and go on)
                print(f"B={b} ctx={ctx}: set-up failed: {e}")
                continue
            qsep = mx.contiguous(q[0].transpose(1, 0, 2)[:, :, None, :])  # [B, Hq, 1, D]
            mx.eval(qsep)

            def ours(skip: bool, use_live: bool):
                def step(x, i):
                    k, v, _, _ = layers[i % n_sets]
                    o = decode_attention(
                        x, k, v, scale=scale, mask=mask, skip=skip,
                        live_blocks=live if use_live else None,
                    )
                    return _in_place(o, x)
                return step

            ours_model = model_step(layers, mask, live, scale)

            def sdpa_unified(x, i):
                k, v, _, _ = layers[i % n_sets]
                n = mask.shape[1]
                return mx.fast.scaled_dot_product_attention(
                    x, k[:, :, :n], v[:, :, :n], scale=scale, mask=mask
                )

            def sdpa_separate(x, i):
                _, _, ks, vs = layers[i % n_sets]
                return mx.fast.scaled_dot_product_attention(x, ks, vs, scale=scale)

            chosen = set(variants)
            runs = {
                "list": (ours(True, True), q),
                "model": (ours_model, q),
                "scan": (ours(True, False), q),
                "noskip": (ours(False, False), q),
                "sdpa_unified": (sdpa_unified, q),
                "sdpa_separate": (sdpa_separate, qsep),
            }
            runs = {name: r for name, r in runs.items() if name in chosen}
            for name, (step, q0) in runs.items():
                try:
                    segs = model_segments() if name == "model" else ()
                    run = _chain(step, q0, n_layers, segs)
                    k_us = kernel_time_us(run, n_layers)
                    w_us = wall_time_us(run, n_layers, reps)
                    row.times[name] = Timing(k_us, w_us)
                    if name == "model":
                        w2 = wall_time_us(_chain(step, q0, 2 * n_layers, segs), 2 * n_layers, reps)
                        row.times[name].marginal_us = 2 * w2 - w_us
                except Exception as e:  # noqa: BLE001
                    print(f"B={b} ctx={ctx} {name}: failed: {str(e)[:300]}")
            if check:
                _check_row(row, layers, q, qsep, mask, live, scale, runs)
            rows.append(row)
            print(format_row(row), flush=True)
            del layers
    table = format_table(rows)
    print(table)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text("\n".join(lines) + "\n\n" + table + "\n")
    return rows


def _check_row(row, layers, q, qsep, mask, live, scale, variants) -> None:
    """Max |x - ref| / max |ref| of one layer against the fp32 twin (MLX_ENABLE_TF32=0)."""
    k, v, _, _ = layers[0]
    try:
        ref = decode_attention_ref(
            q.astype(mx.float32), k.astype(mx.float32), v.astype(mx.float32),
            scale=scale, mask=mask.astype(mx.float32),
        )
        mx.eval(ref)
        denom = mx.abs(ref).max().item()
    except Exception as e:  # noqa: BLE001
        print(f"B={row.b} ctx={row.ctx}: reference failed: {e}")
        return
    for name, (step, q0) in variants.items():
        try:
            o = step(q0, 0)
            if name == "sdpa_separate":
                o = o[:, :, 0, :].transpose(1, 0, 2)[None]
            if name in OURS:  # undo the chain's in-place reading of the token-major output
                o = o.reshape(1, row.b, HQ, D).transpose(0, 2, 1, 3)
            row.errors[name] = (mx.abs(o.astype(mx.float32) - ref).max() / denom).item()
        except Exception as e:  # noqa: BLE001
            print(f"B={row.b} ctx={row.ctx} {name}: check failed: {str(e)[:300]}")


def _model_path(r: Row) -> str:
    t = r.times.get("model")
    if t is None:
        return "err"
    over = f"{t.wall_us - t.kernel_us:.1f}" if t.kernel_us is not None else "n/a"
    marg = "n/a" if t.marginal_us is None else f"{t.marginal_us:.1f}"
    marg_over = (
        f"{t.marginal_us - t.kernel_us:.1f}"
        if t.marginal_us is not None and t.kernel_us is not None else "n/a"
    )
    return f"{_fmt_us(t, True)} / {_fmt_us(t, False)} / {over} / {marg} / {marg_over}"


def _fmt_us(t: Optional[Timing], kernel: bool) -> str:
    if t is None:
        return "err"
    x = t.kernel_us if kernel else t.wall_us
    return "n/a" if x is None else f"{x:.1f}"


def _tbs(row: Row, t: Optional[Timing]) -> str:
    if t is None:
        return "err"
    x = t.kernel_us if t.kernel_us is not None else t.wall_us
    return f"{row.kv_bytes / (x * 1e-6) / 1e12:.2f}"


def format_row(row: Row) -> str:
    parts = [f"B={row.b:<3d} ctx={row.ctx:<5d} KV={row.kv_bytes / 1e6:7.1f} MB"]
    for name in VARIANTS:
        t = row.times.get(name)
        parts.append(f"{name} {_fmt_us(t, True)}/{_fmt_us(t, False)} us")
    errs = " ".join(f"{k}={v:.1e}" for k, v in row.errors.items())
    return " | ".join(parts) + (f" | err {errs}" if errs else "")


def format_table(rows: list[Row]) -> str:
    names = ("list", "scan", "noskip", "sdpa_unified", "sdpa_separate")
    head = (
        "| B | ctx | K+V MB | ours list us | TB/s | ours scan us | TB/s | no-skip us | "
        "SDPA unified+mask us | SDPA separate us | TB/s | skip/no-skip | list vs separate | "
        "wall us: list / scan / no-skip / unified / separate | max rel err: list / scan / no-skip / sdpa-sep | "
        "model path: kernel / wall / wall - kernel / marginal wall / marginal - kernel us |"
    )
    sep = "|" + "---|" * 17
    out = [
        "Kernel time per layer (sum of CUDA kernel durations over a chain of dependent layers; "
        "wall time = MLX wall clock per layer in the chain, from its first call until the last layer's "
        "output is ready). 'model path': the call the model's decode "
        "step makes (compiled, live rows packed once per step by the cache): one custom op per layer, "
        f"in compiled segments of {', '.join(map(str, model_segments()))} layers (the last repeating), "
        "each submitted before the next is built. Every variant of ours reads its output in place "
        "as the next layer's q (no copy between layers, as in the model). 'marginal wall': wall per "
        "layer that a chain twice as long adds (2 x wall(2n) - wall(n)): a layer's cost without the "
        "chain's fixed start and final wait, which a decode step pays once for all its layers.",
        "",
        head,
        sep,
    ]
    for r in rows:
        t = {n: r.times.get(n) for n in names}

        def kt(n):
            x = t[n]
            return None if x is None else (x.kernel_us if x.kernel_us is not None else x.wall_us)

        ratio = f"{kt('noskip') / kt('list'):.1f}x" if kt("noskip") and kt("list") else "n/a"
        vs_sep = f"{kt('sdpa_separate') / kt('list'):.2f}x" if kt("sdpa_separate") and kt("list") else "n/a"
        walls = " / ".join(_fmt_us(t[n], False) for n in names)
        errs = " / ".join(
            f"{r.errors[n]:.1e}" if n in r.errors else "-"
            for n in ("list", "scan", "noskip", "sdpa_separate")
        )
        out.append(
            f"| {r.b} | {r.ctx} | {r.kv_bytes / 1e6:.1f} | {_fmt_us(t['list'], True)} | {_tbs(r, t['list'])} | "
            f"{_fmt_us(t['scan'], True)} | {_tbs(r, t['scan'])} | {_fmt_us(t['noskip'], True)} | "
            f"{_fmt_us(t['sdpa_unified'], True)} | {_fmt_us(t['sdpa_separate'], True)} | "
            f"{_tbs(r, t['sdpa_separate'])} | {ratio} | {vs_sep} | {walls} | {errs} | {_model_path(r)} |"
        )
    return "\n".join(out)


if __name__ == "__main__":
    main()
