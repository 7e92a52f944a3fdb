"""The scikit-learn estimators against scikit-learn's cross-validated baselines.

``BilevelLogisticRegression`` against ``LogisticRegressionCV`` and ``BilevelRidge`` against
``RidgeCV``, on scikit-learn's bundled data sets, over several random train/test splits
(75/25, stratified for classification). Every estimator sees the same training rows; the
bilevel ones learn one strength per feature on a held-out quarter of them, or with ``cv=5`` on
the 5-fold cross-validation loss (default settings otherwise: 100 Adam steps, AID-CG,
shrinkage "auto"), the CV ones pick one strength by 5-fold cross validation over 20 values
(C or α log-spaced over 10⁻⁴…10⁴). Reported: mean and spread of the
test score (accuracy, or R²) and of the fit time, and how often the bilevel estimator scores
at least as well. Writes a markdown report. About two minutes.

Usage: python benchmarks/estimators.py [--splits 5] [--out docs/benchmarks_estimators.md]
"""

from __future__ import annotations

import argparse
import pathlib
import platform
import statistics
import time
import warnings

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits, load_wine
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegressionCV, RidgeCV
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from bilevel.learning import BilevelLogisticRegression, BilevelRidge

CLASSIFICATION = {"breast_cancer": load_breast_cancer, "wine": load_wine, "digits": load_digits}
REGRESSION = {"diabetes": load_diabetes}
GRID = np.logspace(-4, 4, 20)


def _estimators(task: str, seed: int) -> dict:
    if task == "classification":
        return {
            "bilevel": BilevelLogisticRegression(random_state=seed),
            "bilevel_cv": BilevelLogisticRegression(cv=5, random_state=seed),
            "cv": make_pipeline(
                StandardScaler(), LogisticRegressionCV(Cs=GRID, cv=5, max_iter=5000)
            ),
        }
    return {
        "bilevel": BilevelRidge(random_state=seed),
        "bilevel_cv": BilevelRidge(cv=5, random_state=seed),
        "cv": make_pipeline(StandardScaler(), RidgeCV(alphas=GRID, cv=5)),
    }


def study(name: str, loader, task: str, splits: int) -> dict:
    X, y = loader(return_X_y=True)
    rows = []
    for seed in range(splits):
        stratify = y if task == "classification" else None
        Xtr, Xte, ytr, yte = train_test_split(
            X, y, test_size=0.25, random_state=seed, stratify=stratify
        )
        row = {}
        for label, est in _estimators(task, seed).items():
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                est.fit(Xtr, ytr)
            row[label] = (est.score(Xte, yte), time.perf_counter() - start)
        rows.append(row)
        print(f"  {name} split {seed}: " + ", ".join(f"{k} {v[0]:.4f}" for k, v in row.items()))
    return {"n": len(X), "d": X.shape[1], "task": task, "rows": rows}


def report(results: dict, args, seconds: float) -> list[str]:
    lines = [
        "# Benchmark: the scikit-learn estimators against cross-validated baselines",
        "",
        "Produced by `benchmarks/estimators.py`; every number below was measured by that script "
        f"(torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} torch "
        f"thread(s), total {seconds:.0f} s).",
        "",
        "Each split: 75 % of the rows to fit (the bilevel estimators learn one strength per "
        "feature on a held-out quarter of those, or with cv=5 on their 5-fold cross-validation "
        "loss, then refit on all of them; the CV baselines "
        "choose one strength by 5-fold cross validation over 20 log-spaced values in "
        "[10⁻⁴, 10⁴] after standardisation), 25 % to test. Score: accuracy (classification) "
        "or R² (regression) on the test rows. Default settings throughout (bilevel: AID-CG, "
        "100 Adam steps, shrinkage 'auto').",
        "",
        "| data set | n × d | estimator | test score, mean (min–max) | fit time, median [s] "
        "| bilevel ≥ CV |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        bilevel = "BilevelLogisticRegression" if r["task"] == "classification" else "BilevelRidge"
        cv = "LogisticRegressionCV" if r["task"] == "classification" else "RidgeCV"
        for key, label in (("bilevel", bilevel), ("bilevel_cv", f"{bilevel}(cv=5)"), ("cv", cv)):
            scores = [row[key][0] for row in r["rows"]]
            times = [row[key][1] for row in r["rows"]]
            wins = sum(row[key][0] >= row["cv"][0] for row in r["rows"])
            tail = f"{wins} of {len(r['rows'])}" if key != "cv" else ""
            lines.append(
                f"| {name} | {r['n']} × {r['d']} | {label} | {statistics.mean(scores):.4f} "
                f"({min(scores):.4f}–{max(scores):.4f}) | {statistics.median(times):.2f} | {tail} |"
            )
    lines += ["", NOTES, ""]
    return lines


NOTES = """## Reading the results

- With one held-out quarter of the training rows, the bilevel estimators are ahead on breast
  cancer in every split and level on wine, and behind on digits and diabetes, by less than
  the spread of either estimator over the splits. Learning on the 5-fold cross-validation loss
  instead (``cv=5``) lifts wine to 0.9867 (ahead in 5 of 5) and diabetes to 0.4276 (RidgeCV
  0.4291) and leaves breast cancer and digits where they were: consistent with the noise of a
  single split weighing most on the smallest sets (178 and 442 rows), though not tested
  further.
- Fit times: the bilevel estimators make a grid search for the starting strength, 100 upper
  steps with warm-started solves and a refit: four to five times the time of the CV baselines
  on these small sets, and with ``cv=5`` (five lower-level problems per step) five to
  fourteen times.
- The larger studies (digits over five splits, MNIST, 200 000 samples) are in
  [benchmarks_hpo.md](benchmarks_hpo.md)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splits", type=int, default=5)
    parser.add_argument("--out", default="docs/benchmarks_estimators.md")
    args = parser.parse_args()
    start = time.perf_counter()
    results = {}
    for name, loader in CLASSIFICATION.items():
        results[name] = study(name, loader, "classification", args.splits)
    for name, loader in REGRESSION.items():
        results[name] = study(name, loader, "regression", args.splits)
    seconds = time.perf_counter() - start
    lines = report(results, args, seconds)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    print(f"wrote {out} ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
