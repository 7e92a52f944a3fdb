"""The pieces of ``bilevel hpo`` as a library: data, models, estimators and the method.

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
convexity μ = exp θ_lo (or the intercept strength) stays valid. Measuring F(θ) and the single
strength baseline live in :mod:`bilevel.learning.evaluation`; the job itself (run directory,
summary, files) in :mod:`bilevel.learning.job`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bilevel.autodiff import Cost, LowerLevel
from bilevel.hypergrad import HypergradientEstimator, Implicit, Unrolled
from bilevel.learning.config import (
    DEFAULT_METHOD_RULE,
    DEFAULT_PRIOR_STD,
    DEFAULT_STEP,
    METHODS,
    MODELS,
    SID_MAX_INNER,
    SID_MIN_TRAIN,
    SID_SOLVERS,
)
from bilevel.learning.datasets import (
    CSV_SUFFIXES,
    SKLEARN_DATASETS,
    SplitData,
    class_labels,
    column_major,
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
    CrossValidation,
    FiniteSumModel,
    HypercleaningModel,
    LogisticModel,
    RidgeModel,
    corrupt_labels,
)
from bilevel.linear import CG
from bilevel.lower import LBFGS
from bilevel.methods import ISGD
from bilevel.problem import BilevelError
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
    "DEFAULT_METHOD_RULE",
    "DEFAULT_PRIOR_STD",
    "DEFAULT_STEP",
    "DEFAULT_THETA_RANGE",
    "LIPSCHITZ_MARGIN",
    "METHODS",
    "MODELS",
    "SID_MAX_INNER",
    "SID_MIN_TRAIN",
    "SID_SOLVERS",
    "box_projection",
    "build_model",
    "data_for",
    "default_method",
    "default_shrinkage",
    "gradient_scale",
    "hpo_estimator",
    "hpo_method",
    "load_data",
    "store_for",
    "theta_box",
]

#: Box [θ_lo, θ_hi] for the log-strengths (logistic, ridge: λ ∈ [4.5e-5, 20]) and for the
#: sample-weight logits (hypercleaning: σ(θ) ∈ [0.0025, 0.9975]).
DEFAULT_THETA_RANGE: dict[str, tuple[float, float]] = {
    "logistic": (-10.0, 1.0),
    "ridge": (-10.0, 3.0),
    "hypercleaning": (-6.0, 6.0),
}
#: Default size of the synthetic data sets: ``synthetic`` = ``synthetic:10000:100``.
SYNTHETIC_DEFAULT = (10_000, 100)
#: Margin on the power-iteration Lipschitz estimate that the models state (an estimate from
#: below of ‖X‖₂²).
LIPSCHITZ_MARGIN = 1.1
#: η of SID's fixed-point map steps (of the map w − ∇_w ĥ(w)/L(θ): SGD with step η/L)
SID_MAP_STEP = 0.5
#: SID's preconditioned solvers: step β/λ̂ (λ̂ the measured preconditioned curvature) and
#: heavy-ball momentum.
SID_STEP = 0.5
SID_MOMENTUM = 0.5
SID_CG_LOWER = 0
SID_CG_ADJOINT = 20


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
    validation rows together (seeded random folds; :class:`CrossValidation`). The problem
    states the Lipschitz bound :data:`LIPSCHITZ_MARGIN` · ``smoothness()``.
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
    options = {"lipschitz_margin": LIPSCHITZ_MARGIN}
    if cv is not None:  # the training and validation rows, in K folds
        X = stack_rows(data.X_train, data.X_val)
        y = torch.cat([data.y_train, data.y_val])
        args = (X, y, X, y, theta0)
        options["criterion"] = CrossValidation(random_folds(X.shape[0], cv, seed))
    if model == "ridge":
        out: FiniteSumModel = RidgeModel(*args, theta_lower=lo, shrinkage=shrinkage, **options)
    elif model == "logistic":
        out = LogisticModel(
            *args,
            data.n_classes,
            fit_intercept=fit_intercept,
            theta_lower=lo,
            shrinkage=shrinkage,
            **options,
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
            **options,
        )
    return out


def box_projection(lo: float, hi: float) -> Callable[[Tensor], None]:
    """P(θ) = clamp(θ, lo, hi), in place (an ISGD projection)."""
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise BilevelError(f"theta range must be finite with lo < hi, got ({lo}, {hi})")

    def project(theta: Tensor) -> None:
        theta.clamp_(lo, hi)

    project.__qualname__ = f"box_projection({lo:g}, {hi:g})"
    return project


def default_method(n_train: int, cv: int | None = None) -> str:
    """The method of ``bilevel hpo`` when none is given: ``"sid"`` for training sets of at
    least :data:`SID_MIN_TRAIN` samples (without cross validation, which SID does not
    support), else ``"aid-cg"``."""
    return "sid" if cv is None and n_train >= SID_MIN_TRAIN else "aid-cg"


def default_shrinkage(n_val: int, prior_std: float = DEFAULT_PRIOR_STD) -> float:
    """ρ = 1/(n_val τ²): the Gaussian prior θ_k ~ N(θ̄, τ²) on the per-feature log-strengths.

    F is a mean over the n_val validation samples, so the prior's negative log-density
    ‖θ − θ̄‖²/(2τ²), added to the validation negative log-likelihood n_val·F, becomes
    (ρ/2)‖θ − θ̄‖² on F: the pull towards a common strength fades as the validation set grows.
    """
    if n_val < 1 or not (math.isfinite(prior_std) and prior_std > 0):
        raise BilevelError(f"need n_val >= 1 and prior_std > 0, got {n_val}, {prior_std}")
    return 1.0 / (n_val * prior_std**2)


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
) -> HypergradientEstimator:
    """The hypergradient estimator of ``method`` for ``model``, configured for warm starts.

    * ``sid``: minibatches of ``batch_size`` training samples (default 12√N, in [64, 4096])
      and the exact validation gradient, map Φ(w) = w − ∇_w ĥ(w)/L(θ). Stage solvers
      (``sid_solver``): ``"precond"`` (default) :class:`PreconditionedSVRG` and
      :class:`PreconditionedSVRGLinear` (Jacobi preconditioner from the model's exact
      minibatch Hessian diagonal, steps 0.5/λ̂ from the measured curvature, momentum
      :data:`SID_MOMENTUM`, variance-reduced in both stages, the full gradient of each full
      Hessian graph of stage 2 becoming stage 1's anchor); ``"svrg"``
      :class:`VarianceReducedFixedPoint` and plain fixed-point adjoint steps, ``"sgd"`` plain
      steps in both (constant steps 0.5 of the map). With ``inner_steps`` None (default) t and
      k adapt (:class:`InnerAccuracy`): each stage iterates until its estimated residual meets
      the step's ε_k, δ_k of :func:`hpo_method` (at most :data:`SID_MAX_INNER` iterations);
      else t = k = ``inner_steps``. The final stage uses one sample for the per-feature
      models (θ enters only the regulariser, so J = ∂_θ∇_w Ω involves no data) and all
      samples for hypercleaning (θ weights every sample). Gradients and Hessian products of
      the training loss come in closed form (:meth:`FiniteSumModel.lower_sample_hessian`);
    * ``aid-cg``: L-BFGS lower solve and CG adjoint to the tolerances of :func:`hpo_method`
      (at most ``inner_steps`` iterations each, default 200);
    * ``itd``: ``inner_steps`` (default 20) differentiated gradient steps of length 1/L(θ).

    No a-posteriori bound is computed (AID-CG: ``compute_bound=False``; ITD and SID report
    none): the runs record the certified lower-level distance instead.
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
            sample_hessian=model.lower_sample_hessian,
        )
    if method == "aid-cg":
        cap = 200 if inner_steps is None else int(inner_steps)
        return Implicit(
            CG(max_iter=cap),
            lower_solver=LBFGS(max_iter=cap),
            compute_bound=False,
            warn_unconverged=False,
        )
    return Unrolled(steps=20 if inner_steps is None else int(inner_steps))


