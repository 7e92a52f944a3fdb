"""Deterministic full-batch baselines with an inexact backtracking line search ([MAID]).

One iteration at θ with tolerances (ε, δ) on all n samples at once:

1. Inexact gradient: solve every lower level until ‖∇ₓh_i(x̃_i)‖ ≤ ε (certified distance
   ε_i = ‖∇ₓh_i(x̃_i)‖/μ ≥ ‖x̃_i − x̂_i‖), every adjoint until ‖H_i q̃_i − ∇ₓf_i‖ ≤ δ, form
   z and its error bound ω ≥ ‖z − ∇F(θ)‖. MAID only: while ω > (1 − η)‖z‖ (z not certified
   to be a descent direction), shrink ε, δ by τ and recompute.
2. Inexact backtracking: for i = 0, 1, ..., try θ⁺ = P(θ − αρⁱ z), solve the lower levels at
   θ⁺ to ε (warm-started from x̃) and accept the first trial with

       mean_i [f_i(x̃⁺_i) + ‖∇ₓf_i(x̃⁺_i)‖ ε⁺_i + L_f (ε⁺_i)²/2] + r(θ⁺)
           ≤ mean_i [f_i(x̃_i) − ‖∇ₓf_i(x̃_i)‖ ε_i] + r(θ) − c αρⁱ ‖z‖².

   The left side is an upper bound on F(θ⁺) (∇ₓf_i is L_f-Lipschitz), the right side minus
   the margin a lower bound on F(θ) (f_i convex in x), so an accepted step certainly
   decreases the true F. Below float64, f_i, ‖∇ₓf_i‖ and the trial's ‖∇ₓh_i‖ (hence ε⁺_i) are
   evaluated in float64 at the computed points (else they carry the rounding margin of the
   working precision), so that rounding cannot fake a decrease. The plain ε_i is loose (it
   charges ‖∇ₓf_i‖ for the whole distance bound) and, in float32, cannot fall below the floor
   where the solver's own rounding of ∇ₓh dominates (about L·u·‖x‖/μ); so the same bounds
   are also taken at the float64 point x̄_i = x̃_i + d_i, d_i a few conjugate-gradient steps
   of the Newton correction ∇²h d = −∇h(x̃) (``refine_iterations``; ε̄_i = ‖∇ₓh_i(x̄_i)‖/μ,
   evaluated in float64, certifies x̄_i for any d_i), and the tighter of the two is used on
   each side (:func:`_certified`). The heavy solves stay in the working precision. Trials
   whose first-order decrease α‖z‖(‖z‖ + ω) − cα‖z‖² cannot cover the old side's
   inexactness mean_i (f_i − lower bound_i) are not solved for (the line search fails at
   once and the accuracy is tightened). L_f and μ come
   from the one place that states them: the estimator's
   ``stated_constants().upper_grad_lipschitz`` (else the value the bound computed or
   estimated, ``hg.constants["L_f"]``) and the problem's ``mu`` evaluated at θ⁺; with a
   non-convex f_i or a wrong L_f the certificate does not hold. The trial lower levels are
   solved by the estimator's ``solve_lower``.
3. Adapt. On success the next trial step is αρⁱ·growth; MAID multiplies ε and δ by ν ≥ 1.
   On failure θ is kept, and MAID multiplies ε and δ by τ < 1 (the trial step α is kept).

:class:`MAID` adapts the accuracy as above; :class:`HOAG` uses a fixed (summable) accuracy
schedule ε_k, δ_k with the same line search. The two share one engine and differ only by
their :class:`AccuracyPolicy` (:class:`AdaptiveAccuracy`, :class:`ScheduledAccuracy`).
Every oracle call is counted, including those of rejected trials, of recomputations at
tighter accuracy, of the error bound's constants (power iterations, the a-posteriori solves:
``Cost.bound_products``) and of the float64 Newton corrections; the oracle-call and wall-time
budgets are checked before each recomputation and each trial, so that a step stops where the
budget runs out (θ and the accuracies are then kept, and the step's record says why under
``budget_stop``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from bilevel import distributed
from bilevel.autodiff import Cost, LowerLevel, batch_norm
from bilevel.bounds import as_float64, rounding_margin
from bilevel.hypergrad import EstimatorState, Hypergradient, HypergradientEstimator, Implicit
from bilevel.linear import CG
from bilevel.methods.budget import Budget
from bilevel.methods.engine import Engine, Method, Stop
from bilevel.methods.optim import Projection, apply_projection, load_params, snapshot
from bilevel.methods.samples import SampleSet
from bilevel.problem import (
    Batch,
    BilevelError,
    BilevelProblem,
    NonFiniteError,
    evaluate_constant,
)
from bilevel.schedules import Accuracy, ScheduleLike, as_accuracy

__all__ = ["HOAG", "MAID", "AccuracyPolicy", "AdaptiveAccuracy", "ScheduledAccuracy"]


def _check(name: str, value: Any, low: float, high: float, *, closed_low: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok:
        ok = (value >= low if closed_low else value > low) and value <= high
    if not ok:
        bracket = "[" if closed_low else "("
        raise BilevelError(f"{name} must lie in {bracket}{low}, {high}], got {value!r}")


class AccuracyPolicy(Protocol):
    """How a line-search method chooses the tolerances (ε, δ) of its hypergradients; the
    one difference between :class:`MAID` (:class:`AdaptiveAccuracy`) and :class:`HOAG`
    (:class:`ScheduledAccuracy`). The engine carries the current (ε, δ) and checkpoints them.
    """

    def initial(self) -> tuple[float, float]:
        """(ε, δ) of the first iteration."""
        ...

    def tolerances(self, step: int, current: tuple[float, float]) -> tuple[float, float]:
        """(ε, δ) of iteration ``step``, given the current pair."""
        ...

    def refine(
        self, eps: float, delta: float, znorm: float, omega: float
    ) -> tuple[float, float] | str | None:
        """None to accept z as a direction; else the tighter (ε, δ) to recompute it with, or
        a message when the run must stop ("stalled") rather than tighten."""
        ...

    def after_accept(self, eps: float, delta: float) -> tuple[float, float]:
        """(ε, δ) after an accepted step."""
        ...

    def after_failure(self, eps: float, delta: float) -> tuple[tuple[float, float], str | None]:
        """(ε, δ) after a failed line search, and a message if the run must stop there."""
        ...


@dataclass(frozen=True)
class AdaptiveAccuracy:
    """MAID's accuracy: start at (ε₀, δ₀); while ω > (1 − η)‖z‖ multiply ε, δ by τ and
    recompute; after an accepted step multiply them by ν ≥ 1, after a failed line search by τ;
    stop ("stalled") rather than let ε fall below ``min_tol``. Fields as in :class:`MAID`."""

    lower_tol: float
    adjoint_tol: float
    shrink: float
    relax: float
    descent_margin: float
    min_tol: float

    def __post_init__(self) -> None:
        _check("lower_tol", self.lower_tol, 0.0, math.inf)
        _check("adjoint_tol", self.adjoint_tol, 0.0, math.inf)
        _check("shrink", self.shrink, 0.0, 1.0 - 1e-12)
        _check("relax", self.relax, 1.0, math.inf, closed_low=True)
        _check("descent_margin", self.descent_margin, 0.0, 1.0 - 1e-12, closed_low=True)
        _check("min_tol", self.min_tol, 0.0, math.inf)

    def initial(self) -> tuple[float, float]:
        return float(self.lower_tol), float(self.adjoint_tol)

    def tolerances(self, step: int, current: tuple[float, float]) -> tuple[float, float]:
        return current

    def refine(
        self, eps: float, delta: float, znorm: float, omega: float
    ) -> tuple[float, float] | str | None:
        if omega <= (1.0 - self.descent_margin) * znorm:
            return None
        if eps * self.shrink < self.min_tol:
            return (
                f"ω = {omega:.3e} > (1 − η)‖z‖ = {(1 - self.descent_margin) * znorm:.3e} "
                f"at ε = {eps:.3e}, and ε may not fall below min_tol = {self.min_tol:g}; "
                f"‖∇F(θ)‖ ≤ ‖z‖ + ω = {znorm + omega:.3e}"
            )
        return eps * self.shrink, delta * self.shrink

    def after_accept(self, eps: float, delta: float) -> tuple[float, float]:
        return eps * self.relax, delta * self.relax

    def after_failure(self, eps: float, delta: float) -> tuple[tuple[float, float], str | None]:
        message = None
        if eps * self.shrink < self.min_tol:
            message = (
                f"the line search failed at ε = {eps:.3e} and ε may not fall below "
                f"min_tol = {self.min_tol:g}"
            )
        return (eps * self.shrink, delta * self.shrink), message


@dataclass(frozen=True)
class ScheduledAccuracy:
    """HOAG's accuracy: (ε_k, δ_k) from a fixed schedule, whatever the line search does (z is
    always accepted as a direction)."""

    accuracy: Accuracy

    def initial(self) -> tuple[float, float]:
        return self.accuracy(0)

    def tolerances(self, step: int, current: tuple[float, float]) -> tuple[float, float]:
        return self.accuracy(step)

    def refine(
        self, eps: float, delta: float, znorm: float, omega: float
    ) -> tuple[float, float] | str | None:
        return None

    def after_accept(self, eps: float, delta: float) -> tuple[float, float]:
        return eps, delta

    def after_failure(self, eps: float, delta: float) -> tuple[tuple[float, float], str | None]:
        return (eps, delta), None


@dataclass(frozen=True, kw_only=True)
class _LineSearch(Method):
    """Fields shared by :class:`MAID` and :class:`HOAG`.

    Attributes:
        estimator: the hypergradient estimator; it must report an error bound ω (its
            ``with_bound()``, e.g. ``Implicit``; not ``Unrolled`` or SID). Its
            ``solve_lower`` also solves the trial lower levels.
        step: α₀, the first trial step (units of θ per unit of hypergradient).
        backtrack: ρ ∈ (0, 1), the factor between successive trial steps.
        max_backtracks: trials per iteration before the line search fails.
        growth: factor ≥ 1 applied to the accepted step for the next first trial.
        decrease: c > 0 of the sufficient-decrease margin c·αρⁱ‖z‖².
        grad_tol: stop ("converged") once ‖z‖ + ω ≤ grad_tol, which certifies
            ‖∇F(θ)‖ ≤ grad_tol; 0 disables the test.
        projection: optional P applied to each trial point.
        refine_iterations: conjugate-gradient steps of the Newton correction whose float64
            residual tightens the line search's certified values (see :func:`_certified`;
            counted as oracle calls); 0 disables it.
    """

    estimator: HypergradientEstimator = field(default_factory=Implicit)
    step: float = 1.0
    backtrack: float = 0.5
    max_backtracks: int = 10
    growth: float = 10.0 / 9.0
    decrease: float = 1e-4
    grad_tol: float = 0.0
    projection: Projection | None = None
    refine_iterations: int = 20

    def __post_init__(self) -> None:
        if not isinstance(self.estimator, HypergradientEstimator):
            raise BilevelError(
                f"estimator must be a HypergradientEstimator, got {self.estimator!r}"
            )
        # the line search needs ω at every step (an error if the estimator cannot report it)
        object.__setattr__(self, "estimator", self.estimator.with_bound())
        _check("step", self.step, 0.0, math.inf)
        _check("backtrack", self.backtrack, 0.0, 1.0 - 1e-12)
        if (
            isinstance(self.max_backtracks, bool)
            or not isinstance(self.max_backtracks, int)
            or self.max_backtracks < 1
        ):
            raise BilevelError(
                f"max_backtracks must be a positive integer, got {self.max_backtracks!r}"
            )
        if (
            isinstance(self.refine_iterations, bool)
            or not isinstance(self.refine_iterations, int)
            or self.refine_iterations < 0
        ):
            raise BilevelError(
                f"refine_iterations must be a non-negative integer, got {self.refine_iterations!r}"
            )
        _check("growth", self.growth, 1.0, math.inf, closed_low=True)
        _check("decrease", self.decrease, 0.0, math.inf)
        _check("grad_tol", self.grad_tol, 0.0, math.inf, closed_low=True)
        if self.projection is not None and not callable(self.projection):
            raise BilevelError("projection must be a callable theta -> None or projected θ")

    default_checkpoint_every = 10

    @property
    def policy(self) -> AccuracyPolicy:
        """The accuracy policy: what distinguishes the line-search methods."""
        raise NotImplementedError

    def engine(
        self,
        problem: BilevelProblem,
        samples: SampleSet,
        budget: Budget,
        estimator_state: EstimatorState | None = None,
    ) -> Engine:
        """Runs as :meth:`Method.run`; a step is one iteration (hypergradient + line search),
        an epoch equals a step. Status ``"stalled"``: MAID's tolerance would fall below
        ``min_tol``."""
        return _LineSearchEngine(self, problem, samples, budget, estimator_state)


@dataclass(frozen=True, kw_only=True)
class MAID(_LineSearch):
    """Method of adaptive inexact descent: full-batch inexact gradient descent whose accuracy
    adapts itself (see the module docstring and :class:`_LineSearch` for the shared fields).

    Attributes:
        lower_tol: ε₀, initial tolerance on ‖∇ₓh_i(x̃_i)‖ (units of ∇ₓh).
        adjoint_tol: δ₀, initial tolerance on ‖H_i q̃_i − ∇ₓf_i‖ (default: ``lower_tol``).
        shrink: τ ∈ (0, 1), the factor applied to ε and δ when z is not certified to descend
            or the line search fails.
        relax: ν ≥ 1, the factor applied to ε and δ after an accepted step.
        descent_margin: η ∈ [0, 1): z is accepted as a direction when ω ≤ (1 − η)‖z‖.
        min_tol: the run stops ("stalled") rather than shrink ε below this.
    """

    lower_tol: float = 1e-1
    adjoint_tol: float | None = None
    shrink: float = 0.5
    relax: float = 1.05
    descent_margin: float = 1e-4
    min_tol: float = 1e-12

    def __post_init__(self) -> None:
        super().__post_init__()
        self.policy  # noqa: B018 (checks the fields)

    @property
    def policy(self) -> AdaptiveAccuracy:
        return AdaptiveAccuracy(
            lower_tol=self.lower_tol,
            adjoint_tol=self.lower_tol if self.adjoint_tol is None else self.adjoint_tol,
            shrink=self.shrink,
            relax=self.relax,
            descent_margin=self.descent_margin,
            min_tol=self.min_tol,
        )


@dataclass(frozen=True, kw_only=True)
class HOAG(_LineSearch):
    """HOAG-style baseline: the same line search with a fixed accuracy schedule.

    Attributes:
        accuracy: (ε_k, δ_k) at iteration k, as for :class:`~bilevel.methods.ISGD`; choose a
            summable sequence (e.g. ``"poly:1e-1,2"``, ``"geom:1e-1,0.9"``). A failed line
            search leaves θ unchanged and the next iteration uses ε_{k+1}.
    """

    accuracy: Accuracy | ScheduleLike | tuple[ScheduleLike, ScheduleLike] = "poly:1e-1,2"

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "accuracy", as_accuracy(self.accuracy))

    @property
    def policy(self) -> ScheduledAccuracy:
        return ScheduledAccuracy(self.accuracy)


@dataclass
class _Pending:
    hg: Hypergradient
    eps: float
    delta: float
    cost: float
    accepted: bool = False
    theta: list[Tensor] | None = None
    x: Tensor | None = None
    alpha: float = 0.0
    trials: int = 0
    finished: tuple[str, str] | None = None
    exhausted: str | None = None  # why the budget ended the step early


def _upper_values(
    problem: BilevelProblem, x: Tensor, batch: Batch
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-instance f_i(x_i), ‖∇ₓf_i(x_i)‖ and an allowance for the rounding of f_i (no
    oracle cost: upper-level derivatives).

    Below float64 they are evaluated in float64 at the given points (the allowance is then
    the float64 one, negligible); where the loss does not evaluate in float64, in the working
    precision with the margin 8·u·√n·|f_i| on f_i and on ‖∇ₓf_i‖.
    """
    precise = x.dtype != torch.float64
    if precise:
        try:
            return _upper_values_in(problem, x.detach().double(), as_float64(batch))
        except (RuntimeError, TypeError):
            pass
    return _upper_values_in(problem, x, batch)


