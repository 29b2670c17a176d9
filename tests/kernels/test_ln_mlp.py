"""The fused LayerNorm-MLP forward kernel (ops._triton_ln_mlp) against its torch reference
(ops.mlp.residual_mlp_reference); CPU through the Triton interpreter, bf16 on the GPU."""
import pytest
import torch

from ops import _triton_ln_mlp
from ops.mlp import residual_mlp_reference

DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'


def _params(channels, hidden, affine=True, bias=True, device=DEVICE):
    def make(*shape, scale=1.0):
        return (torch.randn(*shape) * scale).to(device)
    return dict(ln_weight=1 + make(channels, scale=0.2) if affine else None,
                ln_bias=make(channels, scale=0.2) if affine else None,
                fc1_weight=make(hidden, channels, scale=channels ** -0.5),
                fc1_bias=make(hidden, scale=0.1) if bias else None,
                fc2_weight=make(channels, hidden, scale=hidden ** -0.5),
                fc2_bias=make(channels, scale=0.1) if bias else None)


def _kernel(x, params, compute_dtype, sample_scale=None, save=False, config=None, eps=1e-6):
    p = params
    return _triton_ln_mlp.forward(x, p['ln_weight'], p['ln_bias'], eps, p['fc1_weight'],
                                  p['fc1_bias'], p['fc2_weight'], p['fc2_bias'], compute_dtype,
                                  sample_scale, save, config)


def _reference(x, params, compute_dtype, sample_scale=None, eps=1e-6):
    p = params
    return residual_mlp_reference(x, p['ln_weight'], p['ln_bias'], eps, p['fc1_weight'],
                                  p['fc1_bias'], p['fc2_weight'], p['fc2_bias'], compute_dtype,
                                  sample_scale)


def _relative_l2(got, ref):
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize('channels, hidden, affine, bias', [
    (32, 96, True, True),    # power-of-two width, several hidden chunks
    (24, 40, False, True),   # padded channels, a partial last hidden chunk, no LN affine
    (16, 48, True, False),   # no biases
])
def test_fp32_matches_reference(channels, hidden, affine, bias):
    params = _params(channels, hidden, affine, bias)
    x = torch.randn(2, 5, 5, channels, device=DEVICE)  # 50 rows: a partial last row block
    got, = _kernel(x, params, torch.float32, config=(16, 16, 4, 1))[:1]
    assert got.dtype == torch.float32 and got.shape == x.shape
    assert _relative_l2(got - x, _reference(x, params, torch.float32) - x) < 1e-5


