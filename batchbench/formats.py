"""Output in llama-batched-bench's exact layouts (md, jsonl) plus CSV. Formatting only."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass, fields
from typing import IO

from batchbench.stats import Row


@dataclass
class Header:
    n_kv_max: int
    n_batch: int
    n_ubatch: int
    flash_attn: int
    is_pp_shared: int
    is_tg_separate: int
    n_gpu_layers: int
    n_threads: int
    n_threads_batch: int


@dataclass
class BenchRow(Row):
    mode: str = ""
    reps: int = 1
    speed_pp_min: float = 0.0
    speed_pp_max: float = 0.0
    speed_tg_min: float = 0.0
    speed_tg_max: float = 0.0
    peak_mem_mb: float = 0.0
    ratio_tg: float | None = None  # S_TG over the first A/B mode of the same config


LLAMA_KEYS = tuple(f.name for f in fields(Row))


def header_line(h: Header, func: str = "main") -> str:
    return (
        f"{func}: n_kv_max = {h.n_kv_max}, n_batch = {h.n_batch}, n_ubatch = {h.n_ubatch}, "
        f"flash_attn = {h.flash_attn}, is_pp_shared = {h.is_pp_shared}, "
        f"is_tg_separate = {h.is_tg_separate}, n_gpu_layers = {h.n_gpu_layers}, "
        f"n_threads = {h.n_threads}, n_threads_batch = {h.n_threads_batch}"
    )


def _extra_columns(ab: bool, reps: bool) -> list[tuple[str, str]]:
    cols = []
    if ab:
        cols += [("mode", "%10s"), ("S_TG x", "%7s")]
    if reps:
        cols += [("S_PP min", "%8s"), ("S_PP max", "%8s"), ("S_TG min", "%8s"), ("S_TG max", "%8s")]
    if cols:
        cols.append(("mem MB", "%8s"))
    return cols


def table_header(ab: bool = False, reps: bool = False, extras: bool = True) -> str:
    names = ["PP", "TG", "B", "N_KV", "T_PP s", "S_PP t/s", "T_TG s", "S_TG t/s", "T s", "S t/s"]
    fmts = ["%6s", "%6s", "%4s", "%6s"] + ["%8s"] * 6
    cols = list(zip(names, fmts)) + (_extra_columns(ab, reps) if extras else [])
    top = _join([fmt % name for name, fmt in cols])
    sep = "|" + "|".join("-" * (len(fmt % name) + (1 if i == 0 else 2)) for i, (name, fmt) in enumerate(cols)) + "|"
    return top + "\n" + sep


def _join(cells: list[str]) -> str:
    # llama.cpp: "|%6s | %6s | ... |": the first cell has no leading space.
    return "|" + cells[0] + " |" + "".join(f" {c} |" for c in cells[1:])


def md_row(r: BenchRow, ab: bool = False, reps: bool = False, extras: bool = True) -> str:
    cells = [
        "%6d" % r.pp, "%6d" % r.tg, "%4d" % r.pl, "%6d" % r.n_kv,
        "%8.3f" % r.t_pp, "%8.2f" % r.speed_pp, "%8.3f" % r.t_tg, "%8.2f" % r.speed_tg,
        "%8.3f" % r.t, "%8.2f" % r.speed,
    ]
    if extras:
        if ab:
            cells += ["%10s" % r.mode, "%7.2f" % (r.ratio_tg or 1.0)]
        if reps:
            cells += ["%8.2f" % v for v in (r.speed_pp_min, r.speed_pp_max, r.speed_tg_min, r.speed_tg_max)]
        if ab or reps:
            cells.append("%8.1f" % r.peak_mem_mb)
    return _join(cells)


def jsonl_row(h: Header, r: BenchRow, meta: dict) -> str:
    d = {
        "n_kv_max": h.n_kv_max, "n_batch": h.n_batch, "n_ubatch": h.n_ubatch,
        "flash_attn": h.flash_attn, "is_pp_shared": h.is_pp_shared,
        "n_gpu_layers": h.n_gpu_layers, "n_threads": h.n_threads,
        "n_threads_batch": h.n_threads_batch,
        "pp": r.pp, "tg": r.tg, "pl": r.pl, "n_kv": r.n_kv,
    }
    body = ", ".join(f"{json.dumps(k)}: {v}" for k, v in d.items())
    timings = ", ".join(
        f'"{k}": {"%f" % getattr(r, k)}' for k in ("t_pp", "speed_pp", "t_tg", "speed_tg", "t", "speed")
    )
    extra = {k: v for k, v in asdict(r).items() if k not in LLAMA_KEYS}
    extra.update(meta)
    tail = json.dumps(extra)[1:-1]
    return "{" + body + ", " + timings + (", " + tail if tail else "") + "}"


CSV_COLUMNS = [f.name for f in fields(BenchRow)] + [
    "n_kv_max", "n_batch", "n_ubatch", "flash_attn", "is_pp_shared", "is_tg_separate",
]


class CsvSink:
    """Appends one row per finished config and flushes at once, so an interrupted sweep keeps its rows."""

    def __init__(self, path: str, meta: dict):
        self.meta = meta
        new = not os.path.exists(path) or os.path.getsize(path) == 0
        self.f: IO = open(path, "a", newline="")
        self.w = csv.DictWriter(self.f, fieldnames=CSV_COLUMNS + list(meta))
        if new:
            self.w.writeheader()
            self.f.flush()

    def write(self, h: Header, r: BenchRow) -> None:
        row = asdict(r)
        row.update({k: getattr(h, k) for k in CSV_COLUMNS if hasattr(h, k)})
        row.update(self.meta)
        self.w.writerow(row)
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()
