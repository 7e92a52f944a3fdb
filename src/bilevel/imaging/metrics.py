"""Image quality metrics, batched: one value per image, shape (B,)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from bilevel.problem import BilevelError

__all__ = ["psnr", "ssim", "mse"]


def _check_pair(x: Tensor, ref: Tensor) -> None:
    if not isinstance(x, Tensor) or not isinstance(ref, Tensor) or x.shape != ref.shape:
        raise BilevelError("x and ref must be tensors of the same shape (B, C, H, W)")
    if x.dim() != 4:
        raise BilevelError(f"images must have shape (B, C, H, W); got {tuple(x.shape)}")


def mse(x: Tensor, ref: Tensor) -> Tensor:
    """Mean squared error per image, shape (B,)."""
    _check_pair(x, ref)
    return (x - ref).pow(2).flatten(1).mean(1)


def psnr(x: Tensor, ref: Tensor, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio in dB per image: 10 log₁₀(data_range² / MSE), shape (B,).

    No clipping is applied to x. An exact reconstruction gives +inf.
    """
    return 10.0 * torch.log10(data_range**2 / mse(x, ref))


def _gaussian_window(sigma: float, radius: int, like: Tensor) -> Tensor:
    r = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (r / sigma) ** 2)
    return (g / g.sum()).to(dtype=like.dtype, device=like.device)


def _window_side(sigma: float) -> int:
    """Side of SSIM's Gaussian window: truncated at 3.5σ."""
    return 2 * int(3.5 * sigma + 0.5) + 1


#: Side in pixels of :func:`ssim`'s default window (σ = 1.5): the smallest image it can score.
SSIM_WINDOW = _window_side(1.5)


def ssim(
    x: Tensor,
    ref: Tensor,
    data_range: float = 1.0,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> Tensor:
    """Structural similarity per image (Wang et al. 2004), averaged over pixels and channels.

    Gaussian window of side 11 (σ = 1.5, truncated at 3.5σ and normalised), population
    (co)variances, C₁ = (k₁·data_range)², C₂ = (k₂·data_range)². The local statistics are taken
    only where the window fits inside the image ("valid"), matching
    ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=data_range, channel_axis=...)``. Shape (B,).
    """
    _check_pair(x, ref)
    size = _window_side(sigma)
    radius = size // 2
    if x.shape[2] < size or x.shape[3] < size:
        raise BilevelError(f"SSIM needs images of at least {size}×{size} pixels")
    b, c, h, w = x.shape
    g = _gaussian_window(sigma, radius, x)
    gh, gw = g.reshape(1, 1, size, 1), g.reshape(1, 1, 1, size)

    def blur(t: Tensor) -> Tensor:
        t = t.reshape(-1, 1, t.shape[-2], t.shape[-1])
        return F.conv2d(F.conv2d(t, gh), gw)

    stack = torch.cat([x, ref, x * x, ref * ref, x * ref], dim=1)  # (B, 5C, H, W)
    mu_x, mu_y, e_xx, e_yy, e_xy = blur(stack).reshape(b, 5, c, h - 2 * radius, -1).unbind(1)
    var_x = e_xx - mu_x * mu_x
    var_y = e_yy - mu_y * mu_y
    cov = e_xy - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    )
    return s.flatten(1).mean(1)
