"""The target's features of every training token, computed once per run before training starts.

They are the expensive part of the data (a full target forward per token), so one pass computes
them for all sequences and keeps them in bfloat16. On a CPU with bfloat16 arithmetic that pass
runs about 1.7x faster with the target itself in bfloat16 (`dtype`); decoding still feeds the
drafter features of the target in its own precision.

For distillation the same pass keeps the target's own top-k next-token distribution before every
answer token (the "teacher"): a far richer signal per position than the one token it chose.

On a CPU the pass takes most of an hour per million tokens, so a run may keep its result on disk
(`cached_target_features`): the next run on the same records reads it back in about a minute.
"""

from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from caddtree.errors import CaddtreeError
from caddtree.models.target import Target, TargetRunner
from caddtree.train.data import Example

CACHE_FORMAT = 1  # raise when what the pass computes changes: older cache files are then not read


class Teacher(NamedTuple):
    """The target's top-k next-token distribution before each of an example's R answer tokens."""

    token_ids: torch.Tensor  # (R, k) int32, most likely first
    log_probs: torch.Tensor  # (R, k) float16, log-probabilities under the full vocabulary


@torch.inference_mode()
def target_features(target: Target, layer_ids: list[int], examples: list[Example], batch_tokens: int | None = None,
                    dtype: torch.dtype | None = None, teacher_top_k: int = 0):
    """Per example, the target's features (T, F) at every token, in bfloat16 on the target's
    device, and its Teacher when `teacher_top_k` > 0 (else None). Sequences of similar length
    share a forward of about `batch_tokens` padded tokens (default 16384 on a GPU; 4096 on a
    CPU). `dtype` runs the pass in that precision. Returns (features, teachers)."""
    batch_tokens = batch_tokens or (16384 if target.device.type == "cuda" else 4096)
    if dtype is not None and dtype != target.dtype:
        target = Target(copy.deepcopy(target.model).to(dtype), target.tokenizer, target.name)
    runner = TargetRunner(target, layer_ids)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].token_ids))
    features: list[torch.Tensor | None] = [None] * len(examples)
    teachers: list[Teacher | None] = [None] * len(examples)
    try:
        with tqdm(total=sum(len(e.token_ids) for e in examples), desc="target features", unit="tok",
                  unit_scale=True) as bar:
            while order:
                count = 1
                while count < len(order) and (count + 1) * len(examples[order[count]].token_ids) <= batch_tokens:
                    count += 1
                chosen, order = order[:count], order[count:]
                sequences = [examples[i].token_ids for i in chosen]
                batch_features, batch_logits = (runner.features_of(sequences, with_logits=True) if teacher_top_k
                                                else (runner.features_of(sequences), None))
                for n, i in enumerate(chosen):
                    features[i] = batch_features[n].to(torch.bfloat16, copy=True)
                    if teacher_top_k:
                        teachers[i] = _teacher(batch_logits[n], len(examples[i].prompt_ids), teacher_top_k)
                bar.update(sum(len(examples[i].token_ids) for i in chosen))
    finally:
        runner.close()
    return features, teachers


def _teacher(logits: torch.Tensor, prompt_len: int, k: int) -> Teacher:
    """From logits (T, V) of one sequence: the distribution before each answer token."""
    before_answers = logits[prompt_len - 1 : -1].float()  # (R, V): position t-1 predicts token t
    top = torch.topk(torch.log_softmax(before_answers, dim=-1), k, dim=-1)
    return Teacher(top.indices.to(torch.int32), top.values.to(torch.float16))


def cached_target_features(cache_dir: str | Path, target: Target, layer_ids: list[int], examples: list[Example],
                           batch_tokens: int | None = None, dtype: torch.dtype | None = None, teacher_top_k: int = 0):
    """target_features, read from `cache_dir` when a run before computed them for the same target,
    layers, precision, teacher and records (in the same order); else computed and written there."""
    path = Path(cache_dir) / f"features-{_fingerprint(target, layer_ids, examples, dtype, teacher_top_k)}.safetensors"
    if path.is_file():
        tqdm.write(f"reading the target's features from {path}")
        return _read(path, len(examples), teacher_top_k, target.device)
    features, teachers = target_features(target, layer_ids, examples, batch_tokens, dtype, teacher_top_k)
    _write(path, features, teachers)
    return features, teachers


def _fingerprint(target: Target, layer_ids, examples, dtype, teacher_top_k) -> str:
    digest = hashlib.sha256(repr((CACHE_FORMAT, target.name, layer_ids, str(dtype), teacher_top_k)).encode())
    # The weights by a checksum of every parameter: a retrained or other target under the same name differs.
    checksum = sum(parameter.sum(dtype=torch.float64).item() for parameter in target.model.parameters())
    digest.update(repr(checksum).encode())
    for example in examples:
        digest.update(example.token_ids.to(torch.int32).numpy().tobytes() + b"|%d|" % len(example.prompt_ids))
    return digest.hexdigest()[:20]


def _write(path: Path, features: list[torch.Tensor], teachers: list[Teacher | None]) -> None:
    tensors = {f"features.{i}": feature.cpu() for i, feature in enumerate(features)}
    for i, teacher in enumerate(teachers):
        if teacher is not None:
            tensors[f"teacher_ids.{i}"], tensors[f"teacher_log_probs.{i}"] = teacher.token_ids.cpu(), teacher.log_probs.cpu()
    partial = path.with_suffix(".partial")  # renamed when whole: a stopped run leaves no half file to read
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(partial))
        os.replace(partial, path)
    except OSError as error:  # a full disk must not cost the run its features: train on without the cache
        partial.unlink(missing_ok=True)
        tqdm.write(f"could not write the feature cache {path} ({error}); training goes on without it")


def _read(path: Path, count: int, teacher_top_k: int, device: torch.device):
    try:
        tensors = load_file(str(path), device=str(device))
        features = [tensors[f"features.{i}"] for i in range(count)]
        teachers = [Teacher(tensors[f"teacher_ids.{i}"], tensors[f"teacher_log_probs.{i}"]) if teacher_top_k else None
                    for i in range(count)]
    except (SafetensorError, KeyError, OSError) as error:
        raise CaddtreeError(f"the feature cache {path} is damaged ({error}); delete it to recompute") from None
    return features, teachers
