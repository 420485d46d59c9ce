"""Training records from ShareGPT's own answers (ChatGPT's text, not the target's), for off-policy data.

    python scripts/sharegpt_reference_records.py --out chatgpt-answers.jsonl.gz --skip 100
    python scripts/sharegpt_reference_records.py --out chatgpt-later.jsonl.gz --turns later \
        --data ../shared/data/smollm2-sharegpt-greedy.jsonl.gz --max-prompt-tokens 1024

The records pair a conversation (through the default target's chat template, as `train-drafter`
encodes prompts) with the reply ShareGPT holds next, cut at 256 tokens like `../shared/data`'s
answers (an answer that fits ends with `<|im_end|>`). `--turns first` (the default) takes each
first user turn's reply; `--turns later` every reply after it, its context the conversation so far
(ChatGPT's earlier replies included), leaving out the conversations that open with one of
`train-drafter`'s held-out records or evaluation prompts (same --data first file,
--heldout-records, --eval-prompts). Conversations come in the order of
`caddtree.train.data.sharegpt_prompts` (seed 0), so `--skip 100` leaves out the prompts that
`train-drafter --eval-prompts` takes. Making them costs no generation: only `train-drafter`'s
feature pass, which labels every position with the target's own distribution (`--distill`).
"""

import argparse
import gzip
import json
from collections.abc import Iterator
from itertools import islice

from tqdm import tqdm

from caddtree.models.target import encode_chat, encode_prompt, load_target
from caddtree.train.data import read_data_files, sharegpt_prompted_conversations, unseen_prompt_ids

MAX_ANSWER_TOKENS, END_OF_TURN = 256, 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="gzip JSONL of {prompt_ids, response_ids}")
    parser.add_argument("--skip", type=int, default=100, help="leave out the first SKIP conversations of the order")
    parser.add_argument("--limit", type=int, default=None, help="at most this many records")
    parser.add_argument("--turns", choices=["first", "later"], default="first")
    parser.add_argument("--max-prompt-tokens", type=int, default=384)
    parser.add_argument("--data", help="with --turns later: train-drafter's first --data file")
    parser.add_argument("--heldout-records", type=int, default=136)
    parser.add_argument("--eval-prompts", type=int, default=6)
    args = parser.parse_args()
    if args.turns == "later" and not args.data:
        parser.error("--turns later needs --data, the file whose held-out records' conversations it leaves out")
    target = load_target(None)
    conversations = sharegpt_prompted_conversations()[args.skip:]
    unseen = unseen_prompt_ids(target, read_data_files([args.data], target.vocab_size)[0],
                               args.heldout_records, args.eval_prompts) if args.data else set()
    records = answer_tokens = 0
    with gzip.open(args.out, "wt") as out:
        for record in islice(_records(target, conversations, unseen, args.turns == "later", args.max_prompt_tokens), args.limit):
            out.write(json.dumps(record) + "\n")
            records, answer_tokens = records + 1, answer_tokens + len(record["response_ids"])
    print(f"wrote {records} records, {answer_tokens} answer tokens to {args.out}")


def _records(target, conversations: list[list[dict]], unseen: set[tuple[int, ...]], later: bool,
             max_prompt_tokens: int) -> Iterator[dict]:
    """Records of `conversations` whose opening prompt is not `unseen`, lazily (a --limit stops early)."""
    for turns in tqdm(conversations, desc="conversations", unit="conversation"):
        if unseen and tuple(encode_prompt(target, turns[0]["value"]).tolist()) in unseen:
            continue
        for messages, answer in _replies(turns, later):
            if len(answer) < 16:
                continue
            prompt_ids = encode_chat(target, messages).tolist()
            if len(prompt_ids) > max_prompt_tokens:
                break  # a later turn's context holds this one's
            answer_ids = target.tokenizer(answer, add_special_tokens=False)["input_ids"]
            answer_ids = answer_ids[:MAX_ANSWER_TOKENS] if len(answer_ids) >= MAX_ANSWER_TOKENS else answer_ids + [END_OF_TURN]
            yield {"prompt_ids": prompt_ids, "response_ids": answer_ids}


def _replies(turns: list[dict], later: bool) -> Iterator[tuple[list[dict], str]]:
    """(the conversation so far as chat messages, the reply that follows it): the first reply, or
    every later one; it stops where the turns stop alternating user, assistant."""
    messages = []
    for index, (ask, reply) in enumerate(zip(turns[0::2], turns[1::2])):
        if ask.get("from") != "human" or reply.get("from") != "gpt" or not ask.get("value", "").strip():
            return
        messages = messages + [{"role": "user", "content": ask["value"]}]
        if later == (index > 0):
            yield messages, reply.get("value", "")
        if not later:
            return
        messages = messages + [{"role": "assistant", "content": reply.get("value", "")}]


if __name__ == "__main__":
    main()
