"""The decoding loop: draft -> build tree -> verify -> accept -> compact, one round at a time."""

from __future__ import annotations

import time
from typing import Callable

import torch

from caddtree.decode.acceptance import accepted_path, read_path
from caddtree.decode.drafting import DraftRunner, decoding_dtype
from caddtree.decode.lookup import LookupProposer
from caddtree.decode.proposals import Proposals
from caddtree.decode.sampling import Sampling, check_seed
from caddtree.decode.stats import GenerationResult, RoundRecord
from caddtree.errors import CaddtreeError
from caddtree.models.drafter import DFlashDrafter
from caddtree.models.static_runner import BUCKETS, StaticTargetRunner
from caddtree.models.target import Target, TargetRunner, check_tree_verification, check_within_window
from caddtree.tree.draft_tree import DraftTree


LARGEST_BUCKET = BUCKETS[-1]  # room kept for the largest tree a round verifies


def eos_token_ids(target: Target) -> set[int]:
    ids = set()
    tokenizer_eos = target.tokenizer.eos_token_id if target.tokenizer is not None else None
    for source in (tokenizer_eos, getattr(target.model.generation_config, "eos_token_id", None)):
        if source is not None:
            ids.update(source if isinstance(source, (list, tuple)) else [source])
    return ids


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Engine:
    """A target (and optionally a drafter) ready to decode with any policy."""

    def __init__(self, target: Target, drafter: DFlashDrafter | None = None, static_shapes: bool | None = None,
                 drafter_dtype: torch.dtype | None = None):
        """`static_shapes` (default: on CUDA) verifies with fixed shapes, replayed as CUDA graphs on a GPU;
        the drafter drafts in `drafter_dtype` (default: `decoding_dtype`, bfloat16 on a CPU with its units)."""
        check_tree_verification(target)
        self.target = target
        on_gpu = target.device.type == "cuda"
        static_shapes = on_gpu if static_shapes is None else static_shapes
        self.drafts = None if drafter is None else DraftRunner(drafter, target, static_shapes, on_gpu,
                                                               drafter_dtype or decoding_dtype(target))
        feature_layers = self.drafts.feature_layers if self.drafts else []
        if static_shapes:
            self.verifier = StaticTargetRunner(target, feature_layers, cuda_graphs=on_gpu)
        else:
            self.verifier = TargetRunner(target, feature_layers)
        self.lookup = LookupProposer()
        self.eos_ids = eos_token_ids(target)

    @property
    def draft_len(self) -> int:
        """Draft positions per round (0 without a drafter)."""
        return self.drafts.drafter.config.draft_len if self.drafts else 0

    def reserve(self, positions: int, largest_tree: int) -> None:
        """Room for `positions` cached tokens (prompt and answer) plus a tree of `largest_tree`
        nodes; a benchmark asks once for its longest prompt, so no timed round grows a buffer."""
        self.verifier.reserve(positions + max(LARGEST_BUCKET, largest_tree + 1))
        if self.drafts is not None:
            self.drafts.reserve(positions)

    def generate(self, prompt_ids: torch.Tensor, policy, max_new_tokens: int = 256,
                 sampling: Sampling = Sampling(), seed: int = 0,
                 on_tokens: Callable[[list[int]], bool | None] | None = None) -> GenerationResult:
        """Decode after `prompt_ids` (1-D) with `policy`; `on_tokens` receives each new chunk and may
        return True to end the generation there (a stop sequence, a client gone)."""
        if policy.uses_drafter and self.drafts is None:
            raise CaddtreeError(f"method {policy.name!r} needs a drafter")
        if max_new_tokens < 1:
            raise CaddtreeError(f"max-new-tokens must be >= 1, got {max_new_tokens}")
        check_seed(seed)
        device = self.target.device
        prompt_ids = prompt_ids.to(device)
        max_new_tokens = min(max_new_tokens, self.target.max_positions - len(prompt_ids))
        self._check_window(policy, len(prompt_ids) + max_new_tokens)
        self.reserve(len(prompt_ids) + max_new_tokens, policy.largest_tree(self.draft_len))
        generator = torch.Generator(device=device).manual_seed(seed)
        result = GenerationResult(method=policy.name, prompt_tokens=len(prompt_ids), tokens=[])

        policy.reset()
        start = time.perf_counter()
        root = self._prefill(prompt_ids, sampling, generator, policy.uses_drafter)
        first_token = root.item()  # waits for the prefill to finish
        if policy.uses_lookup:
            self.lookup.reset(prompt_ids.tolist() + [first_token])
        result.prefill_seconds = time.perf_counter() - start
        if self._emit(result, [first_token], max_new_tokens, on_tokens)[1]:
            return result
        while True:
            start = time.perf_counter()
            context_len = self.verifier.context_len
            # The round ends in a host read of its results, which waits for the device: no extra sync.
            emitted, budget, drafted, root = self._round(root, policy, sampling, generator, max_new_tokens - result.new_tokens)
            kept, finished = self._emit(result, emitted, max_new_tokens, on_tokens)
            result.rounds.append(RoundRecord(budget, kept, context_len, time.perf_counter() - start, drafted))
            if finished:
                return result

    def _check_window(self, policy, positions: int) -> None:
        """Trees, and every pass of the fixed-shape runner, attend under a mask of their own, which
        a sliding-window layer takes as given: exact only while the whole sequence fits the window."""
        static = isinstance(self.verifier, StaticTargetRunner)
        if policy.largest_tree(self.draft_len) or static:
            remedy = "--method ar --no-cuda-graphs" if static else "--method ar"
            check_within_window(self.target, positions + (self.drafts.block_size if policy.uses_drafter else 0), remedy)

    def _prefill(self, prompt_ids, sampling, generator, uses_drafter) -> torch.Tensor:
        logits, features = self.verifier.prefill(prompt_ids)
        if uses_drafter:
            self.drafts.reset()
            self.drafts.extend(features, torch.arange(len(prompt_ids), device=prompt_ids.device))
            self.drafts.flush()  # the prompt's share of the drafter's work belongs to the prefill
        return sampling.choose(logits[None], generator)[0]

    def _round(self, root, policy, sampling, generator, remaining: int):
        """One round; returns the emitted tokens (host list), the tree size, whether the drafter ran,
        and the next root."""
        context_len = self.verifier.context_len
        # A round emits at most depth + 1 tokens.
        proposals = self._propose(root, policy, remaining - 1, context_len)
        tree = policy.build(proposals, context_len) if proposals else DraftTree.empty(root.device)
        tree_tokens, tree_depths = tree.with_root(root)
        logits, features = self.verifier.verify(tree_tokens, tree_depths, tree.ancestor_mask)
        choices = sampling.choose(logits, generator)
        accepted = accepted_path(tree, choices, (proposals.depth if proposals else 0) + 1)
        emitted, accepted_ranks = read_path(tree, tree_tokens, accepted)
        path = accepted.positions[: len(emitted)]
        self.verifier.keep(path)
        policy.observe(accepted_ranks)
        if policy.uses_drafter:  # indexing copies: `features` may be a buffer the next verify reuses
            self.drafts.extend(features[path], context_len + torch.arange(len(emitted), device=path.device))
        if policy.uses_lookup:
            self.lookup.observe(emitted)
        return emitted, tree.size, bool(proposals and proposals.drafted), accepted.next_token

    def _propose(self, root, policy, depth: int, context_len: int) -> Proposals | None:
        """What the policy's proposers offer for a tree of at most `depth` levels (None: nothing)."""
        if depth == 0:
            return None
        drafted = policy.uses_drafter and policy.should_draft()
        log_probs = self.drafts.draft(root, context_len, min(depth, self.draft_len)) if drafted else None
        lookup = self.lookup.propose(depth, root.device) if policy.uses_lookup else None
        if log_probs is None and lookup is None:
            return None
        return Proposals(log_probs, self.drafts.head.target_tokens if drafted else None, lookup)

    def _emit(self, result, tokens, max_new_tokens, on_tokens) -> tuple[int, bool]:
        """Append tokens up to EOS or the length limit; how many were kept, and whether that ends it."""
        room = max_new_tokens - result.new_tokens
        eos_at = next((i for i, token in enumerate(tokens) if token in self.eos_ids), None)
        kept = tokens[: min(room, len(tokens) if eos_at is None else eos_at + 1)]
        result.tokens.extend(kept)
        if eos_at is not None and eos_at < room:
            result.finish_reason = "eos"
        elif result.new_tokens >= max_new_tokens:
            result.finish_reason = "length"
        if on_tokens and kept and on_tokens(kept) and result.finish_reason is None:
            result.finish_reason = "caller"
        return len(kept), result.finish_reason is not None
