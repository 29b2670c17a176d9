"""Functional sparse-attention kernels (fused Triton, with torch references)."""
from ops.gather_attention import BACKENDS, gather_attention, is_exporting, set_debug
from ops.routing import region_routing
from ops.set_attention import set_attention

__version__ = '0.1.0'

__all__ = ['BACKENDS', 'gather_attention', 'is_exporting', 'region_routing', 'set_attention',
           'set_debug']
