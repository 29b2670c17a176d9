"""Fused Triton kernels for :func:`ops.gather_attention`, registered as torch custom ops.

Tiling. A program owns one tile of ``BLOCK_M`` query rows of one (batch, head):
* ``block_q <= BLOCK_M``: the tile packs ``GPT = BLOCK_M // block_q`` whole query groups;
* ``block_q > BLOCK_M``: one group spans ``TPG = cdiv(block_q, BLOCK_M)`` tiles.
Each step loads ``BLOCK_N`` key rows, ``CPG = BLOCK_N // GPT`` for each packed group, read in
place through the index (``key = index[g, j // block_k] * block_k + j % block_k`` for the
group's ``j``-th routed key), and scores only (row group == column group) pairs. So any block
size works (1, 4, 49, 273, 90...) and the routed keys are never copied.

The forward keeps an online softmax and stores the log-sum-exp (base 2, fp32, B*H*Nq). The
backward recomputes the probabilities, accumulates dQ in registers and adds dK, dV into fp32
buffers with atomics (several query groups may route to one key block).
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = 1.4426950408889634

# (block_q limit, BLOCK_M, BLOCK_N): the first row whose limit is >= block_q applies.
_FWD_TILES = ((1, 16, 64), (4, 16, 64), (16, 16, 64), (32, 32, 64), (None, 64, 64))
_BWD_TILES = ((1, 16, 64), (4, 16, 64), (16, 16, 64), (32, 32, 64), (None, 64, 64))
# Overrides for tuning sweeps: {'fwd' or 'bwd': (BLOCK_M, BLOCK_N, num_warps, num_stages)}.
TILE_OVERRIDES: dict = {}


def _pick_tiles(table, block_q: int):
    for limit, block_m, block_n in table:
        if limit is None or block_q <= limit:
            return block_m, block_n


def _launch_config(kind: str, block_q: int, head_dim: int):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the forward ('fwd') or backward ('bwd')."""
    if kind in TILE_OVERRIDES:
        return TILE_OVERRIDES[kind]
    block_m, block_n = _pick_tiles(_FWD_TILES if kind == 'fwd' else _BWD_TILES, block_q)
    if kind == 'bwd' and head_dim > 64:
        block_n = min(block_n, 32)
    num_warps = 4 if block_m * block_n >= 64 * 64 else 2
    return block_m, block_n, num_warps, 2


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
                heads, num_q, head_dim, groups, block_q, block_k, slot_keys, num_steps,
                GPT, TPG, RPG, CPG, scale_log2,
                HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    tile = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
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
def _bwd_kernel(Q, K, V, Out, GradOut, Lse, Index, Mask, GradQ, GradK, GradV,
                stride_qb, stride_qh, stride_qn, stride_qd,
                stride_kb, stride_kh, stride_kn, stride_kd,
                stride_vb, stride_vh, stride_vn, stride_vd,
                stride_ob, stride_oh, stride_on, stride_od,
                stride_gb, stride_gh, stride_gn, stride_gd,
                stride_dqb, stride_dqh, stride_dqn, stride_dqd,
                stride_ib, stride_ih, stride_ig, stride_ik,
                stride_mb, stride_mn,
                heads, num_q, num_k, head_dim, groups, block_q, block_k, slot_keys, num_steps,
                GPT, TPG, RPG, CPG, scale, scale_log2,
                HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """GradQ (B, H, Nq, D) in q's dtype; GradK, GradV contiguous fp32 (B, H, Nk, D), zeroed."""
    tile = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
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
    lse = tl.load(Lse + bh * num_q + q_pos, mask=row_valid, other=float('inf'))
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    Index += b * stride_ib + h * stride_ih
    Mask += b * stride_mb
    GradK += bh * num_k * head_dim
    GradV += bh * num_k * head_dim
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
        dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION) * scale
        grad_offsets = key[:, None] * head_dim + d[None, :]
        tl.atomic_add(GradV + grad_offsets, dv, mask=kv_mask, sem='relaxed')
        tl.atomic_add(GradK + grad_offsets, dk, mask=kv_mask, sem='relaxed')
    tl.store(GradQ + b * stride_dqb + h * stride_dqh + q_pos[:, None] * stride_dqn
             + d[None, :] * stride_dqd, (dq * scale).to(GradQ.dtype.element_ty), mask=row_mask)


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


