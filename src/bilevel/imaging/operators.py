"""Linear forward operators A for imaging inverse problems, with exact adjoints.

All operators act on batches of images ``x`` of shape ``(B, C, H, W)`` and return tensors of
the same shape (the measurement space equals the image space). Buffers follow the dtype and
device of the input.

Every operator provides

* ``forward(x)``  = A x,  ``adjoint(y)`` = Aᵀ y (exact: ⟨A x, y⟩ = ⟨x, Aᵀ y⟩),
* ``normal(x)``   = AᵀA x,
* ``norm_bound()`` ≥ ‖A‖ (operator 2-norm), exact where it is cheap,
* ``norm_lower_bound()`` ≤ σ_min(A), a certified lower bound on the smallest singular value
  (0 when A may have a non-trivial kernel, or when it depends on learnable parameters),
* ``is_injective`` (``norm_lower_bound() > 0``) and ``has_kernel`` (its negation). When A may have
  a kernel, the lower-level energy ½‖A x − y‖² + R(x) needs a term γ‖x‖²/2 to be strongly convex.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bilevel.problem import BilevelError

__all__ = [
    "LinearOperator",
    "Identity",
    "Convolution",
    "InpaintingMask",
    "LearnableMask",
    "adjoint_mismatch",
    "gaussian_kernel",
    "motion_blur_kernel",
    "norm_estimate",
    "random_mask",
]


class LinearOperator(nn.Module):
    """Base class of the forward operators: A: (B, C, H, W) -> (B, C, H, W), linear."""

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def adjoint(self, y: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def normal(self, x: Tensor) -> Tensor:
        """AᵀA x."""
        return self.adjoint(self.forward(x))

    def norm_bound(self) -> float:  # pragma: no cover - abstract
        """An upper bound on the operator norm ‖A‖ (largest singular value)."""
        raise NotImplementedError

    def initial_image(self, y: Tensor) -> Tensor:
        """A starting image for reconstructions from measurements y: y itself here (the
        measurement space is the image space); operators with other measurement spaces
        return Aᵀy."""
        return y

    def norm_lower_bound(self) -> float:
        """A certified lower bound on the smallest singular value of A (0 if unknown)."""
        return 0.0

    @property
    def is_injective(self) -> bool:
        """True when injectivity is certified, i.e. ‖A x‖ ≥ c‖x‖ with c > 0 for all x."""
        return self.norm_lower_bound() > 0.0

    @property
    def has_kernel(self) -> bool:
        """True when A may have a non-trivial kernel (the lower level then needs γ > 0)."""
        return not self.is_injective


def _check_image(x: Tensor, name: str = "x") -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise BilevelError(f"{name} must be a batch of images of shape (B, C, H, W); got {shape}")


class Identity(LinearOperator):
    """A = I (denoising). ‖A‖ = σ_min(A) = 1."""

    def forward(self, x: Tensor) -> Tensor:
        return x

    def adjoint(self, y: Tensor) -> Tensor:
        return y

    def normal(self, x: Tensor) -> Tensor:
        return x

    def norm_bound(self) -> float:
        return 1.0

    def norm_lower_bound(self) -> float:
        return 1.0


def gaussian_kernel(size: int, sigma: float, dtype: torch.dtype = torch.float32) -> Tensor:
    """Normalised isotropic Gaussian blur kernel of odd side ``size`` and std ``sigma`` (pixels).

    k[i, j] ∝ exp(−(i² + j²) / (2σ²)) for i, j ∈ {−(size−1)/2, …, (size−1)/2}, Σ k = 1.
    """
    if size < 1 or size % 2 == 0:
        raise BilevelError(f"kernel size must be a positive odd integer, got {size}")
    if not sigma > 0:
        raise BilevelError(f"sigma must be positive, got {sigma}")
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2.0 * sigma**2))
    k = g[:, None] * g[None, :]
    return (k / k.sum()).to(dtype)


def motion_blur_kernel(
    length: float, angle: float, size: int | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Normalised linear motion-blur kernel: a centred segment of ``length`` pixels.

    ``angle`` is in degrees, counter-clockwise from the horizontal axis. The segment is sampled
    densely and splatted bilinearly onto the grid (anti-aliased); Σ k = 1. The side ``size``
    defaults to the smallest odd integer ≥ length + 2.
    """
    if not length > 0:
        raise BilevelError(f"motion blur length must be positive, got {length}")
    if size is None:
        size = int(math.ceil(length)) + 2
        size += 1 - size % 2
    if size % 2 == 0:
        raise BilevelError(f"kernel size must be odd, got {size}")
    c = (size - 1) / 2
    n = max(2, int(math.ceil(8 * length)))
    t = torch.linspace(-(length - 1) / 2, (length - 1) / 2, n, dtype=torch.float64)
    theta = math.radians(angle)
    px = c + t * math.cos(theta)  # column coordinate
    py = c - t * math.sin(theta)  # row coordinate (rows grow downwards)
    x0, y0 = px.floor(), py.floor()
    fx, fy = px - x0, py - y0
    k = torch.zeros(size * size, dtype=torch.float64)
    for dy, dx, w in (
        (0, 0, (1 - fy) * (1 - fx)),
        (0, 1, (1 - fy) * fx),
        (1, 0, fy * (1 - fx)),
        (1, 1, fy * fx),
    ):
        r, q = (y0 + dy).long(), (x0 + dx).long()
        inside = (r >= 0) & (r < size) & (q >= 0) & (q < size)
        k.index_add_(0, (r * size + q)[inside], w[inside])
    k = k.reshape(size, size)
    return (k / k.sum()).to(dtype)


