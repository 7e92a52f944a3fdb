"""The step of a method on θ: ``torch.optim`` optimisers by name or factory, projections, and
θ snapshots (detached copies restored in place)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from bilevel.problem import BilevelError, BilevelProblem, Theta

__all__ = [
    "OPTIMIZERS",
    "OptimizerFactory",
    "Projection",
    "all_finite",
    "apply_projection",
    "check_optimizer_spec",
    "load_params",
    "make_optimizer",
    "snapshot",
]

#: ``projection(theta)``: called under ``torch.no_grad()`` after every step. It either modifies
#: the parameters in place and returns None, or returns the projected parameters (a tensor or a
#: list of tensors in the order of ``problem.params``), which are copied into them.
Projection = Callable[[Theta], Any]

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
