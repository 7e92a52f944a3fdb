"""Overhead of the library's lower solve and implicit hypergradient against minimal versions.

Per-feature ℓ2 logistic regression, h(w, θ) = mean_j softplus-loss(x_jᵀw, y_j) + ½ Σ e^θ_k w_k²
(training rows), f(w) = the same loss on validation rows, one lower-level instance:

* (a) scikit-learn's breast-cancer data, d = 30 (400 training rows);
* (b) synthetic, 20 000 × 200;
* (c) synthetic, 200 000 × 100 (``--rows-c`` makes it smaller).

K lower steps and M CG iterations: (a) 1000 and 30, (b) 100 and 30, (c) 30 and 10 (on (c) CG
reaches the float32 underflow range well before 30 iterations).

Two measurements per instance and dtype (float32 and float64), each against a minimal
PyTorch implementation doing exactly the same work, and against the same algorithm written
in JAX and jitted (``jax`` optional: its columns are skipped when it is not installed):

* **lower solve**: K accelerated-gradient steps from w = 0 (step 1/L, strongly convex
  momentum, gradient restart; K + 1 gradient evaluations; the library's stopping test at the
  iterations of ``bilevel.lower.next_check`` is repeated by the minimal version) — the library
  runs ``Nesterov(max_iter=K)`` with an unreachable tolerance;
* **hypergradient given w**: the first-derivative graph at the lower solution, ∇f, exactly M CG
  iterations (``CG(max_iter=M, fixed_iterations=True)``; it stops earlier where ‖r‖² reaches
  the underflow range, in float32 on (a) and (b), and then every version runs the iterations
  it did), one mixed VJP; the minimal version
  answers every Hessian-vector product by one backward pass through the one graph (plain
  autograd), the JAX version by ``jvp`` of ``grad`` inside one jitted function. The library's
  lower solve stops at once at w, after the one evaluation of ∇h whose graph the Hessian
  operator reuses; its error bound is off (the default), so it spends no further product.

Two minimal versions: **minimal** calls ``torch.autograd.grad`` (plain autograd), **minimal
(engine)** calls autograd's engine directly (``torch.autograd.graph._engine_run_backward``,
without ``torch.autograd.grad``'s Python argument handling, about 45 µs per call), as the
library's oracles do (:func:`bilevel.autodiff.backward`).

The library is also run with its compiled path (:mod:`bilevel.compiled`) on the instances of
``--compiled`` (default: all three): **program**, ``ProgramNesterov(max_iter=K)`` and
``ProgramHypergradient(max_iter=M)``, each one program compiled ahead of time by AOTInductor
with the loop on the device (the compile time and the number of calls after which it has
paid for itself against the eager library are printed); and on those of ``--chunks``
(default: none)
**compiled**, ``CompiledNesterov`` and ``Implicit(CompiledCG(...))``, chunks of 10 iterations
per ``torch.compile`` program.

Times are medians over ``--repeats`` interleaved repeats (library, the minimal versions,
compiled, JAX in turn, the order rotating; a call of under 50 ms right after an untimed call
of the same function), wall time and CPU time (less disturbed by other processes on a loaded
machine: of the calling thread for PyTorch, of the process for JAX, which computes in its own
threads), one thread per stack by default (the process pinned to one core: XLA otherwise
computes on a pool of one thread per core, whatever its Eigen flag; ``--cpu`` picks the
core, ``--cpu -1`` none); the compiled programs and JAX compile once before the repeats
(compile time + first run printed).
Usage: python benchmarks/hypergradient_overhead.py [--repeats 11] [--cases abc]
[--dtypes float32,float64] [--rows-c 200000] [--compiled abc] [--chunks ''] [--cpu N]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch.autograd.graph import _engine_run_backward

from bilevel import CG, BilevelProblem, Implicit, Nesterov
from bilevel.autodiff import LowerLevel
from bilevel.lower import CHECK_EVERY, next_check


def instance(name: str, dtype: torch.dtype, rows_c: int) -> dict:
    """Training/validation data, θ, the Lipschitz bound L and μ of one instance; its energies
    h, f, θ as a leaf requiring gradients and the library's problem, built once (as a
    training loop builds them), so that the timed calls do only per-call work."""
    gen = torch.Generator().manual_seed(0)
    if name == "a":
        from sklearn.datasets import load_breast_cancer

        data = load_breast_cancer()
        x = torch.tensor(data.data, dtype=torch.float64)
        x = (x - x.mean(0)) / x.std(0)
        y = torch.tensor(data.target, dtype=torch.float64)
        n_train = 400
    else:
        n, d = (20_000, 200) if name == "b" else (rows_c, 100)
        x = torch.randn(n, d, generator=gen, dtype=torch.float64)
        w_true = torch.randn(d, generator=gen, dtype=torch.float64) / math.sqrt(d)
        y = (torch.rand(n, generator=gen, dtype=torch.float64) < torch.sigmoid(x @ w_true)).double()
        n_train = n * 4 // 5
    d = x.shape[1]
    theta0 = -2.0
    lip = 0.25 * float(torch.linalg.matrix_norm(x[:n_train], ord=2)) ** 2 / n_train
    # (b), (c): X column-major for every torch side (one-vector products with X and Xᵀ are
    # 2-4× faster on it, benchmarks/layout.py); JAX then gets Xᵀ row-major, the same storage
    col = name != "a"
    inst = {
        "x_tr": _stored(x[:n_train].to(dtype), col),
        "y_tr": y[:n_train].to(dtype),
        "x_va": _stored(x[n_train:].to(dtype), col),
        "y_va": y[n_train:].to(dtype),
        "theta": torch.full((d,), theta0, dtype=dtype),
        "lip": lip + math.exp(theta0),
        "mu": math.exp(theta0),
    }
    inst["h"], inst["f"] = h, f = energies(inst)
    inst["leaf"] = theta = inst["theta"].clone().requires_grad_(True)
    inst["problem"] = BilevelProblem(h, f, theta, mu=inst["mu"], lipschitz=inst["lip"])
    return inst


def _stored(x: torch.Tensor, column_major: bool) -> torch.Tensor:
    """x stored column-major (Fortran order) or row-major."""
    return x.t().contiguous().t() if column_major else x.contiguous()


def energies(inst: dict):
    x_tr, y_tr, x_va, y_va = inst["x_tr"], inst["y_tr"], inst["x_va"], inst["y_va"]

    def h(w, th, _):
        z = F.linear(w, x_tr)
        return (F.softplus(z) - y_tr * z).mean(1) + 0.5 * (torch.exp(th) * w * w).sum(1)

    def f(w, th, _):
        z = F.linear(w, x_va)
        return (F.softplus(z) - y_va * z).mean(1)

    return h, f


# --- the library ----------------------------------------------------------------------------


def library_lower(inst: dict, k: int) -> torch.Tensor:
    theta = inst["leaf"]
    w0 = torch.zeros(1, theta.shape[0], dtype=theta.dtype)
    lower = LowerLevel(inst["problem"], None)
    sol = Nesterov(max_iter=k).solve(lower, w0, 0.0, inst["mu"])
    return sol.x


def library_hypergradient(inst: dict, w: torch.Tensor, m: int) -> torch.Tensor:
    return _library_hypergradient(inst, w, m).grad[0]


def _library_hypergradient(inst: dict, w: torch.Tensor, m: int):
    est = inst.get(("estimator", m))
    if est is None:  # one estimator per M, built once (configuration, as in a training loop)
        est = inst["estimator", m] = Implicit(
            CG(max_iter=m, fixed_iterations=True),
            lower_solver=Nesterov(max_iter=0),
            compute_bound=False,
            warn_unconverged=False,
        )
    return est(inst["problem"], None, w, lower_tol=math.inf, adjoint_tol=0.0)


# --- the library's compiled path (bilevel.compiled) -------------------------------------------


def compiled_functions(inst: dict):
    """The library's lower solve and hypergradient with compiled chunks; the energies are
    built once so that the compiled programs are reused (their cache is per energy)."""
    from bilevel.autodiff import LowerLevel
    from bilevel.compiled import CompiledCG, CompiledNesterov

    h, f = energies(inst)
    theta = inst["theta"].clone().requires_grad_(True)
    problem = BilevelProblem(h, f, theta, mu=inst["mu"], lipschitz=inst["lip"])
    w0 = torch.zeros(1, theta.shape[0], dtype=theta.dtype)

    def lower(k: int) -> torch.Tensor:
        return CompiledNesterov(max_iter=k).solve(LowerLevel(problem, None), w0, 0.0, inst["mu"]).x

    def hyper(w: torch.Tensor, m: int) -> torch.Tensor:
        est = Implicit(
            CompiledCG(max_iter=m, fixed_iterations=True),
            lower_solver=Nesterov(max_iter=0),
            compute_bound=False,
            warn_unconverged=False,
        )
        return est(problem, None, w, lower_tol=math.inf, adjoint_tol=0.0).grad[0]

    return lower, hyper


def program_functions(inst: dict, m: int):
    """The library's whole programs (``ProgramNesterov``, ``ProgramHypergradient``: one
    AOTInductor program each, the loop on the device), built once per instance."""
    from bilevel.autodiff import LowerLevel
    from bilevel.compiled import ProgramHypergradient, ProgramNesterov

    h, f = energies(inst)
    theta = inst["theta"].clone().requires_grad_(True)
    problem = BilevelProblem(h, f, theta, mu=inst["mu"], lipschitz=inst["lip"])
    w0 = torch.zeros(1, theta.shape[0], dtype=theta.dtype)
    hypergradient = ProgramHypergradient(max_iter=m)

    def lower(k: int) -> torch.Tensor:
        return ProgramNesterov(max_iter=k).solve(LowerLevel(problem, None), w0, 0.0, inst["mu"]).x

    def hyper(w: torch.Tensor) -> torch.Tensor:
        return hypergradient(problem, w).grad[0]

    return lower, hyper


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖, and 0 where both are zero (a hypergradient after M = 0 CG iterations)."""
    diff = float((a - b).norm())
    return 0.0 if diff == 0.0 else diff / float(b.norm())


