"""bilevel.argmin: the implicit-function-theorem gradient as a torch.autograd.Function."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import bilevel
from bilevel import CG, BilevelProblem, Exact, Implicit, JacobianFree
from bilevel.argmin import AdjointSolveError, AdjointSolveWarning, ArgminLayer, argmin

DT = torch.float64
TIGHT = {"lower_tol": 1e-12, "adjoint_tol": 1e-12}


def ridge_data(n_batch=3, rows=7, dim=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(rows, dim, generator=gen, dtype=DT)
    y = torch.randn(n_batch, rows, generator=gen, dtype=DT)
    t = torch.randn(n_batch, dim, generator=gen, dtype=DT)
    return a, y, t


def ridge_energy(a):
    """h_i(x, θ) = ½‖A x − y_i‖² + ½ Σ_j exp(θ_j) x_j²  (A shared, y_i per instance)."""

    def h(x, theta, y):
        return 0.5 * ((x @ a.T - y) ** 2).sum(1) + 0.5 * (theta.exp() * x * x).sum(1)

    return h


def ridge_closed_form(a, y, t, theta, rho):
    """x̂_i = (AᵀA + diag e^θ)⁻¹Aᵀy_i and ∇_θ of L = Σ_i ½‖x̂_i − t_i‖² + ρ/2‖θ‖²."""
    w = theta.exp()
    hess = a.T @ a + torch.diag(w)
    x = torch.linalg.solve(hess, (y @ a).T).T
    q = torch.linalg.solve(hess, (x - t).T).T
    # ∂x̂/∂θ_j = −H⁻¹ e_j w_j x̂_j, so ∂L/∂θ_j = −Σ_i w_j x̂_ij q_ij.
    return x, -(w * x * q).sum(0) + rho * theta


def test_ridge_gradient_equals_closed_form_with_direct_theta_term():
    a, y, t = ridge_data()
    theta = torch.tensor([0.3, -0.5, 0.1, 1.0], dtype=DT, requires_grad=True)
    rho = 0.7
    x = argmin(ridge_energy(a), theta, torch.zeros_like(t), y, mu=None, **TIGHT)
    loss = 0.5 * ((x - t) ** 2).sum() + 0.5 * rho * (theta**2).sum()
    loss.backward()
    x_ref, g_ref = ridge_closed_form(a, y, t, theta.detach(), rho)
    assert torch.allclose(x.detach(), x_ref, atol=1e-10, rtol=0)
    assert (theta.grad - g_ref).abs().max() <= 1e-8
    assert float(g_ref.abs().max()) > 1e-2  # a gradient that is not trivially zero


def test_ridge_gradient_with_respect_to_batch_tensors():
    """∂L/∂y through x̂ = H⁻¹Aᵀy is A H⁻¹ ∂L/∂x̂."""
    a, y, t = ridge_data()
    theta = torch.zeros(4, dtype=DT, requires_grad=True)
    y = y.clone().requires_grad_(True)
    x = argmin(ridge_energy(a), theta, torch.zeros_like(t), y, mu=1.0, **TIGHT)
    ((x - t) ** 2).sum().mul(0.5).backward()
    hess = a.T @ a + torch.eye(4, dtype=DT)
    q = torch.linalg.solve(hess, (x.detach() - t).T).T
    assert (y.grad - q @ a.T).abs().max() <= 1e-8


def logistic_setup(seed=1, n=40, d=5):
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, d, generator=gen, dtype=DT)
    labels = (torch.rand(n, generator=gen, dtype=DT) < 0.5).to(DT) * 2 - 1
    val_f = torch.randn(n, d, generator=gen, dtype=DT)
    val_l = (torch.rand(n, generator=gen, dtype=DT) < 0.5).to(DT) * 2 - 1

    def h(w, theta, batch):
        margins = labels * (w @ feats.T)  # (1, n)
        return torch.nn.functional.softplus(-margins).mean(1) + 0.5 * (theta.exp() * w * w).sum(1)

    def f(w, theta, batch):
        return torch.nn.functional.softplus(-val_l * (w @ val_f.T)).mean(1)

    theta = torch.linspace(-1.0, 0.5, d, dtype=DT).requires_grad_(True)
    return h, f, theta


def test_logistic_gradient_equals_the_library_implicit_estimator():
    h, f, theta = logistic_setup()
    w0 = torch.zeros(1, 5, dtype=DT)
    mu = float(theta.detach().exp().min())
    w = argmin(h, theta, w0, mu=mu, **TIGHT)
    f(w, theta, None).sum().backward()
    ref = Implicit(CG())(BilevelProblem(h, f, theta, mu=mu), None, w0, **TIGHT)
    assert (theta.grad - ref.grad[0]).abs().max() <= 1e-8
    assert float(ref.grad[0].abs().max()) > 1e-4


def test_gradcheck_on_theta_and_batch():
    a, y, _ = ridge_data(n_batch=2, rows=5, dim=3)
    y = y.clone().requires_grad_(True)
    theta = torch.tensor([0.2, -0.3, 0.4], dtype=DT, requires_grad=True)

    def fn(th, yy):
        return argmin(ridge_energy(a), th, torch.zeros(2, 3, dtype=DT), yy, mu=None, **TIGHT)

    assert torch.autograd.gradcheck(fn, (theta, y), eps=1e-6, atol=1e-6)


def test_info_certifies_the_solves_and_counts_costs():
    a, y, t = ridge_data()
    theta = torch.zeros(4, dtype=DT, requires_grad=True)
    x, info = argmin(
        ridge_energy(a), theta, torch.zeros_like(t), y, mu=1.0, lower_tol=1e-9, return_info=True
    )
    assert bool((info.grad_norm <= 1e-9).all())
    assert torch.allclose(info.distance_bound, info.grad_norm / 1.0)
    assert info.backward is None and info.adjoint_residual is None
    forward_calls = info.cost.oracle_calls
    assert forward_calls > 0
    ((x - t) ** 2).sum().backward()
    assert info.adjoint_residual.shape == (3,)
    assert bool((info.adjoint_residual <= 1e-9 * 10).all())
    assert info.converged and info.cost.oracle_calls > forward_calls and info.cost.vjps >= 3


def ill_conditioned():
    """h(x, θ) = ½ xᵀ diag(d) x − θᵀx with d spread over 1e-2..1e2: CG needs many steps."""
    d = torch.logspace(-2, 2, 50, dtype=DT)

    def h(x, theta, batch):
        return 0.5 * (d * x * x).sum(1) - (theta * x).sum(1)

    return h, torch.ones(50, dtype=DT, requires_grad=True)


def test_failed_adjoint_solve_raises():
    h, theta = ill_conditioned()
    x = argmin(
        h,
        theta,
        torch.zeros(1, 50, dtype=DT),
        mu=1e-2,
        lipschitz=100.0,
        estimator=Implicit(CG(max_iter=3)),
    )
    with pytest.raises(AdjointSolveError, match="adjoint solve"):
        x.sum().backward()


def test_failed_adjoint_solve_warns_when_asked_and_still_gives_its_estimate():
    h, theta = ill_conditioned()
    x, info = argmin(
        h,
        theta,
        torch.zeros(1, 50, dtype=DT),
        mu=1e-2,
        lipschitz=100.0,
        estimator=Implicit(CG(max_iter=3)),
        on_adjoint_failure="warn",
        return_info=True,
    )
    with pytest.warns(AdjointSolveWarning, match="missed adjoint_tol"):
        x.sum().backward()
    assert not info.converged and theta.grad.abs().sum() > 0
    assert any("missed adjoint_tol" in m for m in info.warnings)


def test_other_estimators():
    """Exact agrees with CG; JacobianFree(scale=1) is the biased −Jᵀv (no adjoint check)."""
    a, y, t = ridge_data()
    grads = {}
    for name, est in (("cg", None), ("exact", Exact()), ("jfb", JacobianFree(scale=1.0))):
        theta = torch.zeros(4, dtype=DT, requires_grad=True)
        x = argmin(ridge_energy(a), theta, torch.zeros_like(t), y, mu=1.0, estimator=est, **TIGHT)
        ((x - t) ** 2).sum().mul(0.5).backward()
        grads[name] = theta.grad
    assert (grads["cg"] - grads["exact"]).abs().max() <= 1e-9
    x_hat = ridge_closed_form(a, y, t, torch.zeros(4, dtype=DT), 0.0)[0]
    assert (grads["jfb"] + (x_hat * (x_hat - t)).sum(0)).abs().max() <= 1e-9


class RidgeEnergy(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.a = a
        self.log_weight = nn.Parameter(torch.zeros((), dtype=DT))

    def forward(self, x, y):
        return 0.5 * ((x - y) ** 2).sum(1) + 0.5 * self.log_weight.exp() * (
            (x @ self.a.T) ** 2
        ).sum(1)


def test_layer_trains_with_torch_optim_to_the_best_regularisation():
    """Learn the weight of a Tikhonov denoiser with Adam; the loss falls to its grid minimum."""
    gen = torch.Generator().manual_seed(3)
    smooth = torch.randn(64, 8, generator=gen, dtype=DT) @ torch.randn(
        8, 16, generator=gen, dtype=DT
    )
    noisy = smooth + 2.0 * torch.randn(64, 16, generator=gen, dtype=DT)
    diff = torch.eye(16, dtype=DT) - torch.eye(16, dtype=DT).roll(1, 1)
    layer = ArgminLayer(RidgeEnergy(diff), mu=1.0, lower_tol=1e-10)
    opt = torch.optim.Adam(layer.parameters(), lr=0.1)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = 0.5 * ((layer(noisy) - smooth) ** 2).sum(1).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert layer.last_info is not None and layer.last_info.converged

    def loss_at(w):
        hess = torch.eye(16, dtype=DT) + w * diff.T @ diff
        x = torch.linalg.solve(hess, noisy.T).T
        return float(0.5 * ((x - smooth) ** 2).sum(1).mean())

    grid = min(loss_at(w) for w in torch.logspace(-3, 2, 400, dtype=DT))
    assert losses[-1] < 0.8 * losses[0]
    assert losses[-1] <= grid * (1 + 1e-3)


def test_module_and_list_theta_and_no_grad():
    a, y, t = ridge_data()
    th1 = torch.zeros(2, dtype=DT, requires_grad=True)
    th2 = torch.zeros(2, dtype=DT, requires_grad=True)

    def h(x, theta, yy):
        w = torch.cat([theta[0], theta[1]]).exp()
        return 0.5 * ((x @ a.T - yy) ** 2).sum(1) + 0.5 * (w * x * x).sum(1)

    x = argmin(h, [th1, th2], torch.zeros_like(t), y, mu=1.0, **TIGHT)
    ((x - t) ** 2).sum().mul(0.5).backward()
    _, g = ridge_closed_form(a, y, t, torch.zeros(4, dtype=DT), 0.0)
    assert (torch.cat([th1.grad, th2.grad]) - g).abs().max() <= 1e-8
    with torch.no_grad():
        x = argmin(h, [th1, th2], torch.zeros_like(t), y, mu=1.0)
    assert x.grad_fn is None


def test_bad_input_is_named():
    a, y, t = ridge_data()
    theta = torch.zeros(4, dtype=DT, requires_grad=True)
    with pytest.raises(bilevel.BilevelError, match="on_adjoint_failure"):
        argmin(ridge_energy(a), theta, torch.zeros_like(t), y, on_adjoint_failure="ignore")
    with pytest.raises(bilevel.BilevelError, match="estimator"):
        argmin(ridge_energy(a), theta, torch.zeros_like(t), y, estimator=CG())
    with pytest.raises(bilevel.BilevelError, match="leading dimension"):
        argmin(ridge_energy(a), theta, torch.zeros(2, 4, dtype=DT), y)
    with pytest.raises(bilevel.BilevelError, match="x0 or init"):
        ArgminLayer(RidgeEnergy(a))((y, t))


def test_exported_from_the_flat_namespace():
    assert bilevel.argmin is argmin and bilevel.ArgminLayer is ArgminLayer
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a, y, t = ridge_data()
        theta = torch.zeros(4, dtype=DT, requires_grad=True)
        bilevel.argmin(ridge_energy(a), theta, torch.zeros_like(t), y, mu=1.0).sum().backward()


def test_readme_argmin_example_runs_and_matches_the_closed_form():
    import pathlib
    import re

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "bilevel.argmin(" in b]
    assert len(blocks) == 1
    ns: dict = {}
    exec(compile(blocks[0], "README argmin", "exec"), ns)
    a, y, theta = ns["A"].double(), ns["y"].double(), ns["theta"]
    w = theta.detach().double().exp()
    hess = a.T @ a + torch.diag(w)
    x = torch.linalg.solve(hess, (y @ a).T).T
    q = torch.linalg.solve(hess, (2 * x).T).T
    expected = -(w * x * q).sum(0) + 0.2 * theta.detach().double()
    assert (theta.grad.double() - expected).abs().max() <= 1e-3 * expected.abs().max()
    assert bool((ns["info"].grad_norm <= 1e-4).all())
