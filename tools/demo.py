"""`make demo`: train a small BiFormer RetinaNet on built-in data on the CPU, test it, print mAP.

Steps: (1) write the synthetic shapes dataset (COCO format) unless it is already there,
(2) train configs/demo/retinanet_biformer-demo_fpn_shapes.py with the mmengine Runner, as
tools/train.py does, (3) test the last checkpoint as tools/test.py does (pycocotools COCO bbox
evaluation), (4) print the figures. Nothing is downloaded. Exits with status 1 when bbox
mAP@0.5 is below --target.

    python tools/demo.py [--data-root data/shapes] [--work-dir work_dirs/demo] [--target 0.25]
"""
import argparse
import os
import os.path as osp
import sys
import time

# OpenMP threads that spin while waiting make every op many times slower when other processes
# share the cores; passive waiting costs little on an idle machine. Must precede `import torch`.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import backbones  # noqa: E402,F401  (registers the BiFormer backbone)
from backbones.datasets import make_shapes_coco  # noqa: E402
from backbones.mm.runner import (build_runner, configure_test, configure_train,  # noqa: E402
                                 load_config, replace_data_root, test_arg_parser,
                                 train_arg_parser)

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEMO_CONFIG = osp.join(REPO_ROOT, 'configs', 'demo', 'retinanet_biformer-demo_fpn_shapes.py')
DEMO_DATA = dict(num_train=400, num_val=100, image_size=160, max_objects=4,
                 radius_range=(12.0, 30.0), seed=0)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--data-root', default='data/shapes', help='dataset folder')
    parser.add_argument('--work-dir', default='work_dirs/demo', help='logs and checkpoints')
    parser.add_argument('--config', default=DEMO_CONFIG, help='the demo detector config')
    parser.add_argument('--target', type=float, default=0.25,
                        help='bbox mAP@0.5 the demo must reach')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    started = time.time()

    print(f'[demo 1/3] synthetic shapes dataset in {args.data_root} '
          f'({DEMO_DATA["num_train"]} train / {DEMO_DATA["num_val"]} val images, '
          f'{DEMO_DATA["image_size"]} px, classes circle/square/triangle/star)', flush=True)
    make_shapes_coco(args.data_root, **DEMO_DATA)

    print(f'[demo 2/3] training {osp.relpath(args.config)} on the CPU, logs and checkpoints '
          f'in {args.work_dir}', flush=True)
    train_args = train_arg_parser().parse_args([args.config, '--work-dir', args.work_dir])
    cfg = replace_data_root(load_config(args.config), args.data_root)
    cfg.val_dataloader = cfg.val_evaluator = cfg.val_cfg = None  # step 3 evaluates, once
    build_runner(configure_train(cfg, train_args)).train()
    with open(osp.join(args.work_dir, 'last_checkpoint')) as f:  # written by CheckpointHook
        checkpoint = f.read().strip()
    trained = time.time()

    print(f'[demo 3/3] testing {checkpoint} on the {DEMO_DATA["num_val"]} validation images',
          flush=True)
    test_args = test_arg_parser().parse_args([args.config, checkpoint,
                                              '--work-dir', args.work_dir])
    cfg = replace_data_root(load_config(args.config), args.data_root)
    metrics = build_runner(configure_test(cfg, test_args)).test()
    finished = time.time()

    map_50 = metrics['coco/bbox_mAP_50']
    print('\n' + '=' * 72)
    print('Demo: RetinaNet + BiFormer (depths 1-1-2-1, dims 32-256) + FPN, trained from '
          'scratch on the CPU')
    print(f'  data        {args.data_root} (generated, COCO format)')
    print(f'  work dir    {args.work_dir} (log, checkpoints)')
    print(f'  time        train {trained - started:.0f} s, test {finished - trained:.0f} s, '
          f'total {finished - started:.0f} s')
    print(f'  bbox mAP    {metrics["coco/bbox_mAP"]:.3f}')
    print(f'  bbox mAP@50 {map_50:.3f}  (target >= {args.target})')
    print(f'  bbox mAP@75 {metrics["coco/bbox_mAP_75"]:.3f}')
    print('=' * 72)
    if map_50 < args.target:
        print(f'FAILED: bbox mAP@0.5 {map_50:.3f} is below the target {args.target}')
        return 1
    print('OK: the demo detector reached the target.')
    return 0


if __name__ == '__main__':
    sys.exit(main())
