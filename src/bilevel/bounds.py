"""A-posteriori error bounds for inexact hypergradients and the constants they need.

For one instance, with x̃ certified to ‖x̃ − x̂‖ ≤ ε and the adjoint residual
‖H(x̃) q̃ − ∇ₓf(x̃)‖ ≤ δ, the error of z = ∇_θf(x̃, θ) − J(x̃)ᵀq̃ satisfies ([MAID] Thm 2.1,
extended to an upper loss that depends on θ)

    ‖z − ∇F‖ ≤ L_fθ·ε + ‖J‖·a + L_J·ε·(‖∇ₓf(x̃)‖ + L_f ε)/μ,
    a = δ/μ + (L_{H⁻¹}‖∇ₓf(x̃)‖ + L_f/μ)·ε,          L_{H⁻¹} = L_H/μ²,

where L_fθ is the Lipschitz constant of x ↦ ∇_θf(x, θ) (0 when f does not depend on θ). For
the mean over B instances sharing θ, Σ_i J_iᵀ a_i is bounded by ‖J_stack‖·‖a‖₂ (J_stack
stacks the J_i, computed at x̃) and by Σ_i K_J,i‖a_i‖ when bounds K_J,i ≥ ‖J_i‖ are stated
(the smaller is used when both are available); Σ_i (∇_θf_i(x̃_i) − ∇_θf_i(x̂_i)) likewise by
‖K_stack‖·‖ε‖₂ when ∇²_θx f is constant in x, else by Σ_i L_fθ,i ε_i.

Every constant is one value per instance, taken from one place: stated in
:class:`BoundConstants` (a number, a (B,) tensor or a callable ``(theta, batch)`` evaluated
at the current θ), else *computed* exactly when the structure allows it (a derivative that
is constant in x — its autograd graph does not reach x, or a randomised identity test finds
its x-derivative exactly zero at x̃ and at a random point — has Lipschitz constant 0; a
constant mixed or upper Hessian is measured densely when small), else *estimated* (power
iteration, finite perturbations, times ``safety``). The bound is *certified* when no constant was
estimated and the stated μ was not contradicted by the curvature observed at x̃.

Rounding: below float64, the residuals that certify ε and δ are recomputed in float64 at the
returned points x̃ and q̃ (:func:`recompute_float64`; one gradient, one Hessian-vector and one
Jacobian product per instance), and z is recomputed there too: the rounding allowance of z is
the measured difference ‖z − z₆₄‖ plus the unit roundoff of the float32 result. Where the
energy cannot be evaluated in float64 (e.g. a float32 matrix inside the closure), ε, δ and z
are enlarged instead by a margin 8·u·√n times the magnitude of the terms they are computed
from (a model of the rounding error of length-n sums).

A-posteriori estimate (``BoundConstants(a_posteriori=True)``): with worst-case constants the
ε-terms multiply ‖J‖, L_H/μ² and ‖∇ₓf‖, which for energies with rapidly varying curvature
(Fields of Experts with small smoothing) overestimates the error by orders of magnitude
(measured in ``docs/benchmarks_bounds.md``). The estimate
instead linearises the exact hypergradient map g(x) = ∇_θf(x) − J(x)ᵀH(x)⁻¹∇ₓf(x) along
the computed Newton correction d = H⁻¹∇ₓh(x̃) ≈ x̃ − x̂:

    z − ∇F ≈ ∇²_θx f·d − DJ[d]ᵀq̃ + Jᵀw,    H w = (∇ₓf − H q̃) − ∇²ₓₓf·d + DH[d]q̃,

(third derivatives along d and q̃ by one more backward pass; two CG solves), and
ω_ap = safety_ap·‖mean of the above‖ + ‖J_stack‖·‖ρ_w/μ‖₂/B with ρ_w the residual of the w
solve. It is first order in ε (an *estimate*, never certified); it replaces a worst-case bound
that is itself estimated when it is smaller. Products spent on the bound's constants
(Jacobian products, power iterations) are counted in ``Cost.bound_products``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from bilevel.autodiff import HessianOperator, batch_norm, expand_as_batch
from bilevel.linear import CG, lanczos_extremes, largest_eigenvalue
from bilevel.problem import (
    Batch,
    BilevelProblem,
    Constant,
    NotStronglyConvexError,
    evaluate_constant,
    index_batch,
    parameter_list,
)

ROUNDING_FACTOR = 8.0
"""Factor c of the rounding margin c·u·√n (u the unit roundoff, n the terms summed)."""


@dataclass(frozen=True)
class BoundConstants:
    """Constants of the error bound; ``None`` means "compute it, else estimate it".

    Each constant may be a number, a (B,) tensor (one per instance) or a callable
    ``(theta, batch) -> number or (B,)`` evaluated at the current θ.

    Attributes:
        upper_grad_lipschitz: L_f, Lipschitz constant of x ↦ ∇ₓf_i (1 for ½‖x − x*‖²).
            Computed exactly when ∇ₓf is affine in x and x has at most ``exact_max_dim``
            entries per instance.
        upper_mixed_lipschitz: L_fθ, Lipschitz constant of x ↦ ∇_θf_i(x, θ) (‖∇²_θx f‖);
            computed (0) when f does not depend on θ, exactly when ∇²_θx f is constant and θ
            is small.
        jacobian_norm: K_J ≥ ‖J_i(x)‖ = ‖∇²_θx h_i‖ near the solution. ‖J_stack‖ at x̃ is
            computed exactly when θ has at most ``exact_jacobian_max_params`` entries, and the
            smaller of the two bounds is used.
        jacobian_lipschitz: L_J, Lipschitz constant of x ↦ J_i(x) (computed 0 when J does
            not depend on x, e.g. ∇ₓh affine in x).
        hessian_lipschitz: L_H, Lipschitz constant of x ↦ ∇²ₓₓh_i (computed 0 for energies
            quadratic in x).
        power_iterations: iterations of the power methods used for estimates.
        exact_jacobian_max_params: compute mixed derivatives densely (one product per
            parameter) when θ has at most this many entries.
        exact_max_dim: compute a constant upper Hessian densely up to this dimension.
        curvature_iterations: Lanczos steps used to check a stated μ against the curvature
            at x̃ (and to estimate μ when it is not stated) when the linear solver did not
            already explore a Krylov space that large; 0 disables the check, and a bound
            whose μ was not checked is not certified.
        safety: factor applied to every estimated constant (divides an estimated μ).
        seed: seed of the random starts of power iteration and Lanczos.
        a_posteriori: also compute the first-order a-posteriori estimate (module docstring)
            and use it when it is smaller than a worst-case bound that is not certified.
        a_posteriori_safety: factor applied to the linearised error in that estimate.
    """

    upper_grad_lipschitz: Constant = None
    upper_mixed_lipschitz: Constant = None
    jacobian_norm: Constant = None
    jacobian_lipschitz: Constant = None
    hessian_lipschitz: Constant = None
    power_iterations: int = 20
    exact_jacobian_max_params: int = 32
    exact_max_dim: int = 64
    curvature_iterations: int = 30
    safety: float = 1.1
    seed: int = 0
    a_posteriori: bool = False
    a_posteriori_safety: float = 2.0


@dataclass(frozen=True)
class ConstantReport:
    """One constant of a bound: its value and where it came from.

    Attributes:
        value: the value used (largest over instances; the smallest for μ).
        source: ``"stated"``, ``"computed"`` (exact from the problem's structure or a dense
            evaluation) or ``"estimated"`` (power iteration / perturbation × safety).
        note: how it was obtained or checked, in words.
    """

    value: float
    source: str
    note: str = ""


@dataclass(frozen=True)
class ErrorBound:
    """ω for the mean hypergradient, whether it is certified, and the constants used."""

    value: float
    certified: bool
    constants: dict[str, ConstantReport]


def generator_for(like: Tensor, seed: int) -> torch.Generator:
    """A generator on ``like``'s device seeded with ``seed`` (never the global RNG)."""
    return torch.Generator(device=like.device).manual_seed(seed)


