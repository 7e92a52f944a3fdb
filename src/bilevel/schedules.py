"""Step-size and accuracy schedules for upper-level methods.

A schedule maps the 0-based upper-level iteration ``k`` to a positive float: a step size α_k
(in units of θ per unit of hypergradient) or a tolerance (ε_k on the lower-level gradient norm,
δ_k on the adjoint residual norm, both absolute). Schedules are small immutable objects; they
compose by scaling (``schedule * 0.5``) and clipping (``schedule.clip(minimum=1e-6)``), print
readably, and round-trip through plain dictionaries (:meth:`Schedule.to_config`,
:func:`schedule_from_config`) and command-line strings (:func:`parse_schedule`).

Families (``A`` the initial value):

* :class:`Constant`: ``A``
* :class:`Polynomial`: ``A / (k + 1) ** power``
* :class:`Logarithmic`: ``A / log(k + 2) ** power``
* :class:`Geometric`: ``A * ratio ** k`` (underflows to 0 for large ``k``: clip it from below
  when it drives a tolerance)
* :class:`FromCallable`: any ``fn(k) -> float`` (cannot be stored in a configuration)
"""

from __future__ import annotations

import math
import numbers
import operator
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bilevel.problem import BilevelError

__all__ = [
    "Accuracy",
    "Clipped",
    "Constant",
    "FromCallable",
    "Geometric",
    "Logarithmic",
    "Polynomial",
    "Scaled",
    "Schedule",
    "ScheduleLike",
    "accuracy_from_config",
    "as_accuracy",
    "as_schedule",
    "parse_accuracy",
    "parse_schedule",
    "schedule_from_config",
]

ACCEPTED_FORMS = (
    "accepted forms: '1e-3' or 'const:1e-3' (constant), 'poly:A,POWER' (A/(k+1)^POWER), "
    "'log:A,POWER' (A/log(k+2)^POWER), 'geom:A,RATIO' (A*RATIO^k); any of them may end with "
    "',min=X' and/or ',max=Y' to clip the values; A, X, Y finite and positive, POWER >= 0, "
    "0 < RATIO <= 1"
)


# ----------------------------------------------------------------------------- validation


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise BilevelError(f"{name} must be a real number, got {value!r}")
    return float(value)


def _positive(name: str, value: Any) -> float:
    v = _real(name, value)
    if not (math.isfinite(v) and v > 0):
        raise BilevelError(f"{name} must be finite and positive, got {v!r}")
    return v


def _nonnegative(name: str, value: Any) -> float:
    v = _real(name, value)
    if not (math.isfinite(v) and v >= 0):
        raise BilevelError(f"{name} must be finite and >= 0, got {v!r}")
    return v


def _ratio(name: str, value: Any) -> float:
    v = _real(name, value)
    if not (0 < v <= 1):
        raise BilevelError(f"{name} must satisfy 0 < {name} <= 1, got {v!r}")
    return v


def _iteration(k: Any) -> int:
    if isinstance(k, bool):
        raise BilevelError(f"iteration k must be a non-negative integer, got {k!r}")
    try:
        i = operator.index(k)
    except TypeError:
        raise BilevelError(f"iteration k must be a non-negative integer, got {k!r}") from None
    if i < 0:
        raise BilevelError(f"iteration k must be a non-negative integer, got {i}")
    return i


# ----------------------------------------------------------------------------- base class


class Schedule(ABC):
    """A positive sequence indexed by the 0-based upper-level iteration ``k``."""

    @abstractmethod
    def __call__(self, k: int) -> float:
        """The value at iteration ``k`` (``k >= 0``)."""

    @abstractmethod
    def to_config(self) -> dict[str, Any]:
        """A JSON-compatible dictionary that :func:`schedule_from_config` turns back into it."""

    def to_text(self) -> str:
        """The command-line form accepted by :func:`parse_schedule`."""
        raise BilevelError(f"{self!r} has no command-line form")

    def __str__(self) -> str:
        try:
            return self.to_text()
        except BilevelError:
            return repr(self)

    def values(self, n: int) -> list[float]:
        """The first ``n`` values, for ``k = 0, ..., n - 1``."""
        return [self(k) for k in range(_iteration(n))]

    def clip(self, minimum: float | None = None, maximum: float | None = None) -> Schedule:
        """This schedule with values held within ``[minimum, maximum]`` (either may be None)."""
        return Clipped(self, minimum=minimum, maximum=maximum)

    def scale(self, factor: float) -> Schedule:
        """This schedule multiplied by a positive ``factor``."""
        return Scaled(self, _positive("scale factor", factor))

    def __mul__(self, factor: Any) -> Schedule:
        if isinstance(factor, bool) or not isinstance(factor, numbers.Real):
            return NotImplemented
        return self.scale(factor)

    __rmul__ = __mul__

    def __truediv__(self, divisor: Any) -> Schedule:
        if isinstance(divisor, bool) or not isinstance(divisor, numbers.Real):
            return NotImplemented
        return self.scale(1.0 / _positive("divisor", divisor))


