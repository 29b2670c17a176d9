"""Fused Triton kernels for :func:`ops.layer_norm`: launchers, autograd, custom ops.

Tiling. x is seen as (rows, C) with unit channel stride; a program owns ``BLOCK_M`` rows by
``BLOCK_C = next_pow2(C)`` channels (the whole row), so each row's statistics are one in-tile
reduction and small C still moves enough bytes per program (``BLOCK_M * BLOCK_C`` ~4K
elements). Rows may lie at two strides (``row = outer * inner_rows + inner``: any leading
dims that collapse to at most two (size, stride) pairs), so slices such as ``x[:, :, ::2]`` are
read in place; other layouts are copied first.

* Forward (``_fwd_kernel``, grid ``cdiv(rows, BLOCK_M)``): x (rounded to the output dtype when
  autocast casts it) in fp32, mean, rstd = 1 / sqrt(var + eps), ``y = (x - mean) * rstd * w +
  b`` in fp32 (w and b in their own dtype, read as fp32), one store in the output dtype; mean
  and rstd (fp32, one per row) are stored for the backward.
* Backward (``_bwd_kernel``, grid ``cdiv(row_blocks, blocks_per_program)``, at most the
  table's ``programs``): a program walks its consecutive row blocks; per block it recomputes
  ``xhat`` from x, mean and rstd, writes ``dx = rstd * (w dy - mean(w dy) - xhat mean(xhat w
  dy))`` in x's dtype and accumulates ``sum(dy xhat)`` and ``sum(dy)`` per channel in fp32;
  at the end it writes them to a partial buffer (2, programs, C) that torch ``sum(1)``
  reduces. No atomics, so results are deterministic.

Eager calls go through a ``torch.autograd.Function`` straight to the launchers; under
``torch.compile`` or export through the custom ops ``dsa_ops::layer_norm_fwd`` / ``_bwd``
(fake implementations for tracing, ``register_autograd``).
"""
import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from ops._launch import fast_launcher
from ops._sizes import cdiv, next_power_of_2

MAX_CHANNELS = 8192  # widest row in one tile; wider rows take the torch reference

# Rows keyed on BLOCK_C = next_pow2(C). fwd: (BLOCK_M, num_warps); bwd: (BLOCK_M, num_warps,
# programs), programs capping the backward grid (each program walks consecutive row blocks, so
# the dweight/dbias partials stay small). Forward: 4096-element tiles (32 fp32 per thread with
# 4 warps), 8192 at C > 4096. Backward: the rows `tools/benchmark.py layernorm --tune --kinds
# bwd` chose on an H200 for C = 64-512 (2026-12-01, docs/benchmarks.md "layernorm"): one or
# two warps of 32-64 fp32 per thread and 264-2112 programs, 2.5-4x faster than the earlier
# 8-warp rows; BLOCK_C >= 1024 (not tuned): 16-64 fp32 per thread, 264 programs.
KINDS = ('fwd', 'bwd')
_TUNED_BWD = {64: (16, 1, 2112), 128: (8, 1, 2112), 256: (8, 1, 1056), 512: (8, 2, 264)}
_CONFIGS = {
    'fwd': {1 << k: (max(1, 4096 >> k), 4 if k < 13 else 8) for k in range(14)},
    'bwd': {1 << k: _TUNED_BWD.get(1 << k, (1024 >> k, 1, 2112) if k < 6 else
                                   (max(1, 4096 >> k), max(1, (1 << k) >> 9), 264))
            for k in range(14)},
}
_ROW_LENGTHS = {'fwd': 2, 'bwd': 3}

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _is_power_of_2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def tile_config(kind: str, channels: int) -> tuple:
    """The table row of kernel ``kind`` for rows of ``channels`` (keyed on next_pow2(C))."""
    return _CONFIGS[kind][next_power_of_2(channels)]


