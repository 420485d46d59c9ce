"""KV buffers against the torch.cat reference, and no reallocation while decoding."""

import pytest
import torch

from caddtree.decode.engine import Engine
from caddtree.decode.policy import make_policy
from caddtree.models import kv_buffer
from caddtree.models.drafter_io import random_drafter
from caddtree.models.kv_buffer import KVBuffer
from tiny import tiny_target


def test_append_keep_and_appended_match_concatenation(monkeypatch):
    monkeypatch.setattr(kv_buffer, "INITIAL_CAPACITY", 4)  # force several growths
    generator = torch.Generator().manual_seed(0)
    buffer, reference = KVBuffer(), torch.zeros(2, 0, 3)
    for step in range(12):
        entries = torch.randn(2, 1 + step % 4, 3, generator=generator)
        reference = torch.cat([reference, entries], dim=-2)
        assert torch.equal(buffer.append(entries), reference)
        if step % 3 == 2:  # compaction: keep a prefix, then some later entries in order
            start = reference.shape[-2] - 3
            positions = torch.tensor([start, start + 2])
            reference = torch.cat([reference[:, :start], reference[:, positions]], dim=-2)
            buffer.keep(start, positions)
            assert torch.equal(buffer.view(), reference)
    block = torch.randn(2, 5, 3, generator=generator)
    with buffer.appended(block) as joined:
        assert torch.equal(joined, torch.cat([reference, block], dim=-2))
    assert torch.equal(buffer.view(), reference)


def test_decoding_writes_into_the_same_buffers_every_round():
    target = tiny_target("llama", vocab_size=32, layers=3)
    engine = Engine(target, random_drafter(target, 1, 6, seed=1))
    engine.eos_ids = set()  # run the full length
    prompt = torch.tensor([1, 5, 7, 9])

    def buffer_addresses():
        target_buffers = [b.data.data_ptr() for layer in engine.verifier.cache.layers for b in (layer._keys, layer._values)]
        drafter_buffers = [b.data.data_ptr() for pair in engine.drafts._context for b in pair]
        return target_buffers + drafter_buffers

    engine.generate(prompt, make_policy("ddtree", 8), 40)
    before = buffer_addresses()
    result = engine.generate(prompt, make_policy("ddtree", 8), 40)
    assert len(result.rounds) > 5 and buffer_addresses() == before


