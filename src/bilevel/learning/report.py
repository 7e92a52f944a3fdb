"""The outputs of a ``bilevel hpo`` run: ``report.html``, its evaluation plots with the final
θ, and the learnt hyperparameters (``hyperparameters.csv`` and their plot).

The page holds the validation loss and test metric of the initial θ, the learnt θ and the best
common strength of the grid baseline; the validation loss and test metric against cost and
wall time (with the evaluation at the final θ and the baseline as a reference line); the upper
loss; the learnt hyperparameters; and the options of the run.
"""

from __future__ import annotations

import csv
import math
import pathlib
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bilevel.config import config_dict
from bilevel.learning.datasets import SplitData
from bilevel.learning.models import FiniteSumModel, HypercleaningModel
from bilevel.runs.plots import new_figure, plot_metrics
from bilevel.runs.report import Report
from bilevel.runs.rundir import atomic_output, read_metrics

__all__ = [
    "BEST_HYPERPARAMETERS_FILE",
    "HYPERPARAMETERS_FILE",
    "plot_hyperparameters",
    "write_hyperparameters",
    "write_report",
]

#: Evaluation metrics of an hpo run, in the order they are shown.
METRICS = ("val_loss", "test_accuracy", "test_mse", "test_r2")


def write_report(run_dir: Path, config: Any, summary: Mapping[str, Any]) -> Path:
    """Redraw the evaluation plots of ``run_dir/plots`` with the final evaluation and the grid
    baseline, then write ``run_dir/report.html``; returns its path."""
    metrics = run_dir / "metrics.jsonl"
    records = read_metrics(metrics) if metrics.exists() else []
    final = summary["final"]
    baseline = summary["baseline"]
    keys = [k for k in METRICS if k in final]
    final_record = {"cost": summary["cost"], "wall_time": summary["wall_time"], **final}
    label = f"best common θ = {baseline['theta']:g}"
    references = {k: {label: baseline[k]} for k in keys if isinstance(baseline.get(k), float)}
    if records:
        try:
            plot_metrics(
                records,
                run_dir / "plots",
                x_keys=("cost", "wall_time"),
                y_keys=keys,
                final=final_record,
                references=references,
            )
        except ImportError as exc:  # matplotlib missing: the page keeps its tables
            warnings.warn(f"no evaluation plots: {exc}", RuntimeWarning, stacklevel=2)

    report = Report(
        f"bilevel hpo: {summary['model']} on {summary['data']} with {summary['method']}",
        subtitle=(
            f"run directory {summary['run_dir']} · status {summary['status']} · "
            f"{summary['steps']} steps, {summary['cost']:.4g} oracle calls, "
            f"{summary['wall_time']:.1f} s"
        ),
    )
    report.heading("Results")
    rows = [
        ["initial θ", *(summary["initial"].get(k) for k in keys)],
        ["learnt θ", *(final.get(k) for k in keys)],
        [label, *(baseline.get(k) for k in keys)],
    ]
    report.table(["", *keys], rows, caption=f"{summary['n_hyperparameters']} hyperparameters")
    plots = run_dir / "plots"
    figures = [(f"{k}_vs_cost", f"{k} at each evaluation and at the final θ (star)") for k in keys]
    figures += [
        ("upper_loss_vs_cost", "upper-level loss of each step (faint) and its running mean"),
        ("hyperparameters", "learnt hyperparameters"),
    ]
    for stem, caption in figures:
        if (plots / f"{stem}.png").is_file():
            report.figure(plots / f"{stem}.png", caption, width=520)
    theta = summary["theta"]
    report.table(
        ["θ", "value"],
        [[k, v] for k, v in theta.items() if not isinstance(v, Mapping)],
        caption="summary of the learnt θ (all values in hyperparameters.csv)",
    )
    gap = summary.get("lower_gap")
    if gap is not None:
        report.paragraph(
            f"At step {gap['step']} the upper loss at the method's own lower iterate was "
            f"{gap['f_iterate']:.6g}, F(θ) at an accurate lower solution {gap['val_loss']:.6g} "
            f"({100 * gap['relative']:.1f} % apart).",
            note=True,
        )
    report.heading("Configuration")
    report.key_values(dict(sorted(config_dict(config).items())))
    return report.write(run_dir / "report.html")


