"""The embedding API for desktop apps: load a bundle (or a model folder), chat with it.

>>> import llava_edge
>>> assistant = llava_edge.load("my-bundle")            # runtime="auto": the best one installed
>>> chat = assistant.chat(max_new_tokens=64)
>>> for piece in chat.send("What is in the picture?", image="photo.png"):
...     print(piece, end="", flush=True)
>>> print(chat.ask("And what colour is it?"))           # image not re-encoded, KV prefix reused

``runtime="auto"`` tries, in order, the runtimes of :data:`AUTO_ORDER` for the kind of folder given
and takes the first that is installed and whose components the bundle holds; ``order=[...]`` replaces
that order (third-party runtimes registered under ``llava_edge.runtimes`` may be named there).

This module imports no runtime until one is chosen, and never torch unless the torch runtime is: a
desktop app that ships a GGUF bundle installs numpy, Pillow, tokenizers and llama-cpp-python only.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

from llava_edge.errors import ModelError, RuntimeNotAvailable, UserError
from llava_edge.export.bundle import Manifest, is_bundle, read_manifest
from llava_edge.model.templates import ASSISTANT, IMAGE_PLACEHOLDER, ROLE_ALIASES, USER
from llava_edge.runtimes.chat import Conversation
from llava_edge.runtimes.registry import get_runtime_class, runtime_names
from llava_edge.runtimes.sampling import GenerationConfig

BUNDLE, MODEL = "bundle", "model"

#: What ``runtime="auto"`` tries, best first, per kind of folder. TensorRT first where the bundle has
#: engines built for this machine's GPU (it is tried only then); then llama.cpp: its 4-bit GGUF is
#: the smallest file and the fastest CPU decoder we measured (benchmarks/bench_runtimes_tiny.md);
#: then onnxruntime. torch runs only model folders: it is the reference, not a deployment runtime.
AUTO_ORDER: dict[str, tuple[str, ...]] = {BUNDLE: ("tensorrt", "llamacpp", "onnx"), MODEL: ("torch",)}

#: The ONNX parts the ``onnx`` runtime loads (llava_edge.export.onnx.specs.PARTS; a test keeps the two
#: equal — importing specs here would import onnx).
ONNX_PARTS = ("vision", "projector", "embeddings", "decoder")

#: Bundle components each built-in bundle runtime needs. A third-party runtime may say itself with a
#: ``supports(path) -> bool`` classmethod; without one it is simply tried.
BUNDLE_NEEDS: dict[str, tuple[str, ...]] = {
    "llamacpp": ("gguf/model",),
    "onnx": tuple(f"onnx/{p}" for p in ONNX_PARTS),
    "tensorrt": tuple(f"tensorrt/{p}" for p in ONNX_PARTS),
}

#: Which kinds of folder each built-in runtime opens.
RUNTIME_KINDS: dict[str, tuple[str, ...]] = {"torch": (MODEL,), "llamacpp": (BUNDLE,), "onnx": (BUNDLE,),
                                             "tensorrt": (BUNDLE,)}

_KIND_NAMES = {BUNDLE: "bundles", MODEL: "model folders"}

#: ``threads=`` of :func:`load` is passed to each runtime's ``open`` under this name.
THREAD_OPTION = {"llamacpp": "n_threads", "onnx": "threads"}

#: Generation settings ``send``/``chat`` accept (GenerationConfig's fields) and their aliases.
_GEN_FIELDS = {f.name for f in fields(GenerationConfig)}
_GEN_ALIASES = {"max_tokens": "max_new_tokens"}


# --------------------------------------------------------------------------------------------------
# choosing a runtime
# --------------------------------------------------------------------------------------------------
def source_kind(path: str | Path) -> str:
    """``"bundle"`` (manifest.json) or ``"model"`` (config.json); a clear error otherwise."""
    path = Path(path).expanduser()
    if is_bundle(path):
        return BUNDLE
    if (path / "config.json").is_file():
        return MODEL
    if not path.exists():
        raise ModelError(f"{path}: no such bundle or model folder")
    raise ModelError(f"{path}: neither a bundle (manifest.json) nor a model folder (config.json); "
                     "make a bundle with `llava-edge export MODEL --out DIR`")


def bundle_needs(name: str, options: dict | None = None) -> tuple[str, ...]:
    """The bundle components runtime ``name`` opened with ``options`` needs (the onnx runtime can
    run the TensorRT ONNX parts: ``components="tensorrt-onnx"``)."""
    components = (options or {}).get("components")
    if name == "onnx" and components:
        return tuple(f"{components}/{p}" for p in ONNX_PARTS)
    return BUNDLE_NEEDS.get(name, ())


def why_not(name: str, path: str | Path, kind: str | None = None,
            manifest: Manifest | None = None, options: dict | None = None) -> str | None:
    """Why runtime ``name`` (opened with ``options``) cannot run ``path`` — not installed, wrong kind
    of folder, components missing — or None when it can (as far as can be told without loading)."""
    path = Path(path).expanduser()
    kind = kind or source_kind(path)
    kinds = RUNTIME_KINDS.get(name)
    if kinds is not None and kind not in kinds:
        return (f"runs {' and '.join(_KIND_NAMES[k] for k in kinds)} only"
                + (f"; {path} is a bundle" if kind == BUNDLE else f"; {path} is a model folder"))
    if kind == BUNDLE and bundle_needs(name, options):
        manifest = manifest or read_manifest(path)
        missing = [k for k in bundle_needs(name, options) if k not in manifest.components]
        if missing:
            return f"the bundle has no {', '.join(missing)}"
    try:
        cls = get_runtime_class(name)
    except RuntimeNotAvailable as exc:
        return str(exc)
    supports = getattr(cls, "supports", None)
    if callable(supports) and not supports(path):
        return f"{cls.__name__}.supports() says no"
    return None


def runtimes_for(path: str | Path) -> dict[str, str | None]:
    """Every registered runtime -> None if it can run ``path``, else why not (for ``inspect``)."""
    kind = source_kind(path)
    manifest = read_manifest(path) if kind == BUNDLE else None
    return {name: why_not(name, path, kind, manifest) for name in runtime_names()}


def runtime_options(cls) -> list[str] | None:
    """The options a runtime class's ``open`` takes: its keyword parameters, plus the base
    :class:`Runtime`'s ``image_cache_size`` when it forwards ``**kwargs`` to it. None: cannot tell."""
    from llava_edge.runtimes.base import Runtime

    params = inspect.signature(cls.open).parameters
    names = [n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)][1:]
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        if not issubclass(cls, Runtime):
            return None
        names.append("image_cache_size")
    return names


