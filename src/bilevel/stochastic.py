"""Stochastic implicit differentiation (SID) for lower levels that are large finite sums.

The lower level h(w, λ) = (1/N) Σ_j ℓ_j(w, λ) + Ω(w, λ) is written as the fixed point of one
gradient step,

    w = Φ(w, λ) = w − η ∇_w h(w, λ),        ∂_wΦ = I − η H,   ∂_λΦ = −η J,

(η > 0 the *map step*, in units of w per unit of ∇_w h, i.e. 1 / curvature; H = ∇²_ww h and
J = ∇²_λw h), and Φ̂ is the same map on a minibatch I of the N samples. With
v* = (I − ∂_wΦᵀ)⁻¹ ∇_w E = H⁻¹∇_w E / η the hypergradient is ∇_λE + ∂_λΦᵀ v* ([SID],
docs/concepts.md).
SID computes it in three stages, each on its own stream of fresh minibatches:

1. t steps of a stochastic solver for w; the default :class:`StochasticFixedPoint` is
   w_{s+1} = (1 − η_s) w_s + η_s Φ̂(w_s) = w_s − η_s η ∇_w ĥ(w_s), i.e. SGD;
2. at the final w_t, k steps of a stochastic solver for v = ∂_wΦᵀ v + ∇_w E; the default
   :class:`StochasticLinearFixedPoint` is
   v_{j+1} = (1 − η'_j) v_j + η'_j (∂_wΦ̂ᵀ v_j + ∇_w Ê) = v_j + η'_j (∇_w Ê − η Ĥ v_j),
   one Hessian-vector product per step;
3. ĝ = ∇_λ Ê + ∂_λΦ̂ᵀ v_k = ∇_λ Ê − η Ĵᵀ v_k on fresh samples, averaged over J minibatches.

Step sizes η_s = β/(γ + s) (s = 0, 1, ...) give a mean-square error O(1/t + 1/k) (+ O(1/J)
for the variance of stage 3) when β is large enough (β ≳ 2/(ημ), i.e. 2κ for η = 1/L) and
γ makes the first steps stable; constant steps η_s ≡ β converge linearly to an error floor
proportional to β. With full batches and η_s ≡ η'_j ≡ 1 the three stages are t gradient
steps of length η, k Richardson steps on H q = ∇_w f (q = η v) and z = ∇_λ f − Jᵀq:
deterministic AID-FP exactly.

Adaptive accuracy (``SID(accuracy=InnerAccuracy(...))``): instead of fixed t and k, stage 1
iterates until its estimated ‖∇_w h(w_t)‖ ≤ s·ε_k and stage 2 until its estimated adjoint
residual ‖H q − ∇_w f‖ ≤ s·δ_k, ε_k and δ_k the tolerances the caller passes (ISGD: its
accuracy schedule, with the meaning they have for AID), s the accuracy scale that
:meth:`SIDState.tighten` lowers; t, k, the estimated residuals and the targets are reported
(:attr:`StochasticHypergradient.metrics`). The default solvers of ``bilevel hpo`` are then
:class:`PreconditionedSVRG` (Jacobi-preconditioned SVRG with steps from the measured
curvature) and :class:`PreconditionedSVRGLinear` with CG refinement on minibatches.

The two solvers are pluggable: any object with ``solve(T, x0) -> StochasticSolution`` (the
:class:`StochasticLowerSolver` / :class:`StochasticLinearSolver` protocols) can replace either.
``T`` is a :class:`StochasticMap`, a callable that evaluates T̂(x) on a fresh minibatch at every
call; the maps passed by SID also expose their parts (:class:`LowerMap`, :class:`AdjointMap`).

Sampling: three independent ``torch.Generator`` streams (stages 1, 2, 3) derived from one seed
(:class:`StageSamplers`), held with everything else that evolves across calls (the working
copies of the stage solvers, whose variance-reduction anchors persist between calls, and the
accuracy scale) in a :class:`SIDState`, never in the :class:`SID` configuration itself.
Indices are drawn on the CPU and moved to the device of the iterates, so a seed gives the same
index streams on every device.

Cost (:class:`~bilevel.autodiff.Cost`), per instance, a minibatch of b of N samples counting
b/N of a call: stage 1 one gradient evaluation per step, stage 2 one Hessian-vector product
per step (building the minibatch gradient graph is part of the product), stage 3 one mixed
VJP on the J·b final samples. Gradients of the upper level are not counted (as in
:mod:`bilevel.hypergrad`).
"""

from __future__ import annotations

import copy
import inspect
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from bilevel import distributed
from bilevel.autodiff import Cost, LowerLevel, backward, upper_gradients
from bilevel.hypergrad import EstimatorState, Hypergradient, HypergradientEstimator
from bilevel.linear import largest_eigenvalue
from bilevel.problem import Batch, BilevelError, BilevelProblem, FiniteSum, NonFiniteError

__all__ = [
    "SID",
    "SIDState",
    "AdjointMap",
    "Diagonal",
    "InnerAccuracy",
    "LowerMap",
    "MinibatchSampler",
    "PreconditionedSVRG",
    "PreconditionedSVRGLinear",
    "StageSamplers",
    "StochasticFixedPoint",
    "StochasticHypergradient",
    "StochasticLinearFixedPoint",
    "StochasticLinearSolver",
    "StochasticLowerSolver",
    "StochasticMap",
    "StochasticSolution",
    "VarianceReducedFixedPoint",
    "finite_sum_problem",
    "snapshot_theta",
]

_CHECK_EVERY = 16  # iterations between finiteness checks (each check synchronises a GPU)
_CURVATURE_EVERY = 20  # anchor refreshes between estimates of λ̂ by the preconditioned solvers


# ---------------------------------------------------------------------------------------------
# validation helpers


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise BilevelError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _nonnegative_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise BilevelError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _positive_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise BilevelError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise BilevelError(f"{name} must be finite and positive, got {value!r}")
    return v


def _tolerance(name: str, value: Any) -> float:
    """A tolerance passed by the caller: a positive number, or a tensor (its largest entry)."""
    if isinstance(value, Tensor):
        value = float(value.max())
    return _positive_float(name, value)


def _batch_size(name: str, value: Any) -> int | None:
    return None if value is None else _positive_int(name, value)


# ---------------------------------------------------------------------------------------------
# sampling


class MinibatchSampler:
    """Uniform minibatches of sample positions 0..n−1 from one CPU ``torch.Generator``.

    With ``replace=False`` (default) each minibatch holds ``size`` *distinct* positions, a
    uniformly random subset in increasing order (so that row gathers read memory in order),
    drawn from the distinct values of i.i.d. draws when 4·size ≤ n (O(size log size), not
    O(n), for small minibatches of large sets) and from a random permutation otherwise; a
    minibatch of all n samples is ``arange(n)``. Successive
    minibatches are independent, so a sample may reappear in the next minibatch. With
    ``replace=True`` positions are i.i.d. uniform and may repeat within a minibatch. Either way
    the minibatch mean of per-sample terms is an unbiased estimate of the full mean.
    """

    def __init__(self, seed: int, replace: bool = False) -> None:
        self.seed = int(seed)
        self.replace = bool(replace)
        self.generator = torch.Generator()
        self.generator.manual_seed(self.seed)
        #: data parallel (:mod:`bilevel.distributed`): draws come from this process's block
        self.shard: distributed.Shard | None = None

    def draw(
        self, n: int, size: int, count: int = 1, device: torch.device | str | None = None
    ) -> Tensor:
        """``count`` independent minibatches of ``size`` positions in 0..n−1, concatenated.

        Returns an int64 tensor of shape ``(count * size,)`` on ``device``.
        """
        if size > n:
            raise BilevelError(f"minibatch of {size} samples exceeds the {n} available")
        if self.shard is not None:
            # this process's share, from its block of rows; a minibatch smaller than the
            # number of processes is drawn whole from every block (the combination
            # Σ_r (N_r/n)·mean_r stays an unbiased estimate of the mean)
            start, stop = self.shard.block(n)
            if stop == start:
                raise BilevelError(
                    f"{n} samples leave process {self.shard.rank} of {self.shard.world} no "
                    "row: use at most as many processes as samples"
                )
            share = min(self.shard.share(size) or size, stop - start)
            return start + self._draw(stop - start, share, count, device)
        return self._draw(n, size, count, device)

    def _draw(self, n: int, size: int, count: int, device: torch.device | str | None) -> Tensor:
        g = self.generator
        if self.replace:
            idx = torch.randint(n, (count * size,), generator=g)
        elif size == n:
            idx = torch.arange(n).repeat(count)
        else:
            idx = torch.cat([self._subset(n, size) for _ in range(count)])
        return idx.to(device) if device is not None else idx

    def _subset(self, n: int, size: int) -> Tensor:
        g = self.generator
        if 4 * size > n:
            return torch.randperm(n, generator=g)[:size].sort().values
        # The distinct values U of i.i.d. draws form, given |U|, a uniformly random subset;
        # dropping |U| − size of them at random leaves a uniformly random subset of `size`.
        # O(size log size) rather than the O(n) of a permutation; about size²/(2n) draws
        # repeat, so draw a few more. torch.unique sorts: rows are then read in memory order.
        m = size + size * size // n + 16
        while True:
            distinct = torch.unique(torch.randint(n, (m,), generator=g))
            if distinct.numel() >= size:
                break
            m *= 2
        surplus = distinct.numel() - size
        if surplus:
            keep = torch.ones(distinct.numel(), dtype=torch.bool)
            keep[torch.randperm(distinct.numel(), generator=g)[:surplus]] = False
            distinct = distinct[keep]
        return distinct

    def reset(self) -> None:
        """Restart the stream from its seed."""
        self.generator.manual_seed(self.seed)

    def get_state(self) -> Tensor:
        return self.generator.get_state()

    def set_state(self, state: Tensor) -> None:
        self.generator.set_state(state)


