"""Runs every method side by side on each prompt, in one process, and records what each did.

Side by side because absolute times are only comparable inside one run on one machine: every
method decodes the same prompt right after the others, so drifting clocks or a busy neighbour
touch them all alike.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from caddtree.bench.prompts import BenchPrompt
from caddtree.cost.model import CostModel
from caddtree.decode.engine import synchronize
from caddtree.decode.parting import first_parting
from caddtree.decode.policy import RULES, make_policy
from caddtree.decode.sampling import Sampling
from caddtree.models.target import encode_chat

HF_GENERATE = "hf-generate"  # transformers' own generate: the outside reference
WARM_UP_TOKENS = 16
ANSWER_FRAMING_TOKENS = 8  # the chat template's tokens around an answer, with room to spare


@dataclass(frozen=True)
class MethodSpec:
    label: str  # how tables name it: "ar", "ddtree@64", "caddtree-exact", ...
    method: str  # ar, dflash, ddtree, caddtree or hf-generate
    budget: int | None = None
    rule: str = "exact"
    calibrate: bool = True  # caddtree: scale the surrogate by measured acceptance (False: the paper's rule)
    lookup: bool = True  # caddtree: add continuations found in the context to the drafter's tree


def method_specs(methods: list[str], budgets: list[int], hf_generate: bool) -> list[MethodSpec]:
    """One entry per column of the comparison: ddtree at every budget, caddtree with every rule."""
    specs = []
    for method in methods:
        if method == "ddtree":
            specs += [MethodSpec(f"ddtree@{budget}", method, budget) for budget in budgets]
        elif method == "caddtree":
            specs += [MethodSpec(f"caddtree-{rule}", method, rule=rule) for rule in RULES]
            specs.append(MethodSpec("caddtree-exact-uncalibrated", method, rule="exact", calibrate=False))
            specs.append(MethodSpec("caddtree-exact-no-lookup", method, rule="exact", lookup=False))
        else:
            specs.append(MethodSpec(method, method))
    if hf_generate:
        specs.append(MethodSpec(HF_GENERATE, HF_GENERATE))
    return specs


@dataclass(frozen=True)
class Decoded:
    """What one method's decoding of one prompt produced, and how long it took."""

    tokens: list[int]
    decoded_tokens: int  # tokens produced by timed rounds (the prefill's token excluded)
    seconds: float
    budgets: list[int]  # tree size per round
    emitted: list[int]  # tokens per round


@dataclass
class Record:
    """One method's decoding of one turn of one prompt."""

    dataset: str
    prompt_index: int
    turn: int  # 0-based; MT-Bench's second turn is 1
    method: str  # the MethodSpec label
    new_tokens: int
    decoded_tokens: int
    decode_seconds: float
    rounds: int
    budgets: list[int]
    emitted: list[int]
    equal_to_ar: bool | None = None  # greedy only: same tokens as ar's
    parted_at_near_tie: bool | None = None  # greedy, not ar's tokens: only where rounding decides a near-tie

    @property
    def tokens_per_s(self) -> float:
        return self.decoded_tokens / self.decode_seconds if self.decode_seconds else 0.0


