"""`bilevel reconstruct`: a finished imaging run applied to new image files."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import SMALL_IMAGING_ARGS

from bilevel.cli import main
from bilevel.imaging import bundled_images, psnr, random_crops, reconstruct, save_image
from bilevel.imaging.apply import learned_problem, load_learned
from bilevel.imaging.config import job_config
from bilevel.imaging.job import build

SMALL = SMALL_IMAGING_ARGS
QUIET = ["--no-progress", "--json"]


@pytest.fixture(scope="module")
def denoise_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "denoise"
    code = main(["denoise", "--budget", "4000", "--run-dir", str(run_dir), *SMALL, *QUIET])
    assert code == 0
    return run_dir


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two clean 40×40 test crops as PNG files."""
    folder = tmp_path_factory.mktemp("images")
    crops = random_crops(bundled_images("test"), 40, 2, generator=5)
    paths = [folder / f"crop{i}.png" for i in range(2)]
    for crop, path in zip(crops, paths):
        save_image(crop, path)
    return paths


@pytest.fixture
def tolerances(monkeypatch) -> list[float]:
    """The absolute tolerance of every solve that `bilevel reconstruct` asks for, in order."""
    from bilevel.imaging import apply

    asked: list[float] = []

    def recording(problem, batch, x0, tol, **options):
        asked.append(tol)
        return reconstruct(problem, batch, x0=x0, tol=tol, **options)

    monkeypatch.setattr(apply, "reconstruct", recording)
    return asked


def _reconstruct(capsys, *args: str) -> tuple[int, dict | None, str]:
    capsys.readouterr()
    code = main(["reconstruct", *args, "--json"])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


def test_the_saved_model_reproduces_the_runs_test_psnr(denoise_run):
    """θ in model.pt and the options in job.json rebuild the run's learned regulariser: the
    learned test PSNR of the summary is reproduced on the run's own test crops."""
    regulariser, options = load_learned(denoise_run)
    assert options.job == "denoise" and options.regulariser == "foe"
    summary = json.loads((denoise_run / "summary.json").read_text())
    setup = build(job_config("denoise", crop=16, train_size=8, test_size=4, filters=8))
    y, x = setup.test.batch()[:2]
    problem = learned_problem(regulariser, options)
    x_hat = reconstruct(problem, (y, x), tol=3e-3)  # the job's evaluation tolerance (float32)
    learned = float(psnr(x_hat.clamp(0, 1), x).mean())
    assert learned == pytest.approx(summary["test"]["learned"]["psnr"], abs=0.02)
    initial = build(job_config("denoise", crop=16, train_size=8, test_size=4, filters=8)).problem
    assert any(
        not torch.equal(a, b)
        for a, b in zip(regulariser.parameters(), initial.theta["regulariser"].parameters())
    )


def test_reconstruct_denoises_image_files(denoise_run, images, tmp_path, capsys):
    out = tmp_path / "out"
    code, result, _ = _reconstruct(
        capsys, str(denoise_run), *map(str, images), "--add-noise", "--out", str(out)
    )
    assert code == 0 and result["task"] == "denoise" and len(result["images"]) == 2
    for record in result["images"]:
        assert (out / record["output"].split("/")[-1]).is_file()
        assert record["reconstructed"]["psnr"] > record["degraded"]["psnr"] + 4.0
        assert record["reconstructed"]["ssim"] > record["degraded"]["ssim"]
    # without --add-noise the file itself is the measurement: a denoised noisy file
    noisy = out / "crop0_degraded.png"
    code, result, _ = _reconstruct(
        capsys, str(denoise_run), str(noisy), "--out", str(out / "again")
    )
    assert code == 0 and "reconstructed" not in result["images"][0]
    assert (out / "again" / "crop0_degraded_reconstructed.png").is_file()


def test_reconstruct_deblurs_and_inpaints(images, tmp_path, capsys, tolerances):
    from bilevel.imaging import apply

    for task, extra in (("deblur", []), ("inpaint", ["--keep", "0.6"])):
        run_dir = tmp_path / task
        args = [task, "--regulariser", "tv", "--budget", "1500", "--run-dir", str(run_dir)]
        assert main([*args, *SMALL, *extra, *QUIET]) == 0
        options = []
        if task == "inpaint":
            code, _, err = _reconstruct(capsys, str(run_dir), str(images[0]))
            assert code == 2 and "--mask" in err
            mask = torch.rand(1, 40, 40, generator=torch.Generator().manual_seed(0)) < 0.6
            save_image(mask.float(), tmp_path / "mask.png")
            options = ["--mask", str(tmp_path / "mask.png")]
        code, result, _ = _reconstruct(
            capsys,
            str(run_dir),
            str(images[0]),
            "--add-noise",
            "--out",
            str(tmp_path / f"o-{task}"),
            *options,
        )
        assert code == 0 and result["task"] == task
        record = result["images"][0]
        assert record["reconstructed"]["psnr"] > record["degraded"]["psnr"] + 2.0
    # the default RMS tolerance with a blur or a mask is the tighter one (40×40 pixels)
    assert tolerances == [pytest.approx(apply.OPERATOR_TOL * 40)] * 2


