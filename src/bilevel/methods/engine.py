"""The run loop shared by every upper-level method: :class:`Method` (one ``run`` signature),
:class:`Engine` (one running method) and :func:`drive` (run directory, metrics, checkpoints,
interrupt/resume, progress, plots).

Run loop
--------
Every method is a small immutable configuration object whose ``run`` drives an engine one
upper-level step at a time. A step is split into a *compute* phase, which changes no
persistent state (θ is restored if it was moved for a trial), and a short *commit* phase that
updates θ, the optimiser, the warm starts and the counters and logs the step's record. SIGINT
and SIGTERM (what schedulers and ``timeout`` send) are deferred during the commit
(:mod:`bilevel.methods.interrupts`), so the state is consistent whenever a KeyboardInterrupt or
SIGTERM arrives: the run then writes a checkpoint of the state at the last step boundary and
returns with status ``"interrupted"``. Resuming from any checkpoint (periodic, final or
interrupt) restores θ, the optimiser state, the warm-start tensors, the sampler and every
random number generator, so that on CPU the resumed run reproduces the uninterrupted run bit
for bit.

Best θ
------
An ``evaluate`` callback marked by :func:`ranked_by` (e.g. ``ranked_by(evaluate, "val_loss",
"min")``) ranks the evaluated iterates: the run keeps the θ with the best value of that metric
(periodic and final evaluations), checkpoints it, and returns it as ``RunResult.best_theta``
beside the last θ, with ``RunResult.best`` = {metric, mode, step, value}.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from bilevel import distributed
from bilevel.hypergrad import EstimatorState
from bilevel.methods.budget import Budget, as_budget
from bilevel.methods.interrupts import Terminated, deferred_interrupts, terminate_as_interrupt
from bilevel.methods.optim import load_params, snapshot
from bilevel.methods.results import RunResult, describe, method_config, problem_description
from bilevel.methods.samples import SampleSet, as_sample_set, check_sample_dtypes
from bilevel.problem import BilevelError, BilevelProblem, NonFiniteError, Theta
from bilevel.runs import (
    METRIC_KEYS,
    Progress,
    RunDirectory,
    Stopwatch,
    plot_metrics,
    rng_state,
    set_rng_state,
    to_jsonable,
    write_json,
)
from bilevel.runs.rundir import RESULT_NAME, fault_point

if TYPE_CHECKING:
    from bilevel.hypergrad import EstimatorState, Hypergradient

__all__ = ["Engine", "Evaluation", "Method", "RunOptions", "Stop", "drive", "ranked_by"]

#: ``evaluate(theta, step) -> {name: value}``: user metrics (e.g. test PSNR) at θ_k, logged
#: with the record of step k. Its time is not counted in ``wall_time``.
Evaluation = Callable[[Theta, int], Mapping[str, Any]]


class _Ranked:
    """An evaluation callback with the metric that ranks its evaluations (see ranked_by)."""

    def __init__(self, evaluate: Evaluation, metric: str, mode: str) -> None:
        self.evaluate = evaluate
        self.ranked_by = (metric, mode)
        self.__qualname__ = f"ranked_by({describe(evaluate)}, {metric!r}, {mode!r})"

    def __call__(self, theta: Theta, step: int) -> Mapping[str, Any]:
        return self.evaluate(theta, step)


def ranked_by(evaluate: Evaluation, metric: str, mode: str = "min") -> Evaluation:
    """``evaluate`` marked with the metric that ranks its evaluations: ``mode`` "min" (e.g. a
    validation loss) or "max" (e.g. PSNR). A run keeps the θ with the best finite value of
    ``metric`` and returns it as ``RunResult.best_theta`` (see the module docstring)."""
    if not callable(evaluate):
        raise BilevelError("evaluate must be a callable (theta, step) -> dict of metrics")
    if not isinstance(metric, str) or not metric:
        raise BilevelError(f"the ranking metric must be a name, got {metric!r}")
    if mode not in ("min", "max"):
        raise BilevelError(f"mode must be 'min' or 'max', got {mode!r}")
    return _Ranked(evaluate, metric, mode)


class Stop(Exception):  # noqa: N818 (control flow, not an error)
    """Raised by an engine to end the run with a status other than "budget"."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Engine:
    """One running method: counters, persistent state, and one step as compute + commit."""

    name = "method"

    def __init__(self, problem: BilevelProblem) -> None:
        self.problem = problem
        self.params = problem.params
        self.step = 0
        self.epoch = 0
        self.cost = 0
        #: seconds counted against the wall-time budget so far, set by the run loop (for
        #: methods that check the budget within a step)
        self.seconds: Callable[[], float] | None = None

    @property
    def generators(self) -> dict[str, torch.Generator]:
        """Explicit generators whose state is checkpointed with the global ones."""
        return {}

    def check_finished(self) -> None:
        """Raise :class:`Stop` if the method has finished on its own (e.g. converged)."""

    def new_rank_streams(self) -> None:
        """Data parallel, resumed on more processes than wrote the checkpoint: derive this
        process's own random streams (those not shared by all ranks) afresh."""

    def compute(self) -> Any:
        """Everything of a step that changes no persistent state; returns what commit needs."""
        raise NotImplementedError

    def commit(self, pending: Any) -> dict[str, Any]:
        """Apply the step; return its record (without wall_time and user metrics)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def base_state(self) -> dict[str, Any]:
        return {
            "theta": snapshot(self.params),
            "step": self.step,
            "epoch": self.epoch,
            "cost": self.cost,
        }

    def load_base_state(self, state: Mapping[str, Any]) -> None:
        load_params(self.params, list(state["theta"]))
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.cost = state["cost"]  # fractional for minibatch estimators (b/N per call)

    def step_record(
        self, hg: Hypergradient, eps: float, delta: float, alpha: float, distance: float
    ) -> dict[str, Any]:
        """The standard record of the step being committed (after ``cost`` is updated):
        θ_k's loss, tolerances (ε_k, δ_k), step α_k, bound ω, cumulative cost, ‖z_k‖ and the
        certified distance max_i ‖x̃_i − x̂_i‖."""
        return {
            "step": self.step,
            "epoch": self.epoch,
            "upper_loss": hg.loss,
            "eps": eps,
            "delta": delta,
            "alpha": alpha,
            "bound": hg.bound,
            "cost": self.cost,
            "grad_norm": hg.norm,
            "distance": distance,
        }


#: Keys of the run configuration that may change when a run is resumed.
RESUMABLE_KEYS = (
    "run.budget",
    "run.checkpoint_every",
    "run.evaluate",
    "run.progress",
    "run.plot",
)


@dataclass(frozen=True)
class RunOptions:
    """Options of one call to ``run`` shared by every method (see :meth:`Method.run`)."""

    budget: Budget
    run_dir: str | Path | None = None
    resume: bool = False
    overwrite: bool = False
    evaluate: Evaluation | None = None
    eval_every: int = 1
    checkpoint_every: int = 50
    progress: bool = False
    plot: bool = False
    keep_history: bool = False

    def __post_init__(self) -> None:
        for name in ("eval_every", "checkpoint_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise BilevelError(f"{name} must be a positive integer, got {v!r}")
        if self.evaluate is not None and not callable(self.evaluate):
            raise BilevelError("evaluate must be a callable (theta, step) -> dict of metrics")
        if self.resume and self.run_dir is None:
            raise BilevelError("resume=True needs a run_dir")

    def describe(self) -> dict[str, Any]:
        return {
            "budget": to_jsonable(self.budget),
            "eval_every": self.eval_every,
            "evaluate": None if self.evaluate is None else describe(self.evaluate),
            "checkpoint_every": self.checkpoint_every,
            "progress": self.progress,
            "plot": self.plot,
        }


def _user_metrics(values: Any, step: int) -> dict[str, Any]:
    if values is None:
        return {}
    if not isinstance(values, Mapping):
        raise BilevelError(
            f"evaluate must return a dict of metrics, got {type(values).__name__} at step {step}"
        )
    out = {}
    for k, v in values.items():
        if not isinstance(k, str):
            raise BilevelError(f"evaluation metric names must be strings, got {k!r}")
        if k in METRIC_KEYS or k in _ENGINE_KEYS:
            raise BilevelError(f"evaluation metric {k!r} clashes with a standard metric name")
        if isinstance(v, Tensor) and v.numel() == 1:
            v = v.item()
        out[k] = v
    return out


#: Extra keys engines log besides METRIC_KEYS.
_ENGINE_KEYS = ("grad_norm", "distance", "accepted", "backtracks", "certified", "budget_stop")


class _Best:
    """The best evaluated θ by a ranking metric (see :func:`ranked_by`)."""

    def __init__(self, evaluate: Evaluation | None) -> None:
        ranking = getattr(evaluate, "ranked_by", None)
        self.metric, self.mode = ranking if ranking is not None else (None, "min")
        self.theta: list[Tensor] | None = None
        self.step: int | None = None
        self.value: float | None = None

    def consider(self, metrics: Mapping[str, Any], step: int, params: list[Tensor]) -> None:
        if self.metric is None or self.metric not in metrics:
            return
        try:
            value = float(metrics[self.metric])
        except (TypeError, ValueError):
            return
        if not math.isfinite(value):
            return
        better = (
            self.value is None
            or (self.mode == "min" and value < self.value)
            or (self.mode == "max" and value > self.value)
        )
        if better:
            self.theta, self.step, self.value = snapshot(params), step, value

    def info(self) -> dict[str, Any] | None:
        if self.theta is None:
            return None
        return {"metric": self.metric, "mode": self.mode, "step": self.step, "value": self.value}

    def state_dict(self) -> dict[str, Any] | None:
        info = self.info()
        return None if info is None else {**info, "theta": self.theta}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        if state is None or state.get("metric") != self.metric:
            return
        self.theta = list(state["theta"])
        self.step, self.value = int(state["step"]), float(state["value"])


def drive(
    engine: Engine, options: RunOptions, config: Mapping[str, Any], samples_count: int
) -> RunResult:
    """Run ``engine`` under ``options``: the loop shared by every method."""
    check_sample_dtypes(engine.problem, getattr(engine, "samples", None))
    run = None
    if options.run_dir is not None:  # data parallel: rank 0 alone writes the run's files
        run = distributed.on_writer(
            lambda: RunDirectory(
                options.run_dir, resume=options.resume, overwrite=options.overwrite
            )
        )
    try:
        return _drive(engine, options, config, samples_count, run)
    finally:
        if run is not None:
            run.close()


def _drive(
    engine: Engine,
    options: RunOptions,
    config: Mapping[str, Any],
    samples_count: int,
    run: RunDirectory | None,
) -> RunResult:
    opts = options
    problem = engine.problem
    shard = distributed.current()

    def start_run() -> dict[str, Any] | None:
        if run is None:
            return None
        full = {
            **config,
            "problem": problem_description(problem, samples_count),
            "run": opts.describe(),
        }
        run.write_config(full, ignore=RESUMABLE_KEYS)
        return run.load_checkpoint()

    gens = engine.generators
    best = _Best(opts.evaluate)
    elapsed0, eval_seconds = 0.0, 0.0
    state = distributed.on_writer(start_run)
    if shard is not None and opts.run_dir is not None:
        state = shard.broadcast_object(state)  # rank 0 read it
    if state is not None:
        engine.load_state_dict(state["engine"])
        rng, own = _rank_rng(state)
        set_rng_state(rng, gens)
        if not own:
            engine.new_rank_streams()
        elapsed0 = float(state["elapsed"])
        eval_seconds = float(state["eval_seconds"])
        best.load_state_dict(state.get("best"))
    if run is not None:
        write_json(run.path / RESULT_NAME, {"status": "running", "finished": False})
    clock = Stopwatch(elapsed0)
    engine.seconds = lambda: clock.elapsed() - eval_seconds
    records: list[dict[str, Any]] = []
    history = [snapshot(engine.params)] if opts.keep_history else None
    good: list[Tensor] | None = None  # θ at the last finite evaluation of this session
    boundary_rng: dict[str, Any] | None = None
    boundary_best: dict[str, Any] | None = None

    unit, total = opts.budget.progress()

    def done_units() -> float:
        return {
            "oracle_calls": engine.cost,
            "steps": engine.step,
            "epochs": engine.epoch,
            "wall_time": clock.elapsed() - eval_seconds,
        }[unit]

    def checkpoint(rng: dict[str, Any] | None = None, best_state: Any = "current") -> None:
        if opts.run_dir is None:
            return
        rng = rng if rng is not None else rng_state(gens)
        state = {
            "engine": engine.state_dict(),  # collective when data parallel: every rank's rows
            "rng": rng,
            "elapsed": clock.elapsed(),
            "eval_seconds": eval_seconds,
            "best": best.state_dict() if best_state == "current" else best_state,
        }
        if shard is not None:
            state["rank_rng"] = shard.gather_object(rng)
        if run is not None:
            run.save_checkpoint(state)

    bar = Progress(
        total,
        unit=unit.replace("_", " "),
        description=engine.name,
        initial=done_units(),
        enabled=opts.progress and distributed.is_writer(),
    )
    status, message = "budget", ""
    try:
        with terminate_as_interrupt():
            while True:
                reason = opts.budget.exhausted(
                    engine.step, engine.epoch, engine.cost, clock.elapsed() - eval_seconds
                )
                if shard is not None:  # rank 0's clock decides for every rank
                    stop = shard.agree(reason is not None)
                    if stop != (reason is not None):
                        reason = "rank 0 reached the budget" if stop else None
                if reason is not None:
                    message = reason
                    break
                engine.check_finished()
                boundary_rng = rng_state(gens)
                boundary_best = best.state_dict()
                k = engine.step
                extra: dict[str, Any] = {}
                if opts.evaluate is not None and k % opts.eval_every == 0:
                    start = time.perf_counter()
                    extra = _user_metrics(opts.evaluate(problem.theta, k), k)
                    eval_seconds += time.perf_counter() - start
                try:
                    pending = engine.compute()
                except NonFiniteError as exc:
                    restored = good is not None
                    if restored:
                        load_params(engine.params, good)
                        if history is not None and len(history) > 1:
                            history.pop()
                    raise Stop(
                        "non_finite",
                        f"step {k}: {exc}; stopped"
                        + (
                            " and restored θ of the previous step (the last with finite loss "
                            "and hypergradient)"
                            if restored
                            else ""
                        ),
                    ) from None
                good = snapshot(engine.params)
                with deferred_interrupts():
                    try:
                        record = engine.commit(pending)
                    except NonFiniteError as exc:
                        load_params(engine.params, good)
                        raise Stop(
                            "non_finite",
                            f"step {k}: {exc}; stopped and restored θ from before the step",
                        ) from None
                    best.consider(extra, k, good)  # the evaluation was of θ_k, before the step
                    wall = clock.elapsed() - eval_seconds
                    full_record = {key: record.get(key) for key in METRIC_KEYS}
                    full_record["wall_time"] = wall
                    full_record.update({k2: v for k2, v in record.items() if k2 not in METRIC_KEYS})
                    full_record.update(extra)
                    if run is not None:
                        run.log(full_record)
                    records.append(full_record)
                    boundary_rng = boundary_best = None
                    if history is not None:
                        history.append(snapshot(engine.params))
                fault_point("step")
                bar.update(
                    done_units(),
                    loss=full_record.get("upper_loss"),
                    cost=engine.cost,
                )
                if engine.step % opts.checkpoint_every == 0:
                    checkpoint()
    except Stop as stop:
        status, message = stop.status, stop.message
    except KeyboardInterrupt as interrupt:
        status = "interrupted"
        signal_name = "SIGTERM" if isinstance(interrupt, Terminated) else "Ctrl-C"
        message = f"interrupted ({signal_name}) at step {engine.step}"
        if shard is not None:  # the ranks stopped at different moments: no common state
            message += "; resume from the last periodic checkpoint with resume=True"
        elif run is not None:
            checkpoint(
                boundary_rng,
                best.state_dict() if boundary_rng is None else boundary_best,
            )
            message += f"; checkpoint written to {run.checkpoint_path}, resume with resume=True"
    if status not in ("interrupted", "non_finite"):
        checkpoint()
    bar.close()
    if opts.progress and distributed.is_writer():
        bar.write(f"{engine.name}: {status}: {message}")
    if status == "non_finite":
        warnings.warn(f"{engine.name}: {message}", RuntimeWarning, stacklevel=3)

    evaluation = None
    if opts.evaluate is not None and status != "interrupted":
        start = time.perf_counter()
        evaluation = _user_metrics(opts.evaluate(problem.theta, engine.step), engine.step)
        eval_seconds += time.perf_counter() - start
        best.consider(evaluation, engine.step, engine.params)
    wall_time = clock.elapsed() - eval_seconds
    result = RunResult(
        theta=snapshot(engine.params),
        status=status,
        message=message,
        step=engine.step,
        epoch=engine.epoch,
        cost=engine.cost,
        wall_time=wall_time,
        records=run.read_metrics() if run is not None else records,
        evaluation=evaluation,
        history=history,
        run_dir=None if run is None else run.path,
        best_theta=best.theta,
        best=best.info(),
    )
    if run is not None:
        summary = {
            "status": status,
            "finished": result.finished,
            "message": message,
            "step": engine.step,
            "epoch": engine.epoch,
            "cost": engine.cost,
            "wall_time": wall_time,
            "evaluation": evaluation,
            "best": best.info(),
        }
        write_json(run.path / RESULT_NAME, summary)
        if opts.plot and result.records:
            _plot(run, result.records, extra_keys=list((evaluation or {}).keys()))
    return result


def _rank_rng(state: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """The generator states this process resumes from, and whether they are its own: its
    rank's when the checkpoint holds them (it was written by at least rank + 1 processes),
    else rank 0's (then the engine derives its per-process streams anew)."""
    shard = distributed.current()
    ranks = state.get("rank_rng") or [state["rng"]]
    rank = 0 if shard is None else shard.rank
    return (ranks[rank], True) if rank < len(ranks) else (ranks[0], False)


