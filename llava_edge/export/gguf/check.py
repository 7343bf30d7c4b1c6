"""Pre-flight checks of GGUF files, before llama.cpp is handed anything it could crash on.

:func:`read_gguf_info` parses a GGUF header (metadata and tensor infos) in Python and checks that the
file holds every byte its tensor table promises; :func:`check_pair` checks that an mmproj file fits
its language model. Truncated, foreign or mismatched files get a :class:`ModelError` saying what is
wrong, instead of a llama.cpp abort that takes the process down. Needs numpy only (and the block
sizes of gguf-py's constants table).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llava_edge.errors import ModelError
from llava_edge.export.gguf import names as N

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",  # gguf_type
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_KEEP_ARRAY = 64  # arrays longer than this (token lists) are recorded by length only


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (rows last is ggml's ne[0])
    type: int  # ggml_type
    offset: int  # relative to the data section
    nbytes: int


@dataclass
class GGUFInfo:
    path: Path
    version: int
    metadata: dict = field(default_factory=dict)
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    data_start: int = 0

    @property
    def arch(self) -> str:
        return self.metadata.get(N.KEY_ARCH, "")

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)


class _Reader:
    def __init__(self, f, path: Path, size: int):
        self.f, self.path, self.size = f, path, size

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise ModelError(f"{self.path}: GGUF header is cut short at byte {self.f.tell()} "
                             "(the file is truncated; re-export or re-download it)")
        return data

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        if n > self.size:
            raise ModelError(f"{self.path}: corrupt GGUF header (a string of {n} bytes)")
        return self.read(n).decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, count = self.unpack("<I"), self.unpack("<Q")
            if count > self.size:
                raise ModelError(f"{self.path}: corrupt GGUF header (an array of {count} items)")
            if itype in _SCALARS and itype != 7:
                fmt = _SCALARS[itype]
                raw = self.read(struct.calcsize(fmt) * count)
                items = np.frombuffer(raw, dtype=np.dtype(fmt))
                return items.tolist() if count <= _KEEP_ARRAY else ("<array>", count)
            items = [self.value(itype) for _ in range(count)]
            return items if count <= _KEEP_ARRAY else ("<array>", count)
        raise ModelError(f"{self.path}: corrupt GGUF header (unknown value type {vtype})")


def read_gguf_info(path: str | Path, *, what: str = "GGUF file") -> GGUFInfo:
    """Parse and check a GGUF file's header and tensor table (no tensor data is read)."""
    from gguf.constants import GGML_QUANT_SIZES

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such {what}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        r = _Reader(f, path, size)
        magic = f.read(4)
        if magic != N.GGUF_MAGIC:
            raise ModelError(f"{path}: not a GGUF file (it starts with {magic!r}, not {N.GGUF_MAGIC!r}); "
                             f"expected a {what}")
        version = r.unpack("<I")
        if version not in N.GGUF_VERSIONS:
            raise ModelError(f"{path}: GGUF version {version} is not supported "
                             f"(this llama.cpp reads versions {N.GGUF_VERSIONS})")
        n_tensors, n_kv = r.unpack("<Q"), r.unpack("<Q")
        if n_tensors > size or n_kv > size:
            raise ModelError(f"{path}: corrupt GGUF header ({n_tensors} tensors, {n_kv} keys)")
        info = GGUFInfo(path, version)
        for _ in range(n_kv):
            key = r.string()
            info.metadata[key] = r.value(r.unpack("<I"))
        for _ in range(n_tensors):
            name = r.string()
            n_dims = r.unpack("<I")
            if not 1 <= n_dims <= 4:
                raise ModelError(f"{path}: tensor {name!r} has {n_dims} dimensions (corrupt header)")
            ne = [r.unpack("<Q") for _ in range(n_dims)]
            ttype, offset = r.unpack("<I"), r.unpack("<Q")
            if ttype not in GGML_QUANT_SIZES:
                raise ModelError(f"{path}: tensor {name!r} has unknown ggml type {ttype}")
            block, type_size = GGML_QUANT_SIZES[ttype]
            if ne[0] % block:
                raise ModelError(f"{path}: tensor {name!r} rows of {ne[0]} are not a multiple of its "
                                 f"type's block size {block} (corrupt file)")
            nbytes = int(np.prod(ne, dtype=np.int64)) // block * type_size
            info.tensors[name] = TensorInfo(name, tuple(reversed(ne)), ttype, offset, nbytes)
        alignment = int(info.metadata.get("general.alignment", 32))
        info.data_start = (f.tell() + alignment - 1) // alignment * alignment
    end = max((t.offset + t.nbytes for t in info.tensors.values()), default=0) + info.data_start
    if end > size:
        raise ModelError(f"{path}: the file is {size} bytes but its tensors need {end}: it is truncated "
                         "(an interrupted copy or download?); re-export or re-download it")
    return info


def check_text_model(info: GGUFInfo) -> int:
    """The width of a language-model GGUF; error for mmproj or metadata-less files."""
    arch = info.arch
    if not arch:
        raise ModelError(f"{info.path}: GGUF file without general.architecture")
    if arch == N.MMPROJ_ARCH:
        raise ModelError(f"{info.path}: this is a vision projector (mmproj) file, not a language model")
    width = info.get(f"{arch}.embedding_length")
    if not isinstance(width, int):
        raise ModelError(f"{info.path}: no {arch}.embedding_length; not a language-model GGUF")
    return width


def check_mmproj(info: GGUFInfo) -> None:
    if info.arch != N.MMPROJ_ARCH:
        raise ModelError(f"{info.path}: architecture {info.arch!r}; an mmproj file has architecture "
                         f"{N.MMPROJ_ARCH!r} (was the language model given as the projector?)")
    if not info.get("clip.has_vision_encoder", False):
        raise ModelError(f"{info.path}: the mmproj file has no vision encoder")
    ptype = info.get("clip.projector_type", "")
    if ptype != "mlp":
        raise ModelError(f"{info.path}: projector type {ptype!r}; llava-edge runs LLaVA 'mlp' projectors")
    for name in ("mm.0.weight", "mm.0.bias", "mm.2.weight", "mm.2.bias", "v.patch_embd.weight"):
        if name not in info.tensors:
            raise ModelError(f"{info.path}: the mmproj file lacks tensor {name!r}")


def mmproj_output_width(info: GGUFInfo) -> int:
    return info.tensors["mm.2.weight"].shape[0]


def mmproj_n_tokens(info: GGUFInfo) -> int:
    return (info.get("clip.vision.image_size") // info.get("clip.vision.patch_size")) ** 2


def check_pair(model: GGUFInfo, mmproj: GGUFInfo) -> None:
    """An mmproj must produce rows as wide as the language model's embeddings."""
    width = check_text_model(model)
    check_mmproj(mmproj)
    out = mmproj_output_width(mmproj)
    if out != width:
        raise ModelError(f"{mmproj.path}: the projector outputs {out}-wide image embeddings but the "
                         f"language model {model.path.name} is {width} wide; the two files come from "
                         "different models")


def has_cls_token(mmproj: GGUFInfo) -> bool:
    """CLIP-style towers carry a class embedding; llama.cpp's CLS-order defect applies to them."""
    return "v.class_embd" in mmproj.tensors
