"""pytest fixtures for drift gates in your own test suite.

Enable it in a ``conftest.py``::

    pytest_plugins = ["llava_edge.drift.pytest_plugin"]

Fixtures:

- ``drift_compare``: call it like :func:`llava_edge.drift.compare`. Identical calls (same specs,
  eval set and options) are measured once per test session and shared, so several tests can assert
  different limits on one comparison without paying for it twice.
- ``drift_report``: the comparison configured on the command line or in the ini file
  (``--drift-reference=SPEC --drift-candidate=SPEC [...] --drift-eval=SET`` — the ``=`` form, as
  pytest reads conftest options only after a first pass over the arguments — or the ini keys
  ``drift_reference``, ``drift_candidates`` (one per line), ``drift_eval``); tests using it are
  skipped when it is not configured, so a suite runs on machines without the models.

Options: ``--drift-limit N`` (first N eval records), ``--drift-floor SPEC|none``, ``--drift-out DIR``
(write each report's JSON, Markdown and plots under DIR). The terminal summary lists every
candidate measured, with its verdict against the default thresholds.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from llava_edge.drift.compare import RERUN, compare
from llava_edge.drift.report import DriftReport
from llava_edge.drift.spec import RuntimeSpec

_SESSION = pytest.StashKey["DriftSession"]()


class DriftSession:
    """The session's comparisons, by their arguments."""

    def __init__(self, out: str | None = None):
        self.out = Path(out) if out else None
        self.reports: dict[tuple, DriftReport] = {}

    def __call__(self, reference, candidates, eval_set, **options) -> DriftReport:
        key = _key(reference, candidates, eval_set, options)
        if key not in self.reports:
            report = compare(reference, candidates, eval_set, **options)
            if self.out is not None:
                report.write(self.out / f"drift-{len(self.reports) + 1}")
            self.reports[key] = report
        return self.reports[key]


def pytest_addoption(parser) -> None:
    group = parser.getgroup("llava-edge drift")
    group.addoption("--drift-reference", default=None, metavar="SPEC",
                    help="reference runtime spec for the drift_report fixture (e.g. torch:model)")
    group.addoption("--drift-candidate", action="append", default=None, metavar="SPEC",
                    help="candidate runtime spec (repeatable)")
    group.addoption("--drift-eval", default=None, metavar="SET", help="eval set (eval.json or its folder)")
    group.addoption("--drift-limit", type=int, default=None, metavar="N", help="first N eval records")
    group.addoption("--drift-floor", default=None, metavar="SPEC",
                    help="noise floor: 'rerun' (default), 'none', a spec or a candidate label")
    group.addoption("--drift-out", default=None, metavar="DIR", help="write every drift report under DIR")
    parser.addini("drift_reference", "reference runtime spec for drift_report", default=None)
    parser.addini("drift_candidates", "candidate runtime specs, one per line", type="linelist", default=[])
    parser.addini("drift_eval", "eval set for drift_report", default=None)


def pytest_configure(config) -> None:
    config.stash[_SESSION] = DriftSession(config.getoption("--drift-out", default=None))


@pytest.fixture(scope="session")
def drift_compare(pytestconfig) -> DriftSession:
    """``drift_compare(reference, candidates, eval_set, **options) -> DriftReport``, cached per session."""
    return pytestconfig.stash[_SESSION]


@pytest.fixture(scope="session")
def drift_report(pytestconfig, drift_compare) -> DriftReport:
    """The comparison configured by --drift-* options or drift_* ini keys; skipped when absent."""
    reference = pytestconfig.getoption("--drift-reference") or pytestconfig.getini("drift_reference")
    candidates = pytestconfig.getoption("--drift-candidate") or pytestconfig.getini("drift_candidates")
    eval_set = pytestconfig.getoption("--drift-eval") or pytestconfig.getini("drift_eval")
    if not (reference and candidates and eval_set):
        pytest.skip("drift_report is not configured: pass --drift-reference SPEC --drift-candidate SPEC "
                    "--drift-eval SET (or set drift_reference / drift_candidates / drift_eval in the ini)")
    floor = pytestconfig.getoption("--drift-floor") or RERUN
    return drift_compare(reference, list(candidates), eval_set, floor=None if floor == "none" else floor,
                         limit=pytestconfig.getoption("--drift-limit"))


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    session = config.stash.get(_SESSION, None)
    if not session or not session.reports:
        return
    terminalreporter.section("llava-edge drift")
    for report in session.reports.values():
        terminalreporter.write_line(f"reference {report.reference.label}, {report.n_items} items of "
                                    f"{report.eval_set}, {report.seconds:.1f} s")
        for r in report.candidates:
            n = len(report.check(candidates=[r.label]))
            m = r.metrics
            drop = m.get("task.accuracy_drop")
            terminalreporter.write_line(
                f"  {r.label}: KL {m['e2e.kl_mean']:.3g}, top-1 {m['e2e.top1']:.1%}"
                + (f", accuracy drop {drop:+.1%}" if drop is not None else "")
                + (" -- within default thresholds" if not n else f" -- {n} default limit(s) exceeded"))


def _key(reference, candidates, eval_set, options) -> tuple:
    def one(x):
        return str(x) if isinstance(x, (str, Path, RuntimeSpec)) else ("object", id(x))

    cands = [candidates] if isinstance(candidates, (str, RuntimeSpec)) else list(candidates)
    return (one(reference), tuple(one(c) for c in cands), str(eval_set),
            tuple(sorted((k, one(v)) for k, v in options.items())))
