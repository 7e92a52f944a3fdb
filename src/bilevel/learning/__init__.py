"""Hyperparameter learning: data sets and bilevel problems (ridge, logistic, hypercleaning),
the pieces of ``bilevel hpo`` (:mod:`bilevel.learning.hpo`: data, models, hypergradient
estimators, the method; :mod:`bilevel.learning.evaluation`: F(θ) and the grid baseline) and
the scikit-learn estimators ``BilevelLogisticRegression`` and ``BilevelRidge``
(:mod:`bilevel.learning.scikit_learn`, which needs scikit-learn).

Names are loaded on first use, so that importing the package (or its torch-free
:mod:`bilevel.learning.config`) imports no torch.
"""

from __future__ import annotations

from bilevel._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    **dict.fromkeys(
        (
            "SplitData",
            "column_major",
            "encode_labels",
            "from_scipy",
            "is_sparse",
            "load_mnist",
            "load_sklearn",
            "make_synthetic_classification",
            "make_synthetic_regression",
            "random_folds",
            "read_csv",
            "read_idx",
            "read_svmlight",
            "select_rows",
            "split_data",
            "stack_rows",
            "to_csr",
        ),
        "bilevel.learning.datasets",
    ),
    **dict.fromkeys(
        ("LowerEvaluator", "lower_instances", "single_strength_baseline"),
        "bilevel.learning.evaluation",
    ),
    **dict.fromkeys(
        (
            "box_projection",
            "build_model",
            "hpo_estimator",
            "hpo_method",
            "load_data",
        ),
        "bilevel.learning.hpo",
    ),
    **dict.fromkeys(
        (
            "CrossValidation",
            "FiniteSumModel",
            "HeldOut",
            "HypercleaningModel",
            "LogisticModel",
            "RidgeModel",
            "accuracy",
            "corrupt_labels",
            "hypercleaning_model",
            "hypercleaning_problem",
            "logistic_model",
            "logistic_problem",
            "predict_logistic",
            "ridge_hypergradient",
            "ridge_model",
            "ridge_mu",
            "ridge_objective",
            "ridge_problem",
            "ridge_solution",
        ),
        "bilevel.learning.models",
    ),
    **dict.fromkeys(("BilevelLogisticRegression", "BilevelRidge"), "bilevel.learning.scikit_learn"),
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
