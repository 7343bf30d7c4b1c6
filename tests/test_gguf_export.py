"""GGUF export: tensors, names and metadata against the checkpoint; streaming; quant checks; bad inputs.

Reads the files back with gguf-py's reader (an independent parser) rather than our own pre-flight
parser, so the two cannot share a mistake. Runtime behaviour (llama.cpp) is in test_gguf_runtime.py.
"""

from __future__ import annotations

import json
import weakref

import numpy as np
import pytest

from llava_edge.errors import ModelError
from llava_edge.export.gguf import export_gguf
from llava_edge.export.gguf import names as N
from llava_edge.export.gguf.check import GGUFInfo, TensorInfo, read_gguf_info
from llava_edge.export.gguf.quantize import plan_quantization, quant_type
from llava_edge.export.gguf.source import Checkpoint, text_facts, vision_facts
from llava_edge.model.templates import get_template

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def bundle(tiny_model_dir, tmp_path_factory):
    return export_gguf(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "b", quant=["F32", "F16"],
                       mmproj_quant="F32")


def _tensors(path) -> dict[str, np.ndarray]:
    reader = gguf.GGUFReader(path)
    # gguf-py gives ggml's dimension order reversed already for numpy (rows last)
    return {t.name: np.array(t.data).reshape(tuple(reversed([int(x) for x in t.shape])))
            for t in reader.tensors}


