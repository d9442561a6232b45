#!/usr/bin/env python3
"""H200 check of batchbench.kernels.qmm (issue 7): correctness, kernel timing, 7B decode step.

Run as `PYTHONPATH=. python3 scripts/h200_qmm.py` on the CUDA machine (MLX 0.32.4 CUDA).
Writes log.txt, results.json and results.md to $OUT when set. About 4 minutes; sections
are skipped (and say so) when the time budget (env QMM_BUDGET_S, default 240 s) runs out.

1. correctness: ours vs mx.dequantize + float32 matmul (MLX_ENABLE_TF32=0), relative error
   max|y - ref| / max|ref|, all 7B matrices, M in {1,2,3,7,8,16,32,33,64}, fp16/bf16, g32/g64,
   8-bit on a subset; MLX's own quantized_matmul error alongside.
2. kernel timing (fp16, 4-bit g32 = Q4_0 layout): ours vs mx.quantized_matmul vs float16
   matmul vs floor (weight bytes / measured copy bandwidth). Weights rotate over enough copies
   to defeat the 50 MB L2. 'chain' = dependent chain (one fused glue op per step, 'empty'
   = chain of the glue alone), 'indep' = independent calls in one eval.
3. decode step of the Qwen2.5-7B shape, attention excluded: 28 x (q,k,v,o,gate,up,down) +
   lm_head, whole step under mx.compile, chain of 8 dependent steps, median of 10; MLX's
   nn.QuantizedLinear vs ours (use_fast_quantized_linears) vs ours with q/k/v and gate/up fused.
4. kernel time from a torch.profiler (CUPTI) trace: sum of kernel durations per call.

QMM_HOT=1 times every call on the same weights (L2-hot where they fit) instead of rotating copies.
QMM_PATCH="name:M:field=value,...;..." runs the matmuls of one shape and range of M with another
launch geometry (see PATCH_SHAPES below), each checked against mx.dequantize first; the session
part `ab-cfg` (scripts/h200_session.sh) times a list of them in the decode step.
"""

from __future__ import annotations

import os

os.environ.setdefault("MLX_ENABLE_TF32", "0")

import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

from batchbench import backend  # noqa: E402
from batchbench.bench_attention import copy_bandwidth_median, trace_events  # noqa: E402
from batchbench.kernels import qmm  # noqa: E402

OUT = os.environ.get("OUT")
T0 = time.time()
BUDGET_S = float(os.environ.get("QMM_BUDGET_S", "240"))
LOG: list[str] = []
RES: dict = {"correctness": [], "kernel": [], "decode": [], "profile": [], "errors": []}