def _open(name: str, path: Path, options: dict):
    cls = get_runtime_class(name)
    takes = runtime_options(cls)
    unknown = sorted(set(options) - set(takes)) if takes is not None else []
    if unknown:
        raise UserError(f"runtime {name!r} does not take the option(s) {', '.join(unknown)} "
                        f"(it takes: {', '.join(takes) or 'none'})")
    return cls.open(path, **options)


def load(bundle_or_model: str | Path, runtime: str = "auto", *, order: Sequence[str] | None = None,
         threads: int | None = None, **options) -> Assistant:
    """Open a bundle (or a model folder) on a runtime and return an :class:`Assistant`.

    ``runtime``: a registered name (``llava-edge runtimes``) or ``"auto"``: the first of ``order``
    (default :data:`AUTO_ORDER` for the kind of folder) that is installed and that the folder has the
    files for. A runtime that fails to load for another reason (a damaged file) raises: ``auto`` does
    not hide a broken bundle behind a slower runtime. ``threads``: CPU threads of the llamacpp/onnx
    runtimes. Other ``options`` go to the chosen runtime's ``open`` (e.g. ``vision="mmproj"`` or
    ``quant="Q4_K_M"`` for llamacpp, ``provider="cuda"`` for onnx, ``dtype="float16"`` for torch).
    """
    path = Path(bundle_or_model).expanduser()
    kind = source_kind(path)
    manifest = read_manifest(path) if kind == BUNDLE else None
    if runtime != "auto":
        if order is not None:
            raise UserError(f"order= is for runtime='auto'; runtime={runtime!r} was named")
        candidates = [runtime]
    else:
        candidates = list(order) if order is not None else list(AUTO_ORDER[kind])
        if not candidates:
            raise UserError("order= is empty; name at least one runtime")
    tried: list[tuple[str, str]] = []
    for name in candidates:
        reason = why_not(name, path, kind, manifest, options)
        if reason is None:
            opts = dict(options)
            if threads is not None and name in THREAD_OPTION:
                opts.setdefault(THREAD_OPTION[name], threads)
            try:
                return Assistant(_open(name, path, opts), source=path, kind=kind, tried=tried)
            except RuntimeNotAvailable as exc:  # e.g. llamacpp's ONNX vision path without onnxruntime
                reason = str(exc)
        if runtime != "auto":
            raise RuntimeNotAvailable(f"runtime {name!r} cannot run {path}: {reason}")
        tried.append((name, reason))
    raise RuntimeNotAvailable(f"no runtime can run {path}: "
                              + "; ".join(f"{n}: {r}" for n, r in tried))


