import csv
import io
import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from batchbench.compare import (
    compare_main,
    compare_sides,
    load_sides,
    ratio,
    read_results,
    register,
)

DATA = Path(__file__).parent / "data"
SEED_SPLIT = DATA / "llamacpp-h200-seed-split.md"
SEED_UNIFIED = DATA / "llamacpp-h200-seed-unified.md"
SCALING_UNIFIED = DATA / "llamacpp-h200-scaling-unified.md"
AB = DATA / "batchbench-ab.md"

LOG_BEFORE = """\
ggml_cuda_init: found 1 CUDA devices:
  Device 0: NVIDIA H200, compute capability 9.0, VMM: yes
llama_model_loader: loaded meta data with 26 key-value pairs and 339 tensors from q4_0.gguf (version GGUF V3 (latest))
llama_context: n_ctx         = 40704
| this | is | not | a | table |

"""
LOG_AFTER = """
llama_perf_context_print:        load time =    1234.56 ms
llama_perf_context_print: prompt eval time =       0.00 ms /     1 tokens (    0.00 ms per token,      inf tokens per second)
llama_perf_context_print:       total time =    9876.54 ms /  1234 tokens
"""


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# --- reading ------------------------------------------------------------------------------


def test_reads_real_llamacpp_md_table():
    rows = read_results(SEED_SPLIT)
    assert [r.key for r in rows] == [(pp, 32, b) for pp in (0, 512, 4096, 8192) for b in (2, 3)]
    r = rows[
        5
    ]  # |  4096 |     32 |    3 |  12384 |    1.023 | 12013.28 |    0.139 |   691.96 |    1.162 | 10661.11 |
    assert (r.n_kv, r.t_pp, r.speed_pp, r.t_tg, r.speed_tg, r.t, r.speed) == (
        12384,
        1.023,
        12013.28,
        0.139,
        691.96,
        1.162,
        10661.11,
    )
    assert r.mode is None
    assert r.extra["func"] == "llama_batched_bench"
    assert r.extra["n_kv_max"] == 40704 and r.extra["n_gpu_layers"] == 99
    assert r.extra["is_tg_separate"] == 0


def test_reads_main_prefixed_header_and_blank_lines():
    (r,) = read_results(DATA / "llamacpp-pr17103-main.md")
    assert r.key == (8192, 32, 1) and r.speed_tg == 66.95 and r.speed == 2298.00
    assert (
        r.extra["func"] == "main" and r.extra["flash_attn"] == -1 and r.extra["is_tg_separate"] == 1
    )


def test_log_noise_around_llamacpp_table_is_ignored(tmp_path):
    noisy = _write(tmp_path, "run.log", LOG_BEFORE + SEED_UNIFIED.read_text() + LOG_AFTER)
    clean = read_results(SEED_UNIFIED)
    got = read_results(noisy)
    assert [(r.key, r.speed_tg, r.speed) for r in got] == [
        (r.key, r.speed_tg, r.speed) for r in clean
    ]
    assert got[0].extra["n_kv_max"] == 40192


def test_reads_llamacpp_jsonl_example():
    (r,) = read_results(DATA / "llamacpp-readme.jsonl")
    assert r.key == (128, 128, 1) and r.n_kv == 256
    assert (r.t_pp, r.speed_pp, r.t_tg, r.speed_tg, r.t, r.speed) == (
        0.233810,
        547.453064,
        3.503684,
        36.532974,
        3.737494,
        68.495094,
    )
    assert list(r.extra) == [
        "n_kv_max", "n_batch", "n_ubatch", "flash_attn", "is_pp_shared",
        "n_gpu_layers", "n_threads", "n_threads_batch",
    ]  # fmt: skip
    assert r.mode is None


