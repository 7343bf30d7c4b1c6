"""Multimodal calibration data: images + conversations run through the model, not text alone.

Calibration-based quantizers (GPTQ here) see the activations of the part they quantize. For the
decoder those must be what it sees in use: image embeddings from the vision tower and projector,
spliced into the text embeddings at ``<image>`` — a text-only calibration set never shows the decoder
an image token (TensorRT-LLM issue #1860: a LLaVA fell from 80 % to 20 % after it).

:class:`MultimodalCalibration` turns (image, turns) samples into decoder inputs with the exported
fp32 vision, projector and embeddings files, so the decoder is calibrated on exactly the embeddings
the runtime will feed it. The vision tower gets the samples' pixel values.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llava_edge.errors import UserError


@dataclass
class CalibrationSample:
    """One image (anything ``load_image`` takes, or None) and a conversation: (role, text) pairs or
    LLaVA ``{"from", "value"}`` dicts, answers included (their activations matter too)."""

    image: object
    turns: list


def synthetic_samples(n: int = 16, seed: int = 0, image_size: int = 64) -> list[CalibrationSample]:
    """``n`` scenes of the synthetic world with their instruction conversations."""
    from llava_edge.data.render import render
    from llava_edge.data.synth import scene_at, stage2_records

    samples = []
    for i in range(n):
        scene = scene_at(seed, "calibration", i, image_size)
        record = stage2_records(scene, f"calib_{i}.png", seed, i)[i % 4]
        samples.append(CalibrationSample(render(scene), record["conversations"]))
    return samples


class MultimodalCalibration:
    """Calibration inputs for each ONNX part, built from multimodal samples."""

    def __init__(self, samples: Iterable[CalibrationSample], *, max_tokens: int = 512):
        self.samples = list(samples)
        if not self.samples:
            raise UserError("calibration needs at least one (image, conversation) sample")
        self.max_tokens = max_tokens

    def reader(self, part: str, manifest, tokenizer_dir: str | Path, fp32_files: dict[str, Path]):
        """An onnxruntime ``CalibrationDataReader`` over the inputs of ``part``, or None when the
        part takes no calibration (the projector and embeddings quantize well without).

        ``manifest``: the bundle's (template, preprocessing, image tokens); ``tokenizer_dir``: a folder
        with tokenizer.json; ``fp32_files``: the fp32 ONNX file of each part."""
        if part == "vision":
            feeds = [{"pixel_values": p[None]} for p in self._pixels(manifest)]
        elif part == "decoder":
            feeds = list(self.decoder_feeds(manifest, tokenizer_dir, fp32_files))
        else:
            return None
        return FeedReader(feeds)

    def _pixels(self, manifest) -> list[np.ndarray]:
        return [self._pixels_of(s, manifest)[0] for s in self.samples if s.image is not None]

    def decoder_feeds(self, manifest, tokenizer_dir: str | Path,
                      fp32_files: dict[str, Path]) -> Iterator[dict]:
        """Decoder inputs (no past) of every sample: text embeddings with image rows spliced in."""
        from llava_edge.export.onnx.validate import cpu_session
        from llava_edge.model.templates import IMAGE_PLACEHOLDER, encode_conversation, get_template
        from llava_edge.model.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_folder(tokenizer_dir)
        template = get_template(manifest.template)
        vision, projector, embeddings, decoder = (cpu_session(fp32_files[p]) for p in
                                                  ("vision", "projector", "embeddings", "decoder"))
        past = [i for i in decoder.get_inputs() if i.name.startswith("past_key_values.")]
        kv_heads, head_dim = past[0].shape[1], past[0].shape[3]
        for sample in self.samples:
            turns = [dict(t) if isinstance(t, dict) else t for t in sample.turns]
            if sample.image is not None and not any(IMAGE_PLACEHOLDER in _text(t) for t in turns):
                turns[0] = _with_image(turns[0])
            ids = encode_conversation(tokenizer, template, turns, manifest.n_image_tokens).input_ids
            ids = np.asarray(ids, dtype=np.int64)[: self.max_tokens]
            embeds = embeddings.run(None, {"input_ids": ids[None]})[0]
            is_image = ids == manifest.image_token_id
            if sample.image is not None and is_image.any():
                pixels = self._pixels_of(sample, manifest)
                features = vision.run(None, {"pixel_values": pixels})[0]
                rows = projector.run(None, {"image_features": features})[0][0]
                # one image per sample: a conversation with several <image> sees it each time
                embeds[0, is_image] = np.resize(rows, (int(is_image.sum()), rows.shape[-1]))
            n = len(ids)
            feeds = {"inputs_embeds": embeds, "attention_mask": np.ones((1, n), np.int64),
                     "position_ids": np.arange(n, dtype=np.int64)[None]}
            empty = np.zeros((1, kv_heads, 0, head_dim), np.float32)
            feeds.update({p.name: empty for p in past})
            yield feeds

    @staticmethod
    def _pixels_of(sample: CalibrationSample, manifest) -> np.ndarray:
        from llava_edge.model.image import preprocess

        return preprocess(sample.image, manifest.preprocess_config)[None]


def _text(turn) -> str:
    return turn.get("value", turn.get("content", "")) if isinstance(turn, dict) else turn[1]


def _with_image(turn):
    from llava_edge.model.templates import IMAGE_PLACEHOLDER

    if isinstance(turn, dict):
        key = "value" if "value" in turn else "content"
        return {**turn, key: f"{IMAGE_PLACEHOLDER}\n{turn[key]}"}
    return (turn[0], f"{IMAGE_PLACEHOLDER}\n{turn[1]}")


class FeedReader:
    """A ``CalibrationDataReader`` over a list of feeds; copyable (GPTQ deep-copies its reader)."""

    def __init__(self, feeds: list[dict]):
        self.feeds = feeds
        self._next = 0

    def get_next(self) -> dict | None:
        if self._next >= len(self.feeds):
            return None
        self._next += 1
        return self.feeds[self._next - 1]

    def __iter__(self):
        return iter(self.feeds)

    def __len__(self) -> int:
        return len(self.feeds)

    def rewind(self) -> None:
        self._next = 0
