"""The cheaper round (docs/results.md, 2026-12-07) against the code before it, in one process.

"Before" is emulated: the two-part tree attention at every context length, a float32 drafter, and
the cache compacted after every round, plain steps included. Each variant gets its own quick
profile; on every prompt `ar` and `caddtree` of both variants decode in turn (the variants' order
alternating), 128 new tokens, and every output must equal `ar`'s. Prints per prompt set the
geometric means of `ar` after ÷ before, each variant's speed-up over its own `ar`, and caddtree's
tokens/s after ÷ before, with mean τ and budget.

    python scripts/cheaper_round_ab.py 10
"""

import math
import statistics
import sys

import torch

from caddtree import api
from caddtree.bench.prompts import load_prompt_set
from caddtree.cost.profile import QUICK_CONTEXTS, QUICK_SIZES, profile
from caddtree.decode.drafting import DraftRunner
from caddtree.models import tree_attention
from caddtree.models.drafter_io import load_drafter
from caddtree.models.target import TargetRunner

NO_REPEATS = ["Explain in a few sentences why the sky is blue.", "Write a short story about a lighthouse keeper.",
              "Give me five tips for staying healthy.",
              "Write a Python function that checks whether a string is a palindrome.",
              "What are the main causes of the French Revolution?", "Describe how a bicycle works to a child."]
truncating_keep = TargetRunner.keep


@torch.inference_mode()
def compacting_keep(self, accepted_positions):
    """The keep before: index copies in every round."""
    kept = self._tree_start + accepted_positions
    for layer in self.cache.layers:
        layer.keep(self._tree_start, kept)


def geomean(values):
    return math.exp(statistics.fmean(map(math.log, values)))


def main(count: int) -> None:
    pair = api.load()
    engine = pair.engine
    runners = {"after": engine.drafts, "before": DraftRunner(load_drafter(str(api.DEFAULT_DRAFTER_DIR), engine.target),
                                                            engine.target)}

    def use(variant):
        engine.drafts = runners[variant]
        tree_attention.ONE_CALL_KEYS = 1024 if variant == "after" else 0
        TargetRunner.keep = truncating_keep if variant == "after" else compacting_keep

    models = {}
    for variant in ("before", "after"):
        use(variant)
        models[variant] = profile(engine, "ab", QUICK_SIZES["cpu"], QUICK_CONTEXTS, repeats=5, show_progress=False)
    sets = {"no repeats": NO_REPEATS, **{name: [p.turns[0] for p in load_prompt_set(name)[:count]]
                                         for name in ("mt-bench", "humaneval")}}
    for set_name, prompts in sets.items():
        ratios = {"ar": [], "before": [], "after": [], "caddtree": []}
        runs = {"before": [], "after": []}
        for i, prompt in enumerate(prompts):
            results = {}
            for variant in ("before", "after") if i % 2 == 0 else ("after", "before"):
                use(variant)
                results["ar", variant] = pair.generate(prompt, method="ar", max_new_tokens=128)
                results["caddtree", variant] = pair.generate(prompt, method="caddtree", max_new_tokens=128,
                                                             cost_model=models[variant])
            assert all(r.tokens == results["ar", "before"].tokens for r in results.values()), "an output differs"
            speed = {key: r.tokens_per_s for key, r in results.items()}
            ratios["ar"].append(speed["ar", "after"] / speed["ar", "before"])
            ratios["caddtree"].append(speed["caddtree", "after"] / speed["caddtree", "before"])
            for variant in ("before", "after"):
                ratios[variant].append(speed["caddtree", variant] / speed["ar", variant])
                runs[variant].append(results["caddtree", variant])
        print(f"{set_name}: ar after/before {geomean(ratios['ar']):.3f}, caddtree over its ar before "
              f"{geomean(ratios['before']):.3f}x after {geomean(ratios['after']):.3f}x, caddtree after/before "
              f"{geomean(ratios['caddtree']):.3f}; " + ", ".join(
                  f"{v} tau {statistics.fmean(r.tau for r in runs[v]):.2f} budget "
                  f"{statistics.fmean(r.mean_budget for r in runs[v]):.1f}" for v in runs), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
