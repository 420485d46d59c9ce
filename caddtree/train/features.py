"""The target's features of every training token, computed once per run before training starts.

They are the expensive part of the data (a full target forward per token), so one pass computes
them for all sequences and keeps them in bfloat16. On a CPU with bfloat16 arithmetic that pass
runs about 3x faster with the target itself in bfloat16 (`dtype`; 1.6k vs 0.55k tokens/s with
teachers on the 2-core CPU); decoding still feeds the drafter features of the target in its own
precision.

For distillation the same pass keeps the target's own top-k next-token distribution before every
answer token (the "teacher"): a far richer signal per position than the one token it chose.

On a CPU the pass takes most of an hour per million tokens, so a run may keep its result on disk
(`cached_target_features`), record by record and as it goes: a later run reads back every record
it has seen and computes only the new ones, and features larger than memory are read mapped.
"""

from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from caddtree.errors import CaddtreeError
from caddtree.models.target import Target, TargetRunner
from caddtree.train.data import Example

CACHE_FORMAT = 2  # raise when what the pass computes changes: older cache files are then not read
CACHE_FILE_TOKENS = 1 << 19  # tokens of records per cache file: ~1.8 GB of features with a 1-layer drafter's 3 layers


class Teacher(NamedTuple):
    """The target's top-k next-token distribution before each of an example's R answer tokens."""

    token_ids: torch.Tensor  # (R, k) int32, most likely first
    log_probs: torch.Tensor  # (R, k) float16, log-probabilities under the full vocabulary


def target_features(target: Target, layer_ids: list[int], examples: list[Example], batch_tokens: int | None = None,
                    dtype: torch.dtype | None = None, teacher_top_k: int = 0):
    """Per example, the target's features (T, F) at every token, in bfloat16 on the target's
    device, and its Teacher when `teacher_top_k` > 0 (else None). Sequences of similar length
    share a forward of about `batch_tokens` padded tokens (default 16384 on a GPU; 4096 on a
    CPU). `dtype` runs the pass in that precision. Returns (features, teachers)."""
    features: list[torch.Tensor | None] = [None] * len(examples)
    teachers: list[Teacher | None] = [None] * len(examples)
    for i, example_features, teacher in feature_stream(target, layer_ids, examples, batch_tokens, dtype, teacher_top_k):
        features[i], teachers[i] = example_features, teacher
    return features, teachers


def feature_stream(target: Target, layer_ids: list[int], examples: list[Example], batch_tokens: int | None = None,
                   dtype: torch.dtype | None = None, teacher_top_k: int = 0):
    """target_features one example at a time as (index, features, teacher), shortest first."""
    batch_tokens = batch_tokens or (16384 if target.device.type == "cuda" else 4096)
    if dtype is not None and dtype != target.dtype:
        target = Target(copy.deepcopy(target.model).to(dtype), target.tokenizer, target.name)
    runner = TargetRunner(target, layer_ids)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].token_ids))
    try:
        with tqdm(total=sum(len(e.token_ids) for e in examples), desc="target features", unit="tok",
                  unit_scale=True) as bar:
            while order:
                count = 1
                while count < len(order) and (count + 1) * len(examples[order[count]].token_ids) <= batch_tokens:
                    count += 1
                chosen, order = order[:count], order[count:]
                with torch.inference_mode():  # left before yielding: the caller's code runs outside it
                    done = _batch_features(runner, [examples[i] for i in chosen], teacher_top_k)
                bar.update(sum(len(examples[i].token_ids) for i in chosen))
                yield from zip(chosen, *done)
    finally:
        runner.close()


def _batch_features(runner: TargetRunner, examples: list[Example], teacher_top_k: int):
    """(features, teachers) of a batch of examples in one target forward."""
    sequences = [example.token_ids for example in examples]
    if not teacher_top_k:
        return [f.to(torch.bfloat16, copy=True) for f in runner.features_of(sequences)], [None] * len(examples)
    answer_rows = [range(len(e.prompt_ids) - 1, len(e.token_ids) - 1) for e in examples]  # row t-1 predicts token t
    batch_features, batch_logits = runner.features_of(sequences, logit_rows=answer_rows)
    return [f.to(torch.bfloat16, copy=True) for f in batch_features], [_teacher(l, teacher_top_k) for l in batch_logits]


def _teacher(before_answers: torch.Tensor, k: int) -> Teacher:
    """From the logits (R, V) before each answer token: their top-k log-probabilities."""
    top = torch.topk(torch.log_softmax(before_answers.float(), dim=-1), k, dim=-1)
    return Teacher(top.indices.to(torch.int32), top.values.to(torch.float16))


