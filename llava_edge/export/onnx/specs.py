"""What each ONNX part of a LLaVA model is: one small declarative spec per part.

A :class:`PartSpec` says which torch module is exported (a thin wrapper over the transformers model),
its input and output names, which axes are dynamic, how to build random inputs of given sizes, and
how close to torch the exported file must be. :mod:`llava_edge.export.onnx.export` holds the one
generic routine that exports and validates any spec. Adding a part touches only this file.

The four parts and their contracts (also what :class:`~llava_edge.runtimes.onnx_runtime.OnnxRuntime`
relies on)::

    vision      pixel_values [n, 3, S, S] f32            -> image_features [n, tokens, vision_hidden]
                (hidden states of ``vision_feature_layer``, CLS dropped for the "default" strategy)
    projector   image_features [n, tokens, vision_hidden] -> image_embeds [n, tokens, d_model]
    embeddings  input_ids [b, s] i64                      -> inputs_embeds [b, s, d_model]
    decoder     inputs_embeds [b, s, d_model], attention_mask [b, past + s] i64,
                position_ids [b, s] i64, past_key_values.{i}.key/value [b, kv_heads, past, head_dim]
                -> logits [b, s, vocab], present.{i}.key/value [b, kv_heads, past + s, head_dim]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from llava_edge.errors import ModelError

# Graph input/output names: one table, read by the exporter, the runtime and the tests.
PIXEL_VALUES = "pixel_values"
IMAGE_FEATURES = "image_features"
IMAGE_EMBEDS = "image_embeds"
INPUT_IDS = "input_ids"
INPUTS_EMBEDS = "inputs_embeds"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"


def past_name(layer: int, kind: str) -> str:
    return f"past_key_values.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    return f"present.{layer}.{kind}"


@dataclass(frozen=True)
class Dims:
    """Sizes of one set of dummy inputs. Traced with sizes > 1 so nothing specialises to 0 or 1."""

    batch: int
    seq: int
    past: int = 0


#: The sizes traced with (DESIGN.md: batch 2, seq 5, past 3) and fresh sizes each part is checked at,
#: including a past length of 0 (a prompt) and a sequence of 1 (a decode step).
TRACE_DIMS = Dims(batch=2, seq=5, past=3)
CHECK_DIMS = (Dims(batch=1, seq=7, past=0), Dims(batch=1, seq=1, past=9), Dims(batch=3, seq=4, past=6))


@dataclass(frozen=True)
class ModelDims:
    """The facts of a LLaVA config that the parts' shapes depend on."""

    image_size: int
    vision_hidden: int
    n_image_tokens: int
    feature_layer: int
    drop_cls: bool
    d_model: int
    vocab_size: int
    n_layers: int
    n_kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config) -> ModelDims:
        v, t = config.vision_config, config.text_config
        layer = config.vision_feature_layer
        if not isinstance(layer, int):
            raise ModelError(f"vision_feature_layer={layer!r}: only a single feature layer is supported "
                             "by the ONNX export (LLaVA-1.5 uses -2)")
        strategy = config.vision_feature_select_strategy
        if strategy not in ("default", "full"):
            raise ModelError(f"vision_feature_select_strategy={strategy!r} is not supported "
                             "(expected 'default' or 'full')")
        n_patches = (v.image_size // v.patch_size) ** 2
        head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
        return cls(
            image_size=v.image_size, vision_hidden=v.hidden_size,
            n_image_tokens=n_patches + (strategy == "full"), feature_layer=layer,
            drop_cls=strategy == "default", d_model=t.hidden_size, vocab_size=t.vocab_size,
            n_layers=t.num_hidden_layers, n_kv_heads=t.num_key_value_heads, head_dim=head_dim,
        )


@dataclass(frozen=True)
class PartSpec:
    """One exportable part: everything the generic export-and-validate routine needs."""

    name: str
    build: Callable  # (LlavaForConditionalGeneration) -> torch.nn.Module
    input_names: Callable[[ModelDims], list[str]]
    output_names: Callable[[ModelDims], list[str]]
    dynamic_shapes: Callable[[ModelDims], tuple]  # torch.export dynamic_shapes, one per forward arg
    dummy_inputs: Callable[[ModelDims, Dims, np.random.Generator], dict[str, np.ndarray]]
    atol: float  # max abs difference to torch, fp32 on CPU ...
    rtol: float = 0.0  # ... plus this times the output's largest magnitude (see the decoder's)
    check_dims: tuple[Dims, ...] = CHECK_DIMS

    def args(self, inputs: dict[str, np.ndarray], dims: ModelDims) -> tuple:
        """Positional torch arguments of the wrapper from named numpy inputs."""
        import torch

        names = self.input_names(dims)
        tensors = [torch.from_numpy(inputs[n]) for n in names]
        return self.pack_args(tensors, dims)

    def pack_args(self, tensors: list, dims: ModelDims) -> tuple:
        if self.name == "decoder":  # the past tensors travel as one tuple argument
            return (*tensors[:3], tuple(tensors[3:]))
        return tuple(tensors)


# --- torch wrappers: thin modules with flat tensor inputs and outputs ---------------------------------


def _vision_module(model):
    import torch

    class VisionFeatures(torch.nn.Module):
        """CLIP tower -> hidden states of the feature layer (CLS dropped), as LLaVA selects them."""

        def __init__(self):
            super().__init__()
            self.tower = model.model.vision_tower
            dims = ModelDims.from_config(model.config)
            self.layer, self.drop_cls = dims.feature_layer, dims.drop_cls

        def forward(self, pixel_values):
            hidden = self.tower(pixel_values, output_hidden_states=True).hidden_states[self.layer]
            return hidden[:, 1:] if self.drop_cls else hidden

    return VisionFeatures()


def _projector_module(model):
    return model.model.multi_modal_projector


def _embeddings_module(model):
    return model.get_input_embeddings()


def _decoder_module(model):
    import torch
    from transformers import DynamicCache

    from llava_edge.model.cache import cache_kwargs

    class Decoder(torch.nn.Module):
        """The language model + LM head on flat past/present key-value tensors."""

        def __init__(self):
            super().__init__()
            self.lm = model.model.language_model
            self.lm_head = model.lm_head
            self.text_config = model.config.text_config

        def forward(self, inputs_embeds, attention_mask, position_ids, past_key_values):
            cache = DynamicCache(ddp_cache_data=list(zip(past_key_values[0::2], past_key_values[1::2])),
                                 config=self.text_config)
            out = self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                          position_ids=position_ids, use_cache=True, **cache_kwargs(self.lm, cache))
            presents = [t for layer in cache.layers for t in (layer.keys, layer.values)]
            return (self.lm_head(out.last_hidden_state), *presents)

    return Decoder()


