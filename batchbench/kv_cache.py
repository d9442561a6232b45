"""Multi-sequence KV cache in llama.cpp's layout, and the attention plan it builds per ubatch.

One physical buffer per layer, K and V `[1, Hkv, n_stream * kv_size, D]`. Unified mode has one
stream shared by every sequence; split mode (`-no-kvu`) gives sequence s the cells of stream s.
Cell metadata (position, set of sequence ids) lives on the host, as in llama.cpp's
`llama_kv_cells`, and is mirrored to the device so the KQ mask is built there, not in Python.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from batchbench.kernels.attention import PackedLive, cuda_kernel_reads_cache, skipped_cells_are_free
from batchbench.kernels.mask import additive, decode_mask, visible
from batchbench.kernels.qmm import RopeStore, project_rope_store
from batchbench.kernels.rope import qkv_rope_store
from batchbench.upload import Staging, device_int32, to_device

BLOCK = 32  # cells per skip block (llama.cpp's vec kernel)
PAD = 256  # n_kv padding (llama.cpp get_n_kv)
# Decode windows keep their shapes across steps so that compiled decode steps are not
# re-traced: with skipping on a GPU kernel the window is the whole cache (masked cells cost
# nothing) and the live-block lists are as wide as it; otherwise it is rounded up to this many.
SKIP_WINDOW_PAD = 2048


def pad_to(n: int, m: int) -> int:
    return ((n + m - 1) // m) * m


@dataclass(frozen=True)
class SWA:
    """Sliding window; kind is standard, chunked or symmetric (llama_hparams::is_masked_swa)."""

    window: int
    kind: str = "standard"

    def masked(self, p0, p1):
        if self.kind == "standard":
            return p1 - p0 >= self.window
        if self.kind == "chunked":
            return p0 < (p1 // self.window) * self.window
        if self.kind == "symmetric":
            return abs(p1 - p0) > self.window // 2
        raise ValueError(f"unknown SWA kind {self.kind!r}")


@dataclass
class Group:
    """Rows [r0, r1) of a prefill ubatch attend to cells [c0, c1) with `mask` (array, "causal" or None)."""

    r0: int
    r1: int
    c0: int
    c1: int
    mask: object


@dataclass
class AttentionPlan:
    """Everything attention needs for one ubatch; built once, used by every layer."""

    positions: mx.array  # [T] int32, RoPE position of each token
    decode: bool  # few tokens per sequence: use the decode kernel
    flash: bool
    skip: bool
    mask: mx.array | None = None  # decode: [T, n_kv] additive, KV dtype
    live_blocks: PackedLive | None = None
    groups: list[Group] = field(default_factory=list)
    out_rows: mx.array | None = None
    cells: mx.array | None = None  # decode: int32 [T], the cells the tokens' K/V go to
    tokens: mx.array | None = None  # decode, when prepare was given them: int32 [T]
    eval_every: int = 0  # op-by-op steps: submit the graph every this many layers (0: at the end)


def store_qkv(qkv, positions: mx.array, cells: mx.array, keys: mx.array, values: mx.array,
              rope: dict, *, flash_decode: bool, where: slice | None = None):
    """RoPE of a ubatch's fused q/k/v projection [1, T, W] (an array, or a QKVProjection to
    compute), with its K/V written into `cells` (`where`: the same cells as a slice, if they
    are one run); returns (q [1, Hq, T, D], keys, values: the whole buffers). In place (one CUDA
    kernel) only on the flash decode path, where the one reader of the buffers is the decode
    attention kernel, which takes q (see qkv_rope_store); there the projection's kernel does
    the RoPE and the write itself where it covers the call (project_rope_store)."""
    dtype = qkv.dtype if isinstance(qkv, mx.array) else qkv.x.dtype
    in_place = flash_decode and cuda_kernel_reads_cache(dtype, rope["head_dim"])
    paired = False
    if not isinstance(qkv, mx.array):
        if in_place and qkv.fused is not None:
            q = project_rope_store(qkv.fused, qkv.x, qkv.norm, RopeStore(positions, cells, keys, values, **rope))
            if q is not None:
                return q, keys, values
        raw = qkv.paired(rope)  # the RoPE kernel reads the stored order: no gather
        qkv, paired = (qkv(), False) if raw is None else (raw, True)
    return qkv_rope_store(qkv, positions, cells, keys, values, where=where, in_place=in_place, paired=paired,
                          **rope)


# A decode step whose metadata changes are scattered over at most this many cells sends them
# in its one upload and scatters them into the device mirror; more take a second upload.
MIRROR_SCATTER_MAX = 1024

# A ubatch is a decode step when no sequence has more tokens than this (speculative drafts).
DECODE_MAX_PER_SEQ = 4


class LayerCache:
    def __init__(self, owner: "KVCache", keys: mx.array, values: mx.array):
        self.owner = owner
        self.keys = keys
        self.values = values

    def store_qkv(self, qkv: mx.array, positions: mx.array, rope: dict):
        """`store_qkv` into this layer's buffers at the cells of the ubatch being prepared."""
        o = self.owner
        q, self.keys, self.values = store_qkv(qkv, positions, o._write_cells, self.keys, self.values, rope,
                                              flash_decode=o._write_decode, where=o._write_slice)
        return q, self.keys, self.values


