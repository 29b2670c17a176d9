"""Image classification under mmengine with timm models, timm augmentation and timm mixup.

Registered in mmengine's root registries (use ``default_scope = 'mmengine'``):

- ``TimmImageFolder`` (DATASETS): an ImageNet-style folder ``root/<class>/<image>`` read with
  timm's reader and transformed by ``timm.data.create_transform``; items are
  ``dict(inputs=(3, H, W) normalised float tensor, data_samples=int label)``.
- ``TimmMixupDataPreprocessor`` (MODELS): moves a batch to the device and, in training,
  applies ``timm.data.Mixup`` (mixup/cutmix + label smoothing) so labels become soft (B, C).
- ``TimmClassifier`` (MODELS): any ``timm.create_model`` classifier; soft-target
  cross-entropy for (B, C) targets, (label-smoothed) cross-entropy for (B,) labels.
- ``TopKAccuracy`` (METRICS): top-k accuracy in percent, keys ``accuracy/top{k}``.
"""
import os
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from mmengine.evaluator import BaseMetric
from mmengine.model import BaseDataPreprocessor, BaseModel
from mmengine.registry import DATASETS, METRICS, MODELS
from torch.utils.data import Dataset

import timm
from timm.data import ImageDataset, Mixup, create_transform


@DATASETS.register_module()
class TimmImageFolder(Dataset):
    """Images in ``data_root/<class name>/...`` (class index = sorted class-name order).

    Args:
        data_root: the split's folder, e.g. ``data/imagenet/train``.
        transform: keyword arguments of ``timm.data.create_transform`` (``is_training``,
            ``input_size``, ``auto_augment``, ``re_prob``, ``crop_pct``, ...).
    """

    def __init__(self, data_root: str, transform: Optional[dict] = None):
        if not os.path.isdir(data_root):
            raise FileNotFoundError(f'TimmImageFolder: data_root {data_root!r} is not a folder '
                                    '(expected data_root/<class name>/<image files>)')
        self.data_root = data_root
        self.dataset = ImageDataset(data_root, transform=create_transform(**(transform or {})))

    @property
    def metainfo(self) -> dict:
        return dict(classes=tuple(self.dataset.reader.class_to_idx))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        image, label = self.dataset[index]
        return dict(inputs=image, data_samples=label)


@MODELS.register_module()
class TimmMixupDataPreprocessor(BaseDataPreprocessor):
    """Device transfer plus, when training, timm mixup/cutmix on the batch.

    Args:
        mixup: keyword arguments of ``timm.data.Mixup`` (``mixup_alpha``, ``cutmix_alpha``,
            ``prob``, ``switch_prob``, ``mode``, ``label_smoothing``, ``num_classes``), or None
            to keep integer labels. Mixup in 'batch' mode needs an even batch size.
    """

    def __init__(self, mixup: Optional[dict] = None, non_blocking: bool = False):
        super().__init__(non_blocking=non_blocking)
        self.mixup = Mixup(**mixup) if mixup else None

    def forward(self, data: dict, training: bool = False) -> dict:
        data = self.cast_data(data)
        inputs, labels = data['inputs'], data['data_samples']
        if training and self.mixup is not None:
            if inputs.shape[0] % 2:
                raise ValueError('mixup needs an even batch size per device, got '
                                 f'{inputs.shape[0]} images (set drop_last=True in the '
                                 'train_dataloader and an even batch_size)')
            inputs, labels = self.mixup(inputs, labels)
        return dict(inputs=inputs, data_samples=labels)


@MODELS.register_module()
class TimmClassifier(BaseModel):
    """A timm classifier as an mmengine model.

    Args:
        model_name: a timm model name, e.g. ``'biformer_tiny'``.
        label_smoothing: smoothing of the cross-entropy on integer labels (soft labels from
            mixup carry their own smoothing).
        data_preprocessor: config of the data preprocessor, e.g. ``TimmMixupDataPreprocessor``.
        **model_kwargs: passed to ``timm.create_model`` (``num_classes``, ``drop_path_rate``...).
    """

    def __init__(self, model_name: str, label_smoothing: float = 0.0,
                 data_preprocessor: Optional[Union[dict, BaseDataPreprocessor]] = None,
                 init_cfg: Optional[dict] = None, **model_kwargs):
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f'label_smoothing must be in [0, 1), got {label_smoothing}')
        if data_preprocessor is None:
            data_preprocessor = dict(type='TimmMixupDataPreprocessor')
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        self.label_smoothing = label_smoothing
        self.model = timm.create_model(model_name, **model_kwargs)

    def forward(self, inputs: torch.Tensor, data_samples: Optional[torch.Tensor] = None,
                mode: str = 'tensor'):
        """``inputs`` (B, 3, H, W); ``data_samples`` labels, (B,) int or (B, C) soft.

        mode 'tensor' -> logits (B, C); 'loss' -> ``dict(loss=...)``; 'predict' -> a list of
        ``dict(scores=(C,) softmax, gt_label=int or None)``.
        """
        logits = self.model(inputs)
        if mode == 'tensor':
            return logits
        if mode == 'loss':
            if data_samples is None:
                raise ValueError("mode='loss' needs data_samples (labels)")
            if data_samples.ndim == 2:
                loss = torch.sum(-data_samples * F.log_softmax(logits, dim=-1), dim=-1).mean()
            else:
                loss = F.cross_entropy(logits, data_samples.long(),
                                       label_smoothing=self.label_smoothing)
            return dict(loss=loss)
        if mode == 'predict':
            scores = logits.float().softmax(dim=-1)
            labels = [None] * len(scores) if data_samples is None else data_samples.tolist()
            return [dict(scores=s, gt_label=label) for s, label in zip(scores, labels)]
        raise ValueError(f"mode must be 'tensor', 'loss' or 'predict', got {mode!r}")


@METRICS.register_module()
class TopKAccuracy(BaseMetric):
    """Top-k accuracy (percent) of ``TimmClassifier`` predictions: ``accuracy/top{k}``."""

    default_prefix = 'accuracy'

    def __init__(self, topk: Sequence[int] = (1, 5), collect_device: str = 'cpu',
                 prefix: Optional[str] = None):
        super().__init__(collect_device=collect_device, prefix=prefix)
        if not topk or any(not isinstance(k, int) or k < 1 for k in topk):
            raise ValueError(f'topk must be positive ints, got {topk!r}')
        self.topk = tuple(topk)

    def process(self, data_batch, data_samples: Sequence[dict]) -> None:
        for sample in data_samples:
            if sample['gt_label'] is None:
                raise ValueError('TopKAccuracy needs ground-truth labels in the predictions')
            order = sample['scores'].topk(min(max(self.topk), sample['scores'].numel())).indices
            self.results.append({k: bool((order[:k] == sample['gt_label']).any())
                                 for k in self.topk})

    def compute_metrics(self, results: List[dict]) -> Dict[str, float]:
        if not results:
            return {f'top{k}': float('nan') for k in self.topk}
        return {f'top{k}': 100.0 * sum(r[k] for r in results) / len(results)
                for k in self.topk}
