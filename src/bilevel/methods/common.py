"""Pieces shared by the upper-level methods: training data, budgets, optimisers, results, and
the run loop (run directory, metrics, checkpoints, interrupt/resume, progress, plots).

Training data
-------------
A method sees the n training samples through a :class:`SampleSet`: ``len(samples)`` = n,
``samples.batch(index)`` = the per-instance batch of the samples ``index`` (every tensor with
leading dimension ``len(index)``, as :class:`~bilevel.problem.BilevelProblem` expects), and
``samples.initial(index)`` = initial lower-level points x₀ of shape ``(len(index), ...)``.
:class:`TensorSamples` stores them as tensors; :func:`with_initial` adds ``initial`` to a data
set that only has ``batch`` (e.g. ``x₀ = y``, the noisy image).

Run loop
--------
Every method is a small immutable configuration object whose ``run`` drives an engine one
upper-level step at a time. A step is split into a *compute* phase, which changes no
persistent state (θ is restored if it was moved for a trial), and a short *commit* phase that
updates θ, the optimiser, the warm starts and the counters and logs the step's record. SIGINT
and SIGTERM (what schedulers and ``timeout`` send) are deferred during the commit, so the state
is consistent whenever a KeyboardInterrupt or SIGTERM arrives: the run then writes a
checkpoint of the state at the last step boundary and returns with status ``"interrupted"``.
Resuming from any checkpoint (periodic, final or interrupt)
restores θ, the optimiser state, the warm-start tensors, the sampler and every random number
generator, so that on CPU the resumed run reproduces the uninterrupted run bit for bit.

Best θ
------
An ``evaluate`` callback marked by :func:`ranked_by` (e.g. ``ranked_by(evaluate, "val_loss",
"min")``) ranks the evaluated iterates: the run keeps the θ with the best value of that metric
(periodic and final evaluations), checkpoints it, and returns it as ``RunResult.best_theta``
beside the last θ, with ``RunResult.best`` = {metric, mode, step, value}.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from bilevel import distributed
from bilevel.problem import Batch, BilevelError, BilevelProblem, NonFiniteError, Theta
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
from bilevel.schedules import Accuracy, Schedule

__all__ = [
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
    "make_optimizer",
    "ranked_by",
    "with_initial",
]

#: ``projection(theta)``: called under ``torch.no_grad()`` after every step. It either modifies
#: the parameters in place and returns None, or returns the projected parameters (a tensor or a
#: list of tensors in the order of ``problem.params``), which are copied into them.
Projection = Callable[[Theta], Any]

#: ``evaluate(theta, step) -> {name: value}``: user metrics (e.g. test PSNR) at θ_k, logged
#: with the record of step k. Its time is not counted in ``wall_time``.
Evaluation = Callable[[Theta, int], Mapping[str, Any]]

#: ``factory(params) -> torch.optim.Optimizer``; the method overwrites ``lr`` every step.
OptimizerFactory = Callable[[list[Tensor]], torch.optim.Optimizer]

#: Optimiser names accepted by :func:`make_optimizer`.
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
}

#: Values of :attr:`RunResult.status`.
STATUSES = ("budget", "interrupted", "non_finite", "converged", "stalled")


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


# ----------------------------------------------------------------------------- training data


@runtime_checkable
class SampleSet(Protocol):
    """The n training samples of a finite-sum bilevel problem (see the module docstring)."""

    def __len__(self) -> int: ...

    def batch(self, index: Tensor) -> Batch:
        """Per-instance batch for the samples ``index`` (1-D long tensor)."""
        ...

    def initial(self, index: Tensor) -> Tensor:
        """Initial lower-level points x₀ for the samples ``index``, shape (len(index), ...)."""
        ...


def _leading(name: str, t: Tensor, n: int | None) -> int:
    if not isinstance(t, Tensor) or t.dim() < 1:
        raise BilevelError(f"{name} must be a tensor with a leading sample dimension")
    if n is not None and t.shape[0] != n:
        raise BilevelError(f"{name} has {t.shape[0]} samples, expected {n} like the others")
    return t.shape[0]


class TensorSamples:
    """Samples stored as tensors with a common leading dimension n.

    ``batch(index)`` returns the indexed tensor (one tensor given), a tuple of indexed tensors
    (several), or None (none: the lower-level problems share all data through the closure).
    ``x_init`` gives the initial lower-level points: a tensor (n, ...) or a callable
    ``x_init(batch) -> (len(index), ...)`` (e.g. ``lambda b: b[0].clone()`` for x₀ = y).
    """

    def __init__(self, *tensors: Tensor, x_init: Tensor | Callable[[Batch], Tensor]) -> None:
        n = None
        for i, t in enumerate(tensors):
            n = _leading(f"tensor {i}", t, n)
        if isinstance(x_init, Tensor):
            n = _leading("x_init", x_init, n)
        elif not callable(x_init):
            raise BilevelError("x_init must be a tensor (n, ...) or a callable batch -> x0")
        if n is None:
            raise BilevelError("TensorSamples needs at least one tensor, or x_init as a tensor")
        if n < 1:
            raise BilevelError("TensorSamples needs at least one sample")
        self.tensors = tuple(tensors)
        self.x_init = x_init
        self._n = n

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        shapes = ", ".join(str(tuple(t.shape)) for t in self.tensors)
        return f"TensorSamples(n={self._n}, tensors=[{shapes}])"

    def batch(self, index: Tensor) -> Batch:
        if not self.tensors:
            return None
        out = tuple(t[index.to(t.device)] for t in self.tensors)
        return out[0] if len(out) == 1 else out

    def initial(self, index: Tensor) -> Tensor:
        if isinstance(self.x_init, Tensor):
            return self.x_init[index.to(self.x_init.device)].clone()
        return self.x_init(self.batch(index))


class _WithInitial:
    def __init__(self, samples: Any, initial: Callable[[Batch], Tensor]) -> None:
        self.samples = samples
        self._initial = initial

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return f"with_initial({self.samples!r})"

    def batch(self, index: Tensor) -> Batch:
        return self.samples.batch(index)

    def initial(self, index: Tensor) -> Tensor:
        return self._initial(self.samples.batch(index))


def with_initial(samples: Any, initial: Callable[[Batch], Tensor]) -> SampleSet:
    """A :class:`SampleSet` from a data set with ``__len__`` and ``batch(index)`` and a
    function ``initial(batch) -> x0``; e.g. ``with_initial(images, lambda b: b[0].clone())``."""
    if not callable(getattr(samples, "batch", None)):
        raise BilevelError(f"{type(samples).__name__} has no batch(index) method")
    if not callable(initial):
        raise BilevelError("initial must be a callable batch -> x0")
    return _WithInitial(samples, initial)


def as_sample_set(samples: Any) -> SampleSet:
    """Validate ``samples`` against the :class:`SampleSet` protocol and return it."""
    missing = [m for m in ("__len__", "batch", "initial") if not callable(getattr(samples, m, 0))]
    if missing:
        hint = (
            "; wrap it with with_initial(samples, lambda batch: x0)"
            if missing == ["initial"]
            else ""
        )
        raise BilevelError(
            f"{type(samples).__name__} is not a SampleSet: it lacks {', '.join(missing)}{hint}"
        )
    if len(samples) < 1:
        raise BilevelError("the sample set is empty")
    return samples


# ----------------------------------------------------------------------------- budget


@dataclass(frozen=True)
class Budget:
    """When to stop: the first limit reached ends the run (at least one must be given).

    Attributes:
        oracle_calls: cumulative lower-level gradient evaluations + Hessian-vector products
            (``Cost.oracle_calls``, counted per instance, including failed line-search trials).
        steps: upper-level iterations.
        epochs: passes over the training samples (for full-batch methods, = steps).
        wall_time: seconds of computation (evaluation callbacks excluded).

    Limits are checked between steps, so a run may overshoot ``oracle_calls`` or ``wall_time``
    by one step.
    """

    oracle_calls: int | None = None
    steps: int | None = None
    epochs: int | None = None
    wall_time: float | None = None

    def __post_init__(self) -> None:
        values = dataclasses.asdict(self)
        if all(v is None for v in values.values()):
            raise BilevelError(
                "Budget needs at least one limit: oracle_calls, steps, epochs or wall_time"
            )
        for name, v in values.items():
            if v is None:
                continue
            ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
            if not ok or v <= 0:
                raise BilevelError(f"budget {name} must be a finite positive number, got {v!r}")
            if name != "wall_time" and int(v) != v:
                raise BilevelError(f"budget {name} must be an integer, got {v!r}")

    def exhausted(self, step: int, epoch: int, cost: float, seconds: float) -> str | None:
        """A message naming the limit reached, or None."""
        if self.oracle_calls is not None and cost >= self.oracle_calls:
            return f"oracle-call budget reached ({cost} >= {self.oracle_calls})"
        if self.steps is not None and step >= self.steps:
            return f"step budget reached ({step} steps)"
        if self.epochs is not None and epoch >= self.epochs:
            return f"epoch budget reached ({epoch} epochs)"
        if self.wall_time is not None and seconds >= self.wall_time:
            return f"wall-time budget reached ({seconds:.1f} s >= {self.wall_time:g} s)"
        return None

    def progress(self) -> tuple[str, float]:
        """(unit, total) of the limit shown by the progress bar."""
        for unit in ("oracle_calls", "steps", "epochs", "wall_time"):
            total = getattr(self, unit)
            if total is not None:
                return unit, float(total)
        raise AssertionError("unreachable")


def as_budget(budget: Budget | Mapping[str, Any]) -> Budget:
    if isinstance(budget, Budget):
        return budget
    if isinstance(budget, Mapping):
        unknown = set(budget) - {f.name for f in dataclasses.fields(Budget)}
        if unknown:
            raise BilevelError(f"unknown budget keys {sorted(unknown)}")
        return Budget(**budget)
    raise BilevelError(f"budget must be a Budget or a dict, got {type(budget).__name__}")


# ----------------------------------------------------------------------------- optimisers


def make_optimizer(
    spec: str | OptimizerFactory,
    params: list[Tensor],
    lr: float,
    options: Mapping[str, Any] | None = None,
) -> torch.optim.Optimizer:
    """A ``torch.optim`` optimiser over ``params`` from a name in :data:`OPTIMIZERS` (built
    with ``lr`` and ``options``) or from a factory ``callable(params) -> Optimizer``."""
    options = dict(options or {})
    if isinstance(spec, str):
        cls = OPTIMIZERS.get(spec.lower())
        if cls is None:
            raise BilevelError(
                f"unknown optimiser {spec!r}; use one of {sorted(OPTIMIZERS)} or pass a "
                "callable params -> torch.optim.Optimizer"
            )
        if "lr" in options:
            raise BilevelError("optimizer_options must not set lr: the step schedule sets it")
        try:
            return cls(params, lr=lr, **options)
        except TypeError as exc:
            raise BilevelError(f"bad options {options} for optimiser {spec!r}: {exc}") from None
    if not callable(spec):
        raise BilevelError(f"optimizer must be a name or a callable, got {spec!r}")
    if options:
        raise BilevelError("optimizer_options apply to named optimisers only")
    opt = spec(params)
    if not isinstance(opt, torch.optim.Optimizer):
        raise BilevelError(f"the optimiser factory returned {type(opt).__name__}, not an Optimizer")
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    if ids != {id(p) for p in params}:
        raise BilevelError("the optimiser factory must optimise exactly the parameters given")
    return opt


def check_optimizer_spec(spec: Any) -> None:
    if isinstance(spec, str):
        if spec.lower() not in OPTIMIZERS:
            raise BilevelError(
                f"unknown optimiser {spec!r}; use one of {sorted(OPTIMIZERS)} or pass a "
                "callable params -> torch.optim.Optimizer"
            )
    elif not callable(spec):
        raise BilevelError(f"optimizer must be a name or a callable, got {spec!r}")


# ----------------------------------------------------------------------------- θ helpers


def snapshot(params: list[Tensor]) -> list[Tensor]:
    """Detached copies of the parameters."""
    return [p.detach().clone() for p in params]


def load_params(params: list[Tensor], values: list[Tensor]) -> None:
    """Copy ``values`` into the parameters in place."""
    if len(values) != len(params):
        raise BilevelError(f"expected {len(params)} parameter tensors, got {len(values)}")
    with torch.no_grad():
        for p, v in zip(params, values):
            if p.shape != v.shape:
                raise BilevelError(
                    f"parameter shape {tuple(p.shape)} does not match stored {tuple(v.shape)}"
                )
            p.copy_(v)


def all_finite(tensors: list[Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def apply_projection(problem: BilevelProblem, projection: Projection | None) -> None:
    """θ ← P(θ) in place (see :data:`Projection`)."""
    if projection is None:
        return
    params = problem.params
    with torch.no_grad():
        out = projection(problem.theta)
        if out is None:
            return
        values = [out] if isinstance(out, Tensor) else list(out)
        load_params(params, [torch.as_tensor(v) for v in values])


def grad_norm(grad: list[Tensor]) -> float:
    return math.sqrt(sum(float((g * g).sum()) for g in grad))


# ----------------------------------------------------------------------------- configuration


def method_config(method: Any) -> dict[str, Any]:
    """The configuration of an upper-level method (a dataclass) as JSON data, for its run
    directory: every field described, an ``Accuracy`` as its two schedules."""
    out = {f.name: describe(getattr(method, f.name)) for f in dataclasses.fields(method)}
    accuracy = getattr(method, "accuracy", None)
    if isinstance(accuracy, Accuracy):
        out["accuracy"] = {"lower": describe(accuracy.lower), "adjoint": describe(accuracy.adjoint)}
    return out


def describe(value: Any) -> Any:
    """A JSON description of a configuration value: schedules and numbers as data, dataclasses
    (estimators, solvers) as ``{"type": name, field: ...}``, callables by qualified name."""
    if isinstance(value, Schedule):
        try:
            return value.to_config()
        except BilevelError:
            return {"kind": "callable", "repr": repr(value)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {"type": type(value).__name__}
        for f in dataclasses.fields(value):
            out[f.name] = describe(getattr(value, f.name))
        return out
    if isinstance(value, Mapping):
        return {str(k): describe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [describe(v) for v in value]
    if callable(value) and not isinstance(value, Tensor):
        module = getattr(value, "__module__", None) or ""
        name = getattr(value, "__qualname__", None) or type(value).__qualname__
        return f"{module}.{name}" if module else name
    try:
        return to_jsonable(value)
    except BilevelError:
        return repr(value)


def problem_description(problem: BilevelProblem, n: int) -> dict[str, Any]:
    params = problem.params
    return {
        "samples": n,
        "parameters": [list(p.shape) for p in params],
        "dtype": str(params[0].dtype),
        "mu": problem.mu,
    }


# ----------------------------------------------------------------------------- results


@dataclass
class RunResult:
    """The outcome of a run.

    Attributes:
        theta: the final parameters (detached copies; the problem's parameters hold the same
            values). After a non-finite stop: the last θ at which the loss and hypergradient
            were finite.
        status: one of :data:`STATUSES`; ``message`` says why the run stopped.
        step, epoch: counters at the end (total over resumed sessions).
        cost: cumulative oracle calls (lower gradient evaluations + Hessian-vector products).
        wall_time: seconds of computation over all sessions (evaluations excluded).
        records: the metrics records of the run (all of them when a run directory is used,
            else those of this session).
        evaluation: ``evaluate(θ_final, step)`` when an evaluation callback was given and the
            run was not interrupted.
        history: θ after every step of this session, starting with the initial θ (only with
            ``keep_history=True``); ``history[-1]`` equals ``theta``.
        run_dir: the run directory, if any.
        best_theta: θ of the best evaluation by the metric of a :func:`ranked_by` callback
            (over all sessions), or None (no ranking metric, or no finite value of it).
        best: ``{"metric", "mode", "step", "value"}`` of ``best_theta``, or None.
    """

    theta: list[Tensor]
    status: str
    message: str
    step: int
    epoch: int
    cost: float
    wall_time: float
    records: list[dict[str, Any]] = field(default_factory=list)
    evaluation: dict[str, Any] | None = None
    history: list[list[Tensor]] | None = None
    run_dir: Path | None = None
    best_theta: list[Tensor] | None = None
    best: dict[str, Any] | None = None

    @property
    def metrics(self) -> dict[str, Any]:
        """The final metrics: the last record, updated with the final evaluation."""
        out = dict(self.records[-1]) if self.records else {}
        out.update(self.evaluation or {})
        return out

    @property
    def ok(self) -> bool:
        """True unless the run was interrupted or stopped on a non-finite value."""
        return self.status not in ("interrupted", "non_finite")

    @property
    def finished(self) -> bool:
        """False when the run was interrupted (it can be resumed), else True."""
        return self.status != "interrupted"


# ----------------------------------------------------------------------------- engine + driver


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


class Terminated(KeyboardInterrupt):
    """SIGTERM received during a run: handled like Ctrl-C (checkpoint, status "interrupted")."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


