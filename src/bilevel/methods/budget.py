"""When a run stops: :class:`Budget` (oracle calls, steps, epochs, wall time)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bilevel.problem import BilevelError

__all__ = ["Budget", "as_budget"]


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
    by one step; ``MAID`` and ``HOAG`` also check both before each recomputation and each
    line-search trial, so they overshoot by at most one trial.
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