def test_the_fixed_shape_draft_equals_the_plain_one():
    from caddtree.decode.drafting import DraftRunner

    target = tiny_target("qwen3", vocab_size=32, layers=3)
    drafter = random_drafter(target, 2, 6, seed=3)
    features = torch.randn(11, len(drafter.config.target_layer_ids) * target.hidden_size)
    plain, fixed = DraftRunner(drafter, target), DraftRunner(drafter, target, static_shapes=True)
    fixed.reserve(40)
    for runner in (plain, fixed):
        runner.extend(features[:7], torch.arange(7))
    for depth, context in ((5, 7), (3, 11)):  # then four more context tokens
        if context == 11:
            for runner in (plain, fixed):
                runner.extend(features[7:], torch.arange(7, 11))
        root = torch.tensor(4)
        torch.testing.assert_close(fixed.draft(root, context, depth), plain.draft(root, context, depth),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("static_shapes", [False, True])
def test_context_added_in_pieces_between_drafts_equals_it_added_at_once(static_shapes):
    """Features wait for the next draft pass: pieces added over skipped rounds (one row, several
    rows, a draft in between) must all reach the cache, at their own positions."""
    from caddtree.decode.drafting import DraftRunner

    target = tiny_target("qwen3", vocab_size=32, layers=3)
    drafter = random_drafter(target, 2, 6, seed=5)
    features = torch.randn(12, len(drafter.config.target_layer_ids) * target.hidden_size,
                           generator=torch.Generator().manual_seed(1))
    whole, pieces, blank = (DraftRunner(drafter, target, static_shapes) for _ in range(3))
    for runner in (whole, pieces, blank):
        runner.reserve(40)
    whole.extend(features[:5], torch.arange(5))
    pieces.extend(features[:3], torch.arange(3))
    pieces.extend(features[3:5], torch.arange(3, 5))
    root = torch.tensor(7)
    first = whole.draft(root, 5, 4)
    assert not torch.allclose(first, blank.draft(root, 5, 4), atol=1e-3)  # the context is read
    torch.testing.assert_close(pieces.draft(root, 5, 4), first, atol=1e-5, rtol=1e-5)
    whole.extend(features[5:], torch.arange(5, 12))
    for start in range(5, 12):  # seven skipped rounds of one accepted token each
        pieces.extend(features[start : start + 1], torch.tensor([start]))
    torch.testing.assert_close(pieces.draft(root, 12, 4), whole.draft(root, 12, 4), atol=1e-5, rtol=1e-5)
    pieces.extend(features[5:], torch.arange(5, 12))  # pending when the next generation starts
    pieces.reset()
    pieces.extend(features[:5], torch.arange(5))
    torch.testing.assert_close(pieces.draft(root, 5, 4), first, atol=1e-5, rtol=1e-5)


def test_a_fixed_shape_cache_keeps_its_context_when_it_grows():
    from caddtree.models.static_runner import CAPACITY_STEP, StaticTargetRunner

    target = tiny_target("llama", vocab_size=32, layers=2)
    runner = StaticTargetRunner(target, [0], cuda_graphs=False)
    root, depth, sees_itself = torch.tensor([5]), torch.zeros(1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool)
    runner.prefill(torch.tensor([1, 4, 9, 16, 25]))
    before, _ = runner.verify(root, depth, sees_itself)
    runner.keep(torch.zeros(0, dtype=torch.long))
    runner.reserve(3 * CAPACITY_STEP)
    assert runner.capacity == 3 * CAPACITY_STEP and runner.context_len == 5
    after, _ = runner.verify(root, depth, sees_itself)
    torch.testing.assert_close(after, before)


@pytest.mark.parametrize("static_shapes", [False, True])
def test_a_drafter_in_another_precision_drafts_like_it_from_its_own_copy(static_shapes):
    from caddtree.decode.drafting import DraftRunner

    target = tiny_target("qwen3", vocab_size=32, layers=3)
    drafter = random_drafter(target, 2, 6, seed=7)
    features = torch.randn(9, len(drafter.config.target_layer_ids) * target.hidden_size,
                           generator=torch.Generator().manual_seed(2))
    full, half = (DraftRunner(drafter, target, static_shapes, dtype=dtype) for dtype in (None, torch.bfloat16))
    for runner in (full, half):
        runner.reserve(40)
    assert half.dtype == torch.bfloat16 and half.head.weight.dtype == torch.bfloat16
    assert drafter.fc.weight.dtype == torch.float32  # the caller's drafter is left as it was
    for runner in (full, half):
        runner.extend(features, torch.arange(9))
    root = torch.tensor(3)
    exact, rounded = full.draft(root, 9, 5), half.draft(root, 9, 5)
    assert rounded.dtype == torch.float32 and not torch.equal(rounded, exact)
    torch.testing.assert_close(rounded, exact, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("bf16_units, device_dtype, expected", [
    (True, torch.float32, torch.bfloat16), (False, torch.float32, torch.float32), (True, torch.bfloat16, torch.bfloat16)])
def test_the_drafter_drafts_in_bfloat16_only_under_float32_on_a_cpu_with_bfloat16_units(
        monkeypatch, bf16_units, device_dtype, expected):
    from caddtree.decode.drafting import decoding_dtype

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16_units, raising=False)
    target = tiny_target("qwen3", vocab_size=32, layers=3)
    target.model.to(device_dtype)
    assert decoding_dtype(target) == expected


def test_transformers_cache_edits_keep_the_buffered_layer_consistent():
    """Cache.crop / reorder_cache / batch_repeat_interleave / reset, as transformers calls them,
    against the same edits of the plain tensors: `get_seq_length` must follow `keys`."""
    from transformers.cache_utils import DynamicCache

    from caddtree.models.kv_buffer import BufferedCacheLayer

    generator = torch.Generator().manual_seed(0)
    cache = DynamicCache()
    cache.layers = [BufferedCacheLayer() for _ in range(2)]
    keys, values = torch.randn(2, 3, 7, 4, generator=generator), torch.randn(2, 3, 7, 4, generator=generator)
    for layer in range(2):
        cache.update(keys, values, layer)
    cache.crop(-2)
    keys, values = keys[..., :5, :], values[..., :5, :]
    cache.reorder_cache(torch.tensor([1, 0]))
    keys, values = keys[[1, 0]], values[[1, 0]]
    cache.batch_repeat_interleave(2)
    keys, values = keys.repeat_interleave(2, dim=0), values.repeat_interleave(2, dim=0)
    block = torch.randn(4, 3, 1, 4, generator=generator)
    for layer in range(2):
        joined_keys, joined_values = cache.update(block, block, layer)
        assert torch.equal(joined_keys, torch.cat([keys, block], dim=-2))
        assert torch.equal(joined_values, torch.cat([values, block], dim=-2))
    assert cache.get_seq_length() == 6
    with pytest.raises(ValueError, match="negative count"):
        cache.crop(3)
    cache.reset()
    assert cache.get_seq_length() == 0
    assert torch.equal(cache.update(block, block, 0)[0], block)
