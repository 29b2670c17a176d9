"""ops.gelu_mlp: same values and gradients as Linear -> GELU -> Linear, less saved."""
import pytest
import torch
import torch.nn.functional as F

import ops


def _params(in_features=6, hidden=12, out_features=5, dtype=torch.float64, bias=True):
    gen = torch.Generator().manual_seed(0)
    make = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_()  # noqa: E731
    return (make(hidden, in_features), make(hidden) if bias else None,
            make(out_features, hidden), make(out_features) if bias else None)


def _plain(x, w1, b1, w2, b2):
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


def _grads(fn, x, params, grad):
    inputs = [t for t in (x,) + tuple(params) if t is not None]
    return torch.autograd.grad(fn(x, *params), inputs, grad)


@pytest.mark.parametrize('bias', [True, False])
def test_matches_plain_composition_fp64(bias):
    params = _params(bias=bias)
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64, requires_grad=True)
    out = ops.gelu_mlp(x, *params)
    torch.testing.assert_close(out, _plain(x, *params), rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    for ours, ref in zip(_grads(ops.gelu_mlp, x, params, grad), _grads(_plain, x, params, grad)):
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


def test_gradcheck_fp64():
    params = _params(4, 5, 3)
    x = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ops.gelu_mlp, (x,) + params)


def test_autocast_matches_nn_linear_dtypes():
    """Under bf16 autocast: the plain composition's bf16 output and fp32 parameter gradients,
    bit for bit (same products in the same dtypes)."""
    params = [p.detach().float().requires_grad_() for p in _params(16, 48, 16)]
    x = torch.randn(64, 16, requires_grad=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = ops.gelu_mlp(x, *params)
        ref = _plain(x, *params)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, [x] + params, grad)
    theirs = torch.autograd.grad(ref, [x] + params, grad)
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _saved_bytes(fn, x, params):
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x, *params)
    return total


def test_saves_one_hidden_activation_less():
    params = [p.detach().float().requires_grad_() for p in _params(8, 32, 8)]
    x = torch.randn(100, 8, requires_grad=True)
    saved, plain = _saved_bytes(ops.gelu_mlp, x, params), _saved_bytes(_plain, x, params)
    assert plain - saved >= 100 * 32 * 4


def test_frozen_parameters_and_no_grad():
    w1, b1, w2, b2 = (p.detach() for p in _params())
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    (grad_x,) = torch.autograd.grad(ops.gelu_mlp(x, w1, b1, w2, b2).sum(), x)
    (ref_x,) = torch.autograd.grad(_plain(x, w1, b1, w2, b2).sum(), x)
    torch.testing.assert_close(grad_x, ref_x)
    with torch.no_grad():
        assert ops.gelu_mlp(x, w1, b1, w2, b2).grad_fn is None


def test_empty_input():
    params = _params()
    x = torch.randn(0, 6, dtype=torch.float64, requires_grad=True)
    out = ops.gelu_mlp(x, *params)
    assert out.shape == (0, 5)
    grads = torch.autograd.grad(out.sum(), [x] + list(params))
    assert all(float(g.abs().sum()) == 0.0 for g in grads)


@pytest.mark.parametrize('which, match', [
    ('fc1_weight', 'fc1_weight'), ('fc2_weight', 'fc2_weight'), ('fc1_bias', 'fc1_bias'),
    ('fc2_bias', 'fc2_bias'), ('x', 'x must be')])
def test_bad_arguments(which, match):
    args = dict(zip(('fc1_weight', 'fc1_bias', 'fc2_weight', 'fc2_bias'), _params()))
    args['x'] = torch.randn(3, 6, dtype=torch.float64)
    args[which] = torch.ones(2, dtype=torch.long) if which == 'x' else torch.randn(3, 3, 3)
    with pytest.raises(ValueError, match=match):
        ops.gelu_mlp(**args)


def test_column_sum_short_or_cpu_is_sum():
    x = torch.randn(300, 7, dtype=torch.float64)
    assert torch.equal(ops.column_sum(x), x.sum(0))


@pytest.mark.gpu
@pytest.mark.parametrize('rows, chans', [(16384, 64), (50000, 192), (1000, 96)])
def test_column_sum_cuda_bf16_rounds_like_sum(rows, chans):
    """Tall matrices take the matrix-vector product: within one bf16 rounding of the fp32 sum,
    as ``sum(0)`` is."""
    x = torch.randn(rows, chans, device='cuda', dtype=torch.bfloat16)
    exact = x.double().sum(0)
    ours = ops.column_sum(x)
    assert ours.dtype == torch.bfloat16 and ours.shape == (chans,)
    ulp = 2.0 ** (torch.frexp(exact.abs().float())[1] - 8).double()
    assert ((ours.double() - exact).abs() <= ulp + 1e-3 * exact.abs().max()).all()
    assert (x.sum(0).double() - exact).abs().max() <= ulp.max() + 1e-3 * exact.abs().max()


@pytest.mark.gpu
def test_gelu_mlp_cuda_autocast_tall_matches_plain():
    """BiFormer's stage-1 size class (bias gradients by matrix-vector products)."""
    params = [p.detach().float().cuda().requires_grad_() for p in _params(64, 192, 64)]
    x = torch.randn(32768, 64, device='cuda', requires_grad=True)
    grad = torch.randn(32768, 64, device='cuda', dtype=torch.bfloat16)
    with torch.autocast('cuda', dtype=torch.bfloat16):
        out, ref = ops.gelu_mlp(x, *params), _plain(x, *params)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for ours, theirs in zip(torch.autograd.grad(out, [x] + params, grad),
                            torch.autograd.grad(ref, [x] + params, grad)):
        assert ours.dtype == theirs.dtype
        torch.testing.assert_close(ours, theirs, rtol=1e-2, atol=1e-2 * theirs.abs().max().item())


@pytest.mark.parametrize('device', ['cpu', pytest.param('cuda', marks=pytest.mark.gpu)])
def test_weight_gradient_fp32_from_bf16(device):
    """fp32 weight gradients of bf16 operands: on CUDA straight from the product (closer to the
    exact product than the rounded-then-cast one), elsewhere the cast product."""
    from ops.mlp import weight_gradient
    grad = torch.randn(4096, 96, device=device, dtype=torch.bfloat16)
    x = torch.randn(4096, 64, device=device, dtype=torch.bfloat16)
    exact = grad.double().t() @ x.double()
    ours = weight_gradient(grad, x, torch.float32)
    cast = (grad.t() @ x).float()
    assert ours.dtype == torch.float32 and ours.shape == (96, 64)
    error, cast_error = ((t.double() - exact).norm() / exact.norm() for t in (ours, cast))
    assert error <= cast_error * (0.5 if device == 'cuda' else 1.0) + 1e-7
    assert weight_gradient(grad, x, torch.bfloat16).dtype == torch.bfloat16