def cached_target_features(cache_dir: str | Path, target: Target, layer_ids: list[int], examples: list[Example],
                           batch_tokens: int | None = None, dtype: torch.dtype | None = None, teacher_top_k: int = 0):
    """target_features, each record's read from `cache_dir` when an earlier run computed it for the
    same target, layers, precision and teacher. The records computed now go there as the pass goes,
    about CACHE_FILE_TOKENS tokens to a file, and are read back memory-mapped: the pass holds only
    one file's worth in memory, a stopped pass loses at most that much, and features larger than
    the machine's memory are paged in as training reads them."""
    cache_dir = Path(cache_dir)
    settings = _settings_key(target, layer_ids, dtype, teacher_top_k)
    record_keys = [_record_key(example) for example in examples]
    found = _read_cached(cache_dir, settings, set(record_keys), teacher_top_k, target.device)
    missing = {key: example for key, example in zip(record_keys, examples) if key not in found}
    if found:
        tqdm.write(f"read the target's features of {len(found)} records from {cache_dir}")
    if missing:
        keys, pending, pending_tokens, written = list(missing), {}, 0, set()
        stream = feature_stream(target, layer_ids, list(missing.values()), batch_tokens, dtype, teacher_top_k)
        for n, (i, features, teacher) in enumerate(stream, 1):
            pending[keys[i]], pending_tokens = (features, teacher), pending_tokens + len(features)
            if n == len(keys) or pending_tokens >= CACHE_FILE_TOKENS:
                if _write(cache_dir, settings, pending):
                    written.update(pending)
                else:  # no room on disk: keep them in memory
                    found.update(pending)
                pending, pending_tokens = {}, 0
        found.update(_read_cached(cache_dir, settings, written, teacher_top_k, target.device))
    return [found[key][0] for key in record_keys], [found[key][1] for key in record_keys]


def _settings_key(target: Target, layer_ids, dtype, teacher_top_k) -> str:
    digest = hashlib.sha256(repr((CACHE_FORMAT, target.name, layer_ids, str(dtype), teacher_top_k)).encode())
    # The weights by a checksum of every parameter: a retrained or other target under the same name differs.
    checksum = sum(parameter.sum(dtype=torch.float64).item() for parameter in target.model.parameters())
    digest.update(repr(checksum).encode())
    return digest.hexdigest()[:20]


def _record_key(example: Example) -> str:
    tokens = example.token_ids.to(torch.int32).numpy().tobytes()
    return hashlib.sha256(tokens + b"|%d" % len(example.prompt_ids)).hexdigest()[:24]


def _write(cache_dir: Path, settings: str, records: dict[str, tuple[torch.Tensor, Teacher | None]]) -> bool:
    """Write `records` to a cache file of their own; False when the disk refused them."""
    path = cache_dir / f"features-{settings}-{hashlib.sha256(''.join(sorted(records)).encode()).hexdigest()[:12]}.safetensors"
    tensors = {}
    for key, (features, teacher) in records.items():
        tensors[f"features.{key}"] = features.cpu()
        if teacher is not None:
            tensors[f"teacher_ids.{key}"], tensors[f"teacher_log_probs.{key}"] = teacher.token_ids.cpu(), teacher.log_probs.cpu()
    partial = path.with_suffix(".partial")  # renamed when whole: a stopped run leaves no half file to read
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(partial))
        os.replace(partial, path)
        return True
    except OSError as error:  # a full disk must not cost the run its features: train on without the cache
        partial.unlink(missing_ok=True)
        tqdm.write(f"could not write the feature cache {path} ({error}); training goes on without it")
        return False


def _read_cached(cache_dir: Path, settings: str, wanted: set[str], teacher_top_k: int, device: torch.device):
    """{record key: (features, teacher)} for the `wanted` records that files of `settings` hold."""
    found = {}
    for path in sorted(cache_dir.glob(f"features-{settings}-*.safetensors")):
        try:
            with safe_open(str(path), "pt", device=str(device)) as cached:
                held = {name.split(".", 1)[1] for name in cached.keys() if name.startswith("features.")}
                for key in (held & wanted) - found.keys():
                    teacher = (Teacher(cached.get_tensor(f"teacher_ids.{key}"), cached.get_tensor(f"teacher_log_probs.{key}"))
                               if teacher_top_k else None)
                    found[key] = (cached.get_tensor(f"features.{key}"), teacher)
        except (SafetensorError, OSError) as error:
            raise CaddtreeError(f"the feature cache {path} is damaged ({error}); delete it to recompute") from None
    return found
