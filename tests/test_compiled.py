"""The compiled small-problem path (bilevel.compiled) against the eager solvers.

The chunk programs are checked eagerly (``compile=False``: the same Python functions that
``torch.compile`` traces); compiling them takes tens of seconds on a loaded two-core machine,
so the tests that really compile run only with ``BILEVEL_TEST_COMPILE=1``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import quadratic_exact, quadratic_problem

from bilevel import CG, BilevelProblem, Implicit, Nesterov
from bilevel.autodiff import LowerLevel
from bilevel.compiled import (
    COMPILE_SECONDS,
    CompiledCG,
    CompiledNesterov,
    CompileWarning,
    compile_enabled,
)
from bilevel.problem import BilevelError, NonFiniteError, NotStronglyConvexError

F64 = torch.float64
COMPILE = os.environ.get("BILEVEL_TEST_COMPILE") == "1"


def logistic(n: int = 120, d: int = 7, batch: int = 3, seed: int = 0, dtype=F64):
    """Per-feature ℓ2 logistic regression, ``batch`` instances with their own labels."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=dtype)
    y = (torch.rand(batch, n, generator=gen, dtype=dtype) < 0.5).to(dtype)
    theta = torch.full((d,), -1.0, dtype=dtype).requires_grad_(True)

    def h(w, th, labels):
        z = F.linear(w, x)
        return (F.softplus(z) - labels * z).mean(1) + 0.5 * (th.exp() * w * w).sum(1)

    def f(w, th, labels):
        return 0.5 * ((w - 0.1) ** 2).sum(1)

    lip = 0.25 * float(torch.linalg.matrix_norm(x, ord=2)) ** 2 / n + 1.0
    problem = BilevelProblem(h, f, theta, mu=math.exp(-1.0), lipschitz=lip)
    return problem, y, torch.zeros(batch, d, dtype=dtype)


def solve(solver, problem, batch, x0, tol, mu):
    return solver.solve(LowerLevel(problem, batch), x0, tol, mu)


@pytest.mark.parametrize("mu", [math.exp(-1.0), None], ids=["momentum", "fista"])
def test_eager_chunks_equal_nesterov(mu) -> None:
    """With an unreachable tolerance both run max_iter iterations (37: three chunks of 10 and
    an eager remainder of 7) along the same trajectory."""
    problem, batch, x0 = logistic()
    ref = solve(Nesterov(max_iter=37), problem, batch, x0, 0.0, mu)
    got = solve(CompiledNesterov(max_iter=37, compile=False), problem, batch, x0, 0.0, mu)
    assert (got.iterations == 37).all() and (ref.iterations == 37).all()
    assert torch.allclose(got.x, ref.x, rtol=1e-12, atol=1e-15)
    assert torch.allclose(got.grad_norm, ref.grad_norm, rtol=1e-10)
    assert got.grad_evals == ref.grad_evals == 38 * 3


def test_per_instance_stopping_and_certificate() -> None:
    """Instances stop at their own tolerance (tested every chunk) and freeze; the reported
    gradient norm is that of the returned point."""
    problem, batch, x0 = logistic(batch=4)
    tol = torch.tensor([1e-2, 1e-5, 1e-8, 1e-11], dtype=F64)
    sol = solve(
        CompiledNesterov(max_iter=2000, chunk=5, compile=False), problem, batch, x0, tol, 0.3
    )
    assert sol.converged.all()
    assert (sol.iterations % 5 == 0).all()
    assert (sol.iterations[:-1] <= sol.iterations[1:]).all()
    _, grad = LowerLevel(problem, batch).value_and_grad(sol.x)
    assert torch.allclose(grad.norm(dim=1), sol.grad_norm, rtol=1e-10)
    exact = solve(Nesterov(max_iter=2000), problem, batch, x0, 1e-13, 0.3).x
    mu = math.exp(-1.0)  # the ℓ2 term alone
    assert ((sol.x - exact).norm(dim=1) <= sol.grad_norm / mu + 1e-12).all()


def test_instances_converged_at_the_start_stay_there() -> None:
    problem, batch, x0 = logistic(batch=3)
    exact = solve(Nesterov(max_iter=3000), problem, batch, x0, 1e-12, 0.3).x
    start = torch.cat([exact[:1], x0[1:]])  # instance 0 starts at its solution
    sol = solve(CompiledNesterov(max_iter=500, compile=False), problem, batch, start, 1e-8, 0.3)
    assert sol.converged.all() and sol.iterations[0] == 0 and (sol.iterations[1:] > 0).all()
    assert torch.equal(sol.x[0], start[0])


def test_without_a_lipschitz_bound_delegates_to_nesterov() -> None:
    problem, batch, x0 = logistic()
    problem = dataclasses.replace(problem, lipschitz=None)
    ref = solve(Nesterov(max_iter=50), problem, batch, x0, 1e-8, 0.3)
    got = solve(CompiledNesterov(max_iter=50, compile=False), problem, batch, x0, 1e-8, 0.3)
    assert torch.equal(got.x, ref.x)


