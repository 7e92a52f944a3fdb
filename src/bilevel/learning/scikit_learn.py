"""scikit-learn estimators that learn one ℓ2 strength per feature by bilevel optimisation.

:class:`BilevelLogisticRegression` (binary or multinomial) and :class:`BilevelRidge` fit linear
models whose penalty ½ Σ_k λ_k ‖w_k‖² has one strength λ_k = exp θ_k per feature. ``fit``

1. standardises the features (x − m)/s with statistics of all rows (``standardize=True``;
   sparse input to the classifier is scaled x/s without centring, which keeps it sparse),
2. holds out a validation split (``validation_fraction`` of the rows; stratified by class for
   the classifier),
3. picks the best common θ on a grid by validation loss (``init="baseline"``),
4. learns θ per feature by ISGD with Adam on the validation loss F(θ) = f(w(θ)), with AID-CG or
   SID hypergradients (:func:`bilevel.learning.hpo.hpo_method`),
5. refits w on all rows with the learned strengths (L-BFGS to a tight tolerance for the
   classifier, a dense solve for ridge).

Requires scikit-learn (the ``learning`` extra). Computations run in float64 on the CPU.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import torch

from bilevel.learning.datasets import (
    column_scaling,
    from_scipy,
    random_folds,
    scale_columns,
    select_rows,
    sparse_column_scaling,
)
from bilevel.learning.evaluation import (
    LowerEvaluator,
    lower_instances,
    single_strength_baseline,
)
from bilevel.learning.hpo import (
    DEFAULT_STEP,
    DEFAULT_THETA_RANGE,
    LIPSCHITZ_MARGIN,
    default_shrinkage,
    hpo_method,
)
from bilevel.learning.models import CrossValidation, FiniteSumModel, LogisticModel, RidgeModel
from bilevel.methods import Budget

try:
    import scipy.sparse
    from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
    from sklearn.model_selection import StratifiedKFold, train_test_split
    from sklearn.utils import check_random_state
    from sklearn.utils.multiclass import check_classification_targets
    from sklearn.utils.validation import check_is_fitted, validate_data
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "bilevel.learning.scikit_learn needs scikit-learn >= 1.6: pip install 'bilevel[learning]'"
    ) from err

__all__ = ["BilevelLogisticRegression", "BilevelRidge"]

_METHODS = ("aid-cg", "sid")

_PARAMETERS = """
        method: hypergradient estimator, ``"aid-cg"`` (L-BFGS + conjugate gradients, best for
            small and medium data) or ``"sid"`` (stochastic implicit differentiation on
            minibatches, for many rows).
        validation_fraction: fraction of the rows held out to learn θ (without ``cv``).
        cv: None (one held-out split) or K ≥ 2: learn θ on the K-fold cross-validation loss
            instead, the mean over K folds of the validation loss of the model trained on the
            other folds (K lower-level problems solved together; ``method="aid-cg"`` only).
        max_steps: upper-level (Adam) steps.
        max_time: optional limit in seconds on the upper-level optimisation.
        step: Adam step schedule on θ (a number or a string such as ``"poly:0.1,0.25"``).
        init: initial θ: ``"baseline"`` (the best common value of θ on a grid) or a number.
        theta_range: box (lo, hi) for θ; λ ∈ [exp lo, exp hi]. None: (−10, 1) for the
            classifier, (−10, 3) for ridge.
        shrinkage: ρ ≥ 0 of the penalty (ρ/2) Σ_k (θ_k − θ̄)² added to the validation loss; it
            pulls the strengths towards a common value so that they do not overfit the
            validation split (0: none). ``"auto"``: ρ = 1/(n_val τ²) with τ = 0.5, a Gaussian
            prior on the log-strengths (:func:`bilevel.learning.hpo.default_shrinkage`).
        fit_intercept: fit an unpenalised (ridge) or weakly penalised (logistic) bias.
        standardize: standardise the features before learning (recommended).
        inner_steps, batch_size: see :func:`bilevel.learning.hpo.hpo_estimator`.
        random_state: seed (int), ``numpy.random.RandomState`` or None, for the split and the
            stochastic parts.
        verbose: show a progress bar on stderr."""

_ATTRIBUTES = """
        strengths_: λ_k = exp θ_k, (d,), for the standardised features when ``standardize``.
        theta_: θ, (d,).
        baseline_strength_: the common strength the optimisation started from.
        validation_loss_: F at the learned θ (the validation loss of the model trained on the
            other rows), and ``baseline_validation_loss_`` at the starting θ.
        n_iter_: upper-level steps taken.
        n_features_in_, feature_names_in_: as in scikit-learn."""


class _PerFeatureL2Estimator(BaseEstimator):
    """Parameters, validation, standardisation and the bilevel fit shared by the estimators."""

    _default_theta_range: tuple[float, float] = DEFAULT_THETA_RANGE["logistic"]

    def __init__(
        self,
        method: str = "aid-cg",
        validation_fraction: float = 0.25,
        cv: int | None = None,
        max_steps: int = 100,
        max_time: float | None = None,
        step: Any = DEFAULT_STEP,
        init: str | float = "baseline",
        theta_range: tuple[float, float] | None = None,
        shrinkage: float | str = "auto",
        fit_intercept: bool = True,
        standardize: bool = True,
        inner_steps: int | None = None,
        batch_size: int | None = None,
        random_state: Any = None,
        verbose: bool = False,
    ) -> None:
        self.method = method
        self.validation_fraction = validation_fraction
        self.cv = cv
        self.max_steps = max_steps
        self.max_time = max_time
        self.step = step
        self.init = init
        self.theta_range = theta_range
        self.shrinkage = shrinkage
        self.fit_intercept = fit_intercept
        self.standardize = standardize
        self.inner_steps = inner_steps
        self.batch_size = batch_size
        self.random_state = random_state
        self.verbose = verbose

    # ---------------------------------------------------------------------------- validation

    def _check_params(self) -> tuple[float, float]:
        if self.method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {self.method!r}")
        vf = self.validation_fraction
        if not (isinstance(vf, numbers.Real) and 0.0 < vf < 1.0):
            raise ValueError(f"validation_fraction must be in (0, 1), got {vf!r}")
        if self.cv is not None:
            if isinstance(self.cv, bool) or not isinstance(self.cv, numbers.Integral):
                raise ValueError(f"cv must be None or an integer >= 2, got {self.cv!r}")
            if self.cv < 2:
                raise ValueError(f"cv must be None or an integer >= 2, got {self.cv!r}")
            if self.method != "aid-cg":
                raise ValueError(
                    f"cv needs method='aid-cg' (SID samples one training set), got {self.method!r}"
                )
        if not isinstance(self.max_steps, numbers.Integral) or self.max_steps < 1:
            raise ValueError(f"max_steps must be a positive integer, got {self.max_steps!r}")
        if self.max_time is not None and not (
            isinstance(self.max_time, numbers.Real) and self.max_time > 0
        ):
            raise ValueError(f"max_time must be positive or None, got {self.max_time!r}")
        if not (isinstance(self.init, str) and self.init == "baseline") and not (
            isinstance(self.init, numbers.Real) and math.isfinite(self.init)
        ):
            raise ValueError(f"init must be 'baseline' or a finite number, got {self.init!r}")
        try:
            box = self._default_theta_range if self.theta_range is None else self.theta_range
            lo, hi = (float(v) for v in box)
        except (TypeError, ValueError):
            raise ValueError(
                f"theta_range must be a pair (lo, hi), got {self.theta_range!r}"
            ) from None
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"theta_range must be finite with lo < hi, got {self.theta_range!r}")
        rho = self.shrinkage
        number = isinstance(rho, numbers.Real) and math.isfinite(rho) and rho >= 0
        if not (number or (isinstance(rho, str) and rho == "auto")):
            raise ValueError(f"shrinkage must be 'auto' or a finite number >= 0, got {rho!r}")
        return lo, hi

    def _shrinkage(self, n_val: int) -> float:
        return default_shrinkage(n_val) if self.shrinkage == "auto" else float(self.shrinkage)

    def _standardized(
        self, X: Any, center: bool = False
    ) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """(Z, m, s): the features Z = (X − m)/s as a float64 tensor (torch CSR for sparse X,
        with m = 0), and the statistics m and s (d,) of all rows. Without ``standardize``:
        s = 1, and m the column means if ``center`` (dense X), else 0."""
        d = X.shape[1]
        mean, scale = np.zeros(d), np.ones(d)
        if scipy.sparse.issparse(X):
            Z = from_scipy(X.astype(np.float64))
            if self.standardize:
                scale = sparse_column_scaling(Z).numpy()
                Z = scale_columns(Z, torch.from_numpy(scale))
            return Z, mean, scale
        X64 = np.array(X, dtype=np.float64, copy=True)
        if self.standardize:
            m, s = column_scaling(torch.from_numpy(X64), center=self.fit_intercept)
            mean, scale = m.numpy(), s.numpy()
        elif center:
            mean = X64.mean(axis=0)
        return torch.from_numpy((X64 - mean) / scale), mean, scale

    def _cross_validation(
        self, n: int, y: np.ndarray | None, rng: np.random.RandomState
    ) -> CrossValidation:
        """The ``cv`` folds, stratified by class (``StratifiedKFold``) when ``y`` has at least
        K rows of every class, else :func:`random_folds`."""
        if self.cv > n:
            raise ValueError(f"cv = {self.cv} folds need at least as many samples, got {n}")
        if y is None or np.bincount(y).min() < self.cv:
            seed = int(rng.randint(np.iinfo(np.int32).max))
            return CrossValidation(random_folds(n, int(self.cv), seed=seed))
        splitter = StratifiedKFold(self.cv, shuffle=True, random_state=rng)
        return CrossValidation.from_splitter(splitter, n, y)

    def _n_val(self, n: int) -> int:
        if n < 2:
            raise ValueError(f"n_samples = {n}: at least 2 samples are needed")
        return min(max(1, int(round(self.validation_fraction * n))), n - 1)

    def _learn(
        self,
        model: FiniteSumModel,
        X_val: torch.Tensor,
        y_val: torch.Tensor,
        theta_box: tuple[float, float],
        seed: int,
    ) -> torch.Tensor:
        """Learn θ of ``model`` from the grid baseline (or ``init``) by ISGD with Adam; set the
        fitted attributes that describe θ; return θ (detached)."""
        lo, hi = theta_box
        evaluator = LowerEvaluator(model, X_val, y_val)
        if isinstance(self.init, str):
            theta0 = single_strength_baseline(model, evaluator, theta_range=(lo, hi))["theta"]
        else:
            theta0 = min(max(float(self.init), lo), hi)
        with torch.no_grad():
            model.theta.fill_(theta0)
        self.baseline_validation_loss_ = evaluator.metrics()["val_loss"]
        self.baseline_strength_ = math.exp(theta0)

        method = hpo_method(
            model,
            self.method,
            step=self.step,
            seed=seed,
            theta_range=(lo, hi),
            inner_steps=self.inner_steps,
            batch_size=self.batch_size,
        )
        budget = Budget(steps=int(self.max_steps), wall_time=self.max_time)
        result = method.run(
            model.problem,
            lower_instances(model, evaluator.w),
            budget,
            progress=bool(self.verbose),
            plot=False,
        )
        theta = model.theta.detach().clone()
        self.theta_ = theta.numpy().copy()
        self.strengths_ = np.exp(self.theta_)
        self.validation_loss_ = evaluator.metrics()["val_loss"]
        self.n_iter_ = int(result.step)
        return theta

    def _linear_scores(self, X: Any, accept_sparse: bool) -> np.ndarray:
        """X coef_ᵀ + intercept_: (n, K) for a (K, d) ``coef_``, (n,) for a (d,) one."""
        check_is_fitted(self)
        X = validate_data(
            self,
            X,
            accept_sparse="csr" if accept_sparse else False,
            reset=False,
            dtype=[np.float64, np.float32],
        )
        return np.asarray(X @ self.coef_.T, dtype=np.float64) + self.intercept_


class BilevelLogisticRegression(ClassifierMixin, _PerFeatureL2Estimator):
    """Logistic regression with one ℓ2 strength per feature, learnt on a validation split.

    The fitted model minimises (1/N) Σ_j CE(w; x_j, y_j) + ½ Σ_k λ_k Σ_c w_kc² over all N
    rows (the intercept carries the fixed small strength 1e-4), where CE is the binary or
    multinomial cross-entropy and the strengths λ_k = exp θ_k minimise the validation
    cross-entropy of the model trained on the other rows (the split is stratified by class).
    Strengths act on standardised features when ``standardize=True``; ``coef_`` and
    ``intercept_`` are in the units of the input features either way. Dense arrays and
    ``scipy.sparse`` matrices are accepted.

    Parameters:{parameters}

    Attributes:
        classes_: the class labels (K,).
        coef_: (1, d) for two classes, else (K, d).
        intercept_: (1,) or (K,); zeros when ``fit_intercept=False``.{attributes}
    """

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        return tags

    def fit(self, X: Any, y: Any) -> BilevelLogisticRegression:
        """Learn the strengths on a validation split, then refit on all rows.

        Raises:
            ValueError: bad parameters, fewer than two classes, or data scikit-learn rejects
                (NaN, infinite values, empty arrays).
        """
        lo, hi = self._check_params()
        X, y = validate_data(self, X, y, accept_sparse="csr", dtype=[np.float64, np.float32])
        check_classification_targets(y)
        self.classes_, y_codes = np.unique(y, return_inverse=True)
        n_classes = len(self.classes_)
        if n_classes < 2:
            raise ValueError(
                f"{type(self).__name__} needs samples of at least 2 classes; the data hold "
                f"1 class ({self.classes_[0]!r})"
            )
        n, d = X.shape
        rng = check_random_state(self.random_state)
        seed = int(rng.randint(np.iinfo(np.int32).max))

        Zt, mean, scale = self._standardized(X)
        yt = torch.from_numpy(np.asarray(y_codes, dtype=np.int64))
        options = {
            "fit_intercept": self.fit_intercept,
            "theta_lower": lo,
            "lipschitz_margin": LIPSCHITZ_MARGIN,
        }
        if self.cv is not None:  # every row validates once: n validation rows in all
            model = LogisticModel(
                Zt,
                yt,
                Zt,
                yt,
                0.0,
                n_classes,
                **options,
                shrinkage=self._shrinkage(n),
                criterion=self._cross_validation(n, np.asarray(y_codes), rng),
            )
            Z_val, y_val = Zt, yt
        else:
            train, val = (torch.from_numpy(i) for i in self._split(n, y_codes, n_classes, rng))
            Z_val, y_val = select_rows(Zt, val), yt[val]
            model = LogisticModel(
                select_rows(Zt, train),
                yt[train],
                Z_val,
                y_val,
                0.0,
                n_classes,
                **options,
                shrinkage=self._shrinkage(len(val)),
            )
        theta = self._learn(model, Z_val, y_val, (lo, hi), seed)

        # refit on all rows with the learned strengths
        full = LogisticModel(Zt, yt, Zt, yt, theta, n_classes, fit_intercept=self.fit_intercept)
        w = LowerEvaluator(full, Zt, yt).solve()[0].numpy()
        W = w.reshape(-1, 1) if w.ndim == 1 else w  # (p, 1) binary, (p, K) multinomial
        coef = (W[:d] / scale[:, None]).T
        bias = W[d] if self.fit_intercept else np.zeros(W.shape[1])
        self.coef_ = np.ascontiguousarray(coef)
        self.intercept_ = np.asarray(bias - coef @ mean, dtype=np.float64)
        return self

    def _split(
        self, n: int, y: np.ndarray, n_classes: int, rng: np.random.RandomState
    ) -> tuple[np.ndarray, np.ndarray]:
        """Row indices (train, validation), stratified when every class has two rows."""
        n_val = self._n_val(n)
        counts = np.bincount(y, minlength=n_classes)
        stratify = y if counts.min() >= 2 and n_classes <= n_val <= n - n_classes else None
        train, val = train_test_split(
            np.arange(n), test_size=n_val, stratify=stratify, random_state=rng
        )
        return np.sort(train), np.sort(val)

    # ---------------------------------------------------------------------------- predict

    def decision_function(self, X: Any) -> np.ndarray:
        """Scores x·coef + intercept: (n,) for two classes (positive: ``classes_[1]``), else
        (n, K)."""
        scores = self._linear_scores(X, accept_sparse=True)
        return scores[:, 0] if scores.shape[1] == 1 else scores

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities (n, K): the logistic function (two classes) or the softmax."""
        scores = self.decision_function(X)
        if scores.ndim == 1:
            p1 = 0.5 * (1.0 + np.tanh(0.5 * scores))  # σ(s) without overflow
            return np.column_stack([1.0 - p1, p1])
        shifted = scores - scores.max(axis=1, keepdims=True)
        e = np.exp(shifted)
        return e / e.sum(axis=1, keepdims=True)

    def predict_log_proba(self, X: Any) -> np.ndarray:
        """log of :meth:`predict_proba`."""
        with np.errstate(divide="ignore"):
            return np.log(self.predict_proba(X))

    def predict(self, X: Any) -> np.ndarray:
        """The most probable class of each row."""
        scores = self.decision_function(X)
        index = (scores > 0).astype(int) if scores.ndim == 1 else scores.argmax(axis=1)
        return self.classes_[index]


