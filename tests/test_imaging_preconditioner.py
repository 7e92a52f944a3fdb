"""The Fourier preconditioner of denoising with ridge regularisers, against dense references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bilevel.autodiff import LowerLevel
from bilevel.imaging import (
    ConvexRidgeNetwork,
    FieldsOfExperts,
    SmoothedTV,
    pretrained,
    random_crops,
    reconstruct,
    reconstruction_problem,
)
from bilevel.imaging.operators import (
    Convolution,
    InpaintingMask,
    LearnableMask,
    gaussian_kernel,
    random_mask,
)
from bilevel.imaging.preconditioner import (
    FourierPreconditioner,
    fft_size,
    mean_curvatures,
    ridge_preconditioner,
)
from bilevel.lower import LBFGS, solve_lower
from bilevel.problem import BilevelError

F64 = torch.float64


def test_fft_size_is_the_smallest_5_smooth_integer_not_below_n() -> None:
    def smooth(m: int) -> bool:
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        return m == 1

    for n in range(1, 400):
        m = fft_size(n)
        assert m >= n and smooth(m) and not any(smooth(k) for k in range(n, m))
    assert (fft_size(481 + 12), fft_size(321 + 12)) == (500, 360)
    with pytest.raises(BilevelError, match="positive"):
        fft_size(0)


def dense_reference(filters: torch.Tensor, c: torch.Tensor, shape, a: float) -> torch.Tensor:
    """Eᵀ (a I + Σ_k c_k T_kᵀT_k)⁻¹ E as a dense matrix on C·H·W pixels, float64: T_k the
    periodic correlation on the padded grid, built column by column."""
    k, ch, s, _ = filters.shape
    h, w = shape
    grid = (fft_size(h + s - 1), fft_size(w + s - 1))
    n = ch * grid[0] * grid[1]
    basis = torch.eye(n, dtype=F64).view(n, ch, *grid)
    periodic = F.pad(basis, (0, s - 1, 0, s - 1), mode="circular")
    t = F.conv2d(periodic, filters.double())  # (n, K, Hp, Wp): columns of the T_k
    t = t.reshape(n, k, -1).permute(1, 2, 0)  # (K, Hp·Wp, n)
    gram = a * torch.eye(n, dtype=F64) + torch.einsum("k,kpi,kpj->ij", c.double(), t, t)
    inside = torch.zeros(ch, *grid, dtype=torch.bool)
    inside[:, :h, :w] = True
    keep = inside.reshape(-1)
    return torch.linalg.inv(gram)[keep][:, keep]


@pytest.mark.parametrize("channels", [1, 3])
def test_preconditioner_is_the_inverse_of_the_periodic_quadratic_model(channels: int) -> None:
    """P v equals the dense Eᵀ (a I + Σ_k c_k T_kᵀT_k)⁻¹ E v (float64, rtol 1e-10), and P is
    symmetric positive definite with eigenvalues in (0, 1/a]."""
    gen = torch.Generator().manual_seed(0)
    filters = torch.randn(3, channels, 3, 3, generator=gen, dtype=F64)
    c = torch.tensor([0.7, 0.0, 2.5], dtype=F64)
    shape, a = (5, 4), 1.3
    pre = FourierPreconditioner(filters, c, shape, a)
    dense = dense_reference(filters, c, shape, a)
    v = torch.randn(2, channels, *shape, generator=gen, dtype=F64)
    expected = (v.reshape(2, -1) @ dense.T).reshape(v.shape)
    assert torch.allclose(pre(v), expected, rtol=1e-10, atol=1e-12)
    n = channels * shape[0] * shape[1]
    columns = pre(torch.eye(n, dtype=F64).view(n, channels, *shape)).reshape(n, n)
    assert torch.allclose(columns, columns.T, rtol=1e-10, atol=1e-13)
    eig = torch.linalg.eigvalsh(columns)
    assert eig.min() > 0 and eig.max() <= 1 / a * (1 + 1e-10)


def test_preconditioner_in_float32_and_bad_input() -> None:
    filters = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(1))
    pre = FourierPreconditioner(filters, torch.tensor([1.0, 0.5]), (6, 7))
    ref = FourierPreconditioner(filters.double(), torch.tensor([1.0, 0.5]), (6, 7))
    v = torch.randn(1, 1, 6, 7, generator=torch.Generator().manual_seed(2))
    out = pre(v)
    assert out.dtype == torch.float32 and out.shape == v.shape
    assert torch.allclose(out.double(), ref(v.double()), rtol=1e-5, atol=1e-6)
    with pytest.raises(BilevelError, match="shape"):
        pre(torch.zeros(1, 1, 7, 6))
    with pytest.raises(BilevelError, match="non-negative"):
        FourierPreconditioner(filters, torch.tensor([1.0, -0.5]), (6, 7))
    with pytest.raises(BilevelError, match="non-negative"):
        FourierPreconditioner(filters, torch.tensor([1.0, math.nan]), (6, 7))
    with pytest.raises(BilevelError, match="non-negative"):
        FourierPreconditioner(filters, torch.tensor([1.0]), (6, 7))
    with pytest.raises(BilevelError, match="data_curvature"):
        FourierPreconditioner(filters, torch.tensor([1.0, 0.5]), (6, 7), 0.0)
    with pytest.raises(BilevelError, match="filters"):
        FourierPreconditioner(filters[0], torch.tensor([1.0, 0.5]), (6, 7))


def test_mean_curvatures_of_fields_of_experts_in_closed_form() -> None:
    """Smoothed-ℓ1 Fields of Experts: c_k is the mean over images and pixels of
    w_k ν² / (t² + ν²)^{3/2} at the responses t = k_k ⋆ x; the filters are the model's."""
    reg = FieldsOfExperts(num_filters=4, filter_size=5, smoothing=0.05).double()
    x = torch.rand(2, 1, 12, 10, generator=torch.Generator().manual_seed(3), dtype=F64)
    filters, c = mean_curvatures(reg, x)
    t = reg.responses(x)
    nu, wts = reg.smoothing.view(1, -1, 1, 1), reg.log_weights.exp().view(1, -1, 1, 1)
    expected = (wts * nu**2 / (t * t + nu**2).pow(1.5)).mean(dim=(0, 2, 3))
    assert torch.allclose(c, expected, rtol=1e-12)
    assert torch.equal(filters, reg.effective_filters().detach())
    assert mean_curvatures(SmoothedTV(), x) is None
    with pytest.raises(BilevelError, match="at least 5×5 pixels"):
        mean_curvatures(reg, x[..., :4, :])
    with pytest.raises(BilevelError, match=r"\(B, 1, H, W\)"):
        mean_curvatures(reg, x.expand(2, 3, 12, 10))


