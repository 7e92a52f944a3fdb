"""Imaging: forward operators, learnable regularisers, data, metrics and bilevel tasks.

Names are loaded on first use, so that importing the package (or its torch-free
:mod:`bilevel.imaging.config`) imports no torch.
"""

from __future__ import annotations

from bilevel._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "BUNDLED_SPLITS": "bilevel.imaging.data",
    "DegradedImages": "bilevel.imaging.data",
    "bundled_images": "bilevel.imaging.data",
    "load_image": "bilevel.imaging.data",
    "load_image_folder": "bilevel.imaging.data",
    "random_crops": "bilevel.imaging.data",
    "save_image": "bilevel.imaging.data",
    "mse": "bilevel.imaging.metrics",
    "psnr": "bilevel.imaging.metrics",
    "ssim": "bilevel.imaging.metrics",
    "Convolution": "bilevel.imaging.operators",
    "Identity": "bilevel.imaging.operators",
    "InpaintingMask": "bilevel.imaging.operators",
    "LearnableMask": "bilevel.imaging.operators",
    "LinearOperator": "bilevel.imaging.operators",
    "gaussian_kernel": "bilevel.imaging.operators",
    "motion_blur_kernel": "bilevel.imaging.operators",
    "random_mask": "bilevel.imaging.operators",
    "FourierPreconditioner": "bilevel.imaging.preconditioner",
    "ridge_preconditioner": "bilevel.imaging.preconditioner",
    "available_models": "bilevel.imaging.pretrained_models",
    "pretrained": "bilevel.imaging.pretrained_models",
    "ConvexRidge": "bilevel.imaging.regularisers",
    "ConvexRidgeNetwork": "bilevel.imaging.regularisers",
    "FieldsOfExperts": "bilevel.imaging.regularisers",
    "InputConvexNetwork": "bilevel.imaging.regularisers",
    "Regulariser": "bilevel.imaging.regularisers",
    "SmoothedTV": "bilevel.imaging.regularisers",
    "WeaklyConvexRidge": "bilevel.imaging.regularisers",
    "ridge_layers": "bilevel.imaging.regularisers",
    "DataTerm": "bilevel.imaging.tasks",
    "GridEdgeWarning": "bilevel.imaging.tasks",
    "GridSearchResult": "bilevel.imaging.tasks",
    "MeasurementFit": "bilevel.imaging.tasks",
    "ReconstructionProblem": "bilevel.imaging.tasks",
    "WeightedFit": "bilevel.imaging.tasks",
    "grid_search_tv": "bilevel.imaging.tasks",
    "lipschitz_bound": "bilevel.imaging.tasks",
    "reconstruct": "bilevel.imaging.tasks",
    "reconstruction_problem": "bilevel.imaging.tasks",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
