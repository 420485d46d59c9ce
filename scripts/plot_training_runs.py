"""Held-out quality across training runs that continue one another (`--init-from`), on one step axis.

    python scripts/plot_training_runs.py docs/training/cpu1_history.json docs/training/cpu2_history.json \
        docs/training/cpu3_history.json docs/training/cpu4_history.json@cpu2 docs/training/cpu5_history.json@cpu4 \
        docs/training/cpu6_history.json@cpu5 docs/training/cpu7_history.json@ \
        docs/training/cpu8_history.json docs/training/cpu9_history.json docs/training/cpu10_history.json \
        docs/training/cpu11_history.json docs/training/cpu12_history.json@cpu10 \
        docs/training/cpu13_history.json@cpu12 docs/training/cpu15_history.json@cpu12 docs/training/cpu16_history.json \
        docs/training/cpu17_history.json@cpu12 docs/training/cpu18_history.json@cpu12 \
        docs/training/cpu19_history.json@cpu12 docs/training/cpu20_history.json@cpu19 --out docs/training/runs.png

Each history is a run's `history.json`, named by its file name less `_history.json`. A run's steps
are counted after those of the run before it on the command line, or after those of the run named
after `@` when it continued an earlier one; a bare `@` starts a run from scratch at step 0.
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib import ticker

MEASURES = (("eval_block_tau", "held-out block τ"), ("eval_chain_tau", "held-out chain τ (as decoded)"),
            ("eval_loss", "held-out loss"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("histories", nargs="+",
                        help="HISTORY.json, HISTORY.json@RUN if it continued RUN, HISTORY.json@ if it started from scratch")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    figure, axes = plt.subplots(1, len(MEASURES), figsize=(16, 4))
    last_step, previous = {}, None
    for index, argument in enumerate(args.histories):
        path, continued, parent = argument.partition("@")
        path, parent = Path(path), parent if continued else previous
        run = path.name.removesuffix("_history.json")
        history = json.loads(path.read_text())
        steps = [last_step.get(parent, 0) + step for step in history["evaluations"]]
        for axis, (name, label) in zip(axes, MEASURES):
            if name not in history:  # runs before chain τ was measured
                continue
            axis.plot(steps, history[name], "-", marker="os"[index // 10 % 2], label=run, color=f"C{index % 10}")  # ten colours, then squares
            axis.set(xlabel="step, all runs", ylabel=label, xscale="log")
        last_step[run], previous = steps[-1], run
    for axis in axes:
        axis.xaxis.set_major_locator(ticker.LogLocator(subs=(1, 2, 5)))
        axis.xaxis.set_major_formatter(ticker.FuncFormatter(lambda step, _: f"{step / 1000:g}k"))
        axis.xaxis.set_minor_formatter(ticker.NullFormatter())
        axis.grid(alpha=0.3, which="both")
    figure.legend(*axes[0].get_legend_handles_labels(), loc="center right")  # one legend: every run has block τ
    figure.tight_layout(rect=(0, 0, 0.92, 1))
    figure.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
