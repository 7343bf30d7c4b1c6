"""Build a LLaVA model from a preset and write it as a plain transformers checkpoint folder.

The folder is what ``save_pretrained`` writes (config, safetensors, tokenizer, processor) plus
``llava_edge.json`` (chat template name and preprocessing), so transformers, vLLM and our runtimes
all load it. Written to a temporary folder and renamed at the end: no half checkpoints.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from llava_edge.model.image import CLIP_MEAN, CLIP_STD, PreprocessConfig
from llava_edge.model.presets import Preset, get_preset
from llava_edge.model.templates import TEMPLATES, get_template
from llava_edge.model.tokenizer import Tokenizer, train_bpe
from llava_edge.utils.atomic import atomic_dir

SIDECAR = "llava_edge.json"


def default_corpus() -> Iterable[str]:
    """Text the BPE of our presets is trained on: the chat templates and the synthetic world."""
    from llava_edge.data.synth import corpus_texts

    for template in TEMPLATES.values():
        yield template.system + template.user_prefix + template.assistant_prefix
    yield from corpus_texts(seed=0, n=2000)


def make_tokenizer(preset: Preset, texts: Iterable[str] | None = None) -> Tokenizer:
    return Tokenizer(train_bpe(texts if texts is not None else default_corpus(),
                               preset.tokenizer_vocab_size))


def llava_config(preset: Preset, tokenizer: Tokenizer):
    """The transformers LlavaConfig of a preset, with token ids taken from the tokenizer."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    v, t = preset.vision, preset.text
    vocab = max(t.vocab_size, tokenizer.vocab_size)
    text_config = LlamaConfig(
        hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_kv_heads, vocab_size=vocab,
        max_position_embeddings=t.max_position_embeddings, rms_norm_eps=t.rms_norm_eps,
        rope_theta=t.rope_theta, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id, tie_word_embeddings=False,
    )
    vision_config = CLIPVisionConfig(
        image_size=v.image_size, patch_size=v.patch_size, hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads, projection_dim=v.projection_dim or v.hidden_size,
        hidden_act="quick_gelu",
    )
    return LlavaConfig(
        vision_config=vision_config, text_config=text_config,
        image_token_index=tokenizer.image_id, image_seq_length=preset.n_image_tokens,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", multimodal_projector_bias=True, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_id,
    )


def build_model(preset: Preset | str, tokenizer: Tokenizer, seed: int = 0, dtype=None):
    """A randomly initialised ``LlavaForConditionalGeneration`` (deterministic for a seed)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    preset = get_preset(preset) if isinstance(preset, str) else preset
    config = llava_config(preset, tokenizer)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def preprocess_config_for(model_config) -> PreprocessConfig:
    return PreprocessConfig(size=model_config.vision_config.image_size, mean=CLIP_MEAN,
                            std=CLIP_STD, pad=True, resample="bicubic")


def save_checkpoint(model, tokenizer: Tokenizer, out: str | Path, *, template: str = "vicuna_v1",
                    preprocess: PreprocessConfig | None = None, extra: dict | None = None) -> Path:
    """Write a complete checkpoint folder atomically: model, tokenizer, processor, sidecar."""
    from transformers import LlavaImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    chat = get_template(template)
    preprocess = preprocess or preprocess_config_for(model.config)
    out = Path(out)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save(tmp, chat_template=chat.jinja)
        hf_tok = PreTrainedTokenizerFast.from_pretrained(tmp, local_files_only=True)
        # LLaVA-1.5 pads to square; transformers' LLaVA processor only does when told (do_pad).
        image_processor = LlavaImageProcessor(
            do_pad=preprocess.pad,
            size={"shortest_edge": preprocess.size},
            crop_size={"height": preprocess.size, "width": preprocess.size},
            image_mean=list(preprocess.mean), image_std=list(preprocess.std),
            resample=3,  # PIL bicubic
            do_convert_rgb=True,
        )
        LlavaProcessor(
            image_processor=image_processor, tokenizer=hf_tok,
            patch_size=model.config.vision_config.patch_size,
            vision_feature_select_strategy="default", image_token=tokenizer.image_token,
            num_additional_image_tokens=1, chat_template=chat.jinja,
        ).save_pretrained(tmp)
        tokenizer.save(tmp, chat_template=chat.jinja)  # keep our tokenizer files byte for byte
        sidecar = {"template": chat.name, "preprocess": preprocess.to_dict(), **(extra or {})}
        (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n")
    return out


def init_checkpoint(preset_name: str, out: str | Path, seed: int = 0) -> Path:
    """``llava-edge init``: random weights + a freshly trained tokenizer + processor."""
    preset = get_preset(preset_name)
    tokenizer = make_tokenizer(preset)
    model = build_model(preset, tokenizer, seed=seed)
    return save_checkpoint(model, tokenizer, out, extra={"preset": preset.name, "seed": seed})
