"""dsa-backbones: vision backbones on dynamic sparse attention.

Importing this package registers its models with timm; when mmengine is installed it also
registers the mmdet/mmengine backbones (``custom_imports=dict(imports=['backbones'])``).
"""
from ._deps import available, require
from .biformer import BiFormer  # registers biformer_tiny/small/base with timm

__all__ = ['BiFormer', 'available', 'require']

if available('mmengine'):
    from . import mm  # noqa: F401,E402  (registers mmengine/mmdet integrations)
