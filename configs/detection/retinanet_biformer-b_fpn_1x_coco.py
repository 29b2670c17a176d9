# RetinaNet + BiFormer-B + FPN, 1x schedule on COCO: the official BiFormer recipe
# (rayleizhu/BiFormer object_detection/configs/coco/retinanet.1x.biformer_base.py): as
# BiFormer-S (see that config) with drop path 0.3.
_base_ = './retinanet_biformer-s_fpn_1x_coco.py'

model = dict(
    backbone=dict(arch='base', drop_path_rate=0.3),
    neck=dict(in_channels=[192, 384, 768]))
