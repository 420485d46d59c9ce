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


def read_path(tree: DraftTree, tree_tokens: torch.Tensor, accepted: AcceptedPath) -> tuple[list[int], list[int]]:
    """The round's one read by the host: the tokens it emits (the path below the root, then the
    target's next choice) and the drafter ranks of the accepted nodes the drafter proposed (empty
    where the tree does not track them)."""
    nodes = accepted.positions[1:]  # the root (always first) is no node
    parts = [accepted.length[None], tree_tokens[nodes], accepted.next_token[None]]
    if tree.drafter_ranks is not None:
        parts.append(tree.drafter_ranks[nodes - 1])
    length, *values = torch.cat(parts).tolist()
    count = nodes.shape[0]
    path_tokens, next_token, ranks = values[: length - 1], values[count], values[count + 1:]
    return path_tokens + [next_token], [rank for rank in ranks[: length - 1] if rank >= 0]