ScheduleLike = Schedule | float | str | Mapping[str, Any] | Callable[[int], float]


# ----------------------------------------------------------------------------- families


@dataclass(frozen=True)
class Constant(Schedule):
    """The same ``value`` at every iteration."""

    value: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "value", _positive("value", self.value))

    def __call__(self, k: int) -> float:
        _iteration(k)
        return self.value

    def scale(self, factor: float) -> Schedule:
        return Constant(self.value * _positive("scale factor", factor))

    def to_config(self) -> dict[str, Any]:
        return {"kind": "constant", "value": self.value}

    def to_text(self) -> str:
        return f"const:{self.value!r}"


@dataclass(frozen=True)
class Polynomial(Schedule):
    """``initial / (k + 1) ** power``; ``power = 0`` is constant."""

    initial: float
    power: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "initial", _positive("initial", self.initial))
        object.__setattr__(self, "power", _nonnegative("power", self.power))

    def __call__(self, k: int) -> float:
        return self.initial / float(_iteration(k) + 1) ** self.power

    def scale(self, factor: float) -> Schedule:
        return Polynomial(self.initial * _positive("scale factor", factor), self.power)

    def to_config(self) -> dict[str, Any]:
        return {"kind": "polynomial", "initial": self.initial, "power": self.power}

    def to_text(self) -> str:
        return f"poly:{self.initial!r},{self.power!r}"


@dataclass(frozen=True)
class Logarithmic(Schedule):
    """``initial / log(k + 2) ** power`` (natural logarithm); ``power = 0`` is constant.

    The value at ``k = 0`` is ``initial / log(2) ** power``, above ``initial`` when
    ``power > 0`` (``log 2 ≈ 0.69``).
    """

    initial: float
    power: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "initial", _positive("initial", self.initial))
        object.__setattr__(self, "power", _nonnegative("power", self.power))

    def __call__(self, k: int) -> float:
        return self.initial / math.log(_iteration(k) + 2) ** self.power

    def scale(self, factor: float) -> Schedule:
        return Logarithmic(self.initial * _positive("scale factor", factor), self.power)

    def to_config(self) -> dict[str, Any]:
        return {"kind": "logarithmic", "initial": self.initial, "power": self.power}

    def to_text(self) -> str:
        return f"log:{self.initial!r},{self.power!r}"


@dataclass(frozen=True)
class Geometric(Schedule):
    """``initial * ratio ** k`` with ``0 < ratio <= 1``."""

    initial: float
    ratio: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "initial", _positive("initial", self.initial))
        object.__setattr__(self, "ratio", _ratio("ratio", self.ratio))

    def __call__(self, k: int) -> float:
        return self.initial * self.ratio ** _iteration(k)

    def scale(self, factor: float) -> Schedule:
        return Geometric(self.initial * _positive("scale factor", factor), self.ratio)

    def to_config(self) -> dict[str, Any]:
        return {"kind": "geometric", "initial": self.initial, "ratio": self.ratio}

    def to_text(self) -> str:
        return f"geom:{self.initial!r},{self.ratio!r}"