def test_mean_curvatures_clamp_a_negative_mean_at_zero() -> None:
    """Student-t potentials have φ'' < 0 for |t| > ν: a negative mean is clamped to 0 (P must
    stay positive definite)."""
    reg = FieldsOfExperts(num_filters=2, filter_size=3, potential="student_t", smoothing=1e-3)
    x = torch.rand(1, 1, 9, 9, generator=torch.Generator().manual_seed(4), dtype=F64)
    _, c = mean_curvatures(reg.double(), x)
    assert (c == 0).all()


def test_ridge_preconditioner_for_ridge_regularisers_and_modelled_operators() -> None:
    x = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    crr = ConvexRidgeNetwork(num_filters=4)
    pre = ridge_preconditioner(reconstruction_problem(crr, gamma=0.5), x)
    assert isinstance(pre, FourierPreconditioner) and pre.shape == (16, 16)
    assert float(pre.inverse.max()) == pytest.approx(1 / 1.5)  # constants: a = 1 + γ
    assert ridge_preconditioner(reconstruction_problem(SmoothedTV()), x) is None
    blur = Convolution(gaussian_kernel(5, 1.0))
    pre = ridge_preconditioner(reconstruction_problem(crr, blur, gamma=1e-3), x)
    assert isinstance(pre, FourierPreconditioner)
    assert float(pre.inverse.max()) <= 1e3 * (1 + 1e-5)  # a = γ, the blur's and R's terms ≥ 0
    mask = random_mask((16, 16), 0.25, generator=3)
    pre = ridge_preconditioner(reconstruction_problem(crr, InpaintingMask(mask), gamma=0.01), x)
    assert float(pre.inverse.max()) == pytest.approx(1 / (float(mask.mean()) + 0.01), rel=1e-5)
    learned = reconstruction_problem(crr, LearnableMask((16, 16), init=0.5), gamma=0.01)
    pre = ridge_preconditioner(learned, x)  # ½‖w ⊙ (x − y)‖²: a = mean(w²) + γ
    assert float(pre.inverse.max()) == pytest.approx(1 / (0.25 + 0.01), rel=1e-5)
    per_call = reconstruction_problem(crr, InpaintingMask(), gamma=0.01)  # masks in the batch
    assert ridge_preconditioner(per_call, x) is None


