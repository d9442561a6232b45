"""Repetition statistics and llama-batched-bench's row formulas.

llama.cpp computes every time and speed in float32 (`float t_pp = (t1 - t0) / 1e6f`, then
`float speed_pp = pl*pp / t_pp`); doing the same here reproduces its printed digits.
With `-r N` each config runs N times: the row reports llama.cpp's formulas applied to the
median times, plus the slowest and fastest speed seen over the repetitions.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

_f32 = np.float32


def summarize(values: Sequence[float]) -> tuple[float, float, float]:
    """(median, min, max) of a non-empty sequence; even counts take the mean of the middle two."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("summarize: no values")
    if any(math.isnan(v) for v in vals):
        raise ValueError("summarize: NaN in values")
    return statistics.median(vals), min(vals), max(vals)


def n_kv_required(pp: int, tg: int, pl: int, pps: bool = False, kv_unified: bool = True) -> int:
    """N_KV column: the cells the config needs (llama.cpp's `n_ctx_req`)."""
    if pps:
        return (pp if kv_unified else pl * pp) + pl * tg
    return pl * (pp + tg)


def _ratio(tokens: int, seconds: float) -> float:
    # float32 division as in C; 0 tokens prints 0.00 whatever the time (PP = 0 rows).
    if tokens == 0:
        return 0.0
    if seconds <= 0.0:
        return math.inf
    return float(_f32(tokens) / _f32(seconds))


@dataclass
class Row:
    """The ten columns of a llama-batched-bench row (its jsonl keys); richer rows extend it."""

    pp: int
    tg: int
    pl: int
    n_kv: int
    t_pp: float
    speed_pp: float
    t_tg: float
    speed_tg: float
    t: float
    speed: float


@dataclass
class Speeds:
    """One llama.cpp row from the two measured times."""

    n_kv: int
    t_pp: float
    speed_pp: float
    t_tg: float
    speed_tg: float
    t: float
    speed: float


def llama_row(
    pp: int, tg: int, pl: int, t_pp: float, t_tg: float, pps: bool = False, kv_unified: bool = True
) -> Speeds:
    """llama-batched-bench's formulas (spec section 4), in float32."""
    t_pp32 = _f32(t_pp)
    t_tg32 = _f32(t_tg)
    t32 = t_pp32 + t_tg32
    pp_tokens = pp if pps else pl * pp
    tg_tokens = pl * tg
    return Speeds(
        n_kv=n_kv_required(pp, tg, pl, pps, kv_unified),
        t_pp=float(t_pp32),
        speed_pp=_ratio(pp_tokens, float(t_pp32)),
        t_tg=float(t_tg32),
        speed_tg=_ratio(tg_tokens, float(t_tg32)),
        t=float(t32),
        # S counts tokens processed: (PP or B*PP) + B*TG over the total time.
        speed=_ratio(pp_tokens + tg_tokens, float(t32)),
    )


@dataclass
class RepRow(Row):
    """N repetitions of one config folded into one row; names match the jsonl keys."""

    reps: int
    speed_pp_min: float
    speed_pp_max: float
    speed_tg_min: float
    speed_tg_max: float
    speed_min: float
    speed_max: float

    def as_dict(self) -> dict:
        return asdict(self)


def combine_repetitions(
    pp: int,
    tg: int,
    pl: int,
    t_pp: Sequence[float],
    t_tg: Sequence[float],
    pps: bool = False,
    kv_unified: bool = True,
) -> RepRow:
    """One row from N repetitions: formulas on the median times, min/max of per-run speeds.

    The total T is median(T_PP) + median(T_TG), as llama.cpp adds its two times; the median
    of the sums could come from a different pair of runs.
    """
    if len(t_pp) != len(t_tg):
        raise ValueError(
            f"combine_repetitions: {len(t_pp)} T_PP values but {len(t_tg)} T_TG values"
        )
    if not t_pp:
        raise ValueError("combine_repetitions: no repetitions")
    if any(float(v) < 0 for v in (*t_pp, *t_tg)):
        raise ValueError("combine_repetitions: negative time")
    med = llama_row(pp, tg, pl, summarize(t_pp)[0], summarize(t_tg)[0], pps, kv_unified)
    runs = [llama_row(pp, tg, pl, a, b, pps, kv_unified) for a, b in zip(t_pp, t_tg)]

    def span(name: str) -> tuple[float, float]:
        vals = [getattr(r, name) for r in runs]
        return min(vals), max(vals)

    pp_lo, pp_hi = span("speed_pp")
    tg_lo, tg_hi = span("speed_tg")
    s_lo, s_hi = span("speed")
    return RepRow(
        pp=pp,
        tg=tg,
        pl=pl,
        n_kv=med.n_kv,
        t_pp=med.t_pp,
        speed_pp=med.speed_pp,
        t_tg=med.t_tg,
        speed_tg=med.speed_tg,
        t=med.t,
        speed=med.speed,
        reps=len(t_pp),
        speed_pp_min=pp_lo,
        speed_pp_max=pp_hi,
        speed_tg_min=tg_lo,
        speed_tg_max=tg_hi,
        speed_min=s_lo,
        speed_max=s_hi,
    )
