"""Compiled solver chunks for small problems: ``torch.compile`` of whole blocks of iterations.

On small problems (tens to thousands of unknowns) eager PyTorch spends its time dispatching
operations, not computing: one accelerated-gradient step or one CG iteration is 20–40 tiny
operations. The solvers here run the same iterations as :class:`bilevel.lower.Nesterov` and
:class:`bilevel.linear.CG`, but ``chunk`` iterations at a time inside one compiled function, the
oracles (∇ₓh by ``torch.func.grad_and_value``, Hessian-vector products by ``torch.func.vjp`` of
it) traced into the same program. Between chunks the host tests every instance (one
synchronisation per chunk); an instance that stops is frozen by masks inside the chunk, so the
shapes, and hence the compiled program, never change during a solve.

Compiled programs are cached per (solver, energy, chunk length, shapes, dtypes, device); the
first call of each compiles it, and its wall time (compilation included) is recorded in
:data:`COMPILE_SECONDS`. Where compilation is unavailable (``torch.compile`` raises: no C++
compiler, an operation Dynamo cannot trace, ``BILEVEL_COMPILE=0`` in the environment, or
``compile=False``) the same chunks run eagerly with the autograd oracles (``torch.func`` is
slow outside a compiled program); a failed compilation warns once per program
(:class:`CompileWarning`, naming the reason). The last ``max_iter mod chunk`` iterations
also run eagerly. Dynamo keeps at most
``torch._dynamo.config.cache_size_limit`` (default 8) compiled variants of each chunk
function (energies, shapes, chunk lengths); beyond that it runs them eagerly, with its own
warning. Compilation costs seconds to a minute per program, so the compiled path pays off
when one program is reused many times: many solves of one problem shape (an upper-level
run) or long solves.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from bilevel.autodiff import (
    HessianOperator,
    LowerLevel,
    batch_norm,
    expand_as_batch,
    nonfinite_gradient,
)
from bilevel.linear import (
    CG,
    RITZ_STEPS,
    LinearSolution,
    MatVec,
    _Batch,
    _cg_tridiagonal,
    _check_rhs,
    _initial,
    cg_thresholds,
)
from bilevel.lower import (
    CHECK_EVERY,
    LowerSolution,
    Nesterov,
    _at_start,
    _LowerRecord,
    _Stagnation,
    _test,
)
from bilevel.problem import BilevelError, check_tolerance

__all__ = [
    "COMPILE_SECONDS",
    "CompileWarning",
    "CompiledCG",
    "CompiledNesterov",
    "compile_enabled",
]

COMPILE_SECONDS: dict[tuple, float] = {}
"""Wall time of the first call of each compiled program (compilation included), by cache key."""

_PROGRAMS: dict[tuple, Callable] = {}
_EAGER: set[tuple] = set()  # programs whose compilation failed


class CompileWarning(UserWarning):
    """A chunk could not be compiled and runs eagerly."""


def compile_enabled() -> bool:
    """Whether compilation is allowed: ``torch.compile`` exists and ``BILEVEL_COMPILE`` is not
    ``0``."""
    return hasattr(torch, "compile") and os.environ.get("BILEVEL_COMPILE", "1") != "0"


def _signature(*tensors: object) -> tuple:
    """Shapes, dtypes and devices of the tensors in nested tuples/lists/dicts (cache key)."""
    out: list = []

    def walk(obj: object) -> None:
        if isinstance(obj, Tensor):
            out.append((tuple(obj.shape), obj.dtype, obj.device.type))
        elif isinstance(obj, (tuple, list)):
            out.append(len(obj))
            for item in obj:
                walk(item)
        elif isinstance(obj, dict):
            for key in sorted(obj):
                out.append(key)
                walk(obj[key])
        else:
            out.append(type(obj).__name__)

    for t in tensors:
        walk(t)
    return tuple(out)


def _key(name: str, use_compile: bool, *parts: object) -> tuple:
    """The cache key of a program: its name and static parameters, whether it is compiled,
    and the signature of its arguments (``parts``; computed once per solve)."""
    return (name, use_compile and compile_enabled(), *parts)


def _run(full: tuple, make: Callable[[], Callable], eager: Callable, *args: object):
    """(result, whether compiled): the program ``make()`` compiled and cached under ``full``
    (see :func:`_key`) when the key allows compilation, else ``eager`` (the same iterations
    with the autograd oracles, which count their own cost). The first call of a compiled
    program is timed into :data:`COMPILE_SECONDS`; a failing compilation warns and caches
    the decision to run eagerly."""
    program = _PROGRAMS.get(full)
    if program is not None:
        return program(*args), True
    if not full[1] or full in _EAGER:
        return eager(*args), False
    compiled = torch.compile(make(), fullgraph=True, dynamic=False)
    start = time.perf_counter()
    try:
        result = compiled(*args)
    except Exception as exc:  # no compiler, untraceable operation, ...: run eagerly
        warnings.warn(
            f"compiling {full[0]} failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]});"
            " running it eagerly",
            CompileWarning,
            stacklevel=3,
        )
        _EAGER.add(full)
        return eager(*args), False
    COMPILE_SECONDS[full] = time.perf_counter() - start
    _PROGRAMS[full] = compiled
    return result, True


def _oracle(energy: Callable) -> Callable:
    """x, θ, batch ↦ (h_i(x_i) (B,), ∇ₓh(x) (B, ...)) by ``torch.func`` (traceable; slow
    eagerly, where the autograd oracles of :class:`~bilevel.autodiff.LowerLevel` are used)."""

    def total(x: Tensor, theta: object, batch: object) -> tuple[Tensor, Tensor]:
        e = energy(x, theta, batch)
        return e.sum(), e

    grad_and_value = torch.func.grad_and_value(total, has_aux=True)

    def oracle(x: Tensor, theta: object, batch: object) -> tuple[Tensor, Tensor]:
        g, (_, e) = grad_and_value(x, theta, batch)
        return e, g

    return oracle


# ---------------------------------------------------------------------------------------------
# accelerated gradient


def _nesterov_step(
    y: Tensor,
    x_prev: Tensor,
    g: Tensor,
    t: Tensor,
    active: Tensor,
    neg_step: Tensor,
    momentum: Tensor,
    restart: bool,
    fista: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """One step of :class:`~bilevel.lower.Nesterov` (trusted L) from y with ∇h(y) = g:
    x⁺ = y − g/L, y⁺ = x⁺ + β(x⁺ − x_prev) (β = 0 where gᵀ(x⁺ − x_prev) > 0 with
    ``restart``; the FISTA sequence t where ``fista``), for the instances of ``active`` (a mask
    broadcast against y); the others keep their state. Returns (y⁺, x⁺, t⁺)."""
    x_new = torch.addcmul(y, neg_step, g)
    diff = x_new - x_prev
    if fista:
        t_new = 0.5 * (1.0 + torch.sqrt(1.0 + 4.0 * t * t))
        beta = expand_as_batch((t - 1.0) / t_new, y)
    else:
        t_new, beta = t, momentum
    if restart:
        reset = (g * diff).sum(tuple(range(1, y.dim())), keepdim=True) > 0
        beta = torch.where(reset, torch.zeros_like(beta), beta)
        if fista:
            t_new = torch.where(reset.reshape(-1), torch.ones_like(t_new), t_new)
    y_new = torch.addcmul(x_new, beta, diff)
    y = torch.where(active, y_new, y)
    x_prev = torch.where(active, x_new, x_prev)
    t = torch.where(active.reshape(-1), t_new, t)
    return y, x_prev, t


def _nesterov_program(oracle: Callable, steps: int, restart: bool, fista: bool) -> Callable:
    """``steps`` iterations of :class:`~bilevel.lower.Nesterov` (trusted L) for the active
    instances, each ending with the evaluation ``oracle(y, θ, batch)`` at the new y; frozen
    instances keep their state. Also returns ‖∇h(y)‖ and the stopping test's numbers for the
    host: (any non-finite gradient, number of active instances with ‖∇h‖ ≤ tol)."""

    def program(y, x_prev, e, g, t, active, neg_step, momentum, tol, theta, batch):
        for _ in range(steps):
            y, x_prev, t = _nesterov_step(
                y, x_prev, g, t, active, neg_step, momentum, restart, fista
            )
            e, g = oracle(y, theta, batch)
        gnorm = torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1)
        done = (gnorm <= tol) & active.reshape(-1)
        flags = torch.stack([(~torch.isfinite(gnorm)).any(), done.sum()])
        return y, x_prev, e, g, t, gnorm, flags

    return program


@dataclass(frozen=True)
class CompiledNesterov:
    """:class:`~bilevel.lower.Nesterov` with a trusted Lipschitz bound, in compiled chunks.

    The iterations are those of ``Nesterov(lipschitz=L, restart=restart)`` (the same
    momentum, restart test and returned points); the stopping test (‖∇ₓh_i(y_i)‖ ≤ tol,
    finiteness, the stall test of ``stall_iterations``) runs every ``chunk`` iterations, with
    the last ``max_iter mod chunk`` iterations run eagerly. Instances are never removed from
    the batch: a stopped instance is frozen (and still evaluated, counted in ``grad_evals``).
    L is ``lipschitz`` or the problem's bound; without either the solve is delegated to
    ``Nesterov(max_iter, margin=margin)`` (an estimated L changes during the solve).
    ``compile=False`` runs the chunks eagerly with the autograd oracle (for comparison).
    """

    max_iter: int = 10_000
    lipschitz: float | None = None
    restart: bool = True
    chunk: int = CHECK_EVERY
    stall_iterations: int | None = 1000
    margin: float = 1.5
    compile: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.chunk, bool) or not isinstance(self.chunk, int) or self.chunk < 1:
            raise BilevelError(f"chunk must be a positive integer, got {self.chunk!r}")

    def solve(
        self, lower: LowerLevel, x0: Tensor, tol: float | Tensor, mu: float | None
    ) -> LowerSolution:
        lip = self.lipschitz if self.lipschitz is not None else lower.problem.lipschitz_bound()
        if lip is None:
            return Nesterov(
                self.max_iter,
                restart=self.restart,
                margin=self.margin,
                stall_iterations=self.stall_iterations,
            ).solve(lower, x0, tol, mu)
        if not math.isfinite(lip) or lip <= 0:
            raise BilevelError(f"lipschitz must be finite and positive, got {lip}")
        evals0 = lower.cost.grad_evals
        tol_t = check_tolerance("lower_tol", tol, x0)
        y = x0.detach()
        energy, grad = lower.value_and_grad(y, check=False, keep=True)
        start = _at_start(lower, y, energy, grad, tol_t, mu, evals0, self.max_iter)
        if start is not None:
            return start
        n = x0.shape[0]
        problem, batch = lower.problem, lower.batch
        lip_t = torch.full((n,), float(lip), dtype=x0.dtype, device=x0.device)
        neg_step, momentum = Nesterov._coefficients(lip_t, mu, y)
        fista = momentum is None
        if fista:
            momentum = torch.zeros_like(neg_step)
        rec = _LowerRecord(x0)
        stagnation = _Stagnation(x0, self.stall_iterations)
        active = torch.ones(n, dtype=torch.bool, device=x0.device)
        # distinct tensors (an alias among the arguments would compile a second program)
        x_prev, t = y.clone(), torch.ones(n, dtype=x0.dtype, device=x0.device)
        key = _key(
            "CompiledNesterov",
            self.compile,
            problem.lower_energy,
            self.chunk,
            self.restart,
            fista,
            _signature(y, problem.theta, batch),
        )

        def make() -> Callable:
            oracle = _oracle(problem.lower_energy)
            return _nesterov_program(oracle, self.chunk, self.restart, fista)

        def autograd(y: Tensor, theta: object, batch: object) -> tuple[Tensor, Tensor]:
            return lower.value_and_grad(y, check=False)  # counts its evaluations

        def eager(steps: int) -> Callable:
            return _nesterov_program(autograd, steps, self.restart, fista)

        it, remaining = 0, n
        mask = expand_as_batch(active, y)
        gnorm = batch_norm(grad)
        bad, n_done = 0, _test(gnorm, tol_t, None)[2]  # raises for a non-finite gradient
        with torch.no_grad():
            while True:  # the stopping test, read with the chunk's last gradient
                if bad:
                    raise nonfinite_gradient()
                done = None
                found = stagnation.update(gnorm, it)
                if found is not None and bool((found & active).any()):  # rare: a stall
                    done = (gnorm <= tol_t) | found
                    rec.stalled |= found & ~(gnorm <= tol_t) & active
                if it == self.max_iter:
                    done = active
                elif done is not None:
                    done = done & active
                elif n_done:
                    done = (gnorm <= tol_t) & active
                if done is not None:  # record the instances that stop; freeze them
                    where = expand_as_batch(done, y)
                    rec.x = torch.where(where, y, rec.x)
                    rec.energy = torch.where(done, energy, rec.energy)
                    rec.grad_norm = torch.where(done, gnorm, rec.grad_norm)
                    rec.iterations = torch.where(done, it, rec.iterations)
                    active = active & ~done
                    mask = expand_as_batch(active, y)
                    remaining = int(active.sum())
                    if not remaining:
                        break
                steps = min(self.chunk, self.max_iter - it)
                args = (y, x_prev, energy, grad, t, mask, neg_step, momentum, tol_t)
                args += (problem.theta, batch)
                if steps == self.chunk:
                    out, compiled = _run(key, make, eager(steps), *args)
                else:  # the remainder, eagerly
                    out, compiled = eager(steps)(*args), False
                y, x_prev, energy, grad, t, gnorm, flags = out
                bad, n_done = (int(v) for v in flags.tolist())  # one synchronisation
                if compiled:
                    lower.cost.grad_evals += steps * n
                it += steps
        return rec.result(lower, tol_t, mu, evals0)


# ---------------------------------------------------------------------------------------------
# conjugate gradients


def _vjp_hvp(energy: Callable) -> Callable:
    """x, θ, batch ↦ (v ↦ ∇²ₓₓh(x) v): the VJP of the gradient at x, by ``torch.func.vjp``
    (traceable). The gradient's forward pass is traced once per point and each product is
    one backward pass through it (the Hessian is symmetric and the instances independent, so
    the VJP with v_i is H_i v_i); a forward-over-reverse product (``jvp`` of the gradient)
    repeats the forward pass and took twice as long per chunk on breast cancer (d = 30)."""
    oracle = _oracle(energy)

    def at(x: Tensor, theta: object, batch: object) -> Callable[[Tensor], Tensor]:
        _, pull = torch.func.vjp(lambda u: oracle(u, theta, batch)[1], x)
        return lambda v: pull(v)[0]

    return at


def _cg_step(
    hvp: Callable[[Tensor], Tensor],
    shape: torch.Size,
    x: Tensor,
    r: Tensor,
    p: Tensor,
    rr: Tensor,
    active: Tensor,
    thresh2: Tensor,
) -> tuple[Tensor, ...]:
    """One CG iteration (as :class:`~bilevel.linear.CG`) on flattened (m, n) iterates for the
    instances of ``active`` (m, 1): α = ‖r‖²/pᵀHp, x += αp, r −= αHp, β = ‖r⁺‖²/‖r‖²; an
    instance stays active while ‖r⁺‖² > ``thresh2`` (and α > 0). ``hvp`` takes and returns
    tensors of ``shape``. Returns (x, r, p, ‖r⁺‖², active, pᵀHp, α, β)."""
    hp = hvp(p.reshape(shape)).reshape(p.shape)
    php = (p * hp).sum(1, keepdim=True)
    alpha = rr / php
    a = torch.where(active, alpha, torch.zeros_like(alpha))
    x = torch.addcmul(x, a, p)
    r = torch.addcmul(r, a, hp, value=-1)
    rr_new = (r * r).sum(1, keepdim=True)
    active = torch.minimum(rr_new - thresh2, a) > 0
    beta = torch.where(active, rr_new / rr, torch.zeros_like(rr))
    p = torch.addcmul(r, beta, p)
    return x, r, p, rr_new, active, php, alpha, beta


def _cg_program(hvp_at: Callable, steps: int) -> Callable:
    """``steps`` CG iterations (as :class:`~bilevel.linear.CG`, stopped instances frozen) with
    the products of ``hvp_at(x_h, θ, batch)`` (a function v ↦ Hv); returns the iterates and,
    per iteration, the coefficients and flags the host validates."""

    def program(x, r, p, rr, active, thresh2, x_h, theta, batch):
        shape = x_h.shape
        hvp = hvp_at(x_h, theta, batch)
        cols: list[tuple[Tensor, ...]] = []
        for _ in range(steps):
            was = active
            x, r, p, rr, active, php, alpha, beta = _cg_step(
                hvp, shape, x, r, p, rr, active, thresh2
            )
            cols.append((was, php, alpha, rr, beta))
        act, php, alpha, rr_t, beta = (torch.cat(c, 1) for c in zip(*cols))
        ok = torch.isfinite(php) & (php > 0) & torch.isfinite(alpha) & torch.isfinite(rr_t)
        flags = torch.stack([(act & ~ok).any().to(rr.dtype), active.sum().to(rr.dtype)])
        count = act.sum(1, keepdim=True)
        return x, r, p, rr, active, flags, count, act, php, alpha, rr_t, beta

    return program


def _functional(matvec: MatVec) -> HessianOperator | None:
    """The Hessian operator behind ``matvec`` when it is ``HessianOperator.matvec`` (whose
    energy can be traced), else None."""
    op = getattr(matvec, "__self__", None)
    if isinstance(op, HessianOperator) and getattr(matvec, "__name__", "") == "matvec":
        return op
    return None


@dataclass(frozen=True)
class CompiledCG:
    """:class:`~bilevel.linear.CG` in compiled chunks of ``chunk`` iterations, for the Hessian
    operators of :class:`~bilevel.hypergrad.Implicit` (``Implicit(CompiledCG())``).

    The iterations, stopping rules (``tol``, the rounding floor, ``fixed_iterations``),
    breakdown errors, reports and Ritz values are those of ``CG``; the host checks every
    ``chunk`` iterations and stopped instances stay in the batch, frozen. Hessian-vector
    products are VJPs of the lower energy's gradient traced into the program (its forward
    pass once per chunk, one backward pass per product); ``matvecs`` counts every product (a warm
    start's initial residual is one eager product). A ``matvec`` that is not a
    :class:`~bilevel.autodiff.HessianOperator`'s (a user operator) is solved by eager ``CG``.
    ``compile=False`` runs the chunks eagerly with the operator's own products.
    """

    max_iter: int = 1000
    chunk: int = 10
    fixed_iterations: bool = False
    compile: bool = True
    _eager: CG = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.chunk, bool) or not isinstance(self.chunk, int) or self.chunk < 1:
            raise BilevelError(f"chunk must be a positive integer, got {self.chunk!r}")
        eager = CG(self.max_iter, fixed_iterations=self.fixed_iterations)
        object.__setattr__(self, "_eager", eager)

    def solve(
        self, matvec: MatVec, b: Tensor, tol: float | Tensor, x0: Tensor | None = None
    ) -> LinearSolution:
        op = _functional(matvec)
        if op is None:
            return self._eager.solve(matvec, b, tol, x0)
        return self._solve(op, b, tol, x0)

    def _solve(
        self, op: HessianOperator, b: Tensor, tol: float | Tensor, x0: Tensor | None
    ) -> LinearSolution:
        _check_rhs(b)
        if b.shape != op.x_full.shape:
            raise BilevelError("b must have the shape of the Hessian operator's point")
        tol_all = check_tolerance("tol", tol, b)
        b = b.detach()

        def full(v: Tensor, index: Tensor | None = None) -> Tensor:  # counts its products
            return op.full_matvec(v)

        x0, r0, matvecs = _initial(full, b, x0)  # a warm start costs one product
        problem = op.lower.problem
        batch = op.lower.select(op.full_index)
        n = b.shape[0]
        r = r0.reshape(n, -1).detach()
        rr = (r * r).sum(1, keepdim=True)
        state = _Batch(b, rr.sqrt().reshape(-1), tol_all, None if x0 is None else x0.detach())
        thresh2, active = cg_thresholds(rr, b, tol_all, self.fixed_iterations)
        x, p = state.out, r.clone()  # distinct tensors, as in CompiledNesterov
        iters = torch.zeros_like(rr, dtype=torch.long)
        key = _key(
            "CompiledCG",
            self.compile,
            problem.lower_energy,
            self.chunk,
            _signature(op.x_full, problem.theta, batch),
        )

        def make() -> Callable:
            return _cg_program(_vjp_hvp(problem.lower_energy), self.chunk)

        def autograd(x_h: Tensor, theta: object, batch: object) -> Callable[[Tensor], Tensor]:
            return full

        def eager(steps: int) -> Callable:
            return _cg_program(autograd, steps)

        k = 0
        n_active = int(active.sum())
        with torch.no_grad():
            while k < self.max_iter and n_active:
                steps = min(self.chunk, self.max_iter - k)
                args = (x, r, p, rr, active, thresh2, op.x_full, problem.theta, batch)
                if steps == self.chunk:
                    out, compiled = _run(key, make, eager(steps), *args)
                else:  # the remainder, eagerly
                    out, compiled = eager(steps)(*args), False
                x, r, p, rr, active, flags, count, act, php, alpha, rr_t, beta = out
                matvecs += steps * n
                if compiled:
                    op.lower.cost.hvps += steps * n
                k += steps
                keep = min(steps, RITZ_STEPS - len(state.hist))
                if keep > 0:  # the coefficients of each iteration (views; one unbind each)
                    cols = zip(alpha.unbind(1)[:keep], beta.unbind(1)[:keep])
                    state.hist.extend((state.index, al, be) for al, be in cols)
                bad, n_active = (int(v) for v in flags.tolist())  # one synchronisation
                if bad:  # raises, naming the instance and iteration
                    state.chunk.append((act, php, alpha, rr_t))
                    CG._validate(state, state.index, k)
                iters = iters + count
        state.record(state.index, x, rr.sqrt(), iters)
        return state.solution(matvecs, _cg_tridiagonal)