def _plot(run: RunDirectory, records: list[dict[str, Any]], extra_keys: list[str]) -> None:
    keys = ["upper_loss", "grad_norm", "bound", "eps", "alpha"]
    keys += [k for k in extra_keys if k not in keys]
    try:
        plot_metrics(run, x_keys=("cost", "wall_time"), y_keys=keys)
    except ImportError as exc:
        warnings.warn(f"no plots: {exc}", RuntimeWarning, stacklevel=3)


class Method:
    """Base of the upper-level methods (frozen dataclasses): the one ``run`` they share.

    A subclass gives :meth:`engine`; its configuration is stored in the run directory under
    its lower-case class name, and ``default_checkpoint_every`` is its default of
    ``run(checkpoint_every=)``.
    """

    default_checkpoint_every = 50

    def to_config(self) -> dict[str, Any]:
        """The configuration as JSON data (stored in the run directory)."""
        return method_config(self)

    def engine(
        self,
        problem: BilevelProblem,
        samples: SampleSet,
        budget: Budget,
        estimator_state: EstimatorState | None = None,
    ) -> Engine:
        """A fresh :class:`Engine` running this method on ``problem`` and ``samples``, carrying
        ``estimator_state`` (default: a fresh one of the method's estimator)."""
        raise NotImplementedError

    def run(
        self,
        problem: BilevelProblem,
        samples: SampleSet,
        budget: Budget | Mapping[str, Any],
        *,
        run_dir: str | Path | None = None,
        resume: bool = False,
        overwrite: bool = False,
        evaluate: Evaluation | None = None,
        eval_every: int = 1,
        checkpoint_every: int | None = None,
        progress: bool = False,
        plot: bool = False,
        keep_history: bool = False,
        estimator_state: EstimatorState | None = None,
    ) -> RunResult:
        """Train ``problem.theta`` in place on ``samples`` until ``budget`` is spent (or the
        method stops on its own: converged, stalled).

        Args:
            run_dir: directory for ``config.json``, ``metrics.jsonl``, checkpoints, plots and
                ``result.json``; None keeps the records in memory only.
            resume: continue the run stored in ``run_dir`` from its last checkpoint (the
                configuration must match; the budget may differ).
            overwrite: start afresh in a ``run_dir`` that already holds a run.
            evaluate: ``evaluate(theta, step) -> dict`` called at θ_k every ``eval_every``
                steps (logged with step k's record) and once at the end; mark it with
                :func:`ranked_by` to keep the best θ.
            checkpoint_every: steps between checkpoints (one is also written at the end and
                on KeyboardInterrupt); default ``default_checkpoint_every`` of the method.
            progress: show a progress bar on stderr (off by default for library use; the
                jobs turn it on).
            plot: write plots of the metrics to ``run_dir/plots`` at the end (off by
                default; the jobs turn it on).
            keep_history: keep θ after every step in ``RunResult.history``.
            estimator_state: the hypergradient estimator's state to carry
                (``estimator.init_state()`` by default); pass one to watch or steer it during
                the run (e.g. SID's ``SIDState.tighten``). It is updated in place, checkpointed,
                and restored into on resume.

        Returns:
            A :class:`RunResult`; a non-finite hypergradient or loss ends the run with status
            ``"non_finite"`` (and a RuntimeWarning), θ restored to the last good value.
        """
        samples = as_sample_set(samples)
        if estimator_state is not None and not isinstance(estimator_state, EstimatorState):
            raise BilevelError(
                f"estimator_state must be an EstimatorState, got {type(estimator_state).__name__}"
            )
        if checkpoint_every is None:
            checkpoint_every = self.default_checkpoint_every
        options = RunOptions(
            budget=as_budget(budget),
            run_dir=run_dir,
            resume=resume,
            overwrite=overwrite,
            evaluate=evaluate,
            eval_every=eval_every,
            checkpoint_every=checkpoint_every,
            progress=progress,
            plot=plot,
            keep_history=keep_history,
        )
        engine = self.engine(problem, samples, options.budget, estimator_state)
        name = type(self).__name__.lower()
        return drive(engine, options, {"method": name, name: self.to_config()}, len(samples))