class Convolution(LinearOperator):
    """Per-channel 2-D convolution A x = k * x with a shared odd-sized kernel (blur).

    The output has the size of the input ("same"). Boundary handling:

    * ``boundary="zero"``: x is extended by zeros outside the image; Aᵀ is the correlation
      with k of y extended by zeros (equivalently ``conv_transpose2d``), exact.
    * ``boundary="circular"``: periodic extension; Aᵀ is the circular correlation with k.

    ‖A‖ ≤ ‖k‖₁ (Young's inequality), which is attained for non-negative kernels with circular
    boundaries. Blur operators are treated as possibly non-injective (``has_kernel`` is True).
    With ``learnable=True`` the kernel is an ``nn.Parameter``.
    """

    def __init__(self, kernel: Tensor, boundary: str = "zero", learnable: bool = False) -> None:
        super().__init__()
        kernel = torch.as_tensor(kernel)
        if kernel.dim() != 2 or kernel.shape[0] % 2 == 0 or kernel.shape[1] % 2 == 0:
            raise BilevelError(
                f"kernel must be a 2-D tensor with odd sides, got shape {tuple(kernel.shape)}"
            )
        if boundary not in ("zero", "circular"):
            raise BilevelError(f"boundary must be 'zero' or 'circular', got {boundary!r}")
        self.boundary = boundary
        kernel = kernel.detach().clone().to(torch.get_default_dtype())
        if learnable:
            self.kernel = nn.Parameter(kernel)
        else:
            self.register_buffer("kernel", kernel)

    def _apply_kernel(self, x: Tensor, flip: bool) -> Tensor:
        _check_image(x)
        c = x.shape[1]
        k = self.kernel.to(dtype=x.dtype, device=x.device)
        if flip:
            k = torch.flip(k, dims=(0, 1))
        kh, kw = k.shape
        ph, pw = kh // 2, kw // 2
        weight = k.expand(c, 1, kh, kw).contiguous()
        if self.boundary == "circular":
            if ph > x.shape[2] or pw > x.shape[3]:
                raise BilevelError("circular convolution needs the kernel no larger than the image")
            x = F.pad(x, (pw, pw, ph, ph), mode="circular")
            return F.conv2d(x, weight, groups=c)
        return F.conv2d(x, weight, padding=(ph, pw), groups=c)

    def forward(self, x: Tensor) -> Tensor:
        # conv2d computes a correlation: flipping the kernel gives the convolution k * x.
        return self._apply_kernel(x, flip=True)

    def adjoint(self, y: Tensor) -> Tensor:
        return self._apply_kernel(y, flip=False)

    def norm_bound(self) -> float:
        return float(self.kernel.detach().double().abs().sum())


def _as_mask4d(mask: Tensor, name: str = "mask") -> Tensor:
    mask = torch.as_tensor(mask)
    if mask.dim() == 2:
        mask = mask[None, None]
    if mask.dim() != 4:
        raise BilevelError(
            f"{name} must have shape (H, W) or (B|1, C|1, H, W); got {tuple(mask.shape)}"
        )
    return mask


