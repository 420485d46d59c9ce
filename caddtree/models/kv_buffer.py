"""Key/value storage that grows in place: one buffer per tensor, written at the end, compacted by
an index copy. Decoding appends a few entries per round; reallocating and copying the whole cache
each time (what `torch.cat` does) would cost O(context) per round."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import NamedTuple

import torch
from transformers.cache_utils import DynamicLayer

INITIAL_CAPACITY = 2048  # entries; doubled when full, kept across generations


class KVBuffer:
    """Entries (..., length, head_dim) held in a buffer (..., capacity, head_dim)."""

    def __init__(self, capacity: int | None = None):
        self.data: torch.Tensor | None = None
        self.length = 0
        self.capacity = capacity  # entries to allocate at first; INITIAL_CAPACITY if None

    def view(self) -> torch.Tensor:
        return self.data[..., : self.length, :]

    def clear(self) -> None:
        self.truncate(0)  # the buffer stays allocated for the next sequence

    def truncate(self, length: int) -> None:
        """Keep only the first `length` entries."""
        self.length = min(length, self.length)

    def append(self, entries: torch.Tensor) -> torch.Tensor:
        """Write `entries` after the current ones; returns a view of all of them."""
        end = self.length + entries.shape[-2]
        self.reserve(entries, end)
        self.data[..., self.length : end, :].copy_(entries)
        self.length = end
        return self.view()

    @contextmanager
    def appended(self, entries: torch.Tensor):
        """All entries plus `entries` for the duration of a `with` block, then without them again."""
        length = self.length
        try:
            yield self.append(entries)
        finally:
            self.length = length

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only `rows` of the leading (batch) dimension."""
        self.data = self.data.index_select(0, rows)

    def keep(self, start: int, positions: torch.Tensor) -> None:
        """Keep the first `start` entries and then those at `positions` (>= start, increasing)."""
        kept = self.data.index_select(-2, positions)  # read all before writing: the ranges overlap
        self.data[..., start : start + len(positions), :].copy_(kept)
        self.length = start + len(positions)

    def reserve(self, like: torch.Tensor, size: int) -> None:
        """Room for `size` entries shaped like `like` (..., any, head_dim), keeping those held."""
        if self.data is not None and size <= self.data.shape[-2]:
            return
        # Zeroed, not empty: fixed-shape passes attend over unused slots under a mask, and a
        # masked NaN left in fresh memory would still poison the weighted sum of values.
        first = self.capacity or INITIAL_CAPACITY
        grown = like.new_zeros(*like.shape[:-2], first if size <= first else 2 * size, like.shape[-1])
        if self.length:
            grown[..., : self.length, :].copy_(self.view())
        self.data = grown


class BufferedCacheLayer(DynamicLayer):
    """A transformers cache layer on KVBuffers: the model's `update` appends in place, and
    `keep` compacts after tree verification."""

    def __init__(self, capacity: int | None = None):
        super().__init__()
        self._keys, self._values = KVBuffer(capacity), KVBuffer(capacity)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys, self.values = self._keys.append(key_states), self._values.append(value_states)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._keys.length

    def keep(self, start: int, positions: torch.Tensor) -> None:
        self._keys.keep(start, positions)
        self._values.keep(start, positions)
        self.keys, self.values = self._keys.view(), self._values.view()

    def truncate(self, length: int) -> None:
        self._keys.truncate(length)
        self._values.truncate(length)
        if self.is_initialized:
            self.keys, self.values = self._keys.view(), self._values.view()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._keys.select_rows(indices)
            self._values.select_rows(indices)
            self.keys, self.values = self._keys.view(), self._values.view()

    def clear(self) -> None:
        self.truncate(0)

    # transformers' own edits of a layer, routed through the buffers: the inherited ones would
    # slice `keys` and leave the buffers' lengths (what `get_seq_length` reads) behind.
    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of entries to remove, not {tokens_to_remove}")
        self.truncate(self.get_seq_length() + tokens_to_remove)

    def reset(self) -> None:
        self.clear()

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            rows = torch.arange(self._keys.data.shape[0], device=self._keys.data.device)
            self.batch_select_indices(rows.repeat_interleave(repeats))


class FixedSlots(NamedTuple):
    """A KVBuffer's whole storage and the slots a pass writes its block into: fixed shapes and
    addresses, for CUDA graphs (a mask then hides the unused slots)."""

    data: torch.Tensor  # (..., capacity, head_dim)
    write_positions: torch.Tensor  # (b,)


def joined(context: torch.Tensor | KVBuffer | FixedSlots, block: torch.Tensor):
    """A `with` context giving context entries and `block` along dim -2: appended in place for a
    KVBuffer (no copy of the context), written into its slots for FixedSlots (the whole storage
    is returned), concatenated for a plain tensor."""
    if isinstance(context, KVBuffer):
        return context.appended(block)
    if isinstance(context, FixedSlots):
        context.data.index_copy_(-2, context.write_positions, block)
        return nullcontext(context.data)
    return nullcontext(torch.cat([context, block], dim=-2))
