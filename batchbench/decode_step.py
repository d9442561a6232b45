"""A decode step (all layers, K/V writes included) as a few compiled MLX functions.

Building the graph of a 28-layer step op by op costs milliseconds of Python per token; a
compiled function replays it. The layers are cut into segments of `every` layers (all of
them when `every` is 0), one compiled function each, and each segment's output is submitted
with `mx.async_eval` before the next is built, so the GPU starts while the host is still
encoding the rest of the step.

The cache buffers go in and come out as arrays and the cache keeps what comes out. On CUDA
the K/V write is done in place by the RoPE kernel and the buffers come out as they went in;
elsewhere they come out updated, and since the cache then holds only the new arrays, MLX
updates the old buffers in place instead of copying them.
"""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx

from batchbench.kernels.attention import PackedLive
from batchbench.kv_cache import AttentionPlan, KVCache, store_qkv
from batchbench.models.base import residual


class _Slot:
    """A layer's K/V inside the traced step."""

    def __init__(self, keys: mx.array, values: mx.array, cells: mx.array, flash: bool):
        self.keys, self.values, self.cells, self.flash = keys, values, cells, flash

    def store_qkv(self, qkv: mx.array, positions: mx.array, rope: dict):
        q, self.keys, self.values = store_qkv(qkv, positions, self.cells, self.keys, self.values, rope,
                                              flash_decode=self.flash)
        return q, self.keys, self.values


def segment_bounds(n: int, every: int = 0, first: int = 0,
                   sizes: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """(start, end) layers of each decode segment: `sizes` in order, the last repeating, or
    else a first segment of `first` layers and then `every` (0: the whole step at once)."""
    if not sizes:
        step = every if 0 < every < n else n
        sizes = ([first] if 0 < first < step else []) + [step]
    if any(int(x) <= 0 for x in sizes):
        raise ValueError(f"decode segments must hold at least one layer each, got {list(sizes)}")
    bounds = [0]
    while bounds[-1] < n:
        bounds.append(min(bounds[-1] + int(sizes[min(len(bounds) - 1, len(sizes) - 1)]), n))
    return list(zip(bounds[:-1], bounds[1:]))


class CompiledDecode:
    def __init__(self, model, cache: KVCache, every: int = 0, first: int = 0,
                 sizes: Sequence[int] | None = None):
        """Segments of `every` layers (0: one for the whole step); `first` > 0 makes the first
        segment that long instead, so that the GPU can start sooner. `sizes`, if given, lists
        the segments' layer counts instead (the last one repeats until every layer is in one)."""
        self.model, self.cache = model, cache
        self.segments = segment_bounds(len(cache.layers), every, first, sizes)
        self._fns: dict[tuple, object] = {}

    def __call__(self, tokens: mx.array, plan: AttentionPlan) -> mx.array:
        """Logits of the rows in plan.out_rows, as the model's __call__ would return them."""
        live = plan.live_blocks is not None
        rows = plan.out_rows is not None
        extra = ([plan.live_blocks.rows] if live else []) + ([plan.out_rows] if rows else [])
        h = tokens
        for i, (a, b) in enumerate(self.segments):
            key = (i, plan.flash, plan.skip, live, rows)
            fn = self._fns.get(key)
            if fn is None:
                fn = self._fns[key] = mx.compile(self._segment(a, b, *key[1:]))
            layers = self.cache.layers[a:b]
            state = [x for c in layers for x in (c.keys, c.values)]
            h, *state = fn(h, plan.positions, plan.cells, plan.mask, *extra, *state)
            for c, k, v in zip(layers, state[0::2], state[1::2]):
                c.keys, c.values = k, v
            if b < len(self.cache.layers):
                mx.async_eval(h)  # the GPU starts on these layers while the host builds the rest
        return h

    def _segment(self, a: int, b: int, flash: bool, skip: bool, live: bool, rows: bool):
        model, n_layers = self.model, len(self.cache.layers)
        n_extra = int(live) + int(rows)

        def segment(h, positions, cells, mask, *rest):
            extra, kv = rest[:n_extra], rest[n_extra:]
            plan = AttentionPlan(positions=positions, decode=True, flash=flash, skip=skip, mask=mask,
                                 live_blocks=PackedLive(extra[0]) if live else None,
                                 out_rows=extra[-1] if rows else None, cells=cells)
            slots = [_Slot(kv[2 * i], kv[2 * i + 1], cells, flash) for i in range(b - a)]
            if a == 0:
                h = model.model.embed_tokens(h)
            for layer, slot in zip(model.model.layers[a:b], slots):
                h = layer(h, plan, slot)
            # between segments only the residual stream passes (the next one normalizes it)
            h = model.head(h, plan) if b == n_layers else residual(h)
            return [h] + [x for s in slots for x in (s.keys, s.values)]

        return segment
