"""The benchmark's outputs: results.json, a results.md table like the paper's, and PNG plots."""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import platform
import re
from pathlib import Path

import numpy as np
import torch
import transformers

from caddtree.bench.metrics import DatasetSummary, MethodStats, inexact_methods, summary_to_json
from caddtree.bench.runner import Record
from caddtree.cost.model import CostModel
from caddtree.cost.profile import device_label, dtype_label

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
CURVES_PNG = "budget_curves.png"
HISTOGRAM_PNG = "caddtree_budgets.png"
COST_PNG = "cost_model.png"
DDTREE_LABEL = re.compile(r"ddtree@(\d+)$")
COLUMNS = ("tokens/s", "speed-up", "τ", "budget", "= ar")


def environment(pair, command: list[str], world_size: int) -> dict:
    """What a reader needs to know to compare these numbers with others."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "caddtree": importlib.metadata.version("caddtree"),
        "device": device_label(pair.target.device),
        "processes": world_size,
        "target": pair.target.name,
        "drafter": pair.drafter_name,
        "dtype": dtype_label(pair.engine),
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_results_json(path: Path, records: list[Record], summaries: list[DatasetSummary], env: dict) -> None:
    data = {
        "environment": env,
        "metrics": [summary_to_json(summary) for summary in summaries],
        "records": [dataclasses.asdict(record) for record in records],
    }
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")


def read_records(path: Path) -> list[Record]:
    return [Record(**fields) for fields in json.loads(path.read_text(encoding="utf-8"))["records"]]


# --- the table ------------------------------------------------------------------------------------


def markdown_table(summaries: list[DatasetSummary]) -> str:
    """Rows: methods, then the DDTree oracle and CaDDTree / oracle; per dataset: tokens/s, speed-up, τ, budget
    and (greedy) how many outputs equal ar's."""
    labels = list(dict.fromkeys(label for summary in summaries for label in summary.methods))
    header = ["method"] + [f"{s.dataset} {column}" for s in summaries for column in COLUMNS]
    rows = [[label] + [cell for s in summaries for cell in _stats_cells(s.methods.get(label))] for label in labels]
    if any(summary.oracle for summary in summaries):
        rows.append(["ddtree oracle"] + [cell for s in summaries for cell in _oracle_cells(s)])
    ratio_labels = list(dict.fromkeys(label for s in summaries for label in s.caddtree_over_oracle))
    for label in ratio_labels:
        ratios = [s.caddtree_over_oracle.get(label) for s in summaries]
        rows.append([f"{label} ÷ oracle"] + [cell for r in ratios for cell in (_ratio(r), "", "", "", "")])
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def _stats_cells(stats: MethodStats | None) -> list[str]:
    if stats is None:
        return ["–"] * len(COLUMNS)
    speedup = f"{stats.speedup:.2f}x" if stats.speedup is not None else "–"
    budget = f"{stats.budget_mean:.1f} ± {stats.budget_std:.1f}"
    return [f"{stats.tokens_per_s:.1f}", speedup, f"{stats.tau:.2f}", budget, _exactness(stats)]


def _exactness(stats: MethodStats) -> str:
    if stats.exact is None:
        return "–"
    counts = f"{stats.outputs_equal_to_ar}/{stats.outputs}"
    if stats.outputs_at_near_ties:
        counts += f" (+{stats.outputs_at_near_ties} near-ties)"
    return counts if stats.exact else f"**{counts} NOT EXACT**"


def _oracle_cells(summary: DatasetSummary) -> list[str]:
    if summary.oracle is None:
        return ["–"] * len(COLUMNS)
    cells = _stats_cells(summary.methods[summary.oracle])
    return cells[:3] + [summary.oracle, cells[4]]


def _ratio(ratio: float | None) -> str:
    return "–" if ratio is None else f"{ratio:.2f}"


