#!/usr/bin/env python
"""Side-by-side speed and quality measurements; writes JSON and a markdown table.

    python scripts/benchmark.py --data ../shared/data/cifar10 --out results/benchmark      # everything
    python scripts/benchmark.py --only loss,augment                                        # a subset
    python scripts/benchmark.py --only lightly --data ../shared/data/tinyimagenet20 --image-size 64  # vs lightly

Every comparison runs in this one process, one after the other, with the same threads. Figures are medians
of repeated timings after warm-up. The tables in docs/benchmarks.md come from this script.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import platform
import signal
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from simxent.augment import Normalize, ViewAugment, small_view_size
from simxent.config import AugmentConfig, ModelConfig, load_config, view_size
from simxent.evaluate import build_index, extract_features, knn_scores, train_linear_probe
from simxent.files import write_text_atomic
from simxent.loss import nt_xent, symmetric_nt_xent  # the symmetric form: timed where nt_xent does not pick it
from simxent.matmul_conv import conv2d_as_matmul, output_size, use_matmul_convs
from simxent.models import SimCLR, backbone
from simxent.runtime import autocast, configure_device, cpu_supports_bf16, resolve_device, resolve_dtype
from simxent.schedule import build_optimizer
from simxent.train import step_loss, views_per_batch
from versus_lightly import DEFAULT_VENV, Versus, bench_lightly, reaching_line, simxent_config  # in scripts/

SECTIONS = ("loss", "augment", "precision", "ceiling", "profile", "convs", "norms", "knn", "embed", "search",
            "probe", "pipeline", "quality", "lightly")
# lightly trains for an hour by default and needs a network to make its environment once: asked for by name.
DEFAULT_SECTIONS = tuple(s for s in SECTIONS if s != "lightly")
# A line under a section's table, made from its rows.
SECTION_NOTES = {"lightly": reaching_line}


def timed_alternately(fns: dict, repeats: int, warmup: int, sync=None) -> dict:
    """Median seconds of each ``fn()``, run in turn within every repeat, so that a machine that slows
    down for a while (shared CPUs do) slows every candidate alike."""
    times = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            if sync:
                sync()
            t = time.perf_counter()
            fn()
            if sync:
                sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def timed(fn, repeats=5, warmup=2, sync=None) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    return timed_alternately({"fn": fn}, repeats, warmup, sync)["fn"]


# --- NT-Xent ------------------------------------------------------------------------------------------------

def nt_xent_two_block(z1, z2, t, large=1e9):
    """The common formulation (SimCLR's reference code): per view, [a-vs-other, a-vs-self masked] logits."""
    a, b = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    n = len(a)
    labels = torch.arange(n, device=a.device)
    mask = torch.eye(n, device=a.device) * large
    logits_aa = a @ a.T / t - mask
    logits_bb = b @ b.T / t - mask
    logits_ab = a @ b.T / t
    logits_ba = b @ a.T / t
    loss_a = F.cross_entropy(torch.cat([logits_ab, logits_aa], 1), labels)
    loss_b = F.cross_entropy(torch.cat([logits_ba, logits_bb], 1), labels)
    return (loss_a + loss_b) / 2


def saved_bytes(fn) -> int:
    """Bytes autograd keeps for the backward pass of ``fn()`` (distinct storages), plus its output."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()) + out.numel() * out.element_size()


def loss_forms(z1, z2) -> dict:
    """simxent's NT-Xent (the form ``nt_xent`` picks on this device), its one-matrix form (what data
    parallelism and GPUs use) and the two-block form; on a GPU also the symmetric form, which ``nt_xent``
    keeps to CPUs until it is measured faster there."""
    forms = {"simxent": lambda: nt_xent(z1, z2, 0.1),
             "one_matrix": lambda: nt_xent(z1, z2, 0.1, gather=lambda z: z),
             "two_block": lambda: nt_xent_two_block(z1, z2, 0.1)}
    if z1.device.type != "cpu":
        inv_t = torch.tensor(10.0, device=z1.device)
        forms["symmetric"] = lambda: symmetric_nt_xent(torch.cat([z1, z2]), inv_t)
    return forms


def loss_inputs(n: int, device="cpu"):
    g = torch.Generator().manual_seed(n)
    return [torch.randn(n, 128, generator=g).to(device).requires_grad_() for _ in range(2)]


def _resident_kib(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def _cpu_peak_child(name: str, n: int) -> float:
    for size in (64, n):  # the first, small step initialises the libraries' own buffers
        z1, z2 = loss_inputs(size)
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak resident size, to VmRSS
        before = _resident_kib("VmRSS")
        loss_forms(z1, z2)[name]().backward()
    return (_resident_kib("VmHWM") - before) / 1024


def cpu_peak_mib(name: str, n: int) -> float:
    """Peak resident memory of one forward + backward above what was resident before it, in a fresh
    process whose freed memory cannot be reused (Linux): the CPU has no allocator statistics like CUDA's."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_cpu_peak_child, (name, n))


