"""A BiFormer block as one autograd node (``BiFormerBlock.fused_block``).

Eager BiFormer is bound by the host, not the GPU (docs/benchmarks.md, models run 5): a block
is ~170 aten ops and ~15 autograd nodes, each costing the host 15-40 µs, while its kernels
are short. :class:`_FusedBlock` runs the block's forward and backward as straight-line calls
of the kernels the module path runs (ops' Triton launchers, cuBLAS products, in the same
dtypes), inside one
``torch.autograd.Function``: the inner ops carry no autograd bookkeeping and there are no view
nodes. In routing blocks the attention kernels write dq, dk and dv straight into the thirds
of the qkv gradient, and the LePE's depthwise-conv backward adds its v gradient into the last
third in place; full-attention blocks (the last stage) keep ``F.scaled_dot_product_attention``
and differentiate it through a nested graph of that one op.

The meaning is the module path's, term for term: ``x1 = x + dwconv3(x)``, ``x2 = x1 +
drop(proj(lepe(.) + attention))`` of ``LN1(x1)`` (routed regions of the padded map, or all
tokens), and ``x3 = x2 + drop(fc2(gelu(fc1(LN2(x2)))))``. Drop-path masks are drawn in the
module path's order, so the random stream and the masks are the same. Results agree with the
module path to the rounding of the products (the backward forms some products in another
order); the tests compare the two on the CPU through the Triton interpreter.

One difference: the LayerNorms always run ops.layer_norm's kernels (the second one inside the
MLP kernel where that runs, see MLP_KERNEL_MAX_CHANNELS), with the fp32 weights and one
rounding of the output, which is what the official model's LayerNorm computes under
autocast (in fp32). The module path takes them only from ``AutocastLayerNorm.FUSED_MIN_NUMEL``
elements (for the host cost of ``ops.layer_norm``'s checks) and below that PyTorch's
LayerNorm on weights rounded to the autocast dtype. Here the kernels are called directly:
fewer host calls than PyTorch's path (no casts) and less GPU time.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ops._dtypes import autocast_dtype
from ops.mlp import gelu_mlp_backward, linear_backward
from ops.routing import route_unchecked

__all__ = ['BlockPlan', 'fused_block']

# The MLP half of a block (LayerNorm, fc1, GELU, fc2, drop path, residual) runs as one forward
# kernel (ops._triton_ln_mlp) where it pays, else as six launches (LayerNorm kernel, cuBLAS
# products, GELU, add). The kernel saves the host five launches (about 125 µs of issue a block
# on the H200's host, models run 14). Its GPU time on an H200 in bf16 (docs/benchmarks.md, "mlp"
# run 1): 0.67x / 0.90x the six launches' at C = 64 / 128; from C = 192 more, by about 2-3 ns a
# row at C = 192-256 and 20-40 ns at 384-512. So calls captured into a CUDA graph, where
# launches cost nothing, take it up to C = 128; eager calls, which BiFormer's many short kernels
# leave bound by the host, also at C = 256 (and 192) for at most 32768 rows, where its extra
# GPU time stays under about 100 µs. fp32 products take the six launches: there the kernel
# took 2.8x their time at C = 64 and 38x at 128 without TF32, 0.76x / 1.5x with it (mlp run 2).
# Set 'eager' and 'captured' to 0 to turn it off.
MLP_KERNEL_MAX_CHANNELS = {'eager': 256, 'captured': 128}
MLP_KERNEL_FAST_CHANNELS = 128      # up to here the kernel is the faster on the GPU
MLP_KERNEL_WIDE_MAX_ROWS = 32768    # wider than that, eager calls take it for at most this many rows


def takes_mlp_kernel(x2: Tensor, fc1_w: Tensor, fc2_w: Tensor, compute_dtype: torch.dtype,
                     graphed: bool = False) -> bool:
    """Whether the block's MLP half on ``x2`` (B, H, W, C) runs as the one kernel (see
    MLP_KERNEL_MAX_CHANNELS): 16-bit products, within the width limit of this kind of call
    (``graphed``: a call for a CUDA graph, also when not capturing yet), at most
    MLP_KERNEL_WIDE_MAX_ROWS rows above MLP_KERNEL_FAST_CHANNELS, contiguous weights."""
    from ops import _triton_ln_mlp
    if compute_dtype not in (torch.float16, torch.bfloat16):
        return False
    chans = x2.shape[-1]
    captured = graphed or (x2.is_cuda and torch.cuda.is_current_stream_capturing())
    if chans > MLP_KERNEL_MAX_CHANNELS['captured' if captured else 'eager']:
        return False
    if chans > MLP_KERNEL_FAST_CHANNELS and x2.numel() // chans > MLP_KERNEL_WIDE_MAX_ROWS:
        return False
    return (_triton_ln_mlp.supports(chans, fc1_w.shape[0]) and fc1_w.is_contiguous()
            and fc2_w.is_contiguous())


@dataclass(frozen=True)
class BlockPlan:
    """What one call of the fused block does, fixed before the call (hashable, no tensors)."""
    full_attention: bool    # FullAttentionLePE (stage 4), else bi-level routing attention
    n_win: int
    topk: int
    heads: int
    scale: float
    masked: bool            # pad_mode 'masked'
    needs_grad: bool        # a backward will follow (the SDPA graph is kept only then)
    eps1: float
    eps2: float
    compute_dtype: torch.dtype


def _layer_norm_forward(x: Tensor, weight: Tensor, bias: Tensor, eps: float,
                        dtype: torch.dtype):
    """(y in ``dtype``, mean, rstd): ops.layer_norm's kernel with the fp32 weights."""
    from ops import _triton_layer_norm as kernels
    return kernels.forward(x, weight, bias, eps, dtype)


