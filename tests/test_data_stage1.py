"""Stage-1 conversion: caption pairs as LLaVA's brief-description records."""

from __future__ import annotations

import json

from PIL import Image

from llava_edge.data.dataset import validate_dataset
from llava_edge.data.stage1 import BRIEF_PROMPTS, CaptionPair, caption_record, stage1_records, write_stage1


def test_record_shape_and_prompt():
    r = caption_record(("coco/0001.jpg", " a cat on a mat. "), seed=3)
    assert r["id"] == "0001" and r["image"] == "coco/0001.jpg"
    (human, gpt) = r["conversations"]
    assert human["from"] == "human" and gpt == {"from": "gpt", "value": "a cat on a mat."}
    assert human["value"].count("<image>") == 1
    prompt = human["value"].replace("<image>", "").strip()
    assert prompt in BRIEF_PROMPTS
    assert human["value"] in (f"<image>\n{prompt}", f"{prompt}\n<image>")


def test_deterministic_and_independent_of_neighbours():
    pairs = [CaptionPair(f"{i}.png", f"caption {i}", id=f"r{i}") for i in range(300)]
    a = list(stage1_records(pairs, seed=0))
    assert a == list(stage1_records(pairs, seed=0))
    assert list(stage1_records(pairs[100:], seed=0)) == a[100:]  # a record's text depends on its id
    assert a != list(stage1_records(pairs, seed=1))
    humans = [r["conversations"][0]["value"] for r in a]
    # Every prompt is used and the image goes first or last, both often (seeded RNG, 300 draws).
    assert {h.replace("<image>", "").strip() for h in humans} == set(BRIEF_PROMPTS)
    first = sum(h.startswith("<image>") for h in humans)
    assert 100 < first < 200


def test_write_stage1_validates(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for i in range(3):
        Image.new("RGB", (4, 4)).save(root / f"{i}.png")
    out = tmp_path / "stage1.json"
    assert write_stage1([(f"{i}.png", f"caption {i}") for i in range(3)], out) == 3
    assert [r["id"] for r in json.loads(out.read_text())] == ["0", "1", "2"]
    assert validate_dataset(out, root).valid == 3
    assert {p.name for p in tmp_path.iterdir()} == {"images", "stage1.json"}  # no temp file left
