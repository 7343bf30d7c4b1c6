"""Export a LLaVA checkpoint to an ONNX bundle: every part exported, checked against torch, converted.

``export_onnx(model_dir, out)`` is ``llava-edge export MODEL --format onnx --out DIR``. For each part
of :data:`~llava_edge.export.onnx.specs.SPECS` it

1. traces the part with torch.onnx's dynamo exporter (dynamic batch / sequence / past axes),
2. checks the fp32 file against torch on fresh random inputs of other sizes (:mod:`.validate`) and
   refuses to go on when it differs beyond the part's tolerance,
3. converts it to the part's precision (:mod:`llava_edge.quant.onnx_quant`) and measures how far the
   converted file strays from the fp32 one,

and records it in the bundle manifest (``onnx/<part>``, file + external data, sha256s, details).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from llava_edge.errors import ModelError, UserError
from llava_edge.export.bundle import component_path, extend_bundle
from llava_edge.export.onnx.files import files_of, save_model
from llava_edge.export.onnx.specs import PARTS, SPECS, TRACE_DIMS, ModelDims, PartSpec
from llava_edge.export.onnx.streamed import (
    CheckpointWeights, check_streamable, checkpoint_bytes, export_decoder_streamed, load_parts, meta_model,
)
from llava_edge.export.tensorrt import onnx_parts as tensorrt_onnx_parts
from llava_edge.export.onnx.validate import (
    Comparison, check_against_reference, check_against_torch, check_runs,
)
from llava_edge.quant.onnx_quant import (
    DEFAULT_INT4, Int4Options, convert_file, part_precisions,
)

#: opset 20 is what DESIGN.md measured end to end (23 also runs in onnxruntime 1.31).
DEFAULT_OPSET = 20
FORMAT = "onnx"
#: Checkpoints larger than this get a streamed decoder by default (loading a model takes about
#: 4 bytes per parameter in fp32 plus the exporter's copies; 4 GiB of fp16 weights is 2B parameters).
STREAM_ABOVE_BYTES = 4 << 30


class ExportError(ModelError):
    """torch.onnx could not export a part."""


@dataclass(frozen=True)
class Flavour:
    """Which runtime an ONNX export targets: where its parts go in the bundle, how they are
    converted from fp32, and the int4 settings used when none are given."""

    name: str  # component keys "<name>/<part>" and the manifest's drift entry
    folder: str  # files "<folder>/<part>.onnx"
    convert: Callable  # (fp32 file, out file, precision, *, int4, calibration) -> files written
    int4: Int4Options  # the --int4 settings when none are given
    streams_int4: bool  # the streamed decoder writes int4 itself; False: fp32, then converted

    def key(self, part: str) -> str:
        return f"{self.name}/{part}"

    def file(self, part: str) -> str:
        return f"{self.folder}/{part}.onnx"



#: One row per target runtime. The TensorRT flavour: standard ONNX operators only, quantized
#: weights as DequantizeLinear (:mod:`llava_edge.export.tensorrt.onnx_parts`).
FLAVOURS: dict[str, Flavour] = {
    "onnx": Flavour("onnx", "onnx", convert_file, DEFAULT_INT4, True),
    "tensorrt": Flavour("tensorrt-onnx", "tensorrt/onnx", tensorrt_onnx_parts.convert_file,
                        Int4Options(block_size=64, symmetric=True), False),
}
ONNXRUNTIME = FLAVOURS["onnx"]


@contextlib.contextmanager
def quiet() -> Iterator[io.StringIO]:
    """Silence the exporter's and quantizers' chatter (prints, warnings, log lines) for the duration;
    what they printed is kept in the yielded buffer for error messages."""
    buffer = io.StringIO()
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buffer):
            warnings.simplefilter("ignore")
            yield buffer
    finally:
        logging.disable(previous)


def export_part(spec: PartSpec, module, dims: ModelDims, path: str | Path, *,
                opset: int = DEFAULT_OPSET) -> list[Path]:
    """Trace ``module`` (the spec's wrapper) and write ``path`` (+ external data)."""
    import torch

    inputs = spec.dummy_inputs(dims, TRACE_DIMS, __import__("numpy").random.default_rng(0))
    with quiet() as log:
        try:
            with torch.no_grad():
                program = torch.onnx.export(
                    module, spec.args(inputs, dims), dynamo=True, opset_version=opset,
                    input_names=spec.input_names(dims), output_names=spec.output_names(dims),
                    dynamic_shapes=spec.dynamic_shapes(dims), optimize=True, verbose=False,
                )
        except Exception as exc:  # noqa: BLE001 - torch.export raises many types; we add the part name
            tail = log.getvalue().strip().splitlines()[-5:]
            raise ExportError(f"{spec.name}: torch.onnx could not export this part: {exc}"
                              + ("\n" + "\n".join(tail) if tail else "")) from exc
        return save_model(program.model, path)


def export_and_validate(spec: PartSpec, model, path: str | Path, *, opset: int = DEFAULT_OPSET,
                        validate: bool = True) -> tuple[list[Path], Comparison | None]:
    """The generic routine: export one part, then check it against torch before declaring success."""
    dims = ModelDims.from_config(model.config)
    module = spec.build(model).eval()
    files = export_part(spec, module, dims, path, opset=opset)
    comparison = check_against_torch(spec, module, dims, files[0]) if validate else None
    return files, comparison


class _Progress:
    """Rich progress over parts and their steps, or nothing."""

    def __init__(self, enabled: bool):
        self._progress = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("[bold]{task.fields[part]:<10}"), BarColumn(), TextColumn("{task.description}"),
                TimeElapsedColumn(), console=Console(stderr=True), redirect_stdout=False,
                redirect_stderr=False, transient=False,
            )
            self._task = None

    def __enter__(self):
        if self._progress:
            self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self._progress:
            self._progress.__exit__(*exc)

    def start(self, part: str, steps: int) -> None:
        if self._progress:
            self._task = self._progress.add_task("", total=steps, part=part)

    def step(self, description: str, advance: int = 0) -> None:
        if self._progress:
            self._progress.update(self._task, description=description, advance=advance)


