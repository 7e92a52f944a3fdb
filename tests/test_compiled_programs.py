"""The whole programs of bilevel.compiled (ProgramNesterov, ProgramHypergradient) against the
eager library, in float64.

The programs are checked eagerly (``compile=False``: the module that ``torch.export`` and
AOTInductor compile, with a Python loop for the ``while_loop``); compiling one takes tens of
seconds to minutes on a loaded two-core machine, so the test that really compiles runs only
with ``BILEVEL_TEST_COMPILE=1`` (inductor's cache then in a temporary folder).
"""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

from bilevel import CG, BilevelProblem, Implicit, Nesterov, compiled
from bilevel.autodiff import LowerLevel
from bilevel.compiled import (
    COMPILE_SECONDS,
    CompiledNesterov,
    CompileWarning,
    ProgramHypergradient,
    ProgramNesterov,
)
from bilevel.problem import BilevelError, NonFiniteError

F64 = torch.float64
COMPILE = os.environ.get("BILEVEL_TEST_COMPILE") == "1"


def logistic(n: int = 120, d: int = 7, batch: int = 3, seed: int = 0, reg: bool = False):
    """Per-feature ℓ2 logistic regression, ``batch`` instances with their own labels; θ a list
    (log-strengths and a shift of the upper target), f depending on θ."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=F64)
    y = (torch.rand(batch, n, generator=gen, dtype=F64) < 0.5).to(F64)
    log_l2 = torch.full((d,), -1.0, dtype=F64).requires_grad_(True)
    shift = torch.tensor(0.1, dtype=F64).requires_grad_(True)

    def h(w, th, labels):
        z = F.linear(w, x)
        return (F.softplus(z) - labels * z).mean(1) + 0.5 * (th[0].exp() * w * w).sum(1)

    def f(w, th, labels):
        return 0.5 * ((w - th[1]) ** 2).sum(1) + 0.01 * (labels.mean(1) * w.sum(1))

    def r(th):
        return 0.5 * (th[0] ** 2).sum() + th[1] ** 2

    lip = 0.25 * float(torch.linalg.matrix_norm(x, ord=2)) ** 2 / n + 1.0
    problem = BilevelProblem(
        h,
        f,
        [log_l2, shift],
        mu=math.exp(-1.0),
        lipschitz=lip,
        upper_regulariser=r if reg else None,
    )
    return problem, y, torch.zeros(batch, d, dtype=F64), x


def solve(solver, problem, batch, x0, tol, mu):
    return solver.solve(LowerLevel(problem, batch), x0, tol, mu)


@pytest.mark.parametrize("unroll", [1, 4])
@pytest.mark.parametrize("mu", [math.exp(-1.0), None], ids=["momentum", "fista"])
def test_lower_program_equals_nesterov(mu, unroll) -> None:
    """An unreachable tolerance: both run max_iter steps, to the same point and report (with
    4 steps per pass, the 3 steps past max_iter of the last pass change nothing but are
    counted as evaluations)."""
    problem, batch, x0, _ = logistic()
    ref = solve(Nesterov(max_iter=37), problem, batch, x0, 0.0, mu)
    program = ProgramNesterov(max_iter=37, unroll=unroll, compile=False)
    got = solve(program, problem, batch, x0, 0.0, mu)
    assert torch.allclose(got.x, ref.x, rtol=1e-13, atol=1e-15)
    assert torch.allclose(got.energy, ref.energy, rtol=1e-13)
    assert torch.allclose(got.grad_norm, ref.grad_norm, rtol=1e-10)
    assert got.iterations.tolist() == ref.iterations.tolist() == [37] * 3
    assert got.grad_evals == ref.grad_evals + (0 if unroll == 1 else 3 * 3)


def test_lower_program_stops_each_instance_at_its_tolerance() -> None:
    """The test after every step: as the chunked solver with chunks of one step (instances
    frozen where they stop), per-instance tolerances, each stopping at a different step."""
    problem, batch, x0, _ = logistic(seed=1)
    tol = torch.tensor([1e-3, 1e-6, 1e-9], dtype=F64)
    ref = solve(CompiledNesterov(500, chunk=1, compile=False), problem, batch, x0, tol, 0.3)
    got = solve(ProgramNesterov(500, compile=False), problem, batch, x0, tol, 0.3)
    assert got.iterations.tolist() == ref.iterations.tolist()
    assert len(set(got.iterations.tolist())) == 3
    assert torch.allclose(got.x, ref.x, rtol=1e-12, atol=1e-15)
    assert bool(got.converged.all()) and bool((got.grad_norm <= tol).all())
    # the energy is the last evaluation's, at each instance's final (frozen) point
    with torch.no_grad():
        energy = problem.lower_energy(got.x, problem.theta, batch)
    assert torch.allclose(got.energy, energy, rtol=1e-13, atol=0.0)
    last = max(got.iterations.tolist())  # passes of 4 steps, every instance evaluated
    assert got.grad_evals == 3 * (1 + 4 * math.ceil(last / 4))


def test_lower_program_at_a_start_that_meets_the_tolerance() -> None:
    """The start's gradient is the program's first evaluation: a start that meets every
    tolerance is returned as a copy after that one evaluation (Nesterov's report), one that
    meets some stops those instances there; ``max_iter=0`` gives Nesterov's report."""
    problem, batch, x0, _ = logistic(seed=12)
    x = solve(Nesterov(max_iter=300), problem, batch, x0, 1e-9, 0.3).x
    for solver in (ProgramNesterov(50, compile=False), ProgramNesterov(0, compile=False)):
        ref = solve(Nesterov(max_iter=solver.max_iter), problem, batch, x, 1e-6, 0.3)
        got = solve(solver, problem, batch, x, 1e-6, 0.3)
        assert torch.equal(got.x, x) and got.x.data_ptr() != x.data_ptr()
        assert got.iterations.tolist() == ref.iterations.tolist() == [0, 0, 0]
        assert got.grad_evals == ref.grad_evals == 3
        assert torch.allclose(got.grad_norm, ref.grad_norm, rtol=1e-12)
        assert torch.allclose(got.energy, ref.energy, rtol=1e-13)
    start = x.clone()
    start[1] = 0.0  # instance 1 starts far from its solution
    tol = torch.tensor([1e-6, 1e-6, 1e-6], dtype=F64)
    ref = solve(CompiledNesterov(50, chunk=1, compile=False), problem, batch, start, tol, 0.3)
    got = solve(ProgramNesterov(50, compile=False), problem, batch, start, tol, 0.3)
    assert got.iterations.tolist() == ref.iterations.tolist()
    assert got.iterations[0] == got.iterations[2] == 0 < got.iterations[1]
    assert torch.allclose(got.x, ref.x, rtol=1e-12, atol=1e-15)


def test_lower_program_raises_on_divergence() -> None:
    problem, batch, x0, _ = logistic(seed=2)
    with pytest.raises(NonFiniteError):
        solve(ProgramNesterov(500, lipschitz=1e-6, compile=False), problem, batch, x0, 0.0, 0.3)


def test_lower_program_delegates_a_module_theta() -> None:
    """θ as an nn.Module cannot be passed to a program: warned, solved by CompiledNesterov."""
    gen = torch.Generator().manual_seed(3)
    data = torch.randn(40, 4, generator=gen, dtype=F64)
    model = torch.nn.Linear(4, 1, dtype=F64)

    def h(w, m, _):
        return 0.5 * ((F.linear(w, data) - m.weight.sum()) ** 2).mean(1) + 0.5 * (w * w).sum(1)

    problem = BilevelProblem(h, lambda w, m, _: w.sum(1), model, mu=1.0, lipschitz=20.0)
    x0 = torch.zeros(2, 4, dtype=F64)
    ref = solve(CompiledNesterov(30, lipschitz=20.0, compile=False), problem, None, x0, 0.0, 1.0)
    with pytest.warns(CompileWarning, match="nn.Module|tensor, sequence or dict"):
        got = solve(ProgramNesterov(30, compile=False), problem, None, x0, 0.0, 1.0)
    assert torch.equal(got.x, ref.x)
    with pytest.raises(BilevelError, match="tensor, sequence or dict"):
        ProgramHypergradient(5, compile=False)(problem, got.x)


@pytest.mark.parametrize("reg", [False, True], ids=["plain", "regulariser"])
def test_hypergradient_program_equals_implicit_cg(reg) -> None:
    """z, q and the iteration count of Implicit(CG(M, fixed_iterations=True)) at x."""
    problem, batch, x0, _ = logistic(seed=4, reg=reg)
    x = solve(Nesterov(max_iter=200), problem, batch, x0, 1e-10, 0.3).x
    est = Implicit(
        CG(max_iter=6, fixed_iterations=True),
        lower_solver=Nesterov(max_iter=0),
        compute_bound=False,
        warn_unconverged=False,
    )
    ref = est(problem, batch, x, lower_tol=math.inf, adjoint_tol=0.0)
    got = ProgramHypergradient(max_iter=6, compile=False)(problem, x, batch)
    assert len(got.grad) == 2
    for g, r in zip(got.grad, ref.grad):
        assert torch.allclose(g, r, rtol=1e-12, atol=1e-15)
    assert torch.allclose(got.adjoint, ref.adjoint, rtol=1e-12, atol=1e-15)
    assert got.iterations.tolist() == ref.linear.iterations.tolist() == [6, 6, 6]


def test_hessian_product_split_computes_the_forward_pass_once() -> None:
    """The Hessian-vector product of a linear model split at its loop-invariant part: the
    part inside the loop has two products with X (Xv and Xᵀ(s ⊙ Xv)), not the forward
    pass's Xx as well (computed once, outside), and the split gives the unsplit graph's
    products and the autograd Hessian's."""
    problem, labels, x0, _ = logistic(seed=11)
    x = solve(Nesterov(max_iter=50), problem, labels, x0, 0.0, 0.3).x
    theta = [t.detach() for t in problem.theta]

    def h(u, ps, ls):
        return problem.lower_energy(u, ps, ls[0]).sum()

    grad_h = torch.func.grad(h)

    def hvp(u, ps, ls, v):
        return torch.func.vjp(lambda w: grad_h(w, ps, ls), u)[1](v)[0]

    graph = compiled._trace(hvp, x, theta, [labels], x)
    at_point, product = compiled._hoist(graph)

    def products(gm) -> int:
        return sum(n.target is torch.ops.aten.mm.default for n in gm.graph.nodes)

    assert products(at_point) == 1 and products(product) == 2  # Xx; Xv and Xᵀ(s ⊙ Xv)
    fixed = at_point(x, *theta, labels)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    got = product(*fixed, v)[0]
    assert torch.allclose(got, graph(x, theta, [labels], v), rtol=1e-12, atol=1e-15)
    hess = torch.autograd.functional.hessian(  # (B, d, B, d); the instances are independent
        lambda w: problem.lower_energy(w, problem.theta, labels).sum(), x
    )
    want = torch.einsum("idje,je->id", hess, v)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-15)


