"""Shipped pretrained regularisers: records, loading, the reference reconstruction, CLI."""

from __future__ import annotations

import json

import pytest
import torch

from bilevel import BilevelError
from bilevel.cli import main
from bilevel.imaging import (
    ConvexRidgeNetwork,
    available_models,
    pretrained,
    psnr,
    reconstruct,
    reconstruction_problem,
    save_image,
)
from bilevel.imaging import pretrained_models as pm

SHIPPED = available_models()


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_reproduces_its_recorded_reconstruction(name):
    info = pm.model_info(name)
    for key in ("class", "kwargs", "sigma", "training", "check", "description"):
        assert key in info, key
    training = info["training"]
    assert {"command", "config", "data", "seed"} <= set(training)
    assert training["command"].startswith(("python benchmarks/", "bilevel denoise"))
    assert isinstance(training["seed"], int) and training["data"]
    # measured test scores on held-out images, with the command and noise seeds that made them
    test = info["test"]
    assert {"set", "images", "psnr", "ssim", "baselines_psnr", "noise_seeds", "command"} <= set(
        test
    )
    assert test["images"] == len(test["noise_seeds"]) >= 1
    assert test["psnr"] > test["baselines_psnr"]["noisy"] + 3
    assert test["command"].startswith("python benchmarks/imaging_quality.py")
    model = pretrained(name)
    check = pm.reference_check(model, float(info["sigma"]))
    assert check["psnr"] == pytest.approx(info["check"]["psnr"], abs=0.01)
    noisy_psnr = -10 * torch.log10(torch.tensor((info["sigma"] / 255.0) ** 2))
    assert check["psnr"] > float(noisy_psnr) + 5  # it denoises


def test_save_and_load_round_trip(tmp_path):
    model = ConvexRidgeNetwork(num_filters=2, layers=1, kernel_size=3, noise_level=0.1)
    with torch.no_grad():
        model.log_slopes.add_(0.3)
    kwargs = {"num_filters": 2, "layers": 1, "kernel_size": 3, "noise_level": 0.1}
    info = {"class": "ConvexRidgeNetwork", "kwargs": kwargs, "sigma": 25.0}
    pm.save_pretrained(model, "tiny", info, folder=tmp_path)
    assert pm.available_models(tmp_path) == ["tiny"]
    loaded = pretrained("tiny", folder=tmp_path)
    assert torch.allclose(loaded.log_slopes, model.log_slopes)
    assert float(loaded.noise_level) == pytest.approx(25 / 255)  # set to the record's σ
    y = torch.rand(1, 1, 12, 12)
    x = reconstruct(reconstruction_problem(loaded), (y, y), tol=1e-3)
    assert x.shape == y.shape and torch.isfinite(x).all()
    with pytest.raises(BilevelError, match="no pretrained model"):
        pretrained("missing", folder=tmp_path)
    (tmp_path / "tiny.json").write_text(json.dumps({**info, "class": "Nope"}))
    with pytest.raises(BilevelError, match="unknown class"):
        pretrained("tiny", folder=tmp_path)
    with pytest.raises(BilevelError, match="model names"):
        pm.save_pretrained(model, "../x", info, folder=tmp_path)


def test_sigma_aware_model_round_trip(tmp_path):
    # a model with noise nodes is rebuilt with them and serves each σ with its own scalings
    kwargs = {"num_filters": 2, "layers": 1, "kernel_size": 3, "noise_nodes": [15.0, 25.0, 50.0]}
    model = ConvexRidgeNetwork(**kwargs)
    with torch.no_grad():
        model.log_strength.copy_(torch.tensor([-4.0, -3.0, -2.0]))
    info = {"class": "ConvexRidgeNetwork", "kwargs": kwargs, "sigma": 25.0}
    pm.save_pretrained(model, "aware", info, folder=tmp_path)
    loaded = pretrained("aware", folder=tmp_path)
    assert loaded.noise_nodes == (15.0, 25.0, 50.0)
    for sigma, log_alpha in ((15, -4.0), (25, -3.0), (50, -2.0)):
        loaded.set_noise_level(sigma / 255)
        assert loaded.log_scalings()[0].item() == pytest.approx(log_alpha)


