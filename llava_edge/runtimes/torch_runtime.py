"""The ``torch`` backend: transformers' LlavaForConditionalGeneration, the reference for parity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache

from llava_edge.errors import UserError
from llava_edge.model.cache import cache_kwargs
from llava_edge.model.loading import load_model, load_tokenizer, read_model_info
from llava_edge.runtimes.base import Prompt, Runtime


class TorchRuntime(Runtime):
    name = "torch"

    def __init__(self, model, **kwargs):
        super().__init__(**kwargs)
        self.model = model
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self._cache: DynamicCache | None = None

    @classmethod
    def open(cls, path: str | Path, *, dtype: str = "float32", device: str = "cpu", **kwargs):
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"device {device!r} asked for, but torch sees no CUDA GPU")
        info = read_model_info(path)
        return cls(
            load_model(info.path, dtype=dtype, device=device),
            tokenizer=load_tokenizer(info.path), template=info.template,
            preprocess=info.preprocess, n_image_tokens=info.n_image_tokens,
            image_token_id=info.image_token_id, **kwargs,
        )

    @torch.inference_mode()
    def _encode_pixels(self, pixel_values: np.ndarray) -> np.ndarray:
        pixels = torch.from_numpy(pixel_values).to(self.device, self.dtype)
        features = self.model.model.get_image_features(pixel_values=pixels).pooler_output
        return torch.stack(list(features)).float().cpu().numpy()

    def _embeds(self, prompt: Prompt, start: int = 0) -> torch.Tensor:
        """Input embeddings of positions ``start..`` with image rows spliced in."""
        ids = torch.from_numpy(prompt.input_ids).to(self.device)
        embeds = self.model.get_input_embeddings()(ids)
        is_image = ids == self.image_token_id
        if prompt.image_embeds:
            rows = torch.from_numpy(np.concatenate(prompt.image_embeds)).to(self.device, embeds.dtype)
            embeds = embeds.masked_scatter(is_image[:, None], rows)
        return embeds[start:][None]

    def _decode(self, embeds: torch.Tensor, start: int, all_logits: bool = False) -> torch.Tensor:
        positions = torch.arange(start, start + embeds.shape[1], device=self.device)[None]
        lm = self.model.model.language_model
        out = lm(inputs_embeds=embeds, position_ids=positions, use_cache=True, **cache_kwargs(lm, self._cache))
        hidden = out.last_hidden_state if all_logits else out.last_hidden_state[:, -1:]
        return self.model.lm_head(hidden)[0].float()

    @torch.inference_mode()
    def logits(self, prompt: Prompt) -> np.ndarray:
        prompt.check(self.image_token_id, self.n_image_tokens)
        saved, self._cache = self._cache, DynamicCache(config=self.model.config.text_config)
        try:
            return self._decode(self._embeds(prompt), 0, all_logits=True).cpu().numpy()
        finally:
            self._cache = saved

    @torch.inference_mode()
    def _prefill(self, prompt: Prompt, reuse: int) -> np.ndarray:
        if self._cache is None or reuse == 0:
            self._cache = DynamicCache(config=self.model.config.text_config)
        elif self._cache.get_seq_length() > reuse:
            self._cache.crop(reuse - self._cache.get_seq_length())  # negative: drop that many
        return self._decode(self._embeds(prompt, reuse), reuse)[-1].cpu().numpy()

    @torch.inference_mode()
    def _step(self, token_id: int) -> np.ndarray:
        ids = torch.tensor([[token_id]], device=self.device)
        start = self._cache.get_seq_length()
        return self._decode(self.model.get_input_embeddings()(ids), start)[-1].cpu().numpy()

    def reset(self) -> None:
        super().reset()
        self._cache = None
