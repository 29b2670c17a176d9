"""BiFormer: vision transformer with bi-level routing attention (Zhu et al., CVPR 2023).

Reimplements the released BiFormer-T/S/B (rayleizhu/BiFormer, ``models/biformer.py`` and the
``ops/bra_legacy.py`` attention that the released checkpoints use) as a timm model family, and
loads the official checkpoints through :func:`checkpoint_filter_fn`. Kept quirks of the official
code, each of which changes the numbers:

* bi-level routing attention (BRA) scales scores by ``dim ** -0.5`` (the full qk dim, not the
  head dim); routing is detached and its weights are unused; heads are ``dim // head_dim``;
* padding (when a map is not a multiple of the region grid) happens *before* the qkv projection,
  so padded keys and values equal the projection bias and are never masked
  (``pad_mode='official'``); ``pad_mode='masked'`` instead excludes padded keys from routing and
  attention and zero-pads the values that the LePE convolution sees;
* the last stage is full attention with 8 heads (not ``dim // head_dim``), no qkv bias and its
  5x5 LePE applied to the block input rather than to the values;
* block: ``x += dwconv3x3(x)``, then pre-norm attention and MLP (LayerNorm eps 1e-6, no layer
  scale); two-conv BN stem, conv-BN downsampling, BatchNorm2d + average pool + linear head.

Attention runs through :func:`ops.gather_attention` (``attn_impl='fused'``: a Triton kernel on
CUDA that reads routed key/value regions in place, the torch reference on CPU) or through the
official formulation (``attn_impl='gather'``: ``torch.gather`` of ``topk``-fold key/value copies
and dense attention, kept for comparison and parity tests). ``'fused'`` also keeps the (padded)
map in its row-major layout throughout: routing and attention take the regions as ``(h, w)``
windows of it (``map_width``), so no region reordering copy is made; its depthwise convolutions
(the block's 3x3 positional embedding, the 5x5 LePE) run through :func:`ops.depthwise_conv2d`
on the NHWC map with the residual add fused, its MLP through :func:`ops.gelu_mlp` (GELU
recomputed in backward), its large LayerNorms through :func:`ops.layer_norm`, and its stem on a
channels-last copy of the image. The modules stay ``nn.Conv2d``, ``nn.LayerNorm`` and timm's
``Mlp`` (checkpoint keys unchanged); ``'gather'`` keeps the official permute, conv, permute,
add and the region-major layout.
"""
import re
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead, DropPath, Mlp, trunc_normal_
from timm.models._builder import build_model_with_cfg
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq
from timm.models._registry import generate_default_cfgs, register_model

import ops
from ops._dtypes import TRITON_DTYPES, autocast_dtype

__all__ = ['BiFormer', 'BiLevelRoutingAttention', 'FullAttentionLePE', 'BiFormerBlock',
           'BiFormerStage', 'BiFormerStem', 'AutocastLayerNorm', 'checkpoint_filter_fn',
           'ATTN_IMPLS', 'PAD_MODES', 'set_graph_blocks']

ATTN_IMPLS = ('fused', 'gather')
PAD_MODES = ('official', 'masked')
FULL_ATTENTION = -2  # official ``topk`` value selecting full attention with LePE (last stage)
FULL_ATTENTION_HEADS = 8  # hard-coded in the official ``AttentionLePE``
MIN_INPUT_SIZE = 32  # total stride of the network: smaller images leave no stage-4 token


def _check_choice(value, choices, name: str) -> None:
    if value not in choices:
        raise ValueError(f'{name} must be one of {choices}, got {value!r}')


def _to_regions(x: torch.Tensor, n_win: int) -> torch.Tensor:
    """(B, H, W, C) with H, W multiples of ``n_win`` -> (B, n_win**2 * h * w, C), region-major.

    Region ``r = i * n_win + j`` holds rows ``i*h:(i+1)*h`` and columns ``j*w:(j+1)*w``, row-major
    inside the region (the official ``'n (j h) (i w) c -> n (j i) h w c'`` order).
    """
    batch, height, width, chans = x.shape
    h, w = height // n_win, width // n_win
    x = x.reshape(batch, n_win, h, n_win, w, chans).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, height * width, chans)


