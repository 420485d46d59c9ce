"""The GPU path measured in one run (it also runs on a CPU, which is how the script is checked).

    python benchmarks/gpu_report.py --device cuda --prompts 8 --max-new-tokens 128 --out gpu-report

Prints (and writes to OUT/report.md and OUT/report.json):
- `ar` ms/token with CUDA graphs, with eager forwards, and transformers `generate`'s decode
  ms/token ((time for N tokens - time for 1 token) / (N - 1)), on the same prompts;
- every method's tokens/s, tau and whether its output equals `ar`'s (in float32 it must);
- the share of a caddtree round spent outside the drafter and target calls (GPU time of the
  calls from CUDA events, against the rounds' wall time);
- host synchronisations per round (CUDA's sync debug mode);
- bfloat16: per method, the share of prompts whose output equals bfloat16 `ar`'s, and the first
  divergence positions; bfloat16 `ar` against float32 `ar` too.
Prompts: the first HumanEval and MT-Bench (first turn) prompts, half each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import torch

import caddtree
from caddtree.bench.prompts import load_prompt_set
from caddtree.decode.engine import Engine, eos_token_ids, synchronize
from caddtree.decode.policy import make_policy
from caddtree.models.target import encode_prompt


def prompt_texts(count: int) -> list[str]:
    code, chat = load_prompt_set("humaneval"), load_prompt_set("mt-bench")
    half = (count + 1) // 2
    return [p.turns[0] for p in code[:half]] + [p.turns[0] for p in chat[: count - half]]


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


class CallTimer:
    """GPU (or CPU) time spent inside the drafter's and target's calls of decoding rounds."""

    def __init__(self, engine: Engine):
        self.engine, self.pairs = engine, []
        self._originals = (engine.drafts.draft, engine.verifier.verify)
        engine.drafts.draft = self._timed(engine.drafts.draft)
        engine.verifier.verify = self._timed(engine.verifier.verify)

    def _timed(self, call):
        cuda = self.engine.target.device.type == "cuda"

        def wrapper(*args, **kwargs):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                value = call(*args, **kwargs)
                end.record()
                self.pairs.append((start, end))
            else:
                begin = time.perf_counter()
                value = call(*args, **kwargs)
                self.pairs.append(time.perf_counter() - begin)
            return value

        return wrapper

    def seconds(self) -> float:
        synchronize(self.engine.target.device)
        return sum(p if isinstance(p, float) else p[0].elapsed_time(p[1]) / 1000 for p in self.pairs)

    def close(self) -> None:
        self.engine.drafts.draft, self.engine.verifier.verify = self._originals


def hf_decode_ms_per_token(target, prompt_ids, max_new_tokens: int) -> tuple[float, list[int]]:
    eos = sorted(eos_token_ids(target)) or None

    def run(tokens):
        synchronize(target.device)
        start = time.perf_counter()
        output = target.model.generate(input_ids=prompt_ids[None], attention_mask=torch.ones_like(prompt_ids)[None],
                                       max_new_tokens=tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos[0] if eos else 0)
        synchronize(target.device)
        return time.perf_counter() - start, output[0, len(prompt_ids):].tolist()

    run(2)  # warm-up
    one, _ = run(1)
    many, tokens = run(max_new_tokens)
    return 1000 * (many - one) / max(1, len(tokens) - 1), tokens


def syncs_per_round(engine: Engine, prompt_ids, policy, max_new_tokens: int) -> float | None:
    if engine.target.device.type != "cuda":
        return None
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = engine.generate(prompt_ids, policy, max_new_tokens)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    return syncs / max(1, len(result.rounds))


def method_policies(pair, budgets: list[int]) -> dict:
    policies = {"ar": lambda: make_policy("ar"), "dflash": lambda: make_policy("dflash")}
    for budget in budgets:
        policies[f"ddtree@{budget}"] = lambda b=budget: make_policy("ddtree", b)
    model = pair.cost_model("auto", show_progress=False)
    for rule in ("exact", "greedy"):
        policies[f"caddtree-{rule}"] = lambda r=rule: make_policy("caddtree", None, r, model)
    return policies


def warmed_up_pair(args, dtype: str, prompt: str):
    """The pair, every method run once (graph capture, caches); if capturing CUDA graphs fails,
    the error is kept for the report and the pair is loaded again with eager forwards."""
    graph_error = None
    for cuda_graphs in (True, False):
        pair = caddtree.load(args.target, args.drafter, args.device, dtype, cuda_graphs)
        try:
            started = time.perf_counter()
            policies = method_policies(pair, args.budgets)
            cost_model_seconds = time.perf_counter() - started
            for policy in policies.values():
                pair.engine.generate(encode_prompt(pair.target, prompt), policy(), 16)
            return pair, policies, cost_model_seconds, graph_error
        except RuntimeError as error:
            if not cuda_graphs or args.device == "cpu":
                raise
            graph_error = f"{type(error).__name__}: {str(error).splitlines()[0]}"
            print(f"CUDA graphs failed, measuring eager forwards instead: {graph_error}")
    raise AssertionError("unreachable")


def run_dtype(args, dtype: str, prompts: list[str]) -> dict:
    pair, policies, cost_model_seconds, graph_error = warmed_up_pair(args, dtype, prompts[0])
    engine = pair.engine
    report = {"dtype": dtype, "cost_model_seconds": cost_model_seconds, "graph_error": graph_error, "methods": {}}
    encoded = [encode_prompt(pair.target, p) for p in prompts]
    outputs = {}
    for name, policy in policies.items():
        results = [engine.generate(ids, policy(), args.max_new_tokens) for ids in encoded]
        outputs[name] = [r.tokens for r in results]
        report["methods"][name] = {
            "tokens_per_s": statistics.fmean(r.tokens_per_s for r in results),
            "ms_per_token": statistics.fmean(r.ms_per_token for r in results),
            "tau": statistics.fmean(r.tau for r in results),
            "mean_budget": statistics.fmean(r.mean_budget for r in results),
            "matches_ar": sum(o == a for o, a in zip(outputs[name], outputs["ar"])) / len(prompts),
            "first_divergence": [first_divergence(o, a) for o, a in zip(outputs[name], outputs["ar"])],
        }
    report["outputs_ar"] = outputs["ar"]
    if dtype == "float32":
        report.update(float32_extras(args, pair, encoded, policies))
    pair.engine.verifier.close()
    return report


def float32_extras(args, pair, encoded, policies) -> dict:
    engine, target = pair.engine, pair.target
    extras = {}
    eager = Engine(target, engine.drafts.drafter, static_shapes=False)
    eager.generate(encoded[0], make_policy("ar"), 16)
    extras["ar_eager_ms_per_token"] = statistics.fmean(
        eager.generate(ids, make_policy("ar"), args.max_new_tokens).ms_per_token for ids in encoded)
    eager.verifier.close()
    hf = [hf_decode_ms_per_token(target, ids, args.max_new_tokens) for ids in encoded]
    extras["hf_generate_ms_per_token"] = statistics.fmean(ms for ms, _ in hf)
    extras["hf_generate_outputs"] = [tokens for _, tokens in hf]
    timer = CallTimer(engine)
    try:
        results = [engine.generate(ids, policies["caddtree-exact"](), args.max_new_tokens) for ids in encoded]
        calls = timer.seconds()
    finally:
        timer.close()
    extras["caddtree_share_outside_model_calls"] = 1 - calls / sum(r.decode_seconds for r in results)
    extras["syncs_per_round"] = {name: syncs_per_round(engine, encoded[0], policies[name](), args.max_new_tokens)
                                 for name in ("ar", "ddtree@" + str(args.budgets[0]), "caddtree-exact")}
    extras["cuda_graphs"] = engine.verifier.cuda_graphs
    return extras


def markdown(fp32: dict, bf16: dict | None) -> str:
    ar = fp32["methods"]["ar"]
    lines = [
        f"ar: {ar['ms_per_token']:.2f} ms/token (cuda graphs: {fp32['cuda_graphs']}); eager ar "
        f"{fp32['ar_eager_ms_per_token']:.2f} ms/token; transformers generate {fp32['hf_generate_ms_per_token']:.2f} "
        f"ms/token -> ar is {fp32['hf_generate_ms_per_token'] / ar['ms_per_token']:.1f}x faster than generate",
        f"caddtree-exact round time outside the drafter and target calls: {100 * fp32['caddtree_share_outside_model_calls']:.1f}%",
        f"host syncs per round: {fp32['syncs_per_round']}",
        f"cost model (auto profile) took {fp32['cost_model_seconds']:.1f} s; CUDA graph error: {fp32['graph_error']}",
        "",
        "| method | dtype | tokens/s | x ar | tau | mean budget | output = ar |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for report in (fp32, bf16):
        if report is None:
            continue
        base = report["methods"]["ar"]["tokens_per_s"]
        for name, row in report["methods"].items():
            lines.append(f"| {name} | {report['dtype']} | {row['tokens_per_s']:.1f} | {row['tokens_per_s'] / base:.2f} | "
                         f"{row['tau']:.2f} | {row['mean_budget']:.1f} | {100 * row['matches_ar']:.0f}% |")
    if bf16 is not None:
        lines.append("")
        for name, row in bf16["methods"].items():
            diverged = [d for d in row["first_divergence"] if d is not None]
            if diverged:
                lines.append(f"bf16 {name}: first divergence from bf16 ar at token {diverged}")
        against = [first_divergence(b, f) for b, f in zip(bf16["outputs_ar"], fp32["outputs_ar"])]
        lines.append(f"bf16 ar against float32 ar: first divergence per prompt {against}")
    hf_same = sum(h == a for h, a in zip(fp32["hf_generate_outputs"], fp32["outputs_ar"]))
    lines.append(f"float32 ar equals transformers generate on {hf_same}/{len(fp32['outputs_ar'])} prompts")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--target")
    parser.add_argument("--drafter")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--budgets", type=lambda text: [int(b) for b in text.split(",")], default=[16, 64])
    parser.add_argument("--no-bf16", action="store_true")
    parser.add_argument("--out", default="gpu-report")
    args = parser.parse_args()
    prompts = prompt_texts(args.prompts)
    fp32 = run_dtype(args, "float32", prompts)
    bf16 = None if args.no_bf16 else run_dtype(args, "bfloat16", prompts)
    text = markdown(fp32, bf16)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(text + "\n")
    (out / "report.json").write_text(json.dumps({"float32": fp32, "bfloat16": bf16, "args": vars(args)}, indent=1) + "\n")


if __name__ == "__main__":
    main()
