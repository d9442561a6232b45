"""The benchmark: llama-batched-bench's procedure, one loop, llama.cpp's names and formulas."""

from __future__ import annotations

import contextlib
import gc
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, Iterator

import mlx.core as mx
import numpy as np

from batchbench import ON_OFF, backend, env_choice
from batchbench.decode_step import CompiledDecode
from batchbench.formats import BenchRow
from batchbench.kv_cache import BLOCK, KVCache, pad_to
from batchbench.upload import device_int32
from batchbench.stats import combine_repetitions, llama_row
from batchbench.stats import n_kv_required as n_ctx_req


@dataclass
class BenchParams:
    n_ctx: int  # after rounding, before split-mode scaling
    n_batch: int = 2048
    n_ubatch: int = 512
    npp: list[int] = field(default_factory=list)
    ntg: list[int] = field(default_factory=list)
    npl: list[int] = field(default_factory=list)
    is_pp_shared: bool = False
    is_tg_separate: bool = False
    seed: int = 1
    repetitions: int = 1


@dataclass(frozen=True)
class Mode:
    """How attention runs: what `--ab` alternates between."""

    name: str
    kv_unified: bool = True
    flash: bool = True
    skip: bool = True
    own_blocks: bool = False  # decode tokens in blocks of their own sequence (unified cache)


