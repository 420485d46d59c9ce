"""Correcting the tree surrogate with the acceptance actually seen (beyond the CaDDTree paper).

Φ(n) assumes the drafter's marginals are calibrated. An over-confident drafter (an untrained one
puts nearly all mass on one wrong token) makes Φ promise many accepted nodes that never come, and
the budget rule then buys large trees for nothing. We keep a decaying ratio of accepted nodes to
the Φ that was promised, and scale the gains by it: the ranking of nodes is unchanged, only how
many are worth verifying.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class AcceptanceCalibration:
    decay: float = 0.9  # weight of the past per round: about the last ten rounds count
    prior_rounds: float = 1.0  # pseudo-rounds at ratio 1, so the first rounds trust the drafter
    accepted: float = 0.0
    promised: float = 0.0

    def reset(self) -> None:
        self.accepted = self.promised = 0.0

    @property
    def ratio(self) -> float:
        """Accepted nodes per node the surrogate promised (1 = calibrated)."""
        return (self.accepted + self.prior_rounds) / (self.promised + self.prior_rounds)

    def observe(self, promised: float, accepted: int) -> None:
        self.accepted = self.decay * self.accepted + accepted
        self.promised = self.decay * self.promised + promised
