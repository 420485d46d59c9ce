"""Training a DFlash drafter against a frozen target.

The target's embedding and head stay frozen (the drafter borrows them); only the drafter's own
weights learn. Its context features are computed once per run, before training starts. A run can
start from an earlier checkpoint (`init_from`), so training accumulates over several runs.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from caddtree.errors import CaddtreeError
from caddtree.models.drafter import DFlashDrafter, DraftHead
from caddtree.models.drafter_io import (config_to_dict, grown_drafter, load_drafter, random_drafter,
                                       resolve_mask_token, save_drafter)
from caddtree.models.target import Prompt, Target
from caddtree.train.data import Example
from caddtree.train.evaluation import decoding_tau, heldout_metrics
from caddtree.train.features import Teacher, cached_target_features, target_features
from caddtree.train.objective import distillation_loss, draft_vocab_loss, predict_blocks, sample_anchors
from caddtree.train.vocab import coverage, frequent_tokens


@dataclass
class TrainConfig:
    num_layers: int | None = None  # None: 1, or the checkpoint's own; more than it grows it
    feature_layers: list[int] | None = None  # target layers the drafter reads; None: DFlash's spread
    draft_vocab_size: int | None = None  # score only the K most frequent answer tokens; None: all
    block_size: int = 16
    steps: int = 1000
    max_minutes: float | None = None  # stop (and finish the schedule) by this wall time instead
    learning_rate: float = 6e-4
    warmup_steps: int = 50
    weight_decay: float = 0.01
    feature_dropout: float = 0.0  # share of the context features zeroed in training, against memorising
    grad_clip: float = 1.0
    sequences_per_step: int = 4
    anchors_per_sequence: int = 16
    gamma: float = 7.0
    eval_every: int = 200
    eval_tokens: int = 48
    heldout_records: int = 0  # records kept out of training for the held-out loss and block τ
    mask_token_id: int | None = None
    feature_batch_tokens: int | None = None  # per target forward for features; None: by device
    feature_dtype: str | None = None  # precision of the feature pass; None: the target's own
    feature_cache: str | None = None  # directory keeping the feature pass's result for later runs
    autocast: bool | None = None  # bfloat16 autocast for the drafter's passes; None: on CUDA only
    distill_top_k: int = 0  # > 0: learn the target's top-k distribution instead of its chosen token
    init_from: str | None = None  # continue from this checkpoint (it fixes the architecture)
    save_dtype: str = "float32"  # of the written checkpoint; training keeps float32 master weights
    seed: int = 0


def learning_rate_factor(step: int, warmup: int, progress: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 10% of the peak as `progress` goes 0 -> 1."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def initial_drafter(target: Target, examples: list[Example], config: TrainConfig) -> DFlashDrafter:
    """The checkpoint to continue from, or a new drafter with its draft vocabulary from `examples`."""
    if config.init_from:
        drafter = load_drafter(config.init_from, target)
        if config.mask_token_id is not None and config.mask_token_id != drafter.config.mask_token_id:
            raise CaddtreeError(f"--mask-token-id {config.mask_token_id} differs from the checkpoint's "
                                f"{drafter.config.mask_token_id} in {config.init_from}")
        layers = drafter.config.num_hidden_layers
        wanted = config.num_layers or layers
        if wanted < layers:
            raise CaddtreeError(f"--layers {wanted} is fewer than the {layers} of --init-from "
                                f"{config.init_from}: a drafter can grow, not shrink")
        return grown_drafter(drafter, wanted) if wanted > layers else drafter
    vocab_size = target.vocab_size
    vocab = frequent_tokens(examples, config.draft_vocab_size, vocab_size) if config.draft_vocab_size else None
    return random_drafter(target, config.num_layers or 1, config.block_size, config.seed, config.mask_token_id,
                          config.feature_layers, vocab)


class _Batches:
    """Random batches of training records with their features, teachers and anchors."""

    def __init__(self, examples, features, teachers, config: TrainConfig):
        self.examples, self.features, self.teachers, self.config = examples, features, teachers, config
        self.order = random.Random(config.seed)
        self.generator = torch.Generator().manual_seed(config.seed)

    def next(self):
        count = min(self.config.sequences_per_step, len(self.examples))
        chosen = self.order.sample(range(len(self.examples)), count)
        anchors = [sample_anchors(len(self.examples[i].prompt_ids), len(self.examples[i].token_ids),
                                  self.config.anchors_per_sequence, self.generator) for i in chosen]
        features = [self.features[i] for i in chosen]
        if self.config.feature_dropout:
            features = [F.dropout(f.float(), self.config.feature_dropout) for f in features]
        return chosen, [self.examples[i].token_ids for i in chosen], features, anchors

    def loss(self, predictions, head: DraftHead, chosen: list[int]) -> torch.Tensor:
        if not self.config.distill_top_k:
            return draft_vocab_loss(predictions, head)
        teacher_ids, teacher_log_probs = teacher_rows(
            predictions, [self.teachers[i] for i in chosen], [len(self.examples[i].prompt_ids) for i in chosen],
            self.config.anchors_per_sequence)
        return distillation_loss(predictions, head, teacher_ids, teacher_log_probs)


def teacher_rows(predictions, teachers: list[Teacher], prompt_lengths: list[int], num_blocks: int):
    """The teacher's (N, k) ids and log-probabilities at each predicted position of a batch."""
    sequence = predictions.block_ids // num_blocks  # (N,)
    row = predictions.positions - torch.tensor(prompt_lengths, device=sequence.device)[sequence]
    ids = torch.nn.utils.rnn.pad_sequence([t.token_ids for t in teachers], batch_first=True)
    log_probs = torch.nn.utils.rnn.pad_sequence([t.log_probs for t in teachers], batch_first=True)
    return ids[sequence.cpu(), row.cpu()].to(sequence.device), log_probs[sequence.cpu(), row.cpu()].to(sequence.device)


