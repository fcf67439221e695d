"""The encoders of the CPU encoder study (docs/studies.md, "The CPU encoder's widths and depth"), as
``model.backbone=encoder_variants:NAME`` with ``PYTHONPATH=scripts``. Each is the convnet (four 3x3
conv-BN-ReLU stages of 64, 128, 256 and 512 channels, strides 1, 2, 2, 2, then global average pooling)
changed in one place; ``convnet_slim`` (32 channels in the first stage) is simxent's own, and the last
two variants change its widths (``slim_narrow34`` in two stages).
"""
from torch import nn

from simxent.models import ConvNet


def _stage(c_in: int, c_out: int, stride: int = 1, kernel: int = 3) -> list:
    """conv (``kernel`` x ``kernel``, ``stride``, no bias) -> BatchNorm -> ReLU, as the convnet's stages."""
    return [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True)]


class _Residual(nn.Module):
    """x + two 3x3 conv-BN-ReLU stages of ``c`` channels."""

    def __init__(self, c: int):
        super().__init__()
        self.f = nn.Sequential(*_stage(c, c), *_stage(c, c))

    def forward(self, x):
        return x + self.f(x)


class _Pool(nn.Module):
    """Global average pooling to (B, C)."""

    def forward(self, x):
        return x.mean(dim=(2, 3))


def _net(first: int, *middle) -> nn.Sequential:
    """Stages 3 -> ``first`` -> 128 (stride 2) -> 256 (stride 2), then the stages ``middle`` (the convnet's
    is one, 256 -> 512 at stride 2), then the pooling."""
    return nn.Sequential(*_stage(3, first), *_stage(first, 128, 2), *_stage(128, 256, 2), *middle, _Pool())


def expand1024():
    """A 1x1 stage from 512 to 1024 channels after the last: 1024-d features."""
    return _net(64, *_stage(256, 512, 2), *_stage(512, 1024, 1, 1))


def wide4():
    """The last stage 1024 channels wide: 1024-d features."""
    return _net(64, *_stage(256, 1024, 2))


def deep3():
    """A second 3x3 stage of 256 channels before the last."""
    return _net(64, *_stage(256, 256), *_stage(256, 512, 2))


def slim_deep3():
    """deep3 with the first stage of convnet_slim (32 channels)."""
    return _net(32, *_stage(256, 256), *_stage(256, 512, 2))


def slim_res3():
    """convnet_slim with a residual block of two 256-channel stages before the last stage."""
    return _net(32, _Residual(256), *_stage(256, 512, 2))


def slim_deep34():
    """slim_deep3 with a second 512-channel stage after the last."""
    return _net(32, *_stage(256, 256), *_stage(256, 512, 2), *_stage(512, 512))


def slim_narrow34():
    """convnet_slim with its last two stages 3/4 as wide (192 and 384 channels): 384-d features."""
    return ConvNet((32, 128, 192, 384))


def slim_half2():
    """convnet_slim with its second stage half as wide (64 channels)."""
    return ConvNet((32, 64, 256, 512))
