"""Shared fixtures: small bilevel problems with known answers."""

from __future__ import annotations

import dataclasses
import pathlib

import pytest
import torch

from bilevel import BilevelProblem

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"

torch.set_num_threads(1)  # small tensors: threads only add contention


@dataclasses.dataclass(frozen=True, eq=False)
class QuadraticProblem(BilevelProblem):
    """A problem of :func:`quadratic_problem` with its quartic weight, for the exact answer."""

    quartic: float = 1.0


def quadratic_problem(
    n_batch: int = 4,
    dim: int = 6,
    n_params: int = 3,
    seed: int = 0,
    dtype=torch.float64,
    quartic: float = 1.0,
) -> tuple[BilevelProblem, tuple, torch.Tensor]:
    """B random strongly convex quadratics in x, linear in θ.

    h_i(x) = ½ xᵀA_i x − xᵀ(M_i θ + c_i),  f_i(x) = ½‖x − t_i‖² + quartic·¼‖x‖⁴/dim.
    The eigenvalues of A_i lie in [0.5, 4.5], so μ = 0.5.
    """
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n_batch, dim, dim, generator=gen, dtype=dtype)
    eig = torch.rand(n_batch, dim, generator=gen, dtype=dtype) * 4.0 + 0.5
    basis, _ = torch.linalg.qr(q)
    a = basis @ torch.diag_embed(eig) @ basis.transpose(1, 2)
    m = torch.randn(n_batch, dim, n_params, generator=gen, dtype=dtype)
    c = torch.randn(n_batch, dim, generator=gen, dtype=dtype)
    t = torch.randn(n_batch, dim, generator=gen, dtype=dtype)
    theta = torch.randn(n_params, generator=gen, dtype=dtype).requires_grad_(True)

    def h(x, th, batch):
        a_, m_, c_, _ = batch
        return 0.5 * torch.einsum("bi,bij,bj->b", x, a_, x) - (x * (m_ @ th + c_)).sum(1)

    def f(x, th, batch):
        t_ = batch[3]
        return 0.5 * ((x - t_) ** 2).sum(1) + quartic * 0.25 * (x * x).sum(1) ** 2 / dim

    problem = QuadraticProblem(h, f, theta, mu=0.5, quartic=quartic)
    return problem, (a, m, c, t), theta


def quadratic_exact(problem, batch):
    """Exact hypergradient of the mean upper loss for :func:`quadratic_problem`."""
    a, m, c, t = batch
    th = problem.theta.detach()
    x = torch.linalg.solve(a, (m @ th + c).unsqueeze(-1)).squeeze(-1)
    dim = x.shape[1]
    grad_f = (x - t) + problem.quartic * (x * x).sum(1, keepdim=True) * x / dim
    q = torch.linalg.solve(a, grad_f.unsqueeze(-1)).squeeze(-1)
    # J_i = ∂²h/∂θ∂x = −M_i, so z = −mean_i J_iᵀ q_i = mean_i M_iᵀ q_i.
    return torch.einsum("bip,bi->p", m, q) / x.shape[0], x


@pytest.fixture
def quadratic():
    return quadratic_problem()


#: Command-line options of an imaging job small enough for the test suite (16 px crops, 8
#: training and 4 test crops, 8 filters): the jobs' defaults are sized for `make run`.
SMALL_IMAGING_ARGS = [
    "--filters",
    "8",
    "--crop",
    "16",
    "--train-size",
    "8",
    "--test-size",
    "4",
    "--batch-size",
    "4",
]
