"""Hypergradient estimators behind one interface.

Each estimator is a small immutable configuration object.  Called on a problem and a batch,
it returns a :class:`Hypergradient`: the estimate z of ∇F(θ) for the mean upper loss over the
batch (shaped like θ), the a-posteriori error bound ω with a certified/estimated flag, the
lower-level and adjoint solutions (for warm starts), and the cost in oracle calls.

    z = ∇_θ f̄ − (1/B) Σ_i J_iᵀ q_i,    H_i q_i = ∇ₓf_i(x̃_i)                (PAPERS.md §2)

Estimators: :class:`Implicit` (AID with any linear solver), :class:`Unrolled` (ITD),
:class:`JacobianFree` (JFB: H⁻¹ replaced by a multiple of the identity), :class:`Exact`
(dense Hessian and direct solve; small problems and tests).

Tolerances are absolute and per instance: ``lower_tol`` bounds ‖∇ₓh_i(x̃_i)‖ and
``adjoint_tol`` bounds ‖H_i q̃_i − ∇ₓf_i(x̃_i)‖ (units of ∇ₓf); neither changes meaning with
the batch size, because each adjoint system uses ∇ₓf_i, not ∇ₓ of the batch mean.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor

from bilevel.autodiff import (
    Cost,
    HessianOperator,
    LowerLevel,
    batch_norm,
    upper_gradients,
)
from bilevel.bounds import BoundConstants, compute_error_bound, smallest_eigenvalue
from bilevel.linear import CG, LinearSolution, LinearSolver
from bilevel.lower import LowerSolution, LowerSolver, Nesterov, estimate_lipschitz, solve_lower
from bilevel.problem import Batch, BilevelError, BilevelProblem, NonFiniteError, check_finite


class BoundWarning(UserWarning):
    """The stated μ is contradicted by curvature observed during the solve."""


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
        delta: per-instance adjoint residual norms ‖H_i q̃_i − ∇ₓf_i‖ (B,).
        lower: the lower-level solve's report; linear: the adjoint solve's report.
        mu: the strong-convexity modulus used; mu_estimated: whether it was estimated.
        cost: oracle calls and wall time spent for this estimate.
    """

    grad: list[Tensor]
    loss: float
    losses: Tensor
    bound: float | None
    bound_certified: bool
    x: Tensor
    adjoint: Tensor | None
    eps: Tensor
    delta: Tensor
    lower: LowerSolution | None
    linear: LinearSolution | None
    mu: float | None
    mu_estimated: bool
    cost: Cost
    constants: dict[str, float] = field(default_factory=dict)

    @property
    def norm(self) -> float:
        """‖z‖₂ over all parameters."""
        return math.sqrt(sum(float((g * g).sum()) for g in self.grad))

    def accumulate_into(self, params: list[Tensor]) -> None:
        """Add z to ``p.grad`` so that any ``torch.optim`` optimiser can take the step."""
        for p, g in zip(params, self.grad):
            if p.grad is None:
                p.grad = g.detach().clone()
            else:
                p.grad.add_(g)


