"""Fused Triton kernels for :func:`ops.gather_attention`: launchers, autograd, torch custom ops.

Tiling. A program owns one tile of ``BLOCK_M`` query rows of one (batch, head):
* ``block_q <= BLOCK_M``: the tile packs ``GPT = BLOCK_M // block_q`` whole query groups;
* ``block_q > BLOCK_M``: one group spans ``TPG = cdiv(block_q, BLOCK_M)`` tiles.
Each step loads ``BLOCK_N`` key rows, ``CPG = BLOCK_N // GPT`` for each packed group, read in
place through the index (``key = index[g, j // block_k] * block_k + j % block_k`` for the
group's ``j``-th routed key), and scores only (row group == column group) pairs. So any block
size works (1, 4, 49, 273, 90...) and the routed keys are never copied.

The forward keeps an online softmax and stores the log-sum-exp (base 2, fp32, B*H*Nq), by each
query's window-major position ``g * block_q + i`` (its memory row for block-major tokens; the
backward's delta = rowsum(dO * O) likewise), so that the backward's per-step reads of both are
contiguous in the window layout too. The backward's main kernel works per key tile: it walks the
transposed index (the groups that route to each key block, built by ``_transpose_index_kernel``)
for dK and dV, FlashAttention-2 style. dQ comes either from a separate kernel per query tile,
which recomputes the probabilities and stores rowsum(dO * O) first (the split backward), or from
the key-tile kernel itself (the one-kernel backward): stored directly when every query group
routes to a single key block that one tile holds whole (BiFormer's stage 1), so
each query is visited once, or added with fp32 atomics otherwise. :func:`set_backward_mode`
chooses; by default the one-kernel backward runs where each query group routes to one block, and
short key sequences with small routed blocks take the whole-map backward of
``ops._triton_map_attention`` (one program per (batch, head) over every key). Calls whose every
batch entry is one query group over one key block (DSVT's sets) take the persistent kernels of
``ops._triton_single_block``, forward and backward.

The output and the three gradients are written token-major (:func:`token_major`: (B, N, H, D)
memory seen as (B, H, N, D)), as the qkv projection lays out heads, so a model merges heads
and splits the qkv gradient with views instead of transposing copies.

Two entry points share the launchers: :func:`triton_gather_attention` runs eagerly through a
``torch.autograd.Function`` (the short launch path), and under ``torch.compile`` or export
through the custom ops ``dsa_ops::gather_attention_fwd`` / ``_bwd``, which carry fake
implementations for tracing.
"""
import contextlib
import functools
import threading
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from ops._launch import fast_launcher, launch_fitting
from ops._sizes import cdiv, next_power_of_2
from ops.gather_attention import to_window_major

LOG2E = 1.4426950408889634

# Tile configs (BLOCK_M, BLOCK_N, num_warps, num_stages, max_registers) per kernel kind and
# head-dim class; max_registers caps the registers per thread (Triton's maxnreg; 0: no cap).
# _CONFIGS[kind][max_block_d] holds one config per block-size class of SIZE_LIMITS: the first
# head-dim class with BLOCK_D <= max_block_d applies, then the first size limit >= the block
# size (None: any). 'fwd' and 'dq' tile query rows (BLOCK_M) by routed keys (BLOCK_N) and go by
# block_q; 'dkdv' tiles key rows (BLOCK_N) by routed query rows (BLOCK_M) and goes by block_k,
# and so does 'bwd', the dK/dV kernel when it also computes dQ (the one-kernel backward).
# D <= 32 and D = 64 come from the CUDA-graph-timed sweep `tools/benchmark.py ops --tune fwd dq
# dkdv bwd` on an H200 (2026-12-02, tiles and then register caps; docs/ops.md "Tile configs"
# names the shapes behind each row), except these D <= 32 rows, few-warp tiles from sweeps on
# an H100 (2026-12-07): 'fwd' and 'dq' of blocks up to 16 tokens (`... ops --tune fwd dq
# --shapes t224_s3 t224_s2 t512_s3`), 'dkdv' of 9-16 tokens (a dK/dV sweep of t224_s2 and
# t512_s3), and every kind's rows of 17-32, 65-128 and over 256 tokens (D <= 32) and of
# 65-128 tokens (D = 64), swept again after the one-group ALIGNED forms (`... ops --tune fwd dq
# dkdv bwd --shapes s_det_s3 s_det_s2 s_det_s1 dsvt90_d32 dsvt90_d64`; docs/benchmarks.md,
# run 17). D > 64 keeps the untuned defaults. (DSVT's sets take
# ops._triton_single_block's kernels, with their own rows.)
SIZE_LIMITS = (8, 16, 32, 64, 128, 256, None)
HEAD_DIM_CLASSES = (32, 64, 256)
_TILES = {  # kind: {max_block_d: one config per SIZE_LIMITS class}
    'fwd': {
        32: ((16, 32, 1, 2, 0), (16, 32, 1, 2, 80), (32, 64, 2, 2, 128), (64, 64, 4, 3, 80),
             (64, 128, 4, 2, 128), (128, 64, 4, 2, 128), (64, 128, 4, 2, 128)),
        64: ((16, 128, 4, 2, 0), (16, 64, 2, 2, 0), (16, 128, 4, 2, 0), (64, 64, 4, 2, 96),
             (64, 128, 4, 2, 128), (64, 128, 4, 2, 0), (64, 128, 4, 2, 0)),
        256: ((16, 128, 4, 2, 0), (16, 64, 2, 2, 0), (16, 128, 4, 2, 0), (64, 128, 4, 2, 0),
              (64, 128, 4, 2, 0), (64, 128, 4, 2, 0), (64, 128, 4, 2, 0)),
    },
    'dq': {
        32: ((16, 32, 1, 2, 0), (16, 32, 1, 2, 96), (32, 64, 2, 2, 0), (64, 64, 4, 3, 96),
             (16, 32, 1, 2, 96), (64, 64, 4, 2, 96), (32, 64, 2, 2, 0)),
        64: ((16, 64, 2, 2, 0), (16, 64, 2, 2, 0), (16, 64, 2, 2, 0), (64, 64, 4, 3, 128),
             (64, 128, 4, 2, 128), (64, 64, 4, 2, 0), (64, 64, 4, 2, 0)),
        256: ((16, 64, 2, 2, 0), (16, 64, 2, 2, 0), (16, 64, 2, 2, 0), (64, 64, 4, 2, 0),
              (64, 64, 4, 2, 0), (64, 64, 4, 2, 0), (64, 64, 4, 2, 0)),
    },
    'dkdv': {
        32: ((64, 16, 2, 2, 128), (16, 16, 1, 2, 0), (32, 32, 1, 2, 0), (32, 64, 4, 2, 0),
             (16, 32, 1, 2, 0), (32, 64, 4, 3, 96), (32, 64, 4, 2, 96)),
        64: ((64, 16, 2, 2, 0), (64, 16, 2, 2, 0), (64, 64, 4, 2, 0), (32, 64, 4, 2, 0),
             (32, 32, 2, 2, 0), (64, 64, 4, 2, 0), (64, 64, 4, 2, 0)),
        256: ((64, 16, 2, 2, 0), (64, 16, 2, 2, 0), (64, 64, 4, 2, 0), (64, 64, 4, 2, 0),
              (64, 64, 4, 2, 0), (64, 64, 4, 2, 0), (64, 64, 4, 2, 0)),
    },
    'bwd': {
        32: ((64, 16, 2, 2, 0), (64, 16, 2, 2, 0), (32, 32, 2, 2, 0), (32, 64, 4, 2, 128),
             (16, 128, 4, 2, 128), (64, 64, 4, 2, 128), (64, 64, 4, 2, 0)),
        64: ((64, 16, 2, 2, 0), (64, 16, 2, 2, 0), (64, 32, 4, 2, 0), (16, 64, 4, 2, 128),
             (32, 128, 4, 2, 0), (16, 256, 8, 2, 0), (16, 256, 8, 2, 0)),
        256: ((64, 16, 2, 2, 0), (64, 16, 2, 2, 0), (32, 64, 4, 2, 0), (32, 64, 4, 2, 0),
              (32, 64, 4, 2, 0), (32, 64, 4, 2, 0), (32, 64, 4, 2, 0)),
    },
}
_CONFIGS = {kind: {max_d: tuple(zip(SIZE_LIMITS, rows)) for max_d, rows in classes.items()}
            for kind, classes in _TILES.items()}
KINDS = tuple(_CONFIGS)


def head_dim_class(head_dim: int) -> int:
    """The key of ``_CONFIGS[kind]`` whose rows apply to this head dim."""
    block_d = _block_d(head_dim)
    return next(max_d for max_d in HEAD_DIM_CLASSES if block_d <= max_d)


def tile_config(kind: str, block_size: int, head_dim: int):
    """The (BLOCK_M, BLOCK_N, num_warps, num_stages, max_registers) row of ``_CONFIGS`` for one
    kernel."""
    rows = _CONFIGS[kind][head_dim_class(head_dim)]
    return next(config for limit, config in rows if limit is None or block_size <= limit)


