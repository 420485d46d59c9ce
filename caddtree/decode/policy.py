"""Round policies: how the proposals (drafter marginals, context lookups) and the cost model
become this round's tree.

The decoding loop only calls `reset`, `should_draft`, `build` and `observe`; it does not know
which policy runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from caddtree.cost.model import CostModel
from caddtree.decode.proposals import Proposals
from caddtree.errors import CaddtreeError
from caddtree.tree.budget import exact_budget, greedy_budget, throughput
from caddtree.tree.build import RankedNodes, tree_from_ranked
from caddtree.tree.calibration import AcceptanceCalibration, bucket_sums
from caddtree.tree.draft_tree import DraftTree
from caddtree.tree.merge import live_count, merge_ranked

METHODS = ("ar", "dflash", "ddtree", "caddtree", "lookup")
COST_AWARE_METHODS = ("caddtree", "lookup")  # the methods that need a cost model
RULES = ("greedy", "exact")


class Policy:
    """What every policy shares: no state between rounds unless it needs some."""

    uses_drafter = False
    uses_lookup = False  # whether the round offers it continuations found in the context

    def reset(self) -> None:
        """Called before each generation."""

    def observe(self, accepted_ranks: list[int]) -> None:
        """Called after each round with the drafter ranks of the accepted nodes it proposed (see
        DraftTree.drafter_ranks; empty where the tree does not track them)."""

    def should_draft(self) -> bool:
        """Asked before each round of a drafting policy: is the drafter worth running?"""
        return True

    def largest_tree(self, draft_len: int) -> int:
        """The most nodes a round may verify, for drafts of `draft_len` positions."""
        return draft_len


class Autoregressive(Policy):
    """Plain decoding: no drafter, one target token per round."""

    name = "ar"

    def largest_tree(self, draft_len: int) -> int:
        return 0

    def build(self, proposals: Proposals, context_len: int) -> DraftTree:
        raise AssertionError("autoregressive decoding builds no tree")


class DFlashChain(Policy):
    """The drafter's argmax at every position, verified as a chain."""

    name = "dflash"
    uses_drafter = True

    def build(self, proposals, context_len):
        return proposals.drafter_chain()


@dataclass
class FixedBudget(Policy):
    """DDTree: the `budget` heaviest nodes, best-first."""

    budget: int
    name = "ddtree"
    uses_drafter = True

    def largest_tree(self, draft_len: int) -> int:
        return self.budget

    def build(self, proposals, context_len):
        ranked = proposals.drafter_ranked(self.budget)
        return tree_from_ranked(ranked, ranked.size)


@dataclass
class DraftSkipping:
    """Rounds without the drafter while it does not pay for itself (beyond the CaDDTree paper).

    Even the best tree costs the draft pass; when the best tree's expected tokens per second has
    been below a plain decoding step's for `patience` drafted rounds in a row, the next rounds
    skip the drafter and decode one token each. The drafter is tried again after 1, 2, 4, ...
    skipped rounds (at most `max_skip`), and the wait starts over as soon as drafting pays. One
    uncertain round says little about the next: skipping after every such round cost the trained
    default drafter 3-4% of its speed-up on the benchmark's prompts (docs/results.md).
    """

    max_skip: int = 32
    patience: int = 3
    wait: int = 1
    left: int = 0
    misses: int = 0  # drafted rounds in a row that did not pay

    def should_draft(self) -> bool:
        if self.left:
            self.left -= 1
            return False
        return True

    def record(self, drafting_paid: bool) -> None:
        self.misses = 0 if drafting_paid else self.misses + 1
        if drafting_paid:
            self.wait = 1
        elif self.misses >= self.patience:
            self.left, self.wait = self.wait, min(2 * self.wait, self.max_skip)