def _common_args(q: Tensor, k: Tensor, index: Tensor, block_q: int, block_k: int, kind: str):
    batch, heads, num_q, head_dim = q.shape
    groups = num_q // block_q
    slot_keys = index.shape[-1] * block_k
    block_m, block_n, num_warps, num_stages = _launch_config(kind, block_q, head_dim)
    gpt, tpg, cpg, num_tiles, num_steps = _tiling(block_q, groups, block_m, block_n, slot_keys)
    block_d = max(16, triton.next_power_of_2(head_dim))
    precision = 'ieee' if q.dtype == torch.float32 else 'tf32'
    return dict(grid=(num_tiles, batch * heads), groups=groups, slot_keys=slot_keys,
                num_steps=num_steps, gpt=gpt, tpg=tpg, cpg=cpg, block_m=block_m,
                block_n=block_n, block_d=block_d, num_warps=num_warps, num_stages=num_stages,
                precision=precision)


@torch.library.custom_op('dsa_ops::gather_attention_fwd', mutates_args=())
def gather_attention_fwd(q: Tensor, k: Tensor, v: Tensor, index: Tensor,
                         key_padding_mask: Optional[Tensor], block_q: int, block_k: int,
                         scale: float) -> tuple[Tensor, Tensor]:
    """Forward: (out (B, H, Nq, D) in q's dtype, lse (B, H, Nq) fp32, base 2, +inf if no key)."""
    batch, heads, num_q, head_dim = q.shape
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.full((batch, heads, num_q), float('inf'), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or index.shape[-1] == 0 or k.shape[2] == 0:
        return out, lse
    a = _common_args(q, k, index, block_q, block_k, 'fwd')
    mask, stride_mb, stride_mn, has_mask = _mask_args(key_padding_mask, index)
    _fwd_kernel[a['grid']](
        q, k, v, index, mask, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *_index_strides(index), stride_mb, stride_mn,
        *out.stride(),
        heads, num_q, head_dim, a['groups'], block_q, block_k, a['slot_keys'], a['num_steps'],
        a['gpt'], a['tpg'], min(block_q, a['block_m']), a['cpg'], scale * LOG2E,
        HAS_MASK=has_mask, DOT_PRECISION=a['precision'], BLOCK_M=a['block_m'],
        BLOCK_N=a['block_n'], BLOCK_D=a['block_d'], num_warps=a['num_warps'],
        num_stages=a['num_stages'])
    return out, lse


@gather_attention_fwd.register_fake
def _(q, k, v, index, key_padding_mask, block_q, block_k, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op('dsa_ops::gather_attention_bwd', mutates_args=())
def gather_attention_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                         lse: Tensor, index: Tensor, key_padding_mask: Optional[Tensor],
                         block_q: int, block_k: int,
                         scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Backward: (grad_q, grad_k, grad_v), each in the shape and dtype of its input."""
    batch, heads, num_q, head_dim = q.shape
    num_k = k.shape[2]
    grad_q = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    grad_k = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    grad_v = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    if q.numel() and k.numel() and index.shape[-1]:
        a = _common_args(q, k, index, block_q, block_k, 'bwd')
        mask, stride_mb, stride_mn, has_mask = _mask_args(key_padding_mask, index)
        _bwd_kernel[a['grid']](
            q, k, v, out, grad_out, lse, index, mask, grad_q, grad_k, grad_v,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *grad_out.stride(),
            *grad_q.stride(), *_index_strides(index), stride_mb, stride_mn,
            heads, num_q, num_k, head_dim, a['groups'], block_q, block_k, a['slot_keys'],
            a['num_steps'], a['gpt'], a['tpg'], min(block_q, a['block_m']), a['cpg'], scale,
            scale * LOG2E,
            HAS_MASK=has_mask, DOT_PRECISION=a['precision'], BLOCK_M=a['block_m'],
            BLOCK_N=a['block_n'], BLOCK_D=a['block_d'], num_warps=a['num_warps'],
            num_stages=a['num_stages'])
    return grad_q, grad_k.to(k.dtype), grad_v.to(v.dtype)


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
