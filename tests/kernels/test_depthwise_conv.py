"""ops.depthwise_conv2d: torch reference, Triton kernels (interpreter on CPU), custom-op glue."""
import pytest
import torch
import torch.nn.functional as F

import ops
from kernel_checks import forward_and_grads, max_error, relative_l2
from ops import _triton_depthwise_conv as kernels
from ops.depthwise_conv import depthwise_conv2d_reference

HAS_CUDA = torch.cuda.is_available()
DEVICE = 'cuda' if HAS_CUDA else 'cpu'
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def direct_oracle(x, weight, bias=None, add=None):
    """Independent fp64 oracle: zero-pad the NHWC map, sum the weighted shifted windows."""
    x, weight = x.double().cpu(), weight.double().cpu()
    _, height, width, _ = x.shape
    kernel_h, kernel_w = weight.shape[2:]
    padded = F.pad(x, (0, 0, kernel_w // 2, kernel_w // 2, kernel_h // 2, kernel_h // 2))
    out = torch.zeros_like(x)
    for u in range(kernel_h):
        for v in range(kernel_w):
            out += padded[:, u:u + height, v:v + width, :] * weight[:, 0, u, v]
    if bias is not None:
        out += bias.double().cpu()
    if add is not None:
        out += add.double().cpu()
    return out


def make_inputs(batch, height, width, chans, kernel_h, kernel_w, dtype=torch.float32,
                bias=True, add=True, device=DEVICE):
    def rand(*shape):
        return torch.randn(*shape, device=device).to(dtype)
    return (rand(batch, height, width, chans), rand(chans, 1, kernel_h, kernel_w),
            rand(chans) if bias else None, rand(batch, height, width, chans) if add else None)


def compare_to_fp64(x, weight, bias, add, backend='triton'):
    """Assert |backend - fp64| <= 2 |torch same dtype - fp64| + atol for out, dx, dw, db, dadd."""
    grad_out = torch.randn(x.shape, device=x.device).to(x.dtype)

    def run(backend_name, cast):
        def fn(*args):
            return ops.depthwise_conv2d(*args[:3], add=args[3], backend=backend_name)
        return forward_and_grads(fn, [None if t is None else cast(t)
                                      for t in (x, weight, bias, add)], cast(grad_out))

    tested = run(backend, lambda t: t)
    same_dtype = run('torch', lambda t: t)
    exact = run('torch', lambda t: t.double())
    assert tested[0].dtype == x.dtype and tested[0].is_contiguous()
    atol = ATOL[x.dtype]
    for name, got, base, ref in zip(('out', 'dx', 'dweight', 'dbias', 'dadd'), tested,
                                    same_dtype, exact):
        if ref is None:
            continue
        err, base_err = max_error(got, ref), max_error(base, ref)
        assert err <= 2 * base_err + atol, f'{name}: error {err:.3g} vs torch {base_err:.3g}'
        assert torch.isfinite(got).all()
    return tested


@pytest.fixture
def small_tiles():
    """Strips of 2 rows x 4 columns and 8 channels: several strips and channel blocks on tiny
    maps."""
    saved = {kind: dict(rows) for kind, rows in kernels._CONFIGS.items()}
    kernels.set_tile_configs({kind: {cls: (2, 4, 8, 1) for cls in kernels.TILE_CLASSES}
                              for kind in kernels.KINDS})
    yield
    kernels.set_tile_configs(saved)


# ----------------------------------------------------------------------------- reference


@pytest.mark.parametrize('kernel', [(3, 3), (5, 5), (3, 5)], ids=['3x3', '5x5', '3x5'])
def test_reference_matches_direct_oracle_and_conv_module(kernel):
    x, weight, bias, add = make_inputs(2, 6, 7, 5, *kernel, dtype=torch.float64, device='cpu')
    out = depthwise_conv2d_reference(x, weight, bias, add)
    assert out.is_contiguous()
    torch.testing.assert_close(out, direct_oracle(x, weight, bias, add))
    conv = torch.nn.Conv2d(5, 5, kernel, padding=(kernel[0] // 2, kernel[1] // 2), groups=5)
    conv.to(torch.float64).load_state_dict(dict(weight=weight, bias=bias))
    torch.testing.assert_close(out, add + conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


def test_reference_gradcheck_fp64():
    x, weight, bias, add = make_inputs(1, 4, 5, 3, 3, 5, dtype=torch.float64, device='cpu')
    inputs = tuple(t.requires_grad_() for t in (x, weight, bias, add))
    assert torch.autograd.gradcheck(
        lambda x_, w_, b_, a_: ops.depthwise_conv2d(x_, w_, b_, add=a_, backend='torch'), inputs)


def test_auto_backend_exports_with_torch_export():
    x, weight, bias, add = make_inputs(1, 5, 6, 4, 3, 3, device='cpu')

    class Conv(torch.nn.Module):
        def forward(self, x, add):
            return ops.depthwise_conv2d(x, weight, bias, add=add)
    program = torch.export.export(Conv(), (x, add))
    targets = {str(node.target) for node in program.graph.nodes}
    assert not any('dsa_ops' in t for t in targets)
    torch.testing.assert_close(program.module()(x, add), Conv()(x, add))


# ----------------------------------------------------------------------------- triton vs fp64

TRITON_CASES = {
    # name: (batch, height, width, channels, kernel_h, kernel_w, bias, add)
    '3x3_bias_add': (2, 9, 7, 12, 3, 3, True, True),
    '5x5_bias_add': (1, 9, 9, 16, 5, 5, True, True),
    '3x5_no_bias': (1, 6, 9, 8, 3, 5, False, True),
    '5x5_no_add': (2, 5, 3, 4, 5, 5, True, False),
    '1x1_plain': (1, 3, 4, 5, 1, 1, False, False),
    '7x5_map_narrower_than_kernel': (1, 8, 4, 8, 7, 5, True, True),
}


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16], ids=['fp32', 'fp16'])
@pytest.mark.parametrize('case', list(TRITON_CASES), ids=list(TRITON_CASES))
def test_triton_matches_fp64(case, dtype):
    batch, height, width, chans, kernel_h, kernel_w, bias, add = TRITON_CASES[case]
    compare_to_fp64(*make_inputs(batch, height, width, chans, kernel_h, kernel_w, dtype=dtype,
                                 bias=bias, add=add))


@pytest.mark.parametrize('kernel', [(3, 3), (5, 5)], ids=['3x3', '5x5'])
def test_triton_small_tiles_and_partial_channel_blocks(small_tiles, kernel):
    # 7x9 maps in 2x4 tiles or strips (4 x 3, ragged at both edges), C = 12 in blocks of 8;
    # the 5x5 halo spans two strips.
    compare_to_fp64(*make_inputs(1, 7, 9, 12, *kernel))


def test_triton_noncontiguous_inputs():
    x, weight, bias, add = make_inputs(2, 7, 6, 8, 5, 5)
    x = x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)        # NCHW storage
    qkv = torch.randn(2, 6, 7, 3 * 8, device=DEVICE).transpose(1, 2)  # BiFormer's v slice
    add = qkv[..., 8:16]
    weight = weight.transpose(2, 3).contiguous().transpose(2, 3)
    assert x.stride(3) != 1 and not add.is_contiguous() and not weight.is_contiguous()
    compare_to_fp64(x, weight, bias, add)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16], ids=['fp32', 'fp16'])
