"""Fused derivatives of ridge energies  R(x) = Σ_k Σ_pixels φ_k((K_k x)_pixel).

K x = k ⋆ P x stacks the responses of K filters k_k (K, C, s, s) to the padded image P x
(``boundary``: "reflect", "circular" or "valid", i.e. no padding), and φ_k are scalar
potentials acting pixel-wise. The derivatives in x have closed forms,

    ∇R(x) = Kᵀ φ'(K x),        ∇²R(x) v = Kᵀ (φ''(K x) ⊙ K v),

which :func:`ridge_energy` evaluates with two convolutions each (forward and adjoint), with no
autograd graph of the potentials: the energy's backward pass is the fused gradient, and the
backward pass of that gradient (what double backward, i.e. a Hessian-vector product, calls)
is the closed-form HVP with φ''(K x) computed once per gradient graph. Everything stays
differentiable to every order in x and in θ (the filters and the potentials' parameters):

* first-order backward passes (the lower-level gradient, each HVP) take the fused paths;
* θ-derivatives come from separate autograd nodes whose only inputs are θ, so autograd runs
  them only when a θ-derivative is asked for (a mixed VJP ∇_θ⟨∇ₓR, q⟩): they re-evaluate the
  energy (or ⟨φ'(K x), K q⟩) with autograd on θ;
* a backward pass with ``create_graph=True`` evaluates the same closed forms with autograd
  recording, so higher derivatives (in x, θ and the cotangent) are exact.

Adjoint convolutions: ``conv_transpose2d`` from K channels to one is slow on CPU in float32
(oneDNN's backward-data path); a grouped transposed convolution followed by a sum over the
filters computes the same several times faster there. Elsewhere (float64, several image
channels, CUDA) the adjoint is the correlation's input gradient
(``aten.convolution_backward``), up to twice as fast as ``conv_transpose2d`` in float64 on
small crops (``benchmarks/imaging_throughput.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LogCoshSum",
    "Potential",
    "SmoothedL1",
    "Spline",
    "StudentT",
    "correlate",
    "correlate_adjoint",
    "ridge_energy",
]

BOUNDARIES = ("reflect", "valid", "circular")


# --------------------------------------------------------------------------------------------
# The linear operator K and its adjoint
# --------------------------------------------------------------------------------------------


def _padding(filter_size: int) -> tuple[int, int]:
    lo = (filter_size - 1) // 2
    return lo, filter_size - 1 - lo


def pad(x: Tensor, filter_size: int, boundary: str) -> Tensor:
    """P x: pad x so that a "valid" correlation with s×s filters returns H×W responses
    (no padding for ``boundary="valid"``)."""
    if boundary == "valid":
        return x
    lo, hi = _padding(filter_size)
    return F.pad(x, (lo, hi, lo, hi), mode=boundary)


def _fold(z: Tensor, dim: int, lo: int, hi: int) -> Tensor:
    """Adjoint of circular padding by (lo, hi) along ``dim``: wrap the margins back."""
    n = z.shape[dim] - lo - hi
    core = z.narrow(dim, lo, n).clone()
    if lo:
        core.narrow(dim, n - lo, lo).add_(z.narrow(dim, 0, lo))
    if hi:
        core.narrow(dim, 0, hi).add_(z.narrow(dim, lo + n, hi))
    return core


def pad_adjoint(z: Tensor, filter_size: int, boundary: str, shape: Sequence[int]) -> Tensor:
    """Pᵀ z: the adjoint of :func:`pad` for images of ``shape`` (B, C, H, W)."""
    if boundary == "valid":
        return z
    lo, hi = _padding(filter_size)
    if boundary == "reflect":
        like = z.new_empty(()).expand(*shape)  # only its shape is read
        return torch.ops.aten.reflection_pad2d_backward(z, like, [lo, hi, lo, hi])
    return _fold(_fold(z, -2, lo, hi), -1, lo, hi)


def _grouped_adjoint(u: Tensor, filters: Tensor) -> bool:
    """Whether the adjoint takes the grouped transposed convolution: several filters, one
    image channel, CPU in float32 or bfloat16 (oneDNN). With several channels per group, or in
    float64, the grouped form is the slower one."""
    k, c = filters.shape[:2]
    fast_dtype = u.dtype in (torch.float32, torch.bfloat16)
    return u.device.type == "cpu" and fast_dtype and k > 1 and c == 1


def correlate(x: Tensor, filters: Tensor, boundary: str) -> Tensor:
    """K x = filters ⋆ P x, shape (B, K, H', W') (H×W except for ``boundary="valid"``)."""
    return F.conv2d(pad(x, filters.shape[-1], boundary), filters)


def correlate_adjoint(u: Tensor, filters: Tensor, boundary: str, shape: Sequence[int]) -> Tensor:
    """Kᵀ u = Pᵀ Σ_k k_k ⋆ᵀ u_k for responses u (B, K, H', W'), images of ``shape``."""
    if _grouped_adjoint(u, filters):  # (B, K, ...): filter k to the one channel, then Σ_k
        z = F.conv_transpose2d(u, filters, groups=filters.shape[0]).sum(1, keepdim=True)
    else:  # the input gradient of the correlation: faster than conv_transpose2d in float64
        size = [
            u.shape[0],
            filters.shape[1],
            *(n + m - 1 for n, m in zip(u.shape[2:], filters.shape[2:])),
        ]
        like = u.new_empty(()).expand(size)  # only its shape is read
        z = torch.ops.aten.convolution_backward(
            u, like, filters, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, False, False]
        )[0]
    return pad_adjoint(z, filters.shape[-1], boundary, shape)


# --------------------------------------------------------------------------------------------
# Potentials φ_k with their first and second derivatives
# --------------------------------------------------------------------------------------------


class Potential:
    """Pixel-wise potentials φ_k(t) of responses t (B, K, H, W) and their derivatives in t.

    ``params`` are tensors (already of t's dtype and device) on which φ depends
    differentiably; every method is written with differentiable torch operations of t and
    ``params``, so autograd recovers derivatives in θ (and higher derivatives in t).
    """

    def value(self, t: Tensor, params: Sequence[Tensor]) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def evaluate(self, t: Tensor, params: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
        """(Σ_{k,pixels} φ_k(t) per image (B,), φ'(t), φ''(t) where it comes at no extra cost,
        else None). Called without autograd recording (a forward pass), so it may work in
        place on its own intermediates."""
        return self.value(t, params).sum(dim=(1, 2, 3)), self.first(t, params), None

    def first(self, t: Tensor, params: Sequence[Tensor]) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def second(self, t: Tensor, params: Sequence[Tensor]) -> Tensor:  # pragma: no cover
        raise NotImplementedError


class SmoothedL1(Potential):
    """φ_k(t) = w_k (sqrt(t² + ν_k²) − ν_k); params (w, ν), each (K, 1, 1).

    φ' = w t / sqrt(t² + ν²), φ'' = w ν² / (t² + ν²)^{3/2}."""

    def value(self, t: Tensor, params: Sequence[Tensor]) -> Tensor:
        w, nu = params
        return w * (torch.sqrt(t * t + nu * nu) - nu)

    def evaluate(self, t: Tensor, params: Sequence[Tensor]) -> tuple[Tensor, Tensor, None]:
        w, nu = params
        s = torch.addcmul(nu * nu, t, t).sqrt_()  # sqrt(t² + ν²)
        pixels = t.shape[2] * t.shape[3]
        energy = (s.sum(dim=(2, 3)) - pixels * nu.view(1, -1)) @ w.view(-1)
        return energy, t * s.reciprocal_().mul_(w), None

    def first(self, t: Tensor, params: Sequence[Tensor]) -> Tensor:
        w, nu = params
        return w * t * torch.rsqrt(t * t + nu * nu)

    def second(self, t: Tensor, params: Sequence[Tensor]) -> Tensor:
        w, nu = params
        q = t * t + nu * nu
        return w * nu * nu * torch.rsqrt(q) / q


class StudentT(Potential):
    """φ_k(t) = w_k log(1 + t²/ν_k²); params (w, ν), each (K, 1, 1).

    φ' = 2 w t / (ν² + t²), φ'' = 2 w (ν² − t²) / (ν² + t²)²."""

    def value(self, t: Tensor, params: Sequence[Tensor]) -> Tensor:
        w, nu = params
        return w * torch.log1p(t * t / (nu * nu))

    def first(self, t: Tensor, params: Sequence[Tensor]) -> Tensor:
        w, nu = params
        return 2.0 * w * t / (nu * nu + t * t)

    def second(self, t: Tensor, params: Sequence[Tensor]) -> Tensor:
        w, nu = params
        q = nu * nu + t * t
        return 2.0 * w * (nu * nu - t * t) / (q * q)


class LogCoshSum(Potential):
    """φ_k(t) = Σ_m c_km σ_m log cosh(t/σ_m); params (c, σ), c (K, M), scales σ (M,).

    φ' = Σ_m c_km tanh(t/σ_m), φ'' = Σ_m (c_km/σ_m)(1 − tanh²(t/σ_m))."""

    def value(self, t: Tensor, params: Sequence[Tensor]) -> Tensor:
        c, scales = params
        out = torch.zeros_like(t)
        for m in range(scales.shape[0]):
            s, u = scales[m], t / scales[m]  # log cosh u = u + softplus(−2u) − log 2: stable
            out = out + c[:, m, None, None] * s * (u + F.softplus(-2.0 * u) - math.log(2.0))
        return out

    def first(self, t: Tensor, params: Sequence[Tensor]) -> Tensor:
        c, scales = params
        out = torch.zeros_like(t)
        for m in range(scales.shape[0]):
            out = out + c[:, m, None, None] * torch.tanh(t / scales[m])
        return out

    def second(self, t: Tensor, params: Sequence[Tensor]) -> Tensor:
        c, scales = params
        out = torch.zeros_like(t)
        for m in range(scales.shape[0]):
            th = torch.tanh(t / scales[m])
            out = out + c[:, m, None, None] / scales[m] * (1.0 - th * th)
        return out


class Spline(Potential):
    """φ_k(t) = β⁻² ψ_k(β t) for the even C¹ piecewise-quadratic spline ψ_k with ψ(0) = ψ'(0)
    = 0 and ψ'' = κ_kj on [τ_j, τ_{j+1}), τ_j = j Δ (j < M), 0 beyond τ_M; params
    (table, β): table (3, K, M + 1) holds ψ(τ_j), ψ'(τ_j) and ψ''_j, and β > 0 is a scalar.

    With a = |β t|, j = min(⌊a/Δ⌋, M), r = a − j Δ and s = ψ'(a) = ψ'(τ_j) + ψ''_j r:
    ψ(a) = ψ(τ_j) + ½ r (ψ'(τ_j) + s), φ' = sign(t) s/β, φ'' = ψ''_j (in the units of t).
    One lookup (``index_select`` of the three table rows) serves all three.
    """

    def __init__(self, spacing: float) -> None:
        self.spacing = float(spacing)

    def _lookup(self, t: Tensor, params: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(ψ(τ_j), ψ'(τ_j), ψ''_j, r) for every response."""
        table, beta = params
        _, k, m1 = table.shape
        a = (beta * t).abs()
        j = (a.detach() * (1.0 / self.spacing)).floor_().clamp_(max=m1 - 1)
        r = a.sub(j, alpha=self.spacing)
        offsets = torch.arange(0, k * m1, m1, device=t.device, dtype=torch.int32)
        idx = j.to(torch.int32).add_(offsets.view(1, k, 1, 1))
        rows = table.reshape(3, k * m1).index_select(1, idx.reshape(-1))
        c0, c1, c2 = rows.view(3, *t.shape).unbind(0)
        return c0, c1, c2, r

    def value(self, t: Tensor, params: Sequence[Tensor]) -> Tensor:
        c0, c1, c2, r = self._lookup(t, params)
        psi = c0 + 0.5 * r * (c1 + torch.addcmul(c1, c2, r))
        return psi / (params[1] * params[1])

    def evaluate(self, t: Tensor, params: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        beta = params[1]
        c0, c1, c2, r = self._lookup(t, params)
        slope = torch.addcmul(c1, c2, r)  # ψ'(a)
        # Σ ψ(a) = Σ ψ(τ_j) + ½ Σ r (ψ'(τ_j) + ψ'(a))
        psi_sum = c0.sum(dim=(1, 2, 3)) + 0.5 * (r.mul_(c1 + slope)).sum(dim=(1, 2, 3))
        return psi_sum / (beta * beta), slope.mul_(t.sign()).div_(beta), c2

    def first(self, t: Tensor, params: Sequence[Tensor]) -> Tensor:
        _, c1, c2, r = self._lookup(t, params)
        return torch.addcmul(c1, c2, r) * t.sign() / params[1]

    def second(self, t: Tensor, params: Sequence[Tensor]) -> Tensor:
        return self._lookup(t, params)[2]


# --------------------------------------------------------------------------------------------
# The fused energy, gradient and Hessian-vector products
# --------------------------------------------------------------------------------------------


class _Ridge:
    """What a ridge energy depends on besides x: filters and potential parameters (with their
    autograd history; deliberately not autograd inputs of the x-path nodes), the potential and
    the boundary, and the point x at which θ-derivatives are taken."""

    __slots__ = ("filters", "params", "potential", "boundary", "x")

    def __init__(
        self,
        filters: Tensor,
        params: tuple[Tensor, ...],
        potential: Potential,
        boundary: str,
        x: Tensor,
    ) -> None:
        self.filters, self.params, self.potential = filters, params, potential
        self.boundary, self.x = boundary, x

    def at(self, x: Tensor) -> _Ridge:
        return _Ridge(self.filters, self.params, self.potential, self.boundary, x)

    @property
    def theta(self) -> tuple[Tensor, ...]:
        return (self.filters, *self.params)

    def theta_requires_grad(self) -> bool:
        return any(p.requires_grad for p in self.theta)

    def correlate(self, x: Tensor, filters: Tensor | None = None) -> Tensor:
        return correlate(x, self.filters if filters is None else filters, self.boundary)

    def adjoint(self, u: Tensor, filters: Tensor | None = None) -> Tensor:
        w = self.filters if filters is None else filters
        return correlate_adjoint(u, w, self.boundary, self.x.shape)

    def detached(self) -> tuple[Tensor, tuple[Tensor, ...]]:
        return self.filters.detach(), tuple(p.detach() for p in self.params)


def _theta_leaves(ridge: _Ridge, create: bool) -> tuple[Tensor, tuple[Tensor, ...]]:
    """θ to differentiate in a θ-node: the tensors themselves when recording higher
    derivatives, else detached copies (those of θ that require gradients require them too)."""
    if create:
        return ridge.filters, ridge.params
    w, params = ridge.detached()
    return w.requires_grad_(ridge.filters.requires_grad), tuple(
        q.requires_grad_(p.requires_grad) for p, q in zip(ridge.params, params)
    )


def _theta_grads(out: Tensor, theta: Sequence[Tensor], create: bool) -> tuple:
    """(∂out/∂θ_i, or None where θ_i requires no gradient), zeros where unused."""
    wanted = [p for p in theta if p.requires_grad]
    grads = iter(torch.autograd.grad(out, wanted, allow_unused=True, create_graph=create))
    result = []
    for p in theta:
        if not p.requires_grad:
            result.append(None)
            continue
        g = next(grads)
        result.append(torch.zeros_like(p) if g is None else g)
    return tuple(result)


class _Value(torch.autograd.Function):
    """x ↦ R(x) (B,): forward K x and φ; backward the fused gradient Kᵀ φ'(K x)."""

    @staticmethod
    def forward(ctx, x: Tensor, ridge: _Ridge) -> Tensor:
        w, params = ridge.detached()
        t = correlate(x, w, ridge.boundary)
        if ctx.needs_input_grad[0]:
            energy, dphi, curvature = ridge.potential.evaluate(t, params)
            ctx.cache = (t, dphi, curvature)
        else:
            energy = ridge.potential.value(t, params).sum(dim=(1, 2, 3))
        ctx.ridge = ridge
        ctx.save_for_backward(x)
        return energy

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None]:
        (x,) = ctx.saved_tensors
        ridge = ctx.ridge.at(x)
        scale = grad_out.reshape(-1, 1, 1, 1)
        if torch.is_grad_enabled():  # create_graph: a gradient that is differentiable itself
            return scale * ridge_gradient(x, ridge, ctx.cache), None
        grad = correlate_adjoint(ctx.cache[1], ridge.filters.detach(), ridge.boundary, x.shape)
        return scale * grad, None


class _ValueTheta(torch.autograd.Function):
    """θ ↦ 0 with the derivative of R(x) in θ: autograd runs it only for θ-derivatives."""

    @staticmethod
    def forward(ctx, ridge: _Ridge, *theta: Tensor) -> Tensor:
        ctx.ridge = ridge
        return ridge.x.new_zeros(ridge.x.shape[0])

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple:
        ridge, create = ctx.ridge, torch.is_grad_enabled()
        with torch.enable_grad():
            w, params = _theta_leaves(ridge, create)
            x = ridge.x if create else ridge.x.detach()
            phi = ridge.potential.value(correlate(x, w, ridge.boundary), params)
            out = (phi.sum(dim=(1, 2, 3)) * grad_out).sum()
            return (None, *_theta_grads(out, (w, *params), create))


class _Gradient(torch.autograd.Function):
    """x ↦ ∇R(x) = Kᵀ φ'(K x) from the (K x, φ'(K x), φ''(K x) or None) of the energy's
    forward pass; backward the closed-form HVP Kᵀ(φ''(K x) ⊙ K v), φ''(K x) computed at most
    once and kept for the next products."""

    @staticmethod
    def forward(ctx, x: Tensor, ridge: _Ridge, cache: tuple) -> Tensor:
        t, dphi, ctx.curvature = cache
        ctx.ridge, ctx.t = ridge, t
        ctx.save_for_backward(x)
        return correlate_adjoint(dphi, ridge.filters.detach(), ridge.boundary, x.shape)

    @staticmethod
    def backward(ctx, v: Tensor) -> tuple[Tensor, None, None]:
        (x,) = ctx.saved_tensors
        ridge = ctx.ridge.at(x)
        if torch.is_grad_enabled():  # create_graph: record the closed form for autograd
            curvature = ridge.potential.second(ridge.correlate(x), ridge.params)
            return ridge.adjoint(curvature * ridge.correlate(v)), None, None
        w, params = ridge.detached()
        if ctx.curvature is None:
            ctx.curvature = ridge.potential.second(ctx.t, params)
        kv = correlate(v, w, ridge.boundary)
        return correlate_adjoint(kv.mul_(ctx.curvature), w, ridge.boundary, x.shape), None, None


class _GradientTheta(torch.autograd.Function):
    """θ ↦ 0 with the derivative of ∇R(x) in θ: ∇_θ⟨∇R(x), q⟩ = ∇_θ⟨φ'(K x), K q⟩."""

    @staticmethod
    def forward(ctx, ridge: _Ridge, *theta: Tensor) -> Tensor:
        ctx.ridge = ridge
        return torch.zeros_like(ridge.x)

    @staticmethod
    def backward(ctx, q: Tensor) -> tuple:
        ridge, create = ctx.ridge, torch.is_grad_enabled()
        with torch.enable_grad():
            w, params = _theta_leaves(ridge, create)
            x = ridge.x if create else ridge.x.detach()
            dphi = ridge.potential.first(correlate(x, w, ridge.boundary), params)
            out = (dphi * correlate(q if create else q.detach(), w, ridge.boundary)).sum()
            return (None, *_theta_grads(out, (w, *params), create))


def ridge_gradient(x: Tensor, ridge: _Ridge, cache: tuple) -> Tensor:
    """∇R(x) as a differentiable tensor (x-path and θ-path nodes) from the energy's cache."""
    g = _Gradient.apply(x, ridge, cache)
    if ridge.theta_requires_grad():
        g = g + _GradientTheta.apply(ridge, *ridge.theta)
    return g


def ridge_energy(
    x: Tensor,
    filters: Tensor,
    params: Sequence[Tensor],
    potential: Potential,
    boundary: str,
) -> Tensor:
    """R(x) = Σ_k Σ_pixels φ_k((K x)_k,pixel) per image, shape (B,), with the fused
    derivatives of this module. ``filters`` (K, C, s, s) and ``params`` must have x's dtype
    and device; they may require gradients (θ)."""
    ridge = _Ridge(filters, tuple(params), potential, boundary, x)
    value = _Value.apply(x, ridge)
    if ridge.theta_requires_grad() and torch.is_grad_enabled():
        value = value + _ValueTheta.apply(ridge, *ridge.theta)
    return value
