"""Importance matrices: the llama.cpp file formats, the statistic against a direct computation, and
the weighted quantization llama.cpp does with it (checked on the dequantized weights, not trusted).

The quantized files are read back with gguf-py and dequantized with its reference code; llama.cpp's
unweighted Q4_0 is first checked bit for bit against gguf-py's reference quantizer, so the weighted
errors below are measured on exactly what llama.cpp wrote.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")

from gguf.constants import GGMLQuantizationType  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

from llava_edge.errors import DataError, ModelError  # noqa: E402
from llava_edge.export.gguf import export_gguf  # noqa: E402
from llava_edge.export.gguf.check import read_gguf_info  # noqa: E402
from llava_edge.export.gguf.quantize import quantize_gguf, quantized_by_llamacpp  # noqa: E402
from llava_edge.quant.imatrix import (  # noqa: E402
    ImportanceMatrix, calibration_prompts, compute_imatrix, load_imatrix, save_imatrix,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                        "ignore:.*own CLIP encoder.*:UserWarning")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from llava_edge.data.synth import synth

    out = tmp_path_factory.mktemp("imatrix-world") / "world"
    synth(out, n=2, n_eval=1, image_size=32)  # 8 stage-2 conversations, each with its image
    return out


@pytest.fixture(scope="module")
def imatrix(tiny_model_dir, world):
    return compute_imatrix(tiny_model_dir, world / "stage2.json", n_samples=8, process_output=True)


@pytest.fixture(scope="module")
def f16_file(tiny_model_dir, tmp_path_factory):
    bundle = export_gguf(tiny_model_dir, tmp_path_factory.mktemp("imatrix-f16") / "b", quant="F16",
                         mmproj_quant="F16")
    return bundle / "gguf" / "model-F16.gguf"


def _tensors(path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def _weights(t) -> np.ndarray:
    """A tensor of a GGUF file as float32 rows (dequantized when quantized)."""
    data = np.array(t.data)
    shape = tuple(reversed([int(x) for x in t.shape]))
    if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        return data.astype(np.float32).reshape(shape)
    return dequantize(data, t.tensor_type).reshape(shape)


# --------------------------------------------------------------------------------------------------
# the file formats
# --------------------------------------------------------------------------------------------------


def _example() -> ImportanceMatrix:
    rng = np.random.default_rng(0)
    names = ["blk.0.attn_q.weight", "blk.0.ffn_down.weight", "blk.1.attn_output.weight"]
    return ImportanceMatrix(
        sums={n: rng.random(32 * (i + 1)).astype(np.float32) * 50 for i, n in enumerate(names)},
        counts={n: np.array([300 + i]) for i, n in enumerate(names)},
        datasets=["world/stage2.json"], chunk_count=3, chunk_size=128,
    )


def test_gguf_imatrix_round_trips_and_has_llama_cpp_layout(tmp_path):
    imx = _example()
    path = save_imatrix(imx, tmp_path / "imatrix.gguf")
    back = load_imatrix(path)
    assert back.names == imx.names
    for name in imx.names:  # float32 in, float32 out: exact
        assert np.array_equal(back.sums[name], imx.sums[name])
        assert np.array_equal(back.counts[name], imx.counts[name])
        assert np.array_equal(back.values(name), imx.sums[name].reshape(-1) / imx.counts[name][0])
    assert (back.datasets, back.chunk_count, back.chunk_size) == (["world/stage2.json"], 3, 128)

    # What llama.cpp's common_imatrix_load looks for (read with gguf-py, not our reader).
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields == {"general.type": "imatrix", "imatrix.datasets": ["world/stage2.json"],
                      "imatrix.chunk_count": 3, "imatrix.chunk_size": 128}
    shapes = {t.name: [int(x) for x in t.shape] for t in reader.tensors}  # ggml order: ne[0] first
    assert shapes["blk.0.ffn_down.weight.in_sum2"] == [64, 1]
    assert shapes["blk.0.ffn_down.weight.counts"] == [1, 1]
    assert all(t.tensor_type == GGMLQuantizationType.F32 for t in reader.tensors)


def test_legacy_dat_round_trips_and_reads_llama_cpp_bytes(tmp_path):
    imx = _example()
    back = load_imatrix(save_imatrix(imx, tmp_path / "imatrix.dat"))
    for name in imx.names:  # stored as mean * ncall, read back as stored / ncall
        np.testing.assert_allclose(back.values(name), imx.values(name), rtol=1e-6)
    assert (back.chunk_count, back.datasets) == (3, ["world/stage2.json"])

    # A file laid out by hand as llama.cpp's save_imatrix_legacy writes it.
    values = np.array([2.0, 4.0, 6.0, 8.0], np.float32)
    name, dataset = b"blk.3.ffn_up.weight", b"calib.txt"
    raw = (struct.pack("<i", 1) + struct.pack("<i", len(name)) + name + struct.pack("<ii", 2, 4)
           + values.tobytes() + struct.pack("<i", 7) + struct.pack("<i", len(dataset)) + dataset)
    (tmp_path / "hand.dat").write_bytes(raw)
    hand = load_imatrix(tmp_path / "hand.dat")
    assert hand.names == ["blk.3.ffn_up.weight"]
    assert np.array_equal(hand.values("blk.3.ffn_up.weight"), values / 2)  # llama-quantize: / ncall
    assert (hand.chunk_count, hand.datasets) == (7, ["calib.txt"])

    (tmp_path / "cut.dat").write_bytes(raw[:30])
    with pytest.raises(DataError, match="cut short"):
        load_imatrix(tmp_path / "cut.dat")


# --------------------------------------------------------------------------------------------------
# the statistic
# --------------------------------------------------------------------------------------------------


def test_imatrix_covers_exactly_the_weights_llama_cpp_quantizes(imatrix, f16_file):
    info = read_gguf_info(f16_file)
    quantized = {n for n, t in info.tensors.items() if quantized_by_llamacpp(n, t.shape)}
    # blk.* (llama-imatrix's default) plus output.weight (asked for); token_embd is a lookup, not a matmul
    assert set(imatrix.names) == quantized - {"token_embd.weight"}
    for name in imatrix.names:
        assert imatrix.sums[name].shape == (1, info.tensors[name].shape[-1])
    assert imatrix.chunk_count == 8 and imatrix.datasets[0].endswith("stage2.json")


def test_values_equal_a_direct_computation(imatrix, tiny_model_dir, world):
    """Layer 1's attention input and the LM head's input, recomputed from the hidden states."""
    import torch

    from llava_edge.runtimes.torch_runtime import TorchRuntime

    rt = TorchRuntime.open(tiny_model_dir)
    prompts, _ = calibration_prompts(rt, world / "stage2.json", 8)
    assert all(p.prompt.image_embeds for p in prompts)  # every conversation carries its image
    lm = rt.model.model.language_model
    attn_in = torch.zeros(lm.config.hidden_size, dtype=torch.float64)
    head_in, attn_in_text = torch.zeros_like(attn_in), torch.zeros_like(attn_in)
    tokens = text_tokens = 0
    with torch.inference_mode():
        for p in prompts:
            out = lm(inputs_embeds=rt._embeds(p.prompt), output_hidden_states=True)
            x = lm.layers[1].input_layernorm(out.hidden_states[1])[0].double()
            attn_in += x.square().sum(0)
            head_in += out.last_hidden_state[0].double().square().sum(0)
            tokens += x.shape[0]
            text = torch.from_numpy(p.prompt.input_ids != rt.image_token_id)
            attn_in_text += x[text].square().sum(0)
            text_tokens += int(text.sum())
    for name in ("blk.1.attn_q.weight", "blk.1.attn_k.weight", "blk.1.attn_v.weight"):
        assert imatrix.counts[name][0] == tokens
        # float32 storage of float64 sums: 1e-6 relative
        np.testing.assert_allclose(imatrix.sums[name][0], attn_in.numpy(), rtol=1e-5)
    np.testing.assert_allclose(imatrix.sums["output.weight"][0], head_in.numpy(), rtol=1e-5)
    # every position counts, the image rows included
    assert tokens == sum(len(p.prompt.input_ids) for p in prompts)

    # image_weight=0: the text rows only (computed in the image's context)
    text_only = compute_imatrix(tiny_model_dir, world / "stage2.json", n_samples=8, image_weight=0.0)
    assert text_only.counts["blk.1.attn_q.weight"][0] == text_tokens < tokens
    np.testing.assert_allclose(text_only.sums["blk.1.attn_q.weight"][0], attn_in_text.numpy(), rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# weighted quantization in llama.cpp
# --------------------------------------------------------------------------------------------------


def test_llama_cpp_unweighted_q4_0_is_the_reference_quantizer(f16_file, tmp_path):
    quantize_gguf(f16_file, tmp_path / "q.gguf", "Q4_0", n_threads=1)
    src, got = _tensors(f16_file), _tensors(tmp_path / "q.gguf")
    checked = 0
    for name, t in got.items():
        if t.tensor_type == GGMLQuantizationType.Q4_0:
            ours = quantize(np.array(src[name].data).astype(np.float32), GGMLQuantizationType.Q4_0)
            assert np.array_equal(ours, np.array(t.data)), name
            checked += 1
    assert checked >= 14


def test_non_uniform_importance_lowers_the_weighted_error(f16_file, tmp_path):
    """1 channel in 8 is 1000x as important: llama.cpp must trade error on the others for it."""
    info = read_gguf_info(f16_file)
    rng = np.random.default_rng(0)
    names = [n for n in info.tensors if n.startswith("blk.")
             and quantized_by_llamacpp(n, info.tensors[n].shape)]
    importance = {n: np.where(rng.random(info.tensors[n].shape[-1]) < 1 / 8, 1000.0, 1.0).astype(np.float32)
                  for n in names}
    imx = ImportanceMatrix(dict(importance), {n: np.ones(1) for n in names})
    src = _tensors(f16_file)
    for quant in ("Q4_0", "Q4_K_M"):  # Q4_K_M on 64-wide rows: llama.cpp's Q5_0/Q8_0 fallback
        plain, weighted = tmp_path / f"plain-{quant}.gguf", tmp_path / f"weighted-{quant}.gguf"
        quantize_gguf(f16_file, plain, quant, n_threads=1)
        facts = quantize_gguf(f16_file, weighted, quant, n_threads=1, imatrix=imx)
        assert facts["imatrix"]["weighted_tensors"] == len(names)
        p, w = _tensors(plain), _tensors(weighted)
        err_plain = err_weighted = 0.0
        for n in names:
            x = _weights(src[n])
            err_plain += float((importance[n] * (x - _weights(p[n])) ** 2).sum())
            err_weighted += float((importance[n] * (x - _weights(w[n])) ** 2).sum())
        # measured: 0.50 (Q4_0) and 0.49 (Q4_K_M); an imatrix that did not reach llama.cpp gives 1.0
        assert err_weighted < 0.8 * err_plain, (quant, err_weighted / err_plain)


def test_imatrix_quantized_file_loads_and_generates(tiny_model_dir, imatrix, tmp_path):
    from llava_edge.model.templates import encode_conversation
    from llava_edge.runtimes import GenerationConfig, Prompt
    from llava_edge.runtimes.llamacpp_runtime import LlamaCppRuntime
    from llava_edge.runtimes.torch_runtime import TorchRuntime

    path = save_imatrix(imatrix, tmp_path / "imatrix.gguf")
    bundle = export_gguf(tiny_model_dir, tmp_path / "b", quant=["Q4_0", "Q4_K_M"], mmproj_quant="F16",
                         imatrix=path)
    comps = json.loads((bundle / "manifest.json").read_text())["components"]
    facts = comps["gguf/model"]["details"]["imatrix"]
    assert facts["file"] == "imatrix.gguf" and facts["weighted_tensors"] == len(imatrix)
    assert facts["unweighted_tensors"] == ["token_embd.weight"]
    assert "imatrix" not in comps["gguf/mmproj"]["details"]

    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    torch_rt = TorchRuntime.open(tiny_model_dir)
    embeds = torch_rt.encode_image(image)
    for quant in ("Q4_0", "Q4_K_M"):
        with LlamaCppRuntime.open(bundle, quant=quant, n_threads=1) as rt:
            enc = encode_conversation(rt.tokenizer, rt.template, [("user", "<image>\nWhat is it?")],
                                      rt.n_image_tokens, add_generation_prompt=True)
            prompt = Prompt(enc.input_ids, [embeds])
            logits = rt.logits(prompt)
            # A 4-bit copy of the same model: its logits follow torch's (a file whose weights were
            # mangled by the imatrix path would not). Measured: correlation 0.993 (Q4_0), all positions.
            reference = torch_rt.logits(prompt)
            corr = np.corrcoef(logits.ravel(), reference.ravel())[0, 1]
            assert corr > 0.9, (quant, corr)
            tokens = list(rt.generate(prompt, GenerationConfig(max_new_tokens=8)))
            # Greedy generation starts from the same last-position logits the teacher-forced pass gave.
            assert tokens and tokens[0] == int(np.argmax(logits[-1])), (quant, tokens)


def test_mismatched_imatrix_is_refused_before_llama_cpp(f16_file, tiny_model_dir, tmp_path):
    wrong = ImportanceMatrix({"blk.0.attn_q.weight": np.ones(96)}, {"blk.0.attn_q.weight": [1]})
    with pytest.raises(ModelError, match=r"96 values for tensor 'blk.0.attn_q.weight'.*another model"):
        quantize_gguf(f16_file, tmp_path / "x.gguf", "Q4_0", imatrix=wrong)
    foreign = ImportanceMatrix({"v.blk.0.attn_q.weight": np.ones(32)}, {"v.blk.0.attn_q.weight": [1]})
    with pytest.raises(ModelError, match="no entry for any tensor"):
        quantize_gguf(f16_file, tmp_path / "x.gguf", "Q4_0", imatrix=foreign)
    assert not (tmp_path / "x.gguf").exists()
    with pytest.raises(ModelError, match="only written as F16"):
        export_gguf(tiny_model_dir, tmp_path / "b", quant="F16", imatrix=wrong)
    (tmp_path / "model.gguf").write_bytes(f16_file.read_bytes())
    with pytest.raises(DataError, match="general.type is None"):
        export_gguf(tiny_model_dir, tmp_path / "b", quant="Q4_0", imatrix=tmp_path / "model.gguf")
    assert not (tmp_path / "b").exists()
