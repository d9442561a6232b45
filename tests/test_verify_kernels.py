"""The project's kernels, as MLX would compile them, checked without their hardware:
compiled (CUDA: nvcc sm_90a down to SASS; Metal: clang against the metal_stdlib stand-in)
and emulated on the CPU against float64 NumPy references, plus deliberately broken
variants of the attention kernel that the emulation must reject.

Missing compilers skip these tests, unless BATCHBENCH_REQUIRE_TOOLCHAINS=1 (CI)."""

import dataclasses
import os
import types

import mlx.core as mx
import numpy as np
import pytest

from batchbench.kernels import attention as A
from batchbench.kernels import qmm as Q
from batchbench.kernels.spec import KernelSpec, Launch
from batchbench.verify import RaceError, emulate, toolchain
from batchbench.verify.compile import check_all
from batchbench.verify.cases import attention_case, attention_cases, qmm_case, qmm_cases
from batchbench.verify.emulate import prebuild
from batchbench.verify.rope_cases import qmm_rope_case
from conftest import assert_compile_for_sm90a, verify_emulated

SEED = int(os.environ.get("BATCHBENCH_VERIFY_SEED", np.random.SeedSequence().entropy % (1 << 32)))
N_ATTN = {b: len(attention_cases(b, np.random.default_rng(0))) for b in ("cuda", "metal")}
N_QMM = len(qmm_cases(np.random.default_rng(0)))


def _mutants(backend, rng):
    """(name, case, header edit) for the attention kernel; the edit must break it."""
    case = attention_case(backend, rng, d=64, g=4,
                          layout=dict(kind="interleaved", n_seq=3, tokens_per_seq=2))
    return case, {
        # the barrier between each warp leaving its slice (O rows, max, sum) and every thread
        # reading all of them
        "missing_barrier": ("}\n}\nbb_sync_block();\nBB_STAMP(5);", "}\n}\nBB_STAMP(5);"),
        # a head's sum over the 8 lanes of its column (G <= 8: K Q^T tiles), one step short
        "wrong_reduction": ("l0 += bb_shfl_xor(l0, x);", "l0 += x == 16 ? 0.0f : bb_shfl_xor(l0, x);"),
        # K/V rows copied into the swizzled tiles (D % 64 == 0) without the XOR of the row's
        # r % 8 step by step, so the copies and the tile reads disagree
        "wrong_swizzle": ("((x ^ ((RPI * j) & 7)) << 3)", "(x << 3)"),
    }


def _mutated(case, old, new):
    kspec, launch = case.kernels[0]
    if old not in kspec.header:
        pytest.fail(f"mutation anchor {old!r} is no longer in the attention kernel: update the test")
    return dataclasses.replace(kspec, header=kspec.header.replace(old, new, 1), name=kspec.name + "_mut"), launch


@pytest.fixture(scope="module")
def cases():
    toolchain.need(toolchain.host_cxx)
    rng = np.random.default_rng(SEED)
    out = {
        "cuda": attention_cases("cuda", rng),
        "metal": attention_cases("metal", rng),
        "qmm": qmm_cases(rng),
    }
    kernels = [kl for cs in out.values() for c in cs for kl in c.kernels]
    for backend in ("cuda", "metal"):
        case, muts = _mutants(backend, rng)
        out[f"mut-{backend}"] = (case, muts)
        kernels += [_mutated(case, *m) for m in muts.values()]
    prebuild(kernels)
    return out


def _verify(case):
    return verify_emulated(case, SEED)


@pytest.mark.parametrize("backend,i", [(b, i) for b in ("cuda", "metal") for i in range(N_ATTN[b])])
def test_attention_kernel_emulated_matches_float64(cases, backend, i):
    # fully masked rows, partial last blocks, GQA 1/4/7/8/16, fp16/bf16, additive and bool
    # masks, skip on/off, live-block lists, 1 to many splits (last split merges, in two
    # rounds past 13 records)
    _verify(cases[backend][i])


