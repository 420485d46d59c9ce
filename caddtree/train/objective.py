"""The DFlash training objective: many anchored blocks per sequence, packed into one pass.

A block anchored at position a is [token a, MASK x (b-1)] at positions a..a+b-1 and predicts the
tokens a+1..a+b-1. It sees the target's features of positions strictly before a (exactly what the
drafter has at decode time, when a is the root) and its own block bidirectionally; blocks never
see each other. Loss weight of block offset k is exp(-(k-1)/gamma): early positions matter most,
since a draft is only useful up to its first miss.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F

from caddtree.models.drafter import DFlashDrafter, DraftHead

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


class BlockPredictions(NamedTuple):
    """The drafter's outputs at every block position that has a token to predict."""

    logits: torch.Tensor  # (N, K) over the draft vocabulary
    labels: torch.Tensor  # (N,) target token ids
    weights: torch.Tensor  # (N,) loss weights
    offsets: torch.Tensor  # (N,) block offset k >= 1 of each position
    block_ids: torch.Tensor  # (N,) which block of the batch (sequence-major) each position is in
    positions: torch.Tensor  # (N,) absolute position of the predicted token in its sequence


def predict_blocks(drafter: DFlashDrafter, head: DraftHead, embed: torch.nn.Module, sequences: list[torch.Tensor],
                   features: list[torch.Tensor], anchors: list[torch.Tensor], num_blocks: int, mask_token: int,
                   gamma: float) -> BlockPredictions:
    """All anchored blocks of a batch of sequences (T_i,) with their features (T_i, F), in one
    drafter pass: every sequence is padded to the longest and to `num_blocks` blocks."""
    block_size = drafter.config.block_size
    width = max(len(s) for s in sequences)
    blocks = stack_blocks([pack_blocks(tokens, a, block_size, mask_token, gamma, width, num_blocks)
                           for tokens, a in zip(sequences, anchors)])
    device = embed.weight.device
    context = torch.nn.utils.rnn.pad_sequence(features, batch_first=True).to(device, torch.float32)
    context_kv = drafter.context_keys_values(context, torch.arange(width, device=device))
    mask = blocks.attention_mask.to(device)[:, None]  # (S, 1, A*b, T + A*b): one mask for all heads
    hidden = drafter.block_hidden(embed(blocks.input_ids.to(device)), blocks.positions.to(device), context_kv, mask)
    predicted = blocks.labels != IGNORE  # the head only runs where there is something to predict
    flat_index = torch.arange(blocks.labels.numel()).view_as(blocks.labels)  # (S, A*b)
    return BlockPredictions(
        head(hidden[predicted.to(device)]), blocks.labels[predicted].to(device),
        blocks.loss_weights[predicted].to(device), (flat_index % block_size)[predicted].to(device),
        (flat_index // block_size)[predicted].to(device), blocks.positions[predicted].to(device),
    )


def draft_vocab_loss(predictions: BlockPredictions, head: DraftHead) -> torch.Tensor:
    """Decayed cross-entropy over the positions whose label is in the draft vocabulary (a drafter
    cannot propose any other token, so those positions teach it nothing)."""
    labels = head.draft_indices(predictions.labels)
    inside = labels >= 0
    return decayed_cross_entropy(predictions.logits[inside], labels[inside], predictions.weights[inside])


def distillation_loss(predictions: BlockPredictions, head: DraftHead, teacher_ids: torch.Tensor,
                      teacher_log_probs: torch.Tensor) -> torch.Tensor:
    """Decayed cross-entropy against the target's own distribution (N, k) at each predicted
    position, restricted to the draft vocabulary and renormalised there."""
    draft_ids = head.draft_indices(teacher_ids.long())  # (N, k), -1 outside the draft vocabulary
    inside = draft_ids >= 0
    teacher = torch.softmax(teacher_log_probs.float().masked_fill(~inside, -torch.inf), dim=-1).nan_to_num(0.0)
    log_q = torch.log_softmax(predictions.logits.float(), dim=-1).gather(1, draft_ids.clamp(min=0))
    losses = -(teacher * log_q).sum(dim=-1)  # (N,)
    weights = predictions.weights * inside.any(dim=-1)
    return (losses * weights).sum() / weights.sum().clamp(min=1e-6)
