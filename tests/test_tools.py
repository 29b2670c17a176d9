"""tools/train.py and tools/test.py: flags, clear errors, and a short train + resume + test run."""
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

pytest.importorskip('mmdet', reason='the detection tools need mmdet')
from mmengine.config import Config  # noqa: E402

from backbones.datasets import make_shapes_coco  # noqa: E402
from backbones.mm.classifier import (TimmClassifier, TimmMixupDataPreprocessor,  # noqa: E402
                                     TopKAccuracy)
from backbones.mm import runner  # noqa: E402
from backbones.mm.runner import (configure_test, configure_train, load_config,  # noqa: E402
                                 merge_cfg_options, replace_data_root, train_arg_parser)

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO_CONFIG = str(REPO / 'configs' / 'demo' / 'retinanet_biformer-demo_fpn_shapes.py')
CLS_CONFIG = str(REPO / 'configs' / 'classification' / 'biformer-tiny_8xb128_in1k.py')


# ---------------------------------------------------------------- flags and errors

def test_train_flags_match_mmdet():
    args = train_arg_parser().parse_args(
        ['c.py', '--work-dir', 'w', '--amp', '--auto-scale-lr', '--resume',
         '--cfg-options', 'a.b=1', 'c=[1,2]', 'd=(x,y)', 'e=None', '--launcher', 'pytorch'])
    assert (args.config, args.work_dir, args.amp, args.auto_scale_lr) == ('c.py', 'w', True, True)
    assert args.resume == 'auto' and args.launcher == 'pytorch'
    assert args.cfg_options == {'a.b': 1, 'c': [1, 2], 'd': ('x', 'y'), 'e': None}
    assert train_arg_parser().parse_args(['c.py', '--resume', 'x.pth']).resume == 'x.pth'
    assert train_arg_parser().parse_args(['c.py']).resume is None
    args = runner.test_arg_parser().parse_args(
        ['c.py', 'k.pth', '--out', 'r.pkl', '--show-dir', 'v'])
    assert (args.checkpoint, args.out, args.show_dir, args.launcher) == (
        'k.pth', 'r.pkl', 'v', 'none')


@pytest.mark.parametrize('option, message', [
    ('model.backbone', 'expected KEY=VALUE'),
    ('=3', 'expected KEY=VALUE'),
    ('model..depth=3', 'expected KEY=VALUE'),
    ('a=[1,2', 'unbalanced brackets'),
])
def test_malformed_cfg_options_exit_with_a_clear_message(capsys, option, message):
    with pytest.raises(SystemExit) as err:
        train_arg_parser().parse_args(['c.py', '--cfg-options', option])
    assert err.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize('key, message', [
    ('optim_wrapper.optimizer.lr.scale', "optim_wrapper.optimizer.lr is a float (0.001)"),
    ('train_pipeline.9.type', 'index 9 is out of range for train_pipeline, a list of 5'),
    ('train_pipeline.first.type', 'train_pipeline is a list'),
])
def test_cfg_options_through_a_value_name_the_problem(key, message):
    cfg = Config.fromfile(DEMO_CONFIG)
    with pytest.raises(ValueError, match=message.replace('(', r'\(').replace(')', r'\)')):
        merge_cfg_options(cfg, {key: 1})


def test_cfg_options_merge_into_dicts_and_lists():
    cfg = Config.fromfile(DEMO_CONFIG)
    merge_cfg_options(cfg, {'optim_wrapper.optimizer.lr': 0.5, 'train_pipeline.3.prob': 0.0,
                            'randomness.seed': 7})
    assert cfg.optim_wrapper.optimizer.lr == 0.5
    assert cfg.train_pipeline[3] == dict(type='RandomFlip', prob=0.0)
    assert cfg.randomness.seed == 7


def test_bad_config_paths_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match='no_such_config.py'):
        load_config(str(tmp_path / 'no_such_config.py'))
    (tmp_path / 'config.txt').write_text('x = 1\n')
    with pytest.raises(ValueError, match=r'config.txt.*\.py'):
        load_config(str(tmp_path / 'config.txt'))