def test_saved_tensors_and_sample_scale():
    """``save`` writes LN(x), fc1's output and the row statistics; the per-sample factor
    (drop path) scales each sample's branch, and a zero factor leaves the residual alone."""
    channels, hidden = 32, 64
    params = _params(channels, hidden)
    x = torch.randn(3, 4, 4, channels, device=DEVICE)
    scale = torch.tensor([0.0, 1.25, 1.0], device=DEVICE)
    y, h, z, mean, rstd = _kernel(x, params, torch.float32, scale, save=True,
                                  config=(16, 32, 4, 1))
    torch.testing.assert_close(y, _reference(x, params, torch.float32, scale), rtol=1e-5,
                               atol=1e-5)
    assert torch.equal(y[0], x[0])
    h_ref = torch.nn.functional.layer_norm(x, (channels,), params['ln_weight'],
                                           params['ln_bias'], 1e-6)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z, torch.nn.functional.linear(h_ref, params['fc1_weight'],
                                                             params['fc1_bias']),
                               rtol=1e-5, atol=1e-5)
    assert z.shape == (3, 4, 4, hidden) and mean.shape == rstd.shape == (48,)
    torch.testing.assert_close(mean, x.mean(-1).flatten(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rstd, (x.var(-1, unbiased=False) + 1e-6).rsqrt().flatten(),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('x_dtype', [torch.float32, torch.float16])
def test_fp16_against_fp64(x_dtype):
    """fp16 products (x in fp32 as under autocast, or fp16): the kernel's error against the
    fp64 reference is at most that of the same-dtype torch reference, plus a margin."""
    channels, hidden = 32, 96
    params = _params(channels, hidden)
    x = torch.randn(2, 6, 6, channels, device=DEVICE).to(x_dtype)
    scale = torch.tensor([1.1, 0.9], device=DEVICE, dtype=torch.float16)
    got = _kernel(x, params, torch.float16, scale, config=(16, 32, 4, 1))[0]
    assert got.dtype == x_dtype
    exact = _reference(x.double(), {k: None if v is None else v.double()
                                    for k, v in params.items()}, torch.float64, scale.double())
    same_dtype = _reference(x, params, torch.float16, scale)
    assert _relative_l2(got - x, exact - x.double()) <= (
        2 * _relative_l2(same_dtype - x, exact - x.double()) + 1e-4)


def test_zero_rows():
    params = _params(32, 64)
    x = torch.randn(0, 7, 32, device=DEVICE)
    y, h, z, mean, rstd = _kernel(x, params, torch.float32, save=True)
    assert y.shape == h.shape == (0, 7, 32) and z.shape == (0, 7, 64) and mean.numel() == 0


def test_non_contiguous_inputs_are_refused():
    params = _params(32, 64)
    x = torch.randn(2, 4, 32, device=DEVICE)
    with pytest.raises(ValueError, match='x must be contiguous'):
        _kernel(x.transpose(0, 1), params, torch.float32)
    params['fc2_weight'] = params['fc2_weight'].t().contiguous().t()
    with pytest.raises(ValueError, match='fc2_weight must be contiguous'):
        _kernel(x, params, torch.float32)


def test_out_buffer():
    """``out`` receives y (the block graphs' shared output buffer); a wrong one is refused."""
    params = _params(32, 64)
    x = torch.randn(2, 5, 32, device=DEVICE)
    expected, = _kernel(x, params, torch.float32, config=(16, 16, 4, 1))[:1]
    out = torch.full_like(x, float('nan'))
    p = params
    y = _triton_ln_mlp.forward(x, p['ln_weight'], p['ln_bias'], 1e-6, p['fc1_weight'],
                               p['fc1_bias'], p['fc2_weight'], p['fc2_bias'], torch.float32,
                               config=(16, 16, 4, 1), out=out)[0]
    assert y is out and torch.equal(out, expected)
    for wrong in (out.half(), out[:1], out.transpose(0, 1).contiguous().transpose(0, 1)):
        with pytest.raises(ValueError, match='out must be a contiguous'):
            _triton_ln_mlp.forward(x, None, None, 1e-6, p['fc1_weight'], None,
                                   p['fc2_weight'], None, torch.float32, out=wrong)


def test_supports_and_tile_configs():
    assert _triton_ln_mlp.supports(512, 1536) and not _triton_ln_mlp.supports(768, 2304)
    assert _triton_ln_mlp.tile_config(48) == _triton_ln_mlp.tile_config(64)
    with pytest.raises(ValueError, match='BLOCK_C must be one of'):
        _triton_ln_mlp.set_tile_configs({1024: (16, 16, 4, 1)})
    with pytest.raises(ValueError, match='powers of two'):
        _triton_ln_mlp.set_tile_configs({64: (24, 16, 4, 1)})


@pytest.mark.gpu
@pytest.mark.parametrize('shape, hidden', [((8, 56, 56, 64), 192), ((8, 14, 14, 256), 768),
                                           ((16, 7, 7, 512), 1536), ((4, 28, 28, 96), 288)])
def test_bf16_at_model_shapes_on_gpu(shape, hidden):
    """bf16 products with every table row at BiFormer's widths: the kernel's error against an
    fp64 reference is at most the bf16 torch reference's, plus a margin."""
    params = _params(shape[-1], hidden, device='cuda')
    x = torch.randn(*shape, device='cuda', dtype=torch.bfloat16)
    scale = (torch.rand(shape[0], device='cuda') > 0.2).to(torch.bfloat16) * 1.25
    got = _kernel(x, params, torch.bfloat16, scale)[0]
    exact = _reference(x.double(), {k: v.double() for k, v in params.items()}, torch.float64,
                       scale.double())
    same_dtype = _reference(x, params, torch.bfloat16, scale)
    assert got.dtype == torch.bfloat16
    assert _relative_l2(got - x, exact - x.double()) <= (
        1.5 * _relative_l2(same_dtype - x, exact - x.double()) + 1e-4)


def test_rows_too_large_for_the_device_shrink_once(monkeypatch):
    """A table row the device cannot hold (OutOfResources before the launch) gives way to
    smaller rows (stages, then hidden chunk, then rows); the first that launches is kept for
    the device and width, with one warning."""
    from triton.runtime.errors import OutOfResources
    monkeypatch.setattr(_triton_ln_mlp, '_FITTED', {})
    monkeypatch.setitem(_triton_ln_mlp._CONFIGS, 256, (64, 64, 8, 2))
    tried = []

    def launch(row):  # None: the table's row
        row = row or _triton_ln_mlp.tile_config(256)
        tried.append(row)
        if row[3] > 1 or row[1] > 32:
            raise OutOfResources(300000, 232448, 'shared memory')
    device = torch.device('cpu')  # the key holds the device index; the warning its name
    with pytest.warns(UserWarning, match=r'using \(64, 32, 8, 1\)'):
        _triton_ln_mlp._launch_fitting(launch, device, 200)
    assert tried == [(64, 64, 8, 2), (64, 64, 8, 1), (64, 32, 8, 1)]
    tried.clear()
    _triton_ln_mlp._launch_fitting(launch, device, 256)  # remembered: no search, no warning
    assert tried == [(64, 32, 8, 1)]

    def never(row):
        raise OutOfResources(300000, 232448, 'shared memory')
    with pytest.raises(OutOfResources):
        _triton_ln_mlp._launch_fitting(never, torch.device('cuda', 1), 256)
