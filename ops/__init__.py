"""Functional kernels for sparse-attention backbones (fused Triton, with torch references)."""
from ops.depthwise_conv import depthwise_conv2d
from ops.gather_attention import BACKENDS, gather_attention, is_exporting, set_debug
from ops.layer_norm import layer_norm
from ops.mlp import column_sum, gelu_mlp
from ops.routing import region_routing
from ops.set_attention import set_attention

__version__ = '0.1.0'

__all__ = ['BACKENDS', 'column_sum', 'depthwise_conv2d', 'gather_attention', 'gelu_mlp',
           'is_exporting', 'layer_norm', 'region_routing', 'set_attention', 'set_debug']
