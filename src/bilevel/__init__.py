"""bilevel: bilevel learning with inexact and stochastic hypergradients."""

from bilevel.problem import (
    BilevelError,
    BilevelProblem,
    NonFiniteError,
    NotStronglyConvexError,
)

__all__ = [
    "BilevelError",
    "BilevelProblem",
    "NonFiniteError",
    "NotStronglyConvexError",
]
__version__ = "0.1.0"
