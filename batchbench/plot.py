"""`batchbench plot`: speed against B or N_KV, one line per (file, mode).

matplotlib is an optional extra (`pip install batchbench[plot]`); it is imported only here, and
only the Agg canvas is used, so plotting never needs a display or touches pyplot's global state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from batchbench.compare import METRICS, Side, load_sides

X_AXES = {"B": "pl", "N_KV": "n_kv"}
UNITS = {"S_PP": "prompt tokens/s", "S_TG": "generated tokens/s", "S": "tokens/s"}


class PlotUnavailable(ValueError):
    pass


@dataclass
class Series:
    """One plotted line: what the legend says and the points drawn."""

    label: str
    metric: str  # "S_TG", "S_PP" or "S"
    x: list[int]
    y: list[float]
    side: str  # the (file, mode) label
    group: dict = field(default_factory=dict)  # e.g. {"PP": 4096, "TG": 32} within the side


def _metrics(metric: str) -> list[str]:
    m = metric.strip().upper()
    if m == "BOTH":
        return ["S_PP", "S_TG"]
    if m not in METRICS:
        raise ValueError(f"unknown metric {metric!r} (use S_TG, S_PP, S or both)")
    return [m]


def _x_axis(x: str) -> str:
    name = x.strip().upper()
    if name not in X_AXES:
        raise ValueError(f"unknown x axis {x!r} (use B or N_KV)")
    return name


def _group_fields(sides: list[Side], x: str) -> tuple[str, ...]:
    """Which row fields split a side into lines, so every line is a clean sweep along x."""
    if x == "B":
        return ("pp", "tg")
    # Along N_KV, a sweep over PP at fixed B (the seed config) is one line per B; a sweep over B
    # at fixed PP (the scaling config) is one line per PP.
    for side in sides:
        pps_per_b: dict = {}
        for r in side.rows.values():
            pps_per_b.setdefault((r.tg, r.pl), set()).add(r.pp)
        if any(len(v) > 1 for v in pps_per_b.values()):
            return ("tg", "pl")
    return ("pp", "tg")


_FIELD_NAMES = {"pp": "PP", "tg": "TG", "pl": "B"}


def build_series(sides: list[Side], x: str = "B", metric: str = "S_TG") -> list[Series]:
    x = _x_axis(x)
    fields = _group_fields(sides, x)
    xkey = X_AXES[x]
    groups_all = {tuple(getattr(r, f) for f in fields) for s in sides for r in s.rows.values()}
    # Name only what varies between lines, so a plain one-config-per-B file gets a plain label.
    varying = [i for i in range(len(fields)) if len({g[i] for g in groups_all}) > 1]
    out: list[Series] = []
    for m in _metrics(metric):
        key = METRICS[m]
        for side in sides:
            grouped: dict = {}
            for r in side.rows.values():
                if m == "S_PP" and r.pp == 0:
                    continue  # no prompt: S_PP is 0 by definition, not a measurement
                grouped.setdefault(tuple(getattr(r, f) for f in fields), []).append(r)
            for g in sorted(grouped):
                rows = sorted(grouped[g], key=lambda r: getattr(r, xkey))
                group = {_FIELD_NAMES[fields[i]]: g[i] for i in varying}
                suffix = " ".join(f"{k}={v}" for k, v in group.items())
                out.append(
                    Series(
                        label=f"{side.label} {suffix}".strip(),
                        metric=m,
                        x=[getattr(r, xkey) for r in rows],
                        y=[getattr(r, key) for r in rows],
                        side=side.label,
                        group=group,
                    )
                )
    if not out:
        raise ValueError(f"nothing to plot for {metric} (S_PP needs rows with PP > 0)")
    return out


def _common(sides: list[Side], names: tuple[str, ...]) -> str:
    """`model=..., machine=...` for extra fields every row of every side agrees on."""
    parts = []
    for name in names:
        vals = {str(r.extra.get(name)) for s in sides for r in s.rows.values()}
        if len(vals) == 1 and "None" not in vals:
            parts.append(vals.pop())
    return ", ".join(parts)


def _kilo(v: float, _pos=None) -> str:
    if v >= 1024 and v % 1024 == 0:
        return f"{int(v) // 1024}k"
    return f"{v:g}"


def plot_results(
    paths: list[str],
    output: str,
    x: str = "B",
    metric: str = "S_TG",
    modes: Optional[list[str]] = None,
    title: Optional[str] = None,
) -> list[Series]:
    """Write the figure to `output` and return the series drawn."""
    x = _x_axis(x)
    metrics = _metrics(metric)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator
    except ImportError:
        raise PlotUnavailable(
            "matplotlib is not installed: pip install 'batchbench[plot]'"
        ) from None

    sides = load_sides([str(p) for p in paths], modes)
    series = build_series(sides, x, metric)

    fig = Figure(figsize=(6.4 * len(metrics) + 1.2, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    colors = [
        "tab:blue",
        "tab:orange",
        "tab:green",
        "tab:red",
        "tab:purple",
        "tab:brown",
        "tab:pink",
        "tab:gray",
        "tab:olive",
        "tab:cyan",
    ]
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "D", "v", "P", "X", "*"]
    side_index = {s.label: i for i, s in enumerate(sides)}
    # One style per group across both panels, so a legend entry means the same line in each.
    group_index = {g: i for i, g in enumerate(sorted({tuple(s.group.items()) for s in series}))}
    legend: dict = {}  # label -> (order, handle)
    for ax, m in zip(axes, metrics):
        xs: set = set()
        for s in (s for s in series if s.metric == m):
            gi = group_index[tuple(s.group.items())]
            (line,) = ax.plot(
                s.x,
                s.y,
                label=s.label,
                color=colors[side_index[s.side] % len(colors)],
                linestyle=styles[gi % len(styles)],
                marker=markers[gi % len(markers)],
                markersize=5,
                linewidth=1.6,
            )
            legend.setdefault(s.label, ((side_index[s.side], gi), line))
            xs.update(s.x)
        ax.set_xscale("log", base=2)
        if x == "B":
            # Tick exactly the measured values: B = 1, 2, 3, 4, 8 ... reads better than 2^n.
            ax.xaxis.set_major_locator(FixedLocator(sorted(xs)))
        else:
            lo, hi = min(xs), max(xs)
            ticks = [2**k for k in range(max(lo, 1).bit_length() - 1, hi.bit_length() + 1)]
            ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(_kilo))
        ax.set_xlabel("B (parallel sequences)" if x == "B" else "N_KV (KV cells required)")
        ax.set_ylabel(f"{m} ({UNITS[m]})")
        ax.set_ylim(bottom=0)
        ax.grid(True, which="major", alpha=0.3)
        if len(metrics) > 1:
            ax.set_title(f"{m} vs {x}", fontsize="medium")
    entries = sorted(legend.items(), key=lambda kv: kv[1][0])
    fig.legend(
        [h for _, (_, h) in entries],
        [lab for lab, _ in entries],
        loc="outside right upper",
        fontsize="small",
        frameon=False,
    )
    context = _common(sides, ("model", "dtype", "quant", "machine", "backend"))
    heading = title or "batchbench: " + " and ".join(metrics) + f" vs {x}"
    fig.suptitle(heading + (f"\n{context}" if context and not title else ""))
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=150)
    return series
