"""Measuring Cv(n; l) and Cd(l) on this machine, and `--cost-model auto`'s profile-once cache.

Cost depends on shapes, not on weight values or tokens: we time real target forwards over random
trees of n nodes after a random context of l tokens, and real drafter passes.
"""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import torch
from tqdm import tqdm

from caddtree.cost.model import CostModel, cache_path
from caddtree.decode.engine import Engine, synchronize
from caddtree.errors import CaddtreeError
from caddtree.models.drafter_io import config_to_dict
from caddtree.models.target import dtype_name
from caddtree.tree.build import rank_nodes, tree_from_ranked

FULL_SIZES = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
FULL_CONTEXTS = (128, 512, 1536)
# Size 0 is the root alone: the cost of a plain autoregressive step, the baseline every tree must beat.
QUICK_CONTEXTS = (64, 512)
# A CPU verifies a few hundred tokens in seconds; a GPU verifies 1024 in milliseconds.
# Small trees are where a CPU's best budgets lie, and its cost curve is not smooth there.
QUICK_SIZES = {"cpu": (0, 1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 64), "cuda": (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)}


def device_label(device: torch.device) -> str:
    """Names the hardware, so a cached model is not reused on other hardware."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{torch.get_num_threads()}threads"


def cost_meta(engine: Engine, drafter_name: str) -> dict:
    """What a cost model was measured for. `shapes` digests both models' configurations (costs
    depend on shapes, not on weight values), so the auto cache never serves a model measured for
    another architecture that happens to sit at the same path."""
    drafter = engine.drafts.drafter.config if engine.drafts else None
    shapes = json.dumps([engine.target.model.config.to_dict(), drafter and config_to_dict(drafter)], sort_keys=True,
                        default=str)
    return {
        "target": engine.target.name,
        "drafter": drafter_name,
        "device": device_label(engine.target.device) + ("/cuda-graphs" if engine.verifier.cuda_graphs else ""),
        "dtype": dtype_label(engine),
        "shapes": hashlib.sha256(shapes.encode()).hexdigest()[:16],
    }


def dtype_label(engine: Engine) -> str:
    """The target's precision, and the drafter's where it drafts in another one."""
    target = dtype_name(engine.target.dtype)
    drafter = dtype_name(engine.drafts.dtype) if engine.drafts else target
    return target if drafter == target else f"{target} (drafter {drafter})"


def _timed(runs: list, repeats: int, device: torch.device) -> list[float]:
    """The lower quartile of the wall seconds of each of `runs` over `repeats` calls, after one
    warm-up call each.

    The calls go round-robin over `runs`, so a burst of noise on the machine spreads over all
    shapes instead of shifting one shape's every sample (which made the cost curve jagged). Noise
    on a shared machine only ever adds time, so a low quantile is the steadier estimate of what a
    shape costs: four quick profiles in a row put the 8-node step 6.0-10.2 ms above the plain
    step with medians of 5 repeats, 8.2-8.5 ms with their lower quartile (docs/results.md).
    """
    for run in runs:
        run()
    times = [[] for _ in runs]
    for _ in range(repeats):
        for run, samples in zip(runs, times):
            start = time.perf_counter()
            run()
            synchronize(device)
            samples.append(time.perf_counter() - start)
    return [float(np.percentile(samples, 25)) for samples in times]


def _random_tree(draft_len: int, vocab: int, nodes: int, generator: torch.Generator, device):
    """A realistic tree shape: the best-first tree of random peaked marginals."""
    log_probs = torch.log_softmax(4 * torch.randn(draft_len, vocab, generator=generator), dim=-1)
    ranked = rank_nodes(log_probs.to(device), nodes)
    return tree_from_ranked(ranked, ranked.size)


def _verify_once(engine: Engine, tree, root) -> None:
    engine.verifier.verify(*tree.with_root(root), tree.ancestor_mask)
    engine.verifier.keep(tree.depths.new_zeros(0))  # back to the context alone


def profile(engine: Engine, drafter_name: str, sizes=FULL_SIZES, contexts=FULL_CONTEXTS,
            repeats: int = 3, seed: int = 0, show_progress: bool = True) -> CostModel:
    """Measure and fit a cost model for this engine's target and drafter on this device."""
    if engine.drafts is None:
        raise CaddtreeError("profiling needs a drafter (the draft cost is part of the model)")
    too_long = [c for c in contexts if c + engine.drafts.block_size >= engine.target.max_positions]
    if too_long:
        raise CaddtreeError(f"context lengths {too_long} do not fit the model's {engine.target.max_positions} positions")
    device = engine.target.device
    vocab = engine.target.vocab_size
    draft_len = engine.draft_len
    generator = torch.Generator().manual_seed(seed)
    trees = {n: _random_tree(draft_len, vocab, n, generator, device) for n in sizes}
    root = torch.tensor(1, device=device)
    engine.verifier.reserve(max(contexts) + max(sizes) + 1)
    engine.drafts.reserve(max(contexts))
    verify_seconds, draft_seconds = [], []
    steps = tqdm(total=len(contexts), desc="profiling", disable=not show_progress, unit="context")
    for context_len in contexts:
        prompt = torch.randint(0, vocab, (context_len,), generator=generator).to(device)
        _, features = engine.verifier.prefill(prompt)
        engine.drafts.reset()
        engine.drafts.extend(features, torch.arange(context_len, device=device))
        draft = lambda: engine.drafts.draft(root, context_len, draft_len)
        verifies = [lambda n=n: _verify_once(engine, trees[n], root) for n in sizes]
        draft_time, *row = _timed([draft, *verifies], repeats, device)
        draft_seconds.append(draft_time)
        verify_seconds.append(row)
        steps.update()
    steps.close()
    return CostModel.fit(cost_meta(engine, drafter_name), list(contexts), list(sizes), verify_seconds, draft_seconds)


def auto_cost_model(engine: Engine, drafter_name: str, show_progress: bool = True) -> CostModel:
    """The cached cost model for this (target, drafter, device, dtype), profiled briefly if absent."""
    meta = cost_meta(engine, drafter_name)
    path = cache_path(meta)
    if path.is_file():
        try:
            return CostModel.load(path, expect_meta=meta)
        except CaddtreeError:
            pass  # written by an older caddtree, or damaged: a cache is remade, not reported
    contexts = [c for c in QUICK_CONTEXTS if c + engine.drafts.block_size < engine.target.max_positions] or [1]
    sizes = QUICK_SIZES.get(engine.target.device.type, QUICK_SIZES["cpu"])
    model = profile(engine, drafter_name, sizes, contexts, repeats=5, show_progress=show_progress)
    model.save(path)
    return model
