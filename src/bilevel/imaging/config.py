"""Configurations of the imaging jobs: ``bilevel denoise | deblur | inpaint`` (one class
each, sharing :class:`ImagingConfig`) and ``bilevel reconstruct``. Imports no torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from bilevel.config import config_from_dict, option
from bilevel.errors import BilevelError

__all__ = [
    "FILTER_SIZES",
    "LOSSES",
    "METHODS",
    "REGULARISERS",
    "REGULARISER_TITLES",
    "DeblurConfig",
    "DenoiseConfig",
    "ImagingConfig",
    "InpaintConfig",
    "ReconstructConfig",
    "job_config",
]

REGULARISERS = ("foe", "crr", "wcrr", "ridge", "icnn", "tv")
#: How figures and reports name each regulariser.
REGULARISER_TITLES = {
    "foe": "FoE",
    "crr": "CRR",
    "wcrr": "WCRR",
    "ridge": "ridge",
    "icnn": "ICNN",
    "tv": "TV",
}
#: Default filter size per regulariser (crr/wcrr: the composite filters' support).
FILTER_SIZES = {"crr": 13, "wcrr": 13}
METHODS = ("adam-isgd", "isgd", "maid")
#: Upper losses of the imaging jobs (see :func:`bilevel.imaging.tasks.reconstruction_problem`).
LOSSES = ("mse", "psnr")


@dataclass
class ImagingConfig:
    """A learning run of an imaging job: data, regulariser, method, budget and outputs."""

    JOB: ClassVar[str] = ""

    regulariser: str = option(
        "foe",
        "foe: Fields of Experts (convex potential); crr: convex ridge network (CRR-NN); wcrr: "
        "weakly convex ridge network; ridge: convex ridge; icnn: input-convex network; tv: "
        "smoothed total variation",
        choices=REGULARISERS,
    )
    filters: int = option(8, "filters of foe/crr/wcrr/ridge")
    filter_size: int | None = option(
        None,
        "filter size of foe/ridge, composite filter support of crr/wcrr",
        default_text="5; crr/wcrr: 13, three layers of 5×5",
    )
    init_model: str | None = option(
        None,
        "start θ at the shipped pretrained model NAME (bilevel models) instead of the "
        "regulariser's initialisation: its class must be --regulariser's (crr, wcrr, foe or "
        "tv), its filters replace --filters / --filter-size, its noise level is set to --sigma",
        metavar="NAME",
        default_text="none",
    )
    train_only: str | None = option(
        None,
        "learn only the regulariser's parameters whose names start with one of these "
        "comma-separated prefixes (e.g. log_strength,log_sharpness: the scalings α, β of "
        "crr/wcrr); the others keep their initial values",
        metavar="PREFIXES",
        default_text="all",
    )
    loss: str = option(
        "mse",
        "upper loss per image: mse: ½‖x̂ − x‖² (sum over the pixels); psnr: −PSNR(x̂, x) in dB "
        "= 10 log₁₀ of the mean squared error, so that training maximises the mean PSNR",
        choices=LOSSES,
    )
    method: str = option("adam-isgd", "upper-level method", choices=METHODS)
    step: str | None = option(
        None,
        "step schedule, e.g. poly:5e-2,0.5 (MAID adapts its own)",
        default_text="adam-isgd: poly:3e-2,0.25 with foe, poly:2e-3,0.5 with icnn, else "
        "poly:5e-2,0.5; isgd: poly:1e-1,0.5 with foe, else poly:1e-3,0.5",
    )
    accuracy: str = option(
        "poly:1e-1,0.5",
        "accuracy schedule ε_k = δ_k: absolute tolerance on each image's ‖∇ₓh‖ and adjoint "
        "residual",
    )
    adjoint_max_iter: int = option(
        500,
        "iteration cap of the conjugate-gradient adjoint solves (one oracle call each); an "
        "adjoint stopped by it misses its tolerance and its hypergradient is not certified",
    )
    batch_size: int = option(8, "images per ISGD step")
    data: str = option(
        "bundled", "'bundled' (scikit-image images) or a folder with train/ and test/ folders"
    )
    color: bool = option(False, "colour images (else grayscale)")
    crop: int = option(32, "crop size in pixels")
    train_size: int = option(32, "training crops")
    test_size: int = option(16, "test crops")
    val_size: int = option(
        8,
        "validation crops, cut from the training images that no training crop comes from "
        "(from all of them if every one gives a training crop): the evaluation with the best PSNR "
        "on them gives the learned θ (model.pt; 0: none, the last θ)",
    )
    sigma: float = option(25.0, "noise standard deviation on the 0-255 scale")
    budget: int = option(
        150_000,
        "oracle calls (lower-level gradients + Hessian-vector products)",
        resumable=True,
    )
    time: float | None = option(
        None, "wall-time budget in seconds", default_text="none", resumable=True
    )
    eval_every: int = option(20, "steps between test evaluations", resumable=True)
    device: str = option("cpu", "cpu or cuda", resumable=True)
    threads: int = option(1, "CPU threads for torch (1 is fastest for small crops)", resumable=True)
    dtype: str = option("float32", "floating-point type", choices=("float32", "float64"))
    seed: int = option(0, "seed of the crops, the noise and the initial filters")
    run_dir: str | None = option(
        None, "run directory", default_text="runs/<task>-<timestamp>", resumable=True
    )
    checkpoint_every: int = option(
        50, "steps between checkpoints (one is also written at the end)", resumable=True
    )
    tensorboard: bool = option(
        False,
        "also log metrics, filters and reconstructions to RUN_DIR/tensorboard (needs pip "
        "install 'bilevel[tensorboard]')",
        resumable=True,
    )
    progress: bool = option(True, "show a progress bar", resumable=True)
    plots: bool = option(True, "write plots of the metrics and report.html", resumable=True)

    @property
    def job(self) -> str:
        """The task: denoise, deblur or inpaint."""
        return self.JOB


@dataclass
class DenoiseConfig(ImagingConfig):
    """``bilevel denoise``: y = x + σε. Its defaults (16 filters, 128 training crops, 400k
    oracle calls: about 2.5 CPU minutes) take the learned Fields of Experts 0.4–1.3 dB above
    tuned TV on its test crops (README, main job)."""

    JOB: ClassVar[str] = "denoise"

    filters: int = option(16, "filters of foe/crr/wcrr/ridge")
    train_size: int = option(128, "training crops")
    budget: int = option(
        400_000,
        "oracle calls (lower-level gradients + Hessian-vector products)",
        resumable=True,
    )


@dataclass
class DeblurConfig(ImagingConfig):
    """``bilevel deblur``: y = k * x + σε with a Gaussian kernel k."""

    JOB: ClassVar[str] = "deblur"

    sigma: float = option(5.0, "noise standard deviation on the 0-255 scale")
    blur: float = option(1.5, "Gaussian blur σ in pixels")
    kernel_size: int = option(7, "blur kernel size (odd)")
    gamma: float = option(
        1e-2, "γ of the γ/2‖x‖² term that keeps the lower level strongly convex (μ = γ)"
    )


@dataclass
class InpaintConfig(ImagingConfig):
    """``bilevel inpaint``: y = m ⊙ x + σε with a random mask m."""

    JOB: ClassVar[str] = "inpaint"

    sigma: float = option(5.0, "noise standard deviation on the 0-255 scale")
    keep: float = option(0.7, "fraction of pixels observed")
    gamma: float = option(
        1e-2, "γ of the γ/2‖x‖² term that keeps the lower level strongly convex (μ = γ)"
    )


#: The configuration class of each imaging task.
TASKS: dict[str, type[ImagingConfig]] = {
    "denoise": DenoiseConfig,
    "deblur": DeblurConfig,
    "inpaint": InpaintConfig,
}


def job_config(task: str, **options: Any) -> ImagingConfig:
    """The configuration of ``bilevel <task>`` at its defaults, overridden by ``options``
    (e.g. ``train_size=64``): for scripts that build runs as the job does."""
    if task not in TASKS:
        raise BilevelError(f"unknown imaging task {task!r}; choose denoise, deblur or inpaint")
    return config_from_dict(TASKS[task], {}, "options", options)


@dataclass
class ReconstructConfig:
    """``bilevel reconstruct``: apply a learned regulariser to images."""

    JOB: ClassVar[str] = "reconstruct"

    run_dir: str | None = option(
        None,
        "run directory of a finished bilevel denoise / deblur / inpaint run (omitted with --model)",
        positional=True,
        default_text="none",
    )
    images: list[str] = option([], "image files (png, jpg, bmp, tif)", positional=True)
    model: str | None = option(
        None,
        "use the shipped pretrained denoising model NAME instead of a run directory (see "
        "bilevel models)",
        metavar="NAME",
        default_text="none",
    )
    sigma: float | None = option(
        None,
        "noise σ on the 0-255 scale of --add-noise and of a σ-aware model",
        default_text="the σ the model was trained for",
    )
    out: str | None = option(
        None,
        "output folder",
        default_text="RUN_DIR/reconstructed, or reconstructed-NAME with --model",
    )
    add_noise: bool = option(
        False,
        "treat the images as clean: degrade them as in training (the run's operator and σ), "
        "then report PSNR / SSIM of the degraded and the reconstructed image",
    )
    mask: str | None = option(
        None, "inpainting runs: image whose non-zero pixels are observed", default_text="none"
    )
    tol: float | None = option(
        None,
        "stop when the root mean square of ∇ₓh over the pixels is ≤ TOL, i.e. "
        "‖∇ₓh‖ ≤ TOL·√(pixels · channels) (intensities in [0, 1])",
        default_text="2e-4 for denoising, 3e-5 for deblurring and inpainting, whose weaker "
        "curvature γ leaves more of the error per unit of gradient",
    )
    max_iter: int = option(5000, "solver iterations at most")
    seed: int = option(0, "seed of the noise of --add-noise")
    final: bool = option(
        False, "use the run's last θ (model_final.pt) instead of the learned θ (model.pt)"
    )
