"""Convolutions on small feature maps as matrix products, for bf16 and float32 training on the CPU.

A convolution of x (N, C, H, W) with w (O, C, k, k) is one matrix product over patches. Let X be the
(N Ho Wo, k² C) matrix whose row (n, i, j) holds the k x k x C input patch under output position (i, j) of
image n (zero padding included), and W the (O, k² C) matrix of the weights in the same order. Then, with G
the (N Ho Wo, O) matrix of dL/dy:

    y = X Wᵀ,    dL/dW = Gᵀ X,    dL/dX = G W,

and dL/dx is dL/dX scattered back: each patch's gradient added onto the input positions it was read from.

Why: oneDNN's convolution kernels are slow on maps of a few positions (the convnet's last stage: 3 x 3
and 2 x 2 outputs at 512 channels), its backward most of all; there the three products above take a
fraction of the time (docs/benchmarks.md, "Encoder step against the machine's ceiling"). On larger maps
oneDNN wins, so :class:`Conv2d` uses the products only in training on the CPU, under bf16 autocast or in
float32, on outputs of at most ``MAX_POSITIONS`` positions for that dtype, and is ``nn.Conv2d`` everywhere
else (same parameters, same state dict).
``model.matmul_convs`` (on by default) gives the encoder's convolutions this class.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# The largest output, in positions, that takes the products, by the dtype they run in: bf16 (under CPU bf16
# autocast) up to 4 x 4, float32 (no autocast) up to 3 x 3. Chosen by benchmark --only convs and the training
# loop (docs/benchmarks.md, "Convolutions on small maps as matrix products").
MAX_POSITIONS = {torch.bfloat16: 16, torch.float32: 9}


def output_size(size: int, k: int, stride: int, padding: int) -> int:
    """A convolution's output side: floor((size + 2 padding - k) / stride) + 1."""
    return (size + 2 * padding - k) // stride + 1


def _taps(xp: torch.Tensor, k: int, stride: int, ho: int, wo: int):
    """((i, j), view) for each kernel tap: the (N, Ho, Wo, C) positions of the padded NHWC ``xp`` it reads."""
    for i in range(k):
        for j in range(k):
            yield (i, j), xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]


def _patches(x: torch.Tensor, k: int, stride: int, padding: int, ho: int, wo: int) -> torch.Tensor:
    """X: the (N Ho Wo, k² C) patch matrix of x (N, C, H, W), columns ordered (kernel row, column, channel)."""
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, padding, padding, padding, padding))
    return torch.cat([tap for _, tap in _taps(xp, k, stride, ho, wo)], dim=-1).reshape(-1, k * k * x.shape[1])


def _weight_matrix(w: torch.Tensor) -> torch.Tensor:
    """W: the (O, k² C) weights, columns in the patch matrix's order."""
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)


def _scatter_patches(grad_patches: torch.Tensor, x: torch.Tensor, k: int, stride: int, padding: int) -> torch.Tensor:
    """dL/dx (N, C, H, W): each (N Ho Wo, k² C) patch gradient added onto the input positions it was read
    from, summed in float32 at least (up to k² patches overlap on one position), padding cropped off."""
    n, c, h, w = x.shape
    grad_xp = x.new_zeros((n, h + 2 * padding, w + 2 * padding, c), dtype=torch.promote_types(x.dtype, torch.float32))
    ho, wo = output_size(h, k, stride, padding), output_size(w, k, stride, padding)
    grad_patches = grad_patches.view(n, ho, wo, k, k, c)
    for (i, j), tap in _taps(grad_xp, k, stride, ho, wo):
        tap += grad_patches[:, :, :, i, j]
    return grad_xp[:, padding:padding + h, padding:padding + w].to(x.dtype).permute(0, 3, 1, 2)


