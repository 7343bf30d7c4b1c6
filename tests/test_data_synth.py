"""The synthetic world: deterministic, valid LLaVA files, answers that agree with the pictures."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
from PIL import Image

from llava_edge.data import synth as synth_mod
from llava_edge.data.dataset import validate_dataset
from llava_edge.data.synth import MC_TURNS, STAGE2_KINDS, corpus_texts, scene_at, synth
from llava_edge.data.world import BACKGROUNDS, COLORS, NUMBERS, POSITIONS, SHAPES, SIZES
from llava_edge.errors import UserError

N, N_EVAL = 300, 60


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "world"
    summary = synth(out, n=N, seed=0, n_eval=N_EVAL)
    assert (summary.train_images, summary.eval_images) == (N, N_EVAL)
    assert (summary.stage1_records, summary.stage2_records, summary.eval_records) == (N, 4 * N, 2 * N_EVAL)
    return out


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _load(world, name):
    return json.loads((world / f"{name}.json").read_text())


def test_layout_and_deterministic_bytes(world, tmp_path):
    files = _files(world)
    names = {k for k in files if not k.startswith("images/")}
    assert names == {"stage1.json", "stage2.json", "eval.json", "annotations.json", "meta.json"}
    assert sum(k.startswith("images/train_") for k in files) == N
    assert sum(k.startswith("images/eval_") for k in files) == N_EVAL
    again = synth(tmp_path / "again", n=N, seed=0, n_eval=N_EVAL)
    assert _files(again.out_dir) == files  # byte-identical JSON and images
    other = synth(tmp_path / "other", n=20, seed=1, n_eval=0)
    assert _load(other.out_dir, "stage2") != _load(world, "stage2")[: 4 * 20]  # the seed matters
    # Scene i does not depend on n: a smaller run is a prefix of a larger one.
    small = synth(tmp_path / "small", n=20, seed=0, n_eval=0)
    assert _load(small.out_dir, "stage2") == _load(world, "stage2")[: 4 * 20]


def test_reader_validates_every_file_with_zero_errors(world):
    for name in ("stage1", "stage2", "eval"):
        report = validate_dataset(world / f"{name}.json", world / "images")  # raise mode: any error fails
        assert report.ok and report.valid == report.total > 0


SHORT_ANSWERS = {*COLORS, *SHAPES, *SIZES, *POSITIONS.values(), *NUMBERS, *BACKGROUNDS, "yes", "no"}


def test_records_follow_llava_formats(world):
    stage1, stage2, evals = _load(world, "stage1"), _load(world, "stage2"), _load(world, "eval")
    assert all(len(r["conversations"]) == 2 for r in stage1)
    assert [r["id"].rsplit("_", 1)[1] for r in stage2[:4]] == list(STAGE2_KINDS)
    kinds = Counter(r["id"].rsplit("_", 1)[1] for r in stage2)
    assert kinds == {k: N for k in STAGE2_KINDS}
    # Multi-turn conversations, short answers; the image before or after the first question.
    convs = [r for r in stage2 if r["id"].endswith("_conversation")]
    # Every short question the scene answers (6 to 8 kinds) in one conversation.
    assert {len(r["conversations"]) for r in convs} <= {12, 14, 16} and len(
        {len(r["conversations"]) for r in convs}) > 1
    mcs = [r for r in stage2 if r["id"].endswith("_mc")]
    assert all(len(r["conversations"]) == 2 * MC_TURNS for r in mcs)
    assert all(t["value"] in "ABCD" for r in mcs for t in r["conversations"][1::2])
    firsts = [r["conversations"][0]["value"] for r in convs]
    assert any(f.startswith("<image>\n") for f in firsts) and any(f.endswith("\n<image>") for f in firsts)
    assert all(t["value"] in SHORT_ANSWERS for r in convs for t in r["conversations"][1::2])
    for r in evals:
        assert r["kind"] in ("short", "mc") and r["category"]
        assert r["conversations"][1]["value"] == r["answer"]
        if r["kind"] == "mc":
            q = r["conversations"][0]["value"]
            options = [f"{'ABCD'[i]}. {o}" for i, o in enumerate(r["options"])]
            assert q.split("\n")[2:-1] == options and q.endswith("from the given choices directly.")
            assert r["answer"] in "ABCD"[: len(r["options"])]
        else:  # a short answer is one of the world's words for what was asked
            assert r["answer"] in SHORT_ANSWERS, r["answer"]


def _expected(question: str, ann: dict) -> str | None:
    """The answer a question must have, recomputed from the annotation (None: not checked here)."""
    objs = ann["objects"]
    if question == "how many shapes are there?":
        return NUMBERS[len(objs)]
    if question == "what color is the background?":
        return ann["background"]
    if m := re.fullmatch(r"how many (\w+)s are there\?", question):
        return NUMBERS[sum(o["shape"] == m[1] for o in objs)]
    if m := re.fullmatch(r"what color is the (\w+)\?", question):
        (o,) = [o for o in objs if o["shape"] == m[1]]
        return o["color"]
    if m := re.fullmatch(r"what shape is the (\w+) object\?", question):
        (o,) = [o for o in objs if o["color"] == m[1]]
        return o["shape"]
    if m := re.fullmatch(r"(?:where is|is) the (\w+) (\w+)(?: small or large)?\?", question):
        (o,) = [o for o in objs if (o["color"], o["shape"]) == (m[1], m[2])]
        return o["size"] if "small or large" in question else o["position"]
    if m := re.fullmatch(r"is there a (\w+) (\w+)\?", question):
        return "yes" if any((o["color"], o["shape"]) == (m[1], m[2]) for o in objs) else "no"
    return None


def test_gold_answers_agree_with_annotations(world):
    anns = {a["image"]: a for a in _load(world, "annotations")}
    checked = Counter()
    for r in _load(world, "eval"):
        question = r["conversations"][0]["value"].removeprefix("<image>\n").split("\n")[0]
        gold = r["answer"] if r["kind"] == "short" else r["options"]["ABCD".index(r["answer"])]
        expected = _expected(question, anns[r["image"]])
        if expected is not None:
            assert gold == expected, (r["id"], question)
            checked[r["kind"]] += 1
    assert checked["short"] == N_EVAL and checked["mc"] > N_EVAL // 3


def test_lookup_drill_asks_every_lookup_with_right_answers(world):
    """The demo LM's pretraining drill: each shape's place and size, every kind's count, present and
    absent colour+kind pairs equally often, answers as the annotation has them; one image, first turn."""
    from llava_edge.data.synth import drill_record

    anns = {a["image"]: a for a in _load(world, "annotations")}
    presence = Counter()
    for i in range(0, N, 5):
        image = f"train_{i:06d}.png"
        record = drill_record(scene_at(0, "train", i), image, i)
        assert record == drill_record(scene_at(0, "train", i), image, i)  # deterministic
        turns = [t["value"] for t in record["conversations"]]
        assert sum("<image>" in t for t in turns) == 1 and "<image>" in turns[0]
        questions = [q.replace("<image>", "").strip() for q in turns[0::2]]
        for question, answer in zip(questions, turns[1::2]):
            assert answer == _expected(question, anns[image]), (image, question)
            if question.startswith("is there a"):
                presence[answer] += 1
        objs = anns[image]["objects"]
        for o in objs:
            assert f"where is the {o['color']} {o['shape']}?" in questions
            assert f"is the {o['color']} {o['shape']} small or large?" in questions
        assert {f"how many {k}s are there?" for k in SHAPES} <= set(questions)
    assert presence["yes"] == presence["no"] > 0


def test_images_match_annotations_and_eval_is_held_out(world):
    anns = _load(world, "annotations")
    for a in anns[::7]:
        im = Image.open(world / "images" / a["image"]).convert("RGB")
        assert im.size == (64, 64)
        assert im.getpixel((0, 0)) == BACKGROUNDS[a["background"]]  # shapes keep off the cell border
        boxes = [o["bbox"] for o in a["objects"]]
        for o, (x0, y0, x1, y1) in zip(a["objects"], boxes):
            assert 0 <= x0 < x1 < 64 and 0 <= y0 < y1 < 64
            # The shape's colour is at its centre (for a triangle: low in the box, where it is wide).
            cy = (y0 + y1) // 2 if o["shape"] != "triangle" else (y0 + 3 * y1) // 4
            assert im.getpixel(((x0 + x1) // 2, cy)) == COLORS[o["color"]], (a["image"], o)
        for i, b in enumerate(boxes):  # no two shapes overlap
            for c in boxes[i + 1 :]:
                assert b[2] < c[0] or c[2] < b[0] or b[3] < c[1] or c[3] < b[1]

    def signature(a):
        return (a["background"], tuple((o["color"], o["shape"], o["size"], o["position"]) for o in a["objects"]))

    train = {signature(a) for a in anns if a["split"] == "train"}
    held_out = {signature(a) for a in anns if a["split"] == "eval"}
    assert held_out and not train & held_out


def test_image_size_parameter(tmp_path):
    out = synth(tmp_path / "big", n=3, n_eval=1, image_size=96).out_dir
    assert Image.open(out / "images" / "train_000000.png").size == (96, 96)
    assert json.loads((out / "meta.json").read_text())["image_size"] == 96
    assert scene_at(0, "train", 0, 96).shapes[0].bbox != scene_at(0, "train", 0, 64).shapes[0].bbox


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = synth_mod.render

    def failing_render(scene):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return real(scene)

    monkeypatch.setattr(synth_mod, "render", failing_render)
    with pytest.raises(KeyboardInterrupt):
        synth(tmp_path / "out", n=20)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_refused_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        synth(out, n=2, n_eval=0)
    assert (out / "keep.txt").exists()
    synth(out, n=2, n_eval=0, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "stage1.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_corpus_texts_cover_a_small_language(world):
    texts = list(corpus_texts(seed=0, n=N))
    assert texts == list(corpus_texts(seed=0, n=N))
    assert not any("<image>" in t for t in texts)
    captions = {r["conversations"][1]["value"] for r in _load(world, "stage1")}
    assert captions <= set(texts)
    words = Counter(w for t in texts for w in re.findall(r"[A-Za-z']+", t))
    assert 60 < len(words) < 150  # a vocabulary a tiny model learns in minutes
