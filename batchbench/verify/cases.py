"""The project's kernels on small inputs, with float64 NumPy expectations.

Shared by tests/test_verify_kernels.py and `python -m batchbench.verify`. Each case knows its
kernel launches (for compile checks) and how to emulate them and judge the result.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from typing import Callable

import mlx.core as mx
import numpy as np

from batchbench.kernels import attention as A
from batchbench.kernels import qmm as Q
from batchbench.kernels.attention_cases import additive, live_lists, make_layout, reference
from batchbench.kernels.spec import KernelSpec, Launch
from batchbench.verify.emulate import emulate

ATTN_TOL = {mx.float16: 3e-3, mx.bfloat16: 2.5e-2}
QMM_RTOL = {mx.float16: 2e-3, mx.bfloat16: 1.6e-2}


# Runs one launch: (spec, launch) -> (outputs, inputs after the run), numpy (bf16 as float32).
Executor = Callable[[KernelSpec, Launch], tuple[list[np.ndarray], list[np.ndarray]]]


def emulator(**emulate_kw) -> Executor:
    def execute(spec: KernelSpec, launch: Launch):
        res = emulate(spec, launch, **emulate_kw)
        return res.outputs, res.inputs_after

    return execute


@dataclass
class Case:
    name: str
    kernels: list[tuple[KernelSpec, Launch]]  # what MLX would compile (for compile checks)
    run: Callable[[Executor], np.ndarray]  # run the launches, return the float64 result
    expected: np.ndarray
    atol: float
    checks: list[Callable[[np.ndarray], str | None]] = field(default_factory=list)

    def verify(self, execute: Executor | None = None, **emulate_kw) -> tuple[float, np.ndarray]:
        """Run (default: emulate) and compare; raises AssertionError with the reason.
        Returns (max error, result)."""
        got = self.run(execute or emulator(**emulate_kw))
        if not np.isfinite(got).all():
            raise AssertionError(f"{self.name}: non-finite output ({np.count_nonzero(~np.isfinite(got))} values)")
        err = float(np.abs(got - self.expected).max()) if got.size else 0.0
        if err > self.atol:
            raise AssertionError(f"{self.name}: max error {err:.3g} > {self.atol:.3g}")
        for c in self.checks:
            msg = c(got)
            if msg:
                raise AssertionError(f"{self.name}: {msg}")
        return err, got


def _f64(x: mx.array) -> np.ndarray:
    return np.array(x.astype(mx.float32)).astype(np.float64)


def attention_case(
    backend: str,
    rng: np.random.Generator,
    *,
    dtype=mx.float16,
    d: int = 64,
    g: int = 4,
    hkv: int = 2,
    layout: dict | None = None,
    mask_kind: str = "add",
    skip: bool = True,
    live: str | None = None,
    visible: np.ndarray | None = None,
    splits: int | None = None,
    timeline: bool = False,
) -> Case:
    """Decode attention over a unified-cache layout (attention_cases.make_layout).

    K/V hold junk (+-1e4) past the N mask columns; live: None, "exact" or "superset"
    (owned blocks of the row's sequence, as the cache bookkeeping gives them). splits: plan
    for a GPU small enough to give that many KV splits (few splits: each warp walks many
    blocks through its pipeline; one split writes the output without the merge). timeline:
    the diagnostic build that also writes phase stamps (CUDA)."""
    layout = dict(kind="contiguous", n_seq=3, max_prompt=70) if layout is None else layout
    if visible is None:
        lay = make_layout(rng, **layout)
        vis, owned = lay.visible, lay.owned
        lname = lay.name
    else:
        vis, owned, lname = visible, visible, "custom"
    t, n = vis.shape
    s = n + 7
    qn = rng.standard_normal((1, hkv * g, t, d)).astype(np.float32)
    kn = rng.standard_normal((1, hkv, s, d)).astype(np.float32)
    vn = rng.standard_normal((1, hkv, s, d)).astype(np.float32)
    kn[:, :, n:] = 1e4
    vn[:, :, n:] = -1e4
    q, k, v = (mx.array(x).astype(dtype) for x in (qn, kn, vn))
    mask = mx.array(vis) if mask_kind == "bool" else mx.array(additive(vis)).astype(dtype)
    scale = 1.0 / math.sqrt(d)
    live_blocks = None
    if live == "exact":
        live_blocks = tuple(mx.array(x) for x in live_lists(vis))
    elif live == "superset":
        live_blocks = tuple(mx.array(x) for x in live_lists(owned, pad_to=n // 32 + 2))
    sms = None if splits is None else t * hkv * -(-g // A.HEADS_PER_TILE) * splits
    saved = os.environ.get("BB_ATTN_SMS")
    # The cases' windows are short; the production floor of blocks per split would leave
    # most of them one split and the merge untested.
    saved_min, A.MIN_BLOCKS = A.MIN_BLOCKS, 1
    try:
        if sms is not None:
            os.environ["BB_ATTN_SMS"] = str(sms)
        kspec, launch = A.plan_decode_attention(
            backend, q, k, v, mask, scale=scale, skip=skip, live_blocks=live_blocks, timeline=timeline
        )
    finally:
        A.MIN_BLOCKS = saved_min
        if sms is not None:
            if saved is None:
                os.environ.pop("BB_ATTN_SMS", None)
            else:
                os.environ["BB_ATTN_SMS"] = saved
    want = reference(_f64(q), _f64(k), _f64(v), vis, scale)
    dead = ~vis.any(axis=1)
    counters_at = list(kspec.input_names).index("counters")

    state: dict = {}

    def run(execute: Executor) -> np.ndarray:
        outs, ins_after = execute(kspec, launch)
        state["counters"] = ins_after[counters_at]
        return outs[0].transpose(0, 2, 1, 3).astype(np.float64)  # kernel writes [1, T, Hq, D]

    def dead_rows_zero(got):
        if dead.any() and np.abs(got[:, :, dead]).any():
            return "a fully masked row is not zero"
        return None

    def counters_reset(_):
        c = state.get("counters")
        if c is not None and np.any(c & 0xFFFF):  # the count; the bits above count launches
            return f"split counts not left at zero ({np.count_nonzero(c & 0xFFFF)} nonzero)"
        return None

    name = (
        f"attn-{backend}-{'bf16' if dtype == mx.bfloat16 else 'fp16'}-D{d}-G{g}-{mask_kind}"
        f"-{'skip' if skip else 'noskip'}{'-live-' + live if live else ''}-{lname}-T{t}N{n}"
        f"-splits{launch.grid[1]}"
    )
    return Case(name, [(kspec, launch)], run, want, ATTN_TOL[dtype], [dead_rows_zero, counters_reset])


def attention_cases(backend: str, rng: np.random.Generator, quick: bool = False) -> list[Case]:
    """A matrix over dtype, head dim, GQA factor, mask kind, skip and live lists."""
    specs = [
        dict(dtype=mx.float16, d=128, g=7, layout=dict(kind="contiguous", n_seq=3, empty_row=True)),
        dict(dtype=mx.bfloat16, d=64, g=4, layout=dict(kind="interleaved", n_seq=3, tokens_per_seq=2)),
        dict(dtype=mx.float16, d=64, g=8, mask_kind="bool", skip=False,
             layout=dict(kind="shared", n_seq=3, empty_row=True)),
        dict(dtype=mx.float16, d=64, g=1, live="exact",
             layout=dict(kind="contiguous", n_seq=2, n_swa=24, tokens_per_seq=2)),
        dict(dtype=mx.bfloat16, d=128, g=4, live="superset", mask_kind="bool",
             layout=dict(kind="contiguous", n_seq=4, max_prompt=40, empty_row=True)),
    ]
    # Many splits, two items per thread (G=7, D=128) in the last split's merge.
    many = dict(dtype=mx.float16, d=128, g=7, splits=19, live="exact",
                layout=dict(kind="contiguous", n_seq=2, max_prompt=200, max_tg=40, tail=333))
    if quick:
        specs = specs[:2] + [many]
    else:
        specs.append(many)
        # Few splits: long walks through the per-warp pipeline; one split writes the output.
        specs.append(dict(dtype=mx.float16, d=64, g=4, splits=1,
                          layout=dict(kind="contiguous", n_seq=2, max_prompt=200, max_tg=40)))
        specs.append(dict(dtype=mx.bfloat16, d=64, g=7, splits=2, live="exact",
                          layout=dict(kind="interleaved", n_seq=2, max_prompt=200, max_tg=40)))
    cases = [attention_case(backend, rng, **s) for s in specs]
    # One visible cell, in a partial last block, for one row; the other row sees nothing.
    n = 70
    vis = np.zeros((2, n), dtype=bool)
    vis[0, n - 1] = True
    cases.append(attention_case(backend, rng, d=64, g=4, visible=vis))
    # More splits than the last split stages in shared memory at once (CUDA, 16 heads of 64: 26
    # records a round in fp16; Metal: 1), each with live blocks: the merge takes two rounds.
    vis = np.zeros((2, 5000), dtype=bool)
    vis[0, :2500] = vis[1, 2500:] = True
    cases.append(attention_case(backend, rng, d=64, g=16, hkv=1, splits=30, live="exact", visible=vis))
    # One split, ~150 live blocks per row: ~40 per warp, read from the live list 32 entries a
    # round, each round's loaded during the one before.
    vis = np.zeros((2, 5000), dtype=bool)
    vis[0, :5000] = vis[1, 100:4900] = True
    cases.append(attention_case(backend, rng, d=64, g=4, hkv=1, splits=1, live="exact", visible=vis))
    return cases


def folded_norm(outs: list[mx.array], k: int, eps: float = 1e-5):
    """The reduce kernel's norm argument after a split K: the sums of squares the main kernel
    wrote as its second output (a norm folded over the K-slices), else None."""
    return (outs[1], k, eps) if len(outs) > 1 else None


def producer_share(y: mx.array, weight: mx.array, eps: float) -> tuple[mx.array, Q.PendingNorm]:
    """What a producer's NOUT epilogue hands on for y [..., M, K] (BB_QMM_NORM_PRE): y * weight
    rounded to y's dtype, and the sums of squares of y's 16-column tiles [K / 16, M] fp32."""
    yf = y.astype(mx.float32)
    ss = (yf**2).reshape(-1, y.shape[-1] // 16, 16).sum(axis=-1).T
    return (yf * weight.astype(mx.float32)).astype(y.dtype), Q.PendingNorm(ss, eps)


def qmm_case(
    rng: np.random.Generator,
    *,
    m: int,
    n: int = 64,
    k: int = 256,
    bits: int = 4,
    group_size: int = 64,
    dtype=mx.float16,
    split: int | None = None,
    bias: bool = False,
    res: bool = False,
    glu: bool = False,
    norm: bool = False,
    blocks: int = 0,
    lop3: bool = True,
    glu_pair: bool = False,
    ns: int = 0,
    wf: int = 1,
    wk: int = 0,
    pre: bool | None = None,
    p: int = 0,
    norm_out: bool = False,
    norm_next: bool = False,
    prenorm: bool = False,
    wn: int = 0,
    bias_sums: bool = False,
    packed: bool = False,
    sub: bool = False,
    wscale: float = 1.0,
    wpack: bool = False,
    ppack: bool = False,
) -> Case:
    """y = x @ dequantize(w).T (+ bias) (+ res) through the CUDA kernel (and its reduce kernel
    when K is split over blocks); glu: x is [gate | up] and the product uses silu(gate) * up.
    glu_pair: w is [gate; up] (n/2 rows each) with its rows in glu_pair_order, and the
    result is silu(x @ gate.T) * (x @ up.T) [m, n/2]. ns: ring slots per warp (the cp.async
    pipeline; 0 keeps the register stages); wf: 16-row feature tiles per warp (2 needs ns);
    wk: warps along K (0: choose_config's), fewer for longer runs of chunks per warp (wn: along
    N); pre: both register stages loaded ahead (None: choose_config's); p: chunks per register
    stage (0: choose_config's); norm_out: the reduce kernel after a split K also writes the RMSNorm of y
    (the result is then [y | rms_norm(y) * r], r the reference's row RMS, so both halves share
    one tolerance). One K-slice: norm_next, the kernel also writes y * nw2 and each 16- or
    32-row tile's sums of squares of y (the result is then [y | y * nw2 | each tile's RMS of y]);
    prenorm (with norm), x reaches the kernel as round(x * nw) with its 16-column sums of squares
    (a PendingNorm), as a producer's norm_next wrote them. bias_sums: the lop3 dequantization
    without the bias (DQ = 2, one token), the bias entering through x's 32-k sums. packed: the
    kernel reads the scales and biases as (scale, bias) pairs (`pack_scales_biases`, SBP). sub: the
    subnormal dequantization (DQ = 3, scale_max passed); wscale: the weights' standard deviation
    (0.02 puts most dequantized weights where sub's results are fp16 subnormals). wpack: the
    kernel reads the weights repacked in its load order (`pack_weights`, WP); ppack (with packed
    and wpack): the pairs too (`pack_pairs`, WP = 2)."""
    w = mx.array(rng.standard_normal((n, k)).astype(np.float32) * wscale).astype(dtype)
    wq, sc, bi = mx.quantize(w, group_size=group_size, bits=bits)
    wd = _f64(mx.dequantize(wq, sc, bi, group_size=group_size, bits=bits))
    lb = mx.array(rng.standard_normal((n,)).astype(np.float32)).astype(dtype) if bias else None
    lb64 = _f64(lb) if bias else 0.0
    if glu_pair:  # the kernel gets the rows paired, the reference keeps them in order
        order = mx.array(Q.glu_pair_order(n // 2), dtype=mx.int32)
        wq, sc, bi = (mx.take(a, order, axis=0) for a in (wq, sc, bi))
        lb = mx.take(lb, order, axis=0) if bias else None
    x = mx.array(rng.standard_normal((m, 2 * k if glu else k)).astype(np.float32)).astype(dtype)
    rs = mx.array(rng.standard_normal((m, n)).astype(np.float32) * 4).astype(dtype) if res else None
    nw = mx.array(rng.uniform(0.5, 1.5, (k,)).astype(np.float32)).astype(dtype) if norm else None
    cfg = None
    if split or blocks or ns or wk or p or wn or pre is not None:
        base = Q.choose_config(m, n, k, bits)
        cfg = replace(base, s=split or base.s, blocks=blocks, ns=ns, wf=wf, wk=wk or base.wk, p=p or base.p,
                      wn=wn or base.wn,
                      pre=base.pre if pre is None else pre)
    if prenorm and not norm:
        raise ValueError("qmm_case: prenorm is the norm split with its producer (norm=True)")
    nw2 = mx.array(rng.uniform(0.5, 1.5, (n,)).astype(np.float32)).astype(dtype) if norm_next else None
    x_in, pending = producer_share(x, nw, 1e-5) if prenorm else (x, None)
    kspec, launch = Q.plan_quantized_matmul(
        "cuda", x_in, wq, sc, bi, group_size=group_size, bits=bits, bias=lb, residual=rs, glu=glu,
        norm=(nw, 1e-5) if norm and not prenorm else None, config=cfg,
        lop3=None if lop3 else False,  # False: the byte-permute dequantization
        glu_pair=glu_pair, norm_next=(nw2, 1e-5) if norm_next else None, prenorm=pending,
        bias_sums=bias_sums or None,
        packed=(Q.pack_pairs(Q.pack_scales_biases(sc, bi), bits, group_size) if ppack else Q.pack_scales_biases(sc, bi))
        if packed else None, ppack=ppack,
        scale_max=float(mx.max(mx.abs(sc)).item()) if sub else None, sub=sub,
        wpack=Q.pack_weights(wq, bits) if wpack else None,
    )
    xf = _f64(x)
    if glu:
        g, u = xf[:, :k], xf[:, k:]
        xf = g / (1.0 + np.exp(-g)) * u
    if norm:
        xf = xf / np.sqrt((xf**2).mean(axis=1, keepdims=True) + 1e-5) * _f64(nw)
    want = xf @ wd.T + lb64 + (_f64(rs) if res else 0.0)
    scale = max(1.0, float(np.abs(want).max()))
    if glu_pair:
        g, u = want[:, : n // 2], want[:, n // 2 :]
        sg = 1.0 / (1.0 + np.exp(-g))
        want = g * sg * u
        # g and u carry the matmul's error (relative to the largest of them) into the
        # product, each scaled by the product's sensitivity to it: d/dg = silu'(g) u, d/du = silu(g)
        sens = np.abs(sg * (1.0 + g * (1.0 - sg)) * u) + np.abs(g * sg)
        scale = max(scale * max(1.0, float(sens.max())), float(np.abs(want).max()))
    is_split = bool(dict(launch.template)["SPLIT"])
    if norm_out and not is_split:
        raise ValueError("qmm_case: norm_out needs a split K (the reduce kernel writes it)")
    nwo = mx.array(rng.uniform(0.5, 1.0, (n,)).astype(np.float32)).astype(dtype) if norm_out else None
    out_norm = (nwo, 1e-5) if norm_out else None
    row_rms = np.sqrt((want**2).mean(axis=1, keepdims=True) + 1e-5)
    if norm_out:
        want = np.concatenate([want, want * _f64(nwo)], axis=1)
    used = cfg or Q.choose_config(m, n, k, bits)
    bn = 16 * used.wn * used.wf
    if norm_next:
        if is_split:
            raise ValueError("qmm_case: norm_next needs one K-slice")
        tile_rms = np.sqrt((want**2).reshape(m, n // bn, bn).mean(axis=2))
        want = np.concatenate([want, want * _f64(nw2), tile_rms], axis=1)
    kernels = [(kspec, launch)]
    if is_split:
        zeros = [mx.zeros(shape, dtype=dt) for shape, dt in zip(launch.output_shapes, launch.output_dtypes)]
        kernels.append(Q.plan_qmm_reduce(zeros[0], dtype, lb, rs, glu_pair=glu_pair, norm=folded_norm(zeros, k),
                                         norm_out=out_norm))

    def run(execute: Executor) -> np.ndarray:
        outs = execute(kspec, launch)[0]
        y = outs[0]
        if is_split:
            parts = [mx.array(o) for o in outs]
            rspec, rlaunch = Q.plan_qmm_reduce(parts[0], dtype, lb, rs, glu_pair=glu_pair,
                                               norm=folded_norm(parts, k), norm_out=out_norm)
            routs = execute(rspec, rlaunch)[0]
            y = routs[0]
            if norm_out:
                return np.concatenate([y.astype(np.float64), routs[1].astype(np.float64) * row_rms], axis=1)
        if norm_next:
            tiles = np.sqrt(outs[2].astype(np.float64).T / bn)
            return np.concatenate([y.astype(np.float64), outs[1].astype(np.float64), tiles], axis=1)
        return y.astype(np.float64)

    atol = QMM_RTOL[dtype] * scale
    name = (
        f"qmm-cuda-{'bf16' if dtype == mx.bfloat16 else 'fp16'}-M{m}-N{n}-K{k}-b{bits}-g{group_size}"
        f"{'-split' + str(split) if split else ''}{'-bias' if bias else ''}"
        f"{'-res' if res else ''}{'-glu' if glu else ''}{'-norm' if norm else ''}"
        f"{'-blocks' + str(blocks) if blocks else ''}{'' if lop3 else '-prmt'}{'-glupair' if glu_pair else ''}"
        f"{'-ring' + str(ns) if ns else ''}{'-wf' + str(wf) if wf > 1 else ''}{'-wk' + str(wk) if wk else ''}{'-wn' + str(wn) if wn else ''}"
        f"{'' if pre is None else '-pre' + str(int(pre))}{'-p' + str(p) if p else ''}{'-normout' if norm_out else ''}"
        f"{'-nnext' if norm_next else ''}{'-prenorm' if prenorm else ''}{'-bsum' if bias_sums else ''}"
        f"{'-packed' if packed else ''}{'-sub' if sub else ''}{'-w' + format(wscale, 'g') if wscale != 1.0 else ''}"
        f"{'-wpack' if wpack else ''}{'-pairs' if ppack else ''}"
    )
    return Case(name, kernels, run, want, atol)


def qmm_cases(rng: np.random.Generator, quick: bool = False) -> list[Case]:
    specs = [
        dict(m=1, bits=4),
        dict(m=3, bits=8, dtype=mx.bfloat16),
        dict(m=5, bits=4, dtype=mx.bfloat16, bias=True),
        dict(m=7, bits=8, group_size=32),
        dict(m=3, bits=4, group_size=128, split=2, bias=True),
        dict(m=33, bits=4, n=128),
        dict(m=2, bits=4, group_size=32, res=True, glu=True),
        dict(m=6, bits=4, group_size=32, split=3, res=True, glu=True, dtype=mx.bfloat16),
        dict(m=9, bits=8, res=True, bias=True),
        dict(m=3, bits=4, group_size=32, norm=True, bias=True),
        dict(m=8, bits=4, group_size=32, norm=True, dtype=mx.bfloat16, res=True),
        # persistent blocks walking several feature tiles (uneven share), with the norm
        dict(m=1, bits=4, group_size=32, n=208, k=512, norm=True, blocks=3),
        dict(m=5, bits=8, n=160, k=512, norm=True, res=True, blocks=4, dtype=mx.bfloat16),
        dict(m=2, bits=4, group_size=32, n=96, glu=True, res=True, split=2, blocks=2),
        # fp16 4-bit with the byte-permute dequantization (wide matrices at M=32 take it)
        dict(m=9, bits=4, group_size=32, norm=True, res=True, lop3=False),
        # gate/up with silu(gate) * up as the epilogue (rows paired), in-kernel and after a split K
        dict(m=3, bits=4, group_size=32, n=96, norm=True, glu_pair=True, blocks=2),
        dict(m=10, bits=4, group_size=64, n=64, glu_pair=True, bias=True, split=2, dtype=mx.bfloat16),
        # the cp.async ring: running on across the tiles of a persistent block (uneven share,
        # warps with no chunk when K is short), after a split K, 8-bit, bf16, with epilogues
        dict(m=1, bits=4, group_size=32, n=208, k=512, norm=True, blocks=3, ns=3),
        dict(m=9, bits=8, group_size=32, n=160, k=512, res=True, blocks=4, ns=4, dtype=mx.bfloat16),
        dict(m=33, bits=4, group_size=64, n=128, k=768, split=3, bias=True, ns=2, lop3=False),
        dict(m=3, bits=4, group_size=32, n=96, glu_pair=True, blocks=2, ns=5),
        # two feature tiles per warp on the ring: persistent tiles (uneven), split K + bias
        dict(m=9, bits=4, group_size=32, n=256, k=512, res=True, blocks=3, ns=3, wf=2),
        dict(m=3, bits=8, group_size=32, n=64, k=512, split=2, bias=True, ns=2, wf=2, dtype=mx.bfloat16),
        dict(m=20, bits=4, group_size=64, n=128, k=512, glu_pair=True, ns=4, wf=2, lop3=False),
        # fp16 partials (BB_QMM_PART16) summed by the pair reduce, four pairs a thread and one
        dict(m=24, bits=4, group_size=32, n=128, k=1024, split=3, glu_pair=True, bias=True),
        dict(m=5, bits=4, group_size=32, n=96, k=768, split=3, glu_pair=True),
        # many K-slices summed by the reduce kernels (plain and pair epilogue)
        dict(m=4, bits=4, group_size=32, n=64, k=1024, split=7, res=True),
        dict(m=3, bits=4, group_size=32, n=64, k=768, split=6, glu_pair=True, bias=True, dtype=mx.bfloat16),
        # register stages over several rounds (9 chunks a warp, the last round partial) and on
        # into a persistent block's next tile, with the norm: one stage loaded ahead, and both
        dict(m=3, bits=4, group_size=32, n=64, k=2304, split=1, norm=True, res=True, blocks=2, wk=2, pre=False),
        dict(m=6, bits=8, group_size=32, n=64, k=1152, split=1, res=True, blocks=2, wk=2, pre=True,
             dtype=mx.bfloat16),
        # q/k/v's geometry at one token (choose_config's narrow rule): 4 warps along K, 4 chunks
        # a stage, one block per tile, 7 chunks a warp (the second stage partly empty), the norm
        dict(m=1, bits=4, group_size=32, n=48, k=3584, split=1, norm=True, wk=4, p=4, pre=False),
        # the norm folded over a split K (sums per K-slice, scaled in the reduce kernel): slices of
        # an odd number of chunks (a warp's granules span two rows), with bias, 8-bit with the
        # residual, an empty slice, the gate/up pair on the ring at 32 rows, more than 32 rows
        dict(m=16, bits=4, group_size=32, n=64, k=1280, split=4, norm=True, bias=True),
        dict(m=5, bits=8, group_size=64, n=64, k=768, split=5, norm=True, res=True, dtype=mx.bfloat16),
        dict(m=3, bits=4, group_size=32, n=64, k=256, split=3, norm=True),
        dict(m=32, bits=4, group_size=32, n=128, k=1280, split=2, norm=True, glu_pair=True, ns=4),
        dict(m=40, bits=4, group_size=64, n=64, k=768, split=3, norm=True, bias=True, dtype=mx.bfloat16),
        # the reduce that also writes the next layer's RMSNorm of y (one block a row): a warp of
        # 8 granules, two granules a thread with the second round partial (N = 4352), bf16 + bias
        dict(m=3, bits=4, group_size=32, n=64, k=512, split=2, res=True, norm_out=True),
        dict(m=17, bits=4, group_size=32, n=4352, k=256, split=2, res=True, norm_out=True),
        dict(m=5, bits=8, group_size=64, n=128, k=768, split=3, res=True, bias=True, norm_out=True,
             dtype=mx.bfloat16),
        # the next norm split with its producer on one K-slice (BB_QMM_NORM_PRE): the producer's
        # y * nw2 and tile sums (16-row tiles over persistent blocks, 32-row tiles, bf16 + bias,
        # the gate product), the consumer's row scales (plain, gate/up pair, 8-bit, many tiles)
        dict(m=1, bits=4, group_size=32, n=208, k=512, res=True, blocks=3, norm_next=True),
        dict(m=8, bits=4, group_size=32, n=128, k=256, split=1, res=True, wk=2, norm_next=True),
        dict(m=3, bits=4, group_size=32, n=128, k=512, split=1, res=True, wn=2, wk=2, norm_next=True),
        dict(m=3, bits=4, group_size=64, n=96, k=512, res=True, bias=True, glu=True, norm_next=True,
             dtype=mx.bfloat16),
        dict(m=2, bits=4, group_size=32, n=64, k=1024, split=1, norm=True, prenorm=True, bias=True),
        dict(m=6, bits=4, group_size=32, n=96, k=512, norm=True, prenorm=True, glu_pair=True, blocks=2),
        dict(m=1, bits=8, group_size=32, n=64, k=3584, split=1, norm=True, prenorm=True, dtype=mx.bfloat16),
        # K = 4608: 288 producer tiles, a lane's partials in two rounds of loads
        dict(m=3, bits=4, group_size=32, n=32, k=4608, split=1, norm=True, prenorm=True),
        # seven warps along K (224 threads): the 28 chunks of K = 3584 four a warp, as
        # BB_QMM_WK_DIVIDE=1 gives the gate/up pair and o_proj at M = 1 (the default, narrow: o_proj)
        dict(m=1, bits=4, group_size=32, n=64, k=3584, split=1, wk=7, norm=True, prenorm=True, glu_pair=True,
             blocks=2),
        dict(m=5, bits=4, group_size=32, n=64, k=3584, split=1, wk=7, res=True, norm_next=True, blocks=2),
        # six (192 threads) at K = 1536, as BB_QMM_WK_DIVIDE gives the 1.5B model's o_proj
        dict(m=2, bits=4, group_size=32, n=64, k=1536, split=1, wk=6, norm=True, bias=True, blocks=2),
        # one token, the weights dequantized without their bias (BB_QMM_DQ=lop3b): the bias enters
        # as bias times x's 32-k sums; groups of 32, 64 (over a split K) and 128 (persistent blocks,
        # the next norm's parts), the gate/up pair with a pending norm
        dict(m=1, bits=4, group_size=32, n=64, k=512, bias=True, bias_sums=True),
        dict(m=1, bits=4, group_size=64, n=64, k=1024, split=2, bias_sums=True),
        dict(m=1, bits=4, group_size=128, n=208, k=512, res=True, blocks=3, norm_next=True, bias_sums=True),
        dict(m=1, bits=4, group_size=32, n=96, k=512, norm=True, prenorm=True, glu_pair=True, blocks=2,
             bias_sums=True),
        # scales and biases packed as (scale, bias) pairs (BB_QMM_SB_PACK): lop3 and byte-permute
        # 4-bit, 8-bit bf16 with groups of 128 over a split K (a chunk inside a group), persistent
        # blocks with the next norm's parts, the gate/up pair with a pending norm, the bias sums;
        # the ring with 4 and 8 bytes of pairs a row and chunk, two feature tiles a warp, across
        # persistent tiles and after a split K, the gate/up pair at 32 rows with a folded norm
        dict(m=1, bits=4, group_size=32, n=64, k=512, bias=True, packed=True),
        dict(m=2, bits=4, group_size=64, n=64, k=512, res=True, lop3=False, packed=True),
        dict(m=3, bits=8, group_size=128, n=64, k=1024, split=2, bias=True, dtype=mx.bfloat16, packed=True),
        dict(m=1, bits=4, group_size=32, n=208, k=512, res=True, blocks=3, norm_next=True, packed=True),
        dict(m=1, bits=4, group_size=32, n=96, k=512, norm=True, prenorm=True, glu_pair=True, blocks=2,
             packed=True),
        dict(m=1, bits=4, group_size=32, n=64, k=512, bias=True, bias_sums=True, packed=True),
        dict(m=9, bits=8, group_size=32, n=160, k=512, res=True, blocks=4, ns=4, dtype=mx.bfloat16, packed=True),
        dict(m=9, bits=4, group_size=32, n=256, k=512, res=True, blocks=3, ns=3, wf=2, packed=True),
        dict(m=33, bits=4, group_size=64, n=128, k=768, split=3, bias=True, ns=2, lop3=False, packed=True),
        dict(m=32, bits=4, group_size=32, n=128, k=1280, split=2, norm=True, glu_pair=True, ns=4, packed=True),
        # down_proj's K at one token on three chunks a stage (h200_session's ab-sbpack-p3)
        dict(m=1, bits=4, group_size=32, n=32, k=18944, split=1, res=True, p=3, packed=True),
        # the subnormal dequantization (BB_QMM_DQ=sub), weights of std 0.02 (most dequantized
        # weights fp16 subnormals there) and 1: one token with a bias, the gate/up pair at 8 rows
        # with a pending norm, a split K with its residual, groups of 64 and 128 unpacked, two
        # token tiles, the ring with two feature tiles a warp, 32 rows with a folded norm
        dict(m=1, bits=4, group_size=32, n=64, k=512, bias=True, packed=True, sub=True, wscale=0.02),
        dict(m=8, bits=4, group_size=32, n=96, k=512, norm=True, prenorm=True, glu_pair=True, blocks=2,
             packed=True, sub=True, wscale=0.02),
        dict(m=8, bits=4, group_size=32, n=64, k=1024, split=4, res=True, packed=True, sub=True),
        dict(m=5, bits=4, group_size=64, n=128, k=512, bias=True, sub=True, wscale=0.02),
        dict(m=3, bits=4, group_size=128, n=64, k=1024, res=True, sub=True),
        dict(m=13, bits=4, group_size=32, n=128, k=512, res=True, packed=True, sub=True, wscale=0.02),
        dict(m=20, bits=4, group_size=32, n=256, k=512, res=True, blocks=3, ns=3, wf=2, packed=True, sub=True,
             wscale=0.02),
        dict(m=32, bits=4, group_size=32, n=128, k=1280, split=2, norm=True, glu_pair=True, ns=4, packed=True,
             sub=True),
        # ... and the long-K narrow matrix at 4+ token tiles on register stages (down_proj at M = 17-64)
        dict(m=20, bits=4, group_size=32, n=64, k=9216, split=6, res=True, packed=True, sub=True, wscale=0.02),
        # the weights repacked in the kernel's load order (BB_QMM_WPACK): one token with several
        # persistent tiles and the next norm's parts, the gate/up pair at 8 rows (sub), a split K
        # at two token tiles, 8-bit bf16 over a split K, the ring with two feature tiles a warp
        # across persistent tiles, the ring at 32 rows after a split K (sub), byte permutes
        dict(m=1, bits=4, group_size=32, n=208, k=512, res=True, blocks=3, norm_next=True, packed=True, wpack=True),
        dict(m=8, bits=4, group_size=32, n=96, k=512, norm=True, prenorm=True, glu_pair=True, blocks=2,
             packed=True, sub=True, wscale=0.02, wpack=True),
        dict(m=13, bits=4, group_size=64, n=64, k=1024, split=2, bias=True, wpack=True),
        dict(m=3, bits=8, group_size=128, n=64, k=1024, split=2, bias=True, dtype=mx.bfloat16, wpack=True),
        dict(m=9, bits=4, group_size=32, n=256, k=512, res=True, blocks=3, ns=3, wf=2, packed=True, wpack=True),
        dict(m=32, bits=4, group_size=32, n=128, k=1280, split=2, norm=True, glu_pair=True, ns=4, packed=True,
             sub=True, wpack=True),
        dict(m=5, bits=4, group_size=64, n=64, k=512, res=True, lop3=False, wpack=True),
        # the gate/up pair at 8 rows on 128-thread blocks (2 x 2 warps), as perf-notes' balanced A/B runs it
        dict(m=8, bits=4, group_size=32, n=128, k=512, norm=True, prenorm=True, glu_pair=True, wn=2, wk=2, blocks=3,
             packed=True, sub=True, wscale=0.02, wpack=True),
        # ... and the pairs repacked too (BB_QMM_WPACK=pairs, WP = 2): register stages at one token
        # over persistent tiles, the gate/up pair at 8 rows (sub), groups of 64 over a split K,
        # 8-bit bf16 (two groups a chunk), the ring with two feature tiles a warp, the ring at 32
        # rows after a split K (sub), the ring in groups of 64, byte permutes
        dict(m=1, bits=4, group_size=32, n=208, k=512, res=True, blocks=3, norm_next=True, packed=True, wpack=True,
             ppack=True),
        dict(m=8, bits=4, group_size=32, n=96, k=512, norm=True, prenorm=True, glu_pair=True, blocks=2,
             packed=True, sub=True, wscale=0.02, wpack=True, ppack=True),
        dict(m=13, bits=4, group_size=64, n=64, k=1024, split=2, bias=True, packed=True, wpack=True, ppack=True),
        dict(m=3, bits=8, group_size=32, n=64, k=1024, split=2, bias=True, dtype=mx.bfloat16, packed=True,
             wpack=True, ppack=True),
        dict(m=9, bits=4, group_size=32, n=256, k=512, res=True, blocks=3, ns=3, wf=2, packed=True, wpack=True,
             ppack=True),
        dict(m=32, bits=4, group_size=32, n=128, k=1280, split=2, norm=True, glu_pair=True, ns=4, packed=True,
             sub=True, wpack=True, ppack=True),
        dict(m=20, bits=4, group_size=64, n=128, k=1024, res=True, blocks=2, ns=3, packed=True, wpack=True, ppack=True),
        dict(m=5, bits=4, group_size=64, n=64, k=512, res=True, lop3=False, packed=True, wpack=True, ppack=True),
        # the ring with 7 warps along K at 8 rows (q/k/v and o_proj at M=8 with ns=4: perf-notes'
        # next A/B), repacked weights and pairs, the subnormal dequantization and a residual
        dict(m=8, bits=4, group_size=32, n=64, k=1792, res=True, blocks=2, ns=4, wk=7, wn=1, packed=True,
             sub=True, wscale=0.02, wpack=True, ppack=True),
        # the wide matrices at two token tiles on the ring (gate/up and lm_head at M = 9-16): the
        # gate/up pair over a split K on persistent blocks, 4 x 2 warps, repacked weights and pairs
        # (the 7B shape); with K whole and a pending norm, the gate product in the kernel (1.5B)
        dict(m=13, bits=4, group_size=32, n=256, k=1024, split=2, glu_pair=True, blocks=3, ns=4, wn=4, wk=2,
             packed=True, sub=True, wscale=0.02, wpack=True, ppack=True),
        dict(m=13, bits=4, group_size=32, n=256, k=1024, split=1, norm=True, prenorm=True, glu_pair=True, blocks=3,
             ns=4, wn=4, wk=2, packed=True, sub=True, wscale=0.02, wpack=True, ppack=True),
    ]
    if quick:  # the first two, the ring after a split K and across persistent tiles, many slices,
               # register stages over several rounds
        specs = specs[:2] + [s for s in specs if (s.get("ns") and (s.get("split") or s.get("blocks", 0) > 2))
                             or s.get("split", 0) > 5 or s.get("wk") or (s.get("norm") and s.get("split", 0) > 1)
                             or s.get("norm_out") or s.get("norm_next") or s.get("prenorm") or s.get("bias_sums")
                             or s.get("packed") or s.get("sub") or s.get("wpack")]
    return [qmm_case(rng, **s) for s in specs]
