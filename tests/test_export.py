"""ONNX export: BiFormer and the RetinaNet demo detector through onnxruntime at two sizes, the
TensorRT operator allow-list, the Triton guard, and bad arguments."""
import contextlib
import io
import os
import re
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
from timm.models import get_pretrained_cfg, model_entrypoint

onnx = pytest.importorskip('onnx')
pytest.importorskip('onnxruntime')
from onnx import helper  # noqa: E402

from backbones.deploy import (DetectorRawOutputs, ExportTarget, FlatOutputs,  # noqa: E402
                              export_model, export_onnx, find_tensorrt_issues,
                              forbid_triton_launches, onnx_op_types, predict_from_raw_outputs)
from backbones.deploy.tensorrt_engine import ShapeProfile  # noqa: E402
from backbones.deploy.tensorrt_ops import (DATA_DEPENDENT_OPS,  # noqa: E402
                                           TENSORRT_SUPPORTED_OPS)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'tools'))
import export as export_cli  # noqa: E402

DEMO_CONFIG = str(REPO / 'configs/demo/retinanet_biformer-demo_fpn_shapes.py')
ALLOWED_OPS = TENSORRT_SUPPORTED_OPS - DATA_DEPENDENT_OPS
ATOL = 1e-4


def _conv_target():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
    return ExportTarget(FlatOutputs(model.eval()), 'conv', 'features', ('pooled',), (1, 3, 8, 8))


def _assert_tensorrt_parsable(path):
    graph = onnx.load(path)
    op_types = onnx_op_types(graph)
    print(f'{os.path.basename(path)} op types: {dict(sorted(op_types.items()))}')
    assert set(op_types) <= ALLOWED_OPS, sorted(set(op_types) - ALLOWED_OPS)
    assert find_tensorrt_issues(graph) == []
    assert [(entry.domain, entry.version) for entry in graph.opset_import] == [('', 17)]
    return op_types


def smallest_model_per_family():
    """The fewest-parameter timm model of each of our families (models registered by one
    module under ``backbones``), e.g. ``['biformer_tiny']``."""
    families = {}
    for name in timm.list_models():
        module = model_entrypoint(name).__module__
        if module.startswith('backbones.'):
            families.setdefault(module, []).append(name)

    def num_params(name):
        with torch.device('meta'):
            return sum(p.numel() for p in timm.create_model(name).parameters())

    return sorted(min(names, key=num_params) for names in families.values())


@pytest.fixture(scope='module', params=smallest_model_per_family())
def family_export(request, tmp_path_factory):
    """tools/export.py MODEL --dynamic --rtol 0 --verify-shape 2,C,H+32,W+96: (model, exit
    status, stdout lines, onnx path)."""
    path = str(tmp_path_factory.mktemp('export') / f'{request.param}.onnx')
    channels, height, width = get_pretrained_cfg(request.param).input_size
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        # the second size is no multiple of the export size: one graph must serve every size
        status = export_cli.main([request.param, '--dynamic', '--rtol', '0', '--output', path,
                                  '--verify-shape', f'2,{channels},{height + 32},{width + 96}'])
    return request.param, status, stdout.getvalue().splitlines(), path


@pytest.mark.slow
def test_family_cli_export_matches_pytorch_at_two_sizes(family_export):
    model, status, lines, _ = family_export
    channels, height, width = get_pretrained_cfg(model).input_size
    comparisons = [line for line in lines if line.startswith('onnxruntime vs PyTorch')]
    assert status == 0, lines
    assert sorted({c.split(' output ')[0] for c in comparisons}) == [
        f'onnxruntime vs PyTorch, input (1, {channels}, {height}, {width})',
        f'onnxruntime vs PyTorch, input (2, {channels}, {height + 32}, {width + 96})']
    assert all(float(c.split('max abs diff ')[1].split(',')[0]) <= ATOL for c in comparisons)


@pytest.mark.slow
def test_family_graph_uses_tensorrt_ops_with_dynamic_axes(family_export):
    _, _, _, path = family_export
    _assert_tensorrt_parsable(path)  # includes: every TopK has a constant K
    graph = onnx.load(path)
    assert [d.dim_param for d in graph.graph.input[0].type.tensor_type.shape.dim] == [
        'batch', '', 'height', 'width']


def test_biformer_is_a_family():
    assert 'biformer_tiny' in smallest_model_per_family()


