"""DSVT set attention as a use of :func:`ops.gather_attention`."""
from typing import Optional

import torch
from torch import Tensor

from ops._dtypes import describe
from ops.gather_attention import gather_attention

__all__ = ['set_attention']


def set_attention(q: Tensor, k: Tensor, v: Tensor, set_voxel_index: Tensor,
                  set_padding_mask: Optional[Tensor] = None, *, scale: Optional[float] = None,
                  backend: str = 'auto') -> Tensor:
    """Attention among the voxels of each set (DSVT's ``SetAttention`` core, without projections).

    DSVT fills every set with ``S`` voxel slots, repeating voxels when a window holds too few;
    the repeats are marked as padding and must not act as keys. Each set becomes one batch
    entry of :func:`gather_attention` with ``block_q = block_k = S`` and a single key block, so
    the Triton kernel handles any ``S`` (36, 48, 90...) and the padding through its key mask.

    Args:
        q, k, v: (N, H, D) per-voxel, per-head features.
        set_voxel_index: int (num_sets, S) voxel ids of each set's slots.
        set_padding_mask: optional bool (num_sets, S), True = repeated voxel (excluded as key).
        scale: score scale, default ``D ** -0.5``.
        backend: as in :func:`gather_attention`.

    Returns:
        (num_sets, S, H, D) attention output of every slot (padding slots included; DSVT
        scatters the outputs back to voxels).
    """
    if not isinstance(q, Tensor) or q.dim() != 3:
        raise ValueError(f'q must be a 3-D tensor (N, H, D), got {describe(q)}')
    for name, t in (('k', k), ('v', v)):
        if not isinstance(t, Tensor) or t.shape != q.shape:
            raise ValueError(f'{name} must have the shape of q {tuple(q.shape)}, got '
                             f'{describe(t)}')
    if (not isinstance(set_voxel_index, Tensor) or set_voxel_index.dim() != 2
            or set_voxel_index.dtype not in (torch.int32, torch.int64)):
        raise ValueError('set_voxel_index must be an int32/int64 tensor (num_sets, S)')
    num_sets, set_size = set_voxel_index.shape
    if set_padding_mask is not None and (
            set_padding_mask.dtype != torch.bool
            or tuple(set_padding_mask.shape) != (num_sets, set_size)):
        raise ValueError(f'set_padding_mask must be a bool tensor of shape (num_sets, S) = '
                         f'({num_sets}, {set_size}), got {set_padding_mask.dtype} '
                         f'{tuple(set_padding_mask.shape)}')
    if set_size == 0:
        raise ValueError('set_voxel_index must have a positive set size S')
    flat_index = set_voxel_index.reshape(-1)
    # (num_sets, S, H, D) viewed as (B=num_sets, H, S, D): no copy beyond the gather.
    q_sets, k_sets, v_sets = (x.index_select(0, flat_index).reshape(num_sets, set_size,
                                                                    *x.shape[1:]).transpose(1, 2)
                              for x in (q, k, v))
    own_set = torch.zeros(num_sets, 1, 1, dtype=torch.int64, device=q.device)
    out = gather_attention(q_sets, k_sets, v_sets, own_set, block_q=set_size, block_k=set_size,
                           key_padding_mask=set_padding_mask, scale=scale, backend=backend)
    return out.transpose(1, 2)