def test_cli_reports_a_missing_config_without_running(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / 'tools' / 'train.py'),
                             str(tmp_path / 'missing.py')], capture_output=True, text=True,
                            cwd=tmp_path, timeout=600)
    assert result.returncode == 2
    assert "error: config file '" in result.stderr and 'missing.py' in result.stderr
    assert 'Traceback' not in result.stderr


def test_train_flags_change_the_config(tmp_path):
    cfg = load_config(DEMO_CONFIG)
    args = train_arg_parser().parse_args([DEMO_CONFIG, '--amp', '--auto-scale-lr'])
    configure_train(cfg, args)
    assert cfg.work_dir == os.path.join('./work_dirs', 'retinanet_biformer-demo_fpn_shapes')
    assert cfg.optim_wrapper.type == 'AmpOptimWrapper'
    assert cfg.optim_wrapper.loss_scale == 'dynamic'
    assert cfg.auto_scale_lr.enable is True and cfg.resume is False
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        configure_train(load_config(DEMO_CONFIG),
                        train_arg_parser().parse_args([DEMO_CONFIG, '--resume', 'nope.pth']))
    cfg = load_config(DEMO_CONFIG, {'auto_scale_lr': None})
    with pytest.raises(ValueError, match='--auto-scale-lr needs auto_scale_lr'):
        configure_train(cfg, train_arg_parser().parse_args([DEMO_CONFIG, '--auto-scale-lr']))


def test_test_flags_change_the_config(tmp_path):
    checkpoint = tmp_path / 'model.pth'
    checkpoint.write_bytes(b'')
    args = runner.test_arg_parser().parse_args([DEMO_CONFIG, str(checkpoint), '--out', 'res.pkl',
                                         '--show-dir', 'painted', '--work-dir', 'w'])
    cfg = configure_test(load_config(DEMO_CONFIG), args)
    assert cfg.load_from == str(checkpoint) and cfg.work_dir == 'w'
    assert cfg.default_hooks.visualization.draw is True
    assert cfg.default_hooks.visualization.test_out_dir == 'painted'
    assert [e['type'] for e in cfg.test_evaluator] == ['CocoMetric', 'mmdet.DumpDetResults']
    with pytest.raises(ValueError, match='--out must be a .pkl'):
        configure_test(load_config(DEMO_CONFIG), runner.test_arg_parser().parse_args(
            [DEMO_CONFIG, str(checkpoint), '--out', 'res.json']))
    with pytest.raises(FileNotFoundError, match='missing.pth'):
        configure_test(load_config(DEMO_CONFIG),
                       runner.test_arg_parser().parse_args([DEMO_CONFIG, 'missing.pth']))
    with pytest.raises(ValueError, match='visualization'):
        configure_test(load_config(CLS_CONFIG), runner.test_arg_parser().parse_args(
            [CLS_CONFIG, str(checkpoint), '--show']))


def test_replace_data_root_moves_datasets_and_evaluators():
    cfg = replace_data_root(load_config(DEMO_CONFIG), '/elsewhere/shapes')
    for split in ('train', 'val', 'test'):
        assert cfg[f'{split}_dataloader'].dataset.data_root == '/elsewhere/shapes/'
    for split in ('val', 'test'):
        assert cfg[f'{split}_evaluator'].ann_file == (
            '/elsewhere/shapes/annotations/instances_val.json')


# ---------------------------------------------------------------- classification pieces

def test_mixup_preprocessor_and_classifier_losses():
    preprocessor = TimmMixupDataPreprocessor(mixup=dict(
        mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=3))
    batch = dict(inputs=torch.randn(4, 3, 32, 32), data_samples=torch.tensor([0, 1, 2, 0]))
    mixed = preprocessor(batch, training=True)
    assert mixed['data_samples'].shape == (4, 3)
    torch.testing.assert_close(mixed['data_samples'].sum(1), torch.ones(4))
    assert preprocessor(batch, training=False)['data_samples'].shape == (4,)
    with pytest.raises(ValueError, match='even batch size'):
        preprocessor(dict(inputs=torch.randn(3, 3, 32, 32),
                          data_samples=torch.tensor([0, 1, 2])), training=True)

    model = TimmClassifier('test_convnext', num_classes=3, label_smoothing=0.1)
    hard = model(batch['inputs'], batch['data_samples'], mode='loss')['loss']
    soft = model(batch['inputs'], torch.nn.functional.one_hot(batch['data_samples'], 3).float(),
                 mode='loss')['loss']
    assert torch.isfinite(hard) and torch.isfinite(soft) and not torch.allclose(hard, soft)
    predictions = model(batch['inputs'], batch['data_samples'], mode='predict')
    assert len(predictions) == 4 and predictions[0]['scores'].shape == (3,)
    with pytest.raises(ValueError, match='mode'):
        model(batch['inputs'], mode='logits')


