"""What gets exported: a model built from a timm name or a config, with named flat outputs."""
import os.path as osp
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn

from .._deps import require

__all__ = ['ExportTarget', 'FlatOutputs', 'load_export_target', 'target_from_timm',
           'target_from_config']

CONFIG_SUFFIXES = ('.py', '.json', '.yaml', '.yml')


class FlatOutputs(nn.Module):
    """Wraps a model so that it returns a flat tuple of tensors (nested lists/tuples flattened
    depth-first), the form ONNX graph outputs take."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return tuple(_flatten(self.model(x)))


def _flatten(outputs):
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, (list, tuple)):
        return [tensor for item in outputs for tensor in _flatten(item)]
    raise TypeError(f'model outputs must be tensors or (nested) lists/tuples of tensors, got '
                    f'{type(outputs).__name__}')


@dataclass
class ExportTarget:
    """A model ready for export.

    Attributes:
        module: eval-mode module mapping a (B, C, H, W) float image batch to a flat tuple of
            tensors, one per name in ``output_names``.
        name: the timm model name or config path it was built from.
        kind: ``'classifier'`` (logits), ``'features'`` (backbone feature maps) or
            ``'detector'`` (raw head outputs of a :class:`.detectors.DetectorRawOutputs`; box
            decoding and NMS stay outside the graph, see
            :func:`.detectors.predict_from_raw_outputs`).
        output_names: ONNX output names, in output order.
        default_input_shape: (B, C, H, W) used when the caller gives none.
    """
    module: nn.Module
    name: str
    kind: str
    output_names: Tuple[str, ...]
    default_input_shape: Tuple[int, int, int, int]


def target_from_timm(model_name: str, checkpoint: Optional[str] = None,
                     features_only: bool = False) -> ExportTarget:
    """A timm model (ours are registered by importing :mod:`backbones`) as a classifier, or
    with ``features_only`` as a backbone returning its feature maps ``features_{i}`` (NCHW).

    ``checkpoint`` is loaded like timm pretrained weights (through the model's checkpoint
    filter, so official BiFormer files work).
    """
    import timm

    import backbones.biformer  # noqa: F401  (registers our timm models)

    if not timm.is_model(model_name):
        raise ValueError(f'unknown model {model_name!r}: not a registered timm model '
                         f'(see timm.list_models()) and not a config file ({CONFIG_SUFFIXES})')
    kwargs = dict(exportable=True)
    if checkpoint is not None:
        if not osp.isfile(checkpoint):
            raise FileNotFoundError(f'checkpoint {checkpoint!r} does not exist')
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=checkpoint))
    if features_only:
        kwargs.update(features_only=True)
    model = timm.create_model(model_name, **kwargs).eval()
    channels, height, width = model.pretrained_cfg['input_size']
    if features_only:
        names = tuple(f'features_{i}' for i in model.feature_info.out_indices)
        kind = 'features'
    else:
        names, kind = ('logits',), 'classifier'
    return ExportTarget(FlatOutputs(model), model_name, kind, names, (1, channels, height, width))


def target_from_config(config_path: str, checkpoint: Optional[str] = None) -> ExportTarget:
    """An mmdet single-stage detector from an mmengine config (its backbone, neck and head,
    returning the head's raw outputs; see :class:`.detectors.DetectorRawOutputs`)."""
    require('mmdet', 'exporting a detector config')
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.registry import init_default_scope
    from mmengine.runner import load_checkpoint

    from ..mm.runner import load_config
    from .detectors import DetectorRawOutputs

    cfg = load_config(config_path)
    if 'model' not in cfg:
        raise ValueError(f'config {config_path!r} has no `model`')
    register_all_modules(init_default_scope=False)
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    model = MODELS.build(cfg.model)
    if checkpoint is not None:
        if not osp.isfile(checkpoint):
            raise FileNotFoundError(f'checkpoint {checkpoint!r} does not exist')
        load_checkpoint(model, checkpoint, map_location='cpu', strict=True)
    model.eval()
    input_shape = (1, 3) + _config_test_size(cfg)
    raw = DetectorRawOutputs(model, input_shape)
    return ExportTarget(raw, config_path, 'detector', raw.output_names, input_shape)


def _config_test_size(cfg) -> Tuple[int, int]:
    """(H, W) of the config's test-pipeline ``Resize`` scale (mmdet writes ``(w, h)``), rounded
    up to the data preprocessor's ``pad_size_divisor``; (224, 224) when there is none."""
    height = width = 224
    pipeline = cfg.get('test_dataloader', {}).get('dataset', {}).get('pipeline', [])
    for step in pipeline:
        if step.get('type') == 'Resize' and 'scale' in step:
            scale = step['scale']
            width, height = scale if isinstance(scale, (list, tuple)) else (scale, scale)
    divisor = cfg.model.get('data_preprocessor', {}).get('pad_size_divisor', 1)
    return -(-height // divisor) * divisor, -(-width // divisor) * divisor


def load_export_target(model: str, checkpoint: Optional[str] = None,
                       features_only: bool = False) -> ExportTarget:
    """A timm model name or a config file path (``.py/.json/.yaml/.yml``) -> ExportTarget."""
    if not isinstance(model, str) or not model:
        raise ValueError(f'model must be a timm model name or a config path, got {model!r}')
    if model.endswith(CONFIG_SUFFIXES):
        if features_only:
            raise ValueError('features_only applies to timm model names; a config exports its '
                             'detector (backbone, neck and head)')
        return target_from_config(model, checkpoint)
    return target_from_timm(model, checkpoint, features_only)
