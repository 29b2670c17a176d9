# DeiT/BiFormer schedule: AdamW lr 5e-4 (for a total batch of 512, scaled linearly by
# --auto-scale-lr), weight decay 0.05 except on norms, biases and other 1-D parameters,
# 5 linear warm-up epochs from 1e-6, cosine to 1e-5 over 300 epochs, updated every iteration.
max_epochs = 300
warmup_epochs = 5
base_lr = 5e-4

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=base_lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05),
    paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0, flat_decay_mult=0.0))

param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6 / base_lr, by_epoch=True, begin=0,
         end=warmup_epochs, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', T_max=max_epochs - warmup_epochs, eta_min=1e-5,
         by_epoch=True, begin=warmup_epochs, end=max_epochs, convert_to_iter_based=True),
]

train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=max_epochs, val_interval=1)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')

auto_scale_lr = dict(enable=False, base_batch_size=512)
