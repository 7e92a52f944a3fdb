"""Upper-level methods on a finite-sum quadratic bilevel problem with a closed-form ∇F."""

from __future__ import annotations

import json
import math
import signal
import statistics
import warnings

import pytest
import torch

from bilevel import BilevelError, BilevelProblem, Unrolled
from bilevel.methods import (
    HOAG,
    ISGD,
    MAID,
    Budget,
    TensorSamples,
    fixed_iterations,
    with_initial,
)
from bilevel.methods.testing import quadratic_finite_sum
from bilevel.runs import METRIC_KEYS


@pytest.fixture(autouse=True)
def one_thread():
    """These problems are tiny: one thread avoids contention on shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def grad_norms(q, history):
    return [float(q.gradient(h[0]).norm()) for h in history]


def isgd(q, **kwargs):
    kwargs.setdefault("estimator", q.estimator())
    return ISGD(**kwargs)


def run(method, q, budget, **kwargs):
    kwargs.setdefault("progress", False)
    kwargs.setdefault("plot", False)
    return method.run(q.problem, q.samples, budget, **kwargs)


def strip_time(records):
    return [{k: v for k, v in r.items() if k != "wall_time"} for r in records]


# ----------------------------------------------------------------------------- convergence


def test_isgd_with_decreasing_step_and_accuracy_drives_gradient_to_zero():
    q = quadratic_finite_sum(n=120, spread=1.0, seed=1)
    method = isgd(q, step="poly:0.5,0.5", accuracy="poly:1e-1,0.5", batch_size=10)
    result = run(method, q, Budget(steps=300), keep_history=True)
    assert result.status == "budget" and result.step == 300
    assert result.epoch == 300 * 10 // 120
    g = grad_norms(q, result.history)
    assert g[0] > 1.0
    assert statistics.median(g[-30:]) < g[0] / 30, (g[0], g[-30:])
    assert torch.equal(result.theta[0], q.theta.detach())
    assert torch.equal(result.history[-1][0], result.theta[0])
    # the cost is cumulative and grows with every step
    costs = [r["cost"] for r in result.records]
    assert all(b > a for a, b in zip(costs, costs[1:]))
    assert costs[-1] == result.cost


def test_constant_accuracy_stalls_at_a_floor_that_shrinks_with_the_accuracy():
    floors = []
    for eps in (1e-1, 1e-2, 1e-3):
        q = quadratic_finite_sum(n=120, spread=1e-3, seed=2)
        method = isgd(q, step="poly:0.5,0.5", accuracy=eps, batch_size=10)
        result = run(method, q, Budget(steps=150), keep_history=True)
        floors.append(statistics.median(grad_norms(q, result.history)[-40:]))
    assert floors[0] > 3 * floors[1] > 9 * floors[2], floors


def _check_line_search_run(q, result):
    assert result.records
    thetas = result.history
    accepted = 0
    for k, record in enumerate(result.records):
        before, after = thetas[k][0], thetas[k + 1][0]
        if record["accepted"]:
            accepted += 1
            assert q.objective(after) < q.objective(before), k
            assert record["alpha"] > 0
        else:
            assert torch.equal(before, after), k
    assert accepted >= 3
    costs = [r["cost"] for r in result.records]
    assert all(b > a for a, b in zip(costs, costs[1:]))
    return accepted


def test_every_step_maid_accepts_decreases_the_true_objective():
    q = quadratic_finite_sum(n=120, spread=1.0, seed=3)
    f0 = q.objective()
    method = MAID(estimator=q.estimator(), step=1.0, lower_tol=1e-1)
    result = run(method, q, Budget(steps=25), keep_history=True)
    assert result.status == "budget"
    _check_line_search_run(q, result)
    assert all(r["certified"] for r in result.records)
    assert q.objective() < f0 - 0.5 * (f0 - q.objective(q.minimiser()))
    # the accuracy adapts: it is tightened after failures and descent-check refusals
    eps = [r["eps"] for r in result.records]
    assert min(eps) < 1e-2 < max(eps)


def test_hoag_uses_the_same_certified_line_search():
    q = quadratic_finite_sum(n=120, spread=1.0, seed=3)
    method = HOAG(estimator=q.estimator(), step=1.0, accuracy="poly:1e-1,2")
    result = run(method, q, Budget(steps=12), keep_history=True)
    _check_line_search_run(q, result)
    assert [r["eps"] for r in result.records] == [0.1 / (k + 1) ** 2 for k in range(12)]


def test_maid_converged_status_with_grad_tol():
    q = quadratic_finite_sum(n=50, spread=1e-3, seed=4)
    method = MAID(estimator=q.estimator(), step=1.0, lower_tol=1e-2, grad_tol=0.5)
    result = run(method, q, Budget(steps=200))
    assert result.status == "converged", result.message
    assert float(q.gradient().norm()) <= 0.5


def test_maid_budget_stops_a_long_line_search_between_trials():
    """A first trial step far too large makes the line search backtrack many times, each
    trial a costly lower-level solve: an oracle-call budget that runs out during the line
    search ends the run there, θ unchanged, overshooting by less than one trial."""

    def method(q):
        return MAID(estimator=q.estimator(), step=1e4, max_backtracks=40, lower_tol=1e-3)

    q = quadratic_finite_sum(n=8, seed=1)
    full = run(method(q), q, Budget(steps=1)).records[0]
    assert full["accepted"] and full["backtracks"] >= 10
    q = quadratic_finite_sum(n=8, seed=1)
    index = torch.arange(q.n)
    batch, x0 = q.samples.batch(index), q.samples.initial(index)
    hg_cost = q.estimator()(q.problem, batch, x0, lower_tol=1e-3, adjoint_tol=1e-3).cost
    per_trial = (full["cost"] - hg_cost.oracle_calls) / full["backtracks"]
    budget = int(hg_cost.oracle_calls + 2 * per_trial)
    result = run(method(q), q, Budget(oracle_calls=budget))
    (record,) = result.records
    assert result.status == "budget" and result.step == 1
    assert not record["accepted"] and 1 <= record["backtracks"] < full["backtracks"] // 2
    assert budget <= result.cost < full["cost"] / 2
    assert torch.equal(q.theta.detach(), torch.zeros_like(q.theta))  # the step was not taken


# ----------------------------------------------------------------------------- resume


def _interrupt_at(step):
    def evaluate(theta, k):
        if k == step and not evaluate.fired:
            evaluate.fired = True
            raise KeyboardInterrupt
        return {"probe": float(torch.rand(()))}  # draws from the global generator

    evaluate.fired = False
    return evaluate


def _probe(theta, k):
    return {"probe": float(torch.rand(()))}


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_interrupted_and_resumed_isgd_equals_uninterrupted_run(tmp_path, optimizer):
    def setup():
        q = quadratic_finite_sum(n=40, spread=1.0, seed=5)
        options = {"momentum": 0.5} if optimizer == "sgd" else {}
        method = isgd(
            q,
            step="poly:0.2,0.5",
            accuracy="poly:1e-1,0.25",
            batch_size=7,  # 40 = 5 * 7 + 5: a partial batch at the end of each epoch
            optimizer=optimizer,
            optimizer_options=options,
            seed=11,
        )
        return q, method

    total, every = 25, 4
    torch.manual_seed(0)
    q, method = setup()
    reference = run(
        method,
        q,
        Budget(steps=total),
        run_dir=tmp_path / "a",
        evaluate=_probe,
        checkpoint_every=every,
    )
    assert reference.status == "budget"

    # interrupted from inside step 13 (after the checkpoint of step 12), then resumed
    torch.manual_seed(0)
    q, method = setup()
    stopped = run(
        method,
        q,
        Budget(steps=total),
        run_dir=tmp_path / "b",
        evaluate=_interrupt_at(13),
        checkpoint_every=every,
    )
    assert stopped.status == "interrupted" and stopped.step == 13
    assert "resume" in stopped.message
    torch.manual_seed(123)  # a new process would start from other generator states
    q, method = setup()
    resumed = run(
        method,
        q,
        Budget(steps=total),
        run_dir=tmp_path / "b",
        resume=True,
        evaluate=_probe,
        checkpoint_every=every,
    )
    assert resumed.status == "budget" and resumed.step == total
    assert torch.equal(resumed.theta[0], reference.theta[0])
    assert strip_time(resumed.records) == strip_time(reference.records)

    # stopped by a smaller budget between checkpoints, then continued with the full budget
    torch.manual_seed(0)
    q, method = setup()
    first = run(
        method, q, Budget(steps=10), run_dir=tmp_path / "c", evaluate=_probe, checkpoint_every=every
    )
    assert first.step == 10
    q, method = setup()
    rest = run(
        method,
        q,
        Budget(steps=total),
        run_dir=tmp_path / "c",
        resume=True,
        evaluate=_probe,
        checkpoint_every=every,
    )
    assert torch.equal(rest.theta[0], reference.theta[0])
    assert strip_time(rest.records) == strip_time(reference.records)


def _signal_in_projection(step):
    """A projection that sends SIGINT to the process while step ``step`` is being applied."""
    calls = []

    def project(theta):
        calls.append(None)
        if len(calls) == step + 1:
            signal.raise_signal(signal.SIGINT)

    return project


def test_sigint_during_the_update_is_deferred_until_the_step_is_complete(tmp_path):
    def setup(fire_at):
        q = quadratic_finite_sum(n=30, spread=1.0, seed=20)
        method = isgd(
            q, step=0.1, accuracy=1e-2, batch_size=4, projection=_signal_in_projection(fire_at)
        )
        return q, method

    q, method = setup(-1)
    reference = run(method, q, Budget(steps=9), run_dir=tmp_path / "a", checkpoint_every=4)
    q, method = setup(5)
    stopped = run(method, q, Budget(steps=9), run_dir=tmp_path / "b", checkpoint_every=4)
    assert stopped.status == "interrupted" and stopped.step == 6  # step 5 was completed
    assert len(stopped.records) == 6
    q, method = setup(-1)
    resumed = run(
        method, q, Budget(steps=9), run_dir=tmp_path / "b", resume=True, checkpoint_every=4
    )
    assert torch.equal(resumed.theta[0], reference.theta[0])
    assert strip_time(resumed.records) == strip_time(reference.records)


def test_resume_after_a_kill_between_checkpoints(tmp_path):
    """A run killed without warning restarts from its last periodic checkpoint."""
    q = quadratic_finite_sum(n=30, spread=1.0, seed=6)
    method = isgd(q, step=0.1, accuracy=1e-2, batch_size=4, optimizer="rmsprop")
    reference = run(method, q, Budget(steps=12), run_dir=tmp_path / "a", checkpoint_every=5)

    q = quadratic_finite_sum(n=30, spread=1.0, seed=6)
    run(method, q, Budget(steps=12), run_dir=tmp_path / "b", checkpoint_every=5)
    # simulate a kill after step 7: the log holds 8 lines, the last checkpoint is at step 5
    d = tmp_path / "b"
    (d / "checkpoint.pt").replace(d / "final.pt")
    (d / "checkpoint.prev.pt").replace(d / "checkpoint.pt")  # the checkpoint of step 10
    lines = (d / "metrics.jsonl").read_text().splitlines(keepends=True)
    (d / "metrics.jsonl").write_text("".join(lines[:11]) + '{"step": 11, "trunc')
    q = quadratic_finite_sum(n=30, spread=1.0, seed=6)
    resumed = run(method, q, Budget(steps=12), run_dir=d, resume=True, checkpoint_every=5)
    assert torch.equal(resumed.theta[0], reference.theta[0])
    assert strip_time(resumed.records) == strip_time(reference.records)


def test_maid_resume_equals_uninterrupted_run(tmp_path):
    def setup():
        q = quadratic_finite_sum(n=40, spread=1.0, seed=7)
        return q, MAID(estimator=q.estimator(), step=1.0, lower_tol=1e-1)

    torch.manual_seed(0)
    q, method = setup()
    reference = run(
        method, q, Budget(steps=10), run_dir=tmp_path / "a", checkpoint_every=3, evaluate=_probe
    )
    torch.manual_seed(0)
    q, method = setup()
    stopped = run(
        method,
        q,
        Budget(steps=10),
        run_dir=tmp_path / "b",
        checkpoint_every=3,
        evaluate=_interrupt_at(5),
    )
    assert stopped.status == "interrupted"
    q, method = setup()
    resumed = run(
        method,
        q,
        Budget(steps=10),
        run_dir=tmp_path / "b",
        resume=True,
        checkpoint_every=3,
        evaluate=_probe,
    )
    assert torch.equal(resumed.theta[0], reference.theta[0])
    assert strip_time(resumed.records) == strip_time(reference.records)


def test_resume_refuses_a_different_configuration(tmp_path):
    q = quadratic_finite_sum(n=20, seed=8)
    run(isgd(q, step=0.1, batch_size=4), q, Budget(steps=2), run_dir=tmp_path)
    q = quadratic_finite_sum(n=20, seed=8)
    with pytest.raises(BilevelError, match="batch_size"):
        run(isgd(q, step=0.1, batch_size=5), q, Budget(steps=4), run_dir=tmp_path, resume=True)
    with pytest.raises(BilevelError, match="already holds a run"):
        run(isgd(q, step=0.1, batch_size=4), q, Budget(steps=4), run_dir=tmp_path)


def test_interrupt_without_run_directory_returns_cleanly():
    q = quadratic_finite_sum(n=20, seed=9)
    result = run(isgd(q, step=0.1, batch_size=4), q, Budget(steps=10), evaluate=_interrupt_at(3))
    assert result.status == "interrupted" and result.step == 3 and not result.ok
    assert len(result.records) == 3


# ----------------------------------------------------------------------------- run directory


def test_run_directory_holds_config_metrics_checkpoint_and_plots(tmp_path):
    q = quadratic_finite_sum(n=30, seed=10)
    method = isgd(q, step="poly:0.3,0.5", accuracy="geom:1e-1,0.9", batch_size=6)
    result = method.run(
        q.problem,
        q.samples,
        Budget(oracle_calls=3000),
        run_dir=tmp_path,
        evaluate=lambda theta, k: {"grad_F": q.gradient(theta).norm()},
        eval_every=2,
        plot=True,
    )
    assert result.status == "budget" and "oracle-call" in result.message
    assert result.cost >= 3000 and result.records[-2]["cost"] < 3000
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["method"] == "isgd"
    assert config["isgd"]["accuracy"]["lower"] == {
        "kind": "geometric",
        "initial": 0.1,
        "ratio": 0.9,
    }
    assert config["isgd"]["estimator"]["type"] == "Implicit"
    assert config["problem"]["samples"] == 30
    records = result.records
    for r in records:
        assert set(METRIC_KEYS) <= set(r)
        assert r["bound"] > 0 and r["eps"] == pytest.approx(0.1 * 0.9 ** r["step"])
    assert all(("grad_F" in r) == (r["step"] % 2 == 0) for r in records)
    assert records[-1]["epoch"] == (len(records) - 1) * 6 // 30
    assert result.evaluation is not None and "grad_F" in result.metrics
    assert (tmp_path / "checkpoint.pt").exists() and (tmp_path / "result.json").exists()
    plots = {p.name for p in (tmp_path / "plots").iterdir()}
    assert {"upper_loss_vs_cost.png", "grad_F_vs_cost.png"} <= plots


# ----------------------------------------------------------------------------- guards


def test_non_finite_loss_stops_and_restores_last_good_theta():
    q = quadratic_finite_sum(n=40, spread=1.0, seed=12)
    target = q.minimiser()
    j = int(target.abs().argmax())
    threshold = 0.5 * float(target[j])
    sign = 1.0 if threshold > 0 else -1.0
    base = q.problem.upper_loss

    def upper_loss(x, th, batch):
        loss = base(x, th, batch)
        crossed = sign * th[j] > sign * threshold
        return torch.where(crossed, torch.full_like(loss, math.nan), loss)

    problem = BilevelProblem(
        q.problem.lower_energy, upper_loss, q.theta, mu=q.mu, lipschitz=q.lipschitz
    )
    method = isgd(q, step=0.2, accuracy=1e-3, batch_size=8)
    with pytest.warns(RuntimeWarning, match="(?i)non-finite|nan"):
        result = method.run(
            problem, q.samples, Budget(steps=500), progress=False, keep_history=True
        )
    assert result.status == "non_finite"
    assert "step" in result.message and result.step < 500
    theta = q.theta.detach()
    assert sign * float(theta[j]) <= sign * threshold  # the last good θ, not the crossing one
    assert torch.equal(theta, result.theta[0]) and torch.equal(theta, result.history[-1][0])
    assert len(result.history) == result.step  # the crossing step was undone
    assert all(math.isfinite(r["upper_loss"]) for r in result.records)


def test_non_finite_step_is_undone():
    q = quadratic_finite_sum(n=20, seed=13)
    method = isgd(q, step=1e308, accuracy=1e-2, batch_size=4)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        result = run(method, q, Budget(steps=5))
    assert result.status == "non_finite" and result.step == 0
    assert torch.equal(q.theta.detach(), torch.zeros(5, dtype=torch.float64))


def test_bad_options_have_clear_messages():
    q = quadratic_finite_sum(n=20, seed=14)
    with pytest.raises(BilevelError, match="unknown optimiser 'adamm'"):
        ISGD(optimizer="adamm")
    with pytest.raises(BilevelError, match="batch_size must be a positive integer"):
        ISGD(batch_size=0)
    with pytest.raises(BilevelError, match="exceeds the number of samples 20"):
        run(ISGD(batch_size=21), q, Budget(steps=1))
    with pytest.raises(BilevelError, match="at least one limit"):
        Budget()
    with pytest.raises(BilevelError, match="steps must be a finite positive"):
        Budget(steps=0)
    with pytest.raises(BilevelError, match="must not set lr"):
        run(ISGD(optimizer_options={"lr": 1.0}), q, Budget(steps=1))
    with pytest.raises(BilevelError, match="bad options"):
        run(ISGD(optimizer_options={"nonsense": 1.0}), q, Budget(steps=1))
    with pytest.raises(BilevelError, match="clashes"):
        run(isgd(q), q, Budget(steps=1), evaluate=lambda t, k: {"cost": 1.0})
    with pytest.raises(BilevelError, match="lacks initial; wrap it with with_initial"):
        ISGD().run(q.problem, object.__new__(_NoInitial), Budget(steps=1))
    with pytest.raises(BilevelError, match="backtrack must lie in"):
        MAID(backtrack=1.0)
    with pytest.raises(BilevelError, match="reports none"):
        run(MAID(estimator=Unrolled(steps=5)), q, Budget(steps=1))
    with pytest.raises(BilevelError, match="resume=True needs a run_dir"):
        run(isgd(q), q, Budget(steps=1), resume=True)


class _NoInitial:
    def __len__(self):
        return 3

    def batch(self, index):
        return None


# ----------------------------------------------------------------------------- variants


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "rmsprop", "adagrad", "factory"])
def test_optimiser_variants_run_and_reduce_the_gradient(optimizer):
    q = quadratic_finite_sum(n=40, spread=0.1, seed=15)
    if optimizer == "factory":
        optimizer = lambda params: torch.optim.SGD(params, lr=123.0, momentum=0.9)  # noqa: E731
    step = {"sgd": 0.3, "adagrad": 0.5}.get(optimizer, 0.05)
    method = isgd(q, step=step, accuracy=1e-3, batch_size=8, optimizer=optimizer)
    result = run(method, q, Budget(steps=60), keep_history=True)
    g = grad_norms(q, result.history)
    assert g[-1] < 0.3 * g[0], (optimizer, g[0], g[-1])
    # the step schedule, not the factory's lr, sets the learning rate
    assert all(r["alpha"] == step for r in result.records)


def test_projections_in_place_and_returned():
    q = quadratic_finite_sum(n=40, spread=0.1, seed=16)

    def nonnegative(theta):
        theta.clamp_(min=0.0)

    result = run(
        isgd(q, step=0.3, accuracy=1e-2, batch_size=8, projection=nonnegative),
        q,
        Budget(steps=30),
        keep_history=True,
    )
    assert all(bool((h[0] >= 0).all()) for h in result.history)
    assert bool((q.minimiser() < 0).any())  # the projection was active

    q = quadratic_finite_sum(n=40, spread=0.1, seed=16)
    result = run(
        isgd(
            q, step=0.3, accuracy=1e-2, batch_size=8, projection=lambda theta: theta - theta.mean()
        ),
        q,
        Budget(steps=30),
        keep_history=True,
    )
    assert all(abs(float(h[0].sum())) < 1e-12 for h in result.history[1:])


def test_maid_projection_and_full_batch():
    q = quadratic_finite_sum(n=30, spread=1.0, seed=16)
    seen = []

    class Recording(TensorSamples):
        def batch(self, index):
            seen.append(index.numel())
            return super().batch(index)

    samples = Recording((q.c, q.t), x_init=torch.zeros(30, 10, dtype=torch.float64))
    result = MAID(estimator=q.estimator(), step=1.0, projection=lambda t: t.clamp_(min=0)).run(
        q.problem, samples, Budget(steps=5), progress=False, plot=False, keep_history=True
    )
    assert seen == [30]  # one full batch, built once
    assert all(bool((h[0] >= 0).all()) for h in result.history)


def test_sampling_without_replacement_reshuffled_each_epoch():
    q = quadratic_finite_sum(n=30, seed=17)
    batches = []

    class Recording(TensorSamples):
        def batch(self, index):
            batches.append(index.clone())
            return super().batch(index)

    def samples():
        return Recording((q.c, q.t), x_init=torch.zeros(30, 10, dtype=torch.float64))

    method = isgd(q, step=0.1, accuracy=1e-2, batch_size=8, seed=3)
    method.run(q.problem, samples(), Budget(epochs=3), progress=False, plot=False)
    assert [b.numel() for b in batches] == [8, 8, 8, 6] * 3
    epochs = [torch.cat(batches[4 * e : 4 * e + 4]) for e in range(3)]
    for e in epochs:
        assert torch.equal(e.sort().values, torch.arange(30))
    assert not torch.equal(epochs[0], epochs[1])

    batches.clear()
    q.problem.theta.data.zero_()
    drop = isgd(q, step=0.1, accuracy=1e-2, batch_size=8, seed=3, drop_last=True)
    result = drop.run(q.problem, samples(), Budget(steps=6), progress=False, plot=False)
    assert [b.numel() for b in batches] == [8] * 6 and result.epoch == 2


def test_warm_starts_reduce_the_cost():
    def cost(warm_start):
        q = quadratic_finite_sum(n=40, spread=0.1, seed=18)
        method = isgd(q, step="poly:0.3,0.5", accuracy=1e-4, batch_size=10, warm_start=warm_start)
        return run(method, q, Budget(epochs=4)).cost

    warm, cold = cost(True), cost(False)
    assert warm < 0.9 * cold, (warm, cold)


def test_fixed_iterations_baseline_spends_the_same_effort_every_step():
    q = quadratic_finite_sum(n=40, spread=0.1, seed=19)
    method = fixed_iterations(3, estimator=q.estimator(), step=0.2, batch_size=8)
    assert method.estimator.lower_solver.max_iter == 3
    assert method.estimator.linear_solver.max_iter == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = run(method, q, Budget(steps=10), keep_history=True)
    costs = [0] + [r["cost"] for r in result.records]
    per_step = [b - a for a, b in zip(costs, costs[1:])]
    # from step 1 on every adjoint solve is warm-started (one extra residual product)
    assert len(set(per_step[1:])) == 1 and per_step[0] < per_step[1], per_step
    assert result.records[-1]["distance"] > 0
    g = grad_norms(q, result.history)
    assert g[-1] < g[0]
    with pytest.raises(BilevelError, match="sets the accuracy"):
        fixed_iterations(3, accuracy=1e-3)


def test_tensor_samples_and_with_initial():
    y = torch.arange(12.0).reshape(4, 3)
    s = TensorSamples(y, x_init=lambda b: 2 * b)
    index = torch.tensor([2, 0])
    assert torch.equal(s.batch(index), y[index])
    assert torch.equal(s.initial(index), 2 * y[index])
    s2 = TensorSamples((y, y + 1), x_init=torch.zeros(4, 3))
    assert len(s2) == 4 and isinstance(s2.batch(index), tuple)
    torch.testing.assert_close(s2.batch(index)[1], y[index] + 1)
    s3 = TensorSamples({"y": y}, x_init=torch.zeros(4, 3))  # the form given is kept
    assert set(s3.batch(index)) == {"y"} and torch.equal(s3.batch(index)["y"], y[index])
    assert TensorSamples(x_init=torch.zeros(5, 2)).batch(index) is None
    with pytest.raises(BilevelError, match="disagree"):
        TensorSamples((y, torch.zeros(5)), x_init=torch.zeros(4, 3))
    with pytest.raises(BilevelError, match="expected 4"):
        TensorSamples(y, x_init=torch.zeros(5, 3))
    with pytest.raises(BilevelError, match="batch must be a tensor"):
        TensorSamples("y", x_init=torch.zeros(4, 3))

    class Data:
        def __len__(self):
            return 4

        def batch(self, index):
            return (y[index],)

    w = with_initial(Data(), lambda b: b[0].clone())
    assert len(w) == 4 and torch.equal(w.initial(index), y[index])


def test_evaluation_time_is_not_counted_in_wall_time():
    """The evaluate callback, including the final evaluation, is excluded from wall_time."""
    import time

    q = quadratic_finite_sum(n=20, seed=3)

    def slow_evaluation(theta, step):
        time.sleep(0.3)
        return {"marker": float(step)}

    result = ISGD(step=0.1, batch_size=5, estimator=q.estimator()).run(
        q.problem, q.samples, {"steps": 2}, evaluate=slow_evaluation, progress=False, plot=False
    )
    assert result.evaluation == {"marker": 2.0}
    assert result.wall_time < 0.25  # three evaluations slept 0.9 s in total
