"""Learning-rate rule and schedule, parameter groups, and LARS against its formula."""
import math

import pytest
import torch

from simxent.config import OptimConfig
from simxent.models import SimCLR
from simxent.config import ModelConfig
from simxent.schedule import LARS, build_optimizer, lr_at, param_groups, peak_lr


def test_scaling_rules():
    assert peak_lr(OptimConfig(lr=0.3, lr_scaling="linear"), 1024) == pytest.approx(1.2)
    assert peak_lr(OptimConfig(lr=0.3, lr_scaling="sqrt"), 1024) == pytest.approx(0.6)
    assert peak_lr(OptimConfig(lr=0.3, lr_scaling="none"), 1024) == pytest.approx(0.3)


def test_warmup_then_cosine():
    lrs = [lr_at(s, 100, 10, 1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(100, 100, 10, 1.0, min_fraction=0.1) == pytest.approx(0.1)


def test_no_decay_on_bias_and_norm():
    model = SimCLR(ModelConfig(backbone="convnet", head_hidden=16))
    decay, plain = param_groups(model, 1e-4)
    bn_and_bias = {id(p) for m in model.modules() for p in m.parameters(recurse=False)
                   if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)) or p.ndim == 1}
    assert {id(p) for p in plain["params"]} == bn_and_bias
    assert plain["weight_decay"] == 0 and not plain["lars"] and decay["lars"]
    for name in ("sgd", "adamw", "lars"):
        opt = build_optimizer(model, OptimConfig(name=name), 0.1)
        assert [g["weight_decay"] for g in opt.param_groups] == [OptimConfig().weight_decay, 0.0]


def test_lars_step_matches_formula():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3))
    b = torch.nn.Parameter(torch.randn(3))
    grads = [torch.randn(4, 3), torch.randn(3)]
    opt = LARS([{"params": [w], "weight_decay": 0.1, "lars": True},
                {"params": [b], "weight_decay": 0.0, "lars": False}], lr=0.5, momentum=0.9, eta=0.001)
    w0, b0 = w.detach().clone(), b.detach().clone()
    w.grad, b.grad = grads[0].clone(), grads[1].clone()
    opt.step()
    g = grads[0] + 0.1 * w0
    g = g * 0.001 * w0.norm() / g.norm()
    torch.testing.assert_close(w.detach(), w0 - 0.5 * g)
    torch.testing.assert_close(b.detach(), b0 - 0.5 * grads[1])


def test_lars_on_many_tensors_over_steps_matches_a_per_tensor_loop():
    """The foreach update equals the formula applied tensor by tensor, momentum carried over two steps,
    a zero tensor (trust ratio 1) included."""
    g = torch.Generator().manual_seed(1)
    shapes = [(5, 3, 3, 3), (7,), (2, 4), (3,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    with torch.no_grad():
        params[3].zero_()
    ref = [p.detach().clone() for p in params]
    momentum = [torch.zeros_like(p) for p in ref]
    opt = LARS([{"params": params[:3] + params[3:], "weight_decay": 0.01, "lars": True}], lr=0.3, momentum=0.9,
               eta=0.002)
    for _ in range(2):
        grads = [torch.randn(s, generator=g) for s in shapes]
        for p, grad in zip(params, grads):
            p.grad = grad.clone()
        opt.step()
        for i, grad in enumerate(grads):
            step = grad + 0.01 * ref[i]
            if ref[i].norm() > 0 and step.norm() > 0:
                step = step * 0.002 * ref[i].norm() / step.norm()
            momentum[i] = 0.9 * momentum[i] + step
            ref[i] = ref[i] - 0.3 * momentum[i]
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach(), r)
