"""Byte-offset index of the records in a LLaVA JSON array or JSONL file, built by streaming.

``json.load`` of LLaVA's 665k mix (about 1 GB) takes several GB of memory. Instead we scan the file
in chunks and keep, per record, its byte span and the line it starts on (three int64 numpy
arrays, 24 bytes a record); records are parsed one at a time later, by offset.

JSON arrays are scanned by :mod:`llava_edge.data.json_scan` (string/escape state and bracket
depth, vectorised with numpy); JSONL files are split at newlines.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError
from .json_scan import scan_json_array

CHUNK_BYTES = 4 << 20
_WS = b" \t\r\n"


@dataclass
class RecordIndex:
    """Where each record lies: ``starts[i]:ends[i]`` are its bytes, ``lines[i]`` its first line (1-based)."""

    path: Path
    format: str  # "json" (a top-level array) or "jsonl"
    starts: np.ndarray
    ends: np.ndarray
    lines: np.ndarray

    def __len__(self) -> int:
        return len(self.starts)

    def where(self, i: int) -> str:
        """Human words for record ``i``'s place in the file."""
        if self.format == "jsonl":
            return f"line {self.lines[i]}"
        return f"record #{i}, line {self.lines[i]}"


def build_index(path: str | Path) -> RecordIndex:
    """Index a LLaVA JSON array or JSONL file (told apart by its first non-blank byte).

    Raises :class:`DataError` when the file as a whole is not one of the two: empty, not starting
    with ``[`` or ``{``, cut off inside a record, or followed by stray text after the array.
    A single bad record (invalid JSON inside it) is not an error here: it is found when read.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            first = b""
            while not first and (head := f.read(1 << 16)):
                first = head.lstrip(_WS + b"\xef\xbb\xbf")[:1]
    except OSError as exc:
        raise DataError(f"cannot read dataset file {path}: {exc}") from exc
    if first == b"[":
        return _index_json_array(path)
    if first == b"{":
        return _index_jsonl(path)
    if not first:
        raise DataError(f"dataset file {path} is empty; expected a JSON array of records or JSONL")
    raise DataError(
        f"dataset file {path} starts with {first.decode('latin-1')!r}; expected a JSON array of "
        f"records ('[') or JSONL (one '{{...}}' record per line)"
    )


def _index_jsonl(path: Path) -> RecordIndex:
    starts, ends, lines = array("q"), array("q"), array("q")
    offset = 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            stripped = line.strip(_WS)
            if stripped:
                lead = len(line) - len(line.lstrip(_WS))
                starts.append(offset + lead)
                ends.append(offset + lead + len(stripped))
                lines.append(lineno)
            offset += len(line)
    return RecordIndex(path, "jsonl", *(np.array(a, np.int64) for a in (starts, ends, lines)))


def _index_json_array(path: Path) -> RecordIndex:
    with open(path, "rb") as f:
        starts, ends, lines = scan_json_array(f, path, CHUNK_BYTES)
    return RecordIndex(path, "json", starts, ends, lines)
