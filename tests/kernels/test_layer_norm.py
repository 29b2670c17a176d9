"""ops.layer_norm: torch reference, Triton kernels (interpreter on CPU), custom-op glue."""
import pytest
import torch
import torch.nn.functional as F

import ops
from kernel_checks import forward_and_grads, max_error, relative_l2
from ops import _triton_layer_norm as kernels
from ops.layer_norm import layer_norm_reference

HAS_CUDA = torch.cuda.is_available()
DEVICE = 'cuda' if HAS_CUDA else 'cpu'
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def make_inputs(shape, dtype=torch.float32, weight=True, bias=True, param_dtype=None,
                device=DEVICE):
    """x of ``shape`` (..., C) and weight/bias (C,) near 1 and 0 (or None), in ``param_dtype``
    (x's dtype by default)."""
    chans = shape[-1]
    param_dtype = param_dtype or dtype
    x = (torch.randn(shape, device=device) * 2 + 0.5).to(dtype)
    w = (1 + 0.5 * torch.randn(chans, device=device)).to(param_dtype) if weight else None
    b = (0.3 * torch.randn(chans, device=device)).to(param_dtype) if bias else None
    return x, w, b


def compare_to_fp64(x, weight, bias, backend='triton', grad_out=None, eps=1e-5):
    """Assert |backend - fp64| <= 2 |torch same dtype - fp64| + atol for out, dx, dw, db."""
    if grad_out is None:
        grad_out = torch.randn(x.shape, device=x.device).to(x.dtype)

    def run(backend_name, cast):
        def fn(*args):
            return ops.layer_norm(*args, eps=eps, backend=backend_name)
        return forward_and_grads(fn, [None if t is None else cast(t) for t in (x, weight, bias)],
                                 cast(grad_out))

    tested = run(backend, lambda t: t)
    same_dtype = run('torch', lambda t: t)
    exact = run('torch', lambda t: t.double())
    assert tested[0].dtype == x.dtype and tested[0].is_contiguous()
    assert tested[0].shape == x.shape
    atol = ATOL[x.dtype]
    for name, got, base, ref, t in zip(('out', 'dx', 'dweight', 'dbias'), tested, same_dtype,
                                       exact, (None, x, weight, bias)):
        if ref is None:
            continue
        if t is not None:
            assert got.dtype == t.dtype and got.shape == t.shape, name
        err, base_err = max_error(got, ref), max_error(base, ref)
        # dweight/dbias sum over rows: scale the atol with them.
        tol = atol * (1 if name in ('out', 'dx') else max(1, x.numel() // x.shape[-1]))
        assert err <= 2 * base_err + tol, f'{name}: error {err:.3g} vs torch {base_err:.3g}'
        assert torch.isfinite(got).all()
    return tested


@pytest.fixture
def small_tiles():
    """Tiles of 4 rows; the backward in at most 2 programs, so a program walks several row
    blocks (and some programs end past the last row)."""
    saved = {kind: dict(rows) for kind, rows in kernels._CONFIGS.items()}
    kernels.set_tile_configs({'fwd': {c: (4, 1) for c in kernels._CONFIGS['fwd']},
                              'bwd': {c: (4, 1, 2) for c in kernels._CONFIGS['bwd']}})
    yield
    kernels.set_tile_configs(saved)


# ----------------------------------------------------------------------------- reference


def test_reference_matches_layer_norm_module_fp64():
    x, weight, bias = make_inputs((3, 5, 12), dtype=torch.float64, device='cpu')
    module = torch.nn.LayerNorm(12, eps=1e-6).double()
    module.load_state_dict(dict(weight=weight, bias=bias))
    torch.testing.assert_close(layer_norm_reference(x, weight, bias, 1e-6), module(x))
    torch.testing.assert_close(layer_norm_reference(x, None, None),
                               F.layer_norm(x, (12,), eps=1e-5))


def test_reference_gradcheck_fp64():
    x, weight, bias = make_inputs((2, 3, 6), dtype=torch.float64, device='cpu')
    inputs = tuple(t.requires_grad_() for t in (x, weight, bias))
    assert torch.autograd.gradcheck(
        lambda x_, w_, b_: ops.layer_norm(x_, w_, b_, backend='torch'), inputs)


def test_auto_backend_exports_with_torch_export():
    x, weight, bias = make_inputs((2, 4, 8), device='cpu')

    class Norm(torch.nn.Module):
        def forward(self, x):
            return ops.layer_norm(x, weight, bias)
    program = torch.export.export(Norm(), (x,))
    targets = {str(node.target) for node in program.graph.nodes}
    assert not any('dsa_ops' in t for t in targets)
    torch.testing.assert_close(program.module()(x), Norm()(x))


# ----------------------------------------------------------------------------- triton vs fp64

TRITON_CASES = {
    # name: (shape, weight, bias, param dtype (None: x's))
    'c64_2d': ((70, 64), True, True, None),
    'c7_3d': ((3, 5, 7), True, True, None),
    'c100_4d': ((2, 3, 2, 100), True, True, None),
    'c1': ((9, 1), True, True, None),
    'c64_no_weight': ((2, 9, 64), False, True, None),
    'c7_no_bias': ((13, 7), True, False, None),
    'c100_plain': ((5, 100), False, False, None),
    'c64_fp32_params': ((3, 11, 64), True, True, torch.float32),
}


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16], ids=['fp32', 'fp16'])
@pytest.mark.parametrize('case', list(TRITON_CASES), ids=list(TRITON_CASES))
def test_triton_matches_fp64(case, dtype):
    shape, weight, bias, param_dtype = TRITON_CASES[case]
    compare_to_fp64(*make_inputs(shape, dtype, weight, bias, param_dtype))


