"""Hypergradient estimators behind one protocol.

Every estimator is a :class:`HypergradientEstimator`: a small immutable configuration object.
Called on a problem and a batch, it returns a :class:`Hypergradient`: the estimate z of ∇F(θ)
for the mean upper loss over the batch (shaped like θ), the a-posteriori error bound ω with a
certified/estimated flag, the lower-level and adjoint solutions (for warm starts), and the
cost in oracle calls.

    z = ∇_θ f̄ − (1/B) Σ_i J_iᵀ q_i + ∇r(θ),    H_i q_i = ∇ₓf_i(x̃_i)         (docs/concepts.md)

Estimators: :class:`Implicit` (AID with any linear solver), :class:`JacobianFree` (JFB: H⁻¹
replaced by a multiple of the identity) and :class:`Exact` (dense Hessian and direct solve;
small problems and tests), the three adjoint estimators (:class:`AdjointEstimator`);
:class:`Unrolled` (ITD); and :class:`~bilevel.stochastic.SID`.

The protocol (what the upper-level methods use, and all they use): calling the estimator;
:meth:`~HypergradientEstimator.init_state`, the :class:`EstimatorState` that carries whatever
evolves from one call to the next (SID's minibatch streams, variance-reduction anchors and
accuracy scale) and that the method passes back at every call and checkpoints;
``uses_tolerances`` and ``shards_rows``; :meth:`~HypergradientEstimator.with_bound`,
:meth:`~HypergradientEstimator.solve_lower` and
:meth:`~HypergradientEstimator.stated_constants` (MAID's line search);
:meth:`~HypergradientEstimator.fixed_work` (fixed effort per call); and
:meth:`~HypergradientEstimator.with_`, the functional update (``est.with_(lower_solver=...)``,
the same as ``dataclasses.replace``; safe, since no estimator holds state).

Tolerances are absolute and per instance: ``lower_tol`` bounds ‖∇ₓh_i(x̃_i)‖ and
``adjoint_tol`` bounds ‖H_i q̃_i − ∇ₓf_i(x̃_i)‖ (units of ∇ₓf); neither changes meaning with
the batch size, because each adjoint system uses ∇ₓf_i, not ∇ₓ of the batch mean.  Estimators
whose accuracy is set otherwise (:class:`Unrolled`, SID) refuse them.

Strong convexity: a stated μ (a number, per instance, or a function of θ evaluated at the
current θ) is checked against the curvature seen at x̃ — the Ritz values of the adjoint
solver's Krylov space, a Lanczos run of ``constants.curvature_iterations`` steps when that
space is smaller, or the dense Hessian's eigenvalues for :class:`Exact`.  A contradiction
gives a :class:`BoundWarning`, an estimated μ and an uncertified bound.  ``hg.constants``
tells, for μ and every constant of ω, its value and whether it was stated, computed or
estimated.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor

from bilevel.autodiff import (
    Cost,
    HessianOperator,
    LowerLevel,
    batch_norm,
    expand_as_batch,
    upper_gradient_sums,
)
from bilevel.bounds import (
    BoundConstants,
    ConstantReport,
    compute_error_bound,
    estimate_mu,
    generator_for,
    recompute_float64,
    rounding_margin,
)
from bilevel.linear import (
    CG,
    LinearSolution,
    LinearSolver,
    Neumann,
    _Deferred,
    lanczos_extremes,
    resolved_state,
)
from bilevel.lower import (
    ConvergenceWarning,
    LowerSolution,
    LowerSolver,
    Nesterov,
    estimate_lipschitz,
    solve_lower,
)
from bilevel.problem import (
    Batch,
    BilevelError,
    BilevelProblem,
    NonFiniteError,
    NotStronglyConvexError,
    Theta,
    check_finite,
    parameter_names,
)


class BoundWarning(UserWarning):
    """The stated μ is contradicted by curvature observed during the solve, or unchecked."""


@dataclass(frozen=True)
class Hypergradient:
    """An inexact hypergradient with its evidence.

    Attributes:
        grad: z, one tensor per parameter, shaped like θ.
        loss: mean upper-level loss at x̃ (plus r(θ) if the problem has one).
        losses: per-instance upper losses f_i(x̃_i), shape (B,).
        bound: ω, bound on ‖z − ∇F(θ)‖ for the batch mean (None when unavailable, e.g. ITD).
        bound_certified: True when every constant in ω is stated or computed exactly.
        x: lower-level solutions x̃ (B, ...), for warm starts.
        adjoint: adjoint solutions q̃ (B, ...) (None for ITD), for warm starts.
        eps: certified per-instance distances ‖x̃_i − x̂_i‖ ≤ ε_i (B,).
        delta: per-instance adjoint residual norms ‖H_i q̃_i − ∇ₓf_i‖ (B,): with the bound
            (or without a linear solver), recomputed at q̃ (in float64 below float64, else
            enlarged by the rounding margin of the working precision; see
            :mod:`bilevel.bounds`); otherwise the residual the adjoint solver reports (for CG
            and MINRES the recursive one).
        lower: the lower-level solve's report; linear: the adjoint solve's report.
        mu: the strong-convexity modulus used (the smallest over instances);
            mu_estimated: whether it was estimated (not stated, or contradicted).
        cost: oracle calls and wall time spent for this estimate.
        constants: name → :class:`~bilevel.bounds.ConstantReport` (value and whether it was
            stated, computed or estimated) for μ and every constant of ω.

    ``loss``, ``eps`` and ``delta`` may be given as functions, called on first access
    (``loss`` costs a read from the device, which a caller that never reads it need not pay).
    """

    grad: list[Tensor]
    loss: float = _Deferred()  # type: ignore[assignment]
    losses: Tensor
    bound: float | None
    bound_certified: bool
    x: Tensor
    adjoint: Tensor | None
    eps: Tensor = _Deferred()  # type: ignore[assignment]
    delta: Tensor = _Deferred()  # type: ignore[assignment]
    lower: LowerSolution | None
    linear: LinearSolution | None
    mu: float | None
    mu_estimated: bool
    cost: Cost
    constants: dict[str, ConstantReport] = field(default_factory=dict)

    def __getstate__(self) -> dict:
        return resolved_state(self)

    @property
    def norm(self) -> float:
        """‖z‖₂ over all parameters."""
        return math.sqrt(sum(float((g * g).sum()) for g in self.grad))

    def named_grad(self, theta: Theta) -> dict[str, Tensor]:
        """z by parameter name for the θ it was computed at: ``{"layer.weight": ...}`` for an
        ``nn.Module``, the keys of a dict, ``"0"``, ``"1"``, ... for a sequence and ``"theta"``
        for one tensor (see :func:`~bilevel.problem.parameter_names`)."""
        names = parameter_names(theta)
        if len(names) != len(self.grad):
            raise BilevelError(
                f"theta has {len(names)} parameters but the hypergradient {len(self.grad)}"
            )
        return dict(zip(names, self.grad))

    @property
    def metrics(self) -> dict[str, float]:
        """Estimator-specific values for the run's per-step records (none here; SID reports its
        iteration counts and residual estimates)."""
        return {}

    def accumulate_into(self, params: list[Tensor]) -> None:
        """Add z to ``p.grad`` so that any ``torch.optim`` optimiser can take the step."""
        for p, g in zip(params, self.grad):
            if p.grad is None:
                p.grad = g.detach().clone()
            else:
                p.grad.add_(g)


class EstimatorState:
    """What an estimator evolves from one call to the next, kept out of the estimator.

    :meth:`HypergradientEstimator.init_state` makes one; the caller (an upper-level method)
    passes it to every call, gives each process its streams (:meth:`assign`) and checkpoints
    it: :meth:`generators` with the run's random generators (per process), :meth:`state_dict`
    with the rest. This base class is the state of the estimators that keep none.
    """

    def generators(self) -> dict[str, torch.Generator]:
        """The random streams the estimator draws from, by name (checkpointed with the run's
        own generators, per process)."""
        return {}

    def assign(self, rank: int, world: int, force: bool = False) -> None:
        """Data parallel: use process ``rank``'s (of ``world``) share of the rows and its own
        streams (see :class:`~bilevel.stochastic.StageSamplers`); nothing to do here."""

    def state_dict(self) -> dict[str, Any]:
        """Everything else that evolves (tensors and numbers), for checkpoints."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        if state:
            raise BilevelError(
                f"{type(self).__name__} keeps no state, but the saved one has "
                f"{', '.join(map(repr, state))}: not the same estimator"
            )


