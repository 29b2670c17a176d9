# RetinaNet + BiFormer-S + FPN, 1x schedule on COCO: the official BiFormer recipe
# (rayleizhu/BiFormer object_detection/configs/coco/retinanet.1x.biformer_small.py):
# n_win 16 with padding to a multiple of it, drop path 0.2, BatchNorm kept in eval mode,
# AdamW lr 1e-4 / weight decay 1e-4 without gradient clipping, 12 epochs with steps at 8 and 11,
# total batch 16 (8 GPUs x 2 images). The official runs used fp16: add --amp.
# The backbone starts from ImageNet weights: set model.backbone.init_cfg to
# dict(type='Pretrained', checkpoint=PATH) (see docs/training.md).
_base_ = [
    'mmdet::_base_/models/retinanet_r50_fpn.py',
    'mmdet::_base_/datasets/coco_detection.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['backbones'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='BiFormer',
        arch='small',
        n_win=16,
        pad_mode='official',
        drop_path_rate=0.2,
        out_indices=(1, 2, 3),  # the FPN starts at stride 8, as the official start_level=1
        norm_eval=True),
    neck=dict(in_channels=[128, 256, 512], start_level=0, add_extra_convs='on_input'))

optim_wrapper = dict(
    optimizer=dict(_delete_=True, type='AdamW', lr=1e-4, weight_decay=1e-4),
    clip_grad=None)
