"""Quantize a GGUF file with llama.cpp's own quantizer (``llama_model_quantize`` via llama-cpp-python).

The quant name is validated first, and every tensor llama.cpp would quantize is checked against the
type's block size *before* the quantizer runs:

* rows (ggml ``ne[0]``) not a multiple of 32: an error naming the tensor (no llama.cpp type applies);
* K-quants (Q4_K_M, Q5_K_M) on rows that are a multiple of 32 but not of 256 — every tensor of the
  ``tiny`` preset — use llama.cpp's documented per-tensor fallback (q4_K -> q5_0, q5_K -> q5_1,
  q6_K -> q8_0). The tensors that fall back are returned, and recorded in the bundle manifest, so a
  "Q4_K_M" file of a small model is not mistaken for a real K-quant; ``allow_fallback=False`` makes
  them an error instead.

``imatrix=`` (an :class:`~llava_edge.quant.imatrix.ImportanceMatrix` or an imatrix file) is handed to
the quantizer through ``llama_model_quantize_params.imatrix``: in this llama.cpp a NULL-terminated
array of ``{name, data, size}`` (``src/llama-quant.cpp`` copies it into its own map), holding each
weight's mean squared input per channel. Every entry is checked against its tensor first (llama.cpp
requires ``size == ne[0] * ne[2]`` and finite values); quantized tensors without an entry (the
embeddings, ``output.weight`` unless the imatrix covers it) are quantized unweighted, as llama.cpp does.
With an imatrix llama.cpp also changes its type mix slightly (Q4_0/Q5_0: ``ffn_down`` of the first
eighth of the layers becomes Q4_1/Q5_1); the tensor types returned show what it chose. Q8_0 ignores it.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from llava_edge.errors import ModelError, RuntimeNotAvailable
from llava_edge.export.gguf import names as N
from llava_edge.export.gguf.check import GGUFInfo, read_gguf_info

if TYPE_CHECKING:
    from llava_edge.quant.imatrix import ImportanceMatrix


def quant_type(name: str) -> N.QuantType:
    """The :class:`~.names.QuantType` called ``name``, or an error listing the valid ones."""
    key = name.upper() if isinstance(name, str) else name
    if key not in N.QUANT_TYPES:
        raise ModelError(f"unknown GGUF quant type {name!r}; choose one of: {', '.join(N.QUANT_TYPES)}")
    return N.QUANT_TYPES[key]


def quantized_by_llamacpp(name: str, shape: tuple[int, ...]) -> bool:
    """Whether llama.cpp's quantizer converts this tensor (2-D+ weights other than norms and the
    CLIP patch/position embeddings; its ``tensor_allows_quantization``)."""
    return (len(shape) >= 2 and name.endswith("weight")
            and not any(name.endswith(s) for s in N.UNQUANTIZED_SUFFIXES))


def plan_quantization(info: GGUFInfo, quant: N.QuantType, *, allow_fallback: bool = True) -> list[str]:
    """Check every tensor the quantizer will touch; return those that fall back to a 32-block type."""
    fallback = []
    for t in info.tensors.values():
        if not quantized_by_llamacpp(t.name, t.shape):
            continue
        rows = t.shape[-1]
        if rows % quant.fallback_block:
            raise ModelError(f"{info.path}: tensor {t.name!r} has rows of {rows} values, not a multiple "
                             f"of {quant.fallback_block}: {quant.name} cannot hold it. Use F16/F32, or "
                             "a model whose widths are multiples of 32")
        if rows % quant.block:
            fallback.append(t.name)
    if fallback and not allow_fallback:
        raise ModelError(f"{info.path}: {len(fallback)} tensors have rows that are not a multiple of "
                         f"{quant.block} (first: {fallback[0]}), so {quant.name} would store them in a "
                         "32-block fallback type; pass allow_fallback=True to accept that, or use Q8_0/Q4_0")
    return fallback


def plan_imatrix(info: GGUFInfo, imatrix: ImportanceMatrix) -> tuple[dict[str, np.ndarray], list[str]]:
    """The importance (mean squared input per channel) of each tensor the quantizer converts,
    checked against the tensor; and the converted tensors the imatrix has no entry for."""
    used, without = {}, []
    for t in info.tensors.values():
        if not quantized_by_llamacpp(t.name, t.shape):
            continue
        if t.name not in imatrix.sums:
            without.append(t.name)
            continue
        values = imatrix.values(t.name)
        want = t.shape[-1] * (t.shape[-3] if len(t.shape) >= 3 else 1)  # llama.cpp: ne[0] * ne[2]
        if values.size != want:
            raise ModelError(f"{info.path}: the importance matrix has {values.size} values for tensor "
                             f"{t.name!r}, whose rows hold {want}: it was computed for another model")
        if not np.isfinite(values).all():
            raise ModelError(f"{info.path}: the importance matrix entry for {t.name!r} is not finite")
        used[t.name] = values
    if not used:
        raise ModelError(f"{info.path}: the importance matrix has no entry for any tensor this file "
                         f"quantizes (its first entries: {imatrix.names[:3]}); it belongs to another "
                         "model (or to the mmproj file)")
    return used, without


def _imatrix_param(llama_cpp, values: dict[str, np.ndarray]):
    """``llama_model_quantize_params.imatrix``: a NULL-terminated ``llama_model_imatrix_data`` array
    (the last element is left zeroed). Returns it with the objects that must outlive the call."""
    if not hasattr(llama_cpp, "llama_model_imatrix_data"):
        raise RuntimeNotAvailable(
            "this llama-cpp-python passes the importance matrix as a C++ std::unordered_map, which "
            "cannot be built from Python; install llama-cpp-python 0.3.36 or newer")
    entry_t = llama_cpp.llama_model_imatrix_data
    entries = (entry_t * (len(values) + 1))()
    keep = [entries]
    for entry, (name, array) in zip(entries, sorted(values.items())):
        array = np.ascontiguousarray(array, dtype=np.float32)
        raw = name.encode()
        keep += [array, raw]
        entry.name = raw
        entry.data = array.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entry.size = array.size
    return ctypes.cast(entries, ctypes.POINTER(entry_t)), keep


def quantize_gguf(src: str | Path, dst: str | Path, quant: str, *, n_threads: int | None = None,
                  allow_fallback: bool = True,
                  imatrix: ImportanceMatrix | str | Path | None = None) -> dict:
    """Quantize ``src`` (an F32/F16 GGUF we wrote) into ``dst``; returns facts for the manifest.

    ``imatrix``: weight the rounding by an importance matrix (object or imatrix file); see the
    module docstring. The facts then hold its summary, the number of tensors it weighted and the
    quantized tensors it had no entry for."""
    q = quant_type(quant)
    if q.written:
        raise ModelError(f"{quant} files are written directly, not quantized; use export_gguf")
    info = read_gguf_info(src)
    fallback = plan_quantization(info, q, allow_fallback=allow_fallback)
    imatrix_facts, weighted = None, {}
    if imatrix is not None:
        from llava_edge.quant.imatrix import as_importance_matrix, summary

        imatrix = as_importance_matrix(imatrix)
        weighted, without = plan_imatrix(info, imatrix)
        imatrix_facts = {**summary(imatrix), "weighted_tensors": len(weighted), "unweighted_tensors": without}
    try:
        import llama_cpp
    except ImportError:
        raise RuntimeNotAvailable(
            "GGUF quantization needs llama-cpp-python (pip install 'llava-edge[gguf]')") from None
    from llava_edge.export.gguf.llamacpp import llama_logs

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = q.ftype
    params.nthread = n_threads or os.cpu_count() or 1
    keep = None
    if weighted:
        params.imatrix, keep = _imatrix_param(llama_cpp, weighted)
    with llama_logs() as logs:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    del keep  # the arrays llama.cpp read from; it copies them before quantizing
    if rc != 0 or not Path(dst).is_file():
        raise ModelError(f"llama.cpp could not quantize {src} to {quant} (code {rc}): "
                         f"{logs.last_error() or 'no message'}")
    out = read_gguf_info(dst)  # what llama.cpp wrote must itself pass the pre-flight check
    facts = {"quantized_from": Path(src).name.rsplit("-", 1)[-1].removesuffix(".gguf"),
             "fallback_tensors": fallback, "tensor_types": tensor_type_counts(out)}
    if imatrix_facts is not None:
        facts["imatrix"] = imatrix_facts
    return facts


def tensor_type_counts(info: GGUFInfo) -> dict[str, int]:
    """How many tensors of each ggml type a file holds, e.g. {"F32": 5, "Q5_0": 15, "Q8_0": 1}."""
    from gguf.constants import GGMLQuantizationType

    counts: dict[str, int] = {}
    for t in info.tensors.values():
        name = GGMLQuantizationType(t.type).name
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))