def context_layout(n_ctx: int, n_seq_max: int, kv_unified: bool) -> tuple[int, int]:
    """(kv_size per stream, n_kv_max) as llama.cpp's context construction computes them."""
    n_ctx = pad_to(n_ctx, 256)
    if kv_unified:
        return n_ctx, n_ctx
    n_ctx_seq = pad_to(n_ctx // n_seq_max, 256)
    return n_ctx_seq, n_ctx_seq * n_seq_max


def f32_time(t_start: float, t_end: float) -> np.float32:
    # llama.cpp: integer microseconds from ggml_time_us(), divided by 1e6 in float32.
    return np.float32(int((t_end - t_start) * 1e6)) / np.float32(1e6)


def make_row(pp: int, tg: int, pl: int, pps: bool, kv_unified: bool, t_pp, t_tg) -> BenchRow:
    return BenchRow(pp=pp, tg=tg, pl=pl, **asdict(llama_row(pp, tg, pl, t_pp, t_tg, pps, kv_unified)))


# BATCHBENCH_PREP_AHEAD=0: prepare each decode step only after the previous one finished (A/B runs).
PREP_AHEAD = env_choice("BATCHBENCH_PREP_AHEAD", "1", ON_OFF) == "1"


class Runner:
    """Feeds batches to the model the way llama_decode does: chunks of n_batch, ubatches of n_ubatch."""

    def __init__(self, model, cache: KVCache, mode: Mode, n_batch: int, n_ubatch: int,
                 compiled: bool | None = None):
        self.model, self.cache, self.mode = model, cache, mode
        self.n_batch, self.n_ubatch = n_batch, min(n_batch, n_ubatch)
        if compiled is None:
            compiled = env_choice("BATCHBENCH_COMPILE_STEP", "1", ON_OFF) == "1"
        self.step = (CompiledDecode(model, cache, backend.DECODE_EVAL_EVERY, backend.DECODE_FIRST_SEGMENT,
                                    sizes=backend.DECODE_SEGMENTS)
                     if compiled else None)
        self.traced: set[tuple[int, int]] = set()  # (tokens, window) of rehearsed decode steps

    def decode(self, tokens, pos, seq, out, sync: bool) -> mx.array | None:
        last = None
        for b0 in range(0, len(tokens), self.n_batch):
            for u0 in range(b0, min(b0 + self.n_batch, len(tokens)), self.n_ubatch):
                u1 = min(u0 + self.n_ubatch, b0 + self.n_batch, len(tokens))
                last = self.submit(*self.prepare(tokens[u0:u1], pos[u0:u1], seq[u0:u1], out[u0:u1]))
                if sync:
                    mx.eval(last)
                else:
                    mx.async_eval(last)
        if sync and last is not None and FULL_SYNC:
            mx.synchronize()
        return last

    def prepare(self, tokens, pos, seq, out):
        """Place one ubatch in the cache and upload its host data: (tokens, plan) for `submit`,
        which must follow before the next `prepare` (the cache's write state is per ubatch)."""
        out_rows = np.flatnonzero(out)
        if len(out_rows) == len(out):
            out_rows = None  # every row has logits: no gather
        elif not len(out_rows):
            out_rows = np.array([len(out) - 1])
        plan = self.cache.prepare(seq, pos, out_rows, flash=self.mode.flash, skip=self.mode.skip,
                                  tokens=tokens)
        # decode: uploaded with the step's other host data (KVCache._upload_step)
        toks = (plan.tokens if plan.tokens is not None else device_int32(tokens))[None]
        return toks, plan

    def submit(self, toks: mx.array, plan) -> mx.array:
        """Queue a prepared ubatch; its logits, not yet evaluated."""
        if self.step is not None and plan.decode:
            return self.step(toks, plan)  # a few compiled segments per step
        if plan.decode:
            plan.eval_every = backend.DECODE_EVAL_EVERY
        return self.model(toks, plan, self.cache)


# A step is waited for as llama_synchronize does: evaluating its logits waits for every kernel
# of the step, since each one is enqueued before the logits' last kernel on the same stream.
# mx.synchronize() on top waits once more, for a host callback MLX enqueues after it: on the
# H200 0.13-0.32 ms per step (results/h200-2026-11-29-s10). BATCHBENCH_FULL_SYNC=1 keeps it (A/B runs).
FULL_SYNC = env_choice("BATCHBENCH_FULL_SYNC", "0", ON_OFF) == "1"


def _sync(x: mx.array | None) -> None:
    if x is not None:
        mx.eval(x)
        if not FULL_SYNC:
            return
    mx.synchronize()


# Python's cyclic garbage collector stays off while a config is timed, as `timeit` does: a
# full collection over the model's and MLX's objects takes milliseconds, and a decode step
# at B <= 4 takes ~3.5 ms. BATCHBENCH_GC=1 keeps it on (A/B runs).
KEEP_GC = env_choice("BATCHBENCH_GC", "0", ON_OFF) == "1"


@contextlib.contextmanager
def _no_gc():
    if KEEP_GC:
        yield
        return
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def run_config(runner: Runner, rng, n_vocab: int, pp: int, tg: int, pl: int, p: BenchParams):
    """One (pp, tg, pl) config; returns (t_pp, t_tg) in llama.cpp's float32 seconds."""
    with _no_gc():
        return _run_config(runner, rng, n_vocab, pp, tg, pl, p)


def _run_config(runner: Runner, rng, n_vocab: int, pp: int, tg: int, pl: int, p: BenchParams):
    cache = runner.cache
    n_seqs = 1 if p.is_pp_shared else pl
    tokens = rng.integers(0, n_vocab, n_seqs * pp)
    pos = np.tile(np.arange(pp), n_seqs)
    seq = np.repeat(np.arange(n_seqs), pp)
    out = np.tile(np.arange(pp) == pp - 1, n_seqs)

    cache.clear()
    t_pp_start = time.perf_counter()
    _sync(runner.decode(tokens, pos, seq, out, sync=False))
    t_pp_end = time.perf_counter()

    if p.is_pp_shared:
        for i in range(1, pl):
            cache.seq_cp(0, i)  # untimed, as in llama.cpp

    rehearse_tg(runner, pp, tg, pl, p.is_tg_separate)
    t_tg_start = time.perf_counter()
    if p.is_tg_separate:
        for j in range(pl):
            for i in range(tg):
                runner.decode(rng.integers(0, n_vocab, 1), np.array([pp + i]), np.array([j]),
                              np.array([True]), sync=True)
    else:
        def batch(i):
            return rng.integers(0, n_vocab, pl), np.full(pl, pp + i), np.arange(pl), np.ones(pl, bool)

        # Each step is waited for, as llama.cpp does. With PREP_AHEAD, the host places the next
        # step in the cache (cells, mask inputs, the upload) while the GPU runs this one, and
        # builds its graph only after the wait. Its positions and cells do not depend on this
        # step's logits; a server would sample on the device and pass the token array on, as
        # mlx-lm does, so knowing the next tokens early is no advantage here.
        if PREP_AHEAD and pl <= runner.n_ubatch:
            nxt = runner.prepare(*batch(0)) if tg else None
            for i in range(tg):
                last = runner.submit(*nxt)
                nxt = runner.prepare(*batch(i + 1)) if i + 1 < tg else None
                _sync(last)
        else:
            for i in range(tg):
                runner.decode(*batch(i), sync=True)
    t_tg_end = time.perf_counter()
    return f32_time(t_pp_start, t_pp_end), f32_time(t_tg_start, t_tg_end)


def rehearse_tg(runner: Runner, pp: int, tg: int, pl: int, tgs: bool) -> None:
    """One untimed decode step for each decode-window shape the TG phase will use that no
    rehearsal has used yet, undone after (KVCache.rehearsal). A compiled decode step is traced
    again for each new window shape (tens of ms on the H200); without skipping, and on the CPU
    twin, the window follows the context (2048-cell steps), so the first config to reach a
    shape paid its trace inside the timed TG phase. Windows of skipping GPU kernels span the
    whole cache: one shape, traced in the warm-up."""
    if runner.step is None or tg == 0:
        return
    cache, mode = runner.cache, runner.mode
    # -tgs decodes one sequence at a time: on the unified cache the phase appends pl * tg cells
    # to its one stream (any sequence stands for all), on split caches tg to each sequence's own
    if not tgs:
        groups, steps = [np.arange(pl)], tg
    elif cache.unified:
        groups, steps = [np.array([0])], tg * pl
    else:
        groups, steps = [np.array([j]) for j in range(pl)], tg
    for ids in groups:
        for window in cache.decode_windows(ids, steps, flash=mode.flash, skip=mode.skip):
            if (len(ids), window) in runner.traced:
                continue
            with cache.rehearsal(pp, window):
                runner.decode(np.zeros(len(ids), np.int64), np.full(len(ids), pp), ids,
                              np.ones(len(ids), bool), sync=True)
            runner.traced.add((len(ids), window))


def warmup(runner: Runner, n_vocab: int, npp: list[int], npl: list[int], tgs: bool, rng) -> None:
    """llama.cpp decodes 16 tokens. We also prefill the longest prompt once (CUDA's attention
    library initialises on first use, ~40 s, and plans each new key length) and run one decode
    step of every batch size in the sweep, and steps that add a block to running rows, so that
    nothing is compiled while timing."""
    cache = runner.cache
    cache.clear()
    n = min(max(max(npp, default=0), runner.n_ubatch), cache.kv_size - max(npl) - 16)
    if n > 16:
        runner.decode(rng.integers(0, n_vocab, n), np.arange(n), np.zeros(n, np.int64),
                      np.zeros(n, bool), sync=True)
        cache.clear()
    runner.decode(rng.integers(0, n_vocab, 16), np.arange(16), np.zeros(16, np.int64),
                  np.zeros(16, bool), sync=True)
    for s in range(1, max(npl)):
        cache.seq_cp(0, s)
    for n in sorted(set(npl) | ({1} if tgs else set())):
        runner.decode(rng.integers(0, n_vocab, n), np.full(n, 16), np.arange(n),
                      np.ones(n, bool), sync=True)
        cache.seq_rm(-1, 16)
    # Steps of the largest batch until its sequences gain a 32-cell block under a running plan:
    # those rows are then scattered on the device (KVCache._live_parts), with a kernel that
    # MLX compiles on first use. Without this, the first timed row to gain a block paid the
    # compile (2.7 s of a 32-step TG phase at B=2 on the H200).
    n = max(npl)
    steps = -(-BLOCK // n) + 2
    if 16 + n * steps <= cache.kv_size:
        for i in range(steps):
            runner.decode(rng.integers(0, n_vocab, n), np.full(n, 16 + i), np.arange(n),
                          np.ones(n, bool), sync=True)
    cache.clear()


def run_bench(
    model,
    p: BenchParams,
    runners: dict[str, Runner],
    n_kv_max: dict[str, int],
    note: Callable[[str], None] = lambda s: None,
) -> Iterator[BenchRow]:
    """Yield one row per (pp, tg, pl, mode); modes run interleaved so drift hits them alike."""
    n_vocab = model.args.vocab_size
    rng = np.random.default_rng(p.seed)
    if not (p.npp and p.ntg and p.npl):
        return  # llama-batched-bench has no defaults for these: an empty sweep, an empty table
    for runner in runners.values():
        warmup(runner, n_vocab, p.npp, p.npl, p.is_tg_separate, rng)
    for pp in p.npp:
        for tg in p.ntg:
            for pl in p.npl:
                times: dict[str, list] = {name: [] for name in runners}
                fits = {}
                for name, runner in runners.items():
                    unified = runner.mode.kv_unified
                    need = n_ctx_req(pp, tg, pl, p.is_pp_shared, unified)
                    fits[name] = need <= n_kv_max[name]
                    if not fits[name]:
                        # llama.cpp skips these silently; say so, the table just lacks the row
                        note(f"PP={pp} TG={tg} B={pl}{'' if len(runners) == 1 else ' ' + name}: "
                             f"needs {need} cells > n_kv_max {n_kv_max[name]}; skipped")
                    elif not unified and pp + tg > runner.cache.kv_size:
                        note(f"PP={pp} TG={tg} B={pl}: {pp + tg} cells per sequence exceed "
                             f"the split cache's {runner.cache.kv_size} per sequence; skipped")
                        fits[name] = False
                if not any(fits.values()):
                    continue
                for _ in range(p.repetitions):
                    for name, runner in runners.items():
                        if fits[name]:
                            mx.reset_peak_memory()
                            t_pp, t_tg = run_config(runner, rng, n_vocab, pp, tg, pl, p)
                            times[name].append((t_pp, t_tg, mx.get_peak_memory()))
                first = None
                for name, runner in runners.items():
                    if not times[name]:
                        continue
                    row = summarize(pp, tg, pl, p, runner.mode, times[name])
                    row.mode = name
                    if first is None:
                        first = row
                    row.ratio_tg = row.speed_tg / first.speed_tg if first.speed_tg else None
                    yield row


def summarize(pp, tg, pl, p: BenchParams, mode: Mode, samples) -> BenchRow:
    """Median times through llama.cpp's formulas; min/max speeds over the repetitions."""
    r = combine_repetitions(pp, tg, pl, [x[0] for x in samples], [x[1] for x in samples],
                            p.is_pp_shared, mode.kv_unified)
    row = BenchRow(**{f.name: getattr(r, f.name) for f in fields(BenchRow) if hasattr(r, f.name)})
    row.peak_mem_mb = max(x[2] for x in samples) / 2**20
    return row
