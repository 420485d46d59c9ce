"""Draft-tree construction and budget rules, checked against brute force."""

import itertools
import math
import random

import pytest
import torch

from caddtree.tree.budget import exact_budget, greedy_budget, throughput
from caddtree.tree.build import chain_tree, rank_nodes, tree_from_ranked
from caddtree.tree.draft_tree import DraftTree


def random_log_probs(num_depths, vocab_size, seed, scale=2.0):
    generator = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(num_depths, vocab_size, generator=generator, dtype=torch.float64)
    return torch.log_softmax(logits, dim=1)


def all_path_log_weights(log_probs):
    """{path tuple: log weight} for every path of every depth."""
    num_depths, vocab_size = log_probs.shape
    rows = log_probs.tolist()
    return {
        path: sum(rows[i][token] for i, token in enumerate(path))
        for depth in range(1, num_depths + 1)
        for path in itertools.product(range(vocab_size), repeat=depth)
    }


def ranked_paths(ranked):
    """Each ranked node's token path, following parents up to the root."""
    tokens, parents = ranked.tokens.tolist(), ranked.parents.tolist()
    paths = []
    for k in range(ranked.size):
        parent = parents[k]
        paths.append((paths[parent] if parent >= 0 else ()) + (tokens[k],))
    return paths


def check_ranked(ranked, path_log_weights, n):
    """ranked holds the n heaviest nodes, best-first, with consistent, prefix-closed structure."""
    assert ranked.size == n
    parents, depths = ranked.parents.tolist(), ranked.depths.tolist()
    for k, parent in enumerate(parents):
        assert -1 <= parent < k  # so every prefix of the list is prefix-closed
        assert depths[k] == (depths[parent] + 1 if parent >= 0 else 1)
    log_weights = ranked.log_weights.tolist()
    assert all(a >= b for a, b in zip(log_weights, log_weights[1:]))
    paths = ranked_paths(ranked)
    assert len(set(paths)) == n
    for path, log_weight in zip(paths, log_weights):
        assert math.isclose(path_log_weights[path], log_weight, rel_tol=1e-5, abs_tol=1e-5) or (
            path_log_weights[path] == log_weight == -math.inf
        )
    heaviest = sorted(path_log_weights.values(), reverse=True)[:n]
    torch.testing.assert_close(
        torch.tensor(sorted(log_weights, reverse=True), dtype=torch.float64),
        torch.tensor(heaviest, dtype=torch.float64),
        rtol=1e-5,
        atol=1e-5,
    )


def budgets_to_check(total):
    """Every budget for small cases, a spread for larger ones (keeps the file fast)."""
    return range(1, total + 1) if total <= 160 else sorted({*range(1, total + 1, 7), total})


