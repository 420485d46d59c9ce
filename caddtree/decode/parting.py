"""Where a greedy decoding parts from ar's, and whether the rounding of the target's arithmetic
can explain it.

Verifying a tree multiplies the target's weights by many rows at once, a plain step by one; the
kernels add the products in other orders, so the same position's logits differ in their last
bits. In float32 that is ~1e-6 of the top logit and greedy outputs match token for token (the
tests hold every method to it). In bfloat16 it is a few percent: on the default target, a
whole-sequence forward and one-row steps gave logits up to 1.03 apart at top logits of ~20 (median
0.41; float32: 6.7e-5). That flips near-ties, and from there the two decodings continue from
different tokens, each the greedy choice of its own arithmetic. A parting is a near-tie when the
two tokens' logits, by a fresh forward of the shared prefix, lie closer than that rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from caddtree.models.target import Target, dtype_name

# Logit differences that rounding makes, as a share of the top logit: a few times those measured
# above (float32 ~3e-6, bfloat16 ~0.05); float16 has 3 more mantissa bits than bfloat16.
ROUNDING = {torch.float32: 2.0 ** -14, torch.float16: 2.0 ** -7, torch.bfloat16: 2.0 ** -4}


@dataclass(frozen=True)
class Parting:
    """The first new token where a method's greedy output is not ar's."""

    method: str
    position: int  # 0-based index among the new tokens
    dtype: torch.dtype
    token: int | None = None  # the method's token there (None: one output is a prefix of the other)
    reference_token: int | None = None  # ar's
    margin: float | None = None  # |logit(ar's) - logit(method's)| there, by a fresh forward
    tolerance: float | None = None  # the largest margin rounding explains there

    @property
    def near_tie(self) -> bool:
        return self.margin is not None and self.margin <= self.tolerance

    def describe(self) -> str:
        where = f"greedy {self.method} parts from ar at new token {self.position}"
        if self.margin is None:
            return f"{where} (one output ends where the other goes on): this is a bug, please report it"
        gap = f"token {self.token} against ar's {self.reference_token}, logits {self.margin:.3g} apart"
        if self.near_tie:
            return (f"{where} ({gap}: a near-tie that {dtype_name(self.dtype)} rounding decides, not a bug; "
                    f"--dtype float32 compares token for token)")
        return f"{where} ({gap}, more than {dtype_name(self.dtype)} rounding explains): this is a bug, please report it"


def first_parting(target: Target, method: str, prompt_ids: torch.Tensor, tokens: list[int],
                  reference: list[int]) -> Parting | None:
    """None when `tokens` equal `reference` (ar's); else where they part and by how much."""
    if tokens == reference:
        return None
    common = min(len(tokens), len(reference))
    shared = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), common)
    if shared == common:
        return Parting(method, shared, target.dtype)
    logits = _next_token_logits(target, torch.cat([prompt_ids.cpu(), torch.tensor(reference[:shared], dtype=torch.long)]))
    margin = float((logits[reference[shared]] - logits[tokens[shared]]).abs())
    tolerance = ROUNDING.get(target.dtype, ROUNDING[torch.float32]) * float(logits.abs().max())
    return Parting(method, shared, target.dtype, tokens[shared], reference[shared], margin, tolerance)


@torch.inference_mode()
def _next_token_logits(target: Target, token_ids: torch.Tensor) -> torch.Tensor:
    ids = token_ids.to(target.device)[None]
    return target.model(input_ids=ids, logits_to_keep=1).logits[0, -1].float()