@pytest.mark.parametrize('chans', [7, 64, 100])
def test_triton_small_tiles_ragged_rows_and_multi_block_programs(small_tiles, chans):
    # 23 rows in tiles of 4 (6 blocks, the last ragged), the backward's 6 blocks in 2 programs.
    assert kernels._plan('bwd', 23, chans, None)[:2] == ((2,), 3)
    compare_to_fp64(*make_inputs((23, chans)))
    compare_to_fp64(*make_inputs((23, chans), weight=False))  # dbias only


def test_triton_small_tiles_program_past_the_last_row(small_tiles):
    # 5 blocks of 4 rows in programs of 3: the second program's third block is past the end.
    assert kernels._plan('bwd', 18, 16, None)[:2] == ((2,), 3)
    compare_to_fp64(*make_inputs((18, 16), torch.float16, param_dtype=torch.float32))


def test_triton_noncontiguous_inputs():
    x, weight, bias = make_inputs((3, 8, 6, 20))
    sliced = x[:, ::2, :, :16]              # leading dims at two strides: read in place
    assert kernels._as_rows(sliced)[0] is sliced and kernels._as_rows(sliced)[1:] == (6, 240, 20)
    compare_to_fp64(sliced, weight[:16], bias[:16])
    permuted = x.permute(2, 0, 1, 3)         # (6, 3 * 8) rows at strides (20, 120): in place
    assert kernels._as_rows(permuted)[1:] == (24, 20, 120)
    compare_to_fp64(permuted, weight, bias)
    reversed_dims = x.permute(2, 1, 0, 3)    # three strides: copied
    assert kernels._as_rows(reversed_dims)[0].is_contiguous()
    compare_to_fp64(reversed_dims, weight, bias)
    channels_strided = x.transpose(-1, -2)   # channel stride 6: copied
    compare_to_fp64(channels_strided, None, None)
    grad_out = torch.randn(6, 3, 8, 20, device=DEVICE).permute(1, 2, 0, 3)
    compare_to_fp64(x, weight, bias, grad_out=grad_out)  # a non-contiguous dy


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16], ids=['fp32', 'fp16'])
def test_triton_backward_adds_the_residual_gradient(dtype):
    """``backward(..., residual=r)``: grad_x + r in x's dtype, the sum rounded once (a pre-norm
    block's skip connection; r may be strided)."""
    from ops import _triton_layer_norm as kernels
    x = torch.randn(3, 5, 40, device=DEVICE).to(dtype)
    weight, grad = torch.randn(40, device=DEVICE), torch.randn(3, 5, 40, device=DEVICE)
    residual = torch.randn(3, 40, 5, device=DEVICE).transpose(1, 2)  # fp32, not contiguous
    _, mean, rstd = kernels.forward(x, weight, None, 1e-5, dtype)
    plain = kernels.backward(grad, x, weight, mean, rstd, dtype, True, True, True)
    fused = kernels.backward(grad, x, weight, mean, rstd, dtype, True, True, True,
                             residual=residual)
    assert fused[0].dtype == dtype and fused[0].is_contiguous()
    for got, want in zip(fused[1:], plain[1:]):
        assert torch.equal(got, want)
    x32 = x.float()  # the same dx in fp32, before its rounding to x's dtype
    _, mean32, rstd32 = kernels.forward(x32, weight, None, 1e-5, torch.float32)
    dx32 = kernels.backward(grad, x32, weight, mean32, rstd32, dtype, True, False, False)[0]
    assert torch.equal(fused[0], (dx32 + residual).to(dtype))