def rounding_margin(like: Tensor, *magnitudes: Tensor) -> Tensor:
    """8·u·√n·Σ magnitudes per instance: the rounding allowance of a quantity computed in
    ``like``'s dtype from length-n sums of terms of those magnitudes."""
    u = torch.finfo(like.dtype).eps / 2
    n = like[0].numel() if like.dim() > 1 else 1
    total = sum(magnitudes)
    return ROUNDING_FACTOR * u * math.sqrt(n) * total


@dataclass(frozen=True)
class Float64Residuals:
    """Residuals at the float32 points x̃, q̃ recomputed in float64.

    Attributes:
        grad_norm: ‖∇ₓh_i(x̃_i)‖ (B,).
        delta: ‖H_i q̃_i − ∇ₓf_i(x̃_i)‖ (B,).
        z_rounding: allowance for the rounding of z: ‖z − z₆₄‖ + 2u(‖∇_θf̄‖ + ‖(1/B)ΣJ_iᵀq̃_i‖),
            z₆₄ = ∇_θf̄ − (1/B)ΣJ_iᵀq̃_i accumulated in float64 and rounded to θ's dtype.
    """

    grad_norm: Tensor
    delta: Tensor
    z_rounding: float


def recompute_float64(
    problem: BilevelProblem, batch: Batch, x: Tensor, q: Tensor, z: list[Tensor], cost
) -> Float64Residuals | None:
    """The residuals that certify ε and δ, and the rounding of z, measured in float64.

    x̃, q̃ and the batch's floating tensors are cast to float64 (exactly); one gradient, one
    Hessian-vector and one Jacobian product per instance, counted in ``cost``. ``z`` is the
    estimate without the upper regulariser. None when ``x`` is already float64 or the energy
    or loss does not evaluate in float64 (e.g. a float32 matrix in the closure).
    """
    if x.dtype == torch.float64 or not x.is_floating_point():
        return None
    n = x.shape[0]
    x64, q64, b64 = x.detach().double(), q.detach().double(), as_float64(batch)
    theta64, params = _theta_float64(problem.theta)
    try:
        with torch.enable_grad():
            xr = x64.requires_grad_(True)
            energy = problem.lower_energy(xr, theta64, b64)
            (g,) = torch.autograd.grad(energy.sum(), xr, create_graph=True)
            hq, *jtq = torch.autograd.grad(g, [xr, *params], q64, allow_unused=True)
            losses = problem.upper_loss(xr, theta64, b64)
            gf, *gtheta = torch.autograd.grad(losses.sum(), [xr, *params], allow_unused=True)
    except (RuntimeError, TypeError):
        return None
    if energy.shape != (n,) or losses.shape != (n,):
        return None
    cost.grad_evals += n
    cost.hvps += n
    cost.vjps += n
    if energy.dtype != torch.float64 or losses.dtype != torch.float64 or gf is None:
        return None
    hq = torch.zeros_like(x64) if hq is None else hq
    u = torch.finfo(x.dtype).eps / 2
    diff_sq, size = 0.0, 0.0
    for zi, p, jt, gt in zip(z, params, jtq, gtheta):
        first = torch.zeros_like(p, dtype=torch.float64) if gt is None else gt.double() / n
        second = torch.zeros_like(first) if jt is None else jt.double() / n
        diff_sq += float(((zi.double() - (first - second)) ** 2).sum())
        size += float(first.norm() + second.norm())
    up = 1.0 + 4 * u  # round the float64 norms up into x's dtype
    return Float64Residuals(
        grad_norm=(up * batch_norm(g.detach())).to(x.dtype),
        delta=(up * batch_norm((hq - gf).detach())).to(x.dtype),
        z_rounding=math.sqrt(diff_sq) + 2 * u * size,
    )


