"""Every config under configs/ parses (with its _base_ chain) and builds a working model."""
import pathlib

import pytest
import torch

pytest.importorskip('mmdet', reason='the detection configs need mmdet')
from mmengine.model import BaseModel  # noqa: E402
from mmengine.registry import MODELS, init_default_scope  # noqa: E402

from backbones.mm.runner import load_config  # noqa: E402

CONFIG_ROOT = pathlib.Path(__file__).resolve().parents[1] / 'configs'
CONFIGS = sorted(p for p in CONFIG_ROOT.rglob('*.py') if '_base_' not in p.parts)
BIFORMER_CHANNELS = {'small': (64, 128, 256, 512), 'base': (96, 192, 384, 768)}


def test_the_walk_finds_every_family():
    names = {p.relative_to(CONFIG_ROOT).as_posix() for p in CONFIGS}
    expected = {
        'classification/biformer-tiny_8xb128_in1k.py',
        'classification/biformer-small_8xb128_in1k.py',
        'classification/biformer-base_8xb128_in1k.py',
        'detection/retinanet_biformer-s_fpn_1x_coco.py',
        'detection/retinanet_biformer-b_fpn_1x_coco.py',
        'detection/mask-rcnn_biformer-s_fpn_1x_coco.py',
        'detection/mask-rcnn_biformer-b_fpn_1x_coco.py',
        'demo/retinanet_biformer-demo_fpn_shapes.py',
    }
    assert expected <= names, expected - names


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.relative_to(CONFIG_ROOT).as_posix())
def test_config_builds_a_model_that_runs(path):
    cfg = load_config(str(path))
    assert cfg.custom_imports['imports'] == ['backbones']
    for key in ('train_dataloader', 'val_dataloader', 'test_dataloader', 'optim_wrapper',
                'param_scheduler', 'train_cfg', 'val_evaluator', 'default_hooks'):
        assert key in cfg, f'{path.name} lacks {key}'
    init_default_scope(cfg.default_scope)
    model = MODELS.build(cfg.model)
    assert isinstance(model, BaseModel)
    model.eval()
    if cfg.default_scope == 'mmdet':
        assert cfg.model.backbone.type == 'BiFormer'
        arch = cfg.model.backbone.arch
        if isinstance(arch, str):  # the published recipes
            assert cfg.train_cfg.max_epochs == 12
            assert cfg.model.backbone.n_win == 16
            assert cfg.optim_wrapper.optimizer.type == 'AdamW'
            assert cfg.optim_wrapper.optimizer.lr == 1e-4
            channels = BIFORMER_CHANNELS[arch]
            used = [channels[i] for i in cfg.model.backbone.out_indices]
            assert list(cfg.model.neck.in_channels) == used
        with torch.no_grad():
            feats = model.extract_feat(torch.randn(1, 3, 128, 128))
        first_stride = 4 * 2 ** cfg.model.backbone.out_indices[0]
        assert [128 // f.shape[-1] for f in feats] == [
            first_stride * 2 ** i for i in range(cfg.model.neck.num_outs)]
    else:
        assert cfg.model.model_name.startswith('biformer_')
        assert cfg.optim_wrapper.optimizer.lr == 5e-4
        assert cfg.optim_wrapper.optimizer.weight_decay == 0.05
        assert cfg.train_cfg.max_epochs == 300
        assert any(h['type'] == 'EMAHook' for h in cfg.custom_hooks)
        with torch.no_grad():
            logits = model(torch.randn(1, 3, 224, 224), mode='tensor')
        assert logits.shape == (1, 1000)
