"""`caddtree bench`: the paper's evaluation on any target/drafter pair and hardware.

prompts (the sets and their templates) -> runner (every method side by side on each prompt) ->
metrics (per method and dataset, the DDTree oracle) -> report (results.json, results.md, plots);
distributed shards the prompts under torchrun; run ties them together.
"""
