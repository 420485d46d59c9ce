"""Every method must yield exactly the tokens of plain greedy decoding (the target alone)."""

import pytest
import torch

from caddtree.cost.model import CostModel
from caddtree.decode.engine import Engine
from caddtree.decode.policy import make_policy
from caddtree.models.drafter_io import random_drafter
from tiny import tiny_target

SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256]


def flat_cost_model(per_node_seconds: float) -> CostModel:
    """Verification nearly free per node: caddtree then picks large trees (the risky case)."""
    verify = [[0.01 + per_node_seconds * n for n in SIZES] for _ in range(2)]
    meta = {"target": "tiny", "drafter": "random", "device": "cpu", "dtype": "float32"}
    return CostModel.fit(meta, [8, 200], SIZES, verify, [0.002, 0.003])


def policies(lookup: bool = True):
    """Every method; `lookup` False leaves out the nodes found in the context."""
    yield make_policy("dflash")
    for budget in (0, 1, 2, 5, 17, 64, 256):
        yield make_policy("ddtree", budget)
    for rule in ("greedy", "exact"):
        for per_node in (1e-3, 1e-6):
            yield make_policy("caddtree", None, rule, flat_cost_model(per_node), lookup=lookup)
            if lookup:
                yield make_policy("lookup", None, rule, flat_cost_model(per_node))
    yield make_policy("caddtree", None, "exact", flat_cost_model(1e-6), calibrate=False, lookup=lookup)
    yield make_policy("caddtree", None, "exact", flat_cost_model(1e-6), lookup=False)


def random_prompts(count: int, vocab: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 24, (count,), generator=generator)
    return [torch.randint(2, vocab - 4, (int(n),), generator=generator) for n in lengths]


