"""Whole-map Triton backward of :func:`ops.gather_attention` for short key sequences.

Where all keys of a (batch, head) fit one tile (``Nk <= MAX_KEYS``), one program per (batch,
head) walks its query tiles, scores each against every key at once, weights each (query, key)
pair by how often the query's index row names the key's block (a (B, 1 or H, G, M) uint8
count table built from the index by one small kernel, so a block named twice counts twice, as
in the reference), stores the tile's dQ directly and keeps dK and dV in registers: one launch,
no atomics, no transposed index. It takes the forward's out and lse from the gathered kernels
(lse in base 2, +inf for a query with no admissible key).

It pays where the routed blocks are small and many, so that the gathered kernels pack several
query groups into one 16-row tile and score all their keys against every row, and where there
are enough (batch, head) pairs to fill the GPU: BiFormer's stage 3 at 224 px (196 tokens, 49
regions of 2x2, 16 routed). :func:`takes_map_backward` says where; docs/ops.md has the
measurements. A forward of the same form was slower than the gathered one (docs/ops.md).
"""
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ops._launch import fast_launcher, launch_fitting
from ops._sizes import cdiv, next_power_of_2
from ops._triton_gather_attention import LOG2E, _block_d, _index_strides

MAX_KEYS = 256       # keys of a (batch, head) that one tile holds
MAX_HEAD_DIM = 64
MAX_SLOTS = 255      # the count table is uint8
# 'auto' takes the whole-map backward from this many (batch, head) programs: measured faster
# with 512 and 1024 of them, slower with 128 (docs/ops.md, "Whole-map backward").
MIN_PROGRAMS = 512

# (BLOCK_M query rows, num_warps, num_stages) per head-dim class (max BLOCK_D), from
# `tools/benchmark.py ops --tune-map` on an H200 at t224_s3 (D = 32) and at its shape with
# D = 64 (docs/benchmarks.md, ops run 8).
_TILES = {32: (64, 8, 1), 64: (32, 8, 1)}
_FITTED = {}  # (device index, head-dim class): the smaller row that launched

MODES = ('auto', 'on', 'off')
_mode = 'auto'


def set_map_backward(mode: str) -> None:
    """Where the gathered backward hands over to this one (tests and benchmarks compare the
    two): ``'auto'`` (default) per :func:`takes_map_backward`, ``'on'`` wherever it applies,
    ``'off'`` never."""
    global _mode
    if mode not in MODES:
        raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
    _mode = mode


def applies(num_k: int, head_dim: int, slots: int) -> bool:
    """Whether this backward can run the call: every key in one tile, D <= MAX_HEAD_DIM, at
    most MAX_SLOTS slots."""
    return 0 < num_k <= MAX_KEYS and head_dim <= MAX_HEAD_DIM and slots <= MAX_SLOTS


def takes_map_backward(num_k: int, head_dim: int, block_q: int, block_k: int, slots: int,
                       programs: int) -> bool:
    """Whether a gather attention's backward runs here (see :func:`set_map_backward`).

    'auto': query groups under 16 tokens (the gathered kernels then pack several groups per
    16-row tile) that route to at least a quarter of the keys (scoring all keys then wastes
    less than packing does), with at least MIN_PROGRAMS (batch, head) pairs."""
    if _mode == 'off' or not applies(num_k, head_dim, slots):
        return False
    return _mode == 'on' or (block_q < 16 and 4 * slots * block_k >= num_k
                             and programs >= MIN_PROGRAMS)


def _head_dim_class(head_dim: int) -> int:
    return 32 if head_dim <= 32 else 64


def _geometry(block: int, window_width: Optional[int], map_width: Optional[int]):
    """(map_w, win_h, win_w, blocks_w) of the token -> block arithmetic of :func:`_block_of`:
    windows of ``block // window_width`` x ``window_width`` tokens of a row-major map
    ``map_width`` wide, or (``window_width`` None) consecutive blocks of ``block`` tokens."""
    if window_width is None:
        return block, 1, block, 1
    return map_width, block // window_width, window_width, map_width // window_width


