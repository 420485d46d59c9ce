"""Per-round records and the speed statistics users see."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RoundRecord:
    budget: int  # draft nodes verified this round (0 for ar)
    emitted: int  # tokens this round added to the output (accepted nodes + the target's own)
    context_len: int  # tokens in the target's cache when the round began
    seconds: float  # wall time of the round, up to the host's read of its results
    drafted: bool = False  # whether the drafter ran (caddtree skips it while it does not pay)


@dataclass
class GenerationResult:
    method: str
    prompt_tokens: int
    tokens: list[int]  # new tokens, the first one from prefill included
    text: str = ""
    prefill_seconds: float = 0.0
    rounds: list[RoundRecord] = field(default_factory=list)
    finish_reason: str | None = None  # "eos", "length", or "caller" (on_tokens asked to stop)

    @property
    def new_tokens(self) -> int:
        return len(self.tokens)

    @property
    def decode_seconds(self) -> float:
        return sum(record.seconds for record in self.rounds)

    @property
    def decoded_tokens(self) -> int:
        """Tokens produced by decoding rounds (the prefill's first token is not timed)."""
        return sum(record.emitted for record in self.rounds)

    @property
    def tokens_per_s(self) -> float:
        return self.decoded_tokens / self.decode_seconds if self.decode_seconds else 0.0

    @property
    def ms_per_token(self) -> float:
        return 1000 * self.decode_seconds / self.decoded_tokens if self.decoded_tokens else 0.0

    @property
    def tau(self) -> float:
        """Mean tokens per round, the target's own token included."""
        return self.decoded_tokens / len(self.rounds) if self.rounds else 0.0

    @property
    def mean_budget(self) -> float:
        return statistics.fmean(r.budget for r in self.rounds) if self.rounds else 0.0

    @property
    def drafted_share(self) -> float:
        return statistics.fmean(r.drafted for r in self.rounds) if self.rounds else 0.0

    @property
    def budget_std(self) -> float:
        return statistics.pstdev(r.budget for r in self.rounds) if self.rounds else 0.0

    def summary(self) -> dict:
        return {
            "method": self.method,
            "text": self.text,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "tokens_per_s": self.tokens_per_s,
            "ms_per_token": self.ms_per_token,
            "tau": self.tau,
            "rounds": len(self.rounds),
            "mean_budget": self.mean_budget,
            "budget_std": self.budget_std,
            "drafted_share": self.drafted_share,
            "prefill_seconds": self.prefill_seconds,
            "decode_seconds": self.decode_seconds,
            "finish_reason": self.finish_reason,
        }
