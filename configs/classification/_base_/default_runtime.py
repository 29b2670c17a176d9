default_scope = 'mmengine'
custom_imports = dict(imports=['backbones'], allow_failed_imports=False)

default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=100),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', interval=1, max_keep_ckpts=3,
                    save_best='accuracy/top1', rule='greater'),
    sampler_seed=dict(type='DistSamplerSeedHook'))

# EMA of the weights, decay 0.99996 per iteration (mmengine's momentum is 1 - decay);
# validation and test use the EMA weights.
custom_hooks = [
    dict(type='EMAHook', ema_type='ExponentialMovingAverage', momentum=4e-5,
         update_buffers=True, priority='ABOVE_NORMAL'),
]

env_cfg = dict(
    cudnn_benchmark=True,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'))

vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(type='Visualizer', vis_backends=vis_backends)
log_processor = dict(type='LogProcessor', window_size=50, by_epoch=True)
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=0, deterministic=False)
