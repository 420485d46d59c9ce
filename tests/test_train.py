"""Drafter training: block layout against a brute-force reference, loss goes down, data resumes."""

import json

import pytest
import torch

from caddtree.decode.engine import eos_token_ids
from caddtree.models.drafter_io import load_drafter
from caddtree.train.data import Example, generate_examples, read_examples
from caddtree.train.loop import TrainConfig, learning_rate_factor, train
from caddtree.train.objective import IGNORE, pack_blocks, sample_anchors
from tiny import tiny_target


def brute_force_visibility(anchors: list[int], block_size: int, sequence_len: int) -> torch.Tensor:
    """Row = block token; columns = context tokens then block tokens; by the rules, one cell at a time."""
    rows = [(block, anchor) for block, anchor in enumerate(anchors) for _ in range(block_size)]
    visible = torch.zeros(len(rows), sequence_len + len(rows), dtype=torch.bool)
    for i, (block, anchor) in enumerate(rows):
        for j in range(sequence_len):
            visible[i, j] = j < anchor  # context strictly before the anchor
        for j, (other_block, _) in enumerate(rows):
            visible[i, sequence_len + j] = other_block == block  # own block only, both directions
    return visible


@pytest.mark.parametrize("seed", range(5))
def test_packed_blocks_match_brute_force(seed):
    generator = torch.Generator().manual_seed(seed)
    sequence_len = int(torch.randint(6, 40, (1,), generator=generator))
    block_size = int(torch.randint(2, 9, (1,), generator=generator))
    tokens = torch.randint(0, 50, (sequence_len,), generator=generator)
    anchors = sample_anchors(2, sequence_len, 5, generator)
    assert len(set(anchors.tolist())) == len(anchors) and all(2 <= a <= sequence_len - 2 for a in anchors.tolist())
    blocks = pack_blocks(tokens, anchors, block_size, mask_token=99, gamma=4.0)
    assert torch.equal(blocks.attention_mask, brute_force_visibility(anchors.tolist(), block_size, sequence_len))
    for block, anchor in enumerate(anchors.tolist()):
        for k in range(block_size):
            i = block * block_size + k
            assert blocks.positions[i] == anchor + k
            assert blocks.input_ids[i] == (tokens[anchor] if k == 0 else 99)
            in_range = k >= 1 and anchor + k < sequence_len
            assert blocks.labels[i] == (tokens[anchor + k] if in_range else IGNORE)
            expected_weight = torch.exp(torch.tensor(-(k - 1) / 4.0)) if in_range else 0.0
            assert abs(float(blocks.loss_weights[i]) - float(expected_weight)) < 1e-6
            # no block token sees its own future in the context, nor any other block
            assert not blocks.attention_mask[i, anchor:sequence_len].any()


def test_padded_blocks_keep_the_real_ones_and_predict_nothing():
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 50, (12,), generator=generator)
    anchors = sample_anchors(2, 12, 3, generator)
    plain = pack_blocks(tokens, anchors, 4, mask_token=99, gamma=4.0)
    padded = pack_blocks(tokens, anchors, 4, mask_token=99, gamma=4.0, context_width=20, num_blocks=5)
    real = 3 * 4
    for name in ("input_ids", "positions", "labels", "loss_weights"):
        assert torch.equal(getattr(padded, name)[:real], getattr(plain, name))
    assert torch.equal(padded.attention_mask[:real, :12], plain.attention_mask[:, :12])
    assert torch.equal(padded.attention_mask[:real, 20 : 20 + real], plain.attention_mask[:, 12:])
    assert not padded.attention_mask[:real, 12:20].any() and not padded.attention_mask[:real, 20 + real :].any()
    assert (padded.labels[real:] == IGNORE).all() and (padded.loss_weights[real:] == 0).all()
    assert (padded.input_ids[real:] == 99).all()
    pad_rows = padded.attention_mask[real:]
    assert not pad_rows[:, : 20 + real].any()  # padding sees no context and no real block
    assert torch.equal(pad_rows[:, 20 + real :], torch.block_diag(*[torch.ones(4, 4, dtype=torch.bool)] * 2))


def test_anchors_need_a_next_token():
    generator = torch.Generator().manual_seed(0)
    assert len(sample_anchors(5, 6, 3, generator)) == 0
    assert sample_anchors(4, 6, 3, generator).tolist() == [4]


def test_learning_rate_warms_up_then_decays():
    factors = [learning_rate_factor(step, 10, (step - 10) / 90) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:])) and factors[-1] >= 0.1


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    target = tiny_target("llama", vocab_size=32, seed=4)
    prompts = [" ".join(f"w{(i * 5 + j) % 26 + 2}" for j in range(4)) for i in range(24)]
    cache = tmp_path_factory.mktemp("data") / "data.jsonl"
    examples = generate_examples(target, prompts, cache, 24, 8, eos_token_ids(target))
    return target, examples, cache, prompts


