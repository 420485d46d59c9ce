"""One best-first node list from two proposers' lists (drafter and lookup), on the device.

A node is a path of tokens below the root; a path that both lists hold appears once, with the
larger of its two weights. Within each list a child never outweighs its parent, and the merged
weight of a parent is at least either of its weights, so the merged list, sorted by weight with
ties going to the shallower node, keeps every prefix a tree.
"""

from __future__ import annotations

import torch

from caddtree.tree.build import RankedNodes
from caddtree.tree.draft_tree import ancestor_walk


def node_paths(nodes: RankedNodes, max_depth: int) -> torch.Tensor:
    """(N, max_depth) long: the tokens of each node's path from the root, -1 past its depth."""
    count = nodes.size
    # A sentinel after the last node stands for the root: its own parent, writing -1 to a spare column.
    root = torch.full((1,), count, dtype=torch.long, device=nodes.tokens.device)
    parents = torch.cat([torch.where(nodes.parents < 0, count, nodes.parents), root])
    tokens = torch.cat([nodes.tokens, root.new_full((1,), -1)])
    columns = torch.cat([nodes.depths - 1, root.new_full((1,), max_depth)])
    ancestors = ancestor_walk(parents, max_depth - 1)[:count]  # (N, max_depth): each at its own depth's column
    paths = torch.full((count, max_depth + 1), -1, dtype=torch.long, device=root.device)
    return paths.scatter_(1, columns[ancestors], tokens[ancestors])[:, :max_depth]


def merge_ranked(first: RankedNodes, second: RankedNodes, max_nodes: int) -> tuple[RankedNodes, torch.Tensor]:
    """The union of two best-first lists, best-first, at most max_nodes, and (N,) long: each node's
    index in `first`, -1 for a node that only `second` proposed. Nodes of `second` that `first` also holds stay in the list with
    weight 0 (log -inf) at its end, so that no size depends on data the host has not read:
    a caller choosing a size must stop before them (see `live_count`)."""
    if second.size == 0:  # nothing to compare
        kept = first.first(max_nodes)
        return kept, torch.arange(kept.size, device=kept.tokens.device)
    if first.size == 0:  # a budget of 0 for the drafter, say
        kept = second.first(max_nodes)
        return kept, torch.full_like(kept.tokens, -1)
    depth = max(first.num_depths, second.num_depths)
    same = (node_paths(second, depth)[:, None, :] == node_paths(first, depth)[None, :, :]).all(-1)  # (n2, n1)
    duplicate = same.any(dim=1)  # (n2,)
    twin = same.to(torch.uint8).argmax(dim=1)  # (n2,) the node of `first` with the same path
    minus_inf = torch.tensor(-torch.inf, dtype=first.log_weights.dtype, device=duplicate.device)
    first_weights = first.log_weights.scatter_reduce(
        0, twin, torch.where(duplicate, second.log_weights.to(minus_inf.dtype), minus_inf), "amax")
    second_weights = torch.where(duplicate, minus_inf, second.log_weights.to(minus_inf.dtype))
    # A parent in `second` becomes its twin in `first` when it has one.
    parent = second.parents.clamp(min=0)
    second_parents = torch.where(
        second.parents < 0, -1, torch.where(duplicate[parent], twin[parent], first.size + parent))

    log_weights = torch.cat([first_weights, second_weights])
    depths = torch.cat([first.depths, second.depths])
    by_depth = torch.sort(depths, stable=True).indices
    order = by_depth[torch.sort(log_weights[by_depth], descending=True, stable=True).indices][:max_nodes]
    rank_of = torch.full_like(depths, -1)
    rank_of[order] = torch.arange(order.shape[0], device=order.device)
    parents = torch.cat([first.parents, second_parents])[order]
    first_index = torch.where(order < first.size, order, -1)
    merged = RankedNodes(
        tokens=torch.cat([first.tokens, second.tokens])[order],
        parents=torch.where(parents >= 0, rank_of[parents.clamp(min=0)], -1),
        depths=depths[order],
        log_weights=log_weights[order],
        num_depths=depth,
    )
    return merged, first_index


def live_count(nodes: RankedNodes) -> torch.Tensor:
    """0-d: how many leading nodes have a weight above 0 (a merged list ends in dropped twins)."""
    return torch.isfinite(nodes.log_weights).sum()