# --- minimal PyTorch ------------------------------------------------------------------------


def plain_grad(out, inputs, grad_out=None, retain_graph=None, create_graph=False):
    """``torch.autograd.grad`` (plain autograd)."""
    return torch.autograd.grad(out, inputs, grad_out, retain_graph, create_graph)


def engine_grad(out, inputs, grad_out=None, retain_graph=None, create_graph=False):
    """The same backward pass by autograd's engine entry point, without the argument handling
    of ``torch.autograd.grad`` (imported once, not at every call)."""
    grad_out = torch.ones_like(out) if grad_out is None else grad_out
    retain_graph = create_graph if retain_graph is None else retain_graph
    return _engine_run_backward(
        (out,), (grad_out,), retain_graph, create_graph, inputs, False, accumulate_grad=False
    )


def minimal_lower(inst: dict, k: int, grad=plain_grad) -> torch.Tensor:
    """K Nesterov steps with plain autograd gradients; the same stopping tests."""
    h, th = inst["h"], inst["theta"]
    lip, mu = inst["lip"], inst["mu"]
    beta = (math.sqrt(lip) - math.sqrt(mu)) / (math.sqrt(lip) + math.sqrt(mu))
    y = torch.zeros(1, th.shape[0], dtype=th.dtype)
    x_prev = y
    check = 0
    for it in range(k + 1):
        yr = y.requires_grad_(True)
        (g,) = grad(h(yr, th, None).sum(), (yr,))
        y = y.detach()
        if it == check or it == k:
            check = next_check(it, CHECK_EVERY)
            if bool((torch.linalg.vector_norm(g, dim=1) <= 0.0).all()):
                break
        if it == k:
            break
        x_new = y - g / lip
        diff = x_new - x_prev
        restart = (g * diff).sum(1, keepdim=True) > 0
        y = x_new + torch.where(restart, 0.0, beta) * diff
        x_prev = x_new
    return y


