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
