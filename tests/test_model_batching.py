"""B sequences sharing one cache must decode exactly as each sequence alone (float32, tiny preset)."""

import mlx.core as mx
import numpy as np
import pytest

from batchbench.decode_step import CompiledDecode
from batchbench.bench import Mode, Runner
from batchbench.kv_cache import KVCache
from batchbench.presets import make_preset, reference_logits

TOL = dict(rtol=2e-4, atol=2e-4)  # float32 end to end; differences are summation order only


@pytest.fixture(scope="module")
def model():
    m, _ = make_preset("tiny", mx.float32, seed=3)
    return m


def new_runner(model, n_seq, unified=True, mode=None, kv_size=512, n_ubatch=512, compiled=False,
               own_blocks=False):
    a = model.args
    cache = KVCache(a.num_hidden_layers, a.num_key_value_heads, a.head_dim, kv_size, n_seq, unified, mx.float32,
                    own_blocks=own_blocks)
    r = Runner(model, cache, mode or Mode("t", unified), 2048, n_ubatch, compiled=bool(compiled))
    if compiled == "segments":  # one compiled function per layer, submitted one by one
        r.step = CompiledDecode(model, cache, every=1)
    return r


def run_batched(runner, prompts, steps, pps=False):
    """Prefill prompts (sequence-major), then decode `steps` tokens per sequence in lock-step."""
    pl = len(steps[0])
    if pps:
        toks = np.array(prompts[0])
        seq, pos = np.zeros(len(toks), np.int64), np.arange(len(toks))
    else:
        toks = np.concatenate(prompts)
        seq = np.concatenate([np.full(len(p), j) for j, p in enumerate(prompts)])
        pos = np.concatenate([np.arange(len(p)) for p in prompts])
    out = np.zeros(len(toks), bool)
    runner.decode(toks, pos, seq, out, sync=True)
    if pps:
        for j in range(1, pl):
            runner.cache.seq_cp(0, j)
    n = len(prompts[0])
    logits = []
    for i, step in enumerate(steps):
        l = runner.decode(np.array(step), np.full(pl, n + i), np.arange(pl), np.ones(pl, bool), sync=True)
        logits.append(np.array(l))
    return np.stack(logits, 1)  # [pl, steps, vocab]


# decode steps op by op, as one compiled function, or as compiled segments of one layer
@pytest.mark.parametrize("compiled", [False, True, "segments"])
@pytest.mark.parametrize("unified", [True, False])
@pytest.mark.parametrize("mode", [Mode("skip"), Mode("no-skip", skip=False), Mode("fa-off", flash=False)])
def test_batched_decode_equals_single(model, unified, mode, compiled):
    rng = np.random.default_rng(1)
    pl, pp, tg = 3, 37, 5
    prompts = [rng.integers(0, 512, pp) for _ in range(pl)]
    steps = [rng.integers(0, 512, pl) for _ in range(tg)]
    mode = Mode(mode.name, unified, mode.flash, mode.skip)
    got = run_batched(new_runner(model, pl, unified, mode, n_ubatch=64, compiled=compiled), prompts, steps)
    for j in range(pl):
        seq_tokens = list(prompts[j]) + [int(s[j]) for s in steps]
        ref = reference_logits(model, seq_tokens)[pp : pp + tg]
        np.testing.assert_allclose(got[j], ref, **TOL)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("mode", [Mode("skip"), Mode("no-skip", skip=False)])