def minimal_hypergradient(inst: dict, w: torch.Tensor, m: int, grad=plain_grad) -> torch.Tensor:
    """One first-derivative graph, M CG iterations by autograd HVPs, one VJP."""
    h, f, th = inst["h"], inst["f"], inst["leaf"]
    x = w.detach().requires_grad_(True)
    with torch.enable_grad():
        (g,) = grad(h(x, th, None).sum(), (x,), create_graph=True)
        (b,) = grad(f(x, th, None).sum(), (x,))
    q = torch.zeros_like(b)
    r = b
    p = r
    rr = (r * r).sum(1, keepdim=True)
    for _ in range(m):
        (hp,) = grad(g, (x,), p, retain_graph=True)
        alpha = rr / (p * hp).sum(1, keepdim=True)
        q = q + alpha * p
        r = r - alpha * hp
        rr_new = (r * r).sum(1, keepdim=True)
        p = r + (rr_new / rr) * p
        rr = rr_new
    (jtq,) = grad(g, (th,), q)
    return -jtq / w.shape[0]


# --- jitted JAX -----------------------------------------------------------------------------


def jax_functions(inst: dict, k: int, m: int):
    """Jitted JAX lower solve and hypergradient (the same algorithms), or None without JAX."""
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        return None
    jax.config.update("jax_enable_x64", True)
    dt = jnp.float64 if inst["x_tr"].dtype == torch.float64 else jnp.float32
    # column-major torch X: XLA gets Xᵀ (row-major d × n) and computes wᵀXᵀ, 1.7-2.9× faster
    # per gradient on (b) and (c) than X row-major (XLA's arrays are row-major)
    col = inst["x_tr"].stride(0) == 1 and inst["x_tr"].shape[1] > 1
    x_tr, x_va = (inst[k].t().numpy() if col else inst[k].numpy() for k in ("x_tr", "x_va"))
    x_tr, y_tr = jnp.asarray(x_tr, dt), jnp.asarray(inst["y_tr"].numpy(), dt)
    x_va, y_va = jnp.asarray(x_va, dt), jnp.asarray(inst["y_va"].numpy(), dt)
    theta = jnp.asarray(inst["theta"].numpy(), dt)
    lip, mu = inst["lip"], inst["mu"]
    beta = (math.sqrt(lip) - math.sqrt(mu)) / (math.sqrt(lip) + math.sqrt(mu))

    def h(w, th, x, y):
        z = w @ x if col else x @ w
        return jnp.mean(jax.nn.softplus(z) - y * z) + 0.5 * jnp.sum(jnp.exp(th) * w * w)

    def f(w, x, y):
        z = w @ x if col else x @ w
        return jnp.mean(jax.nn.softplus(z) - y * z)

    grad_w = jax.grad(h)

    @jax.jit  # the data are arguments, not constants folded into the program
    def lower(th, x, y):
        def step(_, state):
            yk, x_prev = state
            g = grad_w(yk, th, x, y)
            x_new = yk - g / lip
            diff = x_new - x_prev
            return x_new + jnp.where(jnp.vdot(g, diff) > 0, 0.0, beta) * diff, x_new

        w0 = jnp.zeros_like(th)
        yk, _ = jax.lax.fori_loop(0, k, step, (w0, w0))
        return yk, jnp.linalg.norm(grad_w(yk, th, x, y))

    @jax.jit
    def hypergradient(w, th, x, y, xv, yv):
        def hvp(v):
            return jax.jvp(lambda u: grad_w(u, th, x, y), (w,), (v,))[1]

        b = jax.grad(f)(w, xv, yv)
        q, _ = jax.scipy.sparse.linalg.cg(hvp, b, tol=0.0, atol=0.0, maxiter=m)
        _, pullback = jax.vjp(lambda t: grad_w(w, t, x, y), th)
        return -pullback(q)[0]

    def run_lower():
        return lower(theta, x_tr, y_tr)[0].block_until_ready()

    def run_hyper(w):
        wj = jnp.asarray(w.reshape(-1).numpy(), dt)
        return hypergradient(wj, theta, x_tr, y_tr, x_va, y_va).block_until_ready()

    return run_lower, run_hyper


