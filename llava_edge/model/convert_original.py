"""Convert a checkpoint of the original LLaVA repository (haotian-liu/LLaVA) to our model folder.

Users keep asking how to get a fine-tuned LLaVA out of the original training code. Its outputs:

* a merged checkpoint: Llama weights (``model.layers.*``, ``lm_head``) plus ``model.mm_projector.*``
  (and ``model.vision_tower.vision_tower.*`` when the tower was saved), config with ``mm_*`` keys;
* a stage-1 folder: only ``mm_projector.bin``; the LLM is the base model (``--base``);
* a LoRA stage-2 folder: ``adapter_config.json`` + ``adapter_model.*`` + ``non_lora_trainables.bin``
  (projector) on top of the base model (``--base``), merged here as ``W + (alpha/r) B A``.

The CLIP tower is rarely in those folders (LLaVA loads it from the hub); ``--vision-tower`` names a
local CLIP folder. Pickled ``.bin`` files are read with ``torch.load(weights_only=True)``: tensors
only, no code. The result is an ordinary ``save_pretrained`` folder (``model_type: llava``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from llava_edge.errors import ModelError

PROJECTOR_PREFIXES = ("model.mm_projector.", "base_model.model.model.mm_projector.")
TOWER_PREFIX = "model.vision_tower.vision_tower."
# LLaVA's nn.Sequential indices of mlp2x_gelu -> transformers' projector names.
PROJECTOR_NAMES = {"0": "linear_1", "2": "linear_2"}


def _read_tensors(path: Path) -> dict:
    """Tensors of a .safetensors or (weights-only) .bin file."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"{path}: cannot be read as a tensors-only file ({exc})") from None


def _read_folder_weights(folder: Path, skip=("mm_projector.bin", "non_lora_trainables.bin")) -> dict:
    files = sorted(folder.glob("*.safetensors")) or sorted(
        p for p in folder.glob("*.bin") if p.name not in skip and not p.name.startswith("adapter_"))
    files = [p for p in files if not p.name.startswith("adapter_")]
    weights: dict = {}
    for f in files:
        weights.update(_read_tensors(f))
    return weights


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: cannot read ({exc})") from None


def _projector_state(weights: dict, source: Path) -> dict:
    out = {}
    for key, value in weights.items():
        for prefix in PROJECTOR_PREFIXES:
            if key.startswith(prefix):
                index, _, param = key[len(prefix):].partition(".")
                if index not in PROJECTOR_NAMES:
                    raise ModelError(f"{source}: projector key {key!r} is not mlp2x_gelu's layout "
                                     "(only mlp2x_gelu projectors are converted)")
                out[f"{PROJECTOR_NAMES[index]}.{param}"] = value
    return out


def _merge_lora(llm: dict, adapter_dir: Path) -> dict:
    """Fold a peft LoRA adapter into the base Llama weights (keys without the ``model.`` prefix)."""
    config = _read_json(adapter_dir / "adapter_config.json")
    if config.get("use_dora"):
        raise ModelError(f"{adapter_dir}: DoRA adapters are not supported; merge it with peft first")
    r, alpha = config["r"], config["lora_alpha"]
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    files = [adapter_dir / n for n in ("adapter_model.safetensors", "adapter_model.bin")]
    file = next((f for f in files if f.is_file()), None)
    if file is None:
        raise ModelError(f"{adapter_dir}: adapter_config.json but no adapter_model.safetensors/.bin")
    adapter = _read_tensors(file)
    merged = 0
    for key, a in adapter.items():
        if ".lora_A." not in key:
            continue
        b = adapter[key.replace(".lora_A.", ".lora_B.")]
        target = key.split("base_model.model.", 1)[-1].replace(".lora_A.weight", ".weight")
        target = target.removeprefix("model.")
        if target not in llm:
            raise ModelError(f"{file}: LoRA targets {target!r}, which the base model does not have")
        w = llm[target]
        llm[target] = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
        merged += 1
    if not merged:
        raise ModelError(f"{file}: no LoRA weights found")
    return llm


def _tower_state(weights: dict, vision_tower: Path | None, source: Path) -> dict:
    tower = {k[len(TOWER_PREFIX):]: v for k, v in weights.items() if k.startswith(TOWER_PREFIX)}
    if not tower and vision_tower is not None:
        tower = _read_folder_weights(Path(vision_tower))
    if not tower:
        raise ModelError(f"{source}: the checkpoint holds no vision tower; pass --vision-tower PATH "
                         "to a local copy of the CLIP model its config names (we never download)")
    # CLIPModel / CLIPVisionModel folders prefix the tower with vision_model.; drop the text side.
    return {k.removeprefix("vision_model."): v for k, v in tower.items()
            if not k.startswith(("text_model.", "visual_projection", "text_projection", "logit_scale"))}