@triton.jit
def _block_of(t, map_w, win_h, win_w, blocks_w):
    """Block (query group or key block) of token positions ``t``; see :func:`_geometry`."""
    return ((t // map_w) // win_h) * blocks_w + (t % map_w) // win_w


@triton.jit
def _map_row(position, block, map_w, win_h, win_w, blocks_w):
    """Memory row (row-major map position) of window-major positions ``position`` of blocks
    ``block`` (``position // (win_h * win_w)``); see :func:`_geometry`."""
    within = position - block * (win_h * win_w)
    return (((block // blocks_w) * win_h + within // win_w) * map_w
            + (block % blocks_w) * win_w + within % win_w)


@triton.jit
def _count_kernel(Index, Counts, stride_ib, stride_ih, stride_ig, stride_ik, index_heads,
                  groups, slots, blocks, num_chunks,
                  BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_B: tl.constexpr):
    """Counts[r, g, m] = how many of index row (r, g)'s slots name block m; BLOCK_S slots of
    BLOCK_G rows per step."""
    program = tl.program_id(0)
    row, chunk = program // num_chunks, program % num_chunks
    b, h = (row // index_heads).to(tl.int64), (row % index_heads).to(tl.int64)
    g = chunk * BLOCK_G + tl.arange(0, BLOCK_G)
    m = tl.arange(0, BLOCK_B)
    g_valid = g < groups
    counts = tl.zeros([BLOCK_G, BLOCK_B], tl.int32)
    base = Index + b * stride_ib + h * stride_ih + g[:, None] * stride_ig
    for start in range(0, slots, BLOCK_S):
        j = start + tl.arange(0, BLOCK_S)
        named = tl.load(base + j[None, :] * stride_ik,
                        mask=g_valid[:, None] & (j < slots)[None, :], other=-1).to(tl.int32)
        counts += tl.sum((named[:, :, None] == m[None, None, :]).to(tl.int32), 1)
    offsets = row.to(tl.int64) * groups * blocks + g[:, None] * blocks + m[None, :]
    tl.store(Counts + offsets, counts.to(tl.uint8), mask=g_valid[:, None] & (m < blocks)[None, :])


def count_table(index: Tensor, blocks: int) -> Tensor:
    """(B, 1 or H, G, M) uint8: how often each index row (at most MAX_SLOTS slots) names each
    of the ``blocks`` key blocks; -1 and out-of-range entries name none."""
    batch, groups, slots = index.shape[0], index.shape[-2], index.shape[-1]
    if slots > MAX_SLOTS:
        raise ValueError(f'count_table takes at most {MAX_SLOTS} slots, got {slots}')
    heads = index.shape[1] if index.dim() == 4 else 1
    counts = torch.empty((batch, heads, groups, blocks), dtype=torch.uint8, device=index.device)
    if counts.numel() == 0:
        return counts
    block_b = next_power_of_2(blocks)
    block_s = min(next_power_of_2(slots), 16)
    # at most 8192 compares a step: small programs, many of them (the table is tiny)
    block_g = max(1, min(next_power_of_2(groups), 8192 // (block_s * block_b)))
    num_chunks = cdiv(groups, block_g)
    fast_launcher(_count_kernel)[(batch * heads * num_chunks,)](
        index, counts, *_index_strides(index), heads, groups, slots, blocks, num_chunks,
        BLOCK_G=block_g, BLOCK_S=block_s, BLOCK_B=block_b, num_warps=4)
    return counts


@triton.jit
def _one_hot(col_blocks, col_valid, dtype, BLOCK_B: tl.constexpr):
    """(BLOCK_B, len(cols)) one-hot of each column's block in ``dtype``; a zero column where
    the key does not exist or is padding."""
    named = tl.where(col_valid, col_blocks, -1)
    return (tl.arange(0, BLOCK_B)[:, None] == named[None, :]).to(dtype)


@triton.jit
def _key_columns(Mask, stride_mb, stride_mn, b, num_k, HAS_MASK: tl.constexpr,
                 BLOCK_T: tl.constexpr):
    """All key positions of the tile and whether each exists and is not padding."""
    cols = tl.arange(0, BLOCK_T)
    valid = cols < num_k
    if HAS_MASK:
        padded = tl.load(Mask + b * stride_mb + cols * stride_mn, mask=valid, other=1)
        valid = valid & (padded == 0)
    return cols, valid


@triton.jit
def _rows_tile(Ptr, base, rows, valid, stride_n, d, d_valid, stride_d):
    """(len(rows), BLOCK_D) tile of a (.., N, D) tensor; zeros where masked."""
    return tl.load(Ptr + base + rows[:, None] * stride_n + d[None, :] * stride_d,
                   mask=valid[:, None] & d_valid[None, :], other=0.0)


@triton.jit
def _map_bwd_kernel(Q, K, V, Out, GradOut, Lse, Counts, Mask, GradQ, GradK, GradV,
                    stride_qb, stride_qh, stride_qn, stride_qd,
                    stride_kb, stride_kh, stride_kn, stride_kd,
                    stride_vb, stride_vh, stride_vn, stride_vd,
                    stride_ob, stride_oh, stride_on, stride_od,
                    stride_gb, stride_gh, stride_gn, stride_gd,
                    stride_dqb, stride_dqh, stride_dqn,
                    stride_dkb, stride_dkh, stride_dkn,
                    stride_cb, stride_ch, stride_mb, stride_mn,
                    heads, num_q, num_k, head_dim, blocks,
                    scale, scale_log2,
                    Q_MAP_W: tl.constexpr, Q_WIN_H: tl.constexpr, Q_WIN_W: tl.constexpr,
                    Q_BLOCKS_W: tl.constexpr, K_MAP_W: tl.constexpr, K_WIN_H: tl.constexpr,
                    K_WIN_W: tl.constexpr, K_BLOCKS_W: tl.constexpr, HAS_MASK: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_B: tl.constexpr):
    """dQ, dK and dV of one (batch, head): its query tiles in turn, dK/dV kept in registers.

    Every product is taken transposed, (keys, query rows), so the BLOCK_T keys are its M. A
    pair's weight (the count of the row's group naming the key's block) is the product of the
    keys' one-hot block matrix and the rows' count-table rows: exact (one term per output, a
    count <= 255) and one tensor-core product instead of a byte gather per score."""
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // heads, bh % heads
    d = tl.arange(0, BLOCK_D)
    d_valid = d < head_dim
    cols, col_valid = _key_columns(Mask, stride_mb, stride_mn, b, num_k, HAS_MASK, BLOCK_T)
    col_blocks = _block_of(cols, K_MAP_W, K_WIN_H, K_WIN_W, K_BLOCKS_W)
    k = _rows_tile(K, b * stride_kb + h * stride_kh, cols, cols < num_k, stride_kn, d, d_valid,
                   stride_kd)
    v = _rows_tile(V, b * stride_vb + h * stride_vh, cols, cols < num_k, stride_vn, d, d_valid,
                   stride_vd)
    grad_k = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    grad_v = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    one_hot = _one_hot(col_blocks, col_valid, k.dtype, BLOCK_B)
    Counts += b * stride_cb + h * stride_ch
    m = tl.arange(0, BLOCK_B)
    for start in range(0, num_q, BLOCK_M):  # query rows in window-major order, as lse is
        positions = start + tl.arange(0, BLOCK_M)
        row_valid = positions < num_q
        row_groups = positions // (Q_WIN_H * Q_WIN_W)
        rows = _map_row(positions, row_groups, Q_MAP_W, Q_WIN_H, Q_WIN_W, Q_BLOCKS_W)
        q = _rows_tile(Q, b * stride_qb + h * stride_qh, rows, row_valid, stride_qn, d,
                       d_valid, stride_qd)
        do = _rows_tile(GradOut, b * stride_gb + h * stride_gh, rows, row_valid, stride_gn, d,
                        d_valid, stride_gd)
        o = _rows_tile(Out, b * stride_ob + h * stride_oh, rows, row_valid, stride_on, d,
                       d_valid, stride_od)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        lse = tl.load(Lse + bh * num_q + positions, mask=row_valid, other=float('inf'))
        counts = tl.load(Counts + row_groups[None, :] * blocks + m[:, None],
                         mask=row_valid[None, :] & (m < blocks)[:, None], other=0)
        weights = tl.dot(tl.trans(one_hot), counts.to(one_hot.dtype),
                         input_precision=DOT_PRECISION)
        scores = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * scale_log2
        p = tl.where(weights > 0, tl.exp2(scores - lse[None, :]) * weights, 0.0)
        grad_v += tl.dot(p.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds = (p * (dp - delta[None, :])).to(q.dtype)
        grad_k += tl.dot(ds, q, input_precision=DOT_PRECISION)
        grad_q = tl.dot(tl.trans(ds), k, input_precision=DOT_PRECISION) * scale
        tl.store(GradQ + b * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqn
                 + d[None, :], grad_q.to(GradQ.dtype.element_ty),
                 mask=row_valid[:, None] & d_valid[None, :])
    out_mask = (cols < num_k)[:, None] & d_valid[None, :]
    offsets = b * stride_dkb + h * stride_dkh + cols[:, None] * stride_dkn + d[None, :]
    tl.store(GradK + offsets, (grad_k * scale).to(GradK.dtype.element_ty), mask=out_mask)
    tl.store(GradV + offsets, grad_v.to(GradV.dtype.element_ty), mask=out_mask)


def tile_row(head_dim: int) -> tuple:
    """The ``_TILES`` row for this head dim."""
    return _TILES[_head_dim_class(head_dim)]


def _smaller_row(row: tuple) -> Optional[tuple]:
    """Half the query rows, down to 16."""
    return (row[0] // 2, *row[1:]) if row[0] > 16 else None


def _geometries(block_q: int, block_k: int, layout: Optional[Sequence[int]]) -> dict:
    """The kernel's geometry constants (compile-time, so that the per-row block arithmetic in
    its query loop is shifts and multiplies, not runtime divisions)."""
    if layout is None:
        values = _geometry(block_q, None, None) + _geometry(block_k, None, None)
    else:
        q_win_w, k_win_w, map_width = layout
        values = _geometry(block_q, q_win_w, map_width) + _geometry(block_k, k_win_w, map_width)
    names = ('Q_MAP_W', 'Q_WIN_H', 'Q_WIN_W', 'Q_BLOCKS_W', 'K_MAP_W', 'K_WIN_H', 'K_WIN_W',
             'K_BLOCKS_W')
    return dict(zip(names, values))


def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
             counts: Tensor, mask_args: tuple, block_q: int, block_k: int, scale: float,
             grad_q: Tensor, grad_k: Tensor, grad_v: Tensor,
             layout: Optional[Sequence[int]] = None, config: Optional[tuple] = None) -> None:
    """Write ``grad_q``, ``grad_k`` and ``grad_v`` (the last two with the same strides, unit
    head-dim stride) of the gathered forward's ``out`` and ``lse``, with ``counts`` from
    :func:`count_table`, for non-empty q, k, v (B, H, N, D). ``mask_args`` and ``layout`` as
    the gathered kernels' (``_mask_args``, ``_layout_args``); ``config`` overrides the tile
    row (tuning)."""
    batch, heads, num_q, head_dim = q.shape
    mask, stride_mb, stride_mn, has_mask = mask_args

    def launch(row):
        block_m, num_warps, num_stages = row or tile_row(head_dim)
        fast_launcher(_map_bwd_kernel)[(batch * heads,)](
            q, k, v, out, grad_out, lse, counts, mask, grad_q, grad_k, grad_v, *q.stride(),
            *k.stride(), *v.stride(), *out.stride(), *grad_out.stride(), *grad_q.stride()[:3],
            *grad_k.stride()[:3], counts.stride(0), counts.stride(1) if counts.shape[1] > 1
            else 0, stride_mb, stride_mn, heads, num_q, k.shape[2], head_dim, counts.shape[-1],
            scale, scale * LOG2E, **_geometries(block_q, block_k, layout), HAS_MASK=has_mask,
            DOT_PRECISION='ieee' if q.dtype == torch.float32 else 'tf32', BLOCK_M=block_m,
            BLOCK_T=max(16, next_power_of_2(k.shape[2])), BLOCK_D=_block_d(head_dim),
            BLOCK_B=max(16, next_power_of_2(counts.shape[-1])), num_warps=num_warps,
            num_stages=num_stages)
    if config is not None:
        return launch(config)
    launch_fitting(launch, _FITTED, (q.device.index, _head_dim_class(head_dim)),
                   lambda: tile_row(head_dim), _smaller_row, 'whole-map attention backward',
                   q.device, 'tools/benchmark.py ops --tune-map')