_E = TypeVar("_E", bound="HypergradientEstimator")


@dataclass(frozen=True, kw_only=True)
class HypergradientEstimator:
    """The estimator protocol: immutable configuration; state in an :class:`EstimatorState`.

    ``estimator(problem, batch, x0, ...)`` validates the inputs, counts the cost, calls the
    estimator's own ``_estimate``, adds the upper regulariser r(θ) (value and gradient) and
    checks the result. Subclasses implement ``_estimate`` and override the other protocol
    members where their defaults (no state, tolerances used, no bound, no fixed effort) do
    not hold.
    """

    shards_rows: ClassVar[bool] = False
    """Data parallel: the estimator splits a finite sum's rows over the processes itself
    (SID), so the method gives every process every instance; else the instances are split."""

    @property
    def uses_tolerances(self) -> bool:
        """Whether ``lower_tol``/``adjoint_tol`` set the accuracy (else passing them is an
        error; the accuracy is then set by the estimator's iteration counts)."""
        return True

    def init_state(self) -> EstimatorState:
        """A fresh state for a sequence of calls (a run); see :class:`EstimatorState`."""
        return EstimatorState()

    def with_(self: _E, **changes: Any) -> _E:
        """A copy with ``changes`` to its fields, e.g. ``est.with_(lower_solver=LBFGS())``
        (``dataclasses.replace``; the copy shares nothing mutable with this estimator)."""
        return replace(self, **changes)

    def with_bound(self) -> HypergradientEstimator:
        """This estimator set to compute the a-posteriori bound ω at every call (MAID, HOAG);
        an error if it cannot report one or was told not to."""
        raise BilevelError(
            f"the error bound ω is needed (MAID, HOAG), and {type(self).__name__} reports "
            "none; use Implicit"
        )

    def fixed_work(self, iterations: int, adjoint_iterations: int) -> HypergradientEstimator:
        """This estimator with a fixed effort per call: ``iterations`` lower-level iterations,
        ``adjoint_iterations`` adjoint iterations, no warning when those caps are reached."""
        raise BilevelError(f"{type(self).__name__} has no iteration caps to fix")

    def solve_lower(
        self, lower: LowerLevel, x0: Tensor, tol: float | Tensor, mu: Any
    ) -> LowerSolution:
        """A certified lower-level solve to ‖∇ₓh_i‖ ≤ ``tol`` from ``x0`` with this estimator's
        solver (MAID's trial points, the forward pass of :func:`~bilevel.argmin.argmin`)."""
        raise BilevelError(f"{type(self).__name__} has no certified lower-level solve")

    def stated_constants(self) -> BoundConstants:
        """The constants of the bound ω stated by the user (MAID's line search reads L_f)."""
        return BoundConstants()

    def __call__(
        self,
        problem: BilevelProblem,
        batch: Batch,
        x0: Tensor,
        *,
        lower_tol: float | Tensor | None = None,
        adjoint_tol: float | Tensor | None = None,
        adjoint0: Tensor | None = None,
        state: EstimatorState | None = None,
        accumulate: bool = False,
    ) -> Hypergradient:
        """Estimate ∇F(θ) on ``batch`` starting the lower solve from ``x0`` (B, ...).

        Args:
            lower_tol: ε-tolerance, stop instance i when ‖∇ₓh_i(x̃_i)‖ ≤ lower_tol
                (default 1e-4; an error for estimators that do not use it).
            adjoint_tol: δ-tolerance on ‖H_i q_i − ∇ₓf_i‖ (defaults to ``lower_tol``).
            adjoint0: warm start for the adjoint solve.
            state: the :class:`EstimatorState` from :meth:`init_state`, updated in place;
                ``None``: a fresh one for this call alone.
            accumulate: also add the estimate into ``p.grad`` of every parameter.
        """
        problem.check_inputs(x0, batch)
        if adjoint0 is not None and adjoint0.shape != x0.shape:
            raise BilevelError(
                f"adjoint0 has shape {tuple(adjoint0.shape)}, expected {tuple(x0.shape)} like x0"
            )
        if not self.uses_tolerances:
            if lower_tol is not None or adjoint_tol is not None:
                raise BilevelError(
                    f"{type(self).__name__} does not use lower_tol/adjoint_tol (its accuracy is "
                    "set by its iteration counts); do not pass them"
                )
        elif lower_tol is None:
            lower_tol = 1e-4
        adjoint_tol = lower_tol if adjoint_tol is None else adjoint_tol
        state = self.init_state() if state is None else state
        cost = Cost()
        start = time.perf_counter()
        lower = LowerLevel(problem, batch, cost)
        result = self._estimate(problem, batch, lower, x0, lower_tol, adjoint_tol, adjoint0, state)
        result = _add_upper_regulariser(problem, result)
        cost.wall_time = time.perf_counter() - start
        for g in result.grad:
            check_finite("the hypergradient", g)
        if accumulate:
            result.accumulate_into(problem.params)
        return result

    def _estimate(
        self,
        problem: BilevelProblem,
        batch: Batch,
        lower: LowerLevel,
        x0: Tensor,
        lower_tol: Any,
        adjoint_tol: Any,
        adjoint0: Tensor | None,
        state: EstimatorState,
    ) -> Hypergradient:
        """The estimate of ∇ of the mean upper loss (without r(θ)), its costs in
        ``lower.cost``."""
        raise NotImplementedError


