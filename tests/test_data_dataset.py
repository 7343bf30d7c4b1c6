"""A deliberately broken dataset: one record per failure kind, and exactly those errors back."""

from __future__ import annotations

import json
import pickle

import pytest
from PIL import Image

from llava_edge.data.dataset import LlavaDataset, validate_dataset
from llava_edge.data.records import PROBLEM_KINDS
from llava_edge.errors import DataError


def _rec(rid, conv, image=None, **extra):
    r = {"id": rid}
    if image is not None:
        r["image"] = image
    r["conversations"] = conv
    r.update(extra)
    return r


def _turns(*texts):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(texts)]


GOOD = [
    _rec("good-image", _turns("<image>\nwhat color is the circle?", "red", "and the square?", "blue"), "ok.png"),
    _rec("good-text", _turns("what is two plus two?", "four")),
    _rec("good-image-last", _turns("what is this?\n<image>", "a circle"), "sub/ok2.png"),
]

# (record, expected problem kind, words the reason must contain)
BROKEN = [
    (_rec("missing-image", _turns("<image>\nq", "a"), "nope.png"), "image_missing", "'nope.png' not found"),
    (_rec("unreadable-image", _turns("<image>\nq", "a"), "broken.png"), "image_unreadable", "not a readable image"),
    (_rec("no-placeholder", _turns("what is it?", "a"), "ok.png"), "placeholder", "exactly one <image>"),
    (_rec("two-placeholders", _turns("<image> <image>\nq", "a"), "ok.png"), "placeholder", "it has 2"),
    (_rec("late-placeholder", _turns("<image>\nq", "a", "<image> again", "b"), "ok.png"), "placeholder",
     "conversations[2] has 1"),
    (_rec("text-with-placeholder", _turns("<image>\nq", "a")), "placeholder", "text-only"),
    (_rec("gpt-first", [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "q"}]), "bad_roles",
     "conversations[0].from is 'gpt'"),
    (_rec("two-humans", [{"from": "human", "value": "q"}, {"from": "human", "value": "q2"}]), "bad_roles",
     "alternate"),
    (_rec("unknown-role", [{"from": "human", "value": "q"}, {"from": "assistant", "value": "a"}]), "bad_roles",
     "'assistant'"),
    (_rec("ends-with-human", _turns("q", "a", "q2")), "bad_roles", "ends with a human turn"),
    (_rec("empty-answer", _turns("q", "   ")), "empty_turn", "conversations[1].value is empty"),
    (_rec("no-turns", []), "empty_turn", "'conversations' is empty"),
    ({"id": "no-conversations", "image": "ok.png"}, "malformed", "missing key 'conversations'"),
    (_rec("role-not-string", [{"from": 1, "value": "q"}, {"from": "gpt", "value": "a"}]), "malformed",
     "conversations[0].from is a JSON number"),
    (_rec("image-not-string", _turns("<image>\nq", "a"), ["ok.png"]), "malformed", "'image' is a JSON array"),
    (_rec("dotdot", _turns("<image>\nq", "a"), "../outside.png"), "image_outside_root", "contains '..'"),
    (_rec("dotdot-inside", _turns("<image>\nq", "a"), "sub/../ok.png"), "image_outside_root", "contains '..'"),
    (_rec("absolute", _turns("<image>\nq", "a"), "/etc/outside.png"), "image_outside_root", "is absolute"),
    (_rec("symlink-out", _turns("<image>\nq", "a"), "link.png"), "image_outside_root", "outside the image root"),
]
NO_ID = ({"conversations": _turns("q", "a")}, "malformed", "missing key 'id'")


@pytest.fixture
def root(tmp_path):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(images / "ok.png")
    Image.new("RGB", (8, 8), (0, 0, 255)).save(images / "sub" / "ok2.png")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not image data")
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    (images / "link.png").symlink_to(tmp_path / "outside.png")
    return images


def _write_json(path, records):
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n")
    return path


def _broken_records():
    return GOOD[:1] + [r for r, _, _ in BROKEN] + [NO_ID[0]] + GOOD[1:]


def test_skip_mode_reports_exactly_the_broken_records(root, tmp_path, caplog):
    path = _write_json(tmp_path / "data.json", _broken_records())
    ds = LlavaDataset(path, root, on_error="skip")
    assert f"skipped {len(BROKEN) + 1} of {len(BROKEN) + 4} records" in caplog.text  # never silent
    report = ds.report
    assert report.total == len(GOOD) + len(BROKEN) + 1
    assert report.skipped == len(BROKEN) + 1 and report.valid == len(GOOD)
    expected = [(r.get("id"), kind) for r, kind, _ in BROKEN + [NO_ID]]
    assert [(p.record_id, p.kind) for p in report.problems] == expected
    for p, (_, kind, words) in zip(report.problems, BROKEN + [NO_ID]):
        assert words in p.reason, (p, words)
        assert f"record #{p.index}, line {p.index + 2}" == p.where  # one record a line after "["
    assert [text for _, text in report.errors][0].startswith("image_missing: ")
    # Every kind of problem is exercised and counted.
    assert set(report.counts) == set(PROBLEM_KINDS) and all(report.counts.values())
    # The dataset serves only the good records, in file order.
    assert len(ds) == len(GOOD)
    assert [ds[i].id for i in range(len(ds))] == [r["id"] for r in GOOD]
    assert ds[0].image == root.resolve() / "ok.png" and ds[0].turns[1] == ("gpt", "red")
    assert ds[1].image is None and ds[2].image == root.resolve() / "sub" / "ok2.png"
    assert "missing-image" in report.summary() and "outside the image root" in report.summary()
    as_json = json.loads(json.dumps(report.as_dict()))
    assert as_json["skipped"] == report.skipped and as_json["problems"][0]["id"] == "missing-image"


