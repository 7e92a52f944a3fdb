"""MAID's oracle-call count covers all the lower-level work it does, the error bound's
constants (power iterations, constancy tests, a-posteriori solves) and the float64
recomputations of float32 runs included.

The lower energy h_i(x, θ) = ½ xᵀA x − xᵀ(Bθ + c_i) is a custom autograd function whose
derivatives are themselves custom functions that count, per instance, every gradient
∇ₓh = A x − Bθ − c and every product of its derivative (Hessian or Jacobian products, any
order of differentiation through them): the work actually done, independent of the library's
bookkeeping.
"""

from __future__ import annotations

import pytest
import torch

from bilevel import CG, BilevelProblem, Implicit, Nesterov
from bilevel.bounds import BoundConstants
from bilevel.methods import MAID, Budget, TensorSamples

N, DIM, PARAMS = 6, 8, 4


class CountingQuadratic:
    """The problem above with counters ``grads`` and ``products`` (instances)."""

    def __init__(self, dtype: torch.dtype, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        f64 = torch.float64
        q, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=gen, dtype=f64))
        a = q @ torch.diag(torch.logspace(0, 1, DIM, dtype=f64)) @ q.T
        a, b = 0.5 * (a + a.T), torch.randn(DIM, PARAMS, generator=gen, dtype=f64)
        c = torch.randn(N, DIM, generator=gen, dtype=f64).to(dtype)
        t = torch.randn(N, DIM, generator=gen, dtype=f64).to(dtype)
        self.grads = self.products = 0
        counter = self

        class Products(torch.autograd.Function):
            """v ↦ (A v, −Σ_i Bᵀv_i): the derivative of ∇ₓh applied to v."""

            @staticmethod
            def forward(ctx, v):
                counter.products += v.shape[0]
                return v @ a.to(v.dtype), -(v @ b.to(v.dtype)).sum(0)

            @staticmethod
            def backward(ctx, gx, gth):
                return Adjoint.apply(gx, gth)

        class Adjoint(torch.autograd.Function):
            """(u, s) ↦ A u − B s: the adjoint of :class:`Products` (second differentiation)."""

            @staticmethod
            def forward(ctx, u, s):
                counter.products += u.shape[0]
                return u @ a.to(u.dtype) - (s @ b.T.to(u.dtype)).expand_as(u)

            @staticmethod
            def backward(ctx, w):
                return Products.apply(w)

        class Gradient(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x, theta, cc):
                counter.grads += x.shape[0]
                return x @ a.to(x.dtype) - theta @ b.T.to(x.dtype) - cc

            @staticmethod
            def backward(ctx, v):
                hv, jtv = Products.apply(v)
                return hv, jtv, None

        class Energy(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x, theta, cc):
                ctx.save_for_backward(x, theta, cc)
                aa, bb = a.to(x.dtype), b.to(x.dtype)
                return 0.5 * ((x @ aa) * x).sum(1) - (x * (theta @ bb.T + cc)).sum(1)

            @staticmethod
            def backward(ctx, out):
                x, theta, cc = ctx.saved_tensors
                gx = out[:, None] * Gradient.apply(x, theta, cc)
                return gx, -(out[:, None] * x).sum(0) @ b.to(x.dtype), None

        def lower_energy(x, theta, batch):
            return Energy.apply(x, theta.to(x.dtype), batch[0])

        def upper_loss(x, theta, batch):
            return 0.5 * ((x - batch[1]) ** 2).sum(1)

        theta = torch.zeros(PARAMS, dtype=dtype, requires_grad=True)
        self.problem = BilevelProblem(lower_energy, upper_loss, theta, mu=1.0, lipschitz=10.0)
        self.samples = TensorSamples((c, t), x_init=torch.zeros(N, DIM, dtype=dtype))


class CountingImplicit(Implicit):
    """``Implicit`` that records, for each hypergradient, the work the problem's counters saw
    during it and the oracle calls it reported (each hypergradient also spends N Jacobian
    products Jᵀq̃, which the oracle-call convention does not count)."""

    problem: CountingQuadratic | None = None
    log: list[tuple[int, float]] = []

    def __call__(self, *args, **kwargs):
        q = CountingImplicit.problem
        before = q.grads + q.products
        hg = super().__call__(*args, **kwargs)
        CountingImplicit.log.append((q.grads + q.products - before, hg.cost.oracle_calls))
        return hg


def _estimator() -> Implicit:
    # estimated constants: ‖J‖ by power iteration, the a-posteriori estimate, constancy tests
    constants = BoundConstants(exact_jacobian_max_params=0, a_posteriori=True)
    return CountingImplicit(
        CG(max_iter=500), lower_solver=Nesterov(max_iter=5000), constants=constants
    )


def test_the_error_bound_counts_its_constants():
    q = CountingQuadratic(torch.float64)
    CountingImplicit.problem, CountingImplicit.log = q, []
    index = torch.arange(N)
    batch, x0 = q.samples.batch(index), q.samples.initial(index)
    hg = _estimator().with_bound()(q.problem, batch, x0, lower_tol=1e-3, adjoint_tol=1e-3)
    assert hg.constants["jacobian_norm"].source == "estimated"  # power iteration ran
    assert q.grads <= hg.cost.grad_evals
    assert q.products <= hg.cost.hvps + hg.cost.vjps
    # every Jacobian product but the N of Jᵀq̃ belongs to the bound and is an oracle call
    assert hg.cost.bound_products >= hg.cost.vjps - N > 20 * N
    assert q.grads + q.products <= hg.cost.oracle_calls + N


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_maid_counts_every_oracle_call(dtype):
    """The hypergradients (bound included) and the line searches (trial solves, their
    float64 residuals in float32 runs) each cost at most what the run counts."""
    q = CountingQuadratic(dtype)
    CountingImplicit.problem, CountingImplicit.log = q, []
    method = MAID(estimator=_estimator(), step=1.0, lower_tol=1e-2)
    result = method.run(q.problem, q.samples, Budget(steps=6), progress=False, plot=False)
    assert any(r["accepted"] for r in result.records)
    assert len(CountingImplicit.log) >= result.step
    done = sum(work for work, _ in CountingImplicit.log)
    counted = sum(calls for _, calls in CountingImplicit.log)
    assert done <= counted + N * len(CountingImplicit.log)
    assert q.grads + q.products - done <= result.cost - counted  # the line searches


def test_the_float64_refinement_of_the_line_search_counts_its_oracle_calls():
    """The float32 line search's Newton correction (gradients and Hessian-vector products in
    float64) costs at most what it counts, and tightens the certified interval."""
    from bilevel.autodiff import Cost
    from bilevel.methods.maid import _certified

    q = CountingQuadratic(torch.float32)
    index = torch.arange(N)
    batch = q.samples.batch(index)
    x = q.samples.initial(index) + 0.1
    dist = torch.full((N,), 10.0)  # ‖∇h‖/μ at x is a few units: any valid distance
    plain = _certified(q.problem, batch, Cost(), x, dist, torch.ones(N), 1.0, 0)
    before, cost = q.grads + q.products, Cost()
    refined = _certified(q.problem, batch, cost, x, dist, torch.ones(N), 1.0, 5)
    assert 0 < q.grads + q.products - before <= cost.oracle_calls
    assert cost.hvps >= 5 * N
    assert bool((refined.high - refined.low < 0.01 * (plain.high - plain.low)).all())