def test_triton_eps_and_constant_rows():
    x, weight, bias = make_inputs((6, 33))
    x[1] = 3.0                               # variance 0: y = bias
    compare_to_fp64(x, weight, bias, eps=1e-2)
    out = ops.layer_norm(x, weight, bias, backend='triton')
    torch.testing.assert_close(out[1], bias)


def test_triton_no_grad_path_and_partial_needs_grad():
    x, weight, bias = make_inputs((10, 24))
    with torch.no_grad():
        out = ops.layer_norm(x, weight, bias, backend='triton')
    torch.testing.assert_close(out, layer_norm_reference(x, weight, bias))
    # only weight requires grad: no dx, no dbias
    w = weight.clone().requires_grad_()
    grad_out = torch.randn_like(x)
    grad_w, = torch.autograd.grad(ops.layer_norm(x, w, bias, backend='triton'), w, grad_out)
    expected, = torch.autograd.grad(ops.layer_norm(x, w, bias, backend='torch'), w, grad_out)
    torch.testing.assert_close(grad_w, expected)


@pytest.mark.parametrize('backend', ['triton', 'torch'])
def test_autocast_output_dtype(backend):
    # fp16 autocast on the CPU (the interpreter rounds fp32 -> fp16 to nearest, as a GPU does).
    x, weight, bias = make_inputs((2, 7, 40))
    grad_out = torch.randn(x.shape, device=DEVICE).half()
    with torch.autocast(x.device.type, dtype=torch.float16):
        out, dx, dw, db = forward_and_grads(
            lambda *a: ops.layer_norm(*a, backend=backend), (x, weight, bias), grad_out)
    assert out.dtype == torch.float16 and (dx.dtype, dw.dtype, db.dtype) == (torch.float32,) * 3
    # x rounded to fp16 first, then LayerNorm in fp32 with the fp32 weights, rounded once.
    exact = F.layer_norm(x.half().double(), (40,), weight.double(), bias.double())
    assert max_error(out, exact) <= 2e-3
    with torch.autocast(x.device.type, dtype=torch.float16):
        x64 = ops.layer_norm(x.double(), weight.double(), bias.double(), backend='torch')
    assert x64.dtype == torch.float64  # fp64 is never cast


def test_triton_autocast_matches_reference():
    x, weight, bias = make_inputs((3, 5, 24))
    grad_out = torch.randn(x.shape, device=DEVICE).half()
    results = []
    for backend in ('triton', 'torch'):
        with torch.autocast(x.device.type, dtype=torch.float16):
            results.append(forward_and_grads(
                lambda *a: ops.layer_norm(*a, backend=backend), (x, weight, bias), grad_out))
    for name, got, ref in zip(('out', 'dx', 'dweight', 'dbias'), *results):
        torch.testing.assert_close(got, ref, atol=2e-3, rtol=2e-3, msg=name)


@pytest.mark.parametrize('backend', ['triton', 'torch'])
@pytest.mark.parametrize('shape', [(0, 8), (2, 0, 5)], ids=['rows0', 'mid0'])
def test_zero_rows(shape, backend):
    inputs = make_inputs(shape)
    out, *grads = forward_and_grads(lambda *a: ops.layer_norm(*a, backend=backend), inputs,
                                    torch.randn(shape, device=DEVICE))
    assert out.shape == shape
    for grad, t in zip(grads, inputs):
        assert grad.shape == t.shape and not grad.any()


def test_wide_rows_fall_back_to_the_reference():
    x, weight, bias = make_inputs((2, kernels.MAX_CHANNELS + 1), device='cpu')
    out = ops.layer_norm(x, weight, bias, backend='triton')
    torch.testing.assert_close(out, layer_norm_reference(x, weight, bias))


# ----------------------------------------------------------------------------- custom op


def test_custom_op_opcheck():
    x, weight, bias = make_inputs((2, 5, 16))
    args = tuple(t.requires_grad_() for t in (x, weight, bias)) + (1e-5, torch.float32)
    torch.library.opcheck(kernels.layer_norm_fwd, args,
                          test_utils=('test_schema', 'test_faketensor',
                                      'test_autograd_registration'))


def test_torch_compile_fullgraph():
    x, weight, bias = make_inputs((2, 3, 24))

    def layer(x_, w_, b_):
        return ops.layer_norm(x_ * 2, w_, b_, backend='triton').sigmoid()
    grad_out = torch.randn_like(x)
    compiled = torch.compile(layer, fullgraph=True, backend='aot_eager')
    for got, expected in zip(forward_and_grads(compiled, (x, weight, bias), grad_out),
                             forward_and_grads(layer, (x, weight, bias), grad_out)):
        torch.testing.assert_close(got, expected)


# ----------------------------------------------------------------------------- bad input