def test_own_decode_blocks_decode_as_each_sequence_alone(model, mode, compiled):
    """--own-blocks moves a unified cache's decode tokens into blocks of their own sequence
    (here across a block boundary: 37-token prompts, 40 steps): the logits stay those of each
    sequence decoded alone."""
    rng = np.random.default_rng(4)
    pl, pp, tg = 3, 37, 40
    prompts = [rng.integers(0, 512, pp) for _ in range(pl)]
    steps = [rng.integers(0, 512, pl) for _ in range(tg)]
    r = new_runner(model, pl, True, Mode(mode.name, True, True, mode.skip), n_ubatch=64, compiled=compiled,
                   own_blocks=True)
    got = run_batched(r, prompts, steps)
    for j in range(pl):
        cells = r.cache.seq_cells(j)
        decode_blocks = set((cells[r.cache.pos[cells] >= pp] // 32).tolist())
        assert len(decode_blocks) <= 3  # not one block per step shared with the others
        seq_tokens = list(prompts[j]) + [int(s[j]) for s in steps]
        ref = reference_logits(model, seq_tokens)[pp : pp + tg]
        np.testing.assert_allclose(got[j], ref, **TOL)


@pytest.mark.parametrize("unified,own_blocks", [(True, False), (False, False), (True, True)])
def test_shared_prompt_equals_unshared(model, unified, own_blocks):
    rng = np.random.default_rng(2)
    pl, pp = 4, 45
    prompt = rng.integers(0, 512, pp)
    steps = [rng.integers(0, 512, pl) for _ in range(3)]
    shared = run_batched(new_runner(model, pl, unified, own_blocks=own_blocks), [prompt] * pl, steps, pps=True)
    plain = run_batched(new_runner(model, pl, unified), [prompt] * pl, steps)
    np.testing.assert_allclose(shared, plain, **TOL)


def test_prefill_chunks_do_not_change_logits(model):
    rng = np.random.default_rng(3)
    toks = list(rng.integers(0, 512, 90))
    ref = reference_logits(model, toks)
    r = new_runner(model, 1, n_ubatch=32)
    out = np.zeros(90, bool)
    out[-1] = True
    last = r.decode(np.array(toks), np.arange(90), np.zeros(90, np.int64), out, sync=True)
    np.testing.assert_allclose(np.array(last)[-1], ref[-1], **TOL)


def test_new_sequence_joins_a_running_batch(model):
    # A sequence with no cells decodes its first token alone: its row sees only itself.
    r = new_runner(model, 2)
    r.decode(np.arange(10), np.arange(10), np.zeros(10, np.int64), np.zeros(10, bool), sync=True)
    l = r.decode(np.array([5, 6]), np.array([10, 0]), np.array([0, 1]), np.ones(2, bool), sync=True)
    assert np.isfinite(np.array(l)).all()
    np.testing.assert_allclose(np.array(l)[1], reference_logits(model, [6])[0], **TOL)


@pytest.mark.parametrize("pair_order", [False, True])
def test_fused_projections_keep_logits(pair_order):
    from batchbench.kernels.qmm import fuse_quantized_projections, use_fast_quantized_linears

    m, cfg = make_preset("tiny", mx.float32, "q4_0", seed=4)
    toks = list(np.random.default_rng(5).integers(0, 512, 20))
    before = reference_logits(m, toks)
    # pair_order: q/k/v and gate/up rows as CUDA's pair epilogues want them (MLX ops here)
    assert fuse_quantized_projections(m, pair_order=pair_order) == 2 * cfg["num_hidden_layers"]
    assert (m.model.layers[0].self_attn.qkv_proj.rope_layout is not None) == pair_order
    assert m.model.layers[0].mlp.gate_up_proj.glu_paired == pair_order
    assert use_fast_quantized_linears(m) == 2 * cfg["num_hidden_layers"] + 1  # o, down, lm_head
    assert "q_proj" not in m.model.layers[0].self_attn
    np.testing.assert_allclose(reference_logits(m, toks), before, rtol=1e-5, atol=1e-5)


def test_decode_submitted_layer_by_layer_equals_submitted_at_end(model, monkeypatch):
    """Op-by-op decode steps may hand the graph to the device every k layers (backend's
    DECODE_EVAL_EVERY): the logits must not change, and the submits must really happen."""
    from batchbench import backend

    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, 512, 21) for _ in range(2)]
    steps = [rng.integers(0, 512, 2) for _ in range(3)]
    monkeypatch.setattr(backend, "DECODE_EVAL_EVERY", 0)
    at_end = run_batched(new_runner(model, 2), prompts, steps)
    calls = []
    real = mx.async_eval
    monkeypatch.setattr(mx, "async_eval", lambda *a: (calls.append(1), real(*a))[1])
    monkeypatch.setattr(backend, "DECODE_EVAL_EVERY", 1)
    per_layer = run_batched(new_runner(model, 2), prompts, steps)
    assert len(calls) >= len(steps) * (model.args.num_hidden_layers - 1)
    np.testing.assert_array_equal(per_layer, at_end)


