"""Learning-rate rule and schedule, parameter groups, and LARS against its formula."""
import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from simxent.checkpoint import load_checkpoint
from simxent.config import (LEARNT_TEMPERATURE_RANGE, LossConfig, ModelConfig, OptimConfig, load_config,
                            preset_names)
from simxent.demo import make_shapes
from simxent.loss import Temperature, nt_xent
from simxent.models import SimCLR
from simxent.schedule import LARS, build_optimizer, lr_at, param_groups, peak_lr, set_lr
from simxent.train import pretrain
from tests.conftest import TINY_RUN


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


def reference_steps(name: str, params: list, grads: list, lr: float, wd: list, momentum: float) -> list:
    """Three steps of SGD (momentum, coupled decay) or AdamW (decoupled decay, bias-corrected moments)
    written from their formulas, one tensor at a time."""
    params = [p.detach().clone() for p in params]
    state = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    for t in range(1, 4):
        for i, (w, g) in enumerate(zip(params, grads[t - 1])):
            if name == "sgd":
                g = g + wd[i] * w
                state[0][i] = g if t == 1 else momentum * state[0][i] + g
                w -= lr * state[0][i]
            else:
                state[0][i] = 0.9 * state[0][i] + 0.1 * g
                state[1][i] = 0.999 * state[1][i] + 0.001 * g * g
                m_hat, v_hat = state[0][i] / (1 - 0.9 ** t), state[1][i] / (1 - 0.999 ** t)
                w *= 1 - lr * wd[i]
                w -= lr * m_hat / (v_hat.sqrt() + 1e-8)
    return params


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_fused_optimizers_step_as_their_formulas(name):
    """build_optimizer's fused SGD and AdamW, both SimCLR groups (decay on weights, none on biases and
    norms), three steps in float64 against the formulas."""
    torch.manual_seed(0)
    model = SimCLR(ModelConfig(backbone="convnet", head_hidden=16)).double()
    cfg = OptimConfig(name=name, weight_decay=0.05)
    opt = build_optimizer(model, cfg, 0.01)
    assert all(g["fused"] for g in opt.param_groups)
    params = list(model.parameters())
    wd = [0.05 if p.ndim > 1 else 0.0 for p in params]  # weights decay; biases and norms do not
    grads = [[torch.randn_like(p) for p in params] for _ in range(3)]
    expected = reference_steps(name, params, grads, 0.01, wd, cfg.momentum)
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.clone()
        opt.step()
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["sgd", "adamw", "lars"])
def test_learnt_temperature_has_its_own_group(name):
    """Its own lr, no weight decay, no LARS trust ratio: one step moves log t by exactly -lr * grad."""
    model = SimCLR(ModelConfig(backbone="convnet", head_hidden=16))
    temp = Temperature(0.5, learnable=True)
    opt = build_optimizer(model, OptimConfig(name=name, weight_decay=0.1), 0.3, temp, temperature_lr=0.005)
    *encoder_groups, group = opt.param_groups
    assert group["params"] == [temp.log_t] and group["weight_decay"] == 0 and group["lr"] == 0.005
    assert not group.get("lars") and [g["lr"] for g in encoder_groups] == [0.3, 0.3]
    assert len(build_optimizer(model, OptimConfig(name=name), 0.3, Temperature(0.5), 0.005).param_groups) == 2
    assert set_lr(opt, 0.25, 0.3, 0.005) == pytest.approx(0.075)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.075, 0.075, 0.00125])
    before = temp.log_t.item()
    temp.log_t.grad = torch.tensor(-2.0)
    opt.step()
    # AdamW's first step is lr * sign(grad) (bias-corrected m / sqrt(v)); SGD's and LARS's is lr * grad.
    moved = 0.00125 * (-1.0 if name == "adamw" else -2.0)
    assert temp.log_t.item() == pytest.approx(before - moved, rel=1e-5)