def _call(**overrides):
    x, weight, bias = make_inputs((2, 3, 6), device='cpu')
    args = dict(x=x, weight=weight, bias=bias, backend='torch')
    args.update(overrides)
    return ops.layer_norm(args.pop('x'), args.pop('weight'), args.pop('bias'), **args)


@pytest.mark.parametrize('overrides, message', [
    (dict(x=torch.tensor(1.0)), r'x must be a tensor of at least 1 dim \(\.\.\., C\)'),
    (dict(x=[1.0, 2.0]), r'x must be a tensor of at least 1 dim'),
    (dict(x=torch.ones(2, 6, dtype=torch.int32)), 'x must be a floating'),
    (dict(x=torch.randn(2, 0), weight=None, bias=None), 'x must have at least one channel'),
    (dict(weight=torch.randn(5)), r'weight must be None or have shape \(C,\) = \(6,\)'),
    (dict(weight=torch.randn(1, 6)), r'weight must be None or have shape \(C,\)'),
    (dict(weight=torch.ones(6, dtype=torch.int64)), 'weight must be a floating'),
    (dict(bias=torch.randn(7)), r'bias must be None or have shape \(C,\) = \(6,\)'),
    (dict(bias=torch.ones(6, dtype=torch.int32)), 'bias must be a floating'),
    (dict(eps=-1e-5), 'eps must be a finite number >= 0'),
    (dict(eps=float('nan')), 'eps must be a finite number >= 0'),
    (dict(eps='1e-5'), 'eps must be a finite number >= 0'),
    (dict(eps=True), 'eps must be a finite number >= 0'),
    (dict(backend='cuda'), 'backend must be one of'),
    (dict(backend='triton', x=torch.randn(2, 6, dtype=torch.float64)),
     'triton backend supports x dtypes'),
    (dict(backend='triton', bias=torch.randn(6, dtype=torch.float64)),
     'triton backend supports bias dtypes'),
])
def test_bad_arguments_raise(overrides, message):
    with pytest.raises(ValueError, match=message):
        _call(**overrides)


@pytest.mark.gpu
def test_device_mismatch_raises():
    x, weight, bias = make_inputs((2, 3, 6))
    for name, args in (('weight', (x, weight.cpu(), bias)), ('bias', (x, weight, bias.cpu()))):
        with pytest.raises(ValueError, match=f'{name} must be on the device of x'):
            ops.layer_norm(*args)


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16], ids=['bf16', 'fp16'])
@pytest.mark.parametrize('shape', [(128, 56, 56, 64), (128, 7, 7, 512), (6272, 768)],
                         ids=['401408x64', '6272x512', '6272x768'])
def test_triton_biformer_shapes_on_gpu(shape, dtype):
    """BiFormer residual-stream shapes: Triton in bf16/fp16 (fp32 weights, as the model's
    parameters) vs the fp32 reference, forward and grads; bitwise repeatable."""
    x, weight, bias = make_inputs(shape, torch.float32)
    grad_out = torch.randn_like(x)

    def run(backend, dtype_):
        return forward_and_grads(lambda *a: ops.layer_norm(*a, backend=backend),
                                 (x.to(dtype_), weight, bias), grad_out.to(dtype_))

    reference = run('torch', torch.float32)
    tested = run('triton', dtype)
    same_dtype = run('torch', dtype)
    assert tested[0].dtype == dtype and tested[1].dtype == dtype
    assert tested[2].dtype == tested[3].dtype == torch.float32
    for name, got, base, ref in zip(('out', 'dx', 'dweight', 'dbias'), tested, same_dtype,
                                    reference):
        err, base_err = relative_l2(got, ref), relative_l2(base, ref)
        assert err <= max(2 * base_err, 1e-4), f'{name}: rel. L2 {err:.3g} vs torch {base_err:.3g}'
    again = run('triton', dtype)
    for got, repeat in zip(tested, again):
        assert torch.equal(got, repeat)  # deterministic (no atomics)


@pytest.mark.gpu
def test_triton_autocast_matches_autocast_layer_norm_on_gpu():
    """Under bf16 autocast, fp32 x and weights: bf16 out like BiFormer's AutocastLayerNorm (which
    also rounds the weights to bf16, hence the tolerance)."""
    from backbones.biformer import AutocastLayerNorm
    module = AutocastLayerNorm(128).cuda()
    with torch.no_grad():
        module.weight.normal_(1, 0.5)
        module.bias.normal_(0, 0.3)
    x = torch.randn(64, 28, 28, 128, device='cuda')
    with torch.autocast('cuda', dtype=torch.bfloat16):
        ours = ops.layer_norm(x, module.weight, module.bias, module.eps)
        theirs = module(x)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    assert relative_l2(ours, theirs) < 1e-2
