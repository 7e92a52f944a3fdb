"""Learnable image regularisers R_θ(x): energies with one value per image.

Every regulariser maps a batch ``x`` of shape (B, C, H, W) (values on the [0, 1] scale) to its
energies, shape (B,), and is twice differentiable in x (Hessian-vector products by double
backward; the ridge and Fields-of-Experts families evaluate their gradients and
Hessian-vector products in closed form through :mod:`bilevel.imaging.ridge`). Each one provides

* ``convex``: True when R_θ is convex in x for every value of θ;
* ``curvature_bound()``: an upper bound on the largest eigenvalue of ∇²R_θ(x) over all x (a
  Lipschitz constant of ∇R_θ), evaluated at the current θ, or ``None`` when none is known;
* ``weak_convexity_bound()``: ρ ≥ 0 with ∇²R_θ(x) ⪰ −ρ I for every x and every admissible θ
  (0 for convex models, ``None`` when unknown): ½‖Ax − y‖² + R_θ(x) is then (s² − ρ)-strongly
  convex when σ_min(A) ≥ s, the margin ``reconstruction_problem`` uses as μ.

Constraints on θ (zero-mean filters, non-negative weights) hold by construction, for any stored
values, so that unconstrained optimisers apply without a projection.

Parameters may be float32 while x is float64: they are cast to the dtype and device of x.
Learned filters are applied to the reflect-padded image by default (``boundary="reflect"``: H×W
responses, borders regularised like the interior) or as "valid" correlations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bilevel.imaging.ridge import (
    BOUNDARIES,
    LogCoshSum,
    Potential,
    RidgeCache,
    SmoothedL1,
    Spline,
    StudentT,
    cached_ridge_energy,
    correlate,
)
from bilevel.problem import BilevelError

__all__ = [
    "Regulariser",
    "SmoothedTV",
    "FieldsOfExperts",
    "ConvexRidge",
    "ConvexRidgeNetwork",
    "WeaklyConvexRidge",
    "InputConvexNetwork",
    "RidgeTerms",
    "ridge_layers",
]


class RidgeTerms(NamedTuple):
    """A ridge energy R(x) = Σ_k Σ_pixels φ_k((K_k x)_pixel) (:mod:`bilevel.imaging.ridge`):
    the filters of K (K, C, s, s), the potentials' parameters, the potentials and the
    boundary, in the order of :func:`~bilevel.imaging.ridge.ridge_energy`'s arguments."""

    filters: Tensor
    params: tuple[Tensor, ...]
    potential: Potential
    boundary: str


class Regulariser(nn.Module):
    """Base class: ``forward(x) -> (B,)``, ``convex``, ``curvature_bound()``."""

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def convex(self) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def curvature_bound(self) -> float | None:
        """Upper bound on λ_max(∇²R(x)) over all x, at the current θ; None if unknown."""
        return None

    def weak_convexity_bound(self) -> float | None:
        """ρ with ∇²R(x) ⪰ −ρ I for all x and all admissible θ: 0 if convex, else None."""
        return 0.0 if self.convex else None

    def ridge_terms(self, like: Tensor) -> RidgeTerms | None:
        """R as a ridge energy, its tensors in the dtype and device of ``like`` (with their
        autograd history in θ); None when R is not one."""
        return None

    def _ridge_energy(self, x: Tensor) -> Tensor:
        """R(x) of a ridge regulariser (:func:`~bilevel.imaging.ridge.cached_ridge_energy`):
        θ is the module's parameters and buffers as they are now (those given to
        ``torch.func.functional_call`` inside it), the x-path cached per θ and per the
        module's plain settings (boundary, potential, knot spacing, ...)."""
        theta = tuple(t for _, t in _tensors(self))
        cache = self.__dict__.get("_ridge_cache")
        if cache is None:
            cache = self.__dict__["_ridge_cache"] = RidgeCache()
        config = tuple(
            (k, v)
            for k, v in self.__dict__.items()
            if not k.startswith("_") and isinstance(v, (str, int, float, tuple, type(None)))
        )
        build = partial(self._ridge_terms_at, theta)
        return cached_ridge_energy(x, theta, build, cache, config)

    def _ridge_terms_at(self, theta: tuple[Tensor, ...], like: Tensor) -> RidgeTerms:
        """:meth:`ridge_terms` with the parameters and buffers θ (those of an earlier call,
        which ``functional_call`` may have swapped in for that call only)."""
        now = _tensors(self)
        if len(now) == len(theta) and all(a is b for (_, a), b in zip(now, theta)):
            return self.ridge_terms(like)
        swapped = {f"module.{n}": t for (n, _), t in zip(now, theta)}
        return torch.func.functional_call(_TermsOf(self), swapped, (like,))


def _tensors(module: nn.Module, prefix: str = "") -> list[tuple[str, Tensor]]:
    """(name, tensor) of the module's parameters and buffers, its own first, then those of
    its submodules in order: ``named_parameters`` and ``named_buffers`` without their
    generators and duplicate checks (a few microseconds per evaluation)."""
    out = [(prefix + n, t) for n, t in module._parameters.items() if t is not None]
    out += [(prefix + n, t) for n, t in module._buffers.items() if t is not None]
    for name, sub in module._modules.items():
        if sub is not None:
            out += _tensors(sub, f"{prefix}{name}.")
    return out


class _TermsOf(nn.Module):
    """``forward(like)`` = ``module.ridge_terms(like)``, for ``functional_call``."""

    def __init__(self, module: Regulariser) -> None:
        super().__init__()
        self.module = module

    def forward(self, like: Tensor) -> RidgeTerms:
        return self.module.ridge_terms(like)


_SMOOTHED_L1 = SmoothedL1()
_STUDENT_T = StudentT()
_LOG_COSH = LogCoshSum()


def _check_image(x: Tensor, channels: int | None = None, min_size: int = 1) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise BilevelError(f"x must be a batch of images of shape (B, C, H, W); got {shape}")
    if channels is not None and x.shape[1] != channels:
        raise BilevelError(f"regulariser expects {channels} channels, x has {x.shape[1]}")
    if x.shape[2] < min_size or x.shape[3] < min_size:
        raise BilevelError(f"images must be at least {min_size}×{min_size} pixels")


