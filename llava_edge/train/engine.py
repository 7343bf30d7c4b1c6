"""The engine: transformers' ``Trainer``, with the few changes LLaVA's own ``LLaVATrainer`` makes.

Trainer (over accelerate) already does the parts that are easy to get subtly wrong: DDP / FSDP /
DeepSpeed through one code path, token-level loss normalised over the whole global batch (every
micro-batch and every process), gradient accumulation, cosine schedule with warmup, mixed
precision, gradient checkpointing, and resuming (optimizer, scheduler, per-process RNG, skipping
the batches already seen). What we change, as LLaVA does:

- the sampler: :class:`~llava_edge.train.sampler.EpochSampler` (modality/length grouping per global
  batch, seeded per epoch);
- the optimizer: the projector at its own learning rate (``mm_projector_lr``);
- checkpoints: written to ``RUN/staging``, then hashed into a manifest and renamed into
  ``RUN/checkpoints`` (:mod:`llava_edge.train.checkpoint`);
- the progress bar shows the loss in place instead of printing a line per step.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ProgressCallback

from llava_edge.train import checkpoint as ckpt
from llava_edge.train.sampler import EpochSampler
from llava_edge.train.stages import parameter_groups


class LlavaTrainer(Trainer):
    def __init__(self, *args, recipe, run_dir: Path, lengths, global_batch: int, **kwargs):
        self.recipe = recipe
        self.run_dir = Path(run_dir)
        self.lengths = lengths
        self.global_batch = global_batch
        super().__init__(*args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        return EpochSampler(self.lengths, seed=self.recipe.seed_for_data, group_size=self.global_batch,
                            grouped=bool(self.recipe.group_by_modality_length))

    def create_optimizer(self, model=None):
        opt_model = self.model if model is None else model
        if self.optimizer is None:
            decay = set(self.get_decay_parameter_names(opt_model))
            groups = parameter_groups(opt_model, self.recipe, decay)
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        """Load the weights of a checkpoint, all of them, or fail.

        transformers 5.23's Trainer loads ``model.safetensors`` with ``load_state_dict(strict=False)``
        under the in-memory names, but ``save_pretrained`` wrote LLaVA's on-disk names
        (``language_model.model.*``): every key misses, a warning is logged and training silently
        resumes from the *initial* weights (transformers issue #43701). We load through
        ``from_pretrained`` (which renames) and copy strictly; adapters are checked tensor by tensor.
        """
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        folder = Path(resume_from_checkpoint)
        if hasattr(target, "peft_config"):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            _check_adapter_loaded(target, folder)
            return
        from llava_edge.model.loading import load_model

        loaded = load_model(folder, dtype=str(next(target.parameters()).dtype).removeprefix("torch."))
        target.load_state_dict(loaded.state_dict(), strict=True)

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)  # every process writes its part into RUN/staging
        staged = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            state = {
                "global_step": self.state.global_step,
                "epoch": self.state.epoch,
                "samples_seen": self.state.global_step * self.global_batch,
                "world_size": self.args.world_size,
                "recipe": self.recipe.name,
            }
            ckpt.publish(staged, self.run_dir, state, keep=self.recipe.save_total_limit)
        self.accelerator.wait_for_everyone()


def _check_adapter_loaded(model, folder: Path) -> None:
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    saved = load_file(folder / "adapter_model.safetensors")
    current = get_peft_model_state_dict(model)
    if set(saved) != set(current) or any(not (saved[k] == current[k].to(saved[k].dtype)).all() for k in saved):
        raise ckpt.CheckpointError(f"{folder}: the adapter weights did not load back as saved")


class InPlaceProgress(ProgressCallback):
    """tqdm bar with the latest loss and learning rate as its postfix (no line per log)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            shown = {k: f"{logs[k]:.4g}" for k in ("loss", "learning_rate") if k in logs}
            if shown:
                self.training_bar.set_postfix(shown)


class HistoryWriter(TrainerCallback):
    """Appends every log entry to ``RUN/log.jsonl`` as it happens (main process)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "log.jsonl"

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


def loss_history(log_history: list[dict]) -> list[dict]:
    """Per-step training records (step, loss, learning rate, grad norm) from Trainer's history."""
    keep = ("step", "loss", "learning_rate", "grad_norm", "epoch")
    return [{k: entry[k] for k in keep if k in entry} for entry in log_history if "loss" in entry]
