"""What each stage trains: freezing, LoRA, and the optimizer's parameter groups.

| tune      | trained                               | frozen               |
|-----------|---------------------------------------|----------------------|
| projector | multi_modal_projector (stage 1)       | vision tower, LLM    |
| full      | projector + LLM (stage 2)             | vision tower         |
| lora      | LoRA on every LLM linear + projector  | vision tower, LLM    |

The names are transformers' ``LlavaForConditionalGeneration`` module names (one table, here).
"""

from __future__ import annotations

PROJECTOR = "multi_modal_projector"
VISION = "vision_tower"
LANGUAGE = ("language_model", "lm_head")
# LLaVA's find_all_linear_names: every Linear of the LLM (not the projector, vision tower, lm_head).
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def _is(name: str, part: str) -> bool:
    return f"{part}." in name or name.startswith(part)


def prepare_model(model, recipe):
    """Freeze and wrap ``model`` for the recipe's ``tune``; returns the model to train."""
    for param in model.parameters():
        param.requires_grad_(False)
    if recipe.tune == "projector":
        for param in getattr(model.model, PROJECTOR).parameters():
            param.requires_grad_(True)
    elif recipe.tune == "full":
        for name, param in model.named_parameters():
            param.requires_grad_(not _is(name, VISION))
    elif recipe.tune == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
                            target_modules=LORA_TARGETS, modules_to_save=[PROJECTOR], bias="none")
        model = get_peft_model(model, config)
    else:  # Recipe validates tune; this is a programming error
        raise ValueError(f"unknown tune {recipe.tune!r}")
    return model


def trainable_summary(model) -> dict[str, int]:
    """Parameters by part and whether they train (for the log and the tests)."""
    out = {"trainable": 0, "frozen": 0, "trainable_projector": 0, "trainable_vision": 0,
           "trainable_language": 0}
    for name, param in model.named_parameters():
        n = getattr(param, "ds_numel", param.numel())  # ZeRO-3 leaves each process a 0-size shard
        if not param.requires_grad:
            out["frozen"] += n
            continue
        out["trainable"] += n
        if _is(name, PROJECTOR):
            out["trainable_projector"] += n
        elif _is(name, VISION):
            out["trainable_vision"] += n
        else:
            out["trainable_language"] += n
    return out


def parameter_groups(model, recipe, decay_names: set[str]) -> list[dict]:
    """AdamW groups: weight decay only where transformers applies it (not biases / norms), and the
    projector at its own learning rate when the recipe sets ``projector_lr`` (LLaVA's
    ``mm_projector_lr``)."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = (_is(name, PROJECTOR) and recipe.projector_lr is not None, name in decay_names)
        groups.setdefault(key, []).append(param)
    out = []
    for (projector, decay), params in sorted(groups.items()):
        group = {"params": params, "weight_decay": recipe.weight_decay if decay else 0.0}
        if projector:
            group["lr"] = recipe.projector_lr
        out.append(group)
    return out
