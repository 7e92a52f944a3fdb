"""deepinv physics as forward operators: the adapter on its protocol, then on deepinv itself
(skipped cleanly when deepinv is absent or cannot be imported)."""

from __future__ import annotations

import pytest
import torch

from bilevel import BilevelError
from bilevel.imaging import (
    DegradedImages,
    SmoothedTV,
    bundled_images,
    psnr,
    random_crops,
    reconstruct,
    reconstruction_problem,
)
from bilevel.imaging.deepinv import PhysicsOperator, dataset_images
from bilevel.imaging.operators import adjoint_mismatch

DT = torch.float64


class MatrixPhysics:
    """deepinv's LinearPhysics protocol on a dense matrix: A(x) = M vec(x)."""

    def __init__(self, m: int, shape: tuple[int, int, int], seed: int = 0, wrong: bool = False):
        gen = torch.Generator().manual_seed(seed)
        n = shape[0] * shape[1] * shape[2]
        self.matrix = torch.randn(m, n, generator=gen, dtype=DT) / n**0.5
        self.shape = shape
        self.wrong = wrong

    def A(self, x):
        return x.flatten(1) @ self.matrix.T

    def A_adjoint(self, y):
        out = (y @ self.matrix).reshape(-1, *self.shape)
        return 1.1 * out if self.wrong else out


def test_adapter_on_the_protocol_norm_adjoint_and_errors():
    physics = MatrixPhysics(40, (1, 8, 8))
    op = PhysicsOperator(physics, (1, 8, 8), dtype=DT)
    sigma_max = float(torch.linalg.matrix_norm(physics.matrix, ord=2))
    assert op.norm_estimated
    assert sigma_max <= op.norm_bound() <= 1.011 * sigma_max
    assert op.has_kernel and adjoint_mismatch(op, (1, 8, 8), dtype=DT) <= 1e-14
    with pytest.raises(BilevelError, match="not the adjoint"):
        PhysicsOperator(MatrixPhysics(40, (1, 8, 8), wrong=True), (1, 8, 8), dtype=DT)
    with pytest.raises(BilevelError, match="A_adjoint"):
        PhysicsOperator(object(), (1, 8, 8))
    with pytest.raises(BilevelError, match=r"\(C, H, W\)"):
        PhysicsOperator(physics, (8, 8))
    with pytest.raises(BilevelError, match="failed on a"):
        op(torch.zeros(1, 1, 8, 8, dtype=torch.float32))  # dtype the physics cannot take
    assert PhysicsOperator(physics, (1, 8, 8), norm=2.0, dtype=DT).norm_bound() == 2.0


def test_dataset_images_reads_tensor_datasets():
    data = torch.utils.data.TensorDataset(torch.rand(5, 1, 9, 9), torch.arange(5))
    images = dataset_images(data, limit=3)
    assert len(images) == 3 and images[0].shape == (1, 9, 9)
    assert torch.equal(images[2], data[2][0])
    with pytest.raises(BilevelError, match="image tensor"):
        dataset_images([("not an image", 0)])


def _cs_reconstruction(op, shape, sigma=0.02):
    """TV from compressed measurements of bundled crops, started at Aᵀy."""
    clean = random_crops(bundled_images("test", dtype=DT), shape[-1], 4, generator=0)
    data = DegradedImages(clean, op, sigma=sigma, seed=1)
    y, x = data.batch()
    problem = reconstruction_problem(SmoothedTV(strength=0.02).to(DT), op, gamma=1e-2)
    x_tv = reconstruct(problem, (y, x), x0=op.adjoint(y), tol=1e-4, max_iter=3000)
    return float(psnr(op.adjoint(y).clamp(0, 1), x).mean()), float(psnr(x_tv.clamp(0, 1), x).mean())


def test_reconstruction_through_the_adapter():
    op = PhysicsOperator(MatrixPhysics(160, (1, 16, 16), seed=2), (1, 16, 16), dtype=DT)
    back, tv = _cs_reconstruction(op, (1, 16, 16))
    assert tv > back + 5.0 and tv > 20.0


def _deepinv():
    try:
        import deepinv
    except Exception as exc:  # ImportError, or a torchvision build that does not match torch
        pytest.skip(f"deepinv is not usable here ({type(exc).__name__}: {exc})")
    return deepinv


def test_deepinv_compressed_sensing_passes_the_adjoint_test_and_reconstructs():
    dinv = _deepinv()
    physics = dinv.physics.CompressedSensing(m=160, img_size=(1, 16, 16), dtype=DT)
    op = PhysicsOperator(physics, (1, 16, 16), dtype=DT)
    assert adjoint_mismatch(op, (1, 16, 16), dtype=DT) <= 1e-6
    # deepinv's own power iteration (stopping at a relative change of 1e-3) agrees
    sqnorm = getattr(physics, "compute_sqnorm", physics.compute_norm)
    theirs = float(sqnorm(torch.rand(1, 1, 16, 16, dtype=DT), verbose=False))
    assert 0.99 <= (op.norm_bound() / 1.01) ** 2 / theirs <= 1.01
    back, tv = _cs_reconstruction(op, (1, 16, 16))
    assert tv > back + 5.0 and tv > 20.0


def test_deepinv_tomography_passes_the_adjoint_test():
    dinv = _deepinv()
    physics = dinv.physics.Tomography(angles=20, img_width=16, normalize=True)
    op = PhysicsOperator(physics, (1, 16, 16), dtype=torch.float32)
    assert adjoint_mismatch(op, (1, 16, 16), dtype=torch.float32) <= 1e-6
    assert op(torch.rand(2, 1, 16, 16)).shape[0] == 2


def test_example_learns_a_regulariser_for_deepinv_compressed_sensing():
    _deepinv()
    import pathlib
    import runpy

    example = pathlib.Path(__file__).resolve().parents[1] / "examples"
    module = runpy.run_path(str(example / "deepinv_compressed_sensing.py"))
    out = module["main"](["--steps", "10"])
    assert out["psnr_learned"] > out["psnr_learned_start"] > out["psnr_adjoint"] + 10.0
    assert out["psnr_learned"] > out["psnr_tv"]