# --- measurement ----------------------------------------------------------------------------


ALL = ("library", "minimal", "engine", "compiled", "program", "jax")
WARM_BELOW = 0.05
"""Seconds of CPU time below which a timed call is preceded by an untimed one."""


def timed(fn, *args, clock=time.thread_time) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one call: CPU time of the calling thread, where PyTorch
    computes with one thread (autograd's engine runs CPU graphs on the caller), or with
    ``clock=time.process_time`` of the whole process (JAX: XLA computes in its own threads,
    and idle threads of a loaded process would otherwise add their noise to every side)."""
    wall, cpu = time.perf_counter(), clock()
    fn(*args)
    return time.perf_counter() - wall, clock() - cpu


def measure(
    name: str,
    dtype: torch.dtype,
    k: int,
    m: int,
    repeats: int,
    rows_c: int,
    compiled: bool,
    chunks: bool,
) -> dict:
    inst = instance(name, dtype, rows_c)
    w_lib, w_min = library_lower(inst, k), minimal_lower(inst, k)
    lower_diff = {"minimal": relative_difference(w_lib, w_min)}
    # CG(fixed_iterations=True) stops where ‖r‖² reaches the underflow range (pᵀHp would
    # underflow), in float32 before M on (a) and (b): the others do the same number
    m = int(_library_hypergradient(inst, w_lib, m).linear.iterations[0])
    z_lib, z_min = library_hypergradient(inst, w_lib, m), minimal_hypergradient(inst, w_lib, m)
    hyper_diff = {"minimal": relative_difference(z_lib, z_min)}
    sides = {
        "lower": [
            ("library", library_lower, (inst, k)),
            ("minimal", minimal_lower, (inst, k)),
            ("engine", minimal_lower, (inst, k, engine_grad)),
        ],
        "hyper": [
            ("library", library_hypergradient, (inst, w_lib, m)),
            ("minimal", minimal_hypergradient, (inst, w_lib, m)),
            ("engine", minimal_hypergradient, (inst, w_lib, m, engine_grad)),
        ],
    }
    compile_s = {}
    if compiled:
        from bilevel.compiled import COMPILE_SECONDS

        p_lower, p_hyper = program_functions(inst, m)
        before = set(COMPILE_SECONDS)
        w_p = p_lower(k)
        compile_s["program lower"] = sum(
            v for key, v in COMPILE_SECONDS.items() if key not in before
        )
        before = set(COMPILE_SECONDS)
        z_p = p_hyper(w_lib)
        compile_s["program hyper"] = sum(
            v for key, v in COMPILE_SECONDS.items() if key not in before
        )
        lower_diff["program"] = relative_difference(w_p, w_lib)
        hyper_diff["program"] = relative_difference(z_p, z_lib)
        sides["lower"].append(("program", p_lower, (k,)))
        sides["hyper"].append(("program", p_hyper, (w_lib,)))
    if chunks:
        from bilevel.compiled import COMPILE_SECONDS

        c_lower, c_hyper = compiled_functions(inst)
        before = set(COMPILE_SECONDS)
        w_c = c_lower(k)
        compile_s["lower"] = sum(v for key, v in COMPILE_SECONDS.items() if key not in before)
        before = set(COMPILE_SECONDS)
        z_c = c_hyper(w_lib, m)
        compile_s["hyper"] = sum(v for key, v in COMPILE_SECONDS.items() if key not in before)
        lower_diff["compiled"] = relative_difference(w_c, w_lib)
        hyper_diff["compiled"] = relative_difference(z_c, z_lib)
        sides["lower"].append(("compiled", c_lower, (k,)))
        sides["hyper"].append(("compiled", c_hyper, (w_lib, m)))
    jx = jax_functions(inst, k, m)
    if jx is not None:
        start = time.perf_counter()
        jx[0]()
        jx[1](w_lib)
        compile_s["jax"] = time.perf_counter() - start
        sides["lower"].append(("jax", jx[0], ()))
        sides["hyper"].append(("jax", jx[1], (w_lib,)))
    times = {(task, side): [] for task, entries in sides.items() for side, _, _ in entries}
    # a call of under WARM_BELOW seconds is timed right after an untimed call of the same
    # function, so that it finds warm caches whatever ran before it (a few milliseconds of
    # small operations are otherwise timed partly on the previous side's cache state); the
    # order of the sides rotates from one repeat to the next
    clock = {side: time.process_time if side == "jax" else time.thread_time for side in ALL}
    short = {
        (task, side): timed(fn, *args, clock=clock[side])[1] < WARM_BELOW
        for task, entries in sides.items()
        for side, fn, args in entries
    }
    for r in range(repeats):
        for task, entries in sides.items():
            turn = r % len(entries)
            for side, fn, args in entries[turn:] + entries[:turn]:
                if short[task, side]:
                    fn(*args)
                times[task, side].append(timed(fn, *args, clock=clock[side]))
    med = {
        key: tuple(statistics.median(t[i] for t in v) for i in range(2)) for key, v in times.items()
    }
    return {
        "med": med,
        "lower_diff": lower_diff,
        "hyper_diff": hyper_diff,
        "compile": compile_s,
        "m": m,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--cpu", type=int, default=None, help="the core a one-thread run is pinned to (-1: none)"
    )
    parser.add_argument("--rows-c", type=int, default=200_000, help="rows of instance (c)")
    parser.add_argument("--cases", default="abc", help="subset of the instances a, b, c")
    parser.add_argument("--dtypes", default="float32,float64")
    parser.add_argument(
        "--compiled",
        default="abc",
        help="instances that also run bilevel.compiled's whole programs ('' for none)",
    )
    parser.add_argument(
        "--chunks", default="", help="instances that also run bilevel.compiled's chunk programs"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pinned = ""
    if args.threads == 1:  # before JAX is imported
        os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
        if args.cpu != -1:
            # XLA computes on a pool of one thread per usable core (two on a 2-core machine)
            # even without multi-threaded Eigen: the process is pinned to one core, so that
            # XLA sizes its pool to one thread and every stack computes on one core
            cpu = min(os.sched_getaffinity(0)) if args.cpu is None else args.cpu
            os.sched_setaffinity(0, {cpu})
            pinned = f", pinned to CPU {cpu}"
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s){pinned},"
        f" {args.repeats} repeats"
    )
    print(
        "medians of wall time (CPU time in brackets: of the calling thread, of the process for"
        " JAX); ratios likewise"
    )
    print("minimal: torch.autograd.grad; engine: the minimal code calling autograd's engine")
    # K lower steps and M CG iterations per instance
    plan = {"a": (1000, 30), "b": (100, 30), "c": (30, 10)}
    for name in args.cases:
        k, m = plan[name]
        for dt_name in args.dtypes.split(","):
            dtype = getattr(torch, dt_name)
            res = measure(
                name,
                dtype,
                k,
                m,
                args.repeats,
                args.rows_c,
                name in args.compiled,
                name in args.chunks,
            )
            med = res["med"]
            for task, label, diff in (
                ("lower", f"K={k}", res["lower_diff"]),
                ("hyper", f"M={m} ({res['m']} done)", res["hyper_diff"]),
            ):
                cells = [
                    f"{side} {1e3 * wall:.2f} ms ({1e3 * cpu:.2f})"
                    for (t, side), (wall, cpu) in med.items()
                    if t == task
                ]
                ratios = [
                    f"{side}/{other} {med[task, side][0] / med[task, other][0]:.3f} "
                    f"({med[task, side][1] / med[task, other][1]:.3f})"
                    for side, other in (
                        ("library", "minimal"),
                        ("library", "engine"),
                        ("library", "jax"),
                        ("compiled", "library"),
                        ("compiled", "jax"),
                        ("program", "library"),
                        ("program", "jax"),
                    )
                    if (task, side) in med and (task, other) in med
                ]
                diffs = ", ".join(f"{key} {v:.1e}" for key, v in diff.items())
                print(f"({name}) {dt_name} {task} {label}: " + "; ".join(cells))
                print(f"    {'; '.join(ratios)}; rel. diff to library: {diffs}")
            for side, seconds in res["compile"].items():
                print(f"({name}) {dt_name} compile + first run, {side}: {seconds:.2f} s")
            for task in ("lower", "hyper"):  # compile time ÷ CPU time saved per call
                if (task, "program") in med and f"program {task}" in res["compile"]:
                    saved = med[task, "library"][1] - med[task, "program"][1]
                    calls = res["compile"][f"program {task}"] / saved if saved > 0 else math.inf
                    print(f"({name}) {dt_name} program {task}: paid for after {calls:.0f} calls")
            print(flush=True)


if __name__ == "__main__":
    main()
