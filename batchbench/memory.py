"""Memory estimates made before anything large is allocated."""

from __future__ import annotations

import os

import mlx.core as mx


def available_bytes() -> int:
    """Memory the current MLX device can use: GPU memory on a GPU, physical RAM on the CPU."""
    if mx.default_device() != mx.cpu:
        try:
            info = mx.device_info()
            for key in ("memory_size", "total_memory"):
                if key in info:
                    return int(info[key])
        except Exception:  # older MLX: fall through to RAM
            pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def kv_bytes(n_layers: int, n_kv_heads: int, head_dim: int, n_cells: int, dtype) -> int:
    return 2 * n_layers * n_kv_heads * head_dim * n_cells * dtype.size


def activation_bytes(cfg: dict, n_ubatch: int, n_kv: int, n_seq: int, dtype, full_scores: bool) -> int:
    """Peak transient memory of one ubatch; attention over all cells materialises scores."""
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads = cfg["num_attention_heads"]
    act = n_ubatch * (4 * h + 3 * f) * 4
    logits = max(n_seq, 1) * v * 4
    scores = n_ubatch * n_kv * heads * 4 * 2 if full_scores else n_ubatch * min(n_kv, 8192) * heads * 4
    mask = max(n_seq, 32) * n_kv * dtype.size * 2
    return act + logits + scores + mask


def check_fits(needed: int, what: str) -> None:
    avail = available_bytes()
    if needed > 0.9 * avail:
        raise MemoryError(
            f"{what} needs about {needed / 2**30:.1f} GiB but only {avail / 2**30:.1f} GiB are "
            f"available; lower -c, -npl or -ub, or use a smaller model/--quant"
        )
