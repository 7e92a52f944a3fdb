"""Compiled solvers for small problems: chunks of iterations, and whole programs.

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

Whole programs (:class:`ProgramNesterov`, :class:`ProgramHypergradient`) go further: the
whole lower solve, or the whole hypergradient at a given x (∇f, CG, the mixed VJP), is ONE
program. The energies' ``torch.func`` derivatives are traced to ATen graphs, the loop is a
``while_loop`` operator (a few iterations per pass, not the whole loop unrolled; the stopping
test on the device), and ``torch.export`` and AOTInductor compile the whole into one C++
function, which runs without Dynamo's guards or inductor's Python wrapper per call and reads
the host once. Compiling one takes tens of seconds to a minute; with every stack on one
core, on breast cancer (d = 30) a call then takes 0.8–1.7 times the CPU time of the same
algorithm jitted in JAX, on logistic regression with 20 000 × 200 and 200 000 × 100 data
1.03–1.70 times, 92–93 % of it in MKL's matrix–vector products (``docs/benchmarks.md``).
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

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
from bilevel.problem import BilevelError, BilevelProblem, check_tolerance

__all__ = [
    "COMPILE_SECONDS",
    "CompileWarning",
    "CompiledCG",
    "CompiledNesterov",
    "ProgramHypergradient",
    "ProgramNesterov",
    "WholeHypergradient",
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
    ``restart``; the FISTA sequence t where ``fista``, else t unused), for the instances of
    ``active`` (a mask broadcast against y); the others keep their state. Returns
    (y⁺, x⁺, t⁺)."""
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
    if fista:
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


# ---------------------------------------------------------------------------------------------
# whole programs: torch.export + AOTInductor, the loop on the device


def _flat_theta(theta: object) -> tuple[list[Tensor], Callable[[list[Tensor]], object]] | None:
    """θ's parameters (the tensors that require gradients) and a function rebuilding θ's
    structure from replacements for them (tensor, sequence or dict; other tensors of θ kept);
    None for an ``nn.Module`` (its parameters cannot be passed to a program)."""
    if isinstance(theta, Tensor):
        return [theta], lambda ps: ps[0]
    if isinstance(theta, dict):
        keys = [k for k, v in theta.items() if v.requires_grad]

        def rebuild_dict(ps: list[Tensor]) -> object:
            return {**theta, **dict(zip(keys, ps))}

        return [theta[k] for k in keys], rebuild_dict
    if isinstance(theta, (list, tuple)):
        where = [i for i, v in enumerate(theta) if v.requires_grad]

        def rebuild_seq(ps: list[Tensor]) -> object:
            items = list(theta)
            for i, v in zip(where, ps):
                items[i] = v
            return type(theta)(items)

        return [theta[i] for i in where], rebuild_seq
    return None


def _fixed_parts(theta: object) -> tuple[int, ...]:
    """The identities of θ's tensors that do not require gradients: a program reads them as
    constants, so another θ with other such tensors needs its own program (cache key)."""
    values = theta.values() if isinstance(theta, dict) else theta
    if isinstance(theta, Tensor) or not isinstance(values, (list, tuple, type({}.values()))):
        return ()
    return tuple(id(v) for v in values if isinstance(v, Tensor) and not v.requires_grad)


def _constants(graphs: list[torch.fx.GraphModule]) -> tuple[tuple[Tensor, int], ...]:
    """The tensors the traced graphs read as constants (the energies' closed-over data) with
    their version counters: a program compiled with them is stale once one is changed in
    place."""
    out = []
    for gm in graphs:
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                value = getattr(gm, node.target)
                if isinstance(value, Tensor):
                    out.append((value, value._version))
    return tuple(out)