@dataclass
class CostAware(Policy):
    """CaDDTree: the budget that maximises expected tokens per second this round.

    Its nodes are the drafter's (`uses_drafter`), continuations found in the context
    (`uses_lookup`), or both merged into one best-first list; the `lookup` method is this policy
    without a drafter, whose rounds then cost no draft pass. With `calibrate`, the drafter's node
    weights are scaled by the acceptance measured at their ranks in the previous rounds (see
    caddtree.tree.calibration; lookups keep their own statistics) and the drafter is skipped while
    it does not pay (DraftSkipping); without it, the paper's rule as stated.
    """

    cost_model: CostModel
    rule: str = "exact"
    max_nodes: int = 1024
    calibrate: bool = True
    uses_drafter: bool = True
    uses_lookup: bool = True
    calibration: AcceptanceCalibration = field(default_factory=AcceptanceCalibration)
    _promised: list[float] | None = field(default=None, init=False, repr=False)  # the drafter's Φ in this round's tree, per rank bucket
    _skip: DraftSkipping = field(default_factory=DraftSkipping, init=False, repr=False)

    @property
    def name(self) -> str:
        return "caddtree" if self.uses_drafter else "lookup"

    def reset(self) -> None:
        self.calibration.reset()
        self._skip = DraftSkipping()
        self._promised = None

    def should_draft(self) -> bool:
        return self._skip.should_draft() if self.calibrate else True  # uncalibrated: the paper's rule

    def largest_tree(self, draft_len: int) -> int:
        return self.max_nodes

    @property
    def convex(self) -> bool:
        """The greedy rule reads the convex fit of the cost curve; the exact rule the monotone one."""
        return self.rule == "greedy"

    def build(self, proposals, context_len):
        lookup = proposals.lookup if self.uses_lookup else None
        ranked, drafter_gains, drafter_ranks = self._ranked(proposals.drafter_ranked if proposals.drafted else None, lookup)
        gains = ranked.log_weights.double().exp()
        round_costs = self.cost_model.round_costs(ranked.size, context_len, self.convex, gains.device, proposals.drafted)
        tokens_per_second = throughput(gains, round_costs)
        budget = torch.minimum(self._choose(tokens_per_second), live_count(ranked))
        reads = [budget.to(gains.dtype)[None], tokens_per_second[budget][None]]
        if proposals.drafted:
            reads += [self._rate_without_drafter(lookup, context_len, gains.device)[None],
                      self._promise(budget, drafter_ranks, drafter_gains)]
        # One host read: the budget, the rates with and without the drafter, and its promise.
        budget, rate, *drafter_reads = torch.cat(reads).tolist()
        if proposals.drafted:
            rate_without_drafter, *self._promised = drafter_reads
            self._skip.record(drafting_paid=rate >= rate_without_drafter)
        return tree_from_ranked(ranked, int(budget), drafter_ranks)

    @staticmethod
    def _promise(budget: torch.Tensor, drafter_ranks: torch.Tensor, drafter_gains: torch.Tensor) -> torch.Tensor:
        """(NUM_BUCKETS,) the drafter's Φ among the first `budget` nodes per rank bucket, unscaled,
        as the surrogate said."""
        in_tree = (torch.arange(drafter_ranks.shape[0], device=budget.device) < budget) & (drafter_ranks >= 0)
        return bucket_sums(drafter_ranks.clamp(min=0), torch.where(in_tree, drafter_gains, 0.0))

    def _choose(self, tokens_per_second: torch.Tensor) -> torch.Tensor:
        return greedy_budget(tokens_per_second) if self.convex else exact_budget(tokens_per_second)

    def _ranked(self, drafter_ranked, lookup: RankedNodes | None) -> tuple[RankedNodes, torch.Tensor, torch.Tensor]:
        """This round's best-first nodes; the drafter's own, unscaled weight of each (0 where it
        did not propose it); and each node's rank in the drafter's list (-1: lookup only).
        `drafter_ranked(n)` gives the drafter's n best, if it ran."""
        if drafter_ranked is None:
            ranked = lookup.first(self.max_nodes)
            no_gains = ranked.log_weights.new_zeros(ranked.size, dtype=torch.float64)
            return ranked, no_gains, torch.full_like(ranked.tokens, -1)
        drafted = drafter_ranked(self.max_nodes)
        drafter_gains = drafted.log_weights.double().exp()
        ranks = torch.arange(drafted.size, device=drafted.tokens.device)
        if self.calibrate:
            scales = self.calibration.scales(ranks).log().to(drafted.log_weights.dtype)
            drafted = replace(drafted, log_weights=drafted.log_weights + scales)
        if lookup is None:
            return drafted, drafter_gains, ranks
        merged, drafter_ranks = merge_ranked(drafted, lookup, self.max_nodes)
        drafter_gains = torch.where(drafter_ranks >= 0, drafter_gains[drafter_ranks.clamp(min=0)], 0.0)
        return merged, drafter_gains, drafter_ranks

    def _rate_without_drafter(self, lookup: RankedNodes | None, context_len: int, device: torch.device) -> torch.Tensor:
        """0-d, on `device`: the expected tokens per second of this round's pick, had the drafter not run."""
        if lookup is None:  # a fill, not a copy from the host, which would wait for the device
            plain_rate = 1 / self.cost_model.plain_step_seconds(context_len, self.convex)
            return torch.full((), plain_rate, dtype=torch.float64, device=device)
        lookup = lookup.first(self.max_nodes)
        costs = self.cost_model.round_costs(lookup.size, context_len, self.convex, device, drafted=False)
        rates = throughput(lookup.log_weights.double().exp(), costs)
        return rates[self._choose(rates)]

    def observe(self, accepted_ranks: list[int]) -> None:
        if self._promised is not None:  # rounds without a draft teach the calibration nothing
            self.calibration.observe(self._promised, accepted_ranks)
        self._promised = None