def _upper_values_in(
    problem: BilevelProblem, x: Tensor, batch: Batch
) -> tuple[Tensor, Tensor, Tensor]:
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        losses = problem.loss(xr, batch)
        (g,) = torch.autograd.grad(losses.sum(), xr, allow_unused=True)
    if losses.dtype != x.dtype:
        raise TypeError("the loss was not evaluated in the requested precision")
    losses = losses.detach()
    gnorm = torch.zeros_like(losses) if g is None else batch_norm(g.detach())
    margin = rounding_margin(x, losses.abs() + gnorm)  # float64: negligible, kept for rigour
    return losses, gnorm + margin, margin


def _lower_grad_norm(
    lower: LowerLevel, x: Tensor, computed: Tensor
) -> tuple[Tensor, Tensor | None]:
    """‖∇ₓh_i(x_i)‖ recomputed in float64 at the float32 points (one counted gradient
    evaluation), with that float64 gradient; else ``computed`` plus the rounding margin of the
    working precision, and None."""
    if x.dtype != torch.float64:
        try:
            with torch.enable_grad():
                xr = x.detach().double().requires_grad_(True)
                energy = lower.problem.energy(xr, as_float64(lower.batch))
                (g,) = torch.autograd.grad(energy.sum(), xr)
            lower.cost.grad_evals += x.shape[0]
            if energy.dtype == torch.float64:
                return batch_norm(g) * (1.0 + 4 * torch.finfo(x.dtype).eps), g
        except (RuntimeError, TypeError):
            pass
    op = lower.hessian(x)  # the magnitude ‖H x‖ of the terms summed into ∇ₓh
    return computed + rounding_margin(x, 2 * batch_norm(op.full_matvec(x)) + computed), None


