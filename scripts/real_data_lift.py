"""tests/test_real_data.py's kNN lift at another budget or precision, one run, printed as JSON:

    python scripts/real_data_lift.py MINUTES PRECISION OUT   # e.g. 1.5 fp32 results/lift_fp32

As the test does: pretrains the ``cpu`` preset for MINUTES of wall time (decoding into a fresh cache in OUT
included) on 1,000 training images per class of ../shared/data/cifar10, which are also the kNN bank, then
scores it and an untrained twin on 200 test images per class."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from simxent.config import load_config  # noqa: E402
from simxent.linear_eval import ProbeOptions, linear_eval  # noqa: E402
from simxent.train import pretrain  # noqa: E402
from tests.test_real_data import symlinked_subset  # noqa: E402  (the test's own subset)

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


def main(minutes: float, precision: str, out: Path) -> dict:
    classes = sorted(p.name for p in (CIFAR / "train").iterdir() if p.is_dir())
    train, test = (symlinked_subset(CIFAR / split, out / split, dict.fromkeys(classes, n))
                   for split, n in (("train", 1000), ("test", 200)))
    cfg = load_config("cpu", [f"data.train={train}", f"out={out / 'run'}", f"train.max_time={minutes * 60}",
                              "eval.every=0", f"train.precision={precision}", f"data.cache_dir={out / 'cache'}"])
    summary = pretrain(cfg, progress=False)
    scores = linear_eval(out / "run" / "checkpoints" / "last.pt", train, test, ProbeOptions(epochs=1),
                         random_init=True, progress=False, cache_dir=out / "cache")
    return {"minutes": minutes, "precision": precision, "steps": summary["global_step"],
            "knn": scores["pretrained"]["knn"]["top1"], "untrained_knn": scores["random_init"]["knn"]["top1"]}


if __name__ == "__main__":
    print(json.dumps(main(float(sys.argv[1]), sys.argv[2], Path(sys.argv[3]))))
