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

Modules: ``samples`` (the sample protocol), ``budget``, ``optim`` (optimisers, projections,
θ snapshots), ``results`` (``RunResult`` and the run directory's configuration record),
``interrupts`` (SIGINT/SIGTERM), ``engine`` (``Method.run``, the one run signature, and the
run loop ``drive``), ``isgd``, ``maid``, ``testing``.
"""

from bilevel.methods.budget import Budget
from bilevel.methods.engine import Evaluation, Method, ranked_by
from bilevel.methods.isgd import ISGD, fixed_iterations
from bilevel.methods.maid import HOAG, MAID
from bilevel.methods.optim import OPTIMIZERS, OptimizerFactory, Projection, make_optimizer
from bilevel.methods.results import STATUSES, RunResult
from bilevel.methods.samples import SampleSet, TensorSamples, as_sample_set, with_initial

__all__ = [
    "HOAG",
    "ISGD",
    "MAID",
    "Method",
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
    "ranked_by",
    "with_initial",
]