@pytest.mark.parametrize("i", range(N_QMM))
def test_qmm_kernel_emulated_matches_float64(cases, i):
    # odd M (1, 3, 5, 7, 33), 4/8 bits, group sizes 32/64/128, fp16/bf16, fused bias,
    # K split over blocks + reduce kernel
    _verify(cases["qmm"][i])


@pytest.mark.parametrize("backend", ["cuda", "metal"])
def test_broken_attention_kernel_is_rejected(cases, backend):
    case, muts = cases[f"mut-{backend}"]
    _verify(case)  # the unbroken kernel on the same inputs passes
    spec, launch = _mutated(case, *muts["missing_barrier"])
    with pytest.raises(RaceError):
        emulate(spec, launch)
    for name in ("wrong_reduction", "wrong_swizzle"):
        spec, launch = _mutated(case, *muts[name])
        got = emulate(spec, launch).outputs[0].transpose(0, 2, 1, 3).astype(np.float64)  # [1,T,Hq,D]
        err = np.abs(got - case.expected).max()
        assert not err <= case.atol, f"{name} not detected (max error {err})"


@pytest.mark.parametrize("mergers,splits,parts", [(1, 5, 1), (2, 5, 2), (4, 5, 4), (4, 2, 2), (4, 3, 2), (2, 2, 2)])
def test_merge_in_parts_emulated(monkeypatch, mergers, splits, parts):
    """The split records' merge in parts of the output (BB_ATTN_MERGERS, at most the splits; on
    the GPU the last splits to arrive take one part each; the emulator runs one block at a time,
    so its last split merges every part in turn); the counts end at zero. Leaving a part's last
    item out, or staging every part from the start of the records, must fail."""
    toolchain.need(toolchain.host_cxx)
    monkeypatch.setattr(A, "MERGERS", mergers)
    case = attention_case("cuda", np.random.default_rng(SEED), d=128, g=7, splits=splits,  # >= 11 blocks
                          layout=dict(kind="contiguous", n_seq=2, max_prompt=200, max_tg=40, tail=333))
    kspec, launch = case.kernels[0]
    assert dict(launch.template)["MG"] == parts and launch.grid[1] == splits
    _verify(case)
    muts = [("if (k < PI && r < rows_valid) {", "if (k < PI - 1 && r < rows_valid) {")]
    if parts > 1:
        muts.append(("(stage, recs, sb, lo * IB, tid);", "(stage, recs, sb, 0, tid);"))
    for old, new in muts:
        spec, launch = _mutated(case, old, new)
        got = emulate(spec, launch).outputs[0].transpose(0, 2, 1, 3).astype(np.float64)
        err = np.abs(got - case.expected).max()
        assert not err <= case.atol, f"mutant {new!r} not detected (max error {err})"


@pytest.mark.parametrize("backend", ["cuda", "metal"])
def test_six_heads_per_kv_head_emulated(backend):
    """G=6 (Qwen2.5-1.5B): the K Q^T tiles' 8 head columns hold 6 heads and 2 zero rows of Q,
    which must not reach the output."""
    toolchain.need(toolchain.host_cxx)
    case = attention_case(backend, np.random.default_rng(SEED), dtype=mx.bfloat16, d=128, g=6, splits=3,
                          live="exact", layout=dict(kind="contiguous", n_seq=2, max_prompt=120, empty_row=True))
    _verify(case)


@pytest.mark.parametrize("backend", ["cuda", "metal"])
@pytest.mark.parametrize("d", [32, 96])
def test_other_head_dims_emulated(backend, d):
    """Head dims the kernel takes besides 64 and 128: 2 and 6 k-steps of K Q^T and m-tiles of
    O^T (G=7), over 3 splits."""
    toolchain.need(toolchain.host_cxx)
    case = attention_case(backend, np.random.default_rng(SEED), d=d, g=7, splits=3, live="exact",
                          layout=dict(kind="contiguous", n_seq=2, max_prompt=120))
    _verify(case)