def _from_regions(x: torch.Tensor, n_win: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`_to_regions`: (B, H * W, C) region-major -> (B, H, W, C)."""
    batch, _, chans = x.shape
    h, w = height // n_win, width // n_win
    x = x.reshape(batch, n_win, n_win, h, w, chans).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, height, width, chans)


def _depthwise(conv: nn.Conv2d, x: torch.Tensor, add: torch.Tensor,
               official: bool) -> torch.Tensor:
    """``add + conv(x)`` for (B, H, W, C) maps: fused (:func:`ops.depthwise_conv2d`) or the
    official permute, ``conv``, permute, add."""
    if official:
        return add + conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    return ops.depthwise_conv2d(x, conv.weight, conv.bias, add=add)


def _heads_to_map(x: torch.Tensor, n_win: int, height: int, width: int) -> torch.Tensor:
    """(B, heads, n_win**2, h * w, head_dim) per-region head outputs -> (B, H, W, C), one copy."""
    batch, heads, _, _, head_dim = x.shape
    h, w = height // n_win, width // n_win
    x = x.reshape(batch, heads, n_win, n_win, h, w, head_dim).permute(0, 2, 4, 3, 5, 1, 6)
    return x.reshape(batch, height, width, heads * head_dim)


def padded_map_size(height, width, n_win: int):
    """(pad_height, pad_width): the map padded to multiples of ``n_win`` regions per side.
    Computed as multiples (not ``height + (-height % n_win)``) so that with symbolic shapes
    (torch.compile dynamic=True) the region sizes simplify exactly."""
    return ((height + n_win - 1) // n_win * n_win, (width + n_win - 1) // n_win * n_win)


def map_padding_mask(batch: int, height: int, width: int, pad_height: int, pad_width: int,
                     device: torch.device) -> torch.Tensor:
    """Bool (B, N) in row-major order of the padded map, True on padded tokens."""
    padded = torch.ones(pad_height, pad_width, dtype=torch.bool, device=device)
    padded[:height, :width] = False
    return padded.view(1, pad_height * pad_width).expand(batch, pad_height * pad_width)


class BiLevelRoutingAttention(nn.Module):
    """Bi-level routing attention (the official ``bra_legacy`` variant, ``qk_dim == dim``).

    The (padded) map is split into ``n_win x n_win`` regions. Each query region routes to the
    ``topk`` key regions whose mean key best matches its mean query (detached, unweighted), and
    every query attends to all tokens of those regions. A depthwise ``side_dwconv`` convolution
    of the values (LePE) is added before the output projection.

    Args:
        dim: channels C (also the qk dim); must be a multiple of ``head_dim``.
        head_dim: channels per head.
        n_win: regions per side.
        topk: routed regions per query region, clipped to ``n_win ** 2`` (all regions).
        side_dwconv: LePE kernel size.
        pad_mode: ``'official'`` or ``'masked'`` (see the module docstring).
        attn_impl: ``'fused'`` (:func:`ops.gather_attention`, :func:`ops.depthwise_conv2d`) or
            ``'gather'`` (official).
    """

    def __init__(self, dim: int, head_dim: int = 32, n_win: int = 7, topk: int = 4,
                 side_dwconv: int = 5, pad_mode: str = 'official', attn_impl: str = 'fused'):
        super().__init__()
        if dim % head_dim:
            raise ValueError(f'dim={dim} must be a multiple of head_dim={head_dim}')
        if n_win < 1:
            raise ValueError(f'n_win must be >= 1, got {n_win}')
        if topk < 1:
            raise ValueError(f'topk must be >= 1 for routing attention, got {topk}')
        _check_choice(pad_mode, PAD_MODES, 'pad_mode')
        _check_choice(attn_impl, ATTN_IMPLS, 'attn_impl')
        self.dim = dim
        self.num_heads = dim // head_dim
        self.n_win = n_win
        self.topk = min(topk, n_win * n_win)
        self.scale = dim ** -0.5  # official: full qk dim, not the head dim
        self.pad_mode = pad_mode
        self.attn_impl = attn_impl
        self.qkv = nn.Linear(dim, 3 * dim)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)
        self.proj = nn.Linear(dim, dim)

    def extra_repr(self) -> str:
        return (f'num_heads={self.num_heads}, n_win={self.n_win}, topk={self.topk}, '
                f'pad_mode={self.pad_mode!r}, attn_impl={self.attn_impl!r}')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        batch, height, width, chans = x.shape
        pad_height, pad_width = padded_map_size(height, width, self.n_win)
        pad_bottom, pad_right = pad_height - height, pad_width - width
        # While exporting, always take the padded path (padding by zero when the size is a
        # multiple already): a traced branch would fix the graph to the export size.
        is_padded = bool(pad_bottom or pad_right) or ops.is_exporting()
        if is_padded:
            x = F.pad(x, (0, 0, 0, pad_right, 0, pad_bottom))
        padding_mask = None
        if is_padded and self.pad_mode == 'masked':
            padding_mask = map_padding_mask(batch, height, width, pad_height, pad_width,
                                            x.device)
        attend = self._fused_attention if self.attn_impl == 'fused' else self._gather_attention
        out = attend(x, padding_mask)
        if is_padded:
            out = out[:, :height, :width]
        return self.proj(out)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, heads, N, C // heads), a view."""
        batch, tokens, chans = x.shape
        return x.view(batch, tokens, self.num_heads, chans // self.num_heads).transpose(1, 2)

    def _fused_attention(self, x: torch.Tensor,
                         padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Routing, attention and LePE through ``ops`` on the (padded) map in place: the
        regions are (h, w) windows of the row-major token map, so nothing is reordered.
        (B, H, W, C) in and out; ``padding_mask`` (B, H * W) or None."""
        batch, height, width, chans = x.shape
        qkv = self.qkv(x)  # (B, H, W, 3C)
        if padding_mask is not None:
            qkv = qkv.masked_fill(padding_mask.view(batch, height, width, 1), 0.0)
        q, k, v = qkv.view(batch, height * width, 3 * chans).split(chans, dim=-1)
        window = (height // self.n_win, width // self.n_win)
        index = ops.region_routing(q, k, block_q=window, block_k=window, map_width=width,
                                   topk=self.topk, scale=self.scale,
                                   key_padding_mask=padding_mask)
        out = ops.gather_attention(self._split_heads(q), self._split_heads(k),
                                   self._split_heads(v), index, block_q=window, block_k=window,
                                   map_width=width, key_padding_mask=padding_mask,
                                   scale=self.scale)
        out = out.transpose(1, 2).reshape(batch, height, width, chans)
        # LePE of the (padded) value map, added to the attention output.
        return _depthwise(self.lepe, v.view(batch, height, width, chans), out, official=False)

    def _gather_attention(self, x: torch.Tensor,
                          padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """The official formulation: region-major reordering, ``torch.gather`` of ``topk``
        copies of the routed regions' keys/values, dense attention per region, LePE by
        ``nn.Conv2d``. (B, H, W, C) in and out; ``padding_mask`` (B, H * W) or None."""
        batch, pad_height, pad_width, chans = x.shape
        region_size = (pad_height // self.n_win) * (pad_width // self.n_win)
        qkv = self.qkv(_to_regions(x, self.n_win))  # (B, N, 3C) region-major
        if padding_mask is not None:
            padding_mask = _to_regions(padding_mask.reshape(batch, pad_height, pad_width, 1),
                                       self.n_win).reshape(batch, -1)
            qkv = qkv.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        q, k, v = qkv.split(chans, dim=-1)
        v_map = _from_regions(v, self.n_win, pad_height, pad_width)
        regions, heads, head_dim = self.n_win * self.n_win, self.num_heads, chans // self.num_heads
        q, k, v = (t.reshape(batch, regions, region_size, chans) for t in (q, k, v))

        # region-level routing on detached region means
        q_region = q.detach().mean(2)
        if padding_mask is None:
            k_region = k.detach().mean(2)
        else:
            valid = (~padding_mask).reshape(batch, regions, region_size, 1).to(k.dtype)
            k_region = k.detach().sum(2) / valid.sum(2).clamp(min=1)
        logits = (q_region * self.scale) @ k_region.transpose(-1, -2)  # (B, G, G)
        if padding_mask is not None:
            empty_region = padding_mask.reshape(batch, 1, regions, region_size).all(-1)
            logits = logits.masked_fill(empty_region, torch.finfo(logits.dtype).min)
        index = logits.topk(self.topk, dim=-1).indices  # (B, G, topk)

        kv = torch.cat([k, v], dim=-1)  # (B, G, region, 2C)
        gather_index = index.view(batch, regions, self.topk, 1, 1).expand(
            -1, -1, -1, region_size, 2 * chans)
        kv_routed = torch.gather(kv.unsqueeze(1).expand(-1, regions, -1, -1, -1), 2,
                                 gather_index)  # (B, G, topk, region, 2C): topk-fold copy
        keys = self.topk * region_size
        k_routed, v_routed = kv_routed.reshape(batch * regions, keys, 2 * chans).split(chans, -1)
        k_routed = k_routed.reshape(batch * regions, keys, heads, head_dim).permute(0, 2, 3, 1)
        v_routed = v_routed.reshape(batch * regions, keys, heads, head_dim).transpose(1, 2)
        q = q.reshape(batch * regions, region_size, heads, head_dim).transpose(1, 2)

        attn = (q * self.scale) @ k_routed  # (B*G, heads, region, keys)
        if padding_mask is not None:
            mask_routed = torch.gather(
                padding_mask.reshape(batch, 1, regions, region_size).expand(-1, regions, -1, -1),
                2, index.unsqueeze(-1).expand(-1, -1, -1, region_size))
            mask_routed = mask_routed.reshape(batch * regions, 1, 1, keys)
            attn = attn.masked_fill(mask_routed, torch.finfo(attn.dtype).min)
        attn = attn.softmax(dim=-1)
        if padding_mask is not None:
            attn = attn.masked_fill(mask_routed, 0.0)
        out = attn @ v_routed  # (B*G, heads, region, head_dim)
        out = _heads_to_map(out.view(batch, regions, heads, region_size, head_dim).transpose(1, 2),
                            self.n_win, pad_height, pad_width)
        return _depthwise(self.lepe, v_map, out, official=True)


class FullAttentionLePE(nn.Module):
    """Multi-head self-attention over all tokens plus a depthwise LePE of the *input* (the
    official ``AttentionLePE``, used for the last stage): 8 heads, scale ``(dim / 8) ** -0.5``,
    no qkv bias.

    Args:
        dim: channels C, a multiple of 8.
        side_dwconv: LePE kernel size.
        attn_impl: ``'fused'`` (``F.scaled_dot_product_attention``, LePE through
            :func:`ops.depthwise_conv2d`) or ``'gather'`` (explicit softmax attention and LePE,
            as the official code).
    """

    def __init__(self, dim: int, side_dwconv: int = 5, attn_impl: str = 'fused'):
        super().__init__()
        if dim % FULL_ATTENTION_HEADS:
            raise ValueError(f'full attention uses {FULL_ATTENTION_HEADS} heads, so dim={dim} '
                             f'must be a multiple of {FULL_ATTENTION_HEADS}')
        _check_choice(attn_impl, ATTN_IMPLS, 'attn_impl')
        self.num_heads = FULL_ATTENTION_HEADS
        self.scale = (dim // self.num_heads) ** -0.5
        self.attn_impl = attn_impl
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        batch, height, width, chans = x.shape
        tokens = height * width
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, chans // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, N, head_dim)
        if self.attn_impl == 'fused':
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            out = ((q @ k.transpose(-1, -2)) * self.scale).softmax(dim=-1) @ v
        out = out.transpose(1, 2).reshape(batch, height, width, chans)
        out = _depthwise(self.lepe, x, out, official=self.attn_impl == 'gather')
        return self.proj(out)


def _capturing_cuda_graph(x: torch.Tensor) -> bool:
    """True while a CUDA graph is being captured on x's device (never while compiling: the
    compiled graph decides, and torch.compile's own CUDA graphs capture at run time)."""
    return (x.is_cuda and not torch.compiler.is_compiling()
            and torch.cuda.is_current_stream_capturing())


class AutocastLayerNorm(nn.LayerNorm):
    """LayerNorm that returns the autocast dtype under autocast instead of float32.

    Statistics still accumulate in float32; the output equals, to bf16/fp16 rounding, what the
    following Linear would cast the float32 result to, without writing and re-reading it in
    float32 (timm's "fast norm" without apex). With ``fused``, CUDA inputs run
    :func:`ops.layer_norm` (one Triton kernel each way, fp32 weights used as they are) while a
    CUDA graph is being captured, and otherwise from ``FUSED_MIN_NUMEL`` elements; the rest,
    and all without ``fused``, run ``F.layer_norm`` on the autocast-dtype input and
    parameters. On the GPU the Triton kernels are faster at every BiFormer size (H200,
    docs/benchmarks.md "layernorm" run 2: fwd+bwd 1.7-9.2x PyTorch's), but in eager mode
    each call also costs the host about 0.2 ms more than PyTorch's (a Python autograd
    function and Triton launches), more than it saves the GPU below 2^23 elements
    (BiFormer-T/S stages 3-4 at 224 px, batch 128). Graph replays have no host cost, so
    captures take the faster kernel everywhere; the two paths agree to bf16 rounding, not bit
    for bit.
    """

    FUSED_MIN_NUMEL = 1 << 23

    def __init__(self, normalized_shape: int, eps: float = 1e-5, fused: bool = False):
        super().__init__(normalized_shape, eps=eps)
        self.fused = fused

    def takes_fused_kernel(self, x: torch.Tensor) -> bool:
        """Whether ``forward(x)`` runs :func:`ops.layer_norm`."""
        return self.fused and (x.numel() >= self.FUSED_MIN_NUMEL or _capturing_cuda_graph(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.takes_fused_kernel(x):
            return ops.layer_norm(x, self.weight, self.bias, self.eps)
        device_type = x.device.type
        if not torch.is_autocast_enabled(device_type):
            return super().forward(x)
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type=device_type, enabled=False):
            return F.layer_norm(x.to(dtype), self.normalized_shape, self.weight.to(dtype),
                                self.bias.to(dtype), self.eps)


class BiFormerBlock(nn.Module):
    """``x += dwconv3x3(x)``; ``x += attn(LN(x))``; ``x += mlp(LN(x))``. (B, H, W, C) in/out.

    ``topk > 0`` selects bi-level routing attention, ``topk == -2`` full attention with LePE
    (the official encoding). ``fused_block`` (``attn_impl='fused'``) runs the block on CUDA as
    one autograd node over the same kernels (``backbones._fused_block``): less host work per
    block in eager mode (on by default: BiFormer-S eager on an H200, 1.23x the module path's
    inference and 1.16x its training img/s, docs/benchmarks.md models run 6).
    """

    def __init__(self, dim: int, topk: int, head_dim: int = 32, n_win: int = 7,
                 mlp_ratio: float = 3.0, side_dwconv: int = 5, drop_path: float = 0.0,
                 pad_mode: str = 'official', attn_impl: str = 'fused',
                 fused_block: bool = True):
        super().__init__()
        self.fused_block = fused_block
        self.graphs = None  # BlockGraphs when the model's graph_blocks is on
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.official = attn_impl == 'gather'  # the official formulation throughout
        self.norm1 = AutocastLayerNorm(dim, eps=1e-6, fused=not self.official)
        if topk > 0:
            self.attn = BiLevelRoutingAttention(dim, head_dim=head_dim, n_win=n_win, topk=topk,
                                                side_dwconv=side_dwconv, pad_mode=pad_mode,
                                                attn_impl=attn_impl)
        elif topk == FULL_ATTENTION:
            self.attn = FullAttentionLePE(dim, side_dwconv=side_dwconv, attn_impl=attn_impl)
        else:
            raise ValueError(f'topk must be > 0 (routing attention) or {FULL_ATTENTION} (full '
                             f'attention with LePE), got {topk}')
        self.norm2 = AutocastLayerNorm(dim, eps=1e-6, fused=not self.official)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._takes_fused_block(x):
            from backbones._fused_block import fused_block
            return fused_block(self, x)
        x = _depthwise(self.pos_embed, x, x, official=self.official)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self._mlp(self.norm2(x)))
        return x

    FUSED_BLOCK_DEVICES = ('cuda',)  # the CPU tests add 'cpu' (Triton interpreter)

    def _takes_fused_block(self, x: torch.Tensor) -> bool:
        return (self.fused_block and not self.official
                and isinstance(self.attn, (BiLevelRoutingAttention, FullAttentionLePE))
                and isinstance(self.drop_path, (DropPath, nn.Identity))
                and x.device.type in self.FUSED_BLOCK_DEVICES
                and autocast_dtype(x) in TRITON_DTYPES and x.dtype in TRITON_DTYPES
                and not (ops.is_exporting() or torch.compiler.is_compiling()
                         or torch.jit.is_scripting()))

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP; ``'fused'`` recomputes its GELU in the backward pass (:func:`ops.gelu_mlp`)
        instead of keeping the activation."""
        if self.official:
            return self.mlp(x)
        mlp = self.mlp
        return ops.gelu_mlp(x, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)


class BiFormerStage(nn.Module):
    """Optional conv3x3-s2 + BN downsampling, then ``depth`` blocks. (B, C, H, W) in/out."""

    def __init__(self, in_dim: int, dim: int, depth: int, topk: int, downsample: bool,
                 drop_path: Union[float, List[float]] = 0.0, **block_kwargs):
        super().__init__()
        self.grad_checkpointing = False
        if downsample:
            self.downsample = nn.Sequential(nn.Conv2d(in_dim, dim, 3, stride=2, padding=1),
                                            nn.BatchNorm2d(dim))
        else:
            self.downsample = nn.Identity()
        drop_paths = drop_path if isinstance(drop_path, (list, tuple)) else [drop_path] * depth
        self.blocks = nn.Sequential(*[
            BiFormerBlock(dim, topk, drop_path=drop_paths[i], **block_kwargs)
            for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x).permute(0, 2, 3, 1)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return x.permute(0, 3, 1, 2)


class BiFormerStem(nn.Sequential):
    """Conv3x3-s2 (-> dim/2) + BN + GELU + conv3x3-s2 + BN: stride 4. (B, C, H, W) in/out.

    ``channels_last`` runs it on a channels-last copy of the image: its BatchNorms then take the
    fast NHWC kernels, and the NHWC view the first stage takes of its output is free.
    """

    def __init__(self, in_chans: int, dim: int, channels_last: bool = False):
        super().__init__(
            nn.Conv2d(in_chans, dim // 2, 3, stride=2, padding=1), nn.BatchNorm2d(dim // 2),
            nn.GELU(), nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1), nn.BatchNorm2d(dim))
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return super().forward(x)


def build_stages(depths, embed_dims, topks, drop_path_rate: float = 0.0,
                 **block_kwargs) -> nn.Sequential:
    """The four stages (stride 4, 8, 16, 32), with linearly increasing stochastic depth."""
    if not len(depths) == len(embed_dims) == len(topks):
        raise ValueError(f'depths, embed_dims and topks need one entry per stage, got '
                         f'{tuple(depths)}, {tuple(embed_dims)}, {tuple(topks)}')
    if any(d < 1 for d in depths):
        raise ValueError(f'depths must be >= 1, got {tuple(depths)}')
    total = sum(depths)
    rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
    stages, first = [], 0
    for i, (depth, dim, topk) in enumerate(zip(depths, embed_dims, topks)):
        stages.append(BiFormerStage(embed_dims[max(i - 1, 0)], dim, depth, topk,
                                    downsample=i > 0, drop_path=rates[first:first + depth],
                                    **block_kwargs))
        first += depth
    return nn.Sequential(*stages)


def set_graph_blocks(model: nn.Module, enable: bool = True) -> None:
    """Turn the CUDA graphs of ``model``'s BiFormer blocks on or off
    (:mod:`backbones._block_graphs`: captured per input shape on CUDA, replayed from then on;
    for eager loops bound by the host). Turning them off, or on again, drops the captures."""
    from backbones._block_graphs import BlockGraphs
    blocks = [m for m in model.modules() if isinstance(m, BiFormerBlock)]
    if enable and any(not block.fused_block or block.official for block in blocks):
        raise ValueError("graph_blocks needs fused_block=True and attn_impl='fused' (it "
                         "captures the fused block)")
    for block in blocks:
        block.graphs = BlockGraphs() if enable else None


def init_weights(module: nn.Module) -> None:
    """Official initialisation: Linear trunc-normal(0.02) with zero bias, LayerNorm 1/0, convs
    keep PyTorch's default."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def check_input(x: torch.Tensor, in_chans: int) -> None:
    """Raise a ValueError unless x is (B, in_chans, H, W) with H, W >= 32."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f'x must be a 4-D image batch (B, {in_chans}, H, W), got {got}')
    if x.shape[1] != in_chans:
        raise ValueError(f'x must have {in_chans} channels (B, {in_chans}, H, W), got '
                         f'{tuple(x.shape)}')
    if x.shape[2] < MIN_INPUT_SIZE or x.shape[3] < MIN_INPUT_SIZE:
        raise ValueError(f'x must be at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} pixels (the '
                         f'network stride), got {x.shape[2]}x{x.shape[3]}')


class BiFormer(nn.Module):
    """BiFormer classifier (timm API).

    Args:
        depths: blocks per stage.
        embed_dims: channels per stage.
        topks: routed regions per stage; -2 selects full attention (the official last stage).
        head_dim: channels per routing-attention head.
        mlp_ratio: MLP hidden width / channels.
        n_win: regions per side in routing attention (7 on ImageNet, 16 for detection).
        side_dwconv: LePE kernel size.
        pad_mode: ``'official'`` (zero-pad before the projection, unmasked) or ``'masked'``.
        attn_impl: ``'fused'`` (:func:`ops.gather_attention`, :func:`ops.depthwise_conv2d`) or
            ``'gather'`` (the official formulation).
        fused_block: run each block as one autograd node on CUDA (see
            :class:`BiFormerBlock`); ``False`` keeps one node per op (the module path).
        graph_blocks: replay each fused block's calls from CUDA graphs captured per input shape
            (:func:`set_graph_blocks`; off by default: it holds graph memory).
        in_chans, num_classes, global_pool, drop_rate, drop_path_rate: as in timm.
    """

    def __init__(self, depths: Tuple[int, ...] = (2, 2, 8, 2),
                 embed_dims: Tuple[int, ...] = (64, 128, 256, 512),
                 topks: Tuple[int, ...] = (1, 4, 16, FULL_ATTENTION), head_dim: int = 32,
                 mlp_ratio: float = 3.0, n_win: int = 7, side_dwconv: int = 5,
                 pad_mode: str = 'official', attn_impl: str = 'fused', in_chans: int = 3,
                 num_classes: int = 1000, global_pool: str = 'avg', drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, fused_block: bool = True,
                 graph_blocks: bool = False):
        super().__init__()
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.stem = BiFormerStem(in_chans, embed_dims[0], channels_last=attn_impl == 'fused')
        self.stages = build_stages(depths, embed_dims, topks, drop_path_rate=drop_path_rate,
                                   head_dim=head_dim, n_win=n_win, mlp_ratio=mlp_ratio,
                                   side_dwconv=side_dwconv, pad_mode=pad_mode,
                                   attn_impl=attn_impl, fused_block=fused_block)
        self.feature_info = [dict(num_chs=dim, reduction=4 * 2 ** i, module=f'stages.{i}')
                             for i, dim in enumerate(embed_dims)]
        self.norm = nn.BatchNorm2d(embed_dims[-1])
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool,
                                   drop_rate=drop_rate)
        self.apply(init_weights)
        if graph_blocks:
            set_graph_blocks(self)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Union[str, List]]:
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^norm', (99999,)),
            ])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def set_graph_blocks(self, enable: bool = True) -> None:
        """See :func:`set_graph_blocks` (checkpointed stages run their blocks eagerly)."""
        set_graph_blocks(self, enable)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """No parameter beyond the 1-D ones (norms, biases) is exempt from weight decay."""
        return set()

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs (NCHW) for ``indices`` (last n if int, all if None); ``norm`` applies
        the final BatchNorm to the last stage's output. Returns the intermediates, or
        ``(final features, intermediates)`` unless ``intermediates_only``."""
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        check_input(x, self.in_chans)
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last_index = len(self.stages) - 1
        stages = self.stages[:max_index + 1] if stop_early else self.stages
        intermediates = []
        x = self.stem(x)
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm and i == last_index else x)
        if intermediates_only:
            return intermediates
        if i == last_index:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1,
                                  prune_norm: bool = False, prune_head: bool = True) -> List[int]:
        """Drop the stages (and optionally norm and head) after the last of ``indices``."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> normalised (B, C4, H/32, W/32) (rounded up)."""
        check_input(x, self.in_chans)
        return self.norm(self.stages(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


_OFFICIAL_KEY_MAP = (
    (r'^downsample_layers\.0\.', 'stem.'),
    (r'^downsample_layers\.(\d+)\.', r'stages.\1.downsample.'),
    (r'^stages\.(\d+)\.(\d+)\.', r'stages.\1.blocks.\2.'),
    (r'\.attn\.qkv\.qkv\.', '.attn.qkv.'),
    (r'\.attn\.wo\.', '.attn.proj.'),
    (r'\.mlp\.0\.', '.mlp.fc1.'),
    (r'\.mlp\.3\.', '.mlp.fc2.'),
    (r'^head\.', 'head.fc.'),
)


def remap_official_keys(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename official BiFormer keys (``downsample_layers.*``, ``stages.i.j.*``, ``norm``,
    ``head``) to ours; a state dict already in our layout is returned unchanged."""
    if not any(key.startswith('downsample_layers.') for key in state_dict):
        return dict(state_dict)
    remapped = {}
    for key, value in state_dict.items():
        for pattern, replacement in _OFFICIAL_KEY_MAP:
            key = re.sub(pattern, replacement, key)
        remapped[key] = value
    return remapped


def unwrap_state_dict(checkpoint: Dict) -> Dict[str, torch.Tensor]:
    """The state dict inside a training checkpoint (``'model'`` as the official code saves,
    or ``'state_dict'``), without a DistributedDataParallel ``module.`` prefix."""
    for wrapper in ('model', 'state_dict'):
        if wrapper in checkpoint and isinstance(checkpoint[wrapper], dict):
            checkpoint = checkpoint[wrapper]
            break
    return {re.sub(r'^module\.', '', key): value for key, value in checkpoint.items()}


def checkpoint_filter_fn(state_dict: Dict, model: nn.Module) -> Dict[str, torch.Tensor]:
    """Map an official BiFormer checkpoint (or our own) onto ``model``'s keys."""
    return remap_official_keys(unwrap_state_dict(state_dict))


def _create_biformer(variant: str, pretrained: bool = False, **kwargs) -> BiFormer:
    return build_model_with_cfg(
        BiFormer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True),
        **kwargs)


def _cfg(url: str = '', **kwargs) -> Dict:
    return {
        'url': url, 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bicubic', 'fixed_input_size': False,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.0', 'classifier': 'head.fc', 'license': 'mit',
        'origin_url': 'https://github.com/rayleizhu/BiFormer', 'paper_ids': 'arXiv:2303.08810',
        'notes': ('The official weights are no longer downloadable automatically; pass the '
                  'file with pretrained_cfg_overlay=dict(file=...).',),
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'biformer_tiny.in1k': _cfg(),
    'biformer_small.in1k': _cfg(),
    'biformer_base.in1k': _cfg(),
})


@register_model
def biformer_tiny(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-T: 13.1M params, 2.2 GFLOPs, 81.4% ImageNet top-1 (official)."""
    model_args = dict(depths=(2, 2, 8, 2), embed_dims=(64, 128, 256, 512))
    return _create_biformer('biformer_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def biformer_small(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-S: 25.5M params, 4.5 GFLOPs, 83.8% ImageNet top-1 (official)."""
    model_args = dict(depths=(4, 4, 18, 4), embed_dims=(64, 128, 256, 512))
    return _create_biformer('biformer_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def biformer_base(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-B: 56.8M params, 9.8 GFLOPs, 84.3% ImageNet top-1 (official)."""
    model_args = dict(depths=(4, 4, 18, 4), embed_dims=(96, 192, 384, 768))
    return _create_biformer('biformer_base', pretrained=pretrained, **dict(model_args, **kwargs))
