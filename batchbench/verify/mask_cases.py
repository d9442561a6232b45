"""The decode-mask kernel (batchbench.kernels.mask) on random cell metadata, against a NumPy
reference of llama.cpp's mask rules; same `Case` protocol as cases.py."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from batchbench.kernels import mask as K
from batchbench.verify.cases import Case, Executor


def mask_reference(bits: np.ndarray, cell_pos: np.ndarray, seq: np.ndarray, p1: np.ndarray) -> np.ndarray:
    """bool [T, n]: cell visible to token t."""
    member = (bits[seq // 32] >> (seq % 32)[:, None].astype(np.uint32)) & 1
    n = len(cell_pos)
    return (member[:, :n] == 1) & (cell_pos >= 0)[None] & (cell_pos[None] <= p1[:, None])


def visibility(mask: np.ndarray) -> np.ndarray:
    """1 where 0, 0 where -inf, NaN for anything else (so that a wrong value always fails)."""
    m = mask.astype(np.float64)
    return np.where(m == 0, 1.0, np.where(np.isneginf(m), 0.0, np.nan))


def random_metadata(rng: np.random.Generator, n_cells: int, n_seq: int):
    words = (n_seq + 31) // 32
    bits = np.zeros((words, n_cells), np.uint32)
    owners = rng.integers(0, n_seq, n_cells)
    bits[owners // 32, np.arange(n_cells)] |= (1 << (owners % 32)).astype(np.uint32)
    shared = rng.random(n_cells) < 0.2  # shared prompt cells: a second owner
    other = rng.integers(0, n_seq, n_cells)
    bits[other[shared] // 32, np.flatnonzero(shared)] |= (1 << (other[shared] % 32)).astype(np.uint32)
    cell_pos = rng.integers(0, 400, n_cells).astype(np.int32)
    empty = rng.random(n_cells) < 0.1
    cell_pos[empty] = -1
    bits[:, empty] = 0
    return bits, cell_pos


def mask_case(rng: np.random.Generator, *, t: int, n_cells: int, window: int, n_seq: int,
              dtype=mx.float16) -> Case:
    bits, cell_pos = random_metadata(rng, n_cells, n_seq)
    seq = rng.integers(0, n_seq, t).astype(np.int32)
    p1 = rng.integers(0, 400, t).astype(np.int32)
    want = mask_reference(bits, cell_pos[:window], seq, p1).astype(np.float64)
    kspec, launch = K.plan_decode_mask(mx.array(bits), mx.array(cell_pos)[:window], mx.array(seq),
                                       mx.array(p1), dtype)

    def run(execute: Executor) -> np.ndarray:
        outs, _ = execute(kspec, launch)
        return visibility(outs[0])

    name = (f"mask-cuda-{'bf16' if dtype == mx.bfloat16 else 'fp16'}-T{t}-cells{n_cells}-window{window}"
            f"-seqs{n_seq}")
    return Case(name, [(kspec, launch)], run, want, 0.0)


def mask_cases(rng: np.random.Generator) -> list[Case]:
    """Windows that end inside a thread's 8 cells, more than 32 sequences (two bit words),
    both mask dtypes."""
    return [
        mask_case(rng, t=5, n_cells=300, window=291, n_seq=40, dtype=mx.float16),
        mask_case(rng, t=3, n_cells=520, window=520, n_seq=7, dtype=mx.bfloat16),
        mask_case(rng, t=1, n_cells=64, window=13, n_seq=2, dtype=mx.float16),
    ]
