"""Learn where to sample: a per-pixel sampling pattern optimised by bilevel learning.

The forward operator is A = diag(w) with w = sigmoid(logits) ∈ (0, 1) per pixel; the lower
level reconstructs x from the weighted noisy image with a fixed smoothed-TV regulariser,

    x̂(w) = argmin_x ½‖A(x − y)‖² + R_TV(x) + (γ/2)‖x‖²,

and the upper level trades reconstruction error against the sampling cost β·mean(w):

    min_w  mean_i ½‖x̂_i(w) − x_i‖² + β·mean(w).

Run: python examples/learn_sampling_mask.py [--steps 150] [--cost 1]
"""

from __future__ import annotations

import argparse

import torch

from bilevel import ISGD, Budget, Implicit, with_initial
from bilevel.imaging import (
    DegradedImages,
    LearnableMask,
    SmoothedTV,
    bundled_images,
    psnr,
    random_crops,
    reconstruct,
    reconstruction_problem,
)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--crop", type=int, default=24)
    parser.add_argument("--cost", type=float, default=1.0, help="β, price of sampling")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    clean = random_crops(bundled_images("train"), args.crop, 16, generator=0)
    noisy = DegradedImages(clean, sigma=10 / 255, seed=1)  # y = x + noise, full image
    mask = LearnableMask((args.crop, args.crop), init=0.9)
    tv = SmoothedTV(strength=0.05).requires_grad_(False)  # only the mask is learned
    problem = reconstruction_problem(tv, mask, gamma=1e-2, operator_penalty=args.cost)

    batch = noisy.batch()
    before = float(psnr(reconstruct(problem, batch), clean).mean())
    ISGD(
        step="const:5e-2",
        accuracy="poly:1e-1,0.5",
        batch_size=8,
        optimizer="adam",
        estimator=Implicit(),
    ).run(
        problem,
        with_initial(noisy, lambda b: b[0].clone()),
        Budget(steps=args.steps),
        progress=False,
    )
    after = float(psnr(reconstruct(problem, batch), clean).mean())
    w = mask.weights().detach()
    out = {
        "psnr_before": before,
        "psnr_after": after,
        "mean_weight_before": 0.9,
        "mean_weight_after": float(w.mean()),
        "fraction_above_half": float((w > 0.5).float().mean()),
    }
    for k, v in out.items():
        print(f"{k:>20}: {v:.4f}")
    return out


if __name__ == "__main__":
    main()
