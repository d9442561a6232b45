"""A whole decode step (all layers, K/V writes included) as one compiled MLX function.

Building the graph of a 28-layer step op by op costs milliseconds of Python per token; the
compiled step replays it. The cache buffers go in and come out as arrays: the cache keeps only
the new ones, so at evaluation the old buffers are referenced by the graph alone and MLX
updates them in place instead of copying.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from batchbench.kernels.attention import PackedLive
from batchbench.kv_cache import AttentionPlan, KVCache


class _Slot:
    """A layer's K/V inside the traced step."""

    def __init__(self, keys: mx.array, values: mx.array, cells: mx.array):
        self.keys, self.values, self.cells = keys, values, cells

    def update_and_fetch(self, k: mx.array, v: mx.array):
        self.keys[:, :, self.cells] = k
        self.values[:, :, self.cells] = v
        return self.keys, self.values


class _StepCache:
    def __init__(self, layers: list[_Slot]):
        self.layers = layers


class CompiledDecode:
    def __init__(self, model, cache: KVCache):
        self.model, self.cache = model, cache
        self._fns: dict[tuple, object] = {}

    def __call__(self, tokens: mx.array, plan: AttentionPlan) -> mx.array:
        live = plan.live_blocks is not None
        key = (plan.flash, plan.skip, live)
        fn = self._fns.get(key)
        if fn is None:
            fn = self._fns[key] = mx.compile(self._step(*key))
        state = [a for c in self.cache.layers for a in (c.keys, c.values)]
        extra = [plan.live_blocks.rows] if live else []
        cells = mx.array(plan.cells.astype(np.int32))  # uploaded only on this path
        logits, *state = fn(tokens, plan.positions, cells, plan.mask, *extra, *state)
        for c, k, v in zip(self.cache.layers, state[0::2], state[1::2]):
            c.keys, c.values = k, v
        return logits

    def _step(self, flash: bool, skip: bool, live: bool):
        model, n_layers = self.model, len(self.cache.layers)

        def step(tokens, positions, cells, mask, *rest):
            kv = rest[1:] if live else rest
            plan = AttentionPlan(positions=positions, decode=True, flash=flash, skip=skip,
                                 mask=mask, live_blocks=PackedLive(rest[0]) if live else None)
            cache = _StepCache([_Slot(kv[2 * i], kv[2 * i + 1], cells) for i in range(n_layers)])
            logits = model(tokens, plan, cache)
            return [logits] + [a for s in cache.layers for a in (s.keys, s.values)]

        return step
