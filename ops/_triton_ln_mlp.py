"""Fused Triton forward of a pre-norm residual MLP: ``x + s * fc2(gelu(fc1(LN(x))))``.

One kernel replaces a LayerNorm, two products, a GELU, the drop-path product and the residual
add (six launches, and the hidden activation's write and reads). A program owns ``BLOCK_M``
rows of x (rows, C), ``BLOCK_C = next_pow2(C)`` channels (the whole row):

1. the LayerNorm in fp32 (x rounded to the compute dtype first, fp32 weights read as they
   are), ``h`` rounded once to the compute dtype, as :func:`ops.layer_norm`;
2. for each chunk of ``BLOCK_H`` hidden features: ``z = h @ W1[chunk]^T + b1`` rounded to the
   compute dtype (a product's output), ``g = gelu(z)`` (exact erf, computed in fp32, rounded),
   and ``acc += g @ W2[:, chunk]^T`` in fp32; the hidden activation never leaves the chip;
3. ``branch = acc + b2`` rounded, times the per-sample scale ``s`` (drop path) rounded, and
   ``y = x + branch`` in fp32, stored in y's dtype.

The roundings are the module path's (``nn.LayerNorm`` on the kernel, ``nn.Linear`` and
``nn.GELU`` under autocast), so results differ from it only by the order of the products'
sums. Weights and biases of any float dtype are rounded to the compute dtype as they are
loaded (fp32 parameters need no cast beforehand). With ``save`` the kernel also writes what a
backward pass needs: ``h``, ``z`` (pre-activation), and the rows' mean and rstd.

fp32 products use IEEE fp32 unless ``torch.backends.cuda.matmul.allow_tf32`` is set (then
TF32, as cuBLAS would); with the bf16-tuned tiles they are slow (the fused block calls the
kernel for 16-bit products only). Rows wider than ``MAX_CHANNELS`` are not handled here (the caller
takes the unfused path). Speed against the six launches, by width: docs/ops.md
("LayerNorm-MLP forward"); it is the faster up to C = 128 on an H200.
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ops._launch import fast_launcher, launch_fitting
from ops._sizes import cdiv, next_power_of_2
from ops._triton_layer_norm import normalize_rows

MAX_CHANNELS = 512  # widest row: the fp32 accumulator holds BLOCK_M x BLOCK_C per program

# (BLOCK_M, BLOCK_H, num_warps, num_stages) keyed on BLOCK_C = next_pow2(C): the rows
# `tools/benchmark.py mlp --tune` chose on an H200 in bf16 for BiFormer's widths at 224 px,
# batch 128 (2026-12-01, docs/benchmarks.md "mlp"); 16 and 32 not tuned.
_CONFIGS = {16: (64, 32, 4, 2), 32: (64, 32, 4, 2), 64: (128, 32, 8, 3), 128: (64, 32, 4, 3),
            256: (64, 32, 4, 1), 512: (64, 64, 8, 1)}
_FITTED = {}  # (device index, BLOCK_C) -> the row that launched where the table's did not

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def supports(channels: int, hidden_features: int) -> bool:
    """Whether the kernel takes rows of ``channels`` with ``hidden_features`` (both >= 1)."""
    return 1 <= channels <= MAX_CHANNELS and hidden_features >= 1


def _block_c(channels: int) -> int:
    return max(16, next_power_of_2(channels))


def tile_config(channels: int) -> tuple:
    """(BLOCK_M, BLOCK_H, num_warps, num_stages) for rows of ``channels``."""
    return _CONFIGS[_block_c(channels)]


def _smaller(row: tuple):
    """The next row to try when ``row`` needs more shared memory than the device has: fewer
    pipeline stages, then half the hidden chunk, then half the rows; None below 16 x 16."""
    block_m, block_h, num_warps, num_stages = row
    if num_stages > 1:
        return block_m, block_h, num_warps, num_stages - 1
    if block_h > 16:
        return block_m, block_h // 2, num_warps, num_stages
    if block_m > 16:
        return block_m // 2, block_h, num_warps, num_stages
    return None


def set_tile_configs(table: dict) -> None:
    """Replace rows of the table, ``{BLOCK_C: (BLOCK_M, BLOCK_H, num_warps, num_stages)}``
    (tuning sweeps; JSON keys may be strings). BLOCK_M, BLOCK_H >= 16 and num_warps are powers
    of two."""
    for block_c, row in table.items():
        block_c, row = int(block_c), tuple(int(v) for v in row)
        if block_c not in _CONFIGS:
            raise ValueError(f'BLOCK_C must be one of {sorted(_CONFIGS)}, got {block_c}')
        pow2 = all(v > 0 and v & (v - 1) == 0 for v in row[:3])
        if len(row) != 4 or not pow2 or min(row[:2]) < 16 or row[3] < 1:
            raise ValueError(f'row must be (BLOCK_M, BLOCK_H, num_warps, num_stages) with powers '
                             f'of two, BLOCK_M and BLOCK_H >= 16, got {row}')
        _CONFIGS[block_c] = row
    _FITTED.clear()


@triton.jit
def _ln_mlp_fwd_kernel(X, LnW, LnB, W1, B1, W2, B2, Scale, Y, H, Z, Mean, Rstd,
                       n_rows, channels, hidden_features, rows_per_sample, eps,
                       HAS_LN_W: tl.constexpr, HAS_LN_B: tl.constexpr, HAS_B1: tl.constexpr,
                       HAS_B2: tl.constexpr, HAS_SCALE: tl.constexpr, SAVE: tl.constexpr,
                       COMPUTE: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr):
    """Y = X + Scale * fc2(gelu(fc1(LN(X)))) for BLOCK_M rows; see the module docstring."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_C)
    row_valid, c_valid = rows < n_rows, c < channels
    mask = row_valid[:, None] & c_valid[None, :]
    x_offsets = rows.to(tl.int64)[:, None] * channels + c[None, :]
    x = tl.load(X + x_offsets, mask=mask, other=0.0).to(COMPUTE).to(tl.float32)
    h, mean, rstd = normalize_rows(x, mask, c, c_valid, channels, eps, LnW, LnB, HAS_LN_W,
                                   HAS_LN_B)
    h = tl.where(mask, h, 0.0).to(COMPUTE)  # padded channels are zero: they add nothing below
    if SAVE:
        tl.store(H + x_offsets, h, mask=mask)
        tl.store(Mean + rows, mean, mask=row_valid)
        tl.store(Rstd + rows, rstd, mask=row_valid)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    j = tl.arange(0, BLOCK_H)
    for start in range(0, hidden_features, BLOCK_H):
        hid = start + j
        hid_valid = hid < hidden_features
        w1 = tl.load(W1 + hid[:, None] * channels + c[None, :],
                     mask=hid_valid[:, None] & c_valid[None, :], other=0.0).to(COMPUTE)
        z = tl.dot(h, tl.trans(w1), input_precision=PRECISION)
        if HAS_B1:
            z += tl.load(B1 + hid, mask=hid_valid, other=0.0).to(COMPUTE).to(tl.float32)[None, :]
        z = z.to(COMPUTE)
        if SAVE:
            tl.store(Z + rows.to(tl.int64)[:, None] * hidden_features + hid[None, :], z,
                     mask=row_valid[:, None] & hid_valid[None, :])
        zf = z.to(tl.float32)
        g = (0.5 * zf * (1.0 + tl.math.erf(zf * 0.7071067811865476))).to(COMPUTE)
        w2 = tl.load(W2 + c[:, None] * hidden_features + hid[None, :],
                     mask=c_valid[:, None] & hid_valid[None, :], other=0.0).to(COMPUTE)
        acc += tl.dot(g, tl.trans(w2), input_precision=PRECISION)
    if HAS_B2:
        acc += tl.load(B2 + c, mask=c_valid, other=0.0).to(COMPUTE).to(tl.float32)[None, :]
    branch = acc.to(COMPUTE).to(tl.float32)
    if HAS_SCALE:
        scale = tl.load(Scale + rows // rows_per_sample, mask=row_valid, other=0.0)
        branch = (branch * scale.to(tl.float32)[:, None]).to(COMPUTE).to(tl.float32)
    residual = tl.load(X + x_offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + x_offsets, (residual + branch).to(Y.dtype.element_ty), mask=mask)


def forward(x: Tensor, ln_weight: Optional[Tensor], ln_bias: Optional[Tensor], eps: float,
            fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor,
            fc2_bias: Optional[Tensor], compute_dtype: torch.dtype,
            sample_scale: Optional[Tensor] = None, save: bool = False,
            config: Optional[tuple] = None, out: Optional[Tensor] = None):
    """``x + s * fc2(gelu(fc1(LN(x))))`` of a contiguous x (B, ..., C), products in
    ``compute_dtype``, output in ``promote(x.dtype, compute_dtype)``.

    fc1_weight (hidden, C), fc2_weight (C, hidden), biases (hidden,) / (C,) or None, any float
    dtype, contiguous; ``sample_scale`` None or (B,) (one factor per leading index, in the
    dtype the module path multiplies in). Returns (y, h, z, mean, rstd): with ``save``, h = LN(x)
    (B, ..., C) and z = fc1(h) (B, ..., hidden) in ``compute_dtype``, mean and rstd fp32 (rows,);
    otherwise those four are None. y is written into ``out`` when given (contiguous, x's
    shape, y's dtype). The caller checks :func:`supports`."""
    for name, t in (('x', x), ('fc1_weight', fc1_weight), ('fc2_weight', fc2_weight)):
        if not t.is_contiguous():
            raise ValueError(f'{name} must be contiguous (the kernel reads rows), got strides '
                             f'{t.stride()}')
    channels, hidden_features = x.shape[-1], fc1_weight.shape[0]
    n_rows = x.numel() // channels
    out_dtype = torch.promote_types(x.dtype, compute_dtype)
    if out is None:
        y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    elif out.shape != x.shape or out.dtype != out_dtype or not out.is_contiguous():
        raise ValueError(f'out must be a contiguous {tuple(x.shape)} {out_dtype} tensor, got '
                         f'{tuple(out.shape)} {out.dtype} with strides {out.stride()}')
    else:
        y = out
    saved = (None,) * 4
    if save:
        saved = (torch.empty(x.shape, dtype=compute_dtype, device=x.device),
                 torch.empty((*x.shape[:-1], hidden_features), dtype=compute_dtype,
                             device=x.device),
                 x.new_empty(n_rows, dtype=torch.float32),
                 x.new_empty(n_rows, dtype=torch.float32))
    if n_rows == 0:
        return (y,) + saved
    precision = 'ieee'
    if compute_dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        precision = 'tf32'
    rows_per_sample = n_rows // x.shape[0] if x.dim() > 1 else 1
    h, z, mean, rstd = (y if t is None else t for t in saved)

    def launch(row):
        block_m, block_h, num_warps, num_stages = row or tile_config(channels)
        fast_launcher(_ln_mlp_fwd_kernel)[(cdiv(n_rows, block_m),)](
            x, y if ln_weight is None else ln_weight, y if ln_bias is None else ln_bias,
            fc1_weight, y if fc1_bias is None else fc1_bias, fc2_weight,
            y if fc2_bias is None else fc2_bias, y if sample_scale is None else sample_scale,
            y, h, z, mean, rstd, n_rows, channels, hidden_features, max(rows_per_sample, 1),
            eps, HAS_LN_W=ln_weight is not None, HAS_LN_B=ln_bias is not None,
            HAS_B1=fc1_bias is not None, HAS_B2=fc2_bias is not None,
            HAS_SCALE=sample_scale is not None, SAVE=save, COMPUTE=_TL_DTYPES[compute_dtype],
            PRECISION=precision, BLOCK_M=block_m, BLOCK_C=_block_c(channels), BLOCK_H=block_h,
            num_warps=num_warps, num_stages=num_stages)

    if config is not None:
        launch(config)
    else:
        _launch_fitting(launch, x.device, channels)
    return (y,) + saved


def _launch_fitting(launch, device: torch.device, channels: int) -> None:
    """``launch(row)`` with the table's row (``None``), or where the device cannot hold it with
    :func:`_smaller` rows until one launches, remembered per device and BLOCK_C
    (``ops._launch.launch_fitting``)."""
    launch_fitting(launch, _FITTED, (device.index, _block_c(channels)),
                   lambda: tile_config(channels), _smaller, 'LayerNorm-MLP kernel', device,
                   'tools/benchmark.py mlp --tune')