def test_hypergradient_program_stops_in_the_underflow_range() -> None:
    """Many iterations on d = 7: CG reaches the underflow range and stops there, as CG does."""
    problem, batch, x0, _ = logistic(seed=5)
    x = solve(Nesterov(max_iter=200), problem, batch, x0, 1e-10, 0.3).x
    est = Implicit(
        CG(max_iter=200, fixed_iterations=True),
        lower_solver=Nesterov(max_iter=0),
        compute_bound=False,
        warn_unconverged=False,
    )
    ref = est(problem, batch, x, lower_tol=math.inf, adjoint_tol=0.0)
    got = ProgramHypergradient(max_iter=200, compile=False)(problem, x, batch)
    assert got.iterations.tolist() == ref.linear.iterations.tolist()
    assert max(got.iterations.tolist()) < 200
    for g, r in zip(got.grad, ref.grad):
        assert torch.allclose(g, r, rtol=1e-10, atol=1e-14)


def test_hypergradient_program_raises_on_nonfinite_input() -> None:
    problem, batch, x0, _ = logistic(seed=6)
    x = x0.clone()
    x[1, 2] = math.nan
    with pytest.raises(BilevelError, match="not finite|broke down"):
        ProgramHypergradient(max_iter=5, compile=False)(problem, x, batch)