def _fields(path) -> dict:
    reader = gguf.GGUFReader(path)
    out = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        out[name] = field.contents()
    return out


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp layout -> HF (the inverse used by transformers' convert_llama_weights_to_hf)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_text_model_tensors_equal_the_checkpoint(bundle, tiny_model_dir):
    ckpt = Checkpoint(tiny_model_dir)
    facts = text_facts(json.loads((tiny_model_dir / "config.json").read_text()))
    got = _tensors(bundle / "gguf" / "model-F32.gguf")
    src = "language_model.model."
    assert np.array_equal(got["token_embd.weight"], ckpt.read(src + "embed_tokens.weight"))
    assert np.array_equal(got["output.weight"], ckpt.read("language_model.lm_head.weight"))
    for i in range(facts.n_layers):
        q = ckpt.read(f"{src}layers.{i}.self_attn.q_proj.weight")
        k = ckpt.read(f"{src}layers.{i}.self_attn.k_proj.weight")
        # Permuted (else llama.cpp's rotary embedding pairs the wrong dimensions) and invertible.
        assert not np.array_equal(got[f"blk.{i}.attn_q.weight"], q)
        assert np.array_equal(_unpermute(got[f"blk.{i}.attn_q.weight"], facts.n_heads), q)
        assert np.array_equal(_unpermute(got[f"blk.{i}.attn_k.weight"], facts.n_kv_heads), k)
        down = ckpt.read(f"{src}layers.{i}.mlp.down_proj.weight")
        assert np.array_equal(got[f"blk.{i}.ffn_down.weight"], down)
    n_expected = 3 + 9 * facts.n_layers
    assert len(got) == n_expected


def test_mmproj_tensors_follow_the_format_choices(bundle, tiny_model_dir):
    ckpt = Checkpoint(tiny_model_dir)
    got = _tensors(bundle / "gguf" / "mmproj-F32.gguf")
    v = "vision_tower."
    # fc1 is written as ffn_down and fc2 as ffn_up: llama.cpp's legacy naming (DESIGN.md defect 3).
    assert np.array_equal(got["v.blk.0.ffn_down.weight"], ckpt.read(v + "encoder.layers.0.mlp.fc1.weight"))
    assert np.array_equal(got["v.blk.0.ffn_up.weight"], ckpt.read(v + "encoder.layers.0.mlp.fc2.weight"))
    q = ckpt.read(v + "encoder.layers.1.self_attn.q_proj.weight")
    assert np.array_equal(got["v.blk.1.attn_q.weight"], q)  # no permutation in the vision tower
    assert np.array_equal(got["mm.2.weight"], ckpt.read("multi_modal_projector.linear_2.weight"))
    assert np.array_equal(got["v.class_embd"], ckpt.read(v + "embeddings.class_embedding"))
    # Feature layer -2 of 3: layers 0 and 1 are run, layer 2 and the post layer norm are not stored.
    assert not any(name.startswith(("v.blk.2.", "v.post_ln")) for name in got)
    fields = _fields(bundle / "gguf" / "mmproj-F32.gguf")
    assert fields["clip.vision.feature_layer"] == [2]  # written explicitly (DESIGN.md defect 2)
    assert fields["clip.vision.block_count"] == 2
    assert fields["clip.projector_type"] == "mlp"
    assert fields["clip.vision.projection_dim"] == 64
    assert fields["clip.use_gelu"] is False  # CLIP's quick_gelu
    np.testing.assert_allclose(fields["clip.vision.image_std"], [0.26862954, 0.26130258, 0.27577711],
                               rtol=1e-6)


def test_text_model_metadata(bundle, tiny_model_dir):
    fields = _fields(bundle / "gguf" / "model-F32.gguf")
    assert fields["general.architecture"] == "llama"
    assert fields["llama.embedding_length"] == 64
    assert fields["llama.attention.head_count"] == 4
    assert fields["llama.attention.head_count_kv"] == 2
    assert fields["llama.rope.dimension_count"] == 16  # the head dim
    assert fields["llama.context_length"] == 512
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.chat_template"] == get_template("vicuna_v1").jinja
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == 512 and tokens[:5] == ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    assert types[:6] == [N.TokenType.CONTROL] * 5 + [N.TokenType.NORMAL]
    assert all(" " in m for m in fields["tokenizer.ggml.merges"][:20])
    assert fields["tokenizer.ggml.bos_token_id"] == 1 and fields["tokenizer.ggml.eos_token_id"] == 2


def test_f16_file_keeps_1d_tensors_in_f32(bundle):
    info = read_gguf_info(bundle / "gguf" / "model-F16.gguf")
    for t in info.tensors.values():
        want = gguf.GGMLQuantizationType.F32 if len(t.shape) == 1 else gguf.GGMLQuantizationType.F16
        assert t.type == want, t.name
    f32 = (bundle / "gguf" / "model-F32.gguf").stat().st_size
    assert (bundle / "gguf" / "model-F16.gguf").stat().st_size < 0.55 * f32


def test_manifest_and_modelfile(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    comps = manifest["components"]
    assert comps["gguf/model"]["precision"] == "F32"
    assert comps["gguf/model-F16"]["file"] == "gguf/model-F16.gguf"
    assert comps["gguf/mmproj"]["details"]["feature_layer"] == 2
    modelfile = (bundle / "gguf" / "Modelfile").read_text().splitlines()
    froms = [line for line in modelfile if line.startswith("FROM ")]
    assert froms == ["FROM ./model-F32.gguf", "FROM ./mmproj-F32.gguf"]  # model first, projector second
    text = "\n".join(modelfile)
    assert 'TEMPLATE """' in text and "USER: {{ .Content }}" in text and "ASSISTANT:" in text
    assert 'PARAMETER stop "</s>"' in text and 'PARAMETER stop "USER:"' in text
    assert "SYSTEM \"\"\"A chat between" in text


def test_conversion_holds_one_source_tensor_at_a_time(tiny_model_dir, tmp_path, monkeypatch):
    """The streaming property: when a tensor is read, no earlier one is still alive."""
    refs, peak = [], [0]
    real_read = Checkpoint.read

    def read(self, name):
        peak[0] = max(peak[0], sum(r() is not None for r in refs))
        array = real_read(self, name)
        refs.append(weakref.ref(array))
        return array

    monkeypatch.setattr(Checkpoint, "read", read)
    export_gguf(tiny_model_dir, tmp_path / "b", quant="F16", mmproj_quant="F16")
    assert peak[0] == 0


def test_unknown_quant_is_refused_before_anything_is_written(tiny_model_dir, tmp_path):
    valid = "F32, F16, Q8_0, Q4_0, Q5_K_M, Q4_K_M"
    with pytest.raises(ModelError, match=rf"unknown GGUF quant type 'Q3_K'.*{valid}"):
        export_gguf(tiny_model_dir, tmp_path / "b", quant=["F16", "Q3_K"])
    with pytest.raises(ModelError, match="unknown GGUF quant type 'q2'"):
        export_gguf(tiny_model_dir, tmp_path / "b", mmproj_quant="q2")
    assert not (tmp_path / "b").exists()
    assert quant_type("q4_k_m").name == "Q4_K_M"  # case-insensitive


def _info(*shapes) -> GGUFInfo:
    info = GGUFInfo(path="x.gguf", version=3)
    for i, shape in enumerate(shapes):
        info.tensors[f"blk.{i}.attn_q.weight"] = TensorInfo(f"blk.{i}.attn_q.weight", shape, 1, 0, 0)
    info.tensors["blk.0.attn_norm.weight"] = TensorInfo("blk.0.attn_norm.weight", (48,), 0, 0, 0)
    info.tensors["v.position_embd.weight"] = TensorInfo("v.position_embd.weight", (17, 40), 1, 0, 0)
    return info


def test_quantizer_preflight_rows_and_k_quant_fallback():
    # 48-value rows fit no 32-block type: refused before llama.cpp sees them (norms and position
    # embeddings are never quantized, so their odd sizes do not matter).
    with pytest.raises(ModelError, match=r"blk.1.attn_q.weight.*rows of 48.*Q8_0"):
        plan_quantization(_info((64, 64), (64, 48)), quant_type("Q8_0"))
    # K-quants on rows of 64: llama.cpp's per-tensor fallback, reported ...
    assert plan_quantization(_info((64, 64), (256, 256)), quant_type("Q4_K_M")) == ["blk.0.attn_q.weight"]
    # ... or refused on request.
    with pytest.raises(ModelError, match="not a multiple of 256"):
        plan_quantization(_info((64, 64)), quant_type("Q5_K_M"), allow_fallback=False)


def test_configs_the_files_cannot_express_are_refused(tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    pre = {"mean": [0.5] * 3, "std": [0.5] * 3}
    with pytest.raises(ModelError, match="always drops the CLS"):
        vision_facts({**config, "vision_feature_select_strategy": "full"}, pre)
    with pytest.raises(ModelError, match="single feature layer"):
        vision_facts({**config, "vision_feature_layer": [-2, -1]}, pre)
    with pytest.raises(ModelError, match="without biases"):
        vision_facts({**config, "multimodal_projector_bias": False}, pre)
    text = dict(config["text_config"], rope_parameters={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ModelError, match="rope type 'yarn'"):
        text_facts({**config, "text_config": text})
    assert vision_facts(config, pre).feature_layer == 2  # -2 of 3 layers: hidden_states[2]


def test_foreign_and_truncated_files_are_refused(bundle, tmp_path):
    png = tmp_path / "x.gguf"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(ModelError, match="not a GGUF file"):
        read_gguf_info(png)
    data = (bundle / "gguf" / "model-F16.gguf").read_bytes()
    for cut in (20, len(data) // 50, len(data) - 100):  # in the header, in the tensor table, in the data
        short = tmp_path / f"cut{cut}.gguf"
        short.write_bytes(data[:cut])
        with pytest.raises(ModelError, match="truncated"):
            read_gguf_info(short)


def test_extend_needs_a_bundle_of_the_same_checkpoint(bundle, tiny_model_dir, tmp_path):
    with pytest.raises(ModelError, match="no bundle there"):
        export_gguf(tiny_model_dir, tmp_path / "nothing", extend=True)
