"""The bundle: the folder a desktop app ships, described by ``manifest.json``.

Layout::

    BUNDLE/
      manifest.json         this module's Manifest
      tokenizer.json        (+ tokenizer_config.json) the model's tokenizer
      onnx/ gguf/ tensorrt/ one sub-folder per format

Components are keyed ``"<format>/<part>"`` (``onnx/vision``, ``onnx/decoder``, ``gguf/model``,
``gguf/mmproj`` ...) and carry file, format, precision, sha256 and size. Runtimes read only the
bundle, never the training checkpoint; this module needs neither torch nor transformers.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llava_edge.errors import ModelError
from llava_edge.model.image import PreprocessConfig
from llava_edge.model.templates import get_template
from llava_edge.model.tokenizer import Tokenizer
from llava_edge.utils.atomic import atomic_dir, atomic_write_text

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class Component:
    file: str  # relative to the bundle root
    format: str  # onnx, onnx-data, gguf, tensorrt
    precision: str  # fp32, fp16, int8, int4, Q4_K_M ...
    sha256: str
    bytes: int
    extra_files: list[str] = field(default_factory=list)  # e.g. ONNX external data, same checks
    details: dict = field(default_factory=dict)  # writer-specific facts (opset, quant options ...)


@dataclass
class Manifest:
    model_name: str
    source: str  # where the model came from (a path)
    source_sha256: str  # of the source weights, to tie a bundle to its checkpoint
    preprocess: dict
    n_image_tokens: int
    image_token_id: int
    d_model: int
    vocab_size: int
    template: str
    chat_template_jinja: str
    stop: list[str]
    bos_id: int
    eos_id: int
    components: dict[str, Component] = field(default_factory=dict)
    drift: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, d: dict, source: str = MANIFEST) -> Manifest:
        if d.get("format_version") != FORMAT_VERSION:
            raise ModelError(f"{source}: bundle format version {d.get('format_version')!r} is not "
                             f"supported (this llava-edge reads version {FORMAT_VERSION})")
        try:
            comps = {k: Component(**v) for k, v in d.get("components", {}).items()}
            return cls(**{**d, "components": comps})
        except TypeError as exc:
            raise ModelError(f"{source}: malformed manifest ({exc})") from None

    @property
    def preprocess_config(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self.preprocess)

    def formats(self) -> list[str]:
        return sorted({k.split("/", 1)[0] for k in self.components})


def is_bundle(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(bundle: str | Path) -> Manifest:
    bundle = Path(bundle)
    path = bundle / MANIFEST
    if not bundle.exists():
        raise ModelError(f"{bundle}: no such bundle folder")
    if not path.is_file():
        raise ModelError(f"{bundle}: no {MANIFEST}; not a llava-edge bundle (create one with "
                         "`llava-edge export MODEL --out DIR`)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: not valid JSON ({exc})") from None
    return Manifest.from_dict(data, source=str(path))


def component_path(bundle: str | Path, manifest: Manifest, key: str, *, verify: bool = False) -> Path:
    """The file of component ``key``; checks it (and its extra files) exist and have the recorded
    size, and with ``verify`` also the sha256. A clear error rather than a crash in a runtime."""
    bundle = Path(bundle)
    if key not in manifest.components:
        raise ModelError(f"{bundle}: the bundle has no component {key!r} "
                         f"(it has: {', '.join(manifest.components) or 'none'})")
    comp = manifest.components[key]
    files = [comp.file, *comp.extra_files]
    for rel in files:
        p = bundle / rel
        if not p.is_file():
            raise ModelError(f"{bundle}: component {key!r} is missing its file {rel}")
    main = bundle / comp.file
    if main.stat().st_size != comp.bytes:
        raise ModelError(f"{main}: {main.stat().st_size} bytes, the manifest says {comp.bytes}: "
                         "the file is truncated or was replaced; re-export the bundle")
    if verify:
        verify_component(bundle, key, comp)
    return main


def verify_component(bundle: Path, key: str, comp: Component) -> None:
    digest = sha256_file(bundle / comp.file)
    if digest != comp.sha256:
        raise ModelError(f"{bundle / comp.file}: sha256 {digest[:12]}... does not match the "
                         f"manifest's {comp.sha256[:12]}... for {key!r}; the file is corrupt or "
                         "was replaced: re-export the bundle")
    for rel in comp.extra_files:
        want = comp.details.get("extra_sha256", {}).get(rel)
        if want and sha256_file(bundle / rel) != want:
            raise ModelError(f"{bundle / rel}: sha256 does not match the manifest for {key!r}")


def verify_bundle(bundle: str | Path) -> Manifest:
    """Check every component's files and checksums; returns the manifest."""
    manifest = read_manifest(bundle)
    for key in manifest.components:
        component_path(bundle, manifest, key, verify=True)
    return manifest


