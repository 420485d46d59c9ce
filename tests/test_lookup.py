"""The lookup proposer and the merge of its nodes with the drafter's, against brute force."""

import copy
import math
import random

import pytest
import torch

from caddtree.decode.lookup import (MAX_CANDIDATES, MAX_PRIOR, MAX_RANK, PRIOR_ROUNDS, KindStatistics, LookupProposer,
                                    NgramIndex, node_kind, prior_rate)
from caddtree.tree.build import RankedNodes, rank_nodes
from caddtree.tree.merge import live_count, merge_ranked


def random_text(length: int, vocab: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    text = []
    while len(text) < length:  # copies of earlier stretches, as grounded answers have
        if text and rng.random() < 0.4:
            start = rng.randrange(len(text))
            text += text[start : start + rng.randint(1, 12)]
        else:
            text.append(rng.randrange(vocab))
    return text[:length]


def brute_earlier_ends(text: list[int], n: int) -> list[int]:
    suffix = text[len(text) - n :]
    return [end for end in range(n, len(text)) if text[end - n : end] == suffix]


def brute_match_length(text: list[int], end: int) -> int:
    length = 0
    while length < min(32, end) and text[end - 1 - length] == text[-1 - length]:
        length += 1
    return length


@pytest.mark.parametrize("seed", range(4))
def test_the_index_finds_every_earlier_occurrence_of_every_suffix(seed):
    text = random_text(300, vocab=5 + 10 * seed, seed=seed)
    index = NgramIndex()
    rng = random.Random(seed)
    position = 0
    while position < len(text):
        step = rng.randint(1, 9)  # appended in chunks, as rounds emit them
        index.extend(text[position : position + step])
        position = min(position + step, len(text))
        prefix = text[:position]
        for n in range(1, index.max_n + 1):
            expected = brute_earlier_ends(prefix, n) if n <= len(prefix) else []
            assert index.earlier_ends(n) == expected
            for end in expected:
                assert index.match_length(end) == brute_match_length(prefix, end)


def paths_of(nodes: RankedNodes) -> list[tuple[int, ...]]:
    tokens, parents = nodes.tokens.tolist(), nodes.parents.tolist()
    paths = []
    for node in range(len(tokens)):
        path = [tokens[node]]
        parent = parents[node]
        while parent >= 0:
            path.append(tokens[parent])
            parent = parents[parent]
        paths.append(tuple(reversed(path)))
    return paths


def check_best_first_tree(nodes: RankedNodes, count: int | None = None) -> None:
    """Every prefix is a tree: parents come first; weights never increase; depths agree."""
    count = nodes.size if count is None else count
    parents, depths = nodes.parents[:count].tolist(), nodes.depths[:count].tolist()
    weights = nodes.log_weights[:count].tolist()
    for node, parent in enumerate(parents):
        assert parent < node
        assert depths[node] == (1 if parent < 0 else depths[parent] + 1)
    assert all(a >= b for a, b in zip(weights, weights[1:]))
    assert len(set(paths_of(nodes)[:count])) == count, "a path appears twice"


@pytest.mark.parametrize("seed", range(6))
def test_proposed_paths_continue_earlier_occurrences_of_the_longest_matching_suffix(seed):
    text = random_text(200, vocab=8, seed=seed)
    proposer = LookupProposer()
    proposer.reset(text)
    nodes = proposer.propose(max_depth=6, device="cpu")
    longest = max(n for n in range(1, 5) if brute_earlier_ends(text, n))
    ends = brute_earlier_ends(text, longest)
    continuations = {tuple(text[end : end + 6]) for end in ends}
    check_best_first_tree(nodes)
    leaves = set(paths_of(nodes)) - {path[:-1] for path in paths_of(nodes)}
    assert 1 <= len(leaves) <= MAX_CANDIDATES
    assert leaves <= continuations
    # The longest true matches are the ones followed.
    best_match = max(brute_match_length(text, end) for end in ends)
    followed = [end for end in ends if tuple(text[end : end + 6]) in leaves]
    assert max(brute_match_length(text, end) for end in followed) == best_match


def sibling_probabilities(nodes: RankedNodes) -> dict[int, list[float]]:
    """Per parent, each child's probability given its parent."""
    weights, parents = nodes.log_weights.tolist(), nodes.parents.tolist()
    by_parent = {}
    for node, parent in enumerate(parents):
        base = weights[parent] if parent >= 0 else 0.0
        by_parent.setdefault(parent, []).append(math.exp(weights[node] - base))
    return by_parent


@pytest.mark.parametrize("seed", range(6))
def test_probabilities_are_probabilities_and_learn_from_the_target_choices(seed):
    text = random_text(150, vocab=6, seed=seed)
    proposer = LookupProposer()
    proposer.reset(text)
    rng = random.Random(seed)
    tried = 0
    for round_number in range(40):
        nodes = proposer.propose(max_depth=5, device="cpu")
        if nodes is None:  # the text ends in a token never seen before
            proposer.observe([rng.randrange(6)])
            continue
        tried += 1
        for probabilities in sibling_probabilities(nodes).values():
            assert all(0 < p <= 1 for p in probabilities) and sum(probabilities) <= 1 + 1e-9
        # The root's first-ranked child: alone of its kind among the nodes this choice tests.
        first, child = next((token, child) for token, child in proposer._trie.children[-1].items()
                            if proposer._kinds[child][1] == 0)
        kind = proposer._kinds[child]
        # The same round seen both ways: the target takes this node, or a token no node proposes.
        rejecting = copy.deepcopy(proposer)
        rejecting.observe([100 + round_number])
        accepted_before = proposer.statistics.accepted.get(kind, 0)
        tested_before = proposer.statistics.tested.get(kind, 0)
        proposer.observe([first])
        assert proposer.statistics.accepted[kind] == accepted_before + 1
        assert proposer.statistics.tested[kind] == rejecting.statistics.tested[kind] == tested_before + 1
        assert rejecting.statistics.accepted.get(kind, 0) == accepted_before
        assert proposer.statistics.rate(kind) > rejecting.statistics.rate(kind)
        assert proposer.index.tokens[-1] == first
        if rng.random() < 0.5:
            proposer = rejecting
    assert tried >= 20


def test_rejections_of_some_kinds_lower_the_rates_of_kinds_not_yet_seen():
    statistics = KindStatistics()
    unseen = node_kind(6, 0)
    fresh = statistics.rate(unseen)
    for _ in range(10):
        statistics.record(node_kind(1, 0), False)
        statistics.record(node_kind(2, 1), False)
    assert statistics.rate(unseen) < fresh / 3
    for _ in range(40):
        statistics.record(node_kind(1, 0), True)
    assert statistics.rate(unseen) > fresh


def estimate(statistics: KindStatistics, kind) -> float:
    """The posterior mean that the cautious rate starts from."""
    prior = min(MAX_PRIOR, prior_rate(kind) * statistics.pooled_ratio)
    observations = statistics.tested.get(kind, 0) + PRIOR_ROUNDS
    return (statistics.accepted.get(kind, 0) + PRIOR_ROUNDS * prior) / observations


def test_a_rate_seen_more_often_is_trusted_more():
    """Same share accepted, more evidence: the rate comes closer to the estimate, from below."""
    kind = node_kind(2, 0)
    gaps = []
    for tests in (4, 40, 400):
        statistics = KindStatistics()
        for index in range(tests):
            statistics.record(kind, index % 4 == 0)
        assert estimate(statistics, kind) / 2 < statistics.rate(kind) < estimate(statistics, kind)
        gaps.append(estimate(statistics, kind) - statistics.rate(kind))
    assert gaps[0] > gaps[1] > gaps[2]


def test_a_rare_kind_keeps_half_its_estimate():
    """Half a deviation would take a low, unseen estimate below zero: the floor keeps half of it."""
    statistics = KindStatistics()
    for _ in range(20):
        statistics.record(node_kind(1, 0), False)  # lookups have fared badly: low priors everywhere
    unseen = node_kind(1, MAX_RANK)
    assert 0 < statistics.rate(unseen) == estimate(statistics, unseen) / 2


def test_kinds_order_by_match_length_and_rank():
    assert node_kind(1, 0) < node_kind(4, 0) < node_kind(40, 0)
    assert node_kind(4, 5) == node_kind(4, 2)


def test_no_earlier_match_proposes_nothing():
    proposer = LookupProposer()
    proposer.reset([1, 2, 3, 4])
    assert proposer.propose(max_depth=4, device="cpu") is None
    proposer.observe([5])  # nothing was proposed: only the text grows
    assert proposer.index.tokens == [1, 2, 3, 4, 5]


def random_lookup_nodes(seed: int) -> RankedNodes:
    text = random_text(120, vocab=5, seed=seed)
    proposer = LookupProposer()
    proposer.reset(text)
    return proposer.propose(max_depth=6, device="cpu")


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("max_nodes", [3, 20, 200])
def test_merge_is_the_union_with_the_larger_weight_prefix_closed_and_without_twins(seed, max_nodes):
    generator = torch.Generator().manual_seed(seed)
    log_probs = torch.log_softmax(3 * torch.randn(4, 5, generator=generator), dim=-1)
    drafted = rank_nodes(log_probs, 30)
    drafted = RankedNodes(drafted.tokens, drafted.parents, drafted.depths, drafted.log_weights.double(), drafted.num_depths)
    looked_up = random_lookup_nodes(seed)
    merged, drafter_index = merge_ranked(drafted, looked_up, max_nodes)

    live = int(live_count(merged))
    check_best_first_tree(merged, live)
    assert torch.isinf(merged.log_weights[live:]).all()
    expected = {}
    for nodes in (drafted, looked_up):
        for path, weight in zip(paths_of(nodes), nodes.log_weights.tolist()):
            expected[path] = max(weight, expected.get(path, -math.inf))
    best = sorted(expected.items(), key=lambda item: (-item[1], len(item[0])))
    found = dict(zip(paths_of(merged)[:live], merged.log_weights[:live].tolist()))
    assert live == min(max_nodes, len(expected))
    for path, weight in found.items():
        assert weight == pytest.approx(expected[path])
    assert sorted(found.values(), reverse=True) == pytest.approx([weight for _, weight in best[:live]])
    drafter_paths = paths_of(drafted)
    for path, index in zip(paths_of(merged)[:live], drafter_index[:live].tolist()):
        assert (index >= 0) == (path in drafter_paths)
        assert index < 0 or drafter_paths[index] == path


def test_the_host_reads_the_path_and_the_drafter_ranks_of_its_accepted_nodes():
    from caddtree.decode.acceptance import accepted_path, read_path
    from caddtree.tree.build import tree_from_ranked

    # root -> 5 (drafter rank 0) -> 6 (lookup only); root -> 8 (drafter rank 1). The target
    # chooses 5, 6, then 9.
    nodes = RankedNodes(torch.tensor([5, 8, 6]), torch.tensor([-1, -1, 0]), torch.tensor([1, 1, 2]),
                        torch.tensor([-0.1, -0.5, -0.7]), 2)
    choices = torch.tensor([5, 6, 0, 9])  # per tree position: root, 5, 8, 6
    for drafter_ranks, credited in ((torch.tensor([0, 1, -1]), [0]), (torch.tensor([1, 0, 2]), [1, 2]), (None, [])):
        tree = tree_from_ranked(nodes, 3, drafter_ranks)
        tree_tokens, _ = tree.with_root(torch.tensor(4))
        emitted, accepted_ranks = read_path(tree, tree_tokens, accepted_path(tree, choices, 3))
        assert emitted == [5, 6, 9] and accepted_ranks == credited


def test_merging_with_an_empty_list_keeps_the_other():
    looked_up = random_lookup_nodes(1)
    empty = rank_nodes(torch.zeros(3, 5), 0)
    merged, drafter_index = merge_ranked(empty, looked_up, 4)
    assert paths_of(merged) == paths_of(looked_up)[:4] and (drafter_index == -1).all()
    merged, drafter_index = merge_ranked(looked_up, empty, 100)
    assert paths_of(merged) == paths_of(looked_up) and drafter_index.tolist() == list(range(looked_up.size))


def test_caddtree_with_a_budget_of_zero_and_lookups_decodes_plainly():
    from caddtree.decode.engine import Engine
    from caddtree.decode.policy import make_policy
    from caddtree.models.drafter_io import random_drafter
    from test_lossless import flat_cost_model, greedy_reference
    from tiny import tiny_target

    target = tiny_target("llama", vocab_size=24, seed=11)
    engine = Engine(target, random_drafter(target, num_layers=1, block_size=5, seed=1))
    engine.eos_ids = set()
    prompt = torch.tensor([3, 4, 5, 6, 3, 4, 5, 6, 3, 4])
    result = engine.generate(prompt, make_policy("caddtree", 0, "exact", flat_cost_model(1e-6)), 20)
    assert result.tokens == greedy_reference(target, prompt, 20, set())
    assert all(r.budget == 0 for r in result.rounds)


def test_no_lookup_is_refused_for_methods_other_than_caddtree():
    from caddtree.decode.policy import check_policy_arguments
    from caddtree.errors import CaddtreeError

    for method in ("ar", "dflash", "ddtree", "lookup"):
        with pytest.raises(CaddtreeError, match="--no-lookup applies to caddtree only"):
            check_policy_arguments(method, None, "exact", lookup=False)
    check_policy_arguments("caddtree", None, "exact", lookup=False)
