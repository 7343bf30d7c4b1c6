"""What the GGUF writer reads from a checkpoint folder: config facts and tensors, one at a time.

:class:`Checkpoint` parses the safetensors headers (8-byte length + JSON) itself and reads each tensor
with one positioned read into a fresh buffer when it is asked for, so converting a 7B model holds
about one tensor (plus its converted copy) in memory. It does not memory-map the files: pages of a
mapping stay in the process's resident set until it is unmapped, which would make a streaming
conversion *look* like it holds the whole model; a plain read leaves them in the page cache, which the
kernel can drop. BF16 (which numpy lacks) is widened to float32 on the way. No torch, no transformers.

:class:`TextFacts` / :class:`VisionFacts` are the hyper-parameters the files need, taken from
``config.json`` with a clear error for every architecture feature the files cannot express.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llava_edge.errors import ModelError

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
}


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


class Checkpoint:
    """All tensors of the ``*.safetensors`` files of a folder, by name, read lazily."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.entries: dict[str, TensorEntry] = {}
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise ModelError(f"{self.folder}: no .safetensors weights")
        for path in files:
            for name, entry in _read_header(path).items():
                if name in self.entries:
                    raise ModelError(f"{path}: tensor {name!r} also appears in "
                                     f"{self.entries[name].file.name}")
                self.entries[name] = entry

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def dtype(self, name: str) -> str:
        return self.entries[name].dtype

    def read(self, name: str) -> np.ndarray:
        """The tensor as a numpy array (BF16 widened to float32); a fresh buffer, not a mapping."""
        e = self.entries[name]
        count = int(np.prod(e.shape, dtype=np.int64)) if e.shape else 1
        with open(e.file, "rb") as f:
            f.seek(e.begin)
            array = np.fromfile(f, dtype=_ST_DTYPES[e.dtype], count=count)
        if array.size != count:
            raise ModelError(f"{e.file}: tensor {name!r} is cut short (file truncated?)")
        if e.dtype == "BF16":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        return array.reshape(e.shape)


def _read_header(path: Path) -> dict[str, TensorEntry]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ModelError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100 << 20):
            raise ModelError(f"{path}: not a safetensors file (header length {n} does not fit the file)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelError(f"{path}: corrupt safetensors header ({exc})") from None
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = info.get("dtype")
        if dtype not in _ST_DTYPES:
            raise ModelError(f"{path}: tensor {name!r} has dtype {dtype!r}, which the GGUF writer "
                             f"cannot read (supported: {', '.join(_ST_DTYPES)})")
        begin, end = info["data_offsets"]
        if base + end > size:
            raise ModelError(f"{path}: tensor {name!r} ends past the end of the file (truncated?)")
        out[name] = TensorEntry(path, dtype, tuple(info["shape"]), base + begin, base + end)
    return out


# --------------------------------------------------------------------------------------------------
# Config facts
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextFacts:
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    context_length: int
    vocab_size: int
    tie_word_embeddings: bool


@dataclass(frozen=True)
class VisionFacts:
    image_size: int
    patch_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    layer_norm_eps: float
    use_gelu: bool
    projection_dim: int  # = the LLM width: the projector's output
    feature_layer: int  # index into HF hidden_states (0 = embeddings), non-negative
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    projector_type: str = "mlp"

    @property
    def n_layers_stored(self) -> int:
        """Layers llama.cpp runs: those up to the feature layer (the rest would be dead weight)."""
        return self.feature_layer

    @property
    def feature_layers(self) -> list[int]:
        return [self.feature_layer]

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def read_config(folder: str | Path) -> dict:
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{folder}: no config.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: not valid JSON ({exc})") from None


def text_facts(config: dict, source: str = "config.json") -> TextFacts:
    t = config.get("text_config") or {}
    if t.get("model_type", "llama") != "llama":
        raise ModelError(f"{source}: text model_type {t.get('model_type')!r}; the GGUF export writes "
                         "Llama-family decoders (model_type 'llama') only")
    if t.get("hidden_act", "silu") != "silu":
        raise ModelError(f"{source}: text hidden_act {t['hidden_act']!r}; llama.cpp's llama arch uses silu")
    for flag in ("attention_bias", "mlp_bias"):
        if t.get(flag):
            raise ModelError(f"{source}: text_config.{flag}=true has no place in the llama GGUF layout")
    rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in (None, "default"):
        raise ModelError(f"{source}: rope type {rope_type!r} is not supported by the GGUF export "
                         "(only plain RoPE); convert without rope scaling")
    heads = t["num_attention_heads"]
    hidden = t["hidden_size"]
    tie = bool(t.get("tie_word_embeddings", config.get("tie_word_embeddings", False)))
    return TextFacts(
        hidden_size=hidden, intermediate_size=t["intermediate_size"],
        n_layers=t["num_hidden_layers"], n_heads=heads,
        n_kv_heads=t.get("num_key_value_heads") or heads,
        head_dim=t.get("head_dim") or hidden // heads,
        rms_norm_eps=float(t.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope.get("rope_theta", t.get("rope_theta", 10000.0))),
        context_length=t.get("max_position_embeddings", 2048),
        vocab_size=t["vocab_size"], tie_word_embeddings=tie,
    )


def vision_facts(config: dict, preprocess: dict, source: str = "config.json") -> VisionFacts:
    v = config.get("vision_config") or {}
    if v.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise ModelError(f"{source}: vision model_type {v.get('model_type')!r}; the mmproj export "
                         "writes CLIP vision towers only")
    act = v.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise ModelError(f"{source}: vision hidden_act {act!r}; llama.cpp's CLIP runs quick_gelu or gelu")
    if config.get("projector_hidden_act", "gelu") != "gelu":
        raise ModelError(f"{source}: projector_hidden_act {config['projector_hidden_act']!r}; the "
                         "llama.cpp 'mlp' projector is Linear-GELU-Linear")
    if not config.get("multimodal_projector_bias", True):
        raise ModelError(f"{source}: a projector without biases cannot be written as a llama.cpp "
                         "'mlp' projector (it requires mm.0.bias and mm.2.bias)")
    strategy = config.get("vision_feature_select_strategy", "default")
    if strategy != "default":
        raise ModelError(f"{source}: vision_feature_select_strategy={strategy!r}; llama.cpp's llava "
                         "graph always drops the CLS token ('default')")
    n_layers = v["num_hidden_layers"]
    layer = config.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise ModelError(f"{source}: vision_feature_layer={layer!r}; the mmproj export supports a "
                         "single feature layer (LLaVA-1.5 uses -2)")
    feature = layer if layer >= 0 else n_layers + 1 + layer  # hidden_states has n_layers + 1 entries
    if not 0 < feature <= n_layers:
        raise ModelError(f"{source}: vision_feature_layer={layer} is outside the {n_layers}-layer tower")
    return VisionFacts(
        image_size=v["image_size"], patch_size=v["patch_size"], hidden_size=v["hidden_size"],
        intermediate_size=v["intermediate_size"], n_layers=n_layers,
        n_heads=v["num_attention_heads"], layer_norm_eps=float(v.get("layer_norm_eps", 1e-5)),
        use_gelu=act == "gelu", projection_dim=config["text_config"]["hidden_size"],
        feature_layer=feature, image_mean=tuple(preprocess["mean"]), image_std=tuple(preprocess["std"]),
    )
