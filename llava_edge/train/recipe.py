"""Recipes: every number of a training run in one record, read from a TOML or YAML file.

The defaults of a stage are LLaVA-1.5's own (``scripts/v1_5/pretrain.sh`` and ``finetune.sh`` /
``finetune_lora.sh``, shared/DESIGN.md): a recipe file only has to say what differs. Files in
``configs/`` spell every field out anyway, so they read like LLaVA's scripts.

The global batch is the one number the optimisation sees; the per-device batch is what fits in
memory. Gradient accumulation makes up the difference for however many processes run:
``global = per_device x processes x accumulation`` (see :func:`accumulation_steps`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llava_edge.errors import UserError

STAGE_TEMPLATES = {1: "plain", 2: "vicuna_v1"}
TUNES = {1: ("projector",), 2: ("full", "lora")}
PRECISIONS = ("fp32", "bf16", "fp16")
IMAGE_POSITIONS = ("random", "first", "keep")
LORA_OUTPUTS = ("merged", "merged+adapter")


@dataclass
class Recipe:
    """One stage of the recipe. Field names follow LLaVA's / transformers' training arguments."""

    stage: int
    name: str = ""
    template: str = ""  # default: plain (stage 1), vicuna_v1 (stage 2)
    tune: str = ""  # stage 1: projector; stage 2: full or lora
    learning_rate: float = 0.0  # default: 1e-3 (stage 1), 2e-5 (stage 2 full), 2e-4 (stage 2 lora)
    projector_lr: float | None = None  # LLaVA's mm_projector_lr; None: learning_rate
    global_batch_size: int = 0  # default: 256 (stage 1), 128 (stage 2)
    per_device_batch_size: int = 0  # default: 32 (stage 1), 16 (stage 2), as LLaVA on 8 GPUs
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    lr_schedule: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 2048
    gradient_checkpointing: bool = True
    precision: str = "bf16"
    tf32: bool = True
    group_by_modality_length: bool | None = None  # default: False (stage 1), True (stage 2)
    image_position: str = "random"  # first-turn <image> before/after the question: random, first, keep
    seed: int = 42
    data_seed: int | None = None  # order of samples and image positions; None: seed
    # LoRA (stage 2, tune = "lora"); LLaVA-1.5: r 128, alpha 256, dropout 0.05, projector lr 2e-5
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    lora_output: str = "merged"  # merged, or merged+adapter (the adapter also kept in RUN/adapter)
    # Checkpoints and logs
    save_steps: int = 0  # a checkpoint every N optimizer steps; 0: at the end of each epoch
    save_total_limit: int = 1  # checkpoints kept (older ones removed after a newer one is in place)
    logging_steps: int = 1
    dataloader_workers: int = 0
    threads: int = 0  # torch CPU threads of each process; 0: torch's default (one per core)
    # Distributed engines: normally given by `accelerate launch --config_file configs/accelerate/...`
    fsdp: str = ""  # e.g. "full_shard auto_wrap" (TrainingArguments.fsdp)
    fsdp_config: str | dict | None = None
    deepspeed: str | None = None  # a configs/deepspeed/*.json file
    # Data
    image_root: str | None = None  # default: meta.json's image_root beside the data, else its folder
    skip_bad_records: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # anything else, recorded, not used

    def __post_init__(self) -> None:
        if self.stage not in STAGE_TEMPLATES:
            raise UserError(f"recipe stage must be 1 or 2, got {self.stage!r}")
        s = self.stage
        self.template = self.template or STAGE_TEMPLATES[s]
        self.tune = self.tune or TUNES[s][0]
        if self.tune not in TUNES[s]:
            raise UserError(f"stage {s} tunes one of {', '.join(TUNES[s])}; the recipe says {self.tune!r}")
        if not self.learning_rate:
            self.learning_rate = {1: 1e-3, 2: 2e-4 if self.tune == "lora" else 2e-5}[s]
        if self.projector_lr is None and self.tune == "lora":
            self.projector_lr = 2e-5
        self.global_batch_size = self.global_batch_size or {1: 256, 2: 128}[s]
        self.per_device_batch_size = self.per_device_batch_size or {1: 32, 2: 16}[s]
        if self.group_by_modality_length is None:
            self.group_by_modality_length = s == 2
        self.name = self.name or f"llava-1.5-stage{s}" + ("-lora" if self.tune == "lora" else "")
        for name, value, choices in (("precision", self.precision, PRECISIONS),
                                     ("image_position", self.image_position, IMAGE_POSITIONS),
                                     ("lora_output", self.lora_output, LORA_OUTPUTS)):
            if value not in choices:
                raise UserError(f"recipe {name} must be one of {', '.join(choices)}, got {value!r}")
        for name in ("global_batch_size", "per_device_batch_size", "max_length", "logging_steps"):
            if getattr(self, name) <= 0:
                raise UserError(f"recipe {name} must be > 0, got {getattr(self, name)}")
        if self.global_batch_size % self.per_device_batch_size:
            raise UserError(
                f"global_batch_size {self.global_batch_size} is not a multiple of "
                f"per_device_batch_size {self.per_device_batch_size}"
            )
        if self.epochs <= 0 and self.max_steps <= 0:
            raise UserError("recipe needs epochs > 0 or max_steps > 0")

    @property
    def seed_for_data(self) -> int:
        return self.seed if self.data_seed is None else self.data_seed

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def with_overrides(self, **overrides) -> Recipe:
        """A copy with some fields replaced (``None`` values are ignored: an option not given)."""
        overrides = {k: v for k, v in overrides.items() if v is not None}
        _check_fields(overrides, "override")
        data = self.to_dict()
        data.update(overrides)
        return Recipe(**data)


def accumulation_steps(recipe: Recipe, world_size: int) -> int:
    """Gradient accumulation that keeps the recipe's global batch on ``world_size`` processes."""
    per_step = recipe.per_device_batch_size * world_size
    if recipe.global_batch_size % per_step:
        raise UserError(
            f"global batch {recipe.global_batch_size} cannot be split over {world_size} process(es) "
            f"of {recipe.per_device_batch_size} samples each ({per_step} per micro-step); choose a "
            "per_device_batch_size or a process count whose product divides the global batch"
        )
    return recipe.global_batch_size // per_step


