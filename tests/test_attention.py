"""Decode attention: the pure-MLX twin against a float64 NumPy oracle, and the kernel plans."""

import math

import mlx.core as mx
import numpy as np
import pytest

from batchbench.kernels import attention as A
from batchbench.kernels.attention_cases import additive, live_lists, make_layout, reference
from conftest import qmm_setting_read

TOL = {mx.float32: 2e-5, mx.float16: 3e-3, mx.bfloat16: 2.5e-2}


def _inputs(rng, dtype, d, g, hkv, t, n, extra=9):
    s = n + extra  # the buffer is larger than the used range; what lies past N is junk
    q = rng.standard_normal((1, hkv * g, t, d)).astype(np.float32)
    k = rng.standard_normal((1, hkv, s, d)).astype(np.float32)
    v = rng.standard_normal((1, hkv, s, d)).astype(np.float32)
    k[:, :, n:] = 1e4
    v[:, :, n:] = -1e4
    qm, km, vm = (mx.array(x).astype(dtype) for x in (q, k, v))
    q64, k64, v64 = (np.array(x.astype(mx.float32)).astype(np.float64) for x in (qm, km, vm))
    return qm, km, vm, q64, k64, v64


def _mask(vis, dtype, kind):
    if kind == "bool":
        return mx.array(vis)
    return mx.array(additive(vis)).astype(dtype)


def _run(q, k, v, mask, scale, **kw):
    out = A.decode_attention(q, k, v, scale=scale, mask=mask, **kw)
    return np.array(out.astype(mx.float32)).astype(np.float64)


LAYOUTS = [
    dict(kind="contiguous", n_seq=4),
    dict(kind="interleaved", n_seq=3),
    dict(kind="shared", n_seq=3, empty_row=True),
    dict(kind="contiguous", n_seq=3, tokens_per_seq=2, n_swa=24),
    dict(kind="contiguous", n_seq=2, tail=0),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: "-".join(f"{k}{v}" for k, v in l.items()))