def greedy_reference(target, prompt: torch.Tensor, max_new_tokens: int, eos_ids: set[int]) -> list[int]:
    """Plain greedy decoding with the model's own full forward each step: no cache, no engine."""
    ids = prompt.tolist()
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(target.model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(token)
            new.append(token)
            if token in eos_ids:
                break
    return new


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("block_size", [2, 5, 16])
def test_every_method_matches_greedy(arch, block_size):
    target = tiny_target(arch, vocab_size=24, seed=block_size)
    engine = Engine(target, random_drafter(target, num_layers=2, block_size=block_size, seed=1))
    engine.eos_ids = set()
    accepted_more_than_one = False
    for prompt in random_prompts(3, 24, seed=block_size):
        max_new_tokens = 29  # odd: rounds end mid-way through the last block
        expected = greedy_reference(target, prompt, max_new_tokens, set())
        assert engine.generate(prompt, make_policy("ar"), max_new_tokens).tokens == expected
        for policy in policies():
            result = engine.generate(prompt, policy, max_new_tokens)
            assert result.tokens == expected, f"{policy.name} {getattr(policy, 'budget', '')}"
            accepted_more_than_one |= max(r.emitted for r in result.rounds) > 1
    assert accepted_more_than_one, "no round accepted a draft token: the test exercised nothing"


@pytest.mark.parametrize("bf16_units", [False, True])
def test_every_method_matches_greedy_whatever_precision_the_drafter_takes(monkeypatch, bf16_units):
    """With bfloat16 units the drafter drafts in bfloat16 under a float32 target: other
    proposals, the same output."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16_units, raising=False)
    target = tiny_target("qwen3", vocab_size=24, seed=4)
    engine = Engine(target, random_drafter(target, num_layers=2, block_size=5, seed=1))
    assert engine.drafts.dtype == (torch.bfloat16 if bf16_units else torch.float32)
    engine.eos_ids = set()
    for prompt in random_prompts(2, 24, seed=4):
        expected = greedy_reference(target, prompt, 29, set())
        for policy in [make_policy("ar"), *policies()]:
            assert engine.generate(prompt, policy, 29).tokens == expected, policy.name


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_lookup_and_hybrid_trees_match_greedy_on_text_that_repeats_itself(arch):
    """Prompts that repeat a stretch: lookups are proposed and accepted, alone and beside a drafter."""
    target = tiny_target(arch, vocab_size=24, seed=11)
    engine = Engine(target, random_drafter(target, num_layers=1, block_size=5, seed=1))
    engine.eos_ids = set()
    looked_up_and_accepted = {"lookup": 0, "caddtree": 0}
    for prompt in random_prompts(3, 24, seed=5):
        prompt = torch.cat([prompt, prompt, prompt[:3]])
        expected = greedy_reference(target, prompt, 40, set())
        for rule in ("greedy", "exact"):
            for method in looked_up_and_accepted:
                result = engine.generate(prompt, make_policy(method, None, rule, flat_cost_model(1e-4)), 40)
                assert result.tokens == expected, (method, rule)
                looked_up_and_accepted[method] += sum(r.emitted > 1 and not r.drafted for r in result.rounds)
    assert all(looked_up_and_accepted.values()), looked_up_and_accepted


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_stops_at_eos_inside_an_accepted_path(arch):
    target = tiny_target(arch, vocab_size=20, seed=3)
    engine = Engine(target, random_drafter(target, num_layers=1, block_size=8, seed=2))
    eos_inside_round = 0
    for prompt in random_prompts(6, 20, seed=7):
        free_run = greedy_reference(target, prompt, 30, set())
        eos = free_run[len(free_run) // 2]  # a token the target really produces mid-way
        engine.eos_ids = {eos}
        expected = free_run[: free_run.index(eos) + 1]
        for policy in (make_policy("ddtree", 256), make_policy("dflash"), make_policy("ar")):
            result = engine.generate(prompt, policy, 30)
            assert result.tokens == expected
            eos_inside_round += policy.name == "ddtree" and bool(result.rounds) and result.rounds[-1].emitted > 1
    assert eos_inside_round > 0, "EOS never arrived together with accepted draft tokens"


def test_max_new_tokens_reached_mid_round():
    target = tiny_target("llama", vocab_size=20, seed=5)
    engine = Engine(target, random_drafter(target, num_layers=1, block_size=16, seed=2))
    engine.eos_ids = set()
    prompt = torch.tensor([3, 4, 5])
    for max_new_tokens in (1, 2, 3, 7, 18):
        expected = greedy_reference(target, prompt, max_new_tokens, set())
        result = engine.generate(prompt, make_policy("ddtree", 256), max_new_tokens)
        assert result.tokens == expected and len(result.tokens) == max_new_tokens


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_fixed_shape_verification_is_lossless(arch):
    """The CUDA-graph path's shapes (static cache, padded buckets), run eagerly on the CPU."""
    from caddtree.models.static_runner import StaticTargetRunner

    target = tiny_target(arch, vocab_size=32, layers=3, seed=5)
    engine = Engine(target, random_drafter(target, 1, 6, seed=2), static_shapes=True)
    assert isinstance(engine.verifier, StaticTargetRunner) and not engine.verifier.cuda_graphs
    engine.eos_ids = set()
    for prompt in random_prompts(3, 24, seed=7):
        expected = greedy_reference(target, prompt, 40, set())
        for policy in (make_policy("ar"), make_policy("dflash"), make_policy("ddtree", 5), make_policy("ddtree", 40),
                       make_policy("caddtree", None, "exact", flat_cost_model(1e-6)),
                       make_policy("caddtree", None, "greedy", flat_cost_model(1e-3)),
                       make_policy("lookup", None, "exact", flat_cost_model(1e-6))):
            assert engine.generate(prompt, policy, 40).tokens == expected, policy.name


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_a_draft_vocabulary_keeps_every_method_exact_and_drafts_only_its_tokens(arch):
    target = tiny_target(arch, vocab_size=24, seed=5)
    draft_vocab = torch.tensor([2, 3, 5, 7, 8, 11, 13, 16, 17, 19])
    engine = Engine(target, random_drafter(target, num_layers=1, block_size=6, seed=3, draft_vocab=draft_vocab))
    engine.eos_ids = set()
    verified = []
    verify = engine.verifier.verify
    engine.verifier.verify = lambda tokens, *rest: verified.append(tokens[1:]) or verify(tokens, *rest)
    for prompt in random_prompts(3, 24, seed=4):
        expected = greedy_reference(target, prompt, 25, set())
        for policy in policies(lookup=False):  # lookups may propose any token
            assert engine.generate(prompt, policy, 25).tokens == expected, policy.name
    drafted = torch.cat(verified)
    assert len(drafted) > 100 and torch.isin(drafted, draft_vocab).all()


def tiny_of(config_class, model_class, **extra):
    from tiny import tiny_tokenizer
    from caddtree.models.target import Target

    shape = dict(vocab_size=24, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=False,
                 initializer_range=0.3, eos_token_id=1)
    torch.manual_seed(0)
    return Target(model_class(config_class(**shape, **extra)).eval(), tiny_tokenizer(24), config_class.model_type)


def test_a_sliding_window_target_is_exact_inside_its_window_and_refused_beyond():
    from transformers import MistralConfig, MistralForCausalLM

    from caddtree.errors import CaddtreeError

    target = tiny_of(MistralConfig, MistralForCausalLM, sliding_window=40)
    engine = Engine(target, random_drafter(target, num_layers=1, block_size=5, seed=1))
    engine.eos_ids = set()
    prompt = random_prompts(1, 24, seed=2)[0][:10]
    expected = greedy_reference(target, prompt, 20, set())
    for policy in (make_policy("ar"), make_policy("dflash"), make_policy("ddtree", 12)):
        assert engine.generate(prompt, policy, 20).tokens == expected, policy.name
    for policy in (make_policy("ddtree", 12), make_policy("lookup", None, "exact", flat_cost_model(1e-6))):  # lookup trees too, without a drafter
        with pytest.raises(CaddtreeError, match="sliding window of 40 tokens.*or --method ar$"):
            engine.generate(prompt, policy, 40)
    assert engine.generate(prompt, make_policy("ar"), 40).tokens == greedy_reference(target, prompt, 40, set())
    fixed_shapes = Engine(target, static_shapes=True)  # masks even a plain step
    fixed_shapes.eos_ids = set()
    assert fixed_shapes.generate(prompt, make_policy("ar"), 20).tokens == expected
    with pytest.raises(CaddtreeError, match="--method ar --no-cuda-graphs$"):
        fixed_shapes.generate(prompt, make_policy("ar"), 40)


def test_a_target_with_attention_softcapping_is_refused_in_one_line():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from caddtree.errors import CaddtreeError

    target = tiny_of(Gemma2Config, Gemma2ForCausalLM, attn_logit_softcapping=50.0)
    with pytest.raises(CaddtreeError, match="soft-caps its attention logits") as caught:
        Engine(target, random_drafter(target, num_layers=1, block_size=5))
    assert "\n" not in str(caught.value)


def test_fixed_shape_verification_takes_a_tree_larger_than_its_largest_bucket():
    from caddtree.models.static_runner import BUCKETS

    target = tiny_target("llama", vocab_size=24, seed=6)
    engine = Engine(target, random_drafter(target, num_layers=1, block_size=5, seed=2), static_shapes=True)
    engine.eos_ids = set()
    prompt = random_prompts(1, 24, seed=3)[0]
    budget = BUCKETS[-1] + 500
    result = engine.generate(prompt, make_policy("ddtree", budget), 6)
    assert result.tokens == greedy_reference(target, prompt, 6, set())
    assert max(r.budget for r in result.rounds) > BUCKETS[-1]
