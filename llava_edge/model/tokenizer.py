"""Tokenizers: a locally trained byte-level BPE for our presets, and a torch-free wrapper for all.

Runtimes use :class:`Tokenizer`, which wraps the ``tokenizers`` library directly (no transformers),
so a desktop app needs only ``tokenizers``. Checkpoints store the standard ``tokenizer.json`` plus
transformers' ``tokenizer_config.json``, so transformers loads them too.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from llava_edge.errors import ModelError

# Special tokens of our BPE, in id order. Llama's first three ids, then padding and the image.
UNK, BOS, EOS, PAD, IMAGE = "<unk>", "<s>", "</s>", "<pad>", "<image>"
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD, IMAGE)


def train_bpe(texts: Iterable[str], vocab_size: int) -> _HFTokenizer:
    """Train a byte-level BPE (GPT-2 pre-tokenisation) with our special tokens at ids 0..4."""
    tok = _HFTokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps offsets byte-exact; no template: we add BOS ourselves.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i, "special tokens must keep ids 0..4"
    return tok


class Tokenizer:
    """The few things runtimes, templates and trainers need from a tokenizer."""

    def __init__(self, tok: _HFTokenizer, *, bos: str = BOS, eos: str = EOS, pad: str | None = PAD,
                 image: str = IMAGE, source: str = "<memory>"):
        self._tok = tok
        self.source = source
        self.bos_token, self.eos_token, self.image_token = bos, eos, image
        self.bos_id = self._require_id(bos, "begin-of-sequence")
        self.eos_id = self._require_id(eos, "end-of-sequence")
        self.image_id = self._require_id(image, "image placeholder")
        self.pad_id = tok.token_to_id(pad) if pad else None
        if self.pad_id is None:
            self.pad_id = self.eos_id

    def _require_id(self, token: str, what: str) -> int:
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise ModelError(f"{self.source}: tokenizer has no {what} token {token!r}")
        return tid

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> _HFTokenizer:
        return self._tok

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special tokens written in the text are parsed, none is added."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, tid: int) -> str | None:
        return self._tok.id_to_token(tid)

    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer:
        """Load ``tokenizer.json`` (+ special-token names from ``tokenizer_config.json``)."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ModelError(
                f"{folder}: no tokenizer.json; llava-edge needs a fast tokenizer file "
                "(re-save the tokenizer with transformers' save_pretrained to create one)"
            )
        try:
            tok = _HFTokenizer.from_file(str(path))
        except Exception as exc:  # the tokenizers library raises plain Exceptions
            raise ModelError(f"{path}: not a valid tokenizer file ({exc})") from None
        names = {"bos": BOS, "eos": EOS, "pad": PAD, "image": IMAGE}
        cfg_path = folder / "tokenizer_config.json"
        if cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text())
            for key in ("bos", "eos", "pad"):
                value = cfg.get(f"{key}_token")
                if isinstance(value, dict):  # older transformers wrote AddedToken dicts
                    value = value.get("content")
                if value:
                    names[key] = value
            if cfg.get("image_token"):
                names["image"] = cfg["image_token"]
        if tok.token_to_id(names["pad"]) is None:
            names["pad"] = None
        return cls(tok, source=str(folder), **names)

    def save(self, folder: str | Path, *, chat_template: str | None = None,
             model_max_length: int = 2048) -> None:
        """Write tokenizer.json and transformers' tokenizer_config.json into ``folder``."""
        folder = Path(folder)
        self._tok.save(str(folder / "tokenizer.json"))
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.id_to_token(self.pad_id),
            "unk_token": UNK if self._tok.token_to_id(UNK) is not None else None,
            "image_token": self.image_token,
            "extra_special_tokens": {"image_token": self.image_token},
            "model_max_length": model_max_length,
            "padding_side": "left",
            "add_bos_token": False,
            "clean_up_tokenization_spaces": False,
        }
        if chat_template:
            cfg["chat_template"] = chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


class StreamDecoder:
    """Turns a stream of token ids into text pieces without splitting multi-byte characters."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._emitted = 0

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._tokenizer.decode(self._ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        piece, self._emitted = text[self._emitted:], len(text)
        return piece

    @property
    def text(self) -> str:
        return self._tokenizer.decode(self._ids)
