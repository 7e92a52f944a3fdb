"""Certificates against the truth: random problems with closed-form hypergradients.

Each test draws random problems, computes the exact hypergradient in float64 and checks the
promise of the error bound: ``bound_certified`` ⇒ ‖z − ∇F(θ)‖ ≤ ω.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bilevel import BilevelError, BilevelProblem
from bilevel.bounds import BoundConstants
from bilevel.hypergrad import BoundWarning, Exact, Implicit, JacobianFree, Unrolled
from bilevel.linear import CG, MINRES, FixedPoint, Neumann
from bilevel.lower import LBFGS, ConvergenceWarning, GradientDescent, Nesterov
from bilevel.problem import NotStronglyConvexError

F64 = torch.float64


@dataclasses.dataclass(frozen=True, eq=False)
class RandomQuadratic(BilevelProblem):
    """A problem of :func:`random_quadratic` with what the checks know about it: the smallest
    Hessian eigenvalue of each instance and the θ term P of the upper loss (or None)."""

    true_lambda_min: torch.Tensor | None = None
    upper_projection: torch.Tensor | None = None


def random_quadratic(
    seed: int,
    n_batch: int,
    dim: int,
    n_params: int,
    eig_low: float = 0.5,
    eig_high: float = 4.5,
    theta_in_f: bool = False,
    dtype=F64,
    pin_low: bool = False,
):
    """h_i = ½xᵀA_i x − xᵀ(M_iθ + c_i), f_i = ½‖x − t_i + Pθ‖² (P = 0 unless theta_in_f).

    Returns (problem, batch, exact) with ``exact()`` the float64 hypergradient at the current
    θ: ∇F = mean_i (M_iᵀA_i⁻¹ + Pᵀ) g_i, g_i = x̂_i − t_i + Pθ, and λ_min of each A_i.
    """
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n_batch, dim, dim, generator=gen, dtype=F64))
    eig = eig_low + (eig_high - eig_low) * torch.rand(n_batch, dim, generator=gen, dtype=F64)
    if pin_low:  # λ_min = eig_low exactly
        eig[:, 0] = eig_low
    a = q @ torch.diag_embed(eig) @ q.transpose(1, 2)
    a = 0.5 * (a + a.transpose(1, 2))
    m = torch.randn(n_batch, dim, n_params, generator=gen, dtype=F64)
    c = torch.randn(n_batch, dim, generator=gen, dtype=F64)
    t = torch.randn(n_batch, dim, generator=gen, dtype=F64)
    p = torch.randn(dim, n_params, generator=gen, dtype=F64) if theta_in_f else None
    theta = torch.randn(n_params, generator=gen, dtype=F64).to(dtype).requires_grad_(True)
    a_, m_, c_, t_ = (v.to(dtype) for v in (a, m, c, t))
    p_ = None if p is None else p.to(dtype)

    def h(x, th, batch):
        aa, mm, cc, _ = batch
        return 0.5 * torch.einsum("bi,bij,bj->b", x, aa, x) - (x * (mm @ th + cc)).sum(1)

    def f(x, th, batch):
        r = x - batch[3]
        if p_ is not None:
            r = r + p_ @ th
        return 0.5 * (r * r).sum(1)

    def exact():
        """∇F of the problem as given: its data rounded to ``dtype``, solved in float64."""
        a, m, c, t = (v.to(F64) for v in (a_, m_, c_, t_))
        p = None if p_ is None else p_.to(F64)
        th = theta.detach().to(F64)
        x = torch.linalg.solve(a, (m @ th + c).unsqueeze(-1)).squeeze(-1)
        g = x - t + (0.0 if p is None else p @ th)
        qq = torch.linalg.solve(a, g.unsqueeze(-1)).squeeze(-1)
        grad = torch.einsum("bip,bi->p", m, qq)
        if p is not None:
            grad = grad + (g @ p).sum(0)
        return grad / n_batch

    problem = RandomQuadratic(
        h, f, theta, mu=float(eig.min()), true_lambda_min=eig.min(1).values, upper_projection=p
    )
    return problem, (a_, m_, c_, t_), exact


def error(hg, exact) -> float:
    return float((hg.grad[0].to(F64) - exact()).norm())


# -- failure 1: an upper loss that depends on θ ------------------------------------------------


@pytest.mark.parametrize("stated", [False, True])
def test_upper_loss_depending_on_theta_is_covered(stated):
    """f = ½‖x − t + Pθ‖²: the change of ∇_θf between x̃ and x̂ is part of ω."""
    for seed in range(30):
        problem, batch, exact = random_quadratic(seed, 3, 5, 3, theta_in_f=True)
        consts = BoundConstants()
        if stated:
            p_norm = float(torch.linalg.matrix_norm(problem.upper_projection, ord=2))
            consts = BoundConstants(upper_grad_lipschitz=1.0, upper_mixed_lipschitz=p_norm)
        est = Implicit(CG(), lower_solver=GradientDescent(), constants=consts, compute_bound=True)
        x0 = torch.zeros(3, 5, dtype=F64)
        hg = est(problem, batch, x0, lower_tol=1e-2, adjoint_tol=1e-2)
        assert hg.bound_certified, hg.constants
        assert hg.constants["L_ftheta"].source == ("stated" if stated else "computed")
        assert error(hg, exact) <= hg.bound, (seed, error(hg, exact), hg.bound)


# -- failure 2: a stated μ larger than the true strong-convexity constant ----------------------

WRONG_MU_ESTIMATORS = {
    "cg": Implicit(CG(), lower_solver=LBFGS(), compute_bound=True),
    "minres": Implicit(MINRES(), lower_solver=LBFGS(), compute_bound=True),
    "fixed_point": Implicit(FixedPoint(max_iter=300), lower_solver=LBFGS(), compute_bound=True),
    "neumann": Implicit(Neumann(terms=100), lower_solver=LBFGS(), compute_bound=True),
    "exact": Exact(lower_solver=LBFGS(), compute_bound=True),
    "jacobian_free": JacobianFree(lower_solver=LBFGS(), compute_bound=True),
}


@pytest.mark.parametrize("name", sorted(WRONG_MU_ESTIMATORS))
def test_too_large_mu_is_never_certified(name):
    """True λ_min ∈ [0.01, 0.3], stated μ = 1: every estimator notices and warns."""
    est = WRONG_MU_ESTIMATORS[name]
    for seed in range(40):
        gen = torch.Generator().manual_seed(1000 + seed)
        low = 0.01 + 0.29 * float(torch.rand(1, generator=gen))
        problem, batch, exact = random_quadratic(
            seed, 2, 6, 2, eig_low=low, eig_high=3.0, pin_low=True
        )
        problem = dataclasses.replace(problem, mu=1.0)
        x0 = torch.zeros(2, 6, dtype=F64)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hg = est(problem, batch, x0, lower_tol=1e-3, adjoint_tol=1e-3)
        assert not hg.bound_certified, (name, seed)
        assert any(issubclass(w.category, BoundWarning) for w in caught), (name, seed)
        assert hg.constants["mu"].source == "estimated"
        assert hg.mu <= float(problem.true_lambda_min.min()) * (1 + 1e-9)


@pytest.mark.parametrize("name", sorted(WRONG_MU_ESTIMATORS))
def test_singular_lower_level_is_never_certified(name):
    """Underdetermined least squares without regularisation, μ = 1 stated: refused or warned."""
    est = WRONG_MU_ESTIMATORS[name]
    gen = torch.Generator().manual_seed(7)
    rows, dim = 3, 6
    a = torch.randn(rows, dim, generator=gen, dtype=F64)
    m = torch.randn(rows, 2, generator=gen, dtype=F64)
    target = torch.randn(dim, generator=gen, dtype=F64)
    theta = torch.randn(2, generator=gen, dtype=F64).requires_grad_(True)

    def h(x, th, _):
        r = x @ a.T - th @ m.T
        return 0.5 * (r * r).sum(1)

    def f(x, th, _):
        return 0.5 * ((x - target) ** 2).sum(1)

    problem = BilevelProblem(h, f, theta, mu=1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            hg = est(problem, None, torch.zeros(1, dim, dtype=F64), lower_tol=1e-6)
        except NotStronglyConvexError:
            return
    assert not hg.bound_certified
    assert any(issubclass(w.category, BoundWarning) for w in caught)


# -- failure 3: mu=None is estimated on the safe side -------------------------------------------


def test_estimated_mu_is_on_the_safe_side():
    """With every other constant exact, the estimated bound covers the error (≥ 39 of 40)."""
    covered = 0
    for seed in range(40):
        dim = 5 + (seed * 7) % 70
        problem, batch, exact = random_quadratic(seed, 2, dim, 3, eig_low=0.05, eig_high=5.0)
        problem = dataclasses.replace(problem, mu=None)
        consts = BoundConstants(
            upper_grad_lipschitz=1.0, jacobian_lipschitz=0.0, hessian_lipschitz=0.0
        )
        hg = Implicit(CG(), lower_solver=GradientDescent(), constants=consts, compute_bound=True)(
            problem, batch, torch.zeros(2, dim, dtype=F64), lower_tol=1e-2, adjoint_tol=1e-2
        )
        assert hg.mu_estimated and not hg.bound_certified
        assert hg.mu <= float(problem.true_lambda_min.min()) * (1 + 1e-9), seed
        covered += error(hg, exact) <= hg.bound
    assert covered >= 39


# -- failure 4: float32 rounding ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["cg", "jacobian_free", "exact"])
def test_float32_certificate_accounts_for_rounding(name):
    """Scalar and tiny float32 problems, where ω is attained up to rounding."""
    est = {
        "cg": Implicit(CG(), lower_solver=GradientDescent(), compute_bound=True),
        "jacobian_free": JacobianFree(lower_solver=GradientDescent(), compute_bound=True),
        "exact": Exact(lower_solver=GradientDescent(), compute_bound=True),
    }[name]
    for seed in range(40):
        dim = 1 + seed % 3
        problem, batch, exact = random_quadratic(
            seed, 1, dim, 1, eig_low=0.5, eig_high=2.0, dtype=torch.float32
        )
        problem = dataclasses.replace(problem, mu=float(problem.true_lambda_min.min()))
        for tol in (1e-2, 1e-4, 1e-5):
            hg = est(problem, batch, torch.zeros(1, dim), lower_tol=tol, adjoint_tol=tol)
            if hg.bound_certified:
                assert error(hg, exact) <= hg.bound, (seed, tol, error(hg, exact), hg.bound)


# -- failure 5: an upper loss that does not reach x --------------------------------------------


@pytest.mark.parametrize(
    "est",
    [
        Implicit(compute_bound=True),
        Exact(compute_bound=True),
        JacobianFree(compute_bound=True),
        Unrolled(steps=5),
    ],
    ids=lambda e: type(e).__name__,
)
@pytest.mark.parametrize("uses_theta", [False, True])
def test_upper_loss_without_x_is_a_clear_error(est, uses_theta):
    problem, batch, _ = random_quadratic(0, 2, 4, 2)

    def f(x, th, batch):
        out = 0.5 * ((x.detach() - batch[3]) ** 2).sum(1)
        return out + (th * th).sum() if uses_theta else out

    problem = dataclasses.replace(problem, upper_loss=f)
    kwargs = {} if isinstance(est, Unrolled) else {"lower_tol": 1e-6}
    with pytest.raises(BilevelError, match="upper_loss does not depend on x"):
        est(problem, batch, torch.zeros(2, 4, dtype=F64), **kwargs)


# -- usability: θ-dependent μ, constants' provenance, tolerances, seeding -----------------------


def ridge_per_feature(seed: int = 0, d: int = 6, n: int = 40):
    gen = torch.Generator().manual_seed(seed)
    x_tr = torch.randn(n, d, generator=gen, dtype=F64)
    y_tr = x_tr @ torch.randn(d, generator=gen, dtype=F64)
    x_va = torch.randn(n, d, generator=gen, dtype=F64)
    y_va = x_va @ torch.randn(d, generator=gen, dtype=F64)
    theta = torch.zeros(d, dtype=F64).requires_grad_(True)

    def h(w, th, _):
        r = w @ x_tr.T - y_tr
        return 0.5 * (r * r).mean(1) + 0.5 * (torch.exp(th) * w * w).sum(1)

    def f(w, th, _):
        r = w @ x_va.T - y_va
        return 0.5 * (r * r).mean(1)

    def closed_form():
        th = theta.detach()
        a = x_tr.T @ x_tr / n + torch.diag(torch.exp(th))
        w = torch.linalg.solve(a, x_tr.T @ y_tr / n)
        q = torch.linalg.solve(a, x_va.T @ (x_va @ w - y_va) / n)
        return -torch.exp(th) * w * q

    problem = BilevelProblem(h, f, theta, mu=lambda th, batch: torch.exp(th).min())
    return problem, theta, closed_form


def test_mu_depending_on_theta_is_evaluated_at_the_current_theta():
    problem, theta, closed_form = ridge_per_feature()
    # J(w) = ∇²_θw h = diag(e^θ ∘ w) moves with w: L_J = max_k e^{θ_k}, stated as a function of θ
    consts = BoundConstants(jacobian_lipschitz=lambda th, batch: torch.exp(th).max())
    est = Implicit(CG(), lower_solver=GradientDescent(), constants=consts, compute_bound=True)
    for shift in (0.0, -2.0, 1.5):
        with torch.no_grad():
            theta.copy_(torch.linspace(-1.0, 1.0, theta.numel(), dtype=F64) + shift)
        hg = est(problem, None, torch.zeros(1, theta.numel(), dtype=F64), lower_tol=1e-3)
        assert hg.mu == pytest.approx(math.exp(-1.0 + shift))
        assert hg.constants["mu"].source == "stated"
        assert hg.constants["L_J"].value == pytest.approx(math.exp(1.0 + shift))
        assert hg.bound_certified
        assert float((hg.grad[0] - closed_form()).norm()) <= hg.bound


def test_mu_per_instance():
    problem, batch, exact = random_quadratic(3, 3, 4, 2)
    problem = dataclasses.replace(problem, mu=problem.true_lambda_min.clone())
    hg = Implicit(CG(), lower_solver=GradientDescent(), compute_bound=True)(
        problem, batch, torch.zeros(3, 4, dtype=F64), lower_tol=1e-2
    )
    assert hg.bound_certified
    assert hg.mu == pytest.approx(float(problem.true_lambda_min.min()))
    assert torch.allclose(hg.eps * problem.true_lambda_min, hg.eps * problem.mu)
    assert error(hg, exact) <= hg.bound


def test_constants_say_where_they_came_from():
    problem, batch, _ = random_quadratic(1, 2, 5, 2)
    hg = Implicit(compute_bound=True)(problem, batch, torch.zeros(2, 5, dtype=F64), lower_tol=1e-3)
    sources = {k: v.source for k, v in hg.constants.items()}
    assert sources == {
        "mu": "stated",
        "L_f": "computed",
        "L_H": "computed",
        "L_J": "computed",
        "jacobian_norm": "computed",
        "L_ftheta": "computed",
    }
    assert hg.constants["L_H"].value == 0.0 and hg.constants["L_ftheta"].value == 0.0
    assert hg.constants["L_f"].value == pytest.approx(1.0)
    assert hg.bound_certified
    stated = Implicit(constants=BoundConstants(upper_grad_lipschitz=2.0), compute_bound=True)(
        problem, batch, torch.zeros(2, 5, dtype=F64), lower_tol=1e-3
    )
    assert stated.constants["L_f"].source == "stated" and stated.constants["L_f"].value == 2.0


def test_stated_jacobian_norm_never_loosens_the_bound():
    problem, batch, _ = random_quadratic(2, 4, 5, 2)
    x0 = torch.zeros(4, 5, dtype=F64)
    plain = Implicit(compute_bound=True)(problem, batch, x0, lower_tol=1e-3)
    huge = Implicit(constants=BoundConstants(jacobian_norm=1e6), compute_bound=True)(
        problem, batch, x0, lower_tol=1e-3
    )
    assert huge.bound == pytest.approx(plain.bound)


@pytest.mark.parametrize("kw", [{"lower_tol": 1e-3}, {"adjoint_tol": 1e-3}])
def test_unrolled_refuses_tolerances(kw):
    problem, batch, _ = random_quadratic(0, 2, 4, 2)
    with pytest.raises(BilevelError, match="does not use lower_tol"):
        Unrolled(steps=3)(problem, batch, torch.zeros(2, 4, dtype=F64), **kw)


def test_one_tolerance_rule_for_lower_and_linear_solvers():
    problem, batch, exact = random_quadratic(0, 2, 4, 2)
    x0 = torch.zeros(2, 4, dtype=F64)
    hg = Implicit(CG(), lower_solver=Nesterov(max_iter=300), compute_bound=True)(
        problem, batch, x0, lower_tol=0.0, adjoint_tol=0.0
    )
    assert error(hg, exact) < 1e-10
    for bad in (-1e-3, math.nan):
        with pytest.raises(BilevelError, match="non-negative"):
            Implicit(compute_bound=True)(problem, batch, x0, lower_tol=bad)
        with pytest.raises(BilevelError, match="non-negative"):
            CG().solve(lambda v, i: v, x0 + 1.0, bad)


def test_power_iteration_is_seeded_from_the_call():
    """Without ``lipschitz``: x̃ of an instance does not depend on the batch or the global RNG."""
    problem, batch, _ = random_quadratic(4, 3, 5, 2)
    est = Implicit(lower_solver=GradientDescent(max_iter=7), compute_bound=True)
    x0 = torch.zeros(3, 5, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(1)
        together = est(problem, batch, x0, lower_tol=1e-12).x
        torch.manual_seed(2)
        alone = est(problem, tuple(t[1:2] for t in batch), x0[1:2], lower_tol=1e-12).x
    torch.testing.assert_close(alone[0], together[1], rtol=0, atol=1e-13)


# -- the property: certified ⇒ covered, always; estimated ⇒ covered, almost always --------------


def logistic(seed, n_batch, dim, n_params, theta_in_f, dtype):
    """h_i = mean_j log(1 + exp(−y_ij⟨a_ij, x⟩)) + ½Σ_k e^{θ_k}x_k² (+ ½ρ‖x‖²), f_i as above."""
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(n_batch, 12, dim, generator=gen, dtype=F64)
    labels = torch.sign(torch.randn(n_batch, 12, generator=gen, dtype=F64))
    t = torch.randn(n_batch, dim, generator=gen, dtype=F64)
    proj = torch.randn(dim, n_params, generator=gen, dtype=F64) * 0.3
    theta0 = 0.5 * torch.randn(n_params, generator=gen, dtype=F64) - 0.5
    expand = torch.rand(dim, n_params, generator=gen, dtype=F64) / n_params

    def make(dt, theta):  # the constants rounded to ``dtype`` as the problem sees them
        pr, ex = proj.to(dtype).to(dt), expand.to(dtype).to(dt)

        def h(x, th, batch):
            fe, la, _ = batch
            z = torch.einsum("bjd,bd->bj", fe, x) * la
            strength = torch.exp(ex @ th) + 0.1
            return torch.nn.functional.softplus(-z).mean(1) + 0.5 * (strength * x * x).sum(1)

        def f(x, th, batch):
            r = x - batch[2] + (pr @ th if theta_in_f else 0.0)
            return 0.5 * (r * r).sum(1)

        mu = lambda th, batch: (torch.exp(ex @ th) + 0.1).min()  # noqa: E731
        return BilevelProblem(h, f, theta, mu=mu)

    theta = theta0.to(dtype).requires_grad_(True)
    problem = make(dtype, theta)

    def reference():
        th64 = theta.detach().to(F64).requires_grad_(True)
        ref_problem = make(F64, th64)
        as_given = tuple(v.to(dtype).to(F64) for v in data)
        hg = Exact(lower_solver=Nesterov(max_iter=20000), compute_bound=True)(
            ref_problem, as_given, torch.zeros(n_batch, dim, dtype=F64), lower_tol=1e-13
        )
        return hg.grad[0]

    data = (feats, labels, t)
    return problem, tuple(v.to(dtype) for v in data), reference


LINEAR = [CG(), MINRES(), FixedPoint(max_iter=3000), Neumann(terms=60)]
LOWER = [GradientDescent(max_iter=3000), Nesterov(max_iter=3000), LBFGS(max_iter=300)]


@st.composite
def cases(draw):
    return dict(
        kind=draw(st.sampled_from(["quadratic", "logistic"])),
        seed=draw(st.integers(0, 10_000)),
        n_batch=draw(st.integers(1, 4)),
        dim=draw(st.integers(1, 8)),
        n_params=draw(st.integers(1, 4)),
        theta_in_f=draw(st.booleans()),
        dtype=draw(st.sampled_from([torch.float32, F64])),
        estimator=draw(st.sampled_from(["implicit", "exact", "jacobian_free"])),
        linear=draw(st.integers(0, len(LINEAR) - 1)),
        lower=draw(st.integers(0, len(LOWER) - 1)),
        tol=10.0 ** draw(st.floats(-5.0, -1.0)),
        stated_mu=draw(st.booleans()),
    )


def test_property_certified_bounds_never_lie():
    estimated: list[bool] = []

    @settings(max_examples=200, deadline=None, database=None, derandomize=True)
    @given(case=cases())
    def check(case):
        dtype = case["dtype"]
        if case["kind"] == "quadratic":
            problem, batch, exact = random_quadratic(
                case["seed"],
                case["n_batch"],
                case["dim"],
                case["n_params"],
                theta_in_f=case["theta_in_f"],
                dtype=dtype,
            )
            if case["stated_mu"]:
                problem = dataclasses.replace(problem, mu=problem.true_lambda_min.to(dtype))
        else:
            problem, batch, exact = logistic(
                case["seed"],
                case["n_batch"],
                case["dim"],
                case["n_params"],
                case["theta_in_f"],
                dtype,
            )
        if not case["stated_mu"]:
            problem = dataclasses.replace(problem, mu=None)
        lower = LOWER[case["lower"]]
        est = {
            "implicit": Implicit(LINEAR[case["linear"]], lower_solver=lower, compute_bound=True),
            "exact": Exact(lower_solver=lower, compute_bound=True),
            "jacobian_free": JacobianFree(lower_solver=lower, compute_bound=True),
        }[case["estimator"]]
        x0 = torch.zeros(case["n_batch"], case["dim"], dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hg = est(problem, batch, x0, lower_tol=case["tol"], adjoint_tol=case["tol"])
        err = float((hg.grad[0].to(F64) - exact()).norm())
        if hg.bound_certified:
            assert err <= hg.bound, (case, err, hg.bound, hg.constants)
        else:
            estimated.append(err <= hg.bound)

    check()
    assert len(estimated) >= 20
    assert sum(estimated) >= 0.99 * len(estimated), (sum(estimated), len(estimated))


# -- a-posteriori estimate, float64 residuals, robustness ---------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_a_posteriori_estimate_covers_the_error_and_is_tight(dtype):
    """Logistic lower levels (L_H, L_J estimated): the first-order a-posteriori estimate covers
    the true error and is far tighter than the worst-case estimated bound."""
    ratios, worst = [], []
    for seed in range(12):
        problem, batch, exact = logistic(seed, 3, 6, 2, seed % 2 == 1, dtype)
        x0 = torch.zeros(3, 6, dtype=dtype)
        for tol in (1e-1, 1e-3):
            hg = Implicit(CG(), compute_bound=True, constants=BoundConstants(a_posteriori=True))(
                problem, batch, x0, lower_tol=tol, adjoint_tol=tol
            )
            err = float((hg.grad[0].to(F64) - exact()).norm())
            assert not hg.bound_certified and hg.constants["a_posteriori"].value == hg.bound
            ratios.append(hg.bound / err)
            worst_case = Implicit(CG(), compute_bound=True)(
                problem, batch, x0, lower_tol=tol, adjoint_tol=tol
            )
            worst.append(worst_case.bound / err)
    ratios.sort()
    assert ratios[0] >= 1.0, ratios[:3]
    assert ratios[len(ratios) // 2] <= 10.0
    assert sorted(worst)[len(worst) // 2] >= 5 * ratios[len(ratios) // 2]


def test_certified_bound_is_kept_when_a_posteriori_is_asked_for():
    problem, batch, exact = random_quadratic(3, 2, 5, 2)
    hg = Implicit(CG(), compute_bound=True, constants=BoundConstants(a_posteriori=True))(
        problem, batch, torch.zeros(2, 5, dtype=F64), lower_tol=1e-3
    )
    assert hg.bound_certified and "a_posteriori" not in hg.constants
    assert error(hg, exact) <= hg.bound


def test_float32_residuals_are_recomputed_in_float64():
    """ε and δ of a float32 estimate are the float64 residuals at x̃, q̃ (no worst-case margin),
    and the bound still covers the error of the float32 z."""
    problem, batch, exact = random_quadratic(5, 2, 400, 2, dtype=torch.float32)
    problem = dataclasses.replace(problem, mu=float(problem.true_lambda_min.min()))
    est = Implicit(CG(), compute_bound=True, constants=BoundConstants(upper_grad_lipschitz=1.0))
    hg = est(problem, batch, torch.zeros(2, 400), lower_tol=1e-4, adjoint_tol=1e-4)
    a, m, c, t = (v.to(F64) for v in batch)
    x = hg.x.to(F64)
    th = problem.theta.detach().to(F64)
    grad_h = torch.einsum("bij,bj->bi", a, x) - (m @ th + c)
    residual = torch.einsum("bij,bj->bi", a, hg.adjoint.to(F64)) - (x - t)
    torch.testing.assert_close(hg.eps.to(F64) * problem.mu, grad_h.norm(dim=1), rtol=1e-6, atol=0)
    torch.testing.assert_close(hg.delta.to(F64), residual.norm(dim=1), rtol=1e-6, atol=0)
    assert hg.bound_certified and error(hg, exact) <= hg.bound


def test_upper_loss_linear_in_x_has_a_zero_hessian():
    """f_i = ⟨t_i, x⟩ (∇ₓf constant, no graph): L_f is computed as 0, the bound certified."""
    for dim in (4, 100):
        problem, batch, _ = random_quadratic(1, 2, dim, 2)
        problem = dataclasses.replace(problem, upper_loss=lambda x, th, b: (x * b[3]).sum(1))
        a, m, c, t = batch
        th = problem.theta.detach()
        q = torch.linalg.solve(a, t.unsqueeze(-1)).squeeze(-1)
        exact = torch.einsum("bip,bi->p", m, q) / 2
        hg = Implicit(CG(), compute_bound=True)(
            problem, batch, torch.zeros(2, dim, dtype=F64), lower_tol=1e-6
        )
        assert hg.constants["L_f"].value == 0.0 and hg.constants["L_f"].source == "computed"
        assert hg.bound_certified
        assert float((hg.grad[0] - exact).norm()) <= hg.bound
        del th


def test_unconverged_adjoint_warns_and_is_not_certified():
    problem, batch, exact = random_quadratic(2, 2, 30, 2, eig_low=0.01, eig_high=10.0)
    est = Implicit(CG(max_iter=3), compute_bound=True)
    x0 = torch.zeros(2, 30, dtype=F64)
    with pytest.warns(
        ConvergenceWarning, match="adjoint solver CG missed adjoint_tol.*not certified"
    ):
        hg = est(problem, batch, x0, lower_tol=1e-8, adjoint_tol=1e-8)
    assert not hg.bound_certified
    assert error(hg, exact) <= hg.bound  # the measured residual still bounds the error
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        hg = Implicit(CG(max_iter=200), compute_bound=True)(
            problem, batch, x0, lower_tol=1e-8, adjoint_tol=1e-8
        )
    assert hg.bound_certified


# -- piecewise-constant Hessians are not constant ----------------------------------------------


def test_piecewise_constant_hessian_is_not_taken_for_constant():
    """A spline potential's ψ'' is looked up by interval: no graph reaches x and the
    derivative vanishes almost everywhere, yet the Hessian jumps, so L_H = 0 would be false."""
    from bilevel.bounds import _constant_in_x

    x = torch.linspace(-1.0, 1.0, 12, dtype=F64).reshape(2, 6)
    v = torch.ones_like(x)
    jumps = _constant_in_x(lambda xr: [(torch.floor(100 * xr.detach()) % 2 + 1) * v], x, seed=0)
    linear = _constant_in_x(lambda xr: [2.0 * v + 0 * xr], x, seed=0)
    graph_free = _constant_in_x(lambda xr: [5.0 * v], x, seed=0)
    quadratic = _constant_in_x(lambda xr: [xr * v], x, seed=0)
    assert (jumps, linear, graph_free, quadratic) == (False, True, True, False)


def test_spline_ridge_energy_gets_no_computed_zero_hessian_lipschitz():
    from bilevel.imaging.regularisers import ConvexRidgeNetwork
    from bilevel.imaging.tasks import reconstruction_problem

    torch.manual_seed(0)
    reg = ConvexRidgeNetwork(num_filters=4, layers=1, kernel_size=3, num_knots=16).double()
    problem = reconstruction_problem(reg)
    x_true = torch.rand(2, 1, 10, 10, dtype=F64)
    y = x_true + 0.1 * torch.randn(x_true.shape, dtype=F64)
    hg = Implicit(CG(), compute_bound=True)(
        problem, (y, x_true), y.clone(), lower_tol=1e-3, adjoint_tol=1e-3
    )
    report = hg.constants["L_H"]
    assert not (report.source == "computed" and report.value == 0.0), report
    assert not hg.bound_certified
