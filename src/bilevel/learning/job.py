"""``bilevel hpo``: learn per-feature regularisation strengths (or per-sample weights) by
bilevel optimisation, and the reusable pieces behind it.

The problem (see :mod:`bilevel.learning.models`): for a model with log-hyperparameters θ,

    min_θ F(θ) = f(w(θ)) = (1/N_val) Σ_j ℓ(w(θ); x^val_j, y^val_j),
    w(θ) = argmin_w h(w, θ) = (1/N) Σ_j c_j(θ) ℓ(w; x_j, y_j) + Ω(w, θ),

with λ_k = exp θ_k one ℓ2 strength per feature (``logistic``, ``ridge``) or c_j = σ(θ_j) one
weight per (possibly mislabelled) training sample (``hypercleaning``). The upper level is ISGD
with Adam as the step (:class:`~bilevel.methods.ISGD`, one lower-level instance) and the
hypergradient comes from one of three estimators (:func:`hpo_estimator`):

* ``sid``: stochastic implicit differentiation, minibatch fixed-point iterations for w and for
  the adjoint, warm-started from the previous upper step (:class:`~bilevel.stochastic.SID`);
* ``aid-cg``: a full-batch L-BFGS lower solve and conjugate gradients for the adjoint, to
  absolute tolerances ε_k, δ_k, warm-started (:class:`~bilevel.hypergrad.Implicit`);
* ``itd``: differentiation through a fixed number of full-batch gradient steps from the
  previous lower iterate (:class:`~bilevel.hypergrad.Unrolled`).

θ is kept in a box [θ_lo, θ_hi] by a projection after each step, so that the stated strong
convexity μ = exp θ_lo (or the intercept strength) stays valid. F(θ) and the test metrics are
measured by :class:`LowerEvaluator`, which solves the lower level to a tight tolerance; its time
is not counted in the method's wall time. :func:`single_strength_baseline` is the usual
alternative: one common θ for every feature (or sample), chosen on the validation set from a
grid.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import math
import os
import pathlib
import re
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bilevel import distributed
from bilevel.autodiff import Cost, LowerLevel
from bilevel.hypergrad import Estimator, Implicit, Unrolled
from bilevel.learning.datasets import (
    CSV_SUFFIXES,
    SKLEARN_DATASETS,
    SplitData,
    class_labels,
    load_mnist,
    load_sklearn,
    make_synthetic_classification,
    make_synthetic_regression,
    random_folds,
    read_csv,
    read_svmlight,
    split_data,
    stack_rows,
)
from bilevel.learning.models import (
    FiniteSumModel,
    HypercleaningModel,
    LogisticModel,
    RidgeModel,
    accuracy,
    corrupt_labels,
)
from bilevel.learning.report import write_report
from bilevel.linear import CG
from bilevel.lower import LBFGS, solve_lower
from bilevel.methods import ISGD, Budget, RunResult, TensorSamples
from bilevel.methods.common import ranked_by
from bilevel.problem import BilevelError
from bilevel.runs import (
    RunLock,
    atomic_output,
    check_job_record,
    dumps_json,
    new_figure,
    to_jsonable,
    write_json,
)
from bilevel.schedules import Accuracy, Clipped, Polynomial, as_schedule
from bilevel.stochastic import (
    SID,
    InnerAccuracy,
    PreconditionedSVRG,
    PreconditionedSVRGLinear,
    StochasticFixedPoint,
    StochasticLinearFixedPoint,
    VarianceReducedFixedPoint,
)

__all__ = [
    "DEFAULT_PRIOR_STD",
    "DEFAULT_STEP",
    "DEFAULT_THETA_RANGE",
    "METHODS",
    "MODELS",
    "LowerEvaluator",
    "RiseGuard",
    "lower_instances",
    "add_arguments",
    "attach_lipschitz",
    "box_projection",
    "build_model",
    "default_method",
    "evaluation_noise",
    "guard_sid",
    "default_shrinkage",
    "hpo_estimator",
    "hpo_method",
    "load_data",
    "run",
    "sid_capped",
    "single_strength_baseline",
]

METHODS = ("sid", "aid-cg", "itd")
SID_SOLVERS = ("precond", "svrg", "sgd")  # stage solvers of SID in `bilevel hpo`
MODELS = ("logistic", "ridge", "hypercleaning")

#: Box [θ_lo, θ_hi] for the log-strengths (logistic, ridge: λ ∈ [4.5e-5, 20]) and for the
#: sample-weight logits (hypercleaning: σ(θ) ∈ [0.0025, 0.9975]).
DEFAULT_THETA_RANGE: dict[str, tuple[float, float]] = {
    "logistic": (-10.0, 1.0),
    "ridge": (-10.0, 3.0),
    "hypercleaning": (-6.0, 6.0),
}

#: Adam's step α_k on θ (units of θ, i.e. of log-strength, per step).
DEFAULT_STEP = "poly:0.1,0.25"

#: τ, the prior standard deviation of the per-feature log-strengths around their mean, that
#: sets the default shrinkage ρ = 1/(n_val τ²) (see :func:`default_shrinkage`).
DEFAULT_PRIOR_STD = 0.5

#: Default size of the synthetic data sets: ``synthetic`` = ``synthetic:10000:100``.
SYNTHETIC_DEFAULT = (10_000, 100)

# Accurate lower solves (evaluation, baseline): ‖∇h(w)‖ ≤ rtol · ‖∇h(0, θ₀)‖.
_EVAL_RTOL = {torch.float64: 1e-8, torch.float32: 1e-5}
_LIPSCHITZ_MARGIN = 1.1
#: η of SID's fixed-point map steps (of the map w − ∇_w ĥ(w)/L(θ): SGD with step η/L)
SID_MAP_STEP = 0.5
#: SID's preconditioned solvers: step β/λ̂ (λ̂ the measured preconditioned curvature) and
#: heavy-ball momentum.
SID_STEP = 0.5
SID_MOMENTUM = 0.0
SID_CG_LOWER = 0
SID_CG_ADJOINT = 20
#: SID with adaptive accuracy: at most this many iterations per stage and upper step.
SID_MAX_INNER = 200


# --------------------------------------------------------------------------------------------
# data


def _parse_synthetic(spec: str) -> tuple[int, int]:
    parts = spec.split(":")
    n, d = SYNTHETIC_DEFAULT
    try:
        if len(parts) > 1 and parts[1]:
            n = int(parts[1])
        if len(parts) > 2 and parts[2]:
            d = int(parts[2])
    except ValueError:
        raise BilevelError(
            f"cannot read {spec!r}: use synthetic, synthetic:N or synthetic:N:D with integers "
            "N (samples) and D (features)"
        ) from None
    if len(parts) > 3 or n < 10 or d < 1:
        raise BilevelError(
            f"bad synthetic data set {spec!r}: use synthetic:N:D with N >= 10 samples and "
            "D >= 1 features"
        )
    return n, d


def _mnist_folder(data_dir: str | os.PathLike | None) -> pathlib.Path | None:
    if data_dir is None:
        return None
    folder = pathlib.Path(data_dir)
    return folder / "mnist" if (folder / "mnist").is_dir() else folder


def load_data(
    spec: str,
    *,
    regression: bool = False,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    device: torch.device | str | None = None,
    label_column: str | int = -1,
    zero_based: bool | str = "auto",
    info: dict[str, Any] | None = None,
) -> SplitData:
    """The data set named by ``spec``, split into train / validation / test and standardised.

    ``spec``: a bundled scikit-learn set (``breast_cancer``, ``digits``, ``iris``, ``wine``,
    ``diabetes``; float64), ``mnist`` (the 10k MNIST set, idx files in ``data_dir`` or
    ``../shared/data/mnist``; float32), ``synthetic[:N[:D]]`` (N samples, D features of which
    D/10 matter; float32; default 10000 × 100), or the path of a file: CSV / TSV (``.csv``,
    ``.tsv``, ``.tab``, optionally ``.gz``; :func:`read_csv`, labels in ``label_column``) or
    svmlight / LIBSVM (any other name; feature indices by ``zero_based``, see
    :func:`~bilevel.learning.datasets.read_svmlight`; ``info`` receives the convention used).
    ``regression`` selects real targets (``diabetes``, synthetic regression, raw file labels)
    instead of class labels, which must be unambiguous
    (:func:`~bilevel.learning.datasets.class_labels`).

    Raises:
        BilevelError: unknown name, missing file, or a data set of the wrong kind.
    """
    kind = "regression" if regression else "classification"
    if spec in SKLEARN_DATASETS:
        if spec == "diabetes" and not regression:
            raise BilevelError(
                "data set 'diabetes' has real targets (regression): use it with --model ridge"
            )
        if spec != "diabetes" and regression:
            raise BilevelError(
                f"data set {spec!r} has class labels, but the ridge model needs regression "
                "targets (diabetes, synthetic, or an svmlight file)"
            )
        return load_sklearn(
            spec,
            seed=seed,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            device=device,
        )
    if spec == "mnist":
        if regression:
            raise BilevelError("mnist is a classification data set: use it with logistic")
        try:
            return load_mnist(
                _mnist_folder(data_dir),
                seed=seed,
                val_fraction=val_fraction,
                test_fraction=test_fraction,
                device=device,
            )
        except FileNotFoundError as err:
            raise BilevelError(
                f"{err}; put t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz] there "
                "or pass --data-dir"
            ) from None
    if spec == "synthetic" or spec.startswith("synthetic:"):
        n, d = _parse_synthetic(spec)
        if regression:
            X, y, _ = make_synthetic_regression(n, d, seed=seed)
            n_classes = None
        else:
            X, y, _ = make_synthetic_classification(n, d, seed=seed)
            n_classes = 2
        data = split_data(
            X,
            y,
            n_classes=n_classes,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            seed=seed,
            name=f"synthetic-{n}x{d}",
        )
        return data.to(device=device) if device is not None else data
    path = pathlib.Path(spec)
    if path.is_file():
        X, y, n_classes, names = _read_file(path, regression, label_column, zero_based, info)
        data = split_data(
            X,
            y,
            n_classes=n_classes,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            seed=seed,
            name=path.name,
        )
        data = dataclasses.replace(data, feature_names=names)
        return data.to(device=device) if device is not None else data
    looks_like_path = os.sep in spec or "." in spec
    if looks_like_path:
        raise BilevelError(f"data file {spec!r} not found")
    known = ", ".join([*SKLEARN_DATASETS, "mnist", "synthetic[:N[:D]]"])
    raise BilevelError(
        f"unknown data set {spec!r}; choose one of {known}, or give the path of a CSV or "
        f"svmlight file ({kind})"
    )


def _is_delimited(name: str) -> bool:
    """Whether the file ``name`` is read as CSV / TSV (by its ending, ``.gz`` aside)."""
    return pathlib.Path(name.lower().removesuffix(".gz")).suffix in CSV_SUFFIXES


def _read_file(
    path: pathlib.Path,
    regression: bool,
    label_column: str | int,
    zero_based: bool | str = "auto",
    info: dict[str, Any] | None = None,
) -> tuple[Tensor, Tensor, int | None, list[str] | None]:
    """(X, y, number of classes or None, feature names or None) from a CSV / TSV (by its
    ending) or svmlight file: real targets (float32) for regression, else labels coded
    0, …, K−1 from a column that must hold class labels (no missing values, integers or
    text, not continuous)."""
    names = None
    if _is_delimited(path.name):
        X, labels, names = read_csv(path, label_column)
        by_name = isinstance(label_column, str) and not label_column.lstrip("-").isdigit()
        column = f"column {label_column!r}" if by_name else f"column {int(label_column)}"
        if str(label_column) == "-1":
            column += ", the last: no --label-column given"
        where = f"{path}: the label column ({column})"
    else:
        X, y_file = read_svmlight(path, zero_based=zero_based, info=info)
        labels = y_file.numpy()
        where = f"{path}: the labels"
    if regression:
        if labels.dtype.kind not in "fiu":
            raise BilevelError(f"{path}: the label column holds text; ridge needs numbers")
        y = torch.as_tensor(np.asarray(labels, dtype=np.float64))
        if not bool(torch.isfinite(y).all()):
            row = int((~torch.isfinite(y)).nonzero()[0, 0]) + 1
            raise BilevelError(f"{where}: row {row} has a missing or non-finite target")
        return X, y.to(torch.float32), None, names
    y, n_found = class_labels(labels, where)
    return X, y, n_found, names


# --------------------------------------------------------------------------------------------
# model, projection, estimators, method


def attach_lipschitz(model: FiniteSumModel, margin: float = _LIPSCHITZ_MARGIN) -> float:
    """State L(θ) = margin · ``model.smoothness()`` as the problem's Lipschitz bound of ∇_w h,
    so that solvers take steps 1/L(θ) without estimating it at every call (‖X‖₂² is computed
    once, by power iteration: an estimate from below, hence the margin, default 1.1). Returns
    L at the current θ.
    """

    def lipschitz() -> float:
        return margin * model.smoothness()

    model.problem.lipschitz = lipschitz
    return lipschitz()


def build_model(
    data: SplitData,
    model: str = "logistic",
    *,
    theta0: float | Tensor = 0.0,
    theta_range: tuple[float, float] | None = None,
    label_noise: float = 0.3,
    fit_intercept: bool = True,
    l2: float = 1e-3,
    shrinkage: float = 0.0,
    seed: int = 0,
    cv: int | None = None,
) -> FiniteSumModel:
    """The bilevel model ``model`` on the train / validation parts of ``data``.

    ``theta0`` is the initial θ (a number is broadcast); ``theta_range`` the box of
    :func:`box_projection` (default :data:`DEFAULT_THETA_RANGE`): its lower end fixes the
    stated μ. ``hypercleaning`` corrupts ``label_noise`` of the training labels (seeded) and
    learns one weight per training sample, with the fixed ℓ2 strength ``l2``. Classification
    models fit an intercept with a small fixed ℓ2 strength (1e-4) when ``fit_intercept``.
    ``shrinkage`` ρ adds (ρ/2)‖θ − mean(θ)‖² to the upper level of ridge and logistic models.
    ``cv`` = K: the upper level is the K-fold cross-validation loss over the training and
    validation rows together (seeded random folds; :meth:`FiniteSumModel.cross_validate`).
    The problem's Lipschitz bound is attached (:func:`attach_lipschitz`).
    """
    if model not in MODELS:
        raise BilevelError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    lo, _ = DEFAULT_THETA_RANGE[model] if theta_range is None else theta_range
    if (model == "ridge") != (data.n_classes is None):
        need = "regression targets" if model == "ridge" else "class labels"
        raise BilevelError(
            f"model {model!r} needs {need}, but {data.name!r} is a {data.task} data set"
        )
    if model == "hypercleaning" and shrinkage:
        raise BilevelError("shrinkage applies to the logistic and ridge models only")
    if model == "hypercleaning" and cv is not None:
        raise BilevelError("cross validation applies to the logistic and ridge models only")
    args = (data.X_train, data.y_train, data.X_val, data.y_val, theta0)
    if cv is not None:  # the training and validation rows, in K folds
        X = stack_rows(data.X_train, data.X_val)
        y = torch.cat([data.y_train, data.y_val])
        args = (X, y, X, y, theta0)
    if model == "ridge":
        out: FiniteSumModel = RidgeModel(*args, theta_lower=lo, shrinkage=shrinkage)
    elif model == "logistic":
        out = LogisticModel(
            *args,
            data.n_classes,
            fit_intercept=fit_intercept,
            theta_lower=lo,
            shrinkage=shrinkage,
        )
    else:
        y_noisy, corrupted = corrupt_labels(data.y_train, label_noise, data.n_classes, seed=seed)
        out = HypercleaningModel(
            data.X_train,
            y_noisy,
            data.X_val,
            data.y_val,
            theta0,
            data.n_classes,
            l2=l2,
            fit_intercept=fit_intercept,
            corrupted=corrupted if label_noise > 0 else None,  # known only when injected
        )
    if cv is not None:
        out.cross_validate(random_folds(out.n_train, cv, seed))
    attach_lipschitz(out)
    return out


def box_projection(lo: float, hi: float) -> Callable[[Tensor], None]:
    """P(θ) = clamp(θ, lo, hi), in place (an ISGD projection)."""
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise BilevelError(f"theta range must be finite with lo < hi, got ({lo}, {hi})")

    def project(theta: Tensor) -> None:
        theta.clamp_(lo, hi)

    project.__qualname__ = f"box_projection({lo:g}, {hi:g})"
    return project


#: Training-set size from which ``bilevel hpo`` uses SID by default (the size rule of
#: :func:`default_method`, measured in docs/benchmarks_hpo.md: SID wins on the 120 000-sample
#: training sets there and loses on those of 1 000 to 6 000 samples).
SID_MIN_TRAIN = 100_000
DEFAULT_METHOD_RULE = f"sid from {SID_MIN_TRAIN} training samples on, else aid-cg"


def default_method(n_train: int, cv: int | None = None) -> str:
    """The method of ``bilevel hpo`` when none is given: ``"sid"`` for training sets of at
    least :data:`SID_MIN_TRAIN` samples (without cross validation, which SID does not
    support), else ``"aid-cg"``."""
    return "sid" if cv is None and n_train >= SID_MIN_TRAIN else "aid-cg"


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
    (the evaluation noise), it asks SID for more inner accuracy (:meth:`SID.tighten`: the
    targets s·ε_k, s·δ_k shrink by the :class:`InnerAccuracy` factor) and warns on
    ``stream``. The scale is part of SID's checkpointed state, so a resumed run keeps it. The
    records get ``sid_tightened`` = the new scale at those steps."""

    def __init__(
        self,
        evaluate: Callable[[Any, int], dict[str, float]],
        estimator: SID,
        start: float,
        noise: float,
        stream: Any = None,
    ) -> None:
        self.evaluate = evaluate
        self.estimator = estimator
        self.start = float(start)
        self.noise = float(noise)
        self.stream = stream

    def __call__(self, theta: Any, step: int) -> dict[str, float]:
        out = self.evaluate(theta, step)
        if "val_loss" not in out:
            return out
        value = float(out["val_loss"]) + float(out.get("shrinkage_penalty", 0.0))
        if value > self.start + self.noise:
            old = self.estimator.accuracy_scale
            scale = self.estimator.tighten()
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
    method: ISGD,
    evaluator: LowerEvaluator,
    initial: Mapping[str, float],
) -> Callable[[Any, int], dict[str, float]]:
    """``evaluate`` wrapped in a :class:`RiseGuard` when ``method`` runs SID with adaptive
    accuracy (start: the objective in ``initial``, noise: :func:`evaluation_noise`), else
    ``evaluate`` itself."""
    est = method.estimator
    if not isinstance(est, SID) or est.accuracy is None:
        return evaluate
    start = float(initial["val_loss"]) + float(initial.get("shrinkage_penalty", 0.0))
    return RiseGuard(evaluate, est, start, evaluation_noise(evaluator))


