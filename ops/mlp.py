"""Two-layer GELU MLP, ``fc2(gelu(fc1(x)))``, that keeps less for the backward pass.

Autograd's ``Linear -> GELU -> Linear`` saves three activations per token: fc1's input, the
pre-activation ``h`` (for the GELU gradient) and ``gelu(h)`` (for fc2's weight gradient).
:func:`gelu_mlp` saves only the first two and recomputes ``gelu(h)`` in the backward pass:
one elementwise pass more, and ``hidden_features`` fewer values per token held from the forward
pass to the backward (a third of the MLP's activation memory at ``mlp_ratio`` 3 or 4). Its bias
gradients on CUDA are matrix-vector products (:func:`column_sum`). Without gradients, or while
exporting, it is the plain composition.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ops._dtypes import autocast_dtype, describe
from ops.gather_attention import is_exporting

__all__ = ['gelu_mlp', 'column_sum']

# From this many rows a CUDA column sum runs as a matrix-vector product: H200, bf16, 25088 to
# 401408 rows of 64 to 768 channels, it took 0.27-0.8x the time of ``sum(0)`` (PyTorch's
# reduction reaches 0.3-1.1 TB/s there); at 6272 x 512 it took 1.9x (docs/ops.md, "MLP").
COLUMN_SUM_MV_MIN_ROWS = 16384


def _validate(x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor,
              fc2_bias: Optional[Tensor]) -> None:
    if not isinstance(x, Tensor) or x.dim() < 1 or not x.is_floating_point():
        raise ValueError(f'x must be a floating tensor (..., in_features), got {describe(x)}')
    if fc1_weight.dim() != 2 or fc1_weight.shape[1] != x.shape[-1]:
        raise ValueError(f'fc1_weight must have shape (hidden_features, in_features) = '
                         f'(hidden, {x.shape[-1]}), got {tuple(fc1_weight.shape)}')
    hidden = fc1_weight.shape[0]
    if fc2_weight.dim() != 2 or fc2_weight.shape[1] != hidden:
        raise ValueError(f'fc2_weight must have shape (out_features, hidden_features) = '
                         f'(out, {hidden}), got {tuple(fc2_weight.shape)}')
    for name, bias, size in (('fc1_bias', fc1_bias, hidden), ('fc2_bias', fc2_bias,
                                                              fc2_weight.shape[0])):
        if bias is not None and tuple(bias.shape) != (size,):
            raise ValueError(f'{name} must have shape ({size},), got {tuple(bias.shape)}')


def _cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(dtype)


def column_sum(x: Tensor) -> Tensor:
    """``x.sum(0)`` of a 2-D (rows, C) tensor, in x's dtype (fp32 accumulation either way).

    Tall CUDA matrices go through ``torch.mv(x.t(), ones)`` (cuBLAS reads x once at near copy
    bandwidth); short ones, other devices and torch.compile (whose generated reduction is
    fast) take ``sum(0)``.
    """
    if (x.is_cuda and x.shape[0] >= COLUMN_SUM_MV_MIN_ROWS
            and not torch.compiler.is_compiling()):
        return torch.mv(x.t(), x.new_ones(x.shape[0]))
    return x.sum(0)


class _RecomputeGeluMlp(torch.autograd.Function):
    """Saves fc1's input and pre-activation; recomputes the GELU in the backward pass."""

    @staticmethod
    def forward(ctx, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, dtype):
        ctx.param_dtypes = tuple(None if t is None else t.dtype
                                 for t in (fc1_weight, fc1_bias, fc2_weight, fc2_bias))
        with torch.autocast(device_type=x.device.type, enabled=False):
            x, w1, b1, w2, b2 = (_cast(t, dtype) for t in (x, fc1_weight, fc1_bias, fc2_weight,
                                                           fc2_bias))
            hidden = F.linear(x, w1, b1)
            out = F.linear(F.gelu(hidden), w2, b2)
        ctx.save_for_backward(x, hidden, w1, w2)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, hidden, w1, w2 = ctx.saved_tensors
        return gelu_mlp_backward(grad_out, x, hidden, w1, w2, ctx.needs_input_grad[:5],
                                 ctx.param_dtypes) + (None,)


# CUDA products of fp16/bf16 operands write fp32 directly (``torch.mm(..., out_dtype=)``, torch
# >= 2.8): one kernel instead of a product and a cast, and no rounding to 16 bits in between.
_MM_OUT_DTYPE = 'dtype' in torch.ops.aten.mm.overloads()


def weight_gradient(grad2d: Tensor, x2d: Tensor, dtype: torch.dtype) -> Tensor:
    """``(grad2d.t() @ x2d)`` in ``dtype``: (out, in) from (rows, out) and (rows, in). An fp32
    result of fp16/bf16 CUDA operands comes straight from the product (fp32 accumulation, one
    rounding); otherwise the product is cast."""
    if (dtype == torch.float32 and grad2d.dtype in (torch.float16, torch.bfloat16)
            and grad2d.is_cuda and _MM_OUT_DTYPE and not torch.compiler.is_compiling()):
        return torch.mm(grad2d.t(), x2d, out_dtype=torch.float32)
    return (grad2d.t() @ x2d).to(dtype)


