"""BiFormerBlock(fused_block=True): one autograd node per block, same results as the module
path (CPU: the Triton launchers run through the interpreter)."""
import copy

import pytest
import timm
import torch

import backbones  # noqa: F401  (registers the models)
from backbones import _fused_block
from backbones.biformer import BiFormer, BiFormerBlock


@pytest.fixture
def fused_on_cpu(monkeypatch):
    monkeypatch.setattr(BiFormerBlock, 'FUSED_BLOCK_DEVICES', ('cuda', 'cpu'))


def _block(pad_mode='official', topk=4, drop_path=0.0, dim=64):
    block = BiFormerBlock(dim, topk, n_win=7, pad_mode=pad_mode, drop_path=drop_path,
                          fused_block=True).train()
    with torch.no_grad():  # non-trivial norms and biases
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return block


def _run(block, x, grad, fused, dtype):
    block = copy.deepcopy(block).to(dtype)
    block.fused_block = fused
    x = x.to(dtype).requires_grad_()
    torch.manual_seed(1)  # the drop-path draws
    out = block(x)
    params = list(block.parameters())
    return [out] + list(torch.autograd.grad(out, [x] + params, grad.to(dtype)))


def _relative_l2(got, expected):
    return ((got.double() - expected.double()).norm() / expected.double().norm()).item()


@pytest.mark.parametrize('pad_mode, size, topk, drop_path', [
    ('official', 14, 4, 0.0),   # 2x2 regions, several slots (split backward)
    ('official', 15, 4, 0.5),   # padded to 21, drop path drawn as the module does
    ('masked', 15, 2, 0.0),     # padded keys excluded, padded values zeroed
    ('masked', 14, 1, 0.0),     # one slot (one-kernel backward)
    ('official', 5, -2, 0.5),   # full attention (the last stage), any size
])
def test_matches_module_path_fp32(fused_on_cpu, pad_mode, size, topk, drop_path):
    block = _block(pad_mode, topk, drop_path)
    x, grad = torch.randn(2, size, size, 64), torch.randn(2, size, size, 64)
    fused = _run(block, x, grad, True, torch.float32)
    module = _run(block, x, grad, False, torch.float32)
    for got, expected in zip(fused, module):
        assert got.dtype == expected.dtype and got.shape == expected.shape
        assert _relative_l2(got, expected) < 1e-5


@pytest.mark.parametrize('pad_mode, size', [('official', 14), ('masked', 13)])
def test_matches_module_path_with_the_whole_map_backward(fused_on_cpu, monkeypatch, pad_mode,
                                                         size):
    """The attention backward on ops._triton_map_attention, writing into the qkv gradient."""
    from ops import _triton_map_attention as whole_map
    calls = []
    launch = whole_map.backward
    monkeypatch.setattr(whole_map, 'backward',
                        lambda *args, **kwargs: (calls.append(1), launch(*args, **kwargs)))
    whole_map.set_map_backward('on')
    try:
        block = _block(pad_mode, 4)
        x, grad = torch.randn(2, size, size, 64), torch.randn(2, size, size, 64)
        fused = _run(block, x, grad, True, torch.float32)
        module = _run(block, x, grad, False, torch.float32)
    finally:
        whole_map.set_map_backward('auto')
    assert calls
    for got, expected in zip(fused, module):
        assert _relative_l2(got, expected) < 1e-5


@pytest.mark.parametrize('dtype, second', [(torch.float32, 'ops._triton_layer_norm'),
                                           (torch.float16, 'ops._triton_ln_mlp')],
                         ids=['fp32_six_launches', 'fp16_mlp_kernel'])
def test_layer_norms_on_the_kernels_at_every_size(fused_on_cpu, monkeypatch, dtype, second):
    """The block's LayerNorms run ops' kernels at any size: the second inside the MLP kernel
    with 16-bit products, on ops.layer_norm's kernel with fp32 ones (six launches). The module
    path's run them from FUSED_MIN_NUMEL elements (here every size too), and the two agree,
    drop path included (the masks drawn in the same order)."""
    from backbones.biformer import AutocastLayerNorm
    from ops import _triton_layer_norm, _triton_ln_mlp
    calls = []
    for module in (_triton_layer_norm, _triton_ln_mlp):
        monkeypatch.setattr(module, 'forward', lambda *a, _f=module.forward, _m=module, **k:
                            calls.append(_m.__name__) or _f(*a, **k))
    block = _block('masked', topk=2, drop_path=0.5)
    x, grad = torch.randn(4, 15, 15, 64), torch.randn(4, 15, 15, 64)
    got = _run(block, x, grad, True, dtype)
    assert calls == ['ops._triton_layer_norm', second]
    monkeypatch.setattr(AutocastLayerNorm, 'FUSED_MIN_NUMEL', 1)
    tolerance = 1e-5 if dtype == torch.float32 else 5e-3
    for got_t, expected in zip(got, _run(block, x, grad, False, dtype)):
        assert _relative_l2(got_t, expected) < tolerance


