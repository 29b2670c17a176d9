"""Fused Triton kernels for :func:`ops.gather_attention`, registered as torch custom ops.

Tiling. A program owns one tile of ``BLOCK_M`` query rows of one (batch, head):
* ``block_q <= BLOCK_M``: the tile packs ``GPT = BLOCK_M // block_q`` whole query groups;
* ``block_q > BLOCK_M``: one group spans ``TPG = cdiv(block_q, BLOCK_M)`` tiles.
Each step loads ``BLOCK_N`` key rows, ``CPG = BLOCK_N // GPT`` for each packed group, read in
place through the index (``key = index[g, j // block_k] * block_k + j % block_k`` for the
group's ``j``-th routed key), and scores only (row group == column group) pairs. So any block
size works (1, 4, 49, 273, 90...) and the routed keys are never copied.

The forward keeps an online softmax and stores the log-sum-exp (base 2, fp32, B*H*Nq). The
backward has no atomics: one kernel recomputes the probabilities per query tile for dQ (and
stores rowsum(dO * O)); a second, per key tile, walks the transposed index (the groups that
route to each key block, from a stable sort) for dK and dV, FlashAttention-2 style.
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = 1.4426950408889634

# Tile configs (BLOCK_M, BLOCK_N, num_warps, num_stages): the first row whose size limit is
# >= the block size applies. 'fwd' and 'dq' tile query rows (BLOCK_M) by routed keys (BLOCK_N)
# and go by block_q; 'dkdv' tiles key rows (BLOCK_N) by routed query rows (BLOCK_M) and goes by
# block_k. The 'fwd' rows come from `python tools/benchmark.py ops --tune fwd` on an H200, timed
# eagerly (partly launch-bound); 'dq' and 'dkdv' are untuned defaults (docs/ops.md).
_CONFIGS = {
    'fwd': ((8, (16, 128, 4, 2)), (16, (16, 64, 2, 2)), (32, (16, 128, 4, 2)),
            (None, (64, 128, 4, 2))),
    'dq': ((32, (16, 64, 2, 2)), (None, (64, 64, 4, 2))),
    'dkdv': ((16, (64, 16, 2, 2)), (None, (64, 64, 4, 2))),
}
# Overrides for tuning sweeps: {'fwd' | 'dq' | 'dkdv': (BLOCK_M, BLOCK_N, num_warps, num_stages)}.
TILE_OVERRIDES: dict = {}


def _launch_config(kind: str, block_size: int, routed: int):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of one kernel; ``routed`` keys per query group
    ('fwd', 'dq') caps the key tile so short rows are not padded far."""
    if kind in TILE_OVERRIDES:
        return TILE_OVERRIDES[kind]
    for limit, config in _CONFIGS[kind]:
        if limit is None or block_size <= limit:
            break
    block_m, block_n, num_warps, num_stages = config
    if kind != 'dkdv':
        groups_per_tile = max(1, block_m // block_size)
        block_n = min(block_n, max(16, triton.next_power_of_2(routed * groups_per_tile)))
    return block_m, block_n, num_warps, num_stages


def _tiling(block_q: int, groups: int, block_m: int, block_n: int, slot_keys: int):
    """Groups per tile, tiles per group, columns per group per step, tile and step counts."""
    groups_per_tile = max(1, block_m // block_q)
    tiles_per_group = triton.cdiv(block_q, block_m)
    cols_per_group = block_n // groups_per_tile
    if cols_per_group == 0:
        raise ValueError(f'tile BLOCK_N={block_n} is smaller than the {groups_per_tile} groups '
                         f'packed per tile')
    num_tiles = triton.cdiv(groups, groups_per_tile) * tiles_per_group
    num_steps = triton.cdiv(slot_keys, cols_per_group)
    return groups_per_tile, tiles_per_group, cols_per_group, num_tiles, num_steps


@triton.jit
def _tile_rows(tile, block_q, groups, GPT, TPG, RPG, BLOCK_M: tl.constexpr):
    """Query positions of this tile's rows, their packed-group slot, and row validity."""
    group_tile = tile // TPG
    sub_tile = tile % TPG
    rows = tl.arange(0, BLOCK_M)
    rows_per_group = RPG
    local_group = rows // rows_per_group
    within = sub_tile * BLOCK_M + rows % rows_per_group
    group = group_tile * GPT + local_group
    valid = (local_group < GPT) & (group < groups) & (within < block_q)
    return group * block_q + within, local_group, valid, group_tile


@triton.jit
def _step_columns(step, group_tile, block_k, groups, slot_keys, GPT, CPG,
                  index_ptr, stride_ig, stride_ik, mask_ptr, stride_mn,
                  HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key positions read in this step, their packed-group slot, and whether each is admissible."""
    cols = tl.arange(0, BLOCK_N)
    local_group = cols // CPG
    j = step * CPG + cols % CPG
    group = group_tile * GPT + local_group
    valid = (local_group < GPT) & (group < groups) & (j < slot_keys)
    block = tl.load(index_ptr + group * stride_ig + (j // block_k) * stride_ik, mask=valid,
                    other=-1).to(tl.int32)
    valid = valid & (block >= 0)
    key = block * block_k + j % block_k
    if HAS_MASK:
        padded = tl.load(mask_ptr + key * stride_mn, mask=valid, other=1)
        valid = valid & (padded == 0)
    return key, local_group, valid


@triton.jit
def _fwd_kernel(Q, K, V, Index, Mask, Out, Lse,
                stride_qb, stride_qh, stride_qn, stride_qd,
                stride_kb, stride_kh, stride_kn, stride_kd,
                stride_vb, stride_vh, stride_vn, stride_vd,
                stride_ib, stride_ih, stride_ig, stride_ik,
                stride_mb, stride_mn,
                stride_ob, stride_oh, stride_on, stride_od,
                num_tiles, heads, num_q, head_dim, groups, block_q, block_k, slot_keys,
                num_steps, GPT, TPG, RPG, CPG, scale_log2,
                HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    program = tl.program_id(0).to(tl.int64)  # one flat grid: B*H may exceed grid dim 1
    tile = (program % num_tiles).to(tl.int32)
    bh = program // num_tiles
    b, h = bh // heads, bh % heads
    q_pos, row_group, row_valid, group_tile = _tile_rows(tile, block_q, groups, GPT, TPG,
                                                         RPG, BLOCK_M)
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
        key, col_group, col_valid = _step_columns(step, group_tile, block_k, groups, slot_keys,
                                                  GPT, CPG, Index, stride_ig, stride_ik, Mask,
                                                  stride_mn, HAS_MASK, BLOCK_N)
        kv_mask = col_valid[:, None] & d_valid[None, :]
        k = tl.load(K + key[:, None] * stride_kn + d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(V + key[:, None] * stride_vn + d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        admissible = (row_group[:, None] == col_group[None, :]) & col_valid[None, :]
        scores = tl.where(admissible, scores, float('-inf'))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new == float('-inf'), 0.0, m_new)
        p = tl.exp2(scores - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    has_keys = l_i > 0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    tl.store(Out + b * stride_ob + h * stride_oh + q_pos[:, None] * stride_on
             + d[None, :] * stride_od, out.to(Out.dtype.element_ty),
             mask=row_valid[:, None] & d_valid[None, :])
    lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float('inf'))
    tl.store(Lse + bh * num_q + q_pos, lse, mask=row_valid)


@triton.jit
def _bwd_dq_kernel(Q, K, V, Out, GradOut, Lse, Index, Mask, GradQ, Delta,
                   stride_qb, stride_qh, stride_qn, stride_qd,
                   stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd,
                   stride_ob, stride_oh, stride_on, stride_od,
                   stride_gb, stride_gh, stride_gn, stride_gd,
                   stride_dqb, stride_dqh, stride_dqn, stride_dqd,
                   stride_ib, stride_ih, stride_ig, stride_ik,
                   stride_mb, stride_mn,
                   num_tiles, heads, num_q, head_dim, groups, block_q, block_k, slot_keys,
                   num_steps, GPT, TPG, RPG, CPG, scale, scale_log2,
                   HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """GradQ (B, H, Nq, D) in q's dtype, and Delta = rowsum(dO * O) (B, H, Nq) fp32."""
    program = tl.program_id(0).to(tl.int64)  # one flat grid: B*H may exceed grid dim 1
    tile = (program % num_tiles).to(tl.int32)
    bh = program // num_tiles
    b, h = bh // heads, bh % heads
    q_pos, row_group, row_valid, group_tile = _tile_rows(tile, block_q, groups, GPT, TPG,
                                                         RPG, BLOCK_M)
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
    tl.store(Delta + bh * num_q + q_pos, delta, mask=row_valid)
    lse = tl.load(Lse + bh * num_q + q_pos, mask=row_valid, other=float('inf'))
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    Index += b * stride_ib + h * stride_ih
    Mask += b * stride_mb
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for step in range(num_steps):
        key, col_group, col_valid = _step_columns(step, group_tile, block_k, groups, slot_keys,
                                                  GPT, CPG, Index, stride_ig, stride_ik, Mask,
                                                  stride_mn, HAS_MASK, BLOCK_N)
        kv_mask = col_valid[:, None] & d_valid[None, :]
        k = tl.load(K + key[:, None] * stride_kn + d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(V + key[:, None] * stride_vn + d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        admissible = (row_group[:, None] == col_group[None, :]) & col_valid[None, :]
        p = tl.where(admissible, tl.exp2(scores - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    tl.store(GradQ + b * stride_dqb + h * stride_dqh + q_pos[:, None] * stride_dqn
             + d[None, :] * stride_dqd, (dq * scale).to(GradQ.dtype.element_ty), mask=row_mask)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, GradOut, Lse, Delta, Order, Offsets, Mask, GradK, GradV,
                     stride_qb, stride_qh, stride_qn, stride_qd,
                     stride_kb, stride_kh, stride_kn, stride_kd,
                     stride_vb, stride_vh, stride_vn, stride_vd,
                     stride_gb, stride_gh, stride_gn, stride_gd,
                     stride_mb, stride_mn,
                     num_tiles, heads, num_q, num_k, head_dim, blocks, block_q, block_k,
                     list_len,
                     csr_row_b, csr_row_h, BPT, TPB, RPB, QPB, scale, scale_log2,
                     HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """GradK, GradV (contiguous (B, H, Nk, D), k's dtype), FlashAttention-2 style per key tile.

    The tile's key rows pack ``BPT`` key blocks (or a part of one); each step gathers, for
    every packed block, the next ``QPB`` query rows of the groups that routed to it (the
    transposed index: ``Order[Offsets[m]:Offsets[m+1]]`` lists the groups of block ``m``).
    """
    program = tl.program_id(0).to(tl.int64)  # one flat grid: B*H may exceed grid dim 1
    tile = (program % num_tiles).to(tl.int32)
    bh = program // num_tiles
    b, h = bh // heads, bh % heads
    key_pos, row_block, row_valid, block_tile = _tile_rows(tile, block_k, blocks, BPT, TPB,
                                                           RPB, BLOCK_N)
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
    col_block = cols // QPB
    block = block_tile * BPT + col_block
    col_in_tile = (col_block < BPT) & (block < blocks)
    start = tl.load(Offsets + block, mask=col_in_tile, other=0)
    rows_routed = (tl.load(Offsets + block + 1, mask=col_in_tile, other=0) - start) * block_q
    num_steps = tl.cdiv(tl.max(rows_routed, 0), QPB)
    Q += b * stride_qb + h * stride_qh
    GradOut += b * stride_gb + h * stride_gh
    Lse += bh * num_q
    Delta += bh * num_q
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for step in range(num_steps):
        j = step * QPB + cols % QPB
        col_valid = col_in_tile & (j < rows_routed)
        group = tl.load(Order + start + j // block_q, mask=col_valid, other=0)
        q_pos = group * block_q + j % block_q
        col_mask = col_valid[:, None] & d_valid[None, :]
        q = tl.load(Q + q_pos[:, None] * stride_qn + d[None, :] * stride_qd, mask=col_mask,
                    other=0.0)
        do = tl.load(GradOut + q_pos[:, None] * stride_gn + d[None, :] * stride_gd,
                     mask=col_mask, other=0.0)
        lse = tl.load(Lse + q_pos, mask=col_valid, other=float('inf'))
        delta = tl.load(Delta + q_pos, mask=col_valid, other=0.0)
        scores = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * scale_log2
        admissible = (row_block[:, None] == col_block[None, :]) & col_valid[None, :] \
            & row_live[:, None]
        p = tl.where(admissible, tl.exp2(scores - lse[None, :]), 0.0)
        dv += tl.dot(p.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[None, :])
        dk += tl.dot(ds.to(q.dtype), q, input_precision=DOT_PRECISION)
    grad_offsets = bh * num_k * head_dim + key_pos[:, None] * head_dim + d[None, :]
    tl.store(GradK + grad_offsets, (dk * scale).to(GradK.dtype.element_ty), mask=row_mask)
    tl.store(GradV + grad_offsets, dv.to(GradV.dtype.element_ty), mask=row_mask)


def _transpose_index(index: Tensor, blocks: int):
    """Per index row (B or B*H of them): the groups sorted by routed block, and the offsets.

    Returns ``order`` int32 (rows, G*K) and ``offsets`` int32 (rows, M+1): the groups that
    route to block ``m`` are ``order[r, offsets[r, m]:offsets[r, m+1]]`` (-1 slots dropped).
    """
    slots = index.shape[-1]
    flat = index.reshape(-1, index.shape[-2] * slots)
    sorted_blocks, position = torch.sort(flat, dim=1, stable=True)
    order = torch.div(position, slots, rounding_mode='floor').to(torch.int32)
    bounds = torch.arange(blocks + 1, device=index.device, dtype=flat.dtype)
    offsets = torch.searchsorted(sorted_blocks, bounds.expand(flat.shape[0], -1).contiguous())
    return order.contiguous(), offsets.to(torch.int32)


def _index_strides(index: Tensor):
    """(batch, head, group, slot) strides; a shared (B, G, K) index gets head stride 0."""
    if index.dim() == 3:
        return index.stride(0), 0, index.stride(1), index.stride(2)
    return index.stride()


def _mask_args(key_padding_mask: Optional[Tensor], like: Tensor):
    if key_padding_mask is None:
        return like, 0, 0, False
    mask = key_padding_mask.view(torch.uint8)
    return mask, mask.stride(0), mask.stride(1), True


def _query_tiling(q: Tensor, index: Tensor, block_q: int, block_k: int, kind: str):
    """Launch arguments of the kernels that tile query rows ('fwd', 'dq')."""
    batch, heads, num_q, head_dim = q.shape
    groups = num_q // block_q
    slot_keys = index.shape[-1] * block_k
    block_m, block_n, num_warps, num_stages = _launch_config(kind, block_q, slot_keys)
    gpt, tpg, cpg, num_tiles, num_steps = _tiling(block_q, groups, block_m, block_n, slot_keys)
    grid = (num_tiles * batch * heads,)
    scalars = (num_tiles, heads, num_q, head_dim, groups, block_q, block_k, slot_keys, num_steps,
               gpt, tpg, min(block_q, block_m), cpg)
    meta = dict(DOT_PRECISION=_dot_precision(q), BLOCK_M=block_m, BLOCK_N=block_n,
                BLOCK_D=_block_d(head_dim), num_warps=num_warps, num_stages=num_stages)
    return grid, scalars, meta


def _dot_precision(q: Tensor) -> str:
    return 'ieee' if q.dtype == torch.float32 else 'tf32'


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


@torch.library.custom_op('dsa_ops::gather_attention_fwd', mutates_args=())
def gather_attention_fwd(q: Tensor, k: Tensor, v: Tensor, index: Tensor,
                         key_padding_mask: Optional[Tensor], block_q: int, block_k: int,
                         scale: float) -> tuple[Tensor, Tensor]:
    """Forward: (out (B, H, Nq, D) in q's dtype, lse (B, H, Nq) fp32, base 2, +inf if no key)."""
    batch, heads, num_q, head_dim = q.shape
    if q.numel() == 0 or index.shape[-1] == 0 or k.shape[2] == 0:
        return (torch.zeros(q.shape, dtype=q.dtype, device=q.device),
                torch.full((batch, heads, num_q), float('inf'), dtype=torch.float32,
                           device=q.device))
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, num_q), dtype=torch.float32, device=q.device)
    grid, scalars, meta = _query_tiling(q, index, block_q, block_k, 'fwd')
    mask, stride_mb, stride_mn, has_mask = _mask_args(key_padding_mask, index)
    _fwd_kernel[grid](
        q, k, v, index, mask, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *_index_strides(index), stride_mb, stride_mn,
        *out.stride(), *scalars, scale * LOG2E,
        HAS_MASK=has_mask, **meta)
    return out, lse


@gather_attention_fwd.register_fake
def _(q, k, v, index, key_padding_mask, block_q, block_k, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op('dsa_ops::gather_attention_bwd', mutates_args=())
def gather_attention_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                         lse: Tensor, index: Tensor, key_padding_mask: Optional[Tensor],
                         block_q: int, block_k: int,
                         scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Backward: (grad_q, grad_k, grad_v), each in the shape and dtype of its input.

    Two kernels, no atomics: dQ per query tile (also storing rowsum(dO * O)), then dK, dV per
    key tile over the transposed index.
    """
    batch, heads, num_q, head_dim = q.shape
    num_k = k.shape[2]
    if q.numel() == 0 or k.numel() == 0 or index.shape[-1] == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    grad_q = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    grad_k = torch.empty(k.shape, dtype=k.dtype, device=q.device)
    grad_v = torch.empty(v.shape, dtype=v.dtype, device=q.device)
    delta = torch.empty((batch, heads, num_q), dtype=torch.float32, device=q.device)
    mask, stride_mb, stride_mn, has_mask = _mask_args(key_padding_mask, index)
    grid, scalars, meta = _query_tiling(q, index, block_q, block_k, 'dq')
    _bwd_dq_kernel[grid](
        q, k, v, out, grad_out, lse, index, mask, grad_q, delta,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *grad_out.stride(),
        *grad_q.stride(), *_index_strides(index), stride_mb, stride_mn,
        *scalars, scale, scale * LOG2E, HAS_MASK=has_mask, **meta)

    blocks = num_k // block_k
    order, offsets = _transpose_index(index, blocks)
    csr_row_b, csr_row_h = (1, 0) if index.dim() == 3 else (heads, 1)
    block_m, block_n, num_warps, num_stages = _launch_config('dkdv', block_k, 0)
    blocks_per_tile = max(1, block_n // block_k)
    rows_per_block = block_m // blocks_per_tile
    if rows_per_block == 0:
        raise ValueError(f'dkdv tile BLOCK_M={block_m} is smaller than the {blocks_per_tile} '
                         f'key blocks packed per tile')
    tiles_per_block = triton.cdiv(block_k, block_n)
    num_tiles = triton.cdiv(blocks, blocks_per_tile) * tiles_per_block
    _bwd_dkdv_kernel[(num_tiles * batch * heads,)](
        q, k, v, grad_out, lse, delta, order, offsets, mask, grad_k, grad_v,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), stride_mb, stride_mn,
        num_tiles, heads, num_q, num_k, head_dim, blocks, block_q, block_k, order.shape[1],
        csr_row_b, csr_row_h, blocks_per_tile, tiles_per_block, min(block_k, block_n),
        rows_per_block, scale, scale * LOG2E,
        HAS_MASK=has_mask, DOT_PRECISION=_dot_precision(q), BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=_block_d(head_dim), num_warps=num_warps, num_stages=num_stages)
    return grad_q, grad_k, grad_v


@gather_attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, index, key_padding_mask, block_q, block_k, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, index, key_padding_mask, block_q, block_k, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, index, key_padding_mask)
    ctx.block_q, ctx.block_k, ctx.scale = block_q, block_k, scale


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, index, key_padding_mask = ctx.saved_tensors
    grad_q, grad_k, grad_v = gather_attention_bwd(grad_out, q, k, v, out, lse, index,
                                                  key_padding_mask, ctx.block_q, ctx.block_k,
                                                  ctx.scale)
    return grad_q, grad_k, grad_v, None, None, None, None, None


gather_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def triton_gather_attention(q: Tensor, k: Tensor, v: Tensor, index: Tensor, *, block_q: int,
                            block_k: int, key_padding_mask: Optional[Tensor],
                            scale: float) -> Tensor:
    """Fused gather attention (arguments validated by :func:`ops.gather_attention`)."""
    out, _ = gather_attention_fwd(q, k, v, index, key_padding_mask, block_q, block_k, scale)
    return out
