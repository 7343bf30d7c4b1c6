"""``bench``: every runtime on the same bundle, image and prompt, each in its own process.

Targets are written ``[LABEL=]NAME[?KEY=VALUE&...]``: NAME is a registered runtime (options go to its
``open``, as in :func:`llava_edge.load`) or a baseline (``raw-llamacpp``, ``llama-cpp-python``)::

    llamacpp                      our llama.cpp runtime, its default vision path
    llamacpp?vision=mmproj        ... with llama.cpp's own image encoder (same work as the baselines)
    onnx   torch                  (torch needs the model folder: model_dir=, or a model folder source)
    raw-llamacpp                  llama.cpp alone: the floor for our llamacpp runtime's overhead
    llama-cpp-python              Llama + MTMDChatHandler: what an app would use without llava-edge
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from statistics import median

from llava_edge.bench.targets import BASELINES, LLAMA_CPP_PYTHON, RAW_LLAMACPP
from llava_edge.errors import UserError

DEFAULT_PROMPT = "Describe the image in one sentence."
DEFAULT_FOLLOWUP = "What colour is the largest shape?"
METRICS = ("image_encode_ms", "prefill_ms", "ttft_ms", "decode_tok_s", "chat_ttft_ms", "turn2_ttft_ms")
#: How repeats are summarised: the median, or the best run (min time, max tokens/s).
STATISTICS = {
    "median": lambda values, metric: median(values),
    "min": lambda values, metric: max(values) if metric.endswith("tok_s") else min(values),
}
SUMMARY_KEYS = ("label", "target", "options", *METRICS, "prompt_tokens", "decode_tokens")
PACKAGES = ("llava-edge", "llama-cpp-python", "onnxruntime", "torch", "transformers", "numpy")


@dataclass
class Target:
    name: str
    options: dict = field(default_factory=dict)
    label: str = ""

    def __post_init__(self) -> None:
        if not self.label:
            self.label = "-".join([self.name, *(str(v).lower() for v in self.options.values())])

    def __str__(self) -> str:
        """``LABEL=NAME?K=V&...``: parses back to the same target."""
        query = "&".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                         for k, v in self.options.items())
        return f"{self.label}={self.name}" + (f"?{query}" if query else "")


def parse_target(text: str) -> Target:
    """``[LABEL=]NAME[?KEY=VALUE&...]`` (values read as bool/int/float where they can)."""
    from llava_edge.drift.spec import _parse_value

    text = text.strip()
    head, _, query = text.partition("?")
    label, sep, name = head.partition("=")
    if not sep:
        label, name = "", head
    if not name:
        raise UserError(f"bench target {text!r}: no runtime name; e.g. llamacpp or llamacpp?vision=mmproj")
    options = {}
    for pair in filter(None, query.split("&")):
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise UserError(f"bench target {text!r}: option {pair!r} is not KEY=VALUE")
        options[key] = _parse_value(value)
    return Target(name, options, label)


def default_targets(source: Path, model_dir: Path | None = None) -> list[Target]:
    """Everything that can run ``source`` here: our runtimes, llama.cpp's own image encoder when the
    default vision path is ONNX, torch when a model folder is known, and the llama.cpp baselines."""
    from llava_edge.api import BUNDLE, source_kind, why_not
    from llava_edge.export.bundle import read_manifest

    kind = source_kind(source)
    if kind != BUNDLE:
        return [Target("torch")]
    comps = read_manifest(source).components
    out = [Target(n) for n in ("llamacpp", "onnx") if why_not(n, source, kind) is None]
    if any(t.name == "llamacpp" for t in out) and "gguf/mmproj" in comps:
        if "onnx/vision" in comps:
            out.append(Target("llamacpp", {"vision": "mmproj"}))
        out += [Target(RAW_LLAMACPP), Target(LLAMA_CPP_PYTHON)]
    if model_dir is not None:
        out.append(Target("torch"))
    return out


def bench_image(width: int = 640, height: int = 480):
    """A deterministic photo-sized test picture (preprocessing cost depends on the input size)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x + y) % 256], -1).astype(np.uint8)
    rgb[height // 4: height // 2, width // 4: width // 2] = (220, 30, 30)
    return Image.fromarray(rgb)


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(),
            "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "python": platform.python_version(), "packages": versions}


@dataclass
class BenchReport:
    source: str
    settings: dict
    machine: dict
    results: list[dict]
    command: str = ""

    def result(self, label: str) -> dict:
        for r in self.results:
            if r["label"] == label:
                return r
        raise KeyError(label)

    def overheads(self) -> list[dict]:
        """Our llama.cpp runtime against the baselines on the same files: per metric, ours, theirs and
        the difference (a positive ms difference or a negative tok/s difference costs us)."""
        from llava_edge.bench.report import overheads

        return overheads(self)

    def with_statistic(self, statistic: str) -> BenchReport:
        """The same runs summarised by another statistic (``median`` or ``min``)."""
        if statistic not in STATISTICS:
            raise UserError(f"statistic={statistic!r}; choose one of: {', '.join(STATISTICS)}")
        results = []
        for r in self.results:
            raw = {k: v for k, v in r.items() if k not in SUMMARY_KEYS and not k.endswith("_range")}
            results.append(summarise(Target(r["target"], r["options"], r["label"]), raw, statistic))
        return dataclasses.replace(self, settings={**self.settings, "statistic": statistic}, results=results)

    def to_dict(self) -> dict:
        return {"source": self.source, "command": self.command, "settings": self.settings,
                "machine": self.machine, "results": self.results, "overheads": self.overheads()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def table(self):
        from llava_edge.bench.report import rich_table

        return rich_table(self)

    def markdown(self) -> str:
        from llava_edge.bench.report import markdown

        return markdown(self)

    def write(self, out: str | Path, *, png: bool = True) -> dict[str, Path]:
        """``bench.json``, ``bench.md`` and (``png``) ``bench.png`` under ``out``."""
        from llava_edge.bench.report import plot

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / "bench.json", "md": out / "bench.md"}
        paths["json"].write_text(self.to_json())
        paths["md"].write_text(self.markdown())
        if png:
            paths["png"] = plot(self, out / "bench.png")
        return paths


def bench(bundle_or_model: str | Path, runtimes: list[str] | None = None, *, image=None,
          prompt: str = DEFAULT_PROMPT, followup: str = DEFAULT_FOLLOWUP, n_tokens: int = 32,
          repeats: int = 3, rounds: int = 1, threads: int | None = None,
          model_dir: str | Path | None = None, statistic: str = "median", timeout: float = 600,
          out: str | Path | None = None, command: str = "", progress=None) -> BenchReport:
    """Measure each target (see the module docstring; default :func:`default_targets`) in its own
    process: image-encode ms, prefill ms, time to first token, decode tokens/s, chat and second-turn
    time to first text, load ms, peak RSS and file sizes.

    Each target runs ``repeats`` times after one warm-up, in each of ``rounds`` rounds that go over
    all targets in turn (a fresh process per target and round): on a machine shared with other work,
    several rounds spread every target's runs over the same stretch of time, so a busy moment does
    not land on one target only. ``statistic``: ``median`` or ``min`` (the best run: least time, most
    tokens/s — the steadier figure on a busy machine) of all runs. ``image``: a path (default: a
    synthetic 640x480 picture). ``threads``: CPU threads of every target (default: all cores).
    ``out``: also write bench.json / bench.md / bench.png there. ``progress``: called with a line of
    text as each target starts and ends."""
    from llava_edge.api import source_kind

    source = Path(bundle_or_model).expanduser()
    kind = source_kind(source)
    model_dir = Path(model_dir).expanduser() if model_dir else (source if kind == "model" else None)
    if statistic not in STATISTICS:
        raise UserError(f"statistic={statistic!r}; choose one of: {', '.join(STATISTICS)}")
    if n_tokens < 1 or repeats < 1 or rounds < 1:
        raise UserError(f"n_tokens, repeats and rounds must be >= 1 (got {n_tokens}, {repeats}, {rounds})")
    targets = [parse_target(t) if isinstance(t, str) else t for t in runtimes] if runtimes else \
        default_targets(source, model_dir)
    labels = [t.label for t in targets]
    if len(set(labels)) != len(labels):
        raise UserError(f"two bench targets share a label ({', '.join(labels)}); name them LABEL=NAME")
    for t in targets:
        if t.name == "torch" and model_dir is None:
            raise UserError("the torch target runs a model folder: pass model_dir= (--model MODEL)")
        if t.name in BASELINES and kind != "bundle":
            raise UserError(f"{t.name} runs a bundle's GGUF files; {source} is a model folder")
    say = progress or (lambda line: None)
    with tempfile.TemporaryDirectory(prefix="llava-edge-bench-") as tmp:
        image_path = _image_file(image, Path(tmp))
        base = {"source": str(source), "model_dir": str(model_dir) if model_dir else None,
                "image": str(image_path), "prompt": prompt, "followup": followup, "n_tokens": n_tokens,
                "repeats": repeats, "threads": threads}
        load_before = _loadavg()
        raw: dict[str, list[dict]] = {t.label: [] for t in targets}
        for i in range(rounds):
            for t in targets:
                if any(r.get("error") for r in raw[t.label]):
                    continue  # failed once: it will fail again
                at = f" (round {i + 1}/{rounds})" if rounds > 1 else ""
                say(f"{t.label}: running {repeats} x {n_tokens} tokens{at}")
                result = _run_worker({**base, "target": t.name, "options": t.options}, timeout)
                raw[t.label].append(result)
                say(f"{t.label}: " + (f"error: {result['error']}" if result.get("error") else "done"))
        results = [summarise(t, merge_rounds(raw[t.label]), statistic) for t in targets]
    settings = {
        "statistic": statistic, "prompt": prompt, "followup": followup, "n_tokens": n_tokens,
        "repeats": repeats, "rounds": rounds, "threads": threads or os.cpu_count(),
        "image": str(image) if image is not None else "synthetic 640x480 (llava_edge.bench.bench_image)",
        "targets": [str(t) for t in targets],
    }
    info = {**machine(), "loadavg_before": load_before, "loadavg_after": _loadavg(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    report = BenchReport(str(source), settings, info, results, command)
    if out is not None:
        report.write(out)
    return report


def merge_rounds(rounds: list[dict]) -> dict:
    """One target's worker results (one per round) as one: all runs, each round's load time and
    peak RSS (the largest is reported), the first error."""
    merged = dict(rounds[0])
    merged["runs"] = [run for r in rounds for run in r.get("runs", [])]
    merged["load_ms_rounds"] = [r["load_ms"] for r in rounds if r.get("load_ms") is not None]
    peaks = [r["peak_rss_bytes"] for r in rounds if r.get("peak_rss_bytes")]
    merged["peak_rss_bytes"] = max(peaks) if peaks else None
    merged["wall_s"] = round(sum(r.get("wall_s", 0) for r in rounds), 3)
    merged["notes"] = list(dict.fromkeys(n for r in rounds for n in r.get("notes", [])))
    errors = [r["error"] for r in rounds if r.get("error")]
    if errors:
        merged["error"] = errors[0]
    return merged


def summarise(target: Target, raw: dict, statistic: str = "median") -> dict:
    """The ``statistic`` (median, or min — max for tokens/s) of the per-repeat values, their range,
    and the facts of the run."""
    runs = raw.pop("runs", [])
    summary = {"label": target.label, "target": target.name, "options": target.options}
    for metric in SUMMARY_KEYS[3:]:
        values = [r[metric] for r in runs if r.get(metric) is not None]
        summary[metric] = round(STATISTICS[statistic](values, metric), 3) if values else None
        if metric in METRICS and len(values) > 1:
            summary[f"{metric}_range"] = [min(values), max(values)]
    summary.update(raw)
    loads = raw.get("load_ms_rounds") or []
    if loads:
        summary["load_ms"] = round(STATISTICS[statistic](loads, "load_ms"), 3)
    summary["runs"] = runs
    return summary


def _image_file(image, tmp: Path) -> Path:
    if image is None:
        path = tmp / "bench.png"
        bench_image().save(path)
        return path
    path = Path(image).expanduser()
    from llava_edge.model.image import load_image

    load_image(path)  # a bad image fails here, once, with our message
    return path


def _run_worker(spec: dict, timeout: float) -> dict:
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "llava_edge.bench.worker"], input=json.dumps(spec),
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if lines:
        try:
            return json.loads(lines[-1])
        except json.JSONDecodeError:
            pass
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    return {"error": f"worker exited {done.returncode} after {time.perf_counter() - start:.1f} s: "
                     + " | ".join(tail)}


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
