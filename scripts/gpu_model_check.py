#!/usr/bin/env python3
"""On CUDA: the decode logits of a model running batchbench's kernels (decode attention, 4-bit
matmuls with the fused norm / gate product / residual, q/k/v RoPE) against the same model with
every custom kernel swapped for its pure-MLX twin, both on the GPU. Unified cache, B sequences.

Run: PYTHONPATH=. python3 scripts/gpu_model_check.py [preset]   (default qwen2.5-1.5b, q4_0, fp16)
MODEL_CHECK_CASES="B:PP:TG,..." replaces the default cases (1:300:2, 2:64:2, 3:517:2), e.g.
"32:16:2" on qwen2.5-7b for the M=32 matmul paths of the 7B shape. MODEL_CHECK_KERNELS=1 also
lists the custom kernels each case's graphs called (e.g. the int8 kernels under BB_QMM_X8=1).
"""

from __future__ import annotations

import contextlib
import os
import sys

import mlx.core as mx
import numpy as np

from batchbench import backend
from batchbench.bench import Mode, Runner
from batchbench.kernels import qmm
from batchbench.kernels import spec as kspec
from batchbench.kv_cache import KVCache
from batchbench.models import base
from batchbench.presets import make_preset


def decode_logits(model, B: int, pp: int, tg: int) -> np.ndarray:
    a = model.args
    cache = KVCache(a.num_hidden_layers, a.num_key_value_heads, a.head_dim, B * (pp + tg) + 256, B, True,
                    mx.float16)
    r = Runner(model, cache, Mode("skip"), 2048, 512)
    rng = np.random.default_rng(0)
    n = B * pp
    r.decode(rng.integers(0, a.vocab_size, n), np.tile(np.arange(pp), B), np.repeat(np.arange(B), pp),
             np.zeros(n, bool), sync=True)
    out = []
    for i in range(tg):
        lg = r.decode(rng.integers(0, a.vocab_size, B), np.full(B, pp + i), np.arange(B), np.ones(B, bool),
                      sync=True)
        out.append(np.array(lg.astype(mx.float32)))
    return np.stack(out)


@contextlib.contextmanager
def count_kernels():
    """With MODEL_CHECK_KERNELS=1, the custom kernels the model's graphs call (spec name -> calls
    while tracing; compiled segments trace once), to show which paths ran."""
    counts: dict[str, int] = {}
    if os.environ.get("MODEL_CHECK_KERNELS") != "1":
        yield counts
        return
    run = kspec.run

    def counted(spec, launch):
        counts[spec.name] = counts.get(spec.name, 0) + 1
        return run(spec, launch)

    kspec.run = counted
    try:
        yield counts
    finally:
        kspec.run = run


def reset_compiled(model) -> None:
    # compiled functions keep the kernels they were traced with (each Runner compiles its own
    # decode segments; the per-call attention compile is shared)
    base._compiled_decode_attention.cache_clear()


def main() -> int:
    preset = sys.argv[1] if len(sys.argv) > 1 else "qwen2.5-1.5b"
    model, _ = make_preset(preset, mx.float16, "q4_0")
    print("fused", qmm.fuse_quantized_projections(model), "fast linears", qmm.use_fast_quantized_linears(model))
    print(f"backend {backend.describe()}, preset {preset}")
    rows = []
    # B=2 with a short prompt first: the B=3 case needs new kernel builds and attention plans,
    # which did not fit a 150 s limit on the H200 (third session)
    cases = ((1, 300, 2), (2, 64, 2), (3, 517, 2))
    if os.environ.get("MODEL_CHECK_CASES"):
        try:
            cases = tuple(tuple(int(v) for v in c.split(":")) for c in os.environ["MODEL_CHECK_CASES"].split(","))
            if any(len(c) != 3 or min(c) < 1 for c in cases):
                raise ValueError
        except ValueError:
            sys.exit(f"gpu_model_check: MODEL_CHECK_CASES is B:PP:TG,... with positive integers, "
                     f"got {os.environ['MODEL_CHECK_CASES']!r}")
    for B, pp, tg in cases:
        backend.BACKEND = "cuda" if mx.cuda.is_available() else "cpu"
        reset_compiled(model)
        with count_kernels() as built:
            ours = decode_logits(model, B, pp, tg)
        if built:
            print(f"B={B}: custom kernels traced (name x calls): "
                  + ", ".join(f"{k} x{v}" for k, v in sorted(built.items())))
        backend.BACKEND = "cpu"  # every custom kernel -> its pure-MLX twin; MLX stays on the GPU
        reset_compiled(model)
        ref = decode_logits(model, B, pp, tg)
        rel = float(np.abs(ours - ref).max() / np.abs(ref).max())
        agree = float((ours.argmax(-1) == ref.argmax(-1)).mean())
        rows.append(rel)
        print(f"B={B} PP={pp} TG={tg}: max |ours - twins| / max |twins| = {rel:.2e}, argmax agreement {agree:.3f}")
    ok = max(rows) < 3e-2
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
