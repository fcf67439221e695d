"""kNN top-1 (k = 200, T = 0.1) of one checkpoint's encoder with its BatchNorm statistics as training left them
and re-estimated over N training images (``train.bn_recalibration``), on a validation split: the same weights
both ways, so the difference is the statistics' alone. Printed and written as JSON.

    python scripts/sweep.py ...                      # or any split of a labelled training folder
    python scripts/bn_recalibration.py --checkpoint RUN/checkpoints/last.pt --train SPLIT/train --val SPLIT/val \\
        --counts 2000,5000,10000 --out results/bn_recalibration.json

The N images are drawn as a run draws them (a generator seeded with train.seed 0)."""
import argparse
import copy
import json
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from simxent.augment import Normalize  # noqa: E402
from simxent.checkpoint import ENCODER_KEYS, load_checkpoint, load_encoder, saved_config  # noqa: E402
from simxent.config import DataConfig  # noqa: E402
from simxent.evaluate import extract_features, knn_scores, reestimate_batchnorm  # noqa: E402
from simxent.linear_eval import load_eval_folders  # noqa: E402
from simxent.runtime import resolve_device, resolve_dtype  # noqa: E402
from simxent.train import recalibration_images  # noqa: E402

READ_KEYS = ("augment.mean", "augment.std", "train.precision", "eval.crop_ratio")  # as the run evaluated


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--train", required=True, help="labelled training images: the kNN bank, and the N drawn")
    p.add_argument("--val", required=True, help="labelled validation images, held out of --train")
    p.add_argument("--counts", default="2000,5000,10000", help="comma-separated N")
    p.add_argument("--out", default="", help="JSON file for the results")
    a = p.parse_args()
    cfg = saved_config(load_checkpoint(a.checkpoint), a.checkpoint, keys=(*ENCODER_KEYS, *READ_KEYS))
    device = resolve_device(cfg.train.device)
    dtype = resolve_dtype(cfg.train.precision, device)
    train, val = load_eval_folders(a.train, a.val, DataConfig(image_size=cfg.data.image_size), False,
                                   cfg.eval.crop_ratio, "multiclass")
    normalize = Normalize(cfg.augment.mean, cfg.augment.std)

    def knn(encoder) -> float:
        bank, query = (extract_features(encoder, d.images, normalize, device, 512, dtype, progress=False)
                       for d in (train, val))
        scores = knn_scores(bank, train.labels, query, len(train.classes), 200, 0.1)
        return (scores.argmax(1) == val.labels).double().mean().item()

    encoder = load_encoder(a.checkpoint).to(device)
    results = {"checkpoint": a.checkpoint, "image_size": cfg.data.image_size, "as_trained": knn(encoder)}
    for n in (int(c) for c in a.counts.split(",")):
        pick = recalibration_images(len(train), n, seed=0)
        twin, started = copy.deepcopy(encoder), time.perf_counter()
        reestimate_batchnorm(twin, train.images[pick], normalize, device, dtype)
        seconds = round(time.perf_counter() - started, 2)
        results[f"reestimated_{n}"] = {"knn_top1": knn(twin), "seconds": seconds}
    print(json.dumps(results, indent=2))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