def _add_upper_regulariser(problem: BilevelProblem, hg: Hypergradient) -> Hypergradient:
    """``hg`` with r(θ) added to the loss and ∇r(θ) to z (no oracle cost)."""
    if problem.upper_regulariser is None:
        return hg
    params = problem.params
    with torch.enable_grad():
        reg = problem.upper_regulariser(problem.theta)
        reg_grads = torch.autograd.grad(reg, params, allow_unused=True)
    grad = [g if r is None else g + r for g, r in zip(hg.grad, reg_grads)]
    return replace(hg, grad=grad, loss=hg.loss + float(reg.detach()))


def _capped(solver: Any, cap: int, what: str) -> Any:
    """``solver`` with its iteration cap (``max_iter``, or ``terms`` for Neumann) set to
    ``cap``."""
    if isinstance(solver, Neumann):
        return replace(solver, terms=cap)
    names = {f.name for f in dataclasses.fields(solver)} if dataclasses.is_dataclass(solver) else ()
    if "max_iter" not in names:
        raise BilevelError(f"the {what} {solver!r} has no max_iter to cap")
    return replace(solver, max_iter=cap)


@dataclass(frozen=True, kw_only=True)
class AdjointEstimator(HypergradientEstimator):
    """Estimators that solve the lower level to a certified tolerance, then take an adjoint
    q̃ ≈ H⁻¹∇ₓf (each its own way) and z = ∇_θ f̄ − (1/B) Σ J_iᵀ q̃_i with its bound ω.

    Attributes:
        lower_solver: the lower-level solver (per-instance stopping at ``lower_tol``).
        constants: the constants of ω that are known (:class:`~bilevel.bounds.BoundConstants`).
        compute_bound: compute ω (and check a stated μ against the curvature at x̃): True
            always, False never (MAID and HOAG refuse it), None (default) only when the
            caller needs it — MAID and HOAG turn it on (:meth:`with_bound`); a plain call
            returns ``bound=None`` and uses a stated μ unchecked.
        warn_unconverged: warn (``ConvergenceWarning``) when a solve misses its tolerance.
    """

    lower_solver: LowerSolver = field(default_factory=Nesterov)
    constants: BoundConstants = field(default_factory=BoundConstants)
    compute_bound: bool | None = None
    warn_unconverged: bool = True

    def with_bound(self) -> AdjointEstimator:
        if self.compute_bound is False:
            raise BilevelError(
                f"the error bound ω is needed: {type(self).__name__}(compute_bound=False) "
                "refuses it; use compute_bound=True or None"
            )
        return self if self.compute_bound else replace(self, compute_bound=True)

    def fixed_work(self, iterations: int, adjoint_iterations: int) -> AdjointEstimator:
        capped = _capped(self.lower_solver, iterations, "lower_solver")
        return replace(self, lower_solver=capped, warn_unconverged=False)

    def solve_lower(
        self, lower: LowerLevel, x0: Tensor, tol: float | Tensor, mu: Any
    ) -> LowerSolution:
        return solve_lower(lower, x0, tol, self.lower_solver, mu, warn=self.warn_unconverged)

    def stated_constants(self) -> BoundConstants:
        return self.constants

    # -- pieces shared by the estimators -------------------------------------------------

    def _solve(self, problem: BilevelProblem, lower: LowerLevel, x0: Tensor, tol) -> tuple:
        """x̃, the Hessian operator at x̃, μ per instance (B,) and whether it was estimated."""
        sol = self.solve_lower(lower, x0, tol, problem.mu)
        op = lower.hessian(sol.x)
        mu = problem.mu_values(lower.batch, sol.x)
        if mu is not None:
            return sol, op, mu, False
        mu, _ = estimate_mu(op, sol.x, self.constants)
        return sol, op, mu, True

    def _check_mu(
        self,
        op: HessianOperator,
        x: Tensor,
        mu: Tensor,
        linear: LinearSolution | None,
        stated: float | None = None,
    ) -> tuple[Tensor, ConstantReport]:
        """Check a stated μ against the curvature at x̃; (μ to use, its report).

        The evidence is an upper bound on λ_min(H_i(x̃)): the solver's Ritz values when its
        Krylov space had at least min(n, curvature_iterations) dimensions, else (also) those of
        a seeded Lanczos run. Evidence below μ means the stated μ is wrong: warn, and use an
        estimate no larger than the evidence. ``stated``: μ when it was stated as one number
        (reported without reading ``mu`` back from the device).
        """
        if not self.compute_bound:  # nothing to certify: μ as stated
            value = float(mu.min()) if stated is None else stated
            return mu, ConstantReport(value, "stated", "not checked (no bound)")
        c = self.constants
        n, dim = x.shape[0], x[0].numel()
        evidence = torch.full((n,), math.nan, dtype=x.dtype, device=x.device)
        steps = torch.zeros(n, dtype=torch.long, device=x.device)
        if linear is not None:
            evidence = linear.min_curvature.clone()
            if linear.krylov_steps is not None:
                steps = linear.krylov_steps
        need = min(dim, c.curvature_iterations)
        if c.curvature_iterations > 0 and bool((steps < need).any()):
            ritz = lanczos_extremes(op.matvec, x, need, generator_for(x, c.seed))
            evidence = torch.fmin(evidence, ritz.smallest)
            steps = torch.maximum(steps, ritz.steps)
        seen = torch.nan_to_num(evidence, nan=math.inf)
        scale = batch_norm(op.full_matvec(x)) / batch_norm(x).clamp_min(1e-300)
        slack = 1e-4 * mu + 64 * torch.finfo(x.dtype).eps * scale
        bad = seen < mu - slack
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            if bool((seen <= 0).any()):
                j = int((seen <= 0).nonzero()[0])
                raise NotStronglyConvexError(
                    f"the lower-level Hessian of instance {j} has curvature {float(seen[j]):.3e}"
                    " ≤ 0 at x̃: the energy is not strongly convex there"
                )
            warnings.warn(
                f"curvature {float(seen[i]):.4e} below the stated mu = {float(mu[i]):.4e} was "
                f"observed (instance {i}): the stated strong-convexity modulus is too large, "
                "bounds are not certified",
                BoundWarning,
                stacklevel=4,
            )
            est = torch.minimum(mu, seen / c.safety)
            return est, ConstantReport(
                float(est.min()), "estimated", "stated μ contradicted at x̃; Ritz value / safety"
            )
        if c.curvature_iterations <= 0:
            warnings.warn(
                "the stated mu was not checked (curvature_iterations=0): bounds are not certified",
                BoundWarning,
                stacklevel=4,
            )
            return mu, ConstantReport(float(mu.min()), "estimated", "stated, unchecked")
        note = (
            f"stated; consistent with the curvature at x̃ (smallest Ritz value "
            f"{float(seen.min()):.4g}, Krylov dimension ≥ {int(steps.min())})"
        )
        return mu, ConstantReport(float(mu.min()), "stated", note)

    def _finish(
        self,
        problem: BilevelProblem,
        batch: Batch,
        lower: LowerLevel,
        sol: LowerSolution,
        op: HessianOperator,
        mu: Tensor,
        mu_estimated: bool,
        q: Tensor,
        linear: LinearSolution | None,
        losses: Tensor,
        grad_x: Tensor,
        upper_sums: list[Tensor | None],
        params: list[Tensor],
        adjoint_missed: bool = False,
    ) -> Hypergradient:
        """z = (1/B) Σ_i (∇_θ f_i − J_iᵀ q_i) (``upper_sums``: ∇_θ Σ_i f_i, None where f does not
        depend on the parameter); true residuals δ_i; the bound ω (not certified when
        ``adjoint_missed``: the adjoint solve missed its tolerance)."""
        n = q.shape[0]
        jtq = op.jacobian_vjp(q, params)
        grad = [j * (-1.0 / n) if g is None else (g - j) / n for g, j in zip(upper_sums, jtq)]
        x = sol.x
        gnorm = sol.grad_norm
        z_rounding = None
        if self.compute_bound or linear is None:  # the true residual at q̃
            hq = op.full_matvec(q)
            delta = batch_norm(hq - grad_x)
        else:  # no bound: the adjoint solver's own residual (one product fewer), when read
            delta = partial(getattr, linear, "residual_norm")
        if self.compute_bound:  # rounding of the computed residuals (see bilevel.bounds)
            exact = recompute_float64(problem, batch, x, q, grad, lower.cost)
            if exact is not None:
                gnorm, delta, z_rounding = exact.grad_norm, exact.delta, exact.z_rounding
            else:
                delta = delta + rounding_margin(x, batch_norm(hq) + batch_norm(grad_x))
                gnorm = gnorm + rounding_margin(x, 2 * batch_norm(op.full_matvec(x)) + gnorm)
        if mu_estimated:
            mu_report = ConstantReport(
                float(mu.min()), "estimated", "Lanczos at x̃: max(θ_min − r, θ_min/10) / safety"
            )
        else:
            stated = problem.mu if isinstance(problem.mu, float) else None
            mu, mu_report = self._check_mu(op, x, mu, linear, stated)
            mu_estimated = mu_report.source == "estimated"
        certified = False
        bound = None
        constants: dict[str, ConstantReport] = {"mu": mu_report}
        eps: Tensor | Callable[[], Tensor] = partial(torch.div, gnorm, mu)  # ε_i, when read
        if self.compute_bound:
            eps = gnorm / mu
            eb = compute_error_bound(
                problem,
                batch,
                op,
                eps,
                delta,
                grad_x,
                mu,
                mu_report,
                self.constants,
                q,
                z_rounding,
            )
            bound, certified, constants = (
                eb.value,
                eb.certified and not adjoint_missed,
                eb.constants,
            )
        return Hypergradient(
            grad=grad,
            loss=lambda: float(losses.mean()),
            losses=losses,
            bound=bound,
            bound_certified=certified,
            x=sol.x,
            adjoint=q.detach() if q.requires_grad else q,
            eps=eps,
            delta=delta,
            lower=sol,
            linear=linear,
            mu=mu_report.value,  # the smallest μ_i
            mu_estimated=mu_estimated,
            cost=lower.cost,
            constants=constants,
        )

    def _estimate(self, problem, batch, lower, x0, lower_tol, adjoint_tol, adjoint0, state):
        """Lower solve, upper gradients, the method's adjoint q, then z and its bound."""
        sol, op, mu, mu_est = self._solve(problem, lower, x0, lower_tol)
        params = problem.params
        losses, grad_x, upper_sums = upper_gradient_sums(problem, sol.x, batch, params)
        q, linear = self._adjoint(op, sol.x, grad_x, adjoint_tol, adjoint0, mu)
        missed = self._adjoint_missed(linear, adjoint_tol, grad_x)
        return self._finish(
            problem,
            batch,
            lower,
            sol,
            op,
            mu,
            mu_est,
            q,
            linear,
            losses,
            grad_x,
            upper_sums,
            params,
            adjoint_missed=missed,
        )

    def _adjoint_missed(
        self, linear: LinearSolution | None, tol: float | Tensor, like: Tensor
    ) -> bool:
        """Whether the adjoint solve missed a positive ``adjoint_tol`` on some instance; warns
        (``ConvergenceWarning``) if so and ``warn_unconverged``. Such a bound uses the measured
        residual δ but is not certified. A tolerance of 0 ("as accurate as the solver gets")
        is met wherever the solver stopped."""
        if linear is None or (isinstance(tol, (int, float)) and tol <= 0):
            return False
        tol_t = torch.as_tensor(tol, dtype=like.dtype, device=like.device).expand(like.shape[0])
        missed = ~linear.converged & (tol_t > 0)
        if not bool(missed.any()):
            return False
        if self.warn_unconverged:
            i = int(missed.nonzero()[0])
            warnings.warn(
                f"adjoint solver {self._adjoint_solver_name()} missed "
                f"adjoint_tol on {int(missed.sum())} of {missed.numel()} instances (instance "
                f"{i}: residual {float(linear.residual_norm[i]):.3e} > {float(tol_t[i]):.3e} "
                f"after {int(linear.iterations[i])} iterations); raise max_iter or loosen "
                "adjoint_tol: a bound uses the measured residual but is not certified",
                ConvergenceWarning,
                stacklevel=4,
            )
        return True

    def _adjoint_solver_name(self) -> str:
        return type(self).__name__

    def _adjoint(
        self,
        op: HessianOperator,
        x: Tensor,
        grad_x: Tensor,
        adjoint_tol: float | Tensor,
        adjoint0: Tensor | None,
        mu: Tensor,
    ) -> tuple[Tensor, LinearSolution | None]:
        """q ≈ H⁻¹∇ₓf (and the linear solver's report, if any)."""
        raise NotImplementedError


