"""Linear layers on few rows, on the CPU: the same product, dispatched to a kernel that is fast there.

A decoding step applies every weight to a handful of rows (1 for plain decoding, n+1 to verify a
tree of n nodes, b for a draft block). On the CPU, `F.linear` sends 1 row to a single-threaded
matrix-vector kernel and 2-3 rows to a path slower still, so the step is bound by reading weights
at ~10 GB/s. Written as weight @ rows^T, with at least two rows, the same product runs as a
multi-threaded GEMM. Measured on the 2-core CPU, all of SmolLM2-135M's 210 body weights once
(cold in cache), F.linear vs weight @ rows^T: 1 row 34.5 vs 15.5 ms, 2 rows 50.6 vs 21.9,
3 rows 59.0 vs 21.4, 5 rows 52.5 vs 30.1, 17 rows 65.5 vs 56.5; its 49152 x 576 output head:
1 row 9.8 vs 3.4 ms, 3 rows 32.5 vs 4.0.

`install` reroutes a model's nn.Linear layers only inside `enabled()`, which the engine's runners
enter for their own passes: the model keeps stock kernels everywhere else (transformers'
`generate`, the outside reference of the benchmark, included).
"""

from __future__ import annotations

import contextlib
import contextvars
import types

import torch
import torch.nn.functional as F
from torch import nn

MAX_ROWS = 32  # beyond this F.linear is as fast or faster (33 rows: 129 vs 143 ms a verification)
_enabled = contextvars.ContextVar("caddtree_few_rows", default=False)


def rows_times_weight(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(rows, weight, bias) for rows (..., H), weight (V, H); as weight @ rows^T where that
    is faster (few rows on the CPU, no gradient needed)."""
    count = rows.numel() // rows.shape[-1]
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (rows, weight, bias))
    if rows.device.type != "cpu" or count > MAX_ROWS or needs_grad:
        return F.linear(rows, weight, bias)
    flat = rows.reshape(count, rows.shape[-1])
    padded = gemm_rows(count)
    if padded > count:
        flat = torch.cat([flat, flat.new_zeros(padded - count, flat.shape[1])])
    out = (weight @ flat.T)[:, :count].T.contiguous()  # (M, V)
    if bias is not None:
        out += bias
    return out.view(*rows.shape[:-1], weight.shape[0])


def gemm_rows(count: int) -> int:
    """Rows to hand the GEMM for `count` rows: one row would take the slow matrix-vector kernel,
    so two; beyond 8, the next multiple of 8, where the CPU GEMM is fast (all body weights:
    13, 14, 15 rows 92, 93, 112 ms, 16 rows 60 ms; padded to 16, 62 ms each)."""
    return 2 if count == 1 else count if count <= 8 else -(-count // 8) * 8


def install(model: nn.Module) -> None:
    """Route `model`'s plain nn.Linear layers through `rows_times_weight` inside `enabled()`."""
    for module in model.modules():
        if type(module) is nn.Linear and "forward" not in vars(module):  # not installed yet
            module.forward = types.MethodType(_linear_forward, module)  # bound: deep copies rebind it


def _linear_forward(module: nn.Linear, rows: torch.Tensor) -> torch.Tensor:
    return linear(rows, module.weight, module.bias)


def linear(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through `rows_times_weight` inside `enabled()`."""
    return (rows_times_weight if _enabled.get() else F.linear)(rows, weight, bias)


@contextlib.contextmanager
def enabled():
    """Installed layers take the few-row dispatch within this block."""
    token = _enabled.set(True)
    try:
        yield
    finally:
        _enabled.reset(token)
