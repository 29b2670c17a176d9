"""What `tools/train.py` and `tools/test.py` do, over the mmengine Runner, as mmdet 3.3 does it.

The CLIs stay thin: they parse arguments with :func:`train_arg_parser` / :func:`test_arg_parser`,
then call :func:`load_config`, :func:`configure_train` / :func:`configure_test` and
:func:`build_runner`. Distributed runs go through mmengine's launchers
(``--launcher pytorch|slurm|mpi``, e.g. under ``torchrun``); nothing here spawns processes.
"""
import argparse
import logging
import os
import os.path as osp
from typing import Any, Dict, Optional, Sequence

from mmengine.config import Config, ConfigDict, DictAction
from mmengine.logging import print_log
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

LAUNCHERS = ('none', 'pytorch', 'slurm', 'mpi')


class CfgOptionsAction(argparse.Action):
    """``--cfg-options KEY=VALUE ...`` parsed like mmengine's DictAction, with clear errors.

    Values follow DictAction: ``1`` -> int, ``0.1`` -> float, ``true`` -> bool, ``None``,
    ``a,b`` or ``[a,b]`` -> list, ``(a,b)`` -> tuple, nesting allowed.
    """

    def __call__(self, parser, namespace, values, option_string=None):
        options = dict(getattr(namespace, self.dest, None) or {})
        for item in values:
            key, sep, text = item.partition('=')
            if not sep or not key or any(not part for part in key.split('.')):
                raise argparse.ArgumentError(
                    self, f'expected KEY=VALUE pairs such as optim_wrapper.optimizer.lr=0.01, '
                          f'got {item!r}')
            try:
                options[key] = DictAction._parse_iterable(text)
            except AssertionError:
                raise argparse.ArgumentError(
                    self, f'unbalanced brackets in the value of {item!r}') from None
        setattr(namespace, self.dest, options)


def _add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        '--cfg-options', nargs='+', action=CfgOptionsAction, metavar='KEY=VALUE',
        help='override settings of the config, e.g. train_dataloader.batch_size=4; list '
             'values as key="[a,b]" or key=a,b, nested as key="[(a,b),(c,d)]" (quotes '
             'needed, no spaces); list items by index, e.g. train_pipeline.2.scale="(64,64)"')
    parser.add_argument('--launcher', choices=LAUNCHERS, default='none', help='job launcher')
    # torch.distributed.launch passes --local-rank; torchrun sets LOCAL_RANK instead.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


def train_arg_parser() -> argparse.ArgumentParser:
    """The arguments of mmdet 3.3's tools/train.py."""
    parser = argparse.ArgumentParser(description='Train a model with the mmengine Runner')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument('--amp', action='store_true', default=False,
                        help='enable automatic-mixed-precision training')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the lr by (total batch size / auto_scale_lr.base_batch_size)')
    parser.add_argument(
        '--resume', nargs='?', type=str, const='auto', metavar='CKPT',
        help='resume from CKPT; without CKPT, from the latest checkpoint in the work_dir')
    _add_common_args(parser)
    return parser


def test_arg_parser() -> argparse.ArgumentParser:
    """The arguments of mmdet 3.3's tools/test.py (without --tta)."""
    parser = argparse.ArgumentParser(description='Test (and evaluate) a trained model')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='the dir to save the evaluation metrics')
    parser.add_argument('--out', type=str,
                        help='dump predictions to a pickle file for offline evaluation')
    parser.add_argument('--show', action='store_true', help='show prediction results')
    parser.add_argument('--show-dir',
                        help='directory (inside the work_dir) to save painted predictions')
    parser.add_argument('--wait-time', type=float, default=2, help='the interval of show (s)')
    _add_common_args(parser)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None):
    """Parse ``argv`` and export LOCAL_RANK for launchers that pass it as an argument."""
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def _describe(value: Any) -> str:
    text = repr(value)
    return f'{type(value).__name__} ({text if len(text) <= 60 else text[:57] + "..."})'


def merge_cfg_options(cfg: Config, options: Dict[str, Any]) -> None:
    """Merge ``--cfg-options`` into ``cfg``; a key that cannot exist raises a ValueError.

    ``a.b.c`` may go through dicts (new keys are added, with a warning, since mmdet allows
    adding e.g. ``randomness.seed``) and lists (by index, which must exist); going through any
    other value is an error, as are list indices out of range.
    """
    config = cfg.to_dict()
    for key in options:
        node: Any = config
        path = []
        for part in key.split('.'):
            where = '.'.join(path) or '<config>'
            if isinstance(node, (list, tuple)):
                if not part.isdigit():
                    raise ValueError(f'--cfg-options {key}: {where} is a list, so the next key '
                                     f'must be an index, got {part!r}')
                if int(part) >= len(node):
                    raise ValueError(f'--cfg-options {key}: index {part} is out of range for '
                                     f'{where}, a list of {len(node)} items')
                node = node[int(part)]
            elif isinstance(node, dict):
                if part not in node:
                    print_log(f'--cfg-options {key}: {".".join(path + [part])} is not in the '
                              'config; it is added', logger='current', level=logging.WARNING)
                    break
                node = node[part]
            else:
                raise ValueError(f'--cfg-options {key}: {where} is a {_describe(node)}, which '
                                 f'has no field {part!r}')
            path.append(part)
    cfg.merge_from_dict(options)


