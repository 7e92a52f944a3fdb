"""The hypergradient-estimator protocol: methods talk to estimators only through it, the
estimators are immutable, and their state lives in checkpointed state objects."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch
from conftest import quadratic_problem
from test_stochastic import _ridge

from bilevel import (
    HOAG,
    ISGD,
    MAID,
    SID,
    BilevelError,
    Budget,
    EstimatorState,
    Exact,
    HypergradientEstimator,
    Implicit,
    JacobianFree,
    Unrolled,
    VarianceReducedFixedPoint,
    argmin,
)
from bilevel.linear import CG, Neumann
from bilevel.lower import LBFGS
from bilevel.methods import fixed_iterations
from bilevel.methods.testing import quadratic_finite_sum
from bilevel.stochastic import (
    StochasticFixedPoint,
    StochasticLinearFixedPoint,
    finite_sum_problem,
)

F64 = torch.float64


class _Counter(EstimatorState):
    """A state with something to checkpoint: the number of calls so far."""

    def __init__(self) -> None:
        self.calls = 0

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls}

    def load_state_dict(self, state: Any) -> None:
        self.calls = int(state["calls"])


@dataclasses.dataclass(frozen=True)
class _Spy(HypergradientEstimator):
    """Implements the protocol only, by delegating to ``inner``: it has none of the fields of
    the library's estimators (no lower_solver, constants, compute_bound, warn_unconverged,
    samplers), so a method that reached past the protocol would fail on it."""

    inner: HypergradientEstimator

    def __post_init__(self) -> None:  # the calls seen, outside the configuration
        object.__setattr__(self, "log", [])

    def init_state(self) -> _Counter:
        return _Counter()

    def with_bound(self) -> _Spy:
        self.log.append("with_bound")
        out = _Spy(self.inner.with_bound())
        object.__setattr__(out, "log", self.log)
        return out

    def solve_lower(self, lower, x0, tol, mu):
        self.log.append("solve_lower")
        return self.inner.solve_lower(lower, x0, tol, mu)

    def stated_constants(self):
        self.log.append("stated_constants")
        return self.inner.stated_constants()

    def __call__(self, problem, batch, x0, *, state=None, **kwargs):
        assert isinstance(state, _Counter)  # the method carries the state it was given
        state.calls += 1
        self.log.append("call")
        return self.inner(problem, batch, x0, **kwargs)


def _run(method, q, steps, **kw):
    with torch.no_grad():
        q.theta.zero_()
    return method.run(q.problem, q.samples, Budget(steps=steps), **kw)


@pytest.mark.parametrize("kind", ["isgd", "maid", "hoag"])
def test_a_protocol_only_estimator_works_with_every_method(kind):
    q = quadratic_finite_sum(n=24, spread=0.1, seed=3)
    inner = q.estimator()

    def method(est):
        if kind == "isgd":
            return ISGD(step=0.2, accuracy=1e-6, batch_size=6, estimator=est)
        if kind == "maid":
            return MAID(estimator=est, lower_tol=1e-3)
        return HOAG(estimator=est, accuracy="poly:1e-2,2")

    spy = _Spy(inner)
    state = spy.init_state()
    watched = _run(method(spy), q, 4, estimator_state=state)
    plain = _run(method(inner), q, 4)
    assert torch.equal(watched.theta[0], plain.theta[0])  # the same run, step for step
    assert state.calls == spy.log.count("call") >= 4
    if kind != "isgd":  # the line search: ω switched on, trials solved, L_f read
        assert {"with_bound", "solve_lower", "stated_constants"} <= set(spy.log)


def test_the_estimator_state_round_trips_through_a_checkpoint(tmp_path):
    q = quadratic_finite_sum(n=24, spread=0.1, seed=4)
    spy = _Spy(q.estimator())
    method = ISGD(step=0.2, accuracy=1e-6, batch_size=6, estimator=spy)
    run = {"run_dir": tmp_path / "run", "checkpoint_every": 1}
    first = spy.init_state()
    _run(method, q, 3, estimator_state=first, **run)
    assert first.calls == 3
    resumed = spy.init_state()
    with torch.no_grad():
        q.theta.zero_()
    result = method.run(
        q.problem, q.samples, Budget(steps=5), resume=True, estimator_state=resumed, **run
    )
    assert result.step == 5 and resumed.calls == 5  # 3 restored + 2 new
    with pytest.raises(BilevelError, match="keeps no state"):
        EstimatorState().load_state_dict({"calls": 1})
    with pytest.raises(BilevelError, match="estimator_state must be an EstimatorState"):
        _run(method, q, 1, estimator_state={"calls": 0})
    with pytest.raises(BilevelError, match="SIDState"):
        SID()(_ridge().problem, None, _ridge().init_w(), state=EstimatorState())


def _svrg_sid(**kw) -> SID:
    return SID(
        lower_solver=VarianceReducedFixedPoint(5, 0.5),
        linear_solver=StochasticLinearFixedPoint.constant(0.5, 5),
        step=0.2,
        lower_batch=10,
        linear_batch=10,
        final_batch=10,
        **kw,
    )


def test_estimators_are_immutable_and_replace_shares_no_state():
    ridge = _ridge()
    sid = _svrg_sid()
    with pytest.raises(dataclasses.FrozenInstanceError):
        sid.step = 1.0  # type: ignore[misc]
    other = dataclasses.replace(sid, final_minibatches=2)
    assert other == sid.with_(final_minibatches=2)
    a, b = sid.init_state(), other.init_state()
    assert a.lower_solver is not b.lower_solver is not sid.lower_solver
    x0 = ridge.init_w()
    first = sid(ridge.problem, None, x0, state=a)
    # the SVRG anchor lives in the state that was used, nowhere else
    assert a.lower_solver.anchored and not b.lower_solver.anchored
    assert not sid.lower_solver.anchored and not other.lower_solver.anchored
    # a call without a state is a pure function of the configuration and its inputs
    assert torch.equal(sid(ridge.problem, None, x0).grad[0], first.grad[0])
    assert torch.equal(sid(ridge.problem, None, x0).grad[0], first.grad[0])
    # the functional way to swap one solver
    est = Implicit(CG(max_iter=7))
    swapped = est.with_(lower_solver=LBFGS(max_iter=9))
    assert isinstance(swapped.lower_solver, LBFGS) and swapped.linear_solver is est.linear_solver
    assert not isinstance(est.lower_solver, LBFGS)


def test_fixed_work_and_with_bound_are_the_estimators_own():
    implicit = Implicit(Neumann(terms=50)).fixed_work(3, 4)
    assert implicit.lower_solver.max_iter == 3 and implicit.linear_solver.terms == 4
    assert not implicit.warn_unconverged
    assert Exact().fixed_work(5, 6).lower_solver.max_iter == 5
    assert Unrolled(steps=40).fixed_work(7, 7).steps == 7
    assert fixed_iterations(6, estimator=Unrolled()).estimator.steps == 6
    with pytest.raises(BilevelError, match="no iteration caps"):
        fixed_iterations(3, estimator=SID())
    assert JacobianFree().with_bound().compute_bound is True
    bound = Implicit(compute_bound=True)
    assert bound.with_bound() is bound
    with pytest.raises(BilevelError, match="refuses it"):
        MAID(estimator=Implicit(compute_bound=False))
    for est in (Unrolled(), SID()):
        with pytest.raises(BilevelError, match="reports none"):
            HOAG(estimator=est)
    with pytest.raises(BilevelError, match="no certified lower-level solve"):
        Unrolled().solve_lower(None, None, 1e-3, None)  # type: ignore[arg-type]
    with pytest.raises(BilevelError, match="HypergradientEstimator"):
        ISGD(estimator=lambda *a, **k: None)  # type: ignore[arg-type]
    # argmin's forward pass is a certified lower solve: adjoint estimators only
    problem, batch, _ = quadratic_problem()
    with pytest.raises(BilevelError, match="AdjointEstimator"):
        argmin(
            problem.lower_energy,
            problem.theta,
            torch.zeros(4, 6, dtype=F64),
            batch,
            estimator=Unrolled(),
        )


def test_every_estimator_adds_the_upper_regulariser_once():
    """z(problem + r) − z(problem) = ∇r(θ) and the loss grows by r(θ), for every estimator."""

    def r(theta):
        return 0.5 * (theta * theta).sum() + theta.sum()

    problem, batch, _ = quadratic_problem()
    x0 = torch.zeros(4, 6, dtype=F64)
    ridge = _ridge()
    cases = [
        (Implicit(CG(max_iter=200)), problem, batch, x0, {"lower_tol": 1e-10}),
        (JacobianFree(), problem, batch, x0, {"lower_tol": 1e-10}),
        (Exact(), problem, batch, x0, {"lower_tol": 1e-10}),
        (Unrolled(steps=20), problem, batch, x0, {}),
        (
            SID(
                lower_solver=StochasticFixedPoint.constant(1.0, 10),
                linear_solver=StochasticLinearFixedPoint.constant(1.0, 10),
                step=0.2,
                lower_batch=10,
                linear_batch=10,
                final_batch=10,
            ),
            ridge.problem,
            None,
            ridge.init_w(),
            {},
        ),
    ]
    for est, prob, b, start, kw in cases:
        theta = prob.theta.detach()
        with_r = dataclasses.replace(prob, upper_regulariser=r)
        plain, reg = est(prob, b, start, **kw), est(with_r, b, start, **kw)
        torch.testing.assert_close(reg.grad[0] - plain.grad[0], theta + 1.0)
        assert reg.loss - plain.loss == pytest.approx(float(r(theta)), rel=1e-12)
        assert math.isfinite(reg.loss)


def test_a_finite_sum_problem_is_written_with_one_energy():
    """finite_sum_problem: h is the sample energy on all N positions; SID and AID agree with
    the problem written with two energies, and with the closed form."""
    ridge = _ridge()
    p = ridge.problem
    one = finite_sum_problem(
        ridge.lower_sample_energy,
        ridge.upper_loss,
        ridge.theta,
        ridge.n_train,
        mu=p.mu,
        lipschitz=p.lipschitz,
        upper_sample_loss=p.finite_sum.upper_loss,
        n_upper_samples=p.finite_sum.n_upper,
    )
    x0 = ridge.init_w()
    torch.testing.assert_close(one.energy(x0 + 0.3, None), p.energy(x0 + 0.3, None))
    aid = Implicit(CG(max_iter=500))(one, None, x0, lower_tol=1e-11, adjoint_tol=1e-11)
    torch.testing.assert_close(aid.grad[0], ridge.hypergradient(), rtol=1e-7, atol=1e-10)
    sid = _svrg_sid(upper_batch=5)
    assert torch.equal(sid(one, None, x0).grad[0], sid(p, None, x0).grad[0])
    with pytest.raises(BilevelError, match="batch must be None"):
        one.energy(x0, torch.zeros(1))
    with pytest.raises(BilevelError, match="n_samples"):
        finite_sum_problem(ridge.lower_sample_energy, ridge.upper_loss, ridge.theta, 0)
