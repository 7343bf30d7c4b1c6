"""``LlavaDataset``: lazy, validated access to a LLaVA conversation file (JSON array or JSONL).

Opening a dataset indexes the file (byte offsets, see :mod:`llava_edge.data.index`); records are
read and checked one at a time. Two policies for bad records:

- ``on_error="raise"``: the first bad record met (by ``__getitem__`` or ``validate()``) raises a
  :class:`DataError` that names the record and the reason.
- ``on_error="skip"``: opening the dataset validates every record once; bad ones are left out of
  ``len()``/indexing and listed, each with its reason, in ``dataset.report``. Never silent.

Image paths that leave the image root are refused under both policies.
"""

from __future__ import annotations

import json
import logging
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

from ..errors import DataError
from .image_paths import ImageRoot, check_image
from .index import RecordIndex, build_index
from .records import (
    MALFORMED,
    PROBLEM_KINDS,
    Record,
    RecordProblem,
    conversation_problems,
    parse_structure,
    record_id,
)

log = logging.getLogger(__name__)
OnError = Literal["raise", "skip"]
CheckImages = Literal["verify", "exists", "none"]


@dataclass(frozen=True)
class Problem:
    """One reason a record was refused."""

    index: int  # position of the record in the file (0-based)
    where: str  # "record #12, line 340" or "line 13"
    record_id: str | None
    kind: str  # one of records.PROBLEM_KINDS
    reason: str

    def __str__(self) -> str:
        rid = repr(self.record_id) if self.record_id is not None else "(no id)"
        return f"record {rid} ({self.where}): {self.kind}: {self.reason}"


@dataclass
class ValidationReport:
    """What ``validate()`` found: every problem of every record, and the counts."""

    path: Path
    total: int  # records in the file
    problems: list[Problem] = field(default_factory=list)

    @property
    def bad_indices(self) -> list[int]:
        return sorted({p.index for p in self.problems})

    @property
    def skipped(self) -> int:
        """Records refused (a record with several problems counts once)."""
        return len(self.bad_indices)

    @property
    def valid(self) -> int:
        return self.total - self.skipped

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def counts(self) -> dict[str, int]:
        """Problems per kind, every kind listed (zero included), in :data:`PROBLEM_KINDS` order."""
        c = Counter(p.kind for p in self.problems)
        return {kind: c.get(kind, 0) for kind in PROBLEM_KINDS}

    @property
    def errors(self) -> list[tuple[str | None, str]]:
        """(record id, reason) for every problem."""
        return [(p.record_id, f"{p.kind}: {p.reason}") for p in self.problems]

    def as_dict(self) -> dict:
        """Plain data for ``json.dumps`` (a CLI ``--json`` output, a CI artifact)."""
        return {
            "path": str(self.path),
            "total": self.total,
            "valid": self.valid,
            "skipped": self.skipped,
            "counts": self.counts,
            "problems": [
                {"index": p.index, "where": p.where, "id": p.record_id, "kind": p.kind, "reason": p.reason}
                for p in self.problems
            ],
        }

    def summary(self) -> str:
        """A few lines for a terminal: totals, counts per kind, then each problem."""
        head = f"{self.path}: {self.total} records, {self.valid} valid, {self.skipped} refused"
        kinds = ", ".join(f"{k} {n}" for k, n in self.counts.items() if n)
        lines = [head] + ([f"problems: {kinds}"] if kinds else [])
        lines += [f"  {p}" for p in self.problems]
        return "\n".join(lines)


