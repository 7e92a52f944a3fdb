"""SID's maps work ahead while an all-reduce is in flight (``_Lookahead``): they draw the next
minibatch, gather its rows, and compute the next iteration's terms that do not need the
reduced value (the SVRG anchor's minibatch gradient, the adjoint map's Hessian at w, a
sampled right-hand side), and in a free wait of stage 2, stage 3's terms that do not need the
adjoint. The iterates must be those without the work ahead, bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from bilevel import distributed
from bilevel.learning.models import FiniteSumModel, logistic_model, ridge_model
from bilevel.methods import ISGD, TensorSamples
from bilevel.stochastic import (
    SID,
    AdjointMap,
    LowerMap,
    PreconditionedSVRG,
    PreconditionedSVRGLinear,
    StochasticLinearFixedPoint,
    VarianceReducedFixedPoint,
    _FinalTerms,
    _Lookahead,
    _SampledHessian,
)


def _model(kind: str) -> FiniteSumModel:
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(90, 4, generator=gen, dtype=torch.float64)
    y = X @ torch.randn(4, generator=gen, dtype=torch.float64)
    if kind == "logistic":
        return logistic_model(X[:60], (y[:60] > 0).long(), X[60:], (y[60:] > 0).long(), 0.0)
    return ridge_model(X[:60], y[:60], X[60:], y[60:], 0.0)


def _run(kind: str, make) -> torch.Tensor:
    model = _model(kind)
    samples = TensorSamples(x_init=model.init_w(model.n_instances))
    result = ISGD(step=0.5, batch_size=1, estimator=make(model)).run(
        model.problem, samples, {"steps": 3}, progress=False, plot=False
    )
    return result.theta[0]


def _fixed_counts(model: FiniteSumModel, **extra) -> SID:
    return SID(
        lower_solver=VarianceReducedFixedPoint(15, 0.5, refresh=5),
        linear_solver=StochasticLinearFixedPoint.constant(0.5, 15),
        lower_batch=10,
        linear_batch=10,
        final_batch=10,
        seed=4,
        **extra,
    )


def _closed_forms(model: FiniteSumModel) -> SID:
    return _fixed_counts(model, sample_hessian=model.lower_sample_hessian)


def _upper_minibatches(model: FiniteSumModel) -> SID:
    return _fixed_counts(model, upper_batch=7)


def _adaptive(model: FiniteSumModel) -> SID:
    return SID(
        lower_solver=PreconditionedSVRG(15, 0.5),
        linear_solver=PreconditionedSVRGLinear(15, 0.5),
        lower_batch=10,
        linear_batch=10,
        final_batch=10,
        seed=4,
    )


@pytest.fixture(params=["one process", "data parallel"])
def parallel(request, monkeypatch):
    """One process, or the data-parallel code paths in a process group of one process (the
    collectives then run, asynchronously, and the data-parallel arithmetic is used)."""
    if request.param == "one process":
        yield False
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        monkeypatch.setattr(distributed, "_SHARD", distributed.Shard(0, 1, torch.device("cpu"), 60))
        yield True
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "kind,make",
    [
        ("ridge", _fixed_counts),
        ("logistic", _closed_forms),
        ("ridge", _upper_minibatches),
        ("ridge", _adaptive),
    ],
)
def test_working_ahead_leaves_sid_bit_for_bit_unchanged(kind, make, parallel, monkeypatch):
    prepared, anchors, hessians, primed, finals = [], [], [], [], []
    real_prepare, real_lower, real_adjoint, real_wait = (
        FiniteSumModel._prepare_rows,
        LowerMap._work_ahead,
        AdjointMap._work_ahead,
        AdjointMap._meanwhile,
    )
    real_prime = _SampledHessian.prime
    monkeypatch.setattr(
        FiniteSumModel, "_prepare_rows", lambda self, i: prepared.append(i) or real_prepare(self, i)
    )
    monkeypatch.setattr(
        LowerMap, "_work_ahead", lambda self: anchors.append(self._anchor_ahead) or real_lower(self)
    )
    monkeypatch.setattr(
        AdjointMap, "_work_ahead", lambda self: hessians.append(1) or real_adjoint(self)
    )
    monkeypatch.setattr(_SampledHessian, "prime", lambda self: primed.append(1) or real_prime(self))

    def adjoint_wait(self, device):
        work = real_wait(self, device)
        finals.append(isinstance(work, _FinalTerms))
        return work

    monkeypatch.setattr(AdjointMap, "_meanwhile", adjoint_wait)
    ahead = _run(kind, make)
    assert sum(finals) == 3  # stage 3's terms without v, in a wait of stage 2 at every step
    if make is not _adaptive:  # 3 steps of t = k = 15: every iteration but a stage's last
        assert len(prepared) == 3 * (14 + 14)
        # the SVRG anchor of the next iteration is kept unless it is refreshed (every 5)
        kept = [a is not None for a in anchors]
        assert len(kept) == 3 * 14 and 0 < sum(kept) < len(kept)
        assert len(hessians) == 3 * 14
        assert len(primed) == 3 * 15  # every product at w comes from a primed Hessian
    monkeypatch.setattr(_Lookahead, "_meanwhile", lambda self, device: None)
    monkeypatch.setattr(AdjointMap, "_meanwhile", lambda self, device: None)
    prepared.clear()
    anchors.clear()
    primed.clear()
    plain = _run(kind, make)
    assert not prepared and not anchors
    if make is not _adaptive:
        assert len(primed) == 3 * 15
    assert torch.equal(ahead, plain)
