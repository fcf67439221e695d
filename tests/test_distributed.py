"""Data parallelism on CPU with gloo over loopback: two processes must train exactly like one.

- equivalence: two processes, each holding half of a batch, give the loss, the encoder and head gradients
  (after DDP's averaging) and the weights after a few SGD steps of one process holding all of it, with
  BatchNorm over the global batch and with BatchNorm in eval mode, with five views of two sizes
  (multi-crop) and positives by label or the pairwise loss, and with a learnt temperature (its gradient
  averaged by DDP like every other parameter's);
- torchrun: a 2-process pretraining run writes one set of logs and a checkpoint that linear evaluation
  reads; a worker killed mid-run under --max-restarts 1 is restarted and the job completes from its
  checkpoint.
"""
import copy
import datetime
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from simxent import dist
from simxent.checkpoint import load_checkpoint, save_checkpoint
from simxent.config import ConfigError, ModelConfig, load_config
from simxent.demo import make_shapes
from simxent.loss import Temperature, contrastive_stats, multi_view_nt_xent, nt_xent, pairwise_nt_xent
from simxent.models import SimCLR
from simxent.rundir import record_run_id
from simxent.train import _load_data_once, log_step, pretrain, step_loss
from tests.conftest import TINY_RUN

ROOT = Path(__file__).resolve().parents[1]
N, WORLD = 8, 2  # images per batch, processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LABELS = torch.tensor([0, 1, 2, 0, 1, 1, 2, 0])  # classes spread over both processes' halves


def batches(steps, multi_crop=False):
    """Two views per image at 8 px, or (multi-crop) three at 8 px and two at 4 px."""
    g = torch.Generator().manual_seed(42)
    if not multi_crop:
        return [torch.randn(2 * N, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(steps)]
    return [[torch.randn(v * N, 3, s, s, generator=g, dtype=torch.float64) for v, s in ((3, 8), (2, 4))]
            for _ in range(steps)]


def local_views(views, rank):
    """This process's share of ``[v1; v2; ...]`` (or of each such batch in a list): its slice of the
    images, every view."""
    if isinstance(views, list):
        return [local_views(v, rank) for v in views]
    n = N // WORLD
    return torch.cat([v[rank * n : (rank + 1) * n] for v in views.split(N)])


def _worker(rank, port, modes, steps):
    """Each of ``modes`` in turn, in one process group: each spawn costs seconds."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch_dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        for mode in modes:
            _equal_to_one_process(rank, mode, steps)
    finally:
        torch_dist.destroy_process_group()


def _equal_to_one_process(rank, mode, steps):
    torch.manual_seed(0)
    # learnt_t: t is a parameter of the model, used outside DDP's forward as in training (train_step).
    reference = SimCLR(ModelConfig(backbone="convnet", head_hidden=32, head_out=16),
                       temperature=Temperature(0.5, learnable=mode == "learnt_t")).double()
    net = copy.deepcopy(reference)
    if mode != "eval_bn":
        net = dist.convert_batchnorm(net, torch.device("cpu"))
    ddp = DistributedDataParallel(net)
    for m in (reference, ddp):
        m.train(mode != "eval_bn")
    opt_ref = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    multi_crop, pairs = mode.startswith("multi_crop"), mode == "multi_crop_pairs"
    n_views, n = (5, N // WORLD) if multi_crop else (2, N // WORLD)
    labels = LABELS[rank * n : (rank + 1) * n] if multi_crop and not pairs else None
    for step, views in enumerate(batches(steps, multi_crop)):
        # One process holding the whole batch: plain BatchNorm, no gather.
        z, ref_t = reference(views), reference.temperature()
        ref_loss = (pairwise_nt_xent(z, n_views, ref_t, n_full=3) if pairs
                    else multi_view_nt_xent(z, n_views, ref_t, labels=LABELS) if multi_crop
                    else nt_xent(*z.chunk(2), ref_t))
        opt_ref.zero_grad()
        ref_loss.backward()
        # This process's half, through the training loop's own loss function.
        loss, z1, z2 = step_loss(ddp, local_views(views, rank), net.temperature(),
                                 torch.device("cpu"), None, n_views, labels,
                                 multi_view="full_pairs" if pairs else "joint", n_full=3)
        if mode == "sync_bn":  # the logged statistics are the global batch's, as in one process
            logged = {}
            log_step(SimpleNamespace(scalars=lambda values, *_, **__: logged.update(values)), None, step, {},
                     z1, z2)
            whole = contrastive_stats(*z.detach().chunk(2), anchors=N // WORLD)  # rank 0's images, all views
            assert logged == ({} if rank else pytest.approx(whole, abs=1e-6))
        opt.zero_grad()
        loss.backward()
        global_loss = dist.mean_over_processes(loss).item()
        assert abs(global_loss - ref_loss.item()) < 1e-5, (mode, step, global_loss, ref_loss.item())
        for (name, p), q in zip(net.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"{mode}: grad of {name}, step {step}: {m}")  # noqa: B023
        opt_ref.step()
        opt.step()
    for (name, a), b in zip(net.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{mode}: {name} after {steps} steps: {m}")  # noqa: B023


def test_two_processes_equal_one():
    modes = ["sync_bn", "eval_bn", "multi_crop_labels", "multi_crop_pairs", "learnt_t"]
    mp.spawn(_worker, args=(free_port(), modes, 3), nprocs=WORLD, join=True)


def _join_with_a_short_timeout(rank, port):
    """Join a gloo group through simxent.dist.init, as under torchrun; then collectives fail after 2 s (set
    after joining: on a busy machine one process may start seconds after the other)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    dist.init(torch.device("cpu"))
    torch_dist.distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=2))


