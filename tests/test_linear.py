"""Tests for the batched matrix-free linear solvers in ``bilevel.linear``."""

from __future__ import annotations

import math

import pytest
import torch

from bilevel.linear import (
    CG,
    MINRES,
    EigenvalueEstimate,
    FixedPoint,
    LinearSolution,
    LinearSolver,
    Neumann,
    largest_eigenvalue,
)
from bilevel.problem import BilevelError, NonFiniteError, NotStronglyConvexError


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def sym_matrices(eigs: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Batch of symmetric matrices Q diag(eigs_i) Qᵀ with random orthogonal Q, eigs (B, n)."""
    b, n = eigs.shape
    a = torch.randn(b, n, n, generator=_gen(seed), dtype=eigs.dtype)
    q, _ = torch.linalg.qr(a)
    return q @ torch.diag_embed(eigs) @ q.transpose(-1, -2)


def spd_batch(b: int, n: int, cond: float, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """(b, n, n) SPD matrices with eigenvalues log-spaced in [1, cond]."""
    eigs = torch.logspace(0, math.log10(cond), n, dtype=dtype).expand(b, n).clone()
    return sym_matrices(eigs, seed)


class CountingOperator:
    """matvec for a batch of dense matrices, recording the instances it is applied to."""

    def __init__(self, h: torch.Tensor) -> None:
        self.h = h
        self.products = 0
        self.per_instance = torch.zeros(h.shape[0], dtype=torch.long)

    def __call__(self, v: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        assert index.dtype == torch.long and index.dim() == 1
        assert v.shape[0] == index.numel()
        assert index.unique().numel() == index.numel()
        self.products += index.numel()
        self.per_instance[index] += 1
        hv = self.h[index].to(v.dtype) @ v.reshape(v.shape[0], -1, 1)
        return hv.reshape(v.shape)


def assert_products(sol: LinearSolution, op: CountingOperator, initial: int = 0) -> None:
    """``matvecs`` counts every product; an instance's products cover its own iterations (a
    Krylov solver may keep a stopped instance in a masked batch until half have stopped)."""
    assert sol.matvecs == op.products
    assert (op.per_instance >= sol.iterations + initial).all()
    assert op.products >= int(sol.iterations.sum()) + initial * sol.iterations.numel()
    assert (op.per_instance <= int(sol.iterations.max()) + initial).all()


def true_residual(h: torch.Tensor, q: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    hq = (h @ q.reshape(q.shape[0], -1, 1)).reshape(q.shape)
    return torch.linalg.vector_norm((hq - b).reshape(b.shape[0], -1), dim=-1)


def dense_solve(h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.linalg.solve(h, b.reshape(b.shape[0], -1, 1)).reshape(b.shape)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    return torch.linalg.vector_norm((x - ref).reshape(n, -1), dim=-1) / torch.linalg.vector_norm(
        ref.reshape(n, -1), dim=-1
    )


@pytest.mark.parametrize("solver", [CG(), MINRES()], ids=["cg", "minres"])
@pytest.mark.parametrize("event_shape", [(12,), (3, 4), (2, 3, 2)])
def test_krylov_matches_dense_solve(solver: LinearSolver, event_shape: tuple[int, ...]) -> None:
    n = math.prod(event_shape)
    h = spd_batch(4, n, cond=50.0, seed=1)
    b = torch.randn(4, *event_shape, generator=_gen(2), dtype=torch.float64)
    op = CountingOperator(h)
    bnorm = torch.linalg.vector_norm(b.reshape(4, -1), dim=-1)
    tol = 1e-12 * bnorm
    sol = solver.solve(op, b, tol)
    assert isinstance(sol, LinearSolution)
    assert sol.solution.shape == b.shape and sol.solution.dtype == b.dtype
    assert sol.converged.all()
    assert (sol.residual_norm <= tol).all()
    assert (rel_err(sol.solution, dense_solve(h, b)) < 1e-8).all()
    # the reported residual is the residual of the returned solution, up to rounding
    true = true_residual(h, sol.solution, b)
    assert torch.allclose(sol.residual_norm, true, rtol=0.0, atol=1e-13 * bnorm.max())
    assert_products(sol, op)
    assert sol.iterations.dtype == torch.long and sol.converged.dtype == torch.bool
    assert sol.min_curvature.shape == (4,)
    assert (sol.min_curvature >= 1.0 - 1e-10).all() and (sol.min_curvature <= 50.0).all()


@pytest.mark.parametrize("solver", [CG(), MINRES()], ids=["cg", "minres"])
def test_per_instance_stopping(solver: LinearSolver) -> None:
    n, batch = 60, 5
    eigs = torch.empty(batch, n, dtype=torch.float64)
    eigs[0] = torch.logspace(0, 4, n, dtype=torch.float64)  # κ = 1e4
    eigs[1:] = torch.linspace(1.0, 1.5, n, dtype=torch.float64)  # κ = 1.5
    h = sym_matrices(eigs, seed=3)
    b = torch.randn(batch, n, generator=_gen(4), dtype=torch.float64)
    op = CountingOperator(h)
    sol = solver.solve(op, b, 1e-9)
    assert sol.converged.all()
    assert (sol.residual_norm <= 1e-9).all()
    easy = sol.iterations[1:]
    assert int(easy.max()) * 3 < int(sol.iterations[0])
    # converged instances are no longer passed to the operator once most have converged
    assert_products(sol, op)
    assert op.per_instance[0] == sol.iterations[0]
    assert (op.per_instance[1:] <= int(easy.max())).all()
    assert (rel_err(sol.solution, dense_solve(h, b)) < 1e-6).all()


@pytest.mark.parametrize("solver", [CG(), MINRES()], ids=["cg", "minres"])
def test_tolerance_is_absolute_and_independent_of_batch(solver: LinearSolver) -> None:
    h = spd_batch(6, 20, cond=100.0, seed=5)
    b = torch.randn(6, 20, generator=_gen(6), dtype=torch.float64)
    full = solver.solve(CountingOperator(h), b, 1e-6)
    assert (full.residual_norm <= 1e-6).all()
    for i in (0, 3):
        single = solver.solve(CountingOperator(h[i : i + 1]), b[i : i + 1], 1e-6)
        assert single.residual_norm[0] <= 1e-6
        # batched and single products may round differently: allow one iteration either way
        assert abs(int(single.iterations[0]) - int(full.iterations[i])) <= 1
        assert torch.allclose(single.solution[0], full.solution[i], atol=1e-6)
    # scaling b scales the residual: with an absolute tolerance more iterations are needed
    big = solver.solve(CountingOperator(h), 1e3 * b, 1e-6)
    assert (big.iterations >= full.iterations).all()
    assert (big.iterations > full.iterations).any()


@pytest.mark.parametrize(
    "solver", [CG(), MINRES(), FixedPoint(max_iter=50)], ids=["cg", "minres", "fp"]
)
def test_warm_start_from_solution(solver: LinearSolver) -> None:
    h = spd_batch(3, 10, cond=10.0, seed=7)
    b = torch.randn(3, 2, 5, generator=_gen(8), dtype=torch.float64)
    x_star = dense_solve(h, b)
    op = CountingOperator(h)
    sol = solver.solve(op, b, 1e-8, x0=x_star)
    assert sol.converged.all()
    assert (sol.iterations == 0).all()
    assert torch.equal(sol.solution, x_star)
    assert sol.residual_norm.max() <= 1e-8
    # only the initial residual b − H x0 was computed (plus the power iteration of FixedPoint)
    extra = 3 * solver.power_iterations if isinstance(solver, FixedPoint) else 0
    assert op.products == sol.matvecs == 3 + extra


@pytest.mark.parametrize("solver", [CG(), MINRES()], ids=["cg", "minres"])
def test_warm_start_from_nearby_point_counts_products(solver: LinearSolver) -> None:
    h = spd_batch(3, 40, cond=30.0, seed=9)
    b = torch.randn(3, 40, generator=_gen(10), dtype=torch.float64)
    x_star = dense_solve(h, b)
    x0 = x_star + 1e-6 * torch.randn(3, 40, generator=_gen(11), dtype=torch.float64)
    cold = solver.solve(CountingOperator(h), b, 1e-10)
    op = CountingOperator(h)
    warm = solver.solve(op, b, 1e-10, x0=x0)
    assert warm.converged.all()
    assert (warm.iterations < cold.iterations).all()
    assert_products(warm, op, initial=1)
    assert (rel_err(warm.solution, x_star) < 1e-8).all()


def test_cg_raises_on_negative_curvature() -> None:
    n = 8
    eigs = torch.linspace(1.0, 4.0, n, dtype=torch.float64).expand(3, n).clone()
    eigs[2, 0] = -5.0  # instance 2 is indefinite
    h = sym_matrices(eigs, seed=12)
    b = torch.randn(3, n, generator=_gen(13), dtype=torch.float64)
    # put b_2 mostly along the negative eigenvector so that bᵀHb < 0 at the first step
    _, vecs = torch.linalg.eigh(h[2])
    b[2] = vecs[:, 0] + 0.05 * b[2]
    with pytest.raises(NotStronglyConvexError, match=r"instance 2.*") as info:
        CG().solve(CountingOperator(h), b, 1e-10)
    assert "curvature" in str(info.value)


def test_cg_raises_on_zero_curvature() -> None:
    h = torch.diag_embed(torch.tensor([[1.0, 2.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64))
    b = torch.tensor([[0.0, 0.0, 1.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    with pytest.raises(NotStronglyConvexError, match="instance 0"):
        CG().solve(CountingOperator(h), b, 1e-10)


@pytest.mark.parametrize("kind", [CG, MINRES])
@pytest.mark.parametrize("check_every", [None, 4])
@pytest.mark.parametrize("scale", [2e-25, 3e-22, 1e20, 1e37])
def test_krylov_solvers_solve_right_hand_sides_whose_squares_leave_the_float_range(
    scale, check_every, kind
):
    """In float32, ‖b‖² of a b of size 1e-25 underflows to 0 and one of size 1e20 overflows:
    CG and MINRES used to return x = 0 as converged (a false certificate) or to blame the
    operator. They now solve the scaled problem; solution and residual scale with b."""
    h = spd_batch(2, 6, 10.0, seed=31).float()
    b = torch.randn(2, 6, generator=_gen(32)).float()
    b[1] = 0.0  # a zero instance stays zero, converged at once
    solver = kind(max_iter=100, check_every=check_every)
    unit = solver.solve(CountingOperator(h), b, 1e-4)
    sol = solver.solve(CountingOperator(h), scale * b, 1e-4 * scale)
    assert sol.converged.all() and torch.equal(sol.iterations, unit.iterations)
    # equal up to float32 rounding (scale · b is rounded, the scale is not a power of two)
    close = {"rtol": 1e-4, "atol": 1e-6}
    torch.testing.assert_close(sol.solution.double() / scale, unit.solution.double(), **close)
    assert (sol.residual_norm.double() / scale).max().item() <= 1e-4
    # the reported residual is the true one (float64 reference, relative to the scale)
    true = (h.double() @ sol.solution.double().unsqueeze(-1)).squeeze(-1) - scale * b.double()
    assert (true.norm(dim=1)[0] / scale).item() <= 2e-4
    assert torch.equal(sol.solution[1], torch.zeros(6))


@pytest.mark.parametrize("solver", [CG(max_iter=500), MINRES(max_iter=500)])
def test_unreachable_tolerance_stops_at_the_rounding_floor(solver) -> None:
    """tol = 0 cannot be met: the solver stops at machine precision, unconverged, instead of
    iterating on underflowing directions (CG used to report zero curvature there)."""
    h = spd_batch(2, 10, 100.0, seed=21)
    b = torch.randn(2, 10, generator=_gen(22), dtype=torch.float64)
    sol = solver.solve(CountingOperator(h), b, 0.0)
    exact = torch.linalg.solve(h, b.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(sol.solution, exact, rtol=1e-12, atol=1e-12)
    assert not sol.converged.any() and (sol.iterations < 500).all()


def test_minres_solves_symmetric_indefinite() -> None:
    n, batch = 30, 4
    g = _gen(14)
    mags = 1.0 + 9.0 * torch.rand(batch, n, generator=g, dtype=torch.float64)
    signs = torch.where(torch.rand(batch, n, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
    h = sym_matrices(mags * signs, seed=15)
    b = torch.randn(batch, 5, 6, generator=g, dtype=torch.float64)
    op = CountingOperator(h)
    sol = MINRES().solve(op, b, 1e-11)
    assert sol.converged.all()
    assert (rel_err(sol.solution, dense_solve(h, b)) < 1e-8).all()
    assert (true_residual(h, sol.solution, b) < 1e-10).all()
    assert (sol.min_curvature < 0).all()  # the Lanczos Rayleigh quotients saw the negative part
    assert_products(sol, op)


def test_fixed_point_error_decreases() -> None:
    h = spd_batch(3, 16, cond=10.0, seed=16)
    b = torch.randn(3, 4, 4, generator=_gen(17), dtype=torch.float64)
    x_star = dense_solve(h, b)
    errors = []
    for iters in (5, 20, 80):
        op = CountingOperator(h)
        sol = FixedPoint(max_iter=iters).solve(op, b, 0.0)
        assert (sol.iterations == iters).all() and not sol.converged.any()
        assert sol.matvecs == op.products == 3 * (iters + FixedPoint().power_iterations)
        assert torch.allclose(
            sol.residual_norm, true_residual(h, sol.solution, b), rtol=1e-9, atol=1e-12
        )
        assert torch.isnan(sol.min_curvature).all()
        errors.append(rel_err(sol.solution, x_star))
    assert (errors[1] < 0.5 * errors[0]).all() and (errors[2] < 0.1 * errors[1]).all()
    # run to a tolerance with an explicit per-instance step
    lam = torch.linalg.eigvalsh(h)
    step = 2.0 / (lam[:, 0] + lam[:, -1])  # optimal Richardson step
    op = CountingOperator(h)
    sol = FixedPoint(step=step, max_iter=1000).solve(op, b, 1e-9)
    assert sol.converged.all() and (sol.residual_norm <= 1e-9).all()
    assert sol.matvecs == op.products == int(sol.iterations.sum())
    assert (rel_err(sol.solution, x_star) < 1e-8).all()


def test_neumann_error_decreases_and_equals_richardson() -> None:
    h = spd_batch(3, 12, cond=8.0, seed=18)
    b = torch.randn(3, 12, generator=_gen(19), dtype=torch.float64)
    x_star = dense_solve(h, b)
    errors = []
    for terms in (4, 16, 64):
        op = CountingOperator(h)
        sol = Neumann(terms=terms, step=0.1).solve(op, b, 1e-6)
        assert op.products == sol.matvecs == 3 * terms
        assert (sol.iterations == terms).all()
        assert torch.allclose(
            sol.residual_norm, true_residual(h, sol.solution, b), rtol=1e-9, atol=1e-12
        )
        assert torch.equal(sol.converged, sol.residual_norm <= 1e-6)
        errors.append(rel_err(sol.solution, x_star))
    assert (errors[1] < 0.5 * errors[0]).all() and (errors[2] < 0.1 * errors[1]).all()
    # K Neumann terms are K Richardson steps from zero (also with a power-iteration step)
    neu = Neumann(terms=10).solve(CountingOperator(h), b, 0.0)
    fp = FixedPoint(max_iter=10).solve(CountingOperator(h), b, 0.0)
    assert torch.allclose(neu.solution, fp.solution, rtol=1e-12, atol=1e-12)
    assert Neumann(terms=10).max_iter == 10
    # warm start: the series is applied to the residual of x0
    x0 = x_star + 0.01
    warm = Neumann(terms=10, step=0.1).solve(CountingOperator(h), b, 0.0, x0=x0)
    fpw = FixedPoint(step=0.1, max_iter=10).solve(CountingOperator(h), b, 0.0, x0=x0)
    assert torch.allclose(warm.solution, fpw.solution, rtol=1e-12, atol=1e-12)
    assert warm.matvecs == 3 * 11


def test_largest_eigenvalue() -> None:
    n, batch = 20, 4
    g = _gen(20)
    eigs = 1.0 + 4.0 * torch.rand(batch, n, generator=g, dtype=torch.float64)
    eigs[:, 0] = torch.tensor([10.0, 50.0, 12.0, 7.0], dtype=torch.float64)
    h = sym_matrices(eigs, seed=21)
    op = CountingOperator(h)
    like = torch.zeros(batch, 4, 5, dtype=torch.float64)
    est = largest_eigenvalue(op, like, iterations=20, generator=_gen(22))
    assert isinstance(est, EigenvalueEstimate)
    values, matvecs = est
    exact = torch.linalg.eigvalsh(h)[:, -1]
    assert values.shape == (batch,)
    assert ((values - exact).abs() / exact < 1e-3).all()
    assert (values <= exact * (1 + 1e-12)).all()  # Rayleigh quotients never exceed λ_max
    assert matvecs == op.products == batch * 20
    # float32
    est32 = largest_eigenvalue(op, like.float(), iterations=20, generator=_gen(22))
    assert est32.values.dtype == torch.float32
    assert ((est32.values.double() - exact).abs() / exact < 1e-3).all()


def test_float32() -> None:
    h = spd_batch(4, 24, cond=100.0, seed=23)
    b = torch.randn(4, 4, 6, generator=_gen(24), dtype=torch.float64)
    x_star = dense_solve(h, b)
    b32, h32 = b.float(), h.float()
    tol = 1e-5 * torch.linalg.vector_norm(b32.reshape(4, -1), dim=-1)
    for solver in (CG(), MINRES()):
        sol = solver.solve(CountingOperator(h32), b32, tol)
        assert sol.solution.dtype == torch.float32
        assert sol.residual_norm.dtype == torch.float32
        assert sol.converged.all()
        assert (rel_err(sol.solution.double(), x_star) < 1e-3).all()
        assert (true_residual(h, sol.solution.double(), b) < 5 * tol.double()).all()


@pytest.mark.parametrize(
    "solver",
    [CG(), MINRES(), FixedPoint(step=0.1), FixedPoint()],
    ids=["cg", "minres", "fp-step", "fp-power"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_rhs(solver: LinearSolver, dtype: torch.dtype) -> None:
    h = spd_batch(3, 6, cond=5.0, seed=25, dtype=dtype)
    b = torch.zeros(3, 6, dtype=dtype)
    op = CountingOperator(h)
    sol = solver.solve(op, b, 0.0)
    assert torch.equal(sol.solution, torch.zeros_like(b))
    assert (sol.iterations == 0).all() and sol.converged.all()
    assert (sol.residual_norm == 0).all()
    assert torch.isfinite(sol.solution).all()
    estimation = 0
    if isinstance(solver, FixedPoint) and solver.step is None:
        estimation = 3 * solver.power_iterations  # step 1/L from power iteration
    assert sol.matvecs == op.products == estimation


@pytest.mark.parametrize("solver", [CG(), MINRES()], ids=["cg", "minres"])
def test_zero_rhs_in_a_batch_float32(solver: LinearSolver) -> None:
    h = spd_batch(3, 10, cond=20.0, seed=26, dtype=torch.float32)
    b = torch.randn(3, 10, generator=_gen(27))
    b[1] = 0.0
    op = CountingOperator(h)
    sol = solver.solve(op, b, 1e-4)
    assert torch.isfinite(sol.solution).all() and sol.converged.all()
    assert int(sol.iterations[1]) == 0 and sol.residual_norm[1] == 0
    assert torch.equal(sol.solution[1], torch.zeros(10))  # frozen while riding in the batch
    assert (sol.iterations[[0, 2]] > 0).all()
    assert_products(sol, op)


def test_max_iter_reports_not_converged() -> None:
    h = spd_batch(2, 40, cond=1e4, seed=28)
    b = torch.randn(2, 40, generator=_gen(29), dtype=torch.float64)
    for solver in (CG(max_iter=5), MINRES(max_iter=5)):
        op = CountingOperator(h)
        sol = solver.solve(op, b, 1e-12)
        assert not sol.converged.any()
        assert (sol.iterations == 5).all() and sol.matvecs == op.products == 10
        assert (sol.residual_norm > 1e-12).all()
        assert torch.allclose(
            sol.residual_norm, true_residual(h, sol.solution, b), rtol=1e-8, atol=0.0
        )
    sol = CG(max_iter=0).solve(CountingOperator(h), b, 1e-12)
    assert torch.equal(sol.solution, torch.zeros_like(b)) and sol.matvecs == 0


def test_scalar_event_shape() -> None:
    h = torch.tensor([[[2.0]], [[4.0]], [[0.5]]], dtype=torch.float64)
    b = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    for solver in (CG(), MINRES()):
        sol = solver.solve(CountingOperator(h), b, 1e-12)
        assert torch.allclose(sol.solution, torch.tensor([0.5, 0.5, 6.0], dtype=torch.float64))
        assert (sol.iterations == 1).all()


def test_nonfinite_inputs_and_products() -> None:
    h = spd_batch(3, 5, cond=5.0, seed=30)
    b = torch.randn(3, 5, generator=_gen(31), dtype=torch.float64)
    bad_b = b.clone()
    bad_b[1, 2] = math.nan
    for solver in (CG(), MINRES(), FixedPoint(step=0.1), Neumann(step=0.1)):
        with pytest.raises(NonFiniteError):
            solver.solve(CountingOperator(h), bad_b, 1e-8)

    def nan_op(v: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        out = CountingOperator(h)(v, index)
        return torch.where((index == 2).reshape(-1, 1), torch.full_like(out, math.nan), out)

    for solver in (CG(), MINRES(), FixedPoint(step=0.1), Neumann(step=0.1)):
        with pytest.raises(NonFiniteError, match="instance 2"):
            solver.solve(nan_op, b, 1e-8)


def test_input_validation() -> None:
    h = spd_batch(2, 4, cond=2.0, seed=32)
    b = torch.randn(2, 4, generator=_gen(33), dtype=torch.float64)
    op = CountingOperator(h)
    with pytest.raises(BilevelError):
        CG().solve(op, b, -1.0)
    with pytest.raises(BilevelError):
        CG().solve(op, b, torch.ones(3))
    with pytest.raises(BilevelError):
        CG().solve(op, b, 1e-6, x0=torch.zeros(2, 5))
    with pytest.raises(BilevelError):
        CG().solve(lambda v, i: v[:, :2], b, 1e-6)
    with pytest.raises(BilevelError):
        CG().solve(op, torch.ones(2, 4, dtype=torch.long), 1e-6)
    with pytest.raises(BilevelError):
        CG(max_iter=-1)
    with pytest.raises(BilevelError):
        FixedPoint(step=0.0)
    with pytest.raises(BilevelError):
        largest_eigenvalue(op, b, iterations=0)
    for solver in (CG(), MINRES(), FixedPoint(), Neumann()):
        assert isinstance(solver, LinearSolver)


def test_fixed_point_step_estimation_rejects_negative_definite() -> None:
    h = -spd_batch(2, 6, cond=3.0, seed=34)
    b = torch.randn(2, 6, generator=_gen(35), dtype=torch.float64)
    with pytest.raises(NotStronglyConvexError, match="instance 0"):
        FixedPoint().solve(CountingOperator(h), b, 1e-8)


def test_cg_with_autograd_hessian_vector_products() -> None:
    """The operator convention with a Hessian-vector product of a batched energy."""
    batch, n = 4, 6
    a = spd_batch(batch, n, cond=5.0, seed=36)
    x = torch.randn(batch, 2, 3, generator=_gen(37), dtype=torch.float64)
    b = torch.randn(batch, 2, 3, generator=_gen(38), dtype=torch.float64)

    def energy(z: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        flat = z.reshape(z.shape[0], -1)
        quad = 0.5 * torch.einsum("bi,bij,bj->b", flat, a[index], flat)
        return quad + torch.log(torch.cosh(flat)).sum(-1)

    seen: list[list[int]] = []

    def hvp(v: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        seen.append(index.tolist())
        z = x[index].detach().requires_grad_(True)
        (g,) = torch.autograd.grad(energy(z, index).sum(), z, create_graph=True)
        (hv,) = torch.autograd.grad(g, z, v)
        return hv

    sol = CG().solve(hvp, b, 1e-11)
    assert sol.converged.all() and sol.matvecs == sum(map(len, seen)) >= int(sol.iterations.sum())
    hess = a + torch.diag_embed(1.0 / torch.cosh(x.reshape(batch, -1)) ** 2)
    assert (rel_err(sol.solution, dense_solve(hess, b)) < 1e-9).all()
    assert seen[0] == list(range(batch))


@pytest.mark.parametrize("solver", [CG(check_every=4), MINRES(check_every=4)], ids=["cg", "minres"])
def test_checks_every_few_iterations_keep_per_instance_results(solver: LinearSolver) -> None:
    """Checking every 4 iterations changes no instance's iterations, solution or residual:
    an instance stops on the device at the iteration that meets its tolerance."""
    h = spd_batch(5, 30, cond=300.0, seed=40)
    b = torch.randn(5, 30, generator=_gen(41), dtype=torch.float64)
    tol = torch.tensor([1e-3, 1e-6, 1e-9, 1e-12, 1e-4], dtype=torch.float64)
    every = solver.solve(CountingOperator(h), b, tol)
    each = type(solver)(check_every=1).solve(CountingOperator(h), b, tol)
    assert every.converged.all() and (every.residual_norm <= tol).all()
    assert torch.equal(every.iterations, each.iterations)
    assert torch.allclose(every.solution, each.solution, rtol=0, atol=1e-14)
    assert torch.allclose(every.min_curvature, each.min_curvature, rtol=1e-12)


@pytest.mark.parametrize("solver", [CG, MINRES], ids=["cg", "minres"])
def test_fixed_iterations_run_exactly_max_iter(solver) -> None:
    h = spd_batch(3, 10, cond=100.0, seed=42)
    b = torch.randn(3, 10, generator=_gen(43), dtype=torch.float64)
    op = CountingOperator(h)
    sol = solver(max_iter=25, fixed_iterations=True).solve(op, b, 1e-3)
    # past convergence and past the rounding floor: 25 iterations for every instance
    assert (sol.iterations == 25).all() and op.products == sol.matvecs == 75
    assert sol.converged.all()  # tol only sets `converged`
    stopping = solver(max_iter=25).solve(CountingOperator(h), b, 1e-3)
    assert (stopping.iterations < 25).all()
    assert (true_residual(h, sol.solution, b) < 1e-8).all()


def test_breakdown_found_between_checks() -> None:
    """Negative curvature in the middle of a check interval is reported at its iteration."""
    eigs = torch.linspace(1.0, 4.0, 8, dtype=torch.float64).expand(3, 8).clone()
    eigs[2, 0] = -5.0
    h = sym_matrices(eigs, seed=12)
    b = torch.randn(3, 8, generator=_gen(13), dtype=torch.float64)
    _, vecs = torch.linalg.eigh(h[2])
    b[2] = vecs[:, 0] + 0.05 * b[2]
    for every in (1, 7, 1000):
        with pytest.raises(NotStronglyConvexError, match=r"instance 2 at iteration 1;"):
            CG(check_every=every).solve(CountingOperator(h), b, 1e-10)
    with pytest.raises(NotStronglyConvexError, match="instance 2"):
        CG(max_iter=5, fixed_iterations=True).solve(CountingOperator(h), b, 0.0)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(BilevelError, match="check_every"):
            CG(check_every=bad)


def test_min_curvature_is_computed_on_access_and_survives_pickling() -> None:
    import pickle

    h = spd_batch(2, 6, cond=4.0, seed=44)
    b = torch.randn(2, 6, generator=_gen(45), dtype=torch.float64)
    sol = CG().solve(CountingOperator(h), b, 1e-10)
    again = pickle.loads(pickle.dumps(sol))
    lam = torch.linalg.eigvalsh(h)[:, 0]
    assert torch.allclose(again.min_curvature, sol.min_curvature)
    assert torch.allclose(sol.min_curvature, lam, rtol=1e-8)  # full Krylov space: exact


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fixed_iterations_host_stop_at_underflow_matches_device_path(dtype) -> None:
    """A single instance that reaches the underflow range stops there on the host (no masks)
    and gives the result of the masked path that checks on the device every few iterations:
    the same iteration count, solution, residual and Ritz value (to rounding)."""
    h = spd_batch(1, 12, cond=10.0, seed=46, dtype=torch.float64)
    b = torch.randn(1, 12, generator=_gen(47), dtype=torch.float64).to(dtype)
    host = CG(max_iter=200, fixed_iterations=True).solve(CountingOperator(h), b, 0.0)
    device = CG(max_iter=200, fixed_iterations=True, check_every=7).solve(
        CountingOperator(h), b, 0.0
    )
    limit = torch.finfo(dtype).tiny / torch.finfo(dtype).eps
    assert 12 <= int(host.iterations) < 200  # stopped at the underflow range, not max_iter
    assert float(host.residual_norm) ** 2 <= limit * (1 + 1e-6)
    assert torch.equal(host.iterations, device.iterations)
    # the device path keeps multiplying the frozen instance until its next check
    assert host.matvecs == int(host.iterations) <= device.matvecs
    assert torch.equal(host.solution, device.solution)
    assert torch.equal(host.residual_norm, device.residual_norm)
    assert torch.allclose(host.min_curvature, device.min_curvature, rtol=1e-5)
    assert torch.equal(host.krylov_steps, device.krylov_steps)
    assert torch.equal(host.converged, device.converged)


def test_lazy_report_fields_are_those_of_the_solution_and_survive_pickling() -> None:
    """A whole batch solved on the host reports iterations, residuals, convergence and Krylov
    steps when read; they equal the values recomputed from the solution, also after
    pickling."""
    import pickle

    h = spd_batch(3, 8, cond=50.0, seed=48)
    b = torch.randn(3, 8, generator=_gen(49), dtype=torch.float64)
    sol = CG(max_iter=5, fixed_iterations=True).solve(CountingOperator(h), b, 1e-3)
    again = pickle.loads(pickle.dumps(sol))
    for s in (sol, again):
        assert torch.equal(s.iterations, torch.full((3,), 5))
        assert torch.equal(s.krylov_steps, torch.full((3,), 5))
        assert torch.allclose(s.residual_norm, true_residual(h, s.solution, b), rtol=1e-8)
        assert torch.equal(s.converged, s.residual_norm <= 1e-3)
        assert s.min_curvature.shape == (3,) and bool((s.min_curvature > 0).all())


def test_warm_start_names_a_non_finite_right_hand_side() -> None:
    h = spd_batch(2, 4, cond=4.0, seed=50)
    b = torch.randn(2, 4, generator=_gen(51), dtype=torch.float64)
    b[1, 2] = math.nan
    for x0 in (None, torch.zeros_like(b)):
        with pytest.raises(NonFiniteError, match="right-hand side b"):
            CG().solve(CountingOperator(h), b, 1e-8, x0=x0)


def test_finiteness_by_one_sum_falls_back_when_the_sum_overflows() -> None:
    """``all_finite`` reads one sum; finite entries whose sum overflows take the element-wise
    test, so a huge finite right-hand side is not mistaken for a non-finite one."""
    from bilevel.problem import all_finite

    huge = torch.full((1, 3), 1e308, dtype=torch.float64)
    assert all_finite(huge) and all_finite(huge.float().clamp(max=3e38))
    for bad in (math.nan, math.inf, -math.inf):
        t = huge.clone()
        t[0, 1] = bad
        assert not all_finite(t)
    theta = torch.ones(3, requires_grad=True)
    assert all_finite(theta) and not all_finite(theta * math.inf)
    h = torch.eye(3, dtype=torch.float64).expand(1, 3, 3).clone()
    CG(max_iter=3).solve(CountingOperator(h), huge, 1e290)  # no NonFiniteError


@pytest.mark.parametrize("max_iter", [0, 3, 12])
def test_cg_single_instance_host_report_matches_true_residual(max_iter: int) -> None:
    """One instance, the whole solve decided on the host (one scalar read per check): the
    report's residual is the true one up to rounding, ``converged`` is ``residual ≤ tol`` and
    the solution matches a direct solve once CG has run n iterations."""
    h = spd_batch(1, 6, 50.0, seed=3)
    b = torch.randn(1, 6, generator=_gen(4), dtype=torch.float64)
    tol = 1e-8
    out = CG(max_iter=max_iter, fixed_iterations=True).solve(CountingOperator(h), b, tol)
    true = torch.linalg.vector_norm(b - (h @ out.solution.unsqueeze(-1)).squeeze(-1), dim=1)
    if max_iter < 12:
        assert out.iterations.tolist() == [max_iter]
    else:  # past n = 6 only until ‖r‖² reaches the underflow range
        assert 6 <= int(out.iterations[0]) <= 12
    assert torch.allclose(out.residual_norm, true, rtol=1e-6, atol=1e-12)
    assert out.converged.tolist() == (out.residual_norm <= tol).tolist()
    if max_iter == 0:
        assert out.solution.abs().max() == 0 and not bool(out.converged[0])
    if max_iter == 12:
        direct = torch.linalg.solve(h, b.unsqueeze(-1)).squeeze(-1)
        assert torch.allclose(out.solution, direct, rtol=1e-8, atol=1e-10)
        assert bool(out.converged[0])
