"""The DFlash training objective: many anchored blocks per sequence, packed into one pass.

A block anchored at position a is [token a, MASK x (b-1)] at positions a..a+b-1 and predicts the
tokens a+1..a+b-1. It sees the target's features of positions strictly before a (exactly what the
drafter has at decode time, when a is the root) and its own block bidirectionally; blocks never
see each other. Loss weight of block offset k is exp(-(k-1)/gamma): early positions matter most,
since a draft is only useful up to its first miss.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

IGNORE = -100


@dataclass(frozen=True)
class PackedBlocks:
    """A anchored blocks of size b over one sequence of T tokens (a leading batch dim when stacked)."""

    input_ids: torch.Tensor  # (A*b,) anchor token then mask tokens, block after block
    positions: torch.Tensor  # (A*b,) absolute positions
    labels: torch.Tensor  # (A*b,) the token each block position should predict, IGNORE where none
    loss_weights: torch.Tensor  # (A*b,) exp(-(k-1)/gamma) at offset k >= 1, 0 at the anchor
    attention_mask: torch.Tensor  # (A*b, T + A*b) bool: may this block token see that context/block token


def sample_anchors(first: int, sequence_len: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """Up to `count` distinct sorted anchors in [first, sequence_len - 2] (each has a next token)."""
    available = sequence_len - 1 - first
    if available <= 0:
        return torch.zeros(0, dtype=torch.long)
    chosen = torch.randperm(available, generator=generator)[: min(count, available)]
    return (first + chosen).sort().values


def pack_blocks(tokens: torch.Tensor, anchors: torch.Tensor, block_size: int, mask_token: int, gamma: float,
                context_width: int | None = None, num_blocks: int | None = None) -> PackedBlocks:
    """Lay out the blocks of `anchors` over `tokens` (T,) as one drafter pass.

    To batch sequences of different lengths, `context_width` (>= T) pads the context columns and
    `num_blocks` (>= A) adds padding blocks: all mask tokens, nothing to predict, seeing only
    themselves (so no attention row is empty).
    """
    sequence_len, real_blocks = len(tokens), len(anchors)
    context_width = context_width or sequence_len
    num_blocks = num_blocks or real_blocks
    anchors = torch.cat([anchors, anchors.new_zeros(num_blocks - real_blocks)])
    real = (torch.arange(num_blocks) < real_blocks)[:, None]  # (A, 1)
    offsets = torch.arange(block_size)
    positions = anchors[:, None] + offsets  # (A, b)
    input_ids = torch.full((num_blocks, block_size), mask_token, dtype=torch.long)
    input_ids[:, 0] = torch.where(real[:, 0], tokens[anchors], mask_token)
    inside = real & (positions < sequence_len)
    labels = torch.where(inside, tokens[positions.clamp(max=sequence_len - 1)], IGNORE)
    labels[:, 0] = IGNORE  # the anchor is given, not predicted
    weights = torch.exp(-(offsets - 1).clamp(min=0) / gamma).expand(num_blocks, -1).clone()
    weights[labels == IGNORE] = 0.0
    block_of = torch.arange(num_blocks).repeat_interleave(block_size)  # (A*b,)
    sees_context = torch.arange(context_width)[None, :] < torch.where(real[:, 0], anchors, 0)[block_of][:, None]
    sees_block = block_of[:, None] == block_of[None, :]  # (A*b, A*b)
    return PackedBlocks(
        input_ids.flatten(), positions.flatten(), labels.flatten(), weights.flatten(),
        torch.cat([sees_context, sees_block], dim=1),
    )


def stack_blocks(packed: list[PackedBlocks]) -> PackedBlocks:
    """One batch (S, ...) of equally shaped layouts."""
    return PackedBlocks(*(torch.stack([getattr(p, field.name) for p in packed]) for field in fields(PackedBlocks)))


def decayed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean cross-entropy over block positions; logits (N, V), labels/weights (N,)."""
    losses = F.cross_entropy(logits.float(), labels.clamp(min=0), reduction="none")
    return (losses * weights).sum() / weights.sum().clamp(min=1e-6)
