"""Depthwise 2-D convolution on channels-last (B, H, W, C) maps, with a fused residual add.

``depthwise_conv2d(x, weight, bias, add=a)`` is ``a + conv(x)``, where ``conv`` is
``nn.Conv2d(C, C, (kh, kw), padding=(kh // 2, kw // 2), groups=C)`` applied to the NHWC map
(stride 1, 'same' zero padding, odd kernels). The weight is that module's (C, 1, kh, kw)
weight, so checkpoints are unchanged. Two implementations:

* ``"torch"``: the reference, ``F.conv2d`` on the permuted view, plus ``add``; it exports and
  traces.
* ``"triton"``: fused forward and backward kernels (:mod:`ops._triton_depthwise_conv`) that read
  x and add in any strides and write the result once, without layout copies.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ops._dtypes import (FLOAT_DTYPES, TRITON_DTYPES, autocast_dtype, check_float_tensor,
                         describe)
from ops.gather_attention import BACKENDS, _is_compiling, is_exporting

__all__ = ['depthwise_conv2d']



def _validate(x: Tensor, weight: Tensor, bias: Optional[Tensor], add: Optional[Tensor],
              backend: str) -> None:
    """Check shapes, dtypes and devices; raise a ValueError naming the offending argument."""
    if backend not in BACKENDS:
        raise ValueError(f'backend must be one of {BACKENDS}, got {backend!r}')
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f'x must be a 4-D tensor (B, H, W, C), got {describe(x)}')
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f'x must be a floating tensor ({FLOAT_DTYPES}), got {x.dtype}')
    chans = x.shape[3]
    if chans == 0:
        raise ValueError('x must have at least one channel (B, H, W, C >= 1)')
    if (not isinstance(weight, Tensor) or weight.dim() != 4 or weight.shape[0] != chans
            or weight.shape[1] != 1 or weight.shape[2] % 2 == 0 or weight.shape[3] % 2 == 0):
        raise ValueError(f'weight must have shape (C, 1, kh, kw) = ({chans}, 1, kh, kw) with odd '
                         f'kh, kw, got {describe(weight)}')
    if weight.dtype not in FLOAT_DTYPES:
        raise ValueError(f'weight must be a floating tensor ({FLOAT_DTYPES}), got {weight.dtype}')
    if weight.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
        raise ValueError(f'weight must have the dtype of x ({x.dtype}) outside autocast, got '
                         f'{weight.dtype}')
    if weight.device != x.device:
        raise ValueError(f'weight must be on the device of x ({x.device}), got {weight.device}')
    if bias is not None:
        if not isinstance(bias, Tensor) or tuple(bias.shape) != (chans,):
            raise ValueError(f'bias must have shape (C,) = ({chans},), got {describe(bias)}')
        if bias.dtype != weight.dtype:
            raise ValueError(f'bias must have the dtype of weight ({weight.dtype}), got '
                             f'{bias.dtype}')
        if bias.device != x.device:
            raise ValueError(f'bias must be on the device of x ({x.device}), got {bias.device}')
    if add is not None:
        check_float_tensor('add', add, x, x.shape,
                           f'have the shape of x (B, H, W, C) = {tuple(x.shape)}')


def depthwise_conv2d_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                               add: Optional[Tensor] = None) -> Tensor:
    """``F.conv2d`` on the NCHW view of x, back to NHWC, plus ``add``; contiguous (no
    validation)."""
    kernel_h, kernel_w = weight.shape[2:]
    if not is_exporting() and (x.shape[1] == 0 or x.shape[2] == 0):
        # conv2d rejects an empty map. Any per-channel product gives the empty result; this one
        # keeps the autograd graph, so the weight and bias gradients are zeros.
        out = (x * weight.sum((1, 2, 3))).to(autocast_dtype(x))
        if bias is not None:
            out = out + bias.to(out.dtype)
    else:
        out = F.conv2d(x.permute(0, 3, 1, 2), weight, bias, padding=(kernel_h // 2, kernel_w // 2),
                       groups=x.shape[3]).permute(0, 2, 3, 1)
    if add is not None:
        out = out + add
    return out.contiguous()


def depthwise_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
                     add: Optional[Tensor] = None, backend: str = 'auto') -> Tensor:
    """Depthwise convolution of an NHWC map, 'same' zero padding, plus an optional add-tensor.

    Args:
        x: (B, H, W, C) floating, any strides (fastest with unit channel stride).
        weight: (C, 1, kh, kw), odd kh and kw: the weight of
            ``nn.Conv2d(C, C, (kh, kw), padding=(kh // 2, kw // 2), groups=C)``. Its dtype must
            be x's outside autocast.
        bias: optional (C,), in weight's dtype.
        add: optional (B, H, W, C) floating tensor added to the result (a residual), any strides.
        backend: ``"auto"`` (Triton on CUDA, torch reference on CPU, for fp64 and while
            exporting or tracing), ``"triton"`` or ``"torch"``.

    Returns:
        ``conv(x) + bias + add``, (B, H, W, C) contiguous. The conv runs in x's dtype, or under
        autocast in the autocast dtype (x, weight and bias rounded to it, as ``nn.Conv2d``
        does); the result has that dtype promoted with add's (as ``add + conv(x)``). The
        Triton path accumulates in fp32 and adds ``add`` before rounding. Differentiable in x,
        weight, bias and add (add's gradient is the output gradient itself).
    """
    _validate(x, weight, bias, add, backend)
    exporting, compiling = is_exporting(), _is_compiling()
    use_triton = backend == 'triton' or (
        backend == 'auto' and x.is_cuda and not exporting
        and all(t.dtype in TRITON_DTYPES for t in (x, weight) + ((add,) if add is not None
                                                                else ())))
    if not use_triton:
        return depthwise_conv2d_reference(x, weight, bias, add)
    for name, t in (('x', x), ('weight', weight), ('add', add)):
        if t is not None and t.dtype not in TRITON_DTYPES:
            raise ValueError(f'the triton backend supports {name} dtypes {TRITON_DTYPES}, got '
                             f'{t.dtype}')
    from ops._triton_depthwise_conv import triton_depthwise_conv2d
    return triton_depthwise_conv2d(x, weight, bias, add, autocast_dtype(x),
                                   traced=exporting or compiling)
