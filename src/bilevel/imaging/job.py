"""`bilevel denoise | deblur | inpaint`: learn an image regulariser by bilevel learning.

The job builds training and test sets of degraded crops (noise frozen per sample), learns the
regulariser's parameters θ with (by default) Adam-preconditioned ISGD on

    min_θ mean_i ½‖x̂_i(θ) − x_i‖²,   x̂_i(θ) = argmin_x ½‖A x − y_i‖² + R_θ(x) (+ γ/2‖x‖²),

compares the learned regulariser on the test set with the degraded input and with total
variation tuned by grid search on the training set, and writes everything to a run
directory: ``config.json``, ``metrics.jsonl``, checkpoints, ``plots/``, ``reconstructions.png``
and ``summary.json``.  Interrupting (Ctrl-C) writes a checkpoint; ``--resume`` continues.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bilevel.hypergrad import Implicit
from bilevel.imaging.data import DegradedImages, bundled_images, load_image_folder, random_crops
from bilevel.imaging.metrics import SSIM_WINDOW, psnr, ssim
from bilevel.imaging.operators import (
    Convolution,
    Identity,
    InpaintingMask,
    LinearOperator,
    gaussian_kernel,
    random_mask,
)
from bilevel.imaging.regularisers import (
    ConvexRidge,
    ConvexRidgeNetwork,
    FieldsOfExperts,
    InputConvexNetwork,
    Regulariser,
    SmoothedTV,
    WeaklyConvexRidge,
    ridge_layers,
)
from bilevel.imaging.tasks import (
    GridSearchResult,
    grid_search_tv,
    reconstruct,
    reconstruction_problem,
)
from bilevel.linear import CG
from bilevel.lower import Nesterov
from bilevel.methods import ISGD, MAID, Budget, RunResult, with_initial
from bilevel.problem import BilevelError, BilevelProblem
from bilevel.runs import check_job_record

REGULARISERS = ("foe", "crr", "wcrr", "ridge", "icnn", "tv")
#: Default --filter-size per regulariser (crr/wcrr: the composite filters' support).
FILTER_SIZES = {"crr": 13, "wcrr": 13}
METHODS = ("adam-isgd", "isgd", "maid")
TV_GRID = (0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3)
#: Tolerance on each test image's ‖∇ₓh‖ for the reported reconstructions. In float32 the
#: gradient of a learned FoE with smoothings of a few 1e-3 stalls at about 1.6e-3 from
#: roundoff (10 000 accelerated steps did no better than 2000), hence the looser value.
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


def add_arguments(parser: argparse.ArgumentParser, task: str) -> None:
    """Options of the imaging jobs (``task`` is denoise, deblur or inpaint)."""
    a = parser.add_argument
    a(
        "--regulariser",
        choices=REGULARISERS,
        default="foe",
        help="foe: Fields of Experts (convex potential); crr: convex ridge network (CRR-NN); "
        "wcrr: weakly convex ridge network; ridge: convex ridge; icnn: input-convex network; "
        "tv: smoothed total variation (default: foe)",
    )
    a("--filters", type=int, default=8, help="filters of foe/crr/wcrr/ridge (default: 8)")
    a(
        "--filter-size",
        type=int,
        default=None,
        help="filter size of foe/ridge (default: 5), composite filter support of crr/wcrr "
        "(default: 13, three layers of 5×5)",
    )
    a(
        "--method",
        choices=METHODS,
        default="adam-isgd",
        help="upper-level method (default: adam-isgd)",
    )
    a(
        "--step",
        default=None,
        help="step schedule, e.g. poly:5e-2,0.5 (default for adam-isgd: poly:3e-2,0.25 with "
        "foe, poly:2e-3,0.5 with icnn, else poly:5e-2,0.5; for isgd: poly:1e-1,0.5 with foe, "
        "else poly:1e-3,0.5; MAID adapts its own)",
    )
    a(
        "--accuracy",
        default="poly:1e-1,0.5",
        help="accuracy schedule ε_k = δ_k: absolute tolerance on each image's ‖∇ₓh‖ and adjoint "
        "residual (default: poly:1e-1,0.5)",
    )
    a("--batch-size", type=int, default=8, help="images per ISGD step (default: 8)")
    a(
        "--data",
        default="bundled",
        help="'bundled' (scikit-image images) or a folder with train/ and test/ image folders",
    )
    a("--color", action="store_true", help="colour images (default: grayscale)")
    a("--crop", type=int, default=32, help="crop size in pixels (default: 32)")
    a("--train-size", type=int, default=32, help="training crops (default: 32)")
    a("--test-size", type=int, default=16, help="test crops (default: 16)")
    a(
        "--sigma",
        type=float,
        default=25.0 if task == "denoise" else 5.0,
        help="noise standard deviation on the 0-255 scale",
    )
    a(
        "--budget",
        type=int,
        default=150_000,
        help="oracle calls (lower-level gradients + Hessian-vector products; default 150000)",
    )
    a("--time", type=float, default=None, help="wall-time budget in seconds")
    a("--eval-every", type=int, default=50, help="steps between test evaluations (default: 50)")
    if task == "deblur":
        a("--blur", type=float, default=1.5, help="Gaussian blur σ in pixels (default: 1.5)")
        a("--kernel-size", type=int, default=7, help="blur kernel size (default: 7)")
    if task == "inpaint":
        a("--keep", type=float, default=0.7, help="fraction of pixels observed (default: 0.7)")
    if task in ("deblur", "inpaint"):
        a(
            "--gamma",
            type=float,
            default=1e-2,
            help="γ of the γ/2‖x‖² term that keeps the lower level strongly convex (μ = γ)",
        )
    a("--device", default="cpu", help="cpu or cuda (default: cpu)")
    a(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch (default: 1, fastest for small crops)",
    )
    a("--dtype", choices=("float32", "float64"), default="float32")
    a("--seed", type=int, default=0)
    a("--run-dir", default=None, help="run directory (default: runs/<task>-<timestamp>)")
    a("--resume", action="store_true", help="continue the run in --run-dir")
    a("--json", action="store_true", help="print the summary as one JSON object on stdout")
    a("--no-progress", action="store_true", help="no progress bar")


def job_arguments(task: str, **options: Any) -> argparse.Namespace:
    """The options of ``bilevel <task>`` at their defaults, overridden by ``options`` (given by
    attribute name, e.g. ``train_size=64``): for scripts that build runs as the job does."""
    if task not in ("denoise", "deblur", "inpaint"):
        raise BilevelError(f"unknown imaging task {task!r}; choose denoise, deblur or inpaint")
    parser = argparse.ArgumentParser()
    add_arguments(parser, task)
    args = parser.parse_args([])
    unknown = sorted(set(options) - set(vars(args)))
    if unknown:
        raise BilevelError(f"unknown option(s) of bilevel {task}: {', '.join(unknown)}")
    vars(args).update(options, job=task)
    return args


@dataclass
class Setup:
    """Everything a run needs, built from the options."""

    problem: BilevelProblem
    train: DegradedImages
    test: DegradedImages
    operator: LinearOperator
    gamma: float


def make_regulariser(args: argparse.Namespace, channels: int) -> Regulariser:
    """The regulariser of ``args.regulariser`` at its initial θ, for ``channels`` channels."""
    size = args.filter_size or FILTER_SIZES.get(args.regulariser, 5)
    if args.regulariser in ("crr", "wcrr"):
        layers, kernel = ridge_layers(size)
        model = ConvexRidgeNetwork if args.regulariser == "crr" else WeaklyConvexRidge
        sigma = float(args.sigma) / 255.0
        return model(args.filters, channels, layers, kernel, noise_level=sigma)
    if args.regulariser == "foe":
        return FieldsOfExperts(
            args.filters,
            size,
            init="directional",
            channels=channels,
            smoothing=FOE_SMOOTHING,
            learn_smoothing=True,
            seed=args.seed,
        )
    if args.regulariser == "ridge":
        return ConvexRidge(args.filters, size, channels=channels, seed=args.seed)
    if args.regulariser == "icnn":
        return InputConvexNetwork(channels=channels, seed=args.seed)
    return SmoothedTV(strength=0.02)


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
def calibrate_ridge_strength(regulariser: ConvexRidgeNetwork, tv_strength: float) -> None:
    """Start a (weakly) convex ridge network at smoothed isotropic TV of the grid-tuned
    strength λ_TV: α(σ) = λ_TV π/(2K) at the task's σ (see :class:`ConvexRidgeNetwork`)."""
    k = regulariser.layers[-1].shape[0]
    alpha = float(regulariser.scalings()[0])
    regulariser.rescale_(tv_strength * math.pi / (2 * k) / alpha)


