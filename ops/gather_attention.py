"""Gather attention: every query group attends to the keys of a few index-chosen key blocks.

Queries form ``G = Nq / block_q`` consecutive groups and keys form ``M = Nk / block_k``
consecutive blocks. Query group ``g`` attends to every key of the blocks
``index[..., g, :]``; an entry of -1 is an empty slot. With ``map_width``, tokens are instead
the row-major pixels of a 2-D map and groups and blocks are ``(h, w)`` windows of it, read in
place (no reordering copies). BiFormer's bi-level routing attention
(routed regions), DSVT's set attention (one block per set) and DLGSANet's sparse global
attention are all this one pattern.

Two implementations sit behind :func:`gather_attention`:

* ``"torch"``: a reference in standard operators (gather, matmul, softmax, masked_fill). It
  copies the routed key/value blocks (``K``-fold memory), has no data-dependent Python control
  flow and static shapes, so it exports to ONNX and traces.
* ``"triton"``: fused forward and backward kernels (:mod:`ops._triton_gather_attention`) that
  read the routed blocks in place and keep only the softmax statistics (``B*H*Nq`` floats).
"""
import os
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ops._dtypes import FLOAT_DTYPES, TRITON_DTYPES, describe

__all__ = ['gather_attention', 'is_exporting', 'set_debug', 'BACKENDS', 'to_window_major',
           'from_window_major']

BACKENDS = ('auto', 'triton', 'torch')
TRITON_MAX_HEAD_DIM = 256

_debug = os.environ.get('DSA_OPS_DEBUG', '0') not in ('', '0')


def set_debug(enabled: bool) -> None:
    """Turn on checks that synchronise with the device (e.g. the index range on the Triton path).

    Also enabled by the environment variable ``DSA_OPS_DEBUG=1``.
    """
    global _debug
    _debug = bool(enabled)


# Bound once: looking ``torch.onnx.is_in_onnx_export`` up goes through the module's lazy
# ``__getattr__`` (microseconds on every op call otherwise).
_in_onnx_export = torch.onnx.is_in_onnx_export
_compiler = torch.compiler


def _torch_exporting() -> bool:
    """True while torch.export traces. Reads the flag that torch.export sets rather than
    calling ``torch.compiler.is_exporting()``: Dynamo folds that call to True whenever it
    traces, torch.compile included (torch <= 2.11), which would send compiled models down the
    export path (the torch references instead of the Triton custom ops)."""
    flag = getattr(_compiler, '_is_exporting_flag', None)
    return _compiler.is_exporting() if flag is None else flag


def is_exporting() -> bool:
    """True while ONNX-exporting, jit-tracing or torch.export-ing (the graph must stay plain);
    False under torch.compile."""
    return _in_onnx_export() or torch.jit.is_tracing() or _torch_exporting()


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def _is_int_size(value) -> bool:
    """A Python int, a symbolic int (torch.export with dynamic shapes), or the 0-dim integer
    tensor that jit tracing (the TorchScript ONNX exporter) makes of a value computed from a
    shape."""
    if isinstance(value, (int, torch.SymInt)):
        return not isinstance(value, bool)
    return (torch.jit.is_tracing() and isinstance(value, Tensor) and value.dim() == 0
            and not value.is_floating_point())


Block = Union[int, Tuple[int, int]]


def _check_window(window, name: str) -> Tuple[int, int]:
    if (not isinstance(window, Sequence) or len(window) != 2
            or not all(_is_int_size(s) and s >= 1 for s in window)):
        raise ValueError(f'{name} must be a positive int, or an (h, w) pair of positive ints '
                         f'with map_width, got {window!r}')
    return window[0], window[1]