@dataclass(frozen=True, repr=False)
class FromCallable(Schedule):
    """Values from a user function ``fn(k)``; each must be finite and positive.

    It cannot be stored in a configuration file: :meth:`to_config` raises.
    """

    fn: Callable[[int], float]
    name: str | None = field(default=None)

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise BilevelError(f"FromCallable needs a callable, got {self.fn!r}")
        if self.name is None:
            object.__setattr__(self, "name", getattr(self.fn, "__name__", "callable"))

    def __call__(self, k: int) -> float:
        k = _iteration(k)
        raw = self.fn(k)
        try:
            v = float(raw)
        except (TypeError, ValueError):
            raise BilevelError(
                f"schedule {self.name!r} returned {raw!r} at k={k}; expected a number"
            ) from None
        if not (math.isfinite(v) and v > 0):
            raise BilevelError(
                f"schedule {self.name!r} returned {v!r} at k={k}; values must be finite and "
                "positive"
            )
        return v

    def __repr__(self) -> str:
        return f"FromCallable(name={self.name!r})"

    def to_config(self) -> dict[str, Any]:
        raise BilevelError(
            f"{self!r} wraps a Python function and cannot be stored in a configuration; use "
            "Constant, Polynomial, Logarithmic or Geometric (optionally clipped or scaled), "
            "or rebuild the schedule in code when resuming"
        )


@dataclass(frozen=True)
class Scaled(Schedule):
    """``factor * schedule(k)``. Scaling a built-in family folds into its parameters instead."""

    schedule: Schedule
    factor: float

    def __post_init__(self) -> None:
        if not isinstance(self.schedule, Schedule):
            raise BilevelError(f"Scaled needs a Schedule, got {self.schedule!r}")
        object.__setattr__(self, "factor", _positive("factor", self.factor))

    def __call__(self, k: int) -> float:
        return self.factor * self.schedule(k)

    def scale(self, factor: float) -> Schedule:
        return Scaled(self.schedule, self.factor * _positive("scale factor", factor))

    def to_config(self) -> dict[str, Any]:
        return {"kind": "scaled", "schedule": self.schedule.to_config(), "factor": self.factor}


def _combine(pick: Callable[[float, float], float], a: float | None, b: float | None):
    if a is None:
        return b
    if b is None:
        return a
    return pick(a, b)


@dataclass(frozen=True)
class Clipped(Schedule):
    """``schedule(k)`` held within ``[minimum, maximum]``; at least one bound is given.

    Clipping a clipped schedule intersects the two intervals (they must overlap).
    """

    schedule: Schedule
    minimum: float | None = None
    maximum: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.schedule, Schedule):
            raise BilevelError(f"Clipped needs a Schedule, got {self.schedule!r}")
        if self.minimum is None and self.maximum is None:
            raise BilevelError("Clipped needs a minimum, a maximum, or both")
        lo = None if self.minimum is None else _positive("minimum", self.minimum)
        hi = None if self.maximum is None else _positive("maximum", self.maximum)
        if lo is not None and hi is not None and lo > hi:
            raise BilevelError(f"Clipped needs minimum <= maximum, got {lo!r} > {hi!r}")
        inner = self.schedule
        if isinstance(inner, Clipped):
            # clip(clip(x, a, b), c, d) == clip(x, max(a, c), min(b, d)) when the intervals meet
            lo2 = _combine(max, lo, inner.minimum)
            hi2 = _combine(min, hi, inner.maximum)
            if lo2 is not None and hi2 is not None and lo2 > hi2:
                raise BilevelError(f"clipping {inner!r} to [{lo}, {hi}] leaves an empty interval")
            lo, hi, inner = lo2, hi2, inner.schedule
        object.__setattr__(self, "schedule", inner)
        object.__setattr__(self, "minimum", lo)
        object.__setattr__(self, "maximum", hi)

    def __call__(self, k: int) -> float:
        v = self.schedule(k)
        if self.minimum is not None and v < self.minimum:
            v = self.minimum
        if self.maximum is not None and v > self.maximum:
            v = self.maximum
        return v

    def scale(self, factor: float) -> Schedule:
        f = _positive("scale factor", factor)
        return Clipped(
            self.schedule.scale(f),
            None if self.minimum is None else self.minimum * f,
            None if self.maximum is None else self.maximum * f,
        )

    def to_config(self) -> dict[str, Any]:
        return {
            "kind": "clipped",
            "schedule": self.schedule.to_config(),
            "minimum": self.minimum,
            "maximum": self.maximum,
        }

    def to_text(self) -> str:
        text = self.schedule.to_text()
        if self.minimum is not None:
            text += f",min={self.minimum!r}"
        if self.maximum is not None:
            text += f",max={self.maximum!r}"
        return text


