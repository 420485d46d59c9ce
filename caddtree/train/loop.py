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
from caddtree.train.objective import IGNORE, decayed_cross_entropy, pack_blocks, sample_anchors


@dataclass
class TrainConfig:
    num_layers: int = 1
    block_size: int = 16
    steps: int = 1000
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
    seed: int = 0


def learning_rate_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.inference_mode()
def target_features(target: Target, layer_ids: list[int], examples: list[Example]) -> list[torch.Tensor]:
    """Per example, the target's features (T, F) at every token, kept in half precision."""
    runner = TargetRunner(target, layer_ids)
    try:
        return [runner.prefill(e.token_ids.to(target.device))[1].half().cpu()
                for e in tqdm(examples, desc="target features", unit="seq")]
    finally:
        runner.close()


def sequence_loss(drafter: DFlashDrafter, target: Target, example: Example, features: torch.Tensor,
                  config: TrainConfig, mask_token: int, generator: torch.Generator) -> torch.Tensor | None:
    tokens = example.token_ids
    anchors = sample_anchors(len(example.prompt_ids), len(tokens), config.anchors_per_sequence, generator)
    if len(anchors) == 0:
        return None
    blocks = pack_blocks(tokens, anchors, config.block_size, mask_token, config.gamma)
    device = target.device
    context_kv = drafter.context_keys_values(features.to(device, torch.float32), torch.arange(len(tokens), device=device))
    embeds = target.model.get_input_embeddings()(blocks.input_ids.to(device))
    hidden = drafter.block_hidden(embeds, blocks.positions.to(device), context_kv, blocks.attention_mask.to(device))
    predicted = blocks.labels != IGNORE  # the head only runs where there is something to predict
    logits = target.model.get_output_embeddings()(hidden[predicted.to(device)])
    return decayed_cross_entropy(logits, blocks.labels[predicted].to(device), blocks.loss_weights[predicted].to(device))


def mean_acceptance(target: Target, drafter: DFlashDrafter, prompts: list[str], new_tokens: int) -> float:
    """τ of the DFlash chain on held-out prompts (the drafter's own quality, no tree)."""
    engine = Engine(target, drafter)
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
    features = target_features(target, drafter.config.target_layer_ids, examples)
    optimizer = torch.optim.AdamW(drafter.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, config.warmup_steps, config.steps))
    generator = torch.Generator().manual_seed(config.seed)
    order = random.Random(config.seed)
    history = {"config": asdict(config), "steps": [], "loss": [], "eval_steps": [], "eval_tau": []}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=target.device.type == "cuda")
    start = time.perf_counter()
    bar = tqdm(range(config.steps), desc="training drafter", unit="step")
    for step in bar:
        optimizer.zero_grad(set_to_none=True)
        chosen = order.sample(range(len(examples)), min(config.sequences_per_step, len(examples)))
        with autocast:
            losses = [sequence_loss(drafter, target, examples[i], features[i], config, mask_token, generator) for i in chosen]
            losses = [loss for loss in losses if loss is not None]
            if not losses:
                continue
            loss = torch.stack(losses).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(drafter.parameters(), config.grad_clip)
        optimizer.step()
        schedule.step()
        history["steps"].append(step)
        history["loss"].append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if eval_prompts and ((step + 1) % config.eval_every == 0 or step + 1 == config.steps):
            drafter.eval()
            tau = mean_acceptance(target, drafter, eval_prompts, config.eval_tokens)
            drafter.train()
            history["eval_steps"].append(step + 1)
            history["eval_tau"].append(tau)
            bar.write(f"step {step + 1}: loss {loss.item():.3f}, held-out dflash tau {tau:.2f}")
            _checkpoint(drafter, out_dir, history, time.perf_counter() - start)
    drafter.eval()
    _checkpoint(drafter, out_dir, history, time.perf_counter() - start)
    return drafter


def _checkpoint(drafter: DFlashDrafter, out_dir: Path, history: dict, seconds: float) -> None:
    save_drafter(drafter, out_dir)
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