def _theta_float64(theta: Any) -> tuple[Any, list[Tensor]]:
    """θ with float64 copies of its tensors (same structure) and their leaves requiring grad,
    in the order of ``problem.params``; an ``nn.Module`` is returned as is (its parameters
    are cast by the modules that use them, or the computation falls back)."""

    def cast(t: Tensor) -> Tensor:
        if not t.is_floating_point():
            return t
        return t.detach().double().requires_grad_(t.requires_grad)

    if isinstance(theta, Tensor):
        out: Any = cast(theta)
        leaves = [out]
    elif isinstance(theta, Mapping):
        out = {k: cast(v) for k, v in theta.items()}
        leaves = list(out.values())
    elif isinstance(theta, Sequence):
        out = [cast(v) for v in theta]
        leaves = out
    else:
        return theta, parameter_list(theta)
    return out, [t for t in leaves if t.requires_grad]


def as_float64(batch: Batch) -> Batch:
    """``batch`` with its floating tensors cast to float64."""
    if isinstance(batch, Tensor):
        return batch.double() if batch.is_floating_point() else batch
    if isinstance(batch, tuple | list):
        return type(batch)(as_float64(b) for b in batch)
    if isinstance(batch, dict):
        return {k: as_float64(v) for k, v in batch.items()}
    return batch


