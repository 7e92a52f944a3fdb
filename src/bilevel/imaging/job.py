"""`bilevel denoise | deblur | inpaint`: learn an image regulariser by bilevel learning.

The job builds training and test sets of degraded crops (noise frozen per sample), learns the
regulariser's parameters θ with (by default) Adam-preconditioned ISGD on

    min_θ mean_i ½‖x̂_i(θ) − x_i‖²,   x̂_i(θ) = argmin_x ½‖A x − y_i‖² + R_θ(x) (+ γ/2‖x‖²),

compares the learned regulariser on the test set with the degraded input and with total
variation tuned by grid search on the training set, and writes everything to a run
directory: ``job.json`` (the job's configuration, :mod:`bilevel.imaging.config`),
``config.json`` (the run loop's), ``metrics.jsonl``, checkpoints, ``plots/``,
``reconstructions.png``, ``model.pt`` (the learned θ), ``model_final.pt`` (the last θ) and
``summary.json``. The learned θ, the job's model, is selected on validation data: the θ of the
evaluation with the best mean PSNR on ``--val-size`` validation crops cut from the training
images (early stopping; the test crops never choose a model), or the last θ with
``--val-size 0``. The summary, the report and the figures score it on the test crops, and the
last θ beside it. Every option is checked before any work; the directory is locked while the
run writes it. Interrupting (Ctrl-C or SIGTERM) writes a checkpoint and a summary marked
unfinished (no ``model.pt``); ``--resume`` continues.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bilevel import distributed
from bilevel.bounds import BoundConstants
from bilevel.config import Invocation, job_record, resumable_fields, resume_command
from bilevel.hypergrad import Implicit
from bilevel.imaging.config import (
    FILTER_SIZES,
    REGULARISER_TITLES,
    ImagingConfig,
)
from bilevel.imaging.data import (
    DegradedImages,
    ImageFileError,
    bundled_images,
    crop_sources,
    load_image_folder,
    random_crops,
)
from bilevel.imaging.metrics import SSIM_WINDOW, psnr, ssim
from bilevel.imaging.operators import (
    Convolution,
    Identity,
    InpaintingMask,
    LinearOperator,
    gaussian_kernel,
    random_mask,
)
from bilevel.imaging.pretrained_models import model_info, pretrained
from bilevel.imaging.regularisers import (
    ConvexRidge,
    ConvexRidgeNetwork,
    FieldsOfExperts,
    InputConvexNetwork,
    Regulariser,
    SmoothedTV,
    WeaklyConvexRidge,
    _directional_derivatives,
    ridge_layers,
)
from bilevel.imaging.report import (
    GRID_IMAGES,
    TensorBoardEvaluation,
    final_record,
    measurement_title,
    reconstruction_figure,
    write_report,
    write_run_figures,
)
from bilevel.imaging.ridge import retain_freed_memory
from bilevel.imaging.tasks import (
    GridSearchResult,
    grid_search,
    grid_search_tv,
    reconstruct,
    reconstruction_problem,
)
from bilevel.linear import CG
from bilevel.lower import LBFGS, Nesterov
from bilevel.methods import ISGD, MAID, Budget, RunResult, ranked_by, with_initial
from bilevel.methods.optim import load_params
from bilevel.problem import BilevelError, BilevelProblem
from bilevel.runs import (
    RunLock,
    atomic_output,
    check_resume,
    dumps_json,
    read_json,
    save_torch,
    write_json,
)
from bilevel.runs.tensorboard import TensorBoardLog

TV_GRID = (0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3)
#: Tolerance on each test image's ‖∇ₓh‖ for the reported reconstructions; looser in float32,
#: where the gradient of a learned FoE with small smoothings stalls at its rounding floor.
EVAL_TOL = {torch.float64: 1e-3, torch.float32: 3e-3}
#: Initial smoothing ν_k of the Fields-of-Experts potentials (learned during the run).
FOE_SMOOTHING = 0.003
#: Default step schedules per method and regulariser ("": any other). The ICNN's weights start
#: at 1e-2 scale: larger Adam steps destroy its conditioning. SGD steps on the Fields of
#: Experts are large because its hypergradients are small (sums of squared errors per image).
DEFAULT_STEPS = {
    "adam-isgd": {"icnn": "poly:2e-3,0.5", "foe": "poly:3e-2,0.25", "": "poly:5e-2,0.5"},
    "isgd": {"foe": "poly:1e-1,0.5", "": "poly:1e-3,0.5"},
}


@dataclass
class Setup:
    """Everything a run needs, built from the options."""

    problem: BilevelProblem
    train: DegradedImages
    test: DegradedImages
    operator: LinearOperator
    gamma: float
    #: crops of the training images (other crops, other noise) that rank the evaluations
    val: DegradedImages | None = None


def _ridge_network(config: ImagingConfig, channels: int) -> Regulariser:
    layers, kernel = ridge_layers(_filter_size(config))
    model = ConvexRidgeNetwork if config.regulariser == "crr" else WeaklyConvexRidge
    return model(config.filters, channels, layers, kernel, noise_level=float(config.sigma) / 255.0)


def _filter_size(config: ImagingConfig) -> int:
    return config.filter_size or FILTER_SIZES.get(config.regulariser, 5)


#: The regulariser of each ``--regulariser`` name at its initial θ: ``build(config, channels)``.
REGULARISER_BUILDERS: dict[str, Callable[[ImagingConfig, int], Regulariser]] = {
    "foe": lambda config, channels: FieldsOfExperts(
        config.filters,
        _filter_size(config),
        init="directional",
        channels=channels,
        smoothing=FOE_SMOOTHING,
        learn_smoothing=True,
        seed=config.seed,
    ),
    "crr": _ridge_network,
    "wcrr": _ridge_network,
    "ridge": lambda config, channels: ConvexRidge(
        config.filters, _filter_size(config), channels=channels, seed=config.seed
    ),
    "icnn": lambda config, channels: InputConvexNetwork(channels=channels, seed=config.seed),
    "tv": lambda config, channels: SmoothedTV(strength=0.02),
}


#: The class of each ``--regulariser`` name that an ``--init-model`` may be.
INIT_MODEL_CLASSES = {
    "crr": "ConvexRidgeNetwork",
    "wcrr": "WeaklyConvexRidge",
    "foe": "FieldsOfExperts",
    "tv": "SmoothedTV",
}


def make_regulariser(config: ImagingConfig, channels: int) -> Regulariser:
    """The regulariser of ``config.regulariser`` at its initial θ, for ``channels`` channels
    (:data:`REGULARISER_BUILDERS`), or the shipped model ``--init-model`` (its noise level set
    to ``--sigma`` when it has one), with ``--train-only`` freezing the other parameters."""
    name = getattr(config, "init_model", None)
    if name is None:
        regulariser = REGULARISER_BUILDERS[config.regulariser](config, channels)
    else:
        regulariser = pretrained(name)
        # TV acts on any number of channels
        _check_init_channels(name, getattr(regulariser, "channels", channels), channels)
        if hasattr(regulariser, "set_noise_level") and config.sigma > 0:
            regulariser.set_noise_level(config.sigma / 255.0)
    prefixes = getattr(config, "train_only", None)
    if prefixes is not None:
        train_only(regulariser, prefixes)
    return regulariser


def _check_init_channels(name: str, model_channels: int, image_channels: int) -> None:
    """A :class:`BilevelError` unless the shipped model ``name`` fits the images' channels."""
    if model_channels != image_channels:
        raise BilevelError(
            f"--init-model {name} has {model_channels} channel(s), the images {image_channels} "
            "(--color selects colour images)"
        )


