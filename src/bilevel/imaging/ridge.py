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
the filters (as a matrix-vector product with ones): ``conv_transpose2d`` from K channels to
one (oneDNN's backward-data path) is up to 5× slower. Elsewhere (float64, several image
channels, CUDA) the correlation is channel-first and the adjoint is its input gradient
(``aten.convolution_backward``), up to twice as fast as ``conv_transpose2d`` in float64 on
small crops (``benchmarks/imaging_throughput.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LogCoshSum",
    "retain_freed_memory",
    "Potential",
    "RidgeCache",
    "SmoothedL1",
    "Spline",
    "StudentT",
    "cached_ridge_energy",
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


#: From this many padded numbers on, the adjoint of reflection padding folds the margins with
#: slices (2.5–4× faster than ``aten.reflection_pad2d_backward`` on 481×321 images, slower
#: below about 8×64×64).
REFLECT_FOLD_SIZE = 1 << 16


def _fold_reflected(z: Tensor, dim: int, lo: int, hi: int) -> Tensor:
    """Adjoint of reflection padding by (lo, hi) along ``dim``: padded entry i < lo is the
    core's entry lo − i (the edge not repeated), so the margins add back mirrored."""
    n = z.shape[dim] - lo - hi
    core = z.narrow(dim, lo, n).clone()
    if lo:
        core.narrow(dim, 1, lo).add_(z.narrow(dim, 0, lo).flip(dim))
    if hi:
        core.narrow(dim, n - 1 - hi, hi).add_(z.narrow(dim, lo + n, hi).flip(dim))
    return core


def pad_adjoint(z: Tensor, filter_size: int, boundary: str, shape: Sequence[int]) -> Tensor:
    """Pᵀ z: the adjoint of :func:`pad` for images of ``shape`` (B, C, H, W)."""
    if boundary == "valid":
        return z
    lo, hi = _padding(filter_size)
    if boundary == "reflect":
        if z.numel() >= REFLECT_FOLD_SIZE:
            return _fold_reflected(_fold_reflected(z, -2, lo, hi), -1, lo, hi)
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


def correlate_adjoint(
    u: Tensor,
    filters: Tensor,
    boundary: str,
    shape: Sequence[int],
    flipped: Tensor | None = None,
) -> Tensor:
    """Kᵀ u = Pᵀ Σ_k k_k ⋆ᵀ u_k for responses u (B, K, H', W'), images of ``shape``;
    ``flipped``: ``filters.flip(-1, -2)`` if already at hand."""
    k, c = filters.shape[:2]
    if fast_layout(u) and k > 1 and c == 1:  # Σ_k of the full convolutions k_k * u_k
        u = u.contiguous(memory_format=torch.channels_last)  # no copy after correlate
        flipped = filters.flip(-1, -2) if flipped is None else flipped
        z = F.conv2d(u, flipped, padding=filters.shape[-1] - 1, groups=k)
        z = _filter_sum(z)
    else:  # the correlation's input gradient: faster than conv_transpose2d in float64
        size = [u.shape[0], c, *(n + m - 1 for n, m in zip(u.shape[2:], filters.shape[2:]))]
        like = u.new_empty(()).expand(size)  # only its shape is read
        z = torch.ops.aten.convolution_backward(
            u, like, filters, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, False, False]
        )[0]
    return pad_adjoint(z.contiguous(), filters.shape[-1], boundary, shape)