def check_windows(block: Block, map_width, num_tokens: int, name: str) -> Tuple[int, int]:
    """Validate an (h, w) window of a row-major map ``map_width`` wide holding ``num_tokens``
    tokens; return it as a pair of ints."""
    height, width = _check_window(block, name)
    if not _is_int_size(map_width) or map_width < 1:
        raise ValueError(f'map_width must be a positive int with (h, w) blocks, got '
                         f'{map_width!r}')
    if num_tokens % map_width or (num_tokens // map_width) % height or map_width % width:
        raise ValueError(f'{name}={tuple(block)} windows must tile the map: {num_tokens} tokens '
                         f'in rows of map_width={map_width} (map height a multiple of '
                         f'{height}, map_width a multiple of {width})')
    return height, width


def to_window_major(x: Tensor, window: Tuple[int, int], map_width: int, dim: int) -> Tensor:
    """Reorder token axis ``dim`` of x from row-major map order (rows ``map_width`` tokens
    wide) to window-major order: ``(h, w)`` windows row-major, tokens row-major inside each
    window (what ``block_q=h * w`` expects). Makes a copy."""
    height, width = window
    lead, rest, tokens = x.shape[:dim], x.shape[dim + 1:], x.shape[dim]
    x = x.reshape(*lead, tokens // map_width // height, height, map_width // width, width,
                  *rest)
    return x.transpose(dim + 1, dim + 2).reshape(*lead, tokens, *rest)


def from_window_major(x: Tensor, window: Tuple[int, int], map_width: int, dim: int) -> Tensor:
    """Inverse of :func:`to_window_major`."""
    height, width = window
    lead, rest, tokens = x.shape[:dim], x.shape[dim + 1:], x.shape[dim]
    x = x.reshape(*lead, tokens // map_width // height, map_width // width, height, width,
                  *rest)
    return x.transpose(dim + 1, dim + 2).reshape(*lead, tokens, *rest)


def _check_positive_int(value, name: str) -> None:
    if not _is_int_size(value) or value < 1:
        raise ValueError(f'{name} must be a positive int, got {value!r}')


def _validate(q: Tensor, k: Tensor, v: Tensor, index: Tensor, block_q: Block, block_k: Block,
              map_width: Optional[int], key_padding_mask: Optional[Tensor],
              scale: Optional[float], backend: str):
    """Check shapes, dtypes and devices; raise a ValueError naming the offending argument.
    Returns (block_q, block_k) as token counts and the windows ((h, w) each) or None."""
    if backend not in BACKENDS:
        raise ValueError(f'backend must be one of {BACKENDS}, got {backend!r}')
    windows = None
    if map_width is None:
        for name, block in (('block_q', block_q), ('block_k', block_k)):
            if isinstance(block, Sequence):
                raise ValueError(f'{name}={tuple(block)}: (h, w) window blocks need map_width '
                                 f'(the width of the row-major token map)')
        _check_positive_int(block_q, 'block_q')
        _check_positive_int(block_k, 'block_k')
    for name, t in (('q', q), ('k', k), ('v', v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f'{name} must be a 4-D tensor (B, H, N, D), got {describe(t)}')
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f'{name} must be a floating tensor ({FLOAT_DTYPES}), got {t.dtype}')
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f'q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, '
                         f'v {v.dtype}')
    if k.device != q.device or v.device != q.device:
        raise ValueError(f'q, k and v must be on one device, got q {q.device}, k {k.device}, '
                         f'v {v.device}')
    batch, heads, num_q, head_dim = q.shape
    if map_width is not None:
        windows = (check_windows(block_q, map_width, num_q, 'block_q'),
                   check_windows(block_k, map_width, k.shape[2], 'block_k'))
        block_q, block_k = (h * w for h, w in windows)
    if k.shape[:2] != q.shape[:2] or k.shape[3] != head_dim:
        raise ValueError(f'k must have shape (B, H, Nk, D) = ({batch}, {heads}, Nk, {head_dim}) '
                         f'to match q {tuple(q.shape)}, got {tuple(k.shape)}')
    if v.shape != k.shape:
        raise ValueError(f'v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}')
    num_k = k.shape[2]
    if num_q % block_q:
        raise ValueError(f'block_q={block_q} must divide the number of queries Nq={num_q}')
    if num_k % block_k:
        raise ValueError(f'block_k={block_k} must divide the number of keys Nk={num_k}')
    groups = num_q // block_q
    if not isinstance(index, Tensor) or index.dtype not in (torch.int32, torch.int64):
        got = index.dtype if isinstance(index, Tensor) else type(index).__name__
        raise ValueError(f'index must be an int32 or int64 tensor, got {got}')
    if index.device != q.device:
        raise ValueError(f'index must be on the device of q ({q.device}), got {index.device}')
    if index.dim() == 3:
        expected = (batch, groups)
        if tuple(index.shape[:2]) != expected:
            raise ValueError(f'index must have shape (B, G, K) = ({batch}, {groups}, K) or '
                             f'(B, H, G, K), got {tuple(index.shape)}')
    elif index.dim() == 4:
        expected = (batch, heads, groups)
        if tuple(index.shape[:3]) != expected:
            raise ValueError(f'index must have shape (B, H, G, K) = ({batch}, {heads}, {groups}, '
                             f'K) or (B, G, K), got {tuple(index.shape)}')
    else:
        raise ValueError(f'index must be 3-D (B, G, K) or 4-D (B, H, G, K), got '
                         f'{tuple(index.shape)}')
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            raise ValueError('key_padding_mask must be a bool tensor (True = excluded key)')
        if tuple(key_padding_mask.shape) != (batch, num_k):
            raise ValueError(f'key_padding_mask must have shape (B, Nk) = ({batch}, {num_k}), '
                             f'got {tuple(key_padding_mask.shape)}')
        if key_padding_mask.device != q.device:
            raise ValueError(f'key_padding_mask must be on the device of q ({q.device}), got '
                             f'{key_padding_mask.device}')
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise ValueError(f'scale must be a float or None, got {scale!r}')
    return block_q, block_k, windows