def train_only(regulariser: Regulariser, prefixes: str) -> list[str]:
    """Freeze (``requires_grad=False``) the parameters whose names start with none of the
    comma-separated ``prefixes``; returns the names of those left to learn."""
    wanted = [p.strip() for p in prefixes.split(",") if p.strip()]
    names = [n for n, _ in regulariser.named_parameters()]
    learned = [n for n in names if any(n.startswith(p) for p in wanted)]
    if not learned:
        raise BilevelError(
            f"--train-only {prefixes!r} matches no parameter of the {type(regulariser).__name__} "
            f"regulariser (its parameters: {', '.join(names) or 'none'})"
        )
    for n, p in regulariser.named_parameters():
        p.requires_grad_(n in learned)
    return learned


@torch.no_grad()
def calibrate_foe_weights(regulariser: FieldsOfExperts, tv_strength: float) -> None:
    """Set every expert weight to λ_TV π/(2K), λ_TV the grid-tuned TV strength of the task.

    With the directional-derivative initial filters of the job's Fields of Experts this starts
    it at smoothed isotropic TV of strength λ_TV (with the experts' smaller smoothing
    :data:`FOE_SMOOTHING`), i.e. at or slightly above the tuned TV.
    """
    k = regulariser.log_weights.numel()
    regulariser.log_weights.fill_(math.log(tv_strength * math.pi / (2 * k)))


@torch.no_grad()
def calibrate_convex_ridge(regulariser: ConvexRidge, tv_strength: float) -> None:
    """Start a convex ridge regulariser at smoothed isotropic TV of the grid-tuned strength
    λ_TV: directional-derivative filters (as the job's Fields of Experts) and profiles
    ψ_k ≈ λ_TV π/(2K) · σ₀ log cosh(t/σ₀), the weight on the smallest scale σ₀ (the other
    scales keep 10⁻³ of it, since the coefficients are softplus-positive)."""
    k, channels, size, _ = regulariser.filters.shape
    regulariser.filters.copy_(_directional_derivatives(k, channels, size))
    weight = tv_strength * math.pi / (2 * k)
    coefficients = torch.full(regulariser.raw_coefficients.shape, 1e-3 * weight)
    coefficients[:, 0] = weight
    regulariser.raw_coefficients.copy_(coefficients + torch.log(-torch.expm1(-coefficients)))


