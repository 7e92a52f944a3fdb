"""What a run records: :class:`RunResult`, and the JSON descriptions of a method's
configuration and problem stored in its run directory (``config.json``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from bilevel.problem import BilevelError, BilevelProblem
from bilevel.runs import to_jsonable
from bilevel.schedules import Accuracy, Schedule

__all__ = ["STATUSES", "RunResult", "describe", "method_config", "problem_description"]

#: Values of :attr:`RunResult.status`.
STATUSES = ("budget", "interrupted", "non_finite", "converged", "stalled")


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
