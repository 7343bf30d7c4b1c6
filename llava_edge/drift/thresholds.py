"""Release gates: limits on drift metrics, their defaults and why, and the file that overrides them.

A thresholds file is TOML (Python 3.11+, or with ``tomli`` installed) or JSON::

    # drift-thresholds.toml
    max_kl = 0.05             # every candidate
    min_top1 = 0.9
    max_kl_p99 = false        # false switches a limit off

    [candidate.gguf-q4_0]     # one candidate, by label: overrides the lines above
    max_kl = 0.15

Keys not named keep their defaults. A limit whose metric could not be measured (no gold answers,
for instance) is reported as not checked, never as passed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from llava_edge.errors import UserError


@dataclass(frozen=True)
class Limit:
    name: str  # keyword of assert_within and key of the thresholds file
    metric: str  # schema key
    kind: str  # "max" or "min"
    default: float | None  # None: not checked unless asked for
    reason: str
    # A p-value metric: a value past the bound breaks the limit only when that p is below
    # SIGNIFICANCE, i.e. when the eval set is large enough to tell the breach from chance.
    chance: str | None = None


# A task-accuracy drop is counted in whole answers: on 24 gold answers one flipped multiple-choice
# letter moves it 4 points, and int4 files flip near-tied letters of an untrained projector (KL
# 0.0005 nats at the flipped answers). 5% is the usual one-sided level; with no answer gained it
# takes 5 lost answers to reach it (p = 1/32), on any eval set size.
SIGNIFICANCE = 0.05


# Reference points for the defaults: llama.cpp's `perplexity --kl-divergence` statistics for 7B
# LLaMA-family models on wikitext (llama.cpp PRs #5081, #12557, #19661): 4-bit quantizations
# (Q4_K_S, IQ4_XS) measure mean KL 0.01-0.04 nats/token, p99 ~0.3, same top token 90-95%; a
# badly damaged model measures mean KL ~0.6 and same top token ~70%. Our positions are the
# reference's own greedy replies, lower-entropy text than wikitext, so a sound candidate sits lower.
LIMITS: tuple[Limit, ...] = (
    Limit("max_kl", "e2e.kl_mean", "max", 0.1,
          "2-10x what good 4-bit quantizations measure (0.01-0.04), 6x below a damaged model (0.6)"),
    Limit("max_kl_p99", "e2e.kl_p99", "max", 1.0,
          "3x the p99 of a good 4-bit quantization (~0.3): a few badly wrong positions fail it"),
    Limit("min_top1", "e2e.top1", "min", 0.85,
          "good 4-bit quantizations keep the top token at 90-95% of positions; damaged ones ~70%. "
          "Robust on flat (untrained) logits too, where KL is small in absolute terms"),
    Limit("max_accuracy_drop", "task.accuracy_drop", "max", 0.05,
          "5 points of task accuracy: what users notice; on 200 gold answers, 10 answers. Broken only "
          "when the answers lost outnumber those gained beyond chance (sign test, p < 0.05)",
          chance="task.drop_p"),
    Limit("min_image_cosine", "image.cosine_mean", "min", 0.98,
          "fp16/int8 vision towers keep the cosine above 0.999; a wrong preprocessing, token order or "
          "feature layer drops far below (it is what shows llama.cpp's CLS-order defect)"),
    Limit("max_ppl_increase", "e2e.ppl_change", "max", None,
          "off by default: on the reference's own replies it tracks KL, which is already gated"),
    Limit("min_exact_match", "generation.exact_match", "min", None,
          "off by default: one near-tie flips the rest of a long greedy reply; accuracy is the "
          "user-facing check"),
    Limit("max_decoder_kl", "decoder_only.kl_mean", "max", None, "off by default: attribution, not a gate"),
    Limit("max_vision_kl", "vision_only.kl_mean", "max", None, "off by default: attribution, not a gate"),
)
LIMIT_BY_NAME = {limit.name: limit for limit in LIMITS}


@dataclass(frozen=True)
class Violation:
    candidate: str
    limit: str
    metric: str
    value: float
    bound: float
    kind: str
    floor: float | None = None  # the noise floor's value of the same metric

    def __str__(self) -> str:
        from llava_edge.drift.schema import format_limit, format_value

        floor = f" (noise floor {format_value(self.metric, self.floor)})" if self.floor is not None else ""
        return (f"{self.candidate}: {self.metric} = {format_value(self.metric, self.value)}, "
                f"must be {format_limit(self.metric, self.kind, self.bound)} [{self.limit}]{floor}")


@dataclass
class Thresholds:
    """Limits for every candidate, and per-candidate overrides (by label)."""

    limits: dict[str, float | None] = field(default_factory=lambda: {l.name: l.default for l in LIMITS})
    per_candidate: dict[str, dict[str, float | None]] = field(default_factory=dict)
    source: str = "defaults"

    def for_candidate(self, label: str) -> dict[str, float | None]:
        return {**self.limits, **self.per_candidate.get(label, {})}

    def active(self, label: str | None = None) -> dict[str, float]:
        limits = self.for_candidate(label) if label else self.limits
        return {k: v for k, v in limits.items() if v is not None}

    def with_limits(self, **limits: float | None) -> Thresholds:
        """A copy with some limits changed (None switches one off)."""
        _check_names(limits, "with_limits")
        return Thresholds({**self.limits, **limits}, dict(self.per_candidate), self.source)

    def to_dict(self) -> dict:
        return {"source": self.source, "limits": dict(self.limits), "per_candidate": self.per_candidate}


DEFAULT_THRESHOLDS = Thresholds()


def only(**limits: float) -> Thresholds:
    """Thresholds that check exactly the named limits and nothing else."""
    _check_names(limits, "assert_within")
    return Thresholds({name: limits.get(name) for name in LIMIT_BY_NAME}, source="arguments")


def load_thresholds(path: str | Path | None) -> Thresholds:
    """The defaults, updated by a TOML or JSON file (see the module docstring)."""
    if path is None:
        return DEFAULT_THRESHOLDS
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{path}: no such thresholds file")
    data = _read(path)
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a table of limits, got {type(data).__name__}")
    overrides = data.pop("candidate", {})
    if not isinstance(overrides, dict) or not all(isinstance(v, dict) for v in overrides.values()):
        raise UserError(f"{path}: [candidate.LABEL] sections must be tables of limits")
    limits = {l.name: l.default for l in LIMITS}
    limits.update(_limits(data, f"{path}"))
    per = {label: _limits(table, f"{path} [candidate.{label}]") for label, table in overrides.items()}
    return Thresholds(limits, per, str(path))


def check(label: str, metrics: dict, thresholds: Thresholds, floor: dict | None = None) -> list[Violation]:
    """Every limit the candidate's metrics break. NaN breaks every limit it meets; a value past the
    bound that chance explains (see :func:`within_chance`) does not."""
    out = []
    for name, bound in thresholds.active(label).items():
        limit = LIMIT_BY_NAME[name]
        value = metrics.get(limit.metric)
        if value is None:
            continue
        if math.isnan(value) or (_past(limit, value, bound) and _chance_p(limit, metrics) is None):
            out.append(Violation(label, name, limit.metric, value, bound, limit.kind,
                                 (floor or {}).get(limit.metric)))
    return out


def within_chance(label: str, metrics: dict, thresholds: Thresholds) -> list[str]:
    """Lines for the limits whose metric is past the bound by an amount chance explains: reported
    next to the verdict, not counted in it (a 3-answer drop on 24 answers, for instance)."""
    out = []
    for name, bound in thresholds.active(label).items():
        limit = LIMIT_BY_NAME[name]
        value = metrics.get(limit.metric)
        if value is None or math.isnan(value) or not _past(limit, value, bound):
            continue
        if (p := _chance_p(limit, metrics)) is not None:
            from llava_edge.drift.schema import format_limit, format_value

            out.append(f"{label}: {limit.metric} = {format_value(limit.metric, value)} is past "
                       f"{format_limit(limit.metric, limit.kind, bound)} [{name}], but chance gives "
                       f"as much ({limit.chance} = {p:.3g} >= {SIGNIFICANCE:g}); not counted")
    return out


def _past(limit: Limit, value: float, bound: float) -> bool:
    return value > bound if limit.kind == "max" else value < bound


def _chance_p(limit: Limit, metrics: dict) -> float | None:
    """The limit's chance p-value when it is at or above SIGNIFICANCE (the breach may be chance),
    else None (no chance metric, not measured, or significant)."""
    p = metrics.get(limit.chance) if limit.chance else None
    return p if p is not None and not math.isnan(p) and p >= SIGNIFICANCE else None


def unchecked(label: str, metrics: dict, thresholds: Thresholds) -> list[str]:
    """Names of active limits whose metric was not measured for this candidate."""
    return [name for name in thresholds.active(label)
            if metrics.get(LIMIT_BY_NAME[name].metric) is None]


def _read(path: Path):
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: not valid JSON ({exc})") from None
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise UserError(f"{path}: reading TOML needs Python 3.11+ or `pip install tomli`; "
                            "or write the thresholds as JSON") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: not valid TOML ({exc})") from None


def _limits(table: dict, where: str) -> dict[str, float | None]:
    _check_names(table, where)
    out = {}
    for name, value in table.items():
        if value is False or value is None:
            out[name] = None
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
        else:
            raise UserError(f"{where}: {name} = {value!r}; expected a number, or false to switch it off")
    return out


def _check_names(names, where: str) -> None:
    unknown = [n for n in names if n not in LIMIT_BY_NAME]
    if unknown:
        raise UserError(f"{where}: unknown limit(s) {', '.join(map(repr, unknown))}; known: "
                        f"{', '.join(LIMIT_BY_NAME)}")
