"""Pretraining the demo vision tower: its layer -2 patch features must state the scene's annotation.

The objective plays the part of CLIP's: it puts into the features LLaVA uses (hidden states of layer
-2, CLS dropped) what a caption says about an image. Two linear heads read the frozen-in-LLaVA
features, so whatever they predict is linearly present in the tokens the projector will see:

- per patch token: colour, kind and size of the shape in the patch's grid cell ("none" if empty) and
  the cell's row and column;
- per grid cell (the patch tokens averaged over the cell by overlapping area): the same colour, kind
  and size;
- per image (mean of the patch tokens): number of shapes, background, and which colour+kind pairs
  occur (multi-label).

Every step draws fresh training scenes, so the tower never sees a scene twice and held-out scenes
(the world's eval split, whose signatures never occur in training) measure generalisation.
The tower's last layer and post-layernorm get no gradient (LLaVA never reads them) and keep their
initial weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from llava_edge.pretrain.optim import train_loop
from llava_edge.pretrain.world_batches import (
    CELL_CLASSES,
    GRID,
    IMAGE_CLASSES,
    KINDS,
    cell_pooling,
    patch_cells,
    scene_batch,
)

FEATURE_LAYER = -2  # LLaVA's vision_feature_layer
# Shape is the last attribute a small ViT learns (a plateau of a few hundred steps at chance while
# colour and size are already near perfect): its losses get a larger share of each step's gradient.
LOSS_WEIGHTS = {"shape": 3.0, "cell_shape": 3.0}


def image_features(tower, pixel_values: torch.Tensor) -> torch.Tensor:
    """[N, n_patches, hidden]: what LLaVA's projector receives (layer -2, CLS dropped)."""
    out = tower(pixel_values=pixel_values, output_hidden_states=True)
    return out.hidden_states[FEATURE_LAYER][:, 1:]


class AnnotationHead(nn.Module):
    """Linear read-outs of the annotation from patch features (see the module doc)."""

    def __init__(self, hidden: int, image_size: int, patch_size: int):
        super().__init__()
        self.cell_sizes = [len(c) for c in CELL_CLASSES.values()] + [GRID, GRID]
        self.image_sizes = [len(c) for c in IMAGE_CLASSES.values()] + [len(KINDS)]
        self.patch = nn.Linear(hidden, sum(self.cell_sizes))
        self.cell = nn.Linear(hidden, sum(self.cell_sizes[:len(CELL_CLASSES)]))
        self.image = nn.Linear(hidden, sum(self.image_sizes))
        pool = torch.from_numpy(cell_pooling(image_size, patch_size))
        self.register_buffer("pool", pool, persistent=False)  # [9, n_patches]
        cells = torch.from_numpy(patch_cells(image_size, patch_size))
        self.register_buffer("cells", cells, persistent=False)  # [n_patches] cell of each patch
        self.register_buffer("rows", cells // GRID, persistent=False)
        self.register_buffer("cols", cells % GRID, persistent=False)

    def losses(self, features: torch.Tensor, targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Mean cross-entropy of every task (binary for presence), unweighted."""
        n, p, _ = features.shape
        out = {}
        logits = self.patch(features).split(self.cell_sizes, dim=-1)
        for (task, _), lg in zip(CELL_CLASSES.items(), logits):
            out[task] = F.cross_entropy(lg.reshape(n * p, -1), targets[task][:, self.cells].reshape(-1))
        out["row"] = F.cross_entropy(logits[-2].reshape(n * p, -1), self.rows.repeat(n))
        out["col"] = F.cross_entropy(logits[-1].reshape(n * p, -1), self.cols.repeat(n))
        cell_features = torch.einsum("cp,nph->nch", self.pool, features)
        cell_logits = self.cell(cell_features).split(self.cell_sizes[:len(CELL_CLASSES)], dim=-1)
        for task, lg in zip(CELL_CLASSES, cell_logits):
            out[f"cell_{task}"] = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), targets[task].reshape(-1))
        count, background, present = self.image(features.mean(dim=1)).split(self.image_sizes, dim=-1)
        out["count"] = F.cross_entropy(count, targets["count"])
        out["background"] = F.cross_entropy(background, targets["background"])
        out["present"] = F.binary_cross_entropy_with_logits(present, targets["present"])
        return out


def train_vision(
    tower,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    warmup: float,
    world_seed: int,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train ``tower`` in place on fresh training scenes; returns the loss of every step.

    Scenes ``step * batch_size ...`` of the world's train split (``world_seed``) make step ``step``.
    The head is created from torch's current RNG state: seed before calling for determinism.
    """
    cfg = tower.config
    head = AnnotationHead(cfg.hidden_size, cfg.image_size, cfg.patch_size)
    params = [p for p in list(tower.parameters()) + list(head.parameters()) if p.requires_grad]

    def loss_at(step: int):
        pixels, targets = scene_batch(world_seed, "train", range(step * batch_size, (step + 1) * batch_size),
                                      cfg.image_size)
        losses = head.losses(image_features(tower, pixels), targets)
        return sum(LOSS_WEIGHTS.get(task, 1.0) * value for task, value in losses.items())

    tower.train()
    history = train_loop(params, loss_at, steps=steps, lr=lr, weight_decay=weight_decay, warmup=warmup,
                         on_step=on_step)
    tower.eval()
    return history