class StageSamplers:
    """Three independent minibatch streams for the stages of SID, derived from one seed.

    The stage seeds are the first 64-bit words of ``numpy.random.SeedSequence(seed).spawn(3)``;
    ``seed=None`` draws fresh entropy from the operating system (kept in :attr:`entropy`, so
    that ``StageSamplers(entropy)`` repeats the streams). Attributes ``lower`` (stage 1),
    ``linear`` (stage 2: lower and upper minibatches) and ``final`` (stage 3).
    """

    def __init__(self, seed: int | None = 0, replace: bool = False) -> None:
        if seed is not None:
            seed = _nonnegative_int("seed", seed)
        root = np.random.SeedSequence(seed)
        self.entropy: int = int(root.entropy)
        seeds = [int(c.generate_state(1, np.uint64)[0]) for c in root.spawn(3)]
        self.lower = MinibatchSampler(seeds[0], replace)
        self.linear = MinibatchSampler(seeds[1], replace)
        self.final = MinibatchSampler(seeds[2], replace)

    def reset(self) -> None:
        """Restart all three streams from their seeds."""
        for s in (self.lower, self.linear, self.final):
            s.reset()

    def assign(self, rank: int, world: int, force: bool = False) -> None:
        """Data parallel: draw from process ``rank``'s block of rows (of ``world``), with the
        streams of that rank. Rank 0 keeps the streams of a single process; rank r > 0 uses
        the children 3r, 3r+1, 3r+2 of the seed's ``SeedSequence``, fresh and independent.
        Nothing changes if the streams are already this rank's (unless ``force``)."""
        current = self.lower.shard
        if not force and current is not None and (current.rank, current.world) == (rank, world):
            return
        shard = distributed.current()
        if shard is None or (shard.rank, shard.world) != (rank, world):
            raise BilevelError(f"no data-parallel process group with rank {rank} of {world}")
        if rank > 0 or force:
            root = np.random.SeedSequence(self.entropy)
            children = root.spawn(3 * (rank + 1))[3 * rank :]
            for sampler, child in zip((self.lower, self.linear, self.final), children):
                sampler.seed = int(child.generate_state(1, np.uint64)[0])
                sampler.reset()
        for sampler in (self.lower, self.linear, self.final):
            sampler.shard = shard

    def state_dict(self) -> dict[str, Tensor]:
        """Generator states (uint8 tensors), for checkpoints."""
        return {name: getattr(self, name).get_state() for name in ("lower", "linear", "final")}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore the states returned by :meth:`state_dict`."""
        for name in ("lower", "linear", "final"):
            if name not in state:
                raise BilevelError(f"sampler state lacks the {name!r} stream")
            getattr(self, name).set_state(state[name])


# ---------------------------------------------------------------------------------------------
# stochastic solvers


class StochasticMap(Protocol):
    """T̂: a stochastic map; every call evaluates T̂(x) on a fresh minibatch.

    ``x`` has shape ``(B, *event_shape)``; the result has the same shape, dtype and device.
    """

    def __call__(self, x: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class StochasticSolution:
    """Result of a stochastic fixed-point solve.

    Attributes:
        x: the returned point (last iterate, or the average of the last iterates).
        last_iterate: the final iterate x_t.
        iterations: number of map evaluations T̂ performed.
        averaged: number of iterates in the average (0: ``x`` is the last iterate).
        last_step: the last step size used (nan when no iteration was made).
        residual: the estimated fixed-point residual max_b ‖x_b − T̂(x_b)‖ at the returned
            iterate, from the solver's own minibatch at its last check (nan when the solver
            ran without a tolerance and measured none).
    """

    x: Tensor
    last_iterate: Tensor
    iterations: int
    averaged: int
    last_step: float
    residual: float = math.nan


@runtime_checkable
class StochasticLowerSolver(Protocol):
    """Solves w = Φ(w) given the stochastic map ``phi`` = Φ̂ (a :class:`LowerMap` in SID)."""

    def solve(self, phi: StochasticMap, x0: Tensor) -> StochasticSolution: ...


@runtime_checkable
class StochasticLinearSolver(Protocol):
    """Solves v = ∂_wΦᵀ v + ∇_w E given ``psi`` = its stochastic right side (an
    :class:`AdjointMap` in SID)."""

    def solve(self, psi: StochasticMap, x0: Tensor) -> StochasticSolution: ...


@dataclass(frozen=True)
class StochasticFixedPoint:
    """Averaged stochastic fixed-point iteration x_{s+1} = (1 − η_s) x_s + η_s T̂(x_s).

    Step sizes (dimensionless): η_s = β/(γ + s) for s = 0, 1, ... (decreasing), or
    η_s ≡ β when ``gamma`` is None (constant). With T̂ = Φ̂ = w − η∇ĥ this is SGD with steps
    η_s·η. γ = β makes the first step 1, which is unstable when the minibatch maps Φ̂ are
    not contractions (small batches, or η near 2/L): then raise γ (or lower β). For the
    O(1/t) mean-square error take β ≳ 2/(1 − q), q = 1 − ημ the contraction factor of Φ
    (β ≈ 2κ for η = 1/L), and γ ≈ β·L_b/L with L_b the curvature of a minibatch, so that the
    first step η_0·η ≈ 1/L_b is stable. The defaults β = 10, γ = 100 start with η_0 = 0.1 and
    decay like 10/s: stable for minibatch curvatures up to about 20/η, O(1/t) for κ ≲ 5.

    ``average`` ∈ [0, 1]: return the mean of the last ⌈average·t⌉ iterates (tail averaging;
    0 returns the last iterate, 1 averages all iterates x_1..x_t).

    Raises:
        NonFiniteError: an iterate became NaN or infinite (checked every 16 iterations and at
            the end), with advice on β, γ and the batch size. Iterates that grow but remain
            finite are not detected.
    """

    iterations: int = 100
    beta: float = 10.0
    gamma: float | None = 100.0
    average: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "iterations", _nonnegative_int("iterations", self.iterations))
        object.__setattr__(self, "beta", _positive_float("beta", self.beta))
        if self.gamma is not None:
            object.__setattr__(self, "gamma", _positive_float("gamma", self.gamma))
        a = self.average
        if isinstance(a, bool) or not isinstance(a, numbers.Real) or not 0.0 <= float(a) <= 1.0:
            raise BilevelError(f"average must be a fraction in [0, 1], got {a!r}")
        object.__setattr__(self, "average", float(a))

    @classmethod
    def constant(cls, step: float, iterations: int = 100, average: float = 0.0):
        """Constant steps η_s ≡ ``step``."""
        return cls(iterations=iterations, beta=step, gamma=None, average=average)

    def step_size(self, s: int) -> float:
        """η_s for the 0-based iteration s."""
        return self.beta if self.gamma is None else self.beta / (self.gamma + s)

    def describe(self) -> str:
        if self.gamma is None:
            return f"constant steps η_s = β = {self.beta:.4g}"
        return f"steps η_s = β/(γ + s) with β = {self.beta:.4g}, γ = {self.gamma:.4g}"

    def solve(
        self,
        phi: StochasticMap,
        x0: Tensor,
        tol: float | None = None,
        max_iter: int | None = None,
    ) -> StochasticSolution:
        """Run ``iterations`` steps from ``x0`` (B, ...); with ``tol``, stop as soon as the
        minibatch residual max_b ‖x_b − T̂(x_b)‖ of the current iterate is ≤ ``tol``, after at
        most ``max_iter`` (default ``iterations``) steps. The residual is measured on the
        step's own minibatch, so it costs nothing; the step is then not taken."""
        x = x0.detach()
        t = self.iterations if max_iter is None else _nonnegative_int("max_iter", max_iter)
        n_avg = math.ceil(self.average * t) if self.average > 0 else 0
        start_avg = t - n_avg
        avg = None
        eta = math.nan
        residual = math.nan
        want_ahead = getattr(phi, "want_ahead", None)  # SID's maps (_Lookahead)
        for s in range(t):
            if want_ahead is not None:
                want_ahead(tol is None and s + 1 < t)  # a fixed count: the next draw is due
            tx = phi(x)
            if not isinstance(tx, Tensor) or tx.shape != x.shape:
                raise BilevelError("the stochastic map must return a tensor shaped like x")
            if tol is not None:
                residual = _max_norm(x - tx)
                if residual <= tol:
                    t = s
                    break
            eta = self.step_size(s)
            x = torch.lerp(x, tx, eta)  # (1 − η_s) x + η_s T̂(x), exact at η_s = 1
            if s >= start_avg:
                avg = (
                    x.clone() if avg is None else avg.add_(x - avg, alpha=1.0 / (s - start_avg + 1))
                )
            if (s + 1) % _CHECK_EVERY == 0 or s == t - 1:
                self._check(x, s + 1)
        out = x if avg is None else avg
        return StochasticSolution(out, x, t, n_avg if avg is not None else 0, eta, residual)

    def _check(self, x: Tensor, s: int) -> None:
        _check_iterate(
            x,
            s,
            f"{type(self).__name__} ({self.describe()})",
            "increase gamma (smaller first steps), decrease beta, or use larger minibatches",
        )


def _max_norm(x: Tensor) -> float:
    """max over the instances b of ‖x_b‖₂ (x of shape (B, ...))."""
    return float(x.reshape(x.shape[0], -1).norm(dim=1).max())


def _check_iterate(x: Tensor, s: int, solver: str, advice: str) -> None:
    """Raise :class:`NonFiniteError` when the iterate x (after s iterations) is not finite."""
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteError(
            f"{solver}: the iterates became NaN or infinite by iteration {s}. The sampled map "
            f"is not a contraction for these steps: {advice}"
        )


@dataclass(frozen=True)
class StochasticLinearFixedPoint(StochasticFixedPoint):
    """Stochastic fixed-point iteration for v = ∂_wΦᵀ v + ∇_w E (stage 2 of SID).

    v_{j+1} = (1 − η'_j) v_j + η'_j Ψ̂(v_j), Ψ̂(v) = ∂_wΦ̂ᵀ v + ∇_w Ê = v − η Ĥ v + ∇_w Ê: one
    Hessian-vector product per step. Fields, step sizes, averaging and errors as in
    :class:`StochasticFixedPoint`.
    """


def snapshot_theta(theta: Any) -> Any:
    """A detached copy of θ (tensor, sequence or mapping of tensors, or ``nn.Module``) that
    later optimiser steps leave unchanged."""
    if isinstance(theta, nn.Module):
        return copy.deepcopy(theta).requires_grad_(False)
    if isinstance(theta, Tensor):
        return theta.detach().clone()
    if isinstance(theta, Mapping):
        return {k: snapshot_theta(v) for k, v in theta.items()}
    if isinstance(theta, (tuple, list)):
        return type(theta)(snapshot_theta(v) for v in theta)
    return theta


