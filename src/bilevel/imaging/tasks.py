"""Assembling imaging bilevel problems: learn a regulariser (and an operator) for reconstruction.

Lower level, per image i (batch = (y, x_true) or (y, x_true, mask), leading dimension B):

    h_i(x, θ) = ½‖A x − y_i‖² + R_θ(x) + (γ/2)‖x‖²        (data_term=MeasurementFit())
    h_i(x, θ) = ½‖A (x − y_i)‖² + R_θ(x) + (γ/2)‖x‖²      (data_term=WeightedFit())

Upper level: f_i(x) = ½‖x − x_i^true‖² (``loss="mse"``), or f_i(x) = −PSNR(x, x_i^true) =
10 log₁₀(‖x − x_i^true‖²/n) in dB, n the pixels × channels of one image (``loss="psnr"``:
the mean over the images is minus their mean PSNR, the reported metric). All norms are sums
over the pixels and channels of one image, so energies and losses have shape (B,) and scale
with the image size.

The weighted data term is the model of learned sampling patterns: y_i = x_i^true + σε_i is the
full noisy image and A = diag(w) selects / weights what is kept, so the data depend on θ only
through A. It is the default when the operator has trainable parameters.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor, nn

from bilevel.autodiff import LowerLevel
from bilevel.imaging.data import DegradedImages
from bilevel.imaging.metrics import psnr
from bilevel.imaging.operators import Identity, InpaintingMask, LinearOperator
from bilevel.imaging.preconditioner import ridge_preconditioner
from bilevel.imaging.regularisers import Regulariser, SmoothedTV
from bilevel.lower import LBFGS, LowerSolver, solve_lower
from bilevel.problem import BilevelError, BilevelProblem

__all__ = [
    "DataTerm",
    "GridEdgeWarning",
    "GridSearchResult",
    "MeasurementFit",
    "ReconstructionProblem",
    "UPPER_LOSSES",
    "WeightedFit",
    "grid_search",
    "grid_search_tv",
    "lipschitz_bound",
    "negative_psnr",
    "reconstruct",
    "reconstruction_problem",
]


def _sum_per_image(t: Tensor) -> Tensor:
    return t.flatten(1).sum(1)


#: Upper losses of :func:`reconstruction_problem`.
UPPER_LOSSES = ("mse", "psnr")
_DB = 10.0 / math.log(10.0)


def negative_psnr(d: Tensor) -> Tensor:
    """−PSNR in dB of each image of the errors ``d = x − x_true`` (B, ...), peak 1:
    10 log₁₀(‖d_i‖²/n), n the entries of one image; the mean squared error is floored at the
    dtype's smallest normal number. Its gradient is (20/ln 10) d_i/‖d_i‖²."""
    mse = d.flatten(1).square().mean(1)
    return _DB * torch.log(mse.clamp_min(torch.finfo(d.dtype).tiny))


def _split_batch(batch) -> tuple[Tensor, Tensor, dict]:
    if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
        raise BilevelError("batch must be (y, x_true) or (y, x_true, mask) with leading dim B")
    extra = {"mask": batch[2]} if len(batch) == 3 and batch[2] is not None else {}
    return batch[0], batch[1], extra


class DataTerm:
    """The data term ½‖r‖² of the lower level: :meth:`residual` gives r for an image x."""

    def residual(self, operator: LinearOperator, x: Tensor, y: Tensor, extra: dict) -> Tensor:
        """The residual r(x) whose half squared norm is the data term (shape of y)."""
        raise NotImplementedError


@dataclass(frozen=True)
class MeasurementFit(DataTerm):
    """½‖A x − y‖²: y = A x_true + noise, a measurement of the operator."""

    def residual(self, operator: LinearOperator, x: Tensor, y: Tensor, extra: dict) -> Tensor:
        return operator(x, **extra) - y


@dataclass(frozen=True)
class WeightedFit(DataTerm):
    """½‖A (x − y)‖²: y = x_true + noise, the full noisy image, weighted by A (learned
    sampling: the data depend on θ only through A)."""

    def residual(self, operator: LinearOperator, x: Tensor, y: Tensor, extra: dict) -> Tensor:
        return operator(x - y, **extra)


