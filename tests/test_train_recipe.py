"""Recipes: the shipped files parse, say LLaVA-1.5's numbers, open with their command; batch math."""

from __future__ import annotations

from pathlib import Path

import pytest

from llava_edge.errors import UserError
from llava_edge.train.recipe import Recipe, accumulation_steps, load_recipe, read_recipe_file

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
RECIPES = sorted(CONFIGS.glob("*.toml"))


def test_every_recipe_file_parses_and_opens_with_its_command():
    assert {p.name for p in RECIPES} >= {"llava-1.5-stage1.toml", "llava-1.5-stage2.toml",
                                         "llava-1.5-stage2-lora.toml", "demo-stage1.toml", "demo-stage2.toml"}
    for path in RECIPES:
        data = read_recipe_file(path)
        recipe = load_recipe(path, data["stage"])
        first = path.read_text().splitlines()[0]
        assert first.startswith("# llava-edge train --stage ") and f"--recipe configs/{path.name}" in first, path
        assert f"--stage {recipe.stage}" in first, path


@pytest.mark.parametrize("name, expected", [
    ("llava-1.5-stage1.toml", dict(stage=1, tune="projector", template="plain", learning_rate=1e-3,
                                   global_batch_size=256, epochs=1, group_by_modality_length=False)),
    ("llava-1.5-stage2.toml", dict(stage=2, tune="full", template="vicuna_v1", learning_rate=2e-5,
                                   global_batch_size=128, epochs=1, group_by_modality_length=True)),
    ("llava-1.5-stage2-lora.toml", dict(stage=2, tune="lora", learning_rate=2e-4, projector_lr=2e-5,
                                        lora_r=128, lora_alpha=256, global_batch_size=128)),
])
def test_llava_recipes_say_the_design_table(name, expected):
    recipe = load_recipe(CONFIGS / name, expected["stage"])
    common = dict(lr_schedule="cosine", warmup_ratio=0.03, weight_decay=0.0, max_length=2048,
                  gradient_checkpointing=True, precision="bf16", tf32=True)
    for key, value in {**common, **expected}.items():
        assert getattr(recipe, key) == value, (name, key)
    # The code's defaults are the same recipe: a file only has to say what differs.
    default = load_recipe(None, expected["stage"], tune=recipe.tune)
    for key in ("learning_rate", "projector_lr", "global_batch_size", "per_device_batch_size", "template",
                "group_by_modality_length", "max_length", "warmup_ratio", "lora_r", "lora_alpha"):
        assert getattr(default, key) == getattr(recipe, key), (name, key)


@pytest.mark.parametrize("world, accumulation", [(1, 8), (2, 4), (4, 2), (8, 1)])
def test_global_batch_is_kept_by_accumulation(world, accumulation):
    recipe = Recipe(stage=1, global_batch_size=256, per_device_batch_size=32)
    assert accumulation_steps(recipe, world) == accumulation
    assert recipe.per_device_batch_size * world * accumulation == 256


def test_a_global_batch_that_does_not_split_is_refused_with_the_numbers():
    recipe = Recipe(stage=2, global_batch_size=128, per_device_batch_size=16)
    with pytest.raises(UserError, match="128.*3 process"):
        accumulation_steps(recipe, 3)
    with pytest.raises(UserError, match="multiple of per_device_batch_size"):
        Recipe(stage=1, global_batch_size=100, per_device_batch_size=32)


def test_bad_recipes_say_what_is_wrong(tmp_path):
    with pytest.raises(UserError, match="stage 1 tunes one of projector"):
        Recipe(stage=1, tune="full")
    with pytest.raises(UserError, match="unknown recipe field.*learning_rat\\b"):
        load_recipe(None, 1, learning_rat=1e-3)
    bad = tmp_path / "r.toml"
    bad.write_text("[recipe]\nstage = 2\nlr = 1\n")
    with pytest.raises(UserError, match="unknown recipe field.*lr"):
        load_recipe(bad, 2)
    with pytest.raises(UserError, match="is for stage 1, but stage 2"):
        load_recipe(CONFIGS / "llava-1.5-stage1.toml", 2)
    bad.write_text("stage = [")
    with pytest.raises(UserError, match="cannot parse"):
        load_recipe(bad, 1)


def test_yaml_recipes_and_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("stage: 2\ntune: lora\nlearning_rate: 0.001\n")
    recipe = load_recipe(path, 2, max_steps=5, seed=None)  # None: an option not given
    assert (recipe.tune, recipe.learning_rate, recipe.max_steps, recipe.seed) == ("lora", 1e-3, 5, 42)
    assert recipe.projector_lr == 2e-5  # LLaVA's LoRA default for the projector
