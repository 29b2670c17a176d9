"""Dtype rules and argument descriptions shared by the ops' front ends."""
import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def autocast_dtype(x: Tensor) -> torch.dtype:
    """The dtype an op on x computes in, as ``nn.Linear`` / ``nn.Conv2d`` under autocast: the
    autocast dtype when autocast is on for x's device type (fp64 is never cast), else x's."""
    device_type = x.device.type
    if x.dtype != torch.float64 and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def describe(t) -> str:
    """A tensor's shape, or another value's type name, for error messages."""
    return str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__
