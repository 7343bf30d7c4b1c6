"""Model presets: named LLaVA architectures defined in code.

A preset is the whole architecture (vision tower, projector, decoder) in one small record. The
``tiny`` and ``demo`` presets use our own locally trained byte-level BPE tokenizer; the
``llava-1.5-*`` presets are the real architectures with random weights, for scale and speed work.

Sizes of ``tiny`` and ``demo`` are multiples of 32 so that every quantizer applies (ONNX MatMulNBits
blocks of 32, GGUF Q4_0/Q8_0 blocks of 32). The demo's decoder widths are multiples of 256 so GGUF
K-quants apply too. No preset has an FFN width equal to its hidden width (llama.cpp swaps
``ffn_up``/``ffn_down`` in that case; see shared/DESIGN.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from llava_edge.errors import ModelError


@dataclass(frozen=True)
class VisionSpec:
    """A CLIP ViT vision tower."""

    image_size: int
    patch_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    projection_dim: int = 0  # unused by LLaVA (no CLIP projection head); kept for config fidelity

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class TextSpec:
    """A Llama-family decoder."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int  # lower bound; grown to fit the tokenizer when a model is initialised
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0


@dataclass(frozen=True)
class Preset:
    name: str
    vision: VisionSpec
    text: TextSpec
    description: str
    tokenizer_vocab_size: int  # size our BPE is trained to (tiny/demo/scale presets alike)
    projector: str = "mlp2x_gelu"

    @property
    def n_image_tokens(self) -> int:
        # vision_feature_select_strategy="default": CLS dropped, one token per patch.
        return self.vision.n_patches

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, Preset] = {}


def register(preset: Preset) -> Preset:
    PRESETS[preset.name] = preset
    return preset


register(Preset(
    name="tiny",
    description="3-layer vision (feature layer -2), 2-layer decoder, 32/64 wide: parity tests in seconds",
    vision=VisionSpec(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                      num_layers=3, num_heads=2),
    text=TextSpec(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, vocab_size=512, max_position_embeddings=512),
    tokenizer_vocab_size=512,
))

register(Preset(
    name="demo",
    description="small model trained on 2 CPU cores by the demo recipe (64 px images, 64 image tokens)",
    vision=VisionSpec(image_size=64, patch_size=8, hidden_size=128, intermediate_size=512,
                      num_layers=4, num_heads=4),
    text=TextSpec(hidden_size=256, intermediate_size=768, num_layers=4, num_heads=8,
                  num_kv_heads=4, vocab_size=1024, max_position_embeddings=1024),
    tokenizer_vocab_size=1024,
))

# The real LLaVA-1.5 architectures: CLIP ViT-L/14-336 + Vicuna v1.5 (Llama 2) 7B / 13B.
_CLIP_L14_336 = VisionSpec(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                           num_layers=24, num_heads=16, projection_dim=768)

register(Preset(
    name="llava-1.5-7b",
    description="LLaVA-1.5 7B architecture (CLIP ViT-L/14-336 + Vicuna-7B), random weights",
    vision=_CLIP_L14_336,
    text=TextSpec(hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                  num_kv_heads=32, vocab_size=32064, max_position_embeddings=4096),
    tokenizer_vocab_size=2048,
))

register(Preset(
    name="llava-1.5-13b",
    description="LLaVA-1.5 13B architecture (CLIP ViT-L/14-336 + Vicuna-13B), random weights",
    vision=_CLIP_L14_336,
    text=TextSpec(hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40,
                  num_kv_heads=40, vocab_size=32064, max_position_embeddings=4096),
    tokenizer_vocab_size=2048,
))


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ModelError(
            f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}"
        ) from None
