"""TensorRT engines from exported ONNX graphs, with the ``tensorrt`` Python API (8.6 to 11.x;
``fp16`` needs <= 10.x, whose ``BuilderFlag.FP16`` TensorRT 11 removed).

Build: ONNX parser -> network (explicit batch), one optimisation profile covering the given
min/opt/max input shapes, optional FP16 kernels; run: device buffers from torch CUDA tensors,
``execute_async_v3`` on a torch stream. Not verified on hardware in this repository's CI (no
GPU with TensorRT there); see docs/export.md.
"""
import time
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch

from .._deps import require
from .onnx_export import check_input_shape

__all__ = ['ShapeProfile', 'import_tensorrt', 'build_engine', 'TensorRTRunner']

INSTALL_HINT = ('TensorRT needs an NVIDIA GPU and driver. Install the wheel matching your CUDA '
                'major version: pip install tensorrt-cu12 (CUDA 12) or pip install tensorrt-cu13 '
                '(CUDA 13); see docs/export.md')


def import_tensorrt():
    """Import ``tensorrt``, or raise an ImportError that says how to install it."""
    try:
        return require('tensorrt', 'building a TensorRT engine (--format tensorrt)')
    except ImportError as err:
        raise ImportError(f'{err}. {INSTALL_HINT}') from err


@dataclass(frozen=True)
class ShapeProfile:
    """The (B, C, H, W) range one optimisation profile covers; ``opt`` is tuned for."""
    min: Tuple[int, ...]
    opt: Tuple[int, ...]
    max: Tuple[int, ...]

    def __post_init__(self):
        for name in ('min', 'opt', 'max'):
            check_input_shape(getattr(self, name), f'profile {name} shape')
        if not all(lo <= mid <= hi for lo, mid, hi in zip(self.min, self.opt, self.max)):
            raise ValueError(f'profile shapes must satisfy min <= opt <= max per axis, got '
                             f'min {self.min}, opt {self.opt}, max {self.max}')


def _require_cuda() -> None:
    if not torch.cuda.is_available():
        raise RuntimeError('building and running a TensorRT engine needs a CUDA GPU; '
                           'torch.cuda.is_available() is False')


def build_engine(onnx_path: str, engine_path: str, profile: ShapeProfile, *,
                 input_name: str = 'input', fp16: bool = False,
                 workspace_gib: float = 4.0) -> bytes:
    """Parse ``onnx_path``, build a serialized engine, write it to ``engine_path`` and return it.

    Args:
        profile: shapes of ``input_name`` the engine accepts (static axes: min == opt == max).
        fp16: allow FP16 kernels (``BuilderFlag.FP16``, TensorRT <= 10.x); inputs and outputs
            stay float32.
        workspace_gib: builder workspace memory pool limit.
    """
    trt = import_tensorrt()
    _require_cuda()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    if int(trt.__version__.split('.')[0]) >= 10:  # explicit batch is the only mode
        network = builder.create_network(0)
    else:
        network = builder.create_network(
            1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):
        errors = '\n'.join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f'TensorRT could not parse {onnx_path}:\n{errors}')
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if fp16:
        if not hasattr(trt.BuilderFlag, 'FP16'):
            raise RuntimeError(
                f'TensorRT {trt.__version__} has no BuilderFlag.FP16 (TensorRT 11 removed weak '
                f'typing): convert the ONNX graph to mixed precision first (NVIDIA ModelOpt '
                f"AutoCast, low_precision_type='fp16', keep_io_types=True) and build it without "
                f'fp16, or use TensorRT 10.x')
        config.set_flag(trt.BuilderFlag.FP16)
    optimization_profile = builder.create_optimization_profile()
    optimization_profile.set_shape(input_name, profile.min, profile.opt, profile.max)
    config.add_optimization_profile(optimization_profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f'TensorRT failed to build an engine from {onnx_path} (see the '
                           f'TensorRT log above)')
    engine_bytes = bytes(serialized)
    with open(engine_path, 'wb') as f:
        f.write(engine_bytes)
    return engine_bytes


class TensorRTRunner:
    """Runs a serialized engine on torch CUDA tensors.

    ``runner(x)`` takes a (B, C, H, W) tensor within the engine's profile and returns the
    outputs (CUDA tensors) in ``output_names`` order; :meth:`latency_ms` times it.
    """

    def __init__(self, engine_bytes: bytes, output_names: Sequence[str],
                 input_name: str = 'input'):
        trt = import_tensorrt()
        _require_cuda()
        self._trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise RuntimeError('TensorRT could not deserialize the engine')
        self.context = self.engine.create_execution_context()
        self.input_name = input_name
        self.output_names = tuple(output_names)
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        missing = {input_name, *self.output_names} - names
        if missing:
            raise ValueError(f'engine has no tensors named {sorted(missing)} (it has '
                             f'{sorted(names)})')

    def _torch_dtype(self, name: str) -> torch.dtype:
        import numpy as np

        numpy_dtype = self._trt.nptype(self.engine.get_tensor_dtype(name))
        return torch.from_numpy(np.empty(0, dtype=numpy_dtype)).dtype

    def __call__(self, x: torch.Tensor) -> List[torch.Tensor]:
        stream = torch.cuda.current_stream()
        x = x.to('cuda', self._torch_dtype(self.input_name)).contiguous()
        if not self.context.set_input_shape(self.input_name, tuple(x.shape)):
            raise ValueError(f'input shape {tuple(x.shape)} is outside the engine profile')
        self.context.set_tensor_address(self.input_name, x.data_ptr())
        outputs: Dict[str, torch.Tensor] = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=self._torch_dtype(name), device='cuda')
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError('TensorRT execution failed (see the TensorRT log above)')
        stream.synchronize()
        return [outputs[name] for name in self.output_names]

    def latency_ms(self, x: torch.Tensor, warmup: int = 10, iterations: int = 50) -> float:
        """Median wall-clock latency of one call (host-to-device copy of ``x`` excluded)."""
        x = x.cuda()
        for _ in range(warmup):
            self(x)
        timings = []
        for _ in range(iterations):
            start = time.perf_counter()
            self(x)
            timings.append((time.perf_counter() - start) * 1e3)
        return sorted(timings)[len(timings) // 2]