# --- dynamic shapes ------------------------------------------------------------------------------------


def _dyn(*axes: int) -> dict:
    from torch.export import Dim

    return {axis: Dim.DYNAMIC for axis in axes}


def _decoder_dynamic_shapes(d: ModelDims) -> tuple:
    # The past tensors are one tuple argument: their spec must be a tuple too (DESIGN.md).
    return (_dyn(0, 1), _dyn(0, 1), _dyn(0, 1), tuple(_dyn(0, 2) for _ in range(2 * d.n_layers)))


def _kv_names(d: ModelDims, name) -> list[str]:
    return [name(i, kind) for i in range(d.n_layers) for kind in ("key", "value")]


# --- dummy inputs --------------------------------------------------------------------------------------


def _f32(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def decoder_inputs(d: ModelDims, dims: Dims, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random decoder inputs: embeddings, a full mask, positions after the past, random past K/V."""
    b, s, p = dims.batch, dims.seq, dims.past
    inputs = {
        INPUTS_EMBEDS: _f32(rng, b, s, d.d_model),
        ATTENTION_MASK: np.ones((b, p + s), dtype=np.int64),
        POSITION_IDS: np.broadcast_to(np.arange(p, p + s, dtype=np.int64), (b, s)).copy(),
    }
    for name in _kv_names(d, past_name):
        inputs[name] = _f32(rng, b, d.n_kv_heads, p, d.head_dim)
    return inputs


SPECS: dict[str, PartSpec] = {
    spec.name: spec
    for spec in (
        PartSpec(
            name="vision", build=_vision_module,
            input_names=lambda d: [PIXEL_VALUES], output_names=lambda d: [IMAGE_FEATURES],
            dynamic_shapes=lambda d: (_dyn(0),),
            dummy_inputs=lambda d, dims, rng: {
                PIXEL_VALUES: _f32(rng, dims.batch, 3, d.image_size, d.image_size)},
            atol=1e-4,
        ),
        PartSpec(
            name="projector", build=_projector_module,
            input_names=lambda d: [IMAGE_FEATURES], output_names=lambda d: [IMAGE_EMBEDS],
            dynamic_shapes=lambda d: (_dyn(0, 1),),
            dummy_inputs=lambda d, dims, rng: {
                IMAGE_FEATURES: _f32(rng, dims.batch, d.n_image_tokens, d.vision_hidden)},
            atol=1e-4,
        ),
        PartSpec(
            name="embeddings", build=_embeddings_module,
            input_names=lambda d: [INPUT_IDS], output_names=lambda d: [INPUTS_EMBEDS],
            dynamic_shapes=lambda d: (_dyn(0, 1),),
            dummy_inputs=lambda d, dims, rng: {
                INPUT_IDS: rng.integers(0, d.vocab_size, (dims.batch, dims.seq), dtype=np.int64)},
            atol=0.0,  # a Gather: bit-exact
        ),
        PartSpec(
            name="decoder", build=_decoder_module,
            input_names=lambda d: [INPUTS_EMBEDS, ATTENTION_MASK, POSITION_IDS, *_kv_names(d, past_name)],
            output_names=lambda d: [LOGITS, *_kv_names(d, present_name)],
            dynamic_shapes=_decoder_dynamic_shapes,
            dummy_inputs=decoder_inputs,
            # fp32 rounding of a deep stack of matmuls grows with the scale of its values: the demo
            # LM, whose logits reach 18.3, differs by 1.43e-4 between torch and onnxruntime, 7.8e-6 of
            # that scale. 2e-5 of it allows that 2.5 times over; a wrong mask, position or cache is off
            # by 0.1 or more.
            atol=1e-4, rtol=2e-5,
        ),
    )
}

PARTS = tuple(SPECS)


def get_spec(name: str) -> PartSpec:
    try:
        return SPECS[name]
    except KeyError:
        raise ModelError(f"unknown ONNX part {name!r}; the parts are: {', '.join(SPECS)}") from None
