"""Check a bundle the way a desktop app will use it, and describe it.

``verify_bundle_full(bundle)`` is ``llava-edge verify BUNDLE``:

1. the manifest: chat template, preprocessing and tokenizer are usable and agree with each other;
2. every component's files: present, of the recorded size, with the recorded sha256;
3. every component loads in a runtime that can load it (each GGUF quant, each mmproj, the ONNX parts,
   the Ollama Modelfile's ``FROM`` files); components no installed runtime loads are reported as
   skipped, with why;
4. a smoke generation on every runtime opened: a question about an image, greedy, a few tokens, and
   the prompt's logits all finite (a broken quantization shows as NaN/inf here).

It returns a :class:`VerifyReport` (``report.ok``: nothing failed; ``report.complete``: nothing was
skipped); nothing is raised for a damaged component, every problem is one line of the report.

``inspect_bundle(bundle)`` is ``llava-edge inspect BUNDLE``: the manifest as a dict (components,
formats, precisions, sizes, preprocessing, template, drift summary, runtimes that can run it), read
without loading a model; :func:`format_inspect` renders it as text.
"""

from __future__ import annotations

import gc
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from llava_edge.errors import UserError
from llava_edge.export.bundle import (
    TOKENIZER_FILES, Manifest, component_path, read_manifest,
)

OK, FAILED, SKIPPED = "ok", "failed", "skipped"
SMOKE_PROMPT = "What is in the picture?"


