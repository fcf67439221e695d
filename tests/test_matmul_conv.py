"""Convolutions as matrix products (simxent.matmul_conv) against torch's own convolution.

The reference is ``F.conv2d`` and its autograd in float64, where both are exact to rounding; under bf16
autocast the module is compared with ``nn.Conv2d`` under the same autocast, to bf16's precision, and in
float32 with ``nn.Conv2d`` in float32.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

from simxent.config import ModelConfig
from simxent.matmul_conv import MAX_POSITIONS, Conv2d, conv2d_as_matmul
from simxent.models import SimCLR


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 5), o=st.integers(1, 6), h=st.integers(1, 9), w=st.integers(1, 9),
       k=st.sampled_from([1, 3]), stride=st.integers(1, 3), padding=st.integers(0, 2), seed=st.integers(0, 99))
def test_values_and_gradients_equal_conv2d_in_float64(n, c, o, h, w, k, stride, padding, seed):
    if h + 2 * padding < k or w + 2 * padding < k:
        return
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(o, c, k, k, dtype=torch.float64, generator=g, requires_grad=True)
    want = F.conv2d(x, weight, stride=stride, padding=padding)
    got = conv2d_as_matmul(x, weight, stride, padding)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    grad_y = torch.randn(want.shape, dtype=torch.float64, generator=g)
    want_grads = torch.autograd.grad(want, (x, weight), grad_y)
    got_grads = torch.autograd.grad(got, (x, weight), grad_y)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_gradcheck():
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: conv2d_as_matmul(a, b, 2, 1), (x, weight))


def _pair(c_in, c_out, stride, bias=False):
    torch.manual_seed(0)
    ref = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)
    ours = Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("size, stride", [(6, 2), (3, 2), (4, 1)])
def test_small_maps_under_bf16_autocast_match_nn_conv2d(size, stride, monkeypatch):
    calls = []
    original = Conv2d.uses_matmul
    monkeypatch.setattr(Conv2d, "uses_matmul", lambda self, x: calls.append(original(self, x)) or calls[-1])
    ref, ours = _pair(64, 96, stride)
    x = torch.randn(8, 64, size, size).to(memory_format=torch.channels_last)
    outs, grads = [], []
    for net in (ref, ours):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", torch.bfloat16):
            y = net(xi)
        outs.append(y)
        y.float().square().sum().backward()
        grads.append((xi.grad, net.weight.grad))
    assert calls == [True]
    assert outs[1].dtype == outs[0].dtype == torch.bfloat16
    assert outs[1].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(outs[1].float(), outs[0].float(), rtol=2e-2, atol=2e-2)
    for got, want in zip(grads[1], grads[0]):
        assert got.dtype == want.dtype
        assert (got - want).norm() <= 2e-2 * want.norm()


@pytest.mark.parametrize("size, stride", [(6, 2), (3, 2), (3, 1)])
def test_small_maps_in_float32_match_nn_conv2d(size, stride):
    """Without autocast, float32 maps of up to 3 x 3 outputs take the products in float32: output and
    gradients as nn.Conv2d's to float32 rounding."""
    ref, ours = _pair(64, 96, stride)
    x = torch.randn(8, 64, size, size).to(memory_format=torch.channels_last)
    assert ours.uses_matmul(x)
    outs, grads = [], []
    for net in (ref, ours):
        xi = x.clone().requires_grad_()
        y = net(xi)
        outs.append(y)
        y.square().sum().backward()
        grads.append((xi.grad, net.weight.grad))
    assert outs[1].dtype == torch.float32 and outs[1].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_contiguous_input_gets_a_contiguous_output_as_nn_conv2d_gives():
    ref, ours = _pair(16, 32, 2)
    x = torch.randn(4, 16, 8, 8)
    with torch.autocast("cpu", torch.bfloat16):
        assert ours.uses_matmul(x)
        got, want = ours(x), ref(x)
    assert got.is_contiguous() and want.is_contiguous()
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_used_only_where_it_was_measured_faster(dtype):
    """Matrix products in CPU training, under bf16 autocast or in float32, on outputs of 1 to
    MAX_POSITIONS[dtype] positions; nn.Conv2d elsewhere (larger outputs, inference, fp16, float64)."""
    _, conv = _pair(8, 8, 2)
    side = math.isqrt(MAX_POSITIONS[dtype])
    assert side * side == MAX_POSITIONS[dtype]
    small, large = torch.randn(1, 8, 2 * side, 2 * side), torch.randn(1, 8, 2 * side + 2, 2 * side + 2)
    with torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16):
        assert conv.uses_matmul(small)
        assert not conv.uses_matmul(large)
        with torch.no_grad():  # inference: oneDNN's forward was as fast or faster
            assert not conv.uses_matmul(small)
    with torch.autocast("cpu", torch.float16):
        assert not conv.uses_matmul(small)
    assert not conv.uses_matmul(small.bfloat16())  # bf16 input without autocast: nn.Conv2d's dtype error
    assert not conv.bfloat16().uses_matmul(small.bfloat16())  # bf16 weights without autocast: not measured
    assert not conv.double().uses_matmul(small.double())


