"""ISGD: inexact stochastic gradient descent on the upper level ([ISGD], docs/concepts.md).

At step k, with S_k the next minibatch of a random permutation of the n samples (reshuffled
every epoch, drawn from the method's own seeded ``torch.Generator``):

    z_k = (1/|S_k|) Σ_{i∈S_k} z_i(θ_k; ε_k, δ_k),      θ_{k+1} = P(θ_k − α_k z_k)

where z_i is the inexact hypergradient of sample i: its lower level solved until
‖∇ₓh_i(x̃_i)‖ ≤ ε_k and its adjoint until ‖H_i q̃_i − ∇ₓf_i‖ ≤ δ_k (absolute tolerances, per
sample, independent of the batch size), warm-started from the sample's last x̃_i and q̃_i.
All samples of a minibatch are solved in one batched estimator call. The step is taken by a
``torch.optim`` optimiser whose learning rate is set to α_k at every step: ``"sgd"`` gives
plain ISGD, ``"adam"``, ``"rmsprop"`` or ``"adagrad"`` the preconditioned variants (fed the
inexact hypergradient). P is an optional projection.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from bilevel import distributed
from bilevel.hypergrad import EstimatorState, Hypergradient, HypergradientEstimator, Implicit
from bilevel.methods.budget import Budget
from bilevel.methods.engine import Engine, Method
from bilevel.methods.optim import (
    OptimizerFactory,
    Projection,
    all_finite,
    apply_projection,
    check_optimizer_spec,
    make_optimizer,
)
from bilevel.methods.samples import SampleSet
from bilevel.problem import BilevelError, BilevelProblem, NonFiniteError
from bilevel.schedules import Accuracy, Constant, ScheduleLike, as_accuracy, as_schedule

__all__ = ["ISGD", "fixed_iterations"]


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BilevelError(f"{name} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True, kw_only=True)
class ISGD(Method):
    """Inexact stochastic gradient descent, optionally preconditioned.

    Attributes:
        step: step-size schedule α_k (a Schedule, a number, a string such as
            ``"poly:1e-2,0.5"``, a config dict or a callable k -> float).
        accuracy: tolerances (ε_k, δ_k): an :class:`~bilevel.schedules.Accuracy`, a
            ``(lower, adjoint)`` pair, or one schedule-like value for both. ε_k bounds the
            lower-level gradient norm ‖∇ₓh_i(x̃_i)‖ (so ‖x̃_i − x̂_i‖ ≤ ε_k/μ), δ_k the adjoint
            residual ‖H_i q̃_i − ∇ₓf_i(x̃_i)‖.
        batch_size: samples per step (1 ≤ batch_size ≤ n).
        optimizer: ``"sgd"``, ``"adam"``, ``"adamw"``, ``"rmsprop"``, ``"adagrad"``, or a
            factory ``callable(params) -> torch.optim.Optimizer``. Its ``lr`` is overwritten
            with α_k at every step.
        optimizer_options: keyword arguments for a named optimiser (e.g. ``momentum``,
            ``betas``); not ``lr``.
        estimator: the hypergradient estimator (default ``Implicit(CG())``).
        projection: optional P applied after each step (see :data:`~.optim.Projection`).
        seed: seed of the sampler's generator.
        warm_start: warm-start each sample's lower solve and adjoint from its last solution
            (else from ``samples.initial`` and zero).
        drop_last: skip the last, incomplete minibatch of each epoch.
    """

    step: ScheduleLike = "poly:1e-2,0.5"
    accuracy: Accuracy | ScheduleLike | tuple[ScheduleLike, ScheduleLike] = "poly:1e-1,0.25"
    batch_size: int = 16
    optimizer: str | OptimizerFactory = "sgd"
    optimizer_options: Mapping[str, Any] = field(default_factory=dict, hash=False)
    estimator: HypergradientEstimator = field(default_factory=Implicit)
    projection: Projection | None = None
    seed: int = 0
    warm_start: bool = True
    drop_last: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "step", as_schedule(self.step))
        object.__setattr__(self, "accuracy", as_accuracy(self.accuracy))
        _positive_int("batch_size", self.batch_size)
        check_optimizer_spec(self.optimizer)
        if not isinstance(self.optimizer_options, Mapping):
            raise BilevelError("optimizer_options must be a dict of keyword arguments")
        object.__setattr__(self, "optimizer_options", dict(self.optimizer_options))
        if not isinstance(self.estimator, HypergradientEstimator):
            raise BilevelError(
                f"estimator must be a HypergradientEstimator, got {self.estimator!r}"
            )
        if self.projection is not None and not callable(self.projection):
            raise BilevelError("projection must be a callable theta -> None or projected θ")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise BilevelError(f"seed must be an integer, got {self.seed!r}")

    def engine(
        self,
        problem: BilevelProblem,
        samples: SampleSet,
        budget: Budget,
        estimator_state: EstimatorState | None = None,
    ) -> Engine:
        return _ISGDEngine(self, problem, samples, estimator_state)


@dataclass
class _Pending:
    index: Tensor
    hg: Hypergradient
    eps: float
    delta: float
    alpha: float
    local: Tensor  # the instances of ``index`` solved by this process
    distance: float


class _ISGDEngine(Engine):
    name = "isgd"

    def __init__(
        self,
        cfg: ISGD,
        problem: BilevelProblem,
        samples: SampleSet,
        estimator_state: EstimatorState | None = None,
    ) -> None:
        super().__init__(problem)
        self.cfg = cfg
        self.samples = samples
        self.n = n = len(samples)
        if cfg.batch_size > n:
            raise BilevelError(f"batch_size {cfg.batch_size} exceeds the number of samples {n}")
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.perm = torch.randperm(n, generator=self.gen)
        self.pos = 0
        self.x_warm = samples.initial(torch.arange(n)).detach().clone()
        if self.x_warm.dim() < 1 or self.x_warm.shape[0] != n:
            raise BilevelError(
                f"samples.initial(arange(n)) must have leading dimension n = {n}, got shape "
                f"{tuple(self.x_warm.shape)}"
            )
        self.adjoint: Tensor | None = None
        self.optimizer = make_optimizer(
            cfg.optimizer, self.params, cfg.step(0), cfg.optimizer_options
        )
        # what the estimator evolves across steps (SID: streams, anchors, accuracy scale)
        if estimator_state is None:
            estimator_state = cfg.estimator.init_state()
        self.estimator_state = estimator_state
        # data parallelism (bilevel.distributed): SID shards its finite sum's rows itself;
        # other estimators get this process's instances of each minibatch
        self.shard = distributed.current()
        self.shards_rows = cfg.estimator.shards_rows
        if self.shard is not None and self.shards_rows:
            self.estimator_state.assign(self.shard.rank, self.shard.world)

    @property
    def generators(self) -> dict[str, torch.Generator]:
        # the estimator's own streams (SID's minibatches) are checkpointed with the sampler's
        gens = {"sampler": self.gen}
        for name, gen in self.estimator_state.generators().items():
            gens[f"estimator_{name}"] = gen
        return gens

    def new_rank_streams(self) -> None:
        if self.shard is not None and self.shards_rows:
            self.estimator_state.assign(self.shard.rank, self.shard.world, force=True)

    def compute(self) -> _Pending:
        cfg = self.cfg
        k = self.step
        index = self.perm[self.pos : self.pos + cfg.batch_size]
        shard = None if self.shards_rows else self.shard
        local = index if shard is None else shard.owned(index)
        eps, delta = cfg.accuracy(k)
        alpha = cfg.step(k)
        hg, error = None, None
        try:
            if local.numel():
                hg = self._estimate(local, eps, delta)
        except BilevelError as exc:  # NonFiniteError included
            if shard is None:
                raise
            error = exc
        if shard is None:
            distance = float(hg.eps.max())
        else:  # every rank gets the minibatch's hypergradient
            hg, distance = distributed.reduce_hypergradient(
                hg, local.numel(), self.params, shard, error
            )
        if not math.isfinite(hg.loss):
            raise NonFiniteError(f"the upper-level loss is {hg.loss}")
        return _Pending(index, hg, eps, delta, alpha, local, distance)

    def _estimate(self, index: Tensor, eps: float, delta: float) -> Hypergradient:
        cfg = self.cfg
        batch = self.samples.batch(index)
        if cfg.warm_start:
            x0 = self.x_warm[index.to(self.x_warm.device)]
            a0 = None if self.adjoint is None else self.adjoint[index.to(self.adjoint.device)]
        else:
            x0, a0 = self.samples.initial(index), None
        tols = {"lower_tol": eps, "adjoint_tol": delta}
        if not cfg.estimator.uses_tolerances:
            tols = {}  # accuracy set by the estimator's iteration counts (Unrolled, SID)
        return cfg.estimator(
            self.problem, batch, x0, adjoint0=a0, state=self.estimator_state, **tols
        )

    def commit(self, p: _Pending) -> dict[str, Any]:
        cfg, hg = self.cfg, p.hg
        opt = self.optimizer
        opt.zero_grad(set_to_none=True)
        for param, g in zip(self.params, hg.grad):
            param.grad = g.detach().to(dtype=param.dtype)
        for group in opt.param_groups:
            group["lr"] = p.alpha
        opt.step()
        apply_projection(self.problem, cfg.projection)
        if not all_finite(self.params):
            raise NonFiniteError(
                f"θ became non-finite after the optimiser step (α = {p.alpha:g}, "
                f"‖z‖ = {hg.norm:.3e}): the step size is too large"
            )
        if cfg.warm_start and p.local.numel():
            where = p.local.to(self.x_warm.device)
            self.x_warm[where] = hg.x.detach().to(self.x_warm.dtype)
            if hg.adjoint is not None:
                if self.adjoint is None:
                    self.adjoint = torch.zeros_like(self.x_warm)
                self.adjoint[where] = hg.adjoint.detach().to(self.adjoint.dtype)
        self.cost += hg.cost.oracle_calls
        record = self.step_record(hg, p.eps, p.delta, p.alpha, p.distance)
        record.update(hg.metrics)  # estimator reports (SID: t, k, ...)
        self.step += 1
        self.pos += p.index.numel()
        b = cfg.batch_size
        if self.pos >= self.n or (cfg.drop_last and self.pos + b > self.n):
            self.epoch += 1
            self.perm = torch.randperm(self.n, generator=self.gen)
            self.pos = 0
        return record

    def state_dict(self) -> dict[str, Any]:
        x_warm, adjoint = self.x_warm.clone(), None if self.adjoint is None else self.adjoint
        shard = None if self.shards_rows else self.shard
        if shard is not None:  # each row from the process that owns its sample
            x_warm = shard.merge_rows(x_warm)
            if shard.extreme(float(adjoint is not None), largest=True):
                adjoint = shard.merge_rows(torch.zeros_like(x_warm) if adjoint is None else adjoint)
        return {
            **self.base_state(),
            "optimizer": self.optimizer.state_dict(),
            "x_warm": x_warm,
            "adjoint": None if adjoint is None else adjoint.clone(),
            "perm": self.perm.clone(),
            "pos": self.pos,
            # the estimator's state besides its streams (SID: anchors, accuracy scale)
            "estimator_state": self.estimator_state.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        x_warm = state["x_warm"]
        if x_warm.shape != self.x_warm.shape:
            raise BilevelError(
                f"the checkpoint's warm starts have shape {tuple(x_warm.shape)}, expected "
                f"{tuple(self.x_warm.shape)}: not the same samples"
            )
        self.load_base_state(state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.x_warm = x_warm.to(device=self.x_warm.device, dtype=self.x_warm.dtype)
        adjoint = state["adjoint"]
        self.adjoint = None if adjoint is None else adjoint.to(self.x_warm)
        self.perm = state["perm"].clone()
        self.estimator_state.load_state_dict(state["estimator_state"])
        self.pos = int(state["pos"])


#: Tolerance used by :func:`fixed_iterations`: below any attainable gradient norm, yet a normal
#: number in float32, so that the iteration caps decide when the solvers stop.
NO_TOLERANCE = 1e-30


def fixed_iterations(
    iterations: int,
    *,
    adjoint_iterations: int | None = None,
    estimator: HypergradientEstimator | None = None,
    **options: Any,
) -> ISGD:
    """The stochastic baseline with a fixed effort per step: ``iterations`` lower-level
    iterations (warm-started) and ``adjoint_iterations`` (default: the same) iterations of the
    adjoint solver, whatever accuracy they reach.

    The estimator (default ``Implicit(CG())``) is replaced by its
    :meth:`~bilevel.hypergrad.HypergradientEstimator.fixed_work` (iteration caps that do not
    warn when hit; ``Unrolled``: ``iterations`` steps), called with tolerances of
    :data:`NO_TOLERANCE`. ``options`` are the other :class:`ISGD` fields (``step``,
    ``batch_size``, ``optimizer``, ...). The logged ``eps`` and ``delta`` are that nominal
    tolerance; ``distance`` shows the accuracy actually certified.
    """
    iterations = _positive_int("iterations", iterations)
    adjoint_iterations = _positive_int(
        "adjoint_iterations", iterations if adjoint_iterations is None else adjoint_iterations
    )
    if "accuracy" in options:
        raise BilevelError("fixed_iterations sets the accuracy itself; do not pass accuracy")
    est = Implicit() if estimator is None else estimator
    if not isinstance(est, HypergradientEstimator):
        raise BilevelError(f"estimator must be a HypergradientEstimator, got {est!r}")
    est = est.fixed_work(iterations, adjoint_iterations)
    return ISGD(accuracy=Constant(NO_TOLERANCE), estimator=est, **options)
