"""Best-first draft trees from the drafter's per-depth marginals (DDTree surrogate).

A node is a path of tokens (t_1..t_d) below the root; its weight is prod_i p_i(t_i). Because the
marginals are independent across depth, a child never outweighs its parent and a lower-ranked
sibling never outweighs a higher-ranked one, so the n heaviest nodes form a prefix-closed tree.
"""

import functools
import itertools
from dataclasses import dataclass
from typing import NamedTuple

import torch

from caddtree.tree.draft_tree import DraftTree, ancestor_mask_from_parents


@dataclass(frozen=True)
class RankedNodes:
    """The heaviest nodes, best-first: every prefix of this list is a prefix-closed tree."""

    tokens: torch.Tensor  # (N,) long
    parents: torch.Tensor  # (N,) long, index into this list, -1 = child of the root; parents[k] < k
    depths: torch.Tensor  # (N,) long, >= 1
    log_weights: torch.Tensor  # (N,) float, non-increasing
    num_depths: int  # D: no node is deeper

    @property
    def size(self) -> int:
        return self.tokens.shape[0]

    def first(self, n: int) -> "RankedNodes":
        """The n best nodes: a tree, like every prefix of the list."""
        return RankedNodes(self.tokens[:n], self.parents[:n], self.depths[:n], self.log_weights[:n], self.num_depths)


class _DepthRanking(NamedTuple):
    """The heaviest paths of one depth, best-first."""

    log_weights: torch.Tensor  # (m,)
    tokens: torch.Tensor  # (m,) last token of each path
    parent_ranks: torch.Tensor  # (m,) rank of the prefix within the previous depth, -1 at depth 1


def rank_nodes(log_probs: torch.Tensor, max_nodes: int) -> RankedNodes:
    """The max_nodes heaviest nodes (or all there are), best-first, from log_probs (D, V)."""
    num_depths, vocab_size = log_probs.shape
    # Sums over up to D depths lose too much precision in half types.
    weight_dtype = torch.promote_types(log_probs.dtype, torch.float32)
    if max_nodes == 0 or num_depths == 0:
        no_nodes = torch.zeros(0, dtype=torch.long, device=log_probs.device)
        return RankedNodes(no_nodes, no_nodes, no_nodes, log_probs.new_zeros(0, dtype=weight_dtype), num_depths)
    # A top-N path uses only top-N tokens at every depth.
    token_log_probs, token_ids = torch.topk(log_probs, min(max_nodes, vocab_size), dim=1)  # (D, k)
    depth_rankings = _rank_each_depth(token_log_probs.to(weight_dtype), token_ids, max_nodes)
    return _merge_depths(depth_rankings, max_nodes)


def _rank_each_depth(
    token_log_probs: torch.Tensor, token_ids: torch.Tensor, max_nodes: int
) -> list[_DepthRanking]:
    """Per depth, its max_nodes heaviest paths. token_log_probs, token_ids: (D, k), rows best-first.

    The top paths of depth d extend top paths of depth d-1 (weights factor over depths), so each
    depth only looks at children of the previous depth's list.
    """
    num_depths, num_tokens = token_ids.shape
    # k <= max_nodes, so every depth-1 path is kept.
    rankings = [_DepthRanking(token_log_probs[0], token_ids[0], torch.full_like(token_ids[0], -1))]
    for depth_index in range(1, num_depths):
        previous = rankings[-1]
        num_parents = previous.log_weights.shape[0]
        parent_ranks, token_ranks = _candidate_pairs(
            max_nodes, num_parents, num_tokens, token_ids.device
        )  # (c,), (c,)
        candidate_log_weights = (
            previous.log_weights[parent_ranks] + token_log_probs[depth_index, token_ranks]
        )  # (c,)
        num_kept = min(max_nodes, num_parents * num_tokens)
        log_weights, best = torch.topk(candidate_log_weights, num_kept)
        tokens = token_ids[depth_index, token_ranks[best]]
        rankings.append(_DepthRanking(log_weights, tokens, parent_ranks[best]))
    return rankings


