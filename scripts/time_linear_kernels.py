"""Times the CPU kernels a linear layer can take, by row count: F.linear (MKL's GEMM), weight @ rows^T
and oneDNN's linear, over all of SmolLM2-135M's body weights once (random values, its shapes) and its
output head. docs/results.md's kernel table came from this script, alone on the machine:

    python scripts/time_linear_kernels.py
"""
import time

import torch
import torch.nn.functional as F

HIDDEN, INTERMEDIATE, LAYERS, VOCAB = 576, 1536, 30, 49152
ROWS = (2, 3, 4, 5, 6, 7, 8, 13, 16, 24, 32, 33, 64, 128, 512)


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
    kernels = (F.linear, weight_times_rows, onednn)
    print("rows | body ms: F.linear, weight @ rows^T, oneDNN | head ms: the same")
    with torch.no_grad():
        for rows in ROWS:
            repeats = 3 if rows < 100 else 1
            times = [milliseconds(k, weights, rows, repeats) for weights in (body, head) for k in kernels]
            print(rows, " ".join(f"{t:7.1f}" for t in times), flush=True)


if __name__ == "__main__":
    main()
