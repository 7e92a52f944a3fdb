"""Pretrained regularisers shipped inside the package.

Each model is a pair of files in the package data folder ``bilevel/imaging/models``:
``NAME.pt`` (the regulariser's ``state_dict``) and ``NAME.json``, which records how to build
the regulariser (``class`` and ``kwargs``), the noise level σ it was trained for, and how it
was made and measured: the training command, configuration, data, seed and the test PSNR /
SSIM that were measured on held-out images. ``pretrained(NAME)`` rebuilds the module.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from bilevel.imaging import regularisers
from bilevel.imaging.regularisers import Regulariser
from bilevel.problem import BilevelError

__all__ = [
    "MODEL_DIR",
    "available_models",
    "model_info",
    "pretrained",
    "print_models",
    "reference_check",
    "save_pretrained",
]

#: The package data folder of the shipped models.
MODEL_DIR = Path(str(resources.files("bilevel.imaging") / "models"))

#: Regulariser classes a model file may name.
_CLASSES = ("ConvexRidgeNetwork", "WeaklyConvexRidge", "FieldsOfExperts", "SmoothedTV")


def available_models(folder: str | Path | None = None) -> list[str]:
    """Names of the models in ``folder`` (default: the shipped ones), sorted."""
    folder = Path(folder) if folder is not None else MODEL_DIR
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.json") if p.with_suffix(".pt").is_file())


def model_info(name: str, folder: str | Path | None = None) -> dict[str, Any]:
    """The record ``NAME.json`` of a model (class, kwargs, σ, training, test scores)."""
    folder = Path(folder) if folder is not None else MODEL_DIR
    names = available_models(folder)
    if name not in names:
        shown = ", ".join(names) or "none"
        raise BilevelError(f"no pretrained model {name!r}; available: {shown}")
    info = json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
    missing = [k for k in ("class", "kwargs", "sigma") if k not in info]
    if missing or info["class"] not in _CLASSES:
        raise BilevelError(f"{folder / name}.json: missing {missing} or unknown class")
    return info


def pretrained(name: str, folder: str | Path | None = None) -> Regulariser:
    """The shipped regulariser ``name``, in float32 on the CPU, ready for ``reconstruct``
    (``reconstruction_problem(pretrained(name))``), its noise level set to the σ it was
    trained for (``set_noise_level`` changes it for σ-aware models)."""
    folder = Path(folder) if folder is not None else MODEL_DIR
    info = model_info(name, folder)
    model: Regulariser = getattr(regularisers, info["class"])(**info["kwargs"])
    state = torch.load(folder / f"{name}.pt", map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise BilevelError(f"{name}.pt does not fit {name}.json: {err}") from None
    if hasattr(model, "set_noise_level"):
        model.set_noise_level(float(info["sigma"]) / 255.0)
    return model.float().eval()


#: The fixed small reconstruction each record's ``check`` entry stores: a 48×48 crop of the
#: bundled "camera" image (rows and columns 100-147), noise seed 0, RMS gradient tol 1e-4.
CHECK_CROP = ("camera", 100, 100, 48)


def reference_check(model: Regulariser, sigma: float) -> dict[str, Any]:
    """Denoise the crop of :data:`CHECK_CROP` at σ (0-255 scale) with ``model`` (float32):
    the PSNR (dB) that ``tests/test_pretrained.py`` reproduces for every shipped model."""
    from bilevel.imaging.data import _skimage_array, _to_tensor
    from bilevel.imaging.metrics import psnr
    from bilevel.imaging.tasks import reconstruct, reconstruction_problem

    name, top, left, size = CHECK_CROP
    image = _to_tensor(_skimage_array(name, False), torch.float32)
    x = image[None, :, top : top + size, left : left + size].float()
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    y = x + sigma / 255.0 * eps
    problem = reconstruction_problem(model.float())
    x_hat = reconstruct(problem, (y, y), x0=y, tol=1e-4 * size, max_iter=5000)
    return {
        "crop": list(CHECK_CROP),
        "noise_seed": 0,
        "sigma": sigma,
        "psnr": float(psnr(x_hat.clamp(0, 1), x)[0]),
    }


def save_pretrained(
    model: Regulariser, name: str, info: dict[str, Any], folder: str | Path | None = None
) -> Path:
    """Write ``NAME.pt`` and ``NAME.json`` (``info`` must hold ``class``, ``kwargs`` and
    ``sigma`` on the 0-255 scale); returns the JSON path."""
    folder = Path(folder) if folder is not None else MODEL_DIR
    if not name.replace("-", "").replace("_", "").isalnum():
        raise BilevelError(f"model names use letters, digits, - and _; got {name!r}")
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    torch.save(state, folder / f"{name}.pt")
    path = folder / f"{name}.json"
    path.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return path


def print_models(as_json: bool = False) -> int:
    """``bilevel models``: one line per shipped model (name, σ, measured test PSNR), or with
    ``as_json`` their records as one JSON object; returns the exit status 0."""
    infos = {name: model_info(name) for name in available_models()}
    if as_json:
        print(json.dumps(infos))
        return 0
    if not infos:
        print("no pretrained models are shipped with this installation")
    for name, info in infos.items():
        test = info.get("test") or {}
        score = (
            f"test PSNR {test['psnr']:.2f} dB on {test.get('images', '?')} {test.get('set', '')}"
            if "psnr" in test
            else "no test score recorded"
        )
        by_sigma = info.get("test_by_sigma") or {}
        if by_sigma:
            score += "; by σ: " + ", ".join(
                f"{s}: {v['psnr']:.2f} dB" for s, v in by_sigma.items() if "psnr" in v
            )
        nodes = info["kwargs"].get("noise_nodes")
        sigma = (
            f"σ = {info['sigma']:g}/255"
            if not nodes
            else f"σ = {info['sigma']:g}/255 (σ-aware: --sigma S; fitted at "
            + ", ".join(f"{s:g}" for s in nodes)
            + ")"
        )
        print(f"{name:<24} {sigma}  {info.get('description', '')}; {score}")
    print("use: bilevel reconstruct --model NAME IMAGE... [--add-noise] [--json]")
    return 0