def _inv_softplus(y: Tensor) -> Tensor:
    """softplus⁻¹(y) = log(exp(y) − 1) for y > 0."""
    return y + torch.log(-torch.expm1(-y))


def _padding_gain(boundary: str) -> float:
    return 4.0 if boundary == "reflect" else 1.0


def _directional_derivatives(num_filters: int, channels: int, size: int) -> Tensor:
    """Directional derivatives cos θ_k D₁ + sin θ_k D₂, θ_k = πk/K, placed at the centre of an
    s×s window and replicated over channels (÷√C), shape (K, C, s, s).

    D₁, D₂ are the forward differences of :class:`SmoothedTV`. Since the mean of |cos| over a
    half turn is 2/π, Σ_k |cos θ_k g₁ + sin θ_k g₂| ≈ (2K/π)|g|: with K ≥ 4 directions and
    weights λπ/(2K) these filters reproduce isotropic TV of strength λ within a few per cent.
    """
    if size < 2:
        raise BilevelError("directional derivative filters need a size of at least 2")
    c = (size - 1) // 2
    theta = torch.arange(num_filters, dtype=torch.float64) * math.pi / num_filters
    f = torch.zeros(num_filters, channels, size, size, dtype=torch.float64)
    f[:, :, c, c] = (-theta.cos() - theta.sin())[:, None]
    f[:, :, c + 1, c] = theta.cos()[:, None]
    f[:, :, c, c + 1] = theta.sin()[:, None]
    return f / math.sqrt(channels)


def _check_boundary(boundary: str) -> None:
    if boundary not in BOUNDARIES:
        raise BilevelError(f"boundary must be one of {BOUNDARIES}, got {boundary!r}")


def _conv_norm_sq_bound(filters: Tensor) -> Tensor:
    """Per-filter bound on ‖K_k‖², K_k x = Σ_c k_{k,c} ⋆ x_c: Σ_c ‖k_{k,c}‖₁² (shape (K,)).

    Young's inequality gives ‖k_{k,c} ⋆ x_c‖ ≤ ‖k_{k,c}‖₁‖x_c‖; Cauchy–Schwarz over c does the rest.
    """
    return filters.abs().sum(dim=(2, 3)).pow(2).sum(dim=1)


def _filter_bank_bound(filters: Tensor, weights: Tensor) -> float:
    """Certified upper bound on λ_max(Σ_k w_k K_kᵀK_k) for filters (K, C, s₁, s₂), w ≥ 0.

    K_k x = Σ_c k_{k,c} ⋆ x_c ("valid" correlation). The operator is dominated by the
    convolution on the infinite grid, whose symbol is the C×C matrix M(ω) = Σ_k w_k k̂_k k̂_kᴴ.
    Its largest eigenvalue is sampled on an N×N frequency grid (spacing h = 2π/N); every
    vᴴM(ω)v is a trigonometric polynomial of degree n = max(s₁, s₂) − 1 per variable, so
    Bernstein's inequality bounds the supremum by max_grid λ_max(M) / (1 − n h), with
    n h ≤ 0.2. The result is also capped by Young's bound Σ_k w_k Σ_c ‖k_{k,c}‖₁².
    """
    filters = filters.detach().double()
    weights = weights.detach().double()
    young = float((weights * _conv_norm_sq_bound(filters)).sum())
    n = max(filters.shape[2], filters.shape[3]) - 1
    if n == 0:
        k = filters[:, :, 0, 0]  # (K, C)
        return float(torch.linalg.eigvalsh(torch.einsum("k,kc,kd->cd", weights, k, k))[-1])
    grid = 1 << max(4, math.ceil(math.log2(10.0 * math.pi * n)))
    spec = torch.fft.fft2(filters, s=(grid, grid))  # (K, C, N, N)
    if filters.shape[1] == 1:
        peak = float(torch.einsum("k,kxy->xy", weights, spec[:, 0].abs().square()).max())
    else:
        m = torch.einsum("k,kcxy,kdxy->xycd", weights.to(spec.dtype), spec, spec.conj())
        peak = float(torch.linalg.eigvalsh(m)[..., -1].max())
    return min(young, peak / (1.0 - 2.0 * math.pi * n / grid) * (1.0 + 1e-9))


def _conv_norm_bound(weight: Tensor) -> float:
    """‖W‖₂ ≤ sqrt(‖W‖_{1→1}‖W‖_{∞→∞}) for a multi-channel convolution (Riesz–Thorin)."""
    a = weight.abs().sum(dim=(2, 3))  # (out, in): ‖w_{o,i}‖₁
    return math.sqrt(float(a.sum(0).max()) * float(a.sum(1).max()))


_DERIVATIVE_STENCILS: tuple[tuple[tuple[float, ...], ...], ...] = (
    ((-1.0, 1.0),),  # ∂/∂column
    ((-1.0,), (1.0,)),  # ∂/∂row
    ((-1.0, 0.0), (0.0, 1.0)),  # diagonal
    ((0.0, -1.0), (1.0, 0.0)),  # anti-diagonal
    ((1.0, -2.0, 1.0),),  # ∂²/∂column²
    ((1.0,), (-2.0,), (1.0,)),  # ∂²/∂row²
    ((1.0, -1.0), (-1.0, 1.0)),  # ∂²/∂row∂column
)