def test_mlp_kernel_limits_eager_and_captured(monkeypatch):
    """Eager calls take the MLP kernel up to C = 128, and at C = 256 for at most 32768 rows
    (fewer launches for the host against a bounded GPU cost); calls captured into a CUDA graph
    only up to C = 128, where it is the faster on the GPU; never above the kernel's width, and
    only for 16-bit products."""
    def takes(batch, side, chans, dtype=torch.bfloat16):
        x = torch.zeros(batch, side, side, chans)
        return _fused_block.takes_mlp_kernel(x, torch.zeros(3 * chans, chans),
                                             torch.zeros(chans, 3 * chans), dtype)
    assert takes(128, 56, 64) and takes(128, 28, 128) and takes(128, 14, 256)
    assert takes(1, 7, 64, torch.float16) and not takes(1, 7, 64, torch.float32)  # 16-bit only
    assert not takes(128, 28, 192) and not takes(128, 7, 512)  # too many rows; too wide
    assert takes(8, 14, 192)
    monkeypatch.setattr(torch.Tensor, 'is_cuda', property(lambda self: True))
    monkeypatch.setattr(torch.cuda, 'is_current_stream_capturing', lambda: True)
    assert takes(128, 56, 64) and takes(128, 28, 128) and not takes(8, 14, 256)


def test_mlp_kernel_skips_non_contiguous_weights(fused_on_cpu, monkeypatch):
    """The MLP kernel reads its weights as contiguous rows: a transposed-storage fc1 weight
    takes the six launches instead, with the same result."""
    from ops import _triton_ln_mlp
    calls = []
    monkeypatch.setattr(_triton_ln_mlp, 'forward', lambda *a, _f=_triton_ln_mlp.forward, **k:
                        calls.append(1) or _f(*a, **k))
    block = _block().half()
    x = torch.randn(1, 14, 14, 64).half()
    with torch.no_grad():
        expected = block(x)
        fc1 = block.mlp.fc1
        fc1.weight = torch.nn.Parameter(fc1.weight.detach().t().contiguous().t())
        assert not fc1.weight.is_contiguous()
        got = block(x)
    assert len(calls) == 1  # the first call only
    assert _relative_l2(got, expected) < 5e-3


@pytest.mark.parametrize('topk, size', [(2, 15), (-2, 6)], ids=['routing', 'full'])
def test_fp16_against_fp64(fused_on_cpu, topk, size):
    """fp16 through the fused block, against the module path in fp64 (relative L2)."""
    block = _block('masked', topk=topk)
    x, grad = torch.randn(2, size, size, 64), torch.randn(2, size, size, 64)
    fused = _run(block, x, grad, True, torch.float16)
    reference = _run(block, x, grad, False, torch.float64)
    for got, expected in zip(fused, reference):
        assert got.dtype == torch.float16
        assert _relative_l2(got, expected) < 1e-2


def test_fp16_autocast_against_fp64(fused_on_cpu):
    """Mixed precision as in GPU training: fp32 parameters and input, fp16 autocast (bf16 dots
    are wrong in the interpreter); fp32 parameter gradients, against fp64."""
    block = _block('masked', topk=2)
    x, grad = torch.randn(2, 15, 15, 64), torch.randn(2, 15, 15, 64)
    leaf = x.clone().requires_grad_()
    with torch.autocast('cpu', dtype=torch.float16):
        out = block(leaf)
    assert out.dtype == torch.float32  # the residual stream keeps x's dtype, as the modules'
    fused = [out] + list(torch.autograd.grad(out, [leaf] + list(block.parameters()),
                                             grad.half()))
    reference = _run(block, x, grad, False, torch.float64)
    for got, expected, param in zip(fused, reference, [None, leaf] + list(block.parameters())):
        if param is not None:
            assert got.dtype == param.dtype
        assert _relative_l2(got, expected) < 1e-2
    # Inference hands the MLP kernel the fp32 parameters, which it rounds as it reads them:
    # the same values as the training forward's casts, so the same output, bit for bit.
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.float16):
        assert torch.equal(block(x), out.detach())


def test_no_grad_and_frozen_parameters(fused_on_cpu):
    block = _block()
    x = torch.randn(1, 14, 14, 64)
    with torch.no_grad():
        out = block(x)
        block.fused_block = False
        expected = block(x)
    assert out.grad_fn is None
    assert _relative_l2(out, expected) < 1e-5
    block.fused_block = True
    with torch.inference_mode():
        assert _relative_l2(block(x), expected) < 1e-5
    for p in block.parameters():
        p.requires_grad_(False)
    x.requires_grad_()
    (grad_x,) = torch.autograd.grad(block(x).sum(), x)
    block.fused_block = False
    (expected_x,) = torch.autograd.grad(block(x).sum(), x)
    assert _relative_l2(grad_x, expected_x) < 1e-5


