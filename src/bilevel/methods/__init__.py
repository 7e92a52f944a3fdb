"""Upper-level methods: ISGD (plain and preconditioned), MAID, and baselines.

Each method is a small immutable configuration object whose ``run(problem, samples, budget,
...)`` trains ``problem.theta`` in place and returns a :class:`RunResult`:

* :class:`ISGD`: minibatch inexact stochastic gradient descent with step and accuracy
  schedules, any ``torch.optim`` optimiser (SGD, Adam, ...), projections.
* :func:`fixed_iterations`: the stochastic baseline with a fixed number of lower-level and
  adjoint iterations per step.
* :class:`MAID`: full-batch inexact descent with adaptive accuracy and an inexact
  backtracking line search; :class:`HOAG`: the same line search with a fixed accuracy
  schedule.

Training data reach a method through the :class:`SampleSet` protocol (``len``, ``batch``,
``initial``); :class:`TensorSamples` and :func:`with_initial` build one.
"""

from bilevel.methods.common import (
    OPTIMIZERS,
    STATUSES,
    Budget,
    Evaluation,
    OptimizerFactory,
    Projection,
    RunResult,
    SampleSet,
    TensorSamples,
    as_sample_set,
    make_optimizer,
    with_initial,
)
from bilevel.methods.isgd import ISGD, fixed_iterations
from bilevel.methods.maid import HOAG, MAID

__all__ = [
    "HOAG",
    "ISGD",
    "MAID",
    "OPTIMIZERS",
    "STATUSES",
    "Budget",
    "Evaluation",
    "OptimizerFactory",
    "Projection",
    "RunResult",
    "SampleSet",
    "TensorSamples",
    "as_sample_set",
    "fixed_iterations",
    "make_optimizer",
    "with_initial",
]
