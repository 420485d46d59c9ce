"""The drafter at decode time: its cache of context keys/values and one block pass per round."""

from __future__ import annotations

import torch

from caddtree.models.drafter import DFlashDrafter
from caddtree.models.drafter_io import resolve_mask_token
from caddtree.models.kv_buffer import KVBuffer
from caddtree.models.target import Target


class DraftRunner:
    def __init__(self, drafter: DFlashDrafter, target: Target):
        self.drafter = drafter
        self.embed = target.model.get_input_embeddings()
        self.lm_head = target.model.get_output_embeddings()
        self.mask_token = resolve_mask_token(drafter.config, target)
        self.block_size = drafter.config.block_size
        layers = drafter.config.num_hidden_layers
        self._context = [(KVBuffer(), KVBuffer()) for _ in range(layers)]  # keys, values per layer

    @property
    def feature_layers(self) -> list[int]:
        return self.drafter.config.target_layer_ids

    def reset(self) -> None:
        for keys, values in self._context:
            keys.clear()
            values.clear()

    @torch.inference_mode()
    def extend(self, target_features: torch.Tensor, positions: torch.Tensor) -> None:
        """Add accepted tokens (features (c, F) at absolute positions (c,)) to the context."""
        new_kv = self.drafter.context_keys_values(target_features, positions)
        for (keys, values), (new_keys, new_values) in zip(self._context, new_kv):
            keys.append(new_keys)
            values.append(new_values)

    @torch.inference_mode()
    def draft(self, root: torch.Tensor, root_position: int, depth: int) -> torch.Tensor:
        """Log-marginals (depth, V) of the `depth` tokens after `root` (a 0-d token id tensor)."""
        block = torch.full((self.block_size,), self.mask_token, dtype=torch.long, device=root.device)
        block[0] = root
        positions = root_position + torch.arange(self.block_size, device=root.device)
        hidden = self.drafter.block_hidden(self.embed(block), positions, self._context)
        logits = self.lm_head(hidden[1 : 1 + depth])
        return torch.log_softmax(logits.float(), dim=-1)
