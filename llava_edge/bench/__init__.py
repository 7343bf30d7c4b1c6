"""Speed and memory of every runtime on one bundle: ``llava-edge bench BUNDLE``.

>>> from llava_edge.bench import bench
>>> report = bench("my-bundle", ["llamacpp", "onnx", "raw-llamacpp"], n_tokens=32, repeats=3)
>>> report.write("bench-out")        # bench.json, bench.md, bench.png

Each target runs in its own process (:mod:`.worker`) so peak RSS is attributable; what is measured is
described in :mod:`.targets`, the target grammar in :mod:`.run`, the outputs in :mod:`.report`.
Importing this package imports neither a runtime nor matplotlib.
"""

from llava_edge.bench.run import (
    DEFAULT_FOLLOWUP, DEFAULT_PROMPT, BenchReport, Target, bench, default_targets, parse_target,
)
from llava_edge.bench.targets import BASELINES, LLAMA_CPP_PYTHON, RAW_LLAMACPP

__all__ = ["BASELINES", "DEFAULT_FOLLOWUP", "DEFAULT_PROMPT", "LLAMA_CPP_PYTHON", "RAW_LLAMACPP",
           "BenchReport", "Target", "bench", "default_targets", "parse_target"]
