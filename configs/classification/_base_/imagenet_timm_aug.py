# ImageNet-1k as class folders (data/imagenet/{train,val}/<class>/<image>), DeiT/BiFormer
# augmentation through timm: RandAugment rand-m9-mstd0.5-inc1, colour jitter 0.4, random
# erasing 0.25 (pixel mode), bicubic; mixup 0.8 / cutmix 1.0 with label smoothing 0.1.
# Evaluation: resize to 224 / 0.875 and centre-crop 224.
data_root = 'data/imagenet'
num_classes = 1000
input_size = 224
label_smoothing = 0.1

train_dataloader = dict(
    batch_size=128,
    num_workers=10,
    persistent_workers=True,
    pin_memory=True,
    drop_last=True,  # mixup in 'batch' mode needs even batches
    sampler=dict(type='DefaultSampler', shuffle=True),
    collate_fn=dict(type='default_collate'),
    dataset=dict(
        type='TimmImageFolder',
        data_root=data_root + '/train',
        transform=dict(
            input_size=input_size,
            is_training=True,
            color_jitter=0.4,
            auto_augment='rand-m9-mstd0.5-inc1',
            interpolation='bicubic',
            re_prob=0.25,
            re_mode='pixel',
            re_count=1)))

val_dataloader = dict(
    batch_size=128,
    num_workers=10,
    persistent_workers=True,
    pin_memory=True,
    drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    collate_fn=dict(type='default_collate'),
    dataset=dict(
        type='TimmImageFolder',
        data_root=data_root + '/val',
        transform=dict(
            input_size=input_size, is_training=False, interpolation='bicubic',
            crop_pct=0.875)))
val_evaluator = dict(type='TopKAccuracy', topk=(1, 5))

test_dataloader = val_dataloader
test_evaluator = val_evaluator

data_preprocessor = dict(
    type='TimmMixupDataPreprocessor',
    mixup=dict(
        mixup_alpha=0.8,
        cutmix_alpha=1.0,
        prob=1.0,
        switch_prob=0.5,
        mode='batch',
        label_smoothing=label_smoothing,
        num_classes=num_classes))
