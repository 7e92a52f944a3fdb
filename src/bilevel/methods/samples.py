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

from bilevel.problem import (
    Batch,
    BilevelError,
    BilevelProblem,
    batch_size_of,
    batch_tensors,
    index_batch,
)

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


class TensorSamples:
    """Samples stored as tensors with a common leading dimension n.

    ``batch`` is the per-instance data of all n samples in any form a
    :class:`~bilevel.problem.BilevelProblem` accepts (a tensor, or a tuple / list / dict of
    tensors, each with leading dimension n), or None when the lower-level problems share all
    data through the closure; ``batch(index)`` returns it in the same form, each tensor indexed
    by ``index`` (None stays None). ``x_init`` gives the initial lower-level points: a tensor
    (n, ...) or a callable ``x_init(batch) -> (len(index), ...)`` (e.g.
    ``lambda b: b[0].clone()`` for x₀ = y with ``batch = (y, x_true)``).
    """

    def __init__(self, batch: Batch = None, *, x_init: Tensor | Callable[[Batch], Tensor]) -> None:
        tensors = batch_tensors(batch)
        if batch is not None and not tensors:
            raise BilevelError(
                "batch must be a tensor or a tuple / list / dict of tensors with a leading "
                f"sample dimension, got {type(batch).__name__}"
            )
        if any(t.dim() < 1 for t in tensors):
            raise BilevelError("every tensor of batch must have a leading sample dimension")
        n = batch_size_of(batch)
        if isinstance(x_init, Tensor):
            if x_init.dim() < 1:
                raise BilevelError("x_init must be a tensor with a leading sample dimension")
            if n is not None and x_init.shape[0] != n:
                raise BilevelError(
                    f"x_init has {x_init.shape[0]} samples, expected {n} like the batch"
                )
            n = x_init.shape[0]
        elif not callable(x_init):
            raise BilevelError("x_init must be a tensor (n, ...) or a callable batch -> x0")
        if n is None:
            raise BilevelError("TensorSamples needs a batch of tensors, or x_init as a tensor")
        if n < 1:
            raise BilevelError("TensorSamples needs at least one sample")
        self.data = batch
        self.x_init = x_init
        self._n = n

    @property
    def tensors(self) -> list[Tensor]:
        """The stored tensors of the batch, in a fixed order."""
        return batch_tensors(self.data)

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        shapes = ", ".join(str(tuple(t.shape)) for t in self.tensors)
        return f"TensorSamples(n={self._n}, tensors=[{shapes}])"

    def batch(self, index: Tensor) -> Batch:
        if self.data is None:
            return None
        return index_batch(self.data, index.to(self.tensors[0].device))

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
