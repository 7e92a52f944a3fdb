"""Tests for stochastic implicit differentiation (``bilevel.stochastic``)."""

from __future__ import annotations

import dataclasses
import io
import math

import pytest
import torch
from conftest import quadratic_problem

from bilevel import (
    BilevelError,
    BilevelProblem,
    FiniteSum,
    FixedPoint,
    GradientDescent,
    Hypergradient,
    HypergradientEstimator,
    Implicit,
    NonFiniteError,
)
from bilevel.autodiff import Cost
from bilevel.learning import (
    hypercleaning_model,
    logistic_model,
    make_synthetic_classification,
    ridge_model,
)
from bilevel.stochastic import (
    SID,
    AdjointMap,
    InnerAccuracy,
    LowerMap,
    MinibatchSampler,
    PreconditionedSVRG,
    PreconditionedSVRGLinear,
    StageSamplers,
    StochasticFixedPoint,
    StochasticHypergradient,
    StochasticLinearFixedPoint,
    StochasticLinearSolver,
    StochasticLowerSolver,
    StochasticSolution,
    VarianceReducedFixedPoint,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny problems: one thread avoids BLAS thread start-up costs on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _ridge(n: int = 120, d: int = 4, theta: float = 0.0, dtype=torch.float64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n + 60, d, generator=gen, dtype=torch.float64)
    w_true = torch.randn(d, generator=gen, dtype=torch.float64)
    y = X @ w_true + 0.5 * torch.randn(n + 60, generator=gen, dtype=torch.float64)
    X, y = X.to(dtype), y.to(dtype)
    return ridge_model(X[:n], y[:n], X[n:], y[n:], theta)


@pytest.fixture(scope="module")
def ridge():
    return _ridge()


def _unit_sid(t: int, k: int, eta: float, **kwargs) -> SID:
    """SID with full batches and unit steps η_s ≡ η'_j ≡ 1 (deterministic AID-FP)."""
    return SID(
        lower_solver=StochasticFixedPoint.constant(1.0, t),
        linear_solver=StochasticLinearFixedPoint.constant(1.0, k),
        step=eta,
        lower_batch=None,
        linear_batch=None,
        final_batch=None,
        **kwargs,
    )


def _aid_fp(t: int, k: int, lip: float) -> Implicit:
    return Implicit(
        FixedPoint(step=1.0 / lip, max_iter=k),
        lower_solver=GradientDescent(lipschitz=lip, max_iter=t),
        warn_unconverged=False,
        compute_bound=False,
    )


# --------------------------------------------------------------------------------------------
# accuracy


def test_mse_against_closed_form_ridge_decreases_with_t(ridge):
    """Decreasing steps β/(γ + s): E‖ĝ − ∇F‖² falls roughly like 1/t (t = k)."""
    ref = ridge.hypergradient()
    lip, mu = ridge.smoothness(), ridge.mu()
    b = 6
    sample_curv = float((ridge.X_train**2).sum(1).max()) + 1.0
    beta = 2.0 * lip / mu  # 2κ: the contraction of Φ in expectation is 1 − μ/L
    gamma = beta * (1.0 + sample_curv / (b * lip))  # first step stable on a minibatch
    mse = {}
    for t in (10, 100, 1000):
        errs = []
        for seed in range(4):
            sid = SID(
                lower_solver=StochasticFixedPoint(t, beta, gamma),
                linear_solver=StochasticLinearFixedPoint(t, beta, gamma),
                step=1.0 / lip,
                lower_batch=b,
                linear_batch=b,
                final_batch=b,
                upper_batch=b,
                seed=seed,
            )
            hg = sid(ridge.problem, None, ridge.init_w())
            errs.append(float(((hg.grad[0] - ref) ** 2).sum()))
        mse[t] = sum(errs) / len(errs)
    assert mse[10] > mse[100] > mse[1000]
    # O(1/t): two decades of t buy well over one decade of MSE
    assert mse[1000] < mse[10] / 30
    assert mse[1000] < 1e-2 * float((ref**2).sum())


def test_exact_warm_starts_give_the_exact_hypergradient(ridge):
    """t = k = 0 from x̂ and q = H⁻¹∇f: ĝ = ∇F exactly (adjoint0 is q, not v = q/η)."""
    theta = ridge.theta.detach()
    w = ridge.solution().reshape(1, -1)
    A = ridge.X_train.T @ ridge.X_train / ridge.n_train + torch.diag(torch.exp(theta))
    r = ridge.X_val @ w[0] - ridge.y_val
    q = torch.linalg.solve(A, ridge.X_val.T @ r / ridge.n_val).reshape(1, -1)
    sid = SID(
        lower_solver=StochasticFixedPoint(0),
        linear_solver=StochasticLinearFixedPoint(0),
        step=0.3,
        final_batch=None,
    )
    hg = sid(ridge.problem, None, w, adjoint0=q)
    torch.testing.assert_close(hg.grad[0], ridge.hypergradient(), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(hg.adjoint, q, rtol=1e-14, atol=1e-16)
    torch.testing.assert_close(hg.x, w)


def test_warm_starts_carry_over(ridge):
    """The returned x and adjoint restart the next call close to where the last one ended."""
    ref = ridge.hypergradient()
    sid = SID(
        lower_solver=StochasticFixedPoint(40, 8.0, 16.0),
        linear_solver=StochasticLinearFixedPoint(40, 8.0, 16.0),
        step=1.0 / ridge.smoothness(),
        lower_batch=None,
        linear_batch=None,
        final_batch=None,
    )
    cold = sid(ridge.problem, None, ridge.init_w())
    warm = sid(ridge.problem, None, cold.x, adjoint0=cold.adjoint)
    err_cold = float((cold.grad[0] - ref).norm())
    err_warm = float((warm.grad[0] - ref).norm())
    assert err_warm < 0.5 * err_cold


# --------------------------------------------------------------------------------------------
# deterministic limit: AID-FP


def _classification(n_classes: int = 2, n: int = 90, d: int = 5):
    X, y, _ = make_synthetic_classification(
        n + 40, d, n_classes=n_classes, seed=3, dtype=torch.float64
    )
    return X[:n], y[:n], X[n:], y[n:]


@pytest.mark.parametrize("case", ["ridge", "logistic", "multinomial", "hypercleaning"])
def test_full_batch_unit_steps_reproduce_aid_fp(ridge, case):
    if case == "ridge":
        model = ridge
    elif case == "logistic":
        model = logistic_model(*_classification(2), -1.0, fit_intercept=True)
    elif case == "multinomial":
        model = logistic_model(*_classification(3), -0.5)
    else:
        Xtr, ytr, Xv, yv = _classification(3)
        model = hypercleaning_model(Xtr, ytr, Xv, yv, 0.3, l2=0.1)
        with torch.no_grad():
            model.theta.copy_(torch.linspace(-1.0, 1.0, model.n_train, dtype=torch.float64))
    lip = model.smoothness()
    eta = 1.0 / lip
    t, k = 25, 15
    gen = torch.Generator().manual_seed(1)
    x0 = 0.2 * torch.randn((2, *model.event_shape), generator=gen, dtype=torch.float64)
    q0 = 0.2 * torch.randn((2, *model.event_shape), generator=gen, dtype=torch.float64)
    for adjoint0 in (None, q0):
        ref = _aid_fp(t, k, lip)(
            model.problem, None, x0, lower_tol=1e-300, adjoint_tol=0.0, adjoint0=adjoint0
        )
        hg = _unit_sid(t, k, eta)(model.problem, None, x0, adjoint0=adjoint0)
        scale = float(ref.grad[0].abs().max())
        torch.testing.assert_close(hg.grad[0], ref.grad[0], rtol=0, atol=1e-12 * scale)
        torch.testing.assert_close(hg.x, ref.x, rtol=0, atol=1e-12)
        torch.testing.assert_close(hg.adjoint, ref.adjoint, rtol=0, atol=1e-12)
        assert hg.loss == pytest.approx(ref.loss, rel=1e-13)
        torch.testing.assert_close(hg.losses, ref.losses)


# Implicit converts the regulariser value with float() while it still requires grad
@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")
def test_aid_fp_equivalence_with_upper_regulariser():
    model = _ridge()
    with torch.no_grad():
        model.theta.copy_(torch.tensor([0.3, -0.2, 0.1, 0.5], dtype=torch.float64))
    problem = BilevelProblem(
        model.lower_energy,
        model.upper_loss,
        model.theta,
        mu=model.mu(),
        upper_regulariser=lambda th: 0.05 * (th**2).sum(),
        finite_sum=FiniteSum(model.lower_sample_energy, model.n_train),
    )
    lip = model.smoothness()
    x0 = model.init_w()
    ref = _aid_fp(30, 20, lip)(problem, None, x0, lower_tol=1e-300, adjoint_tol=0.0)
    hg = _unit_sid(30, 20, 1.0 / lip)(problem, None, x0)
    torch.testing.assert_close(hg.grad[0], ref.grad[0], rtol=0, atol=1e-13)
    assert hg.loss == pytest.approx(ref.loss, rel=1e-13)


# --------------------------------------------------------------------------------------------
# sampling


def test_stage_streams_are_independent_and_reproducible():
    s = StageSamplers(0)
    draws = [g.draw(1000, 20) for g in (s.lower, s.linear, s.final)]
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    again = StageSamplers(0)
    assert torch.equal(again.lower.draw(1000, 20), draws[0])
    assert not torch.equal(StageSamplers(1).lower.draw(1000, 20), draws[0])
    state = s.state_dict()
    nxt = s.linear.draw(1000, 20)
    s.load_state_dict(state)
    assert torch.equal(s.linear.draw(1000, 20), nxt)
    s.reset()
    assert torch.equal(s.lower.draw(1000, 20), draws[0])
    fresh = StageSamplers(None)
    assert torch.equal(StageSamplers(fresh.entropy).final.draw(50, 5), fresh.final.draw(50, 5))


def test_minibatches_with_and_without_replacement():
    without = MinibatchSampler(0, replace=False)
    for n, b in ((1000, 10), (1000, 200), (50, 40)):  # i.i.d. draws deduplicated, permutation
        for _ in range(20):
            idx = without.draw(n, b)
            assert idx.dtype == torch.int64 and idx.shape == (b,)
            assert torch.unique(idx).numel() == b and int(idx.min()) >= 0 and int(idx.max()) < n
    assert torch.equal(without.draw(7, 7), torch.arange(7))
    assert without.draw(100, 5, count=3).shape == (15,)
    with_ = MinibatchSampler(0, replace=True)
    repeats = sum(torch.unique(with_.draw(50, 40)).numel() < 40 for _ in range(5))
    assert repeats == 5
    # uniform subsets in increasing order: every position is drawn about equally often in
    # both branches, and so is every pair (a uniform subset, not only uniform marginals)
    draws = without.draw(10, 3, count=3000).reshape(3000, 3)
    assert bool((draws.diff(dim=1) > 0).all())
    counts = torch.bincount(draws.flatten(), minlength=10).double()
    assert float((counts / counts.mean() - 1).abs().max()) < 0.1
    draws = without.draw(200, 10, count=6000).reshape(6000, 10)  # the i.i.d. branch
    assert bool((draws.diff(dim=1) > 0).all())
    counts = torch.bincount(draws.flatten(), minlength=200).double()
    assert float((counts / counts.mean() - 1).abs().max()) < 0.2
    pairs = torch.bincount((draws[:, 0] * 200 + draws[:, 1]), minlength=200 * 200)
    # P(the two smallest of a uniform 10-subset of 200 are 0 and 1) = C(198, 8)/C(200, 10)
    p01 = math.comb(198, 8) / math.comb(200, 10)
    assert abs(float(pairs[1]) / 6000 - p01) < 4 * math.sqrt(p01 / 6000)
    with pytest.raises(BilevelError):
        without.draw(5, 6)


def _recording(model):
    """The model's problem with every lower-sample index recorded."""
    calls: list[torch.Tensor] = []

    def energy(x, theta, index):
        calls.append(index.clone())
        return model.lower_sample_energy(x, theta, index)

    problem = BilevelProblem(
        model.lower_energy,
        model.upper_loss,
        model.theta,
        mu=model.mu(),
        finite_sum=FiniteSum(energy, model.n_train),
    )
    return problem, calls


def test_sid_stages_draw_from_separate_streams(ridge):
    problem, calls = _recording(ridge)

    def run(t: int) -> list[torch.Tensor]:
        calls.clear()
        sid = SID(
            lower_solver=StochasticFixedPoint(t, 4.0, 8.0),
            linear_solver=StochasticLinearFixedPoint(4, 4.0, 8.0),
            step=0.2,
            lower_batch=5,
            linear_batch=5,
            final_batch=5,
            seed=7,
        )
        sid(problem, None, ridge.init_w())
        return list(calls)

    short, long = run(3), run(6)
    assert len(short) == 3 + 4 + 1 and len(long) == 6 + 4 + 1
    # stage 1 of the short run is a prefix of the long one; stages 2 and 3 do not depend on t
    for a, b in zip(short[:3], long[:3]):
        assert torch.equal(a, b)
    for a, b in zip(short[3:], long[6:]):
        assert torch.equal(a, b)
    # the three stages see different minibatches
    assert not torch.equal(long[0], long[6]) and not torch.equal(long[6], long[10])


def test_same_seed_same_estimate_and_fresh_samples_across_calls(ridge):
    def make(seed):
        return SID(
            lower_solver=StochasticFixedPoint(20, 4.0, 8.0),
            linear_solver=StochasticLinearFixedPoint(20, 4.0, 8.0),
            step=0.2,
            lower_batch=5,
            linear_batch=5,
            final_batch=5,
            upper_batch=5,
            final_minibatches=2,
            seed=seed,
        )

    x0 = ridge.init_w()
    a, b, c = make(3), make(3), make(4)
    state = a.init_state()
    ga = a(ridge.problem, None, x0, state=state).grad[0]
    assert torch.equal(ga, b(ridge.problem, None, x0).grad[0])
    assert not torch.allclose(ga, c(ridge.problem, None, x0).grad[0])
    # a call without a state is a function of the seed and its inputs alone
    assert torch.equal(a(ridge.problem, None, x0).grad[0], ga)
    # successive calls with one state continue its streams (fresh samples), reset() restarts
    second = a(ridge.problem, None, x0, state=state).grad[0]
    assert not torch.allclose(ga, second)
    state.samplers.reset()
    assert torch.equal(a(ridge.problem, None, x0, state=state).grad[0], ga)
    # with replacement is a different sampling scheme
    from dataclasses import replace

    assert not torch.allclose(replace(make(3), replace=True)(ridge.problem, None, x0).grad[0], ga)


# --------------------------------------------------------------------------------------------
# interface: accumulation, cost, evidence, pluggable solvers


def test_estimator_interface_accumulate_and_cost(ridge):
    sid = SID(
        lower_solver=StochasticFixedPoint(10, 4.0, 8.0),
        linear_solver=StochasticLinearFixedPoint(5, 4.0, 8.0),
        step=0.2,
        lower_batch=12,
        linear_batch=24,
        final_batch=12,
        upper_batch=6,
        final_minibatches=3,
    )
    assert isinstance(sid, HypergradientEstimator)
    ridge.theta.grad = None
    hg = sid(ridge.problem, None, ridge.init_w(), accumulate=True)
    assert isinstance(hg, StochasticHypergradient) and isinstance(hg, Hypergradient)
    torch.testing.assert_close(ridge.theta.grad, hg.grad[0])
    hg2 = sid(ridge.problem, None, ridge.init_w(), accumulate=True)
    torch.testing.assert_close(ridge.theta.grad, hg.grad[0] + hg2.grad[0])
    ridge.theta.grad = None
    # fractional oracle counts: b/N of a call per minibatch of b out of N = 120
    assert hg.cost.grad_evals == pytest.approx(10 * 12 / 120)
    assert hg.cost.hvps == pytest.approx(5 * 24 / 120)
    assert hg.cost.vjps == pytest.approx(3 * 12 / 120)
    assert hg.cost.oracle_calls == pytest.approx(2.0)
    assert hg.cost.wall_time > 0
    # evidence: no a-posteriori bound for a stochastic estimate
    assert hg.bound is None and hg.bound_certified is False
    assert bool(torch.isnan(hg.eps).all()) and bool(torch.isnan(hg.delta).all())
    assert hg.mu == ridge.problem.mu and hg.mu_estimated is False
    assert hg.map_step == 0.2 and hg.lower_report.iterations == 10
    assert hg.linear_report.iterations == 5
    assert hg.x.shape == (1, 4) and hg.adjoint.shape == (1, 4)
    assert hg.grad[0].shape == ridge.theta.shape and hg.losses.shape == (1,)
    # costs are per instance: B = 3 instances cost three times as much
    hg3 = sid(ridge.problem, None, ridge.init_w(3))
    assert hg3.cost.grad_evals == pytest.approx(3 * 10 * 12 / 120)
    assert hg3.losses.shape == (3,)


def test_step_from_power_iteration(ridge):
    sid = SID(
        lower_solver=StochasticFixedPoint(5, 4.0, 8.0),
        linear_solver=StochasticLinearFixedPoint(5, 4.0, 8.0),
        lower_batch=10,
        linear_batch=10,
        final_batch=10,
    )
    hg = sid(ridge.problem, None, ridge.init_w())
    X = ridge.X_train
    lam_max = float(torch.linalg.eigvalsh(X.T @ X / ridge.n_train + torch.eye(4)).max())
    # power iteration approaches λ_max from below: η = 1/λ̃ is at most slightly longer
    assert 1.0 / lam_max <= hg.map_step <= 1.01 / lam_max
    assert hg.cost.hvps >= 20  # the power iteration on the full Hessian is counted


def test_float32_follows_the_data():
    model = _ridge(dtype=torch.float32)
    sid = SID(
        lower_solver=StochasticFixedPoint(20, 4.0, 8.0),
        linear_solver=StochasticLinearFixedPoint(20, 4.0, 8.0),
        step=0.2,
        lower_batch=10,
        linear_batch=10,
        final_batch=10,
    )
    hg = sid(model.problem, None, model.init_w())
    assert hg.grad[0].dtype == torch.float32 and hg.x.dtype == torch.float32
    assert hg.adjoint.dtype == torch.float32


class _Relaxed:
    """A user-supplied solver: x ← x + ω (T̂(x) − x) with fixed relaxation ω."""

    def __init__(self, iterations: int, omega: float) -> None:
        self.iterations, self.omega, self.calls = iterations, omega, 0

    def solve(self, phi, x0):
        x = x0
        for _ in range(self.iterations):
            x = x + self.omega * (phi(x) - x)
            self.calls += 1
        return StochasticSolution(x, x, self.iterations, 0, self.omega)


def test_solvers_are_pluggable(ridge):
    lower, linear = _Relaxed(60, 0.5), _Relaxed(60, 0.5)
    assert isinstance(lower, StochasticLowerSolver) and isinstance(linear, StochasticLinearSolver)
    sid = SID(
        lower_solver=lower,
        linear_solver=linear,
        step=1.0 / ridge.smoothness(),
        lower_batch=None,
        linear_batch=None,
        final_batch=None,
    )
    state = sid.init_state()
    hg = sid(ridge.problem, None, ridge.init_w(), state=state)
    # the state's working copies are called; the configuration's solvers are never touched
    assert state.lower_solver.calls == 60 and state.linear_solver.calls == 60
    assert lower.calls == 0 and linear.calls == 0
    torch.testing.assert_close(hg.grad[0], ridge.hypergradient(), rtol=1e-6, atol=1e-9)

    class Broken:
        def solve(self, phi, x0):
            return x0

    with pytest.raises(BilevelError, match="StochasticSolution"):
        SID(lower_solver=Broken(), lower_batch=None)(ridge.problem, None, ridge.init_w())
    with pytest.raises(BilevelError, match="lower_solver"):
        SID(lower_solver="sgd")


def test_stochastic_fixed_point_steps_and_averaging():
    sfp = StochasticFixedPoint(iterations=8, beta=2.0, gamma=4.0)
    assert [sfp.step_size(s) for s in range(3)] == [0.5, 2.0 / 5.0, 2.0 / 6.0]
    assert StochasticFixedPoint.constant(0.3).step_size(100) == 0.3

    def affine(x):  # T(x) = x/2 + 1, fixed point 2
        return 0.5 * x + 1.0

    x0 = torch.zeros(1, 1, dtype=torch.float64)
    iterates, x = [], x0
    for s in range(8):
        eta = 2.0 / (4.0 + s)
        x = (1 - eta) * x + eta * affine(x)
        iterates.append(x)
    sol = sfp.solve(affine, x0)
    torch.testing.assert_close(sol.x, iterates[-1])
    assert sol.iterations == 8 and sol.averaged == 0 and sol.last_step == pytest.approx(2 / 11)
    avg = StochasticFixedPoint(iterations=8, beta=2.0, gamma=4.0, average=0.5).solve(affine, x0)
    torch.testing.assert_close(avg.x, torch.stack(iterates[4:]).mean(0))
    torch.testing.assert_close(avg.last_iterate, iterates[-1])
    assert avg.averaged == 4
    full = StochasticFixedPoint(iterations=8, beta=2.0, gamma=4.0, average=1.0).solve(affine, x0)
    torch.testing.assert_close(full.x, torch.stack(iterates).mean(0))


# --------------------------------------------------------------------------------------------
# errors


def test_bad_inputs(ridge):
    problem, batch, _ = quadratic_problem()
    with pytest.raises(BilevelError, match="finite_sum"):
        SID()(problem, batch, torch.zeros(4, 6, dtype=torch.float64))
    for name in ("lower_batch", "linear_batch", "final_batch", "upper_batch"):
        for bad in (0, -3, 2.5, True):
            with pytest.raises(BilevelError, match=name):
                SID(**{name: bad})
    with pytest.raises(BilevelError):
        SID(final_minibatches=0)
    with pytest.raises(BilevelError):
        SID(step=-1.0)
    with pytest.raises(BilevelError):
        SID(seed=-1)
    for kwargs in ({"beta": 0.0}, {"gamma": -1.0}, {"average": 1.5}, {"iterations": -1}):
        with pytest.raises(BilevelError):
            StochasticFixedPoint(**kwargs)
    x0 = ridge.init_w()
    n = ridge.n_train
    for name in ("lower_batch", "linear_batch", "final_batch"):
        with pytest.raises(BilevelError, match=f"{name}={n + 1}"):
            SID(step=0.1, **{name: n + 1})(ridge.problem, None, x0)
    with pytest.raises(BilevelError, match="upper_batch"):
        SID(step=0.1, upper_batch=ridge.n_val + 1)(ridge.problem, None, x0)
    no_upper = BilevelProblem(
        ridge.lower_energy,
        ridge.upper_loss,
        ridge.theta,
        mu=1.0,
        finite_sum=FiniteSum(ridge.lower_sample_energy, n),
    )
    with pytest.raises(BilevelError, match="upper_loss"):
        SID(step=0.1, upper_batch=5)(no_upper, None, x0)
    with pytest.raises(BilevelError, match="batch must be None"):
        SID(step=0.1)(ridge.problem, torch.zeros(1), x0)
    with pytest.raises(BilevelError):
        SID(step=0.1)(ridge.problem, None, x0, adjoint0=torch.zeros(2, 4, dtype=torch.float64))


def test_divergence_raises_with_advice(ridge):
    eta = 1.0 / ridge.smoothness()
    # map step 20/L: Φ expands the top eigendirection by a factor 19 per unit step
    sid = SID(
        lower_solver=StochasticFixedPoint.constant(1.0, 2000),
        step=20 * eta,
        lower_batch=None,
    )
    with pytest.raises(NonFiniteError, match="stage 1.*gamma"):
        sid(ridge.problem, None, ridge.init_w())
    # a stable lower stage, a diverging adjoint stage (constant steps 5)
    sid = SID(
        lower_solver=StochasticFixedPoint.constant(1.0, 10),
        linear_solver=StochasticLinearFixedPoint.constant(5.0, 2000),
        step=eta,
        lower_batch=None,
        linear_batch=10,
    )
    with pytest.raises(NonFiniteError, match="stage 2"):
        sid(ridge.problem, None, ridge.init_w())


# --------------------------------------------------------------------------------------------
# with an upper-level method


def test_isgd_runs_with_sid():
    methods = pytest.importorskip("bilevel.methods")
    model = _ridge()
    lip, mu = model.smoothness(), model.mu()
    beta = 2.0 * lip / mu
    sid = SID(
        lower_solver=StochasticFixedPoint(50, beta, 5.0 * beta),
        linear_solver=StochasticLinearFixedPoint(50, beta, 5.0 * beta),
        step=1.0 / lip,
        lower_batch=10,
        linear_batch=10,
        final_batch=10,
        upper_batch=10,
    )
    before = float(model.objective())
    samples = methods.TensorSamples(x_init=model.init_w())
    methods.ISGD(step=0.5, batch_size=1, estimator=sid).run(
        model.problem, samples, {"steps": 20}, progress=False, plot=False
    )
    assert float(model.objective()) < 0.5 * before


@pytest.mark.parametrize("variance_reduced", [False, True])
def test_isgd_with_sid_resumes_exactly(tmp_path, variance_reduced):
    """SID's own minibatch streams and the SVRG anchor are checkpointed: resume replays the
    same samples from the same anchor."""
    from bilevel.methods import ISGD, TensorSamples

    def make():
        model = _ridge()
        lip, mu = model.smoothness(), model.mu()
        beta = 2.0 * lip / mu
        sid = SID(
            lower_solver=VarianceReducedFixedPoint(20, 0.5)
            if variance_reduced
            else StochasticFixedPoint(20, beta, 5.0 * beta),
            linear_solver=StochasticLinearFixedPoint(20, beta, 5.0 * beta),
            step=1.0 / lip,
            lower_batch=10,
            linear_batch=10,
            final_batch=10,
        )
        method = ISGD(step=0.5, batch_size=1, estimator=sid)
        return model, method, TensorSamples(x_init=model.init_w())

    model, method, samples = make()
    method.run(model.problem, samples, {"steps": 12}, progress=False, plot=False)
    reference = model.theta.detach().clone()

    model, method, samples = make()
    run_dir = tmp_path / "run"
    opts = dict(run_dir=run_dir, progress=False, plot=False, checkpoint_every=1)
    method.run(model.problem, samples, {"steps": 5}, **opts)
    model, method, samples = make()  # a fresh process: new objects, same configuration
    method.run(model.problem, samples, {"steps": 12}, resume=True, **opts)
    assert torch.equal(model.theta.detach(), reference)


# --------------------------------------------------------------------------------------------
# variance-reduced stage 1


class _Cycling:
    """A sampler that returns the positions 0, 1, ..., n−1 in turn (minibatches of one)."""

    def __init__(self) -> None:
        self.next = 0

    def draw(self, n, size, count=1, device=None):
        assert size == 1 and count == 1
        idx = torch.tensor([self.next % n])
        self.next += 1
        return idx


def test_variance_reduced_solver_reaches_the_fixed_point(ridge):
    """SVRG steps converge to ŵ(θ) itself; constant-step SGD stalls at its noise floor."""
    w_star = ridge.solution().reshape(1, -1)
    eta = 1.0 / ridge.smoothness()
    errors, costs = {}, {}
    for name, solver in (
        ("svrg", VarianceReducedFixedPoint(800, 0.5, refresh=40)),
        ("sgd", StochasticFixedPoint.constant(0.5, 800)),
    ):
        cost = Cost()
        phi = LowerMap(ridge.problem, eta, MinibatchSampler(0), 6, cost)
        sol = solver.solve(phi, ridge.init_w())
        errors[name] = float((sol.x - w_star).norm() / w_star.norm())
        costs[name] = cost.grad_evals
    assert errors["svrg"] < 1e-9 < 1e-3 < errors["sgd"]
    # two minibatch gradients per iteration and one full gradient per refresh (20 of them)
    n = ridge.n_train
    assert costs["svrg"] == pytest.approx(800 * 2 * 6 / n + 20)
    assert costs["sgd"] == pytest.approx(800 * 6 / n)


def test_variance_reduced_gradient_is_exact_at_the_anchor_after_theta_moves(ridge):
    """θ enters only the regulariser: at x = x̃ the corrected gradient is ∇h(x̃, θ) exactly,
    whatever θ has become since the anchor was taken."""
    model = _ridge(theta=-1.0)
    eta, beta = 1.0 / model.smoothness(), 0.5
    solver = VarianceReducedFixedPoint(1, beta, refresh=100)
    phi = LowerMap(model.problem, eta, MinibatchSampler(3), 5, Cost())
    x0 = 0.3 * torch.ones((1, *model.event_shape), dtype=torch.float64)
    solver.solve(phi, x0)  # anchor at (x0, θ0)
    with torch.no_grad():
        model.theta.add_(torch.linspace(-0.5, 0.8, model.theta.numel(), dtype=torch.float64))
    x1 = solver.solve(phi, x0).x
    exact = x0 - beta * eta * phi.full_gradient(x0)
    torch.testing.assert_close(x1, exact, rtol=0, atol=1e-13)


def test_variance_reduced_gradient_is_unbiased_when_theta_weights_samples():
    """Hypercleaning (θ weights each sample): averaged over all minibatches of one sample,
    the corrected step from x ≠ x̃ after θ moved is the exact gradient step."""
    Xtr, ytr, Xv, yv = _classification(3, n=30)
    model = hypercleaning_model(Xtr, ytr, Xv, yv, 0.2, l2=0.1)
    eta, beta, n = 1.0 / model.smoothness(), 0.5, model.n_train
    solver = VarianceReducedFixedPoint(1, beta, refresh=10**6)
    phi = LowerMap(model.problem, eta, _Cycling(), 1, Cost())
    gen = torch.Generator().manual_seed(0)
    anchor = 0.2 * torch.randn((1, *model.event_shape), generator=gen, dtype=torch.float64)
    x = anchor + 0.1 * torch.randn(anchor.shape, generator=gen, dtype=torch.float64)
    solver.solve(phi, anchor)
    with torch.no_grad():
        model.theta.copy_(torch.linspace(-1.0, 1.0, n, dtype=torch.float64))
    phi.sampler.next = 0
    steps = torch.stack([solver.solve(phi, x).x for _ in range(n)])
    exact = x - beta * eta * phi.full_gradient(x)
    torch.testing.assert_close(steps.mean(0), exact, rtol=0, atol=1e-12)
    assert float((steps - exact).abs().max()) > 1e-4  # each single step is noisy


def test_variance_reduced_anchor_lifecycle(ridge):
    cost = Cost()
    phi = LowerMap(ridge.problem, 0.1, MinibatchSampler(0), 5, cost)
    solver = VarianceReducedFixedPoint(3, 0.5)  # refresh = ⌈120/5⌉ = 24 iterations
    x = ridge.init_w()
    for _ in range(8):  # 24 iterations: one full gradient
        x = solver.solve(phi, x).x
    assert solver.anchored and cost.grad_evals == pytest.approx(1 + 24 * 2 * 5 / 120)
    solver.solve(phi, x)  # the 25th iteration refreshes
    assert cost.grad_evals == pytest.approx(2 + 27 * 2 * 5 / 120)
    two = torch.cat([x, x])  # another iterate shape: a new anchor at once
    solver.solve(phi, two)
    assert cost.grad_evals == pytest.approx(2 + 27 * 2 * 5 / 120 + 2 + 3 * 2 * 2 * 5 / 120)
    state = solver.state_dict()
    again = VarianceReducedFixedPoint(3, 0.5)
    again.load_state_dict(state)
    before = cost.grad_evals
    again.solve(phi, two)  # the restored anchor is used: no full gradient
    assert cost.grad_evals == pytest.approx(before + 2 * 3 * 2 * 5 / 120)
    solver.reset()
    assert not solver.anchored
    with pytest.raises(BilevelError, match="LowerMap"):
        solver.solve(lambda v: v, x)
    with pytest.raises(BilevelError, match="step"):
        VarianceReducedFixedPoint(3, step=0.0)
    with pytest.raises(BilevelError, match="refresh"):
        VarianceReducedFixedPoint(3, refresh=0)


def test_sid_with_variance_reduced_stage_one_is_more_accurate(ridge):
    """Same t, batch and step: the SVRG stage 1 lowers the hypergradient error."""
    ref = ridge.hypergradient()
    eta = 1.0 / ridge.smoothness()
    errors = {}
    for name, make in (
        ("svrg", lambda: VarianceReducedFixedPoint(200, 0.5)),
        ("sgd", lambda: StochasticFixedPoint.constant(0.5, 200)),
    ):
        errs = []
        for seed in range(3):
            sid = SID(
                lower_solver=make(),
                linear_solver=StochasticLinearFixedPoint.constant(1.0, 200),
                step=eta,
                lower_batch=6,
                linear_batch=None,  # exact stage 2: the error is stage 1's
                final_batch=None,
                seed=seed,
            )
            hg = sid(ridge.problem, None, ridge.init_w())
            errs.append(float((hg.grad[0] - ref).norm() / ref.norm()))
        errors[name] = sum(errs) / len(errs)
    assert errors["svrg"] < 1e-5 < 1e-2 < errors["sgd"]  # measured: ~2e-7 against ~0.1


# ---------------------------------------------------------------------------------------------
# adaptive accuracy and preconditioned solvers


def _ill_ridge(n: int = 2000, d: int = 10, lam: float = 5e-4, seed: int = 0):
    """Ridge with correlated features whose Gram spectrum spans 10⁴ and λ = 5·10⁻⁴: κ ≈ 1760,
    not removed by a diagonal preconditioner (the ill-conditioning is in rotated directions)."""
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    A = Q * torch.logspace(0, -2, d, dtype=torch.float64)
    X = torch.randn(n + n // 2, d, generator=gen, dtype=torch.float64) @ A.T
    w = 3 * torch.randn(d, generator=gen, dtype=torch.float64)
    y = X @ w + 0.1 * torch.randn(n + n // 2, generator=gen, dtype=torch.float64)
    return ridge_model(X[:n], y[:n], X[n:], y[n:], math.log(lam))


def _ridge_hessian(model) -> torch.Tensor:
    X = model.X_train
    return X.T @ X / model.n_train + torch.diag(model.theta.detach().exp())


def _adaptive_sid(model, batch: int = 200) -> SID:
    return SID(
        lower_solver=PreconditionedSVRG(500, 0.5),
        linear_solver=PreconditionedSVRGLinear(500, 0.5, cg_iterations=20),
        lower_batch=batch,
        linear_batch=batch,
        final_batch=1,
        accuracy=InnerAccuracy(),
        diagonal=model.lower_sample_diagonal,
    )


def _track(model, sid: SID, steps: int) -> list[dict[str, float]]:
    """Warm-started SID calls along a path of θ (±0.05 per coordinate and step, as an upper
    optimiser would move it), from w(θ₀), with ε_k = δ_k = 2·10⁻⁴/√(k+1); per step the
    closed-form hypergradient error, the true residuals and SID's report."""
    with torch.no_grad():
        model.theta.fill_(math.log(5e-4))
    w, q = model.solution().reshape(1, -1), None
    gen = torch.Generator().manual_seed(1)
    rows = []
    for k in range(steps):
        eps = 2e-4 / math.sqrt(k + 1)
        tols = {"lower_tol": eps, "adjoint_tol": eps} if sid.uses_tolerances else {}
        hg = sid(model.problem, None, w, adjoint0=q, **tols)
        w, q = hg.x, hg.adjoint
        H = _ridge_hessian(model)
        X, y, Xv, yv = model.X_train, model.y_train, model.X_val, model.y_val
        grad_h = H @ w[0] - X.T @ y / model.n_train
        grad_f = Xv.T @ (Xv @ w[0] - yv) / model.n_val
        rows.append(
            {
                "eps": eps,
                "error": float((hg.grad[0] - model.hypergradient()).norm()),
                "lower": float(grad_h.norm()),
                "adjoint": float((H @ q[0] - grad_f).norm()),
                **hg.metrics,
            }
        )
        with torch.no_grad():
            step = torch.randint(0, 2, model.theta.shape, generator=gen) * 2 - 1
            model.theta.add_(0.05 * step.to(model.theta))
    return rows


def test_adaptive_sid_tracks_an_ill_conditioned_ridge_within_its_tolerance():
    """κ ≥ 10³: adaptive SID's hypergradient error (closed form) stays below the ε_k it
    reports at every step, its residual estimates are those of the true residuals, and the
    adjoint meets δ_k; the previous fixed t = k = 3 does not (its error is of the size of
    ∇F itself), so the check can fail."""
    model = _ill_ridge()
    spectrum = torch.linalg.eigvalsh(_ridge_hessian(model))
    assert float(spectrum[-1] / spectrum[0]) > 1e3
    rows = _track(model, _adaptive_sid(model), 6)
    for r in rows:
        assert r["sid_lower_target"] == pytest.approx(r["eps"])
        assert r["error"] < r["sid_lower_target"]
        # the reports are truthful: the true residuals are the estimated ones (ridge: the
        # control variate is exact in θ, so up to the minibatch noise in w − w̃)
        assert r["lower"] == pytest.approx(r["sid_lower_residual"], rel=0.1)
        assert r["adjoint"] <= 1.5 * r["sid_adjoint_target"]
        assert r["sid_t"] <= 500 and r["sid_k"] <= 20
    assert sum(r["sid_t"] for r in rows) > 0  # the lower level had to move
    old = SID(
        lower_solver=VarianceReducedFixedPoint(3, 0.5),
        linear_solver=StochasticLinearFixedPoint.constant(0.5, 3),
        lower_batch=200,
        linear_batch=200,
        final_batch=1,
    )
    assert all(r["error"] > r["eps"] for r in _track(model, old, 3))


def test_adaptive_sid_stops_at_the_tolerance_and_reports_it(ridge):
    """A loose tolerance is met at once by a converged warm start (t = k = 0); a tighter one
    makes both stages iterate; the estimated distance and residual fill ``eps`` / ``delta``."""
    sid = _adaptive_sid(ridge, batch=20)
    w = ridge.solution().reshape(1, -1)
    first = sid(ridge.problem, None, w, lower_tol=1e-3, adjoint_tol=1e-3)
    again = sid(
        ridge.problem, None, first.x, lower_tol=1.0, adjoint_tol=1.0, adjoint0=first.adjoint
    )
    assert again.metrics["sid_t"] == 0 and again.metrics["sid_k"] == 0
    with torch.no_grad():
        ridge.theta.add_(0.5)
    try:
        moved = sid(
            ridge.problem, None, w, lower_tol=1e-6, adjoint_tol=1e-6, adjoint0=first.adjoint
        )
        assert moved.metrics["sid_t"] > 0 and moved.metrics["sid_k"] > 0
        assert moved.lower_residual <= 1e-6 and moved.adjoint_residual <= 1e-6
        assert float(moved.eps[0]) == pytest.approx(moved.lower_residual / ridge.problem.mu)
        assert float(moved.delta[0]) == pytest.approx(moved.adjoint_residual)
        err = float((moved.grad[0] - ridge.hypergradient()).norm())
        assert err < 1e-5
    finally:
        with torch.no_grad():
            ridge.theta.sub_(0.5)


def test_sid_tighten_scales_the_targets_and_is_checkpointed(ridge):
    sid = _adaptive_sid(ridge, batch=20)
    w = ridge.solution().reshape(1, -1)
    state = sid.init_state()
    hg = sid(ridge.problem, None, w, lower_tol=1e-3, state=state)
    assert hg.lower_target == pytest.approx(1e-3)
    assert state.tighten() == pytest.approx(0.3)
    hg = sid(ridge.problem, None, w, lower_tol=1e-3, adjoint_tol=1e-2, state=state)
    assert hg.lower_target == pytest.approx(3e-4) and hg.adjoint_target == pytest.approx(3e-3)
    assert hg.metrics["sid_accuracy_scale"] == pytest.approx(0.3)
    # a fresh state (or a call without one) starts at scale 1 again
    assert sid(ridge.problem, None, w, lower_tol=1e-3).lower_target == pytest.approx(1e-3)
    fresh = _adaptive_sid(ridge, batch=20).init_state()
    fresh.load_state_dict(state.state_dict())
    assert fresh.accuracy_scale == pytest.approx(0.3)
    for _ in range(20):
        state.tighten()
    assert state.accuracy_scale == pytest.approx(InnerAccuracy().min_scale)
    with pytest.raises(BilevelError, match="tighten needs"):
        SID().init_state().tighten()
    with pytest.raises(BilevelError, match="unknown SID state"):
        fresh.load_state_dict({"anchor": None})
    with pytest.raises(BilevelError, match="adaptive accuracy needs"):
        SID(lower_solver=_NoTolSolver(), accuracy=InnerAccuracy(), lower_batch=5)(
            ridge.problem, None, w
        )
    with pytest.raises(BilevelError, match="factor must be in"):
        InnerAccuracy(factor=2.0)


def _saved(obj):
    """``obj`` written by ``torch.save`` into a buffer, ready to be read back."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


class _NoTolSolver:
    def solve(self, phi, x0):
        return StochasticSolution(x0, x0, 0, 0, math.nan)


def test_preconditioned_solvers_restore_their_state(ridge):
    """The anchors, λ̂ and the grown sample size survive state_dict / load_state_dict: the
    restored solvers continue exactly as the original ones."""
    theta0 = ridge.theta.detach().clone()

    def run(sid, state, calls):
        w, q = ridge.solution().reshape(1, -1), None
        out = []
        for k in range(calls):
            with torch.no_grad():
                ridge.theta.copy_(theta0 + 0.1 * k)
            hg = sid(
                ridge.problem, None, w, lower_tol=1e-7, adjoint_tol=1e-7, adjoint0=q, state=state
            )
            w, q = hg.x, hg.adjoint
            out.append(hg)
        return out, w, q

    try:
        a = _adaptive_sid(ridge, batch=10)
        sa = a.init_state()
        first, w, q = run(a, sa, 2)
        saved = torch.load(_saved(sa.state_dict()), weights_only=False)
        sampler_state = sa.samplers.state_dict()
        assert saved["linear_solver"]["anchor"] is not None and saved["lower_solver"]["top"]
        b = _adaptive_sid(ridge, batch=10)
        sb = b.init_state()
        sb.load_state_dict(saved)
        sb.samplers.load_state_dict(sampler_state)
        with torch.no_grad():
            ridge.theta.copy_(theta0 + 0.3)
        kw = {"lower_tol": 1e-7, "adjoint_tol": 1e-7, "adjoint0": q}
        x = a(ridge.problem, None, w, state=sa, **kw)
        y = b(ridge.problem, None, w, state=sb, **kw)
        assert torch.equal(x.grad[0], y.grad[0]) and x.metrics == y.metrics
    finally:
        with torch.no_grad():
            ridge.theta.copy_(theta0)


@pytest.mark.parametrize(
    "kind", ["ridge", "binary", "multinomial", "sparse", "hypercleaning", "no-intercept"]
)
def test_sample_hessian_diagonal_is_exact(kind):
    """lower_sample_diagonal equals the diagonal of the autograd Hessian of the minibatch
    energy (the Jacobi preconditioner of SID's solvers)."""
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(60, 5, generator=gen, dtype=torch.float64)
    theta = torch.linspace(-2.0, 1.0, 5, dtype=torch.float64)
    if kind == "ridge":
        model = ridge_model(X[:40], X[:40, 0] + 0.1, X[40:], X[40:, 0], theta)
    elif kind == "hypercleaning":
        y = torch.randint(0, 3, (60,), generator=gen)
        model = hypercleaning_model(
            X[:40],
            y[:40],
            X[40:],
            y[40:],
            0.3 * torch.randn(40, generator=gen, dtype=torch.float64),
            3,
            fit_intercept=True,
        )
    else:
        classes = 3 if kind == "multinomial" else 2
        y = torch.randint(0, classes, (60,), generator=gen)
        if kind == "sparse":
            X = X * (torch.rand(X.shape, generator=gen) < 0.4)
            X = X.to_sparse_csr()
            Xt, Xv = X.to_dense()[:40].to_sparse_csr(), X.to_dense()[40:].to_sparse_csr()
        else:
            Xt, Xv = X[:40], X[40:]
        model = logistic_model(
            Xt, y[:40], Xv, y[40:], theta, classes, fit_intercept=kind != "no-intercept"
        )
    w = 0.3 * torch.randn(2, *model.event_shape, generator=gen, dtype=torch.float64)
    idx = torch.tensor([1, 4, 7, 20, 33])
    diag = model.lower_sample_diagonal(w, model.theta, idx)
    for b in range(2):

        def energy(v, b=b):
            return model.train_loss(v.reshape(1, *model.event_shape), model.theta, idx)

        H = torch.autograd.functional.hessian(energy, w[b].reshape(-1))
        torch.testing.assert_close(diag[b].reshape(-1), H.diagonal(), rtol=1e-10, atol=1e-12)
    full = model.lower_sample_diagonal(w, model.theta)
    assert full.shape == w.shape and bool((full > 0).all())


def test_sid_evaluates_a_mu_that_is_a_function_of_theta():
    model = _ridge()
    stated = float(model.problem.mu)
    problem = dataclasses.replace(
        model.problem, mu=lambda th, batch: torch.tensor(stated, dtype=torch.float64)
    )
    sid = SID(
        lower_solver=StochasticFixedPoint(10, 4.0, 8.0),
        linear_solver=StochasticLinearFixedPoint(5, 4.0, 8.0),
        step=0.2,
        lower_batch=12,
    )
    hg = sid(problem, None, model.init_w())
    assert hg.mu == pytest.approx(stated) and not hg.mu_estimated
    assert hg.eps.shape == (1,)


def test_sampled_hessian_operator_is_the_minibatch_hessian_and_counts_every_product(ridge):
    """AdjointMap.hessian(I) builds one gradient graph and answers every product from it:
    each equals the closed-form minibatch Hessian X_Iᵀ X_I/b + diag(exp θ) (ridge) times v,
    and each counts B·b/N products; index None is the full Hessian (one product each)."""
    w = ridge.solution().reshape(1, -1)
    cost = Cost()
    psi = AdjointMap(
        ridge.problem, w, 0.1, MinibatchSampler(0), 20, None, cost, torch.zeros_like(w)
    )
    idx = torch.tensor([0, 3, 7, 11, 19, 40, 41, 60, 99, 100])
    X = ridge.X_train
    reg = torch.diag(ridge.theta.detach().exp())
    dense = {"mini": X[idx].T @ X[idx] / len(idx) + reg, "full": X.T @ X / len(X) + reg}
    gen = torch.Generator().manual_seed(3)
    for name, index in (("mini", idx), ("full", None)):
        op = psi.hessian(index)
        before = cost.hvps
        for _ in range(3):  # products with several vectors from the same graph
            v = torch.randn(w.shape, generator=gen, dtype=w.dtype)
            torch.testing.assert_close(op(v)[0], dense[name] @ v[0], rtol=1e-12, atol=1e-12)
        per_product = len(idx) / len(X) if index is not None else 1.0
        assert cost.hvps - before == pytest.approx(3 * per_product)


@pytest.mark.parametrize("closed", [False, True])
def test_adjoint_full_graph_gives_stage_one_its_anchor(ridge, closed):
    """The full Hessian graph that stage 2 builds for its anchor also holds ∇_w h(w, θ): SID
    hands it to the variance-reduced stage 1 as its anchor at w (closed form: X^T(Xw − y)/N
    + e^θ ⊙ w), so the next call from w measures the exact lower residual with no full
    gradient (two minibatch gradients only); with autograd's graph or the model's closed-form
    sample Hessian, whose first product yields the gradient."""
    sid = dataclasses.replace(
        _adaptive_sid(ridge, batch=20),
        step=0.1,  # no power iteration
        sample_hessian=ridge.lower_sample_hessian if closed else None,
    )
    state, problem = sid.init_state(), ridge.problem  # one problem: the anchors are kept
    w0 = torch.zeros(1, ridge.X_train.shape[1], dtype=torch.float64)
    first = sid(problem, None, w0, lower_tol=1e-3, adjoint_tol=1e-6, state=state)
    anchor = state.lower_solver.state_dict()
    X, y, n = ridge.X_train, ridge.y_train, ridge.n_train
    w = first.x[0]
    exact = X.T @ (X @ w - y) / n + ridge.theta.detach().exp() * w
    assert torch.equal(anchor["anchor"], first.x)
    torch.testing.assert_close(anchor["anchor_gradient"][0], exact, rtol=1e-12, atol=1e-14)
    assert state.linear_solver.pop_full_gradient() is None  # handed over once
    # the next call starts at the anchor: g̃ = ∇h exactly, whatever the minibatch
    again = sid(
        problem,
        None,
        first.x,
        lower_tol=1.0,
        adjoint_tol=1.0,
        adjoint0=first.adjoint,
        state=state,
    )
    assert again.metrics["sid_t"] == 0
    assert again.lower_residual == pytest.approx(float(exact.norm()), rel=1e-10)
    assert again.cost.grad_evals == pytest.approx(2 * 20 / n)


@pytest.mark.parametrize(
    "kind", ["ridge", "binary", "multinomial", "sparse", "hypercleaning", "no-intercept"]
)
def test_sample_hessian_closed_form_is_exact(kind):
    """lower_sample_hessian's gradient and products equal autograd's first and second
    derivatives of the minibatch energy and of h (index None), in either order of the calls
    (the first product also yields the gradient), and primed (the scores of w first)."""
    gen = torch.Generator().manual_seed(4)
    X = torch.randn(60, 5, generator=gen, dtype=torch.float64)
    theta = torch.linspace(-2.0, 1.0, 5, dtype=torch.float64)
    if kind == "ridge":
        model = ridge_model(X[:40], X[:40, 0] + 0.1, X[40:], X[40:, 0], theta)
    elif kind == "hypercleaning":
        y = torch.randint(0, 3, (60,), generator=gen)
        logits = 0.3 * torch.randn(40, generator=gen, dtype=torch.float64)
        model = hypercleaning_model(X[:40], y[:40], X[40:], y[40:], logits, 3, fit_intercept=True)
    else:
        classes = 3 if kind == "multinomial" else 2
        y = torch.randint(0, classes, (60,), generator=gen)
        Xt, Xv = X[:40], X[40:]
        if kind == "sparse":
            mask = torch.rand(X.shape, generator=gen) < 0.4
            Xt, Xv = (X * mask)[:40].to_sparse_csr(), (X * mask)[40:].to_sparse_csr()
        model = logistic_model(
            Xt, y[:40], Xv, y[40:], theta, classes, fit_intercept=kind != "no-intercept"
        )
    w = 0.3 * torch.randn(2, *model.event_shape, generator=gen, dtype=torch.float64)
    u, v = torch.randn_like(w), torch.randn_like(w)
    for idx in (torch.tensor([1, 4, 7, 20, 33]), None):
        with torch.enable_grad():
            wr = w.clone().requires_grad_(True)
            if idx is None:
                e = model.lower_energy(wr, model.theta)
            else:
                e = model.lower_sample_energy(wr, model.theta, idx)
            (g,) = torch.autograd.grad(e.sum(), wr, create_graph=True)
            hu = torch.autograd.grad(g, wr, u, retain_graph=True)[0]
            hv = torch.autograd.grad(g, wr, v)[0]
        close = {"rtol": 1e-10, "atol": 1e-12}
        first = model.lower_sample_hessian(w, model.theta, idx)
        torch.testing.assert_close(first.product(u), hu, **close)
        torch.testing.assert_close(first.gradient(), g.detach(), **close)
        torch.testing.assert_close(first.product(v), hv, **close)
        second = model.lower_sample_hessian(w, model.theta, idx)
        torch.testing.assert_close(second.gradient(), g.detach(), **close)
        torch.testing.assert_close(second.product(v), hv, **close)
        primed = model.lower_sample_hessian(w, model.theta, idx)
        primed.prime()  # the scores of w first, products for v alone
        torch.testing.assert_close(primed.product(u), hu, **close)
        torch.testing.assert_close(primed.product(v), hv, **close)
        torch.testing.assert_close(primed.gradient(), g.detach(), **close)


def test_training_rows_are_gathered_once_per_index():
    """The rows of the last minibatch are reused for the same index tensor only while it is
    unmodified: an index changed in place gathers its new rows."""
    gen = torch.Generator().manual_seed(5)
    X = torch.randn(30, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (30,), generator=gen)
    model = logistic_model(X[:20], y[:20], X[20:], y[20:], 0.0)
    idx = torch.tensor([0, 3, 5])
    rows, labels = model._train_rows(idx)
    again, _ = model._train_rows(idx)
    assert again is rows
    assert model._train_rows(torch.tensor([0, 3, 5]))[0] is not rows  # another tensor
    w = torch.randn(1, 3, generator=gen, dtype=torch.float64)
    model._train_rows(idx)
    idx[0] = 7  # in place: the kept rows are stale
    torch.testing.assert_close(
        model.train_loss(w, index=idx), model.train_loss(w, index=torch.tensor([7, 3, 5]))
    )


@pytest.mark.parametrize("kind", ["binary", "multinomial"])
def test_sid_with_the_closed_form_equals_autograd(kind):
    """SID with the models' closed-form sample Hessian gives the hypergradients of SID with
    autograd's derivatives: same streams, same decisions, float64 rounding apart (warm-started
    calls along a path of θ with one state, so that the anchors persist)."""
    classes = 3 if kind == "multinomial" else 2
    X, y, _ = make_synthetic_classification(
        600, 6, n_informative=3, n_classes=classes, seed=2, dtype=torch.float64
    )
    runs = []
    for closed in (None, "model"):
        model = logistic_model(
            X[:400], y[:400], X[400:], y[400:], -3.0, classes, fit_intercept=True
        )
        sid = dataclasses.replace(
            _adaptive_sid(model, batch=60),
            sample_hessian=None if closed is None else model.lower_sample_hessian,
        )
        state = sid.init_state()
        w, q = model.init_w(), None
        grads = []
        gen = torch.Generator().manual_seed(1)
        for k in range(6):
            eps = 1e-3 / math.sqrt(k + 1)
            hg = sid(
                model.problem, None, w, adjoint0=q, state=state, lower_tol=eps, adjoint_tol=eps
            )
            w, q = hg.x, hg.adjoint
            grads.append((hg.grad[0], hg.metrics["sid_t"], hg.metrics["sid_k"]))
            with torch.no_grad():
                step = torch.randint(0, 2, model.theta.shape, generator=gen) * 2 - 1
                model.theta.add_(0.05 * step.to(model.theta))
        runs.append(grads)
    assert any(t > 0 for _, t, _ in runs[0]) and any(k > 0 for _, _, k in runs[0])
    for (g0, t0, k0), (g1, t1, k1) in zip(*runs):
        assert (t0, k0) == (t1, k1)
        torch.testing.assert_close(g1, g0, rtol=1e-7, atol=1e-12)


def test_sid_shares_one_preconditioner_between_its_stages():
    """Within one call the adjoint stage reuses stage 1's Jacobi preconditioner (θ is fixed
    during the call): a call whose two stages both iterate computes one diagonal."""
    X, y, _ = make_synthetic_classification(400, 5, n_informative=3, seed=3, dtype=torch.float64)
    model = logistic_model(X[:300], y[:300], X[300:], y[300:], -3.0)
    calls = []

    def diagonal(w, theta, index):
        calls.append(index.numel())
        return model.lower_sample_diagonal(w, theta, index)

    sid = dataclasses.replace(_adaptive_sid(model, batch=40), diagonal=diagonal)
    hg = sid(model.problem, None, model.init_w(), lower_tol=1e-4, adjoint_tol=1e-4)
    assert hg.metrics["sid_t"] > 0 and hg.metrics["sid_k"] > 0
    assert calls == [40]
