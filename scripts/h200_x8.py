"""The int8-activation matrix-vector kernel (`batchbench.kernels.qmv8`, an experiment) against the
fp16 path (`qmm.quantized_matmul`, packed scale/bias pairs as the layers hold them) on the 7B
matrices: error against float32 (dequantized weights, exact x), error of the kernel against its
twin, and kernel time (CUPTI, a dependent chain over rotating weight copies, so nothing stays in
L2), with the weight-read floor at 3.86 TB/s.

    PYTHONPATH=. python3 scripts/h200_x8.py          # on a CUDA machine; X8_M=1,2,4 (default 1,2)
    X8_BPS=2,4 ...                                   # blocks an SM to try (default 2)
Then the kernel with one row a block (K = 3584, 18944): little but each block's x quantization.
    X8_SWEEP="down:256:3:4:x,o_proj:64:2:4" ...        # only these geometries, at X8_M, beside the chosen
Each X8_SWEEP entry is matrix:LPR:U:R[:x][:bBLOCKS_PER_SM] (x: x in registers).
"""

from __future__ import annotations

import math
from dataclasses import replace
import os
import statistics
import sys

import mlx.core as mx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from batchbench import backend  # noqa: E402
from batchbench.bench_attention import _torch_cuda, kernel_time_us  # noqa: E402
from batchbench.kernels import qmm, qmv8  # noqa: E402

SHAPES = [("o_proj", 3584, 3584), ("q/k/v", 4608, 3584), ("gate/up", 37888, 3584), ("down", 3584, 18944),
          ("lm_head", 152064, 3584)]
FLOOR_TBS = 3.86


def rel(a: mx.array, b: mx.array) -> float:
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return float(mx.max(mx.abs(a - b)).item() / max(float(mx.max(mx.abs(b)).item()), 1e-30))


def kernel_us(fn, x0: mx.array, sets: list, names: tuple[str, ...], reps: int = 5) -> float:
    """Median over reps of the summed kernel time (kernels whose name holds one of `names`) of
    one call per weight set, each call's x made from the previous call's y (a dependent chain)."""

    def chain():
        x = x0
        for ws in sets:
            y = fn(x, *ws)
            x = x0 + (y[:, :1] * 0).astype(x0.dtype)
        mx.eval(x)

    return statistics.median(kernel_time_us(chain, len(sets), names) for _ in range(reps))


def weight_sets(n: int, k: int):
    """Random 4-bit group-32 weights (wq, scales, biases) of N x K, their bytes, and enough copies
    of them (the first being wq, s, b) for a chain whose weights do not stay in L2."""
    wq, s, b = mx.quantize((mx.random.normal((n, k)) * 0.02).astype(mx.float16), group_size=32, bits=4)
    nbytes = wq.nbytes + s.nbytes + b.nbytes
    copies = max(2, min(24, math.ceil(600e6 / nbytes)))
    sets = [(wq, s, b)] + [tuple(a + 0 for a in (wq, s, b)) for _ in range(copies - 1)]
    mx.eval(sets)
    return wq, s, b, nbytes, sets