def test_reads_batchbench_jsonl_with_extra_keys_noise_and_bare_nan(tmp_path):
    base = json.loads((DATA / "llamacpp-readme.jsonl").read_text())
    skip = dict(base, mode="skip", reps=5, speed_tg_min=35.1, speed_tg_max=37.2, peak_mem_mb=812.5,
                model="qwen2.5-7b", machine="h200", command="batchbench -npp 128")  # fmt: skip
    noskip = dict(base, mode="no-skip", speed_tg=30.0)
    line_nan = json.dumps(dict(base, pp=0, n_kv=128)).replace(
        '"speed_pp": 547.453064', '"speed_pp": -nan'
    )
    text = "\n".join(
        [
            "warming up...",
            json.dumps(skip),
            "",
            json.dumps(noskip),
            line_nan.replace("0.23381", "0.0"),
        ]
    )
    rows = read_results(_write(tmp_path, "ab.jsonl", text + "\n"))
    assert [r.mode for r in rows] == ["skip", "no-skip", None]
    assert rows[0].extra["peak_mem_mb"] == 812.5 and rows[0].extra["reps"] == 5
    assert rows[0].extra["command"] == "batchbench -npp 128"
    assert "mode" not in rows[0].extra
    assert rows[1].speed_tg == 30.0
    assert rows[2].speed_pp != rows[2].speed_pp  # NaN survived as NaN


def test_reads_batchbench_md_with_modes_and_extra_columns():
    rows = read_results(AB)
    assert [r.mode for r in rows] == ["skip"] * 4 + ["no-skip"] * 4
    assert rows[3].key == (128, 8, 3) and rows[3].speed_tg == 80.81
    assert rows[3].extra["speedup"] == 1.182
    assert rows[3].extra["func"] == "batchbench"


def test_reads_csv_with_mode_extra_and_repeated_header(tmp_path):
    header = "pp,tg,pl,n_kv,t_pp,speed_pp,t_tg,speed_tg,t,speed,mode,reps,peak_mem_mb,model,command"
    lines = [
        header,
        '0,8,2,16,0.000,0.00,0.210,76.19,0.210,76.19,skip,3,512.0,tiny,"batchbench -npp 0,128"',
        "0,8,2,16,0.000,0.00,0.215,74.42,0.215,74.42,no-skip,3,511.0,tiny,x",
        header,  # a second run appending to the same file
        "128,8,2,272,0.301,850.50,0.231,69.26,0.532,511.28,,3,,tiny,x",
    ]
    rows = read_results(_write(tmp_path, "runs.csv", "\n".join(lines) + "\n"))
    assert [r.mode for r in rows] == ["skip", "no-skip", None]
    assert rows[0].extra == {
        "reps": 3,
        "peak_mem_mb": 512.0,
        "model": "tiny",
        "command": "batchbench -npp 0,128",
    }
    assert rows[2].extra["peak_mem_mb"] is None
    assert rows[2].key == (128, 8, 2) and rows[2].speed_pp == 850.5


def test_format_is_sniffed_when_the_extension_says_nothing(tmp_path):
    jl = _write(tmp_path, "out.txt", (DATA / "llamacpp-readme.jsonl").read_text())
    assert read_results(jl)[0].speed_tg == 36.532974
    md = _write(tmp_path, "out", SEED_SPLIT.read_text())
    assert len(read_results(md)) == 8
    c = _write(
        tmp_path,
        "out.dat",
        "pp,tg,pl,n_kv,t_pp,speed_pp,t_tg,speed_tg,t,speed\n1,2,3,9,1,3,1,6,2,4.5\n",
    )
    assert read_results(c)[0].speed == 4.5


# --- malformed input ----------------------------------------------------------------------

_SEED_LINES = SEED_SPLIT.read_text().splitlines()


def _md_with(line_no: int, new: str) -> str:
    lines = list(_SEED_LINES)
    assert lines[line_no - 1] != new  # the edit really breaks that line
    lines[line_no - 1] = new
    return "\n".join(lines) + "\n"


