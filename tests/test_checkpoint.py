"""Atomic checkpoint writes and safe loading."""
import os
import pickle
import threading

import pytest
import torch
import torchvision

import simxent.checkpoint
from simxent.checkpoint import (CheckpointError, CheckpointWriter, Position, export_torchvision, load_checkpoint,
                                load_encoder, save_checkpoint, trained_so_far)
from simxent.config import ConfigError, OptimConfig, load_config, to_dict
from simxent.models import backbone


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_round_trip_and_no_temporary_files(tmp_path):
    path = tmp_path / "ck" / "last.pt"
    save_checkpoint({"x": torch.arange(3), "meta": {"a": 1}}, path)
    save_checkpoint({"x": torch.arange(4), "meta": {"a": 2}}, path)
    state = load_checkpoint(path)
    assert torch.equal(state["x"], torch.arange(4)) and state["meta"] == {"a": 2} and state["format_version"] == 1
    assert os.listdir(path.parent) == ["last.pt"]


def test_failed_save_keeps_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"x": torch.ones(2)}, path)

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("disk full (simulated)")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint({"x": Unsaveable()}, path)
    assert torch.equal(load_checkpoint(path)["x"], torch.ones(2))
    assert os.listdir(tmp_path) == ["last.pt"]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the raw pickle below: that refusal is the point
def test_a_checkpoint_written_in_the_background_holds_the_state_as_it_was_when_asked(tmp_path, monkeypatch):
    """The steps after a save change weights and optimiser state in place while the writer's thread is still
    serialising: what lands is the state at the save."""
    weights, momentum = torch.arange(4.0), torch.ones(2, 2)
    state = {"encoder": {"w": weights}, "optimizer": {"state": {0: {"momentum": momentum}}, "groups": [(0, 1)]}}
    stepped, real = threading.Event(), save_checkpoint

    def after_the_next_step(state, path):
        assert stepped.wait(timeout=30)
        real(state, path)

    monkeypatch.setattr(simxent.checkpoint, "save_checkpoint", after_the_next_step)
    writer = CheckpointWriter()
    writer.write(state, tmp_path, 7, keep=2, run_id="r")
    weights.add_(100)
    momentum.mul_(3)
    stepped.set()
    writer.wait()
    saved = load_checkpoint(tmp_path / "last.pt")
    assert torch.equal(saved["encoder"]["w"], torch.arange(4.0))
    assert torch.equal(saved["optimizer"]["state"][0]["momentum"], torch.ones(2, 2))
    assert saved["optimizer"]["groups"] == [(0, 1)] and saved["run_id"] == "r"


def test_the_host_copy_keeps_the_layers_versions_a_state_dict_carries(tmp_path):
    """MNASNet (like any module with a _version) refuses a state dict without its _metadata."""
    net = torchvision.models.mnasnet0_5()
    copy = simxent.checkpoint.host_copy({"encoder": net.state_dict()})["encoder"]
    assert copy._metadata == net.state_dict()._metadata
    save_checkpoint({"encoder": copy}, tmp_path / "c.pt")
    torchvision.models.mnasnet0_5().load_state_dict(load_checkpoint(tmp_path / "c.pt")["encoder"])


def full_disk(state, path):
    raise CheckpointError(f"no space left to write checkpoint {path}")


def test_a_failed_write_does_not_hide_the_error_that_ends_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(simxent.checkpoint, "save_checkpoint", full_disk)
    writer = CheckpointWriter()
    writer.write({"x": torch.ones(1)}, tmp_path, 3, keep=2, run_id="r")
    oom = RuntimeError("CUDA out of memory")
    assert writer.exit(type(oom), oom, None) is False  # the out-of-memory error goes on, not the write's
    writer.write({"x": torch.ones(1)}, tmp_path, 4, keep=2, run_id="r")
    with pytest.raises(CheckpointError, match="no space left"):
        writer.exit(None, None, None)


def test_a_failed_background_write_is_raised_once_by_the_next_wait(tmp_path, monkeypatch):
    monkeypatch.setattr(simxent.checkpoint, "save_checkpoint", full_disk)
    writer = CheckpointWriter()
    writer.write({"x": torch.ones(1)}, tmp_path, 3, keep=2, run_id="r")
    with pytest.raises(CheckpointError, match="step-"):
        writer.wait()
    writer.wait()  # raised once: the run reports it, and the writer is free for the next checkpoint
    assert not (tmp_path / "last.pt").exists()