@functools.lru_cache(maxsize=64)
def _candidate_pairs(
    max_nodes: int, num_parents: int, num_tokens: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based (parent rank, token rank) pairs that can reach the top max_nodes of their depth.

    The pair with 1-based ranks (i, r) is outweighed-or-equalled by every pair (i' <= i, r' <= r),
    i*r pairs in all, so only pairs with i*r <= max_nodes qualify: about N ln N of the N*N.
    Returns two (c,) long tensors; cached, so callers must not modify them.
    """
    parent_numbers = torch.arange(1, num_parents + 1)  # (num_parents,) 1-based ranks
    tokens_per_parent = (max_nodes // parent_numbers).clamp(max=num_tokens)  # (num_parents,)
    parent_ranks = torch.repeat_interleave(parent_numbers - 1, tokens_per_parent)  # (c,)
    first_pair_of_parent = torch.cumsum(tokens_per_parent, 0) - tokens_per_parent
    token_ranks = torch.arange(parent_ranks.shape[0]) - first_pair_of_parent[parent_ranks]  # (c,)
    return parent_ranks.to(device), token_ranks.to(device)


def _merge_depths(rankings: list[_DepthRanking], max_nodes: int) -> RankedNodes:
    """The global top max_nodes over all depths' lists, best-first and prefix-closed.

    Ties are broken by (depth, rank within depth): a stable sort of the depth-major concatenation.
    A parent weighs at least as much as its child and sits at a smaller depth, so it always sorts
    first, which keeps every prefix prefix-closed.
    """
    device = rankings[0].tokens.device
    depth_starts = list(itertools.accumulate((r.tokens.shape[0] for r in rankings), initial=0))
    # Parents as indices into the concatenation: the previous depth's start plus the parent's rank.
    concat_parents = torch.cat(
        [rankings[0].parent_ranks]
        + [ranking.parent_ranks + start for ranking, start in zip(rankings[1:], depth_starts)]
    )  # (total,)
    concat_log_weights = torch.cat([ranking.log_weights for ranking in rankings])  # (total,)
    concat_tokens = torch.cat([ranking.tokens for ranking in rankings])  # (total,)
    concat_depths = torch.cat(
        [torch.full_like(ranking.tokens, depth) for depth, ranking in enumerate(rankings, 1)]
    )  # (total,)

    order = torch.sort(concat_log_weights, descending=True, stable=True).indices[:max_nodes]
    rank_of_concat = torch.full_like(concat_parents, -1)
    rank_of_concat[order] = torch.arange(order.shape[0], device=device)
    parents_in_concat = concat_parents[order]
    parents = torch.where(
        parents_in_concat >= 0, rank_of_concat[parents_in_concat.clamp(min=0)], -1
    )
    return RankedNodes(
        concat_tokens[order], parents, concat_depths[order], concat_log_weights[order], len(rankings)
    )


def tree_from_ranked(ranked: RankedNodes, n: int, drafter_ranks: torch.Tensor | None = None) -> DraftTree:
    """The draft tree of the first n ranked nodes, reordered depth-major; `drafter_ranks` (N,), if
    given, is each ranked node's rank in the drafter's own list (see DraftTree)."""
    if n > ranked.size:
        raise ValueError(f"asked for {n} nodes but only {ranked.size} are ranked")
    # Stable, so nodes of one depth stay best-first.
    ranked_index = torch.sort(ranked.depths[:n], stable=True).indices  # (n,) ranked node per slot
    tree_position = torch.empty_like(ranked_index)  # (n,) tree position of each ranked node
    tree_position[ranked_index] = torch.arange(1, n + 1, device=ranked_index.device)
    ranked_parents = ranked.parents[ranked_index]  # (n,)
    parents = torch.where(ranked_parents >= 0, tree_position[ranked_parents.clamp(min=0)], 0)
    depths = ranked.depths[ranked_index]
    return DraftTree(
        ranked.tokens[ranked_index], parents, depths, ancestor_mask_from_parents(parents, ranked.num_depths),
        None if drafter_ranks is None else drafter_ranks[ranked_index],
    )


def chain_tree(log_probs: torch.Tensor) -> DraftTree:
    """The DFlash baseline: the argmax token at every depth, as a chain of D nodes."""
    num_depths = log_probs.shape[0]
    positions = torch.arange(num_depths + 1, device=log_probs.device)  # root, then depth 1..D
    # In a chain every earlier position is an ancestor: the lower triangle.
    ancestor_mask = positions[:, None] >= positions[None, :]  # (D+1, D+1)
    return DraftTree(log_probs.argmax(dim=1), positions[:-1], positions[1:], ancestor_mask)
