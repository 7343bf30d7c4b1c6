"""The report for people: a rich table on the terminal, and Markdown with PNG plots.

Columns are the same everywhere: metric | limit | reference | noise floor | each candidate. The
noise floor sits next to every figure, so a reader sees at once whether a candidate's drift stands
out from what two runs that should agree already differ by.
"""

from __future__ import annotations

import os
from pathlib import Path

from llava_edge.drift.schema import (
    ATTRIBUTION_LABELS, ATTRIBUTIONS, METRICS, format_bytes, format_limit, format_value,
)
from llava_edge.drift.thresholds import DEFAULT_THRESHOLDS, LIMITS, Thresholds, check

REPORT_JSON, REPORT_MD, PLOTS = "report.json", "report.md", "plots"
#: Metrics the reference has a figure for itself (its own perplexity and accuracy).
REFERENCE_METRICS = ("e2e.ppl", "task.accuracy", "task.accuracy_short", "task.accuracy_mc")


def rows(report, thresholds: Thresholds) -> tuple[list[str], list[list[str]], list[list[bool]]]:
    """Header, cell texts and, per cell, whether it breaks a limit: the table both outputs share."""
    results = report.candidates
    floor = report.floor
    header = ["metric", "limit", f"reference\n{report.reference.label}",
              f"noise floor\n{floor.label}" if floor else "noise floor\n(none)"]
    header += [r.label for r in results]
    body, bad = [], []
    limits_by_metric = {l.metric: l for l in LIMITS}
    broken = {(v.candidate, v.metric) for v in report.check(thresholds)}
    for m in METRICS:
        values = [r.metrics.get(m.key) for r in results]
        ref_value = report.reference.metrics.get(m.key) if m.key in REFERENCE_METRICS else None
        if all(v is None for v in values) and ref_value is None:
            continue  # e.g. vision-tower metrics when no runtime exposes them
        limit = limits_by_metric.get(m.key)
        bound = thresholds.limits.get(limit.name) if limit else None
        limit_text = "" if bound is None else format_limit(m.key, limit.kind, bound)
        body.append([m.label, limit_text, format_value(m.key, ref_value),
                     format_value(m.key, floor.metrics.get(m.key)) if floor else "-",
                     *[format_value(m.key, v) for v in values]])
        bad.append([False] * 4 + [(r.label, m.key) in broken for r in results])
    body.append(["file size", "", format_bytes(report.reference.bytes),
                 format_bytes(floor.bytes) if floor else "-", *[format_bytes(r.bytes) for r in results]])
    body.append(["time", "", f"{report.reference.seconds:.1f} s",
                 f"{floor.seconds:.1f} s" if floor else "-", *[f"{r.seconds:.1f} s" for r in results]])
    verdicts = []
    for r in results:
        n = len(check(r.label, r.metrics, thresholds))
        verdicts.append("PASS" if not n else f"FAIL ({n})")
    body.append(["verdict", "", "", "", *verdicts])
    bad += [[False] * len(header)] * 2 + [[False] * 4 + [v != "PASS" for v in verdicts]]
    return header, body, bad