_MALFORMED = [
    ("trunc.md", _md_with(6, "|   512 |     32 |    3 |   1632 |    0.153 | 100"), 6, "truncated"),
    (
        "cells.md",
        _md_with(5, "|   512 |     32 |    2 |   1088 |    0.086 | 11866.13 |"),
        5,
        "cells",
    ),
    ("word.md", _md_with(8, _SEED_LINES[7].replace("11943.97", "fast!!!!")), 8, "speed_pp"),
    ("bint.md", _md_with(5, _SEED_LINES[4].replace("|    3 |", "|  3.5 |")), 5, "pl"),
    ("nosep.md", _md_with(3, "| nothing here |"), 3, "separator"),
    ("cols.md", _md_with(2, _SEED_LINES[1].replace("S_TG t/s", "S_XX t/s")), 2, "S_TG t/s"),
    ("bad.jsonl", '{"pp": 1}\n', 1, "missing"),
    (
        "bad2.jsonl",
        (DATA / "llamacpp-readme.jsonl").read_text() + '{"pp": 1, \n',
        2,
        "invalid JSON",
    ),
    ("bad3.jsonl", '["not", "an", "object"]\n{"pp": [1]}\n', 2, "missing"),
    (
        "bad.csv",
        "pp,tg,pl,n_kv,t_pp,speed_pp,t_tg,speed_tg,t,speed\n1,2,3,9,1,3,1,6,2\n",
        2,
        "fields",
    ),
    ("bad2.csv", "pp,tg,pl\n1,2,3\n", 1, "speed_tg"),
    (
        "neg.csv",
        "pp,tg,pl,n_kv,t_pp,speed_pp,t_tg,speed_tg,t,speed\n1,2,0,9,1,3,1,6,2,4\n",
        2,
        "pl",
    ),
]


@pytest.mark.parametrize("name,text,line,needle", _MALFORMED, ids=[m[0] for m in _MALFORMED])
def test_malformed_input_names_file_and_line(tmp_path, name, text, line, needle):
    path = _write(tmp_path, name, text)
    with pytest.raises(ValueError) as e:
        read_results(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:{line}: "), msg
    assert needle in msg
    assert "\n" not in msg


def test_unreadable_or_empty_files_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="cannot read .*nope.md"):
        read_results(tmp_path / "nope.md")
    with pytest.raises(ValueError, match="not a results file"):
        read_results(_write(tmp_path, "notes.md", "just some notes\n"))
    with pytest.raises(ValueError, match="no result rows"):
        read_results(_write(tmp_path, "empty.jsonl", "\n"))
    (tmp_path / "bin.md").write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(ValueError, match="not a text file"):
        read_results(tmp_path / "bin.md")


# --- matching and ratios ------------------------------------------------------------------


def test_ratio_edge_cases():
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(1.0, 0.0) is None  # PP = 0 rows print S_PP 0.00
    assert ratio(None, 2.0) is None and ratio(2.0, None) is None
    assert ratio(float("nan"), 2.0) is None


def test_matching_with_missing_rows_and_ratio_maths():
    sides = load_sides([str(SEED_SPLIT), str(SEED_UNIFIED), str(SCALING_UNIFIED)])
    cmp = compare_sides(sides)
    by_key = {cr.key: cr for cr in cmp.rows}
    # 8 seed keys + 5 scaling keys not in the seed run (4096/32/2 is in both).
    assert len(cmp.rows) == 13
    both = by_key[(4096, 32, 2)]
    assert all(r is not None for r in both.rows)
    assert both.ratio(1, "S_TG") == pytest.approx(517.01 / 507.74)
    assert both.ratio(2, "S_PP") == pytest.approx(11519.19 / 11943.97)
    assert both.ratio(1, "S") == pytest.approx(9905.80 / 10168.51)
    assert by_key[(0, 32, 2)].ratio(1, "S_PP") is None  # 0 / 0
    missing = dict(cmp.missing)
    assert missing[(4096, 32, 32)] == [0, 1]
    assert missing[(8192, 32, 3)] == [2]
    assert (4096, 32, 2) not in missing
    assert len(missing) == 12


