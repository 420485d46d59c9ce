"""The acceptance calibration of the tree surrogate (beyond the paper)."""

import pytest
import torch

from caddtree.decode.engine import Engine
from caddtree.decode.policy import make_policy
from caddtree.models.drafter_io import random_drafter
from caddtree.tree.calibration import AcceptanceCalibration
from test_lossless import flat_cost_model
from tiny import tiny_target


def test_ratio_is_a_decaying_accepted_over_promised_with_a_prior():
    calibration = AcceptanceCalibration(decay=0.5, prior_rounds=1.0)
    assert calibration.ratio == 1.0
    calibration.observe(promised=4.0, accepted=0)
    assert calibration.ratio == pytest.approx((0 + 1) / (4 + 1))
    calibration.observe(promised=2.0, accepted=3)
    assert calibration.ratio == pytest.approx((0.5 * 0 + 3 + 1) / (0.5 * 4 + 2 + 1))
    calibration.reset()
    assert calibration.ratio == 1.0


def test_an_overconfident_drafter_gets_smaller_trees_when_calibrated():
    target = tiny_target("llama", vocab_size=32, seed=8)
    drafter = random_drafter(target, num_layers=1, block_size=8, seed=3)
    with torch.no_grad():  # an untrained drafter that is sure of itself: near one-hot marginals
        drafter.norm.weight.mul_(50)
    engine = Engine(target, drafter)
    engine.eos_ids = set()
    cost_model = flat_cost_model(1e-3)
    prompt = torch.tensor([3, 4, 5, 6])
    results = {
        calibrate: engine.generate(prompt, make_policy("caddtree", None, "exact", cost_model, calibrate), 40)
        for calibrate in (True, False)
    }
    assert results[True].tokens == results[False].tokens  # the budget changes, never the output
    assert results[True].mean_budget < 0.5 * results[False].mean_budget
