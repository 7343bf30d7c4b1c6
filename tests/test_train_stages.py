"""What each stage trains, and the folder it writes: transformers loads it whole; LoRA is merged."""

from __future__ import annotations

import json

import pytest
import torch

from llava_edge.train import train
from llava_edge.train.recipe import Recipe
from llava_edge.train.stages import parameter_groups, prepare_model, trainable_summary

SHORT = dict(global_batch_size=4, per_device_batch_size=2, max_steps=2, precision="fp32",
             gradient_checkpointing=False, threads=1, progress=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from llava_edge.data.synth import synth

    return synth(tmp_path_factory.mktemp("world") / "w", n=8, seed=0, image_size=32, n_eval=2).out_dir


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


def _parts(keys) -> set[str]:
    return {("projector" if "multi_modal_projector" in k else "vision" if "vision_tower" in k else "language")
            for k in keys}


def test_stage1_trains_the_projector_only(tiny_model_dir, world, tmp_path):
    from safetensors.torch import load_file

    result = train(1, tiny_model_dir, world / "stage1.json", tmp_path / "s1", learning_rate=1e-2, **SHORT)
    assert result.trainable["trainable"] == result.trainable["trainable_projector"] > 0
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(result.out / "model.safetensors")
    assert _parts(_changed(before, after)) == {"projector"}
    sidecar = json.loads((result.out / "llava_edge.json").read_text())
    assert sidecar["template"] == "plain" and sidecar["training"]["stage"] == 1
    assert (result.run_dir / "loss.png").stat().st_size > 1000
    assert [h["step"] for h in result.history] == [1, 2]


def test_stage2_full_trains_llm_and_projector_and_output_loads_whole(tiny_model_dir, world, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

    result = train(2, tiny_model_dir, world / "stage2.json", tmp_path / "s2", learning_rate=1e-2, **SHORT)
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(result.out / "model.safetensors")
    assert _parts(_changed(before, after)) == {"projector", "language"}  # the vision tower stays frozen
    # Plain transformers, nothing of ours: no weight missing or re-initialised, tokenizer + processor load.
    model, info = LlavaForConditionalGeneration.from_pretrained(result.out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    AutoTokenizer.from_pretrained(result.out)
    processor = AutoProcessor.from_pretrained(result.out)
    assert processor.image_processor.do_pad
    assert json.loads((result.out / "llava_edge.json").read_text())["template"] == "vicuna_v1"


def test_lora_is_merged_on_save_and_the_adapter_kept_on_request(tiny_model_dir, world, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    from llava_edge.model.loading import load_model

    result = train(2, tiny_model_dir, world / "stage2.json", tmp_path / "lora", tune="lora", lora_r=8,
                   lora_alpha=16, lora_dropout=0.0, learning_rate=5e-2, projector_lr=1e-2,
                   lora_output="merged+adapter", **SHORT)
    assert result.trainable["trainable_vision"] == 0 and result.trainable["trainable_projector"] > 0
    merged = load_file(result.out / "model.safetensors")
    assert not any("lora" in k for k in merged), "the output is a plain LLaVA folder"
    assert _parts(_changed(load_file(tiny_model_dir / "model.safetensors"), merged)) == {"projector", "language"}
    adapter_dir = result.run_dir / "adapter"
    assert (adapter_dir / "adapter_config.json").is_file()
    # base + adapter == merged model (fp32 merge: rounding only)
    adapted = PeftModel.from_pretrained(load_model(tiny_model_dir), adapter_dir).eval()
    merged_model = load_model(result.out)
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    with torch.no_grad():
        a, b = adapted(input_ids=ids).logits, merged_model(input_ids=ids).logits
    assert (a - b).abs().max() < 1e-4


def test_projector_gets_its_own_learning_rate_and_no_decay_on_norms(tiny_model):
    import copy

    recipe = Recipe(stage=2, tune="lora", lora_r=4, lora_alpha=8, learning_rate=2e-4, projector_lr=2e-5,
                    weight_decay=0.1)
    model = prepare_model(copy.deepcopy(tiny_model), recipe)
    summary = trainable_summary(model)
    assert summary["trainable_vision"] == 0 and summary["trainable_projector"] > 0
    decay = {n for n, _ in model.named_parameters() if not n.endswith("bias") and "norm" not in n}
    groups = parameter_groups(model, recipe, decay)
    projector = [g for g in groups if g.get("lr") == 2e-5]
    assert projector and sum(p.numel() for g in projector for p in g["params"]) == summary["trainable_projector"]
    assert sum(p.numel() for g in groups for p in g["params"]) == summary["trainable"]
    assert {g["weight_decay"] for g in groups} == {0.0, 0.1}
