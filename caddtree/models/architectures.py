"""Randomly initialised targets of real architectures, for measuring cost.

Cost depends on shapes, not on weight values, so `caddtree profile --target random:qwen3-8b`
measures Cv(n; l) of an 8B model without downloading it. Such targets have no tokenizer: they
can be profiled, not asked to generate text.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from caddtree.errors import CaddtreeError

RANDOM_PREFIX = "random:"
_QWEN3 = dict(model_type="qwen3", vocab_size=151936, num_hidden_layers=36, num_attention_heads=32,
              num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rope_theta=1_000_000.0,
              rms_norm_eps=1e-6)
ARCHITECTURES = {  # the published config.json values that shape the computation
    "qwen3-4b": {**_QWEN3, "hidden_size": 2560, "intermediate_size": 9728, "tie_word_embeddings": True},
    "qwen3-8b": {**_QWEN3, "hidden_size": 4096, "intermediate_size": 12288, "tie_word_embeddings": False},
}


def is_random_spec(spec: str | None) -> bool:
    return spec is not None and spec.startswith(RANDOM_PREFIX)


def architecture_config(spec: str) -> dict:
    """The config fields of `random:NAME` (a known architecture) or `random:PATH` (a config.json)."""
    name = spec.removeprefix(RANDOM_PREFIX)
    if name.lower() in ARCHITECTURES:
        return dict(ARCHITECTURES[name.lower()])
    path = Path(name).expanduser()
    if not path.is_file():
        raise CaddtreeError(
            f"unknown architecture {name!r}: use random:{' or random:'.join(ARCHITECTURES)} or random:PATH/config.json"
        )
    try:
        fields = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CaddtreeError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(fields, dict) or "model_type" not in fields:
        raise CaddtreeError(f"{path} has no \"model_type\": not a transformers config.json")
    return fields


def random_model(spec: str, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """A randomly initialised causal LM of the architecture `spec`, built directly on `device`."""
    fields = architecture_config(spec)
    try:
        config = AutoConfig.for_model(**fields)
    except (ValueError, KeyError, TypeError) as error:
        raise CaddtreeError(f"cannot build architecture {spec!r}: {error}") from None
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()
