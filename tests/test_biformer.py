"""BiFormer timm models: architecture, official-checkpoint parity, timm contract, padding."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2

import backbones  # noqa: F401  (registers the timm models)
import ops
from backbones.biformer import (AutocastLayerNorm, BiLevelRoutingAttention, checkpoint_filter_fn,
                                remap_official_keys)
from biformer_official import OfficialBiFormer, randomize, to_official_keys

MODEL_NAMES = timm.list_models('biformer_*')
# Small architecture for the numerical tests: every stage and block type, few FLOPs.
SMALL_ARCH = dict(depths=(1, 1, 2, 1), embed_dims=(32, 64, 128, 256), num_classes=10)


# --- architecture ---

@pytest.mark.parametrize('name, params_m, depths, dims', [
    ('biformer_tiny', 13.1, (2, 2, 8, 2), (64, 128, 256, 512)),
    ('biformer_small', 25.5, (4, 4, 18, 4), (64, 128, 256, 512)),
    ('biformer_base', 56.8, (4, 4, 18, 4), (96, 192, 384, 768)),
])
def test_official_architecture(name, params_m, depths, dims):
    with torch.device('meta'):  # shapes only: skips the weight initialisation
        model = timm.create_model(name)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == params_m
    assert tuple(len(stage.blocks) for stage in model.stages) == depths
    assert [info['num_chs'] for info in model.feature_info] == list(dims)
    attns = [stage.blocks[0].attn for stage in model.stages]
    assert [a.topk for a in attns[:3]] == [1, 4, 16] and not hasattr(attns[3], 'topk')
    assert [a.num_heads for a in attns] == [d // 32 for d in dims[:3]] + [8]
    assert all(a.n_win == 7 for a in attns[:3])
    assert attns[0].scale == dims[0] ** -0.5  # official quirk: full qk dim
    block = model.stages[0].blocks[0]
    assert block.pos_embed.kernel_size == (3, 3) and block.attn.lepe.kernel_size == (5, 5)
    assert block.mlp.fc1.out_features == 3 * dims[0]


# --- official checkpoints and parity ---

def test_checkpoint_round_trip_from_official_keys():
    model = timm.create_model('biformer_tiny', **SMALL_ARCH)
    ours = model.state_dict()
    official = to_official_keys(ours, model)
    assert any(k.startswith('downsample_layers.3.') for k in official)
    assert any('.attn.qkv.qkv.' in k for k in official) and any('.attn.wo.' in k for k in official)
    for checkpoint in (official, {'model': official},
                       {'state_dict': {f'module.{k}': v for k, v in official.items()}}):
        mapped = checkpoint_filter_fn(checkpoint, model)
        assert mapped.keys() == ours.keys()
        assert all(mapped[k] is ours[k] for k in ours)
    assert remap_official_keys(ours).keys() == ours.keys()  # ours passes through


@pytest.mark.parametrize('attn_impl', ['fused', 'gather'])
def test_official_logits_at_224(attn_impl):
    """A model loaded from an official-format state dict gives the official model's logits."""
    official = randomize(OfficialBiFormer(SMALL_ARCH['depths'], SMALL_ARCH['embed_dims'],
                                           num_classes=10))
    ours = timm.create_model('biformer_tiny', attn_impl=attn_impl, **SMALL_ARCH).eval()
    ours.load_state_dict(checkpoint_filter_fn({'model': official.state_dict()}, ours))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), official(x), rtol=1e-4, atol=1e-4)


def test_official_logits_with_official_padding():
    """Odd sizes: pad_mode='official' reproduces the official auto_pad (unmasked padding)."""
    official = randomize(OfficialBiFormer(SMALL_ARCH['depths'], SMALL_ARCH['embed_dims'],
                                           n_win=4, auto_pad=True, num_classes=10))
    ours = timm.create_model('biformer_tiny', n_win=4, pad_mode='official', **SMALL_ARCH).eval()
    ours.load_state_dict(checkpoint_filter_fn(official.state_dict(), ours))
    x = torch.randn(1, 3, 101, 75)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), official(x), rtol=1e-4, atol=1e-4)