def test_compare_md_output_lists_missing_rows_and_ratios():
    out = compare_main([str(SEED_SPLIT), str(SCALING_UNIFIED)])
    lines = out.splitlines()
    assert lines[0].startswith("A = llamacpp-h200-seed-split.md")
    header = next(ln for ln in lines if ln.startswith("|") and "PP" in ln)
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols[:4] == ["PP", "TG", "B", "N_KV"] and "S_TG B/A" in cols
    table = {}
    for ln in lines[lines.index(header) + 2 :]:
        if not ln.startswith("|"):
            break
        cells = dict(zip(cols, (c.strip() for c in ln.strip("|").split("|"))))
        table[(cells["PP"], cells["TG"], cells["B"])] = cells
    assert len(table) == 13
    cells = table[("4096", "32", "2")]
    assert cells["S_TG A"] == "507.74" and cells["S_TG B"] == "491.97"
    assert cells["S_TG B/A"] == f"{491.97 / 507.74:.3f}"
    only_a = table[("8192", "32", "3")]
    assert only_a["S_TG B"] == "-" and only_a["S_TG B/A"] == "-" and only_a["S_TG A"] == "698.81"
    assert "rows missing on a side (12):" in out
    assert "  PP=8192 TG=32 B=3: missing in B (llamacpp-h200-scaling-unified.md)" in lines
    assert "  PP=4096 TG=32 B=32: missing in A (llamacpp-h200-seed-split.md)" in lines


def test_one_file_with_two_modes_is_two_sides_and_mode_filter_orders_them():
    out = compare_main([str(AB)])
    assert "A = batchbench-ab.md [skip]" in out and "B = batchbench-ab.md [no-skip]" in out
    assert "all 4 rows present on every side" in out
    sides = load_sides([str(AB)], modes=["no-skip", "skip"])
    assert [s.mode for s in sides] == ["no-skip", "skip"]
    cr = {c.key: c for c in compare_sides(sides).rows}[(128, 8, 3)]
    assert cr.ratio(1, "S_TG") == pytest.approx(80.81 / 68.38)
    # A llama.cpp file (no modes) next to one mode of a batchbench file.
    sides = load_sides([str(AB), str(SEED_SPLIT)], modes=["skip"])
    assert [s.label for s in sides] == ["batchbench-ab.md [skip]", "llamacpp-h200-seed-split.md"]
    with pytest.raises(ValueError, match="no rows with mode turbo"):
        load_sides([str(AB)], modes=["turbo"])


def test_compare_needs_two_sides_and_knows_its_formats():
    with pytest.raises(ValueError, match="nothing to compare"):
        compare_main([str(SEED_SPLIT)])
    with pytest.raises(ValueError, match="unknown compare format"):
        compare_main([str(SEED_SPLIT), str(SEED_UNIFIED)], fmt="xml")


def test_duplicate_rows_use_the_last_and_are_noted(tmp_path):
    text = SEED_SPLIT.read_text()
    again = text.replace("390.19", "400.00")
    p = _write(tmp_path, "twice.md", text + "\n" + again)
    out = compare_main([str(p), str(SEED_UNIFIED)])
    assert "note: A has 8 repeated (PP, TG, B) row(s); the last one is used" in out
    sides = load_sides([str(p)])
    assert sides[0].rows[(0, 32, 2)].speed_tg == 400.00


def test_csv_and_jsonl_renderings_carry_the_same_numbers():
    paths = [str(SEED_SPLIT), str(SEED_UNIFIED)]
    rows = list(csv.DictReader(io.StringIO(compare_main(paths, fmt="csv"))))
    assert len(rows) == 8
    r = next(r for r in rows if (r["pp"], r["pl"]) == ("8192", "3"))
    assert r["speed_tg_A"] == "698.81" and r["speed_tg_B"] == "631.25"
    assert float(r["speed_tg_B/A"]) == pytest.approx(631.25 / 698.81, abs=1e-4)
    objs = [json.loads(ln) for ln in compare_main(paths, fmt="jsonl").splitlines()]
    o = next(o for o in objs if (o["pp"], o["pl"]) == (8192, 3))
    assert o["ratios"]["llamacpp-h200-seed-unified.md"]["speed_tg"] == pytest.approx(
        631.25 / 698.81
    )
    assert o["missing_in"] == []