def is_original_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` looks like an original-LLaVA output (config with ``mm_*`` keys and a
    ``llava_llama``-style model type, a stage-1 ``mm_projector.bin``, or a LoRA adapter folder)."""
    path = Path(path)
    if not path.is_dir():
        return False
    if any((path / n).is_file() for n in ("mm_projector.bin", "non_lora_trainables.bin", "adapter_config.json")):
        return True
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") != "llava" and any(
        k.startswith("mm_") for k in config)


def convert_original(src: str | Path, out: str | Path, *, base: str | Path | None = None,
                     vision_tower: str | Path | None = None) -> Path:
    """Write ``out``: a llava-edge/transformers LLaVA folder made from an original-LLaVA checkpoint."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from llava_edge.model.build import save_checkpoint
    from llava_edge.model.tokenizer import IMAGE, PAD, Tokenizer

    src = Path(src)
    if not (src / "config.json").is_file() and not (src / "adapter_config.json").is_file():
        raise ModelError(f"{src}: no config.json or adapter_config.json; not an original LLaVA checkpoint")
    weights = _read_folder_weights(src)
    projector_file = next((src / n for n in ("mm_projector.bin", "non_lora_trainables.bin")
                           if (src / n).is_file()), None)
    projector_weights = _read_tensors(projector_file) if projector_file else weights
    is_adapter = (src / "adapter_config.json").is_file()
    has_llm = any(k.startswith("model.layers.") for k in weights)
    if not has_llm or is_adapter:
        if base is None:
            raise ModelError(f"{src}: holds no language-model weights (stage-1 projector or LoRA "
                             "adapter); pass --base PATH to the local base LLM it was trained on")
        base = Path(base)
        llm_config_dir, weights_llm = base, _read_folder_weights(base)
    else:
        llm_config_dir, weights_llm = src, weights
    llm = {k.removeprefix("model."): v for k, v in weights_llm.items()
           if (k.startswith("model.") and not k.startswith(("model.mm_projector", "model.vision_tower")))}
    lm_head = weights_llm.get("lm_head.weight")
    if lm_head is None:
        raise ModelError(f"{llm_config_dir}: no lm_head.weight in the language model weights")
    if is_adapter:
        llm = _merge_lora(llm, src)

    cfg = _read_json((src if (src / "config.json").is_file() else llm_config_dir) / "config.json")
    if cfg.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise ModelError(f"{src}: projector type {cfg.get('mm_projector_type')!r} is not supported "
                         "(mlp2x_gelu, LLaVA-1.5's, is)")
    projector = _projector_state(projector_weights, projector_file or src)
    if not projector:
        raise ModelError(f"{src}: no mm_projector weights found")
    tower = _tower_state(weights, vision_tower, src)

    tokenizer = Tokenizer.from_folder(src if (src / "tokenizer.json").is_file() else llm_config_dir) \
        if ((src / "tokenizer.json").is_file() or (llm_config_dir / "tokenizer.json").is_file()) else None
    if tokenizer is None:
        raise ModelError(f"{src}: no tokenizer.json here or in the base model folder")
    missing = [t for t in (IMAGE, PAD) if tokenizer.backend.token_to_id(t) is None]
    if missing:  # LLaVA inserted images by a sentinel id; transformers needs a real token
        from tokenizers import AddedToken

        tokenizer.backend.add_special_tokens([AddedToken(t, special=True) for t in missing])
        tokenizer = Tokenizer(tokenizer.backend, source=tokenizer.source)

    vision_cfg_src = Path(vision_tower) / "config.json" if vision_tower else None
    vcfg = _read_json(vision_cfg_src) if vision_cfg_src and vision_cfg_src.is_file() else cfg.get("llava_edge_vision", {})
    vcfg = vcfg.get("vision_config", vcfg)
    text_keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta")
    vocab = max(llm["embed_tokens.weight"].shape[0], tokenizer.vocab_size)
    text_config = LlamaConfig(**{k: cfg[k] for k in text_keys if k in cfg}, vocab_size=vocab,
                              bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                              pad_token_id=tokenizer.pad_id, tie_word_embeddings=False)
    vision_keys = ("image_size", "patch_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                   "num_attention_heads", "projection_dim", "layer_norm_eps", "hidden_act")
    vision_config = CLIPVisionConfig(**{k: vcfg[k] for k in vision_keys if k in vcfg})
    select = cfg.get("mm_vision_select_feature", "patch")
    config = LlavaConfig(vision_config=vision_config, text_config=text_config,
                         image_token_index=tokenizer.image_id,
                         vision_feature_layer=cfg.get("mm_vision_select_layer", -2),
                         vision_feature_select_strategy="default" if select == "patch" else "full",
                         projector_hidden_act="gelu", multimodal_projector_bias=True,
                         tie_word_embeddings=False, pad_token_id=tokenizer.pad_id)
    model = LlavaForConditionalGeneration(config).eval()
    embed, head = llm.pop("embed_tokens.weight"), lm_head
    if embed.shape[0] < vocab:  # new token rows: the mean embedding, as llava-hf's converter does
        extra = vocab - embed.shape[0]
        embed = torch.cat([embed, embed.float().mean(0, keepdim=True).to(embed.dtype).expand(extra, -1)])
        head = torch.cat([head, head.float().mean(0, keepdim=True).to(head.dtype).expand(extra, -1)])
    llm["embed_tokens.weight"] = embed
    for module, state in ((model.model.language_model, llm), (model.model.vision_tower, tower),
                          (model.model.multi_modal_projector, projector), (model.lm_head, {"weight": head})):
        result = module.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
        problems = [k for k in result.missing_keys if "rotary" not in k] + list(result.unexpected_keys)
        if problems:
            raise ModelError(f"{src}: weights do not match the architecture the config describes "
                             f"({type(module).__name__}: {problems[:4]})")
    from llava_edge.model.image import CLIP_MEAN, CLIP_STD, PreprocessConfig

    preprocess = PreprocessConfig(size=vision_config.image_size, mean=CLIP_MEAN, std=CLIP_STD,
                                  pad=cfg.get("image_aspect_ratio", "pad") == "pad")
    return save_checkpoint(model, tokenizer, out, preprocess=preprocess,
                           extra={"converted_from": str(src.resolve())})
