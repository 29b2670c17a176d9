"""BiFormer as an mmdet/mmengine backbone (the official detection wrapper, on our model).

Registered in ``mmengine.registry.MODELS``, so ``type='BiFormer'`` resolves under
``default_scope='mmdet'`` (mmdet's registry falls back to its parent) once
``custom_imports=dict(imports=['backbones'])`` has imported this package::

    backbone=dict(type='BiFormer', arch='small', n_win=16, drop_path_rate=0.2,
                  init_cfg=dict(type='Pretrained', checkpoint='biformer_small.pth'))
"""
import re
from typing import Dict, Optional, Sequence, Union

import torch
import torch.nn as nn
from mmengine.logging import MMLogger
from mmengine.model import BaseModule
from mmengine.registry import MODELS
from mmengine.runner.checkpoint import CheckpointLoader
from timm.layers import LayerNorm2d

from ..biformer import (ATTN_IMPLS, FULL_ATTENTION, PAD_MODES, BiFormerStem, build_stages,
                        check_input, init_weights, remap_official_keys, set_graph_blocks,
                        unwrap_state_dict)

__all__ = ['BiFormer']

_TOPKS = (1, 4, 16, FULL_ATTENTION)
ARCH_SETTINGS = {
    'tiny': dict(depths=(2, 2, 8, 2), embed_dims=(64, 128, 256, 512), topks=_TOPKS),
    'small': dict(depths=(4, 4, 18, 4), embed_dims=(64, 128, 256, 512), topks=_TOPKS),
    'base': dict(depths=(4, 4, 18, 4), embed_dims=(96, 192, 384, 768), topks=_TOPKS),
}
_ARCH_DEFAULTS = dict(head_dim=32, mlp_ratio=3)
_ARCH_KEYS = ('depths', 'embed_dims', 'topks')


def _resolve_arch(arch: Union[str, Dict]) -> Dict:
    if isinstance(arch, str):
        if arch not in ARCH_SETTINGS:
            raise ValueError(f'arch must be one of {tuple(ARCH_SETTINGS)} or a dict, got {arch!r}')
        return dict(_ARCH_DEFAULTS, **ARCH_SETTINGS[arch])
    if not isinstance(arch, dict):
        raise ValueError(f'arch must be a name or a dict, got {type(arch).__name__}')
    missing = [key for key in _ARCH_KEYS if key not in arch]
    unknown = sorted(set(arch) - set(_ARCH_KEYS) - set(_ARCH_DEFAULTS))
    if missing or unknown:
        raise ValueError(f'arch dict needs keys {_ARCH_KEYS} (optional: {tuple(_ARCH_DEFAULTS)}); '
                         f'missing {missing}, unknown {unknown}')
    settings = dict(_ARCH_DEFAULTS, **arch)
    for key in _ARCH_KEYS:
        if len(settings[key]) != 4:
            raise ValueError(f'arch[{key!r}] needs 4 entries (one per stage), got '
                             f'{tuple(settings[key])}')
    return settings