def compute_error_bound(
    problem: BilevelProblem,
    batch: Batch,
    op: HessianOperator,
    eps: Tensor,
    delta: Tensor,
    grad_f: Tensor,
    mu: Tensor,
    mu_report: ConstantReport,
    constants: BoundConstants,
    adjoint: Tensor,
    z_rounding: float | None = None,
) -> ErrorBound:
    """ω(ε, δ) for the mean over instances of the inexact hypergradients at ``op``'s point.

    Args:
        eps: per-instance certified distances ‖x̃_i − x̂_i‖ ≤ ε_i, shape (B,).
        delta: per-instance adjoint residual norms ‖H_i q̃_i − ∇ₓf_i‖ (rounding included).
        grad_f: per-instance ∇ₓf_i(x̃_i), shape (B, ...).
        mu: per-instance strong-convexity moduli (B,); ``mu_report`` says where they came from.
        adjoint: q̃ (B, ...), for the rounding margin of z.
        z_rounding: the measured rounding allowance of z (:func:`recompute_float64`); None
            uses the model margin 8·u·√n.
    """
    c = constants
    cost = op.lower.cost
    vjps_before = cost.vjps
    params = problem.params
    x = op.x_full
    gf_norm = batch_norm(grad_f)
    reports: dict[str, ConstantReport] = {"mu": mu_report}

    def stated(name: str, value: Constant) -> Tensor | None:
        t = evaluate_constant(name, value, problem.theta, batch, x)
        if t is not None:
            reports[name] = ConstantReport(float(t.max()), "stated")
        return t

    l_f = stated("L_f", c.upper_grad_lipschitz)
    if l_f is None:
        l_f, reports["L_f"] = _upper_hessian_norm(problem, x, batch, c)
    l_h = stated("L_H", c.hessian_lipschitz)
    l_j = stated("L_J", c.jacobian_lipschitz)
    n = eps.numel()
    j_stated = stated("jacobian_norm", c.jacobian_norm)
    j_norm, j_exact = jacobian_norm_stacked(op, params, c)
    if not j_exact:
        j_norm *= c.safety
    j_report = ConstantReport(
        j_norm,
        "computed" if j_exact else "estimated",
        "‖J_stack‖ at x̃, dense" if j_exact else "‖J_stack‖ at x̃, power iteration × safety",
    )
    if z_rounding is None:
        z_rounding = _z_rounding_model(op, params, adjoint, j_norm)
    if l_h is None or l_j is None:
        zero_h, zero_j = _third_order_zeros(op, params, c.seed)
        if (l_h is None and not zero_h) or (l_j is None and not zero_j):
            estimate = None
            if c.a_posteriori:  # replaces the worst-case bound, whose L_H, L_J are estimates
                estimate = a_posteriori_error(problem, batch, op, adjoint, grad_f, mu, j_norm, c)
            if estimate is not None:
                reports["jacobian_norm"] = j_report
                reports["a_posteriori"] = ConstantReport(
                    estimate + z_rounding,
                    "estimated",
                    "first-order error along the Newton correction × safety, + ‖J‖·‖ρ_w/μ‖ "
                    "(L_H, L_J not needed)",
                )
                cost.bound_products += cost.vjps - vjps_before
                return ErrorBound(value=estimate + z_rounding, certified=False, constants=reports)
            est_h, est_j = _third_order_estimates(op, params, eps, c)
        if l_h is None:
            l_h = torch.zeros_like(eps) if zero_h else c.safety * est_h
            reports["L_H"] = _report_zero_or_estimate(l_h, zero_h, "∇²ₓₓh")
        if l_j is None:
            l_j = torch.zeros_like(eps) if zero_j else c.safety * est_j
            reports["L_J"] = _report_zero_or_estimate(l_j, zero_j, "∇²_θx h")
    l_hinv = l_h / mu**2

    a = delta / mu + (l_hinv * gf_norm + l_f / mu) * eps
    curvature_term = l_j * eps * (gf_norm + l_f * eps) / mu
    stacked = j_norm * torch.linalg.vector_norm(a)
    if j_stated is not None and (not j_exact or float((j_stated * a).sum()) < float(stacked)):
        linear_term = (j_stated * a).sum()
    else:
        linear_term = stacked
        reports["jacobian_norm"] = j_report
    mixed_term, reports["L_ftheta"] = _upper_mixed_term(problem, x, batch, eps, c)
    value = float((linear_term + curvature_term.sum() + mixed_term) / n) + z_rounding
    certified = all(r.source != "estimated" for r in reports.values())
    if c.a_posteriori and not certified:
        estimate = a_posteriori_error(problem, batch, op, adjoint, grad_f, mu, j_norm, c)
        if estimate is not None:
            reports["a_posteriori"] = ConstantReport(
                estimate + z_rounding,
                "estimated",
                "first-order error along the Newton correction × safety, + ‖J‖·‖ρ_w/μ‖ "
                f"(worst-case bound {value:.3g})",
            )
            value = min(value, estimate + z_rounding)
    cost.bound_products += cost.vjps - vjps_before
    return ErrorBound(value=value, certified=certified, constants=reports)


def _z_rounding_model(op: HessianOperator, params: list[Tensor], q: Tensor, j_norm: float) -> float:
    """The model margin 8·u·√n of the rounding of z = ∇_θf̄ − (1/B)ΣJ_iᵀq̃_i."""
    x = op.x_full
    n = x.shape[0]
    jtq = op.jacobian_vjp(q, params)
    jtq_norm = math.sqrt(sum(float((t * t).sum()) for t in jtq))
    p_like = torch.zeros(1, sum(p.numel() for p in params), dtype=x.dtype, device=x.device)
    return (
        float(rounding_margin(p_like, torch.as_tensor(jtq_norm / n, dtype=x.dtype)).sum())
        + float(rounding_margin(x, j_norm * batch_norm(q)).sum()) / n
    )


