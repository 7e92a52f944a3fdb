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


def quadratic(dim: int = 20, batch: int = 2):
    """h_i(w) = ½ wᵀA w − b_iᵀw with a dense SPD A (condition number 10⁴), float64."""
    gen = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=F64))
    a = q @ torch.diag(torch.logspace(-2, 2, dim, dtype=F64)) @ q.T
    b = torch.randn(batch, dim, generator=gen, dtype=F64)
    theta = torch.zeros((), dtype=F64, requires_grad=True)

    def h(w, th, rhs):
        return 0.5 * ((w @ a) * w).sum(1) - (rhs * w).sum(1) + th * 0.0

    problem = BilevelProblem(h, lambda w, th, rhs: (w * w).sum(1), theta, mu=1e-2)
    return problem, a, b


def test_lbfgs_with_the_exact_inverse_hessian_as_preconditioner_solves_a_quadratic() -> None:
    """P = A⁻¹: the first step is along the Newton direction, γ = sᵀy / yᵀPy = 1, and BFGS
    keeps an exact inverse Hessian exact, so the second step lands on A⁻¹b (the plain
    recursion needs many more steps on a condition number of 10⁴, even to a looser
    tolerance)."""
    problem, a, b = quadratic()
    inverse = torch.linalg.inv(a)
    x0 = torch.zeros_like(b)
    solver = LBFGS(preconditioner=lambda v: v @ inverse)
    sol = solver.solve(LowerLevel(problem, b), x0, 1e-9, problem.mu)
    exact = torch.linalg.solve(a, b.T).T
    assert sol.converged.all() and (sol.iterations <= 2).all()
    assert torch.allclose(sol.x, exact, rtol=1e-9, atol=1e-11)
    plain = LBFGS().solve(LowerLevel(problem, b), x0, 1e-4, problem.mu)
    assert plain.converged.all() and (plain.iterations > 10).all()


def test_two_loop_with_a_preconditioner_is_the_bfgs_update_of_gamma_p() -> None:
    """H g from the two-loop recursion with H₀ = γ P (γ = sᵀy / yᵀPy of the newest pair)
    equals the dense BFGS updates H ← (I − ρ s yᵀ) H (I − ρ y sᵀ) + ρ s sᵀ, oldest pair first,
    applied to g, per instance; a pair failing the curvature test is skipped. The same with
    yᵀPy given by a quadratic form, and P = I as the plain recursion."""
    gen = torch.Generator().manual_seed(5)
    dim, batch, pairs = 8, 2, 4

    def spd() -> torch.Tensor:
        m = torch.randn(dim, dim, generator=gen, dtype=F64)
        return m @ m.T + 0.5 * torch.eye(dim, dtype=F64)

    p, curvature = spd(), [spd() for _ in range(batch)]
    s_hist = [torch.randn(batch, dim, generator=gen, dtype=F64) for _ in range(pairs)]
    y_hist = [torch.stack([curvature[i] @ s[i] for i in range(batch)]) for s in s_hist]
    valid = [torch.ones(batch, dtype=torch.bool) for _ in range(pairs)]
    valid[1] = torch.tensor([True, False])
    g = torch.randn(batch, dim, generator=gen, dtype=F64)
    got = LBFGS._two_loop(g, s_hist, y_hist, valid, lambda v: v @ p)
    eye = torch.eye(dim, dtype=F64)
    for i in range(batch):
        s_new, y_new = s_hist[-1][i], y_hist[-1][i]
        h = (s_new @ y_new) / (y_new @ p @ y_new) * p
        for s, y, ok in zip(s_hist, y_hist, valid):
            if ok[i]:
                s, y = s[i], y[i]
                rho = 1.0 / (s @ y)
                h = (eye - rho * torch.outer(s, y)) @ h @ (eye - rho * torch.outer(y, s))
                h = h + rho * torch.outer(s, s)
        assert torch.allclose(got[i], h @ g[i], rtol=1e-11, atol=1e-13)
    form = LBFGS._two_loop(
        g, s_hist, y_hist, valid, lambda v: v @ p, lambda v: ((v @ p) * v).sum(1)
    )
    assert torch.allclose(form, got, rtol=1e-12)
    plain = LBFGS._two_loop(g, s_hist, y_hist, valid, lambda v: v.clone())
    assert torch.allclose(plain, LBFGS._two_loop(g, s_hist, y_hist, valid), rtol=1e-13)


def test_preconditioned_lbfgs_reaches_the_same_solution_with_retiring_instances() -> None:
    """A diagonal preconditioner on the logistic problem: the same solutions as plain L-BFGS
    (the preconditioner changes the path, not the minimiser), P applied to the active
    instances only as they retire."""
    problem, batch, x0 = logistic(batch=3)
    scale = torch.linspace(0.5, 2.0, 20, dtype=F64)
    sizes = []

    def precondition(v: torch.Tensor) -> torch.Tensor:
        sizes.append(v.shape[0])
        return v * scale

    tol = torch.tensor([1e-3, 1e-7, 1e-10], dtype=F64)
    sol = LBFGS(preconditioner=precondition).solve(LowerLevel(problem, batch), x0, tol, problem.mu)
    ref = LBFGS().solve(LowerLevel(problem, batch), x0, 1e-12, problem.mu)
    assert sol.converged.all() and (sol.grad_norm <= tol).all()
    assert torch.allclose(sol.x[2], ref.x[2], rtol=1e-8, atol=1e-10)
    assert (sol.x - ref.x).norm(dim=1).le(tol / problem.mu).all()  # ‖x − x̂‖ ≤ ‖∇h‖/μ
    assert sizes[0] == 3 and sizes[-1] == 1  # retired instances are not preconditioned
