"""Forward operators (adjointness, norms, flags) and the assembled reconstruction problems."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from bilevel import BilevelError
from bilevel.imaging import (
    ConvexRidge,
    Convolution,
    DegradedImages,
    FieldsOfExperts,
    Identity,
    InpaintingMask,
    LearnableMask,
    SmoothedTV,
    WeightedFit,
    gaussian_kernel,
    grid_search_tv,
    lipschitz_bound,
    motion_blur_kernel,
    psnr,
    random_mask,
    reconstruction_problem,
)
from bilevel.lower import ConvergenceWarning

B, H, W = 3, 12, 10


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _operators(c: int) -> dict:
    g = _gen(1)
    asym = torch.rand(3, 5, generator=g, dtype=torch.float64) - 0.3
    per_instance = random_mask((B, 1, H, W), 0.6, generator=2)
    return {
        "identity": Identity(),
        "gauss-zero": Convolution(gaussian_kernel(5, 1.2)),
        "motion-circular": Convolution(motion_blur_kernel(5, 30.0), boundary="circular"),
        "asym-zero": Convolution(asym),
        "asym-circular": Convolution(asym, boundary="circular"),
        "mask-shared": InpaintingMask(random_mask((H, W), 0.5, generator=3)),
        "mask-per-instance": InpaintingMask(per_instance),
        "mask-fractional": InpaintingMask(torch.rand(1, c, H, W, generator=g)),
        "learnable-mask": LearnableMask(
            (1, c, H, W), init=torch.rand(1, c, H, W, generator=g) * 0.9 + 0.05
        ),
    }


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).flatten(1).sum(1)


def _power_norm(op, shape, iters: int = 60) -> float:
    v = torch.randn(shape, generator=_gen(5), dtype=torch.float64)
    for _ in range(iters):
        v = v / v.norm()
        v = op.normal(v)
    return math.sqrt(float(v.norm()))


OP_NAMES = list(_operators(1))


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", OP_NAMES)
def test_adjoint_normal_and_norm_bound(name: str, channels: int) -> None:
    op = _operators(channels)[name]
    g = _gen(7)
    x = torch.randn(B, channels, H, W, generator=g, dtype=torch.float64)
    y = torch.randn(B, channels, H, W, generator=g, dtype=torch.float64)
    with torch.no_grad():
        ax = op(x)
        aty = op.adjoint(y)
        assert ax.shape == x.shape and ax.dtype == torch.float64
        torch.testing.assert_close(_dot(ax, y), _dot(x, aty), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(op.normal(x), op.adjoint(op(x)), rtol=1e-12, atol=1e-12)
        estimate = _power_norm(op, (B, channels, H, W))
    assert op.norm_bound() >= estimate * (1 - 1e-9)
    assert op.norm_lower_bound() <= estimate + 1e-12
    assert op.has_kernel == (not op.is_injective)


def test_operator_follows_input_dtype() -> None:
    op = Convolution(gaussian_kernel(3, 1.0))
    x32 = torch.rand(2, 1, 8, 8)
    assert op(x32).dtype == torch.float32
    assert op(x32.double()).dtype == torch.float64


@pytest.mark.parametrize("boundary,mode", [("zero", "constant"), ("circular", "wrap")])
def test_convolution_matches_scipy(boundary: str, mode: str) -> None:
    k = torch.rand(3, 5, generator=_gen(3), dtype=torch.float64)
    x = torch.rand(2, 3, 9, 11, generator=_gen(4), dtype=torch.float64)
    out = Convolution(k, boundary=boundary)(x)
    ref = np.stack(
        [[ndimage.convolve(xc, k.numpy(), mode=mode, cval=0.0) for xc in xb] for xb in x.numpy()]
    )
    np.testing.assert_allclose(out.detach().numpy(), ref, rtol=1e-6, atol=1e-7)


def test_kernels() -> None:
    g = gaussian_kernel(7, 1.5, dtype=torch.float64)
    assert g.shape == (7, 7) and abs(float(g.sum()) - 1) < 1e-12
    torch.testing.assert_close(g, g.T)
    torch.testing.assert_close(g, g.flip(0))
    assert int(g.argmax()) == 24
    horizontal = motion_blur_kernel(5, 0.0, dtype=torch.float64)
    assert abs(float(horizontal.sum()) - 1) < 1e-12
    c = horizontal.shape[0] // 2
    assert float(horizontal[c].sum()) == pytest.approx(1.0)
    vertical = motion_blur_kernel(5, 90.0, dtype=torch.float64)
    assert float(vertical[:, c].sum()) == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(BilevelError):
        gaussian_kernel(4, 1.0)
    with pytest.raises(BilevelError):
        Convolution(torch.ones(4, 3))


def test_injectivity_flags() -> None:
    assert Identity().is_injective and not Identity().has_kernel
    assert Convolution(gaussian_kernel(3, 1.0)).has_kernel
    assert InpaintingMask(random_mask((8, 8), 0.5, generator=0)).has_kernel
    assert InpaintingMask(torch.full((8, 8), 0.5)).norm_lower_bound() == pytest.approx(0.5)
    assert LearnableMask((8, 8)).has_kernel
    with pytest.raises(BilevelError):
        InpaintingMask(torch.full((8, 8), 2.0))


def test_masks_per_instance_and_per_call() -> None:
    m = random_mask((B, 1, H, W), 0.5, generator=0, dtype=torch.float64)
    torch.testing.assert_close(m, random_mask((B, 1, H, W), 0.5, generator=0, dtype=torch.float64))
    x = torch.rand(B, 3, H, W, dtype=torch.float64)
    torch.testing.assert_close(InpaintingMask(m)(x), m * x)
    torch.testing.assert_close(InpaintingMask()(x, mask=m), m * x)
    with pytest.raises(BilevelError):
        InpaintingMask(m)(x[:2])
    with pytest.raises(BilevelError):
        InpaintingMask()(x)


def test_learnable_mask() -> None:
    op = LearnableMask((1, 1, 6, 6), init=0.3)
    w = op.weights()
    torch.testing.assert_close(w, torch.full_like(w, 0.3))
    cost = op.sampling_cost()
    cost.backward()
    assert op.logits.grad is not None and float(op.logits.grad.abs().sum()) > 0
    with torch.no_grad():
        op.logits[0, 0, :2] = 3.0
    kept = op.binarise(fraction=12 / 36)
    assert float(kept.mask.sum()) == 12 and float(kept.mask[0, 0, :2].sum()) == 12
    with pytest.raises(BilevelError):
        LearnableMask((4, 4), init=1.0)


# ---------------------------------------------------------------------------------------------
# tasks: the assembled bilevel problems
# ---------------------------------------------------------------------------------------------


def _batch(c: int = 1, b: int = 2, size: int = 12, op=None, seed: int = 0):
    x = torch.rand(b, c, size, size, generator=_gen(seed), dtype=torch.float64)
    ds = DegradedImages(x, op, sigma=0.1, seed=seed)
    return ds.batch()


def _hvp_extremes(problem, x, batch, iters: int = 60) -> tuple[float, float]:
    """Power-iteration estimates of the largest and smallest Hessian eigenvalues of h."""
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(problem.energy(x, batch).sum(), x, create_graph=True)

    def hv(v):
        return torch.autograd.grad(g, x, v, retain_graph=True)[0]

    v = torch.randn(x.shape, generator=_gen(9), dtype=x.dtype)
    for _ in range(iters):
        v = hv(v / v.norm())
    top = float(v.norm())
    u = torch.randn(x.shape, generator=_gen(10), dtype=x.dtype)
    for _ in range(iters):
        u = u / u.norm()
        u = top * u - hv(u)
    return top, top - float(u.norm())


def test_problem_shapes_and_params() -> None:
    tv = SmoothedTV().double()
    problem = reconstruction_problem(tv, Identity())
    y, x_true = _batch()
    assert problem.energy(y, (y, x_true)).shape == (2,)
    assert problem.loss(y, (y, x_true)).shape == (2,)
    assert problem.loss(x_true, (y, x_true)).abs().max() == 0
    assert {id(p) for p in problem.params} == {id(p) for p in tv.parameters()}
    assert problem.mu == pytest.approx(1.0)
    assert problem.theta["regulariser"] is tv


def test_mu_rules() -> None:
    tv = SmoothedTV()
    assert reconstruction_problem(tv, Identity(), gamma=0.5).mu == pytest.approx(1.5)
    assert reconstruction_problem(tv).mu == pytest.approx(1.0)
    blur = Convolution(gaussian_kernel(5, 1.0))
    with pytest.raises(BilevelError, match="gamma"):
        reconstruction_problem(tv, blur)
    with pytest.raises(BilevelError):
        reconstruction_problem(tv, InpaintingMask(random_mask((8, 8), 0.5)))
    with pytest.raises(BilevelError):
        reconstruction_problem(tv, LearnableMask((8, 8)))
    assert reconstruction_problem(tv, blur, gamma=0.1).mu == pytest.approx(0.1)
    assert reconstruction_problem(ConvexRidge(), blur, gamma=0.1).mu == pytest.approx(0.1)
    student = FieldsOfExperts(potential="student_t")
    assert reconstruction_problem(student).mu is None
    assert reconstruction_problem(student, mu=0.3).mu == pytest.approx(0.3)
    with pytest.raises(BilevelError):
        reconstruction_problem(student, blur)
    with pytest.raises(BilevelError):
        reconstruction_problem(tv, gamma=-1.0)


@pytest.mark.parametrize("op_name", ["identity", "blur"])
def test_lipschitz_and_mu_are_bounds(op_name: str) -> None:
    op = Identity() if op_name == "identity" else Convolution(gaussian_kernel(3, 0.8))
    gamma = 0.0 if op_name == "identity" else 0.05
    tv = SmoothedTV(strength=0.05, smoothing=0.05).double()
    problem = reconstruction_problem(tv, op, gamma=gamma)
    y, x_true = _batch(op=op)
    lip = lipschitz_bound(problem)
    assert lip == pytest.approx(op.norm_bound() ** 2 + 8 * 0.05 / 0.05 + gamma)
    assert lip == pytest.approx(lipschitz_bound(tv, op, gamma))
    top, bottom = _hvp_extremes(problem, y, (y, x_true))
    assert top <= lip * (1 + 1e-9)
    assert bottom >= problem.mu * (1 - 1e-6)


def test_learnable_operator_problem() -> None:
    size = 10
    op = LearnableMask((1, 1, size, size), init=0.5).double()
    reg = ConvexRidge(num_filters=2, filter_size=3).double()
    problem = reconstruction_problem(reg, op, gamma=0.1, operator_penalty=0.2)
    assert problem.data_term == WeightedFit()
    assert problem.mu == pytest.approx(0.1)
    assert any(p is op.logits for p in problem.params)
    assert float(problem.upper_regulariser(problem.theta).detach()) == pytest.approx(0.1)
    y, x_true = _batch(size=size)
    x = x_true.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(problem.energy(x, (y, x_true)).sum(), x, create_graph=True)
    (dlogits,) = torch.autograd.grad((g * torch.ones_like(g)).sum(), op.logits)
    assert float(dlogits.abs().sum()) > 0  # h depends on θ through the operator
    w = op.weights().detach()
    expected = 0.5 * ((w * (y - x_true)) ** 2).flatten(1).sum(1)
    expected = expected + reg(x_true).detach() + 0.05 * (x_true**2).flatten(1).sum(1)
    torch.testing.assert_close(problem.energy(x_true, (y, x_true)).detach(), expected)
    with pytest.raises(BilevelError):
        DegradedImages(x_true, op)


def test_per_instance_masks_in_batch() -> None:
    size, b = 10, 3
    x = torch.rand(b, 1, size, size, generator=_gen(0), dtype=torch.float64)
    masks = random_mask((b, 1, size, size), 0.5, generator=1, dtype=torch.float64)
    ds = DegradedImages(x, InpaintingMask(), sigma=0.05, seed=0, masks=masks)
    y, x_true, m = ds.batch(torch.tensor([2, 0]))
    torch.testing.assert_close(m, masks[[2, 0]])
    problem = reconstruction_problem(SmoothedTV().double(), InpaintingMask(), gamma=0.1)
    energy = problem.energy(x_true, (y, x_true, m))
    data = 0.5 * ((m * x_true - y) ** 2).flatten(1).sum(1)
    assert energy.shape == (2,)
    assert torch.all(energy > data)
    with pytest.raises(BilevelError):
        reconstruction_problem(SmoothedTV().double()).energy(x_true, (y, x_true, m))


def test_grid_search_tv() -> None:
    x = torch.rand(2, 1, 16, 16, generator=_gen(0)).double()
    x = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, (1, 1, 1, 1), "replicate"), 3, 1)
    ds = DegradedImages(x, None, sigma=0.1, seed=0)
    y, x_true = ds.batch()
    # 10 iterations are too few for λ = 0.5 at the default tolerance: reconstruct says so
    with pytest.warns(ConvergenceWarning, match="reached max_iter"):
        result = grid_search_tv(ds, strengths=(0.01, 0.05, 0.5), max_iter=10)
    assert result.strength in (0.01, 0.05, 0.5)
    assert result.psnr == max(result.psnrs) and len(result.psnrs) == 3
    assert result.psnr > float(psnr(y, x_true).mean())
