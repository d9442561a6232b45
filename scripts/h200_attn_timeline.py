#!/usr/bin/env python3
"""Where the decode attention kernel's time goes: per-block phase timestamps (issue 3).

Runs the timeline build of the kernel (`plan_decode_attention(..., timeline=True)`: thread 0
of every block stamps %globaltimer at entry, live list count in, list filled, first K/V block
landed, walk done, warps merged, split counted, end) on bench-attention's unified problem, and
prints for each phase the min / median / max over blocks of its time since the earliest entry,
in us.
The last of REPS launches is read (the first compiles). With CUDA it also prints the kernel time
by CUPTI of the timeline build and of the plain build, each over REPS separate launches: the
difference between the plain build's and the span of the stamps is what no block accounts for
(the launch, and blocks starting or finishing after the stamps).

Run: PYTHONPATH=. python3 scripts/h200_attn_timeline.py [B x ctx ...]   e.g. 2x4096 32x8192
Without CUDA it runs the same source in the CPU emulator (default 2x256): a dry run of the
script, where every stamp reads its phase number.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

from batchbench import bench_attention as ba
from batchbench.kernels import attention as A
from batchbench.kernels import spec as kspec

REPS = 5
OUT = os.environ.get("OUT")  # with CUDA: every block's stamps of launches 2..REPS as CSV here


def timeline(b: int, ctx: int) -> None:
    layers, q, mask, live = ba.unified_problem(b, ctx, 1)
    k, v = layers[0][0], layers[0][1]
    ks, launch = A.plan_decode_attention("cuda", q, k, v, mask, scale=1 / math.sqrt(ba.D), live_blocks=live,
                                         timeline=True)
    ws_at = list(ks.input_names).index("ws")
    raw = []  # every launch after the first: (launch, stamps)
    if mx.cuda.is_available():
        kept = []
        for _ in range(REPS):  # each plan takes the next workspace of the pool: one per launch
            ks, launch = A.plan_decode_attention("cuda", q, k, v, mask, scale=1 / math.sqrt(ba.D),
                                                 live_blocks=live, timeline=True)
            out = kspec.run(ks, launch)[0]
            mx.eval(out)
            kept.append(launch.inputs[ws_at])
        mx.synchronize()
        # Read on the host only after the last launch: read after each one, the next launch
        # stalled ~80 us on its first writes to ws (session 15, call10; as if MLX reused the
        # buffer just read and its pages migrated back from the host).
        raw = [(i, A.read_timeline(w, launch).astype(np.int64)) for i, w in enumerate(kept) if i]
        ws = kept[-1]
    else:
        from batchbench.verify import emulate

        ws = emulate(ks, launch, schedules=("forward",)).inputs_after[ws_at]
    st = A.read_timeline(ws, launch).astype(np.int64)  # before the timed launches below reuse ws
    if mx.cuda.is_available():
        plain = A.plan_decode_attention("cuda", q, k, v, mask, scale=1 / math.sqrt(ba.D), live_blocks=live)
        cupti = [_kernel_us(*plan) for plan in ((ks, launch), plain)]
    if OUT and raw:
        _write_raw(Path(OUT) / f"attn-timeline-{b}x{ctx}.csv", raw, launch)
    t0 = st[:, 1].min()
    blocks, splits = st.shape[0], launch.grid[1]
    sms = len(set(st[:, 0].tolist()))
    print(f"\nB={b} ctx={ctx}: {blocks} blocks ({splits} splits) on {sms} SMs; "
          f"span {(st[:, 7].max() - t0) / 1e3:.2f} us (entry of the first block to end of the last)")
    print(f"  {'phase':18s} {'min':>8s} {'median':>8s} {'max':>8s}   us since the first entry; blocks")
    for i, name in enumerate(A.STAMP_PHASES, start=1):
        col = st[:, i]
        got = col[col > 0]
        if got.size == 0:
            print(f"  {name:18s} {'-':>8s}")
            continue
        rel = (got - t0) / 1e3
        print(f"  {name:18s} {rel.min():8.2f} {np.median(rel):8.2f} {rel.max():8.2f}   {got.size}")
    d = lambda a, b_: np.median((st[:, b_] - st[:, a])[(st[:, a] > 0) & (st[:, b_] > 0)]) / 1e3  # noqa: E731
    print(f"  per block, median us: entry->live count {d(1, 12):.2f}, live count->list {d(12, 2):.2f}, "
          f"list->first K/V {d(2, 3):.2f}, "
          f"first K/V->walk done {d(3, 4):.2f}, walk->merged {d(4, 5):.2f}, merged->end {d(5, 7):.2f}")
    m = st[:, 8] > 0  # the blocks that merged their pair's splits
    if m.any():
        steps = [(6, 8), (8, 9), (9, 10), (10, 11), (11, 7)]
        parts = ", ".join(f"{a}->{b_} {np.median(st[m, b_] - st[m, a]) / 1e3:.2f}" for a, b_ in steps)
        print(f"  the merge, median us over {int(m.sum())} merging blocks, each its part (phase numbers): {parts}")
    if len(raw) > 1:
        print("  " + _by_sm(raw))
    if mx.cuda.is_available():
        print(f"  kernel time by CUPTI, mean of {REPS} launches: timeline build "
              + " / plain build ".join("-" if t is None else f"{t:.2f} us" for t in cupti))


def _walks(st: np.ndarray) -> dict[int, float]:
    """SM -> us from the first K/V block landed to the walk done, for blocks that walked."""
    ok = (st[:, 3] > 0) & (st[:, 4] > 0)
    return {int(sm): (w4 - w3) / 1e3 for sm, w3, w4 in zip(st[ok, 0], st[ok, 3], st[ok, 4])}


def _by_sm(raw: list) -> str:
    """Is a slow walk the SM's or the block's? Blocks do equal work; session 15 found the walk
    time following the SM (same SM, same time, whichever block it ran)."""
    per = [_walks(st) for _, st in raw]
    common = sorted(set.intersection(*(set(p) for p in per)))
    if len(common) < 3:
        return "walk by SM: too few SMs in every launch"
    a = np.array([[p[sm] for sm in common] for p in per])
    corr = np.corrcoef(a)[np.triu_indices(len(per), 1)]
    mean = a.mean(axis=0)
    order = np.argsort(mean)
    return (f"walk by SM over launches 2..{REPS}: correlation {corr.min():.2f}-{corr.max():.2f}; "
            f"mean per SM {mean.min():.1f}-{mean.max():.1f} us (median {np.median(mean):.1f}); "
            f"fastest SMs {[common[i] for i in order[:6]]}, slowest {[common[i] for i in order[-6:]]}")


def _write_raw(path: Path, raw: list, launch) -> None:
    """Every block's stamps, us since its launch's first entry, with its (row, kv head chunk,
    split) and SM: which blocks walk slowly, and whether it is the SM or the data."""
    splits, heads = launch.grid[1], launch.grid[0] // launch.threadgroup[0]
    lines = ["launch,block,row,head,split,sm," + ",".join(A.STAMP_PHASES)]
    for i, st in raw:
        t0 = st[:, 1].min()
        for blk, r in enumerate(st):
            row, rest = divmod(blk, heads * splits)
            head, split = divmod(rest, splits)
            rel = ",".join(f"{(t - t0) / 1e3:.3f}" if t > 0 else "" for t in r[1:])
            lines.append(f"{i},{blk},{row},{head},{split},{r[0]},{rel}")
    path.write_text("\n".join(lines) + "\n")


def _kernel_us(ks, launch) -> float | None:
    def run():
        for _ in range(REPS):
            mx.eval(*kspec.run(ks, launch))

    return ba.kernel_time_us(run, REPS)


def main() -> None:
    default = [(1, 4096), (2, 4096), (8, 8192), (32, 8192)] if mx.cuda.is_available() else [(2, 256)]
    try:
        cases = [tuple(int(v) for v in a.split("x")) for a in sys.argv[1:]] or default
        if any(len(c) != 2 or min(c) < 1 for c in cases):
            raise ValueError
    except ValueError:
        sys.exit(f"h200_attn_timeline: cases are BxCTX with positive integers (e.g. 2x4096), got {sys.argv[1:]}")
    print(f"mlx {mx.__version__}, {mx.device_info().get('device_name', '')}"
          f"{'' if mx.cuda.is_available() else ' (no CUDA: CPU emulator dry run)'}")
    for b, ctx in cases:
        timeline(b, ctx)


if __name__ == "__main__":
    main()