def test_after_a_failed_write_the_next_checkpoint_is_written_before_the_error_stops_the_run(tmp_path, monkeypatch):
    """A write that failed once (a network mount's hiccup): the run stops at its next checkpoint, as before,
    but with that checkpoint written, so the steps trained between the two are not lost."""
    real, calls = save_checkpoint, []

    def fails_once(state, path):
        calls.append(path)
        if len(calls) == 1:
            raise OSError(5, "Input/output error", str(path))
        real(state, path)

    monkeypatch.setattr(simxent.checkpoint, "save_checkpoint", fails_once)
    writer = CheckpointWriter()
    writer.write({"x": torch.ones(1)}, tmp_path, 3, keep=2, run_id="r")
    with pytest.raises(OSError, match="Input/output error"):
        writer.write({"x": torch.full((1,), 4.0)}, tmp_path, 4, keep=2, run_id="r")
    assert load_checkpoint(tmp_path / "last.pt")["x"].item() == 4.0
    assert [p.name for p in tmp_path.glob("step-*.pt")] == ["step-000000004-r.pt"]


def test_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        torch.save({"format_version": 1, "payload": Evil()}, f)
    with pytest.raises(CheckpointError, match="refusing to load .*evil.pt") as refused:
        load_checkpoint(path)
    assert "GLOBAL" in str(refused.value) and ".system" in str(refused.value) and "weights_only" not in str(refused.value)  # no unsafe advice
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError):
        load_checkpoint(raw)