def _main_first_worker(rank, port, sleep_s):
    _join_with_a_short_timeout(rank, port)
    try:
        order = []
        with dist.main_process_first():
            if rank == 0:
                time.sleep(sleep_s)  # longer than a collective may wait
            order.append(time.monotonic())
        with dist.main_process_first():  # a second block waits for its own end, not the first's
            if rank == 0:
                time.sleep(sleep_s)
            order.append(time.monotonic())
        ends = [torch.zeros(2, dtype=torch.float64) for _ in range(WORLD)]
        torch_dist.all_gather(ends, torch.tensor(order, dtype=torch.float64))
        assert ends[1][0] >= ends[0][0] and ends[1][1] >= ends[0][1] >= ends[0][0] + sleep_s
    finally:
        torch_dist.destroy_process_group()


class Decoded(list):
    """What load_data returns in place of the training images: their files."""

    @property
    def files(self):
        return list(self)


DECODED = (Decoded(["a.png", "b.png"]), None, None)


def _uncached_load_worker(rank, port, sleep_s):
    import simxent.train
    from simxent.config import load_config
    from simxent.data import DataError
    _join_with_a_short_timeout(rank, port)
    try:
        started = []
        simxent.train.load_data = lambda *args, **kwargs: started.append(time.monotonic()) or time.sleep(sleep_s) or \
            DECODED
        cfg = load_config(None, ["data.cache=false"])
        assert simxent.train._load_data_once(cfg, False, None, None) == DECODED
        starts = [torch.zeros(1, dtype=torch.float64) for _ in range(WORLD)]
        torch_dist.all_gather(starts, torch.tensor(started, dtype=torch.float64))  # no one waits here long
        assert abs(starts[0].item() - starts[1].item()) < sleep_s  # at once, not one after the other
        # Each decoded on its own, and one could not read a file: every process stops, saying so.
        simxent.train.load_data = lambda *args, **kwargs: (Decoded(["a.png", "b.png"][rank:]), None, None)
        with pytest.raises(DataError, match="process 0: 2, process 1: 1 images"):
            simxent.train._load_data_once(cfg, False, None, None)
        simxent.train.load_data = lambda *args, **kwargs: (Decoded(["a.png", "b.png"][::1 - 2 * rank]), None, None)
        with pytest.raises(DataError, match="process 1: 2 images, listed in another order"):
            simxent.train._load_data_once(cfg, False, None, None)
    finally:
        torch_dist.destroy_process_group()


def _slow_other_worker(rank, port, sleep_s):
    """Rank 1's block (a decode its node's cache lacks) outlasts the collectives' timeout."""
    _join_with_a_short_timeout(rank, port)
    try:
        with dist.main_process_first():
            if rank == 1:
                time.sleep(sleep_s)
        torch_dist.all_reduce(torch.ones(1))  # rank 0 waited for rank 1 on the store, not here
    finally:
        torch_dist.destroy_process_group()