class BenchRunner:
    """Decodes prompts with every method on one loaded pair."""

    def __init__(self, pair, specs: list[MethodSpec], sampling: Sampling, max_new_tokens: int,
                 seed: int = 0, cost_model: CostModel | None = None):
        self.pair = pair
        self.specs = specs
        self.sampling = sampling
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self.policies = {
            spec.label: make_policy(spec.method, spec.budget, spec.rule, cost_model, spec.calibrate, spec.lookup)
            for spec in specs if spec.method != HF_GENERATE
        }

    def warm_up(self, prompts: list[BenchPrompt]) -> None:
        """Everything a first call would pay inside a timed run, paid now: buffers sized for the
        longest conversation, every CUDA graph the trees can use, and every method run once."""
        engine = self.pair.engine
        largest_tree = max((policy.largest_tree(engine.draft_len) for policy in self.policies.values()), default=0)
        engine.reserve(max(self._longest_context(prompt) for prompt in prompts), largest_tree)
        engine.verifier.capture(largest_tree)
        prompt_ids = self._encode([{"role": "user", "content": prompts[0].turns[0]}])
        for spec in self.specs:
            self._decode(spec, prompt_ids, min(WARM_UP_TOKENS, self.max_new_tokens), self.seed)

    def _longest_context(self, prompt: BenchPrompt) -> int:
        """An upper bound on the conversation's tokens: every turn, and every answer at full length."""
        messages = []
        for text in prompt.turns:
            messages += [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]
        return len(self._encode(messages[:-1])) + len(prompt.turns) * (self.max_new_tokens + ANSWER_FRAMING_TOKENS)

    def run(self, prompts: list[BenchPrompt], show_progress: bool = True) -> list[Record]:
        total = sum(len(prompt.turns) for prompt in prompts) * len(self.specs)
        records = []
        with tqdm(total=total, desc="bench", unit="run", disable=not show_progress) as bar:
            for prompt in prompts:
                records += self._prompt_records(prompt, bar)
        return records

    def _prompt_records(self, prompt: BenchPrompt, bar: tqdm) -> list[Record]:
        """Every method on every turn; a later turn sees the earlier turns and the greedy ar answers."""
        messages, records = [], []
        for turn, text in enumerate(prompt.turns):
            messages.append({"role": "user", "content": text})
            prompt_ids = self._encode(messages)
            turn_records, outputs = self._turn_records(prompt, turn, prompt_ids, bar)
            records += turn_records
            if turn + 1 < len(prompt.turns):
                messages.append({"role": "assistant", "content": self._own_answer(prompt_ids, outputs)})
        return records

    def _turn_records(self, prompt: BenchPrompt, turn: int, prompt_ids: torch.Tensor, bar: tqdm):
        """Every method on one turn: its records, and each method's tokens by label."""
        records, outputs = [], {}
        # Each turn starts with another method, so no method always runs first (or after the same one).
        start = (prompt.index + turn) % len(self.specs)
        for spec in self.specs[start:] + self.specs[:start]:
            decoded = self._decode(spec, prompt_ids, self.max_new_tokens, self.seed + prompt.index)
            outputs[spec.label] = decoded.tokens
            records.append(Record(prompt.dataset, prompt.index, turn, spec.label, len(decoded.tokens),
                                  decoded.decoded_tokens, decoded.seconds, len(decoded.budgets), decoded.budgets,
                                  decoded.emitted))
            bar.set_postfix_str(f"{spec.label} {records[-1].tokens_per_s:.1f} tokens/s", refresh=False)
            bar.update()
        if self.sampling.greedy and "ar" in outputs:
            for record in records:
                parting = first_parting(self.pair.target, record.method, prompt_ids, outputs[record.method], outputs["ar"])
                record.equal_to_ar = parting is None
                record.parted_at_near_tie = parting.near_tie if parting else None
        order = [spec.label for spec in self.specs]
        return sorted(records, key=lambda record: order.index(record.method)), outputs

    def _own_answer(self, prompt_ids: torch.Tensor, outputs: dict[str, list[int]]) -> str:
        """The model's own greedy answer, fed to the next turn: ar's output when it ran greedy,
        else decoded once more (untimed), so every method sees the same conversation."""
        tokens = outputs.get("ar") if self.sampling.greedy else None
        if tokens is None:
            tokens = self.pair.engine.generate(prompt_ids, make_policy("ar"), self.max_new_tokens).tokens
        return self.pair.target.tokenizer.decode(tokens, skip_special_tokens=True)

    def _encode(self, messages: list[dict]) -> torch.Tensor:
        return encode_chat(self.pair.target, messages)

    def _decode(self, spec: MethodSpec, prompt_ids, max_new_tokens: int, seed: int) -> Decoded:
        if spec.method == HF_GENERATE:
            return self._hf_generate(prompt_ids, max_new_tokens)
        result = self.pair.engine.generate(prompt_ids, self.policies[spec.label], max_new_tokens, self.sampling, seed)
        rounds = result.rounds
        return Decoded(result.tokens, result.decoded_tokens, result.decode_seconds,
                       [r.budget for r in rounds], [r.emitted for r in rounds])

    @torch.inference_mode()
    def _hf_generate(self, prompt_ids, max_new_tokens: int) -> Decoded:
        """transformers' own generate, greedy or sampling at the bench's temperature, timed like the
        other methods: from its first new token (the end of its prefill) to its last."""
        target, eos_ids = self.pair.target, sorted(self.pair.engine.eos_ids)
        input_ids = prompt_ids[None].to(target.device)
        max_new_tokens = min(max_new_tokens, target.max_positions - len(prompt_ids))
        sampling = {} if self.sampling.greedy else {"temperature": self.sampling.temperature, "top_k": 0, "top_p": 1.0}
        clock = _FirstTokenClock(target.device)
        output = target.model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
            do_sample=not self.sampling.greedy, eos_token_id=eos_ids or None,
            pad_token_id=eos_ids[0] if eos_ids else None, streamer=clock, **sampling,
        )
        synchronize(target.device)
        seconds = time.perf_counter() - clock.first_token_at
        tokens = output[0, len(prompt_ids):].tolist()
        decoded = len(tokens) - 1  # the prefill's token is not timed, as for the other methods
        return Decoded(tokens, decoded, seconds, [0] * decoded, [1] * decoded)  # one token per forward


class _FirstTokenClock:
    """A transformers streamer that notes when the first new token arrives (its first `put` is
    the prompt; the second, the token the prefill chose)."""

    def __init__(self, device: torch.device):
        self.device, self.puts, self.first_token_at = device, 0, time.perf_counter()

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            synchronize(self.device)
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        pass