@pytest.mark.parametrize("backend", ["cuda", "metal"])
def test_q_tile_from_word_loads_emulated(backend):
    """Q reaches its shared-memory tile by cp.async when q is 16-byte aligned, else by 4-byte
    words (an MLX view may start at any even element). The emulator's inputs are always
    aligned, so the word path is forced by editing the kernel's test; it must give the same
    result, and a word path that stepped between the group's heads by one row must fail."""
    toolchain.need(toolchain.host_cxx)
    case = attention_case(backend, np.random.default_rng(SEED), d=64, g=7, splits=3,
                          layout=dict(kind="interleaved", n_seq=3, tokens_per_seq=2))
    _verify(case)
    words = _edit_executor("if (bb_aligned16(q)) {", "if (false) {")
    case.verify(words)
    wrong = "(qrow + (long)r * n_rows * D + 2 * w2)"
    with pytest.raises(AssertionError):
        case.verify(lambda k, l: words(dataclasses.replace(k, header=k.header.replace(wrong, "(qrow + (long)r * D + 2 * w2)", 1)), l))


# The walk's read of a cell's staged mask value, and the same read of the neighbouring cell's.
_MASK_READ = {
    4: ("bb_mask_value(mt[16 * t2 + g + 8 * h])", "bb_mask_value(mt[16 * t2 + (g ^ 1) + 8 * h])"),  # K Q^T tiles
    16: ("bb_mask_value(mt[8 * j + 2 * c + e])", "bb_mask_value(mt[8 * j + 2 * c + 1 - e])"),  # Q K^T tiles
}


@pytest.mark.parametrize("mask_kind", ["add", "bool"])
@pytest.mark.parametrize("g", [4, 16])
def test_staged_mask_values_are_each_cell_s_own(mask_kind, g):
    """Whole blocks of an aligned mask row reach the walk through the pipeline stage with
    their K/V. Rows that see every other cell (and one whole block) pass; the same kernel
    reading each cell's neighbour's staged value fails (G=4: heads as tile columns, G=16: as rows)."""
    n = 128
    vis = np.zeros((2, n), bool)
    vis[0, 0::2] = True
    vis[1, 1::2] = True
    vis[:, 64:96] = True
    case = attention_case("cuda", np.random.default_rng(SEED), d=64, g=g, visible=vis, mask_kind=mask_kind)
    _verify(case)
    spec, launch = _mutated(case, *_MASK_READ[g])
    got = emulate(spec, launch).outputs[0].transpose(0, 2, 1, 3).astype(np.float64)
    err = np.abs(got - case.expected).max()
    assert not err <= case.atol, f"neighbour's mask value not detected (max error {err})"


def _edit_executor(old, new):
    """Emulates every launch with `old` replaced by `new` in its kernel's header."""
    def execute(spec, launch):
        if old not in spec.header:
            pytest.fail(f"mutation anchor {old!r} is not in {spec.name}: update the test")
        res = emulate(dataclasses.replace(spec, header=spec.header.replace(old, new, 1), name=spec.name + "_mut"), launch)
        return res.outputs, res.inputs_after
    return execute