def test_program_sees_data_changed_in_place(monkeypatch) -> None:
    """The energies' closed-over data are constants of a program: changed in place, the
    program is traced again (here run eagerly) and the result follows the data."""
    traced = []
    trace = compiled._trace
    monkeypatch.setattr(compiled, "_trace", lambda *a: traced.append(1) or trace(*a))
    problem, batch, x0, data = logistic(seed=7)
    x = solve(Nesterov(max_iter=50), problem, batch, x0, 0.0, 0.3).x
    program = ProgramHypergradient(max_iter=4, compile=False)
    before = program(problem, x, batch).grad[0]
    n_traced = len(traced)
    assert torch.equal(program(problem, x, batch).grad[0], before)
    assert len(traced) == n_traced  # reused
    data.mul_(1.5)
    est = Implicit(
        CG(max_iter=4, fixed_iterations=True),
        lower_solver=Nesterov(max_iter=0),
        compute_bound=False,
        warn_unconverged=False,
    )
    ref = est(problem, batch, x, lower_tol=math.inf, adjoint_tol=0.0).grad[0]
    after = program(problem, x, batch).grad[0]
    assert len(traced) > n_traced  # built again
    assert not torch.allclose(before, after)
    assert torch.allclose(after, ref, rtol=1e-12, atol=1e-15)