@dataclass
class Check:
    name: str
    status: str  # ok, failed, skipped
    detail: str = ""
    components: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class VerifyReport:
    bundle: str
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Nothing failed."""
        return not self.failed

    @property
    def complete(self) -> bool:
        """Nothing was skipped (every component was loaded by some runtime)."""
        return not self.skipped

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == FAILED]

    @property
    def skipped(self) -> list[Check]:
        return [c for c in self.checks if c.status == SKIPPED]

    def add(self, name: str, status: str, detail: str = "", components=(), seconds: float = 0.0) -> Check:
        check = Check(name, status, detail, list(components), round(seconds, 3))
        self.checks.append(check)
        return check

    def to_dict(self) -> dict:
        return {"bundle": self.bundle, "ok": self.ok, "complete": self.complete,
                "checks": [asdict(c) for c in self.checks]}

    def summary(self) -> str:
        lines = [f"{c.status.upper():7} {c.name}" + (f": {c.detail}" if c.detail else "")
                 for c in self.checks]
        verdict = ("bundle OK" if self.ok and self.complete else
                   f"bundle OK, {len(self.skipped)} check(s) skipped" if self.ok else
                   f"bundle BROKEN: {len(self.failed)} check(s) failed")
        return "\n".join([*lines, verdict])


# --------------------------------------------------------------------------------------------------
# verify
# --------------------------------------------------------------------------------------------------
def verify_bundle_full(bundle: str | Path, *, n_tokens: int = 4, image=None, threads: int | None = None,
                       generate: bool = True) -> VerifyReport:
    """Verify ``bundle`` (see the module docstring). ``image``: the smoke test's image (default: a
    synthetic one); ``generate=False`` loads every component but generates nothing."""
    bundle = Path(bundle).expanduser()
    manifest = read_manifest(bundle)  # no manifest: nothing to verify, a ModelError says so
    report = VerifyReport(str(bundle))
    _check_manifest(report, bundle, manifest)
    intact = _check_files(report, bundle, manifest)
    image = smoke_image(manifest.preprocess_config.size) if image is None else image
    accounted: set[str] = set()  # components some check below loads, skips or fails
    for name, options, covers in _load_plan(manifest):
        accounted |= set(covers)
        if not set(covers) <= intact:
            report.add(_label(name, options), SKIPPED, "its files failed the checks above", covers)
            continue
        _load_and_smoke(report, bundle, name, options, covers, image, n_tokens, threads, generate)
    accounted |= _check_modelfile(report, bundle, manifest, intact)
    for key, comp in manifest.components.items():
        if key not in accounted and key in intact:
            report.add(f"load {key}", SKIPPED, f"no runtime loads {comp.format} components", [key])
    return report


def smoke_image(size: int = 64):
    """A deterministic test picture: a colour gradient with a red square."""
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size]
    rgb = np.stack([x * 255 // max(size - 1, 1), y * 255 // max(size - 1, 1),
                    np.full_like(x, 128)], -1).astype(np.uint8)
    q = max(size // 4, 1)
    rgb[q:2 * q, q:2 * q] = (220, 30, 30)
    return Image.fromarray(rgb)


def _check_manifest(report: VerifyReport, bundle: Path, manifest: Manifest) -> None:
    from llava_edge.model.image import PreprocessConfig
    from llava_edge.model.templates import get_template
    from llava_edge.model.tokenizer import Tokenizer

    problems = []
    try:
        template = get_template(manifest.template)
        if manifest.chat_template_jinja and template.jinja != manifest.chat_template_jinja:
            problems.append(f"chat_template_jinja differs from llava-edge's {manifest.template!r} template")
    except UserError as exc:
        problems.append(str(exc))
    try:
        PreprocessConfig.from_dict(manifest.preprocess)
    except (UserError, TypeError, ValueError, KeyError) as exc:
        problems.append(f"preprocessing {manifest.preprocess!r} is invalid ({exc})")
    missing = [f for f in TOKENIZER_FILES[:1] if not (bundle / f).is_file()]
    if missing:
        problems.append(f"no {', '.join(missing)} in the bundle")
    else:
        try:
            tok = Tokenizer.from_folder(bundle)
            ids = (("bos", tok.bos_id, manifest.bos_id), ("eos", tok.eos_id, manifest.eos_id),
                   ("<image>", tok.image_id, manifest.image_token_id))
            for what, have, want in ids:
                if have != want:
                    problems.append(f"the tokenizer's {what} id is {have}, the manifest says {want}")
            if tok.vocab_size > manifest.vocab_size:
                problems.append(f"the tokenizer has {tok.vocab_size} tokens, the model only "
                                f"{manifest.vocab_size}")
        except UserError as exc:
            problems.append(f"tokenizer: {exc}")
    if manifest.n_image_tokens <= 0:
        problems.append(f"n_image_tokens is {manifest.n_image_tokens}")
    if not manifest.components:
        problems.append("the bundle has no components")
    report.add("manifest", FAILED if problems else OK,
               "; ".join(problems) or f"{len(manifest.components)} components, template "
               f"{manifest.template}, {manifest.n_image_tokens} image tokens")


def _check_files(report: VerifyReport, bundle: Path, manifest: Manifest) -> set[str]:
    """sha256 (and size) of every component; returns the keys that passed."""
    intact = set()
    for key, comp in manifest.components.items():
        start = time.perf_counter()
        try:
            component_path(bundle, manifest, key, verify=True)
            for rel, size in comp.details.get("extra_bytes", {}).items():
                if (bundle / rel).stat().st_size != size:
                    raise UserError(f"{bundle / rel}: {(bundle / rel).stat().st_size} bytes, the manifest "
                                    f"says {size}; re-export the bundle")
        except UserError as exc:
            report.add(f"sha256 {key}", FAILED, str(exc), [key], time.perf_counter() - start)
            continue
        intact.add(key)
        report.add(f"sha256 {key}", OK, f"{comp.file} ({_size(_bytes_of(bundle, comp))})", [key],
                   time.perf_counter() - start)
    return intact


def _family(manifest: Manifest, part: str) -> list[tuple[str, str]]:
    """(key, precision) of ``gguf/<part>`` and ``gguf/<part>-<Q>``, the default first."""
    keys = [k for k in manifest.components if k == part or k.startswith(part + "-")]
    keys.sort(key=lambda k: k != part)
    return [(k, manifest.components[k].precision) for k in keys]


def _load_plan(manifest: Manifest) -> list[tuple[str, dict, list[str]]]:
    """(runtime, open options, components it loads) such that every loadable component is loaded
    once: the onnx runtime on the ONNX parts; llamacpp on its default files, then on each further
    GGUF quant and each mmproj (paired, so each file is opened once)."""
    from llava_edge.api import bundle_needs

    comps = manifest.components
    plan = []
    for options in ({}, {"components": "tensorrt-onnx"}):  # the TensorRT parts run in onnxruntime too
        needs = bundle_needs("onnx", options)
        if all(k in comps for k in needs):
            plan.append(("onnx", options, list(needs)))
    models, mmprojs = _family(manifest, "gguf/model"), _family(manifest, "gguf/mmproj")
    vision_onnx = [k for k in ("onnx/vision", "onnx/projector") if k in comps]
    if models:
        if len(vision_onnx) == 2:  # the default path then; the mmproj files are loaded below
            plan.append(("llamacpp", {"vision": "onnx"}, [models[0][0], *vision_onnx]))
            extra_models, extra_mm = models[1:], mmprojs
        else:
            plan.append(("llamacpp", {"vision": "mmproj"} if mmprojs else {},
                         [models[0][0]] + ([mmprojs[0][0]] if mmprojs else [])))
            extra_models, extra_mm = models[1:], mmprojs[1:]
        for i in range(max(len(extra_models), len(extra_mm))):
            model = extra_models[min(i, len(extra_models) - 1)] if extra_models else models[0]
            options, covers = {"quant": model[1]}, [model[0]]
            if mmprojs:
                mm = extra_mm[min(i, len(extra_mm) - 1)] if extra_mm else mmprojs[0]
                options.update(vision="mmproj", mmproj_quant=mm[1])
                covers.append(mm[0])
            plan.append(("llamacpp", options, covers))
    formats = {c.format for c in comps.values()}
    if "tensorrt" in formats or any(k.startswith("tensorrt/") for k in comps):
        plan.append(("tensorrt", {}, [k for k in comps if k.startswith("tensorrt/")]))
    return plan


def _label(name: str, options: dict) -> str:
    opts = " ".join(f"{k}={v}" for k, v in options.items())
    return f"load {name}" + (f" ({opts})" if opts else "")


def _load_and_smoke(report, bundle, name, options, covers, image, n_tokens, threads, generate) -> None:
    from llava_edge.api import THREAD_OPTION, load, why_not
    from llava_edge.errors import RuntimeNotAvailable

    label = _label(name, options)
    reason = why_not(name, bundle, options=options)
    if reason is not None:
        report.add(label, SKIPPED, reason, covers)
        return
    if threads is not None and name in THREAD_OPTION:
        options = {**options, THREAD_OPTION[name]: threads}
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            assistant = load(bundle, runtime=name, **options)
        except RuntimeNotAvailable as exc:  # e.g. the ONNX vision path without onnxruntime
            report.add(label, SKIPPED, str(exc), covers)
            return
        except UserError as exc:
            report.add(label, FAILED, str(exc), covers, time.perf_counter() - start)
            return
    notes = [_short(w.message) for w in caught if issubclass(w.category, UserWarning)]
    vision = getattr(assistant.runtime, "vision", None)
    if vision == "mmproj":
        notes += [f"known upstream defect: {d.split(':')[0]}" for key in covers
                  for d in read_manifest(bundle).components[key].details.get("known_upstream_defects", [])]
    detail = "; ".join(dict.fromkeys(filter(None, [f"vision path {vision}" if vision else "", *notes])))
    report.add(label, OK, detail, covers, time.perf_counter() - start)
    try:
        if generate:
            _smoke(report, assistant, label.replace("load", "generate", 1), covers, image, n_tokens)
    finally:
        assistant.close()
        del assistant
        gc.collect()


def _smoke(report, assistant, label, covers, image, n_tokens) -> None:
    from llava_edge.runtimes.base import Prompt

    start = time.perf_counter()
    chat = assistant.chat(max_new_tokens=n_tokens)
    try:
        reply = chat.ask(SMOKE_PROMPT, image=image)
        conv = chat._conversation
        conv.turns.pop()  # the prompt as it was asked: logits must be finite everywhere
        prompt: Prompt = conv.prompt()
        logits = assistant.runtime.logits(prompt)
    except UserError as exc:
        report.add(label, FAILED, str(exc), covers, time.perf_counter() - start)
        return
    except Exception as exc:  # noqa: BLE001 - a runtime crashing on a bundle is what verify reports
        report.add(label, FAILED, f"{type(exc).__name__}: {exc}", covers, time.perf_counter() - start)
        return
    finite = bool(np.isfinite(logits).all())
    info = chat.last
    detail = (f"{info.completion_tokens} token(s) {reply[:40]!r}, prompt of {info.prompt_tokens} tokens"
              + ("" if finite else f"; {int((~np.isfinite(logits)).sum())} non-finite logits (NaN/inf): "
                 "the file is broken; re-export it"))
    report.add(label, OK if finite else FAILED, detail, covers, time.perf_counter() - start)


def _check_modelfile(report: VerifyReport, bundle: Path, manifest: Manifest, intact: set[str]) -> set[str]:
    """Ollama Modelfiles: two FROM lines naming files that exist. Returns the keys checked."""
    keys = {k for k, c in manifest.components.items() if c.format == "ollama-modelfile"}
    for key in sorted(keys & intact):
        comp = manifest.components[key]
        path = bundle / comp.file
        froms = [line.split(None, 1)[1].strip() for line in path.read_text().splitlines()
                 if line.startswith("FROM ") and len(line.split(None, 1)) == 2]
        missing = [f for f in froms if not (path.parent / f).is_file()]
        if len(froms) != 2 or missing:
            report.add(f"load {key}", FAILED, f"{path}: " + (f"FROM {', '.join(missing)} not found"
                       if missing else f"{len(froms)} FROM lines, Ollama needs 2 (model, projector)"), [key])
        else:
            report.add(f"load {key}", OK, f"FROM {' + '.join(froms)}", [key])
    return keys


# --------------------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------------------
def inspect_bundle(bundle: str | Path) -> dict:
    """What a bundle holds, from its manifest (no model loaded, no checksum computed)."""
    from llava_edge.api import runtimes_for

    bundle = Path(bundle).expanduser()
    manifest = read_manifest(bundle)
    components, by_format, precisions, defects = {}, {}, {}, []
    for key, comp in manifest.components.items():
        fmt = key.split("/", 1)[0]
        size = _bytes_of(bundle, comp)
        components[key] = {"file": comp.file, "format": comp.format, "precision": comp.precision,
                           "bytes": size, "sha256": comp.sha256, "extra_files": comp.extra_files}
        by_format[fmt] = by_format.get(fmt, 0) + size
        precisions.setdefault(fmt, [])
        if comp.precision not in precisions[fmt]:
            precisions[fmt].append(comp.precision)
        for d in comp.details.get("known_upstream_defects", []):
            if d not in defects:
                defects.append(d)
    return {
        "path": str(bundle), "kind": "bundle", "model_name": manifest.model_name,
        "source": manifest.source, "source_sha256": manifest.source_sha256,
        "format_version": manifest.format_version, "formats": manifest.formats(),
        "components": components, "bytes_by_format": by_format, "total_bytes": sum(by_format.values()),
        "precisions": precisions, "preprocessing": manifest.preprocess,
        "n_image_tokens": manifest.n_image_tokens, "image_token_id": manifest.image_token_id,
        "d_model": manifest.d_model, "vocab_size": manifest.vocab_size, "template": manifest.template,
        "stop": manifest.stop, "bos_id": manifest.bos_id, "eos_id": manifest.eos_id,
        "tokenizer_files": [f for f in TOKENIZER_FILES if (bundle / f).is_file()],
        "drift": manifest.drift, "drift_summary": drift_summary(manifest.drift),
        "runtimes": runtimes_for(bundle), "known_upstream_defects": defects,
    }


def drift_summary(drift: dict) -> list[str]:
    """One line per drift entry: a drift-suite summary (``metrics``, ``passed``) as its key numbers,
    anything else (the exporters' per-part checks) as its leaf values."""
    lines = []
    for label, entry in drift.items():
        if isinstance(entry, dict) and "metrics" in entry:
            metrics = ", ".join(f"{k}={_num(v)}" for k, v in entry["metrics"].items() if v is not None)
            verdict = {True: "passed", False: "FAILED"}.get(entry.get("passed"), "not judged")
            lines.append(f"{label}: {verdict} vs {entry.get('reference', '?')}: {metrics}")
            lines += [f"  within chance, not counted: {line}" for line in entry.get("within_chance", [])]
        else:
            leaves = ", ".join(f"{k}={_num(v)}" for k, v in _leaves(entry))
            lines.append(f"{label}: {leaves or 'empty'}")
    return lines


def format_inspect(info: dict) -> str:
    """``inspect_bundle``'s dict as the text ``llava-edge inspect BUNDLE`` prints."""
    pre = info["preprocessing"]
    lines = [
        f"{info['path']}  bundle v{info['format_version']} of {info['model_name']} "
        f"(source sha256 {info['source_sha256'][:12]})",
        f"formats {', '.join(info['formats']) or 'none'}; {_size(info['total_bytes'])} in all",
        f"image {pre.get('size')} px, pad {pre.get('pad')}, {pre.get('resample')}, "
        f"{info['n_image_tokens']} image tokens (id {info['image_token_id']}); decoder {info['d_model']} "
        f"wide, vocab {info['vocab_size']}",
        f"template {info['template']}, stop {info['stop']}, bos {info['bos_id']}, eos {info['eos_id']}, "
        f"tokenizer {', '.join(info['tokenizer_files']) or 'MISSING'}",
        "components:",
    ]
    for key, c in info["components"].items():
        lines.append(f"  {key:20} {c['precision']:8} {_size(c['bytes']):>10}  {c['file']}")
    for fmt, size in info["bytes_by_format"].items():
        lines.append(f"  {fmt + '/ total':20} {', '.join(info['precisions'][fmt]):8} {_size(size):>10}")
    lines.append("drift: " + ("none recorded" if not info["drift_summary"] else ""))
    lines += [f"  {line}" for line in info["drift_summary"]]
    lines.append("runtimes:")
    lines += [f"  {name:10} " + ("can run it" if why is None else f"no: {why}")
              for name, why in info["runtimes"].items()]
    lines += [f"known upstream defect: {d}" for d in info["known_upstream_defects"]]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
def _bytes_of(bundle: Path, comp) -> int:
    return comp.bytes + sum((bundle / rel).stat().st_size for rel in comp.extra_files
                            if (bundle / rel).is_file())


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _num(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if math.isfinite(v) else str(v)
    return str(v)


def _leaves(d, prefix: str = ""):
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _leaves(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(d, (int, float, str, bool)) or d is None:
        yield prefix, d


def _short(message) -> str:
    text = str(message)
    return text if len(text) <= 160 else text[:157] + "..."