@pytest.fixture
def tiny_zoo(tmp_path, monkeypatch):
    """A model folder with one small trained-looking model, used as the shipped folder."""
    folder = tmp_path / "models"
    model = ConvexRidgeNetwork(num_filters=4, layers=1, kernel_size=3, strength=0.08)
    kwargs = {"num_filters": 4, "layers": 1, "kernel_size": 3}
    info = {"class": "ConvexRidgeNetwork", "kwargs": kwargs, "sigma": 25.0}
    info["description"] = "test model"
    pm.save_pretrained(model, "tiny-crr", info, folder=folder)
    monkeypatch.setattr(pm, "MODEL_DIR", folder)
    image = torch.linspace(0, 1, 24).view(1, 1, 24).expand(1, 24, 24).clone()
    image[:, 6:18, 6:18] = 0.8
    paths = []
    for k in range(2):
        paths.append(tmp_path / f"img{k}.png")
        save_image(image.flip(-1) if k else image, paths[-1])
    return tmp_path, [str(p) for p in paths]


def test_cli_models_lists_the_shipped_models(tiny_zoo, capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "tiny-crr" in out and "σ = 25/255" in out
    assert main(["models", "--json"]) == 0
    assert "tiny-crr" in json.loads(capsys.readouterr().out)


def test_cli_reconstruct_with_a_model_reports_json(tiny_zoo, capsys):
    folder, images = tiny_zoo
    out_dir = folder / "out"
    argv = ["reconstruct", "--model", "tiny-crr", *images, "--add-noise", "--sigma", "20"]
    assert main([*argv, "--json", "--out", str(out_dir)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["file"] for r in result["images"]] == images
    for r in result["images"]:
        assert r["psnr"] > r["degraded_psnr"] + 3 and 0 < r["ssim"] <= 1
    mean = result["mean"]
    assert mean["psnr"] == pytest.approx(sum(r["psnr"] for r in result["images"]) / 2)
    assert set(mean) == {"psnr", "ssim", "degraded_psnr"}
    assert (out_dir / "img0_reconstructed.png").is_file()
    # without a clean reference there is nothing to score
    assert (
        main(["reconstruct", "--model", "tiny-crr", images[0], "--json", "--out", str(out_dir)])
        == 0
    )
    assert json.loads(capsys.readouterr().out)["mean"]["psnr"] is None


def test_cli_reconstruct_model_errors(tiny_zoo, capsys):
    _, images = tiny_zoo
    assert main(["reconstruct", "--model", "nope", images[0]]) == 2
    assert "no pretrained model 'nope'" in capsys.readouterr().err
    assert main(["reconstruct", "--model", "tiny-crr"]) == 2
    assert "no images" in capsys.readouterr().err
    assert main(["reconstruct", "--model", "tiny-crr", images[0], "--sigma", "-3"]) == 2


@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.parametrize("rows, cols", [((180, 260), (200, 264)), ((0, 80), (380, 444))])
def test_reconstruct_command_reaches_the_converged_psnr(name, rows, cols, tmp_path, capsys):
    # `bilevel reconstruct --model NAME IMAGE --add-noise` with its default tolerance and
    # start ends within 0.01 dB of the PSNR of the converged solution (float64, RMS of
    # ∇ₓh ≤ 1e-9), on a textured crop and on a smooth one (sky: a high PSNR, where the same
    # distance to the solution costs more dB)
    from bilevel.imaging.data import _skimage_array, _to_tensor, load_image

    camera = _to_tensor(_skimage_array("camera", False), torch.float32)
    image = camera[:, rows[0] : rows[1], cols[0] : cols[1]]
    path = tmp_path / "crop.png"
    save_image(image, path)
    capsys.readouterr()
    args = ["reconstruct", "--model", name, str(path), "--add-noise", "--out", str(tmp_path)]
    assert main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["images"][0]
    # the same problem (the command's noise: seed 0, drawn in float32), solved to convergence
    x = load_image(path, color=False, dtype=torch.float32).unsqueeze(0)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    y = (x + pm.model_info(name)["sigma"] / 255.0 * noise).double()
    problem = reconstruction_problem(pretrained(name).double())
    converged = reconstruct(problem, (y, y), tol=1e-9 * x.numel() ** 0.5, max_iter=5000)
    reference = float(psnr(converged.clamp(0, 1), x.double())[0])
    # (at most 0.006 dB, crr8-sigma25-bundled on the sky crop; without the preconditioner
    # crr16-sigma25 ended 0.018 dB off there)
    assert result["psnr"] == pytest.approx(reference, abs=0.01)
    assert result["psnr"] > result["degraded_psnr"] + 5