@pytest.mark.parametrize("kernel,old,new", [
    # the attention walk's wait for the oldest pipeline stage, and the merge's wait for the
    # staged split records
    ("attn", "bb_cp_async_wait<STAGES - 1>();", "bb_cp_async_wait<STAGES>();"),
    ("attn-merge", "bb_cp_async_wait<0>();\nbb_sync_block();", "bb_cp_async_wait<1>();\nbb_sync_block();"),
    # the wait for the Q tile's group, and the barrier after it (each warp reads rows that
    # other warps' threads copied)
    ("attn-q", "bb_cp_async_wait<STAGES>();\nbb_sync_block();", "bb_sync_block();"),
    ("attn-qbar", "bb_cp_async_wait<STAGES>();\nbb_sync_block();", "bb_cp_async_wait<STAGES>();"),
    # the matmul's wait for x copied unchanged (bf16), and its ring's wait for the oldest slot
    # (fp16: x goes through registers, so the ring's first requests are still in flight)
    ("qmm-x", "qmm_cp_wait<0>();", ""),
    ("qmm-ring", "qmm_cp_wait<NS - 1>();", "qmm_cp_wait<NS>();"),
])
def test_cp_async_copies_land_only_at_their_wait(kernel, old, new):
    """The emulator holds a cp.async copy back until a wait retires its group, so a kernel
    that waits for one group too few reads stale or poisoned shared memory and fails."""
    toolchain.need(toolchain.host_cxx)
    rng = np.random.default_rng(SEED)
    if kernel == "qmm-x":
        case = qmm_case(rng, m=9, bits=8, group_size=32, n=160, k=512, res=True, blocks=4, ns=4, dtype=mx.bfloat16)
    elif kernel == "qmm-ring":
        case = qmm_case(rng, m=9, bits=4, group_size=32, n=256, k=512, res=True, blocks=3, ns=3, wf=2)
    else:
        case = attention_case("cuda", rng, d=64, g=4, splits=4 if kernel == "attn-merge" else None,
                              layout=dict(kind="interleaved", n_seq=3, tokens_per_seq=2))
    _verify(case)
    with pytest.raises(AssertionError):
        case.verify(_edit_executor(old, new))


@pytest.mark.parametrize("settings,spec", [
    ("1/0", dict(m=3, bits=4, group_size=32, norm=True, bias=True)),
    ("1/0", dict(m=9, bits=4, group_size=32, norm=True, res=True, lop3=False)),  # two groups of 8 rows
    ("1/0", dict(m=5, bits=8, n=160, k=512, norm=True, res=True, blocks=4, dtype=mx.bfloat16)),  # x by cp.async
    ("1/0", dict(m=3, bits=4, group_size=32, n=96, norm=True, glu_pair=True, blocks=2)),
    # norm weights loaded before the staging: all of them (K <= 16 threads' worth), and with one
    # warp (32 threads, K=1024) two granules a thread early and the other two in the norm's loop
    ("0/1", dict(m=3, bits=4, group_size=32, norm=True, bias=True)),
    ("0/1", dict(m=2, bits=4, group_size=32, n=32, k=1024, norm=True, wk=1, dtype=mx.bfloat16)),
    ("1/1", dict(m=9, bits=4, group_size=32, n=96, norm=True, glu_pair=True, blocks=2)),
    ("0/0", dict(m=9, bits=4, group_size=32, n=96, norm=True, glu_pair=True, blocks=2)),
    # folded over a split K (always the pass): each slice's norm weights from its own offset, in the
    # norm's loop (odd chunks a slice), and one warp with two granules early and the rest in the loop
    ("0/0", dict(m=16, bits=4, group_size=32, n=64, k=1280, split=4, norm=True, bias=True)),
    ("0/1", dict(m=2, bits=4, group_size=32, n=32, k=2048, split=2, norm=True, wk=1)),
])
def test_qmm_norm_variants_emulated(monkeypatch, settings, spec):
    """The fused RMSNorm's variants, each forced (BB_QMM_NORM_PASS / BB_QMM_NW_EARLY; the
    default picks them by M): sums of squares in a pass over the staged rows instead of inside
    the staging loop, and the norm weights loaded before the staging."""

    toolchain.need(toolchain.host_cxx)
    npass, early = settings.split("/")
    monkeypatch.setattr(Q, "NORM_PASS", npass)
    monkeypatch.setattr(Q, "NW_EARLY", early)
    case = qmm_case(np.random.default_rng(SEED), **spec)
    launch = case.kernels[0][1]
    template = dict(launch.template)
    folded = spec.get("split", 1) > 1
    assert (template["NPASS"], template["NEARLY"]) == (npass == "1" or folded, early == "1")
    assert (len(launch.output_shapes) == 2) == folded
    if spec.get("wk") == 1:
        assert launch.threadgroup[0] == 32 and spec["k"] // 8 > 2 * 32  # the norm loop loads the rest
    _verify(case)


