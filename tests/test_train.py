"""Drafter training: block layout against a brute-force reference, loss goes down, data resumes."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from caddtree.decode.drafting import DraftRunner
from caddtree.decode.engine import eos_token_ids
from caddtree.models.drafter import DraftHead
from caddtree.models.drafter_io import load_drafter, random_drafter
from caddtree.models.target import TargetRunner
from caddtree.train.data import Example, generate_examples, read_data_files, read_examples
from caddtree.train.features import feature_stream, target_features
from caddtree.train.loop import TrainConfig, learning_rate_factor, train
from caddtree.train.objective import IGNORE, draft_vocab_loss, pack_blocks, predict_blocks, sample_anchors
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
    # Small weights make the target repeat itself, as real ones do, so held-out answers share
    # patterns with the training ones and a held-out loss can fall (random text would not).
    target = tiny_target("llama", vocab_size=32, seed=4, init_std=0.1)
    words = [f"w{i}" for i in range(2, 18)]
    prompts = [" ".join(words[(i + 5 * j) % 16] for j in range(3)) + f" {words[i // 16]}" for i in range(24)]
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


def test_a_repeated_prompt_is_answered_once(tiny_data, tmp_path):
    target, examples, _, prompts = tiny_data
    answered = generate_examples(target, prompts[:3] + prompts[1:3], tmp_path / "data.jsonl", 24, 8,
                                 eos_token_ids(target))
    assert len(answered) == 3 and all(e in examples for e in answered)


def test_training_lowers_the_loss_and_saves_a_loadable_drafter(tiny_data, tmp_path):
    target, examples, _, prompts = tiny_data
    config = TrainConfig(num_layers=1, block_size=6, steps=80, learning_rate=3e-3, warmup_steps=5,
                         sequences_per_step=4, anchors_per_sequence=8, eval_every=40, eval_tokens=12,
                         heldout_records=4, draft_vocab_size=12, feature_layers=[1, 3])
    drafter = train(target, examples, tmp_path, config, prompts[:2])
    history = json.loads((tmp_path / "history.json").read_text())
    first, last = history["loss"][:10], history["loss"][-10:]
    assert sum(last) / len(last) < 0.8 * sum(first) / len(first)
    assert history["evaluations"] == [40, 80] and history["training_records"] == len(examples) - 4
    for name in ("eval_tau_dflash", "eval_tau_ddtree16", "eval_block_tau", "eval_chain_tau", "eval_loss"):
        assert len(history[name]) == 2, name
    assert history["eval_loss"][1] < history["eval_loss"][0]
    assert 0 < history["draft_vocab_heldout_coverage"] <= 1 and len(history["eval_accuracy_by_offset"][0]) == 5
    assert (tmp_path / "loss.png").stat().st_size > 0
    loaded = load_drafter(str(tmp_path), target)
    assert loaded.config.target_layer_ids == [1, 3] and loaded.config.draft_vocab_size == 12
    for name, tensor in drafter.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor)
    assert all(not p.requires_grad for p in target.model.parameters())


def test_training_continues_from_a_checkpoint(tiny_data, tmp_path):
    target, examples, _, _ = tiny_data
    config = TrainConfig(block_size=6, steps=60, learning_rate=3e-3, warmup_steps=5, anchors_per_sequence=8,
                         eval_every=1000, heldout_records=4, draft_vocab_size=12)
    train(target, examples, tmp_path / "first", config, [])
    first = json.loads((tmp_path / "first" / "history.json").read_text())
    again = dataclasses.replace(config, steps=1, init_from=str(tmp_path / "first"), draft_vocab_size=None)
    train(target, examples, tmp_path / "second", again, [])
    second = json.loads((tmp_path / "second" / "history.json").read_text())
    # The continued run starts from the trained weights (and keeps their draft vocabulary).
    assert second["eval_loss"][0] < 0.9 * first["loss"][0]
    assert load_drafter(str(tmp_path / "second"), target).config.draft_vocab_size == 12


def test_a_grown_drafter_computes_what_it_grew_from_until_trained(tiny_data, tmp_path):
    from caddtree.errors import CaddtreeError
    from caddtree.models.drafter_io import grown_drafter

    target, examples, _, _ = tiny_data
    drafter = random_drafter(target, 1, 6, seed=3, mask_token_id=30, target_layer_ids=[1, 3]).float()
    grown = grown_drafter(drafter, 3)
    assert grown.config.num_hidden_layers == 3 and drafter.config.num_hidden_layers == 1
    features, _ = target_features(target, [1, 3], examples[:3], None, None, 0)
    anchors = [sample_anchors(len(e.prompt_ids), len(e.token_ids), 4, torch.Generator().manual_seed(0))
               for e in examples[:3]]
    head, embed = DraftHead(drafter, target.model.get_output_embeddings()), target.model.get_input_embeddings()
    with torch.no_grad():
        before, after = (predict_blocks(d, head, embed, [e.token_ids for e in examples[:3]], features, anchors,
                                        4, 30, 7.0).logits for d in (drafter, grown))
    torch.testing.assert_close(after, before)
    config = TrainConfig(num_layers=2, block_size=6, steps=20, learning_rate=3e-3, warmup_steps=5,
                         anchors_per_sequence=8, eval_every=1000, draft_vocab_size=12)
    train(target, examples, tmp_path / "one", dataclasses.replace(config, num_layers=None), [])
    trained = train(target, examples, tmp_path / "two", dataclasses.replace(config, init_from=str(tmp_path / "one")), [])
    assert trained.layers[1].mlp.down_proj.weight.abs().sum() > 0  # the added layer learns
    assert load_drafter(str(tmp_path / "two"), target).config.num_hidden_layers == 2
    with pytest.raises(CaddtreeError, match="--layers 1 is fewer than the 2 of --init-from .* grow, not shrink"):
        train(target, examples, tmp_path / "three",
              dataclasses.replace(config, num_layers=1, init_from=str(tmp_path / "two")), [])


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


def counting_stream(computed: list):
    """feature_stream that appends to `computed` how many records each call computes."""
    def counting(target, layer_ids, records, *args):
        computed.append(len(records))
        return feature_stream(target, layer_ids, records, *args)
    return counting


def test_cached_features_are_read_back_record_by_record_and_keyed_by_what_made_them(tiny_data, tmp_path, monkeypatch):
    from caddtree.errors import CaddtreeError
    from caddtree.train import features as features_module

    target, examples, _, _ = tiny_data
    chosen = examples[:4]
    first, first_teachers = features_module.cached_target_features(tmp_path, target, [0, 1], chosen, 40, None, 3)
    written = list(tmp_path.glob("features-*.safetensors"))
    assert len(written) == 1 and not list(tmp_path.glob("*.partial"))
    computed = []
    monkeypatch.setattr(features_module, "feature_stream", counting_stream(computed))
    again, again_teachers = features_module.cached_target_features(tmp_path, target, [0, 1], chosen[::-1], 40, None, 3)
    assert not computed  # read back in any order, not recomputed
    for a, b, ta, tb in zip(first, again[::-1], first_teachers, again_teachers[::-1]):
        assert torch.equal(a, b) and torch.equal(ta.token_ids, tb.token_ids) and torch.equal(ta.log_probs, tb.log_probs)
    # More records: only the new ones are computed, and they equal a pass over all of them.
    more, more_teachers = features_module.cached_target_features(tmp_path, target, [0, 1], examples[2:7], 40, None, 3)
    assert computed == [3] and len(list(tmp_path.glob("features-*.safetensors"))) == 2
    fresh, fresh_teachers = target_features(target, [0, 1], examples[2:7], 40, None, 3)
    for a, b, ta, tb in zip(more, fresh, more_teachers, fresh_teachers):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(ta.log_probs, tb.log_probs)
    # Other layers, teacher or precision: computed afresh, in files of their own.
    computed.clear()
    features_module.cached_target_features(tmp_path, target, [0, 2], chosen, 40, None, 3)
    features_module.cached_target_features(tmp_path, target, [0, 1], chosen, 40, None, 0)
    features_module.cached_target_features(tmp_path, target, [0, 1], chosen, 40, torch.bfloat16, 3)
    assert computed == [4, 4, 4] and len(list(tmp_path.glob("features-*.safetensors"))) == 5
    written[0].write_bytes(written[0].read_bytes()[:100])
    with pytest.raises(CaddtreeError, match="is damaged .*delete it to recompute"):
        features_module.cached_target_features(tmp_path, target, [0, 1], chosen, 40, None, 3)


def test_the_feature_cache_is_written_as_the_pass_goes_and_a_stopped_pass_keeps_what_it_wrote(tiny_data, tmp_path,
                                                                                                   monkeypatch):
    from caddtree.train import features as features_module

    target, examples, _, _ = tiny_data
    chosen = examples[:9]
    lengths = sorted(len(e.token_ids) for e in chosen)
    monkeypatch.setattr(features_module, "CACHE_FILE_TOKENS", sum(lengths[:3]))  # the pass goes shortest first
    yielded = []

    def stopping(*args):
        for item in feature_stream(*args):
            if len(yielded) == 3:
                raise KeyboardInterrupt
            yielded.append(item)
            yield item

    monkeypatch.setattr(features_module, "feature_stream", stopping)
    with pytest.raises(KeyboardInterrupt):
        features_module.cached_target_features(tmp_path, target, [0, 1], chosen, 40, None, 3)
    assert len(list(tmp_path.glob("features-*.safetensors"))) == 1  # the first three records, written before the stop
    computed = []
    monkeypatch.setattr(features_module, "feature_stream", counting_stream(computed))
    features, teachers = features_module.cached_target_features(tmp_path, target, [0, 1], chosen, 40, None, 3)
    assert computed == [6] and len(list(tmp_path.glob("features-*.safetensors"))) > 2
    fresh, fresh_teachers = target_features(target, [0, 1], chosen, 40, None, 3)
    for a, b, ta, tb in zip(features, fresh, teachers, fresh_teachers):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(ta.log_probs, tb.log_probs)


def block_loss(drafter, target, examples, features, anchors, num_blocks, gamma=7.0):
    head = DraftHead(drafter, target.model.get_output_embeddings())
    predictions = predict_blocks(drafter, head, target.model.get_input_embeddings(), [e.token_ids for e in examples],
                                 features, anchors, num_blocks, 30, gamma)
    return draft_vocab_loss(predictions, head)


@pytest.mark.parametrize("draft_vocab", [None, torch.arange(2, 30, 3)])
def test_a_batch_loss_is_the_weighted_mean_of_its_sequences(tiny_data, draft_vocab):
    target, examples, _, _ = tiny_data
    by_length = sorted(examples, key=lambda e: len(e.token_ids))
    chosen = [by_length[-1], by_length[0], by_length[len(by_length) // 2]]
    assert len({len(e.token_ids) for e in chosen}) > 1  # different lengths: padding is exercised
    drafter = random_drafter(target, 1, 6, seed=2, draft_vocab=draft_vocab).float()
    features, _ = target_features(target, drafter.config.target_layer_ids, chosen, batch_tokens=40)
    generator = torch.Generator().manual_seed(9)
    anchors = [sample_anchors(len(e.prompt_ids), len(e.token_ids), 5, generator) for e in chosen]
    with torch.no_grad():
        together = block_loss(drafter, target, chosen, features, anchors, 5)
        singles = [block_loss(drafter, target, [e], [f], [a], 5) for e, f, a in zip(chosen, features, anchors)]
    head = DraftHead(drafter, target.model.get_output_embeddings())
    weights = []
    for e, a in zip(chosen, anchors):
        blocks = pack_blocks(e.token_ids, a, 6, 30, 7.0)
        inside = (blocks.labels != IGNORE) & (head.draft_indices(blocks.labels.clamp(min=0)) >= 0)
        weights.append(blocks.loss_weights[inside].sum())
    expected = sum(loss * weight for loss, weight in zip(singles, weights)) / sum(weights)
    torch.testing.assert_close(together, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("draft_vocab", [None, torch.arange(0, 32, 2)])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_training_and_decoding_see_the_same_block_logits(arch, draft_vocab):
    """The block a training pass scores for an anchor is exactly the decode-time draft at that root."""
    target = tiny_target(arch, vocab_size=32, seed=7)
    drafter = random_drafter(target, 2, 6, seed=4, mask_token_id=30, target_layer_ids=[0, 2, 3],
                             draft_vocab=draft_vocab).float()
    tokens = torch.randint(2, 28, (23,), generator=torch.Generator().manual_seed(1))
    runner = TargetRunner(target, drafter.config.target_layer_ids)
    try:
        features = runner.features_of([tokens])[0]
    finally:
        runner.close()
    anchors = torch.tensor([4, 11, 19])
    head = DraftHead(drafter, target.model.get_output_embeddings())
    with torch.no_grad():
        trained = predict_blocks(drafter, head, target.model.get_input_embeddings(), [tokens], [features],
                                 [anchors], 4, 30, 7.0)
    for block, anchor in enumerate(anchors.tolist()):
        drafts = DraftRunner(drafter, target)
        drafts.extend(features[:anchor], torch.arange(anchor))
        decoded = drafts.draft(tokens[anchor], anchor, min(5, len(tokens) - 1 - anchor))
        in_block = trained.block_ids == block
        torch.testing.assert_close(torch.log_softmax(trained.logits[in_block], dim=-1), decoded, atol=1e-5, rtol=1e-5)
        assert torch.equal(trained.labels[in_block], tokens[anchor + 1 : anchor + 1 + len(decoded)])
    assert decoded.shape[-1] == (32 if draft_vocab is None else len(draft_vocab))


def test_leading_hits_counts_each_blocks_run_of_hits(tiny_data):
    from caddtree.train.evaluation import leading_hits
    from caddtree.train.objective import BlockPredictions

    generator = torch.Generator().manual_seed(5)
    block_ids = torch.arange(6).repeat_interleave(7)
    offsets = torch.arange(1, 8).repeat(6)
    keep = torch.rand(42, generator=generator) < 0.9  # some blocks miss positions (past the sequence end)
    hits = torch.rand(42, generator=generator) < 0.7
    predictions = BlockPredictions(None, None, None, offsets[keep], block_ids[keep], None)
    expected = []
    for block in range(6):
        count = 0
        for offset in range(1, 8):
            at = ((block_ids == block) & (offsets == offset) & keep).nonzero()
            if len(at) == 0 or not hits[at[0, 0]]:
                break
            count += 1
        expected.append(count)
    assert leading_hits(predictions, hits[keep], 6, 8).tolist() == expected


def test_the_held_out_chain_takes_the_rounds_decoding_takes(tiny_data, tmp_path):
    """Walking blocks anchored at every answer position gives, answer by answer, the number of
    rounds that decoding with the DFlash chain takes."""
    from caddtree.decode.engine import Engine
    from caddtree.decode.policy import make_policy
    from caddtree.train.evaluation import chain_rounds

    target, examples, _, prompts = tiny_data
    config = TrainConfig(block_size=6, steps=60, learning_rate=3e-3, warmup_steps=5, anchors_per_sequence=8,
                         eval_every=1000, draft_vocab_size=12)
    drafter = train(target, examples, tmp_path / "drafter", config, []).float()
    answers = generate_examples(target, prompts[:6], tmp_path / "long.jsonl", 40, 6, eos_token_ids(target))
    features, _ = target_features(target, drafter.config.target_layer_ids, answers, None, None, 0)
    head = DraftHead(drafter, target.model.get_output_embeddings())
    rounds = chain_rounds(drafter, head, target.model.get_input_embeddings(), [e.token_ids for e in answers],
                          [len(e.prompt_ids) for e in answers], features, drafter.config.mask_token_id)
    engine = Engine(target, drafter, static_shapes=False)
    decoded = [engine.generate(torch.tensor(e.prompt_ids), make_policy("dflash"), len(e.response_ids))
               for e in answers]
    assert [result.tokens for result in decoded] == [e.response_ids for e in answers]
    assert rounds == [len(result.rounds) for result in decoded]
    assert sum(len(e.response_ids) for e in answers) > 1.5 * (sum(rounds) + len(answers))  # drafts get accepted


def test_feature_dropout_zeroes_a_share_of_the_training_features_only(tiny_data):
    from caddtree.train.loop import _Batches

    _, examples, _, _ = tiny_data
    features = [torch.rand(len(e.token_ids), 40) + 1 for e in examples]
    for dropout in (0.0, 0.3):
        batches = _Batches(examples, features, None, TrainConfig(feature_dropout=dropout, sequences_per_step=24))
        chosen, _, drawn, _ = batches.next()
        kept = torch.cat([d.flatten() for d in drawn]) != 0
        assert abs((1 - kept.float().mean()) - dropout) < 0.03
        for i, d in zip(chosen, drawn):  # the rest scaled to keep the mean
            torch.testing.assert_close(d[d != 0], features[i][d != 0] / (1 - dropout))


def test_a_time_limit_ends_training_and_still_saves(tiny_data, tmp_path):
    target, examples, _, _ = tiny_data
    config = TrainConfig(block_size=6, steps=10**6, max_minutes=0.01, sequences_per_step=2, anchors_per_sequence=4,
                         save_dtype="bfloat16")
    train(target, examples, tmp_path, config, [])
    history = json.loads((tmp_path / "history.json").read_text())
    assert 0 < len(history["steps"]) < 10**6 and history["wall_seconds"] < 30
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(tmp_path / "model.safetensors").values()} == {torch.bfloat16}


# --- batched greedy generation ---------------------------------------------------------------------


def one_at_a_time_greedy(target, prompt, max_new_tokens, eos_ids):
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(target.model(torch.tensor([tokens])).logits[0, -1].argmax())
            tokens.append(token)
            if token in eos_ids:
                break
    return tokens[len(prompt):]


@pytest.mark.parametrize("drop_share", [8, 0])  # 8: finished rows leave at once here; 0: they never do
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_the_batched_loop_equals_one_at_a_time_greedy(arch, drop_share, monkeypatch):
    from caddtree.train import batched_answers
    from caddtree.train.batched_answers import answer_batch

    monkeypatch.setattr(batched_answers, "DROP_SHARE", drop_share)
    target = tiny_target(arch, vocab_size=32, seed=11)
    generator = torch.Generator().manual_seed(2)
    prompts = [torch.randint(2, 28, (int(n),), generator=generator).tolist() for n in (3, 9, 5, 14, 1, 7)]
    free_runs = [one_at_a_time_greedy(target, p, 20, set()) for p in prompts]
    eos_ids = {free_runs[0][4], free_runs[2][11]}  # tokens the target really produces: rows end at different steps
    answers = answer_batch(target, prompts, 20, eos_ids)
    expected = [one_at_a_time_greedy(target, p, 20, eos_ids) for p in prompts]
    assert answers == expected
    lengths = {len(a) for a in answers}
    assert len(lengths) > 1 and 20 in lengths, "rows should finish at different steps and some run to the cap"


def test_sampled_answers_follow_the_targets_tempered_distribution():
    from caddtree.train.batched_answers import answer_batch

    target = tiny_target("llama", vocab_size=32, seed=11)
    prompt, rows, temperature = [5, 9, 3], 6000, 0.7
    answers = answer_batch(target, [prompt] * rows, 2, set(), temperature, torch.Generator().manual_seed(0))

    def tempered(context):
        with torch.no_grad():
            return torch.softmax(target.model(torch.tensor([context])).logits[0, -1] / temperature, dim=-1)

    def frequencies(tokens):
        return torch.bincount(torch.tensor(tokens), minlength=32).double() / len(tokens)

    first = [a[0] for a in answers]
    assert (frequencies(first) - tempered(prompt)).abs().sum() < 0.06  # total variation x 2; ~0.03 expected
    common = max(set(first), key=first.count)  # the second token, given the most frequent first one
    after = [a[1] for a in answers if a[0] == common]
    assert len(after) > 1000 and (frequencies(after) - tempered(prompt + [common])).abs().sum() < 0.12
    assert len(set(first)) > 3, "the tiny target should spread its mass over several tokens"


# --- records from files ------------------------------------------------------------------------------


def write_records(path, lines, gzipped=False):
    import gzip

    text = "".join(line + "\n" for line in lines)
    if gzipped:
        with gzip.open(path, "wt") as handle:
            handle.write(text)
    else:
        path.write_text(text)
    return path


@pytest.mark.parametrize("gzipped", [False, True])
def test_data_files_are_read_gzipped_or_plain(tmp_path, gzipped):
    from caddtree.train.data import read_data_files

    records = [{"prompt_ids": [3, 4], "response_ids": [5, 1]}, {"prompt_ids": [7], "response_ids": [8, 9, 1]}]
    path = write_records(tmp_path / "data.jsonl", [json.dumps(r) for r in records] + [""], gzipped)
    other = write_records(tmp_path / "more.jsonl", [json.dumps(records[0])])
    assert read_data_files([path, other], 32) == [[Example([3, 4], [5, 1]), Example([7], [8, 9, 1])], [Example([3, 4], [5, 1])]]


def test_held_out_records_stay_held_out_when_files_are_added():
    from caddtree.train.data import held_out_last

    # Every prompt twice in the first file, and again in the added one.
    first = [Example([n], [n + 1, 1]) for n in range(2, 30)] + [Example([n], [n + 2, 1]) for n in range(2, 30)]
    added = [Example([n], [n, 1]) for n in range(40, 60)] + [Example([n], [9, 1]) for n in range(2, 30)]
    alone = held_out_last([first], 5, seed=3)
    together = held_out_last([first, added], 5, seed=3)
    assert together[-5:] == alone[-5:]
    held_prompts = {tuple(e.prompt_ids) for e in alone[-5:]}
    for records in (alone, together):
        assert not held_prompts & {tuple(e.prompt_ids) for e in records[:-5]}
    key = lambda e: (e.prompt_ids, e.response_ids)  # noqa: E731
    expected = [e for e in first + added if tuple(e.prompt_ids) not in held_prompts] + alone[-5:]
    assert sorted(together, key=key) == sorted(expected, key=key)  # nothing else lost
    assert sorted(held_out_last([first], 0, seed=3), key=key) == sorted(first, key=key)  # none held out: all kept
    # Leaving out an eval prompt's records must not reshuffle the file into other held-out records.
    excluded = {tuple(alone[0].prompt_ids)}
    without = held_out_last([first, added], 5, seed=3, excluded=excluded)
    assert without[-5:] == alone[-5:]
    assert sorted(without, key=key) == sorted([e for e in together if tuple(e.prompt_ids) not in excluded], key=key)


def test_unseen_prompts_are_the_eval_prompts_and_the_held_out_records_prompts(monkeypatch):
    import caddtree.train.data as data

    monkeypatch.setattr(data, "sharegpt_prompts", lambda limit, seed: ["ab", "c"][:limit])
    monkeypatch.setattr(data, "encode_prompt", lambda target, prompt: torch.tensor([ord(c) for c in prompt]))
    first = [Example([n], [n + 1, 1]) for n in range(2, 30)] + [Example([ord("c")], [5, 1])]
    eval_ids = {(ord("a"), ord("b")), (ord("c"),)}
    held_out = data.held_out_last([first], 5, seed=3, excluded=eval_ids)[-5:]
    assert data.unseen_prompt_ids(None, first, 5, 2, seed=3) == eval_ids | {tuple(e.prompt_ids) for e in held_out}
    assert data.unseen_prompt_ids(None, first, 0, 1, seed=3) == {(ord("a"), ord("b"))}
    assert data.held_out_records(None, first, 5, 2, seed=3) == held_out
    assert data.held_out_records(None, first, 0, 2, seed=3) == []


@pytest.mark.parametrize("line, words", [
    ('{"prompt_ids": [3, 4], "response_ids": [5', "line 2: not valid JSON"),
    ('[3, 4]', "line 2: expected an object with prompt_ids and response_ids"),
    ('{"prompt_ids": [3, 4]}', "line 2: response_ids must be a non-empty list of token ids in [0, 32)"),
    ('{"prompt_ids": [3, 4], "response_ids": []}', "line 2: response_ids must be a non-empty list"),
    ('{"prompt_ids": [3, 40], "response_ids": [5]}', "line 2: prompt_ids must be a non-empty list of token ids in [0, 32)"),
    ('{"prompt_ids": [3, -1], "response_ids": [5]}', "prompt_ids must be"),
    ('{"prompt_ids": [3, 4.0], "response_ids": [5]}', "prompt_ids must be"),
    ('{"prompt_ids": "3 4", "response_ids": [5]}', "prompt_ids must be"),
])
def test_a_malformed_record_is_one_clear_error(tmp_path, line, words):
    from caddtree.errors import CaddtreeError
    from caddtree.train.data import read_data_files

    path = write_records(tmp_path / "bad.jsonl", ['{"prompt_ids": [3], "response_ids": [4]}', line])
    with pytest.raises(CaddtreeError) as caught:
        read_data_files([path], 32)
    assert str(caught.value).startswith(f"{path} line 2: ") and words in str(caught.value)


def test_unreadable_or_empty_data_files_are_errors(tmp_path):
    from caddtree.errors import CaddtreeError
    from caddtree.train.data import read_data_files

    corrupt = tmp_path / "corrupt.jsonl.gz"
    corrupt.write_bytes(b"\x1f\x8b" + b"not really gzip" * 10)
    with pytest.raises(CaddtreeError, match="corrupt.jsonl.gz is unreadable or corrupt"):
        read_data_files([corrupt], 32)
    with pytest.raises(CaddtreeError, match="data file not found"):
        read_data_files([tmp_path / "missing.jsonl"], 32)
    with pytest.raises(CaddtreeError, match="no training records"):
        read_data_files([write_records(tmp_path / "empty.jsonl", [""])], 32)


# --- distillation --------------------------------------------------------------------------------


@pytest.mark.parametrize("draft_vocab", [None, torch.arange(1, 32, 2)])
def test_the_teacher_is_the_targets_own_distribution_before_each_answer_token(tiny_data, draft_vocab):
    from caddtree.train.loop import teacher_rows
    from caddtree.train.objective import distillation_loss

    target, examples, _, _ = tiny_data
    chosen = examples[2:6]
    drafter = random_drafter(target, 1, 6, seed=2, draft_vocab=draft_vocab).float()
    features, teachers = target_features(target, drafter.config.target_layer_ids, chosen, batch_tokens=40,
                                         teacher_top_k=5)
    for example, teacher in zip(chosen, teachers):  # batched and padded above, one at a time here
        with torch.no_grad():
            expected = torch.log_softmax(target.model(example.token_ids[None]).logits[0].float(), -1)
        top = torch.topk(expected[len(example.prompt_ids) - 1 : -1], 5, dim=-1)
        assert torch.equal(teacher.token_ids.long(), top.indices)
        torch.testing.assert_close(teacher.log_probs.float(), top.values, atol=2e-3, rtol=2e-3)

    generator = torch.Generator().manual_seed(3)
    anchors = [sample_anchors(len(e.prompt_ids), len(e.token_ids), 4, generator) for e in chosen]
    head = DraftHead(drafter, target.model.get_output_embeddings())
    with torch.no_grad():
        predictions = predict_blocks(drafter, head, target.model.get_input_embeddings(), [e.token_ids for e in chosen],
                                     features, anchors, 4, 30, 7.0)
        ids, log_probs = teacher_rows(predictions, teachers, [len(e.prompt_ids) for e in chosen], 4)
        # Greedy data: the teacher's first choice is the recorded token at every predicted position.
        assert torch.equal(ids[:, 0].long(), predictions.labels)
        # A one-token teacher is the hard label: the two losses agree.
        torch.testing.assert_close(distillation_loss(predictions, head, ids[:, :1], log_probs[:, :1]),
                                   draft_vocab_loss(predictions, head))


def test_the_repositorys_data_files_read_as_records_within_their_size_limit():
    """Every committed data file is well-formed for `train-drafter --data`, and all of them together stay
    within the 20 MB the repository allows them (the issue's limit)."""
    repo = Path(__file__).resolve().parents[1]
    data_files = sorted((repo / "data").glob("*.jsonl.gz"))
    vocab_size = json.loads((repo / "caddtree/assets/drafter/config.json").read_text())["vocab_size"]
    files = read_data_files(data_files, vocab_size)
    assert data_files and all(files)
    assert sum(path.stat().st_size for path in data_files) <= 20_000_000