@dataclass(frozen=True)
class Implicit(AdjointEstimator):
    """AID: solve H q = ∇ₓf to ``adjoint_tol`` with ``linear_solver`` (CG by default)."""

    linear_solver: LinearSolver = field(default_factory=CG)

    def fixed_work(self, iterations: int, adjoint_iterations: int) -> Implicit:
        capped = _capped(self.linear_solver, adjoint_iterations, "linear_solver")
        return replace(super().fixed_work(iterations, adjoint_iterations), linear_solver=capped)

    def _adjoint_solver_name(self) -> str:
        return type(self.linear_solver).__name__

    def _adjoint(self, op, x, grad_x, adjoint_tol, adjoint0, mu):
        linear = self.linear_solver.solve(op.matvec, grad_x, adjoint_tol, x0=adjoint0)
        return linear.solution, linear


@dataclass(frozen=True)
class JacobianFree(AdjointEstimator):
    """JFB: q = scale · ∇ₓf (H⁻¹ replaced by scale · I); cheap and biased.

    ``scale=None`` uses 1/μ_i.  The bound uses the true residual of this q, so it remains
    valid (and shows the bias).  ``adjoint_tol`` does not apply (q is not solved for).
    """

    scale: float | None = 1.0

    def _adjoint(self, op, x, grad_x, adjoint_tol, adjoint0, mu):
        if self.scale is None:
            return grad_x / expand_as_batch(mu, grad_x), None
        return self.scale * grad_x, None