class BilevelRidge(RegressorMixin, _PerFeatureL2Estimator):
    """Ridge regression with one ℓ2 strength per feature, learnt on a validation split.

    The fitted model minimises (1/2N) Σ_j (x_j·w + b − y_j)² + ½ Σ_k λ_k w_k² over all N rows
    (b unpenalised: features and targets are centred when ``fit_intercept``), and the
    strengths λ_k = exp θ_k minimise the validation mean squared error (halved) of the model
    trained on the other rows. The refit is a dense solve of the d×d normal equations.
    Strengths act on standardised features when ``standardize=True``; ``coef_`` and
    ``intercept_`` are in the units of the inputs either way. Dense input only.

    Parameters:{parameters}

    Attributes:
        coef_: (d,).
        intercept_: a float; 0 when ``fit_intercept=False``.{attributes}
    """

    _default_theta_range = DEFAULT_THETA_RANGE["ridge"]

    def fit(self, X: Any, y: Any) -> BilevelRidge:
        """Learn the strengths on a validation split, then refit on all rows.

        Raises:
            ValueError: bad parameters, or data scikit-learn rejects (NaN, infinite values,
                empty arrays, sparse matrices, a 2-D y with several columns).
        """
        lo, hi = self._check_params()
        X, y = validate_data(self, X, y, y_numeric=True, dtype=[np.float64, np.float32])
        n = X.shape[0]
        rng = check_random_state(self.random_state)
        seed = int(rng.randint(np.iinfo(np.int32).max))

        # an unpenalised intercept: centred features and targets
        Zt, mean, scale = self._standardized(X, center=self.fit_intercept)
        y64 = np.asarray(y, dtype=np.float64)
        y_mean = float(y64.mean()) if self.fit_intercept else 0.0
        yt = torch.from_numpy(y64 - y_mean)
        if self.cv is not None:  # every row validates once: n validation rows in all
            model = RidgeModel(
                Zt,
                yt,
                Zt,
                yt,
                0.0,
                theta_lower=lo,
                shrinkage=self._shrinkage(n),
                criterion=self._cross_validation(n, None, rng),
                lipschitz_margin=LIPSCHITZ_MARGIN,
            )
            Z_val, y_val = Zt, yt
        else:
            train, val = (
                torch.from_numpy(np.sort(i))
                for i in train_test_split(np.arange(n), test_size=self._n_val(n), random_state=rng)
            )
            Z_val, y_val = Zt[val], yt[val]
            model = RidgeModel(
                Zt[train],
                yt[train],
                Z_val,
                y_val,
                0.0,
                theta_lower=lo,
                shrinkage=self._shrinkage(len(val)),
                lipschitz_margin=LIPSCHITZ_MARGIN,
            )
        theta = self._learn(model, Z_val, y_val, (lo, hi), seed)

        # refit on all rows with the learned strengths: (ZᵀZ/N + diag λ) w = Zᵀy/N
        full = RidgeModel(Zt, yt, Zt, yt, theta)
        w = full.solution(theta).reshape(-1).numpy()
        self.coef_ = w / scale
        self.intercept_ = float(y_mean - self.coef_ @ mean)
        return self

    def predict(self, X: Any) -> np.ndarray:
        """x·coef + intercept for each row, (n,)."""
        return self._linear_scores(X, accept_sparse=False)


for _estimator in (BilevelLogisticRegression, BilevelRidge):
    _estimator.__doc__ = _estimator.__doc__.format(parameters=_PARAMETERS, attributes=_ATTRIBUTES)
