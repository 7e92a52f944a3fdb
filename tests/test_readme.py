"""The README's quickstart runs as written and its hypergradient is correct."""

from __future__ import annotations

import pathlib
import re

import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs_and_matches_closed_form():
    code = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    ns: dict = {}
    exec(compile(code, "README quickstart", "exec"), ns)
    hg, X_tr, y_tr, X_va, y_va = ns["hg"], ns["X_tr"], ns["y_tr"], ns["X_va"], ns["y_va"]
    a = X_tr.T @ X_tr / 80 + torch.eye(5)
    w = torch.linalg.solve(a, X_tr.T @ y_tr / 80)
    q = torch.linalg.solve(a, X_va.T @ (X_va @ w - y_va) / 40)
    expected = -w * q
    assert torch.allclose(hg.grad[0], expected, atol=1e-4)
    assert hg.bound >= float((hg.grad[0] - expected).norm())


def _block_with(text: str) -> str:
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if text in b]
    assert len(blocks) == 1, f"expected one README python block containing {text!r}"
    return blocks[0]


def test_estimator_example_learns_and_scores():
    ns: dict = {}
    exec(compile(_block_with("BilevelLogisticRegression("), "README estimator", "exec"), ns)
    clf, X_test, y_test = ns["clf"], ns["X_test"], ns["y_test"]
    assert clf.score(X_test, y_test) > 0.93
    assert clf.strengths_.shape == (30,)
    assert clf.validation_loss_ < clf.baseline_validation_loss_


def test_sid_example_is_close_to_the_closed_form():
    ns: dict = {}
    exec(compile(_block_with("VarianceReducedFixedPoint("), "README SID", "exec"), ns)
    hg, model = ns["hg"], ns["model"]
    ref = model.hypergradient()
    assert float((hg.grad[0] - ref).norm()) < 0.1 * float(ref.norm())  # "a few per cent"
    assert 0 < hg.cost.oracle_calls < 300


def test_isgd_example_learns_a_better_tv_regulariser():
    from bilevel.imaging import SmoothedTV, psnr, reconstruct, reconstruction_problem

    ns: dict = {}
    exec(compile(_block_with("SmoothedTV("), "README ISGD", "exec"), ns)
    problem, result, y, x = ns["problem"], ns["result"], ns["y"], ns["x"]
    assert result.status == "budget" and result.cost >= 20_000
    learned = float(psnr(reconstruct(problem, (y, x), tol=1e-3), x).mean())
    initial = reconstruction_problem(SmoothedTV(strength=0.3))
    start = float(psnr(reconstruct(initial, (y, x), tol=1e-3), x).mean())
    # measured: noisy 20.2 dB, λ = 0.3 27.3 dB, learned 29.4 dB
    assert learned > float(psnr(y, x).mean()) + 8.0
    assert learned > start + 1.0
