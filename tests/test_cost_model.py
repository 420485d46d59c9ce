import json

import numpy as np
import pytest
import torch

from caddtree.cost.fit import CostCurve, fit_convex, fit_monotone
from caddtree.cost.model import VERSION, CostModel, cache_path
from caddtree.errors import CaddtreeError

META = {"target": "Qwen/Qwen3-4B", "drafter": "z-lab/Qwen3-4B-DFlash-b16", "device": "cuda:H100", "dtype": "bfloat16"}
SIZES = np.array([1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024], dtype=float)
GRID = np.linspace(0.0, 1500.0, 3001)  # covers below the first knot and beyond the last


def convex_truth(n):
    return 0.01 + 1e-5 * n + 2e-8 * n**2


def step_truth(n):
    return 0.01 * (1 + np.searchsorted([16, 128, 512], n, side="left"))


def assert_non_decreasing_and_convex(curve):
    values = curve(GRID)
    assert np.diff(values).min() >= -1e-15
    assert np.diff(values, n=2).min() >= -1e-12


def test_fit_convex_recovers_noisy_convex_increasing_curve():
    rng = np.random.default_rng(0)
    sizes = np.repeat(SIZES, 3)  # three timing repeats per size
    seconds = convex_truth(sizes) * (1 + 0.01 * rng.standard_normal(sizes.size))
    curve = fit_convex(sizes, seconds)
    assert curve.sizes == tuple(SIZES)
    assert_non_decreasing_and_convex(curve)
    # Compare at the knots: between them a line cannot follow the parabola closer than its chord.
    np.testing.assert_allclose(curve(SIZES), convex_truth(SIZES), rtol=0.02)


@pytest.mark.parametrize("truth", [lambda n: 0.01 + 1e-4 * np.sqrt(n), step_truth], ids=["concave", "step"])
def test_fit_convex_of_non_convex_input_is_still_non_decreasing_and_convex(truth):
    assert_non_decreasing_and_convex(fit_convex(SIZES, truth(SIZES)))


def test_fit_monotone_keeps_steps_that_fit_convex_smooths_away():
    rng = np.random.default_rng(1)
    sizes = np.repeat(SIZES, 3)
    seconds = step_truth(sizes) + 1e-5 * rng.standard_normal(sizes.size)
    monotone = fit_monotone(sizes, seconds)
    assert np.diff(monotone.seconds).min() >= 0
    np.testing.assert_allclose(monotone(SIZES), step_truth(SIZES), atol=1e-4)
    assert np.abs(fit_convex(sizes, seconds)(SIZES) - step_truth(SIZES)).max() > 2e-3


def test_fit_monotone_pools_a_decreasing_pair():
    # Size 2 averages 2.5 over two repeats, size 3 has 2.0: least squares pools all three points.
    curve = fit_monotone([1, 2, 2, 3], [1.0, 3.0, 2.0, 2.0])
    np.testing.assert_allclose(curve.seconds, [1.0, 7 / 3, 7 / 3])


def test_curve_extends_last_slope_and_clamps_below_first_knot():
    curve = CostCurve((2.0, 4.0, 8.0), (1.0, 2.0, 4.0))
    np.testing.assert_allclose(curve(np.array([0.0, 2.0, 3.0, 8.0, 16.0])), [1.0, 1.0, 1.5, 4.0, 8.0])
    as_tensor = curve(torch.tensor([0, 3, 16]))
    assert as_tensor.dtype == torch.float64
    assert as_tensor.tolist() == [1.0, 1.5, 8.0]


def test_single_knot_curve_is_constant():
    curve = fit_convex([64, 64], [0.5, 0.7])
    np.testing.assert_allclose(curve(np.array([1.0, 64.0, 1000.0])), [0.6, 0.6, 0.6])


def hand_built_model():
    # Convex: 1 + 0.1 n at context 100, 3 + 0.2 n at context 300 (for n <= 10, then the same slopes).
    # Monotone: one step at n = 5, from 1 to 2 at context 100 and from 3 to 5 at context 300.
    return CostModel(
        meta=dict(META),
        contexts=[100, 300],
        draft_seconds=[0.1, 0.2],
        verify_convex=[CostCurve((0.0, 10.0), (1.0, 2.0)), CostCurve((0.0, 10.0), (3.0, 5.0))],
        verify_monotone=[
            CostCurve((0.0, 4.0, 5.0, 10.0), (1.0, 1.0, 2.0, 2.0)),
            CostCurve((0.0, 4.0, 5.0, 10.0), (3.0, 3.0, 5.0, 5.0)),
        ],
        measurements={},
    )


def test_round_costs_interpolates_linearly_in_context_length():
    model = hand_built_model()
    n = np.arange(13, dtype=float)
    costs = model.round_costs(12, 150, convex=True)  # a quarter of the way from 100 to 300
    assert costs.shape == (13,) and costs.dtype == torch.float64
    expected = 0.75 * (0.1 + 1 + 0.1 * n) + 0.25 * (0.2 + 3 + 0.2 * n)
    np.testing.assert_allclose(costs.numpy(), expected)


def test_round_costs_switches_between_convex_and_monotone_curves():
    model = hand_built_model()
    n = np.arange(8)
    # Halfway between the contexts: draft 0.15; verify steps from (1+3)/2 to (2+5)/2 at n = 5.
    expected_monotone = 0.15 + np.where(n < 5, 2.0, 3.5)
    np.testing.assert_allclose(model.round_costs(7, 200, convex=False).numpy(), expected_monotone)
    np.testing.assert_allclose(model.round_costs(7, 200, convex=True).numpy(), 0.15 + 2 + 0.15 * n)


