"""The Python API: load a target/drafter pair once, then generate with any method.

    import caddtree
    pair = caddtree.load()                       # default SmolLM2 target and drafter, CPU
    result = pair.generate("Tell me a joke.", method="caddtree", max_new_tokens=64)
    print(result.text, result.tokens_per_s, result.tau)
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from caddtree.cost.model import CostModel
from caddtree.cost.profile import auto_cost_model, cost_meta
from caddtree.decode.engine import Engine
from caddtree.decode.policy import COST_AWARE_METHODS, check_policy_arguments, make_policy
from caddtree.decode.sampling import Sampling
from caddtree.decode.stats import GenerationResult
from caddtree.errors import CaddtreeError
from caddtree.models.drafter_io import load_drafter, random_drafter
from caddtree.models.target import Target, encode_prompt, load_target

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_DRAFTER_DIR = Path(__file__).parent / "assets" / "drafter"
RANDOM_DRAFTER = "random"


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise CaddtreeError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def parse_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CaddtreeError(f"device {name!r} asked for, but PyTorch sees no CUDA device")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise CaddtreeError(f"unknown device {name!r}") from error
    if device.type not in ("cpu", "cuda"):
        raise CaddtreeError(f"caddtree runs on cpu or cuda devices, not {name!r}")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CaddtreeError(f"device {name!r} asked for, but PyTorch sees {torch.cuda.device_count()} CUDA device(s)")
    return name


def default_drafter_spec(target_spec: str | None) -> str:
    """The shipped drafter for the default target; a random drafter for any other target."""
    if target_spec is None and (DEFAULT_DRAFTER_DIR / "config.json").is_file():
        return str(DEFAULT_DRAFTER_DIR)
    return RANDOM_DRAFTER


def _random_drafter_layers(spec: str) -> int:
    """`random` is a 1-layer untrained drafter; `random:N` has N layers (for profiling Cd)."""
    layers = spec.removeprefix(RANDOM_DRAFTER).removeprefix(":") or "1"
    if not layers.isdigit() or int(layers) < 1:
        raise CaddtreeError(f"drafter {spec!r}: write random or random:N with N >= 1 layers")
    return int(layers)


def _fallback_mask_token(target: Target) -> int:
    """Any token serves an untrained drafter; prefer an unused embedding row."""
    rows = target.model.get_input_embeddings().weight.shape[0]
    if target.tokenizer is None:  # a random architecture: no token is in use
        return rows - 1
    if len(target.tokenizer) < rows:
        return len(target.tokenizer)
    tokenizer = target.tokenizer
    return next(i for i in (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id, 0) if i is not None)


class Pair:
    """A loaded target and drafter, with the cost model made for them (on first need)."""

    def __init__(self, target: Target, drafter_name: str, drafter=None, cuda_graphs: bool = True):
        self.target = target
        self.drafter_name = drafter_name
        self.engine = Engine(target, drafter, static_shapes=None if cuda_graphs else False)
        self._auto_cost_model: CostModel | None = None

    @property
    def drafter_description(self) -> str:
        if self.drafter_name.split(":")[0] == RANDOM_DRAFTER:
            return "an untrained, randomly initialised drafter (no trained drafter for this target): expect no speed-up"
        if Path(self.drafter_name) == DEFAULT_DRAFTER_DIR:
            return "the default drafter shipped with caddtree"
        return self.drafter_name

    def cost_model(self, spec: str | CostModel | None = "auto", show_progress: bool = True) -> CostModel:
        """`auto` (profile once, cached), a JSON file path, or a CostModel."""
        if isinstance(spec, CostModel):
            return spec
        if spec in (None, "auto"):
            if self._auto_cost_model is None:
                self._auto_cost_model = auto_cost_model(self.engine, self.drafter_name, show_progress)
            return self._auto_cost_model
        return CostModel.load(spec, expect_meta=cost_meta(self.engine, self.drafter_name))

    def generate(self, prompt: str | list[dict], method: str = "caddtree", budget: int | None = None,
                 rule: str = "exact", temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 max_new_tokens: int = 256, seed: int = 0, raw: bool = False,
                 cost_model: str | CostModel | None = "auto", calibrate: bool = True, lookup: bool = True,
                 on_text: Callable[[str], bool | None] | None = None) -> GenerationResult:
        """Generate a reply to `prompt` (text, or a conversation: [{"role": ..., "content": ...}, ...]).

        `method` "lookup" drafts only continuations found in the context (the drafter is not used); caddtree adds
        them to the drafter's tree unless `lookup` is False.

        `on_text` receives the text as it grows (streaming); returning True ends the generation
        after that piece (`finish_reason` "caller")."""
        sampling = Sampling(temperature, top_p, top_k)
        check_policy_arguments(method, budget, rule, lookup, calibrate)
        prompt_ids = encode_prompt(self.target, prompt, raw)
        model = self.cost_model(cost_model, on_text is not None) if method in COST_AWARE_METHODS else None
        policy = make_policy(method, budget, rule, model, calibrate, lookup)
        on_tokens = _text_streamer(self.target.tokenizer, on_text) if on_text else None
        result = self.engine.generate(prompt_ids, policy, max_new_tokens, sampling, seed, on_tokens)
        result.text = self.target.tokenizer.decode(result.tokens, skip_special_tokens=True)
        return result


def _text_streamer(tokenizer, on_text: Callable[[str], bool | None]) -> Callable[[list[int]], bool | None]:
    """Turns token chunks into text increments (decoding the whole so far keeps multi-byte text whole)."""
    tokens: list[int] = []
    shown = 0

    def on_tokens(chunk: list[int]) -> bool | None:
        nonlocal shown
        tokens.extend(chunk)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete character: wait for the rest
            return None
        piece, shown = text[shown:], len(text)
        return on_text(piece)

    return on_tokens


def load(target: str | None = None, drafter: str | None = None, device: str = "cpu",
         dtype: str = "float32", cuda_graphs: bool = True) -> Pair:
    """Load a target (hub id, directory, .gguf; default SmolLM2-135M-Instruct) and its drafter.

    On a GPU, verification replays CUDA graphs unless `cuda_graphs` is False (eager forwards)."""
    device = parse_device(device)
    loaded_target = load_target(target, device, parse_dtype(dtype))
    drafter = drafter or default_drafter_spec(target)
    if drafter == RANDOM_DRAFTER or drafter.startswith(RANDOM_DRAFTER + ":"):
        layers = _random_drafter_layers(drafter)
        module = random_drafter(loaded_target, num_layers=layers, mask_token_id=_fallback_mask_token(loaded_target))
    else:
        module = load_drafter(drafter, loaded_target)
    return Pair(loaded_target, drafter, module, cuda_graphs)
