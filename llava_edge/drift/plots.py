"""PNG plots of a drift report: KL per reply position, drift per component, accuracy vs file size.

Drawn with matplotlib's object API on an Agg canvas: no global backend is switched, so this is safe
inside a user's test session or notebook.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llava_edge.drift.schema import ATTRIBUTION_LABELS, ATTRIBUTIONS

#: Zero drift cannot sit on a log axis; it is drawn at this value (and the axis says so).
LOG_FLOOR = 1e-12
_FLOOR_STYLE = {"color": "0.45", "linestyle": "--"}


def write_plots(report, out_dir: str | Path) -> dict[str, Path]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401 - fail early if absent

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, draw in (("kl_by_position", _kl_by_position), ("components", _components),
                       ("accuracy_vs_size", _accuracy_vs_size)):
        fig = _figure(draw, report)
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        written[name] = path
    return written


def _figure(draw, report):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.2))
    FigureCanvasAgg(fig)
    draw(fig, report)
    return fig


def _kl_by_position(fig, report) -> None:
    ax = fig.add_subplot()
    for r in report.candidates:
        kl = np.maximum(np.asarray(r.kl_by_position.get("e2e", []), dtype=float), LOG_FLOOR)
        ax.plot(np.arange(len(kl)), kl, marker=".", label=r.label)
    if report.floor is not None:
        kl = np.maximum(np.asarray(report.floor.kl_by_position.get("e2e", []), dtype=float), LOG_FLOOR)
        ax.plot(np.arange(len(kl)), kl, label=f"noise floor: {report.floor.label}", **_FLOOR_STYLE)
    ax.set_yscale("log")
    ax.set_xlabel("position in the reference's greedy reply (token)")
    ax.set_ylabel(f"mean KL(ref || cand), nats (0 drawn at {LOG_FLOOR:g})")
    ax.set_title("End-to-end KL per reply position")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)


def _components(fig, report) -> None:
    results = ([report.floor] if report.floor is not None else []) + report.candidates
    names = [f"{r.label}\n(floor)" if r is report.floor else r.label for r in results]
    x = np.arange(len(results))
    ax = fig.add_subplot(1, 2, 1)
    width = 0.8 / len(ATTRIBUTIONS)
    for i, a in enumerate(ATTRIBUTIONS):
        if all(r.metrics.get(f"{a}.kl_mean") is None for r in results):
            continue  # measured without attribution
        values = [max(r.metrics.get(f"{a}.kl_mean") or 0.0, LOG_FLOOR) for r in results]
        ax.bar(x + (i - 1) * width, values, width, label=ATTRIBUTION_LABELS[a])
    ax.set_yscale("log")
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("mean KL(ref || cand), nats")
    ax.set_title("Decoder logits")
    ax.legend(fontsize=7)

    ax = fig.add_subplot(1, 2, 2)
    sections = [("image", "projector output")]
    if any(r.metrics.get("vision.cosine_mean") is not None for r in results):
        sections.insert(0, ("vision", "vision tower"))
    width = 0.8 / len(sections)
    for i, (section, title) in enumerate(sections):
        values = [max(1.0 - (r.metrics.get(f"{section}.cosine_mean") or 1.0), LOG_FLOOR) for r in results]
        ax.bar(x + (i - (len(sections) - 1) / 2) * width, values, width, label=title)
    ax.set_yscale("log")
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("1 - mean cosine")
    ax.set_title("Image embeddings")
    ax.legend(fontsize=7)
    fig.set_size_inches(10, 4.2)


def _accuracy_vs_size(fig, report) -> None:
    ax = fig.add_subplot()
    ref = report.reference
    points = [(r.label, r.bytes, r.metrics.get("task.accuracy")) for r in report.candidates]
    drawn, seen = 0, {}
    for label, size, acc in points:
        if size is None or acc is None:
            continue
        ax.scatter(size / 2**20, 100 * acc)
        stacked = seen.get((size, acc), 0)  # candidates at the same point: labels one above another
        seen[(size, acc)] = stacked + 1
        ax.annotate(label, (size / 2**20, 100 * acc), textcoords="offset points",
                    xytext=(5, 4 + 11 * stacked), fontsize=8)
        drawn += 1
    ref_acc = ref.metrics.get("task.accuracy")
    if ref_acc is not None:
        ax.axhline(100 * ref_acc, **_FLOOR_STYLE, label=f"reference {ref.label}: {100 * ref_acc:.1f}%")
        if ref.bytes:
            ax.scatter(ref.bytes / 2**20, 100 * ref_acc, marker="*", s=120, color="black")
        ax.legend(fontsize=8)
    if not drawn:
        ax.text(0.5, 0.5, "no candidate has both a known file size and gold answers",
                ha="center", va="center", transform=ax.transAxes)
    ax.set_xscale("log")
    ax.set_ylim(-3, 103)
    ax.set_xlabel("model files loaded (MiB, log scale)")
    ax.set_ylabel("task accuracy (%)")
    ax.set_title("Accuracy vs file size")
    ax.grid(True, alpha=0.3)