class InpaintingMask(LinearOperator):
    """A x = m ⊙ x with a fixed mask m ∈ [0, 1] (1 = observed pixel, 0 = missing).

    ``mask`` has shape (H, W) or (B|1, C|1, H, W) and broadcasts against x; a leading dimension
    B > 1 stores one mask per instance and then requires batches of exactly B images. Masks that
    differ per instance and must follow a batch that a solver slices can instead be passed per
    call: ``A(x, mask=m)`` with m of shape (B, 1|C, H, W) (``reconstruction_problem`` accepts
    them as a third batch entry). ‖A‖ = max|m|, σ_min(A) = min|m| (0 for a genuine mask).
    """

    def __init__(self, mask: Tensor | None = None) -> None:
        super().__init__()
        if mask is not None:
            mask = _as_mask4d(mask).detach().clone().to(torch.get_default_dtype())
            if bool((mask < 0).any()) or bool((mask > 1).any()):
                raise BilevelError("mask values must lie in [0, 1]")
        self.register_buffer("mask", mask)

    def _mask(self, x: Tensor, mask: Tensor | None) -> Tensor:
        _check_image(x)
        m = self.mask if mask is None else _as_mask4d(mask)
        if m is None:
            raise BilevelError("InpaintingMask has no stored mask: pass mask=... per call")
        if m.shape[0] not in (1, x.shape[0]):
            raise BilevelError(
                f"mask holds {m.shape[0]} per-instance masks but x has {x.shape[0]} images"
            )
        return m.to(dtype=x.dtype, device=x.device)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return self._mask(x, mask) * x

    def adjoint(self, y: Tensor, mask: Tensor | None = None) -> Tensor:
        return self._mask(y, mask) * y

    def normal(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        m = self._mask(x, mask)
        return m * m * x

    def norm_bound(self) -> float:
        return 1.0 if self.mask is None else float(self.mask.abs().max())

    def norm_lower_bound(self) -> float:
        return 0.0 if self.mask is None else float(self.mask.abs().min())


def random_mask(
    shape: Sequence[int],
    keep: float,
    generator: torch.Generator | int | None = 0,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """A random 0/1 mask of the given shape keeping each pixel with probability ``keep``.

    Seeded (``generator`` is a ``torch.Generator`` or an integer seed), hence deterministic.
    """
    if not 0.0 <= keep <= 1.0:
        raise BilevelError(f"keep must lie in [0, 1], got {keep}")
    if not isinstance(generator, torch.Generator):
        generator = torch.Generator().manual_seed(0 if generator is None else int(generator))
    u = torch.rand(tuple(shape), generator=generator, dtype=torch.float64)
    return (u < keep).to(dtype)


class LearnableMask(LinearOperator):
    """Learnable sampling pattern A x = w ⊙ x with w = sigmoid(logits) ∈ (0, 1).

    ``shape`` is (H, W) or (1, C|1, H, W) (one pattern shared by all instances); ``init`` is the
    initial weight w ∈ (0, 1) (a float or a tensor broadcastable to ``shape``). The cost of a
    pattern is ``sampling_cost()`` = mean(w) (the expected fraction of sampled pixels), to be
    added to the upper-level objective with a user-chosen weight. Since w depends on θ, no
    positive lower bound on σ_min(A) is certified: the lower level needs γ > 0.
    """

    def __init__(self, shape: Sequence[int], init: float | Tensor = 0.5) -> None:
        super().__init__()
        shape = tuple(int(s) for s in shape)
        if len(shape) == 2:
            shape = (1, 1, *shape)
        if len(shape) != 4 or shape[0] != 1:
            raise BilevelError(f"shape must be (H, W) or (1, C|1, H, W), got {shape}")
        w0 = torch.as_tensor(init, dtype=torch.float64)
        if bool((w0 <= 0).any()) or bool((w0 >= 1).any()):
            raise BilevelError("init weights must lie strictly inside (0, 1)")
        logits = torch.logit(w0).expand(shape).clone().to(torch.get_default_dtype())
        self.logits = nn.Parameter(logits)

    def weights(self) -> Tensor:
        """w = sigmoid(logits), shape (1, C|1, H, W)."""
        return torch.sigmoid(self.logits)

    def _w(self, x: Tensor) -> Tensor:
        _check_image(x)
        return self.weights().to(dtype=x.dtype, device=x.device)

    def forward(self, x: Tensor) -> Tensor:
        return self._w(x) * x

    def adjoint(self, y: Tensor) -> Tensor:
        return self._w(y) * y

    def normal(self, x: Tensor) -> Tensor:
        w = self._w(x)
        return w * w * x

    def sampling_cost(self) -> Tensor:
        """mean(w): differentiable scalar cost of the pattern (fraction of sampled pixels)."""
        return self.weights().mean()

    def norm_bound(self) -> float:
        return float(self.weights().detach().max())

    def binarise(self, fraction: float | None = None) -> InpaintingMask:
        """A fixed 0/1 mask: w > 1/2, or the top ``fraction`` of the weights when given."""
        w = self.weights().detach()
        if fraction is None:
            return InpaintingMask((w > 0.5).to(w.dtype))
        if not 0.0 < fraction <= 1.0:
            raise BilevelError(f"fraction must lie in (0, 1], got {fraction}")
        k = max(1, int(round(fraction * w.numel())))
        threshold = torch.topk(w.flatten(), k).values[-1]
        return InpaintingMask((w >= threshold).to(w.dtype))


def adjoint_mismatch(
    operator: LinearOperator,
    image_shape: Sequence[int],
    trials: int = 3,
    dtype: torch.dtype | None = None,
    generator: torch.Generator | int | None = 0,
) -> float:
    """The adjoint test: max over random x, y of |⟨A x, y⟩ − ⟨x, Aᵀ y⟩| / (‖A x‖ ‖y‖).

    x has shape ``(1, *image_shape)``, y the shape of A x; both are standard normal, drawn in
    float64 and cast to ``dtype`` (default: the default dtype). An exact adjoint gives a value
    at the rounding level of ``dtype`` (about 1e-16 in float64, 1e-7 in float32).
    """
    if not isinstance(generator, torch.Generator):
        generator = torch.Generator().manual_seed(0 if generator is None else int(generator))
    dtype = torch.get_default_dtype() if dtype is None else dtype
    worst = 0.0
    with torch.no_grad():
        for _ in range(trials):
            x = torch.randn((1, *image_shape), generator=generator, dtype=torch.float64)
            ax = operator(x.to(dtype))
            y = torch.randn(ax.shape, generator=generator, dtype=torch.float64).to(dtype)
            aty = operator.adjoint(y)
            if aty.shape != x.shape:
                raise BilevelError(
                    f"the adjoint maps measurements {tuple(y.shape)} to {tuple(aty.shape)}, "
                    f"expected images {tuple(x.shape)}"
                )
            lhs = (ax.double() * y.double()).sum()
            rhs = (x.to(dtype).double() * aty.double()).sum()
            scale = float(ax.double().norm() * y.double().norm())
            worst = max(worst, float((lhs - rhs).abs()) / max(scale, 1e-300))
    return worst


def norm_estimate(
    operator: LinearOperator,
    image_shape: Sequence[int],
    iterations: int = 100,
    dtype: torch.dtype | None = None,
    generator: torch.Generator | int | None = 0,
) -> float:
    """‖A‖ estimated by power iteration on AᵀA from a seeded random image of ``image_shape``.

    Power iteration converges from below: the value is a lower bound on ‖A‖ up to rounding,
    close to it after enough ``iterations``; multiply by a safety factor to use it as a bound.
    """
    if not isinstance(generator, torch.Generator):
        generator = torch.Generator().manual_seed(0 if generator is None else int(generator))
    dtype = torch.get_default_dtype() if dtype is None else dtype
    v = torch.randn((1, *image_shape), generator=generator, dtype=torch.float64).to(dtype)
    value = 0.0
    with torch.no_grad():
        for _ in range(iterations):
            v = v / v.norm()
            w = operator.adjoint(operator(v))
            value = float((v.double() * w.double()).sum())
            if not math.isfinite(value):
                raise BilevelError("power iteration on AᵀA produced a non-finite value")
            if float(w.norm()) == 0.0:
                return 0.0
            v = w
    return math.sqrt(max(value, 0.0))
