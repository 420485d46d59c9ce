"""From per-prompt records to the numbers the paper reports, per method and dataset.

Rates are totals over a dataset's prompts (total tokens / total seconds), not means of per-prompt
rates, so long answers weigh as much as the time they took.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from caddtree.bench.runner import Record

BASELINE = "ar"


@dataclass(frozen=True)
class MethodStats:
    method: str
    decoded_tokens: int
    decode_seconds: float
    rounds: int
    budget_mean: float  # over all rounds of all prompts
    budget_std: float
    speedup: float | None  # tokens/s over ar's on the same dataset; None when ar did not run
    outputs_equal_to_ar: int | None = None  # greedy with ar: how many outputs are ar's, token for token
    outputs: int = 0  # decodings (prompt turns) behind these numbers
    outputs_at_near_ties: int = 0  # greedy, not ar's tokens, parted from them only where rounding decides a near-tie

    @property
    def outputs_unlike_ar(self) -> int:
        """Greedy outputs that part from ar's where rounding does not explain it: bugs."""
        return self.outputs - (self.outputs_equal_to_ar or 0) - self.outputs_at_near_ties

    @property
    def exact(self) -> bool | None:
        """Greedy and compared with ar: did every output equal ar's, or part from it only at a
        near-tie? None when not compared."""
        return None if self.outputs_equal_to_ar is None else self.outputs_unlike_ar == 0

    @property
    def ms_per_token(self) -> float:
        return 1000 * self.decode_seconds / self.decoded_tokens if self.decoded_tokens else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.decoded_tokens / self.decode_seconds if self.decode_seconds else 0.0

    @property
    def tau(self) -> float:
        """Mean tokens per round, the target's own token included."""
        return self.decoded_tokens / self.rounds if self.rounds else 0.0


@dataclass(frozen=True)
class DatasetSummary:
    dataset: str
    methods: dict[str, MethodStats]  # by label, in the order the methods ran
    oracle: str | None  # the ddtree budget with the best tokens/s, picked after the fact
    caddtree_over_oracle: dict[str, float] = field(default_factory=dict)  # tokens/s ratio per caddtree rule


def method_stats(method: str, records: list[Record], baseline_tokens_per_s: float | None) -> MethodStats:
    budgets = [budget for record in records for budget in record.budgets]
    decoded = sum(record.decoded_tokens for record in records)
    seconds = sum(record.decode_seconds for record in records)
    tokens_per_s = decoded / seconds if seconds else 0.0
    compared = [record.equal_to_ar for record in records if record.equal_to_ar is not None]
    return MethodStats(
        method=method,
        decoded_tokens=decoded,
        decode_seconds=seconds,
        rounds=sum(record.rounds for record in records),
        budget_mean=statistics.fmean(budgets) if budgets else 0.0,
        budget_std=statistics.pstdev(budgets) if budgets else 0.0,
        speedup=tokens_per_s / baseline_tokens_per_s if baseline_tokens_per_s else None,
        outputs_equal_to_ar=sum(compared) if compared else None,
        outputs=len(records),
        outputs_at_near_ties=sum(bool(record.parted_at_near_tie) for record in records),
    )


def oracle_budget(methods: dict[str, MethodStats]) -> str | None:
    """The fixed-budget DDTree label with the best tokens/s (None when no ddtree ran)."""
    fixed = [stats for label, stats in methods.items() if label.startswith("ddtree@")]
    return max(fixed, key=lambda stats: stats.tokens_per_s).method if fixed else None


def summarize_dataset(dataset: str, records: list[Record]) -> DatasetSummary:
    by_method: dict[str, list[Record]] = {}
    for record in records:
        by_method.setdefault(record.method, []).append(record)
    baseline = method_stats(BASELINE, by_method[BASELINE], None).tokens_per_s if BASELINE in by_method else None
    methods = {label: method_stats(label, group, baseline) for label, group in by_method.items()}
    oracle = oracle_budget(methods)
    ratios = {}
    if oracle and methods[oracle].tokens_per_s:
        oracle_rate = methods[oracle].tokens_per_s
        ratios = {label: stats.tokens_per_s / oracle_rate for label, stats in methods.items() if label.startswith("caddtree")}
    return DatasetSummary(dataset, methods, oracle, ratios)


def summarize(records: list[Record]) -> list[DatasetSummary]:
    """One summary per dataset, in the order the datasets first appear."""
    datasets = list(dict.fromkeys(record.dataset for record in records))
    return [summarize_dataset(name, [r for r in records if r.dataset == name]) for name in datasets]


def inexact_methods(summaries: list[DatasetSummary]) -> list[str]:
    """One phrase per (dataset, method) whose greedy outputs part from ar's where rounding does not
    explain it: a bug, never a speed-up."""
    return [f"{label} on {summary.dataset} ({stats.outputs_unlike_ar} of {stats.outputs} outputs)"
            for summary in summaries for label, stats in summary.methods.items() if stats.exact is False]


def summary_to_json(summary: DatasetSummary) -> dict:
    """Plain data, the derived rates included, for results.json."""
    methods = {
        label: {**vars(stats), "ms_per_token": stats.ms_per_token, "tokens_per_s": stats.tokens_per_s, "tau": stats.tau,
                "exact": stats.exact}
        for label, stats in summary.methods.items()
    }
    return {"dataset": summary.dataset, "methods": methods, "oracle": summary.oracle,
            "caddtree_over_oracle": summary.caddtree_over_oracle}