def preset_settings(batch: int) -> dict[tuple[float, float], str]:
    """Every preset's (peak lr under its own scaling rule at the test's batch, temperature), named by one
    preset that has it (cpu and demo share theirs)."""
    settings = {}
    for name in preset_names():
        cfg = load_config(name)
        settings.setdefault((peak_lr(cfg.optim, batch), cfg.loss.temperature), name)
    return settings


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", ["lars", "sgd", "adamw"])
def test_learnt_temperature_stays_in_range_and_the_loss_falls_at_every_presets_lr(name):
    """200 steps of a small encoder on two noisy views of random points, the temperature learnt in its
    group at the default loss.temperature_lr, warm-up and cosine as in training. In the biases' group,
    SGD and LARS at cifar10's and imagenet's rates took t below 0.005 within the run. Here t stays strictly
    inside the range: the group alone keeps it sane, the projection onto the range is only a safety net
    (tested in test_loss)."""
    lo, hi = LEARNT_TEMPERATURE_RANGE
    batch = 32
    for (lr, start), preset in preset_settings(batch).items():
        temperatures, losses = train_with_learnt_temperature(name, lr, start, batch)
        where = f"{name} at {preset}'s lr {lr:.4g}"
        low, high = min(temperatures), max(temperatures)
        assert lo < low and high < hi, f"{where}: t in [{low}, {high}]"
        assert sum(losses[-10:]) < sum(losses[:10]), f"{where}: loss {losses[:10]} ... {losses[-10:]}"


def train_with_learnt_temperature(name: str, lr: float, start: float, batch: int, steps: int = 200, dim: int = 16):
    """The temperature used and the loss at every step of a small MLP trained with NT-Xent on two noisy
    views of 256 fixed random points, through build_optimizer and set_lr as in training (20 warm-up steps)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    points = torch.randn(256, dim, generator=g)
    net = torch.nn.Sequential(torch.nn.Linear(dim, 64), torch.nn.BatchNorm1d(64), torch.nn.ReLU(),
                              torch.nn.Linear(64, 16))
    temp = Temperature(start, learnable=True)
    temperature_lr = LossConfig().temperature_lr
    opt = build_optimizer(net, OptimConfig(name=name, weight_decay=1e-6), lr, temp, temperature_lr)
    temperatures, losses = [], []
    for step in range(steps):
        set_lr(opt, lr_at(step, steps, 20, 1.0), lr, temperature_lr)
        x = points[torch.randint(0, len(points), (batch,), generator=g)]
        views = torch.cat([x + 0.3 * torch.randn(x.shape, generator=g) for _ in range(2)])
        t = temp()
        loss = nt_xent(*net(views).chunk(2), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        temperatures.append(t.item())
        losses.append(loss.item())
    return temperatures, losses


def test_pretraining_gives_the_learnt_temperature_its_own_lr(tmp_path):
    """Through the real run: with loss.temperature_lr=0 the logged t stays at its start while the encoder
    trains at lr 0.1 (in the encoder's groups it would move), and the checkpoint keeps its group."""
    shapes = make_shapes(tmp_path / "shapes", train_per_class=8, test_per_class=2, size=16)
    run = tmp_path / "run"
    pretrain(load_config(None, [*TINY_RUN, f"data.train={shapes / 'train'}", "train.epochs=1", "train.log_every=1",
                                "eval.every=0", "eval.projector=0", f"out={run}", "loss.learn_temperature=true",
                                "loss.temperature=0.3", "loss.temperature_lr=0"]), progress=False)
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    logged = [e.value for e in acc.Scalars("train/temperature")]
    assert len(logged) == 2 and logged == pytest.approx([0.3, 0.3], rel=1e-6)
    assert all(e.value > 0 for e in acc.Scalars("train/lr"))
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    group = state["optimizer"]["param_groups"][-1]
    assert group["temperature"] and group["weight_decay"] == 0 and group["lr"] == 0
    assert state["temperature"]["log_t"].item() == pytest.approx(math.log(0.3))


def test_a_warmup_as_long_as_the_run_is_cut_so_the_lr_peaks_and_decays(tmp_path, caplog):
    """optim.warmup_epochs=10 in a run of 4 epochs of 2 steps: the warm-up would outlast the run (the lr
    ending at 8/80 of its peak, never decayed). It is cut to a tenth of the run, said in a warning, and
    the logged lr follows lr_at with that warm-up: up to the peak in 1 step, then the cosine to 0."""
    shapes = make_shapes(tmp_path / "shapes", train_per_class=8, test_per_class=2, size=16)
    run = tmp_path / "run"
    with caplog.at_level("WARNING", logger="simxent"):
        pretrain(load_config(None, [*TINY_RUN, f"data.train={shapes / 'train'}", "train.epochs=4",
                                    "train.log_every=1", "optim.warmup_epochs=10", "optim.lr_scaling=none",
                                    "eval.every=0", f"out={run}"]), progress=False)
    assert "optim.warmup_epochs=10 is not below train.epochs=4" in caplog.text
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    logged = [e.value for e in acc.Scalars("train/lr")]
    assert logged == pytest.approx([lr_at(s, 8, 1, 0.1) for s in range(8)], rel=1e-5)
    assert logged[0] == pytest.approx(0.1) and logged[-1] < 0.01
