"""MAID on a float32 Fields-of-Experts denoising problem: it accepts steps, and what it
certifies holds against a float64 reference."""

from __future__ import annotations

import copy
from dataclasses import replace

import torch

from bilevel import CG, Implicit, Nesterov
from bilevel.imaging import reconstruction_problem
from bilevel.imaging.config import job_config
from bilevel.imaging.job import build, calibrate_foe_weights, make_method
from bilevel.methods import Budget, with_initial

F64 = torch.float64


def _reference(problem, batch, x0):
    """F(θ) and ∇F(θ) of the float32 problem's θ, computed in float64 to 1e-9."""
    reg64 = copy.deepcopy(problem.theta["regulariser"]).double()
    p64 = reconstruction_problem(reg64, gamma=0.0)
    est = Implicit(CG(max_iter=3000), lower_solver=Nesterov(max_iter=30_000))
    hg = est(p64, tuple(b.double() for b in batch), x0.double(), lower_tol=1e-9)
    return hg.loss, torch.cat([g.reshape(-1) for g in hg.grad])


def test_maid_accepts_steps_on_float32_fields_of_experts():
    torch.manual_seed(0)
    args = job_config(
        "denoise",
        regulariser="foe",
        filters=10,
        filter_size=7,
        crop=32,
        train_size=2,
        test_size=1,
        val_size=0,
        method="maid",
        dtype="float32",
    )
    setup = build(args)
    calibrate_foe_weights(setup.problem.theta["regulariser"], 0.075)
    problem = setup.problem
    samples = with_initial(setup.train, lambda b: b[0].clone())
    index = torch.arange(len(samples))
    batch, x0 = samples.batch(index), samples.initial(index)
    method = replace(make_method(args), lower_tol=1e-2)

    # the estimate at θ₀ and its ω against the float64 truth
    hg = method.estimator(problem, batch, x0, lower_tol=1e-2, adjoint_tol=1e-2)
    loss0, grad0 = _reference(problem, batch, x0)
    z = torch.cat([g.reshape(-1).double() for g in hg.grad])
    assert float((z - grad0).norm()) <= hg.bound < 0.5 * hg.norm

    result = method.run(problem, samples, Budget(steps=3), progress=False, plot=False)
    accepted = [r for r in result.records if r["accepted"]]
    assert accepted, result.records
    # every accepted step certifies a decrease of the true F
    loss1, _ = _reference(problem, batch, x0)
    assert loss1 < loss0 - 1e-4 * sum(r["alpha"] * r["grad_norm"] ** 2 for r in accepted)