@pytest.mark.parametrize(
    "dtype,g,d,mkind",
    [
        (mx.float16, 7, 128, "add"),
        (mx.bfloat16, 4, 64, "add"),
        (mx.float32, 1, 64, "bool"),
        (mx.float16, 8, 64, "bool"),
    ],
)
def test_twin_matches_float64(layout, dtype, g, d, mkind):
    rng = np.random.default_rng()
    lay = make_layout(rng, **layout)
    vis = lay.visible
    t, n = vis.shape
    hkv = 2
    q, k, v, q64, k64, v64 = _inputs(rng, dtype, d, g, hkv, t, n)
    scale = 1.0 / math.sqrt(d)
    mask = _mask(vis, dtype, mkind)
    want = reference(q64, k64, v64, vis, scale)
    exact = tuple(mx.array(x) for x in live_lists(vis))
    superset = tuple(mx.array(x) for x in live_lists(lay.owned, pad_to=n // 32 + 2))
    outs = {
        "skip": _run(q, k, v, mask, scale),
        "noskip": _run(q, k, v, mask, scale, skip=False),
        "live": _run(q, k, v, mask, scale, live_blocks=exact),
        "superset": _run(q, k, v, mask, scale, live_blocks=superset),
    }
    for name, got in outs.items():
        assert np.isfinite(got).all(), name
        assert np.abs(got - want).max() < TOL[dtype], name
        dead = ~vis.any(axis=1)
        assert not np.abs(got[:, :, dead]).any(), f"{name}: fully masked row is not zero"
    assert np.abs(outs["skip"] - outs["noskip"]).max() < TOL[dtype]
    assert np.abs(outs["live"] - outs["skip"]).max() < TOL[dtype]


def test_fully_masked_rows_are_zero_not_nan():
    rng = np.random.default_rng()
    t, n = 3, 70
    vis = np.zeros((t, n), dtype=bool)
    vis[1, 5:9] = True
    q, k, v, q64, k64, v64 = _inputs(rng, mx.float16, 64, 4, 2, t, n)
    for kind in ("add", "bool"):
        got = _run(q, k, v, _mask(vis, mx.float16, kind), 0.125)
        assert not np.isnan(got).any()
        assert not got[:, :, [0, 2]].any()
        assert np.abs(got - reference(q64, k64, v64, vis, 0.125)).max() < 3e-3


def test_single_visible_cell_in_partial_last_block():
    rng = np.random.default_rng()
    t, n = 2, 100  # last block holds cells 96..99
    vis = np.zeros((t, n), dtype=bool)
    vis[0, n - 1] = True
    vis[1, 96] = True
    q, k, v, q64, k64, v64 = _inputs(rng, mx.float32, 64, 7, 1, t, n)
    got = _run(q, k, v, _mask(vis, mx.float32, "add"), 0.125)
    # One visible cell: the output is exactly that cell's V row.
    np.testing.assert_allclose(got[0, :, 0], np.broadcast_to(v64[0, 0, n - 1], (7, 64)), atol=1e-6)
    np.testing.assert_allclose(got[0, :, 1], np.broadcast_to(v64[0, 0, 96], (7, 64)), atol=1e-6)
    blocks = (mx.array([[3], [3]], dtype=mx.int32), mx.array([1, 1], dtype=mx.int32))
    got_live = _run(q, k, v, _mask(vis, mx.float32, "add"), 0.125, live_blocks=blocks)
    np.testing.assert_allclose(got_live, got, atol=1e-6)


def test_live_blocks_restrict_attention():
    """Blocks missing from the list are not attended, as in the kernels."""
    rng = np.random.default_rng()
    t, n = 2, 128
    vis = np.ones((t, n), dtype=bool)
    q, k, v, q64, k64, v64 = _inputs(rng, mx.float32, 64, 1, 1, t, n)
    blocks = np.array([[1, 3, 0], [2, 0, 0]], dtype=np.int32)
    counts = np.array([2, 0], dtype=np.int32)
    got = _run(q, k, v, _mask(vis, mx.float32, "add"), 0.125,
               live_blocks=(mx.array(blocks), mx.array(counts)))
    allowed = np.zeros((t, n), dtype=bool)
    allowed[0, 32:64] = allowed[0, 96:128] = True
    np.testing.assert_allclose(got, reference(q64, k64, v64, allowed, 0.125), atol=2e-5)
    # skip=False ignores the list.
    got = _run(q, k, v, _mask(vis, mx.float32, "add"), 0.125, skip=False,
               live_blocks=(mx.array(blocks), mx.array(counts)))
    np.testing.assert_allclose(got, reference(q64, k64, v64, vis, 0.125), atol=2e-5)


@pytest.mark.parametrize(
    "qs,ks,vs,ms,live,msg",
    [
        ((2, 4, 1, 64), (1, 2, 8, 64), (1, 2, 8, 64), (1, 8), None, "q must be"),
        ((1, 4, 1, 64), (1, 3, 8, 64), (1, 3, 8, 64), (1, 8), None, "multiple"),
        ((1, 4, 1, 64), (1, 2, 8, 64), (1, 2, 9, 64), (1, 8), None, "k and v"),
        ((1, 4, 1, 32), (1, 2, 8, 64), (1, 2, 8, 64), (1, 8), None, "head dim"),
        ((1, 4, 2, 64), (1, 2, 8, 64), (1, 2, 8, 64), (1, 8), None, "mask"),
        ((1, 4, 1, 64), (1, 2, 8, 64), (1, 2, 8, 64), (1, 9), None, "cells"),
        ((1, 4, 1, 64), (1, 2, 8, 64), (1, 2, 8, 64), (1, 8), ((2, 1), (1,)), "live_blocks"),
    ],
)
def test_bad_shapes_raise(qs, ks, vs, ms, live, msg):
    q, k, v = mx.zeros(qs), mx.zeros(ks), mx.zeros(vs)
    mask = mx.zeros(ms)
    lb = None
    if live is not None:
        lb = (mx.zeros(live[0], dtype=mx.int32), mx.zeros(live[1], dtype=mx.int32))
    with pytest.raises(ValueError, match=msg):
        A.decode_attention(q, k, v, scale=1.0, mask=mask, live_blocks=lb)
    with pytest.raises(ValueError, match=msg):
        A.decode_attention_ref(q, k, v, scale=1.0, mask=mask, live_blocks=lb)


def test_bad_dtypes_raise():
    q = mx.zeros((1, 2, 1, 64), dtype=mx.float16)
    k = mx.zeros((1, 1, 8, 64), dtype=mx.float32)
    with pytest.raises(ValueError, match="dtype"):
        A.decode_attention(q, k, k, scale=1.0, mask=mx.zeros((1, 8)))
    with pytest.raises(ValueError, match="mask"):
        A.decode_attention(q, q[:, :1].astype(mx.float16), q[:, :1], scale=1.0,
                           mask=mx.zeros((1, 1), dtype=mx.int32))


@pytest.mark.parametrize("backend_name", ["cuda", "metal"])
@pytest.mark.parametrize("skip,live", [(True, False), (True, True), (False, False)])
def test_plan_describes_one_launch(backend_name, skip, live):
    t, g, hkv, d, n = 5, 7, 4, 128, 1000
    q = mx.zeros((1, g * hkv, t, d), dtype=mx.float16)
    k = mx.zeros((1, hkv, 1024, d), dtype=mx.float16)
    mask = mx.zeros((t, n), dtype=mx.float16)
    lb = (mx.zeros((t, 3), dtype=mx.int32), mx.ones((t,), dtype=mx.int32)) if live else None
    kspec, launch = A.plan_decode_attention(
        backend_name, q, k, k, mask, scale=0.125, skip=skip, live_blocks=lb
    )
    warps, stages = A._config(backend_name)
    n_split = launch.grid[1]
    assert kspec.backend == backend_name
    assert launch.grid == (warps * 32 * hkv, n_split, t)
    assert launch.threadgroup == (warps * 32, 1, 1)
    assert 1 <= n_split <= A.MAX_SPLIT
    assert launch.output_shapes[0] == (1, t, g * hkv, d)  # token-major: o_proj reads it as is
    assert dict(launch.template)["LIVE"] == (skip and live)
    # Every int input is big enough to stay out of MLX's small-array pool.
    assert launch.inputs[4].size >= 8 and launch.inputs[5].size >= t * hkv
    header = kspec.header
    for helper in ("bb_mma_16816", "bb_ldsm_rows_trans", "bb_cp_async16", "bb_attn_decode"):
        assert helper in header
    if backend_name == "cuda":
        assert kspec.shared_memory == A.smem_bytes(d, warps, stages, 2, min(g, 16))
        assert "BB_PORTABLE" in header and "mma.sync" in header
    else:
        assert A.smem_bytes(d, warps, stages, 2, min(g, 16)) <= 32768  # Apple threadgroup memory


def test_splits_fill_a_wave_but_keep_min_blocks_each(monkeypatch):
    monkeypatch.setattr(A, "WAVE", 1.0)
    monkeypatch.setattr(A, "MIN_BLOCKS", 8)
    monkeypatch.setenv("BB_ATTN_SMS", "132")
    # B=1 (4 KV heads) over a 4096-cell window: one wave would be 33 splits of ~4 blocks.
    assert A.choose_splits(4, 128, 4) == 16
    # The same row in a 2-sequence window: the window is twice the row, the wave decides.
    assert A.choose_splits(8, 256, 4) == 16
    assert A.choose_splits(128, 8192, 4) == 1
    # Never more splits than blocks, nor than MAX_SPLIT; never fewer than one.
    assert A.choose_splits(1, 3, 4) == 1
    assert A.choose_splits(1, 100000, 4) == A.MAX_SPLIT
    monkeypatch.setattr(A, "MIN_BLOCKS", 1)  # the rule off: one wave
    assert A.choose_splits(4, 128, 4) == 33


def test_live_packing_is_reused_across_layers():
    blocks = mx.zeros((2, 1), dtype=mx.int32)
    counts = mx.zeros((2,), dtype=mx.int32)
    a = A.pack_live_blocks((blocks, counts))
    b = A.pack_live_blocks((blocks, counts))
    assert a is b and a.shape == (2, 8)
    assert np.array(a)[0, 2:].tolist() == [-1] * 6


def test_bench_chain_in_compiled_segments_equals_the_plain_chain():
    """bench-attention's "model" chain runs the layers as the decode step does (compiled
    segments, each submitted before the next): same result as layer by layer, every layer
    index used once (7 layers in segments of 3: 3 + 3 + 1)."""
    from batchbench import bench_attention as ba

    seen = []

    def step(x, i):
        seen.append(i)
        return x * 0.5 + float(i)

    q0 = mx.array([1.0, 2.0])
    plain = ba._chain(step, q0, 7)()
    assert seen == list(range(7))
    seen.clear()
    segmented = ba._chain(step, q0, 7, (3,))()
    assert seen == list(range(7))  # traced once per segment
    assert mx.allclose(plain, segmented).item() and not mx.allclose(plain, q0).item()
    seen.clear()
    growing = ba._chain(step, q0, 7, (1, 2, 3))()  # 1 + 2 + 3 + 1, as the decode step's
    assert seen == list(range(7))
    assert mx.allclose(plain, growing).item()


def test_wall_time_stops_the_clock_before_draining_the_stream(monkeypatch):
    """wall_time_us times run() (which waits for its own result), per layer, best of reps; the
    stream is drained after each rep, outside the timed part."""
    import time

    from batchbench import bench_attention as ba

    calls = []

    def slow_sync():
        calls.append("sync")
        time.sleep(0.05)

    def run():
        calls.append("run")
        time.sleep(0.002)

    monkeypatch.setattr(ba.mx, "synchronize", slow_sync)
    per_layer = ba.wall_time_us(run, n_layers=4, reps=3)
    assert calls == ["run", "sync"] * 4  # one warm-up, then each rep drained
    assert 2000 / 4 <= per_layer < 20000 / 4  # run's 2 ms, not the 50 ms drain
    calls.clear()  # the old timing, kept for scripts/h200_wall_probe.py's comparison
    assert ba.wall_time_us(run, n_layers=4, reps=1, time_drain=True) >= 52000 / 4
    assert calls == ["run", "sync", "run", "sync", "sync"]


def test_trace_events_reads_the_complete_events_back(tmp_path):
    """The profiling scripts read CUPTI kernels through bench_attention.trace_events: only
    complete ("X") events, from either chrome-trace layout, the file kept where asked."""
    import json

    from batchbench import bench_attention as ba

    class FakeProfile:
        def __init__(self, doc):
            self.doc = doc

        def export_chrome_trace(self, path):
            with open(path, "w") as f:
                json.dump(self.doc, f)

    evs = [{"ph": "X", "cat": "kernel", "name": "k", "ts": 1, "dur": 2},
           {"ph": "i", "cat": "kernel", "name": "marker", "ts": 3},
           {"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": 0, "dur": 1}]
    want = [evs[0], evs[2]]
    assert ba.trace_events(FakeProfile({"traceEvents": evs})) == want
    kept = tmp_path / "sub" / "trace.json"
    assert ba.trace_events(FakeProfile(evs), str(kept)) == want and kept.exists()


@pytest.mark.parametrize("value,want", [(None, "4"), ("1", "1"), ("2", "2")])
def test_bb_attn_mergers_values(value, want):
    """BB_ATTN_MERGERS (the split merge's parts, CUDA) is 4 by default and read once, at import;
    the CUDA plan passes it to the kernel (here 4 splits), the Metal plan always 1 (no threadgroup
    waits there)."""
    plan_mg = ("(lambda A, mx: (A.MERGERS, *[dict(A.plan_decode_attention(b, mx.zeros((1, 28, 2, 128), mx.float16), "
               "mx.zeros((1, 4, 1024, 128), mx.float16), mx.zeros((1, 4, 1024, 128), mx.float16), "
               "mx.zeros((2, 1024), mx.float16), scale=0.1)[1].template)['MG'] for b in ('cuda', 'metal')]))"
               "(__import__('batchbench.kernels.attention', fromlist=['x']), __import__('mlx.core', fromlist=['x']))")
    got = qmm_setting_read("BB_ATTN_MERGERS", value, "*" + plan_mg)
    assert got == [want, want, "1"]


@pytest.mark.parametrize("value,want", [(None, "False"), ("0", "False"), ("1", "True")])
def test_bb_attn_rec32_values(value, want):
    """BB_ATTN_REC32 is off by default (split records in the activation dtype); read once, at
    import, and it changes the kernel's name and its record bytes."""
    expr = ("__import__('batchbench.kernels.attention', fromlist=['x']).REC32, "
            "__import__('batchbench.kernels.attention', fromlist=['x']).record_bytes(7, 128, 2)")
    got = qmm_setting_read("BB_ATTN_REC32", value, expr)
    assert got == [want, str(7 * 128 * (4 if want == "True" else 2) + 64)]
