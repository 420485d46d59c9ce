"""At temperature > 0, speculative decoding must sample sequences from the target's own distribution."""

import itertools
from collections import Counter

import pytest
import torch
from scipy.stats import chisquare

from caddtree.decode.engine import Engine
from caddtree.decode.policy import make_policy
from caddtree.decode.sampling import Sampling
from caddtree.errors import CaddtreeError
from caddtree.models.drafter_io import random_drafter
from broken_walk import take_the_first_child_always
from test_lossless import flat_cost_model
from tiny import tiny_target

VOCAB = 6
NEW_TOKENS = 3
PROMPT = torch.tensor([2, 3, 1])
REPEATING_PROMPT = torch.tensor([0, 4, 0, 4, 0, 4])  # the tiny target's likely answers continue it


def exact_sequence_probabilities(target, sampling: Sampling, prompt=PROMPT) -> dict[tuple, float]:
    """P(sequence of NEW_TOKENS tokens) under the target alone, by enumerating every sequence."""
    probabilities = {}
    with torch.no_grad():
        for sequence in itertools.product(range(VOCAB), repeat=NEW_TOKENS):
            ids = torch.tensor([prompt.tolist() + list(sequence)])
            step_probs = sampling.probabilities(target.model(ids).logits[0, len(prompt) - 1 : -1])
            probabilities[sequence] = float(step_probs[torch.arange(NEW_TOKENS), list(sequence)].prod())
    return probabilities


def sampled_sequences(engine, policy, sampling, count: int, prompt=PROMPT) -> Counter:
    return Counter(
        tuple(engine.generate(prompt, policy, NEW_TOKENS, sampling, seed=seed).tokens) for seed in range(count)
    )


def chi_square_p_value(counts: Counter, probabilities: dict[tuple, float]) -> float:
    """Goodness of fit, pooling sequences whose expected count is under 5 into one cell."""
    total = sum(counts.values())
    big = [s for s, p in probabilities.items() if p * total >= 5]
    small = [s for s in probabilities if s not in big]
    observed = [counts[s] for s in big] + [sum(counts[s] for s in small)]
    expected = [probabilities[s] * total for s in big] + [sum(probabilities[s] for s in small) * total]
    scale = total / sum(expected)  # the enumerated probabilities sum to 1 only up to float error
    return chisquare(observed, [e * scale for e in expected]).pvalue


@pytest.fixture(scope="module")
def engine():
    target = tiny_target("llama", vocab_size=VOCAB, layers=2, seed=21)
    engine = Engine(target, random_drafter(target, num_layers=1, block_size=4, seed=0))
    engine.eos_ids = set()
    return engine


@pytest.mark.parametrize("sampling", [Sampling(1.0), Sampling(0.8, top_p=0.9, top_k=4)])
def test_caddtree_and_ar_sample_the_target_distribution(engine, sampling):
    probabilities = exact_sequence_probabilities(engine.target, sampling)
    assert abs(sum(probabilities.values()) - 1) < 1e-4
    caddtree = make_policy("caddtree", None, "exact", flat_cost_model(1e-6))
    for policy in (make_policy("ar"), caddtree, make_policy("ddtree", 20)):
        counts = sampled_sequences(engine, policy, sampling, 2500)
        assert chi_square_p_value(counts, probabilities) > 1e-3, policy.name


@pytest.mark.parametrize("method", ["lookup", "caddtree"])
def test_lookup_nodes_keep_sampling_exact(engine, method):
    """On a prompt whose likely answers it repeats, lookups are verified and often accepted."""
    probabilities = exact_sequence_probabilities(engine.target, Sampling(1.0), REPEATING_PROMPT)
    policy = make_policy(method, None, "exact", flat_cost_model(1e-6))
    results = [engine.generate(REPEATING_PROMPT, policy, NEW_TOKENS, Sampling(1.0), seed=s) for s in range(2500)]
    counts = Counter(tuple(result.tokens) for result in results)
    assert chi_square_p_value(counts, probabilities) > 1e-3
    if method == "lookup":  # caddtree's drafter may take these rounds instead
        assert sum(any(r.emitted > 1 for r in result.rounds) for result in results) > 500


