"""The imaging jobs end to end: `bilevel denoise/deblur/inpaint --json`."""

from __future__ import annotations

import json

import pytest
from conftest import SMALL_IMAGING_ARGS

from bilevel.cli import main
from bilevel.runs import read_metrics

SMALL = [
    *SMALL_IMAGING_ARGS,
    "--no-progress",
    "--json",
    "--eval-every",
    "5",
]


def test_denoise_learns_tv_that_beats_its_initial_value(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(
        ["denoise", "--regulariser", "tv", "--budget", "6000", "--run-dir", str(run_dir), *SMALL]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["test"]) == {"degraded", "tv", "learned", "final"}
    assert summary["oracle_calls"] >= 6000 and summary["steps"] > 0
    psnrs = [r["test_psnr"] for r in read_metrics(run_dir / "metrics.jsonl") if "test_psnr" in r]
    assert summary["test"]["learned"]["psnr"] > psnrs[0] + 1.0
    assert summary["test"]["learned"]["psnr"] > summary["test"]["degraded"]["psnr"] + 3.0
    for name in ("config.json", "checkpoint.pt", "reconstructions.png", "summary.json"):
        assert (run_dir / name).exists(), name
    assert any((run_dir / "plots").glob("test_psnr_vs_cost.png"))


@pytest.mark.parametrize("method", ["maid", "isgd"])
def test_every_evaluation_records_the_bound_or_why_there_is_none(method, tmp_path, capsys):
    run_dir = tmp_path / "run"
    options = ["--regulariser", "tv", "--method", method, "--budget", "3000", *SMALL]
    assert main(["denoise", *options, "--eval-every", "1", "--run-dir", str(run_dir)]) == 0
    records = read_metrics(run_dir / "metrics.jsonl")
    evaluated = [r for r in records if "test_psnr" in r]
    assert len(evaluated) == len(records) > 0
    for r in evaluated:
        if method == "maid":
            assert r["bound"] > 0 and "certified" in r
        else:
            assert r["bound"] is None and "ω" in r["bound_note"]


def test_resume_continues_a_run(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    assert (
        main(["denoise", "--regulariser", "tv", "--budget", "1500", "--run-dir", run_dir, *SMALL])
        == 0
    )
    first = json.loads(capsys.readouterr().out)
    assert (
        main(
            [
                "denoise",
                "--regulariser",
                "tv",
                "--budget",
                "3000",
                "--run-dir",
                run_dir,
                "--resume",
                *SMALL,
            ]
        )
        == 0
    )
    second = json.loads(capsys.readouterr().out)
    assert second["steps"] > first["steps"]
    steps = [r["step"] for r in read_metrics(f"{run_dir}/metrics.jsonl")]
    assert steps == sorted(set(steps))  # no duplicated records after resuming
    # other model or training options cannot continue this run; a new run may not reuse it
    stored = (tmp_path / "run" / "job.json").read_text()
    resume = ["denoise", "--budget", "4000", "--run-dir", run_dir, "--resume", *SMALL]
    assert main([*resume, "--regulariser", "foe"]) == 2
    assert "cannot resume" in capsys.readouterr().err
    assert main([*resume, "--regulariser", "tv", "--sigma", "15"]) == 2
    assert "sigma: 25.0 -> 15.0" in capsys.readouterr().err
    fresh = ["denoise", "--regulariser", "tv", "--budget", "1500", "--run-dir", run_dir, *SMALL]
    assert main([*fresh, "--filters", "4"]) == 2
    capsys.readouterr()
    assert (tmp_path / "run" / "job.json").read_text() == stored


@pytest.mark.parametrize("job", ["deblur", "inpaint"])
def test_deblur_and_inpaint_run(job, tmp_path, capsys):
    code = main(
        [
            job,
            "--regulariser",
            "foe",
            "--filters",
            "2",
            "--filter-size",
            "3",
            "--budget",
            "1500",
            "--run-dir",
            str(tmp_path / job),
            *SMALL,
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["task"] == job
    assert summary["test"]["learned"]["psnr"] > 0


def test_bad_options_give_clear_errors(tmp_path, capsys):
    run_dir = ["--run-dir", str(tmp_path / "r")]
    assert main(["denoise", *run_dir, *SMALL, "--crop", "0"]) == 2
    assert "--crop must be positive" in capsys.readouterr().err
    assert main(["denoise", "--data", str(tmp_path), "--run-dir", str(tmp_path / "r"), *SMALL]) == 2
    assert "train/" in capsys.readouterr().err
    assert main(["inpaint", *run_dir, *SMALL, "--keep", "1.5"]) == 2
    assert "--keep" in capsys.readouterr().err
    # checked before any work: crops too small for SSIM or for the filters, a bad blur
    assert main(["denoise", *run_dir, *SMALL, "--regulariser", "tv", "--crop", "10"]) == 2
    out, err = capsys.readouterr()
    assert "--crop must be at least 11 pixels" in err and "grid-tuned" not in out + err
    assert main(["denoise", *run_dir, *SMALL, "--crop", "12", "--filter-size", "13"]) == 2
    assert "smaller than --filter-size 13" in capsys.readouterr().err
    assert main(["deblur", *run_dir, *SMALL, "--blur", "-2"]) == 2
    assert "--blur must be a finite positive" in capsys.readouterr().err


def test_foe_weights_start_from_the_tuned_tv_strength():
    import math

    import torch

    from bilevel.imaging import FieldsOfExperts
    from bilevel.imaging.job import calibrate_foe_weights

    reg = FieldsOfExperts(num_filters=8, filter_size=3, init="directional")
    calibrate_foe_weights(reg, 0.1)  # λπ/(2K): smoothed isotropic TV of strength λ
    expected = torch.full((8,), math.log(0.1 * math.pi / 16))
    torch.testing.assert_close(reg.log_weights.detach(), expected)
    assert reg.log_weights.requires_grad


def test_job_config_builds_runs_like_the_command_line():
    import pytest

    from bilevel import BilevelError
    from bilevel.imaging import FieldsOfExperts, SmoothedTV
    from bilevel.imaging.config import job_config
    from bilevel.imaging.job import build, make_method
    from bilevel.methods import MAID

    args = job_config("deblur", train_size=4, test_size=2, crop=16, method="maid")
    assert (args.job, args.blur, args.sigma, args.regulariser) == ("deblur", 1.5, 5.0, "foe")
    setup = build(args)
    assert len(setup.train) == 4 and len(setup.test) == 2 and setup.gamma == args.gamma
    assert isinstance(setup.problem.theta["regulariser"], FieldsOfExperts)
    assert isinstance(make_method(args), MAID)
    tv = build(job_config("denoise", regulariser="tv", train_size=2, test_size=2, crop=16))
    assert isinstance(tv.problem.theta["regulariser"], SmoothedTV)
    with pytest.raises(BilevelError, match="unknown key 'filterz'"):
        job_config("denoise", filterz=3)
    with pytest.raises(BilevelError, match="unknown imaging task"):
        job_config("segment")


def test_the_deblurring_tv_baseline_is_tuned_inside_its_grid():
    """Deblurring at noise 5/255: TV's optimum on the training crops lies below the job's grid,
    which is extended until the best λ has a searched strength on each side."""
    from bilevel.imaging.config import job_config
    from bilevel.imaging.job import TV_GRID, build, tune_tv

    tv = tune_tv(build(job_config("deblur", crop=16, train_size=4, test_size=1, val_size=0)))
    assert tv.interior and tv.psnr == max(tv.psnrs)
    assert tv.strength < min(TV_GRID)  # found by extending the grid


def test_init_model_train_only_and_loss_give_clear_errors(tmp_path, capsys):
    run_dir = ["--run-dir", str(tmp_path / "r")]
    assert main(["deblur", *run_dir, *SMALL, "--regulariser", "crr", "--init-model", "nope"]) == 2
    err = capsys.readouterr().err
    assert "no pretrained model 'nope'" in err and "crr16-sigma25" in err
    assert main(["deblur", *run_dir, *SMALL, "--init-model", "crr16-sigma25"]) == 2
    assert "is a ConvexRidgeNetwork; it needs --regulariser crr, not foe" in (
        capsys.readouterr().err
    )
    assert main(["deblur", *run_dir, *SMALL, "--regulariser", "crr", "--train-only", "gamma"]) == 2
    err = capsys.readouterr().err
    assert "--train-only 'gamma' matches no parameter" in err and "log_strength" in err
    assert (
        main(
            ["deblur", *run_dir, *SMALL, "--regulariser", "crr", "--init-model", "crr16-sigma25"]
            + ["--color"]
        )
        == 2
    )
    assert "has 1 channel(s), the images 3" in capsys.readouterr().err
    assert main(["deblur", *run_dir, *SMALL, "--loss", "l1"]) == 2
    assert "invalid choice: 'l1'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # refused before any work


def test_init_model_starts_at_the_shipped_weights_and_learns_only_the_scalings(tmp_path, capsys):
    """--init-model: θ₀ is the shipped model at the job's σ (no TV calibration), --train-only
    freezes everything but α and β, --loss psnr trains; model.pt loads into the shipped class."""
    import torch

    from bilevel.imaging import pretrained
    from bilevel.imaging.config import job_config
    from bilevel.imaging.job import build

    options = {"regulariser": "crr", "init_model": "crr16-sigma25", "crop": 16}
    setup = build(job_config("deblur", train_size=2, test_size=1, val_size=0, **options))
    reg = setup.problem.theta["regulariser"]
    shipped = pretrained("crr16-sigma25")
    shipped.set_noise_level(5 / 255)
    for (name, value), ref in zip(reg.state_dict().items(), shipped.state_dict().values()):
        torch.testing.assert_close(value, ref, msg=name)
    run_dir = tmp_path / "run"
    args = ["--regulariser", "crr", "--init-model", "crr16-sigma25", "--loss", "psnr"]
    args += ["--train-only", "log_strength,log_sharpness", "--budget", "600"]
    assert main(["deblur", *args, *SMALL, "--run-dir", str(run_dir)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] > 0
    saved = torch.load(run_dir / "model_final.pt", weights_only=True)
    learned = {k.removeprefix("regulariser."): v for k, v in saved.items()}
    start = shipped.state_dict()
    moved = {k for k, v in learned.items() if k in start and not torch.equal(v, start[k])}
    assert moved == {"log_strength", "log_sharpness"}


def test_validation_crops_come_from_training_images_without_training_crops():
    import torch

    from bilevel.imaging.data import crop_sources, random_crops
    from bilevel.imaging.job import validation_images

    images = [torch.full((1, 8, 8), float(i)) for i in range(20)]
    train = random_crops(images, 4, 6, generator=3)
    used = {int(c[0, 0, 0]) for c in train}
    assert used == set(crop_sources(20, 6, 3).tolist())
    held = validation_images(images, 6, 3)
    assert {int(im[0, 0, 0]) for im in held} == set(range(20)) - used
    assert validation_images(images[:1], 6, 3) == images[:1]  # every image used: all of them


def test_init_model_strength_is_tuned_on_the_training_crops():
    """tune_init_strength multiplies α by the grid factor with the best training PSNR, and
    that factor is bracketed by searched ones (the grid is extended past an edge)."""
    import math

    from bilevel.imaging import psnr
    from bilevel.imaging.config import job_config
    from bilevel.imaging.job import build, tune_init_strength
    from bilevel.imaging.tasks import grid_search, reconstruct

    options = {"regulariser": "crr", "init_model": "crr16-sigma25", "crop": 16, "val_size": 0}
    setup = build(job_config("deblur", train_size=3, test_size=1, **options))
    reg = setup.problem.theta["regulariser"]
    alpha = reg.scalings()[0].item()
    found = tune_init_strength(setup)
    assert found.interior and found.psnr == max(found.psnrs)
    assert math.isclose(reg.scalings()[0].item(), alpha * found.strength, rel_tol=1e-5)
    batch = setup.train.batch()
    x = reconstruct(setup.problem, batch, tol=1e-3, max_iter=1000)
    assert abs(float(psnr(x, batch[1]).mean()) - found.psnr) < 1e-3
    # the search itself: a score peaked at 5 beyond the grid [1, 2] is found by extension
    peak = grid_search(lambda v: -((math.log(v) - math.log(5.0)) ** 2), [1.0, 2.0], 6, "v")
    assert peak.strength == 4.0 and peak.interior


def test_the_adjoint_iteration_cap_decides_whether_a_deblurring_hypergradient_is_certified():
    """At γ = 10⁻³ the blurred crops' adjoint systems H q = ∇ₓf need more conjugate-gradient
    iterations than a small --adjoint-max-iter allows: the capped solve misses its tolerance
    (warned, hypergradient not certified), the job's solve with a large cap meets it."""
    import warnings

    import pytest

    from bilevel import BilevelError
    from bilevel.imaging.config import job_config
    from bilevel.imaging.job import build, make_method
    from bilevel.lower import ConvergenceWarning

    def adjoint(cap: int):
        args = job_config(
            "deblur", train_size=2, test_size=2, crop=16, filters=4, filter_size=3,
            gamma=1e-3, dtype="float64", adjoint_max_iter=cap,
        )  # fmt: skip
        setup = build(args)
        estimator = make_method(args).estimator
        assert estimator.linear_solver.max_iter == cap
        batch = setup.train.batch()
        return estimator(setup.problem, batch, batch[0].clone(), lower_tol=1e-8, adjoint_tol=1e-8)

    with pytest.warns(ConvergenceWarning, match="adjoint solver CG missed adjoint_tol"):
        capped = adjoint(5)
    assert not bool(capped.linear.converged.all()) and int(capped.linear.iterations.max()) == 5
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        solved = adjoint(3000)
    assert bool(solved.linear.converged.all())
    assert 5 < int(solved.linear.iterations.max()) < 3000
    with pytest.raises(BilevelError, match="--adjoint-max-iter must be positive"):
        build(job_config("deblur", train_size=2, test_size=2, crop=16, adjoint_max_iter=0))
