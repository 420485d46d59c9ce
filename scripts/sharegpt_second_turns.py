"""Second user turns of ShareGPT as prompts for `train-drafter --prompts`, after the target's own first answer.

    python scripts/sharegpt_second_turns.py --data ../shared/data/smollm2-sharegpt-greedy.jsonl.gz \
        data/smollm2-sharegpt-greedy-2.jsonl.gz data/smollm2-sharegpt-greedy-3.jsonl.gz --out second-turns.jsonl

Each line is {"messages": [first user turn, the target's greedy answer to it (from --data), second
user turn]}: a conversation as the target itself would have had it, so the answers made from these
prompts are what a user's second turn gets. Conversations whose first turn is one of
`train-drafter`'s held-out records or evaluation prompts (same --heldout-records, --eval-prompts
and --seed) are left out, so that later runs keep those unseen.
"""

import argparse
import json
from pathlib import Path

from caddtree.models.target import encode_prompt, load_target
from caddtree.train.data import is_prompt_turn, read_data_files, sharegpt_conversations, unseen_prompt_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", required=True, help="record files answering the first turns")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--heldout-records", type=int, default=136)
    parser.add_argument("--eval-prompts", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    target = load_target(None)
    files = read_data_files(args.data, target.model.get_output_embeddings().weight.shape[0])
    answers = {tuple(record.prompt_ids): record.response_ids for records in files for record in records}
    unseen = unseen_prompt_ids(target, files[0], args.heldout_records, args.eval_prompts, args.seed)
    lines = []
    for turns in sharegpt_conversations():
        if not _has_second_turn(turns):
            continue
        first_ids = tuple(encode_prompt(target, turns[0]["value"]).tolist())
        if first_ids in unseen or first_ids not in answers:
            continue
        answer = target.tokenizer.decode(answers[first_ids], skip_special_tokens=True)
        lines.append(json.dumps({"messages": [{"role": "user", "content": turns[0]["value"]},
                                              {"role": "assistant", "content": answer},
                                              {"role": "user", "content": turns[2]["value"]}]}))
    args.out.write_text("".join(line + "\n" for line in lines))
    print(f"wrote {len(lines)} conversations to {args.out}")


def _has_second_turn(turns: list[dict]) -> bool:
    return len(turns) >= 3 and turns[1].get("from") == "gpt" and is_prompt_turn(turns[0]) and is_prompt_turn(turns[2])


if __name__ == "__main__":
    main()