def set_tile_configs(table: dict) -> None:
    """Replace config rows: ``{kind: {max_block_d: [(size limit or None, config), ...]}}``.

    Used by tuning sweeps (``tools/bench_ops.py --tune`` writes such a table as JSON).
    """
    for kind, classes in table.items():
        if kind not in _CONFIGS:
            raise ValueError(f'kind must be one of {KINDS}, got {kind!r}')
        for max_d, rows in classes.items():
            max_d = int(max_d)
            if max_d not in HEAD_DIM_CLASSES:
                raise ValueError(f'head-dim class must be one of {HEAD_DIM_CLASSES}, got {max_d}')
            rows = tuple((None if limit is None else int(limit), tuple(int(c) for c in config))
                         for limit, config in rows)
            if not rows or rows[-1][0] is not None or any(len(c) != 5 for _, c in rows):
                raise ValueError(f'{kind} rows for D<={max_d} must end with a None limit and '
                                 f'hold (BLOCK_M, BLOCK_N, num_warps, num_stages, '
                                 f'max_registers), got {rows}')
            _CONFIGS[kind][max_d] = rows
    _query_plan.cache_clear()
    _key_plan.cache_clear()
    _FITTED.clear()


# Tile configs replaced because a device's shared memory could not hold them (the table is
# tuned on an H200 and an H100, 228 KB per SM; consumer GPUs have about 100 KB) or ptxas could
# not compile them within their register cap: {(device index, kind, block size, head dim): the
# first smaller config that launched}.
_FITTED = {}


def _smaller_config(kind: str, config: tuple) -> Optional[tuple]:
    """The next config to try when ``config`` does not fit: no register cap, then one pipeline
    stage, then half the key tile (fwd, dq) or half the query rows (dkdv, bwd: its key tile
    decides the one-kernel backward's dQ mode, so it stays); None below 16."""
    block_m, block_n, num_warps, num_stages, max_registers = config
    if max_registers:
        return block_m, block_n, num_warps, num_stages, 0
    if num_stages > 1:
        return block_m, block_n, num_warps, 1, max_registers
    if kind in ('fwd', 'dq') and block_n > 16:
        return block_m, block_n // 2, num_warps, num_stages, max_registers
    if block_m > 16:
        return block_m // 2, block_n, num_warps, num_stages, max_registers
    return None


def _launch_fitting(kind: str, block_size: int, head_dim: int, device: torch.device,
                    config: Optional[tuple], launch):
    """``launch(config)`` (plan and kernel launch). With the table's config (``config`` None),
    a config the device cannot hold is replaced by :func:`_smaller_config` ones until one
    launches, remembered per device and shape class (``ops._launch.launch_fitting``)."""
    if config is not None:
        return launch(config)
    return launch_fitting(launch, _FITTED, (device.index, kind, block_size, head_dim),
                          lambda: tile_config(kind, block_size, head_dim),
                          functools.partial(_smaller_config, kind),
                          f'gather attention {kind} kernel', device,
                          'tools/benchmark.py ops --tune')


def _block_d(head_dim: int) -> int:
    return max(16, next_power_of_2(head_dim))


@triton.jit
def _token_row(block, within, block_size, Rows, valid, WINDOWS: tl.constexpr):
    """Memory row of token ``within`` of group (or key block) ``block``: ``block * block_size
    + within``; with ``WINDOWS``, ``Rows`` of that (window-major) position, the map row of
    the token (:func:`window_rows`; one cached load in place of window-address divisions).
    Lanes not ``valid`` get row 0."""
    row = block * block_size + within
    if WINDOWS:
        row = tl.load(Rows + row, mask=valid, other=0)
    return row


@triton.jit
def _tile_rows(tile, block_q, groups, GPT, TPG, RPG, Rows, WINDOWS: tl.constexpr,
               BLOCK_M: tl.constexpr):
    """This tile's rows: memory rows, window-major positions (``group * block_q + within``,
    the memory rows of block-major tokens), packed-group slots and validity."""
    group_tile = tile // TPG
    sub_tile = tile % TPG
    rows = tl.arange(0, BLOCK_M)
    rows_per_group = RPG
    local_group = rows // rows_per_group
    within = sub_tile * BLOCK_M + rows % rows_per_group
    group = group_tile * GPT + local_group
    valid = (local_group < GPT) & (group < groups) & (within < block_q)
    return (_token_row(group, within, block_q, Rows, valid, WINDOWS), group * block_q + within,
            local_group, valid, group_tile)