def write_markdown(path: Path, summaries: list[DatasetSummary], env: dict, plots: list[Path]) -> None:
    inexact = inexact_methods(summaries)
    warning = [f"**NOT EXACT: greedy outputs differ from ar's for {'; '.join(inexact)}. A method that changes "
               "the output is a bug; its speed means nothing.**", ""] if inexact else []
    lines = [
        "# caddtree bench",
        "",
        *warning,
        f"Target `{env['target']}`, drafter `{env['drafter']}`, {env['device']}, {env['dtype']}, "
        f"{env['processes']} process(es), {env['date']}.",
        "",
        markdown_table(summaries),
        "",
        "tokens/s and ms/token time decoding only (prefill and its token excluded), `hf-generate` "
        "(transformers' own `generate`, the outside reference) too: from its first new token to its last. "
        "Speed-up is over `ar` of the same engine on the same prompts. τ: tokens per round, the "
        "target's own token included. Budget: tree nodes per round, mean ± std. The oracle is the "
        "ddtree budget with the best tokens/s per dataset, picked after the fact. = ar (greedy runs): how many "
        "outputs equal ar's token for token; every method must reproduce all of them, or part from them only "
        "at a near-tie (the two tokens' logits closer than the dtype's rounding, as in bfloat16; counted apart).",
        "",
        *[f"![{plot.stem}]({plot.name})" for plot in plots],
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# --- the plots ------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


CURVE_METRICS = (("τ (tokens per round)", lambda stats: stats.tau), ("ms per token", lambda stats: stats.ms_per_token))


def plot_budget_curves(summaries: list[DatasetSummary], path: Path) -> bool:
    """τ and ms/token against the ddtree budget, caddtree marked at its mean budget; False if no ddtree ran."""
    if not any(summary.oracle for summary in summaries):
        return False
    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, (name, value) in zip(axes, CURVE_METRICS):
        for summary in summaries:  # each axis cycles colours alike, so a dataset has one colour in both
            _plot_dataset_curve(axis, summary, value)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("tree budget (nodes per round)")
        axis.set_ylabel(name)
        axis.grid(alpha=0.3)
    axes[-1].legend(fontsize=7)
    _save(plt, figure, path)
    return True


def _plot_dataset_curve(axis, summary: DatasetSummary, value) -> None:
    fixed = sorted((int(match.group(1)), stats) for label, stats in summary.methods.items()
                   if (match := DDTREE_LABEL.match(label)))
    line = axis.plot([budget for budget, _ in fixed], [value(stats) for _, stats in fixed], marker="o",
                     label=f"{summary.dataset} ddtree")[0]
    for label, stats in summary.methods.items():
        if label.startswith("caddtree"):
            axis.scatter(stats.budget_mean, value(stats), marker="*" if label.endswith("exact") else "D", s=120,
                         color=line.get_color(), zorder=3, label=f"{summary.dataset} {label}")


def plot_budget_histogram(records: list[Record], path: Path) -> bool:
    """How often caddtree chose each tree size; False if caddtree did not run."""
    chosen = {}
    for record in records:
        if record.method.startswith("caddtree"):
            chosen.setdefault(record.method, []).extend(record.budgets)
    if not chosen:
        return False
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4))
    largest = max(max(budgets, default=0) for budgets in chosen.values())
    bins = np.arange(largest + 2) - 0.5 if largest < 64 else 50
    for label, budgets in chosen.items():
        axis.hist(budgets, bins=bins, alpha=0.6, label=label)
    axis.set_xlabel("tree budget chosen in a round")
    axis.set_ylabel("rounds")
    axis.legend()
    _save(plt, figure, path)
    return True


def plot_cost_model(model: CostModel | None, path: Path) -> bool:
    """Measured verify times and both fitted curves, one colour per context length."""
    if model is None:
        return False
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4))
    sizes = np.asarray(model.measurements["sizes"])
    dense = np.unique(np.concatenate([sizes, np.geomspace(max(sizes.min(), 1), sizes.max(), 400)]))
    rows = zip(model.contexts, model.measurements["verify_seconds"], model.verify_convex, model.verify_monotone)
    for context, measured, convex, monotone in rows:
        points = axis.plot(sizes, 1000 * np.asarray(measured), "o", label=f"l={context} measured")[0]
        colour = points.get_color()
        axis.plot(dense, 1000 * convex(dense), "-", color=colour, label=f"l={context} convex fit")
        axis.plot(dense, 1000 * monotone(dense), "--", color=colour, label=f"l={context} monotone fit")
    axis.set_xscale("symlog", linthresh=1)  # the grid starts at n = 0
    axis.set_xlabel("tree size n")
    axis.set_ylabel("verify ms, Cv(n; l)")
    axis.legend(fontsize=7)
    _save(plt, figure, path)
    return True


def _save(plt, figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_report(out_dir: Path, records: list[Record], summaries: list[DatasetSummary], env: dict,
                 cost_model: CostModel | None) -> list[Path]:
    """Every output file; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    drawings = (
        (CURVES_PNG, lambda path: plot_budget_curves(summaries, path)),
        (HISTOGRAM_PNG, lambda path: plot_budget_histogram(records, path)),
        (COST_PNG, lambda path: plot_cost_model(cost_model, path)),
    )
    plots = [out_dir / name for name, draw in drawings if draw(out_dir / name)]
    write_results_json(out_dir / RESULTS_JSON, records, summaries, env)
    write_markdown(out_dir / RESULTS_MD, summaries, env, plots)
    return [out_dir / RESULTS_JSON, out_dir / RESULTS_MD, *plots]