def check_policy_arguments(method: str, budget: int | None = None, rule: str = "exact", lookup: bool = True,
                           calibrate: bool = True) -> None:
    """Reject a user's bad method, budget or rule before any work is done."""
    if method not in METHODS:
        raise CaddtreeError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if budget is not None and budget < 0:
        raise CaddtreeError(f"the budget must be >= 0, got {budget}")
    if budget is not None and method in ("ar", "dflash"):
        raise CaddtreeError(f"--budget sizes the trees of ddtree, caddtree and lookup; method {method!r} builds none")
    if rule not in RULES:
        raise CaddtreeError(f"unknown budget rule {rule!r}; choose greedy or exact")
    if not lookup and method != "caddtree":
        raise CaddtreeError(f"--no-lookup applies to caddtree only, not to method {method!r}")
    if not calibrate and method != "caddtree":  # calibration weighs the drafter's nodes
        raise CaddtreeError(f"--uncalibrated applies to caddtree only, not to method {method!r}")


def make_policy(method: str, budget: int | None = None, rule: str = "exact",
                cost_model: CostModel | None = None, calibrate: bool = True, lookup: bool = True):
    """The policy for a method. For caddtree and lookup, `budget` caps the tree (default: the
    largest profiled size); for ddtree it is the fixed size (default 64). `lookup` lets caddtree
    add continuations found in the context to the drafter's tree."""
    check_policy_arguments(method, budget, rule, lookup, calibrate)
    if method == "ar":
        return Autoregressive()
    if method == "dflash":
        return DFlashChain()
    if method == "ddtree":
        return FixedBudget(64 if budget is None else budget)
    if cost_model is None:
        raise CaddtreeError(f"{method} needs a cost model (--cost-model FILE or auto)")
    largest_profiled = int(max(cost_model.measurements["sizes"]))
    max_nodes = largest_profiled if budget is None else budget
    if method == "lookup":
        return CostAware(cost_model, rule, max_nodes, calibrate, uses_drafter=False)
    return CostAware(cost_model, rule, max_nodes, calibrate, uses_lookup=lookup)
