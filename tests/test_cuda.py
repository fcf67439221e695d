"""The CUDA path: skipped without a GPU (CI has none); run on a lent GPU before recording GPU figures."""
import pytest
import torch
import torch.nn.functional as F

from simxent.augment import ViewAugment
from simxent.checkpoint import load_checkpoint
from simxent.config import AugmentConfig, load_config
from simxent.demo import make_shapes
from simxent.loss import nt_xent
from simxent.train import pretrain
from tests.conftest import TINY_RUN

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_loss_and_gradients_on_cuda_match_float64_reference():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 128, generator=g, dtype=torch.float64), torch.randn(256, 128, generator=g, dtype=torch.float64)
    ref_a, ref_b = a.clone().requires_grad_(), b.clone().requires_grad_()
    z = F.normalize(torch.cat([ref_a, ref_b]), dim=1)
    logits = (z @ z.T / 0.1).masked_fill(torch.eye(512, dtype=torch.bool), float("-inf"))
    ref = F.cross_entropy(logits, torch.arange(512).roll(256))
    ref.backward()
    ca, cb = a.float().cuda().requires_grad_(), b.float().cuda().requires_grad_()
    loss = nt_xent(ca, cb, 0.1)
    loss.backward()
    assert abs(loss.item() - ref.item()) < 1e-5
    torch.testing.assert_close(ca.grad.cpu().double(), ref_a.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(cb.grad.cpu().double(), ref_b.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("temperature", [0.1, "tensor"])
def test_loss_never_syncs_with_the_host(temperature):
    """A float temperature copied to the GPU at every call would wait for the stream at every call."""
    z1, z2 = (torch.randn(256, 128, device="cuda", requires_grad=True) for _ in range(2))
    t = torch.tensor(0.1, device="cuda") if temperature == "tensor" else temperature
    nt_xent(z1, z2, t).backward()  # first call: kernel loading, allowed to sync
    torch.cuda.set_sync_debug_mode("error")
    try:
        nt_xent(z1, z2, t).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(z1.grad).all()


@pytest.mark.parametrize("size,order", [(32, "batch"), (96, "batch"), (32, "image")])
def test_augmentation_never_syncs_with_the_host(size, order):
    """A host sync inside the view pipeline would stall the GPU stream every step (per-image jitter orders
    included: masks, not subsets)."""
    aug = ViewAugment(AugmentConfig(solarize_p=0.2, jitter_order=order), size).cuda()
    x = torch.randint(0, 256, (64, 3, size + 8, size + 8), dtype=torch.uint8, device="cuda")
    aug(x)  # first call: kernel loading, allowed to sync
    torch.cuda.set_sync_debug_mode("error")
    try:
        views = aug(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert views.shape == (64, 3, size, size) and torch.isfinite(views).all()


def test_tiny_pretraining_on_cuda(tmp_path):
    shapes = make_shapes(tmp_path / "shapes", train_per_class=16, test_per_class=6, size=16)
    cfg = load_config(None, [*TINY_RUN, f"data.train={shapes / 'train'}", f"data.val={shapes / 'test'}",
                             "train.epochs=2", "eval.knn_k=5", "optim.name=lars", f"out={tmp_path / 'run'}"])
    summary = pretrain(cfg, progress=False)
    assert summary["global_step"] == 10 and summary["skipped_steps"] == 0
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt", map_location="cpu")
    assert all(torch.isfinite(v).all() for v in state["encoder"].values() if v.is_floating_point())
    # Resumed on the GPU: the checkpoint is loaded onto it, RNG states included, which torch sets from the CPU.
    cfg.train.epochs, cfg.train.resume = 3, "auto"
    assert pretrain(cfg, progress=False)["global_step"] == 15
