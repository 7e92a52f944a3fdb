"""Hypergradient estimators against closed forms, dense references and finite differences."""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch
from conftest import quadratic_exact, quadratic_problem
from hypothesis import given, settings
from hypothesis import strategies as st

from bilevel import BilevelError, BilevelProblem, NonFiniteError, NotStronglyConvexError
from bilevel.bounds import BoundConstants
from bilevel.hypergrad import Exact, Implicit, JacobianFree, Unrolled
from bilevel.linear import CG, MINRES, FixedPoint, Neumann
from bilevel.lower import LBFGS, GradientDescent, Nesterov

F64 = torch.float64


def ridge_setup(n=60, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x_tr = torch.randn(n, d, generator=gen, dtype=F64)
    w_true = torch.randn(d, generator=gen, dtype=F64)
    y_tr = x_tr @ w_true + 0.3 * torch.randn(n, generator=gen, dtype=F64)
    x_va = torch.randn(n // 2, d, generator=gen, dtype=F64)
    y_va = x_va @ w_true + 0.3 * torch.randn(n // 2, generator=gen, dtype=F64)
    theta = (0.3 * torch.randn(d, generator=gen, dtype=F64)).requires_grad_(True)

    def h(w, th, _):
        r = w @ x_tr.T - y_tr
        return 0.5 * (r * r).mean(1) + 0.5 * (torch.exp(th) * w * w).sum(1)

    def f(w, th, _):
        r = w @ x_va.T - y_va
        return 0.5 * (r * r).mean(1)

    def closed_form(th):
        a = x_tr.T @ x_tr / n + torch.diag(torch.exp(th))
        w = torch.linalg.solve(a, x_tr.T @ y_tr / n)
        gf = x_va.T @ (x_va @ w - y_va) / (n // 2)
        q = torch.linalg.solve(a, gf)
        return -torch.exp(th) * w * q, w

    mu = float(torch.exp(theta.detach()).min())
    return BilevelProblem(h, f, theta, mu=mu), theta, closed_form


def test_ridge_matches_closed_form_1e8():
    problem, theta, closed_form = ridge_setup()
    expected, w = closed_form(theta.detach())
    hg = Implicit(CG(max_iter=500))(
        problem, None, torch.zeros(1, 8, dtype=F64), lower_tol=1e-13, adjoint_tol=1e-13
    )
    rel = (hg.grad[0] - expected).norm() / expected.norm()
    assert rel < 1e-8, rel
    assert (hg.x[0] - w).norm() < 1e-10


def logistic_setup(seed=0, n=80, d=5):
    gen = torch.Generator().manual_seed(seed)
    x_tr = torch.randn(n, d, generator=gen, dtype=F64)
    w0 = torch.randn(d, generator=gen, dtype=F64)
    y_tr = (x_tr @ w0 + 0.5 * torch.randn(n, generator=gen, dtype=F64) > 0).to(F64)
    x_va = torch.randn(n, d, generator=gen, dtype=F64)
    y_va = (x_va @ w0 > 0).to(F64)
    theta = (torch.randn(d, generator=gen, dtype=F64) - 1.0).requires_grad_(True)

    def h(w, th, _):
        z = w @ x_tr.T
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            z, y_tr.expand_as(z), reduction="none"
        ).mean(1)
        return loss + 0.5 * (torch.exp(th) * w * w).sum(1)

    def f(w, th, _):
        z = w @ x_va.T
        return torch.nn.functional.binary_cross_entropy_with_logits(
            z, y_va.expand_as(z), reduction="none"
        ).mean(1)

    mu = float(torch.exp(theta.detach()).min())
    return BilevelProblem(h, f, theta, mu=mu), theta


ESTIMATORS = {
    "cg": (Implicit(CG(max_iter=2000)), 1e-7),
    "minres": (Implicit(MINRES(max_iter=2000)), 1e-7),
    "fixed_point": (Implicit(FixedPoint(max_iter=20000)), 1e-6),
    "neumann": (Implicit(Neumann(terms=3000)), 1e-5),
    "unrolled": (Unrolled(steps=3000), 1e-5),
}


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_estimators_agree_with_exact_on_quadratics(name):
    est, rtol = ESTIMATORS[name]
    problem, batch, theta = quadratic_problem(n_batch=3, dim=5, seed=3)
    expected, _ = quadratic_exact(problem, batch)
    x0 = torch.zeros(3, 5, dtype=F64)
    ref = Exact()(problem, batch, x0, lower_tol=1e-12)
    assert (ref.grad[0] - expected).norm() / expected.norm() < 1e-9
    tols = {} if name == "unrolled" else {"lower_tol": 1e-11, "adjoint_tol": 1e-11}
    hg = est(problem, batch, x0, **tols)
    rel = float((hg.grad[0] - expected).norm() / expected.norm())
    assert rel < rtol, (name, rel)


@pytest.mark.parametrize("name", ["cg", "minres", "unrolled"])
def test_estimators_agree_with_exact_on_logistic(name):
    est, rtol = ESTIMATORS[name]
    problem, theta = logistic_setup()
    x0 = torch.zeros(1, 5, dtype=F64)
    ref = Exact()(problem, None, x0, lower_tol=1e-12)
    if name == "unrolled":
        est = Unrolled(steps=4000)
    tols = {} if name == "unrolled" else {"lower_tol": 1e-11, "adjoint_tol": 1e-11}
    hg = est(problem, None, x0, **tols)
    rel = float((hg.grad[0] - ref.grad[0]).norm() / ref.grad[0].norm())
    assert rel < rtol, (name, rel)


def test_jacobian_free_is_biased_but_its_bound_covers_the_bias():
    problem, batch, theta = quadratic_problem(n_batch=3, dim=5, seed=4)
    expected, _ = quadratic_exact(problem, batch)
    hg = JacobianFree(compute_bound=True)(
        problem, batch, torch.zeros(3, 5, dtype=F64), lower_tol=1e-10
    )
    err = float((hg.grad[0] - expected).norm())
    assert err > 1e-3  # JFB is biased on this problem
    assert hg.bound >= err


def finite_difference(problem, batch, theta, x0, k, h=1e-5):
    """Central difference of F(θ) = mean f(x̂(θ)) along coordinate k (tight lower solves)."""
    values = []
    for sign in (1.0, -1.0):
        with torch.no_grad():
            theta[k] += sign * h
        hg = Implicit()(problem, batch, x0, lower_tol=1e-13, adjoint_tol=1e-3)
        values.append(hg.loss)
        with torch.no_grad():
            theta[k] -= sign * h
    return (values[0] - values[1]) / (2 * h)


def test_finite_differences_logistic():
    problem, theta = logistic_setup(seed=1)
    x0 = torch.zeros(1, 5, dtype=F64)
    hg = Implicit()(problem, None, x0, lower_tol=1e-12, adjoint_tol=1e-12)
    for k in range(theta.numel()):
        fd = finite_difference(problem, None, theta, x0, k)
        assert abs(fd - float(hg.grad[0][k])) < 1e-6 * max(1.0, abs(fd)), k


def test_finite_differences_quadratic_batch():
    problem, batch, theta = quadratic_problem(n_batch=4, dim=6, seed=5)
    x0 = torch.zeros(4, 6, dtype=F64)
    hg = Implicit()(problem, batch, x0, lower_tol=1e-12, adjoint_tol=1e-12)
    for k in range(theta.numel()):
        fd = finite_difference(problem, batch, theta, x0, k)
        assert abs(fd - float(hg.grad[0][k])) < 1e-6 * max(1.0, abs(fd)), k


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    eps_exp=st.floats(-6.0, -1.0),
    delta_exp=st.floats(-6.0, -1.0),
    n_batch=st.integers(1, 5),
)
def test_certified_bound_never_below_true_error(seed, eps_exp, delta_exp, n_batch):
    """Quadratic energies: L_H = L_J = 0, L_f = 1, ‖J‖ computed exactly → certified ω."""
    problem, batch, theta = quadratic_problem(n_batch=n_batch, dim=5, seed=seed, quartic=0.0)
    expected, _ = quadratic_exact(problem, batch)
    consts = BoundConstants(upper_grad_lipschitz=1.0, jacobian_lipschitz=0.0, hessian_lipschitz=0.0)
    est = Implicit(
        CG(max_iter=200), lower_solver=GradientDescent(), constants=consts, compute_bound=True
    )
    x0 = torch.randn(n_batch, 5, dtype=F64, generator=torch.Generator().manual_seed(seed))
    hg = est(problem, batch, x0, lower_tol=10**eps_exp, adjoint_tol=10**delta_exp)
    err = float((hg.grad[0] - expected).norm())
    assert hg.bound_certified
    assert hg.bound >= err, (hg.bound, err)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), tol_exp=st.floats(-5.0, -1.0))
