"""mmengine / mmdet integration: backbone registration and checkpoint safety."""
from . import classifier  # noqa: F401  (TimmClassifier, TimmImageFolder, TopKAccuracy)
from . import checkpoint  # noqa: F401,E402  (weights-only loading of runner checkpoints)
