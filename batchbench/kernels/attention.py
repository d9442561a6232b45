"""Decode attention over a unified KV cache that skips fully masked 32-cell blocks.

`decode_attention` dispatches once per call on `backend.BACKEND`: the CUDA kernel
(`mx.fast.cuda_kernel`), the Metal kernel (`mx.fast.metal_kernel`) or the pure-MLX twin
`decode_attention_ref`, which is also the oracle of the tests. Both kernels are one
algorithm (attention_common.h) over a thin per-backend layer (attention_cuda.h,
attention_metal.h); `plan_decode_attention` returns exactly what MLX compiles and launches,
so the CPU verification harness can compile and emulate the same source.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from pathlib import Path
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import mlx.core as mx

from batchbench import ON_OFF, backend, env_choice, env_number
from batchbench.kernels import spec
from batchbench.kernels.spec import KernelSpec, Launch

BLOCK = 32  # KV cells per skippable block
MAX_SPLIT = 64  # attention_common.h: BB_MAX_SPLIT
LIST_CAP = 256  # attention_common.h: BB_LIST_CAP
MASK_STAGE_BYTES = 128  # attention_common.h: BB_MASK_STAGE
HEADS_PER_TILE = 16  # query heads of one GQA group in one mma tile

# (warps per block, pipeline stages) per back-end. Metal has 32 KB of threadgroup memory.
CONFIG = {"cuda": (4, 2), "metal": (1, 1)}


def _config(backend_name: str) -> tuple[int, int]:
    """CONFIG, or BB_ATTN_WARPS / BB_ATTN_STAGES from the environment (tuning runs)."""
    warps, stages = CONFIG[backend_name]
    return env_number("BB_ATTN_WARPS", warps), env_number("BB_ATTN_STAGES", stages)


LiveBlocks = Tuple[mx.array, mx.array]


@dataclass(frozen=True)
class PackedLive:
    """live_blocks already in the kernel's row layout, int32 [T, 1 + L] with L + 1 >= 8:
    row t is [count, block ids ascending..., -1 padding]. A cache that builds this once per
    step spares every layer the packing op."""

    rows: mx.array

    def unpack(self) -> LiveBlocks:
        return self.rows[:, 1:], self.rows[:, 0]

_DIR = Path(__file__).parent
_FLOATS = (mx.float16, mx.bfloat16, mx.float32)

_CUDA_BODY = """
  extern __shared__ __align__(16) unsigned char bb_smem[];
  bb_attn_decode<T, MT, D, G, W, STAGES, SKIP, LIVE, MG>(
      q, k, v, mask, live, const_cast<int*>(reinterpret_cast<const int*>(counters)), out, const_cast<float*>(ws),
      q_shape[2], k_shape[1], k_shape[2], mask_shape[1], live_shape[1],
      __int_as_float(SCALE_BITS), (int)blockIdx.x, (int)blockIdx.y, (int)gridDim.y,
      (int)blockIdx.z, (int)(threadIdx.x & 31), (int)(threadIdx.x >> 5), bb_smem);
"""

_METAL_BODY = """
  threadgroup uint4 bb_smem[(bb_attn_smem_bytes<D, W, STAGES, sizeof(T), (G < 16 ? G : 16)>() + 15) / 16];
  bb_attn_decode<T, MT, D, G, W, STAGES, SKIP, LIVE, MG>(
      q, k, v, mask, live, (device int*)counters, out, (device float*)ws,
      q_shape[2], k_shape[1], k_shape[2], mask_shape[1], live_shape[1],
      as_type<float>(SCALE_BITS), (int)threadgroup_position_in_grid.x,
      (int)threadgroup_position_in_grid.y, (int)threadgroups_per_grid.y,
      (int)threadgroup_position_in_grid.z, (int)thread_index_in_simdgroup,
      (int)simdgroup_index_in_threadgroup, (threadgroup unsigned char*)bb_smem);