def test_pretrained_from_local_file(tmp_path):
    """pretrained=True loads a local official checkpoint through the filter (no download)."""
    official = randomize(OfficialBiFormer(SMALL_ARCH['depths'], SMALL_ARCH['embed_dims'],
                                           auto_pad=True))
    path = tmp_path / 'biformer_official.pth'
    torch.save({'model': official.state_dict()}, path)
    model = timm.create_model('biformer_tiny', pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path)),
                              **dict(SMALL_ARCH, num_classes=1000)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), official(x), rtol=1e-4, atol=1e-4)


# --- timm contract, for every registered model ---

@pytest.fixture(scope='module', params=MODEL_NAMES)
def registered_model(request):
    torch.manual_seed(0)
    return timm.create_model(request.param).eval()


def test_registered_models():
    assert MODEL_NAMES == ['biformer_base', 'biformer_small', 'biformer_tiny']


def test_default_cfg(registered_model):
    cfg = registered_model.pretrained_cfg
    assert cfg['input_size'] == (3, 224, 224) and cfg['pool_size'] == (7, 7)
    assert cfg['crop_pct'] == 0.875 and cfg['interpolation'] == 'bicubic'
    assert cfg['mean'] == timm.data.IMAGENET_DEFAULT_MEAN
    assert cfg['std'] == timm.data.IMAGENET_DEFAULT_STD
    state = registered_model.state_dict()
    assert cfg['first_conv'] + '.weight' in state and cfg['classifier'] + '.weight' in state
    assert registered_model.num_classes == cfg['num_classes'] == 1000


def test_forward_features_head_and_intermediates(registered_model):
    model, x = registered_model, torch.randn(1, 3, 32, 32)  # the smallest input: cheap
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (1, model.num_features, 1, 1)
        torch.testing.assert_close(model.forward_head(features, pre_logits=True),
                                   features.flatten(1))
        logits = model.forward_head(features)
        assert logits.shape == (1, 1000)
        torch.testing.assert_close(logits, model.head.fc(features.flatten(1)))

        final, intermediates = model.forward_intermediates(x, norm=True)
        torch.testing.assert_close(final, features)
        torch.testing.assert_close(intermediates[-1], final)  # norm=True: the last one normed
        assert [tuple(f.shape[1:]) for f in intermediates] == [
            (info['num_chs'], 32 // info['reduction'], 32 // info['reduction'])
            for info in model.feature_info]
        first = model.forward_intermediates(x, indices=[0], stop_early=True,
                                            intermediates_only=True)
        assert len(first) == 1 and first[0].shape[1] == model.feature_info[0]['num_chs']
        last_two = model.forward_intermediates(x, indices=2, stop_early=True,
                                               intermediates_only=True)
        assert [f.shape[1] for f in last_two] == [i['num_chs'] for i in model.feature_info[2:]]
    with pytest.raises(ValueError, match='output_fmt'):
        model.forward_intermediates(x, output_fmt='NHWC')


def test_features_only(registered_model):
    name = registered_model.pretrained_cfg['architecture']
    model = timm.create_model(name, features_only=True, out_indices=(1, 3)).eval()
    assert model.feature_info.reduction() == [8, 32]
    assert model.feature_info.channels() == [registered_model.feature_info[i]['num_chs']
                                             for i in (1, 3)]
    with torch.no_grad():
        features = model(torch.randn(1, 3, 64, 32))
    assert [tuple(f.shape[1:]) for f in features] == [
        (c, 64 // r, 32 // r) for c, r in zip(model.feature_info.channels(),
                                               model.feature_info.reduction())]


def test_reset_and_get_classifier(registered_model):
    model = copy.deepcopy(registered_model)
    assert model.get_classifier() is model.head.fc and model.head.fc.out_features == 1000
    features = torch.randn(2, model.num_features, 1, 1)
    model.reset_classifier(7)
    assert model.num_classes == 7 and model.get_classifier().out_features == 7
    assert model.forward_head(features).shape == (2, 7)
    model.reset_classifier(0)
    assert model.forward_head(features).shape == (2, model.num_features)
    assert model.pretrained_cfg['num_classes'] == 1000


def test_group_matcher(registered_model):
    names = [n for n, _ in registered_model.named_parameters()]
    for coarse in (True, False):
        groups = timm.models.group_parameters(registered_model,
                                              registered_model.group_matcher(coarse=coarse))
        grouped = [n for members in groups.values() for n in members]
        assert sorted(grouped) == sorted(names)
        ordered = list(groups.values())
        assert all(n.startswith('stem.') for n in ordered[0])
    fine = timm.models.group_parameters(registered_model, registered_model.group_matcher())
    num_blocks = sum(len(s.blocks) for s in registered_model.stages)
    assert len(fine) >= num_blocks + 2  # stem, every block, final norm (+ head)


def test_no_weight_decay(registered_model):
    names = {n for n, _ in registered_model.named_parameters()}
    assert registered_model.no_weight_decay() <= names
    optimizer = create_optimizer_v2(registered_model, 'adamw', weight_decay=0.05)
    no_decay = {id(p) for group in optimizer.param_groups if group['weight_decay'] == 0
                for p in group['params']}
    exempt = registered_model.no_weight_decay()
    for name, param in registered_model.named_parameters():
        assert (id(param) in no_decay) == (param.ndim <= 1 or name in exempt), name


def _grads(module, watched_block, x):
    """(forward calls of ``watched_block``, parameter grads) of one forward/backward."""
    calls = []
    hook = watched_block.register_forward_pre_hook(lambda *_: calls.append(1))
    module.zero_grad()
    module(x).square().sum().backward()
    hook.remove()
    return len(calls), {n: p.grad.clone() for n, p in module.named_parameters()
                        if p.grad is not None}


def _check_checkpointing(module, watched_block, x, set_checkpointing):
    set_checkpointing(False)
    calls_plain, plain = _grads(module, watched_block, x)
    set_checkpointing(True)
    calls_ckpt, ckpt = _grads(module, watched_block, x)
    assert (calls_plain, calls_ckpt) == (1, 2)  # the block is recomputed in backward
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-4, atol=1e-5, msg=name)


