"""A synthetic finite-sum bilevel problem with closed-form solutions, for tests and benchmarks.

    h_i(x, θ) = ½ xᵀA x − xᵀ(Bθ + c_i),      f_i(x) = ½‖x − t_i‖²,      i = 1, ..., n

with A symmetric positive definite (eigenvalues in [μ, L]). Then

    x̂_i(θ) = A⁻¹(Bθ + c_i),   F(θ) = (1/n) Σ_i ½‖Mθ + r_i‖²,   ∇F(θ) = Mᵀ(Mθ + r̄),

with M = A⁻¹B, r_i = A⁻¹c_i − t_i and r̄ their mean. F is a strongly convex quadratic in θ
(Hessian MᵀM) with minimiser θ* = −(MᵀM)⁻¹Mᵀr̄. The per-sample gradients Mᵀ(Mθ + r_i)
differ, so minibatch gradients are noisy. The error-bound constants are known exactly
(L_f = 1, ‖J_i‖ = ‖B‖, L_J = L_H = 0), so hypergradient bounds are certified.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from bilevel.bounds import BoundConstants
from bilevel.hypergrad import Implicit
from bilevel.linear import CG
from bilevel.lower import Nesterov
from bilevel.methods.samples import TensorSamples
from bilevel.problem import BilevelProblem

__all__ = ["QuadraticFiniteSum", "quadratic_finite_sum"]


@dataclass
class QuadraticFiniteSum:
    """The problem, its samples and closed forms (see the module docstring).

    Attributes:
        problem: the :class:`BilevelProblem` (θ is ``problem.theta``, a leaf tensor).
        samples: :class:`TensorSamples` of (c_i, t_i) with x₀ = 0.
        a, b, c, t: A (d, d), B (d, p), c (n, d), t (n, d).
        mu, lipschitz: smallest and largest eigenvalue of A.
    """

    problem: BilevelProblem
    samples: TensorSamples
    a: Tensor
    b: Tensor
    c: Tensor
    t: Tensor
    mu: float
    lipschitz: float

    @property
    def theta(self) -> Tensor:
        return self.problem.theta

    @property
    def n(self) -> int:
        return self.c.shape[0]

    def _m_r(self) -> tuple[Tensor, Tensor]:
        m = torch.linalg.solve(self.a, self.b)
        r = torch.linalg.solve(self.a, self.c.T).T - self.t
        return m, r

    def solution(self, theta: Tensor | None = None) -> Tensor:
        """x̂_i(θ) for all samples, shape (n, d)."""
        th = (self.theta if theta is None else theta).detach()
        return torch.linalg.solve(self.a, (self.b @ th).unsqueeze(1) + self.c.T).T

    def objective(self, theta: Tensor | None = None) -> float:
        """F(θ) (default: the current θ)."""
        x = self.solution(theta)
        return float(0.5 * ((x - self.t) ** 2).sum(1).mean())

    def gradient(self, theta: Tensor | None = None) -> Tensor:
        """∇F(θ) (default: the current θ)."""
        th = (self.theta if theta is None else theta).detach()
        m, r = self._m_r()
        return m.T @ (m @ th + r.mean(0))

    def minimiser(self) -> Tensor:
        """θ* = argmin F."""
        m, r = self._m_r()
        return -torch.linalg.solve(m.T @ m, m.T @ r.mean(0))

    def gradient_lipschitz(self) -> float:
        """Lipschitz constant of ∇F: ‖MᵀM‖₂."""
        m, _ = self._m_r()
        return float(torch.linalg.matrix_norm(m.T @ m, ord=2))

    def estimator(self, max_iter: int = 10_000) -> Implicit:
        """``Implicit(CG())`` with the stated Lipschitz constant and certified bound constants,
        computing the bound ω."""
        constants = BoundConstants(
            upper_grad_lipschitz=1.0,
            jacobian_norm=float(torch.linalg.matrix_norm(self.b, ord=2)),
            jacobian_lipschitz=0.0,
            hessian_lipschitz=0.0,
        )
        return Implicit(
            lower_solver=Nesterov(max_iter=max_iter, lipschitz=self.lipschitz),
            linear_solver=CG(max_iter=max_iter),
            constants=constants,
            compute_bound=True,
        )


def quadratic_finite_sum(
    n: int = 200,
    dim: int = 10,
    n_params: int = 5,
    *,
    mu: float = 1.0,
    lipschitz: float = 10.0,
    curvature: tuple[float, float] = (0.5, 2.0),
    spread: float = 1.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> QuadraticFiniteSum:
    """A random instance.

    The eigenvalues of A are spread log-uniformly over [mu, lipschitz] and those of the upper
    Hessian ∇²F = MᵀM over ``curvature`` (so ∇F is ``curvature[1]``-Lipschitz and F is
    ``curvature[0]``-strongly convex): B = A U diag(√λ) Vᵀ with U, V random orthonormal.
    c_i are standard normal, θ₀ = 0, and t_i = x̂_i(θ_true) + ``spread``·noise: the
    per-sample gradients ∇F_i(θ) = Mᵀ(Mθ + r_i) differ only through that noise, so ``spread``
    sets the minibatch gradient noise (0: every sample has the same gradient).
    """
    if n_params > dim:
        raise ValueError("n_params must not exceed dim")
    gen = torch.Generator().manual_seed(seed)

    def logspace(lo: float, hi: float, k: int) -> Tensor:
        return torch.logspace(math.log10(lo), math.log10(hi), k, dtype=dtype)

    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=dtype))
    eig = logspace(mu, lipschitz, dim)
    a = q @ torch.diag(eig) @ q.T
    a = 0.5 * (a + a.T)
    u, _ = torch.linalg.qr(torch.randn(dim, n_params, generator=gen, dtype=dtype))
    v, _ = torch.linalg.qr(torch.randn(n_params, n_params, generator=gen, dtype=dtype))
    m = u @ torch.diag(logspace(curvature[0], curvature[1], n_params).sqrt()) @ v.T
    b = a @ m
    c = torch.randn(n, dim, generator=gen, dtype=dtype)
    theta_true = torch.randn(n_params, generator=gen, dtype=dtype)
    x_true = torch.linalg.solve(a, (b @ theta_true).unsqueeze(1) + c.T).T
    t = x_true + spread * torch.randn(n, dim, generator=gen, dtype=dtype)
    theta = torch.zeros(n_params, dtype=dtype, requires_grad=True)

    def lower_energy(x: Tensor, th: Tensor, batch: tuple[Tensor, Tensor]) -> Tensor:
        return 0.5 * ((x @ a) * x).sum(1) - (x * (th @ b.T + batch[0])).sum(1)

    def upper_loss(x: Tensor, th: Tensor, batch: tuple[Tensor, Tensor]) -> Tensor:
        return 0.5 * ((x - batch[1]) ** 2).sum(1)

    problem = BilevelProblem(
        lower_energy, upper_loss, theta, mu=float(mu), lipschitz=float(lipschitz)
    )
    samples = TensorSamples((c, t), x_init=torch.zeros(n, dim, dtype=dtype))
    return QuadraticFiniteSum(
        problem=problem,
        samples=samples,
        a=a,
        b=b,
        c=c,
        t=t,
        mu=float(mu),
        lipschitz=float(lipschitz),
    )