@MODELS.register_module()
class BiFormer(BaseModule):
    """BiFormer backbone: stage outputs at strides 4, 8, 16, 32, each through a LayerNorm.

    As the official detection wrapper (``BiFormer_mm``): no classification head or final
    BatchNorm; a channel LayerNorm (eps 1e-6) on every returned map; padding to the region grid
    for any input size.

    Args:
        arch: ``'tiny'``, ``'small'``, ``'base'`` or a dict with ``depths``, ``embed_dims``,
            ``topks`` (4 entries each; topk -2 = full attention) and optionally ``head_dim``
            (32) and ``mlp_ratio`` (3). A topk above ``n_win ** 2`` is clipped to all regions.
        n_win: regions per side in routing attention (official detection: 16, segmentation: 8).
        pad_mode: ``'official'`` (zero-pad before the projection, unmasked) or ``'masked'``.
        drop_path_rate: stochastic depth, increasing linearly over the blocks.
        out_indices: stages to return, ascending, in ``[0, 3]``.
        frozen_stages: -1 freezes nothing, 0 the stem, ``k >= 1`` the stem and stages
            ``0 .. k-1`` (with their output norms); frozen parts stay in eval mode.
        norm_eval: keep every BatchNorm in eval mode while training.
        with_cp: gradient checkpointing of the blocks.
        attn_impl: ``'fused'`` (ops.gather_attention) or ``'gather'`` (official formulation).
        fused_block: each block as one autograd node on CUDA (docs/biformer.md); ``False``
            keeps one node per op.
        graph_blocks: replay the fused blocks from CUDA graphs captured per input shape
            (``backbones.biformer.set_graph_blocks``); helps fixed-size eager training only.
        init_cfg: e.g. ``dict(type='Pretrained', checkpoint=path)`` (optional ``prefix``):
            official classification checkpoints and ours (classifier or detector) load.
    """

    def __init__(self, arch: Union[str, Dict] = 'tiny', n_win: int = 16,
                 pad_mode: str = 'official', drop_path_rate: float = 0.0,
                 out_indices: Sequence[int] = (0, 1, 2, 3), frozen_stages: int = -1,
                 norm_eval: bool = False, with_cp: bool = False, attn_impl: str = 'fused',
                 fused_block: bool = True, graph_blocks: bool = False,
                 init_cfg: Optional[Dict] = None):
        super().__init__(init_cfg=init_cfg)
        settings = _resolve_arch(arch)
        out_indices = tuple(out_indices)
        if not out_indices or list(out_indices) != sorted(set(out_indices)) or not all(
                0 <= i <= 3 for i in out_indices):
            raise ValueError(f'out_indices must be ascending unique stage indices in [0, 3], '
                             f'got {out_indices}')
        if not -1 <= frozen_stages <= 4:
            raise ValueError(f'frozen_stages must be in [-1, 4], got {frozen_stages}')
        if pad_mode not in PAD_MODES:
            raise ValueError(f'pad_mode must be one of {PAD_MODES}, got {pad_mode!r}')
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f'attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}')
        embed_dims = tuple(settings['embed_dims'])
        self.embed_dims = embed_dims
        self.out_indices = out_indices
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.stem = BiFormerStem(3, embed_dims[0], channels_last=attn_impl == 'fused')
        self.stages = build_stages(settings['depths'], embed_dims, settings['topks'],
                                   drop_path_rate=drop_path_rate, head_dim=settings['head_dim'],
                                   n_win=n_win, mlp_ratio=settings['mlp_ratio'],
                                   pad_mode=pad_mode, attn_impl=attn_impl,
                                   fused_block=fused_block)
        self.out_norms = nn.ModuleDict({str(i): LayerNorm2d(embed_dims[i]) for i in out_indices})
        self.apply(init_weights)
        if graph_blocks:
            set_graph_blocks(self)
        for stage in self.stages:
            stage.grad_checkpointing = with_cp
        self._freeze_stages()

    def _freeze_stages(self) -> None:
        frozen = [self.stem] if self.frozen_stages >= 0 else []
        for i in range(max(self.frozen_stages, 0)):
            frozen.append(self.stages[i])
            if str(i) in self.out_norms:
                frozen.append(self.out_norms[str(i)])
        for module in frozen:
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True) -> 'BiFormer':
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def init_weights(self) -> None:
        """Load ``init_cfg=dict(type='Pretrained', checkpoint=..., prefix=None)``; other
        init_cfgs go to mmengine (the modules are already initialised as the official code)."""
        if not (isinstance(self.init_cfg, dict) and self.init_cfg.get('type') == 'Pretrained'):
            super().init_weights()
            return
        logger = MMLogger.get_current_instance()
        checkpoint = CheckpointLoader.load_checkpoint(self.init_cfg['checkpoint'],
                                                      map_location='cpu', logger=logger)
        state_dict = self.convert_checkpoint(checkpoint, self.init_cfg.get('prefix'))
        if not set(state_dict) & set(self.state_dict()):
            raise ValueError(f'checkpoint {self.init_cfg["checkpoint"]!r} holds no BiFormer '
                             f'backbone weights (keys such as {list(state_dict)[:3]})')
        missing, unexpected = self.load_state_dict(state_dict, strict=False)
        logger.info(f'BiFormer: loaded {self.init_cfg["checkpoint"]}; missing keys {missing}, '
                    f'unexpected keys {unexpected}')
        self._is_init = True

    @staticmethod
    def convert_checkpoint(checkpoint: Dict, prefix: Optional[str] = None
                           ) -> Dict[str, torch.Tensor]:
        """Backbone state dict from an official classification checkpoint, one of our timm
        models, or a detector checkpoint (keys under ``prefix``, default ``'backbone.'`` when
        present); the classifier head and final BatchNorm are dropped."""
        state_dict = unwrap_state_dict(checkpoint)
        if prefix is None and any(key.startswith('backbone.') for key in state_dict):
            prefix = 'backbone.'
        if prefix:
            state_dict = {key[len(prefix):]: value for key, value in state_dict.items()
                          if key.startswith(prefix)}
        state_dict = remap_official_keys(state_dict)
        converted = {}
        for key, value in state_dict.items():
            if key.startswith(('head.', 'norm.')):
                continue
            converted[re.sub(r'^extra_norms\.', 'out_norms.', key)] = value
        return converted

    def forward(self, x: torch.Tensor) -> tuple:
        """(B, 3, H, W) -> tuple of (B, embed_dims[i], ceil(H / 2^(i+2)), ...) per out index."""
        check_input(x, 3)
        outs = []
        x = self.stem(x)
        for i, stage in enumerate(self.stages[:self.out_indices[-1] + 1]):
            x = stage(x)
            if i in self.out_indices:
                outs.append(self.out_norms[str(i)](x))
        return tuple(outs)
