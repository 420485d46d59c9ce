"""Round policies: how the drafter's marginals (and the cost model) become this round's tree.

The decoding loop only calls `build`; it does not know which policy runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from caddtree.cost.model import CostModel
from caddtree.errors import CaddtreeError
from caddtree.tree.budget import exact_budget, greedy_budget
from caddtree.tree.build import chain_tree, rank_nodes, tree_from_ranked
from caddtree.tree.draft_tree import DraftTree

METHODS = ("ar", "dflash", "ddtree", "caddtree")
RULES = ("greedy", "exact")


class Autoregressive:
    """Plain decoding: no drafter, one target token per round."""

    name = "ar"
    uses_drafter = False

    def build(self, log_probs: torch.Tensor, context_len: int) -> DraftTree:
        raise AssertionError("autoregressive decoding builds no tree")


class DFlashChain:
    """The drafter's argmax at every position, verified as a chain."""

    name = "dflash"
    uses_drafter = True

    def build(self, log_probs, context_len):
        return chain_tree(log_probs)


@dataclass
class FixedBudget:
    """DDTree: the `budget` heaviest nodes, best-first."""

    budget: int
    name = "ddtree"
    uses_drafter = True

    def build(self, log_probs, context_len):
        ranked = rank_nodes(log_probs, self.budget)
        return tree_from_ranked(ranked, ranked.size)


@dataclass
class CostAware:
    """CaDDTree: the budget that maximises expected tokens per second this round."""

    cost_model: CostModel
    rule: str = "exact"
    max_nodes: int = 1024
    name = "caddtree"
    uses_drafter = True

    def build(self, log_probs, context_len):
        ranked = rank_nodes(log_probs, self.max_nodes)
        available = len(ranked.tokens)
        round_costs = self.cost_model.round_costs(available, context_len, convex=self.rule == "greedy")
        gains = ranked.log_weights.double().exp().to(round_costs.device)
        choose = greedy_budget if self.rule == "greedy" else exact_budget
        return tree_from_ranked(ranked, choose(gains, round_costs))


def make_policy(method: str, budget: int | None = None, rule: str = "exact",
                cost_model: CostModel | None = None, max_nodes: int = 1024):
    """The policy for a method name, checking the arguments a user gives."""
    if method not in METHODS:
        raise CaddtreeError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if budget is not None and budget < 0:
        raise CaddtreeError(f"the budget must be >= 0, got {budget}")
    if method == "ar":
        return Autoregressive()
    if method == "dflash":
        return DFlashChain()
    if method == "ddtree":
        return FixedBudget(64 if budget is None else budget)
    if rule not in RULES:
        raise CaddtreeError(f"unknown budget rule {rule!r}; choose greedy or exact")
    if cost_model is None:
        raise CaddtreeError("caddtree needs a cost model (--cost-model FILE or auto)")
    return CostAware(cost_model, rule, max_nodes if budget is None else budget)