@dataclass(frozen=True)
class Exact(AdjointEstimator):
    """Dense per-instance Hessians (n HVPs per instance) and a direct solve.

    For small problems and as the reference in tests; x̃ is as accurate as ``lower_tol``.
    The eigenvalues of the dense Hessians are computed, so a stated μ larger than λ_min(H(x̃))
    is detected exactly (``linear.min_curvature`` holds λ_min per instance).
    """

    max_dim: int = 4096

    def _adjoint(self, op, x, grad_x, adjoint_tol, adjoint0, mu):
        hess = dense_hessian(op, x, self.max_dim)
        n, dim = hess.shape[0], hess.shape[1]
        lam = torch.linalg.eigvalsh(hess)[:, 0]
        q = torch.linalg.solve(hess, grad_x.reshape(n, -1, 1)).reshape(grad_x.shape)
        residual = batch_norm(op.full_matvec(q) - grad_x)
        report = LinearSolution(
            solution=q,
            residual_norm=residual,
            iterations=torch.zeros(n, dtype=torch.long, device=x.device),
            converged=torch.ones(n, dtype=torch.bool, device=x.device),
            matvecs=n * dim,
            min_curvature=lam,
            krylov_steps=torch.full((n,), dim, dtype=torch.long, device=x.device),
        )
        return q, report


