"""A Fourier preconditioner for image reconstruction with a ridge regulariser.

The energy h(x) = ½‖A x − y‖² + R(x) + (γ/2)‖x‖² with a ridge regulariser
R(x) = Σ_k Σ_pixels φ_k((K_k x)_pixel) has the Hessian

    ∇²h(x) = AᵀA + γ I + Σ_k K_kᵀ diag(φ_k''(K_k x)) K_k.

Replacing each curvature map φ_k''(K_k x) by its mean c_k over the pixels, and AᵀA by a
translation-invariant model (I for denoising, the blur's own TᵀT for a convolution, the mean
of m² times I for a mask m), gives an approximation that the discrete Fourier transform
diagonalises (up to the boundary). Its inverse is a cheap approximate inverse Hessian, the
initial matrix of a preconditioned L-BFGS (:class:`bilevel.lower.LBFGS`'s ``preconditioner``):
on full-size BSDS300 images it takes ``bilevel reconstruct`` about half the gradients for
denoising and a third for deblurring (``docs/benchmarks_imaging_throughput.md``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from bilevel.imaging.operators import Identity
from bilevel.imaging.ridge import correlate
from bilevel.problem import BilevelError

__all__ = [
    "FourierPreconditioner",
    "fft_size",
    "mean_curvatures",
    "RidgePreconditioning",
    "operator_model",
    "ridge_preconditioner",
]


def fft_size(n: int) -> int:
    """The smallest integer ≥ n whose only prime factors are 2, 3 and 5 (a fast FFT length)."""
    if n < 1:
        raise BilevelError(f"an FFT length must be positive, got {n}")
    m = n
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 1


class FourierPreconditioner:
    """P = Eᵀ (a I + Σ_k c_k T_kᴴT_k)⁻¹ E, applied to images (B, C, H, W) by FFT.

    E embeds an H×W image in the top-left corner of a zero grid of Hp×Wp pixels (Hp ≥ H + s − 1
    and Wp ≥ W + s − 1, 5-smooth: the periodic correlations do not wrap around the image), and
    T_k is the periodic correlation of C-channel grid images with the filter w_k (C, s, s),
    T_k v = Σ_c w_{k,c} ⋆ v_c. Per frequency ω, (a I + Σ_k c_k T_kᴴT_k) is the C×C Hermitian
    matrix a I + Σ_k c_k ŵ_k(ω) ŵ_k(ω)ᴴ (for C = 1 the number a + Σ_k c_k |ŵ_k(ω)|²), inverted
    once at construction. With a > 0 and c ≥ 0, P is symmetric positive definite with
    eigenvalues in (0, 1/a]; it approximates the inverse Hessian of (a/2)‖x‖² + Σ_k φ_k(K_k x)
    when c_k is a typical φ_k'' (:func:`mean_curvatures`).

    Args:
        filters: w (K, C, s, s) (or (K, C, s₁, s₂)).
        curvatures: c (K,), ≥ 0.
        shape: (H, W) of the images.
        data_curvature: a > 0 (the data term's curvature, 1 + γ for denoising).
    """

    def __init__(
        self,
        filters: Tensor,
        curvatures: Tensor,
        shape: Sequence[int],
        data_curvature: float = 1.0,
    ) -> None:
        if filters.dim() != 4:
            raise BilevelError(f"filters must be (K, C, s, s), got shape {tuple(filters.shape)}")
        k, c = filters.shape[:2]
        curvatures = torch.as_tensor(curvatures).detach()
        ok = tuple(curvatures.shape) == (k,) and bool(
            ((curvatures >= 0) & torch.isfinite(curvatures)).all()
        )
        if not ok:
            raise BilevelError(f"curvatures must be {k} finite non-negative numbers")
        a = float(data_curvature)
        if not a > 0 or a == float("inf"):
            raise BilevelError(f"data_curvature must be positive and finite, got {a}")
        h, w = (int(n) for n in shape)
        self.shape = (h, w)
        self.channels = c
        self.grid = (fft_size(h + filters.shape[2] - 1), fft_size(w + filters.shape[3] - 1))
        hat = torch.fft.rfft2(filters.detach(), s=self.grid)  # (K, C, Hp, Wp/2 + 1)
        self._weights = torch.full((hat.shape[-1],), 2.0, dtype=filters.dtype)  # Parseval's
        self._weights[0] = 1.0
        if self.grid[1] % 2 == 0:
            self._weights[-1] = 1.0
        cw = curvatures.to(dtype=filters.dtype, device=hat.device).view(k, 1, 1, 1)
        if c == 1:  # 1 / (a + Σ_k c_k |ŵ_k|²)
            self.inverse = (a + (cw * hat.abs().square()).sum(0)[0]).reciprocal()
        else:  # (a I + Σ_k c_k ŵ_k ŵ_kᴴ)⁻¹ per frequency, (Hp, Wp/2 + 1, C, C)
            hat = hat.permute(2, 3, 0, 1)  # (Hp, Wq, K, C)
            gram = torch.einsum("...kc,...kd->...cd", cw.view(k, 1) * hat, hat.conj())
            eye = torch.eye(c, dtype=gram.dtype, device=gram.device)
            self.inverse = torch.linalg.inv(a * eye + gram)

    def __call__(self, v: Tensor) -> Tensor:
        """P v for images v (B, C, H, W)."""
        self._check(v)
        z = self._apply_inverse(torch.fft.rfft2(v, s=self.grid))
        h, w = self.shape
        return torch.fft.irfft2(z, s=self.grid)[..., :h, :w]

    def quadratic_form(self, v: Tensor) -> Tensor:
        """vᵀP v per image (B,), by Parseval's identity on the half spectrum of ``rfft2``
        (one forward transform): (1/N) Σ_ω m_ω Re(v̂ᴴ (a I + M(ω))⁻¹ v̂), N = Hp·Wp, with
        m_ω = 1 for the columns that are their own mirror image (0 and, for even Wp, Wp/2)
        and 2 for the others, which stand for two frequencies each."""
        self._check(v)
        z = torch.fft.rfft2(v, s=self.grid)
        if self.channels == 1:
            inverse = self.inverse.to(device=z.device, dtype=z.real.dtype)
            density = z.abs().square_()[:, 0] * inverse  # (B, Hp, Wq)
        else:
            density = (z.conj() * self._apply_inverse(z)).real.sum(1)
        weights = self._weights.to(device=v.device, dtype=density.dtype)
        return (density * weights).sum(dim=(1, 2)) / (self.grid[0] * self.grid[1])

    def _check(self, v: Tensor) -> None:
        if v.dim() != 4 or tuple(v.shape[1:]) != (self.channels, *self.shape):
            raise BilevelError(
                f"the preconditioner is for images of shape {(self.channels, *self.shape)}, "
                f"got {tuple(v.shape)}"
            )

    def _apply_inverse(self, z: Tensor) -> Tensor:
        """(a I + M(ω))⁻¹ ẑ(ω) at every frequency of spectra z (B, C, Hp, Wq)."""
        dtype = z.dtype if self.inverse.is_complex() else z.real.dtype
        inverse = self.inverse.to(device=z.device, dtype=dtype)
        if self.channels == 1:
            return z * inverse
        return torch.einsum("...cd,b...d->b...c", inverse, z.movedim(1, -1)).movedim(-1, 1)


@torch.no_grad()
def mean_curvatures(regulariser, x: Tensor) -> tuple[Tensor, Tensor] | None:
    """(filters w (K, C, s, s), c (K,)) of a ridge regulariser at images x (B, C, H, W):
    c_k = max(0, mean over the images and pixels of φ_k''((K_k x)_pixel)), the curvature of a
    translation-invariant quadratic model of R around x (∇²R(x) = Σ_k K_kᵀ diag(φ_k''(K_k x))
    K_k). None when the regulariser is not a ridge energy (``ridge_terms``)."""
    terms = regulariser.ridge_terms(x) if hasattr(regulariser, "ridge_terms") else None
    if terms is None:
        return None
    filters, params, potential, boundary = terms
    (c, s1, s2), shape = filters.shape[1:], tuple(x.shape)
    if x.dim() != 4 or shape[1] != c or shape[2] < s1 or shape[3] < s2:
        raise BilevelError(
            f"images must be (B, {c}, H, W) of at least {s1}×{s2} pixels, got shape {shape}"
        )
    params = tuple(p.detach() for p in params)
    second = potential.second(correlate(x, filters.detach(), boundary), params)
    return filters.detach(), second.mean(dim=(0, 2, 3)).clamp_min(0.0)


def operator_model(
    operator, gamma: float, like: Tensor
) -> tuple[float, Tensor | None, Tensor | None] | None:
    """The translation-invariant model a I + Σ_j d_j T_jᴴT_j of AᵀA + γ I, as (a, filters
    (J, C, s, s) or None, d (J,) or None) for images like ``like`` (B, C, H, W):

    * the identity: a = 1 + γ;
    * a :class:`~bilevel.imaging.operators.Convolution` A x = k * x per channel: a = γ and,
      per channel c, the correlation with the flipped kernel on channel c (d = 1), exact up to
      the boundary;
    * a stored inpainting mask or learnable sampling pattern m (A x = m ⊙ x): a = mean(m²) + γ.

    None for any other operator (or a mask passed per call), or when a ≤ 0."""
    from bilevel.imaging.operators import Convolution, InpaintingMask, LearnableMask

    filters = weights = None
    if isinstance(operator, Identity):
        a = 1.0 + gamma
    elif isinstance(operator, Convolution):
        a, channels = gamma, like.shape[1]
        kernel = operator.kernel.detach().to(like.dtype).flip(0, 1)
        filters = like.new_zeros(channels, channels, *kernel.shape)
        filters[range(channels), range(channels)] = kernel
        weights = like.new_ones(channels)
    elif isinstance(operator, LearnableMask | InpaintingMask):
        if isinstance(operator, InpaintingMask) and operator.mask is None:
            return None
        with torch.no_grad():
            a = float(operator.normal(torch.ones_like(like)).mean()) + gamma
    else:
        return None
    return (a, filters, weights) if a > 0 else None


def _centre(filters: Tensor, size: tuple[int, int]) -> Tensor:
    """``filters`` zero-padded to ``size``, the original in the middle (odd growth: at the
    end); the moduli of their transforms are unchanged."""
    dh, dw = size[0] - filters.shape[2], size[1] - filters.shape[3]
    return F.pad(filters, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))


def ridge_preconditioner(problem, x: Tensor) -> FourierPreconditioner | None:
    """The :class:`FourierPreconditioner` of a reconstruction problem made by
    :func:`~bilevel.imaging.tasks.reconstruction_problem` with a ridge regulariser: its
    curvatures c from :func:`mean_curvatures` at the start x, the data term's model from
    :func:`operator_model` (denoising, deblurring, inpainting); None for other operators or
    regularisers."""
    from bilevel.imaging.tasks import ReconstructionProblem  # it imports this module

    if not isinstance(problem, ReconstructionProblem):
        return None
    model = operator_model(problem.theta["operator"], problem.gamma, x)
    if model is None:
        return None
    found = mean_curvatures(problem.theta["regulariser"], x)
    if found is None:
        return None
    (a, blur, ones), (filters, curvatures) = model, found
    if blur is not None:
        size = tuple(max(m, n) for m, n in zip(filters.shape[2:], blur.shape[2:]))
        filters = torch.cat([_centre(filters, size), _centre(blur.to(filters.dtype), size)])
        curvatures = torch.cat([curvatures, ones.to(curvatures.dtype)])
    return FourierPreconditioner(filters, curvatures, x.shape[-2:], a)


class RidgePreconditioning:
    """``LBFGS(preconditioner=RidgePreconditioning())``: each solve builds the
    :func:`ridge_preconditioner` of its own problem at its start x0 (one correlation for the
    mean curvatures of the current θ, one FFT of the filters), so that solves inside
    training, whose θ changes at every step, are preconditioned too; solves that none
    applies to run plain L-BFGS."""

    def build(self, lower, x0: Tensor) -> FourierPreconditioner | None:
        """The preconditioner of ``lower.problem`` at x0 (a batch of images), or None."""
        return ridge_preconditioner(lower.problem, x0)

    def __repr__(self) -> str:
        return "RidgePreconditioning()"
