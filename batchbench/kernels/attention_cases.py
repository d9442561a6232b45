"""Test cases for the decode attention: unified-cache mask layouts and a float64 oracle.

Used by tests/test_attention.py (CPU twin) and scripts/h200_attention.py (CUDA kernel), so
both check the same layouts. NumPy only; the arrays are converted by the callers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK = 32


@dataclass
class Layout:
    visible: np.ndarray  # bool [T, N]
    owned: np.ndarray  # bool [T, N]: cells of the row's sequence (what the cache knows)
    name: str


def _cells_to_rows(cell_pos, cell_seq, rows, n_total, n_swa=0) -> tuple[np.ndarray, np.ndarray]:
    """Visible (causal, same sequence, optional standard SWA) and owned masks per row."""
    n_used = len(cell_pos)
    vis = np.zeros((len(rows), n_total), dtype=bool)
    own = np.zeros((len(rows), n_total), dtype=bool)
    pos = np.asarray(cell_pos)
    seqs = np.asarray(cell_seq)  # [n_used, n_seq] bool
    for t, (s, p1) in enumerate(rows):
        if s < 0:  # a row of a sequence that owns nothing: fully masked
            continue
        mine = seqs[:, s]
        ok = mine & (pos <= p1)
        if n_swa:
            ok &= (p1 - pos) < n_swa
        vis[t, :n_used] = ok
        own[t, :n_used] = mine
    return vis, own


def make_layout(
    rng: np.random.Generator,
    kind: str,
    n_seq: int,
    tokens_per_seq: int = 1,
    max_prompt: int = 90,
    max_tg: int = 6,
    n_swa: int = 0,
    empty_row: bool = False,
    tail: int | None = None,
) -> Layout:
    """Cells of a unified cache after a batched-bench style prefill + some decode steps.

    kind: "contiguous" (each prompt in its own run of cells, decode cells interleaved),
    "interleaved" (prompts interleaved cell by cell), "shared" (one prompt owned by every
    sequence, as with -pps). The last `tokens_per_seq` cells of each sequence are the rows
    being decoded (causal among themselves). N = used cells + a masked tail (not a multiple
    of 32 unless `tail` makes it so).
    """
    cell_pos: list[int] = []
    cell_seq: list[np.ndarray] = []

    def add(p, seqs):
        cell_pos.append(p)
        m = np.zeros(n_seq, dtype=bool)
        m[list(seqs)] = True
        cell_seq.append(m)

    lens = rng.integers(1, max_prompt + 1, size=n_seq)
    if kind == "shared":
        plen = int(lens[0])
        for p in range(plen):
            add(p, range(n_seq))
        lens[:] = plen
    elif kind == "contiguous":
        for s in range(n_seq):
            for p in range(int(lens[s])):
                add(p, [s])
    elif kind == "interleaved":
        for p in range(int(lens.max())):
            for s in range(n_seq):
                if p < lens[s]:
                    add(p, [s])
    else:
        raise ValueError(kind)
    cur = lens.copy()
    for _ in range(int(rng.integers(0, max_tg + 1))):  # earlier decode steps, interleaved
        for s in range(n_seq):
            add(int(cur[s]), [s])
            cur[s] += 1
    rows = []
    for r in range(tokens_per_seq):  # the tokens of this step are already in the cache
        for s in range(n_seq):
            add(int(cur[s]) + r, [s])
    for s in range(n_seq):
        for r in range(tokens_per_seq):
            rows.append((s, int(cur[s]) + r))
    if empty_row:
        rows[len(rows) // 2] = (-1, 0)
    n_used = len(cell_pos)
    extra = int(rng.integers(1, 40)) if tail is None else tail
    vis, own = _cells_to_rows(cell_pos, np.array(cell_seq), rows, n_used + extra, n_swa)
    return Layout(vis, own, f"{kind} B={n_seq} x{tokens_per_seq}" + (f" swa={n_swa}" if n_swa else ""))


def live_lists(cells: np.ndarray, pad_to: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(blocks int32 [T, L], counts int32 [T]): ascending 32-cell blocks holding a True cell."""
    t, n = cells.shape
    n_blk = -(-n // BLOCK)
    padded = np.zeros((t, n_blk * BLOCK), dtype=bool)
    padded[:, :n] = cells
    any_blk = padded.reshape(t, n_blk, BLOCK).any(axis=2)
    counts = any_blk.sum(axis=1).astype(np.int32)
    width = max(int(counts.max()) if t else 0, 1) if pad_to is None else pad_to
    blocks = np.zeros((t, width), dtype=np.int32)
    for r in range(t):
        ids = np.nonzero(any_blk[r])[0]
        blocks[r, : len(ids)] = ids
    return blocks, counts


def additive(visible: np.ndarray) -> np.ndarray:
    return np.where(visible, 0.0, -np.inf).astype(np.float32)


def reference(q, k, v, visible: np.ndarray, scale: float) -> np.ndarray:
    """float64 attention of q [1, Hq, T, D] over the first N cells of k, v [1, Hkv, S, D].

    `visible` [T, N] bool. Rows that see nothing are zero.
    """
    q = np.asarray(q, dtype=np.float64)[0]
    k = np.asarray(k, dtype=np.float64)[0]
    v = np.asarray(v, dtype=np.float64)[0]
    hq, t, d = q.shape
    hkv = k.shape[0]
    n = visible.shape[1]
    g = hq // hkv
    k, v = k[:, :n], v[:, :n]
    qg = q.reshape(hkv, g, t, d)
    s = np.einsum("hgtd,hnd->hgtn", qg, k) * scale
    s = np.where(visible[None, None], s, -np.inf)
    top = s.max(axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    p = np.exp(s - top)
    tot = p.sum(axis=-1, keepdims=True)
    o = np.einsum("hgtn,hnd->hgtd", p, v)
    o = np.where(tot > 0, o / np.where(tot > 0, tot, 1.0), 0.0)
    return o.reshape(1, hq, t, d)
