"""Answers to many prompts at once, greedy or sampled: a left-padded batch decoded step by step
with a KV cache.

transformers' batched `generate` keeps finished rows in the batch and pays its own per-step
overhead; on a 2-core CPU it ran 4-6x slower than this loop. Here the cache is allocated once
for the longest answer and appended in place (a `DynamicCache` re-concatenates every layer's
whole cache at every step), and finished rows leave the batch and the cache together, once an
eighth of the rows have finished: dropping rows copies the cache, so it is done in few steps.
"""

from __future__ import annotations

import time

import torch
from transformers import DynamicCache

from caddtree.models.kv_buffer import BufferedCacheLayer
from caddtree.models.target import Target, cache_argument_name

DROP_SHARE = 8  # finished rows leave the batch once they are 1/DROP_SHARE of it


@torch.inference_mode()
def answer_batch(target: Target, prompts: list[list[int]], max_new_tokens: int, eos_ids: set[int],
                 temperature: float = 0.0, generator: torch.Generator | None = None) -> list[list[int]]:
    """Each prompt's answer, cut after its first EOS token, at most `max_new_tokens` long: greedy,
    or sampled from the target's distribution at `temperature` > 0 with `generator`."""
    device = target.device
    width = max(len(p) for p in prompts)
    pad = next(iter(eos_ids), 0)
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    positions = (attention_mask.cumsum(1) - 1).clamp(min=0)  # (B, width): padding does not shift positions
    cache = DynamicCache()
    cache.layers = [BufferedCacheLayer(capacity=width + max_new_tokens) for _ in range(target.num_layers)]
    answers: list[list[int]] = [[] for _ in prompts]
    live = torch.arange(len(prompts), device=device)  # (B',) which prompt each batch row answers
    answering = torch.ones(len(prompts), dtype=torch.bool, device=device)  # (B',) no EOS yet
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
    cache_kwarg = {cache_argument_name(target.model): cache}
    for step in range(max_new_tokens):
        logits = target.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                              use_cache=True, logits_to_keep=1, **cache_kwarg).logits[:, -1]
        tokens = _next_tokens(logits, temperature, generator)  # (B',)
        for row, token, adds in zip(live.tolist(), tokens.tolist(), answering.tolist()):
            if adds:
                answers[row].append(token)
        answering &= ~torch.isin(tokens, eos)
        finished = len(answering) - int(answering.sum())
        if step + 1 == max_new_tokens or finished == len(answering):
            break
        if finished * DROP_SHARE >= len(answering):  # finished rows leave the batch and the cache
            kept = answering.nonzero().squeeze(1)
            cache.batch_select_indices(kept)
            live, tokens, attention_mask, positions = live[kept], tokens[kept], attention_mask[kept], positions[kept]
            answering = answering[kept]
        input_ids = tokens[:, None]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(live), 1)], dim=1)
        positions = positions[:, -1:] + 1
    return answers


def _next_tokens(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    if not temperature:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


class TokenRate:
    """Answer tokens per second of wall time, for progress bars."""

    def __init__(self):
        self.tokens = 0
        self.start = time.perf_counter()

    def add(self, answers: list[list[int]]) -> float:
        self.tokens += sum(len(a) for a in answers)
        return self.tokens / max(time.perf_counter() - self.start, 1e-9)