@pytest.mark.parametrize("every,first,want", [
    (4, 0, [(0, 4), (4, 8), (8, 10)]),
    (4, 1, [(0, 1), (1, 5), (5, 9), (9, 10)]),
    (0, 3, [(0, 3), (3, 10)]),
    (4, 6, [(0, 4), (4, 8), (8, 10)]),  # a first segment longer than the others is ignored
])
def test_decode_segments_cover_every_layer_once(every, first, want):
    class TenLayers:
        layers = [None] * 10

    assert CompiledDecode(None, TenLayers(), every, first).segments == want


@pytest.mark.parametrize("sizes,want", [
    ([1, 2, 4], [(0, 1), (1, 3), (3, 7), (7, 10)]),  # the last size repeats
    ([3, 20], [(0, 3), (3, 10)]),
    ([10], [(0, 10)]),
])
def test_decode_segments_from_listed_sizes(sizes, want):
    class TenLayers:
        layers = [None] * 10

    assert CompiledDecode(None, TenLayers(), 4, 1, sizes=sizes).segments == want
    with pytest.raises(ValueError, match="at least one layer"):
        CompiledDecode(None, TenLayers(), sizes=sizes + [0])


@pytest.mark.parametrize("compiled", [False, True])
def test_prepare_ahead_keeps_every_step_and_overlaps_the_wait(model, monkeypatch, compiled):
    """run_config's TG loop with the next step prepared while the GPU runs this one decodes
    the same logits as one prepared after the wait, and really prepares before waiting."""
    from batchbench import bench

    def tg_logits(ahead: bool):
        monkeypatch.setattr(bench, "PREP_AHEAD", ahead)
        r = new_runner(model, 3, compiled=compiled)
        events, logits = [], []
        prep, submit = r.prepare, r.submit

        def prepare(*a):
            events.append("prepare")
            return prep(*a)

        def sub(*a):
            events.append("submit")
            out = submit(*a)
            logits.append(out)
            return out

        real_sync = bench._sync

        def sync(x):
            events.append("sync")
            real_sync(x)

        r.prepare, r.submit = prepare, sub
        monkeypatch.setattr(bench, "_sync", sync)
        monkeypatch.setattr(bench, "rehearse_tg", lambda *a: None)  # only the timed steps here
        p = bench.BenchParams(n_ctx=512, npp=[19], ntg=[4], npl=[3])
        bench.run_config(r, np.random.default_rng(5), model.args.vocab_size, 19, 4, 3, p)
        monkeypatch.setattr(bench, "_sync", real_sync)
        tg = [np.array(l) for l in logits[-4:]]  # the prefill's ubatch came first
        return tg, events

    ref, ev_ref = tg_logits(False)
    got, ev = tg_logits(True)
    for a, b in zip(ref, got):
        np.testing.assert_allclose(b, a, **TOL)
    assert len(got) == 4 and got[0].shape == ref[0].shape
    # after the prefill: prepare 0, then per step submit i, prepare i+1 (before its wait), sync
    tg_ev = ev[ev.index("sync") + 1:]
    assert tg_ev == ["prepare", "submit", "prepare", "sync", "submit", "prepare", "sync",
                     "submit", "prepare", "sync", "submit", "sync"]
    assert ev_ref[ev_ref.index("sync") + 1:].count("sync") == 0  # decode() waits inside