def test_program_falls_back_when_export_fails(monkeypatch) -> None:
    """An export that raises gives a CompileWarning (once) and the eager result."""

    def broken(*args, **kwargs):
        raise RuntimeError("cannot export this energy")

    monkeypatch.setattr(torch.export, "export", broken)
    problem, batch, x0, _ = logistic(seed=8)
    ref = solve(Nesterov(max_iter=20), problem, batch, x0, 0.0, 0.3)
    with pytest.warns(CompileWarning, match="cannot export this energy"):
        got = solve(ProgramNesterov(max_iter=20), problem, batch, x0, 0.0, 0.3)
    assert torch.allclose(got.x, ref.x, rtol=1e-13, atol=1e-15)
    with pytest.warns(CompileWarning, match="cannot export this energy"):
        hyper = ProgramHypergradient(max_iter=3)(problem, got.x, batch)
    eager = ProgramHypergradient(max_iter=3, compile=False)(problem, got.x, batch)
    assert torch.equal(hyper.grad[0], eager.grad[0])


@pytest.mark.skipif(not COMPILE, reason="compiles (minutes); set BILEVEL_TEST_COMPILE=1")
def test_compiled_programs_equal_eager(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    problem, batch, x0, _ = logistic(seed=9)
    tol = torch.tensor([1e-4, 1e-8, 0.0], dtype=F64)
    ref = solve(ProgramNesterov(60, compile=False), problem, batch, x0, tol, 0.3)
    got = solve(ProgramNesterov(60), problem, batch, x0, tol, 0.3)
    assert got.iterations.tolist() == ref.iterations.tolist()
    assert torch.allclose(got.x, ref.x, rtol=1e-12, atol=1e-15)
    assert torch.allclose(got.energy, ref.energy, rtol=1e-12, atol=0.0)
    ref_h = ProgramHypergradient(8, compile=False)(problem, got.x, batch)
    got_h = ProgramHypergradient(8)(problem, got.x, batch)
    for g, r in zip(got_h.grad, ref_h.grad):
        assert torch.allclose(g, r, rtol=1e-12, atol=1e-15)
    names = {key[0] for key in COMPILE_SECONDS}
    assert {"ProgramNesterov", "ProgramHypergradient"} <= names
    programs = set(COMPILE_SECONDS)
    ProgramHypergradient(8)(problem, got.x, batch)
    assert set(COMPILE_SECONDS) == programs  # reused, not compiled again


def test_programs_are_per_fixed_part_of_theta() -> None:
    """θ's tensors without gradients are constants of a program: two problems with the same
    energies but other such tensors get their own programs and their own results."""

    def h(w, th, _):
        return 0.5 * (th[0].exp() * (w - th[1]) ** 2).sum(1)

    def f(w, th, _):
        return 0.5 * (w**2).sum(1)

    x = torch.full((2, 3), 0.5, dtype=F64)
    results = []
    for target in (0.0, 1.0):
        a = torch.zeros(3, dtype=F64).requires_grad_(True)
        problem = BilevelProblem(h, f, [a, torch.full((3,), target, dtype=F64)], mu=1.0)
        est = Implicit(
            CG(max_iter=2, fixed_iterations=True),
            lower_solver=Nesterov(max_iter=0),
            compute_bound=False,
            warn_unconverged=False,
        )
        ref = est(problem, None, x, lower_tol=math.inf, adjoint_tol=0.0).grad[0]
        got = ProgramHypergradient(max_iter=2, compile=False)(problem, x).grad[0]
        assert torch.allclose(got, ref, rtol=1e-12, atol=1e-15)
        results.append(got)
    assert not torch.allclose(results[0], results[1])


def test_programs_disabled_by_environment(monkeypatch) -> None:
    """``BILEVEL_COMPILE=0``: nothing is exported, no warning, the eager result."""

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.export must not be called")

    monkeypatch.setattr(torch.export, "export", forbidden)
    monkeypatch.setenv("BILEVEL_COMPILE", "0")
    problem, batch, x0, _ = logistic(seed=10)
    ref = solve(Nesterov(max_iter=15), problem, batch, x0, 0.0, 0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = solve(ProgramNesterov(max_iter=15), problem, batch, x0, 0.0, 0.3)
        hyper = ProgramHypergradient(max_iter=3)(problem, got.x, batch)
    assert torch.allclose(got.x, ref.x, rtol=1e-13, atol=1e-15)
    eager = ProgramHypergradient(max_iter=3, compile=False)(problem, got.x, batch)
    assert torch.equal(hyper.grad[0], eager.grad[0])
