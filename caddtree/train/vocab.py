"""The draft vocabulary: the K target tokens a drafter may propose (FR-Spec, EAGLE-3).

Scoring K of V tokens cuts the drafter head's cost by V/K in training and in every draft pass,
and the top-k of tree building with it. A token outside the set can never be drafted: every one
ends a draft at its position, so K trades the head's cost against coverage (output stays exact).
"""

from __future__ import annotations

import torch

from caddtree.train.data import Example


def answer_token_counts(examples: list[Example], vocab_size: int) -> torch.Tensor:
    """(V,) how often each token occurs in the answers (the tokens a drafter predicts)."""
    tokens = torch.tensor([t for e in examples for t in e.response_ids], dtype=torch.long)
    return torch.bincount(tokens, minlength=vocab_size)


def frequent_tokens(examples: list[Example], k: int, vocab_size: int) -> torch.Tensor:
    """(K,) the K most frequent answer tokens, as increasing token ids."""
    counts = answer_token_counts(examples, vocab_size)
    return torch.topk(counts, min(k, vocab_size)).indices.sort().values


def coverage(vocab: torch.Tensor, examples: list[Example], vocab_size: int) -> float:
    """The share of the examples' answer tokens that `vocab` holds."""
    counts = answer_token_counts(examples, vocab_size)
    return float(counts[vocab].sum() / counts.sum().clamp(min=1))
