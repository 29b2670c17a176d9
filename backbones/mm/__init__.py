"""mmengine / mmdet integration: backbone registration and checkpoint safety."""
from .._deps import require

require('mmengine', 'the mmengine/mmdet integration (backbones.mm)')

from . import classifier  # noqa: F401,E402 (TimmClassifier, TimmImageFolder, TopKAccuracy)
from . import checkpoint  # noqa: F401,E402  (weights-only loading of runner checkpoints)
from . import biformer  # noqa: F401,E402 (the 'BiFormer' mmdet backbone)
