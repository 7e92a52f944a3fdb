"""A-posteriori error bounds for inexact hypergradients and the constants they need.

For one instance, with x̃ certified to ‖x̃ − x̂‖ ≤ ε and the adjoint residual
‖H(x̃) q̃ − ∇ₓf(x̃)‖ ≤ δ, the error of z = ∇_θf − J(x̃)ᵀq̃ satisfies ([MAID] Thm 2.1)

    ‖z − ∇F‖ ≤ ‖J‖·a + L_J·ε·(‖∇ₓf(x̃)‖ + L_f ε)/μ,
    a = δ/μ + (L_{H⁻¹}‖∇ₓf(x̃)‖ + L_f/μ)·ε,          L_{H⁻¹} = L_H/μ²,

which expands to ω = c·ε + (‖J‖/μ)·δ + (L_J L_f/μ)·ε² with c as in PAPERS.md §2.  For the
mean over B instances sharing θ, Σ_i J_iᵀ a_i is bounded by ‖J_stack‖·‖a‖₂ (J_stack stacks
the J_i) when ‖J_stack‖ is computed at x̃, or by K_J·Σ_i‖a_i‖ when the user states a bound
K_J ≥ ‖J_i‖; the batch bound is the mean of the per-instance terms.

A bound is *certified* when μ is stated, L_f, L_J and L_H are stated, and ‖J‖ is stated or
computed exactly; otherwise the missing constants are estimated (power iteration, finite
perturbations, times a safety factor) and the bound is flagged *estimated*.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from bilevel.autodiff import HessianOperator, batch_norm, expand_as_batch
from bilevel.linear import largest_eigenvalue
from bilevel.problem import Batch, BilevelProblem, NotStronglyConvexError


@dataclass(frozen=True)
class BoundConstants:
    """Constants of the error bound; ``None`` means "estimate it" (bound then estimated).

    Attributes:
        upper_grad_lipschitz: L_f, Lipschitz constant of ∇ₓf (1 for f = ½‖x − x*‖²).
        jacobian_norm: K_J ≥ ‖J_i(x)‖ = ‖∇²_θx h_i‖ for every instance near the solution.
        jacobian_lipschitz: L_J, Lipschitz constant of x ↦ J(x) (0 if ∇ₓh is affine in x
            for fixed θ... and the mixed derivative does not depend on x).
        hessian_lipschitz: L_H, Lipschitz constant of x ↦ ∇²ₓₓh (0 for quadratic energies).
        power_iterations: iterations of the power methods used for estimates.
        exact_jacobian_max_params: compute ‖J_stack‖ exactly (dense, one JVP per parameter)
            when θ has at most this many entries.
        safety: factor applied to every estimated constant.
    """

    upper_grad_lipschitz: float | None = None
    jacobian_norm: float | None = None
    jacobian_lipschitz: float | None = None
    hessian_lipschitz: float | None = None
    power_iterations: int = 20
    exact_jacobian_max_params: int = 32
    safety: float = 1.1


@dataclass(frozen=True)
class ErrorBound:
    """ω for the mean hypergradient, whether it is certified, and the constants used."""

    value: float
    certified: bool
    constants: dict[str, float]


def compute_error_bound(
    problem: BilevelProblem,
    batch: Batch,
    op: HessianOperator,
    eps: Tensor,
    delta: Tensor,
    grad_f: Tensor,
    mu: float,
    mu_certified: bool,
    constants: BoundConstants,
) -> ErrorBound:
    """ω(ε, δ) for the mean over instances of the inexact hypergradients at ``op``'s point.

    Args:
        eps: per-instance certified distances ‖x̃_i − x̂_i‖ ≤ ε_i, shape (B,).
        delta: per-instance adjoint residual norms ‖H_i q̃_i − ∇ₓf_i‖, shape (B,).
        grad_f: per-instance ∇ₓf_i(x̃_i), shape (B, ...).
    """
    c = constants
    certified = mu_certified
    params = problem.params
    x = op.x_full
    gf_norm = batch_norm(grad_f)

    if c.upper_grad_lipschitz is not None:
        l_f = c.upper_grad_lipschitz
    else:
        l_f = c.safety * _upper_hessian_norm(problem, x, batch, c.power_iterations)
        certified = False
    if c.hessian_lipschitz is not None and c.jacobian_lipschitz is not None:
        l_h, l_j = c.hessian_lipschitz, c.jacobian_lipschitz
    else:
        est_h, est_j = _third_order_estimates(op, params, eps)
        l_h = c.hessian_lipschitz if c.hessian_lipschitz is not None else c.safety * est_h
        l_j = c.jacobian_lipschitz if c.jacobian_lipschitz is not None else c.safety * est_j
        certified = False
    l_hinv = l_h / mu**2

    a = delta / mu + (l_hinv * gf_norm + l_f / mu) * eps
    curvature_term = l_j * eps * (gf_norm + l_f * eps) / mu
    if c.jacobian_norm is not None:
        j_norm = c.jacobian_norm
        linear_term = j_norm * a.sum()
    else:
        j_norm, exact = jacobian_norm_stacked(op, params, c)
        if not exact:
            j_norm *= c.safety
            certified = False
        linear_term = j_norm * torch.linalg.vector_norm(a)
    value = float((linear_term + curvature_term.sum()) / eps.numel())
    used = {"L_f": l_f, "L_J": l_j, "L_H": l_h, "jacobian_norm": float(j_norm), "mu": mu}
    return ErrorBound(value=value, certified=certified, constants=used)


def jacobian_norm_stacked(
    op: HessianOperator, params: list[Tensor], constants: BoundConstants
) -> tuple[float, bool]:
    """‖J_stack‖₂ at the operator's point: exact (dense) for small θ, else power iteration.

    Returns (norm, exact).  Power iteration converges from below: the estimate is a lower
    bound on the true norm, hence the safety factor applied by the caller.
    """
    n_params = sum(p.numel() for p in params)
    if n_params <= constants.exact_jacobian_max_params:
        columns = []
        for k in range(n_params):
            u = torch.zeros(n_params, dtype=params[0].dtype, device=params[0].device)
            u[k] = 1.0
            columns.append(op.jacobian_jvp(_unflatten(u, params), params).reshape(-1))
        dense = torch.stack(columns, dim=1)
        return float(torch.linalg.matrix_norm(dense, ord=2)), True
    gen = torch.Generator(device=params[0].device).manual_seed(0)
    u = [torch.randn(p.shape, generator=gen, dtype=p.dtype, device=p.device) for p in params]
    sigma_sq = 0.0
    for _ in range(constants.power_iterations):
        norm_u = math.sqrt(sum(float((ui * ui).sum()) for ui in u))
        if norm_u == 0.0:
            return 0.0, False
        u = [ui / norm_u for ui in u]
        ju = op.jacobian_jvp(u, params)
        v = op.jacobian_vjp(ju, params)
        sigma_sq = float((ju * ju).sum())
        u = v
    return math.sqrt(sigma_sq), False


def _unflatten(flat: Tensor, params: list[Tensor]) -> list[Tensor]:
    out, start = [], 0
    for p in params:
        out.append(flat[start : start + p.numel()].reshape(p.shape))
        start += p.numel()
    return out


def _upper_hessian_norm(problem: BilevelProblem, x: Tensor, batch: Batch, iters: int) -> float:
    """max_i λ_max(∇²ₓₓf_i(x̃_i)): a local estimate of L_f."""
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(problem.loss(xr, batch).sum(), xr, create_graph=True)

    def matvec(v: Tensor, index: Tensor) -> Tensor:
        full = torch.zeros_like(xr)
        full[index] = v
        with torch.enable_grad():
            (hv,) = torch.autograd.grad(g, xr, full, retain_graph=True, allow_unused=True)
        return torch.zeros_like(v) if hv is None else hv[index]

    values, _ = largest_eigenvalue(matvec, x, iterations=iters)
    return float(values.abs().max())


def _third_order_estimates(
    op: HessianOperator, params: list[Tensor], eps: Tensor
) -> tuple[float, float]:
    """Finite-perturbation estimates of L_H and L_J over the certified ball around x̃.

    Compares H v and Jᵀw at x̃ and at x̃ + Δ with ‖Δ_i‖ = r_i ≥ ε_i.
    """
    x = op.x_full
    gen = torch.Generator(device=x.device).manual_seed(1)
    floor = math.sqrt(torch.finfo(x.dtype).eps) * (1.0 + batch_norm(x))
    radius = torch.maximum(torch.nan_to_num(eps, nan=0.0), floor)
    delta = torch.randn(x.shape, generator=gen, dtype=x.dtype, device=x.device)
    delta = delta * expand_as_batch(radius / batch_norm(delta), delta)
    v = torch.randn(x.shape, generator=gen, dtype=x.dtype, device=x.device)
    v = v / expand_as_batch(batch_norm(v), v)
    shifted = HessianOperator(op.lower, x + delta)
    dh = batch_norm(shifted.full_matvec(v) - op.full_matvec(v)) / radius
    dj = [a - b for a, b in zip(shifted.jacobian_vjp(v, params), op.jacobian_vjp(v, params))]
    dj_norm = math.sqrt(sum(float((t * t).sum()) for t in dj))
    return float(dh.max()), dj_norm / float(radius.max()) / math.sqrt(x.shape[0])


def smallest_eigenvalue(op: HessianOperator, like: Tensor, iterations: int = 50) -> Tensor:
    """Per-instance λ_min(∇²ₓₓh) at the operator's point, by power iteration on L·I − H.

    Raises NotStronglyConvexError if some instance shows non-positive curvature.
    """
    top, _ = largest_eigenvalue(op.matvec, like, iterations=iterations)
    shift = top.abs() * 1.01

    def shifted(v: Tensor, index: Tensor) -> Tensor:
        return expand_as_batch(shift[index], v) * v - op.matvec(v, index)

    gap, _ = largest_eigenvalue(shifted, like, iterations=iterations)
    low = shift - gap
    if bool((low <= 0).any()):
        bad = int((low <= 0).nonzero()[0])
        raise NotStronglyConvexError(
            f"the lower-level Hessian of instance {bad} has an eigenvalue ≈ {float(low[bad]):.3e} "
            "≤ 0: the energy is not strongly convex there"
        )
    return low
