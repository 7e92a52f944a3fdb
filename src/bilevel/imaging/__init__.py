"""Imaging: forward operators, learnable regularisers, data, metrics and bilevel tasks."""

from bilevel.imaging.data import (
    BUNDLED_SPLITS,
    DegradedImages,
    bundled_images,
    load_image,
    load_image_folder,
    random_crops,
    save_image,
)
from bilevel.imaging.metrics import mse, psnr, ssim
from bilevel.imaging.operators import (
    Convolution,
    Identity,
    InpaintingMask,
    LearnableMask,
    LinearOperator,
    gaussian_kernel,
    motion_blur_kernel,
    random_mask,
)
from bilevel.imaging.pretrained_models import available_models, pretrained
from bilevel.imaging.regularisers import (
    ConvexRidge,
    ConvexRidgeNetwork,
    FieldsOfExperts,
    InputConvexNetwork,
    Regulariser,
    SmoothedTV,
    WeaklyConvexRidge,
    ridge_layers,
)
from bilevel.imaging.tasks import (
    GridSearchResult,
    grid_search_tv,
    lipschitz_bound,
    reconstruct,
    reconstruction_problem,
)

__all__ = [
    "BUNDLED_SPLITS",
    "ConvexRidge",
    "ConvexRidgeNetwork",
    "Convolution",
    "DegradedImages",
    "FieldsOfExperts",
    "GridSearchResult",
    "Identity",
    "InpaintingMask",
    "InputConvexNetwork",
    "LearnableMask",
    "LinearOperator",
    "Regulariser",
    "SmoothedTV",
    "WeaklyConvexRidge",
    "available_models",
    "bundled_images",
    "gaussian_kernel",
    "grid_search_tv",
    "lipschitz_bound",
    "load_image",
    "load_image_folder",
    "motion_blur_kernel",
    "mse",
    "pretrained",
    "psnr",
    "random_crops",
    "random_mask",
    "reconstruct",
    "save_image",
    "reconstruction_problem",
    "ridge_layers",
    "ssim",
]
