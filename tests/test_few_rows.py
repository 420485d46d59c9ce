"""The few-row dispatch of linear layers: the same product as F.linear, only where it is enabled."""

import copy

import pytest
import torch
import torch.nn.functional as F

from caddtree.models import few_rows


@pytest.mark.parametrize("shape", [(1, 48), (2, 48), (3, 48), (2, 5, 48), (13, 48), (3, 5, 48), (64, 48), (65, 48), (300, 48)])
@pytest.mark.parametrize("bias", [False, True])
def test_rows_times_weight_is_linear(shape, bias):
    generator = torch.Generator().manual_seed(len(shape) + shape[0])
    rows = torch.randn(*shape, generator=generator)
    weight = torch.randn(37, 48, generator=generator)
    offset = torch.randn(37, generator=generator) if bias else None
    out = few_rows.rows_times_weight(rows, weight, offset)
    assert out.shape == (*shape[:-1], 37) and out.is_contiguous()
    torch.testing.assert_close(out, F.linear(rows, weight, offset), atol=1e-5, rtol=1e-5)


def test_gemm_rows_pads_only_beyond_eight_rows_to_the_next_multiple_of_eight():
    for count in range(1, 70):
        padded = few_rows.gemm_rows(count)
        if count == 1:
            assert padded == 2
        elif count <= 8:
            assert padded == count
        else:
            assert padded % 8 == 0 and count <= padded < count + 8


def test_installed_layers_change_only_inside_enabled():
    model = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.ReLU(), torch.nn.Linear(24, 8, bias=False))
    rows = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    stock = model(rows)
    few_rows.install(model)
    few_rows.install(model)  # twice is harmless
    assert torch.equal(model(rows), stock)  # outside: F.linear itself, bit for bit
    calls = []
    original = few_rows.rows_times_weight
    few_rows.rows_times_weight = lambda *args: calls.append(1) or original(*args)
    try:
        with torch.no_grad(), few_rows.enabled():
            torch.testing.assert_close(model(rows), stock, atol=1e-5, rtol=1e-5)
    finally:
        few_rows.rows_times_weight = original
    assert len(calls) == 2


def test_gradients_and_deep_copies_keep_working():
    model = torch.nn.Linear(16, 8)
    few_rows.install(model)
    rows = torch.randn(2, 16, requires_grad=True)
    with few_rows.enabled():
        model(rows).sum().backward()  # the gradient path takes F.linear
    assert rows.grad is not None and model.weight.grad is not None
    half = copy.deepcopy(model).to(torch.bfloat16)  # the copy's layers use the copy's weights
    with torch.no_grad(), few_rows.enabled():
        assert half(rows.detach().to(torch.bfloat16)).dtype == torch.bfloat16
