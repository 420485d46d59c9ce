"""The embedded default target (SmolLM2-135M-Instruct GGUF), float32 on the CPU: still lossless."""

import pytest
import torch

from caddtree.cost.model import CostModel
from caddtree.decode.engine import Engine
from caddtree.decode.policy import make_policy
from caddtree.errors import CaddtreeError
from caddtree.api import DEFAULT_DRAFTER_DIR
from caddtree.models.drafter_io import load_drafter, random_drafter
from caddtree.models.target import encode_prompt, load_target

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "List five uses of a paperclip and explain each.",
    "What is the difference between a list and a tuple in Python?",
]
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def target():
    torch.manual_seed(0)
    return load_target(None)


def cheap_cost_model() -> CostModel:
    sizes = [1, 4, 16, 64]
    meta = {"target": "smollm2", "drafter": "random", "device": "cpu", "dtype": "float32"}
    return CostModel.fit(meta, [64], sizes, [[0.05 + 1e-5 * n for n in sizes]], [0.01])


SHIPPED = (DEFAULT_DRAFTER_DIR / "config.json").is_file()


def test_every_method_reproduces_plain_greedy_decoding(target):
    """With the shipped drafter, drafts are accepted: the real model's acceptance path (cache
    compaction, feature hand-over) is exercised, not only rejection, and a 24-node tree gets more
    than two tokens per round on every prompt (the shipped drafter, `cpu19`, gives 2.17 / 3.15 / 2.42)."""
    drafter = (load_drafter(str(DEFAULT_DRAFTER_DIR), target) if SHIPPED
               else random_drafter(target, num_layers=1, block_size=16, mask_token_id=16))
    engine = Engine(target, drafter)
    longest_round, tree_taus = 0, []
    for prompt in PROMPTS:
        prompt_ids = encode_prompt(target, prompt)
        with torch.no_grad():
            reference = target.model.generate(
                prompt_ids[None], max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=sorted(engine.eos_ids)
            )[0, len(prompt_ids):].tolist()
        assert len(reference) == NEW_TOKENS, "pick prompts whose answers run past 64 tokens"
        for policy in (make_policy("ar"), make_policy("dflash"), make_policy("ddtree", 24),
                       make_policy("caddtree", None, "greedy", cheap_cost_model()),
                       make_policy("lookup", None, "exact", cheap_cost_model())):
            result = engine.generate(prompt_ids, policy, NEW_TOKENS)
            assert result.tokens == reference, policy.name
            longest_round = max(longest_round, *(r.emitted for r in result.rounds))
            if policy.name == "ddtree":
                tree_taus.append(result.tau)
    if SHIPPED:
        assert longest_round >= 4, "the shipped drafter should get several tokens accepted in some round"
        assert min(tree_taus) > 2, f"the shipped drafter's DDTree-24 tau per prompt: {tree_taus}"


def test_lookups_on_a_grounded_prompt_are_accepted_and_exact(target):
    """Asked to give back a function with comments, the target copies it: lookups pay off there."""
    code = "def area(width, height):\n    result = width * height\n    return result\n"
    prompt_ids = encode_prompt(target, f"```python\n{code}```\nRewrite this code with a comment on each line.")
    engine = Engine(target)
    reference = engine.generate(prompt_ids, make_policy("ar"), NEW_TOKENS).tokens
    result = engine.generate(prompt_ids, make_policy("lookup", None, "exact", cheap_cost_model()), NEW_TOKENS)
    assert result.tokens == reference
    assert result.tau > 1.5, "the copied lines should be accepted several tokens at a time"


def test_default_prompt_encoding(target):
    ids = encode_prompt(target, "Hello")
    assert target.tokenizer.decode(ids).count("<|im_start|>") >= 2  # system + user turns of the template
    raw = encode_prompt(target, "Hello", raw=True)
    assert "<|im_start|>" not in target.tokenizer.decode(raw)
    with pytest.raises(CaddtreeError, match="empty"):
        encode_prompt(target, "  ")


@pytest.mark.skipif(not SHIPPED, reason="no trained default drafter shipped yet")
def test_the_shipped_drafter_loads_and_drafts_well(target):
    """The shipped pair drafts well above chance on the DFlash chain (an untrained drafter: 1.0).

    The bar is below issue 9's target (τ > 2): the shipped CPU-trained drafter (`cpu19`) gives 1.57,
    2.33 and 1.75 on these prompts (`cpu12` 1.47 / 2.62 / 1.70, `cpu10` 1.50 / 2.17 / 1.62, `cpu9` 1.47
    / 2.25 / 1.66, `cpu8` 1.54 / 2.33 / 1.70, `cpu6` 1.43 / 1.50 / 1.62). Raise it with every better
    drafter."""
    engine = Engine(target, load_drafter(str(DEFAULT_DRAFTER_DIR), target))
    taus = [engine.generate(encode_prompt(target, prompt), make_policy("dflash"), NEW_TOKENS).tau for prompt in PROMPTS]
    assert sum(taus) / len(taus) > 1.7, taus