# --------------------------------------------------------------------------------------------------
# Assistant and Chat
# --------------------------------------------------------------------------------------------------
class _Turn:
    """One reply at a time per runtime: other threads wait; the same thread interleaving two
    replies (which would deadlock) gets an error instead."""

    def __init__(self):
        self._lock = threading.Lock()
        self._owner: int | None = None

    @contextmanager
    def __call__(self):
        me = threading.get_ident()
        if self._owner == me:
            raise UserError("another reply of this assistant is still streaming in this thread; "
                            "read it to the end (or close it) before sending again")
        with self._lock:
            self._owner = me
            try:
                yield
            finally:
                self._owner = None


class Assistant:
    """A loaded model on one runtime. Cheap to share: chats keep their own history; images are
    encoded once per assistant (a cache by image content) and replies run one at a time."""

    def __init__(self, runtime, *, source: Path, kind: str, tried: Iterable[tuple[str, str]] = ()):
        self.runtime = runtime
        self.source = source
        self.kind = kind
        #: Runtimes ``auto`` passed over before this one, with the reason.
        self.skipped: list[tuple[str, str]] = list(tried)
        self._turn = _Turn()

    @property
    def runtime_name(self) -> str:
        return self.runtime.name

    def chat(self, **gen) -> Chat:
        """A new conversation; ``gen`` are its default generation settings (:class:`GenerationConfig`
        fields: max_new_tokens, temperature, top_p, top_k, seed, stop, stop_token_ids)."""
        return Chat(self, generation_config(**gen))

    def ask(self, text: str, image=None, **gen) -> str:
        """One question in a new conversation; the whole reply."""
        return self.chat().ask(text, image, **gen)

    def close(self) -> None:
        """Free the runtime's memory now (llama.cpp's contexts; other runtimes on garbage collection)."""
        close = getattr(self.runtime, "close", None)
        if callable(close):
            close()

    def __enter__(self) -> Assistant:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Assistant({str(self.source)!r}, runtime={self.runtime_name!r})"