def a_posteriori_error(
    problem: BilevelProblem,
    batch: Batch,
    op: HessianOperator,
    q: Tensor,
    grad_f: Tensor,
    mu: Tensor,
    j_norm: float,
    c: BoundConstants,
) -> float | None:
    """First-order a-posteriori estimate of ‖z − ∇F(θ)‖ for the batch mean (module docstring).

    d = H⁻¹∇ₓh(x̃) (CG to 1 % of ‖∇ₓh‖), the third derivatives DH[d]q̃ and DJ[d]ᵀq̃ by one
    backward pass through ⟨H(x, θ) q̃, d⟩, w from H w = r − ∇²ₓₓf·d + DH[d]q̃ (CG to 1 %),
    then safety_ap·‖(1/B)(∇²_θx f·d − DJ[d]ᵀq̃ + Jᵀw)‖ + ‖J_stack‖·‖ρ_w/μ‖₂/B. None when the
    energy or the loss cannot be differentiated three (two) times.
    """
    params = problem.params
    x = op.x_full
    n = x.shape[0]
    cost = op.lower.cost
    solver = CG(max_iter=500)
    grad_h = op.gradient
    d = solver.solve(op.matvec, grad_h, 1e-2 * batch_norm(grad_h)).solution
    try:
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            energy = problem.energy(xr, batch)
            (g,) = torch.autograd.grad(energy.sum(), xr, create_graph=True)
            (hq,) = torch.autograd.grad(g, xr, q, create_graph=True)
            third: tuple = (None,) * (1 + len(params))
            if hq.requires_grad:
                third = torch.autograd.grad((hq * d).sum(), [xr, *params], allow_unused=True)
            _, gf = problem.loss_and_grad_x(xr, batch, leaf=True)
            upper: tuple = (None,) * (1 + len(params))
            if gf.requires_grad:
                upper = torch.autograd.grad(gf, [xr, *params], d, allow_unused=True)
    except RuntimeError:
        return None
    cost.grad_evals += n
    cost.hvps += 2 * n
    cost.bound_products += 2 * n

    def zeros_if_none(values: tuple, likes: list[Tensor]) -> list[Tensor]:
        return [torch.zeros_like(t) if v is None else v.detach() for v, t in zip(values, likes)]

    dh_q, *dj_q = zeros_if_none(third, [x, *params])
    fxx_d, *fthx_d = zeros_if_none(upper, [x, *params])
    rhs = grad_f - op.full_matvec(q) - fxx_d + dh_q
    w = solver.solve(op.matvec, rhs, 1e-2 * batch_norm(rhs)).solution
    rho_w = batch_norm(op.full_matvec(w) - rhs)
    jtw = op.jacobian_vjp(w, params)
    error = [(a - b + jw) / n for a, b, jw in zip(fthx_d, dj_q, jtw)]
    linear = math.sqrt(sum(float((e * e).sum()) for e in error))
    solve_term = j_norm * float(torch.linalg.vector_norm(rho_w / mu)) / n
    return c.a_posteriori_safety * linear + solve_term


def _report_zero_or_estimate(value: Tensor, zero: bool, what: str) -> ConstantReport:
    if zero:
        return ConstantReport(0.0, "computed", f"{what} does not depend on x (autograd graph)")
    return ConstantReport(float(value.max()), "estimated", "finite perturbation × safety")


def jacobian_norm_stacked(
    op: HessianOperator, params: list[Tensor], constants: BoundConstants
) -> tuple[float, bool]:
    """‖J_stack‖₂ at the operator's point: exact (dense) for small θ, else power iteration.

    Returns (norm, exact).  Power iteration converges from below: the estimate is a lower
    bound on the true norm, hence the safety factor applied by the caller.
    """
    return _stacked_norm(
        lambda u: op.jacobian_jvp(u, params),
        lambda w: op.jacobian_vjp(w, params),
        params,
        constants,
    )


def _stacked_norm(jvp, vjp, params: list[Tensor], constants: BoundConstants) -> tuple[float, bool]:
    """‖K‖₂ of a linear map θ-space → x-space given by ``jvp`` and its adjoint ``vjp``."""
    n_params = sum(p.numel() for p in params)
    if n_params <= constants.exact_jacobian_max_params:
        columns = []
        for k in range(n_params):
            u = torch.zeros(n_params, dtype=params[0].dtype, device=params[0].device)
            u[k] = 1.0
            columns.append(jvp(_unflatten(u, params)).reshape(-1))
        dense = torch.stack(columns, dim=1)
        return float(torch.linalg.matrix_norm(dense, ord=2)), True
    gen = torch.Generator(device=params[0].device).manual_seed(constants.seed)
    u = [torch.randn(p.shape, generator=gen, dtype=p.dtype, device=p.device) for p in params]
    sigma_sq = 0.0
    for _ in range(constants.power_iterations):
        norm_u = math.sqrt(sum(float((ui * ui).sum()) for ui in u))
        if norm_u == 0.0:
            return 0.0, False
        u = [ui / norm_u for ui in u]
        ju = jvp(u)
        v = vjp(ju)
        sigma_sq = float((ju * ju).sum())
        u = v
    return math.sqrt(sigma_sq), False


