"""User mistakes and interrupted runs of the command-line jobs: one line naming the problem
before any work (no traceback unless --debug), unfinished runs refused by `bilevel
reconstruct`, resume hints that work, summaries that agree with the run loop's result."""

from __future__ import annotations

import json
import shlex

import numpy as np
import pytest
from PIL import Image

from bilevel.cli import main
from bilevel.imaging import job as imaging_job

TINY = [
    "--regulariser",
    "tv",
    "--crop",
    "12",
    "--train-size",
    "4",
    "--test-size",
    "2",
    "--batch-size",
    "2",
    "--eval-every",
    "2",
    "--no-progress",
    "--no-plots",
    "--json",
]


def _one_line_error(capsys, argv, *needles):
    """`bilevel ARGV` fails with status 2 and one stderr line holding every needle."""
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_bad_options_fail_before_any_work_and_leave_no_run_directory(tmp_path, capsys):
    """A bad --step, --accuracy or --time failed only after the TV grid search, leaving a run
    directory holding just job.json."""
    run_dir = tmp_path / "run"
    base = ["denoise", *TINY, "--run-dir", str(run_dir)]
    cases = [
        (["--step", "poly:oops"], "poly:oops"),
        (["--accuracy", "geometric"], "geometric"),
        (["--time", "-5"], "--time"),
        (["--time", "nan"], "--time"),
        (["--device", "foo"], "--device 'foo'"),
        (["--sigma", "0"], "--sigma 0"),
        (["--checkpoint-every", "0"], "--checkpoint-every"),
    ]
    for extra, needle in cases:
        _one_line_error(capsys, [*base, *extra], needle)
        assert not run_dir.exists(), extra
    # a run directory that is a file, or that cannot be created
    (tmp_path / "file").write_text("x")
    _one_line_error(capsys, ["denoise", *TINY, "--run-dir", str(tmp_path / "file")], "is a file")
    _one_line_error(
        capsys,
        ["denoise", *TINY, "--budget", "50", "--run-dir", str(tmp_path / "file" / "run")],
        "cannot write to the run directory",
    )
    # --resume of a directory without a run no longer starts a new run silently
    _one_line_error(capsys, [*base, "--resume"], "no run to resume in", str(run_dir))
    assert not run_dir.exists()


def test_data_folders_without_images(tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "test").mkdir()
    argv = ["denoise", *TINY, "--run-dir", str(tmp_path / "run"), "--data"]
    _one_line_error(capsys, [*argv, str(empty)], "holds no image")
    junk = tmp_path / "junk"
    for split in ("train", "test"):
        (junk / split).mkdir(parents=True)
        (junk / split / "notes.txt").write_text("not an image")
    _one_line_error(capsys, [*argv, str(junk)], "holds no image")
    (junk / "train" / "fake.png").write_bytes(b"not a png at all")
    _one_line_error(capsys, [*argv, str(junk)], "cannot read image", "fake.png")
    assert not (tmp_path / "run").exists()