def _init_filters(num_filters: int, channels: int, size: int, generator: torch.Generator) -> Tensor:
    """Deterministic zero-mean filters with unit ℓ2 norm, shape (K, C, s, s).

    The first ones are finite differences placed at the centre of the s×s window (first order
    along columns, rows and both diagonals, then second order), so that a Fields of Experts with
    smoothed-ℓ1 potentials starts close to anisotropic total variation; then 2-D DCT-II basis
    functions without the constant one, in order of increasing frequency. All are replicated
    over the channels, and a small seeded random perturbation (10 % of the norm) breaks the
    symmetry between filters and channels. Further filters are random zero-mean.
    """
    n = torch.arange(size, dtype=torch.float64)
    basis_1d = torch.cos(math.pi * (n[None, :] + 0.5) * n[:, None] / size)  # (freq, pos)
    freqs = sorted(
        ((u, v) for u in range(size) for v in range(size) if (u, v) != (0, 0)),
        key=lambda uv: (uv[0] + uv[1], max(uv), uv[0]),
    )
    templates = []
    centre = (size - 1) // 2
    for stencil in _DERIVATIVE_STENCILS:
        rows, cols = len(stencil), len(stencil[0])
        if rows > size or cols > size:
            continue
        t = torch.zeros(size, size, dtype=torch.float64)
        r0, c0 = min(centre, size - rows), min(centre, size - cols)
        t[r0 : r0 + rows, c0 : c0 + cols] = torch.tensor(stencil, dtype=torch.float64)
        templates.append(t)
    templates += [basis_1d[u][:, None] * basis_1d[v][None, :] for u, v in freqs]
    filters = torch.randn(
        num_filters, channels, size, size, generator=generator, dtype=torch.float64
    )
    filters = 0.1 * filters / filters.flatten(1).norm(dim=1)[:, None, None, None]
    m = min(num_filters, len(templates))
    if m:
        base = torch.stack(templates[:m])
        base = base / base.flatten(1).norm(dim=1)[:, None, None]
        filters[:m] += base[:, None] / math.sqrt(channels)
    filters = filters - filters.mean(dim=(1, 2, 3), keepdim=True)
    return filters / filters.flatten(1).norm(dim=1)[:, None, None, None]


# --------------------------------------------------------------------------------------------
# Total variation
# --------------------------------------------------------------------------------------------


class SmoothedTV(Regulariser):
    """Smoothed isotropic total variation, per channel:

        R(x) = λ Σ_{c,i,j} sqrt((D₁x)²_{cij} + (D₂x)²_{cij} + ν²),

    with forward differences D₁, D₂ (zero at the last row / column, i.e. Neumann boundary).
    λ = exp(log_strength) > 0 and ν = exp(log_smoothing) > 0 are learnable (``learn_smoothing``
    toggles ν). Convex; ∇²R ≤ λ‖D‖²/ν with ‖D‖² ≤ 8, so ``curvature_bound() = 8λ/ν``.
    """

    def __init__(
        self, strength: float = 0.1, smoothing: float = 0.01, learn_smoothing: bool = True
    ) -> None:
        super().__init__()
        if not strength > 0 or not smoothing > 0:
            raise BilevelError("TV strength and smoothing must be positive")
        self.log_strength = nn.Parameter(torch.tensor(math.log(strength)))
        log_nu = torch.tensor(math.log(smoothing))
        if learn_smoothing:
            self.log_smoothing = nn.Parameter(log_nu)
        else:
            self.register_buffer("log_smoothing", log_nu)

    @property
    def strength(self) -> Tensor:
        return self.log_strength.exp()

    @property
    def smoothing(self) -> Tensor:
        return self.log_smoothing.exp()

    @property
    def convex(self) -> bool:
        return True

    @staticmethod
    def gradient_field(x: Tensor) -> tuple[Tensor, Tensor]:
        """Forward differences (D₁x, D₂x) along rows and columns, zero on the last line."""
        d1 = F.pad(x[..., 1:, :] - x[..., :-1, :], (0, 0, 0, 1))
        d2 = F.pad(x[..., :, 1:] - x[..., :, :-1], (0, 1, 0, 0))
        return d1, d2

    def forward(self, x: Tensor) -> Tensor:
        _check_image(x)
        lam = self.strength.to(dtype=x.dtype, device=x.device)
        nu = self.smoothing.to(dtype=x.dtype, device=x.device)
        d1, d2 = self.gradient_field(x)
        return lam * torch.sqrt(d1 * d1 + d2 * d2 + nu * nu).sum(dim=(1, 2, 3))

    def curvature_bound(self) -> float:
        return 8.0 * float(self.strength.detach()) / float(self.smoothing.detach())


# --------------------------------------------------------------------------------------------
# Fields of Experts
# --------------------------------------------------------------------------------------------


