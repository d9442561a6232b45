import math
import random
from pathlib import Path

import numpy as np
import pytest

from batchbench.compare import read_results
from batchbench.stats import combine_repetitions, llama_row, n_kv_required, summarize

DATA = Path(__file__).parent / "data"


def test_summarize_odd_even_and_errors():
    assert summarize([3.0, 1.0, 2.0]) == (2.0, 1.0, 3.0)
    assert summarize([4.0, 1.0, 3.0, 2.0]) == (2.5, 1.0, 4.0)
    assert summarize([7]) == (7.0, 7.0, 7.0)
    with pytest.raises(ValueError):
        summarize([])
    with pytest.raises(ValueError):
        summarize([1.0, float("nan")])


def test_summarize_matches_numpy_on_random_inputs():
    rng = random.Random(1234)
    for n in range(1, 12):
        vals = [rng.uniform(0.01, 5.0) for _ in range(n)]
        med, lo, hi = summarize(vals)
        assert med == pytest.approx(float(np.median(vals)), rel=1e-12)
        assert (lo, hi) == (min(vals), max(vals))


def test_llama_row_reproduces_llamacpp_jsonl_digits_in_float32():
    # The README jsonl example: t_pp = 233810 us, t_tg = 3503684 us, printed with %f.
    r = llama_row(128, 128, 1, 233810 / 1e6, 3503684 / 1e6)
    got = ["%f" % v for v in (r.t_pp, r.speed_pp, r.t_tg, r.speed_tg, r.t, r.speed)]
    assert got == ["0.233810", "547.453064", "3.503684", "36.532974", "3.737494", "68.495094"]
    assert r.n_kv == 256
    # float64 would print different digits, so this checks the float32 arithmetic itself.
    assert "%f" % (128 / 0.23381) != "547.453064"
    # The same row as read from the copied jsonl file.
    (row,) = read_results(DATA / "llamacpp-readme.jsonl")
    assert "%f" % row.speed_pp == got[1] and "%f" % row.speed == got[5]


def test_n_kv_and_speeds_for_every_mode():
    assert n_kv_required(512, 32, 3) == 3 * 544
    assert n_kv_required(4096, 32, 8, pps=True, kv_unified=True) == 4096 + 8 * 32
    assert n_kv_required(4096, 32, 8, pps=True, kv_unified=False) == 8 * 4096 + 8 * 32
    r = llama_row(512, 32, 3, 0.5, 0.25)
    assert r.speed_pp == pytest.approx(3 * 512 / 0.5, rel=1e-6)
    assert r.speed_tg == pytest.approx(3 * 32 / 0.25, rel=1e-6)
    assert r.speed == pytest.approx(3 * 544 / 0.75, rel=1e-6)
    s = llama_row(4096, 32, 8, 0.5, 0.25, pps=True)
    assert s.speed_pp == pytest.approx(4096 / 0.5, rel=1e-6)  # one shared prompt
    assert s.speed == pytest.approx((4096 + 8 * 32) / 0.75, rel=1e-6)
    z = llama_row(0, 32, 2, 0.0, 0.1)
    assert z.speed_pp == 0.0 and z.t_pp == 0.0  # PP = 0 prints 0.00, not nan


def _interval(tokens: int, t_printed: float) -> tuple[float, float]:
    """Speeds possible for a time printed with 3 decimals (half a unit either side)."""
    return tokens / (t_printed + 0.0005), tokens / max(t_printed - 0.0005, 1e-9)


@pytest.mark.parametrize(
    "name,pps",
    [
        ("llamacpp-h200-seed-split.md", False),
        ("llamacpp-h200-scaling-unified.md", False),
        ("llamacpp-h200-pps.md", True),
    ],
)
def test_formulas_agree_with_real_llamacpp_rows(name, pps):
    # Printed times are rounded, so check each printed speed lies in the range the rounded
    # time allows: a wrong token count (e.g. B*PP for a shared prompt) falls outside it.
    for r in read_results(DATA / name):
        assert r.n_kv == n_kv_required(r.pp, r.tg, r.pl, pps=pps, kv_unified=True)
        pp_tokens = r.pp if pps else r.pl * r.pp
        if r.pp:
            lo, hi = _interval(pp_tokens, r.t_pp)
            assert lo * 0.9999 <= r.speed_pp <= hi * 1.0001, (name, r)
        lo, hi = _interval(r.pl * r.tg, r.t_tg)
        assert lo * 0.9999 <= r.speed_tg <= hi * 1.0001, (name, r)
        lo, hi = _interval(pp_tokens + r.pl * r.tg, r.t)
        assert lo * 0.9999 <= r.speed <= hi * 1.0001, (name, r)
        # Our float32 formulas on the printed times land in the same place.
        ours = llama_row(r.pp, r.tg, r.pl, r.t_pp, r.t_tg, pps=pps)
        assert ours.speed_tg == pytest.approx(r.speed_tg, rel=0.005)