def test_grad_checkpointing(registered_model):
    model = registered_model
    try:
        model.set_grad_checkpointing()
        assert all(stage.grad_checkpointing for stage in model.stages)
    finally:
        model.set_grad_checkpointing(False)
    assert not any(stage.grad_checkpointing for stage in model.stages)
    # numerics through a copy of the first stage: a full backward of every model is slow on CPU
    first = copy.deepcopy(model.stages[0]).train()
    x = torch.randn(1, model.feature_info[0]['num_chs'], 8, 8)
    _check_checkpointing(first, first.blocks[0], x,
                         lambda enable: setattr(first, 'grad_checkpointing', enable))


def test_grad_checkpointing_whole_model():
    model = _small(n_win=2).train()
    _check_checkpointing(model, model.stages[1].blocks[0], torch.randn(2, 3, 32, 32),
                         model.set_grad_checkpointing)


# --- inputs, padding, routing ---

def _small(**kwargs):
    return timm.create_model('biformer_tiny', **dict(SMALL_ARCH, **kwargs)).eval()


def test_prune_intermediate_layers():
    model = _small()
    assert model.prune_intermediate_layers([0, 1], prune_norm=True) == [0, 1]
    assert len(model.stages) == 2 and model.num_classes == 0
    with torch.no_grad():
        features = model.forward_intermediates(torch.randn(1, 3, 64, 64), intermediates_only=True)
    assert [tuple(f.shape[1:]) for f in features] == [(32, 16, 16), (64, 8, 8)]


def test_bad_input_raises():
    model = _small()
    with pytest.raises(ValueError, match=r'4-D image batch \(B, 3, H, W\)'):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match='3 channels'):
        model(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match='at least 32x32'):
        model(torch.randn(1, 3, 31, 64))
    with pytest.raises(ValueError, match='4-D image batch'):
        model.forward_intermediates(torch.randn(1, 3, 64))


@pytest.mark.parametrize('kwargs, match', [
    (dict(pad_mode='reflect'), 'pad_mode must be one of'),
    (dict(attn_impl='flash'), 'attn_impl must be one of'),
    (dict(topks=(1, 0, 16, -2)), r'topk must be > 0 \(routing attention\) or -2'),
    (dict(embed_dims=(48, 64, 128, 256)), 'dim=48 must be a multiple of head_dim=32'),
    (dict(embed_dims=(32, 64, 128, 260)), 'dim=260 must be a multiple of 8'),
    (dict(depths=(1, 1, 1)), 'one entry per stage'),
    (dict(n_win=0), 'n_win must be >= 1'),
])
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _small(**kwargs)


