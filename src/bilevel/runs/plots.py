"""Plots of logged metrics against cost (oracle calls) and wall-clock time.

Needs matplotlib (``pip install 'bilevel[plots]'``), imported only when a plot is drawn. Figures
are drawn with the Agg canvas directly, without pyplot, so no global backend is changed.
"""

from __future__ import annotations

import io
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bilevel.problem import BilevelError
from bilevel.runs.rundir import atomic_output, read_metrics

__all__ = [
    "figure_png",
    "image_grid",
    "load_records",
    "metric_figure",
    "new_figure",
    "plot_metrics",
    "running_mean",
]

#: Keys never plotted on the y axis by default (counters).
COUNTER_KEYS = ("step", "epoch")
#: Keys drawn as a running mean over faint raw values by default (minibatch estimates).
SMOOTHED_KEYS = ("upper_loss",)

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
    "test_psnr": "test PSNR (dB)",
    "val_psnr": "validation PSNR (dB)",
    "val_loss": "validation loss F(θ)",
    "test_accuracy": "test accuracy",
    "test_mse": "test mean squared error",
    "grad_norm": "hypergradient norm ‖z‖",
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
    smooth: Iterable[str] = SMOOTHED_KEYS,
    final: Mapping[str, Any] | None = None,
    references: Mapping[str, Mapping[str, float]] | None = None,
) -> list[Path]:
    """Write one figure per (metric, x key) pair: ``<out_dir>/<y>_vs_<x>.<fmt>``.

    ``source`` is a RunDirectory, a run directory or metrics-file path, a list of records, or
    a dict ``label -> source`` to overlay several runs with a legend. ``y_keys=None`` plots
    every numeric metric except the x keys and the counters ``step`` and ``epoch``. Records
    without a finite value for both keys are skipped; a pair with no points gives no file. The
    y axis is logarithmic when all its values are positive and span more than two decades.
    ``out_dir`` defaults to ``<run directory>/plots`` for a single run directory. Returns the
    written paths.

    Keys in ``smooth`` (minibatch estimates such as ``upper_loss``) are drawn as a trailing
    running mean (:func:`running_mean`) over their raw values, which stay visible but faint.
    ``final`` is a record logged nowhere else (e.g. the evaluation at the final θ, with its
    ``cost`` and ``wall_time``): it extends the single run's curve and is marked by a star.
    ``references`` maps a y key to horizontal reference lines ``{label: value}`` (e.g. the
    test PSNR of a tuned baseline).
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

    _matplotlib()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for x_key in x_list:
        for y_key in y_list:
            fig = metric_figure(
                runs, x_key, y_key, title=title, smooth=smooth, final=final, references=references
            )
            if fig is None:
                continue
            path = out / f"{_safe(y_key)}_vs_{_safe(x_key)}.{fmt}"
            with atomic_output(path) as tmp:
                fig.savefig(tmp, dpi=dpi, format=fmt)
            written.append(path)
    return written


def metric_figure(
    runs: Mapping[str, Sequence[Mapping[str, Any]]],
    x_key: str,
    y_key: str,
    *,
    title: str | None = None,
    smooth: Iterable[str] = SMOOTHED_KEYS,
    final: Mapping[str, Any] | None = None,
    references: Mapping[str, Mapping[str, float]] | None = None,
) -> Any | None:
    """The figure of one (metric, x key) pair of :func:`plot_metrics` for ``runs`` (label ->
    records; one run has label ""), or None when no record has both values."""
    smooth_keys = {smooth} if isinstance(smooth, str) else set(smooth)
    refs = dict((references or {}).get(y_key, {}))
    series = []
    for label, records in runs.items():
        pts = _points(records, x_key, y_key)
        if pts:
            series.append((label, pts))
    end = _points([final], x_key, y_key) if final is not None and len(runs) == 1 else []
    if not series and not end:
        return None
    fig = new_figure(6.0, 3.9)
    ax = fig.add_subplot()
    all_y = [y for _, pts in series for _, y in pts] + [y for _, y in end]
    all_y += [float(v) for v in refs.values()]
    legend = False
    for label, pts in series:
        xs, ys = zip(*pts, strict=True)
        if y_key in smooth_keys and len(pts) >= 10:
            window = max(5, len(pts) // 10)
            (raw,) = ax.plot(xs, ys, lw=0.8, alpha=0.25, label=f"{label or 'raw'} per step")
            ax.plot(
                xs,
                running_mean(ys, window),
                lw=2.0,
                color=raw.get_color(),
                label=(f"{label}: " if label else "") + f"running mean of {window} steps",
            )
            legend = True
            continue
        if end:
            xs, ys = xs + (end[0][0],), ys + (end[0][1],)
        if not label and (end or refs):
            label = LABELS.get(y_key, y_key)
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, label=label or None)
        legend = legend or bool(label)
    if end:
        ax.plot(*end[0], marker="*", ms=12, color="C3", ls="none", label="final θ")
        legend = True
    for i, (name, value) in enumerate(refs.items()):
        ax.axhline(float(value), ls="--", lw=1.2, color=f"C{i + 1}", label=name)
        legend = True
    if min(all_y) > 0 and max(all_y) > 100 * min(all_y):
        ax.set_yscale("log")
    ax.set_xlabel(LABELS.get(x_key, x_key))
    ax.set_ylabel(LABELS.get(y_key, y_key))
    ax.set_title(title if title is not None else LABELS.get(y_key, y_key))
    ax.grid(True, alpha=0.3)
    if legend:
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def _points(records: Sequence[Mapping[str, Any]], x_key: str, y_key: str) -> list:
    pts = [(_number(r.get(x_key)), _number(r.get(y_key))) for r in records]
    return [(x, y) for x, y in pts if math.isfinite(x) and math.isfinite(y)]


def running_mean(values: Sequence[float], window: int) -> list[float]:
    """Trailing running mean: entry k is the mean of ``values[max(0, k − window + 1) : k + 1]``
    (shorter windows at the start, so the trend starts with the first value)."""
    if window < 1:
        raise BilevelError(f"running-mean window must be positive, got {window}")
    out, total = [], 0.0
    for k, v in enumerate(values):
        total += v
        if k >= window:
            total -= values[k - window]
        out.append(total / min(k + 1, window))
    return out


def image_grid(
    columns: Sequence[tuple[str, Any]],
    captions: Sequence[Sequence[str]] | None = None,
    *,
    count: int = 4,
    cell: float = 1.9,
) -> Any:
    """A figure of images: one titled column per ``(title, images)`` pair, one row per image.

    ``images`` are tensors (N, C, H, W) with values in [0, 1] (clipped; grayscale when C = 1,
    RGB when C = 3), of which the first ``count`` are shown. ``captions[j][i]`` is written under
    image i of column j (e.g. its PSNR). ``cell`` is the side of one image in inches.
    """
    if not columns:
        raise BilevelError("image_grid needs at least one column")
    n = min(count, *(int(images.shape[0]) for _, images in columns))
    caption_height = 0.0 if captions is None else 0.3  # inches under each image
    fig = new_figure(cell * len(columns), (cell + caption_height) * n + 0.7)
    axes = fig.subplots(n, len(columns), squeeze=False)
    for j, (name, images) in enumerate(columns):
        arr = images[:n].detach().clamp(0, 1).cpu().float().permute(0, 2, 3, 1).numpy()
        for i in range(n):
            ax = axes[i][j]
            img = arr[i, ..., 0] if arr.shape[-1] == 1 else arr[i]
            ax.imshow(img, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=10)
            if captions is not None:
                ax.set_xlabel(captions[j][i], fontsize=8)
    fig.tight_layout(pad=0.4)
    return fig


def figure_png(fig: Any, dpi: int = 100) -> bytes:
    """The figure as PNG bytes (for inlining into a report)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format="png")
    return buffer.getvalue()
