"""Stochastic implicit differentiation (SID) for lower levels that are large finite sums.

The lower level h(w, λ) = (1/N) Σ_j ℓ_j(w, λ) + Ω(w, λ) is written as the fixed point of one
gradient step,

    w = Φ(w, λ) = w − η ∇_w h(w, λ),        ∂_wΦ = I − η H,   ∂_λΦ = −η J,

(η > 0 the *map step*, in units of w per unit of ∇_w h, i.e. 1 / curvature; H = ∇²_ww h and
J = ∇²_λw h), and Φ̂ is the same map on a minibatch I of the N samples. With
v* = (I − ∂_wΦᵀ)⁻¹ ∇_w E = H⁻¹∇_w E / η the hypergradient is ∇_λE + ∂_λΦᵀ v* (PAPERS.md §5).
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

The two solvers are pluggable: any object with ``solve(T, x0) -> StochasticSolution`` (the
:class:`StochasticLowerSolver` / :class:`StochasticLinearSolver` protocols) can replace either.
``T`` is a :class:`StochasticMap`, a callable that evaluates T̂(x) on a fresh minibatch at every
call; the maps passed by SID also expose their parts (:class:`LowerMap`, :class:`AdjointMap`).

Sampling: three independent ``torch.Generator`` streams (stages 1, 2, 3) derived from one seed
(:class:`StageSamplers`). Indices are drawn on the CPU and moved to the device of the
iterates, so a seed gives the same index streams on every device.

Cost (:class:`~bilevel.autodiff.Cost`), per instance, a minibatch of b of N samples counting
b/N of a call: stage 1 one gradient evaluation per step, stage 2 one Hessian-vector product
per step (building the minibatch gradient graph is part of the product), stage 3 one mixed
VJP on the J·b final samples. Gradients of the upper level are not counted (as in
:mod:`bilevel.hypergrad`).
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from bilevel.autodiff import Cost, LowerLevel, upper_gradients
from bilevel.hypergrad import Estimator, Hypergradient
from bilevel.linear import largest_eigenvalue
from bilevel.problem import Batch, BilevelError, BilevelProblem, NonFiniteError

__all__ = [
    "SID",
    "AdjointMap",
    "LowerMap",
    "MinibatchSampler",
    "StageSamplers",
    "StochasticFixedPoint",
    "StochasticHypergradient",
    "StochasticLinearFixedPoint",
    "StochasticLinearSolver",
    "StochasticLowerSolver",
    "StochasticMap",
    "StochasticSolution",
    "VarianceReducedFixedPoint",
    "snapshot_theta",
]

_CHECK_EVERY = 16  # iterations between finiteness checks (each check synchronises a GPU)


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

    def draw(
        self, n: int, size: int, count: int = 1, device: torch.device | str | None = None
    ) -> Tensor:
        """``count`` independent minibatches of ``size`` positions in 0..n−1, concatenated.

        Returns an int64 tensor of shape ``(count * size,)`` on ``device``.
        """
        if size > n:
            raise BilevelError(f"minibatch of {size} samples exceeds the {n} available")
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
    """

    x: Tensor
    last_iterate: Tensor
    iterations: int
    averaged: int
    last_step: float


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

    def solve(self, phi: StochasticMap, x0: Tensor) -> StochasticSolution:
        """Run ``iterations`` steps from ``x0`` (B, ...)."""
        x = x0.detach()
        t = self.iterations
        n_avg = math.ceil(self.average * t) if self.average > 0 else 0
        start_avg = t - n_avg
        avg = None
        eta = math.nan
        for s in range(t):
            eta = self.step_size(s)
            tx = phi(x)
            if not isinstance(tx, Tensor) or tx.shape != x.shape:
                raise BilevelError("the stochastic map must return a tensor shaped like x")
            x = torch.lerp(x, tx, eta)  # (1 − η_s) x + η_s T̂(x), exact at η_s = 1
            if s >= start_avg:
                avg = (
                    x.clone() if avg is None else avg.add_(x - avg, alpha=1.0 / (s - start_avg + 1))
                )
            if (s + 1) % _CHECK_EVERY == 0 or s == t - 1:
                self._check(x, s + 1)
        out = x if avg is None else avg
        return StochasticSolution(out, x, t, n_avg, eta)

    def _check(self, x: Tensor, s: int) -> None:
        _check_iterate(
            x,
            s,
            f"{type(self).__name__} ({self.describe()})",
            "increase gamma (smaller first steps), decrease beta, or use larger minibatches",
        )


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

    def _take_anchor(self, phi: LowerMap, x: Tensor, key: tuple[Any, ...]) -> None:
        theta = snapshot_theta(phi.problem.theta)
        self._anchor = x.detach().clone()
        self._anchor_theta = theta
        self._anchor_gradient = phi.full_gradient(self._anchor, theta)
        self._anchor_key = key
        self._since_refresh = 0

    def solve(self, phi: StochasticMap, x0: Tensor) -> StochasticSolution:
        """Run ``iterations`` steps from ``x0`` (B, ...)."""
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
        for s in range(self.iterations):
            if self._anchor is None or self._since_refresh >= refresh:
                self._take_anchor(phi, x, key)
            idx = phi.draw(x.device)
            g = phi.gradient(x, idx) - phi.gradient(self._anchor, idx, self._anchor_theta)
            x = x - (beta * eta) * (g + self._anchor_gradient)
            self._since_refresh += 1
            if (s + 1) % _CHECK_EVERY == 0 or s == self.iterations - 1:
                _check_iterate(x, s + 1, repr(self), "decrease the step or use larger minibatches")
        return StochasticSolution(x, x, self.iterations, 0, beta if self.iterations else math.nan)

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


