"""The acceptance walk: follow the target's own choices down the draft tree."""

from __future__ import annotations

import torch

from caddtree.tree.draft_tree import DraftTree


def accepted_path(tree: DraftTree, choices: torch.Tensor) -> torch.Tensor:
    """Tree positions (root first) of the path the target's choices (n+1,) walk down.

    A node is reached when its token is the target's choice at its parent and its parent is
    reached. Siblings carry distinct tokens, so reached nodes form one path; computed for all
    nodes at once through the ancestor mask instead of stepping node by node.
    """
    node_matches = tree.tokens == choices[tree.parents]  # (n,)
    matches = torch.cat([node_matches.new_ones(1), node_matches])  # root always "matches"
    reached = ~(tree.ancestor_mask & ~matches).any(dim=-1)  # (n+1,)
    depths = torch.cat([tree.depths.new_zeros(1), tree.depths])
    deepest = torch.where(reached, depths, -1).argmax()
    return tree.ancestor_mask[deepest].nonzero().squeeze(-1)