def _two_node_cache_worker(rank, port, sleep_s):
    """Three processes on two nodes: rank 0 on the first, ranks 1 and 2 (local ranks 0 and 1) on the second."""
    import simxent.train
    from simxent.config import load_config
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="3",
                      LOCAL_RANK=str(0 if rank < 2 else 1))
    dist.init(torch.device("cpu"))
    try:
        spans = []
        simxent.train.load_data = lambda *args, **kwargs: spans.append(time.monotonic()) or time.sleep(sleep_s) or \
            spans.append(time.monotonic()) or DECODED
        assert simxent.train._load_data_once(load_config(None, []), False, None, None) == DECODED
        gathered = [torch.zeros(2, dtype=torch.float64) for _ in range(3)]
        torch_dist.all_gather(gathered, torch.tensor(spans, dtype=torch.float64))
        (_, end0), (start1, end1), (start2, _) = (g.tolist() for g in gathered)
        assert end0 <= start1 and end1 <= start2  # one process of the second node decodes, then the other reads
    finally:
        torch_dist.destroy_process_group()


def test_a_node_without_the_cache_fills_it_once_not_once_per_process():
    """Node-local caches: the first process of each node decodes into its node's cache before the node's
    other processes read it (all at once, each decoded the whole folder, each with the disk space of a copy)."""
    mp.spawn(_two_node_cache_worker, args=(free_port(), 1), nprocs=3, join=True)


def test_a_process_slower_than_rank_zero_is_waited_for_on_the_store():
    mp.spawn(_slow_other_worker, args=(free_port(), 3), nprocs=WORLD, join=True)


def test_without_a_cache_every_process_decodes_at_once_and_all_stop_if_they_read_different_images():
    """Nothing to share: one after the other would leave rank 0 in a collective for a whole decode. Decoded
    apart, the processes may hold different images (a folder being written): a different count of steps
    per epoch hung the job, a different order trained on some images twice."""
    mp.spawn(_uncached_load_worker, args=(free_port(), 3), nprocs=WORLD, join=True)


def test_rank_zero_first_outlasts_the_collectives_timeout():
    """Rank 0 alone (decoding the cache, scoring kNN) for longer than the process group's timeout: the
    others wait for it, and run their block after it ends."""
    mp.spawn(_main_first_worker, args=(free_port(), 3), nprocs=WORLD, join=True)


def test_only_the_main_process_reads_the_validation_folder_and_the_knn_bank(tmp_path, monkeypatch):
    """kNN is scored by rank 0 alone: the others must not decode data.val, nor the bank (with training
    images padded for crops, a second decode of data.train in every process's memory). A data.val whose
    classes differ from data.train's stops the main process, which reads it, and not the others."""
    shapes = make_shapes(tmp_path / "shapes", train_per_class=4, test_per_class=2, size=16)
    (shapes / "test" / "circle").rename(shapes / "test" / "other")
    cfg = load_config(None, [*TINY_RUN, f"data.train={shapes / 'train'}", f"data.val={shapes / 'test'}",
                             "data.cache=false"])
    with pytest.raises(ConfigError, match="classes of"):
        _load_data_once(cfg, False, None, None)
    monkeypatch.setattr(dist, "is_main", lambda: False)
    train, val, bank = _load_data_once(cfg, False, None, None)
    assert len(train) == 20 and val is None and bank is None


@pytest.mark.parametrize("momentum, track, affine", [(None, True, True), (0.3, True, True), (0.1, False, True),
                                                     (0.1, False, False)],
                         ids=["cumulative", "momentum", "untracked", "bare"])
def test_global_batchnorm_normalises_and_tracks_as_batchnorm_over_the_global_batch(monkeypatch, momentum, track,
                                                                                    affine):
    """Two processes holding the same 6 rows (the all-reduce doubles each sum) against BatchNorm over the
    12 rows: outputs, gradients and running statistics, also with a user's momentum=None (the cumulative
    average), track_running_stats=False or no affine parameters either (which crashed)."""
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist.dist_nn, "all_reduce", lambda t: t * 2)
    reference = torch.nn.BatchNorm1d(4, momentum=momentum, track_running_stats=track, affine=affine).double()
    ours = dist.convert_batchnorm(copy.deepcopy(reference), torch.device("cpu"))
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        x = (torch.randn(6, 4, generator=g, dtype=torch.float64) * 3 + 1).requires_grad_()
        want = reference(torch.cat([x, x]))[:6]
        got = ours(x)
        torch.testing.assert_close(got, want)
        if affine:
            torch.testing.assert_close(torch.autograd.grad(got.pow(2).sum(), ours.weight)[0],
                                       torch.autograd.grad(want.pow(2).sum(), reference.weight)[0])
    torch.testing.assert_close(ours.state_dict(), reference.state_dict())


