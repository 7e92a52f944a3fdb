"""Plots of logged metrics against cost (oracle calls) and wall-clock time.

Needs matplotlib (``pip install 'bilevel[plots]'``), imported only when a plot is drawn. Figures
are drawn with the Agg canvas directly, without pyplot, so no global backend is changed.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bilevel.problem import BilevelError
from bilevel.runs.rundir import atomic_output, read_metrics

__all__ = ["load_records", "plot_metrics"]

#: Keys never plotted on the y axis by default (counters).
COUNTER_KEYS = ("step", "epoch")

LABELS = {
    "step": "upper-level iteration k",
    "epoch": "epoch",
    "cost": "cost (oracle calls)",
    "wall_time": "wall-clock time (s)",
    "upper_loss": "upper-level loss",
    "eps": "lower-level tolerance ε",
    "delta": "adjoint tolerance δ",
    "alpha": "step size α",
    "bound": "hypergradient error bound ω",
}

Source = Any  # a RunDirectory, a path, or a sequence of records


def _matplotlib() -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(
            "plotting needs matplotlib, which is not installed; install it with "
            "pip install 'bilevel[plots]'"
        ) from exc
    return Figure, FigureCanvasAgg


def load_records(source: Source) -> list[dict[str, Any]]:
    """Metrics records from a RunDirectory (anything with ``read_metrics()``), a run directory
    or ``metrics.jsonl`` path, or a sequence of record dicts."""
    if hasattr(source, "read_metrics"):
        return list(source.read_metrics())
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if not p.exists():
            raise BilevelError(f"no run directory or metrics file at {p}")
        return read_metrics(p)
    if isinstance(source, Sequence) and all(isinstance(r, Mapping) for r in source):
        return [dict(r) for r in source]
    raise BilevelError(
        f"cannot read metrics from {type(source).__name__}; pass a RunDirectory, a path, "
        "a list of records, or a dict label -> one of these"
    )


def _number(value: Any) -> float:
    if isinstance(value, bool) or value is None:
        return math.nan
    if isinstance(value, (int, float)):
        return float(value)
    return math.nan


def _default_dir(source: Source) -> Path | None:
    if hasattr(source, "read_metrics") and hasattr(source, "path"):
        return Path(source.path) / "plots"
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        return (p if p.is_dir() else p.parent) / "plots"
    return None


def new_figure(width: float, height: float) -> Any:
    """A matplotlib ``Figure`` of ``width`` × ``height`` inches on an Agg canvas, made without
    pyplot (no global state, no display). Raises ``ImportError`` with the install command when
    matplotlib is missing."""
    Figure, FigureCanvasAgg = _matplotlib()
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def plot_metrics(
    source: Source | Mapping[str, Source],
    out_dir: str | os.PathLike | None = None,
    x_keys: Iterable[str] = ("cost", "wall_time"),
    y_keys: Iterable[str] | None = None,
    *,
    dpi: int = 100,
    fmt: str = "png",
    title: str | None = None,
) -> list[Path]:
    """Write one figure per (metric, x key) pair: ``<out_dir>/<y>_vs_<x>.<fmt>``.

    ``source`` is a RunDirectory, a run directory or metrics-file path, a list of records, or
    a dict ``label -> source`` to overlay several runs with a legend. ``y_keys=None`` plots
    every numeric metric except the x keys and the counters ``step`` and ``epoch``. Records
    without a finite value for both keys are skipped; a pair with no points gives no file. The
    y axis is logarithmic when all its values are positive and span more than two decades.
    ``out_dir`` defaults to ``<run directory>/plots`` for a single run directory. Returns the
    written paths.
    """
    if isinstance(source, Mapping):
        runs = {str(label): load_records(s) for label, s in source.items()}
        default = None
    else:
        runs = {"": load_records(source)}
        default = _default_dir(source)
    if out_dir is None:
        if default is None:
            raise BilevelError("plot_metrics needs out_dir unless given a single run directory")
        out_dir = default
    x_list = [x_keys] if isinstance(x_keys, str) else list(x_keys)
    if y_keys is None:
        seen: dict[str, None] = {}
        for records in runs.values():
            for r in records:
                for k, v in r.items():
                    if k in x_list or k in COUNTER_KEYS or k in seen:
                        continue
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        seen[k] = None
        y_list = list(seen)
    else:
        y_list = [y_keys] if isinstance(y_keys, str) else list(y_keys)

    Figure, FigureCanvasAgg = _matplotlib()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for x_key in x_list:
        for y_key in y_list:
            series = []
            for label, records in runs.items():
                pts = [(_number(r.get(x_key)), _number(r.get(y_key))) for r in records]
                pts = [(x, y) for x, y in pts if math.isfinite(x) and math.isfinite(y)]
                if pts:
                    series.append((label, pts))
            if not series:
                continue
            fig = Figure(figsize=(5.5, 3.8))
            FigureCanvasAgg(fig)
            ax = fig.add_subplot()
            all_y = [y for _, pts in series for _, y in pts]
            for label, pts in series:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, ms=3, label=label or None)
            if min(all_y) > 0 and max(all_y) > 100 * min(all_y):
                ax.set_yscale("log")
            ax.set_xlabel(LABELS.get(x_key, x_key))
            ax.set_ylabel(LABELS.get(y_key, y_key))
            ax.set_title(title if title is not None else f"{y_key} vs {x_key}")
            ax.grid(True, alpha=0.3)
            if any(label for label, _ in series):
                ax.legend()
            fig.tight_layout()
            path = out / f"{_safe(y_key)}_vs_{_safe(x_key)}.{fmt}"
            with atomic_output(path) as tmp:
                fig.savefig(tmp, dpi=dpi, format=fmt)
            written.append(path)
    return written
