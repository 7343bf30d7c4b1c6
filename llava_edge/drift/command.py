"""``drift``: the function behind ``llava-edge drift``; returns the process exit code.

Exit codes: 0 every candidate within its limits; 1 a limit exceeded (the gate for a release);
user errors (a bad spec, a missing file) raise :class:`~llava_edge.errors.UserError`, which the CLI
turns into one line and exit code 2.
"""

from __future__ import annotations

import shlex

from llava_edge.drift.compare import RERUN, compare
from llava_edge.drift.report import DriftReport
from llava_edge.drift.spec import RuntimeSpec
from llava_edge.drift.thresholds import load_thresholds
from llava_edge.runtimes.base import Runtime

EXIT_OK, EXIT_EXCEEDED = 0, 1


def drift(
    reference,
    candidates,
    eval_set,
    thresholds=None,
    out=None,
    *,
    floor=RERUN,
    limit: int | None = None,
    max_new_tokens: int = 32,
    attribution: bool = True,
    image_root=None,
    plots: bool = True,
    console=None,
    command: str | None = None,
) -> int:
    """Compare, print the table, write ``out/report.{json,md}`` + ``out/plots/`` if ``out``, and
    return 0 (within limits) or 1 (a limit exceeded).

    ``thresholds``: a TOML/JSON file (None: the defaults). ``command``: the command line recorded in
    the Markdown report (default: rebuilt from the arguments). Other arguments as :func:`compare`.
    """
    from rich.console import Console

    console = console or Console()
    limits = load_thresholds(thresholds)  # a bad thresholds file fails before any model is loaded
    candidates = [candidates] if isinstance(candidates, (str, RuntimeSpec, Runtime)) else list(candidates)
    report = compare(reference, candidates, eval_set, floor=floor, limit=limit,
                     max_new_tokens=max_new_tokens, attribution=attribution, image_root=image_root,
                     say=lambda text: console.print(f"[dim]{text}[/dim]", highlight=False))
    report.print_table(console, limits)
    if out is not None:
        command = command or command_line(reference, candidates, eval_set, thresholds, out, floor=floor,
                                          limit=limit, max_new_tokens=max_new_tokens,
                                          attribution=attribution)
        written = report.write(out, thresholds=limits, command=command, plots=plots)
        console.print(f"[green]wrote[/green] {', '.join(str(p) for p in written.values())}", highlight=False)
    violations = report.check(limits)
    console.print(f"drift run: {report.n_items} items, {len(report.candidates)} candidate(s) in "
                  f"{report.seconds:.1f} s", highlight=False)
    return EXIT_EXCEEDED if violations else EXIT_OK


def command_line(reference, candidates, eval_set, thresholds=None, out=None, *, floor=RERUN,
                 limit=None, max_new_tokens=32, attribution=True) -> str:
    """The ``llava-edge drift`` command that repeats a run (recorded in the report)."""
    args = ["llava-edge", "drift", "--reference", _spec_text(reference)]
    for c in candidates:
        args += ["--candidate", _spec_text(c)]
    args += ["--eval", str(eval_set)]
    if thresholds is not None:
        args += ["--thresholds", str(thresholds)]
    if floor != RERUN:
        args += ["--floor", "none" if floor is None else _spec_text(floor)]
    if limit is not None:
        args += ["--limit", str(limit)]
    if max_new_tokens != 32:
        args += ["--max-new-tokens", str(max_new_tokens)]
    if not attribution:
        args += ["--no-attribution"]
    if out is not None:
        args += ["--out", str(out)]
    return shlex.join(args)


def _spec_text(value) -> str:
    if isinstance(value, Runtime):  # an object opened in Python: no spec to repeat, name it
        return f"<{getattr(value, 'name', '') or type(value).__name__} runtime object>"
    return value if isinstance(value, str) else str(value)


__all__ = ["EXIT_EXCEEDED", "EXIT_OK", "DriftReport", "command_line", "drift"]
