import builtins
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from batchbench import plot
from batchbench.compare import read_results, register

DATA = Path(__file__).parent / "data"
SCALING = [DATA / "llamacpp-h200-scaling-unified.md", DATA / "llamacpp-h200-scaling-split.md"]
SEED = [DATA / "llamacpp-h200-seed-split.md", DATA / "llamacpp-h200-seed-unified.md"]
AB = DATA / "batchbench-ab.md"

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plot_s_tg_vs_b_one_line_per_file(tmp_path):
    out = tmp_path / "scaling.png"
    series = plot.plot_results([str(p) for p in SCALING], str(out))
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 10_000
    assert [s.label for s in series] == [
        "llamacpp-h200-scaling-unified.md",
        "llamacpp-h200-scaling-split.md",
    ]
    split = series[1]
    assert split.metric == "S_TG"
    assert split.x == [1, 2, 4, 8, 16, 32]
    assert split.y == [r.speed_tg for r in read_results(SCALING[1])]
    assert split.y[-1] == 2734.07


def test_plot_both_metrics_vs_n_kv_splits_lines_by_b(tmp_path):
    out = tmp_path / "sub" / "seed.svg"  # folder is created
    series = plot.plot_results([str(p) for p in SEED], str(out), x="n_kv", metric="both")
    assert out.read_text().lstrip().startswith("<?xml")
    by = {(s.metric, s.label): s for s in series}
    assert len(series) == 8  # 2 metrics x 2 files x B in {2, 3}
    s = by[("S_TG", "llamacpp-h200-seed-unified.md B=3")]
    assert s.x == [96, 1632, 12384, 24672] and s.y == [726.90, 746.27, 680.98, 631.25]
    p = by[("S_PP", "llamacpp-h200-seed-split.md B=2")]
    assert p.x == [1088, 8256, 16448]  # PP = 0 has no prompt speed to show
    assert p.y == [11866.13, 11943.97, 11601.75]


def test_plot_modes_are_separate_lines(tmp_path):
    series = plot.plot_results([str(AB)], str(tmp_path / "ab.png"), metric="S_TG")
    labels = [s.label for s in series]
    assert labels == [
        "batchbench-ab.md [skip] PP=0",
        "batchbench-ab.md [skip] PP=128",
        "batchbench-ab.md [no-skip] PP=0",
        "batchbench-ab.md [no-skip] PP=128",
    ]
    assert series[1].x == [2, 3] and series[1].y == [69.26, 80.81]
    only = plot.plot_results([str(AB)], str(tmp_path / "ab2.png"), modes=["no-skip"])
    assert {s.side for s in only} == {"batchbench-ab.md [no-skip]"}


def test_plot_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown metric"):
        plot.plot_results([str(AB)], str(tmp_path / "x.png"), metric="speed")
    with pytest.raises(ValueError, match="unknown x axis"):
        plot.plot_results([str(AB)], str(tmp_path / "x.png"), x="PP")
    zero = tmp_path / "zero.md"
    zero.write_text(
        (DATA / "batchbench-ab.md")
        .read_text()
        .split("\n\n# mode: no-skip")[0]
        .replace("|   128 |", "|     0 |")
    )
    with pytest.raises(ValueError, match="nothing to plot"):
        plot.plot_results([str(zero)], str(tmp_path / "x.png"), metric="S_PP")


def test_missing_matplotlib_is_a_one_line_hint(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(plot.PlotUnavailable, match=r"pip install 'batchbench\[plot\]'"):
        plot.plot_results([str(AB)], str(tmp_path / "x.png"))
    app = typer.Typer()
    register(app)
    res = CliRunner().invoke(app, ["plot", str(AB), "-o", str(tmp_path / "x.png")])
    assert res.exit_code == 1
    assert (
        res.stderr.strip() == "error: matplotlib is not installed: pip install 'batchbench[plot]'"
    )
    assert not (tmp_path / "x.png").exists()


def test_cli_plot_writes_file(tmp_path):
    app = typer.Typer()
    register(app)
    out = tmp_path / "cli.png"
    res = CliRunner().invoke(
        app, ["plot", *map(str, SCALING), "-o", str(out), "--x", "B", "--metric", "both"]
    )
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert "4 series" in res.stderr