# ----------------------------------------------------------------------------- conversion


def _check_keys(kind: str, config: Mapping[str, Any], required: set[str], optional=()) -> None:
    keys = set(config) - {"kind"}
    missing = required - keys
    unknown = keys - required - set(optional)
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing {sorted(missing)}")
        if unknown:
            parts.append(f"unknown {sorted(unknown)}")
        raise BilevelError(
            f"schedule config of kind {kind!r}: {', '.join(parts)}; expected keys "
            f"{sorted(required | set(optional))}"
        )


def schedule_from_config(config: Mapping[str, Any] | float) -> Schedule:
    """Rebuild a schedule from :meth:`Schedule.to_config` output (a bare number is a constant)."""
    if isinstance(config, numbers.Real) and not isinstance(config, bool):
        return Constant(config)
    if not isinstance(config, Mapping):
        raise BilevelError(f"a schedule config must be a dict or a number, got {config!r}")
    kind = config.get("kind")
    if kind == "constant":
        _check_keys(kind, config, {"value"})
        return Constant(config["value"])
    if kind == "polynomial":
        _check_keys(kind, config, {"initial", "power"})
        return Polynomial(config["initial"], config["power"])
    if kind == "logarithmic":
        _check_keys(kind, config, {"initial", "power"})
        return Logarithmic(config["initial"], config["power"])
    if kind == "geometric":
        _check_keys(kind, config, {"initial", "ratio"})
        return Geometric(config["initial"], config["ratio"])
    if kind == "scaled":
        _check_keys(kind, config, {"schedule", "factor"})
        return Scaled(schedule_from_config(config["schedule"]), config["factor"])
    if kind == "clipped":
        _check_keys(kind, config, {"schedule"}, ("minimum", "maximum"))
        return Clipped(
            schedule_from_config(config["schedule"]),
            config.get("minimum"),
            config.get("maximum"),
        )
    raise BilevelError(
        f"unknown schedule kind {kind!r}; expected one of 'constant', 'polynomial', "
        "'logarithmic', 'geometric', 'scaled', 'clipped'"
    )


_KINDS = {
    "const": "constant",
    "constant": "constant",
    "poly": "polynomial",
    "polynomial": "polynomial",
    "log": "logarithmic",
    "logarithmic": "logarithmic",
    "geom": "geometric",
    "geometric": "geometric",
}


