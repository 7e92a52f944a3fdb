"""Examples run and do what they claim."""

from __future__ import annotations

import pathlib
import runpy

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def test_learned_sampling_mask_trades_samples_for_accuracy():
    module = runpy.run_path(str(EXAMPLES / "learn_sampling_mask.py"))
    out = module["main"](["--steps", "30", "--crop", "16"])
    assert out["mean_weight_after"] < out["mean_weight_before"] - 0.1  # sampling got cheaper
    assert out["psnr_after"] > 25.0  # while reconstructions stay usable