def test_triton_dx_adds_in_place_or_into_a_new_tensor(dtype):
    """``backward_dx(add=t, out=t)`` writes t + dx into t itself (BiFormer's v third of the qkv
    gradient), ``add=t`` alone into a new tensor (its pos-embed residual): the fp32 dx plus t,
    rounded once."""
    from ops import _triton_depthwise_conv as kernels
    x, weight, _, _ = make_inputs(2, 7, 6, 8, 5, 5)
    grad_out = torch.randn_like(x).to(dtype)
    buffer = torch.randn(2, 7, 6, 3 * 8, device=DEVICE).to(dtype)
    third = buffer[..., 16:]
    before, untouched = third.clone(), buffer[..., :16].clone()
    # the same products in fp32: grad_out exact, the weight rounded as the kernel rounds it
    dx = kernels.backward_dx(grad_out.float(), x, weight.to(dtype).float(), torch.float32)
    expected = (dx + before.float()).to(dtype)
    added = kernels.backward_dx(grad_out, x.to(dtype), weight, dtype, add=third)
    assert added.is_contiguous() and torch.equal(added, expected)
    assert torch.equal(third, before)
    result = kernels.backward_dx(grad_out, x.to(dtype), weight, dtype, add=third, out=third)
    assert result.data_ptr() == third.data_ptr() and torch.equal(third, expected)
    assert torch.equal(buffer[..., :16], untouched)


def test_triton_grad_of_add_is_the_output_gradient():
    x, weight, bias, add = make_inputs(1, 4, 4, 4, 3, 3)
    add.requires_grad_()
    out = ops.depthwise_conv2d(x, weight, bias, add=add, backend='triton')
    grad_out = torch.randn_like(out)
    grad_add, = torch.autograd.grad(out, add, grad_out)
    assert grad_add.data_ptr() == grad_out.data_ptr()


