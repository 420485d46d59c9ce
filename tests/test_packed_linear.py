"""Linear layers through oneDNN with packed weights: the same product as F.linear, only where enabled."""

import copy

import pytest
import torch
import torch.nn.functional as F

from caddtree.models import packed_linear


@pytest.mark.parametrize("shape", [(0, 48), (1, 48), (2, 48), (3, 48), (2, 5, 48), (13, 48), (3, 5, 48), (64, 48),
                                   (65, 48), (300, 48)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("onednn", [True, False])
def test_onednn_linear_is_linear(monkeypatch, shape, bias, onednn):
    """With oneDNN and (as on builds without it) with F.linear alone."""
    monkeypatch.setattr(packed_linear, "ONEDNN", packed_linear.ONEDNN and onednn)
    generator = torch.Generator().manual_seed(len(shape) + shape[0])
    rows = torch.randn(*shape, generator=generator)
    weight = torch.randn(37, 48, generator=generator)
    offset = torch.randn(37, generator=generator) if bias else None
    out = packed_linear.onednn_linear(rows, weight, offset)
    assert out.shape == (*shape[:-1], 37) and out.is_contiguous()
    torch.testing.assert_close(out, F.linear(rows, weight, offset), atol=1e-5, rtol=1e-5)


def test_autocast_and_mixed_dtypes_compute_as_f_linear_does():
    generator = torch.Generator().manual_seed(3)
    rows, weight = torch.randn(9, 48, generator=generator), torch.randn(37, 48, generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = packed_linear.onednn_linear(rows, weight)
        assert out.dtype == F.linear(rows, weight).dtype == torch.bfloat16
    with pytest.raises(RuntimeError):  # as F.linear: a float32 weight does not take bfloat16 rows
        packed_linear.onednn_linear(rows.to(torch.bfloat16), weight)


def test_installed_layers_change_only_inside_enabled():
    model = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.ReLU(), torch.nn.Linear(24, 8, bias=False))
    rows = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    stock = model(rows)
    packed_linear.install(model)
    packed_linear.install(model)  # twice is harmless
    assert torch.equal(model(rows), stock)  # outside: F.linear itself, bit for bit
    calls = []
    original = packed_linear.onednn_linear
    packed_linear.onednn_linear = lambda *args: calls.append(1) or original(*args)
    try:
        with torch.no_grad(), packed_linear.enabled():
            torch.testing.assert_close(model(rows), stock, atol=1e-5, rtol=1e-5)
    finally:
        packed_linear.onednn_linear = original
    assert len(calls) == 2


def test_gradients_and_deep_copies_keep_working():
    model = torch.nn.Linear(16, 8)
    packed_linear.install(model)
    rows = torch.randn(2, 16, requires_grad=True)
    with packed_linear.enabled():
        model(rows).sum().backward()  # the gradient path takes F.linear
    assert rows.grad is not None and model.weight.grad is not None
    half = copy.deepcopy(model).to(torch.bfloat16)  # the copy's layers use the copy's weights
    with torch.no_grad(), packed_linear.enabled():
        assert half(rows.detach().to(torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.skipif(not packed_linear.ONEDNN, reason="this PyTorch build has no oneDNN linear")
def test_packed_weights_follow_their_weight():
    """oneDNN's packed copy is made once, made again when the weight changes in place or is
    replaced, and leaves with its weight."""
    generator = torch.Generator().manual_seed(5)
    weight, rows = torch.randn(37, 48, generator=generator), torch.randn(9, 48, generator=generator)
    packed_linear.onednn_linear(rows, weight)
    packed = packed_linear._packed_weights[id(weight)][2]
    packed_linear.onednn_linear(rows, weight)
    assert packed_linear._packed_weights[id(weight)][2] is packed
    weight.mul_(-2)  # in place: a stale copy would give the old product
    torch.testing.assert_close(packed_linear.onednn_linear(rows, weight), F.linear(rows, weight), atol=1e-5, rtol=1e-5)
    layer = torch.nn.Linear(48, 37, bias=False)
    packed_linear.onednn_linear(rows, layer.weight)
    layer.weight.data = weight.clone()  # new storage behind the same parameter
    torch.testing.assert_close(packed_linear.onednn_linear(rows, layer.weight), F.linear(rows, weight),
                               atol=1e-5, rtol=1e-5)
    key = id(weight)
    del weight
    assert key not in packed_linear._packed_weights


@pytest.mark.skipif(not packed_linear.ONEDNN, reason="this PyTorch build has no oneDNN linear")
def test_weights_made_in_inference_mode_are_packed():
    with torch.inference_mode():
        weight, rows = torch.randn(37, 48), torch.randn(6, 48)
        torch.testing.assert_close(packed_linear.onednn_linear(rows, weight), F.linear(rows, weight),
                                   atol=1e-5, rtol=1e-5)


def test_strided_rows_compute_as_f_linear_does():
    generator = torch.Generator().manual_seed(11)
    weight = torch.randn(37, 48, generator=generator)
    for rows in (torch.randn(48, 9, generator=generator).T, torch.randn(9, 96, generator=generator)[:, ::2],
                 torch.randn(3, 9, 48, generator=generator).transpose(0, 1)):
        assert not rows.is_contiguous()
        torch.testing.assert_close(packed_linear.onednn_linear(rows, weight), F.linear(rows, weight),
                                   atol=1e-5, rtol=1e-5)
