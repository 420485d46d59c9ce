"""How the target picks its token at a tree position: argmax, or a draw from its distribution."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from caddtree.errors import CaddtreeError

SEEDS = range(-(2**63), 2**64)  # what torch's generators take


def check_seed(seed: int) -> None:
    if seed not in SEEDS:
        raise CaddtreeError(f"the seed must lie in [-2**63, 2**64), got {seed}")


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise CaddtreeError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise CaddtreeError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise CaddtreeError(f"top-k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(m, V) logits -> (m, V) the target's sampling distribution after temperature/top-k/top-p."""
        logits = logits.float() / self.temperature
        if self.top_k:
            kth = torch.topk(logits, min(self.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if self.top_p < 1:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            # keep the smallest prefix whose mass reaches top_p (the first token always stays)
            drop_sorted = sorted_probs.cumsum(-1) - sorted_probs >= self.top_p
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            probs = probs.masked_fill(drop, 0.0)
            probs = probs / probs.sum(-1, keepdim=True)
        return probs

    def choose(self, logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """One token per row of logits (m, V): the target's own choice at each position."""
        if self.greedy:
            return logits.argmax(dim=-1)
        return torch.multinomial(self.probabilities(logits), 1, generator=generator).squeeze(-1)
