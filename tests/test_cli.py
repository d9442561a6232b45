"""The command line end to end on the tiny preset: outputs agree, bad input fails in one line."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["-m", "preset:tiny", "-c", "1024"]


def bb(*args, timeout=240):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "batchbench", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


def md_rows(stdout):
    return [l for l in stdout.splitlines() if l.startswith("|") and not l.startswith("|--") and "PP" not in l]


def test_md_jsonl_csv_agree(tmp_path):
    path = tmp_path / "r.csv"
    md = bb(*TINY, "-npp", "0,16", "-ntg", "4", "-npl", "2,3", "--csv", str(path))
    assert md.returncode == 0, md.stderr
    rows = md_rows(md.stdout)
    assert len(rows) == 4
    assert md.stdout.splitlines()[1].startswith("main: n_kv_max = 1024, n_batch = 2048")
    keys = [(int(c.split("|")[1]), int(c.split("|")[2]), int(c.split("|")[3])) for c in rows]
    assert keys == [(0, 4, 2), (0, 4, 3), (16, 4, 2), (16, 4, 3)]
    with open(path) as f:
        recs = list(csv.DictReader(f))
    assert [(int(r["pp"]), int(r["tg"]), int(r["pl"])) for r in recs] == keys
    for line, rec in zip(rows, recs):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[3] == rec["n_kv"]
        assert cells[7] == "%.2f" % float(rec["speed_tg"])  # same numbers, printed as llama.cpp does
        assert rec["command"].startswith("batchbench ") and rec["mlx_version"]

    js = bb(*TINY, "-npp", "16", "-ntg", "2", "-npl", "2", "--output-format", "jsonl")
    assert js.returncode == 0, js.stderr
    objs = [json.loads(l) for l in js.stdout.splitlines() if l.startswith("{")]
    assert len(objs) == 1 and objs[0]["n_kv"] == 36 and objs[0]["speed_tg"] > 0
    assert abs(objs[0]["speed_tg"] - 2 * 2 / objs[0]["t_tg"]) < 1e-3 * objs[0]["speed_tg"]


def test_own_blocks_flag_runs_and_is_recorded(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('own-blocks = true\n')
    for args in (["--own-blocks"], ["--config", str(cfg)]):
        js = bb(*TINY, "-npp", "16", "-ntg", "40", "-npl", "2", "--output-format", "jsonl", *args)
        assert js.returncode == 0, js.stderr
        objs = [json.loads(l) for l in js.stdout.splitlines() if l.startswith("{")]
        assert len(objs) == 1 and objs[0]["own_blocks"] == 1 and objs[0]["n_kv"] == 112
    js = bb(*TINY, "-npp", "16", "-ntg", "2", "-npl", "2", "--output-format", "jsonl")
    assert [json.loads(l) for l in js.stdout.splitlines() if l.startswith("{")][0]["own_blocks"] == 0
    js = bb(*TINY, "-npp", "16", "-ntg", "40", "-npl", "2", "--ab", "own", "--output-format", "jsonl")
    assert js.returncode == 0, js.stderr
    objs = [json.loads(l) for l in js.stdout.splitlines() if l.startswith("{")]
    assert [o["mode"] for o in objs] == ["llama", "own-blocks"] and objs[0]["own_blocks"] == 0
    r = bb(*TINY, "-npp", "16", "-ntg", "2", "-npl", "2", "-no-kvu", "--own-blocks")
    assert r.returncode == 0 and "note: --own-blocks places decode tokens in a unified cache" in r.stderr


def test_config_over_context_is_skipped_with_note():
    r = bb(*TINY, "-npp", "16,600", "-ntg", "4", "-npl", "2")
    assert r.returncode == 0, r.stderr
    assert len(md_rows(r.stdout)) == 1  # 2*(600+4) > 1024: skipped, as llama.cpp does
    assert "PP=600 TG=4 B=2: needs 1208 cells > n_kv_max 1024; skipped" in r.stderr
    r = bb(*TINY, "-npp", "400", "-ntg", "4", "-npl", "1,4", "-no-kvu")
    assert r.returncode == 0 and len(md_rows(r.stdout)) == 0
    assert "exceed the split cache" in r.stderr


@pytest.mark.parametrize("args", [[], ["-npp", "16", "-ntg", "4"], ["-npl", "2"]])
def test_missing_sweep_lists_give_an_empty_table(args):
    """-npp/-ntg/-npl have no defaults in llama-batched-bench: a list left out means an empty
    sweep (header and table head, no rows), not an error."""
    r = bb(*TINY, *args)
    assert r.returncode == 0, r.stderr
    assert "| S_TG t/s |" in r.stdout and md_rows(r.stdout) == []
    assert "error" not in r.stderr.lower()


def test_pasted_llama_cpp_flags_are_noted():
    r = bb(*TINY, "-npp", "8", "-ntg", "1", "-npl", "1", "-ngl", "99", "-t", "8", "-nkvo")
    assert r.returncode == 0, r.stderr
    assert "'-ngl 99' has no meaning on MLX" in r.stderr


@pytest.mark.parametrize("args,msg", [
    (["-npp", "1,x"], "-npp: 'x'"),
    (["-npl", "0"], "-npl: 0 must be >= 1"),
    (["-ntg", "-3"], "-ntg: -3 must be >= 0"),
    (["-b", "0"], "-b: 0 must be >= 1"),
    (["--bogus"], "No such option"),
    (["-fa", "maybe"], "-fa: expected on|off|auto"),
    (["-m", "/nonexistent/model.gguf"], "model not found"),
    (["-m", "preset:nope"], "unknown preset"),
    (["--output-format", "xml"], "--output-format"),
    (["-npl", "300"], "at most 256"),
    (["-m", "preset:qwen2.5-7b", "--dtype", "float32"], "needs about"),
    (["-c", "100000000"], "needs about"),
])
def test_bad_input_one_line_error(args, msg):
    base = ["-m", "preset:tiny", "-npp", "8", "-ntg", "1", "-npl", "1"]
    # later flags win for repeated scalar options, and lists append; put the bad ones last
    r = bb(*base, *args, timeout=60)
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()
    assert err and err[-1].startswith("error: ") and msg in err[-1], r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("var,value", [("BATCHBENCH_SEGMENTS", "2,0"), ("BATCHBENCH_EVAL_EVERY", "seven"),
                                       ("BB_ATTN_MIN_BLOCKS", "x"), ("BB_ATTN_WAVE", "half"),
                                       ("BB_QMM_ONE_WAVE", "5"), ("BB_QMM_PRELOAD2", "2"),
                                       ("BB_QMM_NORM_PASS", "on"), ("BB_QMM_NW_EARLY", "2"),
                                       ("BB_QMM_PERSIST", "yes"), ("BB_QMM_RING", "x"),
                                       ("BB_QMM_X_ASYNC", "2"), ("BB_QMM_DQ", "fast"), ("BB_QMM_EPI_PRE", "x"),
                                       ("BB_QMM_NORM_SPLIT", "both"), ("BB_QMM_NORM_OUT", "on"),
                                       ("BB_QMM_NORM_PRE", "maybe"), ("BB_QMM_WK_DIVIDE", "7"), ("BB_QMM_RED_VEC", "4"),
                                       ("BB_QMM_SB_PACK", "pairs"), ("BB_QMM_X8", "on"), ("BB_QMM_WPACK", "yes"),
                                       ("BB_QMM_PART16", "half"), ("BB_ATTN_REC32", "fp32"), ("BB_ATTN_MERGERS", "8"), ("BATCHBENCH_BACKEND", "tpu"), ("BATCHBENCH_FULL_SYNC", "yes")])
def test_bad_environment_setting_is_one_line(monkeypatch, var, value):
    """Decode settings are read when a command first imports the back-end: a bad one is a
    one-line error and exit code 2, not a traceback."""
    monkeypatch.setenv(var, value)
    r = bb(*TINY, "-npp", "8", "-ntg", "1", "-npl", "1", timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip().splitlines()[-1]]
    assert r.stderr.strip().startswith(f"error: {var} ")


def test_unreadable_model_file(tmp_path):
    p = tmp_path / "garbage.gguf"
    p.write_bytes(b"not a gguf file at all")
    r = bb("-m", str(p), "-npp", "8", "-ntg", "1", "-npl", "1", timeout=60)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ")


def test_interrupt_keeps_finished_rows(tmp_path):
    path = tmp_path / "sweep.csv"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    p = subprocess.Popen([sys.executable, "-m", "batchbench", *TINY, "-npp", "8", "-ntg", "2",
                          "-npl", ",".join(["1", "2"] * 200), "--csv", str(path)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    deadline = time.time() + 120
    while time.time() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130
    assert "finished rows kept" in err
    with open(path) as f:
        recs = list(csv.DictReader(f))
    assert len(recs) >= 2 and all(r["command"] and r["speed_tg"] for r in recs)  # whole rows only
    # SIGINT may land between the CSV write and the stdout write of one row
    assert len(recs) - 1 <= len(md_rows(out)) <= len(recs)


def test_config_file_with_command_line_override(tmp_path):
    cfg = tmp_path / "sweep.toml"
    cfg.write_text('model = "preset:tiny"\nctx_size = 1024\nnpp = [8]\nntg = [2]\nnpl = [1, 2]\n')
    r = bb("--config", str(cfg), "-npl", "3", "--output-format", "jsonl")
    assert r.returncode == 0, r.stderr
    objs = [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
    assert [(o["pp"], o["tg"], o["pl"]) for o in objs] == [(8, 2, 3)]  # flag beat the file's npl
    assert objs[0]["n_kv_max"] == 1024 and objs[0]["model"] == "preset:tiny"  # the rest from the file
    bad = tmp_path / "bad.toml"
    bad.write_text("npp = [8]\nbogus_key = 1\n")
    r = bb("--config", str(bad), timeout=60)
    assert r.returncode != 0 and "bogus_key" in r.stderr and "Traceback" not in r.stderr


def test_bench_attention_rejects_unknown_variants():
    r = bb("bench-attention", "--b", "2", "--ctx", "64", "--variants", "list,fastest", timeout=60)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "error: --variants: unknown fastest; choose from list,model,scan,noskip,sdpa_unified,sdpa_separate")


def test_bench_attention_runs_the_chosen_variants_on_the_cpu(tmp_path):
    out = tmp_path / "attn.md"
    r = bb("bench-attention", "--b", "2", "--ctx", "64", "--variants", "list,model", "--out", str(out), timeout=120)
    assert r.returncode == 0, r.stderr
    row = [l for l in out.read_text().splitlines() if l.startswith("| 2 | 64 |")]
    assert len(row) == 1
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    # kernel times are n/a without CUDA; the two chosen variants have wall times, the others none
    walls = cells[13].split(" / ")
    assert walls[0] != "err" and walls[1:] == ["err"] * 4
    errs = cells[14].split(" / ")
    assert float(errs[0]) < 1e-2 and errs[1:] == ["-"] * 3  # list checked against fp32, others not run
    model = cells[15].split(" / ")
    assert model[1] != "err" and float(model[3]) > 0  # model path: wall time, marginal wall
