"""Tests for ``bilevel.learning.models``: energies, closed forms, finite sums, sparse data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bilevel import BilevelProblem
from bilevel.learning import (
    CrossValidation,
    FiniteSumModel,
    HeldOut,
    HypercleaningModel,
    LogisticModel,
    RidgeModel,
    accuracy,
    corrupt_labels,
    hypercleaning_model,
    hypercleaning_problem,
    logistic_model,
    logistic_problem,
    make_synthetic_classification,
    make_synthetic_regression,
    predict_logistic,
    random_folds,
    ridge_hypergradient,
    ridge_model,
    ridge_objective,
    ridge_problem,
    ridge_solution,
    split_data,
    to_csr,
)
from bilevel.learning import models as models_module
from bilevel.problem import BilevelError, NonFiniteError

sklearn_datasets = pytest.importorskip("sklearn.datasets")
scipy_optimize = pytest.importorskip("scipy.optimize")
from bilevel.learning import load_sklearn  # noqa: E402


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def diabetes():
    return load_sklearn("diabetes", seed=0)


@pytest.fixture(scope="module")
def cancer():
    return load_sklearn("breast_cancer", seed=0)


@pytest.fixture(scope="module")
def wine():
    return load_sklearn("wine", seed=0)


def _all_models(diabetes, cancer, wine) -> list[FiniteSumModel]:
    y_noisy, _ = corrupt_labels(wine.y_train, 0.2, 3, seed=0)
    return [
        ridge_model(diabetes.X_train, diabetes.y_train, diabetes.X_val, diabetes.y_val, -1.0),
        logistic_model(cancer.X_train, cancer.y_train, cancer.X_val, cancer.y_val, -2.0),
        logistic_model(wine.X_train, wine.y_train, wine.X_val, wine.y_val, -2.0, 3),
        logistic_model(
            wine.X_train, wine.y_train, wine.X_val, wine.y_val, -2.0, 3, fit_intercept=True
        ),
        hypercleaning_model(wine.X_train, y_noisy, wine.X_val, wine.y_val, n_classes=3),
    ]


def _random_w(model: FiniteSumModel, n: int = 1, seed: int = 0) -> torch.Tensor:
    return 0.3 * torch.randn((n, *model.event_shape), generator=_gen(seed), dtype=model.dtype).to(
        model.device
    )


def _hessian(model: FiniteSumModel, w: torch.Tensor) -> torch.Tensor:
    n = w.numel()

    def energy(flat):
        return model.lower_energy(flat.reshape(w.shape), model.theta, None).sum()

    return torch.autograd.functional.hessian(energy, w.detach().reshape(-1)).reshape(n, n)


# --------------------------------------------------------------------------------------------
# Energies and the finite-sum interface
# --------------------------------------------------------------------------------------------


def test_energy_shapes_and_problem(diabetes, cancer, wine):
    for model in _all_models(diabetes, cancer, wine):
        problem = model.problem
        assert isinstance(problem, BilevelProblem)
        assert problem.theta is model.theta and problem.mu == pytest.approx(model.mu())
        x = model.init_w()
        assert x.shape == (1, *model.event_shape)
        assert problem.energy(x, None).shape == (1,)
        assert problem.loss(x, None).shape == (1,)
        xs = _random_w(model, 3)
        assert problem.energy(xs, None).shape == (3,)
        # instance b depends on x[b] only
        single = problem.energy(xs[1:2], None)
        torch.testing.assert_close(problem.energy(xs, None)[1:2], single)


def test_train_loss_over_all_indices_equals_energy(diabetes, cancer, wine):
    for model in _all_models(diabetes, cancer, wine):
        w = _random_w(model, seed=1)
        energy = model.lower_energy(w, model.theta, None)[0]
        full = model.train_loss(w, model.theta, torch.arange(model.n_train))
        assert full.shape == ()
        torch.testing.assert_close(full, energy)
        torch.testing.assert_close(model.train_loss(w[0], model.theta), energy)
        # the mean over an equal-size partition of the samples is the energy too
        m = model.n_train - model.n_train % 4
        perm = torch.randperm(model.n_train, generator=_gen(0))[:m].reshape(4, -1)
        parts = torch.stack([model.train_loss(w, model.theta, p) for p in perm]).mean()
        kept = model.train_loss(w, model.theta, perm.reshape(-1))
        torch.testing.assert_close(parts, kept)
        val = model.upper_loss(w, model.theta, None)[0]
        torch.testing.assert_close(model.val_loss(w, model.theta, torch.arange(model.n_val)), val)
        torch.testing.assert_close(model.val_loss(w), val)


def test_a_minibatch_is_gathered_once_and_regathered_when_it_changes(cancer, monkeypatch):
    model = logistic_model(cancer.X_train, cancer.y_train, cancer.X_val, cancer.y_val, -2.0)
    gathers = []
    real = models_module.select_rows
    monkeypatch.setattr(models_module, "select_rows", lambda X, i: gathers.append(1) or real(X, i))
    w, idx = _random_w(model), torch.tensor([5, 1, 7, 30, 2])
    first = model.train_loss(w, model.theta, idx)
    model.lower_sample_diagonal(w, model.theta, idx)
    again = model.train_loss(2 * w, model.theta, idx)
    assert len(gathers) == 1  # one gather serves every evaluation on this minibatch
    torch.testing.assert_close(again, model.train_loss(2 * w, model.theta, idx.clone()))
    assert len(gathers) == 2  # an equal but different index tensor is gathered anew
    idx[0] = 9  # an index changed in place is gathered anew, never served stale rows
    changed = model.train_loss(w, model.theta, idx)
    assert len(gathers) == 3
    fresh = logistic_model(cancer.X_train, cancer.y_train, cancer.X_val, cancer.y_val, -2.0)
    torch.testing.assert_close(changed, fresh.train_loss(w, fresh.theta, idx.clone()))
    assert not torch.allclose(changed, first)
    before = len(gathers)
    model.X_train.mul_(1.0)  # data changed in place (its version): gathered anew too
    model.train_loss(w, model.theta, idx)
    assert len(gathers) == before + 1


def test_problem_exposes_finite_sum_access(diabetes, cancer, wine):
    for model in _all_models(diabetes, cancer, wine):
        problem = model.problem
        assert problem.finite_sum.n_lower == model.n_train
        assert problem.finite_sum.n_upper == model.n_val
        for b in (1, 3):
            xs = _random_w(model, b, seed=2)
            # full index: the energies and losses of the deterministic problem
            full = problem.finite_sum.lower_energy(xs, model.theta, torch.arange(model.n_train))
            assert full.shape == (b,)
            torch.testing.assert_close(full, problem.energy(xs, None))
            val = problem.finite_sum.upper_loss(xs, model.theta, torch.arange(model.n_val))
            assert val.shape == (b,)
            torch.testing.assert_close(val, problem.loss(xs, None))
            # a minibatch is the train / validation loss over those samples
            idx = torch.tensor([0, 2, 2, 5])
            torch.testing.assert_close(
                problem.finite_sum.lower_energy(xs, model.theta, idx),
                model.train_loss(xs, model.theta, idx).reshape(b),
            )
            torch.testing.assert_close(
                problem.finite_sum.upper_loss(xs, model.theta, idx),
                model.val_loss(xs, model.theta, idx).reshape(b),
            )
        # the mean over a partition of the samples is the full energy, and θ enters
        w = _random_w(model, seed=3)
        m = model.n_train - model.n_train % 5
        perm = torch.randperm(model.n_train, generator=_gen(1))[:m].reshape(5, -1)
        parts = torch.stack([problem.finite_sum.lower_energy(w, model.theta, p) for p in perm])
        kept = problem.finite_sum.lower_energy(w, model.theta, perm.reshape(-1))
        torch.testing.assert_close(parts.mean(0), kept)
        energy = problem.finite_sum.lower_energy(w, model.theta, perm[0])
        (g,) = torch.autograd.grad(energy.sum(), model.theta)
        assert bool(torch.isfinite(g).all()) and float(g.abs().sum()) > 0
        with pytest.raises(BilevelError):
            problem.finite_sum.lower_energy(w, model.theta, torch.tensor([model.n_train]))
        with pytest.raises(BilevelError):
            problem.finite_sum.upper_loss(w[0], model.theta, torch.tensor([0]))


def test_train_loss_single_sample_formula(cancer):
    model = logistic_model(cancer.X_train, cancer.y_train, cancer.X_val, cancer.y_val, 0.5)
    w = _random_w(model)[0]
    j = 7
    z = cancer.X_train[j] @ w
    y = float(cancer.y_train[j])
    expected = torch.nn.functional.softplus(z) - y * z + 0.5 * np.exp(0.5) * (w**2).sum()
    torch.testing.assert_close(model.train_loss(w, model.theta, [j]), expected)


# --------------------------------------------------------------------------------------------
# Ridge: closed forms
# --------------------------------------------------------------------------------------------


def test_ridge_hypergradient_matches_finite_differences(diabetes):
    d = diabetes
    theta = torch.empty(d.n_features, dtype=torch.float64).uniform_(-3.0, 1.0, generator=_gen(2))
    grad = ridge_hypergradient(d.X_train, d.y_train, d.X_val, d.y_val, theta)
    assert grad.shape == theta.shape and grad.dtype == torch.float64
    h = 1e-5
    fd = torch.zeros_like(theta)
    for k in range(theta.numel()):
        e = torch.zeros_like(theta)
        e[k] = h
        fp = ridge_objective(d.X_train, d.y_train, d.X_val, d.y_val, theta + e)
        fm = ridge_objective(d.X_train, d.y_train, d.X_val, d.y_val, theta - e)
        fd[k] = (fp - fm) / (2 * h)
    assert float((grad - fd).norm() / fd.norm()) < 1e-6


def test_ridge_energies_agree_with_closed_form(diabetes):
    d = diabetes
    theta0 = torch.linspace(-2.0, 0.5, d.n_features, dtype=torch.float64)
    model = ridge_model(d.X_train, d.y_train, d.X_val, d.y_val, theta0)
    w = model.solution()[None]
    x = w.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model.lower_energy(x, model.theta, None).sum(), x)
    assert float(g.norm()) < 1e-12
    # implicit differentiation with the dense Hessian of the energies
    H = _hessian(model, w)
    x = w.clone().requires_grad_(True)
    (gf,) = torch.autograd.grad(model.upper_loss(x, model.theta, None).sum(), x)
    q = torch.linalg.solve(H, gf.reshape(-1))
    x = w.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(
        model.lower_energy(x, model.theta, None).sum(), x, create_graph=True
    )
    (jq,) = torch.autograd.grad((gx.reshape(-1) * q).sum(), model.theta)
    torch.testing.assert_close(-jq, model.hypergradient(), rtol=1e-9, atol=1e-12)
    # μ = λ_min(XᵀX/N) + min_k λ_k bounds the smallest Hessian eigenvalue, with equality for
    # a single shared strength
    eig = torch.linalg.eigvalsh(H)
    assert model.problem.mu <= float(eig[0]) * (1 + 1e-10)
    assert model.problem.mu > 0.1 * float(eig[0])
    uniform = ridge_model(d.X_train, d.y_train, d.X_val, d.y_val, -1.5)
    eig_u = torch.linalg.eigvalsh(_hessian(uniform, w))
    assert uniform.problem.mu == pytest.approx(float(eig_u[0]), rel=1e-8)
    assert model.smoothness(certified=True) >= float(eig[-1])
    assert model.smoothness() >= 0.999 * float(eig[-1])
    torch.testing.assert_close(model.objective(), model.upper_loss(w, model.theta, None)[0])


def test_ridge_mu_options_and_shared_strength(diabetes):
    d = diabetes
    exact = ridge_model(d.X_train, d.y_train, d.X_val, d.y_val, 0.0)
    plain = ridge_model(d.X_train, d.y_train, d.X_val, d.y_val, 0.0, exact_mu=False)
    low = ridge_model(d.X_train, d.y_train, d.X_val, d.y_val, 0.0, theta_lower=-4.0)
    assert plain.problem.mu == pytest.approx(1.0)
    assert exact.problem.mu == pytest.approx(exact.data_curvature + 1.0)
    assert low.problem.mu == pytest.approx(exact.data_curvature + np.exp(-4.0))
    theta = torch.tensor([-1.0], dtype=torch.float64)
    shared = ridge_model(d.X_train, d.y_train, d.X_val, d.y_val, theta)
    per = torch.full((d.n_features,), -1.0, dtype=torch.float64)
    g_shared = shared.hypergradient()
    g_per = ridge_hypergradient(d.X_train, d.y_train, d.X_val, d.y_val, per)
    assert g_shared.shape == (1,)
    torch.testing.assert_close(g_shared, g_per.sum().reshape(1))
    torch.testing.assert_close(
        ridge_solution(d.X_train, d.y_train, theta), ridge_solution(d.X_train, d.y_train, per)
    )
    problem = ridge_problem(d.X_train, d.y_train, d.X_val, d.y_val, theta)
    assert problem.params[0].shape == (1,)


# --------------------------------------------------------------------------------------------
# Logistic regression: stationarity at an L-BFGS solution
# --------------------------------------------------------------------------------------------


def _lbfgs(model: FiniteSumModel) -> torch.Tensor:
    shape = (1, *model.event_shape)

    def fun(flat: np.ndarray):
        w = torch.as_tensor(flat, dtype=torch.float64).reshape(shape).requires_grad_(True)
        e = model.train_loss(w, model.theta)
        (g,) = torch.autograd.grad(e, w)
        return float(e.detach()), g.reshape(-1).numpy()

    res = scipy_optimize.minimize(
        fun,
        np.zeros(int(np.prod(shape))),
        jac=True,
        method="L-BFGS-B",
        options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 5000},
    )
    return torch.as_tensor(res.x, dtype=torch.float64).reshape(shape)


@pytest.mark.parametrize("case", ["binary", "binary_bias", "multinomial", "multinomial_bias"])
def test_logistic_gradient_vanishes_at_lbfgs_solution(cancer, wine, case):
    data = cancer if case.startswith("binary") else wine
    theta0 = torch.linspace(-3.0, 0.0, data.n_features, dtype=torch.float64)
    problem = logistic_problem(
        data.X_train,
        data.y_train,
        data.X_val,
        data.y_val,
        theta0,
        fit_intercept=case.endswith("bias"),
        intercept_l2=1e-2,
    )
    model = problem.lower_energy.__self__
    assert isinstance(model, LogisticModel)
    w = _lbfgs(model)
    x = w.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(problem.energy(x, None).sum(), x)
    assert float(g.norm()) < 1e-6
    # the Hessian is at least μ
    eig = torch.linalg.eigvalsh(_hessian(model, w))
    assert float(eig[0]) >= problem.mu * (1 - 1e-9)
    assert model.smoothness(certified=True) >= float(eig[-1])
    # the fitted classifier is good on validation data
    assert accuracy(w, data.X_val, data.y_val) > 0.85
    assert torch.equal(predict_logistic(w, data.X_val), predict_logistic(w[0], data.X_val))


def test_logistic_theta_shapes(wine):
    d = wine
    for shape in [(d.n_features,), (1,), (d.n_features, 3)]:
        model = logistic_model(d.X_train, d.y_train, d.X_val, d.y_val, torch.zeros(shape))
        assert model.theta.shape == shape and model.theta.requires_grad
        assert model.theta.dtype == torch.float64
        w = _random_w(model)
        e = model.lower_energy(w, model.theta, None)
        (g,) = torch.autograd.grad(e.sum(), model.theta)
        assert g.shape == shape
    leaf = torch.zeros(d.n_features, dtype=torch.float64, requires_grad=True)
    model = logistic_model(d.X_train, d.y_train, d.X_val, d.y_val, leaf)
    assert model.theta is leaf
    low = logistic_model(d.X_train, d.y_train, d.X_val, d.y_val, 0.0, theta_lower=-2.0)
    assert low.problem.mu == pytest.approx(np.exp(-2.0))
    assert low.mu(torch.full((d.n_features,), -1.0)) == pytest.approx(np.exp(-1.0))


# --------------------------------------------------------------------------------------------
# Sparse and dense data give the same losses
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sparse_split():
    X, y, _ = make_synthetic_classification(
        240, 30, 5, n_classes=3, sparse_density=0.2, seed=4, dtype=torch.float64
    )
    return split_data(X, y, n_classes=3, seed=0)


def _dense_and_sparse(kind: str, data):
    Xs_tr, Xs_va = data.X_train, data.X_val
    Xd_tr, Xd_va = Xs_tr.to_dense(), Xs_va.to_dense()
    y_tr, y_va = data.y_train, data.y_val
    theta0 = torch.linspace(-2.0, 1.0, data.n_features, dtype=torch.float64)
    if kind == "ridge":
        t_tr, t_va = (y_tr == 1).double(), (y_va == 1).double()
        make = lambda a, b: ridge_model(a, t_tr, b, t_va, theta0)  # noqa: E731
    elif kind == "binary":
        b_tr, b_va = (y_tr == 1).long(), (y_va == 1).long()
        make = lambda a, b: logistic_model(a, b_tr, b, b_va, theta0, 2)  # noqa: E731
    elif kind == "multinomial":
        make = lambda a, b: logistic_model(  # noqa: E731
            a, y_tr, b, y_va, theta0, 3, fit_intercept=True
        )
    else:
        theta_h = torch.linspace(-1.0, 1.0, data.n_train, dtype=torch.float64)
        make = lambda a, b: hypercleaning_model(a, y_tr, b, y_va, theta_h, 3)  # noqa: E731
    return make(Xd_tr, Xd_va), make(Xs_tr, Xs_va)


@pytest.mark.parametrize("kind", ["ridge", "binary", "multinomial", "hypercleaning"])
def test_sparse_and_dense_agree(sparse_split, kind):
    dense, sparse = _dense_and_sparse(kind, sparse_split)
    assert sparse.sparse and not dense.sparse
    w = _random_w(dense, 2, seed=5)
    v = _random_w(dense, 2, seed=6)
    idx = torch.tensor([3, 0, 17, 17, 50])
    a, b = dense, sparse
    torch.testing.assert_close(a.lower_energy(w, a.theta), b.lower_energy(w, b.theta))
    torch.testing.assert_close(a.upper_loss(w, a.theta), b.upper_loss(w, b.theta))
    torch.testing.assert_close(a.train_loss(w, a.theta, idx), b.train_loss(w, b.theta, idx))
    torch.testing.assert_close(a.val_loss(w, None, [1, 2]), b.val_loss(w, None, [1, 2]))
    # gradients, Hessian-vector products and mixed derivatives agree too
    outs = []
    for model in (dense, sparse):
        x = w.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(model.lower_energy(x, model.theta).sum(), x, create_graph=True)
        hv, jv = torch.autograd.grad((g * v).sum(), (x, model.theta))
        outs.append((g.detach(), hv, jv))
    for u, v_ in zip(*outs):
        torch.testing.assert_close(u, v_)


@pytest.mark.parametrize("kind", ["ridge", "binary", "multinomial", "hypercleaning"])
def test_column_major_storage_gives_the_same_results(sparse_split, kind):
    """store_features re-stores the dense features column-major (the faster layout of
    full-batch products) without changing any value the model computes: energies, minibatch
    losses, gradients, Hessian-vector and mixed products, the closed-form sample Hessian and
    diagonal, and (ridge) the closed-form hypergradient, against the row-major model."""
    rows, cols = _dense_and_sparse(kind, sparse_split)[0], _dense_and_sparse(kind, sparse_split)[0]
    cols.store_features()
    for X_row, X_col in ((rows.X_train, cols.X_train), (rows.X_val, cols.X_val)):
        assert X_row.is_contiguous() and X_col.t().is_contiguous() and not X_col.is_contiguous()
        assert torch.equal(X_row, X_col)  # the same matrix, not its transpose's storage
    w, v = _random_w(rows, 2, seed=5), _random_w(rows, 2, seed=6)
    idx = torch.tensor([3, 0, 17, 17, 50])
    close = {"rtol": 1e-12, "atol": 1e-14}
    for a, b in (
        (rows.lower_energy(w, rows.theta), cols.lower_energy(w, cols.theta)),
        (rows.upper_loss(w, rows.theta), cols.upper_loss(w, cols.theta)),
        (rows.train_loss(w, rows.theta, idx), cols.train_loss(w, cols.theta, idx)),
        (rows.val_loss(w, None, [1, 2]), cols.val_loss(w, None, [1, 2])),
        (
            rows.lower_sample_diagonal(w, rows.theta, idx),
            cols.lower_sample_diagonal(w, cols.theta, idx),
        ),
        (
            rows.lower_sample_hessian(w, rows.theta).product(v),
            cols.lower_sample_hessian(w, cols.theta).product(v),
        ),
    ):
        torch.testing.assert_close(a, b, **close)
    outs = []
    for model in (rows, cols):
        x = w.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(model.lower_energy(x, model.theta).sum(), x, create_graph=True)
        hv, jv = torch.autograd.grad((g * v).sum(), (x, model.theta))
        outs.append((g.detach(), hv, jv))
    for u, v_ in zip(*outs):
        torch.testing.assert_close(u, v_, **close)
    if kind == "ridge":
        torch.testing.assert_close(rows.hypergradient(), cols.hypergradient(), **close)
    rows.store_features("column", "row")  # and back: each part as asked
    assert rows.X_train.t().is_contiguous() and rows.X_val.is_contiguous()
    cols.store_features("row", "row")
    assert cols.X_train.is_contiguous() and torch.equal(cols.X_train, rows.X_train)


def test_store_features_leaves_sparse_data_and_shared_folds_alone(sparse_split, diabetes):
    sparse = _dense_and_sparse("binary", sparse_split)[1]
    X_train, X_val = sparse.X_train, sparse.X_val
    sparse.store_features()
    assert sparse.X_train is X_train and sparse.X_val is X_val
    X, y = diabetes.X_train, diabetes.y_train
    cv = ridge_model(X, y, X, y, -1.0, criterion=CrossValidation(random_folds(len(y), 3, 0)))
    cv.store_features()
    assert cv.X_val is cv.X_train and cv.X_train.t().is_contiguous()
    with pytest.raises(BilevelError, match="layout must be 'row' or 'column'"):
        cv.store_features("fortran")


def test_sparse_ridge_closed_form(sparse_split):
    dense, sparse = _dense_and_sparse("ridge", sparse_split)
    torch.testing.assert_close(sparse.solution(), dense.solution())
    torch.testing.assert_close(sparse.hypergradient(), dense.hypergradient())
    assert sparse.problem.mu == pytest.approx(dense.problem.mu)


def test_float32_follows_the_data():
    X, y, _ = make_synthetic_regression(100, 8, 2, seed=0)
    data = split_data(X, y, seed=0)
    model = ridge_model(data.X_train, data.y_train, data.X_val, data.y_val, 0.0)
    assert model.dtype == torch.float32 and model.theta.dtype == torch.float32
    w = model.init_w()
    assert model.lower_energy(w, model.theta).dtype == torch.float32
    assert model.solution().dtype == torch.float64
    Xc, yc, _ = make_synthetic_classification(100, 8, 2, n_classes=3, seed=0)
    dc = split_data(Xc, yc, n_classes=3, seed=0)
    lm = logistic_model(dc.X_train, dc.y_train, dc.X_val, dc.y_val)
    assert lm.n_classes == 3 and lm.event_shape == (8, 3)
    assert lm.train_loss(lm.init_w(), lm.theta, [0, 1]).dtype == torch.float32


# --------------------------------------------------------------------------------------------
# Hypercleaning
# --------------------------------------------------------------------------------------------


def test_corrupt_labels():
    y = torch.arange(100) % 4
    noisy, mask = corrupt_labels(y, 0.3, 4, seed=1)
    assert int(mask.sum()) == 30
    assert bool((noisy[mask] != y[mask]).all()) and torch.equal(noisy[~mask], y[~mask])
    assert int(noisy.min()) >= 0 and int(noisy.max()) < 4
    again, mask2 = corrupt_labels(y, 0.3, 4, seed=1)
    assert torch.equal(noisy, again) and torch.equal(mask, mask2)
    with pytest.raises(BilevelError):
        corrupt_labels(y, 1.5, 4)
    with pytest.raises(BilevelError, match="outside"):
        corrupt_labels(y, 0.1, 3)


def test_hypercleaning_weights_and_mu(wine):
    d = wine
    y_noisy, mask = corrupt_labels(d.y_train, 0.3, 3, seed=0)
    problem = hypercleaning_problem(d.X_train, y_noisy, d.X_val, d.y_val, 0.0, 3, l2=1e-2)
    model = problem.lower_energy.__self__
    assert isinstance(model, HypercleaningModel)
    assert problem.mu == 1e-2 and model.theta.shape == (d.n_train,)
    torch.testing.assert_close(model.sample_weights(), torch.full((d.n_train,), 0.5).double())
    w = _lbfgs(model)
    eig = torch.linalg.eigvalsh(_hessian(model, w))
    assert float(eig[0]) >= 1e-2 * (1 - 1e-9)
    # weighted loss: one sample with weight σ(θ_j)
    j = 4
    theta = model.theta.detach().clone()
    theta[j] = 2.0
    w0 = _random_w(model)[0]
    z = d.X_train[j] @ w0
    ce = torch.logsumexp(z, 0) - z[y_noisy[j]]
    expected = torch.sigmoid(torch.tensor(2.0, dtype=torch.float64)) * ce + 5e-3 * (w0**2).sum()
    torch.testing.assert_close(model.train_loss(w0, theta, [j]), expected)
    # the hypergradient direction exists: θ reaches the energy
    x = w.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model.lower_energy(x, model.theta).sum(), x, create_graph=True)
    (jv,) = torch.autograd.grad(g.sum(), model.theta)
    assert jv.shape == (d.n_train,) and bool(torch.isfinite(jv).all())


# --------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------


def test_validation_errors(cancer, wine):
    d = cancer
    args = (d.X_train, d.y_train, d.X_val, d.y_val)
    with pytest.raises(BilevelError, match="theta0 has shape"):
        logistic_model(*args, torch.zeros(d.n_features + 1))
    with pytest.raises(BilevelError, match="outside"):
        logistic_model(d.X_train, d.y_train + 1, d.X_val, d.y_val, 0.0, 2)
    with pytest.raises(BilevelError, match="integer class labels"):
        logistic_model(d.X_train, d.y_train + 0.5, d.X_val, d.y_val, 0.0, 2)
    bad = d.X_train.clone()
    bad[3, 2] = float("inf")
    with pytest.raises(NonFiniteError):
        logistic_model(bad, d.y_train, d.X_val, d.y_val)
    with pytest.raises(BilevelError, match="features"):
        logistic_model(d.X_train, d.y_train, d.X_val[:, :5], d.y_val)
    with pytest.raises(BilevelError, match="must match"):
        logistic_model(d.X_train, d.y_train, d.X_val.float(), d.y_val)
    with pytest.raises(BilevelError, match="one per sample"):
        logistic_model(d.X_train, d.y_train[:-1], d.X_val, d.y_val)
    with pytest.raises(NonFiniteError):
        ridge_model(d.X_train, torch.full((d.n_train,), float("nan")), d.X_val, d.y_val.double())
    model = logistic_model(*args)
    w = model.init_w()
    with pytest.raises(BilevelError, match="batch must be None"):
        model.lower_energy(w, model.theta, (torch.zeros(1),))
    with pytest.raises(BilevelError, match="x must have shape"):
        model.lower_energy(torch.zeros(1, 3, dtype=torch.float64), model.theta)
    with pytest.raises(BilevelError, match="theta has shape"):
        model.lower_energy(w, torch.zeros(3, dtype=torch.float64))
    with pytest.raises(BilevelError, match="out of range"):
        model.train_loss(w, model.theta, [0, d.n_train])
    with pytest.raises(BilevelError, match="integers"):
        model.train_loss(w, model.theta, torch.tensor([0.0, 1.0]))
    with pytest.raises(BilevelError, match="w must have shape"):
        model.train_loss(torch.zeros(4, dtype=torch.float64), model.theta)
    with pytest.raises(BilevelError, match="n_classes"):
        logistic_model(*args, 0.0, 1)
    h = hypercleaning_model(wine.X_train, wine.y_train, wine.X_val, wine.y_val)
    with pytest.raises(BilevelError, match="one weight logit per training sample"):
        h.lower_energy(h.init_w(), torch.zeros(3, dtype=torch.float64))
    with pytest.raises(BilevelError, match="l2"):
        hypercleaning_model(wine.X_train, wine.y_train, wine.X_val, wine.y_val, l2=0.0)


def test_sparse_coo_input_is_accepted(sparse_split):
    data = sparse_split
    coo = data.X_train.to_dense().to_sparse()
    model = logistic_model(coo, data.y_train, data.X_val, data.y_val, 0.0, 3)
    assert model.X_train.layout == torch.sparse_csr
    dense = logistic_model(
        data.X_train.to_dense(), data.y_train, data.X_val.to_dense(), data.y_val, 0.0, 3
    )
    w = _random_w(model)
    torch.testing.assert_close(
        model.lower_energy(w, model.theta), dense.lower_energy(w, dense.theta)
    )
    assert to_csr(coo).layout == torch.sparse_csr
    assert isinstance(RidgeModel, type)


def test_shrinkage_penalty_enters_objective_and_hypergradients(diabetes, cancer):
    from bilevel.hypergrad import Exact

    d = diabetes
    theta0 = torch.linspace(-2.0, 0.5, d.n_features, dtype=torch.float64)
    rho = 0.3
    plain = ridge_model(d.X_train, d.y_train, d.X_val, d.y_val, theta0)
    model = ridge_model(d.X_train, d.y_train, d.X_val, d.y_val, theta0, shrinkage=rho)
    centred = theta0 - theta0.mean()
    # closed forms: F_ρ = F + (ρ/2)‖θ − θ̄‖², ∇F_ρ = ∇F + ρ(θ − θ̄) (Σ(θ − θ̄) = 0)
    torch.testing.assert_close(
        model.objective(), plain.objective() + 0.5 * rho * (centred**2).sum()
    )
    torch.testing.assert_close(model.hypergradient(), plain.hypergradient() + rho * centred)
    h = 1e-5
    for k in (0, 4, 9):
        e = torch.zeros_like(theta0)
        e[k] = h
        fd = (model.objective(theta0 + e) - model.objective(theta0 - e)) / (2 * h)
        assert float(fd) == pytest.approx(float(model.hypergradient()[k]), rel=1e-6, abs=1e-10)
    # the generic estimators see the penalty through the problem's upper regulariser
    x0 = torch.zeros(1, d.n_features, dtype=torch.float64)
    hg = Exact()(model.problem, None, x0, lower_tol=1e-12)
    torch.testing.assert_close(hg.grad[0], model.hypergradient(), rtol=1e-8, atol=1e-12)
    c = cancer
    logistic = logistic_model(c.X_train, c.y_train, c.X_val, c.y_val, -2.0, shrinkage=rho)
    assert logistic.problem.upper_regulariser is not None
    assert float(logistic.problem.upper_regulariser(logistic.theta.detach())) == 0.0
    assert plain.problem.upper_regulariser is None
    with pytest.raises(BilevelError, match="shrinkage"):
        ridge_model(d.X_train, d.y_train, d.X_val, d.y_val, 0.0, shrinkage=-1.0)


def test_detection_auc_matches_the_rank_definition(wine):
    from sklearn.metrics import roc_auc_score

    d = wine
    y_noisy, mask = corrupt_labels(d.y_train, 0.3, 3, seed=1)
    theta = torch.randn(
        d.n_train, generator=torch.Generator().manual_seed(2), dtype=d.X_train.dtype
    )
    theta[:10] = theta[10]  # ties count one half
    model = HypercleaningModel(d.X_train, y_noisy, d.X_val, d.y_val, theta, 3, corrupted=mask)
    found = model.detection()
    weights = torch.sigmoid(theta)
    expected = roc_auc_score((~mask).numpy(), weights.numpy())
    assert found["auc"] == pytest.approx(expected, abs=1e-12)
    assert found["n_corrupted"] == int(mask.sum())
    assert found["weight_clean_mean"] == pytest.approx(float(weights[~mask].mean()))
    assert found["weight_corrupted_mean"] == pytest.approx(float(weights[mask].mean()))
    # perfect separation, and the errors
    separated = torch.where(mask, -3.0, 3.0).to(d.X_train.dtype)
    assert model.detection(separated)["auc"] == 1.0
    with pytest.raises(BilevelError, match="mask of corrupted labels"):
        HypercleaningModel(d.X_train, y_noisy, d.X_val, d.y_val, 0.0, 3).detection()
    with pytest.raises(BilevelError, match="boolean mask of shape"):
        HypercleaningModel(d.X_train, y_noisy, d.X_val, d.y_val, 0.0, 3, corrupted=mask[:5])


def test_cross_validated_ridge_hypergradient_is_the_mean_of_the_folds(diabetes):
    """K-fold CV as K batched lower levels: the implicit hypergradient of the CV model equals
    the mean of the closed-form hypergradients of the K train/validation splits."""
    from bilevel import CG, LBFGS, Implicit

    X, y = diabetes.X_train, diabetes.y_train
    theta = torch.linspace(-2.0, 1.0, X.shape[1], dtype=X.dtype)
    folds = random_folds(len(X), 4)
    model = RidgeModel(X, y, X, y, theta.clone(), criterion=CrossValidation(folds))
    assert model.n_instances == 4 and torch.equal(model.instance_batch(), torch.arange(4))
    expected = torch.stack(
        [RidgeModel(X[~m], y[~m], X[m], y[m], theta.clone()).hypergradient() for m in folds]
    ).mean(0)
    estimate = Implicit(CG(), lower_solver=LBFGS(), compute_bound=False)
    hg = estimate(
        model.problem, model.instance_batch(), model.init_w(4), lower_tol=1e-12, adjoint_tol=1e-12
    )
    torch.testing.assert_close(hg.grad[0], expected, rtol=1e-7, atol=1e-10)
    # each instance's energy is the ridge objective on the rows outside its fold
    w = torch.randn(4, X.shape[1], generator=torch.Generator().manual_seed(1), dtype=X.dtype)
    energies = model.lower_energy(w, model.theta, model.instance_batch())
    for k, m in enumerate(folds):
        part = RidgeModel(X[~m], y[~m], X[m], y[m], theta.clone())
        torch.testing.assert_close(energies[k], part.lower_energy(w[k : k + 1], part.theta)[0])
    # the curvature bound covers every part; μ no longer counts the data curvature
    lip = model.smoothness()
    for m in folds:
        hess = X[~m].T @ X[~m] / int((~m).sum()) + torch.diag(theta.exp())
        assert float(torch.linalg.eigvalsh(hess)[-1]) <= lip * (1 + 1e-9)
    assert model.problem.mu == pytest.approx(float(theta.exp().min()))


def test_cross_validation_errors(diabetes, wine):
    X, y = diabetes.X_train, diabetes.y_train
    for bad in (torch.ones(1, len(X), dtype=torch.bool), torch.zeros(3, len(X))):
        with pytest.raises(BilevelError, match="folds must be"):
            CrossValidation(bad)
    with pytest.raises(BilevelError, match="folds must be"):
        RidgeModel(X, y, X, y, 0.0, criterion=CrossValidation(random_folds(len(X), 3)[:, :10]))
    empty = random_folds(len(X), 3)
    empty[0] = False
    with pytest.raises(BilevelError, match="every fold"):
        CrossValidation(empty)
    folds = CrossValidation(random_folds(len(X), 3))
    with pytest.raises(BilevelError, match="validates on the training rows"):
        RidgeModel(X, y, X.clone(), y, 0.0, criterion=folds)
    with pytest.raises(BilevelError, match="criterion must be"):
        RidgeModel(X, y, X, y, 0.0, criterion="cv")
    model = RidgeModel(X, y, X, y, 0.0, criterion=folds)
    with pytest.raises(BilevelError, match="fold index of each instance"):
        model.lower_energy(model.init_w(3), model.theta, None)
    with pytest.raises(BilevelError, match="fold index of each instance"):
        model.lower_energy(model.init_w(3), model.theta, torch.tensor([0, 1, 5]))
    assert model.problem.finite_sum is None  # SID has no minibatches to draw here
    y_noisy, _ = corrupt_labels(wine.y_train, 0.2, 3, seed=0)
    with pytest.raises(BilevelError, match="per-feature models"):
        HypercleaningModel(
            wine.X_train,
            y_noisy,
            wine.X_train,
            y_noisy,
            0.0,
            3,
            criterion=CrossValidation(random_folds(wine.n_train, 3)),
        )


def test_cross_validation_from_a_scikit_learn_splitter(diabetes):
    """CrossValidation.from_splitter: fold k is the test part of the splitter's k-th split,
    and the criterion leaves the held-out model of the same data untouched."""
    from sklearn.model_selection import KFold

    X, y = diabetes.X_train, diabetes.y_train
    splitter = KFold(3, shuffle=True, random_state=0)
    cv = CrossValidation.from_splitter(splitter, len(X))
    for k, (_, test) in enumerate(splitter.split(X.numpy())):
        assert sorted(cv.folds[k].nonzero()[:, 0].tolist()) == sorted(test.tolist())
    held_out = RidgeModel(X, y, X, y, 0.0)
    crossed = RidgeModel(X, y, X, y, 0.0, criterion=cv)
    assert isinstance(held_out.criterion, HeldOut) and held_out.folds is None
    assert held_out.n_instances == 1 and crossed.n_instances == 3
    assert held_out.problem.finite_sum is not None


def test_stated_lipschitz_bound_follows_theta(diabetes):
    X, y = diabetes.X_train, diabetes.y_train
    plain = RidgeModel(X, y, X, y, 0.0)
    assert plain.problem.lipschitz is None
    model = RidgeModel(X, y, X, y, 0.0, lipschitz_margin=1.1)
    assert model.problem.lipschitz_bound() == pytest.approx(1.1 * model.smoothness())
    with torch.no_grad():
        model.theta.add_(1.0)
    assert model.problem.lipschitz_bound() == pytest.approx(1.1 * model.smoothness())
    with pytest.raises(BilevelError, match="lipschitz_margin"):
        RidgeModel(X, y, X, y, 0.0, lipschitz_margin=0.5)
