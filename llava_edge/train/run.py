"""``train(stage, model, data, out)``: one stage of the LLaVA recipe, read top to bottom.

Files of a run::

    OUT/                  the trained model: a save_pretrained LLaVA folder (written at the end)
    OUT.run/recipe.json   the resolved recipe (a resumed run must match it)
    OUT.run/checkpoints/  checkpoint-NNNNNNNN folders, each with a manifest (sha256 per file)
    OUT.run/staging/      checkpoints being written (never loaded)
    OUT.run/log.jsonl     every log entry as it happened
    OUT.run/history.json  loss per step;  OUT.run/loss.png  the loss curve
    OUT.run/adapter/      the LoRA adapter, when the recipe says lora_output = "merged+adapter"

The same function runs in one process or under ``torchrun`` / ``accelerate launch`` (see
``configs/``); run it again with the same arguments and it resumes from the newest valid checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from llava_edge.errors import UserError
from llava_edge.train import checkpoint as ckpt
from llava_edge.train.recipe import Recipe, accumulation_steps, load_recipe

log = logging.getLogger("llava_edge.train")

# Recipe fields that may change between a run and its resumption (they do not change the numbers).
RESUMABLE_CHANGES = {"save_steps", "save_total_limit", "logging_steps", "dataloader_workers", "threads",
                     "name", "extra", "lora_output", "skip_bad_records", "image_root"}


@dataclass
class TrainResult:
    out: Path
    run_dir: Path
    recipe: Recipe
    history: list[dict]  # per optimizer step: step, loss, learning_rate, grad_norm, epoch
    metrics: dict  # Trainer's: train_runtime, train_samples_per_second, ... (this process's run)
    resumed_from: Path | None = None
    trainable: dict = field(default_factory=dict)

    @property
    def losses(self) -> list[float]:
        return [h["loss"] for h in self.history]


def train(stage: int, model: str | Path, data: str | Path, out: str | Path,
          recipe: str | Path | Recipe | None = None, *, run_dir: str | Path | None = None,
          resume: str | Path | bool = "auto", overwrite: bool = False, progress: bool = True,
          callbacks: tuple = (), **overrides) -> TrainResult:
    """Train one stage: ``model`` (a LLaVA folder) on ``data`` (a LLaVA JSON/JSONL file) into ``out``.

    ``recipe``: a recipe file (configs/*.toml), a :class:`Recipe`, or None for LLaVA-1.5's values.
    ``overrides``: recipe fields to replace (e.g. ``max_steps=10``). ``resume``: "auto" continues
    from the newest valid checkpoint in the run folder if there is one; a path resumes from that
    checkpoint (refused if it does not verify); False starts afresh (refused if checkpoints exist).
    """
    import torch
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from llava_edge.model.loading import load_model, load_tokenizer, read_model_info
    from llava_edge.model.templates import get_template
    from llava_edge.train.data import Collator, SampleSpec, SupervisedDataset, open_records
    from llava_edge.train.engine import HistoryWriter, InPlaceProgress, LlavaTrainer, loss_history
    from llava_edge.train.output import export_model, source_sidecar
    from llava_edge.train.plot import plot_losses
    from llava_edge.train.stages import prepare_model, trainable_summary

    recipe = load_recipe(recipe, int(stage), **overrides)
    out = Path(out)
    run_dir = Path(run_dir) if run_dir is not None else out.with_name(out.name + ".run")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out}: already exists; choose another output folder, remove it, or pass overwrite")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    accumulation = accumulation_steps(recipe, world_size)

    # The model and the samples it trains on.
    info = read_model_info(model)
    tokenizer = load_tokenizer(model)
    spec = SampleSpec(tokenizer=tokenizer, template=get_template(recipe.template),
                      n_image_tokens=info.n_image_tokens, preprocess=info.preprocess,
                      max_length=recipe.max_length, image_position=recipe.image_position,
                      seed=recipe.seed_for_data)
    dataset = SupervisedDataset(open_records(data, recipe.image_root, recipe.skip_bad_records), spec)
    if len(dataset) == 0:
        raise UserError(f"{data}: no records to train on")
    text_only = any(n <= 0 for n in dataset.lengths)

    cuda = torch.cuda.is_available()
    if not cuda and world_size > 1 and (recipe.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"):
        from llava_edge.train.compat import allow_fsdp_on_cpu

        allow_fsdp_on_cpu()  # else accelerate silently runs DDP instead (see compat.py)
    if recipe.threads:  # on a shared or small CPU one thread per process can be several times faster
        torch.set_num_threads(recipe.threads)
    args = TrainingArguments(
        output_dir=str(run_dir / "staging"),
        per_device_train_batch_size=recipe.per_device_batch_size,
        gradient_accumulation_steps=accumulation,
        learning_rate=recipe.learning_rate,
        weight_decay=recipe.weight_decay,
        num_train_epochs=recipe.epochs,
        max_steps=recipe.max_steps,
        lr_scheduler_type=recipe.lr_schedule,
        warmup_steps=recipe.warmup_ratio,  # < 1: a fraction of the steps (transformers 5)
        max_grad_norm=recipe.max_grad_norm,
        bf16=recipe.precision == "bf16",
        fp16=recipe.precision == "fp16",
        tf32=recipe.tf32 if cuda else None,  # TF32 exists on Ampere+ GPUs only
        activation_checkpointing=recipe.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=recipe.logging_steps,
        logging_nan_inf_filter=False,  # log the loss that was computed, not a stand-in
        save_strategy="steps" if recipe.save_steps else "epoch",
        save_steps=recipe.save_steps or 500,
        save_total_limit=None,  # rotation happens after publishing (checkpoint.publish)
        seed=recipe.seed,
        data_seed=recipe.seed_for_data,
        dataloader_num_workers=recipe.dataloader_workers,
        remove_unused_columns=False,
        report_to="none",
        disable_tqdm=not progress,
        use_cpu=not cuda,
        ddp_find_unused_parameters=text_only,  # text-only batches leave the projector without grads
        average_tokens_across_devices=True,
        include_num_input_tokens_seen="non_padding",
        fsdp=recipe.fsdp,
        fsdp_config=recipe.fsdp_config,
        deepspeed=recipe.deepspeed,
    )
    main = args.process_index == 0

    # Where to start: a verified checkpoint, chosen on the main process and shared with the others.
    resume_from = None
    if main:
        resume_from = _choose_checkpoint(run_dir, recipe, resume)
        _clean_staging(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=2) + "\n")
    resume_from = _broadcast(resume_from)  # also the barrier after the main process's set-up

    net = prepare_model(load_model(model), recipe)
    trainable = trainable_summary(net)
    trainer = LlavaTrainer(
        model=net, args=args, train_dataset=dataset, data_collator=Collator(tokenizer.pad_id),
        recipe=recipe, run_dir=run_dir, lengths=dataset.lengths, global_batch=recipe.global_batch_size,
        callbacks=[HistoryWriter(run_dir), *callbacks],
    )
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)  # what Trainer prints without a bar: a line per step
    if progress:
        trainer.add_callback(InPlaceProgress())
    if main:
        log.info("stage %s (%s): %s trainable of %s parameters; global batch %s = %s x %s process(es) x %s "
                 "accumulation", recipe.stage, recipe.tune, f"{trainable['trainable']:,}",
                 f"{trainable['trainable'] + trainable['frozen']:,}", recipe.global_batch_size,
                 recipe.per_device_batch_size, world_size, accumulation)
    started = time.time()
    output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    metrics = dict(output.metrics)
    metrics["wall_s"] = time.time() - started
    metrics["num_input_tokens_seen"] = trainer.state.num_input_tokens_seen
    history = loss_history(trainer.state.log_history)

    if main:
        (run_dir / "history.json").write_text(json.dumps({"history": history, "metrics": metrics}, indent=2) + "\n")
        if history:
            plot_losses(history, run_dir / "loss.png", f"{recipe.name}: stage {recipe.stage} ({recipe.tune})")
    extra = {**source_sidecar(info.path), "training": {
        "stage": recipe.stage, "recipe": recipe.name, "tune": recipe.tune, "source": str(info.path),
        "data": str(data), "steps": trainer.state.global_step, "final_loss": history[-1]["loss"] if history else None,
    }}
    export_model(
        trainer, tokenizer=tokenizer, out=out, template=recipe.template, preprocess=info.preprocess,
        extra=extra, adapter_dir=run_dir / "adapter" if recipe.lora_output == "merged+adapter" else None,
        rebuild=lambda: prepare_model(load_model(model), recipe),
    )
    return TrainResult(out=out, run_dir=run_dir, recipe=recipe, history=history, metrics=metrics,
                       resumed_from=resume_from, trainable=trainable)


def _choose_checkpoint(run_dir: Path, recipe: Recipe, resume) -> Path | None:
    if resume not in ("auto", True, False, None):  # an explicit checkpoint folder
        return ckpt.verify_checkpoint(resume).path
    existing = ckpt.list_checkpoints(run_dir)
    if not resume:
        if existing:
            raise UserError(f"{run_dir}: holds checkpoints of an earlier run; resume it (resume='auto') "
                            "or choose another output folder")
        return None
    found = ckpt.latest_valid(run_dir, warn=log.warning)
    if found is None:
        if existing:
            log.warning("%s: no checkpoint verifies; starting afresh", run_dir)
        return None
    _check_same_recipe(run_dir, recipe)
    log.info("resuming from %s (step %s)", found.path, found.global_step)
    return found.path


def _check_same_recipe(run_dir: Path, recipe: Recipe) -> None:
    saved_path = run_dir / "recipe.json"
    if not saved_path.is_file():
        return
    saved = json.loads(saved_path.read_text())
    now = recipe.to_dict()
    changed = sorted(k for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k])
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed)
        raise UserError(f"{run_dir}: cannot resume with a different recipe ({details}); use the "
                        "earlier recipe, or another output folder to start afresh")


def _broadcast(value):
    """The main process's value on every process (no-op without torch.distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _clean_staging(run_dir: Path) -> None:
    """Half-written checkpoints of a killed run: never loaded, removed before writing new ones."""
    staging = run_dir / "staging"
    if staging.is_dir():
        shutil.rmtree(staging, ignore_errors=True)
