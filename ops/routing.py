"""Region-level routing for bi-level routing attention (BiFormer)."""
from typing import Optional

import torch
from torch import Tensor

from ops._dtypes import describe
from ops.gather_attention import Block, _is_int_size, check_windows

__all__ = ['region_routing']


def region_routing(q: Tensor, k: Tensor, *, block_q: Block, block_k: Block, topk: int,
                   map_width: Optional[int] = None, scale: Optional[float] = None,
                   key_padding_mask: Optional[Tensor] = None) -> Tensor:
    """Pick, for every query region, the ``topk`` key regions of highest mean-token affinity.

    Args:
        q: (B, Nq, C) query tokens in region-major order, ``Nq = G * block_q``.
        k: (B, Nk, C) key tokens in region-major order, ``Nk = M * block_k``.
        block_q, block_k: tokens per query region and per key region; or, with ``map_width``,
            ``(h, w)`` windows of row-major token maps ``map_width`` wide (as in
            :func:`ops.gather_attention`; region ``g`` is the ``g``-th window, row-major).
        topk: number of key regions per query region, ``0 <= topk <= M`` (static).
        map_width: see ``block_q``.
        scale: affinity scale, default ``C ** -0.5``. BiFormer's checkpoints use
            ``qk_dim ** -0.5`` with ``C = qk_dim``, i.e. the default.
        key_padding_mask: optional bool (B, Nk), True = padded key. Padded keys are left out of
            the key-region means, and a region with no real key is never picked.

    Returns:
        int64 (B, G, topk) key-region indices, best first; -1 where fewer than ``topk`` regions
        hold a real key. Computed without gradient (routing is not differentiable).
        Affinity is ``(q_r * scale) @ k_r^T`` over the region means ``q_r``, ``k_r``.
    """
    for name, t in (('q', q), ('k', k)):
        if not isinstance(t, Tensor) or t.dim() != 3 or not t.is_floating_point():
            raise ValueError(f'{name} must be a floating 3-D tensor (B, N, C), got '
                             f'{describe(t)}')
    windows = {}
    for name, t, block in (('q', q, block_q), ('k', k, block_k)):
        if map_width is not None:
            windows[name] = check_windows(block, map_width, t.shape[1], f'block_{name}')
            continue
        if not _is_int_size(block) or block < 1:
            raise ValueError(f'block_{name} must be a positive int, got {block!r}')
        if t.shape[1] % block:
            raise ValueError(f'block_{name}={block} must divide the token count of {name} '
                             f'({t.shape[1]})')
    if k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2] or k.device != q.device:
        raise ValueError(f'k must have shape (B, Nk, C) = ({q.shape[0]}, Nk, {q.shape[2]}) on '
                         f'{q.device}, got {tuple(k.shape)} on {k.device}')
    batch, _, channels = q.shape
    if windows:
        block_q, block_k = (h * w for h, w in windows.values())
    blocks = k.shape[1] // block_k
    if isinstance(topk, bool) or not isinstance(topk, int) or not 0 <= topk <= blocks:
        raise ValueError(f'topk must be an int in [0, M] = [0, {blocks}], got {topk!r}')
    if key_padding_mask is not None and (
            key_padding_mask.dtype != torch.bool or key_padding_mask.device != k.device
            or tuple(key_padding_mask.shape) != (batch, k.shape[1])):
        raise ValueError(f'key_padding_mask must be a bool tensor of shape (B, Nk) = '
                         f'({batch}, {k.shape[1]}) on {k.device}, got '
                         f'{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}')
    if scale is None:
        scale = channels ** -0.5
    return route_unchecked(q, k, block_q, block_k, windows.get('q'), windows.get('k'),
                           map_width, topk, scale, key_padding_mask)


def route_unchecked(q: Tensor, k: Tensor, block_q: int, block_k: int, q_window, k_window,
                    map_width: Optional[int], topk: int, scale: float,
                    key_padding_mask: Optional[Tensor]) -> Tensor:
    """:func:`region_routing` without argument checks, for callers whose shapes hold by
    construction (BiFormer's fused block): block sizes in tokens, and with ``map_width`` the
    ``(h, w)`` windows of q and k (else None)."""
    batch = q.shape[0]

    def per_region(x: Tensor, window, block: int, reduce: str) -> Tensor:
        """(B, N, C) -> (B, regions, C): ``reduce`` ('mean' or 'sum') over each region's
        tokens, read in place (no reordering copy)."""
        tokens, chans = x.shape[1], x.shape[2]
        if window is not None:
            height, width = window
            x = x.reshape(batch, tokens // map_width // height, height, map_width // width,
                          width, chans)
            dims = (2, 4)
        else:
            x = x.reshape(batch, tokens // block, block, chans)
            dims = (2,)
        return getattr(x, reduce)(dim=dims).reshape(batch, tokens // block, chans)

    with torch.no_grad():
        q_regions = per_region(q, q_window, block_q, 'mean')
        if key_padding_mask is None:
            k_regions = per_region(k, k_window, block_k, 'mean')
            region_is_empty = None
        else:
            real = (~key_padding_mask).unsqueeze(-1).to(k.dtype)
            counts = per_region(real, k_window, block_k, 'sum')
            k_regions = per_region(k * real, k_window, block_k, 'sum') / counts.clamp(min=1)
            region_is_empty = counts.squeeze(-1) == 0                       # (B, M)
        affinity = (q_regions * scale) @ k_regions.transpose(-1, -2)      # (B, G, M)
        if region_is_empty is not None:
            affinity = affinity.masked_fill(region_is_empty.unsqueeze(1), float('-inf'))
        top_affinity, index = torch.topk(affinity, k=topk, dim=-1)
        if region_is_empty is None:  # every region holds a real key: all picks are valid
            return index
        return index.masked_fill(top_affinity == float('-inf'), -1)
