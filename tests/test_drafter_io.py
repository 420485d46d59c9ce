"""Drafter checkpoints: the published DFlash layout, round trips, defaults and every load error."""

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from caddtree.decode.drafting import DraftRunner
from caddtree.errors import CaddtreeError
from caddtree.models.drafter import DFlashDrafter, default_target_layer_ids
from caddtree.models.drafter_io import (
    WEIGHTS_FILE,
    config_from_dict,
    load_drafter,
    random_drafter,
    read_config,
    resolve_mask_token,
    save_drafter,
)
from caddtree.models.target import Target, TargetRunner
from tests.tiny import UNUSED_ROWS, tiny_model, tiny_target, tiny_tokenizer

LAYER_SUFFIXES = (
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "self_attn.q_norm.weight",
    "self_attn.k_norm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)


def published_keys(num_layers):
    keys = {"fc.weight", "hidden_norm.weight", "norm.weight"}
    for i in range(num_layers):
        keys.update(f"layers.{i}.{suffix}" for suffix in LAYER_SUFFIXES)
    return keys


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads; on two shared cores torch's pool only slows them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def target():
    return tiny_target("qwen3", layers=6)


@pytest.fixture(scope="module")
def drafter(target):
    return random_drafter(target, num_layers=2, block_size=8, seed=3)


@pytest.fixture
def saved(tmp_path, drafter):
    directory = tmp_path / "drafter"
    save_drafter(drafter, directory)
    return directory


def draft_outputs(drafter, target, prompt=(3, 4, 5, 6, 7)):
    """Drafter log-marginals after a real target prefill (its features at the drafter's layers)."""
    prompt_ids = torch.tensor(prompt)
    runner = TargetRunner(target, drafter.config.target_layer_ids)
    try:
        _, features = runner.prefill(prompt_ids)
    finally:
        runner.close()
    drafts = DraftRunner(drafter, target)
    drafts.extend(features, torch.arange(len(prompt_ids)))
    return drafts.draft(torch.tensor(9), len(prompt_ids), drafter.config.block_size - 1)


# --- round trip and published layout -------------------------------------------------------------


def test_round_trip_keeps_weights_and_drafts(saved, drafter, target):
    loaded = load_drafter(str(saved), target)
    expected, found = drafter.state_dict(), loaded.state_dict()
    assert found.keys() == expected.keys()
    for name in expected:
        assert torch.equal(found[name], expected[name]), name
    # A loaded config also keeps the file's other fields (architectures, model_type) in `extra`.
    assert dataclasses.replace(loaded.config, extra={}) == dataclasses.replace(drafter.config, extra={})
    before = draft_outputs(drafter, target)
    after = draft_outputs(loaded, target)
    assert before.shape == (drafter.config.block_size - 1, 32)
    assert torch.equal(before, after)


def test_round_trip_changes_outputs_when_a_weight_changes(saved, drafter, target):
    """The draft comparison above is sensitive: one perturbed weight changes the drafts."""
    loaded = load_drafter(str(saved), target)
    with torch.no_grad():
        loaded.layers[1].mlp.down_proj.weight.add_(0.05)
    assert not torch.equal(draft_outputs(drafter, target), draft_outputs(loaded, target))


def test_a_feature_cache_beside_the_weights_is_not_read_as_weights(saved, drafter, target):
    from safetensors.torch import save_file

    save_file({"features": torch.zeros(3, 4)}, str(saved / "features-bf16-0123456789ab.safetensors"))
    loaded = load_drafter(str(saved), target)
    assert all(torch.equal(loaded.state_dict()[name], value) for name, value in drafter.state_dict().items())


def test_config_json_has_published_dflash_layout(saved, drafter, target):
    raw = json.loads((saved / "config.json").read_text())
    assert raw["architectures"] == ["DFlashDraftModel"]
    assert raw["model_type"] == "qwen3"
    assert raw["block_size"] == 8
    assert raw["num_target_layers"] == target.num_layers == 6
    assert raw["dflash_config"] == {"target_layer_ids": [1, 3], "mask_token_id": None}
    assert raw["num_hidden_layers"] == 2
    qwen3_attention = target.model.config
    assert raw["hidden_size"] == qwen3_attention.hidden_size
    assert raw["intermediate_size"] == qwen3_attention.intermediate_size
    assert raw["num_attention_heads"] == qwen3_attention.num_attention_heads
    assert raw["num_key_value_heads"] == qwen3_attention.num_key_value_heads
    assert raw["head_dim"] == qwen3_attention.head_dim
    assert raw["rms_norm_eps"] == pytest.approx(qwen3_attention.rms_norm_eps)
    assert isinstance(raw["rope_theta"], float)
    assert raw["vocab_size"] == 32


def test_mask_token_is_written_under_dflash_config(tmp_path, target):
    save_drafter(random_drafter(target, mask_token_id=29), tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["dflash_config"]["mask_token_id"] == 29
    assert "mask_token_id" not in raw  # only inside dflash_config, as published
    assert load_drafter(str(tmp_path), target).config.mask_token_id == 29


def test_safetensors_keys_are_exactly_the_unprefixed_published_ones(saved):
    files = sorted(saved.glob("*.safetensors"))
    assert [file.name for file in files] == [WEIGHTS_FILE]
    with safe_open(str(files[0]), framework="pt") as handle:
        keys = set(handle.keys())
    assert keys == published_keys(2)
    assert not any("embed" in key or "lm_head" in key for key in keys)
    assert not any(key.startswith("model.") for key in keys)


def test_fc_reads_every_target_layer(saved, target):
    weights = load_file(str(saved / WEIGHTS_FILE))
    assert weights["fc.weight"].shape == (target.hidden_size, 2 * target.hidden_size)


# --- default_target_layer_ids ----------------------------------------------------------------------


@pytest.mark.parametrize("num_target_layers", [4, 6, 28, 36])
def test_default_target_layer_ids_one_layer_is_the_middle(num_target_layers):
    assert default_target_layer_ids(1, num_target_layers) == [num_target_layers // 2]


@pytest.mark.parametrize("n, L", [(5, 36), (2, 36), (3, 28), (6, 28), (4, 24), (3, 9), (4, 40), (2, 6)])
def test_default_target_layer_ids_formula(n, L):
    assert default_target_layer_ids(n, L) == [round(1 + i * (L - 4) / (n - 1)) for i in range(n)]


def test_default_target_layer_ids_published_examples():
    assert default_target_layer_ids(5, 36) == [1, 9, 17, 25, 33]
    assert default_target_layer_ids(6, 28) == [1, 6, 11, 15, 20, 25]  # steps of 4.8, rounded
    assert default_target_layer_ids(4, 24) == [1, 8, 14, 21]


def minimal_config(**changes):
    raw = {
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 5,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "num_target_layers": 36,
        "block_size": 16,
        "dflash_config": {"mask_token_id": 7},
    }
    raw.update(changes)
    return raw


def test_config_without_target_layer_ids_uses_the_default(tmp_path):
    config = config_from_dict(minimal_config(), "test")
    assert config.target_layer_ids == [1, 9, 17, 25, 33]
    assert config.num_target_layers == 36
    assert config.mask_token_id == 7
    (tmp_path / "config.json").write_text(json.dumps(minimal_config(dflash_config=None)))
    from_file = read_config(tmp_path)
    assert from_file.target_layer_ids == [1, 9, 17, 25, 33]
    assert from_file.mask_token_id is None


def test_config_target_layer_ids_win_over_the_default():
    config = config_from_dict(minimal_config(dflash_config={"target_layer_ids": [2, 4, 6, 8, 10]}), "test")
    assert config.target_layer_ids == [2, 4, 6, 8, 10]


def test_config_without_layer_ids_or_layer_count_is_an_error():
    raw = minimal_config()
    del raw["num_target_layers"]
    with pytest.raises(CaddtreeError, match="neither target_layer_ids nor num_target_layers"):
        config_from_dict(raw, "test")


# --- resolve_mask_token --------------------------------------------------------------------------


def test_mask_token_from_config(target, drafter):
    config = dataclasses.replace(drafter.config, mask_token_id=5)
    assert resolve_mask_token(config, target) == 5


def test_mask_token_defaults_to_first_unused_embedding_row(target, drafter):
    assert drafter.config.mask_token_id is None
    assert len(target.tokenizer) == 32 - UNUSED_ROWS
    assert resolve_mask_token(drafter.config, target) == len(target.tokenizer) == 28


def test_mask_token_error_when_tokenizer_uses_every_row(drafter):
    rows = 32 - UNUSED_ROWS  # the tokenizer of a 32-row model has exactly this many tokens
    full = Target(tiny_model("qwen3", vocab_size=rows, layers=6), tiny_tokenizer(32), "full")
    assert len(full.tokenizer) == full.model.get_input_embeddings().weight.shape[0]
    with pytest.raises(CaddtreeError, match="mask_token_id"):
        resolve_mask_token(drafter.config, full)
    assert resolve_mask_token(dataclasses.replace(drafter.config, mask_token_id=3), full) == 3


def test_mask_token_outside_embeddings_is_an_error(target, drafter):
    config = dataclasses.replace(drafter.config, mask_token_id=32)
    with pytest.raises(CaddtreeError, match="mask_token_id 32"):
        resolve_mask_token(config, target)


# --- load errors ---------------------------------------------------------------------------------


def load_error(directory, target) -> str:
    with pytest.raises(CaddtreeError) as caught:
        load_drafter(str(directory), target)
    message = str(caught.value)
    assert "\n" not in message
    return message


def edit_config(directory, edit):
    path = directory / "config.json"
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


def edit_weights(directory, edit):
    path = directory / WEIGHTS_FILE
    weights = load_file(str(path))
    edit(weights)
    save_file(weights, str(path))


def test_missing_directory(tmp_path, target):
    message = load_error(tmp_path / "nowhere", target)
    assert "not found" in message and "nowhere" in message


def test_missing_config(saved, target):
    (saved / "config.json").unlink()
    assert "has no config.json" in load_error(saved, target)


def test_config_not_json(saved, target):
    (saved / "config.json").write_text("{not json")
    assert "is not valid JSON" in load_error(saved, target)


def test_config_not_utf8(saved, target):
    (saved / "config.json").write_bytes(b"\xff\xfe\x00garbage")
    assert "is not valid JSON" in load_error(saved, target)


def test_config_not_an_object(saved, target):
    (saved / "config.json").write_text("[1, 2, 3]")
    assert "is not a JSON object" in load_error(saved, target)


def test_config_missing_required_fields(saved, target):
    edit_config(saved, lambda raw: (raw.pop("hidden_size"), raw.pop("num_attention_heads")))
    message = load_error(saved, target)
    assert "lacks" in message and "hidden_size" in message and "num_attention_heads" in message


def test_no_safetensors_file(saved, target):
    (saved / WEIGHTS_FILE).unlink()
    assert "has no .safetensors weights" in load_error(saved, target)


@pytest.mark.parametrize("garbage", [b"garbage bytes, certainly not safetensors" * 4, b"", b"\x10\x00\x00\x00\x00\x00\x00\x00{"])
def test_corrupt_safetensors(saved, target, garbage):
    (saved / WEIGHTS_FILE).write_bytes(garbage)
    message = load_error(saved, target)
    assert "unreadable or corrupt" in message and WEIGHTS_FILE in message


def test_truncated_safetensors(saved, target):
    data = (saved / WEIGHTS_FILE).read_bytes()
    (saved / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    assert "unreadable or corrupt" in load_error(saved, target)


def test_wrong_hidden_size_for_target(tmp_path, drafter, target):
    other = dataclasses.replace(drafter.config, hidden_size=32, head_dim=8, intermediate_size=48)
    save_drafter(DFlashDrafter(other), tmp_path)
    message = load_error(tmp_path, target)
    assert "hidden size 32" in message and "64" in message


def test_target_layer_ids_out_of_range(tmp_path, target):
    deeper = tiny_target("qwen3", layers=12)
    save_drafter(random_drafter(deeper, num_layers=2), tmp_path)  # reads layers [1, 9]
    message = load_error(tmp_path, target)
    assert "target layers [1, 9]" in message and "0..5" in message


def test_negative_target_layer_id(saved, target):
    edit_config(saved, lambda raw: raw["dflash_config"].update(target_layer_ids=[-1, 3]))
    assert "target layers [-1, 3]" in load_error(saved, target)


def test_block_size_too_small(saved, target):
    edit_config(saved, lambda raw: raw.update(block_size=1))
    assert "block_size 1" in load_error(saved, target)


def test_weights_missing_a_key(saved, target):
    edit_weights(saved, lambda weights: weights.pop("layers.1.self_attn.k_norm.weight"))
    message = load_error(saved, target)
    assert "do not match its config" in message and "missing ['layers.1.self_attn.k_norm.weight']" in message


def test_weights_with_an_unexpected_key(saved, target):
    edit_weights(saved, lambda weights: weights.update({"lm_head.weight": torch.zeros(32, 64)}))
    message = load_error(saved, target)
    assert "do not match its config" in message and "unexpected ['lm_head.weight']" in message


def test_weights_with_prefixed_keys_are_rejected(saved, target):
    def prefix(weights):
        for name in list(weights):
            weights["model." + name] = weights.pop(name)

    edit_weights(saved, prefix)
    message = load_error(saved, target)
    assert "missing ['fc.weight'" in message and "unexpected ['model." in message


def test_weights_with_a_wrong_shape(saved, target):
    edit_weights(saved, lambda weights: weights.update({"layers.0.mlp.up_proj.weight": torch.zeros(48, 64)}))
    message = load_error(saved, target)
    assert "layers.0.mlp.up_proj.weight" in message and "(48, 64)" in message and "(96, 64)" in message


def test_config_that_does_not_match_its_weights(saved, target):
    edit_config(saved, lambda raw: raw.update(intermediate_size=128))
    message = load_error(saved, target)
    assert "mlp" in message and "its config implies" in message and "128" in message


# --- draft vocabulary ----------------------------------------------------------------------------

DRAFT_VOCAB = torch.tensor([1, 2, 3, 5, 8, 13, 21, 27])


@pytest.fixture
def saved_with_vocab(tmp_path, target):
    directory = tmp_path / "with-vocab"
    save_drafter(random_drafter(target, num_layers=1, block_size=6, seed=5, draft_vocab=DRAFT_VOCAB), directory,
                 torch.bfloat16)
    return directory


def test_draft_vocab_round_trip(saved_with_vocab, target):
    raw = json.loads((saved_with_vocab / "config.json").read_text())
    assert raw["dflash_config"]["draft_vocab_size"] == len(DRAFT_VOCAB)
    stored = load_file(str(saved_with_vocab / WEIGHTS_FILE))["draft_vocab"]
    assert stored.dtype == torch.long and torch.equal(stored, DRAFT_VOCAB)  # not cast with the weights
    loaded = load_drafter(str(saved_with_vocab), target)
    assert torch.equal(loaded.draft_vocab, DRAFT_VOCAB) and loaded.config.draft_vocab_size == len(DRAFT_VOCAB)
    marginals = draft_outputs(loaded, target)
    assert marginals.shape == (5, len(DRAFT_VOCAB))
    torch.testing.assert_close(marginals.exp().sum(-1), torch.ones(5))


def test_a_checkpoint_without_draft_vocab_has_none(saved, target):
    assert "draft_vocab_size" not in json.loads((saved / "config.json").read_text())["dflash_config"]
    assert "draft_vocab" not in load_file(str(saved / WEIGHTS_FILE))
    assert load_drafter(str(saved), target).draft_vocab is None


def test_draft_marginals_are_the_full_marginals_restricted_to_the_vocab(target):
    full = random_drafter(target, num_layers=1, block_size=6, seed=5)
    restricted = random_drafter(target, num_layers=1, block_size=6, seed=5, draft_vocab=DRAFT_VOCAB)
    expected = torch.log_softmax(draft_outputs(full, target)[:, DRAFT_VOCAB], dim=-1)
    torch.testing.assert_close(draft_outputs(restricted, target), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("vocab, words", [
    (torch.tensor([1, 3, 3, 5, 8, 13, 21, 27]), "distinct token ids in increasing order"),
    (torch.tensor([1, 2, 3, 5, 8, 13, 21, 40]), "in [0, 32)"),
    (torch.tensor([1, 2, 3, 5, 8, 13, 21, 27.0]), "dtype torch.float32"),
    (torch.tensor([1, 2, 3]), "draft_vocab"),
])
def test_a_bad_draft_vocab_is_an_error(saved_with_vocab, target, vocab, words):
    edit_weights(saved_with_vocab, lambda weights: weights.update(draft_vocab=vocab))
    assert words in load_error(saved_with_vocab, target)


@pytest.mark.parametrize("size", [0, 2.5, "8"])
def test_a_bad_draft_vocab_size_is_an_error(saved_with_vocab, target, size):
    edit_config(saved_with_vocab, lambda raw: raw["dflash_config"].update(draft_vocab_size=size))
    assert "draft_vocab_size must be a whole number >= 1" in load_error(saved_with_vocab, target)


def test_draft_vocab_without_its_tensor_is_an_error(saved_with_vocab, target):
    edit_weights(saved_with_vocab, lambda weights: weights.pop("draft_vocab"))
    assert "missing ['draft_vocab']" in load_error(saved_with_vocab, target)
