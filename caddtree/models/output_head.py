"""Output heads on the CPU: the same product, dispatched to the kernel that is fast for few rows.

A vocabulary head is a (V, H) weight applied to a handful of rows per decoding step (1 for plain
decoding, n+1 to verify a tree of n nodes). On the CPU, `F.linear` sends 1 row to a
single-threaded matrix-vector kernel and 2-3 rows to a path slower still: for SmolLM2's
49152 x 576 head, 9.8 ms for 1 row, 21.8 for 2, 32.5 for 3. Written as weight @ rows^T, with at
least two rows, the same product runs as a multi-threaded GEMM: 3.4, 3.4 and 4.0 ms (and never
slower for more rows).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn


def rows_times_weight(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(rows, weight, bias), as weight @ rows^T on the CPU: rows (..., H), weight (V, H)."""
    if rows.device.type != "cpu" or torch.is_grad_enabled() and (rows.requires_grad or weight.requires_grad):
        return F.linear(rows, weight, bias)
    flat = rows.reshape(-1, rows.shape[-1])  # (M, H)
    count = flat.shape[0]
    if count == 1:  # one row takes the slow matrix-vector kernel: give the GEMM a second one
        flat = torch.cat([flat, flat.new_zeros(1, flat.shape[1])])
    out = (weight @ flat.T)[:, :count].T  # (M, V)
    if bias is not None:
        out = out + bias
    return out.reshape(*rows.shape[:-1], weight.shape[0])


def install(model: nn.Module) -> None:
    """Make `model`'s output head (a plain nn.Linear) compute through `rows_times_weight`."""
    head = model.get_output_embeddings()
    if type(head) is nn.Linear and head.weight.device.type == "cpu":
        head.forward = types.MethodType(_linear_forward, head)  # a bound method: deep copies rebind it


def _linear_forward(head: nn.Linear, rows: torch.Tensor) -> torch.Tensor:
    return rows_times_weight(rows, head.weight, head.bias)