def _number(text: str, what: str, whole: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise BilevelError(
            f"cannot read {what} {text.strip()!r} in schedule {whole!r} as a number; "
            f"{ACCEPTED_FORMS}"
        ) from None


def parse_schedule(text: str) -> Schedule:
    """Read a schedule from its command-line form, e.g. ``"poly:1e-2,0.5,min=1e-5"``.

    Forms: ``"1e-3"`` / ``"const:1e-3"``, ``"poly:A,POWER"``, ``"log:A,POWER"``,
    ``"geom:A,RATIO"``, each optionally followed by ``",min=X"`` and/or ``",max=Y"``.
    """
    if not isinstance(text, str):
        raise BilevelError(f"parse_schedule needs a string, got {text!r}")
    whole = text.strip()
    if not whole:
        raise BilevelError(f"empty schedule; {ACCEPTED_FORMS}")
    try:
        if ":" not in whole:
            return Constant(_number(whole, "value", whole))
        head, _, rest = whole.partition(":")
        kind = _KINDS.get(head.strip().lower())
        if kind is None:
            raise BilevelError(f"unknown schedule kind {head.strip()!r} in {whole!r}")
        positional: list[float] = []
        bounds: dict[str, float] = {}
        for part in rest.split(","):
            part = part.strip()
            if "=" in part:
                key, _, val = part.partition("=")
                key = key.strip().lower()
                if key not in ("min", "max") or key in bounds:
                    raise BilevelError(f"unexpected option {part!r} in schedule {whole!r}")
                bounds[key] = _number(val, key, whole)
            elif bounds:
                raise BilevelError(f"{part!r} follows min=/max= in schedule {whole!r}")
            else:
                positional.append(_number(part, "argument", whole))
        expected = 1 if kind == "constant" else 2
        if len(positional) != expected:
            raise BilevelError(
                f"schedule kind {head.strip()!r} takes {expected} number(s), got "
                f"{len(positional)} in {whole!r}"
            )
        if kind == "constant":
            schedule: Schedule = Constant(positional[0])
        elif kind == "polynomial":
            schedule = Polynomial(*positional)
        elif kind == "logarithmic":
            schedule = Logarithmic(*positional)
        else:
            schedule = Geometric(*positional)
        if bounds:
            schedule = Clipped(schedule, bounds.get("min"), bounds.get("max"))
        return schedule
    except BilevelError as exc:
        message = str(exc)
        if "accepted forms" in message:
            raise
        raise BilevelError(f"invalid schedule {whole!r}: {message}; {ACCEPTED_FORMS}") from None


def as_schedule(x: ScheduleLike) -> Schedule:
    """A schedule from a schedule (itself), a number (constant), a string
    (:func:`parse_schedule`), a dict (:func:`schedule_from_config`) or a callable ``fn(k)``."""
    if isinstance(x, Schedule):
        return x
    if isinstance(x, numbers.Real) and not isinstance(x, bool):
        return Constant(x)
    if isinstance(x, str):
        return parse_schedule(x)
    if isinstance(x, Mapping):
        return schedule_from_config(x)
    if callable(x):
        return FromCallable(x)
    raise BilevelError(
        f"cannot make a schedule from {x!r}; pass a Schedule, a positive number, a string such "
        "as 'poly:1e-2,0.5', a config dict or a callable k -> float"
    )


# ----------------------------------------------------------------------------- accuracy


@dataclass(frozen=True)
class Accuracy:
    """Tolerances for one upper-level iteration: ``lower(k)`` = ε_k, the bound on the
    lower-level gradient norm ‖∇_x h(x̃)‖, and ``adjoint(k)`` = δ_k, the bound on the adjoint
    residual norm ‖H q̃ − ∇_x f‖. Both are absolute. ``adjoint`` defaults to ``lower``."""

    lower: Schedule
    adjoint: Schedule | None = None

    def __post_init__(self) -> None:
        lower = as_schedule(self.lower)
        adjoint = lower if self.adjoint is None else as_schedule(self.adjoint)
        object.__setattr__(self, "lower", lower)
        object.__setattr__(self, "adjoint", adjoint)

    def __call__(self, k: int) -> tuple[float, float]:
        """``(ε_k, δ_k)``."""
        return self.lower(k), self.adjoint(k)

    def to_config(self) -> dict[str, Any]:
        return {"lower": self.lower.to_config(), "adjoint": self.adjoint.to_config()}


def accuracy_from_config(config: Mapping[str, Any]) -> Accuracy:
    """Rebuild an :class:`Accuracy` from :meth:`Accuracy.to_config` output."""
    if not isinstance(config, Mapping) or "lower" not in config:
        raise BilevelError(
            f"an accuracy config is a dict with 'lower' (and 'adjoint'), got {config!r}"
        )
    unknown = set(config) - {"lower", "adjoint"}
    if unknown:
        raise BilevelError(f"unknown keys {sorted(unknown)} in accuracy config")
    adjoint = config.get("adjoint")
    return Accuracy(
        schedule_from_config(config["lower"]),
        None if adjoint is None else schedule_from_config(adjoint),
    )


def as_accuracy(x: Accuracy | ScheduleLike | tuple[ScheduleLike, ScheduleLike]) -> Accuracy:
    """An :class:`Accuracy` from itself, a ``(lower, adjoint)`` pair, or one schedule-like
    value used for both tolerances."""
    if isinstance(x, Accuracy):
        return x
    if isinstance(x, tuple):
        if len(x) != 2:
            raise BilevelError(f"an accuracy pair is (lower, adjoint), got {len(x)} items")
        return Accuracy(as_schedule(x[0]), as_schedule(x[1]))
    return Accuracy(as_schedule(x))


def parse_accuracy(lower: str, adjoint: str | None = None) -> Accuracy:
    """An :class:`Accuracy` from command-line schedule strings (see :func:`parse_schedule`)."""
    return Accuracy(parse_schedule(lower), None if adjoint is None else parse_schedule(adjoint))
