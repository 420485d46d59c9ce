"""Linear layers on the CPU without gradients: the same product as F.linear, through oneDNN's linear
with each weight packed once into oneDNN's own layout.

A decoding step applies every weight to a handful of rows (1 for plain decoding, n+1 to verify a
tree of n nodes, b for a draft block), a prefill to hundreds. On the CPU, `F.linear` sends 1 row to
a single-threaded matrix-vector kernel, 2-3 rows to a path slower still, and more to MKL's GEMM,
which on this machine's AMD EPYC runs at about half oneDNN's speed; oneDNN given an unpacked weight
reorders it on every call. Measured on the 2-core CPU (`python scripts/time_linear_kernels.py`,
alone), all of SmolLM2-135M's 210 body weights once, F.linear / weight @ rows^T / oneDNN / oneDNN
packed: 2 rows 35.4 / 12.2 / 16.7 / 12.3 ms, 4 rows 34.6 / 12.1 / 17.4 / 11.4, 5 rows 27.6 / 18.5 /
18.5 / 12.1, 8 rows 36.7 / 25.7 / 19.2 / 14.0, 16 rows 36.8 / 33.4 / 23.5 / 17.5, 64 rows 83.6 /
82.0 / 46.4 / 40.0, 512 rows 509 / 513 / 238 / 230; its 49152 x 576 output head, 8 rows 11.1 / 5.6
/ 3.7 / 2.6. Inside the target's whole forward packed oneDNN wins at every row count, 1 included
(verifying 0, 2, 3 nodes at context 64: 20.8, 23.9, 23.8 ms; 22.3, 31.1, 29.7 with weight @ rows^T
below 5 rows). Packing keeps a second copy of every weight (peak memory of a 64-token generation
of `make run`'s prompt: 1.66 GB, against 1.09 GB with F.linear).

`install` reroutes a model's nn.Linear layers only inside `enabled()`, which the engine's runners
enter for their own passes: the model keeps stock kernels everywhere else (transformers'
`generate`, the outside reference of the benchmark, included).
"""

from __future__ import annotations

import contextlib
import contextvars
import types
import weakref

import torch
import torch.nn.functional as F
from torch import nn

PACKED_FOR_ROWS = 64  # oneDNN's layout hint; 16, 64 and 256 timed alike
ONEDNN = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
          and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))
# The dtypes it takes here: bfloat16 only where oneDNN has bfloat16 kernels for this CPU.
ONEDNN_DTYPES = (torch.float32,) + ((torch.bfloat16,) if ONEDNN and torch.ops.mkldnn._is_mkldnn_bf16_supported() else ())
_enabled = contextvars.ContextVar("caddtree_packed_linear", default=False)
# id(weight) -> (weak reference to weight, (data pointer, version), packed copy); an entry leaves with its weight
_packed_weights: dict[int, tuple[weakref.ref, tuple[int, int], torch.Tensor]] = {}


def onednn_linear(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(rows, weight, bias) for rows (..., H), weight (V, H): through oneDNN with a packed
    weight where it computes what F.linear would (CPU, no gradient, same float32/bfloat16 dtypes,
    no autocast), else F.linear itself."""
    if not _onednn_takes(rows, weight, bias):
        return F.linear(rows, weight, bias)
    flat = rows.reshape(-1, rows.shape[-1])
    out = torch.ops.mkldnn._linear_pointwise(flat, _packed(weight), bias, "none", [], "")
    return out.view(*rows.shape[:-1], weight.shape[0])


def _onednn_takes(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """oneDNN's linear neither autocasts nor records gradients."""
    tensors = (rows, weight) if bias is None else (rows, weight, bias)
    return (ONEDNN and rows.device.type == "cpu" and weight.dtype in ONEDNN_DTYPES
            and all(t.dtype == weight.dtype for t in tensors) and not torch.is_autocast_enabled("cpu")
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)))


def _packed(weight: torch.Tensor) -> torch.Tensor:
    """`weight` in oneDNN's layout, packed again only when its storage or values change."""
    # inference tensors keep no version counter (and are changed in place by nothing here)
    key, stamp = id(weight), (weight.data_ptr(), 0 if weight.is_inference() else weight._version)
    entry = _packed_weights.get(key)
    if entry is not None and entry[0]() is weight and entry[1] == stamp:
        return entry[2]
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), PACKED_FOR_ROWS)
    _packed_weights[key] = (weakref.ref(weight, lambda _, key=key: _packed_weights.pop(key, None)), stamp, packed)
    return packed


def install(model: nn.Module) -> None:
    """Route `model`'s plain nn.Linear layers through `onednn_linear` inside `enabled()`."""
    for module in model.modules():
        if type(module) is nn.Linear and "forward" not in vars(module):  # not installed yet
            module.forward = types.MethodType(_linear_forward, module)  # bound: deep copies rebind it


def _linear_forward(module: nn.Linear, rows: torch.Tensor) -> torch.Tensor:
    return linear(rows, module.weight, module.bias)


def linear(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through `onednn_linear` inside `enabled()`."""
    return (onednn_linear if _enabled.get() else F.linear)(rows, weight, bias)


@contextlib.contextmanager
def enabled():
    """Installed layers take oneDNN with packed weights within this block."""
    token = _enabled.set(True)
    try:
        yield
    finally:
        _enabled.reset(token)