def test_default_tolerance_of_denoising_and_the_given_one(denoise_run, images, capsys, tolerances):
    from bilevel.imaging import apply

    assert _reconstruct(capsys, str(denoise_run), str(images[0]))[0] == 0
    assert _reconstruct(capsys, str(denoise_run), str(images[0]), "--tol", "1e-3")[0] == 0
    assert tolerances == [pytest.approx(apply.DENOISING_TOL * 40), pytest.approx(1e-3 * 40)]


def test_filled_start_spreads_the_observed_pixels_into_the_missing_ones() -> None:
    from bilevel.imaging.apply import filled_start, smoothed_start

    gen = torch.Generator().manual_seed(12)
    y = torch.rand(1, 2, 20, 16, generator=gen, dtype=torch.float64)
    full = torch.ones(1, 1, 20, 16, dtype=torch.float64)
    assert torch.allclose(filled_start(y, full), smoothed_start(y))  # nothing missing
    mask = (torch.rand(1, 1, 20, 16, generator=gen) < 0.5).double()
    flat = torch.full_like(y, 0.4) * mask  # measurements of a constant image
    assert torch.allclose(filled_start(flat, mask), torch.full_like(y, 0.4))
    filled = filled_start(y * mask, mask)  # a weighted mean of observed values: within their range
    observed = y[mask.expand_as(y) > 0]
    assert bool(torch.isfinite(filled).all())
    assert observed.min() - 1e-12 <= filled.min() and filled.max() <= observed.max() + 1e-12
    hole = torch.ones(1, 1, 20, 16, dtype=torch.float64)
    hole[..., 2:18, 2:14] = 0  # the centre is more than 3σ from every observed pixel
    out = filled_start(y * hole, hole)
    mean = (y * hole).sum(dim=(2, 3)) / hole.sum()
    assert torch.allclose(out[..., 10, 8], mean)


def test_reconstruct_errors(denoise_run, images, tmp_path, capsys):
    code, _, err = _reconstruct(capsys, str(tmp_path), str(images[0]))
    assert code == 2 and "holds no finished imaging run" in err
    code, _, err = _reconstruct(capsys, str(denoise_run), str(tmp_path / "missing.png"))
    assert code == 2 and "does not exist" in err
    code, _, err = _reconstruct(capsys, str(denoise_run), str(images[0]), "--mask", str(images[1]))
    assert code == 2 and "--mask applies to inpainting runs" in err
    code, _, err = _reconstruct(capsys, str(denoise_run), str(images[0]), str(images[0]))
    assert code == 2 and "two images are named 'crop0'" in err
    code, _, err = _reconstruct(capsys, str(denoise_run), str(images[0]), "--tol", "0")
    assert code == 2 and "--tol must be positive" in err
    (tmp_path / "bad.png").write_text("not an image")
    code, _, err = _reconstruct(capsys, str(denoise_run), str(tmp_path / "bad.png"))
    assert code == 2 and "cannot read image" in err


def test_smoothed_start_is_a_normalised_symmetric_gaussian() -> None:
    from bilevel.imaging.apply import smoothed_start

    flat = torch.full((1, 2, 9, 7), 0.3, dtype=torch.float64)
    assert torch.allclose(smoothed_start(flat), flat)
    impulse = torch.zeros(1, 1, 15, 15, dtype=torch.float64)
    impulse[0, 0, 7, 7] = 1.0
    out = smoothed_start(impulse)[0, 0]
    assert float(out.sum()) == pytest.approx(1.0)
    assert torch.allclose(out, out.flip(0)) and torch.allclose(out, out.t())
    expected = math.exp(-0.5) / sum(math.exp(-0.5 * k * k) for k in range(-3, 4)) ** 2
    assert float(out[7, 8]) == pytest.approx(expected)  # one pixel off: e^(-1/2)/Z²
    tiny = torch.rand(1, 1, 2, 3, dtype=torch.float64)  # smaller than the kernel: still works
    assert smoothed_start(tiny).shape == tiny.shape


def test_reconstruct_path_imports_no_training_stack():
    """`bilevel reconstruct --model` starts without the training stack (methods, hypergradients,
    the job, reports): a fresh interpreter importing the command's module loads none of them."""
    import subprocess
    import sys

    heavy = ["bilevel.imaging.job", "bilevel.methods", "bilevel.hypergrad", "matplotlib"]
    code = f"import sys, bilevel.imaging.apply; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