def make_operator(args: argparse.Namespace, dtype: torch.dtype) -> tuple[LinearOperator, float]:
    """(A, γ) of the task: the identity and 0 (denoise), the Gaussian blur of ``--blur`` and
    ``--kernel-size`` (deblur) or a random mask of the crop size (inpaint), with ``--gamma``."""
    if args.job == "deblur":
        kernel = gaussian_kernel(args.kernel_size, args.blur, dtype=dtype)
        return Convolution(kernel), args.gamma
    if args.job == "inpaint":
        if not 0.0 < args.keep <= 1.0:
            raise BilevelError(f"--keep must be in (0, 1], got {args.keep}")
        mask = random_mask((args.crop, args.crop), args.keep, generator=args.seed, dtype=dtype)
        return InpaintingMask(mask), args.gamma
    return Identity(), 0.0


def _images(args: argparse.Namespace, split: str, dtype: torch.dtype) -> list[Tensor]:
    if args.data == "bundled":
        return bundled_images(split, color=args.color, dtype=dtype)
    folder = Path(args.data) / split
    if not folder.is_dir():
        raise BilevelError(f"--data {args.data}: expected a folder with {split}/ inside")
    return load_image_folder(folder, color=args.color, dtype=dtype)


def build(args: argparse.Namespace) -> Setup:
    """Data, operator, regulariser and bilevel problem for the options ``args``."""
    for name in ("crop", "train_size", "test_size", "batch_size", "budget", "eval_every"):
        if getattr(args, name) < 1:
            raise BilevelError(f"--{name.replace('_', '-')} must be positive")
    if args.sigma < 0 or not math.isfinite(args.sigma):
        raise BilevelError(f"--sigma must be a finite non-negative number, got {args.sigma}")
    if args.crop < SSIM_WINDOW:
        raise BilevelError(
            f"--crop must be at least {SSIM_WINDOW} pixels (the SSIM window), got {args.crop}"
        )
    if args.filter_size is None:
        args.filter_size = FILTER_SIZES.get(args.regulariser, 5)
    if args.regulariser in ("foe", "ridge", "crr", "wcrr") and args.crop < args.filter_size:
        raise BilevelError(
            f"--crop {args.crop} is smaller than --filter-size {args.filter_size}: the "
            "convolutional regulariser needs crops at least as large as its filters"
        )
    if args.job == "deblur" and not (math.isfinite(args.blur) and args.blur > 0):
        raise BilevelError(f"--blur must be a finite positive σ in pixels, got {args.blur}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise BilevelError("--device cuda requested but CUDA is not available")
    dtype = getattr(torch, args.dtype)
    operator, gamma = make_operator(args, dtype)
    sigma = args.sigma / 255.0
    train_clean = random_crops(
        _images(args, "train", dtype), args.crop, args.train_size, generator=args.seed
    )
    test_clean = random_crops(
        _images(args, "test", dtype), args.crop, args.test_size, generator=args.seed + 1
    )
    train = DegradedImages(train_clean, operator, sigma=sigma, seed=args.seed + 2)
    test = DegradedImages(test_clean, operator, sigma=sigma, seed=args.seed + 3)
    train, test = train.to(args.device), test.to(args.device)
    regulariser = make_regulariser(args, train_clean.shape[1]).to(args.device, dtype)
    operator = operator.to(args.device, dtype)
    problem = reconstruction_problem(regulariser, operator, gamma=gamma)
    return Setup(problem, train, test, operator, gamma)


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


def tv_reconstructions(setup: Setup, strength: float) -> Tensor:
    """Test reconstructions by smoothed TV of strength λ, to ‖∇ₓh‖ ≤ :data:`EVAL_TOL`."""
    y, x_true = setup.test.batch()[:2]
    problem = reconstruction_problem(
        SmoothedTV(strength=strength).to(x_true.device, x_true.dtype),
        setup.operator,
        gamma=setup.gamma,
    )
    return reconstruct(problem, (y, x_true), tol=EVAL_TOL[x_true.dtype])


def make_method(args: argparse.Namespace) -> ISGD | MAID:
    """The upper-level method of the options: Adam-ISGD, ISGD or MAID, with warm-started
    Nesterov lower solves and CG adjoints."""
    estimator = Implicit(
        CG(max_iter=500), lower_solver=Nesterov(max_iter=5000), compute_bound=args.method == "maid"
    )
    if args.method == "maid":
        return MAID(estimator=estimator, lower_tol=1e-1, step=1e-2)
    default_step = DEFAULT_STEPS[args.method].get(args.regulariser, DEFAULT_STEPS[args.method][""])
    return ISGD(
        step=args.step or default_step,
        accuracy=args.accuracy,
        batch_size=min(args.batch_size, args.train_size),
        optimizer="adam" if args.method == "adam-isgd" else "sgd",
        estimator=estimator,
        seed=args.seed,
    )


def test_evaluation(setup: Setup) -> Callable[[Any, int], dict[str, float]]:
    """The ``evaluate`` callback of a run: mean test PSNR (dB) of the current regulariser,
    reconstructions to ‖∇ₓh‖ ≤ :data:`EVAL_TOL`, warm-started across calls."""
    batch = setup.test.batch()
    tol = EVAL_TOL[batch[1].dtype]
    state: dict[str, Tensor] = {}

    def evaluate(theta: Any, step: int) -> dict[str, float]:
        x = reconstruct(setup.problem, batch, x0=state.get("x"), tol=tol)
        state["x"] = x
        return {"test_psnr": float(psnr(x.clamp(0, 1), batch[1]).mean())}

    return evaluate


def _scores(x: Tensor, clean: Tensor) -> dict[str, float]:
    x = x.clamp(0, 1)
    return {"psnr": float(psnr(x, clean).mean()), "ssim": float(ssim(x, clean).mean())}


def _save_grid(path: Path, rows: list[Tensor], count: int = 4) -> None:
    """PNG grid: one row per image, columns clean / degraded / TV / learned."""
    from PIL import Image

    cols = [r[:count].clamp(0, 1).cpu() for r in rows]
    n, c, h, w = cols[0].shape
    pad = 2
    canvas = torch.ones(c, n * (h + pad), len(cols) * (w + pad))
    for j, col in enumerate(cols):
        for i in range(n):
            canvas[:, i * (h + pad) : i * (h + pad) + h, j * (w + pad) : j * (w + pad) + w] = col[i]
    arr = (canvas.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    Image.fromarray(arr[..., 0] if c == 1 else arr).resize(
        (arr.shape[1] * 3, arr.shape[0] * 3), Image.NEAREST
    ).save(path)


#: The options that define a learned model (everything ``bilevel reconstruct`` needs besides
#: θ), stored in the run directory's ``job.json``.
MODEL_OPTIONS = (
    "job",
    "regulariser",
    "filters",
    "filter_size",
    "color",
    "dtype",
    "sigma",
    "blur",
    "kernel_size",
    "keep",
    "gamma",
)
#: Options that must also match for ``--resume`` to continue a run (the budget may change).
TRAINING_OPTIONS = (
    "data",
    "crop",
    "train_size",
    "test_size",
    "seed",
    "method",
    "step",
    "accuracy",
    "batch_size",
)
#: θ of the finished run (``problem.theta.state_dict()``), in the run directory.
MODEL_FILE = "model.pt"


def job_record(args: argparse.Namespace) -> dict[str, Any]:
    """The entries of :data:`MODEL_OPTIONS` and :data:`TRAINING_OPTIONS` that ``args`` has
    (the run directory's ``job.json``)."""
    keys = MODEL_OPTIONS + TRAINING_OPTIONS
    return {k: getattr(args, k) for k in keys if hasattr(args, k)}


def _write_job_record(run_dir: Path, args: argparse.Namespace) -> None:
    """Write ``job.json``; on ``--resume``, first refuse options that differ from it."""
    record = job_record(args)
    if args.resume:
        check_job_record(run_dir, record)
    elif (run_dir / "config.json").exists():
        return  # another run lives there: the run loop refuses it, its job.json stays intact
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "job.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def run(args: argparse.Namespace) -> int:
    """Run the imaging job described by ``args``; print the summary."""
    torch.manual_seed(args.seed)
    if args.threads < 1:
        raise BilevelError(f"--threads must be positive, got {args.threads}")
    torch.set_num_threads(args.threads)
    setup = build(args)
    run_dir = Path(args.run_dir or f"runs/{args.job}-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.resume and args.run_dir is None:
        raise BilevelError("--resume needs --run-dir")
    _write_job_record(run_dir, args)
    log = sys.stderr if args.json else sys.stdout
    y_test, x_test = setup.test.batch()[:2]

    print(
        f"bilevel {args.job}: {args.regulariser} regulariser, {args.method}, "
        f"{len(setup.train)} training / {len(setup.test)} test crops of {args.crop}px, "
        f"σ = {args.sigma:g}/255, run directory {run_dir}",
        file=log,
    )
    start = time.perf_counter()
    tv = tune_tv(setup)
    x_tv = tv_reconstructions(setup, tv.strength)
    eval_tol = EVAL_TOL[x_test.dtype]
    print(f"  grid-tuned TV: λ = {tv.strength:g} (train PSNR {tv.psnr:.2f} dB)", file=log)

    regulariser = setup.problem.theta["regulariser"]
    if isinstance(regulariser, FieldsOfExperts) and not args.resume:
        calibrate_foe_weights(regulariser, tv.strength)
    if isinstance(regulariser, ConvexRidgeNetwork | WeaklyConvexRidge) and not args.resume:
        calibrate_ridge_strength(regulariser, tv.strength)
    samples = with_initial(setup.train, lambda b: b[0].clone())
    budget = Budget(oracle_calls=args.budget, wall_time=args.time)
    result: RunResult = make_method(args).run(
        setup.problem,
        samples,
        budget,
        run_dir=run_dir,
        resume=args.resume,
        evaluate=test_evaluation(setup),
        eval_every=args.eval_every,
        progress=not args.no_progress,
    )
    torch.save(setup.problem.theta.state_dict(), run_dir / MODEL_FILE)
    x_learned = reconstruct(setup.problem, (y_test, x_test), tol=eval_tol)
    y_show = setup.operator.adjoint(y_test) if args.job == "deblur" else y_test
    _save_grid(run_dir / "reconstructions.png", [x_test, y_show, x_tv, x_learned])
    summary = {
        "task": args.job,
        "regulariser": args.regulariser,
        "method": args.method,
        "status": result.status,
        "steps": result.step,
        "epochs": result.epoch,
        "oracle_calls": result.cost,
        "wall_time_s": round(time.perf_counter() - start, 2),
        "test": {
            "degraded": _scores(y_show, x_test),
            "tv": {**_scores(x_tv, x_test), "strength": tv.strength},
            "learned": _scores(x_learned, x_test),
        },
        "run_dir": str(run_dir),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if args.json:
        print(json.dumps(summary))
    else:
        t = summary["test"]
        print(f"\n  test PSNR / SSIM over {len(setup.test)} crops:")
        for name in ("degraded", "tv", "learned"):
            print(f"    {name:<9} {t[name]['psnr']:6.2f} dB   {t[name]['ssim']:.4f}")
        print(
            f"  cost: {result.cost} oracle calls, {result.step} steps, "
            f"{summary['wall_time_s']:.0f} s; status: {result.status} ({result.message})"
        )
        print(f"  results in {run_dir} (reconstructions.png, plots/, metrics.jsonl, model.pt)")
        print(f"  apply it to your images: bilevel reconstruct {run_dir} IMAGE ...")
    return 0 if result.ok else 1
