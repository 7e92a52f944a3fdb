"""Lower solvers: L-BFGS's stall test, and the start point's graph handed to the Hessian."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bilevel import CG, BilevelProblem, Implicit, Nesterov
from bilevel.autodiff import HessianOperator, LowerLevel
from bilevel.lower import LBFGS, ConvergenceWarning, GradientDescent, solve_lower

F64 = torch.float64


def logistic(dtype=F64, strength: float = -3.0, batch: int = 2):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(300, 20, generator=gen, dtype=F64).to(dtype)
    y = (torch.rand(batch, 300, generator=gen, dtype=F64) < 0.5).to(dtype)
    theta = torch.full((20,), strength, dtype=dtype).requires_grad_(True)

    def h(w, th, labels):
        z = F.linear(w, x)
        return (F.softplus(z) - labels * z).mean(1) + 0.5 * (th.exp() * w * w).sum(1)

    def f(w, th, labels):
        return 0.5 * (w * w).sum(1)

    problem = BilevelProblem(h, f, theta, mu=math.exp(strength), lipschitz=6.0)
    return problem, y, torch.zeros(batch, 20, dtype=dtype)


def test_lbfgs_stalls_at_the_rounding_floor() -> None:
    """In float32 a tolerance of 1e-12 is out of reach: L-BFGS stops where the gradient norm
    no longer falls (flagged stalled, warned about), long before max_iter, and its
    certificate is the gradient norm at the returned point."""
    problem, batch, x0 = logistic(torch.float32)
    lower = LowerLevel(problem, batch)
    with pytest.warns(ConvergenceWarning, match="no longer decreased"):
        sol = solve_lower(lower, x0, 1e-12, LBFGS(max_iter=2000), problem.mu)
    assert sol.stalled.all() and not sol.converged.any()
    assert (sol.iterations < 300).all()
    assert sol.grad_evals < 2000
    _, grad = LowerLevel(problem, batch).value_and_grad(sol.x)
    assert torch.allclose(grad.norm(dim=1), sol.grad_norm, rtol=1e-5)
    reached = LBFGS(max_iter=2000).solve(LowerLevel(problem, batch), x0, 1e-4, problem.mu)
    assert reached.converged.all() and not reached.stalled.any()


def test_lbfgs_without_stall_test_runs_to_max_iter_or_exhausted_search() -> None:
    problem, batch, x0 = logistic(torch.float32)
    sol = LBFGS(max_iter=60, stall_iterations=None).solve(
        LowerLevel(problem, batch), x0, 1e-12, problem.mu
    )
    # only a line search without sufficient decrease can stop an instance early
    assert ((sol.iterations == 60) | sol.stalled).all() and not sol.converged.any()


@pytest.mark.parametrize(
    "solver", [Nesterov(), GradientDescent(), LBFGS()], ids=["nesterov", "gd", "lbfgs"]
)
def test_converged_start_costs_one_evaluation_and_keeps_its_graph(solver) -> None:
    """A start that meets the tolerance is returned after one gradient evaluation, and the
    hypergradient's Hessian operator reuses that evaluation's graph (one evaluation in all)."""
    problem, batch, x0 = logistic()
    x = Nesterov(max_iter=5000).solve(LowerLevel(problem, batch), x0, 1e-12, problem.mu).x
    est = Implicit(CG(), lower_solver=solver)
    hg = est(problem, batch, x, lower_tol=1e-8, adjoint_tol=1e-10)
    assert (hg.lower.iterations == 0).all() and hg.lower.converged.all()
    assert hg.cost.grad_evals == x.shape[0]
    assert hg.x is not x and torch.equal(hg.x, x)  # a copy of the start
    fresh = HessianOperator(LowerLevel(problem, batch), x)
    lower = LowerLevel(problem, batch)
    sol = solver.solve(lower, x, 1e-8, problem.mu)
    kept = lower.hessian(sol.x)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    index = torch.arange(x.shape[0])
    assert torch.allclose(kept.matvec(v, index), fresh.matvec(v, index), rtol=1e-13)
    assert torch.allclose(kept.gradient, fresh.gradient, rtol=1e-13)
    assert lower.cost.grad_evals == x.shape[0]
    ref = Implicit(CG(), lower_solver=Nesterov(max_iter=0))(
        problem, batch, x, lower_tol=math.inf, adjoint_tol=1e-10
    )
    assert torch.allclose(hg.grad[0], ref.grad[0], rtol=1e-10)


def test_graph_is_not_reused_elsewhere() -> None:
    """After iterations, or at another point, the Hessian operator builds its own graph."""
    problem, batch, x0 = logistic()
    lower = LowerLevel(problem, batch)
    sol = Nesterov(max_iter=20).solve(lower, x0, 1e-3, problem.mu)
    assert (sol.iterations > 0).all()
    evals = lower.cost.grad_evals
    lower.hessian(sol.x)
    assert lower.cost.grad_evals == evals + x0.shape[0]
    lower = LowerLevel(problem, batch)
    sol = Nesterov().solve(lower, sol.x, math.inf, problem.mu)
    lower.hessian(sol.x.clone())  # not the returned tensor: a new evaluation
    assert lower.cost.grad_evals == 2 * x0.shape[0]
