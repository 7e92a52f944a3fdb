"""Solver loops synchronise with the host once per check, not once per iteration.

On the CPU a host synchronisation is every conversion of a tensor to a Python value
(``item``, ``tolist``, ``bool``, ``int``, ``float``); the counter below patches them. Each test
compares two runs that differ only in their number of iterations, so that the fixed cost of
validation before and after the loop cancels: the extra synchronisations must be about
iterations / check_every. With CUDA the same loops run under ``torch.cuda.set_sync_debug_mode``.
"""

from __future__ import annotations

import math
import warnings
from functools import partial

import pytest
import torch

from bilevel import CG, LBFGS, MINRES, BilevelProblem, GradientDescent, Nesterov
from bilevel.autodiff import LowerLevel
from bilevel.lower import next_check

F64 = torch.float64
CONVERSIONS = ("item", "tolist", "__bool__", "__int__", "__float__")


class SyncCounter:
    """Counts conversions of tensors to Python values while active."""

    def __init__(self) -> None:
        self.count = 0
        self._saved: dict[str, object] = {}

    def __enter__(self) -> SyncCounter:
        for name in CONVERSIONS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def counted(t, *args, _original=original, **kwargs):
                self.count += 1
                return _original(t, *args, **kwargs)

            setattr(torch.Tensor, name, counted)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)


def ill_conditioned(batch: int, dim: int, device: str = "cpu"):
    """Diagonal SPD operators with condition number 1e6: no instance converges quickly."""
    eigs = torch.logspace(0, 6, dim, dtype=F64, device=device).expand(batch, dim)
    b = torch.ones(batch, dim, dtype=F64, device=device)

    def matvec(v: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return eigs[index] * v

    return matvec, b


def count_syncs(fn, *args) -> int:
    with SyncCounter() as counter:
        fn(*args)
    return counter.count


def test_counter_sees_conversions() -> None:
    t = torch.ones(3)
    with SyncCounter() as counter:
        bool(t.all())
        float(t.sum())
        t.tolist()
    assert counter.count == 3


@pytest.mark.parametrize("solver", [CG, MINRES], ids=["cg", "minres"])
@pytest.mark.parametrize("every", [1, 5, 20])
def test_krylov_loop_syncs_once_per_check(solver, every: int) -> None:
    matvec, b = ill_conditioned(4, 200)
    runs = {}
    for iterations in (40, 120):
        s = solver(max_iter=iterations, check_every=every)
        runs[iterations] = count_syncs(s.solve, matvec, b, 1e-12)
        sol = s.solve(matvec, b, 1e-12)
        assert (sol.iterations == iterations).all() and not sol.converged.any()
    extra = runs[120] - runs[40]
    assert extra <= math.ceil(80 / every) + 1, (runs, every)
    if every > 1:
        assert extra < 80 / 2


@pytest.mark.parametrize("solver", [CG, MINRES], ids=["cg", "minres"])
def test_fixed_iterations_sync_only_after_the_loop(solver) -> None:
    matvec, b = ill_conditioned(3, 50)
    counts = []
    for iterations in (10, 60):
        s = solver(max_iter=iterations, fixed_iterations=True, check_every=100)
        counts.append(count_syncs(s.solve, matvec, b, 0.0))
    assert counts[0] == counts[1]


def test_lbfgs_syncs_once_per_evaluation() -> None:
    """L-BFGS reads the host once per step, and once more per halving of a step: never more
    synchronisations than gradient evaluations (plus a fixed number per solve)."""
    lower, x0 = logistic_lower()
    syncs, evals = {}, {}
    for iterations in (5, 25):
        s = LBFGS(max_iter=iterations, stall_iterations=None)
        evals0 = lower.cost.grad_evals
        syncs[iterations] = count_syncs(s.solve, lower, x0, 0.0, 6e-6)
        evals[iterations] = (lower.cost.grad_evals - evals0) / x0.shape[0]
        assert (s.solve(lower, x0, 0.0, 6e-6).iterations == iterations).all()
    assert syncs[25] - syncs[5] <= evals[25] - evals[5] + 1, (syncs, evals)


def test_preconditioned_lbfgs_syncs_once_per_evaluation() -> None:
    """The same with the Fourier preconditioner of a denoising problem: applying P and its
    quadratic form reads nothing back to the host."""
    from bilevel.imaging import ConvexRidgeNetwork, reconstruction_problem
    from bilevel.imaging.preconditioner import ridge_preconditioner

    y = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0), dtype=F64)
    problem = reconstruction_problem(ConvexRidgeNetwork(num_filters=4).double())
    lower, pre = LowerLevel(problem, (y, y)), ridge_preconditioner(problem, y)
    syncs, evals = {}, {}
    for iterations in (5, 25):
        s = LBFGS(max_iter=iterations, stall_iterations=None, preconditioner=pre)
        evals0 = lower.cost.grad_evals
        syncs[iterations] = count_syncs(s.solve, lower, y, 0.0, 1.0)
        evals[iterations] = (lower.cost.grad_evals - evals0) / y.shape[0]
        assert (s.solve(lower, y, 0.0, 1.0).iterations == iterations).all()
    assert syncs[25] - syncs[5] <= evals[25] - evals[5] + 1, (syncs, evals)


