"""Fit measured verification times to curves of tree size: convex (greedy rule) or monotone (exact rule)."""

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import isotonic_regression, nnls


@dataclass(frozen=True)
class CostCurve:
    """Piecewise-linear non-decreasing verify time (seconds) against tree size n.

    Below the first knot the curve is clamped; beyond the last it continues with the last segment's
    slope, so budgets larger than the profiled grid still pay for their extra nodes.
    """

    sizes: tuple[float, ...]  # knot positions, strictly increasing
    seconds: tuple[float, ...]  # curve value at each knot

    def __post_init__(self):
        if len(self.sizes) == 0 or len(self.sizes) != len(self.seconds):
            raise ValueError("a cost curve needs as many knot values as knots, and at least one knot")
        if np.any(np.diff(self.sizes) <= 0):
            raise ValueError("cost curve knots must be strictly increasing")
        if np.any(np.diff(self.seconds) < 0):
            raise ValueError("cost curve values must be non-decreasing")

    @property
    def tail_slope(self) -> float:
        if len(self.sizes) == 1:
            return 0.0
        return (self.seconds[-1] - self.seconds[-2]) / (self.sizes[-1] - self.sizes[-2])

    def __call__(self, n: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """Seconds at each n (float64); a tensor in gives a tensor on the same device out."""
        if isinstance(n, torch.Tensor):
            return torch.from_numpy(self(n.detach().cpu().numpy())).to(n.device)
        n = np.asarray(n, dtype=np.float64)
        inside = np.interp(n, self.sizes, self.seconds)  # np.interp clamps at both ends
        return inside + self.tail_slope * np.maximum(n - self.sizes[-1], 0.0)


def fit_convex(sizes, seconds) -> CostCurve:
    """Least-squares fit that is non-decreasing and convex, with knots at the measured sizes.

    The curve is a + b*(n - n_0) + sum_k c_k * max(0, n - n_k) over the interior sizes n_k; all
    coefficients >= 0 is exactly "non-decreasing and convex" for this basis, so NNLS solves it.
    """
    sizes, seconds = _as_points(sizes, seconds)
    knots = np.unique(sizes)
    # Scale both axes to O(1) so NNLS's tolerances do not depend on units (seconds, node counts).
    size_scale = max(knots[-1] - knots[0], 1.0)
    time_scale = max(np.abs(seconds).max(), np.finfo(float).tiny)
    coefficients, _ = nnls(_hinge_basis(sizes, knots, size_scale), seconds / time_scale)
    knot_seconds = _hinge_basis(knots, knots, size_scale) @ coefficients * time_scale
    return CostCurve(tuple(knots.tolist()), tuple(knot_seconds.tolist()))


def fit_monotone(sizes, seconds) -> CostCurve:
    """Least-squares non-decreasing fit at the measured sizes; keeps steps (CUDA-graph buckets, tiling)."""
    sizes, seconds = _as_points(sizes, seconds)
    knots, point_knot, counts = np.unique(sizes, return_inverse=True, return_counts=True)
    # Least squares over repeats equals a count-weighted fit to the per-size means.
    means = np.bincount(point_knot, weights=seconds) / counts
    fitted = isotonic_regression(means, weights=counts, increasing=True).x
    return CostCurve(tuple(knots.tolist()), tuple(fitted.tolist()))


def _as_points(sizes, seconds) -> tuple[np.ndarray, np.ndarray]:
    sizes = np.asarray(sizes, dtype=np.float64).ravel()
    seconds = np.asarray(seconds, dtype=np.float64).ravel()
    if sizes.size == 0 or sizes.shape != seconds.shape:
        raise ValueError(f"need equally many sizes and times, got {sizes.size} and {seconds.size}")
    if not (np.isfinite(sizes).all() and np.isfinite(seconds).all()):
        raise ValueError("sizes and times must be finite")
    return sizes, seconds


def _hinge_basis(n: np.ndarray, knots: np.ndarray, scale: float) -> np.ndarray:
    """(len(n), len(knots)) columns: constant, linear from the first knot, one hinge per interior knot."""
    offsets = (n[:, None] - knots[None, :-1]) / scale
    offsets[:, 1:] = np.maximum(offsets[:, 1:], 0.0)
    return np.concatenate([np.ones((len(n), 1)), offsets], axis=1)