def test_empty_batch():
    with torch.no_grad():
        assert _small()(torch.randn(0, 3, 64, 64)).shape == (0, 10)


@pytest.mark.parametrize('pad_mode', ['official', 'masked'])
def test_odd_size_fused_matches_gather(pad_mode):
    """Both attention paths agree, forward and backward, on a size needing padding."""
    fused = _small(n_win=4, pad_mode=pad_mode)
    gather = _small(n_win=4, pad_mode=pad_mode, attn_impl='gather')
    gather.load_state_dict(fused.state_dict())
    x = torch.randn(1, 3, 75, 45)  # every stage map needs padding to a multiple of 4
    out_fused, out_gather = fused(x), gather(x)
    assert out_fused.shape == (1, 10)
    torch.testing.assert_close(out_fused, out_gather, rtol=1e-4, atol=1e-4)
    out_fused.square().sum().backward()
    out_gather.square().sum().backward()
    for (name, p_fused), p_gather in zip(fused.named_parameters(), gather.parameters()):
        torch.testing.assert_close(p_fused.grad, p_gather.grad, rtol=1e-3, atol=1e-4, msg=name)


def test_pad_modes_agree_without_padding():
    official, masked = _small(n_win=4), _small(n_win=4, pad_mode='masked')
    masked.load_state_dict(official.state_dict())
    x = torch.randn(1, 3, 128, 64)  # stage maps 32x16, 16x8, 8x4: multiples of n_win=4
    with torch.no_grad():
        torch.testing.assert_close(official(x), masked(x))


@pytest.mark.parametrize('attn_impl', ['fused', 'gather'])
def test_masked_padding_excludes_padded_tokens(attn_impl):
    """Routing to every region, masked BRA is dense attention over the real tokens only (plus
    LePE of zero-padded values); the official unmasked padding differs."""
    attn = BiLevelRoutingAttention(32, head_dim=16, n_win=2, topk=4, pad_mode='masked',
                                   attn_impl=attn_impl)
    x = torch.randn(2, 5, 7, 32)
    with torch.no_grad():
        q, k, v = attn.qkv(x).flatten(1, 2).split(32, dim=-1)
        heads = [t.view(2, 35, 2, 16).transpose(1, 2) for t in (q, k, v)]
        dense = F.scaled_dot_product_attention(*heads, scale=32 ** -0.5)
        dense = dense.transpose(1, 2).reshape(2, 5, 7, 32)
        lepe = attn.lepe(v.view(2, 5, 7, 32).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        expected = attn.proj(dense + lepe)
        torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-5)
        attn.pad_mode = 'official'
        assert not torch.allclose(attn(x), expected, rtol=1e-3, atol=1e-3)


def test_n_win_configurable_and_topk_clipped():
    model = _small(n_win=2)
    assert [s.blocks[0].attn.topk for s in model.stages[:3]] == [1, 4, 4]  # 16 -> 2 * 2 regions
    assert all(s.blocks[0].attn.n_win == 2 for s in model.stages[:3])
    with torch.no_grad():
        assert model(torch.randn(1, 3, 70, 45)).shape == (1, 10)


