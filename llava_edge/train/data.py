"""Training samples: LLaVA records -> input ids, labels (assistant tokens only) and pixel values.

Ids and labels come from :func:`llava_edge.model.templates.encode_conversation`, the function the
runtimes build prompts with, so training and inference prompts cannot drift apart. Pixels come from
:func:`llava_edge.model.image.preprocess`, the one preprocessing every runtime uses.

Samples are addressed by ``(epoch, index)`` keys (see :mod:`llava_edge.train.sampler`): the random
choice of the first turn's image position is seeded by (seed, epoch, index), so it differs between
epochs, is the same on every process and after a resume, and needs no global RNG.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from llava_edge.data.dataset import LlavaDataset
from llava_edge.data.records import IMAGE_TOKEN
from llava_edge.errors import DataError
from llava_edge.model.image import PreprocessConfig, preprocess
from llava_edge.model.templates import IGNORE_INDEX, ChatTemplate, encode_conversation
from llava_edge.model.tokenizer import Tokenizer


def default_image_root(data: Path) -> Path:
    """The image root of a data file: ``meta.json``'s ``image_root`` beside it (what ``synth``
    writes), else the file's folder (LlavaDataset's default)."""
    meta = data.parent / "meta.json"
    if meta.is_file():
        try:
            root = json.loads(meta.read_text(encoding="utf-8")).get("image_root")
        except json.JSONDecodeError:
            root = None
        if isinstance(root, str) and (data.parent / root).is_dir():
            return data.parent / root
    return data.parent


def place_image(turns: list[tuple[str, str]], position: str, rng: random.Random) -> list[tuple[str, str]]:
    """Put the first turn's ``<image>`` before or after the question (LLaVA trained on both orders).

    ``random``: either side with probability 1/2; ``first``: always before (LLaVA's
    ``preprocess_multimodal``); ``keep``: as the record has it.
    """
    if position == "keep" or not turns or IMAGE_TOKEN not in turns[0][1]:
        return turns
    role, text = turns[0]
    question = text.replace(IMAGE_TOKEN, "").strip()
    before = position == "first" or rng.random() < 0.5
    if not question:
        text = IMAGE_TOKEN
    else:
        text = f"{IMAGE_TOKEN}\n{question}" if before else f"{question}\n{IMAGE_TOKEN}"
    return [(role, text)] + list(turns[1:])


def truncate(ids: list[int], labels: list[int], max_length: int, image_id: int,
             n_image_tokens: int) -> tuple[list[int], list[int], int]:
    """Cut to ``max_length`` without splitting an image's token block; returns the images kept."""
    ids, labels = ids[:max_length], labels[:max_length]
    n_image_positions = sum(1 for t in ids if t == image_id)
    partial = n_image_positions % n_image_tokens
    if partial:  # the cut fell inside an image block: drop that block and what follows
        cut = len(ids) - next(k for k, t in enumerate(reversed(ids)) if t == image_id) - partial
        ids, labels = ids[:cut], labels[:cut]
    return ids, labels, n_image_positions // n_image_tokens


@dataclass
class SampleSpec:
    """What turns a record into a sample: the model's tokenizer, template and image facts."""

    tokenizer: Tokenizer
    template: ChatTemplate
    n_image_tokens: int
    preprocess: PreprocessConfig
    max_length: int
    image_position: str = "random"
    seed: int = 0


class SupervisedDataset(torch.utils.data.Dataset):
    """A LLaVA file as training samples; ``lengths`` (sign = modality) feed the grouped sampler."""

    def __init__(self, records: LlavaDataset, spec: SampleSpec):
        self.records = records
        self.spec = spec
        self.lengths = modality_lengths(records, spec.n_image_tokens)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        spec = self.spec
        record = self.records[index]
        rng = random.Random(f"image-position:{spec.seed}:{epoch}:{record.id}")
        turns = place_image(record.turns, spec.image_position, rng)
        encoded = encode_conversation(spec.tokenizer, spec.template, turns, spec.n_image_tokens)
        ids, labels, n_images = truncate(encoded.input_ids, encoded.labels, spec.max_length,
                                         spec.tokenizer.image_id, spec.n_image_tokens)
        sample = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
        if n_images:
            if record.image is None:
                raise DataError(f"{self.records.path}: record {record.id!r} has {IMAGE_TOKEN} but no image")
            sample["pixel_values"] = torch.from_numpy(preprocess(record.image, spec.preprocess))
        return sample


def modality_lengths(records: LlavaDataset, n_image_tokens: int) -> list[int]:
    """LLaVA's ``modality_lengths``: a length estimate per record, negative for text-only records.

    Words, not tokens: reading every record is cheap, tokenising every one is not (665K records).
    """
    lengths = []
    for record in records:
        words = sum(len(text.split()) for _, text in record.turns)
        lengths.append(words + n_image_tokens if record.image is not None else -max(words, 1))
    return lengths


@dataclass
class Collator:
    """Pads right (pad id, label -100, attention mask 0) and stacks the images of the batch."""

    pad_id: int

    def __call__(self, samples: list[dict]) -> dict:
        width = max(len(s["input_ids"]) for s in samples)
        batch = len(samples)
        input_ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch, width), dtype=torch.long)
        for row, s in enumerate(samples):
            n = len(s["input_ids"])
            input_ids[row, :n] = s["input_ids"]
            labels[row, :n] = s["labels"]
            attention_mask[row, :n] = 1
        out = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        pixels = [s["pixel_values"] for s in samples if "pixel_values" in s]
        if pixels:
            out["pixel_values"] = torch.stack(pixels)
        return out


def open_records(data: str | Path, image_root: str | Path | None, skip_bad: bool) -> LlavaDataset:
    """The LLaVA file with its image root; ``skip_bad`` leaves bad records out (and reports them)."""
    data = Path(data)
    root = Path(image_root) if image_root else default_image_root(data)
    return LlavaDataset(data, root, on_error="skip" if skip_bad else "raise", check_images="exists")


__all__ = ["Collator", "SampleSpec", "SupervisedDataset", "default_image_root", "modality_lengths",
           "open_records", "place_image", "truncate"]