# Layers and inputs the products do not cover: each must fall back to nn.Conv2d's own forward.
FALLBACKS = {
    "bias": (dict(bias=True), (2, 8, 4, 4)),
    "groups": (dict(groups=2), (2, 8, 4, 4)),
    "dilation": (dict(dilation=2, padding=2), (2, 8, 4, 4)),
    "string padding": (dict(padding="same", stride=1), (2, 8, 4, 4)),
    "rectangular kernel": (dict(kernel_size=(3, 1), padding=(1, 0)), (2, 8, 4, 4)),
    "reflect padding": (dict(padding_mode="reflect"), (2, 8, 4, 4)),
    "unbatched": ({}, (8, 4, 4)),
    "float64": ({}, (2, 8, 4, 4)),
    "input smaller than the kernel": (dict(padding=0), (2, 8, 2, 2)),
}


@pytest.mark.parametrize("case", FALLBACKS)
def test_uncovered_layers_and_inputs_fall_back_to_nn_conv2d(case):
    changes, shape = FALLBACKS[case]
    settings = dict(in_channels=8, out_channels=8, kernel_size=3, stride=2, padding=1, bias=False) | changes
    torch.manual_seed(0)
    ref = nn.Conv2d(**settings)
    ours = Conv2d(**settings)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(shape, dtype=torch.float64 if case == "float64" else torch.float32)
    if case == "float64":
        ref, ours = ref.double(), ours.double()
    with torch.autocast("cpu", torch.bfloat16):
        assert not ours.uses_matmul(x)
        if case == "input smaller than the kernel":
            with pytest.raises(RuntimeError):
                ours(x)
            return
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["convnet", "resnet18"])
def test_model_matmul_convs_swaps_classes_not_parameters(name):
    """model.matmul_convs gives the encoder's plain convolutions the Conv2d class and nothing else: the
    state dict is the one without it (checkpoints load both ways), and in inference (oneDNN's path either
    way) the projections are equal."""
    nets = {}
    for on in (True, False):
        torch.manual_seed(0)
        nets[on] = SimCLR(ModelConfig(backbone=name, cifar_stem=name != "convnet", matmul_convs=on), 32).eval()
    convs = {on: [type(m) for m in net.encoder.modules() if isinstance(m, nn.Conv2d)] for on, net in nets.items()}
    assert convs[True] and set(convs[True]) == {Conv2d} and set(convs[False]) == {nn.Conv2d}
    assert list(nets[True].state_dict()) == list(nets[False].state_dict())
    nets[False].load_state_dict(nets[True].state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(nets[True](x), nets[False](x), rtol=0, atol=0)


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 5e-2), (torch.float32, 1e-4)])
def test_convnet_trains_the_same_with_and_without_matmul_convs(dtype, tol, monkeypatch):
    """One training forward and backward of SimCLR's convnet at the cpu preset's view sizes (24 and 12 px:
    three of its eight convolutions take the products, in bf16 and in float32 alike): projections and
    every gradient as with oneDNN throughout, to the precision's rounding."""
    calls = []
    original = Conv2d.uses_matmul
    monkeypatch.setattr(Conv2d, "uses_matmul", lambda self, x: calls.append(original(self, x)) or calls[-1])
    from simxent.loss import multi_view_nt_xent

    views = [torch.randn(16, 3, 24, 24), torch.randn(16, 3, 12, 12)]
    grads, outs = {}, {}
    for on in (True, False):
        torch.manual_seed(0)
        net = SimCLR(ModelConfig(backbone="convnet", head_hidden=64, head_out=32, matmul_convs=on), 32)
        with torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16):
            z = net(views)
        multi_view_nt_xent(z.float(), 4, 0.1).backward()
        outs[on] = z.float()
        grads[on] = {name: p.grad for name, p in net.named_parameters() if p.grad is not None}
    assert sum(calls) == 3 and len(calls) == 8
    torch.testing.assert_close(outs[True], outs[False], rtol=tol * 0.6, atol=tol * 0.6)
    assert grads[True].keys() == grads[False].keys()
    for name, want in grads[False].items():
        assert (grads[True][name] - want).norm() <= tol * want.norm() + 1e-6, name