@pytest.mark.parametrize("spec", [
    dict(m=3, bits=4, group_size=32, bias=True, res=True),  # every output element preloaded
    dict(m=33, bits=4, n=128, bias=True, res=True),  # more outputs than threads: the rest load late
    dict(m=1, bits=4, group_size=32, n=208, k=512, norm=True, bias=True, res=True, blocks=3),  # per tile
    dict(m=3, bits=4, group_size=32, n=96, norm=True, glu_pair=True, blocks=2),
    dict(rope=True, m=1, bias=True, norm=True),  # q, k and v rows: angle and cell preloaded
    dict(rope=True, m=11, dtype=mx.bfloat16, norm=True, bias=True, k=512),
])
@pytest.mark.parametrize("pre", [True, False])
def test_qmm_epilogue_preload_emulated(monkeypatch, spec, pre):
    """BB_QMM_EPI_PRE: the bias, residual, RoPE angle and cache cell of a thread's first
    epilogue element load before the tile's main loop (1, the default) or after the
    reduction (0); both against float64."""

    toolchain.need(toolchain.host_cxx)
    monkeypatch.setattr(Q, "EPI_PRE", pre)
    spec = dict(spec)
    rng = np.random.default_rng(SEED)
    case = qmm_rope_case(rng, **spec) if spec.pop("rope", False) else qmm_case(rng, **spec)
    assert dict(case.kernels[0][1].template)["EPRE"] == pre
    _verify(case)


def test_qmm_norm_variant_by_rows(monkeypatch):
    """auto: the sums' pass from 4 rows of x on; the weights early except for the gate/up pair
    at one row with its sums in the staging loop (the H200 measured each of these)."""

    monkeypatch.setattr(Q, "NORM_PASS", "auto")
    monkeypatch.setattr(Q, "NW_EARLY", "auto")
    assert [Q.norm_variant(m, False) for m in (1, 2, 3, 4, 8, 64)] == [(False, True)] * 3 + [(True, True)] * 3
    assert [Q.norm_variant(m, True) for m in (1, 2, 4)] == [(False, False), (False, True), (True, True)]
    monkeypatch.setattr(Q, "NORM_PASS", "1")
    assert Q.norm_variant(1, True) == (True, True)
    monkeypatch.setattr(Q, "NW_EARLY", "0")
    assert Q.norm_variant(8, False) == (True, False)


