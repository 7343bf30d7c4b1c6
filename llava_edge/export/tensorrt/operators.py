"""The ONNX operators TensorRT's parser accepts, and a check that a graph uses nothing else.

:data:`SUPPORTED_OPS` lists the operators marked supported in onnx-tensorrt's ``docs/operators.md``
for TensorRT 10.15, whose header gives the opsets it parses (:data:`OPSET_RANGE`; the 10.0 file
says 9 to 20, and blocked INT4 DequantizeLinear needs 21, so the int4 parts need a TensorRT that
parses opset 21). It is a table of names only: when a newer TensorRT adds an operator, add it here.
:func:`check_model` also applies the restrictions TensorRT documents for quantized weights:

* every node in the default ONNX domain (no ``com.microsoft`` contrib operators such as
  ``MatMulNBits``, ``GroupQueryAttention`` or ``DynamicQuantizeMatMul``);
* ``DequantizeLinear`` of constant weights, INT8 / FP8 / INT4, zero point absent or zero
  ("TensorRT only supports symmetric quantization"), scales strictly positive;
* block quantization only for 2-D INT4 weights, blocks of 64 or 128 ("The supported block sizes
  are {64, 128}", TensorRT's quantized-types documentation).
"""

from __future__ import annotations

from llava_edge.errors import ModelError

#: onnx-tensorrt docs/operators.md for TensorRT 10.15: the operators marked "Y".
DOCUMENTED_FOR = "TensorRT 10.15 (onnx-tensorrt docs/operators.md)"
OPSET_RANGE = (9, 24)
INT4_BLOCK_SIZES = (64, 128)
SUPPORTED_OPS = frozenset({
    "Abs", "Acos", "Acosh", "Add", "And", "ArgMax", "ArgMin", "Asin", "Asinh", "Atan", "Atanh", "Attention",
    "AveragePool", "BatchNormalization", "BlackmanWindow", "Cast", "CastLike", "Ceil", "Celu", "Clip",
    "Concat", "Constant", "ConstantOfShape", "Conv", "ConvTranspose", "Cos", "Cosh", "CumSum", "DeformConv",
    "DepthToSpace", "DequantizeLinear", "Div", "Dropout", "Einsum", "Elu", "Equal", "Erf", "Exp", "Expand",
    "EyeLike", "Flatten", "Floor", "GRU", "Gather", "GatherElements", "GatherND", "Gelu", "Gemm",
    "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "Greater", "GreaterOrEqual", "GridSample",
    "GroupNormalization", "HammingWindow", "HannWindow", "HardSigmoid", "HardSwish", "Hardmax", "Identity",
    "If", "ImageScaler", "InstanceNormalization", "IsInf", "IsNaN", "LRN", "LSTM", "LayerNormalization",
    "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax", "Loop", "LpNormalization", "LpPool", "MatMul",
    "Max", "MaxPool", "Mean", "MeanVarianceNormalization", "Min", "Mish", "Mod", "Mul", "Neg",
    "NonMaxSuppression", "NonZero", "Not", "OneHot", "Or", "PRelu", "Pad", "ParametricSoftplus", "Pow",
    "QuantizeLinear", "RMSNormalization", "RNN", "RandomNormal", "RandomNormalLike", "RandomUniform",
    "RandomUniformLike", "Range", "Reciprocal", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp",
    "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare", "Relu", "Reshape",
    "Resize", "ReverseSequence", "RoiAlign", "RotaryEmbedding", "Round", "STFT", "ScaledTanh", "Scan",
    "Scatter", "ScatterElements", "ScatterND", "Selu", "Shape", "Shrink", "Sigmoid", "Sign", "Sin", "Sinh",
    "Size", "Slice", "Softmax", "Softplus", "Softsign", "SpaceToDepth", "Split", "Sqrt", "Squeeze", "Sub",
    "Sum", "Tan", "Tanh", "TensorScatter", "ThresholdedRelu", "Tile", "TopK", "Transpose", "Trilu",
    "Unsqueeze", "Upsample", "Where", "Xor",
})
DEFAULT_DOMAINS = ("", "ai.onnx")
_DQ_TYPES = {"INT8", "INT4", "FLOAT8E4M3FN"}


def problems(model) -> list[str]:
    """What in ``model`` (an ``onnx.ModelProto``) TensorRT's parser would reject; empty if nothing."""
    import onnx

    found: list[str] = []
    for opset in model.opset_import:
        if opset.domain in DEFAULT_DOMAINS and not OPSET_RANGE[0] <= opset.version <= OPSET_RANGE[1]:
            found.append(f"opset {opset.version} is outside {OPSET_RANGE[0]}..{OPSET_RANGE[1]}")
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        where = f"node {node.name or '?'} ({node.domain + '::' if node.domain else ''}{node.op_type})"
        if node.domain not in DEFAULT_DOMAINS:
            found.append(f"{where}: operator of domain {node.domain!r}, not standard ONNX")
        elif node.op_type not in SUPPORTED_OPS:
            found.append(f"{where}: not in TensorRT's supported operators")
        elif node.op_type == "DequantizeLinear":
            found += [f"{where}: {p}" for p in _dq_problems(node, inits, onnx)]
    return found


def _dq_problems(node, inits, onnx) -> list[str]:
    out = []
    weight = inits.get(node.input[0])
    if weight is None:
        return ["input is not a constant weight (weight-only quantization expected)"]
    kind = onnx.TensorProto.DataType.Name(weight.data_type)
    if kind not in _DQ_TYPES:
        out.append(f"weight type {kind}; TensorRT dequantizes {', '.join(sorted(_DQ_TYPES))}")
    if len(node.input) > 2 and node.input[2]:
        zero = inits.get(node.input[2])
        if zero is None or any(onnx.numpy_helper.to_array(zero).reshape(-1)):
            out.append("a non-zero zero point (TensorRT requires it to be zero)")
    scale = inits.get(node.input[1])
    if scale is None or not (onnx.numpy_helper.to_array(scale) > 0).all():
        out.append("scales must be constant and strictly positive")
    block = next((a.i for a in node.attribute if a.name == "block_size"), 0)
    if block and (kind != "INT4" or len(weight.dims) != 2):
        out.append(f"block quantization of a {len(weight.dims)}-D {kind} tensor (TensorRT: 2-D INT4 weights only)")
    elif block and block not in INT4_BLOCK_SIZES:
        out.append(f"INT4 block size {block}; TensorRT supports {' and '.join(map(str, INT4_BLOCK_SIZES))}")
    return out


def check_model(model, where: str) -> None:
    """Raise :class:`ModelError` listing what TensorRT would reject (at most 10 lines)."""
    found = problems(model)
    if found:
        more = f"\n  ... and {len(found) - 10} more" if len(found) > 10 else ""
        raise ModelError(f"{where}: this graph would not parse in {DOCUMENTED_FOR}:\n  "
                         + "\n  ".join(found[:10]) + more)
