"""ONNX export of an :class:`~.targets.ExportTarget` on the torch reference path of every op.

Exporter choice: the TorchScript exporter (``torch.onnx.export(..., dynamo=False)``). On torch
2.14 it writes the requested opset (17 and up), exports BiFormer-T with dynamic batch/H/W in
16-60 s on 2 shared CPU cores, and its graphs use only TensorRT-parsable ops. torch 2.14's default,
the torch.export-based exporter, gives a smaller graph (about 1k nodes instead of 5.7k for
BiFormer-T, the difference being shape arithmetic) but cannot write opset 17 (its lowest is 18
and the down-conversion fails), took 100 s for BiFormer-T with a dynamic batch alone, over 4 min
before failing with dynamic H/W, about 90 s for a one-conv model, and specialises size-1 axes.
docs/export.md has the measurements.
"""
import contextlib
import os
import os.path as osp
import warnings
from typing import Iterable, Sequence, Tuple

import torch

from .._deps import require
from .targets import ExportTarget

__all__ = ['MIN_OPSET', 'DYNAMIC_CHOICES', 'export_onnx', 'check_input_shape',
           'forbid_triton_launches']

MIN_OPSET = 17
DYNAMIC_CHOICES = ('none', 'batch', 'hw', 'all')


def check_input_shape(shape: Sequence[int], name: str = 'input_shape') -> Tuple[int, ...]:
    """Validate a (B, C, H, W) image batch shape of positive ints and return it as a tuple."""
    if (not isinstance(shape, (list, tuple)) or len(shape) != 4
            or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape)):
        raise ValueError(f'{name} must be 4 positive ints (B, C, H, W), got {shape!r}')
    return tuple(shape)


def _check_opset(opset) -> None:
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f'opset must be an int >= {MIN_OPSET}, got {opset!r}')


@contextlib.contextmanager
def forbid_triton_launches():
    """Make any Triton kernel launch raise inside the block.

    An op that launched a Triton kernel while the TorchScript exporter traces would leave its
    result as a constant in the graph (the trace cannot see inside the kernel), so the export
    would be silently wrong; this turns that into an error naming the kernel. ops' fast launch
    path (``ops/_launch.py``), which bypasses ``JITFunction.run``, is switched off inside.
    """
    try:
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        from ops import _launch
    except ImportError:  # no Triton installed: nothing can launch
        yield
        return

    def refuse(kernel, *args, **kwargs):
        name = getattr(getattr(kernel, 'fn', None), '__name__', type(kernel).__name__)
        raise RuntimeError(f'Triton kernel {name!r} was launched during ONNX export; the op must '
                           f'take its torch reference path while exporting '
                           f'(ops.is_exporting())')

    originals = {cls: cls.run for cls in (JITFunction, InterpretedFunction)}
    fast_launch = _launch.ENABLED
    try:
        _launch.ENABLED = False
        for cls in originals:
            cls.run = refuse
        yield
    finally:
        _launch.ENABLED = fast_launch
        for cls, run in originals.items():
            cls.run = run


def _dynamic_axes(dynamic: str, input_name: str, output_names: Iterable[str],
                  output_ranks: Iterable[int]) -> dict:
    """``dynamic_axes`` for the input (B, C, H, W) and outputs (batch first; H/W of 4-D maps)."""
    batch, spatial = dynamic in ('batch', 'all'), dynamic in ('hw', 'all')
    axes = {input_name: {**({0: 'batch'} if batch else {}),
                         **({2: 'height', 3: 'width'} if spatial else {})}}
    for name, rank in zip(output_names, output_ranks):
        output_axes = {0: 'batch'} if batch else {}
        if spatial and rank == 4:
            output_axes.update({2: f'{name}_height', 3: f'{name}_width'})
        axes[name] = output_axes
    return {name: value for name, value in axes.items() if value}


def export_onnx(target: ExportTarget, output: str, input_shape: Sequence[int], *,
                opset: int = MIN_OPSET, dynamic: str = 'none', input_name: str = 'input'):
    """Export ``target.module`` to ONNX at ``output`` and return the loaded ``onnx.ModelProto``.

    Args:
        target: what to export (its module must return a flat tuple of tensors).
        output: path of the .onnx file (its folder is created).
        input_shape: (B, C, H, W) of the random example input that is traced.
        opset: default-domain opset, >= 17.
        dynamic: which input axes stay symbolic: ``'none'``, ``'batch'``, ``'hw'`` or ``'all'``.
            H/W only work for models whose Python code has no shape-dependent branches at the
            sizes used; :func:`.verify.compare_with_onnxruntime` at a second size tells.
        input_name: name of the graph input.

    Every op runs its torch reference path (the exporter's own flags select it) and any Triton
    launch raises (:func:`forbid_triton_launches`).
    """
    onnx = require('onnx', 'ONNX export')
    if dynamic not in DYNAMIC_CHOICES:
        raise ValueError(f'dynamic must be one of {DYNAMIC_CHOICES}, got {dynamic!r}')
    _check_opset(opset)
    input_shape = check_input_shape(input_shape)
    module = target.module.eval()
    example = torch.randn(input_shape)
    try:
        with torch.no_grad():
            outputs = module(example)
    except Exception as err:
        raise ValueError(f'{target.name} does not run on an input of shape {input_shape}: '
                         f'{err}') from err
    if len(outputs) != len(target.output_names):
        raise RuntimeError(f'{target.name} returned {len(outputs)} outputs, expected '
                           f'{len(target.output_names)} ({target.output_names})')
    axes = _dynamic_axes(dynamic, input_name, target.output_names,
                         [output.dim() for output in outputs])
    os.makedirs(osp.dirname(osp.abspath(output)), exist_ok=True)
    with forbid_triton_launches(), torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings('ignore', category=torch.jit.TracerWarning)
        warnings.filterwarnings('ignore', message='You are using the legacy TorchScript-based')
        torch.onnx.export(module, (example,), output, input_names=[input_name],
                          output_names=list(target.output_names), opset_version=opset,
                          dynamic_axes=axes or None, dynamo=False)
    model = onnx.load(output)
    onnx.checker.check_model(model)
    return model