def load_recipe(source: str | Path | Recipe | None, stage: int, **overrides) -> Recipe:
    """The recipe of a run: a file (TOML or YAML), a Recipe, or None (LLaVA-1.5's defaults)."""
    overrides = {k: v for k, v in overrides.items() if v is not None}  # None: an option not given
    _check_fields(overrides, "override")
    if isinstance(source, Recipe):
        recipe = source.with_overrides(**overrides)
    else:
        # Overrides join the file's fields before defaults are resolved, so that e.g. tune="lora"
        # also brings LoRA's default learning rates.
        data = read_recipe_file(source) if source is not None else {}
        data.setdefault("stage", stage)
        recipe = Recipe(**{**data, **overrides})
    if recipe.stage != stage:
        raise UserError(f"recipe {recipe.name!r} is for stage {recipe.stage}, but stage {stage} was asked for")
    return recipe


def read_recipe_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such recipe file (see configs/ for the shipped recipes)")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise UserError(f"{path}: recipe files are .toml, .yaml or .json")
    except UserError:
        raise
    except Exception as exc:  # tomllib / yaml / json parse errors
        raise UserError(f"{path}: cannot parse the recipe ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe is a table of fields, got {type(data).__name__}")
    data = dict(data.get("recipe", data))  # a [recipe] table or top-level fields
    _check_fields(data, str(path))
    return data


def _check_fields(data: dict, where: str) -> None:
    known = {f.name for f in dataclasses.fields(Recipe)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"{where}: unknown recipe field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
