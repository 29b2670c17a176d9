"""Optional dependencies: import them by name, failing with the extra that provides them."""
import importlib

_EXTRA_OF = {
    'mmengine': 'mm', 'mmcv': 'mm', 'mmdet': 'mm', 'pycocotools': 'mm',
    'spconv': 'points',
    'torch_pruning': 'compress',
    'onnx': 'export', 'onnxruntime': 'export', 'onnxscript': 'export',
}


def require(module: str, feature: str):
    """Import ``module`` for ``feature``; raise an ImportError naming the extra that provides it.

    >>> mmdet = require('mmdet', 'the mmdet BiFormer backbone')
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        extra = _EXTRA_OF.get(module.split('.')[0])
        hint = (f"pip install 'dsa-backbones[{extra}]'" if extra
                else f'pip install {module.split(".")[0]}')
        raise ImportError(f'{feature} needs `{module}`, which is not importable ({err}). '
                          f'Install it with: {hint}') from err


def available(module: str) -> bool:
    """True when ``module`` can be imported (without importing it)."""
    return importlib.util.find_spec(module) is not None
