"""The one table of the GGUF format as llava-edge writes it: tensor names, metadata keys, quant types.

Everything that defines the files lives here; :mod:`.writer`, :mod:`.quantize`, :mod:`.check` and the
llama.cpp runtime read it. Facts behind the choices are in shared/DESIGN.md (GGUF section):

* text model: arch ``llama``; Q and K weights permuted per head the way llama.cpp's rotary embedding
  expects (:func:`permute_qk`); tied embeddings write no ``output.weight``.
* mmproj: arch ``clip``, projector ``mlp``; no Q/K permutation; ``v.post_ln`` omitted (LLaVA takes
  the hidden states *before* the post layer norm); CLIP ``fc1`` written as ``ffn_down`` and ``fc2`` as
  ``ffn_up`` — the legacy naming that llama.cpp swaps back for every shape (with the "correct" naming
  it loads the FFN swapped when the FFN width equals the hidden width); ``clip.vision.feature_layer``
  always written, and only the layers up to it stored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

# --------------------------------------------------------------------------------------------------
# Checkpoint names: transformers has written LLaVA under several prefixes over the years. Each source
# key is reduced to (part, canonical name) by the first matching prefix.
# --------------------------------------------------------------------------------------------------
TEXT, LM_HEAD, VISION, PROJECTOR = "text", "lm_head", "vision", "projector"

HF_PREFIXES: tuple[tuple[str, str], ...] = (
    ("model.language_model.", TEXT),  # transformers 5 in-memory names
    ("language_model.model.", TEXT),  # transformers 4.x / llava-hf checkpoints (and 5.x on disk)
    ("language_model.lm_head.", LM_HEAD),
    ("lm_head.", LM_HEAD),
    ("model.vision_tower.vision_model.", VISION),
    ("vision_tower.vision_model.", VISION),
    ("model.vision_tower.", VISION),
    ("vision_tower.", VISION),
    ("model.multi_modal_projector.", PROJECTOR),
    ("multi_modal_projector.", PROJECTOR),
)


def split_hf_name(key: str) -> tuple[str, str] | None:
    """``(part, canonical name)`` of a checkpoint key, or None if it belongs to no known part."""
    for prefix, part in HF_PREFIXES:
        if key.startswith(prefix):
            return part, key[len(prefix):]
    return None


# --------------------------------------------------------------------------------------------------
# Tensor rules: canonical HF name (regex, layer index as group 1) -> GGUF name, and the transform.
# --------------------------------------------------------------------------------------------------
PERMUTE_Q, PERMUTE_K = "permute_q", "permute_k"


@dataclass(frozen=True)
class TensorRule:
    part: str
    hf: str  # regex over the canonical name; ``(\d+)`` is the layer
    gguf: str  # ``{bid}`` is replaced by the layer
    transform: str | None = None

    def match(self, part: str, name: str) -> tuple[str, int | None] | None:
        if part != self.part:
            return None
        m = re.fullmatch(self.hf, name)
        if m is None:
            return None
        bid = int(m.group(1)) if m.groups() else None
        return self.gguf.format(bid=bid), bid


_L = r"layers\.(\d+)\."
_V = r"encoder\.layers\.(\d+)\."

TEXT_TENSORS: tuple[TensorRule, ...] = (
    TensorRule(TEXT, r"embed_tokens\.weight", "token_embd.weight"),
    TensorRule(TEXT, r"norm\.weight", "output_norm.weight"),
    TensorRule(LM_HEAD, r"weight", "output.weight"),
    TensorRule(TEXT, _L + r"input_layernorm\.weight", "blk.{bid}.attn_norm.weight"),
    TensorRule(TEXT, _L + r"self_attn\.q_proj\.weight", "blk.{bid}.attn_q.weight", PERMUTE_Q),
    TensorRule(TEXT, _L + r"self_attn\.k_proj\.weight", "blk.{bid}.attn_k.weight", PERMUTE_K),
    TensorRule(TEXT, _L + r"self_attn\.v_proj\.weight", "blk.{bid}.attn_v.weight"),
    TensorRule(TEXT, _L + r"self_attn\.o_proj\.weight", "blk.{bid}.attn_output.weight"),
    TensorRule(TEXT, _L + r"post_attention_layernorm\.weight", "blk.{bid}.ffn_norm.weight"),
    TensorRule(TEXT, _L + r"mlp\.gate_proj\.weight", "blk.{bid}.ffn_gate.weight"),
    TensorRule(TEXT, _L + r"mlp\.up_proj\.weight", "blk.{bid}.ffn_up.weight"),
    TensorRule(TEXT, _L + r"mlp\.down_proj\.weight", "blk.{bid}.ffn_down.weight"),
)

MMPROJ_TENSORS: tuple[TensorRule, ...] = (
    TensorRule(VISION, r"embeddings\.class_embedding", "v.class_embd"),
    TensorRule(VISION, r"embeddings\.patch_embedding\.weight", "v.patch_embd.weight"),
    TensorRule(VISION, r"embeddings\.position_embedding\.weight", "v.position_embd.weight"),
    TensorRule(VISION, r"pre_layrnorm\.weight", "v.pre_ln.weight"),
    TensorRule(VISION, r"pre_layrnorm\.bias", "v.pre_ln.bias"),
    *(
        TensorRule(VISION, _V + hf + r"\." + kind, f"v.blk.{{bid}}.{gg}.{kind}")
        for hf, gg in (
            (r"self_attn\.q_proj", "attn_q"),
            (r"self_attn\.k_proj", "attn_k"),
            (r"self_attn\.v_proj", "attn_v"),
            (r"self_attn\.out_proj", "attn_out"),
            (r"layer_norm1", "ln1"),
            (r"layer_norm2", "ln2"),
            (r"mlp\.fc1", "ffn_down"),  # legacy naming: see the module docstring
            (r"mlp\.fc2", "ffn_up"),
        )
        for kind in ("weight", "bias")
    ),
    TensorRule(PROJECTOR, r"linear_1\.weight", "mm.0.weight"),
    TensorRule(PROJECTOR, r"linear_1\.bias", "mm.0.bias"),
    TensorRule(PROJECTOR, r"linear_2\.weight", "mm.2.weight"),
    TensorRule(PROJECTOR, r"linear_2\.bias", "mm.2.bias"),
)

#: Checkpoint tensors deliberately not written (canonical names). Anything else unmatched is an error.
SKIPPED: tuple[tuple[str, str], ...] = (
    (VISION, r"post_layernorm\.(weight|bias)"),  # LLaVA's features come before it
    (TEXT, r"(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq"),  # recomputed by llama.cpp
)


def is_skipped(part: str, name: str) -> bool:
    return any(part == p and re.fullmatch(rx, name) for p, rx in SKIPPED)


def permute_qk(weights: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """HF's rotate-half Q/K rows -> llama.cpp's interleaved rotary layout (per head:
    reshape(n_head, 2, head_dim/2, -1), swap axes 1 and 2; K uses the KV head count)."""
    if n_head_kv is not None and n_head_kv != n_head:
        n_head = n_head_kv
    rows = weights.shape[0]
    return (weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


# --------------------------------------------------------------------------------------------------
# Metadata keys. The middle column is an attribute of :class:`llava_edge.export.gguf.source.TextFacts`
# / ``VisionFacts`` when it is a string, else the value itself; the writer owns no key strings.
# --------------------------------------------------------------------------------------------------
class V(IntEnum):  # value kinds, mapped to GGUFWriter methods in writer.py
    U32 = 0
    F32 = 1
    BOOL = 2
    STR = 3
    F32_ARRAY = 4
    I32_ARRAY = 5


TEXT_ARCH = "llama"
MMPROJ_ARCH = "clip"

TEXT_KEYS: tuple[tuple[str, object, V], ...] = (
    ("llama.context_length", "context_length", V.U32),
    ("llama.embedding_length", "hidden_size", V.U32),
    ("llama.block_count", "n_layers", V.U32),
    ("llama.feed_forward_length", "intermediate_size", V.U32),
    ("llama.attention.head_count", "n_heads", V.U32),
    ("llama.attention.head_count_kv", "n_kv_heads", V.U32),
    ("llama.attention.key_length", "head_dim", V.U32),
    ("llama.attention.value_length", "head_dim", V.U32),
    ("llama.attention.layer_norm_rms_epsilon", "rms_norm_eps", V.F32),
    ("llama.rope.freq_base", "rope_theta", V.F32),
    ("llama.rope.dimension_count", "head_dim", V.U32),
    ("llama.vocab_size", "vocab_size", V.U32),
)

MMPROJ_KEYS: tuple[tuple[str, object, V], ...] = (
    ("clip.has_vision_encoder", True, V.BOOL),
    ("clip.has_llava_projector", True, V.BOOL),
    ("clip.projector_type", "projector_type", V.STR),
    ("clip.use_gelu", "use_gelu", V.BOOL),  # False: CLIP's quick_gelu
    ("clip.vision.image_size", "image_size", V.U32),
    ("clip.vision.patch_size", "patch_size", V.U32),
    ("clip.vision.embedding_length", "hidden_size", V.U32),
    ("clip.vision.feed_forward_length", "intermediate_size", V.U32),
    ("clip.vision.projection_dim", "projection_dim", V.U32),
    ("clip.vision.block_count", "n_layers_stored", V.U32),
    ("clip.vision.attention.head_count", "n_heads", V.U32),
    ("clip.vision.attention.layer_norm_epsilon", "layer_norm_eps", V.F32),
    ("clip.vision.image_mean", "image_mean", V.F32_ARRAY),
    ("clip.vision.image_std", "image_std", V.F32_ARRAY),
    ("clip.vision.feature_layer", "feature_layers", V.I32_ARRAY),
)

# Tokenizer keys (byte-level BPE as llama.cpp's "gpt2" model).
TOKENIZER_MODEL = "gpt2"
TOKENIZER_PRE = "gpt-2"
KEY_CHAT_TEMPLATE = "tokenizer.chat_template"
KEY_ARCH = "general.architecture"
KEY_FILE_TYPE = "general.file_type"
KEY_NAME = "general.name"
PAD_TOKEN_FORMAT = "[PAD{}]"  # fills the vocabulary up to the embedding rows


class TokenType(IntEnum):  # llama.cpp's llama_token_type
    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


# --------------------------------------------------------------------------------------------------
# Precisions: what ``export_gguf(quant=...)`` accepts. F32/F16 are written directly; the others are
# produced from the F16 file by llama.cpp's own quantizer (llama_ftype values from llama.h).
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantType:
    name: str
    ftype: int  # llama_ftype
    block: int  # elements per block of the main tensor type (rows must be a multiple)
    fallback_block: int  # block of llama.cpp's per-tensor fallback type (K-quants), else == block
    written: bool = False  # F32/F16: written by our writer, not by the quantizer


QUANT_TYPES: dict[str, QuantType] = {q.name: q for q in (
    QuantType("F32", 0, 1, 1, written=True),
    QuantType("F16", 1, 1, 1, written=True),
    QuantType("Q8_0", 7, 32, 32),
    QuantType("Q4_0", 2, 32, 32),
    QuantType("Q5_K_M", 17, 256, 32),  # q5_K -> q5_1, q6_K -> q8_0 where rows are not % 256
    QuantType("Q4_K_M", 15, 256, 32),  # q4_K -> q5_0, q6_K -> q8_0 where rows are not % 256
)}

#: Tensors llama.cpp's quantizer keeps as they are (besides 1-D tensors and norms).
UNQUANTIZED_SUFFIXES = ("_norm.weight", ".position_embd.weight", ".patch_embd.weight")

# GGUF container facts used by the pre-flight check.
GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)



# File names inside a bundle's gguf/ folder.
def model_file(quant: str) -> str:
    return f"model-{quant}.gguf"


def mmproj_file(quant: str) -> str:
    return f"mmproj-{quant}.gguf"


MODELFILE = "Modelfile"
