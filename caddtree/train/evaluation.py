"""How good a drafter is while it trains: on held-out prompts and on held-out answer blocks.

Decoding τ on a few prompts is the real measure but noisy and slow. On held-out records the chain's
τ needs no decoding: a block anchored in the target's own greedy answer accepts exactly its
leading correct predictions, since decoding's context is that answer. Blocks at random anchors
give the mean block τ; blocks at every answer position give each round's acceptance, and the
walk through them visits the anchors decoding would. The two differ: decoding crosses easy
stretches in few rounds and spends many on hard ones, so its τ is the lower (2.39 vs 2.79 for `cpu12`,
TRAINING.md's drafter, on held-out ShareGPT answers).
"""

from __future__ import annotations

import statistics

import torch

from caddtree.decode.engine import Engine
from caddtree.decode.policy import make_policy
from caddtree.models.drafter import DFlashDrafter, DraftHead
from caddtree.models.target import Prompt, Target, encode_prompt
from caddtree.train.objective import BlockPredictions, draft_vocab_loss, predict_blocks, sample_anchors

TREE_BUDGET = 16  # the DDTree budget whose τ training reports next to the chain's


def decoding_tau(target: Target, drafter: DFlashDrafter, prompts: list[Prompt], new_tokens: int) -> dict[str, float]:
    """Mean τ of the DFlash chain and of DDTree at budget 16 on held-out prompts."""
    # tau needs no speed (nothing to capture), and is the drafter's as it is trained
    engine = Engine(target, drafter, static_shapes=False, drafter_dtype=drafter.dtype)
    policies = {"dflash": make_policy("dflash"), f"ddtree{TREE_BUDGET}": make_policy("ddtree", TREE_BUDGET)}
    try:
        return {name: statistics.fmean(engine.generate(encode_prompt(target, p), policy, new_tokens).tau
                                       for p in prompts) for name, policy in policies.items()}
    finally:
        engine.verifier.close()


def leading_hits(predictions: BlockPredictions, hits: torch.Tensor, num_blocks: int, block_size: int) -> torch.Tensor:
    """(num_blocks,) how many predictions each block gets right (`hits` (N,)) before its first miss."""
    correct = torch.zeros(num_blocks, block_size, dtype=torch.bool, device=hits.device)
    correct[predictions.block_ids, predictions.offsets] = hits
    return correct[:, 1:].long().cumprod(dim=1).sum(dim=1)


def decoding_rounds(accepted: list[int]) -> int:
    """Rounds a chain takes over an answer, given the drafted tokens accepted at each answer
    position (the answer's first token comes from the prefill; a round at position p emits
    accepted[p] + 1 tokens)."""
    rounds, position = 0, 0
    while position < len(accepted):
        position += accepted[position] + 1
        rounds += 1
    return rounds


@torch.inference_mode()
def chain_rounds(drafter: DFlashDrafter, head: DraftHead, embed: torch.nn.Module, sequences: list[torch.Tensor],
                 prompt_lengths: list[int], features: list[torch.Tensor], mask_token: int,
                 batch_size: int = 2) -> list[int]:
    """Rounds the DFlash chain takes to decode each sequence's answer, from blocks anchored at
    every answer position but the last (no decoding, no target pass)."""
    rounds = []
    for start in range(0, len(sequences), batch_size):
        chunk = range(start, min(start + batch_size, len(sequences)))
        anchors = [torch.arange(prompt_lengths[i], len(sequences[i]) - 1) for i in chunk]
        num_blocks = max(len(a) for a in anchors)
        if not num_blocks:
            rounds += [0] * len(chunk)
            continue
        predictions = predict_blocks(drafter, head, embed, [sequences[i] for i in chunk],
                                     [features[i] for i in chunk], anchors, num_blocks, mask_token, 1.0)
        hits = head.target_tokens(predictions.logits.argmax(-1)) == predictions.labels
        accepted = leading_hits(predictions, hits, len(chunk) * num_blocks, drafter.config.block_size)
        rounds += [decoding_rounds(row[: len(a)]) for row, a in zip(accepted.view(len(chunk), -1).tolist(), anchors)]
    return rounds


@torch.inference_mode()
def heldout_metrics(drafter: DFlashDrafter, head: DraftHead, embed: torch.nn.Module, sequences: list[torch.Tensor],
                    prompt_lengths: list[int], features: list[torch.Tensor], anchors_per_sequence: int,
                    mask_token: int, gamma: float, batch_size: int = 8) -> dict[str, float]:
    """Loss, top-1 accuracy per block offset, the chain's mean τ on fixed anchors of held-out records
    (`block_tau`) and its τ decoding their answers (`chain_tau`)."""
    generator = torch.Generator().manual_seed(0)  # the same blocks at every evaluation
    losses, accepted, hits_by_offset = [], [], []
    block_size = drafter.config.block_size
    for start in range(0, len(sequences), batch_size):
        chunk = range(start, min(start + batch_size, len(sequences)))
        anchors = [sample_anchors(prompt_lengths[i], len(sequences[i]), anchors_per_sequence, generator) for i in chunk]
        predictions = predict_blocks(drafter, head, embed, [sequences[i] for i in chunk], [features[i] for i in chunk],
                                     anchors, anchors_per_sequence, mask_token, gamma)
        hits = head.target_tokens(predictions.logits.argmax(-1)) == predictions.labels
        losses.append(float(draft_vocab_loss(predictions, head)))
        real_blocks = torch.tensor([b * anchors_per_sequence + k for b, a in enumerate(anchors) for k in range(len(a))])
        accepted.append(leading_hits(predictions, hits, len(chunk) * anchors_per_sequence, block_size)[real_blocks])
        hits_by_offset.append(torch.stack([predictions.offsets, hits.long()]).cpu())
    if not sum(len(a) for a in accepted):
        return {}  # no held-out record has an answer token to predict
    offsets, hits = torch.cat(hits_by_offset, dim=1)
    per_offset = torch.zeros(block_size).index_add_(0, offsets, hits.float())
    per_offset /= torch.bincount(offsets, minlength=block_size).clamp(min=1)
    rounds = chain_rounds(drafter, head, embed, sequences, prompt_lengths, features, mask_token)
    decoded = sum(len(s) - 1 - p for s, p in zip(sequences, prompt_lengths) if len(s) - 1 > p)
    return {"loss": statistics.fmean(losses), "block_tau": 1 + float(torch.cat(accepted).float().mean()),
            "chain_tau": decoded / sum(rounds), "accuracy_by_offset": per_offset[1:].tolist()}
