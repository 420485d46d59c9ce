"""Round policies: how the drafter's marginals (and the cost model) become this round's tree.

The decoding loop only calls `reset`, `build` and `observe`; it does not know which policy runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from caddtree.cost.model import CostModel
from caddtree.errors import CaddtreeError
from caddtree.tree.budget import exact_budget, greedy_budget, throughput
from caddtree.tree.build import chain_tree, rank_nodes, tree_from_ranked
from caddtree.tree.calibration import AcceptanceCalibration
from caddtree.tree.draft_tree import DraftTree

METHODS = ("ar", "dflash", "ddtree", "caddtree")
RULES = ("greedy", "exact")


class Policy:
    """What every policy shares: no state between rounds unless it needs some."""

    def reset(self) -> None:
        """Called before each generation."""

    def observe(self, accepted_nodes: int) -> None:
        """Called after each round with how many draft nodes the target accepted."""

    def should_draft(self) -> bool:
        """Asked before each round of a drafting policy: is the drafter worth running?"""
        return True

    def largest_tree(self, draft_len: int) -> int:
        """The most nodes a round may verify, for drafts of `draft_len` positions."""
        return draft_len


class Autoregressive(Policy):
    """Plain decoding: no drafter, one target token per round."""

    name = "ar"
    uses_drafter = False

    def largest_tree(self, draft_len: int) -> int:
        return 0

    def build(self, log_probs: torch.Tensor, context_len: int) -> DraftTree:
        raise AssertionError("autoregressive decoding builds no tree")


class DFlashChain(Policy):
    """The drafter's argmax at every position, verified as a chain."""

    name = "dflash"
    uses_drafter = True

    def build(self, log_probs, context_len):
        return chain_tree(log_probs)


@dataclass
class FixedBudget(Policy):
    """DDTree: the `budget` heaviest nodes, best-first."""

    budget: int
    name = "ddtree"
    uses_drafter = True

    def largest_tree(self, draft_len: int) -> int:
        return self.budget

    def build(self, log_probs, context_len):
        ranked = rank_nodes(log_probs, self.budget)
        return tree_from_ranked(ranked, ranked.size)


@dataclass
class DraftSkipping:
    """Rounds without the drafter while it does not pay for itself (beyond the CaDDTree paper).

    Even the best tree costs the draft pass; when the best tree's expected tokens per second is
    below a plain decoding step's, the next rounds skip the drafter and decode one token each.
    The drafter is tried again after 1, 2, 4, ... skipped rounds (at most `max_skip`), and the
    wait starts over as soon as drafting pays.
    """

    max_skip: int = 32
    wait: int = 1
    left: int = 0

    def should_draft(self) -> bool:
        if self.left:
            self.left -= 1
            return False
        return True

    def record(self, drafting_paid: bool) -> None:
        if drafting_paid:
            self.wait = 1
        else:
            self.left, self.wait = self.wait, min(2 * self.wait, self.max_skip)


@dataclass
class CostAware(Policy):
    """CaDDTree: the budget that maximises expected tokens per second this round.

    With `calibrate`, the surrogate's expected acceptance is scaled by the acceptance measured in
    the previous rounds (see caddtree.tree.calibration) and the drafter is skipped while it does
    not pay (DraftSkipping); without it, the paper's rule as stated.
    """

    cost_model: CostModel
    rule: str = "exact"
    max_nodes: int = 1024
    calibrate: bool = True
    calibration: AcceptanceCalibration = field(default_factory=AcceptanceCalibration)
    _promised: float | None = field(default=None, init=False, repr=False)  # Φ of this round's tree, if drafted
    _skip: DraftSkipping = field(default_factory=DraftSkipping, init=False, repr=False)
    name = "caddtree"
    uses_drafter = True

    def reset(self) -> None:
        self.calibration.reset()
        self._skip = DraftSkipping()
        self._promised = None

    def should_draft(self) -> bool:
        return self._skip.should_draft() if self.calibrate else True  # uncalibrated: the paper's rule

    def largest_tree(self, draft_len: int) -> int:
        return self.max_nodes

    def build(self, log_probs, context_len):
        ranked = rank_nodes(log_probs, self.max_nodes)
        gains = ranked.log_weights.double().exp()
        convex = self.rule == "greedy"
        round_costs = self.cost_model.round_costs(ranked.size, context_len, convex, gains.device)
        scale = self.calibration.ratio if self.calibrate else 1.0
        choose = greedy_budget if convex else exact_budget
        tokens_per_second = throughput(gains * scale, round_costs)
        budget = choose(tokens_per_second)
        phi = torch.cat([gains.new_zeros(1), gains.cumsum(0)])  # unscaled: what the surrogate promised
        # One host read: the budget, its promised Φ and its expected tokens per second.
        budget, self._promised, rate = torch.stack([budget.to(phi.dtype), phi[budget], tokens_per_second[budget]]).tolist()
        plain_rate = 1 / self.cost_model.plain_step_seconds(context_len, convex)
        self._skip.record(drafting_paid=rate >= plain_rate)
        return tree_from_ranked(ranked, int(budget))

    def observe(self, accepted_nodes: int) -> None:
        if self._promised is not None:  # rounds without a draft teach the calibration nothing
            self.calibration.observe(self._promised, accepted_nodes)
        self._promised = None


def check_policy_arguments(method: str, budget: int | None = None, rule: str = "exact") -> None:
    """Reject a user's bad method, budget or rule before any work is done."""
    if method not in METHODS:
        raise CaddtreeError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if budget is not None and budget < 0:
        raise CaddtreeError(f"the budget must be >= 0, got {budget}")
    if rule not in RULES:
        raise CaddtreeError(f"unknown budget rule {rule!r}; choose greedy or exact")


def make_policy(method: str, budget: int | None = None, rule: str = "exact",
                cost_model: CostModel | None = None, calibrate: bool = True):
    """The policy for a method. For caddtree, `budget` caps the tree (default: the largest
    profiled size); for ddtree it is the fixed size (default 64)."""
    check_policy_arguments(method, budget, rule)
    if method == "ar":
        return Autoregressive()
    if method == "dflash":
        return DFlashChain()
    if method == "ddtree":
        return FixedBudget(64 if budget is None else budget)
    if cost_model is None:
        raise CaddtreeError("caddtree needs a cost model (--cost-model FILE or auto)")
    largest_profiled = int(max(cost_model.measurements["sizes"]))
    return CostAware(cost_model, rule, largest_profiled if budget is None else budget, calibrate)
