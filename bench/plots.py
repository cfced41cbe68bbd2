"""PNG plots of a benchmark run: time and peak memory against N and against V.

One figure per (op, config, mode, dtype) that has a sweep of at least two points; one line per
implementation (ours solid, baselines dashed, a fixed colour each) and the hardware bound dotted.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from bench.report import IMPL_ORDER, MIB, impl_rank

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from bench.report import Row

PALETTE = ["#1f77b4", "#2ca02c", "#17becf", "#ff7f0e", "#d62728", "#9467bd", "#bcbd22", "#8c564b", "#e377c2"]
METRICS = (("time", "median time (ms)"), ("peak", "peak memory (MiB)"))


def color(name: str) -> str:
    """A fixed colour per implementation, the same in every plot."""
    return PALETTE[impl_rank(name) % len(PALETTE)] if name in IMPL_ORDER else "#7f7f7f"


def short(value: int) -> str:
    """Tick label: exact multiples of 1024 get a k (262144 -> "256k"), others stay (128256)."""
    return f"{value // 1024}k" if value % 1024 == 0 else str(value)


def x_of(row: Row, axis: str) -> int:
    return row.n if axis == "N" else row.v


def metric_of(row: Row, metric: str) -> float | None:
    if metric == "time":
        return row.median_s * 1e3
    return None if row.peak_bytes is None else max(row.peak_bytes / MIB, 1e-3)


def best_bounds(rows: list[Row], axis: str) -> list[tuple[int, float]]:
    """Per x, the lowest bound (ms) measured before any implementation's case (each measures its own)."""
    best: dict[int, float] = {}
    for row in rows:
        if row.bound_s:
            x = x_of(row, axis)
            best[x] = min(best.get(x, float("inf")), row.bound_s * 1e3)
    return sorted(best.items())


def fixed_dims(rows: list[Row], axis: str) -> str:
    """The dimensions held fixed along a sweep, for the axis label."""
    row = rows[0]
    if row.op == "attention":  # N is the sequence length T; heads student/teacher
        return f"H={row.h_s}/{row.h_t}"
    parts = [] if axis == "N" else [f"N={row.n}"]
    if row.op == "fused":
        parts.append(f"H={row.h_s}" if row.h_s == row.h_t else f"H={row.h_s}/{row.h_t}")
    if axis == "N":
        parts.append(f"V={row.v}")
    return ", ".join(parts)


def draw_panel(ax: Axes, rows: list[Row], axis: str, metric: str, label: str) -> None:
    """One panel: ``metric`` against ``axis`` for every implementation in ``rows``."""
    from matplotlib.ticker import LogFormatter, NullLocator

    for impl in sorted({row.implementation for row in rows}, key=impl_rank):
        points = sorted((x_of(r, axis), metric_of(r, metric)) for r in rows if r.implementation == impl)
        points = [(x, y) for x, y in points if y is not None]
        if points:
            style = "-" if impl.startswith("ours") else "--"
            ax.plot(*zip(*points), style, marker="o", label=impl, color=color(impl))
    if metric == "time" and (bounds := best_bounds(rows, axis)):
        ax.plot(*zip(*bounds), ":", color="black", label="hardware bound (best measured)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ticks = sorted({x_of(row, axis) for row in rows})
    ax.set_xticks(ticks, [short(t) for t in ticks])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1.5, 0.6)))
    shown = "T" if rows[0].op == "attention" and axis == "N" else axis
    ax.set_xlabel(f"{shown} ({fixed_dims(rows, axis)})")
    ax.set_ylabel(label)
    ax.set_title(f"{label.split(' (')[0]} vs {shown}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def plot_sweeps(rows: list[Row], out: Path, stem: str) -> list[Path]:
    """Write ``<out>/<stem>_<op>_<config>_<mode>.png`` for each swept combination; return the paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots written", file=sys.stderr)
        return []
    written = []
    for op, config, mode, dtype in sorted({(r.op, r.config, r.mode, r.dtype) for r in rows}):
        subset = [r for r in rows if (r.op, r.config, r.mode, r.dtype) == (op, config, mode, dtype)]
        axes = [a for a in ("N", "V") if len({x_of(r, a) for r in subset if a in r.sweeps}) >= 2]
        if not axes:
            continue
        fig, grid = plt.subplots(2, len(axes), figsize=(6.2 * len(axes), 8), squeeze=False)
        for col, axis in enumerate(axes):
            swept = [r for r in subset if axis in r.sweeps]
            for line, (metric, label) in enumerate(METRICS):
                draw_panel(grid[line][col], swept, axis, metric, label)
        name = {"logits": "contrastive_kd_loss (logits)", "attention": "attention_kd_loss (attention maps)"}.get(
            op, "fused_linear_contrastive_kd_loss")
        fig.suptitle(f"{name} — {mode}, config '{config}', {dtype}")
        fig.tight_layout()
        path = out / f"{stem}_{op}_{config}_{mode.replace('+', '-')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
