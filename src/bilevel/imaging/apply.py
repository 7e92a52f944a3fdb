"""``bilevel reconstruct``: apply the regulariser learned by an imaging run to new images.

The run directory of a finished ``bilevel denoise | deblur | inpaint`` run holds ``job.json``
(the options that define the model), ``model.pt`` (the learned θ: that of the best validation
PSNR) and ``model_final.pt`` (the last θ; ``--final``); a run that was interrupted, or is still
running, is refused.
For each image this solves the lower level of that run,

    x̂ = argmin_x ½‖A x − y‖² + R_θ(x) + γ/2 ‖x‖²,

with the run's forward operator A (identity, or the same Gaussian blur; for inpainting the mask
given by ``--mask``), by L-BFGS until the root mean square of ∇ₓh over the pixels is at most
``--tol``, and writes x̂ as a PNG. A denoising solve starts from y smoothed by a Gaussian of
one pixel (a cheap denoiser, several times closer to x̂ than y: about 10 % fewer gradients),
an inpainting solve from the observed pixels spread into the missing ones (normalised
convolution, :func:`filled_start`: about half the gradients of a start at Aᵀy), others from
Aᵀy. With a ridge regulariser (the shipped models, Fields of Experts) L-BFGS is preconditioned
by the inverse of a Fourier model of ∇²h (:mod:`bilevel.imaging.preconditioner`): half the
gradients or fewer for denoising with the shipped models, a third for deblurring.
The default tolerance is 2·10⁻⁴ for denoising and 3·10⁻⁵ with a blur or a mask, where the
curvature of the data term is only γ in some directions. Denoising with it ended within
0.003 dB of the converged PSNR on the images measured for learned FoE runs
(``docs/benchmarks.md``), within 0.001 dB for the shipped ``crr8-sigma25-bundled`` on four
BSDS300 test images and within 0.006 dB for every shipped model on a smooth sky crop of the
camera (smooth, high-PSNR images are the demanding ones; ``tests/test_pretrained.py`` holds
0.01 dB); deblurring and inpainting within 0.004 dB on four BSDS300 test images
(``docs/benchmarks_imaging_throughput.md``).
‖x − x̂‖ ≤ ‖∇ₓh‖/μ is the certified bound; the PSNR gap it allows is larger than the gaps
observed. The image is taken as the measurement y, or, with ``--add-noise``, as a
clean image that is first degraded as in training (y = A x + σ ε with the run's σ), so that
PSNR and SSIM of y and of x̂ can be reported.
``--model NAME`` uses a shipped pretrained denoising model (``bilevel models``) in place of a
run directory; ``--json`` prints per-image ``file``, ``psnr``, ``ssim``, ``degraded_psnr`` and
their ``mean``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bilevel.config import config_from_dict
from bilevel.imaging.config import TASKS, ImagingConfig, ReconstructConfig, job_config
from bilevel.imaging.data import load_image, save_image
from bilevel.imaging.metrics import SSIM_WINDOW, psnr, ssim
from bilevel.imaging.operators import Identity, InpaintingMask, LinearOperator
from bilevel.imaging.pretrained_models import model_info, pretrained
from bilevel.imaging.regularisers import Regulariser
from bilevel.imaging.ridge import retain_freed_memory
from bilevel.imaging.tasks import reconstruct, reconstruction_problem
from bilevel.problem import BilevelError, BilevelProblem
from bilevel.runs.rundir import RESULT_NAME, dumps_json, read_json

DENOISING_TOL = 2e-4
"""Default RMS gradient tolerance of a denoising solve (curvature ≥ 1)."""
OPERATOR_TOL = 3e-5
"""Default RMS gradient tolerance with a blur or a mask, where the data term's curvature is
weak (γ where A has a kernel): at 2·10⁻⁴ a full-size inpainting solve ended 0.1 dB and a
deblurring solve 0.05 dB from the converged PSNR; at 5·10⁻⁵ a smooth image (3096) still
0.013 dB, at 3·10⁻⁵ within 0.004 dB."""


def _check_finished(run_dir: Path) -> None:
    """Refuse a run that is running or was interrupted (``result.json`` says so)."""
    path = run_dir / RESULT_NAME
    if not path.is_file():
        raise BilevelError(
            f"{run_dir} holds no finished imaging run (no {RESULT_NAME}: the run has not "
            "ended); finish it with its command and --resume"
        )
    result = read_json(path, "the run's result")
    status = result.get("status") if isinstance(result, dict) else None
    if status in ("running", "interrupted") or status is None:
        state = "was interrupted" if status == "interrupted" else "has not finished"
        raise BilevelError(
            f"the run in {run_dir} {state}, so its model is not final; resume it with its "
            "command and --resume, then reconstruct"
        )


def load_learned(run_dir: str | Path, final: bool = False) -> tuple[Regulariser, ImagingConfig]:
    """The regulariser learned by a finished imaging run (θ from ``model.pt``, the
    validation-selected θ, or with ``final`` the last θ from ``model_final.pt``) and the run's
    configuration (``job.json``: task, regulariser, filters, dtype, σ, blur, γ, ...).

    Raises:
        BilevelError: no finished run in ``run_dir`` (missing, interrupted or still running),
            damaged files, or files that do not fit each other.
    """
    from bilevel.imaging.job import (  # the training stack: not needed for --model
        FINAL_MODEL_FILE,
        MODEL_FILE,
        make_regulariser,
        read_job_record,
    )

    run_dir = Path(run_dir)
    name = FINAL_MODEL_FILE if final else MODEL_FILE
    job_file, model_file = run_dir / "job.json", run_dir / name
    if not job_file.is_file() or not (run_dir / MODEL_FILE).is_file():
        raise BilevelError(
            f"{run_dir} holds no finished imaging run (job.json and {MODEL_FILE} are written "
            "when bilevel denoise / deblur / inpaint ends)"
        )
    _check_finished(run_dir)
    if not model_file.is_file():
        raise BilevelError(f"{run_dir} has no {name} (a run of an earlier version)")
    options = read_job_record(run_dir)
    missing = [k for k in ("job", "regulariser", "dtype") if k not in options]
    if missing:
        raise BilevelError(f"{job_file}: missing entries {missing}")
    task = options.pop("job")
    if task not in TASKS:
        raise BilevelError(f"{job_file}: job {task!r} is not denoise, deblur or inpaint")
    options.pop("non_finite", None)
    config = config_from_dict(TASKS[task], options, str(job_file))
    channels = 3 if config.color else 1
    try:  # θ loaded below
        regulariser = make_regulariser(config, channels).to(getattr(torch, config.dtype))
    except (TypeError, ValueError) as err:
        raise BilevelError(f"{job_file} does not describe a model: {err}") from None
    try:
        state = torch.load(model_file, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or foreign file: torch raises many kinds
        raise BilevelError(
            f"{model_file} is damaged or not a model ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''})"
        ) from None
    if not isinstance(state, dict):
        raise BilevelError(f"{model_file} is not a model state")
    prefix = "regulariser."
    learned = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        regulariser.load_state_dict(learned)
    except RuntimeError as err:
        raise BilevelError(f"{model_file} does not fit the model of {job_file}: {err}") from None
    return regulariser, config


def learned_problem(
    regulariser: Regulariser, config: ImagingConfig, operator: LinearOperator | None = None
) -> BilevelProblem:
    """The run's reconstruction problem with ``regulariser`` (``config``: the run's
    configuration); ``operator`` replaces the run's forward operator (required for
    inpainting: its training mask fits the training crops)."""
    dtype = getattr(torch, config.dtype)
    if operator is None:
        if config.job == "inpaint":
            raise BilevelError("an inpainting model needs the mask of each image (--mask FILE)")
        if config.job == "denoise":  # make_operator's (A, γ) without the training stack
            operator, gamma = Identity(), 0.0
        else:
            from bilevel.imaging.job import make_operator

            operator, gamma = make_operator(config, dtype)
    else:
        gamma = float(getattr(config, "gamma", 0.0))
    return reconstruction_problem(regulariser, operator.to(dtype=dtype), gamma=gamma)


def _mask(path: str, like: Tensor) -> InpaintingMask:
    """The inpainting operator of the mask image ``path`` (non-zero: observed)."""
    m = load_image(path, color=False, dtype=like.dtype)
    if tuple(m.shape[1:]) != tuple(like.shape[1:]):
        raise BilevelError(
            f"mask {path!r} is {m.shape[2]}×{m.shape[1]} pixels, the image "
            f"{like.shape[2]}×{like.shape[1]}"
        )
    return InpaintingMask((m > 0.5).to(like.dtype).unsqueeze(0))


def smoothed_start(y: Tensor, sigma: float = 1.0) -> Tensor:
    """y convolved with a Gaussian of ``sigma`` pixels (separable, radius 3σ, reflected at the
    borders): the start of a denoising solve."""
    radius = min(math.ceil(3 * sigma), min(y.shape[-2:]) - 1)
    if radius < 1:
        return y.clone()
    offsets = torch.arange(-radius, radius + 1, dtype=y.dtype, device=y.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).repeat(y.shape[1], 1, 1, 1)  # one per channel
    z = torch.nn.functional.pad(y, (radius,) * 4, mode="reflect")
    z = torch.nn.functional.conv2d(z, kernel.view(-1, 1, 1, 2 * radius + 1), groups=y.shape[1])
    return torch.nn.functional.conv2d(z, kernel.view(-1, 1, 2 * radius + 1, 1), groups=y.shape[1])


def filled_start(y: Tensor, mask: Tensor, sigma: float = 1.0) -> Tensor:
    """The observed pixels of y (m ⊙ y, mask m ∈ [0, 1]) spread into the missing ones by
    normalised convolution, G_σ * (m ⊙ y) / G_σ * m with the Gaussian of :func:`smoothed_start`
    (observed pixels smoothed a little too): the start of an inpainting solve. Where no
    observed pixel lies within 3σ, the mean of the observed values."""
    m = mask.to(y).expand_as(y)
    my = m * y
    weight = smoothed_start(m, sigma)
    spread = smoothed_start(my, sigma) / weight.clamp_min(1e-6)
    count = m.sum(dim=(2, 3), keepdim=True).clamp_min(1e-6)
    observed = my.sum(dim=(2, 3), keepdim=True) / count
    return torch.where(weight > 1e-6, spread, observed.expand_as(y))


def reconstruction_start(op, y: Tensor) -> Tensor:
    """The start of a ``bilevel reconstruct`` solve from measurements y: y smoothed by one
    pixel for denoising (:func:`smoothed_start`), the filled observed pixels for a stored
    inpainting mask (:func:`filled_start`), else Aᵀy (the library's default,
    ``LinearOperator.initial_image``, is y itself or Aᵀy; the imaging jobs keep it)."""
    if isinstance(op, Identity):
        return smoothed_start(y)
    if isinstance(op, InpaintingMask) and op.mask is not None:
        return filled_start(y, op.mask)
    return op.adjoint(y)


def degrade(op, x: Tensor, sigma: float, seed: int) -> Tensor:
    """y = A x + σ/255·ε of ``--add-noise``: ε drawn in float32 from
    ``torch.Generator().manual_seed(seed)``, then cast to x's dtype."""
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    with torch.no_grad():
        return op(x) + sigma / 255.0 * noise.to(device=x.device, dtype=x.dtype)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _scores(x: Tensor, clean: Tensor) -> dict[str, float]:
    """PSNR (dB) and, when the image is large enough, SSIM of x against ``clean``."""
    out = {"psnr": float(psnr(x.clamp(0, 1), clean)[0])}
    if min(x.shape[2:]) >= SSIM_WINDOW:
        out["ssim"] = float(ssim(x.clamp(0, 1), clean)[0])
    return out


