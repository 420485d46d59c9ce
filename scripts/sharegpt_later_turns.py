"""ShareGPT's N-th user turns as prompts for `train-drafter --prompts`, after the target's own earlier answers.

    python scripts/sharegpt_later_turns.py --turn 2 --data ../shared/data/smollm2-sharegpt-greedy.jsonl.gz \
        data/smollm2-sharegpt-greedy-2.jsonl.gz data/smollm2-sharegpt-greedy-3.jsonl.gz --out second-turns.jsonl

Each line is {"messages": [user turn 1, the target's greedy answer to it, ..., user turn N]}: a
conversation as the target itself would have had it, each earlier answer read from the --data
records of the conversation so far (so turn N needs the records answering turns 1 to N-1), and
the answers made from these prompts are what a user's N-th turn gets. `--turn 1` writes the first
turns alone (every ShareGPT first turn that `train-drafter`'s own list draws from, to sample them
again with another `--seed`); its --data is just the first file. Conversations whose first
turn is one of `train-drafter`'s held-out records or evaluation prompts (same --heldout-records,
--eval-prompts and --seed; the first --data file must be the one that run reads first) are left
out, so that later runs keep those unseen.
"""

import argparse
import json
from pathlib import Path

from caddtree.models.target import encode_prompt, load_target
from caddtree.train.data import is_prompt_turn, read_data_files, sharegpt_conversations, unseen_prompt_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turn", type=int, default=2, help="which user turn to ask (1 or more; default 2)")
    parser.add_argument("--data", nargs="+", required=True,
                        help="record files answering the earlier turns; the held-out records come from the first")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--heldout-records", type=int, default=136)
    parser.add_argument("--eval-prompts", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.turn < 1:
        parser.error("--turn must be 1 or more")
    target = load_target(None)
    files = read_data_files(args.data, target.vocab_size)
    answers = {tuple(record.prompt_ids): record.response_ids for records in files for record in records}
    unseen = unseen_prompt_ids(target, files[0], args.heldout_records, args.eval_prompts, args.seed)
    lines = []
    for turns in sharegpt_conversations():
        if _has_turn(turns, args.turn) and tuple(encode_prompt(target, turns[0]["value"]).tolist()) not in unseen:
            messages = _with_own_answers(target, turns, args.turn, answers)
            if messages is not None:
                lines.append(json.dumps({"messages": messages}))
    args.out.write_text("".join(line + "\n" for line in lines))
    print(f"wrote {len(lines)} conversations to {args.out}")


def _has_turn(turns: list[dict], turn: int) -> bool:
    """User prompt turns at 0, 2, ..., 2(turn-1), each followed by a reply before the last."""
    users, replies = turns[0:2 * turn - 1:2], turns[1:2 * turn - 2:2]
    return (len(turns) >= 2 * turn - 1 and all(is_prompt_turn(user) for user in users)
            and all(reply.get("from") == "gpt" for reply in replies))


def _with_own_answers(target, turns: list[dict], turn: int, answers: dict) -> list[dict] | None:
    """The first `turn` user turns, each earlier one followed by the target's recorded answer;
    None where a record is missing."""
    messages = []
    for index in range(turn - 1):
        messages.append({"role": "user", "content": turns[2 * index]["value"]})
        answer = answers.get(tuple(encode_prompt(target, messages).tolist()))
        if answer is None:
            return None
        messages.append({"role": "assistant", "content": target.tokenizer.decode(answer, skip_special_tokens=True)})
    return messages + [{"role": "user", "content": turns[2 * turn - 2]["value"]}]


if __name__ == "__main__":
    main()
