"""The user's bilevel problem, stated in plain PyTorch.

    min_θ  F(θ) = mean_i f(x̂_i(θ), θ, batch_i)  [+ r(θ)]
    x̂_i(θ) = argmin_x h(x, θ, batch_i)            (μ-strongly convex in x)

Conventions
-----------
* ``x`` has shape ``(B, *event_shape)``: ``B`` independent lower-level problems (one per image,
  or ``B = 1`` for a single training problem) solved together.
* ``lower_energy(x, theta, batch)`` and ``upper_loss(x, theta, batch)`` return one value per
  instance, shape ``(B,)``. Instance ``i`` of the energy may depend only on ``x[i]`` and
  ``batch[i]``: the Hessian is block diagonal and per-instance quantities come from one
  backward pass of the sum.
* ``batch`` holds per-instance data: a tensor, or a tuple / list / dict of tensors, each with
  leading dimension ``B`` (or ``None``). Data shared by all instances (a blur kernel, a whole
  training set) belongs in the closure or in θ, never in ``batch``: the solvers slice ``batch``
  along its leading dimension when some instances have converged.
* ``theta`` is passed to the callables exactly as the user gave it: a tensor, a sequence of
  tensors, a dict of tensors or an ``nn.Module``. The leaf tensors requiring gradients are the
  parameters θ that hypergradients are taken with respect to.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor, nn

from bilevel.errors import BilevelError

Theta = Union[Tensor, Sequence[Tensor], Mapping[str, Tensor], nn.Module]  # noqa: UP007
Batch = Any
EnergyFn = Callable[[Tensor, Any, Batch], Tensor]
Constant = Union[float, Tensor, Callable[..., Any], None]  # noqa: UP007
"""A stated constant: a number, a (B,) tensor (one value per instance), or a callable
``(theta, batch) -> number or (B,) tensor`` evaluated at the current θ (a callable without
arguments is also accepted). ``None`` means "not stated"."""


class NotStronglyConvexError(BilevelError):
    """The lower-level energy showed curvature at or below zero (or below the stated μ)."""


class NonFiniteError(BilevelError, FloatingPointError):
    """A NaN or infinity appeared in an input or an iterate."""


def parameter_list(theta: Theta) -> list[Tensor]:
    """The leaf tensors of θ that require gradients, in a fixed order."""
    if isinstance(theta, nn.Module):
        tensors = list(theta.parameters())
    elif isinstance(theta, Tensor):
        tensors = [theta]
    elif isinstance(theta, Mapping):
        tensors = list(theta.values())
    elif isinstance(theta, Sequence):
        tensors = list(theta)
    else:
        raise BilevelError(
            f"theta must be a tensor, a sequence or dict of tensors, or an nn.Module; "
            f"got {type(theta).__name__}"
        )
    for t in tensors:
        if not isinstance(t, Tensor):
            raise BilevelError(f"theta contains a {type(t).__name__}, expected tensors")
    params = [t for t in tensors if t.requires_grad]
    if not params:
        raise BilevelError("theta has no tensor with requires_grad=True: nothing to learn")
    return params


def parameter_names(theta: Theta) -> list[str]:
    """Names of the tensors of :func:`parameter_list`, in its order: the parameter names of an
    ``nn.Module`` (``"layer.weight"``), the keys of a dict, ``"0"``, ``"1"``, ... for a
    sequence and ``"theta"`` for one tensor."""
    parameter_list(theta)  # validates θ
    if isinstance(theta, nn.Module):
        named = list(theta.named_parameters())
    elif isinstance(theta, Tensor):
        named = [("theta", theta)]
    elif isinstance(theta, Mapping):
        named = [(str(k), v) for k, v in theta.items()]
    else:
        named = [(str(i), t) for i, t in enumerate(theta)]
    return [name for name, t in named if t.requires_grad]


def evaluate_constant(
    name: str, value: Constant, theta: Any, batch: Batch, like: Tensor, *, positive: bool = False
) -> Tensor | None:
    """A stated constant as a (B,) tensor at the current θ (``None`` if not stated).

    ``like`` (B, ...) gives B, dtype and device. Negative or non-finite values are rejected
    (zero too when ``positive``), naming the constant.
    """
    if value is None:
        return None
    if callable(value) and not isinstance(value, Tensor):
        n_args = _arity(value)
        with torch.no_grad():
            value = value() if n_args == 0 else value(theta, batch)
        if value is None:
            return None
    n = like.shape[0]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        v = float(value)  # checked without tensors (no host synchronisation)
        if not math.isfinite(v) or (v <= 0 if positive else v < 0):
            need = "finite positive" if positive else "finite non-negative"
            raise BilevelError(f"{name} must be {need}, got {v}")
        return torch.full((n,), v, dtype=like.dtype, device=like.device)
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device).detach()
    if t.dim() == 0:
        t = t.expand(n)
    elif t.shape != (n,):
        raise BilevelError(
            f"{name} must be a number or one value per instance, shape ({n},); "
            f"got shape {tuple(t.shape)}"
        )
    bad = ~torch.isfinite(t) | ((t <= 0) if positive else (t < 0))
    if bool(bad.any()):
        need = "finite positive" if positive else "finite non-negative"
        raise BilevelError(f"{name} must be {need}, got {float(t[bad][0])}")
    return t.clone()


def _arity(fn: Callable[..., Any]) -> int:
    """Number of parameters of ``fn`` (2 when it cannot be inspected), cached per callable."""
    try:
        return _arity_cached(fn)
    except TypeError:  # unhashable callable
        return _arity_cached.__wrapped__(fn)


@functools.lru_cache(maxsize=256)
def _arity_cached(fn: Callable[..., Any]) -> int:
    try:
        return len(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return 2


def check_tolerance(name: str, tol: float | Tensor, like: Tensor) -> Tensor:
    """An absolute tolerance as a (B,) tensor; the one rule shared by every solver.

    A tolerance must be ≥ 0 and not NaN, a float or one value per instance. 0 asks for the
    most accurate answer the solver can give (it stops at its iteration cap or where rounding
    errors stop progress); ``inf`` accepts the starting point.
    """
    n = like.shape[0]
    if isinstance(tol, (int, float)) and not isinstance(tol, bool):
        if math.isnan(tol) or tol < 0:  # checked without tensors (no host synchronisation)
            raise BilevelError(f"{name} must be non-negative (an absolute tolerance), got {tol}")
        return torch.full((n,), float(tol), dtype=like.dtype, device=like.device)
    t = torch.as_tensor(tol, dtype=like.dtype, device=like.device).detach()
    if t.dim() == 0:
        t = t.expand(n)
    elif t.shape != (n,):
        raise BilevelError(f"{name} must be a float or a ({n},) tensor; got {tuple(t.shape)}")
    if bool(torch.isnan(t).any()) or bool((t < 0).any()):
        raise BilevelError(f"{name} must be non-negative (an absolute tolerance), got {tol}")
    return t.clone()


def check_finite(name: str, *tensors: Tensor) -> None:
    """Raise :class:`NonFiniteError` naming ``name`` if any tensor holds NaN or inf."""
    for t in tensors:
        if t is not None and t.is_floating_point() and not all_finite(t):
            raise NonFiniteError(f"{name} contains NaN or infinite values")


def all_finite(t: Tensor) -> bool:
    """Whether every entry of a floating-point tensor is finite (one host read).

    The sum is finite only if every entry is (NaN and ±inf propagate through it): one
    reduction instead of an element-wise test and a reduction; a sum that overflows from
    finite entries falls back to the element-wise test.
    """
    return math.isfinite((t.detach() if t.requires_grad else t).sum()) or bool(
        torch.isfinite(t).all()
    )


def batch_size_of(batch: Batch) -> int | None:
    """Leading dimension shared by the tensors of ``batch`` (``None`` if it holds none)."""
    sizes = {t.shape[0] for t in batch_tensors(batch) if t.dim() > 0}
    if len(sizes) > 1:
        raise BilevelError(f"batch tensors disagree on the leading (instance) dimension: {sizes}")
    return sizes.pop() if sizes else None


def index_batch(batch: Batch, index: Tensor | None) -> Batch:
    """Select instances ``index`` along the leading dimension of every tensor in ``batch``."""
    if index is None or batch is None:
        return batch
    if isinstance(batch, Tensor):
        return batch[index] if batch.dim() > 0 else batch
    if isinstance(batch, Mapping):
        return {k: index_batch(v, index) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(index_batch(v, index) for v in batch)
    return batch


def batch_tensors(batch: Batch) -> list[Tensor]:
    """The tensors of ``batch`` (a tensor, or nested tuples / lists / dicts of them), in a
    fixed order."""
    if batch is None:
        return []
    if isinstance(batch, Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        return [t for v in batch.values() for t in batch_tensors(v)]
    if isinstance(batch, (tuple, list)):
        return [t for v in batch for t in batch_tensors(v)]
    return []


@dataclass(frozen=True)
class FiniteSum:
    """Minibatch access to a lower level that is a finite sum h = (1/N) Σ_j ℓ_j (+ regulariser),
    and optionally to an upper level that is one too: what stochastic estimators (SID) need.

    Attributes:
        lower_energy: ``(x, theta, index) -> (B,)`` unbiased estimates of h using only the
            samples ``index`` (a LongTensor of positions in 0..N-1).
        n_lower: N, the number of samples of the lower-level sum.
        upper_loss: optional ``(x, theta, index) -> (B,)`` unbiased minibatch estimate of f over
            its own ``n_upper`` samples (e.g. validation points).
        n_upper: the number of samples of the upper-level sum.
        prepare: optional ``(index) -> None``, told a lower minibatch that ``lower_energy``
            will receive next, while a data-parallel process waits for an all-reduce (e.g.
            gather its rows then); its result is not used.
    """

    lower_energy: Callable[[Tensor, Any, Tensor], Tensor]
    n_lower: int
    upper_loss: Callable[[Tensor, Any, Tensor], Tensor] | None = None
    n_upper: int | None = None
    prepare: Callable[[Tensor], Any] | None = None

    def __post_init__(self) -> None:
        if not callable(self.lower_energy):
            raise BilevelError("FiniteSum.lower_energy must be a callable (x, theta, index)")
        for name, fn, n in (
            ("n_lower", self.lower_energy, self.n_lower),
            ("n_upper", self.upper_loss, self.n_upper),
        ):
            if fn is None:
                continue
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise BilevelError(f"FiniteSum.{name} must be a positive integer, got {n!r}")
        if self.upper_loss is not None and not callable(self.upper_loss):
            raise BilevelError("FiniteSum.upper_loss must be a callable (x, theta, index)")
        if self.prepare is not None and not callable(self.prepare):
            raise BilevelError("FiniteSum.prepare must be a callable (index)")


@dataclass(frozen=True, eq=False)
class BilevelProblem:
    """A bilevel problem: lower-level energy h, upper-level loss f, parameters θ, modulus μ.

    Immutable once built: its constants are stated here (a constant that moves with θ is
    a callable evaluated at the current θ); ``dataclasses.replace(problem, mu=...)`` gives a
    problem with another μ. Only the values of θ's tensors change during training.

    Attributes:
        lower_energy: h(x, theta, batch) -> (B,) energies, μ-strongly convex and smooth in x.
        upper_loss: f(x, theta, batch) -> (B,) losses; the upper objective is their mean.
        theta: the parameters (tensor, sequence / dict of tensors, or nn.Module).
        mu: strong-convexity modulus of every h_i in x (same units as the Hessian of h): a
            number, a (B,) tensor, or a callable ``(theta, batch) -> number or (B,)``
            evaluated at the current θ (see :data:`Constant`), so μ may move with θ and differ
            between instances.  ``None`` means "estimate it" (Lanczos on the Hessian at x̃,
            with a safety margin); bounds from an estimated μ are flagged as estimated.  A
            stated μ is checked against the curvature the estimators observe; a contradiction
            makes the bound uncertified and warns.
        upper_regulariser: optional r(theta) -> scalar added to F (no dependence on x).
        lipschitz: optional upper bound on the Lipschitz constant of ∇ₓh (the largest Hessian
            eigenvalue over all x), a number or a callable evaluated at the current θ.  Lower
            solvers use 1/lipschitz as a step; without it they estimate it by power iteration.
        finite_sum: optional :class:`FiniteSum`, minibatch access to the lower (and upper)
            level, needed by stochastic estimators (SID).
    """

    lower_energy: EnergyFn
    upper_loss: EnergyFn
    theta: Theta
    mu: Constant = None
    upper_regulariser: Callable[[Any], Tensor] | None = None
    lipschitz: float | Callable[[], float] | None = None
    finite_sum: FiniteSum | None = None

    def __post_init__(self) -> None:
        if not callable(self.lower_energy) or not callable(self.upper_loss):
            raise BilevelError("lower_energy and upper_loss must be callables (x, theta, batch)")
        if self.mu is not None and not callable(self.mu) and not isinstance(self.mu, Tensor):
            mu = float(self.mu)
            if not math.isfinite(mu) or mu <= 0:
                raise BilevelError(
                    f"mu (strong-convexity modulus) must be a finite positive number, got {mu}"
                )
            object.__setattr__(self, "mu", mu)
        parameter_list(self.theta)  # validates theta
        if self.finite_sum is not None and not isinstance(self.finite_sum, FiniteSum):
            raise BilevelError(
                f"finite_sum must be a FiniteSum, got {type(self.finite_sum).__name__}"
            )

    @property
    def params(self) -> list[Tensor]:
        """The leaf tensors θ that hypergradients are taken with respect to."""
        return parameter_list(self.theta)

    def lipschitz_bound(self) -> float | None:
        """The stated bound on the Lipschitz constant of ∇ₓh at the current θ, if any."""
        value = self.lipschitz() if callable(self.lipschitz) else self.lipschitz
        return None if value is None else float(value)

    def mu_values(self, batch: Batch, like: Tensor) -> Tensor | None:
        """The stated μ per instance at the current θ, shape (B,) (``None`` if not stated)."""
        return evaluate_constant("mu", self.mu, self.theta, batch, like, positive=True)

    def check_inputs(self, x: Tensor, batch: Batch) -> None:
        """Validate shapes and finiteness of a lower-level point and its batch."""
        if not isinstance(x, Tensor) or x.dim() < 1:
            raise BilevelError("x must be a tensor of shape (B, ...) with B instances")
        check_finite("x", x)
        for p in self.params:
            check_finite("theta", p)
        b = batch_size_of(batch)
        if b is not None and b != x.shape[0]:
            raise BilevelError(
                f"batch has leading dimension {b} but x has {x.shape[0]} instances; every "
                "tensor in batch must have one entry per instance (put shared data in the "
                "closure instead)"
            )

    def energy(self, x: Tensor, batch: Batch) -> Tensor:
        """h(x, θ, batch) with its shape checked."""
        return _checked("lower_energy", self.lower_energy(x, self.theta, batch), x.shape[0])

    def loss(self, x: Tensor, batch: Batch) -> Tensor:
        """f(x, θ, batch) with its shape checked."""
        return _checked("upper_loss", self.upper_loss(x, self.theta, batch), x.shape[0])

    def loss_and_grad_x(self, x: Tensor, batch: Batch, leaf: bool = False) -> tuple[Tensor, Tensor]:
        """f_i(x_i) (B,) and ∇ₓf_i (B, ...) with a graph (for second derivatives).

        ``leaf=True``: ``x`` is already a leaf requiring grad and is used as is.
        Raises :class:`BilevelError` when the loss does not depend on x through autograd
        (e.g. ``x.detach()`` inside ``upper_loss``): the hypergradient would be meaningless.
        """
        with torch.enable_grad():
            xr = x if leaf else x.detach().requires_grad_(True)
            losses = self.loss(xr, batch)
            grad = None
            if losses.requires_grad:
                (grad,) = torch.autograd.grad(
                    losses.sum(), xr, create_graph=True, allow_unused=True
                )
        if grad is None:
            raise BilevelError(
                "upper_loss does not depend on x through autograd (was x detached, or the "
                "loss computed outside torch?): the upper loss must be differentiable in x"
            )
        return losses, grad


def _checked(name: str, value: Tensor, n: int) -> Tensor:
    if not isinstance(value, Tensor) or value.shape != (n,):
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise BilevelError(f"{name} must return one value per instance, shape ({n},); got {shape}")
    return value