def dense_hessian(op: HessianOperator, x: Tensor, max_dim: int = 4096) -> Tensor:
    """Per-instance dense Hessians (B, n, n) from n batched Hessian-vector products."""
    n_batch = x.shape[0]
    dim = x[0].numel()
    if dim > max_dim:
        raise BilevelError(
            f"dense Hessian of dimension {dim} exceeds max_dim={max_dim}; use Implicit(CG())"
        )
    index = torch.arange(n_batch, device=x.device)
    eye = torch.eye(dim, dtype=x.dtype, device=x.device)
    cols = [
        op.matvec(eye[k].expand(n_batch, dim).reshape(x.shape), index).reshape(n_batch, dim)
        for k in range(dim)
    ]
    hess = torch.stack(cols, dim=2)
    return 0.5 * (hess + hess.transpose(1, 2))


@dataclass(frozen=True)
class Unrolled(HypergradientEstimator):
    """ITD: differentiate through ``steps`` gradient steps x ← x − η∇ₓh(x) from x0.

    η = 1/L with L the problem's Lipschitz bound, else a power-iteration estimate at x0 times
    ``margin``.  With ``truncate=K'`` only the last K' steps are differentiated (memory O(K')).
    Memory grows with the number of differentiated steps.  Its accuracy is set by ``steps``:
    passing ``lower_tol``/``adjoint_tol`` is an error; ``eps`` reports ‖∇ₓh(x_K)‖/μ at the
    last iterate; no a-posteriori bound exists for ITD, so ``bound`` is None.
    :meth:`fixed_work` sets ``steps`` to the lower-level iterations.
    """

    steps: int = 50
    truncate: int | None = None
    margin: float = 1.0

    @property
    def uses_tolerances(self) -> bool:
        return False

    def fixed_work(self, iterations: int, adjoint_iterations: int) -> Unrolled:
        return replace(self, steps=iterations)

    def _estimate(self, problem, batch, lower, x0, lower_tol, adjoint_tol, adjoint0, state):
        if self.steps < 1:
            raise BilevelError(f"Unrolled needs steps >= 1, got {self.steps}")
        params = problem.params
        lip = problem.lipschitz_bound()
        if lip is None:
            lip = float(self.margin * estimate_lipschitz(lower, x0).max())
        eta = 1.0 / lip
        first_diff = 0 if self.truncate is None else max(0, self.steps - self.truncate)
        x = x0.detach()
        for _ in range(first_diff):  # steps that are not differentiated
            _, g = lower.value_and_grad(x)
            x = x - eta * g
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            for _ in range(first_diff, self.steps):
                energy = problem.energy(x, batch)
                (g,) = torch.autograd.grad(energy.sum(), x, create_graph=True)
                lower.cost.grad_evals += x.shape[0]
                x = x - eta * g
            losses = problem.loss(x, batch)
            reach = (
                torch.autograd.grad(losses.sum(), x, retain_graph=True, allow_unused=True)[0]
                if losses.requires_grad
                else None
            )
            if reach is None:
                raise BilevelError(
                    "upper_loss does not depend on x through autograd (was x detached, or the "
                    "loss computed outside torch?): the upper loss must be differentiable in x"
                )
            grads = torch.autograd.grad(losses.mean(), params, allow_unused=True)
        lower.cost.hvps += (self.steps - first_diff) * x.shape[0]
        grad = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        losses = losses.detach()
        loss = float(losses.mean())
        x_last = x.detach()
        if not bool(torch.isfinite(x_last).all()):
            raise NonFiniteError("unrolled iterates diverged: step 1/L too large")
        _, g_last = lower.value_and_grad(x_last)
        gnorm = batch_norm(g_last)
        mu_t = problem.mu_values(batch, x_last)
        eps = gnorm / mu_t if mu_t is not None else torch.full_like(gnorm, math.nan)
        mu = None if mu_t is None else float(mu_t.min())
        nan = torch.full_like(gnorm, math.nan)
        return Hypergradient(
            grad=grad,
            loss=loss,
            losses=losses.detach(),
            bound=None,
            bound_certified=False,
            x=x_last,
            adjoint=None,
            eps=eps,
            delta=nan,
            lower=None,
            linear=None,
            mu=mu,
            mu_estimated=mu is None,
            cost=lower.cost,
        )


def hypergradient(
    problem: BilevelProblem,
    batch: Batch,
    x0: Tensor,
    method: HypergradientEstimator | None = None,
    **kwargs,
) -> Hypergradient:
    """Convenience: ``method(problem, batch, x0, **kwargs)`` with ``Implicit(CG())`` default."""
    return (method or Implicit())(problem, batch, x0, **kwargs)


__all__ = [
    "AdjointEstimator",
    "BoundWarning",
    "EstimatorState",
    "Exact",
    "Hypergradient",
    "HypergradientEstimator",
    "Implicit",
    "JacobianFree",
    "Unrolled",
    "dense_hessian",
    "hypergradient",
]
