"""The drafter at decode time: its cache of context keys/values and one block pass per round."""

from __future__ import annotations

import torch

from caddtree.models.drafter import DFlashDrafter
from caddtree.models.drafter_io import resolve_mask_token
from caddtree.models.target import Target


class DraftRunner:
    def __init__(self, drafter: DFlashDrafter, target: Target):
        self.drafter = drafter
        self.embed = target.model.get_input_embeddings()
        self.lm_head = target.model.get_output_embeddings()
        self.mask_token = resolve_mask_token(drafter.config, target)
        self.block_size = drafter.config.block_size
        self.context_kv: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer (kv_heads, c, head_dim)

    @property
    def feature_layers(self) -> list[int]:
        return self.drafter.config.target_layer_ids

    def reset(self) -> None:
        self.context_kv = []

    @torch.inference_mode()
    def extend(self, target_features: torch.Tensor, positions: torch.Tensor) -> None:
        """Add accepted tokens (features (c, F) at absolute positions (c,)) to the context."""
        new_kv = self.drafter.context_keys_values(target_features, positions)
        if not self.context_kv:
            self.context_kv = new_kv
            return
        self.context_kv = [
            (torch.cat([keys, new_keys], dim=-2), torch.cat([values, new_values], dim=-2))
            for (keys, values), (new_keys, new_values) in zip(self.context_kv, new_kv)
        ]

    @torch.inference_mode()
    def draft(self, root: torch.Tensor, root_position: int, depth: int) -> torch.Tensor:
        """Log-marginals (depth, V) of the `depth` tokens after `root` (a 0-d token id tensor)."""
        block = torch.full((self.block_size,), self.mask_token, dtype=torch.long, device=root.device)
        block[0] = root
        positions = root_position + torch.arange(self.block_size, device=root.device)
        hidden = self.drafter.block_hidden(self.embed(block), positions, self.context_kv)
        logits = self.lm_head(hidden[1 : 1 + depth])
        return torch.log_softmax(logits.float(), dim=-1)
