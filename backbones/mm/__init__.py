"""mmengine / mmdet integration: backbone registration and checkpoint safety."""
from . import classifier  # noqa: F401  (TimmClassifier, TimmImageFolder, TopKAccuracy)
from . import checkpoint  # noqa: F401,E402  (weights-only loading of runner checkpoints)
from . import biformer  # noqa: F401  (the 'BiFormer' mmdet backbone)
