"""Two drafters of the default target side by side in one process: tokens/s over `ar` and τ.

    python scripts/ab_drafters.py caddtree/assets/drafter runs/cpu15 --prompts 5 --max-new-tokens 128

The first HumanEval problems and MT-Bench first turns; per prompt, `ar` and every method of each
drafter, the drafters taking turns going first. Drafters of one depth draft at the same cost, so
they share one cost model (profiled with the first) and only their drafts differ; drafters of
different depths each get their own. Every output must equal `ar`'s.
"""

import argparse
import statistics

from caddtree.api import Pair, load
from caddtree.bench.prompts import humaneval_turns, mtbench_turns
from caddtree.models.drafter_io import load_drafter

METHODS = ["caddtree", "dflash"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("drafters", nargs=2, help="drafter directories")
    parser.add_argument("--prompts", type=int, default=5, help="per prompt set (default 5)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()
    first = load(drafter=args.drafters[0])
    pairs = [first, Pair(first.target, args.drafters[1], load_drafter(args.drafters[1], first.target))]
    drafters = [pair.engine.drafts.drafter for pair in pairs]
    same_depth = drafters[0].config.num_hidden_layers == drafters[1].config.num_hidden_layers
    cost_models = [first.cost_model()] * 2 if same_depth else [pair.cost_model() for pair in pairs]
    prompts = [turns[0] for turns in humaneval_turns()[: args.prompts] + mtbench_turns()[: args.prompts]]
    ratios = {(d, m): [] for d in range(2) for m in METHODS}
    taus = {(d, m): [] for d in range(2) for m in METHODS}
    for number, prompt in enumerate(prompts):
        ar = first.generate(prompt, "ar", max_new_tokens=args.max_new_tokens)
        for d in (0, 1) if number % 2 == 0 else (1, 0):
            for method in METHODS:
                result = pairs[d].generate(prompt, method, max_new_tokens=args.max_new_tokens, cost_model=cost_models[d])
                if result.tokens != ar.tokens:
                    raise SystemExit(f"prompt {number}: {method} with {args.drafters[d]} differs from ar")
                ratios[d, method].append(result.tokens_per_s / ar.tokens_per_s)
                taus[d, method].append(result.tau)
        print(f"prompt {number + 1}/{len(prompts)} done", flush=True)
    for method in METHODS:
        for d in range(2):
            print(f"{method:9s} {args.drafters[d]:32s} {statistics.mean(ratios[d, method]):.3f}x ar (mean of "
                  f"per-prompt ratios), tau {statistics.mean(taus[d, method]):.3f}")


if __name__ == "__main__":
    main()