@pytest.mark.parametrize("backend", ["cuda", "metal"])
def test_attention_workspace_is_a_pooled_input_that_needs_no_cleaning(backend):
    """The splits' records live in a workspace input taken from a rotating pool (one output a
    launch, not two): consecutive plans get different buffers of at least the records' size,
    and a workspace full of NaN from earlier launches does not change the result."""
    toolchain.need(toolchain.host_cxx)
    vis = np.zeros((2, 300), dtype=bool)
    vis[0, :150] = vis[1, 150:] = True
    case = attention_case(backend, np.random.default_rng(SEED), d=64, g=4, splits=4, live="exact", visible=vis)
    kspec, launch = case.kernels[0]
    assert kspec.output_names == ("out",) and len(launch.output_shapes) == 1
    ws_at = list(kspec.input_names).index("ws")
    pairs = launch.grid[2] * (launch.grid[0] // launch.threadgroup[0])
    need = pairs * launch.grid[1] * A.record_bytes(4, 64, 2) // 4
    assert launch.grid[1] == 4 and launch.inputs[ws_at].size >= need
    again = A.plan_decode_attention(backend, *launch.inputs[:4], scale=1.0, live_blocks=A.PackedLive(launch.inputs[4]))
    assert again[1].inputs[ws_at] is not launch.inputs[ws_at]
    launch.inputs[ws_at] = mx.full(launch.inputs[ws_at].shape, float("nan"), dtype=mx.float32)
    case.verify(schedules=("forward", "reverse"))


@pytest.mark.parametrize("splits", [1, 4])
def test_attention_timeline_build_stamps_every_block(splits):
    """The diagnostic build (phase timestamps after the split records) keeps the result, and
    every block's thread 0 stamps each phase it reaches in its own slot (the portable timer
    writes the phase number; guard pages catch a slot past the buffer): the merge's phases in
    the last split of each (row, kv head) only."""
    from batchbench.kernels.attention import STAMPS, read_timeline

    toolchain.need(toolchain.host_cxx)
    vis = np.zeros((2, 300), dtype=bool)  # two sequences of 150 cells: 10 blocks, enough for 4 splits
    vis[0, :150] = vis[1, 150:] = True
    case = attention_case("cuda", np.random.default_rng(SEED), d=64, g=4, splits=splits, live="exact",
                          visible=vis, timeline=True)
    # Which split merges (and stamps phases 8-11) depends on the block schedule: each schedule
    # on its own.
    for schedule in ("forward", "reverse"):
        case.verify(schedules=(schedule,))
    kspec, launch = case.kernels[0]
    assert kspec.name.endswith("_tl") and launch.grid[1] == splits
    ws_at = list(kspec.input_names).index("ws")
    stamps = read_timeline(emulate(kspec, launch, schedules=("forward",)).inputs_after[ws_at], launch)
    blocks = launch.grid[1] * launch.grid[2] * (launch.grid[0] // launch.threadgroup[0])
    assert stamps.shape == (blocks, STAMPS)
    for phase in (1, 2, 4, 5, 7, 12):
        assert (stamps[:, phase] == phase).all(), f"phase {phase} not stamped by every block"
    assert set(stamps[:, 3].tolist()) <= {0, 3}  # 0: the block's warp 0 had no K/V block
    assert (stamps[:, 6] == (6 if splits > 1 else 0)).all()  # the split counter exists with splits
    merged = stamps[:, 8] == 8  # the last split of each (row, kv head) merges
    assert merged.sum() == (launch.grid[2] * (launch.grid[0] // launch.threadgroup[0]) if splits > 1 else 0)
    for phase in (9, 10, 11):
        assert (stamps[merged, phase] == phase).all() and (stamps[~merged, phase] == 0).all()
    with pytest.raises(ValueError, match="CUDA only"):
        attention_case("metal", np.random.default_rng(0), timeline=True)


# ---- compile checks ------------------------------------------------------------------------


def test_cuda_kernels_compile_for_sm90a():
    rng = np.random.default_rng(SEED)
    assert_compile_for_sm90a([
        attention_case("cuda", rng, dtype=mx.float16, d=128, g=7).kernels[0],
        attention_case("cuda", rng, dtype=mx.bfloat16, d=64, g=4, mask_kind="bool", live="exact").kernels[0],
        attention_case("cuda", rng, dtype=mx.float16, d=128, g=7, timeline=True).kernels[0],  # %globaltimer
        *qmm_case(rng, m=3, bits=4).kernels,
        *qmm_case(rng, m=5, bits=8, dtype=mx.bfloat16, split=2, bias=True).kernels,
    ])


def test_metal_kernels_compile(cases):
    toolchain.need(toolchain.clang)
    results = check_all([c.kernels[0] for c in cases["metal"]])
    for r in results:
        assert r.ok, f"{r.kernel_name} does not compile against the Metal stand-in:\n{r.log}"


def test_compile_checks_reject_broken_sources():
    toolchain.need(toolchain.clang)
    toolchain.need(toolchain.nvcc)
    launch = Launch([mx.zeros((32,))], [(32,)], [mx.float32], (32, 1, 1), (32, 1, 1))
    metal = KernelSpec("metal", "bad", ("a",), ("out",),
                       "out[thread_position_in_grid.x] = simd_sum(a[0], 3);")
    # a PTX operand error only ptxas sees (mma.m16n8k16 takes 4 A registers, not 3)
    cuda = KernelSpec("cuda", "bad", ("a",), ("out",), r"""
  float c0 = 0, c1 = 0, c2 = 0, c3 = 0; unsigned r = __float_as_uint(a[0]);
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%4,%4}, {%4,%4}, {%0,%1,%2,%3};"
               : "+f"(c0), "+f"(c1), "+f"(c2), "+f"(c3) : "r"(r));
  out[threadIdx.x] = c0 + c1 + c2 + c3;""")
    # more shared memory than an sm_90 block may have: compiles, but MLX's launch would fail
    big = KernelSpec("cuda", "big", ("a",), ("out",), "out[threadIdx.x] = a[0];",
                     shared_memory=240 * 1024)
    rm, rc, rb = check_all([(metal, launch), (cuda, launch), (big, launch)])
    assert not rm.ok and "simd_sum" in rm.log
    assert not rc.ok and "ptxas" in rc.log.lower()
    assert not rb.ok and "shared memory" in rb.log


def test_pair_reduce_four_pairs_a_thread_is_bit_identical(monkeypatch):
    """BB_QMM_RED_VEC: the pair reduce after a split K with four pairs a thread (16-byte loads)
    sums the same partials in the same order as one pair a thread: bit-identical y for the gate
    product (with and without bias, odd M, 2-7 slices); the RoPE pair through it against float64.
    `glu` takes four pairs a thread for the gate product only."""
    toolchain.need(toolchain.host_cxx)
    rng = np.random.default_rng(SEED)
    for s, m, n, bias in [(2, 32, 256, False), (3, 5, 96, True), (7, 17, 64, False)]:
        part = mx.array(rng.standard_normal((s, m, n)).astype(np.float32))
        b = mx.array(rng.standard_normal((n,)).astype(np.float32)).astype(mx.float16) if bias else None
        ys = []
        for vec in ("0", "1", "glu"):
            monkeypatch.setattr(Q, "RED_VEC", vec)
            ks, launch = Q.plan_qmm_reduce(part, mx.float16, b, glu_pair=True)
            pv = 1 if vec == "0" else 4
            assert dict(launch.template)["PV"] == pv
            assert launch.grid[0] == m * n // 2 // pv
            ys.append(np.array(emulate(ks, launch, schedules=("forward",)).outputs[0]))
        assert np.array_equal(ys[0], ys[1]) and np.array_equal(ys[0], ys[2]), (s, m, n, bias)
    for vec, pv in (("1", 4), ("glu", 1)):
        monkeypatch.setattr(Q, "RED_VEC", vec)
        case = qmm_rope_case(rng, m=9, norm=True, bias=True, k=768, split=3)
        assert [dict(launch.template)["PV"] for _, launch in case.kernels[1:]] == [pv], vec
        if vec == "1":
            _verify(case)


def test_plain_reduce_eight_a_thread_is_bit_identical_and_right(monkeypatch):
    """The plain reduce after a split K (lm_head's) with 8 elements a thread (PLAIN_RED_VEC, 16-byte
    stores) sums the same partials in the same order as one a thread: bit-identical y for fp32 and
    fp16 partials, with and without bias and residual, a folded norm's row scale, odd M, 2-9 slices;
    and y matches the float64 sum within the output's rounding."""
    toolchain.need(toolchain.host_cxx)
    rng = np.random.default_rng(SEED)
    for s, m, n, pdt, bias, res, norm in [(2, 32, 256, mx.float16, False, False, False),
                                          (3, 5, 96, mx.float32, True, True, False),
                                          (9, 17, 64, mx.float16, False, True, False),
                                          (2, 3, 128, mx.float32, True, False, True)]:
        part = mx.array(rng.standard_normal((s, m, n)).astype(np.float32)).astype(pdt)
        b = mx.array(rng.standard_normal((n,)).astype(np.float32)).astype(mx.float16) if bias else None
        r = mx.array(rng.standard_normal((m, n)).astype(np.float32)).astype(mx.float16) if res else None
        ss = mx.array(rng.uniform(0.5, 2.0, (s, m)).astype(np.float32)) if norm else None
        ys = []
        for vec in (1, 8):
            monkeypatch.setattr(Q, "PLAIN_RED_VEC", vec)
            ks, launch = Q.plan_qmm_reduce(part, mx.float16, b, r, norm=(ss, 4 * n, 1e-5) if norm else None)
            assert dict(launch.template)["V"] == vec and launch.grid[0] == m * n // vec
            ys.append(np.array(emulate(ks, launch, schedules=("forward",)).outputs[0]).astype(np.float64))
        assert np.array_equal(ys[0], ys[1]), (s, m, n, pdt, bias, res, norm)
        want = np.array(part.astype(mx.float32), dtype=np.float64).sum(axis=0)
        if norm:
            want *= 1.0 / np.sqrt(np.array(ss, dtype=np.float64).sum(axis=0) / (4 * n) + 1e-5)[:, None]
        if bias:
            want += np.array(b.astype(mx.float32), dtype=np.float64)[None, :]
        if res:
            want += np.array(r.astype(mx.float32), dtype=np.float64)
        assert np.abs(ys[1] - want).max() <= 2e-3 * max(1.0, np.abs(want).max()), (s, m, n, pdt)


def test_gpu_verify_row_lines_say_pass_and_failure():
    """batchbench.verify.gpu prints each case's line as the case ends (a run cut short by a time
    limit keeps them): its error and tolerance, or ERROR and the exception's first words."""
    from batchbench.verify.gpu import _row_line

    ok = {"case": "qmv8-cuda-fp16-M1", "atol": 1.3e-2, "ptx": {"ok": True, "max_err": 9.83e-4}}
    line = _row_line(ok)
    assert line.startswith("qmv8-cuda-fp16-M1") and "9.83e-04" in line and "1.3e-02" in line and "\n" not in line
    bad = {"case": "attn-cuda-x", "atol": 1e-3, "ptx": {"ok": True, "max_err": 1e-4},
           "portable": {"ok": False, "error": "RuntimeError: launch failed"}, "ptx_vs_portable": None}
    head, err = _row_line(bad).split("\n")
    assert "ERROR" in head and "1.00e-04" in head
    assert err.strip() == "portable: RuntimeError: launch failed"


def test_gpu_case_filters():
    """batchbench.verify.gpu's BATCHBENCH_VERIFY_ONLY (kinds) and BATCHBENCH_VERIFY_MATCH (name
    parts, all of the comma-separated ones), and the one-line error where none is left."""
    from batchbench.verify.gpu import select

    cases = [types.SimpleNamespace(name=n) for n in (
        "qmm-cuda-fp16-M3-split2-bias", "qmm-cuda-bf16-M3-split2", "qmm-rope-cuda-fp16-M9-split3", "attn-cuda-fp16-B2")]
    names = lambda got: [c.name for c in got[0]]
    assert names(select(cases, "", "")) == [c.name for c in cases]
    assert names(select(cases, "qmm", "")) == ["qmm-cuda-fp16-M3-split2-bias", "qmm-cuda-bf16-M3-split2"]
    assert names(select(cases, "qmm,qmm-rope", "fp16,-split")) == ["qmm-cuda-fp16-M3-split2-bias",
                                                                    "qmm-rope-cuda-fp16-M9-split3"]
    assert names(select(cases, " attn ", "")) == ["attn-cuda-fp16-B2"]
    got, error = select(cases, "mask", "")
    assert got == [] and error.startswith("BATCHBENCH_VERIFY_ONLY=mask selects no case (kinds: attn,")
    got, error = select(cases, "qmm", "bf16,-bias")
    assert got == [] and error == "BATCHBENCH_VERIFY_MATCH=bf16,-bias selects no case"