def test_estimated_bound_covers_error_on_logistic(seed, tol_exp):
    problem, theta = logistic_setup(seed=seed % 50)
    x0 = torch.zeros(1, 5, dtype=F64)
    ref = Exact(compute_bound=True)(problem, None, x0, lower_tol=1e-12)
    hg = Implicit(CG(), compute_bound=True)(
        problem, None, x0, lower_tol=10**tol_exp, adjoint_tol=10**tol_exp
    )
    err = float((hg.grad[0] - ref.grad[0]).norm())
    assert not hg.bound_certified
    assert hg.bound >= err, (hg.bound, err)


@pytest.mark.parametrize(
    "solver", [GradientDescent(), GradientDescent(backtracking=True), Nesterov(), LBFGS()]
)
def test_lower_solvers_reach_tolerance(solver):
    problem, theta = logistic_setup(seed=2)
    hg = Implicit(lower_solver=solver)(
        problem, None, torch.zeros(1, 5, dtype=F64), lower_tol=1e-9, adjoint_tol=1e-9
    )
    assert hg.lower.all_converged
    assert float(hg.lower.grad_norm.max()) <= 1e-9
    assert torch.allclose(hg.eps, hg.lower.grad_norm / problem.mu)


def test_nesterov_stops_at_the_rounding_floor():
    """A float32 solve asked for an unreachable tolerance stops after ``stall_iterations``
    without progress instead of running to max_iter, warns, and keeps its certificate."""
    from bilevel.autodiff import Cost, LowerLevel
    from bilevel.lower import ConvergenceWarning, solve_lower

    gen = torch.Generator().manual_seed(0)
    n, dim = 3, 50
    eig = torch.logspace(-1, 1, dim).expand(n, dim)
    b = torch.randn(n, dim, generator=gen)
    theta = torch.zeros(1, requires_grad=True)

    def h(x, th, batch):
        e, c = batch
        return 0.5 * (e * x * x).sum(1) - (x * c).sum(1) + th * x.sum(1)

    problem = BilevelProblem(h, lambda x, th, _: (x * x).sum(1), theta, mu=0.1, lipschitz=10.0)
    lower = LowerLevel(problem, (eig, b), Cost())
    x0 = torch.zeros(n, dim)
    with pytest.warns(ConvergenceWarning, match="no longer decreased"):
        sol = solve_lower(lower, x0, 1e-12, Nesterov(max_iter=20_000, stall_iterations=200), 0.1)
    assert bool(sol.stalled.all()) and not sol.all_converged
    assert int(sol.iterations.max()) < 2000  # far below max_iter
    assert float(sol.grad_norm.max()) < 1e-4  # it did converge to the float32 floor first
    exact = b / eig
    assert bool(((sol.x - exact).norm(dim=1) <= sol.distance_bound * (1 + 1e-3) + 1e-6).all())
    # a reachable tolerance converges as before, without the stall flag
    sol = solve_lower(lower, x0, 1e-3, Nesterov(stall_iterations=200), 0.1)
    assert sol.all_converged and not bool(sol.stalled.any())
    # stall_iterations=None runs to max_iter
    never = Nesterov(max_iter=3000, stall_iterations=None)
    with pytest.warns(ConvergenceWarning, match="reached max_iter"):
        sol = solve_lower(lower, x0, 1e-12, never, 0.1)
    assert int(sol.iterations.max()) == 3000


