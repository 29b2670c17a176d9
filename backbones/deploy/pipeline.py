"""Export, check and verify in one call: what ``tools/export.py`` runs."""
import os.path as osp
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

from .onnx_export import MIN_OPSET, check_input_shape, export_onnx
from .targets import ExportTarget, load_export_target
from .tensorrt_ops import find_tensorrt_issues, onnx_op_types
from .verify import (OutputDifference, compare_with_onnxruntime, output_differences,
                     random_inputs, second_input_shape, torch_reference_outputs)

__all__ = ['FORMATS', 'ExportReport', 'export_model']

FORMATS = ('onnx', 'tensorrt')


@dataclass
class ExportReport:
    """What :func:`export_model` produced and measured."""
    target: ExportTarget
    onnx_path: str
    op_types: dict
    tensorrt_issues: List[str]
    onnxruntime: List[OutputDifference]
    engine_path: Optional[str] = None
    tensorrt: List[OutputDifference] = field(default_factory=list)
    tensorrt_latency_ms: List[Tuple[Tuple[int, ...], float]] = field(default_factory=list)

    def failures(self, atol: float, rtol: float = 0.0) -> List[str]:
        """Reasons the export is not usable: TensorRT-incompatible ops, and outputs whose max
        abs difference exceeds ``atol + rtol * (largest magnitude of the PyTorch output)``."""
        return self.tensorrt_issues + [
            f'{runtime}: {diff}' for runtime, diffs in (('onnxruntime', self.onnxruntime),
                                                        ('tensorrt', self.tensorrt))
            for diff in diffs if not diff.within(atol, rtol)]


def _default_output(target: ExportTarget, fmt: str) -> str:
    stem = osp.splitext(osp.basename(target.name))[0]
    return f'{stem}.onnx' if fmt == 'onnx' else f'{stem}.engine'


def export_model(model: str, *, checkpoint: Optional[str] = None, features_only: bool = False,
                 fmt: str = 'onnx', input_shape: Optional[Sequence[int]] = None,
                 dynamic: str = 'none', fp16: bool = False, opset: int = MIN_OPSET,
                 output: Optional[str] = None,
                 verify_shape: Optional[Sequence[int]] = None,
                 log: Callable[[str], None] = print) -> ExportReport:
    """Export ``model`` (timm name or config) to ONNX, or on to a TensorRT engine, and verify.

    The ONNX graph is checked against TensorRT's operator allow-list and run with onnxruntime
    at the export shape and at a second shape (``verify_shape``, default
    :func:`.verify.second_input_shape`), against PyTorch on the same random inputs. With
    ``fmt='tensorrt'`` the graph (written next to the engine as ``.onnx``) is built into an
    engine whose profile spans both shapes (opt = export shape; min/max per axis over the two),
    which is run at both and timed. ``fp16`` only applies to TensorRT (FP16 kernels in the engine).

    Returns:
        An :class:`ExportReport`; call ``report.failures(atol, rtol)`` to judge it.
    """
    if fmt not in FORMATS:
        raise ValueError(f'format must be one of {FORMATS}, got {fmt!r}')
    if fp16 and fmt != 'tensorrt':
        raise ValueError('fp16 applies to --format tensorrt (FP16 engine kernels); the ONNX '
                         'graph itself stays float32')
    if input_shape is not None:
        input_shape = check_input_shape(tuple(input_shape))
    if verify_shape is not None:
        verify_shape = check_input_shape(tuple(verify_shape), 'verify_shape')
    if fmt == 'tensorrt' and output is not None and output.endswith('.onnx'):
        raise ValueError(f'output {output!r} is the engine file with --format tensorrt (the '
                         f'graph is written next to it as .onnx); use e.g. a .engine suffix')
    if fmt == 'tensorrt':  # fail before the (long) export when TensorRT is missing
        from .tensorrt_engine import import_tensorrt
        import_tensorrt()

    target = load_export_target(model, checkpoint, features_only)
    input_shape = input_shape or target.default_input_shape
    output = output or _default_output(target, fmt)
    onnx_path = output if fmt == 'onnx' else osp.splitext(output)[0] + '.onnx'
    log(f'exporting {target.name} ({target.kind}, outputs {", ".join(target.output_names)}) '
        f'at input {input_shape}, dynamic={dynamic}, opset {opset}')
    graph = export_onnx(target, onnx_path, input_shape, opset=opset, dynamic=dynamic)
    op_types = dict(sorted(onnx_op_types(graph).items()))
    issues = find_tensorrt_issues(graph)
    log(f'wrote {onnx_path}: {sum(op_types.values())} nodes; op types: '
        + ', '.join(f'{op} x{n}' for op, n in op_types.items()))
    log('TensorRT op check: ' + ('passed' if not issues else '; '.join(issues)))

    shapes = [input_shape]
    second = verify_shape or second_input_shape(input_shape, dynamic)
    if second is not None and second != input_shape:
        shapes.append(second)
    else:
        log('static export: verified at the export shape only')
    inputs = random_inputs(shapes)
    references = torch_reference_outputs(target.module, inputs)
    differences = compare_with_onnxruntime(onnx_path, target.output_names, inputs, references)
    for diff in differences:
        log(f'onnxruntime vs PyTorch, {diff}')
    report = ExportReport(target, onnx_path, op_types, issues, differences)

    if fmt == 'tensorrt':
        from .tensorrt_engine import ShapeProfile, TensorRTRunner, build_engine

        profile = ShapeProfile(min=tuple(min(axis) for axis in zip(*shapes)),
                               opt=tuple(input_shape),
                               max=tuple(max(axis) for axis in zip(*shapes)))
        engine_bytes = build_engine(onnx_path, output, profile, fp16=fp16)
        report.engine_path = output
        log(f'wrote {output}: TensorRT engine, profile min {profile.min} opt {profile.opt} '
            f'max {profile.max}{", fp16" if fp16 else ""}')
        runner = TensorRTRunner(engine_bytes, target.output_names)
        for x, reference in zip(inputs, references):
            outputs = runner(x)
            report.tensorrt += output_differences(tuple(x.shape), target.output_names,
                                                  reference, outputs)
            latency = runner.latency_ms(x)
            report.tensorrt_latency_ms.append((tuple(x.shape), latency))
            log(f'TensorRT latency at input {tuple(x.shape)}: {latency:.3f} ms (median)')
        for diff in report.tensorrt:
            log(f'TensorRT vs PyTorch, {diff}')
    return report
