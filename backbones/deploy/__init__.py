"""Deployment: ONNX export on the torch reference path, onnxruntime verification, TensorRT
operator checks and TensorRT engine build/run (when ``tensorrt`` is installed).

    from backbones.deploy import export_model
    report = export_model('biformer_tiny', dynamic='all')   # writes biformer_tiny.onnx
    assert not report.failures(atol=1e-4)

``tools/export.py`` is the command line over :func:`export_model`; see docs/export.md.
"""
from .detectors import DetectorRawOutputs, predict_from_raw_outputs
from .onnx_export import DYNAMIC_CHOICES, MIN_OPSET, export_onnx, forbid_triton_launches
from .pipeline import FORMATS, ExportReport, export_model
from .targets import ExportTarget, FlatOutputs, load_export_target
from .tensorrt_ops import TENSORRT_SUPPORTED_OPS, find_tensorrt_issues, onnx_op_types
from .verify import (OutputDifference, compare_with_onnxruntime, random_inputs,
                     second_input_shape, torch_reference_outputs)

__all__ = ['DYNAMIC_CHOICES', 'FORMATS', 'MIN_OPSET', 'TENSORRT_SUPPORTED_OPS',
           'DetectorRawOutputs', 'ExportReport', 'ExportTarget', 'FlatOutputs',
           'OutputDifference', 'compare_with_onnxruntime', 'export_model', 'export_onnx',
           'find_tensorrt_issues', 'forbid_triton_launches', 'load_export_target',
           'onnx_op_types', 'predict_from_raw_outputs', 'random_inputs',
           'second_input_shape', 'torch_reference_outputs']