def _unflatten(flat: Tensor, params: list[Tensor]) -> list[Tensor]:
    out, start = [], 0
    for p in params:
        out.append(flat[start : start + p.numel()].reshape(p.shape))
        start += p.numel()
    return out


def _constant_in_x(make: Callable[[Tensor], list[Tensor]], x: Tensor, seed: int) -> bool:
    """Whether the tensors ``make(x)`` are constant in x.

    Proved when their autograd graph does not reach x and their values at x̃ and at a random
    point x̃ + Δ agree; otherwise a randomised identity test: the derivative of ⟨make(x), w⟩
    (w random) is exactly zero at x̃ and at x̃ + Δ, and the values agree there. An analytic
    function passes the test at random points only if it is constant (up to events of
    probability zero). The comparison of values catches what derivatives cannot: a
    piecewise-constant Hessian (e.g. of a spline potential, whose ψ'' is looked up by
    interval) has a zero derivative almost everywhere, or no graph to x at all, yet it jumps.
    """
    gen = generator_for(x, seed)
    values: list[list[Tensor]] = []
    for k in range(2):
        xk = x.detach()
        if k:
            step = torch.randn(x.shape, generator=gen, dtype=x.dtype, device=x.device)
            scale = 0.1 * (1.0 + batch_norm(x)) / batch_norm(step).clamp_min(1e-300)
            xk = xk + expand_as_batch(scale, step) * step
        with torch.enable_grad():
            xr = xk.requires_grad_(True)
            outs = [o for o in make(xr) if o is not None]
            values.append([o.detach() for o in outs])
            graphs = [o for o in outs if o.requires_grad]
            if graphs:
                total = sum(
                    (o * torch.randn(o.shape, generator=gen, dtype=o.dtype, device=o.device)).sum()
                    for o in graphs
                )
                (d,) = torch.autograd.grad(total, xr, allow_unused=True)
                if d is not None and bool((d != 0).any()):
                    return False
    return _same_values(values[0], values[1])


def _same_values(a: list[Tensor], b: list[Tensor]) -> bool:
    """Whether two evaluations of the same tensors agree up to the rounding of their
    computation (64 units in the last place of their largest magnitude)."""
    if len(a) != len(b):
        return False
    for u, v in zip(a, b):
        if u.shape != v.shape:
            return False
        scale = torch.maximum(u.abs().max(), v.abs().max()) if u.numel() else u.new_zeros(())
        if bool(((u - v).abs() > 64 * torch.finfo(u.dtype).eps * scale).any()):
            return False
    return True


def _third_order_zeros(op: HessianOperator, params: list[Tensor], seed: int) -> tuple[bool, bool]:
    """(∇²ₓₓh constant in x, J = ∇²_θx h constant in x), by :func:`_constant_in_x`."""
    lower = op.lower
    x = op.x_full
    v = torch.randn(x.shape, generator=generator_for(x, seed + 2), dtype=x.dtype, device=x.device)

    def grad_h(xr: Tensor) -> Tensor:
        energy = lower.problem.energy(xr, index_batch(lower.batch, op.full_index))
        (g,) = torch.autograd.grad(energy.sum(), xr, create_graph=True)
        lower.cost.grad_evals += x.shape[0]
        return g

    def hv(xr: Tensor) -> list[Tensor]:
        (out,) = torch.autograd.grad(grad_h(xr), xr, v, create_graph=True, allow_unused=True)
        lower.cost.hvps += x.shape[0]
        return [out]

    def jtv(xr: Tensor) -> list[Tensor]:
        out = torch.autograd.grad(grad_h(xr), params, v, create_graph=True, allow_unused=True)
        lower.cost.vjps += x.shape[0]
        return list(out)

    return _constant_in_x(hv, x, seed), _constant_in_x(jtv, x, seed)


