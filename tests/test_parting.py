"""Where a greedy output parts from ar's, and whether rounding explains it (caddtree.decode.parting)."""

import pytest
import torch

from caddtree.decode.parting import ROUNDING, first_parting
from tests.tiny import tiny_target

PROMPT = torch.tensor([3, 7, 5, 9])


@pytest.fixture(scope="module")
def target():
    return tiny_target("llama", vocab_size=32, layers=2)


def next_logits(target, ids):
    """Brute force: the whole sequence through the model, the last position's logits."""
    with torch.inference_mode():
        return target.model(torch.tensor(ids)[None]).logits[0, -1].float()


def test_equal_outputs_do_not_part(target):
    assert first_parting(target, "dflash", PROMPT, [4, 5, 6], [4, 5, 6]) is None


@pytest.mark.parametrize("shared", [0, 2])
def test_a_parting_measures_the_two_tokens_after_the_shared_prefix(target, shared):
    reference = [11, 12, 13, 14][:shared]
    logits = next_logits(target, PROMPT.tolist() + reference)
    ranked = logits.argsort(descending=True).tolist()
    ar_token, worst = ranked[0], ranked[-1]
    parting = first_parting(target, "ddtree", PROMPT, reference + [worst, 2], reference + [ar_token, 3])
    assert (parting.position, parting.token, parting.reference_token) == (shared, worst, ar_token)
    assert parting.margin == pytest.approx(float(logits[ar_token] - logits[worst]), rel=1e-5)
    assert parting.tolerance == pytest.approx(ROUNDING[torch.float32] * float(logits.abs().max()), rel=1e-5)
    assert not parting.near_tie
    assert parting.describe().endswith("this is a bug, please report it") and f"new token {shared}" in parting.describe()


def test_tokens_whose_logits_tie_part_at_a_near_tie():
    target = tiny_target("llama", vocab_size=32, layers=2)
    top = int(next_logits(target, PROMPT.tolist()).argmax())
    twin = (top + 1) % 28
    with torch.no_grad():  # a second output row equal to the top token's: their logits tie exactly
        head = target.model.get_output_embeddings().weight
        head[twin] = head[top]
    parting = first_parting(target, "caddtree", PROMPT, [twin], [top])
    assert parting.margin == 0 and parting.near_tie
    assert "near-tie that float32 rounding decides, not a bug" in parting.describe()


def test_reduced_precision_tolerates_its_coarser_rounding(target):
    half = tiny_target("llama", vocab_size=32, layers=2)
    half.model.to(torch.bfloat16)
    logits = next_logits(half, PROMPT.tolist())
    runner_up, top = logits.topk(2).indices.tolist()[::-1]
    parting = first_parting(half, "caddtree", PROMPT, [runner_up], [top])
    assert parting.tolerance == pytest.approx(ROUNDING[torch.bfloat16] * float(logits.abs().max()))
    assert parting.near_tie == (float(logits[top] - logits[runner_up]) <= parting.tolerance)
    assert ROUNDING[torch.bfloat16] > ROUNDING[torch.float16] > ROUNDING[torch.float32]


def test_an_output_that_stops_where_the_other_goes_on_is_a_bug(target):
    parting = first_parting(target, "lookup", PROMPT, [4, 5], [4, 5, 6])
    assert parting.position == 2 and parting.margin is None and not parting.near_tie
    assert "one output ends where the other goes on" in parting.describe()