@torch.no_grad()
def calibrate_ridge_strength(regulariser: ConvexRidgeNetwork, tv_strength: float) -> None:
    """Start a (weakly) convex ridge network at smoothed isotropic TV of the grid-tuned
    strength λ_TV: α(σ) = λ_TV π/(2K) at the task's σ (see :class:`ConvexRidgeNetwork`)."""
    k = regulariser.layers[-1].shape[0]
    alpha = float(regulariser.scalings()[0])
    regulariser.rescale_(tv_strength * math.pi / (2 * k) / alpha)


def calibrate_initial(regulariser: Regulariser, tv_strength: float, resume: bool = False) -> None:
    """Start the job's FoE, convex ridge or (weakly) convex ridge network at smoothed TV of the
    grid-tuned strength λ_TV (the ridge network's α is left alone when ``resume``: its
    checkpoint replaces θ₀ after a rescaling that would not be reproduced); other
    regularisers are left as they are."""
    if isinstance(regulariser, FieldsOfExperts):
        calibrate_foe_weights(regulariser, tv_strength)
    if isinstance(regulariser, ConvexRidgeNetwork | WeaklyConvexRidge) and not resume:
        calibrate_ridge_strength(regulariser, tv_strength)
    if isinstance(regulariser, ConvexRidge):
        calibrate_convex_ridge(regulariser, tv_strength)


def make_operator(config: ImagingConfig, dtype: torch.dtype) -> tuple[LinearOperator, float]:
    """(A, γ) of the task: the identity and 0 (denoise), the Gaussian blur of ``--blur`` and
    ``--kernel-size`` (deblur) or a random mask of the crop size (inpaint), with ``--gamma``."""
    if config.job == "deblur":
        kernel = gaussian_kernel(config.kernel_size, config.blur, dtype=dtype)
        return Convolution(kernel), config.gamma
    if config.job == "inpaint":
        if not 0.0 < config.keep <= 1.0:
            raise BilevelError(f"--keep must be in (0, 1], got {config.keep}")
        mask = random_mask(
            (config.crop, config.crop), config.keep, generator=config.seed, dtype=dtype
        )
        return InpaintingMask(mask), config.gamma
    return Identity(), 0.0


def _images(config: ImagingConfig, split: str, dtype: torch.dtype) -> list[Tensor]:
    if config.data == "bundled":
        return bundled_images(split, color=config.color, dtype=dtype)
    folder = Path(config.data) / split
    if not folder.is_dir():
        raise BilevelError(f"--data {config.data}: expected a folder with {split}/ inside")
    try:
        return load_image_folder(folder, color=config.color, dtype=dtype)
    except ImageFileError as err:
        raise BilevelError(f"--data {config.data}: {err}") from None


def _positive_int(config: ImagingConfig, name: str) -> None:
    value = getattr(config, name, None)
    if value is not None and value < 1:
        raise BilevelError(f"--{name.replace('_', '-')} must be positive, got {value}")


