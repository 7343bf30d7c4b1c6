"""``DriftReport``: what :func:`~llava_edge.drift.compare` measured, its checks and its outputs.

The report is plain data (JSON round-trips it); the terminal table, Markdown and plots are written by
:mod:`~llava_edge.drift.render` and :mod:`~llava_edge.drift.plots` from this data alone.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from llava_edge.drift.thresholds import (
    DEFAULT_THRESHOLDS, Thresholds, Violation, check, load_thresholds, only, unchecked, within_chance,
)
from llava_edge.errors import UserError

REPORT_VERSION = 1


class DriftExceeded(AssertionError):
    """Raised by :meth:`DriftReport.assert_within`; the message lists every broken limit."""

    def __init__(self, violations: list[Violation], report: DriftReport | None = None):
        self.violations = violations
        lines = [f"{len(violations)} drift limit(s) exceeded:"] + [f"  {v}" for v in violations]
        if report is not None and report.floor is None:
            lines.append("  (no noise floor was measured)")
        super().__init__("\n".join(lines))


@dataclass
class ReferenceResult:
    label: str
    spec: str
    runtime: str
    bytes: int | None
    seconds: float
    metrics: dict  # e2e.ppl and task.* only: the reference's own figures
    replies: list[dict] = field(default_factory=list)


@dataclass
class CandidateResult:
    label: str
    spec: str
    runtime: str
    metrics: dict
    kl_by_position: dict[str, list[float]] = field(default_factory=dict)  # attribution -> mean KL at t
    items: list[dict] = field(default_factory=list)
    role: str = "candidate"  # or "floor"
    bytes: int | None = None
    seconds: float = 0.0


@dataclass
class DriftReport:
    reference: ReferenceResult
    candidates: list[CandidateResult]
    floor: CandidateResult | None
    eval_set: str
    n_items: int
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    environment: dict = field(default_factory=lambda: _environment())
    version: int = REPORT_VERSION

    # --- lookups --------------------------------------------------------------------------------------
    def result(self, label: str) -> CandidateResult:
        for r in self.candidates:
            if r.label == label:
                return r
        raise KeyError(f"no candidate {label!r} in this report (have: "
                       f"{', '.join(r.label for r in self.candidates)})")

    def __getitem__(self, label: str) -> CandidateResult:
        return self.result(label)

    @property
    def labels(self) -> list[str]:
        return [r.label for r in self.candidates]

    # --- checks ---------------------------------------------------------------------------------------
    def check(self, thresholds: Thresholds | str | Path | None = None,
              candidates: list[str] | None = None) -> list[Violation]:
        """Every limit broken by every candidate (the defaults when ``thresholds`` is None)."""
        thresholds = _thresholds(thresholds)
        floor = self.floor.metrics if self.floor else None
        return [v for r in self._selected(candidates) for v in check(r.label, r.metrics, thresholds, floor)]

    def unchecked(self, thresholds: Thresholds | str | Path | None = None) -> dict[str, list[str]]:
        """Per candidate, the active limits whose metric could not be measured."""
        thresholds = _thresholds(thresholds)
        return {r.label: names for r in self.candidates
                if (names := unchecked(r.label, r.metrics, thresholds))}

    def within_chance(self, thresholds: Thresholds | str | Path | None = None) -> list[str]:
        """One line per limit a candidate is past by no more than chance explains (not counted)."""
        thresholds = _thresholds(thresholds)
        return [line for r in self.candidates for line in within_chance(r.label, r.metrics, thresholds)]

    def passed(self, thresholds: Thresholds | str | Path | None = None) -> bool:
        return not self.check(thresholds)

    def assert_within(self, thresholds: Thresholds | str | Path | None = None, *,
                      candidates: list[str] | None = None, **limits: float) -> None:
        """Raise :class:`DriftExceeded` (an AssertionError) listing every broken limit.

        With keyword limits (``max_kl=0.05, min_top1=0.9, max_accuracy_drop=0.02``, names in
        :data:`~llava_edge.drift.thresholds.LIMITS`) exactly those are checked, on top of
        ``thresholds`` if given; with none, ``thresholds`` or the defaults. ``candidates``: labels
        to check (default: all)."""
        if limits:
            base = _thresholds(thresholds) if thresholds is not None else only()
            thresholds = base.with_limits(**limits)
        violations = self.check(thresholds, candidates)
        if violations:
            raise DriftExceeded(violations, self)

    def _selected(self, labels: list[str] | None) -> list[CandidateResult]:
        if labels is None:
            return self.candidates
        return [self.result(label) for label in labels]

    # --- outputs --------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(_finite(self.to_dict()), indent=2) + "\n"

    def save_json(self, path: str | Path) -> Path:
        from llava_edge.utils.atomic import atomic_write_text

        path = Path(path)
        atomic_write_text(path, self.to_json())
        return path

    @classmethod
    def from_dict(cls, data: dict) -> DriftReport:
        if data.get("version") != REPORT_VERSION:
            raise UserError(f"drift report version {data.get('version')!r} is not supported "
                            f"(this llava-edge reads version {REPORT_VERSION})")
        data = _restore(data)
        data["reference"] = ReferenceResult(**data["reference"])
        data["candidates"] = [CandidateResult(**c) for c in data["candidates"]]
        data["floor"] = CandidateResult(**data["floor"]) if data.get("floor") else None
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> DriftReport:
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError, TypeError, KeyError) as exc:
            raise UserError(f"{path}: not a drift report ({exc})") from None

    def print_table(self, console=None, thresholds: Thresholds | None = None) -> None:
        """The rich table on the terminal (``console``: a rich Console; default stdout)."""
        from llava_edge.drift.render import print_table

        print_table(self, console, _thresholds(thresholds))

    def to_markdown(self, plots_dir: str | Path | None = None, *, thresholds: Thresholds | None = None,
                    command: str | None = None, relative_to: str | Path | None = None) -> str:
        from llava_edge.drift.render import markdown

        return markdown(self, _thresholds(thresholds), plots_dir=plots_dir, command=command,
                        relative_to=relative_to)

    def write(self, out: str | Path, *, thresholds: Thresholds | None = None,
              command: str | None = None, plots: bool = True) -> dict[str, Path]:
        """Write ``report.json``, ``report.md`` and (``plots``) ``plots/*.png`` under ``out``."""
        from llava_edge.drift.render import write_report

        return write_report(self, out, _thresholds(thresholds), command=command, plots=plots)

    def manifest_summary(self, label: str, thresholds: Thresholds | None = None) -> dict:
        """The short form for a bundle manifest's ``drift`` field: key metrics of one candidate,
        its noise floor, against what it was measured, and whether it passed."""
        r = self.result(label)
        keys = ["image.cosine_mean", "e2e.kl_mean", "e2e.kl_p99", "e2e.top1", "decoder_only.kl_mean",
                "vision_only.kl_mean", "generation.exact_match", "task.accuracy", "task.accuracy_drop",
                "task.answers_lost", "task.answers_gained", "task.drop_p"]
        thresholds = _thresholds(thresholds)
        return {
            "reference": self.reference.spec, "candidate": r.spec, "eval_set": self.eval_set,
            "n_items": self.n_items, "measured": self.created,
            "metrics": {k: r.metrics.get(k) for k in keys},
            "floor": {k: self.floor.metrics.get(k) for k in keys} if self.floor else None,
            "reference_accuracy": self.reference.metrics.get("task.accuracy"),
            "passed": not check(r.label, r.metrics, thresholds),
            "within_chance": within_chance(r.label, r.metrics, thresholds),
            "thresholds": thresholds.active(r.label),
        }


def record_in_bundle(bundle: str | Path, report: DriftReport, label: str,
                     thresholds: Thresholds | None = None, *, eval_set: str | None = None) -> dict:
    """Store ``report.manifest_summary(label)`` in the bundle manifest's ``drift`` field, under the
    candidate's label (other labels' entries are kept), and rewrite the manifest atomically.
    ``eval_set``: how to name the eval set there (default: its path). Returns the new ``drift`` field."""
    from llava_edge.export.bundle import MANIFEST, read_manifest
    from llava_edge.utils.atomic import atomic_write_text

    manifest = read_manifest(bundle)
    summary = report.manifest_summary(label, thresholds)
    if eval_set is not None:
        summary["eval_set"] = eval_set
    manifest.drift = {**manifest.drift, label: _finite(summary)}
    atomic_write_text(Path(bundle) / MANIFEST, manifest.to_json())
    return manifest.drift


def _thresholds(value) -> Thresholds:
    if value is None:
        return DEFAULT_THRESHOLDS
    if isinstance(value, Thresholds):
        return value
    if isinstance(value, dict):
        return DEFAULT_THRESHOLDS.with_limits(**value)
    return load_thresholds(value)


_NON_FINITE = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}


def _finite(obj):
    """Standard JSON has no NaN/Infinity: write them as strings, which :func:`_restore` reads back
    (never as null: a NaN metric must keep failing its check after a round trip)."""
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return "NaN" if obj != obj else ("Infinity" if obj > 0 else "-Infinity")
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _restore(data: dict) -> dict:
    """Non-finite numbers back from their strings, in metrics and per-position KL."""
    def numbers(values):
        if isinstance(values, dict):
            return {k: numbers(v) for k, v in values.items()}
        if isinstance(values, list):
            return [numbers(v) for v in values]
        return _NON_FINITE.get(values, values) if isinstance(values, str) else values

    data = dict(data)
    for key in ("reference", "floor"):
        if data.get(key):
            data[key] = {**data[key], "metrics": numbers(data[key]["metrics"])}
    data["candidates"] = [{**c, "metrics": numbers(c["metrics"]),
                           "kl_by_position": numbers(c.get("kl_by_position", {}))}
                          for c in data.get("candidates", [])]
    if data.get("floor"):
        data["floor"]["kl_by_position"] = numbers(data["floor"].get("kl_by_position", {}))
    return data


def _environment() -> dict:
    import numpy

    env = {"python": platform.python_version(), "platform": platform.platform(), "numpy": numpy.__version__}
    try:
        from importlib.metadata import version

        env["llava_edge"] = version("llava-edge")
    except Exception:  # noqa: BLE001 - a source checkout without metadata
        pass
    return env


__all__ = ["CandidateResult", "DriftExceeded", "DriftReport", "ReferenceResult", "record_in_bundle"]