def linear_backward(grad: Tensor, x: Optional[Tensor], weight: Tensor, need_input: bool = True,
                    need_weight: bool = True, need_bias: bool = True,
                    weight_dtype: Optional[torch.dtype] = None,
                    bias_dtype: Optional[torch.dtype] = None):
    """Gradients of ``F.linear(x, weight, bias)`` for the output gradient ``grad``
    (..., out): (grad_x (..., in) in grad's dtype, grad_weight, grad_bias (by
    :func:`column_sum`)), the last two in ``weight_dtype`` / ``bias_dtype`` (default: grad's);
    None where not needed. x may be None when the weight gradient is not needed."""
    grad2d = grad.reshape(-1, grad.shape[-1])
    grad_w = grad_b = grad_x = None
    if need_weight:
        grad_w = weight_gradient(grad2d, x.reshape(-1, x.shape[-1]), weight_dtype or grad.dtype)
    if need_bias:
        grad_b = column_sum(grad2d).to(bias_dtype or grad.dtype)
    if need_input:
        grad_x = (grad2d @ weight).view(*grad.shape[:-1], weight.shape[1])
    return grad_x, grad_w, grad_b


def gelu_mlp_backward(grad_out: Tensor, x: Tensor, hidden: Tensor, fc1_weight: Tensor,
                      fc2_weight: Tensor, needs=(True,) * 5, param_dtypes=(None,) * 4):
    """Gradients of ``fc2(gelu(fc1(x)))`` from fc1's input ``x``, its pre-activation ``hidden``
    and the weights in the products' dtype (the GELU is recomputed): (grad_x in x's dtype,
    grad_fc1_weight, grad_fc1_bias, grad_fc2_weight, grad_fc2_bias in ``param_dtypes``),
    None where ``needs`` (x, fc1 weight, fc1 bias, fc2 weight, fc2 bias) is False."""
    need_x, need_w1, need_b1, need_w2, need_b2 = needs
    w1_dtype, b1_dtype, w2_dtype, b2_dtype = param_dtypes
    grad = grad_out.to(hidden.dtype)
    grad_x = grad_w1 = grad_b1 = None
    need_hidden = need_x or need_w1 or need_b1
    grad_act, grad_w2, grad_b2 = linear_backward(grad, F.gelu(hidden) if need_w2 else None,
                                                 fc2_weight, need_hidden, need_w2, need_b2,
                                                 w2_dtype, b2_dtype)
    if need_hidden:
        grad_hidden = torch.ops.aten.gelu_backward(grad_act, hidden)
        grad_x, grad_w1, grad_b1 = linear_backward(grad_hidden, x, fc1_weight, need_x, need_w1,
                                                   need_b1, w1_dtype, b1_dtype)
        if grad_x is not None:
            grad_x = grad_x.to(x.dtype)
    return grad_x, grad_w1, grad_b1, grad_w2, grad_b2


def residual_mlp_reference(x: Tensor, ln_weight: Optional[Tensor], ln_bias: Optional[Tensor],
                           eps: float, fc1_weight: Tensor, fc1_bias: Optional[Tensor],
                           fc2_weight: Tensor, fc2_bias: Optional[Tensor],
                           compute_dtype: torch.dtype,
                           sample_scale: Optional[Tensor] = None) -> Tensor:
    """``x + s * fc2(gelu(fc1(LN(x))))`` as a pre-norm transformer block's MLP half computes it
    under autocast in ``compute_dtype``: the LayerNorm in fp32 of x rounded to it, fp32 affine,
    one rounding (:func:`ops.layer_norm`); products and GELU in ``compute_dtype``; the
    per-sample factor ``s`` ((B,), None for 1) in ``compute_dtype``; the residual add in
    ``promote(x.dtype, compute_dtype)``. The meaning of the fused forward kernel
    (:mod:`ops._triton_ln_mlp`)."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        stats = torch.promote_types(compute_dtype, torch.float32)
        h = F.layer_norm(x.to(compute_dtype).to(stats), x.shape[-1:],
                         _cast(ln_weight, stats), _cast(ln_bias, stats), eps).to(compute_dtype)
        w1, b1, w2, b2 = (_cast(t, compute_dtype) for t in (fc1_weight, fc1_bias, fc2_weight,
                                                            fc2_bias))
        branch = F.linear(F.gelu(F.linear(h, w1, b1)), w2, b2)
        if sample_scale is not None:
            branch = branch * sample_scale.to(compute_dtype).view(-1, *(1,) * (x.dim() - 1))
        return x + branch


def gelu_mlp(x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor,
             fc2_bias: Optional[Tensor]) -> Tensor:
    """``F.linear(F.gelu(F.linear(x, fc1_weight, fc1_bias)), fc2_weight, fc2_bias)`` (exact
    erf GELU), recomputing the GELU in the backward pass instead of saving it.

    Args:
        x: (..., in_features) floating.
        fc1_weight, fc1_bias: (hidden, in_features), optional (hidden,).
        fc2_weight, fc2_bias: (out_features, hidden), optional (out_features,).

    Returns:
        (..., out_features) in the autocast dtype under autocast (as ``nn.Linear``), else x's
        dtype. Gradients equal the plain composition's (same products, same dtypes); the
        parameters' gradients come back in the parameters' dtypes.
    """
    _validate(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    params = [t for t in (fc1_weight, fc1_bias, fc2_weight, fc2_bias) if t is not None]
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad
                                                                     for p in params))
    if not needs_grad or is_exporting():
        return F.linear(F.gelu(F.linear(x, fc1_weight, fc1_bias)), fc2_weight, fc2_bias)
    return _RecomputeGeluMlp.apply(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                                   autocast_dtype(x))