def _layer_norm_backward(grad: Tensor, x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor,
                         rstd: Tensor, dtype: torch.dtype, residual: Tensor):
    """(grad_x + residual in x's dtype, grad_weight, grad_bias in the parameters' dtypes): the
    skip connection's gradient is added inside the kernel."""
    from ops import _triton_layer_norm as kernels
    grad_x, grad_w, grad_b = kernels.backward(grad, x, weight, mean, rstd, dtype, True, True,
                                              True, residual=residual)
    return grad_x, grad_w, grad_b.to(bias.dtype)


def _linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``F.linear`` of a contiguous (..., in) x with weight and bias in x's dtype."""
    out = torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight.t())
    return out.view(*x.shape[:-1], weight.shape[0])


def _drop_path_mask(like: Tensor, dtype: torch.dtype, drop_prob: float,
                    scale_by_keep: bool) -> Optional[Tensor]:
    """timm's ``drop_path`` mask for a branch of ``like``'s shape in ``dtype`` (the same draws
    in the same dtype), or None."""
    if drop_prob == 0.0:
        return None
    keep_prob = 1.0 - drop_prob
    mask = like.new_empty((like.shape[0],) + (1,) * (like.dim() - 1), dtype=dtype)
    mask.bernoulli_(keep_prob)
    if keep_prob > 0.0 and scale_by_keep:
        mask.div_(keep_prob)
    return mask


