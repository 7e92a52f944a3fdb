"""Tightness of the a-posteriori error bound ω: ω / true error per estimator and tolerance.

Problems (float64, batches of B = 4 instances, θ with 3 entries), 20 random draws each:

* quadratic: h_i = ½xᵀA_i x − xᵀ(M_iθ + c_i) in dimension 20, spectra log-uniform in
  [0.1, 10], μ stated exactly (the smallest eigenvalue); f_i = ½‖x − t_i‖². The true ∇F is
  the closed form mean_i M_iᵀA_i⁻¹(x̂_i − t_i).
* ill-conditioned: the same in dimension 60 with spectra log-uniform in [1e-2, 1e2].
* logistic: h_i = mean_j log(1 + e^{−y_ij⟨a_ij, x⟩}) + ½Σ_k λ_k x_k² in dimension 10 with
  λ = 0.1 + e^{Pθ}, μ = min λ stated; f_i = ½‖x − t_i‖². Reference ∇F from ``Exact`` with a
  lower tolerance of 1e-13.

Each estimator (AID-CG, AID-MINRES, AID-FP, Neumann, JFB, Exact, and AID-CG with the
first-order a-posteriori estimate ``BoundConstants(a_posteriori=True)`` where the library has
it; Nesterov lower solves from zero) runs with lower and adjoint tolerances 1e-1, 1e-3, 1e-5;
only the library's defaults are used (nothing stated besides μ). The report gives the median
and the 90th percentile of ω / ‖z − ∇F‖ (≥ 1 when the bound holds), the share of cases with
ω ≥ error, and the share of certified bounds. The script uses only API common to all
versions (the a-posteriori row where present), so that the same script measures an older
checkout (``PYTHONPATH=old/src``) for the before/after comparison.

``--foe`` measures instead the imaging job's float32 denoising problem (10 filters of 7×7, 48 px
crops), where the worst-case constants are far from the truth, against the a-posteriori
estimate (versions with it only).

Usage: python benchmarks/bound_tightness.py [--draws 20] [--foe] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time
import warnings

import torch

from bilevel import CG, MINRES, BilevelProblem, Exact, FixedPoint, Implicit, Nesterov
from bilevel.bounds import BoundConstants
from bilevel.hypergrad import JacobianFree
from bilevel.linear import Neumann

F64 = torch.float64
TOLS = (1e-1, 1e-3, 1e-5)
B, P = 4, 3


def quadratic(seed: int, dim: int = 20, low: float = 0.1, high: float = 10.0):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(B, dim, dim, generator=gen, dtype=F64))
    eig = low * (high / low) ** torch.rand(B, dim, generator=gen, dtype=F64)
    a = q @ torch.diag_embed(eig) @ q.transpose(1, 2)
    a = 0.5 * (a + a.transpose(1, 2))
    m = torch.randn(B, dim, P, generator=gen, dtype=F64)
    c = torch.randn(B, dim, generator=gen, dtype=F64)
    t = torch.randn(B, dim, generator=gen, dtype=F64)
    theta = torch.randn(P, generator=gen, dtype=F64).requires_grad_(True)

    def h(x, th, batch):
        aa, mm, cc, _ = batch
        return 0.5 * torch.einsum("bi,bij,bj->b", x, aa, x) - (x * (mm @ th + cc)).sum(1)

    def f(x, th, batch):
        return 0.5 * ((x - batch[3]) ** 2).sum(1)

    th = theta.detach()
    xs = torch.linalg.solve(a, (m @ th + c).unsqueeze(-1)).squeeze(-1)
    qs = torch.linalg.solve(a, (xs - t).unsqueeze(-1)).squeeze(-1)
    exact = torch.einsum("bip,bi->p", m, qs) / B
    return BilevelProblem(h, f, theta, mu=float(eig.min())), (a, m, c, t), exact


def logistic(seed: int, dim: int = 10):
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, 30, dim, generator=gen, dtype=F64)
    labels = torch.sign(torch.randn(B, 30, generator=gen, dtype=F64))
    t = torch.randn(B, dim, generator=gen, dtype=F64)
    proj = torch.rand(dim, P, generator=gen, dtype=F64) / P
    theta = (0.5 * torch.randn(P, generator=gen, dtype=F64)).requires_grad_(True)

    def h(x, th, batch):
        fe, la, _ = batch
        z = torch.einsum("bjd,bd->bj", fe, x) * la
        lam = 0.1 + torch.exp(proj @ th)
        return torch.nn.functional.softplus(-z).mean(1) + 0.5 * (lam * x * x).sum(1)

    def f(x, th, batch):
        return 0.5 * ((x - batch[2]) ** 2).sum(1)

    mu = float((0.1 + torch.exp(proj @ theta.detach())).min())
    problem = BilevelProblem(h, f, theta, mu=mu)
    batch = (feats, labels, t)
    ref = Exact(lower_solver=Nesterov(max_iter=50_000))(
        problem, batch, torch.zeros(B, dim, dtype=F64), lower_tol=1e-13
    )
    return problem, batch, ref.grad[0]


ESTIMATORS = {
    "AID-CG": lambda: Implicit(CG(max_iter=2000), lower_solver=Nesterov(max_iter=50_000)),
    "AID-MINRES": lambda: Implicit(MINRES(max_iter=2000), lower_solver=Nesterov(max_iter=50_000)),
    "AID-FP": lambda: Implicit(FixedPoint(max_iter=20_000), lower_solver=Nesterov(max_iter=50_000)),
    "Neumann-50": lambda: Implicit(Neumann(terms=50), lower_solver=Nesterov(max_iter=50_000)),
    "JFB": lambda: JacobianFree(lower_solver=Nesterov(max_iter=50_000)),
    "Exact": lambda: Exact(lower_solver=Nesterov(max_iter=50_000)),
}
if "a_posteriori" in BoundConstants.__dataclass_fields__:  # versions with the estimate
    ESTIMATORS["AID-CG a-post."] = lambda: Implicit(
        CG(max_iter=2000),
        lower_solver=Nesterov(max_iter=50_000),
        constants=BoundConstants(a_posteriori=True),
    )


def measure(draws: int) -> list[dict]:
    rows = []
    for kind, make in (
        ("quadratic", quadratic),
        ("ill-cond.", lambda seed: quadratic(seed, dim=60, low=1e-2, high=1e2)),
        ("logistic", logistic),
    ):
        problems = [make(seed) for seed in range(draws)]
        for name, factory in ESTIMATORS.items():
            est = factory()
            for tol in TOLS:
                ratios, covered, certified = [], 0, 0
                for problem, batch, exact in problems:
                    x0 = torch.zeros(B, batch[2].shape[1], dtype=F64)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        hg = est(problem, batch, x0, lower_tol=tol, adjoint_tol=tol)
                    err = float((hg.grad[0] - exact).norm())
                    ratios.append(hg.bound / max(err, 1e-300))
                    covered += hg.bound >= err
                    certified += bool(hg.bound_certified)
                ratios.sort()
                rows.append(
                    {
                        "problem": kind,
                        "estimator": name,
                        "tol": tol,
                        "median": statistics.median(ratios),
                        "p90": ratios[min(len(ratios) - 1, int(0.9 * len(ratios)))],
                        "covered": covered / len(ratios),
                        "certified": certified / len(ratios),
                    }
                )
                print(
                    f"{kind:9s} {name:14s} tol={tol:.0e}  median ω/err = {rows[-1]['median']:9.3g}"
                    f"  p90 = {rows[-1]['p90']:9.3g}  covered {covered}/{len(ratios)}"
                    f"  certified {certified}/{len(ratios)}",
                    flush=True,
                )
    return rows


def foe(crop: int = 48, images: int = 2) -> list[dict]:
    """ω / true error on the imaging job's float32 denoising problem (a 10-filter 7×7 Fields
    of Experts at the tuned-TV start, ``crop``-pixel crops of the bundled images), worst-case
    bound against the a-posteriori estimate; reference: the same θ in float64 to 1e-9."""
    import copy

    from bilevel.imaging import reconstruction_problem
    from bilevel.imaging.config import job_config
    from bilevel.imaging.job import build, calibrate_foe_weights

    args = job_config(
        "denoise",
        regulariser="foe",
        filters=10,
        filter_size=7,
        crop=crop,
        train_size=images,
        test_size=1,
        val_size=0,
    )
    setup = build(args)
    calibrate_foe_weights(setup.problem.theta["regulariser"], 0.075)
    batch = setup.train.batch()
    x0 = batch[0].clone()
    p64 = reconstruction_problem(copy.deepcopy(setup.problem.theta["regulariser"]).double())
    ref = Implicit(CG(max_iter=3000), lower_solver=Nesterov(max_iter=30_000))(
        p64, tuple(b.double() for b in batch), x0.double(), lower_tol=1e-9
    )
    exact = torch.cat([g.reshape(-1) for g in ref.grad])
    rows = []
    for name, constants in (
        ("worst case", BoundConstants()),
        ("a-posteriori", BoundConstants(a_posteriori=True)),
    ):
        est = Implicit(CG(max_iter=500), lower_solver=Nesterov(max_iter=5000), constants=constants)
        for tol in (1e-1, 1e-2, 1e-3):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                hg = est(setup.problem, batch, x0, lower_tol=tol, adjoint_tol=tol)
            z = torch.cat([g.reshape(-1).double() for g in hg.grad])
            err = float((z - exact).norm())
            rows.append({"estimator": name, "tol": tol, "ratio": hg.bound / err, "z": hg.norm})
            print(
                f"FoE {crop}px float32 {name:12s} tol={tol:.0e}  ω/err = {hg.bound / err:9.3g}"
                f"  ω/‖z‖ = {hg.bound / hg.norm:9.3g}  oracle calls {hg.cost.oracle_calls:.0f}",
                flush=True,
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--out", type=pathlib.Path, default=None, help="write the rows as JSON")
    parser.add_argument(
        "--foe", action="store_true", help="only the float32 Fields-of-Experts denoising case"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    rows = foe() if args.foe else measure(args.draws)
    print(f"{time.perf_counter() - start:.0f} s")
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
