"""Figures and the HTML report of an imaging run (``bilevel denoise | deblur | inpaint``).

* :func:`reconstruction_figure`: titled columns (clean, the measurement y, TV, learned, and the
  final θ when the learned θ is another one) with the PSNR of every image under it;
  ``reconstructions.png``.
* :func:`filter_figure` and :func:`hyperparameter_rows`: the learned regulariser.
* :func:`write_run_figures`: the test-PSNR plots with the final evaluation, the learned
  (validation-selected) θ and the TV line, the validation-PSNR plot, the tolerance/bound plot
  (into ``plots/``).
* :func:`write_report`: ``report.html``, one self-contained page.
* :class:`TensorBoardEvaluation`: an evaluation callback that also logs to TensorBoard.

Matplotlib (``bilevel[plots]``) draws every figure.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bilevel.config import config_dict
from bilevel.imaging.config import REGULARISER_TITLES
from bilevel.imaging.metrics import psnr
from bilevel.runs.plots import image_grid, metric_figure, new_figure
from bilevel.runs.report import Report
from bilevel.runs.rundir import atomic_output
from bilevel.runs.tensorboard import TensorBoardLog

__all__ = [
    "TensorBoardEvaluation",
    "filter_figure",
    "hyperparameter_rows",
    "measurement_title",
    "reconstruction_figure",
    "write_report",
    "write_run_figures",
]

#: Images shown per column of the reconstruction grid.
GRID_IMAGES = 4


def measurement_title(task: str) -> str:
    """Column title of the degraded images: what the measurement y is for ``task``."""
    return {
        "denoise": "noisy y",
        "deblur": "measurement y (blur + noise)",
        "inpaint": "measurement y (mask + noise)",
    }.get(task, "measurement y")


def reconstruction_figure(
    clean: Tensor, columns: Sequence[tuple[str, Tensor]], count: int = GRID_IMAGES
) -> Any:
    """Clean images, then one titled column per ``(title, images)``, each image captioned with
    its PSNR (dB) against the clean one (values clipped to [0, 1] first)."""
    captions = [["reference"] * min(count, clean.shape[0])]
    for _, images in columns:
        values = psnr(images[:count].clamp(0, 1), clean[:count])
        captions.append([f"PSNR {float(v):.2f} dB" for v in values])
    return image_grid([("clean", clean), *columns], captions, count=count)


def _named(regulariser: nn.Module) -> dict[str, Tensor]:
    """Parameters and buffers of the regulariser, ``log_*`` ones as their exponential and
    ``raw_*`` ones as the regulariser's transformed value of the same name (e.g. the softplus
    ``coefficients()`` of ``raw_coefficients``)."""
    out: dict[str, Tensor] = {}
    for name, t in [*regulariser.named_parameters(), *regulariser.named_buffers()]:
        t = t.detach().double().cpu()
        if name.startswith("log_"):
            out[name[4:]] = t.exp()
        elif name.startswith("raw_") and hasattr(regulariser, name[4:]):
            value = getattr(regulariser, name[4:])
            value = value() if callable(value) else value
            out[name[4:]] = value.detach().double().cpu() if isinstance(value, Tensor) else t
        else:
            out[name] = t
    return out


def hyperparameter_rows(regulariser: nn.Module, max_values: int = 8) -> list[list[Any]]:
    """Rows (name, shape, values) describing θ: up to ``max_values`` values in full, else the
    range and norm. ``log_`` parameters are shown as their exponentials (e.g. weights)."""
    rows: list[list[Any]] = []
    for name, t in _named(regulariser).items():
        shape = "×".join(str(s) for s in t.shape) or "scalar"
        if t.numel() <= max_values:
            values = ", ".join(f"{float(v):.4g}" for v in t.flatten())
        else:
            values = (
                f"min {float(t.min()):.3g}, max {float(t.max()):.3g}, ‖·‖₂ {float(t.norm()):.3g}"
            )
        rows.append([name, shape, values])
    return rows


def filter_figure(regulariser: nn.Module) -> Any | None:
    """The learned filters (K, C, s, s) as images, each scaled to its own ± max |value| (grey
    is zero), titled with the expert's weight and smoothing when it has them; None when the
    regulariser has no ``filters``."""
    filters = getattr(regulariser, "filters", None)
    if not isinstance(filters, Tensor) or filters.dim() != 4:
        return None
    if hasattr(regulariser, "effective_filters"):
        filters = regulariser.effective_filters()
    filters = filters.detach().double().cpu()
    named = _named(regulariser)
    weights, smoothing = named.get("weights"), named.get("smoothing")
    k = filters.shape[0]
    cols = min(k, 8)
    rows = math.ceil(k / cols)
    fig = new_figure(1.4 * cols, 1.55 * rows + 0.2)
    axes = fig.subplots(rows, cols, squeeze=False)
    for i in range(rows * cols):
        ax = axes[i // cols][i % cols]
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= k:
            ax.axis("off")
            continue
        f = filters[i].mean(0)  # channels averaged for display
        scale = float(f.abs().max()) or 1.0
        ax.imshow(f.numpy(), cmap="gray", vmin=-scale, vmax=scale, interpolation="nearest")
        title = f"k{i + 1}"
        if weights is not None and weights.numel() == k:
            title += f"  w={float(weights[i]):.2g}"
        ax.set_title(title, fontsize=8)
        if smoothing is not None and smoothing.numel() == k:
            ax.set_xlabel(f"ν={float(smoothing[i]):.2g}", fontsize=7)
    fig.tight_layout(pad=0.3)
    return fig


def final_record(result: Any) -> dict[str, Any] | None:
    """The evaluation at the final θ as a metrics record (cost, wall time, step), or None."""
    if not result.evaluation:
        return None
    return {
        "step": result.step,
        "cost": result.cost,
        "wall_time": result.wall_time,
        **result.evaluation,
    }


def tolerance_figure(records: Sequence[Mapping[str, Any]]) -> Any | None:
    """ε_k, δ_k and the bound ω_k (where logged) against cost, on a log scale."""
    fig = new_figure(6.0, 3.9)
    ax = fig.add_subplot()
    drawn = False
    for key, label in (
        ("eps", "lower tolerance ε_k"),
        ("delta", "adjoint tolerance δ_k"),
        ("bound", "error bound ω_k"),
    ):
        pts = [
            (r["cost"], r[key])
            for r in records
            if isinstance(r.get(key), (int, float))
            and isinstance(r.get("cost"), (int, float))
            and math.isfinite(r[key])
            and r[key] > 0
        ]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, label=label, ls="--" if key == "delta" else "-")
            drawn = True
    if not drawn:
        return None
    ax.set_yscale("log")
    ax.set_xlabel("cost (oracle calls)")
    ax.set_ylabel("absolute tolerance / bound")
    ax.set_title("accuracy of each hypergradient")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def write_run_figures(
    run_dir: Path,
    records: Sequence[Mapping[str, Any]],
    final: Mapping[str, Any] | None,
    tv_psnr: float,
    tv_strength: float,
    selected: tuple[int, float, float] | None = None,
) -> dict[str, Path]:
    """Into ``run_dir/plots``: test PSNR against cost and wall time with the final evaluation,
    the tuned-TV line and, as ``selected`` = (step, test PSNR, validation PSNR), the learned θ
    chosen on the validation crops (a diamond at that step's evaluation); the validation PSNR
    that chose it; the tolerance/bound plot. Returns the figures by name."""
    out = run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    refs = {"test_psnr": {f"TV, grid-tuned λ = {tv_strength:g}": tv_psnr}}
    written: dict[str, Path] = {}
    runs = {"": list(records)}
    for y_key, x_key, title in (
        ("test_psnr", "cost", "test PSNR of the regulariser during the run"),
        ("test_psnr", "wall_time", "test PSNR of the regulariser during the run"),
        ("val_psnr", "cost", "validation PSNR (its best gives the learned θ)"),
    ):
        fig = metric_figure(runs, x_key, y_key, final=final, references=refs, title=title)
        if fig is None:
            continue
        at = [r for r in [*records, final or {}] if selected and r.get("step") == selected[0]]
        if at and isinstance(at[0].get(x_key), (int, float)):
            ax = fig.axes[0]
            ax.plot(
                at[0][x_key],
                selected[1] if y_key == "test_psnr" else selected[2],
                marker="D",
                ms=8,
                color="C4",
                ls="none",
                label=f"learned θ (step {selected[0]}, best validation PSNR)",
            )
            ax.legend(fontsize="small")
        path = out / f"{y_key}_vs_{x_key}.png"
        with atomic_output(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
        written[path.stem] = path
    fig = tolerance_figure(records)
    if fig is not None:
        path = out / "tolerances_vs_cost.png"
        with atomic_output(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
        written[path.stem] = path
    return written


def write_report(
    run_dir: Path,
    config: Any,
    summary: Mapping[str, Any],
    records: Sequence[Mapping[str, Any]],
    regulariser: nn.Module,
    grid_png: Path,
    eval_tol: float,
) -> Path:
    """``run_dir/report.html``: summary table, reconstructions, the run's plots (test PSNR,
    upper loss, tolerances and bound), the learned regulariser and the configuration."""
    test = summary["test"]
    report = Report(
        f"bilevel {summary['task']}: {summary['regulariser']} regulariser, {summary['method']}",
        subtitle=(
            f"run directory {summary['run_dir']} · status {summary['status']} · "
            f"{summary['steps']} steps, {summary['epochs']} epochs, "
            f"{summary['oracle_calls']:.0f} oracle calls, {summary['wall_time_s']:.0f} s"
        ),
    )
    report.heading("Test results")
    title = REGULARISER_TITLES[summary["regulariser"]]
    learned = test["learned"]
    names = {
        "degraded": measurement_title(summary["task"]),
        "tv": f"TV (grid-tuned λ = {test['tv']['strength']:g})",
        "learned": f"learned {title}: θ of step {learned['step']}, {learned['selection']} "
        "(model.pt)",
        "final": f"{title}, final θ (step {test['final']['step']}, model_final.pt)",
    }
    report.table(
        ["", "PSNR (dB)", "SSIM"],
        [[label, test[key]["psnr"], test[key]["ssim"]] for key, label in names.items()],
        caption=f"mean over the {config.test_size} test crops of {config.crop} px; the learned "
        "θ is chosen on validation crops of the training images, never on the test crops",
    )
    report.figure(grid_png, "first test crops; PSNR of each image against the clean one")

    report.heading("Training")
    plots = run_dir / "plots"
    for stem, caption in (
        (
            "test_psnr_vs_cost",
            "test PSNR at each evaluation, at the final θ (star) and of the learned θ "
            "(diamond, when it is not the final one)",
        ),
        ("test_psnr_vs_wall_time", "the same against wall time (evaluations excluded)"),
        ("val_psnr_vs_cost", "validation PSNR at each evaluation: its best chooses the learned θ"),
        ("upper_loss_vs_cost", "upper-level loss of each minibatch (faint) and its running mean"),
        ("tolerances_vs_cost", "tolerances ε_k, δ_k of each step and the bound ω_k if computed"),
    ):
        path = plots / f"{stem}.png"
        if path.is_file():
            report.figure(path, caption, width=520)
    last = records[-1] if records else {}
    report.table(
        ["accuracy", "value"],
        [
            ["accuracy schedule (ε_k = δ_k)", getattr(config, "accuracy", None)],
            ["last ε_k (‖∇ₓh_i‖ per image)", last.get("eps")],
            ["last δ_k (adjoint residual)", last.get("delta")],
            ["last bound ω_k", last.get("bound")],
            ["test reconstructions: ‖∇ₓh_i‖ ≤", eval_tol],
        ],
    )

    report.heading(f"Learned regulariser (θ of step {learned['step']})")
    fig = filter_figure(regulariser)
    if fig is not None:
        report.figure(fig, "learned filters (zero shown grey), expert weight w and smoothing ν")
    report.table(["parameter", "shape", "values"], hyperparameter_rows(regulariser))

    report.heading("Configuration")
    report.key_values(dict(sorted(config_dict(config).items())))
    report.paragraph(
        "Files in the run directory: summary.json, metrics.jsonl, reconstructions.png, plots/, "
        "model.pt (the learned θ; apply it with bilevel reconstruct RUN_DIR IMAGE ...), "
        "model_final.pt (the final θ; bilevel reconstruct --final).",
        note=True,
    )
    return report.write(run_dir / "report.html")


class TensorBoardEvaluation:
    """An ``evaluate(theta, step)`` callback that also writes to TensorBoard.

    At each evaluation it forwards the run's new ``metrics.jsonl`` records, logs the inner
    callback's metrics, the reconstructions ``reconstruct_fn()`` of the first test images
    (``eval/reconstructions``) and the regulariser's filters (``theta/filters``).
    """

    def __init__(
        self,
        inner: Callable[[Any, int], dict[str, float]],
        log: TensorBoardLog,
        reconstruct_fn: Callable[[], Tensor],
        regulariser: nn.Module,
    ) -> None:
        self.inner = inner
        self.log = log
        self.reconstruct_fn = reconstruct_fn
        self.regulariser = regulariser

    def __call__(self, theta: Any, step: int) -> dict[str, float]:
        values = self.inner(theta, step)
        self.log.sync()
        self.log.scalars(values, step, prefix="eval")
        self.log.images("eval/reconstructions", self.reconstruct_fn()[:GRID_IMAGES], step)
        filters = getattr(self.regulariser, "filters", None)
        if isinstance(filters, Tensor) and filters.dim() == 4:
            f = filters.detach().mean(1, keepdim=True)
            scale = f.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
            self.log.images("theta/filters", 0.5 + 0.5 * f / scale, step)
        with torch.no_grad():
            for name, t in _named(self.regulariser).items():
                if t.numel() == 1:
                    self.log.writer.add_scalar(f"theta/{name}", float(t), global_step=step)
                elif t.numel() <= 64:
                    self.log.writer.add_histogram(f"theta/{name}", t, global_step=step)
        return values
