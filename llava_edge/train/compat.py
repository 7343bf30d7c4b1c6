"""Work-arounds for the engine's gaps, each one small, named, and switched on only where needed.

FSDP on CPU: accelerate 1.15 turns FSDP on only for accelerator devices (``AcceleratorState``
lists MULTI_GPU, MULTI_XPU, ...; not MULTI_CPU). On a CPU machine an FSDP config therefore gives
plain DDP, silently. PyTorch's FSDP2 itself runs on CPU with gloo, and so does the rest of
accelerate's FSDP path, so :func:`allow_fsdp_on_cpu` lets the state keep the FSDP plugin it was
given. It is what makes the 2-process FSDP test possible on CPU CI; GPUs never need it.

Loading a model on one process under ZeRO-3: once TrainingArguments has a ZeRO-3 config,
transformers builds every model inside ``deepspeed.zero.Init``, which partitions each parameter
with a collective. The main process rebuilding the model to receive the gathered weights (the
final save) would wait there for processes that never come: :func:`without_zero3_init`.
"""

from __future__ import annotations

import contextlib
import logging

log = logging.getLogger("llava_edge.train")


def allow_fsdp_on_cpu() -> None:
    """Make ``AcceleratorState`` use a given FSDP plugin on CPU processes too (idempotent)."""
    import accelerate.state as state

    init = state.AcceleratorState.__init__
    if getattr(init, "_llava_edge_cpu_fsdp", False):
        return

    def patched(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == state.DistributedType.MULTI_CPU:
            self.distributed_type = state.DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            log.info("FSDP on CPU processes (gloo)")

    patched._llava_edge_cpu_fsdp = True
    state.AcceleratorState.__init__ = patched


@contextlib.contextmanager
def without_zero3_init():
    """Build models unpartitioned, on this process alone, while a ZeRO-3 run is set up.

    transformers keeps the active DeepSpeed config behind a module-level weak reference (set by
    TrainingArguments for ``deepspeed=``, by accelerate's plugin for ``accelerate launch``) and has
    no public getter for it; we take it, unset it, and put the same object back."""
    from transformers.integrations import deepspeed as hf_deepspeed

    if not hf_deepspeed.is_deepspeed_zero3_enabled():
        yield
        return
    config = hf_deepspeed._hf_deepspeed_config_weak_ref()
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(config)