def test_autocast_layer_norm_returns_autocast_dtype():
    norm = AutocastLayerNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    expected = F.layer_norm(x.float(), (16,), norm.weight, norm.bias, 1e-6)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = norm(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(norm(x.float()), expected)  # plain LayerNorm outside autocast


def test_fused_layer_norm_takes_ops_from_the_size_threshold(monkeypatch):
    calls = []
    monkeypatch.setattr(ops, 'layer_norm', lambda *args: calls.append(args) or args[0])
    monkeypatch.setattr(AutocastLayerNorm, 'FUSED_MIN_NUMEL', 64)
    norm = AutocastLayerNorm(16, eps=1e-6, fused=True)
    norm(torch.randn(3, 16))
    assert not calls  # 48 elements: F.layer_norm
    norm(torch.randn(4, 16))
    assert len(calls) == 1 and calls[0][1] is norm.weight and calls[0][3] == 1e-6
    AutocastLayerNorm(16, eps=1e-6)(torch.randn(8, 16))
    assert len(calls) == 1  # not fused: never ops


@pytest.mark.gpu
def test_fused_layer_norm_under_cuda_graph_capture(monkeypatch):
    """While a CUDA graph is captured, small inputs take ops.layer_norm too (no host cost)."""
    calls = []
    fused_layer_norm = ops.layer_norm
    monkeypatch.setattr(ops, 'layer_norm', lambda *args: calls.append(1) or
                        fused_layer_norm(*args))
    norm = AutocastLayerNorm(64, eps=1e-6, fused=True).cuda()
    x = torch.randn(8, 64, device='cuda')
    eager = norm(x)
    assert not calls
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fused_layer_norm(x, norm.weight, norm.bias, 1e-6)  # compile the kernel outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = norm(x)
    graph.replay()
    assert calls
    torch.testing.assert_close(captured, eager, rtol=1e-5, atol=1e-5)


def _relative_error(got, expected):
    return ((got.float() - expected.float()).norm() / expected.float().norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize('dtype, tol', [(torch.float32, 5e-3), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize('pad_mode, size, topk', [('official', 56, 1), ('masked', 45, 4)])
def test_triton_path_matches_gather_on_cuda(dtype, tol, pad_mode, size, topk):
    """One routing-attention layer, Triton kernels vs the official formulation: output, input
    and parameter gradients by relative error norm (fp32 allows for TF32 in Triton's dots)."""
    fused = BiLevelRoutingAttention(64, n_win=7, topk=topk, pad_mode=pad_mode).cuda()
    gather = BiLevelRoutingAttention(64, n_win=7, topk=topk, pad_mode=pad_mode,
                                     attn_impl='gather').cuda()
    gather.load_state_dict(fused.state_dict())
    x = torch.randn(8, size, size, 64, device='cuda')
    grad_out = torch.randn(8, size, size, 64, device='cuda')
    results = []
    for layer in (fused, gather):
        x_in = x.clone().requires_grad_()
        with torch.autocast('cuda', dtype=dtype, enabled=dtype != torch.float32):
            out = layer(x_in)
        out.float().backward(grad_out)
        results.append((out, x_in.grad, {n: p.grad for n, p in layer.named_parameters()}))
    (out_f, dx_f, grads_f), (out_g, dx_g, grads_g) = results
    assert _relative_error(out_f, out_g) < tol
    assert _relative_error(dx_f, dx_g) < tol
    for name in grads_g:
        assert _relative_error(grads_f[name], grads_g[name]) < tol, name


@pytest.mark.parametrize('pad_mode, size', [('official', 64), ('masked', 45)])
def test_torch_compile_fullgraph_matches_eager(pad_mode, size):
    """The whole model (window-layout routing and attention, depthwise convs, recomputing MLP,
    LayerNorm) compiles into one graph; logits and every parameter gradient match eager."""
    torch.manual_seed(0)
    model = _small(pad_mode=pad_mode).train()
    compiled_model = copy.deepcopy(model)
    # Static shapes: the second size would otherwise recompile with symbolic shapes.
    compiled = torch.compile(compiled_model, fullgraph=True, backend='aot_eager', dynamic=False)
    x = torch.randn(2, 3, size, size)
    expected, got = model(x), compiled(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    expected.square().sum().backward()
    got.square().sum().backward()
    for (name, param), compiled_param in zip(model.named_parameters(),
                                             compiled_model.parameters()):
        torch.testing.assert_close(compiled_param.grad, param.grad, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, name=name: f'{name}: {m}')


@pytest.mark.gpu
def test_torch_compile_takes_the_triton_ops_on_cuda():
    """Compiled on CUDA under bf16 autocast, the model's graph holds ops' Triton custom ops
    (attention, depthwise convs), not the torch references; the compiled model matches eager."""
    torch.manual_seed(0)
    model = _small(pad_mode='masked').cuda()
    targets = []

    def recording_backend(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == 'call_function')
        return gm.forward

    compiled = torch.compile(model, fullgraph=True, backend=recording_backend, dynamic=False)
    x = torch.randn(2, 3, 45, 45, device='cuda')
    with torch.autocast('cuda', torch.bfloat16):
        got, expected = compiled(x), model(x)
    assert any('gather_attention_fwd' in target for target in targets), targets
    assert any('depthwise_conv2d_fwd' in target for target in targets), targets
    assert not any('gather' in target and 'dsa_ops' not in target for target in targets), targets
    assert _relative_error(got.float(), expected.float()) < 1e-2
