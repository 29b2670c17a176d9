"""Train a model from a config with the mmengine Runner (the flags of mmdet 3.3's train.py).

    python tools/train.py CONFIG [--work-dir DIR] [--amp] [--resume [CKPT]] [--auto-scale-lr]
                          [--cfg-options KEY=VALUE ...] [--launcher none|pytorch|slurm|mpi]
    torchrun --nproc_per_node 8 tools/train.py CONFIG --launcher pytorch   # 8 GPUs
"""
import backbones  # noqa: F401  (registers our models, datasets and metrics)
from backbones.mm.runner import (build_runner, configure_train, load_config, parse_args,
                                 train_arg_parser)


def main(argv=None):
    parser = train_arg_parser()
    args = parse_args(parser, argv)
    try:
        cfg = configure_train(load_config(args.config, args.cfg_options), args)
    except (FileNotFoundError, ValueError) as err:  # bad paths or options: usage + message
        parser.error(str(err))
    build_runner(cfg).train()


if __name__ == '__main__':
    main()
