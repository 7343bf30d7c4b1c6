"""ONNX parts for TensorRT: standard ONNX operators only, quantized weights as ``DequantizeLinear``.

The onnxruntime bundle's int4 and int8 decoders use onnxruntime contrib operators (``MatMulNBits``,
``DynamicQuantizeMatMul``) that TensorRT's ONNX parser does not know. The TensorRT flavour of each
precision is written with operators of the default ONNX domain only:

* ``fp16``: onnxruntime's float16 converter (``keep_io_types``: inputs, outputs and the KV cache stay
  float32, as in the onnxruntime bundle, so every runtime speaks the same contract).
* ``int4``: weight-only, block-wise: each MatMul weight ``W [K, N]`` becomes an INT4 initializer
  and ``DequantizeLinear(W_q, scale, axis=0, block_size=B)`` (opset 21) feeding the MatMul,
  symmetric (no zero point), blocks of 64 (TensorRT supports 64 and 128), then fp16 as above (the
  scales become fp16, the activations' type, as TensorRT's strongly typed mode wants).
* ``int8``: weight-only, per output channel: ``DequantizeLinear(W_q int8, scale [N], axis=1)``
  feeding the MatMul, symmetric, then fp16.

Both are :func:`quantize_weights`, ours: onnxruntime's QDQ int4 writer picks negative scales
(it maps each block's signed extreme to -8), which TensorRT rejects, and it writes no 8-bit
weight-only QDQ.

Each file is checked against :mod:`.operators` (the operator set TensorRT's parser documents)
before it is kept. onnxruntime on CPU runs these exact files, which is how parity and drift are
verified on machines without TensorRT.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llava_edge.errors import UserError

PRECISIONS = ("fp16", "int8", "int4")  # what an fp32 file converts to
#: INT4 block size along K: the smaller of the two TensorRT supports (64, 128; :mod:`.operators`),
#: the more accurate (NVIDIA's Model Optimizer uses 128).
DEFAULT_INT4_BLOCK = 64


def quantize_weights(model, bits: int, block_size: int = DEFAULT_INT4_BLOCK):
    """fp32 ``ModelProto`` -> every MatMul whose second input is a 2-D float initializer ``W [K, N]``
    reads it through ``DequantizeLinear``: symmetric, scales strictly positive (``max|w| / 7`` or
    ``/ 127``; TensorRT rejects others). ``bits=4``: INT4, one scale per block of ``block_size``
    rows of each column (``axis=0, block_size``: opset 21); ``bits=8``: INT8, one scale per column
    (``axis=1``). Every weight's K must be a multiple of the block (LLaMA and CLIP widths are
    multiples of 64)."""
    import ml_dtypes
    import onnx
    from onnx import helper, numpy_helper

    if bits not in (4, 8):
        raise UserError(f"weight-only quantization to {bits} bits: expected 4 or 8")
    qmax, qtype = (7, ml_dtypes.int4) if bits == 4 else (127, np.int8)
    inits = {t.name: t for t in model.graph.initializer}
    new_nodes, done = [], {}
    for node in model.graph.node:
        weight = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else None
        tensor = inits.get(weight)
        if tensor is None or tensor.data_type != onnx.TensorProto.FLOAT or len(tensor.dims) != 2:
            new_nodes.append(node)
            continue
        if weight not in done:
            w = numpy_helper.to_array(tensor).astype(np.float32)
            k, n = w.shape
            if bits == 4 and k % block_size:
                raise UserError(f"MatMul weight {weight} has {k} rows, not a multiple of the INT4 block "
                                f"size {block_size}; keep this part at fp16 (--part PART=fp16)")
            groups = w.reshape(k // block_size, block_size, n) if bits == 4 else w[None]
            scale = np.abs(groups).max(axis=1) / qmax  # [K/B, N] or [1, N]
            scale = np.where(scale > 0, scale, 1.0).astype(np.float32)  # an all-zero block: any scale
            q = np.clip(np.rint(groups / scale[:, None, :]), -qmax, qmax).reshape(k, n).astype(qtype)
            q_name, s_name, out = f"{weight}_q{bits}", f"{weight}_q{bits}_scale", f"{weight}_dq{bits}"
            attrs = {"axis": 0, "block_size": block_size} if bits == 4 else {"axis": 1}
            model.graph.initializer.extend([numpy_helper.from_array(q, q_name),
                                            numpy_helper.from_array(scale if bits == 4 else scale[0], s_name)])
            new_nodes.append(helper.make_node("DequantizeLinear", [q_name, s_name], [out],
                                              name=f"{weight}_DQ_int{bits}", **attrs))
            done[weight] = out
        node.input[1] = done[weight]
        new_nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    used = {name for node in model.graph.node for name in node.input}
    keep = [t for t in model.graph.initializer if t.name not in done or t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    if bits == 4:
        for opset in model.opset_import:
            if opset.domain in ("", "ai.onnx"):
                opset.version = max(opset.version, 21)  # blocked DequantizeLinear, INT4
    return model


def convert_file(src: str | Path, dst: str | Path, precision: str, *, int4=None, calibration=None) -> list[Path]:
    """Write the fp32 file ``src`` as the TensorRT flavour of ``precision`` to ``dst`` (+ data);
    returns the files written. ``int4``: an :class:`~llava_edge.quant.onnx_quant.Int4Options` whose
    block size is used (symmetric round-to-nearest only: TensorRT takes no zero point).
    Refuses to write a file TensorRT's parser would reject."""
    from llava_edge.export.onnx.files import load_proto, save_model
    from llava_edge.export.tensorrt.operators import check_model
    from llava_edge.quant.onnx_quant import convert_fp16

    if precision not in PRECISIONS:
        raise UserError(f"cannot convert to {precision!r} for TensorRT; choose one of: fp16, int8, int4")
    if calibration is not None:
        raise UserError("the TensorRT ONNX parts take no calibration data (weight-only quantization)")
    block = int4.block_size if int4 is not None else DEFAULT_INT4_BLOCK
    if int4 is not None and (int4.algorithm != "default" or not int4.symmetric):
        raise UserError(f"TensorRT's INT4 weights are symmetric round-to-nearest (DequantizeLinear with no "
                        f"zero point); algorithm {int4.algorithm!r}, symmetric={int4.symmetric} cannot be written")
    model = load_proto(src)
    if precision in ("int4", "int8"):
        model = quantize_weights(model, 4 if precision == "int4" else 8, block)
    model = convert_fp16(model)
    check_model(model, where=str(dst))
    return save_model(model, dst)

