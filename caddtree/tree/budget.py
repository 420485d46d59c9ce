"""Cost-aware tree budgets (CaDDTree): how many best-first nodes maximise tokens per second.

A round with n nodes yields 1 + Phi(n) tokens in expectation (Phi = sum of the n best node
weights, +1 for the target's own token) and costs round_costs[n] seconds (draft + verify).
"""

import torch


def throughput(gains: torch.Tensor, round_costs: torch.Tensor) -> torch.Tensor:
    """Theta (N+1,): expected tokens per second of a round with n = 0..N nodes.

    gains: (N,) node weights best-first (probabilities); round_costs: (N+1,) seconds per round.
    """
    phi = torch.cat([gains.new_zeros(1), gains.cumsum(0)])  # (N+1,) Phi(0..N)
    return (1 + phi) / round_costs


def greedy_budget(tokens_per_second: torch.Tensor) -> torch.Tensor:
    """The paper's rule on Theta (N+1,): add nodes best-first until Theta first decreases (0-d,
    on the device). Exact when the verify cost is convex in n (Theta is then unimodal).
    """
    drops = tokens_per_second[1:] < tokens_per_second[:-1]  # (N,) adding node n+1 lowers Theta
    # A final True stops at N when Theta never drops.
    stops = torch.cat([drops, drops.new_ones(1)])  # (N+1,)
    return stops.to(torch.uint8).argmax()  # argmax returns the first maximum


def exact_budget(tokens_per_second: torch.Tensor) -> torch.Tensor:
    """argmax over n = 0..N of Theta (the first on ties; 0-d, on the device); right for any cost curve."""
    return tokens_per_second.argmax()
