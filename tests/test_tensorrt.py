"""TensorRT: the ONNX parts it parses (checked here, run in onnxruntime), the engine builder and the
runtime (run only where TensorRT and an NVIDIA GPU are; skipped with the reason otherwise)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from llava_edge.errors import ModelError, RuntimeNotAvailable, UserError
from llava_edge.export.onnx.specs import PARTS, ModelDims, past_name
from llava_edge.export.tensorrt.builder import Profile
from llava_edge.export.tensorrt.onnx_parts import quantize_weights
from llava_edge.export.tensorrt.operators import SUPPORTED_OPS, problems

PRECISIONS = ("fp16", "int8", "int4")


def _tensorrt_missing() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed (NVIDIA's tensorrt Python package)"
    try:
        import torch
    except ImportError:
        return "torch is not installed (the tensorrt runtime keeps its buffers in torch CUDA tensors)"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    return None


needs_tensorrt = pytest.mark.skipif(_tensorrt_missing() is not None, reason=_tensorrt_missing() or "")


@pytest.fixture(scope="module")
def trt_bundle(tiny_model_dir, tmp_path_factory):
    """``trt_bundle(precision)``: the tiny model's TensorRT ONNX parts, exported once per precision."""
    from llava_edge.export.onnx import export_onnx

    def get(precision: str):
        out = tmp_path_factory.getbasetemp() / "trt-bundles" / precision
        if not (out / "manifest.json").is_file():
            export_onnx(tiny_model_dir, out, precision, flavour="tensorrt", progress=False)
        return out

    return get


def _graph(bundle, part: str):
    manifest = json.loads((bundle / "manifest.json").read_text())
    return onnx.load(str(bundle / manifest["components"][f"tensorrt-onnx/{part}"]["file"]))


# --- the ONNX files ----------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_node_is_in_the_operator_set_tensorrt_documents(trt_bundle, precision):
    bundle = trt_bundle(precision)
    for part in PARTS:
        graph = _graph(bundle, part)
        assert problems(graph) == [], (precision, part)
        assert {n.op_type for n in graph.graph.node} <= SUPPORTED_OPS
        assert all(n.domain in ("", "ai.onnx") for n in graph.graph.node)


def test_the_onnxruntime_int4_decoder_would_be_rejected(onnx_bundle):
    """The check can fail: MatMulNBits (a com.microsoft contrib operator) is reported."""
    bundle = onnx_bundle("int4")
    manifest = json.loads((bundle / "manifest.json").read_text())
    graph = onnx.load(str(bundle / manifest["components"]["onnx/decoder"]["file"]))
    found = problems(graph)
    assert any("MatMulNBits" in p and "com.microsoft" in p for p in found)


def test_int4_weights_are_blocked_dequantize_linear_with_positive_scales(trt_bundle):
    graph = _graph(trt_bundle("int4"), "decoder")
    inits = {t.name: t for t in graph.graph.initializer}
    dqs = [n for n in graph.graph.node if n.op_type == "DequantizeLinear"]
    matmuls = [n for n in graph.graph.node if n.op_type == "MatMul" and n.input[1] in {d.output[0] for d in dqs}]
    assert len(dqs) == len(matmuls) > 0
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 21
    for node in dqs:
        attrs = {a.name: a.i for a in node.attribute}
        assert attrs == {"axis": 0, "block_size": 64}
        assert inits[node.input[0]].data_type == onnx.TensorProto.INT4
        assert len(node.input) == 2  # no zero point: TensorRT's INT4 is symmetric
        assert (numpy_helper.to_array(inits[node.input[1]]) > 0).all()
    assert not any(n.op_type == "MatMulNBits" for n in graph.graph.node)


def test_quantize_weights_round_trips_within_half_a_step():
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((128, 8)).astype(np.float32)
    w[:64, 3] = 0.0  # an all-zero block keeps a positive scale and dequantizes to zero
    for bits, qmax in ((4, 7), (8, 127)):
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 128])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
            [numpy_helper.from_array(w, "w")])
        model = quantize_weights(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), bits, 64)
        assert problems(model) == []
        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        assert "w" not in inits  # replaced, not kept beside its quantized copy
        q = inits["w_q%d" % bits].astype(np.float32)
        scale = inits["w_q%d_scale" % bits]
        step = np.repeat(scale, 64, axis=0) if bits == 4 else scale[None, :]
        assert np.abs(q).max() <= qmax
        assert np.all(np.abs(q * step - w) <= step / 2 + 1e-7)
        assert np.all(q[:64, 3] == 0)


