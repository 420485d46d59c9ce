"""Tree verification with fixed shapes, so that each tree-size bucket is one replayed CUDA graph.

On a GPU the eager forward of a small target is launch-bound: ~20-40 ms whatever the token
count. Here every layer's keys and values live in one preallocated buffer of fixed capacity,
the model writes at positions held in a device tensor, and a tree of n nodes is padded to the
next bucket (1, 2, 4, ..., 2048 positions) with an attention mask over the whole capacity. Every
verification of a bucket then has the same shapes and addresses, and is captured once as a CUDA
graph and replayed. Without CUDA (or with graphs off) the same path runs eagerly, which is how
its exactness is tested.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from caddtree.models.target import Target, TargetRunner

BUCKETS = tuple(2**k for k in range(12))  # tree positions (root included) per captured verification: 1..2048
CAPACITY_STEP = 1024
PAD_TOKEN = 0


def bucket_for(count: int) -> int:
    """The bucket `count` tree positions are padded to; beyond the largest, `count` itself (eager)."""
    return next((b for b in BUCKETS if b >= count), count)


def capture_graph(run, pool=None):
    """Warm `run` up on a side stream (as capture requires), then capture one call as a CUDA
    graph. Returns the graph and `run`'s outputs, which each replay rewrites in place."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        outputs = run()
    return graph, outputs


