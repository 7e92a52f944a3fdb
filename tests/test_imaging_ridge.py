"""Fused ridge oracles: energy, gradient, Hessian-vector products and θ-derivatives equal those
of a plain autograd reference (float64), gradcheck and gradgradcheck in x and θ, adjoints."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from bilevel.autodiff import LowerLevel
from bilevel.imaging import (
    ConvexRidge,
    ConvexRidgeNetwork,
    FieldsOfExperts,
    WeaklyConvexRidge,
    reconstruction_problem,
)
from bilevel.imaging import ridge as ridge_module
from bilevel.imaging.regularisers import _spline_tables
from bilevel.imaging.ridge import correlate, correlate_adjoint, pad


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randomise_(model, seed: int):
    """Perturb every parameter so that no symmetry of the initialisation hides an error."""
    gen = _gen(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * p.abs().mean().clamp_min(0.1) * torch.randn(p.shape, generator=gen))
    return model


def _make(name: str, channels: int, boundary: str):
    kw = {"channels": channels, "boundary": boundary}
    model = {
        "foe-l1": lambda: FieldsOfExperts(3, 3, learn_smoothing=True, smoothing=0.1, **kw),
        "foe-student": lambda: FieldsOfExperts(
            3, 3, potential="student_t", learn_smoothing=True, smoothing=0.2, **kw
        ),
        "ridge": lambda: ConvexRidge(3, 3, num_basis=2, scales=(0.05, 0.3), **kw),
        "crr": lambda: ConvexRidgeNetwork(3, layers=2, kernel_size=3, num_knots=5, **kw),
        "wcrr": lambda: WeaklyConvexRidge(3, layers=2, kernel_size=3, num_knots=5, **kw),
    }[name]()
    model = _randomise_(model.double(), 7)
    if name in ("crr", "wcrr"):
        with torch.no_grad():  # responses spread over the knots rather than beyond them
            model.log_sharpness[0] = math.log(0.5)
    return model


def _reference_energy(model, x: torch.Tensor) -> torch.Tensor:
    """R(x) by plain autograd operations, independent of bilevel.imaging.ridge."""
    kw = {"dtype": x.dtype}
    filters = model.effective_filters().to(**kw)
    size = filters.shape[-1]
    if model.boundary == "valid":
        xp = x
    else:
        lo = (size - 1) // 2
        xp = F.pad(x, (lo, size - 1 - lo, lo, size - 1 - lo), mode=model.boundary)
    t = F.conv2d(xp, filters)
    if isinstance(model, FieldsOfExperts):
        nu = model.smoothing.to(**kw)[:, None, None]
        if model.potential == "smoothed_l1":
            phi = torch.sqrt(t * t + nu * nu) - nu
        else:
            phi = torch.log1p(t * t / (nu * nu))
        return phi.sum(dim=(2, 3)) @ model.log_weights.exp().to(**kw)
    if isinstance(model, ConvexRidge):
        c = model.coefficients().to(**kw)
        s = model.scales.to(**kw)
        u = t.unsqueeze(-1) / s
        logcosh = u + F.softplus(-2.0 * u) - math.log(2.0)
        return (s * logcosh * c[:, None, None, :]).sum(dim=(1, 2, 3, 4))
    alpha, beta = model.scalings()
    curv = model.knot_curvatures(filters, alpha).to(**kw)
    beta = beta.to(**kw)
    d0, d1, d2 = _spline_tables(curv, model.knot_spacing)
    u = beta * t
    sign = torch.where(u >= 0, 1.0, -1.0).to(**kw)
    a = u * sign
    m = curv.shape[1]
    j = torch.clamp(torch.floor(a.detach() / model.knot_spacing), 0, m).long()
    r = a - j.to(**kw) * model.knot_spacing
    k = torch.arange(t.shape[1]).view(1, -1, 1, 1)
    psi = d0[k, j] + d1[k, j] * r + 0.5 * d2[k, j] * r * r
    return psi.sum(dim=(1, 2, 3)) / (beta * beta)


NAMES = ["foe-l1", "foe-student", "ridge", "crr", "wcrr"]


def _oracles(energy, x, v, q, params):
    """(R, ∇R, ∇²R v, ∇_θ⟨∇R, q⟩, ∇_θ Σ R) by autograd through ``energy``."""
    x = x.detach().requires_grad_(True)
    value = energy(x)
    (g,) = torch.autograd.grad(value.sum(), x, create_graph=True)
    (hv,) = torch.autograd.grad(g, x, v, retain_graph=True)
    jq = torch.autograd.grad(g, params, q, retain_graph=True, allow_unused=True)
    dtheta = torch.autograd.grad(value.sum(), params, allow_unused=True)
    return value, g, hv, jq, dtheta


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("boundary", ["reflect", "circular", "valid"])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_fused_oracles_equal_plain_autograd(
    name: str, boundary: str, channels: int, layout: str, monkeypatch
) -> None:
    # float64 takes the channel-first path unless the channels-last one (the float32 path
    # on the CPU: grouped transposed adjoint) is forced, so both are checked at rtol 1e-10
    if layout == "channels_last":
        monkeypatch.setattr(ridge_module, "fast_layout", lambda t: t.device.type == "cpu")
    model = _make(name, channels, boundary)
    params = list(model.parameters())
    gen = _gen(1)
    x, v, q = (torch.rand(2, channels, 9, 8, generator=gen, dtype=torch.float64) for _ in "xvq")
    x = 0.4 * x
    fused = _oracles(model, x, v, q, params)
    reference = _oracles(lambda z: _reference_energy(model, z), x, v, q, params)
    for a, b in zip(fused[:3], reference[:3]):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    for group in (3, 4):
        for p, a, b in zip(params, fused[group], reference[group]):
            a = torch.zeros_like(p) if a is None else a
            b = torch.zeros_like(p) if b is None else b
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-12), (group, p.shape)


@pytest.mark.parametrize("name", NAMES)
def test_float32_oracles_match_the_float64_reference(name: str) -> None:
    # the float32 path (channels-last correlations, grouped adjoint, packed spline lookup)
    model = _make(name, 1, "reflect")
    gen = _gen(5)
    x, v, q = (torch.rand(2, 1, 17, 13, generator=gen, dtype=torch.float64) for _ in "xvq")
    x = 0.4 * x
    reference = _oracles(lambda z: _reference_energy(model, z), x, v, q, list(model.parameters()))
    single = model.float()
    fused = _oracles(single, x.float(), v.float(), q.float(), list(single.parameters()))
    for a, b in zip(fused[:3], reference[:3]):
        a, b = a.detach().double(), b.detach()
        assert float((a - b).abs().max()) <= 1e-5 * float(b.abs().max())


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_and_gradgradcheck_in_x_and_theta(name: str) -> None:
    model = _make(name, 1, "reflect")
    names = [n for n, p in model.named_parameters()]
    theta = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    x = (0.4 * torch.rand(1, 1, 6, 5, generator=_gen(2), dtype=torch.float64)).requires_grad_()

    def energy(x, *theta):
        return functional_call(model, dict(zip(names, theta)), (x,))

    def gradient(x, *theta):
        (g,) = torch.autograd.grad(energy(x, *theta).sum(), x, create_graph=True)
        return g

    assert torch.autograd.gradcheck(energy, (x, *theta))
    # ∇ₓR in x (the HVP) and in θ (the mixed products Jᵀq), and its second derivatives
    assert torch.autograd.gradcheck(gradient, (x, *theta))
    assert torch.autograd.gradgradcheck(gradient, (x, *theta))


@pytest.mark.parametrize("boundary", ["reflect", "circular", "valid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels", [1, 3])
def test_correlate_adjoint_is_the_adjoint(boundary: str, dtype, channels: int) -> None:
    gen = _gen(3)
    filters = torch.randn(4, channels, 5, 5, generator=gen).to(dtype)
    x = torch.randn(2, channels, 11, 9, generator=gen).to(dtype)
    kx = correlate(x, filters, boundary)
    u = torch.randn(kx.shape, generator=gen).to(dtype)
    lhs = (kx * u).sum()
    rhs = (x * correlate_adjoint(u, filters, boundary, x.shape)).sum()
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    assert abs(float(lhs - rhs)) <= tol * float(kx.abs().sum() * u.abs().max())
    assert pad(x, 5, boundary).shape[-2:] == ((11, 9) if boundary == "valid" else (15, 13))


def test_hessian_products_skip_theta_derivatives(monkeypatch) -> None:
    # The lower-level gradient and each HVP cost one correlation and one adjoint; the
    # θ-derivative nodes run only for mixed products ∇_θ⟨∇ₓh, q⟩.
    model = _make("crr", 1, "reflect")
    problem = reconstruction_problem(model)
    x = 0.4 * torch.rand(2, 1, 9, 8, generator=_gen(4), dtype=torch.float64)
    calls = {"correlate": 0, "adjoint": 0}
    original = (ridge_module.correlate, ridge_module.correlate_adjoint)

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(ridge_module, "correlate", counting("correlate", original[0]))
    monkeypatch.setattr(ridge_module, "correlate_adjoint", counting("adjoint", original[1]))
    lower = LowerLevel(problem, (x, x))
    lower.value_and_grad(x)
    assert calls == {"correlate": 1, "adjoint": 1}
    op = lower.hessian(x)
    assert calls == {"correlate": 2, "adjoint": 2}
    for k in range(3):
        op.full_matvec(torch.ones_like(x))
        assert calls == {"correlate": 3 + k, "adjoint": 3 + k}
    params = list(problem.params)
    before = dict(calls)
    jq = op.jacobian_vjp(torch.ones_like(x), params)
    assert calls["correlate"] > before["correlate"] and any(bool(j.abs().sum()) for j in jq)


def test_cached_x_path_follows_theta(monkeypatch) -> None:
    # The x-path is made once per θ value: evaluations at an unchanged θ reuse it, and any
    # change of θ (an optimiser-style step under no_grad, a write through .data, a buffer)
    # makes it again; θ-derivatives build the terms only when asked for.
    model = _make("crr", 1, "reflect")
    x = 0.4 * torch.rand(2, 1, 9, 8, generator=_gen(6), dtype=torch.float64)
    builds = {"n": 0}
    original = model.ridge_terms

    def counting(like):
        builds["n"] += 1
        return original(like)

    monkeypatch.setattr(model, "ridge_terms", counting)

    def check() -> None:
        xr = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(model(xr).sum(), xr)
        xr = x.clone().requires_grad_(True)
        (ref,) = torch.autograd.grad(_reference_energy(model, xr).sum(), xr)
        assert torch.allclose(g, ref, rtol=1e-10, atol=1e-12)

    check()
    check()
    assert builds["n"] == 1
    with torch.no_grad():
        model.layers[0].mul_(1.1)
    check()
    model.log_slopes.data.add_(0.05)
    check()
    model.set_noise_level(20 / 255)
    check()
    assert builds["n"] == 4
    (dtheta,) = torch.autograd.grad(model(x).sum(), [model.log_strength])
    assert builds["n"] == 5 and bool(dtheta.abs().sum() > 0)


def test_theta_derivatives_with_swapped_parameters() -> None:
    # θ-derivatives taken after torch.func.functional_call returned: the terms are made from
    # the tensors of that call, not from the module's own parameters.
    model = _make("wcrr", 1, "reflect")
    names = [n for n, _ in model.named_parameters()]
    theta = [1.05 * p.detach().clone() for p in model.parameters()]
    theta = [t.requires_grad_(True) for t in theta]
    x = 0.4 * torch.rand(2, 1, 9, 8, generator=_gen(8), dtype=torch.float64)
    value = functional_call(model, dict(zip(names, theta)), (x,))
    fused = torch.autograd.grad(value.sum(), theta)
    with torch.no_grad():
        for p, t in zip(model.parameters(), theta):
            p.copy_(t)
    reference = torch.autograd.grad(_reference_energy(model, x).sum(), list(model.parameters()))
    for a, b in zip(fused, reference):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_theta_modified_before_its_derivative_is_refused() -> None:
    model = _make("foe-l1", 1, "reflect")
    x = 0.4 * torch.rand(1, 1, 9, 8, generator=_gen(9), dtype=torch.float64)
    value = model(x).sum()
    with torch.no_grad():
        model.filters.add_(0.1)
    with pytest.raises(RuntimeError, match="modified in place"):
        torch.autograd.grad(value, [model.filters])


@pytest.mark.parametrize("boundary", ["reflect", "circular"])
@pytest.mark.parametrize("size", [(2, 9, 7), (3, 150, 160)])
def test_pad_adjoint_is_the_adjoint_of_pad(boundary: str, size) -> None:
    # small batches: aten's reflection_pad2d_backward; from REFLECT_FOLD_SIZE numbers on the
    # margins are folded back with slices
    b, h, w = size
    gen = _gen(10)
    x = torch.randn(b, 1, h, w, generator=gen, dtype=torch.float64).requires_grad_(True)
    for s in (5, 6):
        z = torch.randn(pad(x, s, boundary).shape, generator=gen, dtype=torch.float64)
        (expected,) = torch.autograd.grad((pad(x, s, boundary) * z).sum(), x)
        adjoint = ridge_module.pad_adjoint(z, s, boundary, x.shape)
        assert (z.numel() >= ridge_module.REFLECT_FOLD_SIZE) == (h > 100)
        assert torch.allclose(adjoint, expected, rtol=1e-12, atol=1e-12)


def test_cached_x_path_follows_the_settings() -> None:
    # plain attributes the terms depend on (here the boundary) are part of the cache key
    model = _make("foe-student", 1, "reflect")
    x = 0.4 * torch.rand(2, 1, 9, 8, generator=_gen(11), dtype=torch.float64)
    for boundary in ("reflect", "circular", "valid"):
        model.boundary = boundary
        xr = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(model(xr).sum(), xr)
        xr = x.clone().requires_grad_(True)
        (ref,) = torch.autograd.grad(_reference_energy(model, xr).sum(), xr)
        assert torch.allclose(g, ref, rtol=1e-10, atol=1e-12)
