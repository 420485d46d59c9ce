"""`caddtree bench` from options to files: prompts, load, decode (sharded under torchrun), report."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from caddtree.bench import distributed
from caddtree.bench.metrics import inexact_methods, summarize
from caddtree.bench.options import BenchOptions
from caddtree.bench.prompts import BenchPrompt, benchmark_prompts
from caddtree.bench.report import environment, markdown_table, write_report
from caddtree.bench.runner import BenchRunner, Record, method_specs
from caddtree.decode.policy import COST_AWARE_METHODS
from caddtree.decode.sampling import Sampling
from caddtree.models.target import target_label


@dataclass(frozen=True)
class BenchOutcome:
    table: str  # the markdown table of results.md
    files: list[Path]
    inexact: list[str]  # (method, dataset) phrases whose greedy outputs are not ar's; empty when all are


def run_bench(options: BenchOptions, say=lambda message: print(message, file=sys.stderr, flush=True)) -> BenchOutcome | None:
    """Run the benchmark; the outcome on rank 0 (or alone), None on the other ranks."""
    from caddtree.api import load, parse_device, parse_dtype

    prompts = benchmark_prompts(options.datasets, options.n, options.seed, options.prompts_file)
    sampling = Sampling(options.temperature)
    parse_dtype(options.dtype)  # fail before joining other processes or loading
    device = parse_device(options.device)
    process = distributed.start(device)
    try:
        device = distributed.process_device(process, device)
        if process.is_main:
            say(f"{len(prompts)} prompts over {process.world_size} process(es); loading target {target_label(options.target)} ...")
        pair = load(options.target, options.drafter, device, options.dtype, options.cuda_graphs)
        cost_model = None
        if set(COST_AWARE_METHODS) & set(options.methods):
            cost_model = distributed.from_main(process, lambda: pair.cost_model(options.cost_model, process.is_main))
        specs = method_specs(options.methods, options.budgets, options.hf_generate)
        runner = BenchRunner(pair, specs, sampling, options.max_new_tokens, options.seed, cost_model)
        mine = distributed.shard(prompts, process.rank, process.world_size)
        if mine:
            runner.warm_up(mine)
        records = distributed.gather(process, runner.run(mine, show_progress=process.is_main))
        if not process.is_main:
            return None
        records = in_prompt_order(records, prompts)
        summaries = summarize(records)
        env = environment(pair, sys.argv, process.world_size)
        files = write_report(Path(options.out), records, summaries, env, cost_model)
        return BenchOutcome(markdown_table(summaries), files, inexact_methods(summaries))
    finally:
        distributed.finish(process)


def in_prompt_order(records: list[Record], prompts: list[BenchPrompt]) -> list[Record]:
    """Records gathered from shards, back in the order of the prompt list (stable within a prompt)."""
    position = {(prompt.dataset, prompt.index): i for i, prompt in enumerate(prompts)}
    return sorted(records, key=lambda record: position[record.dataset, record.prompt_index])
