"""Times the CPU kernels a linear layer can take, by row count: F.linear (MKL's GEMM), weight @ rows^T
(one row unpadded here), oneDNN's linear, and oneDNN's linear with the weight packed beforehand into
its own layout, over all of SmolLM2-135M's body weights once (random values, its shapes) and its
output head. docs/results.md's kernel table came from this script, alone on the machine:

    python scripts/time_linear_kernels.py
"""
import time

import torch
import torch.nn.functional as F

from caddtree.models.packed_linear import PACKED_FOR_ROWS

HIDDEN, INTERMEDIATE, LAYERS, VOCAB = 576, 1536, 30, 49152
ROWS = (1, 2, 3, 4, 5, 6, 7, 8, 13, 16, 24, 32, 33, 64, 128, 512)


def weight_times_rows(rows, weight):
    return (weight @ rows.T).T


def onednn(rows, weight):
    return torch.ops.mkldnn._linear_pointwise(rows, weight, None, "none", [], "")


def milliseconds(kernel, weights, rows, repeats):
    inputs = [torch.randn(rows, weight.shape[1]) for weight in weights]
    for weight, x in zip(weights, inputs):  # warm-up
        kernel(x, weight)
    start = time.perf_counter()
    for _ in range(repeats):
        for weight, x in zip(weights, inputs):
            kernel(x, weight)
    return (time.perf_counter() - start) / repeats * 1000


def main():
    torch.manual_seed(0)
    shapes = [(HIDDEN, HIDDEN), (192, HIDDEN), (192, HIDDEN), (HIDDEN, HIDDEN),
              (INTERMEDIATE, HIDDEN), (INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)] * LAYERS
    body = [torch.randn(rows, cols) * 0.02 for rows, cols in shapes]
    head = [torch.randn(VOCAB, HIDDEN) * 0.02]
    packed = [[torch.ops.mkldnn._reorder_linear_weight(weight, PACKED_FOR_ROWS) for weight in weights] for weights in (body, head)]
    columns = [(F.linear, body), (weight_times_rows, body), (onednn, body), (onednn, packed[0]),
               (F.linear, head), (weight_times_rows, head), (onednn, head), (onednn, packed[1])]
    print("rows | body ms: F.linear, weight @ rows^T, oneDNN, oneDNN packed | head ms: the same")
    with torch.no_grad():
        for rows in ROWS:
            repeats = 10 if rows < 100 else 1
            times = [milliseconds(kernel, weights, rows, repeats) for kernel, weights in columns]
            print(rows, " ".join(f"{t:7.1f}" for t in times), flush=True)


if __name__ == "__main__":
    main()