def _trace(fn: Callable, *example: object) -> torch.fx.GraphModule:
    """``fn`` (built from ``torch.func`` transforms) as a graph of ATen operations, traced at
    distinct copies of the tensors of ``example`` (a tensor passed twice would be traced as
    one input)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    copies = torch.utils._pytree.tree_map_only(Tensor, lambda t: t.detach().clone(), example)
    return make_fx(fn)(*copies)


def _hoist(gm: torch.fx.GraphModule, varying: int = 1) -> tuple[Callable, Callable]:
    """Split a traced graph whose last ``varying`` inputs change inside a loop and whose other
    inputs do not (a Hessian-vector product v ↦ ∇²h(x) v at a fixed x) into
    (``fixed(*inputs)`` → the loop-invariant intermediates, ``apply(*intermediates, *varying)``
    → the graph's outputs, flattened). A node is computed once by ``fixed`` when it depends
    on no varying input and on some input (the energy's forward pass at x: for a linear
    model the product Xx and the loss's curvature at Xx); nodes of the constants alone
    (views of the data) are repeated in ``apply``, so that no view of a constant crosses
    into the loop. Neither ``torch.export`` nor inductor moves invariant work out of a
    ``while_loop``'s body: without the split every CG iteration would repeat the forward
    pass (one more product with X per iteration)."""
    nodes = list(gm.graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    moving = set(inputs[len(inputs) - varying :])
    rooted = set(inputs) - moving  # depends on a fixed input
    for node in nodes:
        if node.op in ("placeholder", "output"):
            continue
        if any(a in moving for a in node.all_input_nodes):
            moving.add(node)
        elif any(a in rooted for a in node.all_input_nodes):
            rooted.add(node)
    output = nodes[-1]
    needed = {a for n in nodes if n in moving or n is output for a in n.all_input_nodes}
    boundary = [n for n in nodes if n in rooted and n not in moving and n in needed]

    first, env = torch.fx.Graph(), {}
    for node in nodes:
        if node.op != "output" and node not in moving:
            env[node] = first.node_copy(node, env.__getitem__)
    first.output(tuple(env[n] for n in boundary))
    second, env2 = torch.fx.Graph(), {}
    for node in boundary:
        env2[node] = second.placeholder(node.name)
    for node in nodes:
        if node in env2:
            continue
        if node.op == "output":
            second.output(torch.fx.node.map_arg(node.args[0], env2.__getitem__))
        elif node in moving or node not in rooted:
            env2[node] = second.node_copy(node, env2.__getitem__)
    fixed, apply = torch.fx.GraphModule(gm, first), torch.fx.GraphModule(gm, second)
    for part in (fixed, apply):
        part.graph.eliminate_dead_code()
        part.recompile()
    return fixed, apply


def _loop(cond: Callable, body: Callable, carry: tuple, exported: bool) -> tuple:
    """``while cond(*carry): carry = body(*carry)``: a ``while_loop`` operator inside an
    exported program (one loop on the device, not unrolled), a Python loop eagerly."""
    if exported:
        from torch._higher_order_ops.while_loop import while_loop

        return tuple(while_loop(cond, body, carry))
    while bool(cond(*carry)):
        carry = tuple(body(*carry))
    return carry


@dataclass
class _Whole:
    """A whole program: ``run`` (the AOTInductor package, or the eager module), whether it is
    compiled, and the constants it was built with (see :func:`_constants`)."""

    run: Callable
    compiled: bool
    constants: tuple[tuple[Tensor, int], ...]

    def fresh(self) -> bool:
        return all(t._version == v for t, v in self.constants)


def _inductor_configs(dtype: torch.dtype) -> dict:
    """AOTInductor's options for a whole program computing in ``dtype``: below float64, a
    matrix product with one row on CPU (a vector–matrix product, as x ↦ Xᵀx for one
    instance) becomes a product and a sum that inductor fuses into its kernels instead of a
    call of ATen's matrix product (on breast cancer, d = 30: float32 lower solve 10.0–10.5 →
    9.0 ms, hypergradient 0.50 → 0.37 ms; in float64 it was slower, 12.3 → 18.4 ms and
    0.65–0.69 → 1.05 ms, so float64 keeps ATen's product)."""
    if dtype == torch.float64:
        return {}
    return {"post_grad_fusion_options": {"decompose_mm_pass": {}}}


_WHOLE: dict[tuple, _Whole] = {}
_PACKAGES: list[str] = []  # the temporary folder of the compiled packages


def _whole(key: tuple, build: Callable[[bool], tuple], args: tuple) -> tuple[object, bool]:
    """(result of the program under ``key`` at ``args``, whether it ran compiled).

    ``build(exported)`` returns (module, traced graphs); ``args[0]`` is the point (its dtype
    chooses :func:`_inductor_configs`). With compilation allowed (``key[1]``)
    the module is exported (``torch.export``) and compiled ahead of time by AOTInductor into
    one C++ program, whose first call (export and compilation included) is timed into
    :data:`COMPILE_SECONDS`; a failure warns (:class:`CompileWarning`) and runs the module
    eagerly from then on. A program whose constants changed in place is built again."""
    prog = _WHOLE.get(key)
    if prog is not None and prog.fresh():
        return prog.run(*args), prog.compiled
    if key[1] and key not in _EAGER:
        start = time.perf_counter()
        try:
            import tempfile

            module, graphs = build(True)
            if not _PACKAGES:
                _PACKAGES.append(tempfile.mkdtemp(prefix="bilevel-programs-"))
            path = os.path.join(_PACKAGES[0], f"program{len(COMPILE_SECONDS)}.pt2")
            with warnings.catch_warnings():  # PyTorch's own deprecations inside export
                warnings.filterwarnings("ignore", ".*LeafSpec", FutureWarning)
                exported = torch.export.export(module, args)
                path = torch._inductor.aoti_compile_and_package(
                    exported, package_path=path, inductor_configs=_inductor_configs(args[0].dtype)
                )
            run = torch._inductor.aoti_load_package(path)
            result = run(*args)
        except Exception as exc:  # no compiler, untraceable energy, ...: run eagerly
            warnings.warn(
                f"compiling {key[0]} failed ({type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''});"
                " running it eagerly",
                CompileWarning,
                stacklevel=3,
            )
            _EAGER.add(key)
        else:
            COMPILE_SECONDS[key] = time.perf_counter() - start
            _WHOLE[key] = _Whole(run, True, _constants(graphs))
            return result, True
    module, graphs = build(False)
    _WHOLE[key] = _Whole(module, False, _constants(graphs))
    return module(*args), False


def _unsupported(name: str, problem: object, batch: object) -> str | None:
    """Why ``problem`` and ``batch`` cannot be passed to a whole program, or None."""
    if _flat_theta(problem.theta) is None:
        return f"{name} needs theta as a tensor, sequence or dict of tensors"
    leaves = torch.utils._pytree.tree_leaves(batch)
    if not all(v is None or isinstance(v, Tensor) for v in leaves):
        return f"{name} needs a batch of tensors (nested in tuples, lists or dicts) or None"
    return None


def _split_batch(batch: object) -> tuple[tuple[Tensor, ...], Callable[[list], object]]:
    """The tensors of ``batch`` (tensors and None nested in tuples, lists and dicts) and a
    function rebuilding the batch from replacements for them."""
    leaves, spec = torch.utils._pytree.tree_flatten(batch)
    where = [i for i, v in enumerate(leaves) if isinstance(v, Tensor)]

    def unflatten(tensors: list) -> object:
        items = list(leaves)
        for i, v in zip(where, tensors):
            items[i] = v
        return torch.utils._pytree.tree_unflatten(items, spec)

    return tuple(leaves[i] for i in where), unflatten


class _LowerProgram(torch.nn.Module):
    """The whole lower solve: Nesterov steps until every instance meets its tolerance (tested
    after every step) or ``max_iter`` steps; an instance that stops is frozen. Each pass of
    the loop runs ``unroll`` steps (a step past ``max_iter`` changes nothing). The loop
    carries only what the steps need (each carried tensor is a fresh buffer per pass): the
    gradient at the start is evaluated in the program, and the energy at the end is the one
    the last gradient evaluation computed at the final point (a frozen instance is evaluated
    again at its point), so the solve makes no evaluation beyond the gradients; a non-finite
    gradient is found in the last one (an instance whose gradient is NaN stops, and keeps it)."""

    def __init__(self, oracle, max_iter, unroll, restart, fista, exported) -> None:
        super().__init__()
        self.oracle, self.max_iter, self.unroll = oracle, max_iter, unroll
        self.restart, self.fista, self.exported = restart, fista, exported

    def forward(self, y, t, neg_step, momentum, tol, params, leaves):
        params, leaves = list(params), list(leaves)
        e, g = self.oracle(y, params, leaves)
        gnorm = torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1)
        active = gnorm > tol
        iters = torch.zeros_like(gnorm, dtype=torch.long)
        zero = torch.zeros((), dtype=torch.long, device=y.device)
        coef = (neg_step, momentum, self.restart, self.fista)

        def cond(i, passes, y, x_prev, e, g, active, iters, *t):
            return (i < self.max_iter) & active.any()

        def body(i, passes, y, x_prev, e, g, active, iters, *t):
            t = t[0] if t else t
            for _ in range(self.unroll):
                more = i < self.max_iter
                run = active & more
                y, x_prev, t = _nesterov_step(y, x_prev, g, t, expand_as_batch(run, y), *coef)
                e, g = self.oracle(y, params, leaves)
                gnorm = torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1)
                i = i + more.long()
                iters = torch.where(run, i, iters)
                active = active & (~run | (gnorm > tol))  # NaN > tol is false: NaN stops
            return (i, passes + 1, y, x_prev, e, g, active, iters, *((t,) if self.fista else ()))

        start = (zero, zero.clone(), y.clone(), y.clone(), e, g, active, iters)  # not x0 itself
        start += (t,) if self.fista else ()
        i, passes, y, _, e, g, _, iters, *_ = _loop(cond, body, start, self.exported)
        gnorm = torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1)
        bad = ~torch.isfinite(gnorm).all()
        flags = torch.stack([i.to(y.dtype), (passes * self.unroll).to(y.dtype), bad.to(y.dtype)])
        return y, e, gnorm, iters, flags