@dataclass(frozen=True, kw_only=True)
class Estimator:
    """Shared machinery: validation, lower solve, upper gradients, bound, bookkeeping."""

    lower_solver: LowerSolver = field(default_factory=Nesterov)
    constants: BoundConstants = field(default_factory=BoundConstants)
    compute_bound: bool = True
    warn_unconverged: bool = True

    def __call__(
        self,
        problem: BilevelProblem,
        batch: Batch,
        x0: Tensor,
        *,
        lower_tol: float | Tensor = 1e-4,
        adjoint_tol: float | Tensor | None = None,
        adjoint0: Tensor | None = None,
        accumulate: bool = False,
    ) -> Hypergradient:
        """Estimate ∇F(θ) on ``batch`` starting the lower solve from ``x0`` (B, ...).

        Args:
            lower_tol: ε-tolerance, stop instance i when ‖∇ₓh_i(x̃_i)‖ ≤ lower_tol.
            adjoint_tol: δ-tolerance on ‖H_i q_i − ∇ₓf_i‖ (defaults to ``lower_tol``).
            adjoint0: warm start for the adjoint solve.
            accumulate: also add the estimate into ``p.grad`` of every parameter.
        """
        problem.check_inputs(x0, batch)
        if adjoint0 is not None and adjoint0.shape != x0.shape:
            raise BilevelError(
                f"adjoint0 has shape {tuple(adjoint0.shape)}, expected {tuple(x0.shape)} like x0"
            )
        adjoint_tol = lower_tol if adjoint_tol is None else adjoint_tol
        cost = Cost()
        start = time.perf_counter()
        lower = LowerLevel(problem, batch, cost)
        result = self._estimate(problem, batch, lower, x0, lower_tol, adjoint_tol, adjoint0)
        cost.wall_time = time.perf_counter() - start
        for g in result.grad:
            check_finite("the hypergradient", g)
        if accumulate:
            result.accumulate_into(problem.params)
        return result

    # -- pieces shared by the estimators -------------------------------------------------

    def _solve(self, problem: BilevelProblem, lower: LowerLevel, x0: Tensor, tol) -> tuple:
        sol = solve_lower(lower, x0, tol, self.lower_solver, problem.mu, warn=self.warn_unconverged)
        op = lower.hessian(sol.x)
        if problem.mu is not None:
            return sol, op, problem.mu, False
        mu = float(smallest_eigenvalue(op, sol.x).min())
        return sol, op, mu, True

    def _finish(
        self,
        problem: BilevelProblem,
        batch: Batch,
        lower: LowerLevel,
        sol: LowerSolution,
        op: HessianOperator,
        mu: float,
        mu_estimated: bool,
        q: Tensor,
        linear: LinearSolution | None,
        losses: Tensor,
        grad_x: Tensor,
        grad_theta: list[Tensor],
    ) -> Hypergradient:
        """z = ∇_θ f̄ − (1/B) Σ J_iᵀ q_i; true residuals δ_i; the bound ω."""
        params = problem.params
        n = q.shape[0]
        jtq = op.jacobian_vjp(q, params)
        grad = [gt - j / n for gt, j in zip(grad_theta, jtq)]
        loss = float(losses.mean())
        if problem.upper_regulariser is not None:
            with torch.enable_grad():
                reg = problem.upper_regulariser(problem.theta)
                reg_grads = torch.autograd.grad(reg, params, allow_unused=True)
            grad = [g if r is None else g + r for g, r in zip(grad, reg_grads)]
            loss += float(reg.detach())
        delta = batch_norm(op.full_matvec(q) - grad_x)
        eps = sol.grad_norm / mu
        certified = False
        bound = None
        constants: dict[str, float] = {}
        if linear is not None and bool(torch.isfinite(linear.min_curvature).any()):
            seen = float(torch.nan_to_num(linear.min_curvature, nan=math.inf).min())
            if not mu_estimated and seen < mu * (1.0 - 1e-4):
                warnings.warn(
                    f"curvature {seen:.4e} below the stated mu = {mu:.4e} was observed: the "
                    "stated strong-convexity modulus is too large, bounds are not certified",
                    BoundWarning,
                    stacklevel=3,
                )
                mu_estimated = True
        if self.compute_bound:
            eb = compute_error_bound(
                problem, batch, op, eps, delta, grad_x, mu, not mu_estimated, self.constants
            )
            bound, certified, constants = eb.value, eb.certified, eb.constants
        return Hypergradient(
            grad=grad,
            loss=loss,
            losses=losses,
            bound=bound,
            bound_certified=certified,
            x=sol.x,
            adjoint=q.detach(),
            eps=eps,
            delta=delta,
            lower=sol,
            linear=linear,
            mu=mu,
            mu_estimated=mu_estimated,
            cost=lower.cost,
            constants=constants,
        )

    def _estimate(self, problem, batch, lower, x0, lower_tol, adjoint_tol, adjoint0):
        """Lower solve, upper gradients, the method's adjoint q, then z and its bound."""
        sol, op, mu, mu_est = self._solve(problem, lower, x0, lower_tol)
        losses, grad_x, grad_theta = upper_gradients(problem, sol.x, batch)
        q, linear = self._adjoint(op, sol.x, grad_x, adjoint_tol, adjoint0, mu)
        return self._finish(
            problem, batch, lower, sol, op, mu, mu_est, q, linear, losses, grad_x, grad_theta
        )

    def _adjoint(
        self,
        op: HessianOperator,
        x: Tensor,
        grad_x: Tensor,
        adjoint_tol: float | Tensor,
        adjoint0: Tensor | None,
        mu: float,
    ) -> tuple[Tensor, LinearSolution | None]:
        """q ≈ H⁻¹∇ₓf (and the linear solver's report, if any)."""
        raise NotImplementedError


