"""ONNX quantization: fp16, int8 (dynamic) and int4 weight-only (MatMulNBits), per model part.

All three go through onnxruntime's own tools, so what we write is what onnxruntime runs:

* ``fp16``: ``onnxruntime.transformers.float16`` with ``keep_io_types=True`` (inputs, outputs and
  the KV cache stay float32; onnxconverter-common's output failed to load here, see DESIGN.md).
* ``int8``: ``quantize_dynamic`` (int8 weights, activations quantized at run time).
* ``int4``: ``MatMulNBitsQuantizer`` — block-wise 4-bit weights of every MatMul with a constant
  weight; algorithm ``default``, ``rtn``, ``hqq``, ``gptq`` (needs calibration data) or ``kquant``.

Which part gets which precision is :func:`part_precisions`: by default ``int4`` and ``int8`` quantize
the decoder only, and keep the vision tower, projector and embeddings in fp16 — quantizing the vision
side hurts accuracy most and saves least.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from llava_edge.errors import UserError

PRECISIONS = ("fp32", "fp16", "int8", "int4")
PARTS = ("vision", "projector", "embeddings", "decoder")

#: Default precision of each part, by the precision asked for. One table; overridable per part.
DEFAULT_PART_PRECISION: dict[str, dict[str, str]] = {
    "fp32": dict.fromkeys(PARTS, "fp32"),
    "fp16": dict.fromkeys(PARTS, "fp16"),
    "int8": {"vision": "fp16", "projector": "fp16", "embeddings": "fp16", "decoder": "int8"},
    "int4": {"vision": "fp16", "projector": "fp16", "embeddings": "fp16", "decoder": "int4"},
}

#: Our algorithm names -> the name onnxruntime's quantizer uses.
INT4_ALGORITHMS = {"default": "DEFAULT", "rtn": "RTN", "hqq": "HQQ", "gptq": "GPTQ", "kquant": "k_quant"}


@dataclass(frozen=True)
class Int4Options:
    """MatMulNBits settings. ``accuracy_level``: compute type of the int4 matmuls on CPU (None:
    onnxruntime's default, fp32; 4: int8 activations, the fastest on CPU, ORT GenAI's CPU choice)."""

    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int | None = None
    algorithm: str = "default"

    def __post_init__(self) -> None:
        if self.algorithm not in INT4_ALGORITHMS:
            raise UserError(f"unknown int4 algorithm {self.algorithm!r}; choose one of: "
                            f"{', '.join(INT4_ALGORITHMS)}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise UserError(f"int4 block size must be a power of two >= 16, got {self.block_size}")
        if self.accuracy_level not in (None, 0, 1, 2, 3, 4):
            raise UserError(f"accuracy level must be 0-4 (or unset), got {self.accuracy_level}")

    def to_dict(self) -> dict:
        return asdict(self)


def part_precisions(precision: str, overrides: dict[str, str] | None = None) -> dict[str, str]:
    """The precision of every part for ``precision``, with per-part ``overrides`` applied."""
    if precision not in DEFAULT_PART_PRECISION:
        raise UserError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    table = dict(DEFAULT_PART_PRECISION[precision])
    for part, value in (overrides or {}).items():
        if part not in table:
            raise UserError(f"unknown part {part!r} in a precision override; parts: {', '.join(PARTS)}")
        if value not in PRECISIONS:
            raise UserError(f"unknown precision {value!r} for {part}; choose one of: {', '.join(PRECISIONS)}")
        table[part] = value
    return table


def convert_fp16(model):
    """fp32 ``ModelProto`` -> fp16 weights and compute, float32 inputs and outputs."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=True)


def quantize_int8(src: str | Path):
    """Dynamic int8 quantization of the fp32 file ``src`` (external data beside it)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from llava_edge.export.onnx.files import load_proto

    with tempfile.TemporaryDirectory(prefix="llava-edge-int8-") as tmp:
        out = Path(tmp) / "model.onnx"
        quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8, per_channel=False,
                         use_external_data_format=True)
        return load_proto(out)


#: ``--int4``'s decoder settings, traced or streamed (tensor by tensor, how 7B models export). On
#: the trained demo model (benchmarks/onnx_int4_variants.md): KL to fp32 5.6e-4, top-1 95.1%, and
#: 798 decoded tokens/s on 2 cores. HQQ (asymmetric, block 32) drifts less (3.6e-4, 96.3%) but its
#: zero points put MatMulNBits on a slow path: 170 tokens/s, prefill 2x slower; RTN symmetric
#: block 32: 2.3e-3, 669 tokens/s.
DEFAULT_INT4 = Int4Options(block_size=16)


def quantize_int4(model, options: Int4Options = Int4Options(), calibration=None):
    """Block-wise int4 weights (MatMulNBits) of every MatMul with a constant weight.

    ``calibration``: an ``onnxruntime.quantization.CalibrationDataReader`` over the model's inputs;
    required by ``gptq`` (see :mod:`llava_edge.quant.calibration` for multimodal data)."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mnb

    algorithm = INT4_ALGORITHMS[options.algorithm]
    if algorithm == "GPTQ":
        if calibration is None:
            raise UserError("int4 algorithm 'gptq' needs calibration data (images and prompts)")
        config = mnb.GPTQWeightOnlyQuantConfig(calibration_data_reader=calibration,
                                               block_size=options.block_size)
    elif algorithm == "RTN":
        config = mnb.RTNWeightOnlyQuantConfig()
    elif algorithm == "k_quant":
        config = mnb.KQuantWeightOnlyQuantConfig()
    elif algorithm == "HQQ":
        config = mnb.HQQWeightOnlyQuantConfig(block_size=options.block_size, bits=4)
    else:
        config = mnb.DefaultWeightOnlyQuantConfig(block_size=options.block_size,
                                                  is_symmetric=options.symmetric,
                                                  accuracy_level=options.accuracy_level, bits=4)
    quantizer = mnb.MatMulNBitsQuantizer(
        model, bits=4, block_size=options.block_size, is_symmetric=options.symmetric,
        accuracy_level=options.accuracy_level, algo_config=config,
    )
    quantizer.process()
    result = quantizer.model
    return getattr(result, "model", result)  # ONNXModel wrapper -> ModelProto


def convert_file(src: str | Path, dst: str | Path, precision: str, *,
                 int4: Int4Options | None = None, calibration=None) -> list[Path]:
    """Write ``src`` (an fp32 ONNX file) at ``precision`` to ``dst`` (+ external data); returns the
    files written, graph first."""
    from llava_edge.export.onnx.files import load_proto, save_model

    if precision == "fp16":
        model = convert_fp16(load_proto(src))
    elif precision == "int8":
        model = quantize_int8(src)
    elif precision == "int4":
        model = quantize_int4(load_proto(src), int4 or Int4Options(), calibration)
    else:
        raise UserError(f"cannot convert to {precision!r}; choose one of: fp16, int8, int4")
    return save_model(model, dst)