@pytest.mark.parametrize("record,kind,words", BROKEN + [NO_ID], ids=lambda v: v["id"] if isinstance(v, dict) and "id" in v else None)
def test_raise_mode_fails_fast_naming_record_and_reason(root, tmp_path, record, kind, words):
    path = _write_json(tmp_path / "data.json", [GOOD[1], record, GOOD[0]])
    ds = LlavaDataset(path, root)  # on_error="raise" is the default
    with pytest.raises(DataError) as err:
        ds.validate()
    msg = str(err.value)
    name = repr(record["id"]) if "id" in record else "(no id)"
    assert f"record {name} (record #1, line 3): {kind}: " in msg and words in msg, msg
    assert str(path) in msg and "--skip" in msg
    # Reading the record itself fails the same way, except a corrupt image file, which only
    # validate_dataset() opens (the training loader decodes the image and reports it then).
    if kind != "image_unreadable":
        with pytest.raises(DataError, match=kind):
            ds[1]
    assert ds[0].id == "good-text" and ds[2].id == "good-image"


def test_jsonl_invalid_line_and_line_numbers(root, tmp_path):
    lines = [json.dumps(GOOD[0]), "", '{"id": "cut", "conversations": [', json.dumps(BROKEN[0][0]),
             "[1, 2]", json.dumps(GOOD[1])]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    report = validate_dataset(path, root, skip=True)
    assert [(p.record_id, p.kind, p.where) for p in report.problems] == [
        (None, "malformed", "line 3"),
        ("missing-image", "image_missing", "line 4"),
        (None, "malformed", "line 5"),
    ]
    assert "invalid JSON" in report.problems[0].reason
    assert "record is a JSON array, expected an object" in report.problems[2].reason
    with pytest.raises(DataError, match=r"record \(no id\) \(line 3\): malformed: invalid JSON"):
        validate_dataset(path, root)


def test_outside_root_refused_even_without_file_checks(root, tmp_path):
    # check_images="none" opens no image file, but never skips the containment check.
    path = _write_json(tmp_path / "d.json", [BROKEN[1][0], BROKEN[-1][0], BROKEN[-4][0]])
    report = validate_dataset(path, root, skip=True, check_images="none")
    assert [(p.record_id, p.kind) for p in report.problems] == [
        ("symlink-out", "image_outside_root"), ("dotdot", "image_outside_root")]
    report = validate_dataset(path, root, skip=True, check_images="exists")  # broken.png exists
    assert [p.record_id for p in report.problems] == ["symlink-out", "dotdot"]


def test_clean_file_validates_and_pickles(root, tmp_path):
    path = _write_json(tmp_path / "d.json", GOOD)
    report = validate_dataset(path, root)
    assert report.ok and report.total == report.valid == 3
    ds = LlavaDataset(path, root)
    assert ds[-1].id == "good-image-last"
    ds[0]  # opens the file; a pickled copy (a DataLoader worker) reopens its own
    clone = pickle.loads(pickle.dumps(ds))
    assert [r.id for r in clone] == [r["id"] for r in GOOD]
    with pytest.raises(IndexError):
        ds[3]


def test_file_level_errors(root, tmp_path):
    bad_root = tmp_path / "missing-root"
    path = _write_json(tmp_path / "d.json", GOOD)
    with pytest.raises(DataError, match="image root .* is not a folder"):
        LlavaDataset(path, bad_root)
    with pytest.raises(DataError, match="cannot read dataset file"):
        LlavaDataset(tmp_path / "nope.json", root)
    (tmp_path / "cut.json").write_text(path.read_text()[:-30])
    with pytest.raises(DataError, match=r"ends inside record #2"):
        LlavaDataset(tmp_path / "cut.json", root, on_error="skip")


def test_every_problem_of_a_record_is_listed_path_first(root, tmp_path):
    path = _write_json(tmp_path / "d.json", [{"id": "worst", "image": "../x.png", "conversations": []}])
    report = validate_dataset(path, root, skip=True)
    assert [p.kind for p in report.problems] == ["image_outside_root", "empty_turn"]
    assert report.skipped == 1 and report.counts["image_outside_root"] == 1
    with pytest.raises(DataError, match="record 'worst' .*image_outside_root"):
        validate_dataset(path, root)
