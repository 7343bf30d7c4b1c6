"""A bench report as a rich table, a Markdown table, a PNG (matplotlib, Agg) and overhead numbers."""

from __future__ import annotations

from pathlib import Path

from llava_edge.bench.targets import LLAMA_CPP_PYTHON, RAW_LLAMACPP

MIB = 1 << 20

#: (key, column title, format) of the table columns, in order.
COLUMNS = (
    ("label", "target", "{}"),
    ("vision", "vision", "{}"),
    ("load_ms", "load ms", "{:.0f}"),
    ("image_encode_ms", "encode ms", "{:.2f}"),
    ("prefill_ms", "prefill ms", "{:.2f}"),
    ("prompt_tokens", "prompt tok", "{:.0f}"),
    ("ttft_ms", "TTFT ms", "{:.2f}"),
    ("decode_tok_s", "decode tok/s", "{:.1f}"),  # 7B on a laptop CPU decodes 1-4 tokens/s
    ("chat_ttft_ms", "chat TTFT ms", "{:.2f}"),
    ("turn2_ttft_ms", "turn-2 TTFT ms", "{:.2f}"),
    ("peak_rss_mib", "peak RSS MiB", "{:.0f}"),
    ("file_mib", "files MiB", "{:.2f}"),
)

#: The metrics plotted: (key, title, higher is better).
PLOTTED = (
    ("image_encode_ms", "image encode (ms)", False),
    ("prefill_ms", "prefill (ms)", False),
    ("ttft_ms", "time to first token (ms)", False),
    ("turn2_ttft_ms", "turn-2 time to first text (ms)", False),
    ("decode_tok_s", "decode (tokens/s)", True),
    ("peak_rss_mib", "peak RSS (MiB)", False),
)


def _value(result: dict, key: str):
    if key == "peak_rss_mib":
        return result["peak_rss_bytes"] / MIB if result.get("peak_rss_bytes") else None
    if key == "file_mib":
        return result["file_bytes"] / MIB if result.get("file_bytes") else None
    return result.get(key)


def _cell(result: dict, key: str, fmt: str) -> str:
    if key != "label" and result.get("error"):
        return "error" if key == "vision" else ""
    value = _value(result, key)
    return "n/a" if value is None else fmt.format(value)


def rich_table(report):
    from rich.table import Table

    table = Table(title=f"bench: {report.source}", caption=_caption(report))
    for i, (_, title, _) in enumerate(COLUMNS):
        table.add_column(title, justify="left" if i < 2 else "right")
    for r in report.results:
        table.add_row(*[_cell(r, key, fmt) for key, _, fmt in COLUMNS])
    return table


def _caption(report) -> str:
    s, m = report.settings, report.machine
    stat = "best" if s.get("statistic") == "min" else s.get("statistic", "median")
    rounds = s.get("rounds", 1)
    runs = f"{s['repeats'] * rounds} runs ({rounds} rounds of {s['repeats']})" if rounds > 1 else \
        f"{s['repeats']} runs"
    return (f"{stat} of {runs}, each process warmed up first; {s['n_tokens']} tokens; "
            f"{s['threads']} threads; "
            f"{m.get('cores')} cores; load average {m.get('loadavg_before')} -> {m.get('loadavg_after')}")


def markdown(report) -> str:
    head = "| " + " | ".join(t for _, t, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" if i < 2 else "---:" for i in range(len(COLUMNS))) + "|"
    rows = ["| " + " | ".join(_cell(r, k, f) for k, _, f in COLUMNS) + " |" for r in report.results]
    lines = [head, rule, *rows, "", _caption(report) + "."]
    errors = [f"- {r['label']}: {r['error']}" for r in report.results if r.get("error")]
    if errors:
        lines += ["", "Errors:", *errors]
    over = overheads(report)
    if over:
        lines += ["", "| ours | baseline | metric | ours | baseline | difference |",
                  "|---|---|---|---:|---:|---:|"]
        lines += [f"| {o['ours']} | {o['baseline']} | {o['metric']} | {o['ours_value']:.3f} | "
                  f"{o['baseline_value']:.3f} | {o['difference']:+.3f} ({o['relative']:+.1%}) |"
                  for o in over]
    return "\n".join(lines) + "\n"


def overheads(report) -> list[dict]:
    """Our llamacpp results against the baselines, metric by metric.

    Against ``raw-llamacpp`` (same GGUF files): our run with llama.cpp's own image encoder
    (vision=mmproj) — the same work — on encode, prefill, TTFT and decode ms/token. Against
    ``llama-cpp-python``: every llamacpp run on chat TTFT, turn-2 TTFT and decode ms/token."""
    ok = [r for r in report.results if not r.get("error")]
    ours = [r for r in ok if r["target"] == "llamacpp"]
    out = []

    def add(mine, theirs, metric, a, b):
        if a is None or b is None or not b:
            return
        out.append({"ours": mine["label"], "baseline": theirs["label"], "metric": metric,
                    "ours_value": a, "baseline_value": b, "difference": a - b, "relative": (a - b) / b})

    def ms_per_token(r):
        return 1000.0 / r["decode_tok_s"] if r.get("decode_tok_s") else None

    for base in (r for r in ok if r["target"] == RAW_LLAMACPP):
        for mine in (r for r in ours if r.get("vision") == "mmproj"):
            for metric in ("image_encode_ms", "prefill_ms", "ttft_ms"):
                add(mine, base, metric, mine.get(metric), base.get(metric))
            add(mine, base, "decode_ms_per_token", ms_per_token(mine), ms_per_token(base))
    for base in (r for r in ok if r["target"] == LLAMA_CPP_PYTHON):
        for mine in ours:
            for metric in ("chat_ttft_ms", "turn2_ttft_ms"):
                add(mine, base, metric, mine.get(metric), base.get(metric))
            add(mine, base, "decode_ms_per_token", ms_per_token(mine), ms_per_token(base))
    return out


def plot(report, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in report.results if not r.get("error")]
    labels = [r["label"] for r in results]
    fig, axes = plt.subplots(2, 3, figsize=(14, 2.2 + 0.45 * max(len(labels), 1) * 2))
    for ax, (key, title, higher_better) in zip(axes.flat, PLOTTED):
        values = [_value(r, key) for r in results]
        ax.barh(range(len(labels)), [v or 0 for v in values],
                color=["#4c72b0" if r["target"] not in (RAW_LLAMACPP, LLAMA_CPP_PYTHON) else "#999999"
                       for r in results])
        for i, v in enumerate(values):
            ax.text(v or 0, i, f" {v:.3g}" if v is not None else " n/a", va="center", fontsize=8)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title + (" - higher is better" if higher_better else ""), fontsize=9)
        ax.margins(x=0.25)
    fig.suptitle(f"{Path(report.source).name}: {_caption(report)}", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
