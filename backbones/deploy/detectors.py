"""mmdet single-stage detectors for export: backbone, neck and head raw outputs in the graph;
prior generation, box decoding and NMS in PyTorch afterwards (``bbox_head.predict_by_feat``).

The graph input is the batch the detector's ``data_preprocessor`` produces (normalised, BGR->RGB
as configured, padded to ``pad_size_divisor``); preprocessing stays outside the graph too.
"""
import inspect
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = ['DetectorRawOutputs', 'predict_from_raw_outputs']


class DetectorRawOutputs(nn.Module):
    """``bbox_head(neck(backbone(x)))`` of a single-stage detector as a flat tuple of tensors.

    The head returns groups of per-level maps (RetinaNet: ``cls_scores``, ``bbox_preds``); the
    flat order is group-major, level-minor, and output ``{group}_{level}`` is named after the
    matching argument of ``bbox_head.predict_by_feat``.

    Args:
        detector: an mmdet ``SingleStageDetector`` (RetinaNet, FCOS, ATSS, ...), in eval mode.
        example_shape: (B, C, H, W) of one forward run to learn the output layout.
    """

    def __init__(self, detector: nn.Module, example_shape: Sequence[int]):
        super().__init__()
        if hasattr(detector, 'roi_head') or not hasattr(detector, 'bbox_head'):
            raise ValueError(f'only single-stage detectors (a bbox_head, no roi_head) export '
                             f'their raw outputs; got {type(detector).__name__}')
        self.detector = detector
        with torch.no_grad():
            groups = self.detector._forward(torch.zeros(tuple(example_shape)))
        group_names = [name for name in inspect.signature(detector.bbox_head.predict_by_feat)
                       .parameters if name not in ('self', 'batch_img_metas', 'cfg', 'rescale',
                                                   'with_nms')]
        if len(group_names) < len(groups):
            group_names += [f'output{i}' for i in range(len(group_names), len(groups))]
        self.group_sizes = tuple(len(group) for group in groups)
        self.group_names = tuple(group_names[:len(groups)])
        self.output_names = tuple(f'{name}_{level}' for name, size in
                                  zip(self.group_names, self.group_sizes) for level in range(size))

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """x: (B, C, H, W) preprocessed batch -> per-level head maps, group-major."""
        return tuple(level for group in self.detector._forward(x) for level in group)

    def regroup(self, outputs: Sequence[torch.Tensor]) -> Dict[str, List[torch.Tensor]]:
        """Flat outputs (in ``output_names`` order) -> ``{group name: [per-level tensors]}``."""
        if len(outputs) != len(self.output_names):
            raise ValueError(f'expected {len(self.output_names)} outputs {self.output_names}, '
                             f'got {len(outputs)}')
        grouped, start = {}, 0
        for name, size in zip(self.group_names, self.group_sizes):
            grouped[name] = list(outputs[start:start + size])
            start += size
        return grouped


def predict_from_raw_outputs(raw: DetectorRawOutputs, outputs: Sequence[torch.Tensor],
                             batch_img_metas: List[dict], rescale: bool = True) -> list:
    """Decode boxes and run NMS on exported raw outputs, as ``detector.predict`` does.

    Args:
        raw: the wrapper the graph was exported from (its detector supplies the head config).
        outputs: the graph outputs (torch tensors, any device) in ``raw.output_names`` order.
        batch_img_metas: per image ``dict(img_shape=(h, w), scale_factor=(sx, sy), ...)``, as in
            ``data_samples[i].metainfo``.
        rescale: map boxes back to the original image size via ``scale_factor``.

    Returns:
        One ``InstanceData`` (``bboxes``, ``scores``, ``labels``) per image.
    """
    grouped = raw.regroup([torch.as_tensor(output) for output in outputs])
    return raw.detector.bbox_head.predict_by_feat(**grouped, batch_img_metas=batch_img_metas,
                                                  rescale=rescale)