def test_empty_batch_and_no_double_backward(fused_on_cpu):
    block = _block()
    x = torch.randn(0, 14, 14, 64, requires_grad=True)
    out = block(x)
    assert out.shape == x.shape
    grads = torch.autograd.grad(out.sum(), [x] + list(block.parameters()))
    assert all(not g.any() for g in grads)
    x = torch.randn(1, 14, 14, 64, requires_grad=True)
    (grad_x,) = torch.autograd.grad(block(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        grad_x.sum().backward()  # the kernels' backward is not differentiable


def test_taken_only_where_it_applies(monkeypatch, fused_on_cpu):
    calls = []
    original = _fused_block.fused_block
    monkeypatch.setattr(_fused_block, 'fused_block',
                        lambda block, x: calls.append(block) or original(block, x))
    x = torch.randn(1, 14, 14, 64)
    _block()(x)
    _block(topk=-2)(x)                                            # full attention
    assert len(calls) == 2
    BiFormerBlock(64, 4, n_win=7, fused_block=False)(x)           # fused_block off
    BiFormerBlock(64, 4, n_win=7, attn_impl='gather', fused_block=True)(x)
    _block().double()(x.double())                                 # fp64: no Triton path
    monkeypatch.setattr(BiFormerBlock, 'FUSED_BLOCK_DEVICES', ('cuda',))
    _block()(x)                                                   # CPU, default devices
    assert len(calls) == 2


def test_whole_model_with_drop_path_and_checkpointing(fused_on_cpu):
    """A small BiFormer, training step with stochastic depth, with and without gradient
    checkpointing: the fused blocks give the module path's logits and gradients."""
    torch.manual_seed(0)
    model = BiFormer(depths=(1, 1, 2, 1), embed_dims=(32, 64, 96, 128), n_win=2,
                     num_classes=10, drop_path_rate=0.3, fused_block=True).train()
    x = torch.randn(2, 3, 64, 64)

    def step(fused, checkpointing=False):
        clone = copy.deepcopy(model)
        for module in clone.modules():
            if isinstance(module, BiFormerBlock):
                module.fused_block = fused
        clone.set_grad_checkpointing(checkpointing)
        torch.manual_seed(3)
        logits = clone(x)
        grads = torch.autograd.grad(logits.square().mean(), list(clone.parameters()))
        return [logits] + list(grads)

    expected = step(False)
    for checkpointing in (False, True):
        for got, want in zip(step(True, checkpointing), expected):
            # + 1e-7: convolution biases before a BatchNorm get zero gradients up to rounding
            assert (got - want).norm() <= 1e-5 * want.norm() + 1e-7


def test_timm_argument():
    """On by default; ``fused_block=False`` selects the module path."""
    blocks = [m for m in timm.create_model('biformer_tiny').modules()
              if isinstance(m, BiFormerBlock)]
    assert blocks and all(b.fused_block for b in blocks)
    assert not any(b.fused_block for b in timm.create_model('biformer_tiny', fused_block=False)
                   .modules() if isinstance(b, BiFormerBlock))


@pytest.mark.gpu
@pytest.mark.parametrize('dim, size, topk, pad_mode', [
    (64, 56, 1, 'official'),     # BiFormer-T/S stage 1 at 224 px
    (256, 14, 16, 'official'),   # stage 3
    (128, 25, 4, 'masked'),      # stage 2 of an odd-sized detection input
    (512, 7, -2, 'official'),    # stage 4: full attention
])
def test_bf16_autocast_matches_module_path_on_gpu(dim, size, topk, pad_mode, monkeypatch):
    """bf16 autocast on CUDA, the module path on the same kernels as the reference (relative
    L2 of the output and of every gradient). Its LayerNorms take ops.layer_norm's kernels at
    every size too, as the fused block's do. Below FUSED_MIN_NUMEL its default PyTorch
    LayerNorm rounds the weights to bf16. With that default, the three routing cases failed on
    the H200 (2026-12-01) and the full-attention one passed, as expected if that rounding flips
    near-tie routing picks."""
    from backbones.biformer import AutocastLayerNorm
    monkeypatch.setattr(AutocastLayerNorm, 'FUSED_MIN_NUMEL', 1)
    block = _block(pad_mode, topk, dim=dim).cuda()
    x = torch.randn(8, size, size, dim, device='cuda')
    grad = torch.randn(8, size, size, dim, device='cuda')
    results = []
    for fused in (True, False):
        clone = copy.deepcopy(block)
        clone.fused_block = fused
        leaf = x.clone().requires_grad_()
        with torch.autocast('cuda', dtype=torch.bfloat16):
            out = clone(leaf)
        results.append([out] + list(torch.autograd.grad(out, [leaf] + list(clone.parameters()),
                                                        grad.to(out.dtype))))
    for got, expected in zip(*results):
        assert got.dtype == expected.dtype
        assert (got.float() - expected.float()).norm() <= 2e-2 * expected.float().norm() + 1e-6
