"""Reading and writing ONNX files with external data, named one way everywhere.

Every ``X.onnx`` we write keeps its large tensors in ``X.onnx.data`` beside it (tensors under
:data:`INLINE_LIMIT` bytes stay inside the graph file), so a bundle's components are always a graph
file plus at most one data file, whatever the precision.
"""

from __future__ import annotations

from pathlib import Path

INLINE_LIMIT = 1024  # bytes; smaller tensors (norm weights, shapes) stay in the graph file


def data_file_name(onnx_file: str | Path) -> str:
    return Path(onnx_file).name + ".data"


def save_model(model, path: str | Path) -> list[Path]:
    """Write an ``onnx_ir.Model`` or ``onnx.ModelProto`` to ``path`` (+ ``path.data``); returns the
    files written, graph first."""
    import onnx
    import onnx_ir as ir

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(model, onnx.ModelProto):
        model = ir.serde.deserialize_model(model)
    data = path.parent / data_file_name(path)
    data.unlink(missing_ok=True)
    ir.save(model, path, external_data=data.name, size_threshold_bytes=INLINE_LIMIT)
    return [path, data] if data.is_file() else [path]


def load_proto(path: str | Path):
    """An ``onnx.ModelProto`` with its external data loaded (what onnxruntime's quantizers take)."""
    import onnx

    return onnx.load(str(path), load_external_data=True)


def files_of(path: str | Path) -> list[Path]:
    path = Path(path)
    data = path.parent / data_file_name(path)
    return [path, data] if data.is_file() else [path]