"""


@functools.lru_cache(maxsize=None)
def kernel_source(backend_name: str) -> tuple[str, str]:
    """(header, body) of the kernel for "cuda" or "metal", as handed to MLX (compacted)."""
    layer = {"cuda": "attention_cuda.h", "metal": "attention_metal.h"}[backend_name]
    header = (_DIR / layer).read_text() + "\n" + (_DIR / "attention_common.h").read_text()
    body = _CUDA_BODY if backend_name == "cuda" else _METAL_BODY
    return spec.compact(header), body


def record_bytes(gh: int, d: int, esize: int) -> int:
    """A split's partial record in ws (bb_attn_rec_bytes): O [GH][D] in the activation dtype
    (esize bytes; fp32 with BB_ATTN_REC32=1), then (max, sum) [GH][2] fp32 padded to 16 bytes."""
    rsize = 4 if REC32 else esize
    return gh * d * rsize + (2 * gh + 3) // 4 * 16


def records_floats(blocks: int, n_split: int, gh: int, d: int, esize: int) -> int:
    """Floats of ws the splits' records take (none with one split: nothing to merge); a timeline
    build's stamps follow them (bb_attn_decode's tl_records)."""
    return blocks * record_bytes(gh, d, esize) // 4 if n_split > 1 else 0


def smem_bytes(d: int, warps: int, stages: int, esize: int, gh: int) -> int:
    """Mirror of bb_attn_smem_bytes in attention_common.h: the pipeline tiles, block lists,
    mask stages and Q tile, or the merge header and one split record if larger."""
    pitch = d if d % 64 == 0 else d + 8  # bb_attn_pitch: swizzled rows, else padded
    pipeline = (warps * stages * 2 * BLOCK * pitch * esize + warps * LIST_CAP * 4 + warps * stages * MASK_STAGE_BYTES
                + 16 * pitch * esize)  # the Q tile
    merge = 4 * MAX_SPLIT * 16 + 16  # fac_s, flag_s (the warps' slices live in their own tiles)
    return max(pipeline, merge + record_bytes(gh, d, esize))


# ---------------------------------------------------------------------------------------
# Checks


def _check(q, k, v, mask, live_blocks) -> None:
    if q.ndim != 4 or q.shape[0] != 1:
        raise ValueError(f"decode_attention: q must be [1, Hq, T, D], got {tuple(q.shape)}")
    if k.ndim != 4 or k.shape[0] != 1 or tuple(k.shape) != tuple(v.shape):
        raise ValueError(
            f"decode_attention: k and v must be [1, Hkv, S, D] and equal, "
            f"got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    _, hq, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    if k.shape[3] != d:
        raise ValueError(f"decode_attention: head dim of q ({d}) and k/v ({k.shape[3]}) differ")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"decode_attention: Hq={hq} is not a multiple of Hkv={hkv}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _FLOATS:
        raise ValueError(
            f"decode_attention: q, k, v must share one float dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if mask.ndim != 2 or mask.shape[0] != t:
        raise ValueError(f"decode_attention: mask must be [T={t}, N], got {tuple(mask.shape)}")
    if mask.shape[1] > s:
        raise ValueError(f"decode_attention: mask covers {mask.shape[1]} cells, K/V hold only {s}")
    if mask.dtype != mx.bool_ and mask.dtype not in _FLOATS:
        raise ValueError(f"decode_attention: mask must be bool or float, got {mask.dtype}")
    if isinstance(live_blocks, PackedLive):
        rows = live_blocks.rows
        if rows.ndim != 2 or rows.shape[0] != t or rows.shape[1] < _MIN_ELEMS or rows.dtype != mx.int32:
            raise ValueError(
                f"decode_attention: packed live blocks must be int32 [T={t}, >= {_MIN_ELEMS}], "
                f"got {rows.dtype} {tuple(rows.shape)}"
            )
    elif live_blocks is not None:
        if not isinstance(live_blocks, (tuple, list)) or len(live_blocks) != 2:
            raise ValueError("decode_attention: live_blocks must be a tuple (blocks, counts)")
        blocks, counts = live_blocks
        if blocks.ndim != 2 or blocks.shape[0] != t or tuple(counts.shape) != (t,):
            raise ValueError(
                f"decode_attention: live_blocks must be ([T={t}, L], [T={t}]), "
                f"got {tuple(blocks.shape)} and {tuple(counts.shape)}"
            )
        if not (mx.issubdtype(blocks.dtype, mx.integer) and mx.issubdtype(counts.dtype, mx.integer)):
            raise ValueError("decode_attention: live_blocks must hold integers (int32)")


# ---------------------------------------------------------------------------------------
# Pure-MLX twin (CPU, any other back-end, and the oracle)


def _allowed_blocks(live_blocks: LiveBlocks, t: int, n_blk: int) -> mx.array:
    """[T, n_blk] bool: blocks listed for each row (the kernel reads nothing else)."""
    blocks, counts = live_blocks.unpack() if isinstance(live_blocks, PackedLive) else live_blocks
    blocks = blocks.astype(mx.int32)
    n_list = blocks.shape[1]
    valid = mx.arange(n_list)[None, :] < counts.astype(mx.int32)[:, None]
    valid = valid & (blocks >= 0) & (blocks < n_blk)
    idx = mx.where(valid, blocks, n_blk)  # unlisted entries land in a spare column
    allowed = mx.put_along_axis(
        mx.zeros((t, n_blk + 1), dtype=mx.bool_), idx, mx.array(True), axis=1
    )
    return allowed[:, :n_blk]


def decode_attention_ref(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    *,
    scale: float,
    mask: mx.array,
    skip: bool = True,
    live_blocks: Optional[Union[LiveBlocks, PackedLive]] = None,
) -> mx.array:
    """Same contract as `decode_attention`, in MLX ops (fp32 math)."""
    _check(q, k, v, mask, live_blocks)
    _, hq, t, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    n = mask.shape[1]
    if n == 0:
        return mx.zeros(q.shape, dtype=q.dtype)
    kf = k[0, :, :n].astype(mx.float32)  # [Hkv, N, D]
    vf = v[0, :, :n].astype(mx.float32)
    qf = q[0].astype(mx.float32).reshape(hkv, g * t, d)
    scores = (qf @ kf.transpose(0, 2, 1)) * scale  # [Hkv, G*T, N]
    scores = scores.reshape(hkv, g, t, n)
    if mask.dtype == mx.bool_:
        visible = mask
        scores = mx.where(visible, scores, -math.inf)
    else:
        scores = scores + mask.astype(mx.float32)
    if skip and live_blocks is not None:
        n_blk = -(-n // BLOCK)
        allowed = mx.repeat(_allowed_blocks(live_blocks, t, n_blk), BLOCK, axis=1)[:, :n]
        scores = mx.where(allowed, scores, -math.inf)
    # A row that sees nothing gets reference 0 and sum 0, hence output 0 (not NaN, not mean(V)).
    top = scores.max(axis=-1, keepdims=True)
    top = mx.where(top == -math.inf, 0.0, top)
    p = mx.exp(scores - top)
    total = p.sum(axis=-1, keepdims=True)
    o = (p.reshape(hkv, g * t, n) @ vf).reshape(hkv, g, t, d)
    o = mx.where(total > 0, o / mx.maximum(total, 1e-30), 0.0)
    return o.reshape(1, hq, t, d).astype(q.dtype)


# ---------------------------------------------------------------------------------------
# Kernel plans


def _n_sms() -> int:
    """Thread blocks that fit the GPU in one wave (one block per SM at our shared memory)."""
    if os.environ.get("BB_ATTN_SMS"):
        return max(1, env_number("BB_ATTN_SMS", 1))
    return 132 if backend.BACKEND != "metal" else 32


# Thread blocks per launch, in waves of one block per SM (BB_ATTN_WAVE, tuning runs).
WAVE = env_number("BB_ATTN_WAVE", 1.0, float)
# Fewest 32-cell blocks of the window per split (BB_ATTN_MIN_BLOCKS, tuning runs). A split
# pays a fixed prologue (live list, first copies) and a share of the merge; below a few
# blocks each, more splits cost more than the SMs they add (H200, B=1: 4096 cells on 33
# splits 12.1 us, on 17 splits 10.0 us). Only a short window (one sequence) is affected:
# the window holds every sequence's cells, so at B >= 2 it is B times a row's list.
MIN_BLOCKS = env_number("BB_ATTN_MIN_BLOCKS", 8)
# 1: a whole block's 32 mask values ride in its K/V pipeline stage; 0: the walk loads them
# from global memory per block, as before (A/B runs).
MASK_STAGE = env_number("BB_ATTN_MASK_STAGE", 1)
# 1: split records hold O in fp32, not divided by the split's sum (the kernel before the
# thirty-second session, A/B runs); 0: O / sum in the activation dtype, half the bytes the last
# split reads.
REC32 = env_choice("BB_ATTN_REC32", "0", ON_OFF) == "1"
# The split records' merge, spread over up to this many of the last splits to arrive (CUDA): each
# merges one part of the output and the ones before the last wait for the count. 1: the last
# split alone (the kernel before the thirty-seventh session, A/B runs). Metal has 1: a
# threadgroup there may not wait for another.
MERGERS = int(env_choice("BB_ATTN_MERGERS", "4", ("1", "2", "4")))


def merge_parts(backend_name: str, n_split: int) -> int:
    """The kernel's MG: how many of the last splits merge, one part each. At most n_split, and
    1, 2 or 4, which split a record's items (GH * D / 4, a multiple of 8) into whole 16-byte
    chunks; a template argument, so the parts' sizes are compile-time constants."""
    if backend_name != "cuda":
        return 1
    return max(m for m in (1, 2, 4) if m <= min(MERGERS, n_split))


