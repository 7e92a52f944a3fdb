"""bilevel: bilevel learning with inexact and stochastic hypergradients.

The flat namespace holds what users call; submodules hold the rest:
``bilevel.imaging`` (operators, regularisers, data, metrics), ``bilevel.learning``
(hyperparameter-learning models and data), ``bilevel.methods`` (ISGD, MAID, ...),
``bilevel.runs`` (run directories, checkpoints, progress, plots).
"""

from bilevel.argmin import ArgminInfo, ArgminLayer, argmin
from bilevel.autodiff import Cost
from bilevel.bounds import BoundConstants
from bilevel.hypergrad import (
    Estimator,
    Exact,
    Hypergradient,
    Implicit,
    JacobianFree,
    Unrolled,
    hypergradient,
)
from bilevel.linear import CG, MINRES, FixedPoint, LinearSolution, Neumann
from bilevel.lower import FISTA, LBFGS, GradientDescent, LowerSolution, Nesterov
from bilevel.methods import (
    HOAG,
    ISGD,
    MAID,
    Budget,
    RunResult,
    TensorSamples,
    fixed_iterations,
    with_initial,
)
from bilevel.problem import (
    BilevelError,
    BilevelProblem,
    NonFiniteError,
    NotStronglyConvexError,
)
from bilevel.stochastic import (
    SID,
    StochasticFixedPoint,
    StochasticLinearFixedPoint,
    VarianceReducedFixedPoint,
)

__all__ = [
    "ArgminInfo",
    "ArgminLayer",
    "argmin",
    "CG",
    "HOAG",
    "ISGD",
    "MAID",
    "Budget",
    "RunResult",
    "SID",
    "StochasticFixedPoint",
    "StochasticLinearFixedPoint",
    "VarianceReducedFixedPoint",
    "TensorSamples",
    "fixed_iterations",
    "with_initial",
    "FISTA",
    "LBFGS",
    "MINRES",
    "BilevelError",
    "BilevelProblem",
    "BoundConstants",
    "Cost",
    "Estimator",
    "Exact",
    "FixedPoint",
    "GradientDescent",
    "Hypergradient",
    "Implicit",
    "JacobianFree",
    "LinearSolution",
    "LowerSolution",
    "Nesterov",
    "Neumann",
    "NonFiniteError",
    "NotStronglyConvexError",
    "Unrolled",
    "hypergradient",
]
__version__ = "0.1.0"
