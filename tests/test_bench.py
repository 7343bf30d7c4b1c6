"""``bench``: each target in its own process, the same metrics for our runtime and the llama.cpp
baselines, and the outputs (JSON, Markdown, PNG) written."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("llama_cpp")

from llava_edge.bench import BenchReport, Target, bench, default_targets, parse_target  # noqa: E402
from llava_edge.bench.run import summarise  # noqa: E402
from llava_edge.errors import UserError  # noqa: E402
from llava_edge.export.gguf import export_gguf  # noqa: E402


@pytest.fixture(scope="module")
def bundle(tiny_model_dir, tmp_path_factory):
    return export_gguf(tiny_model_dir, tmp_path_factory.mktemp("bench") / "b", quant="Q8_0",
                       mmproj_quant="F16")


@pytest.fixture(scope="module")
def report(bundle, tmp_path_factory) -> tuple[BenchReport, object]:
    out = tmp_path_factory.mktemp("bench-out")
    return bench(bundle, n_tokens=4, repeats=1, rounds=2, threads=1, out=out, statistic="min"), out


def test_target_grammar():
    assert parse_target("llamacpp?vision=mmproj") == Target("llamacpp", {"vision": "mmproj"},
                                                            "llamacpp-mmproj")
    fast = parse_target("fast=onnx?threads=2&verify=false")
    assert fast == Target("onnx", {"threads": 2, "verify": False}, "fast")
    assert parse_target(str(fast)) == fast  # str() writes the grammar back
    with pytest.raises(UserError, match="option 'vision' is not KEY=VALUE"):
        parse_target("llamacpp?vision")


def test_default_targets_of_a_gguf_bundle(bundle, tiny_model_dir):
    assert [t.label for t in default_targets(bundle)] == ["llamacpp", "raw-llamacpp", "llama-cpp-python"]
    assert [t.label for t in default_targets(bundle, tiny_model_dir)][-1] == "torch"
    assert [t.label for t in default_targets(tiny_model_dir)] == ["torch"]


def test_every_target_measured_in_its_own_process(report, bundle):
    report, _ = report
    by = {r["label"]: r for r in report.results}
    assert list(by) == ["llamacpp", "raw-llamacpp", "llama-cpp-python"]
    for r in report.results:
        assert "error" not in r, r.get("error")
        assert r["torch_imported"] is False  # RSS is the runtime's own, not torch's
        assert r["peak_rss_bytes"] > 10 << 20
        assert r["prefill_ms"] > 0 and r["ttft_ms"] > 0 and r["decode_tok_s"] > 0
        assert len(r["runs"]) == 2 and len(r["load_ms_rounds"]) == 2  # one run in each of 2 rounds
    assert by["llamacpp"]["turn2_ttft_ms"] > 0 and by["llama-cpp-python"]["turn2_ttft_ms"] > 0
    assert by["raw-llamacpp"]["turn2_ttft_ms"] is None  # a decode loop, not a chat
    gguf = sum(p.stat().st_size for p in (bundle / "gguf").glob("*.gguf"))
    assert by["llamacpp"]["file_bytes"] == by["raw-llamacpp"]["file_bytes"] == gguf
    assert by["llamacpp"]["vision"] == "mmproj"  # a GGUF-only bundle: llama.cpp's own encoder
    assert by["llamacpp"]["prompt_tokens"] == by["raw-llamacpp"]["prompt_tokens"]  # the same prompt
    assert by["llamacpp"]["ttft_ms"] >= by["llamacpp"]["image_encode_ms"]
    assert by["llama-cpp-python"]["image_encode_ms"] is None  # inside its chat handler: not separable
    assert report.settings["statistic"] == "min"
    assert report.settings["targets"] == ["llamacpp=llamacpp", "raw-llamacpp=raw-llamacpp",
                                          "llama-cpp-python=llama-cpp-python"]


def test_overheads_against_the_baselines(report):
    report, _ = report
    pairs = {(o["ours"], o["baseline"], o["metric"]) for o in report.overheads()}
    assert ("llamacpp", "raw-llamacpp", "decode_ms_per_token") in pairs
    assert ("llamacpp", "raw-llamacpp", "prefill_ms") in pairs
    assert ("llamacpp", "llama-cpp-python", "turn2_ttft_ms") in pairs
    for o in report.overheads():
        assert o["difference"] == pytest.approx(o["ours_value"] - o["baseline_value"])


def test_outputs_written(report):
    report, out = report
    data = json.loads((out / "bench.json").read_text())
    assert [r["label"] for r in data["results"]] == ["llamacpp", "raw-llamacpp", "llama-cpp-python"]
    assert data["machine"]["cores"] >= 1 and "llama-cpp-python" in data["machine"]["packages"]
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "bench.md").read_text()
    assert md.startswith("| target | vision | load ms |") and "| raw-llamacpp | mmproj |" in md
    assert "best of 2 runs (2 rounds of 1), each process warmed up first; 4 tokens; 1 threads" in md


def test_a_failing_target_is_reported_not_fatal(bundle):
    report = bench(bundle, ["onnx", "x=llamacpp?bogus=1"], n_tokens=2, repeats=1, threads=1)
    errors = {r["label"]: r["error"] for r in report.results}
    assert "the bundle has no onnx/vision" in errors["onnx"]
    assert "does not take the option(s) bogus" in errors["x"]
    assert "| onnx | error |" in report.markdown()


def test_bad_requests(bundle, tmp_path):
    with pytest.raises(UserError, match="the torch target runs a model folder"):
        bench(bundle, ["torch"])
    with pytest.raises(UserError, match="share a label"):
        bench(bundle, ["llamacpp", "llamacpp"])
    with pytest.raises(UserError, match="statistic='mean'"):
        bench(bundle, statistic="mean")
    with pytest.raises(UserError, match="rounds must be >= 1"):
        bench(bundle, rounds=0)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match="not an image"):
        bench(bundle, ["llamacpp"], image=tmp_path / "bad.png")


def test_summary_statistics():
    runs = [{"prefill_ms": 3.0, "decode_tok_s": 10.0}, {"prefill_ms": 1.0, "decode_tok_s": 30.0},
            {"prefill_ms": 2.0, "decode_tok_s": 20.0}]
    best = summarise(Target("llamacpp"), {"runs": runs}, "min")
    assert best["prefill_ms"] == 1.0 and best["decode_tok_s"] == 30.0  # best: least time, most tokens/s
    mid = summarise(Target("llamacpp"), {"runs": runs})
    assert mid["prefill_ms"] == 2.0 and mid["prefill_ms_range"] == [1.0, 3.0]
    report = BenchReport("b", {"statistic": "min"}, {}, [best])
    again = report.with_statistic("median").results[0]
    assert again["prefill_ms"] == 2.0 and again["decode_tok_s"] == 20.0 and again["runs"] == runs
