"""Persistent Triton kernels of :func:`ops.gather_attention` for single-block calls.

A call is single-block when each batch entry holds one query group and one key block, routed
by one slot (G = M = K = 1): dense attention within each entry, with key padding. That is
DSVT's set attention (:func:`ops.set_attention`: one set of 36, 48 or 90 voxels per entry).
There the gathered kernels spend one program per (entry, head) on a tile of a few thousand
scores, latency-bound: each program waits on its loads, then on its dots, and the backward
also builds a transposed index it does not need (the one group routes to the one block).

Here a program loops over (entry, head) pairs, ``pair = program, program + programs, ...``,
and with two or more pipeline stages Triton's pipeliner issues the next pair's loads while the
current one computes. The whole entry is one tile (``BLOCK_Q`` x ``BLOCK_K`` scores, both the
next powers of two of the block sizes, at least 16), so the softmax needs no running maximum
and the backward no transposed index: it recomputes the probabilities from the forward's
log-sum-exp and stores dQ, dK and dV of the entry directly. Query rows go in steps of the
row's ``query rows``, as many steps as the block needs (a set of 90 in steps of 32: three, not
the tile's four). The slot's value is read per entry: 0 routes the group to the block; -1
(and, unlike the gathered kernels, which would read out of bounds, any other value) leaves it
no key, so its output is zeros and its lse +inf.

Outputs match the gathered kernels': out and the gradients token-major
(``ops._triton_gather_attention.token_major``), lse (B, H, Nq) fp32 base 2, +inf for a query
without keys, so either backward can follow either forward.
"""
import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ops._launch import fast_launcher, launch_fitting
from ops._triton_gather_attention import LOG2E, _block_d, _index_strides
from ops._triton_map_attention import _rows_tile

MAX_BLOCK = 128      # largest block_q and block_k the one-tile kernels take
MAX_HEAD_DIM = {'fwd': 64, 'bwd': 64}  # per kernel

# (num_warps, num_stages, programs per SM (0: one program per (entry, head)), query rows a
# step (0: all), register cap (Triton's maxnreg; 0: none)) per kernel, tile class
# (max(BLOCK_Q, BLOCK_K)) and head-dim class (BLOCK_D <= 32, <= 64). The 64- and 128-token
# rows are the fastest of `tools/benchmark.py ops --tune-single --shapes dsvt36_d32 dsvt48_d32
# dsvt90_d32 dsvt36_d64 dsvt90_d64` on an H100 (2026-12-08, before register caps were swept;
# the 64-token D <= 32 forward row is the sets of 48's fastest, 1 µs behind the sets of 36's in
# sum over both); the 16- and 32-token rows (no benchmark shape) are untuned guesses.
_TILES = {
    'fwd': {32: {16: (1, 2, 16, 0, 0), 32: (2, 2, 12, 0, 0), 64: (4, 1, 8, 0, 0),
                 128: (4, 2, 2, 64, 0)},
            64: {16: (1, 2, 16, 0, 0), 32: (2, 2, 12, 0, 0), 64: (4, 2, 8, 0, 0),
                 128: (4, 2, 8, 64, 0)}},
    'bwd': {32: {16: (1, 2, 16, 0, 0), 32: (2, 2, 8, 0, 0), 64: (4, 1, 16, 0, 0),
                 128: (8, 1, 2, 0, 0)},
            64: {16: (1, 2, 16, 0, 0), 32: (2, 2, 8, 0, 0), 64: (4, 3, 2, 0, 0),
                 128: (8, 2, 2, 0, 0)}},
}

_enabled = True
# Rows that the device could not hold, replaced by smaller ones: {(device index, kind, block
# sizes, head dim): the first smaller row that launched}.
_FITTED = {}


def set_single_block_kernels(enabled: bool) -> None:
    """Let single-block calls take these kernels (default on); off, they take the gathered
    kernels like every other call (benchmarks and tests compare the two)."""
    global _enabled
    _enabled = bool(enabled)


