"""Training records from ShareGPT's own answers (ChatGPT's text, not the target's), for off-policy data.

    python scripts/sharegpt_reference_records.py --out chatgpt-answers.jsonl.gz --skip 100

The records pair each first user turn (through the default target's chat template, as
`train-drafter` encodes prompts) with the reply ShareGPT holds for it, cut at 256 tokens like
`../shared/data`'s answers (an answer that fits ends with `<|im_end|>`). Prompts come in the order
of `caddtree.train.data.sharegpt_prompts` (seed 0), so `--skip 100` leaves out the prompts that
`train-drafter --eval-prompts` takes. Making them costs no generation: only `train-drafter`'s
feature pass, which labels every position with the target's own distribution (`--distill`).
"""

import argparse
import gzip
import json

from tqdm import tqdm

from caddtree.models.target import encode_prompt, load_target
from caddtree.train.data import sharegpt_prompted_conversations

MAX_PROMPT_TOKENS, MAX_ANSWER_TOKENS, END_OF_TURN = 384, 256, 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="gzip JSONL of {prompt_ids, response_ids}")
    parser.add_argument("--skip", type=int, default=100, help="leave out the first SKIP prompts of the order")
    parser.add_argument("--limit", type=int, default=None, help="at most this many records")
    args = parser.parse_args()
    pairs = [(turns[0]["value"], turns[1]["value"] if len(turns) > 1 and turns[1].get("from") == "gpt" else "")
             for turns in sharegpt_prompted_conversations()]
    target = load_target(None)
    records = answer_tokens = 0
    with gzip.open(args.out, "wt") as out:
        for prompt, answer in tqdm(pairs[args.skip:], desc="records", unit="prompt"):
            if len(answer) < 16:
                continue
            prompt_ids = encode_prompt(target, prompt).tolist()
            if len(prompt_ids) > MAX_PROMPT_TOKENS:
                continue
            answer_ids = target.tokenizer(answer, add_special_tokens=False)["input_ids"]
            answer_ids = answer_ids[:MAX_ANSWER_TOKENS] if len(answer_ids) >= MAX_ANSWER_TOKENS else answer_ids + [END_OF_TURN]
            out.write(json.dumps({"prompt_ids": prompt_ids, "response_ids": answer_ids}) + "\n")
            records, answer_tokens = records + 1, answer_tokens + len(answer_ids)
            if records == args.limit:
                break
    print(f"wrote {records} records, {answer_tokens} answer tokens to {args.out}")


if __name__ == "__main__":
    main()
