"""Read llama-batched-bench / batchbench results (md, jsonl, CSV) and compare them side by side.

`read_results` accepts llama.cpp's own output unchanged (header line with a `main:` or
`llama_batched_bench:` prefix, log noise around the table) and batchbench's (extra columns after
`S t/s`, several tables each announced by a `# mode: <label>` line, extra jsonl/CSV keys).
`compare_main` matches rows on (PP, TG, B); every (file, mode) is one side, and the ratio columns
divide each side by the first one.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from batchbench.stats import Row

CORE_KEYS = ("pp", "tg", "pl", "n_kv", "t_pp", "speed_pp", "t_tg", "speed_tg", "t", "speed")
INT_KEYS = frozenset(("pp", "tg", "pl", "n_kv"))

# llama.cpp's md column titles -> jsonl key names.
MD_COLUMNS = {
    "PP": "pp",
    "TG": "tg",
    "B": "pl",
    "N_KV": "n_kv",
    "T_PP s": "t_pp",
    "S_PP t/s": "speed_pp",
    "T_TG s": "t_tg",
    "S_TG t/s": "speed_tg",
    "T s": "t",
    "S t/s": "speed",
}

# batchbench's extra md columns -> the keys its jsonl/CSV use, so `extra` reads the same from
# every format.
MD_EXTRA_COLUMNS = {
    "S_PP min": "speed_pp_min",
    "S_PP max": "speed_pp_max",
    "S_TG min": "speed_tg_min",
    "S_TG max": "speed_tg_max",
    "S_TG x": "ratio_tg",
    "mem MB": "peak_mem_mb",
}

# Metrics that compare and plot talk about, by their md names.
METRICS = {"S_PP": "speed_pp", "S_TG": "speed_tg", "S": "speed"}

Key = tuple[int, int, int]


@dataclass
class ResultRow(Row):
    mode: Optional[str] = None
    # Everything else the file says about the row: header fields (n_kv_max, n_batch, ...),
    # batchbench's extra keys/columns (reps, speed_tg_min, peak_mem_mb, model, ...).
    extra: dict = field(default_factory=dict)

    @property
    def key(self) -> Key:
        return (self.pp, self.tg, self.pl)


class _Error(ValueError):
    pass


def _fail(path: str, line: Optional[int], msg: str) -> _Error:
    where = f"{path}:{line}" if line is not None else path
    return _Error(f"{where}: {msg}")


def _number(text: str):
    """int, float or the text itself (for free-form extra cells such as a model name)."""
    s = text.strip()
    try:
        return int(s)
    except ValueError:
        pass
    try:
        return float(s)
    except ValueError:
        return s


def _core_value(key: str, value, path: str, line: int):
    if key in INT_KEYS:
        if isinstance(value, bool):
            raise _fail(path, line, f"{key} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise _fail(path, line, f"{key} must be an integer, got {value!r}")
    if isinstance(value, bool):
        raise _fail(path, line, f"{key} must be a number, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())  # also takes C's "nan", "-nan", "inf"
        except ValueError:
            pass
    raise _fail(path, line, f"{key} must be a number, got {value!r}")


def _make_row(values: dict, mode, extra: dict, path: str, line: int) -> ResultRow:
    missing = [k for k in CORE_KEYS if k not in values]
    if missing:
        raise _fail(path, line, f"missing {', '.join(missing)}")
    core = {k: _core_value(k, values[k], path, line) for k in CORE_KEYS}
    for k in ("pp", "tg", "n_kv"):
        if core[k] < 0:
            raise _fail(path, line, f"{k} must be >= 0, got {core[k]}")
    if core["pl"] < 1:
        raise _fail(path, line, f"pl (B) must be >= 1, got {core['pl']}")
    if mode is not None and not isinstance(mode, str):
        mode = str(mode)
    return ResultRow(**core, mode=mode or None, extra=extra)


# --- markdown -----------------------------------------------------------------------------

_HEADER_FIELD = re.compile(r"(\w+)\s*=\s*(-?\d+)")
_COMMENT = re.compile(r"^#\s*([A-Za-z_][\w-]*)\s*:\s*(.*?)\s*$")
_SEPARATOR_CELL = re.compile(r"^:?-+:?$")


def _cells(line: str) -> Optional[list[str]]:
    s = line.strip()
    if len(s) < 2 or not (s.startswith("|") and s.endswith("|")):
        return None
    return [c.strip() for c in s[1:-1].split("|")]


def _is_table_header(line: str) -> bool:
    cells = _cells(line)
    return cells is not None and all(c in cells for c in ("PP", "TG", "B"))


def _parse_header_line(line: str) -> dict:
    """`main: n_kv_max = 40704, n_batch = 2048, ...` -> {"func": "main", "n_kv_max": 40704, ...}."""
    head, _, rest = line.partition("n_kv_max")
    out: dict = {}
    func = head.strip().rstrip(":").strip()
    if func:
        out["func"] = func.split()[-1]
    for name, value in _HEADER_FIELD.findall("n_kv_max" + rest):
        out[name] = int(value)
    return out


def _read_md(path: str, text: str) -> list[ResultRow]:
    rows: list[ResultRow] = []
    lines = text.splitlines()
    meta: dict = {}  # header fields and `# key: value` lines, applied to the rows that follow
    mode: Optional[str] = None
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        m = _COMMENT.match(stripped)
        if m:
            name, value = m.group(1), m.group(2)
            if name == "mode":
                mode = value or None
            else:
                meta[name] = value
            i += 1
            continue
        if "n_kv_max =" in line or "n_kv_max=" in line:
            meta.update(_parse_header_line(line))
            i += 1
            continue
        if not _is_table_header(line):
            i += 1  # log noise
            continue
        names = _cells(line)
        unknown_core = [c for c in MD_COLUMNS if c not in names]
        if unknown_core:
            raise _fail(path, i + 1, f"table header lacks column(s) {', '.join(unknown_core)}")
        i += 1
        sep = _cells(lines[i]) if i < len(lines) else None
        if sep is None or len(sep) != len(names) or not all(_SEPARATOR_CELL.match(c) for c in sep):
            raise _fail(path, i + 1, "expected the |---|---| separator row after the table header")
        i += 1
        while i < len(lines) and lines[i].strip().startswith("|"):
            cells = _cells(lines[i])
            if cells is None or len(cells) != len(names):
                got = "a truncated row" if cells is None else f"{len(cells)} cells"
                raise _fail(path, i + 1, f"expected {len(names)} cells, got {got}")
            values: dict = {}
            extra = dict(meta)
            row_mode = mode
            for name, cell in zip(names, cells):
                if name in MD_COLUMNS:
                    values[MD_COLUMNS[name]] = cell
                elif name == "mode":  # `--ab` tables interleave the modes row by row
                    row_mode = cell or mode
                elif name:
                    key = MD_EXTRA_COLUMNS.get(name, name)
                    extra[key] = None if cell in ("", "-") else _number(cell)
            rows.append(_make_row(values, row_mode, extra, path, i + 1))
            i += 1
    return rows


# --- jsonl --------------------------------------------------------------------------------

# llama.cpp prints floats with %f, so a zero time gives bare nan/inf, which JSON lacks.
_BARE_NONFINITE = re.compile(r"(:\s*)(-?)(nan|inf)\b", re.IGNORECASE)


def _json_fix(s: str) -> str:
    def sub(m: re.Match) -> str:
        word = "NaN" if m.group(3).lower() == "nan" else f"{m.group(2)}Infinity"
        return m.group(1) + word

    return _BARE_NONFINITE.sub(sub, s)


def _read_jsonl(path: str, text: str) -> list[ResultRow]:
    rows: list[ResultRow] = []
    for n, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        if not s.startswith("{"):
            continue  # blank lines, log noise when stderr went to the same file
        try:
            obj = json.loads(s)
        except json.JSONDecodeError:
            try:
                obj = json.loads(_json_fix(s))
            except json.JSONDecodeError as e:
                raise _fail(path, n, f"invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(obj, dict):
            raise _fail(path, n, "expected a JSON object")
        extra = {k: v for k, v in obj.items() if k not in CORE_KEYS and k != "mode"}
        rows.append(_make_row(obj, obj.get("mode"), extra, path, n))
    return rows


# --- CSV ----------------------------------------------------------------------------------


def _read_csv(path: str, text: str) -> list[ResultRow]:
    rows: list[ResultRow] = []
    reader = csv.reader(io.StringIO(text))
    header: Optional[list[str]] = None
    for cells in reader:
        n = reader.line_num
        if not cells or all(not c.strip() for c in cells) or cells[0].lstrip().startswith("#"):
            continue
        cells = [c.strip() for c in cells]
        if header is None:
            header = cells
            missing = [k for k in CORE_KEYS if k not in header]
            if missing:
                raise _fail(path, n, f"CSV header lacks column(s) {', '.join(missing)}")
            continue
        if cells == header:
            continue  # a header repeated by a later run appending to the file
        if len(cells) != len(header):
            raise _fail(path, n, f"expected {len(header)} fields, got {len(cells)}")
        values = dict(zip(header, cells))
        extra = {
            k: (None if v == "" else _number(v))
            for k, v in values.items()
            if k not in CORE_KEYS and k != "mode"
        }
        rows.append(_make_row(values, values.get("mode"), extra, path, n))
    return rows


# --- entry point --------------------------------------------------------------------------


def detect_format(path: str, text: str) -> str:
    ext = Path(path).suffix.lower()
    if ext == ".csv":
        return "csv"
    if ext in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    lines = text.splitlines()
    if any(_is_table_header(line) for line in lines):
        return "md"
    if any(line.lstrip().startswith("{") for line in lines):
        return "jsonl"
    first = next((ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")), "")
    if {"pp", "tg", "pl"} <= {c.strip() for c in first.split(",")}:
        return "csv"
    raise _fail(
        path, None, "not a results file (no llama-batched-bench table, JSON lines or CSV header)"
    )


def read_results(path: str | Path) -> list[ResultRow]:
    """All rows of a results file, in file order; ValueError names file and line on bad input."""
    p = str(path)
    try:
        text = Path(p).read_text(encoding="utf-8")
    except OSError as e:
        raise _Error(f"cannot read {p}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise _fail(p, None, "not a text file") from None
    fmt = detect_format(p, text)
    rows = {"md": _read_md, "jsonl": _read_jsonl, "csv": _read_csv}[fmt](p, text)
    if not rows:
        raise _fail(p, None, f"no result rows found ({fmt})")
    return rows


# --- sides and comparison -----------------------------------------------------------------


@dataclass
class Side:
    """The rows of one (file, mode)."""

    path: str
    mode: Optional[str]
    rows: dict  # Key -> ResultRow, in file order
    duplicates: int = 0
    name: str = ""  # short file name used in labels

    @property
    def label(self) -> str:
        name = self.name or Path(self.path).name
        return f"{name} [{self.mode}]" if self.mode else name


def _unique_names(paths: list[str]) -> list[str]:
    names = [Path(p).name for p in paths]
    if len(set(names)) == len(names):
        return names
    return list(paths)


def load_sides(paths: list[str], modes: Optional[list[str]] = None) -> list[Side]:
    """One Side per (file, mode). `modes` keeps only those modes, in that order, in files
    that record modes; files without modes (llama.cpp's output) are kept whole."""
    sides: list[Side] = []
    for path, name in zip(paths, _unique_names([str(p) for p in paths])):
        rows = read_results(path)
        present: list[Optional[str]] = []
        for r in rows:
            if r.mode not in present:
                present.append(r.mode)
        chosen = present
        if modes and any(m is not None for m in present):
            chosen = [m for m in modes if m in present]
            if not chosen:
                have = ", ".join(str(m) for m in present)
                raise _Error(f"{path}: no rows with mode {', '.join(modes)} (file has: {have})")
        for mode in chosen:
            by_key: dict = {}
            dups = 0
            for r in rows:
                if r.mode != mode:
                    continue
                if r.key in by_key:
                    dups += 1
                    del by_key[r.key]  # the last run of a config wins, at its own position
                by_key[r.key] = r
            sides.append(Side(path=str(path), mode=mode, rows=by_key, duplicates=dups, name=name))
    return sides


def ratio(value: Optional[float], base: Optional[float]) -> Optional[float]:
    """value / base, or None when either side is missing or the base is 0 or not finite."""
    if value is None or base is None:
        return None
    if base == 0 or not math.isfinite(base) or not math.isfinite(value):
        return None
    return value / base


@dataclass
class CompareRow:
    key: Key
    rows: list  # one ResultRow or None per side

    def value(self, side: int, metric: str) -> Optional[float]:
        r = self.rows[side]
        return None if r is None else getattr(r, METRICS.get(metric, metric))

    def ratio(self, side: int, metric: str) -> Optional[float]:
        """Side `side` over the first side."""
        return ratio(self.value(side, metric), self.value(0, metric))

    @property
    def n_kv(self) -> Optional[int]:
        return next((r.n_kv for r in self.rows if r is not None), None)


@dataclass
class Comparison:
    sides: list[Side]
    rows: list[CompareRow]

    @property
    def missing(self) -> list[tuple[Key, list[int]]]:
        """(key, indexes of the sides that lack it) for every incompletely matched row."""
        out = []
        for cr in self.rows:
            lacking = [i for i, r in enumerate(cr.rows) if r is None]
            if lacking:
                out.append((cr.key, lacking))
        return out


def compare_sides(sides: list[Side]) -> Comparison:
    keys = {k for side in sides for k in side.rows}
    # Sorted by (PP, TG, B): llama.cpp's loop order for ascending lists, and rows that only
    # one side has land next to their neighbours instead of at the end.
    rows = [CompareRow(k, [s.rows.get(k) for s in sides]) for k in sorted(keys)]
    return Comparison(sides, rows)


def _letter(i: int) -> str:
    return chr(ord("A") + i) if i < 26 else f"S{i}"


def _fmt(v: Optional[float], spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    widths = [
        max(len(h), *(len(r[j]) for r in body)) if body else len(h) for j, h in enumerate(header)
    ]
    line = lambda cells: "|" + "|".join(f" {c:>{w}} " for c, w in zip(cells, widths)) + "|"
    return [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [
        line(r) for r in body
    ]


def render_md(cmp: Comparison) -> str:
    sides = cmp.sides
    out = [f"{_letter(i)} = {s.label}  ({s.path})" for i, s in enumerate(sides)]
    out.append("ratios: side / A for S_PP, S_TG and S (above 1 = faster than A)")
    out.append("")
    header = ["PP", "TG", "B", "N_KV"]
    for metric in METRICS:
        header += [f"{metric} {_letter(i)}" for i in range(len(sides))]
        header += [f"{metric} {_letter(i)}/A" for i in range(1, len(sides))]
    body = []
    for cr in cmp.rows:
        pp, tg, pl = cr.key
        cells = [str(pp), str(tg), str(pl), _fmt(cr.n_kv, "d")]
        for metric in METRICS:
            cells += [_fmt(cr.value(i, metric), ".2f") for i in range(len(sides))]
            cells += [_fmt(cr.ratio(i, metric), ".3f") for i in range(1, len(sides))]
        body.append(cells)
    out += _table(header, body)
    out.append("")
    missing = cmp.missing
    if missing:
        out.append(f"rows missing on a side ({len(missing)}):")
        for (pp, tg, pl), lacking in missing:
            where = ", ".join(f"{_letter(i)} ({sides[i].label})" for i in lacking)
            out.append(f"  PP={pp} TG={tg} B={pl}: missing in {where}")
    else:
        out.append(f"all {len(cmp.rows)} rows present on every side")
    for i, s in enumerate(sides):
        if s.duplicates:
            out.append(
                f"note: {_letter(i)} has {s.duplicates} repeated (PP, TG, B) row(s); the last one is used"
            )
    return "\n".join(out) + "\n"


def render_csv(cmp: Comparison) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    n = len(cmp.sides)
    header = ["pp", "tg", "pl", "n_kv"]
    for metric, key in METRICS.items():
        header += [f"{key}_{_letter(i)}" for i in range(n)]
        header += [f"{key}_{_letter(i)}/A" for i in range(1, n)]
    w.writerow(header)
    for cr in cmp.rows:
        cells = [*cr.key, "" if cr.n_kv is None else cr.n_kv]
        for metric in METRICS:
            cells += ["" if (v := cr.value(i, metric)) is None else f"{v:.2f}" for i in range(n)]
            cells += ["" if (v := cr.ratio(i, metric)) is None else f"{v:.4f}" for i in range(1, n)]
        w.writerow(cells)
    return buf.getvalue()


def render_jsonl(cmp: Comparison) -> str:
    lines = []
    labels = [s.label for s in cmp.sides]
    for cr in cmp.rows:
        pp, tg, pl = cr.key
        obj = {"pp": pp, "tg": tg, "pl": pl, "n_kv": cr.n_kv, "sides": {}, "ratios": {}}
        for i, label in enumerate(labels):
            obj["sides"][label] = (
                None if cr.rows[i] is None else {k: cr.value(i, m) for m, k in METRICS.items()}
            )
            if i:
                obj["ratios"][label] = {k: cr.ratio(i, m) for m, k in METRICS.items()}
        obj["missing_in"] = [labels[i] for i, r in enumerate(cr.rows) if r is None]
        lines.append(json.dumps(obj))
    return "\n".join(lines) + "\n"


RENDERERS = {"md": render_md, "csv": render_csv, "jsonl": render_jsonl}


def compare_main(paths: list[str], modes: Optional[list[str]] = None, fmt: str = "md") -> str:
    """The text `batchbench compare` prints."""
    if fmt not in RENDERERS:
        raise _Error(f"unknown compare format {fmt!r} (use md, csv or jsonl)")
    if not paths:
        raise _Error("compare needs at least one results file")
    sides = load_sides([str(p) for p in paths], modes)
    if len(sides) < 2:
        raise _Error(
            f"nothing to compare: {len(sides)} side; give two files or a file with two modes"
        )
    return RENDERERS[fmt](compare_sides(sides))


# --- CLI ----------------------------------------------------------------------------------


def _cli_error(e: Exception, code: int = 1):
    import typer

    msg = " ".join(str(e).split())  # one line, whatever the message held
    print(f"error: {msg}", file=sys.stderr)
    return typer.Exit(code)


def register(app) -> None:
    """Add the `compare` and `plot` subcommands to a Typer app."""
    import typer

    @app.command("compare")
    def compare_cmd(
        paths: list[str] = typer.Argument(
            ..., help="results files: batchbench or llama-batched-bench md/jsonl/CSV"
        ),
        mode: Optional[list[str]] = typer.Option(
            None, "--mode", help="keep only this mode (repeatable)"
        ),
        output_format: str = typer.Option("md", "--format", "-f", help="md, csv or jsonl"),
        output: Optional[str] = typer.Option(
            None, "--output", "-o", help="write here instead of stdout"
        ),
    ) -> None:
        """Match rows on (PP, TG, B) and print them side by side with ratios to the first side."""
        try:
            text = compare_main(paths, mode or None, output_format)
            if output:
                Path(output).write_text(text)
            else:
                sys.stdout.write(text)
        except (ValueError, OSError) as e:
            raise _cli_error(e) from None

    @app.command("plot")
    def plot_cmd(
        paths: list[str] = typer.Argument(..., help="results files"),
        output: str = typer.Option(..., "--output", "-o", help="image file (.png, .svg, .pdf)"),
        x: str = typer.Option("B", "--x", help="x axis: B or N_KV"),
        metric: str = typer.Option(
            "S_TG", "--metric", help="S_TG, S_PP, S or both (S_PP and S_TG)"
        ),
        mode: Optional[list[str]] = typer.Option(
            None, "--mode", help="keep only this mode (repeatable)"
        ),
        title: Optional[str] = typer.Option(None, "--title", help="figure title"),
    ) -> None:
        """Plot speed against B or N_KV, one line per file and mode."""
        from batchbench import plot

        try:
            series = plot.plot_results(
                paths, output, x=x, metric=metric, modes=mode or None, title=title
            )
            print(f"wrote {output} ({len(series)} series)", file=sys.stderr)
        except (ValueError, OSError) as e:
            raise _cli_error(e) from None
