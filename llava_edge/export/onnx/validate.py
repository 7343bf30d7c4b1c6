"""Check an exported ONNX part against torch (or against another ONNX file) on fresh random inputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from llava_edge.errors import ModelError
from llava_edge.export.onnx.specs import Dims, ModelDims, PartSpec


class ExportValidationError(ModelError):
    """An exported part does not reproduce torch within its tolerance."""


class Check(NamedTuple):
    """One output at one input size: its max-abs difference and the tolerance it was held to."""

    output: str
    dims: Dims
    diff: float
    tolerance: float
    scale: float  # the output's largest magnitude


@dataclass
class Comparison:
    """Worst max-abs difference over all outputs and input sizes checked; with a tolerance
    (``atol + rtol * scale``), the worst difference measured against its own output's tolerance."""

    part: str
    atol: float = float("inf")
    rtol: float = 0.0
    max_abs: float = 0.0
    worst_output: str = ""
    worst_dims: Dims | None = None
    per_output: dict[str, float] = field(default_factory=dict)
    # the check that came closest to (or past) its tolerance, and by how much: diff - tolerance
    # (> 0 fails)
    worst_excess: float = float("-inf")
    closest: Check | None = None

    def update(self, name: str, dims: Dims, expected: np.ndarray, got: np.ndarray) -> None:
        if expected.shape != got.shape:
            raise ExportValidationError(
                f"{self.part}: ONNX output {name!r} has shape {got.shape}, torch gives {expected.shape} "
                f"(inputs {dims})")
        expected64 = expected.astype(np.float64)
        diff = float(np.max(np.abs(expected64 - got.astype(np.float64)), initial=0.0))
        if not np.isfinite(diff):
            diff = float("inf")
        self.per_output[name] = max(self.per_output.get(name, 0.0), diff)
        if diff >= self.max_abs:
            self.max_abs, self.worst_output, self.worst_dims = diff, name, dims
        scale = float(np.max(np.abs(expected64), initial=0.0))
        tolerance = self.atol + self.rtol * scale
        if diff - tolerance > self.worst_excess:
            self.worst_excess, self.closest = diff - tolerance, Check(name, dims, diff, tolerance, scale)

    @property
    def passed(self) -> bool:
        return not self.worst_excess > 0

    def summary(self) -> dict:
        return {"max_abs": self.max_abs, "worst_output": self.worst_output}


def cpu_session(path: str | Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def torch_outputs(spec: PartSpec, module, dims: ModelDims, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    import torch

    with torch.inference_mode():
        out = module(*spec.args(inputs, dims))
    out = out if isinstance(out, (tuple, list)) else (out,)
    return [t.detach().float().cpu().numpy() for t in out]


def check_against_torch(spec: PartSpec, module, dims: ModelDims, path: str | Path, *,
                        seed: int = 1000) -> Comparison:
    """Run ``path`` and ``module`` on fresh random inputs of every size in ``spec.check_dims``;
    raise :class:`ExportValidationError` (with the max diff) when they differ beyond ``spec.atol`` +
    ``spec.rtol`` x the output's largest magnitude."""
    session = cpu_session(path)
    names = spec.output_names(dims)
    result = Comparison(spec.name, atol=spec.atol, rtol=spec.rtol)
    for k, size in enumerate(spec.check_dims):
        inputs = spec.dummy_inputs(dims, size, np.random.default_rng(seed + k))
        expected = torch_outputs(spec, module, dims, inputs)
        got = session.run(names, inputs)
        for name, e, g in zip(names, expected, got):
            result.update(name, size, e, g)
    if not result.passed:
        c = result.closest
        raise ExportValidationError(
            f"{spec.name}: the exported ONNX file {path} differs from torch by {c.diff:.3g} "
            f"(max abs, output {c.output!r}, inputs {c.dims}); the tolerance there is {c.tolerance:.3g} "
            f"({spec.atol:g} + {spec.rtol:g} x {c.scale:.3g}, the output's largest magnitude). The export "
            "is not faithful: report this with your torch/transformers/onnxscript versions, or try "
            "another --opset")
    return result


def check_against_reference(spec: PartSpec, dims: ModelDims, reference: str | Path, path: str | Path,
                            *, seed: int = 2000) -> Comparison:
    """How far a converted (fp16/quantized) file strays from the fp32 file; also proves it loads and
    runs. Raises only when the output is not finite."""
    ref, session = cpu_session(reference), cpu_session(path)
    names = spec.output_names(dims)
    result = Comparison(spec.name)
    for k, size in enumerate(spec.check_dims):
        inputs = spec.dummy_inputs(dims, size, np.random.default_rng(seed + k))
        for name, e, g in zip(names, ref.run(names, inputs), session.run(names, inputs)):
            result.update(name, size, e, g)
    if not np.isfinite(result.max_abs):
        raise ExportValidationError(
            f"{spec.name}: {path} gives non-finite outputs (inputs {result.worst_dims})")
    return result


def check_runs(spec: PartSpec, dims: ModelDims, path: str | Path, *, seed: int = 3000) -> dict:
    """Smoke check of a file with no reference to compare with (the streamed decoder): it loads,
    runs at every checked size, and gives finite outputs of the expected rank."""
    session = cpu_session(path)
    names = spec.output_names(dims)
    largest = 0.0
    for k, size in enumerate(spec.check_dims):
        inputs = spec.dummy_inputs(dims, size, np.random.default_rng(seed + k))
        for name, out in zip(names, session.run(names, inputs)):
            if not np.isfinite(out).all():
                raise ExportValidationError(f"{spec.name}: {path} gives non-finite {name!r} (inputs {size})")
            largest = max(largest, float(np.abs(out).max(initial=0.0)))
    return {"ran": len(spec.check_dims), "max_abs_output": largest}
