"""Overhead of the library's implicit hypergradient against a minimal torch.func version.

Both sides perform exactly the same iterations: K accelerated-gradient steps on the lower
level (step 1/L, strongly convex momentum, gradient restart), then M conjugate-gradient
iterations on the adjoint system, then one mixed VJP.  The library is run with a tolerance it
cannot reach, so that it too stops at the iteration caps; it additionally certifies its
result (per-instance gradient norms, one true-residual product) — that is the overhead
measured here.  The error bound is switched off on both sides.

Cases: (a) per-feature ℓ2 logistic regression on scikit-learn's breast-cancer data;
(b) a batch of 16 noisy 64×64 images with a smoothed total-variation regulariser with two
parameters (log strength, log smoothing).

Prints the median time per hypergradient of each side and their ratio, measured in one run.
Usage: python benchmarks/hypergradient_overhead.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from torch.func import grad, jvp, vjp

from bilevel import CG, BilevelProblem, Implicit, Nesterov


def logistic_case(dtype=torch.float64):
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x = torch.tensor(data.data, dtype=dtype)
    x = (x - x.mean(0)) / x.std(0)
    y = torch.tensor(data.target, dtype=dtype)
    x_tr, y_tr, x_va, y_va = x[:400], y[:400], x[400:], y[400:]
    theta = torch.full((30,), -2.0, dtype=dtype, requires_grad=True)

    def h(w, th, _):
        z = w @ x_tr.T
        ce = torch.nn.functional.softplus(z) - y_tr * z
        return ce.mean(1) + 0.5 * (torch.exp(th) * w * w).sum(1)

    def f(w, th, _):
        z = w @ x_va.T
        return (torch.nn.functional.softplus(z) - y_va * z).mean(1)

    lip = 0.25 * float(torch.linalg.matrix_norm(x_tr, ord=2)) ** 2 / 400 + math.exp(-2.0)
    mu = math.exp(-2.0)
    x0 = torch.zeros(1, 30, dtype=dtype)
    return h, f, theta, None, x0, lip, mu


def tv_case(dtype=torch.float32, n=16, size=64):
    gen = torch.Generator().manual_seed(0)
    grid = torch.linspace(0, 1, size)
    clean = ((grid[None, :, None] > 0.3) & (grid[None, None, :] < 0.6)).to(dtype)
    clean = clean + 0.5 * torch.sin(6 * grid)[None, None, :]
    clean = clean.expand(n, size, size) * torch.rand(n, 1, 1, generator=gen, dtype=dtype)
    noisy = clean + 0.1 * torch.randn(clean.shape, generator=gen, dtype=dtype)
    theta = torch.tensor([math.log(0.05), math.log(0.05)], dtype=dtype, requires_grad=True)

    def tv(x, th):
        dx = torch.diff(x, dim=-1, append=x[..., -1:])
        dy = torch.diff(x, dim=-2, append=x[..., -1:, :])
        return torch.exp(th[0]) * torch.sqrt(dx * dx + dy * dy + torch.exp(2 * th[1])).sum((1, 2))

    def h(x, th, batch):
        y, _ = batch
        return 0.5 * ((x - y) ** 2).sum((1, 2)) + tv(x, th)

    def f(x, th, batch):
        _, xc = batch
        return 0.5 * ((x - xc) ** 2).sum((1, 2))

    lip = 1.0 + 8.0 * 0.05 / 0.05
    return h, f, theta, (noisy, clean), noisy.clone(), lip, 1.0


def handwritten(h, f, theta, batch, x0, lip, mu, k_lower, m_cg):
    """Minimal torch.func implicit hypergradient: K Nesterov steps, M CG steps, one VJP."""
    th = theta.detach()

    def energy_sum(x, t):
        return h(x, t, batch).sum()

    grad_x = grad(energy_sum, argnums=0)
    beta = (math.sqrt(lip) - math.sqrt(mu)) / (math.sqrt(lip) + math.sqrt(mu))
    y, x_prev = x0, x0
    n = x0.shape[0]
    shape = (n,) + (1,) * (x0.dim() - 1)
    for _ in range(k_lower):
        g = grad_x(y, th)
        _ = torch.linalg.vector_norm(g.reshape(n, -1), dim=1)  # the stopping test
        x_new = y - g / lip
        restart = ((g * (x_new - x_prev)).reshape(n, -1).sum(1) > 0).reshape(shape)
        y_new = x_new + torch.where(restart, 0.0, beta) * (x_new - x_prev)
        x_prev, y = x_new, y_new
    x = y
    b = grad(lambda x_: f(x_, th, batch).sum())(x)

    def hvp(v):
        return jvp(lambda x_: grad_x(x_, th), (x,), (v,))[1]

    q = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = (r * r).reshape(n, -1).sum(1)
    for _ in range(m_cg):
        hp = hvp(p)
        alpha = (rs / (p * hp).reshape(n, -1).sum(1)).reshape(shape)
        q = q + alpha * p
        r = r - alpha * hp
        rs_new = (r * r).reshape(n, -1).sum(1)
        p = r + (rs_new / rs).reshape(shape) * p
        rs = rs_new
    _, pullback = vjp(lambda t: grad_x(x, t), th)
    (jtq,) = pullback(q)
    grad_theta = grad(lambda t: f(x, t, batch).mean())(th)
    return grad_theta - jtq / n


def library(h, f, theta, batch, x0, lip, mu, k_lower, m_cg):
    problem = BilevelProblem(h, f, theta, mu=mu, lipschitz=lip)
    est = Implicit(
        CG(max_iter=m_cg),
        lower_solver=Nesterov(max_iter=k_lower),
        compute_bound=False,
        warn_unconverged=False,
    )
    tiny = torch.finfo(x0.dtype).tiny
    return est(problem, batch, x0, lower_tol=tiny, adjoint_tol=tiny).grad[0]


def measure(case, k_lower, m_cg, repeats):
    args = case()
    lib = library(*args, k_lower, m_cg)
    hand = handwritten(*args, k_lower, m_cg)
    agree = float((lib - hand).norm() / hand.norm())
    times = {"library": [], "handwritten": []}
    for _ in range(repeats):
        for name, fn in (("library", library), ("handwritten", handwritten)):
            start = time.perf_counter()
            fn(*args, k_lower, m_cg)
            times[name].append(time.perf_counter() - start)
    t_lib = statistics.median(times["library"])
    t_hand = statistics.median(times["handwritten"])
    return t_lib, t_hand, agree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'case':<34} {'library':>10} {'torch.func':>11} {'ratio':>7} {'rel.diff':>9}")
    cases = [
        ("(a) logistic, breast_cancer, d=30", logistic_case, 200, 30),
        ("(b) smoothed TV, 16 x 64x64, 2 par", tv_case, 100, 30),
    ]
    for label, case, k, m in cases:
        t_lib, t_hand, agree = measure(case, k, m, args.repeats)
        print(
            f"{label:<34} {1e3 * t_lib:>8.1f}ms {1e3 * t_hand:>9.1f}ms "
            f"{t_lib / t_hand:>7.3f} {agree:>9.1e}"
        )


if __name__ == "__main__":
    main()
