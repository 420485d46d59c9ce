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


@pytest.mark.parametrize("onednn", [True, False])
def test_every_kernel_path_is_linear(monkeypatch, onednn):
    """1-4 rows take weight @ rows^T; 5 or more oneDNN where this build has it, else F.linear."""
    monkeypatch.setattr(few_rows, "ONEDNN", few_rows.ONEDNN and onednn)
    generator = torch.Generator().manual_seed(7)
    weight, offset = torch.randn(37, 48, generator=generator), torch.randn(37, generator=generator)
    for count in range(1, 3 * few_rows.ONEDNN_MIN_ROWS):
        rows = torch.randn(count, 48, generator=generator)
        torch.testing.assert_close(few_rows.rows_times_weight(rows, weight, offset), F.linear(rows, weight, offset),
                                   atol=1e-5, rtol=1e-5)


def test_autocast_and_mixed_dtypes_compute_as_f_linear_does():
    generator = torch.Generator().manual_seed(3)
    rows, weight = torch.randn(9, 48, generator=generator), torch.randn(37, 48, generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = few_rows.rows_times_weight(rows, weight)
        assert out.dtype == F.linear(rows, weight).dtype == torch.bfloat16
    with pytest.raises(RuntimeError):  # as F.linear: a float32 weight does not take bfloat16 rows
        few_rows.rows_times_weight(rows.to(torch.bfloat16), weight)


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


@pytest.mark.skipif(not few_rows.ONEDNN, reason="this PyTorch build has no oneDNN linear")
def test_packed_weights_follow_their_weight():
    """oneDNN's packed copy is made once, made again when the weight changes in place or is
    replaced, and leaves with its weight."""
    generator = torch.Generator().manual_seed(5)
    weight, rows = torch.randn(37, 48, generator=generator), torch.randn(9, 48, generator=generator)
    few_rows.rows_times_weight(rows, weight)
    packed = few_rows._packed_weights[id(weight)][2]
    few_rows.rows_times_weight(rows, weight)
    assert few_rows._packed_weights[id(weight)][2] is packed
    weight.mul_(-2)  # in place: a stale copy would give the old product
    torch.testing.assert_close(few_rows.rows_times_weight(rows, weight), F.linear(rows, weight), atol=1e-5, rtol=1e-5)
    layer = torch.nn.Linear(48, 37, bias=False)
    few_rows.rows_times_weight(rows, layer.weight)
    layer.weight.data = weight.clone()  # new storage behind the same parameter
    torch.testing.assert_close(few_rows.rows_times_weight(rows, layer.weight), F.linear(rows, weight),
                               atol=1e-5, rtol=1e-5)
    key = id(weight)
    del weight
    assert key not in few_rows._packed_weights


@pytest.mark.skipif(not few_rows.ONEDNN, reason="this PyTorch build has no oneDNN linear")
def test_weights_made_in_inference_mode_are_packed():
    with torch.inference_mode():
        weight, rows = torch.randn(37, 48), torch.randn(6, 48)
        torch.testing.assert_close(few_rows.rows_times_weight(rows, weight), F.linear(rows, weight),
                                   atol=1e-5, rtol=1e-5)
