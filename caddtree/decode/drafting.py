"""The drafter at decode time: its cache of context keys/values and one block pass per round."""

from __future__ import annotations

import copy

import torch

from caddtree.models import packed_linear
from caddtree.models.drafter import DFlashDrafter, DraftHead
from caddtree.models.drafter_io import resolve_mask_token
from caddtree.models.kv_buffer import FixedSlots, KVBuffer
from caddtree.models.static_runner import capture_graph
from caddtree.models.target import Target


def decoding_dtype(target: Target) -> torch.dtype:
    """The drafter's precision in decoding: bfloat16 under a float32 target on a CPU with bfloat16
    units (its pass 2.0 against 2.5 ms on the 2-core CPU), where it changes only what is proposed,
    never what the target emits; the target's own elsewhere."""
    bf16_units = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    if target.device.type == "cpu" and target.dtype == torch.float32 and bf16_units:
        return torch.bfloat16
    return target.dtype


class DraftRunner:
    """Accepted tokens' features wait until the next draft pass needs them, then enter the context
    cache in one batch: rounds where the policy skips the drafter then cost it nothing, and a
    pass after k skipped rounds projects k rows at once instead of k times one row.

    With `static_shapes`, the block pass attends over the context buffers' whole capacity with
    a mask, so that its shapes never change; with `cuda_graphs` it is then one replayed graph.

    With a `dtype` other than the drafter's, the runner drafts with a copy in that precision,
    casting the target's features and embeddings as they come in."""

    def __init__(self, drafter: DFlashDrafter, target: Target, static_shapes: bool = False, cuda_graphs: bool = False,
                 dtype: torch.dtype | None = None):
        if dtype is not None and dtype != drafter.dtype:
            drafter = copy.deepcopy(drafter).to(dtype)
        self.drafter = drafter
        self.dtype = drafter.dtype
        packed_linear.install(drafter)
        self._target_embed = target.model.get_input_embeddings()
        self.head = DraftHead(drafter, target.model.get_output_embeddings())
        self.mask_token = resolve_mask_token(drafter.config, target)
        self.block_size = drafter.config.block_size
        layers = drafter.config.num_hidden_layers
        self._context = [(KVBuffer(), KVBuffer()) for _ in range(layers)]  # keys, values per layer
        self.static_shapes = static_shapes
        self.cuda_graphs = static_shapes and cuda_graphs
        self._static = None  # static inputs, outputs and graph, for the current buffers
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (features, positions) not yet in the cache

    @property
    def feature_layers(self) -> list[int]:
        return self.drafter.config.target_layer_ids

    def reset(self) -> None:
        self._pending.clear()
        for keys, values in self._context:
            keys.clear()
            values.clear()

    def reserve(self, positions: int) -> None:
        """Room for `positions` context positions plus a block, allocated before any graph reads it."""
        config, weight = self.drafter.config, self.drafter.fc.weight
        like = weight.new_empty(config.num_key_value_heads, 0, config.head_dim)
        for buffer in (b for pair in self._context for b in pair):
            data = buffer.data
            buffer.reserve(like, positions + self.block_size)
            if buffer.data is not data:
                self._static = None  # new storage: capture again

    def extend(self, target_features: torch.Tensor, positions: torch.Tensor) -> None:
        """Add accepted tokens (features (c, F) at absolute positions (c,)) to the context, at the
        next `flush` or draft pass; the features must not be overwritten before then (a view of a
        verifier's reused output buffer would be)."""
        self._pending.append((target_features, positions))

    @torch.inference_mode()
    @packed_linear.enabled()
    def flush(self) -> None:
        """Project the pending features into the context cache, all in one pass."""
        if not self._pending:
            return
        features, positions = (torch.cat(parts) for parts in zip(*self._pending))
        self._pending.clear()
        # Any growth happens here, where `reserve` drops a captured pass, never inside an append.
        self.reserve(self._context[0][0].length + len(positions))
        new_kv = self.drafter.context_keys_values(features.to(self.dtype), positions)
        for (keys, values), (new_keys, new_values) in zip(self._context, new_kv):
            keys.append(new_keys)
            values.append(new_values)

    @torch.inference_mode()
    @packed_linear.enabled()
    def draft(self, root: torch.Tensor, root_position: int, depth: int) -> torch.Tensor:
        """Log-marginals (depth, K) of the `depth` tokens after `root` (a 0-d token id tensor), over the
        draft vocabulary (K = V without one): `self.head.target_tokens` maps indices to tokens."""
        self.flush()
        if self.static_shapes:
            return self._draft_static(root, root_position)[:depth]
        block = torch.full((self.block_size,), self.mask_token, dtype=torch.long, device=root.device)
        block[0] = root
        positions = root_position + torch.arange(self.block_size, device=root.device)
        hidden = self.drafter.block_hidden(self.embed(block), positions, self._context)
        return self._log_marginals(hidden[1 : 1 + depth])

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The target's embeddings of `tokens`, in the drafter's precision."""
        return self._target_embed(tokens).to(self.dtype)

    def _log_marginals(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.head(hidden).float(), dim=-1)

    def _draft_static(self, root: torch.Tensor, root_position: int) -> torch.Tensor:
        """All D = b-1 positions, with fixed shapes; the context ends at root_position."""
        self.reserve(root_position)  # normally done for the whole generation already
        if self._static is None:
            self._static = self._static_inputs(root.device)
        inputs = self._static
        inputs["tokens"][0] = root
        torch.add(inputs["offsets"], root_position, out=inputs["positions"])
        # One row for all block rows: the context and the whole block.
        torch.lt(inputs["key_index"], root_position + self.block_size, out=inputs["mask"][0])
        if not self.cuda_graphs:
            return self._static_pass(inputs)
        if "graph" not in inputs:
            inputs["graph"], inputs["output"] = capture_graph(lambda: self._static_pass(inputs))
        inputs["graph"].replay()
        return inputs["output"]

    def _static_pass(self, inputs: dict) -> torch.Tensor:
        slots = [(FixedSlots(keys.data, inputs["positions"]), FixedSlots(values.data, inputs["positions"]))
                 for keys, values in self._context]
        hidden = self.drafter.block_hidden(self.embed(inputs["tokens"]), inputs["positions"], slots, inputs["mask"])
        return self._log_marginals(hidden[1:])

    def _static_inputs(self, device) -> dict:
        capacity = self._context[0][0].data.shape[-2]
        tokens = torch.full((self.block_size,), self.mask_token, dtype=torch.long, device=device)
        return {
            "tokens": tokens,
            "positions": torch.zeros(self.block_size, dtype=torch.long, device=device),
            "offsets": torch.arange(self.block_size, device=device),
            "key_index": torch.arange(capacity, device=device),
            "mask": torch.zeros(1, capacity, dtype=torch.bool, device=device),
        }