def takes_call(kind: str, num_q: int, num_k: int, block_q: int, block_k: int, slots: int,
               head_dim: int, layout) -> bool:
    """Whether the ``kind`` ('fwd' or 'bwd') kernel runs a gather attention call's forward or
    backward: single-block (G = M = K = 1), both blocks at most MAX_BLOCK tokens, D <=
    MAX_HEAD_DIM[kind], block-major tokens."""
    return (_enabled and layout is None and num_q == block_q and num_k == block_k
            and slots == 1 and block_q <= MAX_BLOCK and block_k <= MAX_BLOCK
            and head_dim <= MAX_HEAD_DIM[kind])


def _tile_sizes(num_q: int, num_k: int, head_dim: int) -> Tuple[int, int, int]:
    """(BLOCK_Q, BLOCK_K, BLOCK_D): powers of two, at least 16."""
    return _block_d(num_q), _block_d(num_k), _block_d(head_dim)


def tile_config(kind: str, num_q: int, num_k: int, head_dim: int) -> Tuple[int, ...]:
    """The ``_TILES`` row (num_warps, num_stages, programs per SM, query rows a step, register
    cap) of ``kind`` ('fwd', 'bwd')."""
    block_q, block_k, block_d = _tile_sizes(num_q, num_k, head_dim)
    return _TILES[kind][32 if block_d <= 32 else 64][max(block_q, block_k)]


@functools.lru_cache(maxsize=16)
def _multiprocessors(device: torch.device) -> int:
    if device.type != 'cuda':
        return 4  # the Triton interpreter: a few programs, each looping over pairs
    return torch.cuda.get_device_properties(device).multi_processor_count


def _grid(pairs: int, programs_per_sm: int, device: torch.device) -> Tuple[int]:
    if programs_per_sm == 0:
        return (pairs,)
    return (min(pairs, programs_per_sm * _multiprocessors(device)),)


@triton.jit
def _entry_keys(Index, Mask, b, h, stride_ib, stride_ih, stride_mb, stride_mn, num_k,
                HAS_MASK: tl.constexpr, CLAMPED_MASK: tl.constexpr, BLOCK_K: tl.constexpr):
    """Whether each of the entry's BLOCK_K key columns is admissible: in range, not padding,
    and the entry's slot routes its group to the block (slot value 0). ``CLAMPED_MASK`` loads
    the padding bytes unpredicated, past-the-end columns reading the last key's byte: where a
    thread holds many columns (the forward's score rows), ptxas serializes predicated byte
    loads through one register, one load latency each, and issues unpredicated ones
    together."""
    cols = tl.arange(0, BLOCK_K)
    routed = tl.load(Index + b * stride_ib + h * stride_ih)
    live = (cols < num_k) & (routed == 0)
    if HAS_MASK:
        if CLAMPED_MASK:
            padded = tl.load(Mask + b * stride_mb + tl.minimum(cols, num_k - 1) * stride_mn)
        else:
            padded = tl.load(Mask + b * stride_mb + cols * stride_mn, mask=cols < num_k, other=1)
        live = live & (padded == 0)
    return live


