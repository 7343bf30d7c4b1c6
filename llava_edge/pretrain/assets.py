"""The committed demo assets: file names, writing (fp16) and loading (fp32), with their checks.

A demo asset folder (``llava_edge/assets/demo``, written by ``python -m llava_edge.pretrain.demo``)::

    vision.safetensors     state dict of LlavaForConditionalGeneration.model.vision_tower
                           (a transformers CLIPVisionModel: keys "embeddings.*", "encoder.*", ...)
    language.safetensors   state dict of a LlamaForCausalLM ("model.*" + "lm_head.weight"); "model.X"
                           is LLaVA's "model.language_model.X", "lm_head.weight" is LLaVA's own
    tokenizer.json         the demo BPE; every later run uses it, never a retrained one
    pretrain.json          seed, command, configuration, metrics and the sha256 of the three files

Weights are stored in fp16 to keep the package small and upcast to fp32 on load.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from llava_edge.errors import ModelError
from llava_edge.model.tokenizer import Tokenizer

DEMO_ASSETS = Path(__file__).resolve().parent.parent / "assets" / "demo"
PRESET = "demo"

VISION_FILE = "vision.safetensors"
LANGUAGE_FILE = "language.safetensors"
TOKENIZER_FILE = "tokenizer.json"
RECORD_FILE = "pretrain.json"
WEIGHT_FILES = (VISION_FILE, LANGUAGE_FILE)
HASHED_FILES = (VISION_FILE, LANGUAGE_FILE, TOKENIZER_FILE)

REGENERATE = "python -m llava_edge.pretrain.demo --out {folder} --seed 0"


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_record(folder: str | Path = DEMO_ASSETS) -> dict:
    """``pretrain.json`` of an asset folder, after checking every file it lists is the one it hashed."""
    folder = Path(folder)
    path = folder / RECORD_FILE
    if not path.is_file():
        raise ModelError(f"{folder}: no {RECORD_FILE}; not a demo asset folder "
                         f"(write one with `{REGENERATE.format(folder=folder)}`)")
    record = json.loads(path.read_text())
    for name, digest in record.get("files", {}).items():
        file = folder / name
        if not file.is_file():
            raise ModelError(f"{file}: missing; {RECORD_FILE} lists it. "
                             f"Regenerate with `{REGENERATE.format(folder=folder)}`")
        if file_sha256(file) != digest:
            raise ModelError(f"{file}: sha256 differs from {path}; the file was changed after "
                             f"pretraining. Regenerate with `{REGENERATE.format(folder=folder)}`")
    return record


def load_tokenizer(folder: str | Path = DEMO_ASSETS) -> Tokenizer:
    """The committed demo tokenizer (the exact ``tokenizer.json`` the components were trained with)."""
    from tokenizers import Tokenizer as HFTokenizer

    path = Path(folder) / TOKENIZER_FILE
    if not path.is_file():
        raise ModelError(f"{path}: missing; regenerate with `{REGENERATE.format(folder=folder)}`")
    return Tokenizer(HFTokenizer.from_file(str(path)), source=str(path))


def save_weights(state: dict, path: str | Path) -> None:
    """Write a state dict as fp16 safetensors (floating tensors only are cast).

    The header's metadata is the single ``format`` entry: safetensors writes metadata from a hash
    map, so with several entries their order, and the file's bytes, change from run to run."""
    import torch
    from safetensors.torch import save_file

    half = {k: (v.detach().to(torch.float16) if v.is_floating_point() else v.detach()).contiguous()
            for k, v in state.items()}
    save_file(half, str(path), metadata={"format": "pt"})


def load_weights(path: str | Path) -> dict:
    """A state dict from safetensors, floating tensors upcast to fp32."""
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: missing; regenerate with `{REGENERATE.format(folder=path.parent)}`")
    return {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in load_file(str(path)).items()}


def demo_config(tokenizer: Tokenizer):
    """The LlavaConfig every demo component is shaped by (the ``demo`` preset, this tokenizer)."""
    from llava_edge.model.build import llava_config
    from llava_edge.model.presets import get_preset

    return llava_config(get_preset(PRESET), tokenizer)


def load_into(module, state: dict, what: str, path: Path) -> None:
    """``module.load_state_dict(state)`` with every key and shape required to match, or a clear error."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        details = "; ".join(f"{label}: {keys[:3]}{' ...' if len(keys) > 3 else ''}"
                            for label, keys in (("missing", missing), ("unexpected", unexpected),
                                                ("wrong shape", wrong)) if keys)
        raise ModelError(f"{path}: does not fit the {PRESET} preset's {what} ({details}). "
                         f"Regenerate with `{REGENERATE.format(folder=path.parent)}`")
    module.load_state_dict(state, strict=True)


def load_vision_tower(folder: str | Path = DEMO_ASSETS, tokenizer: Tokenizer | None = None):
    """The pretrained ``CLIPVisionModel`` (fp32, eval)."""
    from transformers import CLIPVisionModel

    folder = Path(folder)
    config = demo_config(tokenizer or load_tokenizer(folder))
    tower = CLIPVisionModel(config.vision_config)
    load_into(tower, load_weights(folder / VISION_FILE), "vision tower", folder / VISION_FILE)
    return tower.eval()


def load_language_model(folder: str | Path = DEMO_ASSETS, tokenizer: Tokenizer | None = None):
    """The pretrained ``LlamaForCausalLM`` (fp32, eval)."""
    from transformers import LlamaForCausalLM

    folder = Path(folder)
    config = demo_config(tokenizer or load_tokenizer(folder))
    lm = LlamaForCausalLM(config.text_config)
    load_into(lm, load_weights(folder / LANGUAGE_FILE), "language model", folder / LANGUAGE_FILE)
    return lm.eval()