def _upper_hessian_norm(
    problem: BilevelProblem, x: Tensor, batch: Batch, c: BoundConstants
) -> tuple[Tensor, ConstantReport]:
    """L_f per instance: λ_max(∇²ₓₓf_i), exact when ∇ₓf is affine in x and small, else a
    local estimate at x̃ × safety."""
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        _, g = problem.loss_and_grad_x(xr, batch, leaf=True)
    n = x.shape[0]
    dim = x[0].numel()
    if not g.requires_grad:  # ∇ₓf has no graph: f is linear in x (and θ does not enter ∇ₓf)
        return torch.zeros(n, dtype=x.dtype, device=x.device), ConstantReport(
            0.0, "computed", "∇ₓf does not depend on x (autograd graph)"
        )

    def matvec(v: Tensor, index: Tensor) -> Tensor:
        full = torch.zeros_like(xr)
        full[index] = v
        with torch.enable_grad():
            (hv,) = torch.autograd.grad(
                g, xr, full, retain_graph=True, allow_unused=True, create_graph=True
            )
        return torch.zeros_like(v) if hv is None else hv[index]

    def upper_hv(xr: Tensor) -> list[Tensor]:
        _, gx = problem.loss_and_grad_x(xr, batch, leaf=True)
        if not gx.requires_grad:
            return []
        hv = torch.autograd.grad(gx, xr, torch.ones_like(gx), create_graph=True, allow_unused=True)
        return [h for h in hv if h is not None]

    constant = _constant_in_x(upper_hv, x, c.seed)
    if constant and dim <= c.exact_max_dim:
        index = torch.arange(n, device=x.device)
        eye = torch.eye(dim, dtype=x.dtype, device=x.device)
        cols = [
            matvec(eye[k].expand(n, dim).reshape(x.shape), index).detach().reshape(n, dim)
            for k in range(dim)
        ]
        hess = torch.stack(cols, dim=2)
        sym = 0.5 * (hess + hess.transpose(1, 2))
        value = torch.linalg.eigvalsh(sym).abs().max(1).values
        return value, ConstantReport(float(value.max()), "computed", "‖∇²ₓₓf‖, dense (constant)")
    gen = generator_for(x, c.seed)
    values, _ = largest_eigenvalue(
        lambda v, i: matvec(v, i).detach(), x, iterations=c.power_iterations, generator=gen
    )
    value = c.safety * values.abs()
    return value, ConstantReport(
        float(value.max()), "estimated", "λ_max(∇²ₓₓf) at x̃, power iteration × safety"
    )


def _upper_mixed_term(
    problem: BilevelProblem, x: Tensor, batch: Batch, eps: Tensor, c: BoundConstants
) -> tuple[Tensor, ConstantReport]:
    """Σ_i bound on ‖∇_θf_i(x̃_i) − ∇_θf_i(x̂_i)‖ summed over instances, and its report."""
    params = problem.params
    stated = evaluate_constant(
        "upper_mixed_lipschitz", c.upper_mixed_lipschitz, problem.theta, batch, x
    )
    if stated is not None:
        return (stated * eps).sum(), ConstantReport(float(stated.max()), "stated")
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        losses = problem.loss(xr, batch)
        gtheta = torch.autograd.grad(losses.sum(), params, create_graph=True, allow_unused=True)
    live = [(p, t) for p, t in zip(params, gtheta) if t is not None and t.requires_grad]
    zero = torch.zeros((), dtype=x.dtype, device=x.device)

    def grad_theta_f(xr: Tensor) -> list[Tensor]:
        out = problem.loss(xr, batch)
        return list(torch.autograd.grad(out.sum(), params, create_graph=True, allow_unused=True))

    if not live or _constant_in_x(grad_theta_f, x, c.seed):
        return zero, ConstantReport(0.0, "computed", "∇_θf does not depend on x")
    lp = [p for p, _ in live]

    def kt(w: Tensor) -> list[Tensor]:
        """Σ_i K_iᵀ w_i = ∇_θ⟨∇ₓf, w⟩ (K_i = ∇²_θx f_i)."""
        with torch.enable_grad():
            (gx,) = torch.autograd.grad(losses.sum(), xr, create_graph=True)
            out = torch.autograd.grad(gx, lp, w, retain_graph=True, allow_unused=True)
        return [torch.zeros_like(p) if o is None else o for p, o in zip(lp, out)]

    def k(u: list[Tensor]) -> Tensor:
        """K u stacked over instances: ∂/∂t ∇ₓf(x, θ + t u)."""
        with torch.enable_grad():
            (gx,) = torch.autograd.grad(losses.sum(), xr, create_graph=True)
            w = torch.zeros_like(gx, requires_grad=True)
            ktw = torch.autograd.grad(gx, lp, w, create_graph=True, allow_unused=True)
            pairs = [(o, ui) for o, ui in zip(ktw, u) if o is not None]
            if not pairs:
                return torch.zeros_like(gx)
            (ku,) = torch.autograd.grad([o for o, _ in pairs], w, [ui for _, ui in pairs])
        return ku.detach()

    def mixed(xr: Tensor) -> list[Tensor]:
        _, gx = problem.loss_and_grad_x(xr, batch, leaf=True)
        return list(
            torch.autograd.grad(gx, lp, torch.ones_like(gx), create_graph=True, allow_unused=True)
        )

    constant = _constant_in_x(mixed, x, c.seed)
    norm, exact = _stacked_norm(k, kt, lp, c)
    if constant and exact:
        return norm * torch.linalg.vector_norm(eps), ConstantReport(
            norm, "computed", "‖∇²_θx f stacked‖, dense (constant in x)"
        )
    value = c.safety * norm
    return value * torch.linalg.vector_norm(eps), ConstantReport(
        value, "estimated", "‖∇²_θx f stacked‖ at x̃ × safety"
    )


