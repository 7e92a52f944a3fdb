"""Helpers of the training and quality benchmarks: per-group Adam steps, the score cache."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_group_scaled_adam_steps_each_group_by_its_factor():
    tr = _load("train_regulariser")
    model = torch.nn.Module()
    model.layers = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(3))])
    model.log_slopes = torch.nn.Parameter(torch.zeros(2))
    params = [model.layers[0], model.log_slopes]
    opt = tr.adam_factory(model, "layers=0.05")(params)
    for group in opt.param_groups:
        group["lr"] = 0.1  # what ISGD sets at every step
    grads = (torch.tensor([1.0, -2.0, 3.0]), torch.tensor([-1.0, 0.5]))
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    # Adam's first step is lr·g/(|g| + eps): lr·sign(g) up to eps
    torch.testing.assert_close(params[0].detach(), -0.1 * 0.05 * grads[0].sign())
    torch.testing.assert_close(params[1].detach(), -0.1 * grads[1].sign())
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.1]  # the method's rate is kept
    assert tr.group_factors("layers=0.05, log_slopes=2") == [("layers", 0.05), ("log_slopes", 2.0)]
    with pytest.raises(SystemExit, match="PREFIX=FACTOR"):
        tr.group_factors("layers")


def test_score_cache_round_trip_and_last_entry_wins(tmp_path):
    iq = _load("imaging_quality")
    path = tmp_path / "scores.jsonl"
    cache = iq.Cache(str(path))
    assert cache.get("σ=25 image=a.jpg TV") is None
    cache.put("σ=25 image=a.jpg TV", [27.5, 0.8])
    cache.put("tune-tv σ=25", 0.1)
    other = iq.Cache(str(path))  # e.g. a second process
    other.put("σ=25 image=a.jpg TV", [27.6, 0.81])
    again = iq.Cache(str(path))
    assert again.get("σ=25 image=a.jpg TV") == [27.6, 0.81]
    other.put("σ=50 image=b.jpg BM3D", [22.0, 0.5])  # appended after `cache` read the file
    assert cache.get("σ=50 image=b.jpg BM3D") == [22.0, 0.5]
    with path.open("a", encoding="utf-8") as f:  # a line being written is not read yet
        f.write('{"key": "partial", "va')
    assert cache.get("partial") is None
    with path.open("a", encoding="utf-8") as f:
        f.write('lue": 3}\n')
    assert cache.get("partial") == 3
    assert again.get("tune-tv σ=25") == 0.1
    memory = iq.Cache(None)  # no file: a dictionary only
    memory.put("k", 1)
    assert memory.get("k") == 1 and not list(tmp_path.glob("*.tmp"))


def test_exported_metadata_names_no_local_paths(tmp_path):
    tr = _load("train_regulariser")
    run_dir = tmp_path / "runs" / "crr"
    info = {
        "command": f"python benchmarks/train_regulariser.py --run-dir {run_dir}",
        "config": {"data": str(tr.DEFAULT_DATA), "run_dir": str(run_dir), "seed": 0},
    }
    clean = tr.portable(info, run_dir)
    assert clean["command"].endswith("--run-dir RUN_DIR")
    assert clean["config"] == {"data": "../shared/data/bsds300", "run_dir": "RUN_DIR", "seed": 0}
    assert str(tmp_path) not in str(clean)


def test_init_model_starts_at_a_shipped_model_and_the_chain_of_commands_is_kept(tmp_path):
    import json

    from bilevel.imaging import pretrained

    tr = _load("train_regulariser")
    args = tr.parse(["--filters", "16", "--filter-size", "13", "--run-dir", str(tmp_path)])
    model, kwargs = tr.build_model(args)
    record = tr.init_from_model(model, kwargs, "crr16-sigma25", tmp_path, resume=False)
    shipped = pretrained("crr16-sigma25").state_dict()
    assert all(torch.equal(v, shipped[k]) for k, v in model.state_dict().items())
    # a resumed run reads the record it started from, whatever is shipped now
    stored = json.loads((tmp_path / "init_model.json").read_text())
    assert stored == record and record["name"] == "crr16-sigma25"
    (tmp_path / "init_model.json").write_text(json.dumps({**record, "name": "earlier"}))
    earlier = {k: v + 1 for k, v in shipped.items()}
    torch.save(earlier, tmp_path / "init_model.pt")
    again = tr.init_from_model(model, kwargs, "crr16-sigma25", tmp_path, resume=True)
    assert again["name"] == "earlier"
    assert all(torch.equal(v, earlier[k]) for k, v in model.state_dict().items())
    # another architecture is refused, naming both
    other, other_kwargs = tr.build_model(tr.parse(["--filters", "8", "--run-dir", "x"]))
    with pytest.raises(SystemExit, match="--init-model crr16-sigma25"):
        tr.init_from_model(other, other_kwargs, "crr16-sigma25", tmp_path / "other", False)
    # the chain: the start model's command and resumes (or its own chain), then this run's
    # (each run in its own directory: the earlier ones numbered in order)
    first = {
        "training": {
            "command": "python t.py A --run-dir RUN_DIR",
            "resumed_with": ["A --run-dir RUN_DIR --resume --export M"],
        }
    }
    chain = tr.command_chain(first, ["python t.py B --run-dir RUN_DIR"])
    assert chain == [
        "python t.py A --run-dir RUN_DIR_1",
        "python benchmarks/train_regulariser.py A --run-dir RUN_DIR_1 --resume --export M",
        "python t.py B --run-dir RUN_DIR",
    ]
    assert tr.command_chain({"training": {"chain": chain}}, ["C --run-dir RUN_DIR"]) == [
        *chain[:2],
        "python t.py B --run-dir RUN_DIR_2",
        "C --run-dir RUN_DIR",
    ]
    assert tr.command_chain(None, ["c"]) == ["c"]


def test_init_model_converts_to_noise_nodes_and_train_only_freezes_the_rest(tmp_path):
    from bilevel.imaging import pretrained

    tr = _load("train_regulariser")
    argv = ["--sigma", "15", "--noise-nodes", "15,25,50", "--run-dir", str(tmp_path)]
    args = tr.parse([*argv, "--filters", "16", "--filter-size", "13"])
    model, kwargs = tr.build_model(args)
    assert kwargs["noise_nodes"] == [15.0, 25.0, 50.0]
    tr.init_from_model(model, kwargs, "crr16-sigma25", tmp_path, resume=False)
    assert float(model.noise_level) == pytest.approx(15 / 255)
    shipped = pretrained("crr16-sigma25")
    x = torch.rand(1, 1, 20, 20, generator=torch.Generator().manual_seed(0))
    for sigma in (15, 25, 50):  # the converted model equals the shipped one at the nodes
        model.set_noise_level(sigma / 255)
        shipped.set_noise_level(sigma / 255)
        torch.testing.assert_close(model(x), shipped(x), rtol=1e-6, atol=0)
    names = tr.train_only(model, "log_strength,log_sharpness")
    assert names == ["log_strength", "log_sharpness"]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == names
    with pytest.raises(SystemExit, match="matches no parameter"):
        tr.train_only(model, "nothing")


def test_record_keeps_a_sigma_aware_models_scores_at_every_sigma(tmp_path, monkeypatch, capsys):
    import json

    from bilevel.imaging import ConvexRidgeNetwork
    from bilevel.imaging import pretrained_models as pm

    iq = _load("imaging_quality")
    monkeypatch.setattr(pm, "MODEL_DIR", tmp_path)
    monkeypatch.setattr(iq, "MODEL_DIR", tmp_path)
    kwargs = {"num_filters": 2, "layers": 1, "kernel_size": 3}
    for name, extra in (("plain", {}), ("aware", {"noise_nodes": [15.0, 25.0, 50.0]})):
        model = ConvexRidgeNetwork(**kwargs, **extra)
        info = {"class": "ConvexRidgeNetwork", "kwargs": {**kwargs, **extra}, "sigma": 25.0}
        pm.save_pretrained(model, name, info, folder=tmp_path)

    def methods(psnr: float) -> dict:
        scores = {"mean_psnr": psnr, "mean_ssim": 0.5}
        return {"noisy": {**scores, "mean_psnr": 20.0}, "aware": scores, "plain": scores}

    config = {"images": 1, "sigmas": "15,50", "models": "aware", "seed": 0}
    result = {"config": config, "images": ["a.jpg"], "results": {}}
    for sigma, psnr in (("15", 30.0), ("50", 24.0)):
        result["results"][sigma] = {"methods": methods(psnr), "noise_seeds": [1]}
    iq.record(result, "aware")
    info = json.loads((tmp_path / "aware.json").read_text())
    assert "test" not in info  # not evaluated at its own σ = 25
    assert {s: v["psnr"] for s, v in info["test_by_sigma"].items()} == {"15": 30.0, "50": 24.0}
    assert info["test_by_sigma"]["50"]["baselines_psnr"] == {"noisy": 20.0, "plain": 24.0}
    with pytest.raises(SystemExit, match="no result of plain"):
        iq.record(result, "plain")  # a model of one σ needs its own
    pm.print_models()
    out = capsys.readouterr().out
    assert "σ-aware" in out and "15: 30.00 dB, 50: 24.00 dB" in out


def test_model_key_is_shared_by_models_with_the_same_energy_at_sigma():
    from bilevel.imaging import ConvexRidgeNetwork, WeaklyConvexRidge

    iq = _load("imaging_quality")
    kwargs = {"num_filters": 2, "layers": 1, "kernel_size": 3}
    plain = ConvexRidgeNetwork(**kwargs)
    aware = ConvexRidgeNetwork(**kwargs).with_noise_nodes([15.0, 25.0, 50.0])
    with torch.no_grad():
        aware.log_sharpness[2] += 0.5  # learned at σ = 50 only
    assert iq.model_key("a", plain) == iq.model_key("b", aware)  # both at σ = 25
    assert iq.model_key("a", plain.set_noise_level(50 / 255)) != iq.model_key(
        "b", aware.set_noise_level(50 / 255)
    )
    weak = WeaklyConvexRidge(**kwargs)
    assert iq.model_key("a", plain.set_noise_level(25 / 255)) != iq.model_key("a", weak)


def test_model_list_reads_the_sigma_of_each_model():
    iq = _load("imaging_quality")
    assert iq.model_list("a, b@15+50,") == [("a", None), ("b", [15.0, 50.0])]
    with pytest.raises(SystemExit, match="NAME@S"):
        iq.model_list("b@x")


def test_reuse_takes_an_earlier_runs_scores_and_computes_nothing_again(tmp_path, monkeypatch):
    import json

    from PIL import Image

    iq = _load("imaging_quality")
    gen = torch.Generator().manual_seed(0)
    for split, count in (("train", 2), ("test", 2)):
        (tmp_path / split).mkdir()
        for i in range(count):
            pixels = (torch.rand(20, 24, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / split / f"{i}.png")
    options = ["--data", str(tmp_path), "--images", "2", "--sigmas", "25", "--no-bm3d"]
    options += ["--tune-crops", "2", "--tune-crop-size", "12", "--max-iter", "50"]
    first = iq.evaluate(iq.parse(options))
    assert first["results"]["25"]["keys"]["noisy"] == "noisy"
    path = tmp_path / "first.json"
    path.write_text(json.dumps(first))

    def nothing_computed(*args, **kwargs):
        raise AssertionError("a score or strength that the earlier run holds was recomputed")

    monkeypatch.setattr(iq, "scores", nothing_computed)
    monkeypatch.setattr(iq, "grid_search_tv", nothing_computed)
    again = iq.evaluate(iq.parse([*options, "--reuse", str(path)]))
    assert again["results"]["25"]["methods"] == first["results"]["25"]["methods"]
    # a file written before the keys were recorded: noisy and TV are rebuilt from its config
    del first["results"]["25"]["keys"]
    path.write_text(json.dumps(first))
    legacy = iq.evaluate(iq.parse([*options, "--reuse", str(path)]))
    assert legacy["results"]["25"]["methods"] == first["results"]["25"]["methods"]
    # another solver tolerance is another key: TV is computed, not taken
    with pytest.raises(AssertionError, match="recomputed"):
        iq.evaluate(iq.parse([*options, "--tol", "1e-3", "--reuse", str(path)]))


def test_reconstruct_benchmark_times_an_inpainting_run_against_its_converged_psnr(tmp_path, capsys):
    from conftest import SMALL_IMAGING_ARGS

    from bilevel.cli import main
    from bilevel.imaging import bundled_images, random_crops, save_image

    it = _load("imaging_throughput")
    run_dir = tmp_path / "inpaint"
    args = ["inpaint", "--regulariser", "tv", "--budget", "600", "--run-dir", str(run_dir)]
    assert main([*args, *SMALL_IMAGING_ARGS, "--no-progress", "--json"]) == 0
    image = tmp_path / "crop.png"
    save_image(random_crops(bundled_images("test", color=False), 40, 1, generator=3)[0], image)
    capsys.readouterr()
    cache = tmp_path / "cache"
    assert it.main(["--reconstruct", str(image), "--run", str(run_dir), "--cache", str(cache)]) == 0
    row = capsys.readouterr().out.strip().splitlines()[-2]  # the image's row, then the load
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "crop.png (40×40)" and int(cells[3]) > 0
    assert abs(float(cells[7])) < 0.05  # dB from the converged PSNR at the default tolerance
    assert (cache / "crop_mask0.7.png").is_file() and list(cache.glob("*_converged.pt"))


def test_lower_solver_option_keeps_nesterov_by_default_and_offers_preconditioned_lbfgs():
    from bilevel import LBFGS, Nesterov
    from bilevel.imaging.preconditioner import RidgePreconditioning

    tr = _load("train_regulariser")
    default = tr.parse(["--run-dir", "x"])
    assert isinstance(tr.LOWER_SOLVERS[default.lower_solver], Nesterov)  # the shipped runs'
    chosen = tr.LOWER_SOLVERS[
        tr.parse(["--run-dir", "x", "--lower-solver", "lbfgs-fourier"]).lower_solver
    ]
    assert isinstance(chosen, LBFGS) and isinstance(chosen.preconditioner, RidgePreconditioning)
    with pytest.raises(SystemExit):
        tr.parse(["--run-dir", "x", "--lower-solver", "newton"])
