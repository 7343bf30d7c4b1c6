"""Presets, checkpoint folders, loading: local only, complete, reloadable by plain transformers."""

import json
import shutil

import pytest

from llava_edge.errors import ModelError
from llava_edge.model.inspect import inspect_model
from llava_edge.model.loading import load_model, read_model_info
from llava_edge.model.presets import PRESETS, get_preset
from llava_edge.model.tokenizer import Tokenizer


def test_presets_have_quantizable_sizes():
    for name in ("tiny", "demo"):
        p = get_preset(name)
        for width in (p.vision.hidden_size, p.vision.intermediate_size, p.text.hidden_size,
                      p.text.intermediate_size):
            assert width % 32 == 0, (name, width)
        assert p.text.intermediate_size != p.text.hidden_size  # llama.cpp ffn naming defect
    assert get_preset("llava-1.5-7b").n_image_tokens == 576
    with pytest.raises(ModelError, match="unknown preset 'huge'.*tiny"):
        get_preset("huge")
    assert set(PRESETS) >= {"tiny", "demo", "llava-1.5-7b", "llava-1.5-13b"}


def test_checkpoint_reloads_in_plain_transformers_without_new_weights(tiny_model_dir):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model, info = LlavaForConditionalGeneration.from_pretrained(
        tiny_model_dir, local_files_only=True, output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    processor = AutoProcessor.from_pretrained(tiny_model_dir, local_files_only=True)
    assert type(processor).__name__ == "LlavaProcessor"
    # The processor expands <image> to the same number of tokens as our templates do.
    ids = processor(text="USER: <image>\nhi ASSISTANT:", images=[__import__("PIL.Image").Image.new("RGB", (32, 32))],
                    return_tensors="pt")["input_ids"][0].tolist()
    assert ids.count(model.config.image_token_index) == read_model_info(tiny_model_dir).n_image_tokens == 16


def test_tokenizer_round_trip_and_special_ids(tiny_model_dir):
    tok = Tokenizer.from_folder(tiny_model_dir)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.image_id) == (1, 2, 3, 4)
    text = "a small red circle is above the blue square"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<image>") == [tok.image_id]
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text)


def test_missing_folder_is_a_clear_error_not_a_download(tmp_path):
    with pytest.raises(ModelError, match="no such model folder.*never downloads"):
        load_model(tmp_path / "llava-hf/llava-1.5-7b-hf")


def test_wrong_model_type_is_refused(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config["model_type"] = "llama"
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="model_type is 'llama'"):
        load_model(bad)


def test_incomplete_checkpoint_is_refused(tiny_model_dir, tmp_path):
    """Weights missing from the file would be silently re-initialised: refuse instead."""
    from safetensors.numpy import load_file, save_file

    bad = tmp_path / "partial"
    shutil.copytree(tiny_model_dir, bad)
    tensors = load_file(bad / "model.safetensors")
    dropped = [k for k in tensors if "multi_modal_projector" in k]
    save_file({k: v for k, v in tensors.items() if k not in dropped}, bad / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ModelError, match="missing from the checkpoint"):
        load_model(bad)


def test_pickled_weights_are_not_loaded(tiny_model_dir, tmp_path):
    bad = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, bad)
    (bad / "model.safetensors").rename(bad / "pytorch_model.bin")
    with pytest.raises(ModelError, match="no .safetensors weights"):
        load_model(bad)


def test_inspect_counts_every_parameter(tiny_model_dir, tiny_model):
    info = inspect_model(tiny_model_dir)
    assert info["parameters"] == sum(p.numel() for p in tiny_model.parameters())
    assert set(info["components"]) == {"vision tower", "projector", "embeddings", "decoder", "lm head"}
