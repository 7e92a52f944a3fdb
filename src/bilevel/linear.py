"""Matrix-free, batched solvers for the adjoint systems of implicit differentiation.

Each solver treats ``B`` independent symmetric systems

    H_i q_i = b_i,    i = 0, ..., B - 1,

given only through products with the operators H_i (Hessian-vector products in practice).

Conventions
-----------
* The right-hand side ``b`` has shape ``(B, *event_shape)``; instance ``i`` is ``b[i]``.
* The operator is a callable ``matvec(v, index) -> H_index v``. ``index`` is a 1-D long tensor
  of instance indices into the full batch of ``B`` and ``v`` has shape
  ``(len(index), *event_shape)``; the result has the shape of ``v``. Solvers stop passing
  converged instances (CG and MINRES once at most half of their batch is active: until then a
  stopped instance rides along, masked, so that the batch and its ``index`` stay unchanged).
  Solvers pass the same ``index`` tensor between changes of their active set and never
  modify it in place, so an operator may recognise it by identity; operators must not
  modify it either (the whole batch's index is shared, :func:`instance_index`).
* All norms are per instance: the Euclidean norm over the entries of that instance.
* ``tol`` is an **absolute** tolerance on the residual norm ``‖H_i q_i − b_i‖₂`` of each
  instance: a float shared by all instances or a ``(B,)`` tensor. Its meaning does not depend
  on the batch size B nor on ``‖b_i‖``; pass ``rtol * ‖b_i‖`` explicitly for a relative
  criterion.
* Cost is reported as ``matvecs``: the number of per-instance operator applications (a call
  with ``len(index) == k`` counts ``k``).
* Device and dtype follow ``b``. Only real floating-point dtypes are supported.
* Nothing is detached: when ``b`` or the operator carries an autograd graph, the solution is
  differentiable through the unrolled iterations. Detach ``b`` for a plain adjoint solve.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor

from bilevel.problem import (
    BilevelError,
    NonFiniteError,
    NotStronglyConvexError,
    all_finite,
    check_finite,
    check_tolerance,
)

MatVec = Callable[[Tensor, Tensor], Tensor]
"""``matvec(v, index) -> H_index v``; ``v`` has shape ``(len(index), *event_shape)``."""

__all__ = [
    "CG",
    "MINRES",
    "EigenvalueEstimate",
    "FixedPoint",
    "LinearSolution",
    "RitzEstimate",
    "LinearSolver",
    "MatVec",
    "Neumann",
    "lanczos_extremes",
    "largest_eigenvalue",
]


_NO_DEFAULT = object()


class _Deferred:
    """A dataclass field that may be given as a zero-argument function, called once on first
    access (the Ritz values cost a small eigenvalue problem, and a report's other fields a
    few tensor operations, that many callers never read). ``default``: the field's default
    (none without it)."""

    def __init__(self, default: object = _NO_DEFAULT) -> None:
        self.default = default

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = "_deferred_" + name

    def __get__(self, obj: object, owner: type | None = None) -> Tensor:
        if obj is None:
            if self.default is _NO_DEFAULT:
                raise AttributeError(self.slot)  # no class-level default
            return self.default  # type: ignore[return-value]
        value = obj.__dict__[self.slot]
        if callable(value) and not isinstance(value, Tensor):
            value = value()
            obj.__dict__[self.slot] = value
        return value

    def __set__(self, obj: object, value: Tensor | Callable[[], Tensor]) -> None:
        obj.__dict__[self.slot] = value


def resolved_state(obj: object) -> dict:
    """``obj.__dict__`` with every deferred field computed (for pickling: no function in it)."""
    for cls in type(obj).__mro__:
        for name, attr in vars(cls).items():
            if isinstance(attr, _Deferred):
                getattr(obj, name)
    return obj.__dict__


@dataclass(frozen=True)
class LinearSolution:
    """Result of a batched linear solve.

    Attributes:
        solution: ``(B, *event_shape)`` approximate solutions q_i.
        residual_norm: ``(B,)`` residual norms ‖H_i q_i − b_i‖₂ of the returned solutions. How
            they are computed (recursively updated or recomputed) is stated by each solver.
        iterations: ``(B,)`` long, iterations performed for each instance.
        converged: ``(B,)`` bool, ``residual_norm <= tol``.
        matvecs: total number of per-instance operator applications, including those spent on
            the initial residual of a warm start and on step-size estimation.
        min_curvature: ``(B,)`` an upper bound on λ_min(H_i) from what the solver observed:
            the smallest Ritz value of its Krylov space for CG and MINRES (the smallest
            Rayleigh quotient over that space), ``nan`` where nothing was observed.
        krylov_steps: ``(B,)`` long, the dimension of the Krylov space behind
            ``min_curvature`` (0 where none).

    Every field but ``solution`` and ``matvecs`` may be given as a function, called on first
    access (a solver's report costs operations that many callers never read).
    """

    solution: Tensor
    residual_norm: Tensor = _Deferred()  # type: ignore[assignment]
    iterations: Tensor = _Deferred()  # type: ignore[assignment]
    converged: Tensor = _Deferred()  # type: ignore[assignment]
    matvecs: int
    min_curvature: Tensor = _Deferred()  # type: ignore[assignment]
    krylov_steps: Tensor | None = _Deferred(None)  # type: ignore[assignment]

    def __getstate__(self) -> dict:
        return resolved_state(self)


@runtime_checkable
class LinearSolver(Protocol):
    """A configured batched solver for symmetric systems H_i q_i = b_i (see module docstring)."""

    @property
    def max_iter(self) -> int: ...

    def solve(
        self, matvec: MatVec, b: Tensor, tol: float | Tensor, x0: Tensor | None = None
    ) -> LinearSolution: ...


class EigenvalueEstimate(NamedTuple):
    """Per-instance eigenvalue estimates and the products they cost.

    Attributes:
        values: ``(B,)`` estimates.
        matvecs: number of per-instance operator applications spent.
    """

    values: Tensor
    matvecs: int


# ---------------------------------------------------------------------------------------------
# helpers


def _dot(u: Tensor, v: Tensor) -> Tensor:
    """Per-instance inner products ⟨u_i, v_i⟩, shape ``(n,)``."""
    return (u * v).reshape(u.shape[0], -1).sum(-1)


def _norm(u: Tensor) -> Tensor:
    """Per-instance Euclidean norms, shape ``(n,)``."""
    return torch.linalg.vector_norm(u if u.dim() == 2 else u.reshape(u.shape[0], -1), dim=-1)


def cg_thresholds(
    rr: Tensor, b: Tensor, tol: Tensor, fixed_iterations: bool
) -> tuple[Tensor, Tensor]:
    """CG's stopping thresholds on ‖r‖², shape (n, 1), and the instances active at the start.

    An instance stops once ‖r_i‖² ≤ tol_i²·(1 − 4u) (so that ‖r_i‖ ≤ tol_i after rounding,
    u the unit roundoff) or, when that is out of reach, at the rounding floor (u‖b_i‖)²; with
    ``fixed_iterations`` only where pᵀHp could underflow (tiny/u). An instance is active at the
    start if its ‖r‖² exceeds its tolerance (``fixed_iterations``: the underflow threshold).
    """
    n = b.shape[0]
    eps = torch.finfo(b.dtype).eps
    shrink = 1.0 - 4 * eps
    tol2 = (tol * tol * shrink).reshape(n, 1)
    if fixed_iterations:
        thresh2 = torch.full_like(tol2, torch.finfo(b.dtype).tiny / eps)
        return thresh2, rr > thresh2
    floor = eps * _norm(b).reshape(n, 1)
    return torch.maximum(tol2, floor * floor * shrink), rr > tol2


def _out_of_range(rr: Tensor, r: Tensor, values: list[float] | None, what: str) -> bool:
    """Whether some ‖r_i‖² (shape (n, 1); ``values``: already read on the host) overflowed,
    or lies in the underflow range below tiny/ε while r_i ≠ 0: there ‖r‖² and pᵀHp lose
    their meaning (a residual whose squares underflow to 0 would pass as converged). Raises
    :class:`NonFiniteError` naming ``what`` if r holds NaN or an infinity (then b or the
    product is to blame, not the scale). One host read when ``values`` is None."""
    tiny, eps = _float_info(r.dtype)
    low = tiny / eps
    if values is not None:
        if all(low <= v < math.inf for v in values):
            return False
    elif bool(((rr >= low) & (rr < math.inf)).all()):
        return False
    check_finite(what, r)
    rr = rr.reshape(-1)
    return bool((~torch.isfinite(rr) | ((rr < low) & (r.abs().amax(1) > 0))).any())


def _solve_scaled(
    solver: LinearSolver,
    matvec: MatVec,
    b: Tensor,
    tol: float | Tensor,
    x0: Tensor | None,
    r: Tensor,
    matvecs: int,
) -> LinearSolution:
    """Solve H_i (q_i / s_i) = b_i / s_i with s_i = 2^e_i, the power of two of the largest
    |entry| of the initial residual r_i, and return q_i. Scaling by powers of two is exact,
    so the iterates are those of the unscaled problem wherever that one neither overflows
    nor underflows; ‖r‖² and pᵀHp of the scaled problem stay in range."""
    _, exponent = torch.frexp(r.abs().amax(1))
    s = torch.ldexp(torch.ones_like(exponent, dtype=b.dtype), exponent)  # (n,); 1 where r = 0
    tol_s = check_tolerance("tol", tol, b) / s
    x0_s = None if x0 is None else x0 / _bc(s, x0)
    out = solver.solve(matvec, b / _bc(s, b), tol_s, x0_s)
    scaled = out.solution
    return LinearSolution(
        solution=scaled * _bc(s, scaled),
        residual_norm=lambda: out.residual_norm * s,
        iterations=lambda: out.iterations,
        converged=lambda: out.converged,
        matvecs=matvecs + out.matvecs,
        min_curvature=lambda: out.min_curvature,
        krylov_steps=lambda: out.krylov_steps,
    )


def _flat(s: Tensor) -> Tensor:
    """Per-instance values ``(n,)`` from ``(n,)`` or ``(n, 1)``."""
    return s if s.dim() == 1 else s.reshape(-1)


def _bc(s: Tensor, like: Tensor) -> Tensor:
    """Broadcast per-instance scalars ``(n,)`` against ``(n, *event_shape)``."""
    return s.reshape(s.shape + (1,) * (like.dim() - 1))


def _apply(matvec: MatVec, v: Tensor, index: Tensor) -> Tensor:
    out = matvec(v, index)
    if not isinstance(out, Tensor) or out.shape != v.shape:
        raise _bad_product(v, out)
    return out


def _bad_product(v: Tensor, out: object) -> BilevelError:
    """The error for an operator whose output is not a tensor shaped like its input ``v``."""
    shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
    return BilevelError(
        f"matvec must return a tensor shaped like its input {tuple(v.shape)}; got {shape}"
    )


def _check_rhs(b: Tensor, values: bool = True) -> None:
    """Shape and dtype of ``b``, and (``values``) the finiteness of its entries."""
    if not isinstance(b, Tensor) or b.dim() < 1:
        raise BilevelError("b must be a tensor of shape (B, *event_shape)")
    if not b.is_floating_point():
        raise BilevelError(f"b must have a real floating-point dtype, got {b.dtype}")
    if values:
        check_finite("right-hand side b", b)


@functools.cache
def _float_info(dtype: torch.dtype) -> tuple[float, float]:
    """(smallest normal number, machine epsilon) of a floating-point dtype."""
    info = torch.finfo(dtype)
    return info.tiny, info.eps


@functools.lru_cache(maxsize=64)
def instance_index(n: int, device: torch.device) -> Tensor:
    """The index ``0, ..., n − 1`` of a whole batch: one shared tensor per size and device,
    so that a solver and an operator that both start from the whole batch pass the same
    object (an operator recognises it by identity, without comparing values). Never
    modified in place (see the module docstring)."""
    return torch.arange(n, device=device)


def _per_instance(name: str, value: float | Tensor, b: Tensor) -> Tensor:
    """A float or ``(B,)`` tensor as a ``(B,)`` tensor on b's device and dtype."""
    n = b.shape[0]
    t = torch.as_tensor(value, dtype=b.dtype, device=b.device).detach()
    if t.dim() == 0:
        t = t.expand(n)
    elif t.shape != (n,):
        raise BilevelError(f"{name} must be a float or a ({n},) tensor; got {tuple(t.shape)}")
    return t.clone()


def _initial(matvec: MatVec, b: Tensor, x0: Tensor | None) -> tuple[Tensor | None, Tensor, int]:
    """Warm start ``x0`` (checked, cast to b) and the initial residual ``b − H x0`` (``b``
    itself without x0: the solvers never write into it)."""
    if x0 is None:
        return None, b, 0
    if not isinstance(x0, Tensor) or x0.shape != b.shape:
        shape = tuple(x0.shape) if isinstance(x0, Tensor) else type(x0).__name__
        raise BilevelError(f"x0 must have the shape of b {tuple(b.shape)}; got {shape}")
    x0 = x0.to(dtype=b.dtype, device=b.device)
    check_finite("initial guess x0", x0)
    index = instance_index(b.shape[0], b.device)
    r = b - _apply(matvec, x0, index)
    if not all_finite(r):
        check_finite("right-hand side b", b)  # the more precise message first
        check_finite("initial residual b - H x0", r)
    return x0, r, b.shape[0]


def _check_max_iter(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BilevelError(f"{name} must be a non-negative integer, got {value!r}")


def _check_step(step: float | Tensor | None) -> None:
    if step is None or isinstance(step, Tensor):
        return
    s = float(step)
    if not math.isfinite(s) or s <= 0:
        raise BilevelError(f"step must be a finite positive number, got {step!r}")


class _FixedPointRecord:
    """Per-instance outputs of :class:`FixedPoint` (residual norm, iterations, convergence),
    filled in as instances retire from the active set."""

    def __init__(self, b: Tensor) -> None:
        n = b.shape[0]
        self.residual_norm = torch.full((n,), math.nan, dtype=b.dtype, device=b.device)
        self.iterations = torch.zeros(n, dtype=torch.long, device=b.device)
        self.converged = torch.zeros(n, dtype=torch.bool, device=b.device)
        self.min_curvature = torch.full((n,), math.nan, dtype=b.dtype, device=b.device)

    def retire(
        self, index: Tensor, residual_norm: Tensor, iterations: int, converged: bool
    ) -> None:
        self.residual_norm[index] = residual_norm
        self.iterations[index] = iterations
        self.converged[index] = converged


def _first_bad(mask: Tensor, index: Tensor) -> tuple[int, int]:
    """(position in the active set, global instance index) of the first True in ``mask``."""
    pos = int(torch.nonzero(mask)[0, 0])
    return pos, int(index[pos])


def _nonfinite_error(solver: str, instance: int, iteration: int) -> NonFiniteError:
    return NonFiniteError(
        f"{solver}: NaN or infinite value in the iterates of instance {instance} at iteration "
        f"{iteration} (check the operator / Hessian-vector product and the right-hand side)"
    )


# ---------------------------------------------------------------------------------------------
# power iteration


def largest_eigenvalue(
    matvec: MatVec,
    like: Tensor,
    iterations: int = 20,
    generator: torch.Generator | None = None,
) -> EigenvalueEstimate:
    """Batched power iteration for the dominant eigenvalue of each H_i.

    Starting from one standard normal vector shaped like an instance of ``like``
    (``(B, *event_shape)``; its device and dtype are used, its values are not), the same for
    every instance so that an instance's estimate does not depend on the batch it is in,
    repeats ``iterations`` times

        w = H v,   λ = ⟨v, w⟩,   v = w / ‖w‖     (per instance, ‖v‖ = 1)

    and returns the last Rayleigh quotients λ_i. For symmetric H_i this estimates the eigenvalue
    of largest magnitude (the largest eigenvalue when H_i is positive semi-definite) with error
    of order (λ₂/λ₁)^(2k). For positive semi-definite H_i the estimate never exceeds λ_max, so it
    is a lower bound on the Lipschitz constant of the gradient: a step 1/λ is at most a little
    longer than 1/λ_max, which is still inside the stable range (0, 2/λ_max) of gradient descent
    and Richardson iteration whenever λ > λ_max / 2.

    Returns:
        ``EigenvalueEstimate(values, matvecs)``: ``values`` has shape ``(B,)``; ``matvecs`` is
        ``B * iterations``. The named tuple unpacks as ``values, matvecs = ...``.
    """
    if not isinstance(like, Tensor) or like.dim() < 1 or not like.is_floating_point():
        raise BilevelError("like must be a real floating-point tensor of shape (B, *event_shape)")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise BilevelError(f"iterations must be a positive integer, got {iterations!r}")
    n = like.shape[0]
    index = torch.arange(n, device=like.device)
    v = _start(like, generator)
    tiny = torch.finfo(like.dtype).tiny
    values = torch.zeros(n, dtype=like.dtype, device=like.device)
    for k in range(iterations):
        w = _apply(matvec, v, index)
        values = _dot(v, w)
        wn = _norm(w)
        if not bool(torch.isfinite(wn).all() & torch.isfinite(values).all()):
            bad = ~(torch.isfinite(wn) & torch.isfinite(values))
            raise _nonfinite_error("power iteration", _first_bad(bad, index)[1], k)
        v = w / _bc(wn.clamp_min(tiny), w)
    return EigenvalueEstimate(values, n * iterations)


def _start(like: Tensor, generator: torch.Generator | None) -> Tensor:
    """A unit random vector per instance, the same for all instances (seeded by ``generator``;
    ``None`` uses a generator seeded with 0, never the global RNG)."""
    if generator is None:
        generator = torch.Generator(device=like.device).manual_seed(0)
    v = torch.randn(like.shape[1:], generator=generator, dtype=like.dtype, device=like.device)
    v = v / torch.linalg.vector_norm(v).clamp_min(torch.finfo(like.dtype).tiny)
    return v.expand(like.shape).clone()


class RitzEstimate(NamedTuple):
    """Extreme Ritz values of a Lanczos run, per instance.

    Attributes:
        smallest: ``(B,)`` smallest Ritz value θ_min ≥ λ_min(H_i).
        largest: ``(B,)`` largest Ritz value θ_max ≤ λ_max(H_i).
        residual: ``(B,)`` ‖H_i y − θ_min y‖ of the Ritz vector y of θ_min: some eigenvalue
            of H_i lies within this distance of θ_min.
        steps: ``(B,)`` long, Krylov dimension reached (smaller than ``iterations`` when the
            Krylov space became invariant, in which case the Ritz values are eigenvalues).
        matvecs: per-instance operator applications spent.
    """

    smallest: Tensor
    largest: Tensor
    residual: Tensor
    steps: Tensor
    matvecs: int


def lanczos_extremes(
    matvec: MatVec,
    like: Tensor,
    iterations: int = 30,
    generator: torch.Generator | None = None,
) -> RitzEstimate:
    """Batched Lanczos with full reorthogonalisation: the extreme Ritz values of each H_i.

    ``iterations`` steps from one seeded random start (the same for every instance) build the
    tridiagonal T_k = V_kᵀ H V_k; its eigenvalues (Ritz values) lie in [λ_min, λ_max], and the
    extreme ones converge to the extreme eigenvalues much faster than power iteration. With
    ``iterations`` ≥ the dimension they are exact (up to rounding).
    """
    if not isinstance(like, Tensor) or like.dim() < 1 or not like.is_floating_point():
        raise BilevelError("like must be a real floating-point tensor of shape (B, *event_shape)")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise BilevelError(f"iterations must be a positive integer, got {iterations!r}")
    n = like.shape[0]
    dim = like[0].numel()
    steps_max = min(iterations, dim)
    index = torch.arange(n, device=like.device)
    v = _start(like, generator).reshape(n, -1)
    basis = [v]
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    alive = torch.ones(n, dtype=torch.bool, device=like.device)
    steps = torch.zeros(n, dtype=torch.long, device=like.device)
    scale = torch.zeros(n, dtype=like.dtype, device=like.device)
    matvecs = 0
    for k in range(steps_max):
        w = _apply(matvec, v.reshape(like.shape), index).reshape(n, -1)
        matvecs += n
        if not bool(torch.isfinite(w).all()):
            raise _nonfinite_error("Lanczos", _first_bad(~torch.isfinite(w).all(1), index)[1], k)
        a = (v * w).sum(1)
        alphas.append(torch.where(alive, a, torch.zeros_like(a)))
        steps = steps + alive.long()
        for _ in range(2):  # full reorthogonalisation, twice is enough
            coeffs = torch.stack([(u * w).sum(1) for u in basis], 1)
            w = w - sum(coeffs[:, j : j + 1] * u for j, u in enumerate(basis))
        beta = torch.linalg.vector_norm(w, dim=1)
        scale = torch.maximum(scale, a.abs() + beta)
        alive = alive & (beta > 1e3 * torch.finfo(like.dtype).eps * scale.clamp_min(1e-300))
        betas.append(torch.where(alive, beta, torch.zeros_like(beta)))
        if k == steps_max - 1 or not bool(alive.any()):
            break
        v = torch.where(alive.unsqueeze(1), w / beta.clamp_min(1e-300).unsqueeze(1), 0.0)
        basis.append(v)
    k = len(alphas)
    diag = torch.stack(alphas, 1)
    off = torch.stack(betas[: k - 1], 1) if k > 1 else diag[:, :0]
    big = diag.abs().max(1).values + 2 * (off.abs().max(1).values if k > 1 else 0.0) + 1.0
    pad = torch.arange(k, device=like.device).unsqueeze(0) >= steps.unsqueeze(1)
    diag = torch.where(pad, big.unsqueeze(1), diag)
    t = torch.diag_embed(diag) + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
    evals, evecs = torch.linalg.eigh(t)
    smallest = evals[:, 0]
    largest = torch.where(pad, -math.inf, diag).max(1).values
    largest = torch.maximum(largest, torch.where(pad, -math.inf, evals).max(1).values)
    last = evecs[index, steps - 1, 0].abs()
    residual = torch.stack(betas, 1)[index, steps - 1] * last
    return RitzEstimate(smallest, largest, residual, steps, matvecs)


RITZ_STEPS = 64
"""Krylov steps of CG and MINRES whose coefficients are kept for the Ritz values."""

CHECK_EVERY_ACCELERATOR = 8
"""Iterations between host synchronisations of CG and MINRES on an accelerator by default."""


def _check_every(value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise BilevelError(f"check_every must be None or a positive integer, got {value!r}")


def _every(check_every: int | None, like: Tensor) -> int:
    """Iterations between host synchronisations: ``check_every``, or by default 1 on the CPU
    (where reading a flag costs no synchronisation) and ``CHECK_EVERY_ACCELERATOR`` elsewhere
    (``like``: a tensor on the solver's device)."""
    if check_every is not None:
        return check_every
    return 1 if like.is_cpu else CHECK_EVERY_ACCELERATOR


def tridiagonal_smallest(diag: Tensor, off: Tensor, steps: Tensor) -> Tensor:
    """Smallest eigenvalue of per-instance symmetric tridiagonals (B, k) / (B, k − 1) using
    only the leading ``steps[i]`` rows of instance i (``nan`` where ``steps`` is 0)."""
    n, k = diag.shape
    if k == 0:
        return torch.full((n,), math.nan, dtype=diag.dtype, device=diag.device)
    pad = torch.arange(k, device=diag.device).unsqueeze(0) >= steps.unsqueeze(1)
    finite = torch.where(pad, 0.0, torch.nan_to_num(diag, nan=0.0, posinf=0.0, neginf=0.0))
    offs = torch.nan_to_num(off, nan=0.0, posinf=0.0, neginf=0.0)
    if k > 1:
        offs = torch.where(pad[:, 1:], 0.0, offs)
    big = finite.abs().max(1).values + 2 * (offs.abs().max(1).values if k > 1 else 0) + 1.0
    d = torch.where(pad, big.unsqueeze(1), finite)
    t = torch.diag_embed(d)
    if k > 1:
        t = t + torch.diag_embed(offs, 1) + torch.diag_embed(offs, -1)
    low = torch.linalg.eigvalsh(t)[:, 0]
    return torch.where(steps > 0, low, torch.full_like(low, math.nan))


class _Batch:
    """The instances a Krylov solver iterates on, with per-instance state as ``(m, 1)`` columns.

    Instances that stop are *frozen* in place (their step lengths masked to zero) while more
    than half of the batch is active; the batch is compacted to the active instances only when
    at most half remain, so the operator is called with the same ``index`` object between
    compactions. ``iters`` counts each instance's own iterations; the products spent on frozen
    instances are counted in ``matvecs`` (never in ``iterations``).
    """

    def __init__(
        self,
        b: Tensor,
        rnorm: Tensor | Callable[[], Tensor],
        tol: float | Tensor,
        x: Tensor | None,
    ) -> None:
        """``rnorm``: the initial residual norms (B,), or a function that computes them when
        first needed (a solve in which the whole batch iterates to the end never needs
        them); ``x``: the starting point (None: zero)."""
        n = b.shape[0]
        self.shape = b.shape
        self.out = b.new_zeros(n, math.prod(b.shape[1:])) if x is None else x.reshape(n, -1).clone()
        self._rnorm0 = rnorm
        self.residual_norm: Tensor | None = None  # set by record
        self.iterations: Tensor | None = None
        self.tol = tol
        self.index = instance_index(n, b.device)
        self.hist: list[tuple[Tensor, Tensor, Tensor]] = []
        self.chunk: list[tuple[Tensor, ...]] = []

    def record(self, index: Tensor, x: Tensor, rnorm: Tensor, iters: Tensor) -> None:
        """Write the current set's solutions, residual norms and iteration counts."""
        if index is self.index:  # the whole batch, in order
            self.out, self.residual_norm, self.iterations = x, _flat(rnorm), _flat(iters)
            return
        if self.residual_norm is None:  # a part: the others keep their initial state
            r0 = self._rnorm0
            self.residual_norm = (r0 if isinstance(r0, Tensor) else r0()).reshape(-1).clone()
            n = self.residual_norm.shape[0]
            self.iterations = torch.zeros(n, dtype=torch.long, device=self.out.device)
        if x is not self.out:
            self.out[index] = x
        self.residual_norm[index] = rnorm.reshape(-1)
        self.iterations[index] = iters.reshape(-1)

    def coefficients(self, index: Tensor, diag: Tensor, off: Tensor) -> None:
        if len(self.hist) < RITZ_STEPS:
            self.hist.append((index, diag, off))

    def rows(self, which: int) -> Tensor:
        """The kept coefficients as a ``(B, k)`` table, ``nan`` for instances not in a step."""
        n = self.shape[0]
        cols = []
        for index, *values in self.hist:
            v = values[which].reshape(-1)
            if index.numel() != n:
                row = torch.full((n,), math.nan, dtype=v.dtype, device=v.device)
                row[index] = v
                v = row
            cols.append(v)
        return torch.stack(cols, 1)

    def solution(
        self, matvecs: int, tridiagonal: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
    ) -> LinearSolution:
        """The result; ``min_curvature`` is computed on first access, from the Lanczos
        tridiagonal (diagonal, off-diagonal) that ``tridiagonal`` builds from the kept
        coefficient tables."""
        residual_norm, iterations = self.residual_norm, self.iterations
        assert residual_norm is not None and iterations is not None  # recorded
        kept = len(self.hist)

        def steps() -> Tensor:
            return torch.clamp(iterations, max=kept)

        def curvature() -> Tensor:
            if not self.hist:
                n, like = iterations.shape[0], self.out
                return torch.full((n,), math.nan, dtype=like.dtype, device=like.device)
            diag, off = tridiagonal(self.rows(0), self.rows(1))
            return tridiagonal_smallest(diag, off, steps())

        out = self.out
        return LinearSolution(
            out if out.shape == self.shape else out.reshape(self.shape),
            residual_norm,
            iterations,
            lambda: residual_norm <= self.tol,
            matvecs,
            curvature,
            steps,
        )

    def uniform(
        self,
        x: Tensor,
        rr: Tensor,
        iterations: int,
        matvecs: int,
        tridiagonal: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
    ) -> LinearSolution:
        """The result when the whole batch ran the same ``iterations`` (a solve decided on
        the host, no instance stopped early): ``x`` (B, n) and ‖r‖² (B, 1); every field but
        the solution is computed when first read."""
        n, device, kept = self.shape[0], x.device, min(iterations, len(self.hist))

        @functools.cache
        def residual_norm() -> Tensor:
            return rr.sqrt().reshape(-1)

        def counts(value: int) -> Tensor:
            return torch.full((n,), value, dtype=torch.long, device=device)

        def curvature() -> Tensor:
            if not kept:
                return torch.full((n,), math.nan, dtype=x.dtype, device=device)
            diag, off = tridiagonal(self.rows(0), self.rows(1))
            return tridiagonal_smallest(diag, off, counts(kept))

        return LinearSolution(
            x if x.shape == self.shape else x.reshape(self.shape),
            residual_norm,
            partial(counts, iterations),
            lambda: residual_norm() <= self.tol,
            matvecs,
            curvature,
            partial(counts, kept),
        )


def _row_dots(a: Tensor, b: Tensor) -> Tensor:
    """⟨a_i, b_i⟩ for the rows of ``a`` and ``b`` (m, n), as an (m, 1) column; one row (a
    single instance in CG's inner loop) by one matrix product, one operation instead of a
    product and a sum (about half the per-operation cost at n = 30)."""
    if a.shape[0] == 1:
        return torch.mm(a, b.t())
    return (a * b).sum(1, keepdim=True)


def _cg_tridiagonal(al: Tensor, be: Tensor) -> tuple[Tensor, Tensor]:
    """The Lanczos tridiagonal from CG's α, β (Saad, Iterative Methods §6.7.3)."""
    diag = 1.0 / al
    diag[:, 1:] = diag[:, 1:] + be[:, :-1] / al[:, :-1]
    return diag, be[:, :-1].clamp_min(0.0).sqrt() / al[:, :-1]


def _minres_tridiagonal(al: Tensor, be: Tensor) -> tuple[Tensor, Tensor]:
    """MINRES's Lanczos tridiagonal itself: diagonal α_k, off-diagonal β_{k+1}."""
    return al, be[:, :-1]


def _step_sizes(
    matvec: MatVec,
    b: Tensor,
    step: float | Tensor | None,
    power_iterations: int,
    seed: int | None,
    solver: str,
) -> tuple[Tensor, int]:
    """Per-instance step η as a ``(B,)`` tensor; 1/L from power iteration when step is None."""
    if step is not None:
        eta = _per_instance("step", step, b)
        if not bool((torch.isfinite(eta) & (eta > 0)).all()):
            raise BilevelError(f"{solver}: step must be finite and positive for every instance")
        return eta, 0
    generator = None
    if seed is not None:
        generator = torch.Generator(device=b.device)
        generator.manual_seed(seed)
    lam, cost = largest_eigenvalue(matvec, b, power_iterations, generator)
    bad = ~(lam > 0)
    if bool(bad.any()):
        pos = int(torch.nonzero(bad)[0, 0])
        raise NotStronglyConvexError(
            f"{solver}: power iteration gave a non-positive dominant eigenvalue "
            f"{float(lam[pos]):.6g} for instance {pos}; the operator is not positive definite"
        )
    return 1.0 / lam, cost


# ---------------------------------------------------------------------------------------------
# conjugate gradients


@dataclass(frozen=True)
class CG:
    """Batched conjugate gradients for symmetric positive-definite H_i.

    Per active instance, with r = b − H x and p = r initially::

        α = ‖r‖² / pᵀHp,   x ← x + α p,   r ← r − α Hp,   β = ‖r_new‖² / ‖r‖²,   p ← r + β p

    An instance stops as soon as ‖r‖ ≤ tol (absolute); an instance whose initial residual
    ``‖b_i − H x0_i‖`` is already within tol (e.g. ``b_i = 0`` without warm start) is returned
    at iteration 0 without any product. ``residual_norm`` is the recursively updated residual
    ‖r‖, which equals the true residual in exact arithmetic; in floating point the two differ
    by about machine epsilon · κ(H) · ‖b‖. An instance whose ‖r‖ falls to the rounding floor
    ε‖b‖ (ε the dtype's machine epsilon) without meeting tol stops there, unconverged: further
    iterations cannot improve the true residual, and pᵀHp would eventually underflow.

    ``fixed_iterations=True`` runs exactly ``max_iter`` iterations for every instance (for
    fixed-work comparisons, like :class:`Neumann`): neither tol nor the rounding floor stops
    an instance (tol only sets ``converged``); only a residual in the underflow range
    (‖r‖² ≤ tiny/ε, where pᵀHp would underflow to zero) does.

    The iteration runs on the device without host synchronisation: stopping is decided per
    instance on the device (a stopped instance is frozen, its step masked to zero), and the
    host reads the number of active instances every ``check_every`` iterations (None: every
    iteration on the CPU, where that costs no synchronisation, every
    ``CHECK_EVERY_ACCELERATOR`` elsewhere). With a check every iteration and the whole batch
    active, the host instead reads ‖r‖² and α of every instance and decides without masks
    (they start at the first stop). The checks for breakdown and non-finite values run over
    the iterations since the last check whenever an instance has stopped, and at the end; a
    breakdown stops its instance at once, so the error names the iteration where it
    occurred. Stopped instances stay in the batch
    (costing products, counted in ``matvecs``) while more than half of it is active, and are
    removed at the first check at which at most half remain: ``matvecs ≥ Σ iterations``
    (+ B for the initial residual when x0 is given), with equality when all instances stop
    together.

    Raises:
        NotStronglyConvexError: pᵀHp ≤ 0 for an active instance (H_i is not positive definite);
            the message names the instance, the iteration and pᵀHp.
        NonFiniteError: NaN or infinity in b, x0, an operator output or an iterate.

    ``min_curvature`` is the smallest Ritz value of the Krylov space (the Lanczos tridiagonal
    rebuilt from the CG coefficients α, β of the first ``RITZ_STEPS`` steps), an upper bound on
    λ_min(H_i) that converges to it quickly.
    """

    max_iter: int = 1000
    check_every: int | None = None
    fixed_iterations: bool = False

    def __post_init__(self) -> None:
        _check_max_iter("max_iter", self.max_iter)
        _check_every(self.check_every)

    def solve(
        self, matvec: MatVec, b: Tensor, tol: float | Tensor, x0: Tensor | None = None
    ) -> LinearSolution:
        """Solve H_i q_i = b_i for all instances to absolute residual tolerance ``tol``."""
        _check_rhs(b, values=False)  # the values: below
        # a valid number stays a number until a tensor is needed
        number = isinstance(tol, (int, float)) and not isinstance(tol, bool) and tol >= 0
        tol_all = float(tol) if number else check_tolerance("tol", tol, b)
        x0, r0, matvecs = _initial(matvec, b, x0)
        n, event = b.shape[0], tuple(b.shape[1:])
        flat = b.dim() == 2
        r = r0 if flat else r0.reshape(n, -1)
        rr = _row_dots(r, r)
        state = _Batch(b, rr.sqrt, tol_all, x0)
        every = _every(self.check_every, b)
        index = state.index
        x = state.out
        # With a check every iteration, while the whole batch is active, the host reads ‖r‖²
        # and α and decides; no masks are needed until an instance stops.
        values = [v for (v,) in rr.tolist()] if every == 1 else None
        what = "right-hand side b" if x0 is None else "initial residual b - H x0"
        if _out_of_range(rr, r, values, what):
            return _solve_scaled(self, matvec, b, tol_all, x0, r, matvecs)
        limits = self._host_limits(values, b, tol_all, x0 is None) if values else None
        host = limits is not None
        thresh2 = active = iters = zero = None  # on the host: made when an instance stops
        n_active = n
        if not host:
            if not isinstance(tol_all, Tensor):
                tol_all = check_tolerance("tol", tol_all, b)
            thresh2, active = cg_thresholds(rr, b, tol_all, self.fixed_iterations)
            n_active = int(active.sum())
            if 0 < n_active and 2 * n_active <= n:
                keep = active.reshape(-1)
                index, x, r, rr, thresh2, active = (
                    t[keep] for t in (index, x, r, rr, thresh2, active)
                )
            host = every == 1 and n_active == index.numel()
            limits = thresh2.reshape(-1).tolist() if host else []
            iters = torch.zeros_like(rr, dtype=torch.long)
            zero = rr.new_zeros(())
        verified = 0  # iterations since the last validation that the host has checked
        p = r
        chunk, hist = state.chunk, state.hist
        k = 0
        while n_active > 0 and k < self.max_iter:
            m = index.numel()
            if flat:  # the product's shape checked here (as _apply does), without a call
                hp = matvec(p, index)
                if not isinstance(hp, Tensor) or hp.shape != p.shape:
                    raise _bad_product(p, hp)
            else:
                hp = _apply(matvec, p.reshape((m,) + event), index).reshape(m, -1)
            matvecs += m
            k += 1
            php = _row_dots(p, hp)
            alpha = rr / php
            a = alpha if host else torch.where(active, alpha, zero)  # stopped ones are frozen
            x = torch.addcmul(x, a, p)
            r = torch.addcmul(r, a, hp, value=-1)
            rr_new = _row_dots(r, r)
            if host:
                # every instance continues: threshold < ‖r‖² < ∞ and 0 < α < ∞ (so pᵀHp is
                # finite and positive; NaN compares false); such an iteration needs no
                # validation, only counting
                if m == 1:  # two scalar reads, cheaper than a concatenation and a list
                    v, c = rr_new.item(), alpha.item()
                    ok = limits[0] < v < math.inf and 0 < c < math.inf
                    if not ok and v <= limits[0] and 0 < c < math.inf:
                        # a clean stop at the threshold (no breakdown: nothing to validate)
                        if len(hist) < RITZ_STEPS:
                            hist.append((index, alpha, rr_new / rr))
                        rr = rr_new
                        verified += 1
                        break
                else:
                    values = torch.cat((rr_new, alpha), 1).tolist()  # one read
                    ok = all(
                        t < v < math.inf and 0 < c < math.inf for t, (v, c) in zip(limits, values)
                    )
                if ok:
                    beta = rr_new / rr
                    p = torch.addcmul(r, beta, p)
                    if len(hist) < RITZ_STEPS:
                        hist.append((index, alpha, beta))
                    rr = rr_new
                    verified += 1
                    continue
                host = False
                if active is None:  # the first stop: the masks start
                    active = torch.ones_like(rr, dtype=torch.bool)
                    thresh2 = torch.tensor(limits, dtype=rr.dtype, device=rr.device).reshape(m, 1)
                    iters = torch.zeros_like(rr, dtype=torch.long)
                    zero = rr.new_zeros(())
            chunk.append((active, php, alpha, rr_new))
            # an instance stops at the threshold or at a breakdown (pᵀHp ≤ 0 or not finite,
            # so a ≤ 0 or NaN): active ⇔ min(‖r‖² − threshold, a) > 0, NaN comparing false
            active = torch.minimum(rr_new - thresh2, a) > 0
            beta = torch.where(active, rr_new / rr, zero)
            p = torch.addcmul(r, beta, p)
            if len(hist) < RITZ_STEPS:
                hist.append((index, alpha, beta))
            rr = rr_new
            if k % every and k < self.max_iter:
                continue
            if n_active == m and k < self.max_iter and bool(active.all()):
                continue  # nothing stopped (one read, cheaper than the count)
            now = int(active.sum())
            if now == n_active and k < self.max_iter:
                continue
            iters = iters + verified + self._validate(state, index, k)
            verified = 0
            n_active = now
            if 0 < now and 2 * now <= index.numel():
                state.record(index, x, rr.sqrt(), iters)
                keep = active.reshape(-1)
                index, x, r, p, rr, thresh2, active, iters = (
                    t[keep] for t in (index, x, r, p, rr, thresh2, active, iters)
                )
                host = every == 1  # the batch is the active instances again
                limits = thresh2.reshape(-1).tolist() if host else []
        if iters is None:  # the host checked every iteration, every instance active
            return state.uniform(x, rr, verified, matvecs, _cg_tridiagonal)
        iters = iters + verified
        if chunk:
            iters = iters + self._validate(state, index, k)
        state.record(index, x, rr.sqrt(), iters)
        return state.solution(matvecs, _cg_tridiagonal)

    def _host_limits(
        self, values: list[float], b: Tensor, tol: float | Tensor, from_zero: bool
    ) -> list[float] | None:
        """The host's stopping thresholds on ‖r_i‖² (those of :func:`cg_thresholds`, in
        double precision) when every instance starts active, else None, from the values of
        ‖r_i‖² (finite and in range: :func:`_out_of_range`)."""
        tiny, eps = _float_info(b.dtype)
        if self.fixed_iterations:
            limit = tiny / eps
            return [limit] * len(values) if all(v > limit for v in values) else None
        shrink = 1.0 - 4 * eps
        if isinstance(tol, Tensor):
            tol2 = [t * t * shrink for t in tol.tolist()]
        else:
            tol2 = [tol * tol * shrink] * len(values)
        if not all(v > t for v, t in zip(values, tol2)):
            return None  # an instance starts converged: masks from the start
        norms2 = values if from_zero else (b * b).reshape(len(values), -1).sum(1).tolist()
        floor2 = eps * eps * shrink
        return [max(t, floor2 * v) for t, v in zip(tol2, norms2)]

    @staticmethod
    def _validate(state: _Batch, index: Tensor, k: int) -> Tensor:
        """Raise for the first breakdown among the iterations since the last check; return
        each instance's number of those iterations, ``(m, 1)``.

        Order within an iteration: a non-finite product, then non-positive curvature (which
        makes α infinite or negative), then non-finite iterates; earlier iterations first.
        """
        chunk = state.chunk  # entries (m, j) for j consecutive iterations
        act, php, alpha, rr = (torch.cat(t, 1) for t in zip(*chunk))
        first = k - act.shape[1] + 1
        chunk.clear()
        ok = torch.isfinite(php) & (php > 0) & torch.isfinite(alpha) & torch.isfinite(rr)
        bad = act & ~ok
        if not bool(bad.any()):
            return act.sum(1, keepdim=True)
        j = int(bad.any(0).nonzero()[0, 0])
        it = first + j
        col = bad[:, j]
        bad_product = col & ~torch.isfinite(php[:, j])
        nonpos = col & (php[:, j] <= 0)
        if bool(bad_product.any()):
            raise _nonfinite_error("CG", _first_bad(bad_product, index)[1], it)
        if bool(nonpos.any()):
            pos, inst = _first_bad(nonpos, index)
            raise NotStronglyConvexError(
                f"CG: non-positive curvature p^T H p = {float(php[pos, j]):.6g} for instance "
                f"{inst} at iteration {it}; the operator (lower-level Hessian) is not positive "
                "definite"
            )
        raise _nonfinite_error("CG", _first_bad(col, index)[1], it)


# ---------------------------------------------------------------------------------------------
# MINRES


@dataclass(frozen=True)
class MINRES:
    """Batched MINRES (Paige & Saunders, 1975) for symmetric, possibly indefinite, H_i.

    Lanczos tridiagonalisation of H_i with a QR factorisation by Givens rotations; iterate k
    minimises ‖b − H q‖ over q ∈ x0 + K_k(H, b − H x0). A warm start solves for the correction
    d = q − x0 from H d = b − H x0. Each instance stops once the residual norm is ≤ tol
    (absolute). ``residual_norm`` is MINRES's recursive estimate φ̄_k of ‖b − H q_k‖ (exact in
    exact arithmetic). ``min_curvature`` is the smallest Ritz value of the Lanczos
    tridiagonal (first ``RITZ_STEPS`` steps), an upper bound on λ_min(H_i); a negative value
    signals an indefinite operator, which MINRES solves without breaking down (nonsingular H_i).
    As in :class:`CG`, an instance whose residual estimate falls to the rounding floor ε‖b‖
    without meeting tol stops there, unconverged; ``check_every``, ``fixed_iterations``, the
    freezing of stopped instances and ``matvecs ≥ Σ iterations`` are as in :class:`CG`.

    Raises:
        NonFiniteError: NaN or infinity in b, x0, an operator output or an iterate.
    """

    max_iter: int = 1000
    check_every: int | None = None
    fixed_iterations: bool = False

    def __post_init__(self) -> None:
        _check_max_iter("max_iter", self.max_iter)
        _check_every(self.check_every)

    def solve(
        self, matvec: MatVec, b: Tensor, tol: float | Tensor, x0: Tensor | None = None
    ) -> LinearSolution:
        """Solve H_i q_i = b_i for all instances to absolute residual tolerance ``tol``."""
        _check_rhs(b)
        tol_all = check_tolerance("tol", tol, b)
        x0, r0, matvecs = _initial(matvec, b, x0)
        n, event = b.shape[0], tuple(b.shape[1:])
        eps = torch.finfo(b.dtype).eps
        r1 = r0.reshape(n, -1)
        what = "right-hand side b" if x0 is None else "initial residual b - H x0"
        if _out_of_range((r1 * r1).sum(1, keepdim=True), r1, None, what):
            return _solve_scaled(self, matvec, b, tol_all, x0, r1, matvecs)
        beta = torch.linalg.vector_norm(r1, dim=1, keepdim=True)
        state = _Batch(b, beta.reshape(-1), tol_all, x0)
        tol_c = tol_all.reshape(n, 1)
        if self.fixed_iterations:
            thresh = torch.zeros_like(tol_c)
            active = beta > 0
        else:
            thresh = torch.maximum(tol_c, eps * _norm(b).reshape(n, 1))
            active = beta > tol_c
        every = _every(self.check_every, b)
        index, x = state.index, state.out
        n_active = int(active.sum())
        if 0 < n_active and 2 * n_active <= n:
            keep = active.reshape(-1)
            index, x, r1, beta, thresh, active = (
                t[keep] for t in (index, x, r1, beta, thresh, active)
            )
        # Vectors: r1, r2 = previous two unnormalised Lanczos vectors, y = next one,
        # w, w2 = last two search directions of the solution update.
        y, r2 = r1, r1
        w = torch.zeros_like(r1)
        w2 = torch.zeros_like(r1)
        oldb = torch.zeros_like(beta)
        dbar = torch.zeros_like(beta)
        epsln = torch.zeros_like(beta)
        phibar = beta.clone()
        cs = torch.full_like(beta, -1.0)
        sn = torch.zeros_like(beta)
        iters = torch.zeros_like(beta, dtype=torch.long)
        chunk = state.chunk
        k = 0
        while n_active > 0 and k < self.max_iter:
            m = index.numel()
            v = y / beta
            y = _apply(matvec, v.reshape((m,) + event), index).reshape(m, -1)
            matvecs += m
            k += 1
            if k >= 2:
                y = y - (beta / oldb) * r1
            alfa = (v * y).sum(1, keepdim=True)
            y = y - (alfa / beta) * r2
            r1, r2 = r2, y
            oldb = beta
            beta = torch.linalg.vector_norm(y, dim=1, keepdim=True)
            state.coefficients(index, alfa, beta)

            oldeps = epsln
            delta = cs * dbar + sn * alfa
            gbar = sn * dbar - cs * alfa
            epsln = sn * beta
            dbar = -cs * beta
            gamma = torch.hypot(gbar, beta).clamp_min(eps)
            cs = gbar / gamma
            sn = beta / gamma
            phi = cs * phibar

            w1, w2 = w2, w
            w = (v - oldeps * w1 - delta * w2) / gamma
            x = torch.where(active, torch.addcmul(x, phi, w), x)
            phibar = torch.where(active, sn * phibar, phibar)
            chunk.append((active, alfa, beta, phi))
            active = phibar > thresh  # NaN stops; stopped instances keep their φ̄
            if k % every and k < self.max_iter:
                continue
            now = int(active.sum())
            if now == n_active and k < self.max_iter:
                continue
            iters = iters + self._validate(state, index, k, x)
            n_active = now
            if 0 < now and 2 * now <= index.numel():
                state.record(index, x, phibar, iters)
                keep = active.reshape(-1)
                (index, x, y, r1, r2, w, w2, iters, active, thresh) = (
                    t[keep] for t in (index, x, y, r1, r2, w, w2, iters, active, thresh)
                )
                (beta, oldb, dbar, epsln, phibar, cs, sn) = (
                    t[keep] for t in (beta, oldb, dbar, epsln, phibar, cs, sn)
                )
        if chunk:
            iters = iters + self._validate(state, index, k, x)
        state.record(index, x, phibar, iters)
        return state.solution(matvecs, _minres_tridiagonal)

    @staticmethod
    def _validate(state: _Batch, index: Tensor, k: int, x: Tensor) -> Tensor:
        """Raise for the first non-finite coefficient among the iterations since the last
        check, or for a non-finite iterate; return each instance's number of those
        iterations, ``(m, 1)``."""
        chunk = state.chunk
        act, alfa, beta, phi = (torch.cat(t, 1) for t in zip(*chunk))
        first = k - len(chunk) + 1
        chunk.clear()
        bad = act & ~(torch.isfinite(alfa) & torch.isfinite(beta) & torch.isfinite(phi))
        bad_x = ~torch.isfinite(x).all(1)
        flags = torch.stack([bad.any(), bad_x.any()]).tolist()
        if flags[0]:
            j = int(bad.any(0).nonzero()[0, 0])
            raise _nonfinite_error("MINRES", _first_bad(bad[:, j], index)[1], first + j)
        if flags[1]:
            raise _nonfinite_error("MINRES", _first_bad(bad_x, index)[1], k)
        return act.sum(1, keepdim=True)


# ---------------------------------------------------------------------------------------------
# fixed-point (Richardson) iteration and truncated Neumann series


@dataclass(frozen=True)
class FixedPoint:
    """Richardson iteration q ← q + η (b − H q) (AID-FP), from x0 or from zero.

    Converges for symmetric H_i when 0 < η_i λ_max(H_i) < 2, with error contraction factor
    max |1 − η_i λ| over the spectrum. ``step`` is η (a float or a ``(B,)`` tensor); when None,
    η_i = 1 / L_i with L_i from :func:`largest_eigenvalue` (``power_iterations`` products per
    instance, random start seeded by ``seed``; ``seed=None`` uses the global generator). Those
    products are included in ``matvecs`` but not in ``iterations``.

    Each iteration costs one product per active instance and computes the *true* residual
    b − H q of the current iterate; an instance stops when its norm is ≤ tol (absolute), so
    ``residual_norm`` is exact up to rounding. ``min_curvature`` is not observed (nan).

    Raises:
        NotStronglyConvexError: the estimated L_i is not positive (only when step is None).
        NonFiniteError: NaN or infinity in b, x0, an operator output or an iterate (a step too
            long for the spectrum makes the iteration diverge and eventually overflow).
    """

    step: float | Tensor | None = None
    max_iter: int = 1000
    power_iterations: int = 20
    seed: int | None = 0

    def __post_init__(self) -> None:
        _check_max_iter("max_iter", self.max_iter)
        _check_step(self.step)

    def solve(
        self, matvec: MatVec, b: Tensor, tol: float | Tensor, x0: Tensor | None = None
    ) -> LinearSolution:
        """Iterate until ‖b_i − H_i q_i‖ ≤ tol_i or ``max_iter`` iterations."""
        _check_rhs(b)
        tol_all = check_tolerance("tol", tol, b)
        x0, r, matvecs = _initial(matvec, b, x0)
        eta_all, cost = _step_sizes(
            matvec, b, self.step, self.power_iterations, self.seed, "FixedPoint"
        )
        matvecs += cost
        out = torch.zeros_like(b) if x0 is None else x0.clone()
        rec = _FixedPointRecord(b)

        index = torch.arange(b.shape[0], device=b.device)
        x, tol_a, eta = out, tol_all, eta_all
        k = 0
        while True:
            rnorm = _norm(r)
            done = rnorm <= tol_a
            finite = torch.isfinite(rnorm)
            flags = torch.stack([(~finite).any(), done.any()]).tolist()
            if flags[0]:
                raise _nonfinite_error("FixedPoint", _first_bad(~finite, index)[1], k)
            if flags[1]:
                gidx = index[done]
                out[gidx] = x[done]
                rec.retire(gidx, rnorm[done], k, True)
                keep = ~done
                index, tol_a, eta, x, r, rnorm = (t[keep] for t in (index, tol_a, eta, x, r, rnorm))
            if index.numel() == 0 or k >= self.max_iter:
                break
            x = x + _bc(eta, r) * r
            r = b[index] - _apply(matvec, x, index)
            matvecs += index.numel()
            k += 1

        if index.numel() > 0:
            out[index] = x
            rec.retire(index, rnorm, k, False)
        return LinearSolution(
            out, rec.residual_norm, rec.iterations, rec.converged, matvecs, rec.min_curvature
        )


@dataclass(frozen=True)
class Neumann:
    """Truncated Neumann series q = x0 + η Σ_{j<terms} (I − ηH)^j (b − H x0).

    Without x0 this is η Σ_{j<terms} (I − ηH)^j b ≈ H⁻¹ b, i.e. exactly ``terms`` Richardson
    steps from zero (from x0 when given). The number of terms is fixed: ``tol`` does not stop
    the computation, it only sets ``converged = residual_norm <= tol``. The residual
    b − H q = (I − ηH)^terms (b − H x0) is obtained by the same recursion, so the solve costs
    ``terms`` products per instance (+1 for the initial residual with x0, + power iterations
    when ``step`` is None, see :class:`FixedPoint`); ``iterations`` is ``terms``.
    ``residual_norm`` is this recursively computed residual (exact in exact arithmetic).
    ``max_iter`` is an alias of ``terms``. ``min_curvature`` is not observed (nan).
    """

    terms: int = 20
    step: float | Tensor | None = None
    power_iterations: int = 20
    seed: int | None = 0

    def __post_init__(self) -> None:
        _check_max_iter("terms", self.terms)
        _check_step(self.step)

    @property
    def max_iter(self) -> int:
        return self.terms

    def solve(
        self, matvec: MatVec, b: Tensor, tol: float | Tensor, x0: Tensor | None = None
    ) -> LinearSolution:
        """Sum ``terms`` terms of the series for every instance."""
        _check_rhs(b)
        tol_all = check_tolerance("tol", tol, b)
        x0, t, matvecs = _initial(matvec, b, x0)
        eta, cost = _step_sizes(matvec, b, self.step, self.power_iterations, self.seed, "Neumann")
        matvecs += cost
        n = b.shape[0]
        index = torch.arange(n, device=b.device)
        eta_b = _bc(eta, b)
        acc = torch.zeros_like(b)
        for j in range(self.terms):
            acc = acc + t
            t = t - eta_b * _apply(matvec, t, index)
            matvecs += n
            tn = _norm(t)
            if not bool(torch.isfinite(tn).all()):
                raise _nonfinite_error("Neumann", _first_bad(~torch.isfinite(tn), index)[1], j)
        q = eta_b * acc if x0 is None else x0 + eta_b * acc
        rnorm = _norm(t)
        return LinearSolution(
            solution=q,
            residual_norm=rnorm,
            iterations=torch.full((n,), self.terms, dtype=torch.long, device=b.device),
            converged=rnorm <= tol_all,
            matvecs=matvecs,
            min_curvature=torch.full((n,), math.nan, dtype=b.dtype, device=b.device),
        )
