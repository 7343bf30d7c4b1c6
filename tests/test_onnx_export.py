"""ONNX export of the tiny preset: every part within 1e-4 of transformers (issue 5's parity bar).

The bundle is exported once per session (shared on disk with the other test_onnx_* modules). The
torch references are transformers' own LlavaForConditionalGeneration calls, not our export wrappers.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from llava_edge.errors import ModelError, UserError
from llava_edge.export.bundle import read_manifest, verify_bundle
from llava_edge.export.onnx import SPECS, ExportValidationError, export_onnx
from llava_edge.export.onnx.specs import ModelDims, past_name, present_name
from llava_edge.export.onnx.validate import cpu_session
from llava_edge.model.cache import cache_kwargs
from llava_edge.model.image import preprocess
from llava_edge.model.loading import read_model_info

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

# fp32 on CPU: the same arithmetic in another order; DESIGN.md measured <= 1.2e-5. The bar.
ATOL = 1e-4


@pytest.fixture(scope="session")
def fp32_bundle(onnx_bundle):
    return onnx_bundle()


@pytest.fixture(scope="session")
def sessions(fp32_bundle):
    return {part: cpu_session(fp32_bundle / "onnx" / f"{part}.onnx") for part in SPECS}


@pytest.fixture(scope="session")
def dims(tiny_model):
    return ModelDims.from_config(tiny_model.config)


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def test_manifest_records_every_part_with_its_checks(fp32_bundle):
    manifest = verify_bundle(fp32_bundle)  # every sha256 matches
    assert sorted(manifest.components) == ["onnx/decoder", "onnx/embeddings", "onnx/projector", "onnx/vision"]
    for key, comp in manifest.components.items():
        assert comp.precision == "fp32" and comp.format == "onnx"
        assert comp.extra_files == [comp.file + ".data"], "weights are kept as external data"
        assert comp.details["torch_max_abs"] <= ATOL, key
        assert comp.details["opset"] == 20
    assert manifest.drift["onnx"]["decoder"]["torch_max_abs"] <= ATOL
    assert (fp32_bundle / "tokenizer.json").is_file()


def test_vision_features_and_projector_match_transformers(tiny_model, tiny_model_dir, sessions, test_image,
                                                         other_image):
    config = read_model_info(tiny_model_dir).preprocess
    pixels = np.stack([preprocess(test_image, config), preprocess(other_image, config)])
    with torch.inference_mode():
        out = tiny_model.model.vision_tower(torch.from_numpy(pixels), output_hidden_states=True)
        features = out.hidden_states[-2][:, 1:]  # layer -2, CLS dropped: LLaVA-1.5's selection
        embeds = tiny_model.model.get_image_features(pixel_values=torch.from_numpy(pixels)).pooler_output
    onnx_features = sessions["vision"].run(None, {"pixel_values": pixels})[0]
    assert onnx_features.shape == (2, 16, 32)
    assert max_diff(onnx_features, features) <= ATOL
    onnx_embeds = sessions["projector"].run(None, {"image_features": onnx_features})[0]
    assert max_diff(onnx_embeds, torch.stack(list(embeds))) <= ATOL


def test_embeddings_are_an_exact_lookup(tiny_model, sessions):
    ids = np.array([[1, 4, 4, 7, 300], [2, 3, 511, 0, 9]], dtype=np.int64)
    got = sessions["embeddings"].run(None, {"input_ids": ids})[0]
    with torch.inference_mode():
        want = tiny_model.get_input_embeddings()(torch.from_numpy(ids))
    assert max_diff(got, want) == 0.0


def _onnx_decoder(session, dims, embeds, mask, positions, past):
    feeds = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions}
    feeds.update({past_name(i, k): past[2 * i + j] for i in range(dims.n_layers) for j, k in enumerate(("key", "value"))})
    names = ["logits"] + [present_name(i, k) for i in range(dims.n_layers) for k in ("key", "value")]
    out = session.run(names, feeds)
    return out[0], out[1:]


def _run_both(tiny_model, sessions, dims, embeds, mask, steps: int, rng):
    """Prefill ``embeds`` under ``mask``, then ``steps`` cached decode steps with random embeddings,
    in transformers (DynamicCache) and in the ONNX decoder (past fed back). Returns max diffs of the
    logits per call, on positions whose mask is 1."""
    batch = embeds.shape[0]
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    empty = np.zeros((batch, dims.n_kv_heads, 0, dims.head_dim), np.float32)
    past = [empty] * (2 * dims.n_layers)
    cache = DynamicCache(config=tiny_model.config.text_config)
    diffs = []
    seq_positions, step_embeds, step_mask = positions, embeds, mask
    full_mask = mask
    for step in range(steps + 1):
        logits, past = _onnx_decoder(sessions["decoder"], dims, step_embeds, full_mask, seq_positions, past)
        with torch.inference_mode():
            want = tiny_model(inputs_embeds=torch.from_numpy(step_embeds),
                              attention_mask=torch.from_numpy(full_mask),
                              position_ids=torch.from_numpy(seq_positions),
                              use_cache=True, **cache_kwargs(tiny_model, cache)).logits.numpy()
        valid = step_mask.astype(bool)
        diffs.append(max_diff(logits[valid], want[valid]))
        # next step: one new token per row, right after each row's last position
        step_embeds = (rng.standard_normal((batch, 1, dims.d_model)) * 0.5).astype(np.float32)
        seq_positions = full_mask.sum(axis=1, keepdims=True).astype(np.int64)
        step_mask = np.ones((batch, 1), np.int64)
        full_mask = np.concatenate([full_mask, step_mask], axis=1)
    return diffs


def test_decoder_prefill_and_16_cached_steps_match_transformers(tiny_model, sessions, dims):
    rng = np.random.default_rng(0)
    embeds = (rng.standard_normal((1, 23, dims.d_model)) * 0.5).astype(np.float32)
    diffs = _run_both(tiny_model, sessions, dims, embeds, np.ones((1, 23), np.int64), 16, rng)
    assert len(diffs) == 17
    assert max(diffs) <= ATOL, diffs


def test_decoder_batch_of_two_with_left_padding_matches_transformers(tiny_model, sessions, dims):
    rng = np.random.default_rng(1)
    embeds = (rng.standard_normal((2, 9, dims.d_model)) * 0.5).astype(np.float32)
    mask = np.ones((2, 9), np.int64)
    mask[1, :3] = 0  # row 1 holds 6 tokens, left-padded
    diffs = _run_both(tiny_model, sessions, dims, embeds, mask, 16, rng)
    assert max(diffs) <= ATOL, diffs
    # The padded row gives the logits the same sequence gets alone, unpadded.
    alone = np.ones((1, 6), np.int64)
    empty = [np.zeros((1, dims.n_kv_heads, 0, dims.head_dim), np.float32)] * (2 * dims.n_layers)
    padded, _ = _onnx_decoder(sessions["decoder"], dims, embeds, mask, np.clip(np.cumsum(mask, 1) - 1, 0, None),
                              [np.zeros((2, dims.n_kv_heads, 0, dims.head_dim), np.float32)] * (2 * dims.n_layers))
    single, _ = _onnx_decoder(sessions["decoder"], dims, embeds[1:, 3:], alone, np.arange(6)[None], empty)
    assert max_diff(padded[1, 3:], single[0]) <= ATOL


def test_failed_validation_names_the_part_and_the_difference(tiny_model_dir, tmp_path, monkeypatch):
    import llava_edge.export.onnx.export as export_module

    strict = dataclasses.replace(SPECS["projector"], atol=-1.0)  # nothing can pass
    monkeypatch.setitem(export_module.SPECS, "projector", strict)
    out = tmp_path / "bundle"
    with pytest.raises(ExportValidationError, match=r"projector: .* differs from torch by .* \(max abs"):
        export_onnx(tiny_model_dir, out, parts=("projector",), progress=False)
    assert not out.exists(), "a failed export leaves no half bundle"


def test_the_tolerance_grows_with_the_output_scale():
    """atol + rtol x the output's largest magnitude: the demo LM's logits (scale 18.3) differ by
    1.43e-4 between torch and onnxruntime, within 1e-4 + 2e-5 x 18.3; 10x that is not."""
    from llava_edge.export.onnx.specs import Dims
    from llava_edge.export.onnx.validate import Comparison

    logits = np.linspace(-18.3, 5.0, 64, dtype=np.float32)[None]
    for diff, ok in ((1.43e-4, True), (1.43e-3, False)):
        c = Comparison("decoder", atol=1e-4, rtol=2e-5)
        c.update("logits", Dims(1, 1, 9), logits, logits + np.float32(diff))
        assert c.passed is ok and c.max_abs == pytest.approx(diff, rel=1e-3)
        assert c.closest[3] == pytest.approx(1e-4 + 2e-5 * 18.3) and c.closest[4] == pytest.approx(18.3)
    assert Comparison("vision", atol=1e-4).passed  # nothing checked yet


def test_bad_export_arguments_are_user_errors(tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match="unknown precision 'int3'"):
        export_onnx(tiny_model_dir, tmp_path / "a", "int3", progress=False)
    with pytest.raises(UserError, match="unknown part 'tower'"):
        export_onnx(tiny_model_dir, tmp_path / "b", "int4", part_precision={"tower": "fp32"}, progress=False)
    with pytest.raises(ModelError, match="no such model folder"):
        export_onnx(tmp_path / "missing", tmp_path / "c", progress=False)


def test_manifest_is_plain_json_a_runtime_can_read(fp32_bundle):
    data = json.loads((fp32_bundle / "manifest.json").read_text())
    assert data["n_image_tokens"] == 16 and data["image_token_id"] == 4
    assert read_manifest(fp32_bundle).components["onnx/decoder"].details["extra_bytes"]