@pytest.mark.parametrize("num_depths, vocab_size", [(2, 3), (2, 5), (3, 4), (4, 3), (3, 5), (4, 5)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rank_nodes_matches_brute_force(num_depths, vocab_size, seed):
    log_probs = random_log_probs(num_depths, vocab_size, seed)
    path_log_weights = all_path_log_weights(log_probs)
    for n in budgets_to_check(len(path_log_weights)):
        check_ranked(rank_nodes(log_probs, n), path_log_weights, n)


def test_rank_nodes_returns_all_nodes_when_asked_for_more():
    log_probs = random_log_probs(3, 3, seed=5)
    path_log_weights = all_path_log_weights(log_probs)
    check_ranked(rank_nodes(log_probs, 1000), path_log_weights, len(path_log_weights))


def test_rank_nodes_zero_budget_is_empty():
    ranked = rank_nodes(random_log_probs(3, 4, seed=0), 0)
    assert ranked.size == 0
    assert tree_from_ranked(ranked, 0).size == 0


def tied_log_probs():
    """Uniform rows, a certain token (p = 1, the rest 0), and exact ties between parents."""
    probs = torch.tensor(
        [
            [0.5, 0.5, 0.0, 0.0],
            [0.25, 0.25, 0.25, 0.25],
            [0.0, 1.0, 0.0, 0.0],
            [0.5, 0.25, 0.25, 0.0],
        ],
        dtype=torch.float64,
    )
    return probs.log()


def test_rank_nodes_keeps_prefix_closure_under_ties():
    log_probs = tied_log_probs()
    path_log_weights = all_path_log_weights(log_probs)
    for n in range(1, len(path_log_weights) + 1, 3):
        check_ranked(rank_nodes(log_probs, n), path_log_weights, n)


def brute_force_ancestor_mask(parents):
    """[i, j] over [root, nodes...]: j is i or an ancestor of i, by walking up from every node."""
    num_positions = len(parents) + 1
    mask = [[False] * num_positions for _ in range(num_positions)]
    for position in range(num_positions):
        ancestor = position
        mask[position][ancestor] = True
        while ancestor != 0:
            ancestor = parents[ancestor - 1]
            mask[position][ancestor] = True
    return torch.tensor(mask)


def tree_paths(tree):
    """Each tree node's token path, following parents (tree positions) up to the root."""
    paths = {0: ()}
    for k, (token, parent) in enumerate(zip(tree.tokens.tolist(), tree.parents.tolist())):
        paths[k + 1] = paths[parent] + (token,)
    return [paths[k + 1] for k in range(tree.size)]


@pytest.mark.parametrize("log_probs", [random_log_probs(4, 5, seed=3), tied_log_probs()])
def test_tree_from_ranked_is_a_depth_major_tree_of_the_first_n(log_probs):
    ranked = rank_nodes(log_probs, 200)
    for n in [1, 2, 5, 17, 60, 200]:
        tree = tree_from_ranked(ranked, n)
        parents, depths = tree.parents.tolist(), tree.depths.tolist()
        assert tree.size == n
        for k, parent in enumerate(parents):
            assert 0 <= parent <= k  # tree position of node k is k+1: parents come first
            assert depths[k] == (depths[parent - 1] + 1 if parent > 0 else 1)
        assert depths == sorted(depths)
        assert torch.equal(tree.ancestor_mask, brute_force_ancestor_mask(parents))
        assert set(tree_paths(tree)) == set(ranked_paths(ranked)[:n])
        siblings = list(zip(parents, tree.tokens.tolist()))
        assert len(set(siblings)) == n


def test_tree_from_ranked_rejects_more_nodes_than_ranked():
    ranked = rank_nodes(random_log_probs(2, 3, seed=0), 4)
    with pytest.raises(ValueError):
        tree_from_ranked(ranked, 5)


def test_chain_tree_follows_argmax():
    log_probs = random_log_probs(6, 10, seed=4)
    tree = chain_tree(log_probs)
    argmax_tokens = [max(range(10), key=row.__getitem__) for row in log_probs.tolist()]
    assert tree.tokens.tolist() == argmax_tokens
    assert tree.parents.tolist() == [0, 1, 2, 3, 4, 5]
    assert tree.depths.tolist() == [1, 2, 3, 4, 5, 6]
    assert torch.equal(tree.ancestor_mask, brute_force_ancestor_mask(tree.parents.tolist()))


def test_empty_tree():
    tree = DraftTree.empty("cpu")
    assert tree.size == 0
    assert tree.tokens.dtype == tree.parents.dtype == tree.depths.dtype == torch.long
    assert tree.ancestor_mask.tolist() == [[True]]


def naive_rank_nodes(log_probs, max_nodes):
    """Reference: every depth extends the previous depth's top N by all top-N tokens (N x N)."""
    token_log_probs, _ = torch.topk(log_probs, max_nodes, dim=1)
    depth_log_weights = token_log_probs[0]
    all_log_weights = [depth_log_weights]
    for row in token_log_probs[1:]:
        candidates = (depth_log_weights[:, None] + row[None, :]).flatten()
        depth_log_weights = torch.topk(candidates, max_nodes).values
        all_log_weights.append(depth_log_weights)
    return torch.topk(torch.cat(all_log_weights), max_nodes).values


def test_rank_nodes_at_full_scale_matches_naive_reference():
    log_probs = random_log_probs(15, 49152, seed=7, scale=4.0).float()
    ranked = rank_nodes(log_probs, 1024)
    assert ranked.size == 1024
    assert (ranked.parents < torch.arange(1024)).all()
    torch.testing.assert_close(ranked.log_weights, naive_rank_nodes(log_probs, 1024))
    tree = tree_from_ranked(ranked, 1024)
    assert tree.ancestor_mask.shape == (1025, 1025)


def python_throughput(gains, round_costs):
    thetas, phi = [], 0.0
    for n, cost in enumerate(round_costs):
        thetas.append((1 + phi) / cost)
        if n < len(gains):
            phi += gains[n]
    return thetas


def random_gains(rng, num_nodes):
    return sorted((rng.random() ** 3 for _ in range(num_nodes)), reverse=True)


def as_tensors(gains, round_costs):
    return torch.tensor(gains, dtype=torch.float64), torch.tensor(round_costs, dtype=torch.float64)


def first_argmax(values):
    return max(range(len(values)), key=lambda n: (values[n], -n))


def test_throughput_matches_formula():
    rng = random.Random(0)
    gains = random_gains(rng, 50)
    round_costs = [0.01 + 0.001 * n + rng.random() * 1e-3 for n in range(51)]
    theta = throughput(*as_tensors(gains, round_costs))
    expected = torch.tensor(python_throughput(gains, round_costs), dtype=torch.float64)
    torch.testing.assert_close(theta, expected)


@pytest.mark.parametrize("seed", range(20))
def test_greedy_is_exact_on_convex_costs(seed):
    rng = random.Random(seed)
    num_nodes = rng.randint(1, 300)
    gains = random_gains(rng, num_nodes)
    a, b, c = rng.uniform(0.5, 2.0), rng.uniform(1e-3, 5e-2), rng.uniform(1e-6, 1e-3)
    round_costs = [a + b * n + c * n * n for n in range(num_nodes + 1)]
    best = first_argmax(python_throughput(gains, round_costs))
    gains_t, costs_t = as_tensors(gains, round_costs)
    assert exact_budget(throughput(gains_t, costs_t)) == best
    assert greedy_budget(throughput(gains_t, costs_t)) == best


@pytest.mark.parametrize("seed", range(20))
def test_exact_never_worse_than_greedy_on_non_convex_costs(seed):
    rng = random.Random(seed)
    num_nodes = rng.randint(1, 300)
    gains = random_gains(rng, num_nodes)
    # Step-shaped: flat runs with random jumps, like CUDA-graph buckets.
    steps = (rng.choice([0.0, 0.0, 0.0, rng.random()]) for _ in range(num_nodes + 1))
    round_costs = list(itertools.accumulate(steps, initial=1.0))[1:]
    thetas = python_throughput(gains, round_costs)
    gains_t, costs_t = as_tensors(gains, round_costs)
    exact, greedy = exact_budget(throughput(gains_t, costs_t)), greedy_budget(throughput(gains_t, costs_t))
    assert exact == first_argmax(thetas)
    assert thetas[exact] >= thetas[greedy]


def test_exact_beats_greedy_on_step_costs():
    # One costly step from 0 to 1 node, then flat: Theta dips at n = 1 and rises to its best at N.
    gains = torch.full((8,), 0.5, dtype=torch.float64)
    round_costs = torch.tensor([1.0] + [2.0] * 8, dtype=torch.float64)
    assert greedy_budget(throughput(gains, round_costs)) == 0
    assert exact_budget(throughput(gains, round_costs)) == 8
    thetas = throughput(gains, round_costs)
    assert thetas[8] > thetas[0]


def test_greedy_takes_every_node_when_theta_never_drops():
    gains = torch.tensor([0.9, 0.8, 0.7], dtype=torch.float64)
    round_costs = torch.ones(4, dtype=torch.float64)
    assert greedy_budget(throughput(gains, round_costs)) == 3


def test_greedy_continues_through_a_plateau():
    # Theta = 1, 1, 4/3: equal is not a decrease, so greedy goes on to the rise.
    gains = torch.tensor([0.5, 0.5], dtype=torch.float64)
    round_costs = torch.tensor([1.0, 1.5, 1.5], dtype=torch.float64)
    assert greedy_budget(throughput(gains, round_costs)) == 2