def test_a_streamed_folders_bad_files_are_reported_from_every_process(monkeypatch):
    """Under torchrun each process streams its own slice of a streamed folder and finds that slice's bad
    files: skipped_images.txt and summary.json list every process's, each file once."""
    from simxent.data import ImageStream
    from simxent.train import skipped_everywhere
    stream = ImageStream(files=["a.jpg", "b.jpg", "c.jpg"], labels=torch.zeros(3, dtype=torch.long), classes=[],
                         size=8, skipped=["a.jpg"], reasons={"a.jpg": "truncated"})
    other = [{"file": "c.jpg", "reason": "cannot identify image file"}, {"file": "a.jpg", "reason": "truncated"}]
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "gather_objects", lambda mine: [mine, other])
    assert skipped_everywhere(stream) == [{"file": "a.jpg", "reason": "truncated"}, other[0]]


RE_ESTIMATION_FAILURES = (None, "unreadable", "out of memory", "out of memory gathering")


def _re_estimation_worker(rank, port):
    """Re-estimation under BatchNorm over the global batch, every process on the same images, once without a
    failure and once with each of RE_ESTIMATION_FAILURES in one process (rank 1 cannot read the images again;
    rank 0 runs out of memory gathering them, or after its first batch): with a failure, both keep training's
    statistics and go on to the next collective (before, the other waited in the pass's collectives, or left
    them mid-way, and both timed out after 2 s); without, both hold what one process computes with plain
    BatchNorm (not a variance over W copies of the images). One group for all cases: each spawn costs seconds."""
    import simxent.evaluate
    import simxent.train

    _join_with_a_short_timeout(rank, port)
    originals = simxent.train.evaluation_images, simxent.evaluate.encoder_inputs
    try:
        for failure in RE_ESTIMATION_FAILURES:
            try:
                _re_estimate_once(rank, failure)
            finally:
                simxent.train.evaluation_images, simxent.evaluate.encoder_inputs = originals
    finally:
        torch_dist.destroy_process_group()


def _re_estimate_once(rank, failure):
    import simxent.evaluate
    import simxent.train
    from simxent.augment import Normalize
    from simxent.data import ImageArray
    from simxent.evaluate import reestimate_batchnorm

    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    encoder = dist.convert_batchnorm(copy.deepcopy(plain), torch.device("cpu"))
    before = copy.deepcopy(encoder.state_dict())
    images = torch.randint(0, 256, (8, 8, 8, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    cfg = load_config(None, ["train.bn_recalibration=8", "data.image_size=8", "eval.batch_size=4"])
    normalize = Normalize((0.5,) * 3, (0.25,) * 3)
    run = SimpleNamespace(cfg=cfg, train=ImageArray(images, torch.zeros(8, dtype=torch.long), ["a"], [""] * 8, []),
                          main=rank == 0, device=torch.device("cpu"), dtype=None,
                          net=SimpleNamespace(encoder=encoder), views=SimpleNamespace(full=SimpleNamespace(
                              normalize=normalize)))
    if failure == "unreadable" and rank == 1:
        def gone(*_):
            raise OSError("photo.jpg: No such file or directory")
        simxent.train.evaluation_images = gone
    if failure == "out of memory gathering" and rank == 0:  # the images gathered on a GPU
        def too_many(*_):
            raise torch.OutOfMemoryError("CUDA out of memory")
        simxent.train.evaluation_images = too_many
    if failure == "out of memory" and rank == 0:
        inputs = simxent.evaluate.encoder_inputs

        def one_batch_then_out_of_memory(*args, **kwargs):
            yield next(inputs(*args, **kwargs))
            raise torch.OutOfMemoryError("CUDA out of memory")
        simxent.evaluate.encoder_inputs = one_batch_then_out_of_memory
    simxent.train.recalibrate_batchnorm(run)
    if failure:
        expected = before
    else:
        reestimate_batchnorm(plain, images, normalize, torch.device("cpu"), batch_size=4, channels_last=False)
        expected = plain.state_dict()
    for key, value in encoder.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=1e-6, atol=1e-7, msg=f"failure {failure}: {key}")
    dist.wait_for_all()  # both got here


def test_batchnorm_re_estimation_has_one_outcome_in_every_process():
    mp.spawn(_re_estimation_worker, args=(free_port(),), nprocs=WORLD, join=True)


def test_a_job_that_torchrun_may_restart_under_its_default_id_is_warned(tmp_path, monkeypatch, caplog):
    """--master-port without --rdzv-id gives every job the id 'none': a restart of one took an earlier job's
    checkpoints in the same out as its own, and trained them on (a new user's trial)."""
    shapes = make_shapes(tmp_path / "shapes", train_per_class=4, test_per_class=1, size=16)
    args = [*TINY_RUN, f"data.train={shapes / 'train'}", "train.epochs=1", "eval.every=0", "train.batch_size=4"]
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    for restarts, warned in (("0", False), ("1", True)):
        monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", restarts)
        caplog.clear()
        with caplog.at_level("WARNING", logger="simxent"):
            pretrain(load_config(None, [*args, f"out={tmp_path / restarts}"]), progress=False)
        assert ("torchrun's job id is 'none'" in caplog.text) is warned
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "c3b0a5f2")
    assert not dist.job_id_is_torchruns_default()


