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

The x-paths work in scaled responses v = a ⊙ K x (:class:`Potential`): per-filter scales of
the potentials are folded into the filters, so no pass over the responses rescales them.

Layout (:func:`fast_layout`): on the CPU in float32 with one image channel the correlation
reads the image channels-last (oneDNN's fast path; free for one channel) and the adjoint is a
depthwise convolution of the channels-last responses with the flipped filters, summed over
the filters: ``conv_transpose2d`` from K channels to one (oneDNN's backward-data path) is up
to 5× slower. Elsewhere (float64, several image channels, CUDA) the correlation is
channel-first and the adjoint is its input gradient (``aten.convolution_backward``), up to
twice as fast as ``conv_transpose2d`` in float64 on small crops
(``benchmarks/imaging_throughput.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LogCoshSum",
    "retain_freed_memory",
    "Potential",
    "SmoothedL1",
    "Spline",
    "StudentT",
    "correlate",
    "correlate_adjoint",
    "ridge_energy",
]

BOUNDARIES = ("reflect", "valid", "circular")

#: glibc mallopt parameters: allocations up to MMAP_LIMIT bytes come from the heap, and up to
#: TRIM_LIMIT bytes of freed heap stay with the process.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_LIMIT, TRIM_LIMIT = 32 << 20, 1 << 30


def retain_freed_memory() -> bool:
    """Let glibc keep freed memory for the next tensors of the same sizes; True if it did.

    By default glibc maps every large allocation afresh and returns it on release (or trims
    the heap), so each new response tensor of a full-size image (10 MB for 16 filters on
    481×321) pays page faults on its first touch: on one core this made a gradient 2–3×
    slower than its convolutions and elementwise passes (``docs/benchmarks.md``). With
    allocations up to 32 MiB served from the heap and up to 1 GiB of freed memory kept, the
    process reuses the same pages; its resident memory stays at its peak. A process-wide
    setting: the imaging jobs, ``bilevel reconstruct`` and the throughput benchmark make it;
    nothing happens outside glibc (False).
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_LIMIT)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_LIMIT)
    )


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


def fast_layout(t: Tensor) -> bool:
    """Whether the correlations of ``t`` run channels-last: CPU in float32 or bfloat16
    (oneDNN), where a one-channel image read channels-last is correlated up to 3× faster
    than the same image read channel-first, and a depthwise convolution of channels-last
    responses with the flipped filters, summed over the filters, is the fastest adjoint
    (``benchmarks/imaging_throughput.py``: up to 5× faster than ``conv_transpose2d`` from K
    channels to one). In float64 (no oneDNN) the channel-first layout and the correlation's
    input gradient win."""
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.bfloat16)


def channels_last(x: Tensor) -> Tensor:
    """x (B, C, H, W) in channels-last memory order; free for one channel (the same memory
    with the strides that oneDNN reads as channels-last)."""
    b, c, h, w = x.shape
    if c == 1 and x.is_contiguous():
        return x.as_strided(x.shape, (h * w, 1, w, 1))
    return x.contiguous(memory_format=torch.channels_last)


def correlate(x: Tensor, filters: Tensor, boundary: str) -> Tensor:
    """K x = filters ⋆ P x, shape (B, K, H', W') (H×W except for ``boundary="valid"``);
    channels-last where :func:`fast_layout` says so."""
    xp = pad(x, filters.shape[-1], boundary)
    if fast_layout(xp) and xp.shape[1] == 1:
        xp = channels_last(xp)
    return F.conv2d(xp, filters)


def correlate_adjoint(u: Tensor, filters: Tensor, boundary: str, shape: Sequence[int]) -> Tensor:
    """Kᵀ u = Pᵀ Σ_k k_k ⋆ᵀ u_k for responses u (B, K, H', W'), images of ``shape``."""
    k, c = filters.shape[:2]
    if fast_layout(u) and k > 1 and c == 1:  # Σ_k of the full convolutions k_k * u_k
        u = u.contiguous(memory_format=torch.channels_last)  # no copy after correlate
        flipped = filters.flip(-1, -2)
        z = F.conv2d(u, flipped, padding=filters.shape[-1] - 1, groups=k).sum(1, keepdim=True)
    else:  # the correlation's input gradient: faster than conv_transpose2d in float64
        size = [u.shape[0], c, *(n + m - 1 for n, m in zip(u.shape[2:], filters.shape[2:]))]
        like = u.new_empty(()).expand(size)  # only its shape is read
        z = torch.ops.aten.convolution_backward(
            u, like, filters, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, False, False]
        )[0]
    return pad_adjoint(z.contiguous(), filters.shape[-1], boundary, shape)


# --------------------------------------------------------------------------------------------
# Potentials φ_k with their first and second derivatives
# --------------------------------------------------------------------------------------------


class Potential:
    """Pixel-wise potentials φ_k(t) of responses t (B, K, H, W) and their derivatives in t.

    ``params`` are tensors (already of t's dtype and device) on which φ depends
    differentiably; ``value``, ``first`` and ``second`` are written with differentiable torch
    operations of t and ``params``, so autograd recovers derivatives in θ (and higher
    derivatives in t).

    The fused x-derivatives work in scaled variables: with per-filter scales (a_k, b_k) from
    :meth:`scales`, the correlation with the filters a_k k_k gives v = a ⊙ t directly, and
    φ_k'(t) = b_k φ̃_k'(v), φ_k''(t) = a_k b_k φ̃_k''(v), so the adjoint takes the filters
    b_k k_k and no pass over the responses multiplies by a_k or b_k. :meth:`evaluate` returns
    the energy and φ̃'(v), :meth:`curvature` φ̃''(v); the defaults are a = b = 1.
    """

    def value(self, t: Tensor, params: Sequence[Tensor]) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def first(self, t: Tensor, params: Sequence[Tensor]) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def second(self, t: Tensor, params: Sequence[Tensor]) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def scales(self, params: Sequence[Tensor]) -> tuple[Tensor | None, Tensor | None]:
        """(a, b), each of shape (K,) or None for ones (see the class docstring)."""
        return None, None

    def evaluate(self, v: Tensor, params: Sequence[Tensor]) -> tuple[Tensor, Tensor, Any]:
        """(Σ_{k,pixels} φ_k per image (B,), φ̃'(v), a state that :meth:`curvature` reuses)
        for scaled responses v. Called without autograd recording, so it may work in place
        on its own intermediates."""
        return self.value(v, params).sum(dim=(1, 2, 3)), self.first(v, params), None

    def curvature(self, v: Tensor, params: Sequence[Tensor], state: Any) -> Tensor:
        """φ̃''(v) for the state of :meth:`evaluate` (no autograd recording)."""
        return self.second(v, params)


def _memory_order(t: Tensor) -> tuple[Tensor, bool]:
    """A (B, K, H, W) tensor as the view in which its memory is contiguous, and whether that
    is the channels-last view (B, H, W, K) (a contiguous copy if it is neither)."""
    if not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1), True
    return t.contiguous(), False


def _flat(t: Tensor) -> Tensor:
    """(B, N) view of a dense (B, K, H, W) tensor in its memory order, for reductions whose
    order does not matter."""
    return _memory_order(t)[0].reshape(t.shape[0], -1)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Σ a ⊙ b per image (B,) for two tensors of one layout (one image: a BLAS dot)."""
    a, b = _flat(a), _flat(b)
    if a.shape[0] == 1:
        return torch.dot(a.view(-1), b.view(-1)).view(1)
    return torch.linalg.vecdot(a, b)


class SmoothedL1(Potential):
    """φ_k(t) = w_k (sqrt(t² + ν_k²) − ν_k); params (w, ν), each (K, 1, 1).

    φ' = w t / sqrt(t² + ν²), φ'' = w ν² / (t² + ν²)^{3/2}. Scaled: v = t/ν (a = 1/ν, b = w),
    s = sqrt(v² + 1), φ = w ν (s − 1), φ̃' = v/s, φ̃'' = s⁻³."""

    def value(self, t: Tensor, params: Sequence[Tensor]) -> Tensor:
        w, nu = params
        return w * (torch.sqrt(t * t + nu * nu) - nu)

    def first(self, t: Tensor, params: Sequence[Tensor]) -> Tensor:
        w, nu = params
        return w * t * torch.rsqrt(t * t + nu * nu)

    def second(self, t: Tensor, params: Sequence[Tensor]) -> Tensor:
        w, nu = params
        q = t * t + nu * nu
        return w * nu * nu * torch.rsqrt(q) / q

    def scales(self, params: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        w, nu = params
        return nu.reciprocal().view(-1), w.view(-1)

    def evaluate(self, v: Tensor, params: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        w, nu = params
        s = torch.addcmul(v.new_ones(()), v, v).sqrt_()  # hypot is not vectorised
        pixels = v.shape[2] * v.shape[3]
        energy = (s.sum(dim=(2, 3)) - pixels) @ (w * nu).view(-1)
        return energy, torch.div(v, s), s

    def curvature(self, v: Tensor, params: Sequence[Tensor], state: Any) -> Tensor:
        return state.reciprocal().pow_(3)


class StudentT(Potential):
    """φ_k(t) = w_k log(1 + t²/ν_k²); params (w, ν), each (K, 1, 1).

    φ' = 2 w t / (ν² + t²), φ'' = 2 w (ν² − t²) / (ν² + t²)². Scaled: v = t/ν (a = 1/ν,
    b = 2w/ν), q = 1 + v², φ = w log q, φ̃' = v/q, φ̃'' = (2 − q)/q²."""

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

    def scales(self, params: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        w, nu = params
        a = nu.reciprocal().view(-1)
        return a, 2.0 * w.view(-1) * a

    def evaluate(self, v: Tensor, params: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        w, _ = params
        q = torch.addcmul(v.new_ones(()), v, v)
        energy = q.log().sum(dim=(2, 3)) @ w.view(-1)
        return energy, torch.div(v, q), q

    def curvature(self, v: Tensor, params: Sequence[Tensor], state: Any) -> Tensor:
        return torch.rsub(state, 2.0).div_(state * state)


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
    ψ(a) = ψ(τ_j) + ½ r (ψ'(τ_j) + s), φ' = sign(t) s/β, φ'' = ψ''_j (in the units of t);
    ``value``, ``first`` and ``second`` (the θ-derivatives) evaluate these. The fused
    x-derivatives (:meth:`evaluate`) use v = β t/Δ and one lookup of the polynomial
    coefficients on the unit interval of v (no absolute value, sign or remainder passes).
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

    def scales(self, params: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        table, beta = params
        k = table.shape[1]
        return (beta / self.spacing).expand(k), (1.0 / (beta * self.spacing)).expand(k)

    def _polynomials(self, table: Tensor) -> Tensor:
        """Ψ_k(v) = ψ_k(Δ v) = P + Q v + ½ C v² on the unit intervals of v: (3, K (2M + 2))
        rows P, Q, C for v < −M, [−M, −M + 1), ..., [M − 1, M), v ≥ M (the intervals of v < 0
        mirror those of |v|)."""
        c0, c1, c2 = table.unbind(0)  # (K, M + 1) each, at τ_j = j Δ
        dx = self.spacing
        j = torch.arange(c0.shape[1], dtype=c0.dtype, device=c0.device)
        cc = c2 * dx**2
        q = c1 * dx - cc * j
        p = c0 - c1 * dx * j + 0.5 * cc * j * j
        right = torch.stack([p, q, cc])  # v in [j, j + 1)
        left = (right * right.new_tensor([1.0, -1.0, 1.0]).view(3, 1, 1)).flip(2)  # [-j-1, -j)
        return torch.cat([left, right], 2).reshape(3, -1)

    def evaluate(self, v: Tensor, params: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """v = β t/Δ: P, Q, C of each response's interval (one lookup of three planes),
        Ψ' = Q + C v, Σ Ψ = Σ P + ½ (Σ v Q + Σ v Ψ'); φ = β⁻² Ψ, φ̃' = Ψ', φ̃'' = C."""
        table, beta = params
        _, k, m1 = table.shape
        base = torch.arange(m1, m1 + 2 * m1 * k, 2 * m1, dtype=v.dtype, device=v.device)
        vm, last = _memory_order(v)  # channels-last: the per-filter offsets vary fastest
        # v + base ≥ 0 after the clamp, so the conversion's truncation is the floor
        idx = vm.clamp(-m1, m1 - 1).add_(base if last else base.view(k, 1, 1))
        planes = self._polynomials(table).index_select(1, idx.to(torch.int32).reshape(-1))
        p, q, cc = planes.view(3, *vm.shape).unbind(0)
        if last:  # back to (B, K, H, W) views, channels-last like v
            p, q, cc = (z.permute(0, 3, 1, 2) for z in (p, q, cc))
        slope = torch.addcmul(q, cc, v)
        energy = (_flat(p).sum(1) + 0.5 * (_dot(v, q) + _dot(v, slope))) / (beta * beta)
        return energy, slope, cc

    def curvature(self, v: Tensor, params: Sequence[Tensor], state: Any) -> Tensor:
        return state

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


def _scaled_filters(ridge: _Ridge) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
    """(a_k k_k, b_k k_k, params), detached: the filters of the scaled responses v = a ⊙ K x
    and of the adjoint of φ'(K x) = b ⊙ φ̃'(v) (see :class:`Potential`)."""
    w, params = ridge.detached()
    a, b = ridge.potential.scales(params)
    w_in = w if a is None else w * a.view(-1, 1, 1, 1)
    w_out = w if b is None else w * b.view(-1, 1, 1, 1)
    return w_in, w_out, params


class _Value(torch.autograd.Function):
    """x ↦ R(x) (B,): forward K x and φ; backward the fused gradient Kᵀ φ'(K x)."""

    @staticmethod
    def forward(ctx, x: Tensor, ridge: _Ridge) -> Tensor:
        w_in, w_out, params = _scaled_filters(ridge)
        v = correlate(x, w_in, ridge.boundary)
        energy, dphi, state = ridge.potential.evaluate(v, params)
        if ctx.needs_input_grad[0]:
            ctx.cache = (v, dphi, state, w_in, w_out, params)
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
        _, dphi, _, _, w_out, _ = ctx.cache
        return scale * correlate_adjoint(dphi, w_out, ridge.boundary, x.shape), None


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
    """x ↦ ∇R(x) = Kᵀ φ'(K x) from the energy's forward pass (scaled responses v, φ̃'(v), the
    potential's state, the scaled filters); backward the closed-form HVP
    Kᵀ(φ''(K x) ⊙ K u) = (b k)ᵀ(φ̃''(v) ⊙ (a k) u), φ̃''(v) computed at most once and kept
    for the next products."""

    @staticmethod
    def forward(ctx, x: Tensor, ridge: _Ridge, cache: tuple) -> Tensor:
        ctx.ridge, ctx.cache, ctx.curvature = ridge, cache, None
        ctx.save_for_backward(x)
        _, dphi, _, _, w_out, _ = cache
        return correlate_adjoint(dphi, w_out, ridge.boundary, x.shape)

    @staticmethod
    def backward(ctx, u: Tensor) -> tuple[Tensor, None, None]:
        (x,) = ctx.saved_tensors
        ridge = ctx.ridge.at(x)
        if torch.is_grad_enabled():  # create_graph: record the closed form for autograd
            curvature = ridge.potential.second(ridge.correlate(x), ridge.params)
            return ridge.adjoint(curvature * ridge.correlate(u)), None, None
        v, _, state, w_in, w_out, params = ctx.cache
        if ctx.curvature is None:
            ctx.curvature = ridge.potential.curvature(v, params, state)
        ku = correlate(u, w_in, ridge.boundary).mul_(ctx.curvature)
        return correlate_adjoint(ku, w_out, ridge.boundary, x.shape), None, None


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