@triton.jit
def _step_columns(step, group_tile, block_k, groups, slot_keys, GPT, CPG,
                  index_ptr, stride_ig, stride_ik, mask_ptr, stride_mn, Rows,
                  HAS_MASK: tl.constexpr, WINDOWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key positions (memory rows) read in this step, their packed-group slot, and whether each
    is admissible."""
    cols = tl.arange(0, BLOCK_N)
    local_group = cols // CPG
    j = step * CPG + cols % CPG
    group = group_tile * GPT + local_group
    valid = (local_group < GPT) & (group < groups) & (j < slot_keys)
    block = tl.load(index_ptr + group * stride_ig + (j // block_k) * stride_ik, mask=valid,
                    other=-1).to(tl.int32)
    valid = valid & (block >= 0)
    key = _token_row(block, j % block_k, block_k, Rows, valid, WINDOWS)
    if HAS_MASK:
        padded = tl.load(mask_ptr + key * stride_mn, mask=valid, other=1)
        valid = valid & (padded == 0)
    return key, local_group, valid


@triton.jit
def _aligned_rows(tile, block_size, TPG, Rows, WINDOWS: tl.constexpr, BLOCK: tl.constexpr):
    """``ALIGNED`` tiling, where the tile lies in one group (or key block) of ``TPG`` tiles:
    the tile's memory rows, their window-major positions, their validity (all valid where
    ``BLOCK`` divides the block size; else the group's last tile has a tail) and the group."""
    group = tile // TPG
    within = (tile % TPG) * BLOCK + tl.arange(0, BLOCK)
    valid = within < block_size
    return (_token_row(group, within, block_size, Rows, valid, WINDOWS),
            group * block_size + within, valid, group)


@triton.jit
def _aligned_columns(step, group, block_k, slot_keys, index_ptr, stride_ig, stride_ik, Rows,
                     WINDOWS: tl.constexpr, BLOCKS_PER_STEP: tl.constexpr,
                     COLUMN_TAIL: tl.constexpr, BLOCK_N: tl.constexpr):
    """``ALIGNED`` key step of one group's routed keys: the key rows of step ``step`` (all in
    range) and a score bias per column, -inf for a -1 slot and, with ``COLUMN_TAIL`` (BLOCK_N
    does not divide the ``slot_keys`` routed keys), for the columns past them.
    ``BLOCKS_PER_STEP`` > 0: a step holds that many whole blocks, so ``block_k`` is known at
    compile time and the slot and offset of each key are a shift and a mask, not divisions."""
    j = step * BLOCK_N + tl.arange(0, BLOCK_N)
    if BLOCKS_PER_STEP > 0:
        slot = j // (BLOCK_N // BLOCKS_PER_STEP)
        within = j % (BLOCK_N // BLOCKS_PER_STEP)
    else:
        slot = j // block_k
        within = j % block_k
    if COLUMN_TAIL:
        block = tl.load(index_ptr + group * stride_ig + slot * stride_ik, mask=j < slot_keys,
                        other=-1).to(tl.int32)
    else:
        block = tl.load(index_ptr + group * stride_ig + slot * stride_ik).to(tl.int32)
    key = _token_row(tl.maximum(block, 0), within, block_k, Rows, j >= 0, WINDOWS)
    return key, tl.where(block >= 0, 0.0, float('-inf'))


@triton.jit
def _one_block_columns(step, group, block_k, index_ptr, stride_ig, stride_ik, Rows,
                       WINDOWS: tl.constexpr, STEPS_PER_BLOCK: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    """``ALIGNED`` key step where ``BLOCK_N`` also divides ``block_k`` (``STEPS_PER_BLOCK =
    block_k // BLOCK_N`` steps a block, a compile-time divisor): the step reads ``BLOCK_N``
    consecutive keys of one routed block, named by one scalar index load; their memory rows
    and the step's score bias (a scalar: -inf for a -1 slot)."""
    slot = step // STEPS_PER_BLOCK
    block = tl.load(index_ptr + group * stride_ig + slot * stride_ik).to(tl.int32)
    within = (step % STEPS_PER_BLOCK) * BLOCK_N + tl.arange(0, BLOCK_N)
    key = _token_row(tl.maximum(block, 0), within, block_k, Rows, within >= 0, WINDOWS)
    return key, tl.where(block >= 0, 0.0, float('-inf'))


@triton.jit
def _packed_geometry(PACKED: tl.constexpr, PACKED_BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    """Compile-time (block_q, block_k, GPT, TPG, RPG, CPG) of a tile that packs ``PACKED``
    whole groups of ``BLOCK_M // PACKED`` queries, each reading whole key blocks of
    ``PACKED_BLOCK_K`` tokens in ``BLOCK_N // PACKED`` columns a step: the packed tiling's
    row and column arithmetic then divides by constants."""
    return (BLOCK_M // PACKED, PACKED_BLOCK_K, PACKED, 1, BLOCK_M // PACKED, BLOCK_N // PACKED)


@triton.jit
def _query_tile(tile, block_q, groups, GPT, TPG, RPG, QRows, WINDOWS: tl.constexpr,
                ALIGNED: tl.constexpr, BLOCK_M: tl.constexpr):
    """:func:`_tile_rows` of a query tile, or its ``ALIGNED`` form (packed-group slot 0, the
    tile's group as its group tile)."""
    if ALIGNED:
        q_pos, q_linear, row_valid, group_tile = _aligned_rows(tile, block_q, TPG, QRows,
                                                               WINDOWS, BLOCK_M)
        row_group = tl.zeros_like(q_pos)
    else:
        q_pos, q_linear, row_group, row_valid, group_tile = _tile_rows(
            tile, block_q, groups, GPT, TPG, RPG, QRows, WINDOWS, BLOCK_M)
    return q_pos, q_linear, row_group, row_valid, group_tile


@triton.jit
def _step_logits(q, K, V, step, group_tile, row_group, d, d_valid, block_k, groups, slot_keys,
                 GPT, CPG, Index, stride_ig, stride_ik, stride_kn, stride_kd, stride_vn,
                 stride_vd, Mask, stride_mn, KRows, scale_log2, HAS_MASK: tl.constexpr,
                 WINDOWS: tl.constexpr, ALIGNED: tl.constexpr, STEPS_PER_BLOCK: tl.constexpr,
                 BLOCKS_PER_STEP: tl.constexpr, COLUMN_TAIL: tl.constexpr,
                 UNSCALED: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """One key step of a query tile: (logits, shift, k, v), the base-2 logits ``q k^T *
    scale_log2`` (-inf where a pair is not admissible), 0, and the routed keys and values it
    read. With ``ALIGNED``: ``STEPS_PER_BLOCK`` > 0, the step lies in one routed block
    (:func:`_one_block_columns`); else ``BLOCKS_PER_STEP`` and ``COLUMN_TAIL`` as
    :func:`_aligned_columns`.

    ``UNSCALED`` (one-block steps, ``scale_log2 > 0``): the logits are ``q k^T`` (-inf where a
    key is padding) and the shift is the step's bias, so that the caller takes ``logits *
    scale_log2 + shift - m`` as one multiply-add per score instead of two operations."""
    if ALIGNED:
        if STEPS_PER_BLOCK > 0:
            key, bias = _one_block_columns(step, group_tile, block_k, Index, stride_ig,
                                           stride_ik, KRows, WINDOWS, STEPS_PER_BLOCK, BLOCK_N)
        else:
            key, bias = _aligned_columns(step, group_tile, block_k, slot_keys, Index, stride_ig,
                                         stride_ik, KRows, WINDOWS, BLOCKS_PER_STEP,
                                         COLUMN_TAIL, BLOCK_N)
        kv_mask = d_valid[None, :]
    else:
        key, col_group, col_valid = _step_columns(step, group_tile, block_k, groups, slot_keys,
                                                  GPT, CPG, Index, stride_ig, stride_ik, Mask,
                                                  stride_mn, KRows, HAS_MASK, WINDOWS,
                                                  BLOCK_N)
        kv_mask = col_valid[:, None] & d_valid[None, :]
    k = tl.load(K + key[:, None] * stride_kn + d[None, :] * stride_kd, mask=kv_mask, other=0.0)
    v = tl.load(V + key[:, None] * stride_vn + d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    logits = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    shift = 0.0
    if ALIGNED and HAS_MASK:
        padded = tl.load(Mask + key * stride_mn) != 0
    if UNSCALED:
        shift = bias
        if HAS_MASK:
            logits = tl.where(padded[None, :], float('-inf'), logits)
    elif ALIGNED:
        if HAS_MASK:  # padding folded into the per-column bias
            logits = logits * scale_log2 + tl.where(padded, float('-inf'), bias)[None, :]
        elif STEPS_PER_BLOCK > 0:
            logits = logits * scale_log2 + bias
        else:
            logits = logits * scale_log2 + bias[None, :]
    else:
        admissible = (row_group[:, None] == col_group[None, :]) & col_valid[None, :]
        logits = tl.where(admissible, logits * scale_log2, float('-inf'))
    return logits, shift, k, v


@triton.jit
def _fwd_kernel(Q, K, V, Index, Mask, Out, Lse,
                stride_qb, stride_qh, stride_qn, stride_qd,
                stride_kb, stride_kh, stride_kn, stride_kd,
                stride_vb, stride_vh, stride_vn, stride_vd,
                stride_ob, stride_oh, stride_on,
                stride_ib, stride_ih, stride_ig, stride_ik,
                stride_mb, stride_mn,
                num_tiles, heads, num_q, head_dim, groups, block_q, block_k, slot_keys,
                num_steps, GPT, TPG, RPG, CPG, scale_log2,
                QRows, KRows,
                HAS_MASK: tl.constexpr, WINDOWS: tl.constexpr, ALIGNED: tl.constexpr,
                STEPS_PER_BLOCK: tl.constexpr, BLOCKS_PER_STEP: tl.constexpr,
                COLUMN_TAIL: tl.constexpr, UNSCALED: tl.constexpr, PACKED: tl.constexpr,
                PACKED_BLOCK_K: tl.constexpr,
                DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr):
    """Out and Lse; ``ALIGNED`` (see :func:`_query_plan`): the tile's rows lie in one group,
    so scores take no per-element admissibility mask, only a per-column bias;
    ``STEPS_PER_BLOCK`` > 0: each step also lies in one routed block; ``BLOCKS_PER_STEP`` > 0:
    each step holds whole routed blocks; ``COLUMN_TAIL``: the last step is partial;
    ``UNSCALED``: the row maximum is taken over unscaled scores
    (:func:`_step_logits`); ``PACKED`` > 0: that many whole groups per tile, with the packing
    geometry known at compile time (:func:`_query_plan`)."""
    program = tl.program_id(0).to(tl.int64)  # one flat grid: B*H may exceed grid dim 1
    tile = (program % num_tiles).to(tl.int32)
    bh = program // num_tiles
    b, h = bh // heads, bh % heads
    if PACKED > 0:
        block_q, block_k, GPT, TPG, RPG, CPG = _packed_geometry(PACKED, PACKED_BLOCK_K, BLOCK_M,
                                                                BLOCK_N)
    q_pos, q_linear, row_group, row_valid, group_tile = _query_tile(
        tile, block_q, groups, GPT, TPG, RPG, QRows, WINDOWS, ALIGNED, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    d_valid = d < head_dim
    q = tl.load(Q + b * stride_qb + h * stride_qh + q_pos[:, None] * stride_qn
                + d[None, :] * stride_qd, mask=row_valid[:, None] & d_valid[None, :], other=0.0)
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    Index += b * stride_ib + h * stride_ih
    Mask += b * stride_mb
    m_i = tl.full([BLOCK_M], float('-inf'), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for step in range(num_steps):
        scores, shift, k, v = _step_logits(q, K, V, step, group_tile, row_group, d, d_valid,
                                           block_k, groups, slot_keys, GPT, CPG, Index,
                                           stride_ig, stride_ik, stride_kn, stride_kd,
                                           stride_vn, stride_vd, Mask, stride_mn, KRows,
                                           scale_log2, HAS_MASK, WINDOWS, ALIGNED,
                                           STEPS_PER_BLOCK, BLOCKS_PER_STEP, COLUMN_TAIL,
                                           UNSCALED, DOT_PRECISION, BLOCK_N)
        if UNSCALED:
            m_new = tl.maximum(m_i, tl.max(scores, 1) * scale_log2 + shift)
            m_safe = tl.where(m_new == float('-inf'), 0.0, m_new)
            p = tl.exp2(scores * scale_log2 - (m_safe - shift)[:, None])
        else:
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            m_safe = tl.where(m_new == float('-inf'), 0.0, m_new)
            p = tl.exp2(scores - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    has_keys = l_i > 0
    out = acc * (1.0 / tl.where(has_keys, l_i, 1.0))[:, None]  # not a division an element
    out_offsets = b * stride_ob + h * stride_oh + q_pos[:, None] * stride_on + d[None, :]
    tl.store(Out + out_offsets, out.to(Out.dtype.element_ty),
             mask=row_valid[:, None] & d_valid[None, :])
    lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float('inf'))
    tl.store(Lse + bh * num_q + q_linear, lse, mask=row_valid)


@triton.jit
def _bwd_dq_kernel(Q, K, V, Out, GradOut, Lse, Index, Mask, GradQ, Delta, Order, Offsets,
                   stride_qb, stride_qh, stride_qn, stride_qd,
                   stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd,
                   stride_ob, stride_oh, stride_on, stride_od,
                   stride_gb, stride_gh, stride_gn, stride_gd,
                   stride_dqb, stride_dqh, stride_dqn,
                   stride_ib, stride_ih, stride_ig, stride_ik,
                   stride_mb, stride_mn,
                   num_tiles, heads, num_q, head_dim, groups, block_q, block_k, slot_keys,
                   num_steps, GPT, TPG, RPG, CPG, scale, scale_log2,
                   QRows, KRows,
                   index_heads, slots, list_len, blocks, num_chunks, transpose_programs,
                   HAS_MASK: tl.constexpr, WINDOWS: tl.constexpr, ALIGNED: tl.constexpr,
                   STEPS_PER_BLOCK: tl.constexpr, BLOCKS_PER_STEP: tl.constexpr,
                   COLUMN_TAIL: tl.constexpr, UNSCALED: tl.constexpr, PACKED: tl.constexpr,
                   PACKED_BLOCK_K: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, TRANSPOSE: tl.constexpr, BLOCK_B: tl.constexpr,
                   BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    """GradQ ((B, H, Nq, D) at strides ``stride_dq*``, unit head-dim stride, q's dtype) and
    Delta = rowsum(dO * O) (B, H, Nq) fp32. ``ALIGNED``, ``STEPS_PER_BLOCK``,
    ``BLOCKS_PER_STEP``, ``COLUMN_TAIL``, ``UNSCALED``, ``PACKED`` as in ``_fwd_kernel``.

    ``TRANSPOSE``: the first ``transpose_programs`` programs build the transposed index (Order,
    Offsets) for the dK/dV kernel instead (:func:`_transpose_index_program`), beside the dQ
    programs rather than in a launch of its own."""
    program = tl.program_id(0).to(tl.int64)  # one flat grid: B*H may exceed grid dim 1
    if TRANSPOSE:
        if program < transpose_programs:
            _transpose_index_program(program, Index, Order, Offsets, stride_ib, stride_ih,
                                     stride_ig, stride_ik, index_heads, slots, list_len, blocks,
                                     num_chunks, BLOCK_B, BLOCK_E)
            return
        program -= transpose_programs
    tile = (program % num_tiles).to(tl.int32)
    bh = program // num_tiles
    b, h = bh // heads, bh % heads
    if PACKED > 0:
        block_q, block_k, GPT, TPG, RPG, CPG = _packed_geometry(PACKED, PACKED_BLOCK_K, BLOCK_M,
                                                                BLOCK_N)
    q_pos, q_linear, row_group, row_valid, group_tile = _query_tile(
        tile, block_q, groups, GPT, TPG, RPG, QRows, WINDOWS, ALIGNED, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    d_valid = d < head_dim
    row_mask = row_valid[:, None] & d_valid[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + q_pos[:, None] * stride_qn
                + d[None, :] * stride_qd, mask=row_mask, other=0.0)
    o = tl.load(Out + b * stride_ob + h * stride_oh + q_pos[:, None] * stride_on
                + d[None, :] * stride_od, mask=row_mask, other=0.0)
    do = tl.load(GradOut + b * stride_gb + h * stride_gh + q_pos[:, None] * stride_gn
                 + d[None, :] * stride_gd, mask=row_mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + bh * num_q + q_linear, delta, mask=row_valid)
    lse = tl.load(Lse + bh * num_q + q_linear, mask=row_valid, other=float('inf'))
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    Index += b * stride_ib + h * stride_ih
    Mask += b * stride_mb
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for step in range(num_steps):
        logits, shift, k, v = _step_logits(q, K, V, step, group_tile, row_group, d, d_valid,
                                           block_k, groups, slot_keys, GPT, CPG, Index,
                                           stride_ig, stride_ik, stride_kn, stride_kd,
                                           stride_vn, stride_vd, Mask, stride_mn, KRows,
                                           scale_log2, HAS_MASK, WINDOWS, ALIGNED,
                                           STEPS_PER_BLOCK, BLOCKS_PER_STEP, COLUMN_TAIL,
                                           UNSCALED, DOT_PRECISION, BLOCK_N)
        if UNSCALED:
            p = tl.exp2(logits * scale_log2 + (shift - lse)[:, None])
        else:
            p = tl.exp2(logits - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    grad_offsets = b * stride_dqb + h * stride_dqh + q_pos[:, None] * stride_dqn + d[None, :]
    tl.store(GradQ + grad_offsets, (dq * scale).to(GradQ.dtype.element_ty), mask=row_mask)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, Out, GradOut, Lse, Delta, Order, Offsets, Mask, GradK, GradV,
                     GradQ,
                     stride_qb, stride_qh, stride_qn, stride_qd,
                     stride_kb, stride_kh, stride_kn, stride_kd,
                     stride_vb, stride_vh, stride_vn, stride_vd,
                     stride_ob, stride_oh, stride_on, stride_od,
                     stride_gb, stride_gh, stride_gn, stride_gd,
                     stride_dkb, stride_dkh, stride_dkn, stride_dqb, stride_dqh, stride_dqn,
                     stride_mb, stride_mn,
                     num_tiles, heads, num_k, head_dim, blocks, block_k, num_q, block_q,
                     list_len, csr_row_b, csr_row_h, BPT, TPB, RPB, QPB, scale, scale_log2,
                     QRows, KRows,
                     HAS_MASK: tl.constexpr, DQ_MODE: tl.constexpr, WINDOWS: tl.constexpr,
                     ALIGNED: tl.constexpr, GROUP_STEPS: tl.constexpr, QUERY_TAIL: tl.constexpr,
                     KEY_TAIL: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """GradK, GradV ((B, H, Nk, D) at strides ``stride_dk*``, unit head-dim stride, k's
    dtype), FlashAttention-2 style per key tile.

    The tile's key rows pack ``BPT`` key blocks (or a part of one); each step gathers, for
    every packed block, the next ``QPB`` query rows of the groups that routed to it (the
    transposed index: ``Order[Offsets[m]:Offsets[m+1]]`` lists the groups of block ``m``).

    ``DQ_MODE`` 0 (split backward): Delta = rowsum(dO * O) comes from the dQ kernel and GradQ,
    Out are unused. Otherwise the kernel is the whole backward: it computes Delta from Out and
    the dQ contribution of its keys, which it stores into GradQ (strides ``stride_dq*``) when
    every query it visits routes to this tile alone (``DQ_MODE`` 1: one slot, whole key blocks
    per tile) or adds to an fp32 GradQ with atomics (``DQ_MODE`` 2).

    ``ALIGNED`` (see :func:`_key_plan`): the tile is part of one key block and every step's
    query rows lie in one routed group (``GROUP_STEPS = cdiv(block_q, BLOCK_M)`` steps a
    group, a compile-time divisor; with ``QUERY_TAIL`` the last has a tail of invalid rows,
    whose lse of +inf zeroes their probabilities), so probabilities take no per-element
    mask; with ``KEY_TAIL`` (BLOCK_N does not divide ``block_k``) the probabilities of the
    block's last tile's tail rows are zeroed, as are padded keys'.
    """
    program = tl.program_id(0).to(tl.int64)  # one flat grid: B*H may exceed grid dim 1
    tile = (program % num_tiles).to(tl.int32)
    bh = program // num_tiles
    b, h = bh // heads, bh % heads
    if ALIGNED:
        key_pos, _, row_valid, key_block = _aligned_rows(tile, block_k, TPB, KRows, WINDOWS,
                                                         BLOCK_N)
    else:
        key_pos, _, row_block, row_valid, block_tile = _tile_rows(
            tile, block_k, blocks, BPT, TPB, RPB, KRows, WINDOWS, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    d_valid = d < head_dim
    row_mask = row_valid[:, None] & d_valid[None, :]
    k = tl.load(K + b * stride_kb + h * stride_kh + key_pos[:, None] * stride_kn
                + d[None, :] * stride_kd, mask=row_mask, other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + key_pos[:, None] * stride_vn
                + d[None, :] * stride_vd, mask=row_mask, other=0.0)
    row_live = row_valid
    if HAS_MASK:
        padded = tl.load(Mask + b * stride_mb + key_pos * stride_mn, mask=row_valid, other=1)
        row_live = row_valid & (padded == 0)
    csr_row = b * csr_row_b + h * csr_row_h
    Order += csr_row * list_len
    Offsets += csr_row * (blocks + 1)
    cols = tl.arange(0, BLOCK_M)
    if ALIGNED:
        start = tl.load(Offsets + key_block)
        num_steps = (tl.load(Offsets + key_block + 1) - start) * GROUP_STEPS
    else:
        col_block = cols // QPB
        block = block_tile * BPT + col_block
        col_in_tile = (col_block < BPT) & (block < blocks)
        start = tl.load(Offsets + block, mask=col_in_tile, other=0)
        rows_routed = (tl.load(Offsets + block + 1, mask=col_in_tile, other=0) - start) * block_q
        num_steps = tl.cdiv(tl.max(rows_routed, 0), QPB)
    Q += b * stride_qb + h * stride_qh
    Out += b * stride_ob + h * stride_oh
    GradOut += b * stride_gb + h * stride_gh
    Lse += bh * num_q
    Delta += bh * num_q
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for step in range(num_steps):
        if ALIGNED:  # the step's BLOCK_M query rows lie in one group: one scalar load
            group = tl.load(Order + start + step // GROUP_STEPS)
            within = (step % GROUP_STEPS) * BLOCK_M + cols
            if QUERY_TAIL:
                col_valid = within < block_q
            else:
                col_valid = within >= 0
        else:
            j = step * QPB + cols % QPB
            col_valid = col_in_tile & (j < rows_routed)
            group = tl.load(Order + start + j // block_q, mask=col_valid, other=0)
            within = j % block_q
        q_pos = _token_row(group, within, block_q, QRows, col_valid, WINDOWS)
        q_linear = group * block_q + within
        col_mask = col_valid[:, None] & d_valid[None, :]
        q = tl.load(Q + q_pos[:, None] * stride_qn + d[None, :] * stride_qd, mask=col_mask,
                    other=0.0)
        do = tl.load(GradOut + q_pos[:, None] * stride_gn + d[None, :] * stride_gd,
                     mask=col_mask, other=0.0)
        lse = tl.load(Lse + q_linear, mask=col_valid, other=float('inf'))
        if DQ_MODE == 0:
            delta = tl.load(Delta + q_linear, mask=col_valid, other=0.0)
        else:
            o = tl.load(Out + q_pos[:, None] * stride_on + d[None, :] * stride_od,
                        mask=col_mask, other=0.0)
            delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        scores = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * scale_log2
        if ALIGNED:
            p = tl.exp2(scores - lse[None, :])
            if HAS_MASK or KEY_TAIL:  # a tail row's zero key would score 0, not -inf
                p = tl.where(row_live[:, None], p, 0.0)
        else:
            admissible = (row_block[:, None] == col_block[None, :]) & col_valid[None, :] \
                & row_live[:, None]
            p = tl.where(admissible, tl.exp2(scores - lse[None, :]), 0.0)
        dv += tl.dot(p.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[None, :])
        dk += tl.dot(ds.to(q.dtype), q, input_precision=DOT_PRECISION)
        if DQ_MODE != 0:
            dq = tl.dot(tl.trans(ds.to(k.dtype)), k, input_precision=DOT_PRECISION) * scale
            dq_offsets = b * stride_dqb + h * stride_dqh + q_pos[:, None] * stride_dqn \
                + d[None, :]
            if DQ_MODE == 1:
                tl.store(GradQ + dq_offsets, dq.to(GradQ.dtype.element_ty), mask=col_mask)
            else:
                tl.atomic_add(GradQ + dq_offsets, dq, mask=col_mask, sem='relaxed')
    grad_offsets = b * stride_dkb + h * stride_dkh + key_pos[:, None] * stride_dkn + d[None, :]
    tl.store(GradK + grad_offsets, (dk * scale).to(GradK.dtype.element_ty), mask=row_mask)
    tl.store(GradV + grad_offsets, dv.to(GradV.dtype.element_ty), mask=row_mask)


@triton.jit
def _transpose_index_program(program, Index, Order, Offsets, stride_ib, stride_ih, stride_ig,
                             stride_ik, index_heads, slots, list_len, blocks, num_chunks,
                             BLOCK_B: tl.constexpr, BLOCK_E: tl.constexpr):
    """Program ``program`` of the transposed index: one index row, ``BLOCK_B`` of its key
    blocks ``m``.

    ``Offsets[row, m]`` (m in [0, M]) counts the row's entries in [0, m); the groups whose
    slots name block ``m`` go to ``Order[row, Offsets[row, m]:Offsets[row, m + 1]]`` in row
    order (a stable counting sort; -1 and out-of-range entries are left out).
    """
    row = program // num_chunks
    chunk = (program % num_chunks).to(tl.int32)
    Index += (row // index_heads) * stride_ib + (row % index_heads) * stride_ih
    Order += row * list_len
    Offsets += row * (blocks + 1)
    block = chunk * BLOCK_B + tl.arange(0, BLOCK_B)
    entries = tl.arange(0, BLOCK_E)
    before = tl.zeros([BLOCK_B], tl.int32)
    for start in range(0, list_len, BLOCK_E):
        e = start + entries
        routed = tl.load(Index + (e // slots) * stride_ig + (e % slots) * stride_ik,
                         mask=e < list_len, other=-1).to(tl.int32)
        below = (routed[None, :] >= 0) & (routed[None, :] < block[:, None])
        before += tl.sum(below.to(tl.int32), 1)
    tl.store(Offsets + block, before, mask=block <= blocks)
    filled = before
    for start in range(0, list_len, BLOCK_E):
        e = start + entries
        routed = tl.load(Index + (e // slots) * stride_ig + (e % slots) * stride_ik,
                         mask=e < list_len, other=-1).to(tl.int32)
        hit = (routed[None, :] == block[:, None]) & (block[:, None] < blocks)
        hits = hit.to(tl.int32)
        position = filled[:, None] + tl.cumsum(hits, 1) - 1
        group = tl.broadcast_to((e // slots)[None, :], (BLOCK_B, BLOCK_E))
        tl.store(Order + position, group, mask=hit)
        filled += tl.sum(hits, 1)


@triton.jit
def _transpose_index_kernel(Index, Order, Offsets, stride_ib, stride_ih, stride_ig, stride_ik,
                            index_heads, slots, list_len, blocks, num_chunks,
                            BLOCK_B: tl.constexpr, BLOCK_E: tl.constexpr):
    """The transposed index alone (see :func:`_transpose_index_program`)."""
    _transpose_index_program(tl.program_id(0).to(tl.int64), Index, Order, Offsets, stride_ib,
                             stride_ih, stride_ig, stride_ik, index_heads, slots, list_len,
                             blocks, num_chunks, BLOCK_B, BLOCK_E)


def _index_strides(index: Tensor):
    """(batch, head, group, slot) strides; a shared (B, G, K) index gets head stride 0."""
    if index.dim() == 3:
        return index.stride(0), 0, index.stride(1), index.stride(2)
    return index.stride()


def _transpose_launch(index: Tensor, blocks: int):
    """The transposed index's buffers and launch: (order, offsets, programs, scalar arguments
    after the index strides, BLOCK_B/BLOCK_E meta). See :func:`_transpose_index`."""
    batch, slots = index.shape[0], index.shape[-1]
    heads = index.shape[1] if index.dim() == 4 else 1
    list_len = index.shape[-2] * slots
    order = torch.empty((batch * heads, list_len), dtype=torch.int32, device=index.device)
    offsets = torch.empty((batch * heads, blocks + 1), dtype=torch.int32, device=index.device)
    block_b, block_e = _transpose_tiles(list_len)
    num_chunks = cdiv(blocks + 1, block_b)
    return (order, offsets, batch * heads * num_chunks,
            (heads, slots, list_len, blocks, num_chunks), dict(BLOCK_B=block_b, BLOCK_E=block_e))


def _transpose_index(index: Tensor, blocks: int):
    """Per index row (B, or B*H for a per-head index): groups listed by routed key block.

    Returns ``order`` int32 (rows, G*K) and ``offsets`` int32 (rows, M+1): the groups that
    route to block ``m`` are ``order[r, offsets[r, m]:offsets[r, m+1]]``, in group order.
    Entries of ``order`` past ``offsets[r, M]`` (the -1 slots) are left unwritten. The split
    backward builds it in its dQ launch instead (:func:`backward_dq`).
    """
    order, offsets, programs, scalars, meta = _transpose_launch(index, blocks)
    fast_launcher(_transpose_index_kernel)[(programs,)](
        index, order, offsets, *_index_strides(index), *scalars, **meta, num_warps=4)
    return order, offsets


def _transpose_tiles(entries: int) -> Tuple[int, int]:
    """(BLOCK_B key blocks, BLOCK_E index entries) per program of the transpose kernel, for
    index rows of ``entries`` (G * K) entries: 4 blocks, and half the entries' next power of
    two within [256, 1024] (one or two loop trips). Timed alone on an H200 (docs/ops.md,
    "Transposed index"): within 0.1 µs of the fastest of ten tilings at 8 of 10 shapes, 1.4-1.8
    µs behind it at 1024 entries over few rows."""
    return 4, min(1024, max(256, next_power_of_2(entries) // 2))


_aligned_tiles = True


def set_aligned_tiles(enabled: bool) -> None:
    """Let the kernels take their ``ALIGNED`` form where the tiles divide the blocks (default
    on; benchmarks and tests turn it off to compare with the general form)."""
    global _aligned_tiles
    _aligned_tiles = bool(enabled)
    _query_plan.cache_clear()
    _key_plan.cache_clear()


@functools.lru_cache(maxsize=1024)
def _query_plan(kind: str, batch: int, heads: int, num_q: int, head_dim: int, block_q: int,
                block_k: int, slots: int, fp32: bool, config: Optional[tuple],
                positive_scale: bool = True):
    """Grid, scalar arguments and meta-parameters of a kernel that tiles query rows.

    ``config`` overrides the ``_CONFIGS`` row (tuning). The key tile is capped at the next
    power of two of the routed keys a tile needs, so short rows are not padded far. The tiling
    is ``ALIGNED`` (no per-element masks) when each tile lies in one group (BLOCK_M < 2 *
    ``block_q``), and :func:`set_aligned_tiles` has not turned it off: a group's last tile may
    have a tail of invalid rows (masked at its loads and stores), and where BLOCK_N does not
    divide the routed keys of a group the last key step is partial (``COLUMN_TAIL``: its
    columns past them get a -inf bias). In that form the key steps' arithmetic takes
    compile-time divisors: ``STEPS_PER_BLOCK = block_k // BLOCK_N`` when BLOCK_N divides
    ``block_k`` (each key step reads part of one routed block), else ``BLOCKS_PER_STEP =
    BLOCK_N // block_k`` when ``block_k`` divides BLOCK_N; 0 for neither (a runtime division
    by ``block_k``). One-block steps with ``positive_scale`` (the scale > 0, so a row's
    largest score is its largest ``q k^T``) are ``UNSCALED``. Outside
    the ALIGNED form, a tile of ``PACKED`` = BLOCK_M // ``block_q`` whole groups whose steps
    read whole blocks (``block_k`` divides a group's columns, which divide its routed keys)
    takes that geometry at compile time (``PACKED_BLOCK_K = block_k``); else ``PACKED`` = 0.
    """
    groups = num_q // block_q
    slot_keys = slots * block_k
    block_m, block_n, num_warps, num_stages, max_registers = \
        config or tile_config(kind, block_q, head_dim)
    groups_per_tile = max(1, block_m // block_q)
    block_n = min(block_n, max(16, next_power_of_2(slot_keys * groups_per_tile)))
    tiles_per_group = cdiv(block_q, block_m)
    cols_per_group = block_n // groups_per_tile
    if cols_per_group == 0:
        raise ValueError(f'{kind} tile BLOCK_N={block_n} is smaller than the {groups_per_tile} '
                         f'groups packed per tile')
    num_tiles = cdiv(groups, groups_per_tile) * tiles_per_group
    num_steps = cdiv(slot_keys, cols_per_group)
    scalars = (num_tiles, heads, num_q, head_dim, groups, block_q, block_k, slot_keys,
               num_steps, groups_per_tile, tiles_per_group, min(block_q, block_m),
               cols_per_group)
    aligned = _aligned_tiles and groups_per_tile == 1
    steps_per_block = block_k // block_n if aligned and block_k % block_n == 0 else 0
    blocks_per_step = (block_n // block_k if aligned and not steps_per_block
                       and block_n % block_k == 0 else 0)
    packed = (_aligned_tiles and not aligned and block_m == groups_per_tile * block_q
              and cols_per_group % block_k == 0 and slot_keys % cols_per_group == 0)
    meta = dict(ALIGNED=aligned, STEPS_PER_BLOCK=steps_per_block,
                BLOCKS_PER_STEP=blocks_per_step,
                COLUMN_TAIL=aligned and slot_keys % block_n != 0,
                UNSCALED=steps_per_block > 0 and positive_scale,
                PACKED=groups_per_tile if packed else 0, PACKED_BLOCK_K=block_k if packed else 0,
                DOT_PRECISION='ieee' if fp32 else 'tf32', BLOCK_M=block_m, BLOCK_N=block_n,
                BLOCK_D=_block_d(head_dim), num_warps=num_warps, num_stages=num_stages,
                maxnreg=max_registers or None)
    return (num_tiles * batch * heads,), scalars, meta


@functools.lru_cache(maxsize=1024)
def _key_plan(kind: str, batch: int, heads: int, num_k: int, head_dim: int, block_k: int,
              block_q: int, slots: int, fp32: bool, config: Optional[tuple]):
    """Grid, scalar arguments and meta-parameters of the dK/dV kernel (tiles key rows), with
    the tile config of ``kind`` ('dkdv' or 'bwd'). ``ALIGNED`` when each tile lies in one key
    block (BLOCK_N < 2 * ``block_k``; unless :func:`set_aligned_tiles` turned it off), with
    ``GROUP_STEPS = cdiv(block_q, BLOCK_M)`` query steps per routed group (``QUERY_TAIL``
    where BLOCK_M does not divide ``block_q``); a block's last tile may have a tail of invalid
    key rows, masked at its loads and stores. With a query tail, the general form packs the
    rows of all the groups routed to a block into its steps instead; so the ALIGNED form is
    taken only where that packing gains little: one slot (about one group per block), or a
    tail of at most an eighth of a group's rows."""
    blocks = num_k // block_k
    block_m, block_n, num_warps, num_stages, max_registers = \
        config or tile_config(kind, block_k, head_dim)
    blocks_per_tile = max(1, block_n // block_k)
    rows_per_block = block_m // blocks_per_tile
    if rows_per_block == 0:
        raise ValueError(f'dkdv tile BLOCK_M={block_m} is smaller than the {blocks_per_tile} '
                         f'key blocks packed per tile')
    tiles_per_block = cdiv(block_k, block_n)
    num_tiles = cdiv(blocks, blocks_per_tile) * tiles_per_block
    scalars = (num_tiles, heads, num_k, head_dim, blocks, block_k)
    tiling = (blocks_per_tile, tiles_per_block, min(block_k, block_n), rows_per_block)
    group_rows = cdiv(block_q, block_m) * block_m
    aligned = (_aligned_tiles and blocks_per_tile == 1
               and (slots == 1 or 8 * group_rows <= 9 * block_q))
    meta = dict(ALIGNED=aligned, GROUP_STEPS=cdiv(block_q, block_m) if aligned else 1,
                QUERY_TAIL=aligned and block_q % block_m != 0,
                KEY_TAIL=aligned and block_k % block_n != 0,
                DOT_PRECISION='ieee' if fp32 else 'tf32', BLOCK_M=block_m,
                BLOCK_N=block_n, BLOCK_D=_block_d(head_dim), num_warps=num_warps,
                num_stages=num_stages, maxnreg=max_registers or None)
    return (num_tiles * batch * heads,), scalars, tiling, meta


def _mask_args(key_padding_mask: Optional[Tensor], like: Tensor):
    if key_padding_mask is None:
        return like, 0, 0, False
    mask = key_padding_mask.view(torch.uint8)
    return mask, mask.stride(0), mask.stride(1), True


_WINDOW_ROWS_CACHE = {}
_WINDOW_ROWS_CACHE_SIZE = 256
_uncached = threading.local()


@contextlib.contextmanager
def _uncached_window_rows():
    """Inside, :func:`window_rows` makes its tables afresh instead of caching them. The custom
    ops (the torch.compile path) run so: in ``mode='reduce-overhead'`` Inductor warms its CUDA
    graphs up with allocations from its own memory pool, which a cached table would outlive."""
    outer = getattr(_uncached, 'active', False)
    _uncached.active = True
    try:
        yield
    finally:
        _uncached.active = outer


def window_rows(num_tokens: int, window: Tuple[int, int], map_width: int,
                device: torch.device) -> Tensor:
    """int32 (num_tokens,): the memory row, in a row-major map ``map_width`` wide, of each
    position in window-major order (``window = (h, w)``; :func:`to_window_major` of the row
    numbers). Cached per geometry, except while a CUDA graph is being captured and inside
    :func:`_uncached_window_rows`: a tensor made then holds its values only in replays, and a
    cached one read then would be baked into the graph, which may outlive the cache's entry."""
    uncached = getattr(_uncached, 'active', False) or (
        device.type == 'cuda' and torch.cuda.is_current_stream_capturing())
    key = (num_tokens, window, map_width, device)
    rows = None if uncached else _WINDOW_ROWS_CACHE.get(key)
    if rows is None:
        rows = to_window_major(torch.arange(num_tokens, dtype=torch.int32, device=device),
                               window, map_width, 0)
        if not uncached:
            if len(_WINDOW_ROWS_CACHE) >= _WINDOW_ROWS_CACHE_SIZE:
                _WINDOW_ROWS_CACHE.clear()
            _WINDOW_ROWS_CACHE[key] = rows
    return rows


def _layout_args(layout: Optional[Sequence[int]], q: Tensor, k: Tensor, block_q: int,
                 block_k: int):
    """Kernel arguments of the token layout, ((QRows, KRows), WINDOWS): ``layout`` None
    (block-major tokens; the row pointers are unused) or ``(q_window_width, k_window_width,
    map_width)`` (windows of row-major maps, rows from :func:`window_rows`)."""
    if layout is None:
        return (q, k), False
    q_win_w, k_win_w, map_width = layout
    return ((window_rows(q.shape[2], (block_q // q_win_w, q_win_w), map_width, q.device),
             window_rows(k.shape[2], (block_k // k_win_w, k_win_w), map_width, k.device)),
            True)


def token_major(like: Tensor, dtype: Optional[torch.dtype] = None, zero: bool = False) -> Tensor:
    """A new (B, H, N, D) tensor shaped as ``like``, laid out token-major: a transposed view of
    contiguous (B, N, H, D) memory, so merging the heads back into (B, N, H * D) channels (the
    next projection's input, the qkv gradient) is a view, not a copy. Outputs and gradients of
    the kernels are laid out so."""
    batch, heads, tokens, head_dim = like.shape
    make = torch.zeros if zero else torch.empty
    return make((batch, tokens, heads, head_dim), dtype=dtype or like.dtype,
                device=like.device).transpose(1, 2)


def _row_strides(t: Tensor):
    """(batch, head, token) strides of a (B, H, N, D) tensor with unit head-dim stride."""
    return t.stride()[:3]


def _is_empty(q: Tensor, k: Tensor, index: Tensor) -> bool:
    return q.numel() == 0 or k.numel() == 0 or index.shape[-1] == 0


def forward(q: Tensor, k: Tensor, v: Tensor, index: Tensor, key_padding_mask: Optional[Tensor],
            block_q: int, block_k: int, scale: float, config: Optional[tuple] = None,
            layout: Optional[Sequence[int]] = None):
    """(out (B, H, Nq, D) :func:`token_major` in q's dtype, lse (B, H, Nq) fp32, base 2, +inf
    if no key, by window-major position). Single-block calls run the forward of
    ``ops._triton_single_block``, unless ``config`` is given: it overrides the gathered
    forward's tile config (tuning); ``layout`` see :func:`_layout_args`."""
    batch, heads, num_q, head_dim = q.shape
    if _is_empty(q, k, index):
        return (token_major(q, zero=True),
                torch.full((batch, heads, num_q), float('inf'), dtype=torch.float32,
                           device=q.device))
    from ops import _triton_single_block as single_block
    out = token_major(q)
    lse = q.new_empty((batch, heads, num_q), dtype=torch.float32)
    mask_args = _mask_args(key_padding_mask, index)
    if config is None and single_block.takes_call('fwd', num_q, k.shape[2], block_q, block_k,
                                                  index.shape[-1], head_dim, layout):
        single_block.forward(q, k, v, index, mask_args, scale, out, lse)
        return out, lse
    mask, stride_mb, stride_mn, has_mask = mask_args
    layout_args, windows = _layout_args(layout, q, k, block_q, block_k)

    def launch(tiles):
        grid, scalars, meta = _query_plan('fwd', batch, heads, num_q, head_dim, block_q,
                                          block_k, index.shape[-1], q.dtype == torch.float32,
                                          tiles, scale > 0)
        fast_launcher(_fwd_kernel)[grid](
            q, k, v, index, mask, out, lse,
            *q.stride(), *k.stride(), *v.stride(), *_row_strides(out), *_index_strides(index),
            stride_mb, stride_mn, *scalars, scale * LOG2E, *layout_args, HAS_MASK=has_mask,
            WINDOWS=windows, **meta)
    _launch_fitting('fwd', block_q, head_dim, q.device, config, launch)
    return out, lse


def backward_dq(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                index: Tensor, key_padding_mask: Optional[Tensor], block_q: int, block_k: int,
                scale: float, config: Optional[tuple] = None,
                layout: Optional[Sequence[int]] = None, grad_q: Optional[Tensor] = None,
                transpose: Optional[tuple] = None):
    """(grad_q :func:`token_major` in q's dtype, or written into the given ``grad_q``, delta =
    rowsum(dO * O) (B, H, Nq) fp32); non-empty inputs only. ``transpose``, a
    :func:`_transpose_launch` of ``index``: the launch also fills its order and offsets."""
    batch, heads, num_q, head_dim = q.shape
    if grad_q is None:
        grad_q = token_major(q)
    delta = q.new_empty((batch, heads, num_q), dtype=torch.float32)
    mask, stride_mb, stride_mn, has_mask = _mask_args(key_padding_mask, index)
    layout_args, windows = _layout_args(layout, q, k, block_q, block_k)

    order, offsets, transpose_programs, transpose_scalars, transpose_meta = \
        transpose or (index, index, 0, (0, 0, 0, 0, 0), dict(BLOCK_B=1, BLOCK_E=1))

    def launch(tiles):
        grid, scalars, meta = _query_plan('dq', batch, heads, num_q, head_dim, block_q,
                                          block_k, index.shape[-1], q.dtype == torch.float32,
                                          tiles, scale > 0)
        fast_launcher(_bwd_dq_kernel)[(grid[0] + transpose_programs,)](
            q, k, v, out, grad_out, lse, index, mask, grad_q, delta, order, offsets,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *grad_out.stride(),
            *_row_strides(grad_q), *_index_strides(index), stride_mb, stride_mn,
            *scalars, scale, scale * LOG2E, *layout_args, *transpose_scalars,
            transpose_programs, HAS_MASK=has_mask, WINDOWS=windows,
            TRANSPOSE=transpose is not None, **transpose_meta, **meta)
    _launch_fitting('dq', block_q, head_dim, q.device, config, launch)
    return grad_q, delta


def backward_dkdv(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  delta: Optional[Tensor], order: Tensor, offsets: Tensor,
                  index_is_per_head: bool, key_padding_mask: Optional[Tensor], block_q: int,
                  block_k: int, scale: float, grad_q: Optional[Tensor] = None,
                  dq_mode: int = 0, config: Optional[tuple] = None,
                  layout: Optional[Sequence[int]] = None,
                  grad_kv: Optional[Tuple[Tensor, Tensor]] = None):
    """(grad_k, grad_v), :func:`token_major` in k's dtype or written into the given
    ``grad_kv`` (two tensors with the same strides), from the transposed index; non-empty
    inputs only. ``dq_mode`` 0 reads ``delta`` from the dQ kernel; 1 and 2 (see
    ``_bwd_dkdv_kernel``) also write the dQ of the visited queries into ``grad_q`` (unit
    head-dim stride; ``out`` gives delta)."""
    batch, heads, num_q, head_dim = q.shape
    num_k = k.shape[2]
    grad_k, grad_v = grad_kv or (token_major(k), token_major(k))
    kind = 'dkdv' if dq_mode == 0 else 'bwd'
    mask, stride_mb, stride_mn, has_mask = _mask_args(key_padding_mask, order)
    csr_row_b, csr_row_h = (heads, 1) if index_is_per_head else (1, 0)
    layout_args, windows = _layout_args(layout, q, k, block_q, block_k)
    slots = order.shape[1] // (num_q // block_q)  # order lists G * K entries per index row

    def launch(tiles):
        grid, scalars, tiling, meta = _key_plan(kind, batch, heads, num_k, head_dim, block_k,
                                                block_q, slots, q.dtype == torch.float32, tiles)
        fast_launcher(_bwd_dkdv_kernel)[grid](
            q, k, v, out, grad_out, lse, order if delta is None else delta, order, offsets,
            mask, grad_k, grad_v, grad_k if grad_q is None else grad_q,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *grad_out.stride(),
            *_row_strides(grad_k), *_row_strides(grad_k if grad_q is None else grad_q),
            stride_mb, stride_mn, *scalars, num_q, block_q, order.shape[1], csr_row_b,
            csr_row_h, *tiling, scale, scale * LOG2E, *layout_args, HAS_MASK=has_mask,
            DQ_MODE=dq_mode, WINDOWS=windows, **meta)
    _launch_fitting(kind, block_k, head_dim, q.device, config, launch)
    return grad_k, grad_v


BACKWARD_MODES = ('auto', 'split', 'fused')
_backward_mode = 'auto'


def set_backward_mode(mode: str) -> None:
    """Choose the backward kernels (benchmarks compare them):

    * ``'split'``: a dQ kernel (which also stores delta = rowsum(dO * O)), then the dK/dV kernel;
    * ``'fused'``: the dK/dV kernel alone, also computing delta and dQ: dQ stored directly when
      each query group routes to one key block that a tile holds whole, by fp32 atomics
      otherwise;
    * ``'auto'`` (default): the single-block backward of ``ops._triton_single_block`` where
      it takes the call (one query group over one key block per batch entry: DSVT's sets),
      the whole-map backward of ``ops._triton_map_attention`` where that takes it (short key
      sequences with small routed blocks), else ``'fused'`` where it stores dQ (one slot,
      blocks a tile holds whole: BiFormer's 224-px stage 1), ``'split'`` everywhere else, so
      never atomics (deterministic). Measured on an H200
      (docs/ops.md): the stored one-kernel backward was as fast or faster at those shapes; with
      atomics it was 4-16% slower than split at one slot of 256- and 273-token blocks and
      14-72% slower with 8-16 slots.
    """
    global _backward_mode
    if mode not in BACKWARD_MODES:
        raise ValueError(f'mode must be one of {BACKWARD_MODES}, got {mode!r}')
    _backward_mode = mode


def backward_dq_mode(slots: int, block_k: int, head_dim: int, mode: Optional[str] = None,
                     block_n: Optional[int] = None) -> int:
    """The ``DQ_MODE`` of the backward: 0 split, 1 fused with dQ stored, 2 fused with atomics.
    ``block_n`` is the key tile of the one-kernel backward (default: its ``_CONFIGS`` row)."""
    mode = mode or _backward_mode
    if mode == 'split':
        return 0
    if block_n is None:
        block_n = tile_config('bwd', block_k, head_dim)[1]
    if slots == 1 and block_k <= block_n:
        return 1
    return 2 if mode == 'fused' else 0


def backward_one_kernel(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                        lse: Tensor, order: Tensor, offsets: Tensor, index_is_per_head: bool,
                        key_padding_mask: Optional[Tensor], block_q: int, block_k: int,
                        scale: float, dq_mode: int, config: Optional[tuple] = None,
                        layout: Optional[Sequence[int]] = None,
                        grads: Optional[Sequence[Tensor]] = None):
    """(grad_q, grad_k, grad_v) from the dK/dV kernel alone (``dq_mode`` 1 or 2), written into
    ``grads`` when given; queries that no slot routes anywhere are never visited, so their dQ
    stays zero."""
    accumulate = dq_mode == 2 and q.dtype != torch.float32
    if accumulate or grads is None:
        grad_q = token_major(q, torch.float32 if accumulate else q.dtype, zero=True)
    else:
        grad_q = grads[0].zero_()
    grad_k, grad_v = backward_dkdv(grad_out, q, k, v, out, lse, None, order, offsets,
                                   index_is_per_head, key_padding_mask, block_q, block_k, scale,
                                   grad_q=grad_q, dq_mode=dq_mode, config=config,
                                   layout=layout, grad_kv=grads and grads[1:])
    if accumulate:  # .to keeps the token-major strides
        grad_q = grad_q.to(q.dtype) if grads is None else grads[0].copy_(grad_q)
    return grad_q, grad_k, grad_v


def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
             index: Tensor, key_padding_mask: Optional[Tensor], block_q: int, block_k: int,
             scale: float, layout: Optional[Sequence[int]] = None,
             grads: Optional[Sequence[Tensor]] = None):
    """(grad_q, grad_k, grad_v): :func:`token_major`, or written into ``grads`` when given
    (views of a caller's buffer shaped as q, k, v with unit head-dim stride, grad_k's and
    grad_v's strides equal: BiFormer's qkv gradient). In the 'auto' backward mode from the
    whole-map backward (``ops._triton_map_attention``) where it takes the call, else from the
    kernels :func:`set_backward_mode` chooses."""
    from ops import _triton_map_attention as whole_map
    from ops import _triton_single_block as single_block
    if _is_empty(q, k, index):
        if grads is not None:
            return tuple(t.zero_() for t in grads)
        return token_major(q, zero=True), token_major(k, zero=True), token_major(v, zero=True)
    batch, heads = q.shape[:2]
    if _backward_mode == 'auto' and single_block.takes_call(
            'bwd', q.shape[2], k.shape[2], block_q, block_k, index.shape[-1], q.shape[-1],
            layout):
        grads = grads or (token_major(q), token_major(k), token_major(v))
        single_block.backward(grad_out, q, k, v, out, lse, index,
                              _mask_args(key_padding_mask, index), scale, *grads)
        return tuple(grads)
    if _backward_mode == 'auto' and whole_map.takes_map_backward(
            k.shape[2], q.shape[-1], block_q, block_k, index.shape[-1], batch * heads):
        grads = grads or (token_major(q), token_major(k), token_major(v))
        whole_map.backward(grad_out, q, k, v, out, lse,
                           whole_map.count_table(index, k.shape[2] // block_k),
                           _mask_args(key_padding_mask, index), block_q, block_k, scale,
                           *grads, layout=layout)
        return tuple(grads)
    mode = backward_dq_mode(index.shape[-1], block_k, q.shape[-1])
    blocks = k.shape[2] // block_k
    if mode != 0:
        args = (*_transpose_index(index, blocks), index.dim() == 4, key_padding_mask, block_q,
                block_k, scale)
        return backward_one_kernel(grad_out, q, k, v, out, lse, *args, dq_mode=mode,
                                   layout=layout, grads=grads)
    transpose = _transpose_launch(index, blocks)
    grad_q, delta = backward_dq(grad_out, q, k, v, out, lse, index, key_padding_mask, block_q,
                                block_k, scale, layout=layout, grad_q=grads and grads[0],
                                transpose=transpose)
    args = (*transpose[:2], index.dim() == 4, key_padding_mask, block_q, block_k, scale)
    grad_k, grad_v = backward_dkdv(grad_out, q, k, v, out, lse, delta, *args, layout=layout,
                                   grad_kv=grads and grads[1:])
    return grad_q, grad_k, grad_v


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op('dsa_ops::gather_attention_fwd', mutates_args=())
def gather_attention_fwd(q: Tensor, k: Tensor, v: Tensor, index: Tensor,
                         key_padding_mask: Optional[Tensor], block_q: int, block_k: int,
                         scale: float, layout: Optional[List[int]]) -> tuple[Tensor, Tensor]:
    """Forward: (out (B, H, Nq, D) token-major in q's dtype, lse (B, H, Nq) fp32, base 2, +inf
    if no key)."""
    with _uncached_window_rows():
        return forward(q, k, v, index, key_padding_mask, block_q, block_k, scale, layout=layout)


@gather_attention_fwd.register_fake
def _(q, k, v, index, key_padding_mask, block_q, block_k, scale, layout):
    return token_major(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op('dsa_ops::gather_attention_bwd', mutates_args=())
def gather_attention_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                         lse: Tensor, index: Tensor, key_padding_mask: Optional[Tensor],
                         block_q: int, block_k: int, scale: float,
                         layout: Optional[List[int]]) -> tuple[Tensor, Tensor, Tensor]:
    """Backward: (grad_q, grad_k, grad_v), each in the shape and dtype of its input,
    token-major."""
    with _uncached_window_rows():
        return backward(grad_out, q, k, v, out, lse, index, key_padding_mask, block_q, block_k,
                        scale, layout=layout)


@gather_attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, index, key_padding_mask, block_q, block_k, scale, layout):
    return token_major(q), token_major(k), token_major(v)


def _setup_context(ctx, inputs, output):
    q, k, v, index, key_padding_mask, block_q, block_k, scale, layout = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, index, key_padding_mask)
    ctx.block_q, ctx.block_k, ctx.scale, ctx.layout = block_q, block_k, scale, layout


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, index, key_padding_mask = ctx.saved_tensors
    grad_q, grad_k, grad_v = gather_attention_bwd(grad_out, q, k, v, out, lse, index,
                                                  key_padding_mask, ctx.block_q, ctx.block_k,
                                                  ctx.scale, ctx.layout)
    return grad_q, grad_k, grad_v, None, None, None, None, None, None


gather_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- eager path


class _GatherAttention(torch.autograd.Function):
    """Eager autograd over the launchers, without the custom-op dispatch of the traced path."""

    @staticmethod
    def forward(ctx, q, k, v, index, key_padding_mask, block_q, block_k, scale, layout):
        out, lse = forward(q, k, v, index, key_padding_mask, block_q, block_k, scale,
                           layout=layout)
        ctx.save_for_backward(q, k, v, out, lse, index, key_padding_mask)
        ctx.block_q, ctx.block_k, ctx.scale, ctx.layout = block_q, block_k, scale, layout
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse, index, key_padding_mask = ctx.saved_tensors
        grad_q, grad_k, grad_v = backward(grad_out, q, k, v, out, lse, index, key_padding_mask,
                                          ctx.block_q, ctx.block_k, ctx.scale,
                                          layout=ctx.layout)
        return grad_q, grad_k, grad_v, None, None, None, None, None, None


def triton_gather_attention(q: Tensor, k: Tensor, v: Tensor, index: Tensor, *, block_q: int,
                            block_k: int, key_padding_mask: Optional[Tensor], scale: float,
                            traced: bool, layout: Optional[List[int]] = None) -> Tensor:
    """Fused gather attention (arguments validated by :func:`ops.gather_attention`; block
    sizes in tokens, ``layout`` as :func:`_layout_args`).

    ``traced`` (compiling or exporting) routes through the custom ops; eager calls launch the
    kernels directly, through ``_GatherAttention`` when a gradient is needed.
    """
    if traced:
        return gather_attention_fwd(q, k, v, index, key_padding_mask, block_q, block_k, scale,
                                    layout)[0]
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _GatherAttention.apply(q, k, v, index, key_padding_mask, block_q, block_k, scale,
                                      layout)
    return forward(q, k, v, index, key_padding_mask, block_q, block_k, scale, layout=layout)[0]