@dataclass
class _Certified:
    """Per-instance bounds ``low`` ≤ f_i(x̂_i(θ)) ≤ ``high`` and ``value``, f_i at the point
    whose bounds were used (the first-order guess of f_i(x̂_i))."""

    low: Tensor
    high: Tensor
    value: Tensor


def _certified(
    problem: BilevelProblem,
    batch: Batch,
    cost: Cost,
    x: Tensor,
    dist: Tensor,
    mu: Tensor,
    l_f: Tensor | float,
    refine: int,
    grad64: Tensor | None = None,
) -> _Certified:
    """Bounds on f_i(x̂_i) from a point x̃_i with certified distance ‖x̃_i − x̂_i‖ ≤ ``dist``.

    With f_i convex and ∇ₓf_i L_f-Lipschitz, for any point p_i with ‖p_i − x̂_i‖ ≤ ε_i,

        f_i(p_i) − ‖∇ₓf_i(p_i)‖ε_i ≤ f_i(x̂_i) ≤ f_i(p_i) + ‖∇ₓf_i(p_i)‖ε_i + L_f ε_i²/2.

    p = x̃ gives the plain bounds (f_i, ‖∇ₓf_i‖ in float64, :func:`_upper_values`). With
    ``refine`` > 0 the bounds are also taken at the float64 point x̄ = x̃ + d, d from
    ``refine`` conjugate-gradient steps on ∇²h(x̃) d = −∇h(x̃) (a Newton correction: the
    right-hand side ∇h(x̃) in float64, the Hessian products in the working precision), with
    ε̄_i = (‖∇h_i(x̄_i)‖ + rounding)/μ_i, ∇h(x̄) in float64: a certificate for any d, so the
    CG accuracy decides only how tight it is. A float32 solve stalls where its rounding of
    ∇h dominates (about L·u·‖x‖, L the largest curvature), so ε at x̃ cannot fall below that
    floor; ε̄ at x̄ can (in any precision it is also far smaller than ε at the lower
    solver's tolerance). The larger lower bound and the smaller upper bound
    of the two are returned. ``grad64``: ∇h(x̃) in float64 if already computed. Cost
    (counted): per instance one or two float64 gradients, one in the working precision (the
    Hessian's graph) and at most ``refine`` + 1 Hessian-vector products.
    """
    losses, gnorm, rounding = _upper_values(problem, x, batch)
    dist = dist.to(losses)
    out = _Certified(
        low=losses - gnorm * dist - rounding,
        high=losses + gnorm * dist + 0.5 * l_f * dist**2 + rounding,
        value=losses,
    )
    if refine <= 0:
        return out
    try:
        lower64 = LowerLevel(problem, as_float64(batch), cost)
        x64 = x.detach().double()
        grad = lower64.value_and_grad(x64)[1] if grad64 is None else grad64
        if grad.dtype != torch.float64:
            return out
        # d in the working precision: any d is certified, and its own rounding (relative u
        # of d, a small vector) is far below the float64 residual it removes
        op = LowerLevel(problem, batch, cost).hessian(x)
        rhs = -grad.to(x.dtype)
        d = CG(max_iter=refine).solve(op.matvec, rhs, 1e-6 * batch_norm(rhs)).solution
        x_bar = x64 + d.double()
        _, g_bar = lower64.value_and_grad(x_bar)
        g_norm = batch_norm(g_bar)
        magnitude = 2 * batch_norm(op.full_matvec(x.detach())).double() + g_norm
        h_norm = g_norm + rounding_margin(x64, magnitude)
        at = _upper_values_in(problem, x_bar, as_float64(batch))
    except (RuntimeError, TypeError, BilevelError):  # no float64 evaluation: plain bounds
        return out
    eps = h_norm / mu.to(h_norm)
    losses, gnorm, rounding = at
    low = losses - gnorm * eps - rounding
    high = losses + gnorm * eps + 0.5 * l_f * eps**2 + rounding
    better = low > out.low
    return _Certified(
        low=torch.fmax(out.low, low),  # a NaN bound (unknown distance) yields to the other
        high=torch.fmin(out.high, high),
        value=torch.where(better, losses, out.value),
    )