def check_options(config: ImagingConfig, *, resume: bool = False, overwrite: bool = False) -> None:
    """Refuse bad options with one message each, before any data are read or work is done
    (with ``resume`` / ``overwrite``: also a run directory that cannot be resumed)."""
    for name in (
        "crop",
        "train_size",
        "test_size",
        "batch_size",
        "budget",
        "eval_every",
        "filters",
        "filter_size",
        "threads",
        "checkpoint_every",
        "kernel_size",
        "adjoint_max_iter",
    ):
        _positive_int(config, name)
    if getattr(config, "val_size", 0) < 0:
        raise BilevelError(f"--val-size must be 0 or positive, got {config.val_size}")
    if not (math.isfinite(config.sigma) and config.sigma >= 0):
        raise BilevelError(f"--sigma must be a finite non-negative number, got {config.sigma}")
    if config.job == "denoise" and config.sigma == 0:
        raise BilevelError(
            "--sigma 0 leaves nothing to denoise (the measurements are the clean images); "
            "give a positive noise level"
        )
    if config.crop < SSIM_WINDOW:
        raise BilevelError(
            f"--crop must be at least {SSIM_WINDOW} pixels (the SSIM window), got {config.crop}"
        )
    size = _filter_size(config)
    if config.regulariser in ("foe", "ridge", "crr", "wcrr") and config.crop < size:
        raise BilevelError(
            f"--crop {config.crop} is smaller than --filter-size {size}: the "
            "convolutional regulariser needs crops at least as large as its filters"
        )
    if config.job == "deblur":
        if not (math.isfinite(config.blur) and config.blur > 0):
            raise BilevelError(f"--blur must be a finite positive σ in pixels, got {config.blur}")
        if config.kernel_size % 2 == 0:
            raise BilevelError(f"--kernel-size must be odd, got {config.kernel_size}")
    if config.job == "inpaint" and not (math.isfinite(config.keep) and 0.0 < config.keep <= 1.0):
        raise BilevelError(f"--keep must be in (0, 1], got {config.keep}")
    gamma = getattr(config, "gamma", None)
    if gamma is not None and not (math.isfinite(gamma) and gamma > 0):
        raise BilevelError(
            f"--gamma must be a finite positive number (it makes the lower level strongly "
            f"convex), got {gamma}"
        )
    if config.time is not None and not (math.isfinite(config.time) and config.time > 0):
        raise BilevelError(f"--time must be a finite positive number of seconds, got {config.time}")
    try:
        device = torch.device(config.device)
    except (RuntimeError, ValueError):
        raise BilevelError(
            f"--device {config.device!r} is not a device (use cpu, cuda, cuda:1, ...)"
        ) from None
    if device.type not in ("cpu", "cuda"):
        raise BilevelError(f"--device {config.device!r}: use cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BilevelError(f"--device {config.device} requested but CUDA is not available")
    if config.data != "bundled" and not Path(config.data).is_dir():
        raise BilevelError(
            f"--data {config.data}: not a folder (use 'bundled' or a folder with train/ and test/)"
        )
    run_dir = config.run_dir
    if resume:
        if run_dir is None:
            raise BilevelError("--resume needs --run-dir (the directory of the run to continue)")
        if overwrite:
            raise BilevelError("--resume and --overwrite exclude each other")
        if not (Path(run_dir) / "job.json").is_file():
            raise BilevelError(f"--resume: no run to resume in {run_dir} (no job.json there)")
    if run_dir is not None and Path(run_dir).exists() and not Path(run_dir).is_dir():
        raise BilevelError(f"--run-dir {run_dir} is a file, not a directory")
    name = getattr(config, "init_model", None)
    if name is not None:
        info = model_info(name)  # a BilevelError naming the shipped models if unknown
        wanted = INIT_MODEL_CLASSES.get(config.regulariser)
        if info["class"] != wanted:
            needed = {c: r for r, c in INIT_MODEL_CLASSES.items()}[info["class"]]
            raise BilevelError(
                f"--init-model {name} is a {info['class']}; it needs --regulariser {needed}, "
                f"not {config.regulariser}"
            )
        channels = info["kwargs"].get("channels")
        if channels is not None:
            _check_init_channels(name, channels, 3 if config.color else 1)
    if getattr(config, "train_only", None) is not None:
        make_regulariser(config, 3 if config.color else 1)  # the prefixes must match
    make_method(config)  # parses --step and --accuracy


def build(config: ImagingConfig) -> Setup:
    """Data, operator, regulariser and bilevel problem for the configuration ``config`` (checked
    first by :func:`check_options`)."""
    check_options(config)
    dtype = getattr(torch, config.dtype)
    operator, gamma = make_operator(config, dtype)
    sigma = config.sigma / 255.0
    train_images = _images(config, "train", dtype)
    train_clean = random_crops(train_images, config.crop, config.train_size, generator=config.seed)
    test_clean = random_crops(
        _images(config, "test", dtype), config.crop, config.test_size, generator=config.seed + 1
    )
    train = DegradedImages(train_clean, operator, sigma=sigma, seed=config.seed + 2)
    test = DegradedImages(test_clean, operator, sigma=sigma, seed=config.seed + 3)
    train, test = train.to(config.device), test.to(config.device)
    val = None
    if config.val_size > 0:
        val_clean = random_crops(
            validation_images(train_images, config.train_size, config.seed),
            config.crop,
            config.val_size,
            generator=config.seed + 4,
        )
        val = DegradedImages(val_clean, operator, sigma=sigma, seed=config.seed + 5)
        val = val.to(config.device)
    regulariser = make_regulariser(config, train_clean.shape[1]).to(config.device, dtype)
    operator = operator.to(config.device, dtype)
    problem = reconstruction_problem(regulariser, operator, gamma=gamma, loss=config.loss)
    return Setup(problem, train, test, operator, gamma, val)


def validation_images(images: list[Tensor], train_size: int, seed: int) -> list[Tensor]:
    """The training images that none of the ``train_size`` training crops (seed ``seed``)
    comes from, which the validation crops are cut from; all of them when every image gives
    a training crop (e.g. the few bundled images)."""
    used = set(crop_sources(len(images), train_size, seed).tolist())
    return [im for i, im in enumerate(images) if i not in used] or images


def tune_tv(setup: Setup) -> GridSearchResult:
    """Grid-tuned TV: the strength of :data:`TV_GRID` with the best mean PSNR on the training
    crops (reconstructions to ‖∇ₓh‖ ≤ 1e-3 or 1000 iterations)."""
    return grid_search_tv(
        setup.train.batch(),
        TV_GRID,
        operator=setup.operator,
        gamma=setup.gamma,
        max_iter=1000,
        tol=1e-3,
    )


#: Factors of an ``--init-model``'s strength α searched on the training crops (extended past
#: an edge optimum).
INIT_STRENGTH_GRID = (0.125, 0.25, 0.5, 1.0, 2.0)


@torch.no_grad()
def tune_init_strength(setup: Setup) -> GridSearchResult:
    """Rescale the strength α of a shipped model (``--init-model``) by the factor of
    :data:`INIT_STRENGTH_GRID` whose reconstructions have the best mean PSNR on the training
    crops (as TV's λ: ‖∇ₓh‖ ≤ 1e-3 or 1000 iterations; the grid extended past an edge
    optimum), so that a denoising model starts at its best level for the task's operator."""
    regulariser = setup.problem.theta["regulariser"]
    batch = setup.train.batch()

    def score(factor: float) -> float:
        regulariser.rescale_(factor)
        try:
            x = reconstruct(setup.problem, batch, tol=1e-3, max_iter=1000)
        finally:
            regulariser.rescale_(1.0 / factor)
        return float(psnr(x, batch[1]).mean())

    found = grid_search(score, INIT_STRENGTH_GRID, 6, "strength factor of --init-model")
    regulariser.rescale_(found.strength)
    return found


def tv_reconstructions(setup: Setup, strength: float) -> Tensor:
    """Test reconstructions by smoothed TV of strength λ, to ‖∇ₓh‖ ≤ :data:`EVAL_TOL`."""
    y, x_true = setup.test.batch()[:2]
    problem = reconstruction_problem(
        SmoothedTV(strength=strength).to(x_true.device, x_true.dtype),
        setup.operator,
        gamma=setup.gamma,
    )
    return reconstruct(problem, (y, x_true), tol=EVAL_TOL[x_true.dtype])


def make_method(config: ImagingConfig) -> ISGD | MAID:
    """The upper-level method of the options: Adam-ISGD, ISGD or MAID, with warm-started
    lower solves and CG adjoints (at most ``--adjoint-max-iter`` iterations). ISGD solves
    the lower levels by L-BFGS, which on these energies needs about a third of the oracle
    calls of accelerated gradient per step (the job's FoE on 128 crops: 120 steps in 66k
    calls against 190k, same test PSNR); MAID by ``Nesterov``, with which its float32 line
    search is tested."""
    estimator = Implicit(
        CG(max_iter=config.adjoint_max_iter),
        lower_solver=Nesterov(max_iter=5000) if config.method == "maid" else LBFGS(max_iter=2000),
        compute_bound=config.method == "maid",
    )
    if config.method == "maid":  # worst-case constants of ω are loose for image energies
        # (docs/benchmarks_bounds.md): the a-posteriori estimate replaces them
        estimator = replace(estimator, constants=BoundConstants(a_posteriori=True))
        return MAID(estimator=estimator, lower_tol=1e-1, step=1.0)
    default_step = DEFAULT_STEPS[config.method].get(
        config.regulariser, DEFAULT_STEPS[config.method][""]
    )
    return ISGD(
        step=config.step or default_step,
        accuracy=config.accuracy,
        batch_size=min(config.batch_size, config.train_size),
        optimizer="adam" if config.method == "adam-isgd" else "sgd",
        estimator=estimator,
        seed=config.seed,
    )


class TestEvaluation:
    """The ``evaluate`` callback of a run: mean test PSNR (dB) of the current regulariser and,
    when the setup has validation crops, their mean PSNR ``val_psnr`` (which alone ranks the
    evaluations: the test crops never choose a model); reconstructions to
    ‖∇ₓh‖ ≤ :data:`EVAL_TOL`, warm-started across calls. ``last`` holds the test
    reconstructions of the latest call, so that the summary scores the very images whose PSNR
    the run reported; ``bound_note`` (logged as such) says why a run's records hold no bound ω."""

    def __init__(self, setup: Setup, bound_note: str | None = None) -> None:
        self.setup = setup
        self.batch = setup.test.batch()
        self.val_batch = setup.val.batch() if setup.val is not None else None
        self.tol = EVAL_TOL[self.batch[1].dtype]
        self.bound_note = bound_note
        self.last: Tensor | None = None
        self.last_val: Tensor | None = None

    def __call__(self, theta: Any, step: int) -> dict[str, Any]:
        x = sharded_reconstruct(self.setup.problem, self.batch, self.last, self.tol)
        self.last = x
        out: dict[str, Any] = {"test_psnr": float(psnr(x.clamp(0, 1), self.batch[1]).mean())}
        if self.val_batch is not None:
            v = sharded_reconstruct(self.setup.problem, self.val_batch, self.last_val, self.tol)
            self.last_val = v
            out["val_psnr"] = float(psnr(v.clamp(0, 1), self.val_batch[1]).mean())
        if self.bound_note is not None:
            out["bound_note"] = self.bound_note
        return out


def sharded_reconstruct(
    problem: BilevelProblem, batch: tuple[Tensor, ...], x0: Tensor | None, tol: float
) -> Tensor:
    """:func:`reconstruct` of the images ``batch = (y, x_true, ...)``; data parallel
    (:mod:`bilevel.distributed`), each process reconstructs the images it owns and every
    process gets all of them."""
    shard = distributed.current()
    if shard is None:
        return reconstruct(problem, batch, x0=x0, tol=tol)
    n = batch[0].shape[0]
    own = shard.owned(torch.arange(n, device=batch[0].device))
    local = torch.empty_like(batch[1][own])
    if own.numel():
        start = None if x0 is None else x0[own]
        local = reconstruct(problem, tuple(t[own] for t in batch), x0=start, tol=tol)
    return shard.gather_rows(local, own, n)


def ranked(evaluation: Callable[[Any, int], dict[str, Any]], setup: Setup) -> Callable:
    """``evaluation`` ranked by validation PSNR when the setup has validation crops (the run
    keeps the θ of the best one, see :func:`bilevel.methods.ranked_by`), else as is."""
    return evaluation if setup.val is None else ranked_by(evaluation, "val_psnr", "max")


def test_evaluation(setup: Setup) -> Callable[[Any, int], dict[str, float]]:
    """The ``evaluate`` callback of a run (:class:`TestEvaluation`, ranked by :func:`ranked`)."""
    return ranked(TestEvaluation(setup), setup)


def _test_psnr_at(result: RunResult, step: int) -> float | None:
    """The test PSNR that the run's evaluation of θ_step logged (the final one included)."""
    evaluations = [*result.records, {"step": result.step, **(result.evaluation or {})}]
    return next(
        (r["test_psnr"] for r in evaluations if r.get("step") == step and "test_psnr" in r), None
    )


def _scores(x: Tensor, clean: Tensor) -> dict[str, float]:
    x = x.clamp(0, 1)
    return {"psnr": float(psnr(x, clean).mean()), "ssim": float(ssim(x, clean).mean())}


#: The learned θ of a finished run (``problem.theta.state_dict()``): that of the evaluation
#: with the best mean validation PSNR, or the last θ when the run has no validation crops.
MODEL_FILE = "model.pt"
#: The last θ of a finished run, beside :data:`MODEL_FILE`.
FINAL_MODEL_FILE = "model_final.pt"
#: Files a run writes besides those of its run loop (removed by ``--overwrite``).
JOB_FILES = ("job.json", MODEL_FILE, FINAL_MODEL_FILE, "summary.json", "reconstructions.png")


def _prepare_run_dir(run_dir: Path, config: ImagingConfig, inv: Invocation) -> None:
    """Check the run directory against ``--resume`` / ``--overwrite`` and write ``job.json``,
    the effective configuration (the caller holds the directory's lock)."""
    record = job_record(config)
    present = [name for name in ("job.json", "config.json") if (run_dir / name).exists()]
    if inv.resume:
        check_resume(run_dir / "job.json", record, ignore=resumable_fields(config))
    elif present and not inv.overwrite:
        raise BilevelError(
            f"{run_dir} already holds a run ({', '.join(present)}): resume it (--resume), "
            "start again (--overwrite), or choose another --run-dir"
        )
    elif inv.overwrite:
        for name in JOB_FILES:
            (run_dir / name).unlink(missing_ok=True)
    write_json(run_dir / "job.json", record)


def theta_state(problem: BilevelProblem, values: list[Tensor] | None = None) -> dict[str, Tensor]:
    """``problem.theta.state_dict()`` (copies), with the parameters set to ``values`` if
    given (the problem's θ is left as it was)."""
    if values is None:
        return {k: v.detach().clone() for k, v in problem.theta.state_dict().items()}
    current = [p.detach().clone() for p in problem.params]
    load_params(problem.params, values)
    try:
        return {k: v.detach().clone() for k, v in problem.theta.state_dict().items()}
    finally:
        load_params(problem.params, current)


def select_learned(
    setup: Setup, result: RunResult, tol: float
) -> tuple[dict[str, Any] | None, Tensor | None]:
    """Load the validation-selected θ (``result.best_theta``, the evaluation with the best
    mean validation PSNR) into the problem and reconstruct the test crops with it, from the
    measurements (so the scores depend on θ alone, not on the evaluations before it, and a
    resumed run reproduces them). Returns ``result.best`` (step, value) and the
    reconstructions (None when the selected θ is the final one: the final evaluation's are
    used), or (None, None) when the run has no such θ (no validation crops, or not finished):
    then the job's learned θ is the last one. Data parallel: every process calls it (the
    reconstruction is sharded)."""
    if not result.finished or result.best_theta is None or result.best is None:
        return None, None
    if result.best["step"] == result.step:  # the final θ: its evaluation's reconstructions
        return dict(result.best), None
    load_params(setup.problem.params, list(result.best_theta))
    return dict(result.best), sharded_reconstruct(setup.problem, setup.test.batch(), None, tol)


def run(
    config: ImagingConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    json: bool = False,
    argv: list[str] | None = None,
    on_start: Callable[[Path], None] | None = None,
) -> int:
    """Run the imaging job ``config`` describes (a :class:`DenoiseConfig`,
    :class:`DeblurConfig` or :class:`InpaintConfig`); print the summary; return the exit
    status. Every option is checked before any work (:func:`build`); then the run directory
    is locked for this process, ``job.json`` (the effective configuration) written and
    ``on_start(run_dir)`` called: from then on an interrupted run can be resumed."""
    if not isinstance(config, ImagingConfig) or not config.job:
        raise BilevelError(f"an imaging job needs a task configuration, got {config!r}")
    inv = Invocation(resume, overwrite, json, argv)
    if resume and config.run_dir is None:
        raise BilevelError("--resume needs --run-dir (the directory of the run to continue)")
    check_options(config, resume=resume, overwrite=overwrite)
    run_dir = Path(config.run_dir or f"runs/{config.job}-{time.strftime('%Y%m%d-%H%M%S')}")
    if distributed.current() is not None:  # every process writes into rank 0's directory
        run_dir = Path(distributed.current().broadcast_object(str(run_dir)))
    config = replace(
        config,
        run_dir=str(run_dir),
        filter_size=_filter_size(config),
    )
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    retain_freed_memory()  # the job's response tensors reuse freed pages (see its docstring)
    setup = build(config)
    writer = distributed.is_writer()  # data parallel: rank 0 alone writes the run's files
    with RunLock(run_dir) if writer else contextlib.nullcontext():
        distributed.on_writer(lambda: _prepare_run_dir(run_dir, config, inv))
        if on_start is not None:
            on_start(run_dir)
        return train(config, inv, setup, run_dir)


def _resume_hint(config: ImagingConfig, inv: Invocation) -> str:
    if inv.argv is None:
        return f"bilevel {config.job} ... --run-dir {config.run_dir} --resume (the same options)"
    return resume_command(config.job, inv.argv, config.run_dir)


def train(config: ImagingConfig, inv: Invocation, setup: Setup, run_dir: Path) -> int:
    """The work of a run whose options are checked and whose directory is locked: TV grid
    search, the bilevel run, the test comparison and the files of the run directory."""
    tensorboard = _tensorboard(run_dir) if config.tensorboard and distributed.is_writer() else None
    log = sys.stderr if inv.json else sys.stdout
    y_test, x_test = setup.test.batch()[:2]

    print(
        f"bilevel {config.job}: {config.regulariser} regulariser, {config.method}, "
        f"{len(setup.train)} training / {len(setup.test)} test crops of {config.crop}px, "
        f"σ = {config.sigma:g}/255, run directory {run_dir}",
        file=log,
    )
    start = time.perf_counter()
    tv = distributed.once(lambda: tune_tv(setup))  # data parallel: rank 0's grid search
    x_tv = tv_reconstructions(setup, tv.strength) if distributed.is_writer() else None
    print(f"  grid-tuned TV: λ = {tv.strength:g} (train PSNR {tv.psnr:.2f} dB)", file=log)

    regulariser = setup.problem.theta["regulariser"]
    if config.init_model is None:  # θ₀ from TV; a checkpoint, if any, replaces it
        calibrate_initial(regulariser, tv.strength, resume=inv.resume)
    elif hasattr(regulariser, "rescale_") and not inv.resume:
        factor = distributed.once(lambda: tune_init_strength(setup).strength)
        if not distributed.is_writer():  # the others rescale as rank 0 did
            regulariser.rescale_(factor)
        print(
            f"  {config.init_model}: strength α × {factor:g} (best on the training crops)", file=log
        )
    samples = with_initial(setup.train, lambda b: b[0].clone())
    budget = Budget(oracle_calls=config.budget, wall_time=config.time)
    method = make_method(config)
    test = TestEvaluation(
        setup, None if isinstance(method, MAID) else "not computed: ISGD steps do not use ω"
    )
    eval_tol = test.tol
    if tensorboard is None:
        evaluate = ranked(test, setup)
    else:
        shown = (y_test[:GRID_IMAGES], x_test[:GRID_IMAGES])
        logged = TensorBoardEvaluation(
            test, tensorboard, lambda: reconstruct(setup.problem, shown, tol=eval_tol), regulariser
        )
        evaluate = ranked(logged, setup)
    result: RunResult = method.run(
        setup.problem,
        samples,
        budget,
        run_dir=run_dir,
        resume=inv.resume,
        overwrite=inv.overwrite,
        evaluate=evaluate,
        eval_every=config.eval_every,
        checkpoint_every=config.checkpoint_every,
        progress=config.progress,
        plot=config.plots,
    )
    final_state = theta_state(setup.problem) if result.finished else None
    x_final = test.last  # the final evaluation's reconstructions (those of result.json)
    best, x_best = select_learned(setup, result, eval_tol)
    if not distributed.is_writer():
        return 0 if result.ok else 130 if not result.finished else 1
    base = {
        "task": config.job,
        "regulariser": config.regulariser,
        "method": config.method,
        "status": result.status,
        "finished": result.finished,
        "message": result.message,
        "steps": result.step,
        "epochs": result.epoch,
        "oracle_calls": result.cost,
        # computation over every session of the run (evaluations excluded), as result.json
        "wall_time_s": result.wall_time,
        "session_time_s": time.perf_counter() - start,
        "run_dir": str(run_dir),
    }
    if not result.finished:
        hint = _resume_hint(config, inv)
        write_json(run_dir / "summary.json", {**base, "resume": hint})
        if inv.json:
            print(dumps_json({**base, "resume": hint}))
        print(
            f"bilevel {config.job}: {result.message.split(';')[0]}; not finished (no "
            f"{MODEL_FILE}); resume with: {hint}",
            file=sys.stderr,
        )
        return 130
    # the problem holds the learned θ now: the validation-selected one, else the last one
    save_torch(run_dir / MODEL_FILE, theta_state(setup.problem))
    save_torch(run_dir / FINAL_MODEL_FILE, final_state)
    final_scores = {**_scores(x_final, x_test), "step": result.step}
    if best is None:
        learned = {**final_scores, "selection": "final θ (no validation crops)"}
        x_learned = x_final
    else:
        x_best = x_final if x_best is None else x_best
        learned = {
            **_scores(x_best, x_test),
            "step": best["step"],
            "selection": f"best validation PSNR ({best['value']:.2f} dB)",
        }
        x_learned = x_best
        best = {
            "step": best["step"],
            "val_psnr": best["value"],
            # logged by the run's evaluation (warm-started, hence ±0.01 dB from "learned")
            "logged_test_psnr": _test_psnr_at(result, best["step"]),
            "model": MODEL_FILE,
        }
    summary = {
        **base,
        "test": {
            "degraded": _scores(y_test, x_test),
            "tv": {**_scores(x_tv, x_test), "strength": tv.strength},
            "learned": learned,
            # the final evaluation's reconstructions: these scores agree with result.json
            "final": final_scores,
        },
        "best": best,
        "model": MODEL_FILE,
        "final_model": FINAL_MODEL_FILE,
    }
    write_json(run_dir / "summary.json", summary)
    # the measurement y itself (for deblurring not Aᵀy, whose frame the zero boundary darkens)
    images = {
        "clean": x_test,
        "measurement": y_test,
        "tv": x_tv,
        "learned": x_learned,
        "final": x_final,
    }
    _write_figures(config, run_dir, summary, result, regulariser, eval_tol, images)
    if tensorboard is not None:  # the final evaluation went through the callback already
        tensorboard.sync()
        tensorboard.close()
    if inv.json:
        print(dumps_json(summary))
    else:
        t = summary["test"]
        print(f"\n  test PSNR / SSIM over {len(setup.test)} crops:")
        for name, label in (
            ("degraded", "degraded"),
            ("tv", "tv"),
            ("learned", "learned"),
            ("final", "final θ"),
        ):
            print(f"    {label:<9} {t[name]['psnr']:6.2f} dB   {t[name]['ssim']:.4f}")
        print(
            f"  learned: θ of step {learned['step']}, {learned['selection']} ({MODEL_FILE}); "
            f"final θ: step {result.step} ({FINAL_MODEL_FILE})"
        )
        print(
            f"  cost: {result.cost} oracle calls, {result.step} steps, "
            f"{result.wall_time:.0f} s; status: {result.status} ({result.message})"
        )
        print(
            f"  results in {run_dir} (report.html, reconstructions.png, plots/, metrics.jsonl, "
            f"{MODEL_FILE}, {FINAL_MODEL_FILE})"
        )
        print(f"  apply it to your images: bilevel reconstruct {run_dir} IMAGE ...")
    return 0 if result.ok else 1


def read_job_record(run_dir: str | Path) -> dict[str, Any]:
    """The options stored in ``run_dir/job.json`` (a :class:`BilevelError` if damaged)."""
    data = read_json(Path(run_dir) / "job.json", "the run's option record")
    if not isinstance(data, dict):
        raise BilevelError(f"{Path(run_dir) / 'job.json'} is damaged (not a JSON object)")
    return data


def _tensorboard(run_dir: Path) -> TensorBoardLog:
    """The run's TensorBoard log; a missing ``tensorboard`` package is a usage error."""
    try:
        return TensorBoardLog(run_dir)
    except ImportError as exc:
        raise BilevelError(f"--tensorboard: {exc}") from None


def _write_figures(
    config: ImagingConfig,
    run_dir: Path,
    summary: dict[str, Any],
    result: RunResult,
    regulariser: Regulariser,
    eval_tol: float,
    images: dict[str, Tensor],
) -> None:
    """``reconstructions.png`` (titled columns, PSNR per image), the test-PSNR and tolerance
    plots and ``report.html``; a warning instead when matplotlib is missing. ``images`` holds
    the test crops: clean, measurement, tv, learned (the selected θ) and final (the last θ,
    shown in its own column when it is not the learned one)."""
    test = summary["test"]
    learned, final = test["learned"], test["final"]
    title = REGULARISER_TITLES[config.regulariser]
    selected = learned["step"] != final["step"]
    columns = [
        (measurement_title(config.job), images["measurement"]),
        (f"TV (λ = {test['tv']['strength']:g})", images["tv"]),
        (
            f"learned {title}: θ of step {learned['step']}\n"
            + ("(best validation PSNR)" if selected else "(final θ)"),
            images["learned"],
        ),
    ]
    if selected:
        columns.append((f"{title}, final θ (step {final['step']})", images["final"]))
    try:
        grid = reconstruction_figure(images["clean"], columns)
        with atomic_output(run_dir / "reconstructions.png") as tmp:
            grid.savefig(tmp, dpi=100, format="png")
        records = result.records
        write_run_figures(
            run_dir,
            records,
            final_record(result),
            test["tv"]["psnr"],
            test["tv"]["strength"],
            selected=(learned["step"], learned["psnr"], summary["best"]["val_psnr"])
            if selected
            else None,
        )
        write_report(
            run_dir,
            config,
            summary,
            records,
            regulariser,
            run_dir / "reconstructions.png",
            eval_tol,
        )
    except ImportError as exc:
        warnings.warn(f"no figures or report.html: {exc}", RuntimeWarning, stacklevel=2)