@dataclass
class ReplyInfo:
    """What the last reply of a chat cost and why it ended (``"stop"`` or ``"length"``)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"


class _Metered:
    """The runtime as :class:`Conversation` sees it, counting the tokens of each reply."""

    def __init__(self, runtime, info: ReplyInfo):
        self._runtime = runtime
        self._info = info

    def __getattr__(self, name):
        return getattr(self._runtime, name)

    def generate(self, prompt, config: GenerationConfig):
        info = self._info
        info.prompt_tokens, info.completion_tokens, info.finish_reason = len(prompt.input_ids), 0, "stop"
        for token in self._runtime.generate(prompt, config):
            info.completion_tokens += 1
            yield token
        if info.completion_tokens >= config.max_new_tokens:
            info.finish_reason = "length"


class Chat:
    """A conversation: ``send`` streams the reply as text and keeps the history."""

    def __init__(self, assistant: Assistant, defaults: GenerationConfig):
        self.assistant = assistant
        self.defaults = defaults
        self.last = ReplyInfo()
        self._conversation = Conversation(_Metered(assistant.runtime, self.last))

    @property
    def history(self) -> list[dict]:
        """The turns so far: ``{"role": "user"|"assistant", "content": text}``; images appear as
        ``<image>`` in the user text."""
        return [{"role": role, "content": text} for role, text in self._conversation.turns]

    @property
    def n_images(self) -> int:
        return len(self._conversation._images)

    def add(self, role: str, text: str, images: Sequence | None = None) -> None:
        """Append a turn without generating (to replay a stored conversation). Images (paths, bytes,
        PIL images, arrays) go with user turns; each is encoded now, once per distinct image. With no
        ``<image>`` in ``text`` the images are placed before it, else one ``<image>`` each."""
        if role not in ROLE_ALIASES:
            raise UserError(f"unknown role {role!r}; use user or assistant")
        role = ROLE_ALIASES[role]
        images = list(images or ())
        if not isinstance(text, str):
            raise UserError(f"message text must be a string, got {type(text).__name__}")
        expected = USER if len(self._conversation.turns) % 2 == 0 else ASSISTANT
        if role != expected:
            raise UserError(f"expected the {expected}'s turn next, got the {role}'s "
                            "(turns alternate, user first)")
        n_marks = text.count(IMAGE_PLACEHOLDER)
        if role == ASSISTANT and (images or n_marks):
            raise UserError("images go with user turns, not assistant turns")
        if images and n_marks == 0:
            text = f"{IMAGE_PLACEHOLDER}\n" * len(images) + text
        elif n_marks != len(images):
            raise UserError(f"the text has {n_marks} {IMAGE_PLACEHOLDER} placeholder(s) but "
                            f"{len(images)} image(s) were given")
        if images:
            with self.assistant._turn():
                encoded = [self.assistant.runtime._encode_with_key(image) for image in images]
            self._conversation._images.extend(encoded)
        self._conversation.turns.append((role, text))

    def respond(self, **gen) -> Iterator[str]:
        """Stream the assistant's reply to the conversation as it stands (ending on a user turn)."""
        if not self._conversation.turns or self._conversation.turns[-1][0] != USER:
            raise UserError("nothing to reply to: the conversation must end with a user turn")
        config = generation_config(self.defaults, **gen)
        return self._stream(config)

    def _stream(self, config: GenerationConfig) -> Iterator[str]:
        with self.assistant._turn():
            yield from self._conversation.respond(config)

    def send(self, text: str, image=None, **gen) -> Iterator[str]:
        """Add a user message (with an image, or a list of images) and stream the reply. The text and
        images are checked, and images encoded, before this returns."""
        images = [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]
        config = generation_config(self.defaults, **gen)  # a bad setting fails before the turn is added
        self.add(USER, text, images)
        return self._stream(config)

    def ask(self, text: str, image=None, **gen) -> str:
        """``send`` and return the whole reply."""
        return "".join(self.send(text, image, **gen))

    def reset(self) -> None:
        """Forget the history (encoded images stay in the assistant's cache)."""
        self._conversation.turns.clear()
        self._conversation._images.clear()


def generation_config(base: GenerationConfig | None = None, **gen) -> GenerationConfig:
    """``base`` with ``gen`` applied; ``max_tokens`` is accepted for ``max_new_tokens``, ``stop`` may
    be one string. Unknown names are an error (a typo should not be silently ignored)."""
    values = {} if base is None else {f.name: getattr(base, f.name) for f in fields(GenerationConfig)}
    for key, value in gen.items():
        key = _GEN_ALIASES.get(key, key)
        if key not in _GEN_FIELDS:
            raise UserError(f"unknown generation setting {key!r}; use: {', '.join(sorted(_GEN_FIELDS))}")
        if key == "stop":
            value = (value,) if isinstance(value, str) else tuple(value or ())
        if key == "stop_token_ids":
            value = tuple(value or ())
        values[key] = value
    return GenerationConfig(**values)
