"""Configuration of ``bilevel hpo`` and the names it chooses from. Imports no torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from bilevel.config import option

__all__ = [
    "DEFAULT_METHOD_RULE",
    "DEFAULT_PRIOR_STD",
    "DEFAULT_STEP",
    "METHODS",
    "MODELS",
    "SID_MAX_INNER",
    "SID_MIN_TRAIN",
    "SID_SOLVERS",
    "HpoConfig",
]

METHODS = ("sid", "aid-cg", "itd")
SID_SOLVERS = ("precond", "svrg", "sgd")  # stage solvers of SID in `bilevel hpo`
MODELS = ("logistic", "ridge", "hypercleaning")

#: Adam's step α_k on θ (units of θ, i.e. of log-strength, per step).
DEFAULT_STEP = "poly:0.1,0.25"

#: τ, the prior standard deviation of the per-feature log-strengths around their mean, that
#: sets the default shrinkage ρ = 1/(n_val τ²) (see
#: :func:`bilevel.learning.hpo.default_shrinkage`).
DEFAULT_PRIOR_STD = 0.5

#: SID with adaptive accuracy: at most this many iterations per stage and upper step.
SID_MAX_INNER = 200

#: Training-set size from which ``bilevel hpo`` uses SID by default (the size rule of
#: :func:`bilevel.learning.hpo.default_method`, measured in docs/benchmarks_hpo.md).
SID_MIN_TRAIN = 100_000
DEFAULT_METHOD_RULE = f"sid from {SID_MIN_TRAIN} training samples on, else aid-cg"


@dataclass
class HpoConfig:
    """``bilevel hpo``: learn per-feature regularisation strengths (or per-sample weights)."""

    JOB: ClassVar[str] = "hpo"
    EXAMPLES: ClassVar[tuple[str, ...]] = (
        "bilevel hpo --data breast_cancer",
        "bilevel hpo --data digits --method aid-cg --time 30 --json",
        "bilevel hpo --data diabetes --model ridge",
        "bilevel hpo --data synthetic:200000:100 --method sid --time 60",
        "bilevel hpo --data measurements.csv --label-column class",
        "bilevel hpo --data breast_cancer --print-config > run.toml",
        "bilevel hpo --config run.toml --steps 400",
        "bilevel hpo --run-dir runs/my-run --resume --steps 400",
    )

    data: str = option(
        "breast_cancer",
        "breast_cancer | digits | iris | wine | diabetes | mnist | synthetic[:N[:D]] | path to "
        "a .csv/.tsv file (one sample per row) or an svmlight file",
    )
    data_dir: str | None = option(None, "folder with the MNIST idx files", default_text="none")
    label_column: str = option(
        "-1",
        "CSV/TSV files: the label column, an index (negative from the end) or a header name",
        default_text="-1, the last column",
    )
    svmlight_indexing: str = option(
        "auto",
        "svmlight files: feature indices zero- or one-based (auto, as scikit-learn: "
        "zero-based when index 0 occurs, else one-based)",
        choices=("auto", "zero", "one"),
    )
    model: str | None = option(
        None,
        "logistic (per-feature strengths), ridge (per-feature strengths, regression), "
        "hypercleaning (per-sample weights)",
        choices=MODELS,
        default_text="ridge for diabetes, else logistic",
    )
    label_noise: float = option(0.3, "hypercleaning: fraction of training labels corrupted")
    init: str = option(
        "baseline",
        "initial θ: 'baseline' (the best common value of the grid search) or a number "
        "(log-strength, or weight logit for hypercleaning)",
    )
    shrinkage: float | None = option(
        None,
        "logistic, ridge: add (ρ/2)‖θ − mean θ‖² to the validation loss, pulling the "
        "per-feature strengths towards a common value (0: none)",
        metavar="RHO",
        default_text=f"1/(n_val τ²) with τ = {DEFAULT_PRIOR_STD:g}, a Gaussian prior on the "
        "log-strengths",
    )
    theta_range: str | None = option(
        None,
        "box for θ",
        metavar="LO,HI",
        default_text="-10,1; ridge -10,3; hypercleaning -6,6",
    )
    method: str | None = option(
        None,
        "hypergradient: aid-cg (full-batch L-BFGS + CG), sid (stochastic implicit "
        "differentiation on minibatches), itd (unrolled gradient steps)",
        choices=METHODS,
        default_text=DEFAULT_METHOD_RULE,
    )
    cv: int | None = option(
        None,
        "learn θ on the K-fold cross-validation loss over the training and validation rows (K "
        "lower-level problems per step; aid-cg or itd) instead of the validation loss",
        metavar="K",
        default_text="none",
    )
    step: str = option(DEFAULT_STEP, "Adam step schedule on θ, e.g. 0.05 or poly:0.1,0.5")
    inner_steps: int | None = option(
        None,
        "sid: fixed t = k iterations per step; itd: unrolled steps; aid-cg: iteration cap of "
        "L-BFGS and CG",
        default_text=f"sid: adaptive, each stage until its estimated residual meets the "
        f"step's tolerance, at most {SID_MAX_INNER}; itd: 20; aid-cg: 200",
    )
    batch_size: int | None = option(None, "sid: minibatch size", default_text="12√N ≤ 4096")
    sid_solver: str = option(
        "precond",
        "sid: stage solvers, precond (Jacobi-preconditioned variance-reduced steps from the "
        "measured curvature, and CG refinement on minibatches for the adjoint), svrg "
        "(variance-reduced lower steps of 0.5/L, plain adjoint steps) or sgd",
        choices=SID_SOLVERS,
    )
    budget: float | None = option(None, "budget: oracle calls", default_text="none", resumable=True)
    time: float | None = option(
        None, "budget: seconds of computation", default_text="none", resumable=True
    )
    steps: int | None = option(
        None,
        "budget: upper-level steps (the first limit reached ends the run)",
        default_text="100 if no other limit",
        resumable=True,
    )
    seed: int = option(0, "data split, label noise, sampling")
    run_dir: str | None = option(
        None, "run directory", default_text="runs/hpo-<time>-<data>-<method>", resumable=True
    )
    checkpoint_every: int = option(
        50, "steps between checkpoints (one is also written at the end)", resumable=True
    )
    eval_every: int | None = option(
        None,
        "steps between evaluations of F(θ) and test metrics",
        default_text="about 25 per run; with --time, as often as keeps evaluations under a "
        "fifth of the wall time",
        resumable=True,
    )
    device: str = option("cpu", "cpu, cuda, cuda:1, ...")
    progress: bool = option(True, "show progress", resumable=True)
    plots: bool = option(True, "write plots and report.html", resumable=True)

    @property
    def job(self) -> str:
        return self.JOB
