"""Regularisers: shapes, second derivatives, convexity, curvature bounds, projections."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from bilevel import BilevelError
from bilevel.imaging import (
    ConvexRidge,
    ConvexRidgeNetwork,
    FieldsOfExperts,
    InputConvexNetwork,
    SmoothedTV,
    WeaklyConvexRidge,
    reconstruction_problem,
)
from bilevel.imaging.regularisers import _spline_tables, ridge_layers
from bilevel.imaging.ridge import Spline

SIZE = 14


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _make(name: str, c: int):
    small = {"channels": c}
    return {
        "tv": lambda: SmoothedTV(strength=0.1, smoothing=0.02),
        "foe-l1": lambda: FieldsOfExperts(num_filters=4, filter_size=3, **small),
        "foe-student": lambda: FieldsOfExperts(
            num_filters=4, filter_size=3, potential="student_t", smoothing=0.05, **small
        ),
        "foe-learned-nu": lambda: _spread_smoothing(
            FieldsOfExperts(num_filters=4, filter_size=3, learn_smoothing=True, **small)
        ),
        "ridge": lambda: ConvexRidge(num_filters=3, filter_size=3, num_basis=3, **small),
        "icnn": lambda: InputConvexNetwork(hidden=4, layers=3, init_scale=1.0, **small),
        "icnn-softplus": lambda: InputConvexNetwork(
            hidden=4, layers=2, positivity="softplus", init_scale=1.0, **small
        ),
    }[name]().double()


NAMES = ["tv", "foe-l1", "foe-student", "foe-learned-nu", "ridge", "icnn", "icnn-softplus"]
CONVEX = {
    "tv": True,
    "foe-l1": True,
    "foe-student": False,
    "foe-learned-nu": True,
    "ridge": True,
    "icnn": True,
}


def _spread_smoothing(reg: FieldsOfExperts) -> FieldsOfExperts:
    """Distinct per-filter smoothings ν_k (0.005 … 0.05), as after some learning."""
    with torch.no_grad():
        reg.log_smoothing.copy_(torch.linspace(math.log(0.005), math.log(0.05), 4))
    return reg


def _hvp_fn(reg, x):
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(reg(x).sum(), x, create_graph=True)

    def hvp(v):
        return torch.autograd.grad(g, x, v, retain_graph=True)[0]

    return hvp


def _quad(v, hv):
    return (v * hv).flatten(1).sum(1)


def _power_max_eig(reg, x, iters: int = 40) -> float:
    hvp = _hvp_fn(reg, x)
    v = torch.randn(x.shape, generator=_gen(3), dtype=x.dtype)
    lam = torch.zeros(x.shape[0], dtype=x.dtype)
    for _ in range(iters):
        v = v / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        hv = hvp(v)
        lam = _quad(v, hv)
        v = hv
    return float(lam.max())


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", NAMES)
def test_shape_hvp_convexity_and_curvature_bound(name: str, channels: int) -> None:
    reg = _make(name, channels)
    x = torch.rand(2, channels, SIZE, SIZE, generator=_gen(1), dtype=torch.float64)
    energy = reg(x)
    assert energy.shape == (2,) and energy.dtype == torch.float64
    assert reg.convex == CONVEX.get(name, True)
    hvp = _hvp_fn(reg, x)
    probes = torch.randn(5, *x.shape, generator=_gen(2), dtype=torch.float64)
    quads = torch.stack([_quad(v, hvp(v)) for v in probes])
    assert torch.isfinite(quads).all()
    if reg.convex:
        assert float(quads.min()) >= -1e-10
    bound = reg.curvature_bound()
    assert bound is not None and bound > 0
    const = torch.full_like(x, 0.5)  # zero filter responses: where smooth potentials peak
    for point in (x, const):
        assert _power_max_eig(reg, point) <= bound * (1 + 1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_twice_differentiable(name: str) -> None:
    reg = _make(name, 1)
    x = torch.rand(2, 1, 5, 5, generator=_gen(4), dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: reg(t), (x,), fast_mode=True)
    assert torch.autograd.gradgradcheck(lambda t: reg(t), (x,), fast_mode=True)


def test_student_t_has_negative_curvature() -> None:
    reg = _make("foe-student", 1)
    x = torch.rand(1, 1, SIZE, SIZE, generator=_gen(5), dtype=torch.float64)
    hvp = _hvp_fn(reg, x)
    assert float(_quad(x, hvp(x))) < 0  # large responses: φ'' < 0 along the ray through x
    assert not reg.convex


def test_ridge_curvature_exact_at_zero_response() -> None:
    # At a constant image all (zero-mean) filter responses vanish, where ψ_k''(0) = Σ_m c_km/σ_m.
    reg = _make("ridge", 1)
    x = torch.full((1, 1, 9, 9), 0.3, dtype=torch.float64)
    v = torch.randn(x.shape, generator=_gen(6), dtype=torch.float64)
    quad = float(_quad(v, _hvp_fn(reg, x)(v)))
    psi2 = (reg.coefficients().detach() / reg.scales).sum(1)
    padded = torch.nn.functional.pad(v, (1, 1, 1, 1), mode="reflect")  # 3×3 filters
    responses = torch.nn.functional.conv2d(padded, reg.effective_filters().detach())
    expected = float((psi2.view(1, -1, 1, 1) * responses**2).sum())
    assert quad == pytest.approx(expected, rel=1e-9)


def test_tv_values_and_parametrisation() -> None:
    tv = SmoothedTV(strength=0.2, smoothing=0.1).double()
    x = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    x[..., 2:] = 1.0  # one vertical edge of height 4
    expected = 0.2 * (4 * (1.0 + 0.01) ** 0.5 + 12 * 0.1)
    assert float(tv(x).detach()) == pytest.approx(expected)
    with torch.no_grad():
        assert float(tv.strength) == pytest.approx(0.2)
        assert float(tv.smoothing) == pytest.approx(0.1)
        assert tv.curvature_bound() == pytest.approx(8 * 0.2 / 0.1)
        tv.log_strength.fill_(-50.0)
        assert float(tv.strength) > 0
    assert SmoothedTV(learn_smoothing=False).log_smoothing.requires_grad is False


def test_foe_zero_mean_projection_and_seeded_init() -> None:
    a = FieldsOfExperts(num_filters=5, filter_size=5, channels=3, seed=7)
    b = FieldsOfExperts(num_filters=5, filter_size=5, channels=3, seed=7)
    torch.testing.assert_close(a.filters, b.filters)
    assert not torch.equal(a.filters, FieldsOfExperts(5, 5, 3, seed=8).filters)
    x = torch.rand(2, 3, 10, 10, generator=_gen(8))
    with torch.no_grad():
        a.filters.add_(torch.randn(a.filters.shape, generator=_gen(9)))
    before = a(x)
    assert float(a.filters.detach().mean(dim=(1, 2, 3)).abs().max()) > 1e-3
    with torch.no_grad():
        a.filters.sub_(a.filters.mean(dim=(1, 2, 3), keepdim=True))
    torch.testing.assert_close(a(x), before)  # zero mean by construction: R ignores the mean
    torch.testing.assert_close(a(x + 0.25), a(x), rtol=1e-4, atol=1e-4)  # blind to constants


def test_foe_initial_filters_start_with_finite_differences() -> None:
    reg = FieldsOfExperts(num_filters=9, filter_size=5, seed=0)
    k = reg.effective_filters().detach()[:, 0].double()
    # ∂/∂column [-1, 1] at the centre of the 5×5 window, up to the 10 % seeded perturbation
    dx = torch.zeros(5, 5, dtype=torch.float64)
    dx[2, 2], dx[2, 3] = -1.0, 1.0
    dx = dx / dx.norm()
    assert float((k[0] * dx).sum()) > 0.95
    assert float((k[1] * dx.T).sum()) > 0.95
    torch.testing.assert_close(k.flatten(1).norm(dim=1), torch.ones(9, dtype=torch.float64))
    # learned smoothing: one ν_k per filter, a parameter only when asked for
    assert not any(p is reg.log_smoothing for p in reg.parameters())
    learned = FieldsOfExperts(num_filters=3, filter_size=3, smoothing=0.02, learn_smoothing=True)
    assert learned.log_smoothing.requires_grad and learned.smoothing.shape == (3,)
    torch.testing.assert_close(learned.smoothing.detach(), torch.full((3,), 0.02))


def test_icnn_positivity() -> None:
    reg = InputConvexNetwork(channels=1, hidden=3, layers=3, init_scale=1.0).double()
    with torch.no_grad():
        reg.z_weights[0].sub_(1.0)  # make stored weights negative
        reg.out_weights[0] = -1.0
    x = torch.rand(1, 1, 8, 8, generator=_gen(10), dtype=torch.float64)
    hvp = _hvp_fn(reg, x)
    probes = torch.randn(6, *x.shape, generator=_gen(11), dtype=torch.float64)
    assert min(float(_quad(v, hvp(v))) for v in probes) >= -1e-10  # energy clamps at 0


def test_parameters_cast_to_input_dtype() -> None:
    for reg in (SmoothedTV(), FieldsOfExperts(3, 3), ConvexRidge(2, 3), InputConvexNetwork()):
        x = torch.rand(2, 1, 8, 8, dtype=torch.float64, requires_grad=True)
        out = reg(x)
        assert out.dtype == torch.float64
        out.sum().backward()
        assert x.grad is not None
        assert reg(x.detach().float()).dtype == torch.float32


def test_bad_inputs() -> None:
    with pytest.raises(BilevelError):
        FieldsOfExperts(potential="huber")
    with pytest.raises(BilevelError):
        FieldsOfExperts(channels=3)(torch.rand(1, 1, 8, 8))
    with pytest.raises(BilevelError):
        SmoothedTV()(torch.rand(8, 8))
    with pytest.raises(BilevelError):
        InputConvexNetwork(positivity="relu")


# --------------------------------------------------------------------------------------------
# Spline ridge networks (CRR-NN, WCRR-NN)
# --------------------------------------------------------------------------------------------


def _ridge_net(cls, channels: int = 1, **kw):
    """A small model (support 5: two 3×3 layers) with coarse knots, so that responses of
    random images fall on many knot intervals."""
    opts = {"num_filters": 4, "layers": 2, "kernel_size": 3, "num_knots": 12}
    opts.update(knot_spacing=0.02, smoothing=0.03, strength=0.2, **kw)
    return cls(channels=channels, **opts).double()


@torch.no_grad()
def _randomise_(reg, seed: int):
    """Random θ: perturbed filters, potentials and scalings."""
    gen = _gen(seed)
    for p in reg.parameters():
        p.add_(0.5 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return reg


def _min_eig(reg, x, iters: int = 60) -> float:
    """Smallest eigenvalue of ∇²R(x) by power iteration on c I − ∇²R (c ≥ λ_max)."""
    hvp = _hvp_fn(reg, x)
    c = reg.curvature_bound()
    v = torch.randn(x.shape, generator=_gen(8), dtype=x.dtype)
    for _ in range(iters):
        v = v / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        w = c * v - hvp(v)
        lam = c - _quad(v, w)
        v = w
    return float(lam.min())


def test_composite_filters_equal_the_layered_convolutions() -> None:
    reg = _randomise_(ConvexRidgeNetwork(num_filters=3, channels=2).double(), 0)
    assert reg.filter_size == 13 and reg.effective_filters().shape == (3, 2, 13, 13)
    x = torch.rand(2, 2, 20, 20, generator=_gen(1), dtype=torch.float64)
    first = reg.layers[0] - reg.layers[0].mean(dim=(1, 2, 3), keepdim=True)
    y = torch.nn.functional.conv2d(x, first)
    for w in reg.layers[1:]:
        y = torch.nn.functional.conv2d(y, w)
    z = torch.nn.functional.conv2d(x, reg.effective_filters())
    assert torch.allclose(y, z, atol=1e-10)
    sums = reg.effective_filters().sum(dim=(1, 2, 3))
    assert float(sums.detach().abs().max()) < 1e-10  # zero-mean: constant images cost nothing
    const = torch.full((1, 2, 16, 16), 0.7, dtype=torch.float64)
    assert float(reg(const).detach().abs()) < 1e-12


def test_ridge_layers_compose_to_the_requested_support() -> None:
    assert ridge_layers(13) == (3, 5) and ridge_layers(7) == (3, 3) and ridge_layers(5) == (1, 5)
    for bad in (4, 1):
        with pytest.raises(BilevelError):
            ridge_layers(bad)


def test_spline_potential_derivatives_match_its_knots() -> None:
    # φ(t) = β⁻²ψ(βt): φ' (closed form and by autograd) matches central differences of φ;
    # φ'' is the knot curvature of the interval of βt (0 beyond the last knot), also at t = 0.
    gen = _gen(2)
    slopes = torch.rand(3, 6, generator=gen, dtype=torch.float64) * 2 - 0.5
    spacing, beta = 0.1, torch.tensor(1.7, dtype=torch.float64)
    params = (torch.stack(_spline_tables(slopes, spacing)), beta)
    spline = Spline(spacing)
    t = (torch.rand(1, 3, 7, 7, generator=gen, dtype=torch.float64) - 0.5) * 1.6 / 1.7
    t[0, :, 0, 0] = 0.0
    t = t.requires_grad_(True)
    phi = spline.value(t, params)
    # the fused path takes v = a t and returns φ' = b φ̃'(v), φ'' = a b φ̃''(v)
    a, b = (s.view(1, -1, 1, 1) for s in spline.scales(params))
    v = a * t.detach()
    energy, dv, state = spline.evaluate(v, params)
    d1, d2 = b * dv, a * b * spline.curvature(v, params, state)
    assert torch.allclose(energy, phi.detach().sum(dim=(1, 2, 3)), rtol=1e-12)
    (d1_autograd,) = torch.autograd.grad(phi.sum(), t)
    h = 1e-6
    with torch.no_grad():
        fd = (spline.value(t + h, params) - spline.value(t - h, params)) / (2 * h)
    assert torch.allclose(d1, fd, atol=1e-7) and torch.allclose(d1_autograd, d1, atol=1e-12)
    assert torch.allclose(spline.first(t, params), d1, atol=1e-15)
    j = torch.clamp(torch.floor(1.7 * t.detach().abs() / spacing), max=6).long()
    table = torch.cat([slopes, torch.zeros(3, 1, dtype=torch.float64)], 1)
    expected = table[torch.arange(3).view(1, 3, 1, 1), j]
    assert torch.allclose(spline.second(t, params), expected, atol=1e-12)
    assert torch.allclose(d2, expected, atol=1e-12)
    assert torch.allclose(phi.detach(), spline.value(-t.detach(), params))  # even


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("channels", [1, 3])
def test_convex_ridge_network_is_convex_with_a_certified_curvature_bound(seed, channels):
    reg = _randomise_(_ridge_net(ConvexRidgeNetwork, channels), seed)
    assert reg.convex and reg.weak_convexity_bound() == 0.0
    x = torch.rand(2, channels, SIZE, SIZE, generator=_gen(seed + 10), dtype=torch.float64)
    x = 0.3 * x  # responses spread over the knots
    hvp = _hvp_fn(reg, x)
    probes = torch.randn(6, *x.shape, generator=_gen(seed + 20), dtype=torch.float64)
    quads = torch.stack([_quad(v, hvp(v)) for v in probes])
    assert float(quads.min()) >= -1e-10
    bound = reg.curvature_bound()
    for point in (x, torch.full_like(x, 0.5)):
        measured = _power_max_eig(reg, point)
        assert 0 < measured <= bound * (1 + 1e-9)


@torch.no_grad()
def _strongly_concave(seed: int) -> WeaklyConvexRidge:
    """A WCRR at a θ that uses most of its allowance: circular boundary (no padding gain),
    directional-derivative filters (Young's bound nearly tight), concave part switched on."""
    reg = _ridge_net(WeaklyConvexRidge, max_weak_convexity=0.6, boundary="circular")
    gen = _gen(seed)
    reg.log_slopes.add_(torch.randn(reg.log_slopes.shape, generator=gen, dtype=torch.float64))
    reg.log_strength[0] -= 6.0
    reg.concave_logits.add_(6.0 + torch.randn(reg.concave_logits.shape, generator=gen).double())
    reg.share_logits.add_(4.0 + torch.randn(reg.share_logits.shape, generator=gen).double())
    return reg


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weakly_convex_ridge_modulus_stays_below_its_cap(seed):
    reg = _strongly_concave(seed)
    rho = reg.weak_convexity_bound()
    assert not reg.convex and rho == 0.6
    x = 0.3 * torch.rand(2, 1, SIZE, SIZE, generator=_gen(seed + 10), dtype=torch.float64)
    lam_min = _min_eig(reg, x)
    assert lam_min < -1e-3  # really non-convex at this θ ...
    assert lam_min >= -rho * (1 + 1e-9)  # ... but never beyond the cap
    assert -lam_min <= reg.current_weak_convexity_bound() * (1 + 1e-9) <= rho * (1 + 1e-9)
    hvp = _hvp_fn(reg, x)
    for v in torch.randn(6, *x.shape, generator=_gen(seed + 20), dtype=torch.float64):
        assert float((_quad(v, hvp(v)) / _quad(v, v)).min()) >= -rho * (1 + 1e-9)
    assert _power_max_eig(reg, x) <= reg.curvature_bound() * (1 + 1e-9)
    # ½‖x − y‖² + R is (1 − ρ)-strongly convex: the problem states that margin as μ.
    assert reconstruction_problem(reg).mu == pytest.approx(1.0 - rho)
    with pytest.raises(BilevelError, match="weakly convex"):
        reconstruction_problem(_ridge_net(WeaklyConvexRidge, max_weak_convexity=1.5))
    assert reconstruction_problem(
        _ridge_net(WeaklyConvexRidge, max_weak_convexity=1.5), gamma=1.0
    ).mu == pytest.approx(0.5)


@torch.no_grad()
def test_noise_level_scaling() -> None:
    reg = _ridge_net(ConvexRidgeNetwork)
    x = torch.rand(1, 1, 12, 12, generator=_gen(3), dtype=torch.float64)
    e25 = float(reg(x))
    alpha, beta = reg.scalings()
    assert float(alpha) == pytest.approx(0.2 * math.pi / 8) and float(beta) == pytest.approx(1)
    reg.set_noise_level(50 / 255)  # initial a₁ = 0, b₁ = −1: β halves, ν/β and α/β double
    assert float(reg.scalings()[1]) == pytest.approx(0.5)
    assert float(reg(x)) != pytest.approx(e25)
    with pytest.raises(BilevelError):
        reg.set_noise_level(25.0)
    with pytest.raises(BilevelError):
        ConvexRidgeNetwork(num_knots=0)


NODES = (15.0, 25.0, 50.0)


@pytest.mark.parametrize("cls", [ConvexRidgeNetwork, WeaklyConvexRidge])
def test_noise_nodes_interpolate_the_scalings_and_keep_the_certificates(cls) -> None:
    reg = _randomise_(_ridge_net(cls), 4)  # random log-linear scalings (a₁, b₁ ≠ 0, −1)
    x = 0.3 * torch.rand(1, 1, SIZE, SIZE, generator=_gen(5), dtype=torch.float64)
    sigmas = (10.0, 15.0, 20.0, 25.0, 40.0, 50.0, 70.0)

    def at(sigma: float) -> tuple[Tensor, Tensor, float]:
        reg.set_noise_level(sigma / 255)
        return (*reg.log_scalings(), float(reg(x).detach()))

    before = {s: at(s) for s in sigmas}
    reg.set_noise_level(25 / 255).with_noise_nodes(NODES)
    assert reg.noise_nodes == NODES and reg.log_strength.shape == (3,)
    assert float(reg.noise_level) == pytest.approx(25 / 255)  # kept
    for s in sigmas:  # a log-linear scaling is a linear spline for any nodes: unchanged
        a, b, e = at(s)
        assert a.item() == pytest.approx(before[s][0].item(), abs=1e-12)
        assert b.item() == pytest.approx(before[s][1].item(), abs=1e-12)
        assert e == pytest.approx(before[s][2], rel=1e-10)
    with torch.no_grad():  # learned node values
        reg.log_strength.add_(torch.tensor([0.4, 0.0, -0.6], dtype=torch.float64))
        reg.log_sharpness.add_(torch.tensor([-0.3, 0.2, 0.5], dtype=torch.float64))
    for j, s in enumerate(NODES):  # at a node: its values, and gradients for them only
        reg.zero_grad()
        a, b, _ = at(s)
        assert a.item() == reg.log_strength[j].item() and b.item() == reg.log_sharpness[j].item()
        (a + 2 * b).backward()
        one_hot = torch.zeros(3, dtype=torch.float64).index_fill_(0, torch.tensor(j), 1.0)
        assert torch.equal(reg.log_strength.grad, one_hot)
        assert torch.equal(reg.log_sharpness.grad, 2 * one_hot)
    t = math.log(20 / 15) / math.log(25 / 15)  # between nodes: linear in log σ
    v = reg.log_strength.detach()
    assert at(20.0)[0].item() == pytest.approx(float((1 - t) * v[0] + t * v[1]), abs=1e-12)
    t = math.log(70 / 25) / math.log(50 / 25)  # beyond the last node: its segment extended
    assert at(70.0)[0].item() == pytest.approx(float((1 - t) * v[1] + t * v[2]), abs=1e-12)
    # the certificates hold at every σ: convexity (or the weak-convexity cap), curvature bound
    rho = reg.weak_convexity_bound()
    for s in (12.0, 15.0, 35.0, 50.0, 80.0):
        reg.set_noise_level(s / 255)
        assert _power_max_eig(reg, x) <= reg.curvature_bound() * (1 + 1e-9)
        assert _min_eig(reg, x) >= -rho * (1 + 1e-9) - 1e-10
    # rescale_ multiplies α at every σ
    alpha = reg.scalings()[0].item()
    reg.rescale_(2.0)
    assert reg.scalings()[0].item() == pytest.approx(2 * alpha)
    # a float32 noise level at a node still selects that node alone
    reg.float().set_noise_level(15 / 255)
    reg.zero_grad()
    reg.log_scalings()[0].backward()
    assert reg.log_strength.grad.tolist() == [1.0, 0.0, 0.0]
    for bad in ([25.0], [25.0, 15.0], [0.0, 25.0], [15.0, 15.0], [15.0, 300.0]):
        with pytest.raises(BilevelError, match="noise_nodes"):
            cls(num_filters=2, layers=1, kernel_size=3, noise_nodes=bad)


@pytest.fixture(scope="module")
def tv_tuned_crops():
    """Six noisy 20 px crops of the bundled training images (σ = 25/255) and the TV
    strength of the job's grid that is best on them, with its PSNR."""
    from bilevel.imaging import DegradedImages, bundled_images, grid_search_tv, random_crops
    from bilevel.imaging.job import TV_GRID

    clean = random_crops(bundled_images("train", dtype=torch.float64), 20, 6, generator=3)
    batch = DegradedImages(clean, sigma=25 / 255, seed=4).batch()
    return batch, grid_search_tv(batch, TV_GRID, max_iter=1000, tol=1e-3)


@pytest.mark.parametrize(
    "model,filters,size",
    [("foe", 2, 3), ("foe", 4, 5), ("foe", 16, 7)]
    + [("crr", 2, 5), ("crr", 8, 13), ("wcrr", 8, 13)],
)
def test_initialisation_starts_at_or_above_tuned_tv(tv_tuned_crops, model, filters, size):
    """The job's initial models, calibrated on the tuned TV strength λ, denoise at least as
    well as that TV (they reproduce smoothed isotropic TV, with a smaller smoothing)."""
    from bilevel.imaging import psnr, reconstruct
    from bilevel.imaging.config import job_config
    from bilevel.imaging.job import make_regulariser

    batch, tv = tv_tuned_crops
    args = job_config("denoise", regulariser=model, filters=filters, filter_size=size)
    reg = make_regulariser(args, channels=1).double()
    if model == "foe":
        from bilevel.imaging.job import calibrate_foe_weights

        calibrate_foe_weights(reg, tv.strength)
    else:
        from bilevel.imaging.job import calibrate_ridge_strength

        calibrate_ridge_strength(reg, tv.strength)
    x = reconstruct(reconstruction_problem(reg), batch, tol=1e-3, max_iter=3000)
    assert float(psnr(x, batch[1]).mean()) >= tv.psnr


def test_grid_search_tv_extends_the_grid_past_an_edge_optimum(tv_tuned_crops):
    from bilevel.imaging import GridEdgeWarning, grid_search_tv

    batch, tuned = tv_tuned_crops
    result = grid_search_tv(batch, (0.01, 0.02), max_iter=1000, tol=1e-3)  # optimum above
    assert result.interior and result.strengths[0] < result.strength < result.strengths[-1]
    assert result.strengths[:3] == [0.01, 0.02, 0.04]  # doubled, the ratio of the edge values
    assert result.psnr == max(result.psnrs)
    assert result.psnr >= tuned.psnr - 0.1  # near the job grid's optimum
    # from above: halved until the optimum is bracketed
    above = grid_search_tv(batch, (0.6, 1.2), max_iter=1000, tol=1e-3)
    assert above.interior and above.strengths[-2:] == [0.6, 1.2]
    assert above.strengths[0] < 0.6 / 2 and above.psnr >= tuned.psnr - 0.1
    # too few extensions to reach it: the edge is returned, with a warning
    with pytest.warns(GridEdgeWarning, match="edge of the searched range"):
        short = grid_search_tv(batch, (0.6, 1.2), max_iter=1000, tol=1e-3, extend=1)
    assert not short.interior and short.strength == short.strengths[0] == 0.3
