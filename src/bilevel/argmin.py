"""A differentiable argmin: the lower-level solution x̂(θ) as a node of the autograd graph.

    x̂(θ, b) = argmin_x h(x, θ, b),     h μ-strongly convex in x (one problem per instance)

:func:`argmin` solves the lower level with the estimator's lower solver and returns x̂ as a
tensor connected to θ (and to any tensor of ``batch`` that requires gradients). In the backward
pass, given v_i = ∂L/∂x̂_i from any downstream loss L, the implicit function theorem gives

    ∂L/∂θ = −Σ_i J_iᵀ q_i,     H_i q_i = v_i,     H_i = ∇²ₓₓh_i(x̂_i),  J_i = ∇²_θx h_i(x̂_i)

(and likewise for the batch tensors, with J_i the mixed derivative in them). The adjoint solve
and the mixed product are those of the library's estimators: ``Implicit(CG())`` by default,
any :class:`~bilevel.hypergrad.AdjointEstimator` (``Implicit`` with any linear solver,
``Exact``, ``JacobianFree``) may be given; its ``solve_lower`` is the forward pass. The
estimator is called with the upper loss f_i(x) = ⟨v_i, x⟩, whose hypergradient
−(1/B)Σ J_iᵀ q_i is B⁻¹ ∂L/∂θ.

Tolerances are absolute and per instance, as everywhere in the library: ``lower_tol`` bounds
‖∇ₓh_i(x̂_i)‖ (units of ∇ₓh), ``adjoint_tol`` bounds ‖H_i q_i − v_i‖ (units of ∂L/∂x). An adjoint
solve that misses its tolerance raises :class:`AdjointSolveError` (or warns, with
``on_adjoint_failure="warn"``): a failed solve never passes silently as a gradient.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from bilevel.autodiff import Cost, LowerLevel, batch_dot
from bilevel.hypergrad import AdjointEstimator, Exact, Hypergradient, Implicit
from bilevel.linear import CG
from bilevel.lower import LowerSolution
from bilevel.problem import Batch, BilevelError, BilevelProblem, Theta, batch_tensors

__all__ = ["AdjointSolveError", "ArgminInfo", "ArgminLayer", "argmin"]

Energy = Callable[[Tensor, Any, Batch], Tensor]


class AdjointSolveError(BilevelError):
    """The adjoint solve H q = ∂L/∂x of a backward pass missed its tolerance."""


class AdjointSolveWarning(UserWarning):
    """The adjoint solve missed its tolerance and ``on_adjoint_failure="warn"`` was chosen."""


@dataclass
class ArgminInfo:
    """The certificate of one :func:`argmin` call, completed by each backward pass.

    Attributes:
        lower: the forward lower-level solve (x̂, energies, iterations, convergence flags).
        grad_norm: ‖∇ₓh_i(x̂_i)‖ per instance (B,), evaluated at the returned x̂.
        distance_bound: ‖x̂_i − x*_i‖ ≤ grad_norm_i / μ (B,); NaN when μ is not stated.
        cost: oracle calls (gradients, Hessian-vector products, mixed VJPs) and wall time of the
            forward solve plus every backward pass so far.
        warnings: the messages of the warnings raised by the solves (also re-emitted).
        backward: the last backward pass's estimate (adjoint q̃, residuals, bound ω), or None;
            its ``grad`` and ``bound`` are those of B⁻¹ ∂L/∂θ (the estimator's batch mean).
        adjoint_residual: ‖H_i q̃_i − v_i‖ of the last backward pass (B,), or None.
        adjoint_converged: whether each instance met ``adjoint_tol`` in the last backward.
    """

    lower: LowerSolution
    cost: Cost
    warnings: list[str] = field(default_factory=list)
    backward: Hypergradient | None = None
    adjoint_residual: Tensor | None = None
    adjoint_converged: Tensor | None = None

    @property
    def grad_norm(self) -> Tensor:
        return self.lower.grad_norm

    @property
    def distance_bound(self) -> Tensor:
        return self.lower.distance_bound

    @property
    def converged(self) -> bool:
        """Every instance met ``lower_tol`` (and ``adjoint_tol`` in the last backward pass)."""
        ok = self.lower.all_converged
        if self.adjoint_converged is not None:
            ok = ok and bool(self.adjoint_converged.all())
        return ok


def _theta_tensors(theta: Theta) -> list[Tensor]:
    """The tensors of θ that require gradients (possibly none: then x̂ is a constant)."""
    if isinstance(theta, nn.Module):
        tensors: list[Any] = list(theta.parameters())
    elif isinstance(theta, Tensor):
        tensors = [theta]
    elif isinstance(theta, Mapping):
        tensors = list(theta.values())
    elif isinstance(theta, Sequence):
        tensors = list(theta)
    else:
        raise BilevelError(
            "theta must be a tensor, a sequence or dict of tensors, or an nn.Module; "
            f"got {type(theta).__name__}"
        )
    for t in tensors:
        if not isinstance(t, Tensor):
            raise BilevelError(f"theta contains a {type(t).__name__}, expected tensors")
    return [t for t in tensors if t.requires_grad]


def _batch_leaves(batch: Batch) -> list[Tensor]:
    """The tensors of ``batch`` that require gradients, in a fixed order."""
    return [t for t in batch_tensors(batch) if t.requires_grad]


def _replace_leaves(batch: Batch, new: dict[int, Tensor]) -> Batch:
    """``batch`` with each tensor whose ``id`` is a key of ``new`` replaced by its value."""
    if isinstance(batch, Tensor):
        return new.get(id(batch), batch)
    if isinstance(batch, Mapping):
        return {k: _replace_leaves(v, new) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_replace_leaves(v, new) for v in batch)
    return batch


@dataclass(frozen=True)
class _Spec:
    """Everything the autograd function needs besides its tensor inputs."""

    energy: Energy
    theta: Theta
    batch: Batch
    lower_tol: float | Tensor
    adjoint_tol: float | Tensor
    estimator: AdjointEstimator
    mu: float | None
    lipschitz: float | Callable[[], float] | None
    on_adjoint_failure: str
    info: ArgminInfo | None = None

    def problem(self, wrt: list[Tensor], like: Tensor) -> BilevelProblem:
        """h(x, θ, b) and f(x) = ⟨v, x⟩ over the internal batch (b, v); θ-slot = ``wrt`` (a
        placeholder shaped like a scalar of ``like`` when nothing requires gradients)."""
        energy, theta = self.energy, self.theta

        def lower(x: Tensor, _wrt: Any, b: tuple) -> Tensor:
            return energy(x, theta, b[0])

        def upper(x: Tensor, _wrt: Any, b: tuple) -> Tensor:
            return batch_dot(b[1], x)

        dummy = [like.new_zeros(()).requires_grad_(True)]
        return BilevelProblem(lower, upper, wrt or dummy, mu=self.mu, lipschitz=self.lipschitz)


def _replay(caught: list[warnings.WarningMessage], into: list[str]) -> None:
    for w in caught:
        into.append(str(w.message))
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


class _Argmin(torch.autograd.Function):
    """x̂ = argmin_x h(x, θ, b); inputs after ``spec`` and ``x0``: θ's tensors, then b's."""

    @staticmethod
    def forward(ctx: Any, spec: _Spec, x0: Tensor, *wrt: Tensor) -> Tensor:
        problem = spec.problem(list(wrt), x0)
        batch = (spec.batch, None)
        problem.check_inputs(x0, batch)
        cost = Cost()
        lower = LowerLevel(problem, batch, cost)
        est = spec.estimator
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sol = est.solve_lower(lower, x0.detach(), spec.lower_tol, spec.mu)
        assert spec.info is not None
        spec.info.lower = sol
        spec.info.cost = spec.info.cost + cost
        _replay(caught, spec.info.warnings)
        ctx.spec = spec
        ctx.x_hat = sol.x
        return sol.x.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_x: Tensor) -> tuple[Tensor | None, ...]:
        spec: _Spec = ctx.spec
        info = spec.info
        assert info is not None
        params = _theta_tensors(spec.theta)
        leaves = _batch_leaves(spec.batch)
        copies = {id(t): t.detach().requires_grad_(True) for t in leaves}
        batch = _replace_leaves(spec.batch, copies)
        wrt = params + list(copies.values())
        problem = spec.problem(wrt, ctx.x_hat)
        x_hat = ctx.x_hat
        # x̂ is certified at ‖∇ₓh_i‖ = grad_norm_i: the estimator's lower solve stops at once.
        tol = torch.maximum(
            torch.as_tensor(spec.lower_tol, dtype=x_hat.dtype, device=x_hat.device),
            info.lower.grad_norm,
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hg = spec.estimator(
                problem,
                (batch, grad_x.detach()),
                x_hat,
                lower_tol=tol,
                adjoint_tol=spec.adjoint_tol,
            )
        _replay(caught, info.warnings)
        info.backward = hg
        info.cost = info.cost + hg.cost
        info.adjoint_residual = hg.delta
        converged = _adjoint_converged(spec, hg)
        info.adjoint_converged = converged
        if converged is not None and not bool(converged.all()):
            bad = (~converged).nonzero().flatten().tolist()
            message = (
                f"argmin backward: the adjoint solve H q = dL/dx missed adjoint_tol="
                f"{_describe(spec.adjoint_tol)} on instance(s) {bad[:10]}"
                f"{' ...' if len(bad) > 10 else ''} (largest residual "
                f"{float(hg.delta.max()):.3e}); raise the linear solver's max_iter, loosen "
                "adjoint_tol, or check that h is strongly convex"
            )
            if spec.on_adjoint_failure == "raise":
                raise AdjointSolveError(message)
            warnings.warn(message, AdjointSolveWarning, stacklevel=2)
            info.warnings.append(message)
        n = x_hat.shape[0]
        grads: list[Tensor | None] = [n * g for g in hg.grad[: len(wrt)]]
        return (None, None, *grads)


def _adjoint_converged(spec: _Spec, hg: Hypergradient) -> Tensor | None:
    """Per-instance verdict on the adjoint solve (None for estimators without one: JFB, ITD)."""
    if hg.linear is not None:
        return hg.linear.converged & torch.isfinite(hg.delta)
    if isinstance(spec.estimator, Exact):
        tol = torch.as_tensor(spec.adjoint_tol, dtype=hg.delta.dtype, device=hg.delta.device)
        return hg.delta <= tol
    return None


def _describe(tol: float | Tensor) -> str:
    if isinstance(tol, Tensor):
        return f"{float(tol.min()):.3e}" if tol.numel() > 1 else f"{float(tol):.3e}"
    return f"{tol:.3e}"


def argmin(
    lower_energy: Energy,
    theta: Theta,
    x0: Tensor,
    batch: Batch = None,
    *,
    lower_tol: float | Tensor = 1e-6,
    adjoint_tol: float | Tensor | None = None,
    estimator: AdjointEstimator | None = None,
    mu: float | None = None,
    lipschitz: float | Callable[[], float] | None = None,
    on_adjoint_failure: str = "raise",
    return_info: bool = False,
) -> Tensor | tuple[Tensor, ArgminInfo]:
    """x̂ = argmin_x ``lower_energy(x, theta, batch)``, differentiable in θ and ``batch``.

    Args:
        lower_energy: h(x, θ, batch) -> (B,), μ-strongly convex and smooth in x; instance i
            may depend only on x[i] and batch[i] (see :class:`~bilevel.BilevelProblem`).
        theta: a tensor, a sequence or dict of tensors, or an ``nn.Module``: its tensors that
            require gradients receive ∂L/∂θ in the backward pass.
        x0: starting point (B, ...) of the lower solve; x̂ does not depend on it.
        batch: per-instance data (tensor, tuple, list or dict of tensors with leading
            dimension B); its tensors that require gradients receive ∂L/∂batch.
        lower_tol: stop instance i when ‖∇ₓh_i(x̂_i)‖ ≤ lower_tol (absolute, per instance).
        adjoint_tol: tolerance on ‖H_i q_i − ∂L/∂x̂_i‖ (defaults to ``lower_tol``).
        estimator: the hypergradient estimator whose lower solver and adjoint solve are used
            (default ``Implicit(CG())``; ``Implicit(CG(), compute_bound=True)`` also computes
            the a-posteriori bound ω of each backward pass).
        mu: the strong-convexity modulus of h in x, if known (makes ``distance_bound`` a
            certificate and skips its estimation in the backward pass).
        lipschitz: a bound on the Lipschitz constant of ∇ₓh (step size of the lower solver).
        on_adjoint_failure: "raise" (:class:`AdjointSolveError`) or "warn" when the adjoint
            solve misses ``adjoint_tol``.
        return_info: also return the :class:`ArgminInfo` certificate, completed in place by
            each backward pass.

    Returns:
        x̂ (B, ...), or ``(x̂, info)`` with ``return_info=True``.
    """
    if not callable(lower_energy):
        raise BilevelError("lower_energy must be a callable (x, theta, batch) -> (B,) energies")
    if on_adjoint_failure not in ("raise", "warn"):
        raise BilevelError(
            f"on_adjoint_failure must be 'raise' or 'warn', got {on_adjoint_failure!r}"
        )
    estimator = Implicit(CG()) if estimator is None else estimator
    if not isinstance(estimator, AdjointEstimator):
        raise BilevelError(
            f"estimator must be an AdjointEstimator such as Implicit(CG()), got "
            f"{type(estimator).__name__}"
        )
    if not isinstance(x0, Tensor) or x0.dim() < 1:
        raise BilevelError("x0 must be a tensor of shape (B, ...) with B instances")
    if estimator.constants.upper_grad_lipschitz is None:
        # f(x) = ⟨v, x⟩ is linear: L_f = 0 exactly, nothing to estimate for the bound ω.
        estimator = estimator.with_(
            constants=replace(estimator.constants, upper_grad_lipschitz=0.0)
        )
    if x0.requires_grad:
        x0 = x0.detach()
    params = _theta_tensors(theta)
    leaves = _batch_leaves(batch)
    info = ArgminInfo(lower=None, cost=Cost())  # type: ignore[arg-type]  # set by forward
    spec = _Spec(
        energy=lower_energy,
        theta=theta,
        batch=batch,
        lower_tol=lower_tol,
        adjoint_tol=lower_tol if adjoint_tol is None else adjoint_tol,
        estimator=estimator,
        mu=mu,
        lipschitz=lipschitz,
        on_adjoint_failure=on_adjoint_failure,
        info=info,
    )
    x = _Argmin.apply(spec, x0, *params, *leaves)
    return (x, info) if return_info else x


class ArgminLayer(nn.Module):
    """A variational reconstruction as a network layer: ``layer(batch) = argmin_x E(x, batch)``.

    ``energy`` is an ``nn.Module`` with ``energy(x, batch) -> (B,)``, μ-strongly convex in x;
    its parameters are θ and receive implicit-function-theorem gradients. The lower solve
    starts at ``x0`` when given, else at ``init(batch)``, else at ``batch`` itself (a tensor
    shaped like x, e.g. the noisy image of a denoiser). The certificate of the last call is
    ``layer.last_info``. Keyword options are those of :func:`argmin`.
    """

    def __init__(
        self,
        energy: nn.Module,
        *,
        init: Callable[[Batch], Tensor] | None = None,
        lower_tol: float | Tensor = 1e-6,
        adjoint_tol: float | Tensor | None = None,
        estimator: AdjointEstimator | None = None,
        mu: float | None = None,
        lipschitz: float | Callable[[], float] | None = None,
        on_adjoint_failure: str = "raise",
    ) -> None:
        super().__init__()
        if not isinstance(energy, nn.Module):
            raise BilevelError(f"energy must be an nn.Module, got {type(energy).__name__}")
        self.energy = energy
        self.init = init
        self.options = {
            "lower_tol": lower_tol,
            "adjoint_tol": adjoint_tol,
            "estimator": estimator,
            "mu": mu,
            "lipschitz": lipschitz,
            "on_adjoint_failure": on_adjoint_failure,
        }
        self.last_info: ArgminInfo | None = None

    def forward(self, batch: Batch, x0: Tensor | None = None) -> Tensor:
        if x0 is None:
            if self.init is not None:
                x0 = self.init(batch)
            elif isinstance(batch, Tensor):
                x0 = batch
            else:
                raise BilevelError("ArgminLayer needs x0 or init= when the batch is not a tensor")
        energy = self.energy
        x, info = argmin(
            lambda x, _theta, b: energy(x, b),
            energy,
            x0.detach(),
            batch,
            return_info=True,
            **self.options,
        )
        self.last_info = info
        return x
