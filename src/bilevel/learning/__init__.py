"""Hyperparameter learning: data sets and bilevel problems (ridge, logistic, hypercleaning),
the pieces of ``bilevel hpo`` (:mod:`bilevel.learning.job`) and scikit-learn estimators,
``BilevelLogisticRegression`` and ``BilevelRidge`` (:mod:`bilevel.learning.estimator`,
imported on first use because they need scikit-learn)."""

from typing import Any

from bilevel.learning.datasets import (
    SplitData,
    encode_labels,
    from_scipy,
    is_sparse,
    load_mnist,
    load_sklearn,
    make_synthetic_classification,
    make_synthetic_regression,
    random_folds,
    read_csv,
    read_idx,
    read_svmlight,
    select_rows,
    split_data,
    stack_rows,
    to_csr,
)
from bilevel.learning.job import (
    LowerEvaluator,
    attach_lipschitz,
    box_projection,
    build_model,
    hpo_estimator,
    hpo_method,
    load_data,
    lower_instances,
    single_strength_baseline,
)
from bilevel.learning.models import (
    FiniteSumModel,
    HypercleaningModel,
    LogisticModel,
    RidgeModel,
    accuracy,
    corrupt_labels,
    hypercleaning_model,
    hypercleaning_problem,
    logistic_model,
    logistic_problem,
    predict_logistic,
    ridge_hypergradient,
    ridge_model,
    ridge_mu,
    ridge_objective,
    ridge_problem,
    ridge_solution,
)

__all__ = [
    "FiniteSumModel",
    "HypercleaningModel",
    "LogisticModel",
    "LowerEvaluator",
    "lower_instances",
    "RidgeModel",
    "SplitData",
    "accuracy",
    "attach_lipschitz",
    "box_projection",
    "build_model",
    "corrupt_labels",
    "encode_labels",
    "from_scipy",
    "hypercleaning_model",
    "hypercleaning_problem",
    "hpo_estimator",
    "hpo_method",
    "is_sparse",
    "load_data",
    "load_mnist",
    "load_sklearn",
    "logistic_model",
    "logistic_problem",
    "make_synthetic_classification",
    "make_synthetic_regression",
    "predict_logistic",
    "random_folds",
    "read_csv",
    "read_idx",
    "read_svmlight",
    "ridge_hypergradient",
    "ridge_model",
    "ridge_mu",
    "ridge_objective",
    "ridge_problem",
    "ridge_solution",
    "select_rows",
    "single_strength_baseline",
    "split_data",
    "stack_rows",
    "to_csr",
]


def __getattr__(name: str) -> Any:
    if name in ("BilevelLogisticRegression", "BilevelRidge"):
        from bilevel.learning import estimator

        return getattr(estimator, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
