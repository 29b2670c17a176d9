"""Built-in datasets that need no download (pure numpy/PIL, no OpenMMLab dependency)."""
from .shapes import CLASSES, METAINFO, annotation_path, make_shapes_coco, render_image

__all__ = ['CLASSES', 'METAINFO', 'annotation_path', 'make_shapes_coco', 'render_image']
