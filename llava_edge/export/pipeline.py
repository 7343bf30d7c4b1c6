"""``llava-edge export``: one command writes a bundle holding every requested format.

A precision level names what each format gets, as measured best for that level (decoder
quantized, vision side kept at higher precision unless asked). Formats are written one after the
other into the same bundle; each writer swaps the bundle in atomically, so an interrupted export
leaves either the previous complete bundle or nothing.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from llava_edge.errors import UserError

# precision level -> (ONNX precision, GGUF decoder quant, GGUF mmproj quant)
LEVELS = {
    "fp32": ("fp32", "F32", "F32"),
    "fp16": ("fp16", "F16", "F16"),
    "int8": ("int8", "Q8_0", "F16"),
    "int4": ("int4", "Q4_K_M", "F16"),
}
FORMATS = {"onnx": "onnxruntime", "gguf": "llama_cpp", "tensorrt": "tensorrt"}


#: Modules each format's *writer* needs (TensorRT's ONNX parts are written and checked with
#: onnxruntime; its engines are built where TensorRT runs: ``llava-edge build-engines``).
WRITER_NEEDS = {"onnx": "onnxruntime", "gguf": "llama_cpp", "tensorrt": "onnxruntime"}


def available_formats() -> list[str]:
    """The formats written when none are named: those whose runtime runs on this machine. TensorRT is
    written only when asked for (its engines need the target GPU)."""
    return [f for f, module in FORMATS.items()
            if f != "tensorrt" and importlib.util.find_spec(module) is not None]


def parse_formats(text: str | None) -> list[str]:
    if not text:
        found = available_formats()
        if not found:
            raise UserError("no export format can run here: install 'llava-edge[onnx]' and/or 'llava-edge[gguf]'")
        return found
    formats = [f.strip() for f in text.split(",") if f.strip()]
    for f in formats:
        if f not in FORMATS:
            raise UserError(f"unknown format {f!r}; choose from: {', '.join(FORMATS)}")
        if importlib.util.find_spec(WRITER_NEEDS[f]) is None:
            extra = "onnx" if f == "tensorrt" else f
            raise UserError(f"format {f!r} needs {WRITER_NEEDS[f]}, which is not installed "
                            f"(pip install 'llava-edge[{extra}]')")
    return formats


def export(model_dir: str | Path, out: str | Path, *, formats: list[str] | None = None,
           level: str = "int4", gguf_quants: list[str] | None = None,
           mmproj_quants: list[str] | None = None, part_precision: dict[str, str] | None = None,
           imatrix: str | Path | None = None, overwrite: bool = False, progress: bool = True,
           drift: bool = True, drift_eval: str | Path | None = None, drift_limit: int | None = None,
           base: str | Path | None = None, vision_tower: str | Path | None = None,
           say=None) -> Path:
    """Write the bundle ``out`` from the checkpoint folder ``model_dir``; returns ``out``.

    ``model_dir`` may also be an original-LLaVA checkpoint (merged, stage-1 projector or LoRA; with
    ``base`` / ``vision_tower`` where it lacks them), converted to a temporary folder first.
    ``drift``: measure each written format against the FP16 reference and record the summary in the
    manifest (:mod:`llava_edge.export.drift_summary`; ``drift_eval`` an eval file, default synthetic
    probe scenes; ``drift_limit`` its first N records)."""
    import tempfile

    from llava_edge.model.convert_original import convert_original, is_original_checkpoint
    from llava_edge.model.loading import check_model_folder

    say = say or (lambda text: None)
    if level not in LEVELS:
        raise UserError(f"unknown precision {level!r}; choose one of: {', '.join(LEVELS)}")
    with tempfile.TemporaryDirectory(prefix="llava-edge-convert-") as tmp:
        if is_original_checkpoint(model_dir):
            say(f"{model_dir}: an original-LLaVA checkpoint; converting it first")
            model_dir = convert_original(model_dir, Path(tmp) / "model", base=base, vision_tower=vision_tower)
        check_model_folder(model_dir)
        formats = formats or available_formats()
        _write_formats(model_dir, out, formats, level, gguf_quants, mmproj_quants, part_precision, imatrix,
                       overwrite, progress, say)
        if drift:
            from llava_edge.export.drift_summary import record_export_drift

            record_export_drift(model_dir, out, formats, level, eval_set=drift_eval, limit=drift_limit, say=say)
    return Path(out)


def _write_formats(model_dir, out, formats, level, gguf_quants, mmproj_quants, part_precision, imatrix,
                   overwrite, progress, say) -> None:
    onnx_precision, gguf_quant, mmproj_quant = LEVELS[level]
    written = False
    if "onnx" in formats:
        from llava_edge.export.onnx.export import export_onnx

        export_onnx(model_dir, out, onnx_precision, part_precision=part_precision,
                    overwrite=overwrite, progress=progress)
        written = True
    if "gguf" in formats:
        import logging

        from llava_edge.export.gguf.export import export_gguf

        logging.getLogger("gguf").setLevel(logging.WARNING)  # the writer logs every file at INFO

        export_gguf(model_dir, out, quant=gguf_quants or [gguf_quant],
                    mmproj_quant=mmproj_quants or [mmproj_quant], overwrite=overwrite and not written,
                    extend=written, imatrix=imatrix)
        written = True
    if "tensorrt" in formats:
        from llava_edge.export.onnx.export import export_onnx

        export_onnx(model_dir, out, onnx_precision, part_precision=part_precision, flavour="tensorrt",
                    overwrite=overwrite and not written, extend=written, progress=progress)
        _build_engines_here(out, say)


def _build_engines_here(out, say) -> None:
    """Build the engines now when this machine has TensorRT and a GPU; else say how to later."""
    from llava_edge.errors import RuntimeNotAvailable
    from llava_edge.export.tensorrt.builder import build_engines

    try:
        build_engines(out, say=say)  # checks for TensorRT and a GPU before it writes anything
    except RuntimeNotAvailable as exc:
        say(f"TensorRT engines not built: {exc}. The bundle holds the TensorRT ONNX parts; build the "
            f"engines on the machine that will run them: llava-edge build-engines {out}")
