"""The optimiser both pretraining recipes use: AdamW, linear warmup then cosine decay to zero."""

from __future__ import annotations

import math


def adamw_cosine(params, *, lr: float, weight_decay: float, steps: int, warmup: float):
    """(optimizer, scheduler); ``warmup`` is a fraction of ``steps`` (LLaVA's recipe uses 0.03)."""
    import torch

    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    warm = max(1, round(warmup * steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