class FieldsOfExperts(Regulariser):
    """Fields of Experts  R(x) = Σ_k exp(α_k) Σ_pixels φ((k_k ⋆ x)_pixel).

    ``filters`` k_k: (K, C, s, s), applied across all C channels ("valid" correlation); they are
    zero-mean by construction (the mean over (C, s, s) of each stored filter is subtracted in
    the forward pass). Weights exp(α_k) > 0.

    Potentials, with a smoothing ν_k > 0 per filter on the scale of filter responses of [0, 1]
    images (initially ``smoothing``; learned as log ν_k when ``learn_smoothing``):

    * ``"smoothed_l1"``: φ_k(t) = sqrt(t² + ν_k²) − ν_k, convex, φ_k'' ≤ 1/ν_k (quadratic
      for |t| ≪ ν_k, like |t| beyond);
    * ``"student_t"``:   φ_k(t) = log(1 + t²/ν_k²), non-convex, φ_k'' ≤ 2/ν_k².

    ``curvature_bound() = sup_ω λ_max(Σ_k exp(α_k) max φ_k'' k̂_k(ω) k̂_k(ω)ᴴ)`` (a certified
    bound on the symbol, at most Σ_k exp(α_k) max φ_k'' Σ_c ‖k_{k,c}‖₁²). Initial filters
    (``init``): ``"finite_differences"`` (seeded): finite differences, then DCT filters of
    increasing frequency (see ``_init_filters``); ``"directional"``: the directional
    derivatives cos θ_k D₁ + sin θ_k D₂, θ_k = πk/K, of :class:`SmoothedTV`'s differences, with
    which weights λπ/(2K) make the model smoothed isotropic TV of strength λ (K ≥ 4; K = 2 is
    anisotropic TV). Weights ``init_weight``.
    """

    def __init__(
        self,
        num_filters: int = 10,
        filter_size: int = 7,
        channels: int = 1,
        potential: str = "smoothed_l1",
        smoothing: float = 0.01,
        init_weight: float = 0.01,
        seed: int = 0,
        boundary: str = "reflect",
        learn_smoothing: bool = False,
        init: str = "finite_differences",
    ) -> None:
        super().__init__()
        _check_boundary(boundary)
        self.boundary = boundary
        if init not in ("finite_differences", "directional"):
            raise BilevelError(f"init must be 'finite_differences' or 'directional', got {init!r}")
        if potential not in ("smoothed_l1", "student_t"):
            raise BilevelError(f"potential must be 'smoothed_l1' or 'student_t', got {potential!r}")
        if not smoothing > 0 or not init_weight > 0:
            raise BilevelError("smoothing and init_weight must be positive")
        if num_filters < 1 or filter_size < 2 or channels < 1:
            raise BilevelError("need num_filters ≥ 1, filter_size ≥ 2 and channels ≥ 1")
        self.potential = potential
        self.channels = channels
        self.filter_size = filter_size
        if init == "directional":
            filters = _directional_derivatives(num_filters, channels, filter_size)
        else:
            gen = torch.Generator().manual_seed(seed)
            filters = _init_filters(num_filters, channels, filter_size, gen)
        dtype = torch.get_default_dtype()
        self.filters = nn.Parameter(filters.to(dtype))
        self.log_weights = nn.Parameter(
            torch.full((num_filters,), math.log(init_weight), dtype=dtype)
        )
        log_nu = torch.full((num_filters,), math.log(smoothing), dtype=dtype)
        if learn_smoothing:
            self.log_smoothing = nn.Parameter(log_nu)
        else:
            self.register_buffer("log_smoothing", log_nu)

    @property
    def convex(self) -> bool:
        return self.potential == "smoothed_l1"

    def effective_filters(self) -> Tensor:
        """The zero-mean filters used in the energy."""
        return self.filters - self.filters.mean(dim=(1, 2, 3), keepdim=True)

    def responses(self, x: Tensor) -> Tensor:
        """Filter responses k_k ⋆ x: (B, K, H, W) with ``boundary="reflect"``, else "valid"."""
        _check_image(x, self.channels, self.filter_size)
        filters = self.effective_filters().to(dtype=x.dtype, device=x.device)
        return correlate(x, filters, self.boundary)

    @property
    def smoothing(self) -> Tensor:
        """The per-filter smoothings ν_k, shape (K,)."""
        return self.log_smoothing.exp()

    def ridge_terms(self, like: Tensor) -> RidgeTerms:
        kw = {"dtype": like.dtype, "device": like.device}
        weights = self.log_weights.exp().to(**kw)[:, None, None]
        nu = self.smoothing.to(**kw)[:, None, None]
        potential = _SMOOTHED_L1 if self.potential == "smoothed_l1" else _STUDENT_T
        filters = self.effective_filters().to(**kw)
        return RidgeTerms(filters, (weights, nu), potential, self.boundary)

    def forward(self, x: Tensor) -> Tensor:
        _check_image(x, self.channels, self.filter_size)
        return self._ridge_energy(x)

    def curvature_bound(self) -> float:
        with torch.no_grad():
            nu = self.log_smoothing.double().exp()
            max_phi2 = 1.0 / nu if self.potential == "smoothed_l1" else 2.0 / nu**2
            w = self.log_weights.double().exp() * max_phi2
            return _filter_bank_bound(self.effective_filters(), w) * _padding_gain(self.boundary)


# --------------------------------------------------------------------------------------------
# Convex ridge regulariser
# --------------------------------------------------------------------------------------------


class ConvexRidge(Regulariser):
    """Convex ridge regulariser  R(x) = Σ_k Σ_pixels ψ_k((w_k ⋆ x)_pixel).

    Learned convex profiles ψ_k(t) = Σ_m c_{km} σ_m log cosh(t/σ_m), with coefficients
    c_{km} = softplus(ρ_{km}) > 0 and M scales σ_m log-spaced in ``scales`` (on the scale of
    filter responses of [0, 1] images). Each basis function is even, convex, ≈ t²/(2σ_m) near 0
    and ≈ |t| − σ_m log 2 far away, with second derivative sech²(t/σ_m)/σ_m ≤ 1/σ_m. Hence R is
    convex for every θ and ``curvature_bound()`` bounds λ_max(Σ_k (Σ_m c_{km}/σ_m) W_kᵀW_k)
    through the filter symbols (at most Σ_k (Σ_m c_{km}/σ_m) Σ_c ‖w_{k,c}‖₁²).
    Filters w_k: (K, C, s, s), zero-mean by construction when ``zero_mean`` (the mean of
    each stored filter is subtracted in the forward pass). Initially ψ_k(t) ≈ ``init_weight``·|t|.
    """

    def __init__(
        self,
        num_filters: int = 8,
        filter_size: int = 5,
        channels: int = 1,
        num_basis: int = 4,
        scales: tuple[float, float] = (0.005, 0.2),
        init_weight: float = 0.01,
        zero_mean: bool = True,
        seed: int = 0,
        boundary: str = "reflect",
    ) -> None:
        super().__init__()
        _check_boundary(boundary)
        self.boundary = boundary
        if num_basis < 1 or not 0 < scales[0] <= scales[1] or not init_weight > 0:
            raise BilevelError("need num_basis ≥ 1, 0 < scales[0] ≤ scales[1], init_weight > 0")
        if num_filters < 1 or filter_size < 1 or channels < 1:
            raise BilevelError("need num_filters ≥ 1, filter_size ≥ 1 and channels ≥ 1")
        self.channels = channels
        self.filter_size = filter_size
        self.zero_mean = zero_mean
        dtype = torch.get_default_dtype()
        gen = torch.Generator().manual_seed(seed)
        filters = _init_filters(num_filters, channels, filter_size, gen)
        self.filters = nn.Parameter(filters.to(dtype))
        sig = torch.logspace(math.log10(scales[0]), math.log10(scales[1]), num_basis)
        self.register_buffer("scales", sig.to(torch.float64))
        c0 = torch.full((num_filters, num_basis), init_weight / num_basis, dtype=torch.float64)
        self.raw_coefficients = nn.Parameter(_inv_softplus(c0).to(dtype))

    @property
    def convex(self) -> bool:
        return True

    def coefficients(self) -> Tensor:
        """c_{km} = softplus(ρ_{km}) > 0, shape (K, M)."""
        return F.softplus(self.raw_coefficients)

    def effective_filters(self) -> Tensor:
        if self.zero_mean:
            return self.filters - self.filters.mean(dim=(1, 2, 3), keepdim=True)
        return self.filters

    def ridge_terms(self, like: Tensor) -> RidgeTerms:
        kw = {"dtype": like.dtype, "device": like.device}
        params = (self.coefficients().to(**kw), self.scales.to(**kw))
        filters = self.effective_filters().to(**kw)
        return RidgeTerms(filters, params, _LOG_COSH, self.boundary)

    def forward(self, x: Tensor) -> Tensor:
        _check_image(x, self.channels, self.filter_size)
        return self._ridge_energy(x)

    def curvature_bound(self) -> float:
        with torch.no_grad():
            c = self.coefficients().double()
            psi2 = (c / self.scales.double()).sum(1)  # (K,) bound on ψ_k''
            bank = _filter_bank_bound(self.effective_filters(), psi2)
            return bank * _padding_gain(self.boundary)


