"""Measuring a hyperparameter-learning run: F(θ) at an accurate w(θ)
(:class:`LowerEvaluator`), the single-strength grid baseline, time-budgeted evaluation
(:class:`ThrottledEvaluation`), SID's rise guard and the run's lower-level instances.

The evaluator's solves are not counted in the method's wall time or cost.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bilevel import distributed
from bilevel.autodiff import Cost, LowerLevel
from bilevel.hypergrad import EstimatorState
from bilevel.learning.hpo import gradient_scale, theta_box
from bilevel.learning.models import (
    FiniteSumModel,
    HypercleaningModel,
    RidgeModel,
    accuracy,
)
from bilevel.lower import LBFGS, solve_lower
from bilevel.methods import TensorSamples
from bilevel.problem import BilevelError
from bilevel.stochastic import SIDState

__all__ = [
    "EVALUATION_SHARE",
    "LowerEvaluator",
    "RiseGuard",
    "ThrottledEvaluation",
    "evaluation_noise",
    "guard_sid",
    "lower_instances",
    "single_strength_baseline",
]

# Accurate lower solves (evaluation, baseline): ‖∇h(w)‖ ≤ rtol · ‖∇h(0, θ₀)‖.
_EVAL_RTOL = {torch.float64: 1e-8, torch.float32: 1e-5}


class LowerEvaluator:
    """F(θ) = f(w(θ)) and test metrics of w(θ), with w(θ) from an accurate lower solve.

    w(θ) is computed by L-BFGS to ‖∇_w h(w, θ)‖ ≤ rtol · ‖∇_w h(0, θ₀)‖ (rtol 1e-8 in float64,
    1e-5 in float32), warm-started from the previous evaluation. As an ISGD ``evaluate``
    callback, ``evaluator(theta, step)`` returns ``{"val_loss": F(θ), "test_accuracy": ...}``
    (classification) or ``{"val_loss", "test_mse", "test_r2"}`` (ridge; mean squared error in
    squared target units, and the coefficient of determination), plus ``"shrinkage_penalty"``
    r(θ) = (ρ/2)‖θ − θ̄‖² when the model has a shrinkage ρ > 0 (the upper objective is F + r).
    With cross-validation folds, w(θ) holds one solution per fold, F is the mean of the fold
    losses and the test metrics are averaged over the fold solutions.
    """

    def __init__(
        self,
        model: FiniteSumModel,
        X_test: Tensor,
        y_test: Tensor,
        *,
        rtol: float | None = None,
        max_iter: int = 1000,
    ) -> None:
        self.model = model
        self.X_test = X_test
        self.y_test = y_test
        rtol = _EVAL_RTOL.get(model.dtype, 1e-5) if rtol is None else float(rtol)
        self.tol = rtol * gradient_scale(model)
        self.solver = LBFGS(max_iter=max_iter)
        self.w = model.init_w(model.n_instances)
        self.cost = Cost()

    def solve(self, theta: Tensor | None = None) -> Tensor:
        """w(θ) of shape (K, *event_shape), one per lower-level instance (K = 1, or the
        cross-validation folds; θ defaults to the model's current θ)."""
        model = self.model
        saved = None
        if theta is not None:
            saved = model.theta.detach().clone()
            with torch.no_grad():
                model.theta.copy_(torch.as_tensor(theta, dtype=model.dtype).expand_as(model.theta))
        try:
            lower = LowerLevel(model.problem, model.instance_batch(), self.cost)
            sol = solve_lower(lower, self.w, self.tol, self.solver, model.problem.mu, warn=False)
        finally:
            if saved is not None:
                with torch.no_grad():
                    model.theta.copy_(saved)
        self.w = sol.x.detach()
        return self.w

    def metrics(self, theta: Tensor | None = None) -> dict[str, float]:
        """Validation loss F(θ) and test metrics at θ (default: the model's θ)."""
        w = self.solve(theta)
        model = self.model
        with torch.no_grad():
            # the validation loss, or with folds the mean of the fold losses
            val = float(model.upper_loss(w, model.theta, model.instance_batch()).mean())
            out = {"val_loss": val}
            if getattr(model, "shrinkage", 0.0):
                out["shrinkage_penalty"] = float(model.shrinkage_penalty(model.theta))
            out.update(self._test_metrics(w))
        return out

    def _test_metrics(self, w: Tensor) -> dict[str, float]:
        """Test metrics of the solutions w (K, *event_shape), averaged over the K."""
        if isinstance(self.model, RidgeModel):
            pred = self.X_test @ w.reshape(len(w), -1).T  # (n_test, K); X_test may be sparse
            y = self.y_test.to(pred.dtype)[:, None]
            mse = ((pred - y) ** 2).mean(dim=0)
            var = float(((y - y.mean()) ** 2).mean())
            return {
                "test_mse": float(mse.mean()),
                "test_r2": float((1.0 - mse / var).mean()) if var > 0 else math.nan,
            }
        return {
            "test_accuracy": sum(accuracy(wk[None], self.X_test, self.y_test) for wk in w) / len(w)
        }

    def __call__(self, theta: Any, step: int) -> dict[str, float]:
        return self.metrics()


def single_strength_baseline(
    model: FiniteSumModel,
    evaluator: LowerEvaluator,
    grid: Sequence[float] | None = None,
    *,
    patience: int | None = 2,
    theta_range: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """The best common θ (one strength for every feature, or one weight for every sample).

    Evaluates F on ``grid`` in the given order. The default grid is the integers of the θ box
    ``theta_range`` (default :data:`DEFAULT_THETA_RANGE`) from high to low, or its midpoint
    when it holds no integer: a warm-started regularisation path from strong to weak ℓ2, or
    from small to large sample weights. Returns ``{"theta", "strength", "val_loss", test
    metrics..., "grid_size", "evaluated", "seconds"}`` at the minimiser; ``strength`` is exp θ
    (logistic, ridge) or the sample weight σ(θ) (hypercleaning). With ``patience`` the path
    stops after that many consecutive values worse than the best so far (F is typically
    unimodal along the path, and the weakly regularised end is the most expensive to solve);
    ``None`` evaluates the whole grid. The model's θ is left unchanged; the evaluator's warm
    start is left at w(θ) of the best value, so that solving there again costs nothing.
    """
    start = time.perf_counter()
    if grid is None:
        lo, hi = theta_box(model, theta_range)
        grid = [float(v) for v in np.arange(math.floor(hi), math.ceil(lo) - 1, -1.0)] or [
            0.5 * (lo + hi)
        ]
    if not grid:
        raise BilevelError("the grid of common θ values is empty")
    best: dict[str, Any] | None = None
    best_w = evaluator.w
    worse = evaluated = 0
    for value in grid:
        m = evaluator.metrics(torch.tensor(float(value)))
        evaluated += 1
        if best is None or m["val_loss"] < best["val_loss"]:
            best, best_w = {"theta": float(value), **m}, evaluator.w
            worse = 0
        else:
            worse += 1
            if patience is not None and worse >= patience:
                break
    assert best is not None
    evaluator.w = best_w
    theta = best["theta"]
    hyper = isinstance(model, HypercleaningModel)
    best["strength"] = 1.0 / (1.0 + math.exp(-theta)) if hyper else math.exp(theta)
    best["grid_size"] = len(grid)
    best["evaluated"] = evaluated
    best["seconds"] = time.perf_counter() - start
    return best


def evaluation_noise(evaluator: LowerEvaluator) -> float:
    """How far F(θ) from the evaluator's solve may be from the true F (units of F): the solve
    stops at ‖∇_w h‖ ≤ tol, so r = ‖w̃ − w(θ)‖ ≤ tol/μ and |f(w̃) − f(w(θ))| ≤ ‖∇f(w̃)‖ r +
    L_f r²/2, with L_f ≤ ‖X_val‖_F²/n_val (every loss curvature here is at most 1). At the
    evaluator's current w; at least 10⁻¹² of |F|."""
    model = evaluator.model
    w = evaluator.w.detach().requires_grad_(True)
    with torch.enable_grad():
        f = model.upper_loss(w, model.theta, model.instance_batch()).sum()
        (g,) = torch.autograd.grad(f, w)
    mu = model.problem.mu or math.nan
    r = evaluator.tol / mu
    X = model.X_val
    sq = X.values() if model.sparse else X
    lf = float((sq.to(torch.float64) ** 2).sum()) / max(model.n_val, 1)
    noise = float(g.norm()) * r + 0.5 * lf * r * r
    value = abs(float(f.detach()))
    return max(noise, 1e-12 * value) if math.isfinite(noise) else math.inf


class RiseGuard:
    """An ``evaluate`` callback around another that watches SID's upper objective: when
    F(θ_k) (+ the shrinkage penalty) exceeds its value at the start by more than ``noise``
    (the evaluation noise), it asks SID for more inner accuracy through the run's
    :class:`~bilevel.stochastic.SIDState` (:meth:`~bilevel.stochastic.SIDState.tighten`: the
    targets s·ε_k, s·δ_k shrink by the :class:`InnerAccuracy` factor) and warns on
    ``stream``. The scale is part of that checkpointed state (the run restores it in place),
    so a resumed run keeps it. The records get ``sid_tightened`` = the new scale at those
    steps."""

    def __init__(
        self,
        evaluate: Callable[[Any, int], dict[str, float]],
        state: SIDState,
        start: float,
        noise: float,
        stream: Any = None,
    ) -> None:
        self.evaluate = evaluate
        self.state = state
        self.start = float(start)
        self.noise = float(noise)
        self.stream = stream

    def __call__(self, theta: Any, step: int) -> dict[str, float]:
        out = self.evaluate(theta, step)
        if "val_loss" not in out:
            return out
        value = float(out["val_loss"]) + float(out.get("shrinkage_penalty", 0.0))
        if value > self.start + self.noise:
            old = self.state.accuracy_scale
            scale = self.state.tighten()
            out = {**out, "sid_tightened": scale}
            print(
                f"warning: at step {step} the upper objective {value:.6g} exceeds its start "
                f"{self.start:.6g} by more than the evaluation noise {self.noise:.2g}: SID's "
                f"inner tolerances tightened from {old:.3g}·ε_k to {scale:.3g}·ε_k",
                file=self.stream or sys.stderr,
            )
        return out


def guard_sid(
    evaluate: Callable[[Any, int], dict[str, float]],
    state: EstimatorState,
    evaluator: LowerEvaluator,
    initial: Mapping[str, float],
) -> Callable[[Any, int], dict[str, float]]:
    """``evaluate`` wrapped in a :class:`RiseGuard` on ``state`` (the estimator state the run
    will carry: pass the same object as the run's ``estimator_state``) when it is the state of
    SID with adaptive accuracy (start: the objective in ``initial``, noise:
    :func:`evaluation_noise`), else ``evaluate`` itself."""
    if not isinstance(state, SIDState) or state.accuracy is None:
        return evaluate
    start = float(initial["val_loss"]) + float(initial.get("shrinkage_penalty", 0.0))
    return RiseGuard(evaluate, state, start, evaluation_noise(evaluator))


#: Largest share of a time-budgeted run's wall time spent on evaluations by default.
EVALUATION_SHARE = 0.2


class ThrottledEvaluation:
    """An ISGD ``evaluate`` callback that evaluates at its first call and then only while the
    evaluations so far have taken at most ``share`` of the wall time since that call, so that
    an accurate F(θ) costing as much as many steps does not dominate a time-budgeted run.
    Skipped steps log no metrics."""

    def __init__(
        self,
        evaluate: Callable[[Any, int], dict[str, float]],
        share: float,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.evaluate = evaluate
        self.share = share
        self.clock = clock
        self.start: float | None = None
        self.spent = 0.0

    def __call__(self, theta: Any, step: int) -> dict[str, float]:
        now = self.clock()
        if self.start is None:
            self.start = now
        skip = self.spent > self.share * (now - self.start)
        if distributed.current() is not None:  # rank 0's clock decides for every process
            skip = distributed.current().broadcast_object(skip)
        if skip:
            return {}
        out = self.evaluate(theta, step)
        self.spent += self.clock() - now
        return out


def lower_instances(model: FiniteSumModel, w0: Tensor | None = None) -> TensorSamples:
    """The :class:`~bilevel.methods.SampleSet` of a hyperparameter-learning problem: one
    lower-level instance whose data live in the model's closure (``batch`` None), or with
    cross-validation folds one instance per fold (``batch`` its fold index), started from
    ``w0`` (shape (K, *event_shape); default zeros)."""
    start = model.init_w(model.n_instances)
    if w0 is not None:
        start = w0.detach().reshape(start.shape).clone()
    if model.folds is None:
        return TensorSamples(x_init=start)
    return TensorSamples(model.instance_batch(), x_init=start)
