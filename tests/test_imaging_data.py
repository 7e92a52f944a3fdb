"""Image data (bundled split, folders, crops, frozen noise) and quality metrics."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from bilevel import BilevelError
from bilevel.imaging import (
    BUNDLED_SPLITS,
    Convolution,
    DegradedImages,
    InpaintingMask,
    bundled_images,
    gaussian_kernel,
    load_image,
    load_image_folder,
    psnr,
    random_crops,
    random_mask,
    ssim,
)
from bilevel.imaging.data import ImageFileError

BSDS = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "bsds300"


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# bundled images
# ---------------------------------------------------------------------------------------------


def test_bundled_split_is_disjoint_and_deterministic() -> None:
    train = set(BUNDLED_SPLITS["train"]["colour"] + BUNDLED_SPLITS["train"]["gray"])
    test = set(BUNDLED_SPLITS["test"]["colour"] + BUNDLED_SPLITS["test"]["gray"])
    assert train and test and not train & test
    assert "cat" not in train | test  # the same photograph as "chelsea"
    for color, c in ((False, 1), (True, 3)):
        tr, te = bundled_images("train", color), bundled_images("test", color)
        assert len(te) >= 2 and len(tr) >= 3
        for im in tr + te:
            assert im.dim() == 3 and im.shape[0] == c and im.dtype == torch.float32
            assert 0.0 <= float(im.min()) and float(im.max()) <= 1.0
        # no image in both: compare content fingerprints
        fingerprint = {(tuple(im.shape), round(float(im.mean()), 6)) for im in tr}
        assert not fingerprint & {(tuple(im.shape), round(float(im.mean()), 6)) for im in te}
        again = bundled_images("test", color)
        assert all(torch.equal(a, b) for a, b in zip(te, again))
    assert len(bundled_images("train", False)) == len(train)
    with pytest.raises(BilevelError):
        bundled_images("validation")


# ---------------------------------------------------------------------------------------------
# image folders
# ---------------------------------------------------------------------------------------------


def test_load_image_folder_from_pngs(tmp_path: pathlib.Path) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(9, 7, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, size=(6, 8), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "b.png")
    Image.fromarray(gray).save(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("not an image")
    colour = load_image_folder(tmp_path, color=True)
    assert [tuple(t.shape) for t in colour] == [(3, 6, 8), (3, 9, 7)]  # sorted by name
    np.testing.assert_allclose(colour[1].permute(1, 2, 0).numpy(), rgb / 255.0, atol=1e-6)
    np.testing.assert_allclose(colour[0][1].numpy(), gray / 255.0, atol=1e-6)
    grayscale = load_image_folder(tmp_path, color=False, max_images=1)
    assert len(grayscale) == 1 and grayscale[0].shape == (1, 6, 8)
    np.testing.assert_allclose(grayscale[0][0].numpy(), gray / 255.0, atol=1e-6)


def test_load_image_folder_errors(tmp_path: pathlib.Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_folder(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no image"):
        load_image_folder(tmp_path)


@pytest.mark.skipif(not (BSDS / "train").is_dir(), reason="shared BSDS300 data not present")
def test_load_bsds300() -> None:
    images = load_image_folder(BSDS / "train", color=True, max_images=2)
    assert len(images) == 2
    for im in images:
        assert im.shape[0] == 3 and sorted(im.shape[1:]) == [321, 481]
    test = load_image_folder(BSDS / "test", color=False, max_images=1)
    assert test[0].shape[0] == 1


# ---------------------------------------------------------------------------------------------
# crops and frozen noise
# ---------------------------------------------------------------------------------------------


def test_random_crops_deterministic_and_exact() -> None:
    h, w = 20, 30
    coords = (torch.arange(h)[:, None] * 1000 + torch.arange(w)[None, :]).double()
    images = [coords[None], (coords + 10**6)[None, :15, :25]]
    a = random_crops(images, 8, 12, generator=3)
    b = random_crops(images, 8, 12, generator=torch.Generator().manual_seed(3))
    assert a.shape == (12, 1, 8, 8)
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, random_crops(images, 8, 12, generator=4))
    top_left = a[:, 0, 0, 0]
    expected = top_left[:, None, None] + coords[:8, :8]  # each crop is a contiguous window
    torch.testing.assert_close(a[:, 0], expected)
    stacked = torch.stack([coords[None], coords[None] + 1])
    assert random_crops(stacked, 5, 4, generator=0).shape == (4, 1, 5, 5)
    with pytest.raises(BilevelError):
        random_crops(images, 16, 2)


def test_degraded_images_noise_is_frozen() -> None:
    clean = torch.rand(6, 3, 10, 10, generator=_gen(0))
    blur = Convolution(gaussian_kernel(3, 1.0))
    ds = DegradedImages(clean, blur, sigma=25 / 255, seed=5)
    again = DegradedImages(clean, blur, sigma=25 / 255, seed=5)
    torch.testing.assert_close(ds.noisy, again.noisy)
    assert not torch.equal(ds.noisy, DegradedImages(clean, blur, 25 / 255, seed=6).noisy)
    index = torch.tensor([4, 1, 4])
    y1, x1 = ds.batch(index)
    y2, x2 = ds.batch(index)
    assert torch.equal(y1, y2) and torch.equal(x1, x2) and y1.shape == (3, 3, 10, 10)
    torch.testing.assert_close(y1[0], ds[4][0])
    torch.testing.assert_close(x1[1], clean[1])
    torch.testing.assert_close(y1, blur(x1) + ds.noise[index])
    assert len(ds) == 6
    big = DegradedImages(torch.zeros(4, 1, 32, 32), None, sigma=0.1, seed=0)
    assert float(big.noisy.std()) == pytest.approx(0.1, rel=0.1)
    double = DegradedImages(clean.double(), blur, sigma=25 / 255, seed=5)
    torch.testing.assert_close(double.noise.float(), ds.noise)


def test_degraded_images_with_masks() -> None:
    clean = torch.rand(4, 1, 8, 8, generator=_gen(1))
    masks = random_mask((4, 1, 8, 8), 0.5, generator=2)
    ds = DegradedImages(clean, InpaintingMask(), sigma=0.0, masks=masks)
    y, x, m = ds.batch(torch.tensor([3, 0]))
    torch.testing.assert_close(y, m * x)
    assert len(ds[2]) == 3
    with pytest.raises(BilevelError):
        DegradedImages(clean, None, masks=masks[:2])


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_metrics_match_skimage(channels: int) -> None:
    ref = torch.rand(2, channels, 24, 20, generator=_gen(3), dtype=torch.float64)
    ref = torch.nn.functional.avg_pool2d(ref, 3, 1, 1)  # some spatial structure
    x = (ref + 0.1 * torch.randn(ref.shape, generator=_gen(4), dtype=torch.float64)).clamp(0, 1)
    ours_psnr, ours_ssim = psnr(x, ref), ssim(x, ref)
    assert ours_psnr.shape == (2,) and ours_ssim.shape == (2,)
    for i in range(2):
        a, b = x[i].permute(1, 2, 0).numpy(), ref[i].permute(1, 2, 0).numpy()
        p = peak_signal_noise_ratio(b, a, data_range=1.0)
        s = structural_similarity(
            a,
            b,
            data_range=1.0,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            channel_axis=2,
        )
        assert float(ours_psnr[i]) == pytest.approx(p, abs=1e-6)
        assert float(ours_ssim[i]) == pytest.approx(s, abs=1e-6)
    assert float(ssim(ref, ref).min()) == pytest.approx(1.0)
    with pytest.raises(BilevelError):
        ssim(x[..., :8, :8], ref[..., :8, :8])


# ---------------------------------------------------------------------------------------------
# image files of every bit depth and mode
# ---------------------------------------------------------------------------------------------


def _ramp(h: int = 12, w: int = 20) -> np.ndarray:
    """Intensities in [0, 1] that use the whole range."""
    return np.linspace(0.0, 1.0, h * w).reshape(h, w)


def test_16_bit_grayscale_png_is_scaled_by_65535(tmp_path: pathlib.Path) -> None:
    """16-bit PNGs were clipped: 99.6 % of the pixels became 1.0."""
    values = (_ramp() * 65535).round().astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as img:
        assert img.mode.startswith("I")  # what PIL makes of a 16-bit PNG
    gray = load_image(tmp_path / "g16.png", dtype=torch.float64)
    assert gray.shape == (1, 12, 20)
    np.testing.assert_allclose(gray[0].numpy(), values / 65535.0, atol=1e-12)
    assert float((gray == 1).double().mean()) < 0.01
    colour = load_image(tmp_path / "g16.png", color=True, dtype=torch.float64)
    assert colour.shape == (3, 12, 20) and torch.equal(colour[0], colour[2])
    np.testing.assert_allclose(colour[1].numpy(), values / 65535.0, atol=1e-12)


def test_32_bit_integer_and_float_images(tmp_path: pathlib.Path) -> None:
    values = (_ramp() * (2**31 - 1)).astype(np.int32)
    Image.fromarray(values, mode="I").save(tmp_path / "i32.tif")
    loaded = load_image(tmp_path / "i32.tif", dtype=torch.float64)[0].numpy()
    np.testing.assert_allclose(loaded, values / 4294967295.0, atol=1e-12)
    floats = _ramp().astype(np.float32)
    Image.fromarray(floats, mode="F").save(tmp_path / "f.tif")
    np.testing.assert_allclose(load_image(tmp_path / "f.tif")[0].numpy(), floats, atol=1e-7)
    Image.fromarray(floats * 255, mode="F").save(tmp_path / "f255.tif")
    with pytest.raises(BilevelError, match="outside \\[0, 1\\]"):
        load_image(tmp_path / "f255.tif")


def test_8_bit_palette_alpha_and_bilevel_images(tmp_path: pathlib.Path) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (10, 14, 3)).astype(np.uint8)
    expected_rgb = rgb / 255.0
    expected_luma = np.asarray(Image.fromarray(rgb).convert("L")) / 255.0
    # RGBA: the alpha channel is dropped, the colour kept
    rgba = np.dstack([rgb, rng.integers(0, 256, (10, 14)).astype(np.uint8)])
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    got = load_image(tmp_path / "rgba.png", color=True, dtype=torch.float64)
    np.testing.assert_allclose(got.permute(1, 2, 0).numpy(), expected_rgb)
    got = load_image(tmp_path / "rgba.png", dtype=torch.float64)
    np.testing.assert_allclose(got[0].numpy(), expected_luma)
    # grayscale + alpha
    gray = rng.integers(0, 256, (10, 14)).astype(np.uint8)
    la = Image.merge("LA", [Image.fromarray(gray), Image.fromarray(255 - gray)])
    la.save(tmp_path / "la.png")
    np.testing.assert_allclose(load_image(tmp_path / "la.png", dtype=torch.float64)[0], gray / 255)
    got = load_image(tmp_path / "la.png", color=True, dtype=torch.float64)
    assert got.shape == (3, 10, 14) and np.allclose(got[1].numpy(), gray / 255.0)
    # palette (with and without transparency): the palette's colours
    pal = Image.fromarray(rgb).quantize(16)
    pal.save(tmp_path / "p.png")
    expected = np.asarray(pal.convert("RGB")) / 255.0
    got = load_image(tmp_path / "p.png", color=True, dtype=torch.float64)
    np.testing.assert_allclose(got.permute(1, 2, 0).numpy(), expected)
    pal.save(tmp_path / "pt.png", transparency=0)
    got = load_image(tmp_path / "pt.png", color=True, dtype=torch.float64)
    np.testing.assert_allclose(got.permute(1, 2, 0).numpy(), expected)
    # 8-bit grayscale and 1-bit images
    Image.fromarray(gray).save(tmp_path / "g8.png")
    np.testing.assert_allclose(load_image(tmp_path / "g8.png", dtype=torch.float64)[0], gray / 255)
    bits = gray > 127
    Image.fromarray(bits).save(tmp_path / "b.png")
    np.testing.assert_array_equal(load_image(tmp_path / "b.png")[0].numpy(), bits.astype(float))


def test_unreadable_and_missing_image_files(tmp_path: pathlib.Path) -> None:
    (tmp_path / "fake.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(BilevelError, match="cannot read image"):
        load_image(tmp_path / "fake.png")
    with pytest.raises(ImageFileError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    assert issubclass(ImageFileError, BilevelError) and issubclass(ImageFileError, OSError)
