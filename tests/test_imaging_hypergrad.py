"""Hypergradients through every regulariser and operator agree with finite differences."""

from __future__ import annotations

import pytest
import torch

from bilevel import CG, Implicit, Nesterov
from bilevel.imaging import (
    ConvexRidge,
    ConvexRidgeNetwork,
    Convolution,
    DegradedImages,
    FieldsOfExperts,
    Identity,
    InpaintingMask,
    InputConvexNetwork,
    LearnableMask,
    SmoothedTV,
    WeaklyConvexRidge,
    gaussian_kernel,
    random_mask,
    reconstruction_problem,
)

F64 = torch.float64


def _images(n=2, size=10, channels=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    grid = torch.linspace(0, 1, size, dtype=F64)
    base = (grid[:, None] > 0.4).to(F64) * 0.6 + 0.3 * grid[None, :]
    return (base + 0.05 * torch.rand(n, channels, size, size, generator=gen, dtype=F64)).clamp(0, 1)


#: Two 3×3 layers (5×5 support), coarse knots: responses fall on several knot intervals.
SMALL_RIDGE = {"layers": 2, "kernel_size": 3, "num_knots": 6, "knot_spacing": 0.05}
SMALL_RIDGE.update(strength=0.1, smoothing=0.05, boundary="circular")


@torch.no_grad()
def _perturbed(reg):
    """Perturb the filters: the initial ones have zero entries, where Young's bound ‖w‖₁² in
    the WCRR's concave allowance is not differentiable (finite differences see |·| there)."""
    gen = torch.Generator().manual_seed(5)
    for w in reg.layers:
        w.add_(0.1 * torch.randn(w.shape, generator=gen, dtype=w.dtype))
    return reg


@torch.no_grad()
def _nodes_perturbed(reg: ConvexRidgeNetwork) -> ConvexRidgeNetwork:
    """σ = 20/255 between the nodes 15 and 25, distinct values at the nodes: the
    hypergradient reaches both neighbouring nodes through the interpolation."""
    reg.log_strength.add_(torch.tensor([0.3, -0.2, 0.1], dtype=reg.log_strength.dtype))
    reg.log_sharpness.add_(torch.tensor([-0.2, 0.3, 0.0], dtype=reg.log_sharpness.dtype))
    return _perturbed(reg)


@torch.no_grad()
def _concave(reg: WeaklyConvexRidge) -> WeaklyConvexRidge:
    """Switch the concave part on, so the hypergradient passes through negative curvature."""
    reg.concave_logits.fill_(3.0)
    reg.share_logits.fill_(2.0)
    return _perturbed(reg)


REGULARISERS = {
    "tv": lambda c: SmoothedTV(strength=0.05, smoothing=0.05),
    "foe": lambda c: FieldsOfExperts(num_filters=3, filter_size=3, channels=c, smoothing=0.05),
    "foe_learned_smoothing": lambda c: FieldsOfExperts(
        num_filters=2, filter_size=3, channels=c, smoothing=0.05, learn_smoothing=True
    ),
    "foe_student_t": lambda c: FieldsOfExperts(
        num_filters=2, filter_size=3, channels=c, potential="student_t", smoothing=0.1
    ),
    "ridge": lambda c: ConvexRidge(num_filters=2, filter_size=3, channels=c, num_basis=2),
    "icnn": lambda c: InputConvexNetwork(channels=c, hidden=3, layers=2),
    "crr": lambda c: _perturbed(ConvexRidgeNetwork(2, c, **SMALL_RIDGE)),
    "crr_noise_nodes": lambda c: _nodes_perturbed(
        ConvexRidgeNetwork(2, c, noise_level=20 / 255, noise_nodes=(15, 25, 50), **SMALL_RIDGE)
    ),
    "wcrr": lambda c: _concave(WeaklyConvexRidge(2, c, max_weak_convexity=0.8, **SMALL_RIDGE)),
}

OPERATORS = {
    "identity": (lambda: Identity(), 0.0),
    "blur": (lambda: Convolution(gaussian_kernel(3, 0.8, dtype=F64)), 0.05),
    "mask": (lambda: InpaintingMask(random_mask((10, 10), 0.7, generator=1, dtype=F64)), 0.05),
}


def _check_fd(problem, batch, x0, n_checks=3, h=1e-5, rtol=2e-4):
    est = Implicit(CG(max_iter=2000), lower_solver=Nesterov(max_iter=20000), compute_bound=False)
    hg = est(problem, batch, x0, lower_tol=1e-11, adjoint_tol=1e-11)
    params = problem.params
    gen = torch.Generator().manual_seed(0)
    for _ in range(n_checks):
        direction = [torch.randn(p.shape, generator=gen, dtype=F64) for p in params]
        values = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for p, d in zip(params, direction):
                    p.add_(sign * h * d)
            values.append(est(problem, batch, hg.x, lower_tol=1e-11, adjoint_tol=1e-3).loss)
            with torch.no_grad():
                for p, d in zip(params, direction):
                    p.sub_(sign * h * d)
        fd = (values[0] - values[1]) / (2 * h)
        analytic = sum(float((g * d).sum()) for g, d in zip(hg.grad, direction))
        assert abs(fd - analytic) <= rtol * max(abs(fd), 1e-3), (fd, analytic)


@pytest.mark.parametrize("name", sorted(REGULARISERS))
def test_regulariser_hypergradients_match_finite_differences(name):
    clean = _images(channels=1)
    data = DegradedImages(clean, Identity(), sigma=0.1, seed=0)
    reg = REGULARISERS[name](1).to(F64)
    mu = 0.5 if name == "foe_student_t" else None  # small weights keep Student-t convex here
    problem = reconstruction_problem(reg, Identity(), mu=mu)
    y, x = data.batch()
    _check_fd(problem, (y, x), y.clone())


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_operator_hypergradients_match_finite_differences(name):
    make, gamma = OPERATORS[name]
    op = make()
    clean = _images(channels=1)
    data = DegradedImages(clean, op, sigma=0.05, seed=0)
    problem = reconstruction_problem(SmoothedTV(0.05, 0.05).to(F64), op, gamma=gamma)
    y, x = data.batch()
    _check_fd(problem, (y, x), op.adjoint(y))


def test_learnable_operator_hypergradient_matches_finite_differences():
    clean = _images(channels=1)
    noisy = clean + 0.05 * torch.randn(
        clean.shape, generator=torch.Generator().manual_seed(3), dtype=F64
    )
    op = LearnableMask((10, 10), init=0.6).to(F64)
    problem = reconstruction_problem(
        SmoothedTV(0.05, 0.05).to(F64), op, gamma=0.05, operator_penalty=0.1
    )
    _check_fd(problem, (noisy, clean), noisy.clone())


@pytest.mark.parametrize("name", ["blur", "identity"])
def test_psnr_loss_hypergradient_matches_finite_differences(name):
    """loss="psnr" (−PSNR in dB per image): the implicit hypergradient through a convex ridge
    network, with blur (γ > 0) and without, agrees with central differences of the loss."""
    make, gamma = OPERATORS[name]
    op = make()
    data = DegradedImages(_images(channels=1), op, sigma=0.05, seed=0)
    reg = _perturbed(ConvexRidgeNetwork(2, 1, **SMALL_RIDGE)).to(F64)
    problem = reconstruction_problem(reg, op, gamma=gamma, loss="psnr")
    y, x = data.batch()
    _check_fd(problem, (y, x), op.adjoint(y))


def test_psnr_loss_is_minus_the_psnr_and_its_gradient_is_closed_form():
    """f_i = −PSNR(x_i, x_true_i) (the metric of bilevel.imaging.psnr, peak 1), and
    ∇f_i = (20/ln 10) (x_i − x_true_i)/‖x_i − x_true_i‖²; "mse" stays ½‖x − x_true‖²."""
    from bilevel.imaging import psnr

    clean = _images(n=3)
    x = (
        clean
        + 0.05 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    ).requires_grad_(True)
    problem = reconstruction_problem(SmoothedTV(0.05, 0.05).to(F64), loss="psnr")
    f = problem.upper_loss(x, problem.theta, (clean, clean))
    torch.testing.assert_close(f, -psnr(x.detach(), clean))
    (g,) = torch.autograd.grad(f.sum(), x)
    d = (x - clean).detach()
    expected = (
        20
        / torch.log(torch.tensor(10.0, dtype=F64))
        * d
        / d.square().flatten(1).sum(1)[:, None, None, None]
    )
    torch.testing.assert_close(g, expected)
    mse = reconstruction_problem(SmoothedTV(0.05, 0.05).to(F64))
    torch.testing.assert_close(
        mse.upper_loss(x, mse.theta, (clean, clean)), 0.5 * d.square().flatten(1).sum(1)
    )
    exact = problem.upper_loss(clean, problem.theta, (clean, clean))
    assert torch.isfinite(exact).all()


def test_unknown_upper_loss_is_refused():
    from bilevel.problem import BilevelError

    with pytest.raises(BilevelError, match="loss must be one of mse, psnr"):
        reconstruction_problem(SmoothedTV(0.05, 0.05), loss="l1")
