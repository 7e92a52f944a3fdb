"""``report.html`` of a ``bilevel hpo`` run, and its evaluation plots with the final θ.

The page holds the validation loss and test metric of the initial θ, the learnt θ and the best
common strength of the grid baseline; the validation loss and test metric against cost and
wall time (with the evaluation at the final θ and the baseline as a reference line); the upper
loss; the learnt hyperparameters; and the options of the run.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bilevel.config import config_dict
from bilevel.runs.plots import plot_metrics
from bilevel.runs.report import Report
from bilevel.runs.rundir import read_metrics

__all__ = ["write_report"]

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
