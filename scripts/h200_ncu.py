#!/usr/bin/env python3
"""Target program for Nsight Compute: the decode step's kernels, a few launches each.

  ncu --clock-control none --kernel-name regex:bb_ --launch-skip 0 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
      --section LaunchStats --section WarpStateStats --print-details all \
      python3 scripts/h200_ncu.py

The 4-bit matmuls of the Qwen2.5-7B shape at M=1 with the model's fused epilogues (q/k/v with
the RMSNorm and bias, o with the residual, gate/up with the RMSNorm, down with the residual
on the gate product as the decode step gives it (before session 18 this script's down formed
the product in its x staging, as the step no longer does), lm_head with the RMSNorm), at M=32
gate/up and down, and the attention kernel at B=1 x 4096, B=2 x 4096 and B=32 x 8192 cells
with live lists. The matmuls read packed scales and biases where the model's layers hold them
(BB_QMM_SB_PACK, on by default on CUDA; before session 23 this script never passed them).
Each is launched twice (the first compiles; profile both: ncu flushes caches before each).
PARTS=qmm or PARTS=attn picks one half. NCU_M=32 and NCU_NAMES=gate_up,down pick matmuls;
NCU_NAMES=qkv_rope adds q/k/v with its RoPE epilogue as the decode step runs it (not by default);
NCU_WF=2 also runs each picked matmul with two feature tiles per warp (QmmConfig.wf, the ring).
NCU_WPACK=1 also runs each picked matmul on weights repacked in the kernel's load order
(qmm.pack_weights, as BB_QMM_WPACK keeps them; with its default, pairs, the packed scales and
biases too: qmm.pack_pairs), right after the plain one.
"""

from __future__ import annotations

import math
import os

from dataclasses import replace

import mlx.core as mx

from batchbench import bench_attention as ba
from batchbench.kernels import qmm
from batchbench.kernels import spec as kspec
from batchbench.kernels.attention import decode_attention

H, FF, V = 3584, 18944, 152064
PARTS = os.environ.get("PARTS", "qmm,attn").split(",")
NCU_M = [int(m) for m in os.environ.get("NCU_M", "1,32").split(",")]
NCU_NAMES = os.environ.get("NCU_NAMES", "")
NCU_WF = int(os.environ.get("NCU_WF", "1"))
NCU_WPACK = os.environ.get("NCU_WPACK", "0") == "1"


def qweights(n: int, k: int):
    w = (mx.random.normal((n, k)) * 0.02).astype(mx.float16)
    wq, s, b = mx.quantize(w, group_size=32, bits=4)
    mx.eval(wq, s, b)
    return wq, s, b


def run_qmm() -> None:
    norm = (mx.ones((H,), mx.float16), 1e-6)
    for m in NCU_M:
        x = mx.random.normal((m, H)).astype(mx.float16)
        xg = mx.random.normal((m, FF)).astype(mx.float16)  # silu(gate) * up, from gate/up's epilogue
        res = mx.random.normal((m, H)).astype(mx.float16)
        cases = [("qkv", 4608, H, dict(norm=norm, bias=mx.zeros((4608,), mx.float16)), x),
                 ("o", H, H, dict(residual=res), x),
                 ("gate_up", 2 * FF, H, dict(norm=norm), x),
                 ("down", H, FF, dict(residual=res), xg),
                 ("lm_head", V, H, dict(norm=norm), x)]
        for name, n, k, kw, xin in cases:
            if NCU_NAMES and name not in NCU_NAMES.split(","):
                continue
            if not NCU_NAMES and m == 32 and name not in ("gate_up", "down"):
                continue
            w, s, b = qweights(n, k)
            if qmm.packs_scales():  # as the model's layers hold them (BB_QMM_SB_PACK)
                kw = dict(kw, packed=qmm.pack_scales_biases(s, b))
            cfg = qmm.choose_config(m, n, k, 4)
            print(f"qmm {name} M={m}: {cfg}", flush=True)
            for _ in range(2):
                mx.eval(qmm.quantized_matmul(xin, w, s, b, group_size=32, bits=4, **kw))
            if NCU_WPACK:
                print(f"qmm {name} M={m} (repacked weights): {cfg}", flush=True)
                kwp = dict(kw, wpack=qmm.pack_weights(w, 4))
                if "packed" in kw and qmm.WPACK == "pairs":
                    kwp.update(packed=qmm.pack_pairs(kw["packed"], 4, 32), ppack=True)
                for _ in range(2):
                    mx.eval(qmm.quantized_matmul(xin, w, s, b, group_size=32, bits=4, **kwp))
            if NCU_WF > 1 and cfg.ns > 0:
                # the same matmul without its epilogue, then with NCU_WF feature tiles per warp
                for c in (cfg, qmm.persistent(replace(cfg, wf=NCU_WF, ns=min(cfg.ns, 3)), k, 4)):
                    print(f"qmm {name} M={m} (plain): {c}", flush=True)
                    ks, launch = qmm.plan_quantized_matmul("cuda", xin, w, s, b, group_size=32, bits=4,
                                                           config=c)
                    for _ in range(2):
                        mx.eval(kspec.run(ks, launch))
            del w, s, b
        if "qkv_rope" in NCU_NAMES.split(",") and m <= 32:
            run_qkv_rope(m)


def run_qkv_rope(m: int) -> None:
    """q/k/v with its RoPE + K/V-write epilogue as the decode step runs it: the fused layer (rows
    in rope_pair_order, packed pairs as BB_QMM_SB_PACK keeps them) on x = o_proj's y * weight
    with its pending norm (BB_QMM_NORM_PRE)."""
    import mlx.nn as nn

    from batchbench.verify.cases import producer_share

    rope = dict(n_heads=28, n_kv_heads=4, head_dim=128, base=1e6, scale=1.0, traditional=False)
    parts = []
    for n in (3584, 512, 512):
        layer = nn.QuantizedLinear(H, n, bias=True, group_size=32, bits=4)
        layer.weight, layer.scales, layer.biases = qweights(n, H)
        layer.bias = mx.zeros((n,), mx.float16)
        parts.append(layer)
    fused = qmm.FusedQuantizedLinear(parts, rope)
    x, pending = producer_share(mx.random.normal((1, m, H)).astype(mx.float16), mx.ones((H,), mx.float16), 1e-6)
    keys, values = (mx.zeros((1, 4, 64, 128), mx.float16) for _ in range(2))
    store = qmm.RopeStore(mx.arange(m, dtype=mx.int32), mx.arange(m, dtype=mx.int32), keys, values, **rope)
    print(f"qmm qkv_rope M={m}: {qmm.choose_config(m, fused['weight'].shape[0], H, 4)}, "
          f"packed {'packed' in fused}, SB_PACK {qmm.SB_PACK}", flush=True)
    for _ in range(2):
        q = qmm.project_rope_store(fused, x, pending, store)
        if q is None:
            raise SystemExit("qkv_rope: the RoPE kernel does not cover this call")
        mx.eval(q, keys, values)


def run_attn() -> None:
    for b, ctx in ((1, 4096), (2, 4096), (32, 8192)):
        layers, q, mask, live = ba.unified_problem(b, ctx, 1)
        k, v = layers[0][0], layers[0][1]
        print(f"attention B={b} ctx={ctx}", flush=True)
        for _ in range(2):
            mx.eval(decode_attention(q, k, v, scale=1 / math.sqrt(ba.D), mask=mask, live_blocks=live))


if __name__ == "__main__":
    if "qmm" in PARTS:
        run_qmm()
    if "attn" in PARTS:
        run_attn()
    mx.synchronize()
