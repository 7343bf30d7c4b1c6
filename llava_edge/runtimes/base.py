"""The runtime protocol every backend implements, and the generation loop they share.

A backend supplies four primitives — encode preprocessed pixels, teacher-forced logits, prefill
(reusing a cached prefix) and one decode step — and inherits the rest: the image-embedding cache,
sampling, stop handling and KV-prefix reuse across turns. Everything crossing the protocol is numpy,
so backends can be compared number for number.
"""

from __future__ import annotations

import abc
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from llava_edge.errors import UserError
from llava_edge.model.image import PreprocessConfig, image_digest, load_image, preprocess
from llava_edge.model.templates import ChatTemplate
from llava_edge.model.tokenizer import Tokenizer
from llava_edge.runtimes.sampling import GenerationConfig, Sampler


@dataclass
class Prompt:
    """Token ids (``<image>`` already expanded) and one embedding block per image, in order."""

    input_ids: np.ndarray  # int64 [seq]
    image_embeds: list[np.ndarray] = field(default_factory=list)  # each [n_image_tokens, d_model]
    image_keys: list[str] = field(default_factory=list)  # identity of each image, for KV reuse

    def __post_init__(self) -> None:
        self.input_ids = np.asarray(self.input_ids, dtype=np.int64).reshape(-1)
        if not self.image_keys:
            self.image_keys = [f"anon-{i}-{id(e)}" for i, e in enumerate(self.image_embeds)]

    def position_keys(self, image_token_id: int, n_image_tokens: int) -> list:
        """A hashable identity per position: the token id, or (image key, row) at image tokens."""
        keys, image_pos = [], 0
        for tid in self.input_ids.tolist():
            if tid == image_token_id:
                keys.append((self.image_keys[image_pos // n_image_tokens], image_pos % n_image_tokens))
                image_pos += 1
            else:
                keys.append(tid)
        return keys

    def check(self, image_token_id: int, n_image_tokens: int) -> None:
        n_positions = int((self.input_ids == image_token_id).sum())
        expected = n_image_tokens * len(self.image_embeds)
        if n_positions != expected:
            raise UserError(
                f"prompt has {n_positions} image-token positions but {len(self.image_embeds)} "
                f"image(s) x {n_image_tokens} tokens = {expected} embeddings were given"
            )


class Runtime(abc.ABC):
    """One loaded model on one backend. Subclasses register under ``name``."""

    name: ClassVar[str] = ""

    def __init__(self, *, tokenizer: Tokenizer, template: ChatTemplate, preprocess: PreprocessConfig,
                 n_image_tokens: int, image_token_id: int, image_cache_size: int = 16):
        self.tokenizer = tokenizer
        self.template = template
        self.preprocess_config = preprocess
        self.n_image_tokens = n_image_tokens
        self.image_token_id = image_token_id
        self._image_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._image_cache_size = image_cache_size
        self._cached_keys: list = []  # identity of each position held in the backend's KV cache
        self.stats = {"image_encodes": 0, "prefill_tokens": 0, "reused_tokens": 0}

    # --- what a backend implements -------------------------------------------------------------
    @abc.abstractmethod
    def _encode_pixels(self, pixel_values: np.ndarray) -> np.ndarray:
        """[n, 3, S, S] float32 -> [n, n_image_tokens, d_model] projector output."""

    @abc.abstractmethod
    def logits(self, prompt: Prompt) -> np.ndarray:
        """Teacher-forced logits [seq, vocab] (float32) of the whole prompt; no cache involved."""

    @abc.abstractmethod
    def _prefill(self, prompt: Prompt, reuse: int) -> np.ndarray:
        """Keep the first ``reuse`` cached positions, run the rest; return the last logits [vocab]."""

    @abc.abstractmethod
    def _step(self, token_id: int) -> np.ndarray:
        """Append one token to the cache; return its logits [vocab]."""

    # --- shared behaviour ------------------------------------------------------------------------
    def encode_image(self, image) -> np.ndarray:
        """Image (path, bytes, PIL, array) -> [n_image_tokens, d_model]; cached per image."""
        return self._encode_with_key(image)[0]

    def _encode_with_key(self, image) -> tuple[np.ndarray, str]:
        pil = load_image(image)
        key = image_digest(pil)
        if key in self._image_cache:
            self._image_cache.move_to_end(key)
            return self._image_cache[key], key
        pixels = preprocess(pil, self.preprocess_config)[None]
        embeds = np.asarray(self._encode_pixels(pixels)[0], dtype=np.float32)
        self.stats["image_encodes"] += 1
        self._image_cache[key] = embeds
        if len(self._image_cache) > self._image_cache_size:
            self._image_cache.popitem(last=False)
        return embeds, key

    def generate(self, prompt: Prompt, config: GenerationConfig | None = None) -> Iterator[int]:
        """Stream token ids. Stops at end-of-sequence ids or ``max_new_tokens``; stop strings are
        handled by :class:`~llava_edge.runtimes.chat.Conversation`, which sees the text."""
        config = config or GenerationConfig()
        prompt.check(self.image_token_id, self.n_image_tokens)
        if len(prompt.input_ids) == 0:
            raise UserError("empty prompt")
        keys = prompt.position_keys(self.image_token_id, self.n_image_tokens)
        reuse = common_prefix_length(self._cached_keys, keys)
        reuse = min(reuse, len(keys) - 1)  # always run at least one position to get logits
        self.stats["prefill_tokens"] += len(keys) - reuse
        self.stats["reused_tokens"] += reuse
        self._cached_keys = keys[:reuse]  # invalidated first: a failed prefill leaves no stale keys
        logits = self._prefill(prompt, reuse)
        self._cached_keys = keys
        sampler = Sampler(config)
        stop_ids = set(config.stop_token_ids) | {self.tokenizer.eos_id}
        for _ in range(config.max_new_tokens):
            token = sampler(logits)
            if token in stop_ids:
                return
            yield token
            logits = self._step(token)
            self._cached_keys.append(token)

    def reset(self) -> None:
        """Forget the KV cache (image embeddings stay cached)."""
        self._cached_keys = []


def common_prefix_length(a, b) -> int:
    """How many leading items two sequences share (KV reuse here; greedy-prefix drift metric)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