@pytest.mark.parametrize("keep_gc", [False, True])
def test_timed_config_runs_without_the_garbage_collector(model, monkeypatch, keep_gc):
    """Python's cyclic collector is off while a config is timed (as timeit does), on again
    afterwards, also when the config fails; BATCHBENCH_GC=1 (KEEP_GC) leaves it alone."""
    import gc

    from batchbench import bench

    monkeypatch.setattr(bench, "KEEP_GC", keep_gc)
    r = new_runner(model, 2)
    seen = []
    real = r.decode
    r.decode = lambda *a, **k: (seen.append(gc.isenabled()), real(*a, **k))[1]
    real_submit = r.submit
    r.submit = lambda *a, **k: (seen.append(gc.isenabled()), real_submit(*a, **k))[1]
    p = bench.BenchParams(n_ctx=512, npp=[8], ntg=[2], npl=[2])
    assert gc.isenabled()
    bench.run_config(r, np.random.default_rng(1), model.args.vocab_size, 8, 2, 2, p)
    assert len(seen) >= 3 and set(seen) == {keep_gc} and gc.isenabled()
    r.submit = lambda *a, **k: 1 / 0
    with pytest.raises(ZeroDivisionError):
        bench.run_config(r, np.random.default_rng(1), model.args.vocab_size, 8, 2, 2, p)
    assert gc.isenabled()


@pytest.mark.parametrize("npl", [[1], [2, 3], [32]])
def test_warmup_scatters_live_rows_once(model, monkeypatch, npl):
    """The warmup takes every decode path a timed row can take, including the device scatter
    of live-block rows that only gained blocks (a kernel compiled on first use)."""
    from batchbench import bench
    from batchbench.kv_cache import KVCache

    seen = []
    real = KVCache._live_parts

    def spy(self, seq_ids, n):
        parts = real(self, seq_ids, n)
        seen.append(sorted(parts))
        return parts

    monkeypatch.setattr(KVCache, "_live_parts", spy)
    r = new_runner(model, max(npl), kv_size=1024)
    bench.warmup(r, model.args.vocab_size, [64], npl, False, np.random.default_rng(0))
    assert ["live"] in seen and ["live_ix", "live_val"] in seen