class VarianceReducedFixedPoint:
    """SVRG-type iteration for w = Φ(w) = w − η∇_w h(w, θ) (a stage-1 solver of SID).

    x_{s+1} = (1 − β) x_s + β (x_s − η g̃(x_s)),  with the control-variate gradient

        g̃(x) = ∇_w ĥ(x, θ; I) − ∇_w ĥ(x̃, θ̃; I) + ∇_w h(x̃, θ̃)

    on one fresh minibatch I, where (x̃, θ̃) is an *anchor* at which the full gradient is
    known. g̃ is unbiased for ∇_w h(x, θ) whatever the anchor; its variance vanishes as
    (x, θ) → (x̃, θ̃) (for models where θ enters only a regulariser that every minibatch
    energy contains in full, such as the per-feature models, the θ-part cancels exactly and
    only ‖x − x̃‖ matters). So the iterates reach the fixed point instead of the noise floor
    of :class:`StochasticFixedPoint` with a constant step, which is what lets SID's
    hypergradients follow w(θ) closely with a few iterations per upper-level step.

    β (``step``, dimensionless, a fraction of the map step η ≈ 1/L) is constant. The anchor is
    the current iterate, with θ̃ a snapshot of θ; it is taken at the first iteration and again
    every ``refresh`` iterations (``None``: ⌈N/b⌉, one pass of minibatches). It is kept
    across calls, so successive upper-level steps share it while θ moves little; a call with
    another problem or iterate shape takes a new one. Cost per iteration: two minibatch
    gradients (2b/N of a call per instance); per refresh: one full gradient.

    The map passed to :meth:`solve` must be a :class:`LowerMap` (SID passes one). The object
    holds the anchor: use one per estimator; :meth:`state_dict` / :meth:`load_state_dict`
    checkpoint it and :meth:`reset` drops it.

    Raises:
        BilevelError: ``phi`` is not a :class:`LowerMap`.
        NonFiniteError: an iterate became NaN or infinite (checked every 16 iterations).
    """

    def __init__(self, iterations: int = 100, step: float = 0.5, refresh: int | None = None):
        self.iterations = _nonnegative_int("iterations", iterations)
        self.step = _positive_float("step", step)
        self.refresh = None if refresh is None else _positive_int("refresh", refresh)
        self.reset()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(iterations={self.iterations}, step={self.step:g}, "
            f"refresh={self.refresh})"
        )

    def reset(self) -> None:
        """Drop the anchor: the next iteration computes a full gradient."""
        self._anchor: Tensor | None = None
        self._anchor_theta: Any = None
        self._anchor_gradient: Tensor | None = None
        self._anchor_key: tuple[Any, ...] | None = None
        self._since_refresh = 0

    @property
    def anchored(self) -> bool:
        """Whether an anchor is held."""
        return self._anchor is not None

    def _take_anchor(self, x: Tensor, theta: Any, key: tuple[Any, ...]) -> None:
        """Anchor at (x, θ); its full gradient comes with the step's minibatch gradients
        (:meth:`_gradient`)."""
        self._anchor = x.detach().clone()
        self._anchor_theta = snapshot_theta(theta)
        self._anchor_gradient = None
        self._anchor_key = key
        self._since_refresh = 0

    def _gradient(self, phi: LowerMap, x: Tensor, idx: Tensor) -> Tensor:
        """g̃(x) on the minibatch ``idx``; the anchor's full gradient too when it has none yet
        (data parallel: the three gradients in one all-reduce)."""
        anchor = (self._anchor, self._anchor_theta)
        full = anchor if self._anchor_gradient is None else None
        g, g_anchor, *rest = phi.gradients(idx, [(x, None), anchor], full)
        if rest:
            self._anchor_gradient = rest[0]
        return g - g_anchor + self._anchor_gradient

    def share_anchor(self, phi: LowerMap, x: Tensor, theta: Any, gradient: Tensor) -> None:
        """Take (x, θ̃, ∇_w h(x, θ̃)) computed elsewhere as the anchor, its refresh count
        restarted: SID passes the full gradient that its adjoint stage obtains with every full
        Hessian graph (the graph's first derivative), so the anchor costs no gradient here
        and lies at the last lower iterate, where the next call starts."""
        self._anchor = x.detach()
        self._anchor_theta = theta
        self._anchor_gradient = gradient.detach()
        self._anchor_key = (id(phi.problem), tuple(x.shape), x.dtype, x.device)
        self._since_refresh = 0

    def solve(
        self,
        phi: StochasticMap,
        x0: Tensor,
        tol: float | None = None,
        max_iter: int | None = None,
    ) -> StochasticSolution:
        """Run ``iterations`` steps from ``x0`` (B, ...); with ``tol`` stop once the residual
        η‖g̃(x)‖ of the current iterate (the map's units, ‖x − Φ(x)‖) is ≤ ``tol``, after at
        most ``max_iter`` (default ``iterations``) steps."""
        if not isinstance(phi, LowerMap):
            raise BilevelError(
                f"{type(self).__name__} needs the LowerMap of SID's stage 1 (minibatch and "
                f"full gradients), got {type(phi).__name__}"
            )
        x = x0.detach()
        refresh = self.refresh or math.ceil(phi.n / phi.batch_size)
        key = (id(phi.problem), tuple(x.shape), x.dtype, x.device)
        if self._anchor_key != key:
            self._adopt_restored(phi, x, key)
        beta, eta = self.step, phi.step
        t = self.iterations if max_iter is None else _nonnegative_int("max_iter", max_iter)
        residual = math.nan
        for s in range(t):
            if self._anchor is None or self._since_refresh >= refresh:
                self._take_anchor(x, phi.problem.theta, key)
            # a fixed count: the next draw is due, and if the next iteration keeps this anchor
            # its minibatch gradient there can be computed in this iteration's wait
            ahead = tol is None and s + 1 < t
            keeps = self._since_refresh + 1 < refresh
            phi.want_ahead(ahead, (self._anchor, self._anchor_theta) if keeps else None)
            g = self._gradient(phi, x, phi.draw(x.device))
            if tol is not None:
                residual = eta * _max_norm(g)
                if residual <= tol:
                    t = s
                    break
            x = x - (beta * eta) * g
            self._since_refresh += 1
            if (s + 1) % _CHECK_EVERY == 0 or s == t - 1:
                _check_iterate(x, s + 1, repr(self), "decrease the step or use larger minibatches")
        return StochasticSolution(x, x, t, 0, beta if t else math.nan, residual)

    def _adopt_restored(self, phi: LowerMap, x: Tensor, key: tuple[Any, ...]) -> None:
        """Keep an anchor restored by :meth:`load_state_dict` if it fits ``x``; else reset."""
        restored = self._anchor_key == _RESTORED and self._anchor is not None
        if not (restored and self._anchor.shape == x.shape):
            self.reset()
            return
        theta = self._anchor_theta
        if isinstance(phi.problem.theta, nn.Module):  # saved as the module's state dict
            module = snapshot_theta(phi.problem.theta)
            module.load_state_dict(theta)
            theta = module
        self._anchor = self._anchor.to(x)
        self._anchor_gradient = self._anchor_gradient.to(x)
        self._anchor_theta = theta
        self._anchor_key = key

    def state_dict(self) -> dict[str, Any]:
        """The anchor (x̃, θ̃, ∇h(x̃, θ̃)) and the iterations since it was taken (tensors and
        plain containers only; an ``nn.Module`` θ̃ is saved as its state dict)."""
        theta = self._anchor_theta
        return {
            "anchor": self._anchor,
            "anchor_theta": theta.state_dict() if isinstance(theta, nn.Module) else theta,
            "anchor_gradient": self._anchor_gradient,
            "since_refresh": self._since_refresh,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`. The next call uses the anchor if its iterate has the
        anchor's shape (the problem is assumed to be the checkpoint's), else takes a new one."""
        self.reset()
        if state.get("anchor") is None:
            return
        self._anchor = state["anchor"]
        self._anchor_theta = state["anchor_theta"]
        self._anchor_gradient = state["anchor_gradient"]
        self._since_refresh = int(state["since_refresh"])
        self._anchor_key = _RESTORED


_RESTORED = ("restored from a checkpoint",)


def _dots(a: Tensor, b: Tensor) -> Tensor:
    """Per-instance inner products ⟨a_b, b_b⟩, shape (B, 1, ..., 1) for broadcasting."""
    d = (a * b).reshape(a.shape[0], -1).sum(dim=1)
    return d.reshape(-1, *[1] * (a.dim() - 1))


def _pcg(matvec: Callable[[Tensor], Tensor], rhs: Tensor, p: Tensor, iterations: int, rtol: float):
    """Jacobi-preconditioned conjugate gradients for Ĥ δ = rhs (per instance), from δ = 0,
    until every ‖Ĥδ − rhs‖ ≤ rtol·‖rhs‖ or ``iterations`` products; (δ, products used, the
    recurrence's residual rhs − Ĥδ)."""
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    z = r / p
    d = z.clone()
    rz = _dots(r, z)
    target = rtol * _max_norm(rhs)
    used = 0
    for _ in range(iterations):
        if _max_norm(r) <= target:
            break
        hd = matvec(d)
        used += 1
        dhd = _dots(d, hd)
        alpha = torch.where(dhd > 0, rz / dhd.clamp_min(1e-300), torch.zeros_like(dhd))
        x = x + alpha * d
        r = r - alpha * hd
        z = r / p
        rz_new = _dots(r, z)
        d = z + (rz_new / rz.clamp_min(1e-300)) * d
        rz = rz_new
    return x, used, r


def _heavy_ball(x: Tensor, prev: Tensor, update: Tensor, momentum: float) -> Tensor:
    """x + update + m (x − prev)."""
    return x + update if momentum == 0.0 else x + update + momentum * (x - prev)


class PreconditionedSVRG(VarianceReducedFixedPoint):
    """Jacobi-preconditioned SVRG with a step from the measured curvature (SID stage 1),

        x_{s+1} = x_s − (β/λ̂) P⁻¹ g̃(x_s) + m (x_s − x_{s−1}),

    g̃ the control-variate gradient of :class:`VarianceReducedFixedPoint` (same anchor and
    refresh), P = diag ∇²ĥ(x_0, θ; I) once per call (so that it follows θ; exact from the
    problem's ``Diagonal`` when SID has one, else Hutchinson's estimate) on the minibatch of the
    first step's gradient, whose rows are at hand (only that one step's direction depends on
    both; every residual check draws fresh samples), λ̂ = λ_max(P^{-½} Ĥ P^{-½}) by power
    iteration on one minibatch, refreshed with the anchor. β (``step``, dimensionless) is a
    fraction of the step 1/λ̂, m ∈ [0, 1) the heavy-ball momentum.

    Why preconditioned, and why from measured curvature: the map step η = 1/L of SID uses the
    global bound L = c_ℓ‖X‖²/N + max_k λ_k, which for per-feature strengths is set by the
    largest λ_k and the worst-case loss curvature: the Hessian at w(θ) can lie far below it, and
    per-feature strengths spread over orders of magnitude as θ is learnt; steps 0.5/L then crawl
    along every other coordinate. With P the regulariser's spread is removed exactly, and 1/λ̂
    is the step the data allow (measurements: docs/benchmarks_hpo.md). Per iteration: two
    minibatch gradients; per call: one minibatch diagonal, on rows at hand (SID's stage 2 of the
    same call reuses it); per refresh: one full gradient and ``power_iterations`` minibatch
    Hessian-vector products. The returned ``residual`` is η‖g̃‖ at the returned iterate, the
    units of ‖x − Φ(x)‖.

    Raises:
        BilevelError: ``phi`` is not a :class:`LowerMap`; a momentum outside [0, 1).
        NonFiniteError: an iterate, the diagonal or the curvature is NaN or infinite.
    """

    def __init__(
        self,
        iterations: int = 100,
        step: float = 0.5,
        refresh: int | None = None,
        momentum: float = 0.0,
        power_iterations: int = 10,
        cg_iterations: int = 0,
        cg_rtol: float = 0.1,
    ) -> None:
        super().__init__(iterations, step, refresh)
        self.cg_iterations = _nonnegative_int("cg_iterations", cg_iterations)
        self.cg_rtol = _positive_float("cg_rtol", cg_rtol)
        m = momentum
        if isinstance(m, bool) or not isinstance(m, numbers.Real) or not 0.0 <= float(m) < 1.0:
            raise BilevelError(f"momentum must be in [0, 1), got {m!r}")
        self.momentum = float(m)
        self.power_iterations = _positive_int("power_iterations", power_iterations)
        self._top: float | None = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(iterations={self.iterations}, step={self.step:g}, "
            f"refresh={self.refresh}, momentum={self.momentum:g})"
        )

    def reset(self) -> None:
        super().reset()
        self._top = None
        self._refreshes = 0
        self.products = 0  # minibatch Hessian-vector products of the Newton steps, in all

    def solve(
        self,
        phi: StochasticMap,
        x0: Tensor,
        tol: float | None = None,
        max_iter: int | None = None,
    ) -> StochasticSolution:
        """Run ``iterations`` (or ``max_iter``) steps from ``x0``; with ``tol`` stop once
        η‖g̃(x)‖ ≤ ``tol`` at the current iterate."""
        if not isinstance(phi, LowerMap):
            raise BilevelError(
                f"{type(self).__name__} needs the LowerMap of SID's stage 1, got "
                f"{type(phi).__name__}"
            )
        x = prev = x0.detach()
        refresh = self.refresh or math.ceil(phi.n / phi.batch_size)
        key = (id(phi.problem), tuple(x.shape), x.dtype, x.device)
        if self._anchor_key != key:
            self._adopt_restored(phi, x, key)
        theta = phi.problem.theta
        p = None  # the preconditioner, at the first step taken (a met tolerance needs none)
        eta = phi.step
        t = self.iterations if max_iter is None else _nonnegative_int("max_iter", max_iter)
        residual = math.nan
        for s in range(t):
            if self._anchor is None or self._since_refresh >= refresh:
                self._take_anchor(x, theta, key)
                self._refreshes += 1
            idx = phi.draw(x.device)
            g = self._gradient(phi, x, idx)
            if tol is not None:
                residual = eta * _max_norm(g)
                if residual <= tol:
                    t = s
                    break
            if p is None:  # on the rows of this gradient, at hand
                p = phi.curvature.preconditioner(x, theta, lambda _, i=idx: i, phi.n)
            if self._top is None or self._refreshes >= _CURVATURE_EVERY:
                idx = phi.draw(x.device)
                self._top = phi.curvature.top(x, theta, idx, phi.n, p, self.power_iterations)
                self._refreshes = 0
            if self.cg_iterations:  # subsampled Newton step: Ĥ_S δ = g̃ on a fresh minibatch
                idx = phi.draw(x.device)
                delta, used, _ = _pcg(
                    phi.hessian(x, idx),
                    g,
                    p,
                    self.cg_iterations,
                    self.cg_rtol,
                )
                self.products += used
                update = -2.0 * self.step * delta
            else:
                update = -(self.step / self._top) * g / p
            x, prev = _heavy_ball(x, prev, update, self.momentum), x
            self._since_refresh += 1
            if (s + 1) % _CHECK_EVERY == 0 or s == t - 1:
                _check_iterate(x, s + 1, repr(self), "decrease the step or the momentum")
        last = self.step / self._top if t else math.nan
        return StochasticSolution(x, x, t, 0, last, residual)

    def share_anchor(self, phi: LowerMap, x: Tensor, theta: Any, gradient: Tensor) -> None:
        super().share_anchor(phi, x, theta, gradient)
        self._refreshes += 1

    def state_dict(self) -> dict[str, Any]:
        """The anchor (see :class:`VarianceReducedFixedPoint`), λ̂ and the refreshes since."""
        return {**super().state_dict(), "top": self._top, "refreshes": self._refreshes}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        top = state.get("top")
        self._top = None if top is None or self._anchor is None else float(top)
        self._refreshes = int(state.get("refreshes", 0))


class PreconditionedSVRGLinear:
    """Variance-reduced, Jacobi-preconditioned Richardson iteration for the adjoint (SID
    stage 2): v = ∂_wΦᵀ v + ∇_w E, i.e. H q = ∇_w E with q = η v,

        r̃(v) = ∇_w Ê − η [Ĥ(w, θ; I) v − Ĥ(w̃, θ̃; I) ṽ + H(w̃, θ̃) ṽ],
        v_{s+1} = v_s + (β/(η λ̂)) P⁻¹ r̃(v_s) + m (v_s − v_{s−1}),

    r̃ an unbiased estimate of the residual ∇_w E − H q = Ψ(v) − v whose variance vanishes as
    (w, θ, v) → (w̃, θ̃, ṽ), the anchor: a point with its full product H(w̃, θ̃)ṽ, taken at the
    first call and every ``refresh`` iterations (default ⌈N/b⌉) and kept across calls, as the
    lower anchor of :class:`VarianceReducedFixedPoint` (the same variance reduction for the
    adjoint stage). P and λ̂ as in :class:`PreconditionedSVRG` (P at w on a minibatch per call,
    or stage 1's P of the same SID call; λ̂ refreshed with the anchor). While the anchor lies at
    the current (w, θ) one Hessian-vector product per iteration suffices (Ĥ(v − ṽ)), else two.
    ``residual`` is ‖r̃‖ at the returned iterate (units of ∇_w f: the adjoint residual
    ‖H q − ∇_w f‖).

    With ``cg_iterations`` > 0 (the default of ``bilevel hpo``) the iteration is instead a
    refinement with a sampled system, in rounds: the residual r at v is r̃(v) against the
    anchor of an earlier call (two minibatch products), or exact from a new anchor at v (one
    full product) when there is none or when the minibatch products since it reach ⌈N/b⌉
    (so that full products cost at most as much as the minibatch ones); stop if ‖r‖ ≤ tol,
    else solve Ĥ_S δ = r/η by Jacobi-preconditioned CG (at most ``cg_iterations`` products on
    one gradient graph, relative residual ``cg_rtol``) on a fresh minibatch S and set
    v ← v + δ, r ← r − ηĤ_{S'}δ (another fresh minibatch) if that estimate decreased; a round
    that does not decrease it is followed by an exact anchor. When a round misses both half
    the residual and the tolerance, the sampled system misled CG and the size of S doubles
    (up to N, where CG runs on H itself to the tolerance); the size is kept across calls.
    The preconditioner is stage 1's of the same SID call, else computed at the first round on
    a fresh minibatch, so a warm start that already meets the tolerance costs two minibatch
    products. ``iterations`` of the result are rounds (at
    most ``max_rounds``). The first derivative of a full Hessian graph is the full gradient
    ∇_w h(w, θ); :meth:`pop_full_gradient` returns it, and SID makes it the anchor of a
    variance-reduced stage 1 (:meth:`VarianceReducedFixedPoint.share_anchor`).

    Why: plain fixed-point steps contract by 1 − ημ per step with the global η = 1/L and keep
    the minibatch noise of Ĥ v at a floor ∝ the step (docs/benchmarks_sid.md); the
    variance-reduced, preconditioned Richardson steps remove the floor but still need O(κ)
    steps; CG needs O(√κ) (the comparison: section "Stage solvers" of
    docs/benchmarks_sid.md).

    Raises:
        BilevelError: ``psi`` is not an :class:`AdjointMap`; a momentum outside [0, 1).
        NonFiniteError: an iterate became NaN or infinite.
    """

    def __init__(
        self,
        iterations: int = 100,
        step: float = 0.5,
        refresh: int | None = None,
        momentum: float = 0.0,
        power_iterations: int = 10,
        cg_iterations: int = 0,
        cg_rtol: float = 0.1,
        max_rounds: int = 20,
    ) -> None:
        self.cg_iterations = _nonnegative_int("cg_iterations", cg_iterations)
        self.cg_rtol = _positive_float("cg_rtol", cg_rtol)
        self.max_rounds = _positive_int("max_rounds", max_rounds)
        self.products = 0
        self.iterations = _nonnegative_int("iterations", iterations)
        self.step = _positive_float("step", step)
        self.refresh = None if refresh is None else _positive_int("refresh", refresh)
        m = momentum
        if isinstance(m, bool) or not isinstance(m, numbers.Real) or not 0.0 <= float(m) < 1.0:
            raise BilevelError(f"momentum must be in [0, 1), got {m!r}")
        self.momentum = float(m)
        self.power_iterations = _positive_int("power_iterations", power_iterations)
        self.reset()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(iterations={self.iterations}, step={self.step:g}, "
            f"refresh={self.refresh}, momentum={self.momentum:g})"
        )

    def reset(self) -> None:
        """Drop the anchor, λ̂ and the grown sample size."""
        self._batch: int | None = None
        self._anchor: dict[str, Any] | None = None
        self._key: tuple[Any, ...] | None = None
        self._since_refresh = 0
        self._top: float | None = None
        self._refreshes = 0
        self._full_gradient: tuple[Tensor, Any, _SampledHessian] | None = None

    def _full_hessian(self, psi: AdjointMap) -> _Counted:
        """The full Hessian operator at the map's (w, θ) (one gradient graph); its first
        derivative, the full gradient ∇_w h(w, θ), is kept for :meth:`pop_full_gradient`
        (taken from the operator then, so that a closed form computes it with the first
        product)."""
        full = psi.hessian(None)
        theta = snapshot_theta(psi.problem.theta)
        self._full_gradient = (psi.w, theta, full.hessian)
        return full

    def pop_full_gradient(self) -> tuple[Tensor, Any, Tensor] | None:
        """(w, θ̃, ∇_w h(w, θ̃)) from the last full Hessian graph of the last call, once (None
        when that call built none): SID gives it to the stage-1 solver as its anchor."""
        out, self._full_gradient = self._full_gradient, None
        return None if out is None else (out[0], out[1], out[2].gradient())

    def _take_anchor(
        self,
        psi: AdjointMap,
        v: Tensor,
        key: tuple[Any, ...],
        full: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        """Anchor at (w, θ, v) with H v from ``full`` (the full Hessian operator at w, if
        the caller holds one) or one full product."""
        full = self._full_hessian(psi) if full is None else full
        self._anchor = {
            "w": psi.w,
            "theta": snapshot_theta(psi.problem.theta),
            "v": v.detach().clone(),
            "hv": full(v.detach()),
            "current": True,
        }
        self._key = key
        self._since_refresh = 0

    def solve(
        self,
        psi: StochasticMap,
        x0: Tensor,
        tol: float | None = None,
        max_iter: int | None = None,
    ) -> StochasticSolution:
        """Run ``iterations`` (or ``max_iter``) steps from v_0 = ``x0``; with ``tol`` stop once
        ‖r̃(v)‖ ≤ ``tol`` at the current iterate."""
        if not isinstance(psi, AdjointMap):
            raise BilevelError(
                f"{type(self).__name__} needs the AdjointMap of SID's stage 2, got "
                f"{type(psi).__name__}"
            )
        v = prev = x0.detach()
        refresh = self.refresh or math.ceil(psi.n / psi.batch_size)
        key = (id(psi.problem), tuple(v.shape), v.dtype, v.device)
        if self._key == _RESTORED:
            self._adopt(psi, v, key)
        elif self._key != key:
            self.reset()
        self._full_gradient = None  # a graph of an earlier call, not popped
        if self._anchor is not None:
            self._anchor["current"] = False  # w and θ have moved since
        theta, eta = psi.problem.theta, psi.step
        t = self.iterations if max_iter is None else _nonnegative_int("max_iter", max_iter)
        if self.cg_iterations:
            return self._refine(psi, v, key, tol, min(t, self.max_rounds))
        p = psi.curvature.preconditioner(psi.w, theta, psi.draw, psi.n)
        residual = math.nan
        for s in range(t):
            if self._anchor is None or self._since_refresh >= refresh:
                self._take_anchor(psi, v, key)
                self._refreshes += 1
            if self._top is None or self._refreshes >= _CURVATURE_EVERY:
                idx = psi.draw(v.device)
                self._top = psi.curvature.top(psi.w, theta, idx, psi.n, p, self.power_iterations)
                self._refreshes = 0
            r = self._estimate(psi, v)
            if tol is not None:
                residual = _max_norm(r)
                if residual <= tol:
                    t = s
                    break
            update = (self.step / (eta * self._top)) * r / p
            v, prev = _heavy_ball(v, prev, update, self.momentum), v
            self._since_refresh += 1
            if (s + 1) % _CHECK_EVERY == 0 or s == t - 1:
                _check_iterate(v, s + 1, repr(self), "decrease the step or the momentum")
        return StochasticSolution(v, v, t, 0, self.step / self._top if t else math.nan, residual)

    def _estimate(self, psi: AdjointMap, v: Tensor) -> Tensor:
        """r̃(v) = ∇_w Ê − η [Ĥ v − Ĥ(w̃, θ̃) ṽ + H̃ ṽ] on one fresh minibatch."""
        a = self._anchor
        idx = psi.draw(v.device)
        if a["current"]:
            (hv,), rhs = psi.products(idx, [(v - a["v"], None, None)])
            hv = hv + a["hv"]
        else:
            (hv, hv_anchor), rhs = psi.products(
                idx, [(v, None, None), (a["v"], a["w"], a["theta"])]
            )
            hv = hv - hv_anchor + a["hv"]
        return rhs - psi.step * hv

    def _refine(
        self, psi: AdjointMap, v: Tensor, key: tuple[Any, ...], tol: float | None, t: int
    ) -> StochasticSolution:
        """Refinement rounds (``cg_iterations`` > 0); see the class docstring."""
        eta, n = psi.step, psi.n
        if self._batch is None:
            self._batch = psi.batch_size
        # minibatch products after which the anchor is renewed: its full product then costs
        # at most as much as the minibatch products it serves
        renew = self.refresh or math.ceil(n / psi.batch_size)
        # when a full product costs no more than a CG round, every round starts from the
        # exact residual (on small sets the estimate's noise costs more rounds than it saves)
        cheap = renew <= self.cg_iterations
        full: Callable[[Tensor], Tensor] | None = None  # H at (w, θ): one graph per call
        p: Tensor | None = None  # the preconditioner, at the first round (lazily)
        r: Tensor | None = None  # the residual ∇_w E − ηHv at v (exact, or r̃ estimated)
        if self._anchor is not None and self._since_refresh < renew:
            r = self._estimate(psi, v)  # the warm start against the earlier anchor
            self._since_refresh += 1 if self._anchor["current"] else 2
        residual = math.nan
        rounds = 0
        exact = False  # whether r is the exact residual
        for s in range(t):
            if r is not None and not exact and cheap:
                if tol is None or _max_norm(r) > tol:
                    r = None
            if r is None:  # a new anchor: one full product, the exact residual at v
                full = full or self._full_hessian(psi)
                self._take_anchor(psi, v, key, full)
                r, exact = psi.rhs() - eta * self._anchor["hv"], True
            residual = _max_norm(r)
            if tol is not None and residual <= tol:
                break
            rounds = s + 1
            b = self._batch
            idx = None if b >= n else psi.sampler.draw(n, b, device=v.device)
            if p is None:  # stage 1's of this call, else on a fresh minibatch
                p = psi.curvature.preconditioner(psi.w, psi.problem.theta, psi.draw, n)
            if idx is None:  # the whole sum: CG on H itself, to the tolerance at once
                rtol = self.cg_rtol if tol is None else min(self.cg_rtol, 0.5 * tol / residual)
                cap = max(self.cg_iterations, 2 * math.isqrt(v[0].numel()) + 10)
                full = full or self._full_hessian(psi)
                delta, used, cg_res = _pcg(full, r / eta, p, cap, rtol)
                r_new = eta * cg_res  # exact: r − η H δ
            else:
                delta, used, _ = _pcg(
                    psi.hessian(idx), r / eta, p, self.cg_iterations, self.cg_rtol
                )
                # the residual after the step, r − η Ĥ δ with Ĥ on a fresh minibatch:
                # unbiased, and only the product with the correction δ is sampled
                r_new = r - eta * psi.matvec(delta, psi.draw(v.device))
                self._since_refresh += (used + 1) * b / psi.batch_size
            self.products += used
            new = _max_norm(r_new)
            if new > max(0.5 * residual, tol or 0.0):  # the sampled system misled CG
                self._batch = min(2 * b, n)
            if new < residual:
                v, r, residual, exact = v + delta, r_new, new, b >= n
            else:  # rejected: the residual at v exactly before the next round
                r = None
            if self._since_refresh >= renew:
                r = None
            _check_iterate(v, s + 1, repr(self), "use larger minibatches")
        return StochasticSolution(v, v, rounds, 0, math.nan, residual)

    def state_dict(self) -> dict[str, Any]:
        """The anchor (w̃, θ̃, ṽ, H̃ṽ), the iterations since it was taken, and λ̂ (an
        ``nn.Module`` θ̃ is saved as its state dict)."""
        a = self._anchor
        if a is None:
            return {"anchor": None, "batch": self._batch}
        theta = a["theta"]
        return {
            "anchor": {
                **a,
                "theta": theta.state_dict() if isinstance(theta, nn.Module) else theta,
                "current": False,
            },
            "since_refresh": self._since_refresh,
            "top": self._top,
            "refreshes": self._refreshes,
            "batch": self._batch,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; the anchor is used if the next call's iterate has its
        shape (the problem is assumed to be the checkpoint's), else a new one is taken."""
        self.reset()
        self._batch = None if state.get("batch") is None else int(state["batch"])
        a = state.get("anchor")
        if a is None:
            return
        self._anchor = dict(a)
        self._since_refresh = int(state["since_refresh"])
        self._top = None if state.get("top") is None else float(state["top"])
        self._refreshes = int(state.get("refreshes", 0))
        self._key = _RESTORED

    def _adopt(self, psi: AdjointMap, v: Tensor, key: tuple[Any, ...]) -> None:
        a = self._anchor
        if a is None or a["v"].shape != v.shape:
            self.reset()
            return
        theta = a["theta"]
        if isinstance(psi.problem.theta, nn.Module):
            module = snapshot_theta(psi.problem.theta)
            module.load_state_dict(theta)
            a["theta"] = module
        for name in ("w", "v", "hv"):
            a[name] = a[name].to(v)
        self._key = key


# ---------------------------------------------------------------------------------------------
# the stochastic maps of SID


def _checked_values(name: str, value: Any, n: int) -> Tensor:
    if not isinstance(value, Tensor) or value.shape != (n,):
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise BilevelError(f"{name} must return one value per instance, shape ({n},); got {shape}")
    return value


#: (w, θ, index) -> diag ∇²_ww ĥ(w, θ; I), shaped like w (index None: all samples).
Diagonal = Callable[[Tensor, Any, Tensor | None], Tensor]


class SampleHessian(Protocol):
    """∇_w ĥ(w, θ; I) and v ↦ Ĥ(w, θ; I) v at one fixed (w, θ, I), detached, shaped like w
    (e.g. :class:`bilevel.learning.models.SampleHessian`)."""

    def gradient(self) -> Tensor: ...

    def product(self, v: Tensor) -> Tensor: ...


#: (w, θ, index) -> the :class:`SampleHessian` of ĥ(·, θ; I) at w (index None: all samples),
#: a closed form that replaces autograd's second derivatives in SID (``sample_hessian``).
SampleHessianFn = Callable[[Tensor, Any, Tensor | None], SampleHessian]

_HUTCHINSON_PROBES = 8  # Rademacher probes of the Hessian-diagonal estimate without a Diagonal


def _combined(t: Tensor, n: int) -> Tensor:
    """Data parallel: the mean over all n rows from each process's mean over (a minibatch of)
    its block, Σ_r (N_r/n)·t_r (:meth:`bilevel.distributed.Shard.combine`); else ``t``."""
    shard = distributed.current()
    return t if shard is None else shard.combine(t, n)


def _combined_all(
    *parts: tuple[Tensor, int | None], meanwhile: Callable[[], None] | None = None
) -> list[Tensor]:
    """:func:`_combined` of every (t, n) (n None: the plain sum over the processes), data
    parallel in one all-reduce (:meth:`bilevel.distributed.Shard.combine_all`); else the t.
    ``meanwhile`` runs while the all-reduce is in flight (one process: at the same point)."""
    shard = distributed.current()
    if shard is not None:
        return shard.combine_all(parts, meanwhile)
    if meanwhile is not None:
        meanwhile()
    return [t for t, _ in parts]


class _ExactUpper:
    """The exact upper terms (f, ∇_w f, ∇_θ f) at w (:func:`~bilevel.autodiff.upper_gradients`
    of the exact upper loss). Data parallel with ``finite_sum.upper_loss``, each process's block
    of the upper samples, combined in the next all-reduce that stage 2 makes (its first
    Hessian-vector products, :meth:`AdjointMap.products`) rather than one of their own, or on
    their own (:meth:`values`) if stage 2 made none."""

    def __init__(self, problem: BilevelProblem, w: Tensor) -> None:
        self.parts: list[tuple[Tensor, int | None]] | None = None
        shard = distributed.current()
        if shard is None or problem.finite_sum is None or problem.finite_sum.upper_loss is None:
            self._values = upper_gradients(problem, w, None)
            return
        n_up, params = int(problem.finite_sum.n_upper), problem.params
        block = _block(n_up).to(w.device)
        with torch.enable_grad():
            wr = w.detach().requires_grad_(True)
            loss = _checked_values(
                "finite_sum.upper_loss",
                problem.finite_sum.upper_loss(wr, problem.theta, block),
                w.shape[0],
            )
            grads = torch.autograd.grad(loss.sum(), [wr, *params], allow_unused=True)
        if grads[0] is None:
            raise BilevelError("finite_sum.upper_loss does not depend on x through autograd")
        grad_theta = [
            torch.zeros_like(p) if g is None else g / w.shape[0] for p, g in zip(params, grads[1:])
        ]
        self.parts = [(t, n_up) for t in (loss.detach(), grads[0], *grad_theta)]

    def combine(self, reduced: Sequence[Tensor]) -> None:
        """Take the combined :attr:`parts` (reduced in another all-reduce, in their order)."""
        self._values = (reduced[0], reduced[1], list(reduced[2:]))
        self.parts = None

    def values(self) -> tuple[Tensor, Tensor, list[Tensor]]:
        """(f per instance, ∇_w f per instance, ∇_θ mean f), combined over the processes."""
        if self.parts is not None:
            self.combine(_combined_all(*self.parts))
        return self._values


def _share(n: int) -> float:
    """The fraction of n rows in this process's block (1 without data parallelism)."""
    shard = distributed.current()
    if shard is None:
        return 1.0
    start, stop = shard.block(n)
    return (stop - start) / n


def _block(n: int) -> Tensor | None:
    """This process's block of n rows (None without data parallelism: all of them)."""
    shard = distributed.current()
    return None if shard is None else torch.arange(*shard.block(n))


def _sample_hvp(
    problem: BilevelProblem,
    w: Tensor,
    theta: Any,
    v: Tensor,
    idx: Tensor | None,
    closed: SampleHessianFn | None = None,
):
    """Ĥ(w, θ; I) v per instance (I = ``idx``; None: the full lower energy), detached; data
    parallel, combined over the processes (``idx`` None: each process's block)."""
    return _SampledHessian(problem, w, theta, idx, closed)(v)


class _SampledHessian:
    """v ↦ Ĥ(w, θ; I) v at a fixed point (w, θ) and minibatch I (None: the full lower energy;
    data parallel, each process's block, the products combined).

    The first-derivative graph g = ∇_w ĥ(w, θ; I) is built once; every product is one
    backward pass through it (``retain_graph``), so the k products of a CG solve or a power
    iteration build one graph instead of k (the per-call cost that dominates small
    minibatches). With ``closed`` (SID's ``sample_hessian``) the gradient and the products
    come from its closed form instead of autograd. Products are detached; nothing is counted
    here (the callers count)."""

    def __init__(
        self,
        problem: BilevelProblem,
        w: Tensor,
        theta: Any,
        idx: Tensor | None,
        closed: SampleHessianFn | None = None,
    ):
        self.n = int(problem.finite_sum.n_lower)
        if idx is None and distributed.current() is not None:
            idx = _block(self.n).to(w.device)
        self._closed = None if closed is None else closed(w.detach(), theta, idx)
        if self._closed is not None:
            return
        with torch.enable_grad():
            self._w = w.detach().requires_grad_(True)
            if idx is None:
                e = problem.lower_energy(self._w, theta, None)
                e = _checked_values("lower_energy", e, w.shape[0])
            else:
                e = problem.finite_sum.lower_energy(self._w, theta, idx)
                e = _checked_values("finite_sum.lower_energy", e, w.shape[0])
            (self._g,) = backward(e.sum(), (self._w,), create_graph=True)

    def gradient(self) -> Tensor:
        """∇_w ĥ(w, θ; I), the graph's first derivative (detached; data parallel, combined)."""
        if self._closed is not None:
            return _combined(self._closed.gradient().detach(), self.n)
        return _combined(self._g.detach(), self.n)

    def __call__(self, v: Tensor) -> Tensor:
        return _combined(self.local(v), self.n)

    def prime(self) -> None:
        """Compute now what every product shares and no product needs v for: the closed
        form's ``prime()`` if it has one (:meth:`bilevel.learning.models.SampleHessian.prime`:
        the scores of w, so that each product passes over the rows for v alone); autograd's
        gradient graph is built at construction."""
        prime = getattr(self._closed, "prime", None)
        if prime is not None:
            prime()

    def local(self, v: Tensor) -> Tensor:
        """This process's product (data parallel: on its share of I), not combined."""
        if self._closed is not None:
            return self._closed.product(v).detach()
        hv = None
        if self._g.requires_grad:  # else ∇ĥ is constant in w: Ĥ = 0
            with torch.enable_grad():
                (hv,) = backward(self._g, (self._w,), v, retain_graph=True, allow_unused=True)
        return torch.zeros_like(v) if hv is None else hv.detach()


class _Curvature:
    """The minibatch Hessian diagonal (Jacobi preconditioner P) and λ̂ = λ_max(P^{-½} Ĥ P^{-½})
    of the lower level at a point, shared by the maps of SID's stages.

    P comes from ``diagonal`` (exact, e.g. :meth:`~bilevel.learning.models.FiniteSumModel.
    lower_sample_diagonal`) or, without it, from Hutchinson's estimate mean_r z_r ⊙ Ĥ z_r
    (8 Rademacher probes, noisy); entries are floored at 10⁻³ of their mean so that P⁻¹ stays
    bounded. λ̂ is the Rayleigh quotient after ``iterations`` power iterations on one minibatch
    (an estimate from below of the minibatch's top curvature; steps are a fraction of 1/λ̂).

    SID makes one per call with ``keep=True``, shared by its stages: :meth:`preconditioner`
    then keeps the first P of the call (θ is fixed within a call, and w moves by the few
    steps of stage 1), so that stage 2 preconditions with stage 1's P instead of computing
    its own; with ``keep=False`` every call of :meth:`preconditioner` computes a new P."""

    def __init__(
        self,
        problem: BilevelProblem,
        diagonal: Diagonal | None,
        cost: Cost,
        closed: SampleHessianFn | None = None,
        keep: bool = False,
    ) -> None:
        self.problem = problem
        self.diagonal_fn = diagonal
        self.cost = cost
        self.closed = closed
        self.keep = keep
        self._kept: Tensor | None = None

    def preconditioner(
        self, w: Tensor, theta: Any, draw: Callable[[Any], Tensor], n: int
    ) -> Tensor:
        """P: the kept one when shaped like w, else :meth:`diagonal` at w on the minibatch
        ``draw(w.device)`` (kept when ``keep``)."""
        if self._kept is not None and self._kept.shape == w.shape:
            return self._kept
        p = self.diagonal(w, theta, draw(w.device), n)
        if self.keep:
            self._kept = p
        return p

    def diagonal(self, w: Tensor, theta: Any, idx: Tensor | None, n: int) -> Tensor:
        b = n if idx is None else idx.numel()
        if self.diagonal_fn is not None:
            d = self.diagonal_fn(w.detach(), theta, idx).detach()
            if not isinstance(d, Tensor) or d.shape != w.shape:
                raise BilevelError("the Hessian diagonal must have the shape of w")
            d = _combined(d, n)
            self.cost.grad_evals += w.shape[0] * b / n
        else:
            gen = torch.Generator().manual_seed(0)
            d = torch.zeros_like(w)
            hessian = _SampledHessian(self.problem, w, theta, idx, self.closed)
            for _ in range(_HUTCHINSON_PROBES):
                z = (torch.randint(0, 2, w.shape, generator=gen) * 2 - 1).to(w)
                d += z * hessian.local(z)
            d = _combined(d / _HUTCHINSON_PROBES, n)  # linear in the products: one all-reduce
            self.cost.hvps += _HUTCHINSON_PROBES * w.shape[0] * b / n
        if not bool(torch.isfinite(d).all()):
            raise NonFiniteError("the Hessian diagonal of the lower level is NaN or infinite")
        mean = d.reshape(d.shape[0], -1).abs().mean(dim=1).clamp_min(1e-300)
        return torch.maximum(d, 1e-3 * mean.reshape(-1, *[1] * (d.dim() - 1)))

    def top(self, w: Tensor, theta: Any, idx: Tensor, n: int, p: Tensor, iterations: int) -> float:
        """λ̂ = max_b λ_max(P_b^{-½} Ĥ_b P_b^{-½}) on the minibatch ``idx``."""
        scale = p.rsqrt()
        gen = torch.Generator().manual_seed(1)
        u = torch.randn(w.shape, generator=gen, dtype=torch.float64).to(w)
        lam = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        hessian = _SampledHessian(self.problem, w, theta, idx, self.closed)
        for _ in range(iterations):
            u = u / u.reshape(u.shape[0], -1).norm(dim=1).clamp_min(1e-300).reshape(
                -1, *[1] * (u.dim() - 1)
            )
            hu = scale * hessian(scale * u)
            lam = (u * hu).reshape(u.shape[0], -1).sum(dim=1)
            u = hu
        self.cost.hvps += iterations * w.shape[0] * idx.numel() / n
        top = float(lam.max())
        if not (math.isfinite(top) and top > 0):
            raise NonFiniteError(f"the estimated preconditioned curvature is {top}, not > 0")
        return top


class _Counted:
    """A Hessian operator whose every product adds ``calls`` Hessian-vector products to
    ``cost`` (per instance: B·b/N for a minibatch of b of N samples)."""

    def __init__(self, hessian: _SampledHessian, cost: Cost, calls: float) -> None:
        self.hessian, self.cost, self.calls = hessian, cost, float(calls)

    def __call__(self, v: Tensor) -> Tensor:
        self.cost.hvps += self.calls
        return self.hessian(v)


class _Lookahead:
    """The next lower minibatch of a map, drawn while its all-reduce is in flight, and the
    next iteration's work that needs that minibatch but not the reduced value.

    Data parallel, each inner iteration of SID ends in an all-reduce that waits for the
    slowest process and for the transport. A solver that knows another iteration follows
    (a fixed iteration count, :meth:`want_ahead`) lets the map draw that iteration's
    minibatch, have the finite sum prepare it (``FiniteSum.prepare``: gather its rows), and
    do the work of the next call that depends only on that minibatch and on points known now
    (:meth:`_work_ahead`: the SVRG anchor's minibatch gradient, the Hessian of the adjoint
    map's fixed point w, a sampled right-hand side), in that wait instead of after it. The
    draws come from the same stream in the same order (nothing else draws from it in between),
    and the work ahead is the same arithmetic as the work it replaces, so the iterates are
    those without the lookahead, bit for bit, for one process and for several alike.
    """

    sampler: MinibatchSampler
    problem: BilevelProblem
    n: int
    batch_size: int

    def _init_lookahead(self) -> None:
        self._ahead: Tensor | None = None
        self._want = False

    def want_ahead(self, wanted: bool) -> None:
        """Whether the next call that reduces may draw the following minibatch early."""
        self._want = bool(wanted)

    def draw(self, device: torch.device | str | None = None) -> Tensor:
        """A fresh minibatch of ``batch_size`` sample positions (nothing is counted)."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            return ahead
        return self.sampler.draw(self.n, self.batch_size, device=device)

    def _meanwhile(self, device: torch.device) -> Callable[[], None] | None:
        """The work for the wait of this call's all-reduce: the next draw and the work on it
        (:meth:`_work_ahead`), if wanted."""
        if not self._want:
            return None
        self._want = False
        work = self._work_ahead()

        def draw_next() -> None:
            idx = self.sampler.draw(self.n, self.batch_size, device=device)
            prepare = self.problem.finite_sum.prepare
            if prepare is not None:
                prepare(idx)
            self._ahead = idx
            if work is not None:
                work(idx)

        return draw_next

    def _work_ahead(self) -> Callable[[Tensor], None] | None:
        """The next call's work on its minibatch that does not need this call's reduced
        value, decided now (none by default)."""
        return None


class LowerMap(_Lookahead):
    """Φ̂(w) = w − η ∇_w ĥ(w, θ; I), a fresh minibatch I of ``batch_size`` samples per call.

    ``batch_size=None`` uses all N samples (then Φ̂ = Φ). Each call counts B·b/N gradient
    evaluations in ``cost``. ``diagonal`` (optional) gives the exact minibatch Hessian
    diagonal for the preconditioned solvers (:attr:`curvature`, or ``curvature`` itself
    when given: SID shares one between its stages); ``closed`` (optional, SID's
    ``sample_hessian``) the gradients and Hessian products in closed form.
    """

    def __init__(
        self,
        problem: BilevelProblem,
        step: float,
        sampler: MinibatchSampler,
        batch_size: int | None,
        cost: Cost,
        diagonal: Diagonal | None = None,
        closed: SampleHessianFn | None = None,
        curvature: _Curvature | None = None,
    ) -> None:
        self.problem = problem
        self.step = float(step)
        self.sampler = sampler
        self.n = int(problem.finite_sum.n_lower)
        self.batch_size = self.n if batch_size is None else int(batch_size)
        self.cost = cost
        self.closed = closed
        self.curvature = (
            _Curvature(problem, diagonal, cost, closed) if curvature is None else curvature
        )
        self._init_lookahead()
        self._anchor_ahead: tuple[Tensor, Any] | None = None
        self._gradient_ahead: tuple[Tensor, Tensor, Any, int, Tensor] | None = None

    def want_ahead(self, wanted: bool, anchor: tuple[Tensor, Any] | None = None) -> None:
        """As :meth:`_Lookahead.want_ahead`; ``anchor`` (x̃, θ̃), when the next iteration
        needs ∇_w ĥ(x̃, θ̃; I) on its minibatch I (an SVRG anchor it keeps): computed in the
        wait too, on this process's rows, and used by :meth:`gradients`."""
        super().want_ahead(wanted)
        self._anchor_ahead = anchor if wanted else None

    def _work_ahead(self) -> Callable[[Tensor], None] | None:
        anchor, self._anchor_ahead = self._anchor_ahead, None
        if anchor is None:
            return None
        w, theta = anchor

        def anchor_gradient(idx: Tensor) -> None:
            g = self._local_gradient(w, idx, theta)
            self._gradient_ahead = (idx, w, theta, w._version, g)

        return anchor_gradient

    def _local_gradient_at(self, w: Tensor, idx: Tensor, theta: Any) -> Tensor:
        """:meth:`_local_gradient`, or the one computed ahead for this minibatch and point."""
        ahead = self._gradient_ahead
        if ahead is not None and ahead[0] is idx and ahead[1] is w and ahead[2] is theta:
            self._gradient_ahead = None
            if ahead[3] == w._version:
                return ahead[4]
        return self._local_gradient(w, idx, theta)

    def gradient(self, w: Tensor, index: Tensor | None = None, theta: Any = None) -> Tensor:
        """∇_w ĥ(w, θ; I) on the minibatch ``index`` (default: a fresh one), shape of w
        (detached). ``theta`` defaults to the problem's current θ (a snapshot may be passed)."""
        idx = self.draw(w.device) if index is None else index
        return _combined(self._local_gradient(w, idx, theta), self.n)

    def gradients(
        self, index: Tensor, points: Sequence[tuple[Tensor, Any]], full: tuple[Tensor, Any] | None
    ) -> list[Tensor]:
        """∇_w ĥ(w, θ; I) at every (w, θ) of ``points`` (θ None: the problem's) on the one
        minibatch ``index``, then, if ``full`` is a point, ∇_w h there on all N samples; as
        :meth:`gradient` and :meth:`full_gradient`, but data parallel in one all-reduce."""
        local = [self._local_gradient_at(w, index, theta) for w, theta in points]
        self._gradient_ahead = None  # one not used here is stale
        if full is not None:
            local.append(self._local_full_gradient(*full))
        meanwhile = self._meanwhile(index.device)
        return _combined_all(*[(g, self.n) for g in local], meanwhile=meanwhile)

    def _local_gradient(self, w: Tensor, idx: Tensor, theta: Any) -> Tensor:
        theta = self.problem.theta if theta is None else theta
        if self.closed is not None:
            self.cost.grad_evals += w.shape[0] * idx.numel() / self.n
            return self.closed(w.detach(), theta, idx).gradient().detach()
        with torch.enable_grad():
            wr = w.detach().requires_grad_(True)
            e = self.problem.finite_sum.lower_energy(wr, theta, idx)
            e = _checked_values("finite_sum.lower_energy", e, w.shape[0])
            (g,) = backward(e.sum(), (wr,))
        self.cost.grad_evals += w.shape[0] * idx.numel() / self.n
        return g

    def full_gradient(self, w: Tensor, theta: Any = None) -> Tensor:
        """∇_w h(w, θ) on all N samples (the problem's ``lower_energy`` with ``batch=None``),
        counting one gradient evaluation per instance."""
        return _combined(self._local_full_gradient(w, theta), self.n)

    def _local_full_gradient(self, w: Tensor, theta: Any) -> Tensor:
        theta = self.problem.theta if theta is None else theta
        block = _block(self.n)  # data parallel: this process's rows, combined
        if self.closed is not None:
            self.cost.grad_evals += w.shape[0] * _share(self.n)
            index = None if block is None else block.to(w.device)
            return self.closed(w.detach(), theta, index).gradient().detach()
        with torch.enable_grad():
            wr = w.detach().requires_grad_(True)
            if block is None:
                e = self.problem.lower_energy(wr, theta, None)
            else:
                e = self.problem.finite_sum.lower_energy(wr, theta, block.to(w.device))
            e = _checked_values("lower_energy", e, w.shape[0])
            (g,) = backward(e.sum(), (wr,))
        self.cost.grad_evals += w.shape[0] * _share(self.n)
        return g

    def hessian(self, w: Tensor, index: Tensor) -> Callable[[Tensor], Tensor]:
        """v ↦ Ĥ(w, θ; I) v on the minibatch ``index`` at the problem's θ, each product
        counted as B·b/N Hessian-vector products (one gradient graph for all of them)."""
        return _Counted(
            _SampledHessian(self.problem, w, self.problem.theta, index, self.closed),
            self.cost,
            w.shape[0] * index.numel() / self.n,
        )

    def __call__(self, w: Tensor) -> Tensor:
        return w - self.step * self.gradient(w)


class AdjointMap(_Lookahead):
    """Ψ̂(v) = ∂_wΦ̂(w)ᵀ v + ∇_w Ê(w) = v − η Ĥ(w; I) v + ∇_w Ê(w; I') at the fixed point w.

    Ĥ is the Hessian of ĥ on a fresh lower minibatch I (``batch_size`` of N) per call, counting
    B·b/N Hessian-vector products; ∇_w Ê is the per-instance gradient of the upper loss, on a
    fresh upper minibatch I' of ``upper_batch`` (``None``: the exact ∇_w f, computed once;
    ``exact_rhs`` may be SID's :class:`_ExactUpper`, whose combination then travels with the
    first products). Custom linear solvers may call :meth:`matvec` and :meth:`rhs` separately.
    """

    def __init__(
        self,
        problem: BilevelProblem,
        w: Tensor,
        step: float,
        sampler: MinibatchSampler,
        batch_size: int | None,
        upper_batch: int | None,
        cost: Cost,
        exact_rhs: Tensor | _ExactUpper | None = None,
        diagonal: Diagonal | None = None,
        closed: SampleHessianFn | None = None,
        curvature: _Curvature | None = None,
    ) -> None:
        self.problem = problem
        self.w = w.detach()
        self.step = float(step)
        self.sampler = sampler
        self.n = int(problem.finite_sum.n_lower)
        self.batch_size = self.n if batch_size is None else int(batch_size)
        self.upper_batch = upper_batch
        self.cost = cost
        self._exact = exact_rhs
        self.closed = closed
        self.curvature = (
            _Curvature(problem, diagonal, cost, closed) if curvature is None else curvature
        )
        if upper_batch is None and exact_rhs is None:
            raise BilevelError("AdjointMap needs upper_batch or the exact right-hand side")
        self._init_lookahead()
        self._hessian_ahead: tuple[Tensor, _SampledHessian] | None = None
        self._rhs_ahead: tuple[Tensor, int] | None = None
        #: work for the wait of the first all-reduce that has nothing else to do (none drawn
        #: ahead: a fixed count's last iteration, or any iteration of an adaptive solver),
        #: run once; SID's stage 3 terms that do not need v (:class:`_FinalTerms`)
        self.after: Callable[[], None] | None = None

    def _meanwhile(self, device: torch.device) -> Callable[[], None] | None:
        work = super()._meanwhile(device)
        if work is not None or self.after is None:
            return work
        after, self.after = self.after, None
        return after

    def _work_ahead(self) -> Callable[[Tensor], None]:
        """The Hessian at the map's point on the next minibatch (primed) and,
        with upper minibatches, the next sampled right-hand side, drawn after that minibatch
        as the next call would draw it: neither needs the current iterate."""

        def hessian_and_rhs(idx: Tensor) -> None:
            self._hessian_ahead = (idx, self._hessian(idx, self.w, self.problem.theta))
            if self.upper_batch is not None:
                self._rhs_ahead = self._local_rhs()

        return hessian_and_rhs

    def _hessian(self, idx: Tensor, w: Tensor, theta: Any) -> _SampledHessian:
        """Ĥ(w, θ; I) on this process's rows; at the map's own point primed
        (:meth:`_SampledHessian.prime`), ahead (:meth:`_work_ahead`) or not, so that the
        part of its products that does not depend on v can be computed in an all-reduce's
        wait, with the same arithmetic either way."""
        hessian = _SampledHessian(self.problem, w, theta, idx, self.closed)
        if w is self.w and theta is self.problem.theta:
            hessian.prime()
        return hessian

    @property
    def exact_rhs(self) -> Tensor | None:
        """The exact ∇_w f per instance (None with upper minibatches)."""
        exact = self._exact
        return exact.values()[1] if isinstance(exact, _ExactUpper) else exact

    def matvec(
        self, v: Tensor, index: Tensor | None = None, w: Tensor | None = None, theta: Any = None
    ) -> Tensor:
        """Ĥ(w, θ; I) v on the minibatch ``index`` (default: a fresh one; w and θ default to
        the map's point and the problem's θ), detached, counting B·b/N products."""
        idx = self.draw(v.device) if index is None else index
        return _combined(self._local_matvec(v, idx, w, theta), self.n)

    def products(
        self, index: Tensor, vectors: Sequence[tuple[Tensor, Tensor | None, Any]]
    ) -> tuple[list[Tensor], Tensor]:
        """([Ĥ(w', θ'; I) v' for (v', w', θ') of ``vectors``], ∇_w Ê(w; I')): the products on
        the one lower minibatch ``index`` (w', θ' None: the map's point, the problem's θ) and
        the right-hand side, as :meth:`matvec` and :meth:`rhs` give them, but data parallel
        in one all-reduce."""
        local = [self._local_matvec(v, index, w, theta) for v, w, theta in vectors]
        self._hessian_ahead = None  # one not used here is stale
        parts: list[tuple[Tensor, int | None]] = [(hv, self.n) for hv in local]
        rhs = self._local_rhs()
        if rhs is not None:
            parts.append(rhs)
        exact = self._exact
        pending = exact.parts if isinstance(exact, _ExactUpper) else None
        reduced = _combined_all(*parts, *(pending or ()), meanwhile=self._meanwhile(index.device))
        if pending is not None:  # the exact upper terms, combined in the same all-reduce
            exact.combine(reduced[len(parts) :])
            reduced = reduced[: len(parts)]
        if rhs is None:
            return reduced, self.exact_rhs
        return reduced[:-1], reduced[-1]

    def _local_matvec(self, v: Tensor, idx: Tensor, w: Tensor | None, theta: Any) -> Tensor:
        w = self.w if w is None else w
        theta = self.problem.theta if theta is None else theta
        self.cost.hvps += w.shape[0] * idx.numel() / self.n
        ahead = self._hessian_ahead
        if ahead is not None and ahead[0] is idx and w is self.w and theta is self.problem.theta:
            self._hessian_ahead = None
            return ahead[1].local(v)
        return self._hessian(idx, w, theta).local(v)

    def hessian(self, index: Tensor | None = None) -> Callable[[Tensor], Tensor]:
        """v ↦ Ĥ(w, θ; I) v at the map's point and the problem's θ on the minibatch ``index``
        (None: all N samples, as :meth:`full_matvec`), each product counted as B·b/N
        Hessian-vector products; one gradient graph serves all products."""
        b = self.n * _share(self.n) if index is None else index.numel()
        hessian = _SampledHessian(self.problem, self.w, self.problem.theta, index, self.closed)
        return _Counted(hessian, self.cost, self.w.shape[0] * b / self.n)

    def full_matvec(self, v: Tensor, w: Tensor | None = None, theta: Any = None) -> Tensor:
        """H(w, θ) v on all N samples (the problem's ``lower_energy``), one product per
        instance."""
        w = self.w if w is None else w
        theta = self.problem.theta if theta is None else theta
        self.cost.hvps += w.shape[0] * _share(self.n)
        return _sample_hvp(self.problem, w, theta, v, None, self.closed)

    def rhs(self) -> Tensor:
        """∇_w Ê(w; I') per instance on a fresh upper minibatch (or the exact ∇_w f)."""
        local = self._local_rhs()
        return self.exact_rhs if local is None else _combined(*local)

    def _local_rhs(self) -> tuple[Tensor, int] | None:
        """(this process's ∇_w Ê(w; I'), n_upper) on a fresh upper minibatch; None when the
        right-hand side is the exact ∇_w f."""
        if self.upper_batch is None:
            return None
        ahead, self._rhs_ahead = self._rhs_ahead, None
        if ahead is not None:  # drawn and computed in the last all-reduce's wait
            return ahead
        w = self.w
        n_up = int(self.problem.finite_sum.n_upper)
        idx = self.sampler.draw(n_up, self.upper_batch, device=w.device)
        with torch.enable_grad():
            wr = w.detach().requires_grad_(True)
            loss = self.problem.finite_sum.upper_loss(wr, self.problem.theta, idx)
            loss = _checked_values("finite_sum.upper_loss", loss, w.shape[0])
            (g,) = torch.autograd.grad(loss.sum(), wr, allow_unused=True)
        return (torch.zeros_like(w) if g is None else g), n_up

    def __call__(self, v: Tensor) -> Tensor:
        (hv,), rhs = self.products(self.draw(v.device), [(v, None, None)])
        return v - self.step * hv + rhs


class _FinalTerms:
    """The terms of SID's stage 3 that do not need the adjoint v: its J lower minibatches
    (drawn from the final stream) with the gradient graph g = ∇_w ĥ(w, θ; I) whose
    derivative against θ in the direction v is Ĵᵀ v, and with upper minibatches the upper
    terms f̂, ∇_θ f̂ (drawn next). Computed once (:meth:`__call__`): in the wait of a stage-2
    all-reduce with nothing else to do (:attr:`AdjointMap.after`), else at stage 3; the same
    operations and draws either way, as nothing else draws from the final stream."""

    def __init__(
        self,
        problem: BilevelProblem,
        sampler: MinibatchSampler,
        w: Tensor,
        batch: int,
        count: int,
        upper_batch: int | None,
    ) -> None:
        self.problem, self.sampler, self.w = problem, sampler, w
        self.batch, self.count, self.upper_batch = batch, count, upper_batch
        self.done = False

    def __call__(self) -> None:
        if self.done:
            return
        problem, w, n_inst = self.problem, self.w, self.w.shape[0]
        n = int(problem.finite_sum.n_lower)
        self.idx = self.sampler.draw(n, self.batch, count=self.count, device=w.device)
        with torch.enable_grad():
            wr = w.detach().requires_grad_(True)
            e = problem.finite_sum.lower_energy(wr, problem.theta, self.idx)
            e = _checked_values("finite_sum.lower_energy", e, n_inst)
            (self.g,) = torch.autograd.grad(e.sum(), wr, create_graph=True)
        if self.upper_batch is not None:
            n_up = int(problem.finite_sum.n_upper)
            idx_up = self.sampler.draw(n_up, self.upper_batch, count=self.count, device=w.device)
            params = problem.params
            with torch.enable_grad():
                up = problem.finite_sum.upper_loss(w, problem.theta, idx_up)
                up = _checked_values("finite_sum.upper_loss", up, n_inst)
                gt = (
                    torch.autograd.grad(up.mean(), params, allow_unused=True)
                    if up.requires_grad
                    else [None] * len(params)
                )
            self.upper_grad = [torch.zeros_like(p) if t is None else t for p, t in zip(params, gt)]
            self.upper_losses = up.detach()
        self.done = True


# ---------------------------------------------------------------------------------------------
# the estimator


@dataclass(frozen=True)
class InnerAccuracy:
    """SID's adaptive inner accuracy: t and k follow the upper method's tolerances.

    At upper step k the caller (ISGD) passes its accuracy schedule's ε_k and δ_k as
    ``lower_tol`` and ``adjoint_tol``, with the meaning they have for AID: stage 1 iterates
    until the estimated ‖∇_w h(w_t)‖ ≤ s·ε_k and stage 2 until the estimated adjoint residual
    ‖H q − ∇_w f‖ ≤ s·δ_k (q = η v), each measured on the solver's own minibatch at every
    iteration (for the variance-reduced solvers an unbiased estimate whose noise vanishes at
    the anchor), at most ``max_lower`` / ``max_adjoint`` iterations. s is the estimator's
    accuracy scale (1 at the start): :meth:`SIDState.tighten` multiplies it by ``factor`` (down to
    ``min_scale``) when the run sees the upper loss rise, i.e. asks for more accuracy.
    """

    max_lower: int = 500
    max_adjoint: int = 500
    factor: float = 0.3
    min_scale: float = 1e-4

    def __post_init__(self) -> None:
        _positive_int("max_lower", self.max_lower)
        _positive_int("max_adjoint", self.max_adjoint)
        for name in ("factor", "min_scale"):
            v = _positive_float(name, getattr(self, name))
            if v >= 1:
                raise BilevelError(f"{name} must be in (0, 1), got {v}")


@dataclass(frozen=True)
class StochasticHypergradient(Hypergradient):
    """A :class:`~bilevel.hypergrad.Hypergradient` from :class:`SID`, with its reports.

    Attributes (besides the inherited ones):
        map_step: η, the step of the map Φ(w) = w − η∇_w h.
        lower_report, linear_report: the :class:`StochasticSolution` of stages 1 and 2.
        lower_target, adjoint_target: the targets s·ε_k, s·δ_k of the adaptive accuracy
            (nan with fixed t and k).
        accuracy_scale: s, the accuracy scale of the estimator at this call.
    """

    map_step: float = math.nan
    lower_report: StochasticSolution | None = None
    linear_report: StochasticSolution | None = None
    lower_target: float = math.nan
    adjoint_target: float = math.nan
    accuracy_scale: float = 1.0

    @property
    def lower_residual(self) -> float:
        """Estimated ‖∇_w h(w_t)‖ (units of ∇_w h; nan when not measured)."""
        r = self.lower_report.residual if self.lower_report is not None else math.nan
        return r / self.map_step

    @property
    def adjoint_residual(self) -> float:
        """Estimated ‖H q − ∇_w f‖ (units of ∇_w f; nan when not measured)."""
        return self.linear_report.residual if self.linear_report is not None else math.nan

    @property
    def metrics(self) -> dict[str, float]:
        """Per-step values for the run's records: ``sid_t``, ``sid_k`` (iterations of stages 1
        and 2) and, when measured, the estimated residuals ``sid_lower_residual``,
        ``sid_adjoint_residual``, their targets ``sid_lower_target``, ``sid_adjoint_target``
        and the accuracy scale ``sid_accuracy_scale``."""
        out: dict[str, float] = {
            "sid_t": self.lower_report.iterations if self.lower_report else 0,
            "sid_k": self.linear_report.iterations if self.linear_report else 0,
        }
        values = {
            "sid_lower_residual": self.lower_residual,
            "sid_adjoint_residual": self.adjoint_residual,
            "sid_lower_target": self.lower_target,
            "sid_adjoint_target": self.adjoint_target,
        }
        out.update({k: v for k, v in values.items() if math.isfinite(v)})
        if math.isfinite(self.lower_target):
            out["sid_accuracy_scale"] = self.accuracy_scale
        return out


@runtime_checkable
class _StatefulSolver(Protocol):
    """A stage solver that keeps state between calls (an anchor), saved for checkpoints."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class SIDState(EstimatorState):
    """What SID evolves from one call to the next (:meth:`SID.init_state`).

    Attributes:
        samplers: the three minibatch streams (:class:`StageSamplers`); successive calls
            continue them, so successive upper-level steps see fresh samples.
        lower_solver, linear_solver: working copies of SID's stage solvers, made at
            :meth:`SID.init_state`; a stateful solver (:class:`VarianceReducedFixedPoint`,
            :class:`PreconditionedSVRG`, :class:`PreconditionedSVRGLinear`) keeps its anchor
            here, so two states (or two estimators) never share one.
        accuracy: the estimator's :class:`InnerAccuracy` (None: fixed t and k).
        accuracy_scale: s, the inner targets are s·ε_k and s·δ_k (1 until :meth:`tighten`).

    Checkpoints: :meth:`generators` (the three streams, saved with the run's generators, per
    process) and :meth:`state_dict` (the stateful solvers' anchors and s).
    """

    _SOLVERS = ("lower_solver", "linear_solver")

    def __init__(self, sid: SID) -> None:
        self.samplers = StageSamplers(sid.seed, bool(sid.replace))
        self.lower_solver: Any = copy.deepcopy(sid.lower_solver)
        self.linear_solver: Any = copy.deepcopy(sid.linear_solver)
        self.accuracy = sid.accuracy
        self.accuracy_scale = 1.0

    def tighten(self) -> float:
        """Ask for more inner accuracy: s ← max(factor·s, min_scale) (see
        :class:`InnerAccuracy`); returns the new s. Without an adaptive accuracy (fixed t and
        k) this is an error."""
        if self.accuracy is None:
            raise BilevelError("tighten needs SID(accuracy=InnerAccuracy(...))")
        self.accuracy_scale = max(
            self.accuracy.factor * self.accuracy_scale, self.accuracy.min_scale
        )
        return self.accuracy_scale

    def generators(self) -> dict[str, torch.Generator]:
        s = self.samplers
        return {
            "lower": s.lower.generator,
            "linear": s.linear.generator,
            "final": s.final.generator,
        }

    def assign(self, rank: int, world: int, force: bool = False) -> None:
        self.samplers.assign(rank, world, force)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            name: getattr(self, name).state_dict()
            for name in self._SOLVERS
            if isinstance(getattr(self, name), _StatefulSolver)
        }
        state["accuracy_scale"] = self.accuracy_scale
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name, solver_state in state.items():
            if name == "accuracy_scale":
                self.accuracy_scale = _positive_float(name, solver_state)
            elif name in self._SOLVERS and isinstance(getattr(self, name), _StatefulSolver):
                getattr(self, name).load_state_dict(solver_state)
            else:
                raise BilevelError(f"unknown SID state {name!r} in the saved state")


@dataclass(frozen=True, kw_only=True)
class SID(HypergradientEstimator):
    """Stochastic implicit differentiation: ĝ = ∇_λÊ + ∂_λΦ̂ᵀ v_k (see the module docstring).

    Called like every :class:`~bilevel.hypergrad.HypergradientEstimator`,
    ``SID(...)(problem, batch, x0, adjoint0=..., state=..., accumulate=...)``, it returns a
    :class:`StochasticHypergradient`. The configuration is immutable; what evolves (minibatch
    streams, anchors, accuracy scale) lives in the :class:`SIDState` of :meth:`init_state`,
    which the upper-level method carries and checkpoints. A call without ``state`` uses a
    fresh one: it is a function of the seed and its inputs alone. The problem must provide a
    :class:`~bilevel.problem.FiniteSum` (with ``upper_loss`` when ``upper_batch`` is set);
    ``batch`` must be None, the finite-sum data being closed over (:func:`finite_sum_problem`
    builds such a problem from the sample energy alone).

    Attributes:
        lower_solver: stage 1, a :class:`StochasticLowerSolver` (t = its iterations).
        linear_solver: stage 2, a :class:`StochasticLinearSolver` (k = its iterations).
        step: η of Φ(w) = w − η∇_w h (units 1/curvature). ``None``: 1/L with L the problem's
            ``lipschitz`` bound, else a power-iteration estimate of λ_max(∇²h) at x0 on the
            full data (20 full Hessian-vector products per call, counted; pass ``step`` to
            avoid them). A minibatch map Φ̂ is a contraction only if η·λ_max(Ĥ) < 2.
        lower_batch, linear_batch, final_batch: lower-level minibatch sizes b of stages 1, 2
            and 3 (``None``: all N samples; larger than N is an error).
        upper_batch: upper-level minibatch size for ∇_w Ê (stage 2, fresh per step) and
            ∇_λ Ê (stage 3); ``None`` uses the exact upper loss f(x, θ, None).
        final_minibatches: J, the number of independent minibatches averaged in stage 3
            (evaluated as one index of J·b positions, which equals the average of the J
            minibatch estimates for energies that are means over their index).
        replace: sample with replacement (i.i.d. positions) instead of distinct positions
            within each minibatch (:class:`MinibatchSampler`).
        seed: seed of the three stage streams (:class:`StageSamplers`) of every state made by
            :meth:`init_state`; ``None``: fresh OS entropy for each. Successive calls with one
            state continue its streams; two states of one seed give the same sequence of
            estimates.
        accuracy: ``None``: t and k are the solvers' fixed iteration counts, and passing
            ``lower_tol`` or ``adjoint_tol`` is an error; an :class:`InnerAccuracy`: each stage
            runs until its estimated residual meets s·``lower_tol`` (‖∇_w h‖) or
            s·``adjoint_tol`` (‖H q − ∇_w f‖), s = :attr:`SIDState.accuracy_scale` (the solvers must
            accept ``tol`` and ``max_iter``; ``lower_tol`` defaults to 1e-4 as for AID).
        diagonal: (w, θ, index) -> the minibatch Hessian diagonal, for the Jacobi
            preconditioner of the preconditioned solvers (``None``: Hutchinson's estimate).
        sample_hessian: (w, θ, index) -> a :class:`SampleHessian`, the minibatch gradient
            ∇_w ĥ(w, θ; I) and products Ĥ(w, θ; I) v in closed form (index None: all
            samples), used by stages 1 and 2 instead of autograd's first and second
            derivatives of ``finite_sum.lower_energy`` (the same values; e.g.
            :meth:`bilevel.learning.models.FiniteSumModel.lower_sample_hessian`, whose first
            product also yields the gradient, in two passes over the rows where autograd
            makes four). ``None``: autograd.

    Warm starts: ``x0`` is w_0 and ``adjoint0`` is the adjoint q_0 in the convention of every
    estimator (H q ≈ ∇_w f), so v_0 = q_0/η; the result's ``x`` (w_t, or its tail average) and
    ``adjoint`` (q = η v_k) are the warm starts for the next upper-level step.

    Reported evidence: no a-posteriori bound exists for a stochastic estimate, so ``bound`` is
    None and ``bound_certified`` False. ``eps`` holds the estimated distance ‖∇_w h‖/μ and
    ``delta`` the estimated adjoint residual when the solvers measured them (adaptive
    accuracy), else NaN. Without ``accuracy``, passing ``lower_tol`` or ``adjoint_tol`` is an
    error: the iteration counts t and k are fixed by the solvers. ``loss`` and ``losses`` are
    the upper loss at w_t, exact when ``upper_batch`` is None, else the mean over the J stage-3
    upper minibatches.

    Raises:
        BilevelError: no ``finite_sum``; ``upper_batch`` without
            ``finite_sum.upper_loss``; a batch size not positive or larger than the number of
            samples; ``batch`` not None.
        NonFiniteError: an iterate of stage 1 or 2 became NaN or infinite (with advice).
    """

    lower_solver: StochasticLowerSolver = field(default_factory=StochasticFixedPoint)
    linear_solver: StochasticLinearSolver = field(default_factory=StochasticLinearFixedPoint)
    step: float | None = None
    lower_batch: int | None = 32
    linear_batch: int | None = 32
    final_batch: int | None = 32
    upper_batch: int | None = None
    final_minibatches: int = 1
    replace: bool = False
    seed: int | None = 0
    accuracy: InnerAccuracy | None = None
    diagonal: Diagonal | None = None
    sample_hessian: SampleHessianFn | None = None

    #: Data parallel, SID splits the finite sum's rows over the processes itself (the
    #: upper-level method then gives every process every instance).
    shards_rows: ClassVar[bool] = True

    @property
    def uses_tolerances(self) -> bool:  # type: ignore[override]
        """Whether ``lower_tol``/``adjoint_tol`` set the inner accuracy: with ``accuracy``."""
        return self.accuracy is not None

    def __post_init__(self) -> None:
        if self.accuracy is not None and not isinstance(self.accuracy, InnerAccuracy):
            raise BilevelError(
                f"accuracy must be an InnerAccuracy or None, got {type(self.accuracy).__name__}"
            )
        if self.diagonal is not None and not callable(self.diagonal):
            raise BilevelError("diagonal must be a callable (w, theta, index) -> diag")
        if self.sample_hessian is not None and not callable(self.sample_hessian):
            raise BilevelError(
                "sample_hessian must be a callable (w, theta, index) -> an object with "
                "gradient() and product(v)"
            )
        for name in ("lower_batch", "linear_batch", "final_batch", "upper_batch"):
            object.__setattr__(self, name, _batch_size(name, getattr(self, name)))
        object.__setattr__(
            self, "final_minibatches", _positive_int("final_minibatches", self.final_minibatches)
        )
        if self.step is not None:
            object.__setattr__(self, "step", _positive_float("step", self.step))
        if self.seed is not None:
            object.__setattr__(self, "seed", _nonnegative_int("seed", self.seed))
        if not isinstance(self.lower_solver, StochasticLowerSolver):
            raise BilevelError(
                "lower_solver must have solve(phi, x0) -> StochasticSolution "
                f"(e.g. StochasticFixedPoint()), got {type(self.lower_solver).__name__}"
            )
        if not isinstance(self.linear_solver, StochasticLinearSolver):
            raise BilevelError(
                "linear_solver must have solve(psi, x0) -> StochasticSolution "
                f"(e.g. StochasticLinearFixedPoint()), got {type(self.linear_solver).__name__}"
            )

    def init_state(self) -> SIDState:
        """A fresh :class:`SIDState`: streams from ``seed``, copies of the stage solvers,
        accuracy scale 1."""
        return SIDState(self)

    # -- checks ----------------------------------------------------------------------------

    def _check_problem(self, problem: BilevelProblem, batch: Batch) -> tuple[int, int | None]:
        if problem.finite_sum is None:
            raise BilevelError(
                "SID needs minibatch access to the lower level: build the BilevelProblem with "
                "finite_sum=FiniteSum(lower_energy=(x, theta, index) -> (B,), n_lower=N) "
                "(finite_sum_problem builds one from that energy alone; the models of "
                "bilevel.learning provide it); for problems without a finite sum use "
                "Implicit(...)"
            )
        if batch is not None:
            raise BilevelError(
                "SID draws its own minibatches through finite_sum.lower_energy(x, theta, index): "
                "batch must be None (close over the data instead)"
            )
        n = int(problem.finite_sum.n_lower)
        for name in ("lower_batch", "linear_batch", "final_batch"):
            b = getattr(self, name)
            if b is not None and b > n:
                raise BilevelError(
                    f"{name}={b} exceeds the number of lower-level samples N = {n} "
                    f"(pass {name}=None for full batches)"
                )
        n_up = None
        if self.upper_batch is not None:
            if problem.finite_sum.upper_loss is None:
                raise BilevelError(
                    f"upper_batch={self.upper_batch} needs FiniteSum(upper_loss=(x, theta, "
                    "index) -> (B,), n_upper=...) in the BilevelProblem; pass upper_batch=None "
                    "to use the exact upper loss"
                )
            n_up = int(problem.finite_sum.n_upper)
            if self.upper_batch > n_up:
                raise BilevelError(
                    f"upper_batch={self.upper_batch} exceeds the number of upper-level samples "
                    f"{n_up} (pass upper_batch=None for the exact upper loss)"
                )
        return n, n_up

    def _map_step(self, problem: BilevelProblem, lower: LowerLevel, x0: Tensor) -> float:
        if self.step is not None:
            return self.step
        lip = problem.lipschitz_bound()
        if lip is None:
            gen = torch.Generator(device=x0.device)
            gen.manual_seed(0)
            values, _ = largest_eigenvalue(lower.hessian(x0).matvec, x0, 20, gen)
            lip = float(values.max())
        if not (math.isfinite(lip) and lip > 0):
            raise BilevelError(f"the Lipschitz bound of the lower gradient must be > 0, got {lip}")
        return 1.0 / lip

    @staticmethod
    def _stage(
        name: str,
        solver: Any,
        fn: Any,
        x0: Tensor,
        detail: str,
        tol: float | None = None,
        max_iter: int | None = None,
    ) -> StochasticSolution:
        if tol is not None and not {"tol", "max_iter"} <= set(
            inspect.signature(solver.solve).parameters
        ):
            raise BilevelError(
                f"SID {name}: the adaptive accuracy needs solve(fn, x0, tol=, max_iter=), "
                f"which {type(solver).__name__} lacks; pass accuracy=None for fixed counts"
            )
        try:
            if tol is None:
                sol = solver.solve(fn, x0)
            else:
                sol = solver.solve(fn, x0, tol=tol, max_iter=max_iter)
        except NonFiniteError as err:
            raise NonFiniteError(f"SID {name} ({detail}): {err}") from err
        if not isinstance(sol, StochasticSolution) or sol.x.shape != x0.shape:
            raise BilevelError(
                f"SID {name}: {type(solver).__name__}.solve must return a StochasticSolution "
                "with x shaped like x0"
            )
        if not bool(torch.isfinite(sol.x).all()):
            raise NonFiniteError(
                f"SID {name} ({detail}): the solution is NaN or infinite; the iteration "
                "diverged: increase gamma, decrease beta, or use larger minibatches"
            )
        return sol

    # -- the three stages -------------------------------------------------------------------

    def _estimate(self, problem, batch, lower, x0, lower_tol, adjoint_tol, adjoint0, state):
        if not isinstance(state, SIDState):
            raise BilevelError(
                f"SID needs the SIDState of SID.init_state(), got {type(state).__name__}"
            )
        n, n_up = self._check_problem(problem, batch)
        cost = lower.cost
        params = problem.params
        x0 = x0.detach()
        n_inst = x0.shape[0]
        eta = self._map_step(problem, lower, x0)
        samplers = state.samplers
        shard = distributed.current()
        if shard is not None:  # data parallel: this process's rows and streams
            samplers.assign(shard.rank, shard.world)
        counted = (cost.grad_evals, cost.hvps, cost.vjps)

        def detail(b: int | None) -> str:
            size = n if b is None else b
            return f"minibatches of {size} of {n} samples, map step η = {eta:.4g}"

        acc, scale = self.accuracy, state.accuracy_scale
        lower_target = adjoint_target = math.nan
        if acc is not None:
            lower_target = scale * _tolerance("lower_tol", lower_tol)
            adjoint_target = scale * _tolerance("adjoint_tol", adjoint_tol)

        # stage 1: w_t; one preconditioner for both stages (θ is fixed during the call)
        closed = self.sample_hessian
        curvature = _Curvature(problem, self.diagonal, cost, closed, keep=True)
        phi = LowerMap(
            problem, eta, samplers.lower, self.lower_batch, cost, self.diagonal, closed, curvature
        )
        low = self._stage(
            "stage 1 (lower level)",
            state.lower_solver,
            phi,
            x0,
            detail(phi.batch_size),
            None if acc is None else eta * lower_target,
            None if acc is None else acc.max_lower,
        )
        w = low.x.detach()

        # stage 2: v_k
        exact = None if self.upper_batch is not None else _ExactUpper(problem, w)
        psi = AdjointMap(
            problem,
            w,
            eta,
            samplers.linear,
            self.linear_batch,
            self.upper_batch,
            cost,
            exact,
            self.diagonal,
            closed,
            curvature,
        )
        v0 = torch.zeros_like(w) if adjoint0 is None else adjoint0.detach().to(w) / eta
        J = self.final_minibatches
        b3 = n if self.final_batch is None else self.final_batch
        final = _FinalTerms(problem, samplers.final, w, b3, J, self.upper_batch)
        psi.after = final  # stage 3's terms without v, in a free wait of stage 2
        lin = self._stage(
            "stage 2 (adjoint)",
            state.linear_solver,
            psi,
            v0,
            detail(psi.batch_size),
            None if acc is None else adjoint_target,
            None if acc is None else acc.max_adjoint,
        )
        v = lin.x.detach()
        # a full Hessian graph of stage 2 also gave the full gradient at (w, θ): the anchor of
        # a variance-reduced stage 1 at the point where its next call starts
        pop = getattr(state.linear_solver, "pop_full_gradient", None)
        share = getattr(state.lower_solver, "share_anchor", None)
        shared = pop() if pop is not None else None
        if shared is not None and share is not None:
            share(phi, *shared)

        # stage 3: ĝ = ∇_λ Ê − η Ĵᵀ v, averaged over J minibatches
        psi.after = None
        final()  # its terms without v, unless a wait of stage 2 computed them
        with torch.enable_grad():
            jtv = torch.autograd.grad(final.g, params, v, allow_unused=True)
        cost.vjps += n_inst * final.idx.numel() / n
        # data parallel, one all-reduce: the products, the upper terms, the oracle calls
        parts: list[tuple[Tensor, int | None]] = [(j, n) for j in jtv if j is not None]
        if self.upper_batch is not None:
            parts += [(t, n_up) for t in final.upper_grad]
            parts.append((final.upper_losses, n_up))
        if shard is not None:  # oracle calls of every process
            spent = [cost.grad_evals - counted[0], cost.hvps - counted[1], cost.vjps - counted[2]]
            parts.append((torch.tensor(spent, dtype=torch.float64), None))
        pending = None if exact is None else exact.parts  # stage 2 made no product: here
        reduced = iter(_combined_all(*parts, *(pending or ())))
        jtv = [None if j is None else next(reduced) for j in jtv]
        if self.upper_batch is not None:
            grad_theta = [next(reduced) for _ in params]
            losses = next(reduced)
        if shard is not None:
            spent = next(reduced).tolist()
            cost.grad_evals, cost.hvps, cost.vjps = (c + d for c, d in zip(counted, spent))
        if exact is not None:
            if pending is not None:
                exact.combine(list(reduced))
            losses, _, grad_theta = exact.values()
        grad = [gt if j is None else gt - (eta / n_inst) * j for gt, j in zip(grad_theta, jtv)]
        loss = float(losses.mean())
        for gr in grad:
            if not bool(torch.isfinite(gr).all()):
                raise NonFiniteError(
                    "SID stage 3: the hypergradient estimate is NaN or infinite (check the "
                    "data and θ, or the stability of stages 1 and 2)"
                )
        nan = torch.full((n_inst,), math.nan, dtype=w.dtype, device=w.device)
        mu_t = problem.mu_values(batch, w)  # a function of θ is evaluated at the current θ
        mu = None if mu_t is None else float(mu_t.min())
        # estimated distance ‖w_t − w(θ)‖ ≤ ‖∇h(w_t)‖/μ and adjoint residual, when measured
        dist = nan if mu_t is None else low.residual / eta / mu_t
        resid = torch.full_like(nan, lin.residual)
        return StochasticHypergradient(
            grad=[gr.detach() for gr in grad],
            loss=loss,
            losses=losses,
            bound=None,
            bound_certified=False,
            x=w,
            adjoint=eta * v,
            eps=dist,
            delta=resid,
            lower=None,
            linear=None,
            mu=mu,
            mu_estimated=mu is None,
            cost=cost,
            map_step=eta,
            lower_report=low,
            linear_report=lin,
            lower_target=lower_target,
            adjoint_target=adjoint_target,
            accuracy_scale=scale,
        )


def finite_sum_problem(
    sample_energy: Callable[[Tensor, Any, Tensor], Tensor],
    upper_loss: Callable[[Tensor, Any, Any], Tensor],
    theta: Any,
    n_samples: int,
    *,
    mu: Any = None,
    lipschitz: float | Callable[[], float] | None = None,
    upper_regulariser: Callable[[Any], Tensor] | None = None,
    upper_sample_loss: Callable[[Tensor, Any, Tensor], Tensor] | None = None,
    n_upper_samples: int | None = None,
) -> BilevelProblem:
    """The :class:`~bilevel.problem.BilevelProblem` of a finite-sum lower level from its one
    energy (its :class:`~bilevel.problem.FiniteSum` and its h), for SID and every other
    estimator.

    ``sample_energy(x, theta, index) -> (B,)`` is ĥ over the samples ``index`` (positions in
    0..N−1, N = ``n_samples``): the mean of their terms plus any regulariser, an unbiased
    estimate of h when ``index`` is drawn uniformly. The full energy h(x, θ) is the same
    function on all N positions, so it is written once. The data live in the closures:
    ``batch`` is None (one lower-level instance per row of x, all on the same data).
    ``upper_loss(x, theta, batch)`` is f; the other arguments are those of
    :class:`~bilevel.problem.BilevelProblem`.
    """
    n = _positive_int("n_samples", n_samples)

    def lower_energy(x: Tensor, th: Any, batch: Any) -> Tensor:
        if batch is not None:
            raise BilevelError(
                "a finite_sum_problem keeps its data in the closures: batch must be None"
            )
        return sample_energy(x, th, torch.arange(n, device=x.device))

    return BilevelProblem(
        lower_energy,
        upper_loss,
        theta,
        mu=mu,
        upper_regulariser=upper_regulariser,
        lipschitz=lipschitz,
        finite_sum=FiniteSum(sample_energy, n, upper_sample_loss, n_upper_samples),
    )