def test_missing_truncated_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "none.pt")
    path = tmp_path / "t.pt"
    save_checkpoint({"x": torch.randn(1000)}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot read|refusing"):
        load_checkpoint(path)
    save_checkpoint({"x": torch.randn(100000)}, path)
    path.write_bytes(path.read_bytes()[:200000])  # cut in its tensor data: torch's paragraph, told in one sentence
    damaged = r"cannot read checkpoint .*t\.pt: .*\(the file is damaged or incomplete\)$"
    with pytest.raises(CheckpointError, match=damaged) as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value) and "If you are seeing this error" not in str(e.value)
    # A flipped byte in the archive's index can fail as text or as a value: a damaged file, so that resuming
    # falls back to an older checkpoint instead of stopping.
    good = tmp_path / "good.pt"
    save_checkpoint({"x": torch.zeros(1)}, good)
    data = good.read_bytes()
    failures = set()
    for i in range(len(data) - 200, len(data)):
        (tmp_path / "flipped.pt").write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:])
        try:
            load_checkpoint(tmp_path / "flipped.pt")
        except CheckpointError:
            failures.add("CheckpointError")
    assert failures == {"CheckpointError"}
    torch.save({"weights": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a simxent checkpoint .*so no run resumes from it"):
        load_checkpoint(tmp_path / "other.pt")
    torch.save({"format_version": 99, "encoder": {}}, tmp_path / "newer.pt")
    with pytest.raises(CheckpointError, match="has checkpoint format 99; .*a newer simxent wrote it, upgrade simxent"):
        load_checkpoint(tmp_path / "newer.pt")
    (tmp_path / "meta.json").write_text('{"not": "weights"}')
    with pytest.raises(CheckpointError, match="meta.json is not a file torch.save wrote"):
        load_checkpoint(tmp_path / "meta.json")


def test_load_encoder_and_torchvision_export(tmp_path):
    cfg = load_config(None, ["model.backbone=resnet18", "model.cifar_stem=false"])
    enc, _ = backbone("resnet18")
    save_checkpoint({"config": to_dict(cfg), "encoder": enc.state_dict()}, tmp_path / "c.pt")
    loaded = load_encoder(tmp_path / "c.pt")
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(loaded(x), enc.eval()(x))
    export_torchvision(tmp_path / "c.pt", tmp_path / "r18.pth")
    net = torchvision.models.resnet18()
    missing, unexpected = net.load_state_dict(torch.load(tmp_path / "r18.pth", weights_only=True), strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected


def optimiser_after_a_step(learn_temperature: bool):
    """An SGD with momentum over a tiny SimCLR, as pretraining builds it, after one step on a fixed batch."""
    from simxent.config import ModelConfig, OptimConfig
    from simxent.loss import Temperature
    from simxent.models import SimCLR
    from simxent.schedule import build_optimizer

    torch.manual_seed(0)
    net = SimCLR(ModelConfig(backbone="convnet", head_hidden=8, head_out=4), 16, Temperature(0.5, learn_temperature))
    opt = build_optimizer(net, OptimConfig(name="sgd"), 0.1, net.temperature, 0.01)
    (net(torch.rand(4, 3, 16, 16)).sum() / net.temperature()).backward()
    opt.step()
    return net, opt


@pytest.mark.parametrize("saved_learnt", [False, True])
def test_an_optimiser_state_without_or_with_a_temperature_group_fits_the_other(saved_learnt):
    """A checkpoint of a fixed temperature (2 groups) resumed with a learnt one (3), and the other way round:
    the SimCLR groups keep their momentum, the temperature's group starts fresh or is dropped."""
    from simxent.checkpoint import fit_temperature_group

    _, saved_opt = optimiser_after_a_step(saved_learnt)
    saved = saved_opt.state_dict()
    net, opt = optimiser_after_a_step(not saved_learnt)
    with pytest.raises(ValueError):
        opt.load_state_dict(saved)  # torch's own refusal
    opt.load_state_dict(fit_temperature_group(saved, opt))
    assert len(opt.param_groups) == 3 - saved_learnt and opt.param_groups[0]["lr"] == 0.1
    for p, q in zip(saved_opt.param_groups[0]["params"], opt.param_groups[0]["params"]):
        torch.testing.assert_close(opt.state[q]["momentum_buffer"], saved_opt.state[p]["momentum_buffer"])
    if not saved_learnt:
        assert opt.param_groups[2]["params"] == [net.temperature.log_t] and opt.param_groups[2]["lr"] == 0.01
        assert net.temperature.log_t not in opt.state


def test_layer_scales_take_no_decay_and_older_checkpoints_keep_each_parameters_state(caplog):
    """A (C, 1, 1) layer scale (ConvNeXt's) and a ViT class token are plain parameters now: under LARS they
    were decayed and stepped by at most lr * eta * ||w||, which held 1e-6 layer scales near 1e-6. A checkpoint
    grouped the older way (every tensor of at most one dimension plain) resumes with each parameter's own
    momentum, wherever its group is now."""
    import logging
    from simxent.checkpoint import fit_optimizer
    from simxent.schedule import LARS, build_optimizer, param_groups

    net = torch.nn.Module()
    net.conv = torch.nn.Conv2d(3, 4, 3)
    net.layer_scale = torch.nn.Parameter(torch.full((4, 1, 1), 1e-6))
    net.class_token = torch.nn.Parameter(torch.zeros(1, 1, 4))
    net.fc = torch.nn.Linear(4, 2)
    decay, plain = param_groups(net, 1e-4)
    assert [id(p) for p in decay["params"]] == [id(net.conv.weight), id(net.fc.weight)]
    older = LARS([{"params": [p for p in net.parameters() if p.ndim > 1], "weight_decay": 1e-4, "lars": True},
                  {"params": [p for p in net.parameters() if p.ndim <= 1], "weight_decay": 0.0, "lars": False}],
                 lr=0.1)
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    older.step()
    saved = older.state_dict()
    ours = build_optimizer(net, OptimConfig(name="lars"), 0.1)
    with caplog.at_level(logging.INFO, logger="simxent"):
        ours.load_state_dict(fit_optimizer(saved, ours, net))
    assert "regrouped" in caplog.text
    for p in net.parameters():
        torch.testing.assert_close(ours.state[p]["momentum"], older.state[p]["momentum"])


def test_an_unfused_optimiser_state_resumes_fused_and_steps_under_a_grad_scaler():
    """A checkpoint written before the optimisers were fused (AdamW's groups saved with fused=None) loads
    fused, keeps its moments, and takes a step through a grad scaler, which hands a fused-capable optimiser
    its scale: the unfused step refuses that."""
    from simxent.checkpoint import fit_optimizer
    from simxent.config import ModelConfig, OptimConfig
    from simxent.models import SimCLR
    from simxent.schedule import build_optimizer

    torch.manual_seed(0)
    net = SimCLR(ModelConfig(backbone="convnet", head_hidden=8, head_out=4), 16)
    opt = build_optimizer(net, OptimConfig(name="adamw"), 0.1)
    net(torch.rand(4, 3, 16, 16)).sum().backward()
    opt.step()
    saved = opt.state_dict()
    saved["param_groups"] = [{**g, "fused": None, "foreach": None} for g in saved["param_groups"]]
    moments = [opt.state[p]["exp_avg"].clone() for p in net.parameters()]
    opt = build_optimizer(net, OptimConfig(name="adamw"), 0.1)
    opt.load_state_dict(fit_optimizer(saved, opt))
    assert all(g["fused"] for g in opt.param_groups)
    for p, m in zip(net.parameters(), moments):
        torch.testing.assert_close(opt.state[p]["exp_avg"], m)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(net(torch.rand(4, 3, 16, 16)).sum()).backward()
    scaler.step(opt)
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_a_fixed_temperature_run_resumes_with_a_learnt_one(tmp_path):
    """The real loop: one epoch at a fixed temperature, then resumed with loss.learn_temperature=true, whose
    temperature moves from 0.5 while the position carries on."""
    from simxent.demo import make_shapes
    from simxent.train import pretrain
    from tests.conftest import TINY_RUN

    shapes = make_shapes(tmp_path / "shapes", train_per_class=8, test_per_class=2, size=16)
    args = [*TINY_RUN, f"data.train={shapes / 'train'}", "eval.every=0", "train.precision=fp32", f"out={tmp_path / 'run'}"]
    pretrain(load_config(None, [*args, "train.epochs=1"]), progress=False)
    summary = pretrain(load_config(None, [*args, "train.epochs=2", "loss.learn_temperature=true",
                                          "loss.temperature_lr=0.1", "train.resume=auto"]), progress=False)
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert summary["global_step"] == 2 * (40 // 16) and len(state["optimizer"]["param_groups"]) == 3
    assert state["temperature"]["log_t"].exp().item() != pytest.approx(0.5, abs=1e-6)


def test_a_resumed_run_trains_with_its_own_settings_not_the_checkpoints(tmp_path, caplog):
    """Resumed with another weight decay, momentum and fixed temperature: the optimiser's groups and the
    temperature are this run's (as its config.yaml says), its moments the checkpoint's, and the log names
    each change."""
    from simxent.demo import make_shapes
    from simxent.train import pretrain
    from tests.conftest import TINY_RUN

    shapes = make_shapes(tmp_path / "shapes", train_per_class=8, test_per_class=2, size=16)
    args = [*TINY_RUN, f"data.train={shapes / 'train'}", "eval.every=0", "train.precision=fp32", f"out={tmp_path / 'run'}"]
    pretrain(load_config(None, [*args, "train.epochs=1", "optim.weight_decay=1e-6", "loss.temperature=0.5"]),
             progress=False)
    first = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    with caplog.at_level("INFO", logger="simxent"):
        pretrain(load_config(None, [*args, "train.epochs=2", "optim.weight_decay=0.01", "optim.momentum=0.5",
                                    "loss.temperature=0.2", "train.bn_recalibration=64", "train.resume=auto"]),
             progress=False)
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    groups = state["optimizer"]["param_groups"]
    assert sorted({g["weight_decay"] for g in groups}) == [0.0, 0.01]  # norms and biases never decay
    assert {g["momentum"] for g in groups} == {0.5}
    assert state["temperature"]["log_t"].exp().item() == pytest.approx(0.2, rel=1e-6)
    assert first["temperature"]["log_t"].exp().item() == pytest.approx(0.5, rel=1e-6)
    assert state["optimizer"]["state"].keys() == first["optimizer"]["state"].keys()  # momentum buffers carried on
    assert "resumed with optim.weight_decay=0.01 (the checkpoint's run had 1e-06)" in caplog.text
    assert not any(r.getMessage().startswith("resumed with train.resume") for r in caplog.records)
    levels = {r.getMessage().split("=")[0]: r.levelname for r in caplog.records
              if r.getMessage().startswith("resumed with")}
    assert levels == {"resumed with optim.weight_decay": "WARNING", "resumed with optim.momentum": "WARNING",
                      "resumed with loss.temperature": "WARNING", "resumed with train.epochs": "INFO",
                      "resumed with train.bn_recalibration": "WARNING"}  # the run's end, its weights, differ


def test_a_setting_newer_than_the_checkpoint_is_compared_with_its_default():
    """A checkpoint written before a key existed (its saved config lacks loss.multi_view) was trained as the
    key's default does: resuming it with another value is a change to report, with the default as the
    checkpoint's; resuming it with the default is none."""
    from simxent.checkpoint import changed_settings
    from simxent.config import flatten, to_dict

    old = to_dict(load_config(None, ["augment.small_views=2"]))
    del old["loss"]["multi_view"]
    assert "loss.multi_view" not in flatten(old)
    state = {"config": old}
    assert changed_settings(state, load_config(None, ["augment.small_views=2", "loss.multi_view=pairs"])) == [
        ("loss.multi_view", "joint", "pairs")]
    assert changed_settings(state, load_config(None, ["augment.small_views=2"])) == []
    assert changed_settings({}, load_config(None, ["augment.small_views=2", "loss.multi_view=pairs"])) == []


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory):
    """A finished one-epoch run (SGD, as TINY_RUN trains) and the settings that made it."""
    from simxent.demo import make_shapes
    from simxent.train import pretrain
    from tests.conftest import TINY_RUN

    root = tmp_path_factory.mktemp("resumable")
    shapes = make_shapes(root / "shapes", train_per_class=8, test_per_class=2, size=16)
    args = [*TINY_RUN, f"data.train={shapes / 'train'}", "eval.every=0", "train.precision=fp32"]
    pretrain(load_config(None, [*args, "train.epochs=1", f"out={root / 'run'}"]), progress=False)
    return root / "run" / "checkpoints" / "last.pt", args


@pytest.mark.parametrize("optimiser", ["adamw", "lars"])
def test_resuming_with_another_optimiser_is_refused_naming_both(one_epoch_run, tmp_path, optimiser):
    """SGD's checkpoint resumed with LARS went on silently with its buffers read as LARS's (and AdamW with
    SGD's momentum buffers failed on a missing 'step'): both are refused, naming the key and the way on."""
    from simxent.train import pretrain

    last, args = one_epoch_run
    cfg = load_config(None, [*args, "train.epochs=2", f"optim.name={optimiser}", f"train.resume={last}",
                             f"out={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=f'trained with optim.name="sgd", this run has "{optimiser}"; to go on '
                                          f"from its encoder with {optimiser}, start a new run with model.weights="):
        pretrain(cfg, progress=False)


@pytest.mark.parametrize("damage", ["no rng", "position of two keys", "config None", "progress text", "no head",
                                    "optimizer without groups"])
def test_a_damaged_training_checkpoint_is_refused_naming_the_file_and_the_entry(one_epoch_run, tmp_path, damage):
    """Each used to stop the resume with a bare KeyError, AttributeError or ValueError naming neither (and a
    position missing its step was taken as step 0)."""
    from simxent.train import pretrain

    last, args = one_epoch_run
    state = load_checkpoint(last)
    entry = {"no rng": "rng", "position of two keys": "position", "config None": "config",
             "progress text": "progress", "no head": "head", "optimizer without groups": "optimizer"}[damage]
    state = {k: v for k, v in state.items() if k != entry} if damage.startswith("no ") else state
    state.update({"position of two keys": {"position": {"epoch": 1, "global_step": 2}}, "config None": {"config": None},
                  "progress text": {"progress": "x"},
                  "optimizer without groups": {"optimizer": {"state": {}}}}.get(damage, {}))
    damaged = tmp_path / "damaged.pt"
    save_checkpoint({k: v for k, v in state.items() if k != "format_version"}, damaged)
    cfg = load_config(None, [*args, "train.epochs=2", f"train.resume={damaged}", f"out={tmp_path / 'run'}"])
    with pytest.raises(CheckpointError, match=f"train.resume: {damaged} has no valid {entry} "):
        pretrain(cfg, progress=False)


def test_an_fp16_run_resumes_a_checkpoint_written_without_a_grad_scaler(tmp_path):
    """bf16 and fp32 runs save the disabled scaler's empty state, which an enabled one refuses to load
    (train.precision=auto gives fp16 on an older GPU): the resumed fp16 run starts its scaler fresh."""
    from simxent.checkpoint import restore_training
    from simxent.demo import make_shapes
    from simxent.schedule import build_optimizer
    from simxent.train import build_model, pretrain
    from tests.test_reliability import tiny

    shapes = make_shapes(tmp_path / "shapes", train_per_class=16, test_per_class=4, size=16)
    run = tmp_path / "run"
    pretrain(load_config(None, tiny(shapes, run, "train.epochs=1")), progress=False)
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["scaler"] == {}
    cfg = load_config(None, tiny(shapes, run, "train.epochs=2"))
    net, _ = build_model(cfg, torch.device("cpu"), 1)
    optimizer = build_optimizer(net, cfg.optim, 0.1, net.temperature, cfg.loss.temperature_lr)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    pos = restore_training(run / "checkpoints" / "last.pt", state, net, optimizer, scaler, 0, 16)
    assert pos.global_step == 5 and scaler.get_scale() == torch.amp.GradScaler("cpu").get_scale()
    torch.testing.assert_close(net.encoder.state_dict(), state["encoder"], rtol=0, atol=0)


def test_rng_states_held_on_another_device_are_restored_from_the_cpu():
    """A checkpoint loaded onto a GPU (map_location) holds its RNG states there, and torch sets them from CPU
    byte tensors only: each is brought to the CPU first (here a stand-in with .cpu(), as no GPU is at hand)."""
    from simxent.checkpoint import set_rng_state

    class OnDevice:
        def __init__(self, tensor):
            self.tensor = tensor

        def cpu(self):
            return self.tensor

    torch.manual_seed(7)
    saved = torch.get_rng_state()
    expected = torch.rand(3)
    torch.manual_seed(0)
    set_rng_state({"torch": OnDevice(saved)}, torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected)


def test_a_gpu_rng_state_is_restored_onto_the_process_gpu_whatever_gpus_it_sees(monkeypatch):
    """A process keeps its own GPU's RNG state and restores it onto the GPU it runs on now. Older checkpoints
    hold every visible GPU's state: the process takes its own by index, and a process that now sees fewer
    GPUs (one per task under SLURM) resumes instead of failing with torch's IndexError (torch.cuda stands
    in for a GPU here)."""
    from simxent.checkpoint import rng_state, set_rng_state
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: torch.tensor([device.index], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state.tolist(), device)))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("every GPU's state restored"))
    cpu, gpu1 = torch.get_rng_state(), torch.device("cuda", 1)
    saved = rng_state(gpu1)
    assert saved["cuda"].tolist() == [1] and "cuda" not in rng_state(torch.device("cpu"))
    set_rng_state(saved, torch.device("cuda", 0))  # resumed on another GPU: its own stream goes with it
    older = [torch.tensor([i], dtype=torch.uint8) for i in range(4)]
    set_rng_state({"torch": cpu, "cuda": older}, gpu1)
    set_rng_state({"torch": cpu, "cuda": older[:1]}, gpu1)  # sees one GPU now: nothing of its own to restore
    assert restored == [([1], torch.device("cuda", 0)), ([1], gpu1)]


def test_the_resume_line_counts_whole_epochs_and_steps_in_words():
    said = {(e, s): trained_so_far(Position(epoch=e, step=s, global_step=10 * e + s), 16)
            for e, s in ((0, 1), (0, 9), (1, 0), (2, 0), (1, 1), (3, 7))}
    assert said == {(0, 1): "1 step of 16 images of the first epoch", (0, 9): "9 steps of 16 images of the first epoch",
                    (1, 0): "1 whole epoch", (2, 0): "2 whole epochs",
                    (1, 1): "1 whole epoch and 1 step of 16 images of the next",
                    (3, 7): "3 whole epochs and 7 steps of 16 images of the next"}