def _default_batch(n: int) -> int:
    """SID minibatch size: 12√N, between 64 and 4096 (at most N)."""
    return int(min(n, max(64, min(4096, round(12 * math.sqrt(n))))))


def hpo_estimator(
    model: FiniteSumModel,
    method: str,
    *,
    inner_steps: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    sid_solver: str = "precond",
) -> Estimator:
    """The hypergradient estimator of ``method`` for ``model``, configured for warm starts.

    * ``sid``: minibatches of ``batch_size`` training samples (default 12√N, in [64, 4096])
      and the exact validation gradient, map Φ(w) = w − ∇_w ĥ(w)/L(θ). Stage solvers
      (``sid_solver``): ``"precond"`` (default) :class:`PreconditionedSVRG` and
      :class:`PreconditionedSVRGLinear` (Jacobi preconditioner from the model's exact
      minibatch Hessian diagonal, steps 0.5/λ̂ from the measured curvature, momentum
      :data:`SID_MOMENTUM`, variance-reduced in both stages); ``"svrg"``
      :class:`VarianceReducedFixedPoint` and plain fixed-point adjoint steps, ``"sgd"`` plain
      steps in both (constant steps 0.5 of the map). With ``inner_steps`` None (default) t and
      k adapt (:class:`InnerAccuracy`): each stage iterates until its estimated residual meets
      the step's ε_k, δ_k of :func:`hpo_method` (at most :data:`SID_MAX_INNER` iterations);
      else t = k = ``inner_steps``. The final stage uses one sample for the per-feature
      models (θ enters only the regulariser, so J = ∂_θ∇_w Ω involves no data) and all
      samples for hypercleaning (θ weights every sample);
    * ``aid-cg``: L-BFGS lower solve and CG adjoint to the tolerances of :func:`hpo_method`
      (at most ``inner_steps`` iterations each, default 200);
    * ``itd``: ``inner_steps`` (default 20) differentiated gradient steps of length 1/L(θ).

    No a-posteriori bound is computed (``compute_bound=False``): the runs record the certified
    lower-level distance instead.
    """
    if method not in METHODS:
        raise BilevelError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if inner_steps is not None and (isinstance(inner_steps, bool) or inner_steps < 1):
        raise BilevelError(f"inner_steps must be a positive integer, got {inner_steps!r}")
    if method == "sid":
        if sid_solver not in SID_SOLVERS:
            raise BilevelError(
                f"unknown SID solver {sid_solver!r}; choose one of {', '.join(SID_SOLVERS)}"
            )
        adaptive = inner_steps is None
        t = SID_MAX_INNER if adaptive else int(inner_steps)
        n = model.n_train
        b = _default_batch(n) if batch_size is None else int(batch_size)
        if not 1 <= b <= n:
            raise BilevelError(f"batch size must be in [1, {n}] (training samples), got {b}")
        # θ enters only Ω for per-feature models: J = ∂_θ∇_w Ω needs no data, one sample does
        final = None if isinstance(model, HypercleaningModel) else 1
        if sid_solver == "precond":
            lower: Any = PreconditionedSVRG(
                t, SID_STEP, momentum=SID_MOMENTUM, cg_iterations=SID_CG_LOWER
            )
            linear: Any = PreconditionedSVRGLinear(
                t, SID_STEP, momentum=SID_MOMENTUM, cg_iterations=SID_CG_ADJOINT
            )
        else:
            lower = (
                VarianceReducedFixedPoint(t, SID_MAP_STEP)
                if sid_solver == "svrg"
                else StochasticFixedPoint.constant(SID_MAP_STEP, t)
            )
            linear = StochasticLinearFixedPoint.constant(SID_MAP_STEP, t)
        return SID(
            lower_solver=lower,
            linear_solver=linear,
            lower_batch=b,
            linear_batch=b,
            final_batch=final,
            seed=seed,
            accuracy=InnerAccuracy(SID_MAX_INNER, SID_MAX_INNER) if adaptive else None,
            diagonal=model.lower_sample_diagonal,
        )
    if method == "aid-cg":
        cap = 200 if inner_steps is None else int(inner_steps)
        return Implicit(
            CG(max_iter=cap),
            lower_solver=LBFGS(max_iter=cap),
            compute_bound=False,
            warn_unconverged=False,
        )
    return Unrolled(steps=20 if inner_steps is None else int(inner_steps), compute_bound=False)


