"""The draft tree that the target verifies: nodes below a root, stored depth-major."""

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class DraftTree:
    """A draft tree of n nodes below the root (the last accepted token).

    Tree positions: 0 is the root, k >= 1 is node k-1 of the tensors below. Nodes are depth-major,
    so every parent comes before its children.
    """

    tokens: torch.Tensor  # (n,) long, the token each node proposes
    parents: torch.Tensor  # (n,) long, tree position of each node's parent (0 = root)
    depths: torch.Tensor  # (n,) long, >= 1 (the root has depth 0)
    ancestor_mask: torch.Tensor  # (n+1, n+1) bool, [i, j] = position j is i or an ancestor of i
    # (n,) long: each node's rank in the drafter's best-first list, -1 where only another proposer
    # offered it (None: not tracked; no policy that builds such a tree learns from the ranks)
    drafter_ranks: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.tokens.shape[0]

    def with_root(self, root: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens and depths (n+1,) of every tree position, root first: what the target verifies."""
        return torch.cat([root[None], self.tokens]), torch.cat([self.depths.new_zeros(1), self.depths])

    def with_tokens(self, tokens: torch.Tensor) -> "DraftTree":
        """The same tree shape proposing `tokens` (n,) instead."""
        return replace(self, tokens=tokens)

    @staticmethod
    def empty(device: torch.device | str) -> "DraftTree":
        no_nodes = torch.zeros(0, dtype=torch.long, device=device)
        root_sees_itself = torch.ones(1, 1, dtype=torch.bool, device=device)
        return DraftTree(no_nodes, no_nodes, no_nodes, root_sees_itself)


def ancestor_mask_from_parents(parents: torch.Tensor, max_depth: int) -> torch.Tensor:
    """(n+1, n+1) bool over [root, nodes...]: [i, j] = j is i itself or an ancestor of i.

    Walks every node up one level per step, all nodes at once, `max_depth` (>= the deepest node's
    depth) times: a bound the caller knows, so the host never waits to read the actual depth.
    """
    num_positions = parents.shape[0] + 1
    # The root is its own parent, so walks that reach it stay there.
    parent_of_position = torch.cat([parents.new_zeros(1), parents])  # (n+1,)
    ancestors = ancestor_walk(parent_of_position, max_depth)  # (n+1, max_depth+1)
    mask = torch.zeros(num_positions, num_positions, dtype=torch.bool, device=parents.device)
    return mask.scatter_(1, ancestors, True)


def ancestor_walk(parents: torch.Tensor, steps: int) -> torch.Tensor:
    """(n, steps+1) long: each of n nodes, then its parent, grandparent, ..., `steps` levels up, all
    nodes at once. `parents` (n,) must make the root its own parent, so walks that reach it stay."""
    walk = [torch.arange(parents.shape[0], device=parents.device)]
    for _ in range(steps):
        walk.append(parents[walk[-1]])
    return torch.stack(walk, dim=1)
