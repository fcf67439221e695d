"""Embeddings and similar-image search: ``simxent.embed`` against a hand-written forward pass, the files of
``simxent-embed``, nearest neighbours and duplicate pairs against brute-force numpy, the IVF index's recall
against an independent computation, bad files, and the issue's check on real CIFAR-10 images."""
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
from PIL import Image
import pytest
import torch

import simxent
import simxent.files
from simxent import cli
from simxent.checkpoint import load_checkpoint, save_checkpoint
from simxent.config import ConfigError, load_config, to_dict
from simxent.data import DataError, decode, decode_eval
from simxent.evaluate import recall_against_exact
from simxent.files import json_text
from simxent.models import backbone
from simxent.search import build_search_index, duplicate_pairs, read_store, unrelated_similarity

from conftest import TINY_RUN, write_image

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def tiny_checkpoint(path, size=16):
    """A convnet checkpoint with non-default normalisation, so that using the wrong one shows."""
    cfg = load_config(None, [*TINY_RUN, f"data.image_size={size}", f"augment.mean={list(MEAN)}",
                             f"augment.std={list(STD)}"])
    torch.manual_seed(0)
    encoder, _ = backbone("convnet")
    save_checkpoint({"config": to_dict(cfg), "encoder": encoder.state_dict()}, path)
    return path


