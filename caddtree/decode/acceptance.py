"""The acceptance walk: follow the target's own choices down the draft tree, on the device."""

from __future__ import annotations

from typing import NamedTuple

import torch

from caddtree.tree.draft_tree import DraftTree


class AcceptedPath(NamedTuple):
    """The accepted path, all on the device: nothing here waits for the host."""

    positions: torch.Tensor  # (m,) tree positions, root first; the first `length` are the path
    length: torch.Tensor  # 0-d: positions on the path, root included (1 = only the root)
    next_token: torch.Tensor  # 0-d: the target's choice after the path's last position


def accepted_path(tree: DraftTree, choices: torch.Tensor, max_length: int) -> AcceptedPath:
    """The path that the target's choices (n+1,) walk down the tree, at most `max_length` long.

    A node is reached when its token is the target's choice at its parent and its parent is
    reached. Siblings carry distinct tokens, so reached nodes form one path; computed for all
    nodes at once through the ancestor mask instead of stepping node by node, and padded to a
    fixed length so that no step needs the path's length on the host.
    """
    node_matches = tree.tokens == choices[tree.parents]  # (n,)
    matches = torch.cat([node_matches.new_ones(1), node_matches])  # root always "matches"
    reached = ~(tree.ancestor_mask & ~matches).any(dim=-1)  # (n+1,)
    depths = torch.cat([tree.depths.new_zeros(1), tree.depths])
    deepest = torch.where(reached, depths, -1).argmax()
    on_path = tree.ancestor_mask[deepest]  # (n+1,)
    # Path positions first, in increasing order (= increasing depth: parents precede children).
    positions = torch.sort((~on_path).to(torch.uint8), stable=True).indices[: min(max_length, len(on_path))]
    return AcceptedPath(positions, on_path.sum(), choices[deepest])
