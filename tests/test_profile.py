"""Profiling on a tiny engine, and the `--cost-model auto` cache."""

import json

import pytest
from caddtree.cost.model import CostModel, cache_path
from caddtree.cost.profile import auto_cost_model, cost_meta, profile
from caddtree.decode.engine import Engine
from caddtree.models.drafter_io import random_drafter
from tiny import tiny_target


def tiny_engine(static_shapes: bool = False) -> Engine:
    target = tiny_target("llama", vocab_size=32, seed=1)
    return Engine(target, random_drafter(target, num_layers=1, block_size=4), static_shapes)


@pytest.mark.parametrize("static_shapes", [False, True])
def test_profile_measures_every_size_and_leaves_the_cache_empty(static_shapes):
    engine = tiny_engine(static_shapes)
    model = profile(engine, "random", sizes=(0, 1, 3, 9), contexts=(4, 12), repeats=1, show_progress=False)
    assert model.measurements["sizes"] == [0, 1, 3, 9] and model.contexts == [4, 12]
    assert all(seconds > 0 for row in model.measurements["verify_seconds"] for seconds in row)
    assert all(seconds > 0 for seconds in model.draft_seconds)
    assert engine.verifier.context_len == 12  # each timed verification was rolled back
    costs = model.round_costs(9, 8, convex=False)
    assert costs.shape == (10,) and bool((costs[1:] >= costs[:-1]).all())


def test_auto_profiles_once_then_reuses_and_remakes_a_damaged_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CADDTREE_CACHE", str(tmp_path))
    engine = tiny_engine()
    path = cache_path(cost_meta(engine, "random"))
    first = auto_cost_model(engine, "random", show_progress=False)
    assert path.is_file()
    stamp = path.stat().st_mtime_ns
    again = auto_cost_model(engine, "random", show_progress=False)
    assert path.stat().st_mtime_ns == stamp and again.measurements == first.measurements
    path.write_text(json.dumps({"format": "caddtree-cost-model", "version": 1}))  # an older caddtree's file
    remade = auto_cost_model(engine, "random", show_progress=False)
    assert CostModel.load(path).measurements == remade.measurements


@pytest.mark.parametrize("bf16_units, label", [(True, "float32 (drafter bfloat16)"), (False, "float32")])
def test_a_cost_model_records_the_drafters_precision_where_it_differs(monkeypatch, bf16_units, label):
    """A profile made with a bfloat16 drafter is not served to a float32 one (its draft cost differs)."""
    import torch

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16_units, raising=False)
    target = tiny_target("qwen3", vocab_size=32)
    assert cost_meta(Engine(target, random_drafter(target, 1, 5)), "random")["dtype"] == label