def test_segment_setting_defaults_by_backend_and_env(monkeypatch):
    from batchbench import backend

    for var in ("BATCHBENCH_SEGMENTS", "BATCHBENCH_EVAL_EVERY", "BATCHBENCH_FIRST_SEGMENT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(backend, "BACKEND", "cuda")
    assert backend._segments() == (2, 3, 5, 7)
    monkeypatch.setenv("BATCHBENCH_EVAL_EVERY", "4")  # the older knobs, set explicitly, still rule
    assert backend._segments() == ()
    monkeypatch.setenv("BATCHBENCH_SEGMENTS", "1, 4")
    assert backend._segments() == (1, 4)
    for bad in ("2,0", "two"):
        monkeypatch.setenv("BATCHBENCH_SEGMENTS", bad)
        with pytest.raises(ValueError, match="BATCHBENCH_SEGMENTS"):
            backend._segments()
    monkeypatch.delenv("BATCHBENCH_SEGMENTS")
    monkeypatch.delenv("BATCHBENCH_EVAL_EVERY")
    monkeypatch.setattr(backend, "BACKEND", "cpu")
    assert backend._segments() == ()


@pytest.mark.parametrize("unified,mode,tgs", [(True, Mode("no-skip", skip=False), False),
                                              (False, Mode("split", False), False),
                                              (True, Mode("no-skip", skip=False), True),
                                              (True, Mode("skip"), False)])
@pytest.mark.parametrize("rehearse", [True, False])
def test_timed_tg_phase_traces_no_new_window(model, monkeypatch, unified, mode, tgs, rehearse):
    """A compiled decode step is traced again for every new window shape. The bench rehearses
    each window a TG phase will use (one untimed step, undone), so that no trace lands inside
    the timed phase; without the rehearsal one does. The rehearsal leaves the cache as it was."""
    from batchbench import bench, kv_cache

    monkeypatch.setattr(kv_cache, "SKIP_WINDOW_PAD", 64)  # small contexts reach new windows
    traced = []
    orig = CompiledDecode._segment

    def counting(self, *key):
        seg = orig(self, *key)

        def traced_segment(*args):
            traced.append(tuple(args[3].shape))  # the mask: [tokens, window]
            return seg(*args)
        return traced_segment

    monkeypatch.setattr(CompiledDecode, "_segment", counting)
    states = []
    real = bench.rehearse_tg

    def rehearse_then_mark(runner, *a):
        c = runner.cache
        before = (c.pos.copy(), c.bits.copy(), list(c.head), list(c.used))
        if rehearse:
            real(runner, *a)
        after = (c.pos, c.bits, c.head, c.used)
        states.append(all(np.array_equal(x, y) for x, y in zip(before, after)))
        traced.append("tg")  # what follows is the timed TG phase

    monkeypatch.setattr(bench, "rehearse_tg", rehearse_then_mark)
    runner = new_runner(model, 2, unified, mode, kv_size=1024, compiled=True)
    p = bench.BenchParams(n_ctx=2048, npp=[100, 300, 120], ntg=[10], npl=[2], is_tg_separate=tgs)
    bench.warmup(runner, model.args.vocab_size, p.npp, p.npl, tgs, np.random.default_rng(0))
    in_tg = []
    for pp in p.npp:
        traced.clear()
        bench.run_config(runner, np.random.default_rng(pp), model.args.vocab_size, pp, 10, 2, p)
        in_tg.append(len(traced) - traced.index("tg") - 1)
    assert all(states)
    if rehearse:
        assert in_tg == [0, 0, 0], in_tg
    else:  # the check can fail: without the rehearsal the TG phase traced (on the CPU twin the
        assert sum(in_tg) > 0, in_tg  # windows follow the context with skipping too)


@pytest.mark.parametrize("pending", [False, True])
@pytest.mark.parametrize("compiled", [False, True, "segments"])
def test_norms_written_by_the_previous_launch_keep_logits(monkeypatch, compiled, pending):
    """Where a matmul's reduce kernel writes the next RMSNorm (qmm.linear_norm on CUDA after a
    split K), each layer hands the next a Hidden whose x_n is already normalized: o_proj for the
    MLP, down_proj for the next layer's q/k/v, the last one for the head. Here every call
    "fuses" (the norm applied at once by MLX ops), with a different random weight per norm so
    that one applied twice, skipped or mixed up changes the logits. pending: as on one K-slice
    with BB_QMM_NORM_PRE, the producer hands on h * weight and its 16-column sums of squares
    (qmm.PendingNorm), which every consumer here applies by MLX ops (the head after taking
    its output rows in prefill)."""
    from batchbench.kernels import qmm
    from batchbench.models import llama
    from batchbench.verify.cases import producer_share

    m, _ = make_preset("tiny", mx.float32, seed=6)
    rng = np.random.default_rng(6)
    norms = [m.model.norm] + [n for l in m.model.layers for n in (l.input_layernorm, l.post_attention_layernorm)]
    for n in norms:
        n.weight = mx.array(rng.uniform(0.5, 1.5, n.weight.shape).astype(np.float32))
    prompts = [rng.integers(0, 512, 19) for _ in range(2)]
    steps = [rng.integers(0, 512, 2) for _ in range(3)]
    before = run_batched(new_runner(m, 2, n_ubatch=64, compiled=compiled), prompts, steps)
    ref = reference_logits(m, list(prompts[0]))
    fused = []

    def fusing(layer, x, *, residual, norm, glu=False):
        fused.append(norm)
        h = qmm.linear(layer, x, residual=residual, glu=glu)
        if pending:
            return (h, *producer_share(h, norm.weight, norm.eps))
        return h, norm(h), None

    monkeypatch.setattr(llama, "linear_norm", fusing)
    after = run_batched(new_runner(m, 2, n_ubatch=64, compiled=compiled), prompts, steps)
    np.testing.assert_allclose(after, before, **TOL)
    np.testing.assert_allclose(reference_logits(m, list(prompts[0])), ref, **TOL)
    # every norm but the first layer's input norm (its input is the embedding)
    assert {id(n) for n in fused} == {id(n) for n in norms if n is not m.model.layers[0].input_layernorm}
