"""LayerNorm over the last dimension, fused forward and backward for small channel counts.

``layer_norm(x, weight, bias, eps)`` is ``F.layer_norm(x, (C,), weight, bias, eps)`` with the
statistics and the affine transform in fp32 and the result in x's dtype, or under autocast in
the autocast dtype (BiFormer's ``AutocastLayerNorm``), so a bf16 residual stream is read and
written once in bf16, with fp32 weights used as they are. Two implementations:

* ``"torch"``: the reference, ``F.layer_norm`` in fp32 (fp64 for fp64 inputs), cast to the
  output dtype; it serves the CPU, fp64, export and tracing.
* ``"triton"``: fused kernels (:mod:`ops._triton_layer_norm`): the forward reads x once and
  writes y and the per-row mean and rstd; the backward reads x, dy and the statistics once and
  writes dx and per-program dweight/dbias partial sums in the same kernel.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ops._dtypes import (FLOAT_DTYPES, TRITON_DTYPES, autocast_dtype, check_float_tensor,
                         describe)
from ops.gather_attention import BACKENDS, _is_compiling, is_exporting

__all__ = ['layer_norm']

TRITON_MAX_CHANNELS = 8192  # ops._triton_layer_norm.MAX_CHANNELS (not imported: needs triton)


def _validate(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
              backend: str) -> None:
    """Check shapes, dtypes, devices and eps; raise a ValueError naming the offending argument."""
    if backend not in BACKENDS:
        raise ValueError(f'backend must be one of {BACKENDS}, got {backend!r}')
    if not isinstance(x, Tensor) or x.dim() == 0:
        raise ValueError(f'x must be a tensor of at least 1 dim (..., C), got {describe(x)}')
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f'x must be a floating tensor ({FLOAT_DTYPES}), got {x.dtype}')
    chans = x.shape[-1]
    if chans == 0:
        raise ValueError('x must have at least one channel (..., C >= 1)')
    for name, t in (('weight', weight), ('bias', bias)):
        if t is not None:
            check_float_tensor(name, t, x, (chans,), f'be None or have shape (C,) = ({chans},)')
    if (isinstance(eps, bool) or not isinstance(eps, (int, float))
            or not math.isfinite(eps) or eps < 0):
        raise ValueError(f'eps must be a finite number >= 0, got {eps!r}')


def layer_norm_reference(x: Tensor, weight: Optional[Tensor] = None,
                         bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    """``F.layer_norm`` of x rounded to the output dtype, in fp32 (fp64 if x is fp64), with
    weight and bias in that precision, cast to the output dtype (no validation)."""
    out_dtype = autocast_dtype(x)
    compute = torch.promote_types(out_dtype, torch.float32)
    # A parameter's shape stays a constant under jit tracing (x's would become graph ops that
    # the ONNX LayerNormalization cannot take).
    normalized_shape = next((t.shape for t in (weight, bias) if t is not None), x.shape[-1:])
    out = F.layer_norm(x.to(out_dtype).to(compute), normalized_shape,
                       None if weight is None else weight.to(compute),
                       None if bias is None else bias.to(compute), eps)
    return out.to(out_dtype)


def layer_norm(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5, *, backend: str = 'auto') -> Tensor:
    """LayerNorm over the last dimension of x, statistics and affine transform in fp32.

    Args:
        x: (..., C) floating, C >= 1, any leading strides (fastest with unit channel stride;
            otherwise, or when the leading dims do not collapse to two strides, it is copied).
        weight, bias: optional (C,) each, any floating dtype (fp32 weights with bf16 x are used
            as they are, not cast), on x's device.
        eps: added to the variance, a finite number >= 0.
        backend: ``"auto"`` (Triton on CUDA for fp16/bf16/fp32 x, weight and bias; the torch
            reference on CPU, for fp64 and while exporting or tracing), ``"triton"`` or
            ``"torch"``. Rows wider than 8192 channels take the reference on every backend
            (no error).

    Returns:
        ``(x - mean) / sqrt(var + eps) * weight + bias``, x's shape, contiguous. Its dtype:
        under autocast for x's device type (and x not fp64) the autocast dtype, x being
        rounded to it first (as BiFormer's ``AutocastLayerNorm``: bf16 out under bf16 AMP,
        not fp32 as ``nn.LayerNorm``); otherwise x's dtype (whatever weight's). Mean and
        variance (biased) are fp32, fp64 for fp64 x. Differentiable in x, weight and bias;
        the gradients have their dtypes. Zero rows give an empty result and zero weight and
        bias gradients.
    """
    _validate(x, weight, bias, eps, backend)
    exporting, compiling = is_exporting(), _is_compiling()
    tensors = [t for t in (x, weight, bias) if t is not None]
    use_triton = x.shape[-1] <= TRITON_MAX_CHANNELS and (backend == 'triton' or (
        backend == 'auto' and x.is_cuda and not exporting
        and all(t.dtype in TRITON_DTYPES for t in tensors)))
    if not use_triton:
        return layer_norm_reference(x, weight, bias, eps)
    for name, t in (('x', x), ('weight', weight), ('bias', bias)):
        if t is not None and t.dtype not in TRITON_DTYPES:
            raise ValueError(f'the triton backend supports {name} dtypes {TRITON_DTYPES}, got '
                             f'{t.dtype}')
    from ops._triton_layer_norm import triton_layer_norm
    return triton_layer_norm(x, weight, bias, float(eps), autocast_dtype(x),
                             traced=exporting or compiling)