@dataclass(frozen=True, eq=False, kw_only=True)
class ReconstructionProblem(BilevelProblem):
    """The problem of :func:`reconstruction_problem`, with the constants it was built from.

    Attributes:
        gamma: γ ≥ 0 of the (γ/2)‖x‖² term.
        data_term: the :class:`DataTerm`.
    """

    gamma: float = 0.0
    data_term: DataTerm = field(default_factory=MeasurementFit)


def reconstruction_problem(
    regulariser: Regulariser,
    operator: LinearOperator | None = None,
    gamma: float = 0.0,
    mu: float | None = None,
    *,
    data_term: DataTerm | None = None,
    operator_penalty: float = 0.0,
    loss: str = "mse",
) -> ReconstructionProblem:
    """The bilevel problem of learning ``regulariser`` (and a learnable ``operator``).

    θ is ``nn.ModuleDict({"regulariser": R, "operator": A})``: its trainable parameters are
    those of R and of A (if any). The strong-convexity modulus μ:

    * A must be certified injective (σ_min(A) ≥ s > 0, e.g. the identity) or γ > 0; otherwise
      (blur, masks, learnable masks) h is not strongly convex and a ``BilevelError`` is raised;
    * with a convex R, μ = s² + γ (identity: 1 + γ; operators with a kernel: γ);
    * with a ρ-weakly convex R (``weak_convexity_bound()``, e.g. :class:`WeaklyConvexRidge`),
      μ = s² + γ − ρ, refused unless positive;
    * with a non-convex R without such a bound (Student-t Fields of Experts), μ is None (to be
      estimated) unless ``mu`` is given. A given ``mu`` always takes precedence.

    ``data_term``: :class:`MeasurementFit` (y = A x_true + noise) or :class:`WeightedFit`
    (y = x_true + noise, for learned sampling); default the weighted fit iff A has trainable
    parameters. The Lipschitz bound of ∇ₓh (:func:`lipschitz_bound`, at the current θ) is
    stated when R has a curvature bound. ``operator_penalty``
    β > 0 adds the upper-level term β·A.sampling_cost() (e.g. β·mean(w) for ``LearnableMask``).
    A third batch entry is a per-instance mask passed to an ``InpaintingMask`` operator.
    ``loss``: the upper loss per image, "mse" (½‖x − x_true‖²) or "psnr" (−PSNR in dB, intensities
    in [0, 1]; its mean squared error is floored at the dtype's smallest normal number, so an
    exact reconstruction gives a finite loss).
    """
    operator = Identity() if operator is None else operator
    if not isinstance(regulariser, Regulariser):
        raise BilevelError("regulariser must be a bilevel.imaging Regulariser")
    if not isinstance(operator, LinearOperator):
        raise BilevelError("operator must be a bilevel.imaging LinearOperator")
    if loss not in UPPER_LOSSES:
        raise BilevelError(f"loss must be one of {', '.join(UPPER_LOSSES)}, got {loss!r}")
    gamma = float(gamma)
    if not math.isfinite(gamma) or gamma < 0:
        raise BilevelError(f"gamma must be a finite non-negative number, got {gamma}")
    learnable_op = any(p.requires_grad for p in operator.parameters())
    if data_term is None:
        data_term = WeightedFit() if learnable_op else MeasurementFit()
    if not isinstance(data_term, DataTerm):
        raise BilevelError(
            f"data_term must be MeasurementFit() or WeightedFit(), got {data_term!r}"
        )
    s = operator.norm_lower_bound()
    mu_data = s * s + gamma
    if not mu_data > 0:
        raise BilevelError(
            f"{type(operator).__name__} may have a non-trivial kernel (no positive lower bound "
            "on its singular values), so ½‖Ax − y‖² + R(x) need not be strongly convex in x and "
            "the lower-level solution and implicit hypergradient are not well defined; "
            "pass gamma > 0 to add (γ/2)‖x‖²"
        )
    if mu is None:
        rho = regulariser.weak_convexity_bound()
        if rho is not None:
            if not rho < mu_data:
                raise BilevelError(
                    f"the regulariser may be {rho:g}-weakly convex, at least the data term's "
                    f"curvature {mu_data:g}: the lower level need not be strongly convex; lower "
                    "its max_weak_convexity or raise gamma"
                )
            mu = mu_data - rho
    regulariser_penalty = None
    if operator_penalty:
        if not hasattr(operator, "sampling_cost"):
            raise BilevelError("operator_penalty needs an operator with a sampling_cost() method")
        beta = float(operator_penalty)

        def regulariser_penalty(th: nn.ModuleDict) -> Tensor:
            return beta * th["operator"].sampling_cost()

    def lower_energy(x: Tensor, th: nn.ModuleDict, batch) -> Tensor:
        y, _, extra = _split_batch(batch)
        a = th["operator"]
        if extra and not isinstance(a, InpaintingMask):
            raise BilevelError("a per-instance mask in the batch needs an InpaintingMask operator")
        r = data_term.residual(a, x, y, extra)
        energy = 0.5 * _sum_per_image(r * r) + th["regulariser"](x)
        if gamma:
            energy = energy + 0.5 * gamma * _sum_per_image(x * x)
        return energy

    def upper_loss(x: Tensor, th: nn.ModuleDict, batch) -> Tensor:
        d = x - _split_batch(batch)[1]
        if loss == "psnr":
            return negative_psnr(d)
        return 0.5 * _sum_per_image(d * d)

    theta = nn.ModuleDict({"regulariser": regulariser, "operator": operator})
    lipschitz = None
    if regulariser.curvature_bound() is not None:
        lipschitz = partial(lipschitz_bound, regulariser, operator, gamma)
    return ReconstructionProblem(
        lower_energy,
        upper_loss,
        theta,
        mu=mu,
        upper_regulariser=regulariser_penalty,
        lipschitz=lipschitz,
        gamma=gamma,
        data_term=data_term,
    )