def test_a_signal_while_joining_the_group_ends_the_process(monkeypatch):
    """Joining waits inside a C call, where a Python handler (simxent's stop request) never runs: a process
    whose peer died before joining heard torchrun's SIGTERM only as its SIGKILL 30 s later. While it joins,
    SIGTERM and SIGINT end it at once; afterwards the run's handlers are back."""
    import simxent.dist

    seen = {}

    def joining(*args, **kwargs):
        seen.update({sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)})

    def stop_requested(signum, frame):
        pass

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(simxent.dist, "rendezvous", lambda *args, **kwargs: iter([(torch_dist.HashStore(), 0, 2)]))
    monkeypatch.setattr(torch_dist, "init_process_group", joining)
    monkeypatch.setattr(torch_dist, "is_initialized", lambda: False)
    previous = {sig: signal.signal(sig, stop_requested) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        dist.init(torch.device("cpu"))
        assert seen == {signal.SIGTERM: signal.SIG_DFL, signal.SIGINT: signal.SIG_DFL}
        assert all(signal.getsignal(sig) is stop_requested for sig in previous)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        simxent.dist._store = None


def test_gather_is_identity_in_one_process():
    x = torch.randn(3, 4, requires_grad=True)
    assert dist.gather_with_grad(x) is x and dist.world_size() == 1 and dist.is_main()


# --- torchrun, end to end -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"), train_per_class=16, test_per_class=6, size=16)


def torchrun(shapes, out, *more, restarts=0):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           f"--max-restarts={restarts}", str(ROOT / "scripts" / "pretrain.py"), "--no-progress",
           *TINY_RUN, f"data.train={shapes / 'train'}", f"data.val={shapes / 'test'}", "eval.knn_k=5",
           "train.log_every=1", f"out={out}", *more]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_torchrun_two_processes_pretrain_and_evaluate(shapes, tmp_path):
    run = tmp_path / "run"
    proc = torchrun(shapes, run, "train.epochs=2")
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert state["position"] == {"epoch": 2, "step": 0, "global_step": 10}
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 1  # rank 0 alone writes logs
    assert "x2" in (run / "train.log").read_text()
    evaluation = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "linear_eval.py"), "--checkpoint", str(run / "checkpoints" / "last.pt"),
         "--train", str(shapes / "train"), "--test", str(shapes / "test"), "--epochs", "3", "--knn-k", "5",
         "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert evaluation.returncode == 0, evaluation.stderr
    assert "pretrained" in evaluation.stdout


def test_batch_must_divide_by_world_size(shapes, tmp_path):
    proc = torchrun(shapes, tmp_path / "run", "train.batch_size=15", "train.epochs=1")
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "must divide by the 2 processes" in output


