"""Region-level routing for bi-level routing attention (BiFormer)."""
from typing import Optional

import torch
from torch import Tensor

from ops.gather_attention import _is_int_size

__all__ = ['region_routing']


@torch.no_grad()
def region_routing(q: Tensor, k: Tensor, *, block_q: int, block_k: int, topk: int,
                   scale: Optional[float] = None,
                   key_padding_mask: Optional[Tensor] = None) -> Tensor:
    """Pick, for every query region, the ``topk`` key regions of highest mean-token affinity.

    Args:
        q: (B, Nq, C) query tokens in region-major order, ``Nq = G * block_q``.
        k: (B, Nk, C) key tokens in region-major order, ``Nk = M * block_k``.
        block_q, block_k: tokens per query region and per key region.
        topk: number of key regions per query region, ``0 <= topk <= M`` (static).
        scale: affinity scale, default ``C ** -0.5``. BiFormer's checkpoints use
            ``qk_dim ** -0.5`` with ``C = qk_dim``, i.e. the default.
        key_padding_mask: optional bool (B, Nk), True = padded key. Padded keys are left out of
            the key-region means, and a region with no real key is never picked.

    Returns:
        int64 (B, G, topk) key-region indices, best first; -1 where fewer than ``topk`` regions
        hold a real key. Computed without gradient (routing is not differentiable).
        Affinity is ``(q_r * scale) @ k_r^T`` over the region means ``q_r``, ``k_r``.
    """
    for name, t, block in (('q', q, block_q), ('k', k, block_k)):
        if not _is_int_size(block) or block < 1:
            raise ValueError(f'block_{name} must be a positive int, got {block!r}')
        if not isinstance(t, Tensor) or t.dim() != 3 or not t.is_floating_point():
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f'{name} must be a floating 3-D tensor (B, N, C), got {got}')
        if t.shape[1] % block:
            raise ValueError(f'block_{name}={block} must divide the token count of {name} '
                             f'({t.shape[1]})')
    if k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2] or k.device != q.device:
        raise ValueError(f'k must have shape (B, Nk, C) = ({q.shape[0]}, Nk, {q.shape[2]}) on '
                         f'{q.device}, got {tuple(k.shape)} on {k.device}')
    batch, num_q, channels = q.shape
    groups, blocks = num_q // block_q, k.shape[1] // block_k
    if isinstance(topk, bool) or not isinstance(topk, int) or not 0 <= topk <= blocks:
        raise ValueError(f'topk must be an int in [0, M] = [0, {blocks}], got {topk!r}')
    if scale is None:
        scale = channels ** -0.5
    q_regions = q.reshape(batch, groups, block_q, channels).mean(dim=2)
    k_blocks = k.reshape(batch, blocks, block_k, channels)
    if key_padding_mask is None:
        k_regions = k_blocks.mean(dim=2)
        region_is_empty = None
    else:
        if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (
                batch, k.shape[1]) or key_padding_mask.device != k.device:
            raise ValueError(f'key_padding_mask must be a bool tensor of shape (B, Nk) = '
                             f'({batch}, {k.shape[1]}) on {k.device}, got '
                             f'{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}')
        real = (~key_padding_mask).reshape(batch, blocks, block_k, 1).to(k.dtype)
        counts = real.sum(dim=2)
        k_regions = (k_blocks * real).sum(dim=2) / counts.clamp(min=1)
        region_is_empty = counts.squeeze(-1) == 0                       # (B, M)
    affinity = (q_regions * scale) @ k_regions.transpose(-1, -2)      # (B, G, M)
    if region_is_empty is not None:
        affinity = affinity.masked_fill(region_is_empty.unsqueeze(1), float('-inf'))
    top_affinity, index = torch.topk(affinity, k=topk, dim=-1)
    return index.masked_fill(top_affinity == float('-inf'), -1)