def dense_gram(groups, shape, a: float, grid) -> torch.Tensor:
    """a I + Σ_groups Σ_k c_k T_kᵀT_k on the grid's C·Hp·Wp pixels (float64), each group
    (filters (K, C, s, s), c (K,)) with its own size s, T_k periodic correlations."""
    ch = groups[0][0].shape[1]
    n = ch * grid[0] * grid[1]
    basis = torch.eye(n, dtype=F64).view(n, ch, *grid)
    gram = a * torch.eye(n, dtype=F64)
    for filters, c in groups:
        s = filters.shape[-1]
        t = F.conv2d(F.pad(basis, (0, s - 1, 0, s - 1), mode="circular"), filters.double())
        t = t.reshape(n, filters.shape[0], -1).permute(1, 2, 0)
        gram += torch.einsum("k,kpi,kpj->ij", c.double(), t, t)
    return gram


@pytest.mark.parametrize("channels", [1, 3])
def test_deblurring_preconditioner_adds_the_blur_per_channel(channels: int) -> None:
    """With A x = k * x per channel: P = Eᵀ(γ I + Σ_k c_k T_kᵀT_k + Σ_c T_{A,c}ᵀT_{A,c})⁻¹E,
    T_{A,c} the correlation with the flipped kernel on channel c, the regulariser's 3×3
    filters and the 5×5 blur of different sizes (float64, against a dense inverse)."""
    reg = FieldsOfExperts(num_filters=2, filter_size=3, channels=channels).double()
    kernel = torch.rand(
        5, 5, generator=torch.Generator().manual_seed(8)
    ).double()  # stored in float32
    x = torch.rand(1, channels, 6, 5, generator=torch.Generator().manual_seed(9), dtype=F64)
    gamma = 0.3
    pre = ridge_preconditioner(reconstruction_problem(reg, Convolution(kernel), gamma=gamma), x)
    filters, c = mean_curvatures(reg, x)
    blur = torch.zeros(channels, channels, 5, 5, dtype=F64)
    for i in range(channels):
        blur[i, i] = kernel.flip(0, 1)
    groups = [(filters, c), (blur, torch.ones(channels, dtype=F64))]
    grid = (fft_size(6 + 4), fft_size(5 + 4))
    gram = dense_gram(groups, (6, 5), gamma, grid)
    inside = torch.zeros(channels, *grid, dtype=torch.bool)
    inside[:, :6, :5] = True
    keep = inside.reshape(-1)
    dense = torch.linalg.inv(gram)[keep][:, keep]
    v = torch.randn(2, channels, 6, 5, generator=torch.Generator().manual_seed(10), dtype=F64)
    expected = (v.reshape(2, -1) @ dense.T).reshape(v.shape)
    assert torch.allclose(pre(v), expected, rtol=1e-10, atol=1e-12)


def test_preconditioned_deblurring_is_the_same_solution_in_fewer_gradients() -> None:
    """Deblurring (Gaussian 7×7, σ = 1.5 px, γ = 10⁻³) with the shipped convex ridge model on
    a 48×48 crop in float64: the preconditioned L-BFGS reaches the plain solve's minimiser
    (‖x − x̂‖ ≤ ‖∇h‖/μ, μ = γ, both solves to 10⁻⁹ RMS) with at most half the gradients."""
    from bilevel.imaging.data import bundled_images

    clean = bundled_images("test", color=False)[0][:, :48, :48].unsqueeze(0).double()
    blur = Convolution(gaussian_kernel(7, 1.5))
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(11), dtype=F64)
    y = blur.double()(clean) + 5 / 255 * noise
    reg = pretrained("crr8-sigma25-bundled").double().set_noise_level(5 / 255)
    problem = reconstruction_problem(reg, blur.double(), gamma=1e-3)
    tol = 1e-9 * y.numel() ** 0.5
    evals, solutions = {}, {}
    for name in ("plain", "preconditioned"):
        lower = LowerLevel(problem, (y, clean))
        pre = ridge_preconditioner(problem, y) if name == "preconditioned" else None
        with torch.no_grad():
            sol = solve_lower(lower, y, tol, LBFGS(max_iter=5000, preconditioner=pre), 1e-3)
        assert sol.converged.all()
        evals[name], solutions[name] = sol.grad_evals, sol.x
    assert (solutions["plain"] - solutions["preconditioned"]).norm() <= 2 * tol / 1e-3
    assert evals["preconditioned"] <= 0.5 * evals["plain"]


