"""The streaming byte-offset index: records found exactly, whatever the chunk boundaries."""

from __future__ import annotations

import json

import pytest

from llava_edge.data import index as index_mod
from llava_edge.data.index import build_index
from llava_edge.errors import DataError

# Strings full of what a careless scanner trips on: brackets, escaped quotes, backslashes at
# the end of a string, multi-byte UTF-8, escaped newlines, nested objects and arrays.
TRICKY = [
    {"id": str(i), "image": f"a/{i}.png", "conversations": [
        {"from": "human", "value": "<image>\n" + 'q {[("}])' * (i % 3) + "\\" * (i % 4) + "é中🙂" * (i % 2)},
        {"from": "gpt", "value": '\\"' * (i % 3) + "]}" + "\n" * (i % 2), "meta": {"k": [1, {"x": []}]}},
    ]}
    for i in range(12)
]


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 64, 1 << 20])
@pytest.mark.parametrize("indent", [None, 2])
def test_json_array_spans_and_lines_any_chunking(tmp_path, monkeypatch, chunk, indent):
    monkeypatch.setattr(index_mod, "CHUNK_BYTES", chunk)
    data = ("\ufeff" if indent else "") + json.dumps(TRICKY, indent=indent, ensure_ascii=indent is None)
    raw = data.encode()
    path = tmp_path / "d.json"
    path.write_bytes(raw)
    ix = build_index(path)
    assert ix.format == "json" and len(ix) == len(TRICKY)
    assert [json.loads(raw[a:b]) for a, b in zip(ix.starts, ix.ends)] == TRICKY
    assert list(ix.lines) == [raw[:a].count(b"\n") + 1 for a in ix.starts]


def test_jsonl_skips_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n" + "\n".join(json.dumps(r) for r in TRICKY[:5]).replace("\n{", "\n\n  {") + "\n\n")
    ix = build_index(path)
    raw = path.read_bytes()
    assert ix.format == "jsonl"
    assert [json.loads(raw[a:b]) for a, b in zip(ix.starts, ix.ends)] == TRICKY[:5]
    assert list(ix.lines) == [2, 4, 6, 8, 10] and ix.where(1) == "line 4"


def test_mismatched_brackets_inside_a_record_are_left_to_json_loads(tmp_path):
    # Bracket kinds are not matched inside a record: the span is found, and reading it fails.
    path = tmp_path / "d.json"
    path.write_text('[{"id": [1}], {"id": 2}]')
    ix = build_index(path)
    assert [path.read_bytes()[a:b] for a, b in zip(ix.starts, ix.ends)] == [b'{"id": [1}]', b'{"id": 2}']


def test_empty_array(tmp_path):
    (tmp_path / "e.json").write_text(" [ ] \n")
    assert len(build_index(tmp_path / "e.json")) == 0


@pytest.mark.parametrize("text,words", [
    ("", "is empty"),
    ("  # comment", "starts with '#'"),
    ('[{"id": 1}', "ends before the closing ']'"),
    ('[{"id": 1}, {"id": "x', "ends inside record #1"),
    ('[{"id": 1}, 3, {"id": 2}]', "unexpected '3' between records"),
    ('[{"id": 1}, "x]"]', "unexpected '\"x]\"' between records"),
    ('[{"id": 1}] {"id": 2}', "after the closing ']'"),
    ('[{"id": 1}] x', "unexpected 'x' after the closing ']'"),
    ('[{"id": 1}]]', "unexpected ']' after the closing ']' at byte 11"),
    ('[{"id": 1}}', "unmatched '}' at byte 10"),
    (r'[{"id": 1}, "a\\", {"id": 2}]', "between records at byte 12"),
])
def test_file_level_errors(tmp_path, text, words):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(DataError) as err:
        build_index(path)
    assert words in str(err.value) and str(path) in str(err.value)


def test_random_arrays_any_chunking():
    """Random nested JSON full of quotes, backslashes and brackets: spans equal json's own parse."""
    import io
    import random
    from pathlib import Path

    from llava_edge.data.json_scan import scan_json_array

    rng = random.Random(1)
    pieces = ["a", '"', "\\", "{", "}", "[", "]", "é", "\n", " ", ",", "\\\\", '\\"']

    def text():
        return "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))

    def value(depth):
        r = rng.random()
        if depth > 3 or r < 0.4:
            return rng.choice([text(), 1, None, True, 2.5])
        if r < 0.7:
            return [value(depth + 1) for _ in range(rng.randint(0, 3))]
        return {text(): value(depth + 1) for _ in range(rng.randint(0, 3))}

    for _ in range(200):
        elements = [{text(): value(1) for _ in range(rng.randint(0, 3))} for _ in range(rng.randint(0, 5))]
        raw = json.dumps(elements, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 2])).encode()
        starts, ends, lines = scan_json_array(io.BytesIO(raw), Path("x.json"), rng.choice([1, 2, 3, 7, 64, 4096]))
        assert [json.loads(raw[a:b]) for a, b in zip(starts, ends)] == elements
        assert list(lines) == [raw[:a].count(b"\n") + 1 for a in starts]


def test_memory_stays_bounded_by_the_chunk_not_the_file(tmp_path, monkeypatch):
    """Streaming: peak allocation follows the chunk size (plus 24 bytes a record), not the file."""
    import tracemalloc

    monkeypatch.setattr(index_mod, "CHUNK_BYTES", 256 << 10)
    record = json.dumps({"id": "x", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat is 'this' \"here\"? " + "word " * 200},
        {"from": "gpt", "value": "an answer " * 100}]})
    path = tmp_path / "big.json"
    n = 6000
    path.write_text("[\n" + ",\n".join([record] * n) + "\n]\n")
    size = path.stat().st_size
    assert size > 12 << 20
    tracemalloc.start()
    try:
        ix = build_index(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(ix) == n
    # A few buffers of 256 KiB (the chunk, its translation, carried bytes) and the index arrays;
    # json.load would need several times the file size (12+ MiB).
    assert peak < 4 << 20, peak