@pytest.mark.slow
def test_demo_retinanet_raw_outputs_and_outside_decoding(tmp_path):
    pytest.importorskip('mmdet')
    path = str(tmp_path / 'retinanet.onnx')
    report = export_model(DEMO_CONFIG, dynamic='all', output=path, log=lambda line: None)
    raw, (_, _, height, width) = report.target.module, report.target.default_input_shape
    assert report.target.kind == 'detector'
    assert raw.output_names == tuple(f'{group}_{level}' for group in ('cls_scores', 'bbox_preds')
                                     for level in range(3))
    assert [d.input_shape for d in report.onnxruntime[::6]] == [(1, 3, height, width),
                                                                 (2, 3, 2 * height, 2 * width)]
    assert report.failures(ATOL) == [], report.failures(ATOL)
    _assert_tensorrt_parsable(path)

    # box decoding and NMS run in PyTorch on the graph's outputs, as detector.predict does
    import onnxruntime as ort
    from mmdet.structures import DetDataSample

    raw.detector.bbox_head.test_cfg.score_thr = 0.0  # keep boxes of the untrained head
    meta = dict(img_shape=(height, width), ori_shape=(height, width), scale_factor=(1.0, 1.0))
    x = torch.randn(1, 3, height, width)
    outputs = ort.InferenceSession(path).run(list(raw.output_names), {'input': x.numpy()})
    decoded = predict_from_raw_outputs(raw, [torch.from_numpy(o) for o in outputs], [meta])[0]
    with torch.no_grad():
        expected = raw.detector.predict(x, [DetDataSample(metainfo=meta)])[0].pred_instances
    assert len(decoded) == len(expected) == raw.detector.bbox_head.test_cfg.max_per_img
    torch.testing.assert_close(decoded.bboxes, expected.bboxes, atol=1e-3, rtol=0)
    torch.testing.assert_close(decoded.scores, expected.scores, atol=1e-5, rtol=0)
    assert torch.equal(decoded.labels, expected.labels)


def test_triton_launch_during_export_is_refused(tmp_path):
    triton = pytest.importorskip('triton')
    import triton.language as tl

    @triton.jit
    def add_one(x_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.arange(0, BLOCK)
        mask = offsets < n
        tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) + 1, mask=mask)

    class TritonAddOne(nn.Module):
        def forward(self, x):
            out = x.clone()
            add_one[(1,)](out, out.numel(), BLOCK=256)
            return out

    x = torch.zeros(1, 3, 8, 8)
    assert torch.equal(TritonAddOne()(x), x + 1)  # launches outside the guard
    with forbid_triton_launches(), pytest.raises(RuntimeError, match="Triton kernel 'add_one'"):
        TritonAddOne()(x)
    assert torch.equal(TritonAddOne()(x), x + 1)  # the guard is undone
    target = ExportTarget(FlatOutputs(TritonAddOne()), 'triton', 'features', ('out',),
                          (1, 3, 8, 8))
    with pytest.raises(RuntimeError, match='launched during ONNX export'):
        export_onnx(target, str(tmp_path / 'triton.onnx'), (1, 3, 8, 8))


def _graph(nodes, opset=17, initializers=()):
    inputs = [helper.make_tensor_value_info('x', onnx.TensorProto.FLOAT, [2, 8])]
    outputs = [helper.make_tensor_value_info(nodes[-1].output[0], onnx.TensorProto.FLOAT, None)]
    graph = helper.make_graph(nodes, 'g', inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid('', opset)])


def _k(value):
    return helper.make_tensor('k', onnx.TensorProto.INT64, [1], [value])