def test_combine_repetitions_median_times_and_speed_spread():
    t_pp = [0.30, 0.20, 0.25]
    t_tg = [0.11, 0.10, 0.14]
    row = combine_repetitions(512, 32, 2, t_pp, t_tg)
    assert row.reps == 3
    assert row.t_pp == pytest.approx(0.25, rel=1e-6)
    assert row.t_tg == pytest.approx(0.11, rel=1e-6)
    assert row.t == pytest.approx(0.36, rel=1e-6)  # median(T_PP) + median(T_TG)
    assert row.speed_pp == pytest.approx(1024 / 0.25, rel=1e-6)
    assert row.speed_tg == pytest.approx(64 / 0.11, rel=1e-6)
    assert row.speed == pytest.approx((1024 + 64) / 0.36, rel=1e-6)
    # Slowest speed comes from the longest time and the other way round.
    assert row.speed_pp_min == pytest.approx(1024 / 0.30, rel=1e-6)
    assert row.speed_pp_max == pytest.approx(1024 / 0.20, rel=1e-6)
    assert row.speed_tg_min == pytest.approx(64 / 0.14, rel=1e-6)
    assert row.speed_tg_max == pytest.approx(64 / 0.10, rel=1e-6)
    assert row.speed_min == pytest.approx(1088 / 0.41, rel=1e-6)  # run 0 is slowest in total
    assert row.speed_max == pytest.approx(1088 / 0.30, rel=1e-6)  # run 1 is fastest
    assert row.speed_pp_min <= row.speed_pp <= row.speed_pp_max
    assert set(row.as_dict()) >= {
        "speed_pp_min",
        "speed_pp_max",
        "speed_tg_min",
        "speed_tg_max",
        "reps",
    }


def test_combine_repetitions_random_against_float64_reference():
    rng = random.Random(7)
    for _ in range(50):
        n = rng.randint(1, 9)
        pp, tg, pl = rng.choice([0, 128, 4096]), rng.choice([1, 32]), rng.randint(1, 32)
        pps = rng.random() < 0.3
        t_pp = [rng.uniform(0.001, 3.0) for _ in range(n)]
        t_tg = [rng.uniform(0.001, 1.0) for _ in range(n)]
        row = combine_repetitions(pp, tg, pl, t_pp, t_tg, pps=pps)
        ptok = pp if pps else pl * pp
        med_pp, med_tg = float(np.median(t_pp)), float(np.median(t_tg))
        assert row.speed_pp == pytest.approx(ptok / med_pp if ptok else 0.0, rel=1e-5)
        assert row.speed_tg == pytest.approx(pl * tg / med_tg, rel=1e-5)
        assert row.speed == pytest.approx((ptok + pl * tg) / (med_pp + med_tg), rel=1e-5)
        per_run = [pl * tg / t for t in t_tg]
        assert row.speed_tg_min == pytest.approx(min(per_run), rel=1e-5)
        assert row.speed_tg_max == pytest.approx(max(per_run), rel=1e-5)
        # Single precision, as llama.cpp: every reported value is a float32 number.
        assert float(np.float32(row.speed_tg)) == row.speed_tg


def test_combine_repetitions_rejects_bad_input():
    with pytest.raises(ValueError):
        combine_repetitions(1, 1, 1, [0.1, 0.2], [0.1])
    with pytest.raises(ValueError):
        combine_repetitions(1, 1, 1, [], [])
    with pytest.raises(ValueError):
        combine_repetitions(1, 1, 1, [-0.1], [0.1])
    assert math.isinf(combine_repetitions(8, 1, 1, [0.0], [0.1]).speed_pp)