def main() -> None:
    if backend.BACKEND != "cuda" or _torch_cuda() is None:
        print("h200_x8: needs MLX's CUDA back-end and torch (CUPTI)")
        return
    ms = [int(v) for v in os.environ.get("X8_M", "1,2").split(",")]
    if os.environ.get("X8_SWEEP"):
        sweep(os.environ["X8_SWEEP"], ms)
        return
    print(f"mlx {mx.__version__}; 4-bit group 32, fp16; floor = weight + scale/bias bytes at {FLOOR_TBS} TB/s")
    print("| matrix | N x K | M | x8 config | fp16 path us | x8 us | floor us | x8 err vs fp32 | fp16 path err | "
          "x8 vs twin |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, n, k in SHAPES:
        wq, s, b, nbytes, sets = weight_sets(n, k)
        # the fp16 path reads the packed pairs where the layers hold them (BB_QMM_SB_PACK)
        sets16 = [(a, c, d, qmm.pack_scales_biases(c, d) if qmm.packs_scales() else None) for a, c, d in sets]
        mx.eval([t[3] for t in sets16 if t[3] is not None])
        deq = mx.dequantize(wq, s, b, group_size=32, bits=4).astype(mx.float32)
        for m in ms:
            x0 = mx.random.normal((m, k)).astype(mx.float16)
            ref = x0.astype(mx.float32) @ deq.T
            y8 = qmv8.quantized_matvec_x8(x0, wq, s, b)
            yq = qmm.quantized_matmul(x0, wq, s, b, group_size=32, bits=4)
            e8, eq = rel(y8, ref), rel(yq, ref)
            t16 = kernel_us(lambda x, a, c, d, p: qmm.quantized_matmul(x, a, c, d, group_size=32, bits=4, packed=p),
                            x0, sets16, ("bb_qmm",))
            for bps in (int(v) for v in os.environ.get("X8_BPS", "2").split(",")):
                qmv8.BLOCKS_PER_SM = bps
                chosen = qmv8.choose_config(m, n, k)
                # x in registers (chosen where a row is one step) against the shared staging; R
                # as chosen against the 8-loads cap where the one-step rule raised it
                capped = replace(chosen, r=max(1, min(chosen.r, 8 // chosen.u)))
                for cfg in ([chosen] + ([replace(chosen, xreg=False)] if chosen.xreg else [])
                            + ([capped] if capped.r != chosen.r else [])):
                    t8 = kernel_us(lambda x, a, c, d, _cfg=cfg: qmv8.run(x, a, c, d, _cfg), x0, sets, ("bb_qmv8",))
                    et = rel(qmv8.run(x0, wq, s, b, cfg), qmv8.twin(x0, wq, s, b))
                    print(f"| {name} | {n} x {k} | {m} | R={cfg.r} U={cfg.u} LPR={cfg.lpr}{' xreg' * cfg.xreg} "
                          f"{bps}/SM | {t16:.1f} | {t8:.1f} | "
                          f"{nbytes / FLOOR_TBS / 1e6:.1f} | {e8:.1e} | {eq:.1e} | {et:.1e} |", flush=True)
        del sets, sets16, deq
    epilogue_check(ms)
    # every block quantizes x before its products: with one row a block the kernel is little else
    print("\n| K | M | blocks | config | one row a block: x8 us |\n|---|---|---|---|---|")
    for k in (3584, 18944):
        for m in ms:
            qmv8.BLOCKS_PER_SM = int(os.environ.get("X8_BPS", "2").split(",")[0])
            blocks = qmm.sm_count() * qmv8.BLOCKS_PER_SM
            w = (mx.random.normal((blocks, k)) * 0.02).astype(mx.float16)
            wq, s, b = mx.quantize(w, group_size=32, bits=4)
            x0 = mx.random.normal((m, k)).astype(mx.float16)
            chosen = qmv8.choose_config(m, blocks, k)
            for cfg in [chosen] + ([replace(chosen, xreg=False)] if chosen.xreg else []):
                t = kernel_us(lambda x, a, c, d, _cfg=cfg: qmv8.run(x, a, c, d, _cfg), x0, [(wq, s, b)] * 8,
                              ("bb_qmv8",))
                print(f"| {k} | {m} | {blocks} | LPR={cfg.lpr} U={cfg.u}{' xreg' * cfg.xreg} | {t:.1f} |", flush=True)


def sweep(spec: str, ms: list[int]) -> None:
    """Kernel time of the given geometries against choose_config's, on the named 7B matrices."""
    wanted: dict[str, list[tuple]] = {}
    for entry in spec.split(","):
        name, lpr, u, r, *flags = entry.split(":")
        bps = next((int(f[1:]) for f in flags if f.startswith("b")), 2)
        wanted.setdefault(name, []).append((int(lpr), int(u), int(r), "x" in flags, bps))
    print("| matrix | N x K | M | config | x8 us | floor us | x8 vs twin |\n|---|---|---|---|---|---|---|")
    for name, n, k in SHAPES:
        if name not in wanted:
            continue
        wq, s, b, nbytes, sets = weight_sets(n, k)
        for m in ms:
            x0 = mx.random.normal((m, k)).astype(mx.float16)
            qmv8.BLOCKS_PER_SM = 2
            cfgs = [("chosen", qmv8.choose_config(m, n, k))]
            for lpr, u, r, xreg, bps in wanted[name]:
                cfgs.append(("", qmv8.X8Config(r=r, u=u, blocks=qmm.sm_count() * bps, lpr=lpr, xreg=xreg)))
            for tag, cfg in cfgs:
                try:
                    t8 = kernel_us(lambda x, a, c, d, _cfg=cfg: qmv8.run(x, a, c, d, _cfg), x0, sets, ("bb_qmv8",))
                    et = f"{rel(qmv8.run(x0, wq, s, b, cfg), qmv8.twin(x0, wq, s, b)):.1e}"
                except Exception as e:  # a geometry the kernel rejects: say so and go on
                    t8, et = float("nan"), f"rejected: {str(e).splitlines()[0][:80]}"
                print(f"| {name} | {n} x {k} | {m} | R={cfg.r} U={cfg.u} LPR={cfg.lpr}{' xreg' * cfg.xreg} "
                      f"{cfg.blocks // qmm.sm_count()}/SM {tag} | {t8:.1f} | {nbytes / FLOOR_TBS / 1e6:.1f} | {et} |",
                      flush=True)
        del sets


def epilogue_check(ms: list[int]) -> None:
    """The decode step's chain on the GPU against the twins: down_proj with its residual writing
    the next norm's share (y, y * weight, per-block sums), gate/up (paired rows) taking it."""
    print("\n| M | down: y / y*w / sums vs twin | gate/up on the share vs twin | ... vs its norm in the prologue |")
    print("|---|---|---|---|")
    for m in ms:
        wd, sd, bd = mx.quantize((mx.random.normal((3584, 18944)) * 0.02).astype(mx.float16), group_size=32, bits=4)
        order = mx.array(qmm.glu_pair_order(18944))
        wg, sg, bg = (mx.take(a, order, axis=0) for a in mx.quantize(
            (mx.random.normal((37888, 3584)) * 0.02).astype(mx.float16), group_size=32, bits=4))
        a = mx.random.normal((m, 18944)).astype(mx.float16)
        res = mx.random.normal((m, 3584)).astype(mx.float16)
        nw = mx.random.uniform(0.5, 1.5, (3584,)).astype(mx.float16)
        epi = qmv8.Epilogue(residual=res, norm_out=nw)
        y, yw, ss = qmv8.run(a, wd, sd, bd, epi=epi)
        ty, tyw, tss = qmv8.twin(a, wd, sd, bd, epi)
        e_down = [rel(y, ty), rel(yw, tyw), rel(mx.sum(ss, axis=0), tss[0])]
        pre = qmv8.Epilogue(prenorm=(ss, 1e-6), glu_pair=True)
        g = qmv8.run(yw, wg, sg, bg, epi=pre)
        tg = qmv8.twin(yw, wg, sg, bg, pre)
        gn = qmv8.run(y, wg, sg, bg, epi=qmv8.Epilogue(norm=(nw, 1e-6), glu_pair=True))
        print(f"| {m} | {' / '.join(f'{e:.1e}' for e in e_down)} | {rel(g, tg):.1e} | {rel(g, gn):.1e} |", flush=True)

if __name__ == "__main__":
    main()