def _check_index_range(index: Tensor, num_blocks: int) -> None:
    """Raise if an index entry lies outside [-1, num_blocks) (synchronises with the device)."""
    if index.numel() == 0:
        return
    low, high = int(index.min()), int(index.max())
    if low < -1 or high >= num_blocks:
        raise ValueError(f'index entries must lie in [-1, M) = [-1, {num_blocks}), got values in '
                         f'[{low}, {high}]')


def gather_attention_reference(q: Tensor, k: Tensor, v: Tensor, index: Tensor, *, block_q: int,
                               block_k: int, key_padding_mask: Optional[Tensor] = None,
                               scale: Optional[float] = None) -> Tensor:
    """Gather attention in standard operators, in the dtype of ``q`` (no validation).

    Copies the routed key/value blocks into (B, H, G, K * block_k, D) tensors, then runs dense
    attention per query group. Masked keys get the dtype's lowest score and a probability of
    exactly zero, so a query with no admissible key returns zeros and finite gradients.
    """
    batch, heads, num_q, head_dim = q.shape
    num_k = k.shape[2]
    groups, blocks = num_q // block_q, num_k // block_k
    if scale is None:
        scale = head_dim ** -0.5
    if index.dim() == 3:
        index = index.unsqueeze(1).expand(batch, heads, groups, index.shape[-1])
    slots = index.shape[-1]
    slot_is_empty = index < 0                                    # (B, H, G, K)
    flat_index = index.clamp(min=0).to(torch.int64).reshape(batch, heads, groups * slots, 1)

    def gather_blocks(x: Tensor) -> Tensor:                      # -> (B, H, G, K * block_k, D)
        x_blocks = x.reshape(batch, heads, blocks, block_k * head_dim)
        if blocks == 0:  # every slot is empty; gather from one zero block instead
            x_blocks = torch.cat([x_blocks, x_blocks.new_zeros(batch, heads, 1, 1).expand(
                -1, -1, 1, block_k * head_dim)], dim=2)
        picked = torch.gather(x_blocks, 2, flat_index.expand(-1, -1, -1, block_k * head_dim))
        return picked.reshape(batch, heads, groups, slots * block_k, head_dim)

    k_routed, v_routed = gather_blocks(k), gather_blocks(v)
    excluded = slot_is_empty.unsqueeze(-1).expand(-1, -1, -1, -1, block_k)
    if key_padding_mask is not None:
        mask_blocks = key_padding_mask.reshape(batch, 1, blocks, block_k).expand(-1, heads, -1, -1)
        if blocks == 0:
            mask_blocks = mask_blocks.new_ones(batch, heads, 1, block_k)
        mask_index = flat_index.expand(-1, -1, -1, block_k)
        padded = torch.gather(mask_blocks, 2, mask_index).reshape(batch, heads, groups, slots,
                                                                  block_k)
        excluded = excluded | padded
    excluded = excluded.reshape(batch, heads, groups, 1, slots * block_k)

    q_groups = q.reshape(batch, heads, groups, block_q, head_dim)
    scores = (q_groups * scale) @ k_routed.transpose(-1, -2)     # (B, H, G, block_q, K*block_k)
    scores = scores.masked_fill(excluded, torch.finfo(scores.dtype).min)
    probs = scores.softmax(dim=-1).masked_fill(excluded, 0.0)
    out = probs @ v_routed                                       # (B, H, G, block_q, D)
    return out.reshape(batch, heads, num_q, head_dim)