def test_topk_accuracy():
    metric = TopKAccuracy(topk=(1, 2))
    metric.process(None, [dict(scores=torch.tensor([0.7, 0.2, 0.1]), gt_label=0),
                          dict(scores=torch.tensor([0.5, 0.3, 0.2]), gt_label=1),
                          dict(scores=torch.tensor([0.5, 0.3, 0.2]), gt_label=2)])
    assert metric.compute_metrics(metric.results) == {'top1': pytest.approx(100 / 3),
                                                      'top2': pytest.approx(200 / 3)}
    with pytest.raises(ValueError, match='topk'):
        TopKAccuracy(topk=(0,))


# ---------------------------------------------------------------- train, resume, test

def _losses_by_iter(work_dir):
    """{iter: loss} from every run's scalars.json under work_dir."""
    losses = {}
    for path in pathlib.Path(work_dir).glob('*/vis_data/scalars.json'):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if 'loss' in record:
                losses[record['iter']] = record['loss']
    return losses


def _run_tool(name, *argv, cwd):
    """Run tools/<name>.py in a fresh process, as a user would; return its stdout + stderr."""
    result = subprocess.run([sys.executable, str(REPO / 'tools' / f'{name}.py'), *argv],
                            capture_output=True, text=True, cwd=cwd, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    return output


@pytest.mark.slow
def test_train_resume_test_on_generated_data(tmp_path):
    data_root = tmp_path / 'shapes'
    make_shapes_coco(str(data_root), num_train=4, num_val=2, image_size=160, max_objects=3)
    work_dir = tmp_path / 'work'
    options = [f'{split}_dataloader.dataset.data_root={data_root}/' for split in
               ('train', 'val', 'test')] + [
        f'{split}_evaluator.ann_file={data_root}/annotations/instances_val.json'
        for split in ('val', 'test')] + [
        'train_dataloader.batch_size=2', 'default_hooks.logger.interval=1',
        'param_scheduler.0.end=2']

    _run_tool('train', DEMO_CONFIG, '--work-dir', str(work_dir), '--cfg-options',
              'train_cfg.max_epochs=1', 'train_cfg.val_interval=5', *options, cwd=tmp_path)
    assert (work_dir / 'epoch_1.pth').is_file()
    first = _losses_by_iter(work_dir)
    assert sorted(first) == [1, 2]

    # A new process resumes from the latest checkpoint of the work_dir (as after a kill) and
    # trains one more epoch: the iterations, lr schedule and loss curve continue.
    output = _run_tool('train', DEMO_CONFIG, '--work-dir', str(work_dir), '--resume',
                       '--cfg-options', 'train_cfg.max_epochs=2', 'train_cfg.val_interval=5',
                       *options, cwd=tmp_path)
    assert 'resumed epoch: 1, iter: 2' in output
    both = _losses_by_iter(work_dir)
    assert sorted(both) == [1, 2, 3, 4] and {k: both[k] for k in first} == first
    assert all(torch.isfinite(torch.tensor(loss)) for loss in both.values())

    # Four iterations leave every score near the focal-loss prior (0.01): keep them all.
    output = _run_tool('test', DEMO_CONFIG, str(work_dir / 'epoch_2.pth'), '--work-dir',
                       str(work_dir), '--out', str(tmp_path / 'results.pkl'), '--cfg-options',
                       'model.test_cfg.score_thr=0.0', *options, cwd=tmp_path)
    assert 'Average Precision  (AP) @[ IoU=0.50      | area=   all' in output
    assert 'coco/bbox_mAP_50' in output
    assert (tmp_path / 'results.pkl').stat().st_size > 0