def _regulariser(problem: BilevelProblem) -> float:
    if problem.upper_regulariser is None:
        return 0.0
    with torch.no_grad():
        return float(problem.upper_regulariser(problem.theta))


class _LineSearchEngine(Engine):
    def __init__(
        self,
        cfg: _LineSearch,
        problem: BilevelProblem,
        samples: SampleSet,
        budget: Budget | None = None,
        estimator_state: EstimatorState | None = None,
    ) -> None:
        super().__init__(problem)
        self.cfg = cfg
        if estimator_state is None:
            estimator_state = cfg.estimator.init_state()
        self.estimator_state = estimator_state
        self.budget_calls = None if budget is None else budget.oracle_calls
        self.budget_time = None if budget is None else budget.wall_time
        self.name = type(cfg).__name__.lower()
        self.n = n = len(samples)
        # data parallel (bilevel.distributed): this process's instances, reduced sums
        self.shard = distributed.current()
        index = torch.arange(n)
        if self.shard is not None:
            if n < self.shard.world:
                raise BilevelError(
                    f"{n} samples cannot be shared by {self.shard.world} processes: use at "
                    "most as many processes as samples"
                )
            index = self.shard.owned(index)
        self.index = index
        self.batch = samples.batch(index)
        self.x_warm = samples.initial(index).detach().clone()
        if self.x_warm.dim() < 1 or self.x_warm.shape[0] != index.numel():
            raise BilevelError(
                f"samples.initial(arange(n)) must have leading dimension n = {n}, got shape "
                f"{tuple(self.x_warm.shape)}"
            )
        self.adjoint: Tensor | None = None
        self.alpha = float(cfg.step)
        self.policy = cfg.policy
        self.tol, self.adjoint_tol = self.policy.initial()
        self.finished: tuple[str, str] | None = None
        self.distance = math.nan  # max_i ε_i of the latest hypergradient (all processes)

    @property
    def generators(self) -> dict[str, torch.Generator]:
        return {f"estimator_{n}": g for n, g in self.estimator_state.generators().items()}

    def check_finished(self) -> None:
        if self.finished is not None:
            raise Stop(*self.finished)

    def _spent(self, cost: float) -> str | None:
        """Which budget is spent with ``cost`` more oracle calls of this step, as a message
        (None: neither). Oracle calls, and the run's seconds when it has a wall-time limit (rank
        0's clock decides for every process); the run loop then stops before the next step."""
        total = self.cost + cost
        if self.budget_calls is not None and total >= self.budget_calls:
            return f"oracle-call budget reached ({total:g} >= {self.budget_calls})"
        if self.budget_time is None or self.seconds is None:
            return None
        seconds = self.seconds()
        over = seconds >= self.budget_time
        if self.shard is not None:
            over = self.shard.agree(over)
        return (
            f"wall-time budget reached ({seconds:.1f} s >= {self.budget_time:g} s)"
            if over
            else None
        )

    # -- compute ---------------------------------------------------------------------------

    def _mean(self, total: float) -> float:
        """The mean over all n samples of per-instance values whose local sum is ``total``."""
        if self.shard is not None:
            (total,) = self.shard.sum_floats([total])
        return total / self.n

    def _hypergradient(
        self, x0: Tensor, a0: Tensor | None, eps: float, delta: float
    ) -> Hypergradient:
        shard = self.shard
        hg, error = None, None
        try:
            hg = self.cfg.estimator(
                self.problem,
                self.batch,
                x0,
                lower_tol=eps,
                adjoint_tol=delta,
                adjoint0=a0,
                state=self.estimator_state,
            )
        except BilevelError as exc:  # NonFiniteError included
            if shard is None:
                raise
            error = exc
        if shard is not None:  # the hypergradient, loss and bound of all n samples
            hg, self.distance = distributed.reduce_hypergradient(
                hg, x0.shape[0], self.params, shard, error
            )
        else:
            self.distance = float(hg.eps.max())
        if not math.isfinite(hg.loss):
            raise NonFiniteError(f"the upper-level loss is {hg.loss}")
        if hg.bound is None:
            raise BilevelError(
                f"{type(self.cfg).__name__} needs an estimator that reports an error bound ω "
                f"({type(self.cfg.estimator).__name__} reports none; use Implicit)"
            )
        return hg

    def compute(self) -> _Pending:
        cfg, policy = self.cfg, self.policy
        eps, delta = policy.tolerances(self.step, (self.tol, self.adjoint_tol))
        hg = self._hypergradient(self.x_warm, self.adjoint, eps, delta)
        cost = hg.cost.oracle_calls
        while True:
            znorm, omega = hg.norm, float(hg.bound)
            if cfg.grad_tol > 0 and znorm + omega <= cfg.grad_tol:
                message = (
                    f"‖z‖ + ω = {znorm + omega:.3e} ≤ grad_tol = {cfg.grad_tol:g}: "
                    f"‖∇F(θ)‖ ≤ {znorm + omega:.3e}"
                )
                return _Pending(hg, eps, delta, cost, finished=("converged", message))
            refined = policy.refine(eps, delta, znorm, omega)
            if refined is None:
                break
            reason = self._spent(cost)
            if reason is not None:
                return _Pending(hg, eps, delta, cost, exhausted=f"{reason}, before a recomputation")
            if isinstance(refined, str):
                return _Pending(hg, eps, delta, cost, finished=("stalled", refined))
            eps, delta = refined
            hg = self._hypergradient(hg.x, hg.adjoint, eps, delta)
            cost += hg.cost.oracle_calls
        pending = _Pending(hg, eps, delta, cost)
        self._line_search(pending)
        return pending

    def _line_search(self, p: _Pending) -> None:
        cfg, problem, hg = self.cfg, self.problem, p.hg
        mu = problem.mu if problem.mu is not None else hg.mu  # evaluated at each trial θ⁺
        stated_lf = cfg.estimator.stated_constants().upper_grad_lipschitz
        l_f_report = hg.constants.get("L_f")
        l_f_default = 1.0 if l_f_report is None else l_f_report.value
        if self.shard is not None:
            l_f_default = self.shard.extreme(l_f_default, largest=True)

        def lipschitz(x: Tensor) -> Tensor | float:
            l_f = evaluate_constant("upper_grad_lipschitz", stated_lf, problem.theta, self.batch, x)
            return l_f_default if l_f is None else l_f.to(torch.float64)

        def moduli(x: Tensor) -> Tensor:
            values = problem.mu_values(self.batch, x)
            if values is None:  # the estimator's μ (the smallest over instances)
                return torch.full((x.shape[0],), float(hg.mu), dtype=x.dtype, device=x.device)
            return values

        trial_cost = Cost()
        eps_old = torch.nan_to_num(hg.eps, nan=math.inf)
        refine = cfg.refine_iterations
        old_bounds = _certified(
            problem, self.batch, trial_cost, hg.x, eps_old, moduli(hg.x), lipschitz(hg.x), refine
        )
        old = self._mean(float(old_bounds.low.sum())) + _regulariser(problem)
        z_sq = hg.norm**2
        # ⟨∇F(θ), z⟩ ≤ ‖z‖(‖z‖ + ω): a trial whose first-order decrease α‖z‖(‖z‖ + ω) − cα‖z‖²
        # falls short of the old side's inexactness mean_i (f_i − low_i) cannot pass the test
        # unless F curves downwards; it and the smaller trials after it are not solved for
        slack = self._mean(float((old_bounds.value - old_bounds.low).sum()))
        reach = hg.norm * (hg.norm + float(hg.bound)) - cfg.decrease * z_sq
        theta0 = snapshot(self.params)
        try:
            for i in range(cfg.max_backtracks):
                trial_calls = self._mean(trial_cost.oracle_calls) * self.n  # all processes
                reason = self._spent(p.cost + trial_calls)
                if reason is not None:
                    p.exhausted = f"{reason}, within the line search after {i} trials"
                    break
                alpha = self.alpha * cfg.backtrack**i
                if alpha * reach < slack:
                    break
                p.trials = i + 1
                with torch.no_grad():
                    for param, t0, g in zip(self.params, theta0, hg.grad):
                        param.copy_(t0 - alpha * g)
                apply_projection(problem, cfg.projection)
                lower = LowerLevel(problem, self.batch, trial_cost)
                try:
                    sol = cfg.estimator.solve_lower(lower, hg.x, p.eps, mu)
                except NonFiniteError:
                    if self.shard is not None:
                        self._mean(math.nan)  # every process rejects the trial
                    continue  # the trial point is unusable: backtrack
                mu_new = moduli(sol.x).to(sol.grad_norm)
                h_norm, grad64 = _lower_grad_norm(lower, sol.x, sol.grad_norm)
                l_f = lipschitz(sol.x)
                bounds = _certified(
                    problem,
                    self.batch,
                    trial_cost,
                    sol.x,
                    h_norm / mu_new,
                    mu_new,
                    l_f,
                    refine,
                    grad64,
                )
                new = self._mean(float(bounds.high.sum())) + _regulariser(problem)
                if math.isfinite(new) and new <= old - cfg.decrease * alpha * z_sq:
                    p.accepted, p.alpha = True, alpha
                    p.theta, p.x = snapshot(self.params), sol.x.detach()
                    break
        finally:
            load_params(self.params, theta0)
            calls = trial_cost.oracle_calls
            p.cost += calls if self.shard is None else self._mean(calls) * self.n

    # -- commit ----------------------------------------------------------------------------

    def commit(self, p: _Pending) -> dict[str, Any]:
        cfg, hg = self.cfg, p.hg
        self.cost += p.cost
        record = self.step_record(hg, p.eps, p.delta, p.alpha, self.distance)
        record.update(accepted=p.accepted, backtracks=p.trials, certified=hg.bound_certified)
        if p.exhausted is not None:
            record["budget_stop"] = p.exhausted
        self.adjoint = None if hg.adjoint is None else hg.adjoint.detach().clone()
        if p.finished is not None:
            self.finished = p.finished
            self.x_warm = hg.x.detach().clone()
            self.tol, self.adjoint_tol = p.eps, p.delta
        elif p.exhausted is not None:
            # the budget ran out within the step: θ and accuracies are kept
            self.x_warm = hg.x.detach().clone()
        elif p.accepted:
            load_params(self.params, p.theta)
            self.x_warm = p.x
            self.alpha = p.alpha * cfg.growth
            self.tol, self.adjoint_tol = self.policy.after_accept(p.eps, p.delta)
        else:
            self.x_warm = hg.x.detach().clone()
            (self.tol, self.adjoint_tol), stalled = self.policy.after_failure(p.eps, p.delta)
            if stalled is not None:
                self.finished = ("stalled", stalled)
        self.step += 1
        self.epoch += 1
        return record

    # -- state -----------------------------------------------------------------------------

    def _rows(self, local: Tensor | None) -> Tensor | None:
        """All n rows of a per-instance tensor (gathered from every process)."""
        if self.shard is None or local is None:
            return None if local is None else local.clone()
        return self.shard.gather_rows(local, self.index, self.n)

    def state_dict(self) -> dict[str, Any]:
        return {
            **self.base_state(),
            "x_warm": self._rows(self.x_warm),
            "adjoint": self._rows(self.adjoint),
            "alpha": self.alpha,
            "tol": self.tol,
            "adjoint_tol": self.adjoint_tol,
            "finished": None if self.finished is None else list(self.finished),
            "estimator_state": self.estimator_state.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        x_warm = state["x_warm"]
        expected = (self.n, *self.x_warm.shape[1:])
        if x_warm.shape != expected:
            raise BilevelError(
                f"the checkpoint's lower-level points have shape {tuple(x_warm.shape)}, "
                f"expected {expected}: not the same samples"
            )
        self.load_base_state(state)
        where = self.index.to(x_warm.device)
        self.x_warm = x_warm[where].to(self.x_warm)
        adjoint = state["adjoint"]
        self.adjoint = None if adjoint is None else adjoint[where].to(self.x_warm)
        self.alpha = float(state["alpha"])
        self.tol, self.adjoint_tol = float(state["tol"]), float(state["adjoint_tol"])
        finished = state["finished"]
        self.finished = None if finished is None else (str(finished[0]), str(finished[1]))
        self.estimator_state.load_state_dict(state["estimator_state"])
