"""Per-rank against scalar acceptance calibration, and both against `ddtree@4`, on bench prompts.

Every variant decodes each prompt in turn, in one process (the first N MT-Bench first turns, then
the first N HumanEval problems, 128 new tokens); outputs must equal `ar`'s. Prints, per set, the
geometric mean of the wall-clock speed-up over `ar`, of the speed-up the cached cost model
predicts for the rounds each variant took (free of timing noise), mean τ and mean budget. The
scalar calibration (one ratio for all ranks, the default before 2026-12-07) is emulated by the
per-rank one with every bucket given the pooled ratio: close to the old rule, not identical, since
buckets a round does not reach keep their weight undecayed.

    python scripts/calibration_ab.py 15
"""

import math
import statistics
import sys

from caddtree import api
from caddtree.bench.prompts import load_prompt_set
from caddtree.tree import calibration

VARIANTS = {"ar": ("ar", {}), "ddtree@4": ("ddtree", {"budget": 4}), "caddtree, scalar": ("caddtree", {}),
            "caddtree, per rank": ("caddtree", {}), "caddtree, per rank, no lookup": ("caddtree", {"lookup": False})}
per_rank_ratios = calibration.AcceptanceCalibration.ratios
pooled = {"on": False}


def ratios(self):
    if not pooled["on"]:
        return per_rank_ratios(self)
    ratio = (sum(self.accepted) + self.prior_promise) / (sum(self.promised) + self.prior_promise)
    return [ratio] * calibration.NUM_BUCKETS


def geomean(values):
    return math.exp(statistics.fmean(map(math.log, values)))


def main(count: int) -> None:
    calibration.AcceptanceCalibration.ratios = ratios
    pair = api.load()
    cost_model = pair.cost_model()

    def modelled_seconds(result):
        return sum(float(cost_model.round_costs(max(r.budget, 1), r.context_len, False, "cpu", r.drafted)[r.budget])
                   for r in result.rounds)

    sets = {name: [p.turns[0] for p in load_prompt_set(name)[:count]] for name in ("mt-bench", "humaneval")}
    for set_name, prompts in sets.items():
        rows = {name: [] for name in VARIANTS}
        for prompt in prompts:
            results = {}
            for name, (method, options) in VARIANTS.items():
                pooled["on"] = name == "caddtree, scalar"
                results[name] = pair.generate(prompt, method=method, max_new_tokens=128, **options)
            ar = results["ar"]
            assert all(result.tokens == ar.tokens for result in results.values()), "an output differs from ar's"
            for name, result in results.items():
                rows[name].append((result.tokens_per_s / ar.tokens_per_s, modelled_seconds(ar) / modelled_seconds(result),
                                   result.tau, result.mean_budget))
        for name, row in rows.items():
            wall, modelled, tau, budget = zip(*row)
            print(f"{set_name:9s} {name:30s} wall {geomean(wall):.3f}x  modelled {geomean(modelled):.3f}x  "
                  f"tau {statistics.fmean(tau):.2f}  budget {statistics.fmean(budget):.1f}", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 15)
