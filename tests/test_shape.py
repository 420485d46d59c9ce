"""Plain statements about a measured cost curve's shape, checked on curves whose shape we know."""

import numpy as np
import pytest

from caddtree.cost.model import CostModel
from caddtree.cost.shape import convexity_statement, monotonicity_statement, plot_verify_costs
from caddtree.models.architectures import ARCHITECTURES, random_model

SIZES = [0, 1, 2, 4, 8, 16, 32, 64]


def test_a_convex_curve_is_called_convex():
    costs = [10 + 0.01 * n**2 for n in SIZES]
    assert convexity_statement(SIZES, costs).startswith("convex")
    assert monotonicity_statement(SIZES, costs).startswith("non-decreasing")


def test_a_step_is_not_convex_and_the_statement_says_where():
    costs = [10, 10, 10, 10, 20, 20, 20, 40]  # CUDA-graph-like buckets
    statement = convexity_statement(SIZES, costs)
    assert statement.startswith("not convex: at n=8 ")
    assert "from n=4 to n=16" in statement


def test_the_measured_cpu_curve_is_neither_monotone_nor_convex():
    costs = [57.4, 91.9, 111.8, 71.9, 82.7, 94.1, 121.6, 172.3]  # measured here, context 64
    more = round(100 * (111.8 - 71.9) / 71.9)  # 55: the dearer small tree against the cheaper larger one
    assert monotonicity_statement(SIZES, costs) == f"not monotone: n=2 costs {more}% more than n=4"
    chord = 91.9 + (71.9 - 91.9) / 3  # the straight line from n=1 to n=4, at n=2
    expected = f"not convex: at n=2 it costs {round(100 * (111.8 - chord) / chord)}% more than the straight line"
    assert convexity_statement(SIZES, costs).startswith(expected)


def test_noise_below_the_threshold_is_ignored():
    costs = np.array([10 + 0.5 * n for n in SIZES])
    costs[3] *= 1.02
    assert convexity_statement(SIZES, costs).startswith("convex")
    assert convexity_statement(SIZES, costs, noise=0.001).startswith("not convex: at n=4")


def test_the_plot_is_written(tmp_path):
    contexts = [64, 512]
    rows = [[0.01 + 0.001 * n for n in SIZES], [0.02 + 0.001 * n for n in SIZES]]
    model = CostModel.fit({"target": "t", "drafter": "d", "device": "cpu", "dtype": "float32"}, contexts, SIZES, rows, [0.005, 0.006])
    plot_verify_costs(model, tmp_path / "cv.png")
    assert (tmp_path / "cv.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("name, billions", [("qwen3-4b", 4.02), ("qwen3-8b", 8.19)])
def test_random_architectures_have_the_published_sizes(name, billions):
    model = random_model(f"random:{name}", "meta", None)  # shapes only, no memory
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=0.01)
    assert name in ARCHITECTURES
