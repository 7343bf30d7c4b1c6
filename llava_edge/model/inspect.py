"""Describe a model folder without loading it: parameters, dtypes and sizes per component."""

from __future__ import annotations

import json
import struct
from collections import defaultdict
from pathlib import Path

from llava_edge.errors import ModelError
from llava_edge.model.loading import check_model_folder

# Which component a weight belongs to, by the first matching key fragment.
COMPONENTS = (
    ("vision_tower", "vision tower"),
    ("multi_modal_projector", "projector"),
    ("embed_tokens", "embeddings"),
    ("lm_head", "lm head"),
    ("language_model", "decoder"),
)


def read_safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes), read without torch."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                raise ValueError(f"header length {n} is implausible")
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError) as exc:
        raise ModelError(f"{path}: not a readable safetensors file ({exc})") from None
    header.pop("__metadata__", None)
    return header


def component_of(name: str) -> str:
    for fragment, component in COMPONENTS:
        if fragment in name:
            return component
    return "other"


def inspect_model(path: str | Path) -> dict:
    """Summary of a checkpoint folder: per component, parameter count, dtypes and bytes."""
    path = check_model_folder(path)
    config = json.loads((path / "config.json").read_text())
    parts: dict = defaultdict(lambda: {"parameters": 0, "tensors": 0, "dtypes": set()})
    for file in sorted(path.glob("*.safetensors")):
        for name, meta in read_safetensors_header(file).items():
            count = 1
            for dim in meta["shape"]:
                count *= dim
            part = parts[component_of(name)]
            part["parameters"] += count
            part["tensors"] += 1
            part["dtypes"].add(meta["dtype"])
    files = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}
    return {
        "path": str(path),
        "kind": "model folder",
        "architecture": (config.get("architectures") or ["?"])[0],
        "image_size": config.get("vision_config", {}).get("image_size"),
        "text_hidden_size": config.get("text_config", {}).get("hidden_size"),
        "text_layers": config.get("text_config", {}).get("num_hidden_layers"),
        "vocab_size": config.get("text_config", {}).get("vocab_size"),
        "components": {k: {**v, "dtypes": sorted(v["dtypes"])} for k, v in parts.items()},
        "parameters": sum(v["parameters"] for v in parts.values()),
        "files": files,
        "bytes": sum(files.values()),
    }
