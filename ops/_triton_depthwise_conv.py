"""Fused Triton kernels for :func:`ops.depthwise_conv2d` (NHWC): launchers, autograd, custom ops.

Tiling. Channels are the fast axis, so loads from an NHWC tensor with unit channel stride
vectorize; out-of-map positions load zeros, so 'same' zero padding needs no copy.

* Forward (``_conv_rows_kernel``, grid ``(B * tiles, cdiv(C, BLOCK_C))``): a program owns
  ``BLOCK_H`` rows x ``BLOCK_W`` columns of one image by ``BLOCK_C`` channels and slides down
  its rows. It loads each input row once per column tap (``kw`` loads, the halo rows
  included) and adds it, times the matching kernel row, into the ``kh`` accumulators of the
  output rows it touches (a tuple of ``(BLOCK_W, BLOCK_C)`` fp32 tiles, rotated per row); the
  finished top row gets bias and the add-tensor and is stored once in the output dtype. So
  each input element is loaded ``kw (1 + (kh - 1) / BLOCK_H)`` times, not ``kh * kw``, and the
  ``kh * kw`` weight vectors stay in registers.
* dx: the same kernel on dy with the flipped kernel.
* dweight, dbias (``_dw_rows_kernel``, the forward's grid): a program slides down its strip
  the same way, keeping the kh dy rows that meet the current x row in a rotating window and
  ``kh * kw`` (BLOCK_W, BLOCK_C) fp32 accumulators, one per tap; it then writes each tap's sum
  over its columns, and the sum of dy (for dbias), to an fp32 partial buffer
  (programs, kh * kw + 1, C) that torch ``sum(0)`` reduces. No atomics, so results are
  deterministic.

Eager calls go through a ``torch.autograd.Function`` straight to the launchers; under
``torch.compile`` or export through the custom ops ``dsa_ops::depthwise_conv2d_fwd`` / ``_bwd``
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

# Tile rows per kernel and tile class '<kernel rows>/<element bits>': '3/..' serves kernels of
# up to 3 rows, '5/..' taller ones; '../16' inputs of fp16/bf16, '../32' fp32 ones (the tensor
# the kernel slides over: x forward and for dweight, dy for dx). A row is (rows per strip
# BLOCK_H, widest BLOCK_W, widest BLOCK_C, num_warps). Each is the row with the least mean
# slowdown over its class's shapes in `python tools/benchmark.py dwconv --tune`
# on an H200 (2026-12-01; docs/ops.md): '../16' from the bf16 sweeps, '3/32' from the
# --autocast sweep (BiFormer's 3x3 pos_embed on the fp32 residual stream under AMP); '5/32'
# was not swept and takes the 16-bit rows.
KINDS = ('fwd', 'dx', 'dw')
TILE_CLASSES = ('3/16', '3/32', '5/16', '5/32')
_CONFIGS = {'fwd': {'3/16': (32, 8, 64, 2), '3/32': (32, 8, 64, 2),
                    '5/16': (32, 8, 32, 2), '5/32': (32, 8, 32, 2)},
            'dx': {'3/16': (32, 8, 128, 2), '3/32': (32, 8, 64, 2),
                   '5/16': (32, 8, 32, 2), '5/32': (32, 8, 32, 2)},
            'dw': {'3/16': (32, 8, 32, 2), '3/32': (32, 8, 32, 4),
                   '5/16': (32, 8, 32, 2), '5/32': (32, 8, 32, 2)}}

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def tile_class(kernel_h: int, dtype: torch.dtype) -> str:
    """The ``_CONFIGS`` class of a kernel with ``kernel_h`` rows sliding over ``dtype``."""
    return f'{3 if kernel_h <= 3 else 5}/{32 if dtype.itemsize >= 4 else 16}'


def _is_power_of_2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def config_for(kind: str, row: tuple, height: int, width: int, channels: int):
    """(BLOCK_H, BLOCK_W, BLOCK_C, num_warps) that a row (rows per strip, widest BLOCK_W,
    widest BLOCK_C, num_warps) of kernel ``kind`` gives for an H x W x C map: BLOCK_H splits H
    into cdiv(H, rows) equal strips, BLOCK_W = min(widest, next_pow2(W)), BLOCK_C =
    min(widest, next_pow2(C))."""
    rows, widest_w, widest_c, num_warps = row
    return (cdiv(height, cdiv(height, rows)) if height else 1,
            min(widest_w, next_power_of_2(width)), min(widest_c, next_power_of_2(channels)),
            num_warps)


def tile_config(kind: str, tile_cls: str, height: int, width: int, channels: int):
    """(BLOCK_H, BLOCK_W, BLOCK_C, num_warps) of kernel ``kind`` in tile class ``tile_cls``
    (:func:`tile_class`) on an H x W x C map."""
    return config_for(kind, _CONFIGS[kind][tile_cls], height, width, channels)


def set_tile_configs(table: dict) -> None:
    """Replace rows of ``_CONFIGS``: ``{kind: {tile class: row}}``, each row 4 powers of two
    (tuning sweeps)."""
    for kind, rows in table.items():
        if kind not in _CONFIGS:
            raise ValueError(f'kind must be one of {KINDS}, got {kind!r}')
        for tile_cls, row in rows.items():
            if tile_cls not in TILE_CLASSES:
                raise ValueError(f'tile class must be one of {TILE_CLASSES}, got {tile_cls!r}')
            row = tuple(int(v) for v in row)
            if len(row) != 4 or not all(_is_power_of_2(v) for v in row):
                raise ValueError(f'{kind} row must be 4 powers of two (BLOCK_H or BLOCK_P, '
                                 f'BLOCK_W, BLOCK_C, num_warps), got {row}')
            _CONFIGS[kind][tile_cls] = row
    _plan.cache_clear()


@triton.jit
def _strip(X, stride_xb, stride_xw, stride_xc, channels, tiles_w, tiles_per_image,
           BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's id, image b (int64), first row, columns j, channels c and which exist,
    and X's pointers at row 0 of its columns and channels."""
    program = tl.program_id(0)
    b = (program // tiles_per_image).to(tl.int64)
    tile = program % tiles_per_image
    row0 = (tile // tiles_w) * BLOCK_H
    j = (tile % tiles_w) * BLOCK_W + tl.arange(0, BLOCK_W)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    x_columns = (X + b * stride_xb + (j.to(tl.int64) * stride_xw)[:, None]
                 + (c * stride_xc)[None, :])
    return program, b, row0, j, c, c < channels, x_columns


@triton.jit
def _row_tap(x_columns, r, j, c_valid, dj, height, width, stride_h, stride_w,
             ROUND: tl.constexpr):
    """fp32 (BLOCK_W, BLOCK_C) of X at row r, columns j + dj (rounded to ROUND; zero outside
    the map)."""
    jj = j + dj
    valid = (r >= 0) & (r < height) & (jj >= 0) & (jj < width)
    xv = tl.load(x_columns + (r * stride_h + dj * stride_w), mask=valid[:, None] & c_valid[None, :],
                 other=0.0)
    return xv.to(ROUND).to(tl.float32)


@triton.jit
def _conv_rows_kernel(X, Wt, Bias, Add, Out,
                      stride_xb, stride_xh, stride_xw, stride_xc,
                      stride_wc, stride_wh, stride_ww, stride_bias,
                      stride_ab, stride_ah, stride_aw, stride_ac,
                      stride_ob, stride_oh, stride_ow,
                      height, width, channels, tiles_w, tiles_per_image,
                      KH: tl.constexpr, KW: tl.constexpr, SIGN: tl.constexpr,
                      HAS_BIAS: tl.constexpr, HAS_ADD: tl.constexpr, ROUND_X: tl.constexpr,
                      COMPUTE: tl.constexpr,
                      BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """Out = conv(X) + bias + add over this program's BLOCK_H rows x BLOCK_W columns x BLOCK_C
    channels; SIGN = -1 convolves with the flipped kernel (dx). X is rounded to ROUND_X,
    weight and bias to COMPUTE; fp32 accumulation. Out has unit channel stride; it may be Add
    itself (each element is read, then written, by the same program)."""
    program, b, row0, j, c, c_valid, x_columns = _strip(
        X, stride_xb, stride_xw, stride_xc, channels, tiles_w, tiles_per_image, BLOCK_H,
        BLOCK_W, BLOCK_C)
    # taps[u * KW + v]: the weight applied to input offset (u - KH//2, v - KW//2), per channel.
    taps = ()
    for u in tl.static_range(KH):
        for v in tl.static_range(KW):
            wu = u if SIGN == 1 else KH - 1 - u
            wv = v if SIGN == 1 else KW - 1 - v
            w = tl.load(Wt + c * stride_wc + wu * stride_wh + wv * stride_ww, mask=c_valid,
                        other=0.0)
            taps = taps + (w.to(COMPUTE).to(tl.float32)[None, :],)
    # acc[k] holds output row r - KH//2 + k while input row r is added in.
    acc = ()
    for k in tl.static_range(KH):
        acc = acc + (tl.zeros([BLOCK_W, BLOCK_C], tl.float32),)
    out_mask_wc = (j < width)[:, None] & c_valid[None, :]
    for r in range(row0 - KH // 2, row0 + BLOCK_H + KH // 2):
        r64 = b * 0 + r  # int64 row offsets
        for v in tl.static_range(KW):
            xv = _row_tap(x_columns, r64, j, c_valid, v - KW // 2, height, width, stride_xh,
                          stride_xw, ROUND_X)
            updated = ()
            for k in tl.static_range(KH):
                updated = updated + (acc[k] + xv * taps[(KH - 1 - k) * KW + v],)
            acc = updated
        out_row = r64 - KH // 2
        result = acc[0]
        mask = out_mask_wc & (out_row >= row0) & (out_row < height)
        if HAS_BIAS:
            bias = tl.load(Bias + c * stride_bias, mask=c_valid, other=0.0)
            result += bias.to(COMPUTE).to(tl.float32)[None, :]
        if HAS_ADD:
            add_offsets = (b * stride_ab + out_row * stride_ah
                           + (j.to(tl.int64) * stride_aw)[:, None] + (c * stride_ac)[None, :])
            result += tl.load(Add + add_offsets, mask=mask, other=0.0).to(tl.float32)
        out_offsets = (b * stride_ob + out_row * stride_oh
                       + (j.to(tl.int64) * stride_ow)[:, None] + c[None, :])
        tl.store(Out + out_offsets, result.to(Out.dtype.element_ty), mask=mask)
        acc = acc[1:] + (tl.zeros([BLOCK_W, BLOCK_C], tl.float32),)


@triton.jit
def _dw_rows_kernel(X, GradOut, Partials,
                    stride_xb, stride_xh, stride_xw, stride_xc,
                    stride_gb, stride_gh, stride_gw, stride_gc,
                    height, width, channels, tiles_w, tiles_per_image,
                    KH: tl.constexpr, KW: tl.constexpr, COMPUTE: tl.constexpr,
                    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """Partials[program, u * KW + v, c] = sum over this program's BLOCK_H rows x BLOCK_W
    columns of dy[i, j] * x[i + u - KH//2, j + v - KW//2] (x rounded to COMPUTE);
    Partials[program, KH * KW, c] = their sum of dy."""
    program, b, row0, j, c, c_valid, x_columns = _strip(
        X, stride_xb, stride_xw, stride_xc, channels, tiles_w, tiles_per_image, BLOCK_H,
        BLOCK_W, BLOCK_C)
    dy_columns = (GradOut + b * stride_gb + (j.to(tl.int64) * stride_gw)[:, None]
                  + (c * stride_gc)[None, :])
    dy_mask_wc = (j < width)[:, None] & c_valid[None, :]
    acc = ()
    for t in tl.static_range(KH * KW):
        acc = acc + (tl.zeros([BLOCK_W, BLOCK_C], tl.float32),)
    acc_bias = tl.zeros([BLOCK_W, BLOCK_C], tl.float32)
    # window[k] holds dy row r - KH//2 + k while x row r is visited (zeros outside the strip).
    window = ()
    for k in tl.static_range(KH - 1):
        window = window + (tl.zeros([BLOCK_W, BLOCK_C], tl.float32),)
    for r in range(row0 - KH // 2, row0 + BLOCK_H + KH // 2):
        r64 = b * 0 + r  # int64 row offsets
        dy_row = r64 + KH // 2
        dy_valid = (dy_row < row0 + BLOCK_H) & (dy_row < height) & (dy_row >= row0)
        dy = tl.load(dy_columns + dy_row * stride_gh, mask=dy_mask_wc & dy_valid,
                     other=0.0).to(tl.float32)
        acc_bias += dy
        window = window + (dy,)
        for v in tl.static_range(KW):
            xv = _row_tap(x_columns, r64, j, c_valid, v - KW // 2, height, width, stride_xh,
                          stride_xw, COMPUTE)
            updated = ()
            for t in tl.static_range(KH * KW):
                # tap t = (u, v'): x row r meets dy row r - u + KH//2 = window[KH - 1 - u]
                if t % KW == v:
                    updated = updated + (acc[t] + xv * window[KH - 1 - t // KW],)
                else:
                    updated = updated + (acc[t],)
            acc = updated
        window = window[1:]
    row = program.to(tl.int64) * ((KH * KW + 1) * channels)
    for t in tl.static_range(KH * KW):
        tl.store(Partials + row + t * channels + c, tl.sum(acc[t], 0), mask=c_valid)
    tl.store(Partials + row + KH * KW * channels + c, tl.sum(acc_bias, 0), mask=c_valid)


@functools.lru_cache(maxsize=1024)
def _plan(kind: str, tile_cls: str, batch: int, height: int, width: int, channels: int,
          config: Optional[tuple]):
    """Grid, scalar arguments and meta-parameters of one launch. ``config`` (BLOCK_H, BLOCK_W,
    BLOCK_C, num_warps) overrides ``tile_config`` (tuning)."""
    block_h, block_w, block_c, num_warps = config or tile_config(kind, tile_cls, height, width,
                                                                  channels)
    tiles_w = cdiv(width, block_w)
    tiles_per_image = cdiv(height, block_h) * tiles_w
    grid = (batch * tiles_per_image, cdiv(channels, block_c))
    meta = dict(BLOCK_H=block_h, BLOCK_W=block_w, BLOCK_C=block_c, num_warps=num_warps)
    return grid, (height, width, channels, tiles_w, tiles_per_image), meta


def output_dtype(compute_dtype: torch.dtype, add: Optional[Tensor]) -> torch.dtype:
    """conv in ``compute_dtype``, plus ``add``: torch's type promotion."""
    return compute_dtype if add is None else torch.promote_types(compute_dtype, add.dtype)


def forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], add: Optional[Tensor],
            compute_dtype: torch.dtype, config: Optional[tuple] = None) -> Tensor:
    """conv(x) + bias + add, (B, H, W, C) contiguous in ``output_dtype``. x and weight (and
    bias) are rounded to ``compute_dtype`` before the fp32 accumulation."""
    out = torch.empty(x.shape, dtype=output_dtype(compute_dtype, add), device=x.device)
    if x.numel():
        _launch_conv('fwd', x, weight, bias, add, out, 1, compute_dtype, compute_dtype, config)
    return out


def _launch_conv(kind, x, weight, bias, add, out, sign, round_x, compute_dtype, config):
    batch, height, width, channels = x.shape
    grid, scalars, meta = _plan(kind, tile_class(weight.shape[2], x.dtype), batch, height,
                                width, channels, config)
    fast_launcher(_conv_rows_kernel)[grid](
        x, weight, x if bias is None else bias, x if add is None else add, out,
        *x.stride(), weight.stride(0), weight.stride(2), weight.stride(3),
        0 if bias is None else bias.stride(0), *(x.stride() if add is None else add.stride()),
        *out.stride()[:3], *scalars, KH=weight.shape[2], KW=weight.shape[3], SIGN=sign,
        HAS_BIAS=bias is not None, HAS_ADD=add is not None, ROUND_X=_TL_DTYPES[round_x],
        COMPUTE=_TL_DTYPES[compute_dtype], **meta)


def backward_dx(grad_out: Tensor, x: Tensor, weight: Tensor, compute_dtype: torch.dtype,
                config: Optional[tuple] = None, add: Optional[Tensor] = None,
                out: Optional[Tensor] = None) -> Tensor:
    """grad_x: dy convolved with the flipped kernel, plus ``add`` when given (x's shape; one
    rounding of the sum), into ``out`` when given (x's shape, unit channel stride; it may be
    ``add`` itself, not ``grad_out``), else into a new contiguous tensor in x's dtype."""
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    if x.numel():
        _launch_conv('dx', grad_out, weight, None, add, grad_x, -1, torch.float32,
                     compute_dtype, config)
    return grad_x


def backward_dw(grad_out: Tensor, x: Tensor, weight: Tensor, compute_dtype: torch.dtype,
                config: Optional[tuple] = None):
    """(grad_weight, grad_bias) in weight's dtype, from fp32 per-tile partial sums."""
    batch, height, width, channels = x.shape
    if x.numel() == 0:
        return torch.zeros_like(weight), weight.new_zeros(channels)
    kernel_h, kernel_w = weight.shape[2:]
    taps = kernel_h * kernel_w
    grid, scalars, meta = _plan('dw', tile_class(kernel_h, x.dtype), batch, height, width,
                                channels, config)
    partials = x.new_empty((grid[0], taps + 1, channels), dtype=torch.float32)
    fast_launcher(_dw_rows_kernel)[grid](
        x, grad_out, partials, *x.stride(), *grad_out.stride(), *scalars, KH=kernel_h,
        KW=kernel_w, COMPUTE=_TL_DTYPES[compute_dtype], **meta)
    sums = partials.sum(0)
    grad_weight = sums[:taps].t().contiguous().view(weight.shape).to(weight.dtype)
    return grad_weight, sums[taps].to(weight.dtype)


def backward(grad_out: Tensor, x: Tensor, weight: Tensor, compute_dtype: torch.dtype,
             need_dx: bool, need_dw: bool, dx_add: Optional[Tensor] = None,
             dx_out: Optional[Tensor] = None):
    """(grad_x in x's dtype or None, grad_weight and grad_bias in weight's dtype or None);
    ``dx_add``, ``dx_out``: :func:`backward_dx`'s ``add`` and ``out``."""
    grad_x = (backward_dx(grad_out, x, weight, compute_dtype, add=dx_add, out=dx_out)
              if need_dx else None)
    grad_weight, grad_bias = (backward_dw(grad_out, x, weight, compute_dtype) if need_dw
                              else (None, None))
    return grad_x, grad_weight, grad_bias


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op('dsa_ops::depthwise_conv2d_fwd', mutates_args=())
def depthwise_conv2d_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                         add: Optional[Tensor], compute_dtype: torch.dtype) -> Tensor:
    """Forward: conv(x) + bias + add, (B, H, W, C) contiguous."""
    return forward(x, weight, bias, add, compute_dtype)


@depthwise_conv2d_fwd.register_fake
def _(x, weight, bias, add, compute_dtype):
    return x.new_empty(x.shape, dtype=output_dtype(compute_dtype, add))


@torch.library.custom_op('dsa_ops::depthwise_conv2d_bwd', mutates_args=())
def depthwise_conv2d_bwd(grad_out: Tensor, x: Tensor, weight: Tensor,
                         compute_dtype: torch.dtype, need_dx: bool,
                         need_dw: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Backward: (grad_x, grad_weight, grad_bias); an unneeded one is an empty (0,) tensor."""
    grad_x, grad_weight, grad_bias = backward(grad_out, x, weight, compute_dtype, need_dx,
                                              need_dw)
    return (x.new_empty(0) if grad_x is None else grad_x,
            weight.new_empty(0) if grad_weight is None else grad_weight,
            weight.new_empty(0) if grad_bias is None else grad_bias)


@depthwise_conv2d_bwd.register_fake
def _(grad_out, x, weight, compute_dtype, need_dx, need_dw):
    return (x.new_empty(x.shape if need_dx else 0),
            weight.new_empty(weight.shape if need_dw else 0),
            weight.new_empty(weight.shape[0] if need_dw else 0))


def _setup_context(ctx, inputs, output):
    x, weight, bias, add, compute_dtype = inputs
    ctx.save_for_backward(x, weight)
    ctx.compute_dtype = compute_dtype


def _backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b, need_add = ctx.needs_input_grad[:4]
    grad_x = grad_weight = grad_bias = None
    if need_x or need_w or need_b:
        grad_x, grad_weight, grad_bias = depthwise_conv2d_bwd(
            grad_out, x, weight, ctx.compute_dtype, need_x, need_w or need_b)
    return (grad_x if need_x else None, grad_weight if need_w else None,
            grad_bias if need_b else None, grad_out if need_add else None, None)


depthwise_conv2d_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- eager path


class _DepthwiseConv2d(torch.autograd.Function):
    """Eager autograd over the launchers, without the custom-op dispatch of the traced path."""

    @staticmethod
    def forward(ctx, x, weight, bias, add, compute_dtype):
        ctx.save_for_backward(x, weight)
        ctx.compute_dtype = compute_dtype
        return forward(x, weight, bias, add, compute_dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b, need_add = ctx.needs_input_grad[:4]
        grad_x, grad_weight, grad_bias = backward(grad_out, x, weight, ctx.compute_dtype,
                                                  need_x, need_w or need_b)
        return (grad_x, grad_weight if need_w else None, grad_bias if need_b else None,
                grad_out if need_add else None, None)


def triton_depthwise_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                            add: Optional[Tensor], compute_dtype: torch.dtype,
                            traced: bool) -> Tensor:
    """Fused depthwise conv (arguments validated by :func:`ops.depthwise_conv2d`).

    ``traced`` (compiling or exporting) routes through the custom ops; eager calls launch the
    kernels directly, through ``_DepthwiseConv2d`` when a gradient is needed.
    """
    if traced:
        return depthwise_conv2d_fwd(x, weight, bias, add, compute_dtype)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, weight, bias, add)):
        return _DepthwiseConv2d.apply(x, weight, bias, add, compute_dtype)
    return forward(x, weight, bias, add, compute_dtype)