@pytest.mark.parametrize('nodes, opset, initializers, issue', [
    ([helper.make_node('Relu', ['x'], ['y'])], 17, (), None),
    ([helper.make_node('TopK', ['x', 'k'], ['y', 'i'], axis=-1)], 17, (_k(3),), None),
    ([helper.make_node('Relu', ['x'], ['y'])], 21, (), 'opset 21 is outside 9-20'),
    ([helper.make_node('Unique', ['x'], ['y'])], 17, (), 'Unique: not supported'),
    ([helper.make_node('NonZero', ['x'], ['y'])], 17, (), 'NonZero: data-dependent'),
    ([helper.make_node('Kernel', ['x'], ['y'], domain='triton')], 17, (), 'triton::Kernel from a'),
    ([helper.make_node('Shape', ['x'], ['s']), helper.make_node('TopK', ['x', 's'], ['y', 'i'])],
     17, (), 'K is computed at run time'),
    ([helper.make_node('TopK', ['x', 'k'], ['y', 'i'])], 17, (_k(4000),), 'must be < 3840'),
    ([helper.make_node('TopK', ['x', 'k'], ['y', 'i'], sorted=0)], 17, (_k(3),),
     'sorted must be 1'),
    ([helper.make_node('Shape', ['x'], ['s']), helper.make_node('ReduceSum', ['x', 's'], ['y'])],
     17, (), 'ReduceSum .*axes must be a constant'),
])
def test_tensorrt_issues(nodes, opset, initializers, issue):
    issues = find_tensorrt_issues(_graph(nodes, opset, initializers))
    if issue is None:
        assert issues == []
    else:
        assert len(issues) == 1 and re.search(issue, issues[0]), issues


def test_op_types_include_nested_subgraphs():
    branch = helper.make_graph([helper.make_node('Unique', ['x'], ['u'])], 'b', [],
                               [helper.make_tensor_value_info('u', onnx.TensorProto.FLOAT, None)])
    node = helper.make_node('If', ['c'], ['y'], then_branch=branch, else_branch=branch)
    counts = onnx_op_types(_graph([node]))
    assert counts == {'If': 1, 'Unique': 2}


@pytest.mark.parametrize('argv, message', [
    (['not_a_model'], "unknown model 'not_a_model'"),
    (['resnet18', '--format', 'onnx', '--fp16'], 'fp16 applies to --format tensorrt'),
    (['resnet18', '--features-only', '--input-shape', '1,3,0,224'], None),
    ([DEMO_CONFIG, '--features-only'], 'features_only applies to timm model names'),
    (['resnet18', '--checkpoint', '/nonexistent.pth'], "checkpoint '/nonexistent.pth' does not"),
    (['resnet18', '--format', 'tensorrt'],
     'is the engine file with --format tensorrt'),
])
def test_cli_rejects_bad_arguments(argv, message, capsys, tmp_path):
    argv = argv + ['--output', str(tmp_path / 'out.onnx')]
    if message is None:  # argparse rejects it before anything is built
        with pytest.raises(SystemExit) as exit_info:
            export_cli.main(argv)
        assert exit_info.value.code == 2
        assert 'expected B,C,H,W (4 positive ints)' in capsys.readouterr().err
        return
    assert export_cli.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / 'out.onnx').exists()


@pytest.mark.parametrize('argv, message', [
    (['resnet18', '--opset', '16'], 'opset must be >= 17, got 16'),
    (['resnet18', '--input-shape', '1,3,224'], 'expected B,C,H,W (4 positive ints)'),
    (['resnet18', '--dynamic', 'depth'], "invalid choice: 'depth'"),
])
def test_cli_argument_parsing_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export_cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_library_rejects_bad_arguments(tmp_path):
    target, path = _conv_target(), str(tmp_path / 'conv.onnx')
    with pytest.raises(ValueError, match='opset must be an int >= 17, got 16'):
        export_onnx(target, path, (1, 3, 8, 8), opset=16)
    with pytest.raises(ValueError, match=r'input_shape must be 4 positive ints \(B, C, H, W\)'):
        export_onnx(target, path, (1, 3, 8))
    with pytest.raises(ValueError, match='dynamic must be one of'):
        export_onnx(target, path, (1, 3, 8, 8), dynamic='depth')
    with pytest.raises(ValueError, match=r'conv does not run on an input of shape \(1, 4, 8, 8\)'):
        export_onnx(target, path, (1, 4, 8, 8))
    with pytest.raises(ValueError, match='only single-stage detectors'):
        DetectorRawOutputs(nn.Module(), (1, 3, 32, 32))
    with pytest.raises(ValueError, match='min <= opt <= max'):
        ShapeProfile(min=(2, 3, 8, 8), opt=(1, 3, 8, 8), max=(4, 3, 8, 8))
    assert not os.path.exists(path)


def test_tensorrt_format_without_tensorrt_says_how_to_install(capsys):
    try:
        import tensorrt  # noqa: F401
        pytest.skip('tensorrt is installed')
    except ImportError:
        pass
    assert export_cli.main(['resnet18', '--format', 'tensorrt']) == 2
    err = capsys.readouterr().err
    assert 'needs `tensorrt`' in err and 'pip install tensorrt-cu12' in err
