"""Load a LLaVA checkpoint folder from local disk: never a hub, never a silent re-initialisation."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from llava_edge.errors import ModelError
from llava_edge.model.image import PreprocessConfig
from llava_edge.model.templates import ChatTemplate, get_template
from llava_edge.model.tokenizer import Tokenizer

DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class ModelInfo:
    """What a runtime needs to know about a checkpoint besides its weights."""

    path: Path
    template: ChatTemplate
    preprocess: PreprocessConfig
    n_image_tokens: int
    image_token_id: int


def check_model_folder(path: str | Path) -> Path:
    """A local folder holding a LLaVA ``config.json``, or a clear error saying what is wrong."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelError(
            f"{path}: no such model folder (llava-edge only loads local folders; it never "
            "downloads — create one with `llava-edge init --preset tiny OUT`)"
        )
    if not path.is_dir():
        raise ModelError(f"{path}: is a file; expected a model folder holding config.json")
    config = path / "config.json"
    if not config.is_file():
        raise ModelError(f"{path}: no config.json; not a transformers checkpoint folder")
    try:
        data = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{config}: not valid JSON ({exc})") from None
    if data.get("model_type") != "llava":
        raise ModelError(
            f"{config}: model_type is {data.get('model_type')!r}; llava-edge loads LLaVA "
            "checkpoints (model_type 'llava', LlavaForConditionalGeneration)"
        )
    if not any(path.glob("*.safetensors")):
        raise ModelError(f"{path}: no .safetensors weights (pickled .bin weights are not loaded)")
    return path


def read_model_info(path: str | Path) -> ModelInfo:
    """Template, preprocessing and image-token facts of a checkpoint, without loading weights."""
    path = check_model_folder(path)
    config = json.loads((path / "config.json").read_text())
    sidecar_path = path / "llava_edge.json"
    sidecar = json.loads(sidecar_path.read_text()) if sidecar_path.is_file() else {}
    if "preprocess" in sidecar:
        preprocess = PreprocessConfig.from_dict(sidecar["preprocess"])
    else:
        preprocess = PreprocessConfig.from_pretrained_folder(path)
    vision = config.get("vision_config", {})
    n_tokens = (vision.get("image_size", 336) // vision.get("patch_size", 14)) ** 2
    if config.get("vision_feature_select_strategy", "default") == "full":
        n_tokens += 1
    return ModelInfo(
        path=path,
        template=get_template(sidecar.get("template", "vicuna_v1")),
        preprocess=preprocess,
        n_image_tokens=n_tokens,
        image_token_id=config.get("image_token_index", config.get("image_token_id")),
    )


def load_tokenizer(path: str | Path) -> Tokenizer:
    return Tokenizer.from_folder(check_model_folder(path))


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise ModelError(f"unknown dtype {name!r}; choose one of: {', '.join(DTYPES)}")
    return getattr(torch, name)


def load_model(path: str | Path, *, dtype: str = "float32", device: str = "cpu"):
    """``LlavaForConditionalGeneration`` from a local folder; refuses newly initialised weights."""
    from transformers import LlavaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    path = check_model_folder(path)
    hf_logging.disable_progress_bar()  # a tiny model loads in milliseconds; a 7B one says so below
    model, info = LlavaForConditionalGeneration.from_pretrained(
        path, local_files_only=True, dtype=torch_dtype(dtype), output_loading_info=True,
    )
    missing = [k for k in info.get("missing_keys", ()) if "rotary_emb" not in k]
    if missing:
        raise ModelError(
            f"{path}: {len(missing)} weights are missing from the checkpoint and would be "
            f"randomly initialised (first: {missing[:3]}); the folder is incomplete or was "
            "written by an incompatible transformers version"
        )
    return model.to(device).eval()