# ---------------------------------------------------------------------------------------------
# the stochastic maps of SID


def _checked_values(name: str, value: Any, n: int) -> Tensor:
    if not isinstance(value, Tensor) or value.shape != (n,):
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise BilevelError(f"{name} must return one value per instance, shape ({n},); got {shape}")
    return value


class LowerMap:
    """Φ̂(w) = w − η ∇_w ĥ(w, θ; I), a fresh minibatch I of ``batch_size`` samples per call.

    ``batch_size=None`` uses all N samples (then Φ̂ = Φ). Each call counts B·b/N gradient
    evaluations in ``cost``.
    """

    def __init__(
        self,
        problem: BilevelProblem,
        step: float,
        sampler: MinibatchSampler,
        batch_size: int | None,
        cost: Cost,
    ) -> None:
        self.problem = problem
        self.step = float(step)
        self.sampler = sampler
        self.n = int(problem.n_lower_samples)
        self.batch_size = self.n if batch_size is None else int(batch_size)
        self.cost = cost

    def draw(self, device: torch.device | str | None = None) -> Tensor:
        """A fresh minibatch of ``batch_size`` sample positions (nothing is counted)."""
        return self.sampler.draw(self.n, self.batch_size, device=device)

    def gradient(self, w: Tensor, index: Tensor | None = None, theta: Any = None) -> Tensor:
        """∇_w ĥ(w, θ; I) on the minibatch ``index`` (default: a fresh one), shape of w
        (detached). ``theta`` defaults to the problem's current θ (a snapshot may be passed)."""
        idx = self.draw(w.device) if index is None else index
        theta = self.problem.theta if theta is None else theta
        with torch.enable_grad():
            wr = w.detach().requires_grad_(True)
            e = self.problem.lower_sample_energy(wr, theta, idx)
            e = _checked_values("lower_sample_energy", e, w.shape[0])
            (g,) = torch.autograd.grad(e.sum(), wr)
        self.cost.grad_evals += w.shape[0] * idx.numel() / self.n
        return g

    def full_gradient(self, w: Tensor, theta: Any = None) -> Tensor:
        """∇_w h(w, θ) on all N samples (the problem's ``lower_energy`` with ``batch=None``),
        counting one gradient evaluation per instance."""
        theta = self.problem.theta if theta is None else theta
        with torch.enable_grad():
            wr = w.detach().requires_grad_(True)
            e = self.problem.lower_energy(wr, theta, None)
            e = _checked_values("lower_energy", e, w.shape[0])
            (g,) = torch.autograd.grad(e.sum(), wr)
        self.cost.grad_evals += w.shape[0]
        return g

    def __call__(self, w: Tensor) -> Tensor:
        return w - self.step * self.gradient(w)


