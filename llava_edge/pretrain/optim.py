"""The optimiser and loop both pretraining recipes use: AdamW, linear warmup then cosine decay to zero."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable


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


def train_loop(params: Iterable, loss_at: Callable[[int], object], *, steps: int, lr: float, weight_decay: float,
               warmup: float, on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """``steps`` AdamW steps on ``loss_at(step)`` (a scalar tensor), gradients clipped to norm 1;
    returns the loss of every step."""
    import torch

    params = list(params)
    optimizer, scheduler = adamw_cosine(params, lr=lr, weight_decay=weight_decay, steps=steps, warmup=warmup)
    history = []
    for step in range(steps):
        loss = loss_at(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        history.append(loss.item())
        if on_step:
            on_step(step, history[-1])
    return history
