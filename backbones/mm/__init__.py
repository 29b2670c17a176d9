"""mmengine / mmdet integration: backbone registration and checkpoint safety."""
from . import classifier  # noqa: F401  (TimmClassifier, TimmImageFolder, TopKAccuracy)