# (label, N, K): y[M, N] = x[M, K] @ W[N, K]^T
SHAPES = [
    ("q/o_proj", 3584, 3584),
    ("k/v_proj", 512, 3584),
    ("gate/up", 18944, 3584),
    ("down", 3584, 18944),
    ("lm_head", 152064, 3584),
]
# The launches the model makes of fused matrices (issue 7: "fuse what is cheap to fuse"): timed
# beside the matrices (kernel and profile sections), not in the correctness plan.
FUSED_SHAPES = [
    ("q/k/v fused", 4608, 3584),
    ("gate+up fused", 37888, 3584),
]
M_ALL = [1, 2, 3, 7, 8, 16, 32, 33, 64]
M_TIME = [1, 8, 32]
# A/B runs time only what they compare: QMM_VARIANTS=ours QMM_DECODE=ours_epilogues
VARIANTS = os.environ.get("QMM_VARIANTS", "ours,mlx,f16").split(",")
DECODE = os.environ.get("QMM_DECODE", "mlx,ours,ours_fused,ours_epilogues").split(",")
# QMM_SMALL=1: shapes / 8 and 2 layers, to dry-run the script logic on a CPU.
SMALL = os.environ.get("QMM_SMALL") == "1"
if SMALL:
    SHAPES = [(name, n // 8, k // 8) for name, n, k in SHAPES]
    FUSED_SHAPES = [(name, n // 8, k // 8) for name, n, k in FUSED_SHAPES]


# QMM_PATCH: other launch geometries for an A/B of the decode step, without touching the
# package. "name:M:field=value,...;..." with name in PATCH_SHAPES, M one batch size (or a-b),
# fields of QmmConfig (pre 0/1, blocks=persist: the persistent grid of the patched config).
# Each patched config is checked against mx.dequantize + float32 before the step is timed.
PATCH_SHAPES = {"o": (3584, 3584), "qkv": (4608, 3584), "gu": (37888, 3584), "down": (3584, 18944),
                "lm": (152064, 3584)}


def _parse_patch(text: str) -> list[tuple[tuple[int, int], tuple[int, int], dict]]:
    rules = []
    for part in filter(None, (t.strip() for t in text.split(";"))):
        name, ms, fields = part.split(":")
        lo, _, hi = ms.partition("-")
        ch = {}
        for kv in fields.split(","):
            key, val = kv.split("=")
            ch[key] = val if val == "persist" else bool(int(val)) if key == "pre" else int(val)
        rules.append((PATCH_SHAPES[name], (int(lo), int(hi or lo)), ch))
    return rules


PATCH = _parse_patch(os.environ.get("QMM_PATCH", ""))
# QMM_RED_PLAIN_VEC=1: the plain split-K reduce one element a thread (qmm.PLAIN_RED_VEC), the
# baseline of session 30's A/B; QMM_TOP: kernels listed by time in the decode profile.
if os.environ.get("QMM_RED_PLAIN_VEC"):
    qmm.PLAIN_RED_VEC = int(os.environ["QMM_RED_PLAIN_VEC"])
TOP_KERNELS = int(os.environ.get("QMM_TOP", "14"))
X8_TOL = 2e-2  # relative error allowed where x goes int8 (qmm._x8_takes); a wrong kernel is off by O(1)
_choose = qmm.choose_config


def _patched_choose(m: int, n: int, k: int, bits: int):
    from dataclasses import replace

    cfg = _choose(m, n, k, bits)
    for (pn, pk), (lo, hi), ch in PATCH:
        if (n, k) == (pn, pk) and lo <= m <= hi:
            fields = {key: v for key, v in ch.items() if key != "blocks"}
            cfg = replace(cfg, **fields)
            blocks = ch.get("blocks")
            if blocks == "persist":
                cfg = qmm.persistent(cfg, k, bits)
            elif blocks is not None:
                cfg = replace(cfg, blocks=blocks)
    return cfg


if PATCH:
    qmm.choose_config = _patched_choose


def log(*a) -> None:
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    LOG.append(s)


def elapsed() -> float:
    return time.time() - T0


def left() -> float:
    return BUDGET_S - elapsed()


def save() -> None:
    if not OUT:
        return
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "log.txt"), "w") as f:
        f.write("\n".join(LOG) + "\n")
    with open(os.path.join(OUT, "results.json"), "w") as f:
        json.dump(RES, f, indent=1, default=str)


def err_note(what: str, e: BaseException) -> None:
    msg = f"{what}: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    log("  ERROR", msg)
    RES["errors"].append({"what": what, "error": msg, "trace": traceback.format_exc()[-3000:]})


def qbytes(n: int, k: int, bits: int, gs: int) -> int:
    return n * k * bits // 8 + 2 * 2 * n * (k // gs)


def make_weights(n: int, k: int, seed: int) -> mx.array:
    mx.random.seed(seed)
    w = (mx.random.normal((n, k)) * 0.02).astype(mx.float16)
    mx.eval(w)
    return w


def relerr(y: mx.array, ref: mx.array) -> float:
    y = y.astype(mx.float32)
    if not bool(mx.all(mx.isfinite(y)).item()):
        return float("nan")
    return (mx.abs(y - ref).max() / mx.maximum(mx.abs(ref).max(), 1e-30)).item()


def timeit(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


# --------------------------------------------------------------------------- environment
def section_env() -> float:
    log(f"mlx {mx.__version__}, backend {backend.describe()}, MLX_ENABLE_TF32={os.environ.get('MLX_ENABLE_TF32')}")
    try:
        info = mx.device_info() if hasattr(mx, "device_info") else {}
        log("device:", {k: v for k, v in dict(info).items() if k in ("device_name", "architecture", "memory_size")})
    except Exception as e:  # noqa: BLE001
        log("device info unavailable:", e)
    if backend.BACKEND != "cuda":
        log("WARNING: backend is not cuda: everything below measures the fallback")
    bw = float("nan")
    try:
        bw = copy_bandwidth_median(1 << (25 if SMALL else 31))  # 2 GiB
        log(f"copy bandwidth (read+write 2 GiB fp16 through MLX): {bw / 1e12:.3f} TB/s (median of 7)")
    except Exception as e:  # noqa: BLE001
        err_note("copy bandwidth", e)
    RES["copy_bw"] = bw
    return bw


# --------------------------------------------------------------------------- correctness
def section_correctness(weights: dict) -> None:
    log("\n== correctness: relative error max|y-ref|/max|ref| vs dequantize + fp32 matmul ==")
    plan = []  # (dtype, bits, gs, shapes, Ms, bias Ms)
    plan.append((mx.float16, 4, 32, [s[0] for s in SHAPES], M_ALL))
    plan.append((mx.bfloat16, 4, 64, [s[0] for s in SHAPES], [1, 7, 33]))
    plan.append((mx.float16, 4, 64, ["q/o_proj", "down"], [1, 32]))
    plan.append((mx.bfloat16, 4, 32, ["q/o_proj", "down"], [8]))
    plan.append((mx.float16, 8, 64, ["q/o_proj", "down"], [1, 8, 33]))
    plan.append((mx.bfloat16, 8, 32, ["q/o_proj"], [1, 16]))
    log(f"{'dtype':8} {'bits':>4} {'gs':>3} {'matrix':10} {'N':>6} {'K':>6} {'M':>3} {'S':>3} {'ours':>9} {'mlx':>9} {'1st call s':>10} ok")
    n_fail = 0
    for dtype, bits, gs, names, ms in plan:
        for name, n, k in SHAPES:
            if name not in names:
                continue
            if left() < 150:
                log(f"  (skipping the rest of correctness: {left():.0f} s left)")
                return
            try:
                wf = weights[name]
                w, s, b = mx.quantize(wf, group_size=gs, bits=bits)
                s, b = s.astype(dtype), b.astype(dtype)
                wd = mx.dequantize(w, s, b, group_size=gs, bits=bits).astype(mx.float32)
                bias = (mx.random.normal((n,)) * 0.5).astype(dtype)
                mx.eval(w, s, b, wd, bias)
            except Exception as e:  # noqa: BLE001
                err_note(f"prepare {name} {dtype} {bits} {gs}", e)
                continue
            for m in ms:
                use_bias = m in (3, 33)
                x = mx.random.normal((m, k)).astype(dtype)
                ref = x.astype(mx.float32) @ wd.T
                if use_bias:
                    ref = ref + bias.astype(mx.float32)
                mx.eval(x, ref)
                row = dict(dtype=str(dtype).split(".")[-1], bits=bits, gs=gs, matrix=name, N=n, K=k, M=m, bias=use_bias)
                try:
                    cov = qmm.covered(m, n, k, dtype, s, b, gs, bits)
                    cfg = qmm.choose_config(m, n, k, bits) if cov else None
                    t = time.perf_counter()
                    y = qmm.quantized_matmul(x, w, s, b, group_size=gs, bits=bits, bias=bias if use_bias else None)
                    mx.eval(y)
                    first = time.perf_counter() - t
                    e_ours = relerr(y, ref)
                    ym = mx.quantized_matmul(x, w, s, b, transpose=True, group_size=gs, bits=bits)
                    if use_bias:
                        ym = ym + bias
                    e_mlx = relerr(ym, ref)
                    # the int8-activation kernel (BB_QMM_X8, M <= 2) rounds x to int8 per group of
                    # 32 first: 4.6-8e-3 of max|y| on these matrices, against ~4e-4 on the fp16 path
                    x8 = qmm._x8_takes(m, n, k, x, s, b, gs, bits, bias if use_bias else None)
                    tol = X8_TOL if x8 else 3e-3 if dtype == mx.float16 else 2e-2
                    ok = cov and e_ours < tol
                    n_fail += not ok
                    row.update(S=cfg.s if cfg else None, err=e_ours, err_mlx=e_mlx, first_call_s=first, custom=cov, ok=ok,
                               x8=x8, tol=tol)
                    log(f"{row['dtype']:8} {bits:>4} {gs:>3} {name:10} {n:>6} {k:>6} {m:>3} {cfg.s if cfg else '-':>3} {e_ours:9.2e} {e_mlx:9.2e} {first:10.2f} {'ok' if ok else 'FAIL' + ('' if cov else ' (not covered: fallback)')}{' (int8 x)' if x8 else ''}")
                except Exception as e:  # noqa: BLE001
                    n_fail += 1
                    row.update(ok=False, error=str(e)[:300])
                    err_note(f"correctness {row}", e)
                RES["correctness"].append(row)
            del w, s, b, wd
            save()
    log(f"correctness: {n_fail} failing cases")


# --------------------------------------------------------------------------- kernel timing
# QMM_HOT=1: every call reads the same weights (L2-resident where they fit in its 50 MB), to
# see how much of a kernel's time is not the weight read itself
HOT = os.environ.get("QMM_HOT") == "1"


def _copies(arrs: list[mx.array], nbytes: int) -> list[list[mx.array]]:
    r = max(1, min(256, math.ceil(320e6 / nbytes)))
    if HOT:
        return [arrs] * max(r, 8)
    out = [arrs] + [[a + 0 for a in arrs] for _ in range(r - 1)]
    mx.eval(out)
    return out


def _bench(fn, x: mx.array, sets: list[list[mx.array]], glue: bool = True) -> dict:
    """fn(x, *set) -> y [M, N]. Returns per-call seconds: chain, indep."""

    def step(x, *ws):
        y = fn(x, *ws)
        return x + (y[..., :1] * 0).astype(x.dtype)

    cstep = mx.compile(step)
    L = max(len(sets), 48)

    def chain():
        h = x
        for i in range(L):
            h = cstep(h, *sets[i % len(sets)])
        mx.eval(h)

    def indep():
        ys = [fn(x, *sets[i % len(sets)]) for i in range(L)]
        mx.eval(ys)

    chain()
    indep()
    tc = statistics.median(timeit(chain, 5)) / L
    ti = statistics.median(timeit(indep, 5)) / L
    return dict(chain=tc, indep=ti)


def _empty_chain(x: mx.array) -> float:
    cstep = mx.compile(lambda h: h + (h[..., :1] * 0))
    L = 64

    def chain():
        h = x
        for _ in range(L):
            h = cstep(h)
        mx.eval(h)

    chain()
    return statistics.median(timeit(chain, 5)) / L


def _variants(gs: int, bits: int, qsets: list, fsets: list) -> list:
    """(name, fn, weight copies) of the matmuls the kernel and profile sections time: ours,
    mx.quantized_matmul, float16; only those in QMM_VARIANTS."""
    every = [
        ("ours", lambda x, w, s, b: qmm.quantized_matmul(x, w, s, b, group_size=gs, bits=bits), qsets),
        ("mlx", lambda x, w, s, b: mx.quantized_matmul(x, w, s, b, transpose=True, group_size=gs, bits=bits), qsets),
        ("f16", lambda x, w: x @ w.T, fsets),
    ]
    return [v for v in every if v[0] in VARIANTS]


def section_kernels(weights: dict, copy_bw: float) -> None:
    log("\n== kernel timing, fp16 x, 4-bit g32 (Q4_0 layout); us per call ==")
    gs, bits = 32, 4
    for name, n, k in SHAPES + FUSED_SHAPES:
        if left() < 90:
            log(f"  (skipping the rest of kernel timing: {left():.0f} s left)")
            return
        try:
            wf = weights[name]
            w, s, b = mx.quantize(wf, group_size=gs, bits=bits)
            mx.eval(w, s, b)
            qb = qbytes(n, k, bits, gs)
            qsets = _copies([w, s, b], qb)
            fsets = _copies([wf], wf.nbytes)
        except Exception as e:  # noqa: BLE001
            err_note(f"prepare timing {name}", e)
            continue
        for m in M_TIME:
            x = mx.random.normal((m, k)).astype(mx.float16)
            mx.eval(x)
            row = dict(matrix=name, N=n, K=k, M=m, bytes_q=qb, bytes_f16=wf.nbytes, S=qmm.choose_config(m, n, k, bits).s)
            try:
                row["empty"] = _empty_chain(x)
            except Exception as e:  # noqa: BLE001
                err_note("empty chain", e)
            for vname, fn, sets in _variants(gs, bits, qsets, fsets):
                try:
                    r = _bench(fn, x, sets)
                    row[vname + "_chain"], row[vname + "_indep"] = r["chain"], r["indep"]
                except Exception as e:  # noqa: BLE001
                    err_note(f"timing {vname} {name} M={m}", e)
            row["floor"] = qb / copy_bw if copy_bw == copy_bw else float("nan")
            row["floor_f16"] = wf.nbytes / copy_bw if copy_bw == copy_bw else float("nan")
            RES["kernel"].append(row)
            us = lambda v: f"{row[v] * 1e6:8.1f}" if v in row else "     n/a"  # noqa: E731
            log(
                f"{name:9} {n:>6}x{k:<6} M={m:<3} S={row['S']:<2} ours chain {us('ours_chain')} indep {us('ours_indep')} | "
                f"mlx {us('mlx_chain')} {us('mlx_indep')} | f16 {us('f16_chain')} {us('f16_indep')} | "
                f"empty {us('empty')} | floor q4 {us('floor')} f16 {us('floor_f16')}"
            )
        del qsets, fsets, w, s, b
        save()


# --------------------------------------------------------------------------- decode step
class _Layer(nn.Module):
    pass


def _qlinear(n: int, k: int, gs: int, bias: bool, dtype) -> nn.QuantizedLinear:
    ql = nn.QuantizedLinear.__new__(nn.QuantizedLinear)
    nn.Module.__init__(ql)
    ql.group_size, ql.bits, ql.mode = gs, 4, "affine"
    wf = (mx.random.normal((n, k)) * 0.02).astype(dtype)
    ql.weight, ql.scales, ql.biases = mx.quantize(wf, group_size=gs, bits=4)
    if bias:
        ql.bias = (mx.random.normal((n,)) * 0.02).astype(dtype)
    mx.eval(ql.parameters())
    ql.freeze()
    return ql


def build_7b(gs: int, dtype=mx.float16) -> nn.Module:
    hid, inter, nl, vocab, kv = 3584, 18944, 28, 152064, 512
    if SMALL:
        hid, inter, nl, vocab, kv = 512, 2048, 2, vocab // 8, 64  # the kernel's K % 128 == 0
    model = nn.Module()
    layers = []
    for _ in range(nl):
        L = _Layer()
        L.q_proj = _qlinear(hid, hid, gs, True, dtype)
        L.k_proj = _qlinear(kv, hid, gs, True, dtype)
        L.v_proj = _qlinear(kv, hid, gs, True, dtype)
        L.o_proj = _qlinear(hid, hid, gs, False, dtype)
        L.gate_proj = _qlinear(inter, hid, gs, False, dtype)
        L.up_proj = _qlinear(inter, hid, gs, False, dtype)
        L.down_proj = _qlinear(hid, inter, gs, False, dtype)
        layers.append(L)
    model.layers = layers
    model.lm_head = _qlinear(vocab, hid, gs, False, dtype)
    model.norm_w = mx.ones((hid,), dtype)
    mx.eval(model.parameters())
    return model


def L0_heads(model: nn.Module, d: int) -> int:
    return model.layers[0].q_proj["weight"].shape[0] // d


def _forward(model: nn.Module, h: mx.array, fused) -> mx.array:
    w = model.norm_w
    if fused == "epilogues":  # what batchbench's llama model runs: norms, RoPE + K/V write,
        # gate product and residuals fused (rows paired as fuse_quantized_projections does on CUDA)
        norm = nn.RMSNorm(w.shape[0], eps=1e-6)
        norm.weight = w
        b = h.shape[0]
        x_n, x_norm = h, norm  # the next matmul's input and the norm it still applies
        h_in, outs = h, []
        for L in model.layers:
            if INDEP:  # each layer starts from the step's input: nothing orders the layers
                h, x_n, x_norm = h_in, h_in, norm
            rs = qmm.RopeStore(model.pos[:b], model.cells[:b], L.kc, L.vc, **model.rope)
            q = qmm.project_rope_store(L.qkv_p, x_n[None], x_norm, rs)
            # Attention excluded. batchbench's attention kernel writes token-major [1, T, Hq, D],
            # which o_proj reads as [T, Hq * D] without a copy; q's memory read that way stands in
            # for it (scrambled values, as good as any for timing). Until session 19 this was a
            # transpose copy the real step does not run (1.6-2.0 us a layer at B = 2-8).
            a = q.reshape(b, -1)
            # as TransformerBlock: after a split K the reduce kernels of o_proj and down_proj also
            # write the RMSNorm the next matmul needs (qmm.linear_norm)
            h, x_n, x_norm = qmm.linear_norm(L.o_proj, a, residual=h, norm=norm)
            act = L.gate_up_p.glu(x_n, norm=x_norm)
            h, x_n, x_norm = qmm.linear_norm(L.down_proj, act, residual=h, norm=norm)
            outs.append(h)
        if INDEP:
            h = mx.sum(mx.stack(outs), axis=0)
            x_n, x_norm = h, norm
        # as Model.head (until session 20: a separate rms_norm launch before lm_head at every B)
        logits = qmm.linear(model.lm_head, x_n, norm=x_norm)
        return mx.fast.rms_norm(h + 1e-3 * logits[..., :1], w, 1e-6)
    for L in model.layers:
        x = mx.fast.rms_norm(h, w, 1e-6)
        if fused:
            q, k, v = L.qkv(x)
        else:
            q, k, v = L.q_proj(x), L.k_proj(x), L.v_proj(x)
        a = q + (k[..., :1] + v[..., :1])  # attention excluded; k and v stay live
        h = h + L.o_proj(a)
        x = mx.fast.rms_norm(h, w, 1e-6)
        if fused:
            g, u = L.gate_up(x)
        else:
            g, u = L.gate_proj(x), L.up_proj(x)
        h = h + L.down_proj(nn.silu(g) * u)
    logits = model.lm_head(mx.fast.rms_norm(h, w, 1e-6))
    return mx.fast.rms_norm(h + 1e-3 * logits[..., :1], w, 1e-6)


def _decode_time(model: nn.Module, bsz: int, fused: bool) -> tuple[float, float]:
    """Seconds per step: (the chain of 8 steps evaluated as one graph, each step evaluated
    asynchronously)."""
    step = mx.compile(lambda h: _forward(model, h, fused))
    h0 = mx.random.normal((bsz, model.norm_w.shape[0])).astype(mx.float16)
    mx.eval(h0)

    def chain():
        h = h0
        for _ in range(8):
            h = step(h)
        mx.eval(h)

    def chain_async():  # as a decode loop runs: step i+1 is built while the GPU runs step i
        h = h0
        for _ in range(8):
            h = step(h)
            mx.async_eval(h)
        mx.eval(h)

    chain()
    chain()
    wall = statistics.median(timeit(chain, 10)) / 8
    chain_async()
    wall_async = statistics.median(timeit(chain_async, 10)) / 8
    if DECODE_PROFILE:
        _decode_kernels(chain, bsz, wall)
    log(f"    B={bsz}: wall {wall * 1e3:.3f} ms as one graph of 8 steps, {wall_async * 1e3:.3f} ms with each step "
        f"evaluated asynchronously")
    return wall, wall_async


# QMM_DECODE_INDEP=1: the "epilogues" step with its layers independent (each starts from the
# step's input; their outputs are summed at the end). The same kernels, but MLX's graph may run
# several layers at once: the GPU span then shows what overlapping one matmul's ramp and tail
# with the next one's (a persistent layer, perf-notes step 4) could gain at most.
INDEP = os.environ.get("QMM_DECODE_INDEP") == "1"
# QMM_DECODE_PROFILE=1: also the CUPTI kernel time of a step (the rest of its wall time is
# launch gaps and host time) and the kernels that take it, by name.
DECODE_PROFILE = os.environ.get("QMM_DECODE_PROFILE") == "1"


def _decode_kernels(chain, bsz: int, wall: float) -> None:
    try:
        import torch  # noqa: F401
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            chain()
            mx.synchronize()
        path = os.path.join(OUT or "/tmp", f"decode_trace_B{bsz}.json")
        ks = sorted((e for e in trace_events(prof, path) if e.get("cat") == "kernel"), key=lambda e: e["ts"])
        tot = sum(e["dur"] for e in ks) / 8
        span = (ks[-1]["ts"] + ks[-1]["dur"] - ks[0]["ts"]) / 8 if ks else 0.0
        by: dict = {}
        for e in ks:
            key = e["name"][:110]  # long enough to tell launch geometries apart
            n, d = by.get(key, (0, 0.0))
            by[key] = (n + 1, d + e["dur"])
        log(f"    B={bsz}: kernels {len(ks) / 8:.0f} per step, kernel time {tot / 1e3:.3f} ms, GPU span "
            f"{span / 1e3:.3f} ms, wall {wall * 1e3:.3f} ms")
        for key, (n, d) in sorted(by.items(), key=lambda kv: -kv[1][1])[:TOP_KERNELS]:
            log(f"      {d / 8 / 1e3:7.3f} ms  {n / 8:5.1f}x  {d / n:7.1f} us  {key}")
    except Exception as e:  # noqa: BLE001
        err_note(f"decode profile B={bsz}", e)


def check_patch(gs: int) -> None:
    """Each QMM_PATCH config against mx.dequantize + float32 (plain product, fp16)."""
    from batchbench.kernels import spec as kspec

    for (n, k), (lo, hi), ch in PATCH:
        for m in sorted({lo, hi}):
            try:
                cfg = qmm.choose_config(m, n, k, 4)
                w = make_weights(n, k, seed=n + k + m)
                wq, sc, bi = mx.quantize(w, group_size=gs, bits=4)
                x = mx.random.normal((m, k)).astype(mx.float16)
                ref = x.astype(mx.float32) @ mx.dequantize(wq, sc, bi, group_size=gs, bits=4).astype(mx.float32).T
                ks, launch = qmm.plan_quantized_matmul("cuda", x, wq, sc, bi, group_size=gs, bits=4, config=cfg)
                (y,) = kspec.run(ks, launch)
                if cfg.s > 1:
                    rs, rl = qmm.plan_qmm_reduce(y, x.dtype)
                    (y,) = kspec.run(rs, rl)
                err = relerr(y, ref)
                log(f"  patch {n}x{k} M={m}: {cfg} grid {cfg.grid_blocks(n)}: rel err {err:.2e} "
                    f"{'ok' if err < 5e-3 else 'WRONG'}")
                RES["correctness"].append(dict(patch=str(cfg), N=n, K=k, M=m, dtype="float16", err=err, ok=err < 5e-3))
            except Exception as e:  # noqa: BLE001
                err_note(f"patch check {n}x{k} M={m}", e)


def section_decode(gs: int) -> None:
    log(f"\n== decode step, Qwen2.5-7B shape, 4-bit g{gs}, attention excluded; ms per step (median of 10, chain of 8) ==")
    if PATCH:
        check_patch(gs)
    if left() < 50:
        log(f"  (skipped: {left():.0f} s left)")
        return
    try:
        t = time.perf_counter()
        model = build_7b(gs)
        wbytes = sum(v.nbytes for _, v in __import__("mlx.utils").utils.tree_flatten(model.parameters()))
        log(f"built in {time.perf_counter() - t:.1f} s, {wbytes / 1e9:.2f} GB of weights")
    except Exception as e:  # noqa: BLE001
        err_note("build 7B", e)
        return
    # QMM_DECODE_B=1,2,4,8: other batch sizes (A/B runs; issue 7 sets targets at 1, 8 and 32)
    targets = {int(b): {1: 1.6, 8: 2.0, 32: 3.0}.get(int(b)) for b in os.environ.get("QMM_DECODE_B", "1,8,32").split(",")}
    rows = {b: dict(gs=gs, B=b, target_ms=targets[b], weight_gb=wbytes / 1e9) for b in targets}
    for variant in ("mlx", "ours", "ours_fused", "ours_epilogues"):
        if left() < 15:
            log(f"  (skipping {variant}: {left():.0f} s left)")
            break
        try:
            if variant == "ours":
                log(f"use_fast_quantized_linears swapped {qmm.use_fast_quantized_linears(model)} layers")
            if variant == "ours_fused":
                d = 128 if not SMALL else 16
                model.rope = dict(n_heads=L0_heads(model, d), n_kv_heads=model.layers[0].k_proj["weight"].shape[0] // d,
                                  head_dim=d, base=1e6, scale=1.0, traditional=False)
                model.pos = mx.arange(64, dtype=mx.int32) + 4096
                model.cells = mx.arange(64, dtype=mx.int32)
                for L in model.layers:
                    qkv, gu = [L.q_proj, L.k_proj, L.v_proj], [L.gate_proj, L.up_proj]
                    L.qkv = qmm.FusedQuantizedLinear(qkv)
                    L.gate_up = qmm.FusedQuantizedLinear(gu)
                    L.qkv_p = qmm.FusedQuantizedLinear(qkv, rope=model.rope)  # for "ours_epilogues"
                    L.gate_up_p = qmm.FusedQuantizedLinear(gu, glu_pair=True)
                    L.kc = mx.zeros((1, model.rope["n_kv_heads"], 64, d), mx.float16)
                    L.vc = mx.zeros_like(L.kc)
                    del L.q_proj, L.k_proj, L.v_proj, L.gate_proj, L.up_proj  # keep memory flat
        except Exception as e:  # noqa: BLE001
            err_note(f"prepare decode {variant}", e)
            break
        for b in targets if variant in DECODE else ():
            try:
                wall, wall_async = _decode_time(model, b, "epilogues" if variant == "ours_epilogues"
                                                else variant == "ours_fused")
                ms = wall * 1e3
                rows[b][variant + "_ms"] = ms
                rows[b][variant + "_async_ms"] = wall_async * 1e3
                log(f"  {variant:10} B={b:<3} {ms:7.3f} ms  ({b / ms * 1e3:8.1f} t/s)  target {targets[b] or '-'} ms")
            except Exception as e:  # noqa: BLE001
                err_note(f"decode {variant} B={b}", e)
            save()
    RES["decode"].extend(rows.values())
    del model


# --------------------------------------------------------------------------- profiler
def section_profile(weights: dict) -> None:
    log("\n== kernel time from torch.profiler (CUPTI), us per call (sum of kernel durations / calls) ==")
    if left() < 20:
        log(f"  (skipped: {left():.0f} s left)")
        return
    try:
        import torch
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.init()
        torch.zeros(1, device="cuda")
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001
        log(f"  torch unavailable ({type(e).__name__}: {e}); skipped")
        return
    gs, bits = 32, 4
    path = os.path.join(OUT or "/tmp", "qmm_trace.json")
    for name, n, k in SHAPES + FUSED_SHAPES:
        if left() < 8:
            log(f"  (out of time at {name})")
            break
        wf = weights[name]
        w, s, b = mx.quantize(wf, group_size=gs, bits=bits)
        qsets = _copies([w, s, b], qbytes(n, k, bits, gs))
        fsets = _copies([wf], wf.nbytes)
        for m in M_TIME:
            x = mx.random.normal((m, k)).astype(mx.float16)
            mx.eval(x)
            row = dict(matrix=name, N=n, K=k, M=m)
            for vname, fn, sets in _variants(gs, bits, qsets, fsets):
                try:
                    L = len(sets)
                    mx.eval([fn(x, *sets[i]) for i in range(min(L, 4))])  # compile / warm
                    with profile(activities=[ProfilerActivity.CUDA]) as prof:
                        # one eval per call: independent calls in one eval may run as parallel
                        # CUDA-graph nodes whose kernels overlap and read long (the suspected cause
                        # of k/v M=32 reading 68-1986 us in the ninth session)
                        for i in range(L):
                            mx.eval(fn(x, *sets[i]))
                        mx.synchronize()
                    ks = [e for e in trace_events(prof, path) if e.get("cat") == "kernel"]
                    if not ks:
                        row[vname] = None
                        continue
                    tot = sum(e["dur"] for e in ks) * 1e-6
                    row[vname] = tot / L
                    row[vname + "_kernels"] = sorted({e["name"][:80] for e in ks})[:4]
                except Exception as e:  # noqa: BLE001
                    err_note(f"profile {vname} {name} M={m}", e)
            qb = qbytes(n, k, bits, gs)
            bw = qb / row["ours"] / 1e12 if row.get("ours") else float("nan")
            row["ours_TBps"], row["bytes_q"] = bw, qb
            RES["profile"].append(row)
            f = lambda v: f"{row[v] * 1e6:8.1f}" if row.get(v) else "     n/a"  # noqa: E731
            log(f"{name:9} {n:>6}x{k:<6} M={m:<3} ours {f('ours')} ({bw:5.2f} TB/s on weights) | mlx {f('mlx')} | f16 {f('f16')}")
        del qsets, fsets
        save()


# --------------------------------------------------------------------------- summary
def summary(copy_bw: float) -> None:
    lines = ["", "# qmm on the H200 (batchbench issue 7)", ""]
    lines.append(f"copy bandwidth {copy_bw / 1e12:.3f} TB/s; floor = 4-bit g32 weight bytes / copy bandwidth")
    prof = {(r["matrix"], r["M"]): r for r in RES["profile"]}
    walls = {(r["matrix"], r["M"]): r for r in RES["kernel"]}
    lines += ["", "| matrix | N x K | M | ours us (kernel / chain / indep) | % copy BW | mlx us (kernel / chain) | f16 us (kernel / chain) | floor us |", "|---|---|---|---|---|---|---|---|"]
    # every shape either section timed: the wall section may stop early on its budget (its
    # independent calls are slow at M=32) while the CUPTI section goes on
    keys = list(walls) + [key for key in prof if key not in walls]
    for key in keys:
        p = prof.get(key, {})
        r = walls.get(key) or dict(matrix=p["matrix"], N=p["N"], K=p["K"], M=p["M"],
                                   floor=p["bytes_q"] / copy_bw if copy_bw == copy_bw else float("nan"))
        g = lambda d, k: f"{d[k] * 1e6:.1f}" if d.get(k) else "-"  # noqa: E731
        kern = p.get("ours") or r.get("ours_indep")
        pct = f"{100 * r['floor'] / kern:.0f}%" if kern and r.get("floor") == r.get("floor") else "-"
        lines.append(
            f"| {r['matrix']} | {r['N']}x{r['K']} | {r['M']} | {g(p, 'ours')} / {g(r, 'ours_chain')} / {g(r, 'ours_indep')} | {pct} | "
            f"{g(p, 'mlx')} / {g(r, 'mlx_chain')} | {g(p, 'f16')} / {g(r, 'f16_chain')} | {g(r, 'floor')} |"
        )
    lines += ["", "| group | B | MLX ms | ours ms | ours fused ms | ours + norm/glu/residual ms (one graph / async steps) | target ms |", "|---|---|---|---|---|---|---|"]
    for r in RES["decode"]:
        g = lambda k: f"{r[k]:.3f}" if r.get(k) else "-"  # noqa: E731
        lines.append(f"| {r['gs']} | {r['B']} | {g('mlx_ms')} | {g('ours_ms')} | {g('ours_fused_ms')} | {g('ours_epilogues_ms')} / {g('ours_epilogues_async_ms')} | {r['target_ms'] or '-'} |")
    bad = [r for r in RES["correctness"] if not r.get("ok")]
    lines += ["", f"correctness: {len(RES['correctness']) - len(bad)}/{len(RES['correctness'])} cases ok; "
              f"max rel err fp16 {max([r['err'] for r in RES['correctness'] if r.get('dtype') == 'float16' and r.get('err') is not None] or [float('nan')]):.2e}, "
              f"bf16 {max([r['err'] for r in RES['correctness'] if r.get('dtype') == 'bfloat16' and r.get('err') is not None] or [float('nan')]):.2e}",
              f"errors: {len(RES['errors'])}; total time {elapsed():.0f} s"]
    for l in lines:
        log(l)
    if OUT:
        with open(os.path.join(OUT, "results.md"), "w") as f:
            f.write("\n".join(lines) + "\n")


def main() -> None:
    copy_bw = section_env()
    weights = {}
    try:
        for i, (name, n, k) in enumerate(SHAPES + FUSED_SHAPES):
            weights[name] = make_weights(n, k, seed=10 + i)
    except Exception as e:  # noqa: BLE001
        err_note("weights", e)
        save()
        sys.exit(1)
    wanted = os.environ.get("QMM_SECTIONS", "correctness,kernels,decode,profile").split(",")
    for name, sec in (
        ("correctness", lambda: section_correctness(weights)),
        ("kernels", lambda: section_kernels(weights, copy_bw)),
    ):
        if name not in wanted:
            continue
        try:
            sec()
        except Exception as e:  # noqa: BLE001
            err_note("section", e)
        save()
    try:
        if "decode" in wanted:
            section_decode(32)
    except Exception as e:  # noqa: BLE001
        err_note("decode section", e)
    save()
    try:
        if "profile" in wanted:
            section_profile(weights)
    except Exception as e:  # noqa: BLE001
        err_note("profile section", e)
    summary(copy_bw)
    save()


if __name__ == "__main__":
    main()
