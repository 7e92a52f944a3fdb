"""Throughput of the imaging oracles against bare convolutions of the same shapes.

    python benchmarks/imaging_throughput.py [--repeats 11] [--threads 1] [--quick] [--clock C]
    python benchmarks/imaging_throughput.py --reconstruct [IMAGE ...] [--run RUN_DIR] [--keep P]
        [--tol T] [--cache DIR]

A ridge / Fields-of-Experts gradient ∇R(x) = Kᵀ φ'(K x) and a Hessian-vector product
∇²R(x) v = Kᵀ(φ''(K x) ⊙ K v) each need one correlation K (C → K channels) and one adjoint
(K → C channels). The baseline "bare convolutions" is that pair done with bare torch calls
and nothing else, the fastest of five variants per configuration and repeat statistic:
``F.conv2d`` of the padded image read channel-first followed by ``F.conv_transpose2d``
K → C, by a grouped transposed convolution and a sum over the K filters, or by the
correlation's input gradient ``aten.convolution_backward``; or ``F.conv2d`` of the image read
channels-last followed by a grouped transposed convolution, or by a depthwise convolution
with the flipped filters, and a sum over the filters (``sum``, or, depthwise only, a
matrix-vector product of its channels-last (pixels, K) rows with ones). The process keeps
freed memory (``retain_freed_memory``) unless ``--system-malloc``. For each configuration it times

* ``gradient``: ``torch.autograd.grad(R(x).sum(), x)`` with θ requiring gradients, as in a
  lower-level solve (the energy's value comes with it);
* ``HVP``: one ``torch.autograd.grad(g, x, v, retain_graph=True)`` through the gradient graph
  g = ∇R(x) built once with ``create_graph=True`` (what ``HessianOperator`` does);
* the same two through a plain autograd implementation of the same energy (double backward,
  ``F.conv_transpose2d`` adjoint), the library's code before the fused oracles.

``--reconstruct IMAGE...`` times ``bilevel reconstruct --model crr8-sigma25-bundled IMAGE
--add-noise`` instead (the shipped model, or with ``--run RUN_DIR`` a finished denoising,
deblurring or inpainting run, an inpainting run with a random mask per image keeping
``--keep`` of the pixels; default tolerance unless ``--tol``; one thread): the
solve's wall and CPU seconds as the command reports them (``seconds``, ``cpu_seconds``), the
gradient evaluations, the wall and CPU time of the whole command in a fresh process (imports
included), and the PSNR against that of the
converged solution (float64 L-BFGS to an RMS gradient of 1e-8, preconditioned where it
applies, cached in ``--cache``).
Without an IMAGE, skimage's camera resized to 481×321.

Fraction = time(bare convolutions) / time(oracle): the share of the oracle's time spent in the
convolutions it cannot avoid (1.0 = no overhead). Variants are interleaved within each repeat;
the medians over ``--repeats`` are reported, then the minima (the least disturbed repeat, a
better estimate on a machine shared with other jobs). ``--clock thread`` times with the CPU
time of the timing thread instead of wall time, which leaves out the time it waits for a core
while other jobs run (not the slowdown they cause through shared caches and memory).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from bilevel.imaging import ConvexRidgeNetwork, FieldsOfExperts, pretrained
from bilevel.imaging.regularisers import _spline_tables
from bilevel.imaging.ridge import channels_last, pad, retain_freed_memory


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=11, help="interleaved repeats (default 11)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--quick", action="store_true", help="3 repeats, for a smoke test")
    p.add_argument(
        "--clock",
        choices=("wall", "thread"),
        default="wall",
        help="wall time (default) or the CPU time of the timing thread, which leaves out the "
        "time it waits for a core on a machine shared with other jobs",
    )
    p.add_argument(
        "--reconstruct",
        nargs="*",
        metavar="IMAGE",
        help="time bilevel reconstruct on these grayscale images instead (none: the camera)",
    )
    p.add_argument("--tol", type=float, default=None, help="--reconstruct: the command's --tol")
    p.add_argument(
        "--run",
        default=None,
        help="--reconstruct: a finished imaging run (denoise, deblur, inpaint) instead of the "
        "shipped model",
    )
    p.add_argument(
        "--keep",
        type=float,
        default=0.7,
        help="--reconstruct of an inpainting run: the fraction of pixels of each image's random "
        "mask (seeded by the image's position; default 0.7)",
    )
    p.add_argument(
        "--cache", default="reconstruct-cache", help="--reconstruct: folder of converged solutions"
    )
    p.add_argument(
        "--system-malloc",
        action="store_true",
        help="keep glibc's default allocation policy (no retain_freed_memory)",
    )
    return p.parse_args(argv)


def plain_energy(model, x: torch.Tensor) -> torch.Tensor:
    """R(x) by plain autograd operations (FoE with smoothed-ℓ1 experts, spline ridge)."""
    filters = model.effective_filters().to(x.dtype)
    t = F.conv2d(pad(x, filters.shape[-1], model.boundary), filters)
    if isinstance(model, FieldsOfExperts):
        nu = model.smoothing.to(x.dtype)[:, None, None]
        phi = torch.sqrt(t * t + nu * nu) - nu
        return phi.sum(dim=(2, 3)) @ model.log_weights.exp().to(x.dtype)
    alpha, beta = model.scalings()
    curv = model.knot_curvatures(filters, alpha).to(x.dtype)
    d0, d1, d2 = _spline_tables(curv, model.knot_spacing)
    u = beta * t
    sign = torch.where(u >= 0, 1.0, -1.0).to(x.dtype).detach()
    a = u * sign
    j = torch.clamp(torch.floor(a.detach() / model.knot_spacing), 0, curv.shape[1]).long()
    r = a - j.to(x.dtype) * model.knot_spacing
    k = torch.arange(t.shape[1]).view(1, -1, 1, 1)
    psi = d0[k, j] + d1[k, j] * r + 0.5 * d2[k, j] * r * r
    return psi.sum(dim=(1, 2, 3)) / (beta * beta)


def configurations() -> list[tuple[str, object, tuple[int, ...], torch.dtype]]:
    """(name, regulariser, image batch shape, dtype)."""
    foe = FieldsOfExperts(8, 5, init="directional", learn_smoothing=True, smoothing=0.003)
    foe7 = FieldsOfExperts(16, 7, init="directional", learn_smoothing=True, smoothing=0.003)
    crr = pretrained("crr8-sigma25-bundled")
    crr_small = ConvexRidgeNetwork(8, layers=3, kernel_size=5)
    return [
        ("FoE 8×5², 8×32² (bilevel denoise)", foe, (8, 1, 32, 32), torch.float32),
        ("FoE 8×5², 8×64²", foe, (8, 1, 64, 64), torch.float32),
        ("FoE 16×7², 481×321", foe7, (1, 1, 481, 321), torch.float32),
        ("CRR 8×13², 8×32²", crr_small, (8, 1, 32, 32), torch.float32),
        ("CRR 8×13², 481×321 (bilevel reconstruct)", crr, (1, 1, 481, 321), torch.float32),
        ("FoE 8×5², 8×32², float64", foe, (8, 1, 32, 32), torch.float64),
    ]


#: The clocks of :func:`timer` (``--clock``): wall time or the timing thread's CPU time.
CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


def timer(
    fn: Callable[[], object], clock: Callable[[], float], min_time: float = 0.05
) -> Callable[[], float]:
    """A function returning the mean seconds of ``clock`` of one call over enough calls for
    min_time."""
    fn()
    start, calls = clock(), 0
    while clock() - start < min_time / 4:
        fn()
        calls += 1
    per = (clock() - start) / calls
    n = max(1, math.ceil(min_time / per))

    def run() -> float:
        t0 = clock()
        for _ in range(n):
            fn()
        return (clock() - t0) / n

    return run


def measure(
    model, shape: tuple[int, ...], dtype: torch.dtype, repeats: int, clock: Callable[[], float]
) -> dict[str, list[float]]:
    gen = torch.Generator().manual_seed(0)
    model = model.to(dtype)
    x = torch.rand(shape, generator=gen, dtype=dtype)
    v = torch.randn(shape, generator=gen, dtype=dtype)
    w = model.effective_filters().detach().to(dtype)
    k, s = w.shape[0], w.shape[-1]
    xp = pad(x, s, model.boundary)
    u = F.conv2d(xp, w)
    w_flipped = w.flip(-1, -2).contiguous()

    def bare_plain() -> None:
        F.conv_transpose2d(F.conv2d(pad(x, s, model.boundary), w), w)

    def bare_grouped() -> None:
        t = F.conv2d(pad(x, s, model.boundary), w)
        F.conv_transpose2d(t, w, groups=k).sum(1, keepdim=True)

    def bare_backward() -> None:
        xp = pad(x, s, model.boundary)
        t = F.conv2d(xp, w)
        torch.ops.aten.convolution_backward(
            t, xp, w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, False, False]
        )

    def bare_cl_grouped() -> None:
        t = F.conv2d(channels_last(pad(x, s, model.boundary)), w)
        F.conv_transpose2d(t, w, groups=k).sum(1, keepdim=True)

    def bare_cl_depthwise() -> None:
        t = F.conv2d(channels_last(pad(x, s, model.boundary)), w)
        F.conv2d(t, w_flipped, padding=s - 1, groups=k).sum(1, keepdim=True)

    ones = torch.ones(k, dtype=dtype)

    def bare_cl_depthwise_mv() -> None:
        t = F.conv2d(channels_last(pad(x, s, model.boundary)), w)
        z = F.conv2d(t, w_flipped, padding=s - 1, groups=k)
        torch.mv(z.permute(0, 2, 3, 1).reshape(-1, k), ones)

    def oracles(energy) -> tuple[Callable[[], None], Callable[[], None]]:
        xr = x.clone().requires_grad_(True)

        def gradient() -> None:
            torch.autograd.grad(energy(xr).sum(), xr)

        (g,) = torch.autograd.grad(energy(xr).sum(), xr, create_graph=True)

        def hvp() -> None:
            torch.autograd.grad(g, xr, v, retain_graph=True)

        return gradient, hvp

    fused = oracles(model)
    plain = oracles(lambda z: plain_energy(model, z))
    assert u.shape[1] == k
    variants = {
        "bare plain": timer(bare_plain, clock),
        "bare grouped": timer(bare_grouped, clock),
        "bare backward": timer(bare_backward, clock),
        "bare channels-last grouped": timer(bare_cl_grouped, clock),
        "bare channels-last depthwise": timer(bare_cl_depthwise, clock),
        "bare channels-last depthwise mv": timer(bare_cl_depthwise_mv, clock),
        "gradient": timer(fused[0], clock),
        "HVP": timer(fused[1], clock),
        "plain gradient": timer(plain[0], clock),
        "plain HVP": timer(plain[1], clock),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            times[name].append(run())
    return times


MODEL = "crr8-sigma25-bundled"


def camera_image(folder: Path) -> Path:
    """skimage's camera (512×512) resized to 481×321, saved as a PNG in ``folder``."""
    from PIL import Image

    from bilevel.imaging.data import _skimage_array

    path = folder / "camera_481x321.png"
    if not path.is_file():
        Image.fromarray(_skimage_array("camera", False)).resize((321, 481)).save(path)
    return path