class _MatmulConv2d(torch.autograd.Function):
    """The convolution and its gradients as the products of the module docstring."""

    @staticmethod
    def forward(ctx, x, w, stride: int, padding: int):
        n, _, h, wd = x.shape
        k = w.shape[2]
        ho, wo = output_size(h, k, stride, padding), output_size(wd, k, stride, padding)
        y = _patches(x, k, stride, padding, ho, wo) @ _weight_matrix(w).t()
        ctx.save_for_backward(x, w)  # the patches are rebuilt in backward: memory as a convolution's
        ctx.stride, ctx.padding = stride, padding
        # NHWC memory: channels_last as it is, copied to x's own layout otherwise (as nn.Conv2d returns it)
        layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        return y.view(n, ho, wo, -1).permute(0, 3, 1, 2).contiguous(memory_format=layout)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x, w = ctx.saved_tensors
        k, (ho, wo) = w.shape[2], grad_y.shape[2:]
        g = grad_y.permute(0, 2, 3, 1).reshape(-1, w.shape[0])
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = _scatter_patches(g @ _weight_matrix(w), x, k, ctx.stride, ctx.padding)
        if ctx.needs_input_grad[1]:
            grad_w = (g.t() @ _patches(x, k, ctx.stride, ctx.padding, ho, wo)).view(w.shape[0], k, k, -1)
            grad_w = grad_w.permute(0, 3, 1, 2)
        return grad_x, grad_w, None, None


def conv2d_as_matmul(x: torch.Tensor, w: torch.Tensor, stride: int = 1, padding: int = 0) -> torch.Tensor:
    """``F.conv2d(x, w, stride=stride, padding=padding)`` (square kernel, no bias, groups or dilation) as
    matrix products, forward and backward, in the dtype of x and w."""
    return _MatmulConv2d.apply(x, w, stride, padding)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` whose forward and backward are :func:`conv2d_as_matmul` where :meth:`uses_matmul` says
    so, and ``nn.Conv2d``'s own everywhere else."""

    def matmul_dtype(self) -> torch.dtype | None:
        """The dtype the products would run in on the CPU: bf16 under bf16 autocast, float32 without
        autocast for float32 weights, None otherwise (fp16 autocast, float64)."""
        if torch.is_autocast_enabled("cpu"):
            return torch.bfloat16 if torch.get_autocast_dtype("cpu") == torch.bfloat16 else None
        return torch.float32 if self.weight.dtype == torch.float32 else None

    def uses_matmul(self, x: torch.Tensor) -> bool:
        """Whether ``self(x)`` takes the matrix products: in training (gradients on) on the CPU, under bf16
        autocast (a float32 or bf16 batch) or in float32 without autocast, for a batch (N, C, H, W) with an
        output of 1 to ``MAX_POSITIONS[dtype]`` positions, and for a layer they cover (square kernel, stride
        and zero padding; no bias, groups or dilation)."""
        dtype = self.matmul_dtype()
        if (x.device.type != "cpu" or not torch.is_grad_enabled() or torch.compiler.is_compiling() or dtype is None
                or x.ndim != 4 or x.dtype not in (torch.float32, dtype) or isinstance(self.padding, str)):
            return False
        (k, k2), (s, s2), (p, p2) = self.kernel_size, self.stride, self.padding
        if (k, s, p) != (k2, s2, p2) or self.bias is not None or self.groups != 1 or self.dilation != (1, 1) \
                or self.padding_mode != "zeros":
            return False
        ho, wo = (output_size(side, k, s, p) for side in x.shape[-2:])
        return ho >= 1 and wo >= 1 and ho * wo <= MAX_POSITIONS[dtype]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.uses_matmul(x):
            return super().forward(x)
        dtype = self.matmul_dtype()
        with torch.autocast("cpu", enabled=False):
            return conv2d_as_matmul(x.to(dtype), self.weight.to(dtype), self.stride[0], self.padding[0])


def use_matmul_convs(net: nn.Module) -> nn.Module:
    """Make every plain ``nn.Conv2d`` inside ``net`` a :class:`Conv2d`, in place, and return ``net``.

    The class of each layer is swapped rather than the layer rebuilt: :class:`Conv2d` adds no state, so
    parameters, buffers, hooks and state-dict keys stay exactly as they were."""
    for module in net.modules():
        if type(module) is nn.Conv2d:
            module.__class__ = Conv2d
    return net
