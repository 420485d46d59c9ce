"""Reading and writing DFlash drafter checkpoints in the published layout.

A checkpoint is a directory with `config.json` (Qwen3 attention fields, `block_size`,
`num_target_layers`, `dflash_config.{target_layer_ids, mask_token_id}`) and safetensors weights
with unprefixed keys (`fc.weight`, `layers.0.self_attn.q_proj.weight`, ...). It holds no embedding
or head: the target's are used. Every problem with a checkpoint is reported as a CaddtreeError.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from caddtree.errors import CaddtreeError
from caddtree.models.drafter import DFlashDrafter, DrafterConfig, default_target_layer_ids
from caddtree.models.target import Target

WEIGHTS_FILE = "model.safetensors"
_OWN_FIELDS = {
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "num_target_layers", "block_size", "rms_norm_eps",
    "rope_theta", "vocab_size", "dflash_config",
}


def config_from_dict(raw: dict, source: str) -> DrafterConfig:
    """Parse a published DFlash config.json; `source` names the file in error messages."""
    required = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
    missing = [name for name in required if name not in raw]
    if missing:
        raise CaddtreeError(f"drafter config {source} lacks {', '.join(missing)}")
    dflash = raw.get("dflash_config") or {}
    num_layers = raw["num_hidden_layers"]
    num_target_layers = raw.get("num_target_layers")
    layer_ids = dflash.get("target_layer_ids")
    if layer_ids is None:
        if num_target_layers is None:
            raise CaddtreeError(f"drafter config {source} gives neither target_layer_ids nor num_target_layers")
        layer_ids = default_target_layer_ids(num_layers, num_target_layers)
    rope_theta = raw.get("rope_theta") or (raw.get("rope_parameters") or {}).get("rope_theta") or 1_000_000.0
    return DrafterConfig(
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_hidden_layers=num_layers,
        num_attention_heads=raw["num_attention_heads"],
        num_key_value_heads=raw.get("num_key_value_heads", raw["num_attention_heads"]),
        head_dim=raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"],
        target_layer_ids=list(layer_ids),
        num_target_layers=num_target_layers if num_target_layers is not None else max(layer_ids) + 1,
        block_size=raw.get("block_size", 16),
        mask_token_id=dflash.get("mask_token_id"),
        draft_vocab_size=_draft_vocab_size(dflash.get("draft_vocab_size"), source),
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
        vocab_size=raw.get("vocab_size"),
        extra={key: value for key, value in raw.items() if key not in _OWN_FIELDS},
    )


def _draft_vocab_size(value, source: str) -> int | None:
    if value is not None and (type(value) is not int or value < 1):
        raise CaddtreeError(f"drafter config {source}: dflash_config.draft_vocab_size must be a whole number >= 1")
    return value


def config_to_dict(config: DrafterConfig) -> dict:
    raw = {"architectures": ["DFlashDraftModel"], "model_type": "qwen3", **config.extra}
    raw.update(
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        num_target_layers=config.num_target_layers,
        block_size=config.block_size,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta,
        vocab_size=config.vocab_size,
        dflash_config={"target_layer_ids": config.target_layer_ids, "mask_token_id": config.mask_token_id},
    )
    if config.draft_vocab_size is not None:
        raw["dflash_config"]["draft_vocab_size"] = config.draft_vocab_size
    return raw


def save_drafter(drafter: DFlashDrafter, directory: str | Path, dtype: torch.dtype | None = None) -> None:
    """Write config.json and the weights (floating ones in `dtype`, default: as they are) in the
    published layout; the draft vocabulary, if any, is the integer tensor `draft_vocab`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config_to_dict(drafter.config), indent=2) + "\n")
    weights = {name: tensor.detach().to(dtype if dtype and tensor.is_floating_point() else tensor.dtype)
               .contiguous().cpu() for name, tensor in drafter.state_dict().items()}
    save_file(weights, str(directory / WEIGHTS_FILE))


