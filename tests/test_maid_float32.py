"""MAID in float32 at the rounding floor of the lower solves, and its budget within a step.

The lower level h_i(x, θ) = ½ Σ_j a_j x_j² − ⟨x, Bθ + c_i⟩ (a_j from 1 to 100, x̂ of size
100) has a float32 floor of ‖∇h_i(x̃_i)‖, a small multiple of u·‖a ⊙ x̂_i‖ ≈ 4·10⁻³ (the
solves stall near 7·10⁻³), which no float32 solve gets below; the upper loss ½‖x − t_i‖²
(targets off the reachable set, ‖∇f_i‖ ≈ 3) near a minimiser in θ offers decreases smaller
than the plain line-search margin ‖∇f_i‖·ε_i at that floor. F has a closed form in float64.
"""

from __future__ import annotations

import time

import pytest
import torch

from bilevel import CG, BilevelProblem, Implicit, Nesterov
from bilevel.methods import MAID, Budget, TensorSamples
from bilevel.methods.testing import quadratic_finite_sum

N, DIM, PARAMS = 4, 400, 3
F64 = torch.float64


def _floor_problem():
    gen = torch.Generator().manual_seed(0)
    a = torch.logspace(0, 2, DIM, dtype=F64)
    b = torch.zeros(DIM, PARAMS, dtype=F64)
    b[:40] = torch.randn(40, PARAMS, generator=gen, dtype=F64) / 6
    x_star = 100 * torch.randn(N, DIM, generator=gen, dtype=F64)
    theta_star = torch.randn(PARAMS, generator=gen, dtype=F64)
    c = a * x_star - theta_star @ b.T
    t = x_star + 3 * torch.randn(N, DIM, generator=gen, dtype=F64) / DIM**0.5

    def lower_energy(x, theta, batch):
        aa, bb = a.to(x.dtype), b.to(x.dtype)
        return 0.5 * (aa * x * x).sum(1) - (x * (theta.to(x.dtype) @ bb.T + batch[0])).sum(1)

    def upper_loss(x, theta, batch):
        return 0.5 * ((x - batch[1]) ** 2).sum(1)

    def objective(theta):
        x = (theta.detach().double() @ b.T + c) / a
        return float((0.5 * ((x - t) ** 2).sum(1)).mean())

    theta0 = theta_star + 0.1 * torch.randn(PARAMS, generator=gen, dtype=F64)
    theta0 = theta0.float().requires_grad_(True)
    problem = BilevelProblem(lower_energy, upper_loss, theta0, mu=1.0, lipschitz=100.0)
    samples = TensorSamples((c.float(), t.float()), x_init=torch.zeros(N, DIM))
    return problem, samples, objective


def _maid(refine: int) -> MAID:
    estimator = Implicit(CG(max_iter=500), lower_solver=Nesterov(max_iter=20_000))
    return MAID(estimator=estimator, lower_tol=5e-3, min_tol=1e-4, refine_iterations=refine)


@pytest.mark.filterwarnings("ignore::bilevel.lower.ConvergenceWarning")  # stalled: the floor
def test_maid_accepts_float32_steps_below_the_rounding_floor():
    """Without the float64 Newton correction the line search cannot certify any decrease
    (every trial is refused or skipped, ε shrinks in vain: the distance stays at the floor);
    with it MAID accepts a step, and the true F decreases by the certified margin."""
    problem, samples, objective = _floor_problem()
    f0 = objective(problem.theta)
    theta0 = problem.theta.detach().clone()
    plain = _maid(0).run(problem, samples, Budget(steps=3), progress=False, plot=False)
    assert not any(r["accepted"] for r in plain.records), plain.records
    distances = [r["distance"] for r in plain.records]
    assert min(distances) > 5e-3 and plain.records[-1]["eps"] < 2e-3  # the floor
    assert torch.equal(problem.theta.detach(), theta0)

    problem, samples, objective = _floor_problem()
    result = _maid(20).run(problem, samples, Budget(steps=3), progress=False, plot=False)
    accepted = [r for r in result.records if r["accepted"]]
    assert accepted, result.records
    margin = 1e-4 * sum(r["alpha"] * r["grad_norm"] ** 2 for r in accepted)
    assert objective(problem.theta) < f0 - margin


class _SlowTrials(Implicit):
    """``Implicit`` whose line-search trial solves take 1 s longer."""

    def solve_lower(self, *args, **kwargs):
        time.sleep(1.0)
        return super().solve_lower(*args, **kwargs)


def test_maid_wall_time_budget_stops_within_the_line_search():
    """A first trial step far too large makes the line search backtrack many times; a
    wall-time budget that runs out during it ends the step there (θ kept, the reason in the
    record), within one trial of the limit, rather than after all the trials."""
    q = quadratic_finite_sum(n=8, seed=1)
    theta0 = [p.detach().clone() for p in q.problem.params]
    fast = q.estimator()
    estimator = _SlowTrials(
        fast.linear_solver, lower_solver=fast.lower_solver, constants=fast.constants
    )
    method = MAID(estimator=estimator, step=1e4, max_backtracks=40, lower_tol=1e-3)
    result = method.run(q.problem, q.samples, Budget(wall_time=2.5), progress=False, plot=False)
    (record,) = result.records
    assert result.status == "budget"
    assert not record["accepted"] and 1 <= record["backtracks"] < 40
    assert "wall-time budget" in record["budget_stop"] and "line search" in record["budget_stop"]
    assert result.wall_time < 2.5 + 1.0 + 1.5
    assert all(torch.equal(p, t) for p, t in zip(q.problem.params, theta0))