def run(config: ReconstructConfig, *, json: bool = False) -> int:
    """Reconstruct every image of ``config.images``; print one line each (or with ``json``
    one JSON object); return the exit status."""
    cfg = dataclasses.replace(config, images=list(config.images))
    if cfg.tol is not None and not cfg.tol > 0:
        raise BilevelError(f"--tol must be positive, got {cfg.tol}")
    if cfg.max_iter < 1:
        raise BilevelError(f"--max-iter must be positive, got {cfg.max_iter}")
    if cfg.model:  # the positionals are all images
        cfg.images = ([cfg.run_dir] if cfg.run_dir else []) + list(cfg.images)
        regulariser = pretrained(cfg.model)
        info = model_info(cfg.model)
        options = job_config("denoise", sigma=float(info["sigma"]), dtype="float32")
        run_dir = Path(cfg.out or f"reconstructed-{cfg.model}")
    else:
        if not cfg.run_dir:
            raise BilevelError("give a run directory or --model NAME")
        run_dir = Path(cfg.run_dir)
        regulariser, options = load_learned(run_dir, final=cfg.final)
    if not cfg.images:
        raise BilevelError("no images given")
    if cfg.sigma is not None:
        if not (math.isfinite(cfg.sigma) and 0 < cfg.sigma < 255):
            raise BilevelError(f"--sigma must be in (0, 255), got {cfg.sigma}")
        options = dataclasses.replace(options, sigma=cfg.sigma)
        if hasattr(regulariser, "set_noise_level"):
            regulariser.set_noise_level(cfg.sigma / 255.0)
    inpaint = options.job == "inpaint"
    if inpaint and not cfg.mask:
        raise BilevelError("an inpainting model needs the mask of the images (--mask FILE)")
    if cfg.mask and not inpaint:
        raise BilevelError(f"--mask applies to inpainting runs; {run_dir} is a {options.job} run")
    stems = [Path(name).stem for name in cfg.images]
    clash = next((s for s in stems if stems.count(s) > 1), None)
    if clash is not None:
        raise BilevelError(f"two images are named {clash!r}: their outputs would overwrite")
    dtype = getattr(torch, options.dtype)
    images = []
    for name in cfg.images:  # read them all first: a bad file fails before any work
        images.append(load_image(name, color=options.color, dtype=dtype))
    if inpaint:  # check every mask before any work too
        for image in images:
            _mask(cfg.mask, image)
    out_dir = Path(cfg.out) if cfg.out else run_dir if cfg.model else run_dir / "reconstructed"
    if out_dir.exists() and not out_dir.is_dir():
        raise BilevelError(f"--out {out_dir} is a file, not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BilevelError(f"cannot create the output folder {out_dir}: {err.strerror}") from None
    retain_freed_memory()  # full-size responses: reuse freed pages (see its docstring)
    results = []
    problem = None if inpaint else learned_problem(regulariser, options)
    for k, (name, image) in enumerate(zip(cfg.images, images)):
        if inpaint:  # each image brings its own mask
            problem = learned_problem(regulariser, options, _mask(cfg.mask, image))
        op = problem.theta["operator"]
        x = image.unsqueeze(0)
        y = x
        if cfg.add_noise:
            y = degrade(op, x, options.sigma, cfg.seed + k)
        start, cpu_start = time.perf_counter(), time.process_time()
        rms = cfg.tol or (DENOISING_TOL if isinstance(op, Identity) else OPERATOR_TOL)
        tol = rms * x.numel() ** 0.5  # an RMS tolerance: the same for every image size
        x0 = reconstruction_start(op, y)
        x_hat = reconstruct(
            problem, (y, y), x0=x0, tol=tol, max_iter=cfg.max_iter, precondition=True
        )
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        stem = Path(name).stem
        record: dict[str, Any] = {
            "image": name,
            "output": str(out_dir / f"{stem}_reconstructed.png"),
            "seconds": seconds,
            "cpu_seconds": cpu_seconds,
        }
        save_image(x_hat[0], record["output"])
        if cfg.add_noise:
            record["degraded_output"] = str(out_dir / f"{stem}_degraded.png")
            save_image(op.adjoint(y)[0], record["degraded_output"])
            record["degraded"] = _scores(op.adjoint(y), x)
            record["reconstructed"] = _scores(x_hat, x)
        record.update(  # the flat keys of the JSON output (None without a clean reference)
            file=name,
            psnr=record.get("reconstructed", {}).get("psnr"),
            ssim=record.get("reconstructed", {}).get("ssim"),
            degraded_psnr=record.get("degraded", {}).get("psnr"),
        )
        results.append(record)
        if not json:
            line = f"  {name} -> {record['output']} ({seconds:.1f} s)"
            if cfg.add_noise:
                d, r = record["degraded"], record["reconstructed"]
                line += f"; PSNR {d['psnr']:.2f} dB degraded, {r['psnr']:.2f} dB reconstructed"
            print(line)
    if json:
        keys = ("psnr", "ssim", "degraded_psnr")
        mean = {
            k: (None if any(r[k] is None for r in results) else _mean([r[k] for r in results]))
            for k in keys
        }
        head = {"model": cfg.model} if cfg.model else {"run_dir": str(run_dir)}
        print(dumps_json({**head, "task": options.job, "images": results, "mean": mean}))
    return 0