def load_config(path: str, cfg_options: Optional[Dict[str, Any]] = None) -> Config:
    """``Config.fromfile(path)`` plus ``--cfg-options``, with errors that name what is wrong."""
    if not osp.isfile(path):
        raise FileNotFoundError(f'config file {path!r} does not exist (or is not a file)')
    if osp.splitext(path)[1] not in ('.py', '.json', '.yaml', '.yml'):
        raise ValueError(f'config file {path!r} must be a .py, .json, .yaml or .yml file')
    cfg = Config.fromfile(path)
    if cfg_options:
        merge_cfg_options(cfg, cfg_options)
    return cfg


def replace_data_root(cfg: Config, data_root: str) -> Config:
    """Point the dataloaders and evaluators of ``cfg`` at ``data_root`` instead of
    ``cfg.data_root`` (datasets' ``data_root`` and evaluators' ``ann_file`` under it)."""
    old_root = cfg.get('data_root', None)
    if old_root is None:
        raise ValueError('replace_data_root needs a top-level data_root in the config')
    new_root = osp.join(data_root, '')
    for split in ('train', 'val', 'test'):
        loader = cfg.get(f'{split}_dataloader', None)
        if loader is None:
            continue
        dataset = loader['dataset']
        while 'dataset' in dataset:  # wrappers such as RepeatDataset
            dataset = dataset['dataset']
        dataset['data_root'] = new_root
        evaluators = cfg.get(f'{split}_evaluator', None) or []
        for evaluator in evaluators if isinstance(evaluators, (list, tuple)) else [evaluators]:
            ann_file = evaluator.get('ann_file', None)
            if ann_file is not None and ann_file.startswith(old_root):
                evaluator['ann_file'] = osp.join(new_root, ann_file[len(old_root):].lstrip('/'))
    cfg.data_root = new_root
    return cfg


def _default_work_dir(cfg: Config, config_path: str, work_dir: Optional[str]) -> str:
    # Priority as in mmdet: CLI > work_dir in the file > ./work_dirs/<config name>.
    if work_dir is not None:
        return work_dir
    if cfg.get('work_dir', None) is not None:
        return cfg.work_dir
    return osp.join('./work_dirs', osp.splitext(osp.basename(config_path))[0])


def configure_train(cfg: Config, args: argparse.Namespace) -> Config:
    """Apply the train CLI flags to ``cfg`` exactly as mmdet 3.3's tools/train.py does."""
    cfg.launcher = args.launcher
    cfg.work_dir = _default_work_dir(cfg, args.config, args.work_dir)
    if args.amp:
        wrapper = cfg.optim_wrapper.get('type', 'OptimWrapper')
        if wrapper == 'AmpOptimWrapper':
            print_log('AMP training is already enabled in your config.',
                      logger='current', level=logging.WARNING)
        elif wrapper != 'OptimWrapper':
            raise ValueError('--amp needs optim_wrapper.type == "OptimWrapper", '
                             f'got {wrapper!r}')
        else:
            cfg.optim_wrapper.type = 'AmpOptimWrapper'
            cfg.optim_wrapper.loss_scale = 'dynamic'
    if args.auto_scale_lr:
        scale_cfg = cfg.get('auto_scale_lr', None)
        if not scale_cfg or 'enable' not in scale_cfg or 'base_batch_size' not in scale_cfg:
            raise ValueError('--auto-scale-lr needs auto_scale_lr = dict(enable=False, '
                             f'base_batch_size=...) in the config {args.config!r}')
        cfg.auto_scale_lr.enable = True
    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        if not osp.isfile(args.resume):
            raise FileNotFoundError(f'--resume checkpoint {args.resume!r} does not exist')
        cfg.resume = True
        cfg.load_from = args.resume
    return cfg


def configure_test(cfg: Config, args: argparse.Namespace) -> Config:
    """Apply the test CLI flags to ``cfg`` exactly as mmdet 3.3's tools/test.py does."""
    if not osp.isfile(args.checkpoint):
        raise FileNotFoundError(f'checkpoint {args.checkpoint!r} does not exist')
    cfg.launcher = args.launcher
    cfg.work_dir = _default_work_dir(cfg, args.config, args.work_dir)
    cfg.load_from = args.checkpoint
    if args.show or args.show_dir:
        hooks = cfg.get('default_hooks', None) or {}
        if 'visualization' not in hooks:
            raise ValueError('--show/--show-dir need a `visualization` entry in '
                             f'default_hooks, which the config {args.config!r} lacks')
        hooks['visualization'].update(draw=True, show=args.show, wait_time=args.wait_time)
        if args.show_dir:
            hooks['visualization']['test_out_dir'] = args.show_dir
    if args.out is not None:
        if not args.out.endswith(('.pkl', '.pickle')):
            raise ValueError(f'--out must be a .pkl or .pickle file, got {args.out!r}')
        if cfg.get('default_scope', None) == 'mmdet':
            dump = ConfigDict(type='mmdet.DumpDetResults', out_file_path=args.out)
        else:
            dump = ConfigDict(type='DumpResults', out_file_path=args.out)
        evaluators = cfg.test_evaluator
        cfg.test_evaluator = (list(evaluators) if isinstance(evaluators, (list, tuple))
                              else [evaluators]) + [dump]
    return cfg


def build_runner(cfg: Config) -> Runner:
    """The default Runner, or ``RUNNERS.build(cfg)`` when the config sets ``runner_type``."""
    if 'runner_type' not in cfg:
        return Runner.from_cfg(cfg)
    return RUNNERS.build(cfg)
