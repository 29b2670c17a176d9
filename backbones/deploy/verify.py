"""Compare an exported graph with the PyTorch model it came from, on random inputs."""
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from .._deps import require
from .onnx_export import check_input_shape

__all__ = ['OutputDifference', 'output_differences', 'random_inputs', 'torch_reference_outputs',
           'compare_with_onnxruntime', 'second_input_shape']


@dataclass(frozen=True)
class OutputDifference:
    """How far one output of a runtime lies from PyTorch at one input shape.

    ``reference_scale`` is the largest magnitude of the PyTorch output and ``max_rel`` is
    ``max_abs / reference_scale`` (a per-tensor relative error that stays meaningful where the
    output is near zero).
    """
    input_shape: Tuple[int, ...]
    output: str
    shape: Tuple[int, ...]
    max_abs: float
    max_rel: float
    reference_scale: float

    def within(self, atol: float, rtol: float = 0.0) -> bool:
        """``max_abs <= atol + rtol * reference_scale``."""
        return self.max_abs <= atol + rtol * self.reference_scale

    def __str__(self) -> str:
        return (f'input {self.input_shape} output {self.output} {self.shape}: '
                f'max abs diff {self.max_abs:.3e}, max rel diff {self.max_rel:.3e}')


def second_input_shape(input_shape: Sequence[int], dynamic: str) -> Optional[Tuple[int, ...]]:
    """A second verification shape that exercises the dynamic axes: batch + 1 when the batch
    is dynamic, H and W doubled when they are (doubling keeps every stage's map divisible by
    whatever divided it, e.g. BiFormer's region grid); None for a static export."""
    batch, channels, height, width = check_input_shape(input_shape)
    if dynamic in ('batch', 'all'):
        batch += 1
    if dynamic in ('hw', 'all'):
        height, width = 2 * height, 2 * width
    shape = (batch, channels, height, width)
    return None if shape == tuple(input_shape) else shape


def random_inputs(shapes: Sequence[Sequence[int]], seed: int = 0) -> List[torch.Tensor]:
    """One standard-normal float32 batch per shape, reproducible from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(tuple(shape), generator=generator) for shape in shapes]


@torch.no_grad()
def torch_reference_outputs(module: nn.Module, inputs: Sequence[torch.Tensor]
                            ) -> List[Tuple[torch.Tensor, ...]]:
    """The eval-mode module's (flat tuple) outputs for each input, in float32 on the CPU."""
    module.eval()
    return [tuple(out.float().cpu() for out in module(x)) for x in inputs]


def output_differences(input_shape: Sequence[int], names: Sequence[str],
                       reference: Sequence[torch.Tensor], actual: Sequence
                       ) -> List[OutputDifference]:
    """Per-output :class:`OutputDifference` of ``actual`` (arrays/tensors) vs ``reference``."""
    if len(actual) != len(reference):
        raise ValueError(f'runtime returned {len(actual)} outputs, PyTorch {len(reference)}')
    differences = []
    for name, ref, out in zip(names, reference, actual):
        out = torch.as_tensor(np.asarray(out) if not isinstance(out, torch.Tensor) else out)
        out = out.float().cpu()
        if out.shape != ref.shape:
            raise ValueError(f'output {name}: runtime shape {tuple(out.shape)} != PyTorch shape '
                             f'{tuple(ref.shape)} at input {tuple(input_shape)}')
        max_abs = (out - ref).abs().max().item() if ref.numel() else 0.0
        scale = ref.abs().max().item() if ref.numel() else 0.0
        differences.append(OutputDifference(tuple(input_shape), name, tuple(ref.shape), max_abs,
                                            max_abs / scale if scale > 0 else max_abs, scale))
    return differences


def compare_with_onnxruntime(onnx_path: str, output_names: Sequence[str],
                             inputs: Sequence[torch.Tensor],
                             references: Sequence[Sequence[torch.Tensor]], *,
                             input_name: str = 'input') -> List[OutputDifference]:
    """Run the graph with onnxruntime (CPU) on ``inputs`` and compare with PyTorch.

    Args:
        onnx_path: the exported graph.
        output_names: names of the graph outputs, in module output order.
        inputs: (B, C, H, W) float32 batches, e.g. :func:`random_inputs` of the export shape
            and :func:`second_input_shape`.
        references: the PyTorch outputs for each input (:func:`torch_reference_outputs`).

    Returns:
        One :class:`OutputDifference` per input and output.
    """
    ort = require('onnxruntime', 'verifying an ONNX export with onnxruntime')
    session = ort.InferenceSession(onnx_path, providers=['CPUExecutionProvider'])
    differences = []
    for x, reference in zip(inputs, references):
        shape = tuple(x.shape)
        try:
            actual = session.run(list(output_names), {input_name: x.numpy()})
        except Exception as err:  # onnxruntime raises its own exception types
            raise RuntimeError(f'onnxruntime failed on input {shape} (is that size allowed by '
                               f'the dynamic axes / the model?): {err}') from err
        differences += output_differences(shape, output_names, reference, actual)
    return differences