def test_debug_shows_the_traceback(tmp_path, capsys):
    argv = ["denoise", *TINY, "--run-dir", str(tmp_path / "r"), "--device", "foo"]
    assert main(["--debug", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "--device 'foo'" in err.splitlines()[-1]


def test_damaged_files_of_a_run(tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = ["denoise", *TINY, "--budget", "300", "--run-dir", str(run_dir)]
    assert main(argv) == 0
    capsys.readouterr()
    model = (run_dir / "model.pt").read_bytes()
    (run_dir / "model.pt").write_bytes(model[: len(model) // 2])
    image = tmp_path / "im.png"
    Image.fromarray((np.arange(400).reshape(20, 20) % 256).astype(np.uint8)).save(image)
    _one_line_error(capsys, ["reconstruct", str(run_dir), str(image)], "model.pt is damaged")
    (run_dir / "job.json").write_text('{"job": "denoise", "regul')
    _one_line_error(capsys, [*argv, "--resume"], "job.json is damaged")
    _one_line_error(capsys, ["reconstruct", str(run_dir), str(image)], "job.json is damaged")


def _interrupt_at(monkeypatch, step):
    """Make the run loop's evaluation raise KeyboardInterrupt (Ctrl-C) at its first call at
    or after ``step``."""
    call = imaging_job.TestEvaluation.__call__

    def interrupted(self, theta, k):
        if k >= step:
            raise KeyboardInterrupt
        return call(self, theta, k)

    monkeypatch.setattr(imaging_job.TestEvaluation, "__call__", interrupted)


def test_interrupted_run_is_unfinished_refused_and_resumable(tmp_path, capsys, monkeypatch):
    """An interrupted run wrote model.pt and summary.json and `bilevel reconstruct` took it
    as finished; the Ctrl-C hint said to rerun the same command, which failed."""
    run_dir = tmp_path / "run"
    image = tmp_path / "im.png"
    Image.fromarray((np.arange(400).reshape(20, 20) % 256).astype(np.uint8)).save(image)
    argv = ["denoise", *TINY, "--budget", "600", "--run-dir", str(run_dir)]
    with monkeypatch.context() as m:
        _interrupt_at(m, 2)
        assert main(argv) == 130
    out, err = capsys.readouterr()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["finished"] is False and summary["status"] == "interrupted"
    assert not (run_dir / "model.pt").exists()
    assert json.loads((run_dir / "result.json").read_text())["finished"] is False
    hint = err.split("resume with: ")[1].strip()
    assert "--resume" in hint and "--overwrite" not in hint
    _one_line_error(capsys, ["reconstruct", str(run_dir), str(image)], "no finished")
    # the hint's command resumes the run
    assert main(shlex.split(hint)[1:]) == 0
    finished = json.loads(capsys.readouterr().out)
    assert finished["finished"] is True and finished["steps"] > summary["steps"]
    assert main(["reconstruct", str(run_dir), str(image), "--json"]) == 0
    capsys.readouterr()
    # a finished run resumed with a larger budget and interrupted is refused again
    with monkeypatch.context() as m:
        _interrupt_at(m, finished["steps"] + 2)
        assert main([*argv[:-2], "--budget", "1200", "--run-dir", str(run_dir), "--resume"]) == 130
    capsys.readouterr()
    _one_line_error(capsys, ["reconstruct", str(run_dir), str(image)], "was interrupted")


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_summary_agrees_with_the_run_result_and_keeps_the_best_model(tmp_path, capsys):
    """summary.json and result.json disagreed (PSNR 28.364 vs 28.367, time 64.4 vs 53.6 s)
    and after a resume wall_time_s counted only the last session."""
    run_dir = tmp_path / "run"
    argv = ["denoise", *TINY, "--budget", "400", "--run-dir", str(run_dir)]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert main([*argv[:-4], "--budget", "800", "--run-dir", str(run_dir), "--resume"]) == 0
    second = json.loads(capsys.readouterr().out)
    result = json.loads((run_dir / "result.json").read_text())
    assert second["test"]["final"]["psnr"] == result["evaluation"]["test_psnr"]
    assert second["wall_time_s"] == result["wall_time"] >= first["wall_time_s"]
    assert second["best"]["step"] == result["best"]["step"]
    # the best θ is chosen on validation crops of the training images, never on the test crops
    assert result["best"]["metric"] == "val_psnr"
    evaluations = [r for r in _records(run_dir) if "val_psnr" in r]
    evaluations.append({"step": result["step"], **result["evaluation"]})  # the final one
    top = max(evaluations, key=lambda r: r["val_psnr"])
    assert second["best"]["step"] == top["step"] == second["test"]["learned"]["step"]
    assert second["best"]["val_psnr"] == top["val_psnr"]
    assert second["best"]["logged_test_psnr"] == top["test_psnr"]
    assert (run_dir / "model_final.pt").is_file()
    assert main(["reconstruct", str(run_dir), str(tmp_path / "none.png"), "--final"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_the_learned_model_is_the_validation_selected_theta_and_survives_resume(
    tmp_path, capsys, monkeypatch
):
    """The job reported and saved the final θ as its learned model although it had chosen a
    better one on validation crops: the θ of the best validation PSNR is the job's model
    (model.pt), scored on the test crops beside the final θ (model_final.pt), and an
    interrupted and resumed run selects, saves and scores the same θ."""
    import torch

    from bilevel.imaging.apply import learned_problem, load_learned
    from bilevel.imaging.config import job_config
    from bilevel.imaging.metrics import psnr
    from bilevel.imaging.tasks import reconstruct

    # a constant step that overshoots: the validation PSNR peaks before the end
    argv = ["denoise", *TINY, "--budget", "1200", "--step", "const:0.3"]
    ref = tmp_path / "ref"
    assert main([*argv, "--run-dir", str(ref)]) == 0
    summary = json.loads(capsys.readouterr().out)
    learned, final, best = summary["test"]["learned"], summary["test"]["final"], summary["best"]
    result = json.loads((ref / "result.json").read_text())
    evaluations = [r for r in _records(ref) if "val_psnr" in r]
    evaluations.append({"step": result["step"], **result["evaluation"]})
    top = max(evaluations, key=lambda r: r["val_psnr"])
    assert best["step"] == learned["step"] == top["step"] < final["step"] == summary["steps"]
    assert best["val_psnr"] == top["val_psnr"] and "best validation" in learned["selection"]
    # model.pt is the selected θ (its validation PSNR is the best one), model_final.pt the last
    setup = imaging_job.build(
        job_config("denoise", regulariser="tv", crop=12, train_size=4, test_size=2)
    )
    for final_model, crops, expected in (
        (False, setup.val, best["val_psnr"]),
        (False, setup.test, learned["psnr"]),
        (True, setup.test, final["psnr"]),
    ):
        regulariser, options = load_learned(ref, final=final_model)
        y, x = crops.batch()[:2]
        x_hat = reconstruct(learned_problem(regulariser, options), (y, x), tol=3e-3)
        assert float(psnr(x_hat.clamp(0, 1), x).mean()) == pytest.approx(expected, abs=0.03)
    assert abs(learned["psnr"] - final["psnr"]) > 0.1
    # interrupted after the best evaluation, then resumed: the same θ, files and scores
    run_dir = tmp_path / "run"
    with monkeypatch.context() as m:
        _interrupt_at(m, best["step"] + 3)
        assert main([*argv, "--run-dir", str(run_dir)]) == 130
    capsys.readouterr()
    assert main([*argv, "--run-dir", str(run_dir), "--resume"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["best"] == best and again["test"]["learned"] == learned
    assert again["test"]["final"]["step"] == final["step"]
    for name in ("model.pt", "model_final.pt"):
        got = torch.load(run_dir / name, weights_only=True)
        expected = torch.load(ref / name, weights_only=True)
        assert all(torch.equal(got[k], expected[k]) for k in expected), name


def test_without_validation_crops_the_learned_model_is_the_final_theta(tmp_path, capsys):
    import torch

    run_dir = tmp_path / "run"
    argv = ["denoise", *TINY, "--budget", "400", "--val-size", "0", "--run-dir", str(run_dir)]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    learned, final = summary["test"]["learned"], summary["test"]["final"]
    assert summary["best"] is None and "no validation" in learned["selection"]
    assert learned["psnr"] == final["psnr"] and learned["step"] == final["step"]
    got = torch.load(run_dir / "model.pt", weights_only=True)
    last = torch.load(run_dir / "model_final.pt", weights_only=True)
    assert all(torch.equal(got[k], last[k]) for k in last)


def test_denoise_sigma_zero_is_refused_and_deblur_writes_standard_json(tmp_path, capsys):
    """--sigma 0 wrote the non-standard token Infinity into summary.json."""
    _one_line_error(capsys, ["denoise", *TINY, "--sigma", "0"], "nothing to denoise")
    run_dir = tmp_path / "run"
    code = main(["deblur", *TINY, "--sigma", "0", "--budget", "300", "--run-dir", str(run_dir)])
    assert code == 0
    out = capsys.readouterr().out

    def reject(token):
        raise ValueError(token)

    for text in [out, *(p.read_text() for p in run_dir.glob("*.json"))]:
        json.loads(text, parse_constant=reject)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--steps", "0"], "steps"),
        (["--time", "-1"], "wall_time"),
        (["--device", "foo"], "unknown device"),
        (["--batch-size", "0"], "--batch-size"),
        (["--cv", "1"], "--cv"),
        (["--step", "poly:x"], "poly:x"),
    ],
)
def test_hpo_options_are_checked_before_any_work(tmp_path, capsys, extra, needle):
    run_dir = tmp_path / "run"
    argv = ["hpo", "--data", "iris", "--no-progress", "--run-dir", str(run_dir), *extra]
    _one_line_error(capsys, argv, needle)
    assert not run_dir.exists()


def test_hpo_resume_needs_a_run(tmp_path, capsys):
    _one_line_error(
        capsys,
        ["hpo", "--data", "iris", "--run-dir", str(tmp_path / "none"), "--resume"],
        "no run to resume",
    )


def test_a_second_writer_of_a_run_directory_is_refused(tmp_path, capsys):
    """A new run and a --resume on one directory interleaved metrics.jsonl."""
    from test_runs import lock_held_by_another_process

    run_dir = tmp_path / "run"
    with lock_held_by_another_process(run_dir) as holder:
        argv = ["denoise", *TINY, "--budget", "300", "--run-dir", str(run_dir)]
        _one_line_error(capsys, argv, "in use by another run", f"process {holder}")
        argv = ["hpo", "--data", "iris", "--no-progress", "--run-dir", str(run_dir)]
        _one_line_error(capsys, argv, "in use by another run", f"process {holder}")
    assert not (run_dir / "job.json").exists()


def test_hpo_keeps_and_reports_the_best_theta(tmp_path, capsys):
    """SID on breast cancer let the validation loss rise and saved only the worse final θ."""
    run_dir = tmp_path / "run"
    argv = ["hpo", "--data", "iris", "--steps", "12", "--eval-every", "2", "--step", "0.5"]
    assert main([*argv, "--no-progress", "--no-plots", "--json", "--run-dir", str(run_dir)]) == 0
    summary = json.loads(capsys.readouterr().out)
    result = json.loads((run_dir / "result.json").read_text())
    losses = {
        r["step"]: r["val_loss"]
        for r in map(json.loads, open(run_dir / "metrics.jsonl"))
        if "val_loss" in r
    }
    losses[summary["steps"]] = summary["final"]["val_loss"]
    best_step = min(losses, key=losses.get)
    assert summary["best"]["step"] == result["best"]["step"] == best_step
    assert summary["best"]["val_loss"] == losses[best_step] <= summary["final"]["val_loss"]
    assert (run_dir / "hyperparameters_best.csv").is_file()
    assert summary["wall_time"] == result["wall_time"]


def test_resume_before_the_first_checkpoint_starts_from_the_calibrated_theta(tmp_path, capsys):
    """kill -9 before the first checkpoint, then --resume, restarted from an uncalibrated θ₀
    (step-0 PSNR 25.29 instead of 27.44) and ended at another θ."""
    import torch

    fo = ["--regulariser", "foe", "--filters", "2", "--filter-size", "3", "--budget", "400"]
    argv = ["denoise", *TINY[2:], *fo]
    assert main([*argv, "--run-dir", str(tmp_path / "ref")]) == 0
    run_dir = tmp_path / "run"
    assert main([*argv, "--run-dir", str(run_dir), "--checkpoint-every", "1000"]) == 0
    capsys.readouterr()
    # the state of a run killed before its first checkpoint: job.json and config.json only
    for name in ("checkpoint.pt", "checkpoint.prev.pt", "metrics.jsonl", "result.json"):
        (run_dir / name).unlink(missing_ok=True)
    for name in ("model.pt", "model_final.pt", "summary.json", "reconstructions.png"):
        (run_dir / name).unlink(missing_ok=True)
    assert main([*argv, "--run-dir", str(run_dir), "--checkpoint-every", "1000", "--resume"]) == 0
    expected = torch.load(tmp_path / "ref" / "model.pt", weights_only=True)
    got = torch.load(run_dir / "model.pt", weights_only=True)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    first = [json.loads(line) for line in open(run_dir / "metrics.jsonl")][0]
    reference = [json.loads(line) for line in open(tmp_path / "ref" / "metrics.jsonl")][0]
    assert first["test_psnr"] == reference["test_psnr"]


def test_reconstruct_api_refuses_a_misshapen_x0():
    import torch

    from bilevel import BilevelError
    from bilevel.imaging import SmoothedTV, reconstruct, reconstruction_problem

    y = torch.rand(2, 1, 12, 12)
    problem = reconstruction_problem(SmoothedTV(strength=0.05))
    for x0 in (y[0], y[:, :, :8, :8], y[:1]):
        with pytest.raises(BilevelError, match="x0 must have the images' shape"):
            reconstruct(problem, (y, y), x0=x0)