def _filter_sum(z: Tensor) -> Tensor:
    """Σ_k z_k (B, 1, H, W) of z (B, K, H, W); of channels-last z as the matrix-vector product
    of its (B H W, K) rows with ones, 1.5–1.8× faster than ``z.sum(1)``, which reduces K
    contiguous numbers per pixel without vectorising (``benchmarks/imaging_throughput.py``)."""
    b, k, h, w = z.shape
    if not z.is_contiguous(memory_format=torch.channels_last):
        return z.sum(1, keepdim=True)
    return torch.mv(z.permute(0, 2, 3, 1).reshape(-1, k), z.new_ones(k)).view(b, 1, h, w)


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
    :meth:`prepare` computes, once per θ, what :meth:`evaluate` needs besides v (weights,
    lookup tables); the x-path caches it with the scaled filters.
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

    def prepare(self, params: Sequence[Tensor]) -> Any:
        """What :meth:`evaluate` needs of the (detached) params, computed once per θ."""
        return None

    def evaluate(
        self, v: Tensor, params: Sequence[Tensor], prepared: Any = None
    ) -> tuple[Tensor, Tensor, Any]:
        """(Σ_{k,pixels} φ_k per image (B,), φ̃'(v), a state that :meth:`curvature` reuses)
        for scaled responses v; ``prepared``: :meth:`prepare`'s result (computed if None).
        Called without autograd recording, so it may work in place on its own
        intermediates."""
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

    def prepare(self, params: Sequence[Tensor]) -> Tensor:
        w, nu = params
        return (w * nu).view(-1)

    def evaluate(
        self, v: Tensor, params: Sequence[Tensor], prepared: Any = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        weights = self.prepare(params) if prepared is None else prepared  # w_k ν_k
        s = torch.addcmul(v.new_ones(()), v, v).sqrt_()  # hypot is not vectorised
        pixels = v.shape[2] * v.shape[3]
        energy = (s.sum(dim=(2, 3)) - pixels) @ weights
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

    def prepare(self, params: Sequence[Tensor]) -> Tensor:
        return params[0].reshape(-1)

    def evaluate(
        self, v: Tensor, params: Sequence[Tensor], prepared: Any = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        weights = self.prepare(params) if prepared is None else prepared
        q = torch.addcmul(v.new_ones(()), v, v)
        energy = q.log().sum(dim=(2, 3)) @ weights
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

    def prepare(self, params: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """(the planes of :meth:`_polynomials`, the offsets m1 (2 k + 1) of filter k's
        intervals, β⁻²)."""
        table, beta = params
        _, k, m1 = table.shape
        base = torch.arange(m1, m1 + 2 * m1 * k, 2 * m1, dtype=table.dtype, device=table.device)
        return self._polynomials(table), base, (beta * beta).reciprocal()

    def evaluate(
        self, v: Tensor, params: Sequence[Tensor], prepared: Any = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """v = β t/Δ: P, Q, C of each response's interval (one lookup of three planes),
        Ψ' = Q + C v, Σ Ψ = Σ P + ½ (Σ v Q + Σ v Ψ'); φ = β⁻² Ψ, φ̃' = Ψ', φ̃'' = C."""
        polynomials, base, scale = self.prepare(params) if prepared is None else prepared
        m1 = params[0].shape[2]
        vm, last = _memory_order(v)  # channels-last: the per-filter offsets vary fastest
        # v + base ≥ 0 after the clamp, so the conversion's truncation is the floor
        idx = vm.clamp(-m1, m1 - 1).add_(base if last else base.view(-1, 1, 1))
        planes = polynomials.index_select(1, idx.to(torch.int32).reshape(-1))
        p, q, cc = planes.view(3, *vm.shape).unbind(0)
        if last:  # back to (B, K, H, W) views, channels-last like v
            p, q, cc = (z.permute(0, 3, 1, 2) for z in (p, q, cc))
        slope = torch.addcmul(q, cc, v)
        energy = (_flat(p).sum(1) + 0.5 * (_dot(v, q) + _dot(v, slope))) * scale
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


#: What a ridge energy is made of at one θ: (filters (K, C, s, s), potential parameters,
#: potential, boundary), the tensors in the dtype and device of x.
Terms = tuple[Tensor, Sequence[Tensor], Potential, str]


class XPath(NamedTuple):
    """What the x-derivatives of a ridge energy need at one θ, detached: the filters a_k k_k
    of the scaled responses v = a ⊙ K x, the filters b_k k_k of the adjoint and the same
    flipped (the depthwise adjoint's, channels-last layout only, else None), the potential's
    parameters and :meth:`Potential.prepare`'s result (see :class:`Potential`)."""

    w_in: Tensor
    w_out: Tensor
    flipped: Tensor | None
    params: tuple[Tensor, ...]
    prepared: Any
    potential: Potential
    boundary: str


def x_path(filters: Tensor, params: Sequence[Tensor], potential: Potential, boundary: str) -> XPath:
    """The :class:`XPath` of these terms (no autograd recording)."""
    with torch.no_grad():
        w, params = filters.detach(), tuple(p.detach() for p in params)
        a, b = potential.scales(params)
        w_in = w if a is None else w * a.view(-1, 1, 1, 1)
        w_out = w if b is None else w * b.view(-1, 1, 1, 1)
        flipped = w_out.flip(-1, -2) if fast_layout(w) and w.shape[1] == 1 else None
        return XPath(w_in, w_out, flipped, params, potential.prepare(params), potential, boundary)


class RidgeCache:
    """The :class:`XPath` of a ridge energy at the last θ it was asked for, reused while θ has
    the same values (compared with a copy kept here, so that changes through ``.data`` or
    ``torch.no_grad`` count too), x the same dtype and device, and ``config`` (the plain
    settings the terms depend on besides θ, such as the boundary) the same. θ must hold
    every tensor the terms depend on. Only on the CPU: elsewhere the comparison would wait
    for the device (a host synchronisation per evaluation), so the x-path is made at every
    evaluation."""

    __slots__ = ("key", "values", "path")

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.values: tuple[Tensor, ...] = ()
        self.path: XPath | None = None

    def get(self, theta: tuple[Tensor, ...], like: Tensor, build: Any, config: tuple = ()) -> XPath:
        """The x-path at θ for x like ``like``; ``build(like)`` makes the terms on a miss."""
        if like.device.type != "cpu" or any(t.device.type != "cpu" for t in theta):
            with torch.no_grad():
                return x_path(*build(like))
        key = (like.dtype, config, *((t.dtype, t.shape) for t in theta))
        if (
            self.path is None
            or key != self.key
            or not all(torch.equal(a, b) for a, b in zip(theta, self.values))
        ):
            with torch.no_grad():
                path = x_path(*build(like))
            self.key, self.path = key, path
            self.values = tuple(t.detach().clone() for t in theta)
        return self.path


class _Ridge:
    """What a ridge energy depends on besides x: the tensors θ (with their autograd history;
    deliberately not autograd inputs of the x-path nodes) and their versions when the energy
    was evaluated, ``build`` (x-like tensor ↦ the terms made from θ, with autograd recording:
    called only for θ-derivatives and for backward passes that record a graph), the detached
    :class:`XPath`, and the point x at which θ-derivatives are taken."""

    __slots__ = ("theta", "versions", "build", "path", "x")

    def __init__(
        self, theta: tuple[Tensor, ...], build: Any, path: XPath, x: Tensor, versions=None
    ) -> None:
        self.theta, self.build, self.path, self.x = theta, build, path, x
        self.versions = tuple(t._version for t in theta) if versions is None else versions

    def at(self, x: Tensor) -> _Ridge:
        return _Ridge(self.theta, self.build, self.path, x, self.versions)

    def requires_grad(self) -> bool:
        return any(p.requires_grad for p in self.theta)

    def terms(self) -> Terms:
        """The terms made from θ with autograd recording (a graph of their own each time, which
        one backward pass may free); θ must not have been modified in place since."""
        if any(t._version != v for t, v in zip(self.theta, self.versions)):
            raise RuntimeError(
                "a tensor of the ridge energy's θ was modified in place after the energy was "
                "evaluated; its derivatives need the values it was evaluated with"
            )
        with torch.enable_grad():
            return self.build(self.x)


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
        path = ridge.path
        v = correlate(x, path.w_in, path.boundary)
        energy, dphi, state = path.potential.evaluate(v, path.params, path.prepared)
        if ctx.needs_input_grad[0]:
            ctx.cache = (v, dphi, state)
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
        path = ridge.path
        g = correlate_adjoint(ctx.cache[1], path.w_out, path.boundary, x.shape, path.flipped)
        return scale * g, None


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
            filters, params, potential, boundary = ridge.terms()
            x = ridge.x if create else ridge.x.detach()
            phi = potential.value(correlate(x, filters, boundary), params)
            out = (phi.sum(dim=(1, 2, 3)) * grad_out).sum()
            return (None, *_theta_grads(out, ridge.theta, create))


class _Gradient(torch.autograd.Function):
    """x ↦ ∇R(x) = Kᵀ φ'(K x) from the energy's forward pass (scaled responses v, φ̃'(v), the
    potential's state); backward the closed-form HVP
    Kᵀ(φ''(K x) ⊙ K u) = (b k)ᵀ(φ̃''(v) ⊙ (a k) u), φ̃''(v) computed at most once and kept
    for the next products."""

    @staticmethod
    def forward(ctx, x: Tensor, ridge: _Ridge, cache: tuple) -> Tensor:
        ctx.ridge, ctx.cache, ctx.curvature = ridge, cache, None
        ctx.save_for_backward(x)
        path = ridge.path
        return correlate_adjoint(cache[1], path.w_out, path.boundary, x.shape, path.flipped)

    @staticmethod
    def backward(ctx, u: Tensor) -> tuple[Tensor, None, None]:
        (x,) = ctx.saved_tensors
        ridge = ctx.ridge.at(x)
        if torch.is_grad_enabled():  # create_graph: record the closed form for autograd
            filters, params, potential, boundary = ridge.terms()
            curvature = potential.second(correlate(x, filters, boundary), params)
            hu = correlate_adjoint(
                curvature * correlate(u, filters, boundary), filters, boundary, x.shape
            )
            return hu, None, None
        path = ridge.path
        if ctx.curvature is None:
            v, _, state = ctx.cache
            ctx.curvature = path.potential.curvature(v, path.params, state)
        ku = correlate(u, path.w_in, path.boundary).mul_(ctx.curvature)
        return (
            correlate_adjoint(ku, path.w_out, path.boundary, x.shape, path.flipped),
            None,
            None,
        )


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
            filters, params, potential, boundary = ridge.terms()
            x = ridge.x if create else ridge.x.detach()
            dphi = potential.first(correlate(x, filters, boundary), params)
            out = (dphi * correlate(q if create else q.detach(), filters, boundary)).sum()
            return (None, *_theta_grads(out, ridge.theta, create))


def ridge_gradient(x: Tensor, ridge: _Ridge, cache: tuple) -> Tensor:
    """∇R(x) as a differentiable tensor (x-path and θ-path nodes) from the energy's cache."""
    g = _Gradient.apply(x, ridge, cache)
    if ridge.requires_grad():
        g = g + _GradientTheta.apply(ridge, *ridge.theta)
    return g


def _energy(x: Tensor, ridge: _Ridge) -> Tensor:
    value = _Value.apply(x, ridge)
    if torch.is_grad_enabled() and ridge.requires_grad():
        value = value + _ValueTheta.apply(ridge, *ridge.theta)
    return value


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
    params = tuple(params)
    terms = (filters, params, potential, boundary)
    ridge = _Ridge((filters, *params), lambda like: terms, x_path(*terms), x)
    return _energy(x, ridge)


def cached_ridge_energy(
    x: Tensor, theta: tuple[Tensor, ...], build: Any, cache: RidgeCache, config: tuple = ()
) -> Tensor:
    """R(x) as :func:`ridge_energy` for the terms ``build(like)`` makes from the tensors θ
    (with autograd recording, in the dtype and device of ``like``), with the x-path of
    ``cache`` (built again only when θ or ``config`` changed; see :class:`RidgeCache`): while
    they stay the same, an evaluation makes neither the terms nor their autograd graph.
    θ-derivatives (taken with respect to the tensors θ) and backward passes that record a
    graph call ``build`` once per evaluation."""
    ridge = _Ridge(theta, build, cache.get(theta, x, build, config), x)
    return _energy(x, ridge)
