"""Training-free drafts: continuations copied from the context (prompt lookup decoding, as a tree).

The suffix of the text so far (prompt and answer) is looked up in an n-gram index of that same
text; what followed its earlier occurrences is proposed as draft nodes, several occurrences
branching into several paths. Each node's weight is an estimate of its acceptance probability,
learnt during the generation from how often nodes of its kind (how long a match it continues,
how it ranks among its siblings) were the target's choice, so that Φ(n) and the budget rules
apply to these nodes exactly as to the drafter's.

Candidates are few (at most MAX_CANDIDATES paths of MAX_DEPTH tokens) and the index lives on the
host, so the trie is built in plain Python; only the finished list goes to the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from caddtree.tree.build import RankedNodes

MAX_NGRAM = 4  # longest n-gram indexed; longer matches are measured by walking back
MAX_MATCH = 32  # match lengths are counted back at most this far
MAX_DEPTH = 16  # tokens per candidate path
MAX_CANDIDATES = 8  # occurrences followed per round
RECENT_OCCURRENCES = 64  # only the latest occurrences of a short n-gram are compared
LENGTH_BOUNDS = (1, 2, 3, 4, 6, 8, 12, 16, 24)  # kinds of nodes: lower bounds of the match length
MAX_RANK = 2  # siblings ranked beyond this share one kind
PRIOR_ROUNDS = 2.0  # pseudo-observations of each kind, at its prior rate
MAX_PRIOR = 0.95  # no kind is certain before it is seen
CAUTION = 0.5  # standard deviations taken off each rate estimate (see KindStatistics.rate)


class NgramIndex:
    """Every n-gram (n <= max_n) of a growing token sequence, with where each occurrence ends."""

    def __init__(self, max_n: int = MAX_NGRAM):
        self.max_n = max_n
        self.tokens: list[int] = []
        self._ends: dict[tuple[int, ...], list[int]] = {}  # n-gram -> end positions, increasing

    def extend(self, tokens: list[int]) -> None:
        """Append tokens, indexing only the n-grams that end in them."""
        start = len(self.tokens)
        self.tokens.extend(tokens)
        for end in range(start + 1, len(self.tokens) + 1):
            for n in range(1, min(self.max_n, end) + 1):
                self._ends.setdefault(tuple(self.tokens[end - n : end]), []).append(end)

    def earlier_ends(self, n: int) -> list[int]:
        """Ends of the earlier occurrences of the last n tokens, oldest first: what follows each
        (tokens[end:]) is a continuation that the text has seen after this suffix."""
        if not 1 <= n <= min(self.max_n, len(self.tokens)):
            return []
        return self._ends[tuple(self.tokens[-n:])][:-1]  # the last occurrence is the suffix itself

    def match_length(self, end: int) -> int:
        """How many tokens before `end` equal the text's last tokens (at most MAX_MATCH)."""
        tokens, length = self.tokens, 0
        while length < min(MAX_MATCH, end) and tokens[end - 1 - length] == tokens[-1 - length]:
            length += 1
        return length


def node_kind(match_length: int, sibling_rank: int) -> tuple[int, int]:
    """The statistics cell of a node: its match-length bucket and its rank among its siblings."""
    bucket = sum(match_length >= bound for bound in LENGTH_BOUNDS) - 1
    return bucket, min(sibling_rank, MAX_RANK)


def prior_rate(kind: tuple[int, int]) -> float:
    """Before any evidence: longer matches are likelier continued, minority branches less so."""
    bucket, rank = kind
    length = LENGTH_BOUNDS[bucket]
    return length / (length + 2) / (1 + 2 * rank)


@dataclass
class KindStatistics:
    """Per kind of node: how often a node of that kind, tested (its parent was on the target's
    path), was the target's choice; counted over this generation.

    A kind seen rarely leans on its prior rate, scaled by how all lookups have fared against
    their priors so far: on text that does not repeat, every kind learns from the first
    rejections of any, instead of each paying for its own."""

    tested: dict = field(default_factory=dict)
    accepted: dict = field(default_factory=dict)
    all_accepted: int = 0
    all_expected: float = 0.0  # the sum of the prior rates of every tested node

    @property
    def pooled_ratio(self) -> float:
        """Accepted nodes per node the priors expected, over every kind (1 before any evidence)."""
        return (self.all_accepted + 1) / (self.all_expected + 1)

    def rate(self, kind: tuple[int, int]) -> float:
        """The kind's acceptance rate, CAUTION standard deviations below its estimate (at most
        halved): a kind seen few times verifies only when it clearly pays. On 15 prompts, timed by
        the cost model (no clock noise), half a deviation (without the floor) lifted the worst
        prompt that repeats nothing from 0.96x to 0.98x of a plain step and the geometric mean
        from 1.435x to 1.448x; a whole deviation cost the grounded prompts too much (1.412x). The
        floor keeps every rate above 0 and a fresh kind of low prior in play in short generations
        (with it, those 15 prompts moved by at most 0.006x)."""
        prior = min(MAX_PRIOR, prior_rate(kind) * self.pooled_ratio)
        observations = self.tested.get(kind, 0) + PRIOR_ROUNDS
        estimate = (self.accepted.get(kind, 0) + PRIOR_ROUNDS * prior) / observations
        return max(estimate - CAUTION * math.sqrt(estimate * (1 - estimate) / observations), estimate / 2)

    def record(self, kind: tuple[int, int], was_accepted: bool) -> None:
        self.tested[kind] = self.tested.get(kind, 0) + 1
        self.accepted[kind] = self.accepted.get(kind, 0) + was_accepted
        self.all_accepted += was_accepted
        self.all_expected += prior_rate(kind)