def random_mask_file(image: Path, index: int, folder: Path, keep: float) -> Path:
    """A random 0/1 mask of ``image``'s size keeping ``keep`` of the pixels (seed ``index``),
    saved as a PNG in ``folder``."""
    from bilevel.imaging import load_image, random_mask, save_image

    path = folder / f"{image.stem}_mask{keep:g}.png"
    if not path.is_file():
        shape = load_image(image, color=False).shape[-2:]
        save_image(random_mask(shape, keep, generator=index).unsqueeze(0), path)
    return path


def converged_psnr(image: Path, config, cache: Path) -> tuple[float, tuple[int, int]]:
    """(PSNR of the converged solution, (H, W)) of the problem ``bilevel reconstruct`` solves
    for ``image`` with ``config`` (the same degradation, :func:`bilevel.imaging.apply.degrade`
    with seed 0), float64 L-BFGS to an RMS gradient of 10⁻⁸ (preconditioned where it applies),
    the solution cached in ``cache``."""
    from bilevel.imaging import load_image, psnr, reconstruct
    from bilevel.imaging.apply import (
        _mask,
        degrade,
        learned_problem,
        load_learned,
        reconstruction_start,
    )
    from bilevel.imaging.config import job_config
    from bilevel.imaging.pretrained_models import model_info

    if config.model:
        regulariser = pretrained(config.model)
        options = job_config("denoise", sigma=float(model_info(config.model)["sigma"]))
    else:
        regulariser, options = load_learned(config.run_dir)
    x = load_image(image, color=options.color).unsqueeze(0)
    key = f"{image.stem}_{Path(config.run_dir).name if config.run_dir else config.model}"
    path = cache / f"{key}_converged.pt"
    if path.is_file():
        converged = torch.load(path)
    else:
        mask = _mask(config.mask, x[0]) if config.mask else None
        float64 = dataclasses.replace(options, dtype="float64")
        problem = learned_problem(regulariser.double(), float64, mask)
        op = problem.theta["operator"]
        y = degrade(op, x.double(), options.sigma, 0)
        tol = 1e-8 * x.numel() ** 0.5
        x0 = reconstruction_start(op, y)
        converged = reconstruct(problem, (y, y), x0, tol, max_iter=50000, precondition=True)
        torch.save(converged, path)
    return float(psnr(converged.clamp(0, 1), x.double())[0]), tuple(x.shape[-2:])


