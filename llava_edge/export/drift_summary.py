"""The drift summary an export records in its bundle: each written format against the FP16 reference.

After the formats are written, :func:`record_export_drift` runs the drift suite
(:func:`llava_edge.drift.compare`) with the torch runtime on the source model in float16 as the
reference and one candidate per runtime that reads the bundle (``onnx``, ``llamacpp``, and the
TensorRT ONNX parts in onnxruntime), and stores each candidate's summary in ``manifest.json``'s
``drift`` field under ``RUNTIME-LEVEL`` (``onnx-int4``, ``llamacpp-int4``, ``tensorrt-onnx-int4``;
rewritten atomically), so whoever
receives the bundle sees how far it strays before shipping it.

The eval set is the user's (``--drift-eval FILE``: a LLaVA eval file, with gold answers for task
accuracy) or, by default, a few held-out scenes of the synthetic world drawn at the model's image
size: enough for image-embedding, KL and top-1 figures on any model; task accuracy means something
only for a model trained on that world (the demo model). End-to-end figures only: the attribution
passes and the noise floor are ``llava-edge drift``'s job.
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

# format written -> (label prefix, runtime spec of what reads it from the bundle). The TensorRT
# parts are measured in onnxruntime, which runs those exact files; engines, when built, are
# measured by `llava-edge drift` with the tensorrt runtime on their GPU.
RUNTIME_OF_FORMAT = {"onnx": ("onnx", "onnx:{bundle}"), "gguf": ("llamacpp", "llamacpp:{bundle}"),
                     "tensorrt": ("tensorrt-onnx", "onnx:{bundle}?components=tensorrt-onnx")}
DEFAULT_PROBE_SCENES = 12  # synthetic held-out scenes (a short and a multiple-choice question each)


def record_export_drift(model_dir: str | Path, bundle: str | Path, formats: list[str], level: str, *,
                        eval_set: str | Path | None = None, limit: int | None = None,
                        say: Callable[[str], None] | None = None) -> dict:
    """Measure and record the drift of every runtime that reads ``bundle``; returns the manifest's
    ``drift`` field. Skipped (returns ``{}``) when torch, the reference runtime, is not installed."""
    from llava_edge.drift import compare, record_in_bundle

    say = say or (lambda text: None)
    if importlib.util.find_spec("torch") is None:
        say("drift summary skipped: the FP16 reference runs on torch, which is not installed")
        return {}
    specs = {f"{RUNTIME_OF_FORMAT[fmt][0]}-{level}": RUNTIME_OF_FORMAT[fmt][1].format(bundle=bundle)
             for fmt in formats if fmt in RUNTIME_OF_FORMAT}  # label -> runtime spec
    if not specs:
        return {}
    reference = f"fp16-torch=torch:{model_dir}?dtype=float16"
    with tempfile.TemporaryDirectory(prefix="llava-edge-drift-") as tmp:
        name = None
        if eval_set is None:
            eval_set = _probe_set(model_dir, Path(tmp) / "probe")
            name = f"{DEFAULT_PROBE_SCENES} synthetic held-out scenes (llava_edge.export.drift_summary)"
        say(f"drift summary: {', '.join(specs)} against the fp16 torch reference on {name or eval_set}")
        report = compare(reference, [f"{label}={spec}" for label, spec in specs.items()], eval_set,
                         floor=None, limit=limit, attribution=False, say=say)
    drift: dict = {}
    for label in specs:
        drift = record_in_bundle(bundle, report, label, eval_set=name)
    return drift


def _probe_set(model_dir: str | Path, out: Path) -> Path:
    from llava_edge.data.synth import synth

    config = json.loads((Path(model_dir) / "config.json").read_text())
    size = int(config.get("vision_config", {}).get("image_size", 336))
    synth(out, n=1, seed=0, image_size=size, n_eval=DEFAULT_PROBE_SCENES)
    return out / "eval.json"
