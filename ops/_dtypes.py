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


def check_float_tensor(name: str, t, x: Tensor, shape, expected: str) -> None:
    """Raise a ValueError naming ``name`` unless t is a floating tensor of ``shape`` on x's
    device; ``expected`` completes "{name} must ..." for a wrong shape."""
    if not isinstance(t, Tensor) or tuple(t.shape) != tuple(shape):
        raise ValueError(f'{name} must {expected}, got {describe(t)}')
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f'{name} must be a floating tensor ({FLOAT_DTYPES}), got {t.dtype}')
    if t.device != x.device:
        raise ValueError(f'{name} must be on the device of x ({x.device}), got {t.device}')