@triton.jit
def _pair_keys(pair, K, V, Index, Mask, stride_kb, stride_kh, stride_kn, stride_kd, stride_vb,
               stride_vh, stride_vn, stride_vd, stride_ib, stride_ih, stride_mb, stride_mn,
               heads, num_k, head_dim, HAS_MASK: tl.constexpr, CLAMPED_MASK: tl.constexpr,
               BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """(bh, b, h, k, v, live) of pair ``pair``: its flat (entry, head) number, entry and head
    (int64), its key and value tiles (BLOCK_K, BLOCK_D; zeros past the block) and
    :func:`_entry_keys`."""
    bh = tl.cast(pair, tl.int64)
    b, h = bh // heads, bh % heads
    cols = tl.arange(0, BLOCK_K)
    d = tl.arange(0, BLOCK_D)
    k = _rows_tile(K, b * stride_kb + h * stride_kh, cols, cols < num_k, stride_kn, d,
                   d < head_dim, stride_kd)
    v = _rows_tile(V, b * stride_vb + h * stride_vh, cols, cols < num_k, stride_vn, d,
                   d < head_dim, stride_vd)
    live = _entry_keys(Index, Mask, b, h, stride_ib, stride_ih, stride_mb, stride_mn, num_k,
                       HAS_MASK, CLAMPED_MASK, BLOCK_K)
    return bh, b, h, k, v, live


@triton.jit
def _single_block_fwd_kernel(Q, K, V, Index, Mask, Out, Lse,
                             stride_qb, stride_qh, stride_qn, stride_qd,
                             stride_kb, stride_kh, stride_kn, stride_kd,
                             stride_vb, stride_vh, stride_vn, stride_vd,
                             stride_ob, stride_oh, stride_on,
                             stride_ib, stride_ih, stride_mb, stride_mn,
                             pairs, heads, num_q, num_k, head_dim, scale_log2,
                             HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
                             QUERY_ROWS: tl.constexpr, QUERY_STEPS: tl.constexpr,
                             BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Out (token-major, unit head-dim stride) and Lse (B*H, Nq) of every (entry, head) pair
    ``program + i * programs``: softmax of the entry's scores over its admissible keys, in
    ``QUERY_STEPS`` steps of ``QUERY_ROWS`` query rows (steps cover the set, not the tile)."""
    d = tl.arange(0, BLOCK_D)
    for pair in range(tl.program_id(0), pairs, tl.num_programs(0)):
        bh, b, h, k, v, live = _pair_keys(pair, K, V, Index, Mask, stride_kb, stride_kh,
                                          stride_kn, stride_kd, stride_vb, stride_vh, stride_vn,
                                          stride_vd, stride_ib, stride_ih, stride_mb, stride_mn,
                                          heads, num_k, head_dim, HAS_MASK, True, BLOCK_K, BLOCK_D)
        bias = tl.where(live, 0.0, float('-inf'))  # one multiply-add a score, no select
        for start in tl.static_range(0, QUERY_STEPS * QUERY_ROWS, QUERY_ROWS):
            rows = start + tl.arange(0, QUERY_ROWS)
            q_mask = (rows < num_q)[:, None] & (d < head_dim)[None, :]
            q = _rows_tile(Q, b * stride_qb + h * stride_qh, rows, rows < num_q, stride_qn, d,
                           d < head_dim, stride_qd)
            scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2 \
                + bias[None, :]
            row_max = tl.max(scores, 1)
            row_max = tl.where(row_max == float('-inf'), 0.0, row_max)
            p = tl.exp2(scores - row_max[:, None])
            total = tl.sum(p, 1)
            has_keys = total > 0
            total = tl.where(has_keys, total, 1.0)
            out = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            out = out * (1.0 / total)[:, None]  # a reciprocal a row, not a division an element
            tl.store(Out + b * stride_ob + h * stride_oh + rows[:, None] * stride_on
                     + d[None, :], out.to(Out.dtype.element_ty), mask=q_mask)
            tl.store(Lse + bh * num_q + rows, tl.where(has_keys, row_max + tl.log2(total),
                                                       float('inf')), mask=rows < num_q)


@triton.jit
def _single_block_bwd_kernel(Q, K, V, Out, GradOut, Lse, Index, Mask, GradQ, GradK, GradV,
                             stride_qb, stride_qh, stride_qn, stride_qd,
                             stride_kb, stride_kh, stride_kn, stride_kd,
                             stride_vb, stride_vh, stride_vn, stride_vd,
                             stride_ob, stride_oh, stride_on, stride_od,
                             stride_gb, stride_gh, stride_gn, stride_gd,
                             stride_dqb, stride_dqh, stride_dqn,
                             stride_dkb, stride_dkh, stride_dkn,
                             stride_ib, stride_ih, stride_mb, stride_mn,
                             pairs, heads, num_q, num_k, head_dim, scale, scale_log2,
                             HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
                             QUERY_ROWS: tl.constexpr, QUERY_STEPS: tl.constexpr,
                             BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """GradQ, GradK, GradV (unit head-dim stride; GradK and GradV share strides) of every
    (entry, head) pair ``program + i * programs``, FlashAttention-2's backward on the entry's
    keys, in ``QUERY_STEPS`` steps of ``QUERY_ROWS`` query rows (steps cover the set, not the
    tile): probabilities from Lse, delta = rowsum(dO * O), scores laid out keys by queries so
    that dK and dV need no transpose."""
    cols = tl.arange(0, BLOCK_K)
    d = tl.arange(0, BLOCK_D)
    kv_mask = (cols < num_k)[:, None] & (d < head_dim)[None, :]
    for pair in range(tl.program_id(0), pairs, tl.num_programs(0)):
        bh, b, h, k, v, live = _pair_keys(pair, K, V, Index, Mask, stride_kb, stride_kh,
                                          stride_kn, stride_kd, stride_vb, stride_vh, stride_vn,
                                          stride_vd, stride_ib, stride_ih, stride_mb, stride_mn,
                                          heads, num_k, head_dim, HAS_MASK, False, BLOCK_K, BLOCK_D)
        grad_k = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
        grad_v = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
        for start in tl.static_range(0, QUERY_STEPS * QUERY_ROWS, QUERY_ROWS):
            rows = start + tl.arange(0, QUERY_ROWS)
            q_mask = (rows < num_q)[:, None] & (d < head_dim)[None, :]
            q = _rows_tile(Q, b * stride_qb + h * stride_qh, rows, rows < num_q, stride_qn, d,
                           d < head_dim, stride_qd)
            do = _rows_tile(GradOut, b * stride_gb + h * stride_gh, rows, rows < num_q,
                            stride_gn, d, d < head_dim, stride_gd)
            o = _rows_tile(Out, b * stride_ob + h * stride_oh, rows, rows < num_q, stride_on, d,
                           d < head_dim, stride_od)
            lse = tl.load(Lse + bh * num_q + rows, mask=rows < num_q, other=float('inf'))
            delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
            scores = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * scale_log2
            p = tl.where(live[:, None], tl.exp2(scores - lse[None, :]), 0.0)
            grad_v += tl.dot(p.to(do.dtype), do, input_precision=DOT_PRECISION)
            grad_p = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            grad_s = p * (grad_p - delta[None, :])
            grad_k += tl.dot(grad_s.to(q.dtype), q, input_precision=DOT_PRECISION)
            grad_q = tl.dot(tl.trans(grad_s.to(k.dtype)), k,
                            input_precision=DOT_PRECISION) * scale
            tl.store(GradQ + b * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqn
                     + d[None, :], grad_q.to(GradQ.dtype.element_ty), mask=q_mask)
        kv_grad = b * stride_dkb + h * stride_dkh + cols[:, None] * stride_dkn + d[None, :]
        tl.store(GradK + kv_grad, (grad_k * scale).to(GradK.dtype.element_ty), mask=kv_mask)
        tl.store(GradV + kv_grad, grad_v.to(GradV.dtype.element_ty), mask=kv_mask)


def _launch_args(q: Tensor, k: Tensor, mask_args, config: tuple):
    """(grid, scalar arguments after the index and mask strides, meta-parameters) of one
    launch with ``config`` (a ``_TILES`` row)."""
    batch, heads, num_q, head_dim = q.shape
    block_q, block_k, block_d = _tile_sizes(num_q, k.shape[2], head_dim)
    num_warps, num_stages, programs_per_sm, query_rows, max_registers = config
    query_rows = min(query_rows or block_q, block_q)
    return (_grid(batch * heads, programs_per_sm, q.device),
            (batch * heads, heads, num_q, k.shape[2], head_dim),
            dict(HAS_MASK=mask_args[3], DOT_PRECISION='ieee' if q.dtype == torch.float32
                 else 'tf32', QUERY_ROWS=query_rows, QUERY_STEPS=triton.cdiv(num_q, query_rows),
                 BLOCK_K=block_k, BLOCK_D=block_d, num_warps=num_warps,
                 num_stages=num_stages, maxnreg=max_registers or None))


def _smaller_config(block_q: int, config: tuple) -> Optional[tuple]:
    """The next row to try when ``config`` does not fit: no register cap, then one pipeline
    stage, then half the query rows a step (down to 16); None after that."""
    num_warps, num_stages, programs_per_sm, query_rows, max_registers = config
    if max_registers:
        return num_warps, num_stages, programs_per_sm, query_rows, 0
    if num_stages > 1:
        return num_warps, 1, programs_per_sm, query_rows, max_registers
    rows = min(query_rows or block_q, block_q)
    if rows > 16:
        return num_warps, num_stages, programs_per_sm, rows // 2, max_registers
    return None


def _launch_fitting(kind: str, q: Tensor, k: Tensor, config: Optional[tuple], launch) -> None:
    """``launch(row)`` with ``config``, else with the ``_TILES`` row, replaced by smaller rows
    where the device cannot hold it (``ops._launch.launch_fitting``)."""
    if config is not None:
        return launch(config)
    num_q, num_k, head_dim = q.shape[2], k.shape[2], q.shape[3]
    block_q = _tile_sizes(num_q, num_k, head_dim)[0]
    launch_fitting(lambda row: launch(row or tile_config(kind, num_q, num_k, head_dim)),
                   _FITTED, (q.device.index, kind, num_q, num_k, head_dim),
                   lambda: tile_config(kind, num_q, num_k, head_dim),
                   functools.partial(_smaller_config, block_q), f'single-block {kind} kernel',
                   q.device, 'tools/benchmark.py ops --tune-single')


def forward(q: Tensor, k: Tensor, v: Tensor, index: Tensor, mask_args, scale: float,
            out: Tensor, lse: Tensor, config: Optional[tuple] = None) -> None:
    """Fill ``out`` (token-major) and ``lse`` (B, H, Nq) of a non-empty single-block call;
    ``mask_args`` as ``ops._triton_gather_attention._mask_args``, ``config`` overrides the
    ``_TILES`` row (tuning)."""
    mask, stride_mb, stride_mn, _ = mask_args

    def launch(row):
        grid, scalars, meta = _launch_args(q, k, mask_args, row)
        fast_launcher(_single_block_fwd_kernel)[grid](
            q, k, v, index, mask, out, lse, *q.stride(), *k.stride(), *v.stride(),
            *out.stride()[:3], *_index_strides(index)[:2], stride_mb, stride_mn, *scalars,
            scale * LOG2E, **meta)
    _launch_fitting('fwd', q, k, config, launch)


def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
             index: Tensor, mask_args, scale: float, grad_q: Tensor, grad_k: Tensor,
             grad_v: Tensor, config: Optional[tuple] = None) -> None:
    """Fill ``grad_q``, ``grad_k``, ``grad_v`` (unit head-dim stride; grad_k's and grad_v's
    strides equal) of a non-empty single-block call from its forward's ``out`` and ``lse``."""
    mask, stride_mb, stride_mn, _ = mask_args

    def launch(row):
        grid, scalars, meta = _launch_args(q, k, mask_args, row)
        fast_launcher(_single_block_bwd_kernel)[grid](
            q, k, v, out, grad_out, lse, index, mask, grad_q, grad_k, grad_v,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *grad_out.stride(),
            *grad_q.stride()[:3], *grad_k.stride()[:3], *_index_strides(index)[:2], stride_mb,
            stride_mn, *scalars, scale, scale * LOG2E, **meta)
    _launch_fitting('bwd', q, k, config, launch)
