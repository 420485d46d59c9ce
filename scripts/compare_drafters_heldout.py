"""Loss, block τ and chain τ of drafters on the held-out records that no run trained on.

    python scripts/compare_drafters_heldout.py caddtree/assets/drafter runs/cpu7

The held-out records are `train-drafter --heldout-records 136 --eval-prompts 6`'s over the four
data files (the first file's last 136 after the shuffle), less those whose prompt another record
shares (121): the set TRAINING.md compares drafters on. Features are computed afresh (bfloat16),
once per set of target layers the drafters read; the drafters are evaluated one after the other
in this process. `--seen N` measures instead the first N records of the first file that every run
trained on: the gap between the two says how much a drafter fits its training data beyond what
it generalises.
"""

import argparse
import collections
import json

import torch

from caddtree.models.drafter import DraftHead
from caddtree.models.drafter_io import load_drafter
from caddtree.models.target import load_target
from caddtree.train.data import held_out_records, read_data_files, unseen_prompt_ids
from caddtree.train.evaluation import heldout_metrics
from caddtree.train.features import target_features

FILES = ["../shared/data/smollm2-sharegpt-greedy.jsonl.gz", "data/smollm2-sharegpt-greedy-2.jsonl.gz",
         "data/smollm2-sharegpt-greedy-3.jsonl.gz", "data/smollm2-sharegpt-greedy-4.jsonl.gz"]
HELDOUT_RECORDS, EVAL_PROMPTS = 136, 6  # the train-drafter flags every run compared here used


def unique_heldout(target):
    """The held-out records (they come from the first file alone) whose prompt no record of the four shares."""
    files = read_data_files(FILES, target.vocab_size)
    heldout = held_out_records(target, files[0], HELDOUT_RECORDS, EVAL_PROMPTS)
    count = collections.Counter(tuple(r.prompt_ids) for records in files for r in records)
    return [e for e in heldout if count[tuple(e.prompt_ids)] == 1]


def seen_records(target, count):
    """The first `count` records of the first file whose prompt no held-out or evaluation record has."""
    first = read_data_files(FILES[:1], target.vocab_size)[0]
    unseen = unseen_prompt_ids(target, first, HELDOUT_RECORDS, EVAL_PROMPTS)
    return [record for record in first if tuple(record.prompt_ids) not in unseen][:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("drafters", nargs="+", help="drafter directories")
    parser.add_argument("--seen", type=int, metavar="N", help="N records every run trained on instead")
    args = parser.parse_args()
    if args.seen is not None and args.seen < 1:
        parser.error("--seen takes a number of records, 1 or more")
    target = load_target(None, "cpu")
    records = seen_records(target, args.seen) if args.seen else unique_heldout(target)
    features = {}  # per set of target layers the drafters read
    results = {}
    for spec in args.drafters:
        drafter = load_drafter(spec, target).float().eval()
        layers = tuple(drafter.config.target_layer_ids)
        if layers not in features:
            features[layers] = target_features(target, list(layers), records, None, torch.bfloat16, 0)[0]
        head, embed = DraftHead(drafter, target.model.get_output_embeddings()), target.model.get_input_embeddings()
        measures = heldout_metrics(drafter, head, embed, [e.token_ids for e in records],
                                   [len(e.prompt_ids) for e in records], features[layers], 16,
                                   drafter.config.mask_token_id, 4.0)
        results[spec] = {name: round(measures[name], 4) for name in ("loss", "block_tau", "chain_tau")}
        print(f"{spec}: {len(records)} records, {results[spec]}", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
