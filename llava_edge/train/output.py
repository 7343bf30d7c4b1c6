"""The trained model as a plain ``save_pretrained`` LLaVA folder (LoRA merged), written atomically.

The folder is written by :func:`llava_edge.model.build.save_checkpoint`, the same writer as
``llava-edge init``: weights, tokenizer, processor and the ``llava_edge.json`` sidecar (chat template
of the stage, preprocessing of the source model, and a ``training`` record).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from llava_edge.model.build import SIDECAR, save_checkpoint
from llava_edge.train.compat import without_zero3_init
from llava_edge.utils.atomic import atomic_dir


def source_sidecar(model_dir: Path) -> dict:
    """The source model's sidecar minus what the new folder restates (template, preprocessing)."""
    path = Path(model_dir) / SIDECAR
    data = json.loads(path.read_text()) if path.is_file() else {}
    return {k: v for k, v in data.items() if k not in ("template", "preprocess", "training")}


def full_state_dict(trainer):
    """The whole state dict on the main process, gathered from every process's shards (FSDP,
    ZeRO-3); None when the model is not sharded. Every process must call this."""
    if trainer.is_fsdp_enabled:
        # torch's API gathers FSDP1 and FSDP2 alike, whatever state_dict_type checkpoints use.
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(trainer.model_wrapped, options=options)
    if trainer.is_deepspeed_enabled:  # needs stage3_gather_16bit_weights_on_model_save (configs/deepspeed)
        return trainer.accelerator.get_state_dict(trainer.model_wrapped)
    return None


def _save_replacing(out: Path, save) -> Path:
    """``save(out)``; an existing ``out`` (the caller allowed overwriting it) is replaced only once
    the new folder is complete, by two renames."""
    out = Path(out)
    if not (out.exists() and any(out.iterdir())):
        return save(out)
    new = out.with_name(f".{out.name}.new-{os.getpid()}")
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    shutil.rmtree(new, ignore_errors=True)
    save(new)
    os.replace(out, old)
    os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def export_model(trainer, *, tokenizer, out: Path, template: str, preprocess, extra: dict,
                 adapter_dir: Path | None, rebuild) -> Path | None:
    """Write the final model (main process); ``rebuild()`` gives an unsharded model to load a
    gathered state dict into. Returns ``out`` on the main process, None elsewhere."""
    state_dict = full_state_dict(trainer)
    out_path = None
    if trainer.args.should_save:
        model = trainer.accelerator.unwrap_model(trainer.model)
        if state_dict is not None:
            with without_zero3_init():
                model = rebuild()
            model.load_state_dict(state_dict)
        if hasattr(model, "merge_and_unload"):  # a peft model
            if adapter_dir is not None:
                with atomic_dir(adapter_dir, overwrite=True) as tmp:
                    model.save_pretrained(tmp)
            model = model.merge_and_unload()
        model = model.eval()
        out_path = _save_replacing(out, lambda dest: save_checkpoint(
            model, tokenizer, dest, template=template, preprocess=preprocess, extra=extra))
    trainer.accelerator.wait_for_everyone()
    return out_path