#: The learnt hyperparameters, one row each, in the run directory.
HYPERPARAMETERS_FILE = "hyperparameters.csv"
#: The hyperparameters of the best evaluation (lowest validation loss), beside them.
BEST_HYPERPARAMETERS_FILE = "hyperparameters_best.csv"


def write_hyperparameters(path: pathlib.Path, model: FiniteSumModel, data: SplitData) -> None:
    """The learnt θ as CSV: for per-feature models one row per feature (``feature``: its name
    or ``x<k>``, ``theta``, ``strength`` λ = exp θ, for the standardised feature), for
    hyper-cleaning one row per training sample (``row``: its row in the original data,
    ``theta``, ``weight`` σ(θ), and ``corrupted`` when the corruption is known)."""
    theta = model.theta.detach().to("cpu", torch.float64).reshape(-1)
    with atomic_output(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        if isinstance(model, HypercleaningModel):
            rows = data.train_index if data.train_index is not None else torch.arange(len(theta))
            columns = [rows.tolist(), [f"{v:.9g}" for v in theta.tolist()]]
            columns.append([f"{v:.9g}" for v in torch.sigmoid(theta).tolist()])
            header = ["row", "theta", "weight"]
            if model.corrupted is not None:
                header.append("corrupted")
                columns.append(model.corrupted.int().tolist())
            out.writerow(header)
            out.writerows(zip(*columns))
            return
        d = data.n_features
        names = data.feature_names if data.feature_names else [f"x{k}" for k in range(d)]
        if len(theta) != d:  # one common strength, or one per coefficient
            names = [f"theta{k}" for k in range(len(theta))]
        out.writerow(["feature", "theta", "strength"])
        for name, value in zip(names, theta.tolist()):
            out.writerow([name, f"{value:.9g}", f"{math.exp(value):.9g}"])


def plot_hyperparameters(
    path: pathlib.Path, model: FiniteSumModel, data: SplitData, theta0: float
) -> None:
    """A figure of the learnt θ: the strengths λ_k per feature (log scale) against the common
    starting value exp θ₀, or for hyper-cleaning the histogram of the sample weights σ(θ_j),
    clean and corrupted samples apart when the corruption is known."""
    try:
        fig = new_figure(8, 3.5)
    except ImportError as exc:
        warnings.warn(f"no hyperparameter plot: {exc}", RuntimeWarning, stacklevel=2)
        return
    ax = fig.add_subplot()
    theta = model.theta.detach().to("cpu", torch.float64).reshape(-1).numpy()
    if isinstance(model, HypercleaningModel):
        weights = 1.0 / (1.0 + np.exp(-theta))
        bins = np.linspace(0.0, 1.0, 41)
        if model.corrupted is not None:
            bad = model.corrupted.cpu().numpy()
            ax.hist(weights[~bad], bins=bins, alpha=0.7, label="clean labels")
            ax.hist(weights[bad], bins=bins, alpha=0.7, label="corrupted labels")
            ax.legend()
        else:
            ax.hist(weights, bins=bins)
        ax.set(xlabel="learnt sample weight σ(θ_j)", ylabel="training samples")
    else:
        k = np.arange(len(theta))
        ax.bar(k, np.exp(theta), color="C0")
        ax.axhline(
            math.exp(theta0), color="C3", linestyle="--", label=f"start: λ = {math.exp(theta0):.3g}"
        )
        ax.set_yscale("log")
        values = [*np.exp(theta), math.exp(theta0)]
        ax.set_ylim(min(values) / 1.5, max(values) * 1.5)  # a range even when all are equal
        ax.set(xlabel="feature", ylabel="learnt strength λ_k")
        names = data.feature_names
        if names and len(names) == len(theta) and len(theta) <= 40:
            ax.set_xticks(k, names, rotation=90, fontsize=7)
        ax.legend()
    ax.set_title(f"{type(model).__name__} on {data.name}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
