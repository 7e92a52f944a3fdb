"""deepinv physics as bilevel forward operators (optional: ``pip install 'bilevel[deepinv]'``).

deepinv (the PyTorch library of imaging inverse problems) describes a linear forward model by
a ``LinearPhysics`` object with ``A(x)`` and ``A_adjoint(y)``: tomography, MRI, compressed
sensing, single-pixel cameras, blurs. :class:`PhysicsOperator` wraps any such object (or any
object with those two methods) as a :class:`~bilevel.imaging.LinearOperator`, so that it can be
the operator of :func:`~bilevel.imaging.reconstruction_problem` and of ``DegradedImages``:

    h_i(x, θ) = ½‖A x − y_i‖² + R_θ(x) + (γ/2)‖x‖²,   y_i = A x_i + σ ε_i

The measurements y may have any shape (a sinogram, a vector of m compressed measurements).
‖A‖, needed for the Lipschitz bound ‖A‖² + L_R + γ that sets the lower solver's step, is
estimated at construction by power iteration on AᵀA (or stated with ``norm=``). Since A
generally has a kernel, the lower level needs γ > 0 unless ``injectivity=s`` states a
certified lower bound s on its smallest singular value. The adjoint is checked at
construction (:func:`~bilevel.imaging.operators.adjoint_mismatch`).

deepinv's datasets and image folders give training images through :func:`dataset_images`.
This module imports nothing from deepinv itself: deepinv is needed only to make the physics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from bilevel.imaging.operators import LinearOperator, adjoint_mismatch, norm_estimate
from bilevel.problem import BilevelError

__all__ = ["ADJOINT_TOLERANCE", "PhysicsOperator", "dataset_images"]

#: Largest accepted relative adjoint mismatch |⟨Ax, y⟩ − ⟨x, Aᵀy⟩| / (‖Ax‖‖y‖) per dtype.
ADJOINT_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}


class PhysicsOperator(LinearOperator):
    """A deepinv linear physics (anything with ``A`` and ``A_adjoint``) as a bilevel operator.

    Args:
        physics: e.g. ``deepinv.physics.Tomography(...)`` or ``CompressedSensing(...)``; an
            ``nn.Module`` physics is registered as a sub-module (``.to()`` moves its buffers).
        image_shape: (C, H, W) of the images x.
        norm: a stated upper bound on ‖A‖; default: the power-iteration estimate times
            ``safety`` (an estimate, not a certificate).
        injectivity: a certified lower bound on σ_min(A) (default 0: A may have a kernel).
        dtype: dtype of the construction-time checks (default: the default dtype); use the
            dtype that the physics computes in.
        check_adjoint: run the adjoint test at construction and raise a ``BilevelError`` when
            the mismatch exceeds :data:`ADJOINT_TOLERANCE`.
        power_iterations: iterations of the norm estimate.
        safety: factor applied to the norm estimate.
    """

    def __init__(
        self,
        physics: Any,
        image_shape: Sequence[int],
        *,
        norm: float | None = None,
        injectivity: float = 0.0,
        dtype: torch.dtype | None = None,
        check_adjoint: bool = True,
        power_iterations: int = 200,
        safety: float = 1.01,
    ) -> None:
        super().__init__()
        missing = [m for m in ("A", "A_adjoint") if not callable(getattr(physics, m, None))]
        if missing:
            raise BilevelError(
                f"{type(physics).__name__} has no {' or '.join(missing)}: a linear forward "
                "operator needs A(x) and A_adjoint(y), like deepinv's LinearPhysics"
            )
        shape = tuple(int(s) for s in image_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise BilevelError(f"image_shape must be (C, H, W), got {tuple(image_shape)}")
        if isinstance(physics, nn.Module):
            self.physics = physics
        else:
            self._physics = physics
        self.image_shape = shape
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if check_adjoint:
            mismatch = adjoint_mismatch(self, shape, dtype=dtype)
            tol = ADJOINT_TOLERANCE.get(dtype, 1e-4)
            if not mismatch <= tol:
                raise BilevelError(
                    f"{type(physics).__name__}.A_adjoint is not the adjoint of A: relative "
                    f"mismatch {mismatch:.3e} > {tol:.0e} in the adjoint test "
                    "|⟨Ax, y⟩ − ⟨x, Aᵀy⟩| / (‖Ax‖‖y‖)"
                )
        if norm is None:
            norm = safety * norm_estimate(self, shape, power_iterations, dtype=dtype)
            self.norm_estimated = True
        else:
            self.norm_estimated = False
        if not (math.isfinite(norm) and norm > 0):
            raise BilevelError(f"the operator norm must be finite and positive, got {norm}")
        if not (math.isfinite(injectivity) and 0 <= injectivity <= norm):
            raise BilevelError(f"injectivity must lie in [0, ‖A‖ = {norm:.4g}], got {injectivity}")
        self._norm = float(norm)
        self._injectivity = float(injectivity)

    @property
    def wrapped(self) -> Any:
        """The wrapped physics object."""
        return self.physics if "physics" in self._modules else self._physics

    def _call(self, name: str, t: Tensor) -> Tensor:
        try:
            return getattr(self.wrapped, name)(t)
        except RuntimeError as exc:
            raise BilevelError(
                f"{type(self.wrapped).__name__}.{name} failed on a {tuple(t.shape)} "
                f"{t.dtype} tensor on {t.device}: {exc}"
            ) from exc

    def forward(self, x: Tensor) -> Tensor:
        return self._call("A", x)

    def adjoint(self, y: Tensor) -> Tensor:
        return self._call("A_adjoint", y)

    def initial_image(self, y: Tensor) -> Tensor:
        """Aᵀy: measurements of deepinv physics generally do not live in the image space."""
        return self.adjoint(y)

    def norm_bound(self) -> float:
        """‖A‖: stated, or the power-iteration estimate times the safety factor."""
        return self._norm

    def norm_lower_bound(self) -> float:
        return self._injectivity


def dataset_images(
    dataset: Any, limit: int | None = None, dtype: torch.dtype | None = None
) -> list[Tensor]:
    """The images of a dataset as a list of (C, H, W) tensors, e.g. for ``random_crops``.

    ``dataset`` is any map-style dataset (deepinv's datasets, ``torchvision`` image folders,
    a ``torch.utils.data.TensorDataset``) whose items are an image tensor or a tuple / list
    whose first entry is one, of shape (C, H, W) or (H, W). ``limit`` takes the first
    images only.
    """
    try:
        n = len(dataset)
    except TypeError:
        raise BilevelError("dataset must be a map-style dataset with len() and [i]") from None
    n = n if limit is None else min(n, int(limit))
    images = []
    for i in range(n):
        item = dataset[i]
        image = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(image, Tensor):
            raise BilevelError(
                f"dataset item {i} holds a {type(image).__name__}, expected an image tensor "
                "(convert PIL images with a ToTensor transform)"
            )
        if image.dim() == 2:
            image = image[None]
        if image.dim() != 3:
            raise BilevelError(
                f"dataset item {i} has shape {tuple(image.shape)}, expected (C, H, W)"
            )
        images.append(image.to(torch.get_default_dtype() if dtype is None else dtype))
    if not images:
        raise BilevelError("the dataset holds no images")
    return images