def test_per_instance_stopping_easy_instances_stop_paying():
    """One ill-conditioned instance among easy ones: the easy ones stop early."""
    n, dim = 5, 20
    gen = torch.Generator().manual_seed(0)
    eig = torch.ones(n, dim, dtype=F64)
    eig[0] = torch.logspace(-1, 1, dim, dtype=F64)  # hard: condition number 100
    a = torch.diag_embed(eig)
    b = torch.randn(n, dim, generator=gen, dtype=F64)
    theta = torch.zeros(1, dtype=F64, requires_grad=True)

    def h(x, th, batch):
        a_, b_ = batch
        return 0.5 * torch.einsum("bi,bij,bj->b", x, a_, x) - (x * b_).sum(1) + th * x.sum(1)

    def f(x, th, batch):
        return 0.5 * (x * x).sum(1)

    problem = BilevelProblem(h, f, theta, mu=0.1, lipschitz=10.0)
    for solver in (GradientDescent(), Nesterov(), LBFGS()):
        hg = Implicit(lower_solver=solver, compute_bound=False)(
            problem, (a, b), torch.zeros(n, dim, dtype=F64), lower_tol=1e-8
        )
        it = hg.lower.iterations
        assert int(it[0]) > 3 * int(it[1:].max()), (solver, it)
        # every gradient evaluation is paid by an instance that was still active
        assert hg.lower.grad_evals <= int((it + 1).sum()) + 1 * n * 40 * isinstance(solver, LBFGS)
        assert hg.lower.grad_evals < n * int(it.max())


