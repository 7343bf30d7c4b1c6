"""Runtime specs: one string names a model, the runtime that runs it, and the runtime's options.

Grammar (what ``--reference`` / ``--candidate`` take)::

    [LABEL=]RUNTIME:PATH[?KEY=VALUE[&KEY=VALUE...]]     (',' also separates options)
    PATH                                  runtime inferred from the folder

    torch:runs/demo/stage2                         fp32 (the torch runtime's default)
    fp16=torch:runs/demo/stage2?dtype=float16      labelled "fp16" in every table and plot
    onnx:runs/demo/bundle-int4
    llamacpp:runs/demo/bundle-int4?quant=Q4_K_M,vision=mmproj

``RUNTIME`` is any registered runtime (``llava-edge runtimes``). Options are passed to the runtime's
``open`` as keyword arguments; values that read as a bool (true/false), an int or a float become one,
anything else stays a string. A bare PATH means ``torch`` for a model folder (``config.json``) and the
runtime of the bundle's only format for a bundle (``onnx`` for onnx/, ``llamacpp`` for gguf/).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from llava_edge.errors import UserError
from llava_edge.export.bundle import is_bundle, read_manifest
from llava_edge.runtimes.registry import open_runtime, runtime_names

#: Which bundle formats each runtime reads (the ``<format>/`` prefix of manifest component keys);
#: used for file sizes and to infer a bare bundle path's runtime. A runtime can report its own files
#: exactly with an optional ``model_files()`` method; this table is the fallback.
RUNTIME_FORMATS: dict[str, tuple[str, ...]] = {
    "onnx": ("onnx",),
    "llamacpp": ("gguf",),
    "tensorrt": ("tensorrt",),
}

_SPEC = re.compile(
    r"^(?:(?P<label>[A-Za-z0-9_.+-]+)=)?(?P<runtime>[A-Za-z][A-Za-z0-9_-]*):(?P<rest>.+)$", re.S)
_LABEL = re.compile(r"^[A-Za-z0-9_.+-]+$")


@dataclass
class RuntimeSpec:
    """A parsed spec. ``str(spec)`` gives back a string that parses to the same spec."""

    runtime: str
    path: Path
    options: dict = field(default_factory=dict)
    label: str = ""

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if not self.label:
            self.label = default_label(self.runtime, self.path, self.options)

    def __str__(self) -> str:
        query = "&".join(f"{k}={_format_value(v)}" for k, v in self.options.items())
        return f"{self.label}={self.runtime}:{self.path}" + (f"?{query}" if query else "")

    def check(self) -> None:
        """Fail now, with a clear message, if the path is missing (before any model is loaded)."""
        if not self.path.exists():
            raise UserError(f"{self.label}: {self.path}: no such model folder or bundle")

    def open(self):
        """Load the model on its runtime (the registry's ``open_runtime``)."""
        self.check()
        return open_runtime(self.path, runtime=self.runtime, **self.options)


def parse_spec(text: str) -> RuntimeSpec:
    """``[LABEL=]RUNTIME:PATH[?K=V&...]`` or a bare ``PATH``; see the module docstring."""
    if isinstance(text, RuntimeSpec):
        return text
    text = str(text).strip()
    if not text:
        raise UserError("empty runtime spec; expected RUNTIME:PATH, e.g. torch:runs/demo/stage2")
    match = _SPEC.match(text)
    # "C:\models\x" is a Windows path, not the runtime "C".
    if match is None or (len(match["runtime"]) == 1 and match["runtime"] not in runtime_names()):
        label, path_and_query = _split_label(text)
        path, options = _split_query(path_and_query, text)
        return RuntimeSpec(infer_runtime(path, text), path, options, label)
    runtime = match["runtime"]
    if runtime not in runtime_names():
        raise UserError(f"spec {text!r}: unknown runtime {runtime!r}; available: "
                        f"{', '.join(runtime_names())} (form: [LABEL=]RUNTIME:PATH[?KEY=VALUE&...])")
    path, options = _split_query(match["rest"], text)
    return RuntimeSpec(runtime, path, options, match["label"] or "")


def infer_runtime(path: Path, text: str = "") -> str:
    """``torch`` for a model folder; the runtime of a bundle's only format; else a clear error."""
    path = Path(path)
    if (path / "config.json").is_file():
        return "torch"
    if is_bundle(path):
        formats = read_manifest(path).formats()
        runtimes = [rt for rt, fmts in RUNTIME_FORMATS.items() if set(fmts) & set(formats)]
        if len(runtimes) == 1:
            return runtimes[0]
        examples = " or ".join(f"{r}:{path}" for r in runtimes) or f"onnx:{path}"
        raise UserError(f"spec {text or str(path)!r}: the bundle holds {', '.join(formats) or 'no'} "
                        f"files; name the runtime, e.g. {examples}")
    if not path.exists():
        raise UserError(f"spec {text or str(path)!r}: {path}: no such model folder or bundle")
    raise UserError(f"spec {text or str(path)!r}: {path} is neither a model folder (config.json) nor a "
                    "bundle (manifest.json); name the runtime: RUNTIME:PATH")


def default_label(runtime: str, path: Path, options: dict) -> str:
    """``runtime-folder`` plus the option values (``torch-model-float16``): short, distinct for the
    usual comparisons, and itself a valid label."""
    parts = [runtime, Path(path).name or "model"] + [_format_value(v) for v in options.values()]
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", "-".join(parts))


def model_bytes(spec: RuntimeSpec | None, runtime=None) -> int | None:
    """Bytes of the files a runtime loads: its ``model_files()`` if it has one; else the bundle
    components it reads (:func:`bundle_components`); else a model folder's weights. None: unknown."""
    files = getattr(runtime, "model_files", None)
    if callable(files):
        return sum(Path(f).stat().st_size for f in files())
    if spec is None or not spec.path.exists():
        return None
    if is_bundle(spec.path):
        manifest = read_manifest(spec.path)
        total = 0
        for key in bundle_components(spec, manifest, runtime):
            comp = manifest.components[key]
            total += comp.bytes + sum((spec.path / rel).stat().st_size for rel in comp.extra_files
                                      if (spec.path / rel).is_file())
        return total or None
    weights = list(spec.path.glob("*.safetensors"))
    return sum(w.stat().st_size for w in weights) or None


def bundle_components(spec: RuntimeSpec, manifest, runtime=None) -> list[str]:
    """Manifest keys of the components a runtime reads: every component of its format(s), except
    for llama.cpp, whose bundle may hold several precisions and two vision paths."""
    if spec.runtime == "llamacpp":
        return _llamacpp_components(spec.options, manifest, runtime)
    formats = RUNTIME_FORMATS.get(spec.runtime, (spec.runtime,))
    return [k for k in manifest.components if k.split("/", 1)[0] in formats]


def _llamacpp_components(options: dict, manifest, runtime) -> list[str]:
    """The ``quant`` decoder, and the vision path the runtime chose (its ``vision`` attribute:
    "auto" is resolved at open) or was asked for: ONNX vision + projector, or the mmproj."""
    keys = [_pick_component(manifest, "gguf/model", options.get("quant"))]
    vision = getattr(runtime, "vision", None) or options.get("vision")
    if vision == "onnx":
        keys += [k for k in ("onnx/vision", "onnx/projector") if k in manifest.components]
    elif vision != "none":
        keys.append(_pick_component(manifest, "gguf/mmproj", options.get("mmproj_quant")))
    return [k for k in keys if k is not None]


def _pick_component(manifest, part: str, precision) -> str | None:
    """``part`` at ``precision`` (keys ``part`` or ``part-...``, as the llamacpp runtime picks)."""
    if precision is None:
        return part if part in manifest.components else None
    for key, comp in manifest.components.items():
        if (key == part or key.startswith(part + "-")) and comp.precision.upper() == str(precision).upper():
            return key
    return None


def _split_label(text: str) -> tuple[str, str]:
    head, sep, tail = text.partition("=")
    if sep and _LABEL.match(head) and not Path(text).exists():
        return head, tail
    return "", text


def _split_query(rest: str, text: str) -> tuple[Path, dict]:
    path, _, query = rest.partition("?")
    if not path:
        raise UserError(f"spec {text!r}: no path; expected RUNTIME:PATH")
    options = {}
    for pair in filter(None, re.split(r"[&,]", query)):
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"spec {text!r}: option {pair!r} is not KEY=VALUE")
        options[key.strip()] = _parse_value(value.strip())
    return Path(path).expanduser(), options


def _parse_value(value: str):
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _format_value(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
