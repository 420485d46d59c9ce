"""The acceptance calibration of the tree surrogate (beyond the paper)."""

import pytest
import torch

from caddtree.decode.engine import Engine
from caddtree.decode.policy import make_policy
from caddtree.models.drafter_io import random_drafter
from caddtree.cost.model import CostModel
from caddtree.tree.calibration import NUM_BUCKETS, AcceptanceCalibration, bucket_sums, rank_buckets
from test_lossless import flat_cost_model
from tiny import tiny_target


def test_rank_buckets_are_the_bit_lengths_of_the_ranks():
    ranks = torch.arange(70000)
    assert rank_buckets(ranks).tolist() == [min(r.bit_length(), NUM_BUCKETS - 1) for r in range(70000)]
    values = torch.rand(70000, dtype=torch.float64)
    sums = [0.0] * NUM_BUCKETS
    for rank, value in enumerate(values.tolist()):
        sums[min(rank.bit_length(), NUM_BUCKETS - 1)] += value
    assert bucket_sums(ranks, values).tolist() == pytest.approx(sums)


def test_each_ratio_decays_shrinks_towards_the_bucket_before_and_never_exceeds_it():
    calibration = AcceptanceCalibration(decay=0.5, prior_promise=1.0)
    assert calibration.ratios() == [1.0] * NUM_BUCKETS
    assert calibration.scales(torch.arange(3)).tolist() == [1.0] * 3  # the device table exists from here
    promised = [0.9, 0.5, 0.6, 0.4] + [0.0] * (NUM_BUCKETS - 4)
    calibration.observe(promised, [0, 1])  # ranks 1 and 2 (1-based) accepted
    calibration.observe(promised, [0, 2, 5])
    accepted = [0.5 * 1 + 1, 0.5 * 1 + 0, 0.5 * 0 + 1, 0.5 * 0 + 1]
    expected, previous = [], 1.0
    for bucket in range(NUM_BUCKETS):
        seen, promise = (accepted[bucket], 1.5 * promised[bucket]) if bucket < 4 else (0.0, 0.0)
        ratio = (seen + previous) / (promise + 1.0)
        previous = ratio if bucket == 0 else min(ratio, previous)
        expected.append(previous)
    assert calibration.ratios() == pytest.approx(expected)
    assert expected[0] > 1 and expected[1] < expected[0]  # the first may exceed 1; the rest are capped
    scales = calibration.scales(torch.tensor([0, 1, 2, 3, 4, 7, 8, 100]))
    assert scales.tolist() == pytest.approx([expected[b] for b in (0, 1, 2, 2, 3, 3, 4, 7)])
    calibration.reset()
    assert calibration.ratios() == [1.0] * NUM_BUCKETS


def test_a_prior_promise_of_zero_is_refused():
    with pytest.raises(ValueError, match="prior_promise must be > 0"):
        AcceptanceCalibration(prior_promise=0.0)


def test_buckets_the_tree_did_not_reach_keep_what_they_knew():
    calibration = AcceptanceCalibration(decay=0.5, prior_promise=1.0)
    calibration.observe([1.0, 1.0] + [0.0] * (NUM_BUCKETS - 2), [0])
    calibration.observe([1.0] + [0.0] * (NUM_BUCKETS - 1), [0])
    assert calibration.promised[:2] == [1.5, 1.0] and calibration.accepted[:2] == [1.5, 0.0]


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


def test_skipping_waits_longer_while_drafting_does_not_pay_and_starts_over_when_it_does():
    from caddtree.decode.policy import DraftSkipping

    def skipped_after_each(skipping, paid_rounds):
        pattern = []
        for paid in paid_rounds:
            assert skipping.should_draft()
            skipping.record(drafting_paid=paid)
            skipped = 0
            while not skipping.should_draft():
                skipped += 1
            pattern.append(skipped)
        return pattern

    paid_rounds = [False, False, False, False, True, False, False, True, False, False, False]
    assert skipped_after_each(DraftSkipping(max_skip=4, patience=1), paid_rounds) == [1, 2, 4, 4, 0, 1, 2, 0, 1, 2, 4]
    # The default waits for three drafted rounds in a row that did not pay.
    assert skipped_after_each(DraftSkipping(max_skip=4), paid_rounds) == [0, 0, 1, 2, 0, 0, 0, 0, 0, 0, 1]


def test_caddtree_stops_drafting_when_no_tree_pays_for_the_draft():
    """An untrained drafter and a draft pass as dear as a decoding step: the drafter is mostly
    skipped, and the output is still exactly greedy."""
    target = tiny_target("llama", vocab_size=32, seed=3)
    engine = Engine(target, random_drafter(target, num_layers=1, block_size=6, seed=5))
    engine.eos_ids = set()
    sizes = [0, 1, 2, 4, 8]
    model = CostModel.fit({"target": "t", "drafter": "d", "device": "cpu", "dtype": "float32"}, [8], sizes,
                          [[0.010 + 0.001 * n for n in sizes]], [0.010])
    prompt = torch.tensor([3, 7, 11, 2])
    result = engine.generate(prompt, make_policy("caddtree", None, "exact", model), 60)
    assert result.tokens == engine.generate(prompt, make_policy("ar"), 60).tokens
    assert result.drafted_share < 0.4 and any(r.drafted for r in result.rounds)


def test_caddtree_keeps_drafting_when_the_draft_is_free():
    target = tiny_target("llama", vocab_size=32, seed=3)
    engine = Engine(target, random_drafter(target, num_layers=1, block_size=6, seed=5))
    engine.eos_ids = set()
    sizes = [0, 1, 2, 4, 8]
    model = CostModel.fit({"target": "t", "drafter": "d", "device": "cpu", "dtype": "float32"}, [8], sizes,
                          [[0.010] * len(sizes)], [0.0])  # trees cost nothing extra: drafting always pays
    result = engine.generate(torch.tensor([3, 7, 11, 2]), make_policy("caddtree", None, "exact", model), 30)
    assert all(r.drafted for r in result.rounds)
