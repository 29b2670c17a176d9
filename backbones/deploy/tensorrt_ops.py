"""Which ONNX graphs TensorRT's ONNX parser can take: an operator allow-list and graph checks.

Source of the allow-list: onnx/onnx-tensorrt ``docs/operators.md`` at the ONNX-TensorRT 10.1 GA
release (commit 96e7811, 2024-06-17), the operators marked "Y" for TensorRT 10.x, which parses
opsets 9 to 20 of the default ``ai.onnx`` domain. Restrictions from that table that the checks
below enforce: TopK's ``K`` is a build-time constant below 3840 and ``sorted=1``; ``axes`` of
Slice/Squeeze/Unsqueeze/Reduce*/Pad are constants.
"""
from collections import Counter

import numpy as np

TENSORRT_DOCS_SOURCE = 'onnx/onnx-tensorrt docs/operators.md @ 96e7811 (ONNX-TensorRT 10.1 GA)'
TENSORRT_MIN_OPSET = 9
TENSORRT_MAX_OPSET = 20

TENSORRT_SUPPORTED_OPS = frozenset('''
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast
CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum
DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike
Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool
GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization GRU HardSigmoid HardSwish
Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu
Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean
MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax
ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RNN
RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign
Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh
ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
'''.split())

# Supported by the parser but a sign of data-dependent control flow or shapes, which a backbone
# export must not contain (they also defeat TensorRT's static shape planning).
DATA_DEPENDENT_OPS = frozenset({'If', 'Loop', 'Scan', 'NonZero'})

TOPK_MAX_K = 3840
# Operators whose ``axes`` (input index) must be a constant for TensorRT.
_CONSTANT_AXES_INPUT = {'Slice': 3, 'Squeeze': 1, 'Unsqueeze': 1, 'Pad': 3, 'ReduceL1': 1,
                        'ReduceL2': 1, 'ReduceLogSum': 1, 'ReduceLogSumExp': 1, 'ReduceMax': 1,
                        'ReduceMean': 1, 'ReduceMin': 1, 'ReduceProd': 1, 'ReduceSum': 1,
                        'ReduceSumSquare': 1}


def _iter_nodes(graph):
    """All nodes of ``graph`` including those of nested subgraphs (If/Loop bodies)."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.g.node:
                yield from _iter_nodes(attribute.g)
            for subgraph in attribute.graphs:
                yield from _iter_nodes(subgraph)


def onnx_op_types(model) -> Counter:
    """Count the op types of an ``onnx.ModelProto``, as ``'domain::Op'`` outside ``ai.onnx``."""
    return Counter(node.op_type if node.domain in ('', 'ai.onnx')
                   else f'{node.domain}::{node.op_type}' for node in _iter_nodes(model.graph))


def _constant_values(graph) -> dict:
    """Map tensor name -> numpy value for initializers and Constant node outputs."""
    from onnx import numpy_helper

    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == 'Constant' and node.domain in ('', 'ai.onnx'):
            for attribute in node.attribute:
                if attribute.name == 'value':
                    values[node.output[0]] = numpy_helper.to_array(attribute.t)
                elif attribute.name in ('value_int', 'value_ints'):
                    values[node.output[0]] = (attribute.i if attribute.name == 'value_int'
                                              else list(attribute.ints))
    return values


def find_tensorrt_issues(model, allow_data_dependent: bool = False) -> list:
    """Why TensorRT's ONNX parser would reject ``model`` (an ``onnx.ModelProto``); [] if none.

    Checks the default-domain opset range, that every op is in the allow-list (and, unless
    ``allow_data_dependent``, none of :data:`DATA_DEPENDENT_OPS`), that there are no custom
    domains or local functions (e.g. a Triton kernel or an unconverted torch op), and the
    constant-input restrictions listed in the module docstring.
    """
    issues = []
    opsets = {entry.domain or 'ai.onnx': entry.version for entry in model.opset_import}
    default_opset = opsets.get('ai.onnx')
    if default_opset is None or not TENSORRT_MIN_OPSET <= default_opset <= TENSORRT_MAX_OPSET:
        issues.append(f'default-domain opset {default_opset} is outside {TENSORRT_MIN_OPSET}-'
                      f'{TENSORRT_MAX_OPSET} ({TENSORRT_DOCS_SOURCE})')
    if model.functions:
        issues.append('graph has local functions (' + ', '.join(
            sorted({f'{f.domain}::{f.name}' for f in model.functions})) + '); inline them')

    allowed = TENSORRT_SUPPORTED_OPS - (frozenset() if allow_data_dependent else DATA_DEPENDENT_OPS)
    for op_type, count in sorted(onnx_op_types(model).items()):
        if '::' in op_type:
            issues.append(f'{count} node(s) {op_type} from a custom domain')
        elif op_type in DATA_DEPENDENT_OPS and not allow_data_dependent:
            issues.append(f'{count} node(s) {op_type}: data-dependent control flow or shape')
        elif op_type not in allowed:
            issues.append(f'{count} node(s) {op_type}: not supported by the TensorRT ONNX parser')

    constants = _constant_values(model.graph)
    for node in model.graph.node:
        if node.op_type == 'TopK':
            k = constants.get(node.input[1]) if len(node.input) > 1 else None
            k = None if k is None else int(np.asarray(k).reshape(-1)[0])
            sorted_flag = next((a.i for a in node.attribute if a.name == 'sorted'), 1)
            if k is None:
                issues.append(f'TopK {node.name!r}: K is computed at run time; it must be a '
                              f'constant')
            elif k >= TOPK_MAX_K:
                issues.append(f'TopK {node.name!r}: K={k} must be < {TOPK_MAX_K}')
            if sorted_flag != 1:
                issues.append(f'TopK {node.name!r}: sorted must be 1')
        axes_input = _CONSTANT_AXES_INPUT.get(node.op_type)
        if (axes_input is not None and len(node.input) > axes_input and node.input[axes_input]
                and node.input[axes_input] not in constants):
            issues.append(f'{node.op_type} {node.name!r}: axes must be a constant')
    return issues
