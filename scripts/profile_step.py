"""Where one decode step's time goes (issue 8): host bookkeeping, graph build, device time.

Ablations on the Qwen2.5-7B shape (Q4_0-format weights), unified cache, PP=4096:
full step; attention replaced by a no-op (its cost by difference); the model without the
LM head. Run: PYTHONPATH=. python3 scripts/profile_step.py [B ...]
"""

from __future__ import annotations

import sys
import time

import mlx.core as mx
import numpy as np

from batchbench import backend
from batchbench.bench import Mode, Runner
from batchbench.kv_cache import KVCache
from batchbench.models import base, llama
from batchbench.presets import make_preset


def main(bs=(1, 32), pp=4096, steps=16, preset="qwen2.5-7b", quant="q4_0"):
    print(f"backend {backend.describe()}")
    model, cfg = make_preset(preset, mx.float16, quant)
    a = model.args
    from batchbench.kernels import qmm

    print("fused projections:", qmm.fuse_quantized_projections(model),
          "fast quantized linears:", qmm.use_fast_quantized_linears(model))
    prefill(model, qmm)
    for B in bs:
        cache = KVCache(a.num_hidden_layers, a.num_key_value_heads, a.head_dim,
                        B * (pp + 256) + 256, B, True, mx.float16)
        r = Runner(model, cache, Mode("skip"), 2048, 512, compiled=True)
        # fill the prompts without timing (random K/V are as good as real ones for speed)
        cache.find_slot(np.repeat(np.arange(B), pp), np.tile(np.arange(pp), B))
        real_attention = base.attention
        rows = []
        for label, patch, compiled in (("full step", None, False), ("full step, compiled", None, True),
                                       ("attention = identity", "noattn", False)):
            if patch == "noattn":
                base.attention = llama.attention = lambda q, k, v, scale, plan: q
            host, build, total = [], [], []
            for i in range(steps + 3):
                t0 = time.perf_counter()
                plan = cache.prepare(np.arange(B), np.full(B, pp + i), np.arange(B))
                t1 = time.perf_counter()
                toks = mx.array(np.arange(B, dtype=np.int32))[None]
                logits = r.step(toks, plan) if compiled else model(toks, plan, cache)
                t2 = time.perf_counter()
                mx.eval(logits)
                t3 = time.perf_counter()
                if i >= 3:
                    host.append(t1 - t0); build.append(t2 - t1); total.append(t3 - t0)
            rows.append((label, np.median(host) * 1e3, np.median(build) * 1e3, np.median(total) * 1e3))
            cache.seq_rm(-1, pp)
        base.attention = llama.attention = real_attention
        print(f"\nB={B} PP={pp}: per decode step (median of {steps}), ms")
        print(f"{'variant':24s} {'host prep':>10s} {'graph build':>12s} {'step total':>11s} {'t/s':>8s}")
        for label, h, g, t in rows:
            print(f"{label:24s} {h:10.3f} {g:12.3f} {t:11.3f} {B / t * 1e3:8.1f}")
        print(f"attention by difference: {rows[0][3] - rows[2][3]:.3f} ms")
        del cache, r
        mx.clear_cache()


def prefill(model, qmm, n=4096, ub=512):
    """Prefill speed with 4-bit GEMMs (MLX) against dequantize + cuBLAS for large M."""
    a = model.args
    for min_m in (0, 256, 0, 256):
        qmm.DEQUANT_MIN_M = min_m
        cache = KVCache(a.num_hidden_layers, a.num_key_value_heads, a.head_dim, n + 256, 1, True, mx.float16)
        r = Runner(model, cache, Mode("skip"), 2048, ub)
        toks = np.arange(n) % a.vocab_size
        r.decode(toks[:ub], np.arange(ub), np.zeros(ub, np.int64), np.zeros(ub, bool), sync=True)
        cache.clear()
        t = time.perf_counter()
        r.decode(toks, np.arange(n), np.zeros(n, np.int64), np.zeros(n, bool), sync=True)
        dt = time.perf_counter() - t
        print(f"prefill {n} tokens, ubatch {ub}, dequant from M>={min_m or 'never'}: "
              f"{dt * 1e3:.1f} ms = {n / dt:.0f} t/s")
        del cache, r
    qmm.DEQUANT_MIN_M = 256


if __name__ == "__main__":
    main(bs=tuple(int(x) for x in sys.argv[1:]) or (1, 32))
