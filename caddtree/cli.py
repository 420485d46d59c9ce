"""Command line: `caddtree generate PROMPT`, `caddtree bench`, `caddtree profile` and `caddtree train-drafter`.

A user's mistake is reported as one line on stderr with exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING

from caddtree.errors import CaddtreeError

if TYPE_CHECKING:  # the CLI imports torch-heavy modules only where a command needs them
    from caddtree.models.target import Prompt

PROG = "caddtree"
METHOD_CHOICES = ["ar", "dflash", "ddtree", "caddtree", "lookup"]
METHOD_HELP = "caddtree (default); lookup: continuations found in the context, no trained drafter needed"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage block
        raise CaddtreeError(message)


def _non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _seed(text: str) -> int:
    from caddtree.decode.sampling import SEEDS

    value = _int(text)
    if value not in SEEDS:
        raise argparse.ArgumentTypeError(f"must lie in [-2**63, 2**64), got {value}")
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _positive_float(text: str) -> float:
    value = _float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _float_in(low: float, high: float):
    """An argparse type: a number in [low, high)."""

    def parse(text: str) -> float:
        value = _float(text)
        if not low <= value < high:
            bounds = f">= {low:g}" + (f" and < {high:g}" if high != float("inf") else "")
            raise argparse.ArgumentTypeError(f"must be a number {bounds}, got {text}")
        return value

    return parse


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None


def _int_list(minimum: int):
    """A parser of comma-separated whole numbers >= minimum, sorted and de-duplicated."""
    def parse(text: str) -> list[int]:
        values = [_int(part) for part in text.split(",") if part.strip()]
        if not values:
            raise argparse.ArgumentTypeError("give at least one value")
        if min(values) < minimum:
            raise argparse.ArgumentTypeError(f"values must be >= {minimum}, got {min(values)}")
        return sorted(set(values))

    return parse


def _name_list(choices: tuple[str, ...] | None = None):
    """A parser of comma-separated names, in order, each one of `choices` when given."""
    def parse(text: str) -> list[str]:
        names = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
        if not names:
            raise argparse.ArgumentTypeError("give at least one name")
        unknown = [name for name in names if choices and name not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown[0]!r}; choose from {', '.join(choices)}")
        return names

    return parse


def _add_method_arguments(parser) -> None:
    """How each reply is decoded: the options generate and serve share."""
    parser.add_argument("--method", default="caddtree", choices=METHOD_CHOICES, help=METHOD_HELP)
    parser.add_argument("--budget", type=_non_negative_int,
                        help="ddtree: tree size (default 64); caddtree, lookup: largest tree considered")
    parser.add_argument("--no-lookup", dest="lookup", action="store_false",
                        help="caddtree: draft with the drafter alone, without continuations found in the context")
    parser.add_argument("--rule", default="exact", choices=["greedy", "exact"], help="caddtree's budget rule")


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", help="hub id, local model directory or .gguf file (default: SmolLM2-135M-Instruct "
                        "GGUF); for profile also random:qwen3-4b, random:qwen3-8b or random:CONFIG.json")
    parser.add_argument("--drafter", help="DFlash drafter directory or hub id (default: the shipped drafter for the "
                        "default target); random or random:N for an untrained N-layer drafter")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    parser.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                        help="on a GPU, run eager forwards instead of replaying CUDA graphs")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Lossless speculative decoding with cost-aware diffusion draft trees.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    generate = commands.add_parser("generate", help="generate text and print speed statistics")
    generate.add_argument("prompt", help="the prompt ('-' reads it from stdin)")
    _add_method_arguments(generate)
    generate.add_argument("--uncalibrated", action="store_true",
                          help="caddtree: the paper's rule as stated: trust the drafter's probabilities and "
                               "always draft (no scaling by measured acceptance, no skipping)")
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--top-k", type=_non_negative_int, default=0)
    generate.add_argument("--max-new-tokens", type=_positive_int, default=256)
    generate.add_argument("--cost-model", default="auto", help="cost-model JSON, or auto (profile once, cached)")
    generate.add_argument("--seed", type=_seed, default=0)
    generate.add_argument("--raw", action="store_true", help="do not apply the chat template")
    generate.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    generate.add_argument("--compare-ar", action="store_true",
                          help="also decode with plain autoregressive decoding and report the speed-up")
    generate.add_argument("--repeats", type=_positive_int, default=1,
                          help="with --compare-ar: time this many interleaved (method, ar) pairs and report "
                               "the median speed-up (default 1)")
    _add_model_arguments(generate)

    _add_bench_parser(commands)
    _add_serve_parser(commands)

    profile = commands.add_parser("profile", help="measure and fit the cost model Cv(n; l), Cd on this hardware")
    profile.add_argument("--out", help="where to write the JSON (default: the cache that --cost-model auto reads)")
    profile.add_argument("--sizes", type=_int_list(0), help="tree sizes n to time (default 0..1024, log-spaced)")
    profile.add_argument("--contexts", type=_int_list(1), help="context lengths l (default 128,512,1536)")
    profile.add_argument("--repeats", type=_positive_int, default=3)
    _add_model_arguments(profile)

    train = commands.add_parser("train-drafter", help="train a DFlash drafter for a target on its own answers")
    train.add_argument("--out", required=True, help="checkpoint directory (also holds the cached data, history, loss plot)")
    train.add_argument("--data", nargs="+", metavar="FILE",
                       help="train on these records (JSONL, gzip or plain: {\"prompt_ids\": [...], \"response_ids\": [...]} "
                            "per line) instead of generating answers; they are shuffled with --seed, and "
                            "--heldout-records come from the first file")
    train.add_argument("--prompts", default="sharegpt", help="sharegpt (default) or a JSONL file with a \"prompt\" per line")
    train.add_argument("--num-prompts", type=_positive_int, default=1000, help="training prompts (default 1000)")
    train.add_argument("--eval-prompts", type=_non_negative_int, default=4,
                       help="held-out prompts for decoding tau: the first of --prompts (default 4)")
    train.add_argument("--eval-tokens", type=_positive_int, default=48, help="new tokens per held-out prompt (default 48)")
    train.add_argument("--heldout-records", type=_non_negative_int, default=0,
                       help="records kept out of training for held-out loss, accuracy and block tau (default 0)")
    train.add_argument("--max-new-tokens", type=_positive_int, default=256, help="answer length cap when generating data")
    train.add_argument("--generation-batch", type=_positive_int, default=16)
    train.add_argument("--temperature", type=_float_in(0, float("inf")), default=0.0,
                       help="sample the generated answers at this temperature, seeded with --seed "
                            "(default 0: greedy, the target's own decoding)")
    train.add_argument("--data-only", action="store_true",
                       help="answer the prompts into OUT/data.jsonl (resuming it) and stop: no features, no training")
    train.add_argument("--init-from", metavar="DIR",
                       help="continue training this checkpoint (it fixes the architecture; --layers adds layers "
                            "that start as no-ops)")
    train.add_argument("--layers", type=_positive_int,
                       help="drafter layers (default 1; with --init-from, more than its own grows it)")
    train.add_argument("--feature-layers", type=_int_list(0),
                       help="target layers the drafter reads, e.g. 1,14,27 (default: DFlash's spread for --layers)")
    train.add_argument("--draft-vocab", type=_positive_int, metavar="K",
                       help="score only the K most frequent answer tokens of the data (default: the whole vocabulary)")
    train.add_argument("--block-size", type=_positive_int)
    train.add_argument("--steps", type=_positive_int, default=1000)
    train.add_argument("--max-minutes", type=_positive_float,
                       help="stop training after this many minutes; the schedule decays over whichever ends first")
    train.add_argument("--learning-rate", type=_positive_float, default=6e-4)
    train.add_argument("--warmup-steps", type=_non_negative_int, default=50)
    train.add_argument("--weight-decay", type=_float_in(0, float("inf")), default=0.01,
                       help="AdamW's decoupled weight decay (default 0.01)")
    train.add_argument("--feature-dropout", type=_float_in(0, 1), default=0.0, metavar="P",
                       help="in training, zero this share of the target features the drafter reads (default 0)")
    train.add_argument("--anchors", type=_positive_int, default=16, help="anchored blocks per sequence")
    train.add_argument("--gamma", type=_positive_float, default=7.0,
                       help="loss weight of block offset k is exp(-(k-1)/gamma) (default 7)")
    train.add_argument("--sequences-per-step", type=_positive_int, default=4)
    train.add_argument("--eval-every", type=_positive_int, default=200)
    train.add_argument("--feature-dtype", choices=["float32", "bfloat16"],
                       help="precision of the target forward that computes features (default: the target's)")
    train.add_argument("--feature-cache", metavar="DIR",
                       help="keep the target's features in DIR (several GB per million tokens): a later run on the "
                            "same records, target and feature options reads them back instead of recomputing")
    train.add_argument("--autocast", action=argparse.BooleanOptionalAction,
                       help="bfloat16 autocast for the drafter's passes (default: on CUDA only; it also pays on "
                            "CPUs with bfloat16 arithmetic, e.g. AVX512-BF16)")
    train.add_argument("--distill", type=_non_negative_int, default=0, metavar="K",
                       help="learn the target's top-K next-token distribution instead of its chosen token (default 0: off)")
    train.add_argument("--save-dtype", choices=["float32", "bfloat16"], default="float32",
                       help="dtype of the final checkpoint (bfloat16 halves its size)")
    train.add_argument("--mask-token-id", type=_non_negative_int, help="default: the first unused embedding row")
    train.add_argument("--seed", type=_seed, default=0)
    train.add_argument("--target", help="hub id, local model directory or .gguf file (default: SmolLM2-135M-Instruct GGUF)")
    train.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    return parser


def _add_bench_parser(commands) -> None:
    from caddtree.bench.options import DEFAULT_BUDGETS, DEFAULT_METHODS
    from caddtree.bench.prompts import PROMPT_SETS

    bench = commands.add_parser("bench", help="the paper's evaluation: every method side by side, tables and plots")
    bench.add_argument("--datasets", type=_name_list(),
                       help=f"comma-separated, from {', '.join(PROMPT_SETS)} (default: humaneval,mt-bench,grounded; "
                            "with --prompts: every set in the file)")
    bench.add_argument("--n", "--num-prompts", dest="n", type=_positive_int, default=20,
                       help="prompts per dataset, drawn with --seed (default 20); under torchrun write "
                            "--num-prompts, as torchrun takes --n for an abbreviation of its own options")
    bench.add_argument("--budgets", type=_int_list(1), default=list(DEFAULT_BUDGETS),
                       help="ddtree's budget grid (default 16,32,...,1024)")
    bench.add_argument("--methods", type=_name_list(DEFAULT_METHODS), default=list(DEFAULT_METHODS),
                       help="comma-separated (default ar,dflash,ddtree,caddtree,lookup; caddtree runs both rules, uncalibrated and without lookups)")
    bench.add_argument("--temperature", type=float, default=0.0, choices=[0.0, 1.0], help="0 (greedy, default) or 1")
    bench.add_argument("--max-new-tokens", type=_positive_int, default=256)
    bench.add_argument("--seed", type=_seed, default=0, help="prompt sampling and decoding seed")
    bench.add_argument("--prompts", help="JSONL file: per line {\"prompt\": ...} or {\"turns\": [...]}, optional \"dataset\"")
    bench.add_argument("--out", default="bench-results", help="output directory (default bench-results)")
    bench.add_argument("--cost-model", default="auto", help="cost-model JSON, or auto (profile once, cached)")
    bench.add_argument("--no-hf-generate", dest="hf_generate", action="store_false",
                       help="skip transformers' generate, the outside reference")
    _add_model_arguments(bench)


def _add_serve_parser(commands) -> None:
    serve = commands.add_parser("serve", help="an OpenAI-compatible HTTP server over the loaded pair")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=_int, default=8000, help="default 8000")
    serve.add_argument("--api-key", help="require the header Authorization: Bearer KEY on /v1/ requests")
    serve.add_argument("--model-name", help="the model id clients ask for (default: the target's name)")
    _add_method_arguments(serve)
    serve.add_argument("--cost-model", default="auto", help="cost-model JSON, or auto (profile once, cached)")
    serve.add_argument("--max-queue", type=_positive_int, default=16,
                       help="requests that may wait for their turn; more are answered 503 at once (default 16)")
    serve.add_argument("--max-tokens", type=_positive_int, default=256,
                       help="new tokens of a request that does not say (default 256)")
    _add_model_arguments(serve)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _load(args):
    from caddtree.api import load, parse_device, parse_dtype
    from caddtree.models.target import target_label

    parse_device(args.device), parse_dtype(args.dtype)  # fail before announcing the load
    _say(f"loading target {target_label(args.target)} ...")
    pair = load(args.target, args.drafter, args.device, args.dtype, args.cuda_graphs)
    if getattr(args, "method", None) != "lookup":  # lookup never drafts
        _say(f"drafter: {pair.drafter_description}")
    return pair


def _check_cost_model_file(spec: str, methods: list[str]) -> None:
    """A cost-model file that the methods would read must exist (checked before the slow load)."""
    from caddtree.decode.policy import COST_AWARE_METHODS

    if spec != "auto" and set(COST_AWARE_METHODS) & set(methods) and not os.path.isfile(spec):
        raise CaddtreeError(f"cost model file not found: {spec}")


def _read_prompt(text: str) -> str:
    return sys.stdin.read() if text == "-" else text


def run_generate(args) -> None:
    from caddtree.decode.policy import check_policy_arguments
    from caddtree.decode.sampling import Sampling
    from caddtree.models.target import check_prompt_text

    prompt = _read_prompt(args.prompt)
    check_prompt_text(prompt)
    check_policy_arguments(args.method, args.budget, args.rule, args.lookup, not args.uncalibrated)
    Sampling(args.temperature, args.top_p, args.top_k)
    _check_cost_model_file(args.cost_model, [args.method])
    if args.repeats > 1 and not args.compare_ar:
        raise CaddtreeError("--repeats times pairs of runs against ar: add --compare-ar")
    pair = _load(args)
    stream = None if args.json else lambda text: print(text, end="", flush=True)
    options = dict(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, seed=args.seed, raw=args.raw,
    )
    method_options = dict(method=args.method, budget=args.budget, rule=args.rule, cost_model=args.cost_model,
                          calibrate=not args.uncalibrated, lookup=args.lookup, **options)
    result = pair.generate(prompt, on_text=stream, **method_options)
    pairs = _timed_pairs(pair, prompt, result, method_options, options, args.repeats) if args.compare_ar else []
    # The statistics shown are the median pair's; every pair decodes the same tokens.
    shown, baseline = _median_pair(pairs) if pairs else (result, None)
    parting = None
    if baseline and args.temperature == 0:
        from caddtree.decode.parting import first_parting
        from caddtree.models.target import encode_prompt
        prompt_ids = encode_prompt(pair.target, prompt, args.raw)
        parting = first_parting(pair.target, result.method, prompt_ids, result.tokens, baseline.tokens)
    if args.json:
        summary = shown.summary()
        if baseline:
            summary.update(ar_tokens_per_s=baseline.tokens_per_s, speedup_over_ar=_speedup(shown, baseline),
                           speedups_over_ar=[_speedup(*timed) for timed in pairs],
                           identical_to_ar=baseline.tokens == result.tokens,
                           parted_at_near_tie=parting.near_tie if parting else None)
        print(json.dumps(summary))
    else:
        print("\n")
        for run in (shown, baseline) if baseline else (shown,):
            print(_stats_line(run))
        if baseline:
            print(f"speed-up of {result.method} over ar: {_speedup_words(pairs, _speedup(shown, baseline))} "
                  f"({_comparison(result, baseline, parting)})")
    if parting and not parting.near_tie:
        raise CaddtreeError(parting.describe())
    if parting:
        print(f"note: {parting.describe()}", file=sys.stderr)


def _timed_pairs(pair, prompt, result, method_options, options, repeats: int) -> list[tuple]:
    """`repeats` (method run, ar run) pairs, interleaved so that the machine's drift shows in their
    spread; the first pair's method run is `result`."""
    pairs = [(result, pair.generate(prompt, method="ar", **options))]
    for _ in range(repeats - 1):
        pairs.append((pair.generate(prompt, **method_options), pair.generate(prompt, method="ar", **options)))
    return pairs