def _check_request(precisions: dict[str, str], parts, int4: Int4Options, calibration) -> None:
    unknown = [p for p in parts if p not in SPECS]
    if unknown:
        raise ModelError(f"unknown ONNX part(s) {unknown}; the parts are: {', '.join(SPECS)}")
    if int4.algorithm == "gptq" and calibration is None and "int4" in precisions.values():
        raise UserError("int4 algorithm 'gptq' needs calibration data: pass calibration="
                        "MultimodalCalibration(samples) (llava_edge.quant.calibration)")


def export_onnx(
    model_dir: str | Path,
    out_dir: str | Path,
    precision: str = "fp32",
    *,
    part_precision: dict[str, str] | None = None,
    int4: Int4Options | None = None,
    calibration=None,
    opset: int = DEFAULT_OPSET,
    parts: tuple[str, ...] = PARTS,
    validate: bool = True,
    streamed: bool | None = None,
    flavour: str = "onnx",
    extend: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Export the checkpoint folder ``model_dir`` to an ONNX bundle at ``out_dir``; returns it.

    ``precision``: fp32, fp16, int8 or int4; which part gets which precision is
    :func:`~llava_edge.quant.onnx_quant.part_precisions` (int4/int8 quantize the decoder and keep
    vision, projector and embeddings fp16), with ``part_precision`` overriding single parts, e.g.
    ``{"vision": "fp32"}``. ``int4``: MatMulNBits options (default: ``DEFAULT_INT4``, symmetric
    block 16; the manifest records them). ``calibration``: a
    :class:`~llava_edge.quant.calibration.MultimodalCalibration` (needed by the gptq algorithm).
    Every part is checked against torch (``validate``) before anything is converted; the bundle is
    written to a temporary folder and renamed at the end, so a failed export leaves nothing behind.

    ``streamed``: build the decoder from the weights instead of loading the model (see
    :mod:`.streamed`; fp32 or int4 decoders only, ``default`` int4 algorithm). None: stream when the
    checkpoint is over :data:`STREAM_ABOVE_BYTES` (a 7B model does not fit in memory in fp32).

    ``flavour``: ``"onnx"`` (onnxruntime, the default) or ``"tensorrt"`` (standard operators only,
    for TensorRT's parser; see :data:`FLAVOURS`). ``extend``: add the parts to the existing bundle at
    ``out_dir`` (from the same checkpoint), replacing that flavour's folder.
    """
    from llava_edge.export.bundle import write_bundle

    if flavour not in FLAVOURS:
        raise UserError(f"unknown ONNX flavour {flavour!r}; choose one of: {', '.join(FLAVOURS)}")
    fl = FLAVOURS[flavour]
    precisions = part_precisions(precision, part_precision)
    stream = checkpoint_bytes(model_dir) > STREAM_ABOVE_BYTES if streamed is None else streamed
    stream_native = stream and "decoder" in parts and fl.streams_int4
    int4 = int4 or fl.int4
    _check_request(precisions, parts, int4, calibration)
    if stream_native:
        check_streamable(precisions["decoder"], int4)
    elif stream and "decoder" in parts and precisions["decoder"] != "fp32":
        # Measured: onnxruntime's float16 converter writes a graph that does not load (an Expand
        # typed float16 where float is expected) from the streamed decoder. Refuse before any work.
        raise ModelError(f"{model_dir}: over {STREAM_ABOVE_BYTES >> 30} GiB, so the decoder is exported "
                         f"streamed, and the {flavour} flavour cannot convert a streamed decoder to "
                         f"{precisions['decoder']} yet; keep it fp32 (--part decoder=fp32)")
    model, weights = _load_for_export(model_dir, stream)
    dims = ModelDims.from_config(model.config)
    opened = (extend_bundle(out_dir, fl.folder.split("/")[0], model_dir=model_dir) if extend
              else write_bundle(model_dir, out_dir, overwrite=overwrite))
    with opened as writer, tempfile.TemporaryDirectory(prefix="fp32-", dir=writer.root) as work, \
            _Progress(progress) as bar:
        writer.manifest.drift[fl.name] = {}
        fp32_files: dict[str, Path] = {}  # for calibration: the parts before this one, in fp32
        for name in parts:
            spec, target = SPECS[name], precisions[name]
            if stream_native and name == "decoder":
                bar.start(name, 2)
                details = {"opset": opset, "dims": asdict(dims), "part_precision": precisions,
                           "streamed": True}
                bar.step(f"building from the weights ({target}, streamed)")
                export_decoder_streamed(model, weights, writer.path(fl.file(name)), precision=target,
                                        int4=int4, opset=opset)
                if target == "int4":
                    details["int4"] = int4.to_dict()
                bar.step("running it", 1)
                details["smoke_check"] = check_runs(spec, dims, writer.root / fl.file(name))
                bar.step("done", 1)
                _record(writer, fl, name, target, details)
                continue
            converted = target != "fp32"
            bar.start(name, 2 + 2 * converted)
            fp32_path = Path(work) / f"{name}.onnx" if converted else writer.path(fl.file(name))
            details: dict = {"opset": opset, "dims": asdict(dims), "part_precision": precisions}
            if stream and name == "decoder":
                # A flavour whose converter needs the whole graph: the fp32 decoder is streamed to
                # a file, then converted like any part (the converter holds it in memory).
                bar.step("building from the weights (fp32, streamed)")
                export_decoder_streamed(model, weights, fp32_path, precision="fp32", opset=opset)
                bar.step("running it", 1)
                details.update(streamed=True, smoke_check=check_runs(spec, dims, fp32_path))
            else:
                bar.step("exporting (torch.onnx dynamo)")
                module = spec.build(model).eval()
                export_part(spec, module, dims, fp32_path, opset=opset)
                bar.step("checking against torch", 1)
                if validate:
                    details["torch_max_abs"] = check_against_torch(spec, module, dims, fp32_path).max_abs
                if stream:
                    module.to("meta")  # its weights are in the file now: free them for the decoder
            fp32_files[name] = fp32_path
            bar.step("done", 1)
            if converted:
                _convert_part(writer, fl, spec, dims, fp32_files, target, details, int4, calibration, bar,
                              tokenizer_dir=Path(model_dir))
            _record(writer, fl, name, target, details)
    return Path(out_dir)


def _load_for_export(model_dir, stream: bool):
    """The model to trace: fully loaded, or on the meta device with all but the decoder loaded."""
    from llava_edge.model.loading import check_model_folder, load_model

    if not stream:
        return load_model(model_dir), None
    check_model_folder(model_dir)
    weights = CheckpointWeights(model_dir)
    model = meta_model(model_dir)
    load_parts(model, weights)
    return model, weights


def convert_bundle(
    fp32_bundle: str | Path,
    out_dir: str | Path,
    precision: str,
    *,
    part_precision: dict[str, str] | None = None,
    int4: Int4Options | None = None,
    calibration=None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write ``fp32_bundle``'s ONNX parts at another precision into a new bundle, without tracing
    again (and without torch): export once with :func:`export_onnx`, quantize many ways."""
    import shutil

    from llava_edge.export.bundle import MANIFEST, TOKENIZER_FILES, BundleWriter, read_manifest
    from llava_edge.utils.atomic import atomic_dir, atomic_write_text

    src = Path(fp32_bundle)
    source = read_manifest(src)
    keys = [k for k in source.components if k.startswith(f"{FORMAT}/")]
    not_fp32 = [k for k in keys if source.components[k].precision != "fp32"]
    if not keys or not_fp32:
        raise ModelError(f"{src}: convert_bundle needs a bundle of fp32 ONNX parts "
                         f"({'not fp32: ' + ', '.join(not_fp32) if not_fp32 else 'it has no ONNX parts'})")
    parts = tuple(k.split("/", 1)[1] for k in keys)
    precisions = part_precisions(precision, part_precision)
    int4 = int4 or DEFAULT_INT4
    _check_request(precisions, parts, int4, calibration)
    fp32_files = {}
    for key, part in zip(keys, parts):
        fp32_files[part] = component_path(src, source, key, verify=True)
    manifest = dataclasses.replace(source, components={}, drift={FORMAT: {}})
    with atomic_dir(out_dir, overwrite=overwrite) as tmp, _Progress(progress) as bar:
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        writer = BundleWriter(tmp, manifest)
        for key, name in zip(keys, parts):
            target, details = precisions[name], dict(source.components[key].details)
            details = {k: v for k, v in details.items() if k not in ("extra_bytes", "extra_sha256")}
            details["part_precision"] = {p: precisions[p] for p in parts}
            if "dims" not in details:
                raise ModelError(f"{src}: {key} does not record its dimensions (written by an older "
                                 "llava-edge); export the model again with export_onnx")
            dims = ModelDims(**details["dims"])
            bar.start(name, 2 * (target != "fp32") or 1)
            if target == "fp32":
                for f in files_of(fp32_files[name]):
                    shutil.copy2(f, writer.path(f"{FORMAT}/{f.name}"))
                bar.step("copied", 1)
            else:
                _convert_part(writer, ONNXRUNTIME, SPECS[name], dims, fp32_files, target, details, int4,
                              calibration, bar, tokenizer_dir=src)
            _record(writer, ONNXRUNTIME, name, target, details)
        atomic_write_text(tmp / MANIFEST, manifest.to_json())
    return Path(out_dir)


def _convert_part(writer, fl: Flavour, spec: PartSpec, dims: ModelDims, fp32_files: dict[str, Path],
                  target: str, details: dict, int4: Int4Options, calibration, bar, *, tokenizer_dir: Path) -> None:
    """fp32 file -> ``target`` in the bundle; records the options and the drift from fp32."""
    reader = None
    if calibration is not None and target == "int4" and int4.algorithm == "gptq":
        bar.step(f"calibrating on {len(calibration.samples)} image+text samples")
        reader = calibration.reader(spec.name, writer.manifest, tokenizer_dir, fp32_files)
    bar.step(f"converting to {target}")
    with quiet():
        fl.convert(fp32_files[spec.name], writer.path(fl.file(spec.name)), target, int4=int4,
                     calibration=reader)
    if target == "int4":
        details["int4"] = {**int4.to_dict(), **({"calibration_samples": len(reader)} if reader else {})}
    bar.step(f"checking {target} against fp32", 1)
    drift = check_against_reference(spec, dims, fp32_files[spec.name], writer.root / fl.file(spec.name))
    details["fp32_max_abs"] = drift.max_abs
    bar.step("done", 1)


def _record(writer, fl: Flavour, name: str, precision: str, details: dict) -> None:
    files = files_of(writer.root / fl.file(name))
    rels = [f.relative_to(writer.root).as_posix() for f in files]
    details["extra_bytes"] = {r: (writer.root / r).stat().st_size for r in rels[1:]}
    writer.add(fl.key(name), rels[0], format=FORMAT, precision=precision, extra_files=rels[1:],
               details=details)
    writer.manifest.drift.setdefault(fl.name, {})[name] = {
        k: details[k] for k in ("torch_max_abs", "fp32_max_abs") if k in details}
