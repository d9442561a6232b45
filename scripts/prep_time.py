#!/usr/bin/env python3
"""Host time of one decode step's `KVCache.prepare` (cell bookkeeping, mask inputs, live rows,
the packed upload), with the whole-cache decode window the CUDA path uses. Host-only: runs on
any machine. Run: PYTHONPATH=. python3 scripts/prep_time.py [B ...]  (default 1 4 32)."""

from __future__ import annotations

import statistics
import sys
import time

import mlx.core as mx
import numpy as np

import batchbench.kv_cache as kv

kv.skipped_cells_are_free = lambda: True  # the GPU kernels' window: the whole 140k-cell cache


def prep_ms(b: int, pp: int = 4096, steps: int = 200) -> float:
    cache = kv.KVCache(28, 4, 128, 140000, b, True, mx.float16)
    cache.find_slot(np.repeat(np.arange(b), pp), np.tile(np.arange(pp), b))
    times = []
    for i in range(steps + 5):
        t = time.perf_counter()
        cache.prepare(np.arange(b), np.full(b, pp + i), None, tokens=np.arange(b))
        times.append(time.perf_counter() - t)
    return statistics.median(times[5:]) * 1e3


if __name__ == "__main__":
    for b in [int(x) for x in sys.argv[1:]] or [1, 4, 32]:
        print(f"B={b}: prepare {prep_ms(b):.3f} ms (median)")
