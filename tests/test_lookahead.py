"""SID's maps draw the next minibatch while an all-reduce is in flight (``_Lookahead``): the
iterates must be those without the lookahead, bit for bit."""

from __future__ import annotations

import pytest
import torch

from bilevel.learning.models import FiniteSumModel, ridge_model
from bilevel.methods import ISGD, TensorSamples
from bilevel.stochastic import (
    SID,
    PreconditionedSVRG,
    PreconditionedSVRGLinear,
    StochasticLinearFixedPoint,
    VarianceReducedFixedPoint,
    _Lookahead,
)


def _run(estimator: SID) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(90, 4, generator=gen, dtype=torch.float64)
    y = X @ torch.randn(4, generator=gen, dtype=torch.float64)
    model = ridge_model(X[:60], y[:60], X[60:], y[60:], 0.0)
    samples = TensorSamples(x_init=model.init_w(model.n_instances))
    result = ISGD(step=0.5, batch_size=1, estimator=estimator).run(
        model.problem, samples, {"steps": 3}, progress=False, plot=False
    )
    return result.theta[0]


def _fixed_counts() -> SID:
    return SID(
        lower_solver=VarianceReducedFixedPoint(15, 0.5, refresh=5),
        linear_solver=StochasticLinearFixedPoint.constant(0.5, 15),
        lower_batch=10,
        linear_batch=10,
        final_batch=10,
        seed=4,
    )


def _adaptive() -> SID:
    return SID(
        lower_solver=PreconditionedSVRG(15, 0.5),
        linear_solver=PreconditionedSVRGLinear(15, 0.5),
        lower_batch=10,
        linear_batch=10,
        final_batch=10,
        seed=4,
    )


@pytest.mark.parametrize("make", [_fixed_counts, _adaptive])
def test_drawing_ahead_leaves_sid_bit_for_bit_unchanged(make, monkeypatch):
    prepared = []
    real = FiniteSumModel._prepare_rows
    monkeypatch.setattr(
        FiniteSumModel, "_prepare_rows", lambda self, i: prepared.append(i) or real(self, i)
    )
    ahead = _run(make())
    if make is _fixed_counts:  # 3 steps of t = k = 15: every iteration but a stage's last
        assert len(prepared) == 3 * (14 + 14)
    monkeypatch.setattr(_Lookahead, "want_ahead", lambda self, wanted: None)
    prepared.clear()
    plain = _run(make())
    assert not prepared
    assert torch.equal(ahead, plain)
