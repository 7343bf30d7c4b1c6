"""Quantize a GGUF file with llama.cpp's own quantizer (``llama_model_quantize`` via llama-cpp-python).

The quant name is validated first, and every tensor llama.cpp would quantize is checked against the
type's block size *before* the quantizer runs:

* rows (ggml ``ne[0]``) not a multiple of 32: an error naming the tensor (no llama.cpp type applies);
* K-quants (Q4_K_M, Q5_K_M) on rows that are a multiple of 32 but not of 256 — every tensor of the
  ``tiny`` preset — use llama.cpp's documented per-tensor fallback (q4_K -> q5_0, q5_K -> q5_1,
  q6_K -> q8_0). The tensors that fall back are returned, and recorded in the bundle manifest, so a
  "Q4_K_M" file of a small model is not mistaken for a real K-quant; ``allow_fallback=False`` makes
  them an error instead.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from llava_edge.errors import ModelError, RuntimeNotAvailable
from llava_edge.export.gguf import names as N
from llava_edge.export.gguf.check import GGUFInfo, read_gguf_info


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


def quantize_gguf(src: str | Path, dst: str | Path, quant: str, *, n_threads: int | None = None,
                  allow_fallback: bool = True) -> dict:
    """Quantize ``src`` (an F32/F16 GGUF we wrote) into ``dst``; returns facts for the manifest."""
    q = quant_type(quant)
    if q.written:
        raise ModelError(f"{quant} files are written directly, not quantized; use export_gguf")
    info = read_gguf_info(src)
    fallback = plan_quantization(info, q, allow_fallback=allow_fallback)
    try:
        import llama_cpp
    except ImportError:
        raise RuntimeNotAvailable(
            "GGUF quantization needs llama-cpp-python (pip install 'llava-edge[gguf]')") from None
    from llava_edge.export.gguf.llamacpp import llama_logs

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = q.ftype
    params.nthread = n_threads or os.cpu_count() or 1
    with llama_logs() as logs:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not Path(dst).is_file():
        raise ModelError(f"llama.cpp could not quantize {src} to {quant} (code {rc}): "
                         f"{logs.last_error() or 'no message'}")
    out = read_gguf_info(dst)  # what llama.cpp wrote must itself pass the pre-flight check
    return {"quantized_from": Path(src).name.rsplit("-", 1)[-1].removesuffix(".gguf"),
            "fallback_tensors": fallback, "tensor_types": tensor_type_counts(out)}


def tensor_type_counts(info: GGUFInfo) -> dict[str, int]:
    """How many tensors of each ggml type a file holds, e.g. {"F32": 5, "Q5_0": 15, "Q8_0": 1}."""
    from gguf.constants import GGMLQuantizationType

    counts: dict[str, int] = {}
    for t in info.tensors.values():
        name = GGMLQuantizationType(t.type).name
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))