# --------------------------------------------------------------------------------------------
# Learned ridge regularisers with spline potentials (CRR-NN, WCRR-NN)
# --------------------------------------------------------------------------------------------

#: The reference noise level σ_ref (0-1 scale) of the σ-dependent scalings.
REFERENCE_NOISE = 25.0 / 255.0


def _compose_filters(layers: Sequence[Tensor]) -> Tensor:
    """The filters of the composition of "valid" correlations with ``layers`` (first applied
    first): w_L * ⋯ * w_1 (full 2-D convolutions), shape (K_L, C, S, S), S = Σ(s_l − 1) + 1."""
    h = layers[0]
    for w in layers[1:]:
        k = w.shape[-1] - 1
        inp = F.pad(h.transpose(0, 1), (k, k, k, k))  # (C, K_{l-1}, S', S')
        h = F.conv2d(inp, w.flip(-1, -2)).transpose(0, 1)
    return h


def _spline_tables(slopes: Tensor, spacing: float) -> tuple[Tensor, Tensor, Tensor]:
    """(ψ(τ_j), ψ'(τ_j), ψ'' on [τ_j, τ_{j+1})) for j = 0..M, τ_j = j·spacing, each (K, M + 1).

    ψ is even with ψ(0) = ψ'(0) = 0 and piecewise constant ψ'' = ``slopes`` (K, M) on the M
    intervals of [0, M·spacing] and 0 beyond (ψ' constant: ψ grows linearly, like |t|).
    """
    zero = slopes.new_zeros(slopes.shape[0], 1)
    d1 = torch.cat([zero, spacing * slopes.cumsum(1)], 1)
    steps = spacing * d1[:, :-1] + 0.5 * spacing**2 * slopes
    d0 = torch.cat([zero, steps.cumsum(1)], 1)
    return d0, d1, torch.cat([slopes, zero], 1)


def _young_bound(filters: Tensor) -> Tensor:
    """Differentiable per-filter bound Σ_c ‖w_{k,c}‖₁² ≥ ‖W_k‖², shape (K,)."""
    return filters.abs().sum(dim=(2, 3)).pow(2).sum(dim=1)


def _check_noise_nodes(nodes: Sequence[float] | None) -> tuple[float, ...] | None:
    """Noise nodes σ_j (0-255 scale) as a tuple: at least two, increasing, in (0, 255)."""
    if nodes is None:
        return None
    out = tuple(float(s) for s in nodes)
    ok = len(out) >= 2 and all(0 < a < b < 255 for a, b in zip(out, out[1:]))
    if not ok:
        raise BilevelError(f"noise_nodes must be ≥ 2 increasing σ in (0, 255), got {nodes}")
    return out


def ridge_layers(support: int) -> tuple[int, int]:
    """(layers, kernel_size) whose composition has an S×S support, S = ``support``: layers of
    5×5 when 4 divides S − 1 (S = 13: three), else of 3×3 (S = 7: three)."""
    if support < 3 or support % 2 == 0:
        raise BilevelError(f"the composite filter support must be odd and ≥ 3, got {support}")
    if (support - 1) % 4 == 0:
        return (support - 1) // 4, 5
    return (support - 1) // 2, 3