def lipschitz_bound(
    regulariser: Regulariser | ReconstructionProblem,
    operator: LinearOperator | None = None,
    gamma: float = 0.0,
) -> float | None:
    """Upper bound on the Lipschitz constant of ∇ₓh: ‖A‖² + curvature_bound(R) + γ, or None.

    Evaluated at the current θ (recompute after θ changes). Accepts a problem made by
    :func:`reconstruction_problem` in place of (regulariser, operator, gamma).
    """
    if isinstance(regulariser, BilevelProblem):
        problem = regulariser
        if not isinstance(problem, ReconstructionProblem):
            raise BilevelError("lipschitz_bound needs a problem made by reconstruction_problem")
        regulariser, operator = problem.theta["regulariser"], problem.theta["operator"]
        gamma = problem.gamma
    operator = Identity() if operator is None else operator
    curvature = regulariser.curvature_bound()
    if curvature is None:
        return None
    return operator.norm_bound() ** 2 + curvature + float(gamma)


def reconstruct(
    problem: BilevelProblem,
    batch,
    x0: Tensor | None = None,
    tol: float = 1e-4,
    max_iter: int = 2000,
    solver: LowerSolver | None = None,
    precondition: bool = False,
) -> Tensor:
    """x̃ = argmin_x h(x, θ, batch) for every image, ‖∇ₓh_i(x̃_i)‖ ≤ tol (absolute).

    ``solver`` defaults to ``LBFGS(max_iter)``: on the learned regularisers its curvature
    pairs capture the widely spread spectrum of ∇²h (μ = 1 against local Lipschitz constants
    in the hundreds) that limits accelerated gradient steps, and reaches a full-size
    denoising tolerance with fewer gradients than ``Nesterov`` (measured in
    ``docs/benchmarks.md``, imaging oracles). Starts from ``x0`` (default: the operator's
    ``initial_image(y)``: y itself, or Aᵀy where measurements are not images). Detached
    result, shaped like the images. Images that miss ``tol`` within ``max_iter`` iterations
    are returned as they are, with a ``ConvergenceWarning`` that says how many.
    ``precondition`` (default solver only): L-BFGS preconditioned by
    :func:`~bilevel.imaging.preconditioner.ridge_preconditioner` at x0 where it applies
    (a ridge regulariser with the identity, a blur or a stored mask; plain L-BFGS otherwise):
    on full-size images about half the gradients for denoising and a third for deblurring
    (``docs/benchmarks_imaging_throughput.md``).
    """
    y = _split_batch(batch)[0]
    theta = problem.theta
    has_op = isinstance(theta, nn.ModuleDict) and "operator" in theta
    start = theta["operator"].initial_image(y) if has_op else y
    x0 = start if x0 is None else x0
    if not isinstance(x0, Tensor) or tuple(x0.shape) != tuple(start.shape):
        shape = tuple(x0.shape) if isinstance(x0, Tensor) else type(x0).__name__
        raise BilevelError(f"x0 must have the images' shape {tuple(start.shape)}, got {shape}")
    lower = LowerLevel(problem, batch)
    with torch.no_grad():
        if solver is None:
            pre = ridge_preconditioner(problem, x0) if precondition else None
            solver = LBFGS(max_iter=max_iter, preconditioner=pre)
        sol = solve_lower(lower, x0, tol, solver, problem.mu, warn=True)
    return sol.x