def gather_attention(q: Tensor, k: Tensor, v: Tensor, index: Tensor, *, block_q: Block,
                     block_k: Block, map_width: Optional[int] = None,
                     key_padding_mask: Optional[Tensor] = None,
                     scale: Optional[float] = None, backend: str = 'auto') -> Tensor:
    """Attention of each query group over the key blocks its index row names.

    Args:
        q: (B, H, Nq, D) queries, ``Nq = G * block_q`` in group-major order.
        k, v: (B, H, Nk, D) keys and values, ``Nk = M * block_k`` in block-major order.
        index: int32/int64 (B, G, K) shared by the heads, or (B, H, G, K) per head. Query group
            ``g`` attends to every key of blocks ``index[..., g, :]``; -1 marks an empty slot.
            Entries must lie in [-1, M) (checked on the torch path, and on the Triton path in
            debug mode, see :func:`set_debug`).
        block_q, block_k: positive group and block sizes (any integer, not only powers of 2),
            or, with ``map_width``, ``(h, w)`` windows.
        map_width: with (h, w) blocks: tokens (of q and of k) are the pixels of maps
            ``map_width`` wide in row-major order, and group ``g`` / block ``m`` is the ``g``-th
            / ``m``-th window in row-major order over the window grid. The result equals
            :func:`to_window_major` of q, k, v and the mask, attention with ``h * w`` blocks,
            and :func:`from_window_major` of the output; the Triton path reads the windows in
            place.
        key_padding_mask: optional bool (B, Nk); True excludes that key.
        scale: score scale, default ``D ** -0.5``.
        backend: ``"auto"`` (Triton on CUDA, torch reference on CPU and while exporting or
            tracing), ``"triton"`` or ``"torch"``.

    Returns:
        (B, H, Nq, D) in the dtype of ``q`` (in q's token order); a query with no admissible
        key gets zeros. Differentiable in q, k and v. The Triton path returns it (and the
        gradients of q, k and v) token-major, a (B, H, Nq, D) view of contiguous
        (B, Nq, H, D) memory, so ``out.transpose(1, 2).reshape(B, Nq, H * D)`` is free; the
        torch path returns it contiguous.
    """
    block_q, block_k, windows = _validate(q, k, v, index, block_q, block_k, map_width,
                                          key_padding_mask, scale, backend)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    num_blocks = k.shape[2] // block_k
    exporting, compiling = is_exporting(), _is_compiling()
    use_triton = backend == 'triton' or (
        backend == 'auto' and q.is_cuda and q.dtype in TRITON_DTYPES
        and q.shape[-1] <= TRITON_MAX_HEAD_DIM and not exporting)
    if use_triton:
        if q.dtype not in TRITON_DTYPES:
            raise ValueError(f'the triton backend supports q dtypes {TRITON_DTYPES}, got {q.dtype}')
        if q.shape[-1] > TRITON_MAX_HEAD_DIM:
            raise ValueError(f'the triton backend supports head dims D <= {TRITON_MAX_HEAD_DIM}, '
                             f'got {q.shape[-1]}')
        if _debug and not compiling:
            _check_index_range(index, num_blocks)
        from ops._triton_gather_attention import triton_gather_attention
        layout = None if windows is None else [windows[0][1], windows[1][1], int(map_width)]
        return triton_gather_attention(q, k, v, index, block_q=block_q, block_k=block_k,
                                       key_padding_mask=key_padding_mask, scale=float(scale),
                                       layout=layout, traced=exporting or compiling)
    if not (exporting or compiling):
        _check_index_range(index, num_blocks)
    if windows is None:
        return gather_attention_reference(q, k, v, index, block_q=block_q, block_k=block_k,
                                          key_padding_mask=key_padding_mask, scale=scale)
    q_windows, k_windows = windows
    q, k, v = (to_window_major(t, w, map_width, 2) for t, w in ((q, q_windows), (k, k_windows),
                                                                (v, k_windows)))
    if key_padding_mask is not None:
        key_padding_mask = to_window_major(key_padding_mask, k_windows, map_width, 1)
    out = gather_attention_reference(q, k, v, index, block_q=block_q, block_k=block_k,
                                     key_padding_mask=key_padding_mask, scale=scale)
    return from_window_major(out, q_windows, map_width, 2)
