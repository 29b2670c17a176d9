"""Test a checkpoint with the mmengine Runner and print the metrics (mmdet 3.3's test.py flags).

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out results.pkl] [--show]
                         [--show-dir DIR] [--cfg-options KEY=VALUE ...] [--launcher ...]
"""
import backbones  # noqa: F401  (registers our models, datasets and metrics)
from backbones.mm.runner import (build_runner, configure_test, load_config, parse_args,
                                 test_arg_parser)


def main(argv=None):
    parser = test_arg_parser()
    args = parse_args(parser, argv)
    try:
        cfg = configure_test(load_config(args.config, args.cfg_options), args)
    except (FileNotFoundError, ValueError) as err:  # bad paths or options: usage + message
        parser.error(str(err))
    build_runner(cfg).test()


if __name__ == '__main__':
    main()