class AdjointMap:
    """Ψ̂(v) = ∂_wΦ̂(w)ᵀ v + ∇_w Ê(w) = v − η Ĥ(w; I) v + ∇_w Ê(w; I') at the fixed point w.

    Ĥ is the Hessian of ĥ on a fresh lower minibatch I (``batch_size`` of N) per call, counting
    B·b/N Hessian-vector products; ∇_w Ê is the per-instance gradient of the upper loss, on a
    fresh upper minibatch I' of ``upper_batch`` (``None``: the exact ∇_w f, computed once).
    Custom linear solvers may call :meth:`matvec` and :meth:`rhs` separately.
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
        exact_rhs: Tensor | None = None,
    ) -> None:
        self.problem = problem
        self.w = w.detach()
        self.step = float(step)
        self.sampler = sampler
        self.n = int(problem.n_lower_samples)
        self.batch_size = self.n if batch_size is None else int(batch_size)
        self.upper_batch = upper_batch
        self.cost = cost
        self.exact_rhs = exact_rhs
        if upper_batch is None and exact_rhs is None:
            raise BilevelError("AdjointMap needs upper_batch or the exact right-hand side")

    def matvec(self, v: Tensor) -> Tensor:
        """Ĥ(w; I) v on a fresh lower minibatch (detached)."""
        w = self.w
        idx = self.sampler.draw(self.n, self.batch_size, device=w.device)
        with torch.enable_grad():
            wr = w.detach().requires_grad_(True)
            e = self.problem.lower_sample_energy(wr, self.problem.theta, idx)
            e = _checked_values("lower_sample_energy", e, w.shape[0])
            (g,) = torch.autograd.grad(e.sum(), wr, create_graph=True)
            (hv,) = torch.autograd.grad(g, wr, v, allow_unused=True)
        self.cost.hvps += w.shape[0] * self.batch_size / self.n
        return torch.zeros_like(v) if hv is None else hv

    def rhs(self) -> Tensor:
        """∇_w Ê(w; I') per instance on a fresh upper minibatch (or the exact ∇_w f)."""
        if self.upper_batch is None:
            return self.exact_rhs
        w = self.w
        n_up = int(self.problem.n_upper_samples)
        idx = self.sampler.draw(n_up, self.upper_batch, device=w.device)
        with torch.enable_grad():
            wr = w.detach().requires_grad_(True)
            loss = self.problem.upper_sample_loss(wr, self.problem.theta, idx)
            loss = _checked_values("upper_sample_loss", loss, w.shape[0])
            (g,) = torch.autograd.grad(loss.sum(), wr, allow_unused=True)
        return torch.zeros_like(w) if g is None else g

    def __call__(self, v: Tensor) -> Tensor:
        return v - self.step * self.matvec(v) + self.rhs()


# ---------------------------------------------------------------------------------------------
# the estimator


@dataclass(frozen=True)
class StochasticHypergradient(Hypergradient):
    """A :class:`~bilevel.hypergrad.Hypergradient` from :class:`SID`, with its reports.

    Attributes (besides the inherited ones):
        map_step: η, the step of the map Φ(w) = w − η∇_w h.
        lower_report, linear_report: the :class:`StochasticSolution` of stages 1 and 2.
    """

    map_step: float = math.nan
    lower_report: StochasticSolution | None = None
    linear_report: StochasticSolution | None = None


@dataclass(frozen=True, kw_only=True)
class SID(Estimator):
    """Stochastic implicit differentiation: ĝ = ∇_λÊ + ∂_λΦ̂ᵀ v_k (see the module docstring).

    Called like every :class:`~bilevel.hypergrad.Estimator`,
    ``SID(...)(problem, batch, x0, adjoint0=..., accumulate=...)``, it returns a
    :class:`StochasticHypergradient`. The problem must provide ``lower_sample_energy`` and
    ``n_lower_samples`` (and ``upper_sample_loss`` / ``n_upper_samples`` when ``upper_batch``
    is set); ``batch`` must be None, the finite-sum data being closed over.

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
        seed: seed of the three stage streams (:class:`StageSamplers`); ``None``: fresh OS
            entropy. The object owns its generators: successive calls continue the streams,
            so successive upper-level steps see fresh samples, and two objects built with the
            same seed produce the same sequence of estimates. ``samplers.reset()`` restarts
            them; ``samplers.state_dict()`` saves them for checkpoints.

    Warm starts: ``x0`` is w_0 and ``adjoint0`` is the adjoint q_0 in the convention of every
    estimator (H q ≈ ∇_w f), so v_0 = q_0/η; the result's ``x`` (w_t, or its tail average) and
    ``adjoint`` (q = η v_k) are the warm starts for the next upper-level step.

    Reported evidence: no a-posteriori bound exists for a stochastic estimate, so ``bound`` is
    None and ``bound_certified`` False; ``eps`` and ``delta`` are NaN (computing them would
    need full-data gradients). Passing ``lower_tol`` or ``adjoint_tol`` is an error: the
    iteration counts t and k are fixed by the solvers. ``loss`` and ``losses`` are the upper
    loss at w_t, exact when ``upper_batch`` is None, else the mean over the J stage-3 upper
    minibatches.
    The inherited fields ``constants``, ``compute_bound`` and ``warn_unconverged`` are unused.

    Raises:
        BilevelError: no ``lower_sample_energy``; ``upper_batch`` without
            ``upper_sample_loss``; a batch size not positive or larger than the number of
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

    uses_tolerances: ClassVar[bool] = False

    def __post_init__(self) -> None:
        for name in ("lower_batch", "linear_batch", "final_batch", "upper_batch"):
            object.__setattr__(self, name, _batch_size(name, getattr(self, name)))
        object.__setattr__(
            self, "final_minibatches", _positive_int("final_minibatches", self.final_minibatches)
        )
        if self.step is not None:
            object.__setattr__(self, "step", _positive_float("step", self.step))
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
        object.__setattr__(self, "_samplers", StageSamplers(self.seed, bool(self.replace)))

    @property
    def samplers(self) -> StageSamplers:
        """The three minibatch streams owned by this estimator."""
        return self._samplers  # type: ignore[attr-defined]

    _SOLVERS = ("lower_solver", "linear_solver")

    def solver_state_dict(self) -> dict[str, Any]:
        """The states of stateful stage solvers (those with ``state_dict``), for checkpoints."""
        return {
            name: getattr(self, name).state_dict()
            for name in self._SOLVERS
            if callable(getattr(getattr(self, name), "state_dict", None))
        }

    def load_solver_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`solver_state_dict`."""
        for name, solver_state in state.items():
            if name not in self._SOLVERS:
                raise BilevelError(f"unknown SID solver {name!r} in the saved state")
            getattr(self, name).load_state_dict(solver_state)

    # -- checks ----------------------------------------------------------------------------

    def _check_problem(self, problem: BilevelProblem, batch: Batch) -> tuple[int, int | None]:
        if problem.lower_sample_energy is None or problem.n_lower_samples is None:
            raise BilevelError(
                "SID needs minibatch access to the lower level: build the BilevelProblem with "
                "lower_sample_energy(x, theta, index) -> (B,) and n_lower_samples = N (the "
                "models of bilevel.learning provide them); for problems without a finite sum "
                "use Implicit(...)"
            )
        if batch is not None:
            raise BilevelError(
                "SID draws its own minibatches through lower_sample_energy(x, theta, index): "
                "batch must be None (close over the data instead)"
            )
        n = int(problem.n_lower_samples)
        for name in ("lower_batch", "linear_batch", "final_batch"):
            b = getattr(self, name)
            if b is not None and b > n:
                raise BilevelError(
                    f"{name}={b} exceeds the number of lower-level samples N = {n} "
                    f"(pass {name}=None for full batches)"
                )
        n_up = None
        if self.upper_batch is not None:
            if problem.upper_sample_loss is None or problem.n_upper_samples is None:
                raise BilevelError(
                    f"upper_batch={self.upper_batch} needs upper_sample_loss(x, theta, index) "
                    "and n_upper_samples in the BilevelProblem; pass upper_batch=None to use "
                    "the exact upper loss"
                )
            n_up = int(problem.n_upper_samples)
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
    def _stage(name: str, solver: Any, fn: Any, x0: Tensor, detail: str) -> StochasticSolution:
        try:
            sol = solver.solve(fn, x0)
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

    def _estimate(self, problem, batch, lower, x0, lower_tol, adjoint_tol, adjoint0):
        n, n_up = self._check_problem(problem, batch)
        cost = lower.cost
        params = problem.params
        x0 = x0.detach()
        n_inst = x0.shape[0]
        eta = self._map_step(problem, lower, x0)
        samplers = self.samplers

        def detail(b: int | None) -> str:
            size = n if b is None else b
            return f"minibatches of {size} of {n} samples, map step η = {eta:.4g}"

        # stage 1: w_t
        phi = LowerMap(problem, eta, samplers.lower, self.lower_batch, cost)
        low = self._stage(
            "stage 1 (lower level)", self.lower_solver, phi, x0, detail(phi.batch_size)
        )
        w = low.x.detach()

        # stage 2: v_k
        exact = None
        if self.upper_batch is None:
            losses, exact, grad_theta = upper_gradients(problem, w, None)
        psi = AdjointMap(
            problem, w, eta, samplers.linear, self.linear_batch, self.upper_batch, cost, exact
        )
        v0 = torch.zeros_like(w) if adjoint0 is None else adjoint0.detach().to(w) / eta
        lin = self._stage("stage 2 (adjoint)", self.linear_solver, psi, v0, detail(psi.batch_size))
        v = lin.x.detach()

        # stage 3: ĝ = ∇_λ Ê − η Ĵᵀ v, averaged over J minibatches
        J = self.final_minibatches
        b3 = n if self.final_batch is None else self.final_batch
        idx = samplers.final.draw(n, b3, count=J, device=w.device)
        with torch.enable_grad():
            wr = w.detach().requires_grad_(True)
            e = problem.lower_sample_energy(wr, problem.theta, idx)
            e = _checked_values("lower_sample_energy", e, n_inst)
            (g,) = torch.autograd.grad(e.sum(), wr, create_graph=True)
            jtv = torch.autograd.grad(g, params, v, allow_unused=True)
        cost.vjps += n_inst * J * b3 / n
        if self.upper_batch is not None:
            idx_up = samplers.final.draw(n_up, self.upper_batch, count=J, device=w.device)
            with torch.enable_grad():
                up = problem.upper_sample_loss(w, problem.theta, idx_up)
                up = _checked_values("upper_sample_loss", up, n_inst)
                gt = (
                    torch.autograd.grad(up.mean(), params, allow_unused=True)
                    if up.requires_grad
                    else [None] * len(params)
                )
            grad_theta = [torch.zeros_like(p) if t is None else t for p, t in zip(params, gt)]
            losses = up.detach()
        grad = [gt if j is None else gt - (eta / n_inst) * j for gt, j in zip(grad_theta, jtv)]
        loss = float(losses.mean())
        if problem.upper_regulariser is not None:
            with torch.enable_grad():
                reg = problem.upper_regulariser(problem.theta)
                reg_grads = torch.autograd.grad(reg, params, allow_unused=True)
            grad = [gr if r is None else gr + r for gr, r in zip(grad, reg_grads)]
            loss += float(reg.detach())
        for gr in grad:
            if not bool(torch.isfinite(gr).all()):
                raise NonFiniteError(
                    "SID stage 3: the hypergradient estimate is NaN or infinite (check the "
                    "data and θ, or the stability of stages 1 and 2)"
                )
        nan = torch.full((n_inst,), math.nan, dtype=w.dtype, device=w.device)
        mu = problem.mu
        return StochasticHypergradient(
            grad=[gr.detach() for gr in grad],
            loss=loss,
            losses=losses,
            bound=None,
            bound_certified=False,
            x=w,
            adjoint=eta * v,
            eps=nan,
            delta=nan.clone(),
            lower=None,
            linear=None,
            mu=mu,
            mu_estimated=mu is None,
            cost=cost,
            map_step=eta,
            lower_report=low,
            linear_report=lin,
        )
