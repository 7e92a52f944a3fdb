"""Training data of the upper-level methods: the :class:`SampleSet` protocol.

A method sees the n training samples through a :class:`SampleSet`: ``len(samples)`` = n,
``samples.batch(index)`` = the per-instance batch of the samples ``index`` (every tensor with
leading dimension ``len(index)``, as :class:`~bilevel.problem.BilevelProblem` expects), and
``samples.initial(index)`` = initial lower-level points x₀ of shape ``(len(index), ...)``.
:class:`TensorSamples` stores them as tensors; :func:`with_initial` adds ``initial`` to a data
set that only has ``batch`` (e.g. ``x₀ = y``, the noisy image).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from bilevel.problem import Batch, BilevelError, BilevelProblem

__all__ = ["SampleSet", "TensorSamples", "as_sample_set", "check_sample_dtypes", "with_initial"]


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