class GridEdgeWarning(UserWarning):
    """A grid search whose best value stayed at the edge of the searched range."""


@dataclass
class GridSearchResult:
    """Best value on a grid (a TV strength λ, or a regulariser's strength factor) and the mean
    PSNR (dB) of its reconstructions."""

    strength: float
    psnr: float
    strengths: list[float] = field(default_factory=list)
    psnrs: list[float] = field(default_factory=list)

    @property
    def interior(self) -> bool:
        """Whether the best λ has a searched strength on each side (a bracketed optimum)."""
        return bool(self.strengths) and self.strengths[0] < self.strength < self.strengths[-1]


def grid_search_tv(
    data: DegradedImages | Sequence[Tensor],
    strengths: Sequence[float] = (0.01, 0.02, 0.05, 0.1, 0.2),
    operator: LinearOperator | None = None,
    gamma: float = 0.0,
    smoothing: float = 0.01,
    max_iter: int = 300,
    tol: float = 1e-4,
    extend: int = 6,
) -> GridSearchResult:
    """Baseline "best grid-tuned TV": mean PSNR of TV reconstructions for each λ in a grid.

    For each strength λ, solves argmin_x ½‖Ax − y‖² + λ Σ sqrt(|∇x|² + ν²) + (γ/2)‖x‖² for all
    images at once (:func:`reconstruct`: ``max_iter`` iterations or ‖∇h_i‖ ≤ ``tol``) and
    averages the PSNR against x_true. ``data`` is a ``DegradedImages`` (all samples) or a tuple
    (y, x_true[, mask]). While the best λ is the smallest or largest of the grid, the grid is
    extended beyond it by the ratio of its two outermost values (at most ``extend`` times), so
    that the returned optimum lies inside the searched range (``result.interior``); a
    ``GridEdgeWarning`` says when ``extend`` extensions did not suffice. Returns the best λ, its
    PSNR and the whole curve (sorted by λ).
    """
    batch = tuple(data.batch()) if isinstance(data, DegradedImages) else tuple(data)
    y, x_true, _ = _split_batch(batch)
    grid = sorted(float(s) for s in strengths)
    if not grid or grid[0] <= 0:
        raise BilevelError("strengths must be a non-empty sequence of positive numbers")
    op = Identity() if operator is None else operator

    def score(lam: float) -> float:
        tv = SmoothedTV(strength=lam, smoothing=smoothing).to(dtype=y.dtype)
        problem = reconstruction_problem(tv, op, gamma=gamma, data_term=MeasurementFit())
        x = reconstruct(problem, batch, tol=tol, max_iter=max_iter)
        return float(psnr(x, x_true).mean())

    return grid_search(score, grid, extend, "TV strength")


def grid_search(
    score: Callable[[float], float], values: Sequence[float], extend: int, what: str
) -> GridSearchResult:
    """The positive value of ``values`` with the largest ``score`` (a mean PSNR), the grid
    extended geometrically past an edge optimum (at most ``extend`` times, as in
    :func:`grid_search_tv`; a ``GridEdgeWarning`` naming ``what`` when that did not suffice)."""
    results = {v: score(v) for v in sorted(values)}
    for _ in range(extend if len(results) > 1 else 0):
        lams = sorted(results)
        best = max(lams, key=results.__getitem__)
        if best == lams[0]:
            new = lams[0] * lams[0] / lams[1]
        elif best == lams[-1]:
            new = lams[-1] * lams[-1] / lams[-2]
        else:
            break
        results[new] = score(new)
    lams = sorted(results)
    best = max(lams, key=results.__getitem__)
    result = GridSearchResult(best, results[best], lams, [results[lam] for lam in lams])
    if len(lams) > 1 and not result.interior:
        warnings.warn(
            f"the best {what} {best:g} is the edge of the searched range "
            f"[{lams[0]:g}, {lams[-1]:g}] after {extend} extensions: the optimum may lie beyond "
            "it (widen the grid or allow more extensions)",
            GridEdgeWarning,
            stacklevel=3,
        )
    return result
