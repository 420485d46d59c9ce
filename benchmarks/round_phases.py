"""Where a decoding round's time goes, by tree budget: draft, tree build, verify (+ accept/compact).

    python benchmarks/round_phases.py --budgets 64 256 1024 --rounds 5

Uses the default target with an untrained drafter: phase costs depend on shapes, not weights.
Also reports ar in the engine against transformers' generate on the same prompt.
"""

import argparse
import statistics
import time

import torch

from caddtree.decode.engine import Engine
from caddtree.decode.policy import make_policy
from caddtree.models.drafter_io import random_drafter
from caddtree.models.target import encode_prompt, load_target
from caddtree.tree.build import rank_nodes, tree_from_ranked

PROMPT = "Write a detailed essay about the history of the printing press."


def timed(run):
    start = time.perf_counter()
    value = run()
    return value, time.perf_counter() - start


def phase_times(engine: Engine, prompt_ids, budget: int, rounds: int) -> dict[str, float]:
    engine.generate(prompt_ids, make_policy("ar"), 2)  # fills the caches with the prompt
    drafts, verifier = engine.drafts, engine.verifier
    context_len = verifier.context_len
    root = prompt_ids[-1]
    totals = {"draft": [], "build": [], "verify": []}
    for _ in range(rounds + 1):  # the first round warms up
        log_probs, draft_s = timed(lambda: drafts.draft(root, context_len, drafts.block_size - 1))
        tree, build_s = timed(lambda: tree_from_ranked(rank_nodes(log_probs, budget), budget))
        tree = tree.with_tokens(drafts.head.target_tokens(tree.tokens))
        _, verify_s = timed(lambda: (verifier.verify(*tree.with_root(root), tree.ancestor_mask),
                                     verifier.keep(tree.depths.new_zeros(0))))  # back to the context
        for name, seconds in zip(totals, (draft_s, build_s, verify_s)):
            totals[name].append(seconds)
    return {name: statistics.median(values[1:]) for name, values in totals.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    target = load_target(None)
    engine = Engine(target, random_drafter(target, num_layers=1, mask_token_id=16))
    prompt_ids = encode_prompt(target, PROMPT)

    print("budget  draft ms  build ms  verify ms  build share of round")
    for budget in args.budgets:
        t = phase_times(engine, prompt_ids, budget, args.rounds)
        total = sum(t.values())
        print(f"{budget:6d}  {1e3 * t['draft']:8.1f}  {1e3 * t['build']:8.1f}  {1e3 * t['verify']:9.1f}  {t['build'] / total:8.1%}")

    engine.generate(prompt_ids, make_policy("ar"), 8)  # warm-up
    ours = engine.generate(prompt_ids, make_policy("ar"), args.tokens)
    with torch.no_grad():
        target.model.generate(prompt_ids[None], max_new_tokens=8, do_sample=False)
        start = time.perf_counter()
        out = target.model.generate(prompt_ids[None], max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
        hf_seconds = time.perf_counter() - start
    hf_tokens = out.shape[1] - len(prompt_ids)
    print(f"ar (engine): {ours.tokens_per_s:.1f} tokens/s (decode only, {ours.new_tokens} tokens)")
    print(f"transformers generate: {hf_tokens / hf_seconds:.1f} tokens/s (prefill included, {hf_tokens} tokens)")
    print(f"same tokens: {out[0, len(prompt_ids):].tolist()[: ours.new_tokens] == ours.tokens}")


if __name__ == "__main__":
    main()
