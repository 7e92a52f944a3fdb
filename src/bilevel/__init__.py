"""bilevel: bilevel learning with inexact and stochastic hypergradients.

The flat namespace holds what users call; submodules hold the rest:
``bilevel.imaging`` (operators, regularisers, data, metrics), ``bilevel.learning``
(hyperparameter-learning models and data), ``bilevel.methods`` (ISGD, MAID, ...),
``bilevel.runs`` (run directories, checkpoints, progress, plots).

The names are loaded on first use (``from bilevel import ISGD`` works as usual), so that the
command line, which needs none of them to parse its options, starts without importing torch.
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

from bilevel._lazy import lazy_exports

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("ArgminInfo", "ArgminLayer", "argmin"), "bilevel.argmin"),
    "Cost": "bilevel.autodiff",
    "BoundConstants": "bilevel.bounds",
    **dict.fromkeys(
        (
            "AdjointEstimator",
            "EstimatorState",
            "Exact",
            "Hypergradient",
            "HypergradientEstimator",
            "Implicit",
            "JacobianFree",
            "Unrolled",
            "hypergradient",
        ),
        "bilevel.hypergrad",
    ),
    **dict.fromkeys(("CG", "MINRES", "FixedPoint", "LinearSolution", "Neumann"), "bilevel.linear"),
    **dict.fromkeys(
        ("FISTA", "LBFGS", "GradientDescent", "LowerSolution", "Nesterov"), "bilevel.lower"
    ),
    **dict.fromkeys(
        (
            "HOAG",
            "ISGD",
            "MAID",
            "Budget",
            "RunResult",
            "TensorSamples",
            "fixed_iterations",
            "with_initial",
        ),
        "bilevel.methods",
    ),
    **dict.fromkeys(
        (
            "BilevelError",
            "BilevelProblem",
            "FiniteSum",
            "NonFiniteError",
            "NotStronglyConvexError",
        ),
        "bilevel.problem",
    ),
    **dict.fromkeys(
        (
            "SID",
            "SIDState",
            "StochasticFixedPoint",
            "StochasticLinearFixedPoint",
            "VarianceReducedFixedPoint",
            "finite_sum_problem",
        ),
        "bilevel.stochastic",
    ),
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


class _Package(types.ModuleType):
    """The package module: importing the submodule ``bilevel.argmin`` must not replace the
    function ``bilevel.argmin`` (Python sets a package attribute for each loaded submodule)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # for type checkers and IDEs: the eager imports
    from bilevel.argmin import ArgminInfo, ArgminLayer, argmin  # noqa: F401
    from bilevel.autodiff import Cost  # noqa: F401
    from bilevel.bounds import BoundConstants  # noqa: F401
    from bilevel.hypergrad import (  # noqa: F401
        AdjointEstimator,
        EstimatorState,
        Exact,
        Hypergradient,
        HypergradientEstimator,
        Implicit,
        JacobianFree,
        Unrolled,
        hypergradient,
    )
    from bilevel.linear import CG, MINRES, FixedPoint, LinearSolution, Neumann  # noqa: F401
    from bilevel.lower import (  # noqa: F401
        FISTA,
        LBFGS,
        GradientDescent,
        LowerSolution,
        Nesterov,
    )
    from bilevel.methods import (  # noqa: F401
        HOAG,
        ISGD,
        MAID,
        Budget,
        RunResult,
        TensorSamples,
        fixed_iterations,
        with_initial,
    )
    from bilevel.problem import (  # noqa: F401
        BilevelError,
        BilevelProblem,
        FiniteSum,
        NonFiniteError,
        NotStronglyConvexError,
    )
    from bilevel.stochastic import (  # noqa: F401
        SID,
        SIDState,
        StochasticFixedPoint,
        StochasticLinearFixedPoint,
        VarianceReducedFixedPoint,
        finite_sum_problem,
    )
