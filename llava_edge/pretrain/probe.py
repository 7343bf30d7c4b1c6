"""Linear probes: how much of a scene's annotation frozen layer -2 features state, on held-out scenes.

Features are what LLaVA's projector receives. Per cell of the world's 3x3 grid they are averaged over
the patches covering it (by overlapping area); per image over all patches. One multinomial logistic
regression per task (shared by the nine cells, so it must read the shape from the features, not from
the cell's place) is fitted on training scenes and scored on the eval split, whose scene signatures
never occur in training:

- ``color``, ``shape``, ``size``: fitted on every cell (empty cells are class "none"), scored on the
  cells that hold a shape, i.e. per object (chance: the most frequent value);
- ``count``, ``background``: per image.

The same probe on a randomly initialised tower is the baseline that shows what pretraining added.
"""

from __future__ import annotations

import numpy as np
import torch

from llava_edge.pretrain.vision import image_features
from llava_edge.pretrain.world_batches import CELL_CLASSES, IMAGE_CLASSES, cell_pooling, scene_batch

TASKS = (*CELL_CLASSES, *IMAGE_CLASSES)


@torch.no_grad()
def probe_inputs(tower, seed: int, split: str, n: int, batch_size: int = 128):
    """(per-task features, per-task labels) of scenes ``0..n-1`` of ``split``.

    Cell tasks: features [n * 9, hidden]; image tasks: [n, hidden]."""
    cfg = tower.config
    pool = torch.from_numpy(cell_pooling(cfg.image_size, cfg.patch_size))
    cells, images, labels = [], [], {t: [] for t in TASKS}
    for start in range(0, n, batch_size):
        pixels, targets = scene_batch(seed, split, range(start, min(n, start + batch_size)), cfg.image_size)
        feats = image_features(tower.eval(), pixels)
        cells.append(torch.einsum("cp,nph->nch", pool, feats).reshape(-1, feats.shape[-1]))
        images.append(feats.mean(dim=1))
        for t in TASKS:
            labels[t].append(targets[t].reshape(-1))
    cells, images = torch.cat(cells), torch.cat(images)
    features = {t: cells if t in CELL_CLASSES else images for t in TASKS}
    return features, {t: torch.cat(v) for t, v in labels.items()}


def fit_probe(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float = 1e-3, iters: int = 200):
    """A standardised multinomial logistic regression (full-batch L-BFGS: deterministic)."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / std
    linear = torch.nn.Linear(x.shape[1], n_classes)
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    optimizer = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(z), y) + l2 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return lambda x_new: linear((x_new - mean) / std).argmax(-1)


def probe_accuracy(tower, *, seed: int, n_train: int, n_test: int,
                   tasks: tuple[str, ...] = TASKS) -> dict[str, dict[str, float]]:
    """Held-out accuracy and chance (most frequent held-out class) of each task, per object/image."""
    train_x, train_y = probe_inputs(tower, seed, "train", n_train)
    test_x, test_y = probe_inputs(tower, seed, "eval", n_test)
    out = {}
    for task in tasks:
        n_classes = len(CELL_CLASSES.get(task) or IMAGE_CLASSES[task])
        predict = fit_probe(train_x[task], train_y[task], n_classes)
        with torch.no_grad():
            pred, gold = predict(test_x[task]), test_y[task]
        if task in CELL_CLASSES:  # score objects, not empty cells
            keep = test_y["color"] != 0
            pred, gold = pred[keep], gold[keep]
        chance = np.bincount(gold.numpy(), minlength=n_classes).max() / len(gold)
        out[task] = {"accuracy": round(float((pred == gold).float().mean()), 4),
                     "chance": round(float(chance), 4), "n": int(len(gold))}
    return out