class KVCache:
    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        kv_size: int,
        n_seq_max: int,
        unified: bool,
        dtype=mx.float16,
        swa: SWA | None = None,
        own_blocks: bool = False,
    ):
        if n_seq_max < 1 or n_seq_max > 256:
            raise ValueError(f"number of parallel sequences must be 1..256, got {n_seq_max}")
        self.unified = unified
        # Decode tokens in 32-cell blocks of their own sequence (unified only; beyond llama.cpp,
        # which gives a step's tokens consecutive cells, so every row's list gains the blocks
        # of all the others' new tokens and skipping fades over a long generation).
        self.own_blocks = own_blocks and unified
        self.n_stream = 1 if unified else n_seq_max
        self.kv_size = kv_size
        self.n_seq_max = n_seq_max
        self.dtype = dtype
        self.swa = swa
        n_cells = self.n_stream * kv_size
        self.n_cells = n_cells
        self.layers = [
            LayerCache(
                self,
                mx.zeros((1, n_kv_heads, n_cells, head_dim), dtype),
                mx.zeros((1, n_kv_heads, n_cells, head_dim), dtype),
            )
            for _ in range(n_layers)
        ]
        mx.eval([(c.keys, c.values) for c in self.layers])
        self.n_words = (n_seq_max + 31) // 32
        self.pos = np.full(n_cells, -1, np.int32)
        self.bits = np.zeros((self.n_words, n_cells), np.uint32)  # seq-id bitset per cell
        self.seq_blocks = np.zeros((n_seq_max, pad_to(n_cells, BLOCK) // BLOCK), bool)
        # The live rows of the last decode plan: (seq ids and window, rows on the device, counts);
        # then the in-order appends to the lists since, or None when anything else changed them.
        self._live_cache: tuple | None = None
        self._appends: list[tuple[int, int]] | None = None
        # Per sequence, its live blocks ascending (array, length), kept up to date by find_slot;
        # sequences in _lists_stale are rebuilt from seq_blocks when next needed.
        self._lists = [(np.empty(64, np.int32), 0) for _ in range(n_seq_max)]
        self._lists_stale = set(range(n_seq_max))
        self.head = [0] * self.n_stream
        self.used = [0] * self.n_stream  # used_max_p1 per stream
        self._tail = np.full(n_seq_max, -1, np.int64)  # per sequence: its last cell placed + 1
        self._dev_pos = to_device(self.pos)
        self._dev_bits = to_device(self.bits)
        self._dirty: list[np.ndarray] = []
        self._full_upload = False
        self._write_slice: slice | None = None  # the ubatch's cells when they are one run
        self._write_cells = mx.zeros((0,), mx.int32)
        self._write_decode = False
        self._staging: Staging | None = None  # made on the first decode step
        self.window_floor = 0  # decode windows at least this many cells (see rehearsal)

    # --- bookkeeping (llama_kv_cache / llama_kv_cells) ---------------------------------
    def _streams(self, seq_ids: np.ndarray) -> list[int]:
        """The streams of a ubatch's sequences, ascending; checks the ids (as stream_of)."""
        if not len(seq_ids):
            return []
        lo, hi = int(seq_ids.min()), int(seq_ids.max())
        if lo < 0 or hi >= self.n_seq_max:
            self.stream_of(lo if lo < 0 else hi)  # raises with the message
        return [0] if self.unified else sorted(set(seq_ids.tolist()))

    def stream_of(self, seq: int) -> int:
        if not 0 <= seq < self.n_seq_max:
            raise ValueError(f"sequence id {seq} out of range 0..{self.n_seq_max - 1}")
        return 0 if self.unified else seq

    def clear(self) -> None:
        """Metadata only, like llama_memory_clear(mem, false): buffers keep old data."""
        self.pos[:] = -1
        self.bits[:] = 0
        self.seq_blocks[:] = False
        self._lists_stale = set(range(self.n_seq_max))
        self._appends = None
        self.head = [0] * self.n_stream
        self.used = [0] * self.n_stream
        self._tail[:] = -1
        self._full_upload = True
        self._dirty.clear()

    def seq_cells(self, seq: int) -> np.ndarray:
        w, b = divmod(seq, 32)
        return np.flatnonzero((self.bits[w] >> np.uint32(b)) & 1)

    def find_slot(self, seq_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Place tokens in empty cells, scanning each stream from its head (cells fill in order),
        as llama.cpp does; with own_blocks, a decode ubatch's tokens go to their sequences' own
        32-cell blocks instead (_own_block_cells)."""
        if self.own_blocks and self._streams(seq_ids) and np.bincount(seq_ids).max() <= DECODE_MAX_PER_SEQ:
            return self._place(seq_ids, positions, self._own_block_cells(seq_ids))
        cells = np.empty(len(seq_ids), np.int64)
        for st in self._streams(seq_ids):
            rows = np.arange(len(seq_ids)) if self.unified else np.flatnonzero(seq_ids == st)
            base = st * self.kv_size
            need = len(rows)
            h = self.head[st]
            seg = self.pos[base : base + self.kv_size]
            if h + need <= self.kv_size and (seg[h : h + need] < 0).all():
                free = np.arange(h, h + need)
            else:
                empty = np.flatnonzero(seg < 0)
                if len(empty) < need:
                    raise ValueError(
                        f"KV cache full: need {need} cells, {len(empty)} free of {self.kv_size}"
                    )
                order = np.concatenate([empty[empty >= h], empty[empty < h]])
                free = order[:need]
            cells[rows] = base + free
            self.head[st] = int((free[-1] + 1) % self.kv_size)
            self.used[st] = max(self.used[st], int(free.max()) + 1)
        return self._place(seq_ids, positions, cells)

    def _own_block_cells(self, seq_ids: np.ndarray) -> np.ndarray:
        """Unified cache, decode ubatch: each token goes to the cell after its sequence's last
        one while that stays inside the block and is empty, else to the start of the first
        all-empty block from the head on, else (no such block) to the first empty cell."""
        cells = np.empty(len(seq_ids), np.int64)
        taken: set[int] = set()
        empty_blocks: list[int] | None = None
        tail = {int(sq): int(self._tail[sq]) for sq in np.unique(seq_ids)}
        for i, sq in enumerate(seq_ids.tolist()):
            c = tail[sq]
            if not (c > 0 and c % BLOCK and c < self.kv_size and self.pos[c] < 0 and c not in taken):
                if empty_blocks is None:
                    h = self.head[0] // BLOCK * BLOCK
                    full = self.kv_size // BLOCK * BLOCK
                    free = (self.pos[:full].reshape(-1, BLOCK) < 0).all(axis=1)
                    order = np.concatenate([np.arange(h // BLOCK, len(free)), np.arange(h // BLOCK)])
                    empty_blocks = [int(b) for b in order[free[order]]][::-1]  # a stack
                if empty_blocks:
                    c = empty_blocks.pop() * BLOCK
                    self.head[0] = (c + BLOCK) % self.kv_size
                else:
                    free_cells = np.flatnonzero(self.pos < 0)
                    free_cells = free_cells[~np.isin(free_cells, list(taken))]
                    if not len(free_cells):
                        raise ValueError(
                            f"KV cache full: need {len(seq_ids)} cells, "
                            f"{int((self.pos < 0).sum())} free of {self.kv_size}")
                    c = int(free_cells[0])
            cells[i] = c
            taken.add(c)
            tail[sq] = c + 1
        self.used[0] = max(self.used[0], int(cells.max()) + 1)
        return cells

    def _place(self, seq_ids: np.ndarray, positions: np.ndarray, cells: np.ndarray) -> np.ndarray:
        """Record the ubatch in the cells find_slot chose (positions, sequence bits, lists)."""
        if self.own_blocks:  # only the own-block placement reads where a sequence ended
            last = np.full(self.n_seq_max, -1, np.int64)
            np.maximum.at(last, seq_ids, cells % self.kv_size + 1)
            self._tail = np.where(last >= 0, last, self._tail)
        self.pos[cells] = positions
        # cells are distinct, so no (word, cell) pair repeats: a plain fancy-index OR is exact
        self.bits[seq_ids // 32, cells] |= (1 << (seq_ids % 32)).astype(np.uint32)
        blk = cells // BLOCK
        new = ~self.seq_blocks[seq_ids, blk]
        if new.any():
            self.seq_blocks[seq_ids, blk] = True
            for sq, b in {(int(a), int(c)) for a, c in zip(seq_ids[new], blk[new])}:
                self._list_add(sq, b)
        self._dirty.append(cells)
        return cells

    def seq_rm(self, seq: int, p0: int = 0, p1: int = -1) -> None:
        """Remove seq (or every seq when seq < 0) from cells with p0 <= pos < p1 (p1 < 0: no end)."""
        hi = np.iinfo(np.int32).max if p1 < 0 else p1
        in_range = (self.pos >= p0) & (self.pos < hi)
        seqs = range(self.n_seq_max) if seq < 0 else [seq]
        touched = np.flatnonzero(in_range)
        for s in seqs:
            w, b = divmod(s, 32)
            self.bits[w, touched] &= ~np.uint32(1 << b)
        empty = touched[(self.bits[:, touched] == 0).all(axis=0)]
        self.pos[empty] = -1
        for s in seqs:
            self._refresh_blocks(s)
        self._dirty.append(touched)

    def seq_cp(self, src: int, dst: int, p0: int = 0, p1: int = -1) -> None:
        """Unified: add dst to src's cells (a shared prompt costs nothing). Split: copy stream data."""
        hi = np.iinfo(np.int32).max if p1 < 0 else p1
        s_src, s_dst = self.stream_of(src), self.stream_of(dst)
        cells = self.seq_cells(src)
        cells = cells[(self.pos[cells] >= p0) & (self.pos[cells] < hi)]
        if s_src == s_dst:
            w, b = divmod(dst, 32)
            self.bits[w, cells] |= np.uint32(1 << b)
            self._refresh_blocks(dst)
            self._dirty.append(cells)
            return
        # Across streams llama.cpp copies the whole stream buffer, then re-tags the cells.
        off = (s_dst - s_src) * self.kv_size
        a, z = s_src * self.kv_size, (s_src + 1) * self.kv_size
        for c in self.layers:
            c.keys[:, :, a + off : z + off] = c.keys[:, :, a:z]
            c.values[:, :, a + off : z + off] = c.values[:, :, a:z]
        mx.eval([(c.keys, c.values) for c in self.layers])
        dcells = cells + off
        self.pos[dcells] = self.pos[cells]
        w, b = divmod(dst, 32)
        self.bits[w, dcells] |= np.uint32(1 << b)
        self.used[s_dst] = max(self.used[s_dst], self.used[s_src])
        self.head[s_dst] = self.head[s_src]
        self._refresh_blocks(dst)
        self._dirty.append(dcells)

    def _refresh_blocks(self, seq: int) -> None:
        self.seq_blocks[seq] = False
        self.seq_blocks[seq, self.seq_cells(seq) // BLOCK] = True
        self._lists_stale.add(seq)
        self._appends = None

    def _list_add(self, seq: int, b: int) -> None:
        if seq in self._lists_stale:
            self._appends = None
            return
        arr, n = self._lists[seq]
        if n == len(arr):
            arr = np.concatenate([arr, np.empty(len(arr), np.int32)])
        if n and arr[n - 1] > b:  # out of order (a freed cell reused): keep the list sorted
            i = int(np.searchsorted(arr[:n], b))
            arr[i + 1 : n + 1] = arr[i:n].copy()
            arr[i] = b
            self._appends = None
        else:
            arr[n] = b
            if self._appends is not None:
                self._appends.append((seq, b))
        self._lists[seq] = (arr, n + 1)

    def _seq_list(self, seq: int) -> np.ndarray:
        """Live blocks of seq, ascending (a view: do not keep)."""
        if seq in self._lists_stale:
            blocks = np.flatnonzero(self.seq_blocks[seq]).astype(np.int32)
            arr = np.empty(max(64, 2 * len(blocks)), np.int32)
            arr[: len(blocks)] = blocks
            self._lists[seq] = (arr, len(blocks))
            self._lists_stale.discard(seq)
        arr, n = self._lists[seq]
        return arr[:n]

    # --- attention window and mask ------------------------------------------------------
    def n_kv(self, stream: int, used: int | None = None) -> int:
        """llama.cpp get_n_kv: used range padded to 256, at least 256, at most kv_size (`used`:
        that many cells in use instead of the stream's own count)."""
        return min(self.kv_size, max(PAD, pad_to(self.used[stream] if used is None else used, PAD)))

    def window_end(self, streams) -> int:
        last = max(streams)
        return last * self.kv_size + self.n_kv(last)

    def decode_windows(self, seq_ids: np.ndarray, steps: int, *, flash: bool, skip: bool) -> list[int]:
        """The distinct decode windows (cells) of the next `steps` decode steps of one token for
        each sequence in seq_ids, ascending: each step appends to its streams' used range, as
        find_slot does on a cache filled from empty. (Own-block placement may go further.)"""
        seq_ids = np.asarray(seq_ids, np.int64)
        last = max(self._streams(seq_ids))
        per_step = len(seq_ids) if self.unified else int((seq_ids == last).sum())
        return sorted({self._decode_window(last * self.kv_size + self.n_kv(last, self.used[last] + i * per_step),
                                           flash, skip)
                       for i in range(1, steps + 1)})

    def _decode_window(self, n: int, flash: bool, skip: bool) -> int:
        """The cells a decode step's attention spans for window end n. Steady shapes (see
        SKIP_WINDOW_PAD): with skipping, the GPU kernels pay nothing for masked cells; without
        (or on the pure-MLX twin) they cost little."""
        if flash and skip and skipped_cells_are_free():
            return self.n_cells
        return min(pad_to(max(n, self.window_floor), SKIP_WINDOW_PAD), self.n_cells)

    @contextmanager
    def rehearsal(self, p0: int, window: int):
        """Decode steps inside it leave the cache as they found it (their cells, from position p0
        on, removed; the allocation head, used ranges and sequence tails restored), with decode
        windows of at least `window` cells: the bench runs one untimed step per window shape of
        a TG phase so that a compiled decode step is traced before the timing, not inside it."""
        head, used, tail = list(self.head), list(self.used), self._tail.copy()
        self.window_floor = window
        try:
            yield
        finally:
            self.window_floor = 0
            self.seq_rm(-1, p0)
            self.head, self.used, self._tail = head, used, tail

    def _sync_device(self) -> None:
        """Bring the device mirror of the cell metadata up to date (see `_upload_step` for a
        decode step's cells)."""
        if self._full_upload:  # the mirror lives in device memory: every decode step reads it
            self._dev_pos = to_device(self.pos)
            self._dev_bits = to_device(self.bits)
        else:
            self._send_changes(self._mirror_changes())
        self._full_upload = False
        self._dirty.clear()

    def _send_changes(self, changed: tuple[int, int] | np.ndarray | None) -> None:
        """Copy changed cells' metadata from host arrays into the mirror (_mirror_changes)."""
        if isinstance(changed, tuple):
            a, b = changed  # one run of cells (widened to >= 4): a slice update
            self._dev_pos[a:b] = mx.array(self.pos[a:b])
            self._dev_bits[:, a:b] = mx.array(self.bits[:, a:b])
        elif changed is not None:
            ix = mx.array(changed.astype(np.int32))
            self._dev_pos[ix] = mx.array(self.pos[changed])
            self._dev_bits[:, ix] = mx.array(self.bits[:, changed])

    def build_mask(self, seq_ids: np.ndarray, positions: np.ndarray, c0: int, c1: int,
                   on_device: tuple[mx.array, mx.array] | None = None) -> mx.array:
        """KQ mask rows for tokens (seq, pos) over cells [c0, c1): 0 where visible, -inf elsewhere.

        Rules as llama.cpp's set_input_kq_mask: empty cell, other sequence, future position and
        SWA all hide a cell. Built on the device from the mirrored metadata; `on_device` passes
        seq_ids and positions already there (int32), e.g. from a decode step's upload.
        """
        self._sync_device()
        seq, p1 = on_device if on_device is not None else (device_int32(seq_ids), device_int32(positions))
        if c0 == 0 and self.swa is None:  # decode windows: one kernel on CUDA
            return decode_mask(self._dev_bits, self._dev_pos[:c1], seq, p1, self.dtype)
        p0 = self._dev_pos[c0:c1]
        vis = visible(self._dev_bits[:, c0:c1], p0, seq, p1)
        if self.swa is not None:
            vis = vis & ~self.swa.masked(p0[None, :], p1[:, None])
        return additive(vis, self.dtype)

    def _live_rows(self, seq_ids: np.ndarray, n: int) -> np.ndarray:
        """int32 [T, 1 + W]: per row its count of live 32-cell blocks (those holding a cell of
        its sequence), then their indices ascending, then -1. W is every block of the window,
        so the shape depends only on T and n."""
        nb = pad_to(n, BLOCK) // BLOCK
        rows = np.full((len(seq_ids), 1 + nb), -1, np.int32)
        for t, sq in enumerate(seq_ids):
            lst = self._seq_list(int(sq))
            if len(lst) and lst[-1] >= nb:
                lst = lst[: np.searchsorted(lst, nb)]
            rows[t, 0] = len(lst)
            rows[t, 1 : 1 + len(lst)] = lst
        return rows

    def live_blocks(self, seq_ids: np.ndarray, n: int) -> tuple[mx.array, mx.array]:
        """(blocks [T, W], counts [T]): row t may see only blocks[t, :counts[t]]."""
        rows = self._live_rows(seq_ids, n)
        return mx.array(rows[:, 1:]), mx.array(rows[:, 0])

    def packed_live_blocks(self, seq_ids: np.ndarray, n: int) -> PackedLive:
        """The same lists in the kernel's row layout, uploaded as they are now (a decode plan keeps
        its rows on the device and updates them incrementally, see `_live_parts`)."""
        return PackedLive(mx.array(self._live_rows(seq_ids, n)))

    def _live_parts(self, seq_ids: np.ndarray, n: int) -> dict[str, np.ndarray]:
        """What this step uploads of the live rows: all of them ("live"), or, when the same rows
        only gained blocks at their ends, the flat indices and values to scatter into the last
        plan's ("live_ix", "live_val"; at B=32 every step adds a block to every row, and the
        rows of a 140k-cell window are 560 KB), or nothing when they did not change."""
        key = (seq_ids.tobytes(), n)
        lc = self._live_cache
        if lc is None or lc[0] != key or self._appends is None:
            rows = self._live_rows(seq_ids, n)
            self._live_cache = (key, None, rows[:, 0].copy())
            self._appends = []
            return {"live": rows}
        if not self._appends:
            return {}
        nb = pad_to(n, BLOCK) // BLOCK
        width = 1 + nb
        counts = lc[2]
        ix, val = [], []
        for sq, b in self._appends:
            if b >= nb:
                continue  # outside the window, as in _live_rows
            for t in np.flatnonzero(seq_ids == sq):
                counts[t] += 1
                ix.append(t * width + counts[t])
                val.append(b)
        self._appends = []
        rows_t = sorted({i // width for i in ix})
        ix += [t * width for t in rows_t]
        val += [int(counts[t]) for t in rows_t]
        return {"live_ix": np.array(ix, np.int32), "live_val": np.array(val, np.int32)} if ix else {}

    # --- one ubatch -----------------------------------------------------------------------
    def prepare(
        self,
        seq_ids: np.ndarray,
        positions: np.ndarray,
        out_rows: np.ndarray | None,
        *,
        flash: bool = True,
        skip: bool = True,
        decode_max_per_seq: int = DECODE_MAX_PER_SEQ,
        tokens: np.ndarray | None = None,
    ) -> AttentionPlan:
        """Place a ubatch in the cache and build its attention plan (one per ubatch, all layers).
        With `tokens`, a decode plan carries them as a device array too (plan.tokens)."""
        seq_ids = np.asarray(seq_ids, np.int64)
        positions = np.asarray(positions, np.int64)
        cells = self.find_slot(seq_ids, positions)
        one_run = len(cells) and (np.diff(cells) == 1).all()
        self._write_slice = slice(int(cells[0]), int(cells[-1]) + 1) if one_run else None
        n = self.window_end(self._streams(seq_ids))
        decode = bool(np.bincount(seq_ids).max() <= decode_max_per_seq)
        out_rows = None if out_rows is None else np.asarray(out_rows, np.int32)
        self._write_decode = decode and flash  # the flash decode path: the attention kernel
        if decode:
            n = self._decode_window(n, flash, skip)
            live = self._live_parts(seq_ids, n) if flash and skip else {}
            dev = self._upload_step(dict(positions=positions, cells=cells, seq=seq_ids, tokens=tokens,
                                         out_rows=out_rows, **live))
            if live:
                key, rows, counts = self._live_cache
                if "live" in dev:
                    rows = dev["live"]
                else:  # scattered into a copy in device memory (in place when MLX can donate)
                    flat = rows.reshape(-1)
                    flat[dev["live_ix"]] = dev["live_val"]
                    rows = flat.reshape(rows.shape)
                self._live_cache = (key, rows, counts)
            self._write_cells = dev["cells"]
            plan = AttentionPlan(positions=dev["positions"], decode=True, flash=flash, skip=skip,
                                 out_rows=dev.get("out_rows"), cells=dev["cells"], tokens=dev.get("tokens"))
            plan.mask = self.build_mask(seq_ids, positions, 0, n, on_device=(dev["seq"], dev["positions"]))
            if flash and skip:
                plan.live_blocks = PackedLive(self._live_cache[1])
            return plan
        self._write_cells = device_int32(cells)
        plan = AttentionPlan(positions=device_int32(positions), decode=False, flash=flash, skip=skip,
                             out_rows=None if out_rows is None else mx.array(out_rows))
        plan.groups = self._prefill_groups(seq_ids, positions, n, restrict=flash and skip)
        return plan

    def _upload_step(self, parts: dict[str, np.ndarray | None]) -> dict[str, mx.array]:
        """A decode step's host data as int32 device arrays, from one upload. MLX puts every
        array made from host data in CUDA managed memory, and kernels reading those were slow
        (below). The parts (and this step's run of cells for the metadata mirror) are packed
        into one array, copied to device memory, and handed out as slices of the copy. None
        parts are left out; 2-D parts keep their shape."""
        mirror = self._mirror_changes()
        if isinstance(mirror, np.ndarray) and len(mirror) > MIRROR_SCATTER_MAX:
            self._send_changes(mirror)  # too many to pack: a second upload
            mirror = None
        if mirror is None:
            self._sync_device()
        else:
            if isinstance(mirror, tuple):
                mirror = slice(*mirror)
            else:  # scattered cells (e.g. --own-blocks): their indices travel in the same copy
                parts["mirror_ix"] = mirror
            parts["mirror_pos"] = self.pos[mirror]
            parts["mirror_bits"] = self.bits[:, mirror].view(np.int32)
        parts = {k: np.asarray(v) for k, v in parts.items() if v is not None}
        total = sum(v.size for v in parts.values())
        host = np.zeros(max(4, total), np.int32)  # the copy's output > 8 bytes (see to_device)
        o, spans = 0, {}
        for k, v in parts.items():
            host[o : o + v.size] = v.ravel()
            spans[k] = (o, v.size, v.shape)
            o += v.size
        if self._staging is None:
            self._staging = Staging()
        dev = self._staging.put(host)
        out = {k: dev[o : o + n] if len(shape) == 1 else dev[o : o + n].reshape(shape)
               for k, (o, n, shape) in spans.items()}
        if mirror is not None:
            where = out.pop("mirror_ix") if "mirror_ix" in out else mirror
            self._dev_pos[where] = out.pop("mirror_pos")
            self._dev_bits[:, where] = mx.view(out.pop("mirror_bits"), mx.uint32)
        return out

    def _mirror_changes(self) -> tuple[int, int] | np.ndarray | None:
        """The metadata changes since the last upload, taken as sent: (a, b) when they lie in
        one run of cells (a decode step's cells under llama.cpp's placement), widened to >= 4
        cells; else the changed cells ascending (own-block placement puts a step's tokens in B
        places); None when nothing changed or a full upload is due."""
        if self._full_upload or not self._dirty:
            return None
        idx = np.unique(np.concatenate(self._dirty))
        self._dirty.clear()
        if not len(idx):
            return None
        if idx[-1] - idx[0] + 1 == len(idx):
            a = int(idx[0])
            b = min(self.n_cells, max(int(idx[-1]) + 1, a + 4))
            return max(0, min(a, b - 4)), b
        return idx

    def _prefill_groups(self, seq_ids, positions, n, restrict: bool) -> list[Group]:
        if not restrict:
            # Walk every cell of the window, as llama.cpp's kernels without skipping do.
            return [Group(0, len(seq_ids), 0, n, self.build_mask(seq_ids, positions, 0, n)[None, None])]
        groups = []
        bounds = np.flatnonzero(np.diff(seq_ids)) + 1
        for r0, r1 in zip(np.r_[0, bounds], np.r_[bounds, len(seq_ids)]):
            s = int(seq_ids[r0])
            cells = self.seq_cells(s)
            cells = cells[cells < n]
            c0, c1 = int(cells.min()), int(cells.max()) + 1
            groups.append(Group(int(r0), int(r1), c0, c1, self._group_mask(s, positions[r0:r1], cells, c0, c1)))
        return groups

    def _group_mask(self, seq: int, rows_pos: np.ndarray, cells: np.ndarray, c0: int, c1: int):
        # A sequence owning a contiguous, in-order run of cells and queried at its newest
        # positions is plain causal attention: let SDPA take its fused causal path.
        p = self.pos[c0:c1]
        contiguous = len(cells) == c1 - c0 and (np.diff(p) == 1).all()
        newest = contiguous and (rows_pos == p[len(p) - len(rows_pos) :]).all()
        if newest and self.swa is None:
            return "causal"
        seqs = np.full(len(rows_pos), seq)
        return self.build_mask(seqs, rows_pos, c0, c1)[None, None]