# --- CLI ----------------------------------------------------------------------------------


def _app() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def test_cli_compare_prints_table():
    res = CliRunner().invoke(_app(), ["compare", str(SEED_SPLIT), str(SEED_UNIFIED)])
    assert res.exit_code == 0, res.output
    assert "S_TG B/A" in res.stdout and "all 8 rows present on every side" in res.stdout


def test_cli_compare_error_is_one_line_without_traceback(tmp_path):
    bad = _write(tmp_path, "bad.md", _md_with(6, "|   512 |     32 |    3 |"))
    res = CliRunner().invoke(_app(), ["compare", str(bad), str(SEED_SPLIT)])
    assert res.exit_code == 1
    assert res.stderr.startswith(f"error: {bad}:6: ")
    assert len(res.stderr.strip().splitlines()) == 1
    assert "Traceback" not in res.output
    assert res.stdout == ""


# --- round trip through batchbench's own writers ------------------------------------------


def _bench_rows():
    from batchbench.formats import BenchRow

    from batchbench.stats import combine_repetitions

    out = []
    for mode, slow in (("skip", 1.0), ("no-skip", 1.25)):
        for pp, pl in ((0, 2), (128, 2), (128, 3)):
            rep = combine_repetitions(
                pp, 8, pl, [0.1 * pl, 0.12 * pl, 0.11 * pl], [0.2 * slow, 0.25 * slow, 0.21 * slow]
            )
            d = {k: v for k, v in rep.as_dict().items() if k not in ("speed_min", "speed_max")}
            out.append(BenchRow(**d, mode=mode, peak_mem_mb=100.0 + pl, ratio_tg=1 / slow))
    return out


def test_round_trip_through_batchbench_writers(tmp_path):
    formats = pytest.importorskip("batchbench.formats")
    rows = _bench_rows()
    h = formats.Header(1024, 2048, 512, 1, 0, 0, -1, 2, 2)
    meta = {
        "model": "preset:tiny",
        "machine": "ci",
        "command": "batchbench -npp 0,128 --ab skip -r 3",
    }
    md = tmp_path / "ab.md"
    md.write_text(
        "\n"
        + formats.header_line(h)
        + "\n\n"
        + formats.table_header(True, True)
        + "\n"
        + "\n".join(formats.md_row(r, True, True) for r in rows)
        + "\n\n"
    )
    jl = tmp_path / "ab.jsonl"
    jl.write_text("\n".join(formats.jsonl_row(h, r, meta) for r in rows) + "\n")
    cp = tmp_path / "ab.csv"
    sink = formats.CsvSink(str(cp), meta)
    for r in rows:
        sink.write(h, r)
    sink.close()
    for path in (md, jl, cp):
        got = read_results(path)
        assert [(g.key, g.mode) for g in got] == [((r.pp, r.tg, r.pl), r.mode) for r in rows], path
        for g, r in zip(got, rows):
            assert g.speed_tg == pytest.approx(r.speed_tg, abs=0.006), path
            assert g.extra["speed_tg_min"] == pytest.approx(r.speed_tg_min, abs=0.006), path
            assert g.extra["peak_mem_mb"] == pytest.approx(r.peak_mem_mb, abs=0.06), path
        if path is not md:
            assert got[0].extra["command"] == meta["command"]
    # The A/B file compares with itself: no-skip is 1.25x slower in decode.
    sides = load_sides([str(jl)])
    cr = {c.key: c for c in compare_sides(sides).rows}[(128, 8, 3)]
    assert cr.ratio(1, "S_TG") == pytest.approx(1 / 1.25, rel=1e-5)