def test_the_chi_square_check_rejects_a_wrong_distribution(engine):
    """The test above has power: samples at another temperature fail it."""
    probabilities = exact_sequence_probabilities(engine.target, Sampling(1.0))
    counts = sampled_sequences(engine, make_policy("ar"), Sampling(1.6), 2500)
    assert chi_square_p_value(counts, probabilities) < 1e-3


def test_drafts_were_accepted_while_sampling(engine):
    caddtree = make_policy("caddtree", None, "exact", flat_cost_model(1e-6))
    results = [engine.generate(PROMPT, caddtree, NEW_TOKENS, Sampling(1.0), seed=s) for s in range(50)]
    assert any(r.rounds and r.rounds[0].emitted > 1 for r in results)


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    probs = Sampling(1.0, top_p=0.7).probabilities(torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])))
    torch.testing.assert_close(probs, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    probs = Sampling(1.0, top_k=1).probabilities(torch.log(torch.tensor([[0.2, 0.5, 0.3]])))
    torch.testing.assert_close(probs, torch.tensor([[0.0, 1.0, 0.0]]))


@pytest.mark.parametrize("arguments, message", [
    ({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top-p"), ({"top_p": 1.5}, "top-p"),
    ({"top_k": -2}, "top-k"),
])
def test_bad_sampling_arguments(arguments, message):
    with pytest.raises(CaddtreeError, match=message):
        Sampling(**arguments)


# --- deeper trees: several rounds, acceptance over several levels --------------------------------

DEEP_TOKENS = 5
DEEP_PROMPT = torch.tensor([2, 3])
DEEP_SAMPLING = Sampling(1.0, top_k=2)  # two choices per step: 32 possible sequences, each sampled often


@pytest.fixture(scope="module")
def deep_engine():
    target = tiny_target("llama", vocab_size=12, layers=2, seed=5)
    engine = Engine(target, random_drafter(target, num_layers=1, block_size=4, seed=3))
    engine.eos_ids = set()
    return engine


def deep_sequence_probabilities(target, prefix=(), probability=1.0) -> dict[tuple, float]:
    """Exact P(sequence) under the target alone, expanding only the tokens the sampler can draw."""
    if len(prefix) == DEEP_TOKENS:
        return {prefix: probability}
    with torch.no_grad():
        logits = target.model(torch.tensor([DEEP_PROMPT.tolist() + list(prefix)])).logits[0, -1:]
    step = DEEP_SAMPLING.probabilities(logits)[0]
    sequences = {}
    for token in step.nonzero().flatten().tolist():
        sequences.update(deep_sequence_probabilities(target, prefix + (token,), probability * float(step[token])))
    return sequences


def deep_p_value(engine, policy, probabilities, count: int = 3000) -> tuple[float, int]:
    """Goodness of fit of `count` sampled sequences, and the most tokens any round emitted."""
    results = [engine.generate(DEEP_PROMPT, policy, DEEP_TOKENS, DEEP_SAMPLING, seed=seed) for seed in range(count)]
    counts = Counter(tuple(r.tokens) for r in results)
    longest_round = max(r.emitted for result in results for r in result.rounds)
    if any(sequence not in probabilities for sequence in counts):
        return 0.0, longest_round  # a sequence the target alone can never produce
    return chi_square_p_value(counts, probabilities), longest_round


def test_deep_trees_sample_the_target_distribution_over_several_levels(deep_engine):
    probabilities = deep_sequence_probabilities(deep_engine.target)
    assert len(probabilities) == 2**DEEP_TOKENS and abs(sum(probabilities.values()) - 1) < 1e-4
    p_value, longest_round = deep_p_value(deep_engine, make_policy("ddtree", 40), probabilities)
    assert longest_round >= 3, "no round accepted two draft levels: the test would exercise only depth 1"
    assert p_value > 1e-3


def test_a_walk_biased_towards_the_draft_fails_the_deep_check(deep_engine, monkeypatch):
    """The check above has power: a walk that always takes the first child is caught."""
    take_the_first_child_always(monkeypatch)
    p_value, _ = deep_p_value(deep_engine, make_policy("ddtree", 40), deep_sequence_probabilities(deep_engine.target))
    assert p_value < 1e-3
