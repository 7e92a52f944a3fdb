"""Learn a regulariser for compressed sensing with a forward operator from deepinv.

deepinv's ``CompressedSensing`` physics (a random Gaussian matrix, m = ratio·n measurements of
an image of n = H·W pixels) becomes the bilevel operator A through ``PhysicsOperator``; the
lower level reconstructs

    x̂(θ) = argmin_x ½‖A x − y‖² + R_θ(x) + (γ/2)‖x‖²,      y = A x_true + σε

with a Fields-of-Experts R_θ, and Adam-ISGD learns θ on crops of the bundled images. The
result is compared with Aᵀy and with smoothed TV tuned on a grid, on held-out test crops.

Needs deepinv (``pip install 'bilevel[deepinv]'``).
Run: python examples/deepinv_compressed_sensing.py [--steps 60] [--ratio 0.4]
"""

from __future__ import annotations

import argparse

import torch

from bilevel import ISGD, Budget, Implicit, Nesterov, with_initial
from bilevel.imaging import (
    DegradedImages,
    FieldsOfExperts,
    SmoothedTV,
    bundled_images,
    grid_search_tv,
    psnr,
    random_crops,
    reconstruct,
    reconstruction_problem,
)
from bilevel.imaging.deepinv import PhysicsOperator
from bilevel.linear import CG


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--crop", type=int, default=16)
    parser.add_argument("--ratio", type=float, default=0.4, help="m/n, measurements per pixel")
    parser.add_argument("--sigma", type=float, default=5.0, help="noise σ on the 0-255 scale")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)

    import deepinv

    m = max(1, round(args.ratio * args.crop * args.crop))
    physics = deepinv.physics.CompressedSensing(m=m, img_size=(1, args.crop, args.crop))
    operator = PhysicsOperator(physics, (1, args.crop, args.crop))
    train = DegradedImages(
        random_crops(bundled_images("train"), args.crop, 16, generator=0),
        operator,
        sigma=args.sigma / 255,
        seed=1,
    )
    test = DegradedImages(
        random_crops(bundled_images("test"), args.crop, 8, generator=1),
        operator,
        sigma=args.sigma / 255,
        seed=2,
    )
    gamma = 1e-2
    y, x_true = test.batch()
    back = operator.adjoint(y)

    tv = grid_search_tv(
        train, (0.005, 0.01, 0.02, 0.05), operator=operator, gamma=gamma, max_iter=1000
    )
    foe = FieldsOfExperts(
        6, 5, smoothing=0.01, init_weight=2 * tv.strength / 6, learn_smoothing=True
    )
    problem = reconstruction_problem(foe, operator, gamma=gamma)
    start = float(
        psnr(reconstruct(problem, (y, x_true), x0=back, tol=1e-3).clamp(0, 1), x_true).mean()
    )
    ISGD(
        step="poly:3e-2,0.25",
        accuracy="poly:1e-1,0.5",
        batch_size=8,
        optimizer="adam",
        estimator=Implicit(CG(max_iter=500), lower_solver=Nesterov(max_iter=5000)),
    ).run(
        problem,
        with_initial(train, lambda b: operator.adjoint(b[0])),
        Budget(steps=args.steps),
        progress=False,
    )
    learned = reconstruct(problem, (y, x_true), x0=back, tol=1e-3)
    tv_problem = reconstruction_problem(SmoothedTV(strength=tv.strength), operator, gamma=gamma)
    x_tv = reconstruct(tv_problem, (y, x_true), x0=back, tol=1e-3)
    out = {
        "operator_norm": operator.norm_bound(),
        "psnr_adjoint": float(psnr(back.clamp(0, 1), x_true).mean()),
        "psnr_tv": float(psnr(x_tv.clamp(0, 1), x_true).mean()),
        "psnr_learned_start": start,
        "psnr_learned": float(psnr(learned.clamp(0, 1), x_true).mean()),
    }
    for k, v in out.items():
        print(f"{k:>20}: {v:.4f}")
    return out


if __name__ == "__main__":
    main()