def gradient_scale(model: FiniteSumModel) -> float:
    """max over the instances of ‖∇_w h(0, θ)‖ at the current θ (units of the tolerances)."""
    lower = LowerLevel(model.problem, model.instance_batch(), Cost())
    _, g = lower.value_and_grad(model.init_w(model.n_instances))
    return max(float(g.reshape(len(g), -1).norm(dim=1).max()), 1e-12)


def _train_layout(method: str) -> str:
    """The storage of the dense training features that makes ``method`` fastest: ``"row"``
    for ``sid`` (it gathers minibatch rows), ``"column"`` for the full-batch products of the
    others (``benchmarks/layout.py``)."""
    return "row" if method == "sid" else "column"


def store_for(model: FiniteSumModel, method: str) -> None:
    """Store the model's dense features in the layout that makes ``method`` fastest
    (:meth:`~bilevel.learning.models.FiniteSumModel.store_features`): column-major for the
    full-batch products of ``aid-cg`` and ``itd`` (and of every validation loss and accurate
    lower solve); ``sid`` gathers minibatch rows of the training features, which stay
    row-major (a column-major copy besides would double the memory of the largest array).
    No copy where the features are stored so already (:func:`data_for`). Measured on CPU:
    features on another device stay as they are."""
    if model.device.type == "cpu":
        model.store_features(train=_train_layout(method), val="column")


def data_for(data: SplitData, method: str) -> SplitData:
    """``data`` with the dense features stored as :func:`store_for` stores a model's, so that
    a model built from it copies nothing (the test rows column-major: full-batch products)."""
    if data.X_train.device.type != "cpu":
        return data
    return dataclasses.replace(
        data,
        X_train=column_major(data.X_train, _train_layout(method) == "column"),
        X_val=column_major(data.X_val),
        X_test=column_major(data.X_test),
    )


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
    with g₀ = ‖∇_w h(0, θ₀)‖. The model's dense features are stored in the method's layout
    (:func:`store_for`).
    """
    lo, hi = theta_box(model, theta_range)
    estimator = hpo_estimator(
        model,
        method,
        inner_steps=inner_steps,
        batch_size=batch_size,
        seed=seed,
        sid_solver=sid_solver,
    )
    store_for(model, method)
    g0 = gradient_scale(model)
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


def theta_box(
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