def _third_order_estimates(
    op: HessianOperator, params: list[Tensor], eps: Tensor, c: BoundConstants
) -> tuple[Tensor, Tensor]:
    """Finite-perturbation estimates of L_H (per instance) and L_J over the certified ball.

    For ``draws`` random displacements Δ with ‖Δ_i‖ = r ≥ max_i ε_i, the norms of the
    difference operators H(x̃ + Δ) − H(x̃) (power iteration, per instance) and
    J_stack(x̃ + Δ) − J_stack(x̃) (dense for small θ, else power iteration), divided by r;
    the largest over the draws.
    """
    x = op.x_full
    gen = generator_for(x, c.seed + 1)
    floor = math.sqrt(torch.finfo(x.dtype).eps) * (1.0 + batch_norm(x))
    radius = torch.maximum(torch.nan_to_num(eps, nan=0.0), floor).max().expand(eps.shape)
    est_h = torch.zeros_like(eps)
    est_j = 0.0
    for _ in range(2):
        delta = torch.randn(x.shape, generator=gen, dtype=x.dtype, device=x.device)
        delta = delta * expand_as_batch(radius / batch_norm(delta).clamp_min(1e-300), delta)
        shifted = HessianOperator(op.lower, x + delta)

        def diff(v: Tensor, index: Tensor, shifted: HessianOperator = shifted) -> Tensor:
            full = torch.zeros_like(x)
            full[index] = v
            return (shifted.full_matvec(full) - op.full_matvec(full))[index]

        lam, _ = largest_eigenvalue(diff, x, iterations=8, generator=gen)
        est_h = torch.maximum(est_h, lam.abs() / radius)
        dj, _ = _stacked_norm(
            lambda u, s=shifted: s.jacobian_jvp(u, params) - op.jacobian_jvp(u, params),
            lambda w, s=shifted: [
                a - b for a, b in zip(s.jacobian_vjp(w, params), op.jacobian_vjp(w, params))
            ],
            params,
            c,
        )
        est_j = max(est_j, dj / float(radius[0]))
    return est_h, torch.full_like(eps, est_j)


def estimate_mu(op: HessianOperator, like: Tensor, c: BoundConstants) -> tuple[Tensor, Tensor]:
    """Per-instance estimate of μ at x̃ on the safe side, and the Ritz value it came from.

    Lanczos (``max(curvature_iterations, 50)`` steps, seeded) gives the smallest Ritz value
    θ_min ≥ λ_min and its residual r; the estimate is max(θ_min − r, θ_min/10) / safety.

    Raises NotStronglyConvexError if some instance shows non-positive curvature.
    """
    ritz = lanczos_extremes(
        op.matvec, like, max(c.curvature_iterations, 50), generator_for(like, c.seed)
    )
    low = ritz.smallest
    if bool((low <= 0).any()):
        bad = int((low <= 0).nonzero()[0])
        raise NotStronglyConvexError(
            f"the lower-level Hessian of instance {bad} has an eigenvalue ≈ {float(low[bad]):.3e} "
            "≤ 0: the energy is not strongly convex there"
        )
    safe = torch.maximum(low - ritz.residual, low / 10.0) / c.safety
    return safe, low


def smallest_eigenvalue(op: HessianOperator, like: Tensor, iterations: int = 50) -> Tensor:
    """Per-instance λ_min(∇²ₓₓh) at the operator's point (smallest Lanczos Ritz value, an upper
    bound that converges quickly; exact when ``iterations`` ≥ the dimension).

    Raises NotStronglyConvexError if some instance shows non-positive curvature.
    """
    ritz = lanczos_extremes(op.matvec, like, iterations, generator_for(like, 0))
    low = ritz.smallest
    if bool((low <= 0).any()):
        bad = int((low <= 0).nonzero()[0])
        raise NotStronglyConvexError(
            f"the lower-level Hessian of instance {bad} has an eigenvalue ≈ {float(low[bad]):.3e} "
            "≤ 0: the energy is not strongly convex there"
        )
    return low