def _median_pair(pairs: list[tuple]) -> tuple:
    """The pair with the median speed-up (of an even count, the lower middle one)."""
    return sorted(pairs, key=lambda timed: _speedup(*timed))[(len(pairs) - 1) // 2]


def _comparison(result, baseline, parting) -> str:
    """How the method's output compares with ar's, in a few words."""
    if result.tokens == baseline.tokens:
        return "identical output"
    if parting is None:
        return "outputs differ, as sampling may"
    return "outputs part at a near-tie that rounding decides" if parting.near_tie else "OUTPUTS DIFFER: greedy decoding must not"


def _speedup_words(pairs: list[tuple], median: float) -> str:
    """The median pair's speed-up, with the range of all pairs when there are several."""
    speedups = sorted(_speedup(*timed) for timed in pairs)
    if len(pairs) == 1:
        return f"{median:.2f}x"
    return f"{median:.2f}x, the median of {len(pairs)} interleaved pairs ({speedups[0]:.2f}-{speedups[-1]:.2f}x)"


def _speedup(result, baseline) -> float:
    return result.tokens_per_s / baseline.tokens_per_s if baseline.tokens_per_s else 0.0


def _stats_line(result) -> str:
    line = (
        f"[{result.method}] {result.new_tokens} tokens | {result.tokens_per_s:.1f} tokens/s | "
        f"{result.ms_per_token:.1f} ms/token | tau {result.tau:.2f} | {len(result.rounds)} rounds | "
        f"mean budget {result.mean_budget:.1f}"
    )
    if result.method == "caddtree":
        line += f" | drafted in {100 * result.drafted_share:.0f}% of rounds"
    return line


def run_profile(args) -> None:
    from caddtree.cost.model import cache_path
    from caddtree.cost.profile import FULL_CONTEXTS, FULL_SIZES, cost_meta, profile
    from caddtree.cost.shape import convexity_statement, monotonicity_statement, plot_verify_costs
    from pathlib import Path

    if args.out:  # before minutes of profiling, not after
        if os.path.isdir(args.out):
            raise CaddtreeError(f"--out {args.out} is a directory; give the JSON file to write")
        _check_directory(os.path.dirname(os.path.abspath(args.out)), "--out's folder")
    pair = _load(args)
    model = profile(pair.engine, pair.drafter_name, args.sizes or FULL_SIZES, args.contexts or FULL_CONTEXTS, args.repeats)
    out = args.out or cache_path(cost_meta(pair.engine, pair.drafter_name))
    model.save(out)
    sizes = model.measurements["sizes"]
    print("verify ms by tree size n (rows: context length l)")
    print("l \\ n  " + " ".join(f"{int(n):>7}" for n in sizes))
    for context, row in zip(model.contexts, model.measurements["verify_seconds"]):
        print(f"{context:<6} " + " ".join(f"{1000 * s:7.1f}" for s in row))
    print("draft ms: " + ", ".join(f"l={c}: {1000 * s:.1f}" for c, s in zip(model.contexts, model.draft_seconds)))
    for context, row in zip(model.contexts, model.measurements["verify_seconds"]):
        print(f"Cv at l={context}: {convexity_statement(sizes, row)}; {monotonicity_statement(sizes, row)}")
    plot = Path(out).with_suffix(".png")
    plot_verify_costs(model, plot)
    print(f"saved {out} and the plot {plot}")


def run_bench(args) -> None:
    from caddtree.bench.options import BenchOptions
    from caddtree.bench.run import run_bench as bench

    if args.prompts and not os.path.isfile(args.prompts):
        raise CaddtreeError(f"prompt file not found: {args.prompts}")
    _check_cost_model_file(args.cost_model, args.methods)
    _check_directory(args.out, "--out")
    options = BenchOptions(
        out=args.out, datasets=args.datasets, n=args.n, budgets=args.budgets, methods=args.methods,
        temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=args.seed,
        prompts_file=args.prompts, target=args.target, drafter=args.drafter, device=args.device,
        dtype=args.dtype, cost_model=args.cost_model, hf_generate=args.hf_generate, cuda_graphs=args.cuda_graphs,
    )
    outcome = bench(options, _say)
    if outcome is None:  # a torchrun rank other than 0: rank 0 reports
        return
    print(outcome.table)
    print(f"\nwrote {', '.join(str(path) for path in outcome.files)}")
    if outcome.inexact:
        raise CaddtreeError(f"NOT EXACT: greedy outputs differ from ar's for {'; '.join(outcome.inexact)}")


def run_train_drafter(args) -> None:
    from pathlib import Path

    from caddtree.api import parse_device
    from caddtree.models.target import load_target, target_label
    from caddtree.train.loop import TrainConfig, train

    _check_architecture_arguments(args)
    if args.data_only and args.data:
        raise CaddtreeError("--data-only generates data; it cannot be combined with --data")
    if args.data and args.temperature:
        raise CaddtreeError("--temperature sets how answers are generated; it cannot be combined with --data")
    device = parse_device(args.device)
    if args.data:  # fail on a bad file before the slow load
        for path in args.data:
            if not os.path.isfile(path):
                raise CaddtreeError(f"data file not found: {path}")
    _check_directory(args.out, "--out")
    if args.feature_cache:
        _check_directory(args.feature_cache, "--feature-cache")
    wanted = args.eval_prompts + (0 if args.data else args.num_prompts)
    prompts = _training_prompts(args.prompts, wanted, args.seed) if wanted else []
    if not args.data and len(prompts) <= args.eval_prompts:
        raise CaddtreeError(f"only {len(prompts)} prompts found; need more than the {args.eval_prompts} held out")
    eval_prompts, train_prompts = prompts[: args.eval_prompts], prompts[args.eval_prompts :]
    _say(f"loading target {target_label(args.target)} ...")
    target = load_target(args.target, device)  # float32 weights; bf16 autocast on request
    out = Path(args.out)
    vocab_size = target.vocab_size
    if args.distill > vocab_size:
        raise CaddtreeError(f"--distill {args.distill} exceeds the target's vocabulary of {vocab_size} tokens")
    examples = _training_examples(args, target, train_prompts, eval_prompts, out)
    if args.data_only:
        print(f"{out / 'data.jsonl'} holds {len(examples)} records, {sum(len(e.response_ids) for e in examples)} answer tokens")
        return
    if args.heldout_records >= len(examples):
        raise CaddtreeError(f"--heldout-records {args.heldout_records} leaves nothing of the {len(examples)} records to train on")
    config = TrainConfig(
        num_layers=args.layers, feature_layers=args.feature_layers, draft_vocab_size=args.draft_vocab,
        block_size=args.block_size or 16, steps=args.steps, max_minutes=args.max_minutes,
        learning_rate=args.learning_rate, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        feature_dropout=args.feature_dropout, save_dtype=args.save_dtype,
        sequences_per_step=args.sequences_per_step, anchors_per_sequence=args.anchors, gamma=args.gamma,
        eval_every=args.eval_every, eval_tokens=args.eval_tokens, heldout_records=args.heldout_records,
        mask_token_id=args.mask_token_id, feature_dtype=args.feature_dtype, feature_cache=args.feature_cache,
        autocast=args.autocast, distill_top_k=args.distill, init_from=args.init_from, seed=args.seed,
    )
    train(target, examples, out, config, eval_prompts)
    print(f"saved drafter to {out} (loss plot: {out / 'loss.png'}, history: {out / 'history.json'})")


def _check_architecture_arguments(args) -> None:
    """A checkpoint to continue from fixes the architecture (it may only grow, with --layers): options
    that would change it are mistakes."""
    if args.block_size is not None and args.block_size < 2:
        raise CaddtreeError(f"--block-size must be at least 2, got {args.block_size}")
    if args.init_from:
        given = [f"--{name.replace('_', '-')}" for name in ("feature_layers", "draft_vocab", "block_size")
                 if getattr(args, name) is not None]
        if given:
            raise CaddtreeError(f"{', '.join(given)} cannot change the architecture of --init-from {args.init_from}")


def _check_directory(path: str, option: str) -> None:
    """A directory the run will write to exists or can be made (before an hour of work, not after)."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise CaddtreeError(f"{option} {path} is not a directory that can be written ({error.strerror})") from None


def _eval_prompt_ids(target, prompts: list[Prompt], files: list[list]) -> set[tuple[int, ...]]:
    """The token ids of the prompts that measure held-out tau; says how many records have one."""
    from caddtree.models.target import encode_prompt
    from caddtree.train.data import without_prompts

    prompt_ids = {tuple(encode_prompt(target, p).tolist()) for p in prompts}
    left_out = sum(len(records) - len(without_prompts(records, prompt_ids)) for records in files)
    if left_out:
        _say(f"left out {left_out} record(s) whose prompt is one of the --eval-prompts")
    return prompt_ids


def _training_prompts(source: str, count: int, seed: int) -> list[Prompt]:
    from caddtree.train.data import file_prompts, sharegpt_prompts

    return sharegpt_prompts(count, seed) if source == "sharegpt" else file_prompts(source, count)


def _training_examples(args, target, prompts: list[Prompt], eval_prompts: list[Prompt], out):
    """Records from --data (shuffled with --seed, held-out ones last), or the target's answers to
    `prompts`; none with a prompt of `eval_prompts`."""
    from caddtree.decode.engine import eos_token_ids
    from caddtree.train.data import generate_examples, held_out_last, read_data_files, without_prompts

    if not args.data:
        generated = generate_examples(target, prompts, out / "data.jsonl", args.max_new_tokens,
                                      args.generation_batch, eos_token_ids(target), args.temperature, args.seed)
        return without_prompts(generated, _eval_prompt_ids(target, eval_prompts, [generated]))
    files = read_data_files(args.data, target.vocab_size)
    eval_prompt_ids = _eval_prompt_ids(target, eval_prompts, files)
    first_file_records = len(without_prompts(files[0], eval_prompt_ids))
    if args.heldout_records and args.heldout_records >= first_file_records:
        raise CaddtreeError(f"--heldout-records {args.heldout_records} must be fewer than the {first_file_records} records "
                            f"of the first --data file ({args.data[0]}), which they come from")
    examples = held_out_last(files, args.heldout_records, args.seed, eval_prompt_ids)
    longest = max(len(e.token_ids) for e in examples)
    if longest >= target.max_positions:
        raise CaddtreeError(f"a record of --data holds {longest} tokens; the target's context holds {target.max_positions}")
    _say(f"read {len(examples)} records, {sum(len(e.response_ids) for e in examples)} answer tokens")
    return examples


def run_serve(args) -> None:
    import uvicorn

    from caddtree.decode.policy import COST_AWARE_METHODS, check_policy_arguments
    from caddtree.server.app import create_app

    check_policy_arguments(args.method, args.budget, args.rule, args.lookup)
    if not 0 < args.port < 65536:
        raise CaddtreeError(f"--port must be in 1..65535, got {args.port}")
    _check_cost_model_file(args.cost_model, [args.method])
    _check_bindable(args.host, args.port)  # before the slow load
    pair = _load(args)
    cost_aware = args.method in COST_AWARE_METHODS
    cost_model = pair.cost_model(args.cost_model) if cost_aware else None  # profiled now, not mid-request
    options = {"method": args.method, "budget": args.budget, "rule": args.rule, "cost_model": cost_model,
               "lookup": args.lookup}
    name = args.model_name or pair.target.name
    app = create_app(pair, name, options, args.max_queue, args.api_key, args.max_tokens)
    address = f"[{args.host}]" if ":" in args.host else args.host
    _say(f"serving {name!r} with {args.method} on http://{address}:{args.port}/v1 (ctrl-c or SIGTERM stops)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=30)


def _check_bindable(host: str, port: int) -> None:
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn chooses
    try:
        with socket.create_server((host, port), family=family):
            pass
    except OSError as error:  # the port is taken, the address is not this machine's
        raise CaddtreeError(f"cannot serve on {host}:{port}: {error.strerror or error}") from None


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        _quiet_libraries()
        commands = {"generate": run_generate, "bench": run_bench, "profile": run_profile,
                    "train-drafter": run_train_drafter, "serve": run_serve}
        commands[args.command](args)
    except CaddtreeError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130
    return 0


def _quiet_libraries() -> None:
    """transformers' own progress bars and advice would bury our output."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
