"""Drift: how far a quantized file, on any runtime, strays from the reference model.

>>> from llava_edge.drift import compare
>>> report = compare("torch:runs/demo/stage2",
...                  ["fp16=torch:runs/demo/stage2?dtype=float16", "int4=onnx:runs/demo/bundle-int4"],
...                  "runs/demo/world/eval.json")
>>> report.print_table()
>>> report.assert_within(max_kl=0.05, min_top1=0.9, max_accuracy_drop=0.02)

Everything goes through the runtime protocol (``encode_image``, ``logits``, ``generate``), so any
registered runtime can be a reference or a candidate. See docs/drift.md.
"""

from llava_edge.drift.command import EXIT_EXCEEDED, EXIT_OK, command_line, drift
from llava_edge.drift.compare import RERUN, VISION_FEATURES_METHOD, compare
from llava_edge.drift.report import (
    CandidateResult, DriftExceeded, DriftReport, ReferenceResult, record_in_bundle,
)
from llava_edge.drift.spec import RuntimeSpec, parse_spec
from llava_edge.drift.thresholds import (
    DEFAULT_THRESHOLDS, LIMITS, Thresholds, Violation, load_thresholds,
)

__all__ = [
    "CandidateResult", "DEFAULT_THRESHOLDS", "DriftExceeded", "DriftReport", "EXIT_EXCEEDED", "EXIT_OK",
    "LIMITS", "RERUN", "ReferenceResult", "RuntimeSpec", "Thresholds", "VISION_FEATURES_METHOD",
    "Violation", "command_line", "compare", "drift", "load_thresholds", "parse_spec", "record_in_bundle",
]