def set_tile_configs(table: dict) -> None:
    """Replace rows of ``_CONFIGS``: ``{kind: {BLOCK_C: row}}``, fwd rows (BLOCK_M, num_warps),
    bwd rows (BLOCK_M, num_warps, programs); BLOCK_C, BLOCK_M and num_warps powers of two
    (tuning sweeps; JSON keys may be strings)."""
    for kind, rows in table.items():
        if kind not in _CONFIGS:
            raise ValueError(f'kind must be one of {KINDS}, got {kind!r}')
        for block_c, row in rows.items():
            block_c, row = int(block_c), tuple(int(v) for v in row)
            if block_c not in _CONFIGS[kind]:
                raise ValueError(f'{kind} BLOCK_C must be a power of two <= {MAX_CHANNELS}, got '
                                 f'{block_c}')
            if (len(row) != _ROW_LENGTHS[kind] or not all(_is_power_of_2(v) for v in row[:2])
                    or row[-1] < 1):
                raise ValueError(f'{kind} row must be (BLOCK_M, num_warps' +
                                 (', programs)' if kind == 'bwd' else ')') +
                                 f' with powers of two, got {row}')
            _CONFIGS[kind][block_c] = row
    _plan.cache_clear()


@triton.jit
def _row_offsets(rows, inner_rows, stride_outer, stride_inner, TWO_LEVEL: tl.constexpr):
    """int64 element offsets of the first element of each row."""
    rows = rows.to(tl.int64)
    if TWO_LEVEL:
        return (rows // inner_rows) * stride_outer + (rows % inner_rows) * stride_inner
    return rows * stride_inner


@triton.jit
def normalize_rows(x, mask, c, c_valid, channels, eps, W, B, HAS_W: tl.constexpr,
                   HAS_B: tl.constexpr):
    """(y, mean, rstd): the LayerNorm of fp32 rows x (BLOCK_M, BLOCK_C), zero where ``mask``
    is False, ``(x - mean) * rstd * W + B`` in fp32 (W, B per channel ``c``, any float dtype);
    mean and rstd = 1 / sqrt(var + eps) per row. Shared with ops._triton_ln_mlp."""
    mean = tl.sum(x, 1) / channels
    centred = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(centred * centred, 1) / channels + eps)
    y = centred * rstd[:, None]
    if HAS_W:
        y = y * tl.load(W + c, mask=c_valid, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(B + c, mask=c_valid, other=0.0).to(tl.float32)[None, :]
    return y, mean, rstd


@triton.jit
def _fwd_kernel(X, W, B, Y, Mean, Rstd,
                n_rows, channels, inner_rows, stride_outer, stride_inner, eps,
                HAS_W: tl.constexpr, HAS_B: tl.constexpr, STORE_STATS: tl.constexpr,
                TWO_LEVEL: tl.constexpr, ROUND_X: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Y = LN(X rounded to ROUND_X) * W + B in fp32, stored in Y's dtype; Mean, Rstd (fp32)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_C)
    row_valid, c_valid = rows < n_rows, c < channels
    mask = row_valid[:, None] & c_valid[None, :]
    x_offsets = _row_offsets(rows, inner_rows, stride_outer, stride_inner, TWO_LEVEL)
    x = tl.load(X + x_offsets[:, None] + c[None, :], mask=mask, other=0.0)
    y, mean, rstd = normalize_rows(x.to(ROUND_X).to(tl.float32), mask, c, c_valid, channels,
                                   eps, W, B, HAS_W, HAS_B)
    y_offsets = rows.to(tl.int64) * channels
    tl.store(Y + y_offsets[:, None] + c[None, :], y.to(Y.dtype.element_ty), mask=mask)
    if STORE_STATS:
        tl.store(Mean + rows, mean, mask=row_valid)
        tl.store(Rstd + rows, rstd, mask=row_valid)


@triton.jit
def _bwd_kernel(X, W, GradOut, Mean, Rstd, Residual, GradX, Partials,
                n_rows, channels, blocks_per_program,
                x_inner_rows, x_stride_outer, x_stride_inner,
                g_inner_rows, g_stride_outer, g_stride_inner,
                HAS_W: tl.constexpr, NEED_DX: tl.constexpr, NEED_DW: tl.constexpr,
                NEED_DB: tl.constexpr, X_TWO_LEVEL: tl.constexpr, G_TWO_LEVEL: tl.constexpr,
                HAS_RESIDUAL: tl.constexpr, ROUND_X: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_C: tl.constexpr):
    """GradX (plus Residual, contiguous rows, with HAS_RESIDUAL) over this program's row
    blocks; Partials[0 | 1, program, c] = its sums of dy * xhat (dweight) and dy (dbias)."""
    program = tl.program_id(0)
    c = tl.arange(0, BLOCK_C)
    c_valid = c < channels
    if HAS_W:
        w = tl.load(W + c, mask=c_valid, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_C], tl.float32)
    db_acc = tl.zeros([BLOCK_C], tl.float32)
    for i in range(blocks_per_program):
        rows = (program * blocks_per_program + i) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_valid = rows < n_rows
        mask = row_valid[:, None] & c_valid[None, :]
        g_offsets = _row_offsets(rows, g_inner_rows, g_stride_outer, g_stride_inner,
                                 G_TWO_LEVEL)
        dy = tl.load(GradOut + g_offsets[:, None] + c[None, :], mask=mask,
                     other=0.0).to(tl.float32)
        if NEED_DB:
            db_acc += tl.sum(dy, 0)
        if NEED_DX or NEED_DW:
            x_offsets = _row_offsets(rows, x_inner_rows, x_stride_outer, x_stride_inner,
                                     X_TWO_LEVEL)
            x = tl.load(X + x_offsets[:, None] + c[None, :], mask=mask, other=0.0)
            mean = tl.load(Mean + rows, mask=row_valid, other=0.0)
            rstd = tl.load(Rstd + rows, mask=row_valid, other=0.0)
            # Not zeroed in the tails: dy is 0 there, so they add nothing to the sums.
            xhat = (x.to(ROUND_X).to(tl.float32) - mean[:, None]) * rstd[:, None]
            if NEED_DW:
                dw_acc += tl.sum(dy * xhat, 0)
            if NEED_DX:
                wdy = dy
                if HAS_W:
                    wdy = dy * w[None, :]
                c1 = tl.sum(xhat * wdy, 1) / channels
                c2 = tl.sum(wdy, 1) / channels
                dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
                dx_offsets = rows.to(tl.int64)[:, None] * channels + c[None, :]
                if HAS_RESIDUAL:
                    dx += tl.load(Residual + dx_offsets, mask=mask, other=0.0).to(tl.float32)
                tl.store(GradX + dx_offsets, dx.to(GradX.dtype.element_ty), mask=mask)
    partial = program.to(tl.int64) * channels + c
    if NEED_DW:
        tl.store(Partials + partial, dw_acc, mask=c_valid)
    if NEED_DB:
        tl.store(Partials + tl.num_programs(0).to(tl.int64) * channels + partial, db_acc,
                 mask=c_valid)


@functools.lru_cache(maxsize=1024)
def _plan(kind: str, n_rows: int, channels: int, config: Optional[tuple]):
    """(grid, blocks per program, meta-parameters) of one launch. ``config`` overrides the
    table row (tuning)."""
    row = config or tile_config(kind, channels)
    block_m, num_warps = row[:2]
    blocks = cdiv(n_rows, block_m)
    per_program = cdiv(blocks, row[2]) if kind == 'bwd' else 1
    grid = (cdiv(blocks, per_program),)
    return grid, per_program, dict(BLOCK_M=block_m, BLOCK_C=next_power_of_2(channels),
                                   num_warps=num_warps)


def _as_rows(t: Tensor):
    """(t or a contiguous copy, inner_rows, stride_outer, stride_inner): t's row r (leading
    dims flattened) starts at ``(r // inner_rows) * stride_outer + (r % inner_rows) *
    stride_inner`` elements, channels at unit stride. Copies when the leading dims do not
    collapse to two (size, stride) pairs or the channel stride is not 1."""
    if t.shape[-1] != 1 and t.stride(-1) != 1:
        t = t.contiguous()
    groups = []  # (size, stride) of the collapsed leading dims, outer first
    for size, stride in zip(t.shape[:-1], t.stride()[:-1]):
        if size == 1:
            continue
        if groups and groups[-1][1] == stride * size:
            groups[-1] = (groups[-1][0] * size, stride)
        else:
            groups.append((size, stride))
    if len(groups) > 2:
        return _as_rows(t.contiguous())
    if len(groups) == 2:
        (_, stride_outer), (inner, stride_inner) = groups
        return t, inner, stride_outer, stride_inner
    rows = t.numel() // t.shape[-1]
    return t, max(rows, 1), 0, groups[0][1] if groups else t.shape[-1]


def stats_shape(x: Tensor) -> tuple:
    return (x.numel() // x.shape[-1],)


def forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
            out_dtype: torch.dtype, store_stats: bool = True, config: Optional[tuple] = None):
    """(y, mean, rstd): y in x's shape, contiguous, ``out_dtype`` (x rounded to it first);
    mean and rstd fp32 (rows,), empty when not ``store_stats``."""
    channels = x.shape[-1]
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    n_rows = stats_shape(x)[0]
    stats = [x.new_empty(n_rows if store_stats else 0, dtype=torch.float32) for _ in range(2)]
    if n_rows:
        grid, _, meta = _plan('fwd', n_rows, channels, config)
        x_rows, inner, stride_outer, stride_inner = _as_rows(x)
        fast_launcher(_fwd_kernel)[grid](
            x_rows, x if weight is None else weight, x if bias is None else bias, y, *stats,
            n_rows, channels, inner, stride_outer, stride_inner, eps,
            HAS_W=weight is not None, HAS_B=bias is not None, STORE_STATS=store_stats,
            TWO_LEVEL=inner != n_rows, ROUND_X=_TL_DTYPES[out_dtype], **meta)
    return y, stats[0], stats[1]


def backward(grad_out: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
             out_dtype: torch.dtype, need_dx: bool, need_dw: bool, need_db: bool,
             config: Optional[tuple] = None, residual: Optional[Tensor] = None):
    """(grad_x in x's dtype or None, grad_weight in weight's dtype or None, grad_bias (fp32,
    the caller casts it to bias's dtype) or None). x is rounded to ``out_dtype`` as forward.
    ``residual`` (x's shape, with ``need_dx``): a gradient that grad_x also holds (added in
    fp32 before its one rounding), as a pre-norm block's skip connection."""
    channels = x.shape[-1]
    n_rows = stats_shape(x)[0]
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_dx else None
    if residual is not None:
        residual = residual.contiguous()
    need_dw = need_dw and weight is not None
    if n_rows == 0:
        partials = x.new_zeros((2, 1, channels), dtype=torch.float32)
    else:
        grid, per_program, meta = _plan('bwd', n_rows, channels, config)
        partials = (x.new_empty((2, grid[0], channels), dtype=torch.float32)
                    if need_dw or need_db else None)
        x_rows, x_inner, x_outer, x_stride = _as_rows(x)
        g_rows, g_inner, g_outer, g_stride = _as_rows(grad_out)
        fast_launcher(_bwd_kernel)[grid](
            x_rows, x if weight is None else weight, g_rows, mean, rstd,
            x if residual is None else residual, x if grad_x is None else grad_x,
            x if partials is None else partials,
            n_rows, channels, per_program, x_inner, x_outer, x_stride, g_inner, g_outer,
            g_stride, HAS_W=weight is not None, NEED_DX=need_dx, NEED_DW=need_dw,
            NEED_DB=need_db, X_TWO_LEVEL=x_inner != n_rows, G_TWO_LEVEL=g_inner != n_rows,
            HAS_RESIDUAL=residual is not None, ROUND_X=_TL_DTYPES[out_dtype], **meta)
    # Two sums, not partials.sum(1): the gradients must not share storage (custom-op outputs).
    grad_weight = partials[0].sum(0).to(weight.dtype) if need_dw else None
    grad_bias = partials[1].sum(0) if need_db else None
    return grad_x, grad_weight, grad_bias


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op('dsa_ops::layer_norm_fwd', mutates_args=())
def layer_norm_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                   out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Forward: (y contiguous in out_dtype, mean, rstd), the statistics fp32 (rows,)."""
    return forward(x, weight, bias, eps, out_dtype)


@layer_norm_fwd.register_fake
def _(x, weight, bias, eps, out_dtype):
    stats = stats_shape(x)
    return (x.new_empty(x.shape, dtype=out_dtype), x.new_empty(stats, dtype=torch.float32),
            x.new_empty(stats, dtype=torch.float32))


@torch.library.custom_op('dsa_ops::layer_norm_bwd', mutates_args=())
def layer_norm_bwd(grad_out: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor,
                   rstd: Tensor, out_dtype: torch.dtype, need_dx: bool, need_dw: bool,
                   need_db: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Backward: (grad_x, grad_weight, grad_bias fp32); an unneeded one is an empty (0,)
    tensor."""
    grad_x, grad_weight, grad_bias = backward(grad_out, x, weight, mean, rstd, out_dtype,
                                              need_dx, need_dw, need_db)
    return (x.new_empty(0) if grad_x is None else grad_x,
            x.new_empty(0) if grad_weight is None else grad_weight,
            x.new_empty(0, dtype=torch.float32) if grad_bias is None else grad_bias)


@layer_norm_bwd.register_fake
def _(grad_out, x, weight, mean, rstd, out_dtype, need_dx, need_dw, need_db):
    channels = x.shape[-1]
    need_dw = need_dw and weight is not None
    return (x.new_empty(x.shape if need_dx else 0),
            x.new_empty(channels if need_dw else 0,
                        dtype=weight.dtype if need_dw else x.dtype),
            x.new_empty(channels if need_db else 0, dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    x, weight, bias, _, out_dtype = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.out_dtype = out_dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad_out, _grad_mean, _grad_rstd):
    x, weight, mean, rstd = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    grad_x = grad_weight = grad_bias = None
    if need_x or need_w or need_b:
        grad_x, grad_weight, grad_bias = layer_norm_bwd(grad_out, x, weight, mean, rstd,
                                                        ctx.out_dtype, need_x, need_w, need_b)
    return (grad_x if need_x else None, grad_weight if need_w else None,
            grad_bias.to(ctx.bias_dtype) if need_b else None, None, None)


layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- eager path


class _LayerNorm(torch.autograd.Function):
    """Eager autograd over the launchers, without the custom-op dispatch of the traced path."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, out_dtype):
        y, mean, rstd = forward(x, weight, bias, eps, out_dtype)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.out_dtype = out_dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight, mean, rstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x, grad_weight, grad_bias = backward(grad_out, x, weight, mean, rstd,
                                                  ctx.out_dtype, need_x, need_w, need_b)
        return (grad_x, grad_weight, None if grad_bias is None else
                grad_bias.to(ctx.bias_dtype), None, None)


def triton_layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                      out_dtype: torch.dtype, traced: bool) -> Tensor:
    """Fused LayerNorm over the last dim (arguments validated by :func:`ops.layer_norm`).

    ``traced`` (compiling or exporting) routes through the custom ops; eager calls launch the
    kernels directly, through ``_LayerNorm`` when a gradient is needed (only then are the
    statistics stored).
    """
    if traced:
        return layer_norm_fwd(x, weight, bias, eps, out_dtype)[0]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, weight, bias)):
        return _LayerNorm.apply(x, weight, bias, eps, out_dtype)
    return forward(x, weight, bias, eps, out_dtype, store_stats=False)[0]
