"""``llava-edge demo`` end to end on a short run: train, export --int4 with drift, answer per runtime."""

import json

import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (the gguf extra)")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (the onnx extra)")


@pytest.mark.slow
def test_demo_trains_exports_and_answers_through_every_runtime(tmp_path):
    from rich.console import Console

    from llava_edge.demo import demo
    from llava_edge.export.bundle import read_manifest

    console = Console(record=True, width=200)
    # Two optimizer steps per stage on 16 scenes, 4 held-out ones: the flow, not the accuracy
    # (benchmarks/train_demo_report.json has that).
    run = dict(bench=False, n=16, n_eval=4, console=console, max_steps=2)
    result = demo(tmp_path, questions=2, **run)
    assert set(result["answers"]) == {"torch fp32", "onnx int4", "llamacpp int4"}
    assert all(len(replies) == 2 for replies in result["answers"].values())
    drift = read_manifest(result["bundle"]).drift
    for label in ("onnx-int4", "llamacpp-int4"):
        assert drift[label]["n_items"] == 8 and drift[label]["eval_set"].endswith("eval.json")  # 4 scenes x 2
    text = console.export_text()
    assert "held-out questions, answered by each runtime" in text and "onnx-int4: " in text
    # A second run reuses the trained model and the bundle.
    again = demo(tmp_path, questions=1, **run)
    assert again["bundle"] == result["bundle"] and "(cached" in console.export_text()
    assert json.loads((tmp_path / "train-n16-eval4-max_steps2" / "report.json").read_text())["eval"]


@pytest.mark.parametrize("changed", [True, False])
def test_cached_demo_model_says_when_the_committed_assets_changed(tmp_path, changed):
    """A model cached in runs/demo from earlier assets is reused, with a note saying how to retrain."""
    from llava_edge.demo import train_demo_model
    from llava_edge.pretrain.assets import read_record

    files = dict(read_record()["files"])
    if changed:
        files["language.safetensors"] = "0" * 64
    (tmp_path / "stage2").mkdir()
    (tmp_path / "stage2" / "config.json").write_text("{}")
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "llava_edge.json").write_text(json.dumps({"pretrained": {"files": files}}))
    (tmp_path / "report.json").write_text(json.dumps(
        {"n_eval_scenes": 1000, "train_seconds": 1.0, "eval": {"exact_match": 0.5, "mc_accuracy": 0.5}}))
    said = []
    model, _, scores = train_demo_model(tmp_path, say=said.append)
    assert model == tmp_path / "stage2" and scores["exact_match"] == 0.5  # the cache, not a new run
    assert any("other demo assets" in line for line in said) == changed, said