@pytest.mark.parametrize("context_len, row", [(0, 0), (100, 0), (300, 1), (5000, 1)])
def test_round_costs_clamps_outside_profiled_contexts(context_len, row):
    model = hand_built_model()
    n = np.arange(11, dtype=float)
    expected = [0.1 + 1 + 0.1 * n, 0.2 + 3 + 0.2 * n][row]
    np.testing.assert_allclose(model.round_costs(10, context_len, convex=True).numpy(), expected)


def test_round_costs_result_can_be_modified_without_touching_the_cache():
    model = hand_built_model()
    model.round_costs(10, 100, convex=True).zero_()
    assert model.round_costs(10, 100, convex=True)[0].item() == pytest.approx(1.1)


def fitted_model():
    contexts = [128, 1024, 4096]
    verify = [convex_truth(SIZES) * scale for scale in (1.0, 1.3, 2.0)]
    return CostModel.fit(META, contexts, SIZES.tolist(), verify, [0.002, 0.0025, 0.004])


def test_json_round_trip_is_exact(tmp_path):
    model = fitted_model()
    path = tmp_path / "new" / "dir" / "model.json"
    model.save(path)
    assert json.loads(path.read_text())["format"] == "caddtree-cost-model"
    assert [p.name for p in path.parent.iterdir()] == ["model.json"]  # no temp file left behind
    loaded = CostModel.load(path, expect_meta=META)
    assert loaded == model
    assert torch.equal(loaded.round_costs(2000, 700, convex=False), model.round_costs(2000, 700, convex=False))


def write_model_json(path, **changes):
    data = json.loads(json.dumps(fitted_model()._to_json()))
    data.update(changes)
    path.write_text(json.dumps(data))
    return path


def test_load_missing_file(tmp_path):
    with pytest.raises(CaddtreeError, match="does not exist"):
        CostModel.load(tmp_path / "absent.json")


def test_load_invalid_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"format": ')
    with pytest.raises(CaddtreeError, match="is not valid JSON"):
        CostModel.load(path)


def test_load_wrong_format(tmp_path):
    with pytest.raises(CaddtreeError, match="is not a caddtree cost model"):
        CostModel.load(write_model_json(tmp_path / "m.json", format="something-else"))


def test_load_wrong_version(tmp_path):
    with pytest.raises(CaddtreeError, match=f"has version 1; this caddtree reads {VERSION}"):
        CostModel.load(write_model_json(tmp_path / "m.json", version=1))


def test_load_missing_field(tmp_path):
    path = write_model_json(tmp_path / "m.json")
    data = json.loads(path.read_text())
    del data["verify_convex"]
    path.write_text(json.dumps(data))
    with pytest.raises(CaddtreeError, match="lacks the field\\(s\\) verify_convex"):
        CostModel.load(path)


def test_load_missing_meta_field(tmp_path):
    meta = {key: value for key, value in META.items() if key != "dtype"}
    with pytest.raises(CaddtreeError, match="malformed: meta lacks dtype"):
        CostModel.load(write_model_json(tmp_path / "m.json", meta=meta))


def test_load_malformed_curve(tmp_path):
    curves = [{"sizes": [4, 2], "seconds": [1, 2]}] * 3
    with pytest.raises(CaddtreeError, match="malformed: cost curve knots must be strictly increasing"):
        CostModel.load(write_model_json(tmp_path / "m.json", verify_convex=curves))


@pytest.mark.parametrize("key", ["target", "drafter", "device", "dtype"])
def test_load_meta_mismatch_names_field_and_both_values(tmp_path, key):
    path = write_model_json(tmp_path / "m.json")
    expected = {**META, key: "other"}
    with pytest.raises(CaddtreeError) as raised:
        CostModel.load(path, expect_meta=expected)
    assert str(raised.value) == (
        f"cost model {path} was measured for {key} {META[key]!r}, not 'other'; "
        "re-run `caddtree profile` or pass --cost-model auto"
    )


def test_cache_path_depends_on_meta_and_honours_cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("CADDTREE_CACHE", str(tmp_path))
    path = cache_path(META)
    assert path.parent == tmp_path / "cost" and path.suffix == ".json"
    assert path.name.startswith("Qwen3-4B-Qwen3-4B-DFlash-b16-cuda_H100-bfloat16-")
    assert cache_path({**META, "dtype": "float16"}) != path
    assert cache_path({**META, "target": "Other/Qwen3-4B"}) != path  # same readable prefix, other hash


def test_cache_path_defaults_under_home(tmp_path, monkeypatch):
    monkeypatch.delenv("CADDTREE_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_path(META).parent == tmp_path / ".cache" / "caddtree" / "cost"


def test_rounds_without_a_draft_pass_cost_only_verification():
    sizes = [0, 1, 4, 16]
    meta = {"target": "t", "drafter": "d", "device": "cpu", "dtype": "float32"}
    model = CostModel.fit(meta, [64, 512], sizes, [[0.05 + 0.001 * n for n in sizes]] * 2, [0.01, 0.02])
    for context in (64, 300, 512):
        drafted = model.round_costs(16, context, convex=False)
        looked_up = model.round_costs(16, context, convex=False, drafted=False)
        draft = 0.01 + 0.01 * min(1.0, max(0.0, (context - 64) / 448))
        assert torch.allclose(drafted - looked_up, torch.full_like(drafted, draft))
        assert looked_up[0] == pytest.approx(model.plain_step_seconds(context, convex=False))