def logistic_lower(device: str = "cpu") -> tuple[LowerLevel, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 10, generator=g, dtype=F64).to(device)
    y = (torch.rand(200, generator=g, dtype=F64) < 0.5).to(F64).to(device)

    def h(w, th, _):
        z = torch.nn.functional.linear(w, x)
        return (torch.nn.functional.softplus(z) - y * z).mean(1) + 0.5 * th.exp() * (w * w).sum(1)

    theta = torch.tensor(-12.0, dtype=F64, device=device, requires_grad=True)  # μ = 6e-6
    problem = BilevelProblem(h, h, theta, mu=math.exp(-12.0), lipschitz=5.0)
    return LowerLevel(problem, None), torch.zeros(3, 10, dtype=F64, device=device)


@pytest.mark.parametrize("solver", [Nesterov, GradientDescent], ids=["nesterov", "gd"])
@pytest.mark.parametrize("every", [1, 10])
def test_lower_solver_syncs_once_per_check(solver, every: int) -> None:
    lower, x0 = logistic_lower()
    counts = {}
    for iterations in (200, 600):
        s = solver(max_iter=iterations, check_every=every)
        counts[iterations] = count_syncs(s.solve, lower, x0, 0.0, 6e-6)
        assert (s.solve(lower, x0, 0.0, 6e-6).iterations == iterations).all()
    checks = sum(1 for _ in _checks(600, every)) - sum(1 for _ in _checks(200, every))
    assert counts[600] - counts[200] <= checks + 1
    assert counts[600] - counts[200] <= math.ceil(400 / every) + 1


def _checks(max_iter: int, every: int):
    it = 0
    while it < max_iter:
        yield it
        it = next_check(it, every)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_solver_loops_sync_once_per_check() -> None:
    """With CUDA, count the synchronisations the device reports (sync debug mode 'warn')."""

    def device_syncs(fn, *args) -> int:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                fn(*args)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    matvec, b = ill_conditioned(4, 200, "cuda")
    short, long = (device_syncs(CG(max_iter=k).solve, matvec, b, 1e-12) for k in (40, 120))
    every = 8  # CG's default away from the CPU
    assert long - short <= math.ceil(80 / every) * 2 + 2, (short, long)
    lower, x0 = logistic_lower("cuda")
    short, long = (
        device_syncs(Nesterov(max_iter=k).solve, lower, x0, 0.0, 6e-6) for k in (200, 600)
    )
    assert long - short <= 2 * math.ceil(400 / 10) + 2, (short, long)


def test_fixed_work_hypergradient_reads_the_host_a_fixed_number_of_times() -> None:
    """The hypergradient at a given point (lower solve stopping at once, M CG iterations on
    one instance): a handful of reads outside the loop (finiteness of x, θ and z, the
    certificate, CG's start) and the two scalars ‖r‖², α per CG iteration on the CPU."""
    from bilevel import Implicit

    lower, x0 = logistic_lower()
    problem = lower.problem
    counts = {}
    for m in (0, 4, 12):
        est = Implicit(
            CG(max_iter=m, fixed_iterations=True),
            lower_solver=Nesterov(max_iter=0),
            compute_bound=False,
            warn_unconverged=False,
        )
        call = partial(est, problem, None, x0[:1], lower_tol=math.inf, adjoint_tol=0.0)
        counts[m] = count_syncs(call)
        hg = call()
        assert int(hg.linear.iterations[0]) == m
    assert counts[0] <= 5, counts
    assert counts[12] - counts[4] == 2 * 8, counts
