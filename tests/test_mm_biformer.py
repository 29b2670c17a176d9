"""The mmdet/mmengine BiFormer backbone: registry, detector, freezing, checkpoints."""
import pytest
import timm
import torch
from timm.layers import LayerNorm2d

pytest.importorskip('mmengine')
from mmengine.registry import MODELS  # noqa: E402

import backbones  # noqa: E402,F401  (registers 'BiFormer')
from backbones.biformer import checkpoint_filter_fn  # noqa: E402
from backbones.mm.biformer import BiFormer  # noqa: E402
from biformer_official import OfficialBiFormer, randomize  # noqa: E402

SMALL_ARCH = dict(depths=(1, 1, 2, 1), embed_dims=(32, 64, 128, 256), topks=(1, 4, 16, -2),
                  head_dim=32, mlp_ratio=3)


def _backbone(**kwargs):
    return MODELS.build(dict(dict(type='BiFormer', arch=SMALL_ARCH, n_win=4), **kwargs))


def test_outputs_per_out_index():
    backbone = _backbone(out_indices=(1, 3)).eval()
    assert sorted(backbone.out_norms) == ['1', '3']
    assert all(isinstance(norm, LayerNorm2d) and norm.eps == 1e-6
               for norm in backbone.out_norms.values())
    with torch.no_grad():
        outs = backbone(torch.randn(2, 3, 333, 517))
    assert [tuple(o.shape) for o in outs] == [(2, 64, 42, 65), (2, 256, 11, 17)]
    assert abs(outs[1].mean(1)).max() < 1e-4  # layer-normalised over channels (unit weight)


def test_architecture_presets_and_topk_clipping():
    with torch.device('meta'):
        small = BiFormer(arch='small')
    assert [len(stage.blocks) for stage in small.stages] == [4, 4, 18, 4]
    assert [stage.blocks[0].attn.topk for stage in small.stages[:3]] == [1, 4, 16]
    assert small.stages[0].blocks[0].attn.n_win == 16
    clipped = _backbone(n_win=2)  # 4 regions: topk 16 routes to all of them
    assert [stage.blocks[0].attn.topk for stage in clipped.stages[:3]] == [1, 4, 4]


@pytest.mark.parametrize('kwargs, match', [
    (dict(arch='huge'), 'arch must be one of'),
    (dict(arch=dict(depths=(1, 1, 1, 1))), 'missing'),
    (dict(arch=dict(SMALL_ARCH, qk_dim=64)), "unknown \\['qk_dim'\\]"),
    (dict(arch=dict(SMALL_ARCH, depths=(1, 1, 1))), 'needs 4 entries'),
    (dict(out_indices=(2, 1)), 'out_indices must be ascending'),
    (dict(out_indices=(4,)), 'out_indices must be ascending'),
    (dict(frozen_stages=5), 'frozen_stages must be in'),
    (dict(pad_mode='zeros'), 'pad_mode must be one of'),
])
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _backbone(**kwargs)


def test_bad_input_raises():
    backbone = _backbone()
    with pytest.raises(ValueError, match='at least 32x32'):
        backbone(torch.randn(1, 3, 16, 64))
    with pytest.raises(ValueError, match='3 channels'):
        backbone(torch.randn(1, 1, 64, 64))


def test_frozen_stages():
    backbone = _backbone(frozen_stages=1)
    backbone.train()
    for module in (backbone.stem, backbone.stages[0], backbone.out_norms['0']):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())
    for module in (backbone.stages[1], backbone.out_norms['1']):
        assert module.training and all(p.requires_grad for p in module.parameters())
    outs = backbone(torch.randn(1, 3, 64, 64))
    sum(o.sum() for o in outs).backward()
    assert backbone.stages[0].blocks[0].mlp.fc1.weight.grad is None
    assert backbone.stages[1].blocks[0].mlp.fc1.weight.grad is not None


