"""The loss curve of a run as a PNG (matplotlib's Agg canvas; no pyplot, no global backend)."""

from __future__ import annotations

import io
from pathlib import Path

from llava_edge.utils.atomic import atomic_write_bytes


def plot_losses(history: list[dict], path: str | Path, title: str) -> Path:
    """Training loss (and a moving average when there are many steps) against the step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = [h["step"] for h in history]
    losses = [h["loss"] for h in history]
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(steps, losses, lw=1, alpha=0.6 if len(steps) > 20 else 1.0, label="loss")
    window = max(1, len(losses) // 20)
    if window > 1:
        smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
                  for i in range(len(losses))]
        ax.plot(steps, smooth, lw=2, label=f"moving average ({window} steps)")
        ax.legend()
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
