"""Atomic checkpoint writes and safe loading."""
import os
import pickle

import pytest
import torch
import torchvision

from simxent.checkpoint import CheckpointError, export_torchvision, load_checkpoint, load_encoder, save_checkpoint
from simxent.config import load_config, to_dict
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
def test_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        torch.save({"format_version": 1, "payload": Evil()}, f)
    with pytest.raises(CheckpointError, match="refusing to load .*evil.pt"):
        load_checkpoint(path)
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
    torch.save({"weights": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a simxent checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


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