@dataclass(frozen=True)
class Implicit(Estimator):
    """AID: solve H q = ∇ₓf to ``adjoint_tol`` with ``linear_solver`` (CG by default)."""

    linear_solver: LinearSolver = field(default_factory=CG)

    def _adjoint(self, op, x, grad_x, adjoint_tol, adjoint0, mu):
        linear = self.linear_solver.solve(op.matvec, grad_x, adjoint_tol, x0=adjoint0)
        return linear.solution, linear


@dataclass(frozen=True)
class JacobianFree(Estimator):
    """JFB: q = scale · ∇ₓf (H⁻¹ replaced by scale · I); cheap and biased.

    ``scale=None`` uses 1/μ.  The bound uses the true residual of this q, so it remains
    valid (and shows the bias).  ``adjoint_tol`` is ignored.
    """

    scale: float | None = 1.0

    def _adjoint(self, op, x, grad_x, adjoint_tol, adjoint0, mu):
        return (1.0 / mu if self.scale is None else self.scale) * grad_x, None


@dataclass(frozen=True)
class Exact(Estimator):
    """Dense per-instance Hessians (n HVPs per instance) and a direct solve.

    For small problems and as the reference in tests; x̃ is as accurate as ``lower_tol``.
    """

    max_dim: int = 4096

    def _adjoint(self, op, x, grad_x, adjoint_tol, adjoint0, mu):
        hess = dense_hessian(op, x, self.max_dim)
        q = torch.linalg.solve(hess, grad_x.reshape(grad_x.shape[0], -1, 1))
        return q.reshape(grad_x.shape), None


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
class Unrolled(Estimator):
    """ITD: differentiate through ``steps`` gradient steps x ← x − η∇ₓh(x) from x0.

    η = 1/L with L the problem's Lipschitz bound, else a power-iteration estimate at x0 times
    ``margin``.  With ``truncate=K'`` only the last K' steps are differentiated (memory O(K')).
    Memory grows with the number of differentiated steps.  ``lower_tol``/``adjoint_tol`` are
    ignored; ``eps`` reports ‖∇ₓh(x_K)‖/μ at the last iterate; no a-posteriori bound exists
    for ITD, so ``bound`` is None.
    """

    steps: int = 50
    truncate: int | None = None
    margin: float = 1.0

    def _estimate(self, problem, batch, lower, x0, lower_tol, adjoint_tol, adjoint0):
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
            grads = torch.autograd.grad(losses.mean(), params, allow_unused=True)
        lower.cost.hvps += (self.steps - first_diff) * x.shape[0]
        grad = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        losses = losses.detach()
        loss = float(losses.mean())
        if problem.upper_regulariser is not None:
            with torch.enable_grad():
                reg = problem.upper_regulariser(problem.theta)
                reg_grads = torch.autograd.grad(reg, params, allow_unused=True)
            grad = [g if r is None else g + r for g, r in zip(grad, reg_grads)]
            loss += float(reg.detach())
        x_last = x.detach()
        if not bool(torch.isfinite(x_last).all()):
            raise NonFiniteError("unrolled iterates diverged: step 1/L too large")
        _, g_last = lower.value_and_grad(x_last)
        gnorm = batch_norm(g_last)
        mu = problem.mu
        eps = gnorm / mu if mu is not None else torch.full_like(gnorm, math.nan)
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
    method: Estimator | None = None,
    **kwargs,
) -> Hypergradient:
    """Convenience: ``method(problem, batch, x0, **kwargs)`` with ``Implicit(CG())`` default."""
    return (method or Implicit())(problem, batch, x0, **kwargs)


__all__ = [
    "BoundWarning",
    "Estimator",
    "Exact",
    "Hypergradient",
    "Implicit",
    "JacobianFree",
    "Unrolled",
    "dense_hessian",
    "hypergradient",
]
