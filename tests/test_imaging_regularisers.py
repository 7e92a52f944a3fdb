"""Regularisers: shapes, second derivatives, convexity, curvature bounds, projections."""

from __future__ import annotations

import math

import pytest
import torch

from bilevel import BilevelError
from bilevel.imaging import (
    ConvexRidge,
    FieldsOfExperts,
    InputConvexNetwork,
    SmoothedTV,
)

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
    a.project_()
    assert float(a.filters.detach().mean(dim=(1, 2, 3)).abs().max()) < 1e-6
    torch.testing.assert_close(a(x), before)  # zero mean by construction: project_ keeps R
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
    reg.project_()
    assert float(reg.z_weights[0].detach().min()) >= 0
    assert float(reg.out_weights.detach().min()) >= 0


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
