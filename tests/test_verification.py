"""One-pass tree verification must see exactly what a plain forward over each root path sees."""

import pytest
import torch

from caddtree.decode.acceptance import accepted_path
from caddtree.models.target import TargetRunner
from caddtree.tree.build import rank_nodes, tree_from_ranked
from tiny import tiny_target


def plain_forward(target, token_ids: list[int]):
    with torch.no_grad():
        output = target.model(torch.tensor([token_ids]), output_hidden_states=True)
    return output.logits[0, -1], output.hidden_states


@pytest.mark.parametrize("one_call_keys", [1024, 0])  # the CPU's one-call form, then the two-part one
def test_tree_logits_and_features_equal_plain_forward_of_each_root_path(monkeypatch, one_call_keys):
    from caddtree.models import tree_attention

    monkeypatch.setattr(tree_attention, "ONE_CALL_KEYS", one_call_keys)
    for arch in ("llama", "qwen3"):
        target = tiny_target(arch, vocab_size=32, seed=11)
        feature_layers = [0, 2]  # hidden_states of the last layer are after the final norm in HF
        runner = TargetRunner(target, feature_layers)
        prompt = torch.tensor([5, 9, 2, 7, 7, 3])
        runner.prefill(prompt)
        log_probs = torch.log_softmax(2 * torch.randn(6, 32, generator=torch.Generator().manual_seed(3)), -1)
        tree = tree_from_ranked(rank_nodes(log_probs, 40), 40)
        root = torch.tensor(4)
        tokens = torch.cat([root[None], tree.tokens])
        depths = torch.cat([torch.zeros(1, dtype=torch.long), tree.depths])
        logits, features = runner.verify(tokens, depths, tree.ancestor_mask)
        for position in range(len(tokens)):
            path = tree.ancestor_mask[position].nonzero().squeeze(-1)
            expected_logits, hidden_states = plain_forward(target, prompt.tolist() + tokens[path].tolist())
            torch.testing.assert_close(logits[position], expected_logits, atol=1e-4, rtol=1e-4)
            expected_features = torch.cat([hidden_states[j + 1][0, -1] for j in feature_layers])
            torch.testing.assert_close(features[position], expected_features, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kept_nodes", ["deepest path", "root alone", "nothing"])
def test_cache_after_keep_equals_cache_of_the_accepted_sequence(kept_nodes):
    target = tiny_target("llama", vocab_size=32, seed=12)
    runner = TargetRunner(target, [])
    prompt = torch.tensor([5, 9, 2])
    runner.prefill(prompt)
    log_probs = torch.log_softmax(2 * torch.randn(4, 32, generator=torch.Generator().manual_seed(4)), -1)
    tree = tree_from_ranked(rank_nodes(log_probs, 25), 25)
    deepest = int(tree.depths.argmax()) + 1
    kept = {"deepest path": tree.ancestor_mask[deepest].nonzero().squeeze(-1),
            "root alone": torch.tensor([0]), "nothing": torch.zeros(0, dtype=torch.long)}[kept_nodes]
    tokens = torch.cat([torch.tensor([6]), tree.tokens])
    runner.verify(tokens, torch.cat([torch.zeros(1, dtype=torch.long), tree.depths]), tree.ancestor_mask)
    runner.keep(kept)
    assert runner.context_len == len(prompt) + len(kept)
    next_token = torch.tensor([8])
    logits, _ = runner.verify(next_token, torch.zeros(1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool))
    expected, _ = plain_forward(target, prompt.tolist() + tokens[kept].tolist() + [8])
    torch.testing.assert_close(logits[0], expected, atol=1e-4, rtol=1e-4)


def test_accepted_path_follows_target_choices():
    log_probs = torch.log_softmax(torch.randn(5, 6, generator=torch.Generator().manual_seed(0)), -1)
    tree = tree_from_ranked(rank_nodes(log_probs, 60), 60)
    generator = torch.Generator().manual_seed(1)
    for _ in range(50):
        choices = torch.randint(0, 6, (tree.size + 1,), generator=generator)
        # reference: the node-by-node walk
        position, expected = 0, [0]
        while True:
            children = ((tree.parents == position) & (tree.tokens == choices[position])).nonzero()
            if len(children) == 0:
                break
            position = int(children[0]) + 1
            expected.append(position)
        accepted = accepted_path(tree, choices, max_length=6)
        assert accepted.positions[: int(accepted.length)].tolist() == expected
        assert int(accepted.next_token) == int(choices[expected[-1]])