_DEFERRED = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then deliver them (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous: dict[int, Any] = {}
    try:
        for sig in _DEFERRED:
            previous[sig] = signal.signal(sig, lambda signum, frame: received.append(signum))
    except (ValueError, OSError):  # signals unavailable here
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        yield
        return
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(received):
            handler = previous[sig]
            if callable(handler):
                handler(sig, None)
            elif sig == signal.SIGINT:
                raise KeyboardInterrupt
            elif handler == signal.SIG_DFL:
                raise Terminated()


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (a KeyboardInterrupt), so that a
    run stopped by a scheduler or ``timeout`` writes its checkpoint (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except (ValueError, OSError):
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
    """Options of one call to ``run`` shared by every method (see ``ISGD.run``)."""

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
_ENGINE_KEYS = ("grad_norm", "distance", "accepted", "backtracks", "certified")


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


def check_sample_dtypes(problem: BilevelProblem, samples: Any) -> None:
    """Refuse floating-point training tensors or initial points of a :class:`TensorSamples`
    whose dtype differs from θ's (they would fail deep inside a solver). Other sample sets are
    not inspected (reading a batch could have side effects)."""
    params = problem.params
    if not isinstance(samples, TensorSamples) or not params:
        return
    dtype = params[0].dtype
    stored = [("training data", t) for t in samples.tensors]
    if isinstance(samples.x_init, Tensor):
        stored.append(("initial points x0", samples.x_init))
    for what, t in stored:
        if t.is_floating_point() and t.dtype != dtype:
            raise BilevelError(
                f"the {what} are {str(t.dtype).removeprefix('torch.')} but θ is "
                f"{str(dtype).removeprefix('torch.')}: convert one of them (e.g. "
                f"tensor.to({dtype}))"
            )


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