class _SplineRidge(Regulariser):
    """R_σ(x) = β⁻² Σ_k Σ_pixels ψ_k(β (w_k ⋆ x)_pixel), the common part of the spline-ridge
    models; subclasses define the knot curvatures ψ_k''."""

    def __init__(
        self,
        num_filters: int,
        channels: int,
        layers: int,
        kernel_size: int,
        num_knots: int,
        knot_spacing: float,
        strength: float,
        smoothing: float,
        noise_level: float,
        boundary: str,
        noise_nodes: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        _check_boundary(boundary)
        if num_filters < 1 or channels < 1 or layers < 1 or kernel_size < 2:
            raise BilevelError("need num_filters, channels, layers ≥ 1 and kernel_size ≥ 2")
        if num_knots < 1 or not knot_spacing > 0 or not strength > 0 or not smoothing > 0:
            raise BilevelError("need num_knots ≥ 1 and positive knot_spacing, strength, smoothing")
        if not 0 < noise_level < 1:
            raise BilevelError(f"noise_level must be in (0, 1) (0-1 scale), got {noise_level}")
        self.boundary = boundary
        self.channels = channels
        self.filter_size = layers * (kernel_size - 1) + 1
        self.knot_spacing = float(knot_spacing)
        dtype = torch.get_default_dtype()
        weights = [_directional_derivatives(num_filters, channels, kernel_size)]
        centre = (kernel_size - 1) // 2
        for _ in range(layers - 1):
            w = torch.zeros(num_filters, num_filters, kernel_size, kernel_size).double()
            w[range(num_filters), range(num_filters), centre, centre] = 1.0
            weights.append(w)
        self.layers = nn.ParameterList([nn.Parameter(w.to(dtype)) for w in weights])
        # ψ⁺ = sqrt(u² + ν²) − ν: knot curvatures (ψ'(τ_{j+1}) − ψ'(τ_j)) / Δ (log-parametrised).
        tau = torch.arange(num_knots + 1, dtype=torch.float64) * knot_spacing
        d1 = tau / torch.sqrt(tau * tau + smoothing**2)
        s = ((d1[1:] - d1[:-1]) / knot_spacing).expand(num_filters, num_knots)
        self.log_slopes = nn.Parameter(s.log().to(dtype).clone())
        # log α(σ) = a₀ + a₁ z, log β(σ) = b₀ + b₁ z, z = log(σ/σ_ref) (or, with noise nodes,
        # values at the nodes z_j): the TV-like initial energy (α/β)|t| grows like σ and its
        # smoothing ν/β like σ.
        lam = strength * math.pi / (2 * num_filters)
        self.noise_nodes = _check_noise_nodes(noise_nodes)
        if self.noise_nodes is None:
            a, b = [math.log(lam), 0.0], [0.0, -1.0]
        else:
            z = [math.log(s / 255.0 / REFERENCE_NOISE) for s in self.noise_nodes]
            a, b = [math.log(lam)] * len(z), [-zj for zj in z]
        self.log_strength = nn.Parameter(torch.tensor(a, dtype=dtype))
        self.log_sharpness = nn.Parameter(torch.tensor(b, dtype=dtype))
        self.register_buffer("noise_level", torch.tensor(float(noise_level), dtype=torch.float64))

    def set_noise_level(self, sigma: float) -> _SplineRidge:
        """Use the scalings α(σ), β(σ) of noise level σ (0-1 scale)."""
        if not 0 < float(sigma) < 1:
            raise BilevelError(f"noise level must be in (0, 1) (0-1 scale), got {sigma}")
        self.noise_level.fill_(float(sigma))
        return self

    def scalings(self) -> tuple[Tensor, Tensor]:
        """(α(σ), β(σ)) at the current noise level σ."""
        log_alpha, log_beta = self.log_scalings()
        return log_alpha.exp(), log_beta.exp()

    def log_scalings(self) -> tuple[Tensor, Tensor]:
        """(log α(σ), log β(σ)): linear in z = log(σ/σ_ref), or, with noise nodes σ_j, the
        piecewise-linear interpolation in z of the values at the nodes (extrapolated linearly
        by the end segments)."""
        if self.noise_nodes is None:
            z = torch.log(self.noise_level / REFERENCE_NOISE).to(self.log_strength.dtype)
            return self.log_strength[0] + self.log_strength[1] * z, (
                self.log_sharpness[0] + self.log_sharpness[1] * z
            )
        # σ within a relative 1e-6 of a node (a float32 noise_level) is that node: t is 0 or 1
        nodes = [math.log(s / 255.0) for s in self.noise_nodes]
        u = math.log(float(self.noise_level))
        u = next((n for n in nodes if abs(n - u) < 1e-6), u)
        j = min(max(sum(n < u for n in nodes), 1), len(nodes) - 1) - 1
        t = (u - nodes[j]) / (nodes[j + 1] - nodes[j])
        # (1 − t) v_j + t v_{j+1}: exactly v_j at a node, whose neighbours get zero gradient
        return (1 - t) * self.log_strength[j] + t * self.log_strength[j + 1], (
            (1 - t) * self.log_sharpness[j] + t * self.log_sharpness[j + 1]
        )

    @torch.no_grad()
    def with_noise_nodes(self, nodes: Sequence[float]) -> _SplineRidge:
        """Switch to noise nodes σ_j (0-255 scale) with the values α(σ_j), β(σ_j) of the
        current scalings, so that the model is unchanged at the nodes (and, from log-linear
        scalings, everywhere between them)."""
        checked = _check_noise_nodes(nodes)
        level = float(self.noise_level)
        values = []
        for s in checked:
            self.set_noise_level(s / 255.0)
            values.append([float(v) for v in self.log_scalings()])
        self.set_noise_level(level)
        self.noise_nodes = checked
        dtype = self.log_strength.dtype
        self.log_strength = nn.Parameter(torch.tensor([a for a, _ in values], dtype=dtype))
        self.log_sharpness = nn.Parameter(torch.tensor([b for _, b in values], dtype=dtype))
        return self

    def effective_filters(self) -> Tensor:
        """The composite filters (K, C, S, S); the first layer is zero-mean, hence all are."""
        # list(), not a slice: slicing an nn.ParameterList re-wraps its entries as new
        # Parameters, which would cut them off from torch.func.functional_call's tensors
        head, *tail = list(self.layers)
        return _compose_filters([head - head.mean(dim=(1, 2, 3), keepdim=True), *tail])

    def knot_curvatures(self, filters: Tensor, alpha: Tensor) -> Tensor:  # pragma: no cover
        """ψ_k'' on the knot intervals in the units of the responses t, shape (K, M)."""
        raise NotImplementedError

    def ridge_terms(self, like: Tensor) -> RidgeTerms:
        filters = self.effective_filters()
        alpha, beta = self.scalings()
        kw = {"dtype": like.dtype, "device": like.device}
        curv = self.knot_curvatures(filters, alpha).to(**kw)
        beta = beta.to(**kw)
        # β⁻² ψ(β t) has second derivative ψ''(βt) in t: the knots' curvatures are in t-units.
        table = torch.stack(_spline_tables(curv, self.knot_spacing))
        potential = Spline(self.knot_spacing)
        return RidgeTerms(filters.to(**kw), (table, beta), potential, self.boundary)

    def forward(self, x: Tensor) -> Tensor:
        _check_image(x, self.channels, self.filter_size)
        return self._ridge_energy(x)

    def _bank_bound(self, per_filter: Tensor) -> float:
        filters = self.effective_filters().detach()
        return _filter_bank_bound(filters, per_filter.detach()) * _padding_gain(self.boundary)

    def curvature_bound(self) -> float:
        """G·sup_ω λ_max(Σ_k max(ψ_k'')₊ ŵ_k ŵ_kᴴ) ≥ λ_max(∇²R) (G: padding gain)."""
        with torch.no_grad():
            filters = self.effective_filters().double()
            curv = self.knot_curvatures(filters, self.scalings()[0].double())
            return self._bank_bound(curv.clamp_min(0).amax(1))

    @torch.no_grad()
    def rescale_(self, factor: float) -> _SplineRidge:
        """Multiply the convex part of the energy by ``factor`` > 0 (α ← factor·α at every σ)."""
        if self.noise_nodes is None:
            self.log_strength[0] += math.log(factor)
        else:
            self.log_strength += math.log(factor)
        return self


class ConvexRidgeNetwork(_SplineRidge):
    """Convex ridge regulariser in the style of CRR-NN (Goujon, Neumayer, Bohra, Ducotterd,
    Unser 2023):

        R_σ(x) = α(σ) β(σ)⁻² Σ_k Σ_pixels ψ_k(β(σ) (w_k ⋆ x)_pixel).

    * Filters w_k: the composition of ``layers`` multi-channel convolutions of size
      ``kernel_size`` (default 3 of 5×5: an effective 13×13 support); the first layer is
      zero-mean, so every composite filter is (constant images cost nothing).
    * Potentials ψ_k: even, convex, ψ(0) = ψ'(0) = 0, with ψ_k' a linear spline with
      ``num_knots`` knots τ_j = j·``knot_spacing`` on each side and non-decreasing (slopes
      ψ_k'' = exp(ρ_{kj}) > 0, constant beyond the last knot): ψ_k'' ≤ max_j exp(ρ_{kj}).
    * σ-dependent scalings log α(σ) = a₀ + a₁ log(σ/σ_ref), log β(σ) = b₀ + b₁ log(σ/σ_ref),
      σ_ref = 25/255 (``set_noise_level(σ)`` chooses σ), so one model serves a range of σ;
      with ``noise_nodes`` σ_j (0-255 scale) log α and log β are instead linear splines in
      log σ with learned values at the nodes (:meth:`with_noise_nodes` converts a model).

    Convex for every θ; ``curvature_bound() = G·sup_ω λ_max(Σ_k α max_j ψ_kj'' ŵ_k ŵ_kᴴ)``.
    Initialisation (deterministic): first-layer filters are directional derivatives cos θ_k D₁ +
    sin θ_k D₂ (θ_k = πk/K), later layers near identities, ψ = sqrt(u² + ν²) − ν with
    ν = ``smoothing`` and α = λπ/(2K) for λ = ``strength``: for K ≥ 4 the model starts at
    smoothed isotropic TV of strength λ (a TV-tuned λ starts it at tuned TV).
    """

    def __init__(
        self,
        num_filters: int = 16,
        channels: int = 1,
        layers: int = 3,
        kernel_size: int = 5,
        num_knots: int = 64,
        knot_spacing: float = 0.0025,
        strength: float = 0.1,
        smoothing: float = 0.004,
        noise_level: float = REFERENCE_NOISE,
        boundary: str = "reflect",
        noise_nodes: Sequence[float] | None = None,
    ) -> None:
        super().__init__(
            num_filters,
            channels,
            layers,
            kernel_size,
            num_knots,
            knot_spacing,
            strength,
            smoothing,
            noise_level,
            boundary,
            noise_nodes,
        )

    @property
    def convex(self) -> bool:
        return True

    def knot_curvatures(self, filters: Tensor, alpha: Tensor) -> Tensor:
        return alpha * self.log_slopes.exp()


class WeaklyConvexRidge(_SplineRidge):
    """Weakly convex ridge regulariser (WCRR-NN style): the model of
    :class:`ConvexRidgeNetwork` with potentials ψ_k = α ψ_k⁺ − ψ_k⁻, ψ_k⁺ the convex spline
    and ψ_k⁻ a second convex spline on the same knots with curvatures

        ψ_kj⁻'' = ρ_max a_k sigmoid(η_kj) / (G Y_k),   Y_k = Σ_c ‖w_{k,c}‖₁² ≥ ‖W_k‖²,

    a = softmax(ζ, 0)_{1..K} (Σ_k a_k < 1) and G the padding gain. Then ψ_k'' ≥ −ψ_k⁻'' and

        ∇²R(x) ⪰ −G Σ_k max_j ψ_kj⁻'' ‖W_k‖² I ⪰ −ρ_max Σ_k a_k I ≻ −ρ_max I

    for every θ and σ: R is ρ_max-weakly convex by construction (``weak_convexity_bound()``),
    so ½‖x − y‖² + R(x) is (1 − ρ_max)-strongly convex for ρ_max < 1
    (``max_weak_convexity``, in the units of the data term's Hessian). Initially ψ⁻ ≈ 0.05·ρ_max
    of its allowance (η = −3), i.e. the model starts near its convex part.
    """

    def __init__(
        self,
        num_filters: int = 16,
        channels: int = 1,
        layers: int = 3,
        kernel_size: int = 5,
        num_knots: int = 64,
        knot_spacing: float = 0.0025,
        strength: float = 0.1,
        smoothing: float = 0.004,
        max_weak_convexity: float = 0.5,
        noise_level: float = REFERENCE_NOISE,
        boundary: str = "reflect",
        noise_nodes: Sequence[float] | None = None,
    ) -> None:
        super().__init__(
            num_filters,
            channels,
            layers,
            kernel_size,
            num_knots,
            knot_spacing,
            strength,
            smoothing,
            noise_level,
            boundary,
            noise_nodes,
        )
        if not 0 < max_weak_convexity:
            raise BilevelError(f"max_weak_convexity must be positive, got {max_weak_convexity}")
        self.max_weak_convexity = float(max_weak_convexity)
        dtype = torch.get_default_dtype()
        self.concave_logits = nn.Parameter(torch.full((num_filters, num_knots), -3.0, dtype=dtype))
        self.share_logits = nn.Parameter(torch.zeros(num_filters, dtype=dtype))

    @property
    def convex(self) -> bool:
        return False

    def weak_convexity_bound(self) -> float:
        """ρ_max: ∇²R ⪰ −ρ_max I for every x, θ and σ (by construction)."""
        return self.max_weak_convexity

    def concave_curvatures(self, filters: Tensor) -> Tensor:
        """ψ_kj⁻'' (K, M), in the units of the responses t."""
        logits = torch.cat([self.share_logits, self.share_logits.new_zeros(1)])
        share = torch.softmax(logits, 0)[:-1]
        cap = self.max_weak_convexity / (_padding_gain(self.boundary) * _young_bound(filters))
        return (cap * share).to(filters.dtype)[:, None] * torch.sigmoid(self.concave_logits)

    def knot_curvatures(self, filters: Tensor, alpha: Tensor) -> Tensor:
        return alpha * self.log_slopes.exp() - self.concave_curvatures(filters)

    def current_weak_convexity_bound(self) -> float:
        """The tighter bound G·sup_ω λ_max(Σ_k max_j (−ψ_kj'')₊ ŵ_k ŵ_kᴴ) ≤ ρ_max at the
        current θ and σ."""
        with torch.no_grad():
            filters = self.effective_filters().double()
            curv = self.knot_curvatures(filters, self.scalings()[0].double())
            return self._bank_bound((-curv).clamp_min(0).amax(1))


# --------------------------------------------------------------------------------------------
# Input-convex neural network
# --------------------------------------------------------------------------------------------


class InputConvexNetwork(Regulariser):
    """Convolutional input-convex neural network (ICNN), scalar per image, convex in x:

        z₁ = σ(W₀ ⋆ x + b₀),   z_{l+1} = σ(U_l ⋆ z_l + W_l ⋆ x + b_l)  (l = 1, …, L−1),
        R(x) = Σ_pixels Σ_j a_j z_L[j],

    with σ = softplus (convex, non-decreasing, smooth; 0 < σ' < 1, σ'' ≤ 1/4), zero-padded
    "same" convolutions of odd size ``kernel_size``, unconstrained x-path weights W_l, and
    non-negative z-path weights U_l ≥ 0 and output weights a ≥ 0. Non-negativity:

    * ``positivity="clamp"`` (default): the energy uses max(U, 0) and max(a, 0), so R is convex
      for any stored values;
    * ``positivity="softplus"``: U = softplus(V), a = softplus(v).

    ``curvature_bound()`` propagates layer bounds: with P₁ = ‖W₀‖, c₁ = P₁²/4 and
    P_{l+1} = ‖U_l‖P_l + ‖W_l‖, c_{l+1} = P_{l+1}²/4 + ‖U_l‖_{1→1} c_l, λ_max(∇²R) ≤ max(a)·c_L
    (convolution norms bounded through their symbols and by sqrt(‖·‖_{1→1}‖·‖_{∞→∞})).
    The initialisation is seeded.
    """

    def __init__(
        self,
        channels: int = 1,
        hidden: int = 16,
        layers: int = 3,
        kernel_size: int = 3,
        positivity: str = "clamp",
        init_scale: float = 0.01,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if positivity not in ("clamp", "softplus"):
            raise BilevelError(f"positivity must be 'clamp' or 'softplus', got {positivity!r}")
        if layers < 1 or hidden < 1 or channels < 1 or kernel_size % 2 == 0:
            raise BilevelError("need layers ≥ 1, hidden ≥ 1, channels ≥ 1 and odd kernel_size")
        self.channels = channels
        self.positivity = positivity
        self.padding = kernel_size // 2
        dtype = torch.get_default_dtype()
        gen = torch.Generator().manual_seed(seed)
        k2 = kernel_size * kernel_size

        def randn(*shape: int) -> Tensor:
            return torch.randn(*shape, generator=gen, dtype=torch.float64)

        def positive(t: Tensor) -> nn.Parameter:
            t = _inv_softplus(t) if positivity == "softplus" else t
            return nn.Parameter(t.to(dtype))

        ks = (kernel_size, kernel_size)
        self.x_weights = nn.ParameterList(
            [
                nn.Parameter((randn(hidden, channels, *ks) / math.sqrt(channels * k2)).to(dtype))
                for _ in range(layers)
            ]
        )
        self.biases = nn.ParameterList(
            [nn.Parameter(torch.zeros(hidden, dtype=dtype)) for _ in range(layers)]
        )
        # z-path weights: positive, with fan-in sums ≈ 1 so that activations stay O(1).
        u0 = torch.rand(layers - 1, hidden, hidden, *ks, generator=gen, dtype=torch.float64)
        u0 = (u0 + 0.05) / (0.55 * hidden * k2)
        self.z_weights = nn.ParameterList([positive(u0[i]) for i in range(layers - 1)])
        self.out_weights = positive(torch.full((hidden,), init_scale / hidden, dtype=torch.float64))

    @property
    def convex(self) -> bool:
        return True

    def _nonneg(self, p: Tensor) -> Tensor:
        return p.clamp_min(0.0) if self.positivity == "clamp" else F.softplus(p)

    def forward(self, x: Tensor) -> Tensor:
        _check_image(x, self.channels)
        kw = {"dtype": x.dtype, "device": x.device}
        z = None
        for i, (w, b) in enumerate(zip(self.x_weights, self.biases)):
            u = F.conv2d(x, w.to(**kw), b.to(**kw), padding=self.padding)
            if i > 0:
                u = u + F.conv2d(
                    z, self._nonneg(self.z_weights[i - 1]).to(**kw), padding=self.padding
                )
            z = F.softplus(u)
        a = self._nonneg(self.out_weights).to(**kw)
        return torch.einsum("bjhw,j->b", z, a)

    def curvature_bound(self) -> float:
        with torch.no_grad():
            p = self._conv_norm(self.x_weights[0])
            c = p * p / 4.0
            for i in range(1, len(self.x_weights)):
                u = self._nonneg(self.z_weights[i - 1]).double()
                u_sums = u.sum(dim=(2, 3))  # (out, in), non-negative
                p = self._conv_norm(u) * p + self._conv_norm(self.x_weights[i])
                c = p * p / 4.0 + float(u_sums.sum(0).max()) * c
            return float(self._nonneg(self.out_weights).double().max()) * c

    @staticmethod
    def _conv_norm(weight: Tensor) -> float:
        """Upper bound on the 2-norm of a multi-channel convolution with weight (out, in, k, k)."""
        ones = torch.ones(weight.shape[0], dtype=torch.float64)
        return min(_conv_norm_bound(weight.double()), math.sqrt(_filter_bank_bound(weight, ones)))