def print_table(report, console=None, thresholds: Thresholds | None = None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    thresholds = thresholds or DEFAULT_THRESHOLDS
    header, body, bad = rows(report, thresholds)
    header[2:4] = ["reference", "floor"]  # their labels go in the caption: narrow columns
    floor = report.floor.label if report.floor else "none measured"
    table = Table(title=escape(f"drift vs {report.reference.label} on {report.n_items} items of "
                               f"{report.eval_set}"), title_justify="left",
                  caption=escape(f"reference: {report.reference.label}; noise floor: {floor}"),
                  caption_justify="left")
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for cells, flags in zip(body, bad):
        cells = [escape(c) for c in cells]
        styled = [f"[bold red]{c}[/bold red]" if f else c for c, f in zip(cells, flags)]
        if cells[0] == "verdict":
            styled = [s if f or i < 4 else f"[bold green]{cells[i]}[/bold green]"
                      for i, (s, f) in enumerate(zip(styled, flags))]
        table.add_row(*styled)
    # A log or a pipe gets rich's 80 columns by default: too narrow for several candidates.
    saved = console.width
    if not console.is_terminal and saved < 160:
        console.width = 160
    try:
        console.print(table)
    finally:
        console.width = saved
    for v in report.check(thresholds):
        console.print(f"[red]FAIL[/red] {escape(str(v))}", highlight=False)
    for line in report.within_chance(thresholds):
        console.print(f"[yellow]within chance[/yellow] {escape(line)}", highlight=False)
    for label, names in report.unchecked(thresholds).items():
        console.print(f"[yellow]not checked[/yellow] {escape(label)}: {', '.join(names)} (metric not "
                      "measured)", highlight=False)


def markdown(report, thresholds: Thresholds, *, plots_dir=None, command: str | None = None,
             relative_to=None) -> str:
    """The Markdown report; ``plots_dir``: where the PNGs are (linked relative to ``relative_to``)."""
    ref, floor = report.reference, report.floor
    out = ["# Drift report", ""]
    if command:
        out += ["Made with:", "", "```sh", command, "```", ""]
    out += [
        f"- reference: **{ref.label}** (`{ref.spec}`)",
        f"- noise floor: **{floor.label}** (`{floor.spec}`)" if floor else "- noise floor: none measured",
        f"- eval set: `{report.eval_set}`, {report.n_items} items; greedy replies of at most "
        f"{report.settings.get('max_new_tokens')} tokens",
        f"- total time: {report.seconds:.1f} s (reference pass {ref.seconds:.1f} s); measured "
        f"{report.created}; Python {report.environment.get('python')}, {report.environment.get('platform')}",
        "",
        "## Verdict", "",
        "| candidate | runtime | file size | result | limits exceeded |",
        "|---|---|---|---|---|",
    ]
    for r in report.candidates:
        violations = report.check(thresholds, [r.label])
        out.append(f"| {r.label} | {r.runtime} | {format_bytes(r.bytes)} | "
                   f"{'PASS' if not violations else '**FAIL**'} | "
                   f"{'; '.join(_md(str(v).split(': ', 1)[1]) for v in violations) or '-'} |")
    chance = report.within_chance(thresholds)
    if chance:
        out += ["", "Past a limit, but by no more than chance explains on this many answers (not "
                "counted):", ""] + [f"- {_md(line)}" for line in chance]
    header, body, bad = rows(report, thresholds)
    out += ["", "## Metrics", "",
            "Logit metrics are measured on the reference's greedy reply fed to both runtimes "
            "(teacher forcing). *decoder only*: the candidate's decoder on the reference's image "
            "embeddings; *vision only*: the reference's decoder on the candidate's image embeddings. "
            "**Bold**: a limit is exceeded.", ""]
    out.append("| " + " | ".join(h.replace("\n", "<br>") for h in header) + " |")
    out.append("|" + "---|" * len(header))
    for cells, flags in zip(body, bad):
        out.append("| " + " | ".join(f"**{_md(c)}**" if f else _md(c) for c, f in zip(cells, flags)) + " |")
    out += ["", "## Attribution", "",
            "Mean KL(ref || cand) per position, split by which side of the candidate is used:", "",
            "| candidate | " + " | ".join(ATTRIBUTION_LABELS[a] for a in ATTRIBUTIONS) + " |",
            "|---|" + "---|" * len(ATTRIBUTIONS)]
    for r in ([floor] if floor else []) + report.candidates:
        name = f"{r.label} (floor)" if r is floor else r.label
        out.append(f"| {name} | " + " | ".join(format_value(f"{a}.kl_mean", r.metrics.get(f"{a}.kl_mean"))
                                               for a in ATTRIBUTIONS) + " |")
    if plots_dir is not None:
        base = Path(relative_to) if relative_to else Path(plots_dir).parent
        rel = Path(os.path.relpath(plots_dir, base)).as_posix()
        out += ["", "## Plots", "",
                f"![KL per reply position]({rel}/kl_by_position.png)", "",
                f"![Drift per component]({rel}/components.png)", "",
                f"![Accuracy vs file size]({rel}/accuracy_vs_size.png)"]
    out += ["", "## Thresholds", "", f"From: {thresholds.source}.", "",
            "| limit | metric | value | why |", "|---|---|---|---|"]
    for l in LIMITS:
        value = thresholds.limits.get(l.name)
        shown = "off" if value is None else format_limit(l.metric, l.kind, value)
        out.append(f"| `{l.name}` | `{l.metric}` | {shown} | {_md(l.reason)} |")
    for label, limits in thresholds.per_candidate.items():
        out.append(f"\nOverrides for {label}: " + ", ".join(f"`{k}` = {v}" for k, v in limits.items()))
    out += ["", "## Replies (first 10 items)", "",
            "| item | gold | " + " | ".join([ref.label] + [r.label for r in report.candidates]) + " |",
            "|---|---|" + "---|" * (1 + len(report.candidates))]
    for i, reply in enumerate(ref.replies[:10]):
        cells = [reply["id"], reply.get("answer") or "-", _reply(reply["reply"], reply["correct"])]
        cells += [_reply(r.items[i]["reply"], r.items[i]["correct"]) for r in report.candidates]
        out.append("| " + " | ".join(_md(c) for c in cells) + " |")
    return "\n".join(out) + "\n"


def write_report(report, out, thresholds: Thresholds, *, command: str | None = None,
                 plots: bool = True) -> dict[str, Path]:
    """report.json, report.md and plots/ under ``out`` (created if needed)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = {"json": report.save_json(out / REPORT_JSON)}
    plots_dir, note = None, None
    if plots:
        try:
            from llava_edge.drift.plots import write_plots

            written.update(write_plots(report, out / PLOTS))
            plots_dir = out / PLOTS
        except ImportError:
            note = "Plots skipped: matplotlib is not installed (`pip install matplotlib`)."
    from llava_edge.utils.atomic import atomic_write_text

    text = markdown(report, thresholds, plots_dir=plots_dir, command=command, relative_to=out)
    atomic_write_text(out / REPORT_MD, text + (f"\n{note}\n" if note else ""))
    written["markdown"] = out / REPORT_MD
    return written


def _reply(text: str, correct) -> str:
    text = text if len(text) <= 60 else text[:57] + "..."
    mark = "" if correct is None else (" ✓" if correct else " ✗")
    return f"{text!r}{mark}"


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")