def test_triton_autocast_rounds_inputs_and_keeps_the_add_dtype():
    # fp16 autocast on the CPU (the interpreter rounds fp32 -> fp16 to nearest, as a GPU does).
    x, weight, bias, add = make_inputs(1, 5, 6, 8, 3, 3)
    with torch.autocast(x.device.type, dtype=torch.float16):
        out = ops.depthwise_conv2d(x, weight, bias, add=add, backend='triton')
        conv = ops.depthwise_conv2d(x, weight, bias, backend='triton')
        ref_out = ops.depthwise_conv2d(x, weight, bias, add=add, backend='torch')
    assert out.dtype == ref_out.dtype == torch.float32 and conv.dtype == torch.float16
    rounded = [t.half().double() for t in (x, weight, bias)]
    torch.testing.assert_close(out.double().cpu(), direct_oracle(*rounded, add), atol=1e-5,
                               rtol=1e-5)


@pytest.mark.parametrize('backend', ['triton', 'torch'])
@pytest.mark.parametrize('shape', [(0, 5, 5, 4), (1, 0, 5, 4), (2, 5, 0, 4)],
                         ids=['batch0', 'height0', 'width0'])
def test_zero_size_inputs(shape, backend):
    inputs = make_inputs(*shape, 3, 3)
    out, *grads = forward_and_grads(
        lambda x_, w_, b_, a_: ops.depthwise_conv2d(x_, w_, b_, add=a_, backend=backend),
        inputs, torch.randn(shape, device=DEVICE))
    assert out.shape == shape
    for grad, t in zip(grads, inputs):
        assert grad.shape == t.shape and not grad.any()


# ----------------------------------------------------------------------------- custom op


def test_custom_op_opcheck():
    x, weight, bias, add = make_inputs(1, 4, 5, 8, 3, 3)
    args = tuple(t.requires_grad_() for t in (x, weight, bias, add)) + (torch.float32,)
    torch.library.opcheck(kernels.depthwise_conv2d_fwd, args,
                          test_utils=('test_schema', 'test_faketensor',
                                      'test_autograd_registration'))


def test_torch_compile_fullgraph():
    x, weight, bias, add = make_inputs(1, 5, 4, 8, 3, 3)

    def layer(x_, w_, b_, a_):
        return ops.depthwise_conv2d(x_ * 2, w_, b_, add=a_, backend='triton').sigmoid()
    grad_out = torch.randn_like(x)
    compiled = torch.compile(layer, fullgraph=True, backend='aot_eager')
    for got, expected in zip(forward_and_grads(compiled, (x, weight, bias, add), grad_out),
                             forward_and_grads(layer, (x, weight, bias, add), grad_out)):
        torch.testing.assert_close(got, expected)


# ----------------------------------------------------------------------------- bad input


def _call(**overrides):
    x, weight, bias, add = make_inputs(1, 4, 5, 6, 3, 3, device='cpu')
    args = dict(x=x, weight=weight, bias=bias, add=add, backend='torch')
    args.update(overrides)
    return ops.depthwise_conv2d(args.pop('x'), args.pop('weight'), args.pop('bias'), **args)


@pytest.mark.parametrize('overrides, message', [
    (dict(x=torch.randn(4, 5, 6)), r'x must be a 4-D tensor \(B, H, W, C\)'),
    (dict(x=torch.ones(1, 4, 5, 6, dtype=torch.int32)), 'x must be a floating'),
    (dict(x=torch.randn(1, 4, 5, 0), weight=torch.randn(0, 1, 3, 3), bias=None, add=None),
     'x must have at least one channel'),
    (dict(weight=torch.randn(6, 3, 3)), r'weight must have shape \(C, 1, kh, kw\) = \(6, 1'),
    (dict(weight=torch.randn(5, 1, 3, 3)), r'weight must have shape \(C, 1, kh, kw\)'),
    (dict(weight=torch.randn(6, 2, 3, 3)), r'weight must have shape \(C, 1, kh, kw\)'),
    (dict(weight=torch.randn(6, 1, 4, 3)), 'with odd kh, kw'),
    (dict(weight=torch.randn(6, 1, 3, 2)), 'with odd kh, kw'),
    (dict(weight=torch.randn(6, 1, 3, 3, dtype=torch.float64)), 'weight must have the dtype of x'),
    (dict(bias=torch.randn(5)), r'bias must have shape \(C,\) = \(6,\)'),
    (dict(bias=torch.randn(6, dtype=torch.float64)), 'bias must have the dtype of weight'),
    (dict(add=torch.randn(1, 4, 6, 6)), r'add must have the shape of x \(B, H, W, C\)'),
    (dict(add=torch.ones(1, 4, 5, 6, dtype=torch.int64)), 'add must be a floating'),
    (dict(backend='cuda'), 'backend must be one of'),
    (dict(backend='triton', x=torch.randn(1, 4, 5, 6, dtype=torch.float64),
          weight=torch.randn(6, 1, 3, 3, dtype=torch.float64), bias=None, add=None),
     'triton backend supports x dtypes'),
])
def test_bad_arguments_raise(overrides, message):
    with pytest.raises(ValueError, match=message):
        _call(**overrides)


