"""``export_gguf``: a checkpoint folder -> a bundle with the language-model and mmproj GGUF files.

Bundle components (``gguf/`` folder)::

    gguf/model        model-<first quant>.gguf      gguf/model-<Q>   model-<Q>.gguf for each further quant
    gguf/mmproj       mmproj-<first quant>.gguf     gguf/mmproj-<Q>  likewise
    gguf/modelfile    Modelfile (Ollama: FROM model, FROM mmproj, TEMPLATE, SYSTEM, stops)

F32/F16 files are written by our streaming writer; quantized ones by llama.cpp's quantizer from the
F32 file if F32 is asked for, else from an F16 file (kept only if F16 is asked for too). With
``imatrix=`` the language model's quantized files are weighted by an importance matrix
(:mod:`llava_edge.quant.imatrix`); the mmproj files never are (the imatrix covers the decoder only).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from llava_edge.errors import ModelError
from llava_edge.export.bundle import BundleWriter, extend_bundle, sha256_file, write_bundle
from llava_edge.export.gguf import names as N
from llava_edge.export.gguf.check import check_pair, read_gguf_info
from llava_edge.export.gguf.modelfile import render_modelfile
from llava_edge.export.gguf.quantize import quant_type, quantize_gguf, tensor_type_counts
from llava_edge.export.gguf.source import Checkpoint, read_config, text_facts, vision_facts
from llava_edge.export.gguf.writer import write_mmproj, write_text_model

GGUF_DIR = "gguf"

#: Recorded on every mmproj component: what the llama.cpp this was measured with gets wrong.
MMPROJ_DEFECTS = [
    "llama.cpp#25814: the llava CLIP graph puts CLS after the patches while position embeddings and "
    "the patch selection assume CLS first; image embeddings from llama.cpp's own encoder are wrong "
    "(fix in open PR #25844). The llamacpp runtime defaults to the ONNX vision path for this reason.",
]


def _quants(value: str | Sequence[str], what: str) -> list[str]:
    items = [value] if isinstance(value, str) else list(value)
    if not items:
        raise ModelError(f"no {what} quant type given; choose from: {', '.join(N.QUANT_TYPES)}")
    out = []
    for item in items:
        name = quant_type(item).name
        if name not in out:
            out.append(name)
    return out


def export_gguf(model_dir: str | Path, out_dir: str | Path, quant: str | Sequence[str] = "F16",
                mmproj_quant: str | Sequence[str] = "F16", *, overwrite: bool = False,
                extend: bool = False, n_threads: int | None = None,
                allow_fallback: bool = True, imatrix=None) -> Path:
    """Write a bundle at ``out_dir`` holding the GGUF files of ``model_dir``; returns ``out_dir``.

    ``quant`` / ``mmproj_quant``: one name or several of F32, F16, Q8_0, Q5_K_M, Q4_K_M, Q4_0 (the first
    is the bundle's default ``gguf/model`` / ``gguf/mmproj``). Names are checked before anything is
    written. ``extend``: add the GGUF files to the existing bundle at ``out_dir`` (made from the same
    checkpoint, e.g. by ``export_onnx``), replacing its ``gguf/`` components; the bundle is rebuilt
    in a temporary folder and swapped in, so an interrupted export leaves it as it was.
    ``allow_fallback``: see :mod:`.quantize` (K-quants on rows not a multiple of 256).
    ``imatrix``: an importance matrix (:class:`~llava_edge.quant.imatrix.ImportanceMatrix` or an
    imatrix file, GGUF or legacy ``.dat``) weighting the language model's quantized files; it is
    read before anything is written, checked against each tensor before llama.cpp quantizes, and
    recorded (with the file's sha256) in each of those components' details.
    """
    quants, mquants = _quants(quant, "language-model"), _quants(mmproj_quant, "mmproj")
    imatrix = _imatrix(imatrix, quants)
    _source_facts(model_dir)  # configs the files cannot express fail before the weights are hashed
    opened = extend_bundle(out_dir, GGUF_DIR, model_dir=model_dir) if extend else write_bundle(model_dir, out_dir,
                                                                           overwrite=overwrite)
    with opened as bundle:
        add_gguf_components(bundle, model_dir, quants, mquants, n_threads=n_threads,
                            allow_fallback=allow_fallback, imatrix=imatrix)
    return Path(out_dir)


class _Weighting(NamedTuple):
    """An importance matrix resolved once per export, and what the manifest says of its file."""

    matrix: object  # llava_edge.quant.imatrix.ImportanceMatrix
    source: dict


def _imatrix(imatrix, quants: Sequence[str]) -> _Weighting | None:
    """The importance matrix read and checked (an error if no quant would use it), or None."""
    if imatrix is None or isinstance(imatrix, _Weighting):
        return imatrix
    if all(N.QUANT_TYPES[q].written for q in quants):
        raise ModelError(f"an importance matrix was given but the language model is only written as "
                         f"{', '.join(quants)}; it weights quantized types (Q4_0, Q4_K_M, ...)")
    from llava_edge.quant.imatrix import ImportanceMatrix, as_importance_matrix

    matrix = as_importance_matrix(imatrix)
    source = {} if isinstance(imatrix, ImportanceMatrix) else {"file": Path(imatrix).name,
                                                                 "sha256": sha256_file(imatrix)}
    return _Weighting(matrix, source)


def add_gguf_components(bundle: BundleWriter, model_dir: str | Path, quants: Sequence[str],
                        mmproj_quants: Sequence[str], *, n_threads: int | None = None,
                        allow_fallback: bool = True, imatrix=None) -> None:
    """Write the GGUF components into an open bundle (so one export can also add ONNX parts)."""
    quants, mquants = _quants(quants, "language-model"), _quants(mmproj_quants, "mmproj")
    imatrix = _imatrix(imatrix, quants)
    model_dir = Path(model_dir)
    manifest = bundle.manifest
    text, vision = _source_facts(model_dir)
    ckpt = Checkpoint(model_dir)

    def write_text(path: Path, precision: str) -> None:
        write_text_model(path, ckpt, text, precision, tokenizer_dir=model_dir,
                         chat_template=manifest.chat_template_jinja, name=manifest.model_name)

    def write_vision(path: Path, precision: str) -> None:
        write_mmproj(path, ckpt, vision, precision, name=f"{manifest.model_name} mmproj")

    text_files = _write_family(bundle, "model", N.model_file, quants, write_text, n_threads,
                               allow_fallback, {"arch": N.TEXT_ARCH}, imatrix=imatrix)
    mmproj_files = _write_family(
        bundle, "mmproj", N.mmproj_file, mquants, write_vision, n_threads, allow_fallback,
        {"arch": N.MMPROJ_ARCH, "feature_layer": vision.feature_layer,
         "layers_stored": vision.n_layers_stored, "known_upstream_defects": MMPROJ_DEFECTS},
    )
    check_pair(read_gguf_info(text_files[0]), read_gguf_info(mmproj_files[0]))

    rel = f"{GGUF_DIR}/{N.MODELFILE}"
    bundle.path(rel).write_text(render_modelfile(
        text_files[0].name, mmproj_files[0].name, manifest.template, num_ctx=text.context_length))
    bundle.add(f"{GGUF_DIR}/modelfile", rel, format="ollama-modelfile", precision=quants[0],
               details={"model": text_files[0].name, "projector": mmproj_files[0].name})


def _source_facts(model_dir: str | Path):
    from llava_edge.model.loading import read_model_info

    info = read_model_info(model_dir)
    config, where = read_config(info.path), str(info.path / "config.json")
    return text_facts(config, where), vision_facts(config, info.preprocess.to_dict(), where)


def _write_family(bundle: BundleWriter, part: str, file_name, quants: list[str], write, n_threads,
                  allow_fallback: bool, details: dict, imatrix=None) -> list[Path]:
    """Write one GGUF per quant for ``part``; the first quant is the ``gguf/<part>`` component.
    ``imatrix``: the :class:`_Weighting` of the quantized files, or None."""
    base = "F32" if "F32" in quants else "F16"
    written: dict[str, Path] = {}

    def direct(precision: str) -> Path:
        if precision not in written:
            path = bundle.path(f"{GGUF_DIR}/{file_name(precision)}")
            write(path, precision)
            written[precision] = path
        return written[precision]

    out = []
    for i, q in enumerate(quants):
        facts = dict(details)
        if N.QUANT_TYPES[q].written:
            path = direct(q)
            facts["tensor_types"] = tensor_type_counts(read_gguf_info(path))
        else:
            src = direct(base)
            path = bundle.path(f"{GGUF_DIR}/{file_name(q)}")
            facts.update(quantize_gguf(src, path, q, n_threads=n_threads, allow_fallback=allow_fallback,
                                       imatrix=imatrix.matrix if imatrix else None))
            if imatrix:
                facts["imatrix"].update(imatrix.source)
        key = f"{GGUF_DIR}/{part}" if i == 0 else f"{GGUF_DIR}/{part}-{q}"
        bundle.add(key, f"{GGUF_DIR}/{path.name}", format="gguf", precision=q, details=facts)
        out.append(path)
    if base in written and base not in quants:  # only an intermediate for the quantizer
        written[base].unlink()
    return out
