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