def _gradient_scale(model: FiniteSumModel) -> float:
    """max over the instances of ‖∇_w h(0, θ)‖ at the current θ (units of the tolerances)."""
    lower = LowerLevel(model.problem, model.instance_batch(), Cost())
    _, g = lower.value_and_grad(model.init_w(model.n_instances))
    return max(float(g.reshape(len(g), -1).norm(dim=1).max()), 1e-12)


def hpo_method(
    model: FiniteSumModel,
    method: str,
    *,
    step: Any = DEFAULT_STEP,
    seed: int = 0,
    theta_range: tuple[float, float] | None = None,
    inner_steps: int | None = None,
    batch_size: int | None = None,
    sid_solver: str = "precond",
) -> ISGD:
    """ISGD with Adam (steps α_k = ``step``) and the estimator of ``method``.

    One lower-level instance, or one per cross-validation fold (all of them in every step):
    the lower iterates w and the adjoints are carried from one upper step to the next (warm
    starts). θ is projected onto ``theta_range`` after every step. For
    ``aid-cg`` the tolerances are ε_k = δ_k = 10⁻² g₀/√(k+1), at least 10⁻⁴ g₀ (float32: 10⁻³ g₀),
    with g₀ = ‖∇_w h(0, θ₀)‖.
    """
    lo, hi = _theta_range(model, theta_range)
    estimator = hpo_estimator(
        model,
        method,
        inner_steps=inner_steps,
        batch_size=batch_size,
        seed=seed,
        sid_solver=sid_solver,
    )
    g0 = _gradient_scale(model)
    floor = 1e-3 if model.dtype == torch.float32 else 1e-4
    return ISGD(
        step=as_schedule(step),
        accuracy=Accuracy(Clipped(Polynomial(1e-2 * g0, 0.5), minimum=floor * g0)),
        batch_size=model.n_instances,
        optimizer="adam",
        estimator=estimator,
        projection=box_projection(lo, hi),
        seed=seed,
    )