def load_bundle_tokenizer(bundle: str | Path) -> Tokenizer:
    return Tokenizer.from_folder(bundle)


class BundleWriter:
    """Collects components into a temporary folder; :func:`write_bundle` renames it into place."""

    def __init__(self, root: Path, manifest: Manifest):
        self.root = root
        self.manifest = manifest

    def path(self, rel: str) -> Path:
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def add(self, key: str, rel: str, *, format: str, precision: str,
            extra_files: list[str] = (), details: dict | None = None) -> Component:
        """Record a component whose file(s) were written under ``self.path(rel)``."""
        main = self.root / rel
        details = dict(details or {})
        if extra_files:
            details["extra_sha256"] = {r: sha256_file(self.root / r) for r in extra_files}
        comp = Component(file=rel, format=format, precision=precision, sha256=sha256_file(main),
                         bytes=main.stat().st_size, extra_files=list(extra_files), details=details)
        self.manifest.components[key] = comp
        return comp


def manifest_for_model(model_dir: str | Path) -> Manifest:
    """A manifest skeleton from a checkpoint folder (no weights loaded)."""
    from llava_edge.model.loading import read_model_info

    info = read_model_info(model_dir)
    config = json.loads((info.path / "config.json").read_text())
    tokenizer = Tokenizer.from_folder(info.path)
    h = hashlib.sha256()
    for weights in sorted(info.path.glob("*.safetensors")):
        h.update(sha256_file(weights).encode())
    return Manifest(
        model_name=info.path.name, source=str(info.path.resolve()), source_sha256=h.hexdigest(),
        preprocess=info.preprocess.to_dict(), n_image_tokens=info.n_image_tokens,
        image_token_id=info.image_token_id, d_model=config["text_config"]["hidden_size"],
        vocab_size=config["text_config"]["vocab_size"], template=info.template.name,
        chat_template_jinja=get_template(info.template.name).jinja, stop=list(info.template.stop),
        bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
    )


@contextmanager
def write_bundle(model_dir: str | Path, out: str | Path, *, overwrite: bool = False):
    """Yield a :class:`BundleWriter` over a temporary folder with the tokenizer copied in; on
    success the manifest is written and the folder renamed to ``out`` (atomic)."""
    manifest = manifest_for_model(model_dir)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for name in TOKENIZER_FILES:
            src = Path(model_dir) / name
            if src.is_file():
                shutil.copy2(src, tmp / name)
        writer = BundleWriter(tmp, manifest)
        yield writer
        atomic_write_text(tmp / MANIFEST, manifest.to_json())


@contextmanager
def extend_bundle(bundle: str | Path, folder: str, *, model_dir: str | Path | None = None):
    """A :class:`BundleWriter` over a copy of the existing ``bundle`` (files hard-linked where the
    file system allows) without its ``folder`` (``gguf``, ``tensorrt``, ``tensorrt/engines`` ...) and
    the components stored there, to add them anew; renamed over the bundle on success, so an
    interrupted export leaves the bundle as it was. ``model_dir``: the checkpoint the new files come
    from, which must be the one the bundle was exported from."""
    bundle = Path(bundle)
    if not is_bundle(bundle):
        raise ModelError(f"{bundle}: cannot add {folder} files: no bundle there (no {MANIFEST})")
    manifest = read_manifest(bundle)
    if model_dir is not None and manifest_for_model(model_dir).source_sha256 != manifest.source_sha256:
        raise ModelError(f"{bundle}: the bundle was exported from another checkpoint than {model_dir} "
                         "(source checksums differ); export into a new folder instead")
    manifest.components = {k: c for k, c in manifest.components.items()
                           if not c.file.startswith(folder + "/")}
    skip = {MANIFEST, folder}

    def ignore(directory: str, names: list[str]) -> list[str]:
        rel = Path(directory).relative_to(bundle)
        return [n for n in names if (rel / n).as_posix() in skip]

    with atomic_dir(bundle, overwrite=True) as tmp:
        shutil.copytree(bundle, tmp, dirs_exist_ok=True, copy_function=_link_or_copy, ignore=ignore)
        writer = BundleWriter(tmp, manifest)
        yield writer
        atomic_write_text(tmp / MANIFEST, manifest.to_json())


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
