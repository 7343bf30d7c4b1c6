"""Writing LLaVA JSON files: a top-level array, one record per line, deterministic bytes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Iterable

from llava_edge.utils.atomic import atomic_file


def dumps_record(record: dict) -> str:
    # Keys keep their insertion order and non-ASCII stays as is: equal records give equal bytes.
    return json.dumps(record, ensure_ascii=False)


class JsonArrayWriter:
    """Appends records to an open text file as a JSON array, one record a line."""

    def __init__(self, f: IO[str]):
        self.f = f
        self.count = 0
        f.write("[")

    def write(self, record: dict) -> None:
        self.f.write(",\n" if self.count else "\n")
        self.f.write(dumps_record(record))
        self.count += 1

    def close(self) -> None:
        self.f.write("\n]\n")


def write_json_records(path: str | Path, records: Iterable[dict]) -> int:
    """Write ``records`` as a JSON array (one record a line) atomically; returns how many."""
    with atomic_file(path, "w") as f:
        writer = JsonArrayWriter(f)
        for record in records:
            writer.write(record)
        writer.close()
    return writer.count