class StaticCacheLayer(DynamicLayer):
    """A layer's view of the shared buffer: `update` writes at the runner's write positions and
    returns the whole capacity (the mask hides what is not context)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, write_positions: torch.Tensor):
        super().__init__()
        self.keys, self.values = keys, values  # (1, kv_heads, capacity, head_dim) views
        self.write_positions = write_positions
        self.is_initialized = True

    def lazy_initialization(self, *args, **kwargs) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        self.keys.index_copy_(2, self.write_positions, key_states)
        self.values.index_copy_(2, self.write_positions, value_states)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return 0  # transformers only derives a cache_position from it, which the explicit positions override


class StaticTargetRunner(TargetRunner):
    """A TargetRunner whose verification shapes never change (see the module docstring)."""

    def __init__(self, target: Target, feature_layers: list[int], cuda_graphs: bool):
        super().__init__(target, feature_layers)
        self.cuda_graphs = cuda_graphs
        self.capacity = 0
        self._length = 0
        self.reserve(CAPACITY_STEP)

    def reserve(self, positions: int) -> None:
        """Room for `positions` cached positions (prompt + answer + the largest tree). Growing
        moves the cache to a new buffer and forgets the captured graphs, so callers ask once,
        before the prefill."""
        if positions <= self.capacity:
            return
        config, target = self.target.model.config, self.target
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        old_buffer, self.capacity = getattr(self, "buffer", None), -(-positions // CAPACITY_STEP) * CAPACITY_STEP
        # All layers' keys and values in one tensor: compaction is one gather and one copy.
        self.buffer = torch.zeros(target.num_layers, 2, 1, kv_heads, self.capacity, head_dim,
                                  dtype=target.dtype, device=target.device)
        if old_buffer is not None:
            self.buffer[..., : old_buffer.shape[-2], :].copy_(old_buffer)
        self._key_index = torch.arange(self.capacity, device=target.device)
        self._inputs = {}  # per bucket: static inputs, and the cache layers that read them
        self._graphs = {}  # per bucket: (graph, logits, features)
        self._pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None

    @torch.inference_mode()
    def capture(self, largest_tree: int) -> None:
        """Capture the graph of every bucket a tree of up to `largest_tree` nodes can use, now
        rather than inside a timed round (a benchmark calls this after `reserve`)."""
        if not self.cuda_graphs:
            return
        root = torch.zeros(1, dtype=torch.long, device=self.target.device)
        largest_bucket = bucket_for(largest_tree + 1)  # root + tree
        for bucket in (b for b in BUCKETS if b <= largest_bucket):
            self.reset()  # a tree of the root alone at position 0: valid inputs, nothing kept
            inputs = self._bucket_inputs(bucket)
            self._fill_inputs(inputs, root, root, torch.ones(1, 1, dtype=torch.bool, device=root.device))
            self._run(bucket, inputs)
        self.reset()

    @property
    def context_len(self) -> int:
        return self._length

    def reset(self) -> None:
        self._length = 0

    def _static_layers(self, write_positions: torch.Tensor) -> list[StaticCacheLayer]:
        return [StaticCacheLayer(self.buffer[i, 0], self.buffer[i, 1], write_positions)
                for i in range(self.target.num_layers)]

    @torch.inference_mode()
    def prefill(self, prompt_ids: torch.Tensor):
        """Eager (prompts vary in length): causal attention within the prompt, over the capacity."""
        self.reset()
        length = len(prompt_ids)
        self._check_room(length)
        positions = torch.arange(length, device=prompt_ids.device)
        keys = torch.arange(self.capacity, device=prompt_ids.device)
        mask = (keys[None, :] <= positions[:, None])[None, None]  # (1, 1, P, capacity)
        self.cache.layers = self._static_layers(positions)
        logits, features = self._forward(prompt_ids, positions, mask, logits_to_keep=1)
        self._length = length
        return logits[-1], features

    @torch.inference_mode()
    def verify(self, tree_token_ids, tree_depths, ancestor_mask):
        """As TargetRunner.verify; the tree is padded to its bucket, and the bucket's graph replays
        (trees beyond the largest bucket run eagerly at their own size)."""
        count = len(tree_token_ids)
        bucket = bucket_for(count)
        self._check_room(self._length + bucket)
        self._tree_start = self._length
        inputs = self._bucket_inputs(bucket)
        self._fill_inputs(inputs, tree_token_ids, tree_depths, ancestor_mask)
        logits, features = self._run(bucket, inputs)
        return logits[:count], None if features is None else features[:count]

    def _fill_inputs(self, inputs: dict, tokens, depths, ancestor_mask) -> None:
        """Write this round's tree into a bucket's static inputs (pads see the context and themselves)."""
        count, start, bucket = len(tokens), self._length, len(inputs["tokens"])
        inputs["tokens"].fill_(PAD_TOKEN)
        inputs["tokens"][:count] = tokens
        inputs["positions"].fill_(start)
        inputs["positions"][:count] += depths
        torch.add(inputs["offsets"], start, out=inputs["write_positions"])
        mask = inputs["mask"][0, 0]  # (bucket, capacity)
        torch.lt(self._key_index, start, out=mask[0])  # the context, for every row
        mask[1:] = mask[0]
        tree = mask[:, start : start + bucket]
        tree.copy_(inputs["pad_diagonal"])
        tree[:count, :count] = ancestor_mask

    def _run(self, bucket: int, inputs: dict):
        if not self.cuda_graphs or bucket not in BUCKETS:
            return self._forward_bucket(inputs)
        if bucket not in self._graphs:
            graph, (logits, features) = capture_graph(lambda: self._forward_bucket(inputs), self._pool)
            self._graphs[bucket] = graph, logits, features
        graph, logits, features = self._graphs[bucket]
        graph.replay()
        return logits, features

    def _forward_bucket(self, inputs: dict):
        self.cache.layers = inputs["layers"]
        return self._forward(inputs["tokens"], inputs["positions"], inputs["mask"])


    def _bucket_inputs(self, bucket: int) -> dict:
        """The bucket's static input tensors (allocated once; graphs read them by address)."""
        if bucket not in self._inputs:
            device = self.target.device
            write_positions = torch.zeros(bucket, dtype=torch.long, device=device)
            self._inputs[bucket] = {
                "tokens": torch.zeros(bucket, dtype=torch.long, device=device),
                "positions": torch.zeros(bucket, dtype=torch.long, device=device),
                "write_positions": write_positions,
                "mask": torch.zeros(1, 1, bucket, self.capacity, dtype=torch.bool, device=device),
                "offsets": torch.arange(bucket, device=device),
                "pad_diagonal": torch.eye(bucket, dtype=torch.bool, device=device),
                "layers": self._static_layers(write_positions),
            }
        return self._inputs[bucket]

    @torch.inference_mode()
    def keep(self, accepted_positions: torch.Tensor) -> None:
        """Move the accepted entries' keys and values after the context: one gather, one copy."""
        start, kept = self._tree_start, len(accepted_positions)
        entries = self.buffer.index_select(4, start + accepted_positions)
        self.buffer[:, :, :, :, start : start + kept].copy_(entries)
        self._length = start + kept

    def _check_room(self, needed: int) -> None:
        if needed > self.capacity:
            raise ValueError(f"the static cache holds {self.capacity} positions; this round needs {needed}")
