"""The one table of drift metric names: key, label, which way is better, how to print it.

Keys are ``<section>.<name>``. Sections:

- ``image``: projector output (the image embeddings the decoder sees), candidate vs reference.
- ``vision``: vision-tower features before the projector; only when both runtimes expose the
  optional ``encode_image_features(image)`` method.
- ``e2e``: candidate decoder on the candidate's own image embeddings (what a user gets).
- ``decoder_only``: candidate decoder on the *reference's* image embeddings: the decoder's share.
- ``vision_only``: *reference* decoder on the candidate's image embeddings: the vision side's share.
- ``generation``: greedy replies, candidate vs reference.
- ``task``: accuracy on the eval set's gold answers.

The three logit sections are measured on the same teacher-forced positions: the reference's own
greedy reply (plus its end-of-sequence token) fed to both runtimes.
"""

from __future__ import annotations

from dataclasses import dataclass

LOWER, HIGHER = "lower", "higher"


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    better: str  # LOWER or HIGHER is better
    fmt: str  # "sci", "pct", "float", "cos", "tokens", "delta_pct", "count"
    help: str


ATTRIBUTIONS = ("e2e", "decoder_only", "vision_only")
ATTRIBUTION_LABELS = {
    "e2e": "end to end",
    "decoder_only": "decoder only (ref. image embeds)",
    "vision_only": "vision only (ref. decoder)",
}


def _logit_metrics(section: str, title: str) -> tuple[Metric, ...]:
    return (
        Metric(f"{section}.kl_mean", f"{title}: KL mean", LOWER, "sci",
               "KL(ref || cand) in nats per position, mean over positions"),
        Metric(f"{section}.kl_p99", f"{title}: KL p99", LOWER, "sci",
               "99th percentile over positions of KL(ref || cand)"),
        Metric(f"{section}.top1", f"{title}: top-1 agree", HIGHER, "pct",
               "share of positions where both pick the same most likely token"),
        Metric(f"{section}.ppl_change", f"{title}: ppl change", LOWER, "delta_pct",
               "perplexity of the reference reply under the candidate / under the reference - 1"),
    )


METRICS: tuple[Metric, ...] = (
    Metric("image.cosine_mean", "image embeds: cosine mean", HIGHER, "cos",
           "cosine of each image token's projector output with the reference's, mean"),
    Metric("image.cosine_min", "image embeds: cosine min", HIGHER, "cos",
           "the worst image token's cosine"),
    Metric("image.max_abs", "image embeds: max abs err", LOWER, "sci",
           "largest absolute difference of any projector output value"),
    Metric("image.rel_l2", "image embeds: rel. L2 err", LOWER, "sci",
           "||cand - ref|| / ||ref|| per image, mean"),
    Metric("vision.cosine_mean", "vision tower: cosine mean", HIGHER, "cos",
           "as image.cosine_mean, before the projector (runtimes with encode_image_features)"),
    Metric("vision.max_abs", "vision tower: max abs err", LOWER, "sci",
           "as image.max_abs, before the projector"),
    *_logit_metrics("e2e", "e2e"),
    Metric("e2e.kl_max", "e2e: KL max", LOWER, "sci", "largest KL(ref || cand) at any position"),
    Metric("e2e.ppl", "e2e: perplexity", LOWER, "float",
           "perplexity of the reference's greedy reply (the reference column: under the reference)"),
    *_logit_metrics("decoder_only", "decoder only"),
    *_logit_metrics("vision_only", "vision only"),
    Metric("generation.prefix_mean", "greedy: identical prefix", HIGHER, "tokens",
           "tokens the candidate's greedy reply shares with the reference's before they differ, mean"),
    Metric("generation.exact_match", "greedy: exact match", HIGHER, "pct",
           "share of items whose greedy reply is token for token the reference's"),
    Metric("task.accuracy", "task: accuracy", HIGHER, "pct",
           "share of items with a gold answer answered correctly"),
    Metric("task.accuracy_drop", "task: accuracy drop", LOWER, "pct",
           "reference accuracy - candidate accuracy (points; positive is worse)"),
    Metric("task.answers_lost", "task: answers lost", LOWER, "count",
           "gold answers the reference gets right and the candidate wrong"),
    Metric("task.answers_gained", "task: answers gained", HIGHER, "count",
           "gold answers the candidate gets right and the reference wrong"),
    Metric("task.drop_p", "task: drop by chance, p", HIGHER, "float",
           "one-sided exact sign test on the answers that changed: how often chance alone loses that "
           "many (small: the drop is real)"),
    Metric("task.accuracy_short", "task: short-answer acc.", HIGHER, "pct", "normalised exact match"),
    Metric("task.accuracy_mc", "task: multiple-choice acc.", HIGHER, "pct", "option letter"),
)
METRIC_BY_KEY = {m.key: m for m in METRICS}


def format_value(key: str, value) -> str:
    """A metric value for a table cell: '-' when not measured."""
    if value is None:
        return "-"
    value = float(value)
    if value != value:  # NaN: a candidate that produced NaN logits
        return "nan"
    fmt = METRIC_BY_KEY[key].fmt if key in METRIC_BY_KEY else "float"
    if fmt == "sci":
        return "0" if value == 0 else f"{value:.2e}"
    if fmt == "pct":
        return f"{100 * value:.1f}%"
    if fmt == "delta_pct":
        return f"{100 * value:+.2f}%"
    if fmt == "cos":
        return f"{value:.7f}"  # fp16 drift shows in the 7th digit
    if fmt == "count":
        return f"{value:.0f}"
    if fmt == "tokens":
        return f"{value:.1f}"
    return f"{value:.6f}" if abs(value) < 10 else f"{value:.2f}"


def format_limit(key: str, kind: str, value: float) -> str:
    """A limit as '<= 0.1' or '>= 85%': the bound as the user wrote it, not to six places."""
    fmt = METRIC_BY_KEY[key].fmt if key in METRIC_BY_KEY else "float"
    shown = f"{100 * value:g}%" if fmt in ("pct", "delta_pct") else f"{value:g}"
    return f"{'<=' if kind == 'max' else '>='} {shown}"


def format_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