def _routing_forward(plan: BlockPlan, h: Tensor, qkv_wc: Tensor, qkv_bc: Tensor,
                     lepe_w: Tensor, lepe_b: Tensor):
    """Bi-level routing attention + LePE of the LayerNorm output h (B, H, W, C), up to the
    projection: (attended (B, H, W, C) contiguous, tensors to save, geometry)."""
    from ops import _triton_depthwise_conv as dwconv
    from ops import _triton_gather_attention as attention
    from backbones.biformer import map_padding_mask, padded_map_size
    batch, height, width, chans = h.shape
    pad_h, pad_w = padded_map_size(height, width, plan.n_win)
    padded = (pad_h, pad_w) != (height, width)
    hp = F.pad(h, (0, 0, 0, pad_w - width, 0, pad_h - height)) if padded else h
    qkv = _linear(hp, qkv_wc, qkv_bc)
    mask = None
    if padded and plan.masked:
        mask = map_padding_mask(batch, height, width, pad_h, pad_w, h.device)
        qkv = qkv.masked_fill(mask.view(batch, pad_h, pad_w, 1), 0.0)
    tokens = pad_h * pad_w
    q, k, v = qkv.view(batch, tokens, 3 * chans).split(chans, dim=-1)
    window = (pad_h // plan.n_win, pad_w // plan.n_win)
    block, layout = window[0] * window[1], [window[1], window[1], pad_w]
    index = route_unchecked(q, k, block, block, window, window, pad_w, plan.topk, plan.scale,
                            mask)
    heads = [t.view(batch, tokens, plan.heads, chans // plan.heads).transpose(1, 2)
             for t in (q, k, v)]
    out, lse = attention.forward(*heads, index, mask, block, block, plan.scale, layout=layout)
    attended = dwconv.forward(v.view(batch, pad_h, pad_w, chans), lepe_w, lepe_b,
                              out.transpose(1, 2).reshape(batch, pad_h, pad_w, chans),
                              plan.compute_dtype)
    if padded:
        attended = attended[:, :height, :width].contiguous()
    return attended, (hp, qkv, out, lse, index, mask), (pad_h, pad_w, block, layout)


def _routing_backward(plan: BlockPlan, grad_attended: Tensor, saved, geometry, qkv_wc: Tensor,
                      lepe_w: Tensor, param_dtype: torch.dtype):
    """(grad_h, qkv weight and bias, LePE weight and bias gradients) of
    :func:`_routing_forward`."""
    from ops import _triton_depthwise_conv as dwconv
    from ops import _triton_gather_attention as attention
    hp, qkv, out, lse, index, mask = saved
    pad_h, pad_w, block, layout = geometry
    batch, height, width, chans = grad_attended.shape
    tokens = pad_h * pad_w
    if (pad_h, pad_w) != (height, width):
        grad_attended = F.pad(grad_attended, (0, 0, 0, pad_w - width, 0, pad_h - height))
    q, k, v = qkv.view(batch, tokens, 3 * chans).split(chans, dim=-1)
    heads = [t.view(batch, tokens, plan.heads, chans // plan.heads).transpose(1, 2)
             for t in (q, k, v)]
    grad_out = grad_attended.view(batch, tokens, plan.heads, chans // plan.heads).transpose(1, 2)
    # The attention writes dq, dk, dv straight into the qkv gradient's thirds, and the LePE
    # adds its v gradient into the last one in place: no concatenation, no separate add.
    grad_qkv = qkv.new_empty(qkv.shape)
    thirds = grad_qkv.view(batch, tokens, 3, plan.heads, chans // plan.heads).unbind(2)
    attention.backward(grad_out, *heads, out, lse, index, mask, block, block, plan.scale,
                       layout=layout, grads=[t.transpose(1, 2) for t in thirds])
    grad_v = grad_qkv[..., 2 * chans:]
    _, g_lepe_w, g_lepe_b = dwconv.backward(
        grad_attended, v.view(batch, pad_h, pad_w, chans), lepe_w, plan.compute_dtype, True,
        True, dx_add=grad_v, dx_out=grad_v)
    if mask is not None:
        grad_qkv.masked_fill_(mask.view(batch, pad_h, pad_w, 1), 0.0)
    grad_h, g_qkv_w, g_qkv_b = linear_backward(grad_qkv, hp, qkv_wc, weight_dtype=param_dtype,
                                               bias_dtype=param_dtype)
    if (pad_h, pad_w) != (height, width):
        grad_h = grad_h[:, :height, :width].contiguous()
    return grad_h, g_qkv_w, g_qkv_b, g_lepe_w, g_lepe_b


def _full_forward(plan: BlockPlan, h: Tensor, qkv_wc: Tensor, lepe_w: Tensor, lepe_b: Tensor):
    """Full attention (``F.scaled_dot_product_attention``, no qkv bias) + LePE of h itself, up
    to the projection: (attended, tensors to save, the SDPA graph for the backward)."""
    from ops import _triton_depthwise_conv as dwconv
    batch, height, width, chans = h.shape
    tokens = height * width
    qkv = h.reshape(-1, chans) @ qkv_wc.t()
    qkv = qkv.view(batch, tokens, 3, plan.heads, chans // plan.heads).permute(2, 0, 3, 1, 4)
    leaves = qkv.unbind(0)
    if plan.needs_grad:  # the SDPA backend's own backward, through a nested graph
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in leaves]
            out = F.scaled_dot_product_attention(*leaves, scale=plan.scale)
    else:
        out = F.scaled_dot_product_attention(*leaves, scale=plan.scale)
    attended = dwconv.forward(h, lepe_w, lepe_b,
                              out.detach().transpose(1, 2).reshape(batch, height, width, chans),
                              plan.compute_dtype)
    return attended, (h,), (out, leaves)


def _full_backward(plan: BlockPlan, grad_attended: Tensor, saved, graph, qkv_wc: Tensor,
                   lepe_w: Tensor, param_dtype: torch.dtype, retain_graph: bool = False):
    """(grad_h, qkv weight gradient, None (no qkv bias), LePE weight and bias gradients) of
    :func:`_full_forward`; ``retain_graph`` keeps the SDPA graph for another backward."""
    from ops import _triton_depthwise_conv as dwconv
    (h,) = saved
    out, leaves = graph
    batch, height, width, chans = h.shape
    tokens = height * width
    grad_out = grad_attended.view(batch, tokens, plan.heads, chans // plan.heads).transpose(1, 2)
    grads = torch.autograd.grad(out, leaves, grad_out, retain_graph=retain_graph)
    grad_qkv = torch.stack([g.transpose(1, 2) for g in grads], dim=2).view(  # one copy
        batch, height, width, 3 * chans)
    grad_h, g_qkv_w, _ = linear_backward(grad_qkv, h, qkv_wc, need_bias=False,
                                         weight_dtype=param_dtype)
    # The LePE's input gradient is added into grad_h in place.
    _, g_lepe_w, g_lepe_b = dwconv.backward(grad_attended, h, lepe_w, plan.compute_dtype, True,
                                            True, dx_add=grad_h, dx_out=grad_h)
    return grad_h, g_qkv_w, None, g_lepe_w, g_lepe_b


def _block_forward(plan: BlockPlan, drops, x, pos_w, pos_b, n1_w, n1_b, qkv_w, qkv_b, lepe_w,
                   lepe_b, proj_w, proj_b, n2_w, n2_b, fc1_w, fc1_b, fc2_w, fc2_b,
                   out: Optional[Tensor] = None, graphed: bool = False):
    """(x3, tensors for the backward, the mixer's state) of one block, computed without
    autograd: by :class:`_FusedBlock`, directly when no gradient is needed, or for a CUDA graph
    (``graphed``: the kernels chosen as under capture). x3 is written into ``out`` when given
    (contiguous, x3's shape and dtype)."""
    from ops import _triton_depthwise_conv as dwconv
    from ops import _triton_ln_mlp
    cd = plan.compute_dtype
    with torch.autocast(x.device.type, enabled=False):
        x1 = dwconv.forward(x, pos_w, pos_b, x, cd)
        h, mean1, rstd1 = _layer_norm_forward(x1, n1_w, n1_b, plan.eps1, cd)
        mlp_kernel = takes_mlp_kernel(x, fc1_w, fc2_w, cd, graphed)  # x2 has x's shape
        # The MLP kernel rounds fp32 parameters as it reads them; of its parameters only the
        # backward's products need casts (fc1's and fc2's weights).
        if not mlp_kernel:
            mlp_casts = (fc1_w, fc1_b, fc2_w, fc2_b)
        elif plan.needs_grad:
            mlp_casts = (fc1_w, None, fc2_w, None)
        else:
            mlp_casts = (None,) * 4
        weights = [None if t is None else t.to(cd)
                   for t in (qkv_w, qkv_b, proj_w, proj_b) + mlp_casts]
        qkv_wc, qkv_bc, proj_wc, proj_bc, fc1_wc, fc1_bc, fc2_wc, fc2_bc = weights
        if plan.full_attention:
            attended, mixer_saved, mixer_state = _full_forward(plan, h, qkv_wc, lepe_w, lepe_b)
        else:
            attended, mixer_saved, mixer_state = _routing_forward(plan, h, qkv_wc, qkv_bc,
                                                                  lepe_w, lepe_b)
        branch = _linear(attended, proj_wc, proj_bc)
        drop1 = _drop_path_mask(branch, cd, *drops[0]) if drops else None
        x2 = x1 + (branch if drop1 is None else branch * drop1)
        if mlp_kernel:
            drop2 = _drop_path_mask(x2, cd, *drops[1]) if drops else None
            x3, h2, hidden, mean2, rstd2 = _triton_ln_mlp.forward(
                x2, n2_w, n2_b, plan.eps2, fc1_w if fc1_wc is None else fc1_wc, fc1_b,
                fc2_w if fc2_wc is None else fc2_wc, fc2_b, cd,
                None if drop2 is None else drop2.view(-1), save=plan.needs_grad, out=out)
        else:
            h2, mean2, rstd2 = _layer_norm_forward(x2, n2_w, n2_b, plan.eps2, cd)
            hidden = _linear(h2, fc1_wc, fc1_bc)
            branch = _linear(F.gelu(hidden), fc2_wc, fc2_bc)
            drop2 = _drop_path_mask(branch, cd, *drops[1]) if drops else None
            x3 = torch.add(x2, branch if drop2 is None else branch * drop2, out=out)
    saved = (x, x1, x2, h2, attended, hidden, pos_w, lepe_w, n1_w, n1_b, n2_w, n2_b, *weights,
             mean1, rstd1, mean2, rstd2, drop1, drop2, *mixer_saved)
    return x3, saved, mixer_state


class _FusedBlock(torch.autograd.Function):
    """Forward and backward of one block; see the module docstring."""

    @staticmethod
    def forward(ctx, x, pos_w, pos_b, n1_w, n1_b, qkv_w, qkv_b, lepe_w, lepe_b, proj_w,
                proj_b, n2_w, n2_b, fc1_w, fc1_b, fc2_w, fc2_b, plan, drops):
        x3, saved, ctx.mixer_state = _block_forward(
            plan, drops, x, pos_w, pos_b, n1_w, n1_b, qkv_w, qkv_b, lepe_w, lepe_b, proj_w,
            proj_b, n2_w, n2_b, fc1_w, fc1_b, fc2_w, fc2_b)
        ctx.save_for_backward(*saved)
        ctx.plan, ctx.param_dtype = plan, n1_w.dtype
        return x3

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        grads = _block_backward(ctx.plan, ctx.param_dtype, ctx.saved_tensors, ctx.mixer_state,
                                grad)
        return grads + (None, None)


def _block_backward(plan: BlockPlan, param_dtype: torch.dtype, saved, mixer_state, grad: Tensor,
                    retain_graph: bool = False, grad_x_out: Optional[Tensor] = None):
    """The 17 gradients (x, then the 16 parameters of :func:`fused_block`'s order) of one
    block from :func:`_block_forward`'s ``saved`` and mixer state, without autograd.
    ``retain_graph`` keeps a full-attention block's SDPA graph for another backward; grad_x is
    written into ``grad_x_out`` when given (contiguous, x's shape and dtype)."""
    from ops import _triton_depthwise_conv as dwconv
    (x, x1, x2, h2, attended, hidden, pos_w, lepe_w, n1_w, n1_b, n2_w, n2_b, qkv_wc, qkv_bc,
     proj_wc, proj_bc, fc1_wc, fc1_bc, fc2_wc, fc2_bc, mean1, rstd1, mean2, rstd2, drop1,
     drop2, *mixer_saved) = saved
    cd = plan.compute_dtype
    with torch.autocast(x.device.type, enabled=False):
        # MLP branch: x3 = x2 + drop2 * fc2(gelu(fc1(LN2(x2))))
        grad_branch = grad if drop2 is None else grad * drop2
        grad_h2, g_fc1_w, g_fc1_b, g_fc2_w, g_fc2_b = gelu_mlp_backward(
            grad_branch, h2, hidden, fc1_wc, fc2_wc, param_dtypes=(param_dtype,) * 4)
        grad_x2, g_n2_w, g_n2_b = _layer_norm_backward(grad_h2, x2, n2_w, n2_b, mean2, rstd2,
                                                       cd, residual=grad)
        # attention branch: x2 = x1 + drop1 * proj(mixer(LN1(x1)))
        grad_branch = (grad_x2 if drop1 is None else grad_x2 * drop1).to(cd)
        grad_attended, g_proj_w, g_proj_b = linear_backward(
            grad_branch, attended, proj_wc, weight_dtype=param_dtype, bias_dtype=param_dtype)
        if plan.full_attention:
            mixer_grads = _full_backward(plan, grad_attended, mixer_saved, mixer_state, qkv_wc,
                                         lepe_w, param_dtype, retain_graph)
        else:
            mixer_grads = _routing_backward(plan, grad_attended, mixer_saved, mixer_state,
                                            qkv_wc, lepe_w, param_dtype)
        grad_h, g_qkv_w, g_qkv_b, g_lepe_w, g_lepe_b = mixer_grads
        grad_x1, g_n1_w, g_n1_b = _layer_norm_backward(grad_h, x1, n1_w, n1_b, mean1, rstd1, cd,
                                                       residual=grad_x2)
        # x1 = x + dwconv3(x)
        grad_x, g_pos_w, g_pos_b = dwconv.backward(grad_x1, x, pos_w, cd, True, True,
                                                   dx_add=grad_x1, dx_out=grad_x_out)
    return (grad_x, g_pos_w, g_pos_b, g_n1_w, g_n1_b, g_qkv_w, g_qkv_b, g_lepe_w, g_lepe_b,
            g_proj_w, g_proj_b, g_n2_w, g_n2_b, g_fc1_w, g_fc1_b, g_fc2_w, g_fc2_b)


def fused_block(block, x: Tensor) -> Tensor:
    """``block(x)`` for a :class:`backbones.biformer.BiFormerBlock` of ``attn_impl='fused'``
    through :class:`_FusedBlock` (x: (B, H, W, C), its dtype kept)."""
    from backbones.biformer import FullAttentionLePE
    attn, mlp = block.attn, block.mlp
    drops = None
    if block.training and hasattr(block.drop_path, 'drop_prob'):
        drops = ((block.drop_path.drop_prob, block.drop_path.scale_by_keep),) * 2
    params = (block.pos_embed.weight, block.pos_embed.bias, block.norm1.weight,
              block.norm1.bias, attn.qkv.weight, attn.qkv.bias, attn.lepe.weight,
              attn.lepe.bias, attn.proj.weight, attn.proj.bias, block.norm2.weight,
              block.norm2.bias, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)
    full = isinstance(attn, FullAttentionLePE)
    plan = BlockPlan(full_attention=full, n_win=0 if full else attn.n_win,
                     topk=0 if full else attn.topk, heads=attn.num_heads, scale=attn.scale,
                     masked=not full and attn.pad_mode == 'masked',
                     needs_grad=torch.is_grad_enabled() and any(
                         t is not None and t.requires_grad for t in (x,) + params),
                     eps1=block.norm1.eps, eps2=block.norm2.eps,
                     compute_dtype=autocast_dtype(x))
    if block.graphs is not None:
        out = block.graphs(plan, drops, x, params)
        if out is not None:
            return out
    if not plan.needs_grad:  # inference: no autograd node
        return _block_forward(plan, drops, x, *params)[0]
    return _FusedBlock.apply(x, *params, plan, drops)