def _local_checkpoint(spec: str) -> Path:
    """A local checkpoint directory, downloading a hub id when it is not a local path."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise CaddtreeError(f"drafter checkpoint directory not found: {spec}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(spec, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as error:  # the hub client raises many types; all mean "not available"
        raise CaddtreeError(f"could not fetch drafter {spec!r} from the hub: {error}") from error


def read_config(directory: Path) -> DrafterConfig:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CaddtreeError(f"drafter checkpoint {directory} has no config.json")
    try:
        raw = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CaddtreeError(f"drafter config {config_path} is not valid JSON ({error})") from error
    if not isinstance(raw, dict):
        raise CaddtreeError(f"drafter config {config_path} is not a JSON object")
    return config_from_dict(raw, str(config_path))


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    # Hugging Face's weight names first: a training run's --out may also hold a feature cache.
    files = sorted(directory.glob("model*.safetensors")) or sorted(directory.glob("*.safetensors"))
    if not files:
        raise CaddtreeError(f"drafter checkpoint {directory} has no .safetensors weights")
    weights = {}
    for file in files:
        try:
            weights.update(load_file(str(file)))
        except (SafetensorError, OSError, ValueError) as error:
            raise CaddtreeError(f"drafter weights {file} are unreadable or corrupt ({error})") from error
    return weights


def check_fits_target(config: DrafterConfig, target: Target, source: str) -> None:
    if config.hidden_size != target.hidden_size:
        raise CaddtreeError(
            f"drafter {source} has hidden size {config.hidden_size}, the target {target.hidden_size}"
        )
    bad = [j for j in config.target_layer_ids if not 0 <= j < target.num_layers]
    if bad or not config.target_layer_ids:
        raise CaddtreeError(
            f"drafter {source} reads target layers {config.target_layer_ids}; "
            f"the target has layers 0..{target.num_layers - 1}"
        )
    if config.block_size < 2:
        raise CaddtreeError(f"drafter {source} has block_size {config.block_size}; it must be at least 2")


def load_weights_into(drafter: DFlashDrafter, weights: dict[str, torch.Tensor], source: str) -> None:
    expected = drafter.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise CaddtreeError(
            f"drafter weights {source} do not match its config: "
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    for name, tensor in weights.items():
        if tensor.shape != expected[name].shape:
            raise CaddtreeError(
                f"drafter weight {name} in {source} has shape {tuple(tensor.shape)}, "
                f"its config implies {tuple(expected[name].shape)}"
            )
        if tensor.is_floating_point() != expected[name].is_floating_point():
            raise CaddtreeError(f"drafter tensor {name} in {source} has dtype {tensor.dtype}, "
                                f"expected {'a floating' if expected[name].is_floating_point() else 'an integer'} type")
    drafter.load_state_dict(weights)


def check_draft_vocab(drafter: DFlashDrafter, target: Target, source: str) -> None:
    """A draft vocabulary lists distinct target tokens in increasing order."""
    vocab = drafter.draft_vocab
    if vocab is None:
        return
    rows = target.vocab_size
    if not (vocab[1:] > vocab[:-1]).all() or vocab[0] < 0 or vocab[-1] >= rows:
        raise CaddtreeError(
            f"drafter {source}: draft_vocab must list distinct token ids in increasing order, in [0, {rows})"
        )


def load_drafter(spec: str, target: Target) -> DFlashDrafter:
    """Load a drafter checkpoint (local directory or hub id) checked against the target."""
    directory = _local_checkpoint(spec)
    config = read_config(directory)
    check_fits_target(config, target, spec)
    drafter = DFlashDrafter(config)
    load_weights_into(drafter, read_weights(directory), spec)
    check_draft_vocab(drafter, target, spec)
    return drafter.to(device=target.device, dtype=target.dtype).eval()


def random_drafter(target: Target, num_layers: int = 1, block_size: int = 16, seed: int = 0,
                   mask_token_id: int | None = None, target_layer_ids: list[int] | None = None,
                   draft_vocab: torch.Tensor | None = None) -> DFlashDrafter:
    """An untrained drafter shaped for `target` (tests, and the starting point of training).

    `target_layer_ids` defaults to DFlash's spread for `num_layers`; `draft_vocab` (K,), increasing
    target token ids, restricts what it scores (default: the whole vocabulary)."""
    target_config = target.model.config
    heads = target_config.num_attention_heads
    config = DrafterConfig(
        hidden_size=target.hidden_size,
        intermediate_size=target_config.intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=getattr(target_config, "num_key_value_heads", heads),
        head_dim=getattr(target_config, "head_dim", None) or target.hidden_size // heads,
        target_layer_ids=list(target_layer_ids or default_target_layer_ids(num_layers, target.num_layers)),
        num_target_layers=target.num_layers,
        block_size=block_size,
        mask_token_id=mask_token_id,
        draft_vocab_size=None if draft_vocab is None else len(draft_vocab),
        rms_norm_eps=getattr(target_config, "rms_norm_eps", 1e-6),
        vocab_size=target_config.vocab_size,
    )
    check_fits_target(config, target, "(new)")
    generator = torch.Generator().manual_seed(seed)
    drafter = DFlashDrafter(config)
    with torch.no_grad():
        for name, parameter in drafter.named_parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.02, generator=generator)
        if draft_vocab is not None:
            drafter.draft_vocab.copy_(draft_vocab)
    drafter = drafter.to(device=target.device, dtype=target.dtype).eval()
    check_draft_vocab(drafter, target, "(new)")
    return drafter


def grown_drafter(drafter: DFlashDrafter, num_layers: int) -> DFlashDrafter:
    """`drafter` with layers added after its last up to `num_layers`, each a copy of the last with
    its output projections (attention and MLP) zeroed: a residual layer that adds nothing, so the
    grown drafter computes exactly what `drafter` does until training moves those projections."""
    config = dataclasses.replace(drafter.config, num_hidden_layers=num_layers)
    grown = DFlashDrafter(config).to(device=drafter.fc.weight.device, dtype=drafter.dtype)
    state = drafter.state_dict()
    last = drafter.config.num_hidden_layers - 1
    for index in range(last + 1, num_layers):
        for key, value in drafter.layers[last].state_dict().items():
            state[f"layers.{index}.{key}"] = value.clone()
        state[f"layers.{index}.self_attn.o_proj.weight"].zero_()
        state[f"layers.{index}.mlp.down_proj.weight"].zero_()
    grown.load_state_dict(state)
    return grown


def resolve_mask_token(config: DrafterConfig, target: Target) -> int:
    """The config's mask token, else the first embedding row no tokenizer token uses."""
    rows = target.model.get_input_embeddings().weight.shape[0]
    if config.mask_token_id is not None:
        if not 0 <= config.mask_token_id < rows:
            raise CaddtreeError(f"drafter mask_token_id {config.mask_token_id} is outside the target's {rows} embeddings")
        return config.mask_token_id
    used = len(target.tokenizer)
    if used < rows:
        return used
    raise CaddtreeError(
        "the drafter config sets no dflash_config.mask_token_id and the target has no unused "
        "embedding row to use as the mask token; set mask_token_id in the drafter's config.json"
    )
