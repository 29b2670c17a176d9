# BiFormer-S: drop path 0.15 (official README training command); 300 epochs on ImageNet-1k with
# 8 GPUs x 128 images: torchrun --nproc_per_node 8 tools/train.py THIS_CONFIG --launcher pytorch
_base_ = [
    './_base_/imagenet_timm_aug.py',
    './_base_/schedule_adamw_cosine_300e.py',
    './_base_/default_runtime.py',
]

model = dict(
    type='TimmClassifier',
    model_name='biformer_small',
    num_classes={{_base_.num_classes}},
    drop_path_rate=0.15,
    label_smoothing={{_base_.label_smoothing}},
    data_preprocessor={{_base_.data_preprocessor}})
