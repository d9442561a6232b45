"""Shared model pieces: argument dataclass base and the attention entry point."""

from __future__ import annotations

import functools
import inspect
import sys
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from batchbench.kernels.attention import PackedLive, decode_attention
from batchbench.kernels.rope import pair_layout


@dataclass
class Hidden:
    """The residual stream h between two layers, with the next layer's input as far as it is
    computed: x_n = norm(h) where the launch that made h also wrote it (qmm.linear_norm; then
    norm is None), else x_n = h and norm the RMSNorm the next layer still applies."""

    h: mx.array
    x_n: mx.array
    norm: Any


def hidden_parts(x, norm) -> tuple[mx.array, mx.array, Any]:
    """(h, x_n, norm) of a layer input: a Hidden, or a plain h that `norm` still normalizes."""
    return (x.h, x.x_n, x.norm) if isinstance(x, Hidden) else (x, x, norm)


def residual(x) -> mx.array:
    """The residual stream h of a layer output (Hidden or plain)."""
    return x.h if isinstance(x, Hidden) else x


@dataclass
class BaseModelArgs:
    @classmethod
    def from_dict(cls, params: dict[str, Any]):
        # config.json carries many keys a model does not use; keep only ours.
        names = inspect.signature(cls).parameters
        return cls(**{k: v for k, v in params.items() if k in names})


@dataclass
class QKVProjection:
    """The fused q/k/v projection of norm(x), not computed yet: the cache computes it where it
    stores K and V, since on CUDA one kernel can project, rotate and store
    (batchbench.kernels.qmm.project_rope_store)."""

    attn: Any  # the layer's Attention
    x: mx.array
    norm: Any = None

    def __call__(self) -> mx.array:
        """[1, T, (Hq + 2 * Hkv) * D], q columns, then k, then v."""
        return self.attn.project(self.x, self.norm)

    @property
    def fused(self):
        return self.attn.get("qkv_proj")

    def paired(self, rope: dict) -> mx.array | None:
        """The projection with q and k in rope_pair_order, as the fused layer stores it when
        its layout matches `rope` (qkv_rope reads it so); None otherwise."""
        f = self.fused
        if f is None or getattr(f, "rope_layout", None) != pair_layout(rope):
            return None
        return f.fused(self.x, self.norm, stored_order=True)


def masked_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask) -> mx.array:
    """Plain matmul + softmax attention (`-fa off`); GQA by reshaping, never repeating K/V."""
    _, n_q, T, D = q.shape
    n_kv = k.shape[1]
    g = n_q // n_kv
    qg = (q * scale).reshape(1, n_kv, g * T, D)
    scores = (qg @ k.swapaxes(-1, -2)).reshape(1, n_kv, g, T, -1)
    if isinstance(mask, str):
        mask = _causal(T, k.shape[2], scores.dtype)
    if mask is not None:
        scores = scores + mask.astype(scores.dtype)
    p = mx.softmax(scores.astype(mx.float32), axis=-1).astype(v.dtype)
    out = p.reshape(1, n_kv, g * T, -1) @ v
    return out.reshape(1, n_q, T, D)


def _causal(T: int, N: int, dtype) -> mx.array:
    rows = mx.arange(N - T, N)[:, None]
    cols = mx.arange(N)[None, :]
    return mx.where(cols <= rows, 0.0, -mx.inf).astype(dtype)


_COMPILE_OK = [True]


@functools.lru_cache(maxsize=None)
def _compiled_decode_attention(scale: float, skip: bool, live: bool):
    """decode_attention under mx.compile: a traced call replays the kernel without rebuilding
    its launch (source, template, checks) in Python and MLX on every layer of every step."""

    def with_live(q, k, v, mask, live_rows):
        return decode_attention(q, k, v, scale=scale, mask=mask, skip=skip,
                                live_blocks=PackedLive(live_rows))

    def without_live(q, k, v, mask):
        return decode_attention(q, k, v, scale=scale, mask=mask, skip=skip)

    return mx.compile(with_live if live else without_live)


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, plan) -> mx.array:
    """Attention of one ubatch; `plan` (an AttentionPlan built by the KV cache) says how.

    q is [1, Hq, T, D]; k/v are the whole cache buffers [1, Hkv, cells, D].
    """
    if plan.decode:
        if plan.flash:
            args = (q, k, v, plan.mask) + ((plan.live_blocks.rows,) if plan.live_blocks else ())
            if _COMPILE_OK[0]:
                try:
                    fn = _compiled_decode_attention(scale, plan.skip, plan.live_blocks is not None)
                    return fn(*args)
                except Exception as e:  # noqa: BLE001 - keep running, uncompiled, and say so
                    _COMPILE_OK[0] = False
                    print(f"note: compiled decode attention failed ({e}); running it uncompiled",
                          file=sys.stderr)
            return decode_attention(q, k, v, scale=scale, mask=plan.mask, skip=plan.skip,
                                    live_blocks=plan.live_blocks)
        n = plan.mask.shape[-1]
        return masked_attention(q, k[:, :, :n], v[:, :, :n], scale, plan.mask)
    outs = []
    for g in plan.groups:
        qs = q[:, :, g.r0 : g.r1]
        ks, vs = k[:, :, g.c0 : g.c1], v[:, :, g.c0 : g.c1]
        if plan.flash:
            outs.append(mx.fast.scaled_dot_product_attention(qs, ks, vs, scale=scale, mask=g.mask))
        else:
            outs.append(masked_attention(qs, ks, vs, scale, g.mask))
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)
