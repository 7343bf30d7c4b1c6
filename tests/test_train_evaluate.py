"""evaluate(): exact match and multiple-choice scoring through the torch runtime's greedy replies."""

from __future__ import annotations

import pytest

from llava_edge.train.evaluate import evaluate, mc_letter, normalise_answer


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from llava_edge.data.synth import synth

    return synth(tmp_path_factory.mktemp("world") / "w", n=0, seed=0, image_size=32, n_eval=3).out_dir


@pytest.mark.parametrize("reply, gold, same", [
    ("Blue.", "blue", True), ("  top   left ", "top left", True), ("blue circle", "blue", False),
    ("two", "three", False),
])
def test_exact_match_normalisation(reply, gold, same):
    assert (normalise_answer(reply) == normalise_answer(gold)) is same


@pytest.mark.parametrize("reply, letter", [("B", "B"), ("B.", "B"), ("(C) red", "C"), ("blue", None), ("", None)])
def test_multiple_choice_letter(reply, letter):
    assert mc_letter(reply) == letter


def test_scores_the_torch_runtime_replies(tiny_model_dir, world, monkeypatch):
    from llava_edge.runtimes import open_runtime
    from llava_edge.runtimes.chat import Conversation

    runtime = open_runtime(tiny_model_dir, runtime="torch")  # a Runtime is accepted as well as a folder
    report = evaluate(runtime, world / "eval.json", max_new_tokens=4)
    assert (report.n_short, report.n_mc) == (3, 3)
    assert 0.0 <= report.exact_match <= 1.0 and 0.0 <= report.mc_accuracy <= 1.0
    assert report.by_category["short"]["total"] == 3

    # A model that always answers right scores 100%; one that always answers "A" scores the share of A.
    from llava_edge.data.dataset import LlavaDataset

    gold = {r.turns[0][1]: r.extra["answer"] for r in LlavaDataset(world / "eval.json", world / "images")}
    monkeypatch.setattr(Conversation, "ask", lambda self, text, image=None, config=None: gold[text] + ".")
    perfect = evaluate(runtime, world / "eval.json")
    assert (perfect.exact_match, perfect.mc_accuracy, perfect.mistakes) == (1.0, 1.0, [])
    monkeypatch.setattr(Conversation, "ask", lambda self, text, image=None, config=None: "A")
    share_a = sum(1 for q, a in gold.items() if a == "A") / 3
    assert evaluate(runtime, world / "eval.json").mc_accuracy == pytest.approx(share_a)
