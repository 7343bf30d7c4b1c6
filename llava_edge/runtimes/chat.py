"""Multi-turn chat on any runtime: streams text, encodes each image once, reuses the KV prefix."""

from __future__ import annotations

from collections.abc import Iterator

from llava_edge.model.templates import ASSISTANT, IMAGE_PLACEHOLDER, USER, encode_conversation
from llava_edge.model.tokenizer import StreamDecoder
from llava_edge.runtimes.base import Prompt, Runtime
from llava_edge.runtimes.sampling import GenerationConfig


class Conversation:
    """A conversation with one runtime. ``send`` yields the reply as text pieces."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.turns: list[tuple[str, str]] = []
        self._images: list[tuple] = []  # (embeds, key) in order of appearance

    def prompt(self) -> Prompt:
        encoded = encode_conversation(self.runtime.tokenizer, self.runtime.template, self.turns,
                                      self.runtime.n_image_tokens, add_generation_prompt=True)
        return Prompt(encoded.input_ids, [e for e, _ in self._images], [k for _, k in self._images])

    def send(self, text: str, image=None, config: GenerationConfig | None = None) -> Iterator[str]:
        config = config or GenerationConfig()
        if image is not None:
            embeds, key = self.runtime._encode_with_key(image)
            self._images.append((embeds, key))
            if IMAGE_PLACEHOLDER not in text:
                text = f"{IMAGE_PLACEHOLDER}\n{text}"
        self.turns.append((USER, text))
        yield from self.respond(config)

    def respond(self, config: GenerationConfig | None = None) -> Iterator[str]:
        """Stream the assistant's reply to the conversation as it stands (ending on a user turn)."""
        config = config or GenerationConfig()
        stops = tuple(s for s in (*self.runtime.template.stop, *config.stop)
                      if s != self.runtime.tokenizer.eos_token)
        decoder = StreamDecoder(self.runtime.tokenizer)
        reply, sent = "", 0
        try:
            for token in self.runtime.generate(self.prompt(), config):
                # The template's separator (vicuna's space after "ASSISTANT:") is not shown.
                reply = (reply + decoder.push(token)).lstrip()
                cut = _first_stop(reply, stops)
                if cut is not None:
                    reply = reply[:cut]
                    break
                # Hold back a tail that could still grow into a stop string.
                safe = len(reply) - _longest_stop_prefix(reply, stops)
                if safe > sent:
                    yield reply[sent:safe]
                    sent = safe
            if len(reply) > sent:
                yield reply[sent:]
        finally:
            self.turns.append((ASSISTANT, reply.strip()))

    def ask(self, text: str, image=None, config: GenerationConfig | None = None) -> str:
        return "".join(self.send(text, image, config))


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _longest_stop_prefix(text: str, stops: tuple[str, ...]) -> int:
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                best = max(best, n)
                break
    return best
