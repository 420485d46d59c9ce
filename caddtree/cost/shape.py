"""What a measured Cv(n) curve looks like: plain statements on its convexity and monotonicity
(the greedy budget rule's optimality proof assumes a convex, increasing curve), and a plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np

NOISE = 0.05  # deviations under 5% of the cost are read as timing noise


def convexity_statement(sizes, seconds, noise: float = NOISE) -> str:
    """'convex' or where it is not: the measured point that lies furthest above the chord of its
    neighbours, as a share of the chord's value there."""
    n, cost = np.asarray(sizes, dtype=float), np.asarray(seconds, dtype=float)
    if len(n) < 3:
        return "too few sizes to judge convexity"
    weight = (n[1:-1] - n[:-2]) / (n[2:] - n[:-2])
    chord = cost[:-2] + weight * (cost[2:] - cost[:-2])
    excess = (cost[1:-1] - chord) / chord
    worst = int(np.argmax(excess))
    if excess[worst] <= noise:
        return f"convex (within {noise:.0%} timing noise)"
    return (f"not convex: at n={n[worst + 1]:g} it costs {excess[worst]:.0%} more than the straight line "
            f"from n={n[worst]:g} to n={n[worst + 2]:g}")


def monotonicity_statement(sizes, seconds, noise: float = NOISE) -> str:
    """'non-decreasing' or the largest drop: a smaller tree that costs more than a larger one."""
    n, cost = np.asarray(sizes, dtype=float), np.asarray(seconds, dtype=float)
    later_min = np.minimum.accumulate(cost[::-1])[::-1]  # cheapest cost at this size or larger
    drop = (cost - later_min) / later_min  # how much more than the cheaper, larger tree
    worst = int(np.argmax(drop))
    if drop[worst] <= noise:
        return f"non-decreasing (within {noise:.0%} timing noise)"
    cheaper = worst + int(np.argmin(cost[worst:]))
    return f"not monotone: n={n[worst]:g} costs {drop[worst]:.0%} more than n={n[cheaper]:g}"


def plot_verify_costs(model, path: str | Path) -> None:
    """Measured Cv(n) per context length (points) with its convex and monotone fits (lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = np.asarray(model.measurements["sizes"], dtype=float)
    shown = np.maximum(sizes, 0.5)  # log axis: draw n = 0 at 0.5
    grid = np.unique(np.concatenate([sizes, np.geomspace(max(sizes[0], 1), sizes[-1], 200)]))
    figure, axis = plt.subplots(figsize=(7.5, 4.5))
    for index, (context, row) in enumerate(zip(model.contexts, model.measurements["verify_seconds"])):
        color = f"C{index}"
        axis.plot(shown, 1000 * np.asarray(row), "o", color=color, label=f"measured, l={context}")
        axis.plot(np.maximum(grid, 0.5), 1000 * model.verify_convex[index](grid), "-", color=color, lw=1,
                  label="convex fit (greedy rule)" if index == 0 else None)
        axis.plot(np.maximum(grid, 0.5), 1000 * model.verify_monotone[index](grid), ":", color=color, lw=1.5,
                  label="monotone fit (exact rule)" if index == 0 else None)
    axis.set_xscale("log")
    axis.set_xlabel("tree size n (nodes besides the root; n = 0 drawn at 0.5)")
    axis.set_ylabel("verify ms")
    meta = model.meta
    axis.set_title(f"Cv(n; l): {meta.get('target')} on {meta.get('device')}, {meta.get('dtype')}", fontsize=9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