def test_warm_start_at_solution_costs_no_iterations():
    problem, batch, theta = quadratic_problem(n_batch=3, dim=5)
    _, x_star = quadratic_exact(problem, batch)
    hg = Implicit()(problem, batch, x_star, lower_tol=1e-8, adjoint_tol=1e-8)
    assert int(hg.lower.iterations.max()) == 0
    again = Implicit()(problem, batch, x_star, lower_tol=1e-8, adjoint0=hg.adjoint)
    assert int(again.linear.iterations.max()) == 0


def test_accumulate_into_grad_and_optimizer_step():
    problem, batch, theta = quadratic_problem()
    opt = torch.optim.SGD([theta], lr=0.1)
    before = theta.detach().clone()
    opt.zero_grad()
    hg = Implicit()(problem, batch, torch.zeros(4, 6, dtype=F64), lower_tol=1e-10, accumulate=True)
    assert torch.equal(theta.grad, hg.grad[0])
    opt.step()
    assert torch.allclose(theta.detach(), before - 0.1 * hg.grad[0])


def test_cost_is_reported():
    problem, batch, theta = quadratic_problem()
    hg = Implicit(compute_bound=True)(problem, batch, torch.zeros(4, 6, dtype=F64), lower_tol=1e-6)
    assert hg.cost.grad_evals >= hg.lower.grad_evals > 0
    assert hg.cost.hvps >= hg.linear.matvecs > 0
    assert hg.cost.vjps > 0 and hg.cost.wall_time > 0
    # the Jacobian products of the bound's ‖J‖ are oracle calls too
    assert 0 < hg.cost.bound_products <= hg.cost.vjps
    assert hg.cost.oracle_calls == hg.cost.grad_evals + hg.cost.hvps + hg.cost.bound_products
    bare = Implicit()(problem, batch, torch.zeros(4, 6, dtype=F64))  # no bound by default
    assert bare.cost.bound_products == 0 and bare.bound is None


def test_float32_runs():
    problem, batch, theta = quadratic_problem(dtype=torch.float32)
    expected, _ = quadratic_exact(problem, batch)
    hg = Implicit()(problem, batch, torch.zeros(4, 6), lower_tol=1e-5, adjoint_tol=1e-5)
    assert hg.grad[0].dtype == torch.float32
    assert float((hg.grad[0] - expected).norm() / expected.norm()) < 1e-3