@dataclass
class _Trie:
    """This round's candidate paths merged into a tree; node i's parent is parents[i] (-1: root)."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)
    match_lengths: list[int] = field(default_factory=list)  # longest match any path through it continues
    support: list[int] = field(default_factory=list)  # candidate paths through it
    children: dict = field(default_factory=dict)  # parent -> {token: child}

    def add_path(self, match_length: int, path: list[int]) -> None:
        node = -1
        for depth, token in enumerate(path, 1):
            siblings = self.children.setdefault(node, {})
            child = siblings.get(token)
            if child is None:
                child = siblings[token] = len(self.tokens)
                self.tokens.append(token)
                self.parents.append(node)
                self.depths.append(depth)
                self.match_lengths.append(0)
                self.support.append(0)
            self.support[child] += 1
            self.match_lengths[child] = max(self.match_lengths[child], match_length + depth - 1)
            node = child

    def kinds(self) -> list[tuple[int, int]]:
        """Each node's kind; siblings rank by support, then by match length, then by age."""
        kinds = [None] * len(self.tokens)
        for siblings in self.children.values():
            ranked = sorted(siblings.values(), key=lambda n: (-self.support[n], -self.match_lengths[n], n))
            for rank, node in enumerate(ranked):
                kinds[node] = node_kind(self.match_lengths[node], rank)
        return kinds


class LookupProposer:
    """Proposes continuations of the context; learns from each round what the target chose."""

    def __init__(self):
        self.index = NgramIndex()
        self.statistics = KindStatistics()
        self._trie: _Trie | None = None  # the last proposal, kept until the round's outcome is known
        self._kinds: list[tuple[int, int]] = []

    def reset(self, tokens: list[int]) -> None:
        """Start a generation whose text so far (prompt and first token) is `tokens`."""
        self.index = NgramIndex()
        self.index.extend(tokens)
        self.statistics = KindStatistics()
        self._trie = None

    def propose(self, max_depth: int, device: torch.device | str) -> RankedNodes | None:
        """Best-first nodes continuing the text (None when it has no earlier match)."""
        self._trie = None
        candidates = self._candidates(min(max_depth, MAX_DEPTH))
        if not candidates:
            return None
        trie = _Trie()
        for match_length, path in candidates:
            trie.add_path(match_length, path)
        self._trie, self._kinds = trie, trie.kinds()
        return self._ranked(device)

    def observe(self, chosen: list[int]) -> None:
        """The target's choices this round (the accepted tokens, then its own token): every
        proposed node whose parent they reach is tested, and accepted if it is the next choice.
        Then the chosen tokens join the text."""
        node = -1
        for choice in chosen:
            if self._trie is None:
                break
            siblings = self._trie.children.get(node, {})
            for token, child in siblings.items():
                self.statistics.record(self._kinds[child], token == choice)
            if choice not in siblings:
                break
            node = siblings[choice]
        self._trie = None
        self.index.extend(chosen)

    def _candidates(self, max_depth: int) -> list[tuple[int, list[int]]]:
        """Up to MAX_CANDIDATES (match length, continuation) pairs: occurrences of the longest
        suffix n-gram that occurred before, longest match first, then most recent."""
        index = self.index
        ends = next((e for n in range(index.max_n, 0, -1) if (e := index.earlier_ends(n))), [])
        recent = ends[-RECENT_OCCURRENCES:]
        best = sorted(((index.match_length(end), end) for end in recent), reverse=True)[:MAX_CANDIDATES]
        return [(length, index.tokens[end : end + max_depth]) for length, end in best]

    def _ranked(self, device) -> RankedNodes:
        trie = self._trie
        conditional = [self.statistics.rate(kind) for kind in self._kinds]
        # Siblings are exclusive events: their probabilities given the parent may not sum past 1.
        for siblings in trie.children.values():
            total = sum(conditional[node] for node in siblings.values())
            if total > 1:
                for node in siblings.values():
                    conditional[node] /= total
        log_weights = [0.0] * len(conditional)
        for node, parent in enumerate(trie.parents):  # parents precede children
            log_weights[node] = math.log(conditional[node]) + (log_weights[parent] if parent >= 0 else 0.0)
        # Best-first; a parent weighs at least its child and ties go to the shallower, so every
        # prefix of the order is a tree.
        order = sorted(range(len(log_weights)), key=lambda node: (-log_weights[node], trie.depths[node]))
        rank = {node: position for position, node in enumerate(order)}
        parents = [rank[trie.parents[node]] if trie.parents[node] >= 0 else -1 for node in order]
        return RankedNodes(
            tokens=torch.tensor([trie.tokens[node] for node in order], dtype=torch.long, device=device),
            parents=torch.tensor(parents, dtype=torch.long, device=device),
            depths=torch.tensor([trie.depths[node] for node in order], dtype=torch.long, device=device),
            log_weights=torch.tensor([log_weights[node] for node in order], dtype=torch.float64, device=device),
            num_depths=max(trie.depths),
        )
