"""Batched lower-level solvers with per-instance stopping and certified accuracy.

Every solver minimises the B independent energies h_i(·, θ, batch_i) together and stops
instance i at the first stopping test at which ‖∇ₓh_i(x_i)‖₂ ≤ tol_i (``GradientDescent``
and ``Nesterov`` test every few iterations, see :func:`next_check`, so as not to synchronise
with the host at every step; backtracking solvers test every step).  ``tol`` is an
*absolute* tolerance on the Euclidean norm of one instance's gradient (same units as ∇ₓh);
it does not depend on the batch size.  The rule is that of the linear solvers
(:func:`bilevel.problem.check_tolerance`): ≥ 0, and 0 asks for the most accurate point the
solver reaches within ``max_iter``.  With μ-strong convexity the returned point is certified
to satisfy ‖x_i − x̂_i‖ ≤ ‖∇ₓh_i(x_i)‖ / μ (``distance_bound``).  The returned point of each
instance is always one at which its gradient was evaluated, so the certificate is exact,
never stale.

Converged instances are removed from the active set and cost no further gradient
evaluations.  Solvers are small immutable configuration objects with a ``solve`` method.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

import torch
from torch import Tensor

from bilevel.autodiff import (
    LowerLevel,
    batch_norm,
    expand_as_batch,
    nonfinite_gradient,
)
from bilevel.linear import _Deferred, largest_eigenvalue, resolved_state
from bilevel.problem import (
    BilevelError,
    Constant,
    all_finite,
    check_tolerance,
    evaluate_constant,
)


class ConvergenceWarning(UserWarning):
    """A solver hit its iteration cap before every instance reached its tolerance."""


@dataclass(frozen=True)
class LowerSolution:
    """Result of a batched lower-level solve; every field is per instance.

    Attributes:
        x: solutions (B, ...).
        energy: h_i(x_i) (B,).
        grad_norm: ‖∇ₓh_i(x_i)‖₂ (B,), evaluated at the returned x_i.
        distance_bound: grad_norm / μ, the certified bound on ‖x_i − x̂_i‖ (B,); NaN if μ
            is unknown.
        iterations: iterations per instance (B,).
        converged: grad_norm ≤ tol (B,).
        grad_evals: gradient evaluations spent, summed over instances.
        stalled: stopped early because the gradient norm no longer decreased (B,), the
            floor set by rounding errors (see :class:`Nesterov`); such instances are not
            converged, but their certificate ``distance_bound`` holds.

    ``distance_bound``, ``iterations``, ``converged`` and ``stalled`` may be given as
    functions, called on first access (a solve that stops at its starting point computes
    them only when they are read).
    """

    x: Tensor
    energy: Tensor
    grad_norm: Tensor
    distance_bound: Tensor = _Deferred()  # type: ignore[assignment]
    iterations: Tensor = _Deferred()  # type: ignore[assignment]
    converged: Tensor = _Deferred()  # type: ignore[assignment]
    grad_evals: int = _Deferred()  # type: ignore[assignment]
    stalled: Tensor | None = _Deferred(None)  # type: ignore[assignment]

    def __getstate__(self) -> dict:
        return resolved_state(self)

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())

    @property
    def any_stalled(self) -> bool:
        return self.stalled is not None and bool((self.stalled & ~self.converged).any())

    def summary(self) -> str:
        n_bad = int((~self.converged).sum())
        stalled = int((self.stalled & ~self.converged).sum()) if self.any_stalled else 0
        return (
            f"{self.converged.numel() - n_bad}/{self.converged.numel()} instances converged"
            + (f" ({stalled} stalled)" if stalled else "")
            + f"; max ‖∇h‖ = {float(self.grad_norm.max()):.3e}, "
            f"max iterations = {int(self.iterations.max())}"
        )


class LowerSolver(Protocol):
    def solve(
        self, lower: LowerLevel, x0: Tensor, tol: float | Tensor, mu: float | None
    ) -> LowerSolution: ...


def estimate_lipschitz(lower: LowerLevel, x: Tensor, iterations: int = 20) -> Tensor:
    """Per-instance estimate of the Lipschitz constant of ∇ₓh: λ_max(∇²h(x)) by power iteration.

    Local, hence an estimate: solvers that use it guard against it being too small. The start
    vector is seeded and the same for every instance, so an instance's estimate (and hence its
    solution) does not depend on the global RNG nor on the batch it is solved in.
    """
    op = lower.hessian(x)
    generator = torch.Generator(device=x.device).manual_seed(0)
    values, _ = largest_eigenvalue(op.matvec, x, iterations=iterations, generator=generator)
    return values.clamp_min(torch.finfo(x.dtype).tiny)


def _initial_lipschitz(
    lower: LowerLevel, x0: Tensor, given: float | None, margin: float
) -> tuple[Tensor, bool]:
    """(L per instance, whether it is a trusted upper bound)."""
    if given is None:
        given = lower.problem.lipschitz_bound()
    if given is not None:
        if not math.isfinite(given) or given <= 0:
            raise BilevelError(f"lipschitz must be finite and positive, got {given}")
        return torch.full((x0.shape[0],), float(given), dtype=x0.dtype, device=x0.device), True
    return margin * estimate_lipschitz(lower, x0), False


def _increased(new: Tensor, old: Tensor) -> Tensor:
    """Energy increase beyond rounding error (a sign that the step 1/L was too long)."""
    slack = 64 * torch.finfo(new.dtype).eps * (old.abs() + 1.0)
    return new > old + slack


class _LowerRecord:
    """Per-instance outputs of a lower-level solve (x, h, ‖∇h‖, iterations, stalled), filled
    in as instances retire."""

    def __init__(self, x0: Tensor) -> None:
        n = x0.shape[0]
        self.x = x0.detach().clone()
        self.energy = torch.full((n,), math.nan, dtype=x0.dtype, device=x0.device)
        self.grad_norm = torch.full_like(self.energy, math.inf)
        self.iterations = torch.zeros(n, dtype=torch.long, device=x0.device)
        self.stalled = torch.zeros(n, dtype=torch.bool, device=x0.device)

    def store(self, index: Tensor, x: Tensor, energy: Tensor, gnorm: Tensor, it: int) -> None:
        self.x[index] = x
        self.energy[index] = energy
        self.grad_norm[index] = gnorm
        self.iterations[index] = it

    def result(self, lower: LowerLevel, tol: Tensor, mu: float | None, evals0: int):
        return LowerSolution(
            x=self.x,
            energy=self.energy,
            grad_norm=self.grad_norm,
            distance_bound=_distance_bound(self.grad_norm, mu),
            iterations=self.iterations,
            converged=self.grad_norm <= tol,
            grad_evals=lower.cost.grad_evals - evals0,
            stalled=self.stalled,
        )


def _at_start(
    lower: LowerLevel,
    x0: Tensor,
    energy: Tensor,
    grad: Tensor,
    tol: float | Tensor,
    mu: float | None,
    evals0: float,
    max_iter: int,
) -> LowerSolution | None:
    """The solution when every instance meets its tolerance at x0 (or ``max_iter`` is 0): a
    copy of x0, at which ``lower.hessian`` reuses the graph of this first evaluation (made with
    ``keep=True``); None when the solver must iterate. ``tol``: a number or (B,).

    One host read: max_i (‖∇h_i‖ − tol_i) ≤ 0 exactly when every instance meets its tolerance
    with a finite gradient (NaN compares false; ∞ − ∞ is NaN); with one number ``tol``, the
    largest norm (the norm itself for one instance) is read and compared on the host.
    ``max_iter`` 0 with some instance missing its tolerance takes a second read (the
    finiteness of the gradient, which the certificate needs); the solver's first stopping
    test takes it otherwise.
    """
    gnorm = batch_norm(grad)
    n = x0.shape[0]
    if n == 0:
        met = True
    elif isinstance(tol, Tensor):
        met = float((gnorm - tol).max()) <= 0
    else:
        worst = float(gnorm if n == 1 else gnorm.max())
        met = worst <= tol and math.isfinite(worst)
    if not met:
        if max_iter > 0:
            return None
        if not all_finite(gnorm):
            raise nonfinite_gradient()
    x = x0.clone()
    lower.returns_kept(x)
    device = x.device
    return LowerSolution(
        x=x,
        energy=energy,
        grad_norm=gnorm,
        distance_bound=lambda: _distance_bound(gnorm, mu),
        iterations=lambda: torch.zeros(n, dtype=torch.long, device=device),
        converged=lambda: gnorm <= tol,
        grad_evals=lower.cost.grad_evals - evals0,
        stalled=lambda: torch.zeros(n, dtype=torch.bool, device=device),
    )


def _distance_bound(gnorm: Tensor, mu: float | None) -> Tensor:
    """‖∇h_i‖ / μ, the certified bound on ‖x_i − x̂_i‖ (NaN without μ)."""
    return gnorm / mu if mu is not None else torch.full_like(gnorm, math.nan)


def _tolerance(tol: float | Tensor, like: Tensor) -> float | Tensor:
    """``lower_tol`` checked (:func:`~bilevel.problem.check_tolerance`); a valid number stays
    a number, made a tensor only if the solver iterates."""
    if isinstance(tol, (int, float)) and not isinstance(tol, bool) and tol >= 0:  # not NaN
        return float(tol)
    return check_tolerance("lower_tol", tol, like)


def _retire(
    rec: _LowerRecord,
    done: Tensor,
    it: int,
    gnorm: Tensor,
    active: Tensor,
    x: Tensor,
    energy: Tensor,
    *state: Tensor,
) -> tuple[Tensor, ...]:
    """Record the ``done`` instances; return (active, x, energy, *state) for the others."""
    rec.store(active[done], x[done], energy[done], gnorm[done], it)
    keep = ~done
    return tuple(t[keep] for t in (active, x, energy, *state))


class _Stagnation:
    """Per-instance test for a gradient norm that stopped decreasing.

    An instance stalls when its smallest gradient norm so far (over the iterations at which
    the solver checks its instances) has not fallen below ``factor`` × the reference value
    for ``window`` iterations (the reference is reset at each such fall). Accelerated methods
    in float32 reach such a floor, set by rounding errors, above tolerances of about 1e-3 on
    images; without the test they spend every remaining iteration there. The comparison runs
    at most every ``window // 10`` iterations.
    """

    def __init__(self, x0: Tensor, window: int | None, factor: float = 0.9) -> None:
        n = x0.shape[0]
        self.window, self.factor = window, factor
        self.every = max(1, (window or 1) // 10)
        self.last = -self.every
        self.best = torch.full((n,), math.inf, dtype=x0.dtype, device=x0.device)
        self.ref = self.best.clone()
        self.since = torch.zeros(n, dtype=torch.long, device=x0.device)

    def update(self, gnorm: Tensor, it: int) -> Tensor | None:
        """The stalled instances among the active ones at check iteration ``it`` (None: no
        test at this iteration)."""
        if self.window is None:
            return None
        self.best = torch.minimum(self.best, gnorm)
        if it - self.last < self.every:
            return None
        self.last = it
        fell = self.best <= self.factor * self.ref
        self.ref = torch.where(fell, self.best, self.ref)
        self.since = torch.where(fell, torch.full_like(self.since, it), self.since)
        return it - self.since >= self.window

    def keep(self, keep: Tensor) -> None:
        self.best, self.ref, self.since = self.best[keep], self.ref[keep], self.since[keep]


CHECK_EVERY = 10
"""Default largest number of iterations between two stopping tests of a lower solver."""


def _check_every(value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BilevelError(f"check_every must be a positive integer, got {value!r}")


def next_check(it: int, every: int) -> int:
    """The iteration of the stopping test after the one at ``it``: ``it + clamp(it // 4, 1,
    every)``, so a solve of k iterations overshoots by at most min(k/4, every − 1) iterations
    and tests O(log every + k / every) times."""
    return it + max(1, min(every, it // 4))


def _test(gnorm: Tensor, tol: Tensor, stalled: Tensor | None) -> tuple[Tensor, Tensor | None, int]:
    """(done, stalled, number done) at a stopping test, raising for a non-finite gradient:
    one host synchronisation."""
    done = gnorm <= tol
    if stalled is not None:
        stalled = stalled & ~done
        done = done | stalled
    bad, n_done = torch.stack([~torch.isfinite(gnorm).all(), done.sum()]).tolist()
    if bad:
        raise nonfinite_gradient()
    return done, stalled, n_done


@dataclass(frozen=True)
class GradientDescent:
    """x ← x − ∇h(x)/L per instance.

    L is ``lipschitz`` if given, else the problem's ``lipschitz`` bound, else a power-iteration
    estimate at x0 times ``margin`` (power iteration approaches λ_max from below, and any
    L > λ_max/2 is stable for gradient descent); an estimated L is doubled for an instance
    whenever its energy increases.  With ``backtracking=True`` each step is an Armijo
    backtracking search (sufficient decrease h(x − g/L) ≤ h(x) − ‖g‖²/(2L), L doubled until
    it holds, then multiplied by 0.9 for the next step), which needs no Lipschitz constant.

    Without backtracking the stopping test (one host synchronisation) runs at the iterations
    of :func:`next_check` (at most every ``check_every``), not at every step; an instance
    stops at the first test that finds ‖∇h‖ ≤ tol. Backtracking decides every step on the host.
    """

    max_iter: int = 10_000
    lipschitz: float | None = None
    backtracking: bool = False
    margin: float = 1.0
    check_every: int = CHECK_EVERY

    def __post_init__(self) -> None:
        _check_every(self.check_every)

    def solve(
        self, lower: LowerLevel, x0: Tensor, tol: float | Tensor, mu: float | None
    ) -> LowerSolution:
        evals0 = lower.cost.grad_evals
        tol = _tolerance(tol, x0)
        x = x0.detach()
        energy, grad = lower.value_and_grad(x, check=False, keep=True)
        start = _at_start(lower, x, energy, grad, tol, mu, evals0, self.max_iter)
        if start is not None:
            return start
        tol_t = tol if isinstance(tol, Tensor) else check_tolerance("lower_tol", tol, x0)
        rec = _LowerRecord(x0)
        active = torch.arange(x0.shape[0], device=x0.device)
        tol_a = tol_t
        if self.backtracking:
            lip, trusted = torch.ones(x0.shape[0], dtype=x0.dtype, device=x0.device), False
        else:
            lip, trusted = _initial_lipschitz(lower, x0, self.lipschitz, self.margin)
        every = 1 if self.backtracking else self.check_every
        step = expand_as_batch(1.0 / lip, x)
        check = 0
        for it in range(self.max_iter + 1):
            if it == check or it == self.max_iter:
                check = next_check(it, every)
                gnorm = batch_norm(grad)
                done, _, n_done = _test(gnorm, tol_a, None)
                if it == self.max_iter or n_done == active.numel():
                    rec.store(active, x, energy, gnorm, it)
                    break
                if n_done:
                    active, x, energy, grad, lip, tol_a = _retire(
                        rec, done, it, gnorm, active, x, energy, grad, lip, tol_a
                    )
                    step = expand_as_batch(1.0 / lip, x)
            x_new = x - step * grad
            e_new, g_new = lower.value_and_grad(x_new, active, check=False)
            if self.backtracking:
                e_new, g_new, x_new, lip = self._backtrack(
                    lower, active, x, energy, grad, x_new, e_new, g_new, lip
                )
                step = expand_as_batch(1.0 / lip, x)
            elif not trusted:
                lip = torch.where(_increased(e_new, energy), 2.0 * lip, lip)
                step = expand_as_batch(1.0 / lip, x)
            x, energy, grad = x_new, e_new, g_new
        return rec.result(lower, tol_t, mu, evals0)

    @staticmethod
    def _backtrack(lower, active, x, energy, grad, x_new, e_new, g_new, lip, max_halvings=50):
        sq = batch_norm(grad) ** 2
        for _ in range(max_halvings):
            bad = _increased(e_new, energy - 0.5 * sq / lip)
            if not bool(bad.any()):
                break
            lip = torch.where(bad, 2.0 * lip, lip)
            sub = bad.nonzero().squeeze(1)
            xs = x[sub] - expand_as_batch(1.0 / lip[sub], x[sub]) * grad[sub]
            es, gs = lower.value_and_grad(xs, active[sub])
            x_new, e_new, g_new = x_new.clone(), e_new.clone(), g_new.clone()
            x_new[sub], e_new[sub], g_new[sub] = xs, es, gs
        return e_new, g_new, x_new, 0.9 * lip


@dataclass(frozen=True)
class Nesterov:
    """Accelerated gradient (FISTA / Nesterov) with gradient-based adaptive restart.

    y is the extrapolated point; x⁺ = y − ∇h(y)/L; y⁺ = x⁺ + β(x⁺ − x).  With μ known,
    β = (√L − √μ)/(√L + √μ) (the strongly convex constant momentum); otherwise the FISTA
    sequence t⁺ = (1 + √(1 + 4t²))/2, β = (t − 1)/t⁺.  Momentum restarts per instance when
    ⟨∇h(y), x⁺ − x⟩ > 0 (O'Donoghue & Candès).  The gradient is evaluated at y, so stopping
    and certification use y, which is returned.  L as in :class:`GradientDescent`; an
    estimated L is doubled when a plain (momentum-free) gradient step increased the energy.

    ``stall_iterations``: an instance stops (``stalled`` in the result) when its smallest
    gradient norm has not fallen by 10 % within that many iterations, which happens only at
    the floor set by rounding errors (Nesterov's gradient norms fall by a constant factor per
    O(√(L/μ)) iterations); None never stops early.

    The stopping test (one host synchronisation, which also catches a non-finite gradient)
    runs at the iterations of :func:`next_check` (at most every ``check_every``), not at
    every step: an instance stops at the first test that finds ‖∇h(y)‖ ≤ tol, which may be up
    to min(k/4, check_every − 1) iterations after the first iterate k that met it.
    """

    max_iter: int = 10_000
    lipschitz: float | None = None
    restart: bool = True
    margin: float = 1.5
    stall_iterations: int | None = 1000
    check_every: int = CHECK_EVERY

    def __post_init__(self) -> None:
        _check_every(self.check_every)

    def solve(
        self, lower: LowerLevel, x0: Tensor, tol: float | Tensor, mu: float | None
    ) -> LowerSolution:
        evals0 = lower.cost.grad_evals
        tol = _tolerance(tol, x0)
        y = x0.detach()
        energy, grad = lower.value_and_grad(y, check=False, keep=True)
        start = _at_start(lower, y, energy, grad, tol, mu, evals0, self.max_iter)
        if start is not None:
            return start
        tol_t = tol if isinstance(tol, Tensor) else check_tolerance("lower_tol", tol, x0)
        rec = _LowerRecord(x0)
        n = x0.shape[0]
        active = torch.arange(n, device=x0.device)
        tol_a = tol_t
        lip, trusted = _initial_lipschitz(lower, x0, self.lipschitz, self.margin)
        x_prev = y
        t = torch.ones(n, dtype=x0.dtype, device=x0.device)
        plain = torch.ones(n, dtype=torch.bool, device=x0.device)
        e_prev = torch.full((n,), math.inf, dtype=x0.dtype, device=x0.device)
        stagnation = _Stagnation(x0, self.stall_iterations)
        zero = y.new_zeros(())
        dims = tuple(range(1, y.dim()))
        neg_step, momentum = self._coefficients(lip, mu, y)
        check = 0
        for it in range(self.max_iter + 1):
            if it:  # the evaluation at x0 is above
                energy, grad = lower.value_and_grad(y, active, check=False)
            if it == check or it == self.max_iter:
                check = next_check(it, self.check_every)
                gnorm = batch_norm(grad)
                done, stalled, n_done = _test(gnorm, tol_a, stagnation.update(gnorm, it))
                if it == self.max_iter or n_done == active.numel():
                    rec.store(active, y, energy, gnorm, it)
                    if stalled is not None:
                        rec.stalled[active[stalled]] = True
                    break
                if n_done:
                    if stalled is not None:
                        rec.stalled[active[stalled]] = True
                    stagnation.keep(~done)
                    active, y, energy, x_prev, grad, lip, t, plain, e_prev, tol_a = _retire(
                        rec, done, it, gnorm, active, y, energy, x_prev, grad, lip, t, plain,
                        e_prev, tol_a,
                    )  # fmt: skip
                    neg_step, momentum = self._coefficients(lip, mu, y)
            if not trusted:
                lip = torch.where(plain & _increased(energy, e_prev), 2.0 * lip, lip)
                neg_step, momentum = self._coefficients(lip, mu, y)
                e_prev = energy
            x_new = torch.addcmul(y, neg_step, grad)
            diff = x_new - x_prev
            if momentum is not None:
                beta = momentum
            else:
                t_new = 0.5 * (1.0 + torch.sqrt(1.0 + 4.0 * t * t))
                beta = expand_as_batch((t - 1.0) / t_new, y)
                t = t_new
            if self.restart:
                reset = (grad * diff).sum(dims, keepdim=True) > 0
                beta = torch.where(reset, zero, beta)
                if momentum is None:
                    t = torch.where(reset.reshape(-1), torch.ones_like(t), t)
            if not trusted:
                plain = (beta == 0).reshape(-1)
            y = torch.addcmul(x_new, beta, diff)
            x_prev = x_new
        return rec.result(lower, tol_t, mu, evals0)

    @staticmethod
    def _coefficients(lip: Tensor, mu: float | None, like: Tensor) -> tuple[Tensor, Tensor | None]:
        """−1/L and, when μ is known, the strongly convex momentum β = (√L − √μ)/(√L + √μ)
        (None: the FISTA sequence), both broadcast against the iterates."""
        neg_step = expand_as_batch(-1.0 / lip, like)
        if mu is None:
            return neg_step, None
        sl, sm = lip.sqrt(), math.sqrt(mu)
        return neg_step, expand_as_batch(((sl - sm) / (sl + sm)).clamp_min(0.0), like)


FISTA = Nesterov


class PreconditionerFactory(Protocol):
    """Builds the preconditioner P of one solve (or None: P = I) from its lower level and
    start x0; see :class:`LBFGS`."""

    def build(self, lower: LowerLevel, x0: Tensor) -> Callable[[Tensor], Tensor] | None: ...


@dataclass(frozen=True)
class LBFGS:
    """Limited-memory BFGS, batched: per-instance two-loop recursion and Armijo backtracking.

    ``memory`` curvature pairs (s, y) per instance; a pair is stored only if sᵀy > 0.  The
    initial inverse Hessian of the recursion is H₀ = γ P, γ = sᵀy / yᵀPy of the newest pair,
    with P = I by default (γ = sᵀy / yᵀy) or the ``preconditioner`` P: a symmetric positive
    definite linear operator, the same for every instance, applied to a batch shaped like x
    (b, ...) and returning P v of that shape. A P close to ∇²h⁻¹ (up to a scale, which γ
    fits) takes fewer iterations (e.g. :class:`bilevel.imaging.preconditioner.
    FourierPreconditioner` for denoising); each step then costs two applications of P
    (P q in the recursion and P y for γ), or one if P has a method ``quadratic_form(v)``
    returning vᵀPv per instance (b,), which γ then uses. The first step, without pairs, is
    −P∇h scaled to unit length. A non-descent direction falls back to steepest descent.
    A ``preconditioner`` with a method ``build(lower, x0)`` is a factory instead: each solve
    starts by building its P (or None: P = I) for its own problem and start, e.g.
    :class:`bilevel.imaging.preconditioner.RidgePreconditioning` for solves whose θ changes
    from one call to the next.

    One host synchronisation per step: the Armijo test of the trial points, the finiteness of
    their gradients and the stopping test ‖∇h(x_new)‖ ≤ tol are read together; each halving
    of the step of some instance costs one more. An instance *stalls* (stops, flagged
    ``stalled``; its certificate holds) when no step of length ≥ 2^-max_halvings decreases
    its energy sufficiently (the step is then rejected), or when its smallest gradient norm
    has not fallen by 10 % within ``stall_iterations`` iterations (None: never); both happen
    at the floor set by rounding errors, where the iterations would otherwise continue to
    ``max_iter`` at up to ``max_halvings`` evaluations each. A stall found by the second test
    stops its instance one step later.
    """

    max_iter: int = 1000
    memory: int = 10
    armijo: float = 1e-4
    max_halvings: int = 40
    stall_iterations: int | None = 50
    preconditioner: Callable[[Tensor], Tensor] | PreconditionerFactory | None = None

    def solve(
        self, lower: LowerLevel, x0: Tensor, tol: float | Tensor, mu: float | None
    ) -> LowerSolution:
        evals0 = lower.cost.grad_evals
        tol = _tolerance(tol, x0)
        x = x0.detach()
        energy, grad = lower.value_and_grad(x, check=False, keep=True)
        start = _at_start(lower, x, energy, grad, tol, mu, evals0, self.max_iter)
        if start is not None:
            return start
        tol_t = tol if isinstance(tol, Tensor) else check_tolerance("lower_tol", tol, x0)
        p = self.preconditioner
        if hasattr(p, "build"):  # a factory: this solve's P
            p = p.build(lower, x)
        precondition = self._precondition(p, x.shape[1:])
        rec = _LowerRecord(x0)
        n = x0.shape[0]
        active = torch.arange(n, device=x0.device)
        tol_a = tol_t
        gnorm = batch_norm(grad)
        done, _, n_done = _test(gnorm, tol_a, None)
        stagnation = _Stagnation(x0, self.stall_iterations)
        stalled = torch.zeros(n, dtype=torch.bool, device=x0.device)  # found, not yet retired
        s_hist: list[Tensor] = []  # each (b, d), flattened
        y_hist: list[Tensor] = []
        valid: list[Tensor] = []  # each (b,) bool: pair usable for that instance
        shape = x.shape[1:]
        for it in range(self.max_iter + 1):
            if it == self.max_iter or n_done == active.numel():
                rec.store(active, x, energy, gnorm, it)
                rec.stalled[active[stalled & (gnorm > tol_a)]] = True
                break
            if n_done:
                rec.stalled[active[stalled & done & (gnorm > tol_a)]] = True
                keep = ~done
                stagnation.keep(keep)
                active, x, energy, grad, gnorm, tol_a, stalled = _retire(
                    rec, done, it, gnorm, active, x, energy, grad, gnorm, tol_a, stalled
                )
                s_hist = [s[keep] for s in s_hist]
                y_hist = [y_[keep] for y_ in y_hist]
                valid = [v[keep] for v in valid]
            b = active.numel()
            g = grad.reshape(b, -1)
            d = -self._two_loop(g, s_hist, y_hist, valid, *precondition)
            if not s_hist:  # first step: unit length along −P g, then backtracking
                length = gnorm if p is None else batch_norm(d)
                d = d / length.clamp_min(torch.finfo(x.dtype).tiny).unsqueeze(1)
            slope = (g * d).sum(1)
            bad_dir = slope >= 0
            d = torch.where(bad_dir.unsqueeze(1), -g, d)
            slope = torch.where(bad_dir, -(g * g).sum(1), slope)
            step = torch.ones(b, dtype=x.dtype, device=x.device)
            x_flat = x.reshape(b, -1)
            x_new = (x_flat + d).reshape(x.shape)
            e_new, g_new = lower.value_and_grad(x_new, active, check=False)
            for halving in range(self.max_halvings + 1):
                fail = _increased(e_new, energy + self.armijo * step * slope)
                gn_new = batch_norm(g_new)
                done = (gn_new <= tol_a) | stalled
                bad, n_fail, n_done = torch.stack(
                    [~torch.isfinite(gn_new).all(), fail.sum(), done.sum()]
                ).tolist()
                if bad:
                    raise nonfinite_gradient()
                if not n_fail or halving == self.max_halvings:
                    break
                step = torch.where(fail, 0.5 * step, step)
                sub = fail.nonzero().squeeze(1)
                xs = (x_flat[sub] + step[sub].unsqueeze(1) * d[sub]).reshape((-1, *shape))
                es, gs = lower.value_and_grad(xs, active[sub], check=False)
                x_new, e_new, g_new = x_new.clone(), e_new.clone(), g_new.clone()
                x_new[sub], e_new[sub], g_new[sub] = xs, es, gs
            if n_fail:  # no sufficient decrease at the shortest step: reject it, stall
                keep_old = expand_as_batch(fail, x)
                x_new = torch.where(keep_old, x, x_new)
                e_new = torch.where(fail, energy, e_new)
                g_new = torch.where(keep_old, grad, g_new)
                gn_new = torch.where(fail, gnorm, gn_new)
                stalled = stalled | fail
                done = (gn_new <= tol_a) | stalled
                n_done = int(done.sum())
            found = stagnation.update(gn_new, it + 1)
            if found is not None:  # acted on at the next step's reading
                stalled = stalled | found
            s = (x_new - x).reshape(b, -1)
            yv = (g_new - grad).reshape(b, -1)
            sy = (s * yv).sum(1)
            s_hist.append(s)
            y_hist.append(yv)
            valid.append(sy > 1e-12 * batch_norm(s) * batch_norm(yv))
            if len(s_hist) > self.memory:
                s_hist.pop(0)
                y_hist.pop(0)
                valid.pop(0)
            x, energy, grad, gnorm = x_new, e_new, g_new, gn_new
        return rec.result(lower, tol_t, mu, evals0)

    @staticmethod
    def _precondition(
        p: Callable[[Tensor], Tensor] | None, shape: torch.Size
    ) -> tuple[Callable | None, Callable | None]:
        """(v ↦ P v, v ↦ vᵀPv or None) on flattened (b, d) vectors of instances shaped
        ``shape``; (None, None) for P = I."""
        if p is None:
            return None, None
        form = getattr(p, "quadratic_form", None)
        return (
            lambda v: p(v.view(-1, *shape)).reshape(v.shape[0], -1),
            None if form is None else lambda v: form(v.view(-1, *shape)),
        )

    @staticmethod
    def _two_loop(
        g: Tensor,
        s_hist: list[Tensor],
        y_hist: list[Tensor],
        valid: list[Tensor],
        precondition: Callable[[Tensor], Tensor] | None = None,
        quadratic_form: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        """H_k g by the two-loop recursion, skipping pairs that failed the curvature test, with
        H₀ = γ P (``precondition``: P on (b, d) vectors; None: P = I; ``quadratic_form``:
        v ↦ vᵀPv per row, by default ⟨v, P v⟩). Inner products are computed once per pair and
        updates are in-place multiply-adds: one pass over the vectors each."""

        def dot(a: Tensor, b: Tensor) -> Tensor:  # per-instance ⟨a_i, b_i⟩
            if a.shape[0] == 1:  # BLAS dot: one read of each
                return torch.dot(a.view(-1), b.view(-1)).view(1)
            return torch.linalg.vecdot(a, b)

        q = g.clone()
        pairs = list(zip(reversed(s_hist), reversed(y_hist), reversed(valid)))
        sys_ = [dot(s, y) for s, y, _ in pairs]
        alphas = []
        for (s, y, ok), sy in zip(pairs, sys_):
            rho = torch.where(ok, 1.0 / torch.where(ok, sy, torch.ones_like(sy)), 0.0)
            a = rho * dot(s, q)
            q.addcmul_(a.unsqueeze(1), y, value=-1.0)
            alphas.append((a, rho, s, y))
        gamma = torch.ones(g.shape[0], dtype=g.dtype, device=g.device)
        if pairs:  # scaling sᵀy / yᵀPy of the newest pair
            (_, y, ok), sy = pairs[0], sys_[0]
            if precondition is None:
                ypy = dot(y, y)
            elif quadratic_form is None:
                ypy = dot(y, precondition(y))
            else:
                ypy = quadratic_form(y)
            gamma = torch.where(ok, sy / ypy.clamp_min(torch.finfo(g.dtype).tiny), gamma)
        if precondition is None:
            r = q.mul_(gamma.unsqueeze(1))
        else:  # out of place: P's result may be a tensor that P keeps
            r = precondition(q) * gamma.unsqueeze(1)
        for a, rho, s, y in reversed(alphas):
            beta = rho * dot(y, r)
            r.addcmul_((a - beta).unsqueeze(1), s)
        return r


def solve_lower(
    lower: LowerLevel,
    x0: Tensor,
    tol: float | Tensor,
    solver: LowerSolver,
    mu: Constant,
    warn: bool = True,
) -> LowerSolution:
    """Run ``solver`` and warn (ConvergenceWarning) if some instance missed its tolerance.

    ``mu`` is a number, (B,) tensor or callable ``(theta, batch)`` evaluated at the current θ
    (see :class:`~bilevel.problem.BilevelProblem`); the solver gets its smallest value (for
    momentum) and ``distance_bound`` uses each instance's own μ_i.
    """
    if isinstance(mu, (int, float)) and not isinstance(mu, bool) and 0 < mu < math.inf:
        # one valid value: the solver's own bound
        return _warned(solver.solve(lower, x0, tol, float(mu)), solver, warn)
    mu_t = evaluate_constant("mu", mu, lower.problem.theta, lower.batch, x0, positive=True)
    sol = solver.solve(lower, x0, tol, None if mu_t is None else float(mu_t.min()))
    if mu_t is not None:
        sol = replace(sol, distance_bound=sol.grad_norm / mu_t)
    return _warned(sol, solver, warn)


def _warned(sol: LowerSolution, solver: LowerSolver, warn: bool) -> LowerSolution:
    """``sol``, with a ConvergenceWarning if ``warn`` and some instance missed its tolerance."""
    if warn and not sol.all_converged:
        if sol.any_stalled:
            advice = (
                "stopped where the gradient norm no longer decreased (rounding errors): "
                f"{sol.summary()}; loosen the tolerance or use float64"
            )
        else:
            advice = f"reached max_iter: {sol.summary()}; raise max_iter or loosen the tolerance"
        warnings.warn(
            f"lower-level solver {type(solver).__name__} {advice}",
            ConvergenceWarning,
            stacklevel=3,
        )
    return sol
