"""Both forms of tree attention equal dense attention with the full (context + tree) mask."""

import pytest
import torch
import torch.nn.functional as F

from caddtree.models.tree_attention import _attend, _attend_plain, context_and_tree_attention, masked_tree_attention


def dense_reference(query, key, value, tree_visible, scale):
    """Repeat kv heads, build the full boolean mask, one SDPA call."""
    groups = query.shape[1] // key.shape[1]
    queries, keys = query.shape[-2], key.shape[-2]
    visible = torch.ones(queries, keys, dtype=torch.bool)
    visible[:, keys - queries :] = tree_visible
    return F.scaled_dot_product_attention(query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1),
                                          attn_mask=visible, scale=scale)


def random_tree_visibility(nodes: int, generator) -> torch.Tensor:
    """Ancestor mask of a random tree: node i's parent is a random earlier node."""
    visible = torch.eye(nodes, dtype=torch.bool)
    for i in range(1, nodes):
        parent = int(torch.randint(0, i, (1,), generator=generator))
        visible[i] |= visible[parent]
    return visible


@pytest.mark.parametrize("heads, kv_heads, context, nodes", [(4, 4, 7, 5), (6, 2, 33, 17), (9, 3, 1, 1), (8, 1, 100, 40)])
@pytest.mark.parametrize("form", [context_and_tree_attention, masked_tree_attention])
def test_tree_attention_equals_the_dense_mask(form, heads, kv_heads, context, nodes):
    generator = torch.Generator().manual_seed(heads * 100 + nodes)
    query = torch.randn(1, heads, nodes, 16, generator=generator)
    key = torch.randn(1, kv_heads, context + nodes, 16, generator=generator)
    value = torch.randn(1, kv_heads, context + nodes, 16, generator=generator)
    visible = random_tree_visibility(nodes, generator)
    expected = dense_reference(query, key, value, visible, 0.25)
    torch.testing.assert_close(form(query, key, value, visible, 0.25), expected,
                               atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_fused_and_plain_paths_give_output_and_log_sum_exp(masked):
    generator = torch.Generator().manual_seed(1)
    query, key, value = (torch.randn(1, 2, n, 8, generator=generator) for n in (3, 5, 5))
    visible = (torch.rand(3, 5, generator=generator) < 0.6) | torch.eye(3, 5, dtype=torch.bool) if masked else None
    scores = query @ key.transpose(-1, -2) * 0.5
    if masked:
        scores = scores.masked_fill(~visible, float("-inf"))
    for out, lse in (_attend(query, key, value, 0.5, visible), _attend_plain(query, key, value, 0.5, visible)):
        torch.testing.assert_close(lse, torch.logsumexp(scores, -1))
        torch.testing.assert_close(out, torch.softmax(scores, -1) @ value)
