"""Image data: bundled test images, image folders, random crops and frozen noisy datasets.

Images are float tensors with values in [0, 1]: single images (C, H, W), batches (B, C, H, W),
C = 1 (grayscale, ITU-R 601 luma Y = 0.299 R + 0.587 G + 0.114 B, as PIL's "L" mode) or C = 3
(RGB). Image files of any bit depth are scaled by their full range: 8-bit by 255, 16-bit by
65535 (PNG, TIFF), 32-bit integers by 2³² − 1; floating-point files must hold values in [0, 1].
Palette images are expanded; an alpha channel is dropped (the stored colour is the data).
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from bilevel.problem import BilevelError

__all__ = [
    "BUNDLED_SPLITS",
    "ImageFileError",
    "load_image",
    "bundled_images",
    "load_image_folder",
    "random_crops",
    "DegradedImages",
]

#: Images shipped inside scikit-image (no download needed), with a fixed train/test split.
#: ``colour`` images are RGB photographs; ``gray`` images exist only in grayscale. A grayscale
#: split holds the gray images and the luma of the colour images of that split; a colour split
#: holds the colour images only. ``skimage.data.cat`` is the same photograph as ``chelsea`` and
#: is therefore not used; images that need a download (pooch) are avoided.
BUNDLED_SPLITS: dict[str, dict[str, tuple[str, ...]]] = {
    "train": {
        "colour": ("astronaut", "rocket", "immunohistochemistry"),
        "gray": ("moon", "coins", "page", "text", "clock", "brick", "grass", "cell"),
    },
    "test": {
        "colour": ("chelsea", "coffee"),
        "gray": ("camera", "gravel"),
    },
}

_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

#: ITU-R 601 luma weights of R, G, B (PIL's "L" conversion).
_LUMA = np.array([0.299, 0.587, 0.114])


class ImageFileError(BilevelError, FileNotFoundError):
    """A missing image file or folder, or a folder without images (a :class:`BilevelError`
    and a ``FileNotFoundError``)."""


@functools.lru_cache(maxsize=32)
def _skimage_array(name: str, color: bool) -> np.ndarray:
    import skimage.data
    from PIL import Image

    arr = np.asarray(getattr(skimage.data, name)())
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype != np.uint8:
        raise BilevelError(f"bundled image {name!r} is not an 8-bit image")
    img = Image.fromarray(arr)
    img = img.convert("RGB" if color else "L")
    out = np.asarray(img, dtype=np.uint8)
    out.setflags(write=False)
    return out


def _to_tensor(arr: np.ndarray, dtype: torch.dtype) -> Tensor:
    t = torch.from_numpy(np.array(arr, dtype=np.float32) / 255.0)
    t = t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1)
    return t.contiguous().to(dtype)


def bundled_images(
    split: str = "train", color: bool = False, dtype: torch.dtype = torch.float32
) -> list[Tensor]:
    """The bundled images of ``split`` ("train" or "test") as (C, H, W) tensors in [0, 1].

    The split is fixed (see ``BUNDLED_SPLITS``) and no image is in both. ``color=True`` gives
    the RGB images of the split (C = 3), ``color=False`` all images of the split as luma (C = 1).
    """
    if split not in BUNDLED_SPLITS:
        raise BilevelError(f"split must be 'train' or 'test', got {split!r}")
    names = BUNDLED_SPLITS[split]["colour"]
    if not color:
        names = BUNDLED_SPLITS[split]["gray"] + names
    return [_to_tensor(_skimage_array(n, color), dtype) for n in names]


def load_image_folder(
    path: str | pathlib.Path,
    color: bool = False,
    max_images: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> list[Tensor]:
    """Read the images (png, jpg, bmp, tif) of a folder, sorted by file name, with PIL.

    Returns (C, H, W) tensors in [0, 1] (C = 3 for ``color``, else 1, luma). At most
    ``max_images`` (the first in name order). Raises :class:`ImageFileError` when the folder is
    missing or holds no image file, ``BilevelError`` for a file that is not a readable image.
    """

    folder = pathlib.Path(path)
    if not folder.is_dir():
        raise ImageFileError(f"image folder {str(folder)!r} does not exist")
    files = sorted(
        p for p in folder.iterdir() if p.suffix.lower() in _EXTENSIONS and not p.is_dir()
    )
    if not files:
        raise ImageFileError(
            f"image folder {str(folder)!r} holds no image ({', '.join(_EXTENSIONS)})"
        )
    if max_images is not None:
        if max_images < 1:
            raise BilevelError(f"max_images must be positive, got {max_images}")
        files = files[:max_images]
    return [load_image(f, color, dtype) for f in files]


def _pixels(img, path: pathlib.Path, color: bool) -> np.ndarray:
    """The pixels of a PIL image as float64 (H, W) or (H, W, 3) in [0, 1], alpha dropped; an
    8-bit colour image read with ``color=False`` is converted to luma by PIL ("L")."""
    mode = img.mode
    if mode in ("P", "PA"):
        img = img.convert("RGBA" if "transparency" in img.info or mode == "PA" else "RGB")
        mode = img.mode
    if mode == "1":
        return np.asarray(img, dtype=np.float64)
    if mode.startswith("I;16"):
        return np.asarray(img, dtype=np.float64) / 65535.0
    if mode == "I":  # 16-bit PNG (older Pillow) or 32-bit integer TIFF
        arr = np.asarray(img, dtype=np.float64)
        if arr.size and arr.min() < 0:
            raise BilevelError(f"image {str(path)!r} holds negative integer pixels")
        return arr / (65535.0 if (not arr.size or arr.max() <= 65535) else 4294967295.0)
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if not np.isfinite(arr).all() or (arr.size and (arr.min() < 0 or arr.max() > 1)):
            raise BilevelError(
                f"image {str(path)!r} holds floating-point pixels outside [0, 1] "
                f"(min {np.nanmin(arr):g}, max {np.nanmax(arr):g}); rescale it to [0, 1]"
            )
        return arr
    if mode in ("L", "LA", "La"):
        return np.asarray(img.getchannel("L"), dtype=np.float64) / 255.0
    if mode not in ("RGB", "RGBA", "RGBX"):
        img = img.convert("RGB")  # CMYK, YCbCr, LAB, HSV, premultiplied RGBa, ...
    if not color:
        return np.asarray(img.convert("L"), dtype=np.float64) / 255.0
    return np.asarray(img, dtype=np.float64)[..., :3] / 255.0


def load_image(
    path: str | pathlib.Path, color: bool = False, dtype: torch.dtype = torch.float32
) -> Tensor:
    """One image file (png, jpg, bmp, tif) as a (C, H, W) tensor in [0, 1] (C = 3 for
    ``color``, else 1, luma), of any bit depth and mode (see the module docstring).

    Raises:
        ImageFileError: a missing file.
        BilevelError: a file PIL cannot read, or float pixels outside [0, 1].
    """
    from PIL import Image, UnidentifiedImageError

    path = pathlib.Path(path)
    if not path.is_file():
        raise ImageFileError(f"image file {str(path)!r} does not exist")
    try:
        with Image.open(path) as img:
            img.load()
            arr = _pixels(img, path, color)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        if isinstance(err, BilevelError):
            raise
        raise BilevelError(f"cannot read image {str(path)!r}: {err}") from None
    if arr.ndim != 2 and not (arr.ndim == 3 and arr.shape[2] == 3):
        raise BilevelError(f"image {str(path)!r}: unsupported pixel layout {arr.shape}")
    if min(arr.shape[:2]) < 1:
        raise BilevelError(f"image {str(path)!r} is empty")
    if color and arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    elif not color and arr.ndim == 3:
        arr = arr @ _LUMA
    t = torch.from_numpy(np.clip(arr, 0.0, 1.0))
    t = t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1)
    return t.contiguous().to(dtype)


def save_image(x: Tensor, path: str | pathlib.Path) -> None:
    """Write a (C, H, W) image in [0, 1] (clipped) as an 8-bit PNG or JPEG (by the ending),
    atomically (a crash leaves no partial file)."""
    from PIL import Image

    from bilevel.runs import atomic_output

    arr = (x.detach().clamp(0, 1).cpu().permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    with atomic_output(path) as tmp:
        Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).save(tmp)


def _as_generator(generator: torch.Generator | int | None) -> torch.Generator:
    if isinstance(generator, torch.Generator):
        return generator
    return torch.Generator().manual_seed(0 if generator is None else int(generator))


def crop_sources(
    num_images: int, count: int, generator: torch.Generator | int | None = 0
) -> Tensor:
    """The index of the image each of the ``count`` crops of :func:`random_crops` comes from,
    for the same ``num_images`` and integer seed ``generator`` (its first draw)."""
    return torch.randint(num_images, (count,), generator=_as_generator(generator))


def random_crops(
    images: Sequence[Tensor] | Tensor,
    size: int,
    count: int,
    generator: torch.Generator | int | None = 0,
) -> Tensor:
    """``count`` random ``size``×``size`` crops, shape (count, C, size, size).

    Each crop picks an image uniformly at random, then a uniformly random position inside it.
    ``generator`` (a ``torch.Generator`` or an integer seed) makes the result deterministic.
    ``images`` is a list of (C, H, W) tensors (sizes may differ, C may not) or a (N, C, H, W)
    tensor. Crops are gathered by advanced indexing (one gather per source image).
    """
    if isinstance(images, Tensor):
        if images.dim() != 4:
            raise BilevelError("images must be a (N, C, H, W) tensor or a list of (C, H, W)")
        images = list(images.unbind(0))
    images = list(images)
    if not images:
        raise BilevelError("no images to crop from")
    if any(im.dim() != 3 for im in images):
        raise BilevelError("every image must have shape (C, H, W)")
    if len({im.shape[0] for im in images}) > 1:
        raise BilevelError("all images must have the same number of channels")
    if count < 1 or size < 1:
        raise BilevelError("count and size must be positive")
    heights = torch.tensor([im.shape[1] for im in images])
    widths = torch.tensor([im.shape[2] for im in images])
    if bool((heights < size).any()) or bool((widths < size).any()):
        raise BilevelError(f"every image must be at least {size}×{size} pixels")
    gen = _as_generator(generator)
    which = crop_sources(len(images), count, gen)
    u = torch.rand(count, 2, generator=gen, dtype=torch.float64)
    top = (u[:, 0] * (heights[which] - size + 1)).long()
    left = (u[:, 1] * (widths[which] - size + 1)).long()
    ref = images[0]
    out = torch.empty(count, ref.shape[0], size, size, dtype=ref.dtype, device=ref.device)
    offsets = torch.arange(size)
    for i in torch.unique(which).tolist():
        sel = (which == i).nonzero().squeeze(1)
        rows = (top[sel, None] + offsets)[:, :, None]  # (n, size, 1)
        cols = (left[sel, None] + offsets)[:, None, :]  # (n, 1, size)
        crops = images[i][:, rows.to(ref.device), cols.to(ref.device)]  # (C, n, size, size)
        out[sel.to(ref.device)] = crops.transpose(0, 1).to(ref.dtype)
    return out


class DegradedImages(torch.utils.data.Dataset):
    """Clean images x_i, measurements y_i = A x_i + σ ε_i with the noise ε_i frozen at creation.

    ``clean``: (N, C, H, W) in [0, 1]. ``sigma``: noise standard deviation on the [0, 1] scale
    (e.g. 25/255). ε ~ N(0, I) is drawn once from ``torch.Generator().manual_seed(seed)`` (in
    float32 on the CPU, so identical for every dtype and device), so that every call sees the
    same samples and deterministic methods see a fixed objective. y is not clipped.

    ``operator`` (default identity) must be fixed: an operator with trainable parameters (e.g.
    ``LearnableMask``) would change y with θ. For learned sampling, use the full noisy data
    (``operator=None``) with ``reconstruction_problem(..., data_term=WeightedFit())``.

    ``masks``: optional per-sample masks (N, 1|C, H, W) for an ``InpaintingMask`` operator
    without a stored mask: y_i = m_i ⊙ x_i + σ ε_i and every batch also returns m_i.

    ``dataset[i]`` is (y_i, x_i) (or (y_i, x_i, m_i)); ``dataset.batch(index)`` returns the
    stacked tensors for a (long) index tensor in one call (``None``: all samples).
    """

    def __init__(
        self,
        clean: Tensor,
        operator: torch.nn.Module | None = None,
        sigma: float = 25.0 / 255.0,
        seed: int = 0,
        masks: Tensor | None = None,
    ) -> None:
        if not isinstance(clean, Tensor) or clean.dim() != 4:
            raise BilevelError("clean must be a tensor of shape (N, C, H, W)")
        if not sigma >= 0:
            raise BilevelError(f"sigma must be non-negative, got {sigma}")
        if operator is not None and any(p.requires_grad for p in operator.parameters()):
            raise BilevelError(
                "DegradedImages freezes y = A x + σε, but the operator has trainable parameters, "
                "so y would not follow θ; for a learnable sampling pattern pass operator=None "
                "(y = x + σε) and use reconstruction_problem(..., data_term=WeightedFit())"
            )
        if masks is not None:
            if masks.dim() != 4 or masks.shape[0] != clean.shape[0]:
                raise BilevelError("masks must have shape (N, 1|C, H, W), one per sample")
            masks = masks.to(dtype=clean.dtype, device=clean.device)
        self.clean = clean.detach()
        self.operator = operator
        self.sigma = float(sigma)
        self.seed = int(seed)
        self.masks = masks
        gen = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            if operator is None:
                ax = self.clean
            elif masks is not None:
                ax = operator(self.clean, mask=masks)
            else:
                ax = operator(self.clean)
            ax = ax.detach()
            eps = torch.randn(ax.shape, generator=gen, dtype=torch.float32)
            self.noise = (self.sigma * eps.to(dtype=ax.dtype, device=ax.device)).contiguous()
            self.noisy = (ax + self.noise).contiguous()

    def __len__(self) -> int:
        return self.clean.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, ...]:
        if self.masks is not None:
            return self.noisy[i], self.clean[i], self.masks[i]
        return self.noisy[i], self.clean[i]

    def batch(self, index: Tensor | Sequence[int] | None = None) -> tuple[Tensor, ...]:
        """(y, x) (and masks, if any) for the samples ``index``, leading dimension len(index)."""
        if index is None:
            out = (self.noisy, self.clean)
            return out + (self.masks,) if self.masks is not None else out
        index = torch.as_tensor(index, dtype=torch.long, device=self.clean.device)
        if index.dim() != 1:
            raise BilevelError("index must be a 1-D tensor of sample indices")
        out = (self.noisy[index], self.clean[index])
        return out + (self.masks[index],) if self.masks is not None else out

    def to(self, *args, **kwargs) -> DegradedImages:
        """Move the stored tensors (like ``Tensor.to``), in place; returns self."""
        self.clean = self.clean.to(*args, **kwargs)
        self.noisy = self.noisy.to(*args, **kwargs)
        self.noise = self.noise.to(*args, **kwargs)
        if self.masks is not None:
            self.masks = self.masks.to(*args, **kwargs)
        return self