def reference_embeddings(encoder, images: np.ndarray) -> np.ndarray:
    """The formula in float64: x = (image / 255 - mean) / std, e = f(x) / ||f(x)||."""
    x = (images.astype(np.float64) / 255 - np.array(MEAN)) / np.array(STD)
    with torch.no_grad():
        f = encoder.double().eval()(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    return f / np.linalg.norm(f, axis=1, keepdims=True)


def brute_force_topk(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    sims = queries.astype(np.float64) @ vectors.astype(np.float64).T
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """A folder of 40 images in two sub-folders, one byte copy of an image, and one corrupt file;
    its embeddings written by simxent-embed."""
    root = tmp_path_factory.mktemp("search")
    folder = root / "images"
    for i in range(40):
        write_image(folder / ("a" if i % 2 else "b") / f"{i}.png", seed=1000 + i)
    shutil.copyfile(folder / "a" / "7.png", folder / "b" / "copy of 7.png")
    (folder / "a" / "broken.png").write_bytes(b"not an image")
    ckpt = tiny_checkpoint(root / "c.pt")
    out = root / "embedded"
    assert cli.embed_main(["--checkpoint", str(ckpt), "--images", str(folder), "--out", str(out), "--workers", "0",
                           "--cache-dir", str(root / "cache"), "--no-progress", "--projector", "8"]) == 0
    return folder, ckpt, out


def test_a_list_file_embeds_the_images_it_names(embedded, tmp_path):
    """--images LIST.txt: the listed images, named relative to the list's folder (absolute entries as
    relative paths too), with the vectors the folder's embedding gave them."""
    folder, ckpt, out = embedded
    listing = folder.parent / "some.txt"
    listing.write_text(f"images/a/1.png\n{folder / 'b' / '2.png'}\n")
    assert cli.embed_main(["--checkpoint", str(ckpt), "--images", str(listing), "--out", str(tmp_path / "o"),
                           "--workers", "0", "--no-progress"]) == 0
    part, whole = read_store(tmp_path / "o"), read_store(out)
    assert part.names == ["images/a/1.png", "images/b/2.png"]
    rows = [whole.names.index(n) for n in ("a/1.png", "b/2.png")]
    np.testing.assert_allclose(part.vectors, whole.vectors[rows], atol=1e-6)


def test_embed_is_the_normalised_encoder_output():
    torch.manual_seed(1)
    encoder, _ = backbone("convnet")
    images = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    got = simxent.embed(encoder.eval(), images, MEAN, STD)
    assert got.dtype == torch.float32 and got.shape == (5, backbone("convnet")[1])
    np.testing.assert_allclose(got.numpy(), reference_embeddings(encoder, images), atol=1e-5)
    with pytest.raises(ValueError, match=r"at least one image, got none"):  # was torch.cat's complaint
        simxent.embed(encoder, images[:0])


def test_embed_writes_normalised_embeddings_names_and_meta(embedded):
    folder, ckpt, out = embedded
    store = read_store(out)
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.png") if p.name != "broken.png")
    assert sorted(store.names) == files and len(store.names) == 41
    assert store.vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(store.vectors, axis=1), 1, atol=1e-6)
    images = np.stack([decode(folder / n, 16) for n in store.names])
    np.testing.assert_allclose(store.vectors, reference_embeddings(simxent.load_encoder(ckpt), images), atol=1e-5)
    meta = store.meta
    assert (meta["count"], meta["image_size"], meta["mean"], meta["std"]) == (41, 16, list(MEAN), list(STD))
    assert meta["index"] == {"type": "flat"} and meta["skipped"] == ["a/broken.png"]  # relative, as the names
    assert sum(1 for _ in next((out / "projector").rglob("metadata.tsv")).open()) == 8


def test_each_image_finds_itself_first_at_similarity_one(embedded, capsys):
    folder, _, out = embedded
    store = read_store(out)
    queries = [str(folder / n) for n in store.names[:12]]
    assert cli.search_main(["--index", str(out), "--k", "5", "--json", *queries]) == 0
    found = json.loads(capsys.readouterr().out)["neighbours"]
    order = brute_force_topk(store.vectors, store.vectors[:12], 5)
    for q, (name, row) in enumerate(zip(store.names[:12], found)):
        twins = {"a/7.png", "b/copy of 7.png"}
        assert row["neighbours"][0]["name"] in ({name} | (twins if name in twins else set()))
        assert abs(row["neighbours"][0]["similarity"] - 1) < 1e-5
        # the rest as brute force over the stored embeddings (ties of the byte copy aside)
        assert {n["name"] for n in row["neighbours"]} == {store.names[j] for j in order[q]}


def test_text_output_names_query_and_neighbours(embedded, capsys):
    folder, _, out = embedded
    assert cli.search_main(["--index", str(out), "--k", "2", str(folder / "a" / "3.png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(folder / "a" / "3.png") and len(lines) == 3
    sim, name = lines[1].split("\t")
    assert name.strip() == "a/3.png" and abs(float(sim) - 1) < 1e-5


def test_duplicates_finds_the_planted_copy_only(embedded, capsys):
    _, _, out = embedded
    store = read_store(out)
    assert cli.search_main(["--index", str(out), "--duplicates", "0.999", "--json", "--no-progress"]) == 0
    pairs = json.loads(capsys.readouterr().out)["duplicates"]
    assert [{p["a"], p["b"]} for p in pairs] == [{"a/7.png", "b/copy of 7.png"}]
    assert pairs[0]["similarity"] >= 0.999
    # Every pair at a lower threshold, against brute force: each once, none missed, none extra.
    sims = store.vectors.astype(np.float64) @ store.vectors.T.astype(np.float64)
    threshold = float(np.quantile(sims[np.triu_indices(len(sims), 1)], 0.9))
    upper = list(zip(*np.triu_indices(len(sims), 1)))
    expected = {(i, j) for i, j in upper if sims[i, j] >= threshold}
    at_threshold = {(i, j) for i, j in upper if abs(sims[i, j] - threshold) < 2e-5}  # within float32's allowance
    found = duplicate_pairs(store.index, store.vectors, threshold)
    got = {(i, j) for i, j, _ in found}
    assert len(got) == len(found) and got ^ expected <= at_threshold and len(expected) > 10
    assert [s for *_, s in found] == sorted((s for *_, s in found), reverse=True)


def test_duplicates_say_what_unrelated_images_score_and_warn_below_it(embedded, capsys, caplog):
    """An encoder trained briefly maps every image near every other: at --duplicates 0.98 a user's 300 photos
    gave 173 "near-duplicate" pairs of different images. The output gives the folder's random pairs (here all
    of them) as a yardstick, and a threshold that 1 random pair in 1,000 reaches is warned about."""
    _, _, out = embedded
    vectors = read_store(out).vectors.astype(np.float64)
    n, full = len(vectors), vectors @ vectors.T
    nearest = [max((j for j in range(n) if j != i), key=lambda j: full[i, j]) for i in range(n)]
    sims = [full[i, j] for i in range(n) for j in range(i + 1, n) if not (nearest[i] == j and nearest[j] == i)]
    median, p999 = np.median(sims), np.quantile(sims, 0.999)
    assert cli.search_main(["--index", str(out), "--duplicates", "0.999", "--json", "--no-progress"]) == 0
    unrelated = json.loads(capsys.readouterr().out)["unrelated"]
    assert unrelated["pairs"] == len(sims) < 41 * 40 // 2
    assert max(sims) < 0.999  # the planted copy's pair is its rows' nearest: not counted as unrelated
    assert (unrelated["median"], unrelated["p99.9"]) == pytest.approx((median, p999), abs=1e-9)
    below, above = p999 - 0.01, min(1.0, p999 + 1e-4)
    with caplog.at_level("WARNING", logger="simxent"):
        assert cli.search_main(["--index", str(out), "--duplicates", str(above), "--no-progress"]) == 0
        assert "random pairs of this folder" not in caplog.text
        assert cli.search_main(["--index", str(out), "--duplicates", str(below), "--no-progress"]) == 0
    assert f"1 in 1,000 random pairs of this folder score {p999:.4f} or more" in caplog.text
    assert f"(random pairs of the folder: median cosine {median:.4f}, 1 in 1,000 above {p999:.4f})" in \
        capsys.readouterr().out
    # Drawn at random, and the same rows each time, beyond the sample's size.
    rng = np.random.default_rng(1)
    many = rng.standard_normal((300, 8))
    many /= np.linalg.norm(many, axis=1, keepdims=True)
    drawn = unrelated_similarity(many, sample=50)
    assert drawn == unrelated_similarity(many, sample=50) and 50 * 49 // 2 - 25 <= drawn["pairs"] < 50 * 49 // 2
    assert unrelated_similarity(many[:2]) is None


def recall_without_self(exact: np.ndarray, approx: np.ndarray, rows, k: int) -> float:
    """recall@k with each query's own row left out of both lists (they hold k + 1)."""
    others = lambda lst, r: [j for j in lst if j != r][:k]  # noqa: E731
    return np.mean([len(set(others(e, r)) & set(others(a, r))) / k for e, a, r in zip(exact, approx, rows)])


def test_ivf_recall_in_meta_matches_brute_force(tmp_path):
    """The recall of the 10 nearest other rows: a query row always finds itself (its own list is probed),
    which would count as a hit that a new image does not get."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((2000, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index, described = build_search_index(vectors, ivf_above=100, nprobe=2, k=10)
    assert described["type"] == "ivf" and described["nprobe"] == 2 and described["nlist"] > 2
    rows = np.unique(np.linspace(0, 1999, 1000).round().astype(int))
    queries = vectors[rows]
    _, approx = index.search(queries, 11)
    expected = recall_without_self(brute_force_topk(vectors, queries, 11), approx, rows, 10)
    assert described["recall"] == {"k": 10, "queries": len(queries), "value": pytest.approx(expected)}
    assert 0.2 < expected < 1  # two of many lists miss some neighbours: the measurement has something to find
    with_self = np.mean([len(set(e) & set(a)) / 10 for e, a in zip(brute_force_topk(vectors, queries, 10),
                                                                     index.search(queries, 10)[1])])
    assert with_self > expected  # what counting the query's own row would have reported
    assert recall_against_exact(build_search_index(vectors)[0], vectors, rows, 10) == 1.0


def test_ivf_index_from_the_command_line_agrees_with_brute_force(tmp_path, capsys):
    """160 images make an IVF index of 4 lists when forced by --ivf-above: probing every list finds what
    exact search finds; probing one, the recall written to meta.json is the brute-force one."""
    folder = tmp_path / "images"
    for i in range(160):
        write_image(folder / f"{i:03d}.png", seed=5000 + i)
    ckpt = tiny_checkpoint(tmp_path / "c.pt")
    stores = {}
    for nprobe in (64, 1):
        out = tmp_path / f"nprobe{nprobe}"
        assert cli.embed_main(["--checkpoint", str(ckpt), "--images", str(folder), "--out", str(out), "--workers",
                               "0", "--ivf-above", "100", "--nprobe", str(nprobe), "--no-progress"]) == 0
        stores[nprobe] = read_store(out)
        assert isinstance(stores[nprobe].index, faiss.IndexIVFFlat) and stores[nprobe].meta["index"]["nlist"] == 4
    vectors = stores[1].vectors
    exact = brute_force_topk(vectors, vectors, 10)
    sims = vectors.astype(np.float64) @ vectors.T.astype(np.float64)
    all_lists_sims, all_lists = stores[64].index.search(vectors, 10)
    np.testing.assert_allclose(all_lists_sims, np.take_along_axis(sims, exact, 1), atol=1e-5)
    np.testing.assert_array_equal(all_lists[:, 0], np.arange(160))
    assert stores[64].meta["index"]["recall"]["value"] == 1.0
    _, one_list = stores[1].index.search(vectors, 11)
    expected = recall_without_self(brute_force_topk(vectors, vectors, 11), one_list, range(160), 10)
    assert stores[1].meta["index"]["recall"] == {"k": 10, "queries": 160, "value": pytest.approx(expected)}
    assert expected < 1, expected  # one list of four misses neighbours: the measurement has something to find
    capsys.readouterr()


def test_larger_images_take_the_evaluation_transform_for_folder_and_query(tmp_path, capsys):
    """Photographs larger than the view: the folder and a query image both go through decode_eval (shorter
    side to size / crop_ratio, centre crop), so each still finds itself at similarity 1."""
    folder = tmp_path / "photos"
    for i in range(6):
        write_image(folder / f"{i}.png", size=(40, 28), seed=300 + i)
    ckpt = tiny_checkpoint(tmp_path / "c.pt")
    encoder = simxent.load_encoder(ckpt)
    for ratio in ("0.5", "1.0"):
        out = tmp_path / f"ratio{ratio}"
        assert cli.embed_main(["--checkpoint", str(ckpt), "--images", str(folder), "--out", str(out), "--workers",
                               "0", "--crop-ratio", ratio, "--no-progress"]) == 0
        store = read_store(out)
        assert store.meta["crop_ratio"] == float(ratio)
        images = np.stack([decode_eval(folder / n, 16, float(ratio)) for n in store.names])
        np.testing.assert_allclose(store.vectors, reference_embeddings(encoder, images), atol=1e-5)
        capsys.readouterr()
        assert cli.search_main(["--index", str(out), "--k", "1", "--json", str(folder / "4.png")]) == 0
        best = json.loads(capsys.readouterr().out)["neighbours"][0]["neighbours"][0]
        assert best["name"] == "4.png" and abs(best["similarity"] - 1) < 1e-5
    assert not np.allclose(read_store(tmp_path / "ratio0.5").vectors, read_store(tmp_path / "ratio1.0").vectors)


def test_plain_state_dict_with_backbone(embedded, tmp_path, capsys):
    folder, ckpt, _ = embedded
    weights = tmp_path / "convnet.pth"
    torch.save(simxent.load_encoder(ckpt).state_dict(), weights)
    out = tmp_path / "plain"
    assert cli.embed_main(["--checkpoint", str(weights), "--backbone", "convnet", "--image-size", "16", "--images",
                           str(folder), "--out", str(out), "--workers", "0", "--no-progress"]) == 0
    meta = read_store(out).meta
    assert (meta["backbone"], meta["plain_state_dict"], meta["mean"]) == ("convnet", True, [0.485, 0.456, 0.406])
    capsys.readouterr()
    assert cli.embed_main(["--checkpoint", str(weights), "--images", str(folder), "--out", str(tmp_path / "x"),
                           "--workers", "0", "--no-progress"]) == 2  # without --backbone: embed's own option named
    assert "name its architecture with --backbone NAME (simxent-linear-eval, simxent-embed)" in capsys.readouterr().err
    capsys.readouterr()
    assert cli.search_main(["--index", str(out), "--k", "1", "--json", str(folder / "a" / "9.png")]) == 0
    best = json.loads(capsys.readouterr().out)["neighbours"][0]["neighbours"][0]
    assert best["name"] == "a/9.png" and abs(best["similarity"] - 1) < 1e-5
    # A query checkpoint of the other kind: said in search's terms, not linear-eval's (--backbone).
    for index, other, kind in ((out, ckpt, "a plain state dict"), (embedded[2], weights, "a simxent checkpoint")):
        assert cli.search_main(["--index", str(index), "--checkpoint", str(other), str(folder / "a" / "9.png")]) == 2
        err = capsys.readouterr().err
        assert f"is not {kind}, and the index was embedded from {kind}" in err and "--backbone" not in err, err


def index_copy(out: Path, dest: Path, **changes) -> Path:
    """A copy of the index folder ``out`` at ``dest`` whose meta.json has ``changes`` (None: key removed)."""
    shutil.copytree(out, dest)
    meta = {**json.loads((dest / "meta.json").read_text()), **changes}
    (dest / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if v is not None}))
    return dest


def test_a_query_encoder_other_than_the_index_s_is_refused_or_warned(embedded, tmp_path, capsys, caplog):
    """Another architecture is refused naming both; a copy of the checkpoint (the same weights) is searched
    with, silently; other weights of the same architecture (a run trained on into the file) are refused,
    also as the file meta.json names; an index from before the digest warns about another file; a moved
    checkpoint points at --checkpoint."""
    folder, ckpt, out = embedded
    query = str(folder / "a" / "3.png")
    cfg = load_config(None, [*TINY_RUN, "model.backbone=convnet_slim", "data.image_size=16"])
    slim, _ = backbone("convnet_slim")
    save_checkpoint({"config": to_dict(cfg), "encoder": slim.state_dict()}, tmp_path / "slim.pt")
    capsys.readouterr()
    assert cli.search_main(["--index", str(out), "--checkpoint", str(tmp_path / "slim.pt"), query]) == 2
    assert "its encoder is convnet_slim (CIFAR stem: False), the index was embedded with convnet" in capsys.readouterr().err
    shutil.copyfile(ckpt, tmp_path / "same.pt")
    with caplog.at_level(logging.WARNING, logger="simxent"):
        assert cli.search_main(["--index", str(out), "--checkpoint", str(tmp_path / "same.pt"), query]) == 0
    assert "is not the checkpoint" not in caplog.text and "weights" not in caplog.text
    state = load_checkpoint(ckpt)
    state["encoder"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in state["encoder"].items()}
    save_checkpoint(state, tmp_path / "trained_on.pt")
    capsys.readouterr()
    assert cli.search_main(["--index", str(out), "--checkpoint", str(tmp_path / "trained_on.pt"), query]) == 2
    assert "its encoder's weights are not those the index was embedded with" in capsys.readouterr().err
    trained_index = index_copy(out, tmp_path / "trained_index", checkpoint=str(tmp_path / "trained_on.pt"))
    assert cli.search_main(["--index", str(trained_index), query]) == 2
    assert "simxent-embed again" in capsys.readouterr().err
    before_digest = index_copy(out, tmp_path / "before_digest", encoder_digest=None)
    with caplog.at_level(logging.WARNING, logger="simxent"):
        assert cli.search_main(["--index", str(before_digest), "--checkpoint", str(tmp_path / "same.pt"), query]) == 0
    assert "is not the checkpoint the index was embedded with" in caplog.text
    moved = index_copy(out, tmp_path / "moved", checkpoint=str(tmp_path / "gone.pt"))
    assert cli.search_main(["--index", str(moved), query]) == 2
    assert "gone.pt (meta.json), is gone: give it with --checkpoint" in capsys.readouterr().err


def test_bad_inputs_are_one_line_naming_them(embedded, tmp_path, capsys):
    folder, ckpt, out = embedded
    capsys.readouterr()
    assert cli.search_main(["--index", str(out), str(folder / "a" / "broken.png")]) == 2
    assert "broken.png" in capsys.readouterr().err
    assert cli.search_main(["--index", str(tmp_path), str(folder / "a" / "3.png")]) == 2
    assert "meta.json not found" in capsys.readouterr().err
    assert cli.search_main(["--index", str(out / "index.faiss"), str(folder / "a" / "3.png")]) == 2
    assert f"is a file; give the folder simxent-embed wrote, {out}\n" in capsys.readouterr().err
    assert cli.search_main(["--index", str(out), "--duplicates", "1.5"]) == 2
    assert "--duplicates" in capsys.readouterr().err
    assert cli.search_main(["--index", str(out), "--k", "0", str(folder / "a" / "3.png")]) == 2
    assert "--k" in capsys.readouterr().err
    assert cli.embed_main(["--checkpoint", str(ckpt), "--images", str(folder), "--out", str(folder / "emb"),
                           "--no-progress"]) == 2
    assert "is inside --images" in capsys.readouterr().err and not (folder / "emb").exists()
    assert cli.embed_main(["--checkpoint", str(ckpt), "--images", str(tmp_path / "none"), "--out",
                           str(tmp_path / "o"), "--no-progress"]) == 2
    assert "--images" in capsys.readouterr().err
    assert cli.embed_main(["--checkpoint", str(ckpt), "--images", str(folder), "--out", str(tmp_path / "o"),
                           "--nprobe", "0"]) == 2
    assert "--nprobe" in capsys.readouterr().err


def test_a_file_name_that_is_not_utf8_is_embedded_found_and_printed_as_its_bytes(tmp_path):
    """A Latin-1 name from an unzipped Windows archive: Python holds its byte 0xE9 as a lone surrogate, which
    the cache key and names.json encoded as UTF-8 and crashed on. Text output prints the name's own bytes,
    JSON output stays valid UTF-8 and reads back to the name."""
    folder = tmp_path / "images"
    for i in range(6):
        write_image(folder / f"{i}.png", seed=i)
    odd = folder / os.fsdecode(b"caf\xe9.png")
    write_image(odd, seed=99)
    ckpt, out = tiny_checkpoint(tmp_path / "c.pt"), tmp_path / "embedded"
    assert cli.embed_main(["--checkpoint", str(ckpt), "--images", str(folder), "--out", str(out), "--workers", "0",
                           "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--projector", "0"]) == 0
    assert odd.name in read_store(out).names
    search = [sys.executable, "-m", "simxent", "search", "--index", str(out), "--k", "1", str(odd)]
    text = subprocess.run(search, capture_output=True, timeout=120)
    assert text.returncode == 0 and b"\tcaf\xe9.png\n" in text.stdout, text.stderr
    found = json.loads(subprocess.run(search + ["--json"], capture_output=True, timeout=120).stdout.decode("utf-8"))
    assert found["neighbours"][0]["neighbours"][0]["name"] == odd.name


def test_json_text_is_strict_utf8_json_that_reads_back():
    """NaN (an AUC without negatives) is null; non-ASCII stays itself unless a name is not UTF-8."""
    assert json_text({"auc": float("nan"), "f1": [float("inf"), 0.5], "class": "café"}) == \
        '{"auc": null, "f1": [null, 0.5], "class": "café"}'
    odd = os.fsdecode(b"caf\xe9.png")
    text = json_text({"names": [odd, "café"]})
    assert text.encode("utf-8") and json.loads(text) == {"names": [odd, "café"]}


def test_embedding_again_and_dying_midway_keeps_the_earlier_store_whole(embedded, tmp_path, monkeypatch):
    """A second embed into the folder writes its files under temporary names first: killed before they are
    renamed in, it leaves the earlier store as it was (and its projector), and no temporary file."""
    folder, ckpt, out = embedded
    again = tmp_path / "again"
    shutil.copytree(out, again)
    before = read_store(again)

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(faiss, "write_index", killed)
    assert cli.embed_main(["--checkpoint", str(ckpt), "--images", str(folder / "a"), "--out", str(again),
                           "--workers", "0", "--cache-dir", str(tmp_path / "cache"), "--no-progress"]) == 130
    after = read_store(again)
    assert after.names == before.names and np.array_equal(after.vectors, before.vectors)
    assert (again / "projector").is_dir()
    assert sorted(p.name for p in again.iterdir() if ".tmp" in p.name) == []


def test_a_store_whose_files_are_not_those_its_meta_records_is_refused(embedded, tmp_path, monkeypatch):
    """A search that reads while simxent-embed renames its new files in, or a store a kill left half renamed:
    the files no longer pair with meta.json, and the search stops naming the folder instead of scoring new
    vectors under the old names, decoding or checkpoint. A copy of a whole store reads as it."""
    folder, ckpt, out = embedded
    mixed = tmp_path / "mixed"
    shutil.copytree(out, mixed)
    read_store(mixed)  # a copy (new inodes and times) is the same store
    other = tmp_path / "other"
    assert cli.embed_main(["--checkpoint", str(ckpt), "--images", str(folder / "a"), "--out", str(other),
                           "--workers", "0", "--cache-dir", str(tmp_path / "cache"), "--no-progress"]) == 0
    shutil.copyfile(other / "embeddings.npy", mixed / "embeddings.npy")  # the first file renamed in, then killed
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    with pytest.raises(DataError, match=f"{mixed}'s files are not those its meta.json records"):
        read_store(mixed)


@pytest.mark.parametrize("name, damage, said", [
    ("embeddings.npy", lambda p: p.write_bytes(p.read_bytes()[:90]), "cannot be read"),
    ("index.faiss", lambda p: p.write_bytes(b"garbage"), "cannot be read"),
    ("names.json", lambda p: p.write_text("[\"a\", "), "cannot be read"),
    ("meta.json", lambda p: p.write_text(json.dumps({"count": 41})), "lacks 'index'"),
])
def test_a_damaged_store_file_is_one_line_naming_it(embedded, tmp_path, capsys, name, damage, said):
    folder, ckpt, out = embedded
    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)
    damage(damaged / name)
    if name != "meta.json":  # the file meta.json records, damaged where it was
        meta = json.loads((damaged / "meta.json").read_text())
        meta.pop("files")
        (damaged / "meta.json").write_text(json.dumps(meta))
    assert cli.search_main(["--index", str(damaged), str(folder / "a" / "3.png")]) == 2
    err = capsys.readouterr().err
    assert f"--index: {damaged / name}" in err and said in err and "Traceback" not in err


def test_a_linked_list_file_reads_the_images_beside_the_link(embedded, tmp_path):
    """Relative lines of a list file lead from the folder it is given in, as training and linear evaluation
    read it, also when it is a symbolic link to a list elsewhere."""
    folder, ckpt, out = embedded
    (tmp_path / "A").mkdir()
    (tmp_path / "B").mkdir()
    (tmp_path / "A" / "list.txt").write_text("x.png\n")
    write_image(tmp_path / "A" / "x.png", seed=1)
    shutil.copyfile(folder / "a" / "3.png", tmp_path / "B" / "x.png")
    (tmp_path / "B" / "list.txt").symlink_to(tmp_path / "A" / "list.txt")
    assert cli.embed_main(["--checkpoint", str(ckpt), "--images", str(tmp_path / "B" / "list.txt"), "--out",
                           str(tmp_path / "o"), "--workers", "0", "--no-cache", "--no-progress"]) == 0
    store, whole = read_store(tmp_path / "o"), read_store(out)
    assert store.meta["images"] == str(tmp_path / "B" / "list.txt")
    np.testing.assert_allclose(store.vectors[0], whole.vectors[whole.names.index(os.path.join("a", "3.png"))],
                               atol=1e-5)


def test_a_folder_that_held_no_store_keeps_its_projector_folder_and_dead_temp_files_go(embedded, tmp_path):
    folder, ckpt, out = embedded
    mine = tmp_path / "mine"
    (mine / "projector").mkdir(parents=True)
    (mine / "projector" / "notes.md").write_text("mine")
    dead = mine / f".embeddings.npy.999999999@{simxent.files.HOST}.abcd1234.tmp.npy"
    dead.write_bytes(b"left by a killed embedding")
    assert cli.embed_main(["--checkpoint", str(ckpt), "--images", str(folder / "a"), "--out", str(mine),
                           "--workers", "0", "--cache-dir", str(tmp_path / "cache"), "--no-progress"]) == 0
    assert (mine / "projector" / "notes.md").read_text() == "mine" and not dead.exists()


def test_embedding_again_without_a_projector_removes_the_earlier_one(embedded, tmp_path):
    folder, ckpt, out = embedded
    again = tmp_path / "again"
    shutil.copytree(out, again)
    assert cli.embed_main(["--checkpoint", str(ckpt), "--images", str(folder / "a"), "--out", str(again),
                           "--workers", "0", "--cache-dir", str(tmp_path / "cache"), "--no-progress"]) == 0
    assert not (again / "projector").exists()


def test_embedding_another_folder_into_a_store_says_what_it_replaces(embedded, tmp_path, caplog):
    folder, ckpt, out = embedded
    again = tmp_path / "again"
    shutil.copytree(out, again)
    args = ["--checkpoint", str(ckpt), "--out", str(again), "--workers", "0", "--cache-dir", str(tmp_path / "cache"),
            "--no-progress"]
    with caplog.at_level("WARNING", logger="simxent"):
        assert cli.embed_main([*args, "--images", str(folder)]) == 0  # the same folder again: nothing to say
        assert "replaced" not in caplog.text
        assert cli.embed_main([*args, "--images", str(folder / "a")]) == 0
    assert f"--out {again} held the embeddings of {folder.resolve()}: they are replaced by those of " \
           f"{(folder / 'a').resolve()}" in caplog.text


def test_python_m_simxent_dispatches_embed_and_search(embedded, capsys):
    folder, _, out = embedded
    assert cli.main(["search", "--index", str(out), "--k", "1", str(folder / "b" / "0.png")]) == 0
    assert "b/0.png" in capsys.readouterr().out


def test_threshold_one_lists_copies_whose_similarity_rounds_below_one():
    """Two copies of one unit vector whose float32 inner product FAISS rounds to just under 1: --duplicates 1
    still lists them (and not the opposite vector)."""
    for seed in range(100):
        v = np.random.default_rng(seed).standard_normal(512).astype(np.float32)
        vectors = np.stack([v, v, -v]) / np.linalg.norm(v)
        index, _ = build_search_index(vectors)
        if index.search(vectors[:1], 1)[0][0, 0] < 1:
            break
    else:
        pytest.skip("no seed whose self-similarity rounds below 1")
    assert [(i, j) for i, j, _ in duplicate_pairs(index, vectors, 1.0)] == [(0, 1)]


@pytest.mark.slow
def test_cifar10_subset_finds_itself_and_a_planted_duplicate(cifar, tmp_path, capsys):
    """The issue's check on 500 CIFAR-10 test images (50 a class; the whole folder takes minutes on 2 cores)."""
    folder = tmp_path / "cifar"
    for class_dir in sorted((cifar / "test").iterdir()):
        (folder / class_dir.name).mkdir(parents=True)
        for f in sorted(class_dir.iterdir())[:50]:
            (folder / class_dir.name / f.name).symlink_to(f.resolve())
    planted = sorted((folder / "cat").iterdir())[0]
    shutil.copyfile(planted, folder / "dog" / "planted_copy.jpg")
    ckpt = tiny_checkpoint(tmp_path / "c.pt", size=32)
    out = tmp_path / "embedded"
    assert cli.embed_main(["--checkpoint", str(ckpt), "--images", str(folder), "--out", str(out),
                           "--no-progress"]) == 0
    store = read_store(out)
    assert store.meta["count"] == 501
    queries = [str(folder / n) for n in store.names]
    capsys.readouterr()
    assert cli.search_main(["--index", str(out), "--k", "1", "--json", *queries]) == 0
    for name, row in zip(store.names, json.loads(capsys.readouterr().out)["neighbours"]):
        best = row["neighbours"][0]
        assert abs(best["similarity"] - 1) < 1e-5
        assert best["name"] == name or {best["name"], name} == {f"cat/{planted.name}", "dog/planted_copy.jpg"}
    assert cli.search_main(["--index", str(out), "--duplicates", "0.999", "--json", "--no-progress"]) == 0
    pairs = json.loads(capsys.readouterr().out)["duplicates"]
    assert {f"cat/{planted.name}", "dog/planted_copy.jpg"} in [{p["a"], p["b"]} for p in pairs]


def small_store(root: Path, n: int = 6) -> tuple[Path, Path, Path]:
    """``n`` images in one class folder, embedded into ``root/embedded``."""
    folder, out = root / "images", root / "embedded"
    for i in range(n):
        write_image(folder / "a" / f"{i}.png", seed=i)
    ckpt = tiny_checkpoint(root / "c.pt")
    assert cli.embed_main(["--checkpoint", str(ckpt), "--images", str(folder), "--out", str(out), "--workers", "0",
                           "--cache-dir", str(root / "cache"), "--no-progress"]) == 0
    return folder, ckpt, out


def test_reading_an_index_warns_when_its_folder_changed_since_embedding(tmp_path, caplog):
    """The index neither finds images added after embedding nor forgets removed ones: reading it says how many
    files came and went, and also when one was rewritten under its old name, size and modification time."""
    folder, _, out = small_store(tmp_path)
    with caplog.at_level(logging.WARNING, logger="simxent"):
        read_store(out)
    assert "changed after it was embedded" not in caplog.text
    write_image(folder / "a" / "new.png", seed=50)
    (folder / "a" / "0.png").unlink()
    with caplog.at_level(logging.WARNING, logger="simxent"):
        read_store(out)
    assert "changed after it was embedded (1 image file(s) added, 1 removed" in caplog.text
    # A BMP (its size fixed by its dimensions) rewritten with other pixels, its modification time put back.
    from PIL import Image

    bmp, again = folder / "a" / "x.bmp", tmp_path / "again"
    Image.new("RGB", (16, 16), (30, 30, 30)).save(bmp)
    assert cli.embed_main(["--checkpoint", str(tmp_path / "c.pt"), "--images", str(folder), "--out", str(again),
                           "--workers", "0", "--no-cache", "--no-progress"]) == 0
    before = bmp.stat()
    time.sleep(0.05)  # a later change time where the kernel keeps it to a coarse clock tick
    Image.new("RGB", (16, 16), (225, 225, 225)).save(bmp)
    os.utime(bmp, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (bmp.stat().st_size, bmp.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="simxent"):
        read_store(again)
    assert "changed after it was embedded (0 image file(s) added, 0 removed, others maybe rewritten)" in caplog.text


def test_two_embeddings_into_one_out_at_once_are_refused(tmp_path, capsys):
    """Their four files would interleave: one's vectors under the other's index and meta.json."""
    from simxent.rundir import run_lock

    folder, ckpt, out = small_store(tmp_path)
    meta = (out / "meta.json").read_text()
    with run_lock(out):  # held as a running simxent-embed holds it
        status = cli.embed_main(["--checkpoint", str(ckpt), "--images", str(folder), "--out", str(out),
                                 "--workers", "0", "--no-cache", "--no-progress"])
    assert status == 2 and f"--out: {out} is in use by another run (pid {os.getpid()}" in capsys.readouterr().err
    assert (out / "meta.json").read_text() == meta


def test_a_query_that_is_not_a_regular_file_is_refused(tmp_path):
    """A FIFO given as a query would block its read for ever."""
    import threading

    from simxent.search import decode_image

    fifo = tmp_path / "q.png"
    os.mkfifo(fifo)
    errors = []

    def read():
        try:
            decode_image(fifo, 16, 0.875)
        except DataError as e:
            errors.append(str(e))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(10)
    assert errors == [f"cannot read image {fifo}: not a regular file"]


def test_embeddings_are_computed_without_tf32(monkeypatch):
    """On a GPU PyTorch runs float32 convolutions in TF32 by default (about three digits): embed turns it off
    for its forward passes, whatever the caller had set (here with torch's newer flags, after which reading
    the older ones raises), and puts the caller's setting back."""
    import simxent.search as search

    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    seen = []
    real = search.extract_features

    def recording(*args, **kwargs):
        seen.append((cudnn.conv.fp32_precision, matmul.fp32_precision))
        return real(*args, **kwargs)

    monkeypatch.setattr(search, "extract_features", recording)
    before = cudnn.conv.fp32_precision, matmul.fp32_precision  # flags behind properties: set and put back by hand
    cudnn.conv.fp32_precision = matmul.fp32_precision = "tf32"
    try:
        encoder, _ = backbone("convnet")
        simxent.embed(encoder.eval(), np.zeros((2, 16, 16, 3), dtype=np.uint8))
        assert seen == [("ieee", "ieee")]
        assert (cudnn.conv.fp32_precision, matmul.fp32_precision) == ("tf32", "tf32")
    finally:
        cudnn.conv.fp32_precision, matmul.fp32_precision = before


def test_an_out_folder_holding_images_is_refused(tmp_path, capsys):
    """Marked as simxent's output, the images in --out would be left out of every later training folder above
    it (here a folder beside --images that holds a train folder)."""
    folder, ckpt, out = small_store(tmp_path)
    write_image(tmp_path / "images_too" / "train" / "c" / "0.png")
    status = cli.embed_main(["--checkpoint", str(ckpt), "--images", str(folder), "--out", str(tmp_path / "images_too"),
                             "--workers", "0", "--no-cache", "--no-progress"])
    assert status == 2 and f"--out: {tmp_path / 'images_too'} holds images" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "images_too").iterdir()) == ["train"]
    # An earlier store's folder (its projector sprite is an image) is embedded into again.
    assert cli.embed_main(["--checkpoint", str(ckpt), "--images", str(folder), "--out", str(out), "--workers", "0",
                           "--no-cache", "--no-progress", "--projector", "4"]) == 0
    assert cli.embed_main(["--checkpoint", str(ckpt), "--images", str(folder), "--out", str(out), "--workers", "0",
                           "--no-cache", "--no-progress"]) == 0


def test_a_copy_at_twice_the_size_embeds_as_its_original(tmp_path):
    """Embedded whole (crop ratio 1), a shape image and its 2x copy decode to nearly the same pixels (0.998
    here); evaluation's 0.875 would crop only the larger one and compare it zoomed in (0.985)."""
    from PIL import Image

    from simxent.demo import make_shapes

    folder = make_shapes(tmp_path / "shapes", train_per_class=3, test_per_class=1, size=16) / "train"
    first = sorted(folder.rglob("*.png"))[0]
    with Image.open(first) as im:
        im.resize((32, 32), Image.Resampling.BICUBIC).save(first.parent / "big.png")
    ckpt = tiny_checkpoint(tmp_path / "c.pt")
    assert cli.embed_main(["--checkpoint", str(ckpt), "--images", str(folder), "--out", str(tmp_path / "e"),
                           "--workers", "0", "--no-cache", "--no-progress"]) == 0
    store = read_store(tmp_path / "e")
    a, b = (store.names.index(str(f.relative_to(folder))) for f in (first, first.parent / "big.png"))
    assert float(store.vectors[a] @ store.vectors[b]) > 0.995


def test_a_folder_embedded_through_a_link_reads_as_unchanged(tmp_path, caplog):
    """meta.json names the folder (or list file) by its real path: the listing read back must be the one
    embedded, whatever path the embedding was given."""
    folder, ckpt, _ = small_store(tmp_path)
    (tmp_path / "link").symlink_to(folder, target_is_directory=True)
    (folder / "list.txt").write_text("a/1.png\na/2.png\n")
    link = tmp_path / "link"
    for images, out in ((link, tmp_path / "by_link"), (link / "list.txt", tmp_path / "by_list")):
        assert cli.embed_main(["--checkpoint", str(ckpt), "--images", str(images), "--out", str(out),
                               "--workers", "0", "--no-cache", "--no-progress"]) == 0
        with caplog.at_level(logging.WARNING, logger="simxent"):
            read_store(out)
    assert "changed after it was embedded" not in caplog.text
    Image.new("RGB", (16, 16), (9, 9, 9)).save(folder / "a" / "2.png")  # a listed image rewritten, not the list
    os.utime(folder / "a" / "2.png", (1, 1))
    with caplog.at_level(logging.WARNING, logger="simxent"):
        read_store(tmp_path / "by_list")
    assert re.search(r"by_list: the images listed in \S+list\.txt changed after it was embedded", caplog.text)


def test_search_files_refuses_a_k_below_one(tmp_path):
    folder, _, out = small_store(tmp_path)
    with pytest.raises(ConfigError, match=r"^k must be an integer >= 1, got 0$"):
        simxent.search_files(read_store(out), [folder / "a" / "1.png"], k=0)


def test_an_embedding_lists_and_stats_its_folder_once(tmp_path, monkeypatch):
    """The listing that keys the cache is the one whose digest meta.json keeps: one pass over the files."""
    import simxent.data as data

    folder, ckpt, _ = small_store(tmp_path)
    calls, real = [], data._listing
    monkeypatch.setattr(data, "_listing", lambda images: calls.append(1) or real(images))
    assert cli.embed_main(["--checkpoint", str(ckpt), "--images", str(folder), "--out", str(tmp_path / "again"),
                           "--workers", "0", "--cache-dir", str(tmp_path / "cache"), "--no-progress"]) == 0
    assert len(calls) == 1


def test_similarities_are_cosines_at_most_one():
    """A float32 inner product of a unit vector with itself can exceed 1; search and duplicates report a
    cosine, so 1 at most."""
    rng = np.random.default_rng(0)
    for _ in range(1000):  # a unit vector whose float32 inner product with itself FAISS puts above 1
        v = rng.standard_normal(128).astype(np.float32)
        v /= np.linalg.norm(v)
        index = faiss.IndexFlatIP(128)
        index.add(np.stack([v, v]))
        if index.search(v[None], 1)[0][0, 0] > 1:
            break
    else:
        pytest.skip("no float32 unit vector above 1 found")
    vectors = np.stack([v, v])
    store = simxent.search.EmbeddingStore(vectors, ["a", "b"], index, {})
    assert [s for _, s in simxent.search.nearest(store, v[None], k=2)[0]] == [1.0, 1.0]
    assert duplicate_pairs(index, vectors, 1.0) == [(0, 1, 1.0)]
