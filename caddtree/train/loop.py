"""Training a DFlash drafter against a frozen target.

The target's embedding and head stay frozen (the drafter borrows them); only the drafter's own
weights learn. Its context features are computed once per sequence, before training starts.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from caddtree.decode.engine import Engine
from caddtree.decode.policy import make_policy
from caddtree.models.drafter import DFlashDrafter
from caddtree.models.drafter_io import random_drafter, resolve_mask_token, save_drafter
from caddtree.models.target import Target, TargetRunner, encode_prompt
from caddtree.train.data import Example
from caddtree.train.objective import IGNORE, decayed_cross_entropy, pack_blocks, sample_anchors, stack_blocks


@dataclass
class TrainConfig:
    num_layers: int = 1
    block_size: int = 16
    steps: int = 1000
    max_minutes: float | None = None  # stop (and finish the schedule) by this wall time instead
    learning_rate: float = 6e-4
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    sequences_per_step: int = 4
    anchors_per_sequence: int = 16
    gamma: float = 7.0
    eval_every: int = 200
    eval_tokens: int = 48
    mask_token_id: int | None = None
    feature_batch_tokens: int | None = None  # per target forward for features; None: by device
    save_dtype: str = "float32"  # of the written checkpoint; training keeps float32 master weights
    seed: int = 0


def learning_rate_factor(step: int, warmup: int, progress: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 10% of the peak as `progress` goes 0 -> 1."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.inference_mode()
def target_features(target: Target, layer_ids: list[int], examples: list[Example],
                    batch_tokens: int | None = None) -> list[torch.Tensor]:
    """Per example, the target's features (T, F) at every token, in bfloat16 on the target's
    device. Sequences of similar length share a forward of about `batch_tokens` padded tokens
    (default 16384 on a GPU; 2048 on a CPU, where bigger batches measured slower)."""
    batch_tokens = batch_tokens or (16384 if target.device.type == "cuda" else 2048)
    runner = TargetRunner(target, layer_ids)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].token_ids))
    features: list[torch.Tensor | None] = [None] * len(examples)
    try:
        with tqdm(total=len(examples), desc="target features", unit="seq") as bar:
            while order:
                count = 1
                while count < len(order) and (count + 1) * len(examples[order[count]].token_ids) <= batch_tokens:
                    count += 1
                chosen, order = order[:count], order[count:]
                for i, f in zip(chosen, runner.features_of([examples[i].token_ids for i in chosen])):
                    features[i] = f.to(torch.bfloat16, copy=True)
                bar.update(count)
    finally:
        runner.close()
    return features


def batch_loss(drafter: DFlashDrafter, target: Target, examples: list[Example], features: list[torch.Tensor],
               config: TrainConfig, mask_token: int, generator: torch.Generator) -> torch.Tensor | None:
    """Decayed cross-entropy of all anchored blocks of a batch of sequences, in one drafter pass."""
    anchors = [sample_anchors(len(e.prompt_ids), len(e.token_ids), config.anchors_per_sequence, generator)
               for e in examples]
    if not any(len(a) for a in anchors):
        return None
    width = max(len(e.token_ids) for e in examples)
    blocks = stack_blocks([
        pack_blocks(e.token_ids, a, config.block_size, mask_token, config.gamma, width, config.anchors_per_sequence)
        for e, a in zip(examples, anchors)
    ])
    device = target.device
    context = torch.nn.utils.rnn.pad_sequence(features, batch_first=True).to(device, torch.float32)
    context_kv = drafter.context_keys_values(context, torch.arange(width, device=device))
    embeds = target.model.get_input_embeddings()(blocks.input_ids.to(device))
    mask = blocks.attention_mask.to(device)[:, None]  # (S, 1, A*b, T + A*b): one mask for all heads
    hidden = drafter.block_hidden(embeds, blocks.positions.to(device), context_kv, mask)
    predicted = blocks.labels != IGNORE  # the head only runs where there is something to predict
    logits = target.model.get_output_embeddings()(hidden[predicted.to(device)])
    return decayed_cross_entropy(logits, blocks.labels[predicted].to(device), blocks.loss_weights[predicted].to(device))


def mean_acceptance(target: Target, drafter: DFlashDrafter, prompts: list[str], new_tokens: int) -> float:
    """τ of the DFlash chain on held-out prompts (the drafter's own quality, no tree)."""
    engine = Engine(target, drafter, static_shapes=False)  # tau needs no speed; nothing to capture
    try:
        taus = [engine.generate(encode_prompt(target, p), make_policy("dflash"), new_tokens).tau for p in prompts]
    finally:
        engine.verifier.close()
    return statistics.fmean(taus)


def train(target: Target, examples: list[Example], out_dir: Path, config: TrainConfig,
          eval_prompts: list[str]) -> DFlashDrafter:
    """Train a drafter; writes checkpoints, `history.json` and `loss.png` under out_dir."""
    torch.manual_seed(config.seed)
    target.model.requires_grad_(False)
    drafter = random_drafter(target, config.num_layers, config.block_size, config.seed, config.mask_token_id)
    drafter.float().train()  # float32 master weights; bf16 compute through autocast on CUDA
    mask_token = resolve_mask_token(drafter.config, target)
    drafter.config.mask_token_id = mask_token
    features = target_features(target, drafter.config.target_layer_ids, examples, config.feature_batch_tokens)
    optimizer = torch.optim.AdamW(drafter.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    order = random.Random(config.seed)
    history = {"config": asdict(config), "steps": [], "loss": [], "eval_steps": [], "eval_tau": []}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=target.device.type == "cuda")
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
        chosen = order.sample(range(len(examples)), min(config.sequences_per_step, len(examples)))
        with autocast:
            loss = batch_loss(drafter, target, [examples[i] for i in chosen], [features[i] for i in chosen],
                              config, mask_token, generator)
        bar.update()
        if loss is None:
            continue
        loss.backward()
        torch.nn.utils.clip_grad_norm_(drafter.parameters(), config.grad_clip)
        optimizer.step()
        history["steps"].append(step)
        history["loss"].append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if eval_prompts and (step + 1) % config.eval_every == 0:
            _evaluate(drafter, target, eval_prompts, config, history, step + 1)
            bar.write(f"step {step + 1}: loss {loss.item():.3f}, held-out dflash tau {history['eval_tau'][-1]:.2f}")
            _checkpoint(drafter, out_dir, history, time.perf_counter() - start, config.save_dtype)
    bar.close()
    if eval_prompts and history["steps"] and history["eval_steps"][-1:] != [history["steps"][-1] + 1]:
        _evaluate(drafter, target, eval_prompts, config, history, history["steps"][-1] + 1)
    drafter.eval()
    _checkpoint(drafter, out_dir, history, time.perf_counter() - start, config.save_dtype)
    return drafter


def _evaluate(drafter, target, prompts, config, history, step) -> None:
    drafter.eval()
    history["eval_steps"].append(step)
    history["eval_tau"].append(mean_acceptance(target, drafter, prompts, config.eval_tokens))
    drafter.train()


def _checkpoint(drafter: DFlashDrafter, out_dir: Path, history: dict, seconds: float, dtype: str) -> None:
    save_drafter(drafter, out_dir, getattr(torch, dtype))
    history["wall_seconds"] = seconds
    (out_dir / "history.json").write_text(json.dumps(history, indent=1) + "\n")
    plot_history(history, out_dir / "loss.png")


def plot_history(history: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, loss_axis = plt.subplots(figsize=(7, 4))
    loss_axis.plot(history["steps"], history["loss"], lw=0.8, color="tab:blue")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("decayed cross-entropy", color="tab:blue")
    if history["eval_steps"]:
        tau_axis = loss_axis.twinx()
        tau_axis.plot(history["eval_steps"], history["eval_tau"], "o-", color="tab:red")
        tau_axis.set_ylabel("held-out dflash τ", color="tab:red")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