def bench_loss(device, sync):
    """The NT-Xent forms of ``loss_forms``, forward + backward, timed alternately; peak and saved memory."""
    rows = []
    for n in (256, 1024, 4096):
        z1, z2 = loss_inputs(n, device)
        losses = loss_forms(z1, z2)

        def step(fn):
            def run():
                z1.grad = z2.grad = None
                fn().backward()
            return run

        # Short steps vary with launch and scheduling jitter: many repeats where they are cheap.
        repeats = 100 if device.type == "cuda" else 40 if n < 4096 else 7
        medians = timed_alternately({name: step(fn) for name, fn in losses.items()}, repeats,
                                    warmup=20 if device.type == "cuda" else 3, sync=sync)
        row = {"N": n, "D": 128, **{f"{name}_ms": 1000 * t for name, t in medians.items()}}
        for name, fn in losses.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                step(fn)()
                row[f"{name}_peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
            elif Path("/proc/self/clear_refs").exists():
                row[f"{name}_peak_mib"] = cpu_peak_mib(name, n)
            row[f"{name}_saved_mib"] = saved_bytes(fn) / 2**20
        ours, theirs = nt_xent(z1, z2, 0.1).item(), nt_xent_two_block(z1, z2, 0.1).item()
        exact = nt_xent_two_block(z1.double(), z2.double(), 0.1).item()  # each form's float32 rounding error
        row.update(max_abs_difference=abs(ours - theirs), simxent_error=abs(ours - exact), two_block_error=abs(theirs - exact))
        row["speedup"] = row["two_block_ms"] / row["simxent_ms"]
        rows.append(row)
        print(row, flush=True)
    return rows


# --- augmentation ---------------------------------------------------------------------------------------------

def torchvision_pipeline(size):
    from torchvision.transforms import v2

    ops = [v2.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True), v2.RandomHorizontalFlip(),
           v2.RandomApply([v2.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8), v2.RandomGrayscale(p=0.2)]
    if size >= 64:
        ops.append(v2.RandomApply([v2.GaussianBlur(2 * (size // 20) + 1, sigma=(0.1, 2.0))], p=0.5))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(AugmentConfig().mean, AugmentConfig().std)]
    return v2.Compose(ops)


def bench_augment(device, sync):
    rows = []
    for size, batch in ((32, 256), (96, 128), (224, 64)):
        x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
        xd = x.to(device)
        ours = {name: ViewAugment(AugmentConfig(), size, compile=name == "compiled").to(device)
                for name in ("eager", "compiled")}
        for _ in range(3):  # compiling takes the first calls, and on a CPU a recompile for varying subsets
            ours["compiled"](xd)
        tv = torchvision_pipeline(size)
        fns = {name: (lambda aug=aug: aug(xd)) for name, aug in ours.items()}
        fns["torchvision"] = lambda: torch.stack([tv(img) for img in x])
        t = timed_alternately(fns, repeats=9, warmup=1, sync=sync)
        row = {"size": size, "batch": batch, "simxent_views_per_s": batch / t["eager"],
               "simxent_compiled_views_per_s": batch / t["compiled"],
               "torchvision_per_image_views_per_s": batch / t["torchvision"], "speedup": t["torchvision"] / t["eager"]}
        rows.append(row)
        print(row, flush=True)
    return rows


# --- kNN ------------------------------------------------------------------------------------------------------

def bench_knn(_device, _sync):
    g = torch.Generator().manual_seed(0)
    bank, query = torch.randn(50_000, 512, generator=g), torch.randn(10_000, 512, generator=g)
    labels = torch.randint(0, 10, (50_000,), generator=g)
    k = 200

    def brute():
        sims = F.normalize(query, dim=1) @ F.normalize(bank, dim=1).T
        return sims.topk(k, dim=1)

    row = {"bank": len(bank), "queries": len(query), "dim": 512, "k": k,
           "faiss_flat_s": timed(lambda: knn_scores(bank, labels, query, 10, k), repeats=3, warmup=1),
           "torch_bruteforce_topk_s": timed(brute, repeats=3, warmup=1)}
    # IVF on a bank with cluster structure, as real features have; recall of the exact top-k.
    centers = torch.randn(1000, 128, generator=g)
    big = F.normalize(centers[torch.randint(0, 1000, (200_000,), generator=g)] + 0.5 * torch.randn(200_000, 128, generator=g), dim=1)
    q = F.normalize(big[:2000] + 0.1 * torch.randn(2000, 128, generator=g), dim=1)
    flat = build_index(big.numpy(), "flat")
    t = time.perf_counter()
    _, exact = flat.search(q.numpy(), 10)
    row["ivf_bank"] = len(big)
    row["flat_search_s"] = time.perf_counter() - t
    t = time.perf_counter()
    ivf = build_index(big.numpy(), "ivf", nprobe=16)
    row["ivf_build_s"] = time.perf_counter() - t
    t = time.perf_counter()
    _, approx = ivf.search(q.numpy(), 10)
    row["ivf_search_s"] = time.perf_counter() - t
    row["ivf_recall_at_10"] = float(sum(len(set(a) & set(b)) for a, b in zip(exact.tolist(), approx.tolist())) / exact.size)
    print(row, flush=True)
    return [row]


# --- embeddings and similar-image search -----------------------------------------------------------------------

def bench_embed(device, _sync, data_root, images: int = 2000) -> list:
    """Images/s of simxent.embed on ``images`` CIFAR-10 test images (decoded beforehand) per backbone, in
    float32; and of the whole simxent-embed (decoding without cache, the cpu preset's encoder, flat index,
    files)."""
    from simxent.checkpoint import save_checkpoint
    from simxent.config import to_dict
    from simxent.data import load_folder
    from simxent.search import EmbedOptions, embed, embed_folder

    decoded = load_folder(Path(data_root) / "test", 32, progress=False).images[:images]
    rows = []
    # ResNet-18 on a quarter of the images: at 32 px with the CIFAR stem it costs ~10x the convnet per image.
    for name, cifar_stem, count in (("convnet", False, images), ("resnet18", True, images // 4)):
        encoder = backbone(name, cifar_stem)[0].to(device).to(memory_format=torch.channels_last)
        embed(encoder, decoded[:64])  # warm-up
        seconds = timed(lambda: embed(encoder, decoded[:count]), repeats=2, warmup=0)
        rows.append({"what": f"simxent.embed, {name}{' (CIFAR stem)' if cifar_stem else ''}, 32 px",
                     "images": count, "images_per_s": count / seconds})
        print(rows[-1], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        for i, f in enumerate(sorted((Path(data_root) / "test").rglob("*.jpg"))[::5][:images]):
            (folder / f.parent.name).mkdir(parents=True, exist_ok=True)
            (folder / f.parent.name / f.name).symlink_to(f.resolve())
        cpu = load_config("cpu", ["model.backbone=convnet"])  # the first row's encoder: the rest is the files' cost
        save_checkpoint({"config": to_dict(cpu), "encoder": backbone(cpu.model.backbone)[0].state_dict()},
                        Path(tmp) / "c.pt")
        opts = EmbedOptions(device=str(device), cache=False, workers=2, progress=False)
        seconds = timed(lambda: embed_folder(Path(tmp) / "c.pt", folder, Path(tmp) / "out", opts), repeats=2,
                        warmup=0)
        rows.append({"what": f"simxent-embed --no-cache (decode, {cpu.model.backbone}, index, files)",
                     "images": images, "images_per_s": images / seconds})
        print(rows[-1], flush=True)
    return rows


def search_vectors(n: int, dim: int, clustered: bool, g: torch.Generator):
    """``n`` unit vectors: Gaussian, or around 1,000 centres (as features of similar images are)."""
    x = torch.randn(n, dim, generator=g)
    if clustered:
        x = torch.randn(1000, dim, generator=g)[torch.randint(0, 1000, (n,), generator=g)] + 0.5 * x
    return F.normalize(x, dim=1).numpy()


def bench_search(_device, _sync, n: int = 50_000, dim: int = 512, k: int = 10) -> list:
    """On n random unit vectors, flat and IVF (simxent.search.build_search_index, nprobe 16): build time
    (for IVF with its recall measurement), per-query latency (200 queries one at a time), IVF recall@k, and
    the time of ``--duplicates 0.9`` over all n. Clustered vectors are like features; Gaussian ones are
    IVF's worst case."""
    from simxent.search import build_search_index, duplicate_pairs

    g = torch.Generator().manual_seed(0)
    rows = []
    for clustered, kinds in ((True, ("flat", "ivf")), (False, ("ivf",))):
        vectors = search_vectors(n, dim, clustered, g)
        queries = vectors[:: n // 200][:200]
        for kind in kinds:
            t = time.perf_counter()
            index, described = build_search_index(vectors, ivf_above=n if kind == "flat" else 1)
            build = time.perf_counter() - t
            latency = timed(lambda: [index.search(q[None], k) for q in queries], repeats=3, warmup=1) / len(queries)
            t = time.perf_counter()
            pairs = len(duplicate_pairs(index, vectors, 0.9))
            rows.append({"vectors": f"{n} x {dim}, {'clustered' if clustered else 'Gaussian'}", "index": kind,
                         "build_s": build, "query_ms": 1e3 * latency,
                         f"recall_at_{k}": described.get("recall", {}).get("value", 1.0),
                         "duplicates_0.9_s": time.perf_counter() - t, "pairs": pairs})
            print(rows[-1], flush=True)
    return rows


# --- linear probe ---------------------------------------------------------------------------------------------

def bench_probe(device, _sync, data_root):
    from simxent.data import load_folder

    train = load_folder(Path(data_root) / "train", 32, progress=False)
    encoder = SimCLR(ModelConfig(backbone="convnet")).encoder.to(device).to(memory_format=torch.channels_last)
    dtype = resolve_dtype("auto", device)
    norm = Normalize(AugmentConfig().mean, AugmentConfig().std)
    t = time.perf_counter()
    feats = extract_features(encoder, train.images, norm, device, 512, dtype, progress=False)
    extract_s = time.perf_counter() - t
    epochs = 100
    t = time.perf_counter()
    train_linear_probe(feats, train.labels, 10, epochs=epochs, progress=False)
    probe_s = time.perf_counter() - t
    row = {"images": len(train), "epochs": epochs, "extract_once_s": extract_s, "probe_on_cached_s": probe_s,
           "cached_total_s": extract_s + probe_s,
           # The straightforward probe runs the frozen encoder every epoch: one extraction per epoch.
           "encoder_every_epoch_estimate_s": epochs * extract_s + probe_s}
    row["speedup"] = row["encoder_every_epoch_estimate_s"] / row["cached_total_s"]
    print(row, flush=True)
    return [row]


# --- pipeline efficiency ----------------------------------------------------------------------------------------

def training_sizes(cfg) -> list[int]:
    """The sides the preset's encoder trains on, in the order ``views_per_batch`` counts its views: the view
    size (``augment.view_ratio`` of data.image_size), then multi-crop's small-view size when it has any."""
    sizes = [view_size(cfg.augment, cfg.data.image_size)]
    if cfg.augment.small_views:
        sizes.append(small_view_size(cfg.augment, cfg.data.image_size))
    return sizes


def preset_views(cfg, device, batch: int) -> list:
    """Random views shaped as the preset's training step gets them: ``augment.views`` at the view size, then
    multi-crop's ``augment.small_views`` at theirs (``training_sizes``)."""
    return [torch.randn(n * batch, 3, s, s, device=device).contiguous(memory_format=torch.channels_last)
            for n, s in zip(views_per_batch(cfg.augment), training_sizes(cfg), strict=True)]


def bare_step(cfg, device, dtype):
    """Encoder + head forward, multi-view NT-Xent, backward and optimiser step on pre-made views of the
    preset's sizes and counts: the floor the training loop is measured against."""
    torch.manual_seed(0)
    n_views = sum(views_per_batch(cfg.augment))
    model = SimCLR(cfg.model, cfg.data.image_size, views=views_per_batch(cfg.augment)).to(device)
    model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model, cfg.optim, 0.01)
    if cfg.train.compile:
        model = torch.compile(model)
    views = preset_views(cfg, device, cfg.train.batch_size)
    temperature = torch.tensor(cfg.loss.temperature, device=device)

    def step():
        loss, _, _ = step_loss(model, views, temperature, device, dtype, n_views, decoupled=cfg.loss.decoupled,
                               multi_view=cfg.loss.multi_view, n_full=cfg.augment.views)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()

    return step


def bare_images_per_s(cfg, device, dtype, steps=8):
    return cfg.train.batch_size / timed(bare_step(cfg, device, dtype), repeats=steps, warmup=2)


# --- precision: what train.precision=auto chooses between ---------------------------------------------------------

def bench_precision(device, sync, entries="cpu:128,cifar10:32"):
    """The bare training step (images/s) in float32 and in bf16 autocast, timed in turn, per backbone."""
    rows = []
    for entry in entries.split(","):
        preset, batch = entry.split(":")
        cfg = load_config(preset, [f"train.batch_size={batch}"])
        steps = {"fp32": bare_step(cfg, device, None), "bf16": bare_step(cfg, device, torch.bfloat16)}
        seconds = timed_alternately(steps, repeats=3, warmup=1, sync=sync)
        fp32, bf16 = (int(batch) / seconds[k] for k in ("fp32", "bf16"))
        row = {"preset": preset, "backbone": cfg.model.backbone, "size": cfg.data.image_size, "batch": int(batch),
               "fp32_images_per_s": fp32, "bf16_images_per_s": bf16, "bf16_over_fp32": bf16 / fp32,
               "auto_picks": str(resolve_dtype("auto", device))}
        rows.append(row)
        print(row, flush=True)
    return rows


def loop_images_per_s(cfg, seconds):
    """The real training loop on the real folder: the median of the images/s it logs (first interval left
    out), their count, and the images of the steps after that first interval over their wall time, which
    also counts what the logged intervals leave out: each epoch's end (its checkpoint) and next start."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from simxent.train import pretrain

    with tempfile.TemporaryDirectory() as out:
        cfg.out, cfg.train.max_time, cfg.eval.every = out, seconds, 0
        pretrain(cfg, progress=False)
        events = EventAccumulator(str(Path(out) / "tb"))
        events.Reload()
        logged = events.Scalars("train/images_per_s")[1:]
    first, last = logged[0], logged[-1]
    wall = ((last.step - first.step) * cfg.train.batch_size / (last.wall_time - first.wall_time)
            if last.step > first.step else math.nan)
    return statistics.median(e.value for e in logged), len(logged), wall


def data_images_per_s(cfg, device, seconds=15.0):
    """How fast the streaming workers alone deliver batches to the device (no training)."""
    from simxent.data import open_stream

    stream = open_stream(cfg.data.train, view_size(cfg.augment, cfg.data.image_size), cfg.data.workers)
    stream.pin_memory = device.type == "cuda"
    batches = stream.batches(cfg.train.batch_size, torch.Generator().manual_seed(0))
    next(batches)  # worker start-up left out
    t, n = time.perf_counter(), 0
    for _, x in batches:
        x.to(device, non_blocking=True)
        n += len(x)
        if time.perf_counter() - t > seconds:
            break
    return n / (time.perf_counter() - t)


# Flag -> overrides. pairs: two full-size views per image and no multi-crop, as data.stream=true makes them.
PIPELINE_FLAGS = {"stream": ["data.stream=true"], "compile": ["train.compile=true"],
                  "onednn": ["model.matmul_convs=false"], "fp32": ["train.precision=fp32"],
                  "pairs": ["augment.small_views=0"]}


def pipeline_config(entry: str, data_root, workers: int):
    """The config one ``--pipeline`` entry ``preset:batch[:flag]...`` times (SystemExit naming a malformed
    entry). BatchNorm re-estimation is off: it runs after the timed loop and would only add its seconds."""
    preset, batch, *flags = entry.split(":") if entry.count(":") else (entry, "")
    unknown = set(flags) - set(PIPELINE_FLAGS)
    if unknown or not batch.isdigit():
        raise SystemExit(f"--pipeline {entry}: expected preset:batch[:{'][:'.join(PIPELINE_FLAGS)}]"
                         + (f"; unknown flags {sorted(unknown)}" if unknown else ""))
    overrides = [f"data.train={Path(data_root) / 'train'}", f"train.batch_size={batch}", "train.log_every=4",
                 "train.bn_recalibration=0", *(o for f in flags for o in PIPELINE_FLAGS[f])]
    return load_config(preset, overrides + ([f"data.workers={workers}"] if workers else []))


def bench_pipeline(device, _sync, data_root, seconds, entries, workers):
    """``entries``: ``preset:batch[:flag]...``, e.g. ``cpu:256`` or ``cpu:256:stream:pairs`` (flags:
    PIPELINE_FLAGS)."""
    rows = []
    for entry in entries.split(","):
        cfg = pipeline_config(entry, data_root, workers)
        preset, batch = entry.split(":")[:2]
        dtype = resolve_dtype(cfg.train.precision, device)
        # The floor is timed before and after the loop and averaged: a shared machine drifts over a minute.
        before = bare_images_per_s(cfg, device, dtype)
        loop, intervals, wall = loop_images_per_s(cfg, seconds)
        after = bare_images_per_s(cfg, device, dtype)
        bare = (before + after) / 2
        row = {"data_images_per_s": data_images_per_s(cfg, device)} if cfg.data.stream else {}
        row |= {"preset": preset, "backbone": cfg.model.backbone, "size": cfg.data.image_size, "batch": int(batch),
               "data": "stream" if cfg.data.stream else "cache", "compile": cfg.train.compile,
               "matmul_convs": cfg.model.matmul_convs,
               "precision": str(dtype), "bare_before_images_per_s": before, "bare_after_images_per_s": after,
               "bare_images_per_s": bare, "loop_images_per_s": loop,
               "loop_intervals": intervals, "efficiency": loop / bare, "loop_wall_images_per_s": wall,
               "efficiency_wall": wall / bare}
        rows.append(row)
        print(row, flush=True)
    return rows


def _write_jpegs(job):
    from PIL import Image

    root, start, stop, shapes, classes = job
    rng = torch.Generator().manual_seed(start)
    for i in range(start, stop):
        width, height = shapes[i % len(shapes)]
        folder = Path(root) / "train" / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = torch.randint(0, 256, (height // 16, width // 16, 3), generator=rng, dtype=torch.uint8)
        im = Image.fromarray(coarse.numpy()).resize((width, height), Image.Resampling.BICUBIC)
        im.save(folder / f"{i:07d}.jpg", quality=90)


def synthetic_folder(root: Path, n: int, shapes: list[tuple[int, int]], classes: int = 10) -> Path:
    """``root/train/class*/`` with ``n`` smooth random JPEGs, of the (width, height) ``shapes`` in turn: a
    folder to time the pipeline on a machine without the data (decoding cost is what matters, not content)."""
    import multiprocessing

    chunk = 500
    jobs = [(str(root), s, min(s + chunk, n), shapes, classes) for s in range(0, n, chunk)]
    with multiprocessing.Pool() as pool:
        pool.map(_write_jpegs, jobs)
    return root


# --- quality at equal time -------------------------------------------------------------------------------------

def bench_quality(_device, _sync, data_root, minutes, overrides=()):
    """The cpu preset (``overrides`` after it) pretrained for ``minutes`` of wall time on DATA/train, start-up
    and decoding inside that time (a fresh decoded-image cache), then kNN and linear probe on DATA/test,
    beside an untrained encoder of the same architecture."""
    from simxent.linear_eval import ProbeOptions, linear_eval
    from simxent.train import pretrain

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config("cpu", [f"data.train={Path(data_root) / 'train'}", f"out={out}",
                                  f"data.cache_dir={Path(out) / 'cache'}", f"train.max_time={minutes * 60}",
                                  "eval.every=0", *overrides])
        summary = pretrain(cfg, progress=False)
        results = linear_eval(Path(out) / "checkpoints" / "last.pt", Path(data_root) / "train",
                              Path(data_root) / "test", ProbeOptions(), random_init=True, progress=False)
    row = {"preset": " ".join(["cpu", *overrides]), "minutes": minutes, "steps": summary["global_step"],
           "images": summary["global_step"] * cfg.train.batch_size,
           "knn_top1": results["pretrained"]["knn"]["top1"], "knn_top1_random_init": results["random_init"]["knn"]["top1"],
           "linear_top1": results["pretrained"]["linear"]["top1"],
           "linear_top1_random_init": results["random_init"]["linear"]["top1"]}
    print(row, flush=True)
    return [row]


# --- the encoder step against the machine's ceiling ------------------------------------------------------------

@dataclass(frozen=True)
class StepVariant:
    """One way to run the encoder step: per-view batch B, memory layout, torch.compile, torch threads (0: all),
    float32 instead of the preset's precision, and oneDNN's kernels for every convolution
    (``model.matmul_convs=false``)."""
    label: str
    batch: int = 256
    channels_last: bool = True
    compile: bool = False
    threads: int = 0
    float32: bool = False
    matmul_convs: bool = True


STEP_VARIANTS = (StepVariant("channels_last"), StepVariant("contiguous", channels_last=False),
                 StepVariant("channels_last", batch=512), StepVariant("channels_last, 1 thread", threads=1),
                 StepVariant("channels_last, float32", float32=True),
                 StepVariant("channels_last, compiled", compile=True),
                 StepVariant("channels_last, oneDNN convolutions only", matmul_convs=False))


def counted_flops(fn) -> int:
    """FLOP of one ``fn()`` as ``torch.utils.flop_counter.FlopCounterMode`` counts them: matrix products and
    convolutions, forward and (when ``fn`` runs it) backward, 2 per multiply-add; elementwise work (BatchNorm,
    ReLU, the optimiser) is not counted, so achieved TFLOP/s are those of the products."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_ceiling(dtype: torch.dtype, device, sync, n: int = 4096) -> dict:
    """The machine's own limit: an n x n by n x n ``torch.mm`` (2 n^3 FLOP) in ``dtype`` on all threads."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(device, dtype) for _ in range(2))
    seconds = timed(lambda: torch.mm(a, b), repeats=5, warmup=2, sync=sync)
    flop = 2 * n**3
    return step_row(f"torch.mm {n}x{n}", "ceiling", n, "product", str(dtype).removeprefix("torch."), flop, seconds,
                    flop / seconds / 1e12, None)


def encoder_passes(cfg, device, dtype, batch: int, channels_last: bool, compile: bool,
                   matmul_convs: bool = True) -> dict:
    """The training step's model work on 2 x ``batch`` random views (both views in one batch, as the loop
    runs them): ``forward`` (encoder + head under the run's autocast, graph recorded as in training) and
    ``forward+backward`` (that, NT-Xent and its backward; no optimiser step)."""
    torch.manual_seed(0)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model_cfg = replace(cfg.model, matmul_convs=matmul_convs)
    model = SimCLR(model_cfg, cfg.data.image_size).to(device).to(memory_format=layout)
    if compile:
        torch.compiler.reset()  # a fresh compile, so that its first call is timed whole
        model = torch.compile(model)
    s = cfg.data.image_size
    views = torch.randn(2 * batch, 3, s, s, device=device).contiguous(memory_format=layout)

    def forward():
        with autocast(device, dtype):
            return model(views)

    def step():
        model.zero_grad(set_to_none=True)
        nt_xent(*forward().chunk(2), cfg.loss.temperature).backward()

    return {"forward+backward": step, "forward": forward}  # the step first: a compile's first call builds both


def on_threads(fn, threads: int):
    """``fn`` run on ``threads`` torch threads (0: as set), the setting restored after each call."""
    if not threads:
        return fn

    def run():
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return fn()
        finally:
            torch.set_num_threads(before)
    return run


def first_call_seconds(fn, sync) -> float:
    t = time.perf_counter()
    fn()
    if sync:
        sync()
    return time.perf_counter() - t


def step_row(encoder, variant, batch, kind, precision, flop, seconds, ceiling, first_call_s) -> dict:
    """A row of the ceiling table; ``batch`` is B per view, so images/s are what the training log reports."""
    return {"encoder": encoder, "variant": variant, "batch": batch, "pass": kind, "precision": precision,
            "ms": 1e3 * seconds, "gflop": flop / 1e9, "tflops": flop / seconds / 1e12,
            "share_of_ceiling": flop / seconds / 1e12 / ceiling,
            "images_per_s": batch / seconds if kind != "product" else None, "first_call_s": first_call_s}


def encoder_rows(name, cfg, device, sync, ceilings) -> list:
    """One row per STEP_VARIANTS variant and pass: the time of its first call (a compile's compile time), the
    median step time after warm-up with every variant timed in turn within each repeat (a shared machine's
    load then weighs on all alike), FLOP counted on the eager model, TFLOP/s and their share of the ceiling
    of the variant's precision."""
    preset_dtype = resolve_dtype(cfg.train.precision, device)
    fns, first, flops, dtypes = {}, {}, {}, {}
    for v in STEP_VARIANTS:
        if v.threads and device.type != "cpu":
            continue  # thread counts are a CPU's question
        key = v.label, v.batch
        dtypes[key] = None if v.float32 else preset_dtype
        if v.batch not in flops:
            eager = encoder_passes(cfg, device, None, v.batch, v.channels_last, compile=False)
            flops[v.batch] = {kind: counted_flops(fn) for kind, fn in eager.items()}
        for kind, fn in encoder_passes(cfg, device, dtypes[key], v.batch, v.channels_last, v.compile,
                                       v.matmul_convs).items():
            fns[key + (kind,)] = on_threads(fn, v.threads)
            first[key + (kind,)] = first_call_seconds(fns[key + (kind,)], sync)
    rows = []
    # The first calls above were the warm-up.
    for (label, batch, kind), seconds in timed_alternately(fns, repeats=3, warmup=0, sync=sync).items():
        precision = str(dtypes[label, batch] or torch.float32).removeprefix("torch.")
        rows.append(step_row(name, label, batch, kind, precision, flops[batch][kind], seconds,
                             ceilings[precision], first[label, batch, kind]))
        print(rows[-1], flush=True)
    return rows


# --ceiling-encoders name -> the preset whose encoder (and precision) is timed
CEILING_ENCODERS = {"convnet": "cpu", "resnet18": "cifar10"}


def encoder_label(cfg) -> str:
    """The rows' name of a preset's encoder, e.g. ``resnet18 (CIFAR stem)``."""
    return cfg.model.backbone + (" (CIFAR stem)" if cfg.model.cifar_stem else "")


def bench_ceiling(device, sync, encoders: str = "convnet,resnet18") -> list:
    """The bf16 and float32 matrix-product ceilings, then each encoder's step (the cpu preset's encoder, the
    cifar10 preset's ResNet-18 with the CIFAR stem; 32 px) in every STEP_VARIANTS variant, at the precision
    the preset picks here, as TFLOP/s and as a share of the ceiling of that precision. ``encoders``: which of
    CEILING_ENCODERS (ResNet-18's variants, its compile above all, take most of the section's time)."""
    chosen = [load_config(CEILING_ENCODERS[key.strip()]) for key in encoders.split(",")]
    presets = {resolve_dtype(cfg.train.precision, device) for cfg in chosen}
    dtypes = [torch.bfloat16, torch.float32] + sorted(presets - {torch.bfloat16, torch.float32}, key=str)  # fp16
    rows = [matmul_ceiling(dtype, device, sync) for dtype in dtypes]
    ceilings = {row["precision"]: row["tflops"] for row in rows}
    for row in rows:
        print(row, flush=True)
    for cfg in chosen:
        name = encoder_label(cfg)
        steps = encoder_rows(name, cfg, device, sync, ceilings)
        best = max((row for row in steps if row["pass"] == "forward+backward"), key=lambda row: row["images_per_s"])
        print(f"fastest {name} step: {best['variant']}, batch {best['batch']}: {best['images_per_s']:.0f} images/s, "
              f"{best['share_of_ceiling']:.1%} of the {best['precision']} ceiling", flush=True)
        rows += steps
    return rows


def op_profile(step, device, steps: int = 3, top: int = 10) -> list:
    """Where one step's time goes: ``step()`` run ``steps`` times under ``torch.profiler`` after one warm-up
    call, each operator's self time (on the GPU, its kernels' time) per step and its share of the sum over
    all operators; the ``top`` largest, then the rest as one row."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    # Operators only: on a GPU the kernels are events of their own too, whose time their operators hold.
    events = [e for e in prof.key_averages() if e.device_type == DeviceType.CPU and not e.is_user_annotation]
    ops = sorted(((e.key, getattr(e, attr) / 1e3 / steps, e.count / steps) for e in events), key=lambda op: -op[1])
    total = sum(ms for _, ms, _ in ops)
    rest = ("(every other op)", sum(ms for _, ms, _ in ops[top:]), sum(n for _, _, n in ops[top:]))
    return [{"op": name, "calls_per_step": n, "ms_per_step": ms, "share": ms / total}
            for name, ms, n in ops[:top] + [rest]]


def bench_profile(device, sync, encoders: str = "convnet,resnet18") -> list:
    """Each CEILING_ENCODERS encoder's forward + NT-Xent + backward at its preset's precision, channels_last,
    B = 256 per view (the ceiling section's preset row), broken down by operator (``op_profile``)."""
    rows = []
    for key in encoders.split(","):
        cfg = load_config(CEILING_ENCODERS[key.strip()])
        name = encoder_label(cfg)
        step = encoder_passes(cfg, device, resolve_dtype(cfg.train.precision, device), 256, True, False)
        for row in op_profile(step["forward+backward"], device):
            rows.append({"encoder": name, **row})
            print(rows[-1], flush=True)
    return rows


def bench_convs(device, sync, preset: str = "cpu", batch: int = 256,
                dtypes: tuple = (torch.bfloat16, torch.float32)) -> list:
    """Each convolution of the convnet at the sizes the preset trains it on (its views, then its small
    views) and at ``data.image_size``, ``batch`` images each, forward + backward in each of ``dtypes`` (bf16
    as under bf16 autocast, float32 as without it): by oneDNN (``F.conv2d``) and as matrix products
    (``conv2d_as_matmul``), timed in turn. ``matmul_convs``: the path ``model.matmul_convs`` takes in
    training (``Conv2d.uses_matmul``)."""
    cfg = load_config(preset)
    sizes = training_sizes(cfg) + [cfg.data.image_size]
    convs = [block[0] for block in use_matmul_convs(backbone(cfg.model.backbone)[0]).features]
    rows = []
    for dtype, size in itertools.product(dtypes, sizes):
        x = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
        for conv in convs:
            x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
            w = conv.weight.detach().to(device, dtype).contiguous(memory_format=torch.channels_last)
            w.requires_grad_()  # channels_last, as train.channels_last keeps the model's weights
            stride, padding = conv.stride[0], conv.padding[0]
            y = F.conv2d(x, w, stride=stride, padding=padding)
            grad = torch.ones_like(y)
            fns = {"onednn": lambda: torch.autograd.grad(F.conv2d(x, w, stride=stride, padding=padding), (x, w), grad),
                   "matmul": lambda: torch.autograd.grad(conv2d_as_matmul(x, w, stride, padding), (x, w), grad)}
            seconds = timed_alternately(fns, repeats=7, warmup=2, sync=sync)
            with torch.autocast(device.type, torch.bfloat16, enabled=dtype == torch.bfloat16):
                path = conv.uses_matmul(x)
            rows.append({"dtype": str(dtype).removeprefix("torch."), "view_px": size,
                         "conv": f"{conv.in_channels}->{conv.out_channels}/{stride}",
                         "input": "x".join(map(str, x.shape[2:])), "output_positions": y.shape[2] * y.shape[3],
                         "onednn_ms": 1e3 * seconds["onednn"], "matmul_ms": 1e3 * seconds["matmul"],
                         "onednn_over_matmul": seconds["onednn"] / seconds["matmul"], "matmul_convs": path})
            print(rows[-1], flush=True)
            x = torch.randn_like(y)
    return rows


def bench_norms(device, sync, preset: str = "cpu", batch: int = 256) -> list:
    """Each BatchNorm + ReLU of the convnet at the sizes the preset trains it on (its views, then its small
    views), on ``batch`` bf16 channels_last maps as its convolutions give them, forward + backward (input
    and parameter gradients): eager (PyTorch's BatchNorm kernels, then ReLU's) and fused by ``torch.compile``
    (inductor's generated kernels), timed in turn. ``compile_s``: the compiled module's first call."""
    rows, cfg = [], load_config(preset)
    for size in training_sizes(cfg):
        side = size
        for conv, norm, relu in backbone(cfg.model.backbone)[0].features:
            side = output_size(side, conv.kernel_size[0], conv.stride[0], conv.padding[0])
            x = torch.randn(batch, conv.out_channels, side, side, device=device, dtype=torch.bfloat16)
            x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
            grad = torch.randn_like(x)
            eager = torch.nn.Sequential(norm, relu).to(device)
            torch.compiler.reset()
            compiled = torch.compile(copy.deepcopy(eager), dynamic=False)
            # Gradients returned, not accumulated into x.grad: training's maps are not leaves.
            fns = {name: lambda m=m: torch.autograd.grad(m(x), [x, *m.parameters()], grad)
                   for name, m in (("eager", eager), ("compiled", compiled))}
            compile_s = first_call_seconds(fns["compiled"], sync)
            seconds = timed_alternately(fns, repeats=7, warmup=2, sync=sync)
            rows.append({"view_px": size, "channels": conv.out_channels, "map": f"{side}x{side}",
                         "eager_ms": 1e3 * seconds["eager"], "compiled_ms": 1e3 * seconds["compiled"],
                         "eager_over_compiled": seconds["eager"] / seconds["compiled"], "compile_s": compile_s})
            print(rows[-1], flush=True)
    return rows


def markdown(results: dict) -> str:
    lines = []
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    for section, rows in results["sections"].items():
        lines.append(f"### {section}\n")
        if not rows:
            lines += ["(no rows)", ""]
            continue
        keys = list(dict.fromkeys(k for row in rows for k in row))  # rows of one section may differ in keys
        lines.append("| " + " | ".join(keys) + " |")
        lines.append("|" + "---|" * len(keys))
        for row in rows:
            lines.append("| " + " | ".join(cell(row[k]) if k in row else "" for k in keys) + " |")
        if section in SECTION_NOTES:
            lines += ["", SECTION_NOTES[section](rows)]
        lines.append("")
    return "\n".join(lines)


def minute_marks(text: str) -> tuple[float, ...]:
    """``--versus-minutes``: positive minutes, comma-separated, in increasing order."""
    try:
        marks = tuple(float(m) for m in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of minutes") from None
    if not all(0 < m < float("inf") for m in marks) or list(marks) != sorted(set(marks)):
        raise argparse.ArgumentTypeError(f"{text!r}: give positive minutes in increasing order, e.g. 2,5,10,30")
    return marks


def versus_options(p: argparse.ArgumentParser) -> None:
    """The lightly section's options."""
    g = p.add_argument_group("lightly", "simxent's cpu preset beside lightly's SimCLR pipeline on the same model")
    g.add_argument("--versus-minutes", type=minute_marks, default=(2, 5, 10, 30),
                   help="equal wall time: minute marks, comma-separated (default 2,5,10,30)")
    g.add_argument("--versus-epochs", type=int, default=0,
                   help="equal epochs instead: both train exactly N epochs, scored after each")
    g.add_argument("--image-size", type=int, default=32, help="the views' size for both (64 for tinyimagenet20)")
    g.add_argument("--lightly-venv", default=str(DEFAULT_VENV), help="lightly's virtual environment (made if absent)")
    g.add_argument("--simxent-overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides for simxent's runs in the lightly and quality sections, after the "
                        "section's own (e.g. optim.lr=0.001)")


def versus(p: argparse.ArgumentParser, a: argparse.Namespace) -> Versus:
    """The lightly section's settings from the command line, checked before any work (an error names the
    option); its files go to OUT-lightly/."""
    from simxent.config import ConfigError

    out = Path(a.out)
    v = Versus(Path(a.data), out.with_name(out.name + "-lightly"), a.image_size, a.versus_minutes,
               a.versus_epochs, Path(a.lightly_venv), tuple(a.simxent_overrides))
    if a.versus_epochs < 0:
        p.error(f"--versus-epochs must be >= 0 (0: compare at --versus-minutes), got {a.versus_epochs}")
    for split in ("train", "test"):
        if not (v.data / split).is_dir():
            p.error(f"--data: {v.data} needs {split}/ with one sub-folder per class")
    try:
        simxent_config(v, v.work / "simxent", None if v.epochs else v.minutes[-1])
    except ConfigError as e:
        p.error(f"--simxent-overrides or --image-size: {e}")
    return v


def check_options(p: argparse.ArgumentParser, a: argparse.Namespace, wanted: list[str]) -> None:
    """The options of the sections to run, checked before the first one starts: a mistake found by the last
    section would cost the minutes of the others."""
    from simxent.config import ConfigError

    for entry in a.pipeline.split(",") if "pipeline" in wanted else []:
        try:
            pipeline_config(entry, a.data, a.workers)
        except SystemExit as e:
            p.error(str(e))
        except ConfigError as e:
            p.error(f"--pipeline {entry}: {e}")
    try:
        if "quality" in wanted:
            load_config("cpu", list(a.simxent_overrides))
    except ConfigError as e:
        p.error(f"--simxent-overrides: {e}")
    unknown = [k for k in a.ceiling_encoders.split(",") if k.strip() not in CEILING_ENCODERS]
    if unknown and {"ceiling", "profile"} & set(wanted):
        p.error(f"--ceiling-encoders: {', '.join(unknown)} is not one of {', '.join(CEILING_ENCODERS)}")


def write_results(results: dict, out: Path) -> None:
    """OUT.json and OUT.md, after every section: a later section's failure keeps what the others measured."""
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out.with_suffix(".json"), json.dumps(results, indent=2))
    write_text_atomic(out.with_suffix(".md"), markdown(results))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(DEFAULT_SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)} (default: all but lightly)")
    p.add_argument("--data", default="../shared/data/cifar10", help="CIFAR-10 image folder (train/, test/)")
    p.add_argument("--out", default="results/benchmark", help="writes OUT.json and OUT.md")
    p.add_argument("--device", default="auto")
    p.add_argument("--ceiling-encoders", default="convnet,resnet18",
                   help=f"of {','.join(CEILING_ENCODERS)}, for the ceiling and profile sections")
    p.add_argument("--loop-seconds", type=float, default=75, help="training-loop time per backbone")
    p.add_argument("--quality-minutes", type=float, default=10)
    p.add_argument("--pipeline", default="cpu:256,cifar10:128",
                   help=f"training loops to time, preset:batch[:flag]... (preset names: cpu, cifar10, imagenet, "
                        f"demo; flags: {', '.join(PIPELINE_FLAGS)}; stream needs pairs with the cpu preset)")
    p.add_argument("--workers", type=int, default=0, help="data.workers for the loops (0: the preset's)")
    p.add_argument("--synthetic", default="", metavar="N:WxH",
                   help="time on N generated WxH JPEGs (several: WxH+WxH, in turn) instead of --data (probe, embed, "
                        "quality and lightly need real data)")
    versus_options(p)
    a = p.parse_args()
    device = resolve_device(a.device)
    configure_device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    wanted = [s.strip() for s in a.only.split(",")]
    unknown = set(wanted) - set(SECTIONS)
    if unknown:
        p.error(f"unknown section(s) {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    check_options(p, a, wanted)
    lightly_settings = versus(p, a) if "lightly" in wanted else None
    runners = {
        "loss": lambda: bench_loss(device, sync),
        "augment": lambda: bench_augment(device, sync),
        "precision": lambda: bench_precision(device, sync),
        "ceiling": lambda: bench_ceiling(device, sync, a.ceiling_encoders),
        "profile": lambda: bench_profile(device, sync, a.ceiling_encoders),
        "convs": lambda: bench_convs(device, sync),
        "norms": lambda: bench_norms(device, sync),
        "knn": lambda: bench_knn(device, sync),
        "embed": lambda: bench_embed(device, sync, a.data),
        "search": lambda: bench_search(device, sync),
        "probe": lambda: bench_probe(device, sync, a.data),
        "pipeline": lambda: bench_pipeline(device, sync, a.data, a.loop_seconds, a.pipeline, a.workers),
        "quality": lambda: bench_quality(device, sync, a.data, a.quality_minutes, a.simxent_overrides),
        "lightly": lambda: bench_lightly(lightly_settings),
    }
    if a.synthetic:
        n, sizes = a.synthetic.split(":")
        shapes = [tuple(int(v) for v in size.split("x")) for size in sizes.split("+")]
        a.data = str(synthetic_folder(Path(tempfile.mkdtemp(prefix="simxent-bench-")), int(n), shapes))
    results = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                           "threads": torch.get_num_threads(), "device": str(device),
                           "cuda": torch.cuda.get_device_name() if device.type == "cuda" else None,
                           "cpu_count": os.cpu_count(), "cpu_native_bf16": cpu_supports_bf16(),
                           "data": a.synthetic or a.data,
                           "torch": torch.__version__},
               "sections": {}}
    for name in SECTIONS:
        if name in wanted:
            print(f"== {name}", flush=True)
            results["sections"][name] = runners[name]()
            write_results(results, Path(a.out))
    print(markdown(results))


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # a reader that leaves (| head) ends it quietly, as it does ls
    main()
