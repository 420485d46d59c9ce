"""What the proposers offer a round: the drafter's marginals, lookups from the context, or both.

Policies turn a Proposals into the round's tree; they do not know how the nodes were found.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from caddtree.tree.build import RankedNodes, chain_tree, rank_nodes
from caddtree.tree.draft_tree import DraftTree


@dataclass(frozen=True)
class Proposals:
    draft_log_probs: torch.Tensor | None  # (D, K) log-marginals over the draft vocabulary, if the drafter ran
    target_tokens: Callable[[torch.Tensor], torch.Tensor] | None  # draft-vocabulary index -> target token id
    lookup: RankedNodes | None  # continuations found in the context, in target token ids

    @property
    def drafted(self) -> bool:
        return self.draft_log_probs is not None

    @property
    def depth(self) -> int:
        """No node is deeper."""
        return max(self.draft_log_probs.shape[0] if self.drafted else 0, self.lookup.num_depths if self.lookup else 0)

    def drafter_ranked(self, max_nodes: int) -> RankedNodes:
        """The drafter's max_nodes heaviest nodes (DDTree), in target token ids."""
        ranked = rank_nodes(self.draft_log_probs, max_nodes)
        return RankedNodes(self.target_tokens(ranked.tokens), ranked.parents, ranked.depths,
                           ranked.log_weights, ranked.num_depths)

    def drafter_chain(self) -> DraftTree:
        """The drafter's argmax chain (DFlash), in target token ids."""
        chain = chain_tree(self.draft_log_probs)
        return chain.with_tokens(self.target_tokens(chain.tokens))
