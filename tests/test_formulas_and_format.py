"""llama-batched-bench's formulas and byte layouts."""

import json

import numpy as np
import pytest

from batchbench.bench import context_layout, make_row, n_ctx_req
from batchbench.formats import BenchRow, Header, header_line, jsonl_row, md_row, table_header

SPEC_TABLE = """|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|
|  8192 |     32 |    1 |   8224 |    3.101 |  2641.88 |    0.478 |    66.95 |    3.579 |  2298.00 |"""


def test_md_layout_matches_llama_cpp_bytes():
    head, sep, row = SPEC_TABLE.splitlines()
    assert table_header() == head + "\n" + sep
    r = BenchRow(8192, 32, 1, 8224, 3.101, 2641.88, 0.478, 66.95, 3.579, 2298.00)
    assert md_row(r) == row


def test_header_line():
    h = Header(33792, 2048, 512, -1, 0, 1, -1, 16, 16)
    assert header_line(h) == (
        "main: n_kv_max = 33792, n_batch = 2048, n_ubatch = 512, flash_attn = -1, is_pp_shared = 0, "
        "is_tg_separate = 1, n_gpu_layers = -1, n_threads = 16, n_threads_batch = 16")


def test_jsonl_keys_and_order():
    h = Header(2048, 2048, 512, 0, 0, 0, 99, 8, 8)
    r = make_row(128, 128, 1, False, True, 0.233810, 3.503684)
    line = jsonl_row(h, r, {"model": "x"})
    d = json.loads(line)
    keys = list(d)[:18]
    assert keys == ["n_kv_max", "n_batch", "n_ubatch", "flash_attn", "is_pp_shared", "n_gpu_layers",
                    "n_threads", "n_threads_batch", "pp", "tg", "pl", "n_kv", "t_pp", "speed_pp",
                    "t_tg", "speed_tg", "t", "speed"]
    assert line.startswith('{"n_kv_max": 2048, "n_batch": 2048, "n_ubatch": 512, "flash_attn": 0')
    assert '"t_pp": 0.233810, "speed_pp": 547.4' in line
    assert d["model"] == "x"


@pytest.mark.parametrize("pps", [False, True])
@pytest.mark.parametrize("unified", [False, True])
def test_formulas(pps, unified):
    pp, tg, pl, t_pp, t_tg = 2048, 128, 8, 3.613, 10.194
    r = make_row(pp, tg, pl, pps, unified, t_pp, t_tg)
    n_pp = pp if pps else pl * pp
    assert r.n_kv == ((pp if unified else pl * pp) + pl * tg if pps else pl * (pp + tg))
    f = np.float32
    assert r.speed_pp == pytest.approx(n_pp / t_pp, rel=1e-6)
    assert r.speed_tg == pytest.approx(pl * tg / t_tg, rel=1e-6)
    assert r.t == pytest.approx(t_pp + t_tg, rel=1e-6)
    assert r.speed == pytest.approx((n_pp + pl * tg) / (t_pp + t_tg), rel=1e-6)
    assert r.speed_tg == float(f(pl * tg) / f(t_tg))  # float32, like llama.cpp


def test_published_row_reproduced():
    # PR #4280, M3 Max, shared prompt (unified): 2048|128|8|3072|3.613|566.77|10.194|100.45|13.808|222.49
    # (the published S_PP 566.77 came from unrounded times; 2048 / 3.613 = 566.84)
    r = make_row(2048, 128, 8, True, True, 3.613, 10.194)
    assert r.n_kv == 3072
    assert abs(r.speed_tg - 100.45) < 0.005 and abs(r.speed - 222.49) < 0.02
    assert abs(r.speed_pp - 2048 / 3.613) < 0.01


def test_pp_zero_prints_zero_speed():
    r = make_row(0, 32, 32, False, True, 0.0, 0.768)
    assert r.speed_pp == 0.0 and r.n_kv == 1024
    assert "|     0 |     32 |   32 |   1024 |    0.000 |     0.00 |" in md_row(r)


def test_context_layout():
    assert context_layout(40000, 3, True) == (40192, 40192)
    assert context_layout(40000, 3, False) == (13568, 40704)  # anchor header: n_kv_max = 40704
    assert context_layout(2048, 32, False) == (256, 8192)
    assert context_layout(140000, 32, False)[1] == 147456
    assert n_ctx_req(8192, 32, 3, False, True) == 24672