@pytest.mark.gpu
def test_device_mismatch_raises():
    x, weight, bias, add = make_inputs(1, 4, 5, 6, 3, 3)
    for name, args in (('weight', (x, weight.cpu(), bias, add)),
                       ('bias', (x, weight, bias.cpu(), add)),
                       ('add', (x, weight, bias, add.cpu()))):
        with pytest.raises(ValueError, match=f'{name} must be on the device of x'):
            ops.depthwise_conv2d(*args[:3], add=args[3])


# ----------------------------------------------------------------------------- GPU, bf16


@pytest.mark.gpu
@pytest.mark.parametrize('kernel', [3, 5])
def test_triton_bf16_biformer_shape_on_gpu(kernel):
    """BiFormer-S stage 1 (56x56x64): bf16 Triton vs the fp32 reference, forward and grads."""
    x, weight, bias, add = make_inputs(8, 56, 56, 64, kernel, kernel, dtype=torch.float32)
    grad_out = torch.randn_like(x)

    def run(backend, dtype):
        return forward_and_grads(
            lambda x_, w_, b_, a_: ops.depthwise_conv2d(x_, w_, b_, add=a_, backend=backend),
            [t.to(dtype) for t in (x, weight, bias, add)], grad_out.to(dtype))

    reference = run('torch', torch.float32)
    tested = run('triton', torch.bfloat16)
    same_dtype = run('torch', torch.bfloat16)
    for name, got, base, ref in zip(('out', 'dx', 'dweight', 'dbias', 'dadd'), tested,
                                    same_dtype, reference):
        err, base_err = relative_l2(got, ref), relative_l2(base, ref)
        assert err <= max(2 * base_err, 8e-3), f'{name}: rel. L2 {err:.3g} vs torch {base_err:.3g}'
    again = run('triton', torch.bfloat16)
    for got, repeat in zip(tested, again):
        assert torch.equal(got, repeat)  # deterministic (no atomics)


@pytest.mark.gpu
@pytest.mark.parametrize('topk', [49, -2], ids=['routing_all_regions', 'full_attention'])
def test_biformer_block_matches_official_convs_on_gpu(topk):
    """A BiFormer block (3x3 pos_embed, 5x5 LePE through depthwise_conv2d) under bf16 autocast
    vs the same weights on the official formulation (permute, cuDNN conv, permute, add). Every
    region is routed, so rounding differences cannot flip the routing."""
    from backbones.biformer import BiFormerBlock
    fused = BiFormerBlock(64, topk=topk, n_win=7).cuda()
    official = BiFormerBlock(64, topk=topk, n_win=7, attn_impl='gather').cuda()
    official.load_state_dict(fused.state_dict())
    x = torch.randn(4, 28, 28, 64, device='cuda')
    results = []
    for block in (fused, official):
        x_in = x.clone().requires_grad_()
        with torch.autocast('cuda', dtype=torch.bfloat16):
            out = block(x_in)
        out.float().square().mean().backward()
        results.append((out, x_in.grad, {n: p.grad for n, p in block.named_parameters()}))
    (out_f, dx_f, grads_f), (out_o, dx_o, grads_o) = results
    assert out_f.dtype == out_o.dtype == torch.float32  # the residual stream stays fp32
    assert relative_l2(out_f, out_o) < 2e-2 and relative_l2(dx_f, dx_o) < 3e-2
    for name in ('pos_embed.weight', 'pos_embed.bias', 'attn.lepe.weight', 'attn.lepe.bias'):
        assert relative_l2(grads_f[name], grads_o[name]) < 3e-2, name


def test_tile_classes_follow_kernel_height_and_element_size():
    assert kernels.tile_class(1, torch.bfloat16) == '3/16'
    assert kernels.tile_class(3, torch.float16) == '3/16'
    assert kernels.tile_class(3, torch.float32) == '3/32'
    assert kernels.tile_class(7, torch.float32) == '5/32'
    assert set(kernels.TILE_CLASSES) == {c for rows in kernels._CONFIGS.values() for c in rows}
    with pytest.raises(ValueError, match='tile class must be one of'):
        kernels.set_tile_configs({'fwd': {'7/16': (8, 8, 32, 1)}})
    with pytest.raises(ValueError, match='4 powers of two'):
        kernels.set_tile_configs({'dw': {'3/16': (8, 8, 30, 1)}})