def test_norm_eval():
    backbone = _backbone(norm_eval=True).train()
    batch_norms = [m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(batch_norms) == 5  # 2 in the stem, 1 per downsampling
    assert not any(bn.training for bn in batch_norms)
    assert backbone.stages[0].blocks[0].norm1.training
    assert all(bn.training for bn in _backbone().train().modules()
               if isinstance(bn, torch.nn.BatchNorm2d))


def test_with_cp_matches_plain():
    plain, checkpointed = _backbone().train(), _backbone(with_cp=True).train()
    checkpointed.load_state_dict(plain.state_dict())
    assert all(stage.grad_checkpointing for stage in checkpointed.stages)
    x = torch.randn(1, 3, 64, 96)
    for model in (plain, checkpointed):
        sum(o.square().sum() for o in model(x)).backward()
    for (name, p_plain), p_ckpt in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(p_ckpt.grad, p_plain.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_fused_block_matches_plain_with_frozen_stage(monkeypatch):
    """``fused_block`` (the default; taken on the CPU here, through the Triton interpreter) gives the
    plain backbone's features and gradients, a frozen first stage included."""
    from backbones.biformer import BiFormerBlock
    monkeypatch.setattr(BiFormerBlock, 'FUSED_BLOCK_DEVICES', ('cuda', 'cpu'))
    plain = _backbone(frozen_stages=1, fused_block=False).train()
    fused = _backbone(frozen_stages=1).train()
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 45, 70)
    # Random projections: the squares of layer-normalised maps would sum to a constant.
    projections = [torch.randn(1, c, h, w) for c, h, w in
                   ((32, 12, 18), (64, 6, 9), (128, 3, 5), (256, 2, 3))]
    for model in (plain, fused):
        sum((o * p).sum() for o, p in zip(model(x), projections)).backward()
    # atol from the largest gradient: biases before a BatchNorm get zero gradients up to
    # rounding noise
    scale = max(p.grad.abs().max() for p in plain.parameters() if p.grad is not None)
    for (name, p_plain), p_fused in zip(plain.named_parameters(), fused.parameters()):
        assert (p_plain.grad is None) == (p_fused.grad is None), name
        if p_plain.grad is not None:
            torch.testing.assert_close(p_fused.grad, p_plain.grad, rtol=1e-3,
                                       atol=1e-4 * float(scale), msg=name)


def _expected_features(classifier, x):
    """Stage outputs of a timm BiFormer through fresh (identity-affine) channel LayerNorms."""
    intermediates = classifier.forward_intermediates(x, intermediates_only=True)
    return [LayerNorm2d(f.shape[1])(f) for f in intermediates]


def _init_from(path, **kwargs):
    backbone = _backbone(init_cfg=dict(type='Pretrained', checkpoint=str(path)), **kwargs)
    backbone.init_weights()
    return backbone.eval()


def test_pretrained_official_classification_checkpoint(tmp_path):
    official = randomize(OfficialBiFormer(SMALL_ARCH['depths'], SMALL_ARCH['embed_dims'],
                                          n_win=4, auto_pad=True))
    torch.save({'model': official.state_dict()}, tmp_path / 'official.pth')
    classifier = timm.create_model('biformer_tiny', depths=SMALL_ARCH['depths'],
                                   embed_dims=SMALL_ARCH['embed_dims'], n_win=4).eval()
    classifier.load_state_dict(checkpoint_filter_fn(official.state_dict(), classifier))
    backbone = _init_from(tmp_path / 'official.pth')
    x = torch.randn(1, 3, 75, 101)
    with torch.no_grad():
        for got, expected in zip(backbone(x), _expected_features(classifier, x)):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_pretrained_own_checkpoints(tmp_path):
    classifier = timm.create_model('biformer_tiny', depths=SMALL_ARCH['depths'],
                                   embed_dims=SMALL_ARCH['embed_dims'], n_win=4).eval()
    torch.save(classifier.state_dict(), tmp_path / 'classifier.pth')
    source = _backbone(out_indices=(1, 2, 3))
    with torch.no_grad():
        for norm in source.out_norms.values():
            norm.weight.normal_()
    detector_state = {f'backbone.{k}': v for k, v in source.state_dict().items()}
    detector_state['neck.lateral_convs.0.conv.weight'] = torch.zeros(1)
    torch.save({'meta': {}, 'state_dict': detector_state}, tmp_path / 'detector.pth')

    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        from_classifier = _init_from(tmp_path / 'classifier.pth')
        for got, expected in zip(from_classifier(x), _expected_features(classifier, x)):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        from_detector = _init_from(tmp_path / 'detector.pth', out_indices=(1, 2, 3))
        for got, expected in zip(from_detector(x), source.eval()(x)):
            torch.testing.assert_close(got, expected)


def test_pretrained_without_backbone_weights_raises(tmp_path):
    torch.save({'state_dict': {'neck.weight': torch.zeros(1)}}, tmp_path / 'other.pth')
    with pytest.raises(ValueError, match='holds no BiFormer backbone weights'):
        _init_from(tmp_path / 'other.pth')


# --- mmdet ---

DETECTOR_CONFIG = '''
custom_imports = dict(imports=['backbones'], allow_failed_imports=False)
default_scope = 'mmdet'
model = dict(
    type='RetinaNet',
    data_preprocessor=dict(type='DetDataPreprocessor', mean=[123.675, 116.28, 103.53],
                           std=[58.395, 57.12, 57.375], bgr_to_rgb=True, pad_size_divisor=1),
    backbone=dict(type='BiFormer', arch=dict(depths=(1, 1, 2, 1), embed_dims=(32, 64, 128, 256),
                  topks=(1, 4, 16, -2), head_dim=32, mlp_ratio=3), n_win=16,
                  pad_mode='official', out_indices=(1, 2, 3), frozen_stages=0, norm_eval=True),
    neck=dict(type='FPN', in_channels=[64, 128, 256], out_channels=32, start_level=0,
              add_extra_convs='on_input', num_outs=5),
    bbox_head=dict(
        type='RetinaHead', num_classes=3, in_channels=32, stacked_convs=1, feat_channels=32,
        anchor_generator=dict(type='AnchorGenerator', octave_base_scale=4, scales_per_octave=3,
                              ratios=[0.5, 1.0, 2.0], strides=[8, 16, 32, 64, 128]),
        bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0.0, 0.0, 0.0, 0.0],
                        target_stds=[1.0, 1.0, 1.0, 1.0]),
        loss_cls=dict(type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25,
                      loss_weight=1.0),
        loss_bbox=dict(type='L1Loss', loss_weight=1.0)),
    train_cfg=dict(assigner=dict(type='MaxIoUAssigner', pos_iou_thr=0.5, neg_iou_thr=0.4,
                                 min_pos_iou=0, ignore_iof_thr=-1),
                   sampler=dict(type='PseudoSampler'), allowed_border=-1, pos_weight=-1,
                   debug=False),
    test_cfg=dict(nms_pre=100, min_bbox_size=0, score_thr=0.05,
                  nms=dict(type='nms', iou_threshold=0.5), max_per_img=10))
'''


def _detector(tmp_path):
    pytest.importorskip('mmdet')
    from mmengine.config import Config
    from mmengine.registry import DefaultScope
    from mmdet.registry import MODELS as MMDET_MODELS

    path = tmp_path / 'retinanet_biformer.py'
    path.write_text(DETECTOR_CONFIG)
    cfg = Config.fromfile(str(path))  # imports `backbones` through custom_imports
    assert MMDET_MODELS.get('BiFormer') is BiFormer  # found through the parent registry
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        return MMDET_MODELS.build(cfg.model)


def test_config_builds_retinanet_that_trains_on_odd_size(tmp_path):
    """custom_imports + default_scope='mmdet' resolve 'BiFormer'; forward and loss at 333x517."""
    detector = _detector(tmp_path)
    assert type(detector.backbone) is BiFormer
    assert detector.backbone.out_indices == (1, 2, 3)
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData

    sample = DetDataSample(metainfo=dict(img_shape=(333, 517), ori_shape=(333, 517),
                                         scale_factor=(1.0, 1.0)))
    sample.gt_instances = InstanceData(
        bboxes=torch.tensor([[10.0, 20.0, 120.0, 140.0], [200.0, 50.0, 480.0, 300.0]]),
        labels=torch.tensor([0, 2]))
    data = detector.data_preprocessor(
        dict(inputs=[torch.randint(0, 256, (3, 333, 517), dtype=torch.uint8)],
             data_samples=[sample]), training=True)
    assert data['inputs'].shape == (1, 3, 333, 517)

    detector.train()
    features = detector(data['inputs'], data['data_samples'], mode='tensor')
    assert len(features) == 2 and len(features[0]) == 5  # (cls, reg) scores per FPN level
    assert features[0][0].shape[-2:] == (42, 65)  # stride 8 of 333 x 517
    losses = detector(data['inputs'], data['data_samples'], mode='loss')
    assert {'loss_cls', 'loss_bbox'} <= set(losses)
    total = sum(v.sum() if isinstance(v, torch.Tensor) else sum(v) for v in losses.values())
    assert torch.isfinite(total)
    total.backward()
    backbone = detector.backbone
    assert backbone.stages[3].blocks[0].attn.qkv.weight.grad is not None
    assert backbone.stem[0].weight.grad is None  # frozen_stages=0
