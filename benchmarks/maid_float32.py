"""MAID on a float32 Fields-of-Experts denoising problem: accepted steps, F and PSNR.

The problem of ``bilevel denoise`` at a larger size: 10 filters of 7×7, grayscale 96 px crops
of the BSDS300 training images (test crops from its test images), σ = 25/255, θ₀ the
experts at smoothed TV of strength λ (``calibrate_foe_weights``), MAID as the job builds it
(Nesterov lower solves, CG adjoints, a-posteriori ω, ε₀ = δ₀ = 0.1, α₀ = 1). Runs, each with
the same oracle-call budget:

* ``float32``: the line search's certified values at x̃ and at its Newton-CG correction
  x̄ (float64 residual; ``refine_iterations=20``, the default);
* ``float32-plain``: ``refine_iterations=0``, the certified values at x̃ alone (the line
  search before the correction existed);
* ``float64``, ``float64-plain``: the same problem in float64.

Reported per run: steps, accepted steps, oracle calls, wall time, and for θ₀ and the final θ
the true training objective F (mean ½‖x̂ − x_true‖² over the training crops, x̂ solved in
float64 to ‖∇ₓh‖ ≤ 10⁻⁸) and the mean test PSNR of those reconstructions. ``--floor`` also
measures, on one crop at θ₀, the float32 floor: ‖∇ₓh‖ (in float64) at a float32 solve run to
its stall, the distance ‖x̃ − x̂‖ to the float64 solution, and ‖∇ₓh‖ at the Newton-CG
correction x̄.

Usage: nice python benchmarks/maid_float32.py [--train 8] [--test 4] [--budget 40000]
       [--runs float32,float32-plain,float64,float64-plain] [--floor] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import warnings
from dataclasses import replace

import torch

from bilevel import CG, Nesterov
from bilevel.autodiff import Cost, LowerLevel, batch_norm
from bilevel.bounds import as_float64
from bilevel.imaging import psnr, reconstruct, reconstruction_problem
from bilevel.imaging.config import job_config
from bilevel.imaging.job import build, calibrate_foe_weights, make_method
from bilevel.lower import solve_lower
from bilevel.methods import Budget, with_initial

DATA = "/work/shared/data/bsds300"


def setup_for(dtype: str, args: argparse.Namespace):
    config = job_config(
        "denoise",
        regulariser="foe",
        filters=10,
        filter_size=7,
        crop=96,
        train_size=args.train,
        test_size=args.test,
        val_size=0,
        method="maid",
        dtype=dtype,
        data=args.data,
        seed=args.seed,
    )
    torch.manual_seed(args.seed)
    setup = build(config)
    calibrate_foe_weights(setup.problem.theta["regulariser"], args.tv)
    return config, setup


def true_scores(setup) -> dict[str, float]:
    """F(θ) on the training crops and the mean test PSNR, from float64 solves to 1e-8."""
    reg64 = copy.deepcopy(setup.problem.theta["regulariser"]).double()
    p64 = reconstruction_problem(reg64, gamma=0.0)
    out = {}
    for name, data in (("train", setup.train), ("test", setup.test)):
        y, clean = (t.double() for t in data.batch()[:2])
        x = reconstruct(p64, (y, clean), x0=y, tol=1e-8, max_iter=5000)
        if name == "train":
            out["F"] = float((0.5 * ((x - clean) ** 2).flatten(1).sum(1)).mean())
        else:
            out["test_psnr"] = float(psnr(x.clamp(0, 1), clean).mean())
    return out


def run_one(name: str, args: argparse.Namespace) -> dict:
    dtype = name.split("-")[0]
    config, setup = setup_for(dtype, args)
    method = make_method(config)
    if name.endswith("-plain"):
        method = replace(method, refine_iterations=0)
    before = true_scores(setup)
    samples = with_initial(setup.train, lambda b: b[0].clone())
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = method.run(
            setup.problem, samples, Budget(oracle_calls=args.budget), progress=False, plot=False
        )
    seconds = time.perf_counter() - start
    after = true_scores(setup)
    records = result.records
    return {
        "run": name,
        "steps": result.step,
        "accepted": sum(bool(r["accepted"]) for r in records),
        "oracle_calls": result.cost,
        "seconds": round(seconds, 1),
        "status": result.status,
        "eps": [r["eps"] for r in records],
        "alpha": [r["alpha"] for r in records],
        "F_before": before["F"],
        "F_after": after["F"],
        "psnr_before": before["test_psnr"],
        "psnr_after": after["test_psnr"],
    }


def floor(args: argparse.Namespace) -> dict:
    """The float32 floor of ‖∇ₓh‖ on one training crop at θ₀, and what the correction gives."""
    _, setup = setup_for("float32", args)
    problem = setup.problem
    batch = tuple(t[:1] for t in setup.train.batch())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sol = solve_lower(LowerLevel(problem, batch), batch[0].clone(), 0.0, Nesterov(), 1.0)
    reg64 = copy.deepcopy(problem.theta["regulariser"]).double()
    p64 = reconstruction_problem(reg64, gamma=0.0)
    b64 = as_float64(batch)
    x_hat = reconstruct(p64, b64[:2], x0=b64[0], tol=1e-10, max_iter=5000)
    lower64 = LowerLevel(p64, b64, Cost())
    x64 = sol.x.double()
    op = lower64.hessian(x64)
    grad = op.gradient
    out = {"grad_norm_float32": float(sol.grad_norm[0]), "grad_norm_at_x": float(grad.norm())}
    out["distance_to_solution"] = float((x64 - x_hat).norm())
    for k in (5, 20, 50):
        d = CG(max_iter=k).solve(op.matvec, -grad, 1e-6 * batch_norm(grad)).solution
        _, g_bar = lower64.value_and_grad(x64 + d)
        out[f"grad_norm_after_{k}_cg"] = float(g_bar.norm())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=DATA)
    parser.add_argument("--train", type=int, default=8)
    parser.add_argument("--test", type=int, default=4)
    parser.add_argument("--budget", type=int, default=40_000)
    parser.add_argument("--tv", type=float, default=0.075, help="λ of θ₀ (smoothed TV)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", default="float32,float32-plain,float64,float64-plain")
    parser.add_argument("--floor", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    report: dict = {"settings": vars(args), "runs": []}
    if args.floor:
        report["floor"] = floor(args)
        print(json.dumps(report["floor"]), flush=True)
    for name in args.runs.split(","):
        row = run_one(name, args)
        report["runs"].append(row)
        print(json.dumps(row), flush=True)
    print("| run | steps | accepted | oracle calls | s | F θ₀ → θ | test PSNR θ₀ → θ (dB) |")
    print("|---|---|---|---|---|---|---|")
    for r in report["runs"]:
        print(
            f"| {r['run']} | {r['steps']} | {r['accepted']} | {r['oracle_calls']:.0f} | "
            f"{r['seconds']:.0f} | {r['F_before']:.4f} → {r['F_after']:.4f} | "
            f"{r['psnr_before']:.2f} → {r['psnr_after']:.2f} |"
        )
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