def test_generated_data_is_the_targets_greedy_answer_and_resumes(tiny_data):
    target, examples, cache, prompts = tiny_data
    assert len(examples) == len(prompts) == len(read_examples(cache))
    with torch.no_grad():  # the first answer token is the target's argmax after the prompt
        first = target.model(torch.tensor([examples[0].prompt_ids])).logits[0, -1].argmax()
    assert examples[0].response_ids[0] == int(first)
    lines = cache.read_text().splitlines()
    cache.write_text("\n".join(lines[:10]) + "\n" + lines[10][: len(lines[10]) // 2])  # interrupted mid-line
    resumed = generate_examples(target, prompts, cache, 24, 8, eos_token_ids(target))
    assert resumed == examples
    assert [json.loads(line)["response_ids"] for line in cache.read_text().splitlines()] == [e.response_ids for e in examples]


def test_training_lowers_the_loss_and_saves_a_loadable_drafter(tiny_data, tmp_path):
    target, examples, _, prompts = tiny_data
    config = TrainConfig(num_layers=1, block_size=6, steps=80, learning_rate=3e-3, warmup_steps=5,
                         sequences_per_step=4, anchors_per_sequence=8, eval_every=80, eval_tokens=12)
    drafter = train(target, examples, tmp_path, config, prompts[:2])
    history = json.loads((tmp_path / "history.json").read_text())
    first, last = history["loss"][:10], history["loss"][-10:]
    assert sum(last) / len(last) < 0.8 * sum(first) / len(first)
    assert (tmp_path / "loss.png").stat().st_size > 0 and history["eval_tau"]
    loaded = load_drafter(str(tmp_path), target)
    for name, tensor in drafter.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor)
    assert all(not p.requires_grad for p in target.model.parameters())


def test_example_token_ids():
    assert Example([1, 2], [3]).token_ids.tolist() == [1, 2, 3]


def test_a_cut_short_json_array_yields_its_complete_items():
    from caddtree.train.data import _complete_items

    assert _complete_items('[{"a": 1}, {"b": [2, 3]},\n {"c": "unterminat') == [{"a": 1}, {"b": [2, 3]}]
    assert _complete_items("[]") == []


def test_batched_features_equal_one_sequence_at_a_time(tiny_data):
    from caddtree.models.target import TargetRunner

    target, examples, _, _ = tiny_data
    runner = TargetRunner(target, [0, 1])
    try:
        batched = runner.features_of([e.token_ids for e in examples[:5]])
        for example, features in zip(examples[:5], batched):
            torch.testing.assert_close(features, runner.prefill(example.token_ids)[1], atol=1e-4, rtol=1e-3)
    finally:
        runner.close()


def test_a_batch_loss_is_the_weighted_mean_of_its_sequences(tiny_data):
    from caddtree.models.drafter_io import random_drafter
    from caddtree.train.loop import batch_loss, target_features

    target, examples, _, _ = tiny_data
    chosen = [examples[1], examples[6], examples[11]]
    assert len({len(e.token_ids) for e in chosen}) > 1  # different lengths: padding is exercised
    drafter = random_drafter(target, 1, 6, seed=2).float()
    config = TrainConfig(block_size=6, anchors_per_sequence=5)
    features = target_features(target, drafter.config.target_layer_ids, chosen, batch_tokens=40)
    with torch.no_grad():
        together = batch_loss(drafter, target, chosen, features, config, 30, torch.Generator().manual_seed(9))
        stream = torch.Generator().manual_seed(9)  # the same anchors, drawn one sequence at a time
        singles = [batch_loss(drafter, target, [e], [f], config, 30, stream) for e, f in zip(chosen, features)]
    stream = torch.Generator().manual_seed(9)
    weights = [pack_blocks(e.token_ids, sample_anchors(len(e.prompt_ids), len(e.token_ids), 5, stream), 6, 30,
                           config.gamma).loss_weights.sum() for e in chosen]
    expected = sum(loss * weight for loss, weight in zip(singles, weights)) / sum(weights)
    torch.testing.assert_close(together, expected, atol=1e-4, rtol=1e-4)


def test_a_time_limit_ends_training_and_still_saves(tiny_data, tmp_path):
    target, examples, _, _ = tiny_data
    config = TrainConfig(block_size=6, steps=10**6, max_minutes=0.01, sequences_per_step=2, anchors_per_sequence=4,
                         save_dtype="bfloat16")
    train(target, examples, tmp_path, config, [])
    history = json.loads((tmp_path / "history.json").read_text())
    assert 0 < len(history["steps"]) < 10**6 and history["wall_seconds"] < 30
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(tmp_path / "model.safetensors").values()} == {torch.bfloat16}