@dataclass(frozen=True)
class ProgramNesterov:
    """:class:`~bilevel.lower.Nesterov` with a trusted Lipschitz bound as ONE compiled program.

    The steps (momentum for a stated μ, else the FISTA sequence; the gradient restart) are
    those of ``Nesterov(lipschitz=L)``; the stopping test ‖∇ₓh_i(y_i)‖ ≤ tol_i runs on the
    device after every step (an instance that meets it is frozen, and still evaluated; the
    solve ends when all have stopped or after ``max_iter`` steps), so the host reads the
    result once; the gradient at x0 is the program's first evaluation (an x0 that meets the
    tolerance is returned, as a copy, with no step; ``max_iter=0`` returns x0's report
    eagerly, as ``Nesterov`` does, with its graph kept for the Hessian). No stall test.
    Each pass of the loop runs ``unroll`` steps (fewer buffers per step; a step past
    ``max_iter`` in the last pass changes nothing but is counted in ``grad_evals``). The
    program (the energy's gradient by ``torch.func``, traced to ATen operations, inside a
    ``while_loop``) is exported and compiled ahead of time by
    AOTInductor into one C++ function per (energy, ``max_iter``, ``unroll``, shapes, dtypes,
    θ's tensors without gradients): the first
    solve compiles it (tens of seconds, recorded in :data:`COMPILE_SECONDS`); later calls
    pay no Python per step and no guards. Without L (``lipschitz`` or the problem's bound),
    for θ given as an ``nn.Module`` or a batch that is not made of tensors, the solve is
    delegated to :class:`CompiledNesterov`. ``compile=False`` runs the same program eagerly.
    The energy's closed-over tensors are compiled in as constants: one changed in place
    (detected by its version counter) makes the next solve build the program again.
    """

    max_iter: int = 10_000
    lipschitz: float | None = None
    restart: bool = True
    unroll: int = 4
    compile: bool = True

    def __post_init__(self) -> None:
        for name, least in (("max_iter", 0), ("unroll", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise BilevelError(f"{name} must be an integer ≥ {least}, got {value!r}")

    def solve(
        self, lower: LowerLevel, x0: Tensor, tol: float | Tensor, mu: float | None
    ) -> LowerSolution:
        problem, batch = lower.problem, lower.batch
        lip = self.lipschitz if self.lipschitz is not None else problem.lipschitz_bound()
        why = _unsupported("ProgramNesterov", problem, batch)
        if lip is None or why is not None:
            if why is not None:
                warnings.warn(f"{why}; solving with CompiledNesterov", CompileWarning, 2)
            chunked = CompiledNesterov(
                self.max_iter, lipschitz=lip, restart=self.restart, compile=self.compile
            )
            return chunked.solve(lower, x0, tol, mu)
        if not math.isfinite(lip) or lip <= 0:
            raise BilevelError(f"lipschitz must be finite and positive, got {lip}")
        evals0 = lower.cost.grad_evals
        tol_t = check_tolerance("lower_tol", tol, x0)
        y = x0.detach()
        if self.max_iter == 0:  # x0's report, with the graph kept for the Hessian (Nesterov's)
            energy, grad = lower.value_and_grad(y, check=False, keep=True)
            return _at_start(lower, y, energy, grad, tol_t, mu, evals0, 0)
        n = x0.shape[0]
        lip_t = torch.full((n,), float(lip), dtype=x0.dtype, device=x0.device)
        neg_step, momentum = Nesterov._coefficients(lip_t, mu, y)
        fista = momentum is None
        if fista:
            momentum = torch.zeros_like(neg_step)
        params, rebuild = _flat_theta(problem.theta)
        params = tuple(p.detach() for p in params)
        leaves, unflatten = _split_batch(batch)
        tol_n = tol_t.expand(n).contiguous()
        t = torch.ones(n, dtype=x0.dtype, device=x0.device)
        args = (y, t, neg_step, momentum, tol_n, params, leaves)
        key = _key(
            "ProgramNesterov",
            self.compile,
            problem.lower_energy,
            self.max_iter,
            self.unroll,
            self.restart,
            fista,
            _fixed_parts(problem.theta),
            _signature(y, params, batch),
        )

        def build(exported: bool) -> tuple:
            def flat_energy(x: Tensor, ps: list[Tensor], ls: list[Tensor]) -> Tensor:
                return problem.lower_energy(x, rebuild(list(ps)), unflatten(ls))

            graph = _trace(_oracle(flat_energy), y, list(params), list(leaves))
            module = _LowerProgram(graph, self.max_iter, self.unroll, self.restart, fista, exported)
            return module, [graph]

        with torch.no_grad():
            out, _ = _whole(key, build, args)
        y, e, gnorm, iters, flags = out
        _, evals, bad = (int(v) for v in flags.tolist())  # one synchronisation
        lower.cost.grad_evals += (1 + evals) * n  # the start's gradient and the steps'
        if bad:
            raise nonfinite_gradient()
        rec = _LowerRecord(x0)
        rec.x, rec.energy, rec.grad_norm, rec.iterations = y, e, gnorm, iters
        return rec.result(lower, tol_t, mu, evals0)


class WholeHypergradient(NamedTuple):
    """The result of :class:`ProgramHypergradient`: z (one tensor per parameter of θ), the
    adjoint q (B, ...) and the CG iterations each instance ran (B,)."""

    grad: list[Tensor]
    adjoint: Tensor
    iterations: Tensor


class _HyperProgram(torch.nn.Module):
    """∇f, ``max_iter`` CG iterations for H q = ∇ₓf (instances frozen in the underflow range,
    as ``CG(fixed_iterations=True)``), z = ∇_θ r + (1/B)(∇_θ Σf − ∂_θ(Σ ∇ₓh·q))."""

    def __init__(self, upper, hvp, cross, reg, max_iter, exported) -> None:
        super().__init__()
        self.upper, self.cross, self.reg = upper, cross, reg
        self.at_point, self.product = _hoist(hvp)  # the forward pass at x once, not per product
        self.max_iter, self.exported = max_iter, exported

    def forward(self, x, params, leaves):
        params, leaves = list(params), list(leaves)
        gx, gtheta = self.upper(x, params, leaves)
        n, shape = x.shape[0], x.shape
        b = gx.reshape(n, -1)
        rr = (b * b).sum(1, keepdim=True)
        info = torch.finfo(x.dtype)
        thresh2 = torch.full_like(rr, info.tiny / info.eps)
        zero = torch.zeros((), dtype=torch.long, device=x.device)
        start = (zero, torch.zeros_like(b), b.clone(), b.clone(), rr, rr > thresh2)
        iters = torch.zeros_like(rr, dtype=torch.long)
        bad = torch.zeros((), dtype=torch.bool, device=x.device)

        at_x = self.at_point(x, *params, *leaves)

        def hvp(v: Tensor) -> Tensor:
            return self.product(*at_x, v)[0]

        def cond(i, q, r, p, rr, active, iters, bad):
            return (i < self.max_iter) & active.any()

        def body(i, q, r, p, rr, active, iters, bad):
            was = active
            q, r, p, rr, active, php, alpha, _ = _cg_step(hvp, shape, q, r, p, rr, was, thresh2)
            ok = torch.isfinite(php) & (php > 0) & torch.isfinite(alpha) & torch.isfinite(rr)
            bad = bad | (was & ~ok).any()
            return i + 1, q, r, p, rr, active, iters + was.long(), bad

        out = _loop(cond, body, (*start, iters, bad), self.exported)
        q, iters, bad = out[1].reshape(shape), out[6].reshape(-1), out[7]
        jtq = self.cross(x, params, leaves, q)
        grad = [(g - j) / n for g, j in zip(gtheta, jtq)]
        if self.reg is not None:
            grad = [g + gr for g, gr in zip(grad, self.reg(params))]
        finite = torch.stack([torch.isfinite(g).all() for g in grad]).all()
        flags = torch.stack([bad, ~finite])
        return grad, q, iters, flags


@dataclass(frozen=True)
class ProgramHypergradient:
    """The implicit hypergradient at a given lower-level point x as ONE compiled program.

    z = ∇_θ r(θ) + (1/B) Σ_i (∇_θ f_i(x_i) − ∂_θ(∇ₓh_i)(x_i)ᵀ q_i), where q_i comes from
    ``max_iter`` CG iterations on ∇²ₓₓh_i(x_i) q_i = ∇ₓf_i(x_i) from q = 0 (an instance stops
    earlier only where ‖r‖² reaches the underflow range, as ``CG(fixed_iterations=True)``):
    what ``Implicit(CG(max_iter, fixed_iterations=True), lower_solver=Nesterov(max_iter=0),
    compute_bound=False)`` returns at x, without its reports (no ε, δ or bound). Gradients,
    Hessian-vector products (VJPs of ∇ₓh) and the mixed VJP are ``torch.func`` transforms of
    the energies traced to ATen operations; the CG loop is a ``while_loop``; the program is
    exported and compiled ahead of time by AOTInductor into one C++ function per (energies,
    ``max_iter``, shapes, dtypes), compiled by the first call (recorded in
    :data:`COMPILE_SECONDS`); a call then runs no Python per iteration and reads the host
    once (to raise on a breakdown or a non-finite result). θ given as an ``nn.Module`` or a
    batch that is not made of tensors and None raise :class:`~bilevel.problem.BilevelError`;
    a failed compilation warns (:class:`CompileWarning`) and runs the program eagerly, as
    does ``compile=False``. The energies' closed-over tensors are compiled in as constants:
    one changed in place (detected by its version counter) makes the next call build the
    program again.
    """

    max_iter: int = 30
    compile: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.max_iter, bool) or not isinstance(self.max_iter, int):
            raise BilevelError(f"max_iter must be an integer, got {self.max_iter!r}")
        if self.max_iter < 0:
            raise BilevelError(f"max_iter must be non-negative, got {self.max_iter}")

    def __call__(self, problem: BilevelProblem, x: Tensor, batch: object = None):
        """z at x (B, ...) for ``problem`` and ``batch``: a :class:`WholeHypergradient`."""
        why = _unsupported("ProgramHypergradient", problem, batch)
        if why is not None:
            raise BilevelError(why)
        if not isinstance(x, Tensor) or x.dim() < 1:
            raise BilevelError("x must be a tensor of shape (B, ...) with B instances")
        params, rebuild = _flat_theta(problem.theta)
        params = tuple(p.detach() for p in params)
        tensors, unflatten = _split_batch(batch)
        x = x.detach()
        args = (x, params, tensors)
        key = _key(
            "ProgramHypergradient",
            self.compile,
            problem.lower_energy,
            problem.upper_loss,
            problem.upper_regulariser,
            self.max_iter,
            _fixed_parts(problem.theta),
            _signature(x, params, batch),
        )

        def build(exported: bool) -> tuple:
            def h(u: Tensor, ps: list[Tensor], ls: list[Tensor]) -> Tensor:
                return problem.lower_energy(u, rebuild(ps), unflatten(ls)).sum()

            def f(u: Tensor, ps: list[Tensor], ls: list[Tensor]) -> Tensor:
                return problem.upper_loss(u, rebuild(ps), unflatten(ls)).sum()

            grad_h = torch.func.grad(h)

            def hvp(u, ps, ls, v):
                return torch.func.vjp(lambda w: grad_h(w, ps, ls), u)[1](v)[0]

            def cross(u, ps, ls, q):
                return torch.func.vjp(lambda t: grad_h(u, t, ls), ps)[1](q)[0]

            example = (x, list(params), list(tensors))
            graphs = [
                _trace(torch.func.grad(f, argnums=(0, 1)), *example),
                _trace(hvp, *example, x),
                _trace(cross, *example, x),
            ]
            reg = problem.upper_regulariser
            if reg is not None:
                graphs.append(_trace(torch.func.grad(lambda ps: reg(rebuild(ps))), list(params)))
            module = _HyperProgram(*graphs[:3], graphs[3] if reg else None, self.max_iter, exported)
            return module, graphs

        with torch.no_grad():
            (grad, q, iters, flags), _ = _whole(key, build, args)
        breakdown, nonfinite = (bool(v) for v in flags.tolist())  # one synchronisation
        if breakdown:
            raise BilevelError(
                "CG broke down (pᵀHp ≤ 0 or a non-finite coefficient): the Hessian of h is "
                "not positive definite at x, or x, θ or the data are not finite"
            )
        if nonfinite:
            raise BilevelError("the hypergradient is not finite (are x, θ and the data finite?)")
        return WholeHypergradient(list(grad), q, iters)
