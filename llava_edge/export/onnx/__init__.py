"""ONNX export: four parts (vision, projector, embeddings, decoder), each checked against torch.

>>> from llava_edge.export.onnx import export_onnx
>>> export_onnx("my-model", "my-bundle", precision="int4")

Importing this package does not import torch; exporting does.
"""

from llava_edge.export.onnx.export import (
    DEFAULT_OPSET, ExportError, convert_bundle, export_and_validate, export_onnx,
)
from llava_edge.export.onnx.specs import PARTS, SPECS, PartSpec
from llava_edge.export.onnx.validate import ExportValidationError

__all__ = ["DEFAULT_OPSET", "PARTS", "SPECS", "ExportError", "ExportValidationError", "PartSpec",
           "convert_bundle", "export_and_validate", "export_onnx"]
