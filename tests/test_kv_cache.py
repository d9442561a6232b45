"""KV cache bookkeeping and the KQ mask, against llama.cpp's rules written out in numpy."""

import mlx.core as mx
import numpy as np
import pytest

from batchbench import kv_cache
from batchbench.kv_cache import BLOCK, SWA, KVCache


def make(kv_size=512, n_seq=4, unified=True, swa=None, own_blocks=False):
    return KVCache(1, 1, 8, kv_size, n_seq, unified, mx.float32, swa, own_blocks=own_blocks)


def ref_mask(cache, seq_ids, positions, n):
    """Direct transcription of set_input_kq_mask: visible iff member, non-empty, p0 <= p1, not SWA."""
    out = np.full((len(seq_ids), n), -np.inf, np.float32)
    for i, (s, p1) in enumerate(zip(seq_ids, positions)):
        for j in range(n):
            p0 = cache.pos[j]
            member = (cache.bits[s // 32, j] >> (s % 32)) & 1
            if p0 < 0 or not member or p0 > p1:
                continue
            if cache.swa is not None and cache.swa.masked(p0, p1):
                continue
            out[i, j] = 0.0
    return out


def mask_np(cache, seq_ids, positions, n):
    return np.array(cache.build_mask(np.asarray(seq_ids), np.asarray(positions), 0, n))


def fill_prompts(cache, pl, pp):
    seq = np.repeat(np.arange(pl), pp)
    pos = np.tile(np.arange(pp), pl)
    return cache.find_slot(seq, pos)


def test_cells_fill_in_order_and_interleave_in_decode():
    c = make()
    cells = fill_prompts(c, 3, 40)
    assert (cells == np.arange(120)).all()
    step = c.find_slot(np.arange(3), np.full(3, 40))
    assert (step == [120, 121, 122]).all()
    assert c.n_kv(0) == 256  # used 123, padded to 256
    rows = mask_np(c, [0, 1, 2], [41, 41, 41], 256)
    np.testing.assert_array_equal(rows, ref_mask(c, [0, 1, 2], [41, 41, 41], 256))
    # seq 1 sees its prompt [40, 80) and its decode cell 121, nothing else; tail is masked
    vis = np.flatnonzero(rows[1] == 0)
    assert list(vis) == list(range(40, 80)) + [121]


def test_seq_cp_shares_cells_and_seq_rm_removes():
    c = make()
    fill_prompts(c, 1, 50)
    c.seq_cp(0, 2)
    m = mask_np(c, [2], [50], 256)
    assert (m[0, :50] == 0).all() and (m[0, 50:] == -np.inf).all()
    c.seq_rm(0, 10, 20)  # seq 2 still holds those cells
    m0 = mask_np(c, [0], [60], 256)
    assert (m0[0, 10:20] == -np.inf).all() and (m0[0, :10] == 0).all()
    assert (c.pos[10:20] == 10 + np.arange(10)).all()
    c.seq_rm(2, 10, 20)
    assert (c.pos[10:20] == -1).all()  # empty once no sequence holds them
    c.seq_rm(-1)
    assert (c.pos == -1).all()
    np.testing.assert_array_equal(mask_np(c, [0], [5], 256), np.full((1, 256), -np.inf, np.float32))


def test_freed_cells_are_reused_after_head():
    c = make(kv_size=256, n_seq=2)
    fill_prompts(c, 2, 128)  # full
    c.seq_rm(0)
    cells = c.find_slot(np.array([1, 1]), np.array([128, 129]))
    assert (cells == [0, 1]).all()  # wrapped around to the freed cells


def test_full_cache_raises():
    c = make(kv_size=256, n_seq=1)
    with pytest.raises(ValueError, match="KV cache full"):
        c.find_slot(np.zeros(300, np.int64), np.arange(300))


@pytest.mark.parametrize("kind,window", [("standard", 8), ("chunked", 16), ("symmetric", 10)])
def test_swa_rules(kind, window):
    c = make(swa=SWA(window, kind))
    fill_prompts(c, 2, 60)
    seq, pos = [0, 1, 0, 1], [59, 59, 30, 7]
    np.testing.assert_array_equal(mask_np(c, seq, pos, 256), ref_mask(c, seq, pos, 256))


def test_random_layouts_match_reference():
    rng = np.random.default_rng(0)
    for _ in range(5):
        c = make(kv_size=512, n_seq=40)  # more than 32 sequences: two bitset words
        pl = int(rng.integers(2, 40))
        fill_prompts(c, pl, int(rng.integers(1, 8)))
        for step in range(3):
            c.find_slot(np.arange(pl), np.full(pl, 10 + step))
        if rng.random() < 0.5:
            c.seq_cp(0, pl - 1)
        c.seq_rm(int(rng.integers(0, pl)), 0, 3)
        seq = rng.integers(0, pl, 6)
        pos = rng.integers(0, 14, 6)
        np.testing.assert_array_equal(mask_np(c, seq, pos, 512), ref_mask(c, seq, pos, 512))


def test_live_blocks_cover_every_visible_cell():
    c = make(kv_size=1024, n_seq=5)
    fill_prompts(c, 5, 70)
    for step in range(9):
        c.find_slot(np.arange(5), np.full(5, 70 + step))
    seq = np.arange(5)
    n = c.window_end([0])
    m = mask_np(c, seq, np.full(5, 80), n)
    blocks, counts = (np.array(a) for a in c.live_blocks(seq, n))
    for r in range(5):
        live = set(blocks[r, : counts[r]])
        vis_blocks = set(np.flatnonzero(m[r] == 0) // BLOCK)
        assert vis_blocks <= live
        # and nothing listed lies in another sequence's prompt only
        assert live <= set(np.flatnonzero(c.seq_blocks[r]))
        assert list(blocks[r, : counts[r]]) == sorted(live)


def test_split_mode_streams_and_copy():
    c = make(kv_size=256, n_seq=3, unified=False)
    cells = c.find_slot(np.array([0, 0, 1, 2]), np.array([0, 1, 0, 0]))
    assert list(cells) == [0, 1, 256, 512]
    c.clear()
    c.find_slot(np.zeros(20, np.int64), np.arange(20))
    for i in range(1, 3):
        c.seq_cp(0, i)
    m = mask_np(c, [2], [25], c.window_end([2]))
    assert (np.flatnonzero(m[0] == 0) == 512 + np.arange(20)).all()
    k0 = np.array(c.layers[0].keys[0, 0, :20])
    np.testing.assert_array_equal(np.array(c.layers[0].keys[0, 0, 512:532]), k0)


def test_bad_sequence_id():
    with pytest.raises(ValueError, match="out of range"):
        make(n_seq=2).find_slot(np.array([2]), np.array([0]))


def test_packed_live_blocks_match_pairs_in_attention():
    from batchbench.kernels.attention import decode_attention_ref, plan_decode_attention

    c = KVCache(1, 2, 64, 1024, 3, True, mx.float16)
    fill_prompts(c, 3, 100)
    c.find_slot(np.arange(3), np.full(3, 100))
    seq, pos = np.arange(3), np.full(3, 100)
    n = c.window_end([0])
    pair = c.live_blocks(seq, n)
    packed = c.packed_live_blocks(seq, n)
    np.testing.assert_array_equal(np.array(packed.rows[:, 0]), np.array(pair[1]))
    np.testing.assert_array_equal(np.array(packed.rows[:, 1:]), np.array(pair[0]))
    rng = np.random.default_rng(0)
    q = mx.array(rng.standard_normal((1, 8, 3, 64)).astype(np.float16))
    k = mx.array(rng.standard_normal((1, 2, 1024, 64)).astype(np.float16))
    v = mx.array(rng.standard_normal((1, 2, 1024, 64)).astype(np.float16))
    mask = c.build_mask(seq, pos, 0, n)
    a = decode_attention_ref(q, k, v, scale=0.125, mask=mask, live_blocks=pair)
    b = decode_attention_ref(q, k, v, scale=0.125, mask=mask, live_blocks=packed)
    np.testing.assert_array_equal(np.array(a), np.array(b))
    # the kernel launch takes the packed rows as they are: no per-layer packing op
    _, launch = plan_decode_attention("cuda", q, k, v, mask, scale=0.125, skip=True, live_blocks=packed)
    assert launch.inputs[4] is packed.rows


def test_decode_plans_keep_their_shapes_and_reuse_live_lists(cuda_dispatch):
    """Compiled decode steps are traced per input shape: with skipping on a GPU kernel (here
    CUDA, launches stubbed), the mask and the live lists keep one shape for the whole run, and
    the lists are rebuilt only when a sequence gains a block (they must then match a fresh
    build)."""
    c = make(kv_size=8192, n_seq=3)
    fill_prompts(c, 3, 60)
    shapes, lists = set(), []
    built = []
    full_build = c._live_rows
    c._live_rows = lambda *a: built.append(1) or full_build(*a)
    for step in range(40):
        plan = c.prepare(np.arange(3), np.full(3, 60 + step), None)
        shapes.add((plan.mask.shape, plan.live_blocks.rows.shape))
        lists.append(plan.live_blocks.rows)
        np.testing.assert_array_equal(np.array(plan.live_blocks.rows), live_rows_ref(c, np.arange(3)))
    assert shapes == {((3, c.n_cells), (3, 1 + c.n_cells // BLOCK))}
    # the three sequences interleave: each step opens a block for some sequence every 32/3
    # steps, not every step (the rows change only then, by a scatter of the new entries)
    rebuilt = sum(a is not b for a, b in zip(lists, lists[1:]))
    assert 0 < rebuilt < 20
    assert len(built) == 1  # later changes are scattered into the device rows
    no_skip = c.prepare(np.arange(3), np.full(3, 100), None, skip=False)
    assert no_skip.mask.shape[1] < c.n_cells and no_skip.live_blocks is None


def live_rows_ref(c: KVCache, seq_ids) -> np.ndarray:
    """The kernel's live rows straight from the block occupancy (no incremental lists)."""
    nb = c.seq_blocks.shape[1]
    rows = np.full((len(seq_ids), 1 + nb), -1, np.int32)
    for t, s in enumerate(seq_ids):
        blocks = np.flatnonzero(c.seq_blocks[s])
        rows[t, 0] = len(blocks)
        rows[t, 1 : 1 + len(blocks)] = blocks
    return rows


@pytest.mark.parametrize("own_blocks", [False, True])
def test_incremental_live_lists_follow_every_cache_operation(own_blocks):
    """find_slot keeps the per-sequence lists up to date (freed cells reused out of order
    included); seq_rm, seq_cp and clear rebuild them. Each step takes one empty cell per
    token, with its position (own blocks or not)."""
    rng = np.random.default_rng(11)
    c = make(kv_size=256, n_seq=4, own_blocks=own_blocks)  # small: the head wraps, freed cells are reused
    fill_prompts(c, 4, 50)
    for step in range(120):
        op = rng.random()
        if (c.pos < 0).sum() < 8:
            c.seq_rm(-1, 0, 30)
        if op < 0.1:
            c.seq_rm(int(rng.integers(0, 4)), int(rng.integers(0, 40)), int(rng.integers(40, 80)))
        elif op < 0.15:
            c.seq_cp(int(rng.integers(0, 4)), int(rng.integers(0, 4)))
        elif op < 0.17:
            c.clear()
            fill_prompts(c, 4, 20)
        seq = rng.permutation(4)[: int(rng.integers(1, 5))]
        pos = np.array([int(c.pos[c.seq_cells(int(s))].max(initial=-1)) + 1 for s in seq])
        empty_before = c.pos < 0
        plan = c.prepare(seq, pos, None)
        np.testing.assert_array_equal(np.array(plan.live_blocks.rows), live_rows_ref(c, seq))
        new = np.flatnonzero(empty_before & (c.pos >= 0))  # the step took empty cells only
        assert len(new) == len(seq)
        for s, p in zip(seq, pos):
            mine = np.intersect1d(new, c.seq_cells(int(s)))
            assert len(mine) == 1 and c.pos[mine[0]] == p


def test_live_list_stays_sorted_when_a_freed_earlier_block_is_reused():
    c = make(kv_size=128, n_seq=2)
    c.find_slot(np.full(32, 1), np.arange(32))  # seq 1: block 0
    c.find_slot(np.zeros(64, np.int64), np.arange(64))  # seq 0: blocks 1, 2
    plan = c.prepare(np.array([0]), np.array([64]), None)  # seq 0 gains block 3; lists built
    assert list(np.array(plan.live_blocks.rows[0, :4])) == [3, 1, 2, 3]
    c.seq_rm(1)  # block 0 freed
    c.find_slot(np.zeros(31, np.int64), np.arange(65, 96))  # fills block 3; the head wraps
    plan = c.prepare(np.array([0]), np.array([96]), None)  # lands in block 0, before 1, 2, 3
    np.testing.assert_array_equal(np.array(plan.live_blocks.rows), live_rows_ref(c, [0]))
    assert list(np.array(plan.live_blocks.rows[0, :5])) == [4, 0, 1, 2, 3]


def test_own_blocks_put_each_sequence_s_decode_tokens_in_its_own_blocks():
    """--own-blocks: a decode token takes the cell after its sequence's last one while that
    stays in the block and is empty, else the start of an all-empty block; the live lists
    then grow by one block per 32 steps, not by B/32 blocks per step."""
    c, plain = make(kv_size=1024, own_blocks=True), make(kv_size=1024)
    for cache in (c, plain):
        cache.find_slot(np.repeat(np.arange(4), [70, 64, 33, 100]),
                        np.concatenate([np.arange(n) for n in (70, 64, 33, 100)]))
    starts = [70, 64, 33, 100]
    for t in range(40):
        seq = np.arange(4)
        pos = np.array(starts) + t
        cells = c.find_slot(seq, pos)
        plain.find_slot(seq, pos)
        assert len(set(cells.tolist())) == 4 and (c.pos[cells] == pos).all()
    for s in range(4):
        cells = c.seq_cells(s)
        dec = cells[c.pos[cells] >= starts[s]]
        assert (np.diff(dec) > 0).all()  # in order, block after block
        for b in set((dec // BLOCK).tolist()):  # no other sequence's decode token in them
            blk = np.arange(b * BLOCK, (b + 1) * BLOCK)
            others = [o for o in range(4) if o != s]
            for o in others:
                ocells = np.intersect1d(c.seq_cells(o), blk)
                assert (c.pos[ocells] < starts[o]).all()
        assert len(set((dec // BLOCK).tolist())) <= 3
    rows = np.array(c.prepare(np.arange(4), np.array(starts) + 40, None).live_blocks.rows)
    rows_plain = np.array(plain.prepare(np.arange(4), np.array(starts) + 40, None).live_blocks.rows)
    assert (rows[:, 0] + 3 <= rows_plain[:, 0]).all()  # 4-5 blocks a row against 8-9
    np.testing.assert_array_equal(rows, live_rows_ref(c, np.arange(4)))
    # A prompt ubatch is placed as llama.cpp does (consecutive cells from the head).
    cells = c.find_slot(np.zeros(10, np.int64), np.arange(200, 210))
    assert (np.diff(cells) == 1).all()


def test_own_blocks_fall_back_to_any_empty_cell_and_stay_out_of_split_caches():
    c = make(kv_size=64, n_seq=2, own_blocks=True)
    c.find_slot(np.repeat([0, 1], [31, 31]), np.concatenate([np.arange(31), np.arange(31)]))
    # no all-empty block left: seq 0's next cell (31) is taken by seq 1, so it takes any
    # empty cell; seq 1 continues after its last one
    cells = c.find_slot(np.array([0, 1]), np.array([31, 31]))
    assert sorted(cells.tolist()) == [62, 63]
    with pytest.raises(ValueError, match="KV cache full"):
        c.find_slot(np.array([0, 1]), np.array([32, 32]))
    assert not make(n_seq=2, unified=False, own_blocks=True).own_blocks


def test_twin_decode_window_grows_in_steps():
    """On the pure-MLX twin masked cells cost time: the decode window follows the used cells."""
    c = make(kv_size=8192, n_seq=2)
    fill_prompts(c, 2, 60)
    plan = c.prepare(np.arange(2), np.full(2, 60), None)
    assert plan.mask.shape == (2, 2048) and plan.live_blocks.rows.shape == (2, 1 + 2048 // BLOCK)


def test_device_mirror_follows_the_host_metadata():
    """The device copy of positions and sequence bits equals the host's after single-cell
    writes at both ends of the cache (slice updates widened to 4 cells) and scattered writes."""
    c = make(kv_size=64, n_seq=40)  # two bit words
    c.find_slot(np.array([0]), np.array([0]))  # cell 0
    c.build_mask(np.array([0]), np.array([0]), 0, 64)
    c.head[0] = 63
    c.find_slot(np.array([35]), np.array([7]))  # cell 63, the last
    c.build_mask(np.array([0]), np.array([0]), 0, 64)
    np.testing.assert_array_equal(np.array(c._dev_pos), c.pos)
    np.testing.assert_array_equal(np.array(c._dev_bits), c.bits)
    c.seq_rm(0)  # cell 0 emptied ...
    c.seq_cp(35, 2)  # ... and cell 63 tagged: not one run of cells
    c.build_mask(np.array([2]), np.array([9]), 0, 64)
    np.testing.assert_array_equal(np.array(c._dev_pos), c.pos)
    np.testing.assert_array_equal(np.array(c._dev_bits), c.bits)


@pytest.mark.parametrize("scatter_max", [None, 0])
@pytest.mark.parametrize("swa", [None, SWA(24)])
def test_decode_step_inputs_come_from_one_upload(swa, scatter_max, monkeypatch):
    """A decode plan's tokens, positions, cells, mask inputs, live rows and the metadata
    mirror's new cells all come from one packed host array; each must still equal what it
    stands for, step after step (two bit words, the cache's last cells, an out-of-run write;
    with scatter_max 0 that write exceeds what the step packs and takes a second upload)."""
    if scatter_max is not None:
        monkeypatch.setattr(kv_cache, "MIRROR_SCATTER_MAX", scatter_max)
    rng = np.random.default_rng(5)
    c = make(kv_size=200, n_seq=40, swa=swa)
    seqs = np.array([0, 33, 7])
    c.find_slot(np.repeat(seqs, 50), np.tile(np.arange(50), 3))
    for step in range(12):
        if step == 6:
            c.seq_rm(7, 10, 20)  # scattered cells change: the plan must still see them
        toks = rng.integers(0, 1000, 3)
        pos = np.full(3, 50 + step)
        out = np.array([0, 2]) if step % 2 else None
        plan = c.prepare(seqs, pos, out, tokens=toks)
        assert plan.decode
        np.testing.assert_array_equal(np.array(plan.tokens), toks)
        np.testing.assert_array_equal(np.array(plan.positions), pos)
        np.testing.assert_array_equal(np.array(plan.cells), [150 + 3 * step + i for i in range(3)])
        if out is not None:
            np.testing.assert_array_equal(np.array(plan.out_rows), out)
        n = plan.mask.shape[1]
        np.testing.assert_array_equal(np.array(plan.mask), ref_mask(c, seqs, pos, n))
        np.testing.assert_array_equal(np.array(plan.live_blocks.rows), live_rows_ref(c, seqs)[:, : 1 + -(-n // BLOCK)])
        np.testing.assert_array_equal(np.array(c._dev_pos), c.pos)
        np.testing.assert_array_equal(np.array(c._dev_bits), c.bits)


def test_scattered_decode_cells_reach_the_device_mirror_in_the_step_s_upload():
    """Own-block placement puts a step's tokens in B separate places: the mirror's scattered
    cells travel in the step's one upload (no _sync_device), and mirror, mask and live rows
    stay equal to the host's step after step (two bit words, a block boundary crossed)."""
    c = make(kv_size=512, n_seq=40, own_blocks=True)
    seqs = np.array([0, 33, 7])
    c.find_slot(np.repeat(seqs, 30), np.tile(np.arange(30), 3))
    synced = []
    real_sync = c._sync_device
    c._sync_device = lambda: (synced.append(1), real_sync())[1]
    for step in range(40):
        pos = np.full(3, 30 + step)
        plan = c.prepare(seqs, pos, None)
        cells = np.array(plan.cells)
        assert np.diff(np.sort(cells)).min() > 1  # not one run: the scattered path
        n = plan.mask.shape[1]
        np.testing.assert_array_equal(np.array(plan.mask), ref_mask(c, seqs, pos, n))
        np.testing.assert_array_equal(np.array(plan.live_blocks.rows), live_rows_ref(c, seqs)[:, : 1 + -(-n // BLOCK)])
        np.testing.assert_array_equal(np.array(c._dev_pos), c.pos)
        np.testing.assert_array_equal(np.array(c._dev_bits), c.bits)
    assert len(synced) == 40  # build_mask's call, with nothing left to send


def test_empty_ubatch_places_nothing():
    c = make()
    fill_prompts(c, 2, 10)
    pos, bits = c.pos.copy(), c.bits.copy()
    assert len(c.find_slot(np.zeros(0, np.int64), np.zeros(0, np.int64))) == 0
    np.testing.assert_array_equal(c.pos, pos)
    np.testing.assert_array_equal(c.bits, bits)


def test_ab_own_runs_two_unified_caches_one_with_own_blocks():
    """--ab own: llama.cpp's placement and --own-blocks side by side (two unified caches);
    --own-blocks on other A/Bs reaches only their unified modes."""
    from batchbench.run import _modes

    base = dict(no_kvu=False, no_skip=False, own_blocks=False)
    own = _modes(dict(base, ab="own"), fa=1)
    assert [(m.name, m.kv_unified, m.own_blocks) for m in own] == [
        ("llama", True, False), ("own-blocks", True, True)]
    kv = _modes(dict(base, ab="kv", own_blocks=True), fa=1)
    assert [(m.kv_unified, m.own_blocks) for m in kv] == [(True, True), (False, False)]
    assert _modes(dict(base, ab=None), fa=1)[0].own_blocks is False