def test_a_width_that_is_not_a_multiple_of_the_block_is_refused():
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 96])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(np.ones((96, 4), np.float32), "w")])
    with pytest.raises(UserError, match="not a multiple of the INT4 block size 64"):
        quantize_weights(helper.make_model(graph), 4, 64)


@pytest.mark.parametrize("precision, atol", [("fp16", 2e-2), ("int8", 0.1)])
def test_tensorrt_parts_follow_torch_in_onnxruntime(trt_bundle, torch_rt_tiny, test_image, precision, atol):
    """The exact files TensorRT would parse, run by onnxruntime on CPU, against torch fp32.
    Tolerances: fp16 weights and activations on a random 2-layer model move logits by ~1e-2;
    per-channel int8 weights by up to ~5e-2 (measured). Where the top token differs, torch's own
    margin between the two tokens must be within that tolerance (a near-tie, not a wrong model)."""
    from llava_edge.runtimes.onnx_runtime import OnnxRuntime
    from llava_edge.runtimes.base import Prompt

    rt = OnnxRuntime.open(trt_bundle(precision), components="tensorrt-onnx")
    emb_t, emb_o = torch_rt_tiny.encode_image(test_image), rt.encode_image(test_image)
    assert np.abs(emb_t - emb_o).max() < 5e-2
    ids = np.array([1, *([torch_rt_tiny.image_token_id] * torch_rt_tiny.n_image_tokens), 40, 41, 42])
    logits_t = torch_rt_tiny.logits(Prompt(ids, [emb_t]))
    logits_o = rt.logits(Prompt(ids, [emb_t]))
    assert np.abs(logits_t - logits_o).max() < atol
    top_t, top_o = logits_t.argmax(-1), logits_o.argmax(-1)
    rows = np.flatnonzero(top_t != top_o)
    assert len(rows) <= len(ids) // 10
    assert np.all(logits_t[rows, top_t[rows]] - logits_t[rows, top_o[rows]] < 2 * atol)


@pytest.fixture(scope="module")
def torch_rt_tiny(tiny_model_dir):
    from llava_edge.runtimes.torch_runtime import TorchRuntime

    return TorchRuntime.open(tiny_model_dir)


@pytest.mark.slow
def test_export_records_int4_drift_within_the_suite_limits(tmp_path):
    """`llava-edge export --format tensorrt --int4` on the demo base (pretrained LM and tower): the
    drift suite runs the TensorRT parts in onnxruntime against the fp16 torch reference and the
    manifest records a pass under the default int4 limits."""
    from llava_edge.export.pipeline import export
    from llava_edge.pretrain.base import build_demo_base

    model = build_demo_base(tmp_path / "base")
    bundle = export(model, tmp_path / "bundle", formats=["tensorrt"], level="int4", progress=False)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert sorted(k for k in manifest["components"]) == sorted(f"tensorrt-onnx/{p}" for p in PARTS)
    summary = manifest["drift"]["tensorrt-onnx-int4"]
    assert summary["candidate"].endswith("?components=tensorrt-onnx")
    assert summary["passed"] is True, summary
    assert summary["metrics"]["e2e.kl_mean"] <= summary["thresholds"]["max_kl"]
    assert summary["metrics"]["e2e.top1"] >= summary["thresholds"]["min_top1"]


# --- profiles, portability, and what happens without TensorRT ----------------------------------------
def test_profile_shapes_follow_the_part_contracts():
    d = ModelDims(image_size=32, vision_hidden=32, n_image_tokens=16, feature_layer=-2, drop_cls=True,
                  d_model=64, vocab_size=512, n_layers=2, n_kv_heads=2, head_dim=16)
    p = Profile(batch=(1, 1, 2), seq=(1, 64, 512), past=(0, 256, 1024), images=(1, 1, 3))
    dec = p.shapes("decoder", d)
    assert dec["attention_mask"] == ((1, 1), (1, 320), (2, 1536))  # past + seq
    assert dec[past_name(1, "value")] == ((1, 2, 0, 16), (1, 2, 256, 16), (2, 2, 1024, 16))
    assert len(dec) == 3 + 2 * 2
    assert p.shapes("vision", d)["pixel_values"][2] == (3, 3, 32, 32)
    assert p.shapes("projector", d)["image_features"][0] == (1, 16, 32)
    with pytest.raises(UserError, match="seq"):
        Profile(seq=(8, 4, 16))