def train(target: Target, examples: list[Example], out_dir: Path, config: TrainConfig,
          eval_prompts: list[Prompt]) -> DFlashDrafter:
    """Train a drafter; writes checkpoints, `history.json` and `loss.png` under out_dir.

    The last `config.heldout_records` examples are not trained on: they measure held-out loss,
    per-offset accuracy and the chain's block τ and decoding τ at every evaluation.
    """
    torch.manual_seed(config.seed)
    target.model.requires_grad_(False)
    heldout = examples[len(examples) - config.heldout_records:] if config.heldout_records else []
    examples = examples[: len(examples) - len(heldout)]
    drafter = initial_drafter(target, examples, config)
    drafter.float().train()  # float32 master weights; bf16 compute through autocast
    mask_token = resolve_mask_token(drafter.config, target)
    drafter.config.mask_token_id = mask_token
    head, embed = DraftHead(drafter, target.model.get_output_embeddings()), target.model.get_input_embeddings()
    feature_dtype = getattr(torch, config.feature_dtype) if config.feature_dtype else None
    compute = partial(cached_target_features, config.feature_cache) if config.feature_cache else target_features
    features, teachers = compute(target, drafter.config.target_layer_ids, examples + heldout,
                                 config.feature_batch_tokens, feature_dtype, config.distill_top_k)
    features, heldout_features = features[: len(examples)], features[len(examples):]
    history = _new_history(config, drafter, target, examples, heldout)
    evaluate = _Evaluation(drafter, head, embed, target, heldout, heldout_features, eval_prompts, config, mask_token)
    optimizer = torch.optim.AdamW(drafter.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    batches = _Batches(examples, features, teachers, config)
    use_autocast = target.device.type == "cuda" if config.autocast is None else config.autocast
    autocast = torch.autocast(target.device.type, dtype=torch.bfloat16, enabled=use_autocast)
    start = time.perf_counter()
    budget = config.max_minutes * 60 if config.max_minutes else math.inf
    bar = tqdm(total=None if config.max_minutes else config.steps, desc="training drafter", unit="step")
    for step in range(config.steps):
        progress = max(step / config.steps, (time.perf_counter() - start) / budget)
        if progress >= 1:
            break
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate * learning_rate_factor(step, config.warmup_steps, progress)
        optimizer.zero_grad(set_to_none=True)
        chosen, sequences, step_features, anchors = batches.next()
        with autocast:
            predictions = predict_blocks(drafter, head, embed, sequences, step_features, anchors,
                                         config.anchors_per_sequence, mask_token, config.gamma)
            loss = batches.loss(predictions, head, chosen)
        bar.update()
        if not len(predictions.labels):  # no record of the batch had an answer token to predict
            continue
        loss.backward()
        torch.nn.utils.clip_grad_norm_(drafter.parameters(), config.grad_clip)
        optimizer.step()
        history["steps"].append(step)
        history["loss"].append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % config.eval_every == 0:
            bar.write(evaluate(history, step + 1))
            _checkpoint(drafter, out_dir, history, time.perf_counter() - start, config.save_dtype)
    bar.close()
    if history["steps"] and history["evaluations"][-1:] != [history["steps"][-1] + 1]:
        tqdm.write(evaluate(history, history["steps"][-1] + 1))
    drafter.eval()
    _checkpoint(drafter, out_dir, history, time.perf_counter() - start, config.save_dtype)
    return drafter


def _new_history(config: TrainConfig, drafter: DFlashDrafter, target: Target, examples, heldout) -> dict:
    history = {"config": asdict(config), "drafter_config": config_to_dict(drafter.config), "steps": [], "loss": [],
               "evaluations": [], "eval_wall_seconds": []}
    history["training_records"] = len(examples)
    history["training_answer_tokens"] = sum(len(e.response_ids) for e in examples)
    if drafter.draft_vocab is not None and heldout:
        vocab_size = target.vocab_size
        history["draft_vocab_heldout_coverage"] = coverage(drafter.draft_vocab.cpu(), heldout, vocab_size)
    return history


class _Evaluation:
    """Held-out metrics appended to the history, and a one-line summary of them."""

    def __init__(self, drafter, head, embed, target, heldout, heldout_features, prompts, config, mask_token):
        self.drafter, self.head, self.embed, self.target = drafter, head, embed, target
        self.heldout, self.heldout_features, self.prompts = heldout, heldout_features, prompts
        self.config, self.mask_token = config, mask_token
        self.start = time.perf_counter()

    def __call__(self, history: dict, step: int) -> str:
        self.drafter.eval()
        results = {}
        if self.heldout:
            results.update(heldout_metrics(
                self.drafter, self.head, self.embed, [e.token_ids for e in self.heldout],
                [len(e.prompt_ids) for e in self.heldout], self.heldout_features,
                self.config.anchors_per_sequence, self.mask_token, self.config.gamma,
            ))
        if self.prompts:
            results.update({f"tau_{name}": tau for name, tau in
                            decoding_tau(self.target, self.drafter, self.prompts, self.config.eval_tokens).items()})
        self.drafter.train()
        history["evaluations"].append(step)
        history["eval_wall_seconds"].append(time.perf_counter() - self.start)
        for name, value in results.items():
            history.setdefault(f"eval_{name}", []).append(value)
        shown = ", ".join(f"{name} {value:.3f}" for name, value in results.items() if not isinstance(value, list))
        return f"step {step}: training loss {history['loss'][-1]:.3f}" + (f", {shown}" if shown else "")


def _checkpoint(drafter: DFlashDrafter, out_dir: Path, history: dict, seconds: float, dtype: str) -> None:
    save_drafter(drafter, out_dir, getattr(torch, dtype))
    history["wall_seconds"] = seconds
    (out_dir / "history.json").write_text(json.dumps(history, indent=1) + "\n")
    plot_history(history, out_dir / "loss.png")


def plot_history(history: dict, path: Path) -> None:
    """Training loss, and every held-out measure of quality, against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, tau_axis) = plt.subplots(1, 2, figsize=(11, 4))
    distilled = history["config"].get("distill_top_k")
    training = f"training (against the target's top-{distilled})" if distilled else "training"
    loss_axis.plot(history["steps"], history["loss"], lw=0.5, alpha=0.6, color="tab:blue", label=training)
    if "eval_loss" in history:
        loss_axis.plot(history["evaluations"], history["eval_loss"], "o-", color="tab:orange",
                       label="held-out (against the chosen token)")
    loss_axis.set(xlabel="step", ylabel="decayed cross-entropy")
    loss_axis.legend()
    for name, label in (("eval_block_tau", "held-out blocks, chain (random anchors)"),
                        ("eval_chain_tau", "held-out answers, chain as decoded"),
                        ("eval_tau_dflash", "held-out prompts, dflash"),
                        ("eval_tau_ddtree16", "held-out prompts, ddtree 16")):
        if name in history:
            tau_axis.plot(history["evaluations"], history[name], "o-", label=label)
    tau_axis.set(xlabel="step", ylabel="τ (tokens per round)")
    if tau_axis.lines:
        tau_axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
