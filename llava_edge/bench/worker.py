"""One bench target in its own process, so that its peak RSS is its own.

``python -m llava_edge.bench.worker`` reads a target spec (JSON) on stdin and prints one JSON line on
stdout: what :func:`~llava_edge.bench.targets.measure` returned, the process's peak RSS and, on a
failure, ``error``. Only the target's own imports happen here (no torch unless the target is torch).
"""

from __future__ import annotations

import json
import resource
import sys
import time
import warnings


def _status_bytes(field: str) -> int | None:
    """A ``/proc/self/status`` memory field (Linux) in bytes, or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """This process's peak resident set. Linux: VmHWM, the high-water mark of this program's own
    memory — not ``ru_maxrss``, which Linux carries over from the parent across fork and exec (a
    worker started by a 400 MiB process would report 400 MiB)."""
    hwm = _status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def main() -> int:
    spec = json.loads(sys.stdin.read())
    result: dict = {"rss_start_bytes": _status_bytes("VmRSS")}
    start = time.perf_counter()
    try:
        from llava_edge.bench.targets import measure

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result.update(measure(spec))
        result.setdefault("notes", []).extend(
            dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, UserWarning)))
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which shows it in the table
        result["error"] = f"{type(exc).__name__}: {exc}"
    result["wall_s"] = round(time.perf_counter() - start, 3)
    result["peak_rss_bytes"] = peak_rss_bytes()
    result["torch_imported"] = "torch" in sys.modules
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