def choose_splits(pairs: int, n_blk: int, warps: int, d: int = 128) -> int:
    """Splits of the KV axis so that pairs * splits fills about one wave, with at least
    MIN_BLOCKS of the window's n_blk blocks per split. The last split stages every split's
    softmax sums in the W*16*D floats of its output tile: <= W*D. Depends on shapes only
    (n_blk is the mask's width), so compiled decode steps keep one grid."""
    splits = max(1, round(_n_sms() * WAVE / max(pairs, 1)))
    splits = min(splits, MAX_SPLIT, max(1, n_blk // max(MIN_BLOCKS, 1)), warps * d)
    return splits


# Small per-call arrays: MLX keeps arrays of <= 8 bytes in managed memory, which is slow to
# read from a kernel (and a Metal input under 8 elements changes address space), so every
# int array passed here has at least 8 elements.
_MIN_ELEMS = 8


@functools.lru_cache(maxsize=None)
def _dummy_live() -> mx.array:
    a = mx.zeros((1, _MIN_ELEMS), dtype=mx.int32)
    mx.eval(a)
    return a


_COUNTER_POOL = 16
_pools: dict[tuple, list] = {}


def _pooled(n: int, dtype) -> mx.array:
    """A zeroed buffer of >= n elements from a pool of _COUNTER_POOL per power-of-two size.

    Kernels that run concurrently must not share one, so calls rotate over the pool (MLX may
    overlap independent launches; a chain of dependent layers never overlaps)."""
    size = max(64, 1 << (max(n, 1) - 1).bit_length())
    entry = _pools.get((dtype, size))
    if entry is None:
        arrays = [mx.zeros((size,), dtype=dtype) for _ in range(_COUNTER_POOL)]
        mx.eval(arrays)
        entry = _pools[(dtype, size)] = [arrays, 0]
    arrays, i = entry
    entry[1] = (i + 1) % _COUNTER_POOL
    return arrays[i]


def _counter_array(n: int) -> mx.array:
    """>= n split counters; the kernel leaves each count (low 16 bits) at zero again (the bits
    above move on every launch)."""
    return _pooled(n, mx.int32)


def _workspace(n: int) -> mx.array:
    """>= n floats for the splits' partial records (and a timeline build's stamps). An input the
    kernel writes, like the counters, not a second output: each output of a custom op costs MLX's
    host 1.3-6.9 us a launch more (H200, results/h200-2026-12-01-s39, call13)."""
    return _pooled(n, mx.float32)


_live_memo: list = [None, None, None]  # (blocks, counts, packed): layers reuse one packing


def pack_live_blocks(live_blocks: LiveBlocks) -> mx.array:
    """(blocks [T, L], counts [T]) -> int32 [T, 1 + L'] rows [count, b0, b1, ..., -1 pad]."""
    if isinstance(live_blocks, PackedLive):
        return live_blocks.rows
    blocks, counts = live_blocks
    if _live_memo[0] is blocks and _live_memo[1] is counts:
        return _live_memo[2]
    t, n_list = blocks.shape
    width = max(1 + n_list, _MIN_ELEMS)
    parts = [counts.astype(mx.int32).reshape(t, 1), blocks.astype(mx.int32)]
    if width > 1 + n_list:
        parts.append(mx.full((t, width - 1 - n_list), -1, dtype=mx.int32))
    packed = mx.concatenate(parts, axis=1)
    _live_memo[:] = [blocks, counts, packed]
    return packed


@functools.lru_cache(maxsize=None)
def _source_tag(backend_name: str) -> str:
    header, body = kernel_source(backend_name)
    return hashlib.sha1((header + body).encode()).hexdigest()[:10]


def dtype_and_dim_supported(dtype, d: int) -> bool:
    """Activation dtype and head dimension the GPU kernels take."""
    return dtype in (mx.float16, mx.bfloat16) and d % 32 == 0 and d <= 128


def kernel_supported(backend_name: str, q: mx.array, mask: mx.array) -> bool:
    """Shapes and dtypes the GPU kernels take; anything else runs on the twin."""
    if not dtype_and_dim_supported(q.dtype, q.shape[3]):
        return False
    if mask.shape[1] == 0:
        return False
    if backend_name == "metal" and mask.size < _MIN_ELEMS:
        return False
    return True


def plan_decode_attention(
    backend_name: str,
    q: mx.array,
    k: mx.array,
    v: mx.array,
    mask: mx.array,
    *,
    scale: float,
    skip: bool = True,
    live_blocks: Optional[Union[LiveBlocks, PackedLive]] = None,
    timeline: bool = False,
) -> tuple[KernelSpec, Launch]:
    """The kernel and launch `decode_attention` runs on `backend_name` ("cuda" | "metal").
    timeline (CUDA, diagnostics): a build that also writes per-block phase timestamps after
    the split records in its workspace (the input `ws`); `read_timeline` decodes them."""
    if backend_name not in CONFIG:
        raise ValueError(f"no decode attention kernel for back-end {backend_name!r}")
    _check(q, k, v, mask, live_blocks)
    if not kernel_supported(backend_name, q, mask):
        raise ValueError(
            f"decode_attention kernel: needs fp16/bf16 and head dim 32..128 (multiple of 32), "
            f"got {q.dtype}, D={q.shape[3]}"
        )
    warps, stages = _config(backend_name)
    _, hq, t, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    gh = min(g, HEADS_PER_TILE)
    hc = -(-g // HEADS_PER_TILE)
    n_blk = -(-mask.shape[1] // BLOCK)
    use_live = bool(skip) and live_blocks is not None
    live = pack_live_blocks(live_blocks) if use_live else _dummy_live()
    pairs = t * hkv * hc
    n_split = choose_splits(pairs, n_blk, warps, d)
    ws_size = records_floats(pairs * n_split, n_split, gh, d, q.dtype.size)
    smem = smem_bytes(d, warps, stages, q.dtype.size, gh)
    header, body = kernel_source(backend_name)
    if not MASK_STAGE:
        header = "#define BB_NO_MASK_STAGE 1\n" + header
    if REC32:
        header = "#define BB_REC32 1\n" + header
    if timeline:
        if backend_name != "cuda":
            raise ValueError("decode_attention: the timeline build exists for CUDA only")
        ws_size += pairs * n_split * 2 * STAMPS
        header = "#define BB_TIMELINE 1\n" + header
    kspec = KernelSpec(
        backend=backend_name,
        name=f"bb_decode_attn_{_source_tag(backend_name)}_s{smem}{'_tl' if timeline else ''}{'' if MASK_STAGE else '_ms0'}{'_r32' if REC32 else ''}",
        input_names=("q", "k", "v", "mask", "live", "counters", "ws"),
        output_names=("out",),
        source=body,
        header=header,
        ensure_row_contiguous=True,
        shared_memory=smem if backend_name == "cuda" else 0,
    )
    launch = Launch(
        inputs=[q, k, v, mask, live, _counter_array(pairs), _workspace(ws_size)],
        # token-major [1, T, Hq, D]: the o projection reads it as [T, Hq*D] without a copy
        output_shapes=[(1, t, hq, d)],
        output_dtypes=[q.dtype],
        grid=(warps * 32 * hkv * hc, n_split, t),
        threadgroup=(warps * 32, 1, 1),
        template=[
            ("T", q.dtype),
            ("MT", mask.dtype),
            ("D", d),
            ("G", g),
            ("W", warps),
            ("STAGES", stages),
            ("SKIP", bool(skip)),
            ("LIVE", use_live),
            ("MG", merge_parts(backend_name, n_split)),
            ("SCALE_BITS", spec.f32_bits(scale)),
        ],
    )
    return kspec, launch


STAMPS = 13  # attention_common.h: BB_STAMPS
STAMP_PHASES = ("entry", "list filled", "first K/V landed", "walk done", "warps merged", "split counted", "end",
                "merge: copies issued", "merge: weights", "merge: staged", "merge: sums", "live count in")


def read_timeline(ws: mx.array, launch: Launch) -> "np.ndarray":
    """The stamps of a `timeline` build's workspace (its input `ws`, after the launch): uint64
    [blocks, 13], column 0 the SM id, columns 1..12 the global timer (ns) at STAMP_PHASES;
    blocks in (row, kv head, split) order.
    A phase the block never reached reads 0 (column 3 when its warp 0 had no K/V block; column
    6 with one split: no counter; columns 8-11 in every block that merges no part of its pair)."""
    import numpy as np

    n_split = launch.grid[1]
    blocks = n_split * launch.grid[2] * (launch.grid[0] // launch.threadgroup[0])
    tmpl = dict(launch.template)
    start = records_floats(blocks, n_split, min(tmpl["G"], HEADS_PER_TILE), tmpl["D"], tmpl["T"].size)
    words = np.ascontiguousarray(np.array(ws, dtype=np.float32)).view(np.uint32)[start:start + blocks * 2 * STAMPS]
    pairs = words.reshape(blocks, STAMPS, 2).astype(np.uint64)
    return pairs[..., 0] | (pairs[..., 1] << np.uint64(32))


def cuda_kernel_reads_cache(dtype, d: int) -> bool:
    """True when decode attention runs the CUDA kernel for this dtype and head dimension, the
    one reader of the cache that the in-place K/V write is ordered before (rope.qkv_rope_store)."""
    return backend.BACKEND == "cuda" and dtype_and_dim_supported(dtype, d)


def skipped_cells_are_free() -> bool:
    """True where decode_attention runs a GPU kernel, whose cost does not grow with masked
    cells outside the live blocks; the pure-MLX twin's does."""
    return backend.BACKEND in CONFIG


def decode_attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    *,
    scale: float,
    mask: mx.array,
    skip: bool = True,
    live_blocks: Optional[Union[LiveBlocks, PackedLive]] = None,
) -> mx.array:
    """Attention of T decode rows over the first N = mask.shape[-1] cells of K/V.

    q [1, Hq, T, D]; k, v [1, Hkv, S >= N, D] (pass the whole cache buffer: it is not
    copied); mask [T, N] additive 0/-inf or bool (True = attend). live_blocks, optional:
    (blocks int32 [T, L], counts int32 [T]), row t may see only blocks[t, :counts[t]]
    (ascending 32-cell block ids). skip=False processes every block. Returns [1, Hq, T, D]
    in q's dtype; a row that sees no cell gives zeros.
    """
    _check(q, k, v, mask, live_blocks)
    name = backend.BACKEND
    if name in CONFIG and kernel_supported(name, q, mask):
        kspec, launch = plan_decode_attention(
            name, q, k, v, mask, scale=scale, skip=skip, live_blocks=live_blocks
        )
        return spec.run(kspec, launch)[0].transpose(0, 2, 1, 3)
    return decode_attention_ref(q, k, v, scale=scale, mask=mask, skip=skip, live_blocks=live_blocks)
