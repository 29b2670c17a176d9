# BiFormer-B: drop path 0.4 (paper); otherwise as BiFormer-T: 300 epochs on ImageNet-1k with
# 8 GPUs x 128 images: torchrun --nproc_per_node 8 tools/train.py THIS_CONFIG --launcher pytorch
_base_ = './biformer-tiny_8xb128_in1k.py'

model = dict(model_name='biformer_base', drop_path_rate=0.4)
