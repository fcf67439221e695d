"""On real photographs: a few minutes of CPU pretraining must beat an untrained encoder (skips without data)."""
import pytest

from simxent.checkpoint import load_checkpoint
from simxent.config import load_config
from simxent.linear_eval import ProbeOptions, linear_eval
from simxent.train import pretrain

MINUTES = 3.5  # of wall time for pretraining, decoding included (the issue allows at most 4)


@pytest.mark.slow
def test_cpu_preset_lifts_knn_on_cifar10(cifar, tmp_path):
    cfg = load_config("configs/cpu.yaml", [f"data.train={cifar / 'train'}", f"out={tmp_path / 'run'}",
                                           f"train.max_time={MINUTES * 60}", "eval.every=0"])
    summary = pretrain(cfg, progress=False)
    assert summary["stopped_by_max_time"] and summary["seconds"] <= 4 * 60
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    assert load_checkpoint(ckpt)["position"]["global_step"] > 50
    results = linear_eval(ckpt, cifar / "train", cifar / "test", ProbeOptions(epochs=1), random_init=True,
                          json_path=tmp_path / "eval.json", progress=False)
    trained, untrained = results["pretrained"]["knn"]["top1"], results["random_init"]["knn"]["top1"]
    print(f"kNN top-1 after {MINUTES} min: {trained:.4f} (random init {untrained:.4f})")
    assert trained >= untrained + 0.05