class LlavaDataset:
    """Records of a LLaVA JSON/JSONL file, read lazily by byte offset.

    ``image_root`` is the folder that record ``image`` paths are relative to (default: the
    file's folder). ``check_images`` says how far validation checks image files: "verify" opens
    each with Pillow (``Image.verify()``), "exists" only looks for the file, "none" checks no file
    (the JSON alone, before the images are downloaded). Reading a record checks at most that its
    file exists. Containment in the image root is checked always.
    """

    def __init__(
        self,
        path: str | Path,
        image_root: str | Path | None = None,
        on_error: OnError = "raise",
        check_images: CheckImages = "verify",
    ):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
        if check_images not in ("verify", "exists", "none"):
            raise ValueError(f"check_images must be 'verify', 'exists' or 'none', not {check_images!r}")
        self.path = Path(path)
        self.on_error = on_error
        self.check_images = check_images
        root = Path(image_root) if image_root is not None else self.path.parent
        if not root.is_dir():
            raise DataError(f"image root {root} is not a folder; pass the folder the image paths start from")
        self._images = ImageRoot(root)
        self.image_root = Path(self._images.root)
        self.index: RecordIndex = build_index(self.path)
        self._file = None
        self.report: ValidationReport | None = None
        self._keep: array | None = None  # file positions of the records served (skip mode)
        if on_error == "skip":
            self.report = self._validate(stop_at_first=False)
            bad = set(self.report.bad_indices)
            self._keep = array("q", (i for i in range(len(self.index)) if i not in bad))
            if bad:
                kinds = ", ".join(f"{k} {c}" for k, c in self.report.counts.items() if c)
                log.warning("%s: skipped %d of %d records (%s); dataset.report lists each with its reason",
                            self.path, len(bad), len(self.index), kinds)

    def __len__(self) -> int:
        return len(self._keep) if self._keep is not None else len(self.index)

    def __getitem__(self, i: int) -> Record:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"record {i} out of range for a dataset of {n}")
        pos = self._keep[i] if self._keep is not None else i % n
        # Skip mode validated every record when it opened; raise mode checks the cheap things here
        # (the image is decoded by whoever loads it next) and validate() does the full check.
        files = "none" if self._keep is not None or self.check_images == "none" else "exists"
        parts, problems = self._load(pos, files=files)
        if problems:
            raise self._error(problems[0])
        rid, image, turns, extra = parts
        return Record(rid, Path(image) if image is not None else None, turns, extra)

    def __iter__(self) -> Iterator[Record]:
        for i in range(len(self)):
            yield self[i]

    def validate(self) -> ValidationReport:
        """Check every record. ``raise`` mode: DataError at the first problem; ``skip``: the report."""
        if self.on_error == "skip" and self.report is not None:
            return self.report
        return self._validate(stop_at_first=self.on_error == "raise")

    def _validate(self, stop_at_first: bool) -> ValidationReport:
        report = ValidationReport(self.path, len(self.index))
        for pos in range(len(self.index)):
            _, problems = self._load(pos, files=self.check_images)
            if problems and stop_at_first:
                raise self._error(problems[0])
            report.problems.extend(problems)
        return report

    def _load(self, pos: int, files: str) -> tuple[tuple | None, list[Problem]]:
        """Read and check record ``pos``: ((id, image file or None, turns, extra), problems).

        ``files``: "verify" (the image exists and Pillow can verify it), "exists", or "none".
        Containment in the image root is checked whatever ``files`` says.
        """
        obj = None
        try:
            obj = json.loads(self._read(pos))
            rid, image, turns, extra = parse_structure(obj)
        except json.JSONDecodeError as exc:
            return None, [self._problem(pos, None, MALFORMED, f"invalid JSON ({exc})")]
        except UnicodeDecodeError as exc:
            return None, [self._problem(pos, None, MALFORMED, f"not UTF-8 text ({exc})")]
        except RecordProblem as exc:
            return None, [self._problem(pos, record_id(obj), exc.kind, exc.reason)]
        found = []  # image problems first: a path outside the root is the one to see first
        resolved = None
        if image is not None:
            try:
                resolved = self._images.resolve(image)
                if files != "none":
                    check_image(resolved, image, verify=files == "verify")
            except RecordProblem as exc:
                found.append(exc)
        found += conversation_problems(turns, has_image=image is not None)
        problems = [self._problem(pos, rid, p.kind, p.reason) for p in found]
        return (rid, resolved, turns, extra), problems

    def _problem(self, pos: int, rid: str | None, kind: str, reason: str) -> Problem:
        return Problem(pos, self.index.where(pos), rid, kind, reason)

    def _read(self, pos: int) -> bytes:
        if self._file is None:
            self._file = open(self.path, "rb")
        start, end = int(self.index.starts[pos]), int(self.index.ends[pos])
        self._file.seek(start)
        return self._file.read(end - start)

    def _error(self, problem: Problem) -> DataError:
        hint = (
            "fix or remove the record"
            if self.on_error == "skip"
            else "fix or remove the record, or use on_error='skip' (CLI: --skip) to skip bad records"
        )
        return DataError(f"{self.path}: {problem}. To go on: {hint}.")

    def close(self) -> None:
        if getattr(self, "_file", None) is not None:
            self._file.close()
            self._file = None

    # An open file cannot cross a process boundary (DataLoader workers): reopen lazily there.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_file"] = None
        return state

    def __del__(self) -> None:
        self.close()


def validate_dataset(
    path: str | Path,
    images: str | Path | None = None,
    skip: bool = False,
    check_images: CheckImages = "verify",
) -> ValidationReport:
    """Validate a whole dataset file (``llava-edge data validate FILE --images ROOT [--skip]``).

    ``skip=False``: DataError at the first bad record. ``skip=True``: the report of every problem.
    """
    ds = LlavaDataset(path, images, on_error="skip" if skip else "raise", check_images=check_images)
    try:
        return ds.validate()
    finally:
        ds.close()
