"""mmengine / mmdet integration: backbone registration and checkpoint safety."""
