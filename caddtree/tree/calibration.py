"""Correcting the tree surrogate with the acceptance actually seen, rank by rank (beyond the
CaDDTree paper).

Φ(n) assumes the drafter's marginals are calibrated. They are not, and not alike at every rank:
an untrained drafter puts nearly all its mass on one wrong token, and a trained one is right
about its first nodes but over-promises the later ones, whose marginals at depth d ignore which
token came before (the default pair, accepted ÷ promised: rank 1 0.99, ranks 5–8 0.73, ranks 9–16
≤ 0.46). One ratio for all nodes averages these and buys the later nodes anyway.

So we keep one decaying ratio of accepted nodes to promised Φ per bucket of the drafter's ranks
(1, 2, 3–4, 5–8, ...) and scale each node's gain by its bucket's ratio. A bucket's ratio is
shrunk towards the bucket before it (the first: towards 1) and capped by it: the scales never
grow with rank, so the drafter's scaled list stays best-first and only the number of nodes worth
verifying changes (and, with lookups merged in, where the drafter's nodes fall among them; the
output never changes).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

NUM_BUCKETS = 16  # the last takes every rank from 2^14 on


def rank_buckets(ranks: torch.Tensor) -> torch.Tensor:
    """The bucket of each 0-based rank (long, same shape): 0, 1, then 2 for ranks 2–3, 3 for 4–7, ..."""
    starts = 2 ** torch.arange(NUM_BUCKETS - 1, device=ranks.device)  # where buckets 1, 2, ... start
    return torch.bucketize(ranks, starts, right=True)


def bucket_sums(ranks: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(NUM_BUCKETS,) the sum of `values` over the ranks of each bucket; ranks (n,) >= 0."""
    return values.new_zeros(NUM_BUCKETS).index_add_(0, rank_buckets(ranks), values)


@dataclass
class AcceptanceCalibration:
    decay: float = 0.9  # weight of the past per round: about the last ten rounds count
    prior_promise: float = 1.0  # pseudo-promise at the previous bucket's ratio, so early rounds trust it
    accepted: list[float] = field(default_factory=lambda: [0.0] * NUM_BUCKETS)
    promised: list[float] = field(default_factory=lambda: [0.0] * NUM_BUCKETS)
    _table: torch.Tensor | None = field(default=None, init=False, repr=False)  # ratios() on the device in use

    def __post_init__(self):
        if self.prior_promise <= 0:
            raise ValueError(f"prior_promise must be > 0, got {self.prior_promise}")

    def reset(self) -> None:
        self.accepted = [0.0] * NUM_BUCKETS
        self.promised = [0.0] * NUM_BUCKETS
        self._table = None

    def ratios(self) -> list[float]:
        """Accepted nodes per node the surrogate promised, per bucket (1 = calibrated), non-increasing."""
        ratios, previous = [], 1.0
        for accepted, promised in zip(self.accepted, self.promised):
            ratio = (accepted + self.prior_promise * previous) / (promised + self.prior_promise)
            previous = ratio if not ratios else min(ratio, previous)  # the first bucket may exceed 1
            ratios.append(previous)
        return ratios

    def scales(self, ranks: torch.Tensor) -> torch.Tensor:
        """(n,) float64: the factor for the gain of the drafter's nodes of these 0-based ranks."""
        if self._table is None or self._table.device != ranks.device:
            self._refresh_table(ranks.device)
        return self._table[rank_buckets(ranks)]

    def observe(self, promised: Sequence[float], accepted_ranks: Iterable[int]) -> None:
        """One round: the Φ its tree promised per bucket, and the drafter ranks of its accepted nodes."""
        accepted = [0] * NUM_BUCKETS
        for rank in accepted_ranks:
            accepted[min(rank.bit_length(), NUM_BUCKETS - 1)] += 1
        for bucket, (promise, count) in enumerate(zip(promised, accepted)):
            if promise > 0 or count:  # buckets the tree did not reach keep what they knew
                self.accepted[bucket] = self.decay * self.accepted[bucket] + count
                self.promised[bucket] = self.decay * self.promised[bucket] + promise
        if self._table is not None:  # copied now, after the round's read, not while a draft pass runs
            self._refresh_table(self._table.device)

    def _refresh_table(self, device: torch.device) -> None:
        self._table = torch.tensor(self.ratios(), dtype=torch.float64, device=device)