def test_preconditioned_denoising_is_the_same_solution_in_fewer_gradients() -> None:
    """The shipped convex ridge model on a 48×48 crop in float64: preconditioned L-BFGS
    reaches the plain solve's minimiser (‖x − x̂‖ ≤ ‖∇h‖/μ with μ = 1, both solves to
    10⁻⁷ RMS) with fewer gradients; ``reconstruct(precondition=True)`` is that solve."""
    from bilevel.imaging.data import bundled_images

    clean = bundled_images("test", color=False)[0][:, :48, :48].unsqueeze(0).double()
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(6), dtype=F64)
    y = clean + 25 / 255 * noise
    problem = reconstruction_problem(pretrained("crr8-sigma25-bundled").double())
    tol = 1e-7 * y.numel() ** 0.5
    evals = {}
    solutions = {}
    for name in ("plain", "preconditioned"):
        lower = LowerLevel(problem, (y, y))
        pre = ridge_preconditioner(problem, y) if name == "preconditioned" else None
        with torch.no_grad():
            sol = solve_lower(lower, y, tol, LBFGS(max_iter=3000, preconditioner=pre), 1.0)
        assert sol.converged.all()
        evals[name], solutions[name] = sol.grad_evals, sol.x
    assert (solutions["plain"] - solutions["preconditioned"]).norm() <= 2 * tol
    assert evals["preconditioned"] < 0.8 * evals["plain"]
    x = reconstruct(problem, (y, y), x0=y, tol=tol, max_iter=3000, precondition=True)
    assert torch.equal(x, solutions["preconditioned"])


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("shape", [(5, 4), (5, 7)])  # padded widths 6, 9
def test_quadratic_form_is_v_dot_p_v(channels: int, shape) -> None:
    """vᵀPv by Parseval on the half spectrum equals ⟨v, P v⟩ (odd and even padded widths)."""
    gen = torch.Generator().manual_seed(7)
    filters = torch.randn(2, channels, 3, 3, generator=gen, dtype=F64)
    pre = FourierPreconditioner(filters, torch.tensor([0.4, 1.7], dtype=F64), shape, 0.8)
    v = torch.randn(3, channels, *shape, generator=gen, dtype=F64)
    expected = (v * pre(v)).sum(dim=(1, 2, 3))
    assert torch.allclose(pre.quadratic_form(v), expected, rtol=1e-12)


def test_lbfgs_builds_each_solves_preconditioner_from_a_factory() -> None:
    """``LBFGS(preconditioner=RidgePreconditioning())`` builds P from the solve's own problem
    and start: the same iterates as the P built by hand, and a new P when θ has changed."""
    from bilevel.imaging.data import bundled_images
    from bilevel.imaging.preconditioner import RidgePreconditioning

    clean = random_crops(bundled_images("test", color=False), 24, 3, generator=13).double()
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(14), dtype=F64)
    y = clean + 25 / 255 * noise
    reg = pretrained("crr8-sigma25-bundled").double()
    problem = reconstruction_problem(reg)
    tol = 1e-6 * 24
    built = []

    class Recording(RidgePreconditioning):
        def build(self, lower, x0):
            built.append(super().build(lower, x0))
            return built[-1]

    with torch.no_grad():
        by_factory = solve_lower(
            LowerLevel(problem, (y, clean)), y, tol, LBFGS(preconditioner=Recording()), 1.0
        )
        by_hand = solve_lower(
            LowerLevel(problem, (y, clean)),
            y,
            tol,
            LBFGS(preconditioner=ridge_preconditioner(problem, y)),
            1.0,
        )
        plain = solve_lower(LowerLevel(problem, (y, clean)), y, tol, LBFGS(), 1.0)
    assert len(built) == 1 and isinstance(built[0], FourierPreconditioner)
    assert torch.equal(by_factory.x, by_hand.x)
    assert by_factory.grad_evals < 0.8 * plain.grad_evals
    with torch.no_grad():
        reg.log_strength[0] += 0.5  # θ changed: the next solve builds another P
        solve_lower(LowerLevel(problem, (y, clean)), y, tol, LBFGS(preconditioner=Recording()), 1.0)
    assert len(built) == 2 and not torch.equal(built[0].inverse, built[1].inverse)
    assert repr(RidgePreconditioning()) == "RidgePreconditioning()"
    tv = reconstruction_problem(SmoothedTV().double())
    with torch.no_grad():  # no ridge regulariser: the factory builds None, plain L-BFGS
        a = solve_lower(LowerLevel(tv, (y, clean)), y, 1e-4, LBFGS(preconditioner=Recording()), 1.0)
        b = solve_lower(LowerLevel(tv, (y, clean)), y, 1e-4, LBFGS(), 1.0)
    assert built[-1] is None and torch.equal(a.x, b.x)