def _theta_range(
    model: FiniteSumModel, theta_range: tuple[float, float] | None
) -> tuple[float, float]:
    if theta_range is not None:
        lo, hi = (float(v) for v in theta_range)
    elif isinstance(model, HypercleaningModel):
        lo, hi = DEFAULT_THETA_RANGE["hypercleaning"]
    elif isinstance(model, RidgeModel):
        lo, hi = DEFAULT_THETA_RANGE["ridge"]
    else:
        lo, hi = DEFAULT_THETA_RANGE["logistic"]
    box_projection(lo, hi)  # validates
    return lo, hi


# --------------------------------------------------------------------------------------------
# evaluation


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
        self.tol = rtol * _gradient_scale(model)
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
        lo, hi = _theta_range(model, theta_range)
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


# --------------------------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser, name: str = "hpo") -> None:
    """Options of ``bilevel hpo``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        "  bilevel hpo --data breast_cancer\n"
        "  bilevel hpo --data digits --method aid-cg --time 30 --json\n"
        "  bilevel hpo --data diabetes --model ridge\n"
        "  bilevel hpo --data synthetic:200000:100 --method sid --time 60\n"
        "  bilevel hpo --data measurements.csv --label-column class\n"
        "  bilevel hpo --run-dir runs/my-run --resume --steps 400"
    )
    data = parser.add_argument_group("problem")
    data.add_argument(
        "--data",
        default="breast_cancer",
        help="breast_cancer | digits | iris | wine | diabetes | mnist | synthetic[:N[:D]] | "
        "path to a .csv/.tsv file (one sample per row) or an svmlight file (default: "
        "breast_cancer)",
    )
    data.add_argument("--data-dir", help="folder with the MNIST idx files")
    data.add_argument(
        "--label-column",
        default="-1",
        help="CSV/TSV files: the label column, an index (negative from the end) or a header "
        "name (default: the last column)",
    )
    data.add_argument(
        "--svmlight-indexing",
        choices=("auto", "zero", "one"),
        default="auto",
        help="svmlight files: feature indices zero- or one-based (default auto, as "
        "scikit-learn: zero-based when index 0 occurs, else one-based)",
    )
    data.add_argument(
        "--model",
        choices=MODELS,
        default=None,
        help="logistic (per-feature strengths), ridge (per-feature strengths, regression), "
        "hypercleaning (per-sample weights); default: ridge for diabetes, else logistic",
    )
    data.add_argument(
        "--label-noise",
        type=float,
        default=0.3,
        help="hypercleaning: fraction of training labels corrupted (default 0.3)",
    )
    data.add_argument(
        "--init",
        default="baseline",
        help="initial θ: 'baseline' (the best common value of the grid search, default) or a "
        "number (log-strength, or weight logit for hypercleaning)",
    )
    data.add_argument(
        "--shrinkage",
        type=float,
        default=None,
        metavar="RHO",
        help="logistic, ridge: add (ρ/2)‖θ − mean θ‖² to the validation loss, pulling the "
        "per-feature strengths towards a common value (default 1/(n_val τ²) with τ = "
        f"{DEFAULT_PRIOR_STD:g}, a Gaussian prior on the log-strengths; 0: none)",
    )
    data.add_argument(
        "--theta-range",
        default=None,
        metavar="LO,HI",
        help="box for θ (default -10,1; ridge -10,3; hypercleaning -6,6)",
    )
    meth = parser.add_argument_group("method")
    meth.add_argument(
        "--method",
        choices=METHODS,
        default=None,
        help="hypergradient: aid-cg (full-batch L-BFGS + CG), sid (stochastic implicit "
        "differentiation on minibatches), itd (unrolled gradient steps); default: "
        f"{DEFAULT_METHOD_RULE}",
    )
    meth.add_argument(
        "--cv",
        type=int,
        default=None,
        metavar="K",
        help="learn θ on the K-fold cross-validation loss over the training and validation "
        "rows (K lower-level problems per step; aid-cg or itd) instead of the validation loss",
    )
    meth.add_argument(
        "--step",
        default=DEFAULT_STEP,
        help=f"Adam step schedule on θ, e.g. 0.05 or poly:0.1,0.5 (default {DEFAULT_STEP})",
    )
    meth.add_argument(
        "--inner-steps",
        type=int,
        default=None,
        help="sid: fixed t = k iterations per step (default: adaptive, each stage until its "
        f"estimated residual meets the step's tolerance, at most {SID_MAX_INNER}); itd: "
        "unrolled steps (20); aid-cg: iteration cap of L-BFGS and CG (200)",
    )
    meth.add_argument(
        "--batch-size", type=int, default=None, help="sid: minibatch size (default 12√N ≤ 4096)"
    )
    meth.add_argument(
        "--sid-solver",
        choices=SID_SOLVERS,
        default="precond",
        help="sid: stage solvers, precond (default; Jacobi-preconditioned variance-reduced "
        "steps from the measured curvature, and CG refinement on minibatches for the adjoint), "
        "svrg (variance-reduced lower steps of 0.5/L, plain adjoint steps) or sgd",
    )
    budget = parser.add_argument_group("budget (the first limit reached ends the run)")
    budget.add_argument("--budget", type=float, default=None, help="oracle calls")
    budget.add_argument("--time", type=float, default=None, help="seconds of computation")
    budget.add_argument(
        "--steps", type=int, default=None, help="upper-level steps (default 100 if no limit)"
    )
    out = parser.add_argument_group("run")
    out.add_argument("--seed", type=int, default=0, help="data split, label noise, sampling")
    out.add_argument("--run-dir", default=None, help="default: runs/hpo-<time>-<data>-<method>")
    out.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    out.add_argument("--overwrite", action="store_true", help="replace a run already in --run-dir")
    out.add_argument(
        "--checkpoint-every",
        type=int,
        default=50,
        help="steps between checkpoints (default 50; one is also written at the end)",
    )
    out.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="steps between evaluations of F(θ) and test metrics (default: about 25 per run; "
        "with --time, as often as keeps evaluations under a fifth of the wall time)",
    )
    out.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    out.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    out.add_argument("--no-plots", action="store_true", help="do not write plots")


def default_shrinkage(n_val: int, prior_std: float = DEFAULT_PRIOR_STD) -> float:
    """ρ = 1/(n_val τ²): the Gaussian prior θ_k ~ N(θ̄, τ²) on the per-feature log-strengths.

    F is a mean over the n_val validation samples, so the prior's negative log-density
    ‖θ − θ̄‖²/(2τ²), added to the validation negative log-likelihood n_val·F, becomes
    (ρ/2)‖θ − θ̄‖² on F: the pull towards a common strength fades as the validation set grows.
    """
    if n_val < 1 or not (math.isfinite(prior_std) and prior_std > 0):
        raise BilevelError(f"need n_val >= 1 and prior_std > 0, got {n_val}, {prior_std}")
    return 1.0 / (n_val * prior_std**2)


def _parse_shrinkage(value: float | None, model: str) -> float | None:
    """--shrinkage: ρ, or None for :func:`default_shrinkage`; hypercleaning takes none."""
    if model == "hypercleaning":
        if value:
            raise BilevelError("--shrinkage applies to the logistic and ridge models only")
        return 0.0
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise BilevelError(f"--shrinkage must be a finite number >= 0, got {value}")
    return value


def _parse_range(text: str | None, model: str) -> tuple[float, float]:
    if text is None:
        return DEFAULT_THETA_RANGE[model]
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise BilevelError(f"--theta-range must be two numbers LO,HI, got {text!r}") from None
    box_projection(lo, hi)
    return lo, hi


def _parse_init(text: str) -> float | None:
    """``None`` for 'baseline', else the number."""
    if text == "baseline":
        return None
    try:
        value = float(text)
    except ValueError:
        raise BilevelError(f"--init must be 'baseline' or a number, got {text!r}") from None
    if not math.isfinite(value):
        raise BilevelError(f"--init must be finite, got {text!r}")
    return value


def _default_run_dir(data: str, method: str) -> pathlib.Path:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", pathlib.Path(data).name)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = pathlib.Path("runs") / f"hpo-{stamp}-{stem}-{method}"
    path, i = base, 1
    while path.exists():
        i += 1
        path = base.with_name(f"{base.name}-{i}")
    return path


def _budget(args: argparse.Namespace) -> Budget:
    steps = args.steps
    if args.budget is None and args.time is None and steps is None:
        steps = 100
    try:
        return Budget(
            oracle_calls=None if args.budget is None else int(math.ceil(args.budget)),
            steps=steps,
            wall_time=args.time,
        )
    except BilevelError as err:
        raise BilevelError(f"bad budget: {err}") from None


def _evaluation(
    args: argparse.Namespace, budget: Budget, evaluator: LowerEvaluator
) -> tuple[Callable[[Any, int], dict[str, float]], int]:
    """(evaluate callback, steps between calls): ``--eval-every`` if given; else about 25
    evaluations for a step budget, a :class:`ThrottledEvaluation` offered every step for a
    time budget, and every 2 (10 for SID) steps for an oracle-call budget."""
    if args.eval_every is not None:
        return evaluator, int(args.eval_every)
    if budget.steps is not None and budget.oracle_calls is None and budget.wall_time is None:
        return evaluator, max(1, budget.steps // 25)
    if budget.wall_time is not None:
        return ThrottledEvaluation(evaluator, EVALUATION_SHARE), 1
    return evaluator, 10 if args.method == "sid" else 2


def _with_bound_note(
    evaluate: Callable[[Any, int], dict[str, float]], method: str
) -> Callable[[Any, int], dict[str, Any]]:
    """``evaluate`` whose records also say why ``bound`` is empty (:func:`hpo_estimator`
    computes no ω: ISGD steps do not use it; ``distance`` is the certificate logged)."""
    reason = (
        "no stochastic error bound exists (SID)"
        if method == "sid"
        else "no a-posteriori bound exists for unrolling (ITD)"
        if method == "itd"
        else "not computed: ISGD steps do not use ω (compute_bound=False)"
    )

    def wrapped(theta: Any, step: int) -> dict[str, Any]:
        out = dict(evaluate(theta, step))
        if out:
            out["bound_note"] = reason + "; see distance for the certified lower-level accuracy"
        return out

    return wrapped


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


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise BilevelError(f"unknown device {text!r} (use cpu, cuda, cuda:0, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BilevelError(f"device {text!r} requested but CUDA is not available")
    return device


#: Files a run writes besides those of its run loop (removed by ``--overwrite``).
JOB_FILES = (
    "job.json",
    "summary.json",
    "hyperparameters.csv",
    "hyperparameters_best.csv",
)


def _check_options(args: argparse.Namespace) -> None:
    """Refuse bad numeric options and run-directory choices before any data are read."""
    for name in ("inner_steps", "batch_size", "eval_every", "checkpoint_every"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise BilevelError(
                f"--{name.replace('_', '-')} must be a positive integer, got {value}"
            )
    if args.cv is not None and args.cv < 2:
        raise BilevelError(f"--cv must be at least 2 folds, got {args.cv}")
    if args.cv is not None and args.method == "sid":
        raise BilevelError("--cv needs --method aid-cg or itd (SID samples one training set)")
    if args.resume:
        if args.run_dir is None:
            raise BilevelError("--resume needs --run-dir (the directory of the run to continue)")
        if args.overwrite:
            raise BilevelError("--resume and --overwrite exclude each other")
        if not (pathlib.Path(args.run_dir) / "job.json").is_file():
            raise BilevelError(f"--resume: no run to resume in {args.run_dir} (no job.json there)")
    if args.run_dir is not None:
        path = pathlib.Path(args.run_dir)
        if path.exists() and not path.is_dir():
            raise BilevelError(f"--run-dir {args.run_dir} is a file, not a directory")


def run(args: argparse.Namespace) -> int:
    """Run ``bilevel hpo``; returns the exit status (0 on success). Every option is checked
    before any work; the run directory is locked while the run writes it."""
    t_start = time.perf_counter()
    log = sys.stderr

    def say(message: str) -> None:
        if not args.no_progress:
            print(message, file=log, flush=True)

    model_name = args.model or ("ridge" if args.data == "diabetes" else "logistic")
    if not (0 <= args.label_noise <= 1):
        raise BilevelError(f"--label-noise must be in [0, 1], got {args.label_noise}")
    theta_range = _parse_range(args.theta_range, model_name)
    shrinkage = _parse_shrinkage(args.shrinkage, model_name)
    init = _parse_init(args.init)
    step = as_schedule(args.step)
    budget = _budget(args)
    device = _device(args.device)
    _check_options(args)
    run_dir = (
        pathlib.Path(args.run_dir)
        if args.run_dir
        else _default_run_dir(args.data, args.method or "auto")
    )
    zero_based = {"auto": "auto", "zero": True, "one": False}[args.svmlight_indexing]
    read_info: dict[str, Any] = {}
    data = load_data(
        args.data,
        regression=model_name == "ridge",
        seed=args.seed,
        data_dir=args.data_dir,
        device=device,
        label_column=args.label_column,
        zero_based=zero_based,
        info=read_info,
    )
    say(f"bilevel hpo: {data!r}")
    if args.method is None:  # the size rule: SID for large training sets
        args.method = default_method(data.n_train, args.cv)
        say(f"method: {args.method} ({data.n_train} training samples; {DEFAULT_METHOD_RULE})")
    if args.cv is not None and args.method == "sid":
        raise BilevelError("--cv needs --method aid-cg or itd (SID samples one training set)")
    if "zero_based" in read_info:
        base = "zero" if read_info["zero_based"] else "one"
        why = "--svmlight-indexing"
        if zero_based == "auto":
            why = "index 0 " + ("occurs" if read_info["zero_based"] else "does not occur")
        say(f"  svmlight feature indices read as {base}-based ({why})")
    if args.batch_size is not None and args.method == "sid" and args.batch_size > data.n_train:
        raise BilevelError(
            f"--batch-size {args.batch_size} exceeds the {data.n_train} training samples"
        )
    if args.cv is not None and args.cv > data.n_train + int(data.X_val.shape[0]):
        raise BilevelError(f"--cv {args.cv}: more folds than rows")
    if shrinkage is None:  # with --cv every training and validation row validates once
        n_validation = int(data.X_val.shape[0]) + (data.n_train if args.cv is not None else 0)
        shrinkage = default_shrinkage(n_validation)
    job = {
        "data": args.data,
        "model": model_name,
        "method": args.method,
        "seed": args.seed,
        "label_noise": args.label_noise if model_name == "hypercleaning" else None,
        "label_column": args.label_column if _is_delimited(args.data) else None,
        "svmlight_zero_based": read_info.get("zero_based"),
        "init": args.init,
        "theta_range": list(theta_range),
        "shrinkage": shrinkage,
        "step": step.to_config(),
        "inner_steps": args.inner_steps,
        "batch_size": args.batch_size,
        "device": str(device),
        "cv": args.cv,
    }
    if distributed.current() is not None:  # every process writes into rank 0's directory
        run_dir = pathlib.Path(distributed.current().broadcast_object(str(run_dir)))
    args.run_dir = str(run_dir)

    def prepare() -> None:
        present = [n for n in ("job.json", "config.json") if (run_dir / n).exists()]
        if args.resume:
            check_job_record(run_dir, job)
        elif present and not args.overwrite:
            raise BilevelError(
                f"{run_dir} already holds a run ({', '.join(present)}): resume it (--resume), "
                "start again (--overwrite), or choose another directory"
            )
        elif args.overwrite:
            for name in JOB_FILES:
                (run_dir / name).unlink(missing_ok=True)
        write_json(run_dir / "job.json", job)

    # data parallel (bilevel.distributed): rank 0 alone writes the run's files
    with RunLock(run_dir) if distributed.is_writer() else contextlib.nullcontext():
        distributed.on_writer(prepare)
        args.started = True  # from here on, an interrupted run can be resumed
        return _train(
            args,
            data,
            model_name,
            job,
            theta_range,
            shrinkage,
            init,
            step,
            budget,
            run_dir,
            t_start,
            say,
        )


def _train(
    args: argparse.Namespace,
    data: SplitData,
    model_name: str,
    job: dict[str, Any],
    theta_range: tuple[float, float],
    shrinkage: float,
    init: float | None,
    step: Any,
    budget: Budget,
    run_dir: pathlib.Path,
    t_start: float,
    say: Callable[[str], None],
) -> int:
    """The work of ``bilevel hpo`` once its options are checked and its directory locked."""
    # baseline: one common value of θ, chosen on the validation set
    model = build_model(
        data,
        model_name,
        theta0=0.0,
        theta_range=theta_range,
        label_noise=args.label_noise,
        shrinkage=shrinkage,
        seed=args.seed,
        cv=args.cv,
    )
    evaluator = LowerEvaluator(model, data.X_test, data.y_test)  # clean test labels
    evaluate, eval_every = _evaluation(args, budget, evaluator)
    evaluate = _with_bound_note(evaluate, args.method)
    baseline = single_strength_baseline(model, evaluator, theta_range=theta_range)
    say(
        f"baseline (one common θ, {baseline['evaluated']} values of the grid): "
        f"θ = {baseline['theta']:g}, "
        f"val loss {baseline['val_loss']:.6g} ({baseline['seconds']:.1f} s)"
    )
    theta0 = baseline["theta"] if init is None else min(max(init, theta_range[0]), theta_range[1])
    with torch.no_grad():
        model.theta.fill_(theta0)
    initial = evaluator.metrics()

    method = hpo_method(
        model,
        args.method,
        step=step,
        seed=args.seed,
        theta_range=theta_range,
        inner_steps=args.inner_steps,
        batch_size=args.batch_size,
        sid_solver=args.sid_solver,
    )
    evaluate = guard_sid(evaluate, method, evaluator, initial)
    result: RunResult = method.run(
        model.problem,
        lower_instances(model, evaluator.w),
        budget,
        run_dir=run_dir,
        resume=args.resume,
        overwrite=args.overwrite,
        evaluate=ranked_by(evaluate, "val_loss", "min"),
        eval_every=eval_every,
        checkpoint_every=args.checkpoint_every,
        progress=not args.no_progress,
        plot=not args.no_plots,
    )
    if not distributed.is_writer():
        return 0 if result.ok else 130 if not result.finished else 1
    if not result.finished:
        from bilevel.cli import resume_command

        hint = resume_command("hpo", getattr(args, "argv", []), str(run_dir))
        partial = {
            **job,
            "status": result.status,
            "finished": False,
            "message": result.message,
            "steps": result.step,
            "run_dir": str(run_dir),
            "resume": hint,
        }
        write_json(run_dir / "summary.json", partial)
        if args.json:
            print(dumps_json(partial))
        print(
            f"bilevel hpo: {result.message.split(';')[0]}; not finished; resume with: {hint}",
            file=sys.stderr,
        )
        return 130
    final = dict(result.evaluation) if result.evaluation else evaluator.metrics()
    write_hyperparameters(run_dir / HYPERPARAMETERS_FILE, model, data)
    best = _best_summary(result)
    if result.best_theta is not None:
        last = model.theta.detach().clone()
        with torch.no_grad():
            model.theta.copy_(result.best_theta[0])
        write_hyperparameters(run_dir / BEST_HYPERPARAMETERS_FILE, model, data)
        with torch.no_grad():
            model.theta.copy_(last)
    if not args.no_plots:
        plot_hyperparameters(run_dir / "plots" / "hyperparameters.png", model, data, theta0)
    summary = _summary(args, data, model, job, initial, final, baseline, result, t_start)
    summary["best"] = best
    write_json(run_dir / "summary.json", summary)
    if not args.no_plots:
        write_report(run_dir, args, to_jsonable(summary))
    if args.json:
        print(dumps_json(summary))
    else:
        _print_summary(summary)
    gap = summary["lower_gap"]
    if args.method in _TRACKING_ADVICE and gap is not None and gap["relative"] > TRACKING_WARNING:
        if args.method == "sid" and args.inner_steps is None and not sid_capped(result.records):
            cause = (
                "SID met its inner tolerances ‖∇_w h‖ ≤ ε_k at every step, and with this "
                "problem's small strong convexity μ the lower iterate may lie up to ε_k/μ from "
                "w(θ); the gap closes as ε_k decreases."
            )
        else:
            cause = (
                "its lower-level iterations per step do not keep up with θ, so the "
                f"hypergradients were taken far from w(θ). {_TRACKING_ADVICE[args.method]}"
            )
        print(
            f"warning: at step {gap['step']} the upper loss at {args.method}'s lower iterate "
            f"and at w(θ) differ by {100 * gap['relative']:.0f} %: {cause}",
            file=sys.stderr,
        )
    return 0 if result.ok else 1


def _best_summary(result: RunResult) -> dict[str, Any] | None:
    """The run's best evaluation (lowest validation loss): its step and metrics, and the file
    with its θ; None when nothing was evaluated."""
    if result.best is None:
        return None
    step = result.best["step"]
    metrics: dict[str, Any] = {}
    if result.evaluation is not None and step == result.step:
        metrics = dict(result.evaluation)
    else:
        for r in result.records:
            if r.get("step") == step and "val_loss" in r:
                keys = ("val_loss", "test_accuracy", "test_mse", "test_r2", "shrinkage_penalty")
                metrics = {k: r[k] for k in keys if k in r}
                break
    return {
        "step": step,
        "val_loss": result.best["value"],
        **metrics,
        "hyperparameters": BEST_HYPERPARAMETERS_FILE,
    }


#: Relative gap |f(w_k) − F(θ_k)| / F(θ_k) above which ``bilevel hpo`` warns that the method's
#: lower iterate w_k does not follow w(θ).
TRACKING_WARNING = 0.1


#: What to do when a method's lower iterate lags behind w(θ) (aid-cg solves to a tolerance, so
#: its gap follows the accuracy schedule; SID does too unless its iteration caps are reached or
#: --inner-steps fixes t and k).
_TRACKING_ADVICE = {
    "sid": "SID's inner iterations stopped at their cap (or at the fixed --inner-steps) before "
    "the lower level met its tolerance: drop --inner-steps (adaptive t and k), raise "
    "--batch-size, or use --method aid-cg (L-BFGS and CG need about √(L/μ) iterations) on "
    "small, ill-conditioned sets.",
    "itd": "Raise --inner-steps, or use --method aid-cg.",
}


def sid_capped(records: Sequence[Mapping[str, Any]]) -> bool:
    """Whether some SID step stopped at its iteration cap with an estimated residual above its
    target (records with ``sid_lower_residual`` / ``sid_lower_target`` and the adjoint's)."""
    for r in records:
        for stage in ("lower", "adjoint"):
            res, target = r.get(f"sid_{stage}_residual"), r.get(f"sid_{stage}_target")
            if res is not None and target is not None and res > target:
                return True
    return False


def lower_level_gap(records: list[Mapping[str, Any]]) -> dict[str, float] | None:
    """How far the method's lower iterate w_k is from w(θ_k), measured in the upper loss at
    the last evaluated step k: f(w_k) (the method's upper loss less the shrinkage penalty)
    against F(θ_k) = f(w(θ_k)) from the evaluator's accurate solve. None when no step was
    evaluated."""
    for r in reversed(records):
        if "val_loss" in r and r.get("upper_loss") is not None:
            f_iterate = float(r["upper_loss"]) - float(r.get("shrinkage_penalty", 0.0))
            val = float(r["val_loss"])
            return {
                "step": int(r["step"]),
                "f_iterate": f_iterate,
                "val_loss": val,
                "relative": abs(f_iterate - val) / max(abs(val), 1e-300),
            }
    return None


#: The learnt hyperparameters, one row each, in the run directory.
HYPERPARAMETERS_FILE = "hyperparameters.csv"
#: The hyperparameters of the best evaluation (lowest validation loss), beside them.
BEST_HYPERPARAMETERS_FILE = "hyperparameters_best.csv"


def write_hyperparameters(path: pathlib.Path, model: FiniteSumModel, data: SplitData) -> None:
    """The learnt θ as CSV: for per-feature models one row per feature (``feature``: its name
    or ``x<k>``, ``theta``, ``strength`` λ = exp θ, for the standardised feature), for
    hyper-cleaning one row per training sample (``row``: its row in the original data,
    ``theta``, ``weight`` σ(θ), and ``corrupted`` when the corruption is known)."""
    theta = model.theta.detach().to("cpu", torch.float64).reshape(-1)
    with atomic_output(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        if isinstance(model, HypercleaningModel):
            rows = data.train_index if data.train_index is not None else torch.arange(len(theta))
            columns = [rows.tolist(), [f"{v:.9g}" for v in theta.tolist()]]
            columns.append([f"{v:.9g}" for v in torch.sigmoid(theta).tolist()])
            header = ["row", "theta", "weight"]
            if model.corrupted is not None:
                header.append("corrupted")
                columns.append(model.corrupted.int().tolist())
            out.writerow(header)
            out.writerows(zip(*columns))
            return
        d = data.n_features
        names = data.feature_names if data.feature_names else [f"x{k}" for k in range(d)]
        if len(theta) != d:  # one common strength, or one per coefficient
            names = [f"theta{k}" for k in range(len(theta))]
        out.writerow(["feature", "theta", "strength"])
        for name, value in zip(names, theta.tolist()):
            out.writerow([name, f"{value:.9g}", f"{math.exp(value):.9g}"])


def plot_hyperparameters(
    path: pathlib.Path, model: FiniteSumModel, data: SplitData, theta0: float
) -> None:
    """A figure of the learnt θ: the strengths λ_k per feature (log scale) against the common
    starting value exp θ₀, or for hyper-cleaning the histogram of the sample weights σ(θ_j),
    clean and corrupted samples apart when the corruption is known."""
    try:
        fig = new_figure(8, 3.5)
    except ImportError as exc:
        warnings.warn(f"no hyperparameter plot: {exc}", RuntimeWarning, stacklevel=2)
        return
    ax = fig.add_subplot()
    theta = model.theta.detach().to("cpu", torch.float64).reshape(-1).numpy()
    if isinstance(model, HypercleaningModel):
        weights = 1.0 / (1.0 + np.exp(-theta))
        bins = np.linspace(0.0, 1.0, 41)
        if model.corrupted is not None:
            bad = model.corrupted.cpu().numpy()
            ax.hist(weights[~bad], bins=bins, alpha=0.7, label="clean labels")
            ax.hist(weights[bad], bins=bins, alpha=0.7, label="corrupted labels")
            ax.legend()
        else:
            ax.hist(weights, bins=bins)
        ax.set(xlabel="learnt sample weight σ(θ_j)", ylabel="training samples")
    else:
        k = np.arange(len(theta))
        ax.bar(k, np.exp(theta), color="C0")
        ax.axhline(
            math.exp(theta0), color="C3", linestyle="--", label=f"start: λ = {math.exp(theta0):.3g}"
        )
        ax.set_yscale("log")
        values = [*np.exp(theta), math.exp(theta0)]
        ax.set_ylim(min(values) / 1.5, max(values) * 1.5)  # a range even when all are equal
        ax.set(xlabel="feature", ylabel="learnt strength λ_k")
        names = data.feature_names
        if names and len(names) == len(theta) and len(theta) <= 40:
            ax.set_xticks(k, names, rotation=90, fontsize=7)
        ax.legend()
    ax.set_title(f"{type(model).__name__} on {data.name}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")


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


def _summary(
    args: argparse.Namespace,
    data: SplitData,
    model: FiniteSumModel,
    job: Mapping[str, Any],
    initial: Mapping[str, float],
    final: Mapping[str, float],
    baseline: Mapping[str, Any],
    result: RunResult,
    t_start: float,
) -> dict[str, Any]:
    theta = model.theta.detach().to("cpu", torch.float64)
    if isinstance(model, HypercleaningModel):
        values = {"weight_min": float(torch.sigmoid(theta).min())}
        values["weight_max"] = float(torch.sigmoid(theta).max())
        if model.corrupted is not None and 0 < int(model.corrupted.sum()) < model.n_train:
            values["detection"] = model.detection()
    else:
        values = {
            "strength_min": float(theta.exp().min()),
            "strength_max": float(theta.exp().max()),
        }
    return {
        **job,
        "n_train": data.n_train,
        "n_val": int(data.X_val.shape[0]),
        "n_test": int(data.X_test.shape[0]),
        "n_features": data.n_features,
        "n_classes": data.n_classes,
        "n_hyperparameters": int(model.theta.numel()),
        "initial": dict(initial),
        "final": dict(final),
        "baseline": dict(baseline),
        "theta": {
            "mean": float(theta.mean()),
            "min": float(theta.min()),
            "max": float(theta.max()),
            **values,
        },
        "status": result.status,
        "finished": result.finished,
        "message": result.message,
        "steps": result.step,
        "cost": float(result.cost),
        # computation over every session of the run, evaluations excluded (as result.json)
        "wall_time": float(result.wall_time),
        "total_time": time.perf_counter() - t_start,
        "run_dir": str(result.run_dir),
        "lower_gap": lower_level_gap(result.records),
    }


def _print_summary(s: Mapping[str, Any]) -> None:
    metric = "test_accuracy" if "test_accuracy" in s["final"] else "test_mse"

    def row(name: str, m: Mapping[str, Any]) -> str:
        return f"  {name:<28} val loss {m['val_loss']:<12.6g} {metric} {m[metric]:.4f}"

    b = s["baseline"]
    shrinkage = f", shrinkage ρ = {s['shrinkage']:.3g}" if s.get("shrinkage") else ""
    rows = f"{s['n_train']} training samples"
    if s.get("cv"):
        rows = f"{s['cv']}-fold cross validation over {s['n_train'] + s['n_val']} rows"
    print(
        f"bilevel hpo: {s['model']} on {s['data']} with {s['method']} "
        f"({s['n_hyperparameters']} hyperparameters, {rows}{shrinkage})"
    )
    print(row("initial θ", s["initial"]))
    print(row("learnt θ", s["final"]))
    print(row(f"best common θ = {b['theta']:g}", b))
    print(
        f"  {s['status']}: {s['message']}; {s['steps']} steps, {s['cost']:.4g} oracle calls, "
        f"{s['wall_time']:.2f} s of computation ({s['total_time']:.1f} s in all)"
    )
    detection = s["theta"].get("detection")
    if detection is not None:
        print(
            f"  sample weights: clean {detection['weight_clean_mean']:.3f}, corrupted "
            f"{detection['weight_corrupted_mean']:.3f} on average "
            f"({detection['n_corrupted']} corrupted); AUC {detection['auc']:.3f} "
            "(probability that a clean sample outweighs a corrupted one)"
        )
    gap = s.get("lower_gap")
    if gap is not None:
        print(
            f"  lower iterate at step {gap['step']}: f = {gap['f_iterate']:.6g}, "
            f"F(θ) = {gap['val_loss']:.6g} at w(θ) ({100 * gap['relative']:.1f} % apart)"
        )
    print(f"  run directory: {s['run_dir']} (learnt values: {HYPERPARAMETERS_FILE})")