def test_estimated_mu_is_flagged():
    problem, batch, theta = quadratic_problem()
    problem = dataclasses.replace(problem, mu=None)
    hg = Implicit()(problem, batch, torch.zeros(4, 6, dtype=F64), lower_tol=1e-8)
    assert hg.mu_estimated and not hg.bound_certified
    assert 0.4 < hg.mu < 2.0


# -- bad input -------------------------------------------------------------------------------


def test_mu_must_be_positive():
    problem, batch, theta = quadratic_problem()
    with pytest.raises(BilevelError, match="mu"):
        BilevelProblem(problem.lower_energy, problem.upper_loss, theta, mu=0.0)
    with pytest.raises(BilevelError, match="mu"):
        BilevelProblem(problem.lower_energy, problem.upper_loss, theta, mu=-1.0)


def test_mismatched_shapes_are_named():
    problem, batch, theta = quadratic_problem(n_batch=4)
    with pytest.raises(BilevelError, match="leading dimension"):
        Implicit()(problem, batch, torch.zeros(3, 6, dtype=F64))
    with pytest.raises(BilevelError, match="adjoint0"):
        Implicit()(problem, batch, torch.zeros(4, 6, dtype=F64), adjoint0=torch.zeros(4, 5))

    def bad_energy(x, th, b):
        return (x * x).sum()

    p2 = BilevelProblem(bad_energy, problem.upper_loss, theta, mu=1.0)
    with pytest.raises(BilevelError, match=r"one value per instance"):
        Implicit()(p2, batch, torch.zeros(4, 6, dtype=F64))


def test_non_finite_inputs_are_named():
    problem, batch, theta = quadratic_problem()
    x0 = torch.zeros(4, 6, dtype=F64)
    x0[1, 2] = math.nan
    with pytest.raises(NonFiniteError, match="x"):
        Implicit()(problem, batch, x0)
    with torch.no_grad():
        theta[0] = math.inf
    with pytest.raises(NonFiniteError, match="theta"):
        Implicit()(problem, batch, torch.zeros(4, 6, dtype=F64))


def test_non_strongly_convex_energy_is_detected_by_cg():
    theta = torch.ones(2, dtype=F64, requires_grad=True)

    def h(x, th, _):  # indefinite in x[:, 1] direction once th[1] < 0
        return 0.5 * x[:, 0] ** 2 + 0.5 * th[1] * x[:, 1] ** 2 - (x[:, :2] * th).sum(1)

    def f(x, th, _):
        return (x * x).sum(1)

    problem = BilevelProblem(h, f, theta, mu=1.0, lipschitz=1.0)
    with torch.no_grad():
        theta[1] = -1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(NotStronglyConvexError):
            Implicit(CG(), lower_solver=GradientDescent(max_iter=5))(
                problem, None, torch.zeros(1, 2, dtype=F64), lower_tol=1e-6
            )


def test_theta_without_grad_is_rejected():
    with pytest.raises(BilevelError, match="requires_grad"):
        BilevelProblem(lambda x, t, b: x.sum(1), lambda x, t, b: x.sum(1), torch.zeros(2), mu=1)