def test_engine_mismatch_message_names_both_versions_and_gpus():
    """The check the runtime runs before deserializing (importable without TensorRT)."""
    from llava_edge.export.tensorrt.builder import check_engine_matches

    built = {"tensorrt_version": "10.8.0", "gpu": {"name": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9"}}
    check_engine_matches("B", "tensorrt/decoder", built, "10.8.0",
                         {"name": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9"})
    with pytest.raises(RuntimeNotAvailable) as err:
        check_engine_matches("B", "tensorrt/decoder", built, "10.12.0",
                             {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"})
    text = str(err.value)
    for fact in ("10.8.0", "RTX 4090", "8.9", "10.12.0", "H100", "9.0", "llava-edge build-engines B"):
        assert fact in text


@pytest.mark.skipif(_tensorrt_missing() is None, reason="TensorRT and a GPU are present: nothing to refuse")
def test_build_engines_without_tensorrt_says_what_is_missing(trt_bundle, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(trt_bundle("fp16"), bundle)
    before = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*"))
    result = subprocess.run([sys.executable, "-m", "llava_edge.cli", "build-engines", str(bundle)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "TensorRT is not installed" in result.stderr or "CUDA GPU" in result.stderr
    assert sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*")) == before  # nothing lost


def test_build_engines_needs_the_tensorrt_parts(onnx_bundle):
    from llava_edge.export.tensorrt.builder import build_engines

    with pytest.raises(ModelError, match="--format tensorrt"):
        build_engines(onnx_bundle("fp32"))


def test_the_tensorrt_runtime_is_registered_with_an_install_hint():
    from llava_edge.runtimes.registry import get_runtime_class, runtime_names

    assert "tensorrt" in runtime_names()
    if importlib.util.find_spec("tensorrt") is None:
        with pytest.raises(RuntimeNotAvailable, match="tensorrt is not installed.*NVIDIA"):
            get_runtime_class("tensorrt")


# --- on a machine with TensorRT and a GPU --------------------------------------------------------------
@needs_tensorrt
@pytest.mark.parametrize("precision", PRECISIONS)
def test_engines_follow_the_onnx_files_they_were_built_from(trt_bundle, test_image, tmp_path, precision):
    """Engines against onnxruntime on the same files (fp16 kernels on both sides: 5e-2 on logits of
    a random 2-layer model), and the KV cache in device memory against a cache-free pass: every
    greedily generated token is the argmax of the teacher-forced logits at its position."""
    from llava_edge.export.tensorrt.builder import build_engines
    from llava_edge.runtimes.base import Prompt
    from llava_edge.runtimes.onnx_runtime import OnnxRuntime
    from llava_edge.runtimes.sampling import GenerationConfig
    from llava_edge.runtimes.tensorrt_runtime import TensorRTRuntime

    bundle = tmp_path / "b"
    shutil.copytree(trt_bundle(precision), bundle)
    build_engines(bundle, Profile(seq=(1, 32, 64), past=(0, 32, 64)), timing_cache=tmp_path / "cache")
    assert (tmp_path / "cache").stat().st_size > 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["components"]["tensorrt/decoder"]["details"]["portable"] is False
    rt, ort_rt = TensorRTRuntime.open(bundle), OnnxRuntime.open(bundle, components="tensorrt-onnx")
    emb = ort_rt.encode_image(test_image)
    assert np.abs(rt.encode_image(test_image) - emb).max() < 5e-2
    ids = np.array([1, *([rt.image_token_id] * rt.n_image_tokens), 40, 41, 42])
    assert np.abs(rt.logits(Prompt(ids, [emb])) - ort_rt.logits(Prompt(ids, [emb]))).max() < 5e-2
    tokens = list(rt.generate(Prompt(ids, [emb]), GenerationConfig(max_new_tokens=8, stop_token_ids=())))
    forced = rt.logits(Prompt(np.concatenate([ids, tokens]), [emb]))
    assert forced[len(ids) - 1:-1].argmax(-1).tolist() == tokens


def test_verify_loads_the_tensorrt_parts_in_onnxruntime(trt_bundle):
    from llava_edge.export.verify import verify_bundle_full

    report = verify_bundle_full(trt_bundle("int4"), n_tokens=2)
    assert report.ok
    loaded = [c for c in report.checks if c.name.startswith("load onnx") and c.status == "ok"]
    assert loaded and "components=tensorrt-onnx" in loaded[0].name
    assert set(loaded[0].components) == {f"tensorrt-onnx/{p}" for p in PARTS}