def reconstruct_line(image: Path, index: int, args: argparse.Namespace) -> str:
    """One table row: `bilevel reconstruct` of ``image`` against its converged solution."""
    from bilevel.autodiff import LowerLevel
    from bilevel.imaging.apply import load_learned, run
    from bilevel.imaging.config import ReconstructConfig

    out = Path(args.cache)
    target = {"run_dir": args.run} if args.run else {"model": MODEL}
    if args.run and load_learned(args.run)[1].job == "inpaint":
        target["mask"] = str(random_mask_file(image, index, out, args.keep))
    options = {"tol": args.tol} if args.tol is not None else {}
    config = ReconstructConfig(images=[str(image)], add_noise=True, out=str(out), **target)
    config = dataclasses.replace(config, **options)
    calls = {"n": 0}
    counted = LowerLevel.value_and_grad

    def counting(self, *a, **k):
        calls["n"] += 1
        return counted(self, *a, **k)

    LowerLevel.value_and_grad = counting
    try:
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            run(config, json=True)
    finally:
        LowerLevel.value_and_grad = counted
    record = json.loads(buffer.getvalue())["images"][0]
    command = [sys.executable, "-m", "bilevel", "reconstruct"]
    command += [args.run] if args.run else ["--model", MODEL]
    command += [str(image), "--add-noise", "--out", str(out)]
    command += [f"--mask={target['mask']}"] if "mask" in target else []
    command += [f"--tol={args.tol}"] if args.tol is not None else []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start, children = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(command, check=True, capture_output=True, env=env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    command_cpu = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
    reference, shape = converged_psnr(image, config, out)
    size = "×".join(str(n) for n in shape)
    return (
        f"| {image.name} ({size}) | {record['seconds']:.2f} | {record['cpu_seconds']:.2f} "
        f"| {calls['n']} "
        f"| {wall:.2f} | {command_cpu:.2f} | {record['psnr']:.3f} "
        f"| {record['psnr'] - reference:+.4f} |"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    retained = False if args.system_malloc else retain_freed_memory()
    if args.reconstruct is not None:
        Path(args.cache).mkdir(parents=True, exist_ok=True)
        images = [Path(p) for p in args.reconstruct] or [camera_image(Path(args.cache))]
        target = args.run or f"--model {MODEL}"
        print(f"torch {torch.__version__}, bilevel reconstruct {target} --add-noise")
        print("load average (1, 5, 15 min): {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
        print(
            "\n| image (H×W) | solve s | solve CPU s | gradients | command wall s "
            "| command CPU s | PSNR dB | PSNR − converged dB |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|"
        )
        for index, image in enumerate(images):
            print(reconstruct_line(image, index, args), flush=True)
        print("load average after: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
        return 0
    repeats = 3 if args.quick else args.repeats
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), {repeats} repeats, "
        f"freed memory retained: {retained}, clock: {args.clock}"
    )
    print("load average (1, 5, 15 min): {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    head = (
        "| configuration | bare conv ms | gradient ms | fraction | HVP ms | fraction "
        "| plain gradient ms | fraction | plain HVP ms | fraction |"
    )
    results = [
        (name, measure(*config, repeats, CLOCKS[args.clock])) for name, *config in configurations()
    ]
    for label, statistic in (("medians", statistics.median), ("minima", min)):
        print(f"\n{label} over the repeats\n\n{head}\n" + "|---" * 10 + "|")
        for name, times in results:
            m = {key: statistic(ts) for key, ts in times.items()}
            bare = min(v for key, v in m.items() if key.startswith("bare"))
            cells = [f"{1e3 * bare:.2f}"]
            for key in ("gradient", "HVP", "plain gradient", "plain HVP"):
                cells += [f"{1e3 * m[key]:.2f}", f"{bare / m[key]:.2f}"]
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    print("\nload average after: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
