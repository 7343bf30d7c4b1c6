"""``verify_bundle_full`` and ``inspect_bundle``: every component checked and loaded, damage reported
component by component, and a description of the bundle read from its manifest alone."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("llama_cpp")

from llava_edge.errors import ModelError, RuntimeNotAvailable  # noqa: E402
from llava_edge.export.bundle import MANIFEST  # noqa: E402
from llava_edge.export.gguf import export_gguf  # noqa: E402
from llava_edge.export.verify import (  # noqa: E402
    FAILED, OK, SKIPPED, format_inspect, inspect_bundle, verify_bundle_full,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def bundle(tiny_model_dir, tmp_path_factory):
    return export_gguf(tiny_model_dir, tmp_path_factory.mktemp("verify") / "b", quant=["Q8_0", "F16"],
                       mmproj_quant=["F16", "F32"])


@pytest.fixture
def copy(bundle, tmp_path):
    out = tmp_path / "b"
    shutil.copytree(bundle, out)
    return out


def _by_name(report) -> dict:
    return {c.name: c for c in report.checks}


def test_a_good_bundle_passes_every_check(bundle):
    report = verify_bundle_full(bundle, threads=1)
    checks = _by_name(report)
    assert report.ok and report.complete, report.summary()
    assert [n for n in checks if n.startswith("sha256")] == [
        "sha256 gguf/model", "sha256 gguf/model-F16", "sha256 gguf/mmproj", "sha256 gguf/mmproj-F32",
        "sha256 gguf/modelfile"]
    # each GGUF file opened once: the default pair, then F16 model with the F32 projector
    assert checks["load llamacpp (vision=mmproj)"].components == ["gguf/model", "gguf/mmproj"]
    assert checks["load llamacpp (quant=F16 vision=mmproj mmproj_quant=F32)"].components == [
        "gguf/model-F16", "gguf/mmproj-F32"]
    smoke = checks["generate llamacpp (quant=F16 vision=mmproj mmproj_quant=F32)"]
    assert smoke.status == OK and "4 token(s)" in smoke.detail
    assert checks["load gguf/modelfile"].detail == "FROM ./model-Q8_0.gguf + ./mmproj-F16.gguf"
    assert report.summary().endswith("bundle OK")
    assert json.loads(json.dumps(report.to_dict()))["ok"] is True


def test_a_damaged_file_fails_its_checks_and_the_rest_is_still_verified(copy):
    path = copy / "gguf" / "model-F16.gguf"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # same size, other bytes
    path.write_bytes(bytes(data))
    (copy / "gguf" / "mmproj-F32.gguf").unlink()
    report = verify_bundle_full(copy, threads=1)
    checks = _by_name(report)
    assert not report.ok
    assert checks["sha256 gguf/model-F16"].status == FAILED
    assert "does not match the manifest's" in checks["sha256 gguf/model-F16"].detail
    assert "missing its file gguf/mmproj-F32.gguf" in checks["sha256 gguf/mmproj-F32"].detail
    assert checks["load llamacpp (quant=F16 vision=mmproj mmproj_quant=F32)"].status == SKIPPED
    assert checks["generate llamacpp (vision=mmproj)"].status == OK  # the intact pair still runs
    assert "bundle BROKEN: 2 check(s) failed" in report.summary()


def test_a_modelfile_naming_a_missing_file_fails(copy):
    manifest = json.loads((copy / MANIFEST).read_text())
    (copy / "gguf" / "model-Q8_0.gguf").rename(copy / "gguf" / "renamed.gguf")
    manifest["components"]["gguf/model"]["file"] = "gguf/renamed.gguf"
    (copy / MANIFEST).write_text(json.dumps(manifest))
    checks = _by_name(verify_bundle_full(copy, threads=1, generate=False))
    assert checks["load gguf/modelfile"].status == FAILED
    assert "FROM ./model-Q8_0.gguf not found" in checks["load gguf/modelfile"].detail
    assert checks["load llamacpp (vision=mmproj)"].status == OK


def test_components_no_installed_runtime_loads_are_skipped_not_passed(bundle, monkeypatch):
    from llava_edge import api

    def nothing(name):
        raise RuntimeNotAvailable(f"runtime {name!r} cannot be used: llama_cpp is not installed")

    monkeypatch.setattr(api, "get_runtime_class", nothing)
    report = verify_bundle_full(bundle)
    assert report.ok and not report.complete
    assert {c.status for c in report.checks if c.name.startswith("load llamacpp")} == {SKIPPED}
    assert "llama_cpp is not installed" in report.skipped[0].detail
    assert report.summary().endswith("check(s) skipped")


def test_a_tokenizer_that_disagrees_with_the_manifest_fails(copy):
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["eos_id"] = 7
    (copy / MANIFEST).write_text(json.dumps(manifest))
    checks = _by_name(verify_bundle_full(copy, generate=False, threads=1))
    assert checks["manifest"].status == FAILED
    assert "the tokenizer's eos id is 2, the manifest says 7" in checks["manifest"].detail


def test_no_manifest_is_an_error(tmp_path):
    with pytest.raises(ModelError, match="not a llava-edge bundle"):
        verify_bundle_full(tmp_path)


def test_inspect_reads_the_manifest(copy):
    manifest = json.loads((copy / MANIFEST).read_text())
    metrics = {"e2e.kl_mean": 0.0123, "e2e.top1": 0.97, "task.accuracy": None}
    manifest["drift"] = {"int4": {"reference": "torch:model", "passed": True, "metrics": metrics},
                         "onnx": {"decoder": {"torch_max_abs": 1.5e-7}}}
    (copy / MANIFEST).write_text(json.dumps(manifest))
    info = inspect_bundle(copy)
    assert info["formats"] == ["gguf"]
    assert info["precisions"]["gguf"] == ["Q8_0", "F16", "F32"]
    assert info["total_bytes"] == sum(p.stat().st_size for p in (copy / "gguf").iterdir())
    assert info["components"]["gguf/mmproj"]["precision"] == "F16"
    assert info["preprocessing"]["size"] == 32 and info["n_image_tokens"] == 16
    assert info["template"] == "vicuna_v1"
    assert info["runtimes"]["llamacpp"] is None and "model folders only" in info["runtimes"]["torch"]
    assert info["drift_summary"] == ["int4: passed vs torch:model: e2e.kl_mean=0.0123, e2e.top1=0.97",
                                     "onnx: decoder.torch_max_abs=1.5e-07"]
    assert any("25814" in d for d in info["known_upstream_defects"])
    text = format_inspect(info)
    assert "gguf/model-F16       F16" in text and "int4: passed" in text and "llamacpp   can run it" in text


def test_onnx_and_gguf_bundle(tiny_model_dir, tmp_path_factory):
    """Uses the ONNX bundle test_onnx_runtime.py exports (35 s here): present when the suite runs."""
    shared = tmp_path_factory.getbasetemp() / "onnx-bundles" / "fp32"
    if not (shared / MANIFEST).is_file():
        pytest.skip("no ONNX bundle exported in this session (run with tests/test_onnx_runtime.py)")
    pytest.importorskip("onnxruntime")
    out = tmp_path_factory.mktemp("verify-onnx") / "b"
    shutil.copytree(shared, out)
    export_gguf(tiny_model_dir, out, quant="Q8_0", mmproj_quant="F16", extend=True)
    report = verify_bundle_full(out, threads=1)
    checks = _by_name(report)
    assert report.ok and report.complete, report.summary()
    assert checks["load onnx"].components == ["onnx/vision", "onnx/projector", "onnx/embeddings",
                                              "onnx/decoder"]
    assert "vision path onnx" in checks["load llamacpp (vision=onnx)"].detail
    assert checks["generate llamacpp (quant=Q8_0 vision=mmproj mmproj_quant=F16)"].status == OK