def test_nonfinite_gradient_and_bad_chunk() -> None:
    problem, batch, x0 = logistic()
    with pytest.raises(NonFiniteError):  # a step 1e6 times too long diverges
        solve(
            CompiledNesterov(max_iter=500, lipschitz=1e-6, compile=False),
            problem,
            batch,
            x0 + 1.0,
            0.0,
            None,
        )
    for bad in (0, -2, 1.5, True):
        with pytest.raises(BilevelError, match="chunk"):
            CompiledNesterov(chunk=bad)
        with pytest.raises(BilevelError, match="chunk"):
            CompiledCG(chunk=bad)


def hypergradients(problem, batch, x, solver, reference, adjoint_tol=0.0):
    kwargs = dict(lower_solver=Nesterov(max_iter=0), warn_unconverged=False)
    tols = dict(lower_tol=math.inf, adjoint_tol=adjoint_tol)
    got = Implicit(solver, **kwargs)(problem, batch, x, **tols)
    ref = Implicit(reference, **kwargs)(problem, batch, x, **tols)
    return got, ref


@pytest.mark.parametrize("fixed", [True, False], ids=["fixed", "stopping"])
def test_eager_cg_chunks_equal_cg(fixed: bool) -> None:
    problem, batch, x0 = logistic(batch=4)
    x = solve(Nesterov(max_iter=300), problem, batch, x0, 1e-10, 0.3).x
    got, ref = hypergradients(
        problem,
        batch,
        x,
        CompiledCG(max_iter=23, chunk=5, fixed_iterations=fixed, compile=False),
        CG(max_iter=23, fixed_iterations=fixed),
    )
    assert torch.allclose(got.grad[0], ref.grad[0], rtol=1e-10, atol=1e-15)
    assert torch.equal(got.linear.iterations, ref.linear.iterations)
    assert torch.allclose(got.linear.residual_norm, ref.linear.residual_norm, rtol=1e-6)
    assert torch.allclose(got.linear.min_curvature, ref.linear.min_curvature, rtol=1e-10)
    assert got.linear.matvecs == 23 * 4 if fixed else got.linear.matvecs >= ref.linear.matvecs


def test_cg_chunks_warm_start() -> None:
    problem, batch, x0 = logistic(batch=2)
    x = solve(Nesterov(max_iter=300), problem, batch, x0, 1e-10, 0.3).x
    op = LowerLevel(problem, batch).hessian(x)
    rhs = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    start = 0.9 * CG().solve(op.matvec, rhs, 1e-12).solution
    got = CompiledCG(chunk=3, compile=False).solve(op.matvec, rhs, 1e-9, start)
    ref = CG().solve(op.matvec, rhs, 1e-9, start)
    assert torch.equal(got.iterations, ref.iterations) and got.converged.all()
    assert torch.allclose(got.solution, ref.solution, rtol=1e-10)
    assert got.matvecs >= ref.matvecs >= 2 + ref.iterations.sum()


def test_cg_chunks_after_products_on_a_subset() -> None:
    """An operator whose graph was rebuilt on a subset (products for few instances) is used
    at its full point."""
    problem, batch, x0 = logistic(batch=4)
    x = solve(Nesterov(max_iter=300), problem, batch, x0, 1e-10, 0.3).x
    op = LowerLevel(problem, batch).hessian(x)
    rhs = torch.randn(x.shape, generator=torch.Generator().manual_seed(4), dtype=F64)
    op.matvec(rhs[:1], torch.tensor([2]))  # rebuilds the graph on instance 2
    got = CompiledCG(max_iter=7, chunk=3, compile=False).solve(op.matvec, rhs, 0.0, rhs)
    ref = CG(max_iter=7).solve(LowerLevel(problem, batch).hessian(x).matvec, rhs, 0.0, rhs)
    assert torch.allclose(got.solution, ref.solution, rtol=1e-10)


def test_cg_chunks_on_the_quadratic_match_the_closed_form() -> None:
    problem, batch, _ = quadratic_problem()
    a, m, c, _ = batch
    x = torch.linalg.solve(a, (m @ problem.theta.detach() + c).unsqueeze(-1)).squeeze(-1)
    got, ref = hypergradients(problem, batch, x, CompiledCG(compile=False), CG(), 1e-10)
    assert got.linear.converged.all() and (got.linear.residual_norm <= 1e-10).all()
    assert torch.equal(got.linear.iterations, ref.linear.iterations)
    assert torch.allclose(got.grad[0], quadratic_exact(problem, batch)[0], rtol=1e-8)