def _children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_killed_worker_is_restarted_and_the_job_completes(shapes, tmp_path):
    run = tmp_path / "run"
    proc = torchrun(shapes, run, "train.epochs=14", "train.checkpoint_every=2", "eval.every=0", restarts=1)
    checkpoint = run / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = _children(proc.pid)
    assert checkpoint.exists() and len(workers) == 2, "the run ended or stalled before it could be killed"
    os.kill(workers[1], signal.SIGKILL)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    assert "resumed from" in output
    state = load_checkpoint(checkpoint)
    assert state["position"] == {"epoch": 14, "step": 0, "global_step": 70}


def test_a_restart_never_takes_over_another_run_and_every_process_resumes_one_file(shapes, tmp_path):
    """A torchrun job refused at its start (out holds another run) is refused again by its restart, which
    once took the other run as its own. And an older run (no run ids: they came later) resumed by two
    processes: the main process records a new id as it claims out; the other must not look for that id's
    checkpoints (finding none, it started from step 0, with other weights, until the first collective hung)."""
    run, last = tmp_path / "run", tmp_path / "run" / "checkpoints" / "last.pt"
    pretrain(load_config(None, [*TINY_RUN, f"data.train={shapes / 'train'}", "train.epochs=2", "eval.every=0",
                                f"out={run}"]), progress=False)
    proc = torchrun(shapes, run, "train.epochs=4", restarts=1)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0 and output.count("holds run") >= 2, output
    # The other process says in one line that the main one stopped, without the process group's traceback.
    assert "process 1: the main process stopped" in output and "[rank1]:" not in output, output
    assert load_checkpoint(last)["position"]["global_step"] == 10
    state = {k: v for k, v in load_checkpoint(last).items() if k != "run_id"}
    for old in (*run.glob("checkpoints/step-*.pt"), run / "run.json"):
        old.unlink()
    save_checkpoint(state, last)
    proc = torchrun(shapes, run, "train.epochs=4", "train.resume=auto")
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "resumed from" in output, output
    assert load_checkpoint(last)["position"] == {"epoch": 4, "step": 0, "global_step": 20}


def test_a_restart_of_a_job_launched_from_a_file_continues_from_the_jobs_own_checkpoint(shapes, tmp_path,
                                                                                       monkeypatch):
    """torchrun restarts a failed job with the arguments it was launched with. A restart of a job launched
    with train.resume=PATH goes on from the job's newest checkpoint: resuming PATH again set the job's own
    steps aside as a superseded branch and trained them a second time. Before the job's first save, the
    restart starts from PATH (not from the folder's newest file, which is the line PATH branches from)."""
    run = tmp_path / "run"
    base = [*TINY_RUN, f"data.train={shapes / 'train'}", "eval.every=0", "train.keep_checkpoints=10", f"out={run}"]
    pretrain(load_config(None, [*base, "train.epochs=2"]), progress=False)
    first, second = sorted((run / "checkpoints").glob("step-*.pt"))[:2]
    launched = load_config(None, [*base, "train.epochs=3", f"train.resume={first}"])
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    pretrain(launched, progress=False)  # the job's first attempt: epochs 2 and 3 from epoch 1's file
    branches = set((run / "checkpoints").glob("superseded-*"))
    assert [p.name for p in next(iter(branches)).glob("step-*.pt")] == [second.name]  # the former epoch 2
    own = {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").glob("step-*.pt")}
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    first.rename(tmp_path / "rotated.pt")  # keep_checkpoints rotated the launch file away: not needed now
    pretrain(launched, progress=False)
    (tmp_path / "rotated.pt").rename(first)
    own[first.name] = first.stat().st_mtime_ns
    assert {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").glob("step-*.pt")} == own
    assert set((run / "checkpoints").glob("superseded-*")) == branches
    assert load_checkpoint(run / "checkpoints" / "last.pt")["position"]["epoch"] == 3

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job2")  # claimed out, then failed before its first save
    record_run_id(run, load_checkpoint(first)["run_id"], "job2")
    pretrain(launched, progress=False)
    later = set((run / "checkpoints").glob("superseded-*")) - branches
    assert len(later) == 1 and {p.name for p in next(iter(later)).glob("step-*.pt")} == set(own) - {first.name}
