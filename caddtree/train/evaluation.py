"""How good a drafter is while it trains: on held-out prompts and on held-out answer blocks.

Decoding τ on a few prompts is the real measure but noisy and slow; on held-out records the same
quantity for a chain has a low-variance proxy: a block anchored in the target's own greedy
answer accepts exactly its leading correct predictions, since decoding's context is that answer.
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
    engine = Engine(target, drafter, static_shapes=False)  # tau needs no speed; nothing to capture
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


@torch.inference_mode()
def heldout_metrics(drafter: DFlashDrafter, head: DraftHead, embed: torch.nn.Module, sequences: list[torch.Tensor],
                    prompt_lengths: list[int], features: list[torch.Tensor], anchors_per_sequence: int,
                    mask_token: int, gamma: float, batch_size: int = 8) -> dict[str, float]:
    """Loss, top-1 accuracy per block offset, and the chain's τ on fixed anchors of held-out records."""
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
    return {"loss": statistics.fmean(losses), "block_tau": 1 + float(torch.cat(accepted).float().mean()),
            "accuracy_by_offset": per_offset[1:].tolist()}