def test_theta_as_module_parameters():
    """θ given as an nn.Module: hypergradients come back per parameter, in order."""
    problem, batch, theta = quadratic_problem(n_batch=3, dim=5, n_params=3, seed=7)
    expected, _ = quadratic_exact(problem, batch)

    class Shift(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(theta.detach()[:2].clone())
            self.b = torch.nn.Parameter(theta.detach()[2:].clone())

    module = Shift().double()

    def h(x, mod, b):
        return problem.lower_energy(x, torch.cat([mod.a, mod.b]), b)

    def f(x, mod, b):
        return problem.upper_loss(x, torch.cat([mod.a, mod.b]), b)

    p2 = BilevelProblem(h, f, module, mu=0.5)
    hg = Implicit()(p2, batch, torch.zeros(3, 5, dtype=F64), lower_tol=1e-11, adjoint_tol=1e-11)
    assert [g.shape for g in hg.grad] == [(2,), (1,)]
    assert torch.allclose(torch.cat(hg.grad), expected, atol=1e-8)
    module.zero_grad()
    hg = Implicit()(p2, batch, hg.x, lower_tol=1e-11, adjoint_tol=1e-11, accumulate=True)
    assert torch.allclose(module.a.grad, expected[:2], atol=1e-8)


def test_truncated_unrolling_is_biased_but_cheaper_in_memory():
    problem, batch, theta = quadratic_problem(n_batch=2, dim=5, seed=8)
    expected, x_star = quadratic_exact(problem, batch)
    full = Unrolled(steps=400)(problem, batch, torch.zeros(2, 5, dtype=F64))
    trunc = Unrolled(steps=400, truncate=20)(problem, batch, torch.zeros(2, 5, dtype=F64))
    err_full = float((full.grad[0] - expected).norm())
    err_trunc = float((trunc.grad[0] - expected).norm())
    assert err_full < 1e-6 < err_trunc
    assert full.bound is None and trunc.cost.hvps < full.cost.hvps


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_unchanged_on_cuda():
    problem, batch, theta = quadratic_problem(n_batch=3, dim=5, seed=9)
    expected, _ = quadratic_exact(problem, batch)
    with torch.no_grad():
        theta.data = theta.data.cuda()
    batch = tuple(t.cuda() for t in batch)
    hg = Implicit()(problem, batch, torch.zeros(3, 5, dtype=F64, device="cuda"), lower_tol=1e-10)
    assert hg.grad[0].device.type == "cuda"
    assert torch.allclose(hg.grad[0].cpu(), expected, atol=1e-7)


def test_hypergradient_given_w_reports_lazily_and_exactly():
    """The fixed-work hypergradient at a given w (the lower solve stops at once, CG runs M
    iterations): z against the dense reference with the same adjoint; loss, ε and δ, which
    are computed when read, against their definitions; the report survives pickling."""
    import pickle

    problem, theta = logistic_setup()
    w = Implicit(CG(max_iter=500))(
        problem, None, torch.zeros(2, 5, dtype=F64), lower_tol=1e-12, adjoint_tol=1e-12
    ).x
    est = Implicit(
        CG(max_iter=5, fixed_iterations=True),
        lower_solver=Nesterov(max_iter=0),
        compute_bound=False,
        warn_unconverged=False,
    )
    hg = est(problem, None, w, lower_tol=math.inf, adjoint_tol=0.0)
    assert hg.cost.grad_evals == 2 and hg.cost.hvps == 10 and hg.cost.vjps == 2
    assert torch.equal(hg.linear.iterations, torch.full((2,), 5))
    # the same z from the adjoint it reports: ∇_θ f̄ − (1/B) Σ Jᵢᵀ qᵢ (f does not depend on θ)
    with torch.enable_grad():
        x = w.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(problem.energy(x, None).sum(), x, create_graph=True)
        (gf,) = torch.autograd.grad(problem.loss(x, None).sum(), x)
        (jtq,) = torch.autograd.grad(g, theta, hg.adjoint, retain_graph=True)
        hq = torch.autograd.grad(g, x, hg.adjoint)[0]
    assert torch.allclose(hg.grad[0], -jtq / 2, rtol=1e-12, atol=0)
    again = pickle.loads(pickle.dumps(hg))
    for h in (hg, again):
        assert h.loss == pytest.approx(float(problem.loss(w, None).mean()), rel=1e-15)
        gnorm = torch.linalg.vector_norm(g.detach(), dim=1)
        assert torch.allclose(h.eps, gnorm / problem.mu, rtol=1e-12)
        true_delta = torch.linalg.vector_norm(hq - gf, dim=1)  # recursive ≈ true residual
        assert torch.allclose(h.delta, true_delta, rtol=1e-6, atol=1e-12)
        assert h.mu == problem.mu and not h.mu_estimated
