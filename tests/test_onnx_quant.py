"""fp16 / int8 / int4 ONNX bundles: the per-part precision table, they load and run, they shrink.

Accuracy of quantized files is judged on a trained model (the drift suite); on the random tiny model
int4 logits are noise around flat (DESIGN.md), so here only fp16 is held to a numeric bound.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest

from llava_edge.errors import UserError
from llava_edge.export.bundle import read_manifest
from llava_edge.export.onnx import SPECS, convert_bundle, export_onnx
from llava_edge.export.onnx.specs import ModelDims
from llava_edge.export.onnx.validate import check_against_reference
from llava_edge.quant.calibration import FeedReader, MultimodalCalibration, synthetic_samples
from llava_edge.quant.onnx_quant import Int4Options, convert_file, part_precisions
from llava_edge.runtimes import GenerationConfig, Prompt
from llava_edge.runtimes.onnx_runtime import OnnxRuntime

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                         "ignore::UserWarning")


@pytest.fixture(scope="session")
def bundles(tiny_model_dir, tmp_path_factory, onnx_bundle):
    fp32 = onnx_bundle()
    root = tmp_path_factory.mktemp("quantized")
    return {
        "fp32": fp32,
        "fp16": onnx_bundle("fp16"),  # traced, checked, converted
        # converted from the fp32 bundle without tracing again
        "int8": convert_bundle(fp32, root / "int8", "int8", progress=False),
        # the per-part override: vision kept fp32 instead of the default fp16
        "int4": convert_bundle(fp32, root / "int4", "int4", part_precision={"vision": "fp32"}, progress=False),
    }


def test_default_part_precisions():
    assert part_precisions("int4") == {"vision": "fp16", "projector": "fp16", "embeddings": "fp16",
                                       "decoder": "int4"}
    assert part_precisions("int8")["decoder"] == "int8" and part_precisions("int8")["vision"] == "fp16"
    assert set(part_precisions("fp16").values()) == {"fp16"}
    assert part_precisions("int4", {"vision": "fp32", "projector": "int8"})["projector"] == "int8"
    with pytest.raises(UserError, match="unknown precision 'int2' for vision"):
        part_precisions("int4", {"vision": "int2"})


def test_int4_options_are_checked():
    with pytest.raises(UserError, match="unknown int4 algorithm 'awq'"):
        Int4Options(algorithm="awq")
    with pytest.raises(UserError, match="power of two"):
        Int4Options(block_size=48)
    with pytest.raises(UserError, match="accuracy level"):
        Int4Options(accuracy_level=7)


def _ops(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def test_manifest_precisions_and_quantized_ops(bundles):
    import json

    def precisions(bundle):
        m = json.loads((bundle / "manifest.json").read_text())
        return {k.split("/")[1]: c["precision"] for k, c in m["components"].items()}

    assert precisions(bundles["int4"]) == {"vision": "fp32", "projector": "fp16", "embeddings": "fp16",
                                           "decoder": "int4"}
    assert precisions(bundles["int8"])["decoder"] == "int8"
    assert _ops(bundles["int4"] / "onnx/decoder.onnx")["MatMulNBits"] == 15  # 7 per layer x 2 + lm_head
    assert _ops(bundles["int8"] / "onnx/decoder.onnx")["MatMulInteger"] == 15


def test_weights_shrink_with_precision(bundles):
    sizes = {p: (b / "onnx/decoder.onnx.data").stat().st_size for p, b in bundles.items()}
    assert sizes["fp32"] > sizes["fp16"] > sizes["int8"] > sizes["int4"]
    assert sizes["fp16"] == pytest.approx(sizes["fp32"] / 2, rel=0.05)


@pytest.mark.parametrize("precision", ["fp16", "int8", "int4"])
def test_quantized_bundles_load_and_run(bundles, precision, test_image):
    rt = OnnxRuntime.open(bundles[precision])
    embeds = rt.encode_image(test_image)
    assert embeds.shape == (16, 64) and embeds.dtype == np.float32 and np.isfinite(embeds).all()
    ids = [1] + [4] * 16 + rt.tokenizer.encode("USER: what is it? ASSISTANT:")
    prompt = Prompt(np.array(ids), [embeds])
    logits = rt.logits(prompt)
    assert logits.shape == (len(ids), rt.manifest.vocab_size) and np.isfinite(logits).all()
    tokens = list(rt.generate(prompt, GenerationConfig(max_new_tokens=8)))
    assert 0 < len(tokens) <= 8
    # the cached path gives the teacher-forced logits of the prompt's last position
    rt.reset()
    assert np.abs(rt._prefill(prompt, 0) - logits[-1]).max() <= 1e-3


def test_fp16_stays_close_to_fp32(bundles, test_image):
    # fp16 weights and compute (float32 IO): ~3 significant digits; the tiny model's logits are O(1).
    fp32, fp16 = OnnxRuntime.open(bundles["fp32"]), OnnxRuntime.open(bundles["fp16"])
    ids = [1] + [4] * 16 + fp32.tokenizer.encode("USER: what is it? ASSISTANT:")
    a = fp32.logits(Prompt(np.array(ids), [fp32.encode_image(test_image)]))
    b = fp16.logits(Prompt(np.array(ids), [fp16.encode_image(test_image)]))
    assert np.abs(a - b).max() <= 2e-2


@pytest.mark.parametrize("options", [
    Int4Options(algorithm="rtn"), Int4Options(algorithm="hqq"), Int4Options(algorithm="kquant"),
    Int4Options(symmetric=False, block_size=16), Int4Options(accuracy_level=4),
], ids=["rtn", "hqq", "kquant", "asym-16", "acc4"])
def test_int4_algorithms_write_files_that_run(bundles, tiny_model, tmp_path, options):
    src = bundles["fp32"] / "onnx/decoder.onnx"
    files = convert_file(src, tmp_path / "decoder.onnx", "int4", int4=options)
    assert _ops(files[0])["MatMulNBits"] == 15
    dims = ModelDims.from_config(tiny_model.config)
    check_against_reference(SPECS["decoder"], dims, src, files[0])  # loads, runs, finite


def test_gptq_is_calibrated_on_images_and_text(bundles, tiny_model, tmp_path):
    calibration = MultimodalCalibration(synthetic_samples(4))
    fp32 = {p: bundles["fp32"] / f"onnx/{p}.onnx" for p in SPECS}
    reader = calibration.reader("decoder", read_manifest(bundles["fp32"]), bundles["fp32"], fp32)
    feeds = list(reader)
    assert len(feeds) == 4
    # the image rows are the projector's output for the sample's image, not the <image> embedding
    sample = calibration.samples[0]
    rt = OnnxRuntime.open(bundles["fp32"])
    embeds = feeds[0]["inputs_embeds"][0]
    first = int(np.argmax(_ids_of(rt, sample) == rt.image_token_id))
    assert np.abs(embeds[first:first + 16] - rt.encode_image(sample.image)).max() <= 1e-5
    files = convert_file(fp32["decoder"], tmp_path / "decoder.onnx", "int4",
                         int4=Int4Options(algorithm="gptq"), calibration=FeedReader(feeds))
    assert _ops(files[0])["MatMulNBits"] == 15
    check_against_reference(SPECS["decoder"], ModelDims.from_config(tiny_model.config), fp32["decoder"], files[0])
    with pytest.raises(UserError, match="needs calibration data"):
        convert_file(fp32["decoder"], tmp_path / "x.onnx", "int4", int4=Int4Options(algorithm="gptq"))


def _ids_of(rt, sample) -> np.ndarray:
    from llava_edge.model.templates import encode_conversation

    return np.asarray(encode_conversation(rt.tokenizer, rt.template, sample.turns, rt.n_image_tokens).input_ids)


# --- the streamed decoder: built from the weights, never loading the model (how 7B models export) ----


def test_streamed_int4_export_equals_quantizing_the_traced_decoder(bundles, tiny_model_dir, tiny_model, tmp_path):
    from llava_edge.quant.onnx_quant import DEFAULT_INT4

    out = export_onnx(tiny_model_dir, tmp_path / "streamed", "int4", streamed=True, parts=("decoder",),
                      progress=False)
    decoder = read_manifest(out).components["onnx/decoder"]
    assert decoder.precision == "int4" and decoder.details["streamed"] is True
    assert decoder.details["int4"] == DEFAULT_INT4.to_dict()  # the default streams
    assert _ops(out / decoder.file)["MatMulNBits"] == 15
    # Same onnxruntime block quantizer on the same weights: the same numbers up to summation order.
    traced = convert_bundle(bundles["fp32"], tmp_path / "traced", "int4", progress=False)
    dims = ModelDims.from_config(tiny_model.config)
    same = check_against_reference(SPECS["decoder"], dims, traced / "onnx/decoder.onnx", out / decoder.file)
    assert same.max_abs <= 1e-5


def test_int4_default_is_symmetric_block_16(bundles):
    """Measured best for drift and speed together (benchmarks/onnx_int4_variants.md)."""
    decoder = read_manifest(bundles["int4"]).components["onnx/decoder"]
    assert decoder.details["int4"] == {"block_size": 16, "symmetric": True, "accuracy_level": None,
                                       "algorithm": "default"}


@pytest.mark.slow
def test_streamed_fp32_decoder_matches_transformers(tiny_model_dir, tiny_model, tmp_path):
    from llava_edge.export.onnx.streamed import CheckpointWeights, export_decoder_streamed, meta_model
    from llava_edge.export.onnx.validate import check_against_torch

    files = export_decoder_streamed(meta_model(tiny_model_dir), CheckpointWeights(tiny_model_dir),
                                    tmp_path / "decoder.onnx", precision="fp32")
    spec, dims = SPECS["decoder"], ModelDims.from_config(tiny_model.config)
    assert check_against_torch(spec, spec.build(tiny_model).eval(), dims, files[0]).max_abs <= 1e-4


def test_streamed_export_refuses_what_it_cannot_build(tiny_model_dir, tmp_path):
    from llava_edge.errors import ModelError

    with pytest.raises(ModelError, match="streamed decoder export writes fp32 or int4, not 'int8'"):
        export_onnx(tiny_model_dir, tmp_path / "a", "int8", streamed=True, progress=False)
    with pytest.raises(ModelError, match="'hqq' needs the whole fp32 graph"):
        export_onnx(tiny_model_dir, tmp_path / "b", "int4", int4=Int4Options(algorithm="hqq"), streamed=True,
                    progress=False)
