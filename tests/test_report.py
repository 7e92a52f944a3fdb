"""Run figures, report.html and TensorBoard logging of the imaging jobs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from conftest import SMALL_IMAGING_ARGS

from bilevel.cli import main
from bilevel.runs import Report, image_grid, running_mean
from bilevel.runs.plots import metric_figure
from bilevel.runs.tensorboard import TensorBoardLog, tensorboard_available

pytest.importorskip("matplotlib")

SMALL = [
    *SMALL_IMAGING_ARGS,
    "--no-progress",
    "--json",
    "--eval-every",
    "4",
]


def test_running_mean_is_the_trailing_window_average():
    values = [1.0, 3.0, 5.0, 7.0, 9.0]
    assert running_mean(values, 2) == [1.0, 2.0, 4.0, 6.0, 8.0]
    assert running_mean(values, 10) == [1.0, 2.0, 3.0, 4.0, 5.0]


def test_metric_figure_draws_final_point_reference_line_and_trend():
    records = [
        {"cost": 10.0 * k, "upper_loss": float(k % 3), "test_psnr": 20.0 + k} for k in range(40)
    ]
    for r in records[1::2]:
        del r["test_psnr"]  # evaluated every other step
    final = {"cost": 400.0, "test_psnr": 61.0}
    fig = metric_figure(
        {"": records}, "cost", "test_psnr", final=final, references={"test_psnr": {"TV": 30.0}}
    )
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    curve = lines["test PSNR (dB)"]
    assert list(curve.get_xdata())[-1] == 400.0 and list(curve.get_ydata())[-1] == 61.0
    assert len(curve.get_xdata()) == 21  # 20 evaluations and the final one
    assert list(lines["final θ"].get_ydata()) == [61.0]
    assert list(lines["TV"].get_ydata()) == [30.0, 30.0]

    fig = metric_figure({"": records}, "cost", "upper_loss")
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    raw, trend = lines["raw per step"], lines["running mean of 5 steps"]
    assert raw.get_alpha() < 0.5
    assert list(trend.get_ydata()) == running_mean([float(k % 3) for k in range(40)], 5)


def test_image_grid_has_titles_and_captions():
    a, b = torch.rand(3, 1, 8, 8), torch.rand(3, 3, 8, 8)
    fig = image_grid([("clean", a), ("noisy y", b)], [["x"] * 3, ["p1", "p2", "p3"]], count=2)
    assert len(fig.axes) == 4
    assert [fig.axes[j].get_title() for j in (0, 1)] == ["clean", "noisy y"]
    assert fig.axes[3].get_xlabel() == "p2"


def test_report_escapes_text_and_inlines_images(tmp_path):
    from bilevel.runs import new_figure

    report = Report("a <b> title", subtitle="sub & title")
    report.table(["name", "value"], [["<x>", 1.23456789], ["none", None]], caption="cap")
    fig = new_figure(2, 2)
    fig.add_subplot().plot([0, 1], [1, 0])
    report.figure(fig, "a figure")
    path = report.write(tmp_path / "r.html")
    text = path.read_text()
    assert "a &lt;b&gt; title" in text and "&lt;x&gt;" in text and "1.235" in text
    assert re.findall(r'<img src="([^"]{0,22})', text) == ["data:image/png;base64,"]
    assert "<script" not in text
    with pytest.raises(ValueError, match="PNG"):
        report.figure(b"GIF89a", "not a png")


@pytest.fixture(scope="module")
def deblur_run(tmp_path_factory):
    """One small deblurring run, with TensorBoard when the package is installed."""
    run_dir = tmp_path_factory.mktemp("report") / "run"
    args = ["deblur", "--budget", "2500", "--filters", "4", "--run-dir", str(run_dir), *SMALL]
    if tensorboard_available():
        args.append("--tensorboard")
    assert main(args) == 0
    return run_dir


def test_run_writes_labelled_grid_and_self_contained_report(deblur_run):
    summary = json.loads((deblur_run / "summary.json").read_text())
    result = json.loads((deblur_run / "result.json").read_text())
    text = (deblur_run / "report.html").read_text()
    assert result["evaluation"]["test_psnr"] > 0
    for name in ("degraded", "tv", "learned"):
        assert f"{summary['test'][name]['psnr']:.4g}" in text
    assert "measurement y (blur + noise)" in text and "learned filters" in text
    assert 'src="http' not in text and "<script" not in text
    assert len(re.findall(r'<img src="data:image/png;base64,', text)) >= 5
    for name in ("test_psnr_vs_cost", "test_psnr_vs_wall_time", "tolerances_vs_cost"):
        assert (deblur_run / "plots" / f"{name}.png").is_file(), name
    assert (deblur_run / "reconstructions.png").is_file()


def test_deblur_degraded_column_is_the_measurement(deblur_run):
    """The degraded score is that of y (the measurement), not of Aᵀy."""
    from bilevel.imaging.config import job_config
    from bilevel.imaging.job import build
    from bilevel.imaging.metrics import psnr

    args = job_config("deblur", crop=16, train_size=8, test_size=4)
    setup = build(args)
    y, x = setup.test.batch()[:2]
    summary = json.loads((deblur_run / "summary.json").read_text())
    expected = float(psnr(y.clamp(0, 1), x).mean())
    not_expected = float(psnr(setup.operator.adjoint(y).clamp(0, 1), x).mean())
    assert summary["test"]["degraded"]["psnr"] == pytest.approx(expected, abs=1e-6)
    assert abs(expected - not_expected) > 0.1


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_report_renders_in_headless_chromium_without_console_errors(deblur_run, tmp_path):
    from PIL import Image

    def render(page):
        shot = tmp_path / "shot.png"
        out = subprocess.run(
            [
                "chromium",
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--enable-logging=stderr",
                "--v=0",
                "--window-size=1200,1600",
                f"--screenshot={shot}",
                page.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        console = [line for line in out.stderr.splitlines() if ":CONSOLE" in line]
        return Image.open(shot).convert("L"), console

    image, console = render(deblur_run / "report.html")
    assert console == []
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32))
    assert float((pixels < 128).float().mean()) > 0.01  # text, tables and images drawn
    assert float(pixels.std()) > 20.0 and len(pixels.unique()) > 50
    # the check sees console errors when there are some
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body>x<script>missing()</script></body></html>")
    assert render(bad)[1]


@pytest.mark.skipif(not tensorboard_available(), reason="tensorboard is not installed")
def test_tensorboard_has_metrics_filters_and_reconstructions(deblur_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(deblur_run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()
    steps = [json.loads(line)["step"] for line in (deblur_run / "metrics.jsonl").open()]
    assert [e.step for e in events.Scalars("metrics/upper_loss")] == steps
    for name in ("eps", "delta", "alpha", "cost", "wall_time"):
        assert f"metrics/{name}" in tags["scalars"], name
    final_step = json.loads((deblur_run / "result.json").read_text())["step"]
    evaluated = [e.step for e in events.Images("eval/reconstructions")]
    assert evaluated == [s for s in steps if s % 4 == 0] + [final_step]
    assert "theta/filters" in tags["images"]
    assert [e.step for e in events.Scalars("eval/test_psnr")] == evaluated


def test_tensorboard_missing_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    import bilevel.runs.tensorboard as tb

    monkeypatch.setattr(tb, "tensorboard_available", lambda: False)
    with pytest.raises(ImportError, match=r"bilevel\[tensorboard\]"):
        TensorBoardLog(tmp_path)
    args = ["denoise", "--regulariser", "tv", "--budget", "10", "--run-dir", str(tmp_path / "r")]
    assert main([*args, *SMALL, "--tensorboard"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--tensorboard" in err and len(err.splitlines()) == 1


def test_hpo_writes_a_report_with_the_final_evaluation(tmp_path, capsys):
    run_dir = tmp_path / "hpo"
    args = ["hpo", "--method", "aid-cg", "--steps", "6", "--eval-every", "4", "--json"]
    assert main([*args, "--no-progress", "--run-dir", str(run_dir)]) == 0
    summary = json.loads(capsys.readouterr().out)
    text = (run_dir / "report.html").read_text()
    assert "learnt θ" in text and "best common θ" in text
    assert f"{summary['final']['val_loss']:.4g}" in text
    assert len(re.findall(r'<img src="data:image/png;base64,', text)) >= 3
    from matplotlib.image import imread

    assert imread(run_dir / "plots" / "val_loss_vs_cost.png").shape[2] in (3, 4)


def test_hyperparameter_rows_show_transformed_values_and_filters():
    from bilevel.imaging import ConvexRidge, FieldsOfExperts, SmoothedTV
    from bilevel.imaging.report import filter_figure, hyperparameter_rows

    rows = {r[0]: r for r in hyperparameter_rows(SmoothedTV(strength=0.3, smoothing=0.02))}
    assert rows["strength"][2] == "0.3" and rows["smoothing"][2] == "0.02"
    ridge = {r[0]: r for r in hyperparameter_rows(ConvexRidge(4, 5))}
    assert ridge["coefficients"][2].startswith("min 0.0025")  # softplus(raw), not raw
    foe = FieldsOfExperts(3, 5, init_weight=0.05)
    assert {r[0]: r for r in hyperparameter_rows(foe)}["weights"][2] == "0.05, 0.05, 0.05"
    fig = filter_figure(foe)
    assert [ax.get_title() for ax in fig.axes[:3]] == [f"k{i}  w=0.05" for i in (1, 2, 3)]
    assert filter_figure(SmoothedTV()) is None


@pytest.mark.skipif(not tensorboard_available(), reason="tensorboard is not installed")
def test_tensorboard_sync_forwards_each_step_once_across_sessions(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(
        "".join(json.dumps({"step": k, "upper_loss": k / 2}) + "\n" for k in range(3))
    )
    log = TensorBoardLog(tmp_path)
    assert log.sync() == 3 and log.sync() == 0
    log.close()
    with metrics.open("a") as f:  # a resumed session appends
        f.write(json.dumps({"step": 3, "upper_loss": 9.0}) + "\n")
    log = TensorBoardLog(tmp_path)
    assert log.sync() == 1
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    values = [(e.step, e.value) for e in events.Scalars("metrics/upper_loss")]
    assert values == [(0, 0.0), (1, 0.5), (2, 1.0), (3, 9.0)]