def test_cg_breakdown_and_user_operators() -> None:
    """Negative curvature raises as in CG; an operator that is not a Hessian operator of
    the library is solved by eager CG."""
    theta = torch.zeros(2, dtype=F64, requires_grad=True)
    target = torch.tensor([[1.0, 0.5, -1.0]], dtype=F64)
    diag = torch.tensor([1.0, 2.0, -3.0], dtype=F64)
    problem = BilevelProblem(
        lambda x, th, _: 0.5 * (diag * x * x).sum(1) + th.sum() * x.sum(1),
        lambda x, th, _: ((x - target) ** 2).sum(1),
        theta,
    )
    op = LowerLevel(problem, None).hessian(target)
    rhs = torch.tensor([[1.0, 0.1, 1.0]], dtype=F64)
    messages = []
    for solver in (CG(), CompiledCG(chunk=4, compile=False)):
        with pytest.raises(NotStronglyConvexError, match="instance 0 at iteration 1;") as err:
            solver.solve(op.matvec, rhs, 1e-10)
        messages.append(str(err.value))
    assert messages[0] == messages[1]
    b = torch.ones(2, 3, dtype=F64)
    sol = CompiledCG(compile=False).solve(lambda v, i: 2.0 * v, b, 1e-12)
    assert torch.allclose(sol.solution, b / 2)


def test_traced_oracles_equal_autograd() -> None:
    """The torch.func gradient and Hessian-vector product that compiled programs trace equal
    the autograd oracles used eagerly."""
    from bilevel.compiled import _oracle, _vjp_hvp

    problem, batch, x0 = logistic(batch=2)
    x = x0 + 0.3
    lower = LowerLevel(problem, batch)
    energy, grad = lower.value_and_grad(x)
    with torch.no_grad():
        e_f, g_f = _oracle(problem.lower_energy)(x, problem.theta, batch)
        v = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=F64)
        hv = _vjp_hvp(problem.lower_energy)(x, problem.theta, batch)(v)
    assert torch.allclose(e_f, energy, rtol=1e-14) and torch.allclose(g_f, grad, rtol=1e-13)
    ref = lower.hessian(x).matvec(v, torch.arange(2))
    assert torch.allclose(hv, ref, rtol=1e-12, atol=1e-15)


def test_fallback_when_compilation_fails(monkeypatch) -> None:
    """A compiler that raises gives a CompileWarning and the eager result."""

    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler found")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    problem, batch, x0 = logistic(seed=3)
    ref = solve(Nesterov(max_iter=20), problem, batch, x0, 0.0, 0.3)
    with pytest.warns(CompileWarning, match="no C\\+\\+ compiler found"):
        got = solve(CompiledNesterov(max_iter=20), problem, batch, x0, 0.0, 0.3)
    assert torch.allclose(got.x, ref.x, rtol=1e-12)
    with warnings.catch_warnings():  # the eager program is cached: no second warning
        warnings.simplefilter("error")
        solve(CompiledNesterov(max_iter=20), problem, batch, x0, 0.0, 0.3)


def test_disabled_by_environment(monkeypatch) -> None:
    def forbidden(fn, **kwargs):
        raise AssertionError("torch.compile must not be called")

    monkeypatch.setattr(torch, "compile", forbidden)
    monkeypatch.setenv("BILEVEL_COMPILE", "0")
    assert not compile_enabled()
    problem, batch, x0 = logistic(seed=4)
    x = solve(CompiledNesterov(max_iter=30), problem, batch, x0, 0.0, 0.3).x
    ref = solve(Nesterov(max_iter=30), problem, batch, x0, 0.0, 0.3).x
    assert torch.allclose(x, ref, rtol=1e-12)
    got, ref = hypergradients(problem, batch, x, CompiledCG(max_iter=20), CG(max_iter=20))
    assert torch.allclose(got.grad[0], ref.grad[0], rtol=1e-10)


@pytest.mark.skipif(not COMPILE, reason="compiles (minutes); set BILEVEL_TEST_COMPILE=1")
def test_compiled_programs_agree_with_eager_and_are_cached() -> None:
    problem, batch, x0 = logistic(seed=5)
    ref = solve(Nesterov(max_iter=40), problem, batch, x0, 0.0, 0.3)
    got = solve(CompiledNesterov(max_iter=40), problem, batch, x0, 0.0, 0.3)
    assert torch.allclose(got.x, ref.x, rtol=1e-10, atol=1e-14)
    x = ref.x
    got_h, ref_h = hypergradients(
        problem,
        batch,
        x,
        CompiledCG(max_iter=20, fixed_iterations=True),
        CG(max_iter=20, fixed_iterations=True),
    )
    assert torch.allclose(got_h.grad[0], ref_h.grad[0], rtol=1e-10, atol=1e-15)
    assert torch.allclose(got_h.linear.min_curvature, ref_h.linear.min_curvature, rtol=1e-10)
    programs = set(COMPILE_SECONDS)
    assert {key[0] for key in programs} >= {"CompiledNesterov", "CompiledCG"}
    assert all(seconds > 0 for seconds in COMPILE_SECONDS.values())
    solve(CompiledNesterov(max_iter=40), problem, batch, x0, 0.0, 0.3)
    hypergradients(problem, batch, x, CompiledCG(max_iter=20), CG(max_iter=20))
    assert set(COMPILE_SECONDS) == programs  # reused, not compiled again
