"""On real photographs: a few minutes of CPU pretraining must beat an untrained encoder (skips without data)."""
import pytest

from simxent.checkpoint import load_checkpoint
from simxent.config import load_config
from simxent.linear_eval import ProbeOptions, linear_eval
from simxent.train import pretrain

MINUTES = 1.5  # of wall time for pretraining, decoding included (the issue allows at most 4)


def symlinked_subset(split, out, counts: dict):
    """The first ``counts[c]`` images (by name) of each class folder ``c`` of ``split``, as links under ``out``."""
    for name, n in counts.items():
        (out / name).mkdir(parents=True)
        for f in sorted((split / name).glob("*.jpg"))[:n]:
            (out / name / f.name).symlink_to(f)
    return out


@pytest.mark.slow
def test_cpu_preset_lifts_knn_on_cifar10(cifar, tmp_path):
    """Pretrained on 1,000 training images per class, which are also the kNN bank, and scored on 200 test
    images per class: the whole folder would spend the minutes decoding and extracting features."""
    classes = sorted(p.name for p in (cifar / "train").iterdir() if p.is_dir())
    train, test = (symlinked_subset(cifar / split, tmp_path / split, dict.fromkeys(classes, n))
                   for split, n in (("train", 1000), ("test", 200)))
    cfg = load_config("cpu", [f"data.train={train}", f"out={tmp_path / 'run'}", f"train.max_time={MINUTES * 60}",
                              "eval.every=0", f"data.cache_dir={tmp_path / 'cache'}"])
    summary = pretrain(cfg, progress=False)
    assert summary["stopped_by_max_time"] and summary["seconds"] <= 4 * 60
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    assert load_checkpoint(ckpt)["position"]["global_step"] > 50
    results = linear_eval(ckpt, train, test, ProbeOptions(epochs=1), random_init=True,
                          json_path=tmp_path / "eval.json", progress=False)
    trained, untrained = results["pretrained"]["knn"]["top1"], results["random_init"]["knn"]["top1"]
    print(f"kNN top-1 after {MINUTES} min: {trained:.4f} (random init {untrained:.4f})")
    assert trained >= untrained + 0.05


@pytest.mark.slow
def test_balanced_weights_raise_minority_recall_on_imbalanced_cifar10(cifar, tmp_path):
    """A 400 / 100 / 25 image subset of three CIFAR-10 classes, probed on frozen (untrained) convnet
    features: balanced class weights must raise the recall of the rarest class on the balanced test split."""
    import torch

    from simxent.augment import Normalize
    from simxent.class_weights import class_weights
    from simxent.config import AugmentConfig
    from simxent.data import load_folder
    from simxent.evaluate import classification_report, extract_features, train_linear_probe
    from simxent.models import backbone

    sizes = {"airplane": 400, "automobile": 100, "bird": 25}
    for split, counts in (("train", sizes), ("test", dict.fromkeys(sizes, 300))):
        symlinked_subset(cifar / split, tmp_path / split, counts)
    train, test = (load_folder(tmp_path / s, 32, workers=2, progress=False) for s in ("train", "test"))
    torch.manual_seed(0)
    encoder, _ = backbone("convnet")
    norm = Normalize(AugmentConfig().mean, AugmentConfig().std)
    feats = [extract_features(encoder, d.images, norm, torch.device("cpu"), progress=False) for d in (train, test)]
    recall = {}
    for spec in ("none", "balanced"):
        probe = train_linear_probe(feats[0], train.labels, 3, epochs=60, progress=False,
                                   weight=class_weights(spec, train.labels, train.classes))
        with torch.no_grad():
            recall[spec] = classification_report(probe(feats[1]), test.labels, test.classes)["per_class"]["bird"]
    print(f"bird recall: {recall}")
    assert recall["balanced"] >= recall["none"] + 0.10
