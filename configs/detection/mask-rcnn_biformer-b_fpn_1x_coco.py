# Mask R-CNN + BiFormer-B + FPN, 1x schedule on COCO: the official BiFormer recipe
# (rayleizhu/BiFormer object_detection/configs/coco/maskrcnn.1x.biformer_base.py, which follows
# UniFormer): n_win 16 with padding to a multiple of it, drop path 0.3, BatchNorm kept in eval
# mode, AdamW lr 1e-4, betas (0.9, 0.999), weight decay 0.05 except on norm layers, 12 epochs
# with steps at 8 and 11, total batch 16 (8 GPUs x 2 images). The official runs used fp16:
# add --amp. The backbone starts from ImageNet weights: set model.backbone.init_cfg to
# dict(type='Pretrained', checkpoint=PATH) (see docs/training.md).
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['backbones'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='BiFormer',
        arch='base',
        n_win=16,
        pad_mode='official',
        drop_path_rate=0.3,
        out_indices=(0, 1, 2, 3),
        norm_eval=True),
    neck=dict(in_channels=[96, 192, 384, 768]))

optim_wrapper = dict(
    optimizer=dict(
        _delete_=True, type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    # The published paramwise setting: no weight decay on parameters whose name has 'norm'.
    paramwise_cfg=dict(custom_keys={'norm': dict(decay_mult=0.0)}),
    clip_grad=None)
